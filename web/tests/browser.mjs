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
  });
  await page.setViewport({ width: 960, height: 600 });
  await page.goto(url);
  return page;
}

/** Waits until the page says it is connected. */
export function waitOnline(page, wait) {
  return page.waitForFunction(() => document.getElementById("status").dataset.state === "online", wait);
}
