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
 * and a copy only when it spans chunks. A large frame gets a buffer of its
 * own that the socket reads into directly; or, when the protocol layer
 * places it (FrameSpec.place), its payload is received straight into a
 * destination the layer chose (the memory a DMA transfer is for), and only
 * its first `placePrefix` bytes come out as the frame. Sizes are checked from the header
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
/**
 * After a placed frame at least this large, the next read is the next
 * prefix alone (readTarget), so that frame's payload is placed too. Below
 * it, a read of its own costs more than copying the payload from the pool
 * (a recvmsg is about 1-1.5 us here, a 16 KiB copy about as much).
 */
const PLACED_PREFIX_READ = 16 * 1024;

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
  /**
   * Where a frame's bytes after its first `placePrefix` should go: a
   * destination of exactly `size - placePrefix` bytes, or null to deliver the
   * frame whole as usual. Asked once per frame of at least `placeMinSize`
   * bytes, when its first `placePrefix` bytes are buffered.
   */
  place?(prefix: Uint8Array, size: number): Uint8Array | null;
  /** Bytes of a placed frame kept as the frame itself (header and fixed fields). */
  placePrefix?: number;
  /** Smallest frame offered to place() (default 4096). */
  placeMinSize?: number;
}

export interface FrameHandler {
  /**
   * A complete frame and its fds (the handler owns the fds). For a placed
   * frame, `frame` is its prefix and `placed` the destination now holding the
   * rest; `placed` is empty if the destination went away (was detached) or was
   * dropped before the frame ended: its bytes were then discarded.
   */
  frame(frame: Uint8Array, fds: Fd[], placed?: Uint8Array): void;
  /**
   * A header announced a frame larger than maxFrameSize. Return true to skip
   * its body (the fds that came with it are closed) and go on; false to stop.
   */
  oversized(header: Uint8Array, size: number): boolean;
  /** The stream can no longer be framed (bad size, or oversized and not skipped). */
  fatal(reason: string): void;
}

/** A large frame being received in place (FrameReader's #big). */
interface BigFrame {
  /** A placed frame's prefix (null: the frame has a buffer of its own, `body`). */
  head: Uint8Array | null;
  body: Uint8Array;
  size: number;
  lost: boolean;
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
  /**
   * A large frame being received in place: its own buffer (head null), or a
   * placed frame's prefix (head) and destination (body). #buffered counts
   * the bytes of the frame received so far.
   */
  #big: BigFrame | null = null;
  /** fds held in #fds. */
  #pendingFds = 0;
  /** A frame handed out during this push() was a view of a received chunk. */
  #gaveView = false;
  /** Stream offset of a frame place() declined (it is not asked again). */
  #declinedAt = -1;
  /** The last frame was large and received in place: the next one likely is too. */
  #afterBig = false;
  /** What readTarget() last returned (for pushTarget), and whether it was the large frame's own memory. */
  #lastTarget: Uint8Array | null = null;
  #lastTargetInPlace = false;

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

  /**
   * Whether the reader, or a frame it handed out, still refers to the memory
   * of the chunk last pushed. When false (its bytes were all copied out or
   * placed), the socket may read the next bytes into the same memory.
   */
  get retainsLastChunk(): boolean {
    return this.#gaveView || this.#chunks.length > 0;
  }

  push(chunk: Uint8Array, fds: Fd[] = []): void {
    this.#gaveView = false;
    this.#lastTarget = null; // pushTarget() reports a read into the last target, not after other bytes
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
      if (this.#big === null) this.#drain();
      return;
    }
    this.#chunks.push(chunk);
    this.#buffered += chunk.length;
    this.#drain();
  }

