/**
 * virtio-blk as a virtio PCI modern device over vfio-user, driven by our
 * vfio-user client as a guest driver would: the virtio capabilities found in
 * config space at hand-written offsets (virtio 1.2 4.1.4), the common cfg
 * (4.1.4.3) read and written field by field, split rings laid out by hand in
 * a memfd DMA window, MSI-X vector eventfds, kicks through the notify area
 * (REGION_WRITE) and through the ioeventfds of GET_REGION_IO_FDS, reads and
 * writes checked against the disk file; then a migration between two of our
 * servers with requests in flight.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { VfioUserServer } from '../src/vfio-user/server.js';
import { VfioUserClient } from '../src/vfio-user/client.js';
import { VfioUserDevice } from '../src/vfio-user/client-device.js';
import { migrate } from '../src/vfio-user/migrate.js';
import { Command } from '../src/vfio-user/constants.js';
import { SharedMemory, EventFd } from '../src/sys/index.js';
import { virtioBlkPciDevice, type VirtioBlkPciDeviceSpec, type VirtioBlkPciOptions } from '../src/devices/virtio-blk-pci.js';
import { tick } from './helpers/sys.js';

/** Waits until `cond()` (which may be async) holds, checking every few ms. */
async function waitFor(cond: () => boolean | Promise<boolean>, what: string | (() => string), timeoutMs = 5000): Promise<void> {
  const t0 = performance.now();
  while (!(await cond())) {
    if (performance.now() - t0 >= timeoutMs) throw new Error(`condition not met within ${timeoutMs} ms: ${typeof what === 'function' ? what() : what}`);
    await tick(2);
  }
}

// --- the spec's numbers, by hand ---

// PCI config space header.
const PCI_VENDOR = 0x00, PCI_DEVICE = 0x02, PCI_STATUS = 0x06, PCI_REVISION = 0x08, PCI_CLASS = 0x09;
const PCI_SUBSYS_VENDOR = 0x2c, PCI_SUBSYS_ID = 0x2e, PCI_CAP_PTR = 0x34, PCI_STATUS_CAP_LIST = 0x10;
const CAP_VNDR = 0x09, CAP_MSIX = 0x11;
// virtio_pci_cap cfg_type.
const COMMON_CFG = 1, NOTIFY_CFG = 2, ISR_CFG = 3, DEVICE_CFG = 4, PCI_CFG = 5;
// virtio_pci_common_cfg offsets (4.1.4.3).
const DFSELECT = 0, DF = 4, GFSELECT = 8, GF = 12, MSIX_CONFIG = 16, NUM_QUEUES = 18, STATUS = 20, CFG_GEN = 21;
const Q_SELECT = 22, Q_SIZE = 24, Q_MSIX = 26, Q_ENABLE = 28, Q_NOTIFY_OFF = 30, Q_DESC = 32, Q_DRIVER = 40, Q_DEVICE = 48;
// device_status.
const ACKNOWLEDGE = 1, DRIVER = 2, DRIVER_OK = 4, FEATURES_OK = 8, NEEDS_RESET = 64;
const NO_VECTOR = 0xffff;
// Features.
const F_VERSION_1 = 1n << 32n, F_RING_PACKED = 1n << 34n, F_EVENT_IDX = 1n << 29n, F_INDIRECT = 1n << 28n;
const BLK_F_SEG_MAX = 1n << 2n, BLK_F_BLK_SIZE = 1n << 6n, BLK_F_FLUSH = 1n << 9n;
// virtio-blk requests.
const T_IN = 0, T_OUT = 1, T_FLUSH = 4, T_GET_ID = 8;
// Split ring descriptor flags.
const VRING_DESC_F_NEXT = 1, VRING_DESC_F_WRITE = 2;
// vfio-user irq indexes, migration states.
const IRQ_INTX = 0, IRQ_MSIX = 2;
const MIG_STOP = 1, MIG_RUNNING = 2;

const SECTOR = 512;
const DISK_BYTES = 1 << 20;
/** Guest RAM: 4 MiB at GPA (= IOVA) 1 GiB. */
const RAM_GPA = 0x4000_0000;
const RAM_BYTES = 4 << 20;

const tmp = (): string => fs.mkdtempSync(path.join(os.tmpdir(), 'vdk-vpci-'));

/** A disk image whose sector s is filled with (s * 7 + i) & 0xff. */
function makeDisk(dir: string): string {
  const file = path.join(dir, 'disk.img');
  const b = Buffer.alloc(DISK_BYTES);
  for (let i = 0; i < b.length; i++) b[i] = (Math.floor(i / SECTOR) * 7 + i) & 0xff;
  fs.writeFileSync(file, b);
  return file;
}

interface Served {
  spec: VirtioBlkPciDeviceSpec;
  server: VfioUserServer;
  client: VfioUserClient;
  dev: VfioUserDevice;
}

async function serve(t: TestContext, dir: string, name: string, options: VirtioBlkPciOptions): Promise<Served> {
  const spec = virtioBlkPciDevice(options);
  const server = VfioUserServer.listen(path.join(dir, name), { device: spec });
  const client = await VfioUserClient.connect(server.path);
  const dev = new VfioUserDevice(client);
  t.after(async () => {
    dev.close();
    client.close();
    server.close();
    await tick(5);
    spec.close();
  });
  return { spec, server, client, dev };
}

/** A vendor capability found in config space. */
interface VirtioCap {
  at: number;
  type: number;
  bar: number;
  offset: number;
  length: number;
  multiplier?: number;
}

/**
 * The guest driver: config-space discovery, the common cfg, queues. Every
 * offset and bit is from the spec (the constants above), none from the code
 * under test.
 */
class Driver {
  readonly dev: VfioUserDevice;
  caps = new Map<number, VirtioCap>();
  msix: { at: number; tableSize: number; tableBar: number; tableOffset: number; pbaBar: number; pbaOffset: number } | null = null;
  cfg: Uint8Array = new Uint8Array(0);

  constructor(dev: VfioUserDevice) {
    this.dev = dev;
  }

  async discover(): Promise<void> {
    this.cfg = await this.dev.read(7, 0, 256);
    const c = Buffer.from(this.cfg);
    assert.ok(c.readUInt16LE(PCI_STATUS) & PCI_STATUS_CAP_LIST, 'capability list bit');
    let at = c[PCI_CAP_PTR]! & 0xfc;
    const seen = new Set<number>();
    while (at !== 0) {
      assert.ok(!seen.has(at) && at >= 0x40, `capability pointer 0x${at.toString(16)}`);
      seen.add(at);
      const id = c[at]!;
      if (id === CAP_VNDR) {
        const cap: VirtioCap = { at, type: c[at + 3]!, bar: c[at + 4]!, offset: c.readUInt32LE(at + 8), length: c.readUInt32LE(at + 12) };
        if (cap.type === NOTIFY_CFG) {
          assert.equal(c[at + 2], 20, 'notify cap_len');
          cap.multiplier = c.readUInt32LE(at + 16);
        } else if (cap.type === PCI_CFG) {
          assert.equal(c[at + 2], 20, 'virtio_pci_cfg_cap: cap_len 20 (the cap, then pci_cfg_data[4])');
        } else {
          assert.equal(c[at + 2], 16, 'cap_len');
        }
        if (!this.caps.has(cap.type)) this.caps.set(cap.type, cap); // the first of each type is the preferred one
      } else if (id === CAP_MSIX) {
        const table = c.readUInt32LE(at + 4);
        const pba = c.readUInt32LE(at + 8);
        this.msix = {
          at,
          tableSize: (c.readUInt16LE(at + 2) & 0x7ff) + 1,
          tableBar: table & 7,
          tableOffset: table & ~7,
          pbaBar: pba & 7,
          pbaOffset: pba & ~7,
        };
      }
      at = c[at + 1]! & 0xfc;
    }
  }

