#!/usr/bin/env node
// WebSocket client built on the third-party `ws` package.
//
// usage: node ws_node.mjs URL raw  CHANNEL COUNT [HISTORY]
//        node ws_node.mjs URL json CHANNEL COUNT [HISTORY]
//   URL      base URL of the server, e.g. http://127.0.0.1:8080 (http becomes ws)
//
// raw   connects to /ws/CHANNEL (with ?history=HISTORY when given), sends one text frame
//       "hello from ws", and prints every frame it receives until COUNT frames:
//         {"kind":"text","data":"<the text>"}
//         {"kind":"binary","data":"<base64 of the bytes>"}
// json  connects to /ws and speaks the JSON protocol: subscribes to CHANNEL with
//       "history": HISTORY (default 10), waits for the subscribe reply, publishes
//       {"from":"ws"} to CHANNEL, and prints every frame it receives (the parsed JSON
//       object, replies included) until COUNT frames of type "message" arrived and the
//       publish was acknowledged.
//
// stderr: log lines. Exit 0 when done; 1 on an error (error reply, disconnect or close
// before the end, missing publish ack, bad frame); 2 on bad arguments; 3 after the
// overall timeout (TIDINGS_CLIENT_TIMEOUT seconds, default 20).

import WebSocket from 'ws';

const LIB = 'ws';
const HELLO = `hello from ${LIB}`;

const log = (...args) => console.error('[ws_node]', ...args);

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

let finished = false;
// Exit only after stdout has drained, so the last line is never lost.
function finish(code, why) {
  if (finished) return;
  finished = true;
  if (why) log(why);
  process.stdout.write('', () => process.exit(code));
}

const [base, mode, channel, countArg, historyArg] = process.argv.slice(2);
const count = Number.parseInt(countArg ?? '', 10);
const history = historyArg === undefined ? undefined : Number.parseInt(historyArg, 10);
if (
  !base ||
  !['raw', 'json'].includes(mode) ||
  !channel ||
  !Number.isInteger(count) ||
  count < 1 ||
  (history !== undefined && !(Number.isInteger(history) && history >= 0)) ||
  process.argv.length > 7
) {
  log('usage: node ws_node.mjs URL raw|json CHANNEL COUNT [HISTORY]');
  process.exit(2);
}

// Hard overall timeout: a test must never hang on this process.
const timeoutSecs = Number(process.env.TIDINGS_CLIENT_TIMEOUT ?? 20);
setTimeout(() => finish(3, `timeout after ${timeoutSecs}s`), timeoutSecs * 1000);

const wsBase = base.replace(/\/+$/, '').replace(/^http(s?):\/\//, 'ws$1://');
let url = mode === 'raw' ? `${wsBase}/ws/${encodeURIComponent(channel)}` : `${wsBase}/ws`;
if (mode === 'raw' && history !== undefined) url += `?history=${history}`;
log('connecting to', url);
const ws = new WebSocket(url, { handshakeTimeout: 5000, maxPayload: 0 });

let messages = 0; // raw: frames; json: `message` frames
let acked = false;
let published = false;

ws.on('open', () => {
  if (mode === 'raw') {
    log('open; sending hello');
    ws.send(HELLO);
  } else {
    ws.send(JSON.stringify({ id: 1, op: 'subscribe', channel, history: history ?? 10 }));
  }
});

ws.on('unexpected-response', (_req, res) => {
  finish(1, `handshake refused: HTTP ${res.statusCode}`);
});

ws.on('message', (data, isBinary) => {
  if (finished) return;
  if (mode === 'raw') {
    if (isBinary) {
      emit({ kind: 'binary', data: Buffer.from(data).toString('base64') });
    } else {
      emit({ kind: 'text', data: data.toString('utf8') });
    }
    messages += 1;
    if (messages >= count) {
      ws.close(1000);
      finish(0, `done: ${messages} frames`);
    }
    return;
  }
  if (isBinary) {
    finish(1, `binary frame on /ws (${data.length} bytes)`);
    return;
  }
  let obj;
  try {
    obj = JSON.parse(data.toString('utf8'));
  } catch (err) {
    finish(1, `frame is not JSON (${err.message}): ${data.toString('utf8').slice(0, 200)}`);
    return;
  }
  emit(obj);
  if (obj.type === 'reply') {
    if (obj.error !== undefined || obj.ok !== true) {
      finish(1, `error reply: ${JSON.stringify(obj)}`);
      return;
    }
    if (obj.id === 1 && !published) {
      published = true;
      ws.send(JSON.stringify({ id: 2, op: 'publish', channel, data: { from: LIB } }));
    } else if (obj.id === 2) {
      if (!Number.isInteger(obj.offset) || obj.cursor === undefined) {
        finish(1, `publish ack without a position: ${JSON.stringify(obj)}`);
        return;
      }
      acked = true;
    }
  } else if (obj.type === 'message') {
    messages += 1;
  } else if (obj.type === 'disconnect') {
    finish(1, `disconnected: ${JSON.stringify(obj)}`);
    return;
  }
  if (messages >= count && acked) {
    ws.close(1000);
    finish(0, `done: ${messages} messages, publish acknowledged`);
  }
});

ws.on('close', (code, reason) => {
  finish(1, `closed (${code} ${reason}) after ${messages} of ${count} (ack: ${acked})`);
});

ws.on('error', (err) => {
  finish(1, `connection error: ${err.message}`);
});
