// Pusher protocol scenarios with unmodified pusher-js (client) and the `pusher` server SDK
// (HTTP API, channel and user auth) against a Tidings server.
//
//   node pusher_node.mjs URL APP_ID KEY SECRET SCENARIO
//
// Runs its own auth endpoint (on 127.0.0.1:0) built on the SDK, as an app would. Prints one
// JSON object per line ({"step": …}), then {"ok": true}; exits 1 on the first failed check.
// Every wait has a timeout; nothing sleeps.

import http from 'node:http';
import crypto from 'node:crypto';
import PusherJs from 'pusher-js';
import PusherServer from 'pusher';

const [url, appId, key, secret, scenario] = process.argv.slice(2);
if (!scenario) {
  console.error('usage: pusher_node.mjs URL APP_ID KEY SECRET SCENARIO');
  process.exit(2);
}
const { hostname, port } = new URL(url);
const TIMEOUT = Number(process.env.TIDINGS_CLIENT_TIMEOUT || 20) * 1000;
const deadline = setTimeout(() => {
  console.error('timed out');
  process.exit(3);
}, TIMEOUT);
deadline.unref();

const out = (o) => console.log(JSON.stringify(o));
const fail = (why) => {
  console.error('FAILED:', why);
  process.exit(1);
};
const check = (cond, why) => {
  if (!cond) fail(why);
};

const server = new PusherServer({ appId, key, secret, host: hostname, port, useTLS: false });

// The app's auth endpoint: channel auth and user sign-in, by the SDK.
const auth = http.createServer((req, res) => {
  let body = '';
  req.on('data', (c) => (body += c));
  req.on('end', () => {
    const p = new URLSearchParams(body);
    const socketId = p.get('socket_id');
    let answer;
    if (req.url.startsWith('/pusher/user-auth')) {
      answer = server.authenticateUser(socketId, { id: p.get('user_id') });
    } else {
      const channel = p.get('channel_name');
      if (p.get('forge')) {
        answer = { auth: `${key}:${'0'.repeat(64)}` };
      } else if (channel.startsWith('presence-')) {
        const data = p.get('no_user_id') ? { user_info: {} } : { user_id: p.get('user_id'), user_info: { name: `name of ${p.get('user_id')}` } };
        answer = p.get('no_user_id')
          ? { auth: `${key}:${crypto.createHmac('sha256', secret).update(`${socketId}:${channel}:${JSON.stringify(data)}`).digest('hex')}`, channel_data: JSON.stringify(data) }
          : server.authorizeChannel(socketId, channel, data);
      } else {
        answer = server.authorizeChannel(socketId, channel);
      }
    }
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify(answer));
  });
});
await new Promise((r) => auth.listen(0, '127.0.0.1', r));
const authBase = `http://127.0.0.1:${auth.address().port}`;

const clients = [];
function client(params = {}) {
  const c = new PusherJs(key, {
    wsHost: hostname,
    wsPort: Number(port),
    forceTLS: false,
    enabledTransports: ['ws'],
    cluster: 'mt1',
    disableStats: true,
    channelAuthorization: { endpoint: `${authBase}/pusher/auth`, transport: 'ajax', params },
    userAuthentication: { endpoint: `${authBase}/pusher/user-auth`, transport: 'ajax', params },
  });
  clients.push(c);
  return c;
}

function once(target, event, what) {
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`no ${what || event} within the timeout`)), TIMEOUT - 1000);
    const handler = (data, meta) => {
      clearTimeout(t);
      target.unbind(event, handler);
      resolve(data === undefined ? meta : data);
    };
    target.bind(event, handler);
  });
}

async function connected(c) {
  if (c.connection.state === 'connected') return;
  await new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error('not connected')), TIMEOUT - 1000);
    c.connection.bind('connected', () => {
      clearTimeout(t);
      resolve();
    });
  });
}

async function subscribed(c, name) {
  const ch = c.subscribe(name);
  await new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`no subscription_succeeded on ${name}`)), TIMEOUT - 1000);
    ch.bind('pusher:subscription_succeeded', (d) => {
      clearTimeout(t);
      resolve(d);
    });
    ch.bind('pusher:subscription_error', (e) => {
      clearTimeout(t);
      reject(new Error(`subscription_error on ${name}: ${JSON.stringify(e)}`));
    });
  });
  return ch;
}

