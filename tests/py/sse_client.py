"""A third-party SSE client (sseclient-py over urllib) against /sse:
named events carrying the WebSocket JSON, and a resume from the last
event id after the connection dropped, with nothing lost or repeated.

Usage: sse_client.py HOST:PORT   (the server has a stream rule for s:*)
"""
import json
import signal
import sys
import urllib.request

import sseclient

BASE = "http://" + sys.argv[1]

# Heartbeats keep every read alive, so a missing event would wait for
# ever: the whole check must finish in 30 s.
signal.alarm(30)


def publish(topic, event, payload):
    body = json.dumps({"topic": topic, "event": event, "payload": payload}).encode()
    request = urllib.request.Request(
        BASE + "/publish", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status in (200, 202), response.status


def open_stream(last_event_id=None):
    headers = {"Accept": "text/event-stream"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    request = urllib.request.Request(
        BASE + "/sse?topic=s:py&topic=plain", headers=headers
    )
    response = urllib.request.urlopen(request, timeout=10)
    assert response.status == 200, response.status
    assert response.headers["Content-Type"].startswith("text/event-stream")
    return response, sseclient.SSEClient(response).events()


def until_subscribed(events, count):
    """Reads until `count` topics are subscribed: publications made
    before that are not owed to this connection."""
    last_id, subscribed = None, []
    for event in events:
        if event.id:
            last_id = event.id
        if event.event == "ringcast.subscribed":
            subscribed.append(json.loads(event.data))
            if len(subscribed) == count:
                return subscribed, last_id
    raise AssertionError("the stream ended")


def expect(events, count, last_id):
    """Reads `count` pushes, checking their shape; returns them and the last id."""
    pushes = []
    subscribed = []
    for event in events:
        data = json.loads(event.data)
        if event.id:
            last_id = event.id
        if event.event == "ringcast.subscribed":
            subscribed.append(data)
            continue
        assert data["type"] == "push", data
        assert event.event == data["event"], (event.event, data)
        pushes.append(data)
        if len(pushes) == count:
            return pushes, subscribed, last_id
    raise AssertionError("the stream ended")


response, events = open_stream()
subscribed, last_id = until_subscribed(events, 2)
assert sorted(s["topic"] for s in subscribed) == ["plain", "s:py"], subscribed
for i in range(1, 4):
    publish("s:py", "tick", {"i": i})
publish("plain", "note", "hello")
pushes, _, last_id = expect(events, 4, last_id)
ticks = [p["payload"]["i"] for p in pushes if p["topic"] == "s:py"]
assert ticks == [1, 2, 3], ticks
assert [p["offset"] for p in pushes if p["topic"] == "s:py"] == [1, 2, 3]
assert last_id and last_id.startswith("3."), last_id
response.close()

for i in range(4, 6):
    publish("s:py", "tick", {"i": i})
response, events = open_stream(last_id)
pushes, subscribed, last_id = expect(events, 2, last_id)
recovered = [s for s in subscribed if s["topic"] == "s:py"]
assert recovered and recovered[0]["recovered"] is True, subscribed
assert [p["payload"]["i"] for p in pushes] == [4, 5], pushes
assert last_id.startswith("5."), last_id
response.close()
print("all checks passed")
