/**
 * A raw-bytes vfio-user client for tests: it frames messages by hand (the
 * 16-byte header written here, not by the codec) and hands back every
 * message as header fields, body bytes and fds. Use it to test a server,
 * ours or anyone's, with exact bytes, including malformed ones.
 */
import { connectUnix, type Fd, type UnixSocket } from '../sys/index.js';
import { FrameReader } from '../wire/reader.js';
import { Bytes } from './bytes.js';

export interface RawMessage {
  id: number;
  cmd: number;
  size: number;
  flags: number;
  errno: number;
  body: Buffer;
  fds: Fd[];
  /** Type bits: 0 command, 1 reply. */
  readonly isReply: boolean;
  readonly isError: boolean;
}

export const FLAG_REPLY = 0x1;
export const FLAG_NO_REPLY = 0x10;
export const FLAG_ERROR = 0x20;

/** A whole message: header written by hand, then the payload. */
export function rawMessage(cmd: number, payload: Uint8Array, id = 0, flags = 0, errno = 0): Buffer {
  return new Bytes().u16(id).u16(cmd).u32(16 + payload.length).u32(flags).u32(errno).bytes(payload).build();
}

export class RawVfioUserClient {
  readonly socket: UnixSocket;
  readonly #inbox: RawMessage[] = [];
  #waiters: ((m: RawMessage | null) => void)[] = [];
  #closed = false;
  #nextId = 0x100;
  readonly #reader: FrameReader;
  /** Answers server-to-client commands (DMA_READ/DMA_WRITE) instead of queueing them. */
  onCommand: ((m: RawMessage) => void) | null = null;

  constructor(socket: UnixSocket, maxFrame = 64 << 20) {
    this.socket = socket;
    this.#reader = new FrameReader(
      {
        headerSize: 16,
        frameSize: (h) => h[4]! | (h[5]! << 8) | (h[6]! << 16) | (h[7]! * 2 ** 24),
        maxFrameSize: maxFrame,
      },
      {
        frame: (f, fds) => this.#deliver(f, fds),
        oversized: () => false,
        fatal: () => socket.destroy(),
      },
    );
    socket.on('data', (chunk, fds) => this.#reader.push(Buffer.from(chunk), fds));
    socket.on('close', () => {
      this.#closed = true;
      this.#reader.close();
      for (const w of this.#waiters) w(null);
      this.#waiters = [];
    });
  }

  static async connect(path: string): Promise<RawVfioUserClient> {
    return new RawVfioUserClient(await connectUnix(path));
  }

  get closed(): boolean {
    return this.#closed;
  }

  #deliver(frame: Uint8Array, fds: Fd[]): void {
    const v = new DataView(frame.buffer, frame.byteOffset, frame.length);
    const flags = v.getUint32(8, true);
    const m: RawMessage = {
      id: v.getUint16(0, true),
      cmd: v.getUint16(2, true),
      size: v.getUint32(4, true),
      flags,
      errno: v.getUint32(12, true),
      body: Buffer.from(frame.subarray(16)),
      fds,
      isReply: (flags & 0xf) === FLAG_REPLY,
      isError: (flags & FLAG_ERROR) !== 0,
    };
    if (!m.isReply && this.onCommand) {
      this.onCommand(m);
      return;
    }
    const w = this.#waiters.shift();
    if (w) w(m);
    else this.#inbox.push(m);
  }

  /** Sends one message; returns its id. */
  send(cmd: number, payload: Uint8Array = new Uint8Array(0), options: { id?: number; flags?: number; fds?: (Fd | number)[] } = {}): number {
    const id = options.id ?? this.#nextId++ & 0xffff;
    this.socket.write(rawMessage(cmd, payload, id, options.flags ?? 0), options.fds);
    return id;
  }

  /** Sends arbitrary bytes. */
  sendBytes(bytes: Uint8Array, fds?: (Fd | number)[]): void {
    this.socket.write(bytes, fds);
  }

  /** The next message from the server; rejects on timeout or close. */
  next(timeoutMs = 3000): Promise<RawMessage> {
    const m = this.#inbox.shift();
    if (m) return Promise.resolve(m);
    if (this.#closed) return Promise.reject(new Error('connection closed'));
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#waiters = this.#waiters.filter((w) => w !== waiter);
        reject(new Error(`no message within ${timeoutMs} ms`));
      }, timeoutMs);
      const waiter = (msg: RawMessage | null): void => {
        clearTimeout(timer);
        if (msg) resolve(msg);
        else reject(new Error('connection closed'));
      };
      this.#waiters.push(waiter);
    });
  }

  /** Sends a command and waits for the next message (its reply). */
  async call(cmd: number, payload: Uint8Array = new Uint8Array(0), options: { fds?: (Fd | number)[]; flags?: number } = {}): Promise<RawMessage> {
    const id = this.send(cmd, payload, options);
    const r = await this.next();
    if (r.id !== id) throw new Error(`reply id ${r.id} for request ${id}`);
    return r;
  }

  /** VERSION 0.2 with the given capabilities JSON (default none). */
  async version(json = '{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576}}'): Promise<RawMessage> {
    return this.call(1, new Bytes().u16(0).u16(2).ascii(json).u8(0).build());
  }

  /** Resolves when the server closed the connection. */
  whenClosed(timeoutMs = 3000): Promise<void> {
    if (this.#closed) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error('still open')), timeoutMs);
      this.socket.once('close', () => {
        clearTimeout(t);
        resolve();
      });
    });
  }

  close(): void {
    this.socket.destroy();
  }
}
