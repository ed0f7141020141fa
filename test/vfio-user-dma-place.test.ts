/**
 * Message DMA received in place, end to end (our server and client, real
 * sockets, real shared memory): ctx.dma.readInto / read / write through
 * windows the server reaches only by DMA_READ / DMA_WRITE messages, chunked
 * by the negotiated max_data_xfer_size with several requests in flight; the
 * sample device's copy between message and fd windows; failures mid-transfer;
 * the client receiving a large DMA_WRITE straight into its window; a reply
 * that arrives after its request timed out.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { VfioUserServer } from '../src/vfio-user/server.js';
import { VfioUserClient } from '../src/vfio-user/client.js';
import { VfioUserDevice } from '../src/vfio-user/client-device.js';
import { Connection, ConnectionError, type ReplySink } from '../src/vfio-user/connection.js';
import { Command } from '../src/vfio-user/constants.js';
import { codecLimits } from '../src/vfio-user/messages.js';
import { sampleDevice, SampleReg, SampleStatus, type SampleDevice } from '../src/devices/sample.js';
import { SharedMemory, EventFd, socketPair } from '../src/sys/index.js';
import { RawVfioUserClient, Bytes } from '../src/testing/index.js';
import type { DeviceContext, VfioUserDeviceSpec } from '../src/vfio-user/device.js';
import { countSplices, openFdCount, openFdsBackTo, tick } from './helpers/sys.js';

const KiB = 1024;
const MiB = 1024 * 1024;
const ENOENT = 2;
const EACCES = 13;
const READ = 1;
const RW = 3;
const sock = (name: string): string => path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'vfu-place-')), name);

// --- helpers ---

/** A deterministic pseudo-random pattern (xorshift32). */
function pattern(bytes: Uint8Array, seed: number): Uint8Array {
  let x = seed >>> 0 || 1;
  for (let i = 0; i < bytes.length; i++) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    bytes[i] = x & 0xff;
  }
  return bytes;
}

const buf = (u: Uint8Array): Buffer => Buffer.from(u.buffer, u.byteOffset, u.length);

/** Byte-for-byte equality, reporting the first difference (not a 3 MiB diff). */
function same(actual: Uint8Array, expected: Uint8Array, what: string): void {
  assert.equal(actual.length, expected.length, `${what}: length`);
  if (buf(actual).equals(buf(expected))) return;
  let i = 0;
  while (actual[i] === expected[i]) i++;
  assert.fail(`${what}: first difference at byte ${i} of ${actual.length}: ${actual[i]} != ${expected[i]}`);
}

const u64 = (v: number): Buffer => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt(v));
  return b;
};
const u32 = (v: number): Buffer => {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(v >>> 0);
  return b;
};

/** A device whose BAR0 write at offset 0 starts ctx.dma.readInto(job.iova, job.dest). */
interface ProbeDevice extends VfioUserDeviceSpec {
  ctx(): DeviceContext;
  job: { iova: number; dest: Uint8Array } | null;
  started: Promise<void> | null;
}

function probeDevice(): ProbeDevice {
  let ctx: DeviceContext | null = null;
  const dev: ProbeDevice = {
    ctx: () => ctx!,
    job: null,
    started: null,
    pci: { vendorId: 0x1af4, deviceId: 0x10f1, classCode: 0xff0000 },
    regions: {
      0: {
        size: 4096,
        read: (_o, out) => out.fill(0),
        write: (offset) => {
          if (offset !== 0 || !dev.job || !ctx) return;
          const p = ctx.dma.readInto(dev.job.iova, dev.job.dest);
          p.catch(() => {}); // awaited by the test
          dev.started = p;
        },
      },
    },
    irqs: { msix: 1 },
    attach: (c) => (ctx = c),
  };
  return dev;
}

interface Env {
  server: VfioUserServer;
  client: VfioUserClient;
  dev: VfioUserDevice;
  /** The server's one connection. */
  conn(): Connection;
  /** Closes everything (also done after the test). */
  close(): void;
}

interface SetupOptions {
  /** max_data_xfer_size of both ends. */
  xfer?: number;
  twinSocket?: boolean;
  /** Server's DMA request timeout. */
  timeoutMs?: number;
  /** The server's trace lines. */
  trace?: (line: string) => void;
}

async function setup(t: TestContext, device: VfioUserDeviceSpec, o: SetupOptions = {}): Promise<Env> {
  const server = VfioUserServer.listen(sock('s.sock'), { device, maxDataXferSize: o.xfer, timeoutMs: o.timeoutMs, trace: o.trace });
  const client = await VfioUserClient.connect(server.path, { maxDataXferSize: o.xfer, twinSocket: o.twinSocket });
  const dev = new VfioUserDevice(client);
  const close = (): void => {
    dev.close();
    client.close();
    server.close();
  };
  t.after(close);
  const conn = (): Connection => {
    const s = [...server.sessions];
    assert.equal(s.length, 1);
    return s[0]!.conn;
  };
  return { server, client, dev, conn, close };
}

/** A memfd closed after the test. */
function memory(t: TestContext, size: number): SharedMemory {
  const m = SharedMemory.create(size);
  t.after(() => m.close());
  return m;
}

interface RequestStats {
  /** Requests of the watched command sent. */
  sent: number;
  inFlight: number;
  maxInFlight: number;
  /** Replies whose data is the `into` buffer itself: received in place. */
  placed: number;
  failed: number;
}

/**
 * Counts the requests a connection sends (what the session's DMA does), wrapping its request()
 * (single messages) and requestRaw() (chunked transfers, replies through a ReplySink).
 */
