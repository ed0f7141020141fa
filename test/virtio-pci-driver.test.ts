/**
 * VirtioPciBlkDriver and its transport (src/virtio/pci-driver.ts) against
 * our virtio-blk PCI device served by VfioUserServer over a real UNIX
 * socket: every write checked in the image file read with fs, every read
 * against bytes put in the file by fs; split and packed rings, EVENT_IDX and
 * INDIRECT on and off, two queues, more requests than the ring holds, MSI-X
 * interrupts counted on both sides. Then the untrusted device: capabilities
 * past their BAR, a looping capability list, a missing capability, a device
 * that is not virtio, a used id never made available, a device that sets
 * DEVICE_NEEDS_RESET, a server that goes away with requests pending.
 *
 * The hand-built devices write their capabilities from the spec's numbers
 * (virtio 1.2 4.1.4), not from the code under test.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { VfioUserServer } from '../src/vfio-user/server.js';
import type { DeviceContext, VfioUserDeviceSpec } from '../src/vfio-user/device.js';
import { virtioNetPciDevice } from '../src/devices/virtio-net-pci.js';
import { NetSwitch } from '../src/devices/net-switch.js';
import { virtioBlkPciDevice, type VirtioBlkPciDeviceSpec, type VirtioBlkPciOptions } from '../src/devices/virtio-blk-pci.js';
import { VirtioPciBlkDriver, type VirtioPciBlkDriverOptions } from '../src/virtio/pci-blk-driver.js';
import { VirtioPciError, VirtioPciTransport } from '../src/virtio/pci-driver.js';
import { BlkIoError } from '../src/vhost-user/blk-driver.js';
import { SharedMemory } from '../src/sys/index.js';
import { Rng } from '../src/fuzz/rng.js';
import { openFdCount, tick } from './helpers/sys.js';

// --- the spec's numbers, by hand ---
const COMMON_CFG = 1, NOTIFY_CFG = 2, ISR_CFG = 3, DEVICE_CFG = 4;
/** virtio_pci_common_cfg: queue_desc, queue_driver, queue_device (u64 each, 4.1.4.3). */
const Q_DESC = 32, Q_DRIVER = 40, Q_DEVICE = 48;
const F_INDIRECT = 1n << 28n, F_EVENT_IDX = 1n << 29n, F_VERSION_1 = 1n << 32n, F_RING_PACKED = 1n << 34n;
const NET_F_MAC = 1n << 5n;
const BLK_F_DISCARD = 1n << 13n, BLK_F_WRITE_ZEROES = 1n << 14n;
const BLK_F_FLUSH = 1n << 9n, BLK_F_MQ = 1n << 12n, BLK_F_RO = 1n << 5n;
/** Where our device puts the structures (its doc): BAR4, notify area at 0x3000. */
const NOTIFY_AT = 0x3000;
const VIRTIO_BLK_S_IOERR = 1, VIRTIO_BLK_S_UNSUPP = 2;

const SECTOR = 512;
const MiB = 1 << 20;
const IMAGE_BYTES = 8 * MiB;

const tmp = (): string => fs.mkdtempSync(path.join(os.tmpdir(), 'vdk-pcidrv-'));

/** The image's original byte at `offset` (put there by fs, not by the code under test). */
const original = (offset: number): number => ((offset >>> 9) * 13 + offset * 7) & 0xff;

function makeImage(dir: string, bytes = IMAGE_BYTES): string {
  const file = path.join(dir, 'disk.img');
  const b = Buffer.alloc(bytes);
  for (let i = 0; i < b.length; i++) b[i] = original(i);
  fs.writeFileSync(file, b);
  return file;
}

function fileBytes(file: string, offset: number, length: number): Buffer {
  const b = Buffer.alloc(length);
  const fd = fs.openSync(file, 'r');
  try {
    fs.readSync(fd, b, 0, length, offset);
  } finally {
    fs.closeSync(fd);
  }
  return b;
}

function pattern(length: number, seed: number): Buffer {
  const b = Buffer.alloc(length);
  for (let i = 0; i < length; i++) b[i] = (i * 31 + seed * 101 + (i >>> 8)) & 0xff;
  return b;
}

interface Served {
  spec: VirtioBlkPciDeviceSpec;
  server: VfioUserServer;
  sock: string;
  file: string;
}

function serveBlk(t: TestContext, options: VirtioBlkPciOptions & { wrap?: (spec: VirtioBlkPciDeviceSpec) => VfioUserDeviceSpec } = {}): Served {
  const dir = tmp();
  const file = options.file ?? makeImage(dir);
  const spec = virtioBlkPciDevice({ ...options, file });
  const sock = path.join(dir, 'blk.sock');
  const server = VfioUserServer.listen(sock, { device: options.wrap ? options.wrap(spec) : spec });
  t.after(async () => {
    server.close();
    await tick(5);
    spec.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });
  return { spec, server, sock, file };
}

async function connect(t: TestContext, s: Served, options: VirtioPciBlkDriverOptions = {}): Promise<VirtioPciBlkDriver> {
  const d = await VirtioPciBlkDriver.connect(s.sock, options);
  t.after(() => d.close());
  return d;
}

/** Writes, flushes, reads back; checks the file and the bytes around the write, which must be the image's own. */
async function roundTrip(d: VirtioPciBlkDriver, s: Served, offset: number, length: number, seed: number): Promise<void> {
  const data = pattern(length, seed);
  await d.write(offset, data);
  await d.flush();
  assert.ok(fileBytes(s.file, offset, length).equals(data), `the image file holds the write at ${offset}`);
  assert.ok((await d.read(offset, length)).equals(data), `read back at ${offset}`);
  const before = Math.max(0, offset - 4096);
  const around = await d.read(before, offset - before);
  assert.ok(around.equals(fileBytes(s.file, before, offset - before)), 'the bytes before the write are the file\'s');
}

