#!/usr/bin/env bash
# Fault injection on loopback (docs/reliability.md): 3 Tidings nodes sharing Redis (a primary
# with AOF, a replica, a Sentinel), subscribers on every transport spread over the nodes
# (`tidings bench --verify`: each checks its own sequence), publishers at a fixed rate through
# every node, hostile clients all along; faults one after another, then overlapping.
#
#   scripts/chaos.sh            # full run: 2,000 subscribers, ~7 minutes, rewrites the table
#                               # in docs/reliability.md
#   scripts/chaos.sh --short    # CI: 300 subscribers, under 3 minutes, prints the table
#
# Exits non-zero when any subscriber lost a message silently, got one twice or out of order,
# or when an acknowledged position later named another message. Everything it starts is
# killed on exit (by pid) and its directory removed. Needs redis-server (sentinel mode is
# `redis-server --sentinel`, no extra package), python3, curl. TIDINGS_BIN picks the binary
# (default target/release/tidings, built when missing).
#
# Why a script and not a `tidings chaos` subcommand: the faults are other processes' lives
# (kill -9, SIGTERM, Redis restarts, a proxy); a shell is the honest tool for that, and the
# product binary stays free of process-management code. The checking is in Rust
# (`bench --verify`), where it can keep up with 2,000 subscribers.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

# ---- internal subcommands, run by the bench's timed events (`--event`) ----
if [[ ${1:-} == _* ]]; then
    : "${CHAOS_DIR:?}"
    W=$CHAOS_DIR
    # shellcheck source=/dev/null
    source "$W/env"
fi

REDIS_NAMES=(ra rb rc)
port_of() { case $1 in ra) echo "$RA_PORT" ;; rb) echo "$RB_PORT" ;; rc) echo "$RC_PORT" ;; esac; }
primary_port() { redis-cli -p "$SENTINEL_PORT" SENTINEL get-master-addr-by-name mymaster | sed -n 2p; }
primary_name() {
    local port n
    port=$(primary_port)
    for n in "${REDIS_NAMES[@]}"; do [[ $(port_of "$n") == "$port" ]] && echo "$n"; done
    return 0
}

proxy() { # proxy COMMAND… → the proxy's control port
    python3 - "$PROXY_CONTROL" "$@" <<'EOF'
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), 2)
s.sendall((" ".join(sys.argv[2:]) + "\n").encode())
s.recv(64)
EOF
}

start_redis() { # start_redis NAME PORT AOF(yes|no) [extra args…]
    local name=$1 port=$2 aof=$3
    shift 3
    mkdir -p "$W/$name"
    redis-server --port "$port" --bind 127.0.0.1 --dir "$W/$name" --save '' \
        --appendonly "$aof" --appendfsync always --logfile "$W/$name/redis.log" \
        --min-replicas-to-write 1 --min-replicas-max-lag 5 \
        --daemonize no "$@" </dev/null >/dev/null 2>&1 &
    echo $! >"$W/$name.pid"
    echo $! >>"$W/pids"
    for _ in $(seq 100); do
        redis-cli -p "$port" PING 2>/dev/null | grep -q PONG && return 0
        sleep 0.05
    done
    echo "chaos: redis $name did not start" >&2
    return 1
}

restart_all() { # restart_all aof|empty: kill -9 every Redis server, start them again at once
    local n p pport
    p=$(primary_name)
    pport=$(port_of "$p")
    for n in "${REDIS_NAMES[@]}"; do kill -9 "$(cat "$W/$n.pid")" 2>/dev/null || true; done
    for n in "${REDIS_NAMES[@]}"; do
        while redis-cli -p "$(port_of "$n")" PING >/dev/null 2>&1; do sleep 0.02; done
    done
    # With its AOF every server comes back with what it acknowledged; "empty" wipes them all,
    # as a Redis without persistence restarts.
    [[ $1 == empty ]] && for n in "${REDIS_NAMES[@]}"; do rm -rf "${W:?}/$n"; done
    local aof=yes
    [[ $1 == empty ]] && aof=no
    start_redis "$p" "$pport" "$aof"
    for n in "${REDIS_NAMES[@]}"; do
        [[ $n == "$p" ]] || start_redis "$n" "$(port_of "$n")" "$aof" --replicaof 127.0.0.1 "$pport"
    done
}

case ${1:-} in
_kill_primary)
    kill -9 "$(cat "$W/$(primary_name).pid")"
    exit 0
    ;;
_restart_all)
    restart_all "$2"
    exit 0
    ;;
_proxy)
    shift
    proxy "$@"
    exit 0
    ;;
_node)
    kill "-$3" "$(cat "$W/node$2.pid")"
    exit 0
    ;;
esac

