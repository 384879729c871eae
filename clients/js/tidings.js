// Tidings JS client: an ES module with no dependencies (SPEC §11).
//
//   import { Tidings } from '/tidings.js';
//   const t = new Tidings('http://localhost:8080', { persist: 'session' });
//   const sub = t.subscribe('chat:lobby', { history: 50, onMessage(m) {}, onGap(g) {} });
//   await t.publish('chat:lobby', { text: 'hi' });
//
// Layout of this file: cursor helpers, frame parsers and the backoff function (pure, unit
// tested on their own), then one class per transport, then `Tidings`, which owns the
// subscriptions, picks a transport, reconnects and resumes.
//
// Design notes (why, not what):
// - One connection per `Tidings` carries every subscription, whatever the transport: a page
//   with many channels must not open one socket per channel (HTTP/1.1 allows six per origin).
// - Each subscription keeps its own one-channel cursor. Multi-channel transports (SSE, NDJSON
//   streams, polls) hand out cursors covering every channel of the connection; the client cuts
//   the one-channel part out of them and merges the parts back when it reconnects with a
//   different channel set. Cursors are opaque to applications; this module knows their layout
//   because the server that mints them also serves this file (`/tidings.js`), so the two always
//   match. A cursor whose version byte is unknown is passed through untouched instead.
// - SSE is read with `fetch` + a stream parser, not `EventSource`: EventSource only delivers
//   named events (`event: msg`) to listeners registered for that exact name, hides heartbeats
//   (so a dead connection cannot be noticed), hides HTTP status codes and reconnects on its own
//   schedule. The wire format is plain SSE either way.
// - Nothing thrown inside the client reaches the page: network failures, HTTP errors, malformed
//   frames and listener exceptions become `error` events; lost messages become gap notices.
//
// ---------------------------------------------------------------------------------------------
// BEHAVIOUR: one specification for every transport. The promise kept (SPEC §2): per channel,
// every message once and in order, or an `onGap` notice before the next one. What the client
// does, per situation (the README's "Web" section sums it up for applications):
//
//  1. Where a channel starts. `since` given to subscribe() > the persisted cursor > `history: N`
//     > from now. WebSocket: one `subscribe` op per channel with exactly that. HTTP transports
//     (one request for all channels): when no channel has a cursor and every channel asked for
//     the same `history`, that one `history=N` is sent; otherwise each channel that wants
//     history (or holds a cursor the client cannot merge) is first read alone with a short
//     poll `/poll?channel=c&history=N` (or `since=`), which needs only subscribe rights, and
//     the request then starts from the merged cursors. No channel ever gets another's history.
//  2. Position. A channel's position only moves forward: a message at or before the delivered
//     offset of the same epoch is dropped, a gap that announces nothing beyond what was
//     delivered is dropped, and a subscribe reply's cursor is applied (in frame order) only when
//     nothing of that channel was delivered since the op was sent.
//  3. A refusal is the subscription's, not the connection's. The server refusing a channel
//     (a Tidings JSON 400/401/403: forbidden, invalid channel, bad cursor) ends that
//     subscription only — `onError` fires, the others go on. WebSocket: the op's error names
//     the channel. HTTP: a one-channel request's refusal is its channel's; a multi-channel one
//     is followed by a one-channel short poll per channel to find which were refused, then the
//     rest reconnect at once. If none is refused alone, the combination was (too many
//     channels): reported as an `error`, and the client stops.
//     `invalid_cursor` is not final: a `cursor_rejected` gap, and that channel restarts from
//     now (only that channel). `401` with `getToken` first gets one retry with a fresh token.
//  4. Temporary refusals. A `/ws` subscribe op that fails with `broker_unavailable`, `timeout`
//     or `internal` is retried on the same socket with backoff. A Tidings 429/503 on connect is
//     retried on the same transport after max(backoff, `Retry-After`).
//  5. Transport failures (network error, timeout, a proxy's non-JSON answer of any status, 5xx,
//     a 404 route): fall back to the next transport at once; back off after a whole round.
//  6. A drop after connecting: reconnect with backoff and jitter, resuming every channel from
//     its cursor. The delay is at least what the server advised: `reconnect_after_ms` of a
//     disconnect notice, SSE `retry:`, `Retry-After`. A goodbye with `reconnect: false`, or a
//     `/ws` close 1008 (policy) / 1009 without a `reconnect: true` goodbye, is final. 1012
//     (restart) and `token_expired` reconnect, asking `getToken` for a new token.
//  7. Better transports. After falling back, the preferred transports are probed again every
//     `upgradeAfter` ms (default 60 s, doubling after a failed probe); one that answers
//     replaces the current connection (a resume: nothing lost, nothing twice). A reconnect after
//     a drop also starts from the preferred transport when its last try is that old.
//  8. Persisted cursors follow what the app accepted: the stored cursor moves past a message
//     only once its `onMessage` returned (or the promise it returned resolved), in order. A
//     handler that throws or rejects freezes the stored cursor before that message for the rest
//     of the page; the next page load gets that message (and the later ones) again.
//  9. history() and presence() ask the open `/ws` connection when there is one. Otherwise
//     history() reads a one-channel short poll (subscribe rights, as the `/ws` op) and
//     presence() asks `/api/channels/c/presence` (the only HTTP route for it: under `[auth]` it
//     needs an API key).
// 10. publish() retries a network error, a timeout, 429, 502, 503 (`outcome_unknown`,
//     `broker_unavailable`) and 504 up to `publishRetries` times with backoff (and
//     `Retry-After`), sending the same `Idempotency-Key` every time (`idempotency_key` on /ws),
//     so a retried publish is stored once (SPEC §13).
// 11. The page coming back (`visibilitychange` to visible, `online`) ends a pending backoff at
//     once, unless the server asked for the delay; a connection that went quiet meanwhile is
//     checked at once.
// 12. close() stops every timer and request; reconnect() reports `disconnected` at once.
// ---------------------------------------------------------------------------------------------

export const TRANSPORTS = Object.freeze(['websocket', 'sse', 'stream', 'long-poll', 'poll']);

const CHANNEL_RE = /^[A-Za-z0-9_.:@=-]{1,128}$/;

const DEFAULTS = {
  transports: TRANSPORTS,
  token: undefined,
  persist: undefined, // 'session' | 'local' | undefined
  backoff: { min: 500, max: 15000, jitter: 0.5 },
  connectTimeout: 8000,
  heartbeatTimeout: 45000, // silence on a stream longer than this means a dead connection
  pingInterval: 20000, // WebSocket application pings, to notice dead sockets
  pollInterval: 1000,
  longPollWait: 25,
  requestTimeout: 15000,
  upgradeAfter: 60000, // after a fallback, probe the preferred transports this often (0: never)
  publishRetries: 3,
  getToken: undefined,
};

// ---------------------------------------------------------------------------------------------
// Cursors (layout in crates/tidings-core/src/cursor.rs): base64url without padding of
// version byte 1, then per channel sorted by hash: FNV-1a 64 hash (u64 BE), epoch length +
// bytes, offset as LEB128. Parsing is strict (every entry well formed, hashes ascending, the
// input consumed exactly): a token that does not parse is passed through untouched, never
// rewritten from a guess.

const FNV64_OFFSET = 0xcbf29ce484222325n;
const FNV64_PRIME = 0x100000001b3n;
const U64 = (1n << 64n) - 1n;

/** FNV-1a 64-bit hash of the channel name's UTF-8 bytes, as the server computes it (a BigInt). */
export function channelHash(name) {
  let h = FNV64_OFFSET;
  for (const b of new TextEncoder().encode(name)) {
    h ^= BigInt(b);
    h = (h * FNV64_PRIME) & U64;
  }
  return h;
}

function b64urlDecode(text) {
  if (typeof text !== 'string' || !/^[A-Za-z0-9_-]+$/.test(text)) return null;
  let s = text.replace(/-/g, '+').replace(/_/g, '/');
  while (s.length % 4) s += '=';
  try {
    const bin = atob(s);
    const out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  } catch {
    return null;
  }
}

function b64urlEncode(bytes) {
  let bin = '';
  for (const b of bytes) bin += String.fromCharCode(b);
  return btoa(bin).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
}

const HASH_LEN = 8;
const MAX_EPOCH = 32;

function isEpochByte(b) {
  return (b >= 48 && b <= 57) || (b >= 65 && b <= 90) || (b >= 97 && b <= 122) || b === 45 || b === 95;
}

/** Splits a cursor into its entries: [{hash, bytes}] (bytes = the whole entry), or null. */
export function cursorEntries(cursor) {
  const raw = b64urlDecode(cursor);
  if (!raw || raw.length < 2 || raw[0] !== 1) return null;
  const entries = [];
  let i = 1;
  while (i < raw.length) {
    const start = i;
    if (i + HASH_LEN + 1 > raw.length) return null;
    let hash = 0n;
    for (let k = 0; k < HASH_LEN; k++) hash = (hash << 8n) | BigInt(raw[i + k]);
    i += HASH_LEN;
    const elen = raw[i];
    if (elen < 1 || elen > MAX_EPOCH || i + 1 + elen > raw.length) return null;
    for (let k = 1; k <= elen; k++) if (!isEpochByte(raw[i + k])) return null;
    i += 1 + elen;
    let more = true;
    let n = 0;
    while (more) {
      if (i >= raw.length || n++ >= 10) return null;
      more = (raw[i] & 0x80) !== 0;
      i++;
    }
    if (entries.length && entries[entries.length - 1].hash >= hash) return null;
    entries.push({ hash, bytes: raw.subarray(start, i) });
  }
  return entries.length ? entries : null;
}

