// Real-browser test of ringcast's built-in chat page (`GET /`).
//
//   node tests/browser/chat_test.mjs http://127.0.0.1:PORT
//
// Drives Debian's Chromium (/usr/bin/chromium, no browser download) through
// playwright-core: two separate browser contexts (alice and bob) join room
// `lobby`, exchange a message each way, and bob's page is saved as
// target/browser-chat.png. Exits non-zero with a message on any failure, and
// after 60 s in any case. Run ./scripts/test.sh once to install Chromium and
// the npm dependencies.

import { existsSync, mkdirSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const HARD_TIMEOUT_MS = 60_000;
const STEP_TIMEOUT_MS = 15_000;
const CHROMIUM = process.env.RINGCAST_CHROMIUM || "/usr/bin/chromium";
const HERE = dirname(fileURLToPath(import.meta.url));
const SCREENSHOT = resolve(HERE, "../../target/browser-chat.png");

// Exactly these flags (Playwright adds its own defaults, a pipe for the
// DevTools protocol and a fresh temporary --user-data-dir, removed on close).
// The resolver rule makes any host name other than the loopback one fail
// without a DNS query, so the browser cannot reach past 127.0.0.1.
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
  console.error(`browser chat test FAILED: ${message}`);
  process.exit(1);
}

const hardTimeout = setTimeout(() => {
  console.error(`browser chat test FAILED: hard timeout of ${HARD_TIMEOUT_MS / 1000} s reached`);
  process.exit(2);
}, HARD_TIMEOUT_MS);
hardTimeout.unref();

const base = process.argv[2];
if (!base || !/^http:\/\/127\.0\.0\.1:\d+\/?$/.test(base)) {
  fail(`usage: node chat_test.mjs http://127.0.0.1:PORT (got ${JSON.stringify(base)})`);
}
const baseUrl = base.replace(/\/$/, "");
const allowedOrigin = new URL(baseUrl).host;

if (!existsSync(CHROMIUM)) {
  fail(`${CHROMIUM} is missing: run ./scripts/test.sh (it installs Debian's chromium)`);
}
let chromium;
try {
  ({ chromium } = await import("playwright-core"));
} catch (e) {
  fail(`playwright-core is not installed (${e.message}): run ./scripts/test.sh (npm ci --prefix tests/browser)`);
}

function log(line) {
  console.log(`  ${line}`);
}

const problems = [];
let browser;

async function openUser(label) {
  const context = await browser.newContext({ viewport: { width: 900, height: 640 } });
  // Only the server under test may be contacted; anything else is a bug.
  await context.route("**/*", (route) => {
    const url = new URL(route.request().url());
    if ((url.protocol === "http:" || url.protocol === "ws:") && url.host === allowedOrigin) {
      return route.continue();
    }
    problems.push(`${label}: request outside the server under test: ${url.href}`);
    return route.abort();
  });
  const page = await context.newPage();
  page.on("pageerror", (err) => problems.push(`${label}: page error: ${err.message}`));
  page.on("console", (msg) => {
    if (msg.type() === "error") problems.push(`${label}: console error: ${msg.text()}`);
  });
  const response = await page.goto(`${baseUrl}/`, { waitUntil: "load", timeout: STEP_TIMEOUT_MS });
  if (!response || response.status() !== 200) {
    throw new Error(`${label}: GET / answered ${response ? response.status() : "nothing"}`);
  }
  return page;
}

async function describe(page) {
  return page
    .evaluate(() => ({
      status: document.querySelector("#status")?.textContent,
      online: document.querySelector("#online")?.textContent,
      messages: [...document.querySelectorAll("#messages .msg")].map((m) => m.textContent),
    }))
    .catch((e) => ({ unavailable: e.message }));
}

async function waitConnected(page, label) {
  await page
    .locator('#status[data-state="connected"]')
    .waitFor({ timeout: STEP_TIMEOUT_MS })
    .catch(async () => {
      throw new Error(`${label} never showed connected: ${JSON.stringify(await describe(page))}`);
    });
  await page
    .waitForFunction(() => !document.querySelector("#send").disabled, null, { timeout: STEP_TIMEOUT_MS })
    .catch(() => {
      throw new Error(`${label}: #send stayed disabled while connected`);
    });
}

