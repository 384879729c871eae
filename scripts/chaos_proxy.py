#!/usr/bin/env python3
"""A TCP proxy between one Tidings node and Redis that `scripts/chaos.sh` controls.

This machine's kernel has no `tc netem` (and the run must not need root), so latency, loss
and partitions between one node and Redis are made here, on loopback:

    chaos_proxy.py LISTEN_PORT CONTROL_PORT --sentinel 127.0.0.1:26379 --master mymaster
    chaos_proxy.py LISTEN_PORT CONTROL_PORT --upstream 127.0.0.1:6379

Each new connection goes to the primary the sentinel names at that moment (like a managed
Redis's primary endpoint), or to the fixed upstream. The control port takes one command per
connection and answers `ok`:

    delay MS     every chunk is delivered MS later, in order (both directions)
    loss PCT     PCT % of chunks are held 200 ms more, what a lost TCP segment costs (TCP
                 retransmits; bytes are never dropped, that would only corrupt the stream)
    partition    nothing is forwarded any more, connections stay open (a black hole)
    cut          every open connection is reset now (new ones still work)
    heal         delay 0, loss 0, no partition

Queues are bounded: a partitioned or slow direction stops reading (TCP backpressure).
"""

import argparse
import asyncio
import random
import socket
import sys
import time

QUEUE_CHUNKS = 256
RETRANSMIT_S = 0.2


class State:
    def __init__(self):
        self.delay = 0.0
        self.loss = 0.0
        self.healed = asyncio.Event()
        self.healed.set()
        self.conns = set()


async def primary(args):
    if args.upstream:
        host, port = args.upstream.rsplit(":", 1)
        return host, int(port)
    host, port = args.sentinel.rsplit(":", 1)
    r, w = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 2)
    try:
        name = args.master.encode()
        w.write(b"*3\r\n$8\r\nSENTINEL\r\n$23\r\nget-master-addr-by-name\r\n$%d\r\n%s\r\n" % (len(name), name))
        await w.drain()
        head = await asyncio.wait_for(r.readline(), 2)
        if not head.startswith(b"*2"):
            raise ConnectionError("the sentinel names no primary")
        parts = []
        for _ in range(2):
            await r.readline()
            parts.append((await r.readline()).strip().decode())
        return parts[0], int(parts[1])
    finally:
        w.close()


async def pump(state, reader, writer):
    """reader → writer, each chunk delivered at arrival + delay (+ a retransmit on loss)."""
    queue = asyncio.Queue(QUEUE_CHUNKS)

    async def deliver():
        while True:
            due, data = await queue.get()
            if data is None:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            await state.healed.wait()
            writer.write(data)
            await writer.drain()

    sender = asyncio.ensure_future(deliver())
    last_due = 0.0
    try:
        while True:
            await state.healed.wait()
            data = await reader.read(65536)
            if not data:
                break
            due = time.monotonic() + state.delay
            if state.loss and random.random() < state.loss:
                due += RETRANSMIT_S
            last_due = max(last_due, due)
            await queue.put((last_due, data))
        await queue.put((0, None))
        await sender
    except (ConnectionError, OSError, asyncio.CancelledError):
        pass
    finally:
        sender.cancel()
        try:
            writer.close()
        except Exception:
            pass


async def handle(state, args, client_r, client_w):
    try:
        host, port = await primary(args)
        up_r, up_w = await asyncio.wait_for(asyncio.open_connection(host, port), 2)
    except Exception:
        client_w.close()
        return
    pair = (client_w, up_w)
    state.conns.add(pair)
    try:
        await asyncio.gather(pump(state, client_r, up_w), pump(state, up_r, client_w))
    finally:
        state.conns.discard(pair)


def reset(writer):
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            # SO_LINGER 0: close sends a RST, like a cut cable seen from the far end.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        except OSError:
            pass
    writer.transport.abort()


async def control(state, r, w):
    line = (await r.readline()).decode().split()
    answer = "ok"
    if not line:
        answer = "empty"
    elif line[0] == "delay":
        state.delay = float(line[1]) / 1000
    elif line[0] == "loss":
        state.loss = float(line[1]) / 100
    elif line[0] == "partition":
        state.healed.clear()
    elif line[0] == "cut":
        for pair in list(state.conns):
            for writer in pair:
                reset(writer)
        state.conns.clear()
    elif line[0] == "heal":
        state.delay, state.loss = 0.0, 0.0
        state.healed.set()
    else:
        answer = "unknown command"
    w.write((answer + "\n").encode())
    await w.drain()
    w.close()


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("listen", type=int)
    p.add_argument("control", type=int)
    p.add_argument("--sentinel")
    p.add_argument("--master", default="mymaster")
    p.add_argument("--upstream")
    args = p.parse_args()
    if not args.sentinel and not args.upstream:
        sys.exit("chaos_proxy.py: --sentinel or --upstream")
    state = State()
    await asyncio.start_server(lambda r, w: handle(state, args, r, w), "127.0.0.1", args.listen)
    await asyncio.start_server(lambda r, w: control(state, r, w), "127.0.0.1", args.control)
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
