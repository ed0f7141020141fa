/**
 * Scatter reads: a read into a target (readTarget) that runs on into the
 * socket's pool for readTail() more bytes, in one recvmsg. Used to receive a
 * placed payload's rest and the next message's prefix together. Also: what
 * 'data' listeners write during one wake-up's reads leaves corked.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { socketPair, socketPairFds, EventFd, type Fd, type UnixSocket, nativeAddon as native } from '../src/sys/index.js';
import { FrameReader } from '../src/wire/reader.js';
import { openFdCount, until } from './helpers/sys.js';

/** Bytes 0..n-1 of a fixed pattern (not produced by the code under test). */
function pattern(n: number, seed = 0): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = (i * 7 + seed * 13 + 1) & 0xff;
  return b;
}

test('native recvmsg with a tail: bytes past length land in tail[tailOffset..]; the rest of tail untouched', (t) => {
  const [a, b] = socketPairFds();
  t.after(() => {
    a.close();
    b.close();
  });
  const data = pattern(100);
  assert.equal(native.sendmsg(a.value, data, null), 100);
  const head = Buffer.alloc(40, 0xee);
  const tail = Buffer.alloc(64, 0xdd);
  const fdsOut = new Int32Array(4);
  const n = native.recvmsg(b.value, head, 0, 40, fdsOut, tail, 8, 30);
  assert.equal(n, 70);
  assert.deepEqual([...head], [...data.subarray(0, 40)]);
  assert.deepEqual([...tail.subarray(8, 38)], [...data.subarray(40, 70)]);
  assert.ok(tail.subarray(0, 8).every((x) => x === 0xdd), 'before tailOffset untouched');
  assert.ok(tail.subarray(38).every((x) => x === 0xdd), 'after tailOffset + tailLength untouched');
  // The rest is still in the socket.
  const rest = Buffer.alloc(64);
  assert.equal(native.recvmsg(b.value, rest, 0, 64, fdsOut), 30);
  assert.deepEqual([...rest.subarray(0, 30)], [...data.subarray(70)]);
});

test('native recvmsg with a tail: fewer bytes than the target fills only the target; a zero tailLength is a plain read', (t) => {
  const [a, b] = socketPairFds();
  t.after(() => {
    a.close();
    b.close();
  });
  const fdsOut = new Int32Array(4);
  native.sendmsg(a.value, pattern(10, 1), null);
  const head = Buffer.alloc(16);
  const tail = Buffer.alloc(16, 0xaa);
  assert.equal(native.recvmsg(b.value, head, 0, 16, fdsOut, tail, 0, 16), 10);
  assert.ok(tail.every((x) => x === 0xaa));
  native.sendmsg(a.value, pattern(20, 2), null);
  assert.equal(native.recvmsg(b.value, head, 0, 16, fdsOut, tail, 0, 0), 16);
  assert.ok(tail.every((x) => x === 0xaa));
  assert.equal(native.recvmsg(b.value, head, 0, 16, fdsOut, null as unknown as Uint8Array, 0, 0), 4, 'a null tail is no tail');
});

test('native recvmsg with a tail: bad tail arguments are typed errors, nothing is read', (t) => {
  const [a, b] = socketPairFds();
  t.after(() => {
    a.close();
    b.close();
  });
  native.sendmsg(a.value, pattern(8), null);
  const head = Buffer.alloc(4);
  const fdsOut = new Int32Array(2);
  assert.throws(() => native.recvmsg(b.value, head, 0, 4, fdsOut, Buffer.alloc(8), 9, 0), RangeError);
  assert.throws(() => native.recvmsg(b.value, head, 0, 4, fdsOut, Buffer.alloc(8), 4, 5), RangeError);
  assert.throws(() => native.recvmsg(b.value, head, 0, 4, fdsOut, new Uint16Array(8) as unknown as Uint8Array, 0, 4), TypeError);
  assert.throws(() => native.recvmsg(b.value, head, 0, 4, fdsOut, Buffer.alloc(8), -1, 4));
  const all = Buffer.alloc(16);
  assert.equal(native.recvmsg(b.value, all, 0, 16, fdsOut), 8, 'the bytes are all still there');
});

/** A connected socket pair and an eventfd to send, all closed when the test ends. */
function pairWithEventFd(t: TestContext): { a: UnixSocket; b: UnixSocket; e: EventFd } {
  const [a, b] = socketPair();
  const e = EventFd.create();
  t.after(() => {
    e.close();
    a.destroy();
    b.destroy();
  });
  return { a, b, e };
}

