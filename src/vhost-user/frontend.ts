/**
 * The front-end side of vhost-user: what QEMU's hw/virtio/vhost-user.c does,
 * in the current spec's terms, for a Node program that drives any back-end
 * (qemu-storage-daemon, DPDK, virtiofsd, ours).
 *
 *   const fe = await VhostUserFrontend.connect('/tmp/blk.sock');   // or accept(path)
 *   await fe.handshake({ queues: 2, config: 'require' });
 *   await fe.setFeatures(wanted);
 *   fe.addMemory(SharedMemory.create(...), gpa); await fe.syncMemory();
 *   await fe.setupVring(0, { size, desc, driver, device, kick, call });
 *
 * Requests are serialized (one in flight, as the protocol has no tags). Every
 * reply is validated the way the seed does: the request type echoed, flags
 * exactly VERSION|REPLY, the payload size the request implies, fds only where
 * one is expected. A reply that breaks these rules, a timeout and a
 * disconnect fail the request with a VhostUserError (PROTOCOL, TIMEOUT,
 * DISCONNECTED) and close the connection (its stream can no longer be
 * trusted); every request queued behind fails the same way, at once. A
 * REPLY_ACK of non-zero fails just that request (code INVALID) and the
 * connection stays up.
 */
import { EventEmitter } from 'node:events';
import { Fd, closeAll } from '../sys/fd.js';
import { EventFd } from '../sys/eventfd.js';
import { SharedMemory } from '../sys/shm.js';
import { UnixServer, UnixSocket, connectUnix, socketPairFds } from '../sys/socket.js';
import { GuestMemory } from '../virtio/memory.js';
import { MessageChannel, type VhostUserMessage } from './channel.js';
import {
  BackendReq,
  FLAG_NEED_REPLY,
  FLAG_REPLY,
  FLAG_VERSION,
  MAX_CONFIG_SIZE,
  MAX_MEM_TABLE_REGIONS,
  ProtocolFeature as PF,
  REQ_NAMES,
  Req,
  VRING_NOFD,
  VirtioFeature as VF,
  bit,
} from './constants.js';
import { VhostUserError } from './errors.js';

/** Protocol features this front-end implements (and so may ack). */
export const FRONTEND_PROTOCOL_FEATURES =
  bit(PF.MQ) |
  bit(PF.LOG_SHMFD) |
  bit(PF.RARP) |
  bit(PF.REPLY_ACK) |
  bit(PF.NET_MTU) |
  bit(PF.BACKEND_REQ) |
  bit(PF.CONFIG) |
  bit(PF.BACKEND_SEND_FD) |
  bit(PF.HOST_NOTIFIER) |
  bit(PF.INFLIGHT_SHMFD) |
  bit(PF.RESET_DEVICE) |
  bit(PF.CONFIGURE_MEM_SLOTS) |
  bit(PF.STATUS);

/** QEMU's VHOST_USER_MAX_RAM_SLOTS on x86 (ACPI_MAX_RAM_SLOTS). */
export const FRONTEND_MAX_MEM_SLOTS = 256;
/** The front-end virtual address of GPA 0 as we describe it to back-ends (any consistent value works). */
export const UVA_BASE = 0x7f00_0000_0000;
const CONFIG_HDR = 12;
/** sizeof(struct vhost_iotlb_msg): iova, size, uaddr (u64 each), perm, type (u8), padded to 8. */
const IOTLB_MSG_SIZE = 32;

function iotlbBytes(iova: number, size: number, uaddr: number, perm: number, type: number): Buffer {
  const b = Buffer.alloc(IOTLB_MSG_SIZE);
  b.writeBigUInt64LE(BigInt(iova), 0);
  b.writeBigUInt64LE(BigInt(size), 8);
  b.writeBigUInt64LE(BigInt(uaddr), 16);
  b[24] = perm;
  b[25] = type;
  return b;
}
const REPLY_FLAGS = FLAG_VERSION | FLAG_REPLY;

export interface VhostUserFrontendOptions {
  /** Per-request reply timeout (default 5000 ms). */
  timeoutMs?: number;
  /** Lines for a log (protocol events, back-end requests). */
  log?: (line: string) => void;
}

export interface HandshakeOptions {
  /**
   * Protocol features we are willing to ack (default: all we implement); the
   * acked set is offered & this & FRONTEND_PROTOCOL_FEATURES, then the seed's
   * rules below.
   */
  protocolFeatures?: bigint;
  /**
   * The CONFIG protocol feature (GET/SET_CONFIG): 'require' fails the handshake
   * when the back-end does not offer it (vhost-user-blk), 'use' acks it when
   * offered (default), 'never' does not ack it (QEMU drops it for devices
   * without config callbacks, e.g. net).
   */
  config?: 'require' | 'use' | 'never';
  /** Queues the device will use: more than GET_QUEUE_NUM fails the handshake. */
  queues?: number;
  /** Open the back-end request channel when BACKEND_REQ is acked (default true). */
  backendChannel?: boolean;
  /**
   * Be the device's IOMMU (VIRTIO_F_ACCESS_PLATFORM, QEMU with a vIOMMU): when given,
   * setFeatures() may ack ACCESS_PLATFORM (it needs BACKEND_REQ and REPLY_ACK, as in
   * QEMU); ring and buffer addresses are then IOVAs, which the back-end translates
   * through its IOTLB, asking us on the back-end channel (IOTLB MISS) and getting
   * IOTLB_MSG UPDATEs. 'identity': IOVA = GPA, through our memory regions, in pages of
   * `iommuPageSize` (what a guest IOMMU in passthrough gives: QEMU's intel-iommu
   * answers 4 KiB pages); or a translation of one's own.
   */
  iommu?: 'identity' | FrontendIommu;
  /** The identity IOMMU's page (default 4096; a power of two of at least 4096). */
  iommuPageSize?: number;
}

/** struct vhost_iotlb_msg perm: VHOST_ACCESS_RO / WO / RW. */
export const IotlbPerm = { RO: 1, WO: 2, RW: 3 } as const;
/** struct vhost_iotlb_msg type. */
export const IotlbType = { MISS: 1, UPDATE: 2, INVALIDATE: 3, ACCESS_FAIL: 4 } as const;

/** One IOTLB entry: `size` bytes of IOVA space from `iova` at our user address `uaddr`. */
export interface IotlbEntry {
  iova: number;
  size: number;
  uaddr: number;
  perm: number;
}

/** An IOMMU the front-end answers IOTLB misses from. */
export interface FrontendIommu {
  /** The entry that covers `iova` with at least `perm`, or null: none (the MISS is refused, the back-end's access fails). */
  translate(iova: number, perm: number): IotlbEntry | null;
}

/** A memory region of ours given to the back-end. */
export interface FrontendRegion {
  readonly memory: SharedMemory;
  readonly guestPhysAddr: number;
  readonly size: number;
  readonly userAddr: number;
}

