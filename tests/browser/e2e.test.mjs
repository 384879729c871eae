// End-to-end tests of the web side in headless Chromium, against a real `tidings serve --demo`.
// Run by scripts/test.sh (`node --test tests/browser/`). One server and one browser for the
// whole file; every test checks that its pages logged no console errors.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, launchBrowser, newPage } from './harness.mjs';

let server;
let browser;
const TRANSPORTS = ['websocket', 'sse', 'stream', 'long-poll', 'poll'];
const WAIT = { timeout: 10000 };

before(async () => {
  server = await startServer();
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await server?.stop();
});

async function publish(channel, data) {
  const res = await fetch(`${server.url}/publish/${channel}`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(data),
  });
  const body = await res.text();
  assert.equal(res.status, 200, body);
  return JSON.parse(body);
}

function noProblems(...pages) {
  for (const p of pages) assert.deepEqual(p.problems, [], `problems on ${p.url()}`);
}

test('every page and asset loads with the right type and no console errors', async () => {
  const page = await newPage(browser.context);
  for (const path of ['/', '/demo/chat', '/demo/dashboard', '/demo/lab', '/admin']) {
    const res = await page.goto(`${server.url}${path}`);
    assert.equal(res.status(), 200, path);
    assert.match(res.headers()['content-type'], /^text\/html/, path);
    assert.ok(res.headers()['content-security-policy'], `${path} has a CSP`);
    // Not 'networkidle': the pages hold streams open. Give their scripts time to run and fail.
    await page.waitForTimeout(400);
    assert.ok((await page.title()).includes('Tidings'), path);
    const nav = await page.evaluate(() => {
      const n = performance.getEntriesByType('navigation')[0];
      const bytes = performance.getEntriesByType('resource').reduce((sum, r) => sum + (r.transferSize || 0), n.transferSize || 0);
      return { dcl: Math.round(n.domContentLoadedEventEnd), load: Math.round(n.loadEventEnd), bytes };
    });
    // Reported, not asserted: timings on a shared CI machine are not a stable bar.
    console.log(`# ${path}: DOMContentLoaded ${nav.dcl} ms, load ${nav.load} ms, ${nav.bytes} bytes transferred`);
  }
  for (const [path, type] of [
    ['/tidings.js', /^text\/javascript/],
    ['/tidings.d.ts', /^application\/typescript/],
    ['/favicon.ico', /^image\/svg\+xml/],
    ['/assets/style.css', /^text\/css/],
  ]) {
    const res = await fetch(`${server.url}${path}`);
    assert.equal(res.status, 200, path);
    assert.match(res.headers.get('content-type'), type, path);
    const again = await fetch(`${server.url}${path}`, { headers: { 'if-none-match': res.headers.get('etag') } });
    assert.equal(again.status, 304, `${path} revalidates`);
  }
  noProblems(page);
  await page.close();
});

test('two pages chat over each transport', async () => {
  const a = await newPage(browser.context);
  const b = await newPage(browser.context);
  for (const transport of TRANSPORTS) {
    const room = `t-${transport}`;
    await a.goto(`${server.url}/demo/chat?room=${room}&transport=${transport}&nick=ann`);
    await b.goto(`${server.url}/demo/chat?room=${room}&transport=${transport}&nick=ben`);
    for (const p of [a, b]) await p.waitForSelector(`#status[data-state="connected"][data-transport="${transport}"]`, WAIT);
    await a.fill('#text', `hello from ann over ${transport}`);
    await a.press('#text', 'Enter');
    await b.waitForSelector(`#messages li:has-text("hello from ann over ${transport}")`, WAIT);
    await b.fill('#text', `hi ann, ben here`);
    await b.click('#composer button');
    await a.waitForSelector('#messages li:has-text("hi ann, ben here")', WAIT);
    // A sender sees its own line when it comes back from the channel: on a short poll that is
    // the next poll, which may be after the other page got it.
    await b.waitForSelector('#messages li:has-text("hi ann, ben here")', WAIT);
    // Each line shows up exactly once on both sides.
    for (const p of [a, b]) assert.equal(await p.locator('#messages li').count(), 2, `${transport}: ${await p.locator('#messages').innerText()}`);
    if (transport === 'websocket' || transport === 'sse' || transport === 'stream') {
      // Connections that stay open are present in the room (polls are not).
      await a.waitForFunction(() => document.getElementById('presence-count').textContent === '2', null, WAIT);
    }
  }
  noProblems(a, b);
  await a.close();
  await b.close();
});

