/**
 * Linux errno numbers carried in vfio-user error replies. The Error field of
 * a reply "is an optional UNIX errno value"; peers run on Linux, so these are
 * the Linux numbers (ENOTSUP equals EOPNOTSUPP there).
 */
export enum Errno {
  /** Operation not permitted. */
  EPERM = 1,
  /** No such entry: e.g. an unmap that matches no mapping. */
  ENOENT = 2,
  /** I/O error. */
  EIO = 5,
  /** Argument list too long: a reply buffer (argsz) that is too small. */
  E2BIG = 7,
  /** Bad file descriptor. */
  EBADF = 9,
  /** Try again. */
  EAGAIN = 11,
  /** Out of memory. */
  ENOMEM = 12,
  /** Permission denied. */
  EACCES = 13,
  /** Bad address: an access outside the memory it names. */
  EFAULT = 14,
  /** Device or resource busy. */
  EBUSY = 16,
  /** Exists: "a command to map over an existing region must be failed ... with EEXIST". */
  EEXIST = 17,
  /** No such device. */
  ENODEV = 19,
  /** Invalid argument: the answer to any malformed message. */
  EINVAL = 22,
  /** No space left: e.g. too many DMA mappings or a mapping that is too large. */
  ENOSPC = 28,
  /** Result out of range. */
  ERANGE = 34,
  /** Function not implemented. */
  ENOSYS = 38,
  /** Protocol error. */
  EPROTO = 71,
  /** Value too large for the data type. */
  EOVERFLOW = 75,
  /** Message too long. */
  EMSGSIZE = 90,
  /** Operation not supported (Linux ENOTSUP == EOPNOTSUPP). */
  ENOTSUP = 95,
  /** Connection reset by peer. */
  ECONNRESET = 104,
  /** Timed out. */
  ETIMEDOUT = 110,
}

/** The errno's name (`EINVAL`), or `errno N` for numbers not in the table. */
export function errnoName(errno: number): string {
  const name = (Errno as unknown as Record<number, string | undefined>)[errno];
  return name ?? `errno ${errno}`;
}
