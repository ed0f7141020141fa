/**
 * The libvfio-user-server device (src/devices/server-sample.ts) driven by our
 * own client over a real socket: its BARs and config space, BAR0's timer with
 * its interrupt and DMA (direct and by messages), and its migration stream
 * checked byte by byte against the layout built here by hand (BAR1, then
 * BAR0 as int64 little-endian). Also the server features it needs: a BAR
 * whose region is not a power of two, DMA by messages to a mapped window,
 * MIG_DATA_READ replies padded to the size asked, a GET_REGION_INFO request
 * carrying the whole argsz-sized buffer, and interrupt eventfds left as the
 * client made them (blocking).
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { VfioUserServer } from '../src/vfio-user/server.js';
import { VfioUserClient, type VfioUserClientOptions } from '../src/vfio-user/client.js';
import { VfioUserDevice } from '../src/vfio-user/client-device.js';
import {
  serverSampleDevice,
  serverSampleDmaPattern,
  SERVER_SAMPLE_BAR1_SIZE,
  SERVER_SAMPLE_STATE_BYTES,
  type ServerSampleDevice,
} from '../src/devices/server-sample.js';
import { devices } from '../src/devices/index.js';
import { RawVfioUserClient, Bytes } from '../src/testing/index.js';
import { EventFd, SharedMemory, nativeAddon } from '../src/sys/index.js';
import { MigrationState } from '../src/vfio/uapi.js';
import { tick, until } from './helpers/sys.js';

const EINVAL = 22;
const PAGE = 4096;
const BAR0 = 0;
const BAR1 = 1;
const CONFIG = 7;
const b = (): Bytes => new Bytes();
const sock = (name: string): string => path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'vfu-srvsample-')), name);
const nowSec = (): number => Math.floor(Date.now() / 1000);
const i64 = (v: number): Uint8Array => {
  const out = Buffer.alloc(8);
  out.writeBigInt64LE(BigInt(v));
  return out;
};
/** A BAR1 image whose bytes all differ from their neighbours' (a misplaced chunk shows). */
function pattern(seed: number): Buffer {
  const out = Buffer.alloc(SERVER_SAMPLE_BAR1_SIZE);
  for (let i = 0; i < out.length; i++) out[i] = (i * 13 + (i >> 8) * 7 + seed) & 0xff;
  return out;
}

interface Env {
  dev: ServerSampleDevice;
  server: VfioUserServer;
  client: VfioUserClient;
  vdev: VfioUserDevice;
  log: string[];
  trace: string[];
}

/** The device served on a fresh socket, our client connected; all closed after the test. */
async function serve(t: TestContext, clientOptions: VfioUserClientOptions = {}): Promise<Env> {
  const log: string[] = [];
  const trace: string[] = [];
  const dev = serverSampleDevice({ log: (l) => log.push(l) });
  const server = VfioUserServer.listen(sock('s.sock'), { device: dev, trace: (l) => trace.push(l) });
  const client = await VfioUserClient.connect(server.path, clientOptions);
  const vdev = new VfioUserDevice(client);
  t.after(async () => {
    vdev.close();
    client.close();
    server.close();
    await tick(5);
    dev.dispose();
  });
  return { dev, server, client, vdev, log, trace };
}

/** The device served to the raw-bytes client, VERSION done as samples/client does it. */
async function serveRaw(t: TestContext): Promise<RawVfioUserClient> {
  const dev = serverSampleDevice();
  const server = VfioUserServer.listen(sock('raw.sock'), { device: dev });
  const raw = await RawVfioUserClient.connect(server.path);
  t.after(async () => {
    raw.close();
    server.close();
    await tick(5);
    dev.dispose();
  });
  const v = await raw.version('{"capabilities":{"max_msg_fds":32,"max_data_xfer_size":1024}}');
  assert.equal(v.isError, false, `VERSION: errno ${v.errno}`);
  return raw;
}

async function rejectsWith(p: Promise<unknown>, errno: number, what: string): Promise<void> {
  await assert.rejects(p, (err: unknown) => {
    assert.equal((err as { errno?: number }).errno, errno, `${what}: ${(err as Error).message}`);
    return true;
  }, what);
}

test('registered for the CLI as libvfio-user-server', () => {
  const entry = devices['libvfio-user-server'];
  assert.ok(entry);
  const spec = entry.create({ log: () => {} }) as ServerSampleDevice;
  try {
    assert.equal(spec.pci.vendorId, 0xdead);
  } finally {
    spec.dispose();
  }
});

