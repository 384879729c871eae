#!/usr/bin/env bash
# RFC 6455 conformance: the Autobahn|Testsuite fuzzingclient against raw WebSocket mode.
#
# usage: scripts/autobahn.sh [--full] [--outdir DIR]
#   (default)  every case but the permessage-deflate groups 12 and 13: 301 cases, ~20 s
#   --full     all 517 cases. Tidings does not negotiate permessage-deflate, so the 216 cases of
#              12.* and 13.* end at once as UNIMPLEMENTED and count as skipped, not failed
#              (~20 s too; it would be 7-13 minutes with compression)
#   --outdir   report folder (default target/autobahn-report); wiped first
# env: TIDINGS_BIN   a tidings binary to test instead of building target/release/tidings
#      AB_HOME       where wstest is installed (default ~/.cache/conformance/autobahn)
#
# Builds the release binary (cargo's own freshness check makes that a no-op when it is up to
# date) and starts `tidings serve` on a free loopback port with the size limits raised (the
# suite's largest message is 16 MiB) and the per-connection publish rate lifted. Points the
# fuzzingclient at ws://ADDR/ws/autobahn: each case is a fresh connection and the only client
# of the channel, so raw mode is an echo server. Stops the server and exits with the runner's
# status: 0 = every case passed, 1 = some failed, 3 = wstest itself failed (or the server
# died). Installs wstest with the shared install-autobahn.sh when it is missing (~30 s, once
# per machine). Results and exceptions: docs/conformance.md.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
SHARED=${TIDINGS_SHARED_DIR:-$ROOT/../shared}
# A git worktree lives elsewhere than its main checkout, whose sibling the shared tools are.
if [[ -z ${TIDINGS_SHARED_DIR:-} && ! -d $SHARED ]]; then
    COMMON=$(git -C "$ROOT" rev-parse --path-format=absolute --git-common-dir 2>/dev/null || true)
    [[ -n $COMMON ]] && SHARED=$(dirname "$COMMON")/../shared
fi
TOOLS=$SHARED/tools/autobahn
export AB_HOME=${AB_HOME:-$HOME/.cache/conformance/autobahn}

log() { printf 'autobahn.sh: %s\n' "$*" >&2; }

FULL=0
OUTDIR=$ROOT/target/autobahn-report
while (($#)); do
    case "$1" in
        --full) FULL=1; shift ;;
        --outdir) OUTDIR=$2; shift 2 ;;
        -h | --help) sed -n '2,20p' "$0"; exit 0 ;;
        *) log "unknown argument: $1 (usage: scripts/autobahn.sh [--full] [--outdir DIR])"; exit 2 ;;
    esac
done

[[ -x $TOOLS/run-autobahn.sh ]] || { log "no $TOOLS/run-autobahn.sh (the shared folder belongs beside the repo)"; exit 2; }

# --- wstest ------------------------------------------------------------------
if ! [[ -x $AB_HOME/bin/wstest ]]; then
    log "installing Autobahn|Testsuite into $AB_HOME"
    "$TOOLS/install-autobahn.sh"
fi

# --- the server --------------------------------------------------------------
if [[ -n ${TIDINGS_BIN:-} ]]; then
    BIN=$TIDINGS_BIN
else
    log "cargo build --release"
    cargo build --release --quiet -p tidings-cli
    BIN=$ROOT/target/release/tidings
fi
[[ -x $BIN ]] || { log "no tidings binary at $BIN"; exit 2; }

mkdir -p "$(dirname "$OUTDIR")"
SERVER_LOG=$(mktemp "${TMPDIR:-/tmp}/tidings-autobahn.XXXXXX")
SERVER_PID=
stop_server() {
    if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        # Graceful shutdown is bounded by the server; do not wait forever regardless.
        for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=
}
trap 'stop_server; rm -f "$SERVER_LOG"' EXIT

# 64 MiB is the config's ceiling for a message; the suite's largest is 16 MiB. The queue must
# hold a few of those, as the server echoes them while the client is still sending.
export TIDINGS_SERVER__MAX_MESSAGE_BYTES=67108864
export TIDINGS_SERVER__QUEUE_MAX_BYTES=268435456
# Groups 9.7 and 9.8 send 1000 messages back to back on one connection: lift the
# per-connection publish rate (0 = unlimited), where this build has that key (the config
# refuses keys it does not know).
if "$BIN" config default 2>/dev/null | grep -q '^client_publish_rate'; then
    export TIDINGS_SERVER__CLIENT_PUBLISH_RATE=0
fi
TIDINGS_LOG=${TIDINGS_LOG:-warn} "$BIN" serve --listen 127.0.0.1:0 2>"$SERVER_LOG" &
SERVER_PID=$!

ADDR=
for _ in $(seq 200); do  # up to 20 s
    ADDR=$(sed -n 's#^tidings listening on http://\([^[:space:]]*\).*#\1#p' "$SERVER_LOG" | head -n1)
    [[ -n $ADDR ]] && break
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.1
done
if [[ -z $ADDR ]]; then
    log "the server did not start; its log:"
    cat "$SERVER_LOG" >&2
    exit 3
fi
log "server $BIN on $ADDR (pid $SERVER_PID)"

# --- the suite -----------------------------------------------------------------
ARGS=(--agent tidings --outdir "$OUTDIR")
if ((FULL)); then
    ARGS+=(--allow-unimplemented --timeout 1800)
else
    ARGS+=(--exclude '12.*,13.*' --timeout 600)
fi
status=0
"$TOOLS/run-autobahn.sh" "${ARGS[@]}" "ws://$ADDR/ws/autobahn" || status=$?

if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    log "the server died during the run; its log:"
    cat "$SERVER_LOG" >&2
    ((status)) || status=3
fi
stop_server
cp "$SERVER_LOG" "$OUTDIR/server.log" 2>/dev/null || true
log "report: $OUTDIR/index.html (exit $status)"
exit "$status"
