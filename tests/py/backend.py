"""A fake application backend for the webhook and proxy tests.

Webhooks: it receives ringcast's webhook POSTs on /hook, checks each one's
X-Ringcast-Signature with the secret given as its first argument (as a
backend would, in constant time), and records the events.

Subscribe proxy: POST /subscribe gets {"client","transport","user","topic"}
and answers by the topic's name: one containing "deny" is refused with
{"error":{"code":4403,"message":"not for you"}}, "status" with a bare 403,
"bad" with a body that is not JSON, "slow" after 1 s (then allowed, unless
"deny" too), anything else {"result":{}}. Every call is recorded.

Publish proxy: POST /publish gets {"client","transport","user","topic",
"event","payload"}: a topic containing "deny" is refused (4403), "slow"
waits 300 ms, "stall" 10 s, a payload whose "text" contains "badword" is allowed with
the payload {"text":"***"}, anything else allowed as is. Every call is
recorded with the subscribe calls.

Connect proxy: POST /connect gets {"client","transport","user","headers",
"query","remote_addr"} and answers by the query: `deny` refuses (4403),
`status=N` answers a bare N, `slow` waits 1 s, `as=U` allows as user U with
the starting topic "news" (and `expire=S` sets expire_at S seconds ahead,
`meta=J` the meta to the JSON J), anything else allows anonymously. Every
call is recorded.

Refresh proxy: POST /refresh gets {"client","transport","user"}: a user
containing "stop" is refused (4403), anyone else renewed for 2 s.

The test drives and reads it over HTTP:

  GET  /events        {"events": [...], "posts": N, "bad_signatures": N, "failed": N}
  GET  /calls         {"calls": [subscribe call bodies, in arrival order]}
  POST /fail?n=N      the next N webhook POSTs are answered 500
  POST /stall?ms=N    webhook POSTs wait N ms before they are answered

Prints `listening on 127.0.0.1:PORT` first, then serves until killed.
With `--tls CERT KEY` after the secret it serves HTTPS with that
certificate.
"""

import hashlib
import hmac
import json
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

SECRET = sys.argv[1].encode()
lock = threading.Lock()
state = {
    "events": [],
    "posts": 0,
    "bad_signatures": 0,
    "failed": 0,
    "fail": 0,
    "stall_ms": 0,
    "calls": [],
}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, body=b""):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path = urlparse(self.path).path
        with lock:
            if path == "/events":
                view = {k: state[k] for k in ("events", "posts", "bad_signatures", "failed")}
            elif path == "/calls":
                view = {"calls": list(state["calls"])}
            else:
                return self.answer(404)
        self.answer(200, json.dumps(view).encode())

    def connect(self, body):
        call = json.loads(body)
        with lock:
            state["calls"].append(call)
        query = parse_qs(call["query"])
        if "slow" in query:
            time.sleep(1)
        if "deny" in query:
            return self.answer(200, b'{"error":{"code":4403,"message":"who are you"}}')
        if "status" in query:
            return self.answer(int(query["status"][0]), b"no")
        result = {}
        if "as" in query:
            result = {"user": query["as"][0], "topics": ["news"]}
        if "expire" in query:
            result["expire_at"] = int(time.time()) + int(query["expire"][0])
        if "meta" in query:
            result["meta"] = json.loads(query["meta"][0])
        self.answer(200, json.dumps({"result": result}).encode())

    def refresh(self, body):
        call = json.loads(body)
        with lock:
            state["calls"].append(call)
        if "stop" in (call.get("user") or ""):
            return self.answer(200, b'{"error":{"code":4403,"message":"revoked"}}')
        result = {"expire_at": int(time.time()) + 2}
        self.answer(200, json.dumps({"result": result}).encode())

    def publish(self, body):
        call = json.loads(body)
        with lock:
            state["calls"].append(call)
        if "slow" in call["topic"]:
            time.sleep(0.3)
        if "stall" in call["topic"]:
            time.sleep(10)
        if "deny" in call["topic"]:
            return self.answer(200, b'{"error":{"code":4403,"message":"not allowed here"}}')
        payload = call.get("payload")
        if isinstance(payload, dict) and "badword" in str(payload.get("text", "")):
            return self.answer(200, b'{"result":{"payload":{"text":"***"}}}')
        self.answer(200, b'{"result":{}}')

    def subscribe(self, body):
        call = json.loads(body)
        with lock:
            state["calls"].append(call)
        topic = call["topic"]
        if "slow" in topic:
            time.sleep(1)
        if "deny" in topic:
            return self.answer(200, b'{"error":{"code":4403,"message":"not for you"}}')
        if "status" in topic:
            return self.answer(403, b"forbidden")
        if "bad" in topic:
            return self.answer(200, b"ok")
        self.answer(200, b'{"result":{}}')

    def do_POST(self):
        url = urlparse(self.path)
        query = parse_qs(url.query)
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if url.path == "/fail":
            with lock:
                state["fail"] = int(query["n"][0])
            return self.answer(204)
        if url.path == "/stall":
            with lock:
                state["stall_ms"] = int(query["ms"][0])
            return self.answer(204)
        if url.path == "/subscribe":
            return self.subscribe(body)
        if url.path == "/connect":
            return self.connect(body)
        if url.path == "/refresh":
            return self.refresh(body)
        if url.path == "/publish":
            return self.publish(body)
        if url.path != "/hook":
            return self.answer(404)
        with lock:
            stall = state["stall_ms"]
        if stall:
            time.sleep(stall / 1000)
        expected = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
        given = self.headers.get("X-Ringcast-Signature", "")
        with lock:
            if not hmac.compare_digest(expected, given):
                state["bad_signatures"] += 1
                return self.answer(401)
            if state["fail"] > 0:
                state["fail"] -= 1
                state["failed"] += 1
                return self.answer(500)
            batch = json.loads(body)
            assert isinstance(batch["time_ms"], int), batch
            state["events"].extend(batch["events"])
            state["posts"] += 1
        self.answer(200, b"{}")


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
if sys.argv[2:3] == ["--tls"]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(sys.argv[3], sys.argv[4])
    server.socket = context.wrap_socket(server.socket, server_side=True)
print(f"listening on 127.0.0.1:{server.server_address[1]}", flush=True)
server.serve_forever()
