/**
 * Interrupt message emulation: the MSI-X table and Pending Bit Array that live
 * in a memory BAR, and the MSI equivalent driven by the MSI capability.
 *
 * A device calls trigger(vector). The controller either delivers at once (the
 * `deliver` callback gets the vector; a vfio-user server signals that vector's
 * eventfd, and message(vector) gives the address/data the guest programmed) or,
 * when the vector cannot be sent, records it as pending and delivers it when it
 * becomes sendable. trigger() allocates nothing.
 *
 * MSI-X table and PBA accesses must be aligned full DWORD or QWORD accesses, as
 * the PCI spec requires of software ("otherwise the result is undefined"); we
 * refuse anything else with EINVAL rather than guess. The PBA is read-only:
 * writes are accepted and ignored. Delivery does not look at COMMAND.MASTER:
 * with vfio-user the VMM injects the interrupt from the eventfd.
 */

import type { PciConfigSpace } from './config-space.js';
import { msiLayout, type MsixCapabilityDescription } from './caps.js';
import type { MsiState } from './cap-state.js';
import { PciError, hex } from './errors.js';
import { PciMsi, PciMsix } from './regs.js';

/** The message a vector sends: the guest programmed it in the MSI capability or the MSI-X table. */
export interface MsiMessage {
  address: bigint;
  data: number;
}

/** Called with each vector as it is sent (from trigger(), or from the guest write that made it sendable). */
export type DeliverFn = (vector: number) => void;

/** What trigger() did: sent it, recorded it as pending, or dropped it (MSI disabled / vector not allocated). */
export type TriggerResult = 'delivered' | 'pending' | 'dropped';

/** Where the table and PBA are, as in the MSI-X capability. */
export interface MsixLayout {
  tableSize: number;
  tableBar: number;
  tableOffset: number;
  pbaBar: number;
  pbaOffset: number;
}

export interface MsixEntry {
  address: bigint;
  data: number;
  masked: boolean;
}

function badVector(vector: number, count: number): PciError {
  return new PciError('ERR_PCI_BAD_VECTOR', `vector ${vector} is not below ${count}`);
}

/** MSI-X table + PBA + Message Control state of one function. */
export class MsixController {
  readonly tableSize: number;
  readonly layout: Readonly<MsixLayout>;
  /** Table bytes: tableSize x 16. */
  readonly tableLength: number;
  /** PBA bytes: one bit per vector, in whole QWORDs. */
  readonly pbaLength: number;

  private readonly table: Uint8Array;
  private readonly tableView: DataView;
  private readonly pba: Uint8Array;
  private enabled = false;
  private functionMask = false;
  private readonly unsubscribe: (() => void)[] = [];

  constructor(
    layout: MsixLayout,
    private readonly deliver: DeliverFn,
  ) {
    const n = layout.tableSize;
    if (!Number.isInteger(n) || n < 1 || n > PciMsix.MAX_VECTORS) {
      throw new PciError('ERR_PCI_BAD_DESCRIPTION', `MSI-X table size ${n} is not 1..2048`);
    }
    this.layout = { ...layout };
    this.tableSize = n;
    this.tableLength = n * PciMsix.ENTRY_SIZE;
    this.pbaLength = Math.ceil(n / 64) * 8;
    this.table = new Uint8Array(this.tableLength);
    this.tableView = new DataView(this.table.buffer);
    this.pba = new Uint8Array(this.pbaLength);
    this.reset();
  }