function spyRequests(conn: Connection, command: Command): RequestStats {
  const stats: RequestStats = { sent: 0, inFlight: 0, maxInFlight: 0, placed: 0, failed: 0 };
  const started = (): void => {
    stats.sent++;
    stats.inFlight++;
    stats.maxInFlight = Math.max(stats.maxInFlight, stats.inFlight);
  };
  type Req = (c: number, body: unknown, options?: { into?: Uint8Array }) => Promise<{ body: { data?: Uint8Array } | null }>;
  const orig = conn.request.bind(conn) as unknown as Req;
  const spy: Req = (c, body, options = {}) => {
    if (c !== command) return orig(c, body, options);
    started();
    return orig(c, body, options).then(
      (r) => {
        stats.inFlight--;
        if (options.into && r.body?.data === options.into) stats.placed++;
        return r;
      },
      (err: unknown) => {
        stats.inFlight--;
        stats.failed++;
        throw err;
      },
    );
  };
  (conn as unknown as { request: Req }).request = spy;
  const origRaw = conn.requestRaw.bind(conn);
  conn.requestRaw = (c, head, data, into, sink, cookie) => {
    if (c !== command) return origRaw(c, head, data, into, sink, cookie);
    started();
    const counting: ReplySink = {
      reply(frame, placed, k) {
        stats.inFlight--;
        if (into && placed === into) stats.placed++;
        sink.reply(frame, placed, k);
      },
      fail(err, k) {
        stats.inFlight--;
        stats.failed++;
        sink.fail(err, k);
      },
    };
    origRaw(c, head, data, into, counting, cookie);
  };
  return stats;
}

/** Bytes a socket read straight into `memory` (its chunks are views of that memory). */
function placedInto(client: VfioUserClient, memory: SharedMemory): { bytes: number } {
  const count = { bytes: 0 };
  const target = memory.buffer;
  // The socket reports reads into a target through targetRead (not 'data'): count those into `memory`.
  const socket = client.conn.socket;
  const readTarget = socket.readTarget!;
  const targetRead = socket.targetRead!;
  let last: Uint8Array | null = null;
  socket.readTarget = () => (last = readTarget());
  socket.targetRead = (n, fds) => {
    if (last?.buffer === target) count.bytes += n;
    targetRead(n, fds);
  };
  socket.on('data', (chunk) => {
    if (chunk.buffer === target) count.bytes += chunk.length;
  });
  return count;
}

/** The rejection of `p`, or a failure if it resolves. */
async function rejection(p: Promise<unknown>): Promise<Error & { errno?: number; code?: string }> {
  try {
    await p;
  } catch (err) {
    return err as Error & { errno?: number; code?: string };
  }
  assert.fail('expected a rejection');
}

/** The first of `ps` to resolve, or 'none' after `ms` (the timer does not outlive the call). */
async function settled(ps: Promise<string>[], ms: number): Promise<string> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([...ps, new Promise<string>((r) => (timer = setTimeout(() => r('none'), ms)))]);
  } finally {
    clearTimeout(timer);
  }
}

// --- 1. readInto ---

for (const twinSocket of [false, true]) {
  test(`readInto of 3 MiB + 123 bytes from a message window, 64 KiB transfers${twinSocket ? ', over a twin socket' : ''}: every reply received in place, many in flight`, async (t) => {
    const device = probeDevice();
    const env = await setup(t, device, { xfer: 64 * KiB, twinSocket });
    const stats = twinSocket ? null : spyRequests(env.conn(), Command.DMA_READ);
    const guest = memory(t, 4 * MiB);
    pattern(guest.bytes, 1);
    const iova = 0x4000_0000;
    await env.client.dmaMap({ iova, size: 4 * MiB, memory: guest, passFd: false });
    const at = 0x1235;
    const len = 3 * MiB + 123;
    const dest = new Uint8Array(len);
    device.job = { iova: iova + at, dest };
    await env.dev.write(0, 0, u32(1)); // the device starts readInto from its register write
    assert.ok(device.started, 'the register write started the transfer');
    const t0 = performance.now();
    await device.started;
    t.diagnostic(`readInto ${len} bytes: ${(performance.now() - t0).toFixed(1)} ms`);
    same(dest, guest.bytes.subarray(at, at + len), 'dest');
    if (stats) {
      assert.equal(stats.sent, Math.ceil(len / (64 * KiB)), 'one DMA_READ per 64 KiB');
      assert.ok(stats.maxInFlight > 1, `several DMA_READs in flight (max ${stats.maxInFlight})`);
      assert.ok(stats.maxInFlight <= 32, `at most 32 in flight (max ${stats.maxInFlight})`);
      // 48 replies of 64 KiB are placed; the last, 123 bytes, is under the 4 KiB threshold and copied.
      assert.equal(stats.placed, 48, 'large replies are received into dest');
      assert.equal(stats.failed, 0);
      assert.equal(env.conn().pendingCount, 0);
    }
    // The same bytes by read() (a buffer of the library's).
    same(await device.ctx().dma.read(iova + at, len), dest, 'read()');
  });
}