test('split ring: features, capacity, GET_ID, writes in the image file, reads of what fs put there, MSI-X interrupts', async (t) => {
  const s = serveBlk(t, { serial: 'pci-drv-1' });
  const d = await connect(t, s, { packed: false });
  assert.equal(d.transport.ids.vendorId, 0x1af4);
  assert.equal(d.transport.ids.deviceId, 0x1042);
  assert.equal(d.transport.ids.virtioId, 2);
  assert.ok(d.features & F_VERSION_1);
  assert.ok(d.features & BLK_F_FLUSH);
  assert.ok(d.features & F_EVENT_IDX && d.features & F_INDIRECT, 'the device offers both; the driver takes them by default');
  assert.equal(d.features & F_RING_PACKED, 0n);
  assert.equal(d.packed, false);
  assert.equal(d.capacity, IMAGE_BYTES);
  assert.equal(d.config.capacity, BigInt(IMAGE_BYTES / SECTOR));
  assert.equal(d.config.blkSize, SECTOR);
  assert.equal(d.numQueues, 1);
  assert.equal(d.vectors, 2, 'config + one queue');
  assert.equal(s.spec.transport.driverFeatures, d.features, 'the device holds what the driver wrote');
  assert.equal(await d.getId(), 'pci-drv-1');
  // A read of bytes fs put in the image.
  assert.ok((await d.read(3 * MiB + 512, 8192)).equals(fileBytes(s.file, 3 * MiB + 512, 8192)));
  await roundTrip(d, s, 4096, 64 * 1024, 1);
  await roundTrip(d, s, 5 * MiB + 1536, 3 * SECTOR, 2);
  // The last sector.
  await roundTrip(d, s, IMAGE_BYTES - SECTOR, SECTOR, 3);
  assert.ok(d.stats.interrupts > 0, 'completions came with MSI-X interrupts');
  assert.ok(s.spec.transport.stats.interrupts >= d.stats.interrupts, 'the device raised at least as many (eventfds coalesce)');
  assert.equal(s.spec.transport.stats.ioeventfdKicks, d.stats.kicks, 'every kick went through the ioeventfd the server offered for the notify address');
  assert.equal(s.spec.transport.stats.kicks, 0, 'no REGION_WRITE kick');
  assert.equal(d.stats.completed, s.spec.disk.stats.reads + s.spec.disk.stats.writes + s.spec.disk.stats.flushes + s.spec.disk.stats.getIds);
});

test('kicks: through the ioeventfds of GET_REGION_IO_FDS by default, REGION_WRITEs to the notify area without them', async (t) => {
  for (const ioeventfds of [true, false]) {
    const s = serveBlk(t, { queues: 2 });
    const d = await connect(t, s, { queues: 2, ioeventfds });
    const data = pattern(64 * 1024, 12);
    await Promise.all([d.write(0, data, { queue: 0 }), d.write(64 * 1024, data, { queue: 1 })]);
    assert.ok(fileBytes(s.file, 64 * 1024, data.length).equals(data));
    assert.ok(d.stats.kicks >= 2, 'both queues kicked');
    const st = s.spec.transport.stats;
    assert.equal(d.notifyBy, ioeventfds ? 'ioeventfd' : 'message');
    assert.deepEqual([st.ioeventfdKicks, st.kicks], ioeventfds ? [d.stats.kicks, 0] : [0, d.stats.kicks]);
  }
  // ioeventfds that a write of the queue index to its notify address would not hit: elsewhere, another datamatch, another size.
  for (const change of [{ offset: NOTIFY_AT + 0x100 }, { datamatch: 5n }, { size: 4 }]) {
    const s = serveBlk(t, {
      wrap: (spec) => ({ ...spec, regions: { ...spec.regions, 4: { ...spec.regions![4]!, ioEventFds: spec.regions![4]!.ioEventFds!.map((e) => ({ ...e, ...change })) } } }),
    });
    const d = await connect(t, s);
    assert.equal(d.notifyBy, 'message', JSON.stringify(change, (_k, v: unknown) => (typeof v === 'bigint' ? String(v) : v)));
    await d.write(0, pattern(4096, 14));
    assert.ok(fileBytes(s.file, 0, 4096).equals(pattern(4096, 14)));
    assert.equal(s.spec.transport.stats.kicks, d.stats.kicks);
  }
  // A server without ioeventfds (our device with its list emptied): REGION_WRITE kicks, unasked.
  const s = serveBlk(t, { ioeventfds: false });
  const d = await connect(t, s);
  await d.write(0, pattern(4096, 13));
  assert.ok(fileBytes(s.file, 0, 4096).equals(pattern(4096, 13)));
  assert.equal(s.spec.transport.stats.kicks, d.stats.kicks);
});

test('a device without MSI-X: INTx, the ISR telling queue interrupts from config changes, the line unmasked each time', async (t) => {
  const s = serveBlk(t, { queues: 2, wrap: (spec) => ({ ...spec, irqs: { intx: true } }) });
  const d = await connect(t, s, { queues: 2, queueSize: 8 });
  assert.equal(d.transport.msixVectors, 0);
  assert.equal(d.vectors, 0, 'no MSI-X vector wired');
  assert.deepEqual(s.spec.transport.queues.map((q) => q.vector), [0xffff, 0xffff], 'queue_msix_vector NO_VECTOR on both queues');
  // More requests than both rings hold: completions keep coming only if the line is unmasked after each interrupt.
  const data = pattern(48 * 4096, 15);
  const ws: Promise<void>[] = [];
  for (let i = 0; i < 48; i++) ws.push(d.write(i * 4096, data.subarray(i * 4096, (i + 1) * 4096), { queue: i % 2 }));
  await Promise.all(ws);
  assert.ok(fileBytes(s.file, 0, data.length).equals(data));
  assert.ok((await d.read(0, data.length)).equals(data));
  assert.ok(d.stats.interrupts >= 2);
  s.spec.transport.configChanged();
  await waitFor(() => d.stats.configInterrupts === 1, 'the config change, told by ISR bit 1');
  assert.equal(await d.getId(), 'vdevkit-blk', 'queue interrupts still come after a config one');
});

