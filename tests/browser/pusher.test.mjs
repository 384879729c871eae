// Laravel Echo with the Pusher broadcaster (and so pusher-js's browser build) in headless
// Chromium against a real `tidings serve` with a [[pusher.apps]] app; the events come from the
// `pusher` Node SDK, as a Laravel backend's would, and private/presence auth from an auth
// endpoint this test runs (signed by the same SDK).

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { writeFileSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import PusherServer from 'pusher';
import { startServer, launchBrowser, newPage } from './harness.mjs';

const HERE = dirname(fileURLToPath(import.meta.url));
const MODULES = resolve(HERE, 'node_modules');
const APP = { appId: '1001', key: 'echo-key', secret: 'echo-secret' };
const WAIT = { timeout: 10000 };

let server;
let browser;
let sdk;
let auth;
let authUrl;
let dir;

before(async () => {
  dir = mkdtempSync(join(tmpdir(), 'tidings-pusher-'));
  const config = join(dir, 'tidings.toml');
  writeFileSync(
    config,
    `[[pusher.apps]]\nid = "${APP.appId}"\nkey = "${APP.key}"\nsecret = "${APP.secret}"\nclient_events = true\n`,
  );
  server = await startServer(['--config', config]);
  const { hostname, port } = new URL(server.url);
  sdk = new PusherServer({ ...APP, host: hostname, port, useTLS: false });
  // The app's broadcasting auth route, as Laravel's /broadcasting/auth would answer.
  auth = http.createServer((req, res) => {
    let body = '';
    req.on('data', (c) => (body += c));
    req.on('end', () => {
      const p = new URLSearchParams(body);
      const channel = p.get('channel_name');
      const answer = channel.startsWith('presence-')
        ? sdk.authorizeChannel(p.get('socket_id'), channel, { user_id: 'browser-user', user_info: { name: 'Echo' } })
        : sdk.authorizeChannel(p.get('socket_id'), channel);
      res.writeHead(200, { 'content-type': 'application/json', 'access-control-allow-origin': '*' });
      res.end(JSON.stringify(answer));
    });
  });
  await new Promise((r) => auth.listen(0, '127.0.0.1', r));
  authUrl = `http://127.0.0.1:${auth.address().port}/broadcasting/auth`;
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await server?.stop();
  auth?.close();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

test('Laravel Echo receives public, private and presence events triggered by the Pusher SDK', async () => {
  const page = await newPage(browser.context);
  // A page of the server's own origin (no CSP on /healthz): Chromium's local network access
  // checks block about:blank from opening sockets to loopback.
  await page.goto(`${server.url}/healthz`);
  await page.addScriptTag({ path: join(MODULES, 'pusher-js/dist/web/pusher.min.js') });
  await page.addScriptTag({ path: join(MODULES, 'laravel-echo/dist/echo.iife.js') });
  const { hostname, port } = new URL(server.url);
  await page.evaluate(
    ({ key, host, port, authUrl }) => {
      const EchoClass = window.Echo.default || window.Echo;
      window.got = [];
      window.joined = null;
      const echo = new EchoClass({
        broadcaster: 'pusher',
        key,
        wsHost: host,
        wsPort: port,
        forceTLS: false,
        enabledTransports: ['ws'],
        cluster: 'mt1',
        disableStats: true,
        authEndpoint: authUrl,
        Pusher: window.Pusher,
      });
      window.echo = echo;
      window.ready = 0;
      echo
        .channel('orders')
        .subscribed(() => window.ready++)
        .listen('OrderShipped', (e) => window.got.push(['orders', e]))
        .listen('.App.Events.Refunded', (e) => window.got.push(['refund', e]));
      echo.private('inbox').subscribed(() => window.ready++).listen('.note', (e) => window.got.push(['inbox', e]));
      echo.join('room').here((users) => {
        window.joined = users;
        window.ready++;
      });
    },
    { key: APP.key, host: hostname, port: Number(port), authUrl },
  );
  await page.waitForFunction(() => window.ready === 3, null, WAIT).catch((e) => {
    throw new Error(`${e.message}; page problems: ${page.problems.join('; ')}`);
  });
  const members = await page.evaluate(() => window.joined);
  assert.deepEqual(members, [{ name: 'Echo' }]);
  // Laravel broadcasts `App\Events\OrderShipped`; Echo listens for `OrderShipped` in the
  // App.Events namespace. The name is outside Tidings' event names: it travels wrapped.
  await sdk.trigger('orders', 'App\\Events\\OrderShipped', { order: 7 });
  await sdk.trigger('private-inbox', 'note', { text: 'hi' });
  await page.waitForFunction(() => window.got.length === 2, null, WAIT);
  const got = await page.evaluate(() => window.got);
  assert.deepEqual(got, [
    ['orders', { order: 7 }],
    ['inbox', { text: 'hi' }],
  ]);
  // A Tidings publish reaches Echo too.
  const res = await fetch(`${server.url}/publish/pusher:${APP.appId}:orders?event=App.Events.Refunded`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ order: 8 }),
  });
  assert.equal(res.status, 200, await res.text());
  await page.waitForFunction(() => window.got.length === 3, null, WAIT);
  assert.deepEqual((await page.evaluate(() => window.got))[2], ['refund', { order: 8 }]);
  assert.deepEqual(page.problems, []);
});

