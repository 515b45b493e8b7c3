#!/usr/bin/env bash
# Runs the wse-server vs upstream comparison suite end to end on this machine:
#
#   1. builds the release binaries (wse-server, wse-bench, the in-process engine example);
#   2. for each repeat, for each target (wse-server, the upstream peer, and with TARGETS naming it
#      wse-py: the same peer launcher on this repository's Python package), for each scenario:
#      starts a fresh server pinned to CPU 0 (`taskset -c 0`), runs wse-bench pinned to CPU 1
#      (`taskset -c 1`) with --server-pid, writes the JSON result, stops the server;
#   3. writes per-scenario medians over the repeats and prints `wse-bench compare` tables
#      (a = upstream, b = wse-server, so ratios read "wse-server / upstream"; with wse-py also
#      wse-py / upstream and wse-py / wse-server).
#
# A median is quoted only over exactly REPEATS complete runs: a run that fails or reports itself
# partial is discarded, and a scenario/target left with fewer runs gets no median; the script
# then exits 1 after the summary, naming what fell short.
#
# A fresh server per run keeps memory figures honest (no leftovers of the previous scenario)
# and makes runs independent. Targets are interleaved within each repeat so slow drift on this
# shared VM hits both alike. Expect about 8-10 minutes with the defaults.
#
# Environment (defaults in brackets):
#   OUT          result directory [target/bench-results/<timestamp>]
#   REPEATS      runs per scenario and target [3]
#   TARGETS      which servers [wse upstream]; `floor` adds the minimal sender (wse-bench floor,
#                its threads pinned to SERVER_CPU) for the fan-out scenarios (latency-1k,
#                latency-10k, fanout, fanout-max), compared as b/a = wse-server / floor;
#                `wse-py` adds upstream's launcher (wse_upstream_server.py, unchanged) on our
#                package (`pip install ./python`, release build, in target/py-pkg-release;
#                WSE_CORES=1 like the binary's --cores 1); `cf` / `cf-pb` run wse-server with
#                Centrifuge clients (wse-bench --protocol centrifuge, JSON / protobuf) for
#                connect-storm, hold and the fan-out scenarios, compared as b/a =
#                Centrifuge / WSE on the same server: TARGETS="wse cf" (the fan-out's publishers
#                stay WSE connections, so both are fed through the same path). With a cf
#                target, wse-server (for wse too, so the flags stay identical) gets
#                --centrifuge-namespaces allowing clients to subscribe to the channels
#                without a namespace
#   SCENARIOS    which scenarios [connect-storm hold latency-1k latency-10k fanout-max ping]
#                (also: fanout, inbound, recovery). latency-1k / latency-10k: fanout at a fixed 50,000
#                deliveries/s to 1,000 / 9,900 subscribers of one topic (50 and 5 publications/s);
#                fanout-max: the highest rate with zero gaps and p99 < 50 ms to FANOUT_SUBS
#                subscribers over FANOUT_TOPICS topics. recovery: REC_SUBS subscribers over 10
#                topics at REC_RATE publications/s for REC_S while REC_CHURN subscribers per
#                second disconnect and reconnect with recover:true (both servers with recovery on).
#   BASE_SERVER  a wse-server binary built from another commit (e.g. the one before a change); the
#                target `base` runs it with exactly wse-server's flags, and the tables read
#                b/a = wse-server (this tree) / base. Example, this tree against commit C:
#                  git worktree add --detach ../wt-base C
#                  (cd ../wt-base && cargo build --release --locked -p wse-server)
#                  TARGETS="base wse" BASE_SERVER=../wt-base/target/release/wse-server \
#                      bench/scripts/compare.sh
#                (wse-bench is this tree's for both, so the load is the same)
#   BUILD        0 skips step 1 (the release binaries must already be built) [1]
#   WSE_SERVER   "binary" (target/release/wse-server) or "engine" (the in-process engine example,
#                for when the binary is not usable yet) [binary]
#   WSE_ARGS     extra wse-server flags, e.g. "--recovery-enabled true" [none]
#   SECRET       HS256 secret shared by servers and load generator [upstream's default]
#   STORM_N HOLD_N HOLD_N_UPSTREAM HOLD_S FANOUT_SUBS FANOUT_TOPICS FANOUT_RATE FANOUT_S PING_N PING_S
#                scenario sizes [5000 19000 9000 10s 1000 1 1000 10s 100 10s]
#                (hold: wse-server holds 19,000 in one process; the upstream peer stops near 9,995)
#   REC_SUBS REC_RATE REC_S REC_CHURN   recovery sizes [1000 200 20s 50]
#   SERVER_CPU BENCH_CPU   cores for taskset [0 1]
#   UPSTREAM_PY  the upstream venv's python [/tmp/wse-peers/venv/bin/python]
#   WSE_PY       the python with our package for wse-py [target/py-pkg-release/bin/python, built]
#   PEERS_DIR    where wse_upstream_server.py lives [<repo>/../shared/peers, else /work/shared/peers]
#
# The upstream peer accepts at most ~9,995 connections per process and has a listen backlog of
# 128: keep STORM_N and HOLD_N under 9,000 for a like-for-like comparison.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"

