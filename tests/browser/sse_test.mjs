// Real-browser test of /sse: Chromium's own EventSource, no SDK.
//
//   node tests/browser/sse_test.mjs http://127.0.0.1:PROXY http://127.0.0.1:SERVER CONTROL_PORT
//
// The page is loaded through a proxy (tests/common/cut_proxy.rs) whose
// connections the test cuts by connecting to CONTROL_PORT. An EventSource
// on `/sse?topic=s:web&topic=plain` receives named events; publications
// are made over HTTP straight to the server. After 3 stream publications
// the connection is cut, 3 more are published while the page is offline,
// and the browser must reconnect by itself (Last-Event-ID) and show all 6
// exactly once, in order, then a live 7th; plain-topic events arrive too.
// Exits non-zero with a message on any failure, and after 60 s in any case.

import { connect } from "node:net";

const HARD_TIMEOUT_MS = 60_000;
const STEP_TIMEOUT_MS = 15_000;
const CHROMIUM = process.env.RINGCAST_CHROMIUM || "/usr/bin/chromium";
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
  console.error(`event source test FAILED: ${message}`);
  process.exit(1);
}
setTimeout(() => fail(`hard timeout of ${HARD_TIMEOUT_MS / 1000} s reached`), HARD_TIMEOUT_MS).unref();

const [pageBase, serverBase, controlPort] = process.argv.slice(2);
const loopback = /^http:\/\/127\.0\.0\.1:\d+$/;
if (!loopback.test(pageBase || "") || !loopback.test(serverBase || "") || !/^\d+$/.test(controlPort || "")) {
  fail("usage: node sse_test.mjs http://127.0.0.1:PROXY http://127.0.0.1:SERVER CONTROL_PORT");
}
const { chromium } = await import("playwright-core").catch((e) =>
  fail(`playwright-core is not installed (${e.message}): run ./scripts/test.sh`),
);
const log = (line) => console.log(`  ${line}`);

async function publish(topic, event, payload) {
  const response = await fetch(`${serverBase}/publish`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ topic, event, payload }),
  });
  if (response.status !== 200 && response.status !== 202) {
    throw new Error(`publish to ${topic} answered ${response.status}: ${await response.text()}`);
  }
}

function cutConnections() {
  return new Promise((resolve, reject) => {
    const socket = connect(Number(controlPort), "127.0.0.1", () => {
      socket.end();
      resolve();
    });
    socket.on("error", reject);
  });
}

async function run(browser) {
  const context = await browser.newContext();
  const allowed = new URL(pageBase).host;
  await context.route("**/*", (route) => {
    const url = new URL(route.request().url());
    return url.host === allowed ? route.continue() : route.abort();
  });
  const page = await context.newPage();
  const problems = [];
  page.on("pageerror", (err) => problems.push(`page error: ${err.message}`));
  const loaded = await page.goto(`${pageBase}/`, { waitUntil: "load", timeout: STEP_TIMEOUT_MS });
  if (loaded?.status() !== 200) throw new Error(`GET / answered ${loaded?.status()}`);

  await page.evaluate(() => {
    window.log = { ticks: [], notes: [], subscribed: [], opens: 0, errors: 0, ids: [] };
    const source = new EventSource("/sse?topic=s:web&topic=plain");
    source.onopen = () => window.log.opens++;
    source.onerror = () => window.log.errors++;
    source.addEventListener("tick", (e) => {
      const data = JSON.parse(e.data);
      window.log.ticks.push(data.payload);
      window.log.ids.push(e.lastEventId);
    });
    source.addEventListener("note", (e) => window.log.notes.push(JSON.parse(e.data).payload));
    source.addEventListener("ringcast.subscribed", (e) => window.log.subscribed.push(JSON.parse(e.data)));
    window.source = source;
  });
  const state = () => page.evaluate(() => window.log);
  const until = async (what, test) => {
    await page
      .waitForFunction(test, null, { timeout: STEP_TIMEOUT_MS, polling: 50 })
      .catch(async () => {
        throw new Error(`never saw ${what}: ${JSON.stringify(await state())}`);
      });
  };

  await until("both topics subscribed", () => window.log.subscribed.length === 2);
  for (let i = 1; i <= 3; i++) await publish("s:web", "tick", i);
  await publish("plain", "note", "hello");
  await until("3 ticks and a note", () => window.log.ticks.length === 3 && window.log.notes.length === 1);
  const before = await state();
  log(`connected: ticks ${JSON.stringify(before.ticks)}, last id ${before.ids.at(-1)}`);
  if (!/^3\.[0-9a-f]+,$/.test(before.ids.at(-1))) throw new Error(`unexpected id ${before.ids.at(-1)}`);

  await cutConnections();
  await until("the cut to be noticed", () => window.log.errors >= 1);
  for (let i = 4; i <= 6; i++) await publish("s:web", "tick", i);
  log("connection cut; 3 published while offline");

  await until("the browser to reconnect", () => window.log.opens >= 2 && window.log.subscribed.length >= 4);
  await until("the missed ticks", () => window.log.ticks.length >= 6);
  await publish("s:web", "tick", 7);
  await until("the live tick", () => window.log.ticks.includes(7));
  await new Promise((resolve) => setTimeout(resolve, 300));
  const after = await state();
  const want = [1, 2, 3, 4, 5, 6, 7];
  if (JSON.stringify(after.ticks) !== JSON.stringify(want)) {
    throw new Error(`ticks ${JSON.stringify(after.ticks)}, want ${JSON.stringify(want)} (once each, in order)`);
  }
  const resumed = after.subscribed.slice(2).find((s) => s.topic === "s:web");
  if (resumed?.recovered !== true) throw new Error(`the reconnect did not recover: ${JSON.stringify(after.subscribed)}`);
  log(`reconnected by itself (${after.opens} opens), recovered: ticks ${JSON.stringify(after.ticks)}`);
  await page.evaluate(() => window.source.close());
  if (problems.length > 0) throw new Error(problems.join("\n"));
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
console.log("event source test passed");
process.exit(0);
