/**
 * The device side of vhost-user: a back-end that a front-end (QEMU, DPDK's
 * virtio-user, our own front-end) connects to, giving it guest memory and
 * rings. The device author implements a VhostUserDevice (features, config
 * space, what to do with a ring that has buffers); this class handles the
 * protocol, the memory table, the rings (src/virtio/), dirty logging,
 * inflight tracking and reconnection.
 *
 *   const be = VhostUserBackend.listen('/tmp/blk.sock', device);   // or .connect(path)
 *
 * One front-end at a time; when it disconnects the back-end forgets its
 * state (memory, rings, fds) and accepts the next one, which may hand back
 * the inflight region (SET_INFLIGHT_FD) so requests in flight at the
 * disconnect are resubmitted.
 */
import { EventEmitter } from 'node:events';
import fs from 'node:fs';
import { Fd, closeAll } from '../sys/fd.js';
import { EventFd } from '../sys/eventfd.js';
import { native } from '../sys/native.js';
import { SharedMemory } from '../sys/shm.js';
import { UnixServer, UnixSocket, connectUnix } from '../sys/socket.js';
import { GuestMemory, DirtyLog, InflightRegion, createDeviceQueue, inflightQueueSize, VirtioError, Iotlb, IotlbMiss, IOTLB_PERM_READ, IOTLB_PERM_WRITE } from '../virtio/index.js';
import type { DeviceQueue, DescChain, MemoryRegionInfo } from '../virtio/index.js';
import { MessageChannel, type VhostUserMessage } from './channel.js';
import {
  BackendReq,
  FLAG_NEED_REPLY,
  FLAG_REPLY,
  FLAG_VERSION,
  LOG_PAGE,
  MAX_CONFIG_SIZE,
  MAX_MEM_SLOTS,
  MAX_MEM_TABLE_REGIONS,
  ProtocolFeature as PF,
  REQ_NAMES,
  Req,
  VRING_F_LOG,
  VRING_IDX_MASK,
  VRING_NOFD,
  VirtioFeature as VF,
  bit,
} from './constants.js';
import { VhostUserError } from './errors.js';
import { threadPoller, type Pollable } from './poller.js';

/** sizeof(struct vhost_iotlb_msg): iova, size, uaddr (u64), perm, type (u8), padded to 32. */
const IOTLB_MSG_SIZE = 32;
/** struct vhost_iotlb_msg type. */
const IOTLB_MISS = 1;
const IOTLB_UPDATE = 2;
const IOTLB_INVALIDATE = 3;

/** What the back-end's IOTLB saw (VhostUserBackendOptions.iommu), over all sessions. */
export interface IotlbStats {
  /** BACKEND_IOTLB_MSG MISS messages sent. */
  misses: number;
  /** IOTLB_MSG UPDATEs applied. */
  updates: number;
  /** IOTLB_MSG INVALIDATEs applied. */
  invalidations: number;
}

/** What a device author implements. */
export interface VhostUserDevice {
  /** The virtio device features offered (VERSION_1, ring layouts, device bits); the back-end adds PROTOCOL_FEATURES and LOG_ALL. */
  readonly features: bigint;
  /** Queues the device has (GET_QUEUE_NUM). */
  readonly numQueues: number;
  /** Largest ring the device accepts (default 32768). */
  readonly maxQueueSize?: number;
  /** Config space (GET_CONFIG); offering it makes the back-end offer the CONFIG protocol feature. */
  config?(): Uint8Array;
  /** SET_CONFIG: return false to refuse. */
  setConfig?(offset: number, data: Uint8Array, flags: number): boolean;
  /** The features the front-end acked (SET_FEATURES). */
  setFeatures?(features: bigint): void;
  /**
   * A ring has buffers (a kick, its start, or a resubmission after reconnect):
   * pop chains with queue.pop(), complete each with queue.push(), then
   * queue.notify(). Completion may come later (asynchronous I/O). A busy-polled
   * ring's handler may return false when it found nothing it could do (the poll
   * loop then sleeps a few microseconds when no ring made progress).
   */
  handleQueue(queue: VhostQueue): void | boolean;
  /** RESET_DEVICE / RESET_OWNER / a front-end gone: forget per-session state. */
  reset?(): void;
  /** NET_SET_MTU (offered as NET_MTU when present). */
  setMtu?(mtu: number): boolean;
  /** SEND_RARP (offered as RARP when present): the guest's MAC after a migration. */
  sendRarp?(mac: Uint8Array): void;
  /**
   * Device state for migration (DEVICE_STATE, offered when both are present): what the
   * device keeps beyond the rings, saved with the rings stopped; loadState returns false
   * to refuse a state.
   */
  saveState?(): Uint8Array;
  loadState?(state: Uint8Array): boolean;
  /**
   * Whether a started but disabled ring is still served (handleQueue called, pop()
   * returns chains): the spec's rule for a net device's TX rings, which must be
   * processed and their packets discarded while disabled. Default: not served.
   */
  serveDisabled?(queueIndex: number): boolean;
  /**
   * The ring is stopping (GET_VRING_BASE, a reset): give back every chain the device
   * holds popped and not pushed, or the stop waits for them.
   */
  queueStopping?(queue: VhostQueue): void;
  /**
   * Whether a ring is busy-polled (src/vhost-user/poller.ts): its kick notifications
   * are switched off while it runs and this thread's poll loop calls handleQueue on
   * every pass (queue.polled is true; the handler must not re-enable notifications
   * nor reschedule). Default: event-driven (kicks).
   */
  pollQueue?(queueIndex: number): boolean;
}

export interface VhostUserBackendOptions {
  /** Lines for a log (protocol events, errors); default: none. */
  log?: (line: string) => void;
  /** Offer INFLIGHT_SHMFD (default true). */
  inflight?: boolean;
  /** A line per front-end message (name, flags, payload size, fds). */
  trace?: (line: string) => void;
  /**
   * Offer VIRTIO_F_ACCESS_PLATFORM: work behind the front-end's IOMMU (QEMU with a vIOMMU and
   * `iommu_platform=on`). Ring and buffer addresses are then IOVAs, translated through an IOTLB
   * the front-end fills (IOTLB_MSG UPDATE / INVALIDATE); a missing translation is asked for on
   * the back-end channel (BACKEND_IOTLB_MSG MISS) and the ring waits for it. Needs BACKEND_REQ
   * and REPLY_ACK acked. Default false (as DPDK's RTE_VHOST_USER_IOMMU_SUPPORT: a front-end that
   * acks the bit without being an IOMMU would leave every ring waiting).
   */
  iommu?: boolean;
  /** IOTLB entries kept at most (default 2048). */
  iotlbEntries?: number;
}

/** One ring's state, as the front-end set it up. */
export class VhostQueue implements Pollable {
  readonly index: number;
  size = 0;
  /** Front-end virtual addresses from SET_VRING_ADDR (desc, used, avail), and its flags / log address. */
  addr: { desc: number; used: number; avail: number; flags: number; log: number } | null = null;
  base = 0;
  enabled = false;
  kick: EventFd | null = null;
  call: EventFd | null = null;
  err: EventFd | null = null;
  /** Set once the ring started (kick fd received) and until GET_VRING_BASE stops it. */
  ring: DeviceQueue | null = null;
  /** Chains popped and not yet pushed. */
  inFlight = 0;
  #owner: Session;
  #unsubscribe: (() => void) | null = null;
  #poller: NodeJS.Timeout | null = null;
  #drainWaiters: (() => void)[] = [];
  #scheduled = false;
  /** Chains recovered from the inflight region, handed out by pop() first. */
  #resubmit: DescChain[] = [];
  /** Chains given back by unpop() (a stack: the last given back is popped first). */
  #unpopped: DescChain[] = [];
  #polled = false;
  /** Waiting for an IOTLB UPDATE (a buffer's translation missed): pop() returns null until then. */
  iotlbWait = false;
  /** The ring's start waits for an IOTLB UPDATE (its addresses missed). */
  startWait = false;

  /** @internal */
  constructor(index: number, owner: Session) {
    this.index = index;
    this.#owner = owner;
  }

  get started(): boolean {
    return this.ring !== null;
  }

  /** Busy-polled by the thread's poll loop (VhostUserDevice.pollQueue), kicks off. */
  get polled(): boolean {
    return this.#polled;
  }

