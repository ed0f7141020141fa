/**
 * VirtioNetDriver: a userspace virtio-net driver over a vhost-user back-end
 * (DPDK's net_vhost, our vhost-user-net switch, any other): the front-end
 * gives the back-end memfd memory holding the rings, the RX buffers and the
 * TX slots; frames go out with a 12-byte virtio_net_hdr (VERSION_1, all zero:
 * no offloads) and come back with one, joined across buffers with MRG_RXBUF.
 *
 *   const nic = await VirtioNetDriver.connect('/tmp/net.sock', { queuePairs: 2 });
 *   await nic.send(frame);                    // resolves when the device used the buffer
 *   const f = await nic.receive();            // or nic.on('frame', (f, pair) => ...), or for await (const f of nic)
 *   await nic.close();
 *
 * RX: every RX ring is filled with buffers at start; each used buffer is
 * copied out and posted again at once. Frames wait in a per-queue backlog
 * for receive() (or go to 'frame' listeners, which take precedence); when a
 * backlog is full, reaping pauses and the device sees a full ring (it drops).
 *
 * TX: a frame is copied into a slot of its TX queue; frames beyond the ring
 * wait in order (send), or trySend() says false and writable() says when to
 * try again. Kicks are batched per turn of the event loop, as in blk-driver.
 *
 * The back-end is not trusted: used ids and lengths are checked by the ring
 * code, num_buffers must be 1..the buffers the device holds; a lie
 * disconnects it and fails everything with VhostUserError PROTOCOL. A TX
 * buffer not used within `txTimeoutMs` disconnects it (TIMEOUT).
 */
import { EventEmitter } from 'node:events';
import { EventFd } from '../sys/eventfd.js';
import { SharedMemory } from '../sys/shm.js';
import { createDriverQueue } from '../virtio/driver-queue.js';
import { SplitDriverQueue } from '../virtio/driver-split.js';
import { PackedDriverQueue } from '../virtio/driver-packed.js';
import { ringLayout, type DriverBuffer, type DriverQueue, type DriverQueueOptions } from '../virtio/driver.js';
import { NetCtrl, NetFeature, NET_HDR_SIZE, NET_S_LINK_UP, formatMac } from '../devices/vhost-user-net.js';
import { ProtocolFeature as PF, VirtioFeature as VF, bit } from './constants.js';
import { VhostUserError } from './errors.js';
import { VhostUserFrontend, type HandshakeOptions, type VhostUserFrontendOptions } from './frontend.js';

const STATUS_ACK = 1;
const STATUS_DRIVER = 2;
const STATUS_DRIVER_OK = 4;
const STATUS_FEATURES_OK = 8;
const ETH_HLEN = 14;
/** Above the MTU: the Ethernet header and one VLAN tag. */
const L2_OVERHEAD = 18;
/** mac, status, max_virtqueue_pairs, mtu. */
const NET_CONFIG_SIZE = 12;
/** With txHeaderSeparate the frame starts this far into its slot. */
const TX_SPLIT_AT = 64;
const CTRL_AREA = 4096;
const CTRL_MAX = CTRL_AREA - 64;

/*
 * TX chains have no device-writable byte, so the used len means nothing
 * (virtio 1.2 2.7.8.1: 0). DPDK 22.11's packed dequeue writes the chain's
 * length there; Linux ignores it (its "validate used buffer length" patch was
 * reverted for such devices). TX queues take it as 0; the id is still checked.
 */
class TxSplitQueue<T> extends SplitDriverQueue<T> {
  protected override untrack(id: number, _len: number): { token: T; count: number } {
    return super.untrack(id, 0);
  }
}
class TxPackedQueue<T> extends PackedDriverQueue<T> {
  protected override untrack(id: number, _len: number): { token: T; count: number } {
    return super.untrack(id, 0);
  }
}
function createTxQueue<T>(o: DriverQueueOptions): DriverQueue<T> {
  return o.packed ? new TxPackedQueue<T>(o) : new TxSplitQueue<T>(o);
}

/** virtio_net_config as the driver knows it. */
export interface NetConfig {
  /** The device's MAC (MAC negotiated and config readable), else null. */
  mac: string | null;
  /** VIRTIO_NET_S_* bits (LINK_UP assumed without STATUS or config). */
  status: number;
  linkUp: boolean;
  /** max_virtqueue_pairs (with MQ), else what GET_QUEUE_NUM allows, else 1. */
  maxVirtqueuePairs: number;
  /** The device MTU (MTU negotiated and config readable), else the `mtu` option or 1500. */
  mtu: number;
  /** Whether the fields came from GET_CONFIG (the CONFIG protocol feature). */
  fromDevice: boolean;
}

/** Decodes the first 12 bytes of virtio_net_config, each field only when its feature is negotiated. */
export function decodeNetConfig(b: Uint8Array, features: bigint, fallback: { mtu: number; pairs: number }): NetConfig {
  const has = (n: number): boolean => (features & bit(n)) !== 0n;
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const u16 = (off: number): number | null => (off + 2 <= b.byteLength ? dv.getUint16(off, true) : null);
  const mac = has(NetFeature.MAC) && b.byteLength >= 6 ? formatMac(Uint8Array.from(b.subarray(0, 6))) : null;
  const status = has(NetFeature.STATUS) ? (u16(6) ?? NET_S_LINK_UP) : NET_S_LINK_UP;
  const pairs = has(NetFeature.MQ) ? (u16(8) ?? fallback.pairs) : fallback.pairs;
  const mtu = has(NetFeature.MTU) ? (u16(10) ?? fallback.mtu) : fallback.mtu;
  return { mac, status, linkUp: (status & NET_S_LINK_UP) !== 0, maxVirtqueuePairs: pairs, mtu, fromDevice: true };
}

