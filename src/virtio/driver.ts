/**
 * The DRIVER side of a virtqueue (what a guest kernel's virtio_ring does):
 * descriptor allocation, making buffers available, kick decisions, reaping
 * used buffers, interrupt suppression, event-idx and indirect tables, for
 * split (driver-split.ts) and packed (driver-packed.ts) rings laid out in
 * guest memory the front-end owns.
 *
 * The driver trusts nothing the device writes: used ids must be in flight,
 * used lengths within the chain's device-writable bytes, the used index may
 * not run ahead of what was made available. A device that breaks these rules
 * marks the queue broken (VirtioError), and nothing more is taken from it.
 *
 * Ordering, as on the device side: descriptors and ring entries are written
 * before the word that publishes them (split avail idx, packed first
 * descriptor's flags), stored with Atomics.store; the device's index/flags
 * word is read with Atomics.load before the entries behind it.
 */
import type { GuestMemoryView } from './types.js';
import type { DeviceQueueOptions } from './queue.js';
import { VirtioError } from './errors.js';

/** One buffer of a chain: guest-physical address, length, and whether the device writes it. */
export interface DriverBuffer {
  addr: number;
  len: number;
  /** Device-writable (the device's reply). Device-readable buffers must come first. */
  write: boolean;
}

export interface UsedBuffer<T> {
  token: T;
  /** Bytes the device says it wrote (checked against the chain's writable length). */
  len: number;
}

/** Where the ring is and what was negotiated, as for the device side (indirect: use indirect tables for chains of more than one buffer). */
export interface DriverQueueOptions extends Pick<DeviceQueueOptions, 'memory' | 'size' | 'packed' | 'desc' | 'driver' | 'device' | 'eventIdx' | 'indirect'> {
  /** GPA of `size` indirect tables of `indirectMax` entries each (needed when `indirect`). */
  indirectTables?: number;
  /** Entries per indirect table (default 16). */
  indirectMax?: number;
}

export interface DriverQueue<T> {
  readonly size: number;
  readonly packed: boolean;
  /** Free descriptors. */
  readonly numFree: number;
  /** Chains made available and not yet used. */
  readonly inFlight: number;
  readonly broken: VirtioError | null;
  /** Whether a chain of `n` buffers can be added now. */
  canAdd(n: number): boolean;
  /**
   * Makes a chain available (published at once). False when there is no
   * room (descriptors or ids); throws on a malformed chain or a broken queue.
   */
  add(bufs: readonly DriverBuffer[], token: T): boolean;
  /** Whether the device wants a kick for what was added since the last call (and resets that count). */
  needsKick(): boolean;
  /** The next used buffer, or null. Throws VirtioError (and breaks the queue) when the device lied. */
  getUsed(): UsedBuffer<T> | null;
  /** Asks for interrupts again; true when used buffers are already waiting (reap again). */
  enableInterrupts(): boolean;
  disableInterrupts(): void;
  /** Every token in flight (for failing them when the queue or the device is gone). */
  tokens(): T[];
}

/** Where each part of a ring goes, relative to its start, and its total size. */
export interface RingLayout {
  desc: number;
  driver: number;
  device: number;
  /** Indirect tables (size of them, `indirectMax` entries each), or -1. */
  indirectTables: number;
  bytes: number;
}

const alignUp = (n: number, a: number): number => Math.ceil(n / a) * a;

/**
 * The ring layout the driver uses: split = descriptor table (16N), avail ring
 * (6 + 2N, incl. used_event), used ring at a 64-byte boundary (6 + 8N, incl.
 * avail_event); packed = descriptor ring (16N), driver event area (4), device
 * event area (4). Then, when `indirectMax` > 0, N indirect tables.
 */
export function ringLayout(size: number, packed: boolean, indirectMax = 0): RingLayout {
  const desc = 0;
  let driver: number;
  let device: number;
  let end: number;
  if (packed) {
    driver = 16 * size;
    device = driver + 16;
    end = device + 4;
  } else {
    driver = 16 * size;
    device = alignUp(driver + 6 + 2 * size, 64);
    end = device + 6 + 8 * size;
  }
  let indirectTables = -1;
  if (indirectMax > 0) {
    indirectTables = alignUp(end, 64);
    end = indirectTables + size * indirectMax * 16;
  }
  return { desc, driver, device, indirectTables, bytes: alignUp(end, 4096) };
}

export function driverError(code: 'USED_ID' | 'LENGTH_OVERFLOW' | 'RING_LAYOUT' | 'BROKEN' | 'AVAIL_IDX', message: string): VirtioError {
  return new VirtioError(code, message);
}

/** A view of a ring part, in one region, aligned. */
export function driverRingView(memory: GuestMemoryView, what: string, gpa: number, length: number, align: number): Uint8Array {
  if (!Number.isSafeInteger(gpa) || gpa % align !== 0) throw driverError('RING_LAYOUT', `${what} at ${gpa} is not ${align}-aligned`);
  const v = memory.view(gpa, length);
  if (v === null) throw driverError('RING_LAYOUT', `${what} crosses a memory region boundary`);
  if (v.byteOffset % align !== 0) throw driverError('RING_LAYOUT', `${what} is not ${align}-aligned in the mapping`);
  return v;
}

