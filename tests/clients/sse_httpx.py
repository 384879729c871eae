#!/usr/bin/env python3
"""Multi-channel SSE subscriber (envelope mode) built on httpx + httpx-sse.

usage: python sse_httpx.py URL COUNT CHANNEL [CHANNEL...]

Opens GET URL/sse?channel=A&channel=B… and reads the event stream. No
reconnect: if the stream ends before COUNT events, that is an error.

stdout, one JSON object per line:
  {"open": true}                                 once the response headers arrived (200, text/event-stream)
  {"event": "<name>", "id": "<cursor>", "data": <parsed JSON>}   each SSE event,
      control events (tidings.gap, tidings.disconnect) included; `event` is
      "message" when the server sent no event: line
stderr: log lines. Exit 0 after COUNT events whose name does not start with
"tidings.", 1 on an HTTP error, non-JSON data or an early end of stream,
3 after the overall timeout (TIDINGS_CLIENT_TIMEOUT seconds, default 20).
"""

import json
import os
import signal
import sys

import httpx
from httpx_sse import SSEError, connect_sse


def log(msg):
    print(f"[sse_httpx] {msg}", file=sys.stderr, flush=True)


def emit(obj):
    print(json.dumps(obj), flush=True)


def on_timeout(_signum, _frame):
    log("timeout")
    os._exit(3)  # hard exit: even from inside a blocked read


def main(argv):
    if len(argv) < 4 or not argv[2].isdigit() or int(argv[2]) < 1:
        log("usage: sse_httpx.py URL COUNT CHANNEL [CHANNEL...]")
        return 2
    base, count, channels = argv[1].rstrip("/"), int(argv[2]), argv[3:]

    # Hard overall timeout: a test must never hang on this process.
    signal.signal(signal.SIGALRM, on_timeout)
    signal.alarm(int(os.environ.get("TIDINGS_CLIENT_TIMEOUT", "20")))

    params = [("channel", c) for c in channels]
    received = 0
    # No read timeout: heartbeats come every 15 s by default; the alarm bounds the run.
    timeout = httpx.Timeout(5.0, read=None)
    with httpx.Client(timeout=timeout, trust_env=False) as client:
        try:
            with connect_sse(client, "GET", f"{base}/sse", params=params) as source:
                resp = source.response
                if resp.status_code != 200:
                    resp.read()
                    log(f"HTTP {resp.status_code}: {resp.text[:500]}")
                    return 1
                emit({"open": True})
                for ev in source.iter_sse():
                    if ev.data == "":
                        # httpx-sse also yields blocks without data (such as the
                        # opening `retry:`); EventSource would not dispatch them.
                        log(f"skipping event without data (retry={ev.retry})")
                        continue
                    try:
                        data = json.loads(ev.data)
                    except ValueError as err:
                        log(f"event {ev.event!r} has non-JSON data {ev.data!r}: {err}")
                        return 1
                    emit({"event": ev.event, "id": ev.id, "data": data})
                    if not ev.event.startswith("tidings."):
                        received += 1
                        if received >= count:
                            log(f"done: {received} events")
                            return 0
        except SSEError as err:  # e.g. wrong Content-Type
            log(f"SSE error: {err}")
            return 1
        except httpx.TransportError as err:
            log(f"transport error: {err!r}")
            return 1
    log(f"stream ended after {received} of {count} events")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
