/**
 * What the client-side VFIO object model (container.ts, group.ts) needs of a
 * device: the DmaTarget interface a vfio-user client device implements, the
 * error raised when a device refuses an operation, the promise queue that
 * keeps operations in call order, and the dirty bitmap helpers.
 *
 * Transport-free: nothing here knows about sockets or messages.
 */
import type { DmaMapTable } from './dma.js';
import { VfioError, errnoName, errnoOf, invalid } from './errors.js';

/** One IOVA range for DMA logging (VFIO_DEVICE_FEATURE_DMA_LOGGING_START). */
export interface DmaLoggingRange {
  iova: number;
  length: number;
}

/**
 * Device dirty page tracking (VFIO_DEVICE_FEATURE_DMA_LOGGING_START / STOP /
 * REPORT). Optional: a device without it is assumed to dirty every writable
 * mapping while logging runs (see VfioContainer.reportDirty).
 */
export interface DmaLogging {
  /** Starts logging DMA writes; `ranges` empty means everything. `pageSize` is a power of two >= 4096. */
  start(pageSize: number, ranges: readonly DmaLoggingRange[]): Promise<void>;
  /** Stops logging. */
  stop(): Promise<void>;
  /**
   * The dirty bitmap of [iova, iova + length) at `pageSize` granularity, and
   * clears it on the device: bit i (byte i >> 3, bit i & 7) covers
   * [iova + i * pageSize, +pageSize); ceil(length / pageSize) bits rounded up
   * to whole u64s (dirtyBitmapBytes).
   */
  report(iova: number, length: number, pageSize: number): Promise<Uint8Array>;
}

/** A mapping as a device receives it. M is the memory reference (a SharedMemory in the client). */
export interface DmaTargetMapping<M = unknown> {
  iova: number;
  size: number;
  /** DmaMapFlag bits: READ 1, WRITE 2. */
  prot: number;
  /** Opaque to the model: carried from VfioContainer.map() to every device. */
  memory: M;
  /** Offset of the mapping in `memory`. */
  offset: number;
}

/**
 * A device as the object model sees it (a vfio-user client device
 * implements it). The model never has more than one call outstanding on a
 * target, and calls it in the order the container operations were made.
 * `pgsizes` and `maxDmaMaps` are read whenever the container recomputes its
 * limits, so they must not change while the device is in a group.
 */
export interface DmaTarget<M = unknown> {
  readonly name: string;
  /** Page sizes the device accepts in DMA_MAP, OR-ed (the server's `pgsizes`; 4096n by default). */
  readonly pgsizes: bigint;
  /** Most mappings the device accepts at once (the server's `max_dma_maps`; 65535 by default). */
  readonly maxDmaMaps: number;
  dmaMap(m: DmaTargetMapping<M>): Promise<void>;
  /** Removes one mapping, given exactly as it was mapped. */
  dmaUnmap(m: { iova: number; size: number }): Promise<void>;
  /** Removes every mapping at once (VFIO_DMA_UNMAP_FLAG_ALL); without it, mappings are unmapped one by one. */
  dmaUnmapAll?(): Promise<void>;
  /** Device dirty page tracking, when the device supports it. */
  readonly dmaLogging?: DmaLogging | undefined;
}

/** What a device was asked to do when it failed. */
export type DmaTargetOp = 'map' | 'unmap' | 'unmapAll' | 'replay' | 'logStart' | 'logStop' | 'logReport';

/**
 * A device refused (or failed) an operation. `errno` is the device's own
 * errno when its error carried one (errnoOf), EIO otherwise; the original
 * error is the `cause`.
 */
export class DmaTargetError extends VfioError {
  /** The device's name. */
  readonly target: string;
  readonly op: DmaTargetOp;

  constructor(target: string, op: DmaTargetOp, cause: unknown, errno = errnoOf(cause)) {
    const why = cause instanceof Error ? cause.message : String(cause);
    super(`DMA_TARGET_${op.replace(/[A-Z]/g, (c) => `_${c}`).toUpperCase()}_FAILED`, errno, `device ${target}: ${op} failed (${errnoName(errno)}): ${why}`, {
      cause,
    });
    this.name = 'DmaTargetError';
    this.target = target;
    this.op = op;
  }
}

/** Checks the limits a target advertises (EINVAL when unusable). */
export function checkDmaTarget(t: DmaTarget<unknown>): void {
  if (typeof t.pgsizes !== 'bigint' || t.pgsizes <= 0n || t.pgsizes >= 1n << 64n) {
    throw invalid('DMA_TARGET_BAD_PGSIZES', `device ${t.name}: pgsizes must be a non-zero 64-bit bitmap`);
  }
  if (!Number.isSafeInteger(t.maxDmaMaps) || t.maxDmaMaps < 0) {
    throw invalid('DMA_TARGET_BAD_MAX_DMA_MAPS', `device ${t.name}: bad max_dma_maps ${String(t.maxDmaMaps)}`);
  }
}

