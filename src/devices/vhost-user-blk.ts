/**
 * vhost-user-blk: a virtio-blk disk (virtio 1.2 section 5.2) backed by a
 * file or by nothing (a null disk), served by VhostUserBackend.
 *
 *   const disk = VhostUserBlkDevice.open({ file: 'disk.img', queues: 2 });
 *   VhostUserBackend.listen('/tmp/blk.sock', disk);
 *
 * Requests: IN, OUT, FLUSH (fdatasync: a write the guest flushed is on the
 * disk), GET_ID, DISCARD and WRITE_ZEROES (both write zeros: Node has no
 * fallocate, and the addon only does what Node cannot for fds and memory; a
 * discarded range reads as zeros, which the spec allows). The file is opened
 * O_RDWR (O_RDONLY with readOnly), buffered; the device offers FLUSH, so the
 * guest's cache flushes reach fdatasync. I/O runs on libuv's thread pool
 * straight into guest memory (readv/writev on views of the mapped regions).
 */
import fs from 'node:fs';
import type { DescChain } from '../virtio/types.js';
import { bit, VirtioFeature as VF } from '../vhost-user/constants.js';
import type { VhostUserDevice } from '../vhost-user/backend.js';
import type { VirtioQueueHandle } from '../virtio/device-queue-handle.js';

export const SECTOR = 512;

/** virtio-blk feature bits. */
export const BlkFeature = {
  SIZE_MAX: 1,
  SEG_MAX: 2,
  GEOMETRY: 4,
  RO: 5,
  BLK_SIZE: 6,
  FLUSH: 9,
  TOPOLOGY: 10,
  CONFIG_WCE: 11,
  MQ: 12,
  DISCARD: 13,
  WRITE_ZEROES: 14,
} as const;

/** Request types. */
export const BlkReq = { IN: 0, OUT: 1, FLUSH: 4, GET_ID: 8, DISCARD: 11, WRITE_ZEROES: 13 } as const;
export const BlkStatus = { OK: 0, IOERR: 1, UNSUPP: 2 } as const;

/** The largest DISCARD / WRITE_ZEROES a request may carry, in sectors (config max_*_sectors). */
const MAX_ZERO_SECTORS = 32768;
const ZEROES = new Uint8Array(1024 * 1024);
const ID_BYTES = 20;

export interface VhostUserBlkOptions {
  /** The disk image; omitted: a null disk of `size` bytes (reads give zeros, writes vanish). */
  file?: string;
  /** Null disk size in bytes (default 1 GiB); ignored with a file. */
  size?: number;
  readOnly?: boolean;
  /** Request queues (default 1). */
  queues?: number;
  /** Largest ring (default 1024). */
  maxQueueSize?: number;
  /** GET_ID answer (at most 20 bytes; default "vdevkit-blk"). */
  serial?: string;
  /**
   * Completes every request this many milliseconds after its I/O (default 0), like
   * qemu's null-co latency-ns: for tests of slow disks and of requests in flight
   * across a back-end restart.
   */
  latencyMs?: number;
  log?: (line: string) => void;
}

export interface BlkStats {
  reads: number;
  writes: number;
  flushes: number;
  discards: number;
  writeZeroes: number;
  getIds: number;
  unsupported: number;
  errors: number;
  bytesRead: number;
  bytesWritten: number;
  /** Chains refused as malformed (no header, no status byte). */
  malformed: number;
}

/** A virtio-blk device for VhostUserBackend. */
export class VhostUserBlkDevice implements VhostUserDevice {
  readonly features: bigint;
  readonly numQueues: number;
  readonly maxQueueSize: number;
  readonly readOnly: boolean;
  /** Capacity in 512-byte sectors. */
  readonly capacity: number;
  readonly stats: BlkStats = { reads: 0, writes: 0, flushes: 0, discards: 0, writeZeroes: 0, getIds: 0, unsupported: 0, errors: 0, bytesRead: 0, bytesWritten: 0, malformed: 0 };
  readonly #fd: number | null;
  readonly #serial: Uint8Array;
  readonly #log: (line: string) => void;
  /** Queues with completions whose notify is scheduled. */
  #notifyPending = new Set<VirtioQueueHandle>();
  #closed = false;
  readonly #latencyMs: number;