test('BARs, config space and interrupts are samples/server\'s', async (t) => {
  const { vdev, client } = await serve(t);
  const info = await vdev.info();
  assert.equal(info.numRegions, 9, 'samples/client requires 9 regions');
  assert.equal(info.numIrqs, 5);

  const r0 = await vdev.regionInfo(BAR0);
  assert.equal(r0.size, 8, 'BAR0 is a time_t');
  assert.equal(r0.flags, 0x3, 'READ | WRITE, no mmap');
  assert.deepEqual(r0.caps, []);
  const r1 = await vdev.regionInfo(BAR1);
  assert.equal(r1.size, 0x3000, 'BAR1 is 3 pages: not a power of two');
  assert.equal(r1.flags, 0xf, 'READ | WRITE | MMAP | CAPS');
  const sparse = r1.caps.find((c) => c.kind === 'sparse-mmap');
  assert.ok(sparse && sparse.kind === 'sparse-mmap');
  assert.deepEqual(sparse.areas, [{ offset: 0, size: 0x1000 }, { offset: 0x2000, size: 0x1000 }]);
  assert.deepEqual(r1.mapped.map((m) => [m.offset, m.size]), [[0, 0x1000], [0x2000, 0x1000]]);
  for (const i of [2, 3, 4, 5, 6, 8]) {
    const r = await vdev.regionInfo(i);
    assert.equal(r.size, 0, `region ${i} is unset`);
    assert.equal(r.flags, 0);
  }
  const cfg = await vdev.regionInfo(CONFIG);
  assert.equal(cfg.size, 256, 'conventional config space');

  const hdr = Buffer.from(await vdev.read(CONFIG, 0, 64));
  assert.equal(hdr.readUInt16LE(0), 0xdead);
  assert.equal(hdr.readUInt16LE(2), 0xbeef);
  assert.equal(hdr.readUInt16LE(0x2c), 0xcafe);
  assert.equal(hdr.readUInt16LE(0x2e), 0xbabe);
  assert.equal(hdr[0x0e], 0, 'header type 0');
  assert.equal(hdr.readUInt32LE(0x34) & 0xff, 0, 'no capabilities');
  assert.equal(hdr[0x3d], 1, 'INTA#');

  // In config space the BARs decode the next power of two: 16 bytes (the least a memory BAR is), 0x4000.
  const sizeBar = async (bar: number): Promise<number> => {
    await client.regionWrite(CONFIG, 0x10 + 4 * bar, Buffer.from([0xff, 0xff, 0xff, 0xff]));
    return Buffer.from(await vdev.read(CONFIG, 0x10 + 4 * bar, 4)).readUInt32LE(0);
  };
  assert.equal(await sizeBar(0), 0xfffffff0, 'BAR0: 16-byte mem32');
  assert.equal(await sizeBar(1), 0xffffc000, 'BAR1: 16 KiB mem32');
  assert.equal(await sizeBar(2), 0, 'BAR2 is not implemented');
  // The region stays 0x3000 bytes: the BAR's hole past it is outside the region.
  await rejectsWith(client.regionRead(BAR1, 0x3000, 4), EINVAL, 'read past BAR1');

  const irqs = [];
  for (let i = 0; i < 5; i++) irqs.push((await vdev.irqInfo(i)).count);
  assert.deepEqual(irqs, [1, 0, 0, 1, 1], 'INTx, and ERR and REQ as libvfio-user gives every device');
});