  #cap(type: number): VirtioCap {
    const cap = this.caps.get(type);
    assert.ok(cap, `virtio capability ${type}`);
    return cap;
  }

  async read(type: number, off: number, size: number): Promise<bigint> {
    const cap = this.#cap(type);
    const b = Buffer.from(await this.dev.read(cap.bar, cap.offset + off, size));
    return size === 8 ? b.readBigUInt64LE(0) : BigInt(b.readUIntLE(0, size));
  }

  async write(type: number, off: number, size: number, value: number | bigint): Promise<void> {
    const cap = this.#cap(type);
    const b = Buffer.alloc(size);
    if (size === 8) b.writeBigUInt64LE(BigInt(value));
    else b.writeUIntLE(Number(value), 0, size);
    await this.dev.write(cap.bar, cap.offset + off, b);
  }

  common = {
    r: async (off: number, size: number): Promise<number> => Number(await this.read(COMMON_CFG, off, size)),
    w: (off: number, size: number, v: number | bigint): Promise<void> => this.write(COMMON_CFG, off, size, v),
  };

  async status(): Promise<number> {
    return this.common.r(STATUS, 1);
  }

  async reset(): Promise<void> {
    await this.common.w(STATUS, 1, 0);
    await waitFor(async () => (await this.status()) === 0, 'status reads 0 after reset');
  }

  async deviceFeatures(): Promise<bigint> {
    await this.common.w(DFSELECT, 4, 0);
    const lo = BigInt(await this.common.r(DF, 4));
    await this.common.w(DFSELECT, 4, 1);
    const hi = BigInt(await this.common.r(DF, 4));
    return (hi << 32n) | lo;
  }

  /** 3.1.1: reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK (checked). Returns the features accepted. */
  async negotiate(want: bigint): Promise<bigint> {
    await this.reset();
    await this.common.w(STATUS, 1, ACKNOWLEDGE);
    await this.common.w(STATUS, 1, ACKNOWLEDGE | DRIVER);
    const offered = await this.deviceFeatures();
    const f = offered & want;
    await this.common.w(GFSELECT, 4, 0);
    await this.common.w(GF, 4, Number(f & 0xffffffffn));
    await this.common.w(GFSELECT, 4, 1);
    await this.common.w(GF, 4, Number(f >> 32n));
    await this.common.w(STATUS, 1, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert.equal(await this.status(), ACKNOWLEDGE | DRIVER | FEATURES_OK, 'FEATURES_OK accepted');
    return f;
  }

  async setupQueue(index: number, ring: SplitRing, vector: number): Promise<void> {
    await this.common.w(Q_SELECT, 2, index);
    const max = await this.common.r(Q_SIZE, 2);
    assert.ok(max >= ring.size, `queue ${index} max size ${max}`);
    await this.common.w(Q_SIZE, 2, ring.size);
    await this.common.w(Q_MSIX, 2, vector);
    assert.equal(await this.common.r(Q_MSIX, 2), vector, 'queue vector accepted');
    await this.common.w(Q_DESC, 8, ring.descGpa);
    // The driver area as two 32-bit halves, low first (a driver may: 4.1.3.1).
    await this.common.w(Q_DRIVER, 4, ring.availGpa % 2 ** 32);
    await this.common.w(Q_DRIVER + 4, 4, Math.floor(ring.availGpa / 2 ** 32));
    await this.common.w(Q_DEVICE, 8, ring.usedGpa);
    await this.common.w(Q_ENABLE, 2, 1);
    assert.equal(await this.common.r(Q_ENABLE, 2), 1);
  }

  async kick(index: number): Promise<void> {
    await this.common.w(Q_SELECT, 2, index);
    const off = await this.common.r(Q_NOTIFY_OFF, 2);
    const n = this.#cap(NOTIFY_CFG);
    const b = Buffer.alloc(2);
    b.writeUInt16LE(index);
    await this.dev.write(n.bar, n.offset + off * n.multiplier!, b);
  }
}

interface Buf {
  gpa: number;
  len: number;
  write: boolean;
}

/** The driver side of a split ring (2.7), written with DataView at the spec's offsets. */
class SplitRing {
  readonly size: number;
  readonly descGpa: number;
  readonly availGpa: number;
  readonly usedGpa: number;
  readonly #ram: DataView;
  #free: number[];
  #availIdx = 0;
  #lastUsed = 0;
  readonly #chains = new Map<number, number[]>();

  constructor(ram: SharedMemory, base: number, size: number) {
    this.size = size;
    this.descGpa = base;
    this.availGpa = base + 0x1000;
    this.usedGpa = base + 0x2000;
    this.#ram = ram.view;
    this.#free = Array.from({ length: size }, (_, i) => i);
    ram.bytes.fill(0, base - RAM_GPA, base - RAM_GPA + 0x3000); // a driver allocates its rings zeroed
  }

