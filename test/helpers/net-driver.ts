/**
 * A hand-written virtio-net driver for unit tests of vhost-user-net back-ends:
 * the vhost-user messages come from RawFrontEnd (bytes at their documented
 * offsets), guest memory is a memfd, and the split or packed rings are laid
 * out here from the spec (virtio 1.2 2.7 / 2.8), not with the engine under test.
 *
 *   const d = await NetDriver.open(socketPath, { packed: false, mrg: true });
 *   d.postRx(0, 8);                 // 8 RX buffers on receiveq0
 *   d.send(0, [frame]);             // on transmitq0, kicked
 *   const frames = await d.receive(0, 1);
 */
import assert from 'node:assert/strict';
import { EventFd, SharedMemory, type Fd } from '../../src/sys/index.js';
import { RawFrontEnd, state, u64 } from './vhost-user-raw.js';

export const F = {
  MTU: 3n,
  MAC: 5n,
  MRG_RXBUF: 15n,
  STATUS: 16n,
  CTRL_VQ: 17n,
  CTRL_RX: 18n,
  MQ: 22n,
  CTRL_MAC_ADDR: 23n,
  INDIRECT_DESC: 28n,
  EVENT_IDX: 29n,
  PROTOCOL_FEATURES: 30n,
  VERSION_1: 32n,
  RING_PACKED: 34n,
  IN_ORDER: 35n,
} as const;
const PF_MQ = 1n << 0n;
const PF_REPLY_ACK = 1n << 3n;
const PF_CONFIG = 1n << 9n;
const PF_STATUS = 1n << 16n;

const MEM_SIZE = 16 << 20;
const UVA = 0x7f5500000000;
const RING_BASE = 0x10000;
const RING_SPAN = 0x8000;
const DATA_BASE = 0x200000;
const DESC_F_NEXT = 1;
const DESC_F_WRITE = 2;
const PACKED_AVAIL = 1 << 7;
const PACKED_USED = 1 << 15;

export interface Buf {
  addr: number;
  len: number;
  write: boolean;
}

interface Used {
  id: number;
  len: number;
  bufs: Buf[];
}

/** The driver side of one ring, split or packed. */
abstract class Ring {
  readonly mem: DataView;
  readonly size: number;
  readonly desc: number;
  readonly driver: number;
  readonly device: number;
  protected chains = new Map<number, Buf[]>();
  constructor(mem: DataView, index: number, size: number) {
    this.mem = mem;
    this.size = size;
    this.desc = RING_BASE + index * RING_SPAN;
    this.driver = this.desc + 0x1000;
    this.device = this.desc + 0x2000;
  }
  abstract add(bufs: Buf[]): number;
  abstract used(): Used[];
  get outstanding(): number {
    return this.chains.size;
  }
}

