import { native, POLL_READABLE, type PollHandle } from './native.js';
import { Fd } from './fd.js';
import { SysError, sysError } from './errors.js';

export interface EventFdOptions {
  initval?: number;
  /** EFD_SEMAPHORE: each read takes 1 from the counter. */
  semaphore?: boolean;
}

type Waiter = { resolve: (n: number) => void; reject: (e: Error) => void };

/**
 * An eventfd: a counter the kernel wakes pollers on. signal() adds to it;
 * read() takes it (0 if it was zero); wait() and subscribe() are woken by the
 * libuv loop when it becomes non-zero, never by polling in a loop.
 */
export class EventFd {
  readonly fd: Fd;
  #poll: PollHandle | null = null;
  #waiters: Waiter[] = [];
  #subscribers = new Set<(count: number) => void>();
  #polling = false;

  constructor(fd: Fd) {
    this.fd = fd;
  }

  static create(options: EventFdOptions = {}): EventFd {
    return new EventFd(new Fd(native.eventfd(options.initval ?? 0, options.semaphore === true)));
  }

  /**
   * Wraps an eventfd received from a peer (taking ownership). It is switched
   * to non-blocking so a read can never stall the event loop.
   */
  static from(fd: Fd): EventFd {
    native.setNonBlock(fd.value, true);
    return new EventFd(fd);
  }

  get closed(): boolean {
    return this.fd.closed;
  }

  /** Adds n (default 1) to the counter. Returns false if it would overflow. */
  signal(n: number | bigint = 1): boolean {
    return native.eventfdWrite(this.fd.value, n);
  }

  /** Takes the counter: its value, or 0 if nothing was signalled. */
  read(): number {
    const v = native.eventfdRead(this.fd.value);
    if (typeof v === 'bigint') return Number(v);
    return v < 0 ? 0 : v;
  }

  /** Resolves with the counter value at the next signal (or now, if already signalled). */
  wait(): Promise<number> {
    const now = this.read();
    if (now > 0) return Promise.resolve(now);
    return new Promise((resolve, reject) => {
      this.#waiters.push({ resolve, reject });
      this.#setPolling();
    });
  }

  /** Calls fn(count) on each signal until the returned function is called. */
  subscribe(fn: (count: number) => void): () => void {
    this.fd.value; // throws if closed
    this.#subscribers.add(fn);
    this.#setPolling();
    return () => {
      this.#subscribers.delete(fn);
      this.#setPolling();
    };
  }

  /** Closes the fd; pending wait() calls reject with EBADF. */
  close(): void {
    if (this.#poll) native.pollClose(this.#poll);
    this.#poll = null;
    this.#polling = false;
    this.#subscribers.clear();
    const waiters = this.#waiters;
    this.#waiters = [];
    this.fd.close();
    for (const w of waiters) w.reject(sysError('EBADF', 'eventfd', 'eventfd closed while waiting'));
  }

  #setPolling(): void {
    const want = this.#waiters.length > 0 || this.#subscribers.size > 0;
    if (want === this.#polling || this.fd.closed) return;
    if (!this.#poll) this.#poll = native.pollNew(this.fd.value, (status) => this.#onReadable(status));
    native.pollStart(this.#poll, want ? POLL_READABLE : 0);
    this.#polling = want;
  }

  #onReadable(status: number): void {
    if (status < 0) {
      const err = new SysError('EIO', 'poll', -status);
      const waiters = this.#waiters;
      this.#waiters = [];
      for (const w of waiters) w.reject(err);
      this.#setPolling();
      return;
    }
    const count = this.read();
    if (count === 0) return;
    const waiters = this.#waiters;
    this.#waiters = [];
    for (const w of waiters) w.resolve(count);
    for (const fn of [...this.#subscribers]) fn(count);
    if (!this.fd.closed) this.#setPolling();
  }
}
