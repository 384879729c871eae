#!/usr/bin/env python3
"""Token-expiry and /ws subscribe/unsubscribe churn for scripts/soak.sh (docs/reliability.md).

On the `priv:` namespace (subscribe and publish need a token or an API key):
- one publisher posts to priv:0 … priv:C-1 at a fixed total rate with the API key and records
  each channel's acknowledged (epoch, offset);
- /ws workers connect with a short-lived JWT (`tidings token --ttl`), keep two subscriptions
  and every couple of seconds unsubscribe one channel and subscribe another, resuming from that
  channel's last cursor; when the token expires (the server's `token_expired` disconnect,
  close 1008) they mint a new token and reconnect;
- SSE workers do the same over `GET /sse?channel=…` with `Authorization: Bearer`.
Every worker checks each channel's sequence like `bench --verify` does: within an epoch each
offset is the previous + 1; a jump needs a gap notice in front of it, a new epoch too. At the
end every worker resumes every channel it followed and must reach the publisher's last
acknowledged offset. Prints one JSON object; exits 1 on any silent loss, duplicate or
reordering.

Threads, not asyncio: the load is small (tens of connections), and the sync clients of
websockets and httpx keep each worker a straight loop.
"""

import argparse
import json
import random
import subprocess
import sys
import threading
import time

import httpx
from websockets.sync.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

lock = threading.Lock()
totals = {
    "ws_connections": 0, "sse_connections": 0, "subscribes": 0, "unsubscribes": 0,
    "token_expired": 0, "tokens_minted": 0, "received": 0, "lost_silently": 0,
    "duplicates": 0, "reordered": 0, "silent_epoch_changes": 0, "gap_notices": 0,
    "missing_at_end": 0, "errors": 0, "published": 0, "publish_refused": 0,
}
first_errors = []
anomalies = []  # the first few duplicates, reorderings and silent losses, with their context
acked = {}  # channel -> (epoch, offset), the publisher's last acknowledged position


def add(key, n=1):
    with lock:
        totals[key] += n


def error(what):
    with lock:
        totals["errors"] += 1
        if len(first_errors) < 5:
            first_errors.append(what)


def anomaly(what):
    with lock:
        if len(anomalies) < 10:
            anomalies.append(what)


class Seq:
    """One worker's view of one channel (the rules of bench_verify.rs's `Check`)."""

    def __init__(self, name=""):
        self.name = name
        self.epoch = None
        self.last = 0
        self.cursor = None
        self.gap = None  # (epoch, next_offset) of a notice not yet followed by a message

    def on_gap(self, g):
        add("gap_notices")
        self.gap = (g.get("epoch"), g.get("next_offset"))
        if g.get("cursor"):
            self.cursor = g["cursor"]

    def on_message(self, m):
        epoch, offset = m["epoch"], m["offset"]
        add("received")
        gap, self.gap = self.gap, None
        if self.epoch is None:
            pass
        elif self.epoch == epoch:
            if offset == self.last + 1:
                pass
            elif offset == self.last:
                add("duplicates")
                anomaly(f"{self.name}: duplicate {m['channel']} {epoch}/{offset}")
            elif offset < self.last:
                add("reordered")
                anomaly(f"{self.name}: {m['channel']} {epoch}/{offset} after {self.last}")
            elif not (gap and gap[0] == epoch and gap[1] <= offset):
                add("lost_silently", offset - self.last - 1)
                anomaly(f"{self.name}: {m['channel']} {epoch}/{offset} after {self.last}, no gap notice")
        elif not (gap and gap[0] == epoch):
            add("silent_epoch_changes")
            anomaly(f"{self.name}: {m['channel']} epoch {self.epoch} -> {epoch}, no gap notice")
        if self.epoch != epoch or offset > self.last:
            self.last = offset
        self.epoch = epoch
        self.cursor = m.get("cursor") or self.cursor


def mint(args, name):
    out = subprocess.run(
        [args.bin, "token", "--config", args.config, "--sub", name, "--subscribe", "priv:*",
         "--ttl", f"{random.randint(args.ttl_min, args.ttl_max)}s"],
        capture_output=True, text=True, timeout=30, check=True)
    add("tokens_minted")
    return out.stdout.strip()


def publisher(args, stop):
    client = httpx.Client(base_url=args.url, headers={"Authorization": f"Bearer {args.api_key}"},
                          timeout=10)
    every = 1.0 / args.rate
    nxt = time.monotonic()
    i = 0
    while not stop.is_set():
        ch = f"priv:{i % args.channels}"
        i += 1
        try:
            r = client.post(f"/publish/{ch}", json={"n": i})
            if r.status_code == 200:
                a = r.json()
                with lock:
                    acked[ch] = (a["epoch"], a["offset"])
                add("published")
            else:
                add("publish_refused")
        except httpx.HTTPError as e:
            error(f"publish: {e!r}")
        nxt += every
        time.sleep(max(0.0, nxt - time.monotonic()))


