#!/usr/bin/env bash
# Online moves under load: two routers sharing a catalog, 8 pgbench clients (4 per router)
# updating random rows, and `shardctl move` carrying buckets back and forth between 2 shards.
# Reports per move the write pause (fence published -> switch published; p50/p99 over all
# moves), the copy throughput against a plain `COPY ... TO STDOUT | COPY ... FROM STDIN`
# between the same servers, and the catch-up: changes per second of catch-up (bounded by the
# writers' rate) and per second the target spent applying them (the apply rate).
#
#   bash benches/rebalance.sh            # ROWS=400000 MOVES=10 BUCKETS=0-1023
set -euo pipefail
cd "$(dirname "$0")/.."

ROWS=${ROWS:-400000}
MOVES=${MOVES:-10}
BUCKETS=${BUCKETS:-0-1023}
BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
WORK=${WORK:-/tmp/pgshard-rebalance}
PORTS=(${PG_PORTS:-38432 38433})
ROUTER_PORTS=(${ROUTER_PORTS:-38440 38441})
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
psql_at() { local port=$1; shift; "$BIN/psql" -X -q -At -h 127.0.0.1 -p "$port" -U app "$@"; }

cargo build --release --quiet --bin pgshard --bin shardctl

cleanup() {
  for p in ${ROUTER_PIDS:-} ${BENCH_PIDS:-}; do kill "$p" 2>/dev/null || true; done
  for i in 0 1; do as_pg "$BIN/pg_ctl" -D "$WORK/data$i" -m immediate stop >/dev/null 2>&1 || true; done
}
trap cleanup EXIT
cleanup
rm -rf "$WORK" && mkdir -p "$WORK" && chmod 755 "$WORK"
[ "$(id -u)" = 0 ] && chown postgres "$WORK"

for i in 0 1; do
  as_pg "$BIN/initdb" -D "$WORK/data$i" -A trust -U postgres --no-sync >/dev/null
  as_pg "$BIN/pg_ctl" -D "$WORK/data$i" -l "$WORK/pg$i.log" -w start -o \
    "-p ${PORTS[$i]} -k $WORK -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c max_connections=200 -c max_prepared_transactions=50 -c wal_level=logical" >/dev/null
  "$BIN/psql" -X -q -h 127.0.0.1 -p "${PORTS[$i]}" -U postgres -c "create role app login superuser replication password 'app'" -c "create database app owner app"
done
"$BIN/psql" -X -q -h 127.0.0.1 -p "${PORTS[0]}" -U postgres -c "create database catalog owner app"

for r in 0 1; do
  cat > "$WORK/router$r.toml" <<EOF
[general]
listen = "127.0.0.1:${ROUTER_PORTS[$r]}"
auth_type = "trust"
default_pool_size = 10
admin_users = ["app"]
router_id = "bench$r"
decision_log = "$WORK/decisions$r.log"
[[users]]
name = "app"
password = "app"
[[databases]]
name = "sharded"
server_database = "app"
sharded = true
[[shards]]
primary = "127.0.0.1:${PORTS[0]}"
[[shards]]
primary = "127.0.0.1:${PORTS[1]}"
[catalog]
dsn = "host=127.0.0.1 port=${PORTS[0]} user=app password=app dbname=catalog"
lease = "5s"
poll_interval = "500ms"
[sharding]
unknown_tables = "refuse"
[[sharding.distributions]]
name = "ids"
strategy = "hash"
key_type = "int8"
[[sharding.tables]]
name = "mv_bench"
distribution = "ids"
column = "id"
EOF
done
./target/release/pgshard --config "$WORK/router0.toml" >"$WORK/router0.log" 2>&1 & ROUTER_PIDS="$!"
sleep 1
./target/release/pgshard --config "$WORK/router1.toml" >"$WORK/router1.log" 2>&1 & ROUTER_PIDS="$ROUTER_PIDS $!"
sleep 1

R0=${ROUTER_PORTS[0]}
psql_at "$R0" sharded -c "CREATE TABLE mv_bench (id int8 PRIMARY KEY, v int NOT NULL, pad text NOT NULL)"
seq 1 "$ROWS" | awk '{ printf "%d\t0\t%s\n", $1, "pgshard-rebalance-benchmark-padding-0123456789abcdefghijklmnopqrstuvwxyz" }' \
  | psql_at "$R0" sharded -c "COPY mv_bench (id, v, pad) FROM STDIN"
echo "loaded $ROWS rows through the router"

cat > "$WORK/update.sql" <<EOF
\set id random(1, $ROWS)
UPDATE mv_bench SET v = v + 1 WHERE id = :id;
EOF
BENCH_PIDS=""
for r in 0 1; do
  "$BIN/pgbench" -n -h 127.0.0.1 -p "${ROUTER_PORTS[$r]}" -U app -c 4 -j 2 -T 3600 --max-tries=100 \
    -f "$WORK/update.sql" sharded >"$WORK/pgbench$r.log" 2>&1 & BENCH_PIDS="$BENCH_PIDS $!"
done
sleep 2

: > "$WORK/moves.json"
for m in $(seq 1 "$MOVES"); do
  to=$(( m % 2 ))   # odd moves go to shard 1, even ones come back to shard 0
  ./target/release/shardctl --json --catalog "host=127.0.0.1 port=${PORTS[0]} user=app password=app dbname=catalog" \
    move --config "$WORK/router0.toml" --distribution ids --buckets "$BUCKETS" --to "$to" >>"$WORK/moves.json"
