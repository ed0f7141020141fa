/**
 * Shared writes: UnixSocket.write(..., shared = true) sends buffers of
 * SPLICE_MIN bytes or more by vmsplice + splice through a pipe (the socket
 * refers to that memory until the peer reads it) instead of copying them;
 * everything else in the stream keeps its order around them. And the native
 * pipeSend under it: which parts are referenced and which copied, a full
 * socket, bad arguments.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { socketPair, socketPairFds, SharedMemory, EventFd, type Fd, type UnixSocket, nativeAddon as native } from '../src/sys/index.js';
import { SPLICE_MIN } from '../src/sys/socket.js';
import { closed, countSplices, openFdCount, receive, until } from './helpers/sys.js';

const KiB = 1024;
const MiB = 1024 * 1024;

/** n bytes of a fixed pattern (not produced by the code under test). */
function pattern(n: number, seed = 0): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = (i * 7 + seed * 13 + 1) & 0xff;
  return b;
}

/** Reads exactly n bytes from a non-blocking fd, polling (the writer is this thread's native call). */
function readAll(fd: Fd, n: number): Buffer {
  const out = Buffer.alloc(n);
  const fdsOut = new Int32Array(2);
  let got = 0;
  while (got < n) {
    const r = native.recvmsg(fd.value, out, got, n - got, fdsOut);
    if (r === 0) throw new Error(`end of stream after ${got} of ${n} bytes`);
    if (r > 0) got += r;
  }
  return out;
}

function pipeFor(t: TestContext): [number, number] {
  const p = native.pipe(MiB);
  t.after(() => {
    native.close(p[0]);
    native.close(p[1]);
  });
  return p;
}

test('native pipeSend: referenced parts are read as they are when the peer reads; copied parts as they were', (t) => {
  const [a, b] = socketPairFds();
  const [pr, pw] = pipeFor(t);
  const mem = SharedMemory.create(64 * KiB);
  t.after(() => {
    a.close();
    b.close();
    mem.close();
  });
  mem.bytes.set(pattern(64 * KiB, 1));
  const copied = pattern(64 * KiB, 2);
  const head = Buffer.from('HEAD');
  const state = new Float64Array(2);
  const refs = new Uint8Array([0, 1, 0]);
  const n = native.pipeSend(a.value, pr, pw, [head, mem.bytes, copied], refs, state);
  assert.equal(n, 4 + 128 * KiB);
  assert.equal(state[0], 0, 'all of it reached the socket');
  // Changed after the call, before the peer reads.
  mem.bytes.fill(0x5a);
  copied.fill(0xa5);
  const got = readAll(b, 4 + 128 * KiB);
  assert.equal(got.subarray(0, 4).toString(), 'HEAD');
  assert.ok(got.subarray(4, 4 + 64 * KiB).every((x) => x === 0x5a), 'the referenced part is read from the memory now');
  assert.deepEqual(got.subarray(4 + 64 * KiB), pattern(64 * KiB, 2), 'the copied part is what it was');
});

test('native pipeSend: a full socket leaves bytes in the pipe; a call without parts moves them on, in order', (t) => {
  const [a, b] = socketPairFds();
  const [pr, pw] = pipeFor(t);
  t.after(() => {
    a.close();
    b.close();
  });
  const total = 8 * MiB; // more than socket buffer and pipe together
  const data = pattern(total, 3);
  const parts: Buffer[] = [];
  for (let at = 0; at < total; at += 256 * KiB) parts.push(data.subarray(at, at + 256 * KiB));
  const refs = new Uint8Array(parts.length).fill(1);
  const state = new Float64Array(2);
  const out = Buffer.alloc(total);
  const fdsOut = new Int32Array(2);
  let sent = 0;
  let got = 0;
  let stalls = 0;
  while (got < total) {
    if (sent < total || state[0]! > 0) {
      // The parts not yet taken (none once all went into the pipe).
      const rest: Buffer[] = [];
      let skip = sent;
      for (const p of parts) {
        if (skip >= p.length) {
          skip -= p.length;
          continue;
        }
        rest.push(p.subarray(skip));
        skip = 0;
      }
      const n = native.pipeSend(a.value, pr, pw, rest, refs, state);
      sent += n;
      if (sent < total || state[0]! > 0) stalls++;
    }
    const r = native.recvmsg(b.value, out, got, Math.min(total - got, 512 * KiB), fdsOut);
    if (r > 0) got += r;
  }
  assert.ok(stalls > 0, 'the socket filled up at least once');
  assert.equal(state[0], 0);
  assert.ok(out.equals(data), 'the bytes arrived in order');
});

