/**
 * A type-0 PCI configuration space, emulated the way libvfio-user's lib/pci.c
 * and lib/pci_caps.c do it, from a plain description of the device.
 *
 * Every byte has write rules: a write mask (bits the guest may change), a
 * write-1-to-clear mask, bits whose write as 1 is refused, and a refusal code
 * for bytes the guest may not write at all. A write is checked as a whole first
 * and then applied, so a refused write changes nothing. Accepted writes to
 * read-only bits are ignored, as hardware does.
 *
 * Header rules (libvfio-user's pci_hdr_write, with the deviations marked *):
 *   refused, EINVAL: vendor/device ID, header type, BIST, CardBus CIS, subsystem IDs,
 *                    CAPABILITY_LIST and the reserved bytes 0x35..0x3b
 *   accepted, ignored: revision, class code, interrupt pin, MIN_GNT, MAX_LAT
 *   COMMAND: IO, MEMORY, MASTER, INVALIDATE, SERR, INTX_DISABLE writable, and PARITY*;
 *            VGA_PALETTE accepted and ignored; SPECIAL, WAIT, FAST_BACK and reserved bits refused
 *   STATUS: error bits write-1-to-clear* (libvfio-user ignores STATUS writes)
 *   CACHE_LINE_SIZE* (libvfio-user ignores it), LATENCY_TIMER, INTERRUPT_LINE: read-write
 *   BARs: address bits above the size writable, type bits fixed*, so writing all
 *         ones reads back ~(size-1) | flags (libvfio-user does not mask to the size
 *         and leaves the upper dword of a 64-bit BAR unwritable); unused BARs read 0
 *         and ignore writes
 *   ROM: address bits above the size and the enable bit writable*; without a ROM
 *        reads 0 and ignores writes* (libvfio-user refuses most ROM writes)
 * Outside the header, bytes that no capability claims read 0 and refuse writes
 * (EINVAL); see caps.ts for capability rules.
 */

import {
  linkCapabilities,
  placeCapabilities,
  Refuse,
  type CapabilityDescription,
  type CapabilityType,
  type PlacedCapability,
} from './caps.js';
import {
  capabilityAfterWrite,
  decodeMsi,
  decodeMsixControl,
  type CapabilityEffect,
  type MsiState,
  type MsixControl,
} from './cap-state.js';
import { PciError, hex } from './errors.js';
import {
  barOffset,
  PCI_CFG_SPACE_EXP_SIZE,
  PCI_CFG_SPACE_SIZE,
  PCI_STATUS_RW1C,
  PCI_STD_NUM_BARS,
  PciBar,
  PciCommand,
  PciMsix,
  PciReg,
  PciRom,
  PciStatus,
} from './regs.js';

export type BarType = 'mem32' | 'mem64' | 'io';

export interface BarDescription {
  /** Bytes; a power of two (memory >= 16, I/O 4..65536, mem32 <= 2 GiB, mem64 <= 2^52). */
  size: number;
  type: BarType;
  /** Memory BARs only. */
  prefetchable?: boolean;
}

export interface PciDeviceDescription {
  vendorId: number;
  deviceId: number;
  subsystemVendorId?: number;
  subsystemId?: number;
  revision?: number;
  /** 24 bits: base class << 16 | sub-class << 8 | programming interface. */
  classCode: number;
  /** 0 = none, 1..4 = INTA#..INTD#. Default 0. */
  interruptPin?: number;
  /** Index = BAR number; a mem64 BAR also takes the next slot, which must stay empty. */
  bars?: ReadonlyArray<BarDescription | null | undefined>;
  /** Expansion ROM; size a power of two >= 2 KiB. */
  rom?: { size: number };
  /** Chained in this order; extended ones (dsn, ext-vendor) go to the 0x100+ space. */
  capabilities?: readonly CapabilityDescription[];
  /** 4 KiB config space. Default: true when there is a PCIe or an extended capability. */
  express?: boolean;
}

export interface BarInfo {
  readonly index: number;
  readonly type: BarType;
  readonly size: number;
  readonly prefetchable: boolean;
}

