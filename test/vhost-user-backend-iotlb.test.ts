/**
 * The back-end behind an IOMMU (VIRTIO_F_ACCESS_PLATFORM): the IOTLB on its own
 * (src/virtio/iotlb.ts) and the vhost-user back-end over a real socket with the
 * raw front-end (bytes at the offsets of docs/interop/vhost-user.rst: struct
 * vhost_iotlb_msg is iova u64 @0, size u64 @8, uaddr u64 @16, perm u8 @24,
 * type u8 @25, 32 bytes). The IOVA space is a permutation of guest pages, so a
 * back-end that used an IOVA as a GPA (or a UVA) would touch the wrong page.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { EventFd, SharedMemory, socketPairFds, UnixSocket } from '../src/sys/index.js';
import { VhostUserBackend, type VhostQueue, type VhostUserDevice } from '../src/vhost-user/backend.js';
import { GuestMemory, Iotlb, IotlbMiss, VirtioError, createDeviceQueue, DirtyLog, type DescChain } from '../src/virtio/index.js';
import { VhostUserBlkDevice } from '../src/devices/vhost-user-blk.js';
import { VirtioBlkDriver } from '../src/vhost-user/blk-driver.js';
import { NEED_REPLY, RawFrontEnd, state, u64, VERSION } from './helpers/vhost-user-raw.js';

const PAGE = 4096;
const MEM = 256 * PAGE;
const UVA = 0x7e0000000000;
const IOVA = 0x80000000;
const QSIZE = 8;
/** IOVA page i is guest page perm(i). */
const perm = (i: number): number => (i * 7 + 3) % 256;
const iovaGpa = (iova: number): number => perm(Math.floor((iova - IOVA) / PAGE)) * PAGE + ((iova - IOVA) % PAGE);
const F_VERSION_1 = 1n << 32n;
const F_PROTOCOL = 1n << 30n;
const F_LOG_ALL = 1n << 26n;
const F_ACCESS_PLATFORM = 1n << 33n;
const PF = { REPLY_ACK: 3, BACKEND_REQ: 5, LOG_SHMFD: 1 };
const pf = (...bits: number[]): bigint => bits.reduce((a, b) => a | (1n << BigInt(b)), 0n);

function iotlbMsg(iova: number | bigint, size: number | bigint, uaddr: number | bigint, permBits: number, type: number): Buffer {
  const b = Buffer.alloc(32);
  b.writeBigUInt64LE(BigInt(iova), 0);
  b.writeBigUInt64LE(BigInt(size), 8);
  b.writeBigUInt64LE(BigInt(uaddr), 16);
  b[24] = permBits;
  b[25] = type;
  return b;
}

// ---- The IOTLB and the engine ----

function memoryOf(bytes: Uint8Array): GuestMemory {
  const m = new GuestMemory();
  m.add({ guestPhysAddr: 0, size: bytes.length, userAddr: UVA, mmapOffset: 0 }, bytes);
  return m;
}

/** Maps IOVA page i at its permuted guest page, with `p` (1 RO, 2 WO, 3 RW). */
function mapPage(t: Iotlb, i: number, p = 3): void {
  t.update(IOVA + i * PAGE, PAGE, UVA + perm(i) * PAGE, p);
}