/** Checks a chain before it is written: non-empty, readable before writable, lengths u32. */
export function checkChain(bufs: readonly DriverBuffer[], size: number): number {
  if (bufs.length === 0) throw new RangeError('a chain needs at least one buffer');
  if (bufs.length > size) throw new RangeError(`a chain of ${bufs.length} buffers does not fit a queue of ${size}`);
  let sawWrite = false;
  let writable = 0;
  for (const b of bufs) {
    if (!Number.isSafeInteger(b.addr) || b.addr < 0) throw new RangeError(`bad buffer address ${b.addr}`);
    if (!Number.isInteger(b.len) || b.len < 0 || b.len > 0xffffffff) throw new RangeError(`bad buffer length ${b.len}`);
    if (b.write) {
      sawWrite = true;
      writable += b.len;
    } else if (sawWrite) throw new RangeError('a device-readable buffer after a device-writable one');
  }
  if (writable > 0xffffffff) throw new RangeError('more than 2^32 - 1 device-writable bytes');
  return writable;
}

/** Writes one 16-byte descriptor's address and length (split and packed share the first 12 bytes). */
export function writeDescAddr(dv: DataView, off: number, addr: number, len: number): void {
  dv.setUint32(off, addr % 0x1_0000_0000, true);
  dv.setUint32(off + 4, Math.floor(addr / 0x1_0000_0000), true);
  dv.setUint32(off + 8, len, true);
}

/**
 * What split and packed drivers share: the indirect tables, and per chain
 * (split head / packed buffer id) its token, descriptor count and writable
 * bytes, checked when the device gives it back.
 */
export abstract class DriverQueueBase<T> {
  readonly size: number;
  protected readonly eventIdx: boolean;
  protected readonly indirectTable: DataView | null;
  protected readonly indirectGpa: number;
  protected readonly indirectMax: number;
  protected free: number;
  readonly #tokens: (T | undefined)[];
  readonly #count: Uint16Array;
  readonly #writable: Float64Array;
  #inFlight = 0;
  #broken: VirtioError | null = null;
  protected interrupts = true;

  constructor(o: DriverQueueOptions, size: number) {
    this.size = size;
    this.eventIdx = o.eventIdx;
    this.indirectMax = o.indirectMax ?? 16;
    if (o.indirect) {
      if (o.indirectTables === undefined) throw new RangeError('indirect tables need an area (indirectTables)');
      const t = driverRingView(o.memory, 'indirect tables', o.indirectTables, 16 * this.indirectMax * size, 16);
      this.indirectTable = new DataView(t.buffer, t.byteOffset, t.length);
      this.indirectGpa = o.indirectTables;
    } else {
      this.indirectTable = null;
      this.indirectGpa = 0;
    }
    this.free = size;
    this.#tokens = new Array<T | undefined>(size);
    this.#count = new Uint16Array(size);
    this.#writable = new Float64Array(size);
  }

  get numFree(): number {
    return this.free;
  }

  get inFlight(): number {
    return this.#inFlight;
  }

  get broken(): VirtioError | null {
    return this.#broken;
  }

  protected useIndirect(n: number): boolean {
    return this.indirectTable !== null && n > 1 && n <= this.indirectMax;
  }

  /** Checks the chain and the queue; returns the descriptors it needs and its writable bytes. */
  protected prepare(bufs: readonly DriverBuffer[]): { indirect: boolean; need: number; writable: number } {
    if (this.#broken) throw driverError('BROKEN', `the queue is broken: ${this.#broken.message}`);
    const writable = checkChain(bufs, this.size);
    const indirect = this.useIndirect(bufs.length);
    return { indirect, need: indirect ? 1 : bufs.length, writable };
  }

  /** Fills indirect table `table` with the chain; `at12` and `at14` give each entry's u16 words @12 and @14. Returns the table's GPA. */
  protected writeIndirect(table: number, bufs: readonly DriverBuffer[], at12: (i: number, b: DriverBuffer) => number, at14: (i: number, b: DriverBuffer) => number): number {
    const t = this.indirectTable!;
    const base = table * this.indirectMax * 16;
    for (let i = 0; i < bufs.length; i++) {
      const b = bufs[i]!;
      const off = base + 16 * i;
      writeDescAddr(t, off, b.addr, b.len);
      t.setUint16(off + 12, at12(i, b), true);
      t.setUint16(off + 14, at14(i, b), true);
    }
    return this.indirectGpa + base;
  }

  /** A chain made available under `id`. */
  protected track(id: number, token: T, need: number, writable: number): void {
    this.free -= need;
    this.#tokens[id] = token;
    this.#count[id] = need;
    this.#writable[id] = writable;
    this.#inFlight++;
  }

  /** The chain `id` given back used with `len`: checked, forgotten; returns its token and descriptor count. */
  protected untrack(id: number, len: number): { token: T; count: number } {
    if (id >= this.size || this.#tokens[id] === undefined) this.fail(driverError('USED_ID', `used id ${id} is not a chain in flight`));
    if (len > this.#writable[id]!) this.fail(driverError('LENGTH_OVERFLOW', `used len ${len} for id ${id} with ${this.#writable[id]} writable bytes`));
    const token = this.#tokens[id]!;
    this.#tokens[id] = undefined;
    const count = this.#count[id]!;
    this.free += count;
    this.#inFlight--;
    return { token, count };
  }

  protected fail(err: VirtioError): never {
    this.#broken ??= err;
    throw err;
  }

  tokens(): T[] {
    return this.#tokens.filter((t): t is T => t !== undefined);
  }
}
