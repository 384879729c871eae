#!/usr/bin/env python3
"""Hostile-client reproducers (issue 19) against a real `tidings serve`, reporting RSS.

Starts the given binary on a free loopback port with a config of its own, fills history,
then runs each attack from plain sockets (standard library only) and prints what it cost:
the server's RSS before, during and after, and whether the connections were closed.

    cargo build --release -p tidings-cli
    scripts/hostile.py target/release/tidings              # every attack
    scripts/hostile.py target/release/tidings replay ws    # some of them

Attacks:
  replay   16 channels x 100 messages of 60 KB; 8 x `GET /poll?channel=c0..c15&history=999999`
           from sockets that never read (the issue's 142 MB -> 1.75 GB)
  sse      the same through SSE streams
  ws       `/ws` history op of 100 x 60 KB, never read
  preface  `PRI` then silence; a full preface + SETTINGS then silence
  head     one byte just before the head deadline
Exit status 1 when a connection that should have been closed is still open.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

WRITE_TIMEOUT = 5.0
HEADER_TIMEOUT = 3.0
PING = 2.0


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start(binary):
    port = free_port()
    conf = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
    conf.write(
        f"""[server]
listen = "127.0.0.1:{port}"
write_timeout = "{WRITE_TIMEOUT}s"
request_header_timeout = "{HEADER_TIMEOUT}s"
ping_interval = "{PING}s"
"""
    )
    conf.close()
    proc = subprocess.Popen(
        [binary, "--config", conf.name, "serve"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).read()
            return proc, port, conf.name
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not start")


def publish_many(port, channels, n, size):
    """Pipelined publishes on one connection (sent from a thread while answers are read)."""
    import threading

    body = b"x" * size
    s = socket.create_connection(("127.0.0.1", port))

    def send():
        for c in channels:
            head = (
                f"POST /publish/{c} HTTP/1.1\r\nhost: x\r\ncontent-type: text/plain\r\n"
                f"content-length: {size}\r\n\r\n"
            ).encode()
            for _ in range(n):
                s.sendall(head + body)

    t = threading.Thread(target=send)
    t.start()
    want, seen, tail = len(channels) * n, 0, b""
    while seen < want:
        chunk = s.recv(1 << 16)
        if not chunk:
            raise SystemExit("publishing failed")
        data = tail + chunk
        seen += data.count(b"HTTP/1.1 200")
        if b"HTTP/1.1 4" in data or b"HTTP/1.1 5" in data:
            raise SystemExit(f"a publish failed: {data[:300]!r}")
        # Keep a tail shorter than the marker so no answer is counted twice.
        tail = data[-11:]
    t.join()
    s.close()


def open_connections(port):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith("tidings_http_connections "):
            # This request is one of them.
            return int(line.split()[1]) - 1
    return -1


def non_reader(port, request):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(request)
    return s


def watch(pid, port, label, socks, within):
    t0 = time.time()
    peak = rss_mb(pid)
    closed_at = None
    while time.time() - t0 < within:
        peak = max(peak, rss_mb(pid))
        if open_connections(port) == 0 and closed_at is None:
            closed_at = time.time() - t0
            break
        time.sleep(0.25)
    after = rss_mb(pid)
    for s in socks:
        s.close()
    state = f"closed after {closed_at:.1f}s" if closed_at is not None else f"STILL OPEN after {within:.0f}s"
    print(f"  {label}: peak RSS {peak:.0f} MB, then {after:.0f} MB; {state}")
    return closed_at is not None


def attack_replay(pid, port):
    chans = "&".join(f"channel=c{i}" for i in range(16))
    req = f"GET /poll?{chans}&history=999999 HTTP/1.1\r\nhost: x\r\n\r\n".encode()
    socks = [non_reader(port, req) for _ in range(8)]
    return watch(pid, port, "8 x poll history=999999 over 16 x 100 x 60 KB, never read", socks, WRITE_TIMEOUT * 4)


def attack_sse(pid, port):
    chans = "&".join(f"channel=c{i}" for i in range(16))
    req = f"GET /sse?{chans}&history=100 HTTP/1.1\r\nhost: x\r\n\r\n".encode()
    socks = [non_reader(port, req) for _ in range(8)]
    return watch(pid, port, "8 x SSE history=100 over 16 channels, never read", socks, WRITE_TIMEOUT * 4)


def ws_frame(text):
    data = text.encode()
    assert len(data) < 126
    return bytes([0x81, 0x80 | len(data), 0, 0, 0, 0]) + data


def attack_ws(pid, port):
    req = (
        b"GET /ws HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n"
        b"sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        + ws_frame(json.dumps({"op": "history", "channel": "c0", "limit": 100}))
    )
    socks = [non_reader(port, req) for _ in range(8)]
    return watch(pid, port, "8 x /ws history limit=100 of 60 KB, never read", socks, WRITE_TIMEOUT * 4)


def attack_preface(pid, port):
    a = socket.create_connection(("127.0.0.1", port))
    a.sendall(b"PRI")
    ok = watch(pid, port, "PRI then silence", [a], HEADER_TIMEOUT * 4)
    b = socket.create_connection(("127.0.0.1", port))
    b.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    return watch(pid, port, "h2 preface + SETTINGS then silence", [b], PING * 6) and ok


def attack_head(pid, port):
    s = socket.create_connection(("127.0.0.1", port))
    t0 = time.time()
    time.sleep(HEADER_TIMEOUT * 0.9)
    s.sendall(b"G")
    s.settimeout(HEADER_TIMEOUT * 4)
    try:
        s.recv(100)
    except OSError:
        pass
    held = time.time() - t0
    ok = held < HEADER_TIMEOUT * 1.4
    print(f"  one byte at {HEADER_TIMEOUT * 0.9:.1f}s with a {HEADER_TIMEOUT:.0f}s head deadline: held {held:.1f}s {'ok' if ok else 'DOUBLED'}")
    s.close()
    return ok


ATTACKS = {
    "replay": attack_replay,
    "sse": attack_sse,
    "ws": attack_ws,
    "preface": attack_preface,
    "head": attack_head,
}


def main():
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    binary = sys.argv[1]
    chosen = sys.argv[2:] or list(ATTACKS)
    proc, port, conf = start(binary)
    ok = True
    try:
        print(f"server pid {proc.pid} on port {port}: idle RSS {rss_mb(proc.pid):.0f} MB")
        publish_many(port, [f"c{i}" for i in range(16)], 100, 60_000)
        print(f"after 16 x 100 x 60 KB of history: RSS {rss_mb(proc.pid):.0f} MB")
        for name in chosen:
            print(name)
            ok = ATTACKS[name](proc.pid, port) and ok
        print(f"at the end: RSS {rss_mb(proc.pid):.0f} MB")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        os.unlink(conf)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
