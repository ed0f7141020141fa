/**
 * The sample device over a real socket, driven by the raw-bytes client:
 * every payload is built by hand from the spec's tables (never with the
 * codec under test), every reply is read field by field.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { VfioUserServer } from '../src/vfio-user/server.js';
import { sampleDevice, SAMPLE_ID, type SampleDevice } from '../src/devices/sample.js';
import { RawVfioUserClient, Bytes, type RawMessage } from '../src/testing/index.js';
import { SharedMemory, EventFd, UnixSocket, type Fd } from '../src/sys/index.js';
import { openFdCount, openFdsBackTo, tick, until } from './helpers/sys.js';

const EINVAL = 22;
const ENOENT = 2;
const b = (): Bytes => new Bytes();
const sock = (name: string): string => path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'vfu-sample-')), name);

// Commands, from the spec's table.
const DMA_MAP = 2, DMA_UNMAP = 3, GET_INFO = 4, GET_REGION_INFO = 5, GET_REGION_IO_FDS = 6, GET_IRQ_INFO = 7, SET_IRQS = 8;
const REGION_READ = 9, REGION_WRITE = 10, DMA_READ = 11, DMA_WRITE = 12, RESET = 13, FEATURE = 16;
const MIG_READ = 17, MIG_WRITE = 18;
// DEVICE_FEATURE flags and features.
const GET = 1 << 16, SET = 1 << 17;
const F_MIGRATION = 1, F_MIG_STATE = 2, F_LOG_START = 6, F_LOG_STOP = 7, F_LOG_REPORT = 8;
// Migration states.
const STOP = 1, RUNNING = 2, STOP_COPY = 3, RESUMING = 4, PRE_COPY = 6;
// SET_IRQS: ACTION_TRIGGER | DATA_EVENTFD.
const TRIGGER_EVENTFD = 0x24;
// Sample BAR0 registers (from the file header of src/devices/sample.ts).
const R = { ID: 0x00, SCRATCH: 0x04, DOORBELL: 0x08, IRQ_RAISE: 0x0c, SRC: 0x10, DST: 0x18, LEN: 0x20, CMD: 0x24, STATUS: 0x28, PATTERN: 0x2c, FILL: 0x30, ERRNO: 0x34, COUNT: 0x38 };
const DONE = 2, ERROR = 4;
const PAGE = 4096;

interface Env {
  dev: SampleDevice;
  server: VfioUserServer;
  client: RawVfioUserClient;
}

/** A sample device served on a fresh socket, VERSION done; everything is closed after the test. */
async function serve(t: TestContext, json?: string): Promise<Env & { version: RawMessage }> {
  const dev = sampleDevice();
  const server = VfioUserServer.listen(sock('s.sock'), { device: dev });
  const client = await RawVfioUserClient.connect(server.path);
  t.after(async () => {
    client.close();
    server.close();
    await tick(5);
    dev.dispose();
  });
  const version = await client.version(json);
  assert.equal(version.isError, false, `VERSION: errno ${version.errno}`);
  return { dev, server, client, version };
}

/** Closes the given things after the test. */
function closeAfter(t: TestContext, ...things: { close(): void }[]): void {
  t.after(() => things.forEach((x) => x.close()));
}

const ok = (r: RawMessage, what: string): RawMessage => {
  assert.equal(r.isError, false, `${what}: errno ${r.errno}`);
  return r;
};

/** A value of `size` bytes, little-endian. */
function le(value: number | bigint, size: number): Bytes {
  const out = b();
  if (size === 8) return out.u64(value);
  const v = Number(value);
  for (let i = 0; i < size; i++) out.u8(Math.floor(v / 2 ** (8 * i)));
  return out;
}

const regionReadMsg = (region: number, offset: number, count: number) => b().u64(offset).u32(region).u32(count).build();
const regionWriteMsg = (region: number, offset: number, data: ArrayLike<number>) => b().u64(offset).u32(region).u32(data.length).bytes(data).build();

async function regionRead(client: RawVfioUserClient, region: number, offset: number, count: number): Promise<Buffer> {
  const r = ok(await client.call(REGION_READ, regionReadMsg(region, offset, count)), `read ${region}@0x${offset.toString(16)}`);
  assert.equal(r.body.length, 16 + count);
  assert.equal(r.body.readBigUInt64LE(0), BigInt(offset));
  assert.equal(r.body.readUInt32LE(8), region);
  assert.equal(r.body.readUInt32LE(12), count);
  return r.body.subarray(16);
}

async function regionWrite(client: RawVfioUserClient, region: number, offset: number, data: ArrayLike<number>): Promise<void> {
  const r = ok(await client.call(REGION_WRITE, regionWriteMsg(region, offset, data)), `write ${region}@0x${offset.toString(16)}`);
  assert.equal(r.body.length, 16);
  assert.equal(r.body.readUInt32LE(12), data.length);
}

const writeReg = (client: RawVfioUserClient, offset: number, value: number | bigint, size = 4) =>
  regionWrite(client, 0, offset, le(value, size).build());

async function readReg(client: RawVfioUserClient, offset: number, size = 4): Promise<number> {
  const d = await regionRead(client, 0, offset, size);
  return size === 8 ? Number(d.readBigUInt64LE(0)) : d.readUIntLE(0, size);
}

const dmaMapMsg = (flags: number, offset: number, iova: number, size: number) => b().u32(32).u32(flags).u64(offset).u64(iova).u64(size).build();
const dmaUnmapMsg = (flags: number, iova: number, size: number) => b().u32(24).u32(flags).u64(iova).u64(size).build();
const featureMsg = (flags: number, data: Uint8Array = new Uint8Array(0), argsz = 8 + data.length) => b().u32(argsz).u32(flags).bytes(data).build();

async function setIrqEventFds(client: RawVfioUserClient, index: number, count: number): Promise<EventFd[]> {
  const efds = Array.from({ length: count }, () => EventFd.create());
  ok(await client.call(SET_IRQS, b().u32(20).u32(TRIGGER_EVENTFD).u32(index).u32(0).u32(count).build(), { fds: efds.map((e) => e.fd) }), `SET_IRQS ${index}`);
  return efds;
}

