#!/usr/bin/env bash
# Train (or resume) the built-in default model; every stage continues from its last checkpoint.
#   nohup scripts/train_default_model.sh > runs/default/log.txt 2>&1 &
# Run it again after an interruption: finished stages are skipped. See docs/default_model.md.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="${1:-runs/default}"
mkdir -p "$ROOT"
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
echo "[$(date -Is)] start, root=$ROOT, pid=$$"
NOISECRAFT_DEFAULT_ROOT="$ROOT" python -u -c "
import os
from noisecraft.training.default_model import run_unfinished
print('stage status:', run_unfinished(os.environ['NOISECRAFT_DEFAULT_ROOT']))
"
echo "[$(date -Is)] end"
