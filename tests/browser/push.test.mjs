// Early Hints in a real browser: Chromium loads a page over TLS + h2 from `--static DIR`, and
// its timing shows the 103 (`firstInterimResponseStart`) and every hinted asset delivered from
// what the hints fetched (`deliveryType` "cache" on a fresh profile: Chromium hands the page
// the responses its Early Hints preloads already hold; `initiatorType` "early-hints" is not
// reliably set, as Chromium's own docs say). With `--push off` neither shows.
//
// Chromium ignores Early Hints on a navigation with a certificate error, so the certificate
// is made here (openssl) and trusted by its key's hash (--ignore-certificate-errors-spki-list)
// rather than by ignoring errors. Chromium accepts no server pushes (since version 106): push
// is for other clients (crates/tidings-server/tests/push_clients.rs).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { rmSync } from 'node:fs';
import { startServer } from './harness.mjs';
import { makeSite, makeCert, launch } from './pushsite.mjs';

/** How the page's subresources were delivered: name → deliveryType, the 103's time, the protocol. */
async function entries(page) {
  return page.evaluate(() => ({
    protocol: performance.getEntriesByType('navigation')[0].nextHopProtocol,
    interim: performance.getEntriesByType('navigation')[0].firstInterimResponseStart,
    resources: Object.fromEntries(performance.getEntriesByType('resource')
      .map((e) => [new URL(e.name).pathname, e.deliveryType])
      // The browser asks for the favicon on its own (the built-in one answers).
      .filter(([path]) => path !== '/favicon.ico')),
  }));
}

test('Chromium over TLS + h2 takes the hinted assets from what the 103 Early Hints fetched', async () => {
  const site = makeSite(3);
  const cert = makeCert();
  const server = await startServer(['--static', site, ...cert.args]);
  const browser = await launch([`--ignore-certificate-errors-spki-list=${cert.spki}`]);
  try {
    const page = await browser.context.newPage();
    await page.goto(`${server.httpsUrl}/`, { waitUntil: 'load' });
    const got = await entries(page);
    assert.equal(got.protocol, 'h2');
    assert.ok(got.interim > 0, `the 103 arrived: ${JSON.stringify(got)}`);
    assert.deepEqual(got.resources, { '/s0.css': 'cache', '/a1.js': 'cache', '/m2.mjs': 'cache' },
      'each hinted asset came from the Early Hints preloads (a fresh profile has no other cache)');
    assert.equal(await page.evaluate(() => window.__loaded + window.__modules), 2, 'the hinted scripts ran once each');
  } finally {
    await browser.close();
    await server.stop();
    rmSync(site, { recursive: true, force: true });
    cert.remove();
  }
});

test('with --push off the same page is fetched by the parser alone', async () => {
  const site = makeSite(3);
  const cert = makeCert();
  const server = await startServer(['--static', site, '--push', 'off', ...cert.args]);
  const browser = await launch([`--ignore-certificate-errors-spki-list=${cert.spki}`]);
  try {
    const page = await browser.context.newPage();
    await page.goto(`${server.httpsUrl}/`, { waitUntil: 'load' });
    const got = await entries(page);
    assert.equal(got.protocol, 'h2');
    assert.equal(got.interim, 0, 'no 103');
    assert.deepEqual(got.resources, { '/s0.css': '', '/a1.js': '', '/m2.mjs': '' });
  } finally {
    await browser.close();
    await server.stop();
    rmSync(site, { recursive: true, force: true });
    cert.remove();
  }
});