  /**
   * Where the next bytes should be read to: the rest of a large frame's own
   * buffer or of a placed frame's destination (so its body is not copied
   * again), or the next frame's prefix after a large one, or null. A socket
   * that reads into it reports the bytes with pushTarget(n), or passes a
   * view of them to push().
   */
  readTarget(): Uint8Array | null {
    const big = this.#big;
    if (!big) {
      // After a large frame, read just the next frame's prefix first: if that
      // frame is large too, its body then goes straight to its place instead
      // of through the socket's pool and a copy.
      // Also when part of that prefix came already (the peer's write ended there): the rest of
      // it, not a pool-sized read that would take the next payload too, to be copied into place.
      const prefix = Math.max(this.#spec.placePrefix ?? 0, this.#spec.headerSize);
      if (!this.#afterBig || this.#buffered >= prefix || this.#skip > 0 || this.#stopped) return null;
      // Asked again before anything was reported: the same buffer (a read may land in either).
      const last = this.#lastTarget;
      if (last !== null && !this.#lastTargetInPlace && last.length === prefix - this.#buffered) return last;
      this.#lastTargetInPlace = false;
      return (this.#lastTarget = Buffer.allocUnsafe(prefix - this.#buffered));
    }
    if (this.#stopped || big.lost) return null;
    const at = this.#buffered - (big.head ? big.head.length : 0);
    if (at < 0) return null;
    if (big.body.length === 0) {
      this.#lose(); // detached: the memory it was a view of is gone
      return null;
    }
    this.#lastTargetInPlace = true;
    // The body itself when nothing of it came yet: no new view per message.
    return (this.#lastTarget = at === 0 ? big.body : big.body.subarray(at));
  }

  /**
   * The socket read `n` bytes (1 to its length) into the start of what
   * readTarget() last returned, and nothing else happened in between: the
   * same as push() of that view, without making the view or checking where
   * its memory lies (both cost per message).
   */
  pushTarget(n: number, fds: Fd[] = []): void {
    const target = this.#lastTarget;
    this.#lastTarget = null;
    if (target === null || !(n > 0 && n <= target.length)) {
      for (const fd of fds) fd.close();
      throw new RangeError(`pushTarget(${n}) does not follow a readTarget() it fits`);
    }
    if (!this.#lastTargetInPlace || this.#big === null || this.#stopped || fds.length > 0) {
      this.push(n === target.length ? target : target.subarray(0, n), fds);
      return;
    }
    this.#gaveView = false;
    // In place: the bytes are the body's next ones (#fillBig without the copy).
    const big = this.#big;
    this.#buffered += n;
    if (this.#buffered >= big.size) this.#completeBig(big, null);
  }

  /**
   * With readTarget(): how many bytes past the target the same read may
   * take (the next frame's prefix, so its payload can be placed without a
   * read of its own), or 0.
   */
  readTail(): number {
    const big = this.#big;
    if (!big || this.#stopped || big.lost) return 0;
    return Math.max(this.#spec.placePrefix ?? 0, this.#spec.headerSize);
  }

  /**
   * Stops receiving into `target` if the frame being placed there is not
   * complete yet: the rest of its bytes are discarded and the frame is
   * delivered with an empty destination. For a caller that gave up on it.
   */
  dropPlacement(target: Uint8Array): void {
    if (this.#big?.head && this.#big.body === target) this.#lose();
  }

  #lose(): void {
    this.#lastTarget = null;
    const big = this.#big!;
    big.lost = true;
    big.body = new Uint8Array(0); // not subarray(): that throws on a detached array
  }

  #fillBig(chunk: Uint8Array): void {
    const big = this.#big!;
    const headLen = big.head ? big.head.length : 0;
    let used = 0;
    if (this.#buffered < headLen) {
      used = Math.min(chunk.length, headLen - this.#buffered);
      big.head!.set(chunk.subarray(0, used), this.#buffered);
      this.#buffered += used;
      if (this.#buffered < headLen) return;
    }
    const at = this.#buffered - headLen;
    const take = Math.min(chunk.length - used, big.size - this.#buffered);
    if (!big.lost && big.body.length === 0 && take > 0) this.#lose();
    if (!big.lost && take > 0) {
      // Bytes the socket read straight into the body (readTarget) are already in place.
      const inPlace = chunk.buffer === big.body.buffer && chunk.byteOffset + used === big.body.byteOffset + at;
      if (!inPlace) big.body.set(used === 0 && take === chunk.length ? chunk : chunk.subarray(used, used + take), at);
    }
    this.#buffered += take;
    if (this.#buffered < big.size) return;
    this.#completeBig(big, used + take < chunk.length ? chunk.subarray(used + take) : null);
  }

  /** The large frame is all in: hands it out; `rest` (bytes after it) stays buffered. */
  #completeBig(big: BigFrame, rest: Uint8Array | null): void {
    this.#big = null;
    // A placed frame of PLACED_PREFIX_READ bytes or more, or one large enough for a buffer of its own:
    // the next frame likely is one too, so its prefix is read by itself first (readTarget).
    this.#afterBig = (big.head !== null && big.size >= PLACED_PREFIX_READ) || big.size >= (this.#spec.bigFrameSize ?? BIG_FRAME);
    const start = this.#offset;
    this.#offset += big.size;
    this.#buffered = 0;
    if (rest !== null) {
      this.#chunks.push(rest);
      this.#buffered = rest.length;
    }
    const fds = this.#fdsBefore(start + big.size);
    if (big.head) this.#handler.frame(big.head, fds, big.body);
    else this.#handler.frame(big.body, fds);
  }

  /** Stops framing and closes every fd not yet handed out. */
  close(): void {
    this.#stopped = true;
    this.#lastTarget = null;
    this.#big = null;
    this.#chunks = [];
    this.#buffered = 0;
    for (const p of this.#fds) for (const fd of p.fds) fd.close();
    this.#fds = [];
    this.#pendingFds = 0;
  }

  #drain(): void {
    const { headerSize } = this.#spec;
    while (!this.#stopped && this.#big === null) {
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
        this.#afterBig = false;
        continue;
      }
      const prefixLen = this.#spec.placePrefix ?? headerSize;
      if (this.#spec.place && size >= (this.#spec.placeMinSize ?? 4096) && size > prefixLen && this.#declinedAt !== this.#offset) {
        if (this.#buffered < prefixLen) return; // the prefix decides where the rest goes
        // Exactly the prefix buffered, in one chunk (a prefix read, or a read's tail): it is the frame's head as it is.
        const first = this.#chunks[0]!;
        const exact = this.#chunks.length === 1 && first.length === prefixLen;
        const target = this.#spec.place(exact ? first : this.#peek(prefixLen), size);
        if (this.#stopped) return;
        if (!target) this.#declinedAt = this.#offset;
        else {
          if (target.length !== size - prefixLen) {
            this.#stop(`place() gave ${target.length} bytes for a ${size - prefixLen}-byte payload`);
            return;
          }
          if (exact && this.#chunks.length === 1 && this.#chunks[0] === first) {
            // A view of the chunk, not a copy: the chunk counts as kept (retainsLastChunk).
            this.#chunks.pop();
            this.#big = { head: first, body: target, size, lost: false };
            this.#gaveView = true;
            continue; // #buffered (prefixLen) counts the head, as #fillBig would have
          }
          this.#receiveInto(Buffer.allocUnsafe(prefixLen), target, size);
          continue;
        }
      }
      if (this.#buffered < size) {
        // A large frame: gather it in a buffer of its own, which the socket can read into directly.
        if (size >= (this.#spec.bigFrameSize ?? BIG_FRAME)) this.#receiveInto(null, Buffer.allocUnsafe(size), size);
        return;
      }
      const start = this.#offset;
      const frame = this.#take(size);
      const fds = this.#fdsBefore(start + size);
      this.#afterBig = false;
      this.#handler.frame(frame, fds);
    }
  }

  /**
   * Moves what is buffered into a large frame's buffers and receives the rest
   * there (#fillBig). If the frame completes, what follows it stays buffered
   * for #drain.
   */
  #receiveInto(head: Uint8Array | null, body: Uint8Array, size: number): void {
    const chunks = this.#chunks;
    this.#chunks = [];
    this.#buffered = 0;
    this.#big = { head, body, size, lost: false };
    let i = 0;
    while (i < chunks.length && this.#big !== null && !this.#stopped) this.#fillBig(chunks[i++]!);
    // #fillBig left the completed frame's tail in #chunks; the later chunks follow it.
    for (; i < chunks.length; i++) {
      this.#chunks.push(chunks[i]!);
      this.#buffered += chunks[i]!.length;
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
      this.#gaveView = true;
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
