// Unit tests of the Tidings client's behaviour against fake transports: fallback order,
// reconnect with backoff and resume from the cursor, and bad input (HTTP errors, malformed
// frames, gaps, throwing listeners) reported through events, never thrown into the page.

import { test, beforeEach, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { Tidings } from '../tidings.js';

const BASE = 'http://tidings.test';
const fast = { backoff: { min: 5, max: 20, jitter: 0.5 }, connectTimeout: 500, pollInterval: 5 };

// --- fakes ---------------------------------------------------------------------------------

let requests;
let handler;
const realFetch = globalThis.fetch;
const realWebSocket = globalThis.WebSocket;

/** A streaming response whose body the test writes to. */
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

function json(status, value) {
  return new Response(JSON.stringify(value), { status, headers: { 'content-type': 'application/json' } });
}

class RefusedWebSocket {
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    requests.push({ url, kind: 'ws' });
    setTimeout(() => {
      this.readyState = 3;
      this.onerror?.({});
      this.onclose?.({ code: 1006, reason: '' });
    }, 1);
  }
  send() {}
  close() {}
}

beforeEach(() => {
  requests = [];
  handler = () => json(503, { error: { code: 'unavailable', message: 'no' } });
  globalThis.fetch = async (url, init = {}) => {
    const u = new URL(url);
    requests.push({ url: u, init });
    if (init.signal?.aborted) throw new DOMException('aborted', 'AbortError');
    return handler(u, init);
  };
  globalThis.WebSocket = RefusedWebSocket;
});

afterEach(() => {
  globalThis.fetch = realFetch;
  globalThis.WebSocket = realWebSocket;
});