OUT=${OUT:-$ROOT/target/bench-results/$(date +%Y%m%d-%H%M%S)}
REPEATS=${REPEATS:-3}
TARGETS=${TARGETS:-"wse upstream"}
SCENARIOS=${SCENARIOS:-"connect-storm hold latency-1k latency-10k fanout-max ping"}
WSE_SERVER=${WSE_SERVER:-binary}
SECRET=${SECRET:-wse-peer-benchmark-secret-not-for-production-0123456789}
STORM_N=${STORM_N:-5000}
HOLD_N=${HOLD_N:-19000}
HOLD_N_UPSTREAM=${HOLD_N_UPSTREAM:-9000}
HOLD_S=${HOLD_S:-10s}
FANOUT_SUBS=${FANOUT_SUBS:-1000}
FANOUT_TOPICS=${FANOUT_TOPICS:-1}
FANOUT_RATE=${FANOUT_RATE:-1000}
FANOUT_S=${FANOUT_S:-10s}
PING_N=${PING_N:-100}
PING_S=${PING_S:-10s}
REC_SUBS=${REC_SUBS:-1000}
REC_RATE=${REC_RATE:-200}
REC_S=${REC_S:-20s}
REC_CHURN=${REC_CHURN:-50}
BASE_SERVER=${BASE_SERVER:-}
BUILD=${BUILD:-1}
SERVER_CPU=${SERVER_CPU:-0}
BENCH_CPU=${BENCH_CPU:-1}
UPSTREAM_PY=${UPSTREAM_PY:-/tmp/wse-peers/venv/bin/python}
WSE_PY=${WSE_PY:-}
if [[ -z ${PEERS_DIR:-} ]]; then
    PEERS_DIR=$ROOT/../shared/peers
    [[ -f $PEERS_DIR/wse_upstream_server.py ]] || PEERS_DIR=/work/shared/peers
fi
# Centrifuge clients may subscribe to the benchmark's channels (`bench.0`: no namespace).
CF_NAMESPACES='[{"name":"","allow_subscribe_for_client":true}]'
WS_PORT=${WS_PORT:-5407}
CONTROL_PORT=${CONTROL_PORT:-5408}

BENCH=$ROOT/target/release/wse-bench
SERVER_PID=""
SERVER_LOG=""

log() { echo "[compare $(date +%H:%M:%S)] $*" >&2; }

stop_server() {
    if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=""
}
trap stop_server EXIT

wait_listening() {
    local port=$1
    for _ in $(seq 1 150); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            log "server exited during start-up; log: $SERVER_LOG"
            tail -20 "$SERVER_LOG" >&2 || true
            return 1
        fi
        sleep 0.1
    done
    log "server not listening on $port after 15 s; log: $SERVER_LOG"
    return 1
}