test('more requests than the ring holds, in flight at once, split and packed, two queues', async (t) => {
  for (const packed of [false, true]) {
    const s = serveBlk(t, { queues: 2 });
    const d = await connect(t, s, { packed, queues: 2, queueSize: 16, dmaBytes: 2 * MiB });
    assert.equal(d.packed, packed);
    assert.equal((d.features & F_RING_PACKED) !== 0n, packed);
    assert.ok(d.features & BLK_F_MQ);
    assert.equal(d.numQueues, 2);
    assert.equal(d.vectors, 3, 'config + a vector per queue');
    assert.equal(d.queueSize, 16);
    // 96 writes of 32 KiB (3 MiB, more than the 2 MiB pool and 2 x 16 ring slots), all issued in one turn.
    const chunk = 32 * 1024;
    const base = packed ? 4 * MiB : 0;
    const data = pattern(96 * chunk, packed ? 7 : 8);
    const writes: Promise<void>[] = [];
    for (let i = 0; i < 96; i++) writes.push(d.write(base + i * chunk, data.subarray(i * chunk, (i + 1) * chunk), { queue: i % 2 }));
    assert.equal(d.inFlight, 96, 'every request is pending (on a ring or waiting for room)');
    await Promise.all(writes);
    await d.flush({ queue: 1 });
    assert.ok(fileBytes(s.file, base, data.length).equals(data), `${packed ? 'packed' : 'split'}: the image holds all 96 writes`);
    const reads: Promise<Buffer>[] = [];
    for (let i = 0; i < 96; i++) reads.push(d.read(base + i * chunk, chunk, { queue: (i + 1) % 2 }));
    assert.ok(Buffer.concat(await Promise.all(reads)).equals(data), 'read back over both queues');
    assert.equal(d.inFlight, 0);
    // Both queues carried requests.
    const q = s.spec.transport.queues;
    assert.ok(q.length === 2);
    assert.ok(d.stats.interrupts >= 2);
  }
});

test('ring features: EVENT_IDX and INDIRECT_DESC each on and off, split and packed', async (t) => {
  for (const packed of [false, true]) {
    for (const [eventIdx, indirect] of [[false, false], [true, false], [false, true], [true, true]] as const) {
      const s = serveBlk(t);
      const d = await connect(t, s, { packed, eventIdx, indirect, queueSize: 8 });
      assert.equal((d.features & F_EVENT_IDX) !== 0n, eventIdx);
      assert.equal((d.features & F_INDIRECT) !== 0n, indirect);
      assert.equal(d.eventIdx, eventIdx);
      assert.equal(d.indirect, indirect);
      const what = `${packed ? 'packed' : 'split'} eventIdx=${eventIdx} indirect=${indirect}`;
      const data = pattern(40 * 4096, Number(eventIdx) * 2 + Number(indirect));
      const ws: Promise<void>[] = [];
      for (let i = 0; i < 40; i++) ws.push(d.write(i * 4096, data.subarray(i * 4096, (i + 1) * 4096)));
      await Promise.all(ws);
      assert.ok(fileBytes(s.file, 0, data.length).equals(data), what);
      assert.ok((await d.read(0, data.length)).equals(data), what);
      await d.close();
    }
  }
});

test('a transfer larger than maxTransfer is split; out-of-range and unaligned requests are RangeErrors', async (t) => {
  const s = serveBlk(t);
  const d = await connect(t, s, { maxTransfer: 64 * 1024 });
  assert.equal(d.maxTransfer, 64 * 1024);
  const data = pattern(MiB + 4096, 9);
  await d.write(MiB, data);
  assert.ok(fileBytes(s.file, MiB, data.length).equals(data));
  assert.ok((await d.read(MiB, data.length)).equals(data));
  assert.ok(s.spec.disk.stats.writes >= 17, 'split into requests of at most 64 KiB');
  await assert.rejects(d.read(IMAGE_BYTES - SECTOR, 2 * SECTOR), RangeError);
  await assert.rejects(d.read(100, SECTOR), RangeError);
  await assert.rejects(d.write(0, Buffer.alloc(100)), RangeError);
  await assert.rejects(d.read(0, SECTOR, { queue: 1 }), RangeError);
});

test('DISCARD and WRITE_ZEROES: the ranges read as zeros in the file, the bytes around them untouched; without the feature: UNSUPP', async (t) => {
  const s = serveBlk(t);
  const d = await connect(t, s);
  assert.ok(d.features & BLK_F_DISCARD && d.features & BLK_F_WRITE_ZEROES);
  const zeros = (n: number): Buffer => Buffer.alloc(n);
  await d.write(0, pattern(2 * MiB, 6));
  await d.discard(4096, MiB);
  assert.ok(fileBytes(s.file, 4096, MiB).equals(zeros(MiB)), 'discarded: zeros in the file');
  assert.ok(fileBytes(s.file, 0, 4096).equals(pattern(4096, 6)), 'the bytes before it are kept');
  assert.ok(fileBytes(s.file, 4096 + MiB, 4096).equals(pattern(2 * MiB, 6).subarray(4096 + MiB, 8192 + MiB)), 'and after it');
  await d.writeZeroes(MiB + 8192, 3 * SECTOR, { unmap: true });
  assert.ok(fileBytes(s.file, MiB + 8192, 3 * SECTOR).equals(zeros(3 * SECTOR)));
  assert.ok((await d.read(MiB + 8192, 3 * SECTOR)).equals(zeros(3 * SECTOR)));
  assert.equal(s.spec.disk.stats.discards, 1);
  assert.equal(s.spec.disk.stats.writeZeroes, 1);
  await assert.rejects(d.discard(IMAGE_BYTES - SECTOR, 2 * SECTOR), RangeError);
  // A device without them: refused here, nothing sent.
  const plain = await VirtioPciBlkDriver.connect(serveRaw(t, registerDevice()), { ioTimeoutMs: 0 });
  t.after(() => plain.close());
  for (const op of [plain.discard(0, SECTOR), plain.writeZeroes(0, SECTOR)]) {
    await assert.rejects(op, (e: unknown) => e instanceof BlkIoError && e.status === VIRTIO_BLK_S_UNSUPP);
  }
  assert.equal(plain.inFlight, 0);
});

