#!/usr/bin/env bash
# Three regions federating on this machine, in a ring (us → eu → ap → us), to watch event
# federation work:
#
#   deploy/dev/federation.sh          # builds, starts everything, prints what to try; Ctrl-C stops
#
# us (patterns/federation-us.toml, API :7070, log server :7071) is the home of `users`: it holds
# the Postgres slot. eu (:7170/:7171) and ap (:7270/:7271) hold views of it whose writes land in
# us's Postgres, and all three share the in-memory keyspace `sessions`.
# Logs and data go to CACHESYNC_DEV_DIR (default /tmp/cachesync-dev-fed).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
dir="${CACHESYNC_DEV_DIR:-/tmp/cachesync-dev-fed}"
port="${PGPORT:-5432}"
mkdir -p "$dir"

"$here/postgres.sh" start
(cd "$root" && cargo build --release --locked -q)
bin="$root/target/release/cachesync"

pids=()
stop() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    echo "stopped the three regions (Postgres keeps running: deploy/dev/postgres.sh stop)"
}
trap stop EXIT INT TERM

for r in us eu ap; do
    sed -e "s#127.0.0.1:5432#127.0.0.1:$port#" -e "s#/tmp/cachesync-fed-$r-log#$dir/$r-log#" \
        "$root/patterns/federation-$r.toml" > "$dir/$r.toml"
    "$bin" serve --config "$dir/$r.toml" > "$dir/$r.log" 2>&1 &
    pids+=($!)
done

ready() { curl -fsS "http://127.0.0.1:$1/readyz" > /dev/null 2>&1; }
for p in 7070 7170 7270; do
    for _ in $(seq 1 300); do ready "$p" && break; sleep 0.1; done
    ready "$p" || { echo "the region on :$p did not become ready; see $dir/*.log" >&2; exit 1; }
done

cat <<MSG
Three regions are up: us (:7070, home of users), eu (:7170), ap (:7270), in a ring. Try:
  curl -s localhost:7270/v1/kv/users/1                      # us's row, served from ap's memory
  curl -i -XPUT localhost:7170/v1/kv/users/1 -d '{"name":"Ada King"}'
                                                             # 202 at eu; lands in us's Postgres,
  curl -s localhost:7270/v1/kv/users/1                      # and us's CDC brings it to every region
  curl -XPUT localhost:7070/v1/kv/sessions/s1 -d '{"at":"us"}'; curl -XPUT localhost:7270/v1/kv/sessions/s1 -d '{"at":"ap"}'
  curl -s localhost:7170/v1/kv/sessions/s1                  # the same winner everywhere (highest HLC, then origin)
  curl -s localhost:7170/v1/replication | jq .federation    # vector, peers, conflicts, tombstones
  kill -STOP <ap's pid>; ...; kill -CONT <ap's pid>         # a stalled region catches up by itself
Logs: $dir/*.log   Ctrl-C stops the regions.
MSG
wait
