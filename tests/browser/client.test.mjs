// The JS client in headless Chromium against a real `tidings serve` (issue #21): the findings
// of the client review, each on the transports it concerns. One open server, one with [auth],
// one browser for the whole file; every test checks that its pages logged no console errors.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createHmac } from 'node:crypto';
import { mkdtempSync, writeFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startServer, launchBrowser, newPage } from './harness.mjs';

const TRANSPORTS = ['websocket', 'sse', 'stream', 'long-poll', 'poll'];
const SECRET = 'a-browser-test-secret-of-32-bytes!!';
const API_KEY = 'browser-test-api-key-0123';
let server;
let authed;
let browser;
let configDir;

before(async () => {
  configDir = mkdtempSync(join(tmpdir(), 'tidings-browser-'));
  const config = join(configDir, 'tidings.toml');
  writeFileSync(config, `[auth]\napi_keys = ["${API_KEY}"]\njwt_secret = "${SECRET}"\n`);
  server = await startServer();
  authed = await startServer(['--config', config]);
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await server?.stop();
  await authed?.stop();
  if (configDir) rmSync(configDir, { recursive: true, force: true });
});

async function publish(base, channel, data, key) {
  const headers = { 'content-type': 'application/json' };
  if (key) headers.authorization = `Bearer ${key}`;
  const res = await fetch(`${base}/publish/${channel}`, { method: 'POST', headers, body: JSON.stringify(data) });
  const body = await res.text();
  assert.equal(res.status, 200, body);
  return JSON.parse(body);
}

function jwt(claims) {
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString('base64url');
  const head = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}`;
  return `${head}.${createHmac('sha256', SECRET).update(head).digest('base64url')}`;
}

// A cursor of `channel` in an epoch the server never had (as after a restart of the memory
// broker): built like the pure tests do.
function staleCursor(channel, offset) {
  let h = 0xcbf29ce484222325n;
  for (const b of Buffer.from(channel)) h = ((h ^ BigInt(b)) * 0x100000001b3n) & 0xffffffffffffffffn;
  const bytes = [1];
  for (let k = 7; k >= 0; k--) bytes.push(Number((h >> BigInt(8 * k)) & 0xffn));
  bytes.push(3, ...Buffer.from('old'), offset);
  return Buffer.from(bytes).toString('base64url');
}

function noProblems(...pages) {
  for (const p of pages) assert.deepEqual(p.problems, [], `problems on ${p.url()}`);
}

// In-page helpers, installed on window by every test page.
const PAGE_HELPERS = () => {
  window.until = async (pred, what, ms = 8000) => {
    const t0 = Date.now();
    while (!pred()) {
      if (Date.now() - t0 > ms) throw new Error(`timed out waiting for ${what}`);
      await new Promise((r) => setTimeout(r, 10));
    }
  };
  window.post = (c, data) => fetch(`/publish/${c}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(data) });
};

test('finding 1: a resume after an epoch change delivers every message once, also after reconnect()', async () => {
  const page = await newPage(browser.context);
  await page.goto(`${server.url}/`);
  await page.evaluate(PAGE_HELPERS);
  for (const transport of TRANSPORTS) {
    const channel = `b1-${transport}`;
    for (const n of [1, 2, 3]) await publish(server.url, channel, { n });
    const result = await page.evaluate(
      async ({ channel, transport, since }) => {
        const { Tidings } = await import('/tidings.js');
        const got = [];
        const gaps = [];
        const t = new Tidings(location.origin, { transports: [transport], backoff: { min: 50, max: 100 }, pollInterval: 50 });
        t.subscribe(channel, { since, onMessage: (m) => got.push(m.data.n), onGap: (g) => gaps.push(g.reason) });
        await until(() => got.length === 3, 'the replay');
        t.reconnect();
        await until(() => t.state === 'connected' && t.subs.get(channel).live, 'back');
        await post(channel, { n: 4 });
        await until(() => got.includes(4), 'message 4');
        t.close();
        return { got, gaps };
      },
      { channel, transport, since: staleCursor(channel, 9) },
    );
    assert.deepEqual(result, { got: [1, 2, 3, 4], gaps: ['epoch_changed'] }, transport);
  }
  noProblems(page);
  await page.close();
});

