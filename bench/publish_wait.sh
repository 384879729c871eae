#!/bin/bash
# Where a long-poll publish waits at saturation: traces the server's and the generator's
# send/recv/epoll_wait syscalls for 1 s in the middle of a long-poll-1k run and prints, per
# publish, how long its request waited before the server read it (and how many of the
# server's syscalls came first), and how long the server took from that read to the answer.
#   flock /work/wt/bench.lock bench/publish_wait.sh SERVER_BINARY NAME RATE
#   flock /work/wt/bench.lock bench/publish_wait.sh /tmp/base-tidings base 40
# perf's tracepoints cost the server some CPU: compare builds with it, not rates without it.
set -euo pipefail
BIN=$1; NAME=$2; RATE=$3
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH=${TIDINGS_BENCH_BIN:-$ROOT/target/release/tidings}
OUT=${OUT:-/tmp/tidings-bench/publish-wait}
PORT=${PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
mkdir -p "$OUT"
TIDINGS_LOG=warn taskset -c 0 "$BIN" serve --listen 127.0.0.1:$PORT > "$OUT/$NAME.log" 2>&1 &
SP=$!
trap 'kill $SP 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break
    sleep 0.1
done
taskset -c 1 "$BENCH" bench --quiet --target tidings --url http://127.0.0.1:$PORT \
    --transport long-poll -n 1000 -c 1 -p 1 --rate "$RATE" --duration 4 --payload 100 \
    --settle 0.5 --drain 3 --label publish-wait --server-pid $SP > "$OUT/$NAME.json" &
BP=$!
# Connecting 1,000 pollers and the settle take ~1-2 s: trace the middle of the 4 s.
sleep 2.2
perf record -q -o "$OUT/$NAME.data" -p "$SP,$BP" \
    -e syscalls:sys_enter_sendto,syscalls:sys_enter_recvfrom,syscalls:sys_exit_recvfrom \
    -e syscalls:sys_exit_epoll_wait -- sleep 1 2> /dev/null
wait $BP
perf script -i "$OUT/$NAME.data" -F comm,pid,tid,time,event,trace > "$OUT/$NAME.txt" 2> /dev/null
rm -f "$OUT/$NAME.data"
python3 "$ROOT/bench/publish_wait.py" "$OUT/$NAME.txt" "$SP" "$OUT/$NAME.json"
