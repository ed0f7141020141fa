/**
 * Guest memory as a set of regions (vhost-user SET_MEM_TABLE / ADD_MEM_REG),
 * each backed by a Uint8Array (a mapped memfd in production, a plain buffer in
 * tests), and the dirty-page log of SET_LOG_BASE.
 *
 * Every lookup is bounds-checked: an address range is served only when each of
 * its bytes lies in a region; addresses and lengths must be safe integers.
 */
import type { GuestMemoryView, MemoryRegionInfo } from './types.js';
import { VirtioError, hex } from './errors.js';

interface Region {
  readonly info: MemoryRegionInfo;
  readonly bytes: Uint8Array;
  readonly release: (() => void) | undefined;
  readonly gpa: number;
  readonly gpaEnd: number;
  readonly uva: number;
  readonly uvaEnd: number;
}

const EMPTY = new Uint8Array(0);

function checkRange(what: 'GPA_OUT_OF_RANGE' | 'UVA_OUT_OF_RANGE', addr: number, length: number): void {
  if (
    !Number.isSafeInteger(addr) ||
    !Number.isSafeInteger(length) ||
    addr < 0 ||
    length < 0 ||
    !Number.isSafeInteger(addr + length)
  ) {
    throw new VirtioError(what, `bad address range ${String(addr)} + ${String(length)}`);
  }
}

function outOfRange(gpa: number, length: number): VirtioError {
  return new VirtioError('GPA_OUT_OF_RANGE', `[${hex(gpa)}, +${length}) is not inside guest memory`);
}

export class GuestMemory implements GuestMemoryView {
  /** Sorted by guest-physical address. */
  #regions: Region[] = [];
  #infos: readonly MemoryRegionInfo[] = Object.freeze([]);
  #generation = 0;
  /** Index of the region the last lookup hit (lookups cluster). */
  #last = 0;

  get generation(): number {
    return this.#generation;
  }

  /** The regions, sorted by guest-physical address (copies; frozen). */
  get regions(): readonly MemoryRegionInfo[] {
    return this.#infos;
  }

  /**
   * Adds a region; `bytes` is its memory (length === info.size). `release` is
   * called when the region is removed (unmap it there).
   */
  add(info: MemoryRegionInfo, bytes: Uint8Array, release?: () => void): void {
    const { guestPhysAddr: gpa, size, userAddr: uva, mmapOffset } = info;
    checkRange('GPA_OUT_OF_RANGE', gpa, size);
    checkRange('UVA_OUT_OF_RANGE', uva, size);
    if (size === 0) throw new RangeError('a memory region cannot be empty');
    if (!Number.isSafeInteger(mmapOffset) || mmapOffset < 0) throw new RangeError(`bad mmap offset ${mmapOffset}`);
    if (bytes.length !== size) throw new RangeError(`region of ${size} bytes given ${bytes.length} bytes of memory`);
    for (const r of this.#regions) {
      if (gpa < r.gpaEnd && r.gpa < gpa + size) {
        throw new VirtioError('REGION_OVERLAP', `GPA [${hex(gpa)}, +${hex(size)}) overlaps [${hex(r.gpa)}, ${hex(r.gpaEnd)})`);
      }
      if (uva < r.uvaEnd && r.uva < uva + size) {
        throw new VirtioError('REGION_OVERLAP', `UVA [${hex(uva)}, +${hex(size)}) overlaps [${hex(r.uva)}, ${hex(r.uvaEnd)})`);
      }
    }
    const region: Region = {
      info: Object.freeze({ guestPhysAddr: gpa, size, userAddr: uva, mmapOffset }),
      bytes,
      release,
      gpa,
      gpaEnd: gpa + size,
      uva,
      uvaEnd: uva + size,
    };
    let i = 0;
    while (i < this.#regions.length && this.#regions[i]!.gpa < gpa) i++;
    this.#regions.splice(i, 0, region);
    this.#changed();
  }

  /** Removes the region with this GPA, size and UVA (calls its release). False when there is none. */
  remove(match: { guestPhysAddr: number; size: number; userAddr: number }): boolean {
    const i = this.#regions.findIndex(
      (r) => r.gpa === match.guestPhysAddr && r.info.size === match.size && r.uva === match.userAddr,
    );
    if (i < 0) return false;
    const [region] = this.#regions.splice(i, 1);
    this.#changed();
    region!.release?.();
    return true;
  }

  /** Removes every region (calls every release; the first error is thrown after all ran). */
  clear(): void {
    const old = this.#regions;
    this.#regions = [];
    this.#changed();
    let first: unknown = null;
    for (const r of old) {
      try {
        r.release?.();
      } catch (err) {
        first ??= err;
      }
    }
    if (first !== null) throw first;
  }