/** The eventfd's count at its next signal, or a rejection after `ms`. */
function signalled(e: EventFd, ms = 5000): Promise<number> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`eventfd not signalled within ${ms} ms`)), ms);
    e.wait().then(
      (n) => {
        clearTimeout(timer);
        resolve(n);
      },
      (err: unknown) => {
        clearTimeout(timer);
        reject(err as Error);
      },
    );
  });
}

async function setState(client: RawVfioUserClient, state: number): Promise<void> {
  ok(await client.call(FEATURE, featureMsg(SET | F_MIG_STATE, b().u32(state).u32(0xffffffff).build())), `set state ${state}`);
}

async function getState(client: RawVfioUserClient): Promise<number> {
  const r = ok(await client.call(FEATURE, featureMsg(GET | F_MIG_STATE, b().u32(0).u32(0).build())), 'get state');
  return r.body.readUInt32LE(8);
}

/** Programs a copy and starts it. */
async function startCopy(client: RawVfioUserClient, src: number, dst: number, len: number): Promise<void> {
  await writeReg(client, R.SRC, src, 8);
  await writeReg(client, R.DST, dst, 8);
  await writeReg(client, R.LEN, len);
  await writeReg(client, R.CMD, 1);
}

/** A client-side memory answering DMA_READ/DMA_WRITE for [base, base + memory.length). */
function serveDma(client: RawVfioUserClient, base: number, memory: Buffer, seen: string[]): void {
  client.onCommand = (m) => {
    const addr = Number(m.body.readBigUInt64LE(0));
    const count = Number(m.body.readBigUInt64LE(8));
    seen.push(`${m.cmd === DMA_READ ? 'R' : m.cmd === DMA_WRITE ? 'W' : `cmd${m.cmd}`} ${addr.toString(16)} ${count}`);
    const reply = b().u16(m.id).u16(m.cmd);
    if (m.cmd === DMA_READ) {
      const data = memory.subarray(addr - base, addr - base + count);
      client.sendBytes(reply.u32(16 + 16 + count).u32(1).u32(0).u64(addr).u64(count).bytes(data).build());
    } else if (m.cmd === DMA_WRITE) {
      m.body.subarray(16, 16 + count).copy(memory, addr - base);
      client.sendBytes(reply.u32(32).u32(1).u32(0).u64(addr).u64(count).build());
    }
  };
}

test('BAR2: the sparse mmap cap needs the full argsz; its one fd maps the memory the server reads and writes', async (t) => {
  const { dev, client } = await serve(t);
  const info = (argsz: number) => client.call(GET_REGION_INFO, b().u32(argsz).u32(0).u32(2).u32(0).u64(0).u64(0).build());
  const full = 32 + 8 + 8 + 2 * 16;

  const small = ok(await info(32), 'region info 32');
  assert.equal(small.body.length, 32);
  assert.equal(small.body.readUInt32LE(0), full, 'argsz = the size needed');
  assert.equal(small.body.readUInt32LE(4), 0x7, 'READ | WRITE | MMAP, no CAPS');
  assert.equal(small.body.readUInt32LE(8), 2);
  assert.equal(small.body.readBigUInt64LE(16), 0x10000n);
  assert.equal(small.fds.length, 0);

  const r = ok(await info(full), 'region info full');
  assert.equal(r.body.length, full);
  assert.equal(r.body.readUInt32LE(0), full);
  assert.equal(r.body.readUInt32LE(4), 0xf, 'READ | WRITE | MMAP | CAPS');
  assert.equal(r.body.readUInt32LE(12), 32, 'cap_offset');
  assert.equal(r.body.readBigUInt64LE(16), 0x10000n);
  const regionOffset = Number(r.body.readBigUInt64LE(24));
  // vfio_info_cap_header: id 1 (SPARSE_MMAP), version 1, next 0.
  assert.deepEqual([r.body.readUInt16LE(32), r.body.readUInt16LE(34), r.body.readUInt32LE(36)], [1, 1, 0]);
  assert.deepEqual([r.body.readUInt32LE(40), r.body.readUInt32LE(44)], [2, 0], 'nr_areas, reserved');
  const areas = [0, 1].map((i) => [Number(r.body.readBigUInt64LE(48 + i * 16)), Number(r.body.readBigUInt64LE(56 + i * 16))]);
  assert.deepEqual(areas, [[0, 0x4000], [0x8000, 0x8000]]);
  assert.equal(r.fds.length, 1, 'exactly one fd');

  const fd = r.fds[0]!;
  const low = SharedMemory.map(fd.dup(), { offset: regionOffset + areas[0]![0]!, size: areas[0]![1]! });
  const high = SharedMemory.map(fd, { offset: regionOffset + areas[1]![0]!, size: areas[1]![1]! });
  closeAfter(t, low, high);

  // Client writes through the mapping, the server reads them by message.
  low.bytes.set([1, 2, 3, 4], 0x100);
  high.bytes.set([0xa1, 0xa2], 0x7ffe);
  assert.deepEqual([...(await regionRead(client, 2, 0x100, 4))], [1, 2, 3, 4]);
  assert.deepEqual([...(await regionRead(client, 2, 0xfffe, 2))], [0xa1, 0xa2]);
  // And the reverse.
  await regionWrite(client, 2, 0x8010, [9, 8, 7, 6, 5, 4, 3, 2]);
  assert.deepEqual([...high.bytes.subarray(0x10, 0x18)], [9, 8, 7, 6, 5, 4, 3, 2]);
  await regionWrite(client, 2, 0x3ffc, [0x11, 0x22, 0x33, 0x44]);
  assert.deepEqual([...low.bytes.subarray(0x3ffc)], [0x11, 0x22, 0x33, 0x44]);
  // The hole is served by message only, and counted as trapped.
  assert.equal(dev.trapped, 0);
  await regionWrite(client, 2, 0x5000, [0x5a]);
  assert.deepEqual([...(await regionRead(client, 2, 0x5000, 1))], [0x5a]);
  assert.equal(dev.trapped, 2);
  assert.equal(dev.bar2[0x5000], 0x5a);
  assert.equal(dev.bar2[0x101], 2);
});