/** What the device can learn from guest writes. Listeners run after the write is applied. */
export interface PciConfigEvents {
  /** COMMAND changed (memory/IO decode, bus master, INTx disable...). */
  command: (value: number, previous: number) => void;
  /** The address a BAR decodes changed (also while the guest sizes it: act only with decode enabled). */
  bar: (index: number, address: bigint, previous: bigint) => void;
  /** The expansion ROM BAR changed. */
  rom: (address: number, enabled: boolean) => void;
  /** An MSI capability register changed. */
  msi: (state: MsiState) => void;
  /** MSI-X enable or function mask changed. */
  msix: (control: MsixControl) => void;
  /** PM power state changed (0 = D0 ... 3 = D3hot). */
  'power-state': (state: number, previous: number) => void;
  /** The guest initiated a Function Level Reset (PCIe DEVCTL). The device resets, then calls reset(). */
  flr: () => void;
  /** An accepted write touched this capability (after any of the specific events). */
  'capability-write': (cap: PlacedCapability) => void;
  /** reset() restored the power-on contents. */
  reset: () => void;
}

type Listeners = { [K in keyof PciConfigEvents]?: PciConfigEvents[K][] };

const bad = (message: string): PciError => new PciError('ERR_PCI_BAD_DESCRIPTION', message);

function checkInt(what: string, v: number | undefined, max: number): number {
  const n = v ?? 0;
  if (!Number.isInteger(n) || n < 0 || n > max) throw bad(`${what} ${String(v)} is not 0..${hex(max)}`);
  return n;
}

function isPow2(n: number): boolean {
  return Number.isSafeInteger(n) && n > 0 && 2 ** Math.round(Math.log2(n)) === n;
}

const COMMAND_WRITABLE =
  PciCommand.IO |
  PciCommand.MEMORY |
  PciCommand.MASTER |
  PciCommand.INVALIDATE |
  PciCommand.PARITY |
  PciCommand.SERR |
  PciCommand.INTX_DISABLE;
/** COMMAND bits libvfio-user refuses ("unconsumed command flags"): EINVAL. */
const COMMAND_REFUSED = PciCommand.SPECIAL | PciCommand.WAIT | PciCommand.FAST_BACK | 0xf800;

/** Header byte ranges refused with EINVAL. */
const HEADER_READ_ONLY: ReadonlyArray<readonly [number, number]> = [
  [PciReg.VENDOR_ID, 4],
  [PciReg.HEADER_TYPE, 2],
  [PciReg.CARDBUS_CIS, 8],
  [PciReg.CAPABILITY_LIST, 8],
];

export class PciConfigSpace {
  /** 256 or 4096. */
  readonly size: number;
  readonly express: boolean;
  readonly capabilities: readonly PlacedCapability[];
  readonly rom: { readonly size: number } | undefined;

  private readonly bytes: Uint8Array;
  private readonly view: DataView;
  private readonly initial: Uint8Array;
  private readonly wmask: Uint8Array;
  private readonly w1cmask: Uint8Array;
  private readonly badBits: Uint8Array;
  private readonly refuse: Uint8Array;
  private readonly barSlots: readonly (BarInfo | undefined)[];
  private readonly listeners: Listeners = {};

