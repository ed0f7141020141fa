/**
 * The guest side of a virtio-net PCI device over vfio-user, for tests: our
 * VfioUserClient as the guest's driver. Config space walked by hand, the
 * common cfg (virtio 1.2 4.1.4.3), the device cfg (5.1.4), split (2.7) and
 * packed (2.8) rings laid out by hand in a memfd DMA window, virtio_net_hdr
 * (5.1.6) before every frame, MSI-X vector eventfds. Every offset and bit is
 * from the spec, none imported from the code under test.
 */
import type { TestContext } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import type { VfioUserDevice } from '../../src/vfio-user/client-device.js';
import { SharedMemory, EventFd } from '../../src/sys/index.js';
import { virtioNetPciDevice, type VirtioNetPciDeviceSpec, type VirtioNetPciOptions } from '../../src/devices/virtio-net-pci.js';
import { tick } from './sys.js';
import { serveSpec, type Served } from './vfio-user-serve.js';

// --- numbers from the specs ---

// PCI header (PCI local bus 3.0, 6.1) and capability ids.
export const CFG_VENDOR = 0x00, CFG_DEVICE = 0x02, CFG_STATUS = 0x06, CFG_REVISION = 0x08, CFG_CLASS = 0x09;
export const CFG_SUBSYS_VENDOR = 0x2c, CFG_SUBSYS = 0x2e, CFG_CAPS = 0x34;
export const CAP_ID_VENDOR = 0x09, CAP_ID_MSIX = 0x11;
// virtio_pci_cap cfg_type (virtio 1.2 4.1.4).
export const T_COMMON = 1, T_NOTIFY = 2, T_ISR = 3, T_DEVICE = 4;
// virtio_pci_common_cfg (4.1.4.3).
export const C_DFSEL = 0, C_DF = 4, C_GFSEL = 8, C_GF = 12, C_MSIX = 16, C_NUMQ = 18, C_STATUS = 20;
export const C_QSEL = 22, C_QSIZE = 24, C_QMSIX = 26, C_QENABLE = 28, C_QNOTIFY = 30, C_QDESC = 32, C_QDRIVER = 40, C_QDEVICE = 48;
// device_status (2.1).
export const S_ACK = 1, S_DRIVER = 2, S_DRIVER_OK = 4, S_FEATURES_OK = 8;
// Feature bits (6, 5.1.3).
export const B = (n: number): bigint => 1n << BigInt(n);
export const F_CSUM = B(0), F_GUEST_CSUM = B(1), F_MTU = B(3), F_MAC = B(5), F_MRG_RXBUF = B(15), F_STATUS = B(16);
export const F_CTRL_VQ = B(17), F_CTRL_RX = B(18), F_MQ = B(22), F_CTRL_MAC_ADDR = B(23);
export const F_INDIRECT = B(28), F_EVENT_IDX = B(29), F_VERSION_1 = B(32), F_RING_PACKED = B(34), F_IN_ORDER = B(35);
/** Offloads: GUEST_TSO4..HOST_UFO (7..14), never offered. */
export const F_GSO = Array.from({ length: 8 }, (_, i) => B(7 + i)).reduce((a, b) => a | b);
// virtio_net_config (5.1.4): mac[6], status le16, max_virtqueue_pairs le16, mtu le16.
export const NC_MAC = 0, NC_STATUS = 6, NC_PAIRS = 8, NC_MTU = 10;
export const NET_S_LINK_UP = 1;
/** virtio_net_hdr with num_buffers (5.1.6): flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers. */
export const HDR = 12;
export const HDR_NUM_BUFFERS = 10;
// Control queue (5.1.6.5): class RX 0 (PROMISC 0, ALLMULTI 1: one byte, 0 off / 1 on), class MAC 1
// (MAC_TABLE_SET 0: two virtio_net_ctrl_mac, unicast then multicast; MAC_ADDR_SET 1: mac[6]); ack OK 0, ERR 1.
export const CTRL_RX = 0, CTRL_RX_PROMISC = 0, CTRL_RX_ALLMULTI = 1;
export const CTRL_MAC = 1, CTRL_MAC_TABLE_SET = 0, CTRL_MAC_ADDR_SET = 1, CTRL_OK = 0, CTRL_ERR = 1;
// Descriptor flags (2.7.5, 2.8.1).
export const D_NEXT = 1, D_WRITE = 2, D_AVAIL = 1 << 7, D_USED = 1 << 15;
// vfio-user IRQ index of MSI-X.
export const IRQ_MSIX = 2;

