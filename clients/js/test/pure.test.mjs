// Unit tests of the client's pure parts: backoff, cursors, frame parsers.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { backoffDelay, channelHash, cursorEntries, cursorFor, mergeCursors, SseParser, NdjsonParser } from '../tidings.js';

test('backoff doubles from min, caps at max, and jitters within its share', () => {
  const opts = { min: 100, max: 5000, jitter: 0.5 };
  assert.equal(backoffDelay(0, opts, () => 1), 100);
  assert.equal(backoffDelay(0, opts, () => 0), 50);
  assert.equal(backoffDelay(3, opts, () => 1), 800);
  assert.equal(backoffDelay(10, opts, () => 1), 5000, 'capped');
  assert.equal(backoffDelay(1000, opts, () => 1), 5000, 'huge attempts do not overflow');
  assert.equal(backoffDelay(-3, opts, () => 1), 100, 'negative attempts count as the first');
  for (let a = 0; a < 12; a++) {
    for (let i = 0; i < 50; i++) {
      const d = backoffDelay(a, opts);
      const base = Math.min(5000, 100 * 2 ** a);
      assert.ok(d >= base / 2 && d <= base, `attempt ${a}: ${d}`);
    }
  }
  assert.equal(backoffDelay(2, { min: 100, max: 5000, jitter: 0 }, () => 0.3), 400, 'no jitter: exact');
});

test('the channel hash is the server FNV-1a 64', () => {
  // Values computed with the same algorithm as tidings-core's fnv1a64.
  assert.equal(channelHash(''), 0xcbf29ce484222325n);
  assert.equal(channelHash('a'), 0xaf63dc4c8601ec8cn);
  assert.equal(channelHash('chat:lobby'), CHAT_LOBBY);
});

// A cursor built by hand with the server's layout: version 1, then per channel hash (u64 BE),
// epoch length + bytes, offset as LEB128; base64url without padding.
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

test('a one-channel cursor is cut out of a multi-channel one, byte for byte', () => {
  const multi = cursor([
    ['news', 'e1', 5],
    ['chat:lobby', 'e2', 300],
  ]);
  assert.equal(cursorEntries(multi).length, 2);
  assert.equal(cursorFor(multi, 'chat:lobby'), cursor([['chat:lobby', 'e2', 300]]));
  assert.equal(cursorFor(multi, 'news'), cursor([['news', 'e1', 5]]));
  assert.equal(cursorFor(multi, 'other'), null, 'not covered');
});

test('merged cursors cover every channel, later ones winning, in canonical order', () => {
  const a = cursor([['news', 'e1', 5]]);
  const b = cursor([['chat:lobby', 'e2', 7]]);
  const newer = cursor([['news', 'e1', 9]]);
  assert.equal(mergeCursors([a, b]), cursor([['news', 'e1', 5], ['chat:lobby', 'e2', 7]]));
  assert.equal(mergeCursors([b, a]), mergeCursors([a, b]), 'order-independent encoding');
  assert.equal(mergeCursors([a, b, newer]), cursor([['news', 'e1', 9], ['chat:lobby', 'e2', 7]]));
  assert.equal(mergeCursors([null, a, undefined]), a);
  assert.equal(mergeCursors([]), null);
});

test('cursors of an unknown layout are passed through, never broken', () => {
  const future = Buffer.from([2, 1, 2, 3]).toString('base64url');
  assert.equal(cursorEntries(future), null);
  assert.equal(cursorFor(future, 'x'), future);
  const a = cursor([['news', 'e1', 5]]);
  assert.equal(mergeCursors([a, future]), null, 'a known and an unknown one cannot be merged: the caller resolves them');
  assert.equal(mergeCursors([future, future]), future, 'the same unknown cursor twice is that cursor');
  assert.equal(cursorEntries('not base64!'), null);
  assert.equal(cursorEntries(Buffer.from([1, 0, 0]).toString('base64url')), null, 'truncated');
  const good = cursor([['news', 'e1', 5]]);
  const bytes = Buffer.from(good, 'base64url');
  bytes[9] = 0x21; // '!' is not an epoch character
  assert.equal(cursorEntries(bytes.toString('base64url')), null, 'bad epoch byte');
  assert.equal(cursorEntries(good + 'AA'), null, 'trailing bytes');
  assert.equal(cursorFor('', 'x'), null);
});

test('the SSE parser handles split chunks, CRLF, comments, multi-line data and id-only blocks', () => {
  const p = new SseParser();
  const out = [];
  const stream = 'retry: 2000\r\n\r\nid: c0\n\n: ping\n\nid: c1\nevent: tidings.gap\ndata: {"channel":"a"}\n\nid: c2\ndata: one\ndata: two\n\n';
  for (let i = 0; i < stream.length; i += 3) out.push(...p.push(stream.slice(i, i + 3)));
  assert.deepEqual(out, [
    { retry: 2000 },
    { event: 'message', data: '', id: 'c0', hasData: false },
    { comment: 'ping' },
    { event: 'tidings.gap', data: '{"channel":"a"}', id: 'c1', hasData: true },
    { event: 'message', data: 'one\ntwo', id: 'c2', hasData: true },
  ]);
  assert.deepEqual(p.push('data: x\r'), [], 'a lone CR at the end waits for its LF');
  assert.deepEqual(p.push('\n\r\n'), [{ event: 'message', data: 'x', id: undefined, hasData: true }]);
});

test('the NDJSON parser returns records, heartbeats and bad lines without throwing', () => {
  const p = new NdjsonParser();
  assert.deepEqual(p.push('{"type":"ready","cur'), [], 'half a line waits');
  const out = p.push('sor":"x"}\n\n{not json}\n[1]\r\n');
  assert.equal(out.length, 4);
  assert.deepEqual(out[0], { value: { type: 'ready', cursor: 'x' } });
  assert.deepEqual(out[1], { heartbeat: true });
  assert.equal(out[2].line, '{not json}');
  assert.equal(typeof out[2].error, 'string');
  assert.deepEqual(out[3], { value: [1] });
});

const CHAT_LOBBY = (() => {
  let h = 0xcbf29ce484222325n;
  for (const b of Buffer.from('chat:lobby')) h = ((h ^ BigInt(b)) * 0x100000001b3n) & 0xffffffffffffffffn;
  return h;
})();
