/**
 * UnixSocket's read memory (src/sys/socket.ts): small reads go into the slab
 * all sockets of the process share; a socket whose reads fill what they ask
 * gets a pool of its own, grown while they do, shrunk (to READ_POOL_MIN at
 * least) when its reads were small, given up after an idle spell and on
 * close; chunks handed out keep their bytes
 * through all of it (memory is reused only where chunkRetained says nobody
 * kept the last chunk).
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { socketPair, type UnixSocket, type UnixSocketOptions } from '../src/sys/index.js';
import { READ_POOL_MAX, READ_POOL_MIN, SHARED_SLAB_SIZE } from '../src/sys/socket.js';
import { tick, until } from './helpers/sys.js';

/** Bytes 0..n-1 of a fixed pattern (not produced by the code under test). */
function pattern(n: number, seed = 0): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = (i * 7 + seed * 13 + 1) & 0xff;
  return b;
}

function pair(t: TestContext, options?: UnixSocketOptions): [UnixSocket, UnixSocket] {
  const [a, b] = socketPair(options);
  t.after(() => {
    a.destroy();
    b.destroy();
  });
  return [a, b];
}

/** Every 'data' chunk of `sock`, kept (never given back: no chunkRetained), with the pool size after each. */
function collect(sock: UnixSocket): { chunks: Buffer[]; pools: number[]; bytes: () => number } {
  const chunks: Buffer[] = [];
  const pools: number[] = [];
  sock.on('data', (chunk, fds) => {
    for (const fd of fds) fd.close();
    chunks.push(chunk);
    pools.push(sock.readPoolSize);
  });
  return { chunks, pools, bytes: () => chunks.reduce((s, c) => s + c.length, 0) };
}

/** Sends one message and waits until it has arrived (so each message is a read of its own). */
async function oneRead(a: UnixSocket, got: { bytes: () => number }, msg: Uint8Array): Promise<void> {
  const before = got.bytes();
  a.write(msg);
  await until(() => got.bytes() === before + msg.length, 5000, 'the message to arrive');
}

/** Writes `n` pattern bytes at once and waits for all of them; checks they arrived intact and no kept chunk was read over. */
async function stream(a: UnixSocket, got: ReturnType<typeof collect>, n: number, seed: number): Promise<Buffer> {
  const data = pattern(n, seed);
  const before = got.bytes();
  a.write(data);
  await until(() => got.bytes() === before + n, 10_000, 'the stream to arrive');
  assert.ok(Buffer.concat(got.chunks).subarray(before).equals(data), 'every byte, in order, after all the reads');
  assertDisjoint(got.chunks);
  return data;
}

/** Chunks that are views of the same memory never overlap (none was read over another one kept). */
function assertDisjoint(chunks: Buffer[]): void {
  const byBuffer = new Map<ArrayBufferLike, [number, number][]>();
  for (const c of chunks) {
    const list = byBuffer.get(c.buffer) ?? [];
    list.push([c.byteOffset, c.byteOffset + c.length]);
    byBuffer.set(c.buffer, list);
  }
  for (const list of byBuffer.values()) {
    list.sort((x, y) => x[0] - y[0]);
    for (let i = 1; i < list.length; i++) assert.ok(list[i]![0] >= list[i - 1]![1], `chunks at ${list[i - 1]} and ${list[i]} overlap`);
  }
}

test('UnixSocket read pool: none of its own for small messages (they go into the shared slab), none once closed', async (t) => {
  const [a, b] = pair(t);
  const got = collect(b);
  await tick(10); // both polls started, nothing to read
  assert.equal(a.readPoolSize, 0);
  assert.equal(b.readPoolSize, 0);
  await oneRead(a, got, pattern(100));
  assert.equal(b.readPoolSize, 0, 'a small message takes no pool of its own');
  assert.equal(got.chunks[0]!.buffer.byteLength, SHARED_SLAB_SIZE, 'it is a view of the shared slab');
  assert.equal(a.readPoolSize, 0, 'the side that only wrote holds none');
  assert.deepEqual(got.pools, [0]);
  assert.ok(got.chunks[0]!.equals(pattern(100)));
  b.destroy();
  assert.equal(b.readPoolSize, 0);
  assert.ok(got.chunks[0]!.equals(pattern(100)), 'a chunk handed out keeps its bytes after the socket is gone');
});