  /**
   * A controller for the MSI-X capability of `config`: it follows the guest's
   * enable / function-mask writes and resets with the config space.
   */
  static attach(config: PciConfigSpace, deliver: DeliverFn): MsixController {
    const cap = config.findCapability('msix');
    if (!cap) throw new PciError('ERR_PCI_BAD_DESCRIPTION', 'the config space has no MSI-X capability');
    const d = cap.description as MsixCapabilityDescription;
    const c = new MsixController(
      { tableSize: d.tableSize, tableBar: d.tableBar, tableOffset: d.tableOffset, pbaBar: d.pbaBar, pbaOffset: d.pbaOffset },
      deliver,
    );
    const sync = (): void => {
      const ctl = config.msixControl();
      if (ctl) c.setControl(ctl.enabled, ctl.functionMask);
    };
    c.unsubscribe.push(
      config.on('msix', (ctl) => c.setControl(ctl.enabled, ctl.functionMask)),
      config.on('reset', () => {
        c.reset();
        sync();
      }),
    );
    sync();
    return c;
  }

  /** Stop following the config space. */
  detach(): void {
    for (const u of this.unsubscribe.splice(0)) u();
  }

  /** Power-on state: every vector masked, messages zero, nothing pending, disabled. */
  reset(): void {
    this.table.fill(0);
    for (let v = 0; v < this.tableSize; v++) {
      this.tableView.setUint32(v * PciMsix.ENTRY_SIZE + PciMsix.ENTRY_VECTOR_CTRL, PciMsix.ENTRY_CTRL_MASKBIT, true);
    }
    this.pba.fill(0);
    this.enabled = false;
    this.functionMask = false;
  }

  get isEnabled(): boolean {
    return this.enabled;
  }
  get isFunctionMasked(): boolean {
    return this.functionMask;
  }

  /** MSI-X Enable and Function Mask from Message Control; delivers what became sendable. */
  setControl(enabled: boolean, functionMask: boolean): void {
    this.enabled = enabled;
    this.functionMask = functionMask;
    this.flush();
  }

  private vectorMasked(v: number): boolean {
    return (this.tableView.getUint32(v * PciMsix.ENTRY_SIZE + PciMsix.ENTRY_VECTOR_CTRL, true) & PciMsix.ENTRY_CTRL_MASKBIT) !== 0;
  }

  private checkVector(v: number): void {
    if (!Number.isInteger(v) || v < 0 || v >= this.tableSize) throw badVector(v, this.tableSize);
  }

  /** True when the vector's own mask bit, the function mask, or a disabled MSI-X keeps it from being sent. */
  isMasked(vector: number): boolean {
    this.checkVector(vector);
    return !this.enabled || this.functionMask || this.vectorMasked(vector);
  }

  isPending(vector: number): boolean {
    this.checkVector(vector);
    return (this.pba[vector >> 3]! & (1 << (vector & 7))) !== 0;
  }

  entry(vector: number): MsixEntry {
    this.checkVector(vector);
    const base = vector * PciMsix.ENTRY_SIZE;
    const v = this.tableView;
    return {
      address: (BigInt(v.getUint32(base + PciMsix.ENTRY_UPPER_ADDR, true)) << 32n) | BigInt(v.getUint32(base, true)),
      data: v.getUint32(base + PciMsix.ENTRY_DATA, true),
      masked: this.vectorMasked(vector),
    };
  }

  /** The message the guest programmed for `vector`. */
  message(vector: number): MsiMessage {
    const e = this.entry(vector);
    return { address: e.address, data: e.data };
  }

  /** Send `vector` now, or set its pending bit when it is masked (per vector or function) or MSI-X is disabled. */
  trigger(vector: number): TriggerResult {
    this.checkVector(vector);
    if (this.isMasked(vector)) {
      this.pba[vector >> 3]! |= 1 << (vector & 7);
      return 'pending';
    }
    this.deliver(vector);
    return 'delivered';
  }

  /** Deliver every pending vector that is now sendable, clearing its pending bit first. */
  private flush(): void {
    if (!this.enabled || this.functionMask) return;
    for (let byte = 0; byte < this.pba.length; byte++) {
      if (this.pba[byte] === 0) continue;
      for (let bit = 0; bit < 8; bit++) {
        const v = byte * 8 + bit;
        if (this.pba[byte]! & (1 << bit) && !this.vectorMasked(v)) {
          this.pba[byte]! &= ~(1 << bit);
          this.deliver(v);
        }
      }
    }
  }

