"""Pusher's HTTP API with Pusher's Python library (PyPI `pusher`), as a
Python backend uses it, against a ringcast node with a Pusher app:
trigger, trigger_batch, send_to_user, channels_info, channel_info,
users_info, terminate_user_connections, and a request signed with another
secret refused. A raw WebSocket (Python `websockets`) subscribes to the
channels the library triggers to and tells what it received. Prints one
JSON object; tests/pusher_sdk.rs checks it.

    python3 tests/py/pusher_api.py HOST PORT APP_ID KEY SECRET
"""
import asyncio
import json
import sys

import pusher
import websockets

host, port, app_id, key, secret = sys.argv[1:6]
client = pusher.Pusher(app_id=app_id, key=key, secret=secret, host=host, port=int(port), ssl=False)
forger = pusher.Pusher(app_id=app_id, key=key, secret=secret + "-wrong", host=host, port=int(port), ssl=False)


def outcome(call):
    """The answer of a library call, or the status of its error."""
    try:
        return call()
    except pusher.errors.PusherBadAuth:
        return 401
    except pusher.errors.PusherBadRequest:
        return 400


async def main():
    out = {}
    async with websockets.connect(f"ws://{host}:{port}/app/{key}?protocol=7") as ws:
        established = json.loads(await ws.recv())
        socket_id = json.loads(established["data"])["socket_id"]
        auth = client.authenticate(channel="private-orders", socket_id=socket_id)
        await ws.send(json.dumps({"event": "pusher:subscribe", "data": {"channel": "news"}}))
        await ws.send(json.dumps({"event": "pusher:subscribe", "data": {"channel": "private-orders", **auth}}))
        for _ in range(2):
            assert json.loads(await ws.recv())["event"] == "pusher_internal:subscription_succeeded"
        user_data = json.dumps({"id": "ann"})
        signin = client.authenticate_user(socket_id, {"id": "ann"})
        await ws.send(json.dumps({"event": "pusher:signin", "data": signin}))
        assert json.loads(await ws.recv())["event"] == "pusher:signin_success"
        assert json.loads(await ws.recv())["event"] == "pusher_internal:subscription_succeeded"

        out["trigger"] = client.trigger("news", "greeting", {"text": "hi"})
        out["batch"] = client.trigger_batch([
            {"channel": "news", "name": "batched", "data": "1"},
            {"channel": "private-orders", "name": "batched", "data": {"n": 2}},
        ])
        client.send_to_user("ann", "hello", {"to": "ann"})
        received = []
        for _ in range(4):
            message = json.loads(await ws.recv())
            received.append([message.get("channel"), message["event"], message["data"]])
        out["received"] = received
        out["channels"] = client.channels_info()
        out["channel"] = client.channel_info("news", ["subscription_count"])
        out["users"] = outcome(lambda: client.users_info("news"))
        out["forged"] = outcome(lambda: forger.trigger("news", "greeting", "forged"))
        out["terminate"] = client.terminate_user_connections("ann")
        closing = json.loads(await ws.recv())
        out["terminated"] = closing["data"]["code"]
        try:
            await ws.recv()
            out["closed"] = None
        except websockets.exceptions.ConnectionClosed as closed:
            out["closed"] = closed.rcvd.code if closed.rcvd else None
    print(json.dumps(out))


asyncio.run(main())
