// Unit tests of the client's behaviour specification (the BEHAVIOUR list at the top of
// tidings.js) where a fake transport can show it exactly: advised delays, timers, fallbacks,
// the page coming back, the stored cursor following what the app accepted. Issue #21.
// What needs the real server is in server.test.mjs.

import { test, beforeEach, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { Tidings, channelHash } from '../tidings.js';

const BASE = 'http://tidings.test';
const fast = { backoff: { min: 5, max: 20, jitter: 0 }, connectTimeout: 500, pollInterval: 5 };

let requests;
let handler;
let sockets;
const realFetch = globalThis.fetch;
const realWebSocket = globalThis.WebSocket;

function streamResponse(contentType = 'application/x-ndjson') {
  let ctrl;
  const body = new ReadableStream({ start: (c) => (ctrl = c) });
  const enc = new TextEncoder();
  return {
    res: new Response(body, { status: 200, headers: { 'content-type': contentType } }),
    write: (text) => ctrl.enqueue(enc.encode(text)),
    end: () => ctrl.close(),
  };
}

function json(status, value, headers = {}) {
  return new Response(JSON.stringify(value), { status, headers: { 'content-type': 'application/json', ...headers } });
}

/** A WebSocket whose server side the test plays: `sent` holds the requests, `push` answers. */
class FakeWebSocket {
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    sockets.push(this);
    requests.push({ url: new URL(url), kind: 'ws' });
    setTimeout(() => {
      if (this.readyState !== 0) return;
      this.readyState = 1;
      this.onopen?.({});
    }, 1);
  }
  send(text) {
    this.sent.push(JSON.parse(text));
  }
  push(obj) {
    this.onmessage?.({ data: JSON.stringify(obj) });
  }
  serverClose(code, reason = '') {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }
  close() {
    this.readyState = 3;
  }
}

beforeEach(() => {
  requests = [];
  sockets = [];
  handler = () => json(503, { error: { code: 'unavailable', message: 'no' } });
  globalThis.fetch = async (url, init = {}) => {
    const u = new URL(url);
    requests.push({ url: u, init, at: Date.now() });
    if (init.signal?.aborted) throw new DOMException('aborted', 'AbortError');
    return handler(u, init);
  };
  globalThis.WebSocket = FakeWebSocket;
});

afterEach(() => {
  globalThis.fetch = realFetch;
  globalThis.WebSocket = realWebSocket;
});

function waitFor(pred, what, ms = 3000) {
  return new Promise((resolve, reject) => {
    const t0 = Date.now();
    const tick = () => {
      let v;
      try {
        v = pred();
      } catch {
        v = false;
      }
      if (v) return resolve(v);
      if (Date.now() - t0 > ms) return reject(new Error(`timed out waiting for ${what}`));
      setTimeout(tick, 2);
    };
    tick();
  });
}

// A cursor with the server's layout (see pure.test.mjs).
function cursor(entries) {
  const bytes = [1];
  const sorted = [...entries].sort((a, b) => (channelHash(a[0]) < channelHash(b[0]) ? -1 : 1));
  for (const [channel, epoch, offset] of sorted) {
    const h = channelHash(channel);
    for (let k = 7; k >= 0; k--) bytes.push(Number((h >> BigInt(8 * k)) & 0xffn));
    bytes.push(epoch.length, ...Buffer.from(epoch));
    let v = offset;
    for (;;) {
      const b = v & 0x7f;
      v = Math.floor(v / 128);
      if (v === 0) {
        bytes.push(b);
        break;
      }
      bytes.push(b | 0x80);
    }
  }
  return Buffer.from(bytes).toString('base64url');
}

const env = (channel, offset, epoch = 'e1') => ({ channel, offset, epoch, cursor: cursor([[channel, epoch, offset]]), data: { n: offset }, time: 1 });
const timers = () => process.getActiveResourcesInfo().filter((r) => r === 'Timeout').length;

// --- finding 1: the position never moves back --------------------------------------------------