/** Counters of one queue pair. */
export interface NetQueueStats {
  /** Frames (and their bytes, no virtio header) made available on the TX ring. */
  txPackets: number;
  txBytes: number;
  /** TX buffers the device used. */
  txCompleted: number;
  /** Frames that failed (the driver closed or the device went away before it used them). */
  txDrops: number;
  /** Frames (bytes without the header) received. */
  rxPackets: number;
  rxBytes: number;
  /** RX buffers the device used (more than rxPackets with MRG_RXBUF). */
  rxBuffers: number;
  /** Frames dropped: shorter than an Ethernet header, offload flags that were not negotiated. */
  rxDrops: number;
}

export interface VirtioNetDriverOptions extends VhostUserFrontendOptions {
  /** Queue pairs (default 1); more than 1 acks MQ and enables each pair's rings. */
  queuePairs?: number;
  /** Ring size (default 256). */
  queueSize?: number;
  /** Packed rings: true requires them, 'auto' when offered, false (default) never. */
  packed?: boolean | 'auto';
  /** Ack MRG_RXBUF when offered (default true). */
  mrgRxbuf?: boolean;
  /** Ack EVENT_IDX / INDIRECT_DESC when offered (default true). */
  eventIdx?: boolean;
  indirect?: boolean;
  /**
   * Set up the control queue (CTRL_VQ, CTRL_RX, CTRL_MAC_ADDR) when offered
   * (default false: with vhost-user the front-end usually handles it, QEMU does;
   * our switch serves it). With MQ, VQ_PAIRS_SET is sent at start.
   */
  ctrlVq?: boolean;
  /** Bytes per RX buffer, header included (default 2048 with MRG_RXBUF, else 12 + MTU + 18). */
  rxBufferSize?: number;
  /** Largest frame that may be sent (default MTU + 18). */
  maxFrameSize?: number;
  /** NET_SET_MTU when NET_MTU and MTU are negotiated; the MTU assumed without config (default 1500). */
  mtu?: number;
  /** Header and frame in two descriptors (an indirect table when INDIRECT_DESC is negotiated); default one. */
  txHeaderSeparate?: boolean;
  /** Frames held per queue when nobody receives (default 4 x queueSize); beyond it reaping pauses. */
  rxBacklog?: number;
  /** A TX buffer (or control command) not used in this time disconnects the back-end (default 30000 ms; 0: never). */
  txTimeoutMs?: number;
  /**
   * Drive the device behind an IOMMU (VIRTIO_F_ACCESS_PLATFORM, required when given): the
   * front-end answers the back-end's IOTLB misses (HandshakeOptions.iommu); the rings' and
   * buffers' addresses are IOVAs, equal to our GPAs with 'identity'.
   */
  iommu?: HandshakeOptions['iommu'];
  iommuPageSize?: number;
}

interface TxToken {
  slot: number;
  len: number;
  started: number;
  resolve: (() => void) | null;
  reject: ((e: Error) => void) | null;
}

interface TxWaiting {
  frame: Uint8Array;
  resolve: () => void;
  reject: (e: Error) => void;
}

interface RxWaiter {
  resolve(f: Buffer): void;
  reject(e: Error): void;
  timer: NodeJS.Timeout | null;
  queue: number | null;
}

class Vring {
  readonly kick = EventFd.create();
  readonly call = EventFd.create();
  readonly err = EventFd.create();
  unsubscribe: (() => void)[] = [];
  kickScheduled = false;
  close(): void {
    for (const u of this.unsubscribe) u();
    this.unsubscribe = [];
    this.kick.close();
    this.call.close();
    this.err.close();
  }
}

class TxQueue extends Vring {
  readonly free: number[] = [];
  readonly waiting: TxWaiting[] = [];
  readonly writableWaiters: { resolve(): void; reject(e: Error): void }[] = [];
  constructor(
    readonly index: number,
    readonly pair: number,
    readonly ring: DriverQueue<TxToken>,
    readonly gpa: number,
    readonly slotSize: number,
  ) {
    super();
    for (let i = ring.size - 1; i >= 0; i--) this.free.push(i);
  }
}

class RxQueue extends Vring {
  /** A frame whose first buffer said num_buffers > 1: its parts so far, and how many are to come. */
  partial: { parts: Buffer[]; left: number; drop: boolean } | null = null;
  readonly backlog: Buffer[] = [];
  backlogHead = 0;
  readonly waiters: RxWaiter[] = [];
  paused = false;
  /** Buffers consumed and not yet posted again. */
  readonly refill: number[] = [];
  constructor(
    readonly index: number,
    readonly pair: number,
    readonly ring: DriverQueue<number>,
    readonly gpa: number,
    readonly bufSize: number,
  ) {
    super();
  }
  get backlogLength(): number {
    return this.backlog.length - this.backlogHead;
  }
  shift(): Buffer | undefined {
    if (this.backlogHead >= this.backlog.length) return undefined;
    const f = this.backlog[this.backlogHead]!;
    this.backlog[this.backlogHead++] = undefined as unknown as Buffer;
    if (this.backlogHead > 1024 && this.backlogHead * 2 > this.backlog.length) {
      this.backlog.splice(0, this.backlogHead);
      this.backlogHead = 0;
    }
    return f;
  }
}

class CtrlQueue extends Vring {
  pending: { resolve(ack: number): void; reject(e: Error): void; timer: NodeJS.Timeout | null } | null = null;
  lock: Promise<unknown> = Promise.resolve();
  constructor(
    readonly index: number,
    readonly ring: DriverQueue<number>,
    readonly gpa: number,
  ) {
    super();
  }
}

type NetDriverEvents = {
  /** A received frame (Ethernet, no virtio header) on queue pair `pair`; listeners take frames before receive(). */
  frame: [frame: Buffer, pair: number];
  /** The config changed (CONFIG_CHANGE_MSG, re-read). */
  config: [config: NetConfig];
  /** The back-end broke a rule (the connection is closed after). */
  error: [err: VhostUserError];
  /** The connection is gone (the reason); frames already received stay readable until close(). */
  close: [err: VhostUserError];
};

