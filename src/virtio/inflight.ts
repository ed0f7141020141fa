/**
 * vhost-user inflight I/O tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD): the
 * shared buffer of GET_INFLIGHT_FD / SET_INFLIGHT_FD, laid out as one region
 * per queue, split or packed, as docs/interop/vhost-user.rst ("Inflight I/O
 * tracking") defines it. The front-end only keeps the buffer; the back-end
 * records there what it took from the ring and what it gave back, so that a
 * new back-end process can resubmit what was in flight when the old one died.
 *
 * Split region: header 16 bytes (features u64 @0, version u16 @8, desc_num u16
 * @10, last_batch_head u16 @12, used_idx u16 @14), then desc_num entries of 16
 * bytes (inflight u8 @0, padding[5], next u16 @6, counter u64 @8).
 *
 * Packed region: header 32 bytes (features u64 @0, version u16 @8, desc_num
 * u16 @10, free_head u16 @12, old_free_head u16 @14, used_idx u16 @16,
 * old_used_idx u16 @18, used_wrap_counter u8 @20, old_used_wrap_counter u8 @21,
 * padding to the 8-aligned entries), then desc_num entries of 32 bytes
 * (inflight u8 @0, padding u8, next u16 @2, last u16 @4, num u16 @6, counter
 * u64 @8, id u16 @16, flags u16 @18, len u32 @20, addr u64 @24).
 *
 * Sizes: each queue region is rounded up to 64 bytes, as DPDK does
 * (ALIGN(16 * qs + 16, 64) split, ALIGN(32 * qs + 32, 64) packed). libvhost-user
 * (split only) computes ALIGN(16 * qs + 2, 64), which is the same number for
 * every queue size, so a region we create has the layout libvhost-user and DPDK
 * expect; QEMU's front-end takes mmap_size from the reply and keeps the buffer.
 *
 * A region whose version is 0 (new, or zeroed after a VM reset) is
 * initialised (version 1; packed: the free list 0 -> 1 -> ... and both wrap
 * counters 1) and has nothing to resubmit.
 */
import { VirtioError } from './errors.js';

const SPLIT_HEADER = 16;
const SPLIT_ENTRY = 16;
const PACKED_HEADER = 32;
const PACKED_ENTRY = 32;
const ALIGN = 64;
const VERSION = 1;
const TWO32 = 0x1_0000_0000;

/** Packed ring flag bits the recovery looks at. */
const F_AVAIL = 1 << 7;
const F_USED = 1 << 15;

function checkQueueSize(queueSize: number): void {
  if (!Number.isInteger(queueSize) || queueSize < 1 || queueSize > 32768) {
    throw new VirtioError('INFLIGHT_LAYOUT', `bad inflight queue size ${String(queueSize)}`);
  }
}

/** Bytes of one queue's inflight region (64-aligned; see the module comment). */
export function inflightQueueSize(queueSize: number, packed: boolean): number {
  checkQueueSize(queueSize);
  const raw = packed ? PACKED_HEADER + PACKED_ENTRY * queueSize : SPLIT_HEADER + SPLIT_ENTRY * queueSize;
  return Math.ceil(raw / ALIGN) * ALIGN;
}

/** One queue's inflight region, as a DeviceQueue uses it. */
export interface InflightQueue {
  readonly packed: boolean;
  /** The queue size (desc_num). */
  readonly size: number;
  /** This queue's bytes in the shared buffer. */
  readonly bytes: Uint8Array;
  /** The region was uninitialised (version 0) when opened, and no queue has attached since. */
  readonly fresh: boolean;
}

/** The descriptors of one packed chain, as copied into (or out of) the region. */
export interface PackedDescs {
  readonly addr: Float64Array;
  readonly len: Uint32Array;
  readonly flags: Uint16Array;
  readonly id: Uint16Array;
}

function getU64(dv: DataView, off: number): number {
  return dv.getUint32(off + 4, true) * TWO32 + dv.getUint32(off, true);
}

function setU64(dv: DataView, off: number, v: number): void {
  dv.setUint32(off, v % TWO32, true);
  dv.setUint32(off + 4, Math.floor(v / TWO32), true);
}

abstract class InflightBase implements InflightQueue {
  abstract readonly packed: boolean;
  readonly size: number;
  readonly bytes: Uint8Array;
  protected readonly dv: DataView;
  #fresh: boolean;
  /** The next submission counter. */
  protected counter = 0;

