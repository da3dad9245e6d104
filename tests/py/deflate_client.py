"""Python `websockets` (which offers permessage-deflate by default) against
ringcast with `[websocket] compression = true`: the extension is agreed, a
long push published over HTTP arrives whole, and a long message the client
sends compressed is read and comes back as a push.

usage: deflate_client.py HOST:PORT   (exits non-zero with a message on any mismatch)
"""
import asyncio
import json
import sys
import urllib.request

import websockets

ADDR = sys.argv[1]


def publish(body):
    req = urllib.request.Request(
        f"http://{ADDR}/publish",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status in (200, 202), resp.status


async def recv_json(ws):
    return json.loads(await asyncio.wait_for(ws.recv(), timeout=10))


async def main():
    async with websockets.connect(f"ws://{ADDR}/ws") as ws:
        agreed = ws.response.headers.get("Sec-WebSocket-Extensions", "")
        assert "permessage-deflate" in agreed, agreed
        assert "client_no_context_takeover" in agreed, agreed
        await ws.send(json.dumps({"type": "subscribe", "topic": "zip"}))
        assert (await recv_json(ws))["type"] == "subscribed"

        items = [f"item {i} of a long list that compresses well" for i in range(100)]
        await asyncio.get_running_loop().run_in_executor(
            None, publish, {"topic": "zip", "event": "list", "payload": items}
        )
        push = await recv_json(ws)
        assert push["event"] == "list" and push["payload"] == items, push

        # The client compresses what it sends; the server reads it.
        for i in range(3):
            text = "x" * 2000 + str(i)
            await ws.send(json.dumps({"type": "message", "topic": "zip", "event": "mine", "payload": text}))
            push = await recv_json(ws)
            assert push["event"] == "mine" and push["payload"] == text, push
    print("all checks passed")


asyncio.run(main())
