/**
 * What split and packed queues share: the chain object, buffer checks (order,
 * lengths, bounds), indirect tables, in-flight bookkeeping, dirty logging and
 * the broken state.
 */
import type { DescChain, GuestMemoryView } from './types.js';
import type { DeviceQueue, DeviceQueueOptions } from './queue.js';
import type { DirtyLog } from './memory.js';
import type { DmaTranslator } from './iotlb.js';
import { VirtioError, hex } from './errors.js';

/** Descriptor flags (split and packed). */
export const DESC_F_NEXT = 1;
export const DESC_F_WRITE = 2;
export const DESC_F_INDIRECT = 4;
/** Packed only. */
export const DESC_F_AVAIL = 1 << 7;
export const DESC_F_USED = 1 << 15;

const HOST_LE = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;
const MAX_U32 = 0xffffffff;
/** Addresses above this high word are not safe integers. */
const MAX_SAFE_HIGH = 0x1fffff;

/** A popped chain. The queue reuses the object after it is pushed. */
export class Chain implements DescChain {
  id = 0;
  descCount = 0;
  readable: Uint8Array[] = [];
  writable: Uint8Array[] = [];
  readableBytes = 0;
  writableBytes = 0;
  /** The guest-physical address of each view in `writable` (dirty logging). */
  writableAddrs: number[] = [];
  /** Split: the head index. Packed: the inflight entry, or -1. */
  slot = -1;
  /** Buffers added (checked against maxChainLength). */
  buffers = 0;
  /** Set while the chain is in flight on its queue. */
  owner: object | null = null;
  /** Marks a chain while a pushBatch checks for duplicates. */
  marked = false;
  /** A device-writable descriptor was seen (readable ones may not follow). */
  sawWrite = false;

  reset(): void {
    this.id = 0;
    this.descCount = 0;
    // New arrays: cheaper in V8 than shrinking with `length = 0`, and a caller still holding the
    // old ones after push() does not see them change.
    this.readable = [];
    this.writable = [];
    this.writableAddrs = [];
    this.readableBytes = 0;
    this.writableBytes = 0;
    this.slot = -1;
    this.buffers = 0;
    this.owner = null;
    this.marked = false;
    this.sawWrite = false;
  }
}

/** The 64-bit little-endian address at `off`, refused when it is not a safe integer. */
export function readAddr(dv: DataView, off: number): number {
  const lo = dv.getUint32(off, true);
  const hi = dv.getUint32(off + 4, true);
  if (hi > MAX_SAFE_HIGH) throw new VirtioError('GPA_OUT_OF_RANGE', `descriptor address ${hex(hi)}_${hex(lo)} is too large`);
  return hi * 0x1_0000_0000 + lo;
}

export function ringError(message: string): VirtioError {
  return new VirtioError('RING_LAYOUT', message);
}

export abstract class BaseQueue implements DeviceQueue {
  readonly size: number;
  abstract readonly packed: boolean;
  protected readonly memory: GuestMemoryView;
  protected readonly log: DirtyLog | null;
  /** Buffer addresses are IOVAs translated by this (DeviceQueueOptions.dma). */
  protected readonly dma: DmaTranslator | null;
  protected readonly eventIdx: boolean;
  protected readonly indirect: boolean;
  protected readonly maxChain: number;
  protected readonly opts: DeviceQueueOptions;
  #broken: VirtioError | null = null;
  #generation = -1;
  #live = 0;
  #pool: Chain[] = [];
  /** The chain being built (taken, not yet in flight): discarded when building it throws. */
  #pending: Chain | null = null;
  /** Used entries (split) / descriptors (packed) pushed since the last needsNotify(). */
  protected pushed = 0;
  /** False until needsNotify() ran once (the first decision cannot use a previous index). */
  protected signalledValid = false;
  /** Whether the device wants kicks (enableNotifications / disableNotifications). */
  protected notify = true;

  constructor(o: DeviceQueueOptions, packed: boolean) {
    if (!HOST_LE) throw new Error('the virtqueue engine needs a little-endian host');
    const size = o.size;
    const maxSize = 32768;
    if (!Number.isInteger(size) || size < 1 || size > maxSize || (!packed && (size & (size - 1)) !== 0)) {
      throw ringError(`bad ${packed ? 'packed' : 'split'} queue size ${String(size)}`);
    }
    this.size = size;
    this.memory = o.memory;
    this.log = o.log ?? null;
    this.dma = o.dma ?? null;
    this.eventIdx = o.eventIdx;
    this.indirect = o.indirect;
    const max = o.maxChainLength ?? size;
    if (!Number.isInteger(max) || max < 1 || max > 65536) throw new RangeError(`bad maxChainLength ${String(max)}`);
    this.maxChain = max;
    this.opts = o;
    // The region's queue size is the one GET_INFLIGHT_FD gave; the driver may have set a smaller ring.
    if (o.inflight && (o.inflight.packed !== packed || o.inflight.size < size)) {
      throw new VirtioError(
        'INFLIGHT_LAYOUT',
        `inflight region for a ${o.inflight.packed ? 'packed' : 'split'} queue of ${o.inflight.size}, not this one`,
      );
    }
  }

