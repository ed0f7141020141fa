/**
 * VirtioPciBlkDriver: a userspace virtio-blk driver for a virtio PCI device
 * behind a vfio-user socket (`vdevkit serve virtio-blk --file disk.img`, or
 * any other vfio-user virtio-blk server), on the transport of pci-driver.ts
 * and the driver rings of driver*.ts: what VirtioBlkDriver
 * (src/vhost-user/blk-driver.ts) is over vhost-user, over vfio-user.
 *
 *   const disk = await VirtioPciBlkDriver.connect('/tmp/vblk.sock', { queues: 2 });
 *   await disk.write(0, data); const back = await disk.read(0, data.length);
 *   await disk.flush(); console.log(await disk.getId(), disk.capacity); await disk.close();
 *
 * Requests are virtio_blk_req chains (16-byte header, data, status byte) in
 * client memory DMA-mapped into the device: a header area with one 32-byte
 * slot per ring entry and a DMA pool for the data, allocated in pages. Many
 * requests may be in flight on each queue; those beyond the ring or the pool
 * wait in order. Every request made in one turn of the event loop is
 * published before one kick decision per queue (EVENT_IDX or the device's
 * NO_NOTIFY flag decides). Completions come with the queue's MSI-X
 * interrupt.
 *
 * Failures are typed: a device status other than OK is a BlkIoError (the
 * request's own failure); the connection going away fails every pending
 * request with VirtioPciError DISCONNECTED, a device that breaks a ring's
 * rules or sets DEVICE_NEEDS_RESET with DEVICE_ERROR, a request not
 * completed within `ioTimeoutMs` with TIMEOUT; afterwards every request
 * fails the same way at once.
 */
import type { EventFd } from '../sys/index.js';
import type { VfioUserClientOptions } from '../vfio-user/client.js';
import { BlkFeature, BlkReq, BlkStatus, SECTOR } from '../devices/vhost-user-blk.js';
import { VIRTIO_ID_BLOCK } from '../devices/virtio-blk-pci.js';
import { VIRTIO_MSI_NO_VECTOR, VirtioStatus } from '../devices/virtio-pci.js';
import { BlkIoError, decodeBlkConfig, type BlkConfig, type VirtioBlkDriverOptions } from '../vhost-user/blk-driver.js';
import { VirtioPciError, VirtioPciTransport, type DmaRegion, type VirtioPciQueue, type VirtioPciTransportOptions } from './pci-driver.js';

/**
 * The ring and request options are VirtioBlkDriver's (queues, queueSize,
 * packed, eventIdx, indirect, dmaBytes, maxTransfer, ioTimeoutMs: a request
 * not completed in that time fails the driver with TIMEOUT).
 */
export interface VirtioPciBlkDriverOptions
  extends VirtioPciTransportOptions,
    Pick<VirtioBlkDriverOptions, 'queues' | 'queueSize' | 'packed' | 'eventIdx' | 'indirect' | 'dmaBytes' | 'maxTransfer' | 'ioTimeoutMs'> {
  /** Options of the vfio-user client connect() makes. */
  client?: VfioUserClientOptions;
}

export interface VirtioPciBlkStats {
  /** Requests completed (any status). */
  completed: number;
  /** Notifications written to the notify area. */
  kicks: number;
  /** Queue interrupts (MSI-X eventfd wake-ups). */
  interrupts: number;
  /** Config interrupts. */
  configInterrupts: number;
}

/** One request: what to send, and, while on a ring, its header slot and pool pages. */
interface BlkRequestState {
  type: number;
  sector: number;
  /** Device-readable data (OUT), or null. */
  out: Uint8Array | null;
  /** Bytes the device writes back (IN, GET_ID). */
  inLen: number;
  /** DISCARD / WRITE_ZEROES: the one virtio_blk_discard_write_zeroes segment. */
  segment: { sector: number; sectors: number; flags: number } | null;
  resolve(v: Buffer | undefined): void;
  reject(e: Error): void;
  slot: number;
  poolAt: number;
  started: number;
}

/**
 * Header slot: virtio_blk_req header (type u32, reserved u32, sector u64) at 0,
 * a discard / write-zeroes segment (sector u64, num_sectors u32, flags u32) at 16, status byte at 32.
 */
const SLOT_BYTES = 64;
const SEGMENT_AT = 16;
const STATUS_AT = 32;
/** virtio_blk_discard_write_zeroes flags: bit 0 unmap (WRITE_ZEROES only). */
const WRITE_ZEROES_UNMAP = 1;
const ID_BYTES = 20;
const BLK_CONFIG_BYTES = 60;
const PAGE = 4096;