  /** @internal One pass of the poll loop; false: nothing done. */
  pollOnce(): boolean {
    if (!this.ring || !this.#served() || this.#owner.closed || this.#owner.memoryFaulted()) return false;
    let busy = false;
    try {
      busy = this.#owner.device.handleQueue(this) !== false;
    } catch (err) {
      this.#owner.log(`vring ${this.index}: the device's handler threw: ${(err as Error).stack ?? String(err)}`);
    }
    if (busy) this.#owner.memoryFaulted(); // the pass touched memory the front-end truncated: end the session
    return busy;
  }

  /**
   * Gives back a chain popped and not pushed: the next pop() returns it again
   * (a device that cannot take a request now, e.g. a switch whose receiver has no
   * buffers, and retries it later). Chains still given back when the ring stops are
   * completed with length 0.
   */
  unpop(chain: DescChain): void {
    if (!this.ring || this.#owner.closed) return;
    this.inFlight = Math.max(0, this.inFlight - 1);
    this.#unpopped.push(chain);
  }

  #startPolling(ring: DeviceQueue): boolean {
    let poll = false;
    try {
      poll = this.#owner.device.pollQueue?.(this.index) === true;
    } catch {
      poll = false;
    }
    this.#polled = poll;
    if (!poll) return false;
    ring.disableNotifications();
    threadPoller.add(this);
    return true;
  }

  #stopPolling(): void {
    if (!this.#polled) return;
    this.#polled = false;
    threadPoller.delete(this);
  }

  /** The negotiated virtio features. */
  get features(): bigint {
    return this.#owner.features;
  }

  /**
   * The next chain to serve, or null (none available, ring stopped, disabled,
   * broken, or the front-end gone). A malformed chain breaks the ring: it is
   * reported on the err eventfd and the log, and pop() returns null from then on.
   */
  pop(): DescChain | null {
    const ring = this.ring;
    if (!ring || !this.#served() || this.#owner.closed) return null;
    const back = this.#unpopped.pop();
    if (back) {
      this.inFlight++;
      return back;
    }
    const again = this.#resubmit.shift();
    if (again) {
      this.inFlight++;
      return again;
    }
    if (this.iotlbWait) return null;
    let chain: DescChain | null;
    try {
      chain = ring.pop();
    } catch (err) {
      if (err instanceof IotlbMiss) {
        // Nothing was taken: the ring waits for the front-end's UPDATE, then pops again.
        this.iotlbWait = true;
        this.#owner.iotlbMiss(err);
        return null;
      }
      this.#broken(err as Error);
      return null;
    }
    if (chain) this.inFlight++;
    return chain;
  }

  /** Completes a chain with `written` bytes written to its device-writable buffers. */
  push(chain: DescChain, written: number): void {
    this.#complete(1, (ring) => ring.push(chain, written));
  }

  /** Completes several chains, published to the driver at once (DeviceQueue.pushBatch). */
  pushBatch(chains: readonly DescChain[], written: ArrayLike<number>): void {
    if (chains.length > 0) this.#complete(chains.length, (ring) => ring.pushBatch(chains, written));
  }

  #complete(n: number, write: (ring: DeviceQueue) => void): void {
    this.inFlight = Math.max(0, this.inFlight - n);
    const ring = this.ring;
    if (ring && !this.#owner.closed) {
      try {
        write(ring);
      } catch (err) {
        this.#broken(err as Error);
      }
    }
    if (this.inFlight === 0 && this.#drainWaiters.length > 0) {
      const w = this.#drainWaiters;
      this.#drainWaiters = [];
      for (const f of w) f();
    }
    this.#owner.maybeRelease();
  }

  /** Interrupts the driver if it asked for it (event idx / flags) since the last notify. */
  notify(): void {
    const ring = this.ring;
    if (!ring || this.#owner.closed) return;
    if (!this.call && !this.#owner.inbandCalls) return;
    try {
      if (!ring.needsNotify()) return;
      if (this.call) this.call.signal(1);
      else this.#owner.vringCall(this.index);
    } catch (err) {
      this.#owner.log(`vring ${this.index}: notify failed: ${(err as Error).message}`);
    }
  }

  /** @internal Starts the ring: builds the ring view, listens for kicks. */
  start(ring: DeviceQueue, resubmit: DescChain[]): void {
    this.ring = ring;
    this.#resubmit = resubmit;
    if (this.#startPolling(ring)) return;
    if (this.kick) this.#unsubscribe = this.kick.subscribe(() => this.schedule());
    else this.#poller = setInterval(() => this.schedule(), 1);
    this.schedule(); // buffers may be waiting already (or resubmitted ones)
  }

  /** @internal A new kick fd (or none: polling) for a running ring. */
  replaceKick(ev: EventFd | null): void {
    this.#unsubscribe?.();
    this.#unsubscribe = null;
    if (this.#poller) clearInterval(this.#poller);
    this.#poller = null;
    this.kick?.close();
    this.kick = ev;
    if (this.#polled) return;
    if (ev) this.#unsubscribe = ev.subscribe(() => this.schedule());
    else this.#poller = setInterval(() => this.schedule(), 1);
    this.schedule();
  }

  /** @internal Stops the ring (GET_VRING_BASE): no more kicks; resolves once every popped chain was pushed. */
  async stop(): Promise<number> {
    this.iotlbWait = false;
    this.startWait = false;
    this.#stopPolling();
    this.#unsubscribe?.();
    this.#unsubscribe = null;
    if (this.#poller) clearInterval(this.#poller);
    this.#poller = null;
    if (this.#unpopped.length > 0) {
      const back = this.#unpopped.reverse();
      this.#unpopped = [];
      this.inFlight += back.length;
      this.pushBatch(back, new Array<number>(back.length).fill(0));
    }
    try {
      this.#owner.device.queueStopping?.(this);
    } catch (err) {
      this.#owner.log(`vring ${this.index}: the device's queueStopping threw: ${(err as Error).message}`);
    }
    if (this.inFlight > 0) await new Promise<void>((resolve) => this.#drainWaiters.push(resolve));
    const ring = this.ring;
    const base = ring ? ring.base() : this.base;
    this.ring = null;
    this.#resubmit = [];
    this.#unpopped = [];
    this.base = base;
    return base;
  }

  /** @internal */
  schedule(): void {
    if (this.#scheduled || this.#polled || !this.ring || !this.#served()) return;
    this.#scheduled = true;
    setImmediate(() => {
      this.#scheduled = false;
      if (!this.ring || !this.#served() || this.#owner.closed || this.#owner.memoryFaulted()) return;
      try {
        this.#owner.device.handleQueue(this);
      } catch (err) {
        this.#owner.log(`vring ${this.index}: the device's handler threw: ${(err as Error).stack ?? String(err)}`);
      }
      this.#owner.memoryFaulted(); // the batch touched memory the front-end truncated: end the session
    });
  }

  /** @internal Closes the ring's fds (the session ends). Chains still in flight are dropped when pushed. */
  close(): void {
    this.iotlbWait = false;
    this.startWait = false;
    this.#stopPolling();
    this.#unsubscribe?.();
    this.#unsubscribe = null;
    if (this.#poller) clearInterval(this.#poller);
    this.#poller = null;
    this.ring = null;
    this.#resubmit = [];
    this.#unpopped = [];
    for (const f of [this.kick, this.call, this.err]) f?.close();
    this.kick = this.call = this.err = null;
    const w = this.#drainWaiters;
    this.#drainWaiters = [];
    for (const f of w) f();
  }

  /** Enabled, or disabled and the device serves disabled rings of this index. */
  #served(): boolean {
    return this.enabled || this.#owner.device.serveDisabled?.(this.index) === true;
  }

  #broken(err: Error): void {
    this.#owner.log(`vring ${this.index}: ${err instanceof VirtioError ? `${err.code}: ` : ''}${err.message}; the ring is broken`);
    try {
      this.err?.signal(1);
    } catch {
      // the front-end closed it
    }
  }
}

/** A mapped memory region and what still refers to it. */
interface MappedRegion {
  info: MemoryRegionInfo;
  shm: SharedMemory;
}

/** One front-end's session: everything it set up. */
class Session {
  readonly device: VhostUserDevice;
  readonly channel: MessageChannel;
  readonly memory = new GuestMemory();
  readonly queues: VhostQueue[];
  readonly log: (line: string) => void;
  features = 0n;
  protocolFeatures = 0n;
  owner = false;
  status = 0;
  closed = false;
  dirtyLog: DirtyLog | null = null;
  #logShm: SharedMemory | null = null;
  #logFd: EventFd | null = null;
  #backendChannel: MessageChannel | null = null;
  #backendReplies: ((msg: VhostUserMessage) => void)[] = [];
  inflight: { shm: SharedMemory; region: InflightRegion; numQueues: number; queueSize: number } | null = null;
  /** Regions removed or replaced while chains were in flight: unmapped once none is. */
  #retired: MappedRegion[] = [];
  #regions: MappedRegion[] = [];
  readonly #offeredProtocol: bigint;
  #queue: Promise<void> = Promise.resolve();

  readonly trace: ((line: string) => void) | null;
  /** ACCESS_PLATFORM offered (VhostUserBackendOptions.iommu): the IOTLB's size. */
  readonly #iommu: { entries: number; stats: IotlbStats } | null;
  /** Set while ACCESS_PLATFORM is acked: IOVA -> front-end address translations. */
  iotlb: Iotlb | null = null;
  /** Misses asked for and not yet answered by an UPDATE (IOVA page and perm), bounded. */
  #missesPending = new Set<string>();
  /** IOTLB counters (the back-end's, over all sessions): misses sent, updates and invalidations received. */
  readonly iotlbStats: IotlbStats;

  constructor(
    device: VhostUserDevice,
    channel: MessageChannel,
    offeredProtocol: bigint,
    log: (line: string) => void,
    trace?: (line: string) => void,
    iommu: { entries: number; stats: IotlbStats } | null = null,
  ) {
    this.device = device;
    this.#iommu = iommu;
    this.iotlbStats = iommu?.stats ?? { misses: 0, updates: 0, invalidations: 0 };
    this.trace = trace ?? null;
    this.channel = channel;
    this.log = log;
    this.#offeredProtocol = offeredProtocol;
    this.queues = Array.from({ length: Math.max(1, device.numQueues) }, (_, i) => new VhostQueue(i, this));
    channel.on('message', (msg) => {
      // One message at a time, in order: a handler may wait (GET_VRING_BASE drains the ring).
      this.#queue = this.#queue.then(() => this.#dispatch(msg));
    });
  }

  get inFlight(): number {
    let n = 0;
    for (const q of this.queues) n += q.inFlight;
    return n;
  }

  has(feature: number): boolean {
    return (this.features & bit(feature)) !== 0n;
  }

  hasProtocol(feature: number): boolean {
    return (this.protocolFeatures & bit(feature)) !== 0n;
  }

  /**
   * Whether the front-end truncated a memfd we mapped and an access faulted (SIGBUS contained by
   * src/sys/shm.ts: the mapping now holds zero pages). If so the session is closed with a
   * MEMORY_FAULT error. Checked around each kick batch. True when the session is closed.
   */
  memoryFaulted(): boolean {
    if (this.closed) return true;
    if (!this.#regions.some((r) => r.shm.faulted) && this.#logShm?.faulted !== true && this.inflight?.shm.faulted !== true) return false;
    const e = new VhostUserError('MEMORY_FAULT', 'the front-end truncated shared memory under our mapping (SIGBUS contained): session closed');
    this.log(e.message);
    this.channel.close(e);
    this.close();
    return true;
  }

  /** Unmaps retired regions once no chain refers to guest memory any more. */
  maybeRelease(): void {
    if (this.#retired.length === 0 || this.inFlight > 0) return;
    const r = this.#retired;
    this.#retired = [];
    for (const m of r) m.shm.close();
  }

  async #dispatch(msg: VhostUserMessage): Promise<void> {
    if (this.closed) {
      closeAll(msg.fds);
      return;
    }
    const name = REQ_NAMES[msg.request] ?? `request ${msg.request}`;
    this.trace?.(`${name} flags 0x${msg.flags.toString(16)} ${msg.payload.length} B${msg.fds.length ? `, ${msg.fds.length} fd(s)` : ''}${msg.payload.length && msg.payload.length <= 40 ? ` ${msg.payload.toString('hex')}` : ''}`);
    let reply: Uint8Array | null;
    let fdsOut: Fd[] | null = null;
    try {
      const r = await this.#handle(msg);
      if (r && 'payload' in r) {
        reply = r.payload;
        fdsOut = r.fds ?? null;
      } else reply = null;
      // fds the request does not take (handlers pop what they keep) are closed, never kept.
      closeAll(msg.fds);
    } catch (err) {
      closeAll(msg.fds);
      const e = err as Error;
      this.log(`${name}: ${e.message}`);
      if (e instanceof VhostUserError && e.code === 'PROTOCOL') {
        this.channel.close(e);
        return;
      }
      // A failure: acked as one when the front-end asked, else the connection cannot go on
      // for a request that must be answered.
      if (MUST_REPLY.has(msg.request)) {
        this.channel.close(e);
        return;
      }
      if (msg.flags & FLAG_NEED_REPLY && this.hasProtocol(PF.REPLY_ACK)) this.#reply(msg.request, u64(1n));
      return;
    }
    if (this.closed) return;
    if (reply !== null) this.#reply(msg.request, reply, fdsOut);
    else if (msg.flags & FLAG_NEED_REPLY && this.hasProtocol(PF.REPLY_ACK)) this.#reply(msg.request, u64(0n));
  }

  #reply(request: number, payload: Uint8Array, fds: Fd[] | null = null): void {
    try {
      this.channel.send(request, FLAG_VERSION | FLAG_REPLY, payload, fds);
    } catch (err) {
      this.log(`reply to ${REQ_NAMES[request] ?? request}: ${(err as Error).message}`);
    }
  }

  #queueAt(raw: number): VhostQueue {
    const q = this.queues[raw];
    if (!q) throw new VhostUserError('INVALID', `vring ${raw} does not exist (the device has ${this.queues.length})`);
    return q;
  }

  async #handle(msg: VhostUserMessage): Promise<{ payload: Uint8Array; fds?: Fd[] } | void> {
    const p = new Payload(msg);
    switch (msg.request) {
      case Req.GET_FEATURES:
        p.expect(0);
        return { payload: u64(this.#offeredFeatures()) };
      case Req.SET_FEATURES: {
        const f = p.u64(0);
        p.expect(8);
        const unknown = f & ~this.#offeredFeatures();
        if (unknown !== 0n) throw new VhostUserError('INVALID', `features 0x${unknown.toString(16)} were not offered`);
        const platform = (f & bit(VF.ACCESS_PLATFORM)) !== 0n;
        if (platform && !(this.hasProtocol(PF.BACKEND_REQ) && this.hasProtocol(PF.REPLY_ACK))) {
          // QEMU's rule too (vhost_user_set_features: "IOMMU support requires reply-ack and backend-req").
          throw new VhostUserError('INVALID', 'ACCESS_PLATFORM without BACKEND_REQ and REPLY_ACK');
        }
        this.features = f;
        if (!platform) this.iotlb = null;
        else this.iotlb ??= new Iotlb(this.memory, { maxEntries: this.#iommu?.entries ?? 2048 });
        // Without PROTOCOL_FEATURES the rings start enabled (there is no SET_VRING_ENABLE).
        if (!this.has(VF.PROTOCOL_FEATURES)) for (const q of this.queues) q.enabled = true;
        this.device.setFeatures?.(f);
        return;
      }
      case Req.GET_PROTOCOL_FEATURES:
        p.expect(0);
        return { payload: u64(this.#offeredProtocol) };
      case Req.SET_PROTOCOL_FEATURES: {
        const f = p.u64(0);
        p.expect(8);
        const unknown = f & ~this.#offeredProtocol;
        if (unknown !== 0n) throw new VhostUserError('INVALID', `protocol features 0x${unknown.toString(16)} were not offered`);
        if (f & bit(PF.INBAND_NOTIFICATIONS) && !(f & bit(PF.BACKEND_REQ) && f & bit(PF.REPLY_ACK))) {
          // The spec: an error; the back-end should close the connection.
          throw new VhostUserError('PROTOCOL', 'INBAND_NOTIFICATIONS without BACKEND_REQ and REPLY_ACK');
        }
        this.protocolFeatures = f;
        return;
      }
      case Req.SET_OWNER:
        p.expect(0);
        this.owner = true;
        return;
      case Req.RESET_OWNER:
      case Req.RESET_DEVICE:
        p.expect(0);
        await this.#resetDevice();
        return;
      case Req.GET_QUEUE_NUM:
        p.expect(0);
        return { payload: u64(BigInt(this.queues.length)) };
      case Req.GET_MAX_MEM_SLOTS:
        p.expect(0);
        return { payload: u64(BigInt(MAX_MEM_SLOTS)) };
      case Req.SET_MEM_TABLE:
        this.#setMemTable(msg, p);
        return;
      case Req.ADD_MEM_REG:
        this.#addMemReg(msg, p);
        return;
      case Req.REM_MEM_REG:
        this.#remMemReg(msg, p);
        return;
      case Req.SET_VRING_NUM: {
        const q = this.#queueAt(p.u32(0));
        const num = p.u32(4);
        p.expect(8);
        const max = this.device.maxQueueSize ?? 32768;
        if (num < 1 || num > max) throw new VhostUserError('INVALID', `vring ${q.index}: size ${num} (1..${max})`);
        if (q.started) throw new VhostUserError('INVALID', `vring ${q.index} is running`);
        q.size = num;
        return;
      }
      case Req.SET_VRING_ADDR: {
        p.expect(40);
        const q = this.#queueAt(p.u32(0));
        q.addr = { flags: p.u32(4), desc: p.addr(8), used: p.addr(16), avail: p.addr(24), log: p.addr(32) };
        return;
      }
      case Req.SET_VRING_BASE: {
        const q = this.#queueAt(p.u32(0));
        const num = p.u32(4);
        p.expect(8);
        if (q.started) throw new VhostUserError('INVALID', `vring ${q.index} is running`);
        q.base = num;
        return;
      }
      case Req.GET_VRING_BASE: {
        const q = this.#queueAt(p.u32(0));
        p.expect(8);
        const base = await q.stop();
        q.kick?.close();
        q.kick = null;
        const out = Buffer.alloc(8);
        out.writeUInt32LE(q.index, 0);
        out.writeUInt32LE(base >>> 0, 4);
        return { payload: out };
      }
      case Req.SET_VRING_KICK:
      case Req.SET_VRING_CALL:
      case Req.SET_VRING_ERR:
        this.#setVringFd(msg, p);
        return;
      case Req.SET_VRING_ENABLE: {
        // QEMU's vhost-user-net sends it before SET_FEATURES (libvhost-user and DPDK take it then):
        // refused only once features without PROTOCOL_FEATURES were acked.
        if (this.features !== 0n && !this.has(VF.PROTOCOL_FEATURES)) throw new VhostUserError('UNSUPPORTED', 'SET_VRING_ENABLE without PROTOCOL_FEATURES');
        const q = this.#queueAt(p.u32(0));
        const on = p.u32(4);
        p.expect(8);
        if (on > 1) throw new VhostUserError('INVALID', `vring ${q.index}: enable ${on}`);
        q.enabled = on === 1;
        if (q.enabled) q.schedule();
        return;
      }
      case Req.GET_CONFIG:
        return { payload: this.#getConfig(p) };
      case Req.SET_CONFIG:
        this.#setConfig(p);
        return;
      case Req.SET_LOG_BASE:
        return this.#setLogBase(msg, p);
      case Req.SET_LOG_FD: {
        p.expect(0);
        const fd = onlyFd(msg, 'SET_LOG_FD');
        this.#logFd?.close();
        this.#logFd = EventFd.from(fd);
        return;
      }
      case Req.SET_BACKEND_REQ_FD: {
        p.expect(0);
        if (!this.hasProtocol(PF.BACKEND_REQ)) throw new VhostUserError('UNSUPPORTED', 'SET_BACKEND_REQ_FD without BACKEND_REQ');
        const fd = onlyFd(msg, 'SET_BACKEND_REQ_FD');
        let sock: UnixSocket;
        try {
          if ((fd.stat().mode & 0o170000) !== 0o140000) throw new VhostUserError('INVALID', 'SET_BACKEND_REQ_FD: the fd is not a socket');
          sock = new UnixSocket(fd);
        } catch (err) {
          fd.close();
          throw err;
        }
        this.#backendChannel?.close();
        const ch = new MessageChannel(sock);
        ch.on('message', (m) => {
          closeAll(m.fds);
          const w = this.#backendReplies.shift();
          if (w) w(m);
        });
        ch.on('close', () => {
          if (this.#backendChannel === ch) this.#backendChannel = null;
          const w = this.#backendReplies;
          this.#backendReplies = [];
          for (const f of w) f({ request: 0, flags: 0, payload: u64(1n), fds: [] });
        });
        this.#backendChannel = ch;
        return;
      }
      case Req.GET_INFLIGHT_FD:
        return this.#getInflight(p);
      case Req.SET_INFLIGHT_FD:
        this.#setInflight(msg, p);
        return;
      case Req.SET_STATUS: {
        const s = p.u64(0);
        p.expect(8);
        if (s > 0xffn) throw new VhostUserError('INVALID', `status 0x${s.toString(16)} is more than a byte`);
        this.status = Number(s);
        return;
      }
      case Req.GET_STATUS:
        p.expect(0);
        return { payload: u64(BigInt(this.status)) };
      case Req.NET_SET_MTU: {
        const mtu = p.u64(0);
        p.expect(8);
        if (!this.device.setMtu) throw new VhostUserError('UNSUPPORTED', 'the device has no MTU');
        if (mtu > 0xffffn || !this.device.setMtu(Number(mtu))) throw new VhostUserError('INVALID', `MTU ${mtu} refused`);
        return;
      }
      case Req.SEND_RARP: {
        p.expect(8);
        if (!this.device.sendRarp) throw new VhostUserError('UNSUPPORTED', 'the device sends no RARP');
        this.device.sendRarp(Uint8Array.from(msg.payload.subarray(0, 6)));
        return;
      }
      case Req.VRING_KICK: {
        if (!this.hasProtocol(PF.INBAND_NOTIFICATIONS)) throw new VhostUserError('UNSUPPORTED', 'VRING_KICK without INBAND_NOTIFICATIONS');
        const q = this.#queueAt(p.u32(0));
        p.expect(8);
        q.schedule();
        return;
      }
      case Req.SET_DEVICE_STATE_FD:
        return this.#setDeviceStateFd(msg, p);
      case Req.CHECK_DEVICE_STATE: {
        p.expect(0);
        if (!this.hasProtocol(PF.DEVICE_STATE)) throw new VhostUserError('PROTOCOL', 'CHECK_DEVICE_STATE without DEVICE_STATE');
        const t = this.#stateTransfer;
        this.#stateTransfer = null;
        let ok = t !== null;
        if (t) {
          try {
            await t;
          } catch (err) {
            this.log(`device state transfer: ${(err as Error).message}`);
            ok = false;
          }
        }
        return { payload: u64(ok ? 0n : 1n) };
      }
      case Req.IOTLB_MSG:
        return { payload: u64(this.#iotlbMsg(p) ? 0n : 1n) };
      case Req.SET_VRING_ENDIAN:
        throw new VhostUserError('UNSUPPORTED', 'CROSS_ENDIAN was not offered (legacy big-endian rings)');
      default:
        throw new VhostUserError(MUST_REPLY.has(msg.request) ? 'PROTOCOL' : 'UNSUPPORTED', `${REQ_NAMES[msg.request] ?? `request ${msg.request}`} is not handled`);
    }
  }

  #offeredFeatures(): bigint {
    return this.device.features | bit(VF.PROTOCOL_FEATURES) | bit(VF.LOG_ALL) | (this.#iommu ? bit(VF.ACCESS_PLATFORM) : 0n);
  }

  /**
   * IOTLB_MSG (struct vhost_iotlb_msg, 32 bytes): UPDATE adds a translation, INVALIDATE
   * removes the ones overlapping its range. The reply is 0 (done) or 1 (refused: no
   * ACCESS_PLATFORM, a bad type, perm or range). Rings waiting for a translation are
   * retried after an UPDATE.
   */
  #iotlbMsg(p: Payload): boolean {
    p.expect(IOTLB_MSG_SIZE);
    const iotlb = this.iotlb;
    if (!iotlb) {
      this.log('IOTLB_MSG without ACCESS_PLATFORM acked: refused');
      return false;
    }
    const iova = p.u64(0);
    const size = p.u64(8);
    const perm = p.bytes[24]!;
    const type = p.bytes[25]!;
    const MAX = BigInt(Number.MAX_SAFE_INTEGER);
    try {
      if (type === IOTLB_UPDATE) {
        iotlb.update(Number(iova), Number(size), p.addr(16), perm);
        this.iotlbStats.updates++;
        this.#iotlbUpdated();
        return true;
      }
      if (type === IOTLB_INVALIDATE) {
        // Addresses are below 2^53 here, so a range reaching past it (or of size 0: the whole
        // space, a u64 length that wrapped) invalidates to the end: more misses, never a stale entry.
        if (iova <= MAX) iotlb.invalidate(Number(iova), size === 0n || iova + size > MAX ? Number(MAX - iova) : Number(size));
        this.iotlbStats.invalidations++;
        return true;
      }
      this.log(`IOTLB_MSG of type ${type} from the front-end (only UPDATE and INVALIDATE are its to send): refused`);
      return false;
    } catch (err) {
      this.log(`IOTLB_MSG: ${(err as Error).message}: refused`);
      return false;
    }
  }

  /** A translation arrived: what waited on a miss is tried again. */
  #iotlbUpdated(): void {
    this.#missesPending.clear();
    for (const q of this.queues) {
      if (q.startWait && !q.started) {
        q.startWait = false;
        try {
          this.#startRing(q);
        } catch (err) {
          this.log(`vring ${q.index}: ${(err as Error).message}`);
        }
      }
      if (q.iotlbWait) {
        q.iotlbWait = false;
        q.schedule();
      }
    }
  }

  /**
   * BACKEND_IOTLB_MSG MISS for `miss` (once per IOVA page and perm until the next UPDATE).
   * QEMU answers with an IOTLB_MSG UPDATE on the front-end channel, or with nothing when its
   * IOMMU refuses the access (the ring then waits: the guest's driver is at fault).
   */
  iotlbMiss(miss: IotlbMiss): void {
    const key = `${Math.floor(miss.iova / 4096)}:${miss.perm}`;
    if (this.#missesPending.has(key)) return;
    const ch = this.#backendChannel;
    if (!ch) {
      this.log(`${miss.message}: no back-end channel to ask the front-end on`);
      return;
    }
    if (this.#missesPending.size >= 1024) this.#missesPending.clear();
    this.#missesPending.add(key);
    this.iotlbStats.misses++;
    const b = Buffer.alloc(IOTLB_MSG_SIZE);
    b.writeBigUInt64LE(BigInt(miss.iova), 0);
    b[24] = miss.perm;
    b[25] = IOTLB_MISS;
    try {
      ch.send(BackendReq.IOTLB_MSG, FLAG_VERSION, b);
    } catch (err) {
      this.log(`BACKEND_IOTLB_MSG: ${(err as Error).message}`);
    }
  }

  #mapRegion(info: MemoryRegionInfo, fd: Fd): MappedRegion {
    let st: { size: number };
    try {
      st = fd.stat();
    } catch (err) {
      fd.close();
      throw err;
    }
    if (st.size !== 0 && info.mmapOffset + info.size > st.size) {
      fd.close();
      throw new VhostUserError('INVALID', `region at GPA 0x${info.guestPhysAddr.toString(16)}: offset 0x${info.mmapOffset.toString(16)} + size 0x${info.size.toString(16)} is past the end of its file (0x${st.size.toString(16)} bytes)`);
    }
    const { shm } = mapAt(fd, info.mmapOffset, info.size);
    return { info, shm };
  }

  #retire(m: MappedRegion): void {
    if (this.inFlight === 0) m.shm.close();
    else this.#retired.push(m);
  }

  #setMemTable(msg: VhostUserMessage, p: Payload): void {
    const n = p.u32(0);
    if (n > MAX_MEM_TABLE_REGIONS) throw new VhostUserError('INVALID', `SET_MEM_TABLE with ${n} regions (at most ${MAX_MEM_TABLE_REGIONS})`);
    p.expect(8 + 32 * n);
    if (msg.fds.length !== n) throw new VhostUserError('INVALID', `SET_MEM_TABLE: ${n} regions but ${msg.fds.length} fds`);
    const infos: MemoryRegionInfo[] = [];
    for (let i = 0; i < n; i++) infos.push(p.region(8 + 32 * i));
    const mapped: MappedRegion[] = [];
    const fds = [...msg.fds];
    msg.fds.length = 0;
    try {
      for (let i = 0; i < n; i++) mapped.push(this.#mapRegion(infos[i]!, fds[i]!));
    } catch (err) {
      for (const m of mapped) m.shm.close();
      closeAll(fds.slice(mapped.length + 1));
      throw err;
    }
    for (const m of this.#regions) this.#retire(m);
    this.#regions = [];
    this.memory.clear();
    try {
      for (const m of mapped) {
        this.memory.add(m.info, m.shm.bytes.subarray(m.shm.size - m.info.size));
        this.#regions.push(m);
      }
    } catch (err) {
      this.memory.clear();
      for (const m of mapped) m.shm.close();
      this.#regions = [];
      throw err;
    }
  }

  #addMemReg(msg: VhostUserMessage, p: Payload): void {
    if (!this.hasProtocol(PF.CONFIGURE_MEM_SLOTS)) throw new VhostUserError('UNSUPPORTED', 'ADD_MEM_REG without CONFIGURE_MEM_SLOTS');
    p.expect(40);
    const info = p.region(8);
    const fd = onlyFd(msg, 'ADD_MEM_REG');
    if (this.#regions.length >= MAX_MEM_SLOTS) {
      fd.close();
      throw new VhostUserError('INVALID', `ADD_MEM_REG: all ${MAX_MEM_SLOTS} slots are in use`);
    }
    const m = this.#mapRegion(info, fd);
    try {
      this.memory.add(info, m.shm.bytes.subarray(m.shm.size - info.size));
    } catch (err) {
      m.shm.close();
      throw err;
    }
    this.#regions.push(m);
  }

  #remMemReg(msg: VhostUserMessage, p: Payload): void {
    if (!this.hasProtocol(PF.CONFIGURE_MEM_SLOTS)) throw new VhostUserError('UNSUPPORTED', 'REM_MEM_REG without CONFIGURE_MEM_SLOTS');
    p.expect(40);
    closeAll(msg.fds); // the spec: should carry none; one is accepted and closed
    msg.fds.length = 0;
    const info = p.region(8);
    const i = this.#regions.findIndex(
      (m) => m.info.guestPhysAddr === info.guestPhysAddr && m.info.size === info.size && m.info.userAddr === info.userAddr,
    );
    if (i < 0) throw new VhostUserError('INVALID', `REM_MEM_REG: no region at GPA 0x${info.guestPhysAddr.toString(16)} of 0x${info.size.toString(16)} bytes`);
    const [m] = this.#regions.splice(i, 1);
    this.memory.remove(info);
    this.#retire(m!);
  }

  #setVringFd(msg: VhostUserMessage, p: Payload): void {
    const v = p.u64(0);
    p.expect(8);
    const q = this.#queueAt(Number(v & BigInt(VRING_IDX_MASK)));
    if ((v & ~BigInt(VRING_IDX_MASK | VRING_NOFD)) !== 0n) throw new VhostUserError('INVALID', `vring fd payload 0x${v.toString(16)} has unknown bits`);
    const nofd = (v & BigInt(VRING_NOFD)) !== 0n;
    if (nofd && msg.fds.length > 0) throw new VhostUserError('INVALID', 'NOFD set but an fd came with it');
    if (!nofd && msg.fds.length !== 1) throw new VhostUserError('INVALID', `expected one eventfd, got ${msg.fds.length}`);
    const ev = nofd ? null : EventFd.from(msg.fds.pop()!);
    switch (msg.request) {
      case Req.SET_VRING_KICK: {
        if (q.started) {
          q.replaceKick(ev); // a running ring listens on the new fd from now on
          return;
        }
        q.kick?.close();
        q.kick = ev;
        this.#startRing(q);
        return;
      }
      case Req.SET_VRING_CALL:
        q.call?.close();
        q.call = ev;
        return;
      default:
        q.err?.close();
        q.err = ev;
    }
  }

  /** The ring starts on its kick fd (or NOFD): its addresses, size and base must be set by then. */
  #startRing(q: VhostQueue): void {
    if (!q.addr || q.size === 0) throw new VhostUserError('INVALID', `vring ${q.index}: SET_VRING_KICK before its size and addresses`);
    const packed = this.has(VF.RING_PACKED);
    if (!packed && (q.size & (q.size - 1)) !== 0) throw new VhostUserError('INVALID', `vring ${q.index}: split ring size ${q.size} is not a power of two`);
    const ringSizes = packed ? [16 * q.size, 4, 4] : [16 * q.size, 6 + 2 * q.size, 6 + 8 * q.size];
    const iotlb = this.iotlb;
    // Behind an IOMMU the addresses are IOVAs: translated now (the rings' views are then fixed
    // until the ring stops); a miss is asked for and the start waits for the UPDATE.
    const gpa = (addr: number, len: number, what: string, perm: number): number => {
      try {
        return iotlb ? iotlb.ringGpa(addr, len, perm) : this.memory.uvaToGpa(addr, len);
      } catch (err) {
        if (err instanceof IotlbMiss) throw err;
        throw new VhostUserError('INVALID', `vring ${q.index}: ${what} at ${iotlb ? 'IOVA ' : ''}0x${addr.toString(16)} (+${len}) is not in guest memory`);
      }
    };
    const R = IOTLB_PERM_READ;
    const W = IOTLB_PERM_WRITE;
    const logging = this.has(VF.LOG_ALL) && this.dirtyLog !== null;
    let desc: number, driver: number, device: number, logUsed: number;
    try {
      desc = gpa(q.addr.desc, ringSizes[0]!, packed ? 'descriptor ring' : 'descriptor table', packed ? R | W : R);
      driver = gpa(q.addr.avail, ringSizes[1]!, packed ? 'driver event area' : 'avail ring', R);
      device = gpa(q.addr.used, ringSizes[2]!, packed ? 'device event area' : 'used ring', W);
      // log_guest_addr is an IOVA too (QEMU sends the used ring's DMA address); logged as its GPA.
      logUsed = iotlb && logging && q.addr.flags & VRING_F_LOG ? gpa(q.addr.log, ringSizes[2]!, 'used ring log address', W) : q.addr.log;
    } catch (err) {
      if (!(err instanceof IotlbMiss)) throw err;
      q.startWait = true;
      this.iotlbMiss(err);
      return;
    }
    const inflightQueue = this.inflight && q.index < this.inflight.numQueues ? this.inflight.region.queue(q.index) : null;
    const ring = createDeviceQueue({
      memory: this.memory,
      size: q.size,
      packed,
      desc,
      driver,
      device,
      eventIdx: this.has(VF.EVENT_IDX),
      indirect: this.has(VF.INDIRECT_DESC),
      base: q.base,
      log: logging ? this.dirtyLog : null,
      ...(logging && q.addr.flags & VRING_F_LOG ? { logUsedAddr: logUsed } : {}),
      inflight: inflightQueue,
      dma: iotlb,
    });
    let resubmit: DescChain[] = [];
    try {
      if (inflightQueue) resubmit = ring.resubmit();
    } catch (err) {
      if (!(err instanceof IotlbMiss)) throw err;
      // A request to resubmit points at an IOVA not translated yet: the whole start is retried.
      q.startWait = true;
      this.iotlbMiss(err);
      return;
    }
    if (resubmit.length > 0) this.log(`vring ${q.index}: resubmitting ${resubmit.length} request(s) in flight at the last disconnect`);
    // The chains resubmit() returns count as in flight in the ring; pop() hands them out first.
    q.start(ring, resubmit);
  }

  #getConfig(p: Payload): Uint8Array {
    const offset = p.u32(0);
    const size = p.u32(4);
    if (!this.device.config || !this.hasProtocol(PF.CONFIG)) throw new VhostUserError('UNSUPPORTED', 'GET_CONFIG without CONFIG');
    if (size > MAX_CONFIG_SIZE || p.length !== 12 + size) {
      throw new VhostUserError('PROTOCOL', `GET_CONFIG of ${size} bytes in a ${p.length}-byte payload (at most ${MAX_CONFIG_SIZE})`);
    }
    const cfg = this.device.config();
    const out = Buffer.alloc(12 + size);
    out.writeUInt32LE(offset, 0);
    out.writeUInt32LE(size, 4);
    out.writeUInt32LE(p.u32(8), 8);
    // Bytes past the device's config read as 0 (the front-end asks for its struct's size).
    if (offset < cfg.length) out.set(cfg.subarray(offset, Math.min(cfg.length, offset + size)), 12);
    return out;
  }

  #setConfig(p: Payload): void {
    const offset = p.u32(0);
    const size = p.u32(4);
    const flags = p.u32(8);
    if (!this.hasProtocol(PF.CONFIG)) throw new VhostUserError('UNSUPPORTED', 'SET_CONFIG without CONFIG');
    if (size > MAX_CONFIG_SIZE || p.length !== 12 + size) throw new VhostUserError('INVALID', `SET_CONFIG of ${size} bytes in a ${p.length}-byte payload`);
    if (!this.device.setConfig || !this.device.setConfig(offset, Uint8Array.from(p.bytes.subarray(12, 12 + size)), flags)) {
      throw new VhostUserError('INVALID', `SET_CONFIG at ${offset} (+${size}) refused by the device`);
    }
  }

  #setLogBase(msg: VhostUserMessage, p: Payload): { payload: Uint8Array } | void {
    p.expect(16);
    const size = p.addr(0);
    const offset = p.addr(8);
    if (!this.hasProtocol(PF.LOG_SHMFD)) throw new VhostUserError('PROTOCOL', 'SET_LOG_BASE without LOG_SHMFD');
    const fd = onlyFd(msg, 'SET_LOG_BASE');
    if (size === 0) {
      fd.close();
      throw new VhostUserError('INVALID', 'SET_LOG_BASE of 0 bytes');
    }
    const { shm, skip } = mapAt(fd, offset, size);
    const old = this.#logShm;
    this.#logShm = shm;
    this.dirtyLog = new DirtyLog(shm.bytes.subarray(skip));
    // Running rings keep the old log until they restart; a new table for a running ring
    // would need the ring rebuilt, which QEMU does not expect (it sets the log before starting).
    if (old && this.inFlight === 0) old.close();
    else if (old) this.#retired.push({ info: { guestPhysAddr: 0, size: 0, userAddr: 0, mmapOffset: 0 }, shm: old });
    return { payload: u64(0n) };
  }

  #getInflight(p: Payload): { payload: Uint8Array; fds: Fd[] } {
    if (!this.hasProtocol(PF.INFLIGHT_SHMFD)) throw new VhostUserError('PROTOCOL', 'GET_INFLIGHT_FD without INFLIGHT_SHMFD');
    if (p.length < 20) throw new VhostUserError('PROTOCOL', `GET_INFLIGHT_FD payload of ${p.length} bytes (at least 20)`);
    const numQueues = p.u16(16);
    const queueSize = p.u16(18);
    if (numQueues < 1 || numQueues > this.queues.length || queueSize < 1 || queueSize > (this.device.maxQueueSize ?? 32768)) {
      throw new VhostUserError('PROTOCOL', `GET_INFLIGHT_FD for ${numQueues} queues of ${queueSize}`);
    }
    const packed = this.has(VF.RING_PACKED);
    const size = numQueues * inflightQueueSize(queueSize, packed);
    const shm = SharedMemory.create(size, { name: 'vdevkit-inflight' });
    this.#adoptInflight(shm, numQueues, queueSize, packed, true);
    const out = Buffer.alloc(p.length);
    out.writeBigUInt64LE(BigInt(size), 0);
    out.writeBigUInt64LE(0n, 8);
    out.writeUInt16LE(numQueues, 16);
    out.writeUInt16LE(queueSize, 18);
    return { payload: out, fds: [shm.fd] };
  }

  #setInflight(msg: VhostUserMessage, p: Payload): void {
    if (!this.hasProtocol(PF.INFLIGHT_SHMFD)) throw new VhostUserError('UNSUPPORTED', 'SET_INFLIGHT_FD without INFLIGHT_SHMFD');
    if (p.length < 20) throw new VhostUserError('INVALID', `SET_INFLIGHT_FD payload of ${p.length} bytes (at least 20)`);
    const size = p.addr(0);
    const offset = p.addr(8);
    const numQueues = p.u16(16);
    const queueSize = p.u16(18);
    const packed = this.has(VF.RING_PACKED);
    if (numQueues < 1 || numQueues > this.queues.length || queueSize < 1 || queueSize > (this.device.maxQueueSize ?? 32768)) {
      throw new VhostUserError('INVALID', `SET_INFLIGHT_FD for ${numQueues} queues of ${queueSize}`);
    }
    const need = numQueues * inflightQueueSize(queueSize, packed);
    if (size < need) throw new VhostUserError('INVALID', `SET_INFLIGHT_FD: ${size} bytes for ${numQueues} queues of ${queueSize} (need ${need})`);
    const fd = onlyFd(msg, 'SET_INFLIGHT_FD');
    const { shm, skip } = mapAt(fd, offset, size);
    this.#adoptInflight(shm, numQueues, queueSize, packed, false, skip);
  }

  #adoptInflight(shm: SharedMemory, numQueues: number, queueSize: number, packed: boolean, fresh: boolean, skip = 0): void {
    const bytes = shm.bytes.subarray(skip);
    if (fresh) bytes.fill(0);
    let region: InflightRegion;
    try {
      region = new InflightRegion(bytes, numQueues, queueSize, packed);
    } catch (err) {
      shm.close();
      throw new VhostUserError('INVALID', `inflight region: ${(err as Error).message}`);
    }
    this.inflight?.shm.close();
    this.inflight = { shm, region, numQueues, queueSize };
  }

  async #resetDevice(): Promise<void> {
    for (const q of this.queues) {
      if (q.started) await q.stop();
      q.enabled = !this.has(VF.PROTOCOL_FEATURES) && this.features !== 0n;
    }
    this.status = 0;
    this.iotlb?.clear();
    this.#missesPending.clear();
    this.device.reset?.();
  }

  /** Tells the front-end the config changed (BACKEND_CONFIG_CHANGE_MSG); resolves once it acked (if REPLY_ACK). */
  async configChanged(timeoutMs = 5000): Promise<void> {
    const ch = this.#backendChannel;
    if (!ch || !this.hasProtocol(PF.CONFIG)) throw new VhostUserError('UNSUPPORTED', 'no back-end channel with CONFIG negotiated');
    const ack = this.hasProtocol(PF.REPLY_ACK);
    ch.send(BackendReq.CONFIG_CHANGE_MSG, FLAG_VERSION | (ack ? FLAG_NEED_REPLY : 0));
    if (!ack) return;
    const reply = await new Promise<VhostUserMessage>((resolve, reject) => {
      const t = setTimeout(() => reject(new VhostUserError('TIMEOUT', 'CONFIG_CHANGE_MSG not acked')), timeoutMs);
      this.#backendReplies.push((m) => {
        clearTimeout(t);
        resolve(m);
      });
    });
    if (reply.payload.length < 8 || reply.payload.readBigUInt64LE(0) !== 0n) throw new VhostUserError('INVALID', 'the front-end failed CONFIG_CHANGE_MSG');
  }

  /** The device state transfer SET_DEVICE_STATE_FD started (CHECK_DEVICE_STATE waits for it). */
  #stateTransfer: Promise<void> | null = null;

  /** INBAND_NOTIFICATIONS: a ring without a call fd interrupts with BACKEND_VRING_CALL. */
  get inbandCalls(): boolean {
    return this.hasProtocol(PF.INBAND_NOTIFICATIONS) && this.#backendChannel !== null;
  }

  /** BACKEND_VRING_CALL for ring `index` (in-band; acked, as the spec requires REPLY_ACK with it). */
  vringCall(index: number): void {
    const ch = this.#backendChannel;
    if (!ch) return;
    ch.send(BackendReq.VRING_CALL, FLAG_VERSION | FLAG_NEED_REPLY, vringState(index, 0));
    this.#backendReplies.push((m) => {
      if (m.payload.length < 8 || m.payload.readBigUInt64LE(0) !== 0n) this.log(`vring ${index}: the front-end failed BACKEND_VRING_CALL`);
    });
  }

