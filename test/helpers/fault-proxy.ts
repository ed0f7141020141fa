/**
 * A scripted peer for fault tests: a relay between a real client and a real server over
 * UNIX sockets that forwards whole messages (with their fds) and, at a chosen message,
 * kills both connections (the peer dies), forwards only part of it first (dies mid-message),
 * or swallows everything from then on (the peer stops answering, the socket stays open).
 * Framing is the protocol's header: vfio-user (16 bytes, message_size u32 at 4, the total)
 * or vhost-user (12 bytes, size u32 at 8, the payload).
 */
import { UnixServer, connectUnix, type Fd, type UnixSocket } from '../../src/sys/index.js';

export type Framing = 'vfio-user' | 'vhost-user';
export type Direction = 'toServer' | 'toClient';

export interface Fault {
  /** Which direction's message triggers the fault. */
  dir: Direction;
  /** The 1-based message number in that direction. */
  n: number;
  /** 'die': forward `forwardBytes` of it (default 0), then close both sides. 'stop': forward nothing more, keep both open. */
  action: 'die' | 'stop';
  /** Bytes of the message to forward before dying (default 0: it never arrives). With -1: all of it (die right after). */
  forwardBytes?: number;
  /** Only count messages with this command / request code (default: all). */
  command?: number;
}

function frameLength(framing: Framing, buf: Buffer): number | null {
  if (framing === 'vfio-user') return buf.length >= 16 ? Math.max(16, buf.readUInt32LE(4)) : null;
  return buf.length >= 12 ? 12 + buf.readUInt32LE(8) : null;
}

function commandOf(framing: Framing, frame: Buffer): number {
  return framing === 'vfio-user' ? frame.readUInt16LE(2) : frame.readUInt32LE(0);
}

export class FaultProxy {
  readonly path: string;
  readonly #server: UnixServer;
  readonly #framing: Framing;
  readonly #target: string;
  #fault: Fault | null;
  readonly #pairs = new Set<UnixSocket>();
  /** Set once the fault happened (on the connection it happened on). */
  fired = false;
  /** Messages seen per direction, and the commands, in order (for the test's messages). */
  readonly seen: Record<Direction, number[]> = { toServer: [], toClient: [] };

  private constructor(path: string, target: string, framing: Framing, fault: Fault | null) {
    this.path = path;
    this.#target = target;
    this.#framing = framing;
    this.#fault = fault;
    this.#server = UnixServer.listen(path);
    this.#server.on('connection', (s) => void this.#relay(s));
  }

  static listen(path: string, target: string, framing: Framing, fault: Fault | null): FaultProxy {
    return new FaultProxy(path, target, framing, fault);
  }

  close(): void {
    this.#server.close();
    for (const s of this.#pairs) s.destroy();
    this.#pairs.clear();
  }

  async #relay(client: UnixSocket): Promise<void> {
    this.#pairs.add(client);
    let server: UnixSocket;
    try {
      server = await connectUnix(this.#target);
    } catch {
      client.destroy();
      return;
    }
    this.#pairs.add(server);
    let stopped = false;
    const dead = (): void => {
      client.destroy();
      server.destroy();
    };
    const pump = (from: UnixSocket, to: UnixSocket, dir: Direction): void => {
      let buf = Buffer.alloc(0);
      let fds: Fd[] = [];
      let count = 0;
      from.on('data', (chunk, got) => {
        if (stopped) {
          got.forEach((f) => f.close());
          return;
        }
        buf = Buffer.concat([buf, chunk]);
        fds.push(...got);
        for (;;) {
          const len = frameLength(this.#framing, buf);
          if (len === null || buf.length < len) return;
          const frame = buf.subarray(0, len);
          buf = buf.subarray(len);
          const sending = fds;
          fds = [];
          const command = commandOf(this.#framing, frame);
          this.seen[dir].push(command);
          const f = this.#fault;
          if (f && f.dir === dir && (f.command === undefined || f.command === command) && ++count === f.n) {
            this.fired = true;
            this.#fault = null; // once: the next connection goes through untouched
            if (f.action === 'stop') {
              stopped = true;
              sending.forEach((x) => x.close());
              return;
            }
            const part = f.forwardBytes === -1 ? len : Math.min(len, f.forwardBytes ?? 0);
            if (part > 0) to.write(frame.subarray(0, part), sending.length ? sending.map((x) => x.value) : null);
            sending.forEach((x) => x.close());
            // Let the bytes leave before the close (a write to a socket is queued in order).
            setImmediate(dead);
            return;
          }
          to.write(frame, sending.length ? sending.map((x) => x.value) : null);
          sending.forEach((x) => x.close());
        }
      });
      from.on('close', () => {
        fds.forEach((f) => f.close());
        fds = [];
        to.destroy();
        this.#pairs.delete(from);
      });
      from.on('error', () => {});
    };
    pump(client, server, 'toServer');
    pump(server, client, 'toClient');
  }
}
