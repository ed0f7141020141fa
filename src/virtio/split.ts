/**
 * The split virtqueue, device side (VIRTIO 1.x 2.7): descriptor table (16 *
 * N, 16-aligned), avail ring (flags, idx, ring[N], used_event; 2-aligned),
 * used ring (flags, idx, {id u32, len u32}[N], avail_event; 4-aligned).
 */
import type { DescChain } from './types.js';
import type { DeviceQueueOptions } from './queue.js';
import { VirtioError } from './errors.js';
import { BaseQueue, Chain, DESC_F_INDIRECT, DESC_F_NEXT, readAddr, ringError } from './base.js';
import { SplitInflightQueue } from './inflight.js';

const AVAIL_F_NO_INTERRUPT = 1;
const USED_F_NO_NOTIFY = 1;

/** vring_need_event: whether moving the index from `old` to `now` passes `event`. */
export function vringNeedEvent(event: number, now: number, old: number): boolean {
  return ((now - event - 1) & 0xffff) < ((now - old) & 0xffff);
}

export class SplitQueue extends BaseQueue {
  readonly packed = false;
  readonly #mask: number;
  readonly #usedLog: number;
  readonly #inflight: SplitInflightQueue | null;
  #desc!: DataView;
  #avail!: Uint16Array;
  #used!: DataView;
  #used16!: Uint16Array;
  /** Next avail idx to read (free-running mod 2^16). */
  #lastAvail: number;
  /** The avail idx last read from the ring. */
  #shadowAvail: number;
  /** Next used idx to write. */
  #usedIdx = 0;
  /** The used idx at the previous needsNotify(). */
  #signalled = 0;
  /** In-flight chains by head index. */
  readonly #chains: (Chain | undefined)[];

