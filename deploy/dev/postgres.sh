#!/usr/bin/env bash
# A local Postgres for trying cachesync by hand: wal_level=logical, listening on 127.0.0.1,
# database `app` loaded with deploy/dev/sample.sql.
#
#   deploy/dev/postgres.sh start   # initdb (first time), start, load the sample schema
#   deploy/dev/postgres.sh stop
#   deploy/dev/postgres.sh psql    # a psql shell on the app database
#
# Settings: PGPORT (default 5432), CACHESYNC_DEV_PGDATA (default /tmp/cachesync-dev-pg).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
port="${PGPORT:-5432}"
data="${CACHESYNC_DEV_PGDATA:-/tmp/cachesync-dev-pg}"
bindir="${CACHESYNC_PG_BINDIR:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}"
if [ ! -x "$bindir/initdb" ]; then
    echo "Postgres server binaries not found; run deploy/dev/install-deps.sh (or set CACHESYNC_PG_BINDIR)" >&2
    exit 1
fi
# initdb and the server refuse to run as root: use the postgres user then.
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

case "${1:-start}" in
start)
    if [ ! -s "$data/PG_VERSION" ]; then
        mkdir -p "$data"
        [ "$(id -u)" = 0 ] && chown postgres:postgres "$data"
        as_pg "$bindir/initdb" -D "$data" -A trust -U postgres -E UTF8 >/dev/null
    fi
    # Already running (a second dev script, or a rerun): use it.
    if ! as_pg "$bindir/pg_ctl" -D "$data" status >/dev/null 2>&1; then
        as_pg "$bindir/pg_ctl" -D "$data" -l "$data/server.log" -w \
            -o "-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories=$data -c wal_level=logical -c max_wal_senders=16 -c max_replication_slots=16" start
    fi
    psql -h 127.0.0.1 -p "$port" -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'app'" | grep -q 1 \
        || psql -h 127.0.0.1 -p "$port" -U postgres -qc "CREATE DATABASE app"
    psql -h 127.0.0.1 -p "$port" -U postgres -d app -q -f "$here/sample.sql"
    echo "Postgres is up: postgres://postgres@127.0.0.1:$port/app"
    ;;
stop)
    as_pg "$bindir/pg_ctl" -D "$data" -m fast stop
    ;;
psql)
    exec psql -h 127.0.0.1 -p "$port" -U postgres -d app
    ;;
*)
    echo "usage: $0 start|stop|psql" >&2
    exit 2
    ;;
esac