function waitFor(pred, what, ms = 2000) {
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

const env = (channel, offset, cursor, data = { n: offset }) => ({ channel, offset, epoch: 'e1', cursor, data, time: 1 });

// --- tests ---------------------------------------------------------------------------------

test('it falls back through the transports in order until one connects', async () => {
  const states = [];
  handler = (u) => {
    if (u.pathname === '/sse') throw new TypeError('network down'); // fetch rejects
    if (u.pathname === '/stream') return json(502, { oops: true }); // a proxy's error
    if (u.pathname === '/poll') return json(200, { messages: [], cursor: 'AQ', gaps: [] });
    return json(404, {});
  };
  const t = new Tidings(BASE, fast);
  t.on('state', (s) => states.push(`${s.state}:${s.transport}`));
  const errors = [];
  t.on('error', (e) => errors.push(e));
  t.subscribe('news');
  await waitFor(() => t.state === 'connected', 'connected');
  assert.equal(t.transport, 'long-poll');
  assert.deepEqual(
    states.filter((s) => s.startsWith('connecting')),
    ['connecting:websocket', 'connecting:sse', 'connecting:stream', 'connecting:long-poll'],
  );
  assert.ok(errors.some((e) => e.status === 502), 'the 502 was reported');
  t.close();
  assert.equal(t.state, 'disconnected');
});

test('after a drop it reconnects with backoff and resumes from the last cursor', async () => {
  const streams = [];
  handler = (u) => {
    const s = streamResponse();
    streams.push({ url: u, ...s });
    return s.res;
  };
  const got = [];
  const t = new Tidings(BASE, { ...fast, transports: ['stream'] });
  t.subscribe('news', { history: 10, onMessage: (m) => got.push(m.offset) });
  await waitFor(() => streams.length === 1, 'first stream');
  assert.equal(streams[0].url.searchParams.get('history'), '10');
  assert.equal(streams[0].url.searchParams.get('since'), null);
  const c1 = Buffer.from([1, 0, 0, 0, 0, 0, 0, 0, 1, 2, 101, 49, 7]).toString('base64url'); // another channel, epoch e1, offset 7
  streams[0].write(`{"type":"ready","cursor":"${c1}"}\n`);
  streams[0].write(`${JSON.stringify(env('news', 8, 'CUR8'))}\n`);
  await waitFor(() => got.length === 1, 'first message');
  streams[0].end(); // the server goes away
  await waitFor(() => streams.length === 2, 'reconnect');
  const since = streams[1].url.searchParams.get('since');
  assert.ok(since, 'resumes with a cursor');
  assert.equal(streams[1].url.searchParams.get('history'), null, 'no replay on resume');
  // A duplicate (offset 8 again) after the reconnect is dropped; 9 is delivered.
  streams[1].write(`${JSON.stringify(env('news', 8, 'CUR8'))}\n${JSON.stringify(env('news', 9, 'CUR9'))}\n`);
  await waitFor(() => got.length === 2, 'second message');
  assert.deepEqual(got, [8, 9]);
  assert.ok(t.stats.reconnects >= 1);
  t.close();
});

test('a 400 stops the client with an error event instead of retrying forever', async () => {
  handler = () => json(400, { error: { code: 'too_many_channels', message: 'at most 1' } });
  const t = new Tidings(BASE, { ...fast, transports: ['sse', 'poll'] });
  const errors = [];
  t.on('error', (e) => errors.push(e));
  t.subscribe('a');
  await waitFor(() => errors.length === 1, 'error');
  await new Promise((r) => setTimeout(r, 60));
  assert.equal(errors[0].code, 'too_many_channels');
  assert.equal(errors[0].status, 400);
  assert.equal(requests.length, 1, 'no retry, no fallback');
  assert.equal(t.state, 'disconnected');
  t.close();
});

test('5xx answers are retried with backoff on every transport in turn, then again', async () => {
  // A proxy's 5xx page (not the server's JSON): the transport failed, so the next is tried.
  handler = () => new Response('<html>bad gateway</html>', { status: 502, headers: { 'content-type': 'text/html' } });
  const t = new Tidings(BASE, { ...fast, transports: ['sse', 'stream'] });
  t.on('error', () => {});
  t.subscribe('a');
  await waitFor(() => requests.length >= 6, 'three rounds');
  assert.deepEqual(
    requests.slice(0, 4).map((r) => r.url.pathname),
    ['/sse', '/stream', '/sse', '/stream'],
  );
  t.close();
  const n = requests.length;
  await new Promise((r) => setTimeout(r, 60));
  assert.equal(requests.length, n, 'close() stops the retries');
});

test('malformed frames, gaps and throwing listeners are reported, and delivery goes on', async () => {
  let s;
  handler = () => {
    s = streamResponse('text/event-stream');
    return s.res;
  };
  const t = new Tidings(BASE, { ...fast, transports: ['sse'] });
  const errors = [];
  const gaps = [];
  const got = [];
  t.on('error', (e) => errors.push(e.code));
  t.on('message', () => {
    throw new Error('page bug');
  });
  t.subscribe('a', { onMessage: (m) => got.push(m.offset), onGap: (g) => gaps.push(g) });
  await waitFor(() => s, 'stream');
  s.write('retry: 2000\n\n');
  s.write('id: X\ndata: {not json\n\n');
  s.write('id: X\ndata: [1,2]\n\n');
  s.write(`id: C1\ndata: ${JSON.stringify(env('a', 1, 'C1'))}\n\n`);
  s.write('id: C2\nevent: tidings.gap\ndata: {"channel":"a","epoch":"e2","next_offset":57,"reason":"trimmed"}\n\n');
  s.write(`id: C3\ndata: ${JSON.stringify({ ...env('a', 57, 'C3'), epoch: 'e2' })}\n\n`);
  await waitFor(() => got.length === 2, 'two messages');
  assert.deepEqual(got, [1, 57]);
  assert.deepEqual(gaps, [{ channel: 'a', epoch: 'e2', next_offset: 57, reason: 'trimmed' }]);
  assert.deepEqual(errors.filter((c) => c === 'malformed_frame').length, 2);
  assert.equal(errors.filter((c) => c === 'listener_error').length, 2);
  t.close();
});

test('a server goodbye with reconnect:false is final; with reconnect:true the client comes back', async () => {
  const streams = [];
  handler = () => {
    const s = streamResponse();
    streams.push(s);
    return s.res;
  };
  const t = new Tidings(BASE, { ...fast, transports: ['stream'] });
  const byes = [];
  t.on('disconnect', (d) => byes.push(d));
  t.on('error', () => {});
  t.subscribe('a');
  await waitFor(() => streams.length === 1, 'stream');
  streams[0].write('{"type":"disconnect","reason":"shutdown","reconnect":true}\n');
  streams[0].end();
  await waitFor(() => streams.length === 2, 'reconnect after shutdown');
  streams[1].write('{"type":"disconnect","reason":"banned","reconnect":false}\n');
  streams[1].end();
  await waitFor(() => byes.length === 2, 'second goodbye');
  await new Promise((r) => setTimeout(r, 60));
  assert.equal(streams.length, 2, 'no reconnect after reconnect:false');
  assert.deepEqual(byes.map((b) => b.reconnect), [true, false]);
  assert.equal(t.state, 'disconnected');
});

test('bad channel names and stale cursors never reach the page as exceptions', async () => {
  const t = new Tidings(BASE, { ...fast, transports: ['poll'] });
  const subErrors = [];
  t.on('error', () => {});
  const bad = t.subscribe('no spaces allowed', { onError: (e) => subErrors.push(e.code) });
  assert.equal(bad.active, false);
  await waitFor(() => subErrors.length === 1, 'onError');
  assert.deepEqual(subErrors, ['invalid_channel']);
  assert.equal(requests.length, 0, 'nothing sent for a bad name');

  // The server refuses a cursor (a stored one from another run): gap notice, then from now.
  handler = (u) =>
    u.searchParams.get('since')
      ? json(400, { error: { code: 'invalid_cursor', message: 'malformed cursor' } })
      : json(200, { messages: [], cursor: 'AQ', gaps: [] });
  const gaps = [];
  t.subscribe('a', { since: 'AQAAAAEBZQE', onGap: (g) => gaps.push(g.reason) });
  await waitFor(() => t.state === 'connected', 'connected from now');
  assert.deepEqual(gaps, ['cursor_rejected']);
  t.close();
});

test('publish resolves to the position, and an HTTP error rejects with its code', async () => {
  handler = (u, init) => {
    if (u.pathname === '/publish/news' && init.method === 'POST') return json(200, { channel: 'news', offset: 3, epoch: 'e', cursor: 'C', time: 1 });
    return json(413, { error: { code: 'payload_too_large', message: 'too big' } });
  };
  const t = new Tidings(BASE, fast);
  const errors = [];
  t.on('error', (e) => errors.push(e.code));
  assert.deepEqual(await t.publish('news', { a: 1 }), { channel: 'news', offset: 3, epoch: 'e', cursor: 'C', time: 1 });
  assert.equal(JSON.parse(requests[0].init.body).a, 1);
  await assert.rejects(t.publish('big', 'x'), (e) => e.code === 'payload_too_large' && e.status === 413);
  assert.deepEqual(errors, ['payload_too_large']);
});
