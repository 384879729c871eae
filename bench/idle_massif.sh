#!/bin/bash
# Heap by allocation site of a server holding N idle connections (valgrind massif), for
# bench/massif_parts.py. Snapshots are taken through vgdb before the connections and once
# they have all settled; loopback only, one fresh server per run.
#
#   bench/idle_massif.sh target/release/tidings sse 1000 /tmp/m/sse     # or ws, long-poll
#   bench/idle_massif.sh target/release/tidings tls:/ws/idle 500 /tmp/m/tls-ws
#   python3 bench/massif_parts.py /tmp/m/sse.idle /tmp/m/sse.before 1000
#
# Plain transports are driven by `tidings bench` (the generator must exist: the same binary
# is used); `tls:PATH` by a Python client over TLS (ALPN http/1.1), as bench/tls_idle.py.
set -eu
BIN=$1 WHAT=$2 N=${3:-1000} OUT=$4
# Free ports unless given, so two people (or a benchmark on 8080) can run at once.
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT=${PORT:-$(free_port)} TLS_PORT=${TLS_PORT:-$(free_port)}
mkdir -p "$(dirname "$OUT")"
TIDINGS_LOG=warn valgrind --tool=massif --vgdb=yes --threshold=0.01 --depth=40 \
  --massif-out-file="$OUT.final" "$BIN" serve --listen 127.0.0.1:$PORT \
  --tls-self-signed --tls-listen 127.0.0.1:$TLS_PORT >"$OUT.log" 2>&1 &
VPID=$!
trap 'kill -TERM $VPID 2>/dev/null; wait $VPID 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do (exec 3<>/dev/tcp/127.0.0.1/$TLS_PORT) 2>/dev/null && break; sleep 1; done
READY="$OUT.ready"
rm -f "$READY"
hold() { # N connections over TLS to PATH, then a marker file, then wait to be killed
  exec python3 - "$1" "$2" "$TLS_PORT" "$READY" <<'PY'
import socket, ssl, sys, time
n, path, port, ready = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.set_alpn_protocols(["http/1.1"])
req = f"GET {path} HTTP/1.1\r\nhost: localhost\r\n"
if path.startswith("/ws"):
    req += ("connection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\n"
            "sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n")
held = []
for _ in range(n):
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost")
    s.sendall((req + "\r\n").encode())
    s.recv(4096)
    held.append(s)
open(ready, "w").write("ready")
time.sleep(600)
PY
}
case "$WHAT" in
  tls:*)
    # One connection first, so state built once (TLS config, the channel) is not counted.
    hold 1 "${WHAT#tls:}" & W=$!
    while [ ! -f "$READY" ]; do sleep 0.5; done
    kill $W; rm -f "$READY"
    vgdb --pid=$VPID detailed_snapshot "$OUT.before" >/dev/null
    hold "$N" "${WHAT#tls:}" & H=$!
    while [ ! -f "$READY" ]; do sleep 0.5; done
    ;;
  *)
    vgdb --pid=$VPID detailed_snapshot "$OUT.before" >/dev/null
    "$BIN" bench --quiet --url http://127.0.0.1:$PORT --transport "$WHAT" -n "$N" -c 1 -p 1 \
      --rate 0 --duration 0 --settle 8 --payload 100 >"$OUT.bench.json" 2>&1 & H=$!
    until [ "$(ss -tn state established "( sport = :$PORT )" | tail -n +2 | wc -l)" -ge "$N" ]; do
      sleep 0.5
    done
    ;;
esac
sleep 2
vgdb --pid=$VPID detailed_snapshot "$OUT.idle" >/dev/null
kill $H 2>/dev/null || true
echo "snapshots: $OUT.before $OUT.idle"
