// What the browser tests share: headless Chromium (Debian's, driven by
// puppeteer-core) and a page in a browser profile of its own whose
// uncaught errors, and anything its Content-Security-Policy blocked, are
// collected for the test to check.

import puppeteer from "puppeteer-core";

const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";

export function launchBrowser() {
  return puppeteer.launch({
    executablePath: CHROMIUM,
    headless: true,
    // Root in CI containers: Chromium's sandbox needs user namespaces.
    args: ["--no-sandbox", "--disable-dev-shm-usage"],
  });
}

/** A page at `url` in a fresh profile; its errors go to `errors` as "name: ...". */
export async function openProfile(browser, url, name, errors) {
  const context = await browser.createBrowserContext();
  const page = await context.newPage();
  // Uncaught exceptions and rejections, and anything the page's
  // Content-Security-Policy blocked. (Not every console error: Chromium logs
  // refused connections, e.g. during a network drop, as errors.)
  page.on("pageerror", (error) => errors.push(`${name}: ${error.message}`));
  page.on("console", (message) => {
    if (message.text().startsWith("CSP violation")) errors.push(`${name}: ${message.text()}`);
  });
  await page.evaluateOnNewDocument(() => {
    document.addEventListener("securitypolicyviolation", (event) => {
      console.error(`CSP violation: ${event.violatedDirective} ${event.blockedURI}`);
    });
    // Every WebSocket the page opens: how many messages it sent before the
    // server's first answer (`window.__openings`, see `openings`). Our
    // listener is added before the page's, so it runs first.
    const Native = window.WebSocket;
    window.__openings = [];
    window.WebSocket = class extends Native {
      constructor(...args) {
        super(...args);
        const opening = { sentBeforeAnswer: 0, answered: false };
        window.__openings.push(opening);
        this.__opening = opening;
        this.addEventListener("message", () => {
          opening.answered = true;
        });
      }
      send(data) {
        if (!this.__opening.answered) this.__opening.sentBeforeAnswer += 1;
        super.send(data);
      }
    };
  });
  await page.setViewport({ width: 960, height: 600 });
  await page.goto(url);
  return page;
}

/** Waits until the page says it is connected. */
export function waitOnline(page, wait) {
  return page.waitForFunction(() => document.getElementById("status").dataset.state === "online", wait);
}

/**
 * Opens a conversation from the list. The list is drawn again whenever a
 * name, presence or unread count arrives, so an element handle found a
 * moment earlier can be detached by the time a click reaches it ("Node is
 * detached from document", "Node is either not clickable or not an
 * Element"): find and click in one step inside the page, waiting until
 * the entry is there.
 */
export function openConversation(page, selector, wait) {
  return page.waitForFunction(
    (wanted) => {
      const entry = document.querySelector(wanted);
      entry?.click();
      return entry !== null;
    },
    wait,
    selector,
  );
}

/** What `openProfile`'s hook saw of each WebSocket the current document opened. */
export function openings(page) {
  return page.evaluate(() => window.__openings);
}
