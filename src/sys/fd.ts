import { native } from './native.js';
import { sysError } from './errors.js';

/**
 * An owned file descriptor. Exactly one Fd owns a descriptor number at a
 * time: close() is idempotent, release() hands the number to the caller (and
 * this object then behaves as closed), dup() makes an independent owner.
 */
export class Fd {
  #fd: number;

  constructor(fd: number) {
    if (!Number.isInteger(fd) || fd < 0) throw sysError('EBADF', 'fd', `invalid file descriptor ${fd}`);
    this.#fd = fd;
  }

  /** The descriptor number; throws EBADF once closed or released. */
  get value(): number {
    if (this.#fd < 0) throw sysError('EBADF', 'fd', 'file descriptor used after close');
    return this.#fd;
  }

  get closed(): boolean {
    return this.#fd < 0;
  }

  /** Closes the descriptor. Calling it again does nothing. */
  close(): void {
    const fd = this.#fd;
    if (fd < 0) return;
    this.#fd = -1;
    native.close(fd);
  }

  /** Gives up ownership: returns the number, which the caller must close. */
  release(): number {
    const fd = this.value;
    this.#fd = -1;
    return fd;
  }

  /** A new owned descriptor for the same open file (F_DUPFD_CLOEXEC). */
  dup(): Fd {
    return new Fd(native.dup(this.value));
  }

  /** Size and mode from fstat. */
  stat(): { size: number; mode: number } {
    return native.fstat(this.value);
  }

  toString(): string {
    return this.#fd < 0 ? 'Fd(closed)' : `Fd(${this.#fd})`;
  }
}

/** Closes every fd in the list, ignoring ones already closed. */
export function closeAll(fds: Iterable<Fd>): void {
  for (const fd of fds) fd.close();
}