test('a read-only disk: RO negotiated, a write fails with the device\'s IOERR and leaves the file alone', async (t) => {
  const s = serveBlk(t, { readOnly: true });
  const d = await connect(t, s);
  assert.ok(d.features & BLK_F_RO);
  assert.equal(d.readOnly, true);
  const err = await d.write(0, Buffer.alloc(SECTOR, 0xaa)).then(
    () => null,
    (e: unknown) => e,
  );
  assert.ok(err instanceof BlkIoError, String(err));
  assert.equal(err.status, VIRTIO_BLK_S_IOERR);
  assert.ok(fileBytes(s.file, 0, SECTOR).equals(Buffer.from(Array.from({ length: SECTOR }, (_, i) => original(i)))));
  // The driver carries on: a read works.
  assert.ok((await d.read(0, SECTOR)).equals(fileBytes(s.file, 0, SECTOR)));
});

test('a config interrupt is counted; DEVICE_NEEDS_RESET after a broken queue fails pending requests (DEVICE_ERROR)', async (t) => {
  // A device whose avail idx the test bumps past the ring on the first kick: the device breaks the queue.
  let tamper = false;
  const s = serveBlk(t, {
    latencyMs: 0,
    wrap: (spec) =>
      intercept(spec, (ctx, regs) => {
        if (!tamper) return true;
        const avail = ctx.dma.view(regs.driver + 2, 2, { write: true })!;
        new DataView(avail.buffer, avail.byteOffset, 2).setUint16(0, 0x4000, true);
        return true;
      }),
  });
  const d = await connect(t, s, { packed: false, queueSize: 8 });
  assert.equal(await d.getId(), 'vdevkit-blk');
  s.spec.transport.configChanged();
  await waitFor(() => d.stats.configInterrupts === 1, 'the config interrupt');
  assert.ok((await d.read(0, SECTOR)).length === SECTOR, 'a config change alone does not fail the driver');
  tamper = true;
  const err = await d.read(0, SECTOR).then(
    () => null,
    (e: unknown) => e,
  );
  assert.ok(err instanceof VirtioPciError && err.code === 'DEVICE_ERROR', String(err));
  assert.match(err.message, /DEVICE_NEEDS_RESET/);
  assert.equal(s.spec.transport.stats.brokenQueues, 1);
  await assert.rejects(d.read(0, SECTOR), (e: unknown) => e instanceof VirtioPciError && e.code === 'DEVICE_ERROR', 'later requests fail at once');
});

test('a device that gives back a used id never made available: DEVICE_ERROR, no crash', async (t) => {
  let lie = false;
  const s = serveBlk(t, {
    wrap: (spec) =>
      intercept(spec, (ctx, regs) => {
        if (!lie) return true;
        // used ring (8 entries): flags u16, idx u16, then { id u32, len u32 }[8]: id 7 at idx, idx + 1, the queue's interrupt.
        const used = ctx.dma.view(regs.device, 4 + 8 * 8, { write: true })!;
        const v = new DataView(used.buffer, used.byteOffset, used.length);
        const idx = v.getUint16(2, true);
        v.setUint32(4 + 8 * (idx % 8), 7, true);
        v.setUint32(8 + 8 * (idx % 8), 0, true);
        v.setUint16(2, (idx + 1) & 0xffff, true);
        ctx.trigger('msix', 1);
        return false;
      }),
  });
  const d = await connect(t, s, { packed: false, queueSize: 8, eventIdx: false });
  assert.ok((await d.read(0, SECTOR)).equals(fileBytes(s.file, 0, SECTOR)));
  lie = true;
  await assert.rejects(d.read(SECTOR, SECTOR), (e: unknown) => e instanceof VirtioPciError && e.code === 'DEVICE_ERROR' && /used id 7/.test(e.message));
  await d.close();
});

test('the server going away fails pending requests with DISCONNECTED, and later ones at once; close() still resolves', async (t) => {
  const s = serveBlk(t, { latencyMs: 200, queues: 2 });
  const d = await connect(t, s, { queues: 2 });
  const pending = [d.read(0, 4096), d.write(8192, pattern(4096, 1), { queue: 1 }), d.getId(), d.flush()];
  const settled = Promise.allSettled(pending);
  await waitFor(() => s.spec.disk.stats.reads >= 1, 'the device took the read');
  s.server.close();
  for (const r of await settled) {
    assert.equal(r.status, 'rejected');
    assert.ok(r.reason instanceof VirtioPciError && r.reason.code === 'DISCONNECTED', String(r.reason));
  }
  await assert.rejects(d.read(0, SECTOR), (e: unknown) => e instanceof VirtioPciError && e.code === 'DISCONNECTED');
  assert.equal(d.transport.closed, true);
  await d.close();
});

test('close() with requests pending rejects them (STATE) and resets the device', async (t) => {
  const s = serveBlk(t, { latencyMs: 100 });
  const d = await VirtioPciBlkDriver.connect(s.sock);
  const p = d.read(0, 4096);
  await waitFor(() => s.spec.disk.stats.reads >= 1, 'the device took the read');
  const closed = d.close();
  await assert.rejects(p, (e: unknown) => e instanceof VirtioPciError && e.code === 'STATE');
  await closed;
  await assert.rejects(d.read(0, SECTOR), (e: unknown) => e instanceof VirtioPciError && e.code === 'STATE');
  await waitFor(() => s.spec.transport.status === 0, 'the device was reset');
});

