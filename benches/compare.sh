#!/usr/bin/env bash
# Side-by-side: direct PostgreSQL vs pgshard vs PgBouncer (transaction mode, same pool size),
# alternating in one run so the machine's noise hits all three alike.
#
# For each workload it reports TPS, the ratio to direct, and the pooler's CPU per transaction
# (utime+stime from /proc/PID/stat over the run / transactions). Then RSS per idle client with
# IDLE_CLIENTS idle connections.
#
#   bash benches/compare.sh            # DURATION=15 ROUNDS=3 IDLE_CLIENTS=10000 POOL=20
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-15}
ROUNDS=${ROUNDS:-3}
IDLE_CLIENTS=${IDLE_CLIENTS:-10000}
POOL=${POOL:-20}
SCALE=${SCALE:-10}
BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
WORK=${WORK:-/tmp/pgshard-bench}
PG_PORT=${PG_PORT:-35432}
SHARD_PORT=${SHARD_PORT:-36432}
BOUNCER_PORT=${BOUNCER_PORT:-36433}
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

command -v pgbouncer >/dev/null || { echo "install pgbouncer (apt-get install -y pgbouncer)"; exit 1; }
cargo build --release --quiet --bin pgshard

cleanup() {
  [ -n "${SHARD_PID:-}" ] && kill "$SHARD_PID" 2>/dev/null || true
  [ -f "$WORK/pgb.pid" ] && kill "$(cat "$WORK/pgb.pid")" 2>/dev/null || true
  as_pg "$BIN/pg_ctl" -D "$WORK/data" -m immediate stop >/dev/null 2>&1 || true
}
trap cleanup EXIT
cleanup
rm -rf "$WORK" && mkdir -p "$WORK" && chmod 755 "$WORK"
[ "$(id -u)" = 0 ] && chown postgres "$WORK"
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

as_pg "$BIN/initdb" -D "$WORK/data" -A trust -U postgres --no-sync >/dev/null
as_pg "$BIN/pg_ctl" -D "$WORK/data" -l "$WORK/pg.log" -w start -o \
  "-p $PG_PORT -k $WORK -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c max_connections=300 -c shared_buffers=256MB" >/dev/null
psql() { "$BIN/psql" -X -q -h 127.0.0.1 -p "$PG_PORT" -U postgres "$@"; }
psql -c "create role app login superuser password 'app'"
psql -c "create database app owner app"
PGPASSWORD=app "$BIN/pgbench" -q -i -s "$SCALE" -h 127.0.0.1 -p "$PG_PORT" -U app app >/dev/null 2>&1

cat > "$WORK/pgshard.toml" <<EOF
[general]
listen = "127.0.0.1:$SHARD_PORT"
auth_type = "trust"
default_pool_size = $POOL
max_client_conn = $((IDLE_CLIENTS + 100))
[[users]]
name = "app"
password = "app"
[[databases]]
name = "app"
[[shards]]
primary = "127.0.0.1:$PG_PORT"
EOF
RUST_LOG=warn ./target/release/pgshard --config "$WORK/pgshard.toml" >"$WORK/pgshard.log" 2>&1 &
SHARD_PID=$!

