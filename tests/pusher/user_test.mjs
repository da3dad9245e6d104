// User authentication with pusher-js (the Node build) and Pusher's server
// SDK: two users sign in (`pusher:signin`, signed by the SDK's
// authenticateUser as an app's backend would), the SDK's sendToUser
// reaches only its user, and terminateUserConnections closes only that
// user's connection. Prints one JSON object; tests/pusher_js.rs checks it.
//
//   node user_test.mjs HOST PORT APP_ID KEY SECRET
import PusherServer from "pusher";
import { client as pusherClient, deadline, sleep } from "./common.mjs";

const [host, port, appId, key, secret] = process.argv.slice(2);
const server = new PusherServer({ appId, key, secret, host, port, useTLS: false });
const out = {};
const timer = deadline(out, 15000);

async function signedIn(user) {
  const noChannels = () => {
    throw new Error("no channel is authorized here");
  };
  const client = pusherClient(key, host, port, noChannels, {
    userAuthentication: {
      customHandler: ({ socketId }, callback) => {
        callback(null, server.authenticateUser(socketId, { id: user, name: user.toUpperCase() }));
      },
    },
  });
  const record = { got: [], states: [], errors: [] };
  out[user] = record;
  client.connection.bind("state_change", (s) => record.states.push(s.current));
  client.connection.bind("error", (e) => record.errors.push(e?.data?.code ?? e?.error?.data?.code ?? "?"));
  client.user.bind("hello", (data) => record.got.push(data));
  await new Promise((resolve) => client.connection.bind("connected", resolve));
  client.signin();
  await client.user.signinDonePromise;
  record.user_data = client.user.user_data;
  return client;
}

const ann = await signedIn("ann");
const bob = await signedIn("bob");
await sleep(300); // each user's channel subscribed
await server.sendToUser("ann", "hello", { to: "ann" });
await server.sendToUser("bob", "hello", { to: "bob" });
await sleep(300);
out.terminate = (await server.terminateUserConnections("ann")).status;
await sleep(1000);
out.ann_state = ann.connection.state;
out.bob_state = bob.connection.state;
ann.disconnect();
bob.disconnect();
clearTimeout(timer);
console.log(JSON.stringify(out));