# Starts target $1 pinned to SERVER_CPU; sets SERVER_PID, URL, METRICS_URL.
start_server() {
    local target=$1 tag=$2
    SERVER_LOG=$OUT/logs/$tag.server.log
    METRICS_URL=""
    local -a cf_args=()
    [[ " $TARGETS " == *" cf"* ]] && cf_args=(--centrifuge-namespaces "$CF_NAMESPACES")
    case $target in
        wse | base | cf | cf-pb)
            local bin=$ROOT/target/release/wse-server
            [[ $target == base ]] && bin=$BASE_SERVER
            if [[ $target == wse && $WSE_SERVER == engine ]]; then
                taskset -c "$SERVER_CPU" "$ROOT/target/release/examples/engine" \
                    --port "$WS_PORT" --cores 1 --secret "$SECRET" --metrics-port "$CONTROL_PORT" \
                    >"$SERVER_LOG" 2>&1 &
            else
                taskset -c "$SERVER_CPU" "$bin" \
                    --cores 1 --listen "127.0.0.1:$WS_PORT" --control-listen "127.0.0.1:$CONTROL_PORT" \
                    --auth-enabled true --auth-secret "$SECRET" --idle-timeout 3600s ${WSE_ARGS:-} \
                    ${SCENARIO_WSE_ARGS:-} "${cf_args[@]}" \
                    >"$SERVER_LOG" 2>&1 &
            fi
            METRICS_URL=http://127.0.0.1:$CONTROL_PORT/metrics
            ;;
        upstream | wse-py)
            # The same launcher, unchanged, on upstream's package or on ours.
            local py=$UPSTREAM_PY
            [[ $target == wse-py ]] && py=$WSE_PY
            WSE_CORES=1 WSE_JWT_SECRET=$SECRET taskset -c "$SERVER_CPU" "$py" \
                "$PEERS_DIR/wse_upstream_server.py" "$WS_PORT" --publishers publisher \
                --idle-timeout 3600 --max-connections 20000 ${SCENARIO_UPSTREAM_ARGS:-} \
                >"$SERVER_LOG" 2>&1 &
            ;;
    esac
    SERVER_PID=$!
    URL=ws://127.0.0.1:$WS_PORT/wse
    wait_listening "$WS_PORT"
}

# Whether scenario $1 runs on target $2: the floor has only the fan-out scenarios, the
# Centrifuge targets connect-storm, hold and the fan-out scenarios.
applies() {
    case $2 in
        floor) [[ $1 == latency-1k || $1 == latency-10k || $1 == fanout || $1 == fanout-max ]] ;;
        cf | cf-pb)
            [[ $1 == connect-storm || $1 == hold || $1 == latency-1k || $1 == latency-10k ||
                $1 == fanout || $1 == fanout-max ]]
            ;;
        *) true ;;
    esac
}

# Runs scenario $1 against target $2 (repeat $3).
run_one() {
    local scenario=$1 target=$2 rep=$3
    local tag=$scenario-$target-$rep
    local -a args
    SCENARIO_WSE_ARGS="" SCENARIO_UPSTREAM_ARGS=""
    case $scenario in
        connect-storm) args=(connect-storm -n "$STORM_N") ;;
        hold)
            local n=$HOLD_N
            [[ $target == upstream ]] && n=$HOLD_N_UPSTREAM
            args=(hold -n "$n" --topics-per-conn 1 --duration "$HOLD_S")
            ;;
        latency-1k) args=(fanout --subscribers 1000 --topics 1 --rate 50 --duration "$FANOUT_S") ;;
        latency-10k) args=(fanout --subscribers 9900 --topics 1 --rate 5 --duration "$FANOUT_S") ;;
        fanout)
            args=(fanout --subscribers "$FANOUT_SUBS" --topics "$FANOUT_TOPICS" --rate "$FANOUT_RATE"
                --duration "$FANOUT_S")
            ;;
        fanout-max)
            args=(fanout --subscribers "$FANOUT_SUBS" --topics "$FANOUT_TOPICS" --rate max
                --rate-start 500 --publishers 2 --step-duration 3s --max-steps 8)
            ;;
        ping) args=(ping -n "$PING_N" --duration "$PING_S") ;;
        inbound)
            args=(inbound -n 100 --rate 100 --duration 10s)
            # Only wse-server has /metrics; upstream's processed rate is not observable.
            [[ $target == wse || $target == base ]] && args+=(--metrics-url "http://127.0.0.1:$CONTROL_PORT/metrics")
            ;;
        recovery)
            args=(recovery --subscribers "$REC_SUBS" --topics 10 --rate "$REC_RATE" --duration "$REC_S"
                --churn-batch 10 --churn-rate "$REC_CHURN")
            SCENARIO_WSE_ARGS="--recovery-enabled true" SCENARIO_UPSTREAM_ARGS="--recovery"
            ;;
        *) log "unknown scenario $scenario"; return 1 ;;
    esac
    local -a where
    if [[ $target == floor ]]; then
        # No server: wse-bench's own sender, on the server's CPU.
        args[0]=floor
        where=(--floor-cpu "$SERVER_CPU")
        log "$tag (the floor, in wse-bench)"
    else
        start_server "$target" "$tag"
        log "$tag (server pid $SERVER_PID)"
        # The base and the Centrifuge targets are a wse-server too.
        local dialect=$target
        [[ $target == base || $target == cf || $target == cf-pb ]] && dialect=wse
        where=(--url "$URL" --target "$dialect" --server-pid "$SERVER_PID")
        case $target in
            cf) where+=(--protocol centrifuge) ;;
            cf-pb) where+=(--protocol centrifuge --centrifuge-format protobuf) ;;
        esac
    fi
    # Rotating source addresses avoids TIME_WAIT collisions between back-to-back runs.
    if ! taskset -c "$BENCH_CPU" "$BENCH" "${args[@]}" "${where[@]}" \
        --secret "$SECRET" --source 127.0.0.2-127.0.0.250 \
        --json "$OUT/runs/$tag.json" >"$OUT/logs/$tag.txt" 2>"$OUT/logs/$tag.err"; then
        log "$tag failed; see $OUT/logs/$tag.err (run discarded)"
        rm -f "$OUT/runs/$tag.json"
    elif grep -q '"partial": *true' "$OUT/runs/$tag.json" 2>/dev/null; then
        log "$tag was partial; see $OUT/logs/$tag.err (run discarded)"
        mv "$OUT/runs/$tag.json" "$OUT/logs/$tag.partial.json"
    fi
    stop_server
}

