// Real-browser test of permessage-deflate: Chromium's own WebSocket offers
// the extension, ringcast (with [websocket] compression = true) agrees, a
// long push published over HTTP arrives compressed and whole, and a long
// message the page sends (which Chromium compresses) is read and comes
// back as a push.
//
//   node tests/browser/ws_deflate_test.mjs http://127.0.0.1:PORT
//
// Exits non-zero with a message on any failure, and after 60 s in any case.

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
  console.error(`websocket compression test FAILED: ${message}`);
  process.exit(1);
}
setTimeout(() => fail(`hard timeout of ${HARD_TIMEOUT_MS / 1000} s reached`), HARD_TIMEOUT_MS).unref();

const base = process.argv[2];
if (!/^http:\/\/127\.0\.0\.1:\d+$/.test(base || "")) fail("usage: node ws_deflate_test.mjs http://127.0.0.1:PORT");
const { chromium } = await import("playwright-core").catch((e) =>
  fail(`playwright-core is not installed (${e.message}): run ./scripts/test.sh`),
);
const log = (line) => console.log(`  ${line}`);

async function run(browser) {
  const context = await browser.newContext();
  const allowed = new URL(base).host;
  await context.route("**/*", (route) =>
    new URL(route.request().url()).host === allowed ? route.continue() : route.abort(),
  );
  const page = await context.newPage();
  const loaded = await page.goto(`${base}/`, { waitUntil: "load", timeout: STEP_TIMEOUT_MS });
  if (loaded?.status() !== 200) throw new Error(`GET / answered ${loaded?.status()}`);
  const extensions = await page.evaluate(
    () =>
      new Promise((resolve, reject) => {
        const ws = new WebSocket(`ws://${location.host}/ws`);
        window.pushes = [];
        ws.onmessage = (e) => {
          const message = JSON.parse(e.data);
          if (message.type === "subscribed") window.subscribed = true;
          if (message.type === "push") window.pushes.push(message);
        };
        ws.onerror = () => reject(new Error("websocket error"));
        ws.onopen = () => {
          ws.send(JSON.stringify({ type: "subscribe", topic: "zip" }));
          window.ws = ws;
          resolve(ws.extensions);
        };
      }),
  );
  if (!extensions.includes("permessage-deflate")) throw new Error(`extensions: ${JSON.stringify(extensions)}`);
  log(`negotiated: ${extensions}`);
  await page.waitForFunction(() => window.subscribed === true, null, { timeout: STEP_TIMEOUT_MS });

  const items = Array.from({ length: 100 }, (_, i) => `item ${i} of a long list that compresses well`);
  const response = await fetch(`${base}/publish`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ topic: "zip", event: "list", payload: items }),
  });
  if (response.status !== 202 && response.status !== 200) throw new Error(`publish answered ${response.status}`);
  await page.waitForFunction(() => window.pushes.length === 1, null, { timeout: STEP_TIMEOUT_MS });
  const first = await page.evaluate(() => window.pushes[0]);
  if (JSON.stringify(first.payload) !== JSON.stringify(items)) throw new Error(`push: ${JSON.stringify(first)}`);
  log("a compressed push arrived whole");

  const text = "y".repeat(3000);
  await page.evaluate((text) => {
    window.ws.send(JSON.stringify({ type: "message", topic: "zip", event: "mine", payload: text }));
  }, text);
  await page.waitForFunction(() => window.pushes.length === 2, null, { timeout: STEP_TIMEOUT_MS });
  const mine = await page.evaluate(() => window.pushes[1]);
  if (mine.event !== "mine" || mine.payload !== text) throw new Error(`own message: ${JSON.stringify(mine).slice(0, 200)}`);
  log("the page's compressed message was read and came back");
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
console.log("websocket compression test passed");
process.exit(0);