  constructor(description: PciDeviceDescription) {
    const d = description;
    const caps = d.capabilities ?? [];
    const wantsExpress = caps.some((c) => c.type === 'express' || c.type === 'dsn' || c.type === 'ext-vendor');
    this.express = d.express ?? wantsExpress;
    this.size = this.express ? PCI_CFG_SPACE_EXP_SIZE : PCI_CFG_SPACE_SIZE;
    this.bytes = new Uint8Array(this.size);
    this.view = new DataView(this.bytes.buffer);
    this.wmask = new Uint8Array(this.size);
    this.w1cmask = new Uint8Array(this.size);
    this.badBits = new Uint8Array(this.size);
    this.refuse = new Uint8Array(this.size).fill(Refuse.UNCLAIMED, 0x40);

    const v = this.view;
    v.setUint16(PciReg.VENDOR_ID, checkInt('vendor ID', d.vendorId, 0xffff), true);
    v.setUint16(PciReg.DEVICE_ID, checkInt('device ID', d.deviceId, 0xffff), true);
    v.setUint8(PciReg.REVISION_ID, checkInt('revision', d.revision, 0xff));
    const cls = checkInt('class code', d.classCode, 0xffffff);
    v.setUint8(PciReg.CLASS_PROG, cls & 0xff);
    v.setUint16(PciReg.CLASS_DEVICE, cls >>> 8, true);
    v.setUint16(PciReg.SUBSYSTEM_VENDOR_ID, checkInt('subsystem vendor ID', d.subsystemVendorId, 0xffff), true);
    v.setUint16(PciReg.SUBSYSTEM_ID, checkInt('subsystem ID', d.subsystemId, 0xffff), true);
    v.setUint8(PciReg.INTERRUPT_PIN, checkInt('interrupt pin', d.interruptPin, 4));
    for (const [off, len] of HEADER_READ_ONLY) this.refuse.fill(Refuse.READ_ONLY, off, off + len);

    this.setMask16(PciReg.COMMAND, COMMAND_WRITABLE);
    this.badBits[PciReg.COMMAND] = COMMAND_REFUSED & 0xff;
    this.badBits[PciReg.COMMAND + 1] = COMMAND_REFUSED >>> 8;
    this.w1cmask[PciReg.STATUS] = PCI_STATUS_RW1C & 0xff;
    this.w1cmask[PciReg.STATUS + 1] = PCI_STATUS_RW1C >>> 8;
    this.wmask[PciReg.CACHE_LINE_SIZE] = 0xff;
    this.wmask[PciReg.LATENCY_TIMER] = 0xff;
    this.wmask[PciReg.INTERRUPT_LINE] = 0xff;

    this.barSlots = this.setUpBars(d.bars ?? []);
    this.rom = d.rom === undefined ? undefined : { size: d.rom.size };
    if (this.rom) {
      const size = this.rom.size;
      if (!isPow2(size) || size < 0x800 || size > 2 ** 31) throw bad(`ROM size ${size} is not a power of two in 2 KiB..2 GiB`);
      this.setMask32(PciReg.ROM_ADDRESS, ((PciRom.ADDRESS_MASK & ~(size - 1)) | PciRom.ENABLE) >>> 0);
    }

    this.capabilities = placeCapabilities(caps, this.size);
    this.checkCapabilities();
    for (const c of this.capabilities) {
      const t = c.template;
      this.bytes.set(t.bytes, c.offset);
      this.wmask.set(t.wmask, c.offset);
      this.w1cmask.set(t.w1cmask, c.offset);
      this.badBits.set(t.badBits, c.offset);
      this.refuse.set(t.refuse, c.offset);
    }
    const first = linkCapabilities(this.bytes, this.capabilities);
    v.setUint8(PciReg.CAPABILITY_LIST, first);
    if (first !== 0) v.setUint16(PciReg.STATUS, PciStatus.CAP_LIST, true);
    this.initial = this.bytes.slice();
  }

  private setMask16(off: number, mask: number): void {
    this.wmask[off] = mask & 0xff;
    this.wmask[off + 1] = (mask >>> 8) & 0xff;
  }
  private setMask32(off: number, mask: number): void {
    this.setMask16(off, mask & 0xffff);
    this.setMask16(off + 2, mask >>> 16);
  }

