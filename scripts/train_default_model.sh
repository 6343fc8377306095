#!/usr/bin/env bash
# Train (or resume) the built-in default model; every stage continues from its last checkpoint.
#   mkdir -p ~/noisecraft-runs/default && nohup scripts/train_default_model.sh > ~/noisecraft-runs/default/log.txt 2>&1 &
# Run it again after an interruption: finished stages are skipped. See docs/default_model.md.
# Each stage runs in a fresh Python process, so it uses the code on disk when it starts.
set -euo pipefail
cd "$(dirname "$0")/.."
# Outside the work tree by default: a later session gets a fresh checkout, so runs/ under it
# would be lost; $HOME survives on the same machine.
ROOT="${1:-${NOISECRAFT_RUNS:-$HOME/noisecraft-runs}/default}"
mkdir -p "$ROOT"
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
echo "[$(date -Is)] start, root=$ROOT, pid=$$"
STAGES=$(python -c "from noisecraft.training.default_model import STAGES; print(*STAGES)")
for STAGE in $STAGES; do
  echo "[$(date -Is)] stage $STAGE"
  NOISECRAFT_ROOT="$ROOT" NOISECRAFT_STAGE="$STAGE" python -u -c "
import os, sys
from noisecraft.training.default_model import run_stage
sys.exit(0 if run_stage(os.environ['NOISECRAFT_ROOT'], os.environ['NOISECRAFT_STAGE']) else 3)
"
done
echo "[$(date -Is)] all stages finished"