/// Collects every event on a channel, in order.
function record(ch) {
  const seen = [];
  ch.bind_global((event, data) => {
    if (!event.startsWith('pusher:')) seen.push({ event, data });
  });
  return seen;
}

/// Triggers a marker and waits for it: whatever `seen` holds before it arrived came first.
async function marker(ch, name, seen) {
  const id = crypto.randomUUID();
  const got = new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`marker never arrived on ${name}`)), TIMEOUT - 1000);
    const h = (d) => {
      if (d && d.id === id) {
        clearTimeout(t);
        ch.unbind('marker', h);
        resolve();
      }
    };
    ch.bind('marker', h);
  });
  await server.trigger(name, 'marker', { id });
  await got;
  return seen.filter((e) => e.event !== 'marker');
}

async function tidingsPublish(channel, event, data) {
  const res = await fetch(`${url}/publish/${encodeURIComponent(channel)}?event=${event}`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(data),
  });
  check(res.ok, `Tidings publish: ${res.status}`);
}

/// Reads a Tidings SSE stream until `pred` matches an envelope.
async function tidingsSse(channel, ready, pred) {
  const res = await fetch(`${url}/sse?channel=${encodeURIComponent(channel)}`);
  check(res.ok, `SSE: ${res.status}`);
  const reader = res.body.getReader();
  let buf = '';
  let readySent = false;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) fail('SSE ended');
    buf += Buffer.from(value).toString();
    let i;
    while ((i = buf.indexOf('\n\n')) >= 0) {
      const block = buf.slice(0, i);
      buf = buf.slice(i + 2);
      if (!readySent && block.split('\n').some((l) => l.startsWith('id:'))) {
        readySent = true;
        ready();
      }
      for (const line of block.split('\n')) {
        if (line.startsWith('data:')) {
          const env = JSON.parse(line.slice(5));
          if (pred(env)) {
            reader.cancel();
            return env;
          }
        }
      }
    }
  }
}

