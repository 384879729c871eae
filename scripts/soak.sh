#!/usr/bin/env bash
# Soak (docs/reliability.md, "Soak"): one `tidings serve` at a steady moderate load with churn
# for a fixed time, its resident memory and open file descriptors sampled every 10 s; flat
# means no leak. Run by hand:
#
#   scripts/soak.sh                 # 30 minutes; rewrites the table, the CSV and the plot
#   scripts/soak.sh --minutes 5     # shorter; under 10 minutes it only prints the table
#
# The load, all on 127.0.0.1 (one server with [auth]: a JWT secret and an API key):
# - steady: `tidings bench --verify`, 200 subscribers on every transport (SSE, NDJSON stream,
#   /ws, long poll, short poll every second) over 20 channels, 40 publishes/s, for the whole run;
# - connection churn: back-to-back `bench --verify` rounds of 100 subscribers on every
#   transport, 20 publishes/s on 10 fresh channels, 20 s each: every round's subscribers connect,
#   check their sequence and disconnect, and its channels are left to be reclaimed
#   (`history_ttl = "2m"`);
# - token and subscription churn: scripts/soak_churn.py on the `priv:` namespace (token
#   required): /ws clients that unsubscribe and subscribe every 1–3 s, resuming each channel
#   from its cursor, and SSE clients, all with JWTs of 6–15 s (`tidings token --ttl`) that
#   expire under them; they reconnect with a new token and resume. 10 publishes/s.
# Every subscriber checks its own sequence (offset + 1 within an epoch, a gap notice before any
# jump or new epoch, everything acknowledged reached at the end).
#
# Exits non-zero when any message was lost silently, duplicated or reordered, a subscriber gave
# up, the server died, or the RSS or fd slope over the second half of the run says a leak
# (thresholds below). Everything it starts is killed by pid on exit. TIDINGS_BIN picks the
# binary (default target/release/tidings, built when missing); KEEP=1 keeps the work dir.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

MINUTES=30
while (($#)); do
    case $1 in
    --minutes) MINUTES=${2:?--minutes needs a number}; shift 2 ;;
    *) echo "usage: scripts/soak.sh [--minutes N]" >&2; exit 2 ;;
    esac
done
[[ $MINUTES =~ ^[0-9]+$ ]] && ((MINUTES >= 2)) || { echo "soak: --minutes must be a whole number >= 2" >&2; exit 2; }
DURATION=$((MINUTES * 60))
# Leak thresholds, judged on the least-squares slope over the second half of the run (the first
# half is warm-up: allocator arenas, channel tables and history filling to history_ttl).
# 256 KB/min is 3.75 MB over the second half of a 30-minute run: a leak of ~650 bytes per
# TCP connection (the load opens ~400/min) or of ~60 bytes per publish (~4,100/min)
# is over it, while the wobble at a steady load stays far under it (+11.5 KB/min measured).
# Fds follow the open connections, which churn moves by tens from sample to sample; 2 fds/min
# (30 over 15 minutes) catches a leak of one fd per ~200 connections.
RSS_LIMIT_KB_MIN=${RSS_LIMIT_KB_MIN:-256}
FD_LIMIT_MIN=${FD_LIMIT_MIN:-2}
PY=${TIDINGS_PYTHON:-$ROOT/.venv/bin/python}

BIN=${TIDINGS_BIN:-target/release/tidings}
if [[ ! -x $BIN ]]; then
    echo "soak: building $BIN" >&2
    cargo build --release -p tidings-cli
fi
BIN=$(realpath "$BIN")
for tool in curl python3; do
    command -v "$tool" >/dev/null || { echo "soak: $tool is needed" >&2; exit 2; }
done
"$PY" -c 'import httpx, websockets' 2>/dev/null || { echo "soak: $PY needs httpx and websockets (the repo's .venv)" >&2; exit 2; }

