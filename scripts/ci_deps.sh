#!/usr/bin/env bash
# System packages the tests need beyond pip: Debian's Chromium for the web UI tests
# (tests/web, driven by Playwright with executable_path=/usr/bin/chromium; no browser is
# downloaded).  Idempotent: does nothing when /usr/bin/chromium is already there.
set -euo pipefail
if [ ! -x /usr/bin/chromium ]; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium
fi
/usr/bin/chromium --version 2>/dev/null || true

# ---- redis-server (tests/server/test_redis_scaleout.py: --queue redis) -----------------
# Debian's redis-server; the tests start their own instance on a free 127.0.0.1 port, so
# the package's system service is not needed.  Idempotent: skipped when already installed.
if ! command -v redis-server >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server
fi
redis-server --version 2>/dev/null || true