test('finding 2: history asked for one channel is not replayed on the others', async () => {
  const page = await newPage(browser.context);
  await page.goto(`${server.url}/`);
  await page.evaluate(PAGE_HELPERS);
  for (const transport of TRANSPORTS) {
    const [ha, hb] = [`b2a-${transport}`, `b2b-${transport}`];
    for (const n of [1, 2, 3]) {
      await publish(server.url, ha, { n });
      await publish(server.url, hb, { n });
    }
    const result = await page.evaluate(
      async ({ ha, hb, transport }) => {
        const { Tidings } = await import('/tidings.js');
        const got = { [ha]: [], [hb]: [] };
        const t = new Tidings(location.origin, { transports: [transport], pollInterval: 50 });
        const a = t.subscribe(ha, { history: 2, onMessage: (m) => got[ha].push(m.data.n) });
        const b = t.subscribe(hb, { onMessage: (m) => got[hb].push(m.data.n) });
        await until(() => t.state === 'connected' && a.cursor && b.cursor, 'subscribed');
        await post(ha, { n: 4 });
        await post(hb, { n: 4 });
        await until(() => got[ha].includes(4) && got[hb].includes(4), 'live');
        t.close();
        return got;
      },
      { ha, hb, transport },
    );
    assert.deepEqual(result, { [ha]: [2, 3, 4], [hb]: [4] }, transport);
  }
  noProblems(page);
  await page.close();
});

test('findings 3, 4a and 11: with [auth] a user token reads history and a forbidden channel fails alone', async () => {
  const page = await newPage(browser.context);
  await page.goto(`${authed.url}/`);
  await page.evaluate(PAGE_HELPERS);
  const token = jwt({ sub: 'ann', tidings: { subscribe: ['public:*'] }, exp: Math.floor(Date.now() / 1000) + 600 });
  for (const transport of TRANSPORTS) {
    const [pa, secret] = [`public:b3-${transport}`, `secret:b3-${transport}`];
    for (const n of [1, 2, 3]) await publish(authed.url, pa, { n }, API_KEY);
    const result = await page.evaluate(
      async ({ pa, secret, transport, token }) => {
        const { Tidings } = await import('/tidings.js');
        const got = [];
        const refused = [];
        const t = new Tidings(location.origin, { transports: [transport], token, pollInterval: 50 });
        t.subscribe(pa, { history: 3, onMessage: (m) => got.push(m.data.n) });
        t.subscribe(secret, { onError: (e) => refused.push(e.code) });
        await until(() => got.length === 3 && refused.length === 1, 'history and the refusal');
        const h = await t.history(pa, { limit: 2 });
        t.close();
        return { got, refused, history: h.messages.map((m) => m.data.n) };
      },
      { pa, secret, transport, token },
    );
    assert.deepEqual(result, { got: [1, 2, 3], refused: ['forbidden'], history: [2, 3] }, transport);
  }
  // The browser logs the refused requests (401/403) itself: nothing else may show up.
  page.problems = page.problems.filter((p) => !/status of 40[13]/.test(p));
  noProblems(page);
  await page.close();
});

test('finding 4b/4c: a rejected cursor restarts its own channel only, and a quoted ETag cursor resumes', async () => {
  const page = await newPage(browser.context);
  await page.goto(`${server.url}/`);
  await page.evaluate(PAGE_HELPERS);
  for (const transport of TRANSPORTS) {
    const [ca, cb] = [`b4a-${transport}`, `b4b-${transport}`];
    const start = await publish(server.url, ca, { n: 0 });
    for (const n of [1, 2, 3]) await publish(server.url, ca, { n });
    const result = await page.evaluate(
      async ({ ca, cb, transport, since }) => {
        const { Tidings } = await import('/tidings.js');
        const got = { [ca]: [], [cb]: [] };
        const gaps = [];
        const t = new Tidings(location.origin, { transports: [transport], pollInterval: 50 });
        t.on('error', () => {});
        t.subscribe(ca, { since: `"${since}"`, onMessage: (m) => got[ca].push(m.data.n) });
        const b = t.subscribe(cb, { since: 'AQnotacursor', onMessage: (m) => got[cb].push(m.data.n), onGap: (g) => gaps.push(g.reason) });
        await until(() => got[ca].length === 3 && t.state === 'connected' && b.cursor, 'the backlog and the restart');
        await post(cb, { n: 1 });
        await until(() => got[cb].length === 1, 'live on the restarted channel');
        t.close();
        return { got, gaps };
      },
      { ca, cb, transport, since: start.cursor },
    );
    assert.deepEqual(result, { got: { [ca]: [1, 2, 3], [cb]: [1] }, gaps: ['cursor_rejected'] }, transport);
  }
  page.problems = page.problems.filter((p) => !/status of 400/.test(p));
  noProblems(page);
  await page.close();
});

