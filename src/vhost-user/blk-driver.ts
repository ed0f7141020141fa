/**
 * VirtioBlkDriver: a userspace virtio-blk driver over a vhost-user back-end
 * (what libblkio's virtio-blk-vhost-user driver does for C): the front-end
 * gives the back-end memfd guest memory holding the rings and a DMA pool,
 * requests are virtio_blk_req chains (16-byte header, data, status byte).
 *
 *   const disk = await VirtioBlkDriver.connect('/tmp/blk.sock', { queues: 4 });
 *   await disk.write(0, data); const back = await disk.read(0, data.length);
 *   await disk.flush(); await disk.close();
 *
 * Many requests may be in flight on each queue; requests beyond the ring or
 * the DMA pool wait in order. Kicks are batched: every request made in one
 * turn of the event loop is published before one kick decision per queue.
 * A dead back-end fails every request (DISCONNECTED); one that does not
 * complete a request within `ioTimeoutMs` is disconnected (TIMEOUT).
 *
 * With `reconnect`, a back-end that goes away is waited for instead (QEMU's
 * vhost-user-blk reconnect): requests stay pending, the driver keeps its
 * memory, rings and the inflight region, connects again, negotiates the same
 * features, gives the memory table and (when the back-end tracks inflight
 * I/O) the same inflight region back, and restarts the rings where they were:
 * the back-end resubmits what it had taken. A back-end without inflight
 * tracking gets fresh rings, and the driver makes every pending request
 * available again (reads and writes of a disk are idempotent). Either way
 * each request settles once. Past the reconnect limits they fail with a
 * VhostUserReconnectError. Events: 'disconnected', 'reconnected'.
 */
import { EventEmitter } from 'node:events';
import { EventFd } from '../sys/eventfd.js';
import { SharedMemory } from '../sys/shm.js';
import { createDriverQueue } from '../virtio/driver-queue.js';
import { ringLayout, type DriverBuffer, type DriverQueue, type DriverQueueOptions } from '../virtio/driver.js';
import { BlkFeature, BlkReq, BlkStatus, SECTOR } from '../devices/vhost-user-blk.js';
import { ProtocolFeature as PF, VirtioFeature as VF, bit } from './constants.js';
import { VhostUserError } from './errors.js';
import { VhostUserFrontend, VhostUserReconnectError, type HandshakeOptions, type InflightInfo, type VhostUserFrontendOptions } from './frontend.js';

/** Device status bits (SET_STATUS). */
const STATUS_ACK = 1;
const STATUS_DRIVER = 2;
const STATUS_DRIVER_OK = 4;
const STATUS_FEATURES_OK = 8;
const ID_BYTES = 20;
/** Per-request slot in the header area: header @0 (16), segment @16 (16), status @32. */
const SLOT = 64;
const DMA_ALIGN = 4096;
const BLK_CONFIG_SIZE = 60;
/** Reaps right after a kick before the driver waits for a call event again. */
const SYNC_REAPS = 16;

export interface BlkConfig {
  capacity: bigint;
  sizeMax: number;
  segMax: number;
  geometry: { cylinders: number; heads: number; sectors: number };
  blkSize: number;
  topology: { physicalBlockExp: number; alignmentOffset: number; minIoSize: number; optIoSize: number };
  writeback: number;
  numQueues: number;
  maxDiscardSectors: number;
  maxDiscardSeg: number;
  discardSectorAlignment: number;
  maxWriteZeroesSectors: number;
  maxWriteZeroesSeg: number;
  writeZeroesMayUnmap: number;
}

/** Decodes struct virtio_blk_config (the first 60 bytes). */
export function decodeBlkConfig(b: Buffer): BlkConfig {
  const at = (off: number, n: 1 | 2 | 4): number => (off + n <= b.length ? (n === 1 ? b.readUInt8(off) : n === 2 ? b.readUInt16LE(off) : b.readUInt32LE(off)) : 0);
  return {
    capacity: b.length >= 8 ? b.readBigUInt64LE(0) : 0n,
    sizeMax: at(8, 4),
    segMax: at(12, 4),
    geometry: { cylinders: at(16, 2), heads: at(18, 1), sectors: at(19, 1) },
    blkSize: at(20, 4),
    topology: { physicalBlockExp: at(24, 1), alignmentOffset: at(25, 1), minIoSize: at(26, 2), optIoSize: at(28, 4) },
    writeback: at(32, 1),
    numQueues: at(34, 2),
    maxDiscardSectors: at(36, 4),
    maxDiscardSeg: at(40, 4),
    discardSectorAlignment: at(44, 4),
    maxWriteZeroesSectors: at(48, 4),
    maxWriteZeroesSeg: at(52, 4),
    writeZeroesMayUnmap: at(56, 1),
  };
}

export class BlkIoError extends Error {
  readonly status: number;
  constructor(op: string, status: number) {
    super(`${op}: the device answered ${status === BlkStatus.IOERR ? 'IOERR' : status === BlkStatus.UNSUPP ? 'UNSUPP' : `status ${status}`}`);
    this.name = 'BlkIoError';
    this.status = status;
  }
}