test('UnixSocket: a target read with readTail gives two chunks, the target view then the pool tail; fds with the tail', async (t) => {
  const { a, b, e } = pairWithEventFd(t);
  const target = Buffer.alloc(50);
  let asked = 0;
  b.readTarget = () => (asked++ === 0 ? target : null);
  b.readTail = () => 16;
  const chunks: { bytes: Buffer; isTarget: boolean; fds: Fd[] }[] = [];
  let total = 0;
  b.on('data', (c: Buffer, fds: Fd[]) => {
    chunks.push({ bytes: Buffer.from(c), isTarget: c.buffer === target.buffer && c.byteOffset === target.byteOffset, fds });
    total += c.length;
  });
  const data = pattern(80, 3);
  // Written before b's first read (it starts on the next tick): one recvmsg sees all 80 bytes.
  a.write(data, [e.fd]);
  await until(() => total >= 80);
  assert.equal(chunks[0]!.bytes.length, 50);
  assert.ok(chunks[0]!.isTarget, 'the first chunk is a view of the target');
  assert.deepEqual(chunks[0]!.fds, [], 'fds go with the last byte read: the tail');
  assert.equal(chunks[1]!.bytes.length, 16);
  assert.ok(!chunks[1]!.isTarget);
  assert.equal(chunks[1]!.fds.length, 1);
  assert.deepEqual([...Buffer.concat(chunks.map((c) => c.bytes))], [...data]);
  assert.deepEqual([...target], [...data.subarray(0, 50)]);
  for (const c of chunks) for (const f of c.fds) f.close();
});

test('UnixSocket: a target read whose tail comes back empty is one chunk, with the fds', async (t) => {
  const { a, b, e } = pairWithEventFd(t);
  const target = Buffer.alloc(32);
  b.readTarget = () => target;
  b.readTail = () => 16;
  const chunks: { n: number; fds: Fd[] }[] = [];
  b.on('data', (c: Buffer, fds: Fd[]) => chunks.push({ n: c.length, fds }));
  a.write(pattern(32, 4), [e.fd]);
  await until(() => chunks.length >= 1);
  await new Promise((r) => setImmediate(r));
  assert.equal(chunks.length, 1);
  assert.equal(chunks[0]!.n, 32);
  assert.equal(chunks[0]!.fds.length, 1);
  for (const f of chunks[0]!.fds) f.close();
});

test('UnixSocket: a listener that closes the socket on the target chunk: the tail is not delivered, its fds are closed', async (t) => {
  const before = openFdCount();
  const [a, b] = socketPair();
  const e = EventFd.create();
  t.after(() => {
    a.destroy();
    b.destroy();
  });
  b.readTarget = () => Buffer.alloc(20);
  b.readTail = () => 8;
  const seen: number[] = [];
  b.on('data', (c: Buffer, fds: Fd[]) => {
    seen.push(c.length);
    for (const f of fds) f.close();
    b.destroy();
  });
  a.write(pattern(40, 5), [e.fd]);
  e.close();
  await until(() => b.closed);
  a.destroy();
  assert.deepEqual(seen, [20]);
  await until(() => openFdCount() <= before, 5000, () => `${openFdCount()} fds open, ${before} before`);
});

test('UnixSocket: what a data listener writes during one wake-up is corked until its reads end', async (t) => {
  const [a, b] = socketPair();
  t.after(() => {
    a.destroy();
    b.destroy();
  });
  const queuedInHandler: number[] = [];
  b.on('data', (c: Buffer) => {
    b.write(Buffer.from(c));
    queuedInHandler.push(b.writableLength);
  });
  let got = 0;
  a.on('data', (c: Buffer) => (got += c.length));
  a.write(pattern(64, 6));
  await until(() => got >= 64);
  assert.ok(queuedInHandler.length > 0);
  assert.ok(queuedInHandler[0]! > 0, 'the first reply was queued (corked), not sent from inside the handler');
  assert.equal(b.writableLength, 0, 'sent once the reads were done');
});

