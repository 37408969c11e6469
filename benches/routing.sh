#!/usr/bin/env bash
# Routing cost: key-routed `pgbench -S` over 2 shards through a sharded database, against the
# pooling-only path (same router, a non-sharded database on one server), alternating in one run.
# Reports TPS and pgshard's CPU µs per transaction for each, their ratio, and the plan cache's
# hit rate (SHOW PLAN_CACHE). The cost of one cache miss is in `cargo bench --bench hot_path`
# (route_analyze_miss_*).
#
# With ALLOCS=1 (root, perf installed) one more short run per database counts pgshard's malloc
# and realloc calls per transaction with a uprobe on libc's malloc (slow while it runs: not timed).
#
#   bash benches/routing.sh            # DURATION=10 ROUNDS=3 CLIENTS=20 SCALE=5 MODES="simple prepared"
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
CLIENTS=${CLIENTS:-20}
SCALE=${SCALE:-5}
MODES=${MODES:-simple prepared}
BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
WORK=${WORK:-/tmp/pgshard-routing}
PORTS=(${PG_PORTS:-37432 37433})
ROUTER_PORT=${ROUTER_PORT:-37440}
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

cargo build --release --quiet --bin pgshard

cleanup() {
  [ -n "${ROUTER_PID:-}" ] && kill "$ROUTER_PID" 2>/dev/null || true
  for i in 0 1; do as_pg "$BIN/pg_ctl" -D "$WORK/data$i" -m immediate stop >/dev/null 2>&1 || true; done
}
trap cleanup EXIT
cleanup
rm -rf "$WORK" && mkdir -p "$WORK" && chmod 755 "$WORK"
[ "$(id -u)" = 0 ] && chown postgres "$WORK"

for i in 0 1; do
  as_pg "$BIN/initdb" -D "$WORK/data$i" -A trust -U postgres --no-sync >/dev/null
  as_pg "$BIN/pg_ctl" -D "$WORK/data$i" -l "$WORK/pg$i.log" -w start -o \
    "-p ${PORTS[$i]} -k $WORK -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c max_connections=200 -c max_prepared_transactions=50" >/dev/null
  "$BIN/psql" -X -q -h 127.0.0.1 -p "${PORTS[$i]}" -U postgres -c "create role app login superuser password 'app'" -c "create database app owner app"
done
# The pooling-only database: whole on shard 0, initialised directly.
"$BIN/psql" -X -q -h 127.0.0.1 -p "${PORTS[0]}" -U postgres -c "create database pooled_data owner app"
"$BIN/pgbench" -q -i -s "$SCALE" -h 127.0.0.1 -p "${PORTS[0]}" -U app pooled_data >/dev/null 2>&1

cat > "$WORK/pgshard.toml" <<EOF
[general]
listen = "127.0.0.1:$ROUTER_PORT"
auth_type = "trust"
default_pool_size = $CLIENTS
admin_users = ["app"]
decision_log = "$WORK/decisions.log"
[[users]]
name = "app"
password = "app"
[[databases]]
name = "pooled"
server_database = "pooled_data"
[[databases]]
name = "sharded"
server_database = "app"
sharded = true
[sharding]
[[sharding.distributions]]
name = "ids"
strategy = "hash"
key_type = "int8"
[[sharding.tables]]
name = "pgbench_accounts"
distribution = "ids"
column = "aid"
[[sharding.tables]]
name = "pgbench_branches"
distribution = "ids"
column = "bid"
[[sharding.tables]]
name = "pgbench_tellers"
distribution = "ids"
column = "tid"
[[sharding.tables]]
name = "pgbench_history"
distribution = "ids"
column = "aid"
[[shards]]
primary = "127.0.0.1:${PORTS[0]}"
[[shards]]
primary = "127.0.0.1:${PORTS[1]}"
EOF
RUST_LOG=warn target/release/pgshard --config "$WORK/pgshard.toml" >"$WORK/pgshard.log" 2>&1 &
ROUTER_PID=$!
for _ in $(seq 50); do "$BIN/pg_isready" -q -h 127.0.0.1 -p "$ROUTER_PORT" && break; sleep 0.1; done

pgb() { "$BIN/pgbench" -h 127.0.0.1 -p "$ROUTER_PORT" -U app "$@"; }
# The sharded database is initialised through pgshard: rows split over both shards.
pgb -q -i -s "$SCALE" sharded >/dev/null

cpu_ticks() { awk '{print $14 + $15}' "/proc/$ROUTER_PID/stat"; }
HZ=$(getconf CLK_TCK)
run() { # db mode -> "tps us_per_tx"
  local before after out tps tx
  before=$(cpu_ticks)
  out=$(pgb -n -S -M "$2" -c "$CLIENTS" -j 2 -T "$DURATION" "$1" 2>&1)
  after=$(cpu_ticks)
  tps=$(echo "$out" | awk '/^tps/ {print $3; exit}')
  tx=$(echo "$out" | awk -F': ' '/actually processed/ {split($2, a, "/"); print a[1]}')
  echo "$tps $(awk -v t=$((after - before)) -v hz="$HZ" -v n="$tx" 'BEGIN { printf "%.1f", t / hz * 1e6 / n }')"
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

echo "| mode | pooled tps | pooled CPU µs/tx | sharded (2 shards) tps | sharded CPU µs/tx | CPU ratio |"
echo "|---|---|---|---|---|---|"
for mode in $MODES; do
  : >"$WORK/p"; : >"$WORK/s"
  for _ in $(seq "$ROUNDS"); do
    run pooled "$mode" >>"$WORK/p"
    run sharded "$mode" >>"$WORK/s"
  done
  pt=$(cut -d' ' -f1 "$WORK/p" | median); pc=$(cut -d' ' -f2 "$WORK/p" | median)
  st=$(cut -d' ' -f1 "$WORK/s" | median); sc=$(cut -d' ' -f2 "$WORK/s" | median)
  echo "| $mode | $pt | $pc | $st | $sc | $(awk -v a="$sc" -v b="$pc" 'BEGIN { printf "%.2f", a / b }') |"
done
if [ "${ALLOCS:-0}" = 1 ]; then
  LIBC=$(ldd target/release/pgshard | awk '/libc.so/ {print $3}')
  perf probe -q -x "$LIBC" malloc 2>/dev/null || true
  perf probe -q -x "$LIBC" realloc 2>/dev/null || true
  allocs() { # db mode -> "mallocs reallocs" per transaction
    local out
    out=$(perf stat -x, -e probe_libc:malloc -e probe_libc:realloc -p "$ROUTER_PID" -- \
      "$BIN/pgbench" -h 127.0.0.1 -p "$ROUTER_PORT" -U app -n -S -M "$2" -c "$CLIENTS" -j 2 -T 3 "$1" 2>&1)
    awk -F, -v tx="$(echo "$out" | awk -F': ' '/actually processed/ {split($2, a, "/"); print a[1]}')" \
      '/probe_libc:malloc/ {m = $1} /probe_libc:realloc/ {r = $1} END {printf "%.1f | %.1f", m / tx, r / tx}' <<<"$out"
  }
  echo
  echo "| mode | pooled mallocs/tx | pooled reallocs/tx | sharded mallocs/tx | sharded reallocs/tx |"
  echo "|---|---|---|---|---|"
  for mode in $MODES; do
    echo "| $mode | $(allocs pooled "$mode") | $(allocs sharded "$mode") |"
  done
fi
echo
echo "plan cache:"
"$BIN/psql" -X -h 127.0.0.1 -p "$ROUTER_PORT" -U app -d pgshard -c "SHOW PLAN_CACHE"