test('a subscribe reply read after its replay does not move the cursor back, and an old gap is ignored', async () => {
  const t = new Tidings(BASE, { ...fast, transports: ['websocket'] });
  const got = [];
  const gaps = [];
  try {
    const old = cursor([['a', 'old', 9]]);
    const sub = t.subscribe('a', { since: old, onMessage: (m) => got.push(m.offset), onGap: (g) => gaps.push(g.reason) });
    await waitFor(() => sockets[0]?.sent.length === 1, 'subscribe op');
    const ws = sockets[0];
    assert.deepEqual(ws.sent[0], { id: 1, op: 'subscribe', channel: 'a', since: old });
    // What Node does: every frame of one read dispatched in one go, reply first.
    ws.push({ type: 'reply', id: 1, ok: true, cursor: old });
    ws.push({ type: 'gap', channel: 'a', epoch: 'e2', next_offset: 1, reason: 'epoch_changed' });
    for (const n of [1, 2, 3]) ws.push({ type: 'message', ...env('a', n, 'e2') });
    await waitFor(() => got.length === 3, 'three messages');
    assert.equal(sub.cursor, cursor([['a', 'e2', 3]]), 'the cursor is after message 3, not the old one');
    // The reply arriving after the replay (another order) is not applied either.
    t.reconnect();
    await waitFor(() => sockets.length === 2 && sockets[1].sent.length === 1, 'resubscribe');
    assert.equal(sockets[1].sent[0].since, cursor([['a', 'e2', 3]]), 'resumes after 3');
    sockets[1].push({ type: 'message', ...env('a', 3, 'e2') }); // a duplicate: dropped
    sockets[1].push({ type: 'gap', channel: 'a', epoch: 'e2', next_offset: 2, reason: 'trimmed' }); // nothing new: dropped
    sockets[1].push({ type: 'reply', id: 1, ok: true, cursor: cursor([['a', 'e2', 1]]) });
    sockets[1].push({ type: 'message', ...env('a', 4, 'e2') });
    await waitFor(() => got.length === 4, 'message 4');
    assert.deepEqual(got, [1, 2, 3, 4]);
    assert.deepEqual(gaps, ['epoch_changed']);
    assert.equal(sub.cursor, cursor([['a', 'e2', 4]]));
  } finally {
    t.close();
  }
});

// --- finding 4c: cursors the client cannot merge ----------------------------------------------------

test('a cursor of an unknown layout beside others is read alone first, so no channel silently starts from now', async () => {
  const future = Buffer.from([2, 9, 9, 9]).toString('base64url');
  const ca = cursor([['ca', 'e1', 4]]);
  handler = (u) => {
    if (u.pathname === '/poll' && u.searchParams.get('since') === future) {
      return json(200, { messages: [env('cb', 8), env('cb', 9)], cursor: cursor([['cb', 'e1', 9]]), gaps: [] });
    }
    return streamResponse().res;
  };
  const t = new Tidings(BASE, { ...fast, transports: ['stream'] });
  const got = [];
  try {
    t.subscribe('ca', { since: ca, onMessage: (m) => got.push(`${m.channel}:${m.offset}`) });
    t.subscribe('cb', { since: future, onMessage: (m) => got.push(`${m.channel}:${m.offset}`) });
    await waitFor(() => requests.some((r) => r.url.pathname === '/stream'), 'the stream');
    const stream = requests.find((r) => r.url.pathname === '/stream').url;
    assert.equal(stream.searchParams.get('since'), cursor([['ca', 'e1', 4], ['cb', 'e1', 9]]), 'both channels resume');
    assert.deepEqual(got, ['cb:8', 'cb:9']);
  } finally {
    t.close();
  }
});

// --- finding 5: a proxy's page is not the server's answer ----------------------------------------

test('a proxy HTML 404 or 403 on /sse and /stream falls back to polling instead of stopping', async () => {
  handler = (u) => {
    if (u.pathname === '/sse') return new Response('<html>Not Found</html>', { status: 404, headers: { 'content-type': 'text/html' } });
    if (u.pathname === '/stream') return new Response('<html>Forbidden</html>', { status: 403, headers: { 'content-type': 'text/html' } });
    return json(200, { messages: [], cursor: cursor([['a', 'e1', 0]]), gaps: [] });
  };
  const subErrors = [];
  const t = new Tidings(BASE, { ...fast, transports: ['sse', 'stream', 'long-poll'] });
  t.on('error', () => {});
  try {
    t.subscribe('a', { onError: (e) => subErrors.push(e) });
    await waitFor(() => t.state === 'connected', 'connected');
    assert.equal(t.transport, 'long-poll');
    assert.deepEqual(subErrors, []);
  } finally {
    t.close();
  }
});