/**
 * Runs tasks one at a time in the order they were queued; a failing task
 * does not stop the queue.
 */
export class SerialQueue {
  #tail: Promise<unknown> = Promise.resolve();
  #pending = 0;

  /** Queues fn; the result settles like fn's. */
  run<T>(fn: () => T | Promise<T>): Promise<T> {
    this.#pending++;
    const p = this.#tail.then(() => fn()).finally(() => {
      this.#pending--;
    });
    this.#tail = p.then(
      () => undefined,
      () => undefined,
    );
    return p;
  }

  /** Tasks queued or running. */
  get pending(): number {
    return this.#pending;
  }
}

/**
 * Runs fn on every target in parallel. When any fails, `undo` (which must not
 * throw) runs on each target that succeeded, and then the first failure in
 * target order is thrown as a DmaTargetError for `op` (as is when it already
 * is one). Without `undo`, failures are just thrown once all finished.
 */
export async function fanOut<T extends { readonly name: string }>(
  targets: readonly T[],
  op: DmaTargetOp,
  fn: (t: T) => Promise<unknown> | undefined,
  undo?: (t: T) => Promise<void>,
): Promise<void> {
  const results = await Promise.allSettled(targets.map(async (t) => fn(t)));
  const failed = results.findIndex((r) => r.status === 'rejected');
  if (failed < 0) return;
  if (undo !== undefined) {
    await Promise.all(targets.map((t, i) => (results[i]?.status === 'fulfilled' ? undo(t) : undefined)));
  }
  const reason: unknown = (results[failed] as PromiseRejectedResult).reason;
  throw reason instanceof DmaTargetError ? reason : new DmaTargetError(targets[failed]!.name, op, reason);
}

/** Bytes of a dirty bitmap for [iova, +length) at pageSize: whole u64s, as DMA_LOGGING_REPORT sizes it. */
export function dirtyBitmapBytes(length: number, pageSize: number): number {
  return Math.ceil(Math.ceil(length / pageSize) / 64) * 8;
}

/** dst |= src, over the common length. */
export function orBitmap(dst: Uint8Array, src: Uint8Array): void {
  const n = Math.min(dst.length, src.length);
  for (let i = 0; i < n; i++) dst[i] = (dst[i] ?? 0) | (src[i] ?? 0);
}

/** Sets bits [first, last] (inclusive). */
export function setBitRange(bits: Uint8Array, first: number, last: number): void {
  let i = first;
  for (; i <= last && i % 8 !== 0; i++) bits[i >> 3] = (bits[i >> 3] ?? 0) | (1 << (i & 7));
  const wholeEnd = Math.floor((last + 1) / 8) * 8;
  if (i < wholeEnd) {
    bits.fill(0xff, i / 8, wholeEnd / 8);
    i = wholeEnd;
  }
  for (; i <= last; i++) bits[i >> 3] = (bits[i >> 3] ?? 0) | (1 << (i & 7));
}

/**
 * Marks in `table` every page a bitmap of [iova, +length) at pageSize says is
 * dirty (runs of set bits become one markDirty each). Unmapped parts are
 * ignored by the table.
 */
export function markBitmap(table: Pick<DmaMapTable, 'markDirty'>, bits: Uint8Array, iova: number, length: number, pageSize: number): void {
  const nbits = Math.ceil(length / pageSize);
  let runStart = -1;
  for (let i = 0; i <= nbits; i++) {
    const set = i < nbits && ((bits[i >> 3] ?? 0) & (1 << (i & 7))) !== 0;
    if (set && runStart < 0) runStart = i;
    if (!set && runStart >= 0) {
      const from = iova + runStart * pageSize;
      const to = Math.min(iova + i * pageSize, iova + length);
      table.markDirty(from, to - from);
      runStart = -1;
    }
    if (!set && i < nbits && i % 8 === 0 && bits[i >> 3] === 0) i += 7; // a clean byte
  }
}

/** errno of a model rule that has no constant in Errno yet. */
export const ENODEV = 19;

/**
 * Removes `regions` from a device: dmaUnmapAll when it has it, else one by
 * one in reverse order, going on past failures; the first one is thrown at
 * the end.
 */
export async function unmapAllOn(t: DmaTarget<never>, regions: readonly { iova: number; size: number }[]): Promise<void> {
  if (t.dmaUnmapAll !== undefined) return t.dmaUnmapAll();
  let first: { err: unknown } | undefined;
  for (let i = regions.length - 1; i >= 0; i--) {
    const r = regions[i]!;
    try {
      await t.dmaUnmap({ iova: r.iova, size: r.size });
    } catch (err) {
      first ??= { err };
    }
  }
  if (first !== undefined) throw first.err;
}