test('Iotlb: map translates through entries, merges runs that continue in guest memory, misses with the access asked', () => {
  const bytes = new Uint8Array(MEM);
  const t = new Iotlb(memoryOf(bytes));
  // IOVA pages 10 and 11 at guest pages 73 and 80 (not contiguous): two views.
  mapPage(t, 10);
  mapPage(t, 11);
  const out: Uint8Array[] = [];
  const gpas: number[] = [];
  t.map(IOVA + 10 * PAGE + 100, PAGE, true, out, gpas);
  assert.deepEqual(gpas, [perm(10) * PAGE + 100, perm(11) * PAGE]);
  assert.deepEqual(out.map((v) => v.length), [PAGE - 100, 100]);
  assert.equal(out[0]!.byteOffset, perm(10) * PAGE + 100);
  // Two entries for consecutive guest pages merge into one view.
  t.update(IOVA + 0x100000, PAGE, UVA + 40 * PAGE, 3);
  t.update(IOVA + 0x101000, PAGE, UVA + 41 * PAGE, 3);
  const merged: Uint8Array[] = [];
  t.map(IOVA + 0x100800, PAGE, false, merged, null);
  assert.equal(merged.length, 1);
  assert.equal(merged[0]!.byteOffset, 40 * PAGE + 0x800);
  // Past the mapped pages: a miss at the first byte not covered, nothing appended.
  const none: Uint8Array[] = [];
  assert.throws(() => t.map(IOVA + 11 * PAGE + 4000, 200, false, none, null), (e: unknown) => e instanceof IotlbMiss && e.iova === IOVA + 12 * PAGE && e.perm === 1);
  assert.equal(none.length, 0);
  // A read-only entry does not serve a write: a miss asking for write.
  t.update(IOVA + 20 * PAGE, PAGE, UVA + 5 * PAGE, 1);
  assert.throws(() => t.map(IOVA + 20 * PAGE, 8, true, [], null), (e: unknown) => e instanceof IotlbMiss && e.perm === 2);
  t.map(IOVA + 20 * PAGE, 8, false, none, null);
  assert.equal(none[0]!.byteOffset, 5 * PAGE);
  // An entry whose user address is outside guest memory: the guest's fault, a VirtioError.
  t.update(IOVA + 30 * PAGE, PAGE, UVA + MEM, 3);
  assert.throws(() => t.map(IOVA + 30 * PAGE, 8, false, [], null), (e: unknown) => e instanceof VirtioError && e.code === 'GPA_OUT_OF_RANGE');
});

test('Iotlb: an overlapping UPDATE replaces, INVALIDATE removes what overlaps, the cache is bounded (oldest dropped)', () => {
  const t = new Iotlb(memoryOf(new Uint8Array(MEM)), { maxEntries: 4 });
  t.update(IOVA, 2 * PAGE, UVA, 3);
  t.update(IOVA + PAGE, PAGE, UVA + 9 * PAGE, 3); // overlaps the first: it goes
  assert.deepEqual(t.entries(), [{ iova: IOVA + PAGE, size: PAGE, uaddr: UVA + 9 * PAGE, perm: 3 }]);
  for (let i = 2; i < 6; i++) mapPage(t, i);
  assert.equal(t.size, 4);
  assert.equal(t.stats.evicted, 1);
  assert.ok(!t.entries().some((e) => e.iova === IOVA + PAGE), 'the oldest entry was dropped');
  const g = t.generation;
  assert.equal(t.invalidate(IOVA + 3 * PAGE + 10, 1), 1);
  assert.ok(t.generation > g);
  assert.deepEqual(t.entries().map((e) => (e.iova - IOVA) / PAGE), [2, 4, 5]);
  assert.equal(t.invalidate(IOVA, 100 * PAGE), 3);
  assert.equal(t.size, 0);
  assert.throws(() => t.update(IOVA, 0, UVA, 3), RangeError);
  assert.throws(() => t.update(IOVA, PAGE, UVA, 0), RangeError);
  assert.throws(() => t.update(2 ** 53, PAGE, UVA, 3), RangeError);
});

test('Iotlb: ringGpa needs one contiguous run of guest memory', () => {
  const t = new Iotlb(memoryOf(new Uint8Array(MEM)));
  t.update(IOVA, PAGE, UVA + 7 * PAGE, 3);
  t.update(IOVA + PAGE, PAGE, UVA + 8 * PAGE, 3);
  t.update(IOVA + 2 * PAGE, PAGE, UVA + 20 * PAGE, 3);
  assert.equal(t.ringGpa(IOVA + 16, 2 * PAGE - 16, 1), 7 * PAGE + 16);
  assert.throws(() => t.ringGpa(IOVA + PAGE, 2 * PAGE, 1), (e: unknown) => e instanceof VirtioError && e.code === 'RING_LAYOUT');
  assert.throws(() => t.ringGpa(IOVA + 3 * PAGE, 16, 1), IotlbMiss);
});

