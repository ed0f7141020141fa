/**
 * Our vfio-user client (VfioUserClient, VfioUserDevice) against libvfio-user's
 * samples/server (commit 7e7a0a6c), a real C server. What that server does,
 * read from samples/server.c and lib/:
 *
 * - BAR0 (region 0) is 8 bytes, a time_t, accessible only as 8 bytes at
 *   offset 0 (EINVAL otherwise). A write of t while RUNNING arms a one-shot
 *   timer for t - time(NULL) seconds (setitimer: a time in the past is
 *   EINVAL, and the write is then refused; t == now disarms). A read returns
 *   time(NULL) - bar0.
 * - BAR1 (region 1) is 0x3000 bytes backed by a file, offered by fd with
 *   sparse mmap areas [0, 0x1000) and [0x2000, 0x3000). Writes go to
 *   bar1 + offset; reads copy from bar1 + 0 whatever the offset (a bug of the
 *   sample: `memcpy(buf, server_data->bar1, count)`).
 * - When the timer fires (SIGALRM interrupts vfu_run_ctx), the server
 *   triggers INTx vector 0 (vfu_irq_trigger: it exits if no eventfd is set),
 *   then does DMA: to the SECOND DMA region registered (slot 1) directly
 *   through its mapping of our fd ("DIRECT"), and to the FIRST one (slot 0)
 *   by DMA_WRITE / DMA_READ messages ("MESSAGE"): 4 writes of 1024 bytes
 *   filled with 'A', 'B', 'C', 'D' at the region's start, then 2 reads of 2048
 *   bytes; it compares the CRCs of what it wrote and read back, and exits
 *   with failure on a mismatch or if either region is missing. Direct writes
 *   are marked dirty (vfu_sgl_mark_dirty / vfu_sgl_put), message ones are not
 *   (the client's job).
 * - Only INTx (1 vector) is configured, plus the library's ERR and REQ; no
 *   MSI or MSI-X.
 * - Migration v2 with PRE_COPY: pre-copy data is BAR1 (0x3000 bytes),
 *   stop-and-copy data is BAR1 then BAR0 (0x3008 bytes); the destination
 *   takes exactly 0x3008 bytes; STOP after STOP_COPY and RUNNING after
 *   RESUMING assert (abort) unless exactly 0x3008 bytes moved; RUNNING arms
 *   the timer from BAR0 (failing the arc if BAR0 is in the past).
 *   STOP_COPY disables the timer.
 * - It exits (status 0) when its client disconnects: every test checks that
 *   status, so an assert() or err() in the C server fails the test.
 *
 * A missing peer fails every test (libvfioUserSample throws), never skips.
 */