export interface VringSetup {
  size: number;
  /** GPAs of the descriptor table/ring, the driver area (avail / driver event) and the device area (used / device event). */
  desc: number;
  driver: number;
  device: number;
  /** SET_VRING_BASE value (split: next avail idx; packed: the vhost-user encoding). Default 0 (packed: both wrap counters 1). */
  base?: number;
  kick: EventFd | null;
  call: EventFd | null;
  err?: EventFd | null;
  /** Send SET_VRING_ENABLE(1) when PROTOCOL_FEATURES is negotiated (default true). */
  enable?: boolean;
}

export interface InflightInfo {
  memory: SharedMemory | null;
  mmapSize: number;
  mmapOffset: number;
  numQueues: number;
  queueSize: number;
}

export interface HostNotifier {
  fd: Fd;
  size: number;
  offset: number;
}

type FrontendEvents = {
  /** The back-end sent CONFIG_CHANGE_MSG. */
  configChange: [];
  /** A VRING_HOST_NOTIFIER_MSG set (notifier) or removed (null) the host notifier of a ring. */
  hostNotifier: [index: number, notifier: HostNotifier | null];
  /** A protocol error on either channel (the connection closes after). */
  error: [err: Error];
  close: [err: VhostUserError];
  /** reconnect() re-established the connection (negotiated state starts over; memory regions kept). */
  reconnect: [];
  /** The back-end's IOTLB MISS, answered (entry) or refused (null: no translation). */
  iotlbMiss: [iova: number, perm: number, entry: IotlbEntry | null];
  /** The back-end's IOTLB ACCESS_FAIL: an access through an entry it had was refused. */
  iotlbAccessFail: [iova: number, perm: number];
};

/** Where reconnect() goes: the path connect() or accept() was given. */
interface ReconnectTarget {
  mode: 'connect' | 'accept';
  path: string;
  timeoutMs: number;
}

interface Waiting {
  request: number;
  /** fds the reply may carry. */
  maxFds: number;
  resolve(msg: VhostUserMessage): void;
  reject(err: Error): void;
  timer: NodeJS.Timeout;
}

const name = (request: number): string => REQ_NAMES[request] ?? `request ${request}`;

export function u64(v: bigint | number): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt(v), 0);
  return b;
}

function vringState(index: number, num: number): Buffer {
  const b = Buffer.alloc(8);
  b.writeUInt32LE(index >>> 0, 0);
  b.writeUInt32LE(num >>> 0, 4);
  return b;
}

/**
 * A front-end gave up reconnecting: the back-end did not come back in time
 * (code TIMEOUT), within the attempts allowed (DISCONNECTED), or came back
 * as another device (UNSUPPORTED: other features, queues or capacity).
 * Requests that were waiting for it fail with this error.
 */
export class VhostUserReconnectError extends VhostUserError {
  /** Connection attempts made. */
  readonly attempts: number;
  /** What the last attempt (or the disconnect) failed with. */
  override readonly cause: Error | undefined;
  constructor(code: 'TIMEOUT' | 'DISCONNECTED' | 'UNSUPPORTED', message: string, attempts: number, cause?: Error) {
    super(code, message);
    this.name = 'VhostUserReconnectError';
    this.attempts = attempts;
    this.cause = cause;
  }
}

function protocolError(message: string): VhostUserError {
  return new VhostUserError('PROTOCOL', message);
}

/** Decodes a u64 reply payload, checking its size (QEMU: "Received bad msg size"). */
function replyU64(request: number, msg: VhostUserMessage): bigint {
  if (msg.payload.length !== 8) throw protocolError(`${name(request)} reply of ${msg.payload.length} bytes (a u64 is 8)`);
  return msg.payload.readBigUInt64LE(0);
}

export class VhostUserFrontend extends EventEmitter<FrontendEvents> {
  #ch: MessageChannel;
  /** Bumped at every close: requests queued before it never run on a later connection. */
  #generation = 0;
  #target: ReconnectTarget | null = null;
  readonly #timeoutMs: number;
  readonly #log: (line: string) => void;
  #lock: Promise<unknown> = Promise.resolve();
  #waiting: Waiting | null = null;
  #closedErr: VhostUserError | null = null;
  #backend: MessageChannel | null = null;
  #regions: FrontendRegion[] = [];
  /** Regions as the back-end knows them (what ADD/REM_MEM_REG diffs against). */
  #sent: FrontendRegion[] = [];
  readonly #notifiers = new Map<number, HostNotifier>();
  /** The back-end requests being served, in order (#onBackendRequest). */
  #backendQueue: Promise<void> = Promise.resolve();
  /** The IOMMU of handshake({ iommu }) (null: none, ACCESS_PLATFORM is not acked). */
  #iommu: FrontendIommu | null = null;
  #identity = false;
  /** IOTLB traffic: misses answered / refused, UPDATEs and INVALIDATEs sent, ACCESS_FAILs. */
  readonly iotlbStats = { misses: 0, refused: 0, updates: 0, invalidates: 0, accessFails: 0 };
  /** Guest memory as the driver side sees it: GPA -> our mappings. */
  readonly memory = new GuestMemory();

  /** GET_FEATURES (all the back-end offers, PROTOCOL_FEATURES and LOG_ALL bits included). */
  offeredFeatures = 0n;
  /** SET_FEATURES value sent. */
  features = 0n;
  offeredProtocolFeatures = 0n;
  protocolFeatures = 0n;
  /** GET_QUEUE_NUM, or null when MQ is not negotiated. */
  maxQueues: number | null = null;
  /** GET_MAX_MEM_SLOTS clamped (8 without CONFIGURE_MEM_SLOTS). */
  memSlots = MAX_MEM_TABLE_REGIONS;
  /** GET_MAX_MEM_SLOTS as answered. */
  offeredMemSlots: number | null = null;

  private constructor(socket: UnixSocket, options: VhostUserFrontendOptions) {
    super();
    this.#timeoutMs = options.timeoutMs ?? 5000;
    this.#log = options.log ?? (() => {});
    this.#ch = this.#channel(socket);
  }

