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

/** The transports, in the default order of preference. */
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
 * One cursor covering every given one (later arguments win for the same channel). Falls back
 * to the last cursor when any of them has an unknown layout.
 */
export function mergeCursors(cursors) {
  const list = cursors.filter((c) => typeof c === 'string' && c);
  if (list.length <= 1) return list[0] ?? null;
  const byHash = new Map();
  for (const c of list) {
    const entries = cursorEntries(c);
    if (!entries) return list[list.length - 1];
    for (const e of entries) byHash.set(e.hash, e);
  }
  return encodeEntries([...byHash.values()]);
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

/** Server-Sent Events: returns [{event, data, id}] per dispatched block; `{comment}` for `:` lines. */
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
    // `retry:` and unknown fields are ignored: the client has its own backoff.
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

/** An error as the client reports it: `{status, code, message}` when the server answered. */
export class TidingsError extends Error {
  constructor(message, { status, code, transport, cause } = {}) {
    super(message);
    this.name = 'TidingsError';
    this.status = status;
    this.code = code;
    this.transport = transport;
    if (cause !== undefined) this.cause = cause;
  }
}

async function errorFromResponse(res, transport) {
  let code = `http_${res.status}`;
  let message = `HTTP ${res.status}`;
  try {
    const body = await res.json();
    if (body && body.error) {
      code = body.error.code || code;
      message = body.error.message || message;
    }
  } catch {
    /* not our JSON error body (a proxy's page, say): keep the status */
  }
  return new TidingsError(message, { status: res.status, code, transport });
}

// Errors the server will answer again whatever the transport: retrying elsewhere is pointless.
function isFatalStatus(status) {
  return status === 400 || status === 401 || status === 403 || status === 404 || status === 413 || status === 415;
}

function byteLength(text) {
  // Close enough for the lab's counters and much cheaper than encoding every frame.
  let n = text.length;
  for (let i = 0; i < text.length; i++) if (text.charCodeAt(i) > 0x7f) n++;
  return n;
}

// ---------------------------------------------------------------------------------------------
// Transports. Each gets a `link` (the Tidings instance's callbacks) and reports:
//   link.opened()                         connected (headers in, or socket open)
//   link.envelope(env, connectionCursor)  a message; the cursor covers the connection's channels
//   link.gap(gap, cursor)                 a gap notice
//   link.presence(kind, body)             a join or leave
//   link.cursor(cursor)                   the subscription position (ready record, id-only block)
//   link.serverDisconnect(info)           the server said goodbye ({reason, reconnect})
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
      const err = await errorFromResponse(res, this.kind);
      this.finish(err, isFatalStatus(res.status));
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
      const timeout = setTimeout(() => this.ctrl.abort(), (cursor ? this.opts.wait || 0 : 0) * 1000 + this.opts.requestTimeout);
      let res;
      let text;
      try {
        res = await fetch(this.url(cursor), { signal: this.ctrl.signal, headers: this.link.headers('application/json'), cache: 'no-store' });
        if (!res.ok) {
          const err = await errorFromResponse(res, this.kind);
          this.finish(err, isFatalStatus(res.status));
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
      // Short polls pause between requests; a long poll goes straight back — unless it was
      // answered empty at once (a proxy that does not hold requests), which would spin.
      const spin = this.opts.wait && reply.messages.length === 0 && Date.now() - startedAt < 1000;
      if (!this.opts.wait || spin) await new Promise((r) => (this.timer = setTimeout(r, this.opts.interval)));
    }
  }

  finish(err, fatal = false) {
    if (this.done) return;
    this.done = true;
    clearTimeout(this.timer);
    this.ctrl.abort();
    if (err && err.name === 'AbortError') err = new TidingsError('poll timed out', { transport: this.kind });
    this.link.closed(err, { fatal, opened: this.isOpen });
  }

  close() {
    this.done = true;
    clearTimeout(this.timer);
    this.ctrl.abort();
  }
}

