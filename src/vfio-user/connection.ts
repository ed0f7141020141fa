/**
 * One vfio-user socket, either end: frames in (with their fds), decoded
 * messages out to a request handler, replies matched to the requests we sent
 * (ids, timeouts), and the chores both ends share.
 *
 * Ordering: incoming commands are handed to the handler one at a time, in
 * the order received; a handler that returns a promise holds back the next
 * command until it settles (the spec's in-order processing, which posted
 * writes rely on). Replies to our own requests are never held back, so a
 * handler may itself await a request to the peer on the same socket.
 *
 * A broken stream (bad framing, the peer gone) closes this connection only:
 * every pending request fails with a ConnectionError, buffered fds are
 * closed.
 */
import { EventEmitter } from 'node:events';
import { FrameReader } from '../wire/reader.js';
import { ProtocolError } from '../wire/errors.js';
import type { Fd, UnixSocket } from '../sys/index.js';
import { closeAll } from '../sys/index.js';
import { Command, HEADER_SIZE, HeaderFlags, MessageType } from './constants.js';
import { Errno, errnoName } from './errno.js';
import {
  canPlace,
  decodeMessage,
  encodeErrorReply,
  encodeHeader,
  encodeReply,
  encodeRequest,
  type CodecCommand,
  type CodecLimits,
  type Encoded,
  type Header,
  type ReplyBodies,
  type ReplyMessage,
  type RequestBodies,
  type RequestMessage,
} from './messages.js';

/** Smallest send buffer asked for (SO_SNDBUF). */
const SEND_BUFFER_MIN = 4 << 20;
/**
 * Bytes waiting on the socket above which incoming commands wait (at least 4
 * largest messages): a peer that sends requests and does not read the replies
 * cannot make us queue without bound. Replies are often views of memory (a
 * client's DMA_READ replies) that may have to be copied later.
 */
const REPLY_QUEUE_LIMIT = 16 << 20;
/** Commands queued behind a slow one before the socket stops being read. */
const MAX_QUEUED = 1024;
/**
 * Bytes of a message kept when its payload is placed: the header and the
 * 16 fixed bytes of DMA_READ / DMA_WRITE / REGION_READ / REGION_WRITE
 * bodies; the data after them is received straight into its destination.
 */
export const PLACE_PREFIX = HEADER_SIZE + 16;

/** The connection is gone, or a request to the peer failed without a reply. */
export class ConnectionError extends Error {
  readonly code: 'VFU_CLOSED' | 'VFU_TIMEOUT' | 'VFU_PEER_ERROR' | 'VFU_BAD_REPLY';
  /** The peer's errno for VFU_PEER_ERROR. */
  readonly errno: number;
  constructor(code: ConnectionError['code'], message: string, errno = 0, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'ConnectionError';
    this.code = code;
    this.errno = errno;
  }
}

/** What a request handler returns: a reply body for the codec, raw payload bytes, or nothing. */
export type HandlerReply = { body?: unknown; raw?: Uint8Array | Uint8Array[]; fds?: readonly (Fd | number)[] } | void;

export type RequestHandler = (msg: RequestMessage, fds: Fd[]) => HandlerReply | Promise<HandlerReply>;

export interface ConnectionOptions {
  /** Our receive limits (msg size, data transfer size). */
  limits: CodecLimits;
  onRequest: RequestHandler;
  /** Default timeout of our requests to the peer, ms (default 5000). */
  timeoutMs?: number;
  /** A command that could not be decoded (after its error reply was sent). */
  onBadRequest?: (header: Header, err: unknown) => void;
  /** Called for every message in and out, for --trace. */
  trace?: (direction: 'in' | 'out', header: Header, detail: unknown) => void;
  /**
   * Where the data of an incoming command should be received: given the
   * first PLACE_PREFIX bytes of a command of `size` bytes (4 KiB or more),
   * a destination of exactly size - PLACE_PREFIX bytes, or null to receive
   * it as usual. Asked only when the command would be dispatched next (none
   * queued or in progress), so the data lands in the order commands are
   * processed. The command then reaches onRequest with that destination as
   * its data.
   */
  placeRequest?: (prefix: Uint8Array, size: number) => Uint8Array | null;
  /**
   * A command answered without decoding it into a message: given the frame
   * (and its placed data, as for placeRequest), the reply's bytes, or null
   * to take the usual path (decode, onRequest, encode). For hot commands
   * (DMA_READ / DMA_WRITE served by a client); it must accept only what
   * decodeMessage would, and leave anything else to the usual path, which
   * answers errors. Not called for commands that carry fds, nor when tracing.
   * A reply of one part must be a fresh buffer (nothing else refers to it);
   * further parts may be views of the caller's memory.
   */
  fastRequest?: (frame: Uint8Array, placed: Uint8Array | undefined) => Uint8Array[] | null;
}