# ---- settings ----
SHORT=0
OUT=docs/reliability.md
for arg in "$@"; do
    case $arg in
    --short) SHORT=1 ;;
    *) echo "usage: scripts/chaos.sh [--short]" >&2; exit 2 ;;
    esac
done
if ((SHORT)); then
    SUBS=300 CHANNELS=30 RATE=60 PHASE=15 FAULT_AT=3 SETTLE=2 DRAIN=15
    STALLED=100 SLOWLORIS=20 STORM=50
    PHASES=(node_kill node_term primary_kill redis_restart_aof redis_restart_noaof partition overlap)
else
    SUBS=2000 CHANNELS=100 RATE=200 PHASE=30 FAULT_AT=8 SETTLE=6 DRAIN=30
    STALLED=1000 SLOWLORIS=100 STORM=300
    PHASES=(node_kill node_term primary_kill redis_restart_aof redis_restart_noaof latency loss partition overlap)
fi
BIN=${TIDINGS_BIN:-target/release/tidings}
if [[ ! -x $BIN ]]; then
    echo "chaos: building $BIN" >&2
    cargo build --release -p tidings-cli
fi
BIN=$(realpath "$BIN")
for tool in redis-server redis-cli python3 curl; do
    command -v "$tool" >/dev/null || { echo "chaos: $tool is needed" >&2; exit 2; }
done

W=$(mktemp -d /tmp/tidings-chaos.XXXXXX)
export CHAOS_DIR=$W
: >"$W/pids"
cleanup() {
    local pid
    while read -r pid; do kill -9 "$pid" 2>/dev/null || true; done <"$W/pids"
    [[ -n ${KEEP:-} ]] || rm -rf "$W"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
RA_PORT=$(free_port) RB_PORT=$(free_port) RC_PORT=$(free_port) SENTINEL_PORT=$(free_port)
PROXY_PORT=$(free_port) PROXY_CONTROL=$(free_port)
NODE_PORT=("" "$(free_port)" "$(free_port)" "$(free_port)")
cat >"$W/env" <<EOF
RA_PORT=$RA_PORT RB_PORT=$RB_PORT RC_PORT=$RC_PORT SENTINEL_PORT=$SENTINEL_PORT PROXY_CONTROL=$PROXY_CONTROL
EOF
URLS="http://127.0.0.1:${NODE_PORT[1]},http://127.0.0.1:${NODE_PORT[2]},http://127.0.0.1:${NODE_PORT[3]}"

# ---- Redis: primary (AOF, appendfsync always), two replicas, Sentinel ----
# min-replicas-to-write 1: a primary that lost its replicas, or an old primary restarted before
# Sentinel turns it into a replica, refuses writes (Tidings answers 503) instead of
# acknowledging writes the promoted replica will never have (docs/redis.md, "Behind Sentinel").
start_redis ra "$RA_PORT" yes
start_redis rb "$RB_PORT" yes --replicaof 127.0.0.1 "$RA_PORT"
start_redis rc "$RC_PORT" yes --replicaof 127.0.0.1 "$RA_PORT"
mkdir -p "$W/sentinel"
cat >"$W/sentinel/sentinel.conf" <<EOF
sentinel monitor mymaster 127.0.0.1 $RA_PORT 1
sentinel down-after-milliseconds mymaster 1000
sentinel failover-timeout mymaster 5000
EOF
redis-server "$W/sentinel/sentinel.conf" --sentinel --port "$SENTINEL_PORT" --bind 127.0.0.1 \
    --dir "$W/sentinel" --logfile "$W/sentinel/sentinel.log" --daemonize no </dev/null >/dev/null 2>&1 &
echo $! >>"$W/pids"
python3 scripts/chaos_proxy.py "$PROXY_PORT" "$PROXY_CONTROL" --sentinel "127.0.0.1:$SENTINEL_PORT" \
    --master mymaster >"$W/proxy.log" 2>&1 &
echo $! >>"$W/pids"

wait_for() { # wait_for SECONDS WHAT COMMAND…
    local until=$((SECONDS + $1)) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS > until)); then echo "chaos: timed out waiting for $what" >&2; return 1; fi
        sleep 0.1
    done
}
replica_synced() { # every replica linked to the primary, and known to the sentinel
    local p n r
    p=$(primary_name)
    [[ -n $p ]] || return 1
    for n in "${REDIS_NAMES[@]}"; do
        [[ $n == "$p" ]] && continue
        r=$(port_of "$n")
        redis-cli -p "$r" INFO replication | grep -q master_link_status:up || return 1
        redis-cli -p "$SENTINEL_PORT" SENTINEL replicas mymaster | grep -q "^$r\$" || return 1
    done
}
wait_for 30 "the replicas and the sentinel" replica_synced

