#!/usr/bin/env python3
"""Hostile clients for `scripts/chaos.sh`, all at once, against every node, for a while:

- STALLED subscribers that never read, on a channel this script floods with 32 KiB messages,
  so their socket buffers fill and the node must cut them loose (`slow` or `write_timeout`)
  and free their memory;
- slowloris: request heads sent one byte a second, and POST bodies that never finish;
- malformed input: garbage, an oversized head, a bad chunked body, WebSocket frames that
  break RFC 6455 (unmasked, reserved opcode, 2^62-byte length);
- reconnect storms: every few seconds STORM subscribers connect at once and leave.

    chaos_hostile.py --duration 60 --stalled 1000 --slowloris 100 --storm 300 URL [URL…]

Prints one JSON line of counts at the end. Connections the server closed are the point: a
stalled subscriber still open at the end means a node kept its memory.
"""

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import time
from urllib.parse import urlparse

counts = {
    "stalled_opened": 0,
    "stalled_closed_by_server": 0,  # the node let go of it (or the node died)
    "slowloris_opened": 0,
    "slowloris_closed_by_server": 0,
    "malformed_sent": 0,
    "malformed_answered_4xx_or_closed": 0,
    "storm_connections": 0,
    "storm_failed": 0,
    "flood_published": 0,
    "flood_refused": 0,
}


def addr(url):
    u = urlparse(url)
    return u.hostname, u.port or 80


async def open_small(host, port):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # A small receive buffer: the server's writes back up after a few messages.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, port))
    return await asyncio.open_connection(sock=sock)


STALLED_PORTS = set()