W=$(mktemp -d /tmp/tidings-soak.XXXXXX)
: >"$W/pids"
cleanup() {
    local pid
    while read -r pid; do kill -9 "$pid" 2>/dev/null || true; done <"$W/pids"
    [[ -n ${KEEP:-} ]] || rm -rf "$W"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

PORT=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
URL=http://127.0.0.1:$PORT
API_KEY=$(python3 -c 'import secrets;print(secrets.token_hex(16))')
cat >"$W/tidings.toml" <<EOF
[server]
listen = "127.0.0.1:$PORT"
# One IP makes all of the load; the limit is per client and would throttle the publishers.
client_publish_rate = 0

[auth]
api_keys = ["$API_KEY"]
jwt_secret = "$(python3 -c 'import secrets;print(secrets.token_hex(24))')"

[channels]
history_size = 1000
# Short, so the churn rounds' channels are reclaimed during the run, not after it.
history_ttl = "2m"
subscribe = "anyone"
publish = "anyone"

[namespaces.priv]
subscribe = "token"
publish = "token"
EOF
RUST_LOG=warn "$BIN" serve --config "$W/tidings.toml" >"$W/server.log" 2>&1 &
SERVER=$!
echo $SERVER >>"$W/pids"
for _ in $(seq 300); do curl -sf "$URL/readyz" >/dev/null && break; sleep 0.1; done
curl -sf "$URL/readyz" >/dev/null || { echo "soak: the server did not start" >&2; cat "$W/server.log" >&2; exit 1; }

# ---- RSS and fds every 10 s ----
CSV=$W/samples.csv
echo "unix_s,rss_kb,fds,connections" >"$CSV"
sample() {
    local rss fds conns
    rss=$(awk '/^VmRSS/ {print $2}' "/proc/$SERVER/status" 2>/dev/null) || return 0
    fds=$(ls "/proc/$SERVER/fd" 2>/dev/null | wc -l)
    conns=$(curl -sf -H "Authorization: Bearer $API_KEY" "$URL/metrics" | awk '$1 == "tidings_http_connections" {print $2}')
    echo "$(date +%s),$rss,$fds,${conns:-}" >>"$CSV"
}
(
    while :; do
        sample
        sleep 10
    done
) &
echo $! >>"$W/pids"

echo "soak: $MINUTES minutes against pid $SERVER ($URL); work dir $W" >&2
STATUS=0
# Every load stops LOAD seconds in; the last minute shows the server going idle, and the slopes
# are taken over the second half of the loaded part.
LOAD=$((DURATION - 60))
LOAD_T0=$(date +%s)
SECONDS=0

# ---- steady load for the whole run ----
"$BIN" bench --verify --url "$URL" -n 200 -c 20 --rate 40 --duration "$((LOAD - 5))" \
    --settle 5 --drain 30 --label steady --channel-prefix "steady-$RANDOM" --quiet \
    --json-out "$W/steady.json" >"$W/steady.txt" 2>"$W/steady.log" &
STEADY=$!
echo $STEADY >>"$W/pids"

# ---- token and /ws subscription churn ----
"$PY" scripts/soak_churn.py --url "$URL" --bin "$BIN" --config "$W/tidings.toml" \
    --api-key "$API_KEY" --seconds "$((LOAD - 1))" >"$W/churn.json" 2>"$W/churn.log" &
CHURN=$!
echo $CHURN >>"$W/pids"

# ---- connection churn: back-to-back bench rounds (~22 s each) until the load stops ----
ROUNDS=0
ROUNDS_FAILED=0
while ((SECONDS + 25 < LOAD)); do
    ROUNDS=$((ROUNDS + 1))
    if ! "$BIN" bench --verify --url "$URL" -n 100 -c 10 --rate 20 --duration 20 --settle 1 \
        --drain 10 --label "round-$ROUNDS" --channel-prefix "round-$ROUNDS-$RANDOM" --quiet \
        --json-out "$W/round-$ROUNDS.json" >"$W/round-$ROUNDS.txt" 2>"$W/round-$ROUNDS.log"; then
        ROUNDS_FAILED=$((ROUNDS_FAILED + 1))
        echo "soak: churn round $ROUNDS FAILED:" >&2
        cat "$W/round-$ROUNDS.txt" >&2
        tail -n 3 "$W/round-$ROUNDS.log" >&2
        STATUS=1
    fi
done
wait "$STEADY" || { echo "soak: the steady load FAILED:" >&2; cat "$W/steady.txt" >&2; tail -n 3 "$W/steady.log" >&2; STATUS=1; }
wait "$CHURN" || { echo "soak: the token/subscription churn FAILED:" >&2; cat "$W/churn.json" "$W/churn.log" >&2; STATUS=1; }
while ((SECONDS < DURATION)); do sleep 1; done
sample
kill -0 "$SERVER" 2>/dev/null || { echo "soak: the server died" >&2; STATUS=1; }
if grep -q panicked "$W/server.log"; then echo "soak: the server panicked:" >&2; grep -m3 panicked "$W/server.log" >&2; STATUS=1; fi
CONNS_TOTAL=$(curl -sf -H "Authorization: Bearer $API_KEY" "$URL/metrics" | awk '$1 == "tidings_http_connections_total" {print $2}')

# ---- the numbers, the slope, the plot ----
WRITE=0
((MINUTES >= 10)) && WRITE=1
"$PY" scripts/soak_report.py --dir "$W" --minutes "$MINUTES" --rounds "$ROUNDS" \
    --load-from "$LOAD_T0" --load-until "$((LOAD_T0 + LOAD))" \
    --rounds-failed "$ROUNDS_FAILED" --connections-total "${CONNS_TOTAL:-0}" \
    --rss-limit "$RSS_LIMIT_KB_MIN" --fd-limit "$FD_LIMIT_MIN" --write "$WRITE" || STATUS=1
if ((STATUS)); then
    echo "soak: FAILED (see above; KEEP=1 keeps $W)" >&2
else
    echo "soak: nothing lost silently, no leak by the slope" >&2
fi
exit "$STATUS"