const scenarios = {
  // A long-lived presence member (the cluster tests): joins presence-room as the user named
  // by the argument after the scenario, prints the members it was given, then every
  // member_added / member_removed, and stays until it is killed (the test bounds each wait).
  async member() {
    clearTimeout(deadline);
    const userId = process.argv[7];
    check(userId, 'member needs a user id argument');
    const c = client({ user_id: userId });
    await connected(c);
    const ch = c.subscribe('presence-room');
    ch.bind('pusher:member_added', (m) => out({ step: 'member_added', id: m.id, info: m.info }));
    ch.bind('pusher:member_removed', (m) => out({ step: 'member_removed', id: m.id }));
    const members = await new Promise((resolve, reject) => {
      ch.bind('pusher:subscription_succeeded', resolve);
      ch.bind('pusher:subscription_error', (e) => reject(new Error(JSON.stringify(e))));
    });
    const ids = [];
    members.each((m) => ids.push(m.id));
    out({ step: 'subscribed', me: members.me.id, members: ids.sort(), count: members.count, socket_id: c.connection.socket_id });
    await new Promise(() => {});
  },

  // Public channels both ways, and the HTTP API's channel queries.
  async basic() {
    const a = client();
    await connected(a);
    check(/^\d+\.\d+$/.test(a.connection.socket_id), `socket id ${a.connection.socket_id}`);
    out({ step: 'connected', socket_id: a.connection.socket_id });
    const ch = await subscribed(a, 'news');
    const got = once(ch, 'greet');
    // A Tidings SSE subscriber of the same channel sees the SDK's trigger too.
    let sseReady;
    const readyP = new Promise((r) => (sseReady = r));
    const sse = tidingsSse(`pusher:${appId}:news`, sseReady, (env) => env.event === 'greet');
    await readyP;
    await server.trigger('news', 'greet', { hello: 'pusher sdk' });
    const d = await got;
    check(d.hello === 'pusher sdk', `data ${JSON.stringify(d)}`);
    out({ step: 'sdk trigger reached pusher-js', data: d });
    const env = await sse;
    check(JSON.parse(env.data).hello === 'pusher sdk', `SSE saw ${JSON.stringify(env)}`);
    out({ step: 'sdk trigger reached Tidings SSE', envelope: env });
    const fromTidings = once(ch, 'note');
    await tidingsPublish(`pusher:${appId}:news`, 'note', { via: 'tidings' });
    const n = await fromTidings;
    check(n.via === 'tidings', `data ${JSON.stringify(n)}`);
    out({ step: 'tidings publish reached pusher-js', data: n });
    // Several channels in one trigger, and Laravel-style event names.
    const other = await subscribed(a, 'sports');
    const both = Promise.all([once(ch, 'App\\Events\\Scored'), once(other, 'App\\Events\\Scored')]);
    await server.trigger(['news', 'sports'], 'App\\Events\\Scored', { goals: 2 });
    const [x, y] = await both;
    check(x.goals === 2 && y.goals === 2, 'multi-channel trigger');
    out({ step: 'multi-channel trigger with a Laravel event name' });
    const batchGot = Promise.all([once(ch, 'b1'), once(other, 'b2')]);
    await server.triggerBatch([
      { channel: 'news', name: 'b1', data: { n: 1 } },
      { channel: 'sports', name: 'b2', data: { n: 2 } },
    ]);
    await batchGot;
    out({ step: 'batch trigger' });
    const list = await (await server.get({ path: '/channels', params: { info: 'subscription_count' } })).json();
    check(list.channels.news && list.channels.news.subscription_count === 1, `channels ${JSON.stringify(list)}`);
    const one = await (await server.get({ path: '/channels/news', params: { info: 'subscription_count' } })).json();
    check(one.occupied === true && one.subscription_count === 1, `channel ${JSON.stringify(one)}`);
    const empty = await (await server.get({ path: '/channels/nobody' })).json();
    check(empty.occupied === false, `empty channel ${JSON.stringify(empty)}`);
    out({ step: 'channel queries', list, one });
    a.unsubscribe('sports');
    const after = await (await server.get({ path: '/channels', params: { filter_by_prefix: 'sp' } })).json();
    // The unsubscribe is a message on the socket: the list may still hold it for a moment.
    out({ step: 'filter_by_prefix', after });
  },

  // Private and presence channels with auth, member events, client events, exclusion.
  async presence() {
    const a = client({ user_id: 'u1' });
    const b = client({ user_id: 'u2' });
    await Promise.all([connected(a), connected(b)]);
    const pa = await subscribed(a, 'presence-room');
    check(pa.members.count === 1 && pa.members.me.id === 'u1', `a's members ${JSON.stringify(pa.members.members)}`);
    const added = once(pa, 'pusher:member_added');
    const pb = await subscribed(b, 'presence-room');
    check(pb.members.count === 2 && pb.members.members.u1.name === 'name of u1', `b's members ${JSON.stringify(pb.members.members)}`);
    const m = await added;
    check(m.id === 'u2' && m.info.name === 'name of u2', `member_added ${JSON.stringify(m)}`);
    out({ step: 'member_added', member: m });
    // A second socket of u1 is not a second member.
    const a2 = client({ user_id: 'u1' });
    await connected(a2);
    const seenA = record(pa);
    const pa2 = await subscribed(a2, 'presence-room');
    check(pa2.members.count === 2, `a2's members ${JSON.stringify(pa2.members.members)}`);
    const users = await (await server.get({ path: '/channels/presence-room/users' })).json();
    check(users.users.length === 2, `users ${JSON.stringify(users)}`);
    const info = await (await server.get({ path: '/channels/presence-room', params: { info: 'user_count,subscription_count' } })).json();
    check(info.user_count === 2 && info.subscription_count === 3, `channel info ${JSON.stringify(info)}`);
    out({ step: 'one member per user_id', users, info });
    a2.disconnect();
    // Client events: to the others with user_id, never back to the sender.
    const got = once(pb, 'client-typing');
    pa.trigger('client-typing', { who: 'u1' });
    const t = await got;
    check(t.who === 'u1', `client event ${JSON.stringify(t)}`);
    const before = await marker(pa, 'presence-room', seenA);
    check(!before.some((e) => e.event === 'client-typing'), `the sender got its own client event: ${JSON.stringify(before)}`);
    check(!before.some((e) => e.event === 'pusher_internal:member_removed'), 'u1 left when one of two sockets left');
    out({ step: 'client event relayed, not echoed' });
    // socket_id exclusion from the HTTP API.
    const privA = await subscribed(a, 'private-inbox');
    const privB = await subscribed(b, 'private-inbox');
    const seenPrivA = record(privA);
    const toB = once(privB, 'excluded');
    await server.trigger('private-inbox', 'excluded', { x: 1 }, { socket_id: a.connection.socket_id });
    await toB;
    const beforePriv = await marker(privA, 'private-inbox', seenPrivA);
    check(!beforePriv.some((e) => e.event === 'excluded'), 'the excluded socket got the event');
    out({ step: 'socket_id exclusion' });
    const removed = once(pa, 'pusher:member_removed');
    b.disconnect();
    const r = await removed;
    check(r.id === 'u2', `member_removed ${JSON.stringify(r)}`);
    out({ step: 'member_removed', member: r });
  },

  // Bad input: each refused the protocol's way, and nothing delivered.
  async bad() {
    const a = client({ user_id: 'u1' });
    await connected(a);
    const pub = await subscribed(a, 'public-room');
    const seen = record(pub);
    // A forged channel auth: pusher-js sends extra params in the auth request body, and
    // `forge` makes our endpoint lie.
    const liar = client({ forge: '1' });
    await connected(liar);
    const forged = liar.subscribe('private-forged');
    const err = await new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error('no subscription_error for a forged auth')), TIMEOUT - 1000);
      forged.bind('pusher:subscription_error', (e) => {
        clearTimeout(t);
        resolve(e);
      });
      forged.bind('pusher:subscription_succeeded', () => reject(new Error('a forged auth was accepted')));
    }).catch(fail);
    out({ step: 'forged auth refused', error: err });
    // Presence channel_data without a user_id.
    const anon = client({ no_user_id: '1' });
    await connected(anon);
    const noUser = anon.subscribe('presence-nouser');
    const e2 = await new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error('no error for presence without user_id')), TIMEOUT - 1000);
      noUser.bind('pusher:subscription_error', (e) => {
        clearTimeout(t);
        resolve(e);
      });
      noUser.bind('pusher:subscription_succeeded', () => reject(new Error('presence without user_id accepted')));
    }).catch(fail);
    out({ step: 'presence without user_id refused', error: e2 });
    // A client event on a public channel (pusher-js refuses to send it itself; send raw).
    const errP = once(a.connection, 'error', 'pusher:error');
    a.connection.send_event('client-x', { a: 1 }, 'public-room');
    const pe = await errP;
    check(/only supported on private and presence/.test(pe.data.message), `public client event: ${JSON.stringify(pe)}`);
    out({ step: 'client event on a public channel refused', error: pe });
    // A client event over 10 KB on a private channel: refused, and the other member gets nothing.
    const b = client();
    await connected(b);
    const privA = await subscribed(a, 'private-room');
    const privB = await subscribed(b, 'private-room');
    const seenB = record(privB);
    const bigErr = once(a.connection, 'error', 'pusher:error for an oversized client event');
    privA.trigger('client-big', { blob: 'x'.repeat(10 * 1024) });
    const be = await bigErr;
    check(/limit is 10240/.test(be.data.message), `oversized client event: ${JSON.stringify(be)}`);
    check((await marker(privB, 'private-room', seenB)).length === 0, 'an oversized client event was delivered');
    out({ step: 'oversized client event refused', error: be });
    // HTTP API: a wrong secret, an old timestamp, a body that does not match body_md5, a
    // signature replayed onto another body, data over 10 KB.
    const status = async (p) => p.then(() => 200, (e) => e.status);
    const wrong = new PusherServer({ appId, key, secret: 'not-the-secret', host: hostname, port, useTLS: false });
    check((await status(wrong.trigger('public-room', 'evil', {}))) === 401, 'wrong secret not 401');
    const signed = (method, path, body, ts) => {
      const params = { auth_key: key, auth_timestamp: String(ts), auth_version: '1.0' };
      if (body) params.body_md5 = crypto.createHash('md5').update(body).digest('hex');
      const q = Object.keys(params).sort().map((k) => `${k}=${params[k]}`).join('&');
      const sig = crypto.createHmac('sha256', secret).update(`${method}\n${path}\n${q}`).digest('hex');
      return `${q}&auth_signature=${sig}`;
    };
    const path = `/apps/${appId}/events`;
    const body = JSON.stringify({ name: 'evil', channels: ['public-room'], data: '{}' });
    const now = Math.floor(Date.now() / 1000);
    const post = (q, b) => fetch(`${url}${path}?${q}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: b });
    const old = await post(signed('POST', path, body, now - 601), body);
    check(old.status === 401, `old timestamp: ${old.status}`);
    const tampered = await post(signed('POST', path, body, now), body.replace('evil', 'evi1'));
    check(tampered.status === 401, `body_md5 mismatch: ${tampered.status}`);
    const otherBody = JSON.stringify({ name: 'evil', channels: ['public-room'], data: '{"x":1}' });
    const q = signed('POST', path, body, now);
    const md5 = crypto.createHash('md5').update(otherBody).digest('hex');
    const replayed = await post(q.replace(/body_md5=[0-9a-f]+/, `body_md5=${md5}`), otherBody);
    check(replayed.status === 401, `replayed signature: ${replayed.status}`);
    const tooBig = await status(server.trigger('public-room', 'evil', 'x'.repeat(10 * 1024 + 1)));
    check(tooBig === 413, `oversized: ${tooBig}`);
    out({ step: 'HTTP API refusals', old: old.status, tampered: tampered.status, replayed: replayed.status, oversized: tooBig });
    const before = await marker(pub, 'public-room', seen);
    check(before.length === 0, `delivered despite refusals: ${JSON.stringify(before)}`);
    out({ step: 'nothing delivered' });
    // An unknown app key: closed with 4001, and pusher-js does not retry.
    const stranger = new PusherJs('no-such-key', { wsHost: hostname, wsPort: Number(port), forceTLS: false, enabledTransports: ['ws'], cluster: 'mt1', disableStats: true });
    clients.push(stranger);
    const e4001 = await once(stranger.connection, 'error', 'error for an unknown key');
    const data4001 = e4001.data || (e4001.error && e4001.error.data);
    check(data4001 && data4001.code === 4001, `unknown key: ${JSON.stringify(e4001)}`);
    out({ step: 'unknown key closed 4001', error: data4001 });
  },

  // pusher:signin, then the app sends to the user (the SDK's sendToUser): pusher-js follows
  // #server-to-user-ID by itself and hands the event to pusher.user.bind.
  async send_to_user() {
    const a = client({ user_id: 'carol' });
    await connected(a);
    const subscribed = new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error('no #server-to-user subscription')), TIMEOUT - 1000);
      a.connection.bind('message', (m) => {
        if (m.event === 'pusher_internal:subscription_succeeded' && m.channel === '#server-to-user-carol') {
          clearTimeout(t);
          resolve();
        }
      });
    });
    a.signin();
    await subscribed;
    out({ step: 'user channel followed' });
    const got = once(a.user, 'note', 'the event sent to the user');
    await server.sendToUser('carol', 'note', { text: 'just for carol' });
    out({ step: 'sent to the user', data: await got });
  },

  // pusher:signin, then the app terminates the user's connections.
  async terminate() {
    const a = client({ user_id: 'alice' });
    await connected(a);
    const signedIn = new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error('no signin_success')), TIMEOUT - 1000);
      a.user.bind('pusher:signin_success', () => {});
      a.connection.bind('message', (m) => {
        if (m.event === 'pusher:signin_success') {
          clearTimeout(t);
          resolve(m);
        }
      });
    });
    a.signin();
    await signedIn;
    out({ step: 'signed in' });
    const closed = new Promise((resolve) => a.connection.bind('state_change', (s) => {
      if (s.current === 'disconnected' || s.current === 'failed' || s.current === 'unavailable') resolve(s);
    }));
    const errored = once(a.connection, 'error', 'close error');
    await server.terminateUserConnections('alice');
    const e = await errored;
    out({ step: 'terminated', error: e.data || e, state: (await closed).current });
  },

  // Stays connected across a server restart: prints each connection, then each event.
  async reconnect() {
    const a = client();
    let n = 0;
    a.connection.bind('connected', () => out({ step: 'connected', n: ++n }));
    const t0 = Date.now();
    a.connection.bind('state_change', (s) => console.error(Date.now() - t0, 'state', s.current));
    a.connection.bind('error', (e) => console.error(Date.now() - t0, 'error', JSON.stringify(e).slice(0, 300)));
    await connected(a);
    const ch = a.subscribe('lobby');
    ch.bind('pusher:subscription_succeeded', () => out({ step: 'subscribed' }));
    ch.bind('hello', (d) => {
      out({ step: 'event', data: d });
      if (d.last) done();
    });
    let done;
    await new Promise((r) => (done = r));
  },
};

try {
  const run = scenarios[scenario];
  if (!run) fail(`unknown scenario ${scenario}`);
  await run();
  out({ ok: true });
  for (const c of clients) c.disconnect();
  auth.close();
  process.exit(0);
} catch (e) {
  fail(e.stack || String(e));
}
