// What the Pusher test scripts share: a pusher-js client (Node build)
// pointed at a ringcast node, its channel authorizations signed by the
// test's backend; a hard deadline that prints what was seen so far; sleep.
import Pusher from "pusher-js";

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Prints `out` and fails after `ms`: a script never hangs its test.
export function deadline(out, ms) {
  return setTimeout(() => {
    out.timeout = true;
    console.log(JSON.stringify(out));
    process.exit(1);
  }, ms);
}

// A pusher-js client of app `key` at HOST:PORT over plain WebSocket;
// `authorize(socketId, channelName)` returns a channel's authorization as
// a backend's auth endpoint would; `options` adds to or overrides the
// client's options.
export function client(key, host, port, authorize, options = {}) {
  return new Pusher(key, {
    wsHost: host,
    wsPort: Number(port),
    forceTLS: false,
    enabledTransports: ["ws"],
    cluster: "unused",
    disableStats: true,
    channelAuthorization: {
      customHandler: ({ socketId, channelName }, callback) =>
        callback(null, authorize(socketId, channelName)),
    },
    ...options,
  });
}
