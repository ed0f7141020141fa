import { test } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { socketPair, EventFd } from '../src/sys/index.js';
import { receive } from './helpers/sys.js';

test('corked writes leave together on uncork, in order, fds with their own bytes', async (t) => {
  const [a, b] = socketPair();
  const e = EventFd.create();
  t.after(() => {
    e.close();
    a.destroy();
    b.destroy();
  });
  const chunks: number[] = [];
  b.on('data', (c: Buffer) => chunks.push(c.length));
  a.cork();
  a.write(Buffer.from('one,'));
  a.write([Buffer.from('two'), Buffer.from(',')]);
  a.write(Buffer.from('fd,'), [e.fd]);
  a.write(Buffer.from('four'));
  assert.equal(a.writableLength, 4 + 4 + 3 + 4, 'nothing sent while corked');
  const got = receive(b, 15);
  await new Promise((r) => setTimeout(r, 20));
  assert.deepEqual(chunks, [], 'the peer saw nothing while corked');
  a.uncork();
  const r = await got;
  assert.equal(r.bytes.toString(), 'one,two,fd,four');
  assert.equal(r.fds.length, 1);
  // The fd travels with its own write's first byte: the chunk that carried it ends at or after 'fd,' began.
  assert.ok(r.fds[0]!.at >= 8, `fd arrived with byte ${r.fds[0]!.at}`);
  for (const f of r.fds) f.fd.close();
  assert.equal(a.writableLength, 0);
});

test('cork nests; uncork without cork is harmless; drain comes after an uncork that empties a full queue', async (t) => {
  const [a, b] = socketPair({ highWaterMark: 16 });
  t.after(() => {
    a.destroy();
    b.destroy();
  });
  a.uncork(); // no effect
  a.cork();
  a.cork();
  assert.equal(a.write(Buffer.alloc(10, 1)), true);
  assert.equal(a.write(Buffer.alloc(10, 2)), false, 'above the high-water mark while corked');
  a.uncork();
  assert.equal(a.writableLength, 20, 'still corked once');
  const drained = once(a, 'drain');
  const got = receive(b, 20);
  a.uncork();
  await drained;
  const r = await got;
  assert.deepEqual([...r.bytes], [...Buffer.alloc(10, 1), ...Buffer.alloc(10, 2)]);
});

test('end() while corked closes as soon as uncork() has sent the queue', async (t) => {
  const [a, b] = socketPair();
  t.after(() => {
    a.destroy();
    b.destroy();
  });
  const got = receive(b, 5);
  const ended = new Promise<number>((resolve) => {
    const t0 = performance.now();
    b.once('end', () => resolve(performance.now() - t0));
  });
  a.cork();
  a.write(Buffer.from('bytes'));
  a.end();
  a.uncork();
  assert.equal((await got).bytes.toString(), 'bytes');
  const ms = await ended;
  assert.ok(ms < 1000, `the peer saw the end after ${ms.toFixed(0)} ms (end()'s fallback timer is 2000)`);
});
