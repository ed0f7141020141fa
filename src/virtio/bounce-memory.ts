/**
 * Guest memory for the ring engine where part of it is reached only by
 * asynchronous copies (vfio-user DMA windows mapped without an fd: DMA_READ /
 * DMA_WRITE messages). The engine is synchronous: it asks for views while it
 * walks a chain. BounceMemory answers from the directly mapped memory where it
 * can; for a range in a copy-only window it answers from a bounce buffer
 * fetched earlier, and when there is none yet it throws BounceMiss with every
 * such range of that call. The caller (the transport) fetches them, fills them
 * in with fill(), and pops again: the engine's pop is restartable after a
 * throw that is not a VirtioError (nothing advanced, the queue not broken).
 * After a pop succeeds, claim() hands the chain the bounce buffers it uses;
 * the device reads and writes them like guest memory, and the transport
 * writes the device-writable ones back (gpaOf) before the chain is pushed.
 *
 * Bounds: the bytes held in bounce buffers (fetched and not yet released)
 * are capped (`limit`): a chain that would pass it while others hold bounce
 * buffers waits (BounceMiss with `wait`), one that alone is larger is refused
 * (VirtioError LENGTH_OVERFLOW, which breaks the queue).
 */
import type { GuestMemoryView } from './types.js';
import { VirtioError, hex } from './errors.js';

/** A window reached by copies only. */
export interface CopyWindow {
  readonly iova: number;
  readonly size: number;
}

/** Ranges the engine needs that are not fetched yet (not a VirtioError: the queue is not broken). */
export class BounceMiss extends Error {
  readonly ranges: readonly { gpa: number; length: number }[];
  /** True when the bounce budget is used by chains in flight: retry once one completes. */
  readonly wait: boolean;

  constructor(ranges: { gpa: number; length: number }[], wait: boolean) {
    super(wait ? 'bounce budget in use: waiting for completions' : `${ranges.length} range(s) to fetch`);
    this.name = 'BounceMiss';
    this.ranges = ranges;
    this.wait = wait;
  }
}

const EMPTY = new Uint8Array(0);

/** The directly mapped memory: a GuestMemoryView with its regions (GuestMemory is one). */
export interface DirectMemory extends GuestMemoryView {
  readonly regions: readonly { guestPhysAddr: number; size: number }[];
}

export class BounceMemory implements GuestMemoryView {
  readonly #direct: DirectMemory;
  readonly #windows: () => readonly CopyWindow[];
  readonly #generation: () => number;
  readonly limit: number;
  /** Fetched ranges not yet claimed by a chain, by "gpa:length". */
  readonly #cache = new Map<string, Uint8Array>();
  readonly #gpa = new WeakMap<Uint8Array, number>();
  /** Bytes in bounce buffers fetched and not released. */
  #bytes = 0;

  constructor(direct: DirectMemory, windows: () => readonly CopyWindow[], generation: () => number, limit: number) {
    if (!Number.isSafeInteger(limit) || limit < 1) throw new RangeError(`bounce limit ${limit}`);
    this.#direct = direct;
    this.#windows = windows;
    this.#generation = generation;
    this.limit = limit;
  }

  get generation(): number {
    return this.#generation();
  }

  /** Bytes held in bounce buffers now. */
  get bytes(): number {
    return this.#bytes;
  }

  view(gpa: number, length: number): Uint8Array | null {
    if (this.#windows().length === 0) return this.#direct.view(gpa, length);
    const p = this.#pieces(gpa, length);
    return p.length === 0 ? EMPTY : p.length === 1 ? p[0]! : null;
  }

  slices(gpa: number, length: number): Uint8Array[] {
    if (this.#windows().length === 0) return this.#direct.slices(gpa, length);
    return this.#pieces(gpa, length);
  }

  uvaToGpa(uva: number): number {
    return uva;
  }

  /** The guest address of a bounce buffer handed out, or undefined for direct memory. */
  gpaOf(bytes: Uint8Array): number | undefined {
    return this.#gpa.get(bytes);
  }

  /** A fetched range (its length must be the one the miss gave). */
  fill(gpa: number, bytes: Uint8Array): void {
    const key = `${gpa}:${bytes.length}`;
    if (this.#cache.has(key)) return;
    this.#cache.set(key, bytes);
    this.#gpa.set(bytes, gpa);
    this.#bytes += bytes.length;
  }

  /** After a successful pop: the bounce buffers fetched for it, now the chain's (release them when it completes). */
  claim(): Uint8Array[] {
    const out = [...this.#cache.values()];
    this.#cache.clear();
    return out;
  }

  /** Gives back the bytes of claimed buffers. */
  release(buffers: readonly Uint8Array[]): void {
    for (const b of buffers) this.#bytes -= b.length;
    if (this.#bytes < 0) this.#bytes = 0;
  }

  /** [gpa, +length) as pieces of direct memory and bounce buffers; throws BounceMiss for the ones not fetched. */
  #pieces(gpa: number, length: number): Uint8Array[] {
    if (!Number.isSafeInteger(gpa) || !Number.isSafeInteger(length) || gpa < 0 || length < 0 || !Number.isSafeInteger(gpa + length)) {
      throw new VirtioError('GPA_OUT_OF_RANGE', `bad address range ${String(gpa)} + ${String(length)}`);
    }
    const out: Uint8Array[] = [];
    const missing: { gpa: number; length: number }[] = [];
    const end = gpa + length;
    const regions = this.#direct.regions;
    const windows = this.#windows();
    let p = gpa;
    while (p < end) {
      const r = regions.find((x) => p >= x.guestPhysAddr && p < x.guestPhysAddr + x.size);
      if (r) {
        const take = Math.min(end, r.guestPhysAddr + r.size) - p;
        out.push(this.#direct.view(p, take)!);
        p += take;
        continue;
      }
      const w = windows.find((x) => p >= x.iova && p < x.iova + x.size);
      if (!w) throw new VirtioError('GPA_OUT_OF_RANGE', `[${hex(gpa)}, +${length}) is not inside guest memory`);
      const take = Math.min(end, w.iova + w.size) - p;
      const b = this.#cache.get(`${p}:${take}`);
      if (b) out.push(b);
      else missing.push({ gpa: p, length: take });
      p += take;
    }
    if (missing.length > 0) {
      const want = missing.reduce((n, m) => n + m.length, 0);
      if (this.#bytes + want > this.limit) {
        // What this pop fetched so far is not in flight yet: only other chains' buffers can free the budget.
        const cached = [...this.#cache.values()].reduce((n, b) => n + b.length, 0);
        if (this.#bytes - cached > 0) throw new BounceMiss(missing, true);
        throw new VirtioError('LENGTH_OVERFLOW', `a chain needs more than ${this.limit} bytes in DMA windows reached by messages`);
      }
      throw new BounceMiss(missing, false);
    }
    return out;
  }
}
