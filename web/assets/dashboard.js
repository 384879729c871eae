// The live dashboard: three demo channels over one connection. Metrics arrive once a second;
// `history: 120` fills the charts with the last two minutes the moment the page opens.

import { Tidings } from '/tidings.js';
import { LineChart } from '/assets/chart.js';
import { el, statusPill, formatTime } from '/assets/ui.js';

const $ = (id) => document.getElementById(id);
const t = new Tidings(location.origin);
statusPill($('status'), t);
t.on('error', (e) => console.debug('tidings:', e.message));

const charts = {
  rps: new LineChart($('chart-rps'), { series: [{ label: 'req/s', color: '#4f46e5' }], points: 90 }),
  latency: new LineChart($('chart-latency'), {
    series: [
      { label: 'p50', color: '#059669' },
      { label: 'p99', color: '#d97706' },
    ],
    points: 90,
    unit: ' ms',
  }),
  cpu: new LineChart($('chart-cpu'), {
    series: ['#4f46e5', '#059669', '#d97706', '#db2777'].map((color, i) => ({ label: `#${i}`, color })),
    points: 90,
    unit: '%',
  }),
  mem: new LineChart($('chart-mem'), {
    series: [
      { label: 'MiB', color: '#0891b2' },
      { label: 'queue', color: '#db2777' },
    ],
    points: 90,
  }),
};

let seen = false;
const hint = setTimeout(() => {
  if (!seen) $('hint').hidden = false;
}, 3000);
function arrived() {
  seen = true;
  clearTimeout(hint);
  $('hint').hidden = true;
}

t.subscribe('demo:ticker', {
  history: 1,
  onMessage(m) {
    arrived();
    const d = m.data || {};
    $('clock').textContent = formatTime(Number(d.time) || m.time);
    $('tick-n').textContent = `tick #${d.n} · ${d.iso || ''}`;
  },
});

t.subscribe('demo:metrics', {
  history: 120,
  onMessage(m) {
    arrived();
    const d = m.data || {};
    const cpu = Array.isArray(d.cpu) ? d.cpu : [];
    $('rps').textContent = Number(d.rps || 0).toLocaleString();
    charts.rps.push([d.rps]);
    charts.latency.push([d.latency_ms?.p50, d.latency_ms?.p99]);
    charts.cpu.push(cpu);
    charts.mem.push([d.memory_mb, d.queue]);
  },
  onGap() {
    for (const c of Object.values(charts)) c.set([]);
  },
});

t.subscribe('demo:events', {
  history: 20,
  onMessage(m) {
    arrived();
    const d = m.data || {};
    const li = el('li', { class: `lvl-${d.level}` }, `${formatTime(d.time || m.time)} ${d.level || ''} [${d.service || '?'}] ${d.text || JSON.stringify(d)}`);
    const list = $('events');
    list.prepend(li);
    while (list.children.length > 50) list.lastChild.remove();
  },
});
