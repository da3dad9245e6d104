"""Drives ringcast with the Python `websockets` client, as a user would.

usage: relay_client.py HOST:PORT   (exits non-zero with a message on any mismatch)
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
        assert resp.status == 202, resp.status
        return json.loads(resp.read())


async def recv_json(ws):
    return json.loads(await asyncio.wait_for(ws.recv(), timeout=10))


async def main():
    async with websockets.connect(f"ws://{ADDR}/ws") as alice, websockets.connect(f"ws://{ADDR}/ws") as bob:
        for ws in (alice, bob):
            await ws.send(json.dumps({"type": "subscribe", "topic": "chat:lobby"}))
            assert await recv_json(ws) == {"type": "subscribed", "topic": "chat:lobby"}

        reply = await asyncio.get_running_loop().run_in_executor(
            None, publish, {"topic": "chat:lobby", "event": "notice", "payload": {"text": "welcome"}}
        )
        assert reply["delivered_shards"] >= 1, reply
        for ws in (alice, bob):
            push = await recv_json(ws)
            assert push == {"type": "push", "topic": "chat:lobby", "event": "notice", "payload": {"text": "welcome"}}, push

        await alice.send(json.dumps({"type": "message", "topic": "chat:lobby", "event": "say", "payload": "hi bob"}))
        for ws in (alice, bob):
            push = await recv_json(ws)
            assert push["event"] == "say" and push["payload"] == "hi bob", push

        await bob.send("ping")
        assert await asyncio.wait_for(bob.recv(), 10) == "pong"
        await bob.send('{"type":"ping"}')
        assert await recv_json(bob) == {"type": "pong"}
        pong_waiter = await bob.ping(b"are you there")
        await asyncio.wait_for(pong_waiter, 10)

        await bob.send("{broken")
        err = await recv_json(bob)
        assert err["type"] == "error" and "invalid JSON" in err["message"], err

        await bob.send(json.dumps({"topics": ["a", "b"]}))
        replies = sorted([json.dumps(await recv_json(bob), sort_keys=True) for _ in range(3)])
        assert replies == sorted([
            json.dumps({"type": "subscribed", "topic": "a"}, sort_keys=True),
            json.dumps({"type": "subscribed", "topic": "b"}, sort_keys=True),
            json.dumps({"type": "unsubscribed", "topic": "chat:lobby"}, sort_keys=True),
        ]), replies

    async with websockets.connect(f"ws://{ADDR}/echo", max_size=None) as echo:
        blob = bytes(range(256)) * 200
        await echo.send(blob)
        assert await asyncio.wait_for(echo.recv(), 10) == blob
    print("python websockets client: all checks passed")


asyncio.run(main())