test('a device config in an mmap-able sparse area is read through the mapping', async (t) => {
  // BAR4 with memory offered by fd for [0x2000, 0x3000) only: the device config lives there (a copy of the device's).
  let configReadsByMessage = 0;
  const s = serveBlk(t, {
    wrap: (spec) => {
      const bar = spec.regions![4]!;
      const memory = SharedMemory.create(0x4000);
      t.after(() => memory.close());
      memory.bytes.set(spec.transport.device.config!(), 0x2000);
      return {
        ...spec,
        regions: {
          ...spec.regions,
          4: {
            ...bar,
            memory,
            mmapAreas: [{ offset: 0x2000, size: 0x1000 }],
            read: (offset, out) => {
              if (offset >= 0x2000 && offset < 0x3000) configReadsByMessage++;
              bar.read!(offset, out);
            },
          },
        },
      };
    },
  });
  const d = await connect(t, s);
  assert.equal(d.capacity, IMAGE_BYTES, 'capacity from the mapped config');
  assert.equal(configReadsByMessage, 0, 'no REGION_READ of the device config');
  const region = await d.transport.device.regionInfo(4);
  assert.deepEqual(region.mapped.map((m) => [m.offset, m.size]), [[0x2000, 0x1000]]);
  await roundTrip(d, s, 0, 8192, 4);
});

test('connect, I/O and close leave no fd behind (the eventfds, DMA memfds, region mappings and the socket)', async (t) => {
  const s = serveBlk(t, { queues: 2 });
  const cycle = async (packed: boolean): Promise<void> => {
    const d = await VirtioPciBlkDriver.connect(s.sock, { queues: 2, packed });
    await d.write(0, pattern(8192, 5));
    assert.ok((await d.read(0, 8192)).equals(fileBytes(s.file, 0, 8192)));
    await d.close();
  };
  await cycle(false); // the first connection opens what stays open (the image, the server's own fds)
  await tick(20);
  const before = openFdCount();
  await cycle(false);
  await cycle(true);
  await waitFor(() => openFdCount() === before, () => `fds: ${openFdCount()} open, ${before} before`);
});

// --- devices built by hand: the capabilities from the spec's numbers ---

const le32 = (v: number): number[] => [v & 0xff, (v >>> 8) & 0xff, (v >>> 16) & 0xff, (v >>> 24) & 0xff];

/** virtio_pci_cap from cfg_type on (the server writes cap_vndr, cap_next, cap_len = 3 + payload). */
function vcap(cfgType: number, bar: number, offset: number, length: number, multiplier?: number) {
  return { type: 'vendor' as const, readOnly: true, payload: [cfgType, bar, 0, 0, 0, ...le32(offset), ...le32(length), ...(multiplier === undefined ? [] : le32(multiplier))] };
}

const GOOD_CAPS = [vcap(COMMON_CFG, 4, 0, 60), vcap(NOTIFY_CFG, 4, 0x3000, 4, 4), vcap(ISR_CFG, 4, 0x1000, 1), vcap(DEVICE_CFG, 4, 0x2000, 60)];

function handBuilt(options: { caps?: ReturnType<typeof vcap>[]; vendorId?: number; configRead?: (offset: number, out: Uint8Array) => void } = {}): VfioUserDeviceSpec {
  return {
    pci: { vendorId: options.vendorId ?? 0x1af4, deviceId: 0x1042, subsystemVendorId: 0x1af4, subsystemId: 2, revision: 1, classCode: 0x010000, capabilities: options.caps ?? GOOD_CAPS },
    regions: {
      4: {
        size: 0x4000,
        read: (_offset, out) => out.fill(0),
        write: () => {},
      },
    },
    irqs: { msix: 2 },
    ...(options.configRead ? { configAccess: { read: options.configRead } } : {}),
  };
}

const serveRaw = (t: TestContext, spec: VfioUserDeviceSpec): string => {
  const dir = tmp();
  const sock = path.join(dir, 'reg.sock');
  const server = VfioUserServer.listen(sock, { device: spec });
  t.after(() => {
    server.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });
  return sock;
};

const connectError = (sock: string, options: VirtioPciBlkDriverOptions = {}): Promise<unknown> =>
  VirtioPciBlkDriver.connect(sock, options).then(
    async (d) => {
      await d.close();
      return null;
    },
    (e: unknown) => e,
  );

const openHandBuilt = (t: TestContext, spec: VfioUserDeviceSpec): Promise<unknown> => connectError(serveRaw(t, spec));

const isCode = (e: unknown, code: string): boolean => e instanceof VirtioPciError && e.code === code;

test('untrusted config space: caps past their BAR, a looping list, a missing cap, a short common cfg, not virtio: typed errors at connect', async (t) => {
  // The common cfg at 0x10000 in a 16 KiB BAR.
  let e = await openHandBuilt(t, handBuilt({ caps: [vcap(COMMON_CFG, 4, 0x10000, 60), ...GOOD_CAPS.slice(1)] }));
  assert.ok(isCode(e, 'CAP_RANGE'), String(e));
  assert.match((e as Error).message, /past the end of BAR 4/);
  // The device cfg running over the end: 0x3ff0 + 60.
  e = await openHandBuilt(t, handBuilt({ caps: [...GOOD_CAPS.slice(0, 3), vcap(DEVICE_CFG, 4, 0x3ff0, 60)] }));
  assert.ok(isCode(e, 'CAP_RANGE'), String(e));
  // offset + length overflowing 32 bits.
  e = await openHandBuilt(t, handBuilt({ caps: [GOOD_CAPS[0]!, vcap(NOTIFY_CFG, 4, 0xffff_fff0, 0x20, 4), ...GOOD_CAPS.slice(2)] }));
  assert.ok(isCode(e, 'CAP_RANGE'), String(e));
  // A BAR the device has no region for.
  e = await openHandBuilt(t, handBuilt({ caps: [vcap(COMMON_CFG, 2, 0, 60), ...GOOD_CAPS.slice(1)] }));
  assert.ok(isCode(e, 'CAP_RANGE'), String(e));
  // No notify capability; a reserved BAR value (6) makes the driver ignore the cap (4.1.4), so it is missing too.
  e = await openHandBuilt(t, handBuilt({ caps: [GOOD_CAPS[0]!, GOOD_CAPS[2]!, GOOD_CAPS[3]!] }));
  assert.ok(isCode(e, 'MISSING_CAP'), String(e));
  e = await openHandBuilt(t, handBuilt({ caps: [GOOD_CAPS[0]!, vcap(NOTIFY_CFG, 6, 0x3000, 4, 4), GOOD_CAPS[2]!, GOOD_CAPS[3]!] }));
  assert.ok(isCode(e, 'MISSING_CAP'), String(e));
  // A notify capability of 16 bytes (no notify_off_multiplier).
  e = await openHandBuilt(t, handBuilt({ caps: [GOOD_CAPS[0]!, vcap(NOTIFY_CFG, 4, 0x3000, 4), GOOD_CAPS[2]!, GOOD_CAPS[3]!] }));
  assert.ok(isCode(e, 'CAPABILITY'), String(e));
  // A 1.0 common cfg needs 56 bytes.
  e = await openHandBuilt(t, handBuilt({ caps: [vcap(COMMON_CFG, 4, 0, 40), ...GOOD_CAPS.slice(1)] }));
  assert.ok(isCode(e, 'CAPABILITY'), String(e));
  // The capability list loops: the first capability's cap_next pointing at itself, as the device answers config reads.
  e = await openHandBuilt(
    t,
    handBuilt({
      configRead: (offset, out) => {
        // Capabilities start at 0x40 (our server's placement); its next byte is 0x41.
        if (offset <= 0x41 && offset + out.length > 0x41) out[0x41 - offset] = 0x40;
      },
    }),
  );
  assert.ok(isCode(e, 'CAPABILITY'), String(e));
  assert.match((e as Error).message, /loops/);
  // A capability pointer into the header.
  e = await openHandBuilt(
    t,
    handBuilt({
      configRead: (offset, out) => {
        if (offset <= 0x34 && offset + out.length > 0x34) out[0x34 - offset] = 0x10;
      },
    }),
  );
  assert.ok(isCode(e, 'CAPABILITY'), String(e));
  // Not virtio.
  e = await openHandBuilt(t, handBuilt({ vendorId: 0x8086 }));
  assert.ok(isCode(e, 'NOT_VIRTIO'), String(e));
});