cat > "$WORK/pgbouncer.ini" <<EOF
[databases]
app = host=127.0.0.1 port=$PG_PORT dbname=app
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BOUNCER_PORT
unix_socket_dir =
auth_type = trust
auth_file = $WORK/users.txt
pool_mode = transaction
default_pool_size = $POOL
max_client_conn = $((IDLE_CLIENTS + 100))
logfile = $WORK/pgb.log
pidfile = $WORK/pgb.pid
EOF
echo '"app" "app"' > "$WORK/users.txt"
[ "$(id -u)" = 0 ] && chown postgres "$WORK"/*
as_pg bash -c "ulimit -n 65536 2>/dev/null || ulimit -n \$(ulimit -Hn); pgbouncer -d $WORK/pgbouncer.ini"
sleep 1
BOUNCER_PID=$(cat "$WORK/pgb.pid")

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
declare -A TPS CPU
WORKLOADS=("select-simple:-S -c 50 -j 2 -M simple" "select-extended:-S -c 50 -j 2 -M extended" "select-prepared:-S -c 50 -j 2 -M prepared" "tpcb:-c 20 -j 2 -M simple")
TARGETS=("direct:$PG_PORT:" "pgshard:$SHARD_PORT:$SHARD_PID" "pgbouncer:$BOUNCER_PORT:$BOUNCER_PID")
HZ=$(getconf CLK_TCK)

for round in $(seq "$ROUNDS"); do
  for w in "${WORKLOADS[@]}"; do
    name=${w%%:*}; args=${w#*:}
    for t in "${TARGETS[@]}"; do
      IFS=: read -r tname port pid <<<"$t"
      c0=0; [ -n "$pid" ] && c0=$(cpu_ticks "$pid")
      # shellcheck disable=SC2086
      out=$(PGPASSWORD=app "$BIN/pgbench" -n -h 127.0.0.1 -p "$port" -U app -T "$DURATION" $args app 2>&1 || true)
      c1=0; [ -n "$pid" ] && c1=$(cpu_ticks "$pid")
      tx=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<<"$out")
      tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<<"$out")
      if [ -z "$tps" ] || [ -z "$tx" ] || [ "$tx" = 0 ] || grep -q "aborted" <<<"$out"; then
        TPS[$name,$tname,$round]=fail; CPU[$name,$tname,$round]=fail
      else
        TPS[$name,$tname,$round]=$tps
        CPU[$name,$tname,$round]=$(awk -v d=$((c1 - c0)) -v tx="$tx" -v hz="$HZ" 'BEGIN{printf "%.1f", d * 1e6 / hz / tx}')
      fi
      echo "round $round $name $tname tps=${TPS[$name,$tname,$round]} cpu_us_per_tx=${CPU[$name,$tname,$round]}" >&2
    done
  done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END{if (NR==0) print "fail"; else print a[int((NR+1)/2)]}'; }
collect() { local name=$1 t=$2 kind=$3 vals=""; for r in $(seq "$ROUNDS"); do if [ "$kind" = tps ]; then v=${TPS[$name,$t,$r]}; else v=${CPU[$name,$t,$r]}; fi; [ "$v" = fail ] && { echo fail; return; }; vals="$vals $v"; done; echo "$vals" | median; }

echo
echo "| workload | direct tps | pgshard tps (ratio) | pgshard CPU µs/tx | PgBouncer tps (ratio) | PgBouncer CPU µs/tx |"
echo "|---|---|---|---|---|---|"
for w in "${WORKLOADS[@]}"; do
  name=${w%%:*}
  d=$(collect "$name" direct tps)
  line="| $name | $d"
  for t in pgshard pgbouncer; do
    tp=$(collect "$name" $t tps); c=$(collect "$name" $t cpu)
    if [ "$tp" = fail ]; then line="$line | fails | –"; else
      line="$line | $tp ($(awk -v a="$tp" -v b="$d" 'BEGIN{printf "%.2f", a / b}')) | $c"; fi
  done
  echo "$line |"
done

# Idle clients: RSS growth per connection after IDLE_CLIENTS logged-in, idle clients.
idle_rss() {
  local port=$1 pid=$2
  local before after
  before=$(awk '/VmRSS/{print $2}' "/proc/$pid/status")
  python3 benches/idle_clients.py 127.0.0.1 "$port" app app "$IDLE_CLIENTS" "$pid" "$before"
}
echo
echo "| pooler | idle clients | RSS growth per idle client |"
echo "|---|---|---|"
echo "| pgshard | $IDLE_CLIENTS | $(idle_rss "$SHARD_PORT" "$SHARD_PID") |"
echo "| PgBouncer | $IDLE_CLIENTS | $(idle_rss "$BOUNCER_PORT" "$BOUNCER_PID") |"
