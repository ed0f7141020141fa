import { test } from 'node:test';
import assert from 'node:assert/strict';
import { EventFd, SysError } from '../src/sys/index.js';
import { tick, until } from './helpers/sys.js';

test('signal adds to the counter and read takes it', () => {
  const e = EventFd.create();
  assert.equal(e.read(), 0);
  e.signal();
  e.signal(41);
  assert.equal(e.read(), 42);
  assert.equal(e.read(), 0);
  e.close();
});

test('semaphore mode takes one at a time', () => {
  const e = EventFd.create({ semaphore: true, initval: 2 });
  assert.equal(e.read(), 1);
  assert.equal(e.read(), 1);
  assert.equal(e.read(), 0);
  e.close();
});

test('wait resolves on a later signal from the event loop', async () => {
  const e = EventFd.create();
  const p = e.wait();
  setTimeout(() => e.signal(3), 5);
  assert.equal(await p, 3);
  e.close();
});

test('subscribe sees each signal until unsubscribed', async () => {
  const e = EventFd.create();
  const seen: number[] = [];
  const stop = e.subscribe((n) => seen.push(n));
  // Wait for each signal to be seen (not a fixed time: a loaded machine may take longer).
  e.signal(1);
  await until(() => seen.length >= 1);
  e.signal(2);
  await until(() => seen.length >= 2);
  stop();
  e.signal(4);
  await tick(20); // negative check: no callback after unsubscribing
  assert.deepEqual(seen, [1, 2]);
  assert.equal(e.read(), 4);
  e.close();
});

test('close rejects pending waits with EBADF', async () => {
  const e = EventFd.create();
  const p = e.wait();
  e.close();
  await assert.rejects(p, (err: unknown) => err instanceof SysError && err.code === 'EBADF');
});

test('counter overflow is reported, not thrown', () => {
  const e = EventFd.create();
  assert.equal(e.signal(0xfffffffffffffffen), true);
  assert.equal(e.signal(1), false);
  e.close();
});