export const RAM_GPA = 0x8000_0000;
export const RAM_BYTES = 4 << 20;
export const RX = 0, TX = 1, CTRL = 2;

export async function until(cond: () => boolean | Promise<boolean>, what: () => string, ms = 5000): Promise<void> {
  const t0 = performance.now();
  while (!(await cond())) {
    if (performance.now() - t0 > ms) throw new Error(`not within ${ms} ms: ${what()}`);
    await tick(2);
  }
}

/** A chain's buffer as the driver lays it out. */
export interface Seg {
  gpa: number;
  len: number;
  writable?: boolean;
}

/** The driver's side of a ring: make chains available, take used ones. */
export interface GuestRing {
  readonly size: number;
  readonly desc: number;
  readonly driverArea: number;
  readonly deviceArea: number;
  /** Writes a chain and makes it available; returns the id the device will use for it. */
  add(segs: Seg[]): number;
  /** Used chains since the last call, in ring order. */
  used(): { id: number; len: number }[];
}

/** Guest RAM: a memfd, mapped by fd at RAM_GPA; rings from its start, buffers from 1 MiB. */
export class Ram {
  readonly shm = SharedMemory.create(RAM_BYTES);
  readonly b = Buffer.from(this.shm.bytes.buffer, this.shm.bytes.byteOffset, this.shm.bytes.byteLength);
  #heap = RAM_GPA + (1 << 20);
  #ringSlot = 0;
  at(gpa: number): number {
    return gpa - RAM_GPA;
  }
  alloc(len: number): number {
    const gpa = (this.#heap = Math.ceil(this.#heap / 64) * 64);
    this.#heap += len;
    assert.ok(this.#heap <= RAM_GPA + RAM_BYTES, 'guest RAM exhausted');
    return gpa;
  }
  /** 12 KiB for a ring: descriptors, then driver area at +4 KiB, device area at +8 KiB; zeroed. */
  ringArea(): number {
    const gpa = RAM_GPA + 0x3000 * this.#ringSlot++;
    assert.ok(gpa + 0x3000 <= RAM_GPA + (1 << 20));
    this.b.fill(0, this.at(gpa), this.at(gpa) + 0x3000);
    return gpa;
  }
}

/** A ring's three areas in a fresh 12 KiB of guest RAM, and its free ids (descriptor indexes or buffer ids). */
export abstract class RingBase {
  readonly desc: number;
  readonly driverArea: number;
  readonly deviceArea: number;
  protected free: number[];
  constructor(readonly ram: Ram, readonly size: number) {
    this.desc = ram.ringArea();
    this.driverArea = this.desc + 0x1000;
    this.deviceArea = this.desc + 0x2000;
    this.free = [...Array(size).keys()];
  }
}

/** Split virtqueue (2.7): descriptor table, avail ring (flags, idx, ring[]), used ring (flags, idx, {id le32, len le32}[]). */
export class Split extends RingBase implements GuestRing {
  #avail = 0;
  #seen = 0;
  readonly #heads = new Map<number, number[]>();
  add(segs: Seg[]): number {
    assert.ok(segs.length <= this.free.length, 'split ring full');
    const b = this.ram.b;
    const ids = this.free.splice(0, segs.length);
    for (let i = 0; i < segs.length; i++) {
      const d = this.ram.at(this.desc) + 16 * ids[i]!;
      const last = i === segs.length - 1;
      b.writeBigUInt64LE(BigInt(segs[i]!.gpa), d);
      b.writeUInt32LE(segs[i]!.len, d + 8);
      b.writeUInt16LE((last ? 0 : D_NEXT) | (segs[i]!.writable ? D_WRITE : 0), d + 12);
      b.writeUInt16LE(last ? 0 : ids[i + 1]!, d + 14);
    }
    const a = this.ram.at(this.driverArea);
    b.writeUInt16LE(ids[0]!, a + 4 + 2 * (this.#avail % this.size));
    this.#avail = (this.#avail + 1) & 0xffff;
    b.writeUInt16LE(this.#avail, a + 2);
    this.#heads.set(ids[0]!, ids);
    return ids[0]!;
  }
  get usedIdx(): number {
    return this.ram.b.readUInt16LE(this.ram.at(this.deviceArea) + 2);
  }
  used(): { id: number; len: number }[] {
    const out = [];
    const u = this.ram.at(this.deviceArea);
    for (const end = this.usedIdx; this.#seen !== end; this.#seen = (this.#seen + 1) & 0xffff) {
      const e = u + 4 + 8 * (this.#seen % this.size);
      const id = this.ram.b.readUInt32LE(e);
      const ids = this.#heads.get(id);
      assert.ok(ids, `used id ${id} is not a head in flight`);
      this.#heads.delete(id);
      this.free.push(...ids);
      out.push({ id, len: this.ram.b.readUInt32LE(e + 4) });
    }
    return out;
  }
}

/** Packed virtqueue (2.8): 16-byte descriptors {addr, len, id, flags}, AVAIL/USED against the wrap counters. */
export class Packed extends RingBase implements GuestRing {
  #slot = 0;
  #wrap = 1;
  #usedSlot = 0;
  #usedWrap = 1;
  #busy = 0;
  readonly #lengths = new Map<number, number>();
  add(segs: Seg[]): number {
    assert.ok(this.#busy + segs.length <= this.size && this.free.length > 0, 'packed ring full');
    const b = this.ram.b;
    const id = this.free.shift()!;
    const head = this.#slot;
    let headFlags = 0;
    for (let i = 0; i < segs.length; i++) {
      const d = this.ram.at(this.desc) + 16 * this.#slot;
      const flags = (this.#wrap ? D_AVAIL : D_USED) | (i < segs.length - 1 ? D_NEXT : 0) | (segs[i]!.writable ? D_WRITE : 0);
      b.writeBigUInt64LE(BigInt(segs[i]!.gpa), d);
      b.writeUInt32LE(segs[i]!.len, d + 8);
      b.writeUInt16LE(id, d + 12);
      if (i === 0) headFlags = flags;
      else b.writeUInt16LE(flags, d + 14);
      this.#slot++;
      if (this.#slot === this.size) {
        this.#slot = 0;
        this.#wrap ^= 1;
      }
    }
    // The head's flags last: the chain becomes available at once.
    b.writeUInt16LE(headFlags, this.ram.at(this.desc) + 16 * head + 14);
    this.#busy += segs.length;
    this.#lengths.set(id, segs.length);
    return id;
  }
  used(): { id: number; len: number }[] {
    const out = [];
    const b = this.ram.b;
    for (;;) {
      const d = this.ram.at(this.desc) + 16 * this.#usedSlot;
      const flags = b.readUInt16LE(d + 14);
      const avail = (flags & D_AVAIL) !== 0 ? 1 : 0;
      const used = (flags & D_USED) !== 0 ? 1 : 0;
      if (avail !== this.#usedWrap || used !== this.#usedWrap) return out;
      const id = b.readUInt16LE(d + 12);
      const n = this.#lengths.get(id);
      assert.ok(n !== undefined, `used buffer id ${id} is not in flight`);
      this.#lengths.delete(id);
      this.free.push(id);
      this.#busy -= n;
      out.push({ id, len: b.readUInt32LE(d + 8) });
      this.#usedSlot += n;
      if (this.#usedSlot >= this.size) {
        this.#usedSlot -= this.size;
        this.#usedWrap ^= 1;
      }
    }
  }
}

/** The guest's virtio-net PCI driver: capabilities, common cfg, device cfg, queues, MSI-X. */
export class Guest {
  readonly caps = new Map<number, { bar: number; offset: number; length: number; mult: number }>();
  msixVectors = 0;
  config = Buffer.alloc(0);
  readonly irqs: EventFd[] = [];
  readonly interrupts: number[] = [];
  readonly #unsub: (() => void)[] = [];
  constructor(readonly dev: VfioUserDevice) {}

  async probe(): Promise<void> {
    const c = Buffer.from(await this.dev.read(7, 0, 256));
    this.config = c;
    assert.ok(c.readUInt16LE(CFG_STATUS) & 0x10, 'capabilities list');
    for (let at = c[CFG_CAPS]! & 0xfc, hops = 0; at !== 0; at = c[at + 1]! & 0xfc) {
      assert.ok(at >= 0x40 && ++hops < 48, 'capability chain');
      if (c[at] === CAP_ID_VENDOR) {
        const type = c[at + 3]!;
        if (!this.caps.has(type)) {
          this.caps.set(type, { bar: c[at + 4]!, offset: c.readUInt32LE(at + 8), length: c.readUInt32LE(at + 12), mult: type === T_NOTIFY ? c.readUInt32LE(at + 16) : 0 });
        }
      } else if (c[at] === CAP_ID_MSIX) {
        this.msixVectors = (c.readUInt16LE(at + 2) & 0x7ff) + 1;
      }
    }
  }

  async rd(type: number, off: number, size: 1 | 2 | 4): Promise<number> {
    const cap = this.caps.get(type)!;
    return Buffer.from(await this.dev.read(cap.bar, cap.offset + off, size)).readUIntLE(0, size);
  }

  async wr(type: number, off: number, size: 1 | 2 | 4 | 8, v: number | bigint): Promise<void> {
    const cap = this.caps.get(type)!;
    const b = Buffer.alloc(size);
    if (size === 8) b.writeBigUInt64LE(BigInt(v));
    else b.writeUIntLE(Number(v), 0, size);
    await this.dev.write(cap.bar, cap.offset + off, b);
  }

  async deviceCfg(off: number, len: number): Promise<Buffer> {
    const cap = this.caps.get(T_DEVICE)!;
    return Buffer.from(await this.dev.read(cap.bar, cap.offset + off, len));
  }

  async offered(): Promise<bigint> {
    let f = 0n;
    for (const sel of [0, 1]) {
      await this.wr(T_COMMON, C_DFSEL, 4, sel);
      f |= BigInt(await this.rd(T_COMMON, C_DF, 4)) << BigInt(32 * sel);
    }
    return f;
  }

  /** 3.1.1 up to FEATURES_OK; MSI-X eventfds on every vector; returns the features accepted. */
  async init(want: bigint): Promise<bigint> {
    await this.wr(T_COMMON, C_STATUS, 1, 0);
    await until(async () => (await this.rd(T_COMMON, C_STATUS, 1)) === 0, () => 'status 0 after reset');
    await this.wr(T_COMMON, C_STATUS, 1, S_ACK);
    await this.wr(T_COMMON, C_STATUS, 1, S_ACK | S_DRIVER);
    const f = (await this.offered()) & want;
    for (const sel of [0, 1]) {
      await this.wr(T_COMMON, C_GFSEL, 4, sel);
      await this.wr(T_COMMON, C_GF, 4, Number((f >> BigInt(32 * sel)) & 0xffffffffn));
    }
    await this.wr(T_COMMON, C_STATUS, 1, S_ACK | S_DRIVER | S_FEATURES_OK);
    assert.equal(await this.rd(T_COMMON, C_STATUS, 1), S_ACK | S_DRIVER | S_FEATURES_OK, 'FEATURES_OK kept');
    await this.wireIrqs();
    await this.wr(T_COMMON, C_MSIX, 2, 0);
    return f;
  }

  /** An eventfd on every MSI-X vector (SET_IRQS), counted in `interrupts`: what the VMM does, also on a migration's destination. */
  async wireIrqs(): Promise<void> {
    if (this.irqs.length === 0) {
      for (let v = 0; v < this.msixVectors; v++) {
        const e = EventFd.create();
        this.irqs.push(e);
        this.interrupts.push(0);
        this.#unsub.push(e.subscribe((n) => (this.interrupts[v]! += n)));
      }
    }
    await this.dev.setEventFds(IRQ_MSIX, 0, this.irqs);
  }

  /** Queue `index` on `ring`, interrupting on vector index + 1. */
  async queue(index: number, ring: GuestRing): Promise<void> {
    await this.wr(T_COMMON, C_QSEL, 2, index);
    assert.ok((await this.rd(T_COMMON, C_QSIZE, 2)) >= ring.size);
    await this.wr(T_COMMON, C_QSIZE, 2, ring.size);
    await this.wr(T_COMMON, C_QMSIX, 2, index + 1);
    assert.equal(await this.rd(T_COMMON, C_QMSIX, 2), index + 1);
    await this.wr(T_COMMON, C_QDESC, 8, ring.desc);
    await this.wr(T_COMMON, C_QDRIVER, 8, ring.driverArea);
    await this.wr(T_COMMON, C_QDEVICE, 8, ring.deviceArea);
    await this.wr(T_COMMON, C_QENABLE, 2, 1);
  }

  async driverOk(): Promise<void> {
    await this.wr(T_COMMON, C_STATUS, 1, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
  }

  async kick(index: number): Promise<void> {
    await this.wr(T_COMMON, C_QSEL, 2, index);
    const off = await this.rd(T_COMMON, C_QNOTIFY, 2);
    const n = this.caps.get(T_NOTIFY)!;
    const b = Buffer.alloc(2);
    b.writeUInt16LE(index);
    await this.dev.write(n.bar, n.offset + off * n.mult, b);
  }

  close(): void {
    for (const u of this.#unsub) u();
    for (const e of this.irqs) e.close();
  }
}

/** A received frame: the header's bytes and the frame joined from num_buffers buffers. */
export interface Rx {
  hdr: Buffer;
  frame: Buffer;
  buffers: number;
}

/** The guest's RX queue: buffers posted once and again after use; used buffers joined into frames. */
export class RxQueue {
  readonly #bufs = new Map<number, number>();
  readonly frames: Rx[] = [];
  /** Buffers used with length 0 (no frame in them). */
  empties = 0;
  /** Used entries of a frame whose num_buffers are not all in yet. */
  #partial: { gpa: number; len: number }[] = [];
  constructor(readonly ram: Ram, readonly ring: GuestRing, readonly bufSize: number) {}

  post(count: number): void {
    for (let i = 0; i < count; i++) this.#post(this.ram.alloc(this.bufSize));
  }

  #post(gpa: number): void {
    this.#bufs.set(this.ring.add([{ gpa, len: this.bufSize, writable: true }]), gpa);
  }

  /** Takes used buffers, re-posting each; returns the frames completed. */
  reap(repost = true): Rx[] {
    const done: Rx[] = [];
    for (const u of this.ring.used()) {
      const gpa = this.#bufs.get(u.id);
      assert.ok(gpa !== undefined, `RX used id ${u.id}`);
      this.#bufs.delete(u.id);
      assert.ok(u.len <= this.bufSize, `RX used len ${u.len} within the buffer`);
      if (u.len === 0 && this.#partial.length === 0) {
        // Given back empty (buffers the device held when its queue stopped): no frame.
        this.empties++;
        if (repost) this.#post(gpa);
        continue;
      }
      this.#partial.push({ gpa, len: u.len });
      const first = this.#partial[0]!;
      const hdr = Buffer.from(this.ram.b.subarray(this.ram.at(first.gpa), this.ram.at(first.gpa) + HDR));
      const n = hdr.readUInt16LE(HDR_NUM_BUFFERS);
      assert.ok(n >= 1, 'num_buffers >= 1');
      if (this.#partial.length < n) continue;
      const parts = this.#partial.map((p, i) => this.ram.b.subarray(this.ram.at(p.gpa) + (i === 0 ? HDR : 0), this.ram.at(p.gpa) + p.len));
      const rx = { hdr, frame: Buffer.concat(parts), buffers: n };
      if (repost) for (const p of this.#partial) this.#post(p.gpa);
      this.#partial = [];
      done.push(rx);
      this.frames.push(rx);
    }
    return done;
  }
}

/** The guest's TX queue: header and frame in buffers of their own or in one, kicked through the notify area. */
const TX_SLOT = 2048;

export class TxQueue {
  #n = 0;
  /** Chains in flight by id, with the slot their frame is in (reused once used). */
  readonly inFlight = new Map<number, number>();
  readonly #slots: number[] = [];
  constructor(readonly ram: Ram, readonly ring: GuestRing, readonly guest: Guest, readonly index = TX) {}

  /** Makes frames available (a zero virtio_net_hdr before each, in 2 KiB slots reused after use), then one kick. */
  async send(frames: Buffer[]): Promise<void> {
    for (const f of frames) {
      const small = HDR + f.length <= TX_SLOT;
      const hdr = small ? (this.#slots.pop() ?? this.ram.alloc(TX_SLOT)) : this.ram.alloc(HDR + f.length);
      this.ram.b.fill(0, this.ram.at(hdr), this.ram.at(hdr) + HDR);
      f.copy(this.ram.b, this.ram.at(hdr) + HDR);
      // Every other frame: header and data in two descriptors.
      const segs = this.#n++ % 2 === 0 ? [{ gpa: hdr, len: HDR + f.length }] : [{ gpa: hdr, len: HDR }, { gpa: hdr + HDR, len: f.length }];
      this.inFlight.set(this.ring.add(segs), small ? hdr : -1);
    }
    await this.guest.kick(this.index);
  }

  /** Used TX chains; each must have been in flight, with length 0 (nothing written). */
  reap(): number {
    const used = this.ring.used();
    for (const u of used) {
      const slot = this.inFlight.get(u.id);
      assert.ok(slot !== undefined && this.inFlight.delete(u.id), `TX used id ${u.id} in flight`);
      if (slot >= 0) this.#slots.push(slot);
      assert.equal(u.len, 0, 'a TX chain has no device-writable byte');
    }
    return used.length;
  }
}

export interface PciPort extends Served<VirtioNetPciDeviceSpec> {
  guest: Guest;
  ram: Ram;
}

export async function pciPort(t: TestContext, dir: string, name: string, options: VirtioNetPciOptions): Promise<PciPort> {
  const served = await serveSpec(t, path.join(dir, name), virtioNetPciDevice(options));
  const ram = new Ram();
  t.after(() => ram.shm.close());
  await served.client.dmaMap({ iova: RAM_GPA, size: RAM_BYTES, memory: ram.shm });
  const guest = new Guest(served.dev);
  t.after(() => guest.close());
  await guest.probe();
  return { ...served, guest, ram };
}

export interface Up {
  rx: RxQueue;
  tx: TxQueue;
  ctrl: GuestRing;
  features: bigint;
}

/** Features, queues rx0 / tx0 / ctrl, RX buffers posted, DRIVER_OK. */
export async function bringUp(p: PciPort, o: { packed: boolean; rxBuf: number; rxCount?: number; size?: number; want?: bigint }): Promise<Up> {
  const want = o.want ?? (F_VERSION_1 | F_MAC | F_MRG_RXBUF | F_STATUS | F_MTU | F_CTRL_VQ | F_CTRL_MAC_ADDR | (o.packed ? F_RING_PACKED : 0n));
  const features = await p.guest.init(want);
  const size = o.size ?? 64;
  const mk = (): GuestRing => (o.packed ? new Packed(p.ram, size) : new Split(p.ram, size));
  const up = { rx: new RxQueue(p.ram, mk(), o.rxBuf), tx: new TxQueue(p.ram, mk(), p.guest), ctrl: mk(), features };
  await p.guest.queue(RX, up.rx.ring);
  await p.guest.queue(TX, up.tx.ring);
  if (features & F_CTRL_VQ) await p.guest.queue(CTRL, up.ctrl);
  up.rx.post(o.rxCount ?? size);
  await p.guest.driverOk();
  await until(() => p.spec.net.rxReady, () => 'the RX ring running');
  return up;
}

/** "aa:bb:..." as its 6 bytes. */
export function macOf(mac: string): Buffer {
  return Buffer.from(mac.split(':').map((h) => parseInt(h, 16)));
}

/**
 * VIRTIO_NET_CTRL_MAC_TABLE_SET's data (5.1.6.5.2): struct virtio_net_ctrl_mac
 * { le32 entries; u8 macs[entries][6]; } for the unicast table, then one for the multicast table.
 */
export function macTableData(unicast: string[], multicast: string[]): Buffer {
  const table = (macs: string[]): Buffer => {
    const n = Buffer.alloc(4);
    n.writeUInt32LE(macs.length);
    return Buffer.concat([n, ...macs.map(macOf)]);
  };
  return Buffer.concat([table(unicast), table(multicast)]);
}

/**
 * One control command (5.1.6.5): struct virtio_net_ctrl { u8 class; u8 command; u8 command-specific-data[]; }
 * device-readable, then u8 ack device-writable; made available on `ring` (the control queue), kicked,
 * waited for. Returns the ack byte.
 */
export async function ctrlCommand(guest: Guest, ram: Ram, ring: GuestRing, cls: number, cmd: number, data: Buffer): Promise<number> {
  const out = ram.alloc(2 + data.length);
  const ack = ram.alloc(1);
  ram.b[ram.at(out)] = cls;
  ram.b[ram.at(out) + 1] = cmd;
  data.copy(ram.b, ram.at(out) + 2);
  ram.b[ram.at(ack)] = 0xff;
  const id = ring.add([{ gpa: out, len: 2 + data.length }, { gpa: ack, len: 1, writable: true }]);
  await guest.kick(CTRL);
  let used: { id: number; len: number }[] = [];
  await until(() => (used = ring.used()).length > 0, () => `control command ${cls}/${cmd} used`);
  assert.deepEqual(used, [{ id, len: 1 }], 'the control command used, its ack byte written');
  return ram.b[ram.at(ack)]!;
}