test('MSI-X: 8 vectors in the BAR the runtime chose; a doorbell write signals exactly that vector', async (t) => {
  const { client } = await serve(t);
  const irqInfo = async (index: number) => {
    const r = ok(await client.call(GET_IRQ_INFO, b().u32(16).u32(0).u32(index).u32(0).build()), `irq info ${index}`);
    return { argsz: r.body.readUInt32LE(0), flags: r.body.readUInt32LE(4), index: r.body.readUInt32LE(8), count: r.body.readUInt32LE(12) };
  };
  assert.deepEqual(await irqInfo(2), { argsz: 16, flags: 0x1 | 0x8, index: 2, count: 8 }, 'EVENTFD | NORESIZE');
  assert.equal((await irqInfo(0)).count, 1);
  assert.equal((await irqInfo(1)).count, 0);
  assert.equal((await irqInfo(3)).count, 1);
  assert.equal((await irqInfo(4)).count, 1);

  // Walk the capability list by hand.
  const status = (await regionRead(client, 7, 0x06, 2)).readUInt16LE(0);
  assert.ok(status & 0x10, 'STATUS.CAP_LIST');
  let ptr = (await regionRead(client, 7, 0x34, 1))[0]! & 0xfc;
  const ids: number[] = [];
  let msix = 0;
  for (let guard = 0; ptr !== 0 && guard < 48; guard++) {
    const [id, next] = [...(await regionRead(client, 7, ptr, 2))];
    ids.push(id!);
    if (id === 0x11) msix = ptr;
    ptr = next! & 0xfc;
  }
  assert.ok(ids.includes(0x01) && ids.includes(0x10) && ids.includes(0x09), `PM, PCIe and vendor caps too: ${ids}`);
  assert.ok(msix !== 0, 'an MSI-X capability');
  const cap = await regionRead(client, 7, msix, 12);
  assert.equal((cap.readUInt16LE(2) & 0x7ff) + 1, 8, 'table size');
  const table = cap.readUInt32LE(4);
  const pba = cap.readUInt32LE(8);
  const bir = table & 7;
  assert.equal(pba & 7, bir);
  // BAR0 is the registers, BAR2/3 the 64-bit memory BAR: the first free slot is BAR1.
  assert.equal(bir, 1);
  assert.equal(table & ~7, 0);
  assert.equal(pba & ~7, 8 * 16);
  const ri = ok(await client.call(GET_REGION_INFO, b().u32(32).u32(0).u32(bir).u32(0).u64(0).u64(0).build()), 'msix bar info');
  assert.equal(ri.body.readUInt32LE(4), 0x3, 'READ | WRITE');
  assert.ok(ri.body.readBigUInt64LE(16) >= BigInt(8 * 16 + 8));
  // The emulated table reads: every vector starts masked (vector control bit 0).
  const control7 = await regionRead(client, bir, 7 * 16 + 12, 4);
  assert.equal(control7.readUInt32LE(0) & 1, 1);

  const vectors = await setIrqEventFds(client, 2, 8);
  closeAfter(t, ...vectors);
  await writeReg(client, R.DOORBELL, 5);
  assert.equal(await signalled(vectors[5]!), 1);
  await writeReg(client, R.DOORBELL, 2, 1); // a byte write works too
  assert.equal(await signalled(vectors[2]!), 1);
  await writeReg(client, R.DOORBELL, 8); // no such vector: ignored
  await tick(10);
  vectors.forEach((v, i) => assert.equal(v.read(), 0, `vector ${i} quiet`));

  // IRQ_RAISE: INTx, ERR and REQ.
  const [intx] = await setIrqEventFds(client, 0, 1);
  const [err] = await setIrqEventFds(client, 3, 1);
  const [req] = await setIrqEventFds(client, 4, 1);
  closeAfter(t, intx!, err!, req!);
  await writeReg(client, R.IRQ_RAISE, 0b111);
  assert.equal(await signalled(intx!), 1);
  assert.equal(await signalled(err!), 1);
  assert.equal(await signalled(req!), 1);
});

test('DMA engine through a memfd-mapped window: a 10 000-byte copy and a fill through a direct view', async (t) => {
  const { dev, client } = await serve(t);
  const vectors = await setIrqEventFds(client, 2, 8);
  closeAfter(t, ...vectors);
  const guest = SharedMemory.create(0x10000);
  closeAfter(t, guest);
  for (let i = 0; i < 0x8000; i++) guest.bytes[i] = (i * 7 + 3) & 0xff;
  const base = 0x100000;
  ok(await client.call(DMA_MAP, dmaMapMsg(3, 0, base, 0x10000), { fds: [guest.fd] }), 'map');
  assert.deepEqual(dev.windows.map((w) => [w.iova, w.size, w.mapped]), [[base, 0x10000, true]]);

  await startCopy(client, base + 0x10, base + 0x8000, 10000);
  assert.equal(await signalled(vectors[0]!), 1, 'vector 0 on completion');
  assert.equal(await readReg(client, R.STATUS), DONE);
  assert.equal(await readReg(client, R.COUNT), 1);
  assert.equal(await readReg(client, R.ERRNO), 0);
  assert.deepEqual(guest.bytes.subarray(0x8000, 0x8000 + 10000), guest.bytes.subarray(0x10, 0x10 + 10000));
  assert.equal(guest.bytes[0x8000 + 10000], 0, 'not one byte more');
  for (let i = 1; i < 8; i++) assert.equal(vectors[i]!.read(), 0);

  // DONE is write-1-to-clear; then a fill, written through a view of the window.
  await writeReg(client, R.STATUS, DONE);
  assert.equal(await readReg(client, R.STATUS), 0);
  await writeReg(client, R.PATTERN, 0xdeadbeef);
  await writeReg(client, R.DST, base + 0xc001, 8);
  await writeReg(client, R.LEN, 6);
  await writeReg(client, R.FILL, 1);
  assert.equal(await signalled(vectors[0]!), 1);
  assert.deepEqual([...guest.bytes.subarray(0xc000, 0xc008)], [0, 0xef, 0xbe, 0xad, 0xde, 0xef, 0xbe, 0]);
  assert.equal(await readReg(client, R.COUNT), 2);
});

