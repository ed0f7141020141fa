/**
 * The driver side of a split virtqueue (VIRTIO 1.2 2.7): descriptor table
 * (16 bytes each: addr u64 @0, len u32 @8, flags u16 @12, next u16 @14),
 * avail ring (flags @0, idx @2, ring[N] @4, used_event @4+2N), used ring
 * (flags @0, idx @2, {id u32, len u32}[N] @4, avail_event @4+8N).
 *
 * The free list lives in our own memory (never read back from the shared
 * table, which the device could scribble on).
 */
import { DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE } from './base.js';
import { vringNeedEvent } from './split.js';
import { DriverQueueBase, driverError, driverRingView, writeDescAddr, type DriverBuffer, type DriverQueue, type DriverQueueOptions, type UsedBuffer } from './driver.js';

const AVAIL_F_NO_INTERRUPT = 1;
const USED_F_NO_NOTIFY = 1;

export class SplitDriverQueue<T> extends DriverQueueBase<T> implements DriverQueue<T> {
  readonly packed = false;
  readonly #desc: DataView;
  readonly #avail: Uint16Array;
  readonly #used: Uint16Array;
  readonly #usedDv: DataView;
  /** Free list and chain links (ours). */
  readonly #next: Uint16Array;
  #freeHead = 0;
  #availIdx = 0;
  #kickedIdx = 0;
  #lastUsed = 0;

  constructor(o: DriverQueueOptions) {
    const n = o.size;
    if (!Number.isInteger(n) || n < 1 || n > 32768 || (n & (n - 1)) !== 0) throw driverError('RING_LAYOUT', `bad split queue size ${n}`);
    super(o, n);
    const d = driverRingView(o.memory, 'descriptor table', o.desc, 16 * n, 16);
    this.#desc = new DataView(d.buffer, d.byteOffset, d.length);
    const a = driverRingView(o.memory, 'avail ring', o.driver, 6 + 2 * n, 2);
    this.#avail = new Uint16Array(a.buffer, a.byteOffset, 3 + n);
    const u = driverRingView(o.memory, 'used ring', o.device, 6 + 8 * n, 4);
    this.#used = new Uint16Array(u.buffer, u.byteOffset, 3 + 4 * n);
    this.#usedDv = new DataView(u.buffer, u.byteOffset, u.length);
    this.#next = new Uint16Array(n);
    for (let i = 0; i < n; i++) this.#next[i] = (i + 1) % n;
    // A fresh ring: flags and indices 0 (the used ring is the device's, zeroed before it starts).
    this.#avail.fill(0);
    this.#used.fill(0);
  }

  canAdd(n: number): boolean {
    return this.broken === null && this.free >= (this.useIndirect(n) ? 1 : n);
  }

  add(bufs: readonly DriverBuffer[], token: T): boolean {
    const { indirect, need, writable } = this.prepare(bufs);
    if (this.free < need) return false;
    const n = bufs.length;
    const head = this.#freeHead;
    const dv = this.#desc;
    if (indirect) {
      const gpa = this.writeIndirect(head, bufs, (i, b) => (b.write ? DESC_F_WRITE : 0) | (i + 1 < n ? DESC_F_NEXT : 0), (i) => (i + 1 < n ? i + 1 : 0));
      writeDescAddr(dv, 16 * head, gpa, 16 * n);
      dv.setUint16(16 * head + 12, DESC_F_INDIRECT, true);
      dv.setUint16(16 * head + 14, 0, true);
      this.#freeHead = this.#next[head]!;
    } else {
      let i = head;
      for (let k = 0; k < n; k++) {
        const b = bufs[k]!;
        writeDescAddr(dv, 16 * i, b.addr, b.len);
        const nx = this.#next[i]!;
        dv.setUint16(16 * i + 12, (b.write ? DESC_F_WRITE : 0) | (k + 1 < n ? DESC_F_NEXT : 0), true);
        dv.setUint16(16 * i + 14, k + 1 < n ? nx : 0, true);
        if (k + 1 < n) i = nx;
        else this.#freeHead = nx;
      }
    }
    this.track(head, token, need, writable);
    this.#avail[2 + (this.#availIdx & (this.size - 1))] = head;
    this.#availIdx = (this.#availIdx + 1) & 0xffff;
    Atomics.store(this.#avail, 1, this.#availIdx);
    return true;
  }

  needsKick(): boolean {
    const now = this.#availIdx;
    const old = this.#kickedIdx;
    this.#kickedIdx = now;
    if (now === old) return false;
    // Atomics.store of avail idx was a full barrier: the device's word is read after it.
    if (this.eventIdx) return vringNeedEvent(Atomics.load(this.#used, 2 + 4 * this.size), now, old);
    return (Atomics.load(this.#used, 0) & USED_F_NO_NOTIFY) === 0;
  }

  getUsed(): UsedBuffer<T> | null {
    if (this.broken) return null;
    const idx = Atomics.load(this.#used, 1);
    if (idx === this.#lastUsed) return null;
    const ahead = (idx - this.#lastUsed) & 0xffff;
    if (ahead > this.inFlight) this.fail(driverError('AVAIL_IDX', `used idx ${idx} is ${ahead} past ${this.#lastUsed} with ${this.inFlight} in flight`));
    const off = 4 + 8 * (this.#lastUsed & (this.size - 1));
    const id = this.#usedDv.getUint32(off, true);
    const len = this.#usedDv.getUint32(off + 4, true);
    const { token, count } = this.untrack(id, len);
    // Give the chain's descriptors back: walk our own links to its last one.
    let last = id;
    for (let k = 1; k < count; k++) last = this.#next[last]!;
    this.#next[last] = this.#freeHead;
    this.#freeHead = id;
    this.#lastUsed = (this.#lastUsed + 1) & 0xffff;
    if (this.eventIdx && this.interrupts) Atomics.store(this.#avail, 2 + this.size, this.#lastUsed);
    return { token, len };
  }

  enableInterrupts(): boolean {
    this.interrupts = true;
    if (this.eventIdx) Atomics.store(this.#avail, 2 + this.size, this.#lastUsed);
    else Atomics.store(this.#avail, 0, this.#avail[0]! & ~AVAIL_F_NO_INTERRUPT);
    return this.broken === null && Atomics.load(this.#used, 1) !== this.#lastUsed;
  }

  disableInterrupts(): void {
    this.interrupts = false;
    if (!this.eventIdx) Atomics.store(this.#avail, 0, this.#avail[0]! | AVAIL_F_NO_INTERRUPT);
  }
}