/** Pages of the DMA pool: a used-byte map searched first-fit from a roving start. */
class PagePool {
  readonly #used: Uint8Array;
  #rover = 0;
  constructor(bytes: number) {
    this.#used = new Uint8Array(Math.floor(bytes / PAGE));
  }

  /** Byte offset of `bytes` (rounded up to pages) of consecutive free pages, or -1. */
  take(bytes: number): number {
    const want = Math.max(1, Math.ceil(bytes / PAGE));
    const pages = this.#used.length;
    let start = this.#rover;
    for (let looked = 0; looked < pages + want; ) {
      if (start + want > pages) {
        looked += pages - start;
        start = 0;
        continue;
      }
      const busy = this.#used.subarray(start, start + want).indexOf(1);
      if (busy < 0) {
        this.#used.fill(1, start, start + want);
        this.#rover = (start + want) % pages;
        return start * PAGE;
      }
      looked += busy + 1;
      start += busy + 1;
    }
    return -1;
  }

  give(at: number, bytes: number): void {
    this.#used.fill(0, at / PAGE, at / PAGE + Math.max(1, Math.ceil(bytes / PAGE)));
  }
}

/** A request queue of ours: the device queue, its header slots, what waits for room. */
interface Lane {
  readonly queue: VirtioPciQueue<BlkRequestState>;
  readonly slots: number[];
  readonly waiting: BlkRequestState[];
  kickScheduled: boolean;
}

/** The blk features asked for (the ring features by option). */
const WANTED_BLK = [BlkFeature.SIZE_MAX, BlkFeature.SEG_MAX, BlkFeature.GEOMETRY, BlkFeature.RO, BlkFeature.BLK_SIZE, BlkFeature.FLUSH, BlkFeature.TOPOLOGY, BlkFeature.MQ, BlkFeature.DISCARD, BlkFeature.WRITE_ZEROES];
const F_INDIRECT_DESC = 28;
const F_EVENT_IDX = 29;
const F_VERSION_1 = 32;
const F_RING_PACKED = 34;
const bit = (n: number): bigint => 1n << BigInt(n);

const OPS: Record<number, string> = { [BlkReq.IN]: 'read', [BlkReq.OUT]: 'write', [BlkReq.FLUSH]: 'flush', [BlkReq.GET_ID]: 'get-id', [BlkReq.DISCARD]: 'discard', [BlkReq.WRITE_ZEROES]: 'write-zeroes' };

export class VirtioPciBlkDriver {
  readonly transport: VirtioPciTransport;
  readonly config: BlkConfig;
  readonly features: bigint;
  readonly packed: boolean;
  readonly queueSize: number;
  readonly maxTransfer: number;
  /** MSI-X vectors wired (vector 0: config; the queues share the rest); 0: INTx. */
  readonly vectors: number;
  readonly stats: VirtioPciBlkStats = { completed: 0, kicks: 0, interrupts: 0, configInterrupts: 0 };
  readonly #lanes: Lane[];
  readonly #headers: DmaRegion;
  readonly #pool: DmaRegion;
  readonly #pages: PagePool;
  readonly #ioTimeoutMs: number;
  #unsubscribe: (() => void)[] = [];
  #sweep: NodeJS.Timeout | null = null;
  #next = 0;
  #error: Error | null = null;
  #closing: Promise<void> | null = null;

