import { test } from 'node:test';
import assert from 'node:assert/strict';
import { socketPair } from '../src/sys/index.js';
import { Connection, ConnectionError } from '../src/vfio-user/connection.js';
import { Command } from '../src/vfio-user/constants.js';
import { codecLimits } from '../src/vfio-user/messages.js';
import { until } from './helpers/sys.js';

const silentPeer = () => {
  const [ours, theirs] = socketPair();
  const seen: number[] = [];
  theirs.on('data', (c: Buffer) => seen.push(c.length)); // reads, never answers
  const conn = new Connection(ours, { limits: codecLimits(1 << 20), onRequest: () => undefined });
  return { conn, theirs, seen };
};

const settleTime = async (p: Promise<unknown>, t0: number): Promise<{ ms: number; err: unknown }> => {
  try {
    await p;
    return { ms: performance.now() - t0, err: null };
  } catch (err) {
    return { ms: performance.now() - t0, err };
  }
};

test('each pending request times out at its own deadline (one timer for all of them)', async (t) => {
  const { conn, theirs } = silentPeer();
  t.after(() => {
    conn.close();
    theirs.destroy();
  });
  const t0 = performance.now();
  const long = settleTime(conn.request(Command.DEVICE_RESET, undefined, { timeoutMs: 400 }), t0);
  const short = settleTime(conn.request(Command.DEVICE_RESET, undefined, { timeoutMs: 100 }), t0);
  const mid = settleTime(conn.request(Command.DEVICE_RESET, undefined, { timeoutMs: 250 }), t0);
  const [s, m, l] = await Promise.all([short, mid, long]);
  for (const [r, ms, name] of [[s, 100, 'short'], [m, 250, 'mid'], [l, 400, 'long']] as const) {
    assert.ok(r.err instanceof ConnectionError && r.err.code === 'VFU_TIMEOUT', `${name}: ${String(r.err)}`);
    assert.ok(r.ms >= ms - 1, `${name} timed out after ${r.ms.toFixed(1)} ms, before its ${ms} ms`);
    assert.ok(r.ms < ms + 1000, `${name} timed out only after ${r.ms.toFixed(1)} ms`);
  }
  // In deadline order, unless the event loop was stalled past the next deadline when the timer fired:
  // then one pass fails both (in request order), which is right too.
  if (s.ms < 250) assert.ok(s.ms < m.ms, `short (${s.ms.toFixed(1)} ms) before mid (${m.ms.toFixed(1)} ms)`);
  if (m.ms < 400) assert.ok(m.ms < l.ms, `mid (${m.ms.toFixed(1)} ms) before long (${l.ms.toFixed(1)} ms)`);
  assert.equal(conn.pendingCount, 0);
  conn.close();
  theirs.destroy();
});

test('a request made while the timer is armed for a later deadline gets its own, earlier one', async (t) => {
  const { conn, theirs } = silentPeer();
  t.after(() => {
    conn.close();
    theirs.destroy();
  });
  const t0 = performance.now();
  const long = settleTime(conn.request(Command.DEVICE_RESET, undefined, { timeoutMs: 5000 }), t0);
  const short = await settleTime(conn.request(Command.DEVICE_RESET, undefined, { timeoutMs: 80 }), t0);
  assert.ok(short.err instanceof ConnectionError && short.err.code === 'VFU_TIMEOUT');
  assert.ok(short.ms < 80 + 1000, `the 80 ms request took ${short.ms.toFixed(1)} ms`);
  assert.equal(conn.pendingCount, 1, 'the long one is still pending');
  conn.close();
  const l = await long;
  assert.ok(l.err instanceof ConnectionError && l.err.code === 'VFU_CLOSED', 'close fails the rest');
  theirs.destroy();
});