test('finding 8: a session ending with token_expired comes back with the token getToken gives', async () => {
  const page = await newPage(browser.context);
  await page.goto(`${authed.url}/`);
  await page.evaluate(PAGE_HELPERS);
  // The server allows 5 s of clock skew: exp 3 s ago ends the session in about 2 s.
  const tokens = [
    jwt({ sub: 'ann', tidings: { subscribe: ['public:*'] }, exp: Math.floor(Date.now() / 1000) - 3 }),
    jwt({ sub: 'ann', tidings: { subscribe: ['public:*'] }, exp: Math.floor(Date.now() / 1000) + 600 }),
  ];
  const results = await Promise.all(
    ['websocket', 'sse'].map(async (transport) => {
      const channel = `public:b8-${transport}`;
      const done = page.evaluate(
        async ({ channel, transport, tokens }) => {
          const { Tidings } = await import('/tidings.js');
          const got = [];
          const byes = [];
          let calls = 0;
          const t = new Tidings(location.origin, { transports: [transport], getToken: async () => tokens[Math.min(calls++, 1)] });
          t.on('error', () => {});
          t.on('disconnect', (d) => byes.push(d.reason));
          const sub = t.subscribe(channel, { onMessage: (m) => got.push(m.data.n) });
          await until(() => t.state === 'connected' && sub.cursor, 'connected');
          window[`ready-${transport}`] = true;
          await until(() => calls >= 2 && t.state === 'connected', 'a new token', 10000);
          window[`again-${transport}`] = true;
          await until(() => got.length === 2, 'both messages', 10000);
          t.close();
          return { got, byes };
        },
        { channel, transport, tokens },
      );
      await page.waitForFunction((k) => window[k], `ready-${transport}`, { timeout: 8000 });
      await publish(authed.url, channel, { n: 1 }, API_KEY);
      await page.waitForFunction((k) => window[k], `again-${transport}`, { timeout: 10000 });
      await publish(authed.url, channel, { n: 2 }, API_KEY);
      return [transport, await done];
    }),
  );
  for (const [transport, r] of results) assert.deepEqual(r, { got: [1, 2], byes: ['token_expired'] }, transport);
  page.problems = page.problems.filter((p) => !/status of 401/.test(p));
  noProblems(page);
  await page.close();
});

test('findings 5 and 6: a proxy 404 page on /sse and /stream means long polling, then SSE again once it passes', async () => {
  const page = await newPage(browser.context);
  await page.goto(`${server.url}/`);
  await page.evaluate(PAGE_HELPERS);
  const block = (route) => route.fulfill({ status: 404, contentType: 'text/html', body: '<html><h1>Not Found</h1></html>' });
  await page.route(/\/(sse|stream)\?/, block);
  await page.evaluate(async () => {
    const { Tidings } = await import('/tidings.js');
    window.got = [];
    window.t = new Tidings(location.origin, { transports: ['sse', 'stream', 'long-poll'], upgradeAfter: 300, backoff: { min: 50, max: 100 } });
    window.t.subscribe('b5', { onMessage: (m) => window.got.push(m.data.n) });
    await until(() => window.t.state === 'connected', 'connected');
  });
  assert.equal(await page.evaluate(() => window.t.transport), 'long-poll');
  await publish(server.url, 'b5', { n: 1 });
  await page.waitForFunction(() => window.got.length === 1, null, { timeout: 8000 });
  await page.unroute(/\/(sse|stream)\?/, block);
  await page.waitForFunction(() => window.t.transport === 'sse' && window.t.state === 'connected', null, { timeout: 8000 });
  await publish(server.url, 'b5', { n: 2 });
  await page.waitForFunction(() => window.got.length === 2, null, { timeout: 8000 });
  assert.deepEqual(await page.evaluate(() => window.got), [1, 2]);
  await page.evaluate(() => window.t.close());
  page.problems = page.problems.filter((p) => !/status of 404/.test(p));
  noProblems(page);
  await page.close();
});