def held_by_nodes(node_ports):
    """Remote ports of connections a node still holds open (its side ESTABLISHED). A node that
    gives up on a stalled subscriber closes its socket; with our window full its FIN cannot
    even reach us, so the server's side is where to look, not ours."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            for line in open(table).readlines()[1:]:
                f = line.split()
                if f[3] == "01" and int(f[1].rsplit(":", 1)[1], 16) in node_ports:
                    ports.add(int(f[2].rsplit(":", 1)[1], 16))
        except OSError:
            pass
    return ports


async def stalled(host, port, channel, until):
    try:
        r, w = await open_small(host, port)
    except OSError:
        return
    counts["stalled_opened"] += 1
    w.write(f"GET /sse?channel={channel} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    await w.drain()
    # Never read: the server's writes back up until it gives up on us.
    STALLED_PORTS.add(w.get_extra_info("sockname")[1])
    while time.monotonic() < until:
        await asyncio.sleep(5)
    w.transport.abort()


async def watch_stalled(until, node_ports):
    closed = set()
    while time.monotonic() < until:
        await asyncio.sleep(2)
        closed |= STALLED_PORTS - held_by_nodes(node_ports)
        counts["stalled_closed_by_server"] = len(closed)


async def flood(host, port, channel, until):
    body = json.dumps({"pad": "x" * 32768}).encode()
    while time.monotonic() < until:
        try:
            r, w = await asyncio.open_connection(host, port)
            while time.monotonic() < until:
                w.write(
                    f"POST /publish/{channel} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n".encode() + body
                )
                await w.drain()
                head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await r.readexactly(length)
                if head.startswith(b"HTTP/1.1 200"):
                    counts["flood_published"] += 1
                else:
                    counts["flood_refused"] += 1
                await asyncio.sleep(0.1)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError):
            await asyncio.sleep(0.5)


async def slowloris(host, port, until, body):
    try:
        r, w = await asyncio.open_connection(host, port)
    except OSError:
        return
    counts["slowloris_opened"] += 1
    if body:
        head = f"POST /publish/hostile-slow HTTP/1.1\r\nHost: {host}\r\nContent-Length: 100000\r\n\r\n"
        w.write(head.encode())
        drip = b"x"
    else:
        drip = None
        head = f"GET /sse?channel=hostile-slow HTTP/1.1\r\nHost: {host}\r\nX-Slow: "
    i = 0
    try:
        while time.monotonic() < until:
            w.write(drip if body else head[i % len(head)].encode() if i < len(head) else b"a")
            i += 1
            await w.drain()
            try:
                data = await asyncio.wait_for(r.read(1024), 1)
                if data == b"" or data.startswith(b"HTTP/1.1 4") or data.startswith(b"HTTP/1.1 5"):
                    counts["slowloris_closed_by_server"] += 1
                    break
            except asyncio.TimeoutError:
                pass
    except OSError:
        counts["slowloris_closed_by_server"] += 1
    w.transport.abort()


MALFORMED = [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64),
    b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n",
    b"POST /publish/hostile HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nxx\r\n0\r\n\r\n",
    b"GET /sse?channel=%ff%fe HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /publish/hostile HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"NOT-HTTP\r\n\r\n",
]

WS_HEAD = (
    b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
WS_BAD_FRAMES = [
    b"\x81\x05hello",  # unmasked client frame
    b"\x83\x80\x00\x00\x00\x00",  # reserved opcode 3
    b"\x81\xff" + (1 << 62).to_bytes(8, "big") + b"\x00\x00\x00\x00",  # 2^62 bytes
    b"\x81\x85\x00\x00\x00\x00{\"op\"",  # truncated JSON op
]


async def malformed(host, port, until):
    while time.monotonic() < until:
        payload = random.choice(MALFORMED + [None])
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 2)
            if payload is None:
                w.write(WS_HEAD)
                await w.drain()
                await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
                payload = random.choice(WS_BAD_FRAMES)
            w.write(payload)
            await w.drain()
            counts["malformed_sent"] += 1
            data = await asyncio.wait_for(r.read(4096), 5)
            if data == b"" or data[:10] in (b"HTTP/1.1 4", b"HTTP/1.1 5") or data[:1] == b"\x88":
                counts["malformed_answered_4xx_or_closed"] += 1
            w.transport.abort()
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            counts["malformed_answered_4xx_or_closed"] += 1
        await asyncio.sleep(0.05)


async def storm(targets, n, until, every):
    while time.monotonic() < until:
        async def one():
            host, port = random.choice(targets)
            try:
                r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
                w.write(f"GET /sse?channel=hostile-storm HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                await w.drain()
                await asyncio.wait_for(r.read(1), 5)
                counts["storm_connections"] += 1
                w.transport.abort()
            except (OSError, asyncio.TimeoutError):
                counts["storm_failed"] += 1

        await asyncio.gather(*(one() for _ in range(n)))
        await asyncio.sleep(every)


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("urls", nargs="+")
    p.add_argument("--duration", type=float, default=60)
    p.add_argument("--stalled", type=int, default=1000)
    p.add_argument("--slowloris", type=int, default=100)
    p.add_argument("--storm", type=int, default=300)
    p.add_argument("--storm-every", type=float, default=10)
    args = p.parse_args()
    targets = [addr(u) for u in args.urls]
    until = time.monotonic() + args.duration
    tasks = []
    for i, (host, port) in enumerate(targets):
        tasks.append(flood(host, port, "hostile-big", until))
        tasks.append(malformed(host, port, until))
    for i in range(args.stalled):
        host, port = targets[i % len(targets)]
        tasks.append(stalled(host, port, "hostile-big", until))
    for i in range(args.slowloris):
        host, port = targets[i % len(targets)]
        tasks.append(slowloris(host, port, until, body=i % 2 == 1))
    tasks.append(storm(targets, args.storm, until, args.storm_every))
    tasks.append(watch_stalled(until, {p for _, p in targets}))
    # The run may end before --duration: report what happened so far on SIGTERM.
    done = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, done.set)
    everything = asyncio.ensure_future(asyncio.gather(*tasks, return_exceptions=True))
    await asyncio.wait([everything, asyncio.ensure_future(done.wait())], return_when=asyncio.FIRST_COMPLETED)
    print(json.dumps(counts), flush=True)
    os._exit(0)


if __name__ == "__main__":
    asyncio.run(main())
