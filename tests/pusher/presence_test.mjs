// Presence channels and client events with pusher-js (the Node build) and
// Pusher's server SDK signing as an app's backend would. Users: ann (two
// connections, as two tabs), bob, and cy, who finds the channel full (the
// app allows 2 members). Prints one JSON object of what each connection
// saw; tests/pusher_js.rs checks it.
//
//   node presence_test.mjs HOST PORT APP_ID KEY SECRET [HOST2 PORT2]
//
// With a second node, bob and ann's second tab connect to it: members
// and member events are the cluster's.
import PusherServer from "pusher";
import { client as pusherClient, deadline, sleep } from "./common.mjs";

const [host, port, appId, key, secret, host2, port2] = process.argv.slice(2);
const server = new PusherServer({ appId, key, secret, host, port, useTLS: false });
const out = {};
const timer = deadline(out, 20000);

// One connection of `user`, on the first node or (`second`) the other one;
// `seen` records every member and client event it gets.
async function connect(name, user, second = false) {
  const data = { user_id: user, user_info: { name: user.toUpperCase() } };
  const client = pusherClient(
    key,
    second && host2 ? host2 : host,
    second && port2 ? port2 : port,
    (socketId, channelName) => server.authorizeChannel(socketId, channelName, data),
  );
  await new Promise((resolve) => client.connection.bind("connected", resolve));
  const seen = [];
  out[name] = { seen };
  const channel = client.subscribe("presence-room");
  const result = await new Promise((resolve) => {
    channel.bind("pusher:subscription_succeeded", (members) => {
      const ids = [];
      members.each((m) => ids.push(m.id));
      resolve({ count: members.count, ids: ids.sort(), me: members.me.id, info: members.me.info });
    });
    channel.bind("pusher:subscription_error", (e) => resolve({ error: e.type, status: e.status }));
  });
  out[name].subscribed = result;
  channel.bind("pusher:member_added", (m) => seen.push(`added ${m.id}`));
  channel.bind("pusher:member_removed", (m) => seen.push(`removed ${m.id}`));
  channel.bind("client-typing", (data, meta) => seen.push(`typing ${data.by} from ${meta?.user_id}`));
  channel.bind("said", (data) => seen.push(`said ${data}`));
  return { client, channel, socketId: client.connection.socket_id };
}

// Each step settles before the next: presence crosses shards (and nodes).
const ann1 = await connect("ann1", "ann");
await sleep(300);
const bob = await connect("bob", "bob", true);
await sleep(300);
const ann2 = await connect("ann2", "ann", true);
await sleep(300);
const cy = await connect("cy", "cy");
await sleep(300);

// The channel queries, asked of the first node: users once each, every
// connection counted.
const get = async (path, params) => {
  const response = await server.get({ path, params });
  return response.json();
};
out.channel = await get("/channels/presence-room", { info: "user_count,subscription_count" });
out.users = await get("/channels/presence-room/users", {});
out.channels = await get("/channels", { filter_by_prefix: "presence-", info: "user_count" });

// A client event goes to every other subscriber, never back to its sender.
ann1.channel.trigger("client-typing", { by: "ann1" });
await sleep(300);
// A trigger naming bob's socket skips bob; asked for its channel's counts.
const said = await server.trigger("presence-room", "said", "not to bob", {
  socket_id: bob.socketId,
  info: "user_count,subscription_count",
});
out.said_info = await said.json();
await sleep(300);
// Ann's second tab leaves: ann is still there (no member_removed).
ann2.client.disconnect();
await sleep(500);
// Ann's last connection leaves: now she is gone.
ann1.client.disconnect();
await sleep(800);
await server.trigger("presence-room", "said", "end");
await sleep(300);

bob.client.disconnect();
cy.client.disconnect();
clearTimeout(timer);
console.log(JSON.stringify(out));