  get broken(): VirtioError | null {
    return this.#broken;
  }

  get inFlight(): number {
    return this.#live;
  }

  /** A view of [gpa, gpa + length) in one region, `align`-aligned in guest and host memory. */
  protected ringView(what: string, gpa: number, length: number, align: number): Uint8Array {
    if (!Number.isSafeInteger(gpa) || gpa < 0 || gpa % align !== 0) {
      throw ringError(`${what} at ${String(gpa)} is not ${align}-aligned`);
    }
    let v: Uint8Array | null;
    try {
      v = this.memory.view(gpa, length);
    } catch (err) {
      if (err instanceof VirtioError) throw ringError(`${what} [${hex(gpa)}, +${length}) is not in guest memory`);
      throw err;
    }
    if (v === null) throw ringError(`${what} [${hex(gpa)}, +${length}) crosses a memory region boundary`);
    if (v.byteOffset % align !== 0) throw ringError(`${what} is not ${align}-aligned in the host mapping`);
    return v;
  }

  protected static u16(v: Uint8Array): Uint16Array {
    return new Uint16Array(v.buffer, v.byteOffset, v.length >>> 1);
  }

  protected static dv(v: Uint8Array): DataView {
    return new DataView(v.buffer, v.byteOffset, v.length);
  }

  /** Re-resolves the ring views when the memory table changed. */
  protected views(): void {
    const g = this.memory.generation;
    if (g !== this.#generation) {
      try {
        this.resolve();
      } catch (err) {
        // The rings are no longer in guest memory (a new memory table without them).
        this.failed(err);
        throw err;
      }
      this.#generation = g;
    }
  }

  protected abstract resolve(): void;
  protected abstract next(): Chain | null;

