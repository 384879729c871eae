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
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';
import { startServer, CHROMIUM } from './harness.mjs';

/** A site: a page with a stylesheet, a classic script and a module script. */
export function makeSite(assets = 3) {
  const dir = mkdtempSync(join(tmpdir(), 'tidings-push-site-'));
  const tags = [];
  for (let i = 0; i < assets; i++) {
    if (i % 3 === 0) {
      writeFileSync(join(dir, `s${i}.css`), `.c${i} { color: #${(i * 97 % 4096).toString(16).padStart(3, '0')} }\n`.repeat(40));
      tags.push(`<link rel="stylesheet" href="/s${i}.css">`);
    } else if (i % 3 === 1) {
      writeFileSync(join(dir, `a${i}.js`), `window.__loaded = (window.__loaded || 0) + 1; // ${'x'.repeat(800)}\n`);
      tags.push(`<script src="/a${i}.js" defer></script>`);
    } else {
      writeFileSync(join(dir, `m${i}.mjs`), `window.__modules = (window.__modules || 0) + 1; // ${'y'.repeat(800)}\n`);
      tags.push(`<script type="module" src="/m${i}.mjs"></script>`);
    }
  }
  writeFileSync(join(dir, 'index.html'), `<!doctype html><html><head><meta charset="utf-8">${tags.join('\n')}</head><body><h1>page</h1></body></html>\n`);
  return dir;
}

/** A certificate for 127.0.0.1 and the base64 SHA-256 of its public key (what Chromium trusts). */
export function makeCert() {
  const dir = mkdtempSync(join(tmpdir(), 'tidings-push-cert-'));
  const cert = join(dir, 'cert.pem');
  const key = join(dir, 'key.pem');
  execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1',
    '-nodes', '-keyout', key, '-out', cert, '-days', '2', '-subj', '/CN=localhost',
    '-addext', 'subjectAltName=IP:127.0.0.1,DNS:localhost'], { stdio: 'ignore' });
  const pub = execFileSync('openssl', ['x509', '-in', cert, '-pubkey', '-noout']);
  const der = execFileSync('openssl', ['pkey', '-pubin', '-outform', 'der'], { input: pub });
  const spki = execFileSync('openssl', ['dgst', '-sha256', '-binary'], { input: der }).toString('base64');
  return { args: ['--tls-cert', cert, '--tls-key', key, '--tls-listen', '127.0.0.1:0'], spki, remove: () => rmSync(dir, { recursive: true, force: true }) };
}

export async function launch(extraArgs = []) {
  const profile = mkdtempSync(join(tmpdir(), 'tidings-chromium-push-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync', ...extraArgs],
  });
  return { context, close: async () => { await context.close().catch(() => {}); rmSync(profile, { recursive: true, force: true }); } };
}

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