function encodeEntries(entries) {
  const sorted = [...entries].sort((a, b) => (a.hash < b.hash ? -1 : a.hash > b.hash ? 1 : 0));
  const total = 1 + sorted.reduce((n, e) => n + e.bytes.length, 0);
  const out = new Uint8Array(total);
  out[0] = 1;
  let i = 1;
  for (const e of sorted) {
    out.set(e.bytes, i);
    i += e.bytes.length;
  }
  return b64urlEncode(out);
}

/**
 * The one-channel cursor for `channel` cut out of `cursor` (which may cover many channels).
 * Returns the cursor unchanged when its layout is unknown, and null when it does not cover the
 * channel.
 */
export function cursorFor(cursor, channel) {
  if (typeof cursor !== 'string' || !cursor) return null;
  const entries = cursorEntries(cursor);
  if (!entries) return cursor;
  const h = channelHash(channel);
  const e = entries.find((x) => x.hash === h);
  return e ? encodeEntries([e]) : null;
}

/**
 * One cursor covering every given one (later arguments win for the same channel). When any of
 * them has an unknown layout it returns that cursor if all the unknown ones are the same string
 * and no known one is left out, else null: the caller must then resolve them another way
 * (silently dropping channels from a cursor loses their backlog).
 */
export function mergeCursors(cursors) {
  const list = [...new Set(cursors.filter((c) => typeof c === 'string' && c))];
  if (list.length <= 1) return list[0] ?? null;
  const byHash = new Map();
  for (const c of list) {
    const entries = cursorEntries(c);
    if (!entries) return null;
    for (const e of entries) byHash.set(e.hash, e);
  }
  return encodeEntries([...byHash.values()]);
}

/**
 * A cursor as applications may hand it over: an ETag (`"…"` or `W/"…"`) is its cursor in
 * quotes, and the server accepts both forms; the client keeps the bare one so it can merge it.
 */
export function normalizeCursor(cursor) {
  if (typeof cursor !== 'string') return null;
  const bare = cursor.trim().replace(/^W\//, '').replace(/^"(.*)"$/, '$1');
  return bare || null;
}

// ---------------------------------------------------------------------------------------------
// Backoff

/**
 * Delay before reconnect attempt `attempt` (0-based): exponential from `min`, capped at `max`,
 * with "equal jitter" — a random part of `jitter` of it — so a server restart is not met by
 * every client at the same instant, while the delay never collapses to zero.
 */
export function backoffDelay(attempt, opts = DEFAULTS.backoff, random = Math.random) {
  const min = opts.min ?? DEFAULTS.backoff.min;
  const max = opts.max ?? DEFAULTS.backoff.max;
  const jitter = Math.min(1, Math.max(0, opts.jitter ?? DEFAULTS.backoff.jitter));
  const base = Math.min(max, min * 2 ** Math.min(Math.max(0, attempt), 30));
  return Math.round(base * (1 - jitter) + base * jitter * random());
}

// ---------------------------------------------------------------------------------------------
// Frame parsers (incremental: feed text as it arrives, get complete frames back)

/**
 * Server-Sent Events: returns [{event, data, id}] per dispatched block, `{comment}` for `:` lines
 * and `{retry}` (ms) for a valid `retry:` field (the server's advised reconnect delay).
 */
export class SseParser {
  constructor() {
    this.buf = '';
    this.reset();
  }

  reset() {
    this.event = '';
    this.data = [];
    this.id = undefined;
    this.hasData = false;
  }

  push(text) {
    this.buf += text;
    const out = [];
    for (;;) {
      const m = /\r\n|\r|\n/.exec(this.buf);
      // A lone '\r' at the end may be the first half of '\r\n': wait for more.
      if (!m || (m[0] === '\r' && m.index === this.buf.length - 1)) break;
      const line = this.buf.slice(0, m.index);
      this.buf = this.buf.slice(m.index + m[0].length);
      this.line(line, out);
    }
    return out;
  }

  line(line, out) {
    if (line === '') {
      if (this.hasData || this.id !== undefined || this.event) {
        out.push({ event: this.event || 'message', data: this.data.join('\n'), id: this.id, hasData: this.hasData });
      }
      this.reset();
      return;
    }
    if (line[0] === ':') {
      out.push({ comment: line.slice(1).trim() });
      return;
    }
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value[0] === ' ') value = value.slice(1);
    if (field === 'data') {
      this.data.push(value);
      this.hasData = true;
    } else if (field === 'event') this.event = value;
    else if (field === 'id') this.id = value;
    else if (field === 'retry' && /^[0-9]{1,9}$/.test(value)) out.push({ retry: Number(value) });
    // Unknown fields are ignored, as the SSE format wants.
  }
}

/** Newline-delimited JSON: returns [{value}] per line, [{heartbeat:true}] for empty lines, [{error, line}] for bad ones. */
export class NdjsonParser {
  constructor() {
    this.buf = '';
  }

  push(text) {
    this.buf += text;
    const out = [];
    let nl;
    while ((nl = this.buf.indexOf('\n')) >= 0) {
      const line = this.buf.slice(0, nl).replace(/\r$/, '');
      this.buf = this.buf.slice(nl + 1);
      if (line.trim() === '') {
        out.push({ heartbeat: true });
        continue;
      }
      try {
        out.push({ value: JSON.parse(line) });
      } catch (e) {
        out.push({ error: String(e && e.message ? e.message : e), line: line.slice(0, 200) });
      }
    }
    return out;
  }
}

// ---------------------------------------------------------------------------------------------
// Errors

/**
 * An error as the client reports it: `{status, code, message}` when the server answered.
 * `tidings` says the answer carried the server's JSON error body (a proxy's page does not);
 * `retryAfter` is the advised delay in ms from a `Retry-After` header.
 */
export class TidingsError extends Error {
  constructor(message, { status, code, transport, cause, tidings, retryAfter, channel } = {}) {
    super(message);
    this.name = 'TidingsError';
    this.status = status;
    this.code = code;
    this.transport = transport;
    if (channel !== undefined) this.channel = channel;
    if (tidings) this.tidings = true;
    if (retryAfter !== undefined) this.retryAfter = retryAfter;
    if (cause !== undefined) this.cause = cause;
  }
}

/** `Retry-After` (seconds or an HTTP date) in ms, capped at ten minutes; undefined if absent. */
export function retryAfterMs(value, now = Date.now()) {
  if (typeof value !== 'string' || !value.trim()) return undefined;
  const v = value.trim();
  let ms;
  if (/^[0-9]+$/.test(v)) ms = Number(v) * 1000;
  else {
    const t = Date.parse(v);
    if (Number.isNaN(t)) return undefined;
    ms = Math.max(0, t - now);
  }
  return Math.min(ms, 600000);
}

async function errorFromResponse(res, transport) {
  let code = `http_${res.status}`;
  let message = `HTTP ${res.status}`;
  let tidings = false;
  try {
    const body = await res.json();
    if (body && body.error && typeof body.error.code === 'string') {
      code = body.error.code;
      message = body.error.message || message;
      tidings = true;
    }
  } catch {
    /* not our JSON error body (a proxy's page, say): keep the status */
  }
  const retryAfter = retryAfterMs(res.headers?.get?.('retry-after'));
  return new TidingsError(message, { status: res.status, code, transport, tidings, retryAfter });
}

// The server refusing a subscribe request (behaviour 3): only its own JSON body counts, a
// proxy's 403 page is a transport failure. A 404 is a route the server lacks: fall back.
function isRefusal(err) {
  return !!(err && err.tidings && (err.status === 400 || err.status === 401 || err.status === 403));
}

// The server asking to wait (behaviour 4): retry the same transport later, do not fall back.
function isBusy(err) {
  return !!(err && err.tidings && (err.status === 429 || err.status === 503));
}

// `/ws` op errors worth retrying on the same socket (behaviour 4).
const TEMPORARY_OP_ERRORS = new Set(['broker_unavailable', 'timeout', 'internal', 'internal_error', 'unavailable', 'rate_limited']);

// Publishes whose outcome is unknown or that stored nothing: safe to retry with the same key.
function isRetryablePublish(err) {
  if (!err) return false;
  if (err.code === 'network' || err.code === 'timeout' || err.code === 'not_connected') return true;
  if (err.code === 'outcome_unknown' || err.code === 'broker_unavailable') return true;
  return err.status === 429 || err.status === 502 || err.status === 503 || err.status === 504;
}

