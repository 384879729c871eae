#!/usr/bin/env node
// Raw-mode SSE subscriber built on the third-party `eventsource` package (a
// WHATWG EventSource for Node). Reconnecting, and sending Last-Event-ID when it
// does, is left entirely to the library: that is what the test checks.
//
// usage: node sse_reconnect.mjs URL CHANNEL COUNT
//   URL      base URL of the server, e.g. http://127.0.0.1:8080
//   CHANNEL  channel name; the client opens URL/sse/CHANNEL (raw payloads)
//   COUNT    exit 0 after this many `message` events (>= 1)
//
// stdout, one JSON object per line:
//   {"open":true}                      each time the stream (re)opens
//   {"data":"<payload>","id":"<cursor>"}  each `message` event (e.data, e.lastEventId)
//   {"gap":{...gap notice...}}         each `tidings.gap` event
//   {"disconnect":{...}}               each `tidings.disconnect` event
// stderr: log lines. Exit 1 on a fatal error (library gave up, bad args),
// 3 after the overall timeout (TIDINGS_CLIENT_TIMEOUT seconds, default 20).

import * as eventsource from 'eventsource';

// v3+ exports { EventSource }; v2 exported the constructor as default.
const EventSource = eventsource.EventSource ?? eventsource.default;

const log = (...args) => console.error('[sse_reconnect]', ...args);

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

// Exit only after stdout has drained, so the last line is never lost.
function finish(code) {
  process.stdout.write('', () => process.exit(code));
}

const [base, channel, countArg] = process.argv.slice(2);
const count = Number.parseInt(countArg ?? '', 10);
if (!base || !channel || !Number.isInteger(count) || count < 1) {
  log('usage: node sse_reconnect.mjs URL CHANNEL COUNT');
  process.exit(2);
}

// Hard overall timeout: a test must never hang on this process.
const timeoutSecs = Number(process.env.TIDINGS_CLIENT_TIMEOUT ?? 20);
setTimeout(() => {
  log(`timeout after ${timeoutSecs}s`);
  finish(3);
}, timeoutSecs * 1000); // not unref(): it also keeps the process alive until done

const url = `${base.replace(/\/+$/, '')}/sse/${channel}`;
log('connecting to', url);
const es = new EventSource(url);
let received = 0;

es.addEventListener('open', () => {
  log('open');
  emit({ open: true });
});

es.addEventListener('message', (e) => {
  emit({ data: e.data, id: e.lastEventId });
  received += 1;
  if (received >= count) {
    es.close();
    finish(0);
  }
});

for (const [name, key] of [['tidings.gap', 'gap'], ['tidings.disconnect', 'disconnect']]) {
  es.addEventListener(name, (e) => {
    try {
      emit({ [key]: JSON.parse(e.data) });
    } catch (err) {
      log(`bad ${name} data ${JSON.stringify(e.data)}: ${err.message}`);
      finish(1);
    }
  });
}

es.addEventListener('error', (e) => {
  // readyState CONNECTING (0): the library will reconnect by itself.
  // readyState CLOSED (2): it gave up (e.g. a non-200 answer or wrong content type).
  const detail = [e.code, e.message].filter((x) => x !== undefined).join(' ');
  if (es.readyState === 2) {
    log('connection failed, library gave up:', detail || '(no detail)');
    finish(1);
  } else {
    log('connection lost, library will reconnect:', detail || '(no detail)');
  }
});
