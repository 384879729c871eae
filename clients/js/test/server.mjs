// Helpers for the client tests that need the real server: start `tidings serve` on a free
// loopback port (optionally with a config file), publish with fetch, mint HS256 tokens, and a
// tiny HTTP proxy that can answer some paths itself (what a misconfigured proxy looks like).

import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { existsSync, mkdtempSync, writeFileSync, rmSync } from 'node:fs';
import http from 'node:http';
import { tmpdir } from 'node:os';
import { join, dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '../../..');

export function tidingsBinary() {
  const candidates = [process.env.TIDINGS_BIN, join(ROOT, 'target/debug/tidings'), join(ROOT, 'target/release/tidings')];
  const bin = candidates.find((c) => c && existsSync(c));
  if (!bin) throw new Error('no tidings binary: run `cargo build -p tidings-cli` or set TIDINGS_BIN');
  return bin;
}

/** Starts `tidings serve`; resolves to {url, stop()} once it listens. */
export function startServer({ config } = {}) {
  let dir;
  const args = ['serve', '--listen', '127.0.0.1:0'];
  if (config) {
    dir = mkdtempSync(join(tmpdir(), 'tidings-js-'));
    writeFileSync(join(dir, 'tidings.toml'), config);
    args.push('--config', join(dir, 'tidings.toml'));
  }
  return new Promise((resolveStart, reject) => {
    const child = spawn(tidingsBinary(), args, { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, TIDINGS_LOG: 'warn' } });
    let stderr = '';
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`tidings did not start in 15 s:\n${stderr}`));
    }, 15000);
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (chunk) => {
      stderr += chunk;
      const m = /tidings listening on (http:\/\/[0-9.:]+)\r?\n/.exec(stderr);
      if (m) {
        clearTimeout(timer);
        resolveStart({
          url: m[1],
          logs: () => stderr,
          stop: () =>
            new Promise((r) => {
              const done = () => {
                if (dir) rmSync(dir, { recursive: true, force: true });
                r();
              };
              if (child.exitCode !== null || child.signalCode !== null) return done();
              child.once('exit', done);
              child.kill('SIGKILL');
            }),
        });
      }
    });
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`tidings exited with ${code}:\n${stderr}`));
    });
  });
}

/** Publishes over HTTP; resolves to the position. */
export async function publish(url, channel, data, key) {
  const headers = { 'content-type': 'application/json' };
  if (key) headers.authorization = `Bearer ${key}`;
  const res = await fetch(`${url}/publish/${channel}`, { method: 'POST', headers, body: JSON.stringify(data) });
  const text = await res.text();
  if (res.status !== 200) throw new Error(`publish ${channel}: ${res.status} ${text}`);
  return JSON.parse(text);
}

/** An HS256 JWT. */
export function jwt(secret, claims) {
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString('base64url');
  const head = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}`;
  return `${head}.${createHmac('sha256', secret).update(head).digest('base64url')}`;
}

/**
 * A forwarding HTTP proxy in front of `target`; `block(pathname)` returning a status makes it
 * answer that itself with an HTML page. Resolves to {url, stop()}.
 */
export function startProxy(target, block) {
  const up = new URL(target);
  const server = http.createServer((req, res) => {
    const path = new URL(req.url, 'http://x').pathname;
    const status = block(path);
    if (status) {
      res.writeHead(status, { 'content-type': 'text/html' });
      res.end(`<html><body><h1>${status}</h1>proxy</body></html>`);
      return;
    }
    const fwd = http.request({ host: up.hostname, port: up.port, path: req.url, method: req.method, headers: req.headers }, (answer) => {
      res.writeHead(answer.statusCode, answer.headers);
      answer.pipe(res);
    });
    fwd.on('error', () => res.destroy());
    res.on('close', () => fwd.destroy());
    req.pipe(fwd);
  });
  return new Promise((r) =>
    server.listen(0, '127.0.0.1', () =>
      r({
        url: `http://127.0.0.1:${server.address().port}`,
        stop: () =>
          new Promise((done) => {
            server.closeAllConnections();
            server.close(() => done());
          }),
      }),
    ),
  );
}

/** Resolves when `pred()` is truthy; rejects after `ms` naming `what`. */
export function waitFor(pred, what, ms = 8000) {
  return new Promise((resolve, reject) => {
    const t0 = Date.now();
    const tick = () => {
      let v;
      try {
        v = pred();
      } catch {
        v = false;
      }
      if (v) return resolve(v);
      if (Date.now() - t0 > ms) return reject(new Error(`timed out waiting for ${what}`));
      setTimeout(tick, 5);
    };
    tick();
  });
}
