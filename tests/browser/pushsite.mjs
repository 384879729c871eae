// Shared by tests/browser/push.test.mjs and bench/push/pageload.mjs: a static site of N
// assets, a certificate Chromium trusts by its key's hash, and a Chromium that trusts it.

import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';
import { CHROMIUM } from './harness.mjs';

/** A site: a page with `assets` subresources, in turn a stylesheet, a classic script, a module. */
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