test('DMA engine through a window without fd: DMA_READ/DMA_WRITE messages chunked by max_data_xfer_size 4096', async (t) => {
  const { dev, client } = await serve(t, '{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":4096}}');
  const vectors = await setIrqEventFds(client, 2, 8);
  closeAfter(t, ...vectors);
  const base = 0x200000;
  const memory = Buffer.alloc(0x8000);
  for (let i = 0; i < memory.length; i++) memory[i] = (i * 13 + 1) & 0xff;
  const seen: string[] = [];
  serveDma(client, base, memory, seen);
  ok(await client.call(DMA_MAP, dmaMapMsg(3, 0, base, 0x8000)), 'map without fd');
  assert.equal(dev.windows[0]!.mapped, false);

  await startCopy(client, base + 0x10, base + 0x4000, 10000);
  assert.equal(await signalled(vectors[0]!), 1);
  assert.equal(await readReg(client, R.STATUS), DONE);
  assert.deepEqual(seen, ['R 200010 4096', 'R 201010 4096', 'R 202010 1808', 'W 204000 4096', 'W 205000 4096', 'W 206000 1808']);
  assert.deepEqual(memory.subarray(0x4000, 0x4000 + 10000), memory.subarray(0x10, 0x10 + 10000));

  // A fill falls back to DMA_WRITE when there is no view.
  seen.length = 0;
  await writeReg(client, R.PATTERN, 0x04030201);
  await writeReg(client, R.DST, base + 0x7000, 8);
  await writeReg(client, R.LEN, 5);
  await writeReg(client, R.FILL, 1);
  assert.equal(await signalled(vectors[0]!), 1);
  assert.deepEqual(seen, ['W 207000 5']);
  assert.deepEqual([...memory.subarray(0x7000, 0x7006)], [1, 2, 3, 4, 1, (0x7005 * 13 + 1) & 0xff]);
});

test('migration end to end: PRE_COPY, STOP_COPY, then RESUMING on a second server restores registers and memory', async (t) => {
  const a = await serve(t);
  const b2 = await serve(t);
  // The MIGRATION feature: STOP_COPY | PRE_COPY.
  const mf = ok(await a.client.call(FEATURE, featureMsg(GET | F_MIGRATION, new Uint8Array(0), 16)), 'migration feature');
  assert.equal(mf.body.readBigUInt64LE(8), 0x5n);

  await writeReg(a.client, R.SCRATCH, 0xcafef00d);
  await writeReg(a.client, R.SRC, 0x1122334455667788n, 8);
  await writeReg(a.client, R.DST, 0x99aabbccn, 8);
  await writeReg(a.client, R.LEN, 77);
  await writeReg(a.client, R.PATTERN, 0xa5a55a5a);
  await regionWrite(a.client, 2, 0x0, [1, 2, 3, 4, 5, 6, 7, 8]);
  await regionWrite(a.client, 2, 0x5000, [0x50, 0x51]); // the hole
  await regionWrite(a.client, 2, 0xfff8, [0xf8, 0xf9, 0xfa, 0xfb, 0xfc, 0xfd, 0xfe, 0xff]);

  const drain = async (client: RawVfioUserClient, chunk: number): Promise<Buffer> => {
    const parts: Buffer[] = [];
    for (;;) {
      const r = ok(await client.call(MIG_READ, b().u32(8 + chunk).u32(chunk).build()), 'MIG_DATA_READ');
      const size = r.body.readUInt32LE(4);
      assert.equal(r.body.readUInt32LE(0), 8 + size);
      parts.push(Buffer.from(r.body.subarray(8, 8 + size)));
      if (size < chunk) return Buffer.concat(parts);
    }
  };

  await setState(a.client, PRE_COPY);
  assert.equal(await getState(a.client), PRE_COPY);
  const pre = await drain(a.client, 4096);
  // One record: u32 length, then the device's pre-copy state (16-byte header + 64 KiB).
  assert.equal(pre.length, 4 + 16 + 0x10000);
  assert.equal(pre.readUInt32LE(0), 16 + 0x10000);
  // Still running: the device changes after its pre-copy data was taken.
  await writeReg(a.client, R.SCRATCH, 0x600dcafe);
  await regionWrite(a.client, 2, 0x9000, [0x90, 0x91, 0x92]);

  await setState(a.client, STOP_COPY);
  assert.equal((await a.client.call(REGION_READ, regionReadMsg(0, 0, 4))).errno, EINVAL, 'no region access in STOP_COPY');
  const rest = await drain(a.client, 3000);
  assert.equal(rest.length, 4 + 16 + 0x40 + 0x10000);
  await setState(a.client, STOP);
  assert.deepEqual(a.dev.arcs, ['RUNNING->PRE_COPY', 'PRE_COPY->STOP_COPY', 'STOP_COPY->STOP']);

  // Restore: STOP -> RESUMING, write everything in chunks that cut across records, -> STOP -> RUNNING.
  assert.equal((await b2.client.call(MIG_WRITE, b().u32(9).u32(1).u8(0).build())).errno, EINVAL, 'not RESUMING');
  await setState(b2.client, STOP);
  await setState(b2.client, RESUMING);
  const stream = Buffer.concat([pre, rest]);
  for (let at = 0; at < stream.length; at += 5000) {
    const c = stream.subarray(at, at + 5000);
    ok(await b2.client.call(MIG_WRITE, b().u32(8 + c.length).u32(c.length).bytes(c).build()), `MIG_DATA_WRITE @${at}`);
  }
  await setState(b2.client, STOP);
  await setState(b2.client, RUNNING);
  assert.equal(await getState(b2.client), RUNNING);
  assert.deepEqual(b2.dev.arcs, ['RUNNING->STOP', 'STOP->RESUMING', 'RESUMING->STOP', 'STOP->RUNNING']);
  assert.deepEqual(b2.dev.loaded, ['pre-copy', 'stop-copy']);

  assert.deepEqual(b2.dev.registerBytes, a.dev.registerBytes);
  assert.deepEqual(b2.dev.registers, a.dev.registers);
  assert.ok(Buffer.from(b2.dev.bar2).equals(Buffer.from(a.dev.bar2)), 'BAR2 memory equal');
  // Seen over the wire too.
  assert.equal(await readReg(b2.client, R.SCRATCH), 0x600dcafe);
  assert.equal((await regionRead(b2.client, 0, R.SRC, 8)).readBigUInt64LE(0), 0x1122334455667788n);
  assert.equal(await readReg(b2.client, R.PATTERN), 0xa5a55a5a);
  assert.deepEqual([...(await regionRead(b2.client, 2, 0x9000, 3))], [0x90, 0x91, 0x92]);
  assert.deepEqual([...(await regionRead(b2.client, 2, 0x5000, 2))], [0x50, 0x51]);
  assert.deepEqual([...(await regionRead(b2.client, 2, 0xfff8, 8))], [0xf8, 0xf9, 0xfa, 0xfb, 0xfc, 0xfd, 0xfe, 0xff]);
});

