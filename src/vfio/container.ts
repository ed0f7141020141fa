/**
 * The VFIO container on the client side: one IOMMU address space, its DMA
 * mappings, and the groups (and so the devices) that share it, organised as
 * Linux's vfio.c does. A mapping made on the container reaches every device
 * in it; a device joining gets every mapping replayed; a device leaving gets
 * its mappings removed.
 *
 * IOMMU (VFIO_SET_IOMMU). A container has no IOMMU until one is set, and a
 * type can be set only once a group is attached (EINVAL otherwise, and
 * EINVAL when already set); a type no driver offers is ENODEV. With the
 * `iommu` option the type is set as the first group attaches. Detaching the
 * last group releases the IOMMU and with it every mapping ("deprivileges"
 * the container). The drivers are a fixed registry: the type1 model (TYPE1,
 * TYPE1v2; UNMAP_ALL) and, with `allowNoIommu`, vfio-noiommu (no DMA API:
 * map and unmap are ENOTTY). noiommu and ordinary groups do not mix (EPERM).
 *
 * Type1 rules, checked by a DmaMapTable: prot READ and/or WRITE (0 is
 * EINVAL); iova, size and offset aligned to the smallest page size every
 * device and the IOMMU accept (the intersection of their pgsizes); overlap,
 * including the identical mapping again, EEXIST; more than max_dma_maps (the
 * least over the IOMMU and the devices) ENOSPC; unmap must name one mapping
 * exactly (ENOENT otherwise: the vfio-user rule, also applied to TYPE1,
 * whose kernel version allows bisecting). A device that would tighten the
 * limits so that an existing mapping breaks them is refused before anything
 * is sent to it (EINVAL for alignment or disjoint pgsizes, ENOSPC for count).
 *
 * Ordering. Every operation is queued: maps, unmaps and membership changes
 * run one at a time in call order, so every device sees them in that order;
 * within one operation the devices are called in parallel.
 */
import { DmaMapTable } from './dma.js';
import type { DmaRegion, DmaSegment } from './dma.js';
import {
  DmaTargetError,
  SerialQueue,
  fanOut,
  markBitmap,
  orBitmap,
  setBitRange,
  unmapAllOn,
  ENODEV,
} from './dma-target.js';
import type { DmaLoggingRange, DmaTarget, DmaTargetMapping, DmaTargetOp } from './dma-target.js';
import { Errno, VfioError, invalid } from './errors.js';
import type { VfioDevice, VfioGroup } from './group.js';
import { IommuType, MASK64, NOIOMMU_DRIVER, TYPE1_DRIVER, commonLimits } from './iommu.js';
import type { IommuDriver, Limits } from './iommu.js';
import { DmaMapFlag } from './uapi.js';

export interface VfioContainerOptions {
  /** Set this IOMMU type when the first group attaches (default: wait for setIommu()). */
  iommu?: IommuType;
  /** Page sizes the IOMMU itself supports (default: every power of two from 4 KiB). */
  iommuPgsizes?: bigint;
  /** The IOMMU's own mapping limit (default 65535, the kernel's dma_entry_limit). */
  maxDmaMaps?: number;
  /** Offer vfio-noiommu and accept noiommu groups (the kernel's CAP_SYS_RAWIO + enable_unsafe_noiommu_mode). */
  allowNoIommu?: boolean;
  /** Told of failures of best-effort cleanup (unmap on removal, rollback), which are otherwise swallowed. */
  onCleanupError?: (err: DmaTargetError) => void;
}

/** A map request: where (iova, size), how (prot: DmaMapFlag bits) and what (memory + offset). */
export type ContainerMapping<M> = DmaTargetMapping<M>;

/** The container. M is the memory reference carried to the devices (a SharedMemory in the client). */
export class VfioContainer<M = unknown> {
  readonly #queue = new SerialQueue();
  readonly #autoIommu: IommuType | undefined;
  readonly #iommuPgsizes: bigint;
  readonly #iommuMaxMaps: number;
  readonly #allowNoIommu: boolean;
  readonly #onCleanupError: ((err: DmaTargetError) => void) | undefined;
  readonly #groups: VfioGroup<M>[] = [];
  #iommu: IommuType | undefined;
  #noiommu = false;
  #limits: Limits;
  #table: DmaMapTable<M>;
  /** The ranges dirty logging was started with; undefined when not logging. */
  #logRanges: readonly DmaLoggingRange[] | undefined;