import { test, before, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { VfioUserClient, type VfioUserClientOptions } from '../../src/vfio-user/client.js';
import { VfioUserDevice } from '../../src/vfio-user/client-device.js';
import { ConnectionError } from '../../src/vfio-user/connection.js';
import { SharedMemory, EventFd } from '../../src/sys/index.js';
import { MigrationState } from '../../src/vfio/uapi.js';
import { openFdCount, openFdsBackTo } from '../helpers/sys.js';
import { connectPeer, libvfioUserSample, scratchDir, startPeer, waitForSocket, type Peer } from './peers.js';

const EINVAL = 22;
const ENOTSUP = 95;
const PAGE = 4096;
const BAR1_SIZE = 0x3000;
/** Where the DMA windows go: slot 0 (message DMA) and slot 1 (direct DMA) of the server's table. */
const MSG_IOVA = 0x10000;
const FD_IOVA = 0x20000;
const WIN = 2 * PAGE;

/** What samples/server writes to a DMA region when its timer fires: 1024 x 'A', 'B', 'C', 'D'. */
const DMA_PATTERN = Buffer.concat([0, 1, 2, 3].map((i) => Buffer.alloc(1024, 0x41 + i)));

const nowSec = (): number => Math.floor(Date.now() / 1000);
const i64 = (v: number): Uint8Array => {
  const b = Buffer.alloc(8);
  b.writeBigInt64LE(BigInt(v));
  return b;
};
const readI64 = (b: Uint8Array): number => Number(Buffer.from(b.buffer, b.byteOffset, 8).readBigInt64LE());
/** A pattern whose pages differ from each other (BAR1 reads ignore the offset: pages must not look alike). */
function pattern(size: number, seed: number): Buffer {
  const b = Buffer.alloc(size);
  for (let i = 0; i < size; i++) b[i] = (i * 7 + (i >> 12) * 31 + seed) & 0xff;
  return b;
}

function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const t = new Promise<never>((_r, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: nothing after ${ms} ms`)), ms);
  });
  return Promise.race([p, t]).finally(() => clearTimeout(timer));
}

/**
 * Waits (bounded) until the peer has printed `text`; fails at once if it
 * exits first. Its log comes through a pipe, not ordered with the socket: a
 * line printed before a reply may be read after it, so every check of the
 * log waits for its line (and a check that a line is absent is made once a
 * later line arrived, or the peer's output has closed).
 */
async function waitForOutput(peer: Peer, text: string | RegExp, timeoutMs = 10_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  const seen = (): boolean => (typeof text === 'string' ? peer.output().includes(text) : text.test(peer.output()));
  for (;;) {
    if (seen()) return;
    if (peer.proc.exitCode !== null || peer.proc.signalCode !== null) {
      throw new Error(`server exited (${peer.proc.exitCode ?? peer.proc.signalCode}) before printing "${text}":\n${peer.output()}`);
    }
    if (Date.now() > end) throw new Error(`server did not print "${text}" within ${timeoutMs} ms:\n${peer.output()}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

interface Server {
  peer: Peer;
  socket: string;
  client: VfioUserClient;
  dev: VfioUserDevice;
  /** Closes our side, then expects the server to exit with status 0 (no assert, no err() on its side); then its output is complete. */
  finish(): Promise<void>;
}

/**
 * Starts samples/server in a scratch dir and connects our client to it. The
 * test's after hook closes the client and stops the server by pid, whatever
 * happened.
 */
async function startServer(t: TestContext, name: string, options: VfioUserClientOptions = {}): Promise<Server> {
  const bin = libvfioUserSample('server'); // throws (the test fails) if the peer is not built
  const scratch = scratchDir('vdevkit-lvu-server-');
  const socket = path.join(scratch.dir, `${name}.sock`);
  const peer = startPeer(bin, ['-v', socket], { cwd: scratch.dir });
  let client: VfioUserClient | undefined;
  let dev: VfioUserDevice | undefined;
  t.after(async () => {
    dev?.close();
    client?.close();
    await peer.stop(2000);
    scratch.remove();
  });
  await waitForSocket(socket, peer, 10_000);
  client = await connectPeer(socket, options);
  dev = new VfioUserDevice(client);
  const c = client;
  const d = dev;
  return {
    peer,
    socket,
    client: c,
    dev: d,
    async finish() {
      d.close();
      c.close();
      const code = await withTimeout(peer.exited, 5000, `${name}: exit after the client closed`);
      assert.equal(code, 0, `${name} exited with ${code}:\n${peer.output()}`);
      // All it printed is in output() once its pipes have closed.
      await withTimeout(
        Promise.all([peer.proc.stdout!, peer.proc.stderr!].map((s) => (s.closed ? undefined : new Promise((r) => s.once('close', r))))),
        5000,
        `${name}: output closed`,
      );
    },
  };
}

interface Windows {
  /** Slot 0: mapped without an fd, so the server does DMA to it by messages. */
  msgMem: SharedMemory;
  /** Slot 1: a memfd of 3 pages whose pages 1-2 are the window (offset 4096), passed by fd. */
  fdMem: SharedMemory;
  close(): void;
}

/** Maps the two windows the sample's timer handler needs, in the order that gives them their slots. */
async function mapWindows(t: TestContext, client: VfioUserClient): Promise<Windows> {
  const msgMem = SharedMemory.create(WIN);
  const fdMem = SharedMemory.create(PAGE + WIN);
  const close = (): void => {
    msgMem.close();
    fdMem.close();
  };
  t.after(close);
  msgMem.bytes.fill(0xee);
  fdMem.bytes.fill(0xee);
  await client.dmaMap({ iova: MSG_IOVA, size: WIN, memory: msgMem, passFd: false });
  await client.dmaMap({ iova: FD_IOVA, size: WIN, memory: fdMem, offset: PAGE });
  return { msgMem, fdMem, close };
}

/** An eventfd on INTx vector 0 (the sample exits when its timer fires without one). */
async function intxEventFd(t: TestContext, dev: VfioUserDevice): Promise<EventFd> {
  const efd = EventFd.create();
  t.after(() => efd.close());
  await dev.setEventFds(0, 0, [efd]);
  return efd;
}

/** Arms the sample's timer (BAR0 = now + 2 s) and waits for the interrupt; returns the ms it took. */
async function fireTimer(srv: Server, intx: EventFd): Promise<number> {
  assert.equal(intx.read(), 0, 'no interrupt before the timer');
  const t0 = Date.now();
  await srv.dev.write(0, 0, i64(nowSec() + 2));
  const n = await withTimeout(intx.wait(), 10_000, 'INTx after the BAR0 timer');
  assert.equal(n, 1, 'one interrupt');
  return Date.now() - t0;
}

/** The server's log lines of one do_dma_io run ("DIRECT" or "MESSAGE"): `WRITE addr size` / `READ addr size`. */
function dmaLog(out: string, kind: 'DIRECT' | 'MESSAGE'): string[] {
  const re = new RegExp(`do_dma_io: ${kind} (WRITE|READ) +addr (0x[0-9a-f]+) size (\\d+)`, 'g');
  return [...out.matchAll(re)].map((m) => `${m[1]} ${m[2]} ${m[3]}`);
}
const expectedDmaLog = (iova: number): string[] => [
  ...[0, 1, 2, 3].map((i) => `WRITE 0x${(iova + i * 1024).toString(16)} 1024`),
  ...[0, 2].map((i) => `READ 0x${(iova + i * 1024).toString(16)} 2048`),
];

const peerError = (errno: number) => (e: unknown) => e instanceof ConnectionError && e.code === 'VFU_PEER_ERROR' && e.errno === errno;

let fdsAtStart = 0;
before(async () => {
  // The first child process opens libuv's SIGCHLD machinery for good: open it before counting fds.
  const warm = startPeer(process.execPath, ['-e', '']);
  await withTimeout(warm.exited, 10_000, 'warm-up child');
  fdsAtStart = openFdCount();
});
const noLeaks = (): Promise<void> => openFdsBackTo(fdsAtStart, 'open fds after the test', 5000);

test('1. direct DMA: the server writes and reads back our memfd window at its offset', async (t) => {
  const srv = await startServer(t, 'direct');
  const w = await mapWindows(t, srv.client);
  const intx = await intxEventFd(t, srv.dev);
  // The server mapped only the window with an fd (the 0x10000 one was added before it).
  await waitForOutput(srv.peer, /mapped DMA region iova=\[0x20000, 0x22000\)/);
  assert.doesNotMatch(srv.peer.output(), /mapped DMA region iova=\[0x10000/);
  await fireTimer(srv, intx);
  await waitForOutput(srv.peer, 'do_dma_io: DIRECT success');
  // Four 1 KiB writes at the window's start, read back as two 2 KiB reads, through its mapping.
  assert.deepEqual(dmaLog(srv.peer.output(), 'DIRECT'), expectedDmaLog(FD_IOVA));
  // It landed in our memfd at the window's offset (page 1), and nowhere else.
  const mem = Buffer.from(w.fdMem.bytes);
  assert.ok(mem.subarray(PAGE, 2 * PAGE).equals(DMA_PATTERN), 'window page 0 holds A/B/C/D x 1024');
  assert.ok(mem.subarray(0, PAGE).every((b) => b === 0xee), 'memfd page 0 (before the window) untouched');
  assert.ok(mem.subarray(2 * PAGE).every((b) => b === 0xee), 'window page 1 untouched');
  // "DIRECT success": the CRC of what it read back from our memory equals that of what it wrote.
  await waitForOutput(srv.peer, 'do_dma_io: MESSAGE success');
  await srv.finish();
  w.close();
  intx.close();
  await noLeaks();
});

for (const twinSocket of [false, true]) {
  test(`2. message DMA to a window without an fd: DMA_WRITE and DMA_READ served by our client (${twinSocket ? 'twin socket' : 'main socket'})`, async (t) => {
    const srv = await startServer(t, twinSocket ? 'msg-twin' : 'msg-main', { twinSocket });
    assert.equal(srv.client.serverCaps.twinSocket?.supported === true, twinSocket, 'twin socket only when asked for');
    const w = await mapWindows(t, srv.client);
    const intx = await intxEventFd(t, srv.dev);
    await fireTimer(srv, intx);
    // The server waits for each reply; "MESSAGE success" means that the data our DMA_READ replies
    // gave back has the CRC of what its DMA_WRITEs sent.
    await waitForOutput(srv.peer, 'do_dma_io: MESSAGE success');
    assert.deepEqual(dmaLog(srv.peer.output(), 'MESSAGE'), expectedDmaLog(MSG_IOVA));
    const mem = Buffer.from(w.msgMem.bytes);
    assert.ok(mem.subarray(0, PAGE).equals(DMA_PATTERN), 'DMA_WRITEs landed in our memory: A/B/C/D x 1024');
    assert.ok(mem.subarray(PAGE).every((b) => b === 0xee), 'window page 1 untouched');
    // Without a twin socket libvfio-user sends its DMA requests on the main socket and says so.
    const warned = srv.peer.output().includes('without the twin_socket feature');
    assert.equal(warned, !twinSocket, 'the server warns about DMA on the main socket exactly when there is no twin');
    // The connection goes on: a command after the DMA is answered.
    assert.equal((await srv.dev.info()).numRegions, 9);
    await srv.finish();
    w.close();
    intx.close();
    await noLeaks();
  });
}

test('3. BAR0 (time_t, arms the timer) and BAR1 (sparse mmap + messages) by REGION_READ/WRITE and mmap', async (t) => {
  const srv = await startServer(t, 'bars');
  const { dev, client } = srv;
  assert.deepEqual(await dev.info(), { flags: 3, numRegions: 9, numIrqs: 5 });
  const bar0 = await dev.regionInfo(0);
  assert.equal(bar0.size, 8);
  assert.equal(bar0.flags, 0x3, 'BAR0: READ | WRITE, no fd');
  assert.equal(bar0.mapped.length, 0);
  const bar1 = await dev.regionInfo(1);
  assert.equal(bar1.size, BAR1_SIZE);
  assert.equal(bar1.flags, 0xf, 'BAR1: READ | WRITE | MMAP | CAPS');
  const sparse = bar1.caps.find((c) => c.kind === 'sparse-mmap');
  assert.ok(sparse && sparse.kind === 'sparse-mmap');
  assert.deepEqual(sparse.areas, [{ offset: 0, size: 0x1000 }, { offset: 0x2000, size: 0x1000 }]);
  assert.deepEqual(bar1.mapped.map((m) => [m.offset, m.size]), [[0, 0x1000], [0x2000, 0x1000]]);
  // Config space: the ids samples/server sets.
  const cfg = Buffer.from(await dev.read(7, 0, 0x30));
  assert.deepEqual([cfg.readUInt16LE(0), cfg.readUInt16LE(2), cfg.readUInt16LE(0x2c), cfg.readUInt16LE(0x2e)], [0xdead, 0xbeef, 0xcafe, 0xbabe]);

  // BAR0: a read is time(NULL) - the value written.
  const far = nowSec() + 3600;
  await dev.write(0, 0, i64(far));
  let delta = readI64(await dev.read(0, 0, 8));
  assert.ok(delta >= -3601 && delta <= -3599, `BAR0 read ${delta}, expected about -3600`);
  await waitForOutput(srv.peer, /arming timer to trigger in 3[56]\d\d seconds/);
  // A time in the past cannot arm the timer: the write is refused and BAR0 keeps its value.
  await assert.rejects(dev.write(0, 0, i64(nowSec() - 100)), peerError(EINVAL));
  delta = readI64(await dev.read(0, 0, 8));
  assert.ok(delta >= -3601 && delta <= -3599, `BAR0 unchanged after the refused write: ${delta}`);
  // "now" disarms it, and reads back as 0 (or 1 across a second boundary).
  const now = nowSec();
  await dev.write(0, 0, i64(now));
  delta = readI64(await dev.read(0, 0, 8));
  assert.ok(delta >= 0 && delta <= 2, `BAR0 read ${delta} after writing now`);
  // Only 8-byte accesses at offset 0.
  await assert.rejects(client.regionRead(0, 0, 4), peerError(EINVAL));
  await assert.rejects(client.regionWrite(0, 4, new Uint8Array(4)), peerError(EINVAL));

  // BAR1: pages 0 and 2 through our mapping of the server's file, page 1 by REGION_WRITE.
  const p = pattern(BAR1_SIZE, 3);
  await dev.write(1, 0, p.subarray(0, 0x1000)); // mmap
  await dev.write(1, 0x1000, p.subarray(0x1000, 0x2000)); // REGION_WRITE (page 1 is not mapped)
  await dev.write(1, 0x2000, p.subarray(0x2000)); // mmap
  await waitForOutput(srv.peer, 'region1: wrote 4096 bytes at 0x1000');
  // One REGION_READ of the whole BAR (it spans the unmapped page) sees all three.
  assert.ok(Buffer.from(await dev.read(1, 0, BAR1_SIZE)).equals(p), 'REGION_READ of BAR1 at 0 = what was written');
  // The sample's read callback copies from the start of BAR1 whatever the offset asked.
  assert.ok(Buffer.from(await client.regionRead(1, 0x1000, 0x1000)).equals(p.subarray(0, 0x1000)), 'REGION_READ at 0x1000 returns BAR1[0..0x1000)');
  assert.ok(Buffer.from(await client.regionRead(1, 0x2000, 16)).equals(p.subarray(0, 16)), 'REGION_READ at 0x2000 returns BAR1[0..16)');
  // A REGION_WRITE into a mapped page shows in our mapping (same file).
  await client.regionWrite(1, 0x2100, Buffer.from('vfio-user'));
  assert.equal(Buffer.from(await dev.read(1, 0x2100, 9)).toString(), 'vfio-user', 'read through the mapping');
  // Out of bounds.
  await assert.rejects(client.regionWrite(1, BAR1_SIZE - 8, new Uint8Array(16)), peerError(EINVAL));
  await srv.finish();
  await noLeaks();
});

test('4. interrupts through eventfds: INTx from SET_IRQS and from the BAR0 timer; ERR; no MSI-X', async (t) => {
  const srv = await startServer(t, 'irqs');
  const { dev } = srv;
  const infos = [];
  for (let i = 0; i < 5; i++) infos.push(await dev.irqInfo(i));
  assert.deepEqual(
    infos.map((i) => [i.index, i.count, i.flags]),
    [[0, 1, 1], [1, 0, 1], [2, 0, 1], [3, 1, 1], [4, 1, 1]],
    'INTx 1, MSI 0, MSI-X 0, ERR 1, REQ 1; EVENTFD',
  );
  // No MSI-X vectors: an eventfd for vector 0 is refused.
  const spare = EventFd.create();
  t.after(() => spare.close());
  await assert.rejects(dev.setEventFds(2, 0, [spare]), peerError(EINVAL));
  await assert.rejects(dev.setEventFds(0, 1, [spare]), peerError(EINVAL), 'INTx has one vector');

  const w = await mapWindows(t, srv.client); // the timer handler does DMA after the interrupt
  const intx = await intxEventFd(t, dev);
  // SET_IRQS TRIGGER with DATA_BOOL / DATA_NONE: the server writes our eventfd itself.
  await dev.setIrqs(0, 'trigger', 0, 1, [true]);
  assert.equal(intx.read(), 1, 'DATA_BOOL true signals INTx');
  await dev.setIrqs(0, 'trigger', 0, 1, [false]);
  assert.equal(intx.read(), 0, 'DATA_BOOL false does not');
  await dev.setIrqs(0, 'trigger', 0, 1);
  assert.equal(intx.read(), 1, 'DATA_NONE signals INTx');
  // ERR has an eventfd of its own.
  const err = EventFd.create();
  t.after(() => err.close());
  await dev.setEventFds(3, 0, [err]);
  await dev.setIrqs(3, 'trigger', 0, 1, [true]);
  assert.equal(err.read(), 1, 'ERR signalled');
  assert.equal(intx.read(), 0, 'INTx not');

  // The device's own interrupt: the BAR0 timer fires 1-2 s after the write.
  const ms = await fireTimer(srv, intx);
  assert.ok(ms >= 900, `the interrupt came after the timer (${ms} ms)`);
  await waitForOutput(srv.peer, 'do_dma_io: MESSAGE success'); // the DMA that follows it is done
  assert.equal(intx.read(), 0, 'exactly one interrupt');

  // De-assigning the eventfd (SET_IRQS EVENTFD without fds) disables the vector: nothing signals it.
  await dev.setEventFds(0, 0, [null]);
  await dev.setIrqs(0, 'trigger', 0, 1, [true]);
  assert.equal(intx.read(), 0, 'a disabled vector is not signalled');
  await waitForOutput(srv.peer, 'disabling IRQ type INTx range [0, 1)');
  await srv.finish();
  w.close();
  intx.close();
  err.close();
  spare.close();
  await noLeaks();
});

test('5. DMA dirty logging: pages the server wrote are reported dirty (DMA_LOGGING_START/REPORT/STOP)', async (t) => {
  const srv = await startServer(t, 'dirty');
  const { dev } = srv;
  const w = await mapWindows(t, srv.client);
  const intx = await intxEventFd(t, dev);
  await dev.startDmaLogging(PAGE);
  await waitForOutput(srv.peer, 'dirty pages: started logging');
  assert.deepEqual([...(await dev.dmaLoggingReport(FD_IOVA, WIN, PAGE))], [0, 0, 0, 0, 0, 0, 0, 0], 'clean at the start');
  assert.deepEqual([...(await dev.dmaLoggingReport(MSG_IOVA, WIN, PAGE))], [0, 0, 0, 0, 0, 0, 0, 0], 'message window clean');
  await fireTimer(srv, intx);
  await waitForOutput(srv.peer, 'do_dma_io: MESSAGE success');
  // The fd window: the server logged its direct writes (first page only), and a report clears them.
  assert.deepEqual([...(await dev.dmaLoggingReport(FD_IOVA, WIN, PAGE))], [1, 0, 0, 0, 0, 0, 0, 0], 'fd window: page 0 dirty');
  await waitForOutput(srv.peer, 'dirty pages: get [0x20000, 0x22000), 1 dirty pages of size 4096');
  assert.deepEqual([...(await dev.dmaLoggingReport(FD_IOVA, WIN, PAGE))], [0, 0, 0, 0, 0, 0, 0, 0], 'cleared by the report');
  // The message window: libvfio-user cannot log it (its REPORT is EINVAL, "region 0 is not
  // mapped"); our client logged the DMA_WRITEs it served and reports them.
  assert.deepEqual([...(await dev.dmaLoggingReport(MSG_IOVA, WIN, PAGE))], [1, 0, 0, 0, 0, 0, 0, 0], 'message window: page 0 dirty');
  assert.deepEqual([...(await dev.dmaLoggingReport(MSG_IOVA, WIN, PAGE))], [0, 0, 0, 0, 0, 0, 0, 0], 'cleared by the report');
  // libvfio-user reports only ranges that start where a DMA region starts (a prefix is accepted).
  await assert.rejects(dev.dmaLoggingReport(FD_IOVA + PAGE, PAGE, PAGE), peerError(ENOTSUP));
  assert.deepEqual([...(await dev.dmaLoggingReport(FD_IOVA, PAGE, PAGE))], [0, 0, 0, 0, 0, 0, 0, 0], 'a prefix of the region');
  await dev.stopDmaLogging();
  await waitForOutput(srv.peer, 'dirty pages: stopped logging');
  await assert.rejects(dev.dmaLoggingReport(FD_IOVA, WIN, PAGE), peerError(EINVAL), 'no report once logging stopped');
  await srv.finish();
  assert.doesNotMatch(srv.peer.output(), /region 0 is not mapped/, 'the client did not ask the server about the message window');
  w.close();
  intx.close();
  await noLeaks();
});

test('6. migration to a second samples/server: pre-copy, stop-copy, resume; BAR1 and BAR0 arrive', async (t) => {
  const src = await startServer(t, 'source');
  // The destination's timer fires while we may still be talking to it: its DMA goes on a twin socket.
  const dst = await startServer(t, 'destination', { twinSocket: true });
  assert.equal(await src.dev.migrationFlags(), 0x5, 'STOP_COPY | PRE_COPY');
  assert.equal(await src.dev.migrationState(), MigrationState.RUNNING);
  assert.equal(src.client.serverCaps.migration?.pgsize, 4096);

  // Source state: BAR1 through the mapping and by messages.
  const bar1 = pattern(BAR1_SIZE, 11);
  await src.dev.write(1, 0, bar1);
  assert.ok(Buffer.from(await src.dev.read(1, 0, BAR1_SIZE)).equals(bar1));

  // Pre-copy: the device keeps running; its pre-copy data is BAR1 alone.
  await src.dev.setMigrationState(MigrationState.PRE_COPY);
  assert.equal(await src.dev.migrationState(), MigrationState.PRE_COPY);
  const pre = await src.dev.readAllMigrationData();
  assert.equal(pre.length, BAR1_SIZE, 'pre-copy data is BAR1');
  assert.ok(Buffer.from(pre).equals(bar1));
  assert.equal((await src.dev.readMigrationData(PAGE)).length, 0, 'then the pre-copy data ends');
  // Still running: change page 1 and BAR0 (a BAR0 write outside RUNNING does not arm the timer).
  bar1.fill(0x5a, 0x1000, 0x1800);
  await src.dev.write(1, 0x1000, bar1.subarray(0x1000, 0x2000));
  const T = nowSec() + 4;
  await src.dev.write(0, 0, i64(T));

  // Stop-copy (PRE_COPY -> STOP_COPY, read everything, STOP): BAR1 then BAR0.
  const state = await src.dev.save();
  assert.equal(state.length, BAR1_SIZE + 8);
  assert.ok(Buffer.from(state.subarray(0, BAR1_SIZE)).equals(bar1), 'stop-copy data: BAR1 with the pre-copy change');
  assert.equal(readI64(state.subarray(BAR1_SIZE)), T, 'then BAR0');
  assert.equal(await src.dev.migrationState(), MigrationState.STOP);
  // A stopped libvfio-user device takes only region access, features and MIG_DATA_READ.
  await assert.rejects(src.dev.info(), peerError(EINVAL));

  // Destination: its timer handler will do DMA and raise INTx, so it gets windows and an eventfd first.
  const w = await mapWindows(t, dst.client);
  const intx = await intxEventFd(t, dst.dev);
  // This sample's destination takes exactly one copy of BAR1 + BAR0 (0x3008 bytes): the pre-copy
  // data followed by the stop-copy data, as a stream of both, overflows it (only 8 bytes of the
  // second write fit: a partial write is EINVAL). So only the stop-copy data is sent.
  await dst.dev.setMigrationState(MigrationState.RESUMING);
  await dst.dev.writeMigrationData(pre);
  await assert.rejects(dst.dev.writeMigrationData(state), peerError(EINVAL));
  await dst.dev.setMigrationState(MigrationState.STOP); // RESUMING again resets its byte count
  await dst.dev.restore(state); // RESUMING, MIG_DATA_WRITE, RUNNING
  assert.equal(await dst.dev.migrationState(), MigrationState.RUNNING);
  assert.ok(Buffer.from(await dst.dev.read(1, 0, BAR1_SIZE)).equals(bar1), 'destination BAR1 = source BAR1');
  const delta = readI64(await dst.dev.read(0, 0, 8));
  const expect = nowSec() - T;
  assert.ok(Math.abs(delta - expect) <= 1, `destination BAR0 read ${delta}, expected time(NULL) - ${T} = ${expect}`);
  // RUNNING armed the destination's timer from the migrated BAR0: it fires at T.
  await waitForOutput(dst.peer, /arming timer to trigger in \d seconds/);
  await withTimeout(intx.wait(), 10_000, 'destination INTx at the migrated BAR0 time');
  assert.ok(Date.now() >= (T - 1) * 1000, 'not before T');
  await waitForOutput(dst.peer, 'do_dma_io: MESSAGE success');
  assert.ok(Buffer.from(w.fdMem.bytes.subarray(PAGE, 2 * PAGE)).equals(DMA_PATTERN), 'the destination does DMA to its windows');

  // Both exit 0: neither the source's STOP nor the destination's RUNNING assert fired.
  await src.finish();
  assert.doesNotMatch(src.peer.output(), /arming timer/, 'the source never armed its timer (BAR0 was written in PRE_COPY)');
  await dst.finish();
  w.close();
  intx.close();
  await noLeaks();
});