test('dirty logging: a DMA copy into pages 2..4 of a 16-page window dirties exactly those pages', async (t) => {
  const { client } = await serve(t);
  const vectors = await setIrqEventFds(client, 2, 8);
  closeAfter(t, ...vectors);
  const guest = SharedMemory.create(16 * PAGE);
  closeAfter(t, guest);
  const base = 0x300000;
  ok(await client.call(DMA_MAP, dmaMapMsg(3, 0, base, 16 * PAGE), { fds: [guest.fd] }), 'map');
  guest.bytes.fill(0x3c, 10 * PAGE, 13 * PAGE);

  const start = b().u64(PAGE).u32(0).u32(0).build();
  const st = ok(await client.call(FEATURE, featureMsg(SET | F_LOG_START, start)), 'logging start');
  assert.deepEqual([...st.body.subarray(8)], [...start], 'SET echoes its data');

  await startCopy(client, base + 10 * PAGE, base + 2 * PAGE, 3 * PAGE);
  assert.equal(await signalled(vectors[0]!), 1);
  assert.equal(guest.bytes[2 * PAGE], 0x3c);
  assert.equal(guest.bytes[5 * PAGE], 0);

  const report = async (): Promise<bigint> => {
    const req = b().u64(base).u64(16 * PAGE).u64(PAGE).build();
    const r = ok(await client.call(FEATURE, featureMsg(GET | F_LOG_REPORT, req, 8 + 24 + 8)), 'report');
    assert.equal(r.body.readUInt32LE(0), 8 + 24 + 8);
    assert.equal(r.body.length, 8 + 24 + 8);
    assert.deepEqual([...r.body.subarray(8, 32)], [...req]);
    return r.body.readBigUInt64LE(32);
  };
  assert.equal(await report(), (1n << 2n) | (1n << 3n) | (1n << 4n));
  assert.equal(await report(), 0n, 'a report clears what it reported');
  ok(await client.call(FEATURE, featureMsg(SET | F_LOG_STOP, start)), 'logging stop');
  assert.equal((await client.call(FEATURE, featureMsg(GET | F_LOG_REPORT, b().u64(base).u64(16 * PAGE).u64(PAGE).build(), 40))).errno, EINVAL, 'no report once stopped');
});

test('DEVICE_RESET restores the power-on register values', async (t) => {
  const { dev, client } = await serve(t);
  const vectors = await setIrqEventFds(client, 2, 8);
  closeAfter(t, ...vectors);
  const guest = SharedMemory.create(PAGE);
  closeAfter(t, guest);
  ok(await client.call(DMA_MAP, dmaMapMsg(3, 0, 0x400000, PAGE), { fds: [guest.fd] }), 'map');
  await writeReg(client, R.SCRATCH, 0x12345678);
  await writeReg(client, R.PATTERN, 0x01010101);
  await writeReg(client, R.DST, 0x400000, 8);
  await writeReg(client, R.LEN, 16);
  await writeReg(client, R.FILL, 1);
  assert.equal(await signalled(vectors[0]!), 1);
  assert.equal(await readReg(client, R.STATUS), DONE);
  assert.equal(await readReg(client, R.COUNT), 1);
  await writeReg(client, R.ID, 0, 4); // read-only: ignored
  assert.equal(await readReg(client, R.ID), SAMPLE_ID);

  const r = ok(await client.call(RESET), 'reset');
  assert.equal(r.body.length, 0);
  assert.equal(dev.resets, 1);
  const regs: bigint[] = [];
  for (let off = 0; off < 0x40; off += 8) regs.push((await regionRead(client, 0, off, 8)).readBigUInt64LE(0));
  assert.deepEqual(regs, [BigInt(SAMPLE_ID), 0n, 0n, 0n, 0n, 0n, 0n, 0n]);
  assert.equal(await readReg(client, R.SCRATCH), 0);
  assert.equal(dev.registers.dmaCount, 0);
  // The device still works after a reset.
  await writeReg(client, R.DOORBELL, 3);
  assert.equal(await signalled(vectors[3]!), 1);
});

