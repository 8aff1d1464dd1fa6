#!/usr/bin/env bash
# Postgres, one hub and three edges on this machine, to watch the replicated log work:
#
#   deploy/dev/hub-and-edges.sh          # builds, starts everything, prints what to try; Ctrl-C stops
#
# The hub (patterns/hub.toml) holds the one replication slot and serves its log on :7071; edges
# on :7080, :7081, :7082 follow it (patterns/edge.toml with their own node id, port and log).
# Logs and data go to CACHESYNC_DEV_DIR (default /tmp/cachesync-dev-hub).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
dir="${CACHESYNC_DEV_DIR:-/tmp/cachesync-dev-hub}"
port="${PGPORT:-5432}"
mkdir -p "$dir"

"$here/postgres.sh" start
(cd "$root" && cargo build --release --locked -q)
bin="$root/target/release/cachesync"

pids=()
stop() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    echo "stopped the hub and the edges (Postgres keeps running: deploy/dev/postgres.sh stop)"
}
trap stop EXIT INT TERM

sed -e "s#127.0.0.1:5432#127.0.0.1:$port#" -e "s#/tmp/cachesync-hub-log#$dir/hub-log#" \
    "$root/patterns/hub.toml" > "$dir/hub.toml"
"$bin" serve --config "$dir/hub.toml" > "$dir/hub.log" 2>&1 &
pids+=($!)
for i in 0 1 2; do
    sed -e "s#127.0.0.1:5432#127.0.0.1:$port#" -e "s#127.0.0.1:7080#127.0.0.1:708$i#" \
        -e "s#edge-1#edge-$i#" -e "s#/tmp/cachesync-edge-1-log#$dir/edge-$i-log#" \
        "$root/patterns/edge.toml" > "$dir/edge-$i.toml"
    "$bin" serve --config "$dir/edge-$i.toml" > "$dir/edge-$i.log" 2>&1 &
    pids+=($!)
done

ready() { curl -fsS "http://127.0.0.1:$1/readyz" > /dev/null 2>&1; }
for p in 7070 7080 7081 7082; do
    for _ in $(seq 1 300); do ready "$p" && break; sleep 0.1; done
    ready "$p" || { echo "the node on :$p did not become ready; see $dir/*.log" >&2; exit 1; }
done

cat <<MSG
A hub (:7070, log server :7071) and three edges (:7080-:7082) are up. Try:
  curl -s localhost:7070/v1/replication          # the hub: its followers and their lag
  curl -s localhost:7081/v1/replication          # an edge: its upstream, position, lag
  curl -s localhost:7082/v1/kv/users/1           # served from the hub's snapshot
  deploy/dev/postgres.sh psql <<< "UPDATE users SET name = 'Ada King' WHERE id = 1"
  curl -s localhost:7080/v1/kv/users/1           # every edge has it within milliseconds
  psql -h 127.0.0.1 -p $port -U postgres -d app -c "SELECT slot_name, active FROM pg_replication_slots"
                                                  # one slot, however many edges
Logs: $dir/*.log   Ctrl-C stops the nodes.
MSG
wait