/** A reply with the fds that came with it (owned by the caller). */
export type ReplyWithFds<C extends CodecCommand> = ReplyMessage & { body: ReplyBodies[C]; fds: Fd[] };

/**
 * Receives the replies of requests sent with Connection.requestRaw: one
 * object for a whole transfer instead of a promise per message. Called from
 * inside the socket's read handler, so requests sent from reply() leave
 * together with the other writes of that read.
 */
export interface ReplySink {
  /**
   * A reply whose header was checked (a reply to this command, no Error,
   * msg_size = frame + placed bytes). `frame` is the whole message, or its
   * first PLACE_PREFIX bytes when the rest was received into `placed` (the
   * request's `into`). The body is the sink's to check.
   */
  reply(frame: Uint8Array, placed: Uint8Array | undefined, cookie: number): void;
  /** The request failed: an error reply, a malformed reply, a timeout or the connection closing. */
  fail(err: Error, cookie: number): void;
}

interface Pending {
  command: number;
  /** requestRaw's sink (then resolve/reject are unused) and the caller's number for the request. */
  sink: ReplySink | null;
  cookie: number;
  /** Where the reply's data is to be received (request option `into`). */
  into: Uint8Array | undefined;
  resolve: (msg: ReplyMessage & { fds: Fd[] }) => void;
  reject: (err: Error) => void;
  /** performance.now() after which the request times out. */
  deadline: number;
  timeoutMs: number;
}

type ConnectionEvents = { close: [err: Error | undefined]; error: [err: Error] };

/** Maps any thrown value to the errno a reply carries. */
export function errnoOf(err: unknown): number {
  if (err && typeof err === 'object' && 'errno' in err) {
    const n = (err as { errno: unknown }).errno;
    if (typeof n === 'number' && Number.isInteger(n) && n > 0 && n < 4096) return n;
  }
  return Errno.EIO;
}

export class Connection extends EventEmitter<ConnectionEvents> {
  readonly socket: UnixSocket;
  limits: CodecLimits;
  readonly #reader: FrameReader;
  readonly #onRequest: RequestHandler;
  readonly #timeoutMs: number;
  readonly #trace: ConnectionOptions['trace'];
  readonly #onBadRequest: ConnectionOptions['onBadRequest'];
  readonly #placeRequest: ConnectionOptions['placeRequest'];
  readonly #fastRequest: ConnectionOptions['fastRequest'];
  readonly #pending = new Map<number, Pending>();
  /** Commands waiting for the one in progress. */
  readonly #queue: { frame: Uint8Array; fds: Fd[]; placed: Uint8Array | undefined }[] = [];
  #busy = false;
  #draining = false;
  /** Reading is paused: too many queued commands, or replies the peer does not read. */
  #pausedFor = { queue: false, writes: false };
  /** ids of requests that timed out: kept out of use until their late reply comes (or never). */
  readonly #stale = new Set<number>();
  #unsolicited = 0;
  #nextId = 1;
  #closed = false;
  /** Why close() was called, for the pending requests it fails. */
  #localClose: Error | null = null;
  /**
   * One timer for all pending requests, due at the earliest deadline (a timer
   * per request costs a Timeout and its list bookkeeping per message).
   */
  #timer: NodeJS.Timeout | null = null;
  #timerAt = Infinity;