test('native pipeSend: bad arguments are typed errors', (t) => {
  const [a, b] = socketPairFds();
  const [pr, pw] = pipeFor(t);
  t.after(() => {
    a.close();
    b.close();
  });
  const state = new Float64Array(2);
  const one = [Buffer.alloc(1)];
  assert.throws(() => native.pipeSend(a.value, pr, pw, one, new Uint8Array(0), state), RangeError);
  assert.throws(() => native.pipeSend(a.value, pr, pw, one, new Uint8Array(1), new Float64Array(1)), TypeError);
  assert.throws(() => native.pipeSend(a.value, pr, pw, one, new Uint8Array(1), new Int32Array(2) as unknown as Float64Array), TypeError);
  assert.throws(() => native.pipeSend(a.value, pr, pw, one, new Uint8Array(1), Float64Array.of(-1, 0)), RangeError);
  assert.throws(() => native.pipeSend(a.value, pr, pw, new Array(65).fill(Buffer.alloc(1)), new Uint8Array(65), state), RangeError);
  assert.throws(() => native.pipeSend(a.value, pr, pw, [new Uint16Array(2) as unknown as Uint8Array], new Uint8Array(1), state), TypeError);
  assert.throws(() => native.pipeSend(a.value, pr, pw, 'x' as unknown as Uint8Array[], new Uint8Array(1), state), TypeError);
  assert.throws(() => native.pipeSend(-1, pr, pw, one, new Uint8Array(1), state), { code: 'EBADF' });
  // The write end given as the read end: splice fails with an errno, nothing crashes.
  assert.throws(() => native.pipeSend(a.value, pw, pw, one, new Uint8Array(1), state), (e: Error & { code?: string }) => typeof e.code === 'string');
});

/** Collects a socket's stream, with the fds and where they came. */
function collect(sock: UnixSocket, total: number): Promise<{ bytes: Buffer; fds: { fd: Fd; at: number }[] }> {
  return receive(sock, total, 20_000);
}

test('shared writes keep their place in the stream among copied writes and writes with fds, through a full socket', async (t) => {
  const [a, b] = socketPair();
  const mem = SharedMemory.create(4 * MiB);
  const efd = EventFd.create();
  t.after(() => {
    a.destroy();
    b.destroy();
    mem.close();
    efd.close();
  });
  mem.bytes.set(pattern(4 * MiB, 4));
  const expected: Buffer[] = [];
  const put = (bufs: Uint8Array[], opts: { fds?: Fd[]; shared?: boolean } = {}): void => {
    a.write(bufs, opts.fds ?? null, false, opts.shared ?? false);
    for (const x of bufs) expected.push(Buffer.from(x));
  };
  // Messages shaped like DMA_WRITE: a small head, then a view of shared memory.
  let fdAt = -1;
  let offset = 0;
  for (let i = 0; i < 64; i++) {
    const head = Buffer.alloc(32, i);
    const view = mem.bytes.subarray(i * 64 * KiB, (i + 1) * 64 * KiB);
    put([head, view], { shared: true });
    offset += 32 + 64 * KiB;
    if (i === 20) {
      put([Buffer.from('with an fd')], { fds: [efd.fd] });
      offset += 10;
      fdAt = offset - 1;
    }
    if (i === 40) {
      put([pattern(100 * KiB, 5)]); // a large unshared write: copied
      offset += 100 * KiB;
    }
  }
  const want = Buffer.concat(expected);
  const got = await collect(b, want.length);
  assert.ok(got.bytes.equals(want), 'every byte in order');
  assert.equal(got.fds.length, 1);
  assert.equal(got.fds[0]!.at, fdAt, 'the fd came with its own write');
  for (const f of got.fds) f.fd.close();
  assert.equal(a.writableLength, 0);
});

