// Helpers every page shares: a status pill, a toast, safe element building, formatting.

/** document.createElement with attributes and children (text is never parsed as HTML). */
export function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

/** Keeps a status pill (dot + text) in step with a Tidings client's state. */
export function statusPill(pill, client) {
  const dot = el('span', { class: 'dot disconnected' });
  const text = el('span', {}, 'disconnected');
  pill.replaceChildren(dot, text);
  client.on('state', ({ state, transport }) => {
    dot.className = `dot ${state}`;
    text.textContent = transport ? `${state} · ${transport}` : state;
    pill.dataset.state = state;
    pill.dataset.transport = transport || '';
  });
}

let toastTimer;
/** A short message at the bottom of the screen. */
export function toast(message) {
  let t = document.querySelector('.toast');
  if (!t) {
    t = el('div', { class: 'toast', role: 'status' });
    document.body.append(t);
  }
  t.textContent = message;
  t.classList.add('show');
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => t.classList.remove('show'), 2500);
}

export function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  if (n < 1024 ** 3) return `${(n / 1024 / 1024).toFixed(1)} MiB`;
  return `${(n / 1024 ** 3).toFixed(2)} GiB`;
}

export function formatTime(ms) {
  return new Date(ms).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit' });
}
