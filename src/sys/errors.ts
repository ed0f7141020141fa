/**
 * The error class of the sys layer. The native addon constructs it directly
 * (see setErrorClass in native/vdevkit.c), so every failed system call arrives
 * as a SysError with the errno name as `code`.
 */
export class SysError extends Error {
  /** errno name, e.g. `EBADF`, `EAGAIN`. */
  readonly code: string;
  /** The system call (or sys-layer operation) that failed. */
  readonly syscall: string;
  /** errno number (positive), 0 when the error did not come from the kernel. */
  readonly errno: number;

  constructor(code: string, syscall: string, errno = 0, detail?: string) {
    super(`${syscall} ${code}${detail ? `: ${detail}` : ''}`);
    this.name = 'SysError';
    this.code = code;
    this.syscall = syscall;
    this.errno = errno;
  }
}

/** errno numbers of the codes the sys layer raises itself (Linux values). */
const ERRNO: Record<string, number> = { EFAULT: 14, EBADF: 9, EINVAL: 22, EPIPE: 32, ETIMEDOUT: 110, ECONNRESET: 104, EADDRINUSE: 98 };

/** A SysError raised by the TypeScript side (misuse such as use after close). */
export function sysError(code: string, syscall: string, detail?: string): SysError {
  return new SysError(code, syscall, ERRNO[code] ?? 0, detail);
}