  constructor(socket: UnixSocket, options: ConnectionOptions) {
    super();
    this.socket = socket;
    this.limits = options.limits;
    this.#onRequest = options.onRequest;
    this.#timeoutMs = options.timeoutMs ?? 5000;
    this.#trace = options.trace;
    this.#onBadRequest = options.onBadRequest;
    this.#placeRequest = options.placeRequest;
    this.#fastRequest = options.fastRequest;
    this.#reader = new FrameReader(
      {
        headerSize: HEADER_SIZE,
        frameSize: (h) => h[4]! | (h[5]! << 8) | (h[6]! << 16) | (h[7]! * 2 ** 24),
        get maxFrameSize() {
          return options.limits.maxMsgSize;
        },
        placePrefix: PLACE_PREFIX,
        place: (prefix, size) => this.#place(prefix, size),
      },
      {
        frame: (frame, fds, placed) => this.#onFrame(frame, fds, placed),
        oversized: (header, size) => this.#onOversized(header, size),
        fatal: (reason) => this.close(new ProtocolError('VFU_BAD_SIZE', reason)),
      },
    );
    socket.readTarget = () => this.#reader.readTarget();
    socket.readTail = () => this.#reader.readTail();
    socket.chunkRetained = () => this.#reader.retainsLastChunk;
    socket.targetRead = (n, fds) => {
      socket.cork(); // as for 'data' below
      try {
        this.#reader.pushTarget(n, fds);
      } catch (err) {
        // Only a bug of ours gets here (the socket reports each read into the target it was given):
        // this connection ends, not the process.
        this.close(err as Error);
      } finally {
        socket.uncork();
      }
    };
    // Room in the kernel for two largest messages, and at least for a DMA transfer's requests in
    // flight (dma-transfer.ts DMA_WINDOW_BYTES): a sender that fills the buffer sleeps until the peer
    // reads, and each such sleep is a wake-up of both ends (best effort: the kernel caps it at
    // net.core.wmem_max). Measured, 64 KiB message DMA: 4 MiB against 2 x 64 KiB, unpinned,
    // 1.7-2.2 GB/s against 1.0-1.3; pinned, DMA_READ +10-25%.
    try {
      socket.setSendBufferSize(Math.min(Math.max(2 * options.limits.maxMsgSize, SEND_BUFFER_MIN), 8 << 20));
    } catch {
      // not fatal: the default buffer works, only slower for large messages
    }
    socket.on('data', (chunk, fds) => {
      // The replies to the commands of one read leave together.
      socket.cork();
      try {
        this.#reader.push(chunk, fds);
      } finally {
        socket.uncork();
      }
    });
    socket.on('close', (err) => this.#shutdown(err ?? this.#localClose ?? new ConnectionError('VFU_CLOSED', 'the peer closed the connection')));
    socket.on('drain', () => {
      this.#setPaused('writes', false);
      this.#next(); // commands held back while our replies were not being read
    });
  }

  get closed(): boolean {
    return this.#closed;
  }

  /** Requests awaiting a reply. */
  get pendingCount(): number {
    return this.#pending.size;
  }

  /**
   * Sends a command and resolves with its reply; rejects on an error reply,
   * timeout or close. `into`: for a reply that carries data (DMA_READ,
   * REGION_READ), where to receive it: the socket reads a large reply's data
   * straight into it, and the reply's `data` is then `into` itself (compare
   * before copying). It must be exactly the size of the data asked for; if
   * the request fails, its content is unspecified.
   */
  request<C extends CodecCommand>(
    command: C,
    body: RequestBodies[C],
    options: { fds?: readonly (Fd | number)[]; timeoutMs?: number; into?: Uint8Array } = {},
  ): Promise<ReplyWithFds<C>> {
    if (this.#closed) return Promise.reject(new ConnectionError('VFU_CLOSED', 'connection is closed'));
    const id = this.#allocId();
    const msg = encodeRequest(command, id, body);
    return new Promise((resolve, reject) => {
      const timeoutMs = options.timeoutMs ?? this.#timeoutMs;
      const deadline = performance.now() + timeoutMs;
      const into = options.into;
      this.#pending.set(id, {
        command,
        sink: null,
        cookie: 0,
        into,
        resolve: resolve as (m: ReplyMessage & { fds: Fd[] }) => void,
        reject,
        deadline,
        timeoutMs,
      });
      if (deadline < this.#timerAt) this.#armTimer(deadline);
      try {
        this.#write(msg, options.fds);
      } catch (err) {
        this.#failPending(id, err as Error);
      }
    });
  }

