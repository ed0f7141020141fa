/**
 * Rings in vfio-user DMA windows the client maps WITHOUT an fd: the device
 * reaches them only by DMA_READ / DMA_WRITE messages, which our client serves
 * from its own memory. virtio-blk behind the virtio PCI transport, driven by
 * our VfioUserClient as a guest driver. The rings (split 2.7, packed 2.8) and
 * the virtio-blk requests (5.2.6) are laid out by hand from the spec here;
 * the PCI capabilities are walked by hand (4.1.4). Checked: reads and writes
 * against the disk file, MSI-X interrupts (and the driver's event fields
 * read again before the decision), the used idx / used flags never visible
 * before the data (at every turn of the event loop), ring wraps, a reset
 * with a staged request in flight, a migration with staged rings mid-I/O, and
 * a guest that rewrites its ring between the device's fetches (a typed break:
 * DEVICE_NEEDS_RESET, the server goes on).
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { VfioUserClient } from '../src/vfio-user/client.js';
import type { VfioUserDevice } from '../src/vfio-user/client-device.js';
import { migrate } from '../src/vfio-user/migrate.js';
import { SharedMemory, EventFd } from '../src/sys/index.js';
import { virtioBlkPciDevice, type VirtioBlkPciDeviceSpec, type VirtioBlkPciOptions } from '../src/devices/virtio-blk-pci.js';
import { tick } from './helpers/sys.js';
import { serveSpec } from './helpers/vfio-user-serve.js';

// PCI (local bus 3.0 6.7) and virtio PCI capabilities (virtio 1.2 4.1.4).
const CAP_PTR = 0x34, CAP_VENDOR = 0x09;
const CFG_COMMON = 1, CFG_NOTIFY = 2;
// virtio_pci_common_cfg (4.1.4.3).
const DFSEL = 0, DF = 4, GFSEL = 8, GF = 12, MSIX_CFG = 16, STATUS = 20;
const QSEL = 22, QSIZE = 24, QMSIX = 26, QENABLE = 28, QNOTIFY = 30, QDESC = 32, QDRIVER = 40, QDEVICE = 48;
// device_status (2.1).
const ACK = 1, DRV = 2, DRIVER_OK = 4, FEATURES_OK = 8, NEEDS_RESET = 64;
// Feature bits.
const F_EVENT_IDX = 1n << 29n, F_VERSION_1 = 1n << 32n, F_PACKED = 1n << 34n;
// Descriptor flags, split (2.7.5) and packed (2.8.1); packed event flags (2.8.10).
const NEXT = 1, WRITE = 2, AVAIL = 1 << 7, USED = 1 << 15;
const EV_ENABLE = 0, EV_DISABLE = 1, EV_DESC = 2;
// virtio-blk request types (5.2.6).
const T_IN = 0, T_OUT = 1, T_GET_ID = 8;
// vfio-user: MSI-X irq index, migration state, DMA_MAP read flag.
const IRQ_MSIX = 2, MIG_RUNNING = 2, DMA_READ_PROT = 1;

const SECTOR = 512;
const DISK_BYTES = 1 << 20;
/** Guest RAM mapped with its fd. */
const RAM_GPA = 0x4000_0000;
const RAM_BYTES = 1 << 20;
/** Guest RAM mapped without fd: DMA by messages only. */
const SIDE_GPA = 0x8000_0000;
const SIDE_BYTES = 1 << 20;

/** Guest-physical memory over the two windows (the guest's view: plain bytes). */
class Guest {
  constructor(
    readonly ram: SharedMemory,
    readonly side: SharedMemory,
  ) {}

  bytes(gpa: number, len: number): Uint8Array {
    for (const [base, m, size] of [[RAM_GPA, this.ram, RAM_BYTES], [SIDE_GPA, this.side, SIDE_BYTES]] as const) {
      if (gpa >= base && gpa + len <= base + size) return m.bytes.subarray(gpa - base, gpa - base + len);
    }
    throw new Error(`GPA 0x${gpa.toString(16)} +${len} is not guest RAM`);
  }

  dv(gpa: number, len: number): DataView {
    const b = this.bytes(gpa, len);
    return new DataView(b.buffer, b.byteOffset, len);
  }

  u16(gpa: number): number {
    return this.dv(gpa, 2).getUint16(0, true);
  }

  setU16(gpa: number, v: number): void {
    this.dv(gpa, 2).setUint16(0, v, true);
  }
}

/** A bump allocator in one window. */
class Heap {
  #next: number;
  constructor(
    readonly base: number,
    readonly end: number,
  ) {
    this.#next = base;
  }

