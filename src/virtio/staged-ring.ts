/**
 * Rings (descriptor table, avail / driver area, used / device area) in guest
 * memory the device reaches only by asynchronous copies (vfio-user DMA
 * windows mapped without an fd: DMA_READ / DMA_WRITE messages), staged in
 * local buffers so the synchronous ring engine runs over them unchanged.
 *
 * The caller (the PCI transport) runs one sequential loop per queue:
 *
 *   - refreshDriver() before the engine looks for new chains: the
 *     driver-owned areas read again, each read waited for before the next
 *     (the order of the bytes within one read is not relied on). Split: the
 *     avail flags and idx, then the avail entries (and used_event), then the
 *     descriptor table: the driver writes descriptors, then the avail entry,
 *     then the avail idx, so each read sees what the previous one published.
 *     Packed: the descriptor ring read twice. The second read is taken, but
 *     a chain head counts as available only if the first read saw it so:
 *     walking from the device's next avail slot, each head available in the
 *     first read has its whole chain (bodies, later descriptors' flags)
 *     from the second, written before the head's flags; the first head not
 *     available in the first read gets the first read's flags (not
 *     available) and ends the walk: the engine stops there;
 *   - the engine over memory(): views of the ring areas are the staged
 *     buffers, everything else (buffers, indirect tables) the inner memory;
 *   - flush() after the engine wrote: the bytes it wrote (it logs every ring
 *     write; mark()) go back with DMA_WRITE, the bodies first, then, once the
 *     client has answered, the words that publish them (split: used idx;
 *     packed: descriptor flags). Only bytes the device wrote are written:
 *     never a byte the driver owns;
 *   - refreshEvents() before the interrupt decision: the driver's
 *     suppression fields (split: avail flags and used_event; packed: the
 *     driver event area) read again after the flush.
 *
 * Refreshes land in scratch buffers and are copied in at once when the last
 * read is in: the engine never sees half a refresh. The loop never refreshes
 * over bytes not flushed (packed rings share the descriptor ring: refresh
 * refuses while it has unflushed bytes).
 *
 * Bounds: every buffer is sized by the queue size (1..32768), checked here.
 */
import type { GuestMemoryView } from './types.js';
import { DESC_F_AVAIL, DESC_F_NEXT, DESC_F_USED } from './base.js';

/** Packed descriptor flags available to a device whose avail wrap counter is `wrap` (2.8.1). */
function isAvail(flags: number, wrap: boolean): boolean {
  return ((flags & DESC_F_AVAIL) !== 0) === wrap && ((flags & DESC_F_USED) !== 0) !== wrap;
}

/** The DMA the staged ring needs (vfio-user DeviceContext.dma is one). */
export interface RingDma {
  readInto(iova: number, dest: Uint8Array): Promise<void>;
  write(iova: number, data: Uint8Array): Promise<void>;
}

export interface StagedRingLayout {
  packed: boolean;
  eventIdx: boolean;
  /** Queue size: 1..32768. */
  size: number;
  /** GPAs of the descriptor table / ring, the avail ring / driver area, the used ring / device area. */
  desc: number;
  driver: number;
  device: number;
}

/** Where a staged ring counts its transfers. */
export interface StagedRingCounters {
  ringReads: number;
  ringWrites: number;
}

/** One ring area and its staged copy. */
export interface StagedArea {
  readonly what: 'desc' | 'driver' | 'device';
  readonly gpa: number;
  readonly bytes: Uint8Array;
}

const MAX_SIZE = 32768;
/** Dirty ranges kept before they are merged (bounded whatever the engine logs). */
const MAX_DIRTY = 1024;

/** The ring areas of a queue: [what, gpa, bytes], as the engine (split.ts, packed.ts) lays them out. */
export function ringAreas(l: StagedRingLayout): [StagedArea['what'], number, number][] {
  const n = l.size;
  const extra = l.eventIdx ? 2 : 0;
  return l.packed
    ? [['desc', l.desc, 16 * n], ['driver', l.driver, 4], ['device', l.device, 4]]
    : [['desc', l.desc, 16 * n], ['driver', l.driver, 4 + 2 * n + extra], ['device', l.device, 4 + 8 * n + extra]];
}

export class StagedRing {
  readonly layout: Readonly<StagedRingLayout>;
  readonly desc: StagedArea;
  readonly driver: StagedArea;
  readonly device: StagedArea;
  readonly areas: readonly StagedArea[];
  /** Bytes the engine wrote into the staged areas and not yet flushed: [area index, start, end) GPAs. */
  #dirty: [number, number, number][] = [];
  /**
   * The device area (split used ring, packed device event area: the driver
   * only reads it) as the guest has it: a flush skips a range the engine
   * wrote back to what it was (used flags disabled and enabled again).
   */
  readonly #shadow: Uint8Array;
  /** Scratch for refreshes (sized once). */
  readonly #scratch: Uint8Array;
  readonly #scratch2: Uint8Array | null;
  /** Counted: DMA_READs and DMA_WRITEs of ring bytes. */
  readonly #counters: StagedRingCounters;