function newIdempotencyKey() {
  if (typeof crypto !== 'undefined' && typeof crypto.randomUUID === 'function') return crypto.randomUUID();
  let s = '';
  for (let i = 0; i < 32; i++) s += Math.floor(Math.random() * 16).toString(16);
  return s;
}

function byteLength(text) {
  // Close enough for the lab's counters and much cheaper than encoding every frame.
  let n = text.length;
  for (let i = 0; i < text.length; i++) if (text.charCodeAt(i) > 0x7f) n++;
  return n;
}

// ---------------------------------------------------------------------------------------------
// Transports. Each gets a `link` (the Tidings instance's callbacks for one connection attempt)
// and reports:
//   link.opened()                         connected (headers in, or socket open)
//   link.envelope(env, connectionCursor)  a message; the cursor covers the connection's channels
//   link.gap(gap, cursor)                 a gap notice
//   link.presence(kind, body)             a join or leave
//   link.cursor(cursor)                   the subscription position (ready record, id-only block)
//   link.serverDisconnect(info)           the server said goodbye ({reason, reconnect, reconnect_after_ms})
//   link.retry(ms)                        SSE `retry:`: the server's advised reconnect delay
//   link.closed(error | null, {fatal, opened}) the connection ended
//   link.traffic(bytes, requests)         for counters
//   link.alive()                          any byte at all (heartbeats included)
//   link.problem(error)                   a non-fatal error to report (malformed frame)

class HttpStreamBase {
  constructor(link, url, kind) {
    this.link = link;
    this.url = url;
    this.kind = kind;
    this.ctrl = new AbortController();
    this.isOpen = false;
    this.done = false;
  }

  start() {
    this.run().catch((err) => this.finish(err));
  }

  async run() {
    this.link.traffic(0, 1);
    const res = await fetch(this.url, {
      signal: this.ctrl.signal,
      headers: this.link.headers(this.kind === 'sse' ? 'text/event-stream' : 'application/x-ndjson'),
      cache: 'no-store',
    });
    if (!res.ok) {
      this.finish(await errorFromResponse(res, this.kind));
      return;
    }
    if (!res.body) {
      this.finish(new TidingsError('this browser cannot read a streaming response', { transport: this.kind }));
      return;
    }
    this.isOpen = true;
    this.link.opened();
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    for (;;) {
      const { value, done } = await reader.read();
      if (done || this.done) break;
      this.link.alive();
      this.link.traffic(byteLength(value), 0);
      this.feed(value);
    }
    this.finish(this.done ? null : new TidingsError('the server ended the stream', { transport: this.kind }));
  }

  finish(err, fatal = false) {
    if (this.done) return;
    this.done = true;
    this.ctrl.abort();
    if (err && err.name === 'AbortError') err = null;
    this.link.closed(err, { fatal, opened: this.isOpen });
  }

  close() {
    if (this.done) return;
    this.done = true;
    this.ctrl.abort();
  }
}

class SseTransport extends HttpStreamBase {
  constructor(link, url) {
    super(link, url, 'sse');
    this.parser = new SseParser();
  }

  feed(text) {
    for (const f of this.parser.push(text)) {
      if (f.comment !== undefined) continue;
      if (f.retry !== undefined) {
        this.link.retry(f.retry);
        continue;
      }
      let body;
      if (f.hasData) {
        try {
          body = JSON.parse(f.data);
        } catch (e) {
          this.link.problem(new TidingsError(`malformed SSE data: ${e.message}`, { code: 'malformed_frame', transport: 'sse' }));
          continue;
        }
      }
      switch (f.event) {
        case 'tidings.gap':
          this.link.gap(body, f.id);
          break;
        case 'tidings.disconnect':
          this.link.serverDisconnect(body || {});
          break;
        case 'tidings.join':
        case 'tidings.leave':
          this.link.presence(f.event.slice(8), body);
          break;
        default:
          if (!f.hasData) {
            if (f.id) this.link.cursor(f.id);
          } else if (body && typeof body === 'object' && typeof body.channel === 'string') {
            this.link.envelope(body, f.id || body.cursor);
          } else {
            this.link.problem(new TidingsError('an SSE event that is not an envelope', { code: 'malformed_frame', transport: 'sse' }));
          }
      }
    }
  }
}

class NdjsonTransport extends HttpStreamBase {
  constructor(link, url) {
    super(link, url, 'stream');
    this.parser = new NdjsonParser();
  }

  feed(text) {
    for (const r of this.parser.push(text)) {
      if (r.heartbeat) continue;
      if (r.error) {
        this.link.problem(new TidingsError(`malformed NDJSON line: ${r.error}`, { code: 'malformed_frame', transport: 'stream' }));
        continue;
      }
      const v = r.value;
      if (!v || typeof v !== 'object') {
        this.link.problem(new TidingsError('an NDJSON record that is not an object', { code: 'malformed_frame', transport: 'stream' }));
        continue;
      }
      switch (v.type) {
        case undefined:
          if (typeof v.channel === 'string') this.link.envelope(v, v.cursor);
          else this.link.problem(new TidingsError('an NDJSON record without a channel', { code: 'malformed_frame', transport: 'stream' }));
          break;
        case 'ready':
          if (v.cursor) this.link.cursor(v.cursor);
          break;
        case 'gap': {
          const { type: _t, cursor, ...gap } = v;
          this.link.gap(gap, cursor);
          break;
        }
        case 'disconnect':
          this.link.serverDisconnect(v);
          break;
        case 'join':
        case 'leave':
          this.link.presence(v.type, v);
          break;
        default:
          break; // a newer server's record type: ignore, as the protocol allows growth
      }
    }
  }
}

class PollTransport {
  constructor(link, url, kind, opts) {
    this.link = link;
    this.url = url; // function(cursorOrNull) -> url string
    this.kind = kind;
    this.opts = opts;
    this.ctrl = new AbortController();
    this.done = false;
    this.isOpen = false;
    this.timer = null;
  }

  start() {
    this.loop().catch((err) => this.finish(err));
  }

  async loop() {
    let cursor = null;
    while (!this.done) {
      this.link.traffic(0, 1);
      const startedAt = Date.now();
      // The first long poll answers at once (it opens the connection and fixes the cursor),
      // so only the later ones are held.
      const held = !!(this.opts.wait && cursor);
      const timeout = setTimeout(() => this.ctrl.abort(), (held ? this.opts.wait : 0) * 1000 + this.opts.requestTimeout);
      let res;
      let text;
      try {
        res = await fetch(this.url(cursor), { signal: this.ctrl.signal, headers: this.link.headers('application/json'), cache: 'no-store' });
        if (!res.ok) {
          this.finish(await errorFromResponse(res, this.kind));
          return;
        }
        text = await res.text();
      } finally {
        clearTimeout(timeout);
      }
      if (this.done) return;
      this.link.traffic(byteLength(text), 0);
      this.link.alive();
      let reply;
      try {
        reply = JSON.parse(text);
      } catch (e) {
        this.finish(new TidingsError(`malformed poll reply: ${e.message}`, { code: 'malformed_frame', transport: this.kind }));
        return;
      }
      if (!reply || !Array.isArray(reply.messages) || typeof reply.cursor !== 'string') {
        this.finish(new TidingsError('a poll reply without messages and cursor', { code: 'malformed_frame', transport: this.kind }));
        return;
      }
      if (!this.isOpen) {
        this.isOpen = true;
        this.link.opened();
      }
      for (const g of Array.isArray(reply.gaps) ? reply.gaps : []) this.link.gap(g, null);
      for (const m of reply.messages) this.link.envelope(m, m.cursor);
      cursor = reply.cursor;
      this.link.cursor(cursor);
      if (this.done) return;
      // Short polls pause between requests; a long poll goes straight back — unless a held
      // poll was answered empty at once (a proxy that does not hold requests), which would spin.
      const spin = held && reply.messages.length === 0 && Date.now() - startedAt < 1000;
      if (!this.opts.wait || spin) await new Promise((r) => (this.timer = setTimeout(r, this.opts.interval)));
    }
  }

  finish(err, fatal = false) {
    if (this.done) return;
    this.done = true;
    clearTimeout(this.timer);
    this.ctrl.abort();
    if (err && err.name === 'AbortError') err = new TidingsError('poll timed out', { code: 'timeout', transport: this.kind });
    this.link.closed(err, { fatal, opened: this.isOpen });
  }

  close() {
    this.done = true;
    clearTimeout(this.timer);
    this.ctrl.abort();
  }
}

class WebSocketTransport {
  constructor(link, url, opts) {
    this.link = link;
    this.url = url;
    this.opts = opts;
    this.kind = 'websocket';
    this.ws = null;
    this.done = false;
    this.isOpen = false;
    this.nextId = 1;
    this.pending = new Map();
    this.pingTimer = null;
    this.lastHeard = Date.now();
    this.goodbye = null;
  }