export interface VirtioBlkDriverOptions extends VhostUserFrontendOptions {
  /** Request queues to use (default 1; at most what the device has). */
  queues?: number;
  /** Ring size (default 128). */
  queueSize?: number;
  /** Packed rings: true requires them, false never, 'auto' (default) when offered. */
  packed?: boolean | 'auto';
  /** Use EVENT_IDX / INDIRECT_DESC when offered (default true). */
  eventIdx?: boolean;
  indirect?: boolean;
  /** DMA pool bytes (default 16 MiB); no single transfer may be larger. */
  dmaBytes?: number;
  /** Largest data bytes per request (default 1 MiB, and size_max when the device has one). */
  maxTransfer?: number;
  /** A request not completed in this time disconnects the back-end (default 30000 ms; 0: never). */
  ioTimeoutMs?: number;
  /** Ask for the inflight region when INFLIGHT_SHMFD is offered (default true). */
  inflight?: boolean;
  /**
   * Wait for a back-end that went away (the connection closed) and reconnect
   * to the same path instead of failing what is pending (default false).
   * true: the defaults below.
   */
  reconnect?: boolean | ReconnectOptions;
  /**
   * Drive the disk behind an IOMMU (VIRTIO_F_ACCESS_PLATFORM, required when given): the
   * front-end answers the back-end's IOTLB misses (HandshakeOptions.iommu); ring and buffer
   * addresses are IOVAs, equal to our GPAs with 'identity'.
   */
  iommu?: HandshakeOptions['iommu'];
  iommuPageSize?: number;
}

export interface ReconnectOptions {
  /** Before each attempt (default 100 ms). */
  delayMs?: number;
  /** Attempts before giving up (default unlimited, within timeoutMs). */
  maxAttempts?: number;
  /** From the disconnect to giving up, attempts included (default 30000 ms). */
  timeoutMs?: number;
}

export interface ReconnectInfo {
  /** Connection attempts it took. */
  attempts: number;
  /** Who resubmits what was in flight: the back-end (from the inflight region) or the driver (fresh rings). */
  resubmittedBy: 'backend' | 'driver';
  /** Requests pending (on the rings) at the reconnect. */
  pending: number;
}

type BlkDriverEvents = {
  /** The back-end went away; with `reconnect`, the driver is reconnecting. */
  disconnected: [err: VhostUserError];
  reconnected: [info: ReconnectInfo];
};

/** One request of the batch API. */
export type BlkRequest =
  | { op: 'read'; offset: number; length: number }
  | { op: 'write'; offset: number; data: Uint8Array }
  | { op: 'flush' }
  | { op: 'discard'; offset: number; length: number }
  | { op: 'writeZeroes'; offset: number; length: number; unmap?: boolean }
  | { op: 'getId' };

interface Pending {
  type: number;
  sector: number;
  /** Device-readable data (OUT) or bytes to read (IN) / segment (discard, write-zeroes). */
  data: Uint8Array | null;
  readLen: number;
  segment: { sector: number; sectors: number; flags: number } | null;
  resolve(v: Buffer | undefined): void;
  reject(e: Error): void;
  /** Filled while in flight. */
  slot: number;
  dma: number;
  dmaLen: number;
  started: number;
  /** Submission order (resubmission keeps it). */
  seq: number;
}