  #off(gpa: number): number {
    return gpa - RAM_GPA;
  }

  /** Writes a chain's descriptors and makes it available (no kick). Returns its head. */
  add(bufs: Buf[]): number {
    assert.ok(this.#free.length >= bufs.length, 'ring full');
    const ids = this.#free.splice(0, bufs.length);
    const v = this.#ram;
    bufs.forEach((b, i) => {
      const d = this.#off(this.descGpa) + 16 * ids[i]!;
      v.setBigUint64(d, BigInt(b.gpa), true);
      v.setUint32(d + 8, b.len, true);
      v.setUint16(d + 12, (b.write ? VRING_DESC_F_WRITE : 0) | (i + 1 < bufs.length ? VRING_DESC_F_NEXT : 0), true);
      v.setUint16(d + 14, i + 1 < bufs.length ? ids[i + 1]! : 0, true);
    });
    const head = ids[0]!;
    this.#chains.set(head, ids);
    const a = this.#off(this.availGpa);
    v.setUint16(a + 4 + 2 * (this.#availIdx % this.size), head, true);
    this.#availIdx = (this.#availIdx + 1) & 0xffff;
    v.setUint16(a + 2, this.#availIdx, true); // avail.idx after the entry
    return head;
  }

  get usedIdx(): number {
    return this.#ram.getUint16(this.#off(this.usedGpa) + 2, true);
  }

  get availIdx(): number {
    return this.#availIdx;
  }

  /** The used entries since the last call: { id, len }, their descriptors freed. */
  takeUsed(): { id: number; len: number }[] {
    const out: { id: number; len: number }[] = [];
    const u = this.#off(this.usedGpa);
    const idx = this.usedIdx;
    while (this.#lastUsed !== idx) {
      const e = u + 4 + 8 * (this.#lastUsed % this.size);
      const id = this.#ram.getUint32(e, true);
      out.push({ id, len: this.#ram.getUint32(e + 4, true) });
      const ids = this.#chains.get(id);
      assert.ok(ids, `used id ${id} was not in flight`);
      this.#chains.delete(id);
      this.#free.push(...ids);
      this.#lastUsed = (this.#lastUsed + 1) & 0xffff;
    }
    return out;
  }

  set availFlags(flags: number) {
    this.#ram.setUint16(this.#off(this.availGpa), flags, true);
  }
}

/** A bump allocator over guest RAM for request buffers (from 1 MiB in). */
class Heap {
  #next = RAM_GPA + (1 << 20);
  alloc(len: number, align = 16): number {
    this.#next = Math.ceil(this.#next / align) * align;
    const gpa = this.#next;
    this.#next += len;
    assert.ok(this.#next <= RAM_GPA + RAM_BYTES, 'guest heap exhausted');
    return gpa;
  }
}

/** One virtio-blk request's buffers: header (readable), data, status byte (writable). */
interface Request {
  type: number;
  sector: number;
  hdr: number;
  data: number;
  dataLen: number;
  status: number;
  head?: number;
}

function blkRequest(ram: SharedMemory, heap: Heap, type: number, sector: number, dataLen: number, fill?: (i: number) => number): Request {
  const hdr = heap.alloc(16);
  const v = ram.view;
  v.setUint32(hdr - RAM_GPA, type, true);
  v.setUint32(hdr - RAM_GPA + 4, 0, true);
  v.setBigUint64(hdr - RAM_GPA + 8, BigInt(sector), true);
  // Data on pages of its own (the dirty-log checks tell them from the header's and status's pages).
  const data = dataLen > 0 ? heap.alloc(Math.ceil(dataLen / 4096) * 4096, 4096) : 0;
  if (fill) for (let i = 0; i < dataLen; i++) ram.bytes[data - RAM_GPA + i] = fill(i);
  const status = heap.alloc(1);
  ram.bytes[status - RAM_GPA] = 0xff;
  return { type, sector, hdr, data, dataLen, status };
}

function submit(ring: SplitRing, req: Request): number {
  const deviceWrites = req.type !== T_OUT;
  const bufs: Buf[] = [{ gpa: req.hdr, len: 16, write: false }];
  if (req.dataLen > 0) bufs.push({ gpa: req.data, len: req.dataLen, write: deviceWrites });
  bufs.push({ gpa: req.status, len: 1, write: true });
  req.head = ring.add(bufs);
  return req.head;
}

const statusOf = (ram: SharedMemory, req: Request): number => ram.bytes[req.status - RAM_GPA]!;
const dataOf = (ram: SharedMemory, req: Request): Buffer => Buffer.from(ram.bytes.subarray(req.data - RAM_GPA, req.data - RAM_GPA + req.dataLen));
const diskPattern = (sector: number, len: number): Buffer => {
  const b = Buffer.alloc(len);
  for (let i = 0; i < len; i++) b[i] = (Math.floor((sector * SECTOR + i) / SECTOR) * 7 + sector * SECTOR + i) & 0xff;
  return b;
};

/** Resolves at the eventfd's next signal, or rejects after `ms`. */
function interrupt(ev: EventFd, what: string, ms = 3000): Promise<number> {
  ev.read(); // interrupts from before (not waited for) do not count
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      stop();
      reject(new Error(`no interrupt: ${what}`));
    }, ms);
    const stop = ev.subscribe((n) => {
      clearTimeout(timer);
      stop();
      resolve(n);
    });
  });
}

/** Guest RAM: a memfd, DMA-mapped by fd at RAM_GPA. */
async function guestRam(t: TestContext, ...clients: VfioUserClient[]): Promise<SharedMemory> {
  const ram = SharedMemory.create(RAM_BYTES);
  t.after(() => ram.close());
  for (const c of clients) await c.dmaMap({ iova: RAM_GPA, size: RAM_BYTES, memory: ram });
  return ram;
}

/** A driver through FEATURES_OK, queue 0 at RAM_GPA with vector 1, MSI-X vectors 0 and 1 wired, DRIVER_OK. */
async function bringUp(t: TestContext, s: Served, ram: SharedMemory, want = F_VERSION_1 | BLK_F_FLUSH | BLK_F_BLK_SIZE, size = 16) {
  const drv = new Driver(s.dev);
  await drv.discover();
  const features = await drv.negotiate(want);
  const ring = new SplitRing(ram, RAM_GPA, size);
  const cfgIrq = EventFd.create();
  const qIrq = EventFd.create();
  t.after(() => {
    cfgIrq.close();
    qIrq.close();
  });
  await s.dev.setEventFds(IRQ_MSIX, 0, [cfgIrq, qIrq]);
  await drv.common.w(MSIX_CONFIG, 2, 0);
  await drv.setupQueue(0, ring, 1);
  await drv.common.w(STATUS, 1, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
  return { drv, ring, features, cfgIrq, qIrq };
}

test('config space: virtio ids, the four virtio capabilities into BAR4, MSI-X in BAR1', async (t) => {
  const dir = tmp();
  const s = await serve(t, dir, 'a.sock', { file: makeDisk(dir) });
  const drv = new Driver(s.dev);
  await drv.discover();
  const c = Buffer.from(drv.cfg);
  assert.equal(c.readUInt16LE(PCI_VENDOR), 0x1af4);
  assert.equal(c.readUInt16LE(PCI_DEVICE), 0x1040 + 2, 'modern virtio-blk: 0x1040 + device id 2');
  assert.equal(c[PCI_REVISION], 1, 'revision 1 (modern only)');
  assert.equal(c.readUIntLE(PCI_CLASS, 3), 0x010000, 'mass storage');
  assert.equal(c.readUInt16LE(PCI_SUBSYS_VENDOR), 0x1af4);
  assert.equal(c.readUInt16LE(PCI_SUBSYS_ID), 2);
  assert.deepEqual([...drv.caps.keys()].sort(), [COMMON_CFG, NOTIFY_CFG, ISR_CFG, DEVICE_CFG, PCI_CFG]);
  for (const cap of drv.caps.values()) if (cap.type !== PCI_CFG) assert.equal(cap.bar, 4, `cap ${cap.type} in BAR4`);
  assert.equal(drv.caps.get(COMMON_CFG)!.length, 60, 'the 1.2 common cfg is 60 bytes');
  assert.equal(drv.caps.get(DEVICE_CFG)!.length, 60, 'virtio_blk_config');
  assert.equal(drv.caps.get(NOTIFY_CFG)!.multiplier, 4);
  assert.equal(drv.caps.get(NOTIFY_CFG)!.length, 4, 'one queue: 4 bytes of notify area');
  assert.ok(drv.msix);
  assert.equal(drv.msix.tableSize, 2, 'config vector + one queue');
  assert.equal(drv.msix.tableBar, 1);
  // BAR4: a 32-bit memory BAR of 16 KiB, by message (no mmap), its size probed the PCI way.
  const info = await s.dev.regionInfo(4);
  assert.equal(info.size, 0x4000);
  assert.equal(info.mapped.length, 0);
  await s.dev.write(7, 0x20, Buffer.from([0xff, 0xff, 0xff, 0xff]));
  assert.equal(Buffer.from(await s.dev.read(7, 0x20, 4)).readUInt32LE(0), 0xffffc000);
  // The capabilities are read-only.
  const common = drv.caps.get(COMMON_CFG)!;
  await assert.rejects(s.dev.write(7, common.at + 8, Buffer.from([0x10, 0, 0, 0])));
  // Device config: virtio_blk_config.capacity (sectors).
  assert.equal(await drv.read(DEVICE_CFG, 0, 8), BigInt(DISK_BYTES / SECTOR));
  assert.equal(Number(await drv.read(DEVICE_CFG, 20, 4)), SECTOR, 'blk_size');
  assert.equal(await drv.common.r(NUM_QUEUES, 2), 1);
});

test('features, status and the common cfg registers (4.1.4.3)', async (t) => {
  const dir = tmp();
  const s = await serve(t, dir, 'a.sock', { file: makeDisk(dir) });
  const drv = new Driver(s.dev);
  await drv.discover();
  const offered = await drv.deviceFeatures();
  assert.ok(offered & F_VERSION_1, 'VERSION_1');
  assert.ok(offered & BLK_F_FLUSH && offered & BLK_F_SEG_MAX && offered & BLK_F_BLK_SIZE);
  assert.ok(offered & F_RING_PACKED && offered & F_EVENT_IDX && offered & F_INDIRECT, 'the engine\'s ring features');
  assert.equal(offered & (1n << 30n), 0n, 'no vhost-user bits (PROTOCOL_FEATURES)');
  assert.equal(offered & (1n << 33n), 0n, 'no ACCESS_PLATFORM by default');
  await drv.common.w(DFSELECT, 4, 2);
  assert.equal(await drv.common.r(DF, 4), 0, 'feature words past 64 bits are 0');
  // FEATURES_OK is refused without VERSION_1, and for a feature not offered.
  await drv.reset();
  await drv.common.w(STATUS, 1, ACKNOWLEDGE | DRIVER);
  await drv.common.w(GFSELECT, 4, 0);
  await drv.common.w(GF, 4, Number(BLK_F_FLUSH));
  await drv.common.w(STATUS, 1, ACKNOWLEDGE | DRIVER | FEATURES_OK);
  assert.equal(await drv.status(), ACKNOWLEDGE | DRIVER, 'no VERSION_1: FEATURES_OK stays clear');
  await drv.reset();
  await drv.common.w(STATUS, 1, ACKNOWLEDGE | DRIVER);
  await drv.common.w(GFSELECT, 4, 1);
  await drv.common.w(GF, 4, 1 | (1 << 8)); // VERSION_1 and bit 40 (RING_RESET), not offered
  await drv.common.w(STATUS, 1, ACKNOWLEDGE | DRIVER | FEATURES_OK);
  assert.equal(await drv.status(), ACKNOWLEDGE | DRIVER, 'an unoffered feature: FEATURES_OK stays clear');
  // A good negotiation; driver_feature reads back what was written.
  const f = await drv.negotiate(F_VERSION_1 | BLK_F_FLUSH);
  assert.equal(f, F_VERSION_1 | BLK_F_FLUSH);
  await drv.common.w(GFSELECT, 4, 0);
  assert.equal(await drv.common.r(GF, 4), Number(BLK_F_FLUSH));
  // Queue registers: max size after reset, out-of-range select reads size 0, vectors past the table read NO_VECTOR.
  await drv.common.w(Q_SELECT, 2, 0);
  assert.equal(await drv.common.r(Q_SIZE, 2), 1024, 'the blk device\'s largest ring');
  assert.equal(await drv.common.r(Q_MSIX, 2), NO_VECTOR);
  await drv.common.w(Q_MSIX, 2, 7);
  assert.equal(await drv.common.r(Q_MSIX, 2), NO_VECTOR, 'a vector the device cannot use');
  await drv.common.w(MSIX_CONFIG, 2, 0);
  assert.equal(await drv.common.r(MSIX_CONFIG, 2), 0);
  await drv.common.w(Q_DESC, 8, 0x1234_5000);
  assert.equal(await drv.read(COMMON_CFG, Q_DESC, 8), 0x1234_5000n);
  await drv.common.w(Q_SELECT, 2, 1);
  assert.equal(await drv.common.r(Q_SIZE, 2), 0, 'queue 1 does not exist');
  assert.equal(await drv.common.r(CFG_GEN, 1), 0);
  // Reset: everything back.
  await drv.reset();
  await drv.common.w(Q_SELECT, 2, 0);
  assert.equal(await drv.read(COMMON_CFG, Q_DESC, 8), 0n);
  assert.equal(await drv.common.r(MSIX_CONFIG, 2), NO_VECTOR);
});

test('reads, writes, flush and GET_ID through a split ring, kicked through the notify area, MSI-X interrupts', async (t) => {
  const dir = tmp();
  const file = makeDisk(dir);
  const s = await serve(t, dir, 'a.sock', { file, serial: 'vpci-serial-1' });
  const ram = await guestRam(t, s.client);
  const { drv, ring, qIrq } = await bringUp(t, s, ram);
  const heap = new Heap();

  // A read of 4 sectors at sector 10.
  const rd = blkRequest(ram, heap, T_IN, 10, 4 * SECTOR);
  submit(ring, rd);
  let irq = interrupt(qIrq, 'read completion');
  await drv.kick(0);
  await irq;
  let used = ring.takeUsed();
  assert.deepEqual(used, [{ id: rd.head, len: 4 * SECTOR + 1 }], 'used entry: data and the status byte');
  assert.equal(statusOf(ram, rd), 0, 'VIRTIO_BLK_S_OK');
  assert.deepEqual(dataOf(ram, rd), fs.readFileSync(file).subarray(10 * SECTOR, 14 * SECTOR));

  // Two writes and a flush in one kick; then the file has them.
  const w1 = blkRequest(ram, heap, T_OUT, 3, 2 * SECTOR, (i) => (i * 3 + 1) & 0xff);
  const w2 = blkRequest(ram, heap, T_OUT, 100, SECTOR, (i) => 0xa5 ^ (i & 0xff));
  const fl = blkRequest(ram, heap, T_FLUSH, 0, 0);
  for (const r of [w1, w2, fl]) submit(ring, r);
  irq = interrupt(qIrq, 'write completions');
  await drv.kick(0);
  await irq;
  await waitFor(() => ring.usedIdx === 4, 'three more used entries');
  used = ring.takeUsed();
  assert.deepEqual(new Set(used.map((u) => u.id)), new Set([w1.head, w2.head, fl.head]));
  for (const u of used) assert.equal(u.len, 1, 'a write writes only its status byte');
  for (const r of [w1, w2, fl]) assert.equal(statusOf(ram, r), 0);
  const disk = fs.readFileSync(file);
  assert.deepEqual(disk.subarray(3 * SECTOR, 5 * SECTOR), dataOf(ram, w1));
  assert.deepEqual(disk.subarray(100 * SECTOR, 101 * SECTOR), dataOf(ram, w2));
  assert.deepEqual(disk.subarray(5 * SECTOR, 6 * SECTOR), diskPattern(5, SECTOR), 'the next sector is untouched');

  // Read back what was written, and GET_ID.
  const back = blkRequest(ram, heap, T_IN, 3, 2 * SECTOR);
  const id = blkRequest(ram, heap, T_GET_ID, 0, 20);
  submit(ring, back);
  submit(ring, id);
  irq = interrupt(qIrq, 'read-back');
  await drv.kick(0);
  await irq;
  await waitFor(() => ring.usedIdx === 6, 'six used');
  ring.takeUsed();
  assert.deepEqual(dataOf(ram, back), dataOf(ram, w1));
  assert.equal(dataOf(ram, id).toString('latin1').replace(/\0+$/, ''), 'vpci-serial-1');

  // A read past the end of the disk: IOERR, nothing lost.
  const bad = blkRequest(ram, heap, T_IN, DISK_BYTES / SECTOR, SECTOR);
  submit(ring, bad);
  irq = interrupt(qIrq, 'error completion');
  await drv.kick(0);
  await irq;
  ring.takeUsed();
  assert.equal(statusOf(ram, bad), 1, 'VIRTIO_BLK_S_IOERR');
  assert.equal(s.spec.disk.stats.reads, 3);
  assert.equal(s.spec.disk.stats.writes, 2);
  assert.equal(s.spec.transport.stats.kicks, 4);
});

test('ioeventfds from GET_REGION_IO_FDS kick the queues; VIRTIO_F_EVENT_IDX', async (t) => {
  const dir = tmp();
  const file = makeDisk(dir);
  const s = await serve(t, dir, 'a.sock', { file });
  const ram = await guestRam(t, s.client);
  const { ring, qIrq, features } = await bringUp(t, s, ram, F_VERSION_1 | F_EVENT_IDX);
  assert.ok(features & F_EVENT_IDX);
  // GET_REGION_IO_FDS on BAR4: first the size, then the entries with their fds.
  const small = await s.client.request(Command.DEVICE_GET_REGION_IO_FDS, { argsz: 16, flags: 0, index: 4, count: 0 }, { takeFds: true });
  assert.equal(small.body.count, 1);
  assert.equal(small.fds.length, 0, 'no fds when the entries do not fit');
  const r = await s.client.request(Command.DEVICE_GET_REGION_IO_FDS, { argsz: small.body.argsz, flags: 0, index: 4, count: 0 }, { takeFds: true });
  assert.equal(r.body.entries.length, 1);
  assert.equal(r.body.entries[0]!.offset, 0x3000, 'queue 0 notify address');
  assert.equal(r.fds.length, 1);
  const kickFd = new EventFd(r.fds[0]!);
  t.after(() => kickFd.close());
  const heap = new Heap();
  // With EVENT_IDX, used_event (after avail.ring[size]) says when to interrupt: after each entry here.
  for (let round = 0; round < 3; round++) {
    const req = blkRequest(ram, heap, T_IN, round, SECTOR);
    submit(ring, req);
    const v = new DataView(ram.buffer);
    v.setUint16(ring.availGpa - RAM_GPA + 4 + 2 * ring.size, ring.usedIdx, true); // used_event
    const irq = interrupt(qIrq, `round ${round}`);
    kickFd.signal(1);
    await irq;
    ring.takeUsed();
    assert.equal(statusOf(ram, req), 0);
    assert.deepEqual(dataOf(ram, req), diskPattern(round, SECTOR));
    // The device keeps avail_event (after used.ring[size]) at its next avail index.
    assert.equal(v.getUint16(ring.usedGpa - RAM_GPA + 4 + 8 * ring.size, true), round + 1, 'avail_event');
  }
  assert.equal(s.spec.transport.stats.ioeventfdKicks, 3);
  assert.equal(s.spec.transport.stats.kicks, 0, 'no REGION_WRITE kick');
});

test('INTx and the ISR when the driver gives no vector; DEVICE_NEEDS_RESET for a ring the device cannot reach', async (t) => {
  const dir = tmp();
  const s = await serve(t, dir, 'a.sock', { file: makeDisk(dir) });
  const ram = await guestRam(t, s.client);
  const drv = new Driver(s.dev);
  await drv.discover();
  await drv.negotiate(F_VERSION_1);
  const intx = EventFd.create();
  t.after(() => intx.close());
  await s.dev.setEventFds(IRQ_INTX, 0, [intx]);
  const ring = new SplitRing(ram, RAM_GPA, 8);
  await drv.setupQueue(0, ring, NO_VECTOR);
  await drv.common.w(STATUS, 1, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
  const heap = new Heap();
  const req = blkRequest(ram, heap, T_IN, 1, SECTOR);
  submit(ring, req);
  const irq = interrupt(intx, 'INTx');
  await drv.kick(0);
  await irq;
  assert.equal(Number(await drv.read(ISR_CFG, 0, 1)), 1, 'ISR: queue interrupt');
  assert.equal(Number(await drv.read(ISR_CFG, 0, 1)), 0, 'read to clear');
  await s.dev.setIrqs(IRQ_INTX, 'unmask', 0, 1); // INTx is automasked: the VMM unmasks it at EOI
  assert.equal(statusOf(ram, req), 0);

  // A read-only window (as QEMU maps ROM): a ring there breaks the queue, cleanly.
  const side = SharedMemory.create(1 << 16);
  t.after(() => side.close());
  await s.client.dmaMap({ iova: 0x8000_0000, size: 1 << 16, memory: side, passFd: false, prot: 1 });
  await drv.reset();
  await drv.negotiate(F_VERSION_1);
  await drv.common.w(Q_SELECT, 2, 0);
  await drv.common.w(Q_SIZE, 2, 8);
  await drv.common.w(Q_DESC, 8, 0x8000_0000);
  await drv.common.w(Q_DRIVER, 8, 0x8000_1000);
  await drv.common.w(Q_DEVICE, 8, 0x8000_2000);
  await drv.common.w(Q_ENABLE, 2, 1);
  const cfgIrq = interrupt(intx, 'config interrupt (NEEDS_RESET)');
  await drv.common.w(STATUS, 1, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
  await cfgIrq;
  assert.equal(await drv.status(), ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK | NEEDS_RESET);
  assert.equal(Number(await drv.read(ISR_CFG, 0, 1)) & 2, 2, 'ISR: config change');
  await s.dev.setIrqs(IRQ_INTX, 'unmask', 0, 1);
  assert.equal(await drv.common.r(CFG_GEN, 1), 1, 'config_generation moved');
  assert.equal(s.spec.transport.stats.brokenQueues, 1);
  // A reset clears it; the queue works again from RAM.
  await drv.reset();
  await drv.negotiate(F_VERSION_1);
  const ring2 = new SplitRing(ram, RAM_GPA + 0x10000, 8);
  await drv.setupQueue(0, ring2, NO_VECTOR);
  await drv.common.w(STATUS, 1, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
  const again = blkRequest(ram, heap, T_IN, 2, SECTOR);
  submit(ring2, again);
  const irq2 = interrupt(intx, 'INTx after the reset');
  await drv.kick(0);
  await irq2;
  assert.equal(statusOf(ram, again), 0);
  assert.deepEqual(dataOf(ram, again), diskPattern(2, SECTOR));
});

test('a reset with requests in flight: status reads non-zero until they are done, their completions are dropped', async (t) => {
  const dir = tmp();
  const s = await serve(t, dir, 'a.sock', { file: makeDisk(dir), latencyMs: 150 });
  const ram = await guestRam(t, s.client);
  const { drv, ring } = await bringUp(t, s, ram);
  const heap = new Heap();
  const req = blkRequest(ram, heap, T_IN, 4, SECTOR);
  submit(ring, req);
  await drv.kick(0);
  await waitFor(() => s.spec.disk.stats.reads === 1, 'the request was taken');
  const usedBefore = ring.usedIdx;
  await drv.common.w(STATUS, 1, 0);
  assert.notEqual(await drv.status(), 0, 'still resetting: a request is in flight');
  const t0 = Date.now();
  await waitFor(async () => (await drv.status()) === 0, 'status 0 once the request is done');
  assert.ok(Date.now() - t0 >= 50, 'the reset waited for the request');
  assert.equal(ring.usedIdx, usedBefore, 'the completion after the reset did not reach the old ring');
  await drv.common.w(Q_SELECT, 2, 0);
  assert.equal(await drv.common.r(Q_ENABLE, 2), 0);
  // DEVICE_RESET (the vfio-user message) resets the virtio device too.
  await bringUp(t, s, ram);
  await s.dev.reset();
  assert.equal(await drv.status(), 0);
});

test('migration between two servers with requests in flight: quiesced at STOP, restored, I/O goes on, nothing lost; DMA logging marks the pages the device wrote', async (t) => {
  const dir = tmp();
  const file = makeDisk(dir);
  // Source and destination on the same image (shared storage), the source's requests slow.
  const src = await serve(t, dir, 'src.sock', { file, latencyMs: 120 });
  const dst = await serve(t, dir, 'dst.sock', { file });
  // Guest RAM is one memfd, mapped by both (the destination's memory arrives before the device state, as with QEMU).
  const ram = await guestRam(t, src.client, dst.client);
  const { drv, ring, qIrq, cfgIrq } = await bringUp(t, src, ram, undefined, 64);
  // The destination's client wires the same interrupt eventfds (the guest's), as a VMM does before RUNNING.
  await dst.dev.setEventFds(IRQ_MSIX, 0, [cfgIrq, qIrq]);
  const ioFds = await src.client.request(Command.DEVICE_GET_REGION_IO_FDS, { argsz: 56, flags: 0, index: 4, count: 0 }, { takeFds: true });
  const srcKick = new EventFd(ioFds.fds[0]!);
  t.after(() => srcKick.close());
  await src.dev.startDmaLogging(4096);
  await dst.dev.startDmaLogging(4096);

  const heap = new Heap();
  // In flight at the migration: 4 writes and 2 reads, taken by the source (latency 120 ms).
  const writes = [0, 1, 2, 3].map((k) => blkRequest(ram, heap, T_OUT, 200 + 8 * k, 2 * SECTOR, (i) => (k * 31 + i) & 0xff));
  const reads = [0, 1].map((k) => blkRequest(ram, heap, T_IN, 40 + k, SECTOR));
  const first = [...writes, ...reads];
  for (const r of first) submit(ring, r);
  await drv.kick(0);
  await waitFor(() => src.spec.disk.stats.writes + src.spec.disk.stats.reads === first.length, 'the source took all six');
  assert.equal(ring.usedIdx, 0, 'none complete yet');

  const migration = migrate(src.dev, dst.dev);
  // While the source stops: two more requests made available, kicked at the source (its ioeventfd).
  await tick(30);
  const late = [blkRequest(ram, heap, T_OUT, 300, SECTOR, (i) => (0x5a + i) & 0xff), blkRequest(ram, heap, T_IN, 50, 2 * SECTOR)];
  for (const r of late) submit(ring, r);
  srcKick.signal(1);
  const result = await migration;
  assert.ok(result.stopCopyBytes > 0);
  assert.equal(await src.dev.migrationState(), MIG_STOP);
  assert.equal(await dst.dev.migrationState(), MIG_RUNNING);
  // Everything the source took completed before its STOP answered; the late ones went to the destination.
  assert.equal(src.spec.disk.stats.writes + src.spec.disk.stats.reads, first.length, 'the stopped source took nothing more');
  await waitFor(() => ring.usedIdx === first.length + late.length, () => `all eight used (used idx ${ring.usedIdx})`);
  assert.equal(dst.spec.disk.stats.writes, 1);
  assert.equal(dst.spec.disk.stats.reads, 1);
  const used = ring.takeUsed();
  assert.deepEqual(used.map((u) => u.id).sort((a, b) => a - b), [...first, ...late].map((r) => r.head!).sort((a, b) => a - b), 'each request used exactly once');
  for (const r of [...first, ...late]) assert.equal(statusOf(ram, r), 0, `request at sector ${r.sector}`);
  const disk = fs.readFileSync(file);
  for (const w of [...writes, late[0]!]) assert.deepEqual(disk.subarray(w.sector * SECTOR, w.sector * SECTOR + w.dataLen), dataOf(ram, w));
  for (const r of [...reads, late[1]!]) assert.deepEqual(dataOf(ram, r), diskPattern(r.sector, r.dataLen), `read at sector ${r.sector}`);

  // The destination has the source's transport state.
  const d = new Driver(dst.dev);
  await d.discover();
  assert.equal(await d.status(), ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
  await d.common.w(Q_SELECT, 2, 0);
  assert.equal(await d.common.r(Q_ENABLE, 2), 1);
  assert.equal(await d.common.r(Q_SIZE, 2), ring.size);
  assert.equal(await d.common.r(Q_MSIX, 2), 1);
  assert.equal(await d.read(COMMON_CFG, Q_DEVICE, 8), BigInt(ring.usedGpa));

  // Dirty pages at the source: the used ring, the read buffers and every status byte's page; not the write data.
  const pageOf = (gpa: number): number => Math.floor((gpa - RAM_GPA) / 4096);
  const bitmap = await src.dev.dmaLoggingReport(RAM_GPA, RAM_BYTES, 4096);
  const dirty = (gpa: number): boolean => ((bitmap[pageOf(gpa) >> 3]! >> (pageOf(gpa) & 7)) & 1) === 1;
  assert.ok(dirty(ring.usedGpa), 'used ring');
  for (const r of reads) assert.ok(dirty(r.data), `read buffer at 0x${r.data.toString(16)}`);
  for (const r of first) assert.ok(dirty(r.status), 'status byte');
  for (const w of writes) assert.ok(!dirty(w.data), `write data at 0x${w.data.toString(16)} is only read by the device`);
  assert.ok(!dirty(ring.descGpa), 'the descriptor table is not written by the device');
  assert.ok(!dirty(late[1]!.data), 'the late read went to the destination');
  const dbitmap = await dst.dev.dmaLoggingReport(RAM_GPA, RAM_BYTES, 4096);
  assert.ok(((dbitmap[pageOf(late[1]!.data) >> 3]! >> (pageOf(late[1]!.data) & 7)) & 1) === 1, 'the destination logs its writes');

  // I/O goes on at the destination: a write and its read-back, kicked there.
  const w = blkRequest(ram, heap, T_OUT, 400, SECTOR, (i) => (i * 5) & 0xff);
  const rb = blkRequest(ram, heap, T_IN, 400, SECTOR);
  submit(ring, w);
  const irq = interrupt(qIrq, 'completion at the destination');
  await d.kick(0);
  await irq;
  await waitFor(() => ring.usedIdx === first.length + late.length + 1, 'the write at the destination used');
  submit(ring, rb);
  const irq2 = interrupt(qIrq, 'read-back at the destination');
  await d.kick(0);
  await irq2;
  await waitFor(() => ring.usedIdx === first.length + late.length + 2, 'ten used');
  ring.takeUsed();
  assert.deepEqual(dataOf(ram, rb), dataOf(ram, w));
  assert.deepEqual(fs.readFileSync(file).subarray(400 * SECTOR, 401 * SECTOR), dataOf(ram, w));
});

/** The driver side of a packed ring (2.8): descriptors {addr, len, id, flags}, wrap counters, event areas. */
class PackedRing {
  readonly size: number;
  readonly descGpa: number;
  /** Driver event suppression area. */
  readonly availGpa: number;
  /** Device event suppression area. */
  readonly usedGpa: number;
  readonly #ram: DataView;
  #next = 0;
  #wrap = true;
  #usedPos = 0;
  #usedWrap = true;
  #nextId = 0;
  #outstanding = 0;
  readonly #count = new Map<number, number>();

  constructor(ram: SharedMemory, base: number, size: number) {
    this.size = size;
    this.descGpa = base;
    this.availGpa = base + 0x1000;
    this.usedGpa = base + 0x2000;
    this.#ram = ram.view;
    ram.bytes.fill(0, base - RAM_GPA, base - RAM_GPA + 0x3000);
  }

  /** Writes a chain at the next slots, the first descriptor's flags last. Returns its buffer id. */
  add(bufs: Buf[]): number {
    const AVAIL = 1 << 7, USED = 1 << 15;
    assert.ok(this.#outstanding + bufs.length <= this.size, 'packed ring full');
    this.#outstanding += bufs.length;
    const id = this.#nextId++ % this.size;
    let firstFlags = 0;
    const firstAt = this.#next;
    bufs.forEach((b, i) => {
      const d = this.descGpa - RAM_GPA + 16 * this.#next;
      const flags = (this.#wrap ? AVAIL : USED) | (b.write ? VRING_DESC_F_WRITE : 0) | (i + 1 < bufs.length ? VRING_DESC_F_NEXT : 0);
      this.#ram.setBigUint64(d, BigInt(b.gpa), true);
      this.#ram.setUint32(d + 8, b.len, true);
      this.#ram.setUint16(d + 12, id, true);
      if (i === 0) firstFlags = flags;
      else this.#ram.setUint16(d + 14, flags, true);
      if (++this.#next === this.size) {
        this.#next = 0;
        this.#wrap = !this.#wrap;
      }
    });
    this.#ram.setUint16(this.descGpa - RAM_GPA + 16 * firstAt + 14, firstFlags, true);
    this.#count.set(id, bufs.length);
    return id;
  }

  /** The used descriptors since the last call. */
  takeUsed(): { id: number; len: number }[] {
    const AVAIL = 1 << 7, USED = 1 << 15;
    const out: { id: number; len: number }[] = [];
    for (;;) {
      const d = this.descGpa - RAM_GPA + 16 * this.#usedPos;
      const flags = this.#ram.getUint16(d + 14, true);
      const used = ((flags & AVAIL) !== 0) === this.#usedWrap && ((flags & USED) !== 0) === this.#usedWrap;
      if (!used) return out;
      const id = this.#ram.getUint16(d + 12, true);
      out.push({ id, len: this.#ram.getUint32(d + 8, true) });
      const n = this.#count.get(id);
      assert.ok(n, `used buffer id ${id} was not in flight`);
      this.#count.delete(id);
      this.#outstanding -= n;
      this.#usedPos += n;
      if (this.#usedPos >= this.size) {
        this.#usedPos -= this.size;
        this.#usedWrap = !this.#usedWrap;
      }
    }
  }
}

function packedSubmit(ring: PackedRing, req: Request): number {
  const bufs: Buf[] = [{ gpa: req.hdr, len: 16, write: false }];
  if (req.dataLen > 0) bufs.push({ gpa: req.data, len: req.dataLen, write: req.type !== T_OUT });
  bufs.push({ gpa: req.status, len: 1, write: true });
  req.head = ring.add(bufs);
  return req.head;
}

test('VIRTIO_F_RING_PACKED over PCI: the same engine, a packed ring wrapping around twice', async (t) => {
  const dir = tmp();
  const file = makeDisk(dir);
  const s = await serve(t, dir, 'a.sock', { file });
  const ram = await guestRam(t, s.client);
  const drv = new Driver(s.dev);
  await drv.discover();
  const f = await drv.negotiate(F_VERSION_1 | F_RING_PACKED);
  assert.equal(f, F_VERSION_1 | F_RING_PACKED);
  const ring = new PackedRing(ram, RAM_GPA, 8);
  const qIrq = EventFd.create();
  t.after(() => qIrq.close());
  await s.dev.setEventFds(IRQ_MSIX, 1, [qIrq]);
  await drv.setupQueue(0, ring as unknown as SplitRing, 1);
  await drv.common.w(STATUS, 1, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
  const heap = new Heap();
  let done = 0;
  // 7 rounds of 2 chains of 3 descriptors on a ring of 8: the wrap counters flip on both sides.
  for (let round = 0; round < 7; round++) {
    const w = blkRequest(ram, heap, T_OUT, 500 + round, SECTOR, (i) => (round * 17 + i) & 0xff);
    const r = blkRequest(ram, heap, T_IN, 20 + round, SECTOR);
    packedSubmit(ring, w);
    packedSubmit(ring, r);
    const irq = interrupt(qIrq, `packed round ${round}`);
    await drv.kick(0);
    await irq;
    const used: { id: number; len: number }[] = [];
    await waitFor(() => (used.push(...ring.takeUsed()), used.length === 2), `round ${round}: two used`);
    done += used.length;
    assert.deepEqual(new Map(used.map((u) => [u.id, u.len])), new Map([[w.head!, 1], [r.head!, SECTOR + 1]]));
    assert.equal(statusOf(ram, w), 0);
    assert.equal(statusOf(ram, r), 0);
    assert.deepEqual(dataOf(ram, r), diskPattern(20 + round, SECTOR));
    assert.deepEqual(fs.readFileSync(file).subarray((500 + round) * SECTOR, (501 + round) * SECTOR), dataOf(ram, w));
  }
  assert.equal(done, 14);
});

test('two queues: notify offsets, a vector each, requests on both', async (t) => {
  const dir = tmp();
  const file = makeDisk(dir);
  const s = await serve(t, dir, 'a.sock', { file, queues: 2 });
  const ram = await guestRam(t, s.client);
  const drv = new Driver(s.dev);
  await drv.discover();
  assert.equal(drv.msix!.tableSize, 3);
  assert.equal(await drv.common.r(NUM_QUEUES, 2), 2);
  await drv.negotiate(F_VERSION_1 | (1n << 12n)); // VIRTIO_BLK_F_MQ
  assert.equal(Number(await drv.read(DEVICE_CFG, 34, 2)), 2, 'virtio_blk_config.num_queues');
  const rings = [new SplitRing(ram, RAM_GPA, 8), new SplitRing(ram, RAM_GPA + 0x10000, 8)];
  const irqs = [EventFd.create(), EventFd.create()];
  t.after(() => irqs.forEach((e) => e.close()));
  await s.dev.setEventFds(IRQ_MSIX, 1, irqs);
  for (const q of [0, 1]) {
    await drv.setupQueue(q, rings[q]!, q + 1);
    assert.equal(await drv.common.r(Q_NOTIFY_OFF, 2), q);
  }
  await drv.common.w(STATUS, 1, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
  const heap = new Heap();
  for (const q of [1, 0]) {
    const req = blkRequest(ram, heap, T_IN, 60 + q, SECTOR);
    submit(rings[q]!, req);
    const irq = interrupt(irqs[q]!, `queue ${q}`);
    await drv.kick(q);
    await irq;
    assert.deepEqual(rings[q]!.takeUsed(), [{ id: req.head, len: SECTOR + 1 }]);
    assert.deepEqual(dataOf(ram, req), diskPattern(60 + q, SECTOR));
    assert.equal(rings[1 - q]!.usedIdx, q === 1 ? 0 : 1, 'the other queue untouched');
  }
});

test('DMA_UNMAP of guest RAM under a request in flight is answered once the I/O is done; a buffer in a message window is served', async (t) => {
  const dir = tmp();
  const s = await serve(t, dir, 'a.sock', { file: makeDisk(dir), latencyMs: 100 });
  const ram = await guestRam(t, s.client);
  const { drv, ring } = await bringUp(t, s, ram);
  const heap = new Heap();
  const req = blkRequest(ram, heap, T_IN, 7, 4 * SECTOR);
  submit(ring, req);
  await drv.kick(0);
  await waitFor(() => s.spec.disk.stats.reads === 1, 'taken');
  const t0 = Date.now();
  await s.client.dmaUnmap(RAM_GPA, RAM_BYTES);
  assert.ok(Date.now() - t0 >= 50, 'the unmap waited for the request');
  assert.equal(statusOf(ram, req), 0, 'the request completed into memory that was still mapped');
  assert.deepEqual(ring.takeUsed(), [{ id: req.head, len: 4 * SECTOR + 1 }], 'and into the used ring');
  assert.deepEqual(dataOf(ram, req), diskPattern(7, 4 * SECTOR));

  // Guest RAM back (as QEMU re-maps a section): the same queue goes on, no reset.
  await s.client.dmaMap({ iova: RAM_GPA, size: RAM_BYTES, memory: ram });
  const next = blkRequest(ram, heap, T_IN, 9, SECTOR);
  submit(ring, next);
  await drv.kick(0);
  await waitFor(() => ring.usedIdx === 2, 'the queue serves again once its memory is back');
  assert.deepEqual(dataOf(ram, next), diskPattern(9, SECTOR));
  assert.equal(s.spec.transport.stats.brokenQueues, 0);

  // Then a request whose data buffer lies in a window without fd.
  const side = SharedMemory.create(1 << 16);
  t.after(() => side.close());
  await s.client.dmaMap({ iova: 0x8000_0000, size: 1 << 16, memory: side, passFd: false });
  const { ring: ring2, qIrq } = await bringUp(t, s, ram);
  const far = blkRequest(ram, heap, T_IN, 8, SECTOR);
  far.data = 0x8000_0000;
  submit(ring2, far);
  const irq = interrupt(qIrq, 'the read with its data in a window without fd');
  await drv.kick(0);
  await irq;
  assert.equal(await drv.status() & NEEDS_RESET, 0);
  assert.equal(ring2.usedIdx, 1);
  assert.equal(statusOf(ram, far), 0);
  assert.deepEqual(Buffer.from(side.bytes.subarray(0, SECTOR)), diskPattern(8, SECTOR), 'written back by DMA_WRITE');
});

test('DMA_UNMAP of a window the device served from, with nothing in flight, is answered at once and the window is gone; a new one serves', async (t) => {
  const dir = tmp();
  const s = await serve(t, dir, 'a.sock', { file: makeDisk(dir) });
  const ram = await guestRam(t, s.client);
  const { drv, ring } = await bringUp(t, s, ram);
  const heap = new Heap();
  const req = blkRequest(ram, heap, T_IN, 3, SECTOR);
  submit(ring, req);
  await drv.kick(0);
  await waitFor(() => ring.usedIdx === 1, 'served');
  // The device holds every window mapped by fd: an idle DMA_UNMAP must not wait on that hold.
  await Promise.race([
    s.client.dmaUnmap(RAM_GPA, RAM_BYTES),
    new Promise((_, reject) => setTimeout(() => reject(new Error('DMA_UNMAP with nothing in flight was not answered')), 2000)),
  ]);
  // The ring is out of reach now: a kick serves nothing (and breaks nothing).
  const held = blkRequest(ram, heap, T_IN, 4, SECTOR);
  submit(ring, held);
  await drv.kick(0);
  await new Promise((r) => setTimeout(r, 50));
  assert.equal(ring.usedIdx, 1, 'nothing served from an unmapped window');
  await s.client.dmaMap({ iova: RAM_GPA, size: RAM_BYTES, memory: ram });
  await drv.kick(0);
  await waitFor(() => ring.usedIdx === 2, 'the request waiting is served once the memory is back');
  assert.deepEqual(dataOf(ram, held), diskPattern(4, SECTOR));
  assert.equal(s.spec.transport.stats.brokenQueues, 0);
});

test('vdevkit serve virtio-blk --file IMAGE --socket PATH', async (t) => {
  const dir = tmp();
  const file = makeDisk(dir);
  const sockPath = path.join(dir, 'cli.sock');
  const { spawn } = await import('node:child_process');
  const main = new URL('../src/cli/main.js', import.meta.url).pathname;
  const child = spawn(process.execPath, [main, 'serve', 'virtio-blk', '--file', file, '--socket', sockPath, '--serial', 'from-cli'], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (b: Buffer) => (stderr += b.toString()));
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  t.after(() => child.kill('SIGKILL'));
  await waitFor(() => stderr.includes('serving virtio-blk'), () => `the server starts (stderr: ${stderr})`, 10000);
  const client = await VfioUserClient.connect(sockPath);
  const dev = new VfioUserDevice(client);
  const s = { client, dev } as unknown as Served;
  const ram = await guestRam(t, client);
  const { drv, ring, qIrq } = await bringUp(t, s, ram);
  const heap = new Heap();
  const id = blkRequest(ram, heap, T_GET_ID, 0, 20);
  const rd = blkRequest(ram, heap, T_IN, 9, SECTOR);
  submit(ring, id);
  submit(ring, rd);
  const irq = interrupt(qIrq, 'completion from the CLI server');
  await drv.kick(0);
  await irq;
  await waitFor(() => ring.usedIdx === 2, 'two used');
  assert.equal(dataOf(ram, id).toString('latin1').replace(/\0+$/, ''), 'from-cli');
  assert.deepEqual(dataOf(ram, rd), diskPattern(9, SECTOR));
  dev.close();
  client.close();
  child.kill('SIGTERM');
  assert.equal(await exited, 0);
  // An option of another device, and a missing image, are refused.
  const { spawnSync } = await import('node:child_process');
  const missing = spawnSync(process.execPath, [main, 'serve', 'virtio-blk', '--file', path.join(dir, 'nope.img'), '--socket', sockPath]);
  assert.equal(missing.status, 1);
  assert.match(missing.stderr.toString(), /ENOENT/);
  const foreign = spawnSync(process.execPath, [main, 'serve', 'gpio', '--file', file, '--socket', sockPath]);
  assert.equal(foreign.status, 2);
});

test('a client that disconnects with a request in flight: it completes into the rings, the next client goes on with the same queue', async (t) => {
  const dir = tmp();
  const spec = virtioBlkPciDevice({ file: makeDisk(dir), latencyMs: 80 });
  const server = VfioUserServer.listen(path.join(dir, 'r.sock'), { device: spec });
  t.after(async () => {
    server.close();
    await tick(5);
    spec.close();
  });
  const first = await VfioUserClient.connect(server.path);
  const s1 = { spec, server, client: first, dev: new VfioUserDevice(first) } as Served;
  const ram = SharedMemory.create(RAM_BYTES);
  t.after(() => ram.close());
  await first.dmaMap({ iova: RAM_GPA, size: RAM_BYTES, memory: ram });
  const { drv, ring } = await bringUp(t, s1, ram);
  const heap = new Heap();
  const req = blkRequest(ram, heap, T_IN, 11, SECTOR);
  submit(ring, req);
  await drv.kick(0);
  await waitFor(() => spec.disk.stats.reads === 1, 'taken');
  s1.dev.close();
  first.close();
  await waitFor(() => ring.usedIdx === 1, 'the completion reached the used ring after the client left');
  assert.deepEqual(dataOf(ram, req), diskPattern(11, SECTOR));
  // A new connection (a VMM restarted): memory and interrupts again; the device kept its state.
  const second = await VfioUserClient.connect(server.path);
  const dev2 = new VfioUserDevice(second);
  t.after(() => {
    dev2.close();
    second.close();
  });
  await second.dmaMap({ iova: RAM_GPA, size: RAM_BYTES, memory: ram });
  const qIrq = EventFd.create();
  t.after(() => qIrq.close());
  await dev2.setEventFds(IRQ_MSIX, 1, [qIrq]);
  const d2 = new Driver(dev2);
  await d2.discover();
  assert.equal(await d2.status(), ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
  const again = blkRequest(ram, heap, T_IN, 12, SECTOR);
  submit(ring, again);
  const irq = interrupt(qIrq, 'after the reconnect');
  await d2.kick(0);
  await irq;
  assert.equal(ring.usedIdx, 2);
  assert.deepEqual(dataOf(ram, again), diskPattern(12, SECTOR));
  assert.equal(spec.transport.stats.brokenQueues, 0);
});

test('migration of a packed ring in the middle of I/O (its base carries both wrap counters); a destination with another disk refuses, the source runs on', async (t) => {
  const dir = tmp();
  const file = makeDisk(dir);
  const src = await serve(t, dir, 'src.sock', { file, latencyMs: 60 });
  const dst = await serve(t, dir, 'dst.sock', { file });
  const other = path.join(dir, 'small.img');
  fs.writeFileSync(other, Buffer.alloc(DISK_BYTES / 2));
  const bad = await serve(t, dir, 'bad.sock', { file: other });
  const ram = await guestRam(t, src.client, dst.client, bad.client);
  const drv = new Driver(src.dev);
  await drv.discover();
  await drv.negotiate(F_VERSION_1 | F_RING_PACKED);
  const ring = new PackedRing(ram, RAM_GPA, 8);
  const qIrq = EventFd.create();
  t.after(() => qIrq.close());
  await src.dev.setEventFds(IRQ_MSIX, 1, [qIrq]);
  await dst.dev.setEventFds(IRQ_MSIX, 1, [qIrq]);
  await drv.setupQueue(0, ring as unknown as SplitRing, 1);
  await drv.common.w(STATUS, 1, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
  const heap = new Heap();
  const usedIds: number[] = [];
  // Past the first wrap before migrating: 3 rounds of 2 chains of 3 descriptors on a ring of 8.
  for (let round = 0; round < 3; round++) {
    const rs = [blkRequest(ram, heap, T_IN, round, SECTOR), blkRequest(ram, heap, T_IN, round + 1, SECTOR)];
    for (const r of rs) packedSubmit(ring, r);
    await drv.kick(0);
    await waitFor(() => (usedIds.push(...ring.takeUsed().map((u) => u.id)), usedIds.length === 2 * (round + 1)), `round ${round}`);
  }
  // A refused migration: the other disk's config differs; the source goes back to RUNNING and keeps serving.
  await assert.rejects(migrate(src.dev, bad.dev), (err: Error & { errno?: number }) => err.errno === 22); // EINVAL from load()
  assert.equal(await src.dev.migrationState(), MIG_RUNNING);
  // In flight at the migration: two requests.
  const w = blkRequest(ram, heap, T_OUT, 600, SECTOR, (i) => (i ^ 0x3c) & 0xff);
  const r = blkRequest(ram, heap, T_IN, 33, SECTOR);
  packedSubmit(ring, w);
  packedSubmit(ring, r);
  await drv.kick(0);
  await waitFor(() => src.spec.disk.stats.reads + src.spec.disk.stats.writes === 8, 'the source took them');
  await migrate(src.dev, dst.dev);
  // The source completed both before its STOP answered: their slots are free for the next chain.
  usedIds.push(...ring.takeUsed().map((u) => u.id));
  assert.equal(usedIds.length, 8);
  const late = blkRequest(ram, heap, T_IN, 34, SECTOR);
  packedSubmit(ring, late);
  const d = new Driver(dst.dev);
  await d.discover();
  await d.kick(0);
  await waitFor(() => (usedIds.push(...ring.takeUsed().map((u) => u.id)), usedIds.length === 9), () => `nine used (${usedIds.length})`);
  assert.equal(dst.spec.disk.stats.reads, 1, 'the late one at the destination');
  for (const q of [w, r, late]) assert.equal(statusOf(ram, q), 0);
  assert.deepEqual(dataOf(ram, r), diskPattern(33, SECTOR));
  assert.deepEqual(dataOf(ram, late), diskPattern(34, SECTOR));
  assert.deepEqual(fs.readFileSync(file).subarray(600 * SECTOR, 601 * SECTOR), dataOf(ram, w));
});

/** A window the client maps without its fd: the server reaches it by DMA_READ / DMA_WRITE messages only. */
const SIDE_GPA = 0x8000_0000;
const SIDE_BYTES = 1 << 20;

test('buffers in DMA windows without fd: read in by DMA_READ, written back by DMA_WRITE before the used entry, mixed with fd windows; checked against the file', async (t) => {
  const dir = tmp();
  const file = makeDisk(dir);
  const s = await serve(t, dir, 'a.sock', { file, serial: 'side-serial' });
  const ram = await guestRam(t, s.client);
  const side = SharedMemory.create(SIDE_BYTES);
  t.after(() => side.close());
  await s.client.dmaMap({ iova: SIDE_GPA, size: SIDE_BYTES, memory: side, passFd: false });
  const { drv, ring, qIrq } = await bringUp(t, s, ram);
  const heap = new Heap();
  let next = SIDE_GPA;
  const sideAlloc = (len: number): number => {
    const gpa = next;
    next += Math.ceil(len / 4096) * 4096;
    return gpa;
  };
  const sideHeader = (type: number, sector: number): number => {
    const gpa = sideAlloc(16);
    side.view.setUint32(gpa - SIDE_GPA, type, true);
    side.view.setUint32(gpa - SIDE_GPA + 4, 0, true);
    side.view.setBigUint64(gpa - SIDE_GPA + 8, BigInt(sector), true);
    return gpa;
  };
  const sideBytes = (gpa: number, len: number): Buffer => Buffer.from(side.bytes.subarray(gpa - SIDE_GPA, gpa - SIDE_GPA + len));
  /** Waits for the used idx to reach n, checking at every turn that `ready()` already holds when it does (data before the used entry). */
  const usedAfter = async (n: number, ready: () => boolean): Promise<void> => {
    const t0 = performance.now();
    while (ring.usedIdx !== n) {
      assert.ok(performance.now() - t0 < 5000, `used idx ${n}`);
      await new Promise((r) => setImmediate(r));
    }
    assert.ok(ready(), 'the device-written buffers were in guest memory when the used idx moved');
  };

  // 1. Everything in the window without fd: header, 2 sectors of data, status.
  const hdr = sideHeader(T_IN, 20);
  const data = sideAlloc(2 * SECTOR);
  side.bytes.fill(0xee, data - SIDE_GPA, data - SIDE_GPA + 2 * SECTOR);
  const st = sideAlloc(1);
  side.bytes[st - SIDE_GPA] = 0xff;
  const head = ring.add([
    { gpa: hdr, len: 16, write: false },
    { gpa: data, len: 2 * SECTOR, write: true },
    { gpa: st, len: 1, write: true },
  ]);
  let irq = interrupt(qIrq, 'completion of a request in the window without fd');
  await drv.kick(0);
  await usedAfter(1, () => side.bytes[st - SIDE_GPA] === 0);
  await irq;
  assert.deepEqual(ring.takeUsed(), [{ id: head, len: 2 * SECTOR + 1 }]);
  assert.deepEqual(sideBytes(data, 2 * SECTOR), fs.readFileSync(file).subarray(20 * SECTOR, 22 * SECTOR));
  assert.ok(s.spec.transport.stats.bounceReads >= 3, 'header, data and status read in');
  assert.ok(s.spec.transport.stats.bounceWrites >= 2, 'data and status written back');

  // 2. Mixed: header and status in fd RAM, the data to write in the window without fd.
  const w = blkRequest(ram, heap, T_OUT, 40, 3 * SECTOR);
  const wdata = sideAlloc(3 * SECTOR);
  for (let i = 0; i < 3 * SECTOR; i++) side.bytes[wdata - SIDE_GPA + i] = (i * 5 + 3) & 0xff;
  const wHead = ring.add([
    { gpa: w.hdr, len: 16, write: false },
    { gpa: wdata, len: 3 * SECTOR, write: false },
    { gpa: w.status, len: 1, write: true },
  ]);
  // 3. Mixed the other way: header in the window without fd, data in RAM, status in the window without fd; and GET_ID.
  const r = blkRequest(ram, heap, T_IN, 7, SECTOR);
  const rhdr = sideHeader(T_IN, 7);
  const rst = sideAlloc(1);
  side.bytes[rst - SIDE_GPA] = 0xff;
  const rHead = ring.add([
    { gpa: rhdr, len: 16, write: false },
    { gpa: r.data, len: SECTOR, write: true },
    { gpa: rst, len: 1, write: true },
  ]);
  const idBuf = sideAlloc(20);
  const idSt = sideAlloc(1);
  const idHead = ring.add([
    { gpa: sideHeader(T_GET_ID, 0), len: 16, write: false },
    { gpa: idBuf, len: 20, write: true },
    { gpa: idSt, len: 1, write: true },
  ]);
  irq = interrupt(qIrq, 'the mixed requests');
  await drv.kick(0);
  await waitFor(() => ring.usedIdx === 4, 'three more used');
  await irq;
  const used = ring.takeUsed();
  assert.deepEqual(new Map(used.map((u) => [u.id, u.len])), new Map([[wHead, 1], [rHead, SECTOR + 1], [idHead, 21]]));
  assert.equal(statusOf(ram, w), 0);
  assert.deepEqual(fs.readFileSync(file).subarray(40 * SECTOR, 43 * SECTOR), sideBytes(wdata, 3 * SECTOR), 'the file has the data read by DMA_READ');
  assert.equal(side.bytes[rst - SIDE_GPA], 0);
  assert.deepEqual(dataOf(ram, r), diskPattern(7, SECTOR));
  assert.equal(sideBytes(idBuf, 20).toString('latin1').replace(/\0+$/, ''), 'side-serial');
  assert.equal(side.bytes[idSt - SIDE_GPA], 0);
  assert.equal(s.spec.transport.stats.brokenQueues, 0);
});

test('buffers in windows without fd are bounded: a chain larger than bounceLimit breaks the queue, the device goes on after a reset', async (t) => {
  const dir = tmp();
  const file = makeDisk(dir);
  const s = await serve(t, dir, 'a.sock', { file, bounceLimit: 8192 });
  const ram = await guestRam(t, s.client);
  const side = SharedMemory.create(SIDE_BYTES);
  t.after(() => side.close());
  await s.client.dmaMap({ iova: SIDE_GPA, size: SIDE_BYTES, memory: side, passFd: false });
  const { drv, ring, cfgIrq } = await bringUp(t, s, ram);
  const heap = new Heap();
  const big = blkRequest(ram, heap, T_IN, 0, 17 * SECTOR);
  big.data = SIDE_GPA; // 17 sectors in the window without fd: over the 8 KiB limit
  submit(ring, big);
  const irq = interrupt(cfgIrq, 'NEEDS_RESET');
  await drv.kick(0);
  await irq;
  assert.ok((await drv.status()) & NEEDS_RESET);
  assert.equal(ring.usedIdx, 0);
  assert.equal(s.spec.transport.stats.bounceReads, 0, 'nothing was fetched for it');
  // Within the limit after a reset: served.
  const { ring: ring2, qIrq } = await bringUp(t, s, ram);
  const ok = blkRequest(ram, heap, T_IN, 3, 4 * SECTOR);
  ok.data = SIDE_GPA;
  submit(ring2, ok);
  const irq2 = interrupt(qIrq, 'a chain within the limit');
  await drv.kick(0);
  await irq2;
  assert.equal(statusOf(ram, ok), 0);
  assert.deepEqual(Buffer.from(side.bytes.subarray(0, 4 * SECTOR)), diskPattern(3, 4 * SECTOR));
});

test('VIRTIO_PCI_CAP_PCI_CFG (4.1.4.9): config-space accesses through pci_cfg_data reach the common cfg and the device cfg; bad bar/offset/length ignored', async (t) => {
  const dir = tmp();
  const s = await serve(t, dir, 'a.sock', { file: makeDisk(dir), queues: 2 });
  const drv = new Driver(s.dev);
  await drv.discover();
  const pc = drv.caps.get(PCI_CFG)!;
  const common = drv.caps.get(COMMON_CFG)!;
  const devcfg = drv.caps.get(DEVICE_CFG)!;
  // struct virtio_pci_cfg_cap: cap_vndr 0x09, cap_next, cap_len 20, cfg_type 5, bar, id, padding[2], offset, length, pci_cfg_data[4].
  const raw = Buffer.from(await s.dev.read(7, pc.at, 20));
  assert.equal(raw[0], CAP_VNDR);
  assert.equal(raw[2], 20);
  assert.equal(raw[3], PCI_CFG);
  const cfgW = (off: number, bytes: number[]): Promise<void> => s.dev.write(7, pc.at + off, Buffer.from(bytes));
  const le = (v: number, n: number): number[] => Array.from({ length: n }, (_, i) => (v >>> (8 * i)) & 0xff);
  /** Sets cap.bar, cap.offset, cap.length by config writes of the widths a driver uses. */
  const window = async (bar: number, offset: number, length: number): Promise<void> => {
    await cfgW(4, [bar]);
    await cfgW(8, le(offset, 4));
    await cfgW(12, le(length, 4));
  };
  const data = async (): Promise<Buffer> => Buffer.from(await s.dev.read(7, pc.at + 16, 4));

  // num_queues (u16 at 18 of the common cfg).
  await window(common.bar, common.offset + NUM_QUEUES, 2);
  assert.equal((await data()).readUInt16LE(0), 2, 'num_queues through pci_cfg_data');
  // device_feature_select = 1 written through pci_cfg_data, then device_feature read through it: the high word.
  await window(common.bar, common.offset + DFSELECT, 4);
  await cfgW(16, le(1, 4));
  assert.equal(await drv.common.r(DFSELECT, 4), 1, 'the write reached the common cfg');
  await window(common.bar, common.offset + DF, 4);
  assert.equal((await data()).readUInt32LE(0) & 1, 1, 'VERSION_1 (feature 32) in the high word');
  // device_status: a 1-byte write through pci_cfg_data, read back through the BAR.
  await window(common.bar, common.offset + STATUS, 1);
  await cfgW(16, [ACKNOWLEDGE]);
  assert.equal(await drv.status(), ACKNOWLEDGE);
  assert.equal((await data())[0], ACKNOWLEDGE);
  // The device cfg: capacity (le64 at 0), its low dword.
  await window(devcfg.bar, devcfg.offset, 4);
  assert.equal((await data()).readUInt32LE(0), DISK_BYTES / SECTOR, 'virtio_blk_config.capacity');
  // A read of the whole capability at once sees pci_cfg_data filled too.
  const whole = Buffer.from(await s.dev.read(7, pc.at, 20));
  assert.equal(whole.readUInt32LE(16), DISK_BYTES / SECTOR);

  // Bad windows: not BAR4, a length not 1/2/4, unaligned, past the BAR: the access is ignored.
  await drv.common.w(DFSELECT, 4, 0);
  const marker = [0x5a, 0x5a, 0x5a, 0x5a];
  for (const [bar, off, len] of [[0, common.offset + DFSELECT, 4], [common.bar, common.offset + DFSELECT, 3], [common.bar, common.offset + DFSELECT + 2, 4], [common.bar, 0x4000, 4], [common.bar, 0xfffffffc, 4]] as const) {
    await window(bar, off, len);
    await cfgW(16, marker);
    assert.deepEqual([...(await data())], marker, `bar ${bar} offset ${off} length ${len}: pci_cfg_data reads as written`);
  }
  assert.equal(await drv.common.r(DFSELECT, 4), 0, 'no bad window wrote the common cfg');
  // And a good one afterwards still works.
  await window(common.bar, common.offset + NUM_QUEUES, 2);
  assert.equal((await data()).readUInt16LE(0), 2);
});
