/**
 * The vfio-user server: listens on a UNIX socket path and serves a device to
 * each client that connects. Given a device object, one client at a time
 * drives it and its state survives reconnects (the spec's rule); given a
 * factory, every connection gets a device of its own, disposed (its
 * dispose hook) when that connection closes.
 */
import { EventEmitter } from 'node:events';
import { UnixServer, type UnixSocket } from '../sys/index.js';
import { DEFAULT_MAX_DATA_XFER_SIZE, QEMU_MAX_MSG_FDS } from './constants.js';
import { encodeErrorReply } from './messages.js';
import { Errno } from './errno.js';
import { DeviceRuntime } from './runtime.js';
import { Session, type SessionOptions } from './session.js';
import type { VfioUserDeviceSpec } from './device.js';

export interface VfioUserServerOptions {
  /** The device, or a factory giving each connection its own. */
  device: VfioUserDeviceSpec | (() => VfioUserDeviceSpec);
  /** Our max_data_xfer_size (default 1 MiB). */
  maxDataXferSize?: number;
  /** Our max_msg_fds (default 16, the most QEMU's client accepts). */
  maxMsgFds?: number;
  /** Timeout of DMA requests to the client, ms (default 5000). */
  timeoutMs?: number;
  /** How long a new connection may take to send VERSION, ms (default 10000). */
  versionTimeoutMs?: number;
  /** Log lines (connections, errors). Default: none. */
  log?: (line: string) => void;
  /** Every message decoded, one line each. */
  trace?: (line: string) => void;
}

type ServerEvents = { session: [session: Session]; error: [err: Error]; close: [] };

export class VfioUserServer extends EventEmitter<ServerEvents> {
  readonly path: string;
  readonly #listener: UnixServer;
  readonly #options: VfioUserServerOptions;
  readonly #sessions = new Set<Session>();
  /** The shared device's runtime (when `device` is an object). */
  readonly #shared: DeviceRuntime | null;
  #busy: Session | null = null;
  #nextConn = 1;

  private constructor(path: string, options: VfioUserServerOptions) {
    super();
    this.path = path;
    this.#options = options;
    this.#shared = typeof options.device === 'function' ? null : new DeviceRuntime(options.device);
    this.#listener = UnixServer.listen(path);
    this.#listener.on('connection', (sock) => this.#accept(sock));
    this.#listener.on('error', (err) => this.#log(`accept failed: ${err.message}`));
  }

  /** Starts serving on `path` (a stale socket file is replaced). */
  static listen(path: string, options: VfioUserServerOptions): VfioUserServer {
    return new VfioUserServer(path, options);
  }

  /** The runtime of the shared device (config space, regions, migration), for inspection. */
  get runtime(): DeviceRuntime | null {
    return this.#shared;
  }

  get sessions(): ReadonlySet<Session> {
    return this.#sessions;
  }

  /** Stops listening and closes every connection. */
  close(): void {
    this.#listener.close();
    for (const s of this.#sessions) s.close();
    this.emit('close');
  }

  #log(line: string): void {
    this.#options.log?.(line);
  }

  #accept(sock: UnixSocket): void {
    const n = this.#nextConn++;
    if (this.#shared && this.#busy) {
      // One client at a time drives a shared device: refuse the newcomer's first message.
      this.#log(`connection ${n}: refused, the device is in use`);
      setTimeout(() => sock.destroy(), 5000).unref();
      sock.once('data', (chunk, fds) => {
        fds.forEach((f) => f.close());
        if (chunk.length >= 4) {
          const v = new DataView(chunk.buffer, chunk.byteOffset, chunk.length);
          sock.write(encodeErrorReply(v.getUint16(0, true), v.getUint16(2, true), Errno.EBUSY) as Uint8Array);
        }
        sock.end();
      });
      return;
    }
    let runtime: DeviceRuntime;
    let made: VfioUserDeviceSpec | null = null;
    try {
      if (this.#shared) runtime = this.#shared;
      else {
        made = (this.#options.device as () => VfioUserDeviceSpec)();
        runtime = new DeviceRuntime(made);
      }
    } catch (err) {
      this.#log(`connection ${n}: device setup failed: ${(err as Error).message}`);
      try {
        made?.dispose?.(); // the factory's device that the runtime refused
      } catch {
        // reported above already
      }
      sock.destroy();
      return;
    }
    const log = (line: string): void => this.#log(`connection ${n}: ${line}`);
    const options: SessionOptions = {
      maxDataXferSize: this.#options.maxDataXferSize ?? DEFAULT_MAX_DATA_XFER_SIZE,
      maxMsgFds: this.#options.maxMsgFds ?? QEMU_MAX_MSG_FDS,
      timeoutMs: this.#options.timeoutMs ?? 5000,
      ...(this.#options.versionTimeoutMs !== undefined ? { versionTimeoutMs: this.#options.versionTimeoutMs } : {}),
      log,
      trace: this.#options.trace ? (line) => this.#options.trace!(`[${n}] ${line}`) : undefined,
    };
    const session = new Session(sock, runtime, options);
    this.#sessions.add(session);
    if (this.#shared) this.#busy = session;
    log('connected');
    session.conn.on('close', (err) => {
      this.#sessions.delete(session);
      if (this.#busy === session) this.#busy = null;
      log(`closed${err ? `: ${err.message}` : ''}`);
      // A device of the factory's is this connection's alone: release it (the session has detached it).
      if (!this.#shared) {
        try {
          runtime.spec.dispose?.();
        } catch (e) {
          log(`device dispose failed: ${(e as Error).message}`);
        }
      }
    });
    this.emit('session', session);
  }
}
