// Pusher-format webhooks checked by Pusher's server SDK, as an app's
// backend checks them: `pusher.webhook(req).isValid()` (X-Pusher-Key and
// X-Pusher-Signature over the body) before its events are read.
//
//   node webhook_test.mjs APP_ID KEY SECRET
//
// Prints `listening PORT` first; then reads the node's address (`HOST
// PORT`) from stdin, drives a pusher-js client (presence subscription, a
// client event, leaving) and prints one JSON object of the webhooks that
// arrived; tests/pusher_js.rs checks it.
import http from "node:http";
import readline from "node:readline";
import PusherServer from "pusher";
import { client as pusherClient, deadline, sleep } from "./common.mjs";

const [appId, key, secret] = process.argv.slice(2);
const out = { events: [], invalid: 0 };
const timer = deadline(out, 20000);

const receiver = http.createServer((req, res) => {
  let rawBody = "";
  req.on("data", (chunk) => (rawBody += chunk));
  req.on("end", () => {
    const webhook = new PusherServer({ appId, key, secret }).webhook({ headers: req.headers, rawBody });
    if (webhook.isValid()) {
      for (const e of webhook.getEvents()) out.events.push(e);
    } else {
      out.invalid += 1;
    }
    res.writeHead(200).end();
  });
});
await new Promise((resolve) => receiver.listen(0, "127.0.0.1", resolve));
console.log(`listening ${receiver.address().port}`);

const lines = readline.createInterface({ input: process.stdin });
const [host, port] = (await lines[Symbol.asyncIterator]().next()).value.split(" ");
const server = new PusherServer({ appId, key, secret, host, port, useTLS: false });

const client = pusherClient(key, host, port, (socketId, channelName) =>
  server.authorizeChannel(socketId, channelName, { user_id: "ann" }),
);
await new Promise((resolve) => client.connection.bind("connected", resolve));
out.socket_id = client.connection.socket_id;
const channel = client.subscribe("presence-room");
await new Promise((resolve) => channel.bind("pusher:subscription_succeeded", resolve));
channel.trigger("client-typing", { by: "ann" });
// A cache channel with nothing kept: pusher:cache_miss, and its webhook.
const cache = client.subscribe("cache-empty");
out.cache_miss = await new Promise((resolve) => cache.bind("pusher:cache_miss", () => resolve(true)));
await sleep(500);
client.disconnect();
// channel_vacated and member_removed come after the vacated delay (2 s):
// presence-room's occupied, added, client event, vacated, removed;
// cache-empty's occupied, miss, vacated.
const waitFor = async (n) => {
  while (out.events.length < n) await sleep(50);
};
await waitFor(8);
await sleep(300);
receiver.close();
lines.close();
clearTimeout(timer);
console.log(JSON.stringify(out));