  /**
   * SET_DEVICE_STATE_FD: the device's state written to (SAVE) or read from (LOAD) the
   * front-end's pipe, in the background; the reply says we give no fd back (bit 8).
   */
  #setDeviceStateFd(msg: VhostUserMessage, p: Payload): { payload: Uint8Array } {
    p.expect(8);
    const direction = p.u32(0);
    const phase = p.u32(4);
    if (!this.hasProtocol(PF.DEVICE_STATE) || !this.device.saveState || !this.device.loadState) {
      throw new VhostUserError('PROTOCOL', 'SET_DEVICE_STATE_FD without DEVICE_STATE');
    }
    const fd = onlyFd(msg, 'SET_DEVICE_STATE_FD');
    // A refusal is a reply with non-zero low bits (and no fd of ours), not a closed connection.
    const refuse = (why: string): { payload: Uint8Array } => {
      fd.close();
      this.log(`SET_DEVICE_STATE_FD: ${why}`);
      return { payload: u64(0x101n) };
    };
    // A blocking pipe would hold a thread-pool worker in read()/write() until the front-end acts,
    // past the session's end (gone() is checked between calls only): non-blocking, the transfer
    // retries on EAGAIN and ends with the session.
    try {
      native.setNonBlock(fd.value, true);
    } catch (err) {
      return refuse(`the fd cannot be made non-blocking: ${(err as Error).message}`);
    }
    if (direction > 1 || phase !== 0) return refuse(`direction ${direction}, phase ${phase} (only SAVE / LOAD in the stopped phase)`);
    if (this.queues.some((q) => q.started)) return refuse('a ring runs (the device must be stopped)');
    const device = this.device;
    // The transfer ends with the session, or after 60 s without EOF: it never outlives its front-end.
    const deadline = Date.now() + 60_000;
    const gone = (): boolean => this.closed || Date.now() > deadline;
    this.#stateTransfer = direction === 0 ? writeAllFd(fd, device.saveState!(), gone) : readAllFd(fd, gone).then((state) => {
      if (device.loadState!(state) === false) throw new Error(`the device refused a state of ${state.length} bytes`);
    });
    this.#stateTransfer.catch(() => undefined); // reported by CHECK_DEVICE_STATE
    return { payload: u64(0x100n) }; // success, no fd of ours
  }

  /** Signals the log eventfd (the front-end may wait on it after a log change). */
  logChanged(): void {
    this.#logFd?.signal(1);
  }

  /** The session ends: rings stop, fds close; memory is unmapped once no chain refers to it. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    for (const q of this.queues) q.close();
    this.#backendChannel?.close();
    this.#backendChannel = null;
    this.#logFd?.close();
    this.#logFd = null;
    for (const m of this.#regions) this.#retire(m);
    this.#regions = [];
    if (this.#logShm) this.#retire({ info: { guestPhysAddr: 0, size: 0, userAddr: 0, mmapOffset: 0 }, shm: this.#logShm });
    this.#logShm = null;
    this.dirtyLog = null;
    this.inflight?.shm.close();
    this.inflight = null;
    this.device.reset?.();
    // What is retired is unmapped by the last push of a chain still in flight (VhostQueue.push).
    if (this.inFlight === 0) this.maybeRelease();
  }
}

/** Requests whose reply is part of the protocol (sent with or without REPLY_ACK). */
const MUST_REPLY = new Set<number>([
  Req.GET_FEATURES,
  Req.GET_PROTOCOL_FEATURES,
  Req.GET_VRING_BASE,
  Req.GET_QUEUE_NUM,
  Req.GET_CONFIG,
  Req.GET_INFLIGHT_FD,
  Req.GET_MAX_MEM_SLOTS,
  Req.GET_STATUS,
  Req.SET_LOG_BASE,
  Req.IOTLB_MSG,
  Req.CREATE_CRYPTO_SESSION,
  Req.POSTCOPY_ADVISE,
  Req.POSTCOPY_END,
  Req.GET_SHARED_OBJECT,
  Req.SET_DEVICE_STATE_FD,
  Req.CHECK_DEVICE_STATE,
  Req.GET_SHMEM_CONFIG,
]);

