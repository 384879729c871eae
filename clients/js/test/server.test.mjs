// The client against a real `tidings serve` (issue #21): the defects that show only with the
// real server's framing, auth and timing, on every transport. Node's own WebSocket is used
// (Node 20 needs --experimental-websocket: this file then runs itself again with it).

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import http from 'node:http';
import { fileURLToPath } from 'node:url';
import { Tidings, channelHash } from '../tidings.js';
import { startServer, publish, jwt, startProxy, waitFor } from './server.mjs';

const TRANSPORTS = ['websocket', 'sse', 'stream', 'long-poll', 'poll'];
const quick = { backoff: { min: 50, max: 200 }, pollInterval: 50, longPollWait: 5 };
const SECRET = 'a-test-secret-of-at-least-32-bytes!!';
const API_KEY = 'js-test-api-key-0123456789';

if (typeof WebSocket === 'undefined') {
  test('the real-server tests pass with Node WebSocket enabled (--experimental-websocket)', () => {
    const r = spawnSync(process.execPath, ['--experimental-websocket', '--test', '--test-reporter=spec', fileURLToPath(import.meta.url)], {
      encoding: 'utf8',
      timeout: 240000,
      // Without this the child reports to a parent runner instead of running its tests.
      env: Object.fromEntries(Object.entries(process.env).filter(([k]) => k !== 'NODE_TEST_CONTEXT')),
    });
    assert.match(r.stdout, /ℹ pass [1-9]/, r.stdout);
    assert.equal(r.status, 0, `${r.stdout}\n${r.stderr}`);
  });
} else {
  defineTests();
}

// A cursor for `channel` in an epoch the server never had: what a cursor kept across a
// restart of the memory broker looks like.
function staleCursor(channel, offset) {
  const bytes = [1];
  const h = channelHash(channel);
  for (let k = 7; k >= 0; k--) bytes.push(Number((h >> BigInt(8 * k)) & 0xffn));
  bytes.push(3, ...Buffer.from('old'), offset);
  return Buffer.from(bytes).toString('base64url');
}