test('readInto and read across adjacent windows: message, fd-mapped, message', async (t) => {
  const device = probeDevice();
  const env = await setup(t, device, { xfer: 64 * KiB });
  const stats = spyRequests(env.conn(), Command.DMA_READ);
  const aMem = memory(t, MiB);
  const a = pattern(aMem.bytes, 11);
  const bMem = memory(t, MiB);
  const b = pattern(bMem.bytes, 12);
  const cMem = memory(t, 2 * MiB);
  const c = pattern(cMem.bytes, 13);
  const base = 0x8000_0000;
  await env.client.dmaMap({ iova: base, size: MiB, memory: aMem, passFd: false });
  await env.client.dmaMap({ iova: base + MiB, size: MiB, memory: bMem }); // by fd
  await env.client.dmaMap({ iova: base + 2 * MiB, size: MiB, memory: cMem, offset: MiB, passFd: false });
  const ctx = device.ctx();
  assert.deepEqual(ctx.dma.windows().map((w) => w.mapped), [false, true, false]);
  const start = 0x80000 + 7;
  const len = 2 * MiB + 0x40000; // ends at base + 2 MiB + 0x40007, inside the third window
  const expected = Buffer.concat([buf(a.subarray(start)), buf(b), buf(c.subarray(MiB, MiB + len - (MiB - start) - MiB))]);
  assert.equal(expected.length, len);
  const dest = new Uint8Array(len);
  await ctx.dma.readInto(base + start, dest);
  same(dest, expected, 'readInto across three windows');
  // Only the message parts went by DMA_READ: ceil((1 MiB - start) / 64 KiB) + 0x40007 / 64 KiB rounded up.
  assert.equal(stats.sent, Math.ceil((MiB - start) / (64 * KiB)) + Math.ceil((len - (MiB - start) - MiB) / (64 * KiB)));
  same(await ctx.dma.read(base + start, len), expected, 'read across three windows');
  // Into a view of the fd-mapped window: a copy from the message windows into it.
  const view = ctx.dma.view(base + MiB, 0x30000, { write: true })!;
  await ctx.dma.readInto(base + 2 * MiB + 0x1000, view);
  same(bMem.bytes.subarray(0, 0x30000), c.subarray(MiB + 0x1000, MiB + 0x31000), 'readInto a view of the fd window');
});

// --- 2. read and write of multi-chunk ranges ---

test('write then read of 1 MiB + 999 bytes through a message window, 64 KiB transfers: exact bytes, nothing outside touched', async (t) => {
  const device = probeDevice();
  const env = await setup(t, device, { xfer: 64 * KiB });
  const writes = spyRequests(env.conn(), Command.DMA_WRITE);
  const guest = memory(t, 2 * MiB);
  pattern(guest.bytes, 21);
  const before = guest.bytes.slice();
  const placed = placedInto(env.client, guest);
  const iova = 0x1_0000_0000;
  await env.client.dmaMap({ iova, size: 2 * MiB, memory: guest, passFd: false });
  const ctx = device.ctx();
  const off = 0x3001;
  const len = MiB + 999;
  const data = pattern(new Uint8Array(len), 22);
  await ctx.dma.write(iova + off, data);
  same(guest.bytes.subarray(off, off + len), data, 'written range');
  same(guest.bytes.subarray(0, off), before.subarray(0, off), 'bytes before the range');
  same(guest.bytes.subarray(off + len), before.subarray(off + len), 'bytes after the range');
  assert.equal(writes.sent, Math.ceil(len / (64 * KiB)));
  assert.ok(writes.maxInFlight > 1, `several DMA_WRITEs in flight (max ${writes.maxInFlight})`);
  assert.equal(writes.failed, 0);
  // 64 KiB messages mostly arrive whole in the socket's pooled reads (then copied); only a message
  // still arriving when its header is read is received into the window by the socket itself.
  t.diagnostic(`bytes the client's socket read straight into its window: ${placed.bytes} of ${len}`);
  const reads = spyRequests(env.conn(), Command.DMA_READ);
  same(await ctx.dma.read(iova + off, len), data, 'read back');
  assert.equal(reads.sent, Math.ceil(len / (64 * KiB)));
  assert.ok(reads.maxInFlight > 1);
  // A small read is one message.
  same(await ctx.dma.read(iova + off + 5, 100), data.subarray(5, 105), 'small read');
});

// --- 3. the sample device's copy ---

