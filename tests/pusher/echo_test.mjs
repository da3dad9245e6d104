// Laravel Echo (broadcaster "pusher", over pusher-js's Node build) against
// a ringcast node, as a Laravel app's front end uses it: a private
// channel's event under Echo's namespace, a presence channel's here /
// joining / leaving, and whispers (client events). The server SDK signs
// the authorizations and triggers the event as Laravel's broadcaster does.
// Prints one JSON object; tests/pusher_js.rs checks it.
//
//   node echo_test.mjs HOST PORT APP_ID KEY SECRET
import Echo from "laravel-echo";
import PusherServer from "pusher";
import { client as pusherClient, deadline, sleep } from "./common.mjs";

const [host, port, appId, key, secret] = process.argv.slice(2);
const server = new PusherServer({ appId, key, secret, host, port, useTLS: false });
const out = { ann: [], bob: [] };
const timer = deadline(out, 15000);

// An Echo for `user`, its pusher-js client authorized by the SDK.
function echo(user) {
  const client = pusherClient(key, host, port, (socketId, channelName) => {
    const data = channelName.startsWith("presence-")
      ? { user_id: user, user_info: { name: user } }
      : undefined;
    return server.authorizeChannel(socketId, channelName, data);
  });
  return new Echo({ broadcaster: "pusher", client });
}

const ann = echo("ann");
const names = (users) => users.map((u) => u.name).sort();
const annHere = new Promise((resolve) =>
  ann
    .join("chat")
    .here((users) => resolve(names(users)))
    .joining((user) => out.ann.push(`joining ${user.name}`))
    .leaving((user) => out.ann.push(`leaving ${user.name}`))
    .listenForWhisper("typing", (e) => out.ann.push(`whisper ${e.by}`)),
);
out.ann_here = await annHere;
const shipped = new Promise((resolve) =>
  ann.private("orders.1").listen("OrderShipped", (e) => resolve(e)),
);
await sleep(200);
// Laravel's broadcaster names the event by its class.
await server.trigger("private-orders.1", "App\\Events\\OrderShipped", { id: 1 });
out.shipped = await shipped;

const bob = echo("bob");
const bobChat = bob.join("chat");
out.bob_here = await new Promise((resolve) => bobChat.here((users) => resolve(names(users))));
await sleep(200);
bobChat.whisper("typing", { by: "bob" });
await sleep(300);
bob.leave("chat");
await sleep(500);

ann.disconnect();
bob.disconnect();
clearTimeout(timer);
console.log(JSON.stringify(out));
