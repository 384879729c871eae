// Time to a loaded page (every subresource done) with nothing sent ahead, with 103 Early Hints,
// and with HTTP/2 server push, over an emulated round trip (bench/push/rtt_proxy.py: this
// kernel has no `tc netem`), median of N runs each. docs/benchmarks.md has the results.
//
//   node bench/push/pageload.mjs [runs=10] [rtts=50,150]   (needs target/{debug,release}/tidings,
//   tests/browser/node_modules, nghttp, python3, openssl; TIDINGS_BIN picks the binary)
//
// - Chromium (headless, TLS + h2, a fresh context per run so nothing is cached) measures
//   "none" (`--push off`) and "hints" (`--push hints`): loadEventEnd of the navigation.
//   Chromium accepts no pushes, so:
// - nghttp (`-a`: fetch the page's assets as a browser would; h2c) measures "none"
//   (`--no-push`) and "push" (`--push auto`): the last responseEnd. A fresh nghttp has no
//   cookie, so every run is a first view.
// - Bytes wasted by repeat pushes: a second view with the first view's `tidings_pushed`
//   cookie (nothing pushed again), and a client that drops cookies (all pushed again).

import { spawn, execFileSync } from 'node:child_process';
import { rmSync } from 'node:fs';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { startServer } from '../../tests/browser/harness.mjs';
import { makeSite, makeCert, launch } from '../../tests/browser/pushsite.mjs';

const HERE = dirname(fileURLToPath(import.meta.url));
const RUNS = Number(process.argv[2] || 10);
const RTTS = (process.argv[3] || '50,150').split(',').map(Number);

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};

function proxy(upstream, rtt) {
  return new Promise((resolve, reject) => {
    const child = spawn('python3', [join(HERE, 'rtt_proxy.py'), String(upstream), String(rtt)], { stdio: ['ignore', 'pipe', 'inherit'] });
    child.stdout.setEncoding('utf8');
    let seen = '';
    child.stdout.on('data', (chunk) => {
      seen += chunk;
      const m = /listening (\d+)\n/.exec(seen);
      if (m) resolve({ port: Number(m[1]), stop: () => child.kill('SIGTERM') });
    });
    started.push(child);
    child.once('exit', (code) => reject(new Error(`proxy exited ${code}`)));
  });
}

const portOf = (url) => Number(new URL(url).port);
/** Every proxy started, stopped at the end whatever happens (they would hold stdout open). */
const started = [];

async function chromiumLoads(url, spki, runs) {
  const browser = await launch([`--ignore-certificate-errors-spki-list=${spki}`]);
  const out = [];
  try {
    for (let i = 0; i < runs; i++) {
      // A fresh incognito-like context each time: no cache, no open connection.
      const context = await browser.context.browser()?.newContext() ?? browser.context;
      const page = await context.newPage();
      await page.goto(url, { waitUntil: 'load' });
      out.push(await page.evaluate(() => {
        const n = performance.getEntriesByType('navigation')[0];
        return n.loadEventEnd - n.startTime;
      }));
      await page.close();
      if (context !== browser.context) await context.close();
    }
  } finally {
    await browser.close();
  }
  return out;
}

function nghttp(url, args = []) {
  const out = execFileSync('nghttp', ['-a', '-s', '-n', ...args, url], { encoding: 'utf8' });
  let end = 0;
  let pushed = 0;
  for (const line of out.split('\n')) {
    // "  2    +41.64ms *   +41.26ms    380us  200   6K /assets/style.css" ('*': pushed)
    const m = /^\s*\d+\s+\+([\d.]+)(ms|us|s)\s+(\*?)\s*\+[\d.]+(?:ms|us|s)\s+\S+\s+\d+\s+([\d.]+)([KMG]?)\s+(\S+)/.exec(line);
    if (!m) continue;
    const t = Number(m[1]) * (m[2] === 's' ? 1000 : m[2] === 'us' ? 0.001 : 1);
    end = Math.max(end, t);
    // nghttp rounds sizes of 1 KiB and more ("6K"): bytes here are approximate above that.
    const size = Number(m[4]) * ({ K: 1024, M: 1 << 20, G: 1 << 30 }[m[5]] || 1);
    if (m[3] === '*') pushed += size;
  }
  return { end, pushed };
}

function setCookie(url) {
  const out = execFileSync('nghttp', ['-v', '-n', url], { encoding: 'utf8' });
  const m = /set-cookie: (tidings_pushed=[^;\s]+)/.exec(out);
  return m ? m[1] : undefined;
}

const rows = [];
const site = makeSite(20);
const cert = makeCert();
const pages = [['demo page (/demo/lab)', '/demo/lab?auto=0'], ['20-asset page', '/']];
const servers = {};
try {
  for (const mode of ['off', 'hints', 'auto']) {
    servers[mode] = await startServer(['--static', site, '--push', mode, ...cert.args]);
  }
  for (const rtt of RTTS) {
    const proxies = {};
    for (const mode of Object.keys(servers)) {
      proxies[mode] = {
        tls: await proxy(portOf(servers[mode].httpsUrl), rtt),
        plain: await proxy(portOf(servers[mode].url), rtt),
      };
    }
    for (const [name, path] of pages) {
      const none = await chromiumLoads(`https://127.0.0.1:${proxies.off.tls.port}${path}`, cert.spki, RUNS);
      const hints = await chromiumLoads(`https://127.0.0.1:${proxies.hints.tls.port}${path}`, cert.spki, RUNS);
      const nNone = [];
      const nPush = [];
      let pushedFirst = 0;
      for (let i = 0; i < RUNS; i++) {
        nNone.push(nghttp(`http://127.0.0.1:${proxies.auto.plain.port}${path}`, ['--no-push']).end);
        const p = nghttp(`http://127.0.0.1:${proxies.auto.plain.port}${path}`);
        nPush.push(p.end);
        pushedFirst = p.pushed;
      }
      const cookie = setCookie(`http://127.0.0.1:${proxies.auto.plain.port}${path}`);
      const again = cookie
        ? nghttp(`http://127.0.0.1:${proxies.auto.plain.port}${path}`, ['-H', `cookie: ${cookie}`]).pushed
        : NaN;
      rows.push({ rtt, name, chromium_none: median(none), chromium_hints: median(hints), nghttp_none: median(nNone), nghttp_push: median(nPush), pushed_first_view: pushedFirst, pushed_repeat_with_cookie: again, pushed_repeat_without_cookie: pushedFirst });
      console.error(JSON.stringify(rows.at(-1)));
    }
    for (const p of Object.values(proxies)) { p.tls.stop(); p.plain.stop(); }
  }
} finally {
  for (const child of started) child.kill('SIGTERM');
  for (const s of Object.values(servers)) await s.stop();
  rmSync(site, { recursive: true, force: true });
  cert.remove();
}
console.log('| RTT | page | Chromium, nothing | Chromium, 103 hints | nghttp, nothing | nghttp, push | pushed on a first view | pushed again (cookie kept / dropped) |');
console.log('|---|---|---|---|---|---|---|---|');
for (const r of rows) {
  const ms = (x) => `${x.toFixed(0)} ms`;
  console.log(`| ${r.rtt} ms | ${r.name} | ${ms(r.chromium_none)} | ${ms(r.chromium_hints)} | ${ms(r.nghttp_none)} | ${ms(r.nghttp_push)} | ${r.pushed_first_view} B | ${r.pushed_repeat_with_cookie} B / ${r.pushed_repeat_without_cookie} B |`);
}