test('shared write: buffers below SPLICE_MIN are copied, larger ones referenced', async (t) => {
  const [a, b] = socketPair();
  const mem = SharedMemory.create(2 * SPLICE_MIN);
  t.after(() => {
    a.destroy();
    b.destroy();
    mem.close();
  });
  b.pause(); // nothing is read until the memory has changed
  mem.bytes.fill(1);
  const small = mem.bytes.subarray(0, SPLICE_MIN - 1);
  const large = mem.bytes.subarray(SPLICE_MIN);
  a.write([small, large], null, false, true);
  mem.bytes.fill(2);
  const p = collect(b, small.length + large.length);
  b.resume();
  const got = await p;
  assert.ok(got.bytes.subarray(0, small.length).every((x) => x === 1), 'the small buffer was copied when written');
  assert.ok(got.bytes.subarray(small.length).every((x) => x === 2), 'the large one is read from the memory');
});

test('end() sends what is still in the splice pipe before closing', async (t) => {
  const [a, b] = socketPair();
  const mem = SharedMemory.create(6 * MiB); // beyond socket buffer + pipe: some waits in the pipe or the queue
  const data = pattern(6 * MiB, 6);
  mem.bytes.set(data);
  t.after(() => {
    b.destroy();
    mem.close();
  });
  b.pause();
  a.write([mem.bytes], null, false, true);
  a.end(10_000);
  const p = collect(b, data.length);
  const ended = new Promise<void>((resolve) => b.once('end', resolve));
  b.resume();
  const got = await p;
  assert.ok(got.bytes.equals(data));
  await ended;
  await until(() => a.closed);
});

test('a peer that closes while shared data waits: the socket closes with an error, nothing thrown, no fd left open', async (t) => {
  const before = openFdCount();
  const [a, b] = socketPair();
  const mem = SharedMemory.create(8 * MiB);
  t.after(() => mem.close());
  const errors: Error[] = [];
  a.on('error', (e) => errors.push(e));
  b.pause();
  for (let i = 0; i < 8; i++) a.write([Buffer.alloc(32), mem.bytes.subarray(i * MiB, (i + 1) * MiB)], null, false, true);
  assert.ok(a.writableLength > 0, 'some of it could not be sent yet');
  const done = closed(a);
  b.destroy();
  const err = await done;
  assert.ok(err, 'closed with an error');
  assert.match((err as Error & { code?: string }).code ?? '', /^(EPIPE|ECONNRESET)$/);
  assert.equal(errors.length, 1);
  mem.close();
  await until(() => openFdCount() <= before, 2000, () => `${openFdCount()} fds open, ${before} before`);
});

test('copyQueued() turns a queued shared write into a copied one (its heap copy is never spliced)', async (t) => {
  const [a, b] = socketPair();
  const mem = SharedMemory.create(64 * KiB);
  const spliced = countSplices(t);
  t.after(() => {
    a.destroy();
    b.destroy();
    mem.close();
  });
  mem.bytes.fill(7);
  a.cork();
  a.write([Buffer.alloc(32, 1), mem.bytes], null, false, true);
  a.copyQueued();
  mem.bytes.fill(8);
  const p = collect(b, 32 + 64 * KiB);
  a.uncork();
  const got = await p;
  assert.equal(spliced.n, 0, 'sent by sendmsg');
  assert.ok(got.bytes.subarray(32).every((x) => x === 7), 'the bytes as they were at copyQueued()');
  // Without copyQueued() the same write is spliced.
  a.write([Buffer.alloc(32, 1), mem.bytes], null, false, true);
  const again = await collect(b, 32 + 64 * KiB);
  assert.ok(spliced.n > 0);
  assert.ok(again.bytes.subarray(32).every((x) => x === 8));
});

