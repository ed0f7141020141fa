/**
 * Loader and typed face of the native addon (native/vdevkit.c).
 * Nothing outside src/sys/ imports this module.
 */
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import path from 'node:path';
import { existsSync } from 'node:fs';
import { SysError } from './errors.js';

/** Opaque uv_poll handle. */
export type PollHandle = { readonly __poll: unique symbol };

export interface NativeAddon {
  setErrorClass(ctor: typeof SysError): void;
  close(fd: number): void;
  dup(fd: number): number;
  fstat(fd: number): { size: number; mode: number };
  setNonBlock(fd: number, on: boolean): void;
  listen(path: string, backlog: number): number;
  /** A new connection's fd, or -1 when none is pending. */
  accept(fd: number): number;
  connect(path: string): number;
  socketpair(): [number, number];
  shutdown(fd: number, how: 0 | 1 | 2): void;
  /** SO_SNDBUF; returns what the kernel granted. */
  setSendBuffer(fd: number, bytes: number): number;
  /** Throws the socket's pending error (SO_ERROR) as a SysError, if it has one. */
  checkSocketError(fd: number): void;
  /** Bytes sent, or -1 when the socket buffer is full. */
  sendmsg(fd: number, data: Uint8Array | readonly Uint8Array[], fds: readonly number[] | null): number;
  /** Bytes read (0 = end of stream), or -1 when nothing is available. fdsOut[0] = fd count. */
  /** With a tail: a scatter read, bytes past `length` landing in tail[tailOffset, tailOffset + tailLength). */
  recvmsg(
    fd: number,
    buf: Uint8Array,
    offset: number,
    length: number,
    fdsOut: Int32Array,
    tail?: Uint8Array,
    tailOffset?: number,
    tailLength?: number,
  ): number;
  /** A non-blocking pipe, its capacity raised to `size` where allowed: [read end, write end]. */
  pipe(size: number): [number, number];
  /**
   * Parts through the pipe into the socket: refs[i] 1 = vmsplice (referenced), 0 = write (copied);
   * state[0] = bytes in the pipe, in and out; state[1] = bytes taken from parts (also when it
   * throws). Memory vmsplice cannot pin is copied. SIGPIPE from splice is blocked and consumed.
   */
  pipeSend(sock: number, pipeR: number, pipeW: number, parts: readonly Uint8Array[], refs: Uint8Array, state: Float64Array): number;
  pollNew(fd: number, cb: (status: number, events: number) => void): PollHandle;
  pollStart(handle: PollHandle, events: number): void;
  pollClose(handle: PollHandle): void;
  memfdCreate(name: string, allowSealing: boolean): number;
  ftruncate(fd: number, size: number): void;
  addSeals(fd: number, seals: number): void;
  /** guard: contain SIGBUS on this mapping (zero pages + a flag) when the file shrinks under it. */
  mmap(fd: number, offset: number, length: number, readOnly: boolean, guard?: boolean): ArrayBuffer;
  /** 0 intact, 1 faulted (the file shrank: zero pages now), -1 not a live mapping, -2 unguarded. */
  mappingState(buf: ArrayBuffer): number;
  /** SIGBUS faults contained so far (process-wide). */
  sigbusContained(): number;
  munmap(buf: ArrayBuffer): boolean;
  eventfd(initval: number, semaphore: boolean): number;
  /** Counter value, or -1 when it is zero. */
  eventfdRead(fd: number): number | bigint;
  /** false when the counter would overflow. */
  eventfdWrite(fd: number, value: number | bigint): boolean;
  readonly SCM_MAX_FD: number;
  readonly PAGE_SIZE: number;
  readonly F_SEAL_SEAL: number;
  readonly F_SEAL_SHRINK: number;
  readonly F_SEAL_GROW: number;
  readonly F_SEAL_WRITE: number;
}

export const POLL_READABLE = 1;
export const POLL_WRITABLE = 2;

function load(): NativeAddon {
  const here = path.dirname(fileURLToPath(import.meta.url));
  const require = createRequire(import.meta.url);
  // src/sys -> dist/src/sys when compiled; the build directory sits at the package root.
  const candidates = [
    process.env['VDEVKIT_NATIVE'],
    path.resolve(here, '../../../build/Release/vdevkit.node'),
    path.resolve(here, '../../build/Release/vdevkit.node'),
  ].filter((p): p is string => typeof p === 'string');
  for (const file of candidates) {
    if (existsSync(file)) return require(file) as NativeAddon;
  }
  throw new Error(
    'vdevkit: the native addon is not built (looked for ' +
      candidates.join(', ') +
      '). Run `npm install` (or `npx node-gyp rebuild`); it needs python3, make and a C compiler.',
  );
}

export const native: NativeAddon = load();
native.setErrorClass(SysError);
