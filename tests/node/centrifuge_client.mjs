// The published centrifuge-js client (5.7.4, unmodified, with ws as its WebSocket) against a
// Centrifuge endpoint.
//
// Usage: node centrifuge_client.mjs CENTRIFUGE_JS_DIR URL TOKEN json|protobuf [no-presence]
//
// Subscribes before connecting, so the client sends its connect and the subscribe in one
// message; publishes, waits for its own publication, then asks for history, presence and
// presence stats (not with `no-presence`). Prints one JSON line per step; any failure exits
// with status 1.

import path from 'node:path';
import { pathToFileURL } from 'node:url';

const [dir, url, token, encoding, mode] = process.argv.slice(2);
const protobuf = encoding === 'protobuf';
const load = (p) => import(pathToFileURL(path.join(dir, 'node_modules', p)).href);
const { Centrifuge } = await load(protobuf ? 'centrifuge/build/protobuf/index.mjs' : 'centrifuge/build/index.mjs');
const WebSocket = (await load('ws/wrapper.mjs')).default;

const STEP_TIMEOUT_MS = 5000;
const out = (fields) => console.log(JSON.stringify(fields));
const events = [];
const waiters = [];
const push = (e) => (waiters.length ? waiters.shift()(e) : events.push(e));
const next = () =>
  new Promise((resolve, reject) => {
    if (events.length) return resolve(events.shift());
    const timer = setTimeout(() => reject(new Error('timed out waiting for an event')), STEP_TIMEOUT_MS);
    waiters.push((e) => {
      clearTimeout(timer);
      resolve(e);
    });
  });
// protobufjs hands uint64 fields (offsets) over as Long objects.
const num = (x) => (x !== null && typeof x === 'object' && typeof x.toNumber === 'function' ? x.toNumber() : x);
const data = (raw) => (protobuf ? JSON.parse(new TextDecoder().decode(raw)) : raw);

try {
  const client = new Centrifuge(url, { token, websocket: WebSocket, timeout: STEP_TIMEOUT_MS });
  const sub = client.newSubscription('room:main', { recoverable: true });
  sub.on('subscribed', (ctx) => push(['subscribed', ctx]));
  sub.on('publication', (ctx) => push(['publication', ctx]));
  sub.subscribe();
  client.connect();
  const [kind, ctx] = await next();
  if (kind !== 'subscribed') throw new Error(`expected subscribed, got ${kind}`);
  out({
    step: 'subscribed',
    recoverable: ctx.recoverable,
    positioned: ctx.positioned,
    epoch: ctx.streamPosition ? ctx.streamPosition.epoch : null,
    offset: ctx.streamPosition ? num(ctx.streamPosition.offset) : null,
  });

  const message = { text: 'hello', from: 'js' };
  await sub.publish(protobuf ? new TextEncoder().encode(JSON.stringify(message)) : message);
  const [pkind, pub] = await next();
  if (pkind !== 'publication') throw new Error(`expected publication, got ${pkind}`);
  out({ step: 'publication', data: data(pub.data), offset: num(pub.offset), user: pub.info ? pub.info.user : null });

  const history = await sub.history({ limit: -1 });
  out({
    step: 'history',
    epoch: history.epoch,
    offset: num(history.offset),
    publications: history.publications.map((p) => ({ offset: num(p.offset), data: data(p.data) })),
  });
  if (mode !== 'no-presence') {
    const presence = await sub.presence();
    out({ step: 'presence', users: Object.values(presence.clients).map((c) => c.user).sort() });
    const stats = await sub.presenceStats();
    out({ step: 'presence_stats', num_clients: stats.numClients, num_users: stats.numUsers });
  }
  client.disconnect();
  out({ step: 'done' });
  process.exit(0);
} catch (e) {
  console.error(e && e.stack ? e.stack : e);
  process.exit(1);
}