  alloc(len: number): number {
    const gpa = this.#next;
    this.#next += Math.ceil(Math.max(len, 1) / 64) * 64;
    assert.ok(this.#next <= this.end, 'heap exhausted');
    return gpa;
  }
}

interface Buf {
  gpa: number;
  len: number;
  write: boolean;
}

/** The driver's side of a ring. */
interface Ring {
  readonly size: number;
  readonly desc: number;
  readonly driver: number;
  readonly device: number;
  add(bufs: Buf[]): number;
  /** Used entries not taken yet (nothing changes). */
  peekUsed(): { id: number; len: number }[];
  /** Takes the used entries. */
  takeUsed(): { id: number; len: number }[];
  /** Interrupt me after the next used entry (EVENT_IDX), or always (no EVENT_IDX); `off`: never. */
  interrupts(on: boolean): void;
}

/** Split ring (2.7): desc table at base, avail at +0x1000, used at +0x2000. */
/** Where a ring's three areas are (desc at base, driver area +0x1000, device area +0x2000, zeroed as a driver allocates them). */
abstract class RingAt {
  readonly desc: number;
  readonly driver: number;
  readonly device: number;
  constructor(
    readonly g: Guest,
    base: number,
    readonly size: number,
    readonly eventIdx: boolean,
  ) {
    this.desc = base;
    this.driver = base + 0x1000;
    this.device = base + 0x2000;
    g.bytes(base, 0x3000).fill(0);
  }
}

class SplitRing extends RingAt implements Ring {
  #free: number[];
  #availIdx = 0;
  #lastUsed = 0;
  readonly #chains = new Map<number, number[]>();

  constructor(g: Guest, base: number, size: number, eventIdx: boolean) {
    super(g, base, size, eventIdx);
    this.#free = Array.from({ length: size }, (_, i) => i);
  }