# ---- nodes 1 and 2 behind Sentinel, node 3 through the proxy ----
start_node() { # start_node N
    local n=$1 url
    if ((n == 3)); then url="redis://127.0.0.1:$PROXY_PORT"; else url="redis+sentinel://127.0.0.1:$SENTINEL_PORT/mymaster"; fi
    cat >"$W/node$n.toml" <<EOF
[server]
listen = "127.0.0.1:${NODE_PORT[$n]}"
drain_grace = "2s"
reconnect_spread = "3s"
write_timeout = "10s"

[broker]
url = "$url"
prefix = "chaos"

[channels]
history_size = 1000
EOF
    RUST_LOG=warn "$BIN" serve --config "$W/node$n.toml" >>"$W/node$n.log" 2>&1 &
    echo $! >"$W/node$n.pid"
    echo $! >>"$W/pids"
}
node_ready() { curl -sf "http://127.0.0.1:${NODE_PORT[$1]}/readyz"; }
for n in 1 2 3; do start_node "$n"; done
for n in 1 2 3; do wait_for 30 "node $n" node_ready "$n"; done

# ---- between phases: everything back up and healthy ----
heal() {
    proxy heal
    local p n pport
    wait_for 30 "a primary" primary_name
    p=$(primary_name)
    pport=$(port_of "$p")
    for n in "${REDIS_NAMES[@]}"; do
        [[ $n == "$p" ]] && continue
        if ! redis-cli -p "$(port_of "$n")" PING >/dev/null 2>&1; then
            start_redis "$n" "$(port_of "$n")" yes --replicaof 127.0.0.1 "$pport"
        fi
    done
    # Servers restarted without their AOF get it back for the next phases.
    for n in "${REDIS_NAMES[@]}"; do redis-cli -p "$(port_of "$n")" CONFIG SET appendonly yes >/dev/null; done
    wait_for 60 "the replicas and the sentinel" replica_synced
    for n in 1 2 3; do
        if ! kill -0 "$(cat "$W/node$n.pid")" 2>/dev/null; then start_node "$n"; fi
    done
    for n in 1 2 3; do wait_for 60 "node $n" node_ready "$n"; done
}

# ---- RSS of every node, every second, tagged with the phase ----
echo setup >"$W/phase"
(
    while :; do
        ph=$(cat "$W/phase")
        for n in 1 2 3; do
            pid=$(cat "$W/node$n.pid" 2>/dev/null) || continue
            rss=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null) || continue
            [[ -n $rss ]] && echo "$ph node$n $rss"
        done
        sleep 1
    done
) >"$W/rss.log" 2>/dev/null &
echo $! >>"$W/pids"

# ---- hostile clients for the whole run ----
TOTAL=$(((PHASE + SETTLE + 15) * ${#PHASES[@]} + 30))
python3 scripts/chaos_hostile.py --duration "$TOTAL" --stalled "$STALLED" --slowloris "$SLOWLORIS" \
    --storm "$STORM" ${URLS//,/ } >"$W/hostile.json" 2>"$W/hostile.log" &
HOSTILE=$!
echo $HOSTILE >>"$W/pids"

# ---- the faults ----
SELF=$ROOT/scripts/chaos.sh
# Network faults last 10 s: longer than a node needs to notice a silent Redis (PING every
# 5 s, 3 s to answer).
END=$((FAULT_AT + 10))
events_for() {
    case $1 in
    node_kill) echo "$FAULT_AT:$SELF _node 1 9" ;;
    node_term) echo "$FAULT_AT:$SELF _node 2 TERM" ;;
    primary_kill) echo "$FAULT_AT:$SELF _kill_primary" ;;
    redis_restart_aof) echo "$FAULT_AT:$SELF _restart_all aof" ;;
    redis_restart_noaof) echo "$FAULT_AT:$SELF _restart_all empty" ;;
    latency) echo "$FAULT_AT:$SELF _proxy delay 200"; echo "$END:$SELF _proxy heal" ;;
    loss) echo "$FAULT_AT:$SELF _proxy loss 20"; echo "$END:$SELF _proxy heal" ;;
    partition) echo "$FAULT_AT:$SELF _proxy partition"; echo "$END:$SELF _proxy heal" ;;
    overlap)
        echo "$FAULT_AT:$SELF _node 1 9 & $SELF _kill_primary & $SELF _proxy partition; wait"
        echo "$END:$SELF _proxy heal"
        ;;
    esac
}
describe() {
    case $1 in
    node_kill) echo "kill -9 of node 1" ;;
    node_term) echo "SIGTERM of node 2 (drain)" ;;
    primary_kill) echo "kill -9 of the Redis primary (Sentinel failover)" ;;
    redis_restart_aof) echo "every Redis server killed and restarted with its AOF" ;;
    redis_restart_noaof) echo "every Redis server killed and restarted without data (gaps expected)" ;;
    latency) echo "200 ms latency between node 3 and Redis" ;;
    loss) echo "20 % of segments held 200 ms (retransmits) between node 3 and Redis" ;;
    partition) echo "partition between node 3 and Redis" ;;
    overlap) echo "all at once: kill -9 node 1 + kill -9 primary + partition node 3" ;;
    esac
}