/** Bounds-checked reads of a message payload. */
class Payload {
  readonly bytes: Buffer;
  readonly name: string;
  constructor(msg: VhostUserMessage) {
    this.bytes = msg.payload;
    this.name = REQ_NAMES[msg.request] ?? `request ${msg.request}`;
  }
  get length(): number {
    return this.bytes.length;
  }
  expect(n: number): void {
    if (this.bytes.length !== n) throw new VhostUserError('PROTOCOL', `${this.name}: payload of ${this.bytes.length} bytes, expected ${n}`);
  }
  #need(at: number, n: number): void {
    if (at + n > this.bytes.length) throw new VhostUserError('PROTOCOL', `${this.name}: payload of ${this.bytes.length} bytes, needs ${at + n}`);
  }
  u16(at: number): number {
    this.#need(at, 2);
    return this.bytes.readUInt16LE(at);
  }
  u32(at: number): number {
    this.#need(at, 4);
    return this.bytes.readUInt32LE(at);
  }
  u64(at: number): bigint {
    this.#need(at, 8);
    return this.bytes.readBigUInt64LE(at);
  }
  /** A u64 address or size that must fit a safe integer. */
  addr(at: number): number {
    const v = this.u64(at);
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new VhostUserError('INVALID', `${this.name}: 0x${v.toString(16)} at ${at} is beyond 2^53`);
    return Number(v);
  }
  region(at: number): MemoryRegionInfo {
    const info = { guestPhysAddr: this.addr(at), size: this.addr(at + 8), userAddr: this.addr(at + 16), mmapOffset: this.addr(at + 24) };
    if (info.size === 0) throw new VhostUserError('INVALID', `${this.name}: a region of 0 bytes`);
    if (info.guestPhysAddr + info.size > Number.MAX_SAFE_INTEGER || info.userAddr + info.size > Number.MAX_SAFE_INTEGER) {
      throw new VhostUserError('INVALID', `${this.name}: region end beyond 2^53`);
    }
    return info;
  }
}

