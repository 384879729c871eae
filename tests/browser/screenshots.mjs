// Takes a screenshot of every page into docs/images/ (run by scripts/screenshots.sh).
// The pages are first given something to show: chat lines in two rooms, a lab run with a
// burst and a cut, an admin console watching it all.

import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { startServer, launchBrowser, newPage, ROOT } from './harness.mjs';

const OUT = join(ROOT, 'docs/images');
mkdirSync(OUT, { recursive: true });

const server = await startServer();
const { context, close } = await launchBrowser();
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
try {
  const url = server.url;
  const shot = async (page, name) => {
    await page.screenshot({ path: join(OUT, `${name}.png`) });
    console.log(`docs/images/${name}.png`);
    if (page.problems.length) console.log(`  problems: ${page.problems.join('; ')}`);
  };

  const home = await newPage(context);
  await home.goto(`${url}/`);
  await shot(home, 'home');

  const alice = await newPage(context);
  const bob = await newPage(context);
  await alice.goto(`${url}/demo/chat?room=lobby&transport=websocket&nick=alice`);
  await bob.goto(`${url}/demo/chat?room=lobby&transport=sse&nick=bob`);
  await alice.waitForSelector('#status[data-state="connected"]');
  await bob.waitForSelector('#status[data-state="connected"]');
  const say = async (page, text) => {
    await page.fill('#text', text);
    await page.press('#text', 'Enter');
    await sleep(150);
  };
  await say(alice, 'hi bob, I am on a WebSocket');
  await say(bob, 'hello! SSE here, and I can still talk back');
  await say(alice, 'reload your tab: you will resume from your cursor');
  await say(bob, 'nothing lost, nothing twice');
  await sleep(500);
  await shot(bob, 'chat');

  const dash = await newPage(context);
  await dash.goto(`${url}/demo/dashboard`);
  await sleep(6000); // a few live ticks on top of the replayed history
  await shot(dash, 'dashboard');

  const admin = await newPage(context);
  await admin.goto(`${url}/admin`);

  const lab = await newPage(context);
  await lab.goto(`${url}/demo/lab`);
  await sleep(3000);
  await lab.click('#burst');
  await sleep(1500);
  await lab.click('#cut');
  await sleep(3500);
  await shot(lab, 'lab');

  await admin.fill('#inspect-name', 'chat:lobby');
  await admin.click('#inspect button');
  await sleep(1500);
  await shot(admin, 'admin');

  const phone = await context.newPage();
  await phone.setViewportSize({ width: 390, height: 844 });
  phone.problems = [];
  await phone.goto(`${url}/demo/chat?room=lobby&transport=stream&nick=carol`);
  await phone.waitForSelector('#status[data-state="connected"]');
  await sleep(500);
  await shot(phone, 'chat-phone');
} finally {
  await close();
  await server.stop();
}