class SplitRing extends Ring {
  #free: number[];
  #availIdx = 0;
  #usedIdx = 0;
  #heads = new Map<number, number[]>();
  constructor(mem: DataView, index: number, size: number) {
    super(mem, index, size);
    this.#free = Array.from({ length: size }, (_, i) => i);
  }
  add(bufs: Buf[]): number {
    assert.ok(this.#free.length >= bufs.length, 'split ring: no free descriptors');
    const idx = this.#free.splice(0, bufs.length);
    bufs.forEach((b, k) => {
      const o = this.desc + 16 * idx[k]!;
      this.mem.setBigUint64(o, BigInt(b.addr), true);
      this.mem.setUint32(o + 8, b.len, true);
      this.mem.setUint16(o + 12, (k < bufs.length - 1 ? DESC_F_NEXT : 0) | (b.write ? DESC_F_WRITE : 0), true);
      this.mem.setUint16(o + 14, k < bufs.length - 1 ? idx[k + 1]! : 0, true);
    });
    const head = idx[0]!;
    this.mem.setUint16(this.driver + 4 + 2 * (this.#availIdx % this.size), head, true);
    this.#availIdx = (this.#availIdx + 1) & 0xffff;
    this.mem.setUint16(this.driver + 2, this.#availIdx, true);
    this.#heads.set(head, idx);
    this.chains.set(head, bufs);
    return head;
  }
  used(): Used[] {
    const out: Used[] = [];
    const idx = this.mem.getUint16(this.device + 2, true);
    while (this.#usedIdx !== idx) {
      const o = this.device + 4 + 8 * (this.#usedIdx % this.size);
      const id = this.mem.getUint32(o, true);
      const len = this.mem.getUint32(o + 4, true);
      const bufs = this.chains.get(id);
      assert.ok(bufs, `used id ${id} was not available`);
      this.chains.delete(id);
      this.#free.push(...this.#heads.get(id)!);
      this.#heads.delete(id);
      out.push({ id, len, bufs });
      this.#usedIdx = (this.#usedIdx + 1) & 0xffff;
    }
    return out;
  }
  /** The device's used.flags NO_NOTIFY bit. */
  get noNotify(): boolean {
    return (this.mem.getUint16(this.device, true) & 1) !== 0;
  }
}

class PackedRing extends Ring {
  #next = 0;
  #wrap = 1;
  #usedAt = 0;
  #usedWrap = 1;
  #ids: number[] = [];
  #counts = new Map<number, number>();
  constructor(mem: DataView, index: number, size: number) {
    super(mem, index, size);
    this.#ids = Array.from({ length: size }, (_, i) => i);
  }
  add(bufs: Buf[]): number {
    assert.ok(bufs.length <= this.size - [...this.#counts.values()].reduce((a, b) => a + b, 0), 'packed ring: full');
    const id = this.#ids.shift()!;
    let firstFlags = 0;
    const first = this.#next;
    bufs.forEach((b, k) => {
      const o = this.desc + 16 * this.#next;
      this.mem.setBigUint64(o, BigInt(b.addr), true);
      this.mem.setUint32(o + 8, b.len, true);
      this.mem.setUint16(o + 12, id, true);
      const flags = (k < bufs.length - 1 ? DESC_F_NEXT : 0) | (b.write ? DESC_F_WRITE : 0) | (this.#wrap ? PACKED_AVAIL : PACKED_USED);
      if (k === 0) firstFlags = flags;
      else this.mem.setUint16(o + 14, flags, true);
      if (++this.#next === this.size) {
        this.#next = 0;
        this.#wrap ^= 1;
      }
    });
    // The first descriptor's flags last: it makes the chain available.
    this.mem.setUint16(this.desc + 16 * first + 14, firstFlags, true);
    this.chains.set(id, bufs);
    this.#counts.set(id, bufs.length);
    return id;
  }
  used(): Used[] {
    const out: Used[] = [];
    for (;;) {
      const o = this.desc + 16 * this.#usedAt;
      const flags = this.mem.getUint16(o + 14, true);
      const avail = (flags & PACKED_AVAIL) !== 0 ? 1 : 0;
      const used = (flags & PACKED_USED) !== 0 ? 1 : 0;
      if (avail !== used || used !== this.#usedWrap) break;
      const id = this.mem.getUint16(o + 12, true);
      const len = this.mem.getUint32(o + 8, true);
      const bufs = this.chains.get(id);
      assert.ok(bufs, `used id ${id} was not available`);
      this.chains.delete(id);
      const n = this.#counts.get(id)!;
      this.#counts.delete(id);
      this.#ids.push(id);
      out.push({ id, len, bufs });
      this.#usedAt += n;
      if (this.#usedAt >= this.size) {
        this.#usedAt -= this.size;
        this.#usedWrap ^= 1;
      }
    }
    return out;
  }
}

export interface NetDriverOptions {
  packed?: boolean;
  /** Ack MRG_RXBUF (default: when offered). */
  mrg?: boolean;
  /** Queue pairs to set up (default 1); MQ acked when more than 1. */
  pairs?: number;
  /** Set up the control queue (default: when offered). */
  ctrl?: boolean;
  queueSize?: number;
  /** Ack EVENT_IDX (default true). */
  eventIdx?: boolean;
  /** Enable the rings with SET_VRING_ENABLE (default true). */
  enable?: boolean;
  /** Negotiate PROTOCOL_FEATURES (default true; without it rings start enabled). */
  protocolFeatures?: boolean;
  /** Ack IN_ORDER when offered (default false). */
  inOrder?: boolean;
}

/** One front-end (guest) of a vhost-user-net port. */
export class NetDriver {
  readonly fe: RawFrontEnd;
  readonly shm: SharedMemory;
  readonly mem: DataView;
  readonly rings: Ring[] = [];
  readonly kicks: EventFd[] = [];
  readonly calls: EventFd[] = [];
  offered = 0n;
  acked = 0n;
  hdrLen = 12;
  ctrlIndex = -1;
  #bufNext: number[] = [];
  #pendingRx: Map<number, { frames: Buffer[]; partial: { parts: Buffer[]; left: number } | null }> = new Map();

  private constructor(fe: RawFrontEnd) {
    this.fe = fe;
    this.shm = SharedMemory.create(MEM_SIZE);
    this.mem = this.shm.view;
  }

  static async open(socketPath: string, o: NetDriverOptions = {}): Promise<NetDriver> {
    const d = new NetDriver(await RawFrontEnd.connect(socketPath));
    try {
      await d.#setup(o);
    } catch (err) {
      d.close();
      throw err;
    }
    return d;
  }

  has(f: bigint): boolean {
    return (this.acked & (1n << f)) !== 0n;
  }

  async #setup(o: NetDriverOptions): Promise<void> {
    const fe = this.fe;
    this.offered = (await fe.call(1)).readBigUInt64LE(0);
    const proto = o.protocolFeatures !== false;
    if (proto) {
      const pf = (await fe.call(15)).readBigUInt64LE(0);
      fe.send(16, u64(pf & (PF_MQ | PF_REPLY_ACK | PF_CONFIG | PF_STATUS)));
    }
    // With REPLY_ACK every setup message is acked; without PROTOCOL_FEATURES there is none.
    const req = async (request: number, payload?: Buffer, fds?: (Fd | number)[]): Promise<void> => {
      if (proto) assert.equal(await fe.acked(request, payload, fds), 0n, `request ${request} acked`);
      else fe.send(request, payload, fds);
    };
    await req(3); // SET_OWNER
    const bit = (f: bigint): bigint => 1n << f;
    const offered = (f: bigint): boolean => (this.offered & bit(f)) !== 0n;
    let want = bit(F.VERSION_1) | bit(F.MAC) | bit(F.MTU) | bit(F.STATUS) | bit(F.INDIRECT_DESC);
    if (proto) want |= bit(F.PROTOCOL_FEATURES);
    if (o.eventIdx !== false) want |= bit(F.EVENT_IDX);
    if (o.packed) want |= bit(F.RING_PACKED);
    if (o.inOrder) want |= bit(F.IN_ORDER);
    if (o.mrg ?? offered(F.MRG_RXBUF)) want |= bit(F.MRG_RXBUF);
    const pairs = o.pairs ?? 1;
    if (pairs > 1) want |= bit(F.MQ);
    const ctrl = o.ctrl ?? offered(F.CTRL_VQ);
    if (ctrl) want |= bit(F.CTRL_VQ) | bit(F.CTRL_RX) | bit(F.CTRL_MAC_ADDR);
    want &= this.offered;
    this.acked = want;
    fe.send(2, u64(want)); // SET_FEATURES
    this.hdrLen = 12;
    const reg = Buffer.alloc(40);
    reg.writeBigUInt64LE(BigInt(MEM_SIZE), 16);
    reg.writeBigUInt64LE(BigInt(UVA), 24);
    const table = Buffer.alloc(8 + 32);
    table.writeUInt32LE(1, 0);
    table.set(reg.subarray(8), 8);
    await req(5, table, [this.shm.fd]); // SET_MEM_TABLE
    const n = 2 * pairs + (ctrl ? 1 : 0);
    this.ctrlIndex = ctrl ? 2 * pairs : -1;
    const size = o.queueSize ?? 64;
    for (let i = 0; i < n; i++) {
      const r = o.packed ? new PackedRing(this.mem, i, size) : new SplitRing(this.mem, i, size);
      this.rings.push(r);
      this.#bufNext.push(0);
      await req(8, state(i, size)); // SET_VRING_NUM
      await req(10, state(i, o.packed ? 0x8000 : 0)); // SET_VRING_BASE
      const addr = Buffer.alloc(40);
      addr.writeUInt32LE(i, 0);
      addr.writeBigUInt64LE(BigInt(UVA + r.desc), 8);
      addr.writeBigUInt64LE(BigInt(UVA + r.device), 16);
      addr.writeBigUInt64LE(BigInt(UVA + r.driver), 24);
      await req(9, addr); // SET_VRING_ADDR
      const kick = EventFd.create();
      const call = EventFd.create();
      this.kicks.push(kick);
      this.calls.push(call);
      await req(13, u64(i), [call.fd]); // SET_VRING_CALL
      await req(12, u64(i), [kick.fd]); // SET_VRING_KICK: started
      if (proto && o.enable !== false) assert.equal(await fe.acked(18, state(i, 1)), 0n); // SET_VRING_ENABLE
    }
  }

  async enable(ring: number, on: boolean): Promise<void> {
    assert.equal(await this.fe.acked(18, state(ring, on ? 1 : 0)), 0n);
  }

  /** A guest buffer address for `ring` (each ring cycles through 2 * size buffers of 8 KiB). */
  buffer(ring: number): number {
    const k = this.#bufNext[ring]!++ % (2 * this.rings[ring]!.size);
    return DATA_BASE + (ring * 2 * this.rings[ring]!.size + k) * 8192;
  }

  /** Posts `count` device-writable buffers of `size` bytes on receiveq `pair` (each split in `pieces` descriptors). */
  postRx(pair: number, count: number, size = 2048, pieces = 1): void {
    const r = 2 * pair;
    for (let i = 0; i < count; i++) {
      const base = this.buffer(r);
      const bufs: Buf[] = [];
      const each = Math.ceil(size / pieces);
      for (let p = 0, at = 0; p < pieces; p++, at += each) bufs.push({ addr: base + at, len: Math.min(each, size - at), write: true });
      this.rings[r]!.add(bufs);
    }
    this.kicks[r]!.signal();
  }

  /** Puts frames on transmitq `pair` (header + frame in one descriptor, or two with `splitHeader`) and kicks. */
  send(pair: number, frames: Uint8Array[], o: { splitHeader?: boolean; header?: Uint8Array; kick?: boolean } = {}): void {
    const r = 2 * pair + 1;
    const bytes = this.shm.bytes;
    for (const f of frames) {
      const base = this.buffer(r);
      const hdr = o.header ?? new Uint8Array(this.hdrLen);
      bytes.set(hdr, base);
      if (o.splitHeader) {
        bytes.set(f, base + 4096);
        this.rings[r]!.add([{ addr: base, len: hdr.length, write: false }, { addr: base + 4096, len: f.length, write: false }]);
      } else {
        bytes.set(f, base + hdr.length);
        this.rings[r]!.add([{ addr: base, len: hdr.length + f.length, write: false }]);
      }
    }
    if (o.kick !== false) this.kicks[r]!.signal();
  }

  /** Used entries of a ring, waiting until at least `n` came (or the timeout). */
  async waitUsed(ring: number, n: number, timeoutMs = 3000): Promise<Used[]> {
    const out: Used[] = [];
    const end = Date.now() + timeoutMs;
    for (;;) {
      out.push(...this.rings[ring]!.used());
      if (out.length >= n) return out;
      if (Date.now() > end) throw new Error(`ring ${ring}: ${out.length} used entries, waited for ${n}`);
      await new Promise((r) => setTimeout(r, 5));
    }
  }

  /** Frames received on receiveq `pair` (header checked, MRG_RXBUF buffers joined), waiting for `n` (0: what is there after `settleMs`). */
  async receive(pair: number, n: number, o: { timeoutMs?: number; settleMs?: number; headers?: Buffer[] } = {}): Promise<Buffer[]> {
    const r = 2 * pair;
    let st = this.#pendingRx.get(r);
    if (!st) this.#pendingRx.set(r, (st = { frames: [], partial: null }));
    const end = Date.now() + (n === 0 ? (o.settleMs ?? 100) : (o.timeoutMs ?? 3000));
    for (;;) {
      for (const u of this.rings[r]!.used()) {
        const data = Buffer.concat(u.bufs.map((b) => Buffer.from(this.shm.bytes.subarray(b.addr, b.addr + b.len)))).subarray(0, u.len);
        if (st.partial) {
          st.partial.parts.push(data);
          if (--st.partial.left === 0) {
            st.frames.push(Buffer.concat(st.partial.parts));
            st.partial = null;
          }
          continue;
        }
        assert.ok(data.length >= this.hdrLen, `RX used len ${data.length} shorter than the header`);
        const hdr = data.subarray(0, this.hdrLen);
        o.headers?.push(Buffer.from(hdr));
        assert.equal(hdr[0], 0, 'header flags 0');
        assert.equal(hdr[1], 0, 'gso_type NONE');
        const nb = hdr.readUInt16LE(10);
        if (this.has(F.MRG_RXBUF)) assert.ok(nb >= 1, 'num_buffers >= 1');
        else assert.equal(nb, 1, 'num_buffers is 1 without MRG_RXBUF');
        if (nb > 1) st.partial = { parts: [data.subarray(this.hdrLen)], left: nb - 1 };
        else st.frames.push(Buffer.from(data.subarray(this.hdrLen)));
      }
      if (n > 0 && st.frames.length >= n) return st.frames.splice(0);
      if (Date.now() > end) {
        if (n === 0) return st.frames.splice(0);
        throw new Error(`receiveq${pair}: ${st.frames.length} frames, waited for ${n}`);
      }
      await new Promise((res) => setTimeout(res, 5));
    }
  }

  /** A control command: class, command, data; resolves with the ack byte. */
  async ctrl(cls: number, cmd: number, data: Uint8Array): Promise<number> {
    const r = this.ctrlIndex;
    assert.ok(r >= 0, 'no control queue');
    const base = this.buffer(r);
    const bytes = this.shm.bytes;
    bytes[base] = cls;
    bytes[base + 1] = cmd;
    bytes.set(data, base + 2);
    bytes[base + 4000] = 0xee;
    this.rings[r]!.add([
      { addr: base, len: 2 + data.length, write: false },
      { addr: base + 4000, len: 1, write: true },
    ]);
    this.kicks[r]!.signal();
    const [u] = await this.waitUsed(r, 1);
    assert.equal(u!.len, 1, 'the ack byte written');
    return bytes[base + 4000]!;
  }

  /** GET_VRING_BASE (stops the ring). */
  async stopRing(ring: number): Promise<number> {
    const b = await this.fe.call(11, state(ring, 0));
    return b.readUInt32LE(4);
  }

  #closed = false;
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.fe.close();
    this.shm.close();
    for (const f of [...this.kicks, ...this.calls]) f.close();
  }
}

/** An Ethernet frame: dst, src, ethertype, then `payload` bytes (a pattern from `seed` when a number). */
export function ethFrame(dst: string, src: string, length: number, seed = 0, ethertype = 0x88b5): Buffer {
  const f = Buffer.alloc(length);
  Buffer.from(dst.split(':').map((h) => parseInt(h, 16))).copy(f, 0);
  Buffer.from(src.split(':').map((h) => parseInt(h, 16))).copy(f, 6);
  f.writeUInt16BE(ethertype, 12);
  for (let i = 14; i < length; i++) f[i] = (i * 31 + seed * 7 + 1) & 0xff;
  return f;
}