/**
 * Maps [offset, offset + size) of an fd (mmap offsets must be page-aligned: the mapping starts at
 * the page holding `offset`, `skip` bytes before it). Takes the fd; closes it on failure.
 */
function mapAt(fd: Fd, offset: number, size: number): { shm: SharedMemory; skip: number } {
  const start = Math.floor(offset / 4096) * 4096;
  try {
    return { shm: SharedMemory.map(fd, { offset: start, size: offset - start + size }), skip: offset - start };
  } catch (err) {
    fd.close();
    throw err;
  }
}

function vringState(index: number, num: number): Buffer {
  const b = Buffer.alloc(8);
  b.writeUInt32LE(index, 0);
  b.writeUInt32LE(num, 4);
  return b;
}

/** One read or write on the thread pool; a non-blocking fd that is not ready is retried a millisecond later. */
async function pipeIo(op: 'read' | 'write', fd: Fd, buf: Uint8Array, at: number, len: number, gone: () => boolean): Promise<number> {
  for (;;) {
    if (gone()) throw new VhostUserError('DISCONNECTED', 'the front-end went away during the device state transfer');
    try {
      return await new Promise<number>((resolve, reject) => {
        const cb = (e: NodeJS.ErrnoException | null, n: number): void => (e ? reject(e) : resolve(n));
        if (op === 'read') fs.read(fd.value, buf, at, len, null, cb);
        else fs.write(fd.value, buf, at, len, null, cb);
      });
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EAGAIN') throw err;
      await new Promise((r) => setTimeout(r, 1));
    }
  }
}