  private setUpBars(bars: ReadonlyArray<BarDescription | null | undefined>): (BarInfo | undefined)[] {
    if (bars.length > PCI_STD_NUM_BARS) throw bad(`${bars.length} BARs described, at most 6`);
    const slots: (BarInfo | undefined)[] = new Array<BarInfo | undefined>(PCI_STD_NUM_BARS).fill(undefined);
    for (let i = 0; i < bars.length; i++) {
      const b = bars[i];
      if (!b) continue;
      const { size, type } = b;
      const prefetchable = b.prefetchable ?? false;
      const off = barOffset(i);
      if (!isPow2(size)) throw bad(`BAR${i} size ${size} is not a power of two`);
      if (type === 'io') {
        if (size < 4 || size > 0x10000) throw bad(`BAR${i} I/O size ${size} is not 4..65536`);
        if (prefetchable) throw bad(`BAR${i}: an I/O BAR cannot be prefetchable`);
        this.view.setUint32(off, PciBar.SPACE_IO, true);
        this.setMask32(off, (PciBar.IO_MASK & ~(size - 1)) >>> 0);
      } else if (type === 'mem32' || type === 'mem64') {
        if (size < 16) throw bad(`BAR${i} memory size ${size} is below 16 bytes`);
        const flags = (type === 'mem64' ? PciBar.MEM_TYPE_64 : PciBar.MEM_TYPE_32) | (prefetchable ? PciBar.MEM_PREFETCH : 0);
        this.view.setUint32(off, flags, true);
        if (type === 'mem32') {
          if (size > 2 ** 31) throw bad(`BAR${i} mem32 size ${size} exceeds 2 GiB`);
          this.setMask32(off, (PciBar.MEM_MASK & ~(size - 1)) >>> 0);
        } else {
          if (i === PCI_STD_NUM_BARS - 1) throw bad('BAR5 cannot be 64-bit: it needs the next slot');
          if (bars[i + 1]) throw bad(`BAR${i} is 64-bit, so BAR${i + 1} must be left empty`);
          if (size > 2 ** 52) throw bad(`BAR${i} mem64 size ${size} exceeds 2^52`);
          const low = size >= 2 ** 32 ? 0 : (PciBar.MEM_MASK & ~(size - 1)) >>> 0;
          const high = size <= 2 ** 32 ? 0xffffffff : (~(size / 2 ** 32 - 1)) >>> 0;
          this.setMask32(off, low);
          this.setMask32(off + 4, high);
        }
      } else {
        throw bad(`BAR${i} type ${String(type)} is not mem32, mem64 or io`);
      }
      slots[i] = { index: i, type, size, prefetchable };
      if (type === 'mem64') i++;
    }
    return slots;
  }

  private checkCapabilities(): void {
    const seen = new Set<CapabilityType>();
    for (const c of this.capabilities) {
      const d = c.description;
      if (d.type !== 'vendor' && d.type !== 'ext-vendor') {
        if (seen.has(d.type)) throw bad(`capability '${d.type}' given twice`);
        seen.add(d.type);
      }
      if (d.type !== 'msix') continue;
      const tableLen = d.tableSize * PciMsix.ENTRY_SIZE;
      const pbaLen = Math.ceil(d.tableSize / 64) * 8;
      const within = (what: string, bar: number, off: number, len: number): void => {
        const b = this.barSlots[bar];
        if (!b || b.type === 'io') throw bad(`MSI-X ${what} is in BAR${bar}, which is not a memory BAR`);
        if (off + len > b.size) throw bad(`MSI-X ${what} (${len} bytes at ${hex(off)}) does not fit in BAR${bar} of ${b.size} bytes`);
      };
      within('table', d.tableBar, d.tableOffset, tableLen);
      within('PBA', d.pbaBar, d.pbaOffset, pbaLen);
      if (d.tableBar === d.pbaBar && d.tableOffset < d.pbaOffset + pbaLen && d.pbaOffset < d.tableOffset + tableLen) {
        throw bad('MSI-X table and PBA overlap');
      }
    }
  }

  // ---- guest-side access -------------------------------------------------------------------

  private checkRange(offset: number, length: number): void {
    if (!Number.isInteger(offset) || !Number.isInteger(length) || offset < 0 || length < 0 || offset + length > this.size) {
      throw new PciError('ERR_PCI_OUT_OF_RANGE', `config access of ${length} bytes at ${offset} is outside ${this.size} bytes`, offset);
    }
  }

  /** Read `length` bytes at `offset` (any width, any alignment). Returns a copy. */
  read(offset: number, length: number): Uint8Array {
    this.checkRange(offset, length);
    return this.bytes.slice(offset, offset + length);
  }

  /** Fill `target` from `offset`. */
  readInto(offset: number, target: Uint8Array): void {
    this.checkRange(offset, target.length);
    target.set(this.bytes.subarray(offset, offset + target.length));
  }

  readU8(offset: number): number {
    this.checkRange(offset, 1);
    return this.view.getUint8(offset);
  }
  readU16(offset: number): number {
    this.checkRange(offset, 2);
    return this.view.getUint16(offset, true);
  }
  readU32(offset: number): number {
    this.checkRange(offset, 4);
    return this.view.getUint32(offset, true);
  }