test('a handler reply that does not encode gets an errno reply; the connection goes on', async (t) => {
  const [a, b] = socketPair();
  const server = new Connection(a, {
    limits: codecLimits(1 << 20),
    // REGION_WRITE needs a reply body; returning nothing is a handler bug.
    onRequest: (msg) => (msg.command === Command.REGION_WRITE ? undefined : { body: undefined }),
  });
  const errors: Error[] = [];
  server.on('error', (e) => errors.push(e));
  const client = new Connection(b, { limits: codecLimits(1 << 20), onRequest: () => undefined });
  t.after(() => {
    client.close();
    server.close();
  });
  const data = new Uint8Array([1, 2, 3, 4]);
  await assert.rejects(client.request(Command.REGION_WRITE, { offset: 0, region: 0, count: 4, data }), (e: unknown) => e instanceof ConnectionError && e.code === 'VFU_PEER_ERROR');
  assert.equal(errors.length, 1, 'reported on the connection');
  await client.request(Command.DEVICE_RESET, undefined); // still served
  assert.equal(server.closed, false);
});

test('pending requests fail saying who closed: our close() versus the peer going away', async (t) => {
  const a = silentPeer();
  const b = silentPeer();
  t.after(() => {
    a.theirs.destroy();
    b.conn.close();
  });
  const mine = a.conn.request(Command.DEVICE_RESET, undefined);
  const theirs = b.conn.request(Command.DEVICE_RESET, undefined);
  const mineSettled = mine.then(() => null, (e: unknown) => e);
  a.conn.close();
  await until(() => b.seen.length > 0); // the peer read the request, then goes away
  b.theirs.destroy();
  await assert.rejects(mineSettled.then((e) => Promise.reject(e)), (e: unknown) => e instanceof ConnectionError && e.code === 'VFU_CLOSED' && !/peer/.test(e.message) && /connection closed/.test(e.message));
  await assert.rejects(theirs, (e: unknown) => e instanceof ConnectionError && e.code === 'VFU_CLOSED' && /peer closed/.test(e.message));
});

// A reply header built by hand (vfio-user.rst, "Header"): id, command, size, flags, errno.
const replyHeader = (id: number, cmd: number, flags: number, errno = 0): Buffer => {
  const b = Buffer.alloc(16);
  b.writeUInt16LE(id, 0);
  b.writeUInt16LE(cmd, 2);
  b.writeUInt32LE(16, 4);
  b.writeUInt32LE(flags, 8);
  b.writeUInt32LE(errno, 12);
  return b;
};

test('an unsolicited reply is answered EINVAL (as libvfio-user does); an unsolicited error reply is not', async (t) => {
  const { conn, theirs } = silentPeer();
  const got: Buffer[] = [];
  theirs.removeAllListeners('data');
  theirs.on('data', (c: Buffer) => got.push(c));
  t.after(() => {
    conn.close();
    theirs.destroy();
  });
  // id 0x1234, DEVICE_RESET (13), type REPLY (1): we never sent it.
  theirs.write(replyHeader(0x1234, 13, 0x1));
  await until(() => Buffer.concat(got).length >= 16);
  const answer = Buffer.concat(got);
  assert.equal(answer.length, 16);
  assert.deepEqual(
    [answer.readUInt16LE(0), answer.readUInt16LE(2), answer.readUInt32LE(4), answer.readUInt32LE(8), answer.readUInt32LE(12)],
    [0x1234, 13, 16, 0x1 | 0x20, 22],
    'REPLY|ERROR, EINVAL, same id and command',
  );
  // An error reply nobody asked for: dropped (answering could bounce for ever between two such peers).
  got.length = 0;
  theirs.write(replyHeader(0x4321, 13, 0x1 | 0x20, 22));
  // A truncated-body reply with an unknown id (REGION_READ says 16 bytes, needs more): answered too.
  theirs.write(replyHeader(0x5555, 9, 0x1));
  await until(() => Buffer.concat(got).length >= 16);
  const second = Buffer.concat(got);
  assert.equal(second.length, 16, 'only the second one was answered');
  assert.equal(second.readUInt16LE(0), 0x5555);
  assert.equal(second.readUInt32LE(12), 22);
  assert.equal(conn.unsolicitedReplies, 3);
  // The connection still works: a request made now gets its reply.
  const req = conn.request(Command.DEVICE_RESET, undefined, { timeoutMs: 2000 });
  await until(() => got.length > 0 && Buffer.concat(got).length >= 32);
  const sent = Buffer.concat(got).subarray(16);
  theirs.write(replyHeader(sent.readUInt16LE(0), 13, 0x1));
  await req;
  assert.equal(conn.unsolicitedReplies, 3);
});
