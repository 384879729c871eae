// The most common SSE complaint, shown both ways in a real browser: over HTTP/1.1 Chromium
// opens at most 6 connections per origin, so a 7th EventSource never connects; over TLS with
// ALPN h2 every EventSource of the page shares one connection and all 10 receive.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';
import { startServer, CHROMIUM } from './harness.mjs';

async function launch() {
  const profile = mkdtempSync(join(tmpdir(), 'tidings-chromium-tls-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    // The server's certificate is generated at start (--tls-self-signed).
    ignoreHTTPSErrors: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  return { context, close: async () => { await context.close().catch(() => {}); rmSync(profile, { recursive: true, force: true }); } };
}

/** Opens N EventSources on the page and returns how many opened and received within `ms`. */
async function tenEventSources(page, base, ms) {
  return page.evaluate(async ({ base, ms }) => {
    const opened = new Set();
    const received = new Set();
    const sources = [];
    for (let i = 0; i < 10; i++) {
      const es = new EventSource(`${base}/sse/many${i}`);
      es.onopen = () => opened.add(i);
      es.onmessage = () => received.add(i);
      sources.push(es);
    }
    const until = Date.now() + ms;
    while (opened.size < 10 && Date.now() < until) await new Promise((r) => setTimeout(r, 50));
    window.__sources = sources;
    window.__received = received;
    return opened.size;
  }, { base, ms });
}

test('over TLS with h2 ten EventSources on one page all connect and receive', async () => {
  const server = await startServer(['--tls-self-signed', '--tls-listen', '127.0.0.1:0']);
  const browser = await launch();
  try {
    const https = server.httpsUrl;
    const page = await browser.context.newPage();
    await page.goto(`${https}/healthz`);
    const opened = await tenEventSources(page, https, 10000);
    assert.equal(opened, 10, 'every EventSource opened over one h2 connection');
    // Publish from the page too: the same h2 connection carries these requests beside the
    // ten open streams.
    const statuses = await page.evaluate(async (base) => {
      const out = [];
      for (let i = 0; i < 10; i++) {
        const res = await fetch(`${base}/publish/many${i}`, {
          method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ i }),
        });
        out.push(res.status);
      }
      return out;
    }, https);
    assert.deepEqual(statuses, Array(10).fill(200));
    await page.waitForFunction(() => window.__received.size === 10, null, { timeout: 10000 });
    const protocol = await page.evaluate(() => performance.getEntriesByType('navigation')[0].nextHopProtocol);
    assert.equal(protocol, 'h2');
  } finally {
    await browser.close();
    await server.stop();
  }
});

test('over plain HTTP/1.1 the browser stalls at six EventSources per origin', async () => {
  const server = await startServer([]);
  const browser = await launch();
  try {
    const page = await browser.context.newPage();
    await page.goto(`${server.url}/healthz`);
    const opened = await tenEventSources(page, server.url, 3000);
    assert.equal(opened, 6, 'Chromium caps HTTP/1.1 at 6 connections per origin');
  } finally {
    await browser.close();
    await server.stop();
  }
});