test('UnixSocket read pool: a stream grows the reads up to readSize and the pool to 4 x readSize; kept chunks keep their bytes across pools', async (t) => {
  const readSize = 32 * 1024;
  const [a, b] = pair(t, { readSize });
  const got = collect(b);
  await stream(a, got, 4 << 20, 3);
  const largest = Math.max(...got.chunks.map((c) => c.length));
  assert.ok(got.chunks[0]!.length <= READ_POOL_MIN / 4, `the first read asks a quarter of READ_POOL_MIN (got ${got.chunks[0]!.length})`);
  assert.equal(largest, readSize, 'reads grew to readSize, never past it');
  assert.equal(Math.max(...got.pools), Math.max(READ_POOL_MIN, 4 * readSize));
  assert.ok(new Set(got.chunks.map((c) => c.buffer)).size > 1, 'the stream took several pools');
});

test('UnixSocket read pool: with the default readSize a stream takes the pool past READ_POOL_MIN, at most READ_POOL_MAX; reads at most 256 KiB', async (t) => {
  const [a, b] = pair(t);
  const got = collect(b);
  await stream(a, got, 8 << 20, 4);
  assert.ok(Math.max(...got.pools) > READ_POOL_MIN && Math.max(...got.pools) <= READ_POOL_MAX, `pools ${[...new Set(got.pools)]}`);
  assert.ok(Math.max(...got.chunks.map((c) => c.length)) <= 256 * 1024);
  assert.ok(Math.max(...got.chunks.map((c) => c.length)) > READ_POOL_MIN / 4, 'reads grew past the first ask');
});

test('UnixSocket read pool: a grown pool whose reads were small is replaced by a smaller one, down to READ_POOL_MIN', async (t) => {
  const readSize = 64 * 1024;
  const [a, b] = pair(t, { readSize });
  const got = collect(b);
  const bulk = await stream(a, got, 2 << 20, 5);
  assert.equal(b.readPoolSize, 4 * readSize, 'grown by the stream');
  // 2 KiB messages, one read each, all kept: each pool fills up and is replaced by a halved one.
  const msgs: Buffer[] = [];
  for (let i = 0; i < 400 && b.readPoolSize > READ_POOL_MIN; i++) {
    const m = pattern(2048, 10 + i);
    msgs.push(m);
    await oneRead(a, got, m);
  }
  assert.equal(b.readPoolSize, READ_POOL_MIN);
  // It keeps one of its own at READ_POOL_MIN (until an idle spell), not going back to the shared slab.
  for (let i = 0; i < 60; i++) {
    const m = pattern(2048, 500 + i);
    msgs.push(m);
    await oneRead(a, got, m);
  }
  assert.equal(b.readPoolSize, READ_POOL_MIN);
  assert.equal(got.chunks[got.chunks.length - 1]!.buffer.byteLength, READ_POOL_MIN);
  assert.ok(Buffer.concat(got.chunks).equals(Buffer.concat([bulk, ...msgs])), 'every byte kept intact');
  assertDisjoint(got.chunks);
});

test('UnixSocket read pool: a chunk given back (chunkRetained false) takes the next read; a kept one is never read over', async (t) => {
  const [a, b] = pair(t);
  let keep = true;
  b.chunkRetained = () => keep;
  const got = collect(b);
  await oneRead(a, got, pattern(40, 1)); // kept
  keep = false;
  await oneRead(a, got, pattern(40, 2)); // given back
  await oneRead(a, got, pattern(40, 3)); // lands where the second did
  const [c1, c2, c3] = got.chunks as [Buffer, Buffer, Buffer];
  assert.equal(c2.buffer, c1.buffer);
  assert.ok(c2.byteOffset >= c1.byteOffset + c1.length, 'after the kept chunk');
  assert.equal(c3.buffer, c2.buffer);
  assert.equal(c3.byteOffset, c2.byteOffset, 'the memory given back');
  assert.ok(c1.equals(pattern(40, 1)), 'the kept chunk is intact');
  assert.ok(c3.equals(pattern(40, 3)));
});

