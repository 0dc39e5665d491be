// The chat page keeps the order its user typed, even when the server
// refuses some sends for now: against a `pingme serve` that allows few
// frames per second (PINGME_SLOW_URL, started by web/test.sh), carol types
// a burst of lines into her conversation with dave, faster than that rate.
// Some sends are refused (RATE_LIMITED) and retried; each line must still
// take its seq in the order typed, on her page and on dave's. Every wait
// is on a DOM condition with a generous bound; nothing sleeps.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { launchBrowser, openConversation, openProfile, waitOnline } from "./browser.mjs";

const BASE = process.env.PINGME_SLOW_URL;
const WAIT = { timeout: 120_000 };
const PASSWORD = "correct horse battery";
const LINES = 20;

assert.ok(BASE, "set PINGME_SLOW_URL to a pingme serve with a low message rate (web/test.sh does)");

let browser;
const pageErrors = [];

async function register(name) {
  const page = await openProfile(browser, `${BASE}/`, name, pageErrors);
  await page.waitForSelector("#signin:not([hidden])", WAIT);
  await page.type("#username", name);
  await page.type("#password", PASSWORD);
  await page.click("#register");
  await page.waitForSelector("#app:not([hidden])", WAIT);
  await waitOnline(page, WAIT);
  return page;
}

/** The stored messages shown, as [seq, text], once none is pending and `last` is shown. */
async function storedMessages(page, last) {
  await page.waitForFunction(
    (wanted) =>
      document.querySelector("#messages .message.pending") === null &&
      [...document.querySelectorAll("#messages .message .body")].some((body) => body.textContent === wanted),
    WAIT,
    last,
  );
  return page.$$eval("#messages .message", (rows) =>
    rows.map((row) => [row.dataset.seq, row.querySelector(".body").textContent]),
  );
}

before(async () => {
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
});

test("a burst of lines typed faster than the server's rate keeps its typed order", async () => {
  const carol = await register("carol");
  const dave = await register("dave");
  await carol.type("#new-chat-user", "dave");
  await carol.click("#new-chat button");
  await carol.waitForFunction(() => document.getElementById("chat-title").textContent === "dave", WAIT);

  const typed = [];
  for (let n = 1; n <= LINES; n++) {
    typed.push(`burst ${n}`);
    await carol.type("#message-input", `burst ${n}`);
    await carol.keyboard.press("Enter");
  }
  const expected = typed.map((text, i) => [String(i + 1), text]);
  assert.deepEqual(await storedMessages(carol, typed.at(-1)), expected);
  assert.equal(await carol.$("#messages .message .receipt.failed"), null);

  await openConversation(dave, "#conversations .conversation", WAIT);
  assert.deepEqual(await storedMessages(dave, typed.at(-1)), expected);
});

test("no script errors on either page", () => {
  assert.deepEqual(pageErrors, []);
});