  /**
   * Sends a request already encoded by the caller, for streams of many
   * requests (DMA chunks): `head` is the message's first bytes with the id
   * left for this method to fill in (bytes 0-1), `data` an optional payload
   * sent after it (gathered, not copied). The reply goes to `sink` with
   * `cookie`, not to a promise; `into` is where a large reply's data is
   * received (as request()'s option). `shared`: `data` is memory the peer
   * may read anyway, so it may be spliced, not copied (UnixSocket.write).
   * Throws if the connection is closed.
   */
  requestRaw(
    command: number,
    head: Uint8Array,
    data: Uint8Array | null,
    into: Uint8Array | undefined,
    sink: ReplySink,
    cookie: number,
    shared = false,
  ): void {
    if (this.#closed) throw new ConnectionError('VFU_CLOSED', 'connection is closed');
    const id = this.#allocId();
    head[0] = id & 0xff;
    head[1] = id >>> 8;
    const timeoutMs = this.#timeoutMs;
    const deadline = performance.now() + timeoutMs;
    this.#pending.set(id, { command, sink, cookie, into, resolve: noop, reject: noop, deadline, timeoutMs });
    if (deadline < this.#timerAt) this.#armTimer(deadline);
    try {
      this.#writeParts(data ? [head, data] : [head], undefined, data === null, shared);
    } catch (err) {
      this.#failPending(id, err as Error);
    }
  }

  #armTimer(at: number): void {
    if (this.#timer) clearTimeout(this.#timer);
    this.#timerAt = at;
    // Not cleared when the last reply comes (that would cost a timer per request again):
    // it fires, finds nothing due, and is not re-armed; close() clears it.
    this.#timer = setTimeout(() => this.#expire(), Math.max(0, Math.ceil(at - performance.now())));
  }

  /** Fails the requests whose deadline passed; re-arms for the next one. */
  #expire(): void {
    this.#timer = null;
    this.#timerAt = Infinity;
    const now = performance.now();
    let next = Infinity;
    for (const [id, p] of [...this.#pending]) {
      if (p.deadline <= now) {
        this.#stale.add(id);
        this.#failPending(id, new ConnectionError('VFU_TIMEOUT', `no reply to ${Command[p.command]} (id ${id}) in ${p.timeoutMs} ms`));
      } else if (p.deadline < next) {
        next = p.deadline;
      }
    }
    if (next < Infinity && !this.#closed) this.#armTimer(next);
  }

  /**
   * Stops receiving into `target` if a message's payload is being placed
   * there (placeRequest, or a request's `into`): the rest of it is discarded
   * and the message is handled with its data missing (refused). For memory
   * that stops being ours to write, e.g. a DMA window just unmapped.
   */
  dropPlacement(target: Uint8Array): void {
    this.#reader.dropPlacement(target);
  }

  /** Runs `fn`, sending the messages it writes together (as few sendmsg calls as possible). */
  batch<T>(fn: () => T): T {
    this.socket.cork();
    try {
      return fn();
    } finally {
      this.socket.uncork();
    }
  }

  /** Sends a command with No_reply set. */
  post<C extends CodecCommand>(command: C, body: RequestBodies[C], fds?: readonly (Fd | number)[]): void {
    if (this.#closed) throw new ConnectionError('VFU_CLOSED', 'connection is closed');
    this.#write(encodeRequest(command, this.#allocId(), body, HeaderFlags.NO_REPLY), fds);
  }

  /** Closes the socket; pending requests fail. */
  close(err?: Error): void {
    if (this.#closed) return;
    // The socket's 'close' (emitted inside destroy()) must not blame the peer for our own close.
    this.#localClose = err ?? new ConnectionError('VFU_CLOSED', 'connection closed');
    this.socket.destroy(err);
    this.#shutdown(this.#localClose);
  }

  #allocId(): number {
    // ids are 16 bits; skip ones still in flight
    for (let i = 0; i < 0x10000; i++) {
      const id = this.#nextId;
      this.#nextId = (this.#nextId + 1) & 0xffff;
      if (!this.#pending.has(id) && !this.#stale.has(id)) return id;
    }
    throw new ConnectionError('VFU_CLOSED', 'all 65536 message ids are in flight');
  }

  #write(msg: Encoded, fds?: readonly (Fd | number)[]): void {
    if (!this.socket.writable) return; // closing: nothing more goes out
    if (this.#trace) this.#traceOut(Array.isArray(msg) ? msg : [msg]);
    // A peer that does not read its replies stops being read from (backpressure), until 'drain'.
    // A single buffer is a fresh encoding (nothing else refers to it); a pair gathers the caller's data.
    if (!this.socket.write(msg as Uint8Array | Uint8Array[], fds, !Array.isArray(msg))) this.#setPaused('writes', true);
  }

  #setPaused(why: 'queue' | 'writes', on: boolean): void {
    if (this.#pausedFor[why] === on) return;
    this.#pausedFor[why] = on;
    if (this.#pausedFor.queue || this.#pausedFor.writes) this.socket.pause();
    else if (!this.#closed) this.socket.resume();
  }

  /** Decodes what we send, for the trace only (costs nothing when tracing is off). */
  #traceOut(parts: Uint8Array[]): void {
    const bytes = parts.length === 1 ? parts[0]! : Buffer.concat(parts);
    let detail: unknown;
    try {
      const m = decodeMessage(bytes, { ...this.limits, maxMsgSize: 0xffffffff, maxDataXferSize: 0xffffffff });
      detail = m.kind === 'error' ? undefined : m.body;
    } catch {
      detail = undefined;
    }
    this.#trace!('out', decodeHeaderQuick(bytes), detail);
  }

  #onOversized(header: Uint8Array, size: number): boolean {
    const h = decodeHeaderQuick(header);
    // Answer a command we will not buffer, then skip its body: the stream stays framed.
    if ((h.flags & HeaderFlags.TYPE_MASK) === MessageType.COMMAND) {
      // EINVAL, as libvfio-user answers an oversized message.
      if (!(h.flags & HeaderFlags.NO_REPLY)) this.#write(encodeErrorReply(h.msgId, h.cmd, Errno.EINVAL));
    } else {
      this.#failPending(h.msgId, new ConnectionError('VFU_BAD_REPLY', `reply of ${size} bytes exceeds our limit`));
    }
    return true;
  }

  /** FrameSpec.place: the destination of a large message's data, or null. */
  #place(prefix: Uint8Array, size: number): Uint8Array | null {
    const flags = prefix[8]!;
    const type = flags & HeaderFlags.TYPE_MASK;
    if (type === MessageType.REPLY) {
      if (flags & HeaderFlags.ERROR) return null;
      const p = this.#pending.get(prefix[0]! | (prefix[1]! << 8));
      if (!p?.into || p.into.length !== size - PLACE_PREFIX || p.command !== (prefix[2]! | (prefix[3]! << 8))) return null;
      return canPlace(p.command, true) ? p.into : null;
    }
    if (
      type === MessageType.COMMAND &&
      this.#placeRequest &&
      !this.#busy &&
      this.#queue.length === 0 &&
      !this.#repliesBacklogged() &&
      canPlace(prefix[2]! | (prefix[3]! << 8), false)
    ) {
      const target = this.#placeRequest(prefix, size);
      return target && target.length === size - PLACE_PREFIX ? target : null;
    }
    return null;
  }

  #onFrame(frame: Uint8Array, fds: Fd[], placed?: Uint8Array): void {
    const type = (frame[8]! & HeaderFlags.TYPE_MASK) as number;
    if (type === MessageType.REPLY) {
      this.#onReply(frame, fds, placed);
      return;
    }
    if (this.#busy || this.#queue.length > 0 || this.#repliesBacklogged()) {
      this.#queue.push({ frame, fds, placed });
      if (this.#queue.length >= MAX_QUEUED) this.#setPaused('queue', true);
      return;
    }
    this.#dispatch(frame, fds, placed);
  }

  /** Replies may carry fds (VERSION's twin socket, region info): handed over with the message. */
  #onReply(frame: Uint8Array, fds: Fd[], placed: Uint8Array | undefined): void {
    const sinkPending = frame.length >= HEADER_SIZE ? this.#pending.get(frame[0]! | (frame[1]! << 8)) : undefined;
    if (sinkPending?.sink) {
      if (this.#trace) this.#trace('in', decodeHeaderQuick(frame), placed ? { placed: placed.length } : undefined);
      this.#onSinkReply(sinkPending, frame, fds, placed);
      return;
    }
    let msg;
    try {
      msg = decodeMessage(frame, this.limits, placed);
    } catch (err) {
      closeAll(fds);
      const h = decodeHeaderQuick(frame);
      if (!this.#pending.has(h.msgId)) {
        this.#onUnsolicited(h.msgId, h.cmd, h.flags);
        return;
      }
      this.#failPending(h.msgId, new ConnectionError('VFU_BAD_REPLY', (err as Error).message, Errno.EINVAL, { cause: err }));
      return;
    }
    this.#trace?.('in', msg.header, msg.kind === 'error' ? { errno: msg.errno } : msg.body);
    const p = this.#pending.get(msg.header.msgId);
    if (!p) {
      closeAll(fds);
      this.#onUnsolicited(msg.header.msgId, msg.header.cmd, msg.header.flags);
      return;
    }
    this.#pending.delete(msg.header.msgId);
    if (msg.kind !== 'reply' || msg.command !== p.command) closeAll(fds);
    if (msg.kind === 'error') {
      p.reject(new ConnectionError('VFU_PEER_ERROR', `${Command[p.command]} failed: ${errnoName(msg.errno)}`, msg.errno));
    } else if (msg.kind !== 'reply') {
      p.reject(new ConnectionError('VFU_BAD_REPLY', `a command arrived flagged as a reply to ${Command[p.command]}`));
    } else if (msg.command !== p.command) {
      p.reject(new ConnectionError('VFU_BAD_REPLY', `reply to ${Command[p.command]} says command ${msg.command}`));
    } else {
      (msg as ReplyMessage & { fds: Fd[] }).fds = fds;
      p.resolve(msg as ReplyMessage & { fds: Fd[] });
    }
  }

  /**
   * A reply whose id matches no request in flight. A late reply to a request
   * that timed out is dropped (its id may be used again). Any other is a peer
   * bug that the peer may be waiting on: answered EINVAL, as libvfio-user
   * answers a message that is not a command. An unsolicited *error* reply is
   * dropped, not answered: answering it would let two such peers bounce
   * error replies for ever.
   */
  #onUnsolicited(msgId: number, cmd: number, flags: number): void {
    if (this.#stale.delete(msgId)) return;
    this.#unsolicited++;
    if (flags & HeaderFlags.ERROR) return;
    this.#write(encodeErrorReply(msgId, cmd, Errno.EINVAL));
  }

  /** Replies that matched no request in flight (not counting late replies to timed-out ones). */
  get unsolicitedReplies(): number {
    return this.#unsolicited;
  }

  /**
   * A reply to requestRaw: the header is checked here as decodeMessage would
   * (flags, command, msg_size), the body by the sink. No message object.
   */
  #onSinkReply(p: Pending, frame: Uint8Array, fds: Fd[], placed: Uint8Array | undefined): void {
    const id = frame[0]! | (frame[1]! << 8);
    closeAll(fds); // requestRaw's commands (DMA) take no fds
    const cmd = frame[2]! | (frame[3]! << 8);
    const size = frame[4]! | (frame[5]! << 8) | (frame[6]! << 16) | (frame[7]! * 2 ** 24);
    const flags = (frame[8]! | (frame[9]! << 8) | (frame[10]! << 16) | (frame[11]! << 24)) >>> 0;
    let why: string | undefined;
    if ((flags & ~(HeaderFlags.TYPE_MASK | HeaderFlags.ERROR)) !== 0 || (flags & HeaderFlags.TYPE_MASK) !== MessageType.REPLY) {
      why = `header flags 0x${flags.toString(16)} in a reply`;
    } else if (cmd !== p.command) {
      why = `reply to ${Command[p.command]} says command ${cmd}`;
    } else if (size !== frame.length + (placed ? placed.length : 0)) {
      why = `msg_size ${size}, ${frame.length + (placed ? placed.length : 0)} bytes received`;
    }
    this.#pending.delete(id);
    if (why !== undefined) {
      this.#stale.delete(id);
      p.sink!.fail(new ConnectionError('VFU_BAD_REPLY', why, Errno.EINVAL), p.cookie);
    } else if (flags & HeaderFlags.ERROR) {
      const errno = (frame[12]! | (frame[13]! << 8) | (frame[14]! << 16) | (frame[15]! << 24)) >>> 0;
      p.sink!.fail(new ConnectionError('VFU_PEER_ERROR', `${Command[p.command]} failed: ${errnoName(errno)}`, errno), p.cookie);
    } else {
      try {
        p.sink!.reply(frame, placed, p.cookie);
      } catch (err) {
        // A sink must not throw (this is the socket's read handler); if one does, report it.
        if (this.listenerCount('error') > 0) this.emit('error', err as Error);
      }
    }
  }

  #dispatch(frame: Uint8Array, fds: Fd[], placed: Uint8Array | undefined): void {
    if (this.#fastRequest && fds.length === 0 && !this.#trace) {
      let parts: Uint8Array[] | null;
      try {
        parts = this.#fastRequest(frame, placed);
      } catch {
        parts = null; // the usual path decides, and answers the error
      }
      if (parts) {
        this.#writeParts(parts, undefined, parts.length === 1);
        return;
      }
    }
    let msg: RequestMessage;
    try {
      const decoded = decodeMessage(frame, this.limits, placed);
      if (decoded.kind !== 'request') throw new ProtocolError('VFU_BAD_FLAGS', 'not a command');
      msg = decoded;
    } catch (err) {
      closeAll(fds);
      const h = decodeHeaderQuick(frame);
      this.#trace?.('in', h, { error: (err as Error).message });
      if (!(h.flags & HeaderFlags.NO_REPLY)) this.#write(encodeErrorReply(h.msgId, h.cmd, errnoOf(err)));
      this.#onBadRequest?.(h, err);
      this.#next();
      return;
    }
    this.#trace?.('in', msg.header, msg.body);
    let result: HandlerReply | Promise<HandlerReply>;
    try {
      result = this.#onRequest(msg, fds);
    } catch (err) {
      this.#finish(msg, fds, undefined, err);
      return;
    }
    if (result instanceof Promise) {
      this.#busy = true;
      result.then(
        (r) => this.#finish(msg, fds, r, undefined),
        (err: unknown) => this.#finish(msg, fds, undefined, err),
      );
    } else {
      this.#finish(msg, fds, result, undefined);
    }
  }

  #finish(msg: RequestMessage, fds: Fd[], reply: HandlerReply, err: unknown): void {
    closeAll(fds); // whatever the handler did not take (Fd.release()/close()) is closed here
    this.#busy = false;
    if (this.#closed) return;
    const { msgId } = msg.header;
    const noReply = (msg.header.flags & HeaderFlags.NO_REPLY) !== 0;
    if (err !== undefined) {
      if (!noReply) this.#write(encodeErrorReply(msgId, msg.command, errnoOf(err)));
      if (err instanceof Error && !('errno' in err) && this.listenerCount('error') > 0) this.emit('error', err);
    } else if (!noReply) {
      try {
        this.#writeReply(msg, reply ?? {});
      } catch (writeErr) {
        // A reply that does not encode (a bug of the handler's) or that the socket refuses (too
        // many fds, or no fd left to duplicate them with): the command fails with an errno reply
        // instead, and nothing is thrown into the read loop or a promise chain.
        this.#write(encodeErrorReply(msgId, msg.command, errnoOf(writeErr)));
        if (this.listenerCount('error') > 0) this.emit('error', writeErr as Error);
      }
    }
    this.#next();
  }

  /** Encodes and queues a handler's reply; throws if it does not encode or the socket refuses it. */
  #writeReply(msg: RequestMessage, r: Exclude<HandlerReply, void>): void {
    const { msgId } = msg.header;
    if (r.raw !== undefined) {
      const parts = Array.isArray(r.raw) ? r.raw : [r.raw];
      let size = HEADER_SIZE;
      for (const p of parts) size += p.length;
      const head = encodeHeader({ msgId, cmd: msg.command, msgSize: size, flags: MessageType.REPLY, errorNo: 0 });
      this.#writeParts([head, ...parts], r.fds);
    } else {
      this.#write(encodeReply(msg.command, msgId, r.body as never), r.fds);
    }
  }

  /** `owned`: the parts are fresh buffers nothing else refers to (see UnixSocket.write). */
  #writeParts(parts: Uint8Array[], fds?: readonly (Fd | number)[], owned = false, shared = false): void {
    if (!this.socket.writable) return;
    if (this.#trace) this.#traceOut(parts);
    if (!this.socket.write(parts, fds, owned, shared)) this.#setPaused('writes', true);
  }

  /** Runs queued commands in order; a loop, not recursion, however many are queued. */
  #next(): void {
    if (this.#draining) return;
    this.#draining = true;
    try {
      while (!this.#busy && !this.#closed && this.#queue.length > 0 && !this.#repliesBacklogged()) {
        const { frame, fds, placed } = this.#queue.shift()!;
        this.#dispatch(frame, fds, placed);
      }
    } finally {
      this.#draining = false;
    }
    if (this.#queue.length < MAX_QUEUED / 2) this.#setPaused('queue', false);
  }

  /** Our replies waiting on the socket are above REPLY_QUEUE_LIMIT: commands wait for 'drain'. */
  #repliesBacklogged(): boolean {
    // Never below the socket's high-water mark: above it write() returned false, so 'drain' will come.
    const limit = Math.max(REPLY_QUEUE_LIMIT, 4 * this.limits.maxMsgSize, this.socket.writableHighWaterMark);
    return this.socket.writableLength > limit;
  }

  #failPending(id: number, err: Error): void {
    const p = this.#pending.get(id);
    if (!p) return;
    this.#pending.delete(id);
    // A reply still being received into the caller's memory stops landing there.
    if (p.into) this.#reader.dropPlacement(p.into);
    if (p.sink) p.sink.fail(err, p.cookie);
    else p.reject(err);
  }