  /**
   * A guest write of `data` at `offset`. Refused as a whole (PciError, nothing
   * changed) if any byte is refused; otherwise applied through the masks, then
   * events are emitted.
   */
  write(offset: number, data: Uint8Array): void {
    const n = data.length;
    this.checkRange(offset, n);
    for (let i = 0; i < n; i++) {
      const o = offset + i;
      const r = this.refuse[o]!;
      if (r !== Refuse.NONE) throw this.refusal(r, o);
      if (data[i]! & this.badBits[o]!) {
        throw new PciError('ERR_PCI_BAD_VALUE', `write of ${hex(data[i]!)} at ${hex(o)} sets bits the register refuses`, o);
      }
    }
    if (n === 0) return;
    const beforeBytes = this.bytes.slice();
    const before = new DataView(beforeBytes.buffer);
    for (let i = 0; i < n; i++) {
      const o = offset + i;
      const d = data[i]!;
      const w = this.wmask[o]!;
      this.bytes[o] = ((this.bytes[o]! & ~w) | (d & w)) & ~(d & this.w1cmask[o]!);
    }
    this.emitWriteEffects(offset, data, before);
  }

  private refusal(code: number, offset: number): PciError {
    if (code === Refuse.CAP_READ_ONLY) {
      return new PciError('ERR_PCI_CAP_READ_ONLY', `write to read-only capability bytes at ${hex(offset)}`, offset);
    }
    const what = code === Refuse.UNCLAIMED ? 'config space no capability claims' : 'a read-only header register';
    return new PciError('ERR_PCI_READ_ONLY', `write to ${what} at ${hex(offset)}`, offset);
  }

  private emitWriteEffects(offset: number, data: Uint8Array, before: DataView): void {
    const end = offset + data.length;
    const hits = (off: number, len: number): boolean => offset < off + len && off < end;
    const calls: (() => void)[] = [];
    if (hits(PciReg.COMMAND, 2)) {
      const value = this.command;
      const previous = before.getUint16(PciReg.COMMAND, true);
      if (value !== previous) calls.push(() => this.emit('command', value, previous));
    }
    for (const b of this.barSlots) {
      if (!b || !hits(barOffset(b.index), b.type === 'mem64' ? 8 : 4)) continue;
      const address = this.barAddressIn(this.view, b);
      const previous = this.barAddressIn(before, b);
      if (address !== previous) calls.push(() => this.emit('bar', b.index, address, previous));
    }
    if (this.rom && hits(PciReg.ROM_ADDRESS, 4)) {
      const raw = this.view.getUint32(PciReg.ROM_ADDRESS, true);
      if (raw !== before.getUint32(PciReg.ROM_ADDRESS, true)) {
        calls.push(() => this.emit('rom', (raw & PciRom.ADDRESS_MASK) >>> 0, (raw & PciRom.ENABLE) !== 0));
      }
    }
    const written = (off: number): number | undefined => (off >= offset && off < end ? data[off - offset] : undefined);
    for (const cap of this.capabilities) {
      if (!hits(cap.offset, cap.size)) continue;
      const effects = capabilityAfterWrite({ cap, now: this.view, before, written });
      for (const e of effects) calls.push(() => this.emitEffect(e));
      calls.push(() => this.emit('capability-write', cap));
    }
    this.runAll(calls);
  }

  private emitEffect(e: CapabilityEffect): void {
    switch (e.kind) {
      case 'msi':
        return this.emit('msi', e.state);
      case 'msix':
        return this.emit('msix', e.control);
      case 'power-state':
        return this.emit('power-state', e.state, e.previous);
      case 'flr':
        return this.emit('flr');
    }
  }

  /** Run every call; a throwing listener does not starve the others. The first error is rethrown. */
  private runAll(calls: readonly (() => void)[]): void {
    let first: unknown;
    let failed = false;
    for (const c of calls) {
      try {
        c();
      } catch (err) {
        if (!failed) first = err;
        failed = true;
      }
    }
    if (failed) throw first;
  }

  // ---- events ------------------------------------------------------------------------------

