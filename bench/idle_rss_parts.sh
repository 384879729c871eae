#!/bin/bash
# Where a server's RSS per idle connection goes, with glibc: malloc's bytes in use, free
# chunks kept in its arenas, anonymous memory outside malloc, and file-backed pages (the
# binary's code the first connections fault in, not per connection). A fresh server;
# malloc_stats() and malloc_info() through gdb and /proc/PID/status before and with N idle
# connections held by `tidings bench`. WARM=500 opens and closes that many first.
#
#   ulimit -n 20000; flock /work/wt/bench.lock bench/idle_rss_parts.sh target/release/tidings long-poll 5000 /tmp/rss/lp
set -u
BIN=$1 T=$2 N=$3 OUT=$4
mkdir -p "$OUT"
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
TIDINGS_LOG=warn "$BIN" serve --listen 127.0.0.1:$PORT >"$OUT/server.out" 2>"$OUT/server.err" &
SP=$!
trap 'kill $SP 2>/dev/null; wait $SP 2>/dev/null' EXIT
for _ in $(seq 1 60); do (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break; sleep 0.5; done
hold() { # $1 connections, held for $2 seconds
  "$BIN" bench --quiet --url http://127.0.0.1:$PORT --transport "$T" -n "$1" -c 1 -p 1 --rate 0 \
    --duration 0 --settle "$2" --payload 100 --server-pid $SP
}
snap() { # malloc_stats and malloc_info go to the server's stderr
  grep -E "VmRSS|RssAnon" /proc/$SP/status >"$OUT/$1.status"
  gdb -p $SP -batch -ex 'call (void)malloc_stats()' -ex 'call (int)malloc_info(0, (void*)stderr)' >/dev/null 2>&1
}
if [ "${WARM:-0}" -gt 0 ]; then hold "$WARM" 2 >"$OUT/warm.json" 2>&1; sleep 2; fi
snap before
hold "$N" 25 >"$OUT/bench.json" 2>&1 & H=$!
until [ "$(ss -tn state established "( sport = :$PORT )" | tail -n +2 | wc -l)" -ge "$N" ]; do sleep 0.5; done
sleep 3
snap idle
wait $H
python3 - "$OUT" "$N" <<'PY'
import re, sys
out, n = sys.argv[1], int(sys.argv[2])
def status(f):
    return {k: int(v.split()[0]) * 1024 for k, v in (l.split(":") for l in open(f"{out}/{f}.status"))}
b, i = status("before"), status("idle")
err = open(f"{out}/server.err").read()
tot = re.findall(r"Total \(incl. mmap\):\s*system bytes\s*=\s*(\d+)\s*in use bytes\s*=\s*(\d+)", err)
(sb, ub), (si, ui) = [(int(s), int(u)) for s, u in tot[:2]]
rss, anon = i["VmRSS"] - b["VmRSS"], i["RssAnon"] - b["RssAnon"]
per = lambda x: round(x / n)
print(f"per connection: RSS {per(rss)}, malloc in use {per(ui - ub)}, free in arenas "
      f"{per((si - ui) - (sb - ub))}, anon outside malloc {per(anon - (si - sb))}, "
      f"file-backed {per(rss - anon)}")
idle = err.split("<malloc version=")[-1]
for nr, heap in re.findall(r'<heap nr="(\d+)">(.*?)</heap>', idle, re.S):
    sizes = re.findall(r'<size from="(\d+)" to="(\d+)" total="(\d+)" count="(\d+)"/>', heap)
    top = sorted(sizes, key=lambda s: -int(s[2]))[:3]
    print(f"arena {nr}, largest free: " + ", ".join(f"{c} chunks of {f}-{t} ({int(tt) // 1024} KiB)" for f, t, tt, c in top))
PY
