#!/usr/bin/env bash
# Installs what the tests and benchmarks need and a fresh Debian/Ubuntu machine lacks:
# the PostgreSQL server binaries (initdb, postgres, pg_recvlogical, psql), redis-server and
# redis-cli, libfaketime, Python's venv (for the deployment validators), the DejaVu font (for
# the benchmarks' plots), and nginx and wrk (the HTTP benchmark's peer and load tool).
# Does nothing when they are already there. The tests start their own throwaway servers;
# no system service is used or started here.
set -euo pipefail
need=()
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
    need+=(postgresql-15 postgresql-client-15)
fi
command -v psql >/dev/null 2>&1 || need+=(postgresql-client-15)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || need+=(redis-tools)
# validate-deploy.sh installs kubernetes-validate and yamllint into a virtualenv.
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
# A fake wall clock for one process (LD_PRELOAD): the federation clock-drift test runs a node 10 s ahead.
ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1 || need+=(libfaketime)
# The font the benchmarks' PNG plots are drawn with (benches/common/report.rs).
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need+=(fonts-dejavu-core)
# The HTTP benchmark's peer and load tool (benches/http_cpu.rs); no service is started.
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
if ! command -v apt-get >/dev/null 2>&1; then
    echo "missing: ${need[*]} — install them with your package manager (tests need initdb/postgres >= 14 and redis-server)" >&2
    exit 1
fi
echo "installing: ${need[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
