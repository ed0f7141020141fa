/**
 * UNIX stream sockets that carry file descriptors, on the native addon.
 *
 * fds and bytes: the kernel attaches the fds of one sendmsg() to the bytes of
 * that call, and a recvmsg() that receives fds stops at the end of the
 * sendmsg that carried them. So the writer here sends each write() that has
 * fds in sendmsg calls of its own (never coalesced with other writes), and a
 * reader can rely on this: the fds delivered with a chunk belong to the write
 * that contains the chunk's last byte. This is the same association QEMU and
 * libvhost-user use (they read each header with its own recvmsg).
 */
import { EventEmitter } from 'node:events';
import fs from 'node:fs';
import { native, POLL_READABLE, POLL_WRITABLE, type PollHandle } from './native.js';
import { Fd, closeAll } from './fd.js';
import { SysError, sysError } from './errors.js';

export interface UnixSocketOptions {
  /** Queued bytes above which write() returns false (default 1 MiB). */
  highWaterMark?: number;
  /** Most fds accepted in one received chunk (default 253, the kernel's limit). */
  maxRecvFds?: number;
  /**
   * Most bytes asked of one recvmsg into the socket's pool (default 256 KiB,
   * at most 1 MiB). Reads start smaller (READ_POOL_MIN / 4) and double up to
   * this while each one fills what it asked (see the read pool below).
   */
  readSize?: number;
  /**
   * Asked before each read: a buffer the next bytes should land in (the rest
   * of a large frame, so it is not copied again), or null for the socket's
   * own pool. The 'data' chunk is then a view of that buffer (or, with
   * targetRead set, the byte count goes there instead).
   */
  readTarget?: () => Uint8Array | null;
  /**
   * Asked when readTarget gave a buffer: how many bytes after it the same
   * recvmsg may take into the socket's pool (a scatter read), e.g. the next
   * message's prefix, so that message's payload can be placed too without a
   * read of its own. Those bytes arrive as a second 'data' chunk. 0 or unset:
   * the read stops at the end of the target.
   */
  readTail?: () => number;
  /**
   * With readTarget: called instead of a 'data' event for the bytes a read
   * put into the target: `n` of them, from its start (the callback owns the
   * fds). Spares a view of the target per read.
   */
  targetRead?: (n: number, fds: Fd[]) => void;
  /**
   * Asked after each 'data' read into the socket's pool: false when no
   * listener kept a reference to the chunk's memory, so the next read may
   * reuse it (fresh pool memory costs page faults). Without it, never reused.
   */
  chunkRetained?: () => boolean;
}

interface WriteEntry {
  bufs: Uint8Array[];
  /** Bytes of bufs still to send. */
  length: number;
  /** Owned duplicates of the fds to send with the first byte; null if none. */
  fds: Fd[] | null;
  /** Nothing but this entry refers to bufs (write()'s `owned`, or a copy made by copyQueued()). */
  owned: boolean;
  /** write()'s `shared`: large bufs may be spliced (referenced until the peer reads them), not copied. */
  shared: boolean;
}

const MAX_GATHER = 64;
/** recvmsg calls per poll wake-up at most (the poll fires again if more is waiting). */
const READS_PER_WAKEUP = 64;
/**
 * The read pool: the memory 'data' chunks are views of. A socket has none
 * until its first read into it (a socket may never receive anything but
 * targets, or nothing at all), then one of READ_POOL_MIN bytes; a read asks a
 * quarter of the pool (several reads share one pool), and a read that fills
 * what it asked doubles the pool for the next one (more was waiting), up to
 * READ_POOL_MAX, where reads ask readSize. A pool whose room runs out is
 * replaced, never reused while views of it may be held (chunkRetained), and
 * the new one is halved while the old one's largest read took at most a
 * sixteenth of it. A socket that has not read into its pool for
 * POOL_IDLE_MS to 2 x POOL_IDLE_MS gives the pool up (views handed out keep
 * their memory: only the socket's reference goes) and starts again at
 * READ_POOL_MIN.
 *
 * A socket without a pool of its own (at READ_POOL_MIN, asking at most
 * SHARED_ASK_MAX) reads into the slab all such sockets of the process share
 * (sharedSlab, SHARED_SLAB_SIZE bytes), under the same rules: a chunk given
 * back (chunkRetained false) gives its room back if no read went after it, a
 * full slab is replaced, never reused. Only a socket whose reads fill what
 * they ask (a stream, large messages) gets a pool of its own, and keeps one
 * (shrunk to READ_POOL_MIN at least) until an idle spell gives it up: a
 * connection that mixes large and small messages does not go back and forth. So a connection that talks in
 * small messages holds no read memory of its own, idle or not (was 1 MiB from
 * its creation, then 64 KiB while in use), and a process with many such
 * connections reads them all into the same few KiB, hot in cache. Before the
 * slab, 256 connections that woke up together after an idle spell each
 * allocated a new 64 KiB pool at once: 16 MiB of external memory in a few ms
 * set off a full GC of the client and server, which took the pinned p99 of
 * bench/scale-vfio-user from about 1.2 to about 3 ms (docs/reliability.md).
 */