// --- finding 10: close() and reconnect() ---------------------------------------------------------

test('close() leaves no timer behind, even while a connection attempt is pending', async () => {
  const before = timers();
  handler = () => new Promise(() => {}); // a request that never answers
  const t = new Tidings(BASE, { transports: ['sse'], connectTimeout: 60000 });
  t.subscribe('a');
  await waitFor(() => requests.length === 1, 'the request');
  assert.ok(timers() > before, 'the connect timer runs');
  t.close();
  assert.equal(timers(), before, 'no timer left after close()');
  assert.equal(t.state, 'disconnected');
});

test('reconnect() reports disconnected at once and stops the watchdog during its backoff', async () => {
  let s;
  handler = () => {
    s = streamResponse();
    return s.res;
  };
  const t = new Tidings(BASE, { ...fast, backoff: { min: 200, max: 200, jitter: 0 }, transports: ['stream'] });
  const states = [];
  t.on('state', (e) => states.push(e.state));
  try {
    t.subscribe('a');
    await waitFor(() => t.state === 'connected', 'connected');
    assert.ok(t.watchdog, 'a stream has a watchdog');
    t.reconnect();
    assert.equal(t.state, 'disconnected');
    assert.equal(t.watchdog, null);
    await waitFor(() => t.state === 'connected' && requests.length === 2, 'back');
    assert.deepEqual(states, ['connecting', 'connected', 'disconnected', 'connecting', 'connected']);
  } finally {
    t.close();
  }
});

// --- finding 12 and the advised delays -----------------------------------------------------------

test('a Tidings 503 with Retry-After is retried on the same transport after the advised delay', async () => {
  let n = 0;
  handler = () => {
    n++;
    if (n === 1) return json(503, { error: { code: 'broker_unavailable', message: 'later' } }, { 'retry-after': '1' });
    return json(200, { messages: [], cursor: cursor([['a', 'e1', 0]]), gaps: [] });
  };
  const t = new Tidings(BASE, { ...fast, transports: ['poll', 'sse'] });
  t.on('error', () => {});
  try {
    t.subscribe('a');
    await waitFor(() => t.state === 'connected', 'connected', 4000);
    assert.equal(t.transport, 'poll', 'no fallback: the server asked to wait');
    const gap = requests[1].at - requests[0].at;
    assert.ok(gap >= 950, `waited ${gap} ms`);
  } finally {
    t.close();
  }
});

test('SSE retry: and a disconnect reconnect_after_ms set the least reconnect delay', async () => {
  const streams = [];
  handler = () => {
    const s = streamResponse('text/event-stream');
    streams.push({ ...s, at: Date.now() });
    return s.res;
  };
  const t = new Tidings(BASE, { ...fast, transports: ['sse'] });
  const byes = [];
  t.on('error', () => {});
  t.on('disconnect', (d) => byes.push(d));
  try {
    t.subscribe('a');
    await waitFor(() => streams.length === 1, 'stream');
    streams[0].write('retry: 400\n\n: ping\n\n');
    await waitFor(() => t.state === 'connected', 'connected');
    streams[0].end();
    await waitFor(() => streams.length === 2, 'reconnect');
    assert.ok(streams[1].at - streams[0].at >= 390, `retry: honoured (${streams[1].at - streams[0].at} ms)`);
    streams[1].write(': ping\n\nevent: tidings.disconnect\ndata: {"reason":"shutdown","reconnect":true,"reconnect_after_ms":600}\n\n');
    await waitFor(() => byes.length === 1, 'goodbye');
    assert.equal(byes[0].reconnectAfterMs, 600);
    const cut = Date.now();
    streams[1].end();
    await waitFor(() => streams.length === 3, 'reconnect after the drain', 3000);
    assert.ok(streams[2].at - cut >= 590, `reconnect_after_ms honoured (${streams[2].at - cut} ms)`);
  } finally {
    t.close();
  }
});

