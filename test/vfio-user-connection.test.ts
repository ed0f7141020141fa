import { test } from 'node:test';
import assert from 'node:assert/strict';
import { socketPair } from '../src/sys/index.js';
import { Connection, ConnectionError } from '../src/vfio-user/connection.js';
import { Command } from '../src/vfio-user/constants.js';
import { codecLimits } from '../src/vfio-user/messages.js';

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
  assert.ok(s.ms < m.ms && m.ms < l.ms, 'in deadline order');
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
  assert.ok(short.ms < 1000, `the 80 ms request took ${short.ms.toFixed(1)} ms`);
  assert.equal(conn.pendingCount, 1, 'the long one is still pending');
  conn.close();
  const l = await long;
  assert.ok(l.err instanceof ConnectionError && l.err.code === 'VFU_CLOSED', 'close fails the rest');
  theirs.destroy();
});