  constructor(bytes: Uint8Array, size: number, entry: number, header: number) {
    checkQueueSize(size);
    if (bytes.length < header + entry * size) {
      throw new VirtioError('INFLIGHT_LAYOUT', `inflight region of ${bytes.length} bytes for ${size} descriptors`);
    }
    this.bytes = bytes;
    this.size = size;
    this.dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
    this.#fresh = this.dv.getUint16(8, true) === 0;
    if (this.#fresh) {
      bytes.fill(0, 0, header + entry * size);
      this.dv.setUint16(8, VERSION, true);
      this.dv.setUint16(10, size, true);
    } else if (this.dv.getUint16(10, true) !== size) {
      throw new VirtioError('INFLIGHT_LAYOUT', `inflight region for ${this.dv.getUint16(10, true)} descriptors, queue has ${size}`);
    }
  }

  get fresh(): boolean {
    return this.#fresh;
  }

  /** Called by the first queue that attaches: true when the region was new (nothing to recover). */
  protected attachFresh(): boolean {
    const f = this.#fresh;
    this.#fresh = false;
    return f;
  }

  /** Entry indices with inflight == 1, in counter order; the counter continues after the largest. */
  protected inflightByCounter(entry: number, header: number, counterAt: number): number[] {
    const found: { i: number; c: number }[] = [];
    for (let i = 0; i < this.size; i++) {
      const off = header + i * entry;
      if (this.dv.getUint8(off) === 1) found.push({ i, c: getU64(this.dv, off + counterAt) });
    }
    found.sort((a, b) => a.c - b.c);
    this.counter = found.length > 0 ? found[found.length - 1]!.c + 1 : 0;
    return found.map((f) => f.i);
  }

  protected stamp(off: number, counterAt: number): void {
    setU64(this.dv, off + counterAt, this.counter++);
    this.dv.setUint8(off, 1);
  }
}

/** A split queue's region. */
export class SplitInflightQueue extends InflightBase {
  readonly packed = false;

  /** A new region is all zero after the header's version and desc_num: last_batch_head 0, used_idx set on attach. */
  constructor(bytes: Uint8Array, size: number) {
    super(bytes, size, SPLIT_ENTRY, SPLIT_HEADER);
  }

