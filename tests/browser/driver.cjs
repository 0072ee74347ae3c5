// Drives headless Chromium for the integration tests, one command per
// line on stdin, one JSON answer per line on stdout:
//   {"do": "open", "url": U}               a new page at U
//   {"do": "login", "token": T}            types T in the sign-in form and submits it
//   {"do": "wait", "js": E, "timeout_ms": N} until expression E is truthy; answers its value
//   {"do": "eval", "js": E}                answers E's value
//   {"do": "screenshot", "path": P, "full_page": B}  as PNG: the whole page, or what the window shows
//   {"do": "close"}
// The browser is Debian's Chromium; playwright-core comes from
// PLAYWRIGHT_CORE (the path `make up` installed it to).
'use strict';

const { chromium } = require(process.env.PLAYWRIGHT_CORE || 'playwright-core');
const readline = require('readline');

// Chromium's own calls home are refused on a closed network: turned off.
const ARGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
  '--disable-component-update', '--disable-sync'];

let browser = null;
let page = null;
const errors = [];

async function run(command) {
  switch (command.do) {
    case 'open':
      browser = browser || await chromium.launch({ executablePath: process.env.CHROMIUM || '/usr/bin/chromium', args: ARGS });
      page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
      page.on('pageerror', (error) => errors.push(String(error)));
      // A refused policy or a script error; a 401 the page handles is no error.
      page.on('console', (message) => {
        if (message.type() === 'error' && !message.text().startsWith('Failed to load resource')) errors.push(message.text());
      });
      await page.goto(command.url);
      return null;
    case 'login':
      await page.fill('#token', command.token);
      await page.click('#login-form button');
      return null;
    case 'wait': {
      // Polled from here: Playwright's own waitForFunction evaluates the
      // expression in the page with eval, which the page's policy forbids.
      const deadline = Date.now() + (command.timeout_ms || 30000);
      let value;
      while (!(value = await page.evaluate(command.js))) {
        if (Date.now() > deadline) throw new Error('timed out; last value: ' + JSON.stringify(value));
        await new Promise((resolve) => setTimeout(resolve, 250));
      }
      return value;
    }
    case 'eval':
      return await page.evaluate(command.js);
    case 'screenshot':
      await page.screenshot({ path: command.path, fullPage: command.full_page !== false });
      return command.path;
    case 'close':
      if (browser) await browser.close();
      return null;
    default:
      throw new Error('unknown command ' + command.do);
  }
}

const lines = readline.createInterface({ input: process.stdin });
lines.on('line', async (line) => {
  lines.pause();
  let answer;
  try {
    answer = { ok: true, value: await run(JSON.parse(line)), page_errors: errors.splice(0) };
  } catch (error) {
    answer = { ok: false, error: String(error && error.message || error).split('\n')[0], page_errors: errors.splice(0) };
  }
  process.stdout.write(JSON.stringify(answer) + '\n');
  lines.resume();
});
lines.on('close', async () => { if (browser) await browser.close(); });
