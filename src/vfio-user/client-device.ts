/**
 * A device driven through a vfio-user client (QEMU's hw/vfio-user/device.c):
 * info queries with defensive limits against a hostile server, region info
 * with the capability chain walked and the region fd mapped for direct
 * access to its sparse areas, region reads and writes that go to the mapping
 * when they can and to messages otherwise, SET_IRQS with eventfds chunked by
 * the server's max_msg_fds, reset, the migration v2 driver API and DMA
 * logging.
 */
import { SharedMemory, type EventFd, type Fd } from '../sys/index.js';
import { VfioError, Errno as VErrno } from '../vfio/errors.js';
import { parseRegionInfoReply, type InfoCap, type SparseMmapArea } from '../vfio/region-info.js';
import { RegionInfoFlag, IrqSetFlag, MigrationState } from '../vfio/uapi.js';
import { Command, DeviceFeature, FeatureFlags } from './constants.js';
import {
  decodeFeatureMigState,
  decodeFeatureMigration,
  encodeDmaLoggingControl,
  encodeDmaLoggingReportRequest,
  encodeFeatureMigState,
} from './messages.js';
import { markBitmap } from '../vfio/dma-target.js';
import type { VfioUserClient } from './client.js';

/** The most regions and irq types we accept from a server (QEMU's limits). */
export const MAX_REGIONS = 100;
export const MAX_IRQS = 50;

export interface DeviceInfo {
  flags: number;
  numRegions: number;
  numIrqs: number;
}

export interface RegionInfo {
  index: number;
  flags: number;
  size: number;
  /** mmap offset of the region in its fd. */
  offset: number;
  caps: InfoCap[];
  /** Areas mapped here for direct access (region-relative). */
  mapped: { offset: number; size: number; memory: SharedMemory }[];
}

export interface IrqInfo {
  index: number;
  flags: number;
  count: number;
}

const bad = (code: string, msg: string): VfioError => new VfioError(code, VErrno.EINVAL, msg);

export class VfioUserDevice {
  readonly client: VfioUserClient;
  #info: DeviceInfo | null = null;
  readonly #regions = new Map<number, RegionInfo>();

  constructor(client: VfioUserClient) {
    this.client = client;
  }

  /** DEVICE_GET_INFO, checked against MAX_REGIONS / MAX_IRQS. */
  async info(): Promise<DeviceInfo> {
    const r = await this.client.request(Command.DEVICE_GET_INFO, { argsz: 16, flags: 0, numRegions: 0, numIrqs: 0 });
    const { flags, numRegions, numIrqs } = r.body;
    if (numRegions > MAX_REGIONS) throw bad('TOO_MANY_REGIONS', `server reports ${numRegions} regions; at most ${MAX_REGIONS}`);
    if (numIrqs > MAX_IRQS) throw bad('TOO_MANY_IRQS', `server reports ${numIrqs} irq types; at most ${MAX_IRQS}`);
    this.#info = { flags, numRegions, numIrqs };
    return this.#info;
  }