test('/ws closing with 1012 after a drain notice reconnects after the advised delay', async () => {
  const t = new Tidings(BASE, { ...fast, transports: ['websocket'] });
  t.on('error', () => {});
  try {
    t.subscribe('a');
    await waitFor(() => sockets[0]?.sent.length === 1, 'subscribe');
    sockets[0].push({ type: 'reply', id: 1, ok: true, cursor: cursor([['a', 'e1', 0]]) });
    sockets[0].push({ type: 'disconnect', reason: 'shutdown', reconnect: true, reconnect_after_ms: 300 });
    const cut = Date.now();
    sockets[0].serverClose(1012, 'restart');
    await waitFor(() => sockets.length === 2, 'reconnect');
    const took = Date.now() - cut;
    assert.ok(took >= 290, `waited ${took} ms`);
  } finally {
    t.close();
  }
});

test('token_expired closes /ws with 1008 and the client reconnects with a token from getToken', async () => {
  let issued = 0;
  const t = new Tidings(BASE, { ...fast, transports: ['websocket'], getToken: async () => `tok${++issued}` });
  t.on('error', () => {});
  try {
    t.subscribe('a');
    await waitFor(() => sockets[0]?.sent.length === 1, 'subscribe');
    assert.equal(new URL(sockets[0].url).searchParams.get('token'), 'tok1');
    sockets[0].push({ type: 'disconnect', reason: 'token_expired', reconnect: true });
    sockets[0].serverClose(1008, 'token expired');
    await waitFor(() => sockets.length === 2, 'reconnect');
    assert.equal(new URL(sockets[1].url).searchParams.get('token'), 'tok2');
    // 1008 without a goodbye saying to come back stays final.
    sockets[1].serverClose(1008, 'policy');
    await waitFor(() => t.state === 'disconnected', 'stopped');
    assert.equal(t.retryTimer, null, 'no reconnect scheduled');
    assert.equal(sockets.length, 2);
  } finally {
    t.close();
  }
});

test('setToken() is used by the next connection', async () => {
  const t = new Tidings(BASE, { ...fast, transports: ['websocket'], token: 'first' });
  try {
    t.subscribe('a');
    await waitFor(() => sockets.length === 1, 'socket');
    t.setToken('second');
    t.reconnect();
    await waitFor(() => sockets.length === 2, 'again');
    assert.deepEqual(sockets.map((s) => new URL(s.url).searchParams.get('token')), ['first', 'second']);
  } finally {
    t.close();
  }
});

test('a /ws subscribe that fails with broker_unavailable is retried on the same socket', async () => {
  const t = new Tidings(BASE, { ...fast, transports: ['websocket'] });
  const errors = [];
  const subErrors = [];
  t.on('error', (e) => errors.push(e.code));
  try {
    t.subscribe('a', { onError: (e) => subErrors.push(e) });
    await waitFor(() => sockets[0]?.sent.length === 1, 'subscribe');
    sockets[0].push({ type: 'reply', id: 1, error: { code: 'broker_unavailable', message: 'down' } });
    await waitFor(() => sockets[0].sent.length === 2, 'the retry');
    assert.equal(sockets[0].sent[1].op, 'subscribe');
    // The first try had arrived after all (its reply was late): the retry's refusal is fine.
    sockets[0].push({ type: 'reply', id: 2, error: { code: 'already_subscribed', message: 'already subscribed to a' } });
    sockets[0].push({ type: 'message', ...env('a', 1) });
    await waitFor(() => t.stats.messages === 1, 'a message');
    assert.equal(sockets.length, 1, 'same socket');
    assert.deepEqual(subErrors, []);
    assert.deepEqual(errors, ['broker_unavailable']);
  } finally {
    t.close();
  }
});

