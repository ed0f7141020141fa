/**
 * The state of one served device, which outlives client connections (the
 * spec: when the client disconnects the server keeps the device state, as
 * the client may reconnect): config space, regions, the MSI-X table, the
 * migration state machine and its data stream.
 */
import { PciConfigSpace, MsixController, type CapabilityDescription, type BarDescription } from '../pci/index.js';
import { VfioError, Errno as VErrno } from '../vfio/errors.js';
import { PCI_NUM_REGIONS, PciRegion, PciIrq, RegionInfoFlag, IrqInfoFlag, MigrationFlag, MigrationState } from '../vfio/uapi.js';
import { MigrationFsm, type IrqIndexConfig } from '../vfio/index.js';
import type { RegionSpec, VfioUserDeviceSpec, Area } from './device.js';

export interface ResolvedRegion {
  index: number;
  size: number;
  flags: number;
  spec: RegionSpec | null;
  /** Areas the client may mmap (with `spec.memory`). */
  mmapAreas: Area[];
}

const STATE_NAMES = ['ERROR', 'STOP', 'RUNNING', 'STOP_COPY', 'RESUMING', 'RUNNING_P2P', 'PRE_COPY', 'PRE_COPY_P2P'];

export function migrationStateName(s: number): string {
  return STATE_NAMES[s] ?? `STATE_${s}`;
}

const einval = (code: string, msg: string): VfioError => new VfioError(code, VErrno.EINVAL, msg);

function pow2AtLeast(n: number): number {
  let p = 1;
  while (p < n) p *= 2;
  return p;
}

export class DeviceRuntime {
  readonly spec: VfioUserDeviceSpec;
  readonly config: PciConfigSpace;
  readonly msix: MsixController | null;
  readonly regions: Map<number, ResolvedRegion>;
  readonly numRegions: number;
  readonly irqConfig: IrqIndexConfig[];
  readonly migration: MigrationFsm | null;
  /** The device's saved state being read out (PRE_COPY / STOP_COPY). */
  #out: Uint8Array = new Uint8Array(0);
  #outPos = 0;
  /** The state being received (RESUMING). */
  #in: Uint8Array[] = [];
  #inBytes = 0;
  /** Largest migration stream accepted while RESUMING. */
  readonly maxMigrationBytes = 1 << 30;

  constructor(spec: VfioUserDeviceSpec) {
    this.spec = spec;
    const regionSpecs = new Map<number, RegionSpec>();
    for (const [k, v] of Object.entries(spec.regions ?? {})) {
      const index = Number(k);
      if (!Number.isInteger(index) || index < 0 || index === PciRegion.CONFIG) {
        throw new RangeError(`region index ${k}: 0-6, 8 or >= 9 (7 is the config space, emulated by the library)`);
      }
      if (!Number.isSafeInteger(v.size) || v.size <= 0) throw new RangeError(`region ${index}: bad size ${v.size}`);
      if (v.memory && v.memory.size < v.size) throw new RangeError(`region ${index}: memory smaller than the region`);
      regionSpecs.set(index, v);
    }

    const irqs = spec.irqs ?? {};
    const caps: CapabilityDescription[] = [...(spec.pci.capabilities ?? [])];
    if (irqs.msi) caps.push({ type: 'msi', vectors: irqs.msi });
    let msixBar: { bar: number; tableOffset: number; pbaOffset: number } | undefined;
    if (irqs.msix) {
      msixBar = irqs.msixBar ?? this.#placeMsix(regionSpecs, irqs.msix);
      caps.push({
        type: 'msix',
        tableSize: irqs.msix,
        tableBar: msixBar.bar,
        tableOffset: msixBar.tableOffset,
        pbaBar: msixBar.bar,
        pbaOffset: msixBar.pbaOffset,
      });
    }

    const bars: (BarDescription | null)[] = [];
    for (let i = 0; i < 6; i++) {
      const r = regionSpecs.get(i);
      const type = r?.barType ?? 'mem32';
      // The BAR decodes a power of two; a region of another size (libvfio-user allows any) leaves a hole.
      bars.push(r ? { size: pow2AtLeast(Math.max(r.size, type === 'io' ? 4 : 16)), type, prefetchable: r.prefetchable ?? false } : null);
    }
    const rom = regionSpecs.get(PciRegion.ROM);
    this.config = new PciConfigSpace({
      ...spec.pci,
      interruptPin: spec.pci.interruptPin ?? (irqs.intx ? 1 : 0),
      bars,
      ...(rom ? { rom: { size: rom.size } } : {}),
      capabilities: caps,
    });
    // The MSI-X table is emulated so a client that reads or writes it sees a
    // real one; interrupts themselves follow the VFIO masks (SET_IRQS), as
    // with the kernel's vfio-pci, where the VMM virtualizes the table.
    this.msix = irqs.msix ? MsixController.attach(this.config, () => {}) : null;

    this.regions = new Map();
    let maxIndex = PCI_NUM_REGIONS - 1;
    for (const [index, r] of regionSpecs) {
      const readable = r.readable ?? true;
      const writable = r.writable ?? true;
      let flags = (readable ? RegionInfoFlag.READ : 0) | (writable ? RegionInfoFlag.WRITE : 0);
      const mmapAreas = r.memory ? (r.mmapAreas ?? [{ offset: 0, size: r.size }]) : [];
      for (const a of mmapAreas) {
        if (a.offset < 0 || a.size <= 0 || a.offset + a.size > r.size) {
          throw new RangeError(`region ${index}: mmap area [${a.offset}, +${a.size}) outside the region`);
        }
      }
      if (mmapAreas.length > 0) flags |= RegionInfoFlag.MMAP;
      this.regions.set(index, { index, size: r.size, flags, spec: r, mmapAreas });
      maxIndex = Math.max(maxIndex, index);
    }
    this.regions.set(PciRegion.CONFIG, {
      index: PciRegion.CONFIG,
      size: this.config.size,
      flags: RegionInfoFlag.READ | RegionInfoFlag.WRITE,
      spec: null,
      mmapAreas: [],
    });
    this.numRegions = maxIndex + 1;

    const irq = (count: number, flags: number): IrqIndexConfig => ({ count, flags: count > 0 ? flags : 0 });
    this.irqConfig = [];
    this.irqConfig[PciIrq.INTX] = irq(irqs.intx ? 1 : 0, IrqInfoFlag.EVENTFD | IrqInfoFlag.MASKABLE | IrqInfoFlag.AUTOMASKED);
    this.irqConfig[PciIrq.MSI] = irq(irqs.msi ?? 0, IrqInfoFlag.EVENTFD | IrqInfoFlag.NORESIZE);
    this.irqConfig[PciIrq.MSIX] = irq(irqs.msix ?? 0, IrqInfoFlag.EVENTFD | IrqInfoFlag.NORESIZE);
    this.irqConfig[PciIrq.ERR] = irq(irqs.err ? 1 : 0, IrqInfoFlag.EVENTFD);
    this.irqConfig[PciIrq.REQ] = irq(irqs.req ? 1 : 0, IrqInfoFlag.EVENTFD);

    const m = spec.migration;
    if (m) {
      const records = m.save !== undefined || m.load !== undefined;
      const stream = m.readData !== undefined || m.writeData !== undefined;
      if (records === stream || (records && !(m.save && m.load)) || (stream && !(m.readData && m.writeData))) {
        throw new TypeError('migration needs either save and load, or readData and writeData');
      }
    }
    this.migration = m
      ? new MigrationFsm({
          flags: MigrationFlag.STOP_COPY | (m.preCopy ? MigrationFlag.PRE_COPY : 0),
          transition: (from, to) => this.#arc(from, to),
          onFailure: 'error',
        })
      : null;
  }

