/**
 * A vhost-user front-end that only knows bytes, for tests of back-ends: every
 * message built by hand (12-byte header: request u32, flags u32, size u32;
 * then the payload at its documented offsets), replies read the same way.
 * Written from the spec, not from the code under test.
 */
import assert from 'node:assert/strict';
import { connectUnix, type Fd, type UnixSocket } from '../../src/sys/index.js';

export const VERSION = 0x1;
export const REPLY = 0x4;
export const NEED_REPLY = 0x8;

/** A front-end that only knows bytes. */
export class RawFrontEnd {
  readonly sock: UnixSocket;
  #buf = Buffer.alloc(0);
  #fds: Fd[] = [];
  #waiters: (() => void)[] = [];
  closed = false;
  constructor(sock: UnixSocket) {
    this.sock = sock;
    sock.on('data', (chunk, fds) => {
      this.#buf = Buffer.concat([this.#buf, chunk]);
      this.#fds.push(...fds);
      for (const w of this.#waiters.splice(0)) w();
    });
    sock.on('close', () => {
      this.closed = true;
      for (const w of this.#waiters.splice(0)) w();
    });
  }
  static async connect(p: string): Promise<RawFrontEnd> {
    return new RawFrontEnd(await connectUnix(p));
  }
  send(request: number, payload: Buffer = Buffer.alloc(0), fds: (Fd | number)[] = [], flags = VERSION): void {
    const h = Buffer.alloc(12);
    h.writeUInt32LE(request, 0);
    h.writeUInt32LE(flags, 4);
    h.writeUInt32LE(payload.length, 8);
    this.sock.write(Buffer.concat([h, payload]), fds.length ? fds : null);
  }
  /** The next message from the back-end (header fields and payload), or null if it closed. */
  async recv(timeoutMs = 5000): Promise<{ request: number; flags: number; payload: Buffer; fds: Fd[] } | null> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      if (this.#buf.length >= 12) {
        const size = this.#buf.readUInt32LE(8);
        if (this.#buf.length >= 12 + size) {
          const m = { request: this.#buf.readUInt32LE(0), flags: this.#buf.readUInt32LE(4), payload: Buffer.from(this.#buf.subarray(12, 12 + size)), fds: this.#fds };
          this.#fds = [];
          this.#buf = this.#buf.subarray(12 + size);
          return m;
        }
      }
      if (this.closed) return null;
      const left = deadline - Date.now();
      if (left <= 0) throw new Error('no reply in time');
      await new Promise<void>((r) => {
        const t = setTimeout(r, left);
        this.#waiters.push(() => {
          clearTimeout(t);
          r();
        });
      });
    }
  }
  /** Sends, then reads the one reply and checks its header. */
  async call(request: number, payload?: Buffer, fds?: (Fd | number)[], flags = VERSION): Promise<Buffer> {
    this.send(request, payload, fds, flags);
    const r = await this.recv();
    assert.ok(r, `request ${request}: the back-end closed the connection`);
    assert.equal(r.request, request, 'reply to the request sent');
    assert.equal(r.flags, VERSION | REPLY, 'reply flags: version 1 + REPLY, nothing else');
    return r.payload;
  }
  /** A request with NEED_REPLY: the u64 ack. */
  async acked(request: number, payload?: Buffer, fds?: (Fd | number)[]): Promise<bigint> {
    const r = await this.call(request, payload, fds, VERSION | NEED_REPLY);
    assert.equal(r.length, 8, 'an ack is a u64');
    return r.readBigUInt64LE(0);
  }
  close(): void {
    this.sock.destroy();
  }
}

export const u64 = (v: bigint | number): Buffer => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt(v), 0);
  return b;
};
export const state = (index: number, num: number): Buffer => {
  const b = Buffer.alloc(8);
  b.writeUInt32LE(index, 0);
  b.writeUInt32LE(num, 4);
  return b;
};