  /**
   * GET_REGION_INFO, asking again with the argsz the server says it needs;
   * the capability chain is walked and validated, and an mmap-able region's
   * fd is mapped (its sparse areas, or the whole region). Cached per index.
   */
  async regionInfo(index: number): Promise<RegionInfo> {
    const cached = this.#regions.get(index);
    if (cached) return cached;
    const info = this.#info ?? (await this.info());
    if (index >= info.numRegions) throw bad('REGION_INDEX', `region ${index} >= ${info.numRegions}`);
    let argsz = 32;
    for (let attempt = 0; attempt < 2; attempt++) {
      const r = await this.client.request(Command.DEVICE_GET_REGION_INFO, {
        argsz,
        flags: 0,
        index,
        capOffset: 0,
        size: 0,
        offset: 0,
      }, { takeFds: true });
      const fds = r.fds;
      try {
        const raw = r.body.raw ?? new Uint8Array(0);
        const parsed = parseRegionInfoReply(raw);
        if (parsed.info.index !== index) throw bad('REGION_INFO_INDEX', `reply for region ${parsed.info.index}, asked ${index}`);
        if (!parsed.complete && attempt === 0) {
          if (parsed.info.argsz > 64 * 1024) throw bad('REGION_INFO_ARGSZ', `argsz ${parsed.info.argsz} is implausible`);
          argsz = parsed.info.argsz;
          continue;
        }
        const hasMmap = (parsed.info.flags & RegionInfoFlag.MMAP) !== 0;
        if (fds.length > (hasMmap ? 1 : 0)) throw bad('REGION_INFO_FDS', `${fds.length} fds with region ${index}`);
        const region: RegionInfo = { ...parsed.info, index, caps: parsed.caps, mapped: [] };
        if (hasMmap) {
          this.client.disablePostedWrites(); // a read through the mapping could pass a posted write
          if (fds[0]) region.mapped = this.#mapAreas(region, fds[0]);
        }
        this.#regions.set(index, region);
        return region;
      } finally {
        for (const f of fds) f.close();
      }
    }
    throw bad('REGION_INFO_ARGSZ', `server keeps asking for a larger argsz for region ${index}`);
  }