/** Writes all of `data` to a pipe-like fd, then closes it (EOF ends the state). */
async function writeAllFd(fd: Fd, data: Uint8Array, gone: () => boolean): Promise<void> {
  try {
    for (let at = 0; at < data.length; ) at += await pipeIo('write', fd, data, at, data.length - at, gone);
  } finally {
    fd.close();
  }
}

/** Reads a pipe-like fd to EOF (at most 64 MiB), then closes it. */
async function readAllFd(fd: Fd, gone: () => boolean): Promise<Uint8Array> {
  const parts: Buffer[] = [];
  let total = 0;
  try {
    for (;;) {
      const buf = Buffer.allocUnsafe(65536);
      const n = await pipeIo('read', fd, buf, 0, buf.length, gone);
      if (n === 0) break;
      total += n;
      if (total > 64 * 1024 * 1024) throw new Error('device state over 64 MiB');
      parts.push(buf.subarray(0, n));
    }
  } finally {
    fd.close();
  }
  return Buffer.concat(parts);
}

function u64(v: bigint): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(v, 0);
  return b;
}

function onlyFd(msg: VhostUserMessage, what: string): Fd {
  if (msg.fds.length !== 1) throw new VhostUserError('INVALID', `${what} needs exactly one fd, got ${msg.fds.length}`);
  return msg.fds.pop()!;
}

