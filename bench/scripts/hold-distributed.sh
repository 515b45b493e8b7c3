#!/usr/bin/env bash
# Holds more connections than one process can open (RLIMIT_NOFILE 20 000 here) with the
# distributed mode on one machine: SERVERS wse-server processes (each --cores 1) and AGENTS
# `wse-bench agent` processes on loopback, driven by one controller:
#
#   wse-bench hold -n N --url ws://..:P1/wse,..:P2/wse,... --server-pid pid1,pid2,...
#       --agents 127.0.0.1:A1,127.0.0.1:A2,... --source 127.0.0.2-127.0.0.250
#
# The controller splits N by the agents' descriptor budgets, gives each agent its own chunk of
# the source addresses, and reports survivals and RSS per connection for every server.
#
# Environment (defaults in brackets):
#   N [60000]  SERVERS [4]  AGENTS [4]  HOLD_S [30s]  TOPICS_PER_CONN [1]
#   OUT [target/bench-results/hold-distributed-<timestamp>]
#   TARGET     wse or upstream (the upstream peer, ../shared/peers; it stops near 9 995
#              connections per process, so use SERVERS=7 or more for 60 000) [wse]
#   UPSTREAM_PY  the upstream venv's python [/tmp/wse-peers/venv/bin/python]
#   WSE_ARGS   extra wse-server flags [none]
#   SECRET     HS256 secret [upstream's default]
#   BASE_PORT  first WebSocket port; control ports and agent ports follow [6300]
#
# Loopback connections cost two sockets each (both ends are on this machine): 60 000 take
# 120 000 descriptors system-wide (fs.file-max), and 60 000 connections per destination port
# would exhaust the ephemeral ports of one source address, hence the source pool.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"

N=${N:-60000}
SERVERS=${SERVERS:-4}
AGENTS=${AGENTS:-4}
HOLD_S=${HOLD_S:-30s}
TOPICS_PER_CONN=${TOPICS_PER_CONN:-1}
OUT=${OUT:-$ROOT/target/bench-results/hold-distributed-$(date +%Y%m%d-%H%M%S)}
SECRET=${SECRET:-wse-peer-benchmark-secret-not-for-production-0123456789}
BASE_PORT=${BASE_PORT:-6300}
BENCH=$ROOT/target/release/wse-bench
TARGET=${TARGET:-wse}
UPSTREAM_PY=${UPSTREAM_PY:-/tmp/wse-peers/venv/bin/python}
PEERS_DIR=${PEERS_DIR:-$ROOT/../shared/peers}
[[ -d $PEERS_DIR ]] || PEERS_DIR=/work/shared/peers
PIDS=()

log() { echo "[hold-distributed $(date +%H:%M:%S)] $*" >&2; }

cleanup() {
    # Only the processes this script started, by pid.
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 1 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT

wait_listening() {
    local port=$1 pid=$2
    for _ in $(seq 1 150); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
        kill -0 "$pid" 2>/dev/null || { log "process $pid exited; see $OUT"; return 1; }
        sleep 0.1
    done
    log "nothing listening on $port after 15 s"
    return 1
}

mkdir -p "$OUT"
log "building release binaries"
cargo build --release -q -p wse-server -p wse-bench --bins
log "system: $(cat /proc/sys/fs/file-nr) (file-nr), ports $(cat /proc/sys/net/ipv4/ip_local_port_range | tr '\t' -)"

urls=() server_pids=() agents=()
per_server=$(((N + SERVERS - 1) / SERVERS))
for i in $(seq 0 $((SERVERS - 1))); do
    port=$((BASE_PORT + i)) control=$((BASE_PORT + 100 + i))
    if [[ $TARGET == upstream ]]; then
        WSE_JWT_SECRET=$SECRET "$UPSTREAM_PY" "$PEERS_DIR/wse_upstream_server.py" "$port" \
            --idle-timeout 3600 --max-connections 20000 >"$OUT/server-$i.log" 2>&1 &
    else
        # shellcheck disable=SC2086
        "$ROOT/target/release/wse-server" --cores 1 --listen "127.0.0.1:$port" \
            --control-listen "127.0.0.1:$control" --auth-enabled true --auth-secret "$SECRET" \
            --idle-timeout 3600s --max-connections $((per_server + 1000)) ${WSE_ARGS:-} \
            >"$OUT/server-$i.log" 2>&1 &
    fi
    PIDS+=($!) server_pids+=($!)
    wait_listening "$port" $!
    urls+=("ws://127.0.0.1:$port/wse")
done
for i in $(seq 0 $((AGENTS - 1))); do
    port=$((BASE_PORT + 200 + i))
    "$BENCH" agent --listen "127.0.0.1:$port" >"$OUT/agent-$i.log" 2>&1 &
    PIDS+=($!)
    wait_listening "$port" $!
    agents+=("127.0.0.1:$port")
done
join() { local IFS=,; echo "$*"; }
cmd=("$BENCH" hold -n "$N" --topics-per-conn "$TOPICS_PER_CONN" --duration "$HOLD_S"
    --url "$(join "${urls[@]}")" --server-pid "$(join "${server_pids[@]}")"
    --agents "$(join "${agents[@]}")" --source 127.0.0.2-127.0.0.250
    --secret "$SECRET" --target "$TARGET" --json "$OUT/hold.json")
echo "${cmd[*]}" | sed "s/$SECRET/\$SECRET/" >"$OUT/command.txt"
log "running: $(cat "$OUT/command.txt")"
"${cmd[@]}" | tee "$OUT/hold.txt"
log "done; results in $OUT"