export const READ_POOL_MIN = 64 * 1024;
export const READ_POOL_MAX = 1024 * 1024;
const POOL_IDLE_MS = 1000;
/** The shared read slab's size, and the largest read asked of it. */
export const SHARED_SLAB_SIZE = READ_POOL_MIN;
const SHARED_ASK_MAX = READ_POOL_MIN >> 2;
/** The slab reads of sockets without a pool of their own go into (null until the first). */
let sharedSlab: Buffer | null = null;
let sharedOffset = 0;

/** Room for a read of `want` (<= SHARED_ASK_MAX) bytes in the shared slab, at sharedOffset. */
function sharedSlabFor(want: number): Buffer {
  if (sharedSlab === null || sharedSlab.length - sharedOffset < want) {
    sharedSlab = Buffer.allocUnsafe(SHARED_SLAB_SIZE);
    sharedOffset = 0;
  }
  return sharedSlab;
}
/** Sockets holding a read pool, checked every POOL_IDLE_MS by one unref'd timer while there are any. */
const poolHolders = new Set<UnixSocket>();
let poolSweep: NodeJS.Timeout | null = null;
/** A shared write's buffers of at least this many bytes are spliced; smaller ones are copied. */
export const SPLICE_MIN = 16 * 1024;
/** Capacity asked for the splice pipe (the default 64 KiB holds less than one 64 KiB message). */
const PIPE_SIZE = 1024 * 1024;

type SocketEvents = {
  data: [chunk: Buffer, fds: Fd[]];
  drain: [];
  end: [];
  error: [err: Error];
  close: [err: Error | undefined];
};

/**
 * A connected non-blocking UNIX stream socket.
 *
 * Events: 'data' (chunk, fds) where the listener owns the fds (they are
 * closed if there is no 'data' listener); 'drain' when the write queue has
 * fallen below the high-water mark after write() returned false; 'end' when
 * the peer closed its side; 'error' (only emitted if someone listens, so a
 * misbehaving peer never crashes the process); 'close' (err?) once, last.
 */
export class UnixSocket extends EventEmitter<SocketEvents> {
  readonly #fd: Fd;
  #poll: PollHandle | null;
  #events = 0;
  #paused = false;
  #queue: WriteEntry[] = [];
  #queued = 0;
  /** Queued entries whose buffers may be views of someone else's memory (copyQueued copies those). */
  #viewEntries = 0;
  #needDrain = false;
  /** cork() depth: writes wait in the queue while above 0. */
  #corked = 0;
  #ending = false;
  #closed = false;
  readonly #highWaterMark: number;
  readonly #readSize: number;
  /** See UnixSocketOptions.readTarget. */
  readTarget: (() => Uint8Array | null) | null;
  /** See UnixSocketOptions.readTail. */
  readTail: (() => number) | null;
  /** See UnixSocketOptions.chunkRetained. */
  chunkRetained: (() => boolean) | null;
  /** See UnixSocketOptions.targetRead. */
  targetRead: ((n: number, fds: Fd[]) => void) | null;
  readonly #fdsOut: Int32Array;
  /** The read pool (null: none held; the next pool read allocates one of #poolSize bytes). */
  #pool: Buffer | null = null;
  #poolOffset = 0;
  /** Size of the next pool allocated (READ_POOL_MIN to READ_POOL_MAX, a power of two). */
  #poolSize = READ_POOL_MIN;
  /** The largest read into the current pool (for shrinking the next one). */
  #poolPeak = 0;
  /** A read went into the pool since the last idle check. */
  #poolUsed = false;
  /** The pipe shared writes go through (created on the first one): [read end, write end]. */
  #pipe: [Fd, Fd] | null = null;
  /** pipeSend's state: [0] = bytes in the pipe, not yet in the socket (they go before anything else). */
  readonly #pipeState = new Float64Array(2);
  /** pipeSend's refs: 1 for a gathered buffer that may be spliced. */
  readonly #refs = new Uint8Array(MAX_GATHER);
  /** When the pipe may be asked for again after pipe() failed (EMFILE): shared writes are copied meanwhile. */
  #pipeRetryAt = 0;
  /** A send failed: the socket is about to be destroyed, nothing more is sent (nor sent twice). */
  #broken = false;

