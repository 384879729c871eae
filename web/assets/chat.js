// The chat demo: rooms are channels `chat:ROOM`, messages are {nick, text}. History on join
// comes from the subscription's `history`, presence from the server (the `chat` namespace
// keeps it: `tidings serve --demo` turns it on). The page's URL holds room and transport, so
// a link opens the same view: /demo/chat?room=lobby&transport=sse.

import { Tidings } from '/tidings.js';
import { el, statusPill, toast, formatTime } from '/assets/ui.js';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const ROOM_RE = /^[A-Za-z0-9_.@=-]{1,40}$/;

const state = {
  nick: params.get('nick') || localStorage.getItem('tidings-chat-nick') || `guest${Math.floor(Math.random() * 900 + 100)}`,
  room: ROOM_RE.test(params.get('room') || '') ? params.get('room') : 'lobby',
  transport: params.get('transport') || 'auto',
  client: null,
  sub: null,
  present: new Map(),
};

$('nick').value = state.nick;
$('room').value = state.room;
$('transport').value = [...$('transport').options].some((o) => o.value === state.transport) ? state.transport : 'auto';

function channel() {
  return `chat:${state.room}`;
}

function connect() {
  if (state.client) state.client.close();
  state.present.clear();
  renderPresence();
  $('messages').replaceChildren();
  $('room-title').textContent = `#${state.room}`;
  const transports = state.transport === 'auto' ? undefined : [state.transport];
  // No `persist` here: a chat tab that reloads wants the last 50 lines on screen again, which
  // `history: 50` gives; an app that keeps its own state across reloads would add
  // persist: 'session' and get only what it missed (see the browser tests).
  const client = new Tidings(location.origin, { transports });
  state.client = client;
  statusPill($('status'), client);
  client.on('error', (e) => console.debug('tidings:', e.message));
  client.on('state', ({ state: s }) => {
    if (s === 'connected') refreshPresence();
  });
  state.sub = client.subscribe(channel(), {
    history: 50,
    onMessage: addMessage,
    onGap: () => addSystem('some messages could not be recovered'),
    onJoin: (p) => {
      state.present.set(p.client, p);
      renderPresence();
    },
    onLeave: (p) => {
      state.present.delete(p.client);
      renderPresence();
    },
  });
}

async function refreshPresence() {
  try {
    const clients = await state.client.presence(channel());
    state.present = new Map(clients.map((c) => [c.client, c]));
    renderPresence();
  } catch (e) {
    $('presence').replaceChildren(el('li', { class: 'muted' }, e.code === 'presence_disabled' ? 'presence is off for chat:' : 'presence unavailable'));
  }
}

function renderPresence() {
  const items = [...state.present.values()].map((c) => el('li', {}, c.user || `guest·${String(c.client).slice(-6)}`));
  $('presence').replaceChildren(...items);
  $('presence-count').textContent = String(state.present.size);
}

function addMessage(m) {
  const d = m.data && typeof m.data === 'object' ? m.data : { text: String(m.data) };
  const nick = typeof d.nick === 'string' ? d.nick : 'someone';
  const text = typeof d.text === 'string' ? d.text : JSON.stringify(m.data);
  const li = el('li', { 'data-offset': m.offset }, el('span', { class: 'nick' }, nick), text, el('span', { class: 'time' }, formatTime(m.time || Date.now())));
  append(li);
}

function addSystem(text) {
  append(el('li', { class: 'system' }, text));
}

function append(li) {
  const list = $('messages');
  const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  list.append(li);
  while (list.children.length > 300) list.firstChild.remove();
  if (atBottom) list.scrollTop = list.scrollHeight;
}

$('join').addEventListener('submit', (e) => {
  e.preventDefault();
  const room = $('room').value.trim();
  if (!ROOM_RE.test(room)) {
    toast('A room name is letters, digits and _ . @ = -');
    return;
  }
  state.nick = $('nick').value.trim().slice(0, 24) || state.nick;
  localStorage.setItem('tidings-chat-nick', state.nick);
  state.room = room;
  state.transport = $('transport').value;
  const url = new URL(location.href);
  url.searchParams.set('room', room);
  url.searchParams.set('transport', state.transport);
  history.replaceState(null, '', url);
  connect();
});

$('composer').addEventListener('submit', async (e) => {
  e.preventDefault();
  const input = $('text');
  const text = input.value.trim();
  if (!text) return;
  input.value = '';
  try {
    const nick = $('nick').value.trim().slice(0, 24) || state.nick;
    await state.client.publish(channel(), { nick, text });
  } catch (err) {
    input.value = text;
    toast(`Not sent: ${err.message}`);
  }
});

connect();
