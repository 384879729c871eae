"""One GET over h2c with the Python `h2` library, accepting server pushes.

Usage: push_h2.py URL PATH [--no-push] [--reset-pushes]   (URL: http://127.0.0.1:PORT, h2c)

Prints one JSON object: the final status, the informational (1xx) responses with their
`link` headers, and for the page and each pushed response its path and body (hex), so the
caller can compare them with the files byte for byte. `--no-push` sends
SETTINGS_ENABLE_PUSH = 0; `--reset-pushes` resets every pushed stream as soon as it is
promised (RST_STREAM CANCEL).
"""

import json
import socket
import urllib.parse
import sys

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    url = urllib.parse.urlsplit(sys.argv[1])
    host, port, path = url.hostname, url.port, sys.argv[2]
    push = "--no-push" not in sys.argv
    reset = "--reset-pushes" in sys.argv
    sock = socket.create_connection((host, port), timeout=10)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.update_settings({h2.settings.SettingCodes.ENABLE_PUSH: 1 if push else 0})
    conn.send_headers(
        1,
        [(":method", "GET"), (":path", path), (":scheme", "http"), (":authority", f"{host}:{port}")],
        end_stream=True,
    )
    sock.sendall(conn.data_to_send())
    paths = {1: path}
    bodies = {1: b""}
    status = None
    informational = []
    open_streams = {1}
    resets = 0
    while open_streams:
        data = sock.recv(65536)
        if not data:
            break
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.PushedStreamReceived):
                headers = dict((k.decode() if isinstance(k, bytes) else k, v.decode() if isinstance(v, bytes) else v) for k, v in event.headers)
                paths[event.pushed_stream_id] = headers[":path"]
                bodies[event.pushed_stream_id] = b""
                if reset:
                    try:
                        conn.reset_stream(event.pushed_stream_id, error_code=8)
                        resets += 1
                    except h2.exceptions.StreamClosedError:
                        pass  # it came whole in the same read: nothing left to cancel
                else:
                    open_streams.add(event.pushed_stream_id)
            elif isinstance(event, h2.events.InformationalResponseReceived):
                informational.append(
                    {
                        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                        for k, v in event.headers
                        if (k if isinstance(k, bytes) else k.encode()) != b"link"
                    }
                    | {"link": [v.decode() if isinstance(v, bytes) else v for k, v in event.headers if (k if isinstance(k, bytes) else k.encode()) == b"link"]}
                )
            elif isinstance(event, h2.events.ResponseReceived) and event.stream_id == 1:
                for k, v in event.headers:
                    if (k if isinstance(k, bytes) else k.encode()) == b":status":
                        status = int(v)
            elif isinstance(event, h2.events.DataReceived):
                if event.stream_id in bodies:
                    bodies[event.stream_id] += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                open_streams.discard(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                open_streams.discard(event.stream_id)
        sock.sendall(conn.data_to_send())
    conn.close_connection()
    sock.sendall(conn.data_to_send())
    sock.close()
    print(
        json.dumps(
            {
                "status": status,
                "informational": informational,
                "page": bodies[1].hex(),
                "pushed": {paths[s]: bodies[s].hex() for s in bodies if s != 1},
                "resets": resets,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