  private constructor(t: VirtioPciTransport, config: BlkConfig, lanes: Lane[], headers: DmaRegion, pool: DmaRegion, irqs: EventFd[], maxTransfer: number, o: VirtioPciBlkDriverOptions) {
    this.transport = t;
    this.config = config;
    this.features = t.features;
    this.packed = t.hasFeature(F_RING_PACKED);
    this.queueSize = lanes[0]!.queue.ring.size;
    this.maxTransfer = maxTransfer;
    this.vectors = t.msixVectors > 0 ? irqs.length : 0;
    this.#lanes = lanes;
    this.#headers = headers;
    this.#pool = pool;
    this.#pages = new PagePool(pool.size);
    this.#ioTimeoutMs = o.ioTimeoutMs ?? 30_000;
    const onClose = (e: VirtioPciError): void => this.#failAll(e);
    // A notify that could not be posted: the requests behind it would never complete.
    const onError = (e: Error): void => this.#failAll(new VirtioPciError(t.client.closed ? 'DISCONNECTED' : 'REFUSED', `a queue notify was lost: ${e.message}`, { cause: e }));
    const onConfig = (): void => {
      this.stats.configInterrupts++;
      void this.#checkStatus();
    };
    t.on('close', onClose);
    t.on('config', onConfig);
    t.on('error', onError);
    this.#unsubscribe.push(() => t.off('close', onClose), () => t.off('config', onConfig), () => t.off('error', onError));
    // One subscription per eventfd: lanes sharing a vector are reaped together.
    for (const fd of new Set(lanes.map((l) => l.queue.interrupt!))) {
      const mine = lanes.filter((l) => l.queue.interrupt === fd);
      this.#unsubscribe.push(
        fd.subscribe(() => {
          this.stats.interrupts++;
          for (const l of mine) this.#reap(l);
        }),
      );
    }
    if (this.#ioTimeoutMs > 0) {
      this.#sweep = setInterval(() => this.#checkTimeouts(), Math.min(1000, this.#ioTimeoutMs));
      this.#sweep.unref();
    }
  }

  /** Connects to the vfio-user server at `socketPath` and brings the virtio-blk device up. */
  static async connect(socketPath: string, options: VirtioPciBlkDriverOptions = {}): Promise<VirtioPciBlkDriver> {
    return VirtioPciBlkDriver.open(await VirtioPciTransport.connect(socketPath, options), options);
  }

  /** Brings the virtio-blk device of a transport up (3.1.1); the driver owns the transport from now on (closed if this fails). */
  static async open(t: VirtioPciTransport, o: VirtioPciBlkDriverOptions = {}): Promise<VirtioPciBlkDriver> {
    try {
      return await VirtioPciBlkDriver.#open(t, o);
    } catch (e) {
      await t.close();
      throw e;
    }
  }

  static async #open(t: VirtioPciTransport, o: VirtioPciBlkDriverOptions): Promise<VirtioPciBlkDriver> {
    if (t.ids.virtioId !== VIRTIO_ID_BLOCK) throw new VirtioPciError('NOT_VIRTIO', `virtio device id ${t.ids.virtioId}, not a block device (${VIRTIO_ID_BLOCK})`);
    await t.reset();
    let wanted = bit(F_VERSION_1);
    for (const b of WANTED_BLK) wanted |= bit(b);
    if (o.eventIdx !== false) wanted |= bit(F_EVENT_IDX);
    if (o.indirect !== false) wanted |= bit(F_INDIRECT_DESC);
    // Features are read after DRIVER (3.1.1 step 4): the ring layout is chosen from what is offered.
    const packed = (await t.negotiate((offered) => {
      const p = o.packed === true || ((o.packed ?? 'auto') === 'auto' && (offered & bit(F_RING_PACKED)) !== 0n);
      if (p && (offered & bit(F_RING_PACKED)) === 0n) throw new VirtioPciError('FEATURES', 'packed rings asked for; the device does not offer VIRTIO_F_RING_PACKED');
      return p ? wanted | bit(F_RING_PACKED) : wanted;
    })) & bit(F_RING_PACKED);
    const cfgLen = Math.min(BLK_CONFIG_BYTES, t.deviceCfg?.length ?? 0);
    if (cfgLen < 8) throw new VirtioPciError('MISSING_CAP', `the device config is ${cfgLen} bytes: no capacity`);
    const config = decodeBlkConfig(await t.readConfig(0, cfgLen));
    if (config.capacity > BigInt(Math.floor(Number.MAX_SAFE_INTEGER / SECTOR))) throw new VirtioPciError('DEVICE_ERROR', `capacity ${config.capacity} sectors is implausible`);
    const want = o.queues ?? 1;
    const devQueues = Math.min(t.hasFeature(BlkFeature.MQ) ? Math.max(1, config.numQueues) : 1, await t.numQueues());
    if (!Number.isInteger(want) || want < 1 || want > devQueues) throw new VirtioPciError('QUEUE', `${want} queues asked for; the device has ${devQueues}`);
    let maxTransfer = o.maxTransfer ?? 1 << 20;
    if (t.hasFeature(BlkFeature.SIZE_MAX) && config.sizeMax > 0) maxTransfer = Math.min(maxTransfer, Math.floor(config.sizeMax / SECTOR) * SECTOR);
    if (maxTransfer < SECTOR) throw new VirtioPciError('DEVICE_ERROR', `a largest transfer of ${maxTransfer} bytes`);
    // Vector 0 for config; a vector per queue when there are enough, else the queues share vector 1 (or 0).
    // Without MSI-X: INTx, every queue on it (queue_msix_vector NO_VECTOR).
    const vectors = Math.min(t.msixVectors, 1 + want);
    const irqs = vectors > 0 ? await t.setupInterrupts(vectors) : [await t.setupIntx()];
    const maxSize = await t.maxQueueSize(0);
    let size = Math.min(o.queueSize ?? 128, maxSize);
    if (packed === 0n) size = 2 ** Math.floor(Math.log2(Math.max(1, size)));
    const headers = await t.allocate(SLOT_BYTES * size * want, 'vdevkit-pci-blk-headers');
    const pool = await t.allocate(Math.max(o.dmaBytes ?? 16 << 20, maxTransfer), 'vdevkit-pci-blk-dma');
    const lanes: Lane[] = [];
    for (let i = 0; i < want; i++) {
      const vector = vectors === 0 ? VIRTIO_MSI_NO_VECTOR : vectors > 1 + i ? 1 + i : vectors > 1 ? 1 : 0;
      const queue = await t.setupQueue<BlkRequestState>(i, { size, vector, packed: packed !== 0n });
      const slots: number[] = [];
      for (let s = size - 1; s >= 0; s--) slots.push(i * size + s);
      lanes.push({ queue, slots, waiting: [], kickScheduled: false });
    }
    await t.driverOk();
    return new VirtioPciBlkDriver(t, config, lanes, headers, pool, irqs, maxTransfer, o);
  }

  /** Bytes of the disk (capacity in 512-byte sectors x 512). */
  get capacity(): number {
    return Number(this.config.capacity) * SECTOR;
  }

  get numQueues(): number {
    return this.#lanes.length;
  }

  get readOnly(): boolean {
    return this.transport.hasFeature(BlkFeature.RO);
  }

  /** How kicks reach the device: the server's ioeventfds, or REGION_WRITEs to the notify area. */
  get notifyBy(): 'ioeventfd' | 'message' {
    return this.#lanes[0]!.queue.notifyBy;
  }

  get eventIdx(): boolean {
    return this.transport.hasFeature(F_EVENT_IDX);
  }

  get indirect(): boolean {
    return this.transport.hasFeature(F_INDIRECT_DESC);
  }

  /** Requests on the rings and waiting for room. */
  get inFlight(): number {
    return this.#lanes.reduce((n, l) => n + l.queue.ring.inFlight + l.waiting.length, 0);
  }

  #lane(q: number | undefined): Lane {
    if (q === undefined) return this.#lanes[this.#next++ % this.#lanes.length]!;
    const l = this.#lanes[q];
    if (!l) throw new RangeError(`queue ${q} does not exist (${this.#lanes.length})`);
    return l;
  }

  #checkRange(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset % SECTOR !== 0 || length % SECTOR !== 0) {
      throw new RangeError(`offset ${offset} and length ${length} must be non-negative multiples of ${SECTOR}`);
    }
    if (offset + length > this.capacity) throw new RangeError(`[${offset}, +${length}) is past the end of the ${this.capacity}-byte disk`);
  }

  #enqueue(lane: Lane, type: number, sector: number, out: Uint8Array | null, inLen: number, segment: BlkRequestState['segment'] = null): Promise<Buffer | undefined> {
    if (this.#error) return Promise.reject(this.#error);
    if (this.#closing) return Promise.reject(new VirtioPciError('STATE', 'the driver is closed'));
    return new Promise((resolve, reject) => {
      lane.waiting.push({ type, sector, out, inLen, segment, resolve, reject, slot: -1, poolAt: -1, started: 0 });
      this.#fill(lane);
    });
  }

  /** Moves waiting requests onto the ring while there is room, then schedules the kick decision. */
  #fill(lane: Lane): void {
    const ring = lane.queue.ring;
    const pool = this.#pool.memory.bytes;
    while (this.#error === null && lane.waiting.length > 0 && lane.slots.length > 0) {
      const r = lane.waiting[0]!;
      const dataLen = r.out ? r.out.length : r.inLen;
      if (!ring.canAdd(dataLen > 0 || r.segment ? 3 : 2)) break;
      if (dataLen > 0) {
        r.poolAt = this.#pages.take(dataLen);
        if (r.poolAt < 0) break;
        if (r.out) pool.set(r.out, r.poolAt);
      }
      lane.waiting.shift();
      r.slot = lane.slots.pop()!;
      const hdr = this.#headers.memory.view;
      const at = r.slot * SLOT_BYTES;
      hdr.setUint32(at, r.type, true);
      hdr.setUint32(at + 4, 0, true);
      hdr.setBigUint64(at + 8, BigInt(r.sector), true);
      hdr.setUint8(at + STATUS_AT, 0xff);
      const gpa = this.#headers.iova + at;
      const bufs = [{ addr: gpa, len: 16, write: false }];
      if (r.segment) {
        hdr.setBigUint64(at + SEGMENT_AT, BigInt(r.segment.sector), true);
        hdr.setUint32(at + SEGMENT_AT + 8, r.segment.sectors, true);
        hdr.setUint32(at + SEGMENT_AT + 12, r.segment.flags, true);
        bufs.push({ addr: gpa + SEGMENT_AT, len: 16, write: false });
      }
      if (dataLen > 0) bufs.push({ addr: this.#pool.iova + r.poolAt, len: dataLen, write: r.out === null });
      bufs.push({ addr: gpa + STATUS_AT, len: 1, write: true });
      r.started = Date.now();
      try {
        ring.add(bufs, r);
      } catch (e) {
        // A broken ring (the device broke its rules): nothing more goes on it.
        const broken = new VirtioPciError('DEVICE_ERROR', `queue ${lane.queue.index}: ${(e as Error).message}`, { cause: e });
        r.reject(broken);
        this.#failAll(broken);
        return;
      }
    }
    if (!lane.kickScheduled) {
      lane.kickScheduled = true;
      queueMicrotask(() => {
        lane.kickScheduled = false;
        if (this.#error || this.#closing) return;
        if (ring.needsKick()) {
          this.stats.kicks++;
          lane.queue.notify();
        }
      });
    }
  }

  #reap(lane: Lane): void {
    if (this.#error || this.transport.closed) return;
    const ring = lane.queue.ring;
    try {
      do {
        for (let u = ring.getUsed(); u !== null; u = ring.getUsed()) this.#complete(lane, u.token);
      } while (ring.enableInterrupts());
    } catch (e) {
      this.#failAll(new VirtioPciError('DEVICE_ERROR', `queue ${lane.queue.index}: ${(e as Error).message}`, { cause: e }));
      return;
    }
    // Pool pages came back: every lane may have requests waiting for them.
    for (const l of this.#lanes) if (l.waiting.length > 0) this.#fill(l);
  }

  #complete(lane: Lane, r: BlkRequestState): void {
    const status = this.#headers.memory.bytes[r.slot * SLOT_BYTES + STATUS_AT]!;
    let data: Buffer | undefined;
    if (r.poolAt >= 0) {
      if (status === BlkStatus.OK && r.out === null) data = Buffer.from(this.#pool.memory.bytes.subarray(r.poolAt, r.poolAt + r.inLen));
      this.#pages.give(r.poolAt, r.out ? r.out.length : r.inLen);
    }
    lane.slots.push(r.slot);
    this.stats.completed++;
    if (status === BlkStatus.OK) r.resolve(data);
    else r.reject(new BlkIoError(OPS[r.type] ?? `request type ${r.type}`, status));
  }

  /** After a config interrupt: a device that set DEVICE_NEEDS_RESET fails the driver. */
  async #checkStatus(): Promise<void> {
    if (this.#error || this.#closing) return;
    try {
      const st = await this.transport.status();
      if (st & VirtioStatus.DEVICE_NEEDS_RESET) this.#failAll(new VirtioPciError('DEVICE_ERROR', `the device set DEVICE_NEEDS_RESET (status 0x${st.toString(16)})`));
    } catch (e) {
      if (e instanceof VirtioPciError) this.#failAll(e);
    }
  }

  #checkTimeouts(): void {
    const limit = Date.now() - this.#ioTimeoutMs;
    for (const l of this.#lanes) {
      for (const r of l.queue.ring.tokens()) {
        if (r.started < limit) {
          this.#failAll(new VirtioPciError('TIMEOUT', `a ${OPS[r.type] ?? 'request'} on queue ${l.queue.index} was not completed in ${this.#ioTimeoutMs} ms`));
          return;
        }
      }
    }
  }

  /** Fails every pending request with `e`, and every later one. Buffers on the rings stay taken: the device may yet write them. */
  #failAll(e: Error): void {
    this.#error ??= e;
    for (const l of this.#lanes) {
      for (const r of l.queue.ring.tokens()) r.reject(this.#error);
      for (const r of l.waiting.splice(0)) r.reject(this.#error);
    }
  }

  // ---- the Promise API ---------------------------------------------------

  /** Reads `length` bytes at `offset` (multiples of 512); larger than maxTransfer: several requests. */
  async read(offset: number, length: number, options: { queue?: number } = {}): Promise<Buffer> {
    this.#checkRange(offset, length);
    if (length > 0 && length <= this.maxTransfer) return (await this.#enqueue(this.#lane(options.queue), BlkReq.IN, offset / SECTOR, null, length))!;
    const parts: Promise<Buffer | undefined>[] = [];
    for (let at = 0; at < length; at += this.maxTransfer) {
      parts.push(this.#enqueue(this.#lane(options.queue), BlkReq.IN, (offset + at) / SECTOR, null, Math.min(this.maxTransfer, length - at)));
    }
    return Buffer.concat((await Promise.all(parts)) as Buffer[]);
  }

  /** Writes `data` at `offset` (multiples of 512). */
  async write(offset: number, data: Uint8Array, options: { queue?: number } = {}): Promise<void> {
    this.#checkRange(offset, data.length);
    const parts: Promise<unknown>[] = [];
    for (let at = 0; at < data.length; at += this.maxTransfer) {
      parts.push(this.#enqueue(this.#lane(options.queue), BlkReq.OUT, (offset + at) / SECTOR, data.subarray(at, Math.min(data.length, at + this.maxTransfer)), 0));
    }
    await Promise.all(parts);
  }

  /** FLUSH, when the device has VIRTIO_BLK_F_FLUSH (without it there is no write cache to flush). */
  async flush(options: { queue?: number } = {}): Promise<void> {
    if (!this.transport.hasFeature(BlkFeature.FLUSH)) return;
    await this.#enqueue(this.#lane(options.queue), BlkReq.FLUSH, 0, null, 0);
  }

  /**
   * DISCARD [offset, offset + length) (VIRTIO_BLK_F_DISCARD; without it a BlkIoError UNSUPP):
   * one segment per request, at most max_discard_sectors each.
   */
  discard(offset: number, length: number, options: { queue?: number } = {}): Promise<void> {
    return this.#segments(BlkReq.DISCARD, BlkFeature.DISCARD, this.config.maxDiscardSectors, offset, length, 0, options.queue);
  }

  /** WRITE_ZEROES [offset, offset + length) (VIRTIO_BLK_F_WRITE_ZEROES); `unmap` lets the device deallocate. */
  writeZeroes(offset: number, length: number, options: { queue?: number; unmap?: boolean } = {}): Promise<void> {
    return this.#segments(BlkReq.WRITE_ZEROES, BlkFeature.WRITE_ZEROES, this.config.maxWriteZeroesSectors, offset, length, options.unmap ? WRITE_ZEROES_UNMAP : 0, options.queue);
  }

  async #segments(type: number, feature: number, maxSectors: number, offset: number, length: number, flags: number, queue: number | undefined): Promise<void> {
    this.#checkRange(offset, length);
    if (!this.transport.hasFeature(feature)) throw new BlkIoError(OPS[type]!, BlkStatus.UNSUPP);
    const step = maxSectors > 0 ? maxSectors : 0xffff_ffff;
    const parts: Promise<unknown>[] = [];
    const end = (offset + length) / SECTOR;
    for (let sector = offset / SECTOR; sector < end; sector += step) {
      parts.push(this.#enqueue(this.#lane(queue), type, 0, null, 0, { sector, sectors: Math.min(step, end - sector), flags }));
    }
    await Promise.all(parts);
  }

  /** GET_ID: the device's serial (up to 20 bytes, NUL-terminated when shorter). */
  async getId(options: { queue?: number } = {}): Promise<string> {
    const b = (await this.#enqueue(this.#lane(options.queue), BlkReq.GET_ID, 0, null, ID_BYTES))!;
    const nul = b.indexOf(0);
    return b.subarray(0, nul < 0 ? ID_BYTES : nul).toString('latin1');
  }

  /** Fails what is pending, resets the device (when it is still there) and frees memory, eventfds and the connection. */
  close(): Promise<void> {
    this.#closing ??= (async () => {
      if (this.#sweep) clearInterval(this.#sweep);
      for (const u of this.#unsubscribe) u();
      this.#unsubscribe = [];
      this.#failAll(new VirtioPciError('STATE', 'the driver was closed'));
      await this.transport.close();
    })();
    return this.#closing;
  }
}
