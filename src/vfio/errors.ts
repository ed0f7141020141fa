/**
 * The error class of the VFIO model layer.
 *
 * Every rule the model enforces fails with a VfioError that carries a stable
 * `code` (what went wrong, for programs and tests) and the Linux `errno` a
 * server should put in its error reply (what the peer sees).
 */

/** Linux errno values used by the VFIO model (asm-generic/errno*.h). */
export const Errno = {
  /** Operation not permitted. */
  EPERM: 1,
  /** No such mapping, region or entry. */
  ENOENT: 2,
  ENODEV: 19,
  /** I/O error; used when a device callback failed without an errno of its own. */
  EIO: 5,
  /** Argument list (here: a bitmap or range list) too long. */
  E2BIG: 7,
  /** Bad file descriptor. */
  EBADF: 9,
  /** Out of memory. */
  ENOMEM: 12,
  /** Permission denied (a DMA access the mapping's protection does not allow). */
  EACCES: 13,
  /** Bad address. */
  EFAULT: 14,
  /** Busy: an operation is already in progress. */
  EBUSY: 16,
  /** Already exists (a DMA map over an existing mapping, per the vfio-user spec). */
  EEXIST: 17,
  /** Invalid argument: the default answer to a malformed request. */
  EINVAL: 22,
  /** Inappropriate ioctl: the operation is not implemented for this object. */
  ENOTTY: 25,
  /** No space left (too many DMA mappings, or a mapping too large). */
  ENOSPC: 28,
  /** A value too large for its field, or an arithmetic overflow of a range. */
  EOVERFLOW: 75,
  /** Operation not supported (Linux ENOTSUP has the same value). */
  EOPNOTSUPP: 95,
} as const;
export type Errno = (typeof Errno)[keyof typeof Errno];

const ERRNO_NAMES: ReadonlyMap<number, string> = new Map(
  Object.entries(Errno).map(([name, value]) => [value, name]),
);

/** The symbolic name of an errno number (`EINVAL`), or `errno N` if unknown. */
export function errnoName(errno: number): string {
  return ERRNO_NAMES.get(errno) ?? `errno ${errno}`;
}

/** A rule of the VFIO model was broken; `errno` is what to reply with. */
export class VfioError extends Error {
  /** Stable identifier of the failed rule, e.g. `IRQ_SET_BAD_RANGE`. */
  readonly code: string;
  /** Linux errno number (positive) to report to the peer. */
  readonly errno: number;

  constructor(code: string, errno: number, message: string, options?: { cause?: unknown }) {
    super(`${message} (${code}, ${errnoName(errno)})`, options);
    this.name = 'VfioError';
    this.code = code;
    this.errno = errno;
  }
}

/** Shorthand used throughout the layer: a VfioError with errno EINVAL. */
export function invalid(code: string, message: string): VfioError {
  return new VfioError(code, Errno.EINVAL, message);
}

/**
 * The errno to report for an arbitrary thrown value: its own errno when it is
 * a VfioError (or any error object with a positive numeric `errno`), EIO
 * otherwise.
 */
export function errnoOf(err: unknown): number {
  if (err instanceof VfioError) return err.errno;
  if (typeof err === 'object' && err !== null && 'errno' in err) {
    const n = (err as { errno: unknown }).errno;
    if (typeof n === 'number' && Number.isInteger(n) && n > 0) return n;
  }
  return Errno.EIO;
}
