// pusher-js's browser build in a real browser (Debian's Chromium through
// playwright-core) against a ringcast node with a Pusher app: two tabs of
// one user (ann) and one of another (bob) join a presence channel (ann is
// one member however many tabs she has), bob's client event reaches both
// of ann's tabs and not his own, and an event triggered by Pusher's server
// SDK reaches every tab. The authorizations are signed by the SDK in this
// Node process, handed to the page as a backend's auth endpoint would.
//
//   node tests/browser/pusher_test.mjs http://127.0.0.1:PORT APP_ID KEY SECRET
import { createRequire } from "node:module";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const HARD_TIMEOUT_MS = 60_000;
const STEP_TIMEOUT_MS = 15_000;
const CHROMIUM = process.env.RINGCAST_CHROMIUM || "/usr/bin/chromium";
const HERE = dirname(fileURLToPath(import.meta.url));
const PUSHER_DIR = resolve(HERE, "../pusher/node_modules");
const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
];

function fail(message) {
  console.error(`browser pusher test FAILED: ${message}`);
  process.exit(1);
}
setTimeout(() => fail(`hard timeout of ${HARD_TIMEOUT_MS / 1000} s reached`), HARD_TIMEOUT_MS).unref();

const [base, appId, key, secret] = process.argv.slice(2);
if (!/^http:\/\/127\.0\.0\.1:\d+$/.test(base || "") || !secret) {
  fail("usage: node pusher_test.mjs http://127.0.0.1:PORT APP_ID KEY SECRET");
}
const { chromium } = await import("playwright-core").catch((e) =>
  fail(`playwright-core is not installed (${e.message}): run ./scripts/test.sh`),
);
const PusherServer = createRequire(import.meta.url)(`${PUSHER_DIR}/pusher`);
const { hostname: host, port } = new URL(base);
const server = new PusherServer({ appId, key, secret, host, port, useTLS: false });
const log = (line) => console.log(`  ${line}`);

// A tab of `user`, subscribed to presence-room with pusher-js's browser
// build; what it sees is in window.log.
async function tab(browser, user) {
  const context = await browser.newContext();
  await context.route("**/*", (route) =>
    new URL(route.request().url()).host === new URL(base).host ? route.continue() : route.abort(),
  );
  const page = await context.newPage();
  const problems = [];
  page.on("pageerror", (err) => problems.push(err.message));
  await page.exposeFunction("authorize", (socketId, channel) =>
    server.authorizeChannel(socketId, channel, { user_id: user, user_info: { name: user } }),
  );
  await page.goto(`${base}/`, { waitUntil: "load", timeout: STEP_TIMEOUT_MS });
  await page.addScriptTag({ path: `${PUSHER_DIR}/pusher-js/dist/web/pusher.min.js` });
  await page.evaluate(
    ([key, host, port]) => {
      window.log = { members: null, added: [], removed: [], typing: [], news: [] };
      const pusher = new Pusher(key, {
        wsHost: host,
        wsPort: Number(port),
        forceTLS: false,
        enabledTransports: ["ws"],
        cluster: "unused",
        disableStats: true,
        channelAuthorization: {
          customHandler: ({ socketId, channelName }, callback) =>
            window.authorize(socketId, channelName).then((auth) => callback(null, auth)),
        },
      });
      const room = pusher.subscribe("presence-room");
      room.bind("pusher:subscription_succeeded", (members) => {
        window.log.members = { count: members.count, me: members.me.id };
      });
      room.bind("pusher:member_added", (m) => window.log.added.push(m.id));
      room.bind("pusher:member_removed", (m) => window.log.removed.push(m.id));
      room.bind("client-typing", (data, meta) => window.log.typing.push(`${data.by} as ${meta.user_id}`));
      room.bind("news", (data) => window.log.news.push(data.text));
      window.room = room;
      window.pusher = pusher;
    },
    [key, host, port],
  );
  const state = () => page.evaluate(() => window.log);
  const until = async (what, test) =>
    page.waitForFunction(test, null, { timeout: STEP_TIMEOUT_MS, polling: 50 }).catch(async () => {
      throw new Error(`${user} never saw ${what}: ${JSON.stringify(await state())}`);
    });
  return { page, state, until, problems, context };
}

async function run(browser) {
  const ann1 = await tab(browser, "ann");
  await ann1.until("subscribed", () => window.log.members !== null);
  const ann2 = await tab(browser, "ann");
  await ann2.until("subscribed", () => window.log.members !== null);
  const bob = await tab(browser, "bob");
  await bob.until("subscribed", () => window.log.members !== null);
  const members = await bob.state();
  if (JSON.stringify(members.members) !== JSON.stringify({ count: 2, me: "bob" })) {
    throw new Error(`bob's members: ${JSON.stringify(members.members)} (ann's two tabs are one member)`);
  }
  await ann1.until("bob added", () => window.log.added.includes("bob"));
  log("two tabs of ann and one of bob: 2 members");

  await bob.page.evaluate(() => window.room.trigger("client-typing", { by: "bob" }));
  await ann1.until("bob typing", () => window.log.typing.length === 1);
  await ann2.until("bob typing", () => window.log.typing.length === 1);
  await server.trigger("presence-room", "news", { text: "hello, tabs" });
  for (const t of [ann1, ann2, bob]) await t.until("the news", () => window.log.news.length === 1);
  const seen = await Promise.all([ann1, ann2, bob].map((t) => t.state()));
  if (seen[2].typing.length !== 0) throw new Error("bob got his own client event back");
  if (seen[0].typing[0] !== "bob as bob") throw new Error(`typing: ${seen[0].typing}`);
  if (seen[1].added.length !== 1 || seen[0].added.length !== 1) {
    throw new Error(`member_added: ${JSON.stringify(seen.map((s) => s.added))} (ann's second tab is no new member)`);
  }
  log("client event to the others only; the SDK's trigger to every tab");

  await ann2.context.close();
  await new Promise((r) => setTimeout(r, 500));
  if ((await bob.state()).removed.length !== 0) throw new Error("ann removed while a tab of hers is open");
  await ann1.context.close();
  await bob.until("ann removed", () => window.log.removed.includes("ann"));
  log("ann removed when her last tab closed");
  for (const t of [ann1, ann2, bob]) if (t.problems.length > 0) throw new Error(t.problems.join("\n"));
}

const browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: CHROMIUM_ARGS, timeout: STEP_TIMEOUT_MS });
log(`chromium ${browser.version()}`);
let error = null;
try {
  await run(browser);
} catch (e) {
  error = e;
}
await browser.close().catch(() => {});
if (error) fail(error.message);
console.log("browser pusher test passed");
process.exit(0);
