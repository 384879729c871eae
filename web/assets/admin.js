// The admin console. The server publishes its own stats every second to `admin:stats`
// (crates/tidings-server/src/stats.rs); this page follows that channel over SSE, like any
// other subscriber. Once auth exists, the `admin` namespace and /api need an API key: it can
// be given below and is kept for this tab only.

import { Tidings, TidingsError } from '/tidings.js';
import { LineChart } from '/assets/chart.js';
import { el, statusPill, toast, formatBytes, formatTime } from '/assets/ui.js';

const $ = (id) => document.getElementById(id);
const STATS = 'admin:stats';
const KEY = 'tidings-admin-key';
const TRANSPORT_LABELS = { websocket: 'WebSocket', sse: 'SSE', http_stream: 'HTTP stream', long_poll: 'long poll', short_poll: 'short poll' };

const rateChart = new LineChart($('chart-rate'), {
  series: [
    { label: 'published', color: '#4f46e5' },
    { label: 'delivered', color: '#059669' },
  ],
  points: 60,
});
const rssChart = new LineChart($('chart-rss'), { series: [{ label: 'RSS MiB', color: '#0891b2' }], points: 60 });

let client;
function start() {
  if (client) client.close();
  const token = sessionStorage.getItem(KEY) || undefined;
  client = new Tidings(location.origin, { transports: ['sse'], token });
  statusPill($('status'), client);
  client.on('error', (e) => {
    if (e.status === 401 || e.status === 403) toast('The server wants an API key (see below)');
  });
  client.subscribe(STATS, { history: 1, onMessage: (m) => render(m.data) });
}

function render(s) {
  if (!s || typeof s !== 'object') return;
  const conns = s.connections || {};
  let total = 0;
  const rows = Object.entries(conns).map(([k, v]) => {
    total += Number(v) || 0;
    const subs = (s.subscriptions || {})[k] ?? 0;
    return el('tr', {}, el('td', {}, TRANSPORT_LABELS[k] || k), el('td', { class: 'num', id: `conn-${k}` }, String(v)), el('td', { class: 'num muted' }, `${subs} subs`));
  });
  $('by-transport').tBodies[0].replaceChildren(...rows);
  $('total-connections').textContent = String(total);
  $('published-rate').textContent = String(s.published_per_sec ?? 0);
  $('delivered-rate').textContent = String(s.delivered_per_sec ?? 0);
  rateChart.set([s.published_history || [], s.delivered_history || []]);
  if (typeof s.rss_bytes === 'number') {
    $('rss').textContent = formatBytes(s.rss_bytes);
    rssChart.push([s.rss_bytes / 1024 / 1024]);
  } else $('rss').textContent = 'n/a';
  $('tcp').textContent = `${s.tcp_connections ?? 0} TCP connections · broker ${s.broker || '?'} · ${formatTime(s.time || Date.now())}`;
  renderPusher(Array.isArray(s.pusher) ? s.pusher : []);
  const ch = s.channels || {};
  $('channel-total').textContent = `${ch.total ?? 0} in all`;
  const top = Array.isArray(ch.top) ? ch.top : [];
  $('channels').tBodies[0].replaceChildren(
    ...top.map((c) => {
      const tr = el('tr', { onclick: () => inspect(c.channel) }, el('td', { class: 'mono' }, c.channel), el('td', { class: 'num' }, String(c.rate)), el('td', { class: 'num' }, String(c.subscribers)), el('td', { class: 'num' }, String(c.offset)));
      return tr;
    }),
  );
}

// Pusher apps ([[pusher.apps]]): counters and this node's connections (socket id, the user
// it signed in as). The panel stays hidden on a server with no apps.
function renderPusher(apps) {
  $('pusher').hidden = apps.length === 0;
  const num = (v) => el('td', { class: 'num' }, String(v ?? 0));
  $('pusher-apps').tBodies[0].replaceChildren(
    ...apps.map((a) =>
      el('tr', {}, el('td', { class: 'mono' }, a.id), el('td', { class: 'mono' }, a.key), el('td', { class: 'num', id: `pusher-conn-${a.id}` }, String(a.connections ?? 0)), num(a.messages_sent), num(a.events_triggered), num(a.webhooks_sent), num(a.webhooks_failed)),
    ),
  );
  const items = apps.flatMap((a) => (a.sockets || []).map((c) => el('li', { class: 'mono', 'data-socket': c.socket_id }, `app ${a.id} · socket ${c.socket_id}${c.user ? ` · user ${c.user}` : ''}`)));
  $('pusher-sockets').replaceChildren(...(items.length ? items : [el('li', { class: 'muted' }, 'no Pusher connections on this node')]));
}

async function inspect(name) {
  $('inspect-name').value = name;
  $('inspector').hidden = false;
  $('inspector').dataset.channel = name;
  const info = $('inspect-info');
  info.textContent = 'loading…';
  try {
    const r = await api(`/api/channels/${encodeURIComponent(name)}`);
    info.textContent = `offset ${r.offset} · epoch ${r.epoch} · ${r.subscribers} subscribers · ${r.history_length} in history`;
  } catch (e) {
    info.textContent = e.status === 404 ? 'no such channel yet (publish to create it)' : e.message;
  }
  const presence = $('inspect-presence');
  try {
    const clients = await client.presence(name);
    presence.replaceChildren(...(clients.length ? clients.map((c) => el('li', {}, `${c.client}${c.user ? ` (${c.user})` : ''}`)) : [el('li', { class: 'muted' }, 'nobody')]));
  } catch (e) {
    presence.replaceChildren(el('li', { class: 'muted' }, e.code === 'presence_disabled' ? 'this namespace keeps no presence' : e.message));
  }
  const history = $('inspect-history');
  try {
    const h = await client.history(name, { limit: 20 });
    history.replaceChildren(...(h.messages.length ? h.messages.reverse().map((m) => el('li', {}, `#${m.offset} ${formatTime(m.time)} ${m.event ? `[${m.event}] ` : ''}${JSON.stringify(m.data)}`)) : [el('li', { class: 'muted' }, 'empty')]));
  } catch (e) {
    history.replaceChildren(el('li', { class: 'muted' }, e.message));
  }
}

async function api(path) {
  const headers = {};
  const token = sessionStorage.getItem(KEY);
  if (token) headers.authorization = `Bearer ${token}`;
  const res = await fetch(path, { headers });
  const body = await res.json().catch(() => ({}));
  if (!res.ok) throw new TidingsError(body.error?.message || `HTTP ${res.status}`, { status: res.status, code: body.error?.code });
  return body;
}

$('inspect').addEventListener('submit', (e) => {
  e.preventDefault();
  const name = $('inspect-name').value.trim();
  if (name) inspect(name);
});

$('publish').addEventListener('submit', async (e) => {
  e.preventDefault();
  const name = $('inspector').dataset.channel;
  const raw = $('publish-data').value;
  let data = raw;
  try {
    data = JSON.parse(raw);
  } catch {
    /* not JSON: publish the text as a string */
  }
  try {
    const event = $('publish-event').value.trim() || undefined;
    const p = await client.publish(name, data, { event });
    toast(`published at offset ${p.offset}`);
    $('publish-data').value = '';
    inspect(name);
  } catch (err) {
    toast(`not published: ${err.message}`);
  }
});

$('key').addEventListener('submit', (e) => {
  e.preventDefault();
  const v = $('key-value').value.trim();
  if (v) sessionStorage.setItem(KEY, v);
  else sessionStorage.removeItem(KEY);
  start();
  toast(v ? 'API key set for this tab' : 'API key cleared');
});

start();