  constructor(o: DeviceQueueOptions) {
    super(o, false);
    const base = o.base ?? 0;
    if (!Number.isInteger(base) || base < 0 || base > 0xffff) throw ringError(`bad split vring base ${String(base)}`);
    this.#mask = this.size - 1;
    this.#usedLog = o.logUsedAddr ?? o.device;
    if (!Number.isSafeInteger(this.#usedLog) || this.#usedLog < 0) throw ringError(`bad used ring log address ${String(this.#usedLog)}`);
    this.#chains = new Array<Chain | undefined>(this.size).fill(undefined);
    if (o.inflight && !(o.inflight instanceof SplitInflightQueue)) throw new TypeError('not a split inflight region');
    this.#inflight = o.inflight ?? null;
    this.views();
    this.#usedIdx = Atomics.load(this.#used16, 1);
    this.#signalled = this.#usedIdx;
    this.#lastAvail = base;
    if (this.#inflight !== null) {
      const fresh = this.#inflight.fresh;
      this.resubmitList = this.#inflight.attach(this.#usedIdx);
      // After a reconnect every head taken is either used (counted in used idx) or in flight.
      if (!fresh) this.#lastAvail = (this.#usedIdx + this.resubmitList.length) & 0xffff;
    }
    this.#shadowAvail = this.#lastAvail;
  }

  protected resolve(): void {
    const n = this.size;
    const extra = this.eventIdx ? 2 : 0;
    this.#desc = BaseQueue.dv(this.ringView('descriptor table', this.opts.desc, 16 * n, 16));
    this.#avail = BaseQueue.u16(this.ringView('avail ring', this.opts.driver, 4 + 2 * n + extra, 2));
    const used = this.ringView('used ring', this.opts.device, 4 + 8 * n + extra, 4);
    this.#used = BaseQueue.dv(used);
    this.#used16 = BaseQueue.u16(used);
  }

  protected next(): Chain | null {
    const last = this.#lastAvail;
    if (this.#shadowAvail === last) {
      const idx = Atomics.load(this.#avail, 1);
      if (((idx - last) & 0xffff) > this.size) {
        throw new VirtioError('AVAIL_IDX', `avail idx ${idx} is more than ${this.size} past ${last}`);
      }
      this.#shadowAvail = idx;
      if (idx === last) return null;
    }
    const head = this.#avail[2 + (last & this.#mask)]!;
    if (head >= this.size) throw new VirtioError('DESC_INDEX', `avail ring head ${head} is not below ${this.size}`);
    if (this.#chains[head] !== undefined) throw new VirtioError('ID_IN_USE', `head ${head} is already in flight`);
    const c = this.#walk(head);
    this.#lastAvail = (last + 1) & 0xffff;
    this.#track(c);
    this.#inflight?.begin(head);
    if (this.eventIdx && this.notify) this.#writeAvailEvent();
    return c;
  }

  #track(c: Chain): void {
    this.#chains[c.id] = c;
    this.own(c);
  }

  /** The chain at `head` in the descriptor table. */
  #walk(head: number): Chain {
    const c = this.take();
    c.id = head;
    c.slot = head;
    c.descCount = 1;
    const dv = this.#desc;
    let i = head;
    for (let visited = 1; ; visited++) {
      if (visited > this.size) throw new VirtioError('DESC_LOOP', `chain at head ${head} loops`);
      const off = i * 16;
      const addr = readAddr(dv, off);
      const len = dv.getUint32(off + 8, true);
      const flags = dv.getUint16(off + 12, true);
      if ((flags & DESC_F_INDIRECT) !== 0) {
        this.#walkIndirect(c, this.indirectTable(addr, len, flags));
        break;
      }
      this.addBuffer(c, addr, len, flags);
      if ((flags & DESC_F_NEXT) === 0) break;
      i = dv.getUint16(off + 14, true);
      if (i >= this.size) throw new VirtioError('DESC_INDEX', `next ${i} is not below ${this.size}`);
    }
    return c;
  }

  /** An indirect table: a chain of virtq_desc from entry 0, `next` indexing the table. */
  #walkIndirect(c: Chain, t: DataView): void {
    const entries = t.byteLength / 16;
    let i = 0;
    for (let visited = 1; ; visited++) {
      if (visited > entries) throw new VirtioError('DESC_LOOP', `indirect chain loops in a table of ${entries}`);
      const off = i * 16;
      const flags = this.indirectEntry(c, t, off, 12);
      if ((flags & DESC_F_NEXT) === 0) return;
      i = t.getUint16(off + 14, true);
      if (i >= entries) throw new VirtioError('DESC_INDEX', `indirect next ${i} is not below ${entries}`);
    }
  }

  #writeUsed(c: Chain, written: number, slot: number): void {
    this.logWritten(c, written);
    const off = 4 + 8 * slot;
    this.#used.setUint32(off, c.id, true);
    this.#used.setUint32(off + 4, written, true);
    this.logRing(this.#usedLog + off, 8);
    this.#inflight?.batchAdd(c.id);
  }

  /** Publishes `n` used elements: one used idx store, then the inflight batch is closed. */
  #publish(chains: readonly Chain[]): void {
    this.#usedIdx = (this.#usedIdx + chains.length) & 0xffff;
    Atomics.store(this.#used16, 1, this.#usedIdx);
    this.logRing(this.#usedLog + 2, 2);
    this.pushed += chains.length;
    for (const c of chains) {
      this.#inflight?.batchClear(c.id);
      this.#chains[c.id] = undefined;
    }
    this.#inflight?.batchDone(this.#usedIdx);
    for (const c of chains) this.release(c);
  }

  readonly #one: Chain[] = [];

  push(chain: DescChain, written: number): void {
    const c = this.checkUsed(chain, written);
    this.views();
    this.#writeUsed(c, written, this.#usedIdx & this.#mask);
    this.#one[0] = c;
    this.#publish(this.#one);
    this.#one.length = 0;
  }

  pushBatch(chains: readonly DescChain[], written: ArrayLike<number>): void {
    const cs = this.checkBatch(chains, written);
    if (cs.length === 0) return;
    this.views();
    for (let k = 0; k < cs.length; k++) this.#writeUsed(cs[k]!, written[k]!, (this.#usedIdx + k) & this.#mask);
    this.#publish(cs);
  }

  needsNotify(): boolean {
    const pushed = this.pushed;
    if (pushed === 0) return false;
    this.views();
    const old = this.#signalled;
    const valid = this.signalledValid;
    this.pushed = 0;
    this.#signalled = this.#usedIdx;
    this.signalledValid = true;
    if (!this.eventIdx) return (Atomics.load(this.#avail, 0) & AVAIL_F_NO_INTERRUPT) === 0;
    if (!valid || pushed >= 0x10000) return true;
    return vringNeedEvent(Atomics.load(this.#avail, 2 + this.size), this.#usedIdx, old);
  }

  #writeAvailEvent(): void {
    Atomics.store(this.#used16, 2 + 4 * this.size, this.#lastAvail);
    this.logRing(this.#usedLog + 4 + 8 * this.size, 2);
  }

  #writeUsedFlags(flags: number): void {
    Atomics.store(this.#used16, 0, flags);
    this.logRing(this.#usedLog, 2);
  }

  enableNotifications(): boolean {
    if (this.broken !== null) return false;
    this.views();
    this.notify = true;
    if (this.eventIdx) this.#writeAvailEvent();
    else this.#writeUsedFlags(0);
    // The store above and this load are sequentially consistent: a full barrier between them.
    return this.hasAvailable();
  }

  protected hasAvailable(): boolean {
    return Atomics.load(this.#avail, 1) !== this.#lastAvail;
  }

  disableNotifications(): void {
    this.notify = false;
    if (this.broken !== null || this.eventIdx) return;
    this.views();
    this.#writeUsedFlags(USED_F_NO_NOTIFY);
  }

  base(): number {
    return this.#lastAvail;
  }

  protected rebuild(head: number): Chain {
    if (head >= this.size) throw new VirtioError('INFLIGHT_LAYOUT', `inflight head ${head} is not below the ring size ${this.size}`);
    if (this.#chains[head] !== undefined) throw new VirtioError('ID_IN_USE', `head ${head} is already in flight`);
    const c = this.#walk(head);
    this.#track(c);
    return c;
  }
}