test('BAR0 takes 8-byte accesses at 0 only; a read is now - BAR0; BAR1 by message is the shared memory', async (t) => {
  const { dev, client, vdev } = await serve(t);
  await rejectsWith(client.regionRead(BAR0, 0, 4), EINVAL, '4-byte read');
  await rejectsWith(client.regionWrite(BAR0, 0, new Uint8Array(4)), EINVAL, '4-byte write');
  await rejectsWith(client.regionRead(BAR0, 4, 4), EINVAL, 'read at 4');
  await rejectsWith(client.regionRead(0xdeadbeef, 0, 4), EINVAL, 'a bogus region, as samples/client checks first');
  // A time in the past: refused (samples/server's setitimer fails), nothing stored.
  await rejectsWith(client.regionWrite(BAR0, 0, i64(nowSec() - 5)), EINVAL, 'a past time');
  assert.equal(dev.bar0, 0);
  const t0 = nowSec() + 100;
  await client.regionWrite(BAR0, 0, i64(t0));
  assert.equal(dev.bar0, t0);
  assert.equal(dev.timerArmed, true);
  const delta = Buffer.from(await client.regionRead(BAR0, 0, 8)).readBigInt64LE(0);
  assert.ok(delta <= -99n && delta >= -101n, `now - BAR0 = ${delta}`);
  // now: disarms.
  await client.regionWrite(BAR0, 0, i64(nowSec()));
  assert.equal(dev.timerArmed, false);

  // BAR1: the middle page (not an mmap area) by messages, the others through the mapping: one memory.
  await vdev.regionInfo(BAR1);
  const img = pattern(1);
  await client.regionWrite(BAR1, 0x1000, img.subarray(0x1000, 0x2000));
  await vdev.write(BAR1, 0, img.subarray(0, 0x1000));
  await vdev.write(BAR1, 0x2000, img.subarray(0x2000));
  assert.deepEqual(Buffer.from(dev.bar1), img);
  assert.deepEqual(Buffer.from(await client.regionRead(BAR1, 0, 0x3000)), img, 'one 0x3000-byte read, at offset 0');
  assert.deepEqual(Buffer.from(await client.regionRead(BAR1, 0x2800, 16)), img.subarray(0x2800, 0x2810), 'at the offset asked');
});