test('the lab receives every message on all five transports, through a burst and a cut', async () => {
  const page = await newPage(browser.context);
  await page.goto(`${server.url}/demo/lab?auto=0`);
  for (const t of TRANSPORTS) await page.waitForSelector(`.pane[data-transport="${t}"][data-state="connected"]`, WAIT);
  await page.click('#burst');
  await page.click('#cut');
  await page.click('#one');
  const sent = await page.evaluate(async () => {
    await window.tidingsLab.publish(5);
    return Number(document.getElementById('sent').textContent.split(' ')[0]);
  });
  assert.equal(sent, 106);
  await page.waitForFunction(
    (n) => [...document.querySelectorAll('.pane')].every((p) => Number(p.dataset.lastSeq) === n),
    sent,
    { timeout: 20000 },
  );
  for (const t of TRANSPORTS) {
    const pane = page.locator(`.pane[data-transport="${t}"]`);
    await page.evaluate(() => window.tidingsLab.panes.forEach((p) => p.render()));
    assert.equal(await pane.getAttribute('data-lost'), '0', `${t} lost messages`);
    assert.equal(await pane.getAttribute('data-dups'), '0', `${t} got duplicates`);
    assert.equal(await pane.getAttribute('data-received'), String(sent), `${t} received count`);
  }
  noProblems(page);
  await page.close();
});

// An app that keeps what it received in sessionStorage and reloads: with persist: 'session'
// the client resumes from its stored cursor, so the app sees every message exactly once.
async function followWithPersist(page, channel, transport) {
  await page.evaluate(
    async ({ channel, transport }) => {
      const { Tidings } = await import('/tidings.js');
      const got = JSON.parse(sessionStorage.getItem('got') || '[]');
      const t = new Tidings(location.origin, { transports: [transport], persist: 'session' });
      window.got = got;
      t.subscribe(channel, {
        history: 100,
        onMessage(m) {
          got.push(m.data.n);
          sessionStorage.setItem('got', JSON.stringify(got));
        },
      });
      await new Promise((resolve) => t.on('state', (s) => s.state === 'connected' && resolve()));
    },
    { channel, transport },
  );
}

test('a reload resumes from the persisted cursor without loss or duplicates', async () => {
  const page = await newPage(browser.context);
  for (const transport of TRANSPORTS) {
    const channel = `reload-${transport}`;
    await page.goto(`${server.url}/`);
    await page.evaluate(() => sessionStorage.clear());
    await publish(channel, { n: 1 }); // before the first visit: comes from history
    await followWithPersist(page, channel, transport);
    await publish(channel, { n: 2 });
    await page.waitForFunction(() => window.got.length === 2, null, WAIT);
    await page.goto('about:blank');
    await publish(channel, { n: 3 }); // while the page is away
    await publish(channel, { n: 4 });
    await page.goto(`${server.url}/`);
    await followWithPersist(page, channel, transport);
    await publish(channel, { n: 5 });
    await page.waitForFunction(() => window.got.length >= 5, null, WAIT);
    await page.waitForTimeout(200);
    assert.deepEqual(await page.evaluate(() => window.got), [1, 2, 3, 4, 5], transport);
  }
  noProblems(page);
  await page.close();
});

