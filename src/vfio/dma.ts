/**
 * The DMA map table of a device: the IOVA windows the client mapped, with the
 * IOMMU type1 rules (vfio_iommu_type1.c) and the vfio-user ones
 * (libvfio-user lib/dma.c), translation of IOVA ranges, unmap notification,
 * and dirty page logging.
 *
 * Addresses, sizes and offsets are numbers: every range must lie below 2^53
 * (guest physical addresses do; x86-64 stops at 2^52). A map or lookup past
 * that fails with EINVAL rather than lose precision.
 *
 * Errno choices where the sources disagree (see DmaErrnoStyle):
 * - overlap with an existing mapping: the vfio-user spec and the kernel say
 *   EEXIST, libvfio-user replies EINVAL;
 * - too many mappings: the kernel says ENOSPC, libvfio-user EINVAL.
 * The default is 'spec' (EEXIST, ENOSPC). A mapping larger than the per-map
 * limit is ENOSPC in both.
 */
import { Errno, VfioError, invalid } from './errors.js';
import { DmaMapFlag, DmaUnmapFlag } from './uapi.js';

/** Which errnos to reply with where the spec and libvfio-user differ. */
export type DmaErrnoStyle = 'spec' | 'libvfio-user';

export interface DmaMapTableOptions {
  /** Alignment of iova, size and offset: a power of two (default 4096; 1 disables the check). */
  pageSize?: number;
  /** Most mappings at once (default 65535, the spec's max_dma_maps default and the kernel's dma_entry_limit). */
  maxMaps?: number;
  /** Largest single mapping in bytes (default 8 TiB, libvfio-user's MAX_DMA_SIZE). */
  maxMapSize?: number;
  /** Errnos for overlap and too many maps (default 'spec'). */
  errnoStyle?: DmaErrnoStyle;
  /** Reject a map without READ or WRITE, as the kernel does (default false: libvfio-user accepts it). */
  requireProt?: boolean;
  /** Equality of handles for the identical re-map check (default Object.is). */
  sameHandle?: (a: unknown, b: unknown) => boolean;
  /** Largest bitmap report() will build, in bytes (default 256 MiB, QEMU's max_bitmap_size). */
  maxBitmapBytes?: number;
}

/** A DMA_MAP request. */
export interface DmaMapRequest<H> {
  iova: number;
  size: number;
  /** DmaMapFlag bits (READ, WRITE); protocol-specific bits must be stripped by the caller. */
  prot: number;
  /** Offset into the backing file (0 when the mapping has no fd). */
  offset: number;
  /** Whatever the server keeps for the mapping: an fd, a mapped view, or nothing (message-based DMA). */
  handle: H;
}

/** A mapping in the table. */
export interface DmaRegion<H> {
  readonly iova: number;
  readonly size: number;
  readonly prot: number;
  readonly offset: number;
  readonly handle: H;
}

/** One piece of a translated IOVA range: a run inside one mapping. */
export interface DmaSegment<H> {
  region: DmaRegion<H>;
  /** IOVA of the run's first byte. */
  iova: number;
  length: number;
  /** Offset of the run from the start of the mapping. */
  regionOffset: number;
  /** Offset of the run in the backing file: region.offset + regionOffset. */
  fileOffset: number;
}

interface Entry<H> extends DmaRegion<H> {
  /** The frozen public view handed out for this mapping (made once, so lookups do not allocate it). */
  view: DmaRegion<H>;
  /** Dirty log while logging is on: one bit per logging page, pages counted from dirtyBase. */
  dirty: Uint8Array | undefined;
  dirtyBase: number;
}

export type UnmapListener<H> = (region: DmaRegion<H>) => void;

const LIMIT = Number.MAX_SAFE_INTEGER + 1; // 2^53: exclusive end of the address space we can represent
const MIN_LOG_PAGE = 4096;

const isPow2 = (n: number): boolean => Number.isSafeInteger(n) && n > 0 && 2 ** Math.round(Math.log2(n)) === n;

const isU64Safe = (n: number): boolean => Number.isSafeInteger(n) && n >= 0;

function checkRange(iova: number, size: number, what: string): void {
  if (!isU64Safe(iova) || !isU64Safe(size)) throw invalid('DMA_BAD_RANGE', `${what}: iova and size must be integers below 2^53`);
  if (iova + size > LIMIT) throw invalid('DMA_RANGE_OVERFLOW', `${what}: [${iova}, +${size}) ends past 2^53`);
}