const emptyStats = (): NetQueueStats => ({ txPackets: 0, txBytes: 0, txCompleted: 0, txDrops: 0, rxPackets: 0, rxBytes: 0, rxBuffers: 0, rxDrops: 0 });

export class VirtioNetDriver extends EventEmitter<NetDriverEvents> {
  readonly frontend: VhostUserFrontend;
  readonly features: bigint;
  readonly packed: boolean;
  readonly mergeable: boolean;
  readonly queueSize: number;
  readonly queuePairs: number;
  /** The virtio_net_hdr length (12: VERSION_1). */
  readonly headerLength = NET_HDR_SIZE;
  readonly maxFrameSize: number;
  readonly rxBufferSize: number;
  #config: NetConfig;
  readonly #mem: Uint8Array;
  readonly #rx: RxQueue[];
  readonly #tx: TxQueue[];
  readonly #ctrl: CtrlQueue | null;
  readonly #stats: NetQueueStats[];
  readonly #anyWaiters: RxWaiter[] = [];
  readonly #backlogMax: number;
  readonly #txSplit: boolean;
  readonly #txTimeoutMs: number;
  #sweep: NodeJS.Timeout | null = null;
  #rxRr = 0;
  /** The back-end broke a rule, timed out, or the driver failed: nothing more is done. */
  #error: VhostUserError | null = null;
  /** The connection is gone (frames in the backlogs and used rings may still be read). */
  #closedErr: VhostUserError | null = null;
  #closing: Promise<void> | null = null;
  /** TX buffers on the rings were failed (counted once). */
  #txFailed = false;
  /** Memory unmapped (close() finished): nothing may touch the rings. */
  #released = false;