  #mapAreas(region: RegionInfo, fd: Fd): RegionInfo['mapped'] {
    const sparse = region.caps.find((c): c is Extract<InfoCap, { kind: 'sparse-mmap' }> => c.kind === 'sparse-mmap');
    const areas: SparseMmapArea[] = sparse ? sparse.areas : [{ offset: 0, size: region.size }];
    const out: RegionInfo['mapped'] = [];
    for (const a of areas) {
      if (a.size === 0) continue;
      if (a.offset + a.size > region.size) throw bad('SPARSE_AREA', `area [${a.offset}, +${a.size}) outside region ${region.index}`);
      const dup = fd.dup();
      try {
        const readOnly = (region.flags & RegionInfoFlag.WRITE) === 0;
        out.push({ offset: a.offset, size: a.size, memory: SharedMemory.map(dup, { offset: region.offset + a.offset, size: a.size, readOnly }) });
      } catch (err) {
        dup.close();
        for (const m of out) m.memory.close();
        throw err;
      }
    }
    return out;
  }

  /** The mapped area holding [offset, offset + length) of a region, if any. */
  #mappedArea(index: number, offset: number, length: number): { memory: SharedMemory; at: number } | null {
    const r = this.#regions.get(index);
    if (!r) return null;
    for (const m of r.mapped) {
      if (offset >= m.offset && offset + length <= m.offset + m.size) return { memory: m.memory, at: offset - m.offset };
    }
    return null;
  }

  /** Reads a region: from the mapping when the range lies in a mapped area, else REGION_READs chunked by max_data_xfer_size. */
  async read(index: number, offset: number, length: number): Promise<Uint8Array> {
    const m = this.#mappedArea(index, offset, length);
    if (m) return m.memory.bytes.slice(m.at, m.at + length);
    const out = new Uint8Array(length);
    const chunk = this.client.maxXfer;
    for (let done = 0; done < length || (length === 0 && done === 0); done += chunk) {
      const part = await this.client.regionRead(index, offset + done, Math.min(chunk, length - done));
      out.set(part, done);
      if (length === 0) break;
    }
    return out;
  }

  /**
   * Reads a region into `dest` (dest.length bytes from offset): from the
   * mapping when the range lies in a mapped area, else by REGION_READs chunked
   * by max_data_xfer_size whose data the socket receives straight into `dest`.
   * No buffer of its own, unlike read(). A short reply is an error.
   */
  async readInto(index: number, offset: number, dest: Uint8Array): Promise<void> {
    const length = dest.length;
    const m = this.#mappedArea(index, offset, length);
    if (m) {
      dest.set(m.memory.bytes.subarray(m.at, m.at + length));
      return;
    }
    const chunk = this.client.maxXfer;
    for (let done = 0; done < length; done += chunk) {
      const n = Math.min(chunk, length - done);
      const part = dest.subarray(done, done + n);
      const got = await this.client.regionRead(index, offset + done, n, part);
      if (got.length !== n) throw bad('REGION_READ_SHORT', `REGION_READ at ${offset + done}: ${got.length} of ${n} bytes`);
      if (got !== part) part.set(got); // a small reply arrives whole, not placed
    }
  }

  /** Writes a region: to the mapping, or by REGION_WRITEs (posted if asked and allowed). */
  async write(index: number, offset: number, data: Uint8Array, options: { posted?: boolean } = {}): Promise<void> {
    const m = this.#mappedArea(index, offset, data.length);
    if (m) {
      m.memory.bytes.set(data, m.at);
      return;
    }
    const chunk = this.client.maxXfer;
    for (let done = 0; done < data.length; done += chunk) {
      await this.client.regionWrite(index, offset + done, data.subarray(done, Math.min(done + chunk, data.length)), options);
    }
  }

  async irqInfo(index: number): Promise<IrqInfo> {
    const info = this.#info ?? (await this.info());
    if (index >= info.numIrqs) throw bad('IRQ_INDEX', `irq index ${index} >= ${info.numIrqs}`);
    const r = await this.client.request(Command.DEVICE_GET_IRQ_INFO, { argsz: 16, flags: 0, index, count: 0 });
    if (r.body.index !== index) throw bad('IRQ_INFO_INDEX', `reply for irq ${r.body.index}, asked ${index}`);
    return { index, flags: r.body.flags, count: r.body.count };
  }

  /**
   * SET_IRQS ACTION_TRIGGER | DATA_EVENTFD for vectors [start, start + fds.length):
   * a null entry de-assigns its vector. Sent in messages of at most the
   * server's max_msg_fds fds, each a run of all-assigned or all-unassigned
   * vectors (as QEMU does).
   */
  async setEventFds(index: number, start: number, fds: (EventFd | null)[], action: 'trigger' | 'mask' | 'unmask' = 'trigger'): Promise<void> {
    const act = action === 'trigger' ? IrqSetFlag.ACTION_TRIGGER : action === 'mask' ? IrqSetFlag.ACTION_MASK : IrqSetFlag.ACTION_UNMASK;
    const flags = act | IrqSetFlag.DATA_EVENTFD;
    const max = Math.max(1, this.client.serverCaps.maxMsgFds);
    let i = 0;
    while (i < fds.length) {
      const valid = fds[i] !== null;
      let n = 1;
      while (i + n < fds.length && (fds[i + n] !== null) === valid && (!valid || n < max)) n++;
      const run = fds.slice(i, i + n);
      await this.client.request(
        Command.DEVICE_SET_IRQS,
        { argsz: 20, flags, index, start: start + i, count: n, data: new Uint8Array(0) },
        valid ? { fds: run.map((e) => e!.fd) } : {},
      );
      i += n;
    }
  }

  /** SET_IRQS with DATA_NONE (count 0 with trigger disables the whole index) or DATA_BOOL. */
  async setIrqs(index: number, action: 'trigger' | 'mask' | 'unmask', start: number, count: number, bools?: boolean[]): Promise<void> {
    const act = action === 'trigger' ? IrqSetFlag.ACTION_TRIGGER : action === 'mask' ? IrqSetFlag.ACTION_MASK : IrqSetFlag.ACTION_UNMASK;
    const data = bools ? Uint8Array.from(bools.map((b) => (b ? 1 : 0))) : new Uint8Array(0);
    const flags = act | (bools ? IrqSetFlag.DATA_BOOL : IrqSetFlag.DATA_NONE);
    await this.client.request(Command.DEVICE_SET_IRQS, { argsz: 20 + data.length, flags, index, start, count, data });
  }

  /** Disables every vector of an irq index. */
  disableIrqs(index: number): Promise<void> {
    return this.setIrqs(index, 'trigger', 0, 0);
  }

  async reset(): Promise<void> {
    await this.client.request(Command.DEVICE_RESET, undefined);
  }

  // --- DEVICE_FEATURE ---

  async #feature(flags: number, data: Uint8Array, replyRoom = 0): Promise<Uint8Array> {
    const r = await this.client.request(Command.DEVICE_FEATURE, { argsz: 8 + Math.max(data.length, replyRoom), flags, data });
    return r.body.data;
  }

  /** MIGRATION GET: MigrationFlag bits (STOP_COPY, P2P, PRE_COPY). */
  async migrationFlags(): Promise<number> {
    const d = await this.#feature(FeatureFlags.GET | DeviceFeature.MIGRATION, new Uint8Array(0), 8);
    return Number(decodeFeatureMigration(d).flags);
  }

  async migrationState(): Promise<number> {
    const d = await this.#feature(FeatureFlags.GET | DeviceFeature.MIG_DEVICE_STATE, new Uint8Array(8), 8);
    return decodeFeatureMigState(d).deviceState;
  }

  async setMigrationState(state: number): Promise<void> {
    await this.#feature(FeatureFlags.SET | DeviceFeature.MIG_DEVICE_STATE, encodeFeatureMigState({ deviceState: state, dataFd: -1 }));
  }

  /** One MIG_DATA_READ of at most `size` bytes (bounded by max_data_xfer_size); fewer means the stream ended. */
  async readMigrationData(size = this.client.maxXfer): Promise<Uint8Array> {
    const want = Math.min(size, this.client.maxXfer);
    const r = await this.client.request(Command.MIG_DATA_READ, { argsz: 8 + want, size: want });
    if (r.body.size > want || r.body.data.length !== r.body.size) throw bad('MIG_DATA_REPLY', 'MIG_DATA_READ reply larger than asked');
    return r.body.data;
  }

  async writeMigrationData(data: Uint8Array): Promise<void> {
    const chunk = this.client.maxXfer;
    for (let done = 0; done < data.length; done += chunk) {
      const part = data.subarray(done, Math.min(done + chunk, data.length));
      await this.client.request(Command.MIG_DATA_WRITE, { argsz: 8 + part.length, size: part.length, data: part });
    }
  }

  /** Reads the migration stream until a short read. */
  async readAllMigrationData(maxBytes = 1 << 30): Promise<Uint8Array> {
    const parts: Uint8Array[] = [];
    let total = 0;
    const chunk = this.client.maxXfer;
    for (;;) {
      const d = await this.readMigrationData(chunk);
      parts.push(Uint8Array.from(d));
      total += d.length;
      if (total > maxBytes) throw bad('MIG_DATA_TOO_BIG', `migration stream over ${maxBytes} bytes`);
      if (d.length < chunk) break;
    }
    return Buffer.concat(parts);
  }

  /** Saves the device: STOP_COPY, read everything, STOP. Returns the stream. */
  async save(): Promise<Uint8Array> {
    await this.setMigrationState(MigrationState.STOP_COPY);
    const data = await this.readAllMigrationData();
    await this.setMigrationState(MigrationState.STOP);
    return data;
  }

  /** Restores a saved stream: RESUMING, write it, then `finalState` (default RUNNING). */
  async restore(data: Uint8Array, finalState: number = MigrationState.RUNNING): Promise<void> {
    await this.setMigrationState(MigrationState.RESUMING);
    await this.writeMigrationData(data);
    await this.setMigrationState(finalState);
  }

  // --- DMA logging ---
  //
  // The server logs the writes it makes to our memory itself; the DMA_WRITEs
  // it asks us to make are ours to log (libvfio-user: "the client is
  // responsible for tracking pages that are dirtied" by message DMA, and it
  // refuses a REPORT for a window without an fd). So logging runs in the
  // client's own table (client.dma) too, and a report is the union of both.

  /** DMA_LOGGING_START on the server, and the client's own log of the DMA_WRITEs it serves (pageSize: a power of two >= 4096). */
  async startDmaLogging(pageSize: number, ranges: { iova: number; length: number }[] = []): Promise<void> {
    const table = this.client.dma;
    const wasLogging = table.loggingPageSize !== 0;
    table.startLogging(pageSize); // EINVAL for a bad page size, or one other than the running one
    try {
      await this.#feature(FeatureFlags.SET | DeviceFeature.DMA_LOGGING_START, encodeDmaLoggingControl({ pageSize, ranges }));
    } catch (err) {
      if (!wasLogging) table.stopLogging();
      throw err;
    }
  }

  async stopDmaLogging(): Promise<void> {
    try {
      await this.#feature(FeatureFlags.SET | DeviceFeature.DMA_LOGGING_STOP, encodeDmaLoggingControl({ pageSize: 4096, ranges: [] }));
    } finally {
      this.client.dma.stopLogging();
    }
  }

  /**
   * DMA_LOGGING_REPORT: the dirty bitmap of [iova, iova + length), one bit per
   * page (u64 words, LSB first), OR-ed with the client's log of the DMA_WRITEs
   * it served. A range that lies wholly in windows mapped without an fd is
   * answered from the client's log alone: the server can only have written it
   * through us. If the server's report fails, the client's bits are kept for
   * the next report.
   */
  async dmaLoggingReport(iova: number, length: number, pageSize: number): Promise<Uint8Array> {
    const table = this.client.dma;
    const mine = table.loggingPageSize !== 0 ? table.report(iova, length, pageSize) : undefined;
    if (mine && this.#onlyMessageWindows(iova, length)) return mine;
    const pages = Math.ceil(length / pageSize);
    const bitmapBytes = Math.ceil(pages / 64) * 8;
    let out: Uint8Array;
    try {
      const req = encodeDmaLoggingReportRequest({ iova, length, pageSize });
      const d = await this.#feature(FeatureFlags.GET | DeviceFeature.DMA_LOGGING_REPORT, req, req.length + bitmapBytes);
      if (d.length < req.length + bitmapBytes) throw bad('DMA_REPORT_SHORT', `report of ${d.length} bytes`);
      out = d.slice(req.length, req.length + bitmapBytes);
    } catch (err) {
      if (mine) markBitmap(table, mine, iova, length, pageSize);
      throw err;
    }
    if (mine) for (let i = 0; i < out.length && i < mine.length; i++) out[i]! |= mine[i]!;
    return out;
  }

  /** True when [iova, +length) is mapped and lies only in windows whose fd the server did not get. */
  #onlyMessageWindows(iova: number, length: number): boolean {
    try {
      const segs = this.client.dma.lookup(iova, length);
      return segs.length > 0 && segs.every((s) => s.region.handle.passFd === false);
    } catch {
      return false;
    }
  }

  /** Unmaps the region mappings (views into them become empty). */
  close(): void {
    for (const r of this.#regions.values()) for (const m of r.mapped) m.memory.close();
    this.#regions.clear();
  }
}

/**
 * A vfio-user device as a member of a VfioContainer (src/vfio/container.ts):
 * the container's mappings become DMA_MAP / DMA_UNMAP on this connection,
 * with the client's SharedMemory passed by fd, and its dirty logging goes to
 * the device's DMA_LOGGING features.
 */
export function dmaTargetOf(device: VfioUserDevice, name = 'vfio-user'): import('../vfio/dma-target.js').DmaTarget<SharedMemory> {
  const client = device.client;
  return {
    name,
    get pgsizes() {
      return client.serverCaps.pgsizes;
    },
    get maxDmaMaps() {
      return client.serverCaps.maxDmaMaps;
    },
    dmaMap: (m) => client.dmaMap({ iova: m.iova, size: m.size, prot: m.prot, memory: m.memory, offset: m.offset }),
    dmaUnmap: (m) => client.dmaUnmap(m.iova, m.size),
    dmaUnmapAll: () => client.dmaUnmapAll(),
    dmaLogging: {
      start: (pageSize, ranges) => device.startDmaLogging(pageSize, [...ranges]),
      stop: () => device.stopDmaLogging(),
      report: (iova, length, pageSize) => device.dmaLoggingReport(iova, length, pageSize),
    },
  };
}