function defineTests() {
  let open;
  let authed;

  before(async () => {
    open = await startServer({ config: '[namespaces.room]\npresence = true\n' });
    authed = await startServer({
      config: `[auth]\napi_keys = ["${API_KEY}"]\njwt_secret = "${SECRET}"\n`,
    });
  });

  after(async () => {
    await open?.stop();
    await authed?.stop();
  });

  const userToken = (extra = {}) => jwt(SECRET, { sub: 'ann', tidings: { subscribe: ['public:*'], publish: [] }, exp: Math.floor(Date.now() / 1000) + 600, ...extra });

  test('finding 1: a resume after an epoch change delivers every message once, with one gap, also after reconnect()', async () => {
    await Promise.all(
      TRANSPORTS.map(async (transport) => {
        const channel = `f1-${transport}`;
        for (const n of [1, 2, 3]) await publish(open.url, channel, { n });
        const got = [];
        const gaps = [];
        const t = new Tidings(open.url, { ...quick, transports: [transport] });
        try {
          t.subscribe(channel, { since: staleCursor(channel, 9), onMessage: (m) => got.push(m.data.n), onGap: (g) => gaps.push(g.reason) });
          await waitFor(() => got.length === 3, `${transport}: the replay`);
          t.reconnect();
          await waitFor(() => t.state === 'connected' && t.subs.get(channel).live, `${transport}: back`);
          await publish(open.url, channel, { n: 4 });
          await waitFor(() => got.includes(4), `${transport}: message 4`);
          assert.deepEqual(got, [1, 2, 3, 4], transport);
          assert.deepEqual(gaps, ['epoch_changed'], transport);
        } finally {
          t.close();
        }
      }),
    );
  });

  test('finding 2: one channel history is that channel alone on every transport', async () => {
    await Promise.all(
      TRANSPORTS.map(async (transport) => {
        const [ha, hb] = [`f2a-${transport}`, `f2b-${transport}`];
        for (const n of [1, 2, 3]) {
          await publish(open.url, ha, { n });
          await publish(open.url, hb, { n });
        }
        const got = { [ha]: [], [hb]: [] };
        const t = new Tidings(open.url, { ...quick, transports: [transport] });
        try {
          const a = t.subscribe(ha, { history: 2, onMessage: (m) => got[ha].push(m.data.n) });
          const b = t.subscribe(hb, { onMessage: (m) => got[hb].push(m.data.n) });
          await waitFor(() => t.state === 'connected' && a.cursor && b.cursor, `${transport}: both subscribed`);
          await publish(open.url, ha, { n: 4 });
          await publish(open.url, hb, { n: 4 });
          await waitFor(() => got[ha].includes(4) && got[hb].includes(4), `${transport}: live messages`);
          assert.deepEqual(got[ha], [2, 3, 4], `${transport}: ${ha}`);
          assert.deepEqual(got[hb], [4], `${transport}: ${hb} gets no history`);
        } finally {
          t.close();
        }
      }),
    );
  });

  test('findings 3, 4a and 11: under [auth] history works with a user token, a forbidden channel fails alone', async () => {
    await Promise.all(
      TRANSPORTS.map(async (transport) => {
        const [pa, pb, secret] = [`public:f3a-${transport}`, `public:f3b-${transport}`, `secret:f3-${transport}`];
        for (const n of [1, 2, 3]) await publish(authed.url, pa, { n }, API_KEY);
        const got = { [pa]: [], [pb]: [] };
        const subErrors = [];
        const errors = [];
        const t = new Tidings(authed.url, { ...quick, transports: [transport], token: userToken() });
        t.on('error', (e) => errors.push(e));
        try {
          t.subscribe(pa, { history: 3, onMessage: (m) => got[pa].push(m.data.n) });
          const b = t.subscribe(pb, { onMessage: (m) => got[pb].push(m.data.n) });
          const s = t.subscribe(secret, { onError: (e) => subErrors.push(e) });
          await waitFor(() => subErrors.length === 1, `${transport}: onError of the forbidden channel`);
          assert.equal(subErrors[0].code, 'forbidden', transport);
          assert.equal(subErrors[0].channel, secret, transport);
          assert.equal(s.active, false);
          await waitFor(() => got[pa].length === 3 && b.cursor && t.state === 'connected', `${transport}: history of ${pa}`);
          await publish(authed.url, pa, { n: 4 }, API_KEY);
          await publish(authed.url, pb, { n: 1 }, API_KEY);
          await waitFor(() => got[pa].includes(4) && got[pb].includes(1), `${transport}: live`);
          assert.deepEqual(got[pa], [1, 2, 3, 4], transport);
          assert.deepEqual(got[pb], [1], transport);
          assert.equal(errors.filter((e) => e.code === 'forbidden').length, 1, `${transport}: the refusal reported once`);
          // finding 11: history() with the user token, over the open connection or a poll.
          const h = await t.history(pa, { limit: 2 });
          assert.deepEqual(h.messages.map((m) => m.data.n), [3, 4], `${transport}: history()`);
          assert.ok(h.cursor);
        } finally {
          t.close();
        }
      }),
    );
  });

  test('finding 4b/4c: a rejected cursor restarts its channel only; a quoted ETag cursor resumes', async () => {
    await Promise.all(
      TRANSPORTS.map(async (transport) => {
        const [ca, cb] = [`f4a-${transport}`, `f4b-${transport}`];
        const start = await publish(open.url, ca, { n: 0 });
        for (const n of [1, 2, 3]) await publish(open.url, ca, { n });
        const got = { [ca]: [], [cb]: [] };
        const gaps = [];
        const t = new Tidings(open.url, { ...quick, transports: [transport] });
        t.on('error', () => {});
        try {
          t.subscribe(ca, { since: `"${start.cursor}"`, onMessage: (m) => got[ca].push(m.data.n) });
          const b = t.subscribe(cb, { since: 'AQnotacursor', onMessage: (m) => got[cb].push(m.data.n), onGap: (g) => gaps.push(g.reason) });
          await waitFor(() => got[ca].length === 3, `${transport}: the backlog of ${ca}`);
          await waitFor(() => t.state === 'connected' && b.cursor, `${transport}: ${cb} from now`);
          await publish(open.url, cb, { n: 1 });
          await waitFor(() => got[cb].length === 1, `${transport}: ${cb} live`);
          assert.deepEqual(got[ca], [1, 2, 3], transport);
          assert.deepEqual(gaps, ['cursor_rejected'], transport);
        } finally {
          t.close();
        }
      }),
    );
  });

  test('findings 5 and 6: behind a proxy that answers 404 pages it falls back, then returns to SSE once it works', async () => {
    let blocked = true;
    const proxy = await startProxy(open.url, (path) => (blocked && (path === '/sse' || path === '/stream') ? 404 : 0));
    const got = [];
    const t = new Tidings(proxy.url, { ...quick, transports: ['sse', 'stream', 'long-poll'], upgradeAfter: 300 });
    t.on('error', () => {});
    try {
      t.subscribe('f5', { onMessage: (m) => got.push(m.data.n) });
      await waitFor(() => t.state === 'connected', 'connected');
      assert.equal(t.transport, 'long-poll');
      await publish(open.url, 'f5', { n: 1 });
      await waitFor(() => got.length === 1, 'over long poll');
      blocked = false;
      await waitFor(() => t.transport === 'sse' && t.state === 'connected', 'back on SSE');
      await publish(open.url, 'f5', { n: 2 });
      await waitFor(() => got.length === 2, 'over SSE');
      assert.deepEqual(got, [1, 2]);
    } finally {
      t.close();
      await proxy.stop();
    }
  });

  test('finding 8: an expiring token is replaced through getToken on every transport, nothing lost', async () => {
    await Promise.all(
      ['websocket', 'sse', 'stream', 'poll'].map(async (transport) => {
        const channel = `public:f8-${transport}`;
        let calls = 0;
        // The server allows 5 s of clock skew: exp 3 s ago ends the session in about 2 s.
        const getToken = async () => (++calls === 1 ? userToken({ exp: Math.floor(Date.now() / 1000) - 3 }) : userToken());
        const got = [];
        const byes = [];
        const t = new Tidings(authed.url, { ...quick, transports: [transport], getToken });
        t.on('error', () => {});
        t.on('disconnect', (d) => byes.push(d.reason));
        try {
          const sub = t.subscribe(channel, { onMessage: (m) => got.push(m.data.n) });
          await waitFor(() => t.state === 'connected' && sub.cursor, `${transport}: connected`);
          await publish(authed.url, channel, { n: 1 }, API_KEY);
          await waitFor(() => calls >= 2, `${transport}: a second token`, 10000);
          await waitFor(() => t.state === 'connected', `${transport}: reconnected`);
          await publish(authed.url, channel, { n: 2 }, API_KEY);
          await waitFor(() => got.includes(2), `${transport}: message after the new token`);
          assert.deepEqual(got, [1, 2], transport);
          if (transport !== 'poll') assert.deepEqual(byes, ['token_expired'], transport);
        } finally {
          t.close();
        }
      }),
    );
  });

  test('finding 11: presence() answers the same over /ws and over HTTP', async () => {
    const ws = new Tidings(open.url, { ...quick, transports: ['websocket'] });
    const sse = new Tidings(open.url, { ...quick, transports: ['sse'] });
    try {
      const a = ws.subscribe('room:p');
      const b = sse.subscribe('room:p');
      await waitFor(() => a.cursor && b.cursor, 'both subscribed');
      const sorted = (list) => list.map((c) => JSON.stringify(c)).sort();
      let overWs;
      let overHttp;
      for (let i = 0; i < 100; i++) {
        overWs = await ws.presence('room:p');
        overHttp = await sse.presence('room:p');
        if (overWs.length === 2 && overHttp.length === 2) break;
        await new Promise((r) => setTimeout(r, 20)); // presence is written as the sessions join
      }
      assert.equal(overWs.length, 2, JSON.stringify(overWs));
      assert.deepEqual(sorted(overWs), sorted(overHttp));
      assert.deepEqual(Object.keys(overWs[0]).sort(), ['client', 'user']);
    } finally {
      ws.close();
      sse.close();
    }
  });

  test('finding 9: a long poll delivers the first message without waiting a poll interval', async () => {
    const t = new Tidings(open.url, { transports: ['long-poll'], pollInterval: 5000, longPollWait: 10 });
    let at = 0;
    try {
      const sub = t.subscribe('f9', { onMessage: () => (at = Date.now()) });
      await waitFor(() => t.state === 'connected' && sub.cursor, 'connected');
      // Published right after the first poll: it must not wait for a poll interval (5 s).
      const sent = Date.now();
      await publish(open.url, 'f9', { n: 1 });
      await waitFor(() => at, 'the message', 4000);
      console.log(`# long poll: first message ${at - sent} ms after its publish, published at connect`);
      assert.ok(at - sent < 2500, `${at - sent} ms`);
    } finally {
      t.close();
    }
  });

  test('publish over /ws and over HTTP works whether or not the server knows idempotency keys', async () => {
    for (const transport of ['websocket', 'sse']) {
      const t = new Tidings(open.url, { ...quick, transports: [transport] });
      const errors = [];
      t.on('error', (e) => errors.push(e));
      try {
        const sub = t.subscribe(`pub-${transport}`);
        await waitFor(() => t.state === 'connected' && sub.cursor, 'connected');
        const p1 = await t.publish(`pub-${transport}`, { n: 1 });
        const p2 = await t.publish(`pub-${transport}`, { n: 2 });
        assert.equal(p2.offset, p1.offset + 1, transport);
        assert.deepEqual(errors, [], transport);
      } finally {
        t.close();
      }
    }
  });
}