test('shared memory the kernel cannot read (a memfd truncated under its mapping): EFAULT closes the socket; nothing is sent twice', async (t) => {
  const [a, b] = socketPair();
  const mem = SharedMemory.create(128 * KiB);
  t.after(() => {
    b.destroy();
    mem.close();
  });
  native.ftruncate(mem.fd.value, 0); // the peer shrank the file it shared: its pages are gone
  let got = Buffer.alloc(0);
  b.on('data', (c) => (got = Buffer.concat([got, c])));
  a.on('error', () => {});
  const done = closed(a);
  a.write([Buffer.from('HEAD'), mem.bytes.subarray(0, 64 * KiB)], null, false, true);
  // More flushes in the same tick (another reply's batch): they must not send the head again.
  a.cork();
  a.uncork();
  a.write([Buffer.from('NEXT')]);
  const err = await done;
  assert.equal((err as Error & { code?: string }).code, 'EFAULT');
  await until(() => b.closed, 2000);
  assert.ok(!got.toString().includes('HEADHEAD'), `the peer got ${JSON.stringify(got.toString())}`);
  assert.ok(got.length <= 4);
});

test('no pipe to be had (EMFILE): shared writes are copied and the connection goes on', async (t) => {
  const [a, b] = socketPair();
  const mem = SharedMemory.create(256 * KiB);
  mem.bytes.set(pattern(256 * KiB, 9));
  const pipe = native.pipe;
  let asked = 0;
  native.pipe = () => {
    asked++;
    throw Object.assign(new Error('EMFILE: too many open files'), { code: 'EMFILE' });
  };
  const splices = countSplices(t);
  t.after(() => {
    native.pipe = pipe;
    a.destroy();
    b.destroy();
    mem.close();
  });
  const p = collect(b, 2 * (32 + 256 * KiB));
  for (let i = 0; i < 2; i++) a.write([Buffer.alloc(32, i), mem.bytes], null, false, true);
  const got = await p;
  assert.equal(asked, 1, 'asked once, not again at once');
  assert.equal(splices.n, 0);
  assert.ok(got.bytes.subarray(32, 32 + 256 * KiB).equals(pattern(256 * KiB, 9)));
  assert.ok(!a.closed);
});

test('an fd that came blocking (a twin socket from the peer) is non-blocking once a UnixSocket has it (uv_poll_init): splice() must never wait', async (t) => {
  const [fa, fb] = socketPairFds();
  native.setNonBlock(fa.value, false);
  const O_NONBLOCK = 0o4000;
  const flags = (): number => parseInt(/^flags:\s+([0-7]+)/m.exec(fs.readFileSync(`/proc/self/fdinfo/${fa.value}`, 'utf8'))![1]!, 8);
  assert.equal(flags() & O_NONBLOCK, 0, 'blocking before');
  const { UnixSocket } = await import('../src/sys/socket.js');
  const a = new UnixSocket(fa);
  const mem = SharedMemory.create(8 * MiB);
  t.after(() => {
    a.destroy();
    fb.close();
    mem.close();
  });
  assert.equal(flags() & O_NONBLOCK, O_NONBLOCK, 'non-blocking once a UnixSocket has it');
  a.write([mem.bytes], null, false, true);
  assert.ok(a.writableLength > 0, 'the rest waits in the queue');
});

test('a shared write to a peer that has gone: EPIPE, and no SIGPIPE reaches the process', async (t) => {
  let sigpipes = 0;
  const onSigpipe = (): void => {
    sigpipes++;
  };
  process.on('SIGPIPE', onSigpipe); // a listener: the signal is no longer ignored
  const [a, b] = socketPair();
  const mem = SharedMemory.create(MiB);
  t.after(() => {
    process.off('SIGPIPE', onSigpipe);
    mem.close();
  });
  a.on('error', () => {});
  b.destroy();
  const done = closed(a);
  a.write([Buffer.alloc(32), mem.bytes], null, false, true);
  const err = await done;
  assert.match((err as Error & { code?: string }).code ?? '', /^(EPIPE|ECONNRESET)$/);
  await new Promise((r) => setTimeout(r, 50));
  assert.equal(sigpipes, 0);
});

test('shared is ignored for owned buffers (our own heap, freed once sent)', async (t) => {
  const [a, b] = socketPair();
  const splices = countSplices(t);
  t.after(() => {
    a.destroy();
    b.destroy();
  });
  const data = pattern(64 * KiB, 10);
  const p = collect(b, data.length);
  a.write([data], null, true, true);
  assert.ok((await p).bytes.equals(data));
  assert.equal(splices.n, 0);
});