  private constructor(fd: number | null, bytes: number, options: VhostUserBlkOptions) {
    this.#fd = fd;
    this.readOnly = options.readOnly === true;
    this.numQueues = options.queues ?? 1;
    if (!Number.isInteger(this.numQueues) || this.numQueues < 1 || this.numQueues > 256) throw new RangeError(`queues: ${this.numQueues} (1..256)`);
    this.maxQueueSize = options.maxQueueSize ?? 1024;
    this.capacity = Math.floor(bytes / SECTOR);
    const serial = new TextEncoder().encode(options.serial ?? 'vdevkit-blk');
    this.#serial = serial.subarray(0, ID_BYTES);
    this.#log = options.log ?? (() => undefined);
    this.#latencyMs = options.latencyMs ?? 0;
    if (!(this.#latencyMs >= 0)) throw new RangeError(`latencyMs: ${this.#latencyMs}`);
    let f = bit(VF.VERSION_1) | bit(VF.INDIRECT_DESC) | bit(VF.EVENT_IDX) | bit(VF.RING_PACKED);
    f |= bit(BlkFeature.SEG_MAX) | bit(BlkFeature.BLK_SIZE) | bit(BlkFeature.FLUSH) | bit(BlkFeature.DISCARD) | bit(BlkFeature.WRITE_ZEROES);
    if (this.numQueues > 1) f |= bit(BlkFeature.MQ);
    if (this.readOnly) f |= bit(BlkFeature.RO);
    this.features = f;
  }

  /** Opens the disk: a file (O_RDWR, or O_RDONLY when readOnly) or a null disk. */
  static open(options: VhostUserBlkOptions = {}): VhostUserBlkDevice {
    if (options.file === undefined) return new VhostUserBlkDevice(null, options.size ?? 1024 * 1024 * 1024, options);
    const fd = fs.openSync(options.file, options.readOnly ? fs.constants.O_RDONLY : fs.constants.O_RDWR);
    try {
      const st = fs.fstatSync(fd);
      if (!st.isFile()) throw new Error(`${options.file} is not a regular file`);
      return new VhostUserBlkDevice(fd, st.size, options);
    } catch (err) {
      fs.closeSync(fd);
      throw err;
    }
  }

  /** virtio_blk_config (60 bytes, little-endian). */
  config(): Uint8Array {
    const b = Buffer.alloc(60);
    b.writeBigUInt64LE(BigInt(this.capacity), 0); // capacity
    b.writeUInt32LE(Math.max(1, this.maxQueueSize - 2), 12); // seg_max
    b.writeUInt32LE(SECTOR, 20); // blk_size
    b.writeUInt16LE(this.numQueues, 34); // num_queues
    b.writeUInt32LE(MAX_ZERO_SECTORS, 36); // max_discard_sectors
    b.writeUInt32LE(1, 40); // max_discard_seg
    b.writeUInt32LE(1, 44); // discard_sector_alignment (sectors)
    b.writeUInt32LE(MAX_ZERO_SECTORS, 48); // max_write_zeroes_sectors
    b.writeUInt32LE(1, 52); // max_write_zeroes_seg
    return b;
  }

  handleQueue(q: VirtioQueueHandle): void {
    const ring = q.ring;
    if (!ring) return;
    // Everything available per wake-up, kicks off meanwhile; the race of re-enabling them handled.
    for (let turn = 0; turn < 64; turn++) {
      ring.disableNotifications();
      let chain: DescChain | null;
      while ((chain = q.pop()) !== null) this.#submit(q, chain);
      if (ring.broken || !ring.enableNotifications()) break;
    }
  }

  reset(): void {
    this.#notifyPending.clear();
  }

  /**
   * Migration state (vhost-user DEVICE_STATE): the disk keeps nothing beyond the rings and
   * the image, so this is a version and the capacity, which the destination checks against
   * its own image (a migration onto a disk of another size is refused).
   */
  saveState(): Uint8Array {
    const b = Buffer.alloc(16);
    b.write('vdkblk\x00\x01', 0, 'latin1');
    b.writeBigUInt64LE(BigInt(this.capacity), 8);
    return b;
  }

  loadState(state: Uint8Array): boolean {
    const b = Buffer.from(state.buffer, state.byteOffset, state.byteLength);
    if (b.length !== 16 || b.toString('latin1', 0, 8) !== 'vdkblk\x00\x01') return false;
    return b.readBigUInt64LE(8) === BigInt(this.capacity);
  }

  /** Closes the disk file (after the back-end is closed). */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    if (this.#fd !== null) fs.closeSync(this.#fd);
  }

  #complete(q: VirtioQueueHandle, chain: DescChain, status: number, dataWritten: number): void {
    if (this.#latencyMs > 0) setTimeout(() => this.#finish(q, chain, status, dataWritten), this.#latencyMs);
    else this.#finish(q, chain, status, dataWritten);
  }

  #finish(q: VirtioQueueHandle, chain: DescChain, status: number, dataWritten: number): void {
    if (status === BlkStatus.IOERR) this.stats.errors++;
    const w = chain.writable;
    // The status byte is the last byte of the device-writable buffers.
    const last = w[w.length - 1];
    if (last && last.byteLength > 0) last[last.byteLength - 1] = status;
    q.push(chain, dataWritten + 1);
    if (!this.#notifyPending.has(q)) {
      this.#notifyPending.add(q);
      setImmediate(() => {
        this.#notifyPending.delete(q);
        q.notify();
      });
    }
  }

  #submit(q: VirtioQueueHandle, chain: DescChain): void {
    if (chain.readableBytes < 16 || chain.writableBytes < 1) {
      // No header or no status byte: nothing can be answered in it; completed empty.
      this.stats.malformed++;
      this.#log(`vring ${q.index}: request ${chain.id} without a header (${chain.readableBytes} readable bytes) or status byte`);
      q.push(chain, 0);
      q.notify();
      return;
    }
    const hdr = gather(chain.readable, 0, 16);
    const type = hdr.readUInt32LE(0);
    const sector = hdr.readBigUInt64LE(8);
    const dataInBytes = chain.writableBytes - 1;
    switch (type) {
      case BlkReq.IN: {
        this.stats.reads++;
        const pos = this.#range(sector, dataInBytes);
        if (pos < 0 || dataInBytes % SECTOR !== 0) return this.#complete(q, chain, BlkStatus.IOERR, 0);
        const dataIn = sliceViews(chain.writable, 0, dataInBytes);
        if (this.#fd === null || dataInBytes === 0) {
          for (const v of dataIn) v.fill(0);
          this.stats.bytesRead += dataInBytes;
          return this.#complete(q, chain, BlkStatus.OK, dataInBytes);
        }
        readAll(this.#fd, dataIn, pos, (err) => {
          if (err) {
            this.#log(`read at sector ${sector}: ${err.message}`);
            return this.#complete(q, chain, BlkStatus.IOERR, 0);
          }
          this.stats.bytesRead += dataInBytes;
          this.#complete(q, chain, BlkStatus.OK, dataInBytes);
        });
        return;
      }
      case BlkReq.OUT: {
        this.stats.writes++;
        const len = chain.readableBytes - 16;
        const pos = this.#range(sector, len);
        if (this.readOnly || pos < 0 || len % SECTOR !== 0) return this.#complete(q, chain, BlkStatus.IOERR, 0);
        if (this.#fd === null) {
          this.stats.bytesWritten += len;
          return this.#complete(q, chain, BlkStatus.OK, 0);
        }
        writeAll(this.#fd, sliceViews(chain.readable, 16, len), pos, (err) => {
          if (err) {
            this.#log(`write at sector ${sector}: ${err.message}`);
            return this.#complete(q, chain, BlkStatus.IOERR, 0);
          }
          this.stats.bytesWritten += len;
          this.#complete(q, chain, BlkStatus.OK, 0);
        });
        return;
      }
      case BlkReq.FLUSH: {
        this.stats.flushes++;
        if (this.#fd === null || this.readOnly) return this.#complete(q, chain, BlkStatus.OK, 0);
        fs.fdatasync(this.#fd, (err) => this.#complete(q, chain, err ? BlkStatus.IOERR : BlkStatus.OK, 0));
        return;
      }
      case BlkReq.GET_ID: {
        this.stats.getIds++;
        const n = Math.min(ID_BYTES, dataInBytes);
        const id = new Uint8Array(ID_BYTES);
        id.set(this.#serial);
        scatter(sliceViews(chain.writable, 0, n), id.subarray(0, n));
        return this.#complete(q, chain, BlkStatus.OK, n);
      }
      case BlkReq.DISCARD:
      case BlkReq.WRITE_ZEROES:
        return this.#zero(q, chain, type);
      default:
        this.stats.unsupported++;
        return this.#complete(q, chain, BlkStatus.UNSUPP, 0);
    }
  }

  /** DISCARD and WRITE_ZEROES: one segment {sector u64, num_sectors u32, flags u32}, written as zeros. */
  #zero(q: VirtioQueueHandle, chain: DescChain, type: number): void {
    if (type === BlkReq.DISCARD) this.stats.discards++;
    else this.stats.writeZeroes++;
    const segs = chain.readableBytes - 16;
    if (this.readOnly || segs !== 16) return this.#complete(q, chain, BlkStatus.IOERR, 0);
    const seg = gather(chain.readable, 16, 16);
    const start = seg.readBigUInt64LE(0);
    const num = seg.readUInt32LE(8);
    const flags = seg.readUInt32LE(12);
    // flags bit 0 is "unmap", valid for WRITE_ZEROES only; every other bit is reserved.
    if ((flags & ~1) !== 0 || (type === BlkReq.DISCARD && flags !== 0)) return this.#complete(q, chain, BlkStatus.UNSUPP, 0);
    const pos = this.#range(start, num * SECTOR);
    if (pos < 0 || num > MAX_ZERO_SECTORS) return this.#complete(q, chain, BlkStatus.IOERR, 0);
    if (this.#fd === null || num === 0) return this.#complete(q, chain, BlkStatus.OK, 0);
    const views: Uint8Array[] = [];
    for (let left = num * SECTOR; left > 0; left -= ZEROES.length) views.push(ZEROES.subarray(0, Math.min(left, ZEROES.length)));
    writeAll(this.#fd, views, pos, (err) => this.#complete(q, chain, err ? BlkStatus.IOERR : BlkStatus.OK, 0));
  }

  /** The byte position of `sector` if [sector, +bytes) lies on the disk, else -1. */
  #range(sector: bigint, bytes: number): number {
    const cap = BigInt(this.capacity);
    const sectors = BigInt(Math.ceil(bytes / SECTOR));
    if (sector > cap || sector + sectors > cap) return -1;
    return Number(sector) * SECTOR;
  }
}

/** `length` bytes from `at` of consecutive views, as views of the same memory. */
export function sliceViews(views: readonly Uint8Array[], at: number, length: number): Uint8Array[] {
  const out: Uint8Array[] = [];
  for (const v of views) {
    if (length <= 0) break;
    if (at >= v.byteLength) {
      at -= v.byteLength;
      continue;
    }
    const n = Math.min(v.byteLength - at, length);
    out.push(v.subarray(at, at + n));
    length -= n;
    at = 0;
  }
  return out;
}

/** A copy of `length` bytes from `at` of consecutive views. */
function gather(views: readonly Uint8Array[], at: number, length: number): Buffer {
  const out = Buffer.alloc(length);
  let o = 0;
  for (const v of sliceViews(views, at, length)) {
    out.set(v, o);
    o += v.byteLength;
  }
  return out;
}

function scatter(views: readonly Uint8Array[], data: Uint8Array): void {
  let o = 0;
  for (const v of views) {
    if (o >= data.length) break;
    const n = Math.min(v.byteLength, data.length - o);
    v.set(data.subarray(o, o + n));
    o += n;
  }
}

function total(views: readonly Uint8Array[]): number {
  let n = 0;
  for (const v of views) n += v.byteLength;
  return n;
}

/** writev until everything is written (a short write goes on where it stopped). */
function writeAll(fd: number, views: Uint8Array[], pos: number, cb: (err: Error | null) => void): void {
  if (views.length === 0) return cb(null);
  fs.writev(fd, views, pos, (err, n) => {
    if (err) return cb(err);
    const all = total(views);
    if (n >= all) return cb(null);
    if (n === 0) return cb(new Error('the file took no bytes'));
    writeAll(fd, sliceViews(views, n, all - n), pos + n, cb);
  });
}

/** readv until everything is read; past the end of the file reads as zeros. */
function readAll(fd: number, views: Uint8Array[], pos: number, cb: (err: Error | null) => void): void {
  if (views.length === 0) return cb(null);
  fs.readv(fd, views, pos, (err, n) => {
    if (err) return cb(err);
    const all = total(views);
    if (n >= all) return cb(null);
    if (n === 0) {
      for (const v of views) v.fill(0);
      return cb(null);
    }
    readAll(fd, sliceViews(views, n, all - n), pos + n, cb);
  });
}
