// pusher-js (the Node build, as an app's code would use it) against a
// ringcast node with a Pusher app, and events triggered with Pusher's
// server SDK. Prints one JSON object of what happened; tests/pusher_js.rs
// checks it.
//
//   node client_test.mjs HOST PORT APP_ID KEY SECRET
import PusherServer from "pusher";
import { client as pusherClient, deadline } from "./common.mjs";

const [host, port, appId, key, secret] = process.argv.slice(2);
const server = new PusherServer({ appId, key, secret, host, port, useTLS: false });
const forger = new PusherServer({ appId, key, secret: secret + "-wrong", host, port, useTLS: false });
const out = { events: [], errors: [] };
const timer = deadline(out, 15000);

// Signed by the app's backend; the forged one with another secret.
const client = pusherClient(key, host, port, (socketId, channelName) =>
  (channelName === "private-forged" ? forger : server).authorizeChannel(socketId, channelName),
);

const connected = new Promise((resolve) => client.connection.bind("connected", resolve));
await connected;
out.socket_id = client.connection.socket_id;

const subscribed = (name) =>
  new Promise((resolve) => {
    const channel = client.subscribe(name);
    channel.bind("pusher:subscription_succeeded", () => resolve(channel));
    channel.bind("pusher:subscription_error", (e) => {
      out.errors.push({ channel: name, status: e.status, type: e.type });
      resolve(null);
    });
  });
const [news, room, forged] = await Promise.all(
  ["news", "private-room", "private-forged"].map(subscribed),
);
out.forged_subscribed = forged !== null;

const received = new Promise((resolve) => {
  const seen = [];
  for (const channel of [news, room]) {
    channel.bind("greeting", (data) => {
      seen.push({ channel: channel.name, data });
      if (seen.length === 2) resolve(seen);
    });
  }
});
await server.trigger(["news", "private-room"], "greeting", { text: "hi, & welcome" });
out.events = await received;

// A batch is checked whole before any of it goes out: one bad channel
// refuses all of it, and nothing of it arrives before the good batch.
const batched = new Promise((resolve) => {
  const seen = [];
  for (const channel of [news, room]) {
    channel.bind("batched", (data) => {
      seen.push({ channel: channel.name, data });
      if (seen.length === 2) resolve(seen);
    });
  }
});
try {
  await server.triggerBatch([
    { channel: "news", name: "batched", data: { n: 0 } },
    { channel: "bad channel", name: "batched", data: { n: -1 } },
  ]);
  out.bad_batch = "accepted";
} catch (e) {
  out.bad_batch = e.status;
}
await server.triggerBatch([
  { channel: "news", name: "batched", data: { n: 1 } },
  { channel: "private-room", name: "batched", data: { n: 2 } },
]);
out.batched = await batched;

// A trigger's info: each channel's counts, as the SDK asks for them.
const counted = await server.trigger(["news", "nobody-here"], "counted", {}, {
  info: "subscription_count",
});
out.trigger_info = await counted.json();
const batchCounted = await server.triggerBatch([
  { channel: "news", name: "counted", data: {}, info: "subscription_count" },
  { channel: "private-room", name: "counted", data: {} },
]);
out.batch_info = await batchCounted.json();

try {
  await forger.trigger("news", "greeting", { text: "forged" });
  out.forged_trigger = "accepted";
} catch (e) {
  out.forged_trigger = e.status;
}

// The channel queries, as the server SDK asks them.
const get = async (path, params) => {
  try {
    return await (await server.get({ path, params })).json();
  } catch (e) {
    return e.status;
  }
};
out.queries = {
  news: await get("/channels/news", { info: "subscription_count" }),
  empty: await get("/channels/nobody-here", {}),
  all: await get("/channels", {}),
  private: await get("/channels", { filter_by_prefix: "private-" }),
  user_count_of_all: await get("/channels", { info: "user_count" }),
  user_count_of_public: await get("/channels/news", { info: "user_count" }),
  forged: await (async () => {
    try {
      await forger.get({ path: "/channels/news" });
      return "accepted";
    } catch (e) {
      return e.status;
    }
  })(),
};

client.disconnect();
clearTimeout(timer);
console.log(JSON.stringify(out));