done
# The baseline, under the same writers: a plain COPY pipe between the same servers of as many
# rows as one move carried, into a table with the same primary key.
moved=$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["move"][0]["rows_copied"])' "$WORK/moves.json")
psql_at "${PORTS[1]}" app -c "CREATE TABLE IF NOT EXISTS copy_probe (LIKE mv_bench INCLUDING ALL)" -c "TRUNCATE copy_probe"
start=$(date +%s.%N)
psql_at "${PORTS[0]}" app -c "COPY (SELECT * FROM mv_bench LIMIT $moved) TO STDOUT" | psql_at "${PORTS[1]}" app -c "COPY copy_probe FROM STDIN"
end=$(date +%s.%N)
for p in $BENCH_PIDS; do kill -TERM "$p" 2>/dev/null || true; done
wait $BENCH_PIDS 2>/dev/null || true
BENCH_PIDS=""

# The same two copies with the servers otherwise idle; the move there and back again with one
# copy stream, for the parallel copy's gain measured in the same run.
to=$(( (MOVES + 1) % 2 ))
./target/release/shardctl --json --catalog "host=127.0.0.1 port=${PORTS[0]} user=app password=app dbname=catalog" \
  move --config "$WORK/router0.toml" --distribution ids --buckets "$BUCKETS" --to "$to" >"$WORK/quiet.json"
./target/release/shardctl --json --catalog "host=127.0.0.1 port=${PORTS[0]} user=app password=app dbname=catalog" \
  move --config "$WORK/router0.toml" --copy-streams 1 --distribution ids --buckets "$BUCKETS" --to "$(( 1 - to ))" >"$WORK/quiet1.json"
psql_at "${PORTS[1]}" app -c "TRUNCATE copy_probe"
qstart=$(date +%s.%N)
psql_at "${PORTS[0]}" app -c "COPY (SELECT * FROM mv_bench LIMIT $moved) TO STDOUT" | psql_at "${PORTS[1]}" app -c "COPY copy_probe FROM STDIN"
qend=$(date +%s.%N)

python3 - "$WORK/moves.json" "$start" "$end" "$moved" "$WORK/quiet.json" "$qstart" "$qend" "$WORK/quiet1.json" <<'EOF'
import json, sys
moves = [json.loads(l)["move"][0] for l in open(sys.argv[1]) if l.strip()]
start, end, moved = float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
quiet = json.loads(open(sys.argv[5]).readline())["move"][0]
qplain = moved / (float(sys.argv[7]) - float(sys.argv[6]))
qrate = int(quiet["rows_copied"]) / max(int(quiet["copy_ms"]), 1) * 1000
pauses = sorted(float(m["pause_ms"]) for m in moves)
pct = lambda p: pauses[min(len(pauses) - 1, int(round(p / 100 * (len(pauses) - 1))))]
copy_rate = [int(m["rows_copied"]) / max(int(m["copy_ms"]), 1) * 1000 for m in moves]
plain = moved / (end - start)
applied = sum(int(m["changes_applied"]) for m in moves)
catchup = sum(int(m["catchup_ms"]) for m in moves) / 1000
print(f"moves: {len(moves)} of {moves[0]['rows_copied']} rows each way, 8 pgbench writers through 2 routers")
print(f"write pause ms: p50 {pct(50):.1f}  p99 {pct(99):.1f}  max {pauses[-1]:.1f}  (fence ack p50 {sorted(float(m['fence_ack_ms']) for m in moves)[len(moves)//2]:.1f}, marker p50 {sorted(float(m['marker_ms']) for m in moves)[len(moves)//2]:.1f})")
cr = sorted(copy_rate)[len(copy_rate) // 2]
print(f"copy under the writers: {cr:,.0f} rows/s (median move) vs plain COPY pipe {plain:,.0f} rows/s = {cr / plain:.2f}")
print(f"copy, servers idle: {qrate:,.0f} rows/s vs plain COPY pipe {qplain:,.0f} rows/s = {qrate / qplain:.2f} (pause {quiet['pause_ms']} ms)")
one = json.loads(open(sys.argv[8]).readline())["move"][0]
orate = int(one["rows_copied"]) / max(int(one["copy_ms"]), 1) * 1000
print(f"copy, servers idle, one stream (--copy-streams 1): {orate:,.0f} rows/s = {orate / qplain:.2f} of the pipe; two streams {qrate / orate:.2f}x one")
print(f"catch-up: {applied} changes applied in {catchup:.2f} s of catch-up = {applied / max(catchup, 1e-9):,.0f} changes/s (bounded by the writers)")
busy = sum(float(m["apply_ms"]) for m in moves) / 1000
print(f"apply rate: {applied} changes in {busy:.2f} s of the target applying them = {applied / max(busy, 1e-9):,.0f} changes/s (in batches as small as the writers' pace makes them)")
for m in moves:
    print("  ", {k: m[k] for k in ("move", "source", "target", "rows_copied", "copy_ms", "changes_applied", "catchup_ms", "apply_ms", "pause_ms", "rows_verified")})
EOF