test('the admin console lists the Pusher app and shows a pusher-js connection and its user appear', async () => {
  const admin = await newPage(browser.context);
  await admin.goto(`${server.url}/admin`);
  await admin.waitForSelector('#pusher:not([hidden])', WAIT);
  await admin.waitForSelector(`#pusher-apps td:has-text("${APP.key}")`, WAIT);
  const before = Number(await admin.textContent(`#pusher-conn-${APP.appId}`));
  // pusher-js's browser build in another page, signed in as a user.
  const page = await newPage(browser.context);
  await page.goto(`${server.url}/healthz`);
  await page.addScriptTag({ path: join(MODULES, 'pusher-js/dist/web/pusher.min.js') });
  const { hostname, port } = new URL(server.url);
  const userAuth = http.createServer((req, res) => {
    let body = '';
    req.on('data', (c) => (body += c));
    req.on('end', () => {
      const p = new URLSearchParams(body);
      res.writeHead(200, { 'content-type': 'application/json', 'access-control-allow-origin': '*' });
      res.end(JSON.stringify(sdk.authenticateUser(p.get('socket_id'), { id: 'admin-seen' })));
    });
  });
  await new Promise((r) => userAuth.listen(0, '127.0.0.1', r));
  const socketId = await page.evaluate(
    ({ key, host, port, endpoint }) =>
      new Promise((resolve) => {
        const p = new window.Pusher(key, {
          wsHost: host,
          wsPort: port,
          forceTLS: false,
          enabledTransports: ['ws'],
          cluster: 'mt1',
          disableStats: true,
          userAuthentication: { endpoint, transport: 'ajax' },
        });
        p.bind('pusher:signin_success', () => resolve(p.connection.socket_id));
        p.signin();
      }),
    { key: APP.key, host: hostname, port: Number(port), endpoint: `http://127.0.0.1:${userAuth.address().port}/user-auth` },
  );
  await admin.waitForFunction(
    ({ id, n }) => document.getElementById(`pusher-conn-${id}`)?.textContent === String(n),
    { id: APP.appId, n: before + 1 },
    WAIT,
  );
  const item = await admin.waitForSelector(`#pusher-sockets li[data-socket="${socketId}"]`, WAIT);
  await admin.waitForFunction((el) => el.textContent.includes('user admin-seen'), item, WAIT);
  // It goes away when the connection closes.
  await page.close();
  await admin.waitForSelector(`#pusher-sockets li[data-socket="${socketId}"]`, { state: 'detached', ...WAIT });
  userAuth.close();
  assert.deepEqual(admin.problems, []);
  await admin.close();
});