  constructor(fd: Fd, options: UnixSocketOptions = {}) {
    super();
    this.#fd = fd;
    this.#highWaterMark = options.highWaterMark ?? 1024 * 1024;
    this.#readSize = Math.max(1, Math.min(options.readSize ?? 256 * 1024, READ_POOL_MAX));
    this.readTarget = options.readTarget ?? null;
    this.readTail = options.readTail ?? null;
    this.chunkRetained = options.chunkRetained ?? null;
    this.targetRead = options.targetRead ?? null;
    const maxFds = Math.min(options.maxRecvFds ?? native.SCM_MAX_FD, native.SCM_MAX_FD);
    this.#fdsOut = new Int32Array(1 + Math.max(0, maxFds));
    // uv_poll_init makes the fd non-blocking, also one that came blocking (a twin socket the
    // peer sent): splice(), which has no MSG_DONTWAIT, never waits either (test/sys-socket-splice).
    this.#poll = native.pollNew(fd.value, (status, events) => this.#onPoll(status, events));
    // Start reading on the next tick so the creator can attach listeners first.
    process.nextTick(() => this.#updatePoll());
  }

  /** The socket's descriptor number (for diagnostics). */
  get fdNumber(): number {
    return this.#fd.closed ? -1 : this.#fd.value;
  }

  /** Bytes of read pool this socket holds now (0 before its first pooled read, after an idle spell, once closed). */
  get readPoolSize(): number {
    return this.#pool ? this.#pool.length : 0;
  }

  get closed(): boolean {
    return this.#closed;
  }

  /**
   * Asks for a kernel send buffer of `bytes` (SO_SNDBUF, capped by
   * net.core.wmem_max) and returns what was granted. Worth it for large
   * messages: each one then takes fewer sleep/wake-ups of both ends.
   */
  setSendBufferSize(bytes: number): number {
    return native.setSendBuffer(this.#fd.value, bytes);
  }

  /** True while write() accepts data (not closed, not ending). */
  get writable(): boolean {
    return !this.#closed && !this.#ending;
  }

  /** Queued bytes above which write() returns false and 'drain' follows. */
  get writableHighWaterMark(): number {
    return this.#highWaterMark;
  }

  /** Bytes accepted by write() and not yet handed to the kernel. */
  get writableLength(): number {
    return this.#queued;
  }

  /**
   * Queues bytes (one buffer or several gathered) with optional fds attached
   * to their first byte. The fds stay owned by the caller: if they cannot be
   * sent at once they are duplicated. Returns false when the queue is above
   * the high-water mark (wait for 'drain'). `owned`: nothing else refers to
   * these buffers (freshly encoded), so copyQueued() need not copy them.
   *
   * `shared`: the buffers are memory the peer may read anyway (a window it
   * shared with us by fd), so buffers of SPLICE_MIN bytes or more are
   * spliced into the socket (vmsplice + splice through a pipe) rather than
   * copied: the peer then reads them as they are when it reads, which may be
   * after this memory changes. Never for memory the peer must not see later
   * (heap buffers, which may be reused once sent); ignored with `owned`.
   */
  write(data: Uint8Array | readonly Uint8Array[], fds?: readonly (Fd | number)[] | null, owned = false, shared = false): boolean {
    if (this.#closed || this.#ending) throw sysError('EPIPE', 'write', 'socket is closed');
    const bufs = (Array.isArray(data) ? [...data] : [data]) as Uint8Array[];
    let length = 0;
    for (const b of bufs) length += b.byteLength;
    const fdNums = fds && fds.length > 0 ? fds.map((f) => (typeof f === 'number' ? f : f.value)) : null;
    if (fdNums && fdNums.length > native.SCM_MAX_FD) {
      throw sysError('EINVAL', 'sendmsg', `${fdNums.length} fds in one message; at most ${native.SCM_MAX_FD}`);
    }
    if (fdNums && length === 0) throw sysError('EINVAL', 'sendmsg', 'fds need at least one byte to travel with');
    if (length === 0) return this.#queued <= this.#highWaterMark; // nothing to send (and no empty queue entry)

    if (shared && !owned && !fdNums) {
      this.#enqueue(bufs, length, null, false, true);
      if (this.#queue.length === 1 && this.#corked === 0) {
        this.#flush();
        this.#updatePoll();
      }
    } else if (this.#queue.length === 0 && this.#corked === 0 && this.#pipeState[0]! === 0) {
      // Fast path: nothing queued, try to send now.
      const n = this.#send(bufs, fdNums);
      if (n === length) return true;
      if (n < 0) {
        this.#enqueue(bufs, length, fdNums ? dupAll(fdNums) : null, owned, false);
      } else {
        // Partial: the fds went with the first byte.
        this.#enqueue(bufs, length, null, owned, false);
        this.#consume(this.#queue[0]!, n);
      }
      this.#updatePoll();
    } else {
      this.#enqueue(bufs, length, fdNums ? dupAll(fdNums) : null, owned, false);
    }
    if (this.#queued > this.#highWaterMark) {
      this.#needDrain = true;
      return false;
    }
    return true;
  }

  /**
   * Holds writes back until the matching uncork(), which sends what was
   * written meanwhile gathered into as few sendmsg calls as it can (writes
   * carrying fds still travel alone). Nests.
   */
  cork(): void {
    this.#corked++;
  }

  uncork(): void {
    if (this.#corked === 0) return;
    if (--this.#corked > 0 || this.#closed || (this.#queue.length === 0 && this.#pipeState[0]! === 0)) return;
    this.#flush();
    if (this.#closed) return;
    if (this.#ending && this.#queue.length === 0 && this.#pipeState[0]! === 0) {
      this.destroy(); // end() was waiting for these writes
      return;
    }
    this.#updatePoll();
    if (this.#needDrain && this.#queued <= this.#highWaterMark) {
      this.#needDrain = false;
      process.nextTick(() => this.emit('drain'));
    }
  }

  /**
   * Replaces the buffers of writes not yet sent with copies, so changing the
   * memory they were views of no longer changes what is sent. For a caller
   * about to modify memory that queued writes may refer to (write() keeps
   * views, not copies).
   */
  copyQueued(): void {
    if (this.#viewEntries === 0) return;
    for (const e of this.#queue) {
      if (e.bufs.length === 0 || e.owned) continue;
      let have = 0;
      for (const b of e.bufs) have += b.byteLength;
      if (have !== e.length) continue; // a detached view: #flush reports it
      const copy = Buffer.allocUnsafe(e.length);
      let at = 0;
      for (const b of e.bufs) {
        copy.set(b, at);
        at += b.byteLength;
      }
      e.bufs = [copy];
      e.owned = true;
      e.shared = false; // our own heap copy: never spliced (it is freed once sent)
      this.#viewEntries--;
    }
  }

  /** Stops reading (backpressure to the peer); resume() restarts. */
  pause(): void {
    this.#paused = true;
    this.#updatePoll();
  }

  resume(): void {
    this.#paused = false;
    this.#updatePoll();
  }

  /** Closes once the write queue has been sent, or after `timeoutMs` (default 2000) if the peer does not read. */
  end(timeoutMs = 2000): void {
    if (this.#closed || this.#ending) return;
    this.#ending = true;
    if (this.#queue.length === 0 && this.#pipeState[0]! === 0) this.destroy();
    else {
      this.#updatePoll();
      setTimeout(() => this.destroy(), timeoutMs).unref();
    }
  }

  /** Closes now: queued writes are dropped (their fds closed); emits 'close'. */
  destroy(err?: Error): void {
    if (this.#closed) return;
    this.#closed = true;
    if (this.#poll) {
      native.pollClose(this.#poll);
      this.#poll = null;
    }
    for (const e of this.#queue) if (e.fds) closeAll(e.fds);
    this.#queue = [];
    this.#queued = 0;
    this.#viewEntries = 0;
    if (this.#pipe) closeAll(this.#pipe);
    this.#pipeState[0] = 0;
    this.#releasePool();
    this.#fd.close();
    if (err && this.listenerCount('error') > 0) this.emit('error', err);
    this.emit('close', err);
  }

  close(): void {
    this.destroy();
  }

  #send(bufs: Uint8Array[], fds: readonly number[] | null): number {
    if (this.#broken) return -1;
    try {
      return native.sendmsg(this.#fd.value, bufs.length === 1 ? bufs[0]! : bufs, fds);
    } catch (err) {
      this.#broken = true;
      // EPIPE / ECONNRESET: the peer is gone. Report it once, after this call returns.
      process.nextTick(() => this.destroy(err as Error));
      return -1;
    }
  }

  #enqueue(bufs: Uint8Array[], length: number, fds: Fd[] | null, owned: boolean, shared: boolean): void {
    this.#queue.push({ bufs, length, fds, owned, shared });
    if (!owned) this.#viewEntries++;
    this.#queued += length;
  }

  /** Drops n sent bytes from the head entry. */
  #consume(entry: WriteEntry, n: number): void {
    this.#queued -= n;
    entry.length -= n;
    if (entry.fds && n > 0) {
      closeAll(entry.fds);
      entry.fds = null;
    }
    while (n > 0) {
      const b = entry.bufs[0]!;
      if (n >= b.byteLength) {
        n -= b.byteLength;
        entry.bufs.shift();
      } else {
        entry.bufs[0] = b.subarray(n);
        n = 0;
      }
    }
  }

  #flush(): void {
    if (this.#broken) return;
    // What is in the splice pipe was written before anything queued.
    if (this.#pipeState[0]! > 0 && !this.#drainPipe()) return;
    while (this.#queue.length > 0 && !this.#closed) {
      const head = this.#queue[0]!;
      let bufs = head.bufs;
      let total = head.length;
      let entries = 1;
      let splice = false;
      // Gather following writes that carry no fds into the same sendmsg.
      if (!head.fds) {
        bufs = [...head.bufs];
        splice = this.#markRefs(head, 0);
        while (entries < this.#queue.length && bufs.length < MAX_GATHER) {
          const next = this.#queue[entries]!;
          if (next.fds || bufs.length + next.bufs.length > MAX_GATHER) break;
          if (this.#markRefs(next, bufs.length)) splice = true;
          bufs.push(...next.bufs);
          total += next.length;
          entries++;
        }
      }
      let actual = 0;
      for (const b of bufs) actual += b.byteLength;
      if (actual !== total) {
        // A queued buffer was a view of memory that has since been unmapped (it is now empty).
        this.destroy(sysError('EFAULT', 'sendmsg', 'a queued buffer was detached before it was sent'));
        return;
      }
      if (splice && !this.#havePipe()) splice = false; // no pipe to be had: copied, as any write
      const n = splice ? this.#pipeSendParts(bufs) : this.#send(bufs, head.fds ? head.fds.map((f) => f.value) : null);
      if (n < 0) return;
      let left = n;
      while (left > 0 && this.#queue.length > 0) {
        const e = this.#queue[0]!;
        const take = Math.min(left, e.length);
        this.#consume(e, take);
        left -= take;
        if (e.length === 0) {
          this.#queue.shift();
          if (!e.owned) this.#viewEntries--;
        }
      }
      if (n < total || this.#pipeState[0]! > 0) return;
    }
  }

  /** Sets #refs for an entry's bufs gathered at `at`; true if one of them is to be spliced. */
  #markRefs(e: WriteEntry, at: number): boolean {
    let any = false;
    for (let i = 0; i < e.bufs.length; i++) {
      const ref = e.shared && e.bufs[i]!.byteLength >= SPLICE_MIN;
      this.#refs[at + i] = ref ? 1 : 0;
      if (ref) any = true;
    }
    return any;
  }

  /** Gathered bufs through the splice pipe (see write()'s `shared`): bytes taken from them, or -1. */
  #pipeSendParts(bufs: Uint8Array[]): number {
    const pipe = this.#pipe!; // created by #havePipe() before anything went into it
    try {
      return native.pipeSend(this.#fd.value, pipe[0].value, pipe[1].value, bufs, this.#refs, this.#pipeState);
    } catch (err) {
      this.#broken = true; // what pipeSend took is in the pipe: it must not be sent again
      process.nextTick(() => this.destroy(err as Error)); // EPIPE / ECONNRESET, as #send
      return -1;
    }
  }

  /** The splice pipe, created on first use; false if none can be had now (EMFILE, pipe limits). */
  #havePipe(): boolean {
    if (this.#pipe) return true;
    if (performance.now() < this.#pipeRetryAt) return false;
    try {
      const [r, w] = native.pipe(PIPE_SIZE);
      this.#pipe = [new Fd(r), new Fd(w)];
      return true;
    } catch {
      this.#pipeRetryAt = performance.now() + 1000; // a healthy connection goes on copying
      return false;
    }
  }

  /** Moves what is in the splice pipe into the socket; true once it is empty. */
  #drainPipe(): boolean {
    return this.#pipeSendParts([]) >= 0 && this.#pipeState[0]! === 0;
  }

  #onPoll(status: number, events: number): void {
    if (this.#closed) return;
    if (status < 0) {
      // libuv reports POLLERR as a bare EBADF: the socket's own error says what happened
      // (ECONNRESET when the peer closed without reading what we sent).
      let err: Error = new SysError('EIO', 'poll', -status, `poll failed with status ${status}`);
      try {
        native.checkSocketError(this.#fd.value);
      } catch (e) {
        err = e as Error;
      }
      this.destroy(err);
      return;
    }
    if (events & POLL_WRITABLE && this.#corked === 0) {
      this.#flush();
      if (this.#closed) return;
      if (this.#queue.length === 0 && this.#pipeState[0]! === 0 && this.#ending) {
        this.destroy();
        return;
      }
      if (this.#needDrain && this.#queued <= this.#highWaterMark) {
        this.#needDrain = false;
        this.emit('drain');
      }
    }
    if (events & POLL_READABLE) {
      // What the 'data' listeners write in answer to one wake-up's reads leaves
      // together, in as few sendmsg calls as possible (one wake-up of the peer).
      this.cork();
      try {
        this.#read();
      } finally {
        this.uncork();
      }
    }
    if (!this.#closed) this.#updatePoll();
  }

  #read(): void {
    const fdsOut = this.#fdsOut;
    // A bounded number of reads per wake-up keeps other sockets served. 64, not 16: a stream of
    // placed 64 KiB messages takes one read each, and each extra loop turn costs a wake-up's work
    // (measured, 64 KiB message DMA pinned: +3-25% in 6 alternating pairs).
    for (let i = 0; i < READS_PER_WAKEUP && !this.#paused && !this.#closed; i++) {
      let target = this.readTarget?.() ?? null;
      if (target && target.length === 0) target = null; // never a zero-length read: it would look like EOF
      // A target's read may run on into the pool (readTail): the next message's prefix.
      const tail = target ? Math.min(Math.max(0, this.readTail?.() ?? 0), this.#readSize) : 0;
      const ask = this.#poolSize === READ_POOL_MAX ? this.#readSize : Math.min(this.#readSize, this.#poolSize >> 2);
      const want = target ? tail : ask;
      // Small reads of a socket without a pool of its own go into the shared slab.
      const shared = want > 0 && want <= SHARED_ASK_MAX && this.#poolSize === READ_POOL_MIN && this.#pool === null;
      const pool = want === 0 ? null : shared ? sharedSlabFor(want) : this.#poolFor(want);
      const at = shared ? sharedOffset : this.#poolOffset;
      let n: number;
      try {
        n = target
          ? tail > 0
            ? native.recvmsg(this.#fd.value, target, 0, target.length, fdsOut, pool!, at, tail)
            : native.recvmsg(this.#fd.value, target, 0, target.length, fdsOut)
          : native.recvmsg(this.#fd.value, pool!, at, ask, fdsOut);
      } catch (err) {
        this.destroy(err as Error);
        return;
      }
      if (n < 0) return;
      if (n === 0) {
        this.emit('end');
        this.destroy();
        return;
      }
      const nfds = fdsOut[0]!;
      const fds: Fd[] = [];
      for (let k = 0; k < nfds; k++) fds.push(new Fd(fdsOut[1 + k]!));
      // Bytes that went to the pool: all of them, or a target read's tail.
      const inPool = target ? Math.max(0, n - target.length) : n;
      if (target) {
        // The fds belong to the last byte read: with the tail's chunk if there is one.
        const targetRead = this.targetRead;
        if (targetRead) targetRead(n - inPool, inPool > 0 ? [] : fds);
        else this.#deliver(Buffer.from(target.buffer, target.byteOffset, n - inPool), inPool > 0 ? [] : fds);
        if (inPool > 0 && this.#closed) closeAll(fds);
      }
      if (inPool > 0 && !this.#closed) {
        const chunk = pool!.subarray(at, at + inPool);
        const next = at + ((inPool + 7) & ~7);
        if (shared) sharedOffset = next;
        else {
          this.#poolOffset = next;
          if (inPool > this.#poolPeak) this.#poolPeak = inPool;
        }
        // A pool read that filled what it asked: more was waiting, so the next ones ask more.
        if (!target && inPool === ask && ask < this.#readSize) this.#poolSize *= 2;
        this.#deliver(chunk, fds);
        // Nobody kept the chunk: its memory (hot in cache, already faulted in) takes the next read;
        // in the shared slab only if no other socket's read went after it meanwhile.
        if (this.chunkRetained?.() === false) {
          if (shared) {
            if (sharedSlab === pool && sharedOffset === next) sharedOffset = at;
          } else if (this.#pool === pool) this.#poolOffset = at;
        }
      }
      if (n < (target ? target.length + tail : ask)) return;
    }
  }

  /** The pool with room for a read of `want` bytes at #poolOffset: the current one, or a new one. */
  #poolFor(want: number): Buffer {
    this.#poolUsed = true;
    const pool = this.#pool;
    if (pool !== null && pool.length - this.#poolOffset >= want) return pool;
    if (pool !== null) {
      // Replaced (views of it may be held). Its reads took little of it: the next one is smaller.
      while (this.#poolSize > READ_POOL_MIN && this.#poolPeak <= this.#poolSize >> 4) this.#poolSize >>= 1;
    } else {
      poolHolders.add(this);
      poolSweep ??= setInterval(UnixSocket.#sweepPools, POOL_IDLE_MS).unref();
    }
    this.#pool = Buffer.allocUnsafe(Math.max(this.#poolSize, want));
    this.#poolOffset = 0;
    this.#poolPeak = 0;
    return this.#pool;
  }

  /** Drops the socket's reference to its pool; the next pooled read starts again at READ_POOL_MIN. */
  #releasePool(): void {
    this.#pool = null;
    this.#poolOffset = 0;
    this.#poolPeak = 0;
    this.#poolSize = READ_POOL_MIN;
    poolHolders.delete(this);
    if (poolHolders.size === 0 && poolSweep !== null) {
      clearInterval(poolSweep);
      poolSweep = null;
    }
  }

  /** Every POOL_IDLE_MS: a socket that did not read into its pool since the last time gives it up. */
  static #sweepPools(): void {
    for (const s of poolHolders) {
      if (s.#poolUsed) s.#poolUsed = false;
      else s.#releasePool();
    }
  }

  #deliver(chunk: Buffer, fds: Fd[]): void {
    if (this.listenerCount('data') > 0) this.emit('data', chunk, fds);
    else closeAll(fds);
  }

  #updatePoll(): void {
    if (this.#closed || !this.#poll) return;
    // Corked writes wait for uncork(), not for the socket to become writable.
    const writing = (this.#queue.length > 0 || this.#pipeState[0]! > 0) && this.#corked === 0;
    const want = (this.#paused || this.#ending ? 0 : POLL_READABLE) | (writing ? POLL_WRITABLE : 0);
    if (want !== this.#events) {
      this.#events = want;
      native.pollStart(this.#poll, want);
    }
  }
}

/** A connected pair of sockets in this process (socketpair(2)). */
export function socketPair(options?: UnixSocketOptions): [UnixSocket, UnixSocket] {
  const [a, b] = native.socketpair();
  return [new UnixSocket(new Fd(a), options), new UnixSocket(new Fd(b), options)];
}

/** Raw socketpair fds, e.g. to hand one end to a child process. */
export function socketPairFds(): [Fd, Fd] {
  const [a, b] = native.socketpair();
  return [new Fd(a), new Fd(b)];
}

export interface ConnectOptions extends UnixSocketOptions {
  /** How long to retry while the listener's backlog is full (default 5000 ms). */
  timeoutMs?: number;
}

/** Connects to a listening UNIX socket at `path`. */
export async function connectUnix(path: string, options: ConnectOptions = {}): Promise<UnixSocket> {
  const deadline = Date.now() + (options.timeoutMs ?? 5000);
  let delay = 1;
  for (;;) {
    try {
      return new UnixSocket(new Fd(native.connect(path)), options);
    } catch (err) {
      if (!(err instanceof SysError) || err.code !== 'EAGAIN' || Date.now() >= deadline) throw err;
    }
    await new Promise((r) => setTimeout(r, delay));
    delay = Math.min(delay * 2, 50);
  }
}

export interface ListenOptions extends UnixSocketOptions {
  backlog?: number;
}

type ServerEvents = {
  connection: [socket: UnixSocket];
  error: [err: Error];
  close: [];
};

/**
 * A listening UNIX socket. A stale socket file left by a dead process is
 * replaced; a path where someone is listening, or that is not a socket, is
 * refused with EADDRINUSE.
 */
export class UnixServer extends EventEmitter<ServerEvents> {
  readonly path: string;
  readonly #fd: Fd;
  #poll: PollHandle | null;
  readonly #ino: number;
  readonly #options: UnixSocketOptions;
  #closed = false;

  private constructor(path: string, fd: Fd, options: UnixSocketOptions) {
    super();
    this.path = path;
    this.#fd = fd;
    this.#options = options;
    this.#ino = fs.statSync(path).ino;
    this.#poll = native.pollNew(fd.value, (status) => this.#onPoll(status));
    native.pollStart(this.#poll, POLL_READABLE);
  }

  static listen(path: string, options: ListenOptions = {}): UnixServer {
    const backlog = options.backlog ?? 128;
    let fd: number;
    try {
      fd = native.listen(path, backlog);
    } catch (err) {
      if (!(err instanceof SysError) || err.code !== 'EADDRINUSE') throw err;
      removeStaleSocket(path);
      fd = native.listen(path, backlog);
    }
    return new UnixServer(path, new Fd(fd), options);
  }

  get closed(): boolean {
    return this.#closed;
  }

  /** Stops listening and removes the socket file (if it is still ours). */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    if (this.#poll) native.pollClose(this.#poll);
    this.#poll = null;
    this.#fd.close();
    try {
      if (fs.statSync(this.path).ino === this.#ino) fs.unlinkSync(this.path);
    } catch {
      // already gone
    }
    this.emit('close');
  }

  #onPoll(status: number): void {
    if (this.#closed) return;
    if (status < 0) {
      if (this.listenerCount('error') > 0) this.emit('error', new SysError('EIO', 'poll', -status));
      return;
    }
    // Accept a bounded batch per wake-up; the poll fires again if more wait.
    for (let i = 0; i < 64 && !this.#closed; i++) {
      let c: number;
      try {
        c = native.accept(this.#fd.value);
      } catch (err) {
        // EMFILE and the like: report, keep listening.
        if (this.listenerCount('error') > 0) this.emit('error', err as Error);
        return;
      }
      if (c < 0) return;
      const sock = new UnixSocket(new Fd(c), this.#options);
      if (this.listenerCount('connection') > 0) this.emit('connection', sock);
      else sock.destroy();
    }
  }
}

/** Unlinks `path` if it is a socket nobody listens on; throws EADDRINUSE otherwise. */
function removeStaleSocket(path: string): void {
  let st: fs.Stats;
  try {
    st = fs.lstatSync(path);
  } catch {
    return; // vanished meanwhile: bind again
  }
  if (!st.isSocket()) throw sysError('EADDRINUSE', 'listen', `${path} exists and is not a socket`);
  let probe: number;
  try {
    probe = native.connect(path);
  } catch (err) {
    if (err instanceof SysError && (err.code === 'ECONNREFUSED' || err.code === 'ENOENT')) {
      fs.rmSync(path, { force: true });
      return;
    }
    // EAGAIN: a live listener with a full backlog.
    throw sysError('EADDRINUSE', 'listen', `${path} is in use`);
  }
  native.close(probe);
  throw sysError('EADDRINUSE', 'listen', `${path} is in use by a listening process`);
}

/** Duplicates of `fds` for a queued write; if one cannot be made (EMFILE), none is kept. */
function dupAll(fds: readonly number[]): Fd[] {
  const out: Fd[] = [];
  try {
    for (const f of fds) out.push(new Fd(native.dup(f)));
  } catch (err) {
    closeAll(out);
    throw err;
  }
  return out;
}