/** virtio_pci_common_cfg offsets (4.1.4.3), by hand. */
const DFSELECT = 0, DF = 4, NUM_QUEUES = 18, STATUS = 20, CFG_GEN = 21, Q_SELECT = 22, Q_SIZE = 24, Q_MSIX = 26, Q_NOTIFY_OFF = 30;
const FEATURES_OK = 8;

interface RegisterDeviceOptions {
  /** Offered features (default VERSION_1 | FLUSH). */
  features?: bigint;
  numQueues?: number;
  /** queue_size of every existing queue (default 64). */
  queueMax?: number;
  /** The status the device keeps after the driver writes `written` (default: what was written). */
  status?: (written: number) => number;
  /** config_generation on each read (default 0). */
  generation?: () => number;
  notifyOff?: number;
  /** Whether queue_msix_vector takes what is written (default true; false reads NO_VECTOR). */
  takesVectors?: boolean;
  /** virtio_blk_config (default: capacity 2048 sectors). */
  config?: Buffer;
}

/**
 * A device that is only registers: a common cfg that stores what is written
 * (with the behaviours above), an ISR, a device config, a notify area that
 * does nothing. It never processes a ring.
 */
function registerDevice(o: RegisterDeviceOptions = {}): VfioUserDeviceSpec & { notifies: number } {
  const features = o.features ?? (F_VERSION_1 | BLK_F_FLUSH);
  const common = Buffer.alloc(60);
  const config = o.config ?? Buffer.from([0x00, 0x08, 0, 0, 0, 0, 0, 0]);
  const queues = o.numQueues ?? 1;
  const dev = {
    notifies: 0,
    pci: { vendorId: 0x1af4, deviceId: 0x1042, subsystemVendorId: 0x1af4, subsystemId: 2, revision: 1, classCode: 0x010000, capabilities: GOOD_CAPS },
    regions: {
      4: {
        size: 0x4000,
        read: (offset: number, out: Uint8Array): void => {
          const img = Buffer.from(common);
          const sel = common.readUInt32LE(DFSELECT);
          img.writeUInt32LE(sel < 2 ? Number((features >> BigInt(32 * sel)) & 0xffff_ffffn) : 0, DF);
          img.writeUInt16LE(queues, NUM_QUEUES);
          img[CFG_GEN] = o.generation?.() ?? 0;
          const q = common.readUInt16LE(Q_SELECT);
          if (common.readUInt16LE(Q_SIZE) === 0 || q >= queues) img.writeUInt16LE(q < queues ? (o.queueMax ?? 64) : 0, Q_SIZE);
          img.writeUInt16LE(o.notifyOff ?? q, Q_NOTIFY_OFF);
          out.fill(0);
          for (let i = 0; i < out.length; i++) {
            const at = offset + i;
            if (at < 60) out[i] = img[at]!;
            else if (at >= 0x2000 && at < 0x2000 + config.length) out[i] = config[at - 0x2000]!;
          }
        },
        write: (offset: number, data: Uint8Array): void => {
          if (offset >= 0x3000) {
            dev.notifies++;
            return;
          }
          if (offset + data.length > 60) return;
          common.set(data, offset);
          if (offset === STATUS) {
            if (data[0] === 0) common.fill(0, 0, 60);
            common[STATUS] = o.status ? o.status(data[0]!) : data[0]!;
          }
          if (offset === Q_MSIX && o.takesVectors === false) common.writeUInt16LE(0xffff, Q_MSIX);
        },
      },
    },
    irqs: { msix: 4 },
  };
  return dev;
}

