/**
 * Incremental frame reader over a byte stream that carries fds.
 *
 * Chunks arrive in any split; the reader cuts them into frames (header +
 * body, the total size read from the header) and hands each frame out with
 * the fds that came with it. Fd association follows the socket layer's rule
 * (src/sys/socket.ts): the fds of a chunk belong to the frame that contains
 * the chunk's last byte.
 *
 * A frame is a view into the received chunk when it lies inside one chunk,
 * and a copy only when it spans chunks. Sizes are checked from the header
 * before any body byte is buffered: an oversized frame is either skipped
 * (its body discarded as it streams past, so the connection can go on) or
 * fatal, as the protocol layer decides.
 */
import type { Fd } from '../sys/fd.js';

/**
 * Frames at least this large are received into a buffer of their own by
 * default; smaller ones come from the socket's pooled reads (a fresh buffer
 * per frame costs more than a copy below this size).
 */
const BIG_FRAME = 256 * 1024;

export interface FrameSpec {
  /** Bytes of the fixed header. */
  headerSize: number;
  /** Total frame size (header included) announced by a header; NaN or < headerSize is fatal. */
  frameSize(header: Uint8Array): number;
  /** Largest frame that will be buffered. */
  maxFrameSize: number;
  /** Frames at least this large get a buffer of their own, filled in place (default 256 KiB). */
  bigFrameSize?: number;
  /** Most fds held for frames not yet complete (default 253, what one sendmsg can carry). */
  maxPendingFds?: number;
}

export interface FrameHandler {
  /** A complete frame and its fds (the handler owns the fds). */
  frame(frame: Uint8Array, fds: Fd[]): void;
  /**
   * A header announced a frame larger than maxFrameSize. Return true to skip
   * its body (the fds that came with it are closed) and go on; false to stop.
   */
  oversized(header: Uint8Array, size: number): boolean;
  /** The stream can no longer be framed (bad size, or oversized and not skipped). */
  fatal(reason: string): void;
}

interface PendingFds {
  /** Stream offset of the last byte of the chunk that carried them. */
  at: number;
  fds: Fd[];
}

export class FrameReader {
  readonly #spec: FrameSpec;
  readonly #handler: FrameHandler;
  #chunks: Uint8Array[] = [];
  /** Bytes buffered in #chunks. */
  #buffered = 0;
  /** Stream offset of the first buffered byte. */
  #offset = 0;
  #fds: PendingFds[] = [];
  /** Bytes of an oversized frame's body still to discard. */
  #skip = 0;
  /** Stream offset at which the frame being skipped ends. */
  #skipEnd = 0;
  #stopped = false;
  /** A large frame being received into its own buffer (bytes filled so far = #buffered). */
  #big: Buffer | null = null;
  /** fds held in #fds. */
  #pendingFds = 0;

  constructor(spec: FrameSpec, handler: FrameHandler) {
    this.#spec = spec;
    this.#handler = handler;
  }

  /** Bytes received and not yet handed out as frames. */
  get buffered(): number {
    return this.#buffered;
  }

  get stopped(): boolean {
    return this.#stopped;
  }

  push(chunk: Uint8Array, fds: Fd[] = []): void {
    if (this.#stopped) {
      for (const fd of fds) fd.close();
      return;
    }
    if (chunk.length === 0) {
      for (const fd of fds) fd.close();
      return;
    }
    const end = this.#offset + this.#buffered + chunk.length;
    if (fds.length > 0) {
      this.#fds.push({ at: end - 1, fds });
      this.#pendingFds += fds.length;
      if (this.#pendingFds > (this.#spec.maxPendingFds ?? 253)) {
        this.#stop(`${this.#pendingFds} fds sent for frames not yet complete`);
        return;
      }
    }
    if (this.#big) {
      this.#fillBig(chunk);
      return;
    }
    this.#chunks.push(chunk);
    this.#buffered += chunk.length;
    this.#drain();
  }

  /**
   * Where the next bytes should be read to: the rest of a large frame's own
   * buffer (so its body is not copied again), or null. A socket that reads
   * into it passes that view to push().
   */
  readTarget(): Buffer | null {
    return this.#big && !this.#stopped ? this.#big.subarray(this.#buffered) : null;
  }