test('DMA_UNMAP ALL unmaps every window (dmaUnmapped for each); ALL with an address is EINVAL', async (t) => {
  const { dev, client } = await serve(t);
  const [err] = await setIrqEventFds(client, 3, 1);
  closeAfter(t, err!);
  const g1 = SharedMemory.create(2 * PAGE);
  const g2 = SharedMemory.create(PAGE);
  closeAfter(t, g1, g2);
  ok(await client.call(DMA_MAP, dmaMapMsg(3, 0, 0x10000, 2 * PAGE), { fds: [g1.fd] }), 'map 1');
  ok(await client.call(DMA_MAP, dmaMapMsg(1, 0, 0x20000, PAGE), { fds: [g2.fd] }), 'map 2');
  ok(await client.call(DMA_MAP, dmaMapMsg(3, 0, 0x40000, 4 * PAGE)), 'map 3 (no fd)');
  assert.deepEqual(dev.windows.map((w) => [w.iova, w.size, w.readable, w.writable, w.mapped]), [
    [0x10000, 2 * PAGE, true, true, true],
    [0x20000, PAGE, true, false, true],
    [0x40000, 4 * PAGE, true, true, false],
  ]);

  const bad = await client.call(DMA_UNMAP, dmaUnmapMsg(2, 0x10000, 0));
  assert.equal(bad.isError, true);
  assert.equal(bad.errno, EINVAL);
  assert.equal(dev.windows.length, 3, 'nothing unmapped by the refused request');

  const u = ok(await client.call(DMA_UNMAP, dmaUnmapMsg(2, 0, 0)), 'unmap all');
  assert.deepEqual([u.body.readUInt32LE(0), u.body.readUInt32LE(4), u.body.readBigUInt64LE(8), u.body.readBigUInt64LE(16)], [24, 2, 0n, 0n]);
  assert.deepEqual(dev.unmapped.map((w) => w.iova).sort((x, y) => x - y), [0x10000, 0x20000, 0x40000]);
  assert.equal(dev.windows.length, 0);

  // The engine now faults: ERROR, errno ENOENT, and the ERR interrupt.
  await writeReg(client, R.PATTERN, 0xffffffff);
  await writeReg(client, R.DST, 0x10000, 8);
  await writeReg(client, R.LEN, 4);
  await writeReg(client, R.FILL, 1);
  assert.equal(await signalled(err!), 1);
  assert.equal(await readReg(client, R.STATUS), ERROR);
  assert.equal(await readReg(client, R.ERRNO), ENOENT);
  assert.equal(g1.bytes[0], 0);
});

test('GET_REGION_IO_FDS: the doorbell ioeventfd, its 40-byte entry and one fd; with argsz 16 only the count', async (t) => {
  const { client } = await serve(t);
  const vectors = await setIrqEventFds(client, 2, 8);
  closeAfter(t, ...vectors);
  const ioFds = (argsz: number, index: number) => client.call(GET_REGION_IO_FDS, b().u32(argsz).u32(0).u32(index).u32(0).build());

  const r = ok(await ioFds(128, 0), 'io fds');
  assert.equal(r.body.length, 16 + 40);
  assert.deepEqual([r.body.readUInt32LE(0), r.body.readUInt32LE(4), r.body.readUInt32LE(8), r.body.readUInt32LE(12)], [56, 0, 0, 1]);
  const e = r.body.subarray(16);
  assert.equal(e.readBigUInt64LE(0), 0x08n, 'offset: the doorbell');
  assert.equal(e.readBigUInt64LE(8), 4n, 'size');
  assert.equal(e.readUInt32LE(16), 0, 'fd_index');
  assert.equal(e.readUInt32LE(20), 0, 'type IOEVENTFD');
  assert.equal(e.readUInt32LE(24), 1, 'flags: KVM_IOEVENTFD_FLAG_DATAMATCH');
  assert.equal(e.readUInt32LE(28), 0, 'padding');
  assert.equal(e.readBigUInt64LE(32), 1n, 'datamatch: vector 1');
  assert.equal(r.fds.length, 1);
  // What KVM would do on a matching guest write: signal it. The device triggers vector 1.
  const io = EventFd.from(r.fds[0]!);
  closeAfter(t, io);
  io.signal();
  assert.equal(await signalled(vectors[1]!), 1);
  assert.equal(vectors[0]!.read(), 0);

  const small = ok(await ioFds(16, 0), 'io fds, argsz 16');
  assert.equal(small.body.length, 16);
  assert.deepEqual([small.body.readUInt32LE(0), small.body.readUInt32LE(4), small.body.readUInt32LE(8), small.body.readUInt32LE(12)], [56, 0, 0, 1]);
  assert.equal(small.fds.length, 0);

  const none = ok(await ioFds(128, 2), 'io fds of BAR2');
  assert.deepEqual([none.body.length, none.body.readUInt32LE(0), none.body.readUInt32LE(12)], [16, 16, 0]);
  assert.equal(none.fds.length, 0);
});

test('twin socket: DMA requests from the device travel on the twin socket, not the main one', async (t) => {
  const { client, version } = await serve(t, '{"capabilities":{"max_msg_fds":8,"twin_socket":{"supported":true}}}');
  const json = version.body.subarray(4, version.body.length - 1).toString();
  assert.equal(version.body[version.body.length - 1], 0);
  assert.deepEqual(JSON.parse(json).capabilities.twin_socket, { supported: true, fd_index: 0 });
  assert.equal(version.fds.length, 1);
  const twin = new RawVfioUserClient(new UnixSocket(version.fds[0]!));
  closeAfter(t, twin);

  const onMain: string[] = [];
  client.onCommand = (m) => onMain.push(`cmd ${m.cmd}`);
  const base = 0x500000;
  const memory = Buffer.alloc(4 * PAGE);
  for (let i = 0; i < PAGE; i++) memory[i] = (i * 3) & 0xff;
  const seen: string[] = [];
  serveDma(twin, base, memory, seen);

  const vectors = await setIrqEventFds(client, 2, 8);
  closeAfter(t, ...vectors);
  ok(await client.call(DMA_MAP, dmaMapMsg(3, 0, base, 4 * PAGE)), 'map without fd');
  await startCopy(client, base, base + 2 * PAGE, 1000);
  assert.equal(await signalled(vectors[0]!), 1);
  assert.equal(await readReg(client, R.STATUS), DONE);
  assert.deepEqual(seen, [`R ${base.toString(16)} 1000`, `W ${(base + 2 * PAGE).toString(16)} 1000`]);
  assert.deepEqual(onMain, [], 'nothing from the server on the main socket but replies');
  assert.deepEqual(memory.subarray(2 * PAGE, 2 * PAGE + 1000), memory.subarray(0, 1000));
});

