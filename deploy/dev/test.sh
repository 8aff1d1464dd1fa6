#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs the server binaries the tests need (if
# missing) and the Python Redis client the RESP tests use, then runs every unit, integration
# and doc test. The tests start and stop their own throwaway Postgres and Redis servers on free
# loopback ports.
set -euo pipefail
cd "$(dirname "$0")/../.."
deploy/dev/install-deps.sh
deploy/dev/client-tools.sh
exec cargo test --locked "$@"
