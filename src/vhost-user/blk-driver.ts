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
 */
import { EventFd } from '../sys/eventfd.js';
import { SharedMemory } from '../sys/shm.js';
import { createDriverQueue } from '../virtio/driver-queue.js';
import { ringLayout, type DriverBuffer, type DriverQueue } from '../virtio/driver.js';
import { BlkFeature, BlkReq, BlkStatus, SECTOR } from '../devices/vhost-user-blk.js';
import { ProtocolFeature as PF, VirtioFeature as VF, bit } from './constants.js';
import { VhostUserError } from './errors.js';
import { VhostUserFrontend, type InflightInfo, type VhostUserFrontendOptions } from './frontend.js';

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
}

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
  readonly ring: DriverQueue<Pending>;
  readonly kick = EventFd.create();
  readonly call = EventFd.create();
  readonly err = EventFd.create();
  readonly waiting: Pending[] = [];
  readonly slots: number[] = [];
  readonly hdrGpa: number;
  readonly hdr: Uint8Array;
  unsubscribe: (() => void)[] = [];
  kickScheduled = false;
  constructor(index: number, ring: DriverQueue<Pending>, hdrGpa: number, hdr: Uint8Array) {
    this.index = index;
    this.ring = ring;
    this.hdrGpa = hdrGpa;
    this.hdr = hdr;
    for (let i = ring.size - 1; i >= 0; i--) this.slots.push(i);
  }
}

export class VirtioBlkDriver {
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
  readonly #inflight: InflightInfo | null;
  readonly #ioTimeoutMs: number;
  #sweep: NodeJS.Timeout | null = null;
  #rr = 0;
  #error: Error | null = null;
  #closing: Promise<void> | null = null;

  private constructor(fe: VhostUserFrontend, config: BlkConfig, queues: BlkQueue[], dma: SharedMemory, dmaGpa: number, inflight: InflightInfo | null, o: VirtioBlkDriverOptions, maxTransfer: number) {
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
    this.maxTransfer = maxTransfer;
    fe.on('close', (err) => this.#failAll(err));
    for (const q of queues) {
      q.unsubscribe.push(q.call.subscribe(() => this.#reap(q)));
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

  /** Sets the device up on a connected front-end (which the driver then owns). */
  static async open(fe: VhostUserFrontend, o: VirtioBlkDriverOptions = {}): Promise<VirtioBlkDriver> {
    const want = o.queues ?? 1;
    await fe.handshake({ queues: want, config: 'require' });
    const offered = fe.offeredFeatures;
    const packed = o.packed === true || ((o.packed ?? 'auto') === 'auto' && (offered & bit(VF.RING_PACKED)) !== 0n);
    if (packed && (offered & bit(VF.RING_PACKED)) === 0n) throw new VhostUserError('UNSUPPORTED', 'packed rings asked for; the back-end does not offer RING_PACKED');
    if ((offered & bit(VF.VERSION_1)) === 0n) throw new VhostUserError('UNSUPPORTED', 'the back-end does not offer VIRTIO_F_VERSION_1');
    let wanted = bit(VF.VERSION_1);
    for (const b of [BlkFeature.SIZE_MAX, BlkFeature.SEG_MAX, BlkFeature.GEOMETRY, BlkFeature.RO, BlkFeature.BLK_SIZE, BlkFeature.FLUSH, BlkFeature.TOPOLOGY, BlkFeature.CONFIG_WCE, BlkFeature.MQ, BlkFeature.DISCARD, BlkFeature.WRITE_ZEROES]) wanted |= bit(b);
    if (o.eventIdx !== false) wanted |= bit(VF.EVENT_IDX);
    if (o.indirect !== false) wanted |= bit(VF.INDIRECT_DESC);
    if (packed) wanted |= bit(VF.RING_PACKED);
    const status = fe.hasProtocol(PF.STATUS);
    if (status) await fe.setStatus(STATUS_ACK | STATUS_DRIVER);
    await fe.setFeatures(wanted);
    if (status) await fe.setStatus(STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK);
    const config = decodeBlkConfig(await fe.getConfig(0, BLK_CONFIG_SIZE));
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
    let inflight: InflightInfo | null = null;
    if (o.inflight !== false && fe.hasProtocol(PF.INFLIGHT_SHMFD)) {
      inflight = await fe.getInflightFd(want, size);
      if (inflight.memory) await fe.setInflightFd(inflight);
    }
    const queues: BlkQueue[] = [];
    try {
      for (let i = 0; i < want; i++) {
        const base = i * perQueue;
        const ring = createDriverQueue<Pending>({
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
        });
        const hdrGpa = base + layout.bytes;
        const q = new BlkQueue(i, ring, hdrGpa, rings.subarray(hdrGpa, SLOT * size));
        queues.push(q);
        await fe.setupVring(i, { size, desc: base + layout.desc, driver: base + layout.driver, device: base + layout.device, kick: q.kick, call: q.call, err: q.err });
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
    return new VirtioBlkDriver(fe, config, queues, dma, dmaRegion.guestPhysAddr, inflight, o, maxTransfer);
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

  #submit(q: BlkQueue, p: Omit<Pending, 'resolve' | 'reject' | 'slot' | 'dma' | 'dmaLen' | 'started'>): Promise<Buffer | undefined> {
    if (this.#error) return Promise.reject(this.#error);
    if (this.#closing) return Promise.reject(new VhostUserError('DISCONNECTED', 'the driver is closing'));
    return new Promise((resolve, reject) => {
      const full: Pending = { ...p, resolve, reject, slot: -1, dma: -1, dmaLen: 0, started: 0 };
      q.waiting.push(full);
      this.#pump(q);
    });
  }

  /** Moves waiting requests onto the ring while there is room. */
  #pump(q: BlkQueue): void {
    while (q.waiting.length > 0) {
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
      const slot = q.slots.pop()!;
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
      } else if (dataLen > 0) {
        if (p.data) this.#dma.bytes.set(p.data, dma);
        bufs.push({ addr: this.#dmaGpa + dma, len: dataLen, write: p.data === null });
      }
      bufs.push({ addr: gpa + 32, len: 1, write: true });
      p.slot = slot;
      p.dma = dma;
      p.dmaLen = dataLen;
      p.started = Date.now();
      q.ring.add(bufs, p);
    }
    this.#scheduleKick(q);
  }

  #scheduleKick(q: BlkQueue): void {
    if (q.kickScheduled) return;
    q.kickScheduled = true;
    queueMicrotask(() => {
      q.kickScheduled = false;
      if (!q.kick.closed && q.ring.needsKick()) q.kick.signal();
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
      if (!fe.closed) {
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