test('the other regions: ROM, the device-specific region with its TYPE cap, BAR0 access rules', async (t) => {
  const { client } = await serve(t);
  const info = ok(await client.call(GET_INFO, b().u32(16).u32(0).u32(0).u32(0).build()), 'device info');
  assert.deepEqual([info.body.readUInt32LE(4), info.body.readUInt32LE(8), info.body.readUInt32LE(12)], [3, 10, 5]);

  const region = (index: number, argsz = 32) => client.call(GET_REGION_INFO, b().u32(argsz).u32(0).u32(index).u32(0).u64(0).u64(0).build());
  const rom = ok(await region(6), 'rom info');
  assert.deepEqual([rom.body.readUInt32LE(4), Number(rom.body.readBigUInt64LE(16))], [1, 0x800], 'ROM: READ only, 2 KiB');
  assert.deepEqual([...(await regionRead(client, 6, 0, 2))], [0x55, 0xaa]);
  assert.equal((await client.call(REGION_WRITE, regionWriteMsg(6, 0, [0]))).errno, EINVAL, 'ROM is not writable');

  const r9 = ok(await region(9, 48), 'region 9 info');
  assert.equal(r9.body.readUInt32LE(0), 48);
  assert.equal(r9.body.readUInt32LE(4), 0x1 | 0x8, 'READ | CAPS');
  assert.equal(r9.body.readUInt32LE(12), 32);
  assert.deepEqual([r9.body.readUInt16LE(32), r9.body.readUInt16LE(34), r9.body.readUInt32LE(36)], [2, 1, 0], 'CAP_TYPE v1');
  assert.deepEqual([r9.body.readUInt32LE(40), r9.body.readUInt32LE(44)], [0x80001234, 1]);
  assert.equal((await regionRead(client, 9, 0, 7)).toString(), 'vdevkit');
  const bar3 = ok(await region(3), 'BAR3 (upper half of BAR2)');
  assert.deepEqual([bar3.body.readUInt32LE(4), Number(bar3.body.readBigUInt64LE(16))], [0, 0]);
  // The config space shows BAR2 as 64-bit prefetchable memory.
  assert.equal((await regionRead(client, 7, 0x18, 4)).readUInt32LE(0) & 0xf, 0xc);

  // BAR0: 1, 2, 4 and 8-byte aligned accesses; others are EINVAL.
  await writeReg(client, R.SCRATCH + 1, 0xab, 1);
  await writeReg(client, R.SCRATCH + 2, 0xcdef, 2);
  assert.equal(await readReg(client, R.SCRATCH), 0xcdefab00);
  await writeReg(client, R.SRC, 0x0102030405060708n, 8);
  assert.equal((await regionRead(client, 0, R.SRC + 4, 4)).readUInt32LE(0), 0x01020304);
  assert.equal((await regionRead(client, 0, 0, 8)).readBigUInt64LE(0), (0xcdefab00n << 32n) | BigInt(SAMPLE_ID));
  assert.equal((await client.call(REGION_READ, regionReadMsg(0, 2, 4))).errno, EINVAL, 'unaligned');
  assert.equal((await client.call(REGION_READ, regionReadMsg(0, 0, 3))).errno, EINVAL, '3 bytes');
  assert.equal((await client.call(REGION_WRITE, regionWriteMsg(0, 6, [1, 2, 3, 4]))).errno, EINVAL, 'unaligned write');
  assert.equal(await readReg(client, R.DOORBELL), 0, 'write-only registers read 0');
  assert.equal(await readReg(client, 0x800), 0, 'beyond the register file');
  await writeReg(client, 0x800, 0xffffffff);
});

test('a whole session leaves no fd behind once everything is closed', async () => {
  await tick(20);
  const before = openFdCount();
  const dev = sampleDevice();
  const server = VfioUserServer.listen(sock('leak.sock'), { device: dev });
  const client = await RawVfioUserClient.connect(server.path);
  const v = await client.version('{"capabilities":{"twin_socket":{"supported":true}}}');
  const twin = new RawVfioUserClient(new UnixSocket(v.fds[0]!));
  const vectors = await setIrqEventFds(client, 2, 8);
  const guest = SharedMemory.create(PAGE);
  ok(await client.call(DMA_MAP, dmaMapMsg(3, 0, 0x10000, PAGE), { fds: [guest.fd] }), 'map');
  const ri = await client.call(GET_REGION_INFO, b().u32(128).u32(0).u32(2).u32(0).u64(0).u64(0).build());
  const io = await client.call(GET_REGION_IO_FDS, b().u32(128).u32(0).u32(0).u32(0).build());
  const received: Fd[] = [...ri.fds, ...io.fds];
  assert.equal(received.length, 2);
  await writeReg(client, R.DOORBELL, 0);
  assert.equal(await signalled(vectors[0]!), 1);
  received.forEach((f) => f.close());
  vectors.forEach((e) => e.close());
  guest.close();
  twin.close();
  client.close();
  server.close();
  await tick(30);
  dev.dispose();
  await openFdsBackTo(before, 'fds left after the session');
  assert.equal(openFdCount(), before);
});

test('a refused migration stream leaves the device in ERROR; DEVICE_RESET brings it back to RUNNING, working', async (t) => {
  const { dev, client } = await serve(t);
  await setState(client, RESUMING); // RUNNING -> STOP -> RESUMING
  // One record whose payload is not the sample's: u32 length, 16 bytes of garbage.
  const bad = b().u32(16).u32(0x12345678).u32(2).u32(0x40).u32(0x10000).build();
  ok(await client.call(MIG_WRITE, b().u32(8 + bad.length).u32(bad.length).bytes(bad).build()), 'write');
  const r = await client.call(FEATURE, featureMsg(SET | F_MIG_STATE, b().u32(STOP).u32(0xffffffff).build()));
  assert.equal(r.isError, true);
  assert.equal(r.errno, EINVAL);
  assert.equal(await getState(client), 0, 'ERROR');
  assert.equal((await client.call(FEATURE, featureMsg(SET | F_MIG_STATE, b().u32(RUNNING).u32(0).build()))).errno, EINVAL, 'only a reset leaves ERROR');
  assert.deepEqual(dev.loaded, []);
  ok(await client.call(RESET), 'reset');
  assert.equal(await getState(client), RUNNING);
  const vectors = await setIrqEventFds(client, 2, 8);
  closeAfter(t, ...vectors);
  await writeReg(client, R.DOORBELL, 6);
  assert.equal(await signalled(vectors[6]!), 1, 'the device runs again');
});

