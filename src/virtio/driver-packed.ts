/**
 * The driver side of a packed virtqueue (VIRTIO 1.2 2.8): a descriptor ring
 * of 16-byte pvirtq_desc (addr u64 @0, len u32 @8, id u16 @12, flags u16 @14;
 * AVAIL bit 7, USED bit 15), the driver event suppression area (ours:
 * off_wrap u16 @0, flags u16 @2) and the device's. Both wrap counters start
 * at 1. A chain takes consecutive slots, the buffer id in every descriptor
 * (the device reads it from the last); the first descriptor's flags are
 * stored last, so the device never sees a partial chain.
 */
import { DESC_F_AVAIL, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_USED, DESC_F_WRITE } from './base.js';
import { vringNeedEvent } from './split.js';
import { DriverQueueBase, driverError, driverRingView, writeDescAddr, type DriverBuffer, type DriverQueue, type DriverQueueOptions, type UsedBuffer } from './driver.js';

const EVENT_ENABLE = 0;
const EVENT_DISABLE = 1;
const EVENT_DESC = 2;

export class PackedDriverQueue<T> extends DriverQueueBase<T> implements DriverQueue<T> {
  readonly packed = true;
  readonly #desc: DataView;
  readonly #flags: Uint16Array;
  /** Ours: the driver event suppression area [off_wrap, flags]. */
  readonly #driverEvent: Uint16Array;
  /** The device's event suppression area [off_wrap, flags]. */
  readonly #deviceEvent: Uint16Array;
  #nextAvail = 0;
  #availWrap = true;
  #nextUsed = 0;
  #usedWrap = true;
  /** Descriptors added since the last needsKick(). */
  #added = 0;
  /** Free buffer ids (a stack). */
  readonly #freeIds: Uint16Array;
  #freeIdCount: number;

  constructor(o: DriverQueueOptions) {
    const n = o.size;
    if (!Number.isInteger(n) || n < 1 || n > 32768) throw driverError('RING_LAYOUT', `bad packed queue size ${n}`);
    super(o, n);
    const d = driverRingView(o.memory, 'descriptor ring', o.desc, 16 * n, 16);
    this.#desc = new DataView(d.buffer, d.byteOffset, d.length);
    this.#flags = new Uint16Array(d.buffer, d.byteOffset, 8 * n);
    const de = driverRingView(o.memory, 'driver event area', o.driver, 4, 4);
    this.#driverEvent = new Uint16Array(de.buffer, de.byteOffset, 2);
    const ve = driverRingView(o.memory, 'device event area', o.device, 4, 4);
    this.#deviceEvent = new Uint16Array(ve.buffer, ve.byteOffset, 2);
    this.#freeIds = new Uint16Array(n);
    for (let i = 0; i < n; i++) this.#freeIds[i] = n - 1 - i;
    this.#freeIdCount = n;
    d.fill(0);
    this.#driverEvent.fill(0);
    this.#deviceEvent.fill(0);
  }

  canAdd(n: number): boolean {
    return this.broken === null && this.#freeIdCount > 0 && this.free >= (this.useIndirect(n) ? 1 : n);
  }

  /** AVAIL/USED bits of a descriptor made available with wrap counter `wrap`. */
  static #availBits(wrap: boolean): number {
    return wrap ? DESC_F_AVAIL : DESC_F_USED;
  }

  add(bufs: readonly DriverBuffer[], token: T): boolean {
    const { indirect, need, writable } = this.prepare(bufs);
    if (this.free < need || this.#freeIdCount === 0) return false;
    const n = bufs.length;
    const id = this.#freeIds[--this.#freeIdCount]!;
    const dv = this.#desc;
    const start = this.#nextAvail;
    let firstFlags = 0;
    if (indirect) {
      // Table entries: id 0, flags WRITE only (NEXT, AVAIL, USED are ignored in a table).
      const gpa = this.writeIndirect(id, bufs, () => 0, (_i, b) => (b.write ? DESC_F_WRITE : 0));
      writeDescAddr(dv, 16 * start, gpa, 16 * n);
      dv.setUint16(16 * start + 12, id, true);
      firstFlags = DESC_F_INDIRECT | PackedDriverQueue.#availBits(this.#availWrap);
      this.#advance();
    } else {
      for (let k = 0; k < n; k++) {
        const b = bufs[k]!;
        const slot = this.#nextAvail;
        writeDescAddr(dv, 16 * slot, b.addr, b.len);
        dv.setUint16(16 * slot + 12, id, true);
        const flags = (b.write ? DESC_F_WRITE : 0) | (k + 1 < n ? DESC_F_NEXT : 0) | PackedDriverQueue.#availBits(this.#availWrap);
        if (k === 0) firstFlags = flags;
        else this.#flags[8 * slot + 7] = flags;
        this.#advance();
      }
    }
    this.track(id, token, need, writable);
    this.#added += need;
    Atomics.store(this.#flags, 8 * start + 7, firstFlags);
    return true;
  }

  #advance(): void {
    if (++this.#nextAvail === this.size) {
      this.#nextAvail = 0;
      this.#availWrap = !this.#availWrap;
    }
  }

  needsKick(): boolean {
    const added = this.#added;
    this.#added = 0;
    if (added === 0) return false;
    // The Atomics.store publishing the chain was a full barrier.
    const flags = Atomics.load(this.#deviceEvent, 1) & 3;
    if (flags !== EVENT_DESC || !this.eventIdx) return flags !== EVENT_DISABLE;
    const offWrap = Atomics.load(this.#deviceEvent, 0);
    let event = offWrap & 0x7fff;
    if ((offWrap & 0x8000) !== 0 !== this.#availWrap) event -= this.size;
    const now = this.#nextAvail;
    return vringNeedEvent(event & 0xffff, now, (now - added) & 0xffff);
  }

  #usedReady(): boolean {
    const f = Atomics.load(this.#flags, 8 * this.#nextUsed + 7);
    const avail = (f & DESC_F_AVAIL) !== 0;
    const used = (f & DESC_F_USED) !== 0;
    return avail === used && used === this.#usedWrap;
  }

  getUsed(): UsedBuffer<T> | null {
    if (this.broken || this.inFlight === 0 || !this.#usedReady()) return null;
    const off = 16 * this.#nextUsed;
    const id = this.#desc.getUint16(off + 12, true);
    const len = this.#desc.getUint32(off + 8, true);
    const { token, count } = this.untrack(id, len);
    this.#nextUsed += count;
    if (this.#nextUsed >= this.size) {
      this.#nextUsed -= this.size;
      this.#usedWrap = !this.#usedWrap;
    }
    this.#freeIds[this.#freeIdCount++] = id;
    if (this.eventIdx && this.interrupts) this.#writeDriverEvent();
    return { token, len };
  }

  #writeDriverEvent(): void {
    this.#driverEvent[0] = this.#nextUsed | (this.#usedWrap ? 0x8000 : 0);
    Atomics.store(this.#driverEvent, 1, EVENT_DESC);
  }

  enableInterrupts(): boolean {
    this.interrupts = true;
    if (this.eventIdx) this.#writeDriverEvent();
    else Atomics.store(this.#driverEvent, 1, EVENT_ENABLE);
    return this.broken === null && this.inFlight > 0 && this.#usedReady();
  }

  disableInterrupts(): void {
    this.interrupts = false;
    Atomics.store(this.#driverEvent, 1, EVENT_DISABLE);
  }
}