/** A first-fit allocator of [0, size) in DMA_ALIGN units. */
class Extents {
  #free: { at: number; len: number }[];
  constructor(size: number) {
    this.#free = [{ at: 0, len: size }];
  }
  alloc(n: number): number {
    const len = Math.ceil(n / DMA_ALIGN) * DMA_ALIGN;
    for (let i = 0; i < this.#free.length; i++) {
      const e = this.#free[i]!;
      if (e.len < len) continue;
      const at = e.at;
      e.at += len;
      e.len -= len;
      if (e.len === 0) this.#free.splice(i, 1);
      return at;
    }
    return -1;
  }
  free(at: number, n: number): void {
    const len = Math.ceil(n / DMA_ALIGN) * DMA_ALIGN;
    let i = 0;
    while (i < this.#free.length && this.#free[i]!.at < at) i++;
    this.#free.splice(i, 0, { at, len });
    // Merge with the neighbours.
    if (i + 1 < this.#free.length && this.#free[i]!.at + this.#free[i]!.len === this.#free[i + 1]!.at) {
      this.#free[i]!.len += this.#free[i + 1]!.len;
      this.#free.splice(i + 1, 1);
    }
    if (i > 0 && this.#free[i - 1]!.at + this.#free[i - 1]!.len === this.#free[i]!.at) {
      this.#free[i - 1]!.len += this.#free[i]!.len;
      this.#free.splice(i, 1);
    }
  }
}

class BlkQueue {
  readonly index: number;
  ring: DriverQueue<Pending>;
  /** Where the ring is (to lay it out again, fresh, for a back-end without inflight tracking). */
  readonly ringOptions: DriverQueueOptions;
  /** Requests taken off a ring that was laid out again, made available again once the back-end is back. */
  carried: Pending[] = [];
  readonly kick = EventFd.create();
  readonly call = EventFd.create();
  readonly err = EventFd.create();
  readonly waiting: Pending[] = [];
  readonly slots: number[] = [];
  readonly hdrGpa: number;
  readonly hdr: Uint8Array;
  unsubscribe: (() => void)[] = [];
  kickScheduled = false;
  /** Reaps right after a kick since the last call event (see #scheduleKick). */
  syncReaps = 0;
  constructor(index: number, ringOptions: DriverQueueOptions, hdrGpa: number, hdr: Uint8Array) {
    this.index = index;
    this.ringOptions = ringOptions;
    this.ring = createDriverQueue<Pending>(ringOptions);
    const ring = this.ring;
    this.hdrGpa = hdrGpa;
    this.hdr = hdr;
    for (let i = ring.size - 1; i >= 0; i--) this.slots.push(i);
  }
}

/** The blk features the driver asks for (plus the ring features by option). */
const BLK_FEATURES = [
  BlkFeature.SIZE_MAX,
  BlkFeature.SEG_MAX,
  BlkFeature.GEOMETRY,
  BlkFeature.RO,
  BlkFeature.BLK_SIZE,
  BlkFeature.FLUSH,
  BlkFeature.TOPOLOGY,
  BlkFeature.CONFIG_WCE,
  BlkFeature.MQ,
  BlkFeature.DISCARD,
  BlkFeature.WRITE_ZEROES,
];

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export class VirtioBlkDriver extends EventEmitter<BlkDriverEvents> {
  readonly frontend: VhostUserFrontend;
  readonly config: BlkConfig;
  readonly features: bigint;
  readonly packed: boolean;
  readonly queueSize: number;
  readonly maxTransfer: number;
  readonly #queues: BlkQueue[];
  readonly #dma: SharedMemory;
  readonly #dmaGpa: number;
  readonly #extents: Extents;
  #inflight: InflightInfo | null;
  readonly #ioTimeoutMs: number;
  readonly #options: VirtioBlkDriverOptions;
  /** The features asked for (SET_FEATURES sends offered & this). */
  readonly #wanted: bigint;
  readonly #reconnect: Required<ReconnectOptions> | null;
  #reconnecting = false;
  /** The rings were laid out again since the inflight region last matched them: resubmission is ours from now on. */
  #ringsReset = false;
  #seq = 0;
  #sweep: NodeJS.Timeout | null = null;
  #rr = 0;
  #error: Error | null = null;
  #closing: Promise<void> | null = null;

  private constructor(fe: VhostUserFrontend, config: BlkConfig, queues: BlkQueue[], dma: SharedMemory, dmaGpa: number, inflight: InflightInfo | null, o: VirtioBlkDriverOptions, maxTransfer: number, wanted: bigint) {
    super();
    this.frontend = fe;
    this.config = config;
    this.features = fe.features;
    this.packed = fe.hasFeature(VF.RING_PACKED);
    this.queueSize = queues[0]!.ring.size;
    this.#queues = queues;
    this.#dma = dma;
    this.#dmaGpa = dmaGpa;
    this.#extents = new Extents(dma.size);
    this.#inflight = inflight;
    this.#ioTimeoutMs = o.ioTimeoutMs ?? 30_000;
    this.#options = o;
    this.#wanted = wanted;
    this.maxTransfer = maxTransfer;
    const r = o.reconnect === true ? {} : o.reconnect || null;
    this.#reconnect = r ? { delayMs: r.delayMs ?? 100, maxAttempts: r.maxAttempts ?? Infinity, timeoutMs: r.timeoutMs ?? 30_000 } : null;
    fe.on('close', (err) => this.#onClose(err));
    for (const q of queues) {
      q.unsubscribe.push(
        q.call.subscribe(() => {
          q.syncReaps = 0;
          this.#reap(q);
        }),
      );
      q.unsubscribe.push(q.err.subscribe(() => this.#failAll(new VhostUserError('PROTOCOL', `the back-end signalled an error on vring ${q.index}`))));
    }
    if (this.#ioTimeoutMs > 0) {
      this.#sweep = setInterval(() => this.#checkTimeouts(), Math.min(1000, this.#ioTimeoutMs));
      this.#sweep.unref();
    }
  }

  /** Connects to the back-end at `path` and sets the device up. */
  static async connect(path: string, options: VirtioBlkDriverOptions = {}): Promise<VirtioBlkDriver> {
    const fe = await VhostUserFrontend.connect(path, options);
    try {
      return await VirtioBlkDriver.open(fe, options);
    } catch (err) {
      fe.close();
      fe.releaseMemory();
      throw err;
    }
  }

  /** The features the driver asks for with these options (before `& offered`). */
  static #wantedFeatures(o: VirtioBlkDriverOptions, packed: boolean): bigint {
    let wanted = bit(VF.VERSION_1);
    for (const b of BLK_FEATURES) wanted |= bit(b);
    if (o.eventIdx !== false) wanted |= bit(VF.EVENT_IDX);
    if (o.indirect !== false) wanted |= bit(VF.INDIRECT_DESC);
    if (packed) wanted |= bit(VF.RING_PACKED);
    if (o.iommu) wanted |= bit(VF.ACCESS_PLATFORM);
    return wanted;
  }

  /** The handshake options these driver options give. */
  static #handshakeOptions(o: VirtioBlkDriverOptions, queues: number): HandshakeOptions {
    return { queues, config: 'require', ...(o.iommu ? { iommu: o.iommu } : {}), ...(o.iommuPageSize !== undefined ? { iommuPageSize: o.iommuPageSize } : {}) };
  }

  /** GET_INFLIGHT_FD, then SET_INFLIGHT_FD with it (QEMU's first start), when offered and wanted. */
  static async #newInflight(fe: VhostUserFrontend, o: VirtioBlkDriverOptions, queues: number, size: number): Promise<InflightInfo | null> {
    if (o.inflight === false || !fe.hasProtocol(PF.INFLIGHT_SHMFD)) return null;
    const inflight = await fe.getInflightFd(queues, size);
    if (!inflight.memory) return null;
    try {
      await fe.setInflightFd(inflight);
    } catch (err) {
      inflight.memory.close();
      throw err;
    }
    return inflight;
  }

  /** The seed's vring start for one of our queues, then DRIVER_OK after the last (by the caller). */
  static #setupRing(fe: VhostUserFrontend, q: BlkQueue, base?: number): Promise<void> {
    const r = q.ringOptions;
    return fe.setupVring(q.index, { size: r.size, desc: r.desc, driver: r.driver, device: r.device, kick: q.kick, call: q.call, err: q.err, ...(base !== undefined ? { base } : {}) });
  }