  constructor(layout: StagedRingLayout, counters: StagedRingCounters = { ringReads: 0, ringWrites: 0 }) {
    this.#counters = counters;
    const { size, desc, driver, device } = layout;
    if (!Number.isInteger(size) || size < 1 || size > MAX_SIZE) throw new RangeError(`staged ring of ${String(size)}`);
    for (const a of [desc, driver, device]) if (!Number.isSafeInteger(a) || a < 0) throw new RangeError(`ring address ${String(a)}`);
    this.layout = Object.freeze({ ...layout });
    const areas = ringAreas(layout).map(([what, gpa, len]) => ({ what, gpa, bytes: new Uint8Array(len) }));
    this.areas = areas;
    [this.desc, this.driver, this.device] = areas as [StagedArea, StagedArea, StagedArea];
    this.#scratch = new Uint8Array(Math.max(this.desc.bytes.length, this.driver.bytes.length));
    this.#scratch2 = layout.packed ? new Uint8Array(this.desc.bytes.length) : null;
    this.#shadow = new Uint8Array(this.device.bytes.length);
  }

  /** Guest memory for the engine: the ring areas are the staged buffers, the rest is `inner`. */
  memory(inner: GuestMemoryView): GuestMemoryView {
    return new StagedMemory(inner, this.areas);
  }

  get dirty(): boolean {
    return this.#dirty.length > 0;
  }

