#!/usr/bin/env python3
"""Server RSS per idle connection over TLS (HTTP/1.1), which `tidings bench` does not speak.

    target/release/tidings serve --tls-self-signed --tls-listen 127.0.0.1:8443 &
    python3 bench/tls_idle.py --port 8443 --pid $! --path /sse/idle -n 2000
    python3 bench/tls_idle.py --port 8443 --pid $! --path /ws/idle -n 2000

Opens N TLS connections one after another (ALPN http/1.1, certificate not checked), sends
the request (a WebSocket handshake when the path starts with /ws), reads the start of the
answer, waits 2 s, and prints (RSS after - RSS before) / N of the server process, VmRSS and
the anonymous part (RssAnon: without the code pages the first connections fault in; the idle
target's number). Use a fresh
server per measurement: memory freed by earlier connections is reused and hides the cost.
"""
import argparse
import socket
import ssl
import time


def rss_kb(pid, field="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise SystemExit(f"no process {pid}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8443)
    ap.add_argument("--pid", type=int, required=True, help="the server's pid")
    ap.add_argument("--path", default="/sse/idle")
    ap.add_argument("-n", type=int, default=2000)
    args = ap.parse_args()

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    if args.path.startswith("/ws"):
        request = (
            f"GET {args.path} HTTP/1.1\r\nhost: localhost\r\nconnection: Upgrade\r\n"
            "upgrade: websocket\r\nsec-websocket-version: 13\r\n"
            "sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
    else:
        request = f"GET {args.path} HTTP/1.1\r\nhost: localhost\r\n\r\n"

    before, anon_before = rss_kb(args.pid), rss_kb(args.pid, "RssAnon")
    held = []
    for _ in range(args.n):
        raw = socket.create_connection(("127.0.0.1", args.port))
        s = ctx.wrap_socket(raw, server_hostname="localhost")
        s.sendall(request.encode())
        s.recv(4096)
        held.append(s)
    time.sleep(2)
    after, anon_after = rss_kb(args.pid), rss_kb(args.pid, "RssAnon")
    print(f"{args.path}: {args.n} TLS connections, {(after - before) * 1024 / args.n:,.0f} B each, "
          f"anon {(anon_after - anon_before) * 1024 / args.n:,.0f} B each")


if __name__ == "__main__":
    main()
