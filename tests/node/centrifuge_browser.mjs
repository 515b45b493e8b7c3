// The published centrifuge-js client (5.7.4, its browser bundle, unmodified) in a real browser:
// Debian's Chromium, headless, driven by playwright-core (no browser download).
//
// Usage: node centrifuge_browser.mjs CENTRIFUGE_JS_DIR WS_URL TOKEN API_URL API_KEY [CHROMIUM [PAGE_PORT]]
//
// Serves a page from its own HTTP server on 127.0.0.1 (so the WebSocket upgrade carries that
// page's Origin, as a browser application's would) and, in it: subscribes before connecting (the
// client sends connect and subscribe in one frame), receives a publication made through the
// server API, then disconnects, lets two more be published while it is away, reconnects and
// prints what the recovery gave back. Prints one JSON line per step, the page's origin first;
// any failure exits with status 1.

import http from 'node:http';
import fs from 'node:fs';
import path from 'node:path';

const [dir, wsUrl, token, apiUrl, apiKey, chromiumPath = '/usr/bin/chromium', pagePort = '0'] = process.argv.slice(2);
const STEP_TIMEOUT_MS = 10000;
const CHANNEL = 'room:main';
const out = (fields) => console.log(JSON.stringify(fields));

const bundle = fs.readFileSync(path.join(dir, 'node_modules/centrifuge/dist/centrifuge.js'));
const page = `<!doctype html><meta charset="utf-8"><title>wse-server centrifuge-js</title>
<script src="/centrifuge.js"></script>`;
const server = http.createServer((req, res) => {
  if (req.url === '/centrifuge.js') {
    res.writeHead(200, { 'content-type': 'text/javascript' });
    res.end(bundle);
  } else {
    res.writeHead(200, { 'content-type': 'text/html' });
    res.end(page);
  }
});
await new Promise((resolve) => server.listen(Number(pagePort), '127.0.0.1', resolve));
const origin = `http://127.0.0.1:${server.address().port}`;

async function publish(n) {
  const res = await fetch(`${apiUrl}/api/v1/publish`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `Bearer ${apiKey}` },
    body: JSON.stringify({ topic: CHANNEL, event: "chat", data: { n } }),
  });
  if (!res.ok) throw new Error(`publish ${n}: HTTP ${res.status} ${await res.text()}`);
}

const { chromium } = await import(path.join(dir, 'node_modules/playwright-core/index.mjs'));
const browser = await chromium.launch({
  executablePath: chromiumPath,
  // The tests run as root in a container, where Chromium's sandbox cannot start.
  args: ['--no-sandbox'],
});
try {
  const tab = await browser.newPage();
  tab.setDefaultTimeout(STEP_TIMEOUT_MS);
  tab.on('pageerror', (e) => console.error('page error:', e));
  await tab.goto(`${origin}/`);
  out({ step: 'origin', origin: await tab.evaluate(() => location.origin) });

  // The page's side: a client whose events wait in a queue that `next` reads one at a time.
  await tab.evaluate(
    ({ wsUrl, token, channel, timeout }) => {
      const events = [];
      const waiters = [];
      const push = (e) => (waiters.length ? waiters.shift()(e) : events.push(e));
      window.next = () =>
        new Promise((resolve, reject) => {
          if (events.length) return resolve(events.shift());
          const timer = setTimeout(() => reject(new Error('timed out waiting for an event')), timeout);
          waiters.push((e) => {
            clearTimeout(timer);
            resolve(e);
          });
        });
      const client = new Centrifuge(wsUrl, { token, timeout });
      const sub = client.newSubscription(channel, { recoverable: true });
      sub.on('subscribed', (ctx) =>
        push({
          kind: 'subscribed',
          wasRecovering: ctx.wasRecovering,
          recovered: ctx.recovered,
          recoverable: ctx.recoverable,
        }),
      );
      sub.on('publication', (ctx) => push({ kind: 'publication', data: ctx.data, offset: ctx.offset }));
      client.on('disconnected', (ctx) => push({ kind: 'disconnected', code: ctx.code }));
      window.client = client;
      sub.subscribe();
      client.connect();
    },
    { wsUrl, token, channel: CHANNEL, timeout: STEP_TIMEOUT_MS },
  );
  const next = () => tab.evaluate(() => window.next());

  out({ step: 'subscribed', ...(await next()) });
  await publish(1);
  out({ step: 'live', ...(await next()) });

  await tab.evaluate(() => window.client.disconnect());
  out({ step: 'away', ...(await next()) });
  await publish(2);
  await publish(3);
  await tab.evaluate(() => window.client.connect());
  // The recovered publications come before the subscribed event's handlers see the
  // resubscription's result, or after it, depending on the client; collect three events.
  const back = [await next(), await next(), await next()];
  for (const e of back) out({ step: 'back', ...e });
  out({ step: 'done' });
} catch (e) {
  console.error(e && e.stack ? e.stack : e);
  process.exitCode = 1;
} finally {
  await browser.close();
  server.close();
}