  add(bufs: Buf[]): number {
    const ids = this.#free.splice(0, bufs.length);
    assert.equal(ids.length, bufs.length, 'split ring full');
    bufs.forEach((b, i) => {
      const d = this.g.dv(this.desc + 16 * ids[i]!, 16);
      d.setBigUint64(0, BigInt(b.gpa), true);
      d.setUint32(8, b.len, true);
      d.setUint16(12, (b.write ? WRITE : 0) | (i + 1 < bufs.length ? NEXT : 0), true);
      d.setUint16(14, i + 1 < bufs.length ? ids[i + 1]! : 0, true);
    });
    this.#chains.set(ids[0]!, ids);
    this.g.setU16(this.driver + 4 + 2 * (this.#availIdx % this.size), ids[0]!);
    this.#availIdx = (this.#availIdx + 1) & 0xffff;
    this.g.setU16(this.driver + 2, this.#availIdx); // avail idx after the entry
    return ids[0]!;
  }

  get usedIdx(): number {
    return this.g.u16(this.device + 2);
  }

  peekUsed(): { id: number; len: number }[] {
    const out: { id: number; len: number }[] = [];
    for (let i = this.#lastUsed; i !== this.usedIdx; i = (i + 1) & 0xffff) {
      const e = this.g.dv(this.device + 4 + 8 * (i % this.size), 8);
      out.push({ id: e.getUint32(0, true), len: e.getUint32(4, true) });
    }
    return out;
  }

  takeUsed(): { id: number; len: number }[] {
    const out = this.peekUsed();
    for (const u of out) {
      const ids = this.#chains.get(u.id);
      assert.ok(ids, `used id ${u.id} was not in flight`);
      this.#chains.delete(u.id);
      this.#free.push(...ids);
    }
    this.#lastUsed = (this.#lastUsed + out.length) & 0xffff;
    return out;
  }

  interrupts(on: boolean): void {
    if (this.eventIdx) this.g.setU16(this.driver + 4 + 2 * this.size, on ? this.#lastUsed : (this.#lastUsed - 1) & 0xffff); // used_event
    else this.g.setU16(this.driver, on ? 0 : 1); // VIRTQ_AVAIL_F_NO_INTERRUPT
  }
}

/** Packed ring (2.8): descriptors at base, driver event area at +0x1000, device event area at +0x2000. */
class PackedRing extends RingAt implements Ring {
  #next = 0;
  #wrap = true;
  #usedPos = 0;
  #usedWrap = true;
  #nextId = 0;
  #outstanding = 0;
  readonly #count = new Map<number, number>();

  add(bufs: Buf[]): number {
    assert.ok(this.#outstanding + bufs.length <= this.size, 'packed ring full');
    this.#outstanding += bufs.length;
    const id = this.#nextId++ % this.size;
    const first = this.#next;
    let firstFlags = 0;
    bufs.forEach((b, i) => {
      const d = this.g.dv(this.desc + 16 * this.#next, 16);
      const flags = (this.#wrap ? AVAIL : USED) | (b.write ? WRITE : 0) | (i + 1 < bufs.length ? NEXT : 0);
      d.setBigUint64(0, BigInt(b.gpa), true);
      d.setUint32(8, b.len, true);
      d.setUint16(12, id, true);
      if (i === 0) firstFlags = flags;
      else d.setUint16(14, flags, true);
      if (++this.#next === this.size) {
        this.#next = 0;
        this.#wrap = !this.#wrap;
      }
    });
    this.g.setU16(this.desc + 16 * first + 14, firstFlags); // the head's flags last
    this.#count.set(id, bufs.length);
    return id;
  }

  #scan(take: boolean): { id: number; len: number }[] {
    const out: { id: number; len: number }[] = [];
    let pos = this.#usedPos;
    let wrap = this.#usedWrap;
    for (;;) {
      const d = this.g.dv(this.desc + 16 * pos, 16);
      const flags = d.getUint16(14, true);
      if (((flags & AVAIL) !== 0) !== wrap || ((flags & USED) !== 0) !== wrap) break;
      const id = d.getUint16(12, true);
      out.push({ id, len: d.getUint32(8, true) });
      const n = this.#count.get(id);
      assert.ok(n, `used buffer id ${id} was not in flight`);
      if (take) {
        this.#count.delete(id);
        this.#outstanding -= n;
      }
      pos += n;
      if (pos >= this.size) {
        pos -= this.size;
        wrap = !wrap;
      }
    }
    if (take) {
      this.#usedPos = pos;
      this.#usedWrap = wrap;
    }
    return out;
  }

  peekUsed(): { id: number; len: number }[] {
    return this.#scan(false);
  }

  takeUsed(): { id: number; len: number }[] {
    return this.#scan(true);
  }

  interrupts(on: boolean): void {
    const ev = this.g.dv(this.driver, 4);
    if (!on) return ev.setUint16(2, EV_DISABLE, true);
    if (!this.eventIdx) return ev.setUint16(2, EV_ENABLE, true);
    ev.setUint16(0, this.#usedPos | (this.#usedWrap ? 0x8000 : 0), true); // the next used slot
    ev.setUint16(2, EV_DESC, true);
  }
}

/** The PCI side of the driver: capabilities walked by hand, the common cfg, the notify area. */
class Pci {
  common = { bar: 0, off: 0 };
  notify = { bar: 0, off: 0, mult: 0 };
  constructor(readonly dev: VfioUserDevice) {}

  async discover(): Promise<void> {
    const c = Buffer.from(await this.dev.read(7, 0, 256));
    for (let at = c[CAP_PTR]! & 0xfc; at !== 0; at = c[at + 1]! & 0xfc) {
      if (c[at] !== CAP_VENDOR) continue;
      const type = c[at + 3]!;
      if (type === CFG_COMMON && this.common.off === 0) this.common = { bar: c[at + 4]!, off: c.readUInt32LE(at + 8) };
      if (type === CFG_NOTIFY) this.notify = { bar: c[at + 4]!, off: c.readUInt32LE(at + 8), mult: c.readUInt32LE(at + 16) };
    }
    assert.ok(this.notify.mult > 0, 'notify capability');
  }

  async r(off: number, size: number): Promise<number> {
    return Buffer.from(await this.dev.read(this.common.bar, this.common.off + off, size)).readUIntLE(0, size);
  }

  async w(off: number, size: number, v: number | bigint): Promise<void> {
    const b = Buffer.alloc(size);
    if (size === 8) b.writeBigUInt64LE(BigInt(v));
    else b.writeUIntLE(Number(v), 0, size);
    await this.dev.write(this.common.bar, this.common.off + off, b);
  }

  async status(): Promise<number> {
    return this.r(STATUS, 1);
  }

  async negotiate(want: bigint): Promise<void> {
    await this.w(STATUS, 1, 0);
    await until(async () => (await this.status()) === 0, () => 'reset');
    await this.w(STATUS, 1, ACK | DRV);
    await this.w(DFSEL, 4, 1);
    const hi = BigInt(await this.r(DF, 4)) << 32n;
    await this.w(DFSEL, 4, 0);
    const offered = hi | BigInt(await this.r(DF, 4));
    assert.equal(offered & want, want, 'features offered');
    await this.w(GFSEL, 4, 0);
    await this.w(GF, 4, Number(want & 0xffffffffn));
    await this.w(GFSEL, 4, 1);
    await this.w(GF, 4, Number(want >> 32n));
    await this.w(STATUS, 1, ACK | DRV | FEATURES_OK);
    assert.equal(await this.status(), ACK | DRV | FEATURES_OK);
  }

  async queue(index: number, ring: Ring, vector: number): Promise<void> {
    await this.w(QSEL, 2, index);
    await this.w(QSIZE, 2, ring.size);
    await this.w(QMSIX, 2, vector);
    await this.w(QDESC, 8, ring.desc);
    await this.w(QDRIVER, 8, ring.driver);
    await this.w(QDEVICE, 8, ring.device);
    await this.w(QENABLE, 2, 1);
  }

  async kick(index: number): Promise<void> {
    await this.w(QSEL, 2, index);
    const off = await this.r(QNOTIFY, 2);
    await this.dev.write(this.notify.bar, this.notify.off + off * this.notify.mult, Buffer.from([index, 0]));
  }
}

async function until(cond: () => boolean | Promise<boolean>, what: () => string, ms = 5000): Promise<void> {
  const t0 = performance.now();
  while (!(await cond())) {
    if (performance.now() - t0 > ms) throw new Error(`not within ${ms} ms: ${what()}`);
    await tick(2);
  }
}

/** Resolves at the eventfd's next signal (earlier ones drained). */
function irq(ev: EventFd, what: string, ms = 5000): Promise<void> {
  ev.read();
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      stop();
      reject(new Error(`no interrupt: ${what}`));
    }, ms);
    const stop = ev.subscribe(() => {
      clearTimeout(timer);
      stop();
      resolve();
    });
  });
}

function makeDisk(dir: string): string {
  const file = path.join(dir, 'disk.img');
  const b = Buffer.alloc(DISK_BYTES);
  for (let i = 0; i < b.length; i++) b[i] = (Math.floor(i / SECTOR) * 13 + i) & 0xff;
  fs.writeFileSync(file, b);
  return file;
}

const pattern = (sector: number, len: number): Buffer => {
  const b = Buffer.alloc(len);
  for (let i = 0; i < len; i++) b[i] = (Math.floor((sector * SECTOR + i) / SECTOR) * 13 + sector * SECTOR + i) & 0xff;
  return b;
};

interface Req {
  type: number;
  sector: number;
  hdr: number;
  data: number;
  len: number;
  status: number;
  id?: number;
}

/** A virtio-blk request (5.2.6): header in `hdrHeap`, data and status in `dataHeap`. */
function request(g: Guest, hdrHeap: Heap, dataHeap: Heap, type: number, sector: number, len: number, fill?: (i: number) => number): Req {
  const hdr = hdrHeap.alloc(16);
  const h = g.dv(hdr, 16);
  h.setUint32(0, type, true);
  h.setUint32(4, 0, true);
  h.setBigUint64(8, BigInt(sector), true);
  const data = len > 0 ? dataHeap.alloc(len) : 0;
  if (len > 0) {
    const d = g.bytes(data, len);
    for (let i = 0; i < len; i++) d[i] = fill ? fill(i) : 0xee;
  }
  const status = dataHeap.alloc(1);
  g.bytes(status, 1)[0] = 0xff;
  return { type, sector, hdr, data, len, status };
}

function submit(ring: Ring, r: Req): number {
  const bufs: Buf[] = [{ gpa: r.hdr, len: 16, write: false }];
  if (r.len > 0) bufs.push({ gpa: r.data, len: r.len, write: r.type !== T_OUT });
  bufs.push({ gpa: r.status, len: 1, write: true });
  r.id = ring.add(bufs);
  return r.id;
}

const statusOf = (g: Guest, r: Req): number => g.bytes(r.status, 1)[0]!;
const dataOf = (g: Guest, r: Req): Buffer => Buffer.from(g.bytes(r.data, r.len));

/**
 * Waits until `n` entries are used, looking at every turn of the event loop:
 * whenever a used entry is visible, its request's status byte (the last byte
 * the device writes) and, for a read, its data are already in guest memory.
 */
async function usedInOrder(g: Guest, ring: Ring, reqs: Req[], n: number): Promise<{ id: number; len: number }[]> {
  const t0 = performance.now();
  for (;;) {
    const seen = ring.peekUsed();
    for (const u of seen) {
      const r = reqs.find((x) => x.id === u.id);
      assert.ok(r, `used id ${u.id} is a request in flight`);
      assert.notEqual(statusOf(g, r), 0xff, `request ${u.id}: used visible before its status byte`);
      if (r.type === T_IN && statusOf(g, r) === 0) assert.deepEqual(dataOf(g, r), pattern(r.sector, r.len), `request ${u.id}: used before its data`);
    }
    if (seen.length >= n) return ring.takeUsed();
    assert.ok(performance.now() - t0 < 5000, `${n} used (${seen.length})`);
    await new Promise((resolve) => setImmediate(resolve));
  }
}

interface Setup {
  spec: VirtioBlkPciDeviceSpec;
  client: VfioUserClient;
  dev: VfioUserDevice;
  pci: Pci;
}

async function serve(t: TestContext, dir: string, name: string, g: Guest, options: VirtioBlkPciOptions): Promise<Setup> {
  const { spec, client, dev } = await serveSpec(t, path.join(dir, name), virtioBlkPciDevice(options));
  await client.dmaMap({ iova: RAM_GPA, size: RAM_BYTES, memory: g.ram });
  await client.dmaMap({ iova: SIDE_GPA, size: SIDE_BYTES, memory: g.side, passFd: false });
  const pci = new Pci(dev);
  await pci.discover();
  return { spec, client, dev, pci };
}

function guest(t: TestContext): Guest {
  const g = new Guest(SharedMemory.create(RAM_BYTES), SharedMemory.create(SIDE_BYTES));
  t.after(() => {
    g.ram.close();
    g.side.close();
  });
  return g;
}

/** MSI-X: vector 0 config, vector 1 queue 0. */
async function vectors(t: TestContext, s: Setup): Promise<{ cfg: EventFd; q: EventFd }> {
  const cfg = EventFd.create();
  const q = EventFd.create();
  t.after(() => {
    cfg.close();
    q.close();
  });
  await s.dev.setEventFds(IRQ_MSIX, 0, [cfg, q]);
  return { cfg, q };
}

async function start(s: Setup, ring: Ring, features: bigint): Promise<void> {
  await s.pci.negotiate(features);
  await s.pci.w(MSIX_CFG, 2, 0);
  await s.pci.queue(0, ring, 1);
  await s.pci.w(STATUS, 1, ACK | DRV | FEATURES_OK | DRIVER_OK);
}

/** Until the device has read the rings in at their start (the test's hooks then see only the kick's reads). */
async function started(s: Setup): Promise<void> {
  const q = s.spec.transport.queues[0]!;
  await until(() => q.staged !== null && q.engine !== null, () => 'the staged rings read in');
}

const tmp = (): string => fs.mkdtempSync(path.join(os.tmpdir(), 'vdk-staged-'));
const RING_AT = SIDE_GPA; // rings in the window without fd
/** Heaps for request buffers: in fd RAM, and in the window without fd (after the rings). */
const heaps = (): { ram: Heap; side: Heap } => ({ ram: new Heap(RAM_GPA + 0x10000, RAM_GPA + RAM_BYTES), side: new Heap(SIDE_GPA + 0x10000, SIDE_GPA + SIDE_BYTES) });

for (const packed of [false, true]) {
  for (const eventIdx of [false, true]) {
    const kind = `${packed ? 'packed' : 'split'}, EVENT_IDX ${eventIdx ? 'on' : 'off'}`;
    test(`rings in a window without fd (${kind}): buffers there and in fd RAM, reads and writes checked against the file, interrupts, the used side never before the data, the ring wrapping`, async (t) => {
      const dir = tmp();
      const file = makeDisk(dir);
      const g = guest(t);
      const s = await serve(t, dir, 'a.sock', g, { file, serial: 'staged-serial' });
      const irqs = await vectors(t, s);
      const size = 8;
      const ring: Ring = packed ? new PackedRing(g, RING_AT, size, eventIdx) : new SplitRing(g, RING_AT, size, eventIdx);
      await start(s, ring, F_VERSION_1 | (packed ? F_PACKED : 0n) | (eventIdx ? F_EVENT_IDX : 0n));
      const hp = heaps();
      let done = 0;
      // Rounds of two requests (3 descriptors each): past the end of the ring several times.
      for (let round = 0; round < 6; round++) {
        // Round-robin: buffers in fd RAM (rings without fd, buffers with), in the window without fd, and mixed.
        const [hh, dh] = ([[hp.ram, hp.ram], [hp.side, hp.side], [hp.side, hp.ram]] as const)[round % 3]!;
        const w = request(g, hh, dh, T_OUT, 100 + 2 * round, 2 * SECTOR, (i) => (round * 29 + i * 3) & 0xff);
        const r = request(g, dh, hh, T_IN, 10 + round, SECTOR);
        submit(ring, w);
        submit(ring, r);
        ring.interrupts(true);
        const got = irq(irqs.q, `round ${round}`);
        await s.pci.kick(0);
        const used = await usedInOrder(g, ring, [w, r], 2);
        await got;
        done += used.length;
        assert.deepEqual(new Map(used.map((u) => [u.id, u.len])), new Map([[w.id!, 1], [r.id!, SECTOR + 1]]));
        assert.equal(statusOf(g, w), 0);
        assert.equal(statusOf(g, r), 0);
        assert.deepEqual(fs.readFileSync(file).subarray(w.sector * SECTOR, (w.sector + 2) * SECTOR), dataOf(g, w), `round ${round}: written`);
        assert.deepEqual(dataOf(g, r), pattern(r.sector, SECTOR), `round ${round}: read`);
      }
      assert.equal(done, 12);
      // GET_ID with everything in the window without fd.
      const id = request(g, hp.side, hp.side, T_GET_ID, 0, 20);
      submit(ring, id);
      ring.interrupts(true);
      const got = irq(irqs.q, 'GET_ID');
      await s.pci.kick(0);
      await usedInOrder(g, ring, [id], 1);
      await got;
      assert.equal(dataOf(g, id).toString('latin1').replace(/\0+$/, ''), 'staged-serial');

      // Interrupts: the driver's event fields are read again after the flush, not taken from the kick's copy.
      const a = request(g, hp.ram, hp.ram, T_IN, 3, SECTOR);
      submit(ring, a);
      ring.interrupts(false); // no interrupt wanted
      const interruptsBefore = s.spec.transport.stats.interrupts;
      await s.pci.kick(0);
      await usedInOrder(g, ring, [a], 1);
      await until(() => s.spec.transport.queues[0]!.inFlight === 0, () => 'the request done (its interrupt decided)');
      assert.equal(s.spec.transport.stats.interrupts, interruptsBefore, 'suppressed: no interrupt');
      const b = request(g, hp.ram, hp.ram, T_IN, 4, SECTOR);
      submit(ring, b);
      ring.interrupts(true);
      const got2 = irq(irqs.q, 'interrupts on again');
      await s.pci.kick(0);
      await usedInOrder(g, ring, [b], 1);
      await got2;
      assert.equal(s.spec.transport.stats.interrupts, interruptsBefore + 1, 'one interrupt, for the second request only');

      const st = s.spec.transport.stats;
      assert.equal(st.brokenQueues, 0);
      assert.equal(await s.pci.status(), ACK | DRV | FEATURES_OK | DRIVER_OK);
      assert.ok(st.ringReads > 0 && st.ringWrites > 0, 'the rings went by DMA_READ / DMA_WRITE');
      assert.ok(st.bounceReads > 0 && st.bounceWrites > 0, 'and buffers in the window without fd by bounce buffers');
    });
  }
}

test('staged rings: the driver changes its event field while a request is in flight; the device reads it again before deciding', async (t) => {
  for (const packed of [false, true]) {
    const dir = tmp();
    const g = guest(t);
    const s = await serve(t, dir, `ev-${packed}.sock`, g, { file: makeDisk(dir), latencyMs: 80 });
    const irqs = await vectors(t, s);
    const ring: Ring = packed ? new PackedRing(g, RING_AT, 8, true) : new SplitRing(g, RING_AT, 4, true);
    await start(s, ring, F_VERSION_1 | F_EVENT_IDX | (packed ? F_PACKED : 0n));
    const hp = heaps();
    const r = request(g, hp.ram, hp.ram, T_IN, 9, SECTOR);
    submit(ring, r);
    ring.interrupts(false);
    await s.pci.kick(0);
    await until(() => s.spec.disk.stats.reads === 1, () => 'taken');
    ring.interrupts(true); // after the device copied the ring: only a fresh read sees this
    const got = irq(irqs.q, `${packed ? 'packed' : 'split'}: interrupt asked for while in flight`);
    await usedInOrder(g, ring, [r], 1);
    await got;
  }
});

test('staged rings: a reset with a staged request in flight; status reads non-zero until it is done, its completion never reaches the old ring', async (t) => {
  const dir = tmp();
  const g = guest(t);
  const s = await serve(t, dir, 'a.sock', g, { file: makeDisk(dir), latencyMs: 120 });
  const irqs = await vectors(t, s);
  const ring = new SplitRing(g, RING_AT, 8, false);
  await start(s, ring, F_VERSION_1);
  const hp = heaps();
  const r = request(g, hp.side, hp.side, T_IN, 5, SECTOR);
  submit(ring, r);
  await s.pci.kick(0);
  await until(() => s.spec.disk.stats.reads === 1, () => 'the request was taken');
  await s.pci.w(STATUS, 1, 0);
  assert.notEqual(await s.pci.status(), 0, 'resetting: a request is in flight');
  await until(async () => (await s.pci.status()) === 0, () => 'status 0 once the request is done');
  // Its I/O finished into its buffers (the reset waited for that), but its used entry was dropped.
  assert.equal(ring.usedIdx, 0, 'the old used ring untouched');
  assert.deepEqual(ring.peekUsed(), []);
  // The device goes on after the reset, with new rings there.
  const ring2 = new SplitRing(g, RING_AT + 0x4000, 8, false);
  await start(s, ring2, F_VERSION_1);
  const r2 = request(g, hp.side, hp.ram, T_IN, 6, SECTOR);
  submit(ring2, r2);
  const got = irq(irqs.q, 'after the reset');
  await s.pci.kick(0);
  await usedInOrder(g, ring2, [r2], 1);
  await got;
  assert.equal(s.spec.transport.stats.brokenQueues, 0);
});

test('staged rings: migration with requests in flight; quiesced at STOP (their used entries flushed), restored from the saved base, I/O goes on at the destination', async (t) => {
  for (const packed of [false, true]) {
    const dir = tmp();
    const file = makeDisk(dir);
    const g = guest(t);
    const src = await serve(t, dir, `src-${packed}.sock`, g, { file, latencyMs: 80 });
    const dst = await serve(t, dir, `dst-${packed}.sock`, g, { file });
    const irqs = await vectors(t, src);
    await dst.dev.setEventFds(IRQ_MSIX, 0, [irqs.cfg, irqs.q]);
    const ring: Ring = packed ? new PackedRing(g, RING_AT, 8, false) : new SplitRing(g, RING_AT, 8, false);
    await start(src, ring, F_VERSION_1 | (packed ? F_PACKED : 0n));
    const hp = heaps();
    const heap = hp.side;
    const all: Req[] = [];
    // Past the first wrap before migrating (packed: 3 descriptors a chain on a ring of 8).
    for (let k = 0; k < 3; k++) {
      const r = request(g, heap, hp.ram, T_IN, 30 + k, SECTOR);
      submit(ring, r);
      await src.pci.kick(0);
      await usedInOrder(g, ring, [r], 1);
    }
    const w = request(g, heap, heap, T_OUT, 700, SECTOR, (i) => (i * 7 + 1) & 0xff);
    const r = request(g, heap, heap, T_IN, 41, SECTOR);
    all.push(w, r);
    submit(ring, w);
    submit(ring, r);
    await src.pci.kick(0);
    await until(() => src.spec.disk.stats.reads + src.spec.disk.stats.writes === 5, () => 'the source took both');
    await migrate(src.dev, dst.dev);
    assert.equal(await dst.dev.migrationState(), MIG_RUNNING);
    // Both completed at the source before its STOP answered: in guest memory now.
    const used = ring.takeUsed();
    assert.deepEqual(new Set(used.map((u) => u.id)), new Set([w.id, r.id]));
    assert.equal(statusOf(g, w), 0);
    assert.deepEqual(dataOf(g, r), pattern(41, SECTOR));
    assert.deepEqual(fs.readFileSync(file).subarray(700 * SECTOR, 701 * SECTOR), dataOf(g, w));
    // The destination goes on from the saved base (its kick, its ring copies).
    const late = request(g, heap, heap, T_IN, 42, 2 * SECTOR);
    submit(ring, late);
    const got = irq(irqs.q, 'completion at the destination');
    await dst.pci.kick(0);
    await usedInOrder(g, ring, [late], 1);
    await got;
    assert.equal(dst.spec.disk.stats.reads, 1);
    assert.equal(src.spec.disk.stats.reads + src.spec.disk.stats.writes, 5, 'the stopped source took nothing more');
    assert.equal(dst.spec.transport.stats.brokenQueues + src.spec.transport.stats.brokenQueues, 0);
  }
});

/** Calls `hook(address, count)` when our client serves a DMA_READ (before it reads its memory for the reply). */
function onDmaRead(client: VfioUserClient, hook: (address: number, count: number) => void): void {
  const table = client.dma;
  const lookup = table.lookup.bind(table);
  const translate = table.translate.bind(table);
  table.lookup = (iova, length, prot) => {
    if (prot === DMA_READ_PROT) hook(iova, length);
    return lookup(iova, length, prot);
  };
  table.translate = (iova, length, prot) => {
    if (prot === DMA_READ_PROT) hook(iova, length);
    return translate(iova, length, prot);
  };
}

test('a guest that rewrites its ring between the device\'s fetches: a typed break (DEVICE_NEEDS_RESET), no crash, the device works after a reset', async (t) => {
  const dir = tmp();
  const g = guest(t);
  const s = await serve(t, dir, 'a.sock', g, { file: makeDisk(dir) });
  const irqs = await vectors(t, s);
  let hook: ((address: number, count: number) => void) | null = null;
  onDmaRead(s.client, (a, n) => hook?.(a, n));

  // Split: the avail ring read, then, as the device reads the descriptor table, the head descriptor rewritten to chain past the table.
  const ring = new SplitRing(g, RING_AT, 4, false);
  await start(s, ring, F_VERSION_1);
  await started(s);
  const hp = heaps();
  const r = request(g, hp.ram, hp.ram, T_IN, 1, SECTOR);
  const head = submit(ring, r);
  hook = (a, n) => {
    if (a !== ring.desc || n !== 16 * ring.size) return;
    hook = null;
    const d = g.dv(ring.desc + 16 * head, 16);
    d.setUint16(12, NEXT, true);
    d.setUint16(14, 999, true); // next: not below the queue size
    g.setU16(ring.driver + 2, 500); // and the avail idx far past the ring
  };
  let cfg = irq(irqs.cfg, 'NEEDS_RESET (split)');
  await s.pci.kick(0);
  await cfg;
  assert.ok((await s.pci.status()) & NEEDS_RESET, 'DEVICE_NEEDS_RESET');
  assert.equal(ring.usedIdx, 0);
  assert.equal(s.spec.transport.stats.brokenQueues, 1);

  // Packed: between the two reads of the descriptor ring, the available head's body rewritten to point outside guest memory.
  const pring = new PackedRing(g, RING_AT + 0x4000, 8, false);
  await start(s, pring, F_VERSION_1 | F_PACKED);
  await started(s);
  const pr = request(g, hp.ram, hp.ram, T_IN, 2, SECTOR);
  submit(pring, pr);
  let reads = 0;
  hook = (a) => {
    if (a !== pring.desc) return;
    if (++reads < 2) return; // the first read (flags) saw it available
    hook = null;
    g.dv(pring.desc, 16).setBigUint64(0, 0x7000_0000n, true); // the header's address: in no window
  };
  cfg = irq(irqs.cfg, 'NEEDS_RESET (packed)');
  await s.pci.kick(0);
  await cfg;
  assert.ok((await s.pci.status()) & NEEDS_RESET);
  assert.equal(pring.peekUsed().length, 0);
  assert.ok(reads >= 2, 'the descriptor ring was read twice');

  // The server is fine: a reset and a good request.
  const ring3 = new SplitRing(g, RING_AT + 0x8000, 4, false);
  await start(s, ring3, F_VERSION_1);
  const ok = request(g, hp.side, hp.side, T_IN, 3, SECTOR);
  submit(ring3, ok);
  const got = irq(irqs.q, 'after the reset');
  await s.pci.kick(0);
  await usedInOrder(g, ring3, [ok], 1);
  await got;
  assert.deepEqual(dataOf(g, ok), pattern(3, SECTOR));
});

test('staged rings: the window without fd unmapped under a request in flight; the completion waits for it, lands once it is mapped again, and the queue goes on', async (t) => {
  const dir = tmp();
  const g = guest(t);
  const s = await serve(t, dir, 'a.sock', g, { file: makeDisk(dir), latencyMs: 100 });
  const irqs = await vectors(t, s);
  const ring = new SplitRing(g, RING_AT, 8, false);
  await start(s, ring, F_VERSION_1);
  const hp = heaps();
  const r = request(g, hp.ram, hp.ram, T_IN, 12, 2 * SECTOR); // buffers in fd RAM, rings in the window without fd
  submit(ring, r);
  await s.pci.kick(0);
  await until(() => s.spec.disk.stats.reads === 1, () => 'taken');
  await s.client.dmaUnmap(SIDE_GPA, SIDE_BYTES);
  await until(() => statusOf(g, r) === 0, () => 'the I/O finished into fd RAM');
  assert.equal(ring.usedIdx, 0, 'no used entry while its ring is not mapped');
  assert.equal(s.spec.transport.queues[0]!.inFlight, 1, 'the completion is kept');
  const got = irq(irqs.q, 'the completion after the re-map');
  await s.client.dmaMap({ iova: SIDE_GPA, size: SIDE_BYTES, memory: g.side, passFd: false });
  await usedInOrder(g, ring, [r], 1);
  await got;
  assert.deepEqual(dataOf(g, r), pattern(12, 2 * SECTOR));
  const next = request(g, hp.side, hp.side, T_IN, 13, SECTOR);
  submit(ring, next);
  await s.pci.kick(0);
  await usedInOrder(g, ring, [next], 1);
  assert.deepEqual(dataOf(g, next), pattern(13, SECTOR));
  assert.equal(s.spec.transport.stats.brokenQueues, 0);
});

test('staged rings: a STOP while a completion is due on rings whose window is unmapped does not hang: the queue breaks (DEVICE_NEEDS_RESET) and the STOP answers', async (t) => {
  const dir = tmp();
  const g = guest(t);
  const s = await serve(t, dir, 'a.sock', g, { file: makeDisk(dir), latencyMs: 100 });
  await vectors(t, s);
  const ring = new SplitRing(g, RING_AT, 8, false);
  await start(s, ring, F_VERSION_1);
  const hp = heaps();
  const r = request(g, hp.ram, hp.ram, T_IN, 14, SECTOR);
  submit(ring, r);
  await s.pci.kick(0);
  await until(() => s.spec.disk.stats.reads === 1, () => 'taken');
  await s.client.dmaUnmap(SIDE_GPA, SIDE_BYTES);
  await s.dev.setMigrationState(1); // STOP: answered once nothing is in flight
  assert.equal(await s.dev.migrationState(), 1);
  assert.equal(s.spec.transport.queues[0]!.inFlight, 0);
  assert.ok((await s.pci.status()) & NEEDS_RESET, 'the completion could not reach its ring: DEVICE_NEEDS_RESET');
  assert.equal(ring.usedIdx, 0);
  assert.equal(s.spec.transport.stats.brokenQueues, 1);
});