type BackendEvents = {
  /** A front-end connected (a new session starts). */
  connect: [];
  /** The front-end went away (err: why, if it was an error). */
  disconnect: [err: Error | undefined];
  error: [err: Error];
  close: [];
};

/** A vhost-user back-end serving one device. */
export class VhostUserBackend extends EventEmitter<BackendEvents> {
  readonly device: VhostUserDevice;
  readonly #options: VhostUserBackendOptions;
  #server: UnixServer | null = null;
  #session: Session | null = null;
  #closed = false;
  /** Connect mode: where to reconnect. */
  #connectPath: string | null = null;
  /** IOTLB counters over all sessions (VhostUserBackendOptions.iommu; zeros without it). */
  readonly iotlbStats: IotlbStats = { misses: 0, updates: 0, invalidations: 0 };
  /** The inflight region survives the session (QEMU gives it back on reconnect; we keep nothing else). */

  private constructor(device: VhostUserDevice, options: VhostUserBackendOptions) {
    super();
    this.device = device;
    this.#options = options;
  }

  /** Listens on `path` (QEMU's `-chardev socket,path=..` connects; with reconnect=N it comes back after we restart). */
  static listen(path: string, device: VhostUserDevice, options: VhostUserBackendOptions = {}): VhostUserBackend {
    const be = new VhostUserBackend(device, options);
    be.#server = UnixServer.listen(path);
    be.#server.on('connection', (sock) => be.#accept(sock));
    be.#server.on('error', (err) => be.#log(`accept: ${err.message}`));
    return be;
  }