  #changed(): void {
    this.#infos = Object.freeze(this.#regions.map((r) => r.info));
    this.#generation++;
    this.#last = 0;
  }

  /** The index of the region holding `gpa`, or -1. */
  #find(gpa: number): number {
    const regions = this.#regions;
    const hint = regions[this.#last];
    if (hint !== undefined && gpa >= hint.gpa && gpa < hint.gpaEnd) return this.#last;
    let lo = 0;
    let hi = regions.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      const r = regions[mid]!;
      if (gpa < r.gpa) hi = mid - 1;
      else if (gpa >= r.gpaEnd) lo = mid + 1;
      else {
        this.#last = mid;
        return mid;
      }
    }
    return -1;
  }

  /**
   * Checks that [gpa, gpa + length) is covered by consecutive regions starting
   * with region `i`; returns how many regions it spans.
   */
  #span(i: number, gpa: number, length: number): number {
    const end = gpa + length;
    let n = 1;
    let covered = this.#regions[i]!.gpaEnd;
    while (covered < end) {
      const next = this.#regions[i + n];
      if (next === undefined || next.gpa !== covered) throw outOfRange(gpa, length);
      covered = next.gpaEnd;
      n++;
    }
    return n;
  }

  view(gpa: number, length: number): Uint8Array | null {
    checkRange('GPA_OUT_OF_RANGE', gpa, length);
    if (length === 0) return EMPTY;
    const i = this.#find(gpa);
    if (i < 0) throw outOfRange(gpa, length);
    const r = this.#regions[i]!;
    const off = gpa - r.gpa;
    if (gpa + length <= r.gpaEnd) return r.bytes.subarray(off, off + length);
    this.#span(i, gpa, length);
    return null;
  }

  slices(gpa: number, length: number): Uint8Array[] {
    checkRange('GPA_OUT_OF_RANGE', gpa, length);
    if (length === 0) return [];
    const i = this.#find(gpa);
    if (i < 0) throw outOfRange(gpa, length);
    const n = this.#span(i, gpa, length);
    const out: Uint8Array[] = [];
    let at = gpa;
    let left = length;
    for (let k = 0; k < n; k++) {
      const r = this.#regions[i + k]!;
      const off = at - r.gpa;
      const take = Math.min(left, r.info.size - off);
      out.push(r.bytes.subarray(off, off + take));
      at += take;
      left -= take;
    }
    return out;
  }

  uvaToGpa(uva: number, length: number): number {
    checkRange('UVA_OUT_OF_RANGE', uva, length);
    for (const r of this.#regions) {
      if (uva >= r.uva && uva < r.uvaEnd && uva + length <= r.uvaEnd) return r.gpa + (uva - r.uva);
    }
    throw new VirtioError('UVA_OUT_OF_RANGE', `UVA [${hex(uva)}, +${length}) is not inside one region`);
  }

  /** A copy of [gpa, gpa + length), across regions. */
  read(gpa: number, length: number): Uint8Array {
    const out = new Uint8Array(length);
    let at = 0;
    for (const s of this.slices(gpa, length)) {
      out.set(s, at);
      at += s.length;
    }
    return out;
  }

  /** Writes `data` at `gpa`, across regions (nothing is written when any byte is outside memory). */
  write(gpa: number, data: Uint8Array): void {
    let at = 0;
    for (const s of this.slices(gpa, data.length)) {
      s.set(data.subarray(at, at + s.length));
      at += s.length;
    }
  }
}

/** VHOST_LOG_PAGE: the log has one bit per 4 KiB guest page. */
export const LOG_PAGE_SIZE = 4096;

/**
 * The dirty-page log of vhost-user SET_LOG_BASE: bit (page % 8) of byte
 * (page / 8), page = gpa / 4096, starting at GPA 0. The front-end reads and
 * clears it concurrently, so bits are set with Atomics.or (which works on
 * non-shared buffers too, such as the external ArrayBuffer of an mmap).
 * Pages past the end of the log are not marked; they are counted in `overflow`.
 */
export class DirtyLog {
  readonly bytes: Uint8Array;
  /** Pages asked to be marked that lie past the end of the log. */
  overflow = 0;

  constructor(bytes: Uint8Array) {
    this.bytes = bytes;
  }

  /** Marks every page [gpa, gpa + length) touches. Length 0 marks nothing. */
  mark(gpa: number, length: number): void {
    if (length <= 0) return;
    checkRange('GPA_OUT_OF_RANGE', gpa, length);
    const bytes = this.bytes;
    let page = Math.floor(gpa / LOG_PAGE_SIZE);
    const last = Math.floor((gpa + length - 1) / LOG_PAGE_SIZE);
    while (page <= last) {
      const byte = Math.floor(page / 8);
      if (byte >= bytes.length) {
        this.overflow += last - page + 1;
        return;
      }
      const bit = page % 8;
      if (bit === 0 && last - page >= 7) {
        Atomics.or(bytes, byte, 0xff);
        page += 8;
      } else {
        Atomics.or(bytes, byte, 1 << bit);
        page++;
      }
    }
  }
}