test('FrameReader.readTail(): the prefix size while a frame is being received in place, else 0', () => {
  const frames: { prefix: number[]; placed: Uint8Array | undefined }[] = [];
  const target = new Uint8Array(5000 - 12);
  const reader = new FrameReader(
    {
      headerSize: 8,
      frameSize: (h) => h[0]! | (h[1]! << 8) | (h[2]! << 16) | (h[3]! * 2 ** 24),
      maxFrameSize: 1 << 20,
      placePrefix: 12,
      place: () => target,
    },
    {
      frame: (f, _fds, placed) => frames.push({ prefix: [...f], placed }),
      oversized: () => false,
      fatal: (r) => assert.fail(r),
    },
  );
  assert.equal(reader.readTail(), 0, 'nothing being placed');
  const frame = new Uint8Array(5000);
  frame[0] = 5000 & 0xff;
  frame[1] = 5000 >> 8;
  for (let i = 8; i < 5000; i++) frame[i] = i & 0xff;
  reader.push(frame.slice(0, 100));
  assert.equal(reader.readTarget()?.length, 5000 - 100);
  assert.equal(reader.readTail(), 12, 'the next frame’s prefix');
  reader.push(frame.slice(100));
  assert.equal(frames.length, 1);
  assert.equal(reader.readTail(), 0);
  assert.equal(frames[0]!.placed, target);
  assert.deepEqual([...target.subarray(0, 4)], [12, 13, 14, 15]);
});

test('a peer that closes without reading what we sent: the socket closes with ECONNRESET, not a bare poll error', async () => {
  const [a, b] = socketPair();
  b.pause(); // never reads
  const closed = new Promise<Error | undefined>((r) => a.once('close', r));
  a.on('error', () => {}); // reported through 'close' as well
  a.write(Buffer.alloc(64, 1));
  await new Promise((r) => setTimeout(r, 10));
  b.destroy();
  const err = (await closed) as (Error & { code?: string }) | undefined;
  assert.equal(err?.code, 'ECONNRESET', String(err));
});

test('UnixSocket.targetRead: a read into the target is reported as (n, fds), not as a data chunk; the tail still comes as data', async (t) => {
  const { a, b, e } = pairWithEventFd(t);
  const target = new Uint8Array(50);
  let asked = 0;
  b.readTarget = () => (asked++ === 0 ? target : null);
  b.readTail = () => 16;
  const reported: { n: number; fds: Fd[] }[] = [];
  b.targetRead = (n, fds) => reported.push({ n, fds });
  const chunks: { bytes: Buffer; fds: Fd[] }[] = [];
  b.on('data', (c, fds) => chunks.push({ bytes: Buffer.from(c), fds }));
  const data = pattern(80, 5);
  a.write(data, [e.fd]);
  await until(() => chunks.reduce((s, c) => s + c.bytes.length, 0) >= 30);
  assert.deepEqual(reported.map((r) => [r.n, r.fds.length]), [[50, 0]], 'the target read, its fds with the tail');
  assert.deepEqual([...target], [...data.subarray(0, 50)], 'the bytes are in the target');
  assert.equal(chunks[0]!.bytes.length, 16, 'the tail');
  assert.equal(chunks[0]!.fds.length, 1);
  assert.deepEqual([...Buffer.concat(chunks.map((c) => c.bytes))], [...data.subarray(50)]);
  for (const c of chunks) for (const f of c.fds) f.close();
});

test('UnixSocket.targetRead: a short read into the target reports only what came, with the fds when there is no tail', async (t) => {
  const { a, b, e } = pairWithEventFd(t);
  const target = new Uint8Array(64);
  b.readTarget = () => target;
  b.readTail = () => 16;
  const reported: { n: number; fds: Fd[] }[] = [];
  b.targetRead = (n, fds) => reported.push({ n, fds });
  b.on('data', () => assert.fail('nothing goes to the pool'));
  a.write(pattern(20, 6), [e.fd]);
  await until(() => reported.length >= 1);
  await new Promise((r) => setImmediate(r));
  assert.equal(reported.length, 1);
  assert.equal(reported[0]!.n, 20);
  assert.equal(reported[0]!.fds.length, 1);
  assert.deepEqual([...target.subarray(0, 20)], [...pattern(20, 6)]);
  assert.deepEqual([...target.subarray(20)], Array(44).fill(0), 'nothing past what came');
  for (const f of reported[0]!.fds) f.close();
});