  private checkAccess(what: string, offset: number, length: number, limit: number): void {
    if (length !== 4 && length !== 8) {
      throw new PciError('ERR_PCI_BAD_ACCESS', `MSI-X ${what} access of ${length} bytes: only DWORD or QWORD`, offset);
    }
    if (!Number.isInteger(offset) || offset % length !== 0) {
      throw new PciError('ERR_PCI_BAD_ACCESS', `MSI-X ${what} access of ${length} bytes at ${offset} is misaligned`, offset);
    }
    if (offset < 0 || offset + length > limit) {
      throw new PciError('ERR_PCI_OUT_OF_RANGE', `MSI-X ${what} access at ${hex(offset)} is outside ${limit} bytes`, offset);
    }
  }

  /** Read from the table; `offset` relative to the table start. */
  readTable(offset: number, length: number): Uint8Array {
    this.checkAccess('table', offset, length, this.tableLength);
    return this.table.slice(offset, offset + length);
  }

  /** Write to the table: message address (bits 1..0 read 0), data, and the vector control mask bit. */
  writeTable(offset: number, data: Uint8Array): void {
    this.checkAccess('table', offset, data.length, this.tableLength);
    const src = new DataView(data.buffer, data.byteOffset, data.byteLength);
    let unmasked = false;
    for (let i = 0; i < data.length; i += 4) {
      const o = offset + i;
      let value = src.getUint32(i, true);
      const field = o % PciMsix.ENTRY_SIZE;
      if (field === PciMsix.ENTRY_LOWER_ADDR) value &= 0xfffffffc;
      if (field === PciMsix.ENTRY_VECTOR_CTRL) {
        value &= PciMsix.ENTRY_CTRL_MASKBIT;
        if (value === 0 && this.vectorMasked((o - field) / PciMsix.ENTRY_SIZE)) unmasked = true;
      }
      this.tableView.setUint32(o, value >>> 0, true);
    }
    if (unmasked) this.flush();
  }

  /** Read the PBA (one bit per vector; bits past the table read 0). */
  readPba(offset: number, length: number): Uint8Array {
    this.checkAccess('PBA', offset, length, this.pbaLength);
    return this.pba.slice(offset, offset + length);
  }

  /** The PBA is read-only: an aligned write is accepted and ignored. */
  writePba(offset: number, data: Uint8Array): void {
    this.checkAccess('PBA', offset, data.length, this.pbaLength);
  }

  /** True when [offset, offset+length) of BAR `bar` touches the table or the PBA. */
  claims(bar: number, offset: number, length: number): boolean {
    return this.inTable(bar, offset, length) || this.inPba(bar, offset, length);
  }

  private inTable(bar: number, offset: number, length: number): boolean {
    const l = this.layout;
    return bar === l.tableBar && offset < l.tableOffset + this.tableLength && l.tableOffset < offset + length;
  }
  private inPba(bar: number, offset: number, length: number): boolean {
    const l = this.layout;
    return bar === l.pbaBar && offset < l.pbaOffset + this.pbaLength && l.pbaOffset < offset + length;
  }

  /** A BAR read routed to the table or PBA; check claims() first. */
  barRead(bar: number, offset: number, length: number): Uint8Array {
    if (this.inTable(bar, offset, length)) return this.readTable(offset - this.layout.tableOffset, length);
    if (this.inPba(bar, offset, length)) return this.readPba(offset - this.layout.pbaOffset, length);
    throw new PciError('ERR_PCI_OUT_OF_RANGE', `BAR${bar} ${hex(offset)} is not MSI-X table or PBA`, offset);
  }

