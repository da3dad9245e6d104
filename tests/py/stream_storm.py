"""A reconnect storm against ringcast's topic streams, with the Python
`websockets` client: SUBSCRIBERS clients on TOPICS stream topics; while a
publisher goes on at a steady rate, every client drops its connection
abruptly (RST) at the same moment and resubscribes with `since`. Each must
end with every publication of its topic exactly once, in offset order.

usage: stream_storm.py HOST:PORT [SUBSCRIBERS] [TOPICS]
Exits non-zero with a message on any gap, duplicate or reordering.
"""
import asyncio
import http.client
import json
import socket
import struct
import sys
import threading
import time

import websockets

ADDR = sys.argv[1]
SUBSCRIBERS = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
TOPICS = int(sys.argv[3]) if len(sys.argv) > 3 else 10
RATE = 200  # publishes per second, over all topics
PUBLISH_SECONDS = 4.0
STORM_AT = 1.5  # seconds into publishing


def topic(i):
    return f"storm:{i % TOPICS}"


class Subscriber:
    def __init__(self, index):
        self.topic = topic(index)
        self.offsets = []
        self.epoch = None
        self.ws = None
        self.recovered = None

    async def connect(self):
        self.ws = await websockets.connect(f"ws://{ADDR}/ws", max_queue=None)
        request = {"type": "subscribe", "topic": self.topic}
        if self.epoch is not None:
            last = self.offsets[-1] if self.offsets else self.first_offset
            request["since"] = {"offset": last, "epoch": self.epoch}
        await self.ws.send(json.dumps(request))
        reply = json.loads(await asyncio.wait_for(self.ws.recv(), 30))
        assert reply["type"] == "subscribed", reply
        if self.epoch is None:
            self.epoch = reply["epoch"]
            self.first_offset = reply["offset"]
        else:
            self.recovered = reply.get("recovered")
            assert self.recovered is True, f"{self.topic}: not recovered: {reply}"

    async def read(self, until):
        """Reads pushes until `until()` says enough or the socket goes."""
        try:
            while not until():
                message = json.loads(await asyncio.wait_for(self.ws.recv(), 30))
                assert message["type"] == "push", message
                self.offsets.append(message["offset"])
        except websockets.ConnectionClosed:
            pass

    def abort(self):
        sock = self.ws.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.ws.transport.abort()


def publisher(published, done):
    """Steady HTTP publishes round-robin over the topics; records offsets."""
    conn = http.client.HTTPConnection(ADDR, timeout=30)
    start = time.monotonic()
    n = 0
    while time.monotonic() - start < PUBLISH_SECONDS:
        t = topic(n)
        body = json.dumps({"topic": t, "payload": {"n": n}})
        conn.request("POST", "/publish", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        reply = json.loads(response.read())
        assert response.status == 202, reply
        published.setdefault(t, []).append(reply["offset"])
        n += 1
        time.sleep(max(0.0, start + n / RATE - time.monotonic()))
    done.set()


async def main():
    subscribers = [Subscriber(i) for i in range(SUBSCRIBERS)]
    await asyncio.gather(*(s.connect() for s in subscribers))
    published, done = {}, threading.Event()
    thread = threading.Thread(target=publisher, args=(published, done))
    thread.start()
    readers = [asyncio.create_task(s.read(lambda: False)) for s in subscribers]
    await asyncio.sleep(STORM_AT)
    for s in subscribers:
        s.abort()
    await asyncio.gather(*readers)
    storm = time.monotonic()
    await asyncio.gather(*(s.connect() for s in subscribers))
    recovered_in = time.monotonic() - storm
    await asyncio.get_running_loop().run_in_executor(None, done.wait)
    thread.join()

    def caught_up(s):
        return lambda: s.offsets and s.offsets[-1] >= published[s.topic][-1]

    await asyncio.gather(*(s.read(caught_up(s)) for s in subscribers))
    for s in subscribers:
        expected = [o for o in published[s.topic] if o > s.first_offset]
        if s.offsets != expected:
            missing = sorted(set(expected) - set(s.offsets))
            dups = len(s.offsets) - len(set(s.offsets))
            sys.exit(
                f"{s.topic}: {len(s.offsets)} pushes, {len(expected)} expected; "
                f"missing {missing[:5]}, {dups} duplicates, in order: {s.offsets == sorted(s.offsets)}"
            )
        await s.ws.close()
    total = sum(len(s.offsets) for s in subscribers)
    print(
        f"storm ok: {SUBSCRIBERS} subscribers, {sum(map(len, published.values()))} publications, "
        f"{total} deliveries, all resubscribed and recovered in {recovered_in:.2f} s"
    )


asyncio.run(main())