test('the timer: INTx, then DMA direct to slot 1 and by 4 + 4 messages of 1024 bytes to slot 0; dirty logging', async (t) => {
  const { dev, client, vdev, log, trace } = await serve(t, { maxDataXferSize: 1024 });
  // Two windows of one memfd, both by fd, mapped in the order that gives them their slots.
  const mem = SharedMemory.create(4 * PAGE);
  t.after(() => mem.close());
  await client.dmaMap({ iova: 0, size: PAGE, memory: mem, offset: 0 });
  await client.dmaMap({ iova: PAGE, size: PAGE, memory: mem, offset: PAGE });
  await client.dmaMap({ iova: 2 * PAGE, size: PAGE, memory: mem, offset: 2 * PAGE });
  assert.deepEqual(dev.dmaSlots.slice(0, 4).map((w) => w?.iova ?? null), [0, PAGE, 2 * PAGE, null]);
  const intx = EventFd.create();
  t.after(() => intx.close());
  await vdev.setEventFds(0, 0, [intx]);
  await vdev.startDmaLogging(PAGE);

  const traced = trace.length;
  await client.regionWrite(BAR0, 0, i64(nowSec() + 1));
  const n = await Promise.race([intx.wait(), tick(5000).then(() => -1)]);
  assert.equal(n, 1, 'INTx within 2 s');
  await dev.dmaDone;
  assert.ok(log.includes('do_dma_io: DIRECT success'), log.join('\n'));
  assert.ok(log.includes('do_dma_io: MESSAGE success'), log.join('\n'));
  const want = Buffer.from(serverSampleDmaPattern());
  assert.deepEqual(Buffer.from(mem.bytes.subarray(0, PAGE)), want, 'slot 0 by messages');
  assert.deepEqual(Buffer.from(mem.bytes.subarray(PAGE, 2 * PAGE)), want, 'slot 1 directly');
  assert.ok(mem.bytes.subarray(2 * PAGE, 3 * PAGE).every((x) => x === 0), 'slot 2 untouched');

  // Exactly what samples/client counts: 4 DMA_WRITEs, then 4 DMA_READs, of 1024 bytes each, all to slot 0.
  const dma = trace
    .slice(traced)
    .filter((l) => /-> #\d+ DMA_(READ|WRITE) \(command/.test(l))
    .map((l) => {
      const m = /DMA_(READ|WRITE) .*"address":(\d+),"count":(\d+)/.exec(l);
      return m ? `${m[1]} ${m[2]} ${m[3]}` : l;
    });
  assert.deepEqual(dma, ['WRITE 0 1024', 'WRITE 1024 1024', 'WRITE 2048 1024', 'WRITE 3072 1024', 'READ 0 1024', 'READ 1024 1024', 'READ 2048 1024', 'READ 3072 1024']);

  // Slot 1 was written through the server's mapping: the server's own log has it.
  const report = async (iova: number): Promise<number> => (await vdev.dmaLoggingReport(iova, PAGE, PAGE))[0]!;
  assert.equal(await report(PAGE), 1, 'slot 1 dirty');
  assert.equal(await report(0), 1, 'slot 0 dirty (the DMA_WRITEs)');
  assert.equal(await report(2 * PAGE), 0, 'slot 2 clean');
  await vdev.stopDmaLogging();

  // An unmap frees its slot; the next map takes the first free one.
  await client.dmaUnmap(0, PAGE);
  assert.equal(dev.dmaSlots[0], null);
  await client.dmaMap({ iova: 3 * PAGE, size: PAGE, memory: mem, offset: 3 * PAGE });
  assert.deepEqual(dev.dmaSlots.slice(0, 4).map((w) => w?.iova ?? null), [3 * PAGE, PAGE, 2 * PAGE, null]);
});

test('interrupt eventfds are used as the client made them: a blocking one stays blocking', async (t) => {
  const { vdev } = await serve(t);
  const efd = EventFd.create();
  t.after(() => efd.close());
  nativeAddon.setNonBlock(efd.fd.value, false);
  const flags = (): number => parseInt(/flags:\s+([0-7]+)/.exec(fs.readFileSync(`/proc/self/fdinfo/${efd.fd.value}`, 'utf8'))![1]!, 8);
  const O_NONBLOCK = 0o4000;
  assert.equal(flags() & O_NONBLOCK, 0);
  await vdev.setEventFds(0, 0, [efd]);
  await tick(5);
  assert.equal(flags() & O_NONBLOCK, 0, 'the server did not set O_NONBLOCK on the shared file description');
  nativeAddon.setNonBlock(efd.fd.value, true);
});

test('a GET_REGION_INFO request may carry the whole argsz buffer (zeros after the struct), as samples/client sends it', async (t) => {
  const raw = await serveRaw(t);
  const GET_REGION_INFO = 5;
  const req = (argsz: number, tail: Buffer) => b().u32(argsz).u32(0).u32(BAR1).u32(0).u64(0).u64(0).bytes(tail).build();
  const first = await raw.call(GET_REGION_INFO, req(32, Buffer.alloc(0)));
  assert.equal(first.isError, false);
  const argsz = first.body.readUInt32LE(0);
  assert.equal(argsz, 80, '32 + the sparse cap of 2 areas');
  const full = await raw.call(GET_REGION_INFO, req(argsz, Buffer.alloc(argsz - 32)));
  assert.equal(full.isError, false, `errno ${full.errno}`);
  assert.equal(full.body.length, 80);
  assert.equal(full.fds.length, 1, 'the region fd');
  full.fds.forEach((f) => f.close());
  const dirty = Buffer.alloc(argsz - 32);
  dirty[5] = 1;
  const bad = await raw.call(GET_REGION_INFO, req(argsz, dirty));
  assert.equal(bad.errno, EINVAL, 'a non-zero byte after the struct');
  const long = await raw.call(GET_REGION_INFO, req(40, Buffer.alloc(16)));
  assert.equal(long.errno, EINVAL, 'more bytes than argsz');
});

test('migration: pre-copy is BAR1, stop-and-copy BAR1 then BAR0 (int64 LE); replies padded to the size asked', async (t) => {
  const { dev, client, vdev, log } = await serve(t);
  const img = pattern(7);
  await client.regionWrite(BAR1, 0, img);
  const t0 = nowSec() + 60;
  await client.regionWrite(BAR0, 0, i64(t0));
  assert.equal(dev.timerArmed, true);

  await vdev.setMigrationState(MigrationState.PRE_COPY);
  // Any piece size: 1000-byte reads until an empty one.
  const pre: Uint8Array[] = [];
  for (;;) {
    const d = await vdev.readMigrationData(1000);
    if (d.length === 0) break;
    pre.push(Uint8Array.from(d));
  }
  assert.deepEqual(pre.map((p) => p.length), [...Array(12).fill(1000), 288]);
  assert.deepEqual(Buffer.concat(pre), img, 'pre-copy data = BAR1');
  assert.equal(dev.timerArmed, true, 'the timer runs through PRE_COPY');
  // A BAR0 write in PRE_COPY is stored, not armed (samples/server arms only while RUNNING).
  await client.regionWrite(BAR0, 0, i64(t0 + 1));
  await client.regionWrite(BAR0, 0, i64(t0));

  await vdev.setMigrationState(MigrationState.STOP_COPY);
  assert.equal(dev.timerArmed, false, 'STOP_COPY cancels the timer');
  const stop = Buffer.from(await vdev.readAllMigrationData());
  assert.equal(stop.length, SERVER_SAMPLE_STATE_BYTES);
  assert.deepEqual(stop, Buffer.concat([img, i64(t0)]), 'stop-and-copy data = BAR1 then BAR0');
  await vdev.setMigrationState(MigrationState.STOP);
  assert.ok(log.includes('migration: transition PRE_COPY -> STOP_COPY'));

});

test('MIG_DATA_READ replies on the wire: 8 + the size asked, as samples/client reads them; the last piece padded', async (t) => {
  const raw = await serveRaw(t);
  const FEATURE = 16, MIG_DATA_READ = 17, SET = 1 << 17, F_MIG_STATE = 2;
  const t0 = nowSec() + 60;
  const REGION_WRITE = 10;
  assert.equal((await raw.call(REGION_WRITE, b().u64(0).u32(BAR0).u32(8).bytes(i64(t0)).build())).isError, false);
  const state = b().u32(16).u32(SET | F_MIG_STATE).u32(MigrationState.STOP_COPY).u32(0xffffffff).build();
  const r = await raw.call(FEATURE, state);
  assert.equal(r.isError, false);
  assert.deepEqual(r.body, state, 'SET echoes the request, as samples/client compares');
  const sizes: number[][] = [];
  for (let i = 0; i < 14; i++) {
    const m = await raw.call(MIG_DATA_READ, b().u32(8 + 1024).u32(1024).build());
    assert.equal(m.isError, false);
    sizes.push([m.body.length, m.body.readUInt32LE(0), m.body.readUInt32LE(4)]);
    if (i === 12) {
      assert.deepEqual(m.body.subarray(8, 16), Buffer.from(i64(t0)), 'BAR0 at the end');
      assert.ok(m.body.subarray(16).every((x) => x === 0), 'zeros after the data');
    }
  }
  assert.deepEqual(sizes, [...Array(12).fill([1032, 1032, 1024]), [1032, 16, 8], [1032, 8, 0]]);
});

test('migration: the destination takes the layout built by hand, arms the timer from BAR0 on RUNNING and interrupts', async (t) => {
  const { dev, client, vdev, log } = await serve(t);
  const img = pattern(3);
  const t0 = nowSec() + 2;
  const stream = Buffer.concat([img, i64(t0)]);
  await vdev.setMigrationState(MigrationState.RESUMING);
  for (let at = 0; at < stream.length; at += 1000) await vdev.writeMigrationData(stream.subarray(at, at + 1000));
  await vdev.setMigrationState(MigrationState.STOP);
  assert.deepEqual(Buffer.from(await client.regionRead(BAR1, 0, 0x3000)), img, 'BAR1 restored (read in STOP, as samples/client does)');
  assert.equal(dev.bar0, t0);
  assert.equal(dev.timerArmed, false, 'not while stopped');
  await vdev.setMigrationState(MigrationState.RUNNING);
  assert.equal(dev.timerArmed, true, 'RUNNING arms the timer from the migrated BAR0');
  assert.ok(log.some((l) => /arming timer to trigger in [12] seconds/.test(l)), log.join('\n'));
  const intx = EventFd.create();
  t.after(() => intx.close());
  await vdev.setEventFds(0, 0, [intx]);
  assert.equal(await Promise.race([intx.wait(), tick(5000).then(() => -1)]), 1, 'INTx at the migrated time');
  await dev.dmaDone;
  // No DMA windows: the sample would exit; this one logs it and goes on.
  assert.ok(log.some((l) => l.startsWith('do_dma_io: DIRECT failed: no DMA region in slot 1')), log.join('\n'));
});

test('migration: a short or long stream is refused', async (t) => {
  const { vdev } = await serve(t);
  await vdev.setMigrationState(MigrationState.RESUMING);
  await vdev.writeMigrationData(new Uint8Array(SERVER_SAMPLE_STATE_BYTES - 8));
  await rejectsWith(vdev.writeMigrationData(new Uint8Array(9)), EINVAL, 'past 0x3008 bytes');
  await rejectsWith(vdev.setMigrationState(MigrationState.STOP), EINVAL, 'RESUMING -> STOP with 0x3000 of 0x3008 bytes');
  assert.equal(await vdev.migrationState(), MigrationState.ERROR);
  await vdev.reset();
  assert.equal(await vdev.migrationState(), MigrationState.RUNNING, 'DEVICE_RESET leaves ERROR');
});

test('STOP cancels a running timer and RUNNING arms it again; reset logs the callback', async (t) => {
  const { dev, client, vdev, log } = await serve(t);
  await client.regionWrite(BAR0, 0, i64(nowSec() + 60));
  await vdev.setMigrationState(MigrationState.STOP);
  assert.equal(dev.timerArmed, false);
  await vdev.setMigrationState(MigrationState.RUNNING);
  assert.equal(dev.timerArmed, true);
  await vdev.reset();
  await until(() => log.includes('device reset callback'));
});