test('FrameReader.pushTarget: bytes read into the target complete a placed frame without a copy; after it (16 KiB or more), the next prefix is read alone', () => {
  const frames: { frame: Uint8Array; placed?: Uint8Array }[] = [];
  const target = new Uint8Array(20000 - 12);
  let copies = 0;
  target.set = function (this: Uint8Array, src: ArrayLike<number>, offset?: number) {
    copies++;
    Uint8Array.prototype.set.call(this, src, offset);
  } as Uint8Array['set'];
  const reader = new FrameReader(
    { headerSize: 8, frameSize: (h) => h[0]! | (h[1]! << 8), maxFrameSize: 1 << 20, placePrefix: 12, place: () => target },
    { frame: (frame, fds, placed) => frames.push({ frame, placed }), oversized: () => false, fatal: (r) => assert.fail(r) },
  );
  const frame = new Uint8Array(20000);
  frame[0] = 20000 & 0xff;
  frame[1] = 20000 >> 8;
  for (let i = 8; i < 20000; i++) frame[i] = (i * 3) & 0xff;
  // The prefix alone, as a chunk of its own: it is kept as the frame's prefix (a view, no copy).
  const prefix = frame.slice(0, 12);
  reader.push(prefix);
  assert.equal(reader.retainsLastChunk, true);
  // The socket's part: the target, bytes written into it, then pushTarget(n).
  let at = 12;
  for (const n of [1000, 3000, 15988]) {
    const t = reader.readTarget()!;
    assert.equal(t.length, 20000 - at, 'the rest of the target');
    assert.equal(t.byteOffset, target.byteOffset + (at - 12));
    Uint8Array.prototype.set.call(t, frame.subarray(at, at + n)); // the "socket" (not counted)
    reader.pushTarget(n);
    at += n;
  }
  assert.equal(copies, 0, 'the reader copied nothing into the target');
  assert.equal(frames.length, 1);
  assert.equal(frames[0]!.frame, prefix, 'the prefix chunk itself');
  assert.equal(frames[0]!.placed, target);
  assert.deepEqual([...target], [...frame.subarray(12)]);
  // A placed frame was just received: the next read is the next prefix, into a buffer of its own.
  const next = reader.readTarget()!;
  assert.equal(next.length, 12);
  assert.notEqual(next.buffer, target.buffer);
  assert.equal(reader.readTarget(), next, 'asked again before a read was reported: the same buffer');
  next.set(frame.subarray(0, 5)); // a short read of it
  reader.pushTarget(5);
  assert.equal(reader.buffered, 5);
  assert.equal(reader.readTarget()?.length, 7, 'the rest of that prefix');
});

test('FrameReader.pushTarget: misuse throws and closes the fds; with fds it is a plain push', () => {
  const frames: { frame: Uint8Array; fds: Fd[]; placed?: Uint8Array }[] = [];
  const target = new Uint8Array(5000 - 8);
  const reader = new FrameReader(
    { headerSize: 8, frameSize: (h) => h[0]! | (h[1]! << 8), maxFrameSize: 1 << 20, place: () => target },
    { frame: (frame, fds, placed) => frames.push({ frame, fds, placed }), oversized: () => false, fatal: (r) => assert.fail(r) },
  );
  const e = EventFd.create();
  const dup = e.fd.dup();
  try {
    assert.throws(() => reader.pushTarget(1, [dup]), RangeError, 'no readTarget() before');
    assert.equal(dup.closed, true, 'the fds of a refused pushTarget are closed');
    const frame = new Uint8Array(5000);
    frame[0] = 5000 & 0xff;
    frame[1] = 5000 >> 8;
    reader.push(frame.slice(0, 8));
    const t = reader.readTarget()!;
    assert.throws(() => reader.pushTarget(t.length + 1), RangeError, 'more than the target holds');
    const t1 = reader.readTarget()!;
    t1.set(frame.subarray(8, 108));
    reader.push(t1.subarray(0, 100)); // bytes reported another way in between...
    assert.throws(() => reader.pushTarget(10), RangeError, '...leave no target for pushTarget to report into');
    const t2 = reader.readTarget()!;
    assert.equal(t2.length, 5000 - 108);
    t2.set(frame.subarray(108));
    const d2 = e.fd.dup();
    reader.pushTarget(t2.length, [d2]);
    assert.equal(frames.length, 1);
    assert.equal(frames[0]!.placed, target);
    assert.equal(frames[0]!.fds.length, 1, 'the fds came with the frame');
    for (const f of frames[0]!.fds) f.close();
  } finally {
    e.close();
  }
});
