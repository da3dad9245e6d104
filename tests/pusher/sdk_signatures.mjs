// What Pusher's server SDK (npm `pusher`) signs, for ringcast to check:
// every HTTP API request it makes (to a local recorder standing in for the
// server), and the channel authorizations and user sign-in it makes for a
// backend. Prints one JSON object; tests/pusher_sdk.rs checks each.
//
//   node sdk_signatures.mjs APP_ID KEY SECRET
import http from "node:http";
import Pusher from "pusher";

const [appId, key, secret] = process.argv.slice(2);
const requests = [];
const server = http.createServer((req, res) => {
  let body = "";
  req.on("data", (chunk) => (body += chunk));
  req.on("end", () => {
    requests.push({ method: req.method, url: req.url, body });
    res.writeHead(200, { "Content-Type": "application/json" });
    res.end("{}");
  });
});
await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
const pusher = new Pusher({
  appId,
  key,
  secret,
  host: "127.0.0.1",
  port: String(server.address().port),
  useTLS: false,
});

await pusher.trigger(["room-1", "private-room-2"], "greeting", { text: "hi, & welcome" }, { socket_id: "123.456" });
await pusher.triggerBatch([
  { channel: "a", name: "e1", data: { n: 1 } },
  { channel: "presence-b", name: "e2", data: "plain" },
]);
await pusher.get({ path: "/channels", params: { filter_by_prefix: "presence-", info: "user_count,subscription_count" } });
await pusher.get({ path: "/channels/presence-b/users" });
await pusher.terminateUserConnections("ann");

const presenceData = { user_id: "ann", user_info: { name: "Ann & co" } };
const out = {
  requests,
  private: pusher.authorizeChannel("1234.5678", "private-room-2"),
  presence: pusher.authorizeChannel("1234.5678", "presence-b", presenceData),
  user: pusher.authenticateUser("1234.5678", { id: "ann", name: "Ann" }),
};
console.log(JSON.stringify(out));
server.close();