  constructor(options: VfioContainerOptions = {}) {
    this.#autoIommu = options.iommu;
    this.#iommuPgsizes = options.iommuPgsizes ?? MASK64 & ~0xfffn;
    this.#iommuMaxMaps = options.maxDmaMaps ?? 65535;
    this.#allowNoIommu = options.allowNoIommu ?? false;
    this.#onCleanupError = options.onCleanupError;
    if (this.#iommuPgsizes <= 0n || this.#iommuPgsizes > MASK64) throw new RangeError('iommuPgsizes must be a non-zero 64-bit bitmap');
    if (!Number.isSafeInteger(this.#iommuMaxMaps) || this.#iommuMaxMaps < 0) throw new RangeError(`bad maxDmaMaps ${this.#iommuMaxMaps}`);
    this.#limits = this.#limitsFor([]);
    this.#table = this.#newTable(this.#limits);
  }

  /** The IOMMU type, or undefined while none is set. */
  get iommu(): IommuType | undefined {
    return this.#iommu;
  }

  /** The attached groups, in attach order. */
  get groups(): readonly VfioGroup<M>[] {
    return [...this.#groups];
  }

  /** Every device of every attached group. */
  devices(): VfioDevice<M>[] {
    return this.#groups.flatMap((g) => [...g.devices()]);
  }

  /** The page sizes mappings may use: the IOMMU's and every device's, intersected (iova_pgsizes). */
  get pgsizes(): bigint {
    return this.#limits.pgsizes;
  }

  /** The alignment of iova, size and offset: the smallest page in pgsizes. */
  get pageSize(): number {
    return this.#limits.pageSize;
  }

  /** The most mappings at once: the least of the IOMMU's and every device's max_dma_maps. */
  get maxDmaMaps(): number {
    return this.#limits.maxMaps;
  }

  /** Mappings still possible (VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL). */
  get dmaAvailable(): number {
    return Math.max(0, this.#limits.maxMaps - this.#table.size);
  }

  /** The mappings, in IOVA order (`handle` is the memory reference). */
  regions(): DmaRegion<M>[] {
    return this.#table.regions();
  }

  /** The mapping containing iova, if any. */
  find(iova: number): DmaRegion<M> | undefined {
    return this.#table.find(iova);
  }

  /** DmaMapTable.lookup: [iova, +length) as runs inside consecutive mappings (ENOENT on a gap, EACCES on prot). */
  lookup(iova: number, length: number, prot = 0): DmaSegment<M>[] {
    return this.#table.lookup(iova, length, prot);
  }

  /** DmaMapTable.translate: [iova, +length) inside one mapping. */
  translate(iova: number, length: number, prot = 0): DmaSegment<M> {
    return this.#table.translate(iova, length, prot);
  }

  /** VFIO_CHECK_EXTENSION: 1 when the IOMMU set (or, with none set, any driver this container could use) supports ext. */
  checkExtension(ext: number): number {
    return this.#candidateDrivers().some((d) => d.extensions.has(ext)) ? 1 : 0;
  }

  /** VFIO_SET_IOMMU. EINVAL without a group or when already set; ENODEV when no driver offers the type. */
  setIommu(type: number): Promise<void> {
    return this.#queue.run(() => this.#setIommu(type));
  }

  /**
   * VFIO_IOMMU_MAP_DMA on every device, all or nothing: when a device fails,
   * the devices that accepted the mapping have it unmapped again (best
   * effort), the container forgets it, and a DmaTargetError for the first
   * failing device (in device order) is thrown.
   */
  map(m: ContainerMapping<M>): Promise<void> {
    return this.#queue.run(async () => {
      this.#checkDma();
      const { iova, size, prot, memory, offset } = m;
      const { added } = this.#table.map({ iova, size, prot, offset, handle: memory });
      if (!added) throw new VfioError('DMA_MAP_OVERLAP', Errno.EEXIST, `[${iova}, +${size}) is already mapped`);
      const targets = this.#targets();
      const mapping: DmaTargetMapping<M> = { iova, size, prot, memory, offset };
      try {
        await fanOut(targets, 'map', (t) => t.dmaMap({ ...mapping }), (t) => this.#bestEffort(t, 'unmap', () => t.dmaUnmap({ iova, size })));
      } catch (err) {
        this.#table.unmap(iova, size);
        throw err;
      }
    });
  }

  /**
   * VFIO_IOMMU_UNMAP_DMA of one whole mapping (ENOENT unless [iova, +size)
   * is exactly a mapping), on every device. While dirty logging runs, the
   * range's dirty bitmap at the logging page size is collected first and
   * returned (like UNMAP_DMA with GET_DIRTY_BITMAP); a failure to collect it
   * fails the unmap before anything changed. The container forgets the
   * mapping even when a device fails to unmap it; that failure is then
   * thrown (first device in order) after every device was asked.
   */
  unmap(iova: number, size: number): Promise<Uint8Array | undefined> {
    return this.#queue.run(async () => {
      this.#checkDma();
      const r = this.#table.find(iova);
      if (r === undefined || r.iova !== iova || r.size !== size) {
        throw new VfioError('DMA_UNMAP_NOT_FOUND', Errno.ENOENT, `no mapping is exactly [${iova}, +${size})`);
      }
      const P = this.#table.loggingPageSize;
      const dirty = P !== 0 ? await this.#collectDirty(iova, size, P) : undefined;
      this.#table.unmap(iova, size);
      await fanOut(this.#targets(), 'unmap', (t) => t.dmaUnmap({ iova, size }));
      return dirty;
    });
  }

  /**
   * VFIO_DMA_UNMAP_FLAG_ALL: forgets every mapping and removes them from
   * every device (dmaUnmapAll where the device has it, one by one
   * otherwise). Returns how many mappings there were. Device failures are
   * thrown after every device was asked.
   */
  unmapAll(): Promise<number> {
    return this.#queue.run(async () => {
      this.#checkDma();
      const removed = this.#table.unmapAll();
      await fanOut(this.#targets(), 'unmapAll', (t) => unmapAllOn(t, removed));
      return removed.length;
    });
  }

  /** Whether dirty logging runs. */
  get dirtyLogging(): boolean {
    return this.#logRanges !== undefined;
  }

  /** The dirty logging page size, 0 when not logging. */
  get dirtyPageSize(): number {
    return this.#table.loggingPageSize;
  }

  /**
   * Starts dirty logging: the container's own log (for the client's writes,
   * markDirty) and every device with dmaLogging, all or nothing. pageSize: a
   * power of two >= 4096 (EINVAL). Already logging: EBUSY. Devices that join
   * later start logging as they join.
   */
  startDirtyLogging(pageSize: number, ranges: readonly DmaLoggingRange[] = []): Promise<void> {
    return this.#queue.run(async () => {
      this.#checkDma();
      if (this.#logRanges !== undefined) throw new VfioError('DMA_LOG_ALREADY_STARTED', Errno.EBUSY, 'dirty logging already runs');
      this.#table.startLogging(pageSize);
      const list = ranges.map((r) => ({ iova: r.iova, length: r.length }));
      const targets = this.#targets().filter((t) => t.dmaLogging !== undefined);
      try {
        await fanOut(
          targets,
          'logStart',
          (t) => t.dmaLogging!.start(pageSize, list),
          (t) => this.#bestEffort(t, 'logStop', () => t.dmaLogging!.stop()),
        );
      } catch (err) {
        this.#table.stopLogging();
        throw err;
      }
      this.#logRanges = list;
    });
  }

  /** Stops dirty logging everywhere (a no-op when not logging); device failures are thrown after all were asked. */
  stopDirtyLogging(): Promise<void> {
    return this.#queue.run(async () => {
      if (this.#logRanges === undefined) return;
      this.#logRanges = undefined;
      this.#table.stopLogging();
      await fanOut(this.#targets(), 'logStop', (t) => t.dmaLogging?.stop());
    });
  }

  /** Records a write the client itself made to [iova, +length) (nothing when not logging). */
  markDirty(iova: number, length: number): void {
    this.#table.markDirty(iova, length);
  }

  /**
   * The dirty bitmap of [iova, +length) at pageSize (layout of
   * DMA_LOGGING_REPORT, dirtyBitmapBytes long), and every log is cleared for
   * the range: the container's own log OR every logging device's report.
   * A device without dmaLogging could have written anywhere it may write, so
   * while one is in the container every writable mapped page in the range is
   * reported dirty. If a device fails (or answers a bitmap of the wrong size,
   * EIO), what was collected is put back into the container's log, so it is
   * reported next time, and the error is thrown. Errors: not logging, or a
   * bad pageSize, EINVAL; see DmaMapTable.report.
   */
  reportDirty(iova: number, length: number, pageSize: number): Promise<Uint8Array> {
    return this.#queue.run(() => this.#collectDirty(iova, length, pageSize));
  }

  /** Resolves once every operation queued so far has finished. */
  idle(): Promise<void> {
    return this.#queue.run(() => undefined);
  }

  // ---- called by VfioGroup (membership changes run on this queue) ----

  /** @internal GROUP_SET_CONTAINER, container side. The group must not be attached anywhere. */
  _attachGroup(group: VfioGroup<M>): Promise<void> {
    return this.#queue.run(async () => {
      if (group.noiommu && !this.#allowNoIommu) {
        throw new VfioError('GROUP_NOIOMMU_DENIED', Errno.EPERM, `group ${group.name} is noiommu and this container does not allow noiommu`);
      }
      if (this.#groups.length > 0 && this.#noiommu !== group.noiommu) {
        throw new VfioError('CONTAINER_NOIOMMU_MIX', Errno.EPERM, 'noiommu and IOMMU-backed groups cannot share a container');
      }
      const targets = group.devices().map((d) => d.target);
      const limits = this.#admit(targets);
      await this.#bringUp(targets);
      this.#groups.push(group);
      this.#noiommu = group.noiommu;
      this.#setLimits(limits);
      if (this.#groups.length === 1 && this.#iommu === undefined && this.#autoIommu !== undefined) {
        try {
          this.#setIommu(this.#autoIommu);
        } catch (err) {
          this.#groups.pop();
          this.#release();
          throw err;
        }
      }
    });
  }

  /** @internal GROUP_UNSET_CONTAINER, container side: the group's devices lose their mappings (best effort). */
  _detachGroup(group: VfioGroup<M>): Promise<void> {
    return this.#queue.run(async () => {
      const at = this.#groups.indexOf(group);
      if (at < 0) throw invalid('GROUP_NOT_IN_CONTAINER', `group ${group.name} is not in this container`);
      await this.#tearDown(group.devices().map((d) => d.target));
      this.#groups.splice(at, 1);
      if (this.#groups.length === 0) this.#release();
      else this.#setLimits(this.#limitsFor(this.#targets()));
    });
  }

  /** @internal A device joins an attached group: replay, then `commit` puts it in the group. */
  _addDevice(target: DmaTarget<M>, commit: () => void): Promise<void> {
    return this.#queue.run(async () => {
      const limits = this.#admit([target]);
      await this.#bringUp([target]);
      commit();
      this.#setLimits(limits);
    });
  }

  /** @internal A device leaves an attached group: its mappings go (best effort), then `commit`. */
  _removeDevice(target: DmaTarget<M>, commit: () => void): Promise<void> {
    return this.#queue.run(async () => {
      await this.#tearDown([target]);
      commit();
      this.#setLimits(this.#limitsFor(this.#targets()));
    });
  }

  /** @internal Whether a noiommu group's devices may be opened. */
  get _allowNoIommu(): boolean {
    return this.#allowNoIommu;
  }

  // ---- internals ----

  #targets(): DmaTarget<M>[] {
    return this.#groups.flatMap((g) => g.devices().map((d) => d.target));
  }

  #candidateDrivers(): IommuDriver[] {
    const all = this.#allowNoIommu ? [TYPE1_DRIVER, NOIOMMU_DRIVER] : [TYPE1_DRIVER];
    if (this.#iommu !== undefined) return all.filter((d) => d.types.has(this.#iommu!) && d.noiommu === this.#noiommu);
    return this.#groups.length === 0 ? all : all.filter((d) => d.noiommu === this.#noiommu);
  }

  #setIommu(type: number): void {
    if (this.#groups.length === 0) throw invalid('CONTAINER_NO_GROUPS', 'SET_IOMMU needs a group attached first');
    if (this.#iommu !== undefined) throw invalid('CONTAINER_IOMMU_SET', `the IOMMU is already set (type ${this.#iommu})`);
    const drivers = this.#candidateDrivers();
    const driver = drivers.find((d) => d.types.has(type));
    if (driver === undefined) {
      if (drivers.some((d) => d.extensions.has(type))) throw invalid('CONTAINER_NOT_IOMMU_TYPE', `extension ${type} is not an IOMMU type`);
      throw new VfioError('CONTAINER_NO_IOMMU_DRIVER', ENODEV, `no IOMMU driver for type ${type} in this container`);
    }
    this.#iommu = type as IommuType;
  }

  #checkDma(): void {
    if (this.#iommu === undefined) throw invalid('CONTAINER_NO_IOMMU', 'the container has no IOMMU set');
    if (this.#iommu === IommuType.NOIOMMU) throw new VfioError('CONTAINER_NOIOMMU_DMA', Errno.ENOTTY, 'vfio-noiommu has no DMA mapping');
  }

  #limitsFor(targets: readonly DmaTarget<M>[]): Limits {
    return commonLimits(this.#iommuPgsizes, this.#iommuMaxMaps, targets);
  }

  /** Limits once `joining` join the current devices; the current mappings must fit them. */
  #admit(joining: readonly DmaTarget<M>[]): Limits {
    const limits = this.#limitsFor([...this.#targets(), ...joining]);
    const P = limits.pageSize;
    for (const r of this.#table.regions()) {
      if (r.iova % P !== 0 || r.size % P !== 0 || r.offset % P !== 0) {
        throw invalid('CONTAINER_MAPPING_UNALIGNED', `mapping [${r.iova}, +${r.size}) is not aligned to the new page size ${P}`);
      }
    }
    if (this.#table.size > limits.maxMaps) {
      throw new VfioError('CONTAINER_TOO_MANY_MAPS', Errno.ENOSPC, `${this.#table.size} mappings exceed the new limit ${limits.maxMaps}`);
    }
    return limits;
  }

  #newTable(l: Limits): DmaMapTable<M> {
    return new DmaMapTable<M>({ pageSize: l.pageSize, maxMaps: l.maxMaps, requireProt: true });
  }

  /** Adopts new limits; the table is rebuilt (mappings and dirty logs carried over) when its rules change. */
  #setLimits(l: Limits): void {
    const old = this.#table;
    this.#limits = l;
    if (old.pageSize === l.pageSize && old.maxMaps === l.maxMaps) return;
    const table = this.#newTable(l);
    const P = old.loggingPageSize;
    if (P !== 0) table.startLogging(P);
    const regions = old.regions();
    for (const r of regions) table.map({ iova: r.iova, size: r.size, prot: r.prot, offset: r.offset, handle: r.handle });
    if (P !== 0) for (const r of regions) markBitmap(table, old.report(r.iova, r.size, P), r.iova, r.size, P);
    this.#table = table;
  }

  /** The last group left: no IOMMU, no mappings, no logging. */
  #release(): void {
    this.#iommu = undefined;
    this.#noiommu = false;
    this.#logRanges = undefined;
    this.#limits = this.#limitsFor([]);
    this.#table = this.#newTable(this.#limits);
  }

  /** Joining devices get every mapping and, while logging, start logging; all or nothing. */
  async #bringUp(targets: readonly DmaTarget<M>[]): Promise<void> {
    const regions = this.#table.regions();
    const ranges = this.#logRanges;
    const P = this.#table.loggingPageSize;
    const one = async (t: DmaTarget<M>): Promise<void> => {
      for (let i = 0; i < regions.length; i++) {
        const r = regions[i]!;
        try {
          await t.dmaMap({ iova: r.iova, size: r.size, prot: r.prot, memory: r.handle, offset: r.offset });
        } catch (err) {
          for (let j = i - 1; j >= 0; j--) {
            const u = regions[j]!;
            await this.#bestEffort(t, 'unmap', () => t.dmaUnmap({ iova: u.iova, size: u.size }));
          }
          throw new DmaTargetError(t.name, 'replay', err);
        }
      }
      if (ranges !== undefined && t.dmaLogging !== undefined) {
        try {
          await t.dmaLogging.start(P, ranges);
        } catch (err) {
          await this.#bestEffort(t, 'unmapAll', () => unmapAllOn(t, regions));
          throw new DmaTargetError(t.name, 'logStart', err);
        }
      }
    };
    await fanOut(targets, 'replay', one, (t) => this.#dropTarget(t, false));
  }

  /** Leaving devices: their dirty pages are kept in the container's log, then logging stops and mappings go. */
  async #tearDown(targets: readonly DmaTarget<M>[]): Promise<void> {
    await Promise.all(targets.map((t) => this.#dropTarget(t, true)));
  }

  async #dropTarget(t: DmaTarget<M>, harvest: boolean): Promise<void> {
    const regions = this.#table.regions();
    const P = this.#table.loggingPageSize;
    if (this.#logRanges !== undefined && P !== 0) {
      const log = t.dmaLogging;
      if (log === undefined) {
        if (harvest) for (const r of regions) if ((r.prot & DmaMapFlag.WRITE) !== 0) this.#table.markDirty(r.iova, r.size);
      } else {
        if (harvest) {
          for (const r of regions) {
            await this.#bestEffort(t, 'logReport', async () => {
              const bits = await log.report(r.iova, r.size, P);
              markBitmap(this.#table, bits, r.iova, r.size, P);
            });
          }
        }
        await this.#bestEffort(t, 'logStop', () => log.stop());
      }
    }
    if (regions.length > 0) await this.#bestEffort(t, 'unmapAll', () => unmapAllOn(t, regions));
  }

  async #collectDirty(iova: number, length: number, pageSize: number): Promise<Uint8Array> {
    const out = this.#table.report(iova, length, pageSize);
    const targets = this.#targets();
    const logging = targets.filter((t) => t.dmaLogging !== undefined);
    const results = await Promise.allSettled(logging.map((t) => t.dmaLogging!.report(iova, length, pageSize)));
    let failure: DmaTargetError | undefined;
    results.forEach((r, i) => {
      const name = logging[i]!.name;
      if (r.status === 'rejected') failure ??= new DmaTargetError(name, 'logReport', r.reason);
      else if (r.value.length !== out.length) {
        failure ??= new DmaTargetError(name, 'logReport', new Error(`bitmap of ${r.value.length} bytes, expected ${out.length}`), Errno.EIO);
      } else orBitmap(out, r.value);
    });
    if (logging.length < targets.length) {
      const end = iova + length;
      for (const r of this.#table.regions()) {
        if ((r.prot & DmaMapFlag.WRITE) === 0 || r.iova >= end || r.iova + r.size <= iova) continue;
        const from = Math.max(iova, r.iova);
        const to = Math.min(end, r.iova + r.size);
        setBitRange(out, Math.floor((from - iova) / pageSize), Math.floor((to - 1 - iova) / pageSize));
      }
    }
    if (failure !== undefined) {
      markBitmap(this.#table, out, iova, length, pageSize);
      throw failure;
    }
    return out;
  }

  async #bestEffort(t: DmaTarget<M>, op: DmaTargetOp, fn: () => Promise<void>): Promise<void> {
    try {
      await fn();
    } catch (err) {
      try {
        this.#onCleanupError?.(new DmaTargetError(t.name, op, err));
      } catch {
        // a throwing listener must not break the cleanup
      }
    }
  }
}