  start() {
    this.link.traffic(0, 1);
    try {
      this.ws = new WebSocket(this.url);
    } catch (err) {
      queueMicrotask(() => this.finish(new TidingsError(`cannot open a WebSocket: ${err.message}`, { transport: 'websocket' })));
      return;
    }
    this.ws.onopen = () => {
      if (this.done) return;
      this.isOpen = true;
      this.lastHeard = Date.now();
      this.link.opened();
      this.pingTimer = setInterval(() => this.ping(), this.opts.pingInterval);
    };
    this.ws.onmessage = (e) => this.frame(e.data);
    this.ws.onerror = () => {
      /* onclose follows with the code; nothing to add here */
    };
    this.ws.onclose = (e) => {
      if (this.done) return;
      // 1008 (policy) and 1009 (too big) mean "do not come back" (SPEC §5) — unless the
      // server's goodbye said to reconnect (token_expired closes with 1008).
      const bye = this.goodbye;
      const fatal = (bye && bye.reconnect === false) || (!(bye && bye.reconnect !== false) && (e.code === 1008 || e.code === 1009));
      const why = e.reason ? ` (${e.reason})` : '';
      this.finish(new TidingsError(`WebSocket closed with ${e.code}${why}`, { code: `ws_${e.code}`, transport: 'websocket' }), fatal);
    };
  }

  /** Application ping; also used to check a socket at once (the page came back). */
  ping() {
    if (!this.isOpen || this.done) return;
    // The server's protocol pings are invisible to page code; an application ping is not.
    if (Date.now() - this.lastHeard > this.opts.pingInterval * 2 + 5000) {
      this.finish(new TidingsError('no answer to pings', { code: 'timeout', transport: 'websocket' }));
      return;
    }
    this.send({ op: 'ping' });
  }

  send(obj) {
    if (!this.ws || this.ws.readyState !== 1) return false;
    const text = JSON.stringify(obj);
    this.ws.send(text);
    return true;
  }

  /**
   * Sends a request and resolves with its reply (or rejects with its error). `onReply`, when
   * given, runs synchronously as the reply frame is read, before any later frame: promise
   * callbacks would run only after every frame of the same read (Node dispatches them all in
   * one task), which is how a subscribe reply's cursor once landed after the replay it precedes.
   */
  request(obj, onReply) {
    return new Promise((resolve, reject) => {
      const id = this.nextId++;
      const timer = setTimeout(() => {
        this.pending.delete(id);
        const err = new TidingsError(`no reply to ${obj.op} in time`, { code: 'timeout', transport: 'websocket' });
        if (onReply) onReply(null, err);
        reject(err);
      }, this.opts.requestTimeout);
      this.pending.set(id, { resolve, reject, timer, onReply, keyed: obj.idempotency_key !== undefined });
      if (!this.send({ id, ...obj })) {
        clearTimeout(timer);
        this.pending.delete(id);
        const err = new TidingsError('the WebSocket is not open', { code: 'not_connected', transport: 'websocket' });
        if (onReply) onReply(null, err);
        reject(err);
      }
    });
  }

  unsubscribe(channel) {
    return this.request({ op: 'unsubscribe', channel }).catch(() => {});
  }

  frame(data) {
    this.lastHeard = Date.now();
    this.link.alive();
    if (typeof data !== 'string') {
      this.link.problem(new TidingsError('a binary frame on the /ws protocol', { code: 'malformed_frame', transport: 'websocket' }));
      return;
    }
    this.link.traffic(byteLength(data), 0);
    let f;
    try {
      f = JSON.parse(data);
    } catch (e) {
      this.link.problem(new TidingsError(`malformed WebSocket frame: ${e.message}`, { code: 'malformed_frame', transport: 'websocket' }));
      return;
    }
    if (!f || typeof f !== 'object') return;
    switch (f.type) {
      case 'message': {
        const { type: _t, ...env } = f;
        this.link.envelope(env, env.cursor);
        break;
      }
      case 'reply': {
        let id = f.id;
        if ((id === null || id === undefined) && f.error && /idempotency_key/.test(f.error.message || '')) {
          // A server from before idempotent publishing cannot read the request, so it cannot
          // echo its id either: the refused one is the oldest pending keyed publish.
          for (const [k, p] of this.pending) {
            if (p.keyed) {
              id = k;
              break;
            }
          }
        }
        const p = this.pending.get(id);
        if (!p) break;
        this.pending.delete(id);
        clearTimeout(p.timer);
        const err = f.error ? new TidingsError(f.error.message || 'request failed', { code: f.error.code, transport: 'websocket', tidings: true }) : null;
        if (p.onReply) p.onReply(err ? null : f, err);
        if (err) p.reject(err);
        else p.resolve(f);
        break;
      }
      case 'gap': {
        const { type: _t, cursor, ...gap } = f;
        this.link.gap(gap, cursor);
        break;
      }
      case 'join':
      case 'leave':
        this.link.presence(f.type, f);
        break;
      case 'disconnect':
        this.goodbye = f;
        this.link.serverDisconnect(f);
        break;
      default:
        break; // pong, or a newer server's frame type
    }
  }

  finish(err, fatal = false) {
    if (this.done) return;
    this.done = true;
    this.cleanup();
    this.link.closed(err, { fatal, opened: this.isOpen });
  }

  cleanup() {
    clearInterval(this.pingTimer);
    const pending = [...this.pending.values()];
    this.pending.clear();
    for (const p of pending) {
      clearTimeout(p.timer);
      const err = new TidingsError('the connection closed', { code: 'not_connected', transport: 'websocket' });
      if (p.onReply) p.onReply(null, err);
      p.reject(err);
    }
    if (this.ws) {
      this.ws.onopen = this.ws.onmessage = this.ws.onclose = null;
      try {
        this.ws.close(1000);
      } catch {
        /* already closed */
      }
    }
  }

  close() {
    if (this.done) return;
    this.done = true;
    this.cleanup();
  }
}

// ---------------------------------------------------------------------------------------------
// Subscriptions

// At most this many messages may wait for their async onMessage before the stored cursor
// stops following (behaviour 8): the queue of unsettled handlers must stay bounded.
const MAX_UNSETTLED = 10000;

class Subscription {
  constructor(client, channel, opts) {
    this.client = client;
    this.channel = channel;
    this.opts = opts;
    /** One-channel cursor of the last message (or the subscription start). */
    this.cursor = normalizeCursor(opts.since);
    this.history = this.cursor ? 0 : Math.max(0, Math.floor(Number(opts.history) || 0));
    /** Last delivered position, to drop duplicates across reconnects and transport switches. */
    this.epoch = null;
    this.offset = 0;
    /** Deliveries so far (messages and gaps): a subscribe reply applies only if none came since. */
    this.seq = 0;
    this.active = true;
    /** Whether the current connection carries this subscription. */
    this.live = false;
    /** Persistence that follows the app's acceptance (behaviour 8). */
    this.acks = [];
    this.frozen = false;
    /** A `/ws` subscribe retried after a temporary error (behaviour 4). */
    this.retryTimer = null;
    this.retries = 0;
  }

  unsubscribe() {
    if (!this.active) return;
    this.active = false;
    clearTimeout(this.retryTimer);
    this.client._removeSubscription(this);
  }

  /** Where the next connection should start this channel. */
  start() {
    if (this.cursor) return { since: this.cursor };
    if (this.history) return { history: this.history };
    return {};
  }
}

// ---------------------------------------------------------------------------------------------
// The client

export class Tidings {
  /**
   * @param {string} [url] the server's base URL; defaults to the page's origin.
   * @param {object} [options] see tidings.d.ts.
   */
  constructor(url, options = {}) {
    const base = url || (typeof location !== 'undefined' ? location.origin : 'http://127.0.0.1:8080');
    this.url = String(base).replace(/\/+$/, '');
    this.options = { ...DEFAULTS, ...options, backoff: { ...DEFAULTS.backoff, ...(options.backoff || {}) } };
    const list = (this.options.transports || TRANSPORTS).filter((t) => TRANSPORTS.includes(t));
    this.transports = list.length ? list : [...TRANSPORTS];
    this.token = this.options.token;
    this.subs = new Map(); // channel -> Subscription
    this.listeners = new Map();
    this.state = 'disconnected';
    this.transport = null; // the transport in use (or being tried)
    this.conn = null; // the current connection attempt: {kind, isOpen, done, inner}
    this.index = 0; // which transport to try next
    this.triedThisRound = 0;
    this.attempt = 0;
    this.retryTimer = null;
    this.retryAdvised = 0; // until when the pending retry waits because the server said so
    this.connectTimer = null;
    this.probeTimer = null;
    this.probeEvery = 0;
    this.topTriedAt = 0;
    this.watchdog = null;
    this.closed = false;
    this.connCursor = null;
    this.pendingRefusal = null;
    this.retried401 = false;
    this.reportedErrors = new WeakSet(); // each error reaches the 'error' listeners once
    this.stats = { requests: 0, bytes: 0, messages: 0, reconnects: 0, gaps: 0, errors: 0 };
    this.storage = this._storage(this.options.persist);
    this._watchPage();
  }

  // -- events ------------------------------------------------------------------------------

