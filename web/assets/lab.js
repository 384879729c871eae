// The transport lab: one channel followed by five clients, one per transport. The page
// publishes numbered messages stamped with its own clock ({seq, sent}); each pane measures
// publish-to-receive latency, counts requests, bytes and reconnects from its client's stats,
// and checks the sequence for losses and duplicates — so "cut every connection" shows resume
// working (or not) as numbers, not as a promise.

import { Tidings, TRANSPORTS } from '/tidings.js';
import { el, formatBytes, toast } from '/assets/ui.js';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const CHANNEL_RE = /^[A-Za-z0-9_.:@=-]{1,128}$/;
const channel = CHANNEL_RE.test(params.get('channel') || '') ? params.get('channel') : `lab:${Math.random().toString(36).slice(2, 8)}`;
$('channel').textContent = channel;

const LABELS = { websocket: 'WebSocket', sse: 'SSE', stream: 'HTTP stream', 'long-poll': 'Long poll', poll: 'Short poll' };
let seq = 0;

class Pane {
  constructor(kind) {
    this.kind = kind;
    this.latencies = [];
    this.received = 0;
    this.lost = 0;
    this.dups = 0;
    this.gaps = 0;
    this.lastSeq = 0;
    this.values = {};
    this.node = el('div', { class: 'panel pane', 'data-transport': kind });
    this.dot = el('span', { class: 'dot disconnected', title: 'state' });
    const dl = el('dl');
    for (const [key, label] of [
      ['received', 'received'],
      ['p50', 'latency p50'],
      ['p99', 'latency p99'],
      ['requests', 'requests'],
      ['bytes', 'bytes in'],
      ['reconnects', 'reconnects'],
      ['lost', 'lost / dup'],
      ['gaps', 'gaps'],
    ]) {
      this.values[key] = el('dd', { 'data-key': key }, '–');
      dl.append(el('dt', {}, label), this.values[key]);
    }
    this.log = el('ul', { class: 'log' });
    this.node.append(el('h2', {}, LABELS[kind], this.dot), dl, this.log);
    $('panes').append(this.node);
    this.client = new Tidings(location.origin, { transports: [kind], pollInterval: 1000, longPollWait: 20, backoff: { min: 300, max: 5000 } });
    this.client.on('state', ({ state }) => {
      this.dot.className = `dot ${state}`;
      this.node.dataset.state = state;
      if (state === 'connected') this.line(`connected`);
    });
    this.client.on('error', (e) => this.line(`error: ${e.message}`));
    this.client.subscribe(channel, {
      onMessage: (m) => this.message(m),
      onGap: (g) => {
        this.gaps++;
        this.line(`gap: ${g.reason}`);
      },
    });
  }

  message(m) {
    const now = Date.now();
    this.received++;
    const d = m.data || {};
    if (typeof d.sent === 'number') {
      this.latencies.push(Math.max(0, now - d.sent));
      if (this.latencies.length > 500) this.latencies.shift();
    }
    if (typeof d.seq === 'number' && d.page === pageId) {
      if (d.seq <= this.lastSeq) this.dups++;
      else if (this.lastSeq && d.seq > this.lastSeq + 1) this.lost += d.seq - this.lastSeq - 1;
      this.lastSeq = Math.max(this.lastSeq, d.seq);
    }
    this.node.dataset.received = String(this.received);
    this.node.dataset.lastSeq = String(this.lastSeq);
  }

  line(text) {
    this.log.prepend(el('li', {}, `${new Date().toLocaleTimeString()} ${text}`));
    while (this.log.children.length > 30) this.log.lastChild.remove();
  }

  render() {
    const s = this.client.stats;
    const sorted = [...this.latencies].sort((a, b) => a - b);
    const pct = (p) => (sorted.length ? `${sorted[Math.min(sorted.length - 1, Math.floor((sorted.length * p) / 100))]} ms` : '–');
    const v = this.values;
    v.received.textContent = String(this.received);
    v.p50.textContent = pct(50);
    v.p99.textContent = pct(99);
    v.requests.textContent = String(s.requests);
    v.bytes.textContent = formatBytes(s.bytes);
    v.reconnects.textContent = String(s.reconnects);
    v.lost.textContent = `${this.lost} / ${this.dups}`;
    v.gaps.textContent = String(this.gaps);
    this.node.dataset.lost = String(this.lost);
    this.node.dataset.dups = String(this.dups);
  }
}

const pageId = Math.random().toString(36).slice(2);
const panes = TRANSPORTS.map((k) => new Pane(k));

async function publish(n) {
  const messages = [];
  for (let i = 0; i < n; i++) messages.push({ channel, data: { seq: ++seq, sent: Date.now(), page: pageId } });
  $('sent').textContent = `${seq} sent`;
  try {
    // One batch request for a burst: the lab measures delivery, not the publisher's requests.
    const res = await fetch('/publish', { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(n === 1 ? messages[0] : { messages }) });
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
  } catch (e) {
    toast(`publish failed: ${e.message}`);
  }
}

$('one').addEventListener('click', () => publish(1));
$('burst').addEventListener('click', () => publish(100));
$('cut').addEventListener('click', () => {
  for (const p of panes) {
    p.client.reconnect();
    p.line('cut');
  }
  toast('Every connection cut: watch them resume');
});
// ?auto=0 starts with the steady publishing off (the browser tests count exact numbers).
$('auto').checked = params.get('auto') !== '0';
let auto = $('auto').checked ? setInterval(() => publish(1), 500) : null;
$('auto').addEventListener('change', (e) => {
  clearInterval(auto);
  if (e.target.checked) auto = setInterval(() => publish(1), 500);
});
setInterval(() => panes.forEach((p) => p.render()), 250);

// How this page's own stylesheet and scripts arrived: Chromium reports the time of a 103 on
// the navigation, and a subresource its Early Hints preload fetched as delivered from "cache".
function pushStatus() {
  const nav = performance.getEntriesByType('navigation')[0];
  if (!nav) return;
  const mine = performance.getEntriesByType('resource').filter((e) => /\/assets\/|\/tidings\.js/.test(e.name));
  const hinted = mine.filter((e) => e.deliveryType === 'cache').map((e) => new URL(e.name).pathname);
  const interim = nav.firstInterimResponseStart > 0;
  const via = `${nav.nextHopProtocol || 'unknown protocol'}`;
  $('push-status').textContent = interim
    ? `This page came over ${via} after a 103 Early Hints at ${Math.round(nav.firstInterimResponseStart)} ms; taken from what the hints fetched: ${hinted.join(', ') || 'none reported'}.`
    : `This page came over ${via} with no 103 this browser used (Chromium uses Early Hints over HTTP/2 and HTTP/3 only, with a valid certificate): its assets were fetched by the parser.`;
}
window.addEventListener('load', () => setTimeout(pushStatus, 0));
window.tidingsLab = { panes, channel, publish };