test('engine with dma: a chain whose buffer misses is not taken and the queue is not broken; after the UPDATE it pops with the translated views', () => {
  const bytes = new Uint8Array(MEM);
  const dv = new DataView(bytes.buffer);
  const memory = memoryOf(bytes);
  const t = new Iotlb(memory);
  const log = new DirtyLog(new Uint8Array(MEM / PAGE / 8));
  // Rings at GPAs (the back-end translates ring addresses itself), buffers at IOVAs.
  const q = createDeviceQueue({ memory, dma: t, size: QSIZE, packed: false, desc: 0x1000, driver: 0x2000, device: 0x3000, eventIdx: false, indirect: true, log });
  // Chain 0: readable 16 bytes at IOVA page 40, then an indirect table at IOVA page 41 with one writable 64-byte buffer at page 42.
  dv.setBigUint64(0x1000, BigInt(IOVA + 40 * PAGE), true);
  dv.setUint32(0x1008, 16, true);
  dv.setUint16(0x100c, 1, true); // NEXT
  dv.setUint16(0x100e, 1, true);
  dv.setBigUint64(0x1010, BigInt(IOVA + 41 * PAGE), true);
  dv.setUint32(0x1018, 16, true);
  dv.setUint16(0x101c, 4, true); // INDIRECT
  dv.setUint16(0x2004, 0, true);
  dv.setUint16(0x2002, 1, true);
  bytes.fill(0x5a, perm(40) * PAGE, perm(40) * PAGE + 16);
  assert.throws(() => q.pop(), (e: unknown) => e instanceof IotlbMiss && e.iova === IOVA + 40 * PAGE && e.perm === 1);
  assert.equal(q.broken, null);
  assert.equal(q.inFlight, 0);
  mapPage(t, 40, 1);
  assert.throws(() => q.pop(), (e: unknown) => e instanceof IotlbMiss && e.iova === IOVA + 41 * PAGE, 'the indirect table is translated too');
  mapPage(t, 41, 1);
  const ind = perm(41) * PAGE;
  dv.setBigUint64(ind, BigInt(IOVA + 42 * PAGE), true);
  dv.setUint32(ind + 8, 64, true);
  dv.setUint16(ind + 12, 2, true); // WRITE
  assert.throws(() => q.pop(), (e: unknown) => e instanceof IotlbMiss && e.iova === IOVA + 42 * PAGE && e.perm === 2);
  mapPage(t, 42, 1); // read-only: still a miss for the write
  assert.throws(() => q.pop(), (e: unknown) => e instanceof IotlbMiss && e.perm === 2);
  mapPage(t, 42, 3);
  const c = q.pop();
  assert.ok(c);
  assert.equal(c.readable[0]!.byteOffset, perm(40) * PAGE);
  assert.deepEqual([...c.readable[0]!], new Array(16).fill(0x5a));
  assert.equal(c.writable[0]!.byteOffset, perm(42) * PAGE);
  c.writable[0]!.fill(0xc3, 0, 10);
  q.push(c, 10);
  assert.equal(dv.getUint16(0x3002, true), 1);
  // The dirty log holds the buffer's guest page, not its IOVA page.
  const page = perm(42);
  assert.equal(log.bytes[page >> 3]! & (1 << (page & 7)), 1 << (page & 7));
  assert.equal(bytes[perm(42) * PAGE + 9], 0xc3);
  assert.equal(q.pop(), null);
});

// ---- The back-end over a socket ----

/** Holds every chain until the test completes it. */
class HoldDevice implements VhostUserDevice {
  readonly features = F_VERSION_1;
  readonly numQueues = 1;
  held: { q: VhostQueue; chain: DescChain }[] = [];
  handleQueue(q: VhostQueue): void {
    let c: DescChain | null;
    while ((c = q.pop()) !== null) this.held.push({ q, chain: c });
  }
}

