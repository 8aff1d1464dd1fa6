#!/usr/bin/env bash
# Installs the real Redis client library the RESP tests drive besides redis-cli and the Rust
# `redis` crate: redis-py (RESP2 and RESP3), pinned, into a virtualenv under target/ (from PyPI
# on first use). Prints nothing when it is already there.
set -euo pipefail
cd "$(dirname "$0")/../.."
venv="${CACHESYNC_CLIENT_VENV:-target/client-tools}"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import redis' >/dev/null 2>&1; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "redis==8.1.0"
fi