test('a blocked WebSocket falls back to SSE and the chat still works', async () => {
  // What a proxy that does not pass upgrades on looks like to the page: the handshake gets a
  // plain HTTP answer (here the server's 404 for a path that is not a WebSocket endpoint).
  const page = await newPage(browser.context);
  await page.addInitScript(() => {
    const Real = window.WebSocket;
    window.WebSocket = class extends Real {
      constructor(url, protocols) {
        super(String(url).replace(/\/ws(\?|$)/, '/ws-blocked$1'), protocols);
      }
    };
  });
  const started = Date.now();
  await page.goto(`${server.url}/demo/chat?room=fallback&nick=fay`);
  await page.waitForSelector('#status[data-state="connected"][data-transport="sse"]', WAIT);
  console.log(`# fell back to SSE ${Date.now() - started} ms after navigation`);
  await publish('chat:fallback', { nick: 'srv', text: 'arrived over SSE' });
  await page.waitForSelector('#messages li:has-text("arrived over SSE")', WAIT);
  // Chromium logs the refused connection itself; nothing else may show up.
  page.problems = page.problems.filter((p) => !p.includes('/ws-blocked'));
  noProblems(page);
  await page.close();
});

test('the admin console shows a new connection appear', async () => {
  const admin = await newPage(browser.context);
  await admin.goto(`${server.url}/admin`);
  await admin.waitForSelector('#status[data-state="connected"][data-transport="sse"]', WAIT);
  // Nothing else in this file holds an HTTP stream open now: the console must get to 0, then
  // to 1 while another page follows a channel over one, then back to 0.
  const streams = (n) => admin.waitForFunction((n) => document.getElementById('conn-http_stream')?.textContent === String(n), n, WAIT);
  await streams(0);
  const other = await newPage(browser.context);
  await other.goto(`${server.url}/demo/chat?room=admin-test&transport=stream&nick=zed`);
  await other.waitForSelector('#status[data-state="connected"]', WAIT);
  await streams(1);
  await admin.waitForSelector('#channels td:has-text("chat:admin-test")', WAIT);
  noProblems(admin, other);
  await other.close();
  await streams(0);
  await admin.close();
});

test('multi-channel cursors from the real server are split and merged across reconnects', async () => {
  const page = await newPage(browser.context);
  await page.goto(`${server.url}/`);
  for (const transport of ['sse', 'stream', 'poll']) {
    const [a, b] = [`multi-a-${transport}`, `multi-b-${transport}`];
    await publish(a, { n: 1 });
    const result = await page.evaluate(
      async ({ a, b, transport }) => {
        const { Tidings, cursorEntries } = await import('/tidings.js');
        const got = [];
        const t = new Tidings(location.origin, { transports: [transport], backoff: { min: 50, max: 100 } });
        t.subscribe(a, { history: 5, onMessage: (m) => got.push(`${m.channel}:${m.data.n}`) });
        await new Promise((r) => t.on('state', (s) => s.state === 'connected' && r()));
        const post = (c, n) => fetch(`/publish/${c}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ n }) });
        await post(a, 2);
        while (got.length < 2) await new Promise((r) => setTimeout(r, 20));
        // A second channel joins the connection: the first resumes from its cursor.
        t.subscribe(b, { onMessage: (m) => got.push(`${m.channel}:${m.data.n}`) });
        await new Promise((r) => setTimeout(r, 300));
        await post(a, 3);
        await post(b, 1);
        while (got.length < 4) await new Promise((r) => setTimeout(r, 20));
        t.reconnect();
        await post(a, 4);
        await post(b, 2);
        while (got.length < 6) await new Promise((r) => setTimeout(r, 20));
        await new Promise((r) => setTimeout(r, 300));
        const parsed = [...t.subs.values()].map((s) => cursorEntries(s.cursor)?.length ?? 0);
        t.close();
        return { got, parsed };
      },
      { a, b, transport },
    );
    assert.deepEqual(result.got, [`${a}:1`, `${a}:2`, `${a}:3`, `${b}:1`, `${a}:4`, `${b}:2`], transport);
    assert.deepEqual(result.parsed, [1, 1], `${transport}: every subscription holds a one-channel cursor`);
  }
  noProblems(page);
  await page.close();
});