  #entry(i: number): number {
    return SPLIT_HEADER + i * SPLIT_ENTRY;
  }

  get usedIdx(): number {
    return this.dv.getUint16(14, true);
  }

  get lastBatchHead(): number {
    return this.dv.getUint16(12, true);
  }

  /**
   * A queue starts on this region with the used ring's idx `ringUsedIdx`.
   * New region: used_idx := ringUsedIdx, nothing to resubmit. Otherwise the
   * reconnect steps: when used_idx != ringUsedIdx, the last batch was
   * published, so the (ringUsedIdx - used_idx) entries of the last-batch list
   * are cleared and used_idx := ringUsedIdx; then the heads still in flight
   * are returned in counter order.
   */
  attach(ringUsedIdx: number): number[] {
    if (this.attachFresh()) {
      this.dv.setUint16(14, ringUsedIdx, true);
      return [];
    }
    const recorded = this.usedIdx;
    if (recorded !== ringUsedIdx) {
      const n = Math.min((ringUsedIdx - recorded) & 0xffff, this.size);
      let i = this.lastBatchHead;
      for (let k = 0; k < n && i < this.size; k++) {
        this.dv.setUint8(this.#entry(i), 0);
        i = this.dv.getUint16(this.#entry(i) + 6, true);
      }
      this.dv.setUint16(14, ringUsedIdx, true);
    }
    return this.inflightByCounter(SPLIT_ENTRY, SPLIT_HEADER, 8);
  }

  /** Head `head` taken from the avail ring: counter, then inflight = 1. */
  begin(head: number): void {
    this.stamp(this.#entry(head), 8);
  }

  /** Before the used idx store: links `head` into the last-batch list (call once per head of the batch). */
  batchAdd(head: number): void {
    this.dv.setUint16(this.#entry(head) + 6, this.lastBatchHead, true);
    this.dv.setUint16(12, head, true);
  }

  /** After the used idx store: inflight = 0 for the batch's heads. */
  batchClear(head: number): void {
    this.dv.setUint8(this.#entry(head), 0);
  }

  /** After the batch was cleared: used_idx := the used ring's idx. */
  batchDone(ringUsedIdx: number): void {
    this.dv.setUint16(14, ringUsedIdx, true);
  }

  isInflight(head: number): boolean {
    return this.dv.getUint8(this.#entry(head)) === 1;
  }
}

/** Where a packed queue resumes after attaching, and what to resubmit. */
export interface PackedRecovery {
  /** Head entries in flight, in counter order. */
  readonly entries: number[];
  readonly usedIdx: number;
  readonly usedWrap: boolean;
  /** Ring descriptors the in-flight chains hold (the avail side is this far past the used side). */
  readonly descriptors: number;
  /** Descriptors of each entry of `entries` (its `num` when the queue attached). */
  readonly counts: number[];
}

/** A packed queue's region. */
export class PackedInflightQueue extends InflightBase {
  readonly packed = true;

  constructor(bytes: Uint8Array, size: number) {
    super(bytes, size, PACKED_ENTRY, PACKED_HEADER);
    if (this.fresh) {
      // The free list 0 -> 1 -> ... -> size, both wrap counters 1.
      for (let i = 0; i < size; i++) this.#set16(this.#entry(i) + 2, i + 1);
      this.dv.setUint8(20, 1);
      this.dv.setUint8(21, 1);
    }
  }

  #entry(i: number): number {
    return PACKED_HEADER + i * PACKED_ENTRY;
  }

  #u16(off: number): number {
    return this.dv.getUint16(off, true);
  }

  #set16(off: number, v: number): void {
    this.dv.setUint16(off, v, true);
  }

  get freeHead(): number {
    return this.#u16(12);
  }

  get oldFreeHead(): number {
    return this.#u16(14);
  }

  get usedIdx(): number {
    return this.#u16(16);
  }

  get oldUsedIdx(): number {
    return this.#u16(18);
  }

  get usedWrap(): boolean {
    return this.dv.getUint8(20) !== 0;
  }

  get oldUsedWrap(): boolean {
    return this.dv.getUint8(21) !== 0;
  }

  /** An entry index read from the region, checked. */
  #index(i: number, what: string): number {
    if (i >= this.size) throw new VirtioError('INFLIGHT_LAYOUT', `inflight ${what} ${i} is not below ${this.size}`);
    return i;
  }

  /**
   * A queue starts on this region. New region: the used side is `usedIdx` /
   * `usedWrap` (from the vring base). Otherwise the reconnect steps: when
   * used_idx != old_used_idx and the ring descriptor at old_used_idx no longer
   * has the available pattern of old_used_wrap_counter, the in-progress
   * completion was published: commit it; then roll back to the old_* values,
   * clear inflight on the free list, and return the heads in flight by counter.
   * `ringFlags(i)` reads the flags of ring descriptor i.
   */
  attach(usedIdx: number, usedWrap: boolean, ringFlags: (slot: number) => number): PackedRecovery {
    if (this.attachFresh()) {
      this.setUsed(usedIdx, usedWrap);
      this.commit();
      return { entries: [], usedIdx, usedWrap, descriptors: 0, counts: [] };
    }
    if (this.usedIdx !== this.oldUsedIdx || this.usedWrap !== this.oldUsedWrap) {
      const f = ringFlags(this.#index(this.oldUsedIdx, 'old_used_idx'));
      const availPattern = this.oldUsedWrap ? F_AVAIL : F_USED;
      if ((f & (F_AVAIL | F_USED)) !== availPattern) this.commit();
    }
    this.#set16(12, this.oldFreeHead);
    this.#set16(16, this.oldUsedIdx);
    this.dv.setUint8(20, this.oldUsedWrap ? 1 : 0);
    let i = this.freeHead;
    for (let k = 0; k < this.size && i < this.size; k++) {
      this.dv.setUint8(this.#entry(i), 0);
      i = this.#u16(this.#entry(i) + 2);
    }
    const entries = this.inflightByCounter(PACKED_ENTRY, PACKED_HEADER, 8);
    let descriptors = 0;
    const counts: number[] = [];
    for (const e of entries) {
      const num = this.#u16(this.#entry(e) + 6);
      if (num < 1 || num > this.size) throw new VirtioError('INFLIGHT_LAYOUT', `inflight entry ${e} holds ${num} descriptors`);
      descriptors += num;
      counts.push(num);
    }
    if (descriptors > this.size) throw new VirtioError('INFLIGHT_LAYOUT', `${descriptors} descriptors in flight on a ring of ${this.size}`);
    return { entries, usedIdx: this.#index(this.usedIdx, 'used_idx'), usedWrap: this.usedWrap, descriptors, counts };
  }

  /** Copies the `n` descriptors of a chain taken from the ring; returns its head entry. */
  record(d: PackedDescs, n: number): number {
    const head = this.#index(this.oldFreeHead, 'old_free_head');
    const h = this.#entry(head);
    for (let k = 0; k < n; k++) {
      if (k === 0) {
        this.#set16(h + 6, 0);
        this.stamp(h, 8);
      }
      const f = this.#index(this.freeHead, 'free_head');
      if (k === n - 1) this.#set16(h + 4, f);
      this.#set16(h + 6, this.#u16(h + 6) + 1);
      const e = this.#entry(f);
      this.#set16(e + 16, d.id[k]!);
      this.#set16(e + 18, d.flags[k]!);
      this.dv.setUint32(e + 20, d.len[k]!, true);
      setU64(this.dv, e + 24, d.addr[k]!);
      this.#set16(12, this.#u16(e + 2));
      if (k === n - 1) this.#set16(14, this.freeHead);
    }
    return head;
  }

  /** Reads back the descriptors of the chain at head entry `head` into `d`; returns how many. */
  descriptorsOf(head: number, d: PackedDescs): number {
    const num = this.#u16(this.#entry(head) + 6);
    // Checked on attach too, but the front-end may have written the region since.
    if (num < 1 || num > d.addr.length) throw new VirtioError('INFLIGHT_LAYOUT', `inflight entry ${head} holds ${num} descriptors`);
    let i = head;
    for (let k = 0; k < num; k++) {
      const e = this.#entry(this.#index(i, 'next'));
      d.id[k] = this.#u16(e + 16);
      d.flags[k] = this.#u16(e + 18);
      d.len[k] = this.dv.getUint32(e + 20, true);
      d.addr[k] = getU64(this.dv, e + 24);
      i = this.#u16(e + 2);
    }
    return num;
  }

  /** Completion, first step: the chain's entries go back to the front of the free list. */
  free(head: number): void {
    const last = this.#index(this.#u16(this.#entry(head) + 4), 'last');
    this.#set16(this.#entry(last) + 2, this.freeHead);
    this.#set16(12, head);
  }

  /** Completion: the used side after the batch. */
  setUsed(usedIdx: number, usedWrap: boolean): void {
    this.#set16(16, usedIdx);
    this.dv.setUint8(20, usedWrap ? 1 : 0);
  }

  /** Completion, after the ring's flags: inflight = 0 on a head. */
  clear(head: number): void {
    this.dv.setUint8(this.#entry(head), 0);
  }

  /** Completion, last step: old_* := the current values. */
  commit(): void {
    this.#set16(14, this.freeHead);
    this.#set16(18, this.usedIdx);
    this.dv.setUint8(21, this.dv.getUint8(20));
  }

  isInflight(head: number): boolean {
    return this.dv.getUint8(this.#entry(head)) === 1;
  }
}

/** The whole GET_INFLIGHT_FD buffer: one region per queue. */
export class InflightRegion {
  readonly bytes: Uint8Array;
  readonly numQueues: number;
  readonly queueSize: number;
  readonly packed: boolean;
  /** Bytes per queue region. */
  readonly queueBytes: number;
  #queues: (SplitInflightQueue | PackedInflightQueue | undefined)[] = [];

  constructor(bytes: Uint8Array, numQueues: number, queueSize: number, packed: boolean) {
    if (!Number.isInteger(numQueues) || numQueues < 1 || numQueues > 0xffff) {
      throw new VirtioError('INFLIGHT_LAYOUT', `bad inflight queue count ${String(numQueues)}`);
    }
    this.queueBytes = inflightQueueSize(queueSize, packed);
    if (bytes.length < this.queueBytes * numQueues) {
      throw new VirtioError(
        'INFLIGHT_LAYOUT',
        `inflight buffer of ${bytes.length} bytes, ${numQueues} queues of ${queueSize} need ${this.queueBytes * numQueues}`,
      );
    }
    this.bytes = bytes;
    this.numQueues = numQueues;
    this.queueSize = queueSize;
    this.packed = packed;
  }

  /** Total bytes for `numQueues` queues (the GET_INFLIGHT_FD mmap_size). */
  static size(numQueues: number, queueSize: number, packed: boolean): number {
    return numQueues * inflightQueueSize(queueSize, packed);
  }

  /** Queue `index`'s region (the same object on every call). */
  queue(index: number): SplitInflightQueue | PackedInflightQueue {
    if (!Number.isInteger(index) || index < 0 || index >= this.numQueues) {
      throw new RangeError(`inflight queue ${String(index)} of ${this.numQueues}`);
    }
    let q = this.#queues[index];
    if (q === undefined) {
      const bytes = this.bytes.subarray(index * this.queueBytes, (index + 1) * this.queueBytes);
      q = this.packed ? new PackedInflightQueue(bytes, this.queueSize) : new SplitInflightQueue(bytes, this.queueSize);
      this.#queues[index] = q;
    }
    return q;
  }
}