async function expectMessage(page, label, text) {
  await page
    .locator("#messages .msg", { hasText: text })
    .first()
    .waitFor({ timeout: STEP_TIMEOUT_MS })
    .catch(async () => {
      throw new Error(`${label} never showed ${JSON.stringify(text)}: ${JSON.stringify(await describe(page))}`);
    });
}

async function run() {
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: CHROMIUM_ARGS,
    timeout: STEP_TIMEOUT_MS,
  });
  log(`chromium ${browser.version()}`);

  const alice = await openUser("alice");
  const bob = await openUser("bob");

  const defaultName = await alice.locator("#name").inputValue();
  if (!/^guest-\d{4}$/.test(defaultName)) throw new Error(`default name is ${JSON.stringify(defaultName)}, not guest-NNNN`);
  const defaultRoom = await alice.locator("#room").inputValue();
  if (defaultRoom !== "lobby") throw new Error(`default room is ${JSON.stringify(defaultRoom)}, not lobby`);
  log(`pages loaded (default name ${defaultName}, room ${defaultRoom})`);

  for (const [page, name] of [[alice, "alice"], [bob, "bob"]]) {
    await page.locator("#name").fill(name);
    await page.locator("#room").fill("lobby");
    await page.locator("#room").press("Enter");
  }
  await waitConnected(alice, "alice");
  await waitConnected(bob, "bob");
  log("both pages connected to room lobby");

  // Markup in a message must be shown as text, never parsed.
  const hello = `hello bob <b id="injected">&amp;</b> ${Date.now()}`;
  await alice.locator("#text").fill(hello);
  await alice.locator("#send").click();
  await expectMessage(bob, "bob", `alice: ${hello}`);
  await expectMessage(alice, "alice", `alice: ${hello}`);
  if ((await alice.locator("#text").inputValue()) !== "") throw new Error("alice's input was not cleared after Send");
  for (const [page, label] of [[alice, "alice"], [bob, "bob"]]) {
    if ((await page.locator("#injected").count()) !== 0) throw new Error(`${label}'s page rendered message HTML`);
  }
  log("alice -> bob delivered (and echoed to alice), markup shown as text");

  const reply = `hi alice, got it ${Date.now()}`;
  await bob.locator("#text").fill(reply);
  await bob.locator("#text").press("Enter");
  await expectMessage(alice, "alice", `bob: ${reply}`);
  await expectMessage(bob, "bob", `bob: ${reply}`);
  log("bob -> alice delivered (Enter sends)");

  for (const [page, label] of [[alice, "alice"], [bob, "bob"]]) {
    const errors = await page.locator("#messages .msg.error").allTextContents();
    if (errors.length > 0) throw new Error(`${label}'s page shows errors: ${JSON.stringify(errors)}`);
  }

  const online = bob.locator("#online");
  if (await online.isVisible()) {
    const text = await online.textContent();
    if (!/^\d+ online$/.test(text.trim())) throw new Error(`#online shows ${JSON.stringify(text)}`);
    log(`presence: ${text.trim()}`);
  } else {
    log("presence: not offered by this build (count hidden)");
  }

  mkdirSync(dirname(SCREENSHOT), { recursive: true });
  await bob.screenshot({ path: SCREENSHOT });
  log(`screenshot of bob's page: ${SCREENSHOT}`);

  // Changing room leaves the old one: bob moves to `side`, alice follows.
  await bob.locator("#room").fill("side");
  await bob.locator("#room").press("Enter");
  await waitConnected(bob, "bob");
  await alice.locator("#room").fill("side");
  await alice.locator("#room").press("Enter");
  await waitConnected(alice, "alice");
  const side = `over here ${Date.now()}`;
  await alice.locator("#text").fill(side);
  await alice.locator("#text").press("Enter");
  await expectMessage(bob, "bob", `alice: ${side}`);
  log("room change: both moved to room side and talk there");

  if (problems.length > 0) throw new Error(problems.join("\n"));
}

let error = null;
try {
  await run();
} catch (e) {
  error = e;
}
await browser?.close().catch(() => {});
if (error) {
  const extra = problems.filter((p) => !error.message.includes(p));
  fail([error.message, ...extra].join("\n"));
}
console.log("browser chat test passed");
process.exit(0);