test('a retried publish sends the same Idempotency-Key on every attempt', async () => {
  const seen = [];
  const server = http.createServer((req, res) => {
    seen.push(req.headers['idempotency-key']);
    req.resume();
    req.on('end', () => {
      if (seen.length === 1) return req.socket.destroy(); // the network fails mid-request
      if (seen.length === 2) {
        res.writeHead(503, { 'content-type': 'application/json', 'retry-after': '0' });
        return res.end('{"error":{"code":"outcome_unknown","message":"the broker did not answer"}}');
      }
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end('{"channel":"c","offset":7,"epoch":"e","cursor":"C","time":1}');
    });
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const t = new Tidings(`http://127.0.0.1:${server.address().port}`, { backoff: { min: 10, max: 20 } });
  const errors = [];
  t.on('error', (e) => errors.push(e));
  try {
    const pos = await t.publish('c', { a: 1 });
    assert.equal(pos.offset, 7);
    assert.equal(seen.length, 3);
    assert.ok(seen[0] && /^[0-9a-f-]{16,}$/.test(seen[0]), `a key was sent: ${seen[0]}`);
    assert.deepEqual(seen, [seen[0], seen[0], seen[0]], 'the same key on every attempt');
    assert.deepEqual(errors, [], 'a publish that succeeded in the end reports nothing');
    await t.publish('c', { a: 2 });
    assert.notEqual(seen[3], seen[0], 'the next publish has its own key');
    await t.publish('c', { a: 3 }, { idempotencyKey: 'mine-1' });
    assert.equal(seen[4], 'mine-1');
  } finally {
    t.close();
    server.closeAllConnections();
    await new Promise((r) => server.close(r));
  }
});
