/**
 * vhost-user framing over a UNIX stream socket: 12-byte header (request,
 * flags, size), then `size` payload bytes; fds travel with the first byte of
 * the message they belong to (SCM_RIGHTS). Used both ways: the back-end reads
 * front-end requests on it, and sends its own requests on the back-end
 * channel (SET_BACKEND_REQ_FD).
 */
import { EventEmitter } from 'node:events';
import { closeAll, type Fd } from '../sys/fd.js';
import type { UnixSocket } from '../sys/socket.js';
import { FLAG_VERSION, FLAG_VERSION_MASK, HEADER_SIZE, MAX_FDS, MAX_PAYLOAD } from './constants.js';
import { VhostUserError } from './errors.js';

export interface VhostUserMessage {
  request: number;
  flags: number;
  payload: Buffer;
  /** Owned by whoever takes the message: close what you do not keep. */
  fds: Fd[];
}

type ChannelEvents = {
  message: [msg: VhostUserMessage];
  /** The peer broke the protocol (bad version, oversized payload, too many fds): the channel closes after. */
  error: [err: Error];
  close: [err: Error | undefined];
};

export class MessageChannel extends EventEmitter<ChannelEvents> {
  readonly socket: UnixSocket;
  #buf: Buffer = Buffer.alloc(0);
  /** fds received and not yet given to a message, with the stream offset just past their chunk. */
  #pendingFds: { end: number; fds: Fd[] }[] = [];
  /** Bytes received / bytes cut into messages so far. */
  #received = 0;
  #consumed = 0;
  #closed = false;
  /** Reading paused until our write queue drains (backpressure). */
  #throttled = false;
  readonly #maxPayload: number;

  constructor(socket: UnixSocket, options: { maxPayload?: number } = {}) {
    super();
    this.socket = socket;
    this.#maxPayload = options.maxPayload ?? MAX_PAYLOAD;
    socket.on('data', (chunk, fds) => this.#onData(chunk, fds));
    socket.on('error', () => {
      /* reported with 'close' */
    });
    socket.on('close', (err) => this.#onClose(err));
  }

  get closed(): boolean {
    return this.#closed;
  }

  /** Sends one message; `fds` stay the caller's (the socket duplicates them if it must queue). */
  send(request: number, flags: number, payload: Uint8Array = new Uint8Array(0), fds?: readonly (Fd | number)[] | null): void {
    if (this.#closed) throw new VhostUserError('DISCONNECTED', 'the connection is closed');
    const msg = Buffer.allocUnsafe(HEADER_SIZE + payload.byteLength);
    msg.writeUInt32LE(request >>> 0, 0);
    msg.writeUInt32LE(flags >>> 0, 4);
    msg.writeUInt32LE(payload.byteLength, 8);
    msg.set(payload, HEADER_SIZE);
    if (!this.socket.write(msg, fds ?? null, true) && !this.#throttled) {
      // A peer that sends and does not read what we owe it: stop reading it until that drains,
      // or its requests would pile up their replies here without bound.
      this.#throttled = true;
      this.socket.pause();
      this.socket.once('drain', () => {
        this.#throttled = false;
        if (!this.#closed) this.socket.resume();
      });
    }
  }

  close(err?: Error): void {
    if (this.#closed) return;
    this.socket.destroy(err);
  }

  #onClose(err: Error | undefined): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const p of this.#pendingFds) closeAll(p.fds);
    this.#pendingFds = [];
    this.#buf = Buffer.alloc(0);
    this.emit('close', err);
  }

  #fail(err: Error): void {
    if (this.listenerCount('error') > 0) this.emit('error', err);
    this.close(err);
  }

  #onData(chunk: Buffer, fds: Fd[]): void {
    if (this.#closed) {
      closeAll(fds);
      return;
    }
    // The kernel ends a read after the message whose fds it hands over (unix_stream_read_generic
    // breaks once it has detached fds), so a chunk's fds belong to the message holding the
    // chunk's last byte, which may start after other messages in the same chunk.
    this.#received += chunk.length;
    if (fds.length > 0) {
      this.#pendingFds.push({ end: this.#received, fds });
      let n = 0;
      for (const p of this.#pendingFds) n += p.fds.length;
      if (n > MAX_FDS) {
        this.#fail(new VhostUserError('PROTOCOL', `${n} fds with one message (at most ${MAX_FDS})`));
        return;
      }
    }
    this.#buf = this.#buf.length === 0 ? Buffer.from(chunk) : Buffer.concat([this.#buf, chunk]);
    while (!this.#closed && this.#buf.length >= HEADER_SIZE) {
      const request = this.#buf.readUInt32LE(0);
      const flags = this.#buf.readUInt32LE(4);
      const size = this.#buf.readUInt32LE(8);
      if ((flags & FLAG_VERSION_MASK) !== FLAG_VERSION) {
        this.#fail(new VhostUserError('PROTOCOL', `message ${request} with version ${flags & FLAG_VERSION_MASK} (flags 0x${flags.toString(16)}); only version 1 exists`));
        return;
      }
      if (size > this.#maxPayload) {
        this.#fail(new VhostUserError('PROTOCOL', `message ${request} announces ${size} payload bytes (at most ${this.#maxPayload})`));
        return;
      }
      if (this.#buf.length < HEADER_SIZE + size) break;
      const payload = Buffer.from(this.#buf.subarray(HEADER_SIZE, HEADER_SIZE + size));
      this.#buf = this.#buf.subarray(HEADER_SIZE + size);
      const end = this.#consumed + HEADER_SIZE + size;
      this.#consumed = end;
      const msgFds: Fd[] = [];
      while (this.#pendingFds.length > 0 && this.#pendingFds[0]!.end <= end) msgFds.push(...this.#pendingFds.shift()!.fds);
      if (this.listenerCount('message') > 0) this.emit('message', { request, flags, payload, fds: msgFds });
      else closeAll(msgFds);
    }
  }
}