/**
 * The DMA map table. H is the server's per-mapping handle type.
 *
 * Mappings are kept sorted by IOVA and never overlap, so every lookup is a
 * binary search.
 */
export class DmaMapTable<H = unknown> {
  readonly pageSize: number;
  readonly maxMaps: number;
  readonly maxMapSize: number;
  readonly errnoStyle: DmaErrnoStyle;
  readonly #requireProt: boolean;
  readonly #sameHandle: (a: unknown, b: unknown) => boolean;
  readonly #maxBitmapBytes: number;
  readonly #entries: Entry<H>[] = [];
  readonly #listeners = new Set<UnmapListener<H>>();
  #logPageSize = 0;

  constructor(options: DmaMapTableOptions = {}) {
    this.pageSize = options.pageSize ?? 4096;
    this.maxMaps = options.maxMaps ?? 65535;
    this.maxMapSize = options.maxMapSize ?? 8 * 2 ** 40;
    this.errnoStyle = options.errnoStyle ?? 'spec';
    this.#requireProt = options.requireProt ?? false;
    this.#sameHandle = options.sameHandle ?? Object.is;
    this.#maxBitmapBytes = options.maxBitmapBytes ?? 256 * 2 ** 20;
    if (!isPow2(this.pageSize)) throw new RangeError(`pageSize must be a power of two, got ${this.pageSize}`);
    if (!Number.isSafeInteger(this.maxMaps) || this.maxMaps < 0) throw new RangeError(`bad maxMaps ${this.maxMaps}`);
    if (!isU64Safe(this.maxMapSize)) throw new RangeError(`bad maxMapSize ${this.maxMapSize}`);
  }

  /** Number of mappings. */
  get size(): number {
    return this.#entries.length;
  }

  /** The mappings, in IOVA order. */
  regions(): DmaRegion<H>[] {
    return this.#entries.map((e) => this.#view(e));
  }