  /** Subscribe; returns the unsubscribe function. */
  on<K extends keyof PciConfigEvents>(event: K, listener: PciConfigEvents[K]): () => void {
    const list = (this.listeners[event] ??= []) as PciConfigEvents[K][];
    list.push(listener);
    return () => {
      const i = list.indexOf(listener);
      if (i >= 0) list.splice(i, 1);
    };
  }

  private emit<K extends keyof PciConfigEvents>(event: K, ...args: Parameters<PciConfigEvents[K]>): void {
    const list = this.listeners[event];
    if (!list) return;
    this.runAll(list.slice().map((l) => () => (l as (...a: Parameters<PciConfigEvents[K]>) => void)(...args)));
  }

  // ---- device-side state -------------------------------------------------------------------

  get command(): number {
    return this.view.getUint16(PciReg.COMMAND, true);
  }
  get status(): number {
    return this.view.getUint16(PciReg.STATUS, true);
  }
  get ioEnabled(): boolean {
    return (this.command & PciCommand.IO) !== 0;
  }
  get memoryEnabled(): boolean {
    return (this.command & PciCommand.MEMORY) !== 0;
  }
  get busMasterEnabled(): boolean {
    return (this.command & PciCommand.MASTER) !== 0;
  }
  get intxDisabled(): boolean {
    return (this.command & PciCommand.INTX_DISABLE) !== 0;
  }
  get interruptLine(): number {
    return this.view.getUint8(PciReg.INTERRUPT_LINE);
  }
  get interruptPin(): number {
    return this.view.getUint8(PciReg.INTERRUPT_PIN);
  }

  /** The BAR at `index`, or undefined when the slot is empty or the upper half of a 64-bit BAR. */
  bar(index: number): BarInfo | undefined {
    return this.barSlots[index];
  }
  /** Every implemented BAR. */
  get bars(): BarInfo[] {
    return this.barSlots.filter((b): b is BarInfo => b !== undefined);
  }
  /** The address BAR `index` decodes (0n for an empty slot). */
  barAddress(index: number): bigint {
    const b = this.barSlots[index];
    return b ? this.barAddressIn(this.view, b) : 0n;
  }

  private barAddressIn(view: DataView, b: BarInfo): bigint {
    const off = barOffset(b.index);
    const lo = view.getUint32(off, true);
    if (b.type === 'io') return BigInt((lo & PciBar.IO_MASK) >>> 0);
    const low = BigInt((lo & PciBar.MEM_MASK) >>> 0);
    return b.type === 'mem64' ? (BigInt(view.getUint32(off + 4, true)) << 32n) | low : low;
  }

  get romAddress(): number {
    return (this.view.getUint32(PciReg.ROM_ADDRESS, true) & PciRom.ADDRESS_MASK) >>> 0;
  }
  get romEnabled(): boolean {
    return (this.view.getUint32(PciReg.ROM_ADDRESS, true) & PciRom.ENABLE) !== 0;
  }

  /** The first capability of `type`. */
  findCapability(type: CapabilityType): PlacedCapability | undefined {
    return this.capabilities.find((c) => c.description.type === type);
  }

  /** The MSI capability's state, or undefined without one. */
  msiState(): MsiState | undefined {
    const c = this.findCapability('msi');
    return c && decodeMsi(this.view, c.offset);
  }

  /** The MSI-X Message Control, or undefined without MSI-X. */
  msixControl(): MsixControl | undefined {
    const c = this.findCapability('msix');
    return c && decodeMsixControl(this.view, c.offset);
  }

  /** Set or clear STATUS bits from the device side (e.g. INTERRUPT while INTx is asserted, error bits). */
  setStatusBits(bits: number, on: boolean): void {
    const s = this.status;
    this.view.setUint16(PciReg.STATUS, on ? s | bits : s & ~bits, true);
  }

  /** Device-side store: no masks, no refusals, no events (for registers the device itself updates). */
  poke(offset: number, data: Uint8Array): void {
    this.checkRange(offset, data.length);
    this.bytes.set(data, offset);
  }

  /** Restore the power-on contents (BARs, COMMAND, capabilities...) and emit 'reset'. */
  reset(): void {
    this.bytes.set(this.initial);
    this.emit('reset');
  }
}
