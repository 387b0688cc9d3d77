#!/usr/bin/env node
// Headless check of the web page: open URL in Chromium, wait for the page to finish, save a
// screenshot, print what the page shows as JSON ({status, message, tokens, text}).
//
//   node js/web/check.mjs 'http://127.0.0.1:8000/web/?autorun=1' shot.png [--browser /usr/bin/chromium]
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const [url, screenshot] = process.argv.slice(2).filter((a) => !a.startsWith('--'));
const browserFlag = process.argv.indexOf('--browser');
const executablePath = browserFlag > 0 ? process.argv[browserFlag + 1] : '/usr/bin/chromium';
if (!url || !screenshot) {
  console.error('usage: node check.mjs URL SCREENSHOT.png [--browser /usr/bin/chromium]');
  process.exit(2);
}

const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'prefix-export-chromium-'));
const context = await chromium.launchPersistentContext(profile, {
  executablePath,
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync'],
  viewport: { width: 1000, height: 800 },
});
const consoleLines = [];
try {
  const page = context.pages()[0] || (await context.newPage());
  page.on('console', (message) => consoleLines.push(`${message.type()}: ${message.text()}`));
  page.on('pageerror', (error) => consoleLines.push(`pageerror: ${error.message}`));
  await page.goto(url);
  await page.waitForFunction(() => ['done', 'error'].includes(document.body.dataset.status), null, { timeout: 120000 });
  await page.screenshot({ path: screenshot, fullPage: true });
  const result = await page.evaluate(() => ({
    status: document.body.dataset.status,
    message: document.getElementById('status').textContent,
    tokens: document.getElementById('tokens').textContent,
    text: document.getElementById('text').textContent,
  }));
  console.log(JSON.stringify({ ...result, console: consoleLines, browser: context.browser()?.version() ?? null }));
} finally {
  await context.close();
  fs.rmSync(profile, { recursive: true, force: true });
}
