// Shared by the browser tests and the screenshot script: start a real `tidings serve --demo`
// on a free port, and a headless Debian Chromium driven by playwright-core.
//
// Chromium flags: this machine has no network beyond loopback, so everything Chromium would
// fetch on its own (updates, sync, safe browsing, QUIC probes) is switched off; a fresh
// profile per launch keeps runs independent.

import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const HERE = dirname(fileURLToPath(import.meta.url));
export const ROOT = resolve(HERE, '../..');

export function tidingsBinary() {
  const candidates = [process.env.TIDINGS_BIN, join(ROOT, 'target/debug/tidings'), join(ROOT, 'target/release/tidings')];
  const bin = candidates.find((c) => c && existsSync(c));
  if (!bin) throw new Error('no tidings binary: run `cargo build -p tidings-cli` or set TIDINGS_BIN');
  return bin;
}

/**
 * Starts `tidings serve --demo` on a free loopback port; resolves to {url, httpsUrl, stop()}
 * once the listening lines are complete (a chunk of stderr can end mid-line: an address cut
 * at "127.0.0" is another host). With a TLS flag it also waits for the https line.
 */
export function startServer(args = []) {
  return new Promise((resolveStart, reject) => {
    const child = spawn(tidingsBinary(), ['serve', '--demo', '--listen', '127.0.0.1:0', ...args], {
      stdio: ['ignore', 'ignore', 'pipe'],
      env: { ...process.env, TIDINGS_LOG: process.env.TIDINGS_LOG || 'warn' },
    });
    let stderr = '';
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`tidings did not start in 15 s:\n${stderr}`));
    }, 15000);
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (chunk) => {
      stderr += chunk;
      const m = /tidings listening on (http:\/\/[0-9.:]+)\r?\n/.exec(stderr);
      const tls = /tidings listening on (https:\/\/[0-9.:]+)\r?\n/.exec(stderr);
      const wantsTls = args.some((a) => a.startsWith('--tls-self-signed') || a.startsWith('--tls-cert'));
      if (m && (tls || !wantsTls) && timer) {
        clearTimeout(timer);
        resolveStart({
          url: m[1],
          httpsUrl: tls ? tls[1] : undefined,
          child,
          logs: () => stderr,
          stop: () =>
            new Promise((r) => {
              if (child.exitCode !== null) return r();
              child.once('exit', () => r());
              child.kill('SIGTERM');
              setTimeout(() => child.kill('SIGKILL'), 5000).unref();
            }),
        });
      }
    });
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`tidings exited with ${code}:\n${stderr}`));
    });
  });
}

export const CHROMIUM = process.env.TIDINGS_CHROMIUM || '/usr/bin/chromium';

/** Launches headless Chromium with a throwaway profile; resolves to {browser, close()}. */
export async function launchBrowser() {
  const profile = mkdtempSync(join(tmpdir(), 'tidings-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
    viewport: { width: 1280, height: 860 },
  });
  return {
    context,
    async close() {
      await context.close().catch(() => {});
      rmSync(profile, { recursive: true, force: true });
    },
  };
}

/** A new page that records console errors and uncaught exceptions in `page.problems`. */
export async function newPage(context) {
  const page = await context.newPage();
  page.problems = [];
  page.on('console', (msg) => {
    if (msg.type() === 'error') page.problems.push(`console.error: ${msg.text()}`);
  });
  page.on('pageerror', (err) => page.problems.push(`uncaught: ${err.message}`));
  page.on('requestfailed', (req) => {
    const failure = req.failure()?.errorText || '';
    // Streams we cut on purpose end as aborted requests: not a page problem.
    if (!/ERR_ABORTED|net::ERR_ABORTED/.test(failure)) page.problems.push(`request failed: ${req.url()} ${failure}`);
  });
  return page;
}