async function until(what: string, f: () => boolean, ms = 5000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!f()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

interface Ctx {
  dev: HoldDevice;
  be: VhostUserBackend;
  fe: RawFrontEnd;
  shm: SharedMemory;
  kick: EventFd;
}

async function withBackend(options: { iommu?: boolean }, fn: (c: Ctx) => Promise<void>): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdevkit-iotlb-'));
  const sock = path.join(dir, 'be.sock');
  const dev = new HoldDevice();
  const be = VhostUserBackend.listen(sock, dev, options);
  const shm = SharedMemory.create(MEM);
  const kick = EventFd.create();
  const fe = await RawFrontEnd.connect(sock);
  try {
    await fn({ dev, be, fe, shm, kick });
  } finally {
    fe.close();
    be.close();
    shm.close();
    kick.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

test('ACCESS_PLATFORM is offered only with iommu: true, and acked only with BACKEND_REQ and REPLY_ACK', async () => {
  await withBackend({}, async ({ fe }) => {
    const offered = (await fe.call(1)).readBigUInt64LE(0);
    assert.equal(offered & F_ACCESS_PLATFORM, 0n);
    fe.send(16, u64(pf(PF.REPLY_ACK)));
    assert.equal((await fe.call(22, iotlbMsg(IOVA, PAGE, UVA, 3, 2))).readBigUInt64LE(0), 1n, 'IOTLB_MSG without ACCESS_PLATFORM: refused');
  });
  await withBackend({ iommu: true }, async ({ fe }) => {
    const offered = (await fe.call(1)).readBigUInt64LE(0);
    assert.equal(offered & F_ACCESS_PLATFORM, F_ACCESS_PLATFORM);
    fe.send(16, u64(pf(PF.REPLY_ACK)));
    assert.notEqual(await fe.acked(2, u64(F_VERSION_1 | F_PROTOCOL | F_ACCESS_PLATFORM)), 0n, 'without BACKEND_REQ: refused');
  });
});

test('behind an IOMMU: ring and buffer IOVAs missed on the back-end channel, served after the UPDATEs, data at the translated pages; INVALIDATE brings a miss back', async () => {
  await withBackend({ iommu: true }, async ({ dev, fe, shm, kick }) => {
    const log = SharedMemory.create(PAGE);
    const call = EventFd.create();
    try {
      fe.send(16, u64(pf(PF.REPLY_ACK, PF.BACKEND_REQ, PF.LOG_SHMFD)));
      const [mine, theirs] = socketPairFds();
      assert.equal(await fe.acked(21, Buffer.alloc(0), [theirs]), 0n, 'SET_BACKEND_REQ_FD');
      theirs.close();
      const chan = new RawFrontEnd(new UnixSocket(mine));
      assert.equal(await fe.acked(2, u64(F_VERSION_1 | F_PROTOCOL | F_ACCESS_PLATFORM | F_LOG_ALL)), 0n);
      const table = Buffer.alloc(40);
      table.writeUInt32LE(1, 0);
      table.writeBigUInt64LE(0n, 8); // GPA
      table.writeBigUInt64LE(BigInt(MEM), 16);
      table.writeBigUInt64LE(BigInt(UVA), 24);
      assert.equal(await fe.acked(5, table, [shm.fd]), 0n, 'SET_MEM_TABLE');
      const lb = Buffer.alloc(16);
      lb.writeBigUInt64LE(BigInt(PAGE), 0);
      assert.equal((await fe.call(6, lb, [log.fd])).length, 8, 'SET_LOG_BASE');
      // Rings at IOVA pages 1 (desc), 2 (avail), 3 (used); the used ring logged at its IOVA.
      fe.send(8, state(0, QSIZE));
      fe.send(10, state(0, 0));
      const a = Buffer.alloc(40);
      a.writeUInt32LE(0, 0);
      a.writeUInt32LE(1, 4); // VHOST_VRING_F_LOG
      a.writeBigUInt64LE(BigInt(IOVA + 1 * PAGE), 8);
      a.writeBigUInt64LE(BigInt(IOVA + 3 * PAGE), 16);
      a.writeBigUInt64LE(BigInt(IOVA + 2 * PAGE), 24);
      a.writeBigUInt64LE(BigInt(IOVA + 3 * PAGE), 32);
      fe.send(9, a);
      fe.send(13, u64(0), [call.fd]);
      // One request: a writable 100-byte buffer at IOVA page 50, offset 0x10.
      const mem = shm.view;
      const desc = perm(1) * PAGE;
      const avail = perm(2) * PAGE;
      const used = perm(3) * PAGE;
      mem.setBigUint64(desc, BigInt(IOVA + 50 * PAGE + 0x10), true);
      mem.setUint32(desc + 8, 100, true);
      mem.setUint16(desc + 12, 2, true);
      mem.setUint16(avail + 4, 0, true);
      mem.setUint16(avail + 2, 1, true);
      fe.send(12, u64(0), [kick.fd]);
      fe.send(18, state(0, 1));
      // The back-end asks for each page it lacks; we answer as an IOMMU would (the whole page, RW).
      const asked: { iova: number; perm: number }[] = [];
      while (dev.held.length === 0) {
        const m = await chan.recv();
        assert.ok(m, 'the back-end channel is open');
        assert.equal(m.request, 1, 'BACKEND_IOTLB_MSG');
        assert.equal(m.flags, VERSION);
        assert.equal(m.payload.length, 32);
        assert.equal(m.payload[25], 1, 'type MISS');
        const iova = Number(m.payload.readBigUInt64LE(0));
        asked.push({ iova, perm: m.payload[24]! });
        const page = Math.floor((iova - IOVA) / PAGE);
        const r = await fe.call(22, iotlbMsg(IOVA + page * PAGE, PAGE, UVA + perm(page) * PAGE, 3, 2), [], VERSION | NEED_REPLY);
        assert.equal(r.readBigUInt64LE(0), 0n, 'UPDATE acked');
        await new Promise((r2) => setTimeout(r2, 20));
      }
      assert.deepEqual(asked, [
        { iova: IOVA + 1 * PAGE, perm: 1 }, // descriptor table: read
        { iova: IOVA + 2 * PAGE, perm: 1 }, // avail ring: read
        { iova: IOVA + 3 * PAGE, perm: 2 }, // used ring: write
        { iova: IOVA + 50 * PAGE + 0x10, perm: 2 }, // the buffer: write
      ]);
      const { q, chain } = dev.held[0]!;
      assert.equal(chain.writable[0]!.byteOffset, perm(50) * PAGE + 0x10, 'the buffer is the translated guest page');
      chain.writable[0]!.fill(0xee);
      q.push(chain, 100);
      assert.equal(mem.getUint16(used + 2, true), 1, 'used idx at the used ring\'s guest page');
      assert.equal(mem.getUint32(used + 4, true), 0);
      assert.equal(mem.getUint32(used + 8, true), 100);
      assert.equal(mem.getUint8(perm(50) * PAGE + 0x10 + 99), 0xee);
      // The buffer's and the used ring's guest pages are logged, nothing else (not their IOVA pages).
      const want = new Uint8Array(PAGE);
      for (const p of [perm(50), perm(3)]) want[p >> 3]! |= 1 << (p & 7);
      assert.deepEqual([...log.bytes], [...want]);

      // INVALIDATE the buffer's page; a second request there is missed again.
      assert.equal((await fe.call(22, iotlbMsg(IOVA + 50 * PAGE, PAGE, 0, 0, 3), [], VERSION | NEED_REPLY)).readBigUInt64LE(0), 0n);
      mem.setUint16(avail + 6, 0, true);
      mem.setUint16(avail + 2, 2, true);
      kick.signal();
      const m = await chan.recv();
      assert.ok(m);
      assert.equal(Number(m.payload.readBigUInt64LE(0)), IOVA + 50 * PAGE + 0x10);
      assert.equal(dev.held.length, 1, 'not served before the UPDATE');
      await fe.call(22, iotlbMsg(IOVA + 50 * PAGE, PAGE, UVA + perm(50) * PAGE, 3, 2), [], VERSION | NEED_REPLY);
      await until('the second request', () => dev.held.length === 2);

      // Refused, connection kept: a bad perm, a MISS or ACCESS_FAIL from the front-end, an IOVA past 2^53, a uaddr past 2^53.
      for (const bad of [
        iotlbMsg(IOVA, PAGE, UVA, 0, 2),
        iotlbMsg(IOVA, PAGE, UVA, 4, 2),
        iotlbMsg(IOVA, PAGE, UVA, 3, 1),
        iotlbMsg(IOVA, PAGE, UVA, 3, 4),
        iotlbMsg(IOVA, 0, UVA, 3, 2),
        iotlbMsg(1n << 60n, PAGE, UVA, 3, 2),
        iotlbMsg(IOVA, PAGE, 1n << 60n, 3, 2),
      ]) {
        assert.equal((await fe.call(22, bad, [], VERSION | NEED_REPLY)).readBigUInt64LE(0), 1n, bad.toString('hex'));
      }
      // A wrapped u64 size (0) invalidates to the end of the IOVA space.
      assert.equal((await fe.call(22, iotlbMsg(IOVA, 0, 0, 0, 3))).readBigUInt64LE(0), 0n);
      mem.setUint16(avail + 8, 0, true);
      mem.setUint16(avail + 2, 3, true);
      // head 0 is in flight twice otherwise: complete the second request first.
      dev.held[1]!.q.push(dev.held[1]!.chain, 0);
      kick.signal();
      const again = await chan.recv();
      assert.ok(again);
      assert.equal(again.payload[25], 1, 'everything was invalidated: the buffer is missed again');
      chan.close();
    } finally {
      log.close();
      call.close();
    }
  });
});

test('IOTLB_MSG of the wrong size closes the connection (the spec\'s 32-byte struct)', async () => {
  await withBackend({ iommu: true }, async ({ fe }) => {
    fe.send(16, u64(pf(PF.REPLY_ACK, PF.BACKEND_REQ)));
    fe.send(22, iotlbMsg(IOVA, PAGE, UVA, 3, 2).subarray(0, 26), [], VERSION | NEED_REPLY);
    assert.equal(await fe.recv(), null);
  });
});

// ---- Our driver (the front-end as IOMMU) against our back-end behind it ----

for (const packed of [false, true]) {
  test(`VirtioBlkDriver { iommu: 'identity' } against our blk back-end with iommu: true (${packed ? 'packed' : 'split'}): misses answered, data right both ways`, async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdevkit-iotlb-blk-'));
    const sock = path.join(dir, 'blk.sock');
    const image = path.join(dir, 'disk.img');
    fs.writeFileSync(image, '');
    fs.truncateSync(image, 1 << 20);
    const disk = VhostUserBlkDevice.open({ file: image });
    const be = VhostUserBackend.listen(sock, disk, { iommu: true });
    try {
      const d = await VirtioBlkDriver.connect(sock, { iommu: 'identity', packed, queueSize: 16 });
      try {
        assert.equal(d.frontend.iommuEnabled, true);
        const data = Buffer.alloc(3 * 4096);
        for (let i = 0; i < data.length; i++) data[i] = (i * 31 + 7) & 0xff;
        await d.write(8192, data);
        assert.deepEqual(fs.readFileSync(image).subarray(8192, 8192 + data.length), data, 'the image holds the write');
        assert.deepEqual(await d.read(8192, data.length), data);
        assert.ok(be.iotlbStats.misses >= 3, `misses ${be.iotlbStats.misses}`);
        assert.equal(d.frontend.iotlbStats.misses, be.iotlbStats.misses, 'every miss the back-end sent reached the front-end');
        assert.equal(be.iotlbStats.updates, d.frontend.iotlbStats.updates);
      } finally {
        await d.close();
      }
    } finally {
      be.close();
      disk.close();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
}

test('VirtioBlkDriver { iommu } against a back-end without ACCESS_PLATFORM: UNSUPPORTED, named', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdevkit-iotlb-blk-'));
  const sock = path.join(dir, 'blk.sock');
  const disk = VhostUserBlkDevice.open({ size: 1 << 20 });
  const be = VhostUserBackend.listen(sock, disk);
  try {
    await assert.rejects(VirtioBlkDriver.connect(sock, { iommu: 'identity' }), /does not offer VIRTIO_F_ACCESS_PLATFORM/);
  } finally {
    be.close();
    disk.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