/** Programs a sample copy, starts it and waits for MSI-X vector 0 (done) or the ERR interrupt. */
async function sampleCopy(dev: VfioUserDevice, src: number, dst: number, len: number, done: EventFd, err: EventFd): Promise<'done' | 'error'> {
  await dev.write(0, SampleReg.DMA_SRC, u64(src));
  await dev.write(0, SampleReg.DMA_DST, u64(dst));
  await dev.write(0, SampleReg.DMA_LEN, u32(len));
  await dev.write(0, SampleReg.DMA_CMD, u32(1));
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([
      done.wait().then(() => 'done' as const),
      err.wait().then(() => 'error' as const),
      new Promise<never>((_r, reject) => (timer = setTimeout(() => reject(new Error('no completion interrupt in 8 s')), 8000))),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

async function sampleEnv(t: TestContext, o: SetupOptions): Promise<Env & { sample: SampleDevice; done: EventFd; err: EventFd }> {
  const sample = sampleDevice();
  const env = await setup(t, sample, o);
  const done = EventFd.create();
  const err = EventFd.create();
  t.after(() => {
    done.close();
    err.close();
    sample.dispose();
  });
  await env.dev.setEventFds(2, 0, [done]); // MSI-X vector 0
  await env.dev.setEventFds(3, 0, [err]); // ERR
  return { ...env, sample, done, err };
}

for (const xfer of [64 * KiB, MiB]) {
  test(`sample copy between a message window and an fd window, both ways and message to message, ${xfer / KiB} KiB transfers`, async (t) => {
    const env = await sampleEnv(t, { xfer });
    const F = 0x1000_0000;
    const M = 0x2000_0000;
    const fdMem = memory(t, 4 * MiB);
    const msgMem = memory(t, 8 * MiB);
    await env.client.dmaMap({ iova: F, size: 4 * MiB, memory: fdMem });
    await env.client.dmaMap({ iova: M, size: 8 * MiB, memory: msgMem, passFd: false });
    assert.deepEqual(env.sample.windows.map((w) => w.mapped), [true, false]);
    const len = 3 * MiB + 4567; // not a multiple of 64 KiB nor of 1 MiB
    const cases: [string, SharedMemory, number, number, SharedMemory, number, number, boolean][] = [
      // name, source memory, its offset, its iova base, destination memory, offset, iova base,
      // whether DMA_WRITE data is spliced (only data in a window the client shared by fd is)
      ['message -> fd (readInto a view)', msgMem, 0x333, M, fdMem, 0x1001, F, false],
      ['fd -> message (write of a view)', fdMem, 0x777, F, msgMem, 0x2003, M, true],
      ['message -> message (read + write, 1 MiB steps)', msgMem, 0x10, M, msgMem, 4 * MiB + 5, M, false],
    ];
    const spliced = countSplices(t); // the server's spliced sends
    let seed = 100;
    for (const [name, sm, so, sb, dm, doff, db, splice] of cases) {
      spliced.n = 0;
      pattern(sm.bytes.subarray(so, so + len), seed++);
      dm.bytes.fill(0x5a, Math.max(0, doff - 0x1000), Math.min(dm.size, doff + len + 0x1000));
      const src = sm.bytes.slice(so, so + len);
      const before = dm.bytes.slice();
      const t0 = performance.now();
      const how = await sampleCopy(env.dev, sb + so, db + doff, len, env.done, env.err);
      t.diagnostic(`${name}: ${(performance.now() - t0).toFixed(1)} ms`);
      assert.equal(how, 'done', `${name}: completion (errno ${env.sample.registers.dmaErrno})`);
      assert.equal(env.sample.registers.dmaStatus & (SampleStatus.DONE | SampleStatus.ERROR | SampleStatus.BUSY), SampleStatus.DONE);
      same(dm.bytes.subarray(doff, doff + len), src, `${name}: destination`);
      same(dm.bytes.subarray(0, doff), before.subarray(0, doff), `${name}: before the destination`);
      same(dm.bytes.subarray(doff + len), before.subarray(doff + len), `${name}: past the end of the destination`);
      assert.equal(spliced.n > 0, splice, `${name}: ${spliced.n} spliced sends`);
      await env.dev.write(0, SampleReg.DMA_STATUS, u32(SampleStatus.DONE));
    }
    assert.equal(env.sample.registers.dmaCount, cases.length);
    assert.equal(env.conn().pendingCount, 0);
  });
}

// --- 4. failures mid-transfer ---

test('the client unmaps a message window during a long readInto: rejects with ENOENT once in-flight chunks settled; the server goes on; no fd leaks', async (t) => {
  const fdsBefore = openFdCount();
  const device = probeDevice();
  const env = await setup(t, device, { xfer: 64 * KiB });
  const stats = spyRequests(env.conn(), Command.DMA_READ);
  const guest = SharedMemory.create(4 * MiB);
  pattern(guest.bytes, 31);
  const iova = 0x4000_0000;
  await env.client.dmaMap({ iova, size: 4 * MiB, memory: guest, passFd: false });
  const ctx = device.ctx();
  const dest = new Uint8Array(3 * MiB);
  const p = ctx.dma.readInto(iova, dest); // 48 chunks, 32 sent at once
  const unmapped = env.client.dmaUnmap(iova, 4 * MiB); // reaches the server before any DMA_READ reply
  const err = await rejection(p);
  assert.equal(err.errno, ENOENT, `errno (${err.message})`);
  assert.match(err.message, /unmapped during the transfer/);
  assert.equal(env.conn().pendingCount, 0, 'in-flight DMA_READs settled before the rejection');
  assert.equal(stats.inFlight, 0);
  assert.ok(stats.sent < 48, `no chunk requested after the unmap (${stats.sent} of 48 sent)`);
  const snapshot = dest.slice();
  await unmapped;
  await tick(20);
  same(dest, snapshot, 'nothing lands in dest after the rejection');
  // The server goes on: map again, read again.
  await env.client.dmaMap({ iova, size: 4 * MiB, memory: guest, passFd: false });
  await ctx.dma.readInto(iova + 10, dest);
  same(dest, guest.bytes.subarray(10, 10 + dest.length), 'readInto after remapping');
  env.close();
  guest.close();
  await openFdsBackTo(fdsBefore, 'fd leaks');
  assert.equal(openFdCount(), fdsBefore, 'no fd leaks');
});

test('the client serves only part of the range: the first failing chunk stops new requests; in-flight ones settle; the promise rejects', async (t) => {
  const fdsBefore = openFdCount();
  const device = probeDevice();
  const env = await setup(t, device, { xfer: 64 * KiB });
  const stats = spyRequests(env.conn(), Command.DMA_READ);
  const guest = SharedMemory.create(8 * MiB);
  pattern(guest.bytes, 41);
  const iova = 0x4000_0000;
  await env.client.dmaMap({ iova, size: 8 * MiB, memory: guest, passFd: false });
  // The client's own table shrinks to 1 MiB behind the server's back: chunks from 1 MiB on get error replies.
  env.client.dma.unmap(iova, 8 * MiB);
  env.client.dma.map({ iova, size: MiB, prot: RW, offset: 0, handle: { memory: guest, offset: 0 } });
  const ctx = device.ctx();
  const dest = new Uint8Array(8 * MiB); // 128 chunks
  const err = await rejection(ctx.dma.readInto(iova, dest));
  assert.ok(err instanceof ConnectionError, `a ConnectionError (${err.message})`);
  assert.equal(err.code, 'VFU_PEER_ERROR');
  assert.equal(err.errno, ENOENT);
  assert.equal(env.conn().pendingCount, 0, 'in-flight DMA_READs settled before the rejection');
  assert.equal(stats.inFlight, 0);
  // 16 chunks succeed; the 17th fails; at most a window (32) more were already sent.
  assert.ok(stats.sent <= 16 + 1 + 32, `${stats.sent} of 128 DMA_READs sent`);
  assert.ok(stats.failed >= 1);
  same(dest.subarray(0, MiB), guest.bytes.subarray(0, MiB), 'the chunks that succeeded');
  const snapshot = dest.slice();
  await tick(30);
  same(dest, snapshot, 'nothing lands in dest after the rejection');
  // read() and write() of such a range fail the same way.
  await assert.rejects(ctx.dma.read(iova + MiB - 10, 200 * KiB), (e: unknown) => (e as { errno?: number }).errno === ENOENT);
  const w = await rejection(ctx.dma.write(iova + MiB - 64 * KiB, new Uint8Array(512 * KiB)));
  assert.equal(w.errno, ENOENT);
  assert.equal(env.conn().pendingCount, 0);
  // The served part still works, and so does the connection.
  same(await ctx.dma.read(iova + 5, 300 * KiB), guest.bytes.subarray(5, 5 + 300 * KiB), 'read of the served part');
  assert.equal((await env.dev.info()).numRegions, 9);
  env.close();
  guest.close();
  await openFdsBackTo(fdsBefore, 'fd leaks');
  assert.equal(openFdCount(), fdsBefore, 'no fd leaks');
});

test('sample copy message -> fd while the client unmaps the destination fd window: the copy fails (ERR), the connection survives', async (t) => {
  const env = await sampleEnv(t, { xfer: 64 * KiB });
  const F = 0x1000_0000;
  const M = 0x2000_0000;
  const fdMem = memory(t, 4 * MiB);
  const msgMem = memory(t, 4 * MiB);
  pattern(msgMem.bytes, 51);
  await env.client.dmaMap({ iova: F, size: 4 * MiB, memory: fdMem });
  await env.client.dmaMap({ iova: M, size: 4 * MiB, memory: msgMem, passFd: false });
  await env.dev.write(0, SampleReg.DMA_SRC, u64(M));
  await env.dev.write(0, SampleReg.DMA_DST, u64(F));
  await env.dev.write(0, SampleReg.DMA_LEN, u32(3 * MiB));
  const done = env.done.wait().then(() => 'done');
  const error = env.err.wait().then(() => 'error');
  done.catch(() => {});
  error.catch(() => {});
  const started = env.dev.write(0, SampleReg.DMA_CMD, u32(1));
  const unmapped = env.client.dmaUnmap(F, 4 * MiB); // queued right behind the command
  await started;
  await unmapped;
  await env.sample.idle();
  const how = await settled([done, error], 5000);
  assert.equal(how, 'error', `completion: ${how}`);
  assert.ok(env.sample.registers.dmaStatus & SampleStatus.ERROR);
  assert.ok(env.sample.registers.dmaErrno > 0);
  assert.equal(env.client.closed, false, 'the connection survives');
  assert.equal(env.conn().pendingCount, 0);
  assert.equal((await env.dev.info()).numRegions, 10);
});

/**
 * From the server's trace, its outgoing DMA_WRITE commands ('W') and DMA_UNMAP
 * replies ('U') in the order they entered the socket.
 */
function unmapOrder(lines: readonly string[]): string {
  return lines.map((l) => (/ -> #\d+ DMA_WRITE \(command/.test(l) ? 'W' : / -> #\d+ DMA_UNMAP \(reply/.test(l) ? 'U' : '')).join('');
}

for (const twinSocket of [false, true]) test(`sample copy fd -> message while the client unmaps the source fd window${twinSocket ? ' (twin socket)' : ''}: the connection survives; no DMA_WRITE from the window after the DMA_UNMAP reply`, async (t) => {
  const lines: string[] = [];
  const env = await sampleEnv(t, { xfer: 64 * KiB, twinSocket, trace: (l) => lines.push(l) });
  const F = 0x1000_0000;
  const M = 0x2000_0000;
  const fdMem = memory(t, 4 * MiB);
  const msgMem = memory(t, 4 * MiB);
  pattern(fdMem.bytes, 61);
  await env.client.dmaMap({ iova: F, size: 4 * MiB, memory: fdMem });
  await env.client.dmaMap({ iova: M, size: 4 * MiB, memory: msgMem, passFd: false });
  const len = 3 * MiB;
  await env.dev.write(0, SampleReg.DMA_SRC, u64(F));
  await env.dev.write(0, SampleReg.DMA_DST, u64(M));
  await env.dev.write(0, SampleReg.DMA_LEN, u32(len));
  const done = env.done.wait().then(() => 'done');
  const error = env.err.wait().then(() => 'error');
  done.catch(() => {});
  error.catch(() => {});
  const closedEarly = new Promise<string>((r) => env.client.once('close', (e) => r(`client connection closed: ${e?.message}`)));
  const started = env.dev.write(0, SampleReg.DMA_CMD, u32(1));
  const unmapped = env.client.dmaUnmap(F, 4 * MiB); // right behind the command
  await Promise.allSettled([started, unmapped]);
  await env.sample.idle();
  const how = await settled([done, error, closedEarly], 5000);
  assert.equal(env.client.closed, false, `the connection survives (${how})`);
  await unmapped;
  if (how === 'done') same(msgMem.bytes.subarray(0, len), fdMem.bytes.subarray(0, len), 'a copy that reports success wrote every byte');
  else assert.equal(how, 'error');
  const order = unmapOrder(lines);
  assert.ok(order.includes('U'), 'the DMA_UNMAP was answered');
  const after = order.slice(order.indexOf('U')).split('W').length - 1;
  assert.equal(after, 0, `DMA_WRITEs sent after the DMA_UNMAP reply: ${after} (${order})`);
  // Every DMA_WRITE was answered (so had been sent whole) before the DMA_UNMAP reply: with a twin
  // socket the two sockets are not ordered, so queued is not enough.
  const u = lines.findIndex((l) => / -> #\d+ DMA_UNMAP \(reply/.test(l));
  const lateReplies = lines.slice(u).filter((l) => /<- #\d+ DMA_WRITE \(reply/.test(l)).length;
  assert.equal(lateReplies, 0, `DMA_WRITE replies after the DMA_UNMAP reply: ${lateReplies}`);
});

test('sample copy fd -> message, the source fd window unmapped once 32 DMA_WRITEs were received: no short write; none after the DMA_UNMAP reply', async (t) => {
  const sample = sampleDevice();
  const lines: string[] = [];
  const server = VfioUserServer.listen(sock('unmap-src.sock'), { device: sample, maxDataXferSize: 64 * KiB, trace: (l) => lines.push(l) });
  const client = await RawVfioUserClient.connect(server.path);
  const fdMem = SharedMemory.create(4 * MiB);
  t.after(() => {
    client.close();
    server.close();
    fdMem.close();
    sample.dispose();
  });
  assert.equal((await client.version('{"capabilities":{"max_data_xfer_size":65536}}')).isError, false);
  const F = 0x1000_0000;
  const M = 0x2000_0000;
  const len = 3 * MiB; // 48 DMA_WRITEs, 32 in flight
  pattern(fdMem.bytes, 65);
  const mem = Buffer.alloc(4 * MiB); // the client's memory behind M
  const map = (iova: number) => new Bytes().u32(32).u32(RW).u64(0).u64(iova).u64(4 * MiB).build();
  assert.equal((await client.call(Command.DMA_MAP, map(F), { fds: [fdMem.fd] })).isError, false);
  assert.equal((await client.call(Command.DMA_MAP, map(M))).isError, false);
  // DMA_WRITEs are taken at once, their replies held back until the DMA_UNMAP is on its way.
  const counts: number[] = [];
  const held: Buffer[] = [];
  let hold = true;
  let got32!: () => void;
  const first32 = new Promise<void>((r) => (got32 = r));
  client.onCommand = (m) => {
    const addr = Number(m.body.readBigUInt64LE(0));
    const count = Number(m.body.readBigUInt64LE(8));
    counts.push(m.cmd === Command.DMA_WRITE ? m.body.length - 16 : -1);
    m.body.subarray(16).copy(mem, addr - M);
    const reply = new Bytes().u16(m.id).u16(m.cmd).u32(32).u32(1).u32(0).u64(addr).u64(count).build();
    if (!hold) return client.sendBytes(reply);
    held.push(reply);
    if (held.length === 32) got32();
  };
  const reg = (offset: number, value: Buffer) => client.call(Command.REGION_WRITE, new Bytes().u64(offset).u32(0).u32(value.length).bytes(value).build());
  await reg(SampleReg.DMA_SRC, u64(F));
  await reg(SampleReg.DMA_DST, u64(M));
  await reg(SampleReg.DMA_LEN, u32(len));
  await reg(SampleReg.DMA_CMD, u32(1));
  await first32;
  // DMA_UNMAP, then the held replies (not waiting for the unmap's reply: a server may defer it until the transfer ends).
  const unmapId = client.send(Command.DMA_UNMAP, new Bytes().u32(24).u32(0).u64(F).u64(4 * MiB).build());
  hold = false;
  for (const r of held) client.sendBytes(r);
  const unmapReply = await client.next();
  assert.equal(unmapReply.id, unmapId);
  assert.equal(unmapReply.isError, false);
  await sample.idle();
  const status = sample.registers.dmaStatus & (SampleStatus.DONE | SampleStatus.ERROR);
  assert.ok(counts.every((c) => c === 64 * KiB), `every DMA_WRITE carries its 64 KiB: ${[...new Set(counts)].join(', ')}`);
  if (status === SampleStatus.DONE) same(mem.subarray(0, len), fdMem.bytes.subarray(0, len), 'a copy that reports success wrote every byte');
  else assert.equal(status, SampleStatus.ERROR);
  const id = await client.call(Command.REGION_READ, new Bytes().u64(SampleReg.ID).u32(0).u32(4).build());
  assert.equal(id.isError, false, 'the connection goes on');
  const order = unmapOrder(lines);
  const after = order.slice(order.indexOf('U')).split('W').length - 1;
  assert.equal(after, 0, `DMA_WRITEs sent after the DMA_UNMAP reply: ${after} (${order})`);
  // Every DMA_WRITE was answered (so had been sent whole) before the DMA_UNMAP reply: with a twin
  // socket the two sockets are not ordered, so queued is not enough.
  const u = lines.findIndex((l) => / -> #\d+ DMA_UNMAP \(reply/.test(l));
  const lateReplies = lines.slice(u).filter((l) => /<- #\d+ DMA_WRITE \(reply/.test(l)).length;
  assert.equal(lateReplies, 0, `DMA_WRITE replies after the DMA_UNMAP reply: ${lateReplies}`);
});

// --- 5. DMA_WRITE received in place by the client ---

test('a 1 MiB DMA_WRITE is received straight into the client window; a second one at an odd offset too', async (t) => {
  const device = probeDevice();
  const env = await setup(t, device); // 1 MiB transfers: one message
  const writes = spyRequests(env.conn(), Command.DMA_WRITE);
  const guest = memory(t, 4 * MiB);
  pattern(guest.bytes, 71);
  const before = guest.bytes.slice();
  const placed = placedInto(env.client, guest);
  const iova = 0x2_0000_0000;
  await env.client.dmaMap({ iova, size: 4 * MiB, memory: guest, passFd: false });
  const ctx = device.ctx();
  const data = pattern(new Uint8Array(MiB), 72);
  await ctx.dma.write(iova + MiB, data);
  assert.equal(writes.sent, 1, 'one DMA_WRITE');
  same(guest.bytes.subarray(MiB, 2 * MiB), data, 'written');
  same(guest.bytes.subarray(0, MiB), before.subarray(0, MiB), 'before');
  same(guest.bytes.subarray(2 * MiB), before.subarray(2 * MiB), 'after');
  assert.ok(placed.bytes >= MiB / 2, `received in place: ${placed.bytes} bytes`);
  const data2 = pattern(new Uint8Array(MiB - 3), 73);
  await ctx.dma.write(iova + 3 * MiB - 5, data2); // ends 8 bytes before the window's end
  same(guest.bytes.subarray(3 * MiB - 5, 4 * MiB - 8), data2, 'second write');
  same(guest.bytes.subarray(4 * MiB - 8), before.subarray(4 * MiB - 8), 'the last 8 bytes');
});

test('DMA_WRITE the client must refuse (no window, past a window\'s end, read-only): an error reply, client memory untouched', async (t) => {
  // A server written here with Connection, so it can send what our server would not.
  const [ours, theirs] = socketPair();
  const fake = new Connection(ours, {
    limits: codecLimits(MiB),
    onRequest: (msg) => (msg.command === Command.VERSION ? { body: { major: 0, minor: 2, json: '{"capabilities":{}}' } } : undefined),
  });
  const client = await VfioUserClient.over(theirs);
  t.after(() => {
    client.close();
    fake.close();
  });
  const w = memory(t, 2 * MiB);
  const r = memory(t, 64 * KiB);
  pattern(w.bytes, 81);
  pattern(r.bytes, 82);
  const wBefore = w.bytes.slice();
  const rBefore = r.bytes.slice();
  const placedW = placedInto(client, w);
  await client.dmaMap({ iova: 0x100000, size: MiB, memory: w, passFd: false });
  await client.dmaMap({ iova: 0x200000, size: MiB, memory: w, offset: MiB, passFd: false }); // adjacent
  await client.dmaMap({ iova: 0x400000, size: 64 * KiB, memory: r, prot: READ, passFd: false });
  const data = pattern(new Uint8Array(256 * KiB), 83);
  const write = (address: number, count = data.length) => fake.request(Command.DMA_WRITE, { address, count, data: data.subarray(0, count) });
  const refused = async (p: Promise<unknown>, errno: number, what: string) => {
    const e = await rejection(p);
    assert.ok(e instanceof ConnectionError && e.code === 'VFU_PEER_ERROR', `${what}: ${e.message}`);
    assert.equal(e.errno, errno, what);
  };
  await refused(write(0x900000), ENOENT, 'no window');
  await refused(write(0x300000 - 64 * KiB), ENOENT, 'past the end of the second window');
  await refused(write(0x400000, 64 * KiB), EACCES, 'read-only window');
  await refused(write(0x400000 - 4 * KiB, 8 * KiB), ENOENT, 'a gap before the read-only window');
  same(w.bytes, wBefore, 'the writable windows are untouched');
  same(r.bytes, rBefore, 'the read-only window is untouched');
  assert.equal(placedW.bytes, 0, 'nothing was received into the window');
  // The connection is still framed: a good write lands (in place), one across two windows too (copied).
  await write(0x100000 + 0x1234);
  same(w.bytes.subarray(0x1234, 0x1234 + data.length), data, 'a good write');
  assert.ok(placedW.bytes > 0, 'received in place');
  await write(0x200000 - 100 * KiB);
  same(w.bytes.subarray(MiB - 100 * KiB, MiB - 100 * KiB + data.length), data, 'a write across two windows');
  // DMA_READ of the range just written, served back.
  const back = await fake.request(Command.DMA_READ, { address: 0x200000 - 100 * KiB, count: data.length });
  same(back.body.data, data, 'DMA_READ back');
  assert.equal(client.closed, false);
});

test('device-side: a write the client refuses rejects ctx.dma.write; the client memory is untouched', async (t) => {
  const device = probeDevice();
  const env = await setup(t, device);
  const guest = memory(t, 2 * MiB);
  pattern(guest.bytes, 91);
  const before = guest.bytes.slice();
  const iova = 0x3_0000_0000;
  await env.client.dmaMap({ iova, size: 2 * MiB, memory: guest, passFd: false });
  // The server believes in the 2 MiB window; the client keeps only its first page.
  env.client.dma.unmap(iova, 2 * MiB);
  env.client.dma.map({ iova, size: 4096, prot: RW, offset: 0, handle: { memory: guest, offset: 0 } });
  const ctx = device.ctx();
  const e = await rejection(ctx.dma.write(iova + MiB, new Uint8Array(MiB).fill(0xee)));
  assert.equal(e.errno, ENOENT, e.message);
  const e2 = await rejection(ctx.dma.write(iova + 100, new Uint8Array(8192).fill(0xee))); // starts in the page, ends outside
  assert.equal(e2.errno, ENOENT, e2.message);
  same(guest.bytes, before, 'untouched');
  await ctx.dma.write(iova + 100, Uint8Array.of(1, 2, 3));
  assert.deepEqual([...guest.bytes.subarray(100, 103)], [1, 2, 3]);
});

// --- 6. a reply that comes after its request timed out ---

test('a DMA_READ reply that arrives after the timeout: readInto rejects VFU_TIMEOUT, the late bytes do not land in dest, the stream stays framed', async (t) => {
  const device = probeDevice();
  // Long enough for the next readInto (which must succeed) on a loaded machine; the first one is meant to time out.
  const timeoutMs = 1000;
  const server = VfioUserServer.listen(sock('slow.sock'), { device, timeoutMs });
  const client = await RawVfioUserClient.connect(server.path);
  t.after(() => {
    client.close();
    server.close();
  });
  assert.equal((await client.version('{"capabilities":{"max_data_xfer_size":65536}}')).isError, false);
  const iova = 0x50000;
  const size = 64 * KiB;
  assert.equal((await client.call(Command.DMA_MAP, new Bytes().u32(32).u32(RW).u64(0).u64(iova).u64(size).build())).isError, false);
  const memoryOf = (addr: number, count: number) => Buffer.alloc(count, (addr >> 12) & 0xff);
  let rest: Buffer | null = null;
  client.onCommand = (m) => {
    const addr = Number(m.body.readBigUInt64LE(0));
    const count = Number(m.body.readBigUInt64LE(8));
    const reply = new Bytes().u16(m.id).u16(m.cmd).u32(32 + count).u32(1).u32(0).u64(addr).u64(count).bytes(memoryOf(addr, count)).build();
    if (rest !== null) return client.sendBytes(reply);
    client.sendBytes(reply.subarray(0, 32 + count / 2)); // half the data now, the rest after the timeout
    rest = reply.subarray(32 + count / 2);
  };
  const ctx = device.ctx();
  const dest = new Uint8Array(size).fill(0x77);
  const t0 = performance.now();
  const err = await rejection(ctx.dma.readInto(iova + 0x1000, dest.subarray(0, size - 0x1000)));
  const elapsed = performance.now() - t0;
  assert.ok(err instanceof ConnectionError && err.code === 'VFU_TIMEOUT', err.message);
  assert.ok(elapsed >= timeoutMs - 50, `timed out after ${elapsed.toFixed(0)} ms`);
  const snapshot = dest.slice();
  assert.ok(rest, 'half a reply was sent');
  client.sendBytes(rest); // the late half
  // The next transfer works: the late reply was skipped, not mistaken for this one (same stream, after it).
  const dest2 = new Uint8Array(size - 0x2000);
  await ctx.dma.readInto(iova + 0x2000, dest2);
  same(dest2, memoryOf(iova + 0x2000, dest2.length), 'the next readInto');
  same(dest, snapshot, 'the late half did not land in dest');
  assert.equal([...server.sessions][0]!.conn.pendingCount, 0);
});

test('a large DMA_WRITE with a malformed header (reserved flag bit, error field) is refused before any byte lands in client memory', async (t) => {
  const [ours, theirs] = socketPair();
  const fake = new Connection(ours, {
    limits: codecLimits(MiB),
    onRequest: (msg) => (msg.command === Command.VERSION ? { body: { major: 0, minor: 2, json: '{"capabilities":{}}' } } : undefined),
  });
  const client = await VfioUserClient.over(theirs);
  t.after(() => {
    client.close();
    fake.close();
  });
  const w = memory(t, MiB);
  pattern(w.bytes, 91);
  const before = w.bytes.slice();
  await client.dmaMap({ iova: 0x100000, size: MiB, memory: w, passFd: false });
  const data = pattern(new Uint8Array(64 * KiB), 92);
  // Hand-built frames: header {id, cmd 12 DMA_WRITE, size, flags, error}, u64 address, u64 count, data.
  const frame = (id: number, flags: number, errorNo: number): Uint8Array =>
    new Bytes().u16(id).u16(Command.DMA_WRITE).u32(32 + data.length).u32(flags).u32(errorNo).u64(0x100000).u64(data.length).bytes(data).build();
  fake.socket.write(frame(0x7001, 0x40, 0)); // a reserved flag bit
  fake.socket.write(frame(0x7002, 0, 5)); // an error number in a command
  await tick(50);
  same(w.bytes, before, 'client memory untouched by refused writes');
  assert.equal(client.closed, false);
  // A well-formed one still lands.
  const ok = await fake.request(Command.DMA_WRITE, { address: 0x100000, count: data.length, data });
  assert.equal(ok.body?.count, data.length);
  same(w.bytes.subarray(0, data.length), data, 'the good write');
});

test('sample fill into an fd window (a view) and a message window (DMA_WRITEs of the device buffer, copied, not spliced): the pattern, little-endian, exactly the range', async (t) => {
  const env = await sampleEnv(t, { xfer: 64 * KiB });
  const F = 0x1000_0000;
  const M = 0x2000_0000;
  const fdMem = memory(t, 2 * MiB);
  const msgMem = memory(t, 2 * MiB);
  await env.client.dmaMap({ iova: F, size: 2 * MiB, memory: fdMem });
  await env.client.dmaMap({ iova: M, size: 2 * MiB, memory: msgMem, passFd: false });
  const spliced = countSplices(t);
  /** The expected bytes, built by hand: the u32 repeated little-endian from the start. */
  const expected = (pattern: number, len: number): Buffer => {
    const b = Buffer.alloc(len);
    for (let i = 0; i < len; i++) b[i] = (pattern >>> (8 * (i % 4))) & 0xff;
    return b;
  };
  // Same pattern twice (the device keeps its buffer), a longer fill, another pattern, an odd length.
  const runs: [number, number, number][] = [
    [0x11223344, 100_001, 0x10],
    [0x11223344, 100_001, 0x20001],
    [0x11223344, MiB + 3, 0x5],
    [0xa0b0c0d0, 4097, 0x300],
  ];
  for (const [mem, base] of [
    [fdMem, F],
    [msgMem, M],
  ] as const) {
    for (const [pattern, len, off] of runs) {
      mem.bytes.fill(0x5a);
      await env.dev.write(0, SampleReg.FILL_PATTERN, u32(pattern));
      await env.dev.write(0, SampleReg.DMA_DST, u64(base + off));
      await env.dev.write(0, SampleReg.DMA_LEN, u32(len));
      const finished = Promise.race([env.done.wait().then(() => 'done'), env.err.wait().then(() => 'error')]);
      await env.dev.write(0, SampleReg.FILL_CMD, u32(1));
      assert.equal(await finished, 'done', `fill of ${len} at 0x${(base + off).toString(16)}`);
      same(mem.bytes.subarray(off, off + len), expected(pattern, len), `fill 0x${pattern.toString(16)} x ${len}`);
      assert.ok(mem.bytes.subarray(0, off).every((x) => x === 0x5a), 'before the range untouched');
      assert.ok(mem.bytes.subarray(off + len).every((x) => x === 0x5a), 'after the range untouched');
      await env.dev.write(0, SampleReg.DMA_STATUS, u32(SampleStatus.DONE));
    }
  }
  assert.equal(spliced.n, 0, 'device memory is never spliced');
});