  /** Connects to a front-end listening on `path` (QEMU `server=on`, DPDK `server=1`); reconnects after it goes away while `reconnect`. */
  static async connect(path: string, device: VhostUserDevice, options: VhostUserBackendOptions & { timeoutMs?: number } = {}): Promise<VhostUserBackend> {
    const be = new VhostUserBackend(device, options);
    be.#connectPath = path;
    // The front-end may not listen yet (QEMU creates its socket as it starts): retry until the timeout.
    const deadline = Date.now() + (options.timeoutMs ?? 5000);
    for (let delay = 10; ; delay = Math.min(delay * 2, 200)) {
      try {
        be.#accept(await connectUnix(path, { timeoutMs: Math.max(0, deadline - Date.now()) }));
        return be;
      } catch (err) {
        const code = (err as { code?: string }).code;
        if ((code !== 'ENOENT' && code !== 'ECONNREFUSED') || Date.now() >= deadline) throw err;
      }
      await new Promise((r) => setTimeout(r, delay));
    }
  }

  /** The front-end's negotiated virtio features (0 without a session). */
  get features(): bigint {
    return this.#session?.features ?? 0n;
  }

  get connected(): boolean {
    return this.#session !== null && !this.#session.closed;
  }

  /** The rings of the current session (empty without one). */
  get queues(): readonly VhostQueue[] {
    return this.#session?.queues ?? [];
  }

  /** The current session's guest memory. */
  get memory(): GuestMemory | null {
    return this.#session?.memory ?? null;
  }

  /** Sends CONFIG_CHANGE_MSG on the back-end channel. */
  configChanged(): Promise<void> {
    if (!this.#session) return Promise.reject(new VhostUserError('DISCONNECTED', 'no front-end'));
    return this.#session.configChanged();
  }

  /** Marks [gpa, gpa+len) dirty in the front-end's log (for writes a device makes outside push()). */
  logWrite(gpa: number, length: number): void {
    const s = this.#session;
    if (s && s.dirtyLog && s.has(VF.LOG_ALL)) s.dirtyLog.mark(gpa, length);
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#server?.close();
    this.#server = null;
    const s = this.#session;
    this.#session = null;
    if (s) {
      s.channel.close();
      s.close();
    }
    this.emit('close');
  }

  #log(line: string): void {
    this.#options.log?.(line);
  }

  #offeredProtocol(): bigint {
    const d = this.device;
    let f = bit(PF.MQ) | bit(PF.LOG_SHMFD) | bit(PF.REPLY_ACK) | bit(PF.BACKEND_REQ) | bit(PF.RESET_DEVICE) | bit(PF.CONFIGURE_MEM_SLOTS) | bit(PF.STATUS);
    if (d.config) f |= bit(PF.CONFIG);
    if (this.#options.inflight !== false) f |= bit(PF.INFLIGHT_SHMFD);
    if (d.setMtu) f |= bit(PF.NET_MTU);
    if (d.sendRarp) f |= bit(PF.RARP);
    if (d.saveState && d.loadState) f |= bit(PF.DEVICE_STATE);
    f |= bit(PF.INBAND_NOTIFICATIONS);
    return f;
  }

  #accept(sock: UnixSocket): void {
    if (this.#closed) {
      sock.destroy();
      return;
    }
    if (this.#session && !this.#session.closed) {
      // One front-end at a time (as libvhost-user and qemu-storage-daemon): refuse the second.
      this.#log('a second front-end connected while one is served: refused');
      sock.destroy();
      return;
    }
    const channel = new MessageChannel(sock);
    const iommu = this.#options.iommu === true ? { entries: this.#options.iotlbEntries ?? 2048, stats: this.iotlbStats } : null;
    const session = new Session(this.device, channel, this.#offeredProtocol(), (l) => this.#log(l), this.#options.trace, iommu);
    this.#session = session;
    channel.on('error', (err) => this.#log(`protocol error: ${err.message}`));
    channel.on('close', (err) => {
      session.close();
      if (this.#session === session) this.#session = null;
      this.emit('disconnect', err);
      if (this.#connectPath && !this.#closed) void this.#reconnect();
    });
    // Later, so a caller of connect() that attaches its listeners after the await hears it too.
    setImmediate(() => {
      if (this.#session === session) this.emit('connect');
    });
  }

  async #reconnect(): Promise<void> {
    for (let delay = 100; !this.#closed; delay = Math.min(delay * 2, 2000)) {
      await new Promise((r) => setTimeout(r, delay));
      if (this.#closed) return;
      try {
        const sock = await connectUnix(this.#connectPath!, { timeoutMs: 100 });
        this.#accept(sock);
        return;
      } catch {
        // the front-end is not back yet
      }
    }
  }
}

export { LOG_PAGE, VRING_F_LOG };