  /**
   * After a failed pop or resubmit: the chain being built goes back to the
   * pool, and the queue is marked broken when `err` is a VirtioError (a
   * malformed ring or chain).
   */
  protected failed(err: unknown): void {
    if (this.#pending !== null) {
      this.discard(this.#pending);
      this.#pending = null;
    }
    if (err instanceof VirtioError && this.#broken === null) this.#broken = err;
  }

  pop(): DescChain | null {
    if (this.#broken !== null) return null;
    try {
      this.views();
      return this.next();
    } catch (err) {
      this.failed(err);
      throw err;
    }
  }

  abstract push(chain: DescChain, written: number): void;
  abstract pushBatch(chains: readonly DescChain[], written: ArrayLike<number>): void;
  abstract needsNotify(): boolean;
  abstract enableNotifications(): boolean;

  available(): boolean {
    if (this.#broken !== null) return false;
    this.views();
    return this.hasAvailable();
  }

  /** Whether the driver has made a chain available past the device's next avail position. */
  protected abstract hasAvailable(): boolean;
  abstract disableNotifications(): void;
  abstract base(): number;

  /** What resubmit() rebuilds: split head indices / packed inflight entries, in counter order. */
  protected resubmitList: number[] = [];
  /** One chain of resubmitList, rebuilt and counted in flight. */
  protected abstract rebuild(entry: number): Chain;

  resubmit(): DescChain[] {
    const list = this.resubmitList;
    this.resubmitList = [];
    const out: Chain[] = [];
    if (this.#broken !== null) return out;
    try {
      this.views();
      for (const e of list) out.push(this.rebuild(e));
    } catch (err) {
      this.failed(err);
      throw err;
    }
    return out;
  }

  /** A chain to build (given back by failed() if building it throws, counted by own()). */
  protected take(): Chain {
    const c = this.#pool.pop() ?? new Chain();
    this.#pending = c;
    return c;
  }

  /** Gives back a chain that was never handed out. */
  protected discard(c: Chain): void {
    c.reset();
    this.#pool.push(c);
  }

  /** Counts a chain in flight. */
  protected own(c: Chain): void {
    this.#pending = null;
    c.owner = this;
    this.#live++;
  }

  /** The chain after push: no longer in flight, back to the pool. */
  protected release(c: Chain): void {
    this.#live--;
    this.discard(c);
  }

  /** The chain as this queue's in-flight Chain, `written` checked. */
  protected checkUsed(chain: DescChain, written: number): Chain {
    if (!(chain instanceof Chain) || chain.owner !== this) {
      throw new VirtioError('USED_ID', `chain id ${chain.id} is not in flight on this queue`);
    }
    if (!Number.isInteger(written) || written < 0 || written > chain.writableBytes) {
      throw new RangeError(`written ${String(written)} is not in 0..${chain.writableBytes}`);
    }
    return chain;
  }

  /** Checks a whole batch (no chain twice) before anything is written. */
  protected checkBatch(chains: readonly DescChain[], written: ArrayLike<number>): Chain[] {
    if (written.length !== chains.length) throw new RangeError('pushBatch: one written count per chain');
    const out: Chain[] = [];
    try {
      for (let i = 0; i < chains.length; i++) {
        const c = this.checkUsed(chains[i]!, written[i]!);
        if (c.marked) throw new VirtioError('USED_ID', `chain id ${c.id} is twice in the batch`);
        c.marked = true;
        out.push(c);
      }
    } finally {
      for (const c of out) c.marked = false;
    }
    return out;
  }

  /** Marks the first `written` bytes of the chain's writable buffers dirty. */
  protected logWritten(c: Chain, written: number): void {
    const log = this.log;
    if (log === null) return;
    let left = written;
    for (let i = 0; i < c.writable.length && left > 0; i++) {
      const n = Math.min(left, c.writable[i]!.length);
      log.mark(c.writableAddrs[i]!, n);
      left -= n;
    }
  }

  protected logRing(gpa: number, length: number): void {
    this.log?.mark(gpa, length);
  }

  /**
   * Adds one buffer descriptor to the chain: readable ones before writable
   * ones, the total length within u32, the range inside guest memory.
   */
  protected addBuffer(c: Chain, addr: number, len: number, flags: number): void {
    if (++c.buffers > this.maxChain) {
      throw new VirtioError('CHAIN_TOO_LONG', `chain has more than ${this.maxChain} buffers`);
    }
    const write = (flags & DESC_F_WRITE) !== 0;
    if (write) c.sawWrite = true;
    else if (c.sawWrite) {
      throw new VirtioError('WRITE_BEFORE_READ', 'a device-readable descriptor follows a device-writable one');
    }
    if (c.readableBytes + c.writableBytes + len > MAX_U32) {
      throw new VirtioError('LENGTH_OVERFLOW', 'the chain is longer than 2^32 - 1 bytes');
    }
    if (len === 0) return;
    if (this.dma !== null) {
      // Translated first: a miss throws before the chain counts the bytes.
      this.dma.map(addr, len, write, write ? c.writable : c.readable, write ? c.writableAddrs : null);
      if (write) c.writableBytes += len;
      else c.readableBytes += len;
      return;
    }
    if (write) c.writableBytes += len;
    else c.readableBytes += len;
    const v = this.memory.view(addr, len);
    const list = write ? c.writable : c.readable;
    if (v !== null) {
      list.push(v);
      if (write) c.writableAddrs.push(addr);
      return;
    }
    let at = addr;
    for (const s of this.memory.slices(addr, len)) {
      list.push(s);
      if (write) c.writableAddrs.push(at);
      at += s.length;
    }
  }

  /** Entry `off` of an indirect table (flags at `off + flagsAt`): no INDIRECT inside; returns its flags. */
  protected indirectEntry(c: Chain, t: DataView, off: number, flagsAt: number): number {
    const flags = t.getUint16(off + flagsAt, true);
    if ((flags & DESC_F_INDIRECT) !== 0) throw new VirtioError('NESTED_INDIRECT', 'INDIRECT inside an indirect table');
    this.addBuffer(c, readAddr(t, off), t.getUint32(off + 8, true), flags);
    return flags;
  }

  /**
   * The indirect table at [addr, addr + len) as a DataView (a copy when it
   * crosses a region boundary), after the INDIRECT descriptor's own checks.
   */
  protected indirectTable(addr: number, len: number, flags: number): DataView {
    if (!this.indirect) throw new VirtioError('INDIRECT_NOT_NEGOTIATED', 'INDIRECT descriptor without VIRTIO_F_INDIRECT_DESC');
    if ((flags & DESC_F_NEXT) !== 0) throw new VirtioError('INDIRECT_NEXT', 'INDIRECT and NEXT on one descriptor');
    if (len === 0 || len % 16 !== 0) throw new VirtioError('INDIRECT_LENGTH', `indirect table of ${len} bytes`);
    let parts: Uint8Array[];
    if (this.dma !== null) {
      parts = [];
      this.dma.map(addr, len, false, parts, null);
      if (parts.length === 1) return BaseQueue.dv(parts[0]!);
    } else {
      const v = this.memory.view(addr, len);
      if (v !== null) return BaseQueue.dv(v);
      parts = this.memory.slices(addr, len);
    }
    const copy = new Uint8Array(len);
    let at = 0;
    for (const s of parts) {
      copy.set(s, at);
      at += s.length;
    }
    return new DataView(copy.buffer);
  }
}
