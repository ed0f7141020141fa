/**
 * The device side of an IOMMU (VIRTIO_F_ACCESS_PLATFORM): an IOTLB of
 * IOVA -> front-end virtual address entries, as vhost-user's IOTLB_MSG UPDATE /
 * INVALIDATE give them, and the translation of a driver's buffer addresses
 * (IOVAs) into views of guest memory through it.
 *
 * A range the IOTLB does not cover with the access asked for throws IotlbMiss
 * (not a VirtioError: the queue is not broken, the chain is not taken; the
 * caller asks the front-end, vhost-user BACKEND_IOTLB_MSG MISS, and pops again
 * after the UPDATE). A covered range whose user addresses are not in guest
 * memory is the front-end's or guest's fault: VirtioError GPA_OUT_OF_RANGE.
 *
 * Model: DPDK's vhost IOTLB (lib/vhost/iotlb.c): a bounded cache, entries
 * replaced by overlapping updates, removed by overlapping invalidations.
 */
import type { GuestMemoryView, MemoryRegionInfo } from './types.js';
import { VirtioError, hex } from './errors.js';

/** struct vhost_iotlb_msg perm bits (VHOST_ACCESS_RO = 1, WO = 2, RW = 3). */
export const IOTLB_PERM_READ = 1;
export const IOTLB_PERM_WRITE = 2;

/** A translation the IOTLB lacks: `iova` with `perm` (1 read, 2 write, 3 both). */
export class IotlbMiss extends Error {
  readonly iova: number;
  readonly perm: number;
  constructor(iova: number, perm: number) {
    super(`IOTLB miss at IOVA ${hex(iova)} (${perm === IOTLB_PERM_WRITE ? 'write' : perm === IOTLB_PERM_READ ? 'read' : 'read-write'})`);
    this.name = 'IotlbMiss';
    this.iova = iova;
    this.perm = perm;
  }
}

/** Translates a queue's buffer addresses (DeviceQueueOptions.dma). */
export interface DmaTranslator {
  /**
   * Appends views of [addr, addr + length) to `out` (and the GPA of each view to `gpas`
   * when given), for reading or for writing. Throws IotlbMiss (nothing appended) when a
   * translation is missing, VirtioError when the range is not in guest memory.
   */
  map(addr: number, length: number, write: boolean, out: Uint8Array[], gpas: number[] | null): void;
}

export interface IotlbEntryInfo {
  iova: number;
  size: number;
  uaddr: number;
  perm: number;
}

interface Entry extends IotlbEntryInfo {
  end: number;
  seq: number;
}

export interface IotlbOptions {
  /** Entries kept at most (default 2048, DPDK's IOTLB_CACHE_SIZE); the oldest is dropped for a new one. */
  maxEntries?: number;
}

function safeRange(a: number, n: number): boolean {
  return Number.isSafeInteger(a) && Number.isSafeInteger(n) && a >= 0 && n >= 0 && Number.isSafeInteger(a + n);
}

export class Iotlb implements DmaTranslator {
  readonly memory: GuestMemoryView & { readonly regions: readonly MemoryRegionInfo[] };
  readonly maxEntries: number;
  /** Sorted by iova; never overlapping. */
  #entries: Entry[] = [];
  #seq = 0;
  #last = 0;
  /** Bumped by every change that can take a translation away (invalidate, replace, evict, clear). */
  generation = 0;
  /** Counters: updates applied, invalidations, entries evicted, misses thrown. */
  readonly stats = { updates: 0, invalidations: 0, evicted: 0, misses: 0 };

  constructor(memory: GuestMemoryView & { readonly regions: readonly MemoryRegionInfo[] }, options: IotlbOptions = {}) {
    this.memory = memory;
    const max = options.maxEntries ?? 2048;
    if (!Number.isInteger(max) || max < 1) throw new RangeError(`bad maxEntries ${String(max)}`);
    this.maxEntries = max;
  }

  get size(): number {
    return this.#entries.length;
  }

  /** The entries, sorted by IOVA (copies). */
  entries(): IotlbEntryInfo[] {
    return this.#entries.map(({ iova, size, uaddr, perm }) => ({ iova, size, uaddr, perm }));
  }

