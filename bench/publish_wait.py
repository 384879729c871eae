"""Reads bench/publish_wait.sh's syscall trace: per publish, the wait before the server read
its request and the time from that read to its answer (see the script)."""
import bisect
import json
import re
import statistics
import sys
from collections import Counter

LINE = re.compile(r'^\s*\S+\s+(\d+)/(\d+)\s+([\d.]+):\s+syscalls:(\S+):\s*(.*)$')


def field(args, name):
    m = re.search(name + r': (0x[0-9a-f]+|\d+)', args)
    return int(m.group(1), 0) if m else None


def ret(args):
    m = re.search(r'(-?0x[0-9a-f]+|-?\d+)\s*$', args)
    return int(m.group(1), 0) if m else None


def summary(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "none"
    return (f"n={len(xs)} mean={statistics.mean(xs):.2f} p50={statistics.median(xs):.2f} "
            f"max={max(xs):.2f}")


def main(path, server_pid, result=None):
    server_pid = int(server_pid)
    events = []
    for line in open(path):
        m = LINE.match(line)
        if m:
            pid, tid, t, name, args = m.groups()
            events.append((float(t), int(pid), int(tid), name, args))
    events.sort()
    reading, syscalls, epolls, gen_sends = {}, [], [], []
    for t, pid, tid, name, args in events:
        if pid != server_pid:
            if name == 'sys_enter_sendto':
                gen_sends.append((t, field(args, 'len')))
        elif name == 'sys_enter_recvfrom':
            reading[tid] = field(args, 'fd')
        elif name == 'sys_exit_recvfrom':
            syscalls.append((t, 'recv', reading.pop(tid, None), ret(args)))
        elif name == 'sys_enter_sendto':
            syscalls.append((t, 'send', field(args, 'fd'), field(args, 'len')))
        elif name == 'sys_exit_epoll_wait':
            epolls.append((t, ret(args)))
    # A publish is the longest request (a POST with its 100-byte body; polls are GETs).
    publish_len = max(n for _, kind, _, n in syscalls if kind == 'recv' and n and n > 0)
    publisher = Counter(fd for _, kind, fd, n in syscalls
                        if kind == 'recv' and n == publish_len).most_common(1)[0][0]
    gen_publish_len = max(n for _, n in gen_sends)
    gen_publishes = [t for t, n in gen_sends if n == gen_publish_len]
    times = [s[0] for s in syscalls]
    wait, ahead, work, answered = [], [], [], []
    for i, (t, kind, fd, n) in enumerate(syscalls):
        if not (kind == 'recv' and fd == publisher and n == publish_len):
            continue
        j = next((j for j in range(i + 1, len(syscalls))
                  if syscalls[j][1] == 'send' and syscalls[j][2] == publisher), None)
        if j is None:
            break
        g = bisect.bisect_right(gen_publishes, t) - 1
        if g >= 0:
            wait.append((t - gen_publishes[g]) * 1e3)
            ahead.append(i - bisect.bisect_left(times, gen_publishes[g]))
        work.append((syscalls[j][0] - t) * 1e3)
        answered.append(sum(1 for s in syscalls[i + 1:j] if s[1] == 'send'))
    span = events[-1][0] - events[0][0]
    sends = [n for _, kind, _, n in syscalls if kind == 'send']
    recvs = sum(1 for s in syscalls if s[1] == 'recv')
    if result:
        r = json.loads(open(result).read().strip().splitlines()[-1])
        s = r.get("server") or {}
        print(f"run: published {r.get('published')} at {r.get('rate')}/s asked, "
              f"p99 {(r.get('latency_us') or {}).get('p99')} us, server {s.get('cpu_pct')} % "
              f"of its core, {s.get('cpu_us_per_delivery')} us per delivery")
    print(f"traced {span:.2f} s: server recv/s {recvs / span:.0f}, send/s {len(sends) / span:.0f}, "
          f"epoll_wait/s {len(epolls) / span:.0f} (events each: "
          f"{statistics.mean([n for _, n in epolls if n is not None] or [0]):.1f})")
    print(f"reply sizes (bytes: count; one message = the most common): "
          f"{Counter(sends).most_common(6)}")
    print(f"publishes traced: {len(work)}")
    print(f"  generator's send -> server's read (ms): {summary(wait)}")
    print(f"  server syscalls in that wait:          {summary(ahead)}")
    print(f"  server's read -> its answer (ms):      {summary(work)}")
    print(f"  held polls answered in between:        {summary(answered)}")


if __name__ == "__main__":
    main(*sys.argv[1:])
