#!/usr/bin/env python3
"""Short-poll subscriber built on httpx: asks every 50 ms, never waits.

usage: python short_poll_httpx.py URL CHANNEL COUNT

Loops on GET URL/poll/CHANNEL (no since on the first request, so it starts
"from now"; then ?since=CURSOR with the cursor of the previous reply), with
50 ms between requests. Each reply is {"messages":[…],"cursor":"…","gaps":[…]}.

stdout, one JSON object per line:
  <envelope>            each message, exactly as the server sent it
  {"gap": {...}}        each gap notice of a reply (printed before its messages)
stderr: log lines. Exit 0 after COUNT messages, 1 on an HTTP error or a bad
reply, 3 after the overall timeout (TIDINGS_CLIENT_TIMEOUT seconds, default 20).
"""

import json
import os
import signal
import sys
import time

import httpx

INTERVAL_SECS = 0.05
MAX_TRANSPORT_RETRIES = 5


def log(msg):
    print(f"[short_poll_httpx] {msg}", file=sys.stderr, flush=True)


def emit(obj):
    print(json.dumps(obj), flush=True)


def on_timeout(_signum, _frame):
    log("timeout")
    os._exit(3)  # hard exit: even from inside a blocked read


def main(argv):
    if len(argv) != 4 or not argv[3].isdigit() or int(argv[3]) < 1:
        log("usage: short_poll_httpx.py URL CHANNEL COUNT")
        return 2
    base, channel, count = argv[1].rstrip("/"), argv[2], int(argv[3])

    # Hard overall timeout: a test must never hang on this process.
    signal.signal(signal.SIGALRM, on_timeout)
    signal.alarm(int(os.environ.get("TIDINGS_CLIENT_TIMEOUT", "20")))

    url = f"{base}/poll/{channel}"
    cursor = None
    received = 0
    failures = 0
    polls = 0
    with httpx.Client(timeout=5.0, trust_env=False) as client:
        while True:
            params = {} if cursor is None else {"since": cursor}
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
            polls += 1
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
                    log(f"done: {received} messages in {polls} polls")
                    return 0
            time.sleep(INTERVAL_SECS)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