  /** IOTLB_MSG UPDATE: [iova, iova + size) is at uaddr with perm. Overlapped entries are replaced. */
  update(iova: number, size: number, uaddr: number, perm: number): void {
    if (!safeRange(iova, size) || !safeRange(uaddr, size) || size === 0) {
      throw new RangeError(`IOTLB update of [${String(iova)}, +${String(size)}) at ${String(uaddr)}: not a usable range`);
    }
    if (!Number.isInteger(perm) || perm < 1 || perm > 3) throw new RangeError(`IOTLB update with perm ${String(perm)}`);
    if (this.#remove(iova, iova + size) > 0) this.generation++;
    while (this.#entries.length >= this.maxEntries) this.#evictOldest();
    const e: Entry = { iova, size, uaddr, perm, end: iova + size, seq: this.#seq++ };
    const i = this.#lowerBound(iova);
    this.#entries.splice(i, 0, e);
    this.stats.updates++;
  }

  /** IOTLB_MSG INVALIDATE: every entry overlapping [iova, iova + size) goes. Returns how many. */
  invalidate(iova: number, size: number): number {
    if (!safeRange(iova, size)) throw new RangeError(`IOTLB invalidate of [${String(iova)}, +${String(size)}): not a usable range`);
    this.stats.invalidations++;
    const n = this.#remove(iova, iova + Math.max(size, 1));
    if (n > 0) this.generation++;
    return n;
  }

  clear(): void {
    if (this.#entries.length > 0) this.generation++;
    this.#entries = [];
    this.#last = 0;
  }

  /** The entry holding `iova`, or null. */
  #find(iova: number): Entry | null {
    const es = this.#entries;
    const hint = es[this.#last];
    if (hint !== undefined && iova >= hint.iova && iova < hint.end) return hint;
    let lo = 0;
    let hi = es.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      const e = es[mid]!;
      if (iova < e.iova) hi = mid - 1;
      else if (iova >= e.end) lo = mid + 1;
      else {
        this.#last = mid;
        return e;
      }
    }
    return null;
  }

  /** First index whose entry starts at or after iova. */
  #lowerBound(iova: number): number {
    let lo = 0;
    let hi = this.#entries.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.#entries[mid]!.iova < iova) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  #remove(start: number, end: number): number {
    const before = this.#entries.length;
    this.#entries = this.#entries.filter((e) => e.end <= start || e.iova >= end);
    this.#last = 0;
    return before - this.#entries.length;
  }

  #evictOldest(): void {
    let at = 0;
    for (let i = 1; i < this.#entries.length; i++) if (this.#entries[i]!.seq < this.#entries[at]!.seq) at = i;
    this.#entries.splice(at, 1);
    this.#last = 0;
    this.stats.evicted++;
    this.generation++;
  }

  /**
   * Calls `piece(uva, length)` for consecutive pieces of [iova, iova + length), each inside one
   * entry with `perm`. Throws IotlbMiss at the first byte not covered.
   */
  #walk(iova: number, length: number, perm: number, piece: (uva: number, n: number) => void): void {
    if (!safeRange(iova, length)) throw new VirtioError('GPA_OUT_OF_RANGE', `bad IOVA range ${String(iova)} + ${String(length)}`);
    let at = iova;
    let left = length;
    while (left > 0) {
      const e = this.#find(at);
      if (e === null || (e.perm & perm) !== perm) {
        this.stats.misses++;
        throw new IotlbMiss(at, perm);
      }
      const n = Math.min(left, e.end - at);
      piece(e.uaddr + (at - e.iova), n);
      at += n;
      left -= n;
    }
  }

  /**
   * The GPA runs of the user-address range [uva, uva + n), split where guest memory regions
   * end; VirtioError when a byte is in no region.
   */
  #gpaRuns(uva: number, n: number, run: (gpa: number, len: number) => void): void {
    const regions = this.memory.regions;
    let at = uva;
    let left = n;
    while (left > 0) {
      let found: MemoryRegionInfo | undefined;
      for (const r of regions) {
        if (at >= r.userAddr && at < r.userAddr + r.size) {
          found = r;
          break;
        }
      }
      if (found === undefined) {
        throw new VirtioError('GPA_OUT_OF_RANGE', `IOVA maps to user address ${hex(at)}, which is in no memory region`);
      }
      const take = Math.min(left, found.userAddr + found.size - at);
      run(found.guestPhysAddr + (at - found.userAddr), take);
      at += take;
      left -= take;
    }
  }

  map(addr: number, length: number, write: boolean, out: Uint8Array[], gpas: number[] | null): void {
    if (length === 0) return;
    // GPA runs first (a miss appends nothing), merged where they continue each other.
    const runs: number[] = [];
    this.#walk(addr, length, write ? IOTLB_PERM_WRITE : IOTLB_PERM_READ, (uva, n) =>
      this.#gpaRuns(uva, n, (gpa, len) => {
        const k = runs.length;
        if (k > 0 && runs[k - 2]! + runs[k - 1]! === gpa) runs[k - 1]! += len;
        else runs.push(gpa, len);
      }),
    );
    for (let k = 0; k < runs.length; k += 2) {
      const gpa = runs[k]!;
      const len = runs[k + 1]!;
      const v = this.memory.view(gpa, len);
      if (v !== null) {
        out.push(v);
        gpas?.push(gpa);
        continue;
      }
      let g = gpa;
      for (const s of this.memory.slices(gpa, len)) {
        out.push(s);
        gpas?.push(g);
        g += s.length;
      }
    }
  }

  /**
   * The GPA of a ring at [iova, iova + length) with `perm`: the range must be one run of
   * guest memory (as a ring's views are). IotlbMiss when a translation is missing,
   * VirtioError RING_LAYOUT when the range is not contiguous guest memory.
   */
  ringGpa(iova: number, length: number, perm: number): number {
    let start = -1;
    let next = -1;
    this.#walk(iova, length, perm, (uva, n) =>
      this.#gpaRuns(uva, n, (gpa, len) => {
        if (start < 0) start = gpa;
        else if (gpa !== next) throw new VirtioError('RING_LAYOUT', `ring at IOVA ${hex(iova)} (+${length}) is not contiguous in guest memory`);
        next = gpa + len;
      }),
    );
    if (start < 0) throw new VirtioError('RING_LAYOUT', `empty ring at IOVA ${hex(iova)}`);
    return start;
  }
}