// WebSocket close codes that mean "do not come back" (SPEC §5): policy/auth, too big.
const WS_FATAL_CODES = new Set([1008, 1009]);

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
      const fatal = WS_FATAL_CODES.has(e.code) || (this.goodbye && this.goodbye.reconnect === false);
      const why = e.reason ? ` (${e.reason})` : '';
      this.finish(new TidingsError(`WebSocket closed with ${e.code}${why}`, { code: `ws_${e.code}`, transport: 'websocket' }), fatal);
    };
  }

  ping() {
    if (!this.isOpen || this.done) return;
    // The server's protocol pings are invisible to page code; an application ping is not.
    if (Date.now() - this.lastHeard > this.opts.pingInterval * 2 + 5000) {
      this.finish(new TidingsError('no answer to pings', { transport: 'websocket' }));
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

  /** Sends a request and resolves with its reply (or rejects with its error). */
  request(obj) {
    return new Promise((resolve, reject) => {
      const id = this.nextId++;
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new TidingsError(`no reply to ${obj.op} in time`, { code: 'timeout', transport: 'websocket' }));
      }, this.opts.requestTimeout);
      this.pending.set(id, { resolve, reject, timer });
      if (!this.send({ id, ...obj })) {
        clearTimeout(timer);
        this.pending.delete(id);
        reject(new TidingsError('the WebSocket is not open', { code: 'not_connected', transport: 'websocket' }));
      }
    });
  }

  subscribe(channel, start) {
    const req = { op: 'subscribe', channel };
    if (start.since) req.since = start.since;
    else if (start.history) req.history = start.history;
    return this.request(req);
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
        const p = this.pending.get(f.id);
        if (!p) break;
        this.pending.delete(f.id);
        clearTimeout(p.timer);
        if (f.error) p.reject(new TidingsError(f.error.message || 'request failed', { code: f.error.code, transport: 'websocket' }));
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
    for (const p of this.pending.values()) {
      clearTimeout(p.timer);
      p.reject(new TidingsError('the connection closed', { code: 'not_connected', transport: 'websocket' }));
    }
    this.pending.clear();
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

class Subscription {
  constructor(client, channel, opts) {
    this.client = client;
    this.channel = channel;
    this.opts = opts;
    /** One-channel cursor of the last message (or the subscription start). */
    this.cursor = opts.since || null;
    this.history = opts.since ? 0 : opts.history || 0;
    /** Last delivered position, to drop duplicates across reconnects and transport switches. */
    this.epoch = null;
    this.offset = 0;
    this.active = true;
    /** Whether the current connection carries this subscription. */
    this.live = false;
  }

  unsubscribe() {
    if (!this.active) return;
    this.active = false;
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
    this.subs = new Map(); // channel -> Subscription
    this.listeners = new Map();
    this.state = 'disconnected';
    this.transport = null; // the transport in use (or being tried)
    this.conn = null;
    this.index = 0; // which transport to try next
    this.triedThisRound = 0;
    this.attempt = 0;
    this.retryTimer = null;
    this.watchdog = null;
    this.closed = false;
    this.connCursor = null;
    this.stats = { requests: 0, bytes: 0, messages: 0, reconnects: 0, gaps: 0, errors: 0 };
    this.storage = this._storage(this.options.persist);
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
      fn(payload);
    } catch (err) {
      if (what === 'error') {
        if (typeof console !== 'undefined') console.warn('tidings: an error listener threw', err);
        return;
      }
      this._error(new TidingsError(`a ${what} listener threw: ${err && err.message}`, { code: 'listener_error', cause: err }));
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
      const err = new TidingsError(`invalid channel name ${JSON.stringify(channel)}`, { code: 'invalid_channel' });
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
    if (this.conn && this.state === 'connected' && this.conn.kind === 'websocket') this._wsSubscribe(sub);
    else this._restartSoon();
    return sub;
  }

  /** Publishes; resolves to the position {channel, offset, epoch, cursor, time}. */
  async publish(channel, data, opts = {}) {
    if (this.conn && this.conn.kind === 'websocket' && this.state === 'connected') {
      const req = { op: 'publish', channel, data };
      if (opts.event) req.event = opts.event;
      const reply = await this._report(this.conn.request(req));
      const { type: _t, id: _i, ok: _o, ...position } = reply;
      return position;
    }
    const q = opts.event ? `?event=${encodeURIComponent(opts.event)}` : '';
    return this._fetchJson(`/publish/${encodeURIComponent(channel)}${q}`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify(data === undefined ? null : data),
    });
  }

  /** Who follows the channel: resolves to [{client, user}]. */
  async presence(channel) {
    if (this.conn && this.conn.kind === 'websocket' && this.state === 'connected') {
      return (await this._report(this.conn.request({ op: 'presence', channel }))).clients || [];
    }
    const body = await this._fetchJson(`/api/channels/${encodeURIComponent(channel)}/presence`);
    return body.clients || [];
  }

  /** Reads history: resolves to {messages, cursor, gaps}. */
  async history(channel, { since, limit } = {}) {
    const q = new URLSearchParams();
    if (since) q.set('since', since);
    if (limit) q.set('limit', String(limit));
    const qs = q.toString();
    return this._fetchJson(`/api/channels/${encodeURIComponent(channel)}/history${qs ? `?${qs}` : ''}`);
  }

  /** Ends every subscription and the connection; the state ends as 'disconnected'. */
  close() {
    this.closed = true;
    clearTimeout(this.retryTimer);
    this._stopWatchdog();
    if (this.conn) this.conn.close();
    this.conn = null;
    for (const s of this.subs.values()) s.live = false;
    this._setState('disconnected');
  }

  /**
   * Drops the connection and reconnects after the usual backoff, resuming every subscription
   * from its cursor (what the lab's "cut" button does, and what a network change looks like).
   */
  reconnect() {
    if (this.closed) return;
    if (this.conn) this.conn.close();
    this.conn = null;
    this._scheduleRetry();
  }

  // -- connection management ---------------------------------------------------------------

  _restartSoon() {
    // Coalesce several subscribe() calls made in one tick into one (re)connection.
    if (this._restartQueued) return;
    this._restartQueued = true;
    queueMicrotask(() => {
      this._restartQueued = false;
      if (this.closed) return;
      if (this.conn) this.conn.close();
      this.conn = null;
      clearTimeout(this.retryTimer);
      if (this.subs.size) this._connect();
      else this._setState('disconnected');
    });
  }

  _connect() {
    if (this.closed || this.conn) return;
    clearTimeout(this.retryTimer);
    if (!this.subs.size) {
      this._setState('disconnected');
      return;
    }
    const kind = this.transports[this.index % this.transports.length];
    this.transport = kind;
    this._setState('connecting');
    for (const s of this.subs.values()) s.live = false;
    let conn;
    const holder = { conn: null };
    try {
      conn = this._open(kind, holder);
      holder.conn = conn;
    } catch (err) {
      this._closed(null, err, { fatal: false, opened: false });
      return;
    }
    this.conn = conn;
    this.connCursor = null;
    this.goodbye = null;
    const thisConn = conn;
    this.connectTimer = setTimeout(() => {
      if (this.conn === thisConn && !thisConn.isOpen) {
        thisConn.close();
        this._closed(thisConn, new TidingsError(`${kind} did not connect in time`, { code: 'timeout', transport: kind }), { fatal: false, opened: false });
      }
    }, this.options.connectTimeout);
    conn.start();
  }

  _open(kind, holder) {
    const link = this._link(kind, holder);
    const channels = [...this.subs.keys()];
    const params = new URLSearchParams();
    for (const c of channels) params.append('channel', c);
    // The token goes in a header on fetch transports (URLs end up in logs); only the
    // WebSocket handshake, which cannot carry one from a browser, needs it in the query.
    if (kind === 'websocket') {
      const wsParams = new URLSearchParams();
      if (this.options.token) wsParams.set('token', this.options.token);
      const qs = wsParams.toString();
      const url = `${this.url.replace(/^http/, 'ws')}/ws${qs ? `?${qs}` : ''}`;
      return new WebSocketTransport(link, url, this.options);
    }
    // HTTP transports take one start for every channel: a merged cursor, or history=N.
    const subs = [...this.subs.values()];
    const since = mergeCursors(subs.map((s) => s.cursor));
    const wantHistory = subs.filter((s) => !s.cursor && s.history > 0);
    if (since) {
      params.set('since', since);
      // Channels that asked for history but have no cursor yet are pre-read below.
    } else if (wantHistory.length) {
      params.set('history', String(Math.max(...wantHistory.map((s) => s.history))));
    }
    const preRead = since ? wantHistory : [];
    if (preRead.length) {
      // Rare: a new channel with `history` joins channels that resume from cursors. Read its
      // history first (that also gives it a cursor), then connect with every cursor merged.
      return this._preReadThen(kind, preRead);
    }
    const path = kind === 'sse' ? '/sse' : kind === 'stream' ? '/stream' : '/poll';
    if (kind === 'sse') return new SseTransport(link, `${this.url}${path}?${params}`);
    if (kind === 'stream') return new NdjsonTransport(link, `${this.url}${path}?${params}`);
    const wait = kind === 'long-poll' ? this.options.longPollWait : 0;
    const url = (cursor) => {
      const p = new URLSearchParams(params);
      if (cursor) {
        p.delete('history');
        p.set('since', cursor);
      }
      // The first long poll answers at once: it opens the connection and fixes the cursor.
      if (wait && cursor) p.set('wait', String(wait));
      return `${this.url}/poll?${p}`;
    };
    return new PollTransport(link, url, kind, { wait, interval: this.options.pollInterval, requestTimeout: this.options.requestTimeout });
  }

  _preReadThen(kind, subs) {
    const self = this;
    const placeholder = {
      kind,
      isOpen: false,
      closedFlag: false,
      start() {
        Promise.all(
          subs.map(async (s) => {
            const h = await self.history(s.channel, { limit: s.history });
            if (this.closedFlag) return;
            for (const g of h.gaps || []) self._deliverGap(s, g);
            for (const m of h.messages || []) self._deliverEnvelope(s, m, m.cursor);
            s.history = 0;
            if (h.cursor) self._setCursor(s, h.cursor);
          }),
        ).then(
          () => {
            if (this.closedFlag || self.conn !== placeholder) return;
            self.conn = null;
            self._connect();
          },
          (err) => {
            if (this.closedFlag || self.conn !== placeholder) return;
            self._closed(placeholder, err, { fatal: false, opened: false });
          },
        );
      },
      close() {
        this.closedFlag = true;
      },
    };
    return placeholder;
  }

  _link(kind, holder) {
    const self = this;
    // Callbacks from a connection that was already replaced are ignored.
    const current = () => holder.conn !== null && self.conn === holder.conn;
    return {
      headers(accept) {
        const h = { accept };
        if (self.options.token) h.authorization = `Bearer ${self.options.token}`;
        return h;
      },
      opened() {
        if (!current()) return;
        clearTimeout(self.connectTimer);
        self.triedThisRound = 0;
        self._setState('connected');
        self._startWatchdog(kind);
        if (kind === 'websocket') for (const s of self.subs.values()) self._wsSubscribe(s);
        else for (const s of self.subs.values()) s.live = true;
        self.connectedAt = Date.now();
        self.heardSinceOpen = false;
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
        self._emit('disconnect', { reason: info.reason, reconnect: info.reconnect !== false, transport: kind });
      },
      closed(err, how) {
        if (holder.conn) self._closed(holder.conn, err, how);
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
    const conn = this.conn;
    if (!conn || conn.kind !== 'websocket') return;
    sub.live = true;
    conn.subscribe(sub.channel, sub.start()).then(
      (reply) => {
        if (this.conn !== conn || !sub.active) return;
        sub.history = 0;
        if (reply.cursor) this._setCursor(sub, reply.cursor);
      },
      (err) => {
        if (this.conn !== conn || !sub.active) return;
        if (err.code === 'invalid_cursor' && sub.cursor) {
          // A cursor the server cannot read (a stale stored one, say): report it as a gap,
          // then follow the channel from now.
          this._forgetCursor(sub);
          this._deliverGap(sub, { channel: sub.channel, reason: 'cursor_rejected', epoch: null, next_offset: null });
          this._wsSubscribe(sub);
          return;
        }
        if (err.code === 'not_connected') return;
        if (sub.opts.onError) this._call(sub.opts.onError, err, 'onError');
        this._error(err);
      },
    );
  }

  _removeSubscription(sub) {
    if (this.subs.get(sub.channel) !== sub) return;
    this.subs.delete(sub.channel);
    if (this.closed) return;
    if (this.conn && this.conn.kind === 'websocket' && this.state === 'connected') {
      this.conn.unsubscribe(sub.channel);
      if (!this.subs.size) this._restartSoon();
    } else {
      this._restartSoon();
    }
  }

  _closed(conn, err, { fatal, opened }) {
    if (conn && this.conn !== conn) return; // an old connection we already replaced
    // Opened, then dropped at once with nothing delivered: what a proxy that accepts the
    // upgrade but not the traffic looks like. Count it as a failed connect, so the client
    // falls back instead of reconnecting to the same wall forever.
    if (opened && !this.heardSinceOpen && Date.now() - (this.connectedAt || 0) < 1000) opened = false;
    clearTimeout(this.connectTimer);
    this._stopWatchdog();
    this.conn = null;
    for (const s of this.subs.values()) s.live = false;
    if (this.closed) return;
    if (err) this._error(err);
    if (err && err.code === 'invalid_cursor') {
      // Stale cursors (a stored one from another server run, say): start over from now and
      // say so through gap notices rather than retrying the same request forever.
      for (const s of this.subs.values()) {
        if (s.cursor) {
          this._forgetCursor(s);
          this._deliverGap(s, { channel: s.channel, reason: 'cursor_rejected', epoch: null, next_offset: null });
        }
      }
      this._setState('disconnected');
      this._scheduleRetry();
      return;
    }
    if (fatal || (this.goodbye && this.goodbye.reconnect === false)) {
      // The server refused the request itself (bad channel, auth): every transport would get
      // the same answer, so stop and let the page decide.
      this._setState('disconnected');
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
    } else if (Date.now() - (this.connectedAt || 0) > 10000) {
      this.attempt = 0; // it had been working: start the backoff over
    }
    this._setState('disconnected');
    this._scheduleRetry();
  }

  _scheduleRetry() {
    clearTimeout(this.retryTimer);
    const delay = backoffDelay(this.attempt++, this.options.backoff);
    this.stats.reconnects++;
    this.retryTimer = setTimeout(() => {
      this.conn = null;
      this._connect();
    }, delay);
  }

  _startWatchdog(kind) {
    this._stopWatchdog();
    if (kind === 'websocket' || kind === 'poll') return; // pings / each request cover these
    this.lastHeard = Date.now();
    const limit = kind === 'long-poll' ? this.options.longPollWait * 1000 + this.options.heartbeatTimeout : this.options.heartbeatTimeout;
    this.watchdog = setInterval(() => {
      if (Date.now() - this.lastHeard > limit && this.conn) {
        const conn = this.conn;
        conn.close();
        this._closed(conn, new TidingsError(`no data or heartbeat for ${Math.round(limit / 1000)} s`, { code: 'timeout', transport: kind }), { fatal: false, opened: true });
      }
    }, Math.min(5000, limit));
  }

  _stopWatchdog() {
    clearInterval(this.watchdog);
    this.watchdog = null;
  }

  // -- delivery ----------------------------------------------------------------------------

  _deliverEnvelope(sub, env, cursor) {
    if (typeof env.offset === 'number' && env.epoch === sub.epoch && env.offset <= sub.offset) return; // duplicate
    sub.epoch = env.epoch ?? sub.epoch;
    if (typeof env.offset === 'number') sub.offset = env.offset;
    sub.history = 0;
    const own = cursorFor(cursor || env.cursor, sub.channel);
    if (own) this._setCursor(sub, own);
    this.stats.messages++;
    const msg = { ...env, cursor: own || env.cursor };
    if (sub.opts.onMessage) this._call(sub.opts.onMessage, msg, 'onMessage');
    this._emit('message', msg);
  }

  _deliverGap(sub, gap, cursor) {
    this.stats.gaps++;
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
    this._save(sub.channel, cursor);
  }

  _forgetCursor(sub) {
    sub.cursor = null;
    sub.epoch = null;
    sub.offset = 0;
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

  async _fetchJson(path, init = {}) {
    const headers = { accept: 'application/json', ...(init.headers || {}) };
    if (this.options.token) headers.authorization = `Bearer ${this.options.token}`;
    const ctrl = new AbortController();
    const timer = setTimeout(() => ctrl.abort(), this.options.requestTimeout);
    let res;
    try {
      res = await fetch(`${this.url}${path}`, { ...init, headers, signal: ctrl.signal, cache: 'no-store' });
    } catch (err) {
      throw this._reported(new TidingsError(`request failed: ${err && err.message}`, { code: 'network', cause: err }));
    } finally {
      clearTimeout(timer);
    }
    if (!res.ok) throw this._reported(await errorFromResponse(res, null));
    try {
      return await res.json();
    } catch (err) {
      throw this._reported(new TidingsError('the reply is not JSON', { code: 'malformed_reply', status: res.status, cause: err }));
    }
  }

  _reported(err) {
    this._error(err);
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