  /** Sets the device up on a connected front-end (which the driver then owns). */
  static async open(fe: VhostUserFrontend, o: VirtioBlkDriverOptions = {}): Promise<VirtioBlkDriver> {
    const want = o.queues ?? 1;
    await fe.handshake(VirtioBlkDriver.#handshakeOptions(o, want));
    const offered = fe.offeredFeatures;
    const packed = o.packed === true || ((o.packed ?? 'auto') === 'auto' && (offered & bit(VF.RING_PACKED)) !== 0n);
    if (packed && (offered & bit(VF.RING_PACKED)) === 0n) throw new VhostUserError('UNSUPPORTED', 'packed rings asked for; the back-end does not offer RING_PACKED');
    if ((offered & bit(VF.VERSION_1)) === 0n) throw new VhostUserError('UNSUPPORTED', 'the back-end does not offer VIRTIO_F_VERSION_1');
    const wanted = VirtioBlkDriver.#wantedFeatures(o, packed);
    const status = fe.hasProtocol(PF.STATUS);
    const config = await VirtioBlkDriver.#negotiateFeatures(fe, wanted);
    const hasMq = fe.hasFeature(BlkFeature.MQ);
    const devQueues = hasMq ? Math.max(1, config.numQueues) : 1;
    if (want > devQueues) throw new VhostUserError('UNSUPPORTED', `${want} queues asked for; the device has ${devQueues}`);
    const size = o.queueSize ?? 128;
    const eventIdx = fe.hasFeature(VF.EVENT_IDX);
    const indirect = fe.hasFeature(VF.INDIRECT_DESC);
    let maxTransfer = o.maxTransfer ?? 1 << 20;
    if (fe.hasFeature(BlkFeature.SIZE_MAX) && config.sizeMax > 0) maxTransfer = Math.min(maxTransfer, Math.floor(config.sizeMax / SECTOR) * SECTOR);
    // Rings, then per-queue request slots, in one region; the DMA pool in another.
    const layout = ringLayout(size, packed, indirect ? 4 : 0);
    const perQueue = layout.bytes + Math.ceil((SLOT * size) / 4096) * 4096;
    const rings = SharedMemory.create(perQueue * want, { name: 'vdevkit-blk-rings' });
    const dmaBytes = Math.max(o.dmaBytes ?? 16 << 20, maxTransfer);
    let dma: SharedMemory;
    try {
      dma = SharedMemory.create(Math.ceil(dmaBytes / 4096) * 4096, { name: 'vdevkit-blk-dma' });
    } catch (err) {
      rings.close();
      throw err;
    }
    fe.addMemory(rings, 0);
    const dmaRegion = fe.addMemory(dma);
    await fe.syncMemory();
    const inflight = await VirtioBlkDriver.#newInflight(fe, o, want, size);
    const queues: BlkQueue[] = [];
    try {
      for (let i = 0; i < want; i++) {
        const base = i * perQueue;
        const ringOptions: DriverQueueOptions = {
          memory: fe.memory,
          size,
          packed,
          desc: base + layout.desc,
          driver: base + layout.driver,
          device: base + layout.device,
          eventIdx,
          indirect,
          indirectTables: indirect ? base + layout.indirectTables : undefined,
          indirectMax: 4,
        };
        const hdrGpa = base + layout.bytes;
        const q = new BlkQueue(i, ringOptions, hdrGpa, rings.subarray(hdrGpa, SLOT * size));
        queues.push(q);
        await VirtioBlkDriver.#setupRing(fe, q);
      }
      if (status) await fe.setStatus(STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    } catch (err) {
      for (const q of queues) {
        q.kick.close();
        q.call.close();
        q.err.close();
      }
      inflight?.memory?.close();
      throw err;
    }
    return new VirtioBlkDriver(fe, config, queues, dma, dmaRegion.guestPhysAddr, inflight, o, maxTransfer, wanted);
  }

  /** The inflight region the back-end keeps its state in (kept across reconnects), or null. */
  get inflightRegion(): InflightInfo | null {
    return this.#inflight;
  }

  /** Whether the driver is waiting for its back-end to come back. */
  get reconnecting(): boolean {
    return this.#reconnecting;
  }

  // ---- reconnect ------------------------------------------------------------

  #onClose(err: VhostUserError): void {
    if (this.#reconnecting) return; // an attempt's connection: the loop sees it
    // A front-end made from a socket has nowhere to reconnect to.
    if (this.#closing || this.#error || !this.#reconnect || err.code !== 'DISCONNECTED' || this.frontend.reconnectPath === null) {
      this.#failAll(err);
      return;
    }
    this.#reconnecting = true;
    void this.#reconnectLoop(err);
  }

  async #reconnectLoop(reason: VhostUserError): Promise<void> {
    const r = this.#reconnect!;
    const fe = this.frontend;
    // What the back-end completed before it went away is ours already.
    for (const q of this.#queues) this.#reap(q);
    if (this.#error) return;
    this.emit('disconnected', reason);
    const deadline = Date.now() + r.timeoutMs;
    let attempts = 0;
    let last: Error = reason;
    while (!this.#closing && !this.#error) {
      const left = deadline - Date.now();
      if (left <= 0 || attempts >= r.maxAttempts) {
        const timedOut = left <= 0;
        this.#giveUp(
          new VhostUserReconnectError(
            timedOut ? 'TIMEOUT' : 'DISCONNECTED',
            `the back-end did not come back ${timedOut ? `in ${r.timeoutMs} ms` : `in ${attempts} attempt(s)`} (${attempts} attempt(s); last: ${last.message})`,
            attempts,
            last,
          ),
        );
        return;
      }
      await sleep(Math.min(r.delayMs, left));
      if (this.#closing || this.#error) break;
      attempts++;
      // An attempt that hangs (a back-end that accepts and never answers) is cut at the deadline.
      const outOfTime = (): VhostUserError => new VhostUserError('TIMEOUT', `reconnect: no working back-end in ${r.timeoutMs} ms`);
      let cutFired = false;
      const cut = setTimeout(() => {
        cutFired = true;
        fe.close(outOfTime());
      }, Math.max(1, deadline - Date.now()));
      try {
        await fe.reconnect();
        if (cutFired) throw outOfTime();
        if (this.#closing || this.#error) {
          clearTimeout(cut);
          fe.close();
          return;
        }
        const { byBackend, pending } = await this.#resume();
        clearTimeout(cut);
        if (fe.closed) throw fe.closeReason ?? new VhostUserError('DISCONNECTED', 'closed during the reconnect');
        if (this.#closing || this.#error) {
          fe.close();
          return;
        }
        this.#restart(byBackend, attempts, pending);
        return;
      } catch (err) {
        clearTimeout(cut);
        last = err as Error;
        fe.close();
        if (err instanceof VhostUserReconnectError) {
          this.#giveUp(err);
          return;
        }
      }
    }
  }

  #giveUp(err: VhostUserError): void {
    this.#reconnecting = false;
    this.#failAll(err);
    this.frontend.close(err);
  }

  /**
   * One reconnect's set-up on the new connection: the same features, queues
   * and disk, the memory table, then the inflight region given back (true:
   * the back-end resubmits) or, without one, fresh rings (false: the driver
   * resubmits).
   */
  async #resume(): Promise<{ byBackend: boolean; pending: number }> {
    const fe = this.frontend;
    const n = this.#queues.length;
    const other = (what: string): VhostUserReconnectError => new VhostUserReconnectError('UNSUPPORTED', `the back-end came back as another device: ${what}`, 0);
    let config: BlkConfig;
    try {
      await fe.handshake(VirtioBlkDriver.#handshakeOptions(this.#options, n));
      const offered = fe.offeredFeatures;
      const f = (offered & this.#wanted) | (offered & bit(VF.PROTOCOL_FEATURES));
      if (f !== this.features) throw other(`features 0x${f.toString(16)} instead of 0x${this.features.toString(16)}`);
      config = await VirtioBlkDriver.#negotiateFeatures(fe, this.#wanted);
    } catch (err) {
      if (err instanceof VhostUserError && err.code === 'UNSUPPORTED' && !(err instanceof VhostUserReconnectError)) throw other(err.message);
      throw err;
    }
    if (config.capacity !== this.config.capacity) throw other(`capacity ${config.capacity} sectors instead of ${this.config.capacity}`);
    if (fe.hasFeature(BlkFeature.MQ) && Math.max(1, config.numQueues) < n) throw other(`${config.numQueues} queues (we use ${n})`);
    await fe.syncMemory();
    const byBackend = !this.#ringsReset && this.#inflight !== null && fe.hasProtocol(PF.INFLIGHT_SHMFD);
    if (byBackend) {
      await fe.setInflightFd(this.#inflight!);
    } else {
      // Fresh rings: what the rings held is carried over and made available again once we are up.
      this.#ringsReset = true;
      this.#inflight?.memory?.close();
      this.#inflight = null;
      for (const q of this.#queues) {
        q.carried.push(...q.ring.tokens());
        q.ring = createDriverQueue<Pending>(q.ringOptions);
      }
      this.#inflight = await VirtioBlkDriver.#newInflight(fe, this.#options, n, this.queueSize);
    }
    // Counted before the rings start: completions may come in while later rings are set up.
    let pending = 0;
    for (const q of this.#queues) pending += q.ring.inFlight + q.carried.length;
    for (const q of this.#queues) {
      // Split: the used index in the ring, as QEMU restarts a ring whose GET_VRING_BASE failed
      // (a back-end with the inflight region takes its own state from there). Fresh rings: 0.
      const base = byBackend && !this.packed ? new DataView(fe.memory.view(q.ringOptions.device + 2, 2)!.slice().buffer).getUint16(0, true) : undefined;
      await VirtioBlkDriver.#setupRing(fe, q, base);
    }
    if (fe.hasProtocol(PF.STATUS)) await fe.setStatus(STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    return { byBackend, pending };
  }

  /** SET_STATUS and SET_FEATURES after a handshake, then the config. */
  static async #negotiateFeatures(fe: VhostUserFrontend, wanted: bigint): Promise<BlkConfig> {
    const status = fe.hasProtocol(PF.STATUS);
    if (status) await fe.setStatus(STATUS_ACK | STATUS_DRIVER);
    await fe.setFeatures(wanted);
    if ((wanted & bit(VF.ACCESS_PLATFORM)) !== 0n && !fe.iommuEnabled) {
      const offers = (fe.offeredFeatures & bit(VF.ACCESS_PLATFORM)) !== 0n;
      throw new VhostUserError('UNSUPPORTED', `an IOMMU asked for: the back-end ${offers ? 'offers ACCESS_PLATFORM but not BACKEND_REQ and REPLY_ACK' : 'does not offer VIRTIO_F_ACCESS_PLATFORM'}`);
    }
    if (status) await fe.setStatus(STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK);
    return decodeBlkConfig(await fe.getConfig(0, BLK_CONFIG_SIZE));
  }

  /** Up again: pending requests restart their clocks; carried ones go back on the rings first; a kick per ring. */
  #restart(byBackend: boolean, attempts: number, pending: number): void {
    this.#reconnecting = false;
    const now = Date.now();
    for (const q of this.#queues) {
      for (const p of q.ring.tokens()) p.started = now;
      const carried = q.carried.splice(0).sort((a, b) => a.seq - b.seq);
      for (const p of carried) {
        p.started = now;
        if (!this.#publish(q, p)) p.reject(new VhostUserError('INVALID', `vring ${q.index}: no room to make a pending request available again`));
      }
    }
    for (const q of this.#queues) {
      this.#pump(q);
      // The back-end may have requests to take that no kick of ours announced (the avail ring as it was).
      if (!q.kick.closed) q.kick.signal();
    }
    this.emit('reconnected', { attempts, resubmittedBy: byBackend ? 'backend' : 'driver', pending });
  }

  /** Bytes of the disk (config capacity x 512). */
  get size(): number {
    return Number(this.config.capacity) * SECTOR;
  }

  get numQueues(): number {
    return this.#queues.length;
  }

  get readOnly(): boolean {
    return this.frontend.hasFeature(BlkFeature.RO);
  }

  /** Requests in flight on the rings, and waiting for room. */
  get inFlight(): number {
    let n = 0;
    for (const q of this.#queues) n += q.ring.inFlight + q.waiting.length;
    return n;
  }

  #queue(q: number | undefined): BlkQueue {
    if (q === undefined) {
      const r = this.#queues[this.#rr]!;
      this.#rr = (this.#rr + 1) % this.#queues.length;
      return r;
    }
    const r = this.#queues[q];
    if (!r) throw new RangeError(`queue ${q} does not exist (${this.#queues.length})`);
    return r;
  }

  #checkRange(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset % SECTOR !== 0 || length % SECTOR !== 0) {
      throw new RangeError(`offset ${offset} and length ${length} must be multiples of ${SECTOR}`);
    }
    if (offset + length > this.size) throw new RangeError(`[${offset}, +${length}) is past the end of the ${this.size}-byte disk`);
  }

  #submit(q: BlkQueue, p: Omit<Pending, 'resolve' | 'reject' | 'slot' | 'dma' | 'dmaLen' | 'started' | 'seq'>): Promise<Buffer | undefined> {
    if (this.#error) return Promise.reject(this.#error);
    if (this.#closing) return Promise.reject(new VhostUserError('DISCONNECTED', 'the driver is closing'));
    return new Promise((resolve, reject) => {
      // Every field in one literal: one object shape for every request (no spread).
      const full: Pending = { type: p.type, sector: p.sector, data: p.data, readLen: p.readLen, segment: p.segment, resolve, reject, slot: -1, dma: -1, dmaLen: 0, started: 0, seq: this.#seq++ };
      q.waiting.push(full);
      this.#pump(q);
    });
  }

  /** Moves waiting requests onto the ring while there is room (not while the back-end is away). */
  #pump(q: BlkQueue): void {
    while (q.waiting.length > 0 && !this.#reconnecting) {
      const p = q.waiting[0]!;
      const dataLen = p.data ? p.data.length : p.readLen;
      const nbufs = dataLen > 0 || p.segment ? 3 : 2;
      if (q.slots.length === 0 || !q.ring.canAdd(nbufs)) break;
      let dma = -1;
      if (dataLen > 0) {
        dma = this.#extents.alloc(dataLen);
        if (dma < 0) break;
      }
      q.waiting.shift();
      p.slot = q.slots.pop()!;
      p.dma = dma;
      p.dmaLen = dataLen;
      if (p.data) this.#dma.bytes.set(p.data, dma);
      this.#publish(q, p);
    }
    this.#scheduleKick(q);
  }

  /** Writes the request's header (its slot and DMA extent taken) and makes its chain available. */
  #publish(q: BlkQueue, p: Pending): boolean {
    const slot = p.slot;
    const h = q.hdr.subarray(slot * SLOT, slot * SLOT + SLOT);
    const dv = new DataView(h.buffer, h.byteOffset, SLOT);
    dv.setUint32(0, p.type, true);
    dv.setUint32(4, 0, true);
    dv.setBigUint64(8, BigInt(p.sector), true);
    h[32] = 0xff;
    const gpa = q.hdrGpa + slot * SLOT;
    const bufs: DriverBuffer[] = [{ addr: gpa, len: 16, write: false }];
    if (p.segment) {
      dv.setBigUint64(16, BigInt(p.segment.sector), true);
      dv.setUint32(24, p.segment.sectors, true);
      dv.setUint32(28, p.segment.flags, true);
      bufs.push({ addr: gpa + 16, len: 16, write: false });
    } else if (p.dmaLen > 0) {
      bufs.push({ addr: this.#dmaGpa + p.dma, len: p.dmaLen, write: p.data === null });
    }
    bufs.push({ addr: gpa + 32, len: 1, write: true });
    p.started = Date.now();
    return q.ring.add(bufs, p);
  }

  #scheduleKick(q: BlkQueue): void {
    if (q.kickScheduled) return;
    q.kickScheduled = true;
    queueMicrotask(() => {
      q.kickScheduled = false;
      if (q.kick.closed) return;
      if (!q.ring.needsKick()) return;
      q.kick.signal();
      // A back-end on our CPU often ran inside that write (the kernel switches to the woken task):
      // take what it completed now rather than after a turn of the event loop for its call. A
      // bounded number of times in a row, so that the loop still turns.
      if (q.syncReaps < SYNC_REAPS) {
        q.syncReaps++;
        this.#reap(q);
      }
    });
  }

  #reap(q: BlkQueue): void {
    try {
      do {
        for (let u = q.ring.getUsed(); u !== null; u = q.ring.getUsed()) this.#complete(q, u.token);
      } while (q.ring.enableInterrupts());
    } catch (err) {
      this.#failAll(new VhostUserError('PROTOCOL', `vring ${q.index}: ${(err as Error).message}`));
      return;
    }
    this.#pump(q);
  }

  #complete(q: BlkQueue, p: Pending): void {
    const status = q.hdr[p.slot * SLOT + 32]!;
    let out: Buffer | undefined;
    if (status === BlkStatus.OK && p.data === null && p.dmaLen > 0) out = Buffer.from(this.#dma.bytes.subarray(p.dma, p.dma + p.dmaLen));
    if (p.dma >= 0) this.#extents.free(p.dma, p.dmaLen);
    q.slots.push(p.slot);
    if (status !== BlkStatus.OK) p.reject(new BlkIoError(opName(p.type), status));
    else p.resolve(out);
  }

  #checkTimeouts(): void {
    if (this.#reconnecting) return; // the reconnect has its own limit
    const limit = Date.now() - this.#ioTimeoutMs;
    for (const q of this.#queues) {
      for (const p of q.ring.tokens()) {
        if (p.started < limit) {
          const err = new VhostUserError('TIMEOUT', `a ${opName(p.type)} request on vring ${q.index} was not completed in ${this.#ioTimeoutMs} ms`);
          this.#failAll(err);
          this.frontend.close(err);
          return;
        }
      }
    }
  }

  #failAll(err: Error): void {
    this.#error ??= err;
    for (const q of this.#queues) {
      // Buffers still on the ring stay allocated: the back-end may yet write them.
      for (const p of q.ring.tokens()) p.reject(err);
      for (const p of q.carried.splice(0)) p.reject(err);
      for (const p of q.waiting.splice(0)) p.reject(err);
    }
  }

  // ---- the Promise API ---------------------------------------------------

  /** Reads `length` bytes at `offset` (multiples of 512). Large reads are split. */
  async read(offset: number, length: number, options: { queue?: number } = {}): Promise<Buffer> {
    this.#checkRange(offset, length);
    if (length <= this.maxTransfer) {
      return (await this.#submit(this.#queue(options.queue), { type: BlkReq.IN, sector: offset / SECTOR, data: null, readLen: length, segment: null }))!;
    }
    const parts: Promise<Buffer>[] = [];
    for (let at = 0; at < length; at += this.maxTransfer) parts.push(this.read(offset + at, Math.min(this.maxTransfer, length - at), options));
    return Buffer.concat(await Promise.all(parts));
  }

  /** Writes `data` at `offset` (multiples of 512). */
  async write(offset: number, data: Uint8Array, options: { queue?: number } = {}): Promise<void> {
    this.#checkRange(offset, data.length);
    const parts: Promise<unknown>[] = [];
    for (let at = 0; at < data.length; at += this.maxTransfer) {
      const chunk = data.subarray(at, Math.min(data.length, at + this.maxTransfer));
      parts.push(this.#submit(this.#queue(options.queue), { type: BlkReq.OUT, sector: (offset + at) / SECTOR, data: chunk, readLen: 0, segment: null }));
    }
    await Promise.all(parts);
  }

  /** FLUSH (when the device has FLUSH; otherwise there is no write cache to flush). */
  async flush(options: { queue?: number } = {}): Promise<void> {
    if (!this.frontend.hasFeature(BlkFeature.FLUSH)) return;
    await this.#submit(this.#queue(options.queue), { type: BlkReq.FLUSH, sector: 0, data: null, readLen: 0, segment: null });
  }

  async #zeroOp(type: number, feature: number, max: number, offset: number, length: number, flags: number, queue: number | undefined): Promise<void> {
    this.#checkRange(offset, length);
    if (!this.frontend.hasFeature(feature)) throw new BlkIoError(opName(type), BlkStatus.UNSUPP);
    const maxSectors = max > 0 ? max : 0xffffffff;
    const parts: Promise<unknown>[] = [];
    for (let s = offset / SECTOR, left = length / SECTOR; left > 0; ) {
      const n = Math.min(left, maxSectors);
      parts.push(this.#submit(this.#queue(queue), { type, sector: 0, data: null, readLen: 0, segment: { sector: s, sectors: n, flags } }));
      s += n;
      left -= n;
    }
    await Promise.all(parts);
  }

  /** DISCARD [offset, offset + length) (split at max_discard_sectors). */
  discard(offset: number, length: number, options: { queue?: number } = {}): Promise<void> {
    return this.#zeroOp(BlkReq.DISCARD, BlkFeature.DISCARD, this.config.maxDiscardSectors, offset, length, 0, options.queue);
  }

  /** WRITE_ZEROES [offset, offset + length); `unmap` lets the device deallocate. */
  writeZeroes(offset: number, length: number, options: { queue?: number; unmap?: boolean } = {}): Promise<void> {
    return this.#zeroOp(BlkReq.WRITE_ZEROES, BlkFeature.WRITE_ZEROES, this.config.maxWriteZeroesSectors, offset, length, options.unmap ? 1 : 0, options.queue);
  }

  /** GET_ID: the device's serial (up to 20 bytes, NUL-terminated when shorter). */
  async getId(options: { queue?: number } = {}): Promise<string> {
    const b = (await this.#submit(this.#queue(options.queue), { type: BlkReq.GET_ID, sector: 0, data: null, readLen: ID_BYTES, segment: null }))!;
    const nul = b.indexOf(0);
    return b.subarray(0, nul < 0 ? ID_BYTES : nul).toString('latin1');
  }

  /**
   * The batch API: every request is queued in the same turn (one kick per
   * queue); results in order (a read's data, else undefined), each an Error
   * when that request failed.
   */
  async submitBatch(requests: readonly BlkRequest[], options: { queue?: number } = {}): Promise<(Buffer | undefined | Error)[]> {
    const ps = requests.map((r): Promise<Buffer | string | void> => {
      switch (r.op) {
        case 'read':
          return this.read(r.offset, r.length, options);
        case 'write':
          return this.write(r.offset, r.data, options);
        case 'flush':
          return this.flush(options);
        case 'discard':
          return this.discard(r.offset, r.length, options);
        case 'writeZeroes':
          return this.writeZeroes(r.offset, r.length, { ...options, unmap: r.unmap });
        case 'getId':
          return this.getId(options);
      }
    });
    const settled = await Promise.allSettled(ps);
    return settled.map((s) => (s.status === 'rejected' ? (s.reason as Error) : typeof s.value === 'string' ? Buffer.from(s.value) : (s.value ?? undefined)));
  }

  /**
   * Stops the rings (GET_VRING_BASE) when the back-end is still there,
   * fails what is in flight, disconnects, and frees memory and eventfds.
   */
  close(): Promise<void> {
    this.#closing ??= (async () => {
      if (this.#sweep) clearInterval(this.#sweep);
      const fe = this.frontend;
      // Mid-reconnect the back-end has no rings of ours to stop.
      if (!fe.closed && !this.#reconnecting) {
        for (const q of this.#queues) {
          try {
            await fe.stopVring(q.index);
          } catch {
            break;
          }
        }
      }
      this.#failAll(new VhostUserError('DISCONNECTED', 'the driver was closed'));
      fe.close();
      for (const q of this.#queues) {
        for (const u of q.unsubscribe) u();
        q.kick.close();
        q.call.close();
        q.err.close();
      }
      fe.releaseMemory();
      this.#inflight?.memory?.close();
    })();
    return this.#closing;
  }
}

const OP_NAMES: Record<number, string> = {
  [BlkReq.IN]: 'read',
  [BlkReq.OUT]: 'write',
  [BlkReq.FLUSH]: 'flush',
  [BlkReq.GET_ID]: 'get-id',
  [BlkReq.DISCARD]: 'discard',
  [BlkReq.WRITE_ZEROES]: 'write-zeroes',
};

function opName(type: number): string {
  return OP_NAMES[type] ?? `request type ${type}`;
}