test('the page coming back online ends a pending backoff at once, unless the server asked for the delay', async () => {
  const win = new EventTarget();
  globalThis.window = win;
  let up = false;
  handler = () => (up ? streamResponse().res : new Response('down', { status: 502 }));
  const t = new Tidings(BASE, { ...fast, backoff: { min: 60000, max: 60000, jitter: 0 }, transports: ['stream'] });
  t.on('error', () => {});
  try {
    t.subscribe('a');
    await waitFor(() => requests.length === 1 && t.retryTimer, 'a long backoff');
    up = true;
    win.dispatchEvent(new Event('online'));
    await waitFor(() => t.state === 'connected', 'connected at once');
  } finally {
    t.close();
    delete globalThis.window;
  }
  assert.equal(timers(), 0);
});

test('a hidden page becoming visible reconnects at once, but not before a delay the server advised', async () => {
  const doc = new EventTarget();
  doc.visibilityState = 'visible';
  globalThis.document = doc;
  const streams = [];
  handler = () => {
    const s = streamResponse();
    streams.push(s);
    return s.res;
  };
  const t = new Tidings(BASE, { ...fast, backoff: { min: 60000, max: 60000, jitter: 0 }, transports: ['stream'] });
  t.on('error', () => {});
  try {
    t.subscribe('a');
    await waitFor(() => t.state === 'connected', 'connected');
    // A plain drop backs off (60 s here); the page becoming visible ends that wait.
    streams[0].write('{"type":"ready","cursor":"AQ"}\n');
    streams[0].end();
    await waitFor(() => t.state === 'disconnected' && t.retryTimer, 'backing off');
    doc.dispatchEvent(new Event('visibilitychange'));
    await waitFor(() => streams.length === 2 && t.state === 'connected', 'reconnected at once');
    // A drain: the server asks for 60 s; coming back to the page must not cut that short.
    streams[1].write('{"type":"ready","cursor":"AQ"}\n{"type":"disconnect","reason":"shutdown","reconnect":true,"reconnect_after_ms":60000}\n');
    streams[1].end();
    await waitFor(() => t.state === 'disconnected' && t.retryTimer, 'waiting out the advised delay');
    doc.dispatchEvent(new Event('visibilitychange')); // a reconnect would start right here
    assert.equal(t.state, 'disconnected', 'the advised delay holds');
    assert.ok(t.retryTimer, 'still waiting');
  } finally {
    t.close();
    delete globalThis.document;
  }
});

// --- finding 7: the stored cursor follows what the app accepted ----------------------------------

test('the stored cursor passes a message only once onMessage returned or its promise resolved', async () => {
  const store = new Map();
  globalThis.sessionStorage = {
    getItem: (k) => store.get(k) ?? null,
    setItem: (k, v) => store.set(k, v),
    removeItem: (k) => store.delete(k),
  };
  let s;
  handler = () => {
    s = streamResponse();
    return s.res;
  };
  const t = new Tidings(BASE, { ...fast, transports: ['stream'], persist: 'session' });
  t.on('error', () => {});
  const key = `tidings:${BASE}:a`;
  let release;
  try {
    t.subscribe('a', {
      onMessage(m) {
        if (m.offset === 2) return new Promise((r) => (release = r));
        if (m.offset === 4) throw new Error('app bug');
        return undefined;
      },
    });
    await waitFor(() => s, 'stream');
    s.write(`${JSON.stringify(env('a', 1))}\n`);
    await waitFor(() => store.get(key) === cursor([['a', 'e1', 1]]), 'stored after 1');
    s.write(`${JSON.stringify(env('a', 2))}\n${JSON.stringify(env('a', 3))}\n`);
    await waitFor(() => t.stats.messages === 3, 'three delivered');
    assert.equal(store.get(key), cursor([['a', 'e1', 1]]), 'not past 2 while its handler runs');
    release();
    await waitFor(() => store.get(key) === cursor([['a', 'e1', 3]]), 'then past 2 and 3');
    s.write(`${JSON.stringify(env('a', 4))}\n${JSON.stringify(env('a', 5))}\n`);
    await waitFor(() => t.stats.messages === 5, 'five delivered');
    assert.equal(store.get(key), cursor([['a', 'e1', 3]]), 'a throwing handler keeps the stored cursor before its message');
  } finally {
    t.close();
    delete globalThis.sessionStorage;
  }
});