  /** A channel on `socket` whose events count only while it is the current one. */
  #channel(socket: UnixSocket): MessageChannel {
    const ch = new MessageChannel(socket);
    ch.on('message', (m) => {
      if (ch === this.#ch) this.#onMessage(m);
      else closeAll(m.fds);
    });
    ch.on('error', (e) => {
      if (ch === this.#ch) this.#emitError(e);
    });
    ch.on('close', (err) => {
      if (ch === this.#ch) this.#onClose(err);
    });
    return ch;
  }

  /** Connects to a back-end listening at `path`. */
  static async connect(path: string, options: VhostUserFrontendOptions & { connectTimeoutMs?: number } = {}): Promise<VhostUserFrontend> {
    const deadline = Date.now() + (options.connectTimeoutMs ?? 5000);
    for (;;) {
      try {
        const fe = new VhostUserFrontend(await connectUnix(path), options);
        fe.#target = { mode: 'connect', path, timeoutMs: options.connectTimeoutMs ?? 5000 };
        return fe;
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if ((code !== 'ECONNREFUSED' && code !== 'ENOENT') || Date.now() >= deadline) throw err;
        await new Promise((r) => setTimeout(r, 20));
      }
    }
  }

  /** Listens at `path` for one back-end to connect to us (QEMU's server=on), then stops listening. */
  static async accept(path: string, options: VhostUserFrontendOptions & { acceptTimeoutMs?: number } = {}): Promise<VhostUserFrontend> {
    const timeoutMs = options.acceptTimeoutMs ?? 10_000;
    const fe = new VhostUserFrontend(await VhostUserFrontend.#acceptOne(path, timeoutMs), options);
    fe.#target = { mode: 'accept', path, timeoutMs };
    return fe;
  }

  static async #acceptOne(path: string, timeoutMs: number): Promise<UnixSocket> {
    const server = UnixServer.listen(path);
    try {
      return await new Promise<UnixSocket>((resolve, reject) => {
        const t = setTimeout(() => reject(new VhostUserError('TIMEOUT', `no back-end connected to ${path} in ${timeoutMs} ms`)), timeoutMs);
        server.once('connection', (s) => {
          clearTimeout(t);
          resolve(s);
        });
      });
    } finally {
      server.close();
    }
  }

  /** Where reconnect() goes without a socket (the path given to connect() / accept()), or null. */
  get reconnectPath(): string | null {
    return this.#target?.path ?? null;
  }

  /**
   * After a close: a new connection, to the path connect() was given (one
   * attempt), or accepted on the path accept() listened on (within its
   * timeout), or `socket`. Everything negotiated starts over (handshake(),
   * setFeatures(), syncMemory() sends every region again, rings set up
   * again); the memory regions, `memory` and the caller's rings in them are
   * kept, as QEMU keeps guest memory and the inflight region across a
   * back-end restart.
   */
  async reconnect(socket?: UnixSocket): Promise<void> {
    if (!this.#closedErr) throw new VhostUserError('INVALID', 'reconnect() while the connection is up');
    let sock = socket;
    if (!sock) {
      const t = this.#target;
      if (!t) throw new VhostUserError('UNSUPPORTED', 'reconnect() without a socket on a front-end made from one');
      if (t.mode === 'connect') sock = await connectUnix(t.path);
      else sock = await VhostUserFrontend.#acceptOne(t.path, t.timeoutMs);
    }
    if (!this.#closedErr) {
      sock.destroy();
      throw new VhostUserError('INVALID', 'reconnect() raced with another');
    }
    this.#ch = this.#channel(sock);
    this.#closedErr = null;
    this.#waiting = null;
    this.#lock = Promise.resolve();
    this.offeredFeatures = 0n;
    this.features = 0n;
    this.offeredProtocolFeatures = 0n;
    this.protocolFeatures = 0n;
    this.maxQueues = null;
    this.memSlots = MAX_MEM_TABLE_REGIONS;
    this.offeredMemSlots = null;
    this.#sent = [];
    this.emit('reconnect');
  }

  /** A front-end over an already connected socket (tests, socketpairs). */
  static fromSocket(socket: UnixSocket, options: VhostUserFrontendOptions = {}): VhostUserFrontend {
    return new VhostUserFrontend(socket, options);
  }

  get closed(): boolean {
    return this.#closedErr !== null;
  }

  /** Why the connection closed, or null while it is up. */
  get closeReason(): VhostUserError | null {
    return this.#closedErr;
  }

  hasFeature(n: number): boolean {
    return (this.features & bit(n)) !== 0n;
  }

  hasProtocol(n: number): boolean {
    return (this.protocolFeatures & bit(n)) !== 0n;
  }

  get replyAck(): boolean {
    return this.hasProtocol(PF.REPLY_ACK);
  }

  get hostNotifiers(): ReadonlyMap<number, HostNotifier> {
    return this.#notifiers;
  }

  /** Resolves once the connection is closed. */
  waitClosed(): Promise<VhostUserError> {
    if (this.#closedErr) return Promise.resolve(this.#closedErr);
    return new Promise((r) => this.once('close', r));
  }

  // ---- the request machinery -------------------------------------------------

  /**
   * Sends one request; with `reply` waits for the back-end's reply (validated
   * header) and returns it. Serialized behind earlier requests.
   */
  request(request: number, payload: Uint8Array = new Uint8Array(0), fds: readonly (Fd | number)[] | null = null, reply: { maxFds?: number; needReply?: boolean } | null = null): Promise<VhostUserMessage | null> {
    const generation = this.#generation;
    const run = async (): Promise<VhostUserMessage | null> => {
      if (this.#closedErr || generation !== this.#generation) throw new VhostUserError('DISCONNECTED', `${name(request)}: ${(this.#closedErr ?? { message: 'the connection it was made on closed' }).message}`);
      const flags = FLAG_VERSION | (reply?.needReply ? FLAG_NEED_REPLY : 0);
      if (reply === null) {
        this.#ch.send(request, flags, payload, fds);
        return null;
      }
      return new Promise<VhostUserMessage>((resolve, reject) => {
        const timer = setTimeout(() => {
          if (this.#waiting?.timer !== timer) return;
          this.#waiting = null;
          const err = new VhostUserError('TIMEOUT', `no reply to ${name(request)} in ${this.#timeoutMs} ms`);
          reject(err);
          this.close(err);
        }, this.#timeoutMs);
        this.#waiting = { request, maxFds: reply.maxFds ?? 0, resolve, reject, timer };
        try {
          this.#ch.send(request, flags, payload, fds);
        } catch (err) {
          clearTimeout(timer);
          this.#waiting = null;
          reject(err);
        }
      });
    };
    const p = this.#lock.then(run, run);
    this.#lock = p.catch(() => {});
    return p;
  }

  /** A request whose reply is a u64. */
  async #getU64(request: number, payload?: Uint8Array): Promise<bigint> {
    return this.#u64(request, (await this.request(request, payload, null, {}))!);
  }

  /** A u64 reply; a wrong size is fatal (the stream cannot be trusted after it). */
  #u64(request: number, msg: VhostUserMessage): bigint {
    try {
      return replyU64(request, msg);
    } catch (err) {
      this.#reject(err as VhostUserError);
    }
  }

  /** Closes the connection for a reply that broke the protocol, and throws the error. */
  #reject(err: VhostUserError): never {
    this.#fatal(err);
    throw err;
  }

  /**
   * A request with no reply of its own: with REPLY_ACK it carries NEED_REPLY
   * and the ack is checked (non-zero: INVALID); without it, nothing to wait for.
   */
  async #set(request: number, payload?: Uint8Array, fds?: readonly (Fd | number)[] | null, forceAck = false): Promise<void> {
    if (!this.replyAck && !forceAck) {
      await this.request(request, payload, fds ?? null, null);
      return;
    }
    const r = await this.request(request, payload, fds ?? null, { needReply: true });
    const ack = this.#u64(request, r!);
    if (ack !== 0n) throw Object.assign(new VhostUserError('INVALID', `the back-end refused ${name(request)} (ack ${ack})`), { ack });
  }

  #onMessage(msg: VhostUserMessage): void {
    const w = this.#waiting;
    if (w === null) {
      closeAll(msg.fds);
      this.#fatal(protocolError(`unsolicited ${name(msg.request)} (flags 0x${msg.flags.toString(16)}) from the back-end`));
      return;
    }
    this.#waiting = null;
    clearTimeout(w.timer);
    let err: VhostUserError | null = null;
    if (msg.flags !== REPLY_FLAGS) {
      err = protocolError(`reply to ${name(w.request)} with flags 0x${msg.flags.toString(16)} instead of 0x${REPLY_FLAGS.toString(16)}`);
    } else if (msg.request !== w.request) {
      err = protocolError(`received unexpected msg type: expected ${name(w.request)} (${w.request}), received ${name(msg.request)} (${msg.request})`);
    } else if (msg.fds.length > w.maxFds) {
      err = protocolError(`reply to ${name(w.request)} carries ${msg.fds.length} fd(s) (expected at most ${w.maxFds})`);
    }
    if (err) {
      closeAll(msg.fds);
      w.reject(err);
      this.#fatal(err);
      return;
    }
    w.resolve(msg);
  }

  #emitError(err: Error): void {
    this.#log(`error: ${err.message}`);
    if (this.listenerCount('error') > 0) this.emit('error', err);
  }

  #fatal(err: VhostUserError): void {
    this.#emitError(err);
    this.close(err);
  }