  /** Adds a listener; returns a function that removes it. */
  on(event, fn) {
    if (typeof fn !== 'function') return () => {};
    if (!this.listeners.has(event)) this.listeners.set(event, new Set());
    this.listeners.get(event).add(fn);
    return () => this.off(event, fn);
  }

  off(event, fn) {
    this.listeners.get(event)?.delete(fn);
  }

  _emit(event, payload) {
    for (const fn of [...(this.listeners.get(event) || [])]) this._call(fn, payload, event);
  }

  // A listener that throws must not break the client (or the other listeners).
  _call(fn, payload, what) {
    try {
      return { value: fn(payload) };
    } catch (err) {
      if (what === 'error') {
        if (typeof console !== 'undefined') console.warn('tidings: an error listener threw', err);
        return { threw: err };
      }
      this._error(new TidingsError(`a ${what} listener threw: ${err && err.message}`, { code: 'listener_error', cause: err }));
      return { threw: err };
    }
  }

  _error(err) {
    this.stats.errors++;
    this._emit('error', err);
  }

  _setState(state) {
    if (this.state === state && state !== 'connecting') return;
    this.state = state;
    this._emit('state', { state, transport: this.transport });
  }

  // -- public API --------------------------------------------------------------------------

  /**
   * Follows a channel. Options: history (number), since (cursor), onMessage, onGap, onJoin,
   * onLeave, onError.
   */
  subscribe(channel, opts = {}) {
    if (typeof channel !== 'string' || !CHANNEL_RE.test(channel)) {
      const err = new TidingsError(`invalid channel name ${JSON.stringify(channel)}`, { code: 'invalid_channel', channel: String(channel) });
      const dead = new Subscription(this, String(channel), opts);
      dead.active = false;
      queueMicrotask(() => {
        if (opts.onError) this._call(opts.onError, err, 'onError');
        this._error(err);
      });
      return dead;
    }
    const existing = this.subs.get(channel);
    if (existing) existing.unsubscribe();
    const stored = !opts.since && this._load(channel);
    const sub = new Subscription(this, channel, stored ? { ...opts, since: stored } : opts);
    this.subs.set(channel, sub);
    if (this.closed) return sub;
    if (this._ws() && this.state === 'connected') this._wsSubscribe(sub);
    else this._restartSoon();
    return sub;
  }

  /**
   * Publishes; resolves to the position {channel, offset, epoch, cursor, time}. Retried with
   * one Idempotency-Key when the outcome is unknown (behaviour 10).
   */
  async publish(channel, data, opts = {}) {
    const key = typeof opts.idempotencyKey === 'string' && opts.idempotencyKey ? opts.idempotencyKey : newIdempotencyKey();
    const retries = Math.max(0, opts.retries ?? this.options.publishRetries ?? 0);
    for (let attempt = 0; ; attempt++) {
      try {
        return await this._publishOnce(channel, data, opts, key);
      } catch (err) {
        if (this.closed || attempt >= retries || !isRetryablePublish(err)) throw this._reported(err);
        const delay = Math.max(err.retryAfter ?? 0, backoffDelay(attempt, this.options.backoff));
        await new Promise((r) => setTimeout(r, delay));
      }
    }
  }