test('untrusted registers: a reset that never ends, features refused, a config that never settles, bad queue registers: typed errors, no fd left', async (t) => {
  const cases: [string, RegisterDeviceOptions, VirtioPciBlkDriverOptions, string, RegExp][] = [
    ['status never reads 0 after a reset', { status: () => 0x40 }, { resetTimeoutMs: 50 }, 'RESET_TIMEOUT', /status 0/],
    ['no VERSION_1 (a legacy device)', { features: BLK_F_FLUSH }, {}, 'FEATURES', /VERSION_1/],
    ['FEATURES_OK does not stick', { status: (w) => w & ~FEATURES_OK }, {}, 'FEATURES', /refused FEATURES_OK/],
    ['packed asked for, not offered', {}, { packed: true }, 'FEATURES', /RING_PACKED/],
    ['config_generation changes on every read', { generation: (() => { let g = 0; return () => g++ & 0xff; })() }, {}, 'CONFIG_GENERATION', /config_generation/],
    ['a capacity past 2^53 bytes', { config: Buffer.alloc(8, 0xff) }, {}, 'DEVICE_ERROR', /capacity/],
    ['queue 0 does not exist', { queueMax: 0 }, {}, 'QUEUE', /no queue 0/],
    ['two queues asked of a one-queue device', {}, { queues: 2 }, 'QUEUE', /2 queues asked for/],
    ['a queue_notify_off past the notify area', { notifyOff: 100 }, {}, 'QUEUE', /notify offset 100/],
    ['a queue vector not taken', { takesVectors: false }, {}, 'NO_MSIX', /vector/],
  ];
  const before = openFdCount();
  for (const [what, dev, opts, code, message] of cases) {
    const dir = tmp();
    const server = VfioUserServer.listen(path.join(dir, 'reg.sock'), { device: registerDevice(dev) });
    const e = await connectError(server.path, opts);
    server.close();
    fs.rmSync(dir, { recursive: true, force: true });
    assert.ok(isCode(e, code), `${what}: ${String(e)}`);
    assert.match((e as Error).message, message, what);
  }
  await waitFor(() => openFdCount() <= before, () => `fds: ${openFdCount()} open, ${before} before`);
});

test('a device that takes requests and never completes them: TIMEOUT for every pending request, none left hanging', async (t) => {
  const dev = registerDevice();
  const d = await VirtioPciBlkDriver.connect(serveRaw(t, dev), { ioTimeoutMs: 100, queueSize: 4 });
  t.after(() => d.close());
  assert.equal(d.capacity, 2048 * SECTOR);
  // More than the ring holds: 4 on the ring, 4 waiting.
  const settled = await Promise.allSettled(Array.from({ length: 8 }, (_, i) => d.read(i * SECTOR, SECTOR)));
  for (const r of settled) assert.ok(r.status === 'rejected' && isCode(r.reason, 'TIMEOUT'), String(r.status === 'rejected' ? r.reason : r.status));
  assert.ok(dev.notifies >= 1, 'the device was notified');
  await assert.rejects(d.getId(), (e: unknown) => isCode(e, 'TIMEOUT'));
});

test('bounded random run: our device with bytes of its BAR and config space reads changed at random: only typed errors, nothing hangs', { timeout: 120_000 }, async (t) => {
  let rng = new Rng(1);
  let fuzzing = false;
  const s = serveBlk(t, {
    wrap: (spec) => {
      const bar = spec.regions![4]!;
      const cfg = spec.configAccess!;
      const flip = (out: Uint8Array, from: number): void => {
        if (!fuzzing || out.length === 0 || !rng.chance(0.15)) return;
        const i = rng.range(from, out.length);
        if (i < out.length) out[i] = rng.int(256);
      };
      return {
        ...spec,
        regions: { ...spec.regions, 4: { ...bar, read: (offset, out) => (bar.read!(offset, out), flip(out, 0)) } },
        configAccess: { ...cfg, read: (offset, out, config) => (cfg.read!(offset, out, config), flip(out, Math.max(0, 0x34 - offset))) },
      };
    },
  });
  const outcomes = new Map<string, number>();
  const count = (k: string): void => void outcomes.set(k, (outcomes.get(k) ?? 0) + 1);
  const typed = (e: unknown): boolean => e instanceof VirtioPciError || e instanceof BlkIoError;
  for (let i = 0; i < 150; i++) {
    rng = Rng.forInput(0x5eed, i);
    fuzzing = true;
    let d: VirtioPciBlkDriver;
    try {
      d = await VirtioPciBlkDriver.connect(s.sock, { resetTimeoutMs: 20, ioTimeoutMs: 500, queueSize: 8, packed: rng.chance(0.5) ? 'auto' : false });
    } catch (e) {
      assert.ok(typed(e), `input ${i}: connect threw ${String((e as Error).stack ?? e)}`);
      count((e as VirtioPciError).code ?? 'BlkIoError');
      continue;
    }
    count('connected');
    const ops = await Promise.allSettled([d.read(0, 4096), d.write(4096, pattern(4096, i)), d.getId(), d.flush()]);
    for (const r of ops) if (r.status === 'rejected') assert.ok(typed(r.reason) || r.reason instanceof RangeError, `input ${i}: ${String(r.reason)}`);
    await d.close();
  }
  fuzzing = false;
  // The device still works for a driver that is told the truth.
  const d = await connect(t, s);
  await roundTrip(d, s, 0, 8192, 11);
  assert.ok((outcomes.get('connected') ?? 0) > 0 && outcomes.size > 2, `a mix of outcomes: ${JSON.stringify([...outcomes])}`);
});

test('the transport on its own: discovery of our device, the capability ranges it found', async (t) => {
  const s = serveBlk(t);
  const tr = await VirtioPciTransport.connect(s.sock);
  t.after(() => tr.close());
  assert.deepEqual([tr.common.bar, tr.common.offset, tr.common.length], [4, 0, 60]);
  assert.deepEqual([tr.notifyCap.bar, tr.notifyCap.offset, tr.notifyMultiplier], [4, NOTIFY_AT, 4]);
  assert.deepEqual([tr.isr.bar, tr.isr.offset, tr.isr.length], [4, 0x1000, 1]);
  assert.deepEqual([tr.deviceCfg!.bar, tr.deviceCfg!.offset], [4, 0x2000]);
  assert.equal(tr.msixVectors, 2);
  await tr.reset();
  const offered = await tr.deviceFeatures();
  assert.equal(offered, s.spec.transport.offered);
  // Only offered bits are written (bit 40 is not offered); VERSION_1 is always asked for.
  const f = await tr.negotiate(BLK_F_FLUSH | (1n << 40n));
  assert.equal(f, F_VERSION_1 | BLK_F_FLUSH, 'only offered bits are accepted');
  const cfg = await tr.readConfig(0, 8);
  assert.equal(cfg.readBigUInt64LE(0), BigInt(IMAGE_BYTES / SECTOR));
  await assert.rejects(tr.readConfig(0, 61), (e: unknown) => isCode(e, 'STATE'));
  await assert.rejects(tr.setupQueue(1, { size: 8, vector: 0xffff }), (e: unknown) => isCode(e, 'QUEUE'), 'no queue 1');
  await assert.rejects(tr.setupQueue(0, { size: 12, vector: 0xffff }), (e: unknown) => isCode(e, 'QUEUE'), 'not a power of two');
  await assert.rejects(tr.setupInterrupts(3), (e: unknown) => isCode(e, 'NO_MSIX'));
});

