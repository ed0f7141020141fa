/**
 * The packed virtqueue, device side (VIRTIO 1.x 2.8): one descriptor ring of N
 * pvirtq_desc (addr u64 @0, len u32 @8, id u16 @12, flags u16 @14; 16-aligned)
 * and two event suppression areas (desc u16 @0: offset bits 0-14, wrap bit 15;
 * flags u16 @2; 4-aligned). The driver's area controls our interrupts, ours
 * its kicks. Both wrap counters start at 1.
 */
import type { DescChain } from './types.js';
import type { DeviceQueueOptions } from './queue.js';
import { VirtioError } from './errors.js';
import {
  BaseQueue,
  Chain,
  DESC_F_AVAIL,
  DESC_F_INDIRECT,
  DESC_F_NEXT,
  DESC_F_USED,
  DESC_F_WRITE,
  readAddr,
  ringError,
} from './base.js';
import { PackedInflightQueue, type PackedDescs } from './inflight.js';

const EVENT_ENABLE = 0;
const EVENT_DISABLE = 1;
const EVENT_DESC = 2;

/** Whether descriptor flags mean "available" for a device expecting wrap counter `wrap`. */
function isAvail(flags: number, wrap: boolean): boolean {
  return ((flags & DESC_F_AVAIL) !== 0) === wrap && ((flags & DESC_F_USED) !== 0) !== wrap;
}

export class PackedQueue extends BaseQueue {
  readonly packed = true;
  readonly #inflight: PackedInflightQueue | null;
  #ring!: DataView;
  #ring16!: Uint16Array;
  #driverArea!: Uint16Array;
  #deviceArea!: Uint16Array;
  #lastAvail: number;
  #availWrap: boolean;
  #usedIdx: number;
  #usedWrap: boolean;
  /** The ring descriptors of the chain being popped (or resubmitted). */
  readonly #d: PackedDescs;
  /** In-flight chains by buffer id. */
  readonly #ids = new Map<number, Chain>();
  /** Ring descriptors held by chains in flight (at most the ring size). */
  #descsInFlight = 0;
  /** After a reconnect: the descriptor count of each inflight entry to resubmit, as counted in #descsInFlight. */
  readonly #recorded = new Map<number, number>();