test('UnixSocket read pool: a target read with a tail as the first read gets a pool for the tail', async (t) => {
  const [a, b] = pair(t);
  const target = Buffer.alloc(100);
  let given = false;
  b.readTarget = () => (given ? null : ((given = true), target));
  b.readTail = () => 16;
  let inTarget = 0;
  b.targetRead = (n, fds) => {
    for (const fd of fds) fd.close();
    inTarget += n;
  };
  const got = collect(b);
  a.write(pattern(116, 6));
  await until(() => inTarget === 100 && got.bytes() === 16, 5000, 'the target and its tail');
  assert.ok(target.equals(pattern(116, 6).subarray(0, 100)));
  assert.ok(got.chunks[0]!.equals(pattern(116, 6).subarray(100)));
  assert.equal(b.readPoolSize, 0, 'a small tail goes into the shared slab');
  assert.equal(got.chunks[0]!.buffer.byteLength, SHARED_SLAB_SIZE);
});

test('UnixSocket read pool: a socket that stops reading gives its pool up; chunks handed out keep their bytes; the next small read goes into the shared slab', async (t) => {
  const [a, b] = pair(t, { readSize: 64 * 1024 });
  const got = collect(b);
  const bulk = await stream(a, got, 1 << 20, 7);
  assert.equal(b.readPoolSize, 4 * 64 * 1024, 'a pool of its own, grown by the stream');
  const last = got.chunks[got.chunks.length - 1]!;
  // Nothing to read: within two idle checks (POOL_IDLE_MS each) the pool is given up.
  await until(() => b.readPoolSize === 0, 10_000, 'the idle socket to give its pool up');
  await oneRead(a, got, pattern(300, 8));
  assert.equal(b.readPoolSize, 0);
  const next = got.chunks[got.chunks.length - 1]!;
  assert.notEqual(next.buffer, last.buffer, 'not the pool given up');
  assert.equal(next.buffer.byteLength, SHARED_SLAB_SIZE);
  assert.ok(Buffer.concat(got.chunks.slice(0, -1)).equals(bulk), 'the stream kept intact');
  assert.ok(next.equals(pattern(300, 8)));
});

test('UnixSocket shared slab: small reads of many sockets go into one slab, none holds memory of its own, and no kept chunk is read over', async (t) => {
  const pairs = Array.from({ length: 32 }, () => pair(t));
  const gots = pairs.map(([, b]) => collect(b));
  const sent: Buffer[][] = pairs.map(() => []);
  // 32 sockets take turns, 600-byte messages, every chunk kept: 32 x 8 x 600 bytes fill several slabs.
  for (let round = 0; round < 8; round++) {
    for (let i = 0; i < pairs.length; i++) {
      const m = pattern(600, round * 100 + i);
      sent[i]!.push(m);
      await oneRead(pairs[i]![0], gots[i]!, m);
    }
  }
  for (let i = 0; i < pairs.length; i++) {
    assert.equal(pairs[i]![1].readPoolSize, 0);
    assert.ok(Buffer.concat(gots[i]!.chunks).equals(Buffer.concat(sent[i]!)), `socket ${i}'s bytes intact`);
  }
  const all = gots.flatMap((g) => g.chunks);
  assertDisjoint(all);
  const slabs = new Set(all.map((c) => c.buffer));
  for (const sl of slabs) assert.equal(sl.byteLength, SHARED_SLAB_SIZE);
  // 256 chunks of 600 bytes (608 with alignment): 107 to a slab, so 3 slabs (4 if one was partly used before).
  assert.ok(slabs.size <= 4, `${slabs.size} slabs for ${all.length} small reads`);
});

test('UnixSocket shared slab: room given back by one socket (chunkRetained false) takes the next socket\'s read', async (t) => {
  const [a1, b1] = pair(t);
  const [a2, b2] = pair(t);
  b1.chunkRetained = () => false;
  b2.chunkRetained = () => false;
  const g1 = collect(b1);
  const g2 = collect(b2);
  await oneRead(a1, g1, pattern(50, 1));
  const c1 = Buffer.from(g1.chunks[0]!); // a copy: the room is given back
  await oneRead(a2, g2, pattern(70, 2));
  assert.equal(g2.chunks[0]!.buffer, g1.chunks[0]!.buffer, 'the same slab');
  assert.equal(g2.chunks[0]!.byteOffset, g1.chunks[0]!.byteOffset, 'the room given back');
  assert.ok(c1.equals(pattern(50, 1)));
  assert.ok(g2.chunks[0]!.equals(pattern(70, 2)));
});