main() {
    local started=$SECONDS
    mkdir -p "$OUT/runs" "$OUT/logs" "$OUT/median"
    if [[ $BUILD != 0 ]]; then
        log "building release binaries"
        cargo build --release -q -p wse-server -p wse-bench --bins --examples
    fi
    if [[ " $TARGETS " == *" base "* && ! -x $BASE_SERVER ]]; then
        log "TARGETS has base: set BASE_SERVER to a wse-server binary"
        exit 2
    fi
    if [[ " $TARGETS " == *" upstream "* && ! -x $UPSTREAM_PY ]]; then
        log "no upstream venv: run $PEERS_DIR/setup_upstream.sh"
        exit 2
    fi
    if [[ " $TARGETS " == *" wse-py "* && -z $WSE_PY ]]; then
        log "building the Python package (release) into target/py-pkg-release"
        WSE_PY=$(WSE_PY_PKG_VENV=$ROOT/target/py-pkg-release WSE_PY_PKG_PROFILE=release \
            "$ROOT/tests/python/package-venv.sh")
    fi
    log "results in $OUT"
    for rep in $(seq 1 "$REPEATS"); do
        for scenario in $SCENARIOS; do
            for target in $TARGETS; do
                applies "$scenario" "$target" || continue
                run_one "$scenario" "$target" "$rep"
            done
        done
    done
    local short=()
    for scenario in $SCENARIOS; do
        for target in $TARGETS; do
            applies "$scenario" "$target" || continue
            local -a runs=()
            for rep in $(seq 1 "$REPEATS"); do
                local f="$OUT/runs/$scenario-$target-$rep.json"
                [[ -f $f ]] && runs+=("$f")
            done
            if ((${#runs[@]} != REPEATS)); then
                short+=("$scenario on $target: ${#runs[@]} of $REPEATS runs complete")
                rm -f "$OUT/median/$scenario-$target.json"
                continue
            fi
            "$BENCH" median -o "$OUT/median/$scenario-$target.json" "${runs[@]}" >/dev/null
        done
        local compared=0
        for pair in "floor wse wse-server / floor" "base wse wse-server / base" \
            "upstream wse wse-server / upstream" "upstream wse-py wse-py / upstream" \
            "wse wse-py wse-py / wse-server" "wse cf centrifuge-json / wse" \
            "wse cf-pb centrifuge-protobuf / wse"; do
            read -r a b label <<<"$pair"
            [[ -f $OUT/median/$scenario-$a.json && -f $OUT/median/$scenario-$b.json ]] || continue
            echo
            echo "### $scenario (median of $REPEATS; b/a = $label)"
            "$BENCH" compare "$OUT/median/$scenario-$a.json" "$OUT/median/$scenario-$b.json"
            compared=1
        done
        if ((!compared)); then
            for target in $TARGETS; do
                [[ -f $OUT/median/$scenario-$target.json ]] || continue
                echo
                echo "### $scenario on $target (median of $REPEATS)"
                "$BENCH" median -o "$OUT/median/$scenario-$target.json" "$OUT"/runs/"$scenario-$target"-*.json
            done
        fi
    done >"$OUT/summary.txt" # not a pipe: `short` must survive the loop
    cat "$OUT/summary.txt"
    log "done in $((SECONDS - started)) s; summary: $OUT/summary.txt"
    if ((${#short[@]})); then
        printf 'NO MEDIAN (fewer runs than REPEATS=%s): %s\n' "$REPEATS" "${short[@]}" \
            | tee -a "$OUT/summary.txt" >&2
        exit 1
    fi
}

main "$@"