test('the transport drives another device: a frame from one virtio-net PCI port of a switch to another, split and packed', async (t) => {
  for (const packed of [false, true]) {
    const sw = new NetSwitch();
    const macs = ['52:54:00:00:00:0a', '52:54:00:00:00:0b'];
    const ports = [];
    for (const mac of macs) {
      const spec = virtioNetPciDevice({ switch: sw, mac });
      const sock = serveRaw(t, spec);
      const tr = await VirtioPciTransport.connect(sock);
      t.after(async () => {
        await tr.close();
        spec.close();
      });
      assert.equal(tr.ids.virtioId, 1, 'virtio-net');
      await tr.reset();
      const f = await tr.negotiate(NET_F_MAC | (packed ? F_RING_PACKED : 0n));
      assert.equal(f, F_VERSION_1 | NET_F_MAC | (packed ? F_RING_PACKED : 0n));
      assert.deepEqual([...(await tr.readConfig(0, 6))], mac.split(':').map((h) => parseInt(h, 16)), 'virtio_net_config.mac');
      await tr.setupInterrupts(3);
      const rx = await tr.setupQueue<number>(0, { size: 16, vector: 1 });
      const tx = await tr.setupQueue<number>(1, { size: 16, vector: 2 });
      assert.equal(rx.ring.packed, packed);
      // 16 RX buffers of 2 KiB (virtio_net_hdr of 12 bytes with VERSION_1, then the frame), TX from 32 KiB on.
      const mem = await tr.allocate(64 * 1024);
      for (let i = 0; i < 16; i++) assert.ok(rx.ring.add([{ addr: mem.iova + i * 2048, len: 2048, write: true }], i));
      await tr.driverOk();
      rx.notify();
      ports.push({ spec, tr, rx, tx, mem });
    }
    const [a, b] = ports as [(typeof ports)[0], (typeof ports)[0]];
    await waitFor(() => a.spec.net.rxReady && b.spec.net.rxReady, 'both RX rings running');
    // A broadcast frame from port a (dst ff:ff:ff:ff:ff:ff, src a's MAC, ethertype 0x88b5), bytes by hand.
    const frame = Buffer.concat([Buffer.alloc(6, 0xff), Buffer.from([0x52, 0x54, 0, 0, 0, 0x0a, 0x88, 0xb5]), pattern(100, packed ? 2 : 1)]);
    const got = new Promise<{ token: number; len: number }>((resolve) => {
      const stop = b.rx.interrupt!.subscribe(() => {
        const u = b.rx.ring.getUsed();
        if (!u) return;
        stop();
        resolve(u);
      });
    });
    a.mem.memory.bytes.fill(0, 32 * 1024, 32 * 1024 + 12);
    a.mem.memory.bytes.set(frame, 32 * 1024 + 12);
    assert.ok(a.tx.ring.add([{ addr: a.mem.iova + 32 * 1024, len: 12 + frame.length, write: false }], 99));
    if (a.tx.ring.needsKick()) a.tx.notify();
    const u = await got;
    assert.equal(u.len, 12 + frame.length, 'virtio_net_hdr + the frame');
    assert.ok(Buffer.from(b.mem.memory.bytes.subarray(u.token * 2048 + 12, u.token * 2048 + 12 + frame.length)).equals(frame), 'the frame arrived whole');
    await waitFor(() => a.tx.ring.getUsed()?.token === 99, 'the TX buffer came back');
    sw.close();
  }
});

// --- helpers ---

/** Queue 0's ring addresses as the driver wrote them to the common cfg. */
interface QueueRegs {
  desc: number;
  driver: number;
  device: number;
}

/**
 * Wraps our device: common cfg writes are watched for queue 0's ring
 * addresses, and a write to the notify area goes to `onNotify` first (false:
 * the device never sees it).
 */
function intercept(spec: VirtioBlkPciDeviceSpec, onNotify: (ctx: DeviceContext, regs: QueueRegs) => boolean): VfioUserDeviceSpec {
  const bar = spec.regions![4]!;
  const shadow = Buffer.alloc(64);
  let ctx: DeviceContext | null = null;
  const regs = (): QueueRegs => ({ desc: Number(shadow.readBigUInt64LE(Q_DESC)), driver: Number(shadow.readBigUInt64LE(Q_DRIVER)), device: Number(shadow.readBigUInt64LE(Q_DEVICE)) });
  return {
    ...spec,
    attach: (c) => {
      ctx = c;
      spec.attach!(c);
    },
    regions: {
      ...spec.regions,
      4: {
        ...bar,
        ioEventFds: [],
        write: (offset, data) => {
          if (offset + data.length <= shadow.length) shadow.set(data, offset);
          if (offset >= NOTIFY_AT && offset < NOTIFY_AT + 4 && ctx && !onNotify(ctx, regs())) return;
          bar.write!(offset, data);
        },
      },
    },
  };
}

async function waitFor(cond: () => boolean, what: string | (() => string), timeoutMs = 5000): Promise<void> {
  const t0 = Date.now();
  while (!cond()) {
    if (Date.now() - t0 > timeoutMs) throw new Error(`not within ${timeoutMs} ms: ${typeof what === 'function' ? what() : what}`);
    await tick(2);
  }
}
