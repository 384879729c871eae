#!/usr/bin/env python3
"""A tiny GRIP origin for Pushpin, used by bench/run.py.

GET /sse/{c} and /stream/{c}: hold a stream on channel c. GET /poll/{c}: hold a response
(long poll) on channel c. POST /ws/{c} (WebSocket-over-HTTP): accept the connection and
subscribe it to channel c. Publishing goes straight to Pushpin's publish port, not here.
"""
import http.server
import json
import socketserver
import sys


class Origin(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, status, headers, body=b""):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def channel(self):
        return self.path.split("?")[0].rsplit("/", 1)[-1]

    def do_GET(self):
        kind = self.path.split("/")[1]
        c = self.channel()
        if kind == "sse":
            self.reply(200, [("Content-Type", "text/event-stream"), ("Grip-Hold", "stream"),
                             ("Grip-Channel", c)])
        elif kind == "stream":
            self.reply(200, [("Content-Type", "text/plain"), ("Grip-Hold", "stream"),
                             ("Grip-Channel", c)])
        elif kind == "poll":
            self.reply(200, [("Content-Type", "text/plain"), ("Grip-Hold", "response"),
                             ("Grip-Channel", c), ("Grip-Timeout", "30")], b"timeout\n")
        else:
            self.reply(404, [], b"not found\n")

    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        events = self.rfile.read(n)
        out = b""
        if events.startswith(b"OPEN"):
            sub = b"c:" + json.dumps({"type": "subscribe", "channel": self.channel()}).encode()
            out = b"OPEN\r\n" + b"TEXT %x\r\n" % len(sub) + sub + b"\r\n"
        self.reply(200, [("Content-Type", "application/websocket-events"),
                         ("Sec-WebSocket-Extensions", "grip")], out)


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    request_queue_size = 4096


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8092
    Server(("127.0.0.1", port), Origin).serve_forever()