  /**
   * Adds a mapping. Rules: prot only READ|WRITE (and non-zero with
   * requireProt); size > 0; iova, size and offset aligned to pageSize; the
   * range below 2^53 and offset + size too; size <= maxMapSize (ENOSPC). The
   * identical mapping again (same iova, size, offset, prot and handle) is
   * accepted and changes nothing, as in libvfio-user; any other overlap is
   * EEXIST (EINVAL in 'libvfio-user' style). More than maxMaps mappings is
   * ENOSPC (EINVAL). Returns the mapping and whether it was new.
   */
  map(req: DmaMapRequest<H>): { region: DmaRegion<H>; added: boolean } {
    const { iova, size, prot, offset } = req;
    if (!Number.isInteger(prot) || (prot & ~(DmaMapFlag.READ | DmaMapFlag.WRITE)) !== 0) {
      throw invalid('DMA_MAP_BAD_FLAGS', `unknown DMA map flags ${prot}`);
    }
    if (this.#requireProt && prot === 0) throw invalid('DMA_MAP_NO_PROT', 'a mapping needs READ or WRITE');
    checkRange(iova, size, 'map');
    if (size === 0) throw invalid('DMA_MAP_EMPTY', 'a mapping needs a non-zero size');
    if (!isU64Safe(offset) || offset + size > LIMIT) throw invalid('DMA_RANGE_OVERFLOW', `offset ${offset} + size ${size} ends past 2^53`);
    if (iova % this.pageSize !== 0 || size % this.pageSize !== 0 || offset % this.pageSize !== 0) {
      throw invalid('DMA_MAP_UNALIGNED', `iova, size and offset must be multiples of ${this.pageSize}`);
    }
    if (size > this.maxMapSize) {
      throw new VfioError('DMA_MAP_TOO_LARGE', Errno.ENOSPC, `mapping of ${size} bytes exceeds the ${this.maxMapSize}-byte limit`);
    }
    const at = this.#firstEndingAfter(iova);
    const existing = this.#entries[at];
    if (existing !== undefined && existing.iova < iova + size) {
      if (
        existing.iova === iova &&
        existing.size === size &&
        existing.offset === offset &&
        existing.prot === prot &&
        this.#sameHandle(existing.handle, req.handle)
      ) {
        return { region: this.#view(existing), added: false };
      }
      throw new VfioError(
        'DMA_MAP_OVERLAP',
        this.errnoStyle === 'spec' ? Errno.EEXIST : Errno.EINVAL,
        `[${iova}, +${size}) overlaps the mapping [${existing.iova}, +${existing.size})`,
      );
    }
    if (this.#entries.length >= this.maxMaps) {
      throw new VfioError(
        'DMA_MAP_LIMIT',
        this.errnoStyle === 'spec' ? Errno.ENOSPC : Errno.EINVAL,
        `already ${this.#entries.length} mappings (max ${this.maxMaps})`,
      );
    }
    const view: DmaRegion<H> = Object.freeze({ iova, size, prot, offset, handle: req.handle });
    const entry: Entry<H> = { iova, size, prot, offset, handle: req.handle, view, dirty: undefined, dirtyBase: 0 };
    if (this.#logPageSize !== 0) this.#startLog(entry);
    this.#entries.splice(at, 0, entry);
    return { region: this.#view(entry), added: true };
  }

  /**
   * Removes mappings and notifies every onUnmap listener of each. Without
   * DmaUnmapFlag.ALL the range must match one mapping exactly (a partial or
   * unknown range is ENOENT). With ALL, iova and size must be 0 (else EINVAL)
   * and every mapping goes. Other flag bits are EINVAL (the legacy
   * GET_DIRTY_BITMAP is the caller's: call report() first, then unmap).
   * Returns the removed mappings.
   */
  unmap(iova: number, size: number, flags = 0): DmaRegion<H>[] {
    if (!Number.isInteger(flags) || (flags & ~DmaUnmapFlag.ALL) !== 0) {
      throw invalid('DMA_UNMAP_BAD_FLAGS', `unsupported DMA unmap flags ${flags}`);
    }
    if ((flags & DmaUnmapFlag.ALL) !== 0) {
      if (iova !== 0 || size !== 0) throw invalid('DMA_UNMAP_ALL_RANGE', 'UNMAP_ALL needs iova 0 and size 0');
      return this.unmapAll();
    }
    const at = this.#firstEndingAfter(iova);
    const e = this.#entries[at];
    if (e === undefined || e.iova !== iova || e.size !== size) {
      throw new VfioError('DMA_UNMAP_NOT_FOUND', Errno.ENOENT, `no mapping is exactly [${iova}, +${size})`);
    }
    this.#entries.splice(at, 1);
    const removed = [this.#view(e)];
    this.#notify(removed);
    return removed;
  }

  /** Removes every mapping (client disconnect, UNMAP_ALL) and notifies the listeners of each. */
  unmapAll(): DmaRegion<H>[] {
    const removed = this.#entries.splice(0).map((e) => this.#view(e));
    this.#notify(removed);
    return removed;
  }

  /**
   * Registers a listener told of every removed mapping, after it left the
   * table and before unmap() returns (so before the server replies), like the
   * kernel's IOMMU unmap notifier. Returns the function that unregisters it.
   * A throwing listener does not stop the others; the first error is
   * rethrown once all were called (the table is already updated).
   */
  onUnmap(listener: UnmapListener<H>): () => void {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }

  /** The mapping containing iova, if any. */
  find(iova: number): DmaRegion<H> | undefined {
    const e = this.#entries[this.#firstEndingAfter(iova)];
    return e !== undefined && e.iova <= iova ? this.#view(e) : undefined;
  }

  /**
   * Translates [iova, iova + length) into runs inside consecutive mappings.
   * The whole range must be mapped: a gap anywhere is ENOENT (never a
   * partial answer). With `prot`, every mapping must allow it (EACCES).
   * length 0 gives no runs.
   */
  lookup(iova: number, length: number, prot = 0): DmaSegment<H>[] {
    checkRange(iova, length, 'lookup');
    const segments: DmaSegment<H>[] = [];
    let at = this.#firstEndingAfter(iova);
    let cur = iova;
    const end = iova + length;
    while (cur < end) {
      const e = this.#entries[at];
      if (e === undefined || e.iova > cur) {
        throw new VfioError('DMA_NOT_MAPPED', Errno.ENOENT, `IOVA ${cur} (in [${iova}, +${length})) is not mapped`);
      }
      if ((e.prot & prot) !== prot) {
        throw new VfioError('DMA_ACCESS', Errno.EACCES, `mapping [${e.iova}, +${e.size}) does not allow prot ${prot}`);
      }
      const n = Math.min(e.iova + e.size, end) - cur;
      const regionOffset = cur - e.iova;
      segments.push({ region: this.#view(e), iova: cur, length: n, regionOffset, fileOffset: e.offset + regionOffset });
      cur += n;
      at++;
    }
    return segments;
  }

  /**
   * Translates a range that must lie inside a single mapping (the common
   * case of a descriptor or a queue): ENOENT if unmapped, EACCES on prot,
   * and ENOENT too when the range continues into another mapping.
   */
  translate(iova: number, length: number, prot = 0): DmaSegment<H> {
    checkRange(iova, length, 'translate');
    const e = this.#entries[this.#firstEndingAfter(iova)];
    if (e === undefined || e.iova > iova || iova + length > e.iova + e.size) {
      throw new VfioError('DMA_NOT_MAPPED', Errno.ENOENT, `[${iova}, +${length}) is not inside one mapping`);
    }
    if ((e.prot & prot) !== prot) {
      throw new VfioError('DMA_ACCESS', Errno.EACCES, `mapping [${e.iova}, +${e.size}) does not allow prot ${prot}`);
    }
    const regionOffset = iova - e.iova;
    return { region: this.#view(e), iova, length, regionOffset, fileOffset: e.offset + regionOffset };
  }

  /** The logging page size, or 0 when dirty logging is off. */
  get loggingPageSize(): number {
    return this.#logPageSize;
  }

  /**
   * Starts dirty page logging with the given page size: a power of two of at
   * least 4096 (EINVAL otherwise). Starting again with the same size does
   * nothing; with another size it is EINVAL (as libvfio-user: the size stays
   * fixed while logging). Mappings added while logging get a log too.
   */
  startLogging(pageSize: number): void {
    if (!isPow2(pageSize) || pageSize < MIN_LOG_PAGE) {
      throw invalid('DMA_LOG_BAD_PAGE_SIZE', `logging page size must be a power of two >= ${MIN_LOG_PAGE}, got ${pageSize}`);
    }
    if (this.#logPageSize !== 0) {
      if (this.#logPageSize !== pageSize) {
        throw invalid('DMA_LOG_PAGE_SIZE_CHANGED', `logging already runs with page size ${this.#logPageSize}`);
      }
      return;
    }
    this.#logPageSize = pageSize;
    try {
      for (const e of this.#entries) this.#startLog(e);
    } catch (err) {
      this.stopLogging();
      throw err;
    }
  }

  /** Stops dirty page logging and drops the logs (a no-op when not logging). */
  stopLogging(): void {
    this.#logPageSize = 0;
    for (const e of this.#entries) e.dirty = undefined;
  }

  /**
   * Records a device write to [iova, iova + length): every logging page it
   * touches, in every mapping it touches, becomes dirty. Unmapped parts are
   * ignored; nothing happens when logging is off.
   */
  markDirty(iova: number, length: number): void {
    if (this.#logPageSize === 0 || length === 0) return;
    checkRange(iova, length, 'markDirty');
    const P = this.#logPageSize;
    const end = iova + length;
    for (let at = this.#firstEndingAfter(iova); at < this.#entries.length; at++) {
      const e = this.#entries[at]!;
      if (e.iova >= end) break;
      const from = Math.max(iova, e.iova);
      const to = Math.min(end, e.iova + e.size);
      const first = Math.floor(from / P) - e.dirtyBase;
      const last = Math.floor((to - 1) / P) - e.dirtyBase;
      for (let p = first; p <= last; p++) setBit(e.dirty!, p);
    }
  }

  /**
   * DMA_LOGGING_REPORT: the dirty bitmap of [iova, iova + length) at
   * `pageSize` granularity, and the log is cleared for the range.
   *
   * Bit i (LSB-first inside each little-endian u64, so byte i >> 3, bit i & 7)
   * covers [iova + i * pageSize, iova + (i + 1) * pageSize) and is set when
   * any logged page overlapping it is dirty. The result is
   * ceil(length / pageSize) bits rounded up to whole u64s. Parts of the range
   * that are not mapped read as clean. Clearing takes only the logged pages
   * that lie wholly inside the range: a page that straddles its edge stays
   * dirty and is reported again next time (reporting too much is safe,
   * losing a dirty page is not).
   *
   * Errors: logging off, or pageSize not a power of two >= 4096, EINVAL
   * (the kernel's rules); a range past 2^53, EOVERFLOW; a bitmap larger than
   * maxBitmapBytes, E2BIG.
   */
  report(iova: number, length: number, pageSize: number): Uint8Array {
    if (this.#logPageSize === 0) throw invalid('DMA_LOG_NOT_STARTED', 'dirty page logging is not started');
    if (!isPow2(pageSize) || pageSize < MIN_LOG_PAGE) {
      throw invalid('DMA_LOG_BAD_PAGE_SIZE', `report page size must be a power of two >= ${MIN_LOG_PAGE}, got ${pageSize}`);
    }
    if (!isU64Safe(iova) || !isU64Safe(length) || iova + length > LIMIT) {
      throw new VfioError('DMA_RANGE_OVERFLOW', Errno.EOVERFLOW, `report range [${iova}, +${length}) ends past 2^53`);
    }
    const bits = Math.ceil(length / pageSize);
    const bytes = Math.ceil(bits / 64) * 8;
    if (bytes > this.#maxBitmapBytes) {
      throw new VfioError('DMA_BITMAP_TOO_LARGE', Errno.E2BIG, `bitmap of ${bytes} bytes exceeds ${this.#maxBitmapBytes}`);
    }
    const out = new Uint8Array(bytes);
    const P = this.#logPageSize;
    const end = iova + length;
    for (let at = this.#firstEndingAfter(iova); at < this.#entries.length; at++) {
      const e = this.#entries[at]!;
      if (e.iova >= end) break;
      const log = e.dirty!;
      const from = Math.max(iova, e.iova);
      const to = Math.min(end, e.iova + e.size);
      const first = Math.floor(from / P);
      const last = Math.floor((to - 1) / P);
      for (let page = first; page <= last; page++) {
        const idx = page - e.dirtyBase;
        if (idx % 8 === 0 && log[idx / 8] === 0) {
          page += 7; // a clean byte: skip its eight pages
          continue;
        }
        if (!getBit(log, idx)) continue;
        const pStart = Math.max(page * P, from);
        const pEnd = Math.min((page + 1) * P, to);
        const b0 = Math.floor((pStart - iova) / pageSize);
        const b1 = Math.floor((pEnd - 1 - iova) / pageSize);
        for (let b = b0; b <= b1; b++) setBit(out, b);
        if (page * P >= iova && (page + 1) * P <= end) clearBit(log, idx);
      }
    }
    return out;
  }

  #startLog(e: Entry<H>): void {
    const P = this.#logPageSize;
    e.dirtyBase = Math.floor(e.iova / P);
    const pages = Math.floor((e.iova + e.size - 1) / P) - e.dirtyBase + 1;
    e.dirty = new Uint8Array(Math.ceil(pages / 8));
  }

  #notify(removed: DmaRegion<H>[]): void {
    let first: { err: unknown } | undefined;
    for (const r of removed) {
      for (const l of [...this.#listeners]) {
        try {
          l(r);
        } catch (err) {
          first ??= { err };
        }
      }
    }
    if (first) throw first.err;
  }

  /** Index of the first mapping whose end is past iova (the one containing it, or the next). */
  #firstEndingAfter(iova: number): number {
    let lo = 0;
    let hi = this.#entries.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      const e = this.#entries[mid]!;
      if (e.iova + e.size <= iova) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  #view(e: Entry<H>): DmaRegion<H> {
    return e.view;
  }
}

function setBit(bits: Uint8Array, i: number): void {
  const j = Math.floor(i / 8);
  bits[j] = (bits[j] ?? 0) | (1 << (i % 8));
}

function clearBit(bits: Uint8Array, i: number): void {
  const j = Math.floor(i / 8);
  bits[j] = (bits[j] ?? 0) & ~(1 << (i % 8));
}

function getBit(bits: Uint8Array, i: number): boolean {
  return ((bits[Math.floor(i / 8)] ?? 0) & (1 << (i % 8))) !== 0;
}
