#!/usr/bin/env python3
"""Where an idle connection's heap goes, from two massif snapshots (before and after N
connections): bytes per connection by part (task, socket, session, queue, TLS, ...).

    bench/idle_massif.sh target/release/tidings sse 1000 /tmp/m/sse
    python3 bench/massif_parts.py /tmp/m/sse.idle /tmp/m/sse.before 1000 [--sites]

Each allocation site's growth is divided by N and filed under the first part whose pattern
its call stack matches (PARTS, in order); `--sites` lists the sites of each part. Massif's
`mem_heap_extra_B` (malloc's own header and rounding per block) is reported apart.
"""
import re
import sys

# (part, pattern on the whole call stack of a site), first match wins.
PARTS = [
    ("TLS: rustls deframer buffer", r"DeframerVecBuffer|deframer"),
    ("task (tokio cell: the connection's future)", r"tokio::runtime::task::core::Cell"),
    ("socket (tokio readiness registration)", r"add_source|ScheduledIo|new_with_interest"),
    ("session: SSE/NDJSON writer (body)", r"StreamBody"),
    ("session: WebSocket session", r"upgrade::Pending::start"),
    ("session: long-poll wait", r"short_poll::poll"),
    ("timer (heartbeat / ping interval)", r"interval_at"),
    ("kill switch (per connection)", r"CancellationToken::new|net::kill::Kill::new|kill::Kill::new"),
    ("queue (session queue, hub entry)", r"subscription::.*::session|hub::"),
    ("subscription (cursor, channels, client id)", r"cursor::|subscription::|ChannelName|ClientInfo"),
    ("TLS: record keys (aws-lc)", r"aws_lc"),
    ("TLS: rustls connection and queues", r"rustls"),
]


def parse(path):
    lines = open(path).read().splitlines()
    heap = extra = 0
    for line in lines:
        if line.startswith("mem_heap_B="):
            heap = int(line.split("=")[1])
        if line.startswith("mem_heap_extra_B="):
            extra = int(line.split("=")[1])
    start = next(i for i, line in enumerate(lines) if line.startswith("heap_tree=detailed"))
    root = {"kids": {}, "bytes": 0}
    stack = [(-1, root)]
    for line in lines[start + 1:]:
        m = re.match(r"^( *)n(\d+): (\d+) (.*)$", line)
        if not m:
            break
        depth, size, rest = len(m.group(1)), int(m.group(3)), m.group(4)
        name = re.sub(r"^0x[0-9A-F]+: ", "", rest)
        name = re.sub(r" \([^()]*:\d+\)$", "", name)
        while stack[-1][0] >= depth:
            stack.pop()
        node = stack[-1][1]["kids"].setdefault(name, {"kids": {}, "bytes": 0})
        node["bytes"] += size
        stack.append((depth, node))
    return root, heap, extra


def leaves(node, path, out):
    """(stack, bytes) of every node whose bytes are not all in its children."""
    below = sum(k["bytes"] for k in node["kids"].values())
    if path and node["bytes"] - below:
        out[" <- ".join(path)] = out.get(" <- ".join(path), 0) + node["bytes"] - below
    for name, kid in node["kids"].items():
        leaves(kid, path + [name], out)
    return out


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    idle_path, before_path, n = args[0], args[1], int(args[2])
    idle, heap1, extra1 = parse(idle_path)
    before, heap0, extra0 = parse(before_path)
    a, b = leaves(idle, [], {}), leaves(before, [], {})
    parts = {}
    for site in set(a) | set(b):
        grown = (a.get(site, 0) - b.get(site, 0)) / n
        part = next((p for p, pat in PARTS if re.search(pat, site)), "other")
        parts.setdefault(part, []).append((grown, site))
    print(f"| part | bytes per connection |\n|---|---|")
    for part, _ in PARTS + [("other", "")]:
        sites = parts.get(part, [])
        total = sum(g for g, _ in sites)
        if abs(total) >= 1:
            print(f"| {part} | {total:,.0f} |")
    print(f"| malloc's own (headers, rounding) | {(extra1 - extra0) / n:,.0f} |")
    print(f"| **heap total** | **{(heap1 - heap0 + extra1 - extra0) / n:,.0f}** |")
    if "--sites" in sys.argv:
        for part, sites in parts.items():
            print(f"\n{part}")
            for grown, site in sorted(sites, reverse=True):
                if abs(grown) >= 4:
                    frames = [f for f in site.split(" <- ") if "tidings" in f or "rustls" in f]
                    print(f"  {grown:8.1f}  {(frames[0] if frames else site[-160:])[:160]}")


if __name__ == "__main__":
    main()