  async _publishOnce(channel, data, opts, key) {
    const ws = this._ws();
    if (ws && this.state === 'connected') {
      const req = { op: 'publish', channel, data: data === undefined ? null : data };
      if (opts.event) req.event = opts.event;
      if (!ws.noIdempotency) req.idempotency_key = key;
      let reply;
      try {
        reply = await ws.request(req);
      } catch (err) {
        // A server from before idempotent publishing refuses the unknown field (nothing was
        // stored): publish without it on this connection.
        if (err.code === 'invalid_request' && /idempotency_key/.test(err.message) && req.idempotency_key) {
          ws.noIdempotency = true;
          delete req.idempotency_key;
          reply = await ws.request(req);
        } else throw err;
      }
      const { type: _t, id: _i, ok: _o, ...position } = reply;
      return position;
    }
    const q = opts.event ? `?event=${encodeURIComponent(opts.event)}` : '';
    return this._fetchJson(`/publish/${encodeURIComponent(channel)}${q}`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', 'idempotency-key': key },
      body: JSON.stringify(data === undefined ? null : data),
    });
  }

  /** Who follows the channel: resolves to [{client, user}]. */
  async presence(channel) {
    const ws = this._ws();
    let clients;
    if (ws && this.state === 'connected') clients = (await this._report(ws.request({ op: 'presence', channel }))).clients;
    else clients = (await this._report(this._fetchJson(`/api/channels/${encodeURIComponent(channel)}/presence`))).clients;
    return (clients || []).map((c) => ({ client: c.client, user: c.user ?? null }));
  }

  /**
   * Reads history: resolves to {messages, cursor, gaps}. Over the open `/ws` connection when
   * there is one, else a one-channel short poll: either way subscribe rights suffice.
   */
  async history(channel, { since, limit } = {}) {
    const n = Math.max(1, Math.min(10000, Math.floor(Number(limit) || 100)));
    const from = normalizeCursor(since);
    const ws = this._ws();
    if (ws && this.state === 'connected') {
      const req = { op: 'history', channel, limit: n };
      if (from) req.since = from;
      const reply = await this._report(ws.request(req));
      return { messages: reply.messages || [], cursor: reply.cursor, gaps: reply.gaps || [] };
    }
    if (from) {
      const entries = cursorEntries(from);
      if (entries && !entries.some((e) => e.hash === channelHash(channel))) {
        throw this._reported(new TidingsError(`the cursor does not cover channel ${channel}`, { code: 'invalid_cursor', status: 400, channel }));
      }
    }
    const q = new URLSearchParams({ channel });
    if (from) q.set('since', from);
    else q.set('history', String(n));
    const reply = await this._report(this._fetchJson(`/poll?${q}`));
    const messages = Array.isArray(reply.messages) ? reply.messages : [];
    const gaps = Array.isArray(reply.gaps) ? reply.gaps : [];
    if (messages.length > n) {
      // A one-channel poll's message cursors are that channel's: resume after the last kept.
      const kept = messages.slice(0, n);
      return { messages: kept, cursor: kept[kept.length - 1].cursor, gaps };
    }
    return { messages, cursor: reply.cursor, gaps };
  }

  /** The token for the next connection or request (the `getToken` callback asks each time). */
  setToken(token) {
    this.token = token || undefined;
  }

  /** Ends every subscription and the connection; the state ends as 'disconnected'. */
  close() {
    this.closed = true;
    clearTimeout(this.retryTimer);
    clearTimeout(this.connectTimer);
    clearTimeout(this.probeTimer);
    this._stopWatchdog();
    for (const s of this.subs.values()) {
      clearTimeout(s.retryTimer);
      s.live = false;
    }
    if (this.conn) this.conn.close();
    this.conn = null;
    this._unwatchPage();
    this._setState('disconnected');
  }

  /**
   * Drops the connection and reconnects after the usual backoff, resuming every subscription
   * from its cursor (what the lab's "cut" button does, and what a network change looks like).
   */
  reconnect() {
    if (this.closed) return;
    clearTimeout(this.connectTimer);
    clearTimeout(this.probeTimer);
    this._stopWatchdog();
    if (this.conn) this.conn.close();
    this.conn = null;
    for (const s of this.subs.values()) s.live = false;
    this._setState('disconnected');
    this._scheduleRetry(0);
  }

  // -- connection management ---------------------------------------------------------------

  /** The open WebSocket transport, if that is what the client is connected with. */
  _ws() {
    const c = this.conn;
    return c && c.kind === 'websocket' && c.isOpen && !c.done && c.inner ? c.inner : null;
  }

  _restartSoon() {
    // Coalesce several subscribe() calls made in one tick into one (re)connection.
    if (this._restartQueued) return;
    this._restartQueued = true;
    queueMicrotask(() => {
      this._restartQueued = false;
      if (this.closed) return;
      if (this.conn) this.conn.close();
      this.conn = null;
      clearTimeout(this.connectTimer);
      clearTimeout(this.retryTimer);
      this._stopWatchdog();
      if (this.subs.size) this._connect();
      else this._setState('disconnected');
    });
  }

  _connect() {
    if (this.closed || this.conn) return;
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    this.retryAdvised = 0;
    if (!this.subs.size) {
      this._setState('disconnected');
      return;
    }
    const index = this.index % this.transports.length;
    const kind = this.transports[index];
    if (index === 0) this.topTriedAt = Date.now();
    this.transport = kind;
    this._setState('connecting');
    for (const s of this.subs.values()) s.live = false;
    const attempt = {
      kind,
      isOpen: false,
      done: false,
      inner: null,
      close() {
        this.done = true;
        if (this.inner) this.inner.close();
      },
    };
    this.conn = attempt;
    this.connCursor = null;
    this.goodbye = null;
    this.sseRetry = 0;
    clearTimeout(this.connectTimer);
    this.connectTimer = setTimeout(() => {
      if (this.conn === attempt && !attempt.isOpen) {
        attempt.close();
        this._closed(attempt, new TidingsError(`${kind} did not connect in time`, { code: 'timeout', transport: kind }), { fatal: false, opened: false });
      }
    }, this.options.connectTimeout);
    this._prepare(attempt).then(
      (ready) => {
        if (attempt.done || this.conn !== attempt) return;
        if (!ready) {
          // Everything was refused while preparing, or the combination was.
          clearTimeout(this.connectTimer);
          attempt.done = true;
          this.conn = null;
          this._setState('disconnected');
          return;
        }
        try {
          attempt.inner = this._open(kind, this._link(attempt), ready);
        } catch (err) {
          attempt.done = true;
          this._closed(attempt, err, { fatal: false, opened: false });
          return;
        }
        attempt.inner.start();
      },
      (err) => {
        if (attempt.done || this.conn !== attempt) return;
        attempt.done = true;
        this._closed(attempt, err, { fatal: false, opened: false });
      },
    );
  }

  /** Asks `getToken` (when given) for the token; a failing callback keeps the last one. */
  async _freshToken() {
    if (typeof this.options.getToken !== 'function') return this.token;
    try {
      const t = await this.options.getToken();
      if (typeof t === 'string' && t) this.token = t;
    } catch (err) {
      this._error(new TidingsError(`getToken failed: ${err && err.message}`, { code: 'token_error', cause: err }));
    }
    return this.token;
  }

  /**
   * What the connection needs before it opens (behaviours 1 and 3): a token, and on HTTP
   * transports a start every channel can share. Resolves to {since, history} or null (stop).
   */
  async _prepare(attempt) {
    await this._freshToken();
    if (attempt.done) return null;
    if (attempt.kind === 'websocket') return {};
    const refusal = this.pendingRefusal;
    this.pendingRefusal = null;
    let subs = [...this.subs.values()];
    let toRead;
    if (refusal) toRead = subs; // which channel was refused? each is asked alone
    else if (subs.length <= 1) toRead = [];
    else {
      const fresh = subs.every((s) => !s.cursor) && new Set(subs.map((s) => s.history)).size === 1;
      const cursors = subs.map((s) => s.cursor).filter(Boolean);
      const mergeable = !cursors.length || mergeCursors(cursors) !== null;
      toRead = fresh ? [] : subs.filter((s) => (!s.cursor && s.history > 0) || (!mergeable && s.cursor && !cursorEntries(s.cursor)));
    }
    let refused = 0;
    await this._eachLimited(toRead, 4, async (s) => {
      if (attempt.done || !s.active) return;
      const r = await this._pollOne(s);
      if (r.refused) {
        refused++;
        this._refusedFor(s, r.refused);
      }
    });
    if (attempt.done) return null;
    if (refusal && refused === 0) {
      // Every channel is fine alone: the server refused the combination (too many channels).
      this._error(refusal);
      return null;
    }
    subs = [...this.subs.values()];
    if (!subs.length) return null;
    const cursors = subs.map((s) => s.cursor).filter(Boolean);
    if (!cursors.length) return { history: subs[0].history || 0 };
    let since = mergeCursors(cursors);
    if (since === null) {
      // Cursors of a layout this client does not know (a newer server) that differ: keep
      // the ones it can merge and say that the others restart from now.
      const known = subs.filter((s) => s.cursor && cursorEntries(s.cursor));
      for (const s of subs) {
        if (s.cursor && !cursorEntries(s.cursor)) {
          this._forgetCursor(s);
          this._deliverGap(s, { channel: s.channel, reason: 'cursor_rejected', epoch: null, next_offset: null });
        }
      }
      since = mergeCursors(known.map((s) => s.cursor));
    }
    return { since };
  }

  async _eachLimited(items, limit, fn) {
    let next = 0;
    const worker = async () => {
      while (next < items.length) await fn(items[next++]);
    };
    await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  }

  /**
   * Reads one channel alone with a short poll from its start, delivering what it returns.
   * Resolves to {ok} or {refused: error}; throws on a transport failure.
   */
  async _pollOne(sub) {
    const q = new URLSearchParams({ channel: sub.channel });
    const start = sub.start();
    if (start.since) q.set('since', start.since);
    else if (start.history) q.set('history', String(start.history));
    let reply;
    try {
      reply = await this._fetchJson(`/poll?${q}`, {}, false);
    } catch (err) {
      if (isRefusal(err)) return { refused: err };
      throw err;
    }
    if (!sub.active) return { ok: true };
    for (const g of Array.isArray(reply.gaps) ? reply.gaps : []) this._deliverGap(sub, g, null);
    for (const m of Array.isArray(reply.messages) ? reply.messages : []) this._deliverEnvelope(sub, m, m.cursor);
    sub.history = 0;
    if (typeof reply.cursor === 'string' && reply.cursor) this._setCursor(sub, cursorFor(reply.cursor, sub.channel) || reply.cursor);
    return { ok: true };
  }

  /** The server refused this channel (behaviour 3): a stale cursor restarts, anything else ends it. */
  _refusedFor(sub, err) {
    if (err.code === 'invalid_cursor' && sub.cursor) {
      this._forgetCursor(sub);
      sub.history = 0;
      this._deliverGap(sub, { channel: sub.channel, reason: 'cursor_rejected', epoch: null, next_offset: null });
      return;
    }
    this._failSub(sub, err);
  }

  _failSub(sub, err) {
    const e = new TidingsError(err.message, { status: err.status, code: err.code, transport: err.transport, channel: sub.channel, cause: err });
    sub.active = false;
    sub.live = false;
    clearTimeout(sub.retryTimer);
    if (this.subs.get(sub.channel) === sub) this.subs.delete(sub.channel);
    if (sub.opts.onError) this._call(sub.opts.onError, e, 'onError');
    this._error(e);
  }

  _open(kind, link, ready) {
    const token = this.token;
    if (kind === 'websocket') {
      // The token goes in a header on fetch transports (URLs end up in logs); only the
      // WebSocket handshake, which cannot carry one from a browser, needs it in the query.
      const qs = token ? `?${new URLSearchParams({ token })}` : '';
      return new WebSocketTransport(link, `${this.url.replace(/^http/, 'ws')}/ws${qs}`, this.options);
    }
    const params = new URLSearchParams();
    for (const c of this.subs.keys()) params.append('channel', c);
    if (ready.since) params.set('since', ready.since);
    else if (ready.history > 0) params.set('history', String(ready.history));
    if (kind === 'sse') return new SseTransport(link, `${this.url}/sse?${params}`);
    if (kind === 'stream') return new NdjsonTransport(link, `${this.url}/stream?${params}`);
    const wait = kind === 'long-poll' ? this.options.longPollWait : 0;
    const url = (cursor) => {
      const p = new URLSearchParams(params);
      if (cursor) {
        p.delete('history');
        p.set('since', cursor);
      }
      if (wait && cursor) p.set('wait', String(wait));
      return `${this.url}/poll?${p}`;
    };
    return new PollTransport(link, url, kind, { wait, interval: this.options.pollInterval, requestTimeout: this.options.requestTimeout });
  }

  _link(attempt) {
    const self = this;
    const kind = attempt.kind;
    // Callbacks from a connection that was already replaced are ignored.
    const current = () => self.conn === attempt && !attempt.done;
    return {
      headers(accept) {
        const h = { accept };
        if (self.token) h.authorization = `Bearer ${self.token}`;
        return h;
      },
      opened() {
        if (!current()) return;
        attempt.isOpen = true;
        clearTimeout(self.connectTimer);
        self.triedThisRound = 0;
        self.retried401 = false;
        self.connectedAt = Date.now();
        self.heardSinceOpen = false;
        self._setState('connected');
        self._startWatchdog(kind);
        self._scheduleProbe(true);
        if (kind === 'websocket') for (const s of self.subs.values()) self._wsSubscribe(s);
        else for (const s of self.subs.values()) s.live = true;
      },
      envelope(env, cursor) {
        if (!current()) return;
        const sub = self.subs.get(env.channel);
        if (!sub) return;
        self._deliverEnvelope(sub, env, cursor);
      },
      gap(gap, cursor) {
        if (!current() || !gap || typeof gap.channel !== 'string') return;
        const sub = self.subs.get(gap.channel);
        if (!sub) return;
        self._deliverGap(sub, gap, cursor);
      },
      presence(kind2, body) {
        if (!current() || !body) return;
        const sub = self.subs.get(body.channel);
        const info = { channel: body.channel, client: body.client, user: body.user ?? null };
        if (sub) {
          const cb = kind2 === 'join' ? sub.opts.onJoin : sub.opts.onLeave;
          if (cb) self._call(cb, info, kind2);
        }
        self._emit(kind2, info);
      },
      cursor(cursor) {
        if (!current() || !cursor) return;
        self.connCursor = cursor;
        for (const s of self.subs.values()) {
          const c = cursorFor(cursor, s.channel);
          if (c) self._setCursor(s, c);
        }
      },
      serverDisconnect(info) {
        if (!current()) return;
        self.goodbye = info;
        const ev = { reason: info.reason, reconnect: info.reconnect !== false, transport: kind };
        if (typeof info.reconnect_after_ms === 'number') ev.reconnectAfterMs = info.reconnect_after_ms;
        self._emit('disconnect', ev);
      },
      retry(ms) {
        if (current()) self.sseRetry = ms;
      },
      closed(err, how) {
        if (!current()) return;
        attempt.done = true;
        self._closed(attempt, err, how);
      },
      traffic(bytes, requests) {
        self.stats.bytes += bytes;
        self.stats.requests += requests;
      },
      alive() {
        self.lastHeard = Date.now();
        if (current()) self.heardSinceOpen = true;
      },
      problem(err) {
        self._error(err);
      },
    };
  }

  _wsSubscribe(sub) {
    const attempt = this.conn;
    const ws = this._ws();
    if (!ws || !sub.active) return;
    clearTimeout(sub.retryTimer);
    sub.live = true;
    const seq = sub.seq;
    const start = sub.start();
    const req = { op: 'subscribe', channel: sub.channel };
    if (start.since) req.since = start.since;
    else if (start.history) req.history = start.history;
    // Handled in frame order (see request()): the replay that follows the reply moves the
    // position on; the reply's cursor must not move it back (behaviour 2).
    ws.request(req, (reply, err) => {
      if (this.conn !== attempt || attempt.done || !sub.active || this.subs.get(sub.channel) !== sub) return;
      if (!err) {
        sub.history = 0;
        sub.retries = 0;
        if (reply.cursor && sub.seq === seq) this._setCursor(sub, reply.cursor);
        return;
      }
      if (err.code === 'not_connected') return; // the reconnect subscribes again
      // A retried subscribe whose first try did arrive (its reply was late): it is in place.
      if (err.code === 'already_subscribed') return;
      if (err.code === 'invalid_cursor' && sub.cursor) {
        this._refusedFor(sub, err);
        this._wsSubscribe(sub);
        return;
      }
      if (TEMPORARY_OP_ERRORS.has(err.code)) {
        this._error(err);
        sub.retryTimer = setTimeout(() => {
          if (this.conn === attempt && sub.active) this._wsSubscribe(sub);
        }, backoffDelay(sub.retries++, this.options.backoff));
        return;
      }
      this._failSub(sub, err);
    }).catch(() => {
      /* handled in the callback above */
    });
  }

  _removeSubscription(sub) {
    if (this.subs.get(sub.channel) !== sub) return;
    this.subs.delete(sub.channel);
    if (this.closed) return;
    const ws = this._ws();
    if (ws && this.state === 'connected') {
      ws.unsubscribe(sub.channel);
      if (!this.subs.size) this._restartSoon();
    } else {
      this._restartSoon();
    }
  }

  _closed(attempt, err, { fatal, opened }) {
    if (attempt && this.conn !== attempt) return; // an old connection we already replaced
    if (attempt) attempt.done = true;
    // Opened, then dropped at once with nothing delivered: what a proxy that accepts the
    // upgrade but not the traffic looks like. Count it as a failed connect, so the client
    // falls back instead of reconnecting to the same wall forever.
    if (opened && !this.heardSinceOpen && Date.now() - (this.connectedAt || 0) < 1000) opened = false;
    clearTimeout(this.connectTimer);
    clearTimeout(this.probeTimer);
    this._stopWatchdog();
    this.conn = null;
    for (const s of this.subs.values()) {
      s.live = false;
      clearTimeout(s.retryTimer);
    }
    if (this.closed) return;
    if (isRefusal(err)) {
      this._setState('disconnected');
      const subs = [...this.subs.values()];
      if (err.status === 401 && typeof this.options.getToken === 'function' && !this.retried401) {
        this.retried401 = true; // one more try with what getToken gives now
      } else if (subs.length === 1) {
        this._refusedFor(subs[0], err);
      } else {
        this.pendingRefusal = err; // the next attempt asks each channel alone first
      }
      if (!this.subs.size) return;
      this.retryTimer = setTimeout(() => this._connect(), 0);
      return;
    }
    if (err) this._error(err);
    const bye = this.goodbye;
    if (fatal || (bye && bye.reconnect === false)) {
      // The server said not to come back (policy, banned): every transport would get the
      // same answer, so stop and let the page decide.
      this._setState('disconnected');
      return;
    }
    let advised = 0;
    if (bye && typeof bye.reconnect_after_ms === 'number' && bye.reconnect_after_ms >= 0) advised = Math.min(bye.reconnect_after_ms, 600000);
    if (err && typeof err.retryAfter === 'number') advised = Math.max(advised, err.retryAfter);
    if (attempt && attempt.kind === 'sse' && opened && this.sseRetry) advised = Math.max(advised, this.sseRetry);
    if (isBusy(err)) {
      // The server is there and asked to wait: another transport would be told the same.
      this._setState('disconnected');
      this._scheduleRetry(advised);
      return;
    }
    if (!opened) {
      // Could not connect with this transport: fall back to the next one at once, and back
      // off only after a whole round failed.
      this.index = (this.index + 1) % this.transports.length;
      this.triedThisRound++;
      this._setState('disconnected');
      if (this.triedThisRound < this.transports.length) {
        this.retryTimer = setTimeout(() => this._connect(), 50);
        return;
      }
      this.triedThisRound = 0;
    } else {
      if (Date.now() - (this.connectedAt || 0) > 10000) this.attempt = 0; // it had been working
      // A drop is a good moment to try the preferred transport again, if not tried lately.
      const every = this.options.upgradeAfter;
      if (this.index % this.transports.length !== 0 && every > 0 && Date.now() - this.topTriedAt > every) this.index = 0;
    }
    this._setState('disconnected');
    this._scheduleRetry(advised);
  }

  _scheduleRetry(advised = 0) {
    clearTimeout(this.retryTimer);
    const delay = Math.max(advised, backoffDelay(this.attempt++, this.options.backoff));
    this.retryAdvised = advised > 0 ? Date.now() + advised : 0;
    this.stats.reconnects++;
    this.retryTimer = setTimeout(() => {
      this.retryTimer = null;
      this.conn = null;
      this._connect();
    }, delay);
  }

  _startWatchdog(kind) {
    this._stopWatchdog();
    if (kind === 'websocket' || kind === 'poll') return; // pings / each request cover these
    this.lastHeard = Date.now();
    this.watchLimit = kind === 'long-poll' ? this.options.longPollWait * 1000 + this.options.heartbeatTimeout : this.options.heartbeatTimeout;
    this.watchdog = setInterval(() => this._checkAlive(), Math.min(5000, this.watchLimit));
  }

  _checkAlive() {
    const conn = this.conn;
    if (!conn || !conn.isOpen || conn.done) return;
    if (conn.kind === 'websocket') {
      conn.inner?.ping();
      return;
    }
    if (!this.watchdog) return;
    if (Date.now() - this.lastHeard > this.watchLimit) {
      conn.close();
      this._closed(conn, new TidingsError(`no data or heartbeat for ${Math.round(this.watchLimit / 1000)} s`, { code: 'timeout', transport: conn.kind }), { fatal: false, opened: true });
    }
  }

  _stopWatchdog() {
    clearInterval(this.watchdog);
    this.watchdog = null;
  }

  // -- going back to a better transport (behaviour 7) ---------------------------------------

  _scheduleProbe(fresh) {
    clearTimeout(this.probeTimer);
    const every = this.options.upgradeAfter;
    const index = this.index % this.transports.length;
    if (!(every > 0) || index === 0 || this.closed) return;
    if (fresh) this.probeEvery = every;
    const delay = Math.round(this.probeEvery * (0.8 + 0.4 * Math.random()));
    this.probeTimer = setTimeout(() => this._probe(), delay);
  }

  async _probe() {
    const conn = this.conn;
    if (!conn || !conn.isOpen || conn.done || this.closed) return;
    const current = this.index % this.transports.length;
    for (let i = 0; i < current; i++) {
      const ok = await this._probeOne(this.transports[i]).catch(() => false);
      if (this.conn !== conn || conn.done || this.closed) return;
      if (ok) {
        // Switch: a resume from every cursor, so nothing is lost or delivered twice.
        clearTimeout(this.connectTimer);
        this._stopWatchdog();
        conn.close();
        this.conn = null;
        this.index = i;
        this.triedThisRound = 0;
        this._connect();
        return;
      }
    }
    this.probeEvery = Math.min(this.probeEvery * 2, 600000);
    this._scheduleProbe(false);
  }

  /** Whether `kind` works now: a WebSocket that answers a ping, or a stream that sends a byte. */
  _probeOne(kind) {
    const channel = this.subs.keys().next().value;
    if (!channel) return Promise.resolve(false);
    const limit = this.options.connectTimeout;
    if (kind === 'websocket') {
      return new Promise((resolve) => {
        let ws;
        const done = (ok) => {
          clearTimeout(timer);
          if (ws) {
            ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
            try {
              ws.close(1000);
            } catch {
              /* already closed */
            }
          }
          resolve(ok);
        };
        const timer = setTimeout(() => done(false), limit);
        try {
          const qs = this.token ? `?${new URLSearchParams({ token: this.token })}` : '';
          ws = new WebSocket(`${this.url.replace(/^http/, 'ws')}/ws${qs}`);
        } catch {
          done(false);
          return;
        }
        ws.onopen = () => ws.send(JSON.stringify({ op: 'ping' }));
        ws.onmessage = (e) => {
          try {
            if (JSON.parse(e.data).type === 'pong') done(true);
          } catch {
            done(false);
          }
        };
        ws.onerror = () => done(false);
        ws.onclose = () => done(false);
      });
    }
    const ctrl = new AbortController();
    const timer = setTimeout(() => ctrl.abort(), limit);
    const path = kind === 'sse' ? '/sse' : kind === 'stream' ? '/stream' : '/poll';
    const headers = { accept: kind === 'sse' ? 'text/event-stream' : kind === 'stream' ? 'application/x-ndjson' : 'application/json' };
    if (this.token) headers.authorization = `Bearer ${this.token}`;
    return (async () => {
      try {
        const res = await fetch(`${this.url}${path}?${new URLSearchParams({ channel })}`, { signal: ctrl.signal, headers, cache: 'no-store' });
        if (!res.ok || !res.body) return false;
        const reader = res.body.getReader();
        const { done } = await reader.read();
        return !done;
      } catch {
        return false;
      } finally {
        clearTimeout(timer);
        ctrl.abort();
      }
    })();
  }

  // -- the page going away and coming back (behaviour 11) ----------------------------------

  _watchPage() {
    this._wake = () => this._wakeUp();
    this._visible = () => {
      if (typeof document !== 'undefined' && document.visibilityState === 'visible') this._wakeUp();
    };
    try {
      if (typeof window !== 'undefined' && typeof window.addEventListener === 'function') window.addEventListener('online', this._wake);
      if (typeof document !== 'undefined' && typeof document.addEventListener === 'function') document.addEventListener('visibilitychange', this._visible);
    } catch {
      /* not a browser */
    }
  }

  _unwatchPage() {
    try {
      if (typeof window !== 'undefined' && typeof window.removeEventListener === 'function') window.removeEventListener('online', this._wake);
      if (typeof document !== 'undefined' && typeof document.removeEventListener === 'function') document.removeEventListener('visibilitychange', this._visible);
    } catch {
      /* not a browser */
    }
  }

  _wakeUp() {
    if (this.closed || !this.subs.size) return;
    if (this.conn) {
      this._checkAlive();
      return;
    }
    if (this.retryTimer && Date.now() >= this.retryAdvised) {
      clearTimeout(this.retryTimer);
      this.retryTimer = null;
      this.attempt = 0;
      this._connect();
    }
  }

  // -- delivery ----------------------------------------------------------------------------

  _deliverEnvelope(sub, env, cursor) {
    if (typeof env.offset === 'number' && env.epoch === sub.epoch && env.offset <= sub.offset) return; // duplicate
    sub.epoch = env.epoch ?? sub.epoch;
    if (typeof env.offset === 'number') sub.offset = env.offset;
    sub.history = 0;
    sub.seq++;
    const own = cursorFor(cursor || env.cursor, sub.channel);
    if (own) sub.cursor = own;
    this.stats.messages++;
    const msg = { ...env, cursor: own || env.cursor };
    let outcome = { value: undefined };
    if (sub.opts.onMessage) outcome = this._call(sub.opts.onMessage, msg, 'onMessage');
    this._emit('message', msg);
    if (own) this._accepted(sub, own, outcome);
  }

  _deliverGap(sub, gap, cursor) {
    // A gap that announces nothing beyond what was delivered (sent again for an old cursor)
    // must not reset the duplicate filter (behaviour 2).
    if (gap.epoch != null && gap.epoch === sub.epoch && typeof gap.next_offset === 'number' && gap.next_offset <= sub.offset + 1 && sub.offset > 0) return;
    this.stats.gaps++;
    sub.seq++;
    // After a gap the offsets continue in a (possibly) new epoch: reset the duplicate filter.
    sub.epoch = gap.epoch ?? null;
    sub.offset = typeof gap.next_offset === 'number' ? gap.next_offset - 1 : 0;
    const own = cursorFor(cursor, sub.channel);
    if (own) this._setCursor(sub, own);
    const notice = { channel: gap.channel ?? sub.channel, epoch: gap.epoch ?? null, next_offset: gap.next_offset ?? null, reason: gap.reason };
    if (sub.opts.onGap) this._call(sub.opts.onGap, notice, 'onGap');
    this._emit('gap', notice);
  }

  _setCursor(sub, cursor) {
    sub.cursor = cursor;
    this._accepted(sub, cursor, { value: undefined });
  }

  /**
   * The stored cursor follows what the app accepted, in order (behaviour 8): `outcome` is the
   * onMessage call's ({value} — maybe a promise — or {threw}).
   */
  _accepted(sub, cursor, outcome) {
    if (!this.storage || sub.frozen) return;
    const value = outcome.value;
    const pending = value && typeof value.then === 'function';
    if (!pending && !sub.acks.length) {
      if (outcome.threw !== undefined) sub.frozen = true;
      else this._save(sub.channel, cursor);
      return;
    }
    if (sub.acks.length >= MAX_UNSETTLED) {
      sub.frozen = true;
      sub.acks = [];
      this._error(new TidingsError(`more than ${MAX_UNSETTLED} onMessage promises of ${sub.channel} unsettled: its stored cursor stops here`, { code: 'ack_backlog', channel: sub.channel }));
      return;
    }
    const entry = { cursor, state: pending ? 'pending' : outcome.threw !== undefined ? 'failed' : 'ok' };
    sub.acks.push(entry);
    if (pending) {
      Promise.resolve(value).then(
        () => {
          entry.state = 'ok';
          this._flushAcks(sub);
        },
        (err) => {
          entry.state = 'failed';
          this._error(new TidingsError(`an onMessage promise rejected: ${err && err.message}`, { code: 'listener_error', cause: err, channel: sub.channel }));
          this._flushAcks(sub);
        },
      );
    } else this._flushAcks(sub);
  }

  _flushAcks(sub) {
    let last = null;
    while (sub.acks.length && sub.acks[0].state !== 'pending' && !sub.frozen) {
      const e = sub.acks.shift();
      if (e.state === 'failed') sub.frozen = true;
      else last = e.cursor;
    }
    if (sub.frozen) sub.acks = [];
    if (last && sub.active) this._save(sub.channel, last);
  }

  _forgetCursor(sub) {
    sub.cursor = null;
    sub.epoch = null;
    sub.offset = 0;
    sub.acks = [];
    this._save(sub.channel, null);
  }

  // -- persistence -------------------------------------------------------------------------

  _storage(kind) {
    try {
      if (kind === 'session' && typeof sessionStorage !== 'undefined') return sessionStorage;
      if (kind === 'local' && typeof localStorage !== 'undefined') return localStorage;
    } catch {
      /* storage disabled (privacy mode): persist nothing */
    }
    return null;
  }

  _key(channel) {
    return `tidings:${this.url}:${channel}`;
  }

  _load(channel) {
    if (!this.storage) return null;
    try {
      const v = this.storage.getItem(this._key(channel));
      return v && /^[A-Za-z0-9_-]{1,8192}$/.test(v) ? v : null;
    } catch {
      return null;
    }
  }

  _save(channel, cursor) {
    if (!this.storage) return;
    try {
      if (cursor) this.storage.setItem(this._key(channel), cursor);
      else this.storage.removeItem(this._key(channel));
    } catch {
      /* quota or disabled storage: resume within this page still works */
    }
  }

  // -- HTTP helpers ------------------------------------------------------------------------

  /** A JSON request; errors are thrown as TidingsError (and reported when `report`). */
  async _fetchJson(path, init = {}, report = false) {
    const headers = { accept: 'application/json', ...(init.headers || {}) };
    if (this.token) headers.authorization = `Bearer ${this.token}`;
    const ctrl = new AbortController();
    const timer = setTimeout(() => ctrl.abort(), this.options.requestTimeout);
    const fail = (err) => (report ? this._reported(err) : err);
    let res;
    this.stats.requests++;
    try {
      res = await fetch(`${this.url}${path}`, { ...init, headers, signal: ctrl.signal, cache: 'no-store' });
    } catch (err) {
      clearTimeout(timer);
      const code = err && err.name === 'AbortError' ? 'timeout' : 'network';
      throw fail(new TidingsError(`request failed: ${err && err.message}`, { code, cause: err }));
    }
    try {
      if (!res.ok) throw fail(await errorFromResponse(res, null));
      try {
        return await res.json();
      } catch (err) {
        throw fail(new TidingsError('the reply is not JSON', { code: 'malformed_reply', status: res.status, cause: err }));
      }
    } finally {
      clearTimeout(timer);
    }
  }

  _reported(err) {
    if (!this.reportedErrors.has(err)) {
      this.reportedErrors.add(err);
      this._error(err);
    }
    return err;
  }

  async _report(promise) {
    try {
      return await promise;
    } catch (err) {
      throw this._reported(err);
    }
  }
}

export default Tidings;