  private constructor(
    fe: VhostUserFrontend,
    config: NetConfig,
    mem: Uint8Array,
    rx: RxQueue[],
    tx: TxQueue[],
    ctrl: CtrlQueue | null,
    o: VirtioNetDriverOptions,
    sizes: { maxFrame: number; rxBuf: number; size: number },
  ) {
    super();
    this.frontend = fe;
    this.features = fe.features;
    this.packed = fe.hasFeature(VF.RING_PACKED);
    this.mergeable = fe.hasFeature(NetFeature.MRG_RXBUF);
    this.queueSize = sizes.size;
    this.queuePairs = rx.length;
    this.maxFrameSize = sizes.maxFrame;
    this.rxBufferSize = sizes.rxBuf;
    this.#config = config;
    this.#mem = mem;
    this.#rx = rx;
    this.#tx = tx;
    this.#ctrl = ctrl;
    this.#stats = rx.map(() => emptyStats());
    this.#backlogMax = Math.max(1, o.rxBacklog ?? 4 * sizes.size);
    this.#txSplit = o.txHeaderSeparate === true;
    this.#txTimeoutMs = o.txTimeoutMs ?? 30_000;
    const vringError = (index: number) => () => this.#fatal(new VhostUserError('PROTOCOL', `the back-end signalled an error on vring ${index}`));
    for (const q of rx) {
      q.unsubscribe.push(q.call.subscribe(() => this.#reapRx(q)));
      q.unsubscribe.push(q.err.subscribe(vringError(q.index)));
    }
    for (const q of tx) {
      q.unsubscribe.push(q.call.subscribe(() => this.#reapTx(q)));
      q.unsubscribe.push(q.err.subscribe(vringError(q.index)));
    }
    if (ctrl) {
      ctrl.unsubscribe.push(ctrl.call.subscribe(() => this.#reapCtrl()));
      ctrl.unsubscribe.push(ctrl.err.subscribe(vringError(ctrl.index)));
    }
    fe.on('close', (err) => this.#onClose(err));
    fe.on('configChange', () => void this.readConfig().then((c) => this.emit('config', c), () => {}));
    if (this.#txTimeoutMs > 0) {
      this.#sweep = setInterval(() => this.#checkTimeouts(), Math.min(1000, this.#txTimeoutMs));
      this.#sweep.unref();
    }
  }

  /** Connects to the back-end listening at `path` and sets the device up. */
  static async connect(path: string, options: VirtioNetDriverOptions & { connectTimeoutMs?: number } = {}): Promise<VirtioNetDriver> {
    return VirtioNetDriver.#own(await VhostUserFrontend.connect(path, options), options);
  }

  /** Listens at `path` for a back-end that connects to us (DPDK net_vhost client=1, QEMU server=on), then sets it up. */
  static async accept(path: string, options: VirtioNetDriverOptions & { acceptTimeoutMs?: number } = {}): Promise<VirtioNetDriver> {
    return VirtioNetDriver.#own(await VhostUserFrontend.accept(path, options), options);
  }

  static async #own(fe: VhostUserFrontend, options: VirtioNetDriverOptions): Promise<VirtioNetDriver> {
    try {
      return await VirtioNetDriver.open(fe, options);
    } catch (err) {
      fe.close();
      fe.releaseMemory();
      throw err;
    }
  }

  /** Sets the device up on a connected front-end (which the driver then owns). */
  static async open(fe: VhostUserFrontend, o: VirtioNetDriverOptions = {}): Promise<VirtioNetDriver> {
    const pairs = o.queuePairs ?? 1;
    if (!Number.isInteger(pairs) || pairs < 1 || pairs > 127) throw new RangeError(`queuePairs: ${pairs} (1..127)`);
    const size = o.queueSize ?? 256;
    // GET_QUEUE_NUM counts queue pairs for net (QEMU's vhost-user net compares it with queues=).
    await fe.handshake({ queues: pairs, config: 'use', ...(o.iommu ? { iommu: o.iommu } : {}), ...(o.iommuPageSize !== undefined ? { iommuPageSize: o.iommuPageSize } : {}) });
    const offered = fe.offeredFeatures;
    const offers = (n: number): boolean => (offered & bit(n)) !== 0n;
    if (!offers(VF.VERSION_1)) throw new VhostUserError('UNSUPPORTED', 'the back-end does not offer VIRTIO_F_VERSION_1');
    const packed = o.packed === true || (o.packed === 'auto' && offers(VF.RING_PACKED));
    if (packed && !offers(VF.RING_PACKED)) throw new VhostUserError('UNSUPPORTED', 'packed rings asked for; the back-end does not offer RING_PACKED');
    if (pairs > 1 && !offers(NetFeature.MQ)) throw new VhostUserError('UNSUPPORTED', `${pairs} queue pairs asked for; the back-end does not offer VIRTIO_NET_F_MQ`);
    const ctrl = o.ctrlVq === true && offers(NetFeature.CTRL_VQ);
    if (o.ctrlVq === true && !ctrl) throw new VhostUserError('UNSUPPORTED', 'a control queue asked for; the back-end does not offer VIRTIO_NET_F_CTRL_VQ');
    // No checksum or GSO offload is ever acked: frames are whole and the header is zero.
    let wanted = bit(VF.VERSION_1) | bit(NetFeature.MAC) | bit(NetFeature.MTU) | bit(NetFeature.STATUS);
    if (o.mrgRxbuf !== false) wanted |= bit(NetFeature.MRG_RXBUF);
    if (o.eventIdx !== false) wanted |= bit(VF.EVENT_IDX);
    if (o.indirect !== false) wanted |= bit(VF.INDIRECT_DESC);
    if (packed) wanted |= bit(VF.RING_PACKED);
    if (pairs > 1) wanted |= bit(NetFeature.MQ);
    if (ctrl) wanted |= bit(NetFeature.CTRL_VQ) | bit(NetFeature.CTRL_RX) | bit(NetFeature.CTRL_MAC_ADDR);
    if (o.iommu) wanted |= bit(VF.ACCESS_PLATFORM);
    const status = fe.hasProtocol(PF.STATUS);
    if (status) await fe.setStatus(STATUS_ACK | STATUS_DRIVER);
    await fe.setFeatures(wanted);
    if (o.iommu && !fe.iommuEnabled) {
      throw new VhostUserError('UNSUPPORTED', `an IOMMU asked for: the back-end ${offers(VF.ACCESS_PLATFORM) ? 'offers ACCESS_PLATFORM but not BACKEND_REQ and REPLY_ACK' : 'does not offer VIRTIO_F_ACCESS_PLATFORM'}`);
    }
    if (status) {
      await fe.setStatus(STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK);
      const s = await fe.getStatus();
      if ((s & STATUS_FEATURES_OK) === 0) throw new VhostUserError('UNSUPPORTED', `the device did not accept the features (status 0x${s.toString(16)})`);
    }
    if (o.mtu !== undefined && fe.hasFeature(NetFeature.MTU) && fe.hasProtocol(PF.NET_MTU)) await fe.netSetMtu(o.mtu);
    const config = await VirtioNetDriver.#readConfig(fe, o);
    if (pairs > config.maxVirtqueuePairs) throw new VhostUserError('UNSUPPORTED', `${pairs} queue pairs asked for; the device has ${config.maxVirtqueuePairs}`);
    const mrg = fe.hasFeature(NetFeature.MRG_RXBUF);
    const maxFrame = o.maxFrameSize ?? config.mtu + L2_OVERHEAD;
    const rxBuf = o.rxBufferSize ?? (mrg ? 2048 : NET_HDR_SIZE + Math.max(maxFrame, config.mtu + L2_OVERHEAD));
    if (!Number.isInteger(maxFrame) || maxFrame < ETH_HLEN || maxFrame > 65535 + L2_OVERHEAD) throw new RangeError(`maxFrameSize: ${maxFrame}`);
    if (!Number.isInteger(rxBuf) || rxBuf < NET_HDR_SIZE + ETH_HLEN || rxBuf > 1 << 20) throw new RangeError(`rxBufferSize: ${rxBuf}`);
    const eventIdx = fe.hasFeature(VF.EVENT_IDX);
    const indirect = fe.hasFeature(VF.INDIRECT_DESC);
    const split = o.txHeaderSeparate === true;
    // One region: the rings, then per pair the RX buffers and the TX slots, then the control area.
    const layout = ringLayout(size, packed, indirect ? 2 : 0);
    const nq = 2 * pairs + (ctrl ? 1 : 0);
    const align = (n: number, a: number): number => Math.ceil(n / a) * a;
    const rxBufSize = align(rxBuf, 64);
    const txSlot = align((split ? TX_SPLIT_AT : NET_HDR_SIZE) + maxFrame, 64);
    const rxPool = align(rxBufSize * size, 4096);
    const txPool = align(txSlot * size, 4096);
    const ringsEnd = layout.bytes * nq;
    const total = ringsEnd + pairs * (rxPool + txPool) + (ctrl ? CTRL_AREA : 0);
    const shm = SharedMemory.create(align(total, 0x20_0000), { name: 'vdevkit-net' });
    fe.addMemory(shm, 0);
    await fe.syncMemory();
    const ringAt = (i: number): { desc: number; driver: number; device: number; indirectTables?: number } => ({
      desc: i * layout.bytes + layout.desc,
      driver: i * layout.bytes + layout.driver,
      device: i * layout.bytes + layout.device,
      indirectTables: indirect ? i * layout.bytes + layout.indirectTables : undefined,
    });
    const queue = <T>(i: number, tx = false): DriverQueue<T> => (tx ? createTxQueue<T> : createDriverQueue<T>)({ memory: fe.memory, size, packed, eventIdx, indirect, indirectMax: 2, ...ringAt(i) });
    const rx: RxQueue[] = [];
    const tx: TxQueue[] = [];
    let cq: CtrlQueue | null = null;
    const all = (): Vring[] => [...rx, ...tx, ...(cq ? [cq] : [])];
    try {
      for (let p = 0; p < pairs; p++) {
        const pool = ringsEnd + p * (rxPool + txPool);
        const r = new RxQueue(2 * p, p, queue<number>(2 * p), pool, rxBufSize);
        rx.push(r);
        // Every RX buffer is posted before the ring starts.
        for (let b = 0; b < size; b++) r.ring.add([{ addr: r.gpa + b * rxBufSize, len: rxBufSize, write: true }], b);
        r.ring.needsKick();
        tx.push(new TxQueue(2 * p + 1, p, queue<TxToken>(2 * p + 1, true), pool + rxPool, txSlot));
      }
      if (ctrl) cq = new CtrlQueue(2 * pairs, queue<number>(2 * pairs), ringsEnd + pairs * (rxPool + txPool));
      const order: Vring[] = [];
      for (let p = 0; p < pairs; p++) order.push(rx[p]!, tx[p]!);
      if (cq) order.push(cq);
      for (let i = 0; i < order.length; i++) {
        const v = order[i]!;
        const at = ringAt(i);
        await fe.setupVring(i, { size, desc: at.desc, driver: at.driver, device: at.device, kick: v.kick, call: v.call, err: v.err });
      }
      if (status) await fe.setStatus(STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    } catch (err) {
      for (const v of all()) v.close();
      throw err;
    }
    const d = new VirtioNetDriver(fe, config, shm.bytes, rx, tx, cq, o, { maxFrame, rxBuf: rxBufSize, size });
    for (const r of rx) r.kick.signal();
    if (cq && pairs > 1 && fe.hasFeature(NetFeature.MQ)) {
      const data = Buffer.alloc(2);
      data.writeUInt16LE(pairs, 0);
      const ack = await d.control(NetCtrl.MQ, NetCtrl.MQ_VQ_PAIRS_SET, data).catch(async (err: unknown) => {
        await d.close();
        throw err;
      });
      if (ack !== NetCtrl.OK) {
        await d.close();
        throw new VhostUserError('UNSUPPORTED', `the device refused VQ_PAIRS_SET ${pairs} (ack ${ack})`);
      }
    }
    return d;
  }

  static async #readConfig(fe: VhostUserFrontend, o: VirtioNetDriverOptions): Promise<NetConfig> {
    const fallback = { mtu: o.mtu ?? 1500, pairs: fe.hasFeature(NetFeature.MQ) ? Math.max(1, fe.maxQueues ?? 1) : 1 };
    if (!fe.hasProtocol(PF.CONFIG)) return { mac: null, status: NET_S_LINK_UP, linkUp: true, maxVirtqueuePairs: fallback.pairs, mtu: fallback.mtu, fromDevice: false };
    const c = decodeNetConfig(await fe.getConfig(0, NET_CONFIG_SIZE), fe.features, fallback);
    if (fe.hasFeature(NetFeature.MQ) && (c.maxVirtqueuePairs < 1 || c.maxVirtqueuePairs > 0x8000)) {
      throw new VhostUserError('PROTOCOL', `config max_virtqueue_pairs ${c.maxVirtqueuePairs} (1..32768)`);
    }
    if (fe.hasFeature(NetFeature.MTU) && c.mtu < 68) throw new VhostUserError('PROTOCOL', `config mtu ${c.mtu} (at least 68)`);
    return c;
  }

  // ---- state -----------------------------------------------------------------

  get config(): NetConfig {
    return this.#config;
  }

  /** Reads the config again (GET_CONFIG when CONFIG is negotiated). */
  async readConfig(): Promise<NetConfig> {
    const c = await VirtioNetDriver.#readConfig(this.frontend, { mtu: this.#config.fromDevice ? undefined : this.#config.mtu });
    this.#config = c;
    return c;
  }

  get mac(): string | null {
    return this.#config.mac;
  }

  get linkUp(): boolean {
    return this.#config.linkUp;
  }

  /** The error that stopped the driver (a lying back-end, a timeout), or null. */
  get error(): VhostUserError | null {
    return this.#error;
  }

  /** The connection is gone (disconnect, error or close()). */
  get closed(): boolean {
    return this.#closedErr !== null;
  }

  /** Counters per queue pair (copies). */
  get stats(): NetQueueStats[] {
    return this.#stats.map((s) => ({ ...s }));
  }

  /** Counters summed over the queue pairs. */
  totals(): NetQueueStats {
    const t = emptyStats();
    for (const s of this.#stats) for (const k of Object.keys(t) as (keyof NetQueueStats)[]) t[k] += s[k];
    return t;
  }

  /** TX frames on the rings and waiting for room. */
  get txInFlight(): number {
    let n = 0;
    for (const q of this.#tx) n += q.ring.inFlight + q.waiting.length;
    return n;
  }

  #txq(queue: number | undefined): TxQueue {
    const q = this.#tx[queue ?? 0];
    if (!q) throw new RangeError(`queue pair ${queue} does not exist (${this.#tx.length})`);
    return q;
  }

  #dead(): VhostUserError | null {
    if (this.#error) return this.#error;
    if (this.#closing) return new VhostUserError('DISCONNECTED', 'the driver is closing');
    return this.#closedErr;
  }

  #checkFrame(frame: Uint8Array): void {
    if (!(frame instanceof Uint8Array)) throw new TypeError('a frame is a Uint8Array');
    if (frame.length < ETH_HLEN || frame.length > this.maxFrameSize) throw new RangeError(`a frame of ${frame.length} bytes (${ETH_HLEN}..${this.maxFrameSize})`);
  }

  // ---- TX ------------------------------------------------------------------------

  /** Sends one frame (Ethernet header first, no FCS) on queue pair `queue` (default 0); resolves when the device used it. */
  send(frame: Uint8Array, options: { queue?: number } = {}): Promise<void> {
    let q: TxQueue;
    try {
      this.#checkFrame(frame);
      q = this.#txq(options.queue);
    } catch (err) {
      return Promise.reject(err);
    }
    const dead = this.#dead();
    if (dead) return Promise.reject(dead);
    return new Promise((resolve, reject) => {
      q.waiting.push({ frame, resolve, reject });
      this.#pumpTx(q);
    });
  }

  /** Sends frames in order, one kick; resolves when the device used them all (rejects with the first failure). */
  async sendBatch(frames: readonly Uint8Array[], options: { queue?: number } = {}): Promise<void> {
    for (const f of frames) this.#checkFrame(f);
    await Promise.all(frames.map((f) => this.send(f, options)));
  }

  /**
   * Fire and forget: puts the frame on the TX ring when there is room now and
   * returns true; false (nothing taken) when the ring or its slots are full or
   * send()s are waiting. `writable()` resolves when there is room again.
   */
  trySend(frame: Uint8Array, options: { queue?: number } = {}): boolean {
    this.#checkFrame(frame);
    const q = this.#txq(options.queue);
    const dead = this.#dead();
    if (dead) throw dead;
    if (q.waiting.length > 0 || !this.#hasRoom(q)) return false;
    this.#place(q, frame, null, null);
    this.#scheduleKick(q);
    return true;
  }

  /** Resolves once trySend() on `queue` has room (at once when it has). */
  writable(options: { queue?: number } = {}): Promise<void> {
    const q = this.#txq(options.queue);
    const dead = this.#dead();
    if (dead) return Promise.reject(dead);
    if (q.waiting.length === 0 && this.#hasRoom(q)) return Promise.resolve();
    return new Promise((resolve, reject) => q.writableWaiters.push({ resolve, reject }));
  }

  #hasRoom(q: TxQueue): boolean {
    return q.free.length > 0 && q.ring.canAdd(this.#txSplit ? 2 : 1);
  }

  #place(q: TxQueue, frame: Uint8Array, resolve: (() => void) | null, reject: ((e: Error) => void) | null): void {
    const slot = q.free.pop()!;
    const at = q.gpa + slot * q.slotSize;
    const mem = this.#mem;
    mem.fill(0, at, at + NET_HDR_SIZE);
    let bufs: DriverBuffer[];
    if (this.#txSplit) {
      mem.set(frame, at + TX_SPLIT_AT);
      bufs = [
        { addr: at, len: NET_HDR_SIZE, write: false },
        { addr: at + TX_SPLIT_AT, len: frame.length, write: false },
      ];
    } else {
      mem.set(frame, at + NET_HDR_SIZE);
      bufs = [{ addr: at, len: NET_HDR_SIZE + frame.length, write: false }];
    }
    q.ring.add(bufs, { slot, len: frame.length, started: Date.now(), resolve, reject });
    const s = this.#stats[q.pair]!;
    s.txPackets++;
    s.txBytes += frame.length;
  }

  #pumpTx(q: TxQueue): void {
    while (q.waiting.length > 0 && this.#hasRoom(q)) {
      const w = q.waiting.shift()!;
      this.#place(q, w.frame, w.resolve, w.reject);
    }
    this.#scheduleKick(q);
  }

  #scheduleKick(q: Vring & { ring: DriverQueue<unknown> }): void {
    if (q.kickScheduled) return;
    q.kickScheduled = true;
    queueMicrotask(() => {
      q.kickScheduled = false;
      if (!q.kick.closed && this.#error === null && q.ring.needsKick()) q.kick.signal();
    });
  }

  #reapTx(q: TxQueue): void {
    if (this.#error || this.#released) return;
    const s = this.#stats[q.pair]!;
    try {
      do {
        for (let u = q.ring.getUsed(); u !== null; u = q.ring.getUsed()) {
          const t = u.token;
          q.free.push(t.slot);
          s.txCompleted++;
          t.resolve?.();
        }
      } while (q.ring.enableInterrupts());
    } catch (err) {
      this.#fatal(new VhostUserError('PROTOCOL', `TX vring ${q.index}: ${(err as Error).message}`));
      return;
    }
    if (this.#closedErr) return;
    this.#pumpTx(q);
    while (q.writableWaiters.length > 0 && q.waiting.length === 0 && this.#hasRoom(q)) q.writableWaiters.shift()!.resolve();
  }

  // ---- RX ------------------------------------------------------------------------

  /**
   * The next frame received (on queue pair `queue`, or any); waits for one.
   * Rejects after `timeoutMs` (TIMEOUT), at once when the driver failed (a
   * lying back-end: frames not yet read are not given), and once the
   * connection is gone and every frame received before it went has been read.
   */
  receive(options: { queue?: number; timeoutMs?: number } = {}): Promise<Buffer> {
    if (options.queue !== undefined && !this.#rx[options.queue]) return Promise.reject(new RangeError(`queue pair ${options.queue} does not exist (${this.#rx.length})`));
    // A failed driver gives nothing more; after a disconnect what came before is still read.
    if (this.#error) return Promise.reject(this.#error);
    const f = this.#take(options.queue);
    if (f) return Promise.resolve(f);
    const end = this.#closing ? new VhostUserError('DISCONNECTED', 'the driver was closed') : this.#closedErr;
    if (end) return Promise.reject(end);
    return new Promise((resolve, reject) => {
      const w: RxWaiter = { resolve, reject, timer: null, queue: options.queue ?? null };
      const list = options.queue === undefined ? this.#anyWaiters : this.#rx[options.queue]!.waiters;
      if (options.timeoutMs !== undefined) {
        w.timer = setTimeout(() => {
          const i = list.indexOf(w);
          if (i >= 0) list.splice(i, 1);
          reject(new VhostUserError('TIMEOUT', `no frame${options.queue === undefined ? '' : ` on queue pair ${options.queue}`} in ${options.timeoutMs} ms`));
        }, options.timeoutMs);
      }
      list.push(w);
    });
  }

  /** Frames as they come (until close(); throws when the back-end fails or goes away). */
  async *frames(options: { queue?: number } = {}): AsyncGenerator<Buffer, void, undefined> {
    for (;;) {
      try {
        yield await this.receive(options);
      } catch (err) {
        if (this.#closing && !this.#error) return;
        throw err;
      }
    }
  }

  [Symbol.asyncIterator](): AsyncGenerator<Buffer, void, undefined> {
    return this.frames();
  }

  /** Frames waiting in the backlogs. */
  get rxPending(): number {
    let n = 0;
    for (const q of this.#rx) n += q.backlogLength;
    return n;
  }

  #take(queue: number | undefined): Buffer | undefined {
    if (queue !== undefined) return this.#takeFrom(this.#rx[queue]!);
    const n = this.#rx.length;
    for (let k = 0; k < n; k++) {
      const q = this.#rx[(this.#rxRr + k) % n]!;
      const f = this.#takeFrom(q);
      if (f) {
        this.#rxRr = (this.#rxRr + k + 1) % n;
        return f;
      }
    }
    return undefined;
  }

  #takeFrom(q: RxQueue): Buffer | undefined {
    const f = q.shift();
    if (q.paused && q.backlogLength <= this.#backlogMax / 2) {
      // At once: after a disconnect the caller's next receive() must see what the ring still holds.
      q.paused = false;
      this.#reapRx(q);
    }
    return f;
  }

  #reapRx(q: RxQueue): void {
    if (this.#error || this.#released || q.paused) return;
    try {
      do {
        for (;;) {
          if (this.#full(q)) {
            q.paused = true;
            q.ring.disableInterrupts();
            break;
          }
          const u = q.ring.getUsed();
          if (u === null) break;
          this.#rxBuffer(q, u.token, u.len);
          if (this.#error) return;
        }
      } while (!q.paused && q.ring.enableInterrupts());
    } catch (err) {
      this.#fatal(new VhostUserError('PROTOCOL', `RX vring ${q.index}: ${(err as Error).message}`));
      return;
    }
    this.#refill(q);
  }

  #full(q: RxQueue): boolean {
    return q.backlogLength >= this.#backlogMax && this.listenerCount('frame') === 0;
  }

  /** Posts the consumed buffers again (not once the connection is gone). */
  #refill(q: RxQueue): void {
    if (this.#closedErr || q.refill.length === 0) return;
    for (const b of q.refill) q.ring.add([{ addr: q.gpa + b * q.bufSize, len: q.bufSize, write: true }], b);
    q.refill.length = 0;
    this.#scheduleKick(q);
  }

  /** One used RX buffer: a frame's first (header, num_buffers) or a continuation. */
  #rxBuffer(q: RxQueue, buf: number, len: number): void {
    const s = this.#stats[q.pair]!;
    s.rxBuffers++;
    const at = q.gpa + buf * q.bufSize;
    const mem = this.#mem;
    q.refill.push(buf);
    if (q.partial) {
      q.partial.parts.push(Buffer.from(mem.subarray(at, at + len)));
      if (--q.partial.left === 0) {
        const { parts, drop } = q.partial;
        q.partial = null;
        if (drop) s.rxDrops++;
        else this.#frame(q, Buffer.concat(parts));
      }
      return;
    }
    if (len < NET_HDR_SIZE + ETH_HLEN) {
      // Linux: "short packet", a length error; a device gives empty buffers back when its ring stops.
      if (len > 0) s.rxDrops++;
      return;
    }
    const flags = mem[at]!;
    const gso = mem[at + 1]!;
    let nb = 1;
    if (this.mergeable) {
      nb = mem[at + 10]! | (mem[at + 11]! << 8);
      if (nb === 0 || nb > this.queueSize) {
        this.#fatal(new VhostUserError('PROTOCOL', `RX vring ${q.index}: num_buffers ${nb} (1..${this.queueSize})`));
        return;
      }
      if (nb - 1 > q.ring.inFlight) {
        this.#fatal(new VhostUserError('PROTOCOL', `RX vring ${q.index}: num_buffers ${nb} with ${q.ring.inFlight} more buffers held by the device`));
        return;
      }
    }
    // Without MRG_RXBUF num_buffers is not looked at (DPDK leaves it unset; Linux ignores it).
    const bad = flags !== 0 || gso !== 0;
    const first = Buffer.from(mem.subarray(at + NET_HDR_SIZE, at + len));
    if (nb > 1) {
      q.partial = { parts: [first], left: nb - 1, drop: bad };
      return;
    }
    if (bad) {
      s.rxDrops++;
      return;
    }
    this.#frame(q, first);
  }

  #frame(q: RxQueue, f: Buffer): void {
    const s = this.#stats[q.pair]!;
    if (f.length < ETH_HLEN) {
      s.rxDrops++;
      return;
    }
    s.rxPackets++;
    s.rxBytes += f.length;
    if (this.listenerCount('frame') > 0) {
      this.emit('frame', f, q.pair);
      return;
    }
    const w = q.waiters.shift() ?? this.#anyWaiters.shift();
    if (w) {
      if (w.timer) clearTimeout(w.timer);
      w.resolve(f);
      return;
    }
    q.backlog.push(f);
  }

  // ---- the control queue ---------------------------------------------------

  /** A control command (class, command, data); resolves with the device's ack (0 OK, 1 ERR). Needs `ctrlVq`. */
  control(cls: number, cmd: number, data: Uint8Array = new Uint8Array(0)): Promise<number> {
    const c = this.#ctrl;
    if (!c) return Promise.reject(new VhostUserError('UNSUPPORTED', 'no control queue (ctrlVq)'));
    if (data.length > CTRL_MAX) return Promise.reject(new RangeError(`a control command of ${data.length} bytes (at most ${CTRL_MAX})`));
    const run = (): Promise<number> => {
      const dead = this.#dead();
      if (dead) return Promise.reject(dead);
      return new Promise<number>((resolve, reject) => {
        const mem = this.#mem;
        mem[c.gpa] = cls;
        mem[c.gpa + 1] = cmd;
        mem.set(data, c.gpa + 2);
        const ack = c.gpa + CTRL_AREA - 1;
        mem[ack] = 0xff;
        c.pending = { resolve, reject, timer: null };
        if (this.#txTimeoutMs > 0) {
          c.pending.timer = setTimeout(() => this.#timeout(`control command ${cls}/${cmd}`), this.#txTimeoutMs);
          c.pending.timer.unref();
        }
        c.ring.add(
          [
            { addr: c.gpa, len: 2 + data.length, write: false },
            { addr: ack, len: 1, write: true },
          ],
          0,
        );
        this.#scheduleKick(c);
      });
    };
    const p = c.lock.then(run, run);
    c.lock = p.catch(() => {});
    return p;
  }

  #reapCtrl(): void {
    const c = this.#ctrl!;
    if (this.#error || this.#released) return;
    try {
      do {
        for (let u = c.ring.getUsed(); u !== null; u = c.ring.getUsed()) {
          const p = c.pending;
          c.pending = null;
          if (p?.timer) clearTimeout(p.timer);
          if (u.len !== 1) throw new Error(`control ack of ${u.len} bytes (1)`);
          p?.resolve(this.#mem[c.gpa + CTRL_AREA - 1]!);
        }
      } while (c.ring.enableInterrupts());
    } catch (err) {
      this.#fatal(new VhostUserError('PROTOCOL', `control vring ${c.index}: ${(err as Error).message}`));
    }
  }

  // ---- failure and close -----------------------------------------------------

  #checkTimeouts(): void {
    const limit = Date.now() - this.#txTimeoutMs;
    for (const q of this.#tx) {
      for (const t of q.ring.tokens()) {
        if (t.started < limit) {
          this.#timeout(`a TX buffer on vring ${q.index}`);
          return;
        }
      }
    }
  }

  #timeout(what: string): void {
    if (this.#error || this.#closedErr) return;
    this.#fatal(new VhostUserError('TIMEOUT', `${what} was not used by the device in ${this.#txTimeoutMs} ms`));
  }

  /** The back-end broke a rule: remember why, tell listeners, disconnect it. */
  #fatal(err: VhostUserError): void {
    if (this.#error) return;
    this.#error = err;
    if (this.listenerCount('error') > 0) this.emit('error', err);
    if (!this.frontend.closed) this.frontend.close(err);
    else this.#failPending(err);
  }

  #onClose(reason: VhostUserError): void {
    if (this.#closedErr) return;
    this.#closedErr = reason;
    // What the device published before it went is still ours to read (not after a lie).
    if (!this.#error && !this.#closing) for (const q of this.#rx) this.#reapRx(q);
    this.#failPending(this.#error ?? reason);
    this.emit('close', reason);
  }

  #failPending(err: VhostUserError): void {
    for (const q of this.#tx) {
      const s = this.#stats[q.pair]!;
      // Buffers still on the ring stay allocated: the back-end may yet read them.
      if (!this.#txFailed) {
        for (const t of q.ring.tokens()) {
          if (t.reject) t.reject(err);
          t.resolve = null;
          t.reject = null;
        }
        s.txDrops += q.ring.inFlight;
      }
      s.txDrops += q.waiting.length;
      for (const w of q.waiting.splice(0)) w.reject(err);
      for (const w of q.writableWaiters.splice(0)) w.reject(err);
    }
    this.#txFailed = true;
    const rxErr = this.#error ?? err;
    for (const q of this.#rx) {
      for (const w of q.waiters.splice(0)) {
        if (w.timer) clearTimeout(w.timer);
        w.reject(rxErr);
      }
    }
    for (const w of this.#anyWaiters.splice(0)) {
      if (w.timer) clearTimeout(w.timer);
      w.reject(rxErr);
    }
    const c = this.#ctrl;
    if (c?.pending) {
      if (c.pending.timer) clearTimeout(c.pending.timer);
      c.pending.reject(err);
      c.pending = null;
    }
  }

  /**
   * Stops the rings (SET_VRING_ENABLE 0, GET_VRING_BASE) when the back-end is
   * still there, fails what is pending, disconnects, and frees memory and
   * eventfds. Frames not yet read are dropped.
   */
  close(): Promise<void> {
    this.#closing ??= (async () => {
      if (this.#sweep) clearInterval(this.#sweep);
      const fe = this.frontend;
      if (!fe.closed) {
        const n = 2 * this.#rx.length + (this.#ctrl ? 1 : 0);
        for (let i = 0; i < n; i++) {
          try {
            await fe.stopVring(i);
          } catch {
            break;
          }
        }
      }
      const err = new VhostUserError('DISCONNECTED', 'the driver was closed');
      if (!fe.closed) fe.close(err);
      this.#failPending(err);
      for (const v of [...this.#rx, ...this.#tx, ...(this.#ctrl ? [this.#ctrl] : [])]) v.close();
      for (const q of this.#rx) {
        q.backlog.length = 0;
        q.backlogHead = 0;
      }
      this.#released = true;
      fe.releaseMemory();
    })();
    return this.#closing;
  }
}
