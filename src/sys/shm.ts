import { native } from './native.js';
import { Fd } from './fd.js';
import { sysError } from './errors.js';

export interface CreateSharedMemoryOptions {
  /** Name shown in /proc/PID/fd (memfd:NAME). */
  name?: string;
  /**
   * Seal the size (F_SEAL_SHRINK | F_SEAL_GROW): a peer holding the fd can no
   * longer truncate it under our mapping (which would raise SIGBUS here).
   */
  sealSize?: boolean;
}

export interface MapOptions {
  /** Byte offset into the file, a multiple of the page size (default 0). */
  offset?: number;
  /** Bytes to map (default: the file size minus the offset). */
  size?: number;
  readOnly?: boolean;
  /**
   * Contain SIGBUS (default true: map() is for fds that come from a peer). If
   * the peer truncates the file, touching a lost page would kill the process
   * with SIGBUS; guarded, the fault handler replaces the whole mapping with
   * anonymous zero pages and sets `faulted` (the libwayland-server wl_shm
   * technique). The owner checks `faulted` and fails the connection. A file
   * sealed with F_SEAL_SHRINK cannot shrink: nothing to contain.
   */
  guard?: boolean;
}

/**
 * A MAP_SHARED mapping of a file descriptor (usually a memfd), owning both.
 * close() unmaps and closes: every view taken from `buffer` becomes empty
 * (detached), never a dangling pointer.
 */
export class SharedMemory {
  readonly fd: Fd;
  readonly offset: number;
  readonly size: number;
  readonly readOnly: boolean;
  #buffer: ArrayBuffer | null;
  #bytes: Uint8Array | null;
  #view: DataView | null;

  private constructor(fd: Fd, buffer: ArrayBuffer, offset: number, readOnly: boolean) {
    this.fd = fd;
    this.offset = offset;
    this.size = buffer.byteLength;
    this.readOnly = readOnly;
    this.#buffer = buffer;
    this.#bytes = new Uint8Array(buffer);
    this.#view = new DataView(buffer);
  }

  /** A new memfd of `size` bytes, mapped read/write. */
  static create(size: number, options: CreateSharedMemoryOptions = {}): SharedMemory {
    if (!Number.isSafeInteger(size) || size <= 0) throw sysError('EINVAL', 'memfd_create', `invalid size ${size}`);
    const fd = new Fd(native.memfdCreate(options.name ?? 'vdevkit', options.sealSize === true));
    try {
      native.ftruncate(fd.value, size);
      if (options.sealSize) native.addSeals(fd.value, native.F_SEAL_SHRINK | native.F_SEAL_GROW);
      return new SharedMemory(fd, native.mmap(fd.value, 0, size, false), 0, false);
    } catch (err) {
      fd.close();
      throw err;
    }
  }

  /**
   * Maps an fd received from a peer. Takes ownership of `fd` on success; on
   * failure the fd is left to the caller.
   */
  static map(fd: Fd, options: MapOptions = {}): SharedMemory {
    const offset = options.offset ?? 0;
    const size = options.size ?? fd.stat().size - offset;
    if (!Number.isSafeInteger(size) || size <= 0) {
      throw sysError('EINVAL', 'mmap', `nothing to map: size ${size} at offset ${offset}`);
    }
    const readOnly = options.readOnly === true;
    return new SharedMemory(fd, native.mmap(fd.value, offset, size, readOnly, options.guard !== false), offset, readOnly);
  }

  /** SIGBUS faults contained so far in this process (all mappings). */
  static get sigbusContained(): number {
    return native.sigbusContained();
  }

  /**
   * True once the file shrank under a guarded mapping and an access faulted:
   * the mapping now holds zero pages, not the peer's memory. False when closed.
   */
  get faulted(): boolean {
    return this.#buffer !== null && native.mappingState(this.#buffer) === 1;
  }

  /** Whether SIGBUS on this mapping is contained (map() with guard, and a free guard slot). */
  get guarded(): boolean {
    return this.#buffer !== null && native.mappingState(this.#buffer) >= 0;
  }

  get closed(): boolean {
    return this.#buffer === null;
  }

  /** The mapping. Detached (length 0) after close(). */
  get buffer(): ArrayBuffer {
    if (!this.#buffer) throw sysError('EBADF', 'mmap', 'shared memory used after close');
    return this.#buffer;
  }

  /** A Uint8Array over the whole mapping. */
  get bytes(): Uint8Array {
    if (!this.#bytes) throw sysError('EBADF', 'mmap', 'shared memory used after close');
    return this.#bytes;
  }

  /** A DataView over the whole mapping (little-endian accessors take `true`). */
  get view(): DataView {
    if (!this.#view) throw sysError('EBADF', 'mmap', 'shared memory used after close');
    return this.#view;
  }

  /** Whether `view` is a view of this mapping (false once closed). */
  contains(view: ArrayBufferView): boolean {
    return this.#buffer !== null && view.buffer === this.#buffer;
  }

  /** A bounds-checked Uint8Array over [offset, offset + length). */
  subarray(offset: number, length: number): Uint8Array {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.size) {
      throw sysError('EINVAL', 'mmap', `range [${offset}, +${length}) outside the ${this.size}-byte mapping`);
    }
    return new Uint8Array(this.buffer, offset, length);
  }

  /** Unmaps (detaching every view) and closes the fd. Idempotent. */
  close(): void {
    if (this.#buffer) {
      const buf = this.#buffer;
      this.#buffer = null;
      this.#bytes = null;
      this.#view = null;
      native.munmap(buf);
    }
    this.fd.close();
  }
}
