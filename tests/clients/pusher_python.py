"""The Python `pusher` server SDK (PyPI) against Tidings' Pusher HTTP API.

    pusher_python.py URL APP_ID KEY SECRET auth SOCKET_ID
        prints {"private": AUTH, "presence": {"auth", "channel_data"}} for private-py and
        presence-py, signed by the SDK for SOCKET_ID.
    pusher_python.py URL APP_ID KEY SECRET trigger
        triggers on py-news (one event, then a batch of two), queries channels, and checks
        that a client with the wrong secret is refused; prints one JSON line per step.

Exits 0 when done, 1 on a failed check, 2 on bad arguments.
"""

import json
import sys
from urllib.parse import urlparse

import pusher


def out(obj):
    print(json.dumps(obj), flush=True)


def main():
    if len(sys.argv) < 6:
        print(__doc__, file=sys.stderr)
        return 2
    url, app_id, key, secret, what = sys.argv[1:6]
    u = urlparse(url)
    client = pusher.Pusher(app_id=app_id, key=key, secret=secret, host=u.hostname, port=u.port, ssl=False)
    if what == "auth":
        socket_id = sys.argv[6]
        private = client.authenticate(channel="private-py", socket_id=socket_id)
        presence = client.authenticate(
            channel="presence-py",
            socket_id=socket_id,
            custom_data={"user_id": "py-user", "user_info": {"lang": "python"}},
        )
        out({"private": private["auth"], "presence": presence})
        return 0
    if what == "trigger":
        client.trigger("py-news", "py-event", {"from": "python"})
        out({"step": "trigger"})
        client.trigger_batch(
            [
                {"channel": "py-news", "name": "py-batch", "data": {"n": 1}},
                {"channel": "py-news", "name": "py-batch", "data": {"n": 2}},
            ]
        )
        out({"step": "trigger_batch"})
        channels = client.channels_info(prefix_filter="py-", attributes=["subscription_count"])
        out({"step": "channels_info", "answer": channels})
        one = client.channel_info("py-news", attributes=["subscription_count"])
        out({"step": "channel_info", "answer": one})
        wrong = pusher.Pusher(app_id=app_id, key=key, secret="wrong", host=u.hostname, port=u.port, ssl=False)
        try:
            wrong.trigger("py-news", "evil", {})
        except pusher.errors.PusherBadAuth as e:
            out({"step": "wrong secret refused", "error": str(e)[:200]})
        else:
            print("a trigger signed with the wrong secret was accepted", file=sys.stderr)
            return 1
        return 0
    print(f"unknown command {what}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
