#!/bin/bash
# Counts the server's instructions (callgrind) for one fixed load, so two builds can be compared
# whatever else the machine is doing.
#   bench/callgrind-ab.sh SERVER_BINARY NAME [tidings bench options…]
#   bench/callgrind-ab.sh /tmp/base/target/release/tidings pub-base -n 10 -c 10 -p 1 --rate 200 --duration 5
# The counters are zeroed after the subscribers connected (7 s in; --settle 9), so the count
# covers publishing and delivery only. Use a fixed --rate: with --rate 0 a slower build
# batches differently and the counts are not comparable.
# PORT picks the server's port (default: a free one, so it never meets bench/run.py's servers).
set -euo pipefail
BIN=$1; NAME=$2; shift 2
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# The load generator: TIDINGS_BENCH_BIN (a copy outside target/, so a release build during a
# sitting cannot swap it), else this checkout's release build.
BENCH=${TIDINGS_BENCH_BIN:-$ROOT/target/release/tidings}
OUT=${OUT:-/tmp/tidings-bench/callgrind}
PORT=${PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
mkdir -p "$OUT"
rm -f "$OUT/$NAME".out*
taskset -c 0 valgrind --tool=callgrind --callgrind-out-file="$OUT/$NAME.out" "$BIN" serve \
    --listen 127.0.0.1:$PORT > "$OUT/$NAME.log" 2>&1 &
VP=$!
# Wait for the port, not a fixed time: under valgrind on a loaded machine start-up took longer
# than 5 s and the subscribers found nothing to connect to.
for _ in $(seq 600); do
    (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break
    kill -0 "$VP" 2>/dev/null || { echo "server exited; see $OUT/$NAME.log" >&2; exit 1; }
    sleep 0.1
done
( sleep 7; callgrind_control -z "$VP" > /dev/null 2>&1 ) &
# The count ends with a dump (`$NAME.out.1`), taken as soon as the generator is done; the
# exit's own file (the teardown of every connection: with 2,000 SSE streams, thousands of
# instructions per publish) is left out of the sum below. The generator closes its connections as it exits, so
# some of their closing can still land in the dump: for a cell with many connections, count
# a window inside publishing instead (docs/benchmarks.md, channels-5k-sse CPU, session 10).
taskset -c 1 "$BENCH" bench --quiet --settle 9 --url "http://127.0.0.1:$PORT" "$@" > "$OUT/$NAME.json"
callgrind_control -d "$VP" > /dev/null 2>&1
kill -INT "$VP"
wait "$VP" || true
python3 - "$OUT" "$NAME" <<'PY'
import glob, json, sys
out, name = sys.argv[1], sys.argv[2]
r = json.load(open(f"{out}/{name}.json"))
ir = 0
for f in glob.glob(f"{out}/{name}.out.*"):
    for line in open(f):
        if line.startswith("summary:"):
            ir += int(line.split()[1])
d, p = max(1, r["deliveries"]), max(1, r["published"])
print(f"{name}: Ir={ir} published={r['published']} deliveries={r['deliveries']} "
      f"lost={r['lost']} dups={r['duplicates']} Ir/delivery={ir // d} Ir/publish={ir // p}")
PY