STATUS=0
for phase in "${PHASES[@]}"; do
    echo "$phase" >"$W/phase"
    echo "chaos: $phase — $(describe "$phase")" >&2
    mapfile -t events < <(events_for "$phase")
    args=()
    for e in "${events[@]}"; do args+=(--event "$e"); done
    if ! "$BIN" bench --verify --url "$URLS" -n "$SUBS" -c "$CHANNELS" --rate "$RATE" \
        --duration "$PHASE" --settle "$SETTLE" --drain "$DRAIN" --label "$phase" \
        --channel-prefix "$phase-$RANDOM" --json-out "$W/$phase.json" "${args[@]}" \
        >"$W/$phase.txt" 2>"$W/$phase.log"; then
        echo "chaos: $phase FAILED" >&2
        tail -n 3 "$W/$phase.log" >&2
        STATUS=1
    fi
    cat "$W/$phase.txt"
    echo "heal" >"$W/phase"
    heal
done
kill "$HOSTILE" 2>/dev/null || true
wait "$HOSTILE" 2>/dev/null || true

# ---- the table ----
MODE=$([[ $SHORT == 1 ]] && echo short || echo full)
python3 - "$W" "$MODE" "$SUBS" "$RATE" "$PHASE" "$OUT" "${PHASES[@]}" <<'EOF' || STATUS=1
import json, sys, re, os, collections
w, mode, subs, rate, phase_s, out = sys.argv[1:7]
phases = sys.argv[7:]
rss = collections.defaultdict(dict)
for line in open(os.path.join(w, "rss.log")):
    parts = line.split()
    if len(parts) == 3 and parts[2].isdigit():
        ph, node, kb = parts
        rss[ph][node] = max(rss[ph].get(node, 0), int(kb))
lines = []
lines.append(f"Mode `{mode}`: {subs} subscribers over sse, stream, ws, long-poll and poll, "
             f"{rate} publishes/s through 3 nodes, {phase_s} s per fault, hostile clients all along.\n")
lines.append("| fault | load held (subscribers, deliveries/s) | lost silently | duplicates | reordered | gap notices | reconnects | recovered p50 / max (s) | publishes acked / refused (503) / unknown | acked and lost | RSS peak node 1 / 2 / 3 (MB) |")
lines.append("|---|---|---:|---:|---:|---:|---:|---|---|---:|---|")
for ph in phases:
    try:
        r = json.load(open(os.path.join(w, ph + ".json")))
    except OSError:
        lines.append(f"| {ph} | (no result: see the run's log) | | | | | | | | | |")
        continue
    t = r["total"]
    lost = t["lost_silently"] + t["silent_epoch_changes"] + t["missing_at_end"]
    mb = " / ".join(f'{rss[ph].get(f"node{n}", 0) / 1024:.0f}' for n in (1, 2, 3))
    rec = f'{t["recover_p50_s"]:.1f} / {t["recover_max_s"]:.1f}'
    if t["not_recovered"]:
        rec += f' ({t["not_recovered"]} not)'
    lines.append(
        f'| {ph} | {t["subscribers"] - t["fatal"]}, {r["deliveries_per_s"]:.0f}/s | {lost} | {t["duplicates"]} | '
        f'{t["reordered"]} | {t["gap_notices"]} | {t["reconnects"]} | {rec} | '
        f'{r["published_acked"]} / {r["published_refused"]} / {r["published_outcome_unknown"]} | '
        f'{r["offset_reused"]} | {mb} |')
try:
    hostile = open(os.path.join(w, "hostile.json")).read().strip()
except OSError:
    hostile = ""
if hostile:
    lines.append("\nHostile clients (counts over the whole run): `" + hostile + "`")
table = "\n".join(lines)
print(table)
if mode == "full" and os.path.exists(out):
    doc = open(out).read()
    new = re.sub(r"(<!-- chaos:begin -->\n).*?(<!-- chaos:end -->)",
                 lambda m: m.group(1) + table + "\n" + m.group(2), doc, flags=re.S)
    open(out, "w").write(new)
    print(f"(written to {out})")
EOF
if ((STATUS)); then
    echo "chaos: FAILED: a guarantee was broken (see above; KEEP=1 keeps $W)" >&2
else
    echo "chaos: no message lost silently, duplicated or reordered" >&2
fi
exit "$STATUS"