test('PRE_COPY abandoned for RUNNING drops its data; a new PRE_COPY starts afresh', async (t) => {
  const { dev, client } = await serve(t);
  await setState(client, PRE_COPY);
  const first = ok(await client.call(MIG_READ, b().u32(8 + 100).u32(100).build()), 'partial read');
  assert.equal(first.body.readUInt32LE(4), 100);
  await setState(client, RUNNING);
  await regionWrite(client, 2, 0x20, [0x77]);
  await setState(client, PRE_COPY);
  const parts: Buffer[] = [];
  for (;;) {
    const r = ok(await client.call(MIG_READ, b().u32(8 + 65536).u32(65536).build()), 'read');
    const size = r.body.readUInt32LE(4);
    parts.push(Buffer.from(r.body.subarray(8, 8 + size)));
    if (size < 65536) break;
  }
  const data = Buffer.concat(parts);
  assert.equal(data.length, 4 + 16 + 0x10000, 'one record, from the start');
  assert.equal(data.readUInt32LE(0), 16 + 0x10000);
  assert.equal(data[4 + 16 + 0x20], 0x77, 'taken at the second PRE_COPY');
  await setState(client, RUNNING);
  assert.deepEqual(dev.arcs, ['RUNNING->PRE_COPY', 'PRE_COPY->RUNNING', 'RUNNING->PRE_COPY', 'PRE_COPY->RUNNING']);
});

test('INTx: SET_IRQS MASK reaches irqMasked; a raise while masked is delivered at UNMASK', async (t) => {
  const { dev, client } = await serve(t);
  const [intx] = await setIrqEventFds(client, 0, 1);
  closeAfter(t, intx!);
  ok(await client.call(SET_IRQS, b().u32(20).u32(0x08 | 0x01).u32(0).u32(0).u32(1).build()), 'mask'); // ACTION_MASK | DATA_NONE
  await writeReg(client, R.IRQ_RAISE, 1);
  await tick(10);
  assert.equal(intx!.read(), 0, 'masked: pending');
  ok(await client.call(SET_IRQS, b().u32(20).u32(0x10 | 0x01).u32(0).u32(0).u32(1).build()), 'unmask'); // ACTION_UNMASK | DATA_NONE
  assert.equal(await signalled(intx!), 1);
  assert.deepEqual(dev.maskEvents, ['intx 0 masked', 'intx 0 unmasked']);
});

test('the device state survives a reconnect; the windows of the first client are unmapped when it leaves', async (t) => {
  const dev = sampleDevice();
  const server = VfioUserServer.listen(sock('re.sock'), { device: dev });
  t.after(async () => {
    server.close();
    await tick(5);
    dev.dispose();
  });
  const first = await RawVfioUserClient.connect(server.path);
  ok(await first.version(), 'version');
  assert.equal(dev.attached, true);
  const guest = SharedMemory.create(PAGE);
  closeAfter(t, guest);
  ok(await first.call(DMA_MAP, dmaMapMsg(3, 0, 0x10000, PAGE), { fds: [guest.fd] }), 'map');
  await writeReg(first, R.SCRATCH, 0x5eed);
  await regionWrite(first, 2, 0x40, [1, 2, 3]);
  first.close();
  await until(() => !dev.attached, 5000, 'the server detaches the device once the first client left');
  assert.equal(dev.attached, false);
  assert.deepEqual(dev.unmapped.map((w) => w.iova), [0x10000]);
  assert.equal(dev.windows.length, 0);

  const second = await RawVfioUserClient.connect(server.path);
  closeAfter(t, second);
  ok(await second.version(), 'version again');
  assert.equal(await readReg(second, R.SCRATCH), 0x5eed);
  assert.deepEqual([...(await regionRead(second, 2, 0x40, 3))], [1, 2, 3]);
});

test(
  'DMA_UNMAP of a message-based window during a device DMA: no DMA request for it after the unmap',
  async (t) => {
    const { dev, client } = await serve(t, '{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":4096}}');
    const [err] = await setIrqEventFds(client, 3, 1);
    const vectors = await setIrqEventFds(client, 2, 8);
    closeAfter(t, err!, ...vectors);
    const base = 0x200000;
    const seen: string[] = [];
    const late: string[] = [];
    let first = true;
    client.onCommand = (m) => {
      const addr = Number(m.body.readBigUInt64LE(0));
      const count = Number(m.body.readBigUInt64LE(8));
      const line = `${m.cmd === DMA_READ ? 'R' : 'W'} ${addr.toString(16)} ${count}`;
      seen.push(line);
      // The server waits for our reply to each request, so one arriving once the
      // window was unmapped (dmaUnmapped called) was sent after the unmap.
      if (dev.unmapped.length > 0 && addr >= base && addr < base + 4 * PAGE) late.push(line);
      if (first) {
        first = false;
        client.send(DMA_UNMAP, dmaUnmapMsg(0, base, 4 * PAGE)); // its reply is queued for later
      }
      const reply = b().u16(m.id).u16(m.cmd);
      if (m.cmd === DMA_READ) client.sendBytes(reply.u32(32 + count).u32(1).u32(0).u64(addr).u64(count).zeros(count).build());
      else client.sendBytes(reply.u32(32).u32(1).u32(0).u64(addr).u64(count).build());
    };
    ok(await client.call(DMA_MAP, dmaMapMsg(3, 0, base, 4 * PAGE)), 'map without fd');
    await writeReg(client, R.SRC, base, 8);
    await writeReg(client, R.DST, base + 3 * PAGE, 8);
    await writeReg(client, R.LEN, 3 * PAGE);
    await writeReg(client, R.CMD, 1);
    const unmapReply = await client.next();
    assert.equal(unmapReply.cmd, DMA_UNMAP);
    assert.equal(unmapReply.isError, false);
    await Promise.race([signalled(err!), signalled(vectors[0]!)]);
    await dev.idle();
    assert.deepEqual(late, [], `requests after the unmap: ${seen.join(', ')}`);
    assert.equal(dev.registers.dmaStatus, ERROR);
  },
);