  #shutdown(err: Error): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#reader.close();
    for (const q of this.#queue) closeAll(q.fds);
    this.#queue.length = 0;
    const pending = [...this.#pending.values()];
    this.#pending.clear();
    if (this.#timer) clearTimeout(this.#timer);
    this.#timer = null;
    for (const p of pending) {
      const e = new ConnectionError('VFU_CLOSED', `connection closed before the reply to ${Command[p.command]}: ${err.message}`, 0, { cause: err });
      if (p.sink) p.sink.fail(e, p.cookie);
      else p.reject(e);
    }
    this.emit('close', err instanceof ConnectionError && err.code === 'VFU_CLOSED' ? undefined : err);
  }
}

function noop(): void {}

/** The header fields, read without validation (for errors about a message we could not decode). */
export function decodeHeaderQuick(b: Uint8Array): Header {
  const v = new DataView(b.buffer, b.byteOffset, Math.min(b.length, HEADER_SIZE));
  const n = b.length >= HEADER_SIZE;
  return {
    msgId: n ? v.getUint16(0, true) : 0,
    cmd: n ? v.getUint16(2, true) : 0,
    msgSize: n ? v.getUint32(4, true) : 0,
    flags: n ? v.getUint32(8, true) : 0,
    errorNo: n ? v.getUint32(12, true) : 0,
  };
}