// finding 7: an app whose handler throws on one message, then the page reloads.
async function followAndThrow(page, channel, transport, throwOn) {
  await page.evaluate(
    async ({ channel, transport, throwOn }) => {
      const { Tidings } = await import('/tidings.js');
      window.got = [];
      const t = new Tidings(location.origin, { transports: [transport], persist: 'session', pollInterval: 50 });
      t.on('error', () => {});
      t.subscribe(channel, {
        history: 100,
        onMessage(m) {
          window.got.push(m.data.n);
          if (m.data.n === throwOn) throw new Error('the app failed on this one');
        },
      });
      await new Promise((resolve) => t.on('state', (s) => s.state === 'connected' && resolve()));
    },
    { channel, transport, throwOn },
  );
}

test('finding 7: after a reload the message whose handler threw is delivered again', async () => {
  const page = await newPage(browser.context);
  for (const transport of ['websocket', 'sse', 'poll']) {
    const channel = `b7-${transport}`;
    await page.goto(`${server.url}/`);
    await page.evaluate(() => sessionStorage.clear());
    await publish(server.url, channel, { n: 1 });
    await followAndThrow(page, channel, transport, 2);
    await publish(server.url, channel, { n: 2 });
    await publish(server.url, channel, { n: 3 });
    await page.waitForFunction(() => window.got.length === 3, null, { timeout: 8000 });
    await page.goto('about:blank');
    await page.goto(`${server.url}/`);
    await followAndThrow(page, channel, transport, 0);
    await page.waitForFunction(() => window.got.length >= 2, null, { timeout: 8000 });
    await publish(server.url, channel, { n: 4 });
    await page.waitForFunction(() => window.got.includes(4), null, { timeout: 8000 });
    assert.deepEqual(await page.evaluate(() => window.got), [2, 3, 4], `${transport}: resumed before the failed message`);
  }
  noProblems(page);
  await page.close();
});

test('finding 9: a long poll delivers a message published at connect time without a poll interval', async () => {
  const page = await newPage(browser.context);
  await page.goto(`${server.url}/`);
  await page.evaluate(PAGE_HELPERS);
  const ms = await page.evaluate(async () => {
    const { Tidings } = await import('/tidings.js');
    let at = 0;
    const t = new Tidings(location.origin, { transports: ['long-poll'], pollInterval: 5000 });
    const sub = t.subscribe('b9', { onMessage: () => (at = Date.now()) });
    await until(() => t.state === 'connected' && sub.cursor, 'connected');
    const sent = Date.now();
    await post('b9', { n: 1 });
    await until(() => at, 'the message', 4000);
    t.close();
    return at - sent;
  });
  console.log(`# Chromium long poll: first message ${ms} ms after its publish`);
  assert.ok(ms < 2500, `${ms} ms`);
  noProblems(page);
  await page.close();
});

test('a cross-origin publish passes the preflight with its Idempotency-Key and is stored once', async () => {
  // The page is on 127.0.0.1, the client talks to localhost: another origin, so the browser
  // asks the server (open mode: any origin) whether idempotency-key may be sent.
  const page = await newPage(browser.context);
  // An app's own page (the server's pages allow no other origin in their CSP), fulfilled by
  // the test; the client itself comes from the server.
  await page.route('**/app-page.html', (route) => route.fulfill({ status: 200, contentType: 'text/html', body: '<!doctype html><title>app</title>' }));
  // Chromium asks before a page reaches another loopback origin (Local Network Access).
  await browser.context.grantPermissions(['local-network-access'], { origin: server.url });
  await page.goto(`${server.url}/app-page.html`);
  const other = server.url.replace('127.0.0.1', 'localhost');
  const result = await page.evaluate(async (other) => {
    const { Tidings } = await import('/tidings.js');
    const t = new Tidings(other, { transports: ['sse'] });
    try {
      const a = await t.publish('b-cors', { n: 1 });
      const b = await t.publish('b-cors', { n: 2 });
      return { ok: true, offsets: [a.offset, b.offset] };
    } catch (e) {
      return { ok: false, error: `${e.code}: ${e.message}` };
    } finally {
      t.close();
    }
  }, other);
  assert.equal(result.ok, true, result.error);
  assert.equal(result.offsets[1], result.offsets[0] + 1);
  noProblems(page);
  await page.close();
});
