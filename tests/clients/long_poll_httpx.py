#!/usr/bin/env python3
"""Long-poll subscriber built on httpx: the classic loop a backend would write.

usage: python long_poll_httpx.py URL CHANNEL COUNT

Loops on GET URL/poll/CHANNEL?wait=10 (plus &since=CURSOR once a reply has
given a cursor). Each reply is {"messages":[envelopes],"cursor":"…","gaps":[…]}.

stdout, one JSON object per line:
  <envelope>            each message, exactly as the server sent it
  {"gap": {...}}        each gap notice of a reply (printed before its messages)
stderr: log lines. Exit 0 after COUNT messages, 1 on an HTTP error or a bad
reply, 3 after the overall timeout (TIDINGS_CLIENT_TIMEOUT seconds, default 20).
Transport errors (connection refused or dropped) are retried a few times,
as a real client would.
"""

import json
import os
import signal
import sys
import time

import httpx

WAIT_SECS = 10
MAX_TRANSPORT_RETRIES = 5


def log(msg):
    print(f"[long_poll_httpx] {msg}", file=sys.stderr, flush=True)


def emit(obj):
    print(json.dumps(obj), flush=True)


def on_timeout(_signum, _frame):
    log("timeout")
    os._exit(3)  # hard exit: even from inside a blocked read


def main(argv):
    if len(argv) != 4 or not argv[3].isdigit() or int(argv[3]) < 1:
        log("usage: long_poll_httpx.py URL CHANNEL COUNT")
        return 2
    base, channel, count = argv[1].rstrip("/"), argv[2], int(argv[3])

    # Hard overall timeout: a test must never hang on this process.
    signal.signal(signal.SIGALRM, on_timeout)
    signal.alarm(int(os.environ.get("TIDINGS_CLIENT_TIMEOUT", "20")))

    url = f"{base}/poll/{channel}"
    cursor = None
    received = 0
    failures = 0
    # The read timeout must outlast the server's hold of WAIT_SECS.
    timeout = httpx.Timeout(5.0, read=WAIT_SECS + 5.0)
    with httpx.Client(timeout=timeout, trust_env=False) as client:
        while received < count:
            params = {"wait": WAIT_SECS}
            if cursor is not None:
                params["since"] = cursor
            try:
                resp = client.get(url, params=params)
            except httpx.TransportError as err:
                failures += 1
                if failures > MAX_TRANSPORT_RETRIES:
                    log(f"giving up after {failures} transport errors: {err!r}")
                    return 1
                log(f"transport error, retrying: {err!r}")
                time.sleep(0.2)
                continue
            failures = 0
            if resp.status_code != 200:
                log(f"HTTP {resp.status_code}: {resp.text[:500]}")
                return 1
            try:
                body = resp.json()
                gaps = body.get("gaps", [])
                messages = body["messages"]
                cursor = body.get("cursor", cursor)
            except (ValueError, KeyError, AttributeError) as err:
                log(f"bad reply ({err!r}): {resp.text[:500]}")
                return 1
            for gap in gaps:
                emit({"gap": gap})
            for envelope in messages:
                emit(envelope)
                received += 1
                if received >= count:
                    break
    log(f"done: {received} messages")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