  /** A BAR write routed to the table or PBA; check claims() first. */
  barWrite(bar: number, offset: number, data: Uint8Array): void {
    if (this.inTable(bar, offset, data.length)) return this.writeTable(offset - this.layout.tableOffset, data);
    if (this.inPba(bar, offset, data.length)) return this.writePba(offset - this.layout.pbaOffset, data);
    throw new PciError('ERR_PCI_OUT_OF_RANGE', `BAR${bar} ${hex(offset)} is not MSI-X table or PBA`, offset);
  }
}

/**
 * MSI driven by the MSI capability of a config space: vectors allocated by
 * Multiple Message Enable, per-vector mask and pending bits when the capability
 * has them (pending bits live in the capability, read-only to the guest).
 */
export class MsiController {
  private readonly unsubscribe: () => void;
  private readonly flagsOffset: number;
  private readonly maskOffset: number | undefined;
  private readonly pendingOffset: number | undefined;
  private readonly scratch = new Uint8Array(4);
  private readonly scratchView = new DataView(this.scratch.buffer);

  private constructor(
    private readonly config: PciConfigSpace,
    private readonly deliver: DeliverFn,
  ) {
    const cap = config.findCapability('msi');
    if (!cap) throw new PciError('ERR_PCI_BAD_DESCRIPTION', 'the config space has no MSI capability');
    this.flagsOffset = cap.offset + PciMsi.FLAGS;
    const layout = msiLayout(config.readU16(this.flagsOffset));
    this.maskOffset = layout.mask === undefined ? undefined : cap.offset + layout.mask;
    this.pendingOffset = layout.pending === undefined ? undefined : cap.offset + layout.pending;
    this.unsubscribe = config.on('msi', () => this.flush());
  }

  static attach(config: PciConfigSpace, deliver: DeliverFn): MsiController {
    return new MsiController(config, deliver);
  }

  detach(): void {
    this.unsubscribe();
  }

  state(): MsiState {
    return this.config.msiState()!;
  }

  /** The message `vector` sends: the function puts the vector number in the low log2(allocated) bits of the data. */
  message(vector: number): MsiMessage {
    const s = this.state();
    return { address: s.address, data: (s.data & ~(s.allocatedVectors - 1)) | vector };
  }

  private pending(): number {
    return this.pendingOffset === undefined ? 0 : this.config.readU32(this.pendingOffset);
  }

  private setPending(bits: number): void {
    if (this.pendingOffset === undefined) return;
    this.scratchView.setUint32(0, bits >>> 0, true);
    this.config.poke(this.pendingOffset, this.scratch);
  }

  /**
   * Send `vector` (0 .. capable-1). Dropped when MSI is disabled or the vector is
   * not among those allocated; pending when its mask bit is set.
   */
  trigger(vector: number): TriggerResult {
    const flags = this.config.readU16(this.flagsOffset);
    const capable = 1 << ((flags & PciMsi.FLAGS_QMASK) >> 1);
    if (!Number.isInteger(vector) || vector < 0 || vector >= capable) throw badVector(vector, capable);
    const allocated = 1 << ((flags & PciMsi.FLAGS_QSIZE) >> 4);
    if (!(flags & PciMsi.FLAGS_ENABLE) || vector >= allocated) return 'dropped';
    if (this.maskOffset !== undefined && this.config.readU32(this.maskOffset) & (1 << vector)) {
      this.setPending(this.pending() | (1 << vector));
      return 'pending';
    }
    this.deliver(vector);
    return 'delivered';
  }

  isPending(vector: number): boolean {
    return (this.pending() & (1 << vector)) !== 0;
  }

  /** After a guest write to the capability: deliver pending vectors that are now unmasked. */
  private flush(): void {
    const pending = this.pending();
    if (pending === 0) return;
    const s = this.state();
    if (!s.enabled) return;
    const ready = pending & ~s.mask;
    const sendable = s.allocatedVectors === 32 ? ready : ready & ((1 << s.allocatedVectors) - 1);
    if (sendable === 0) return;
    this.setPending(pending & ~sendable);
    for (let v = 0; v < 32; v++) if (sendable & (1 << v)) this.deliver(v);
  }
}