  constructor(o: DeviceQueueOptions) {
    super(o, true);
    const n = this.size;
    const base = o.base ?? 0x8000_8000;
    if (!Number.isInteger(base) || base < 0 || base > 0xffff_ffff) throw ringError(`bad packed vring base ${String(base)}`);
    const avail = base & 0xffff;
    const used = base > 0xffff ? base >>> 16 : avail;
    this.#lastAvail = avail & 0x7fff;
    this.#availWrap = (avail & 0x8000) !== 0;
    this.#usedIdx = used & 0x7fff;
    this.#usedWrap = (used & 0x8000) !== 0;
    if (this.#lastAvail >= n || this.#usedIdx >= n) throw ringError(`packed vring base ${base.toString(16)} is past a ring of ${n}`);
    this.#d = { addr: new Float64Array(n), len: new Uint32Array(n), flags: new Uint16Array(n), id: new Uint16Array(n) };
    if (o.inflight && !(o.inflight instanceof PackedInflightQueue)) throw new TypeError('not a packed inflight region');
    this.#inflight = o.inflight ?? null;
    this.views();
    if (this.#inflight !== null) {
      const fresh = this.#inflight.fresh;
      const r = this.#inflight.attach(this.#usedIdx, this.#usedWrap, (slot) => {
        if (slot >= n) throw new VirtioError('INFLIGHT_LAYOUT', `inflight old_used_idx ${slot} is past a ring of ${n}`);
        return Atomics.load(this.#ring16, slot * 8 + 7);
      });
      if (!fresh) {
        if (r.usedIdx >= n || r.descriptors > n) {
          throw new VirtioError('INFLIGHT_LAYOUT', `inflight used_idx ${r.usedIdx} with ${r.descriptors} descriptors in flight on a ring of ${n}`);
        }
        // After a reconnect the avail side is the used side plus what is in flight.
        this.#usedIdx = r.usedIdx;
        this.#usedWrap = r.usedWrap;
        this.#lastAvail = r.usedIdx + r.descriptors;
        this.#availWrap = r.usedWrap;
        if (this.#lastAvail >= n) {
          this.#lastAvail -= n;
          this.#availWrap = !this.#availWrap;
        }
        this.resubmitList = r.entries;
        r.entries.forEach((e, i) => this.#recorded.set(e, r.counts[i]!));
        // Their descriptors stay counted until they are pushed (resubmitted or not).
        this.#descsInFlight = r.descriptors;
      }
    }
  }

  protected resolve(): void {
    const ring = this.ringView('descriptor ring', this.opts.desc, 16 * this.size, 16);
    this.#ring = BaseQueue.dv(ring);
    this.#ring16 = BaseQueue.u16(ring);
    this.#driverArea = BaseQueue.u16(this.ringView('driver event area', this.opts.driver, 4, 4));
    this.#deviceArea = BaseQueue.u16(this.ringView('device event area', this.opts.device, 4, 4));
  }

  protected next(): Chain | null {
    const first = this.#lastAvail;
    if (!isAvail(Atomics.load(this.#ring16, first * 8 + 7), this.#availWrap)) return null;
    // The first descriptor's flags were read with the acquire load above; the rest follows it.
    const d = this.#d;
    const dv = this.#ring;
    let slot = first;
    let n = 0;
    for (;;) {
      if (n >= this.size) throw new VirtioError('CHAIN_TOO_LONG', `chain at ${first} is longer than the ring`);
      const off = slot * 16;
      d.addr[n] = readAddr(dv, off);
      d.len[n] = dv.getUint32(off + 8, true);
      d.id[n] = dv.getUint16(off + 12, true);
      const flags = dv.getUint16(off + 14, true);
      d.flags[n] = flags;
      n++;
      if (++slot === this.size) slot = 0;
      if ((flags & DESC_F_NEXT) === 0) break;
    }
    if (this.#descsInFlight + n > this.size) {
      throw new VirtioError('AVAIL_IDX', `the driver made ${this.#descsInFlight + n} descriptors available on a ring of ${this.size}`);
    }
    const c = this.#build(n);
    if (this.#inflight !== null) c.slot = this.#inflight.record(d, n);
    this.#lastAvail += n;
    if (this.#lastAvail >= this.size) {
      this.#lastAvail -= this.size;
      this.#availWrap = !this.#availWrap;
    }
    this.#track(c);
    if (this.eventIdx && this.notify) this.#writeDeviceEvent();
    return c;
  }

  /** The chain of the `n` descriptors in #d (ring or inflight copies). */
  #build(n: number): Chain {
    const d = this.#d;
    const id = d.id[n - 1]!;
    if (this.#ids.has(id)) throw new VirtioError('ID_IN_USE', `buffer id ${id} is already in flight`);
    const c = this.take();
    c.id = id;
    c.descCount = n;
    for (let k = 0; k < n; k++) {
      const flags = d.flags[k]!;
      if ((flags & DESC_F_INDIRECT) === 0) {
        this.addBuffer(c, d.addr[k]!, d.len[k]!, flags);
        continue;
      }
      // An indirect table: every entry in order (pvirtq_desc; id, NEXT, AVAIL and USED ignored).
      const t = this.indirectTable(d.addr[k]!, d.len[k]!, flags);
      for (let off = 0; off < t.byteLength; off += 16) this.indirectEntry(c, t, off, 14);
    }
    return c;
  }

  #track(c: Chain): void {
    this.#ids.set(c.id, c);
    this.#descsInFlight += c.descCount;
    this.own(c);
  }

  /** Writes the used descriptor of `c` at `slot` (flags last, with Atomics.store). */
  #writeUsed(c: Chain, written: number, slot: number, wrap: boolean, publish: boolean): void {
    const off = slot * 16;
    this.#ring.setUint32(off + 8, written, true);
    this.#ring.setUint16(off + 12, c.id, true);
    if (publish) this.#publishAt(slot, wrap, written);
  }

  #publishAt(slot: number, wrap: boolean, written: number): void {
    const flags = (wrap ? DESC_F_AVAIL | DESC_F_USED : 0) | (written > 0 ? DESC_F_WRITE : 0);
    Atomics.store(this.#ring16, slot * 8 + 7, flags);
    this.logRing(this.opts.desc + slot * 16, 16);
  }

  /**
   * Writes the used descriptors of a batch: the first one's flags are stored
   * last, so the driver (which looks at its next used slot) sees the batch at
   * once, and the inflight recovery, which looks at the first, sees all or none.
   */
  #complete(cs: readonly Chain[], written: ArrayLike<number>): void {
    this.views();
    const inflight = this.#inflight;
    const firstSlot = this.#usedIdx;
    const firstWrap = this.#usedWrap;
    if (inflight !== null) {
      // The region is the front-end's memory: a bad entry (INFLIGHT_LAYOUT) breaks the queue before any ring write.
      try {
        for (const c of cs) inflight.free(c.slot);
      } catch (err) {
        this.failed(err);
        throw err;
      }
    }
    let slot = firstSlot;
    let wrap = firstWrap;
    for (let k = 0; k < cs.length; k++) {
      const c = cs[k]!;
      this.logWritten(c, written[k]!);
      this.#writeUsed(c, written[k]!, slot, wrap, k > 0);
      this.pushed += c.descCount;
      slot += c.descCount;
      if (slot >= this.size) {
        slot -= this.size;
        wrap = !wrap;
      }
    }
    inflight?.setUsed(slot, wrap);
    this.#publishAt(firstSlot, firstWrap, written[0]!);
    this.#usedIdx = slot;
    this.#usedWrap = wrap;
    for (const c of cs) {
      inflight?.clear(c.slot);
      this.#ids.delete(c.id);
      this.#descsInFlight -= c.descCount;
    }
    inflight?.commit();
    for (const c of cs) this.release(c);
  }

  readonly #one: Chain[] = [];
  readonly #oneWritten: number[] = [0];

  push(chain: DescChain, written: number): void {
    const c = this.checkUsed(chain, written);
    this.#one[0] = c;
    this.#oneWritten[0] = written;
    try {
      this.#complete(this.#one, this.#oneWritten);
    } finally {
      this.#one.length = 0;
    }
  }

  pushBatch(chains: readonly DescChain[], written: ArrayLike<number>): void {
    const cs = this.checkBatch(chains, written);
    if (cs.length > 0) this.#complete(cs, written);
  }

  needsNotify(): boolean {
    const pushed = this.pushed;
    if (pushed === 0) return false;
    this.views();
    const valid = this.signalledValid;
    this.pushed = 0;
    this.signalledValid = true;
    const flags = Atomics.load(this.#driverArea, 1) & 3;
    if (flags === EVENT_DISABLE) return false;
    if (flags !== EVENT_DESC || !this.eventIdx || !valid || pushed >= this.size) return true;
    // Positions on one line: the used slots written since the previous call are [now - pushed, now).
    const offWrap = Atomics.load(this.#driverArea, 0);
    const now = this.#usedIdx;
    let event = offWrap & 0x7fff;
    if ((offWrap & 0x8000) !== 0 !== this.#usedWrap) event -= this.size;
    return event >= now - pushed && event < now;
  }

  #writeDeviceEvent(): void {
    Atomics.store(this.#deviceArea, 0, this.#lastAvail | (this.#availWrap ? 0x8000 : 0));
    this.logRing(this.opts.device, 2);
  }

  #writeDeviceFlags(flags: number): void {
    Atomics.store(this.#deviceArea, 1, flags);
    this.logRing(this.opts.device + 2, 2);
  }

  enableNotifications(): boolean {
    if (this.broken !== null) return false;
    this.views();
    this.notify = true;
    if (this.eventIdx) {
      this.#writeDeviceEvent();
      this.#writeDeviceFlags(EVENT_DESC);
    } else {
      this.#writeDeviceFlags(EVENT_ENABLE);
    }
    return this.hasAvailable();
  }

  protected hasAvailable(): boolean {
    return isAvail(Atomics.load(this.#ring16, this.#lastAvail * 8 + 7), this.#availWrap);
  }

  disableNotifications(): void {
    this.notify = false;
    if (this.broken !== null) return;
    this.views();
    this.#writeDeviceFlags(EVENT_DISABLE);
  }

  base(): number {
    const avail = this.#lastAvail | (this.#availWrap ? 0x8000 : 0);
    const used = this.#usedIdx | (this.#usedWrap ? 0x8000 : 0);
    return (avail | (used << 16)) >>> 0;
  }

  protected rebuild(entry: number): Chain {
    const n = this.#inflight!.descriptorsOf(entry, this.#d);
    // The front-end may have rewritten the entry since the queue counted it.
    if (n !== this.#recorded.get(entry)) throw new VirtioError('INFLIGHT_LAYOUT', `inflight entry ${entry} holds ${n} descriptors, ${String(this.#recorded.get(entry))} when the queue started`);
    const c = this.#build(n);
    c.slot = entry;
    this.#descsInFlight -= c.descCount; // counted since the queue was created
    this.#track(c);
    return c;
  }
}