  /** Puts the MSI-X table and PBA in the first free BAR (a region of its own). */
  #placeMsix(regions: Map<number, RegionSpec>, vectors: number): { bar: number; tableOffset: number; pbaOffset: number } {
    const taken = new Set<number>();
    for (const [i, r] of regions) {
      if (i < 6) {
        taken.add(i);
        if (r.barType === 'mem64') taken.add(i + 1);
      }
    }
    const bar = [0, 1, 2, 3, 4, 5].find((i) => !taken.has(i));
    if (bar === undefined) throw new RangeError('no free BAR for the MSI-X table: give irqs.msixBar');
    const tableBytes = vectors * 16;
    const pbaOffset = Math.ceil(tableBytes / 8) * 8;
    const size = pow2AtLeast(Math.max(4096, pbaOffset + Math.ceil(vectors / 64) * 8));
    regions.set(bar, { size });
    return { bar, tableOffset: 0, pbaOffset };
  }

  region(index: number): ResolvedRegion {
    const r = this.regions.get(index);
    if (!r) throw einval('REGION_UNSET', `region ${index} does not exist`);
    return r;
  }

  /** A region access by message: bounds and permissions checked, then served. */
  read(index: number, offset: number, out: Uint8Array): void {
    const r = this.#check(index, offset, out.length, RegionInfoFlag.READ);
    if (out.length === 0) return;
    if (index === PciRegion.CONFIG) {
      this.config.readInto(offset, out);
      this.spec.configAccess?.read?.(offset, out, this.config);
      return;
    }
    if (this.msix && index < 6 && this.msix.claims(index, offset, out.length)) {
      out.set(this.msix.barRead(index, offset, out.length));
      return;
    }
    const spec = r.spec!;
    if (spec.read) spec.read(offset, out);
    else if (spec.memory) out.set(spec.memory.bytes.subarray(offset, offset + out.length));
    else if (!this.msix || index >= 6) throw einval('REGION_NO_READ', `region ${index} has no read handler`);
  }

  write(index: number, offset: number, data: Uint8Array): void {
    const r = this.#check(index, offset, data.length, RegionInfoFlag.WRITE);
    if (data.length === 0) return;
    if (index === PciRegion.CONFIG) {
      this.config.write(offset, data);
      this.spec.configAccess?.write?.(offset, data, this.config);
      return;
    }
    if (this.msix && index < 6 && this.msix.claims(index, offset, data.length)) {
      this.msix.barWrite(index, offset, data);
      return;
    }
    const spec = r.spec!;
    if (spec.write) spec.write(offset, data);
    else if (spec.memory) spec.memory.bytes.set(data, offset);
    else if (!this.msix || index >= 6) throw einval('REGION_NO_WRITE', `region ${index} has no write handler`);
  }

  #check(index: number, offset: number, count: number, need: number): ResolvedRegion {
    const r = this.regions.get(index);
    if (!r) throw einval('REGION_UNSET', `region ${index} does not exist`);
    if (!(r.flags & need)) throw einval('REGION_ACCESS', `region ${index} is not ${need === RegionInfoFlag.READ ? 'readable' : 'writable'}`);
    if (offset > r.size || count > r.size - offset) {
      throw einval('REGION_BOUNDS', `access [${offset}, +${count}) outside region ${index} of ${r.size} bytes`);
    }
    if (this.migration && this.migration.state === MigrationState.STOP_COPY) {
      throw einval('REGION_STOPPED', `region ${index} cannot be accessed in STOP_COPY`);
    }
    return r;
  }

  /** DEVICE_RESET: the device's own reset; ERROR goes back to RUNNING. */
  async reset(): Promise<void> {
    await this.spec.reset?.();
    this.msix?.reset();
    if (this.migration && this.migration.state === MigrationState.ERROR) {
      this.migration.reset();
      await this.spec.migration?.transition?.('ERROR', 'RUNNING');
    }
  }

  // --- migration data ---

  async #arc(from: number, to: number): Promise<void> {
    const m = this.spec.migration!;
    if (m.readData) {
      // Stream mode: the device reads and writes the stream itself.
    } else if (to === MigrationState.PRE_COPY || to === MigrationState.STOP_COPY) {
      const phase = to === MigrationState.PRE_COPY ? 'pre-copy' : 'stop-copy';
      const state = await m.save!(phase);
      // Each phase is one record: u32 length, then the bytes. load() gets them one by one.
      const rec = new Uint8Array(4 + state.length);
      new DataView(rec.buffer).setUint32(0, state.length, true);
      rec.set(state, 4);
      const rest = this.#out.subarray(this.#outPos);
      const out = new Uint8Array(rest.length + rec.length);
      out.set(rest);
      out.set(rec, rest.length);
      this.#out = out;
      this.#outPos = 0;
    } else if (to === MigrationState.RESUMING) {
      this.#in = [];
      this.#inBytes = 0;
    } else if (from === MigrationState.RESUMING && to === MigrationState.STOP) {
      const data = Buffer.concat(this.#in);
      this.#in = [];
      this.#inBytes = 0;
      let pos = 0;
      while (pos < data.length) {
        if (data.length - pos < 4) throw einval('MIG_DATA_TRUNCATED', 'migration stream ends inside a record header');
        const len = data.readUInt32LE(pos);
        if (len > data.length - pos - 4) throw einval('MIG_DATA_TRUNCATED', 'migration stream ends inside a record');
        await m.load!(data.subarray(pos + 4, pos + 4 + len));
        pos += 4 + len;
      }
    }
    if (from === MigrationState.STOP_COPY || (from === MigrationState.PRE_COPY && to === MigrationState.RUNNING)) {
      this.#out = new Uint8Array(0);
      this.#outPos = 0;
    }
    await m.transition?.(migrationStateName(from), migrationStateName(to));
  }

  /** MIG_DATA_READ: up to `size` bytes of the saved state; fewer (0 at the end) when it runs out. */
  readMigrationData(size: number): Uint8Array {
    const s = this.migration?.state;
    if (s !== MigrationState.PRE_COPY && s !== MigrationState.STOP_COPY) {
      throw einval('MIG_DATA_STATE', `MIG_DATA_READ in state ${migrationStateName(s ?? 0)}`);
    }
    const m = this.spec.migration!;
    if (m.readData) {
      const out = m.readData(size, s === MigrationState.PRE_COPY ? 'pre-copy' : 'stop-copy');
      if (!(out instanceof Uint8Array) || out.length > size) {
        throw new VfioError('MIG_DATA_DEVICE', VErrno.EIO, `readData gave ${out instanceof Uint8Array ? out.length : typeof out} bytes for ${size}`);
      }
      return out;
    }
    const n = Math.min(size, this.#out.length - this.#outPos);
    const out = this.#out.subarray(this.#outPos, this.#outPos + n);
    this.#outPos += n;
    return out;
  }

  /** MIG_DATA_WRITE: appends to the state being restored. */
  writeMigrationData(data: Uint8Array): void {
    if (this.migration?.state !== MigrationState.RESUMING) {
      throw einval('MIG_DATA_STATE', `MIG_DATA_WRITE in state ${migrationStateName(this.migration?.state ?? 0)}`);
    }
    const m = this.spec.migration!;
    if (m.writeData) {
      m.writeData(data);
      return;
    }
    if (this.#inBytes + data.length > this.maxMigrationBytes) {
      throw new VfioError('MIG_DATA_TOO_BIG', VErrno.E2BIG, 'migration stream too large');
    }
    this.#in.push(Uint8Array.from(data));
    this.#inBytes += data.length;
  }
}