  #onClose(err: Error | undefined): void {
    if (this.#closedErr) return;
    const reason =
      err instanceof VhostUserError ? err : new VhostUserError('DISCONNECTED', err ? `the back-end connection closed: ${err.message}` : 'the back-end closed the connection');
    this.#closedErr = reason;
    this.#generation++;
    const w = this.#waiting;
    this.#waiting = null;
    if (w) {
      clearTimeout(w.timer);
      w.reject(reason.code === 'DISCONNECTED' ? new VhostUserError('DISCONNECTED', `${name(w.request)}: ${reason.message}`) : reason);
    }
    this.#backend?.close();
    this.#backend = null;
    for (const n of this.#notifiers.values()) n.fd.close();
    this.#notifiers.clear();
    this.emit('close', reason);
  }

  /**
   * Closes the connection (and the back-end channel). Memory regions stay
   * ours: release them with releaseMemory().
   */
  close(err?: VhostUserError): void {
    if (this.#closedErr) return;
    // The reason is set first; the channel's own close event then finds it set.
    this.#onClose(err ?? new VhostUserError('DISCONNECTED', 'the front-end closed the connection'));
    this.#ch.close(err);
  }

  /** Unmaps and closes every memory region added (after close, or when the back-end no longer uses them). */
  releaseMemory(): void {
    this.memory.clear();
    for (const r of this.#regions) r.memory.close();
    this.#regions = [];
    this.#sent = [];
  }

  // ---- session start -------------------------------------------------------

  getFeatures(): Promise<bigint> {
    return this.#getU64(Req.GET_FEATURES);
  }

  getProtocolFeatures(): Promise<bigint> {
    return this.#getU64(Req.GET_PROTOCOL_FEATURES);
  }

  async setProtocolFeatures(f: bigint): Promise<void> {
    await this.request(Req.SET_PROTOCOL_FEATURES, u64(f));
    this.protocolFeatures = f;
  }

  async getQueueNum(): Promise<number> {
    const n = await this.#getU64(Req.GET_QUEUE_NUM);
    if (n === 0n || n > 0xffffn) this.#reject(protocolError(`GET_QUEUE_NUM answered ${n}`));
    return Number(n);
  }

  async getMaxMemSlots(): Promise<number> {
    const n = await this.#getU64(Req.GET_MAX_MEM_SLOTS);
    if (n === 0n || n > 0xffffn) this.#reject(protocolError(`GET_MAX_MEM_SLOTS answered ${n}`));
    return Number(n);
  }

  setOwner(): Promise<void> {
    return this.#set(Req.SET_OWNER);
  }

  /** RESET_DEVICE when negotiated, else the deprecated RESET_OWNER. */
  resetDevice(): Promise<void> {
    return this.hasProtocol(PF.RESET_DEVICE) ? this.#set(Req.RESET_DEVICE) : this.#set(Req.RESET_OWNER);
  }

  /**
   * The seed's vhost_user_backend_init + vhost_dev_init: GET_FEATURES,
   * GET/SET_PROTOCOL_FEATURES with its rules, GET_QUEUE_NUM, GET_MAX_MEM_SLOTS,
   * the back-end channel, SET_OWNER. Features are set afterwards
   * (setFeatures), as QEMU does at device start.
   */
  async handshake(options: HandshakeOptions = {}): Promise<void> {
    this.offeredFeatures = await this.getFeatures();
    const config = options.config ?? 'use';
    if ((this.offeredFeatures & bit(VF.PROTOCOL_FEATURES)) !== 0n) {
      this.offeredProtocolFeatures = await this.getProtocolFeatures();
      let p = this.offeredProtocolFeatures & FRONTEND_PROTOCOL_FEATURES & (options.protocolFeatures ?? FRONTEND_PROTOCOL_FEATURES);
      if (config === 'never') p &= ~bit(PF.CONFIG);
      else if (config === 'require' && (p & bit(PF.CONFIG)) === 0n) {
        throw new VhostUserError('UNSUPPORTED', 'the device expects VHOST_USER_PROTOCOL_F_CONFIG but the back-end does not offer it');
      }
      // A back-end request channel is needed for fds on it and for host notifiers.
      if ((p & bit(PF.BACKEND_REQ)) === 0n) p &= ~(bit(PF.BACKEND_SEND_FD) | bit(PF.HOST_NOTIFIER));
      if ((p & bit(PF.BACKEND_SEND_FD)) === 0n) p &= ~bit(PF.HOST_NOTIFIER);
      await this.setProtocolFeatures(p);
      if (this.hasProtocol(PF.MQ)) this.maxQueues = await this.getQueueNum();
      if (this.hasProtocol(PF.CONFIGURE_MEM_SLOTS)) {
        this.offeredMemSlots = await this.getMaxMemSlots();
        this.memSlots = Math.min(this.offeredMemSlots, FRONTEND_MAX_MEM_SLOTS);
      }
    } else if (config === 'require') {
      throw new VhostUserError('UNSUPPORTED', 'the device expects VHOST_USER_PROTOCOL_F_CONFIG but the back-end has no protocol features');
    }
    const queues = options.queues ?? 1;
    if (queues > (this.maxQueues ?? 1)) {
      throw new VhostUserError('UNSUPPORTED', `the maximum number of queues supported by the back-end is ${this.maxQueues ?? 1} (asked for ${queues})`);
    }
    if (this.hasProtocol(PF.BACKEND_REQ) && options.backendChannel !== false) await this.setBackendReqFd();
    this.#iommu = options.iommu === 'identity' ? this.#identityIommu(options.iommuPageSize ?? 4096) : (options.iommu ?? null);
    this.#identity = options.iommu === 'identity';
    await this.setOwner();
  }

  /** IOVA = GPA through our regions, one page per entry (never across a region's end). */
  #identityIommu(page: number): FrontendIommu {
    if (!Number.isInteger(page) || page < 4096 || (page & (page - 1)) !== 0 || page > 2 ** 30) throw new RangeError(`iommuPageSize ${page}: a power of two from 4096 to 2^30`);
    return {
      translate: (iova: number): IotlbEntry | null => {
        for (const r of this.#regions) {
          if (iova < r.guestPhysAddr || iova >= r.guestPhysAddr + r.size) continue;
          const start = Math.max(r.guestPhysAddr, iova - (iova % page));
          const end = Math.min(r.guestPhysAddr + r.size, start - (start % page) + page);
          return { iova: start, size: end - start, uaddr: r.userAddr + (start - r.guestPhysAddr), perm: IotlbPerm.RW };
        }
        return null;
      },
    };
  }

  /** ACCESS_PLATFORM is acked: ring and buffer addresses are IOVAs, translated by the back-end's IOTLB. */
  get iommuEnabled(): boolean {
    return (this.features & bit(VF.ACCESS_PLATFORM)) !== 0n;
  }

  /**
   * SET_FEATURES with `wanted & offered`, plus PROTOCOL_FEATURES when offered.
   * ACCESS_PLATFORM (IOTLB) is acked only with an IOMMU (handshake's `iommu`) and
   * BACKEND_REQ + REPLY_ACK negotiated (QEMU: "IOMMU support requires reply-ack and
   * backend-req protocol features"); otherwise it is left out. Without REPLY_ACK, a GET_FEATURES
   * follows as a barrier (the seed's enforce_reply): the back-end has applied
   * the features when it answers. Returns the value sent.
   */
  async setFeatures(wanted: bigint): Promise<bigint> {
    let f = this.offeredFeatures & wanted;
    if (!this.#iommu || !this.hasProtocol(PF.BACKEND_REQ) || !this.replyAck || !this.#backend) f &= ~bit(VF.ACCESS_PLATFORM);
    if ((this.offeredFeatures & bit(VF.PROTOCOL_FEATURES)) !== 0n) f |= bit(VF.PROTOCOL_FEATURES);
    if (this.replyAck) await this.#set(Req.SET_FEATURES, u64(f));
    else {
      await this.request(Req.SET_FEATURES, u64(f));
      await this.getFeatures();
    }
    this.features = f;
    return f;
  }

  // ---- memory ----------------------------------------------------------------

  get regions(): readonly FrontendRegion[] {
    return this.#regions;
  }

  /** Where the back-end sees GPA `gpa` (SET_VRING_ADDR takes these). */
  uva(gpa: number): number {
    for (const r of this.#regions) if (gpa >= r.guestPhysAddr && gpa < r.guestPhysAddr + r.size) return r.userAddr + (gpa - r.guestPhysAddr);
    throw new VhostUserError('INVALID', `GPA 0x${gpa.toString(16)} is in no memory region`);
  }

  /**
   * Adds a region of ours at `gpa` (default: after the last one, 2 MiB
   * aligned); the front-end owns it from now on. Call syncMemory() to tell
   * the back-end.
   */
  addMemory(memory: SharedMemory, gpa?: number): FrontendRegion {
    const end = this.#regions.reduce((e, r) => Math.max(e, r.guestPhysAddr + r.size), 0);
    const at = gpa ?? Math.ceil(end / 0x20_0000) * 0x20_0000;
    const region: FrontendRegion = Object.freeze({ memory, guestPhysAddr: at, size: memory.size, userAddr: UVA_BASE + at });
    this.memory.add({ guestPhysAddr: at, size: memory.size, userAddr: region.userAddr, mmapOffset: 0 }, memory.bytes);
    this.#regions.push(region);
    return region;
  }

  /** Takes a region out (it stays mapped and is given back); syncMemory() tells the back-end. */
  removeMemory(region: FrontendRegion): SharedMemory {
    const i = this.#regions.indexOf(region);
    if (i < 0) throw new VhostUserError('INVALID', 'not a region of this front-end');
    this.#regions.splice(i, 1);
    this.memory.remove({ guestPhysAddr: region.guestPhysAddr, size: region.size, userAddr: region.userAddr });
    return region.memory;
  }

  static #regionBytes(r: FrontendRegion, into: Buffer, at: number): void {
    into.writeBigUInt64LE(BigInt(r.guestPhysAddr), at);
    into.writeBigUInt64LE(BigInt(r.size), at + 8);
    into.writeBigUInt64LE(BigInt(r.userAddr), at + 16);
    into.writeBigUInt64LE(0n, at + 24);
  }

  /**
   * Gives the back-end the current region set: with CONFIGURE_MEM_SLOTS,
   * REM_MEM_REG for regions gone and ADD_MEM_REG for new ones (one fd each);
   * otherwise one SET_MEM_TABLE (at most 8 regions).
   */
  async syncMemory(): Promise<void> {
    if (this.#regions.length > this.memSlots) {
      throw new VhostUserError('INVALID', `${this.#regions.length} memory regions; the back-end takes at most ${this.memSlots}`);
    }
    // Regions gone under the identity IOMMU: their IOTLB entries are invalidated first (as a vIOMMU's
    // unmap notifier does), so the back-end never translates into memory it is about to unmap.
    if (this.iommuEnabled && this.#identity) {
      for (const r of this.#sent) if (!this.#regions.includes(r)) await this.iotlbInvalidate(r.guestPhysAddr, r.size);
    }
    if (this.hasProtocol(PF.CONFIGURE_MEM_SLOTS)) {
      for (const r of [...this.#sent]) {
        if (this.#regions.includes(r)) continue;
        const b = Buffer.alloc(40);
        VhostUserFrontend.#regionBytes(r, b, 8);
        await this.#set(Req.REM_MEM_REG, b);
        this.#sent.splice(this.#sent.indexOf(r), 1);
      }
      for (const r of this.#regions) {
        if (this.#sent.includes(r)) continue;
        const b = Buffer.alloc(40);
        VhostUserFrontend.#regionBytes(r, b, 8);
        await this.#set(Req.ADD_MEM_REG, b, [r.memory.fd]);
        this.#sent.push(r);
      }
      return;
    }
    await this.setMemTable(this.#regions);
  }

  /** SET_MEM_TABLE with these regions (acked with REPLY_ACK). */
  async setMemTable(regions: readonly FrontendRegion[]): Promise<void> {
    if (regions.length > MAX_MEM_TABLE_REGIONS) {
      throw new VhostUserError('INVALID', `SET_MEM_TABLE holds at most ${MAX_MEM_TABLE_REGIONS} regions (${regions.length} given)`);
    }
    const b = Buffer.alloc(8 + 32 * regions.length);
    b.writeUInt32LE(regions.length, 0);
    regions.forEach((r, i) => VhostUserFrontend.#regionBytes(r, b, 8 + 32 * i));
    await this.#set(Req.SET_MEM_TABLE, b, regions.map((r) => r.memory.fd));
    this.#sent = [...regions];
  }

  // ---- vrings --------------------------------------------------------------

  setVringNum(index: number, num: number): Promise<void> {
    return this.#set(Req.SET_VRING_NUM, vringState(index, num));
  }

  setVringBase(index: number, base: number): Promise<void> {
    return this.#set(Req.SET_VRING_BASE, vringState(index, base));
  }

  /**
   * SET_VRING_ADDR with GPAs translated to our user addresses, or, with ACCESS_PLATFORM, the
   * IOVAs as given (QEMU's vhost_user_vq_get_addr gives the rings' IOVAs then; the back-end
   * translates them through its IOTLB).
   */
  setVringAddr(index: number, desc: number, driver: number, device: number, flags = 0, log = 0): Promise<void> {
    const b = Buffer.alloc(40);
    const at = (a: number): number => (this.iommuEnabled ? a : this.uva(a));
    b.writeUInt32LE(index, 0);
    b.writeUInt32LE(flags, 4);
    b.writeBigUInt64LE(BigInt(at(desc)), 8);
    b.writeBigUInt64LE(BigInt(at(device)), 16);
    b.writeBigUInt64LE(BigInt(at(driver)), 24);
    b.writeBigUInt64LE(BigInt(log), 32);
    return this.#set(Req.SET_VRING_ADDR, b);
  }

  #vringFd(request: number, index: number, ev: EventFd | null): Promise<void> {
    if (index < 0 || index > 0xff) throw new VhostUserError('INVALID', `vring ${index} cannot be named in ${name(request)}`);
    return this.#set(request, u64(ev ? index : index | VRING_NOFD), ev ? [ev.fd] : null);
  }

  setVringKick(index: number, ev: EventFd | null): Promise<void> {
    return this.#vringFd(Req.SET_VRING_KICK, index, ev);
  }

  setVringCall(index: number, ev: EventFd | null): Promise<void> {
    return this.#vringFd(Req.SET_VRING_CALL, index, ev);
  }

  setVringErr(index: number, ev: EventFd | null): Promise<void> {
    return this.#vringFd(Req.SET_VRING_ERR, index, ev);
  }

  setVringEnable(index: number, enable: boolean): Promise<void> {
    return this.#set(Req.SET_VRING_ENABLE, vringState(index, enable ? 1 : 0));
  }

  /** GET_VRING_BASE: stops the ring; returns the base to restart from (its index echoed, 8 bytes). */
  async getVringBase(index: number): Promise<number> {
    const r = (await this.request(Req.GET_VRING_BASE, vringState(index, 0), null, {}))!;
    if (r.payload.length !== 8) this.#reject(protocolError(`GET_VRING_BASE reply of ${r.payload.length} bytes (a vring state is 8)`));
    const got = r.payload.readUInt32LE(0);
    if (got !== index) this.#reject(protocolError(`GET_VRING_BASE for vring ${index} answered for vring ${got}`));
    return r.payload.readUInt32LE(4);
  }

  /** The seed's vhost_virtqueue_start order: NUM, BASE, ADDR, KICK, CALL (ERR), then ENABLE. */
  async setupVring(index: number, s: VringSetup): Promise<void> {
    const packed = this.hasFeature(VF.RING_PACKED);
    await this.setVringNum(index, s.size);
    await this.setVringBase(index, s.base ?? (packed ? 0x8000_8000 : 0));
    await this.setVringAddr(index, s.desc, s.driver, s.device);
    await this.setVringKick(index, s.kick);
    await this.setVringCall(index, s.call);
    if (s.err !== undefined) await this.setVringErr(index, s.err);
    if (s.enable !== false && this.hasFeature(VF.PROTOCOL_FEATURES)) await this.setVringEnable(index, true);
  }

  /** Stops a ring: disable (with protocol features), then GET_VRING_BASE. */
  async stopVring(index: number): Promise<number> {
    if (this.hasFeature(VF.PROTOCOL_FEATURES)) await this.setVringEnable(index, false);
    return this.getVringBase(index);
  }

  // ---- config ---------------------------------------------------------------

  /** GET_CONFIG: `size` bytes from `offset` (at most 256; the reply must be exactly that long). */
  async getConfig(offset: number, size: number, flags = 0): Promise<Buffer> {
    if (!this.hasProtocol(PF.CONFIG)) throw new VhostUserError('UNSUPPORTED', 'GET_CONFIG without the CONFIG protocol feature');
    if (!Number.isInteger(size) || size < 1 || size > MAX_CONFIG_SIZE) throw new VhostUserError('INVALID', `bad config size ${size} (1..${MAX_CONFIG_SIZE})`);
    const b = Buffer.alloc(CONFIG_HDR + size);
    b.writeUInt32LE(offset, 0);
    b.writeUInt32LE(size, 4);
    b.writeUInt32LE(flags, 8);
    const r = (await this.request(Req.GET_CONFIG, b, null, {}))!;
    if (r.payload.length === 0) throw new VhostUserError('INVALID', 'the back-end failed GET_CONFIG (an empty reply)');
    if (r.payload.length !== CONFIG_HDR + size) this.#reject(protocolError(`GET_CONFIG reply of ${r.payload.length} bytes (expected ${CONFIG_HDR + size})`));
    const rs = r.payload.readUInt32LE(4);
    if (rs !== size) this.#reject(protocolError(`GET_CONFIG reply says ${rs} bytes (asked ${size})`));
    return Buffer.from(r.payload.subarray(CONFIG_HDR));
  }

  /** SET_CONFIG (flags 0: writable fields; 1: migration). */
  setConfig(offset: number, data: Uint8Array, flags = 0): Promise<void> {
    if (!this.hasProtocol(PF.CONFIG)) throw new VhostUserError('UNSUPPORTED', 'SET_CONFIG without the CONFIG protocol feature');
    if (data.length < 1 || data.length > MAX_CONFIG_SIZE) throw new VhostUserError('INVALID', `bad config size ${data.length} (1..${MAX_CONFIG_SIZE})`);
    const b = Buffer.alloc(CONFIG_HDR + data.length);
    b.writeUInt32LE(offset, 0);
    b.writeUInt32LE(data.length, 4);
    b.writeUInt32LE(flags, 8);
    b.set(data, CONFIG_HDR);
    return this.#set(Req.SET_CONFIG, b);
  }

  // ---- status, MTU, RARP, log --------------------------------------------

  /** SET_STATUS (STATUS protocol feature): acked, as the seed waits for it. */
  setStatus(status: number): Promise<void> {
    if (!this.hasProtocol(PF.STATUS)) throw new VhostUserError('UNSUPPORTED', 'SET_STATUS without the STATUS protocol feature');
    return this.#set(Req.SET_STATUS, u64(status & 0xff), null, this.replyAck);
  }

  async getStatus(): Promise<number> {
    if (!this.hasProtocol(PF.STATUS)) throw new VhostUserError('UNSUPPORTED', 'GET_STATUS without the STATUS protocol feature');
    const v = await this.#getU64(Req.GET_STATUS);
    if (v > 0xffn) this.#reject(protocolError(`GET_STATUS answered 0x${v.toString(16)} (a status is one byte)`));
    return Number(v);
  }

  netSetMtu(mtu: number): Promise<void> {
    if (!this.hasProtocol(PF.NET_MTU)) throw new VhostUserError('UNSUPPORTED', 'NET_SET_MTU without the NET_MTU protocol feature');
    return this.#set(Req.NET_SET_MTU, u64(mtu));
  }

  sendRarp(mac: Uint8Array): Promise<void> {
    if (!this.hasProtocol(PF.RARP)) throw new VhostUserError('UNSUPPORTED', 'SEND_RARP without the RARP protocol feature');
    const b = Buffer.alloc(8);
    b.set(mac.subarray(0, 6));
    return this.request(Req.SEND_RARP, b).then(() => undefined);
  }

  /**
   * SET_LOG_BASE: the dirty log in `log` (one bit per 4 KiB page from GPA 0).
   * With LOG_SHMFD the back-end answers (a reply echoing the request; no
   * payload or a u64).
   */
  async setLogBase(log: SharedMemory): Promise<void> {
    if (!this.hasProtocol(PF.LOG_SHMFD)) throw new VhostUserError('UNSUPPORTED', 'SET_LOG_BASE without the LOG_SHMFD protocol feature');
    const b = Buffer.alloc(16);
    b.writeBigUInt64LE(BigInt(log.size), 0);
    b.writeBigUInt64LE(0n, 8);
    const r = (await this.request(Req.SET_LOG_BASE, b, [log.fd], {}))!;
    // libvhost-user answers a u64 holding whatever its message buffer held (the seed checks the type only).
    if (r.payload.length !== 0 && r.payload.length !== 8) {
      this.#reject(protocolError(`SET_LOG_BASE reply of ${r.payload.length} bytes`));
    }
  }

  // ---- inflight ---------------------------------------------------------------

  /** GET_INFLIGHT_FD: the back-end's inflight region for these queues (mapped; null when it answers size 0). */
  async getInflightFd(numQueues: number, queueSize: number): Promise<InflightInfo> {
    if (!this.hasProtocol(PF.INFLIGHT_SHMFD)) throw new VhostUserError('UNSUPPORTED', 'GET_INFLIGHT_FD without the INFLIGHT_SHMFD protocol feature');
    const b = Buffer.alloc(24);
    b.writeUInt16LE(numQueues, 16);
    b.writeUInt16LE(queueSize, 18);
    const r = (await this.request(Req.GET_INFLIGHT_FD, b, null, { maxFds: 1 }))!;
    const fail = (msg: string): never => {
      closeAll(r.fds);
      return this.#reject(protocolError(msg));
    };
    if (r.payload.length !== 24 && r.payload.length !== 20) fail(`GET_INFLIGHT_FD reply of ${r.payload.length} bytes (expected 24)`);
    const size = r.payload.readBigUInt64LE(0);
    const offset = r.payload.readBigUInt64LE(8);
    if (size === 0n) {
      closeAll(r.fds);
      return { memory: null, mmapSize: 0, mmapOffset: 0, numQueues, queueSize };
    }
    if (r.fds.length !== 1) fail('GET_INFLIGHT_FD reply without its memfd');
    if (size > BigInt(Number.MAX_SAFE_INTEGER) || offset > BigInt(Number.MAX_SAFE_INTEGER) || offset % 4096n !== 0n) fail(`GET_INFLIGHT_FD region ${size} bytes at ${offset}`);
    const fd = r.fds[0]!;
    try {
      const memory = SharedMemory.map(fd, { offset: Number(offset), size: Number(size) });
      return { memory, mmapSize: Number(size), mmapOffset: Number(offset), numQueues, queueSize };
    } catch (err) {
      fd.close();
      throw new VhostUserError('PROTOCOL', `GET_INFLIGHT_FD region cannot be mapped: ${(err as Error).message}`);
    }
  }

  /** SET_INFLIGHT_FD: hands an inflight region back (after a reconnect). */
  setInflightFd(info: InflightInfo): Promise<void> {
    if (!this.hasProtocol(PF.INFLIGHT_SHMFD)) throw new VhostUserError('UNSUPPORTED', 'SET_INFLIGHT_FD without the INFLIGHT_SHMFD protocol feature');
    if (!info.memory) throw new VhostUserError('INVALID', 'SET_INFLIGHT_FD without a region');
    const b = Buffer.alloc(24);
    b.writeBigUInt64LE(BigInt(info.mmapSize), 0);
    b.writeBigUInt64LE(BigInt(info.mmapOffset), 8);
    b.writeUInt16LE(info.numQueues, 16);
    b.writeUInt16LE(info.queueSize, 18);
    return this.#set(Req.SET_INFLIGHT_FD, b, [info.memory.fd]);
  }

  // ---- IOTLB (ACCESS_PLATFORM) -------------------------------------------

  /** IOTLB_MSG UPDATE: the back-end may use `entry` (acked: REPLY_ACK is negotiated with ACCESS_PLATFORM). */
  async iotlbUpdate(entry: IotlbEntry): Promise<void> {
    await this.#iotlbMsg(IotlbType.UPDATE, entry.iova, entry.size, entry.uaddr, entry.perm);
    this.iotlbStats.updates++;
  }

  /** IOTLB_MSG INVALIDATE: entries of [iova, iova + size) are gone; once acked the back-end no longer uses them. */
  async iotlbInvalidate(iova: number, size: number): Promise<void> {
    await this.#iotlbMsg(IotlbType.INVALIDATE, iova, size, 0, 0);
    this.iotlbStats.invalidates++;
  }

  #iotlbMsg(type: number, iova: number, size: number, uaddr: number, perm: number): Promise<void> {
    if (!this.iommuEnabled) throw new VhostUserError('UNSUPPORTED', 'IOTLB_MSG without ACCESS_PLATFORM negotiated');
    for (const [k, v] of [['iova', iova], ['size', size], ['uaddr', uaddr]] as const) {
      if (!Number.isSafeInteger(v) || v < 0) throw new VhostUserError('INVALID', `IOTLB ${k} ${v}`);
    }
    if (type === IotlbType.UPDATE && (size === 0 || (perm & ~IotlbPerm.RW) !== 0 || perm === 0)) throw new VhostUserError('INVALID', `IOTLB UPDATE of ${size} bytes, perm ${perm}`);
    return this.#set(Req.IOTLB_MSG, iotlbBytes(iova, size, uaddr, perm, type), null, true);
  }

  /** BACKEND_IOTLB_MSG: a MISS is answered by an UPDATE (or refused), then acked if asked; ACCESS_FAIL is reported. */
  async #iotlbRequest(msg: VhostUserMessage): Promise<bigint> {
    if (!this.iommuEnabled || !this.#iommu) {
      this.#log('BACKEND_IOTLB_MSG without ACCESS_PLATFORM negotiated');
      return 1n;
    }
    if (msg.payload.length !== IOTLB_MSG_SIZE) {
      this.#log(`BACKEND_IOTLB_MSG of ${msg.payload.length} bytes (struct vhost_iotlb_msg is ${IOTLB_MSG_SIZE})`);
      return 1n;
    }
    const iova = Number(msg.payload.readBigUInt64LE(0));
    const perm = msg.payload[24]!;
    const type = msg.payload[25]!;
    if (type === IotlbType.ACCESS_FAIL) {
      this.iotlbStats.accessFails++;
      this.emit('iotlbAccessFail', iova, perm);
      return 0n;
    }
    if (type !== IotlbType.MISS || perm === 0 || (perm & ~IotlbPerm.RW) !== 0 || !Number.isSafeInteger(iova)) {
      this.#log(`BACKEND_IOTLB_MSG type ${type} perm ${perm} iova 0x${iova.toString(16)}: refused`);
      return 1n;
    }
    let entry: IotlbEntry | null = null;
    try {
      entry = this.#iommu.translate(iova, perm);
    } catch (err) {
      this.#log(`IOTLB translate of 0x${iova.toString(16)}: ${(err as Error).message}`);
    }
    // The entry must cover the address asked for with the access asked for.
    if (entry && (iova < entry.iova || iova >= entry.iova + entry.size || (entry.perm & perm) !== perm)) entry = null;
    this.emit('iotlbMiss', iova, perm, entry);
    if (!entry) {
      this.iotlbStats.refused++;
      this.#log(`IOTLB MISS of 0x${iova.toString(16)} (perm ${perm}): no translation`);
      return 1n;
    }
    this.iotlbStats.misses++;
    // "Completed" for a MISS: the front-end has sent the UPDATE (the spec's BACKEND_IOTLB_MSG).
    await this.iotlbUpdate(entry);
    return 0n;
  }

  // ---- the back-end request channel ------------------------------------

  /** SET_BACKEND_REQ_FD: a socketpair, one end to the back-end; its requests are served here. */
  async setBackendReqFd(): Promise<void> {
    if (!this.hasProtocol(PF.BACKEND_REQ)) throw new VhostUserError('UNSUPPORTED', 'SET_BACKEND_REQ_FD without the BACKEND_REQ protocol feature');
    const [ours, theirs] = socketPairFds();
    const ch = new MessageChannel(new UnixSocket(ours));
    try {
      await this.#set(Req.SET_BACKEND_REQ_FD, new Uint8Array(0), [theirs]);
    } catch (err) {
      ch.close();
      throw err;
    } finally {
      theirs.close();
    }
    this.#backend?.close();
    this.#backend = ch;
    ch.on('message', (m) => this.#onBackendRequest(ch, m));
    ch.on('error', (e) => this.#emitError(e));
    ch.on('close', () => {
      if (this.#backend === ch) this.#backend = null;
    });
  }

  /**
   * Back-end requests are served one at a time, in order (an IOTLB MISS waits for its UPDATE's
   * ack): replies go back in the order of the requests, which is how a back-end matches them.
   */
  #onBackendRequest(ch: MessageChannel, msg: VhostUserMessage): void {
    this.#backendQueue = this.#backendQueue.then(() => this.#serveBackendRequest(ch, msg)).catch((err: Error) => this.#log(`back-end request ${msg.request}: ${err.message}`));
  }

  async #serveBackendRequest(ch: MessageChannel, msg: VhostUserMessage): Promise<void> {
    let ret = 0n;
    const reply = (r: bigint): void => {
      if ((msg.flags & FLAG_NEED_REPLY) === 0 || ch.closed) return;
      try {
        ch.send(msg.request, REPLY_FLAGS, u64(r));
      } catch {
        /* the channel closed */
      }
    };
    const fds = msg.fds;
    const rname = Object.entries(BackendReq).find(([, v]) => v === msg.request)?.[0] ?? `back-end request ${msg.request}`;
    if ((msg.flags & FLAG_REPLY) !== 0) {
      closeAll(fds);
      this.#emitError(protocolError(`${rname} with the REPLY flag on the back-end channel`));
      ch.close();
      return;
    }
    if (fds.length > 0 && !this.hasProtocol(PF.BACKEND_SEND_FD)) {
      this.#log(`${rname}: fds without BACKEND_SEND_FD`);
    }
    if (msg.request === BackendReq.IOTLB_MSG) {
      closeAll(fds);
      let r = 1n;
      try {
        r = await this.#iotlbRequest(msg);
      } catch (err) {
        this.#log(`IOTLB MISS: the UPDATE failed: ${(err as Error).message}`);
      }
      reply(r);
      return;
    }
    switch (msg.request) {
      case BackendReq.CONFIG_CHANGE_MSG:
        closeAll(fds);
        if (!this.hasProtocol(PF.CONFIG)) ret = 1n;
        else this.emit('configChange');
        break;
      case BackendReq.VRING_HOST_NOTIFIER_MSG: {
        if (!this.hasProtocol(PF.HOST_NOTIFIER) || msg.payload.length !== 24) {
          closeAll(fds);
          ret = 1n;
          break;
        }
        const u = msg.payload.readBigUInt64LE(0);
        const index = Number(u & 0xffn);
        const nofd = (u & BigInt(VRING_NOFD)) !== 0n;
        const size = Number(msg.payload.readBigUInt64LE(8));
        const offset = Number(msg.payload.readBigUInt64LE(16));
        this.#notifiers.get(index)?.fd.close();
        this.#notifiers.delete(index);
        if (nofd) {
          closeAll(fds);
          this.emit('hostNotifier', index, null);
        } else if (fds.length !== 1) {
          closeAll(fds);
          ret = 1n;
        } else {
          const n = { fd: fds[0]!, size, offset };
          this.#notifiers.set(index, n);
          this.emit('hostNotifier', index, n);
        }
        break;
      }
      default:
        closeAll(fds);
        this.#log(`${rname}: not handled`);
        ret = 1n;
    }
    reply(ret);
  }
}

/** Names of the set bits of `v` (unknown ones as bitN). */
export function bitNames(v: bigint, names: Record<number, string>): string[] {
  const out: string[] = [];
  for (let i = 0; i < 64; i++) if ((v >> BigInt(i)) & 1n) out.push(names[i] ?? `bit${i}`);
  return out;
}