  #fillBig(chunk: Uint8Array): void {
    const big = this.#big!;
    const take = Math.min(chunk.length, big.length - this.#buffered);
    const inPlace = chunk.buffer === big.buffer && chunk.byteOffset === big.byteOffset + this.#buffered;
    if (!inPlace) big.set(chunk.subarray(0, take), this.#buffered);
    this.#buffered += take;
    if (this.#buffered < big.length) return;
    this.#big = null;
    const start = this.#offset;
    this.#offset += big.length;
    this.#buffered = 0;
    const rest = chunk.subarray(take);
    if (rest.length > 0) {
      this.#chunks.push(rest);
      this.#buffered = rest.length;
    }
    this.#handler.frame(big, this.#fdsBefore(start + big.length));
    this.#drain();
  }

  /** Stops framing and closes every fd not yet handed out. */
  close(): void {
    this.#stopped = true;
    this.#big = null;
    this.#chunks = [];
    this.#buffered = 0;
    for (const p of this.#fds) for (const fd of p.fds) fd.close();
    this.#fds = [];
    this.#pendingFds = 0;
  }

  #drain(): void {
    const { headerSize } = this.#spec;
    while (!this.#stopped) {
      if (this.#skip > 0) {
        const n = Math.min(this.#skip, this.#buffered);
        this.#discard(n);
        this.#skip -= n;
        if (this.#skip > 0) return;
        this.#closeFdsBefore(this.#skipEnd);
        continue;
      }
      if (this.#buffered < headerSize) return;
      const header = this.#peek(headerSize);
      const size = this.#spec.frameSize(header);
      if (!Number.isSafeInteger(size) || size < headerSize) {
        this.#stop(`frame header announces an invalid size ${size}`);
        return;
      }
      if (size > this.#spec.maxFrameSize) {
        const headerCopy = header.slice();
        const frameEnd = this.#offset + size;
        if (!this.#handler.oversized(headerCopy, size)) {
          this.#stop(`frame of ${size} bytes exceeds the limit of ${this.#spec.maxFrameSize}`);
          return;
        }
        if (this.#stopped) return;
        this.#skip = size;
        this.#skipEnd = frameEnd;
        continue;
      }
      if (this.#buffered < size) {
        // A large frame: gather it in a buffer of its own, which the socket can read into directly.
        if (size >= (this.#spec.bigFrameSize ?? BIG_FRAME)) {
          const big = Buffer.allocUnsafe(size);
          let at = 0;
          for (const c of this.#chunks) {
            big.set(c, at);
            at += c.length;
          }
          this.#chunks = [];
          this.#big = big;
        }
        return;
      }
      const start = this.#offset;
      const frame = this.#take(size);
      const fds = this.#fdsBefore(start + size);
      this.#handler.frame(frame, fds);
    }
  }

  #stop(reason: string): void {
    this.close();
    this.#handler.fatal(reason);
  }

  /** The first n buffered bytes, as a view when they lie in one chunk. */
  #peek(n: number): Uint8Array {
    const first = this.#chunks[0]!;
    if (first.length >= n) return first.subarray(0, n);
    // Every byte is overwritten below: no need to zero it first.
    const out = Buffer.allocUnsafe(n);
    let filled = 0;
    for (const c of this.#chunks) {
      const take = Math.min(c.length, n - filled);
      out.set(c.subarray(0, take), filled);
      filled += take;
      if (filled === n) break;
    }
    return out;
  }

  /** Removes and returns the first n buffered bytes. */
  #take(n: number): Uint8Array {
    const first = this.#chunks[0]!;
    if (first.length >= n) {
      const out = first.subarray(0, n);
      this.#advance(n);
      return out;
    }
    const out = this.#peek(n);
    this.#advance(n);
    return out;
  }

  #discard(n: number): void {
    this.#advance(n);
  }

  #advance(n: number): void {
    this.#buffered -= n;
    this.#offset += n;
    while (n > 0) {
      const c = this.#chunks[0]!;
      if (c.length <= n) {
        n -= c.length;
        this.#chunks.shift();
      } else {
        this.#chunks[0] = c.subarray(n);
        n = 0;
      }
    }
  }

  /** Takes the fds whose chunk ended before stream offset `end`. */
  #fdsBefore(end: number): Fd[] {
    if (this.#fds.length === 0 || this.#fds[0]!.at >= end) return [];
    const out: Fd[] = [];
    while (this.#fds.length > 0 && this.#fds[0]!.at < end) out.push(...this.#fds.shift()!.fds);
    this.#pendingFds -= out.length;
    return out;
  }

  #closeFdsBefore(end: number): void {
    for (const fd of this.#fdsBefore(end)) fd.close();
  }
}