  /** A guest-memory write the engine logged: kept (clipped) where it is in a staged area. */
  mark(gpa: number, length: number): void {
    this.areas.forEach((a, i) => {
      const from = Math.max(gpa, a.gpa);
      const to = Math.min(gpa + length, a.gpa + a.bytes.length);
      if (from < to) this.#dirty.push([i, from, to]);
    });
    if (this.#dirty.length > MAX_DIRTY) this.#dirty = merge(this.#dirty);
  }

  /** Every area read in (the ring's start). `avail`: as in refreshDriver. */
  async load(dma: RingDma, avail: number): Promise<void> {
    const dev = new Uint8Array(this.device.bytes.length);
    await this.#read(dma, this.device.gpa, dev);
    let drv: Uint8Array | null = null;
    if (this.layout.packed) {
      drv = new Uint8Array(this.driver.bytes.length);
      await this.#read(dma, this.driver.gpa, drv);
    }
    await this.refreshDriver(dma, avail);
    this.device.bytes.set(dev);
    this.#shadow.set(dev);
    if (drv) this.driver.bytes.set(drv);
  }

  /**
   * The driver-owned areas again (see the file comment). `avail` (packed):
   * the device's next avail slot, bit 15 its wrap counter (the low half of
   * the engine's base()); ignored for split.
   */
  async refreshDriver(dma: RingDma, avail: number): Promise<void> {
    const n = this.layout.size;
    if (!this.layout.packed) {
      const a = this.#scratch.subarray(0, this.driver.bytes.length);
      await this.#read(dma, this.driver.gpa, a.subarray(0, 4)); // flags, idx
      await this.#read(dma, this.driver.gpa + 4, a.subarray(4)); // ring[], used_event
      const desc = new Uint8Array(this.desc.bytes.length);
      await this.#read(dma, this.desc.gpa, desc);
      this.driver.bytes.set(a);
      this.desc.bytes.set(desc);
      return;
    }
    if (this.#dirty.some(([i]) => i === 0)) throw new Error('packed descriptor ring refreshed over bytes not flushed');
    const slot = avail & 0x7fff;
    if (!Number.isInteger(avail) || avail < 0 || avail > 0xffff || slot >= n) throw new RangeError(`next avail ${String(avail)}`);
    const first = this.#scratch.subarray(0, 16 * n);
    const second = this.#scratch2!;
    await this.#read(dma, this.desc.gpa, first);
    await this.#read(dma, this.desc.gpa, second);
    const dv1 = new DataView(first.buffer, first.byteOffset, first.length);
    const dv2 = new DataView(second.buffer, second.byteOffset, second.length);
    let pos = slot;
    let wrap = (avail & 0x8000) !== 0;
    for (let seen = 0; seen < n; ) {
      if (!isAvail(dv1.getUint16(16 * pos + 14, true), wrap)) {
        dv2.setUint16(16 * pos + 14, dv1.getUint16(16 * pos + 14, true), true); // not available yet: the engine stops here
        break;
      }
      // The head's chain as the second read has it.
      for (;;) {
        const flags = dv2.getUint16(16 * pos + 14, true);
        seen++;
        if (++pos === n) {
          pos = 0;
          wrap = !wrap;
        }
        if ((flags & DESC_F_NEXT) === 0 || seen >= n) break;
      }
    }
    this.desc.bytes.set(second);
  }

  /**
   * Whether the driver made more available than the staged copy shows, from
   * one small read: split, the avail idx against `avail` (the device's next
   * avail idx); packed, the flags of the next head (`avail` as in
   * refreshDriver). Nothing staged changes.
   */
  async moreAvailable(dma: RingDma, avail: number): Promise<boolean> {
    const b = new Uint8Array(2);
    if (!this.layout.packed) {
      await this.#read(dma, this.driver.gpa + 2, b);
      return (b[0]! | (b[1]! << 8)) !== (avail & 0xffff);
    }
    const slot = avail & 0x7fff;
    if (slot >= this.layout.size) return true; // refreshDriver says what is wrong
    await this.#read(dma, this.desc.gpa + 16 * slot + 14, b);
    return isAvail(b[0]! | (b[1]! << 8), (avail & 0x8000) !== 0);
  }

  /** Before an interrupt decision: the driver's suppression fields again. */
  async refreshEvents(dma: RingDma): Promise<void> {
    const d = this.driver;
    if (this.layout.packed) {
      const b = new Uint8Array(4);
      await this.#read(dma, d.gpa, b);
      d.bytes.set(b);
      return;
    }
    const flags = new Uint8Array(2);
    const usedEvent = this.layout.eventIdx ? new Uint8Array(2) : null;
    const at = 4 + 2 * this.layout.size;
    await Promise.all([this.#read(dma, d.gpa, flags), usedEvent ? this.#read(dma, d.gpa + at, usedEvent) : null]);
    d.bytes.set(flags, 0);
    if (usedEvent) d.bytes.set(usedEvent, at);
  }

  /**
   * Writes back the bytes the engine wrote: bodies, then (once the client has
   * answered them) the publishing words. On failure the ranges stay to flush.
   */
  async flush(dma: RingDma): Promise<void> {
    if (this.#dirty.length === 0) return;
    const ranges = merge(this.#dirty);
    this.#dirty = [];
    const bodies: [number, Uint8Array][] = [];
    const publish: [number, Uint8Array][] = [];
    const shadowed: [number, number][] = [];
    for (const [i, start, end] of ranges) {
      const a = this.areas[i]!;
      if (a === this.device) {
        const now = a.bytes.subarray(start - a.gpa, end - a.gpa);
        const was = this.#shadow.subarray(start - a.gpa, end - a.gpa);
        if (now.every((v, k) => v === was[k])) continue; // the guest has these bytes already
        shadowed.push([start - a.gpa, end - a.gpa]);
      }
      let run = start;
      for (let g = start + 1; g <= end; g++) {
        if (g < end && this.#publishes(g) === this.#publishes(run)) continue;
        (this.#publishes(run) ? publish : bodies).push([run, a.bytes.slice(run - a.gpa, g - a.gpa)]);
        run = g;
      }
    }
    try {
      this.#counters.ringWrites += bodies.length + publish.length;
      await Promise.all(bodies.map(([g, b]) => dma.write(g, b)));
      await Promise.all(publish.map(([g, b]) => dma.write(g, b)));
      for (const [from, to] of shadowed) this.#shadow.set(this.device.bytes.subarray(from, to), from);
    } catch (err) {
      this.#dirty.push(...ranges);
      throw err;
    }
  }

  /** Whether the byte at `gpa` publishes what precedes it to the driver: split used idx, packed descriptor flags. */
  #publishes(gpa: number): boolean {
    if (this.layout.packed) {
      const off = gpa - this.desc.gpa;
      return off >= 0 && off < this.desc.bytes.length && off % 16 >= 14;
    }
    const off = gpa - this.device.gpa;
    return off === 2 || off === 3;
  }

  async #read(dma: RingDma, gpa: number, into: Uint8Array): Promise<void> {
    if (into.length === 0) return;
    this.#counters.ringReads++;
    await dma.readInto(gpa, into);
  }
}

/** [area, start, end) ranges sorted and merged, within an area, where they overlap or touch. */
function merge(ranges: [number, number, number][]): [number, number, number][] {
  const s = [...ranges].sort((a, b) => a[0] - b[0] || a[1] - b[1]);
  const out: [number, number, number][] = [];
  for (const r of s) {
    const last = out[out.length - 1];
    if (last && last[0] === r[0] && r[1] <= last[2]) last[2] = Math.max(last[2], r[2]);
    else out.push([r[0], r[1], r[2]]);
  }
  return out;
}

/** The engine's memory: a ring area asked for exactly is its staged buffer; anything else is the inner memory. */
class StagedMemory implements GuestMemoryView {
  readonly #inner: GuestMemoryView;
  readonly #areas: readonly StagedArea[];

  constructor(inner: GuestMemoryView, areas: readonly StagedArea[]) {
    this.#inner = inner;
    this.#areas = areas;
  }

  get generation(): number {
    return this.#inner.generation;
  }

  #area(gpa: number, length: number): StagedArea | undefined {
    return this.#areas.find((a) => a.gpa === gpa && a.bytes.length === length);
  }

  view(gpa: number, length: number): Uint8Array | null {
    return this.#area(gpa, length)?.bytes ?? this.#inner.view(gpa, length);
  }

  slices(gpa: number, length: number): Uint8Array[] {
    const a = this.#area(gpa, length);
    return a ? [a.bytes] : this.#inner.slices(gpa, length);
  }

  uvaToGpa(uva: number, length: number): number {
    return this.#inner.uvaToGpa(uva, length);
  }
}
