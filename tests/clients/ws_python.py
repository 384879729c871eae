#!/usr/bin/env python3
"""WebSocket client built on the Python `websockets` library (asyncio API).

usage: python ws_python.py URL raw  CHANNEL COUNT [HISTORY]
       python ws_python.py URL json CHANNEL COUNT [HISTORY]

URL is the server's base URL (http://127.0.0.1:PORT); http is turned into ws.

raw   connects to /ws/CHANNEL (with ?history=HISTORY when given), sends one text
      frame "hello from websockets", and prints every frame it receives until
      COUNT frames:
        {"kind": "text", "data": "<the text>"}
        {"kind": "binary", "data": "<base64 of the bytes>"}
json  connects to /ws and speaks the JSON protocol: subscribes to CHANNEL with
      "history": HISTORY (default 10), waits for the subscribe reply, publishes
      {"from": "websockets"} to CHANNEL, and prints every frame it receives (the
      parsed JSON object, replies included) until COUNT frames of type
      "message" arrived and the publish was acknowledged.

stderr: log lines. Exit 0 when done; 1 on an error (error reply, disconnect or
close before the end, missing publish ack, bad frame); 2 on bad arguments; 3
after the overall timeout (TIDINGS_CLIENT_TIMEOUT seconds, default 20).
"""

import asyncio
import base64
import json
import os
import signal
import sys
from urllib.parse import quote

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

LIB = "websockets"
HELLO = f"hello from {LIB}"


class Failure(Exception):
    """The run failed: exit 1 with this message."""


def log(msg):
    print(f"[ws_python] {msg}", file=sys.stderr, flush=True)


def emit(obj):
    print(json.dumps(obj), flush=True)


def on_alarm(_signum, _frame):
    log("timeout (hard)")
    os._exit(3)  # even from inside a blocked call


def ws_base(url):
    url = url.rstrip("/")
    if url.startswith("http://"):
        return "ws://" + url[len("http://"):]
    if url.startswith("https://"):
        return "wss://" + url[len("https://"):]
    return url


async def run_raw(base, channel, count, history):
    url = f"{base}/ws/{quote(channel, safe='')}"
    if history is not None:
        url += f"?history={history}"
    log(f"connecting to {url}")
    # proxy=None: never let an http_proxy from the environment sit in between.
    async with connect(url, proxy=None, open_timeout=5, max_size=None) as ws:
        log("open; sending hello")
        await ws.send(HELLO)
        received = 0
        while received < count:
            try:
                frame = await ws.recv()
            except ConnectionClosed as err:
                raise Failure(f"closed after {received} of {count} frames: {err}") from err
            if isinstance(frame, str):
                emit({"kind": "text", "data": frame})
            else:
                emit({"kind": "binary", "data": base64.b64encode(frame).decode("ascii")})
            received += 1
        log(f"done: {received} frames")


async def run_json(base, channel, count, history):
    url = f"{base}/ws"
    log(f"connecting to {url}")
    async with connect(url, proxy=None, open_timeout=5, max_size=None) as ws:
        sub = {"id": 1, "op": "subscribe", "channel": channel, "history": history}
        await ws.send(json.dumps(sub))
        messages = 0
        acked = False
        published = False
        while messages < count or not acked:
            try:
                frame = await ws.recv()
            except ConnectionClosed as err:
                raise Failure(
                    f"closed after {messages} of {count} messages (ack: {acked}): {err}"
                ) from err
            if not isinstance(frame, str):
                raise Failure(f"binary frame on /ws: {frame[:64]!r}")
            try:
                obj = json.loads(frame)
            except ValueError as err:
                raise Failure(f"frame is not JSON: {frame[:200]!r}") from err
            emit(obj)
            kind = obj.get("type")
            if kind == "reply":
                if "error" in obj or obj.get("ok") is not True:
                    raise Failure(f"error reply: {obj}")
                if obj.get("id") == 1 and not published:
                    published = True
                    pub = {"id": 2, "op": "publish", "channel": channel, "data": {"from": LIB}}
                    await ws.send(json.dumps(pub))
                elif obj.get("id") == 2:
                    if not isinstance(obj.get("offset"), int) or "cursor" not in obj:
                        raise Failure(f"publish ack without a position: {obj}")
                    acked = True
            elif kind == "message":
                messages += 1
            elif kind == "disconnect":
                raise Failure(f"disconnected: {obj}")
        log(f"done: {messages} messages, publish acknowledged")


async def main_async(argv):
    base, mode, channel, count = ws_base(argv[1]), argv[2], argv[3], int(argv[4])
    history = int(argv[5]) if len(argv) > 5 else None
    timeout = float(os.environ.get("TIDINGS_CLIENT_TIMEOUT", "20"))
    try:
        async with asyncio.timeout(timeout):
            if mode == "raw":
                await run_raw(base, channel, count, history)
            else:
                await run_json(base, channel, count, 10 if history is None else history)
    except TimeoutError:
        log(f"timeout after {timeout:g}s")
        return 3
    except Failure as err:
        log(str(err))
        return 1
    except (OSError, InvalidHandshake, ConnectionClosed) as err:
        log(f"connection failed: {err!r}")
        return 1
    return 0


def main(argv):
    ok = (
        len(argv) in (5, 6)
        and argv[2] in ("raw", "json")
        and argv[4].isdigit()
        and int(argv[4]) >= 1
        and (len(argv) == 5 or argv[5].isdigit())
    )
    if not ok:
        log("usage: ws_python.py URL raw|json CHANNEL COUNT [HISTORY]")
        return 2
    # Backstop for the asyncio timeout: a test must never hang on this process.
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(int(float(os.environ.get("TIDINGS_CLIENT_TIMEOUT", "20"))) + 2)
    return asyncio.run(main_async(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