def ws_session(args, name, seqs, chans, until, final=False):
    """One /ws connection: returns when the token expires, the time is up, or (final) every
    channel caught up."""
    token = mint(args, name)
    url = args.url.replace("http://", "ws://") + f"/ws?token={token}"
    add("ws_connections")
    with ws_connect(url, open_timeout=10, close_timeout=2, max_size=1 << 22) as ws:
        req = 0
        subscribed = []
        pending = {}
        unsub_id, left = None, None

        def subscribe(ch):
            nonlocal req
            req += 1
            msg = {"id": req, "op": "subscribe", "channel": ch}
            if seqs[ch].cursor:
                msg["since"] = seqs[ch].cursor
            pending[req] = ch
            ws.send(json.dumps(msg))
            subscribed.append(ch)
            add("subscribes")

        for ch in (chans if final else random.sample(chans, 2)):
            subscribe(ch)
        next_swap = time.monotonic() + random.uniform(1, 3)
        while time.monotonic() < until:
            if final and all(caught_up(seqs[c], c) for c in chans):
                return
            if not final and unsub_id is None and time.monotonic() >= next_swap:
                ch = subscribed.pop(0)
                req += 1
                unsub_id, left = req, ch
                ws.send(json.dumps({"id": req, "op": "unsubscribe", "channel": ch}))
                add("unsubscribes")
            try:
                raw = ws.recv(timeout=0.5)
            except TimeoutError:
                continue
            except ConnectionClosed:
                return
            f = json.loads(raw)
            t = f.get("type")
            if t == "message":
                seqs[f["channel"]].on_message(f)
            elif t == "gap":
                seqs[f["channel"]].on_gap(f)
            elif t == "disconnect":
                if f.get("reason") == "token_expired":
                    add("token_expired")
                else:
                    error(f"ws disconnect {f}")
            elif t == "reply" and f.get("error"):
                error(f"ws reply {f} for {pending.get(f.get('id'))}")
            elif t == "reply" and f.get("id") == unsub_id:
                # Subscribe the next channel once the server confirmed the unsubscribe, so the
                # resume cursor includes everything the old subscription delivered.
                unsub_id = None
                subscribe(random.choice([c for c in chans if c not in subscribed and c != left]))
                next_swap = time.monotonic() + random.uniform(1, 3)


def caught_up(seq, ch):
    with lock:
        a = acked.get(ch)
    return a is None or (seq.epoch == a[0] and seq.last >= a[1]) or (
        seq.gap is not None and seq.gap[0] == a[0])


def sse_session(args, name, seqs, ch, until):
    token = mint(args, name)
    params = {"channel": ch}
    if seqs[ch].cursor:
        params["since"] = seqs[ch].cursor
    add("sse_connections")
    add("subscribes")
    timeout = httpx.Timeout(10, read=30)
    with httpx.stream("GET", args.url + "/sse", params=params, timeout=timeout,
                      headers={"Authorization": f"Bearer {token}"}) as r:
        if r.status_code != 200:
            error(f"sse {r.status_code}")
            time.sleep(1)
            return
        event, data = None, None
        for line in r.iter_lines():
            if line == "":
                if data is not None:
                    d = json.loads(data)
                    if event == "tidings.gap":
                        seqs[ch].on_gap(d)
                    elif event == "tidings.disconnect":
                        if d.get("reason") == "token_expired":
                            add("token_expired")
                        else:
                            error(f"sse disconnect {d}")
                    elif event is None:
                        seqs[ch].on_message(d)
                event, data = None, None
                if time.monotonic() >= until:
                    return
                continue
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data = line[5:].strip()
            elif line.startswith("id:") and data is None and line[3:].strip():
                seqs[ch].cursor = line[3:].strip()


def worker(args, kind, n, deadline, results):
    name = f"{kind}{n}"
    chans = [f"priv:{i}" for i in range(args.channels)]
    seqs = {c: Seq(name) for c in chans}
    while time.monotonic() < deadline:
        try:
            if kind == "ws":
                try:
                    ws_session(args, name, seqs, chans, deadline)
                except ConnectionClosed:
                    pass  # closed under a send: the token expired (counted from its frame)
            else:
                ch = chans[n % len(chans)]
                # Each SSE connection ends with its token (or, now and then, by itself, to
                # churn connections faster than the token does).
                sse_session(args, name, seqs, ch, min(deadline, time.monotonic() + random.uniform(5, 20)))
        except Exception as e:  # noqa: BLE001 - counted and reported, the worker goes on
            error(f"{name}: {e!r}")
            time.sleep(1)
    results[name] = seqs


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--bin", required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--api-key", required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--channels", type=int, default=10)
    p.add_argument("--rate", type=float, default=10)
    p.add_argument("--ws", type=int, default=12)
    p.add_argument("--sse", type=int, default=8)
    p.add_argument("--ttl-min", type=int, default=6)
    p.add_argument("--ttl-max", type=int, default=15)
    args = p.parse_args()

    stop = threading.Event()
    pub = threading.Thread(target=publisher, args=(args, stop), daemon=True)
    pub.start()
    time.sleep(1)
    deadline = time.monotonic() + args.seconds
    results = {}
    threads = [threading.Thread(target=worker, args=(args, "ws", i, deadline, results), daemon=True)
               for i in range(args.ws)]
    threads += [threading.Thread(target=worker, args=(args, "sse", i, deadline, results), daemon=True)
                for i in range(args.sse)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    pub.join()

    # Every worker resumes every channel it followed and must reach the last acknowledged offset.
    for name, seqs in results.items():
        chans = [c for c, s in seqs.items() if s.epoch is not None]
        if not chans:
            continue
        until = time.monotonic() + 30
        # A token may expire during the catch-up too: reconnect and go on until the time is up.
        while time.monotonic() < until and not all(caught_up(seqs[c], c) for c in chans):
            try:
                ws_session(args, name, seqs, chans, until, final=True)
            except ConnectionClosed:
                pass
            except Exception as e:  # noqa: BLE001
                error(f"final {name}: {e!r}")
                time.sleep(1)
        for c in chans:
            s = seqs[c]
            with lock:
                a = acked.get(c)
            if a and not caught_up(s, c) and s.epoch == a[0]:
                add("missing_at_end", a[1] - s.last)
    print(json.dumps({**totals, "first_errors": first_errors, "anomalies": anomalies}))
    bad = sum(totals[k] for k in ("lost_silently", "duplicates", "reordered",
                                  "silent_epoch_changes", "missing_at_end"))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
