/**
 * The capability list: plain descriptions of the capabilities a device offers,
 * the bytes and per-byte write rules each one starts with, and their placement
 * in config space.
 *
 * Each capability is a template: its initial bytes, a write mask (bits the guest
 * may change), a write-1-to-clear mask, and per-byte refusals (capability
 * headers are refused with EPERM, as libvfio-user does). The config space
 * applies a guest write through those masks and then calls
 * capabilityAfterWrite (cap-state.ts) for the side effects (MSI enable, MSI-X function
 * mask, power state, FLR).
 *
 * Standard capabilities go at 0x40 upwards, dword-aligned, chained through their
 * next bytes from CAPABILITY_LIST in description order. Extended capabilities
 * (PCIe only) go at 0x100 upwards and are chained through the 12-bit next field
 * of their 32-bit header; the first one must sit at 0x100.
 *
 * Deviations from libvfio-user's pci_caps.c, where it is stricter or looser than the spec:
 *  - it refuses writes of any other width or place than a 2-byte write to PMCSR,
 *    MSI-X Message Control or PCIe DEVCTL (EINVAL/ENOTSUP); we accept any width and
 *    ignore read-only bits, as hardware does (Linux writes e.g. LNKCTL and DEVCTL2);
 *  - it stores a PMCSR write whole; we mask it (power state, PME enable, PME status RW1C)
 *    and ignore a write of an unsupported D1/D2 state;
 *  - it has no MSI capability (ENOTSUP); we emulate one, clamping MME to MMC.
 * Kept from it: header bytes (id/next, vendor length, extended headers) and DSN are
 * refused with EPERM; vendor payloads are guest-writable; FLR without the FLR
 * capability bit is refused with EINVAL.
 */

import { PciError, hex } from './errors.js';
import {
  PCI_CAP_LIST_NEXT,
  PCI_CFG_SPACE_SIZE,
  PCI_STD_HEADER_SIZEOF,
  PciCapId,
  PciExp,
  PciExtCap,
  PciExtCapId,
  PciMsi,
  PciMsix,
  PciPm,
} from './regs.js';

interface Placement {
  /** Fixed offset in config space; by default the next free dword after the previous capability. */
  offset?: number;
}

/** PCI Power Management capability, version 3 (PCI PM 1.2). */
export interface PmCapabilityDescription extends Placement {
  type: 'pm';
  d1?: boolean;
  d2?: boolean;
  /** PME# support, the 5-bit field PMC[15:11] (bit 0 = from D0 ... bit 4 = from D3cold). Default 0. */
  pmeSupport?: number;
  /** No_Soft_Reset: the function keeps its state across D3hot -> D0. Default false. */
  noSoftReset?: boolean;
}

/** Message Signalled Interrupts. */
export interface MsiCapabilityDescription extends Placement {
  type: 'msi';
  /** Multiple Message Capable: vectors the function can use (power of two, 1..32). Default 1. */
  vectors?: number;
  /** 64-bit message address. Default true. */
  address64?: boolean;
  /** Per-vector mask and pending registers. Default false. */
  perVectorMask?: boolean;
}

/** MSI-X; the table and PBA live in memory BARs (see msix.ts). */
export interface MsixCapabilityDescription extends Placement {
  type: 'msix';
  /** Number of table entries, 1..2048. */
  tableSize: number;
  tableBar: number;
  /** Offset of the table in its BAR, 8-byte aligned. */
  tableOffset: number;
  pbaBar: number;
  /** Offset of the PBA in its BAR, 8-byte aligned. */
  pbaOffset: number;
}

/** PCI Express capability, version 2, for an endpoint. */
export interface ExpressCapabilityDescription extends Placement {
  type: 'express';
  /** Default 'endpoint'. A root-complex integrated endpoint has no link (link registers read 0). */
  deviceType?: 'endpoint' | 'legacy-endpoint' | 'rc-endpoint';
  /** Max_Payload_Size supported, bytes. Default 128. */
  maxPayloadSize?: 128 | 256 | 512 | 1024 | 2048 | 4096;
  /** Function Level Reset capable (DEVCAP bit 28). Default false. */
  flr?: boolean;
  /** Extended (8-bit) tag field supported. Default false. */
  extendedTag?: boolean;
  /** Link speed generation: 1 = 2.5 GT/s, 2 = 5, 3 = 8, 4 = 16, 5 = 32, 6 = 64. Default 1. */
  linkSpeed?: number;
  /** Link width (lanes). Default 1. */
  linkWidth?: number;
  /** Interrupt Message Number (FLAGS bits 13..9). Default 0. */
  interruptMessageNumber?: number;
}

/** Vendor-specific capability: id, next, length byte, then the payload. */
export interface VendorCapabilityDescription extends Placement {
  type: 'vendor';
  payload: Uint8Array | readonly number[];
  /** Refuse guest writes to the payload (EPERM). Default false: libvfio-user lets the guest write it. */
  readOnly?: boolean;
}

/** Device Serial Number extended capability (read-only). */
export interface DsnCapabilityDescription extends Placement {
  type: 'dsn';
  serial: bigint;
}

/** Vendor-specific extended capability (VSEC). */
export interface ExtVendorCapabilityDescription extends Placement {
  type: 'ext-vendor';
  vsecId: number;
  vsecRev?: number;
  payload: Uint8Array | readonly number[];
  readOnly?: boolean;
}

export type CapabilityDescription =
  | PmCapabilityDescription
  | MsiCapabilityDescription
  | MsixCapabilityDescription
  | ExpressCapabilityDescription
  | VendorCapabilityDescription
  | DsnCapabilityDescription
  | ExtVendorCapabilityDescription;

export type CapabilityType = CapabilityDescription['type'];

/** Per-byte refusal codes of a write. */
export const Refuse = {
  NONE: 0,
  /** Read-only register the library refuses: EINVAL. */
  READ_ONLY: 1,
  /** Capability header or read-only capability: EPERM. */
  CAP_READ_ONLY: 2,
  /** Config space no register or capability claims: EINVAL. */
  UNCLAIMED: 3,
} as const;

/** A capability's initial bytes and write rules, before placement. */
export interface CapabilityTemplate {
  readonly type: CapabilityType;
  readonly id: number;
  readonly extended: boolean;
  readonly size: number;
  readonly bytes: Uint8Array;
  readonly wmask: Uint8Array;
  readonly w1cmask: Uint8Array;
  /** {@link Refuse} code per byte. */
  readonly refuse: Uint8Array;
  /** Bits that make a write refused (EINVAL) when written as 1. */
  readonly badBits: Uint8Array;
}

/** A capability at its place in config space. */
export interface PlacedCapability {
  readonly description: CapabilityDescription;
  readonly template: CapabilityTemplate;
  readonly offset: number;
  readonly size: number;
}

const EXTENDED_TYPES: ReadonlySet<CapabilityType> = new Set(['dsn', 'ext-vendor']);

export function isExtended(type: CapabilityType): boolean {
  return EXTENDED_TYPES.has(type);
}

function bad(message: string): PciError {
  return new PciError('ERR_PCI_BAD_DESCRIPTION', message);
}

/** Version of the extended capabilities we build (DSN and VSEC are both version 1). */
const EXT_CAP_VERSION = 1;

/** Little-endian multi-byte stores into the template arrays. */
function put16(a: Uint8Array, off: number, v: number): void {
  a[off] = v & 0xff;
  a[off + 1] = (v >>> 8) & 0xff;
}
function put32(a: Uint8Array, off: number, v: number): void {
  put16(a, off, v & 0xffff);
  put16(a, off + 2, (v >>> 16) & 0xffff);
}

class TemplateBuilder {
  readonly bytes: Uint8Array;
  readonly wmask: Uint8Array;
  readonly w1cmask: Uint8Array;
  readonly refuse: Uint8Array;
  readonly badBits: Uint8Array;

  constructor(
    readonly type: CapabilityType,
    readonly id: number,
    readonly size: number,
  ) {
    this.bytes = new Uint8Array(size);
    this.wmask = new Uint8Array(size);
    this.w1cmask = new Uint8Array(size);
    this.refuse = new Uint8Array(size);
    this.badBits = new Uint8Array(size);
    const extended = isExtended(type);
    if (extended) {
      put32(this.bytes, 0, id | (EXT_CAP_VERSION << PciExtCap.VERSION_SHIFT));
    } else {
      this.bytes[0] = id;
    }
    this.refuseRange(0, extended ? PciExtCap.HEADER_SIZEOF : 2, Refuse.CAP_READ_ONLY);
  }

  refuseRange(off: number, len: number, code: number): this {
    this.refuse.fill(code, off, off + len);
    return this;
  }
  u16(off: number, value: number, wmask = 0, w1c = 0): this {
    put16(this.bytes, off, value);
    put16(this.wmask, off, wmask);
    put16(this.w1cmask, off, w1c);
    return this;
  }
  u32(off: number, value: number, wmask = 0, w1c = 0): this {
    put32(this.bytes, off, value);
    put32(this.wmask, off, wmask);
    put32(this.w1cmask, off, w1c);
    return this;
  }
  build(): CapabilityTemplate {
    return {
      type: this.type,
      id: this.id,
      extended: isExtended(this.type),
      size: this.size,
      bytes: this.bytes,
      wmask: this.wmask,
      w1cmask: this.w1cmask,
      refuse: this.refuse,
      badBits: this.badBits,
    };
  }
}

function intIn(v: number, lo: number, hi: number): boolean {
  return Number.isInteger(v) && v >= lo && v <= hi;
}

function pmTemplate(d: PmCapabilityDescription): CapabilityTemplate {
  const pme = d.pmeSupport ?? 0;
  if (!intIn(pme, 0, 0x1f)) throw bad(`PM pmeSupport ${pme} is not a 5-bit field`);
  const pmc = 3 | (d.d1 ? PciPm.CAP_D1 : 0) | (d.d2 ? PciPm.CAP_D2 : 0) | (pme << PciPm.CAP_PME_SHIFT);
  const ctrl = d.noSoftReset ? PciPm.CTRL_NO_SOFT_RESET : 0;
  const ctrlW = PciPm.CTRL_STATE_MASK | (pme ? PciPm.CTRL_PME_ENABLE : 0);
  const ctrlW1c = pme ? PciPm.CTRL_PME_STATUS : 0;
  return new TemplateBuilder('pm', PciCapId.PM, PciPm.SIZEOF)
    .u16(PciPm.PMC, pmc)
    .u16(PciPm.CTRL, ctrl, ctrlW, ctrlW1c)
    .build();
}

/** Register offsets of an MSI capability with the given Message Control flags. */
export function msiLayout(flags: number): { data: number; mask: number | undefined; pending: number | undefined; size: number } {
  const is64 = (flags & PciMsi.FLAGS_64BIT) !== 0;
  const maskbit = (flags & PciMsi.FLAGS_MASKBIT) !== 0;
  const data = is64 ? PciMsi.DATA_64 : PciMsi.DATA_32;
  if (!maskbit) return { data, mask: undefined, pending: undefined, size: data + 2 };
  const mask = is64 ? PciMsi.MASK_64 : PciMsi.MASK_32;
  const pending = is64 ? PciMsi.PENDING_64 : PciMsi.PENDING_32;
  return { data, mask, pending, size: pending + 4 };
}

function msiTemplate(d: MsiCapabilityDescription): CapabilityTemplate {
  const vectors = d.vectors ?? 1;
  const log2 = Math.log2(vectors);
  if (!intIn(log2, 0, 5)) throw bad(`MSI vectors ${vectors} is not a power of two in 1..32`);
  const flags =
    (log2 << 1) | ((d.address64 ?? true) ? PciMsi.FLAGS_64BIT : 0) | (d.perVectorMask ? PciMsi.FLAGS_MASKBIT : 0);
  const layout = msiLayout(flags);
  const b = new TemplateBuilder('msi', PciCapId.MSI, layout.size)
    .u16(PciMsi.FLAGS, flags, PciMsi.FLAGS_ENABLE | PciMsi.FLAGS_QSIZE)
    .u32(PciMsi.ADDRESS_LO, 0, 0xfffffffc);
  if (flags & PciMsi.FLAGS_64BIT) b.u32(PciMsi.ADDRESS_HI, 0, 0xffffffff);
  b.u16(layout.data, 0, 0xffff);
  if (layout.mask !== undefined) b.u32(layout.mask, 0, vectors === 32 ? 0xffffffff : (1 << vectors) - 1);
  return b.build();
}

function checkMsixLocation(what: string, bar: number, offset: number): void {
  if (!intIn(bar, 0, 5)) throw bad(`MSI-X ${what} BAR ${bar} is not 0..5`);
  if (!intIn(offset, 0, 0xfffffff8) || offset % 8 !== 0) {
    throw bad(`MSI-X ${what} offset ${offset} is not an 8-byte aligned 32-bit offset`);
  }
}

function msixTemplate(d: MsixCapabilityDescription): CapabilityTemplate {
  if (!intIn(d.tableSize, 1, PciMsix.MAX_VECTORS)) throw bad(`MSI-X table size ${d.tableSize} is not 1..2048`);
  checkMsixLocation('table', d.tableBar, d.tableOffset);
  checkMsixLocation('PBA', d.pbaBar, d.pbaOffset);
  return new TemplateBuilder('msix', PciCapId.MSIX, PciMsix.SIZEOF)
    .u16(PciMsix.FLAGS, d.tableSize - 1, PciMsix.FLAGS_ENABLE | PciMsix.FLAGS_MASKALL)
    .u32(PciMsix.TABLE, (d.tableOffset | d.tableBar) >>> 0)
    .u32(PciMsix.PBA, (d.pbaOffset | d.pbaBar) >>> 0)
    .build();
}

const EXP_TYPES = {
  endpoint: PciExp.TYPE_ENDPOINT,
  'legacy-endpoint': PciExp.TYPE_LEG_END,
  'rc-endpoint': PciExp.TYPE_RC_END,
} as const;

function expressTemplate(d: ExpressCapabilityDescription): CapabilityTemplate {
  const type = EXP_TYPES[d.deviceType ?? 'endpoint'];
  if (type === undefined) throw bad(`PCIe device type ${String(d.deviceType)} is not supported`);
  const mps = d.maxPayloadSize ?? 128;
  const mpsCode = Math.log2(mps / 128);
  if (!intIn(mpsCode, 0, 5)) throw bad(`PCIe max payload size ${mps} is not 128..4096`);
  const speed = d.linkSpeed ?? 1;
  if (!intIn(speed, 1, 6)) throw bad(`PCIe link speed ${speed} is not 1..6`);
  const width = d.linkWidth ?? 1;
  if (![1, 2, 4, 8, 12, 16, 32].includes(width)) throw bad(`PCIe link width ${width} is not a valid lane count`);
  const irq = d.interruptMessageNumber ?? 0;
  if (!intIn(irq, 0, 31)) throw bad(`PCIe interrupt message number ${irq} is not 0..31`);
  const hasLink = type !== PciExp.TYPE_RC_END;

  const flags = 2 | (type << 4) | (irq << 9);
  const devcap =
    mpsCode | (d.extendedTag ? PciExp.DEVCAP_EXT_TAG : 0) | PciExp.DEVCAP_RBER | (d.flr ? PciExp.DEVCAP_FLR : 0);
  // Reset values from the spec: relaxed ordering and no-snoop enabled, 512-byte read requests.
  const devctl = PciExp.DEVCTL_RELAX_EN | PciExp.DEVCTL_NOSNOOP_EN | 0x2000;
  const devctlW =
    PciExp.DEVCTL_CERE |
    PciExp.DEVCTL_NFERE |
    PciExp.DEVCTL_FERE |
    PciExp.DEVCTL_URRE |
    PciExp.DEVCTL_RELAX_EN |
    PciExp.DEVCTL_PAYLOAD |
    (d.extendedTag ? PciExp.DEVCTL_EXT_TAG : 0) |
    PciExp.DEVCTL_NOSNOOP_EN |
    PciExp.DEVCTL_READRQ;
  const devsta1c = PciExp.DEVSTA_CED | PciExp.DEVSTA_NFED | PciExp.DEVSTA_FED | PciExp.DEVSTA_URD;
  const lnkctlW = PciExp.LNKCTL_ASPMC | PciExp.LNKCTL_RCB | PciExp.LNKCTL_CCC | PciExp.LNKCTL_ES | PciExp.LNKCTL_HAWD;

  const b = new TemplateBuilder('express', PciCapId.EXP, PciExp.SIZEOF_V2)
    .u16(PciExp.FLAGS, flags)
    .u32(PciExp.DEVCAP, devcap)
    .u16(PciExp.DEVCTL, devctl, devctlW)
    .u16(PciExp.DEVSTA, 0, 0, devsta1c)
    .u32(PciExp.DEVCAP2, PciExp.DEVCAP2_COMP_TMOUT_DIS)
    .u16(PciExp.DEVCTL2, 0, PciExp.DEVCTL2_COMP_TMOUT_DIS);
  if (hasLink) {
    b.u32(PciExp.LNKCAP, speed | (width << 4))
      .u16(PciExp.LNKCTL, 0, lnkctlW)
      .u16(PciExp.LNKSTA, speed | (width << PciExp.LNKSTA_NLW_SHIFT))
      .u32(PciExp.LNKCAP2, ((1 << speed) - 1) << PciExp.LNKCAP2_SLS_SHIFT)
      .u16(PciExp.LNKCTL2, speed);
  }
  // Initiate FLR is a command, not state: it always reads 0. Without FLR capability it is refused,
  // as libvfio-user does.
  if (!d.flr) put16(b.badBits, PciExp.DEVCTL, PciExp.DEVCTL_BCR_FLR);
  return b.build();
}

function payloadBytes(p: Uint8Array | readonly number[], what: string): Uint8Array {
  for (const v of p) if (!intIn(v, 0, 0xff)) throw bad(`${what} payload byte ${v} is not 0..255`);
  return Uint8Array.from(p);
}

function vendorTemplate(d: VendorCapabilityDescription): CapabilityTemplate {
  const payload = payloadBytes(d.payload, 'vendor capability');
  const size = 3 + payload.length;
  if (size > 0xff) throw bad(`vendor capability of ${size} bytes exceeds the 8-bit length`);
  const b = new TemplateBuilder('vendor', PciCapId.VNDR, size);
  b.bytes[2] = size;
  b.bytes.set(payload, 3);
  b.refuseRange(2, 1, Refuse.CAP_READ_ONLY);
  if (d.readOnly) b.refuseRange(3, payload.length, Refuse.CAP_READ_ONLY);
  else b.wmask.fill(0xff, 3);
  return b.build();
}

function dsnTemplate(d: DsnCapabilityDescription): CapabilityTemplate {
  if (typeof d.serial !== 'bigint' || d.serial < 0n || d.serial >= 1n << 64n) {
    throw bad('DSN serial is not a 64-bit unsigned bigint');
  }
  const b = new TemplateBuilder('dsn', PciExtCapId.DSN, PciExtCap.DSN_SIZEOF)
    .u32(4, Number(d.serial & 0xffffffffn))
    .u32(8, Number(d.serial >> 32n));
  return b.refuseRange(0, PciExtCap.DSN_SIZEOF, Refuse.CAP_READ_ONLY).build();
}

function extVendorTemplate(d: ExtVendorCapabilityDescription): CapabilityTemplate {
  const payload = payloadBytes(d.payload, 'vendor extended capability');
  const size = PciExtCap.VNDR_HEADER_SIZEOF + payload.length;
  const rev = d.vsecRev ?? 0;
  if (!intIn(d.vsecId, 0, 0xffff)) throw bad(`VSEC id ${d.vsecId} is not 16-bit`);
  if (!intIn(rev, 0, 0xf)) throw bad(`VSEC revision ${rev} is not 4-bit`);
  if (size > 0xfff) throw bad(`vendor extended capability of ${size} bytes exceeds the 12-bit length`);
  const b = new TemplateBuilder('ext-vendor', PciExtCapId.VNDR, size).u32(
    PciExtCap.VNDR_HEADER,
    (d.vsecId | (rev << 16) | (size << 20)) >>> 0,
  );
  b.bytes.set(payload, PciExtCap.VNDR_HEADER_SIZEOF);
  b.refuseRange(0, PciExtCap.VNDR_HEADER_SIZEOF, Refuse.CAP_READ_ONLY);
  if (d.readOnly) b.refuseRange(PciExtCap.VNDR_HEADER_SIZEOF, payload.length, Refuse.CAP_READ_ONLY);
  else b.wmask.fill(0xff, PciExtCap.VNDR_HEADER_SIZEOF);
  return b.build();
}

/** The bytes and write rules of one capability. */
export function capabilityTemplate(d: CapabilityDescription): CapabilityTemplate {
  switch (d.type) {
    case 'pm':
      return pmTemplate(d);
    case 'msi':
      return msiTemplate(d);
    case 'msix':
      return msixTemplate(d);
    case 'express':
      return expressTemplate(d);
    case 'vendor':
      return vendorTemplate(d);
    case 'dsn':
      return dsnTemplate(d);
    case 'ext-vendor':
      return extVendorTemplate(d);
    default:
      throw bad(`unknown capability type ${String((d as { type: unknown }).type)}`);
  }
}

const roundUp4 = (n: number): number => (n + 3) & ~3;

/**
 * Place capabilities in a config space of `spaceSize` bytes: standard ones from
 * 0x40, extended ones from 0x100, each at its fixed offset or after the furthest
 * one placed so far, dword-aligned. Throws ERR_PCI_NO_SPACE when one does not
 * fit, ERR_PCI_BAD_DESCRIPTION on overlap, misalignment or extended
 * capabilities in conventional space.
 */
export function placeCapabilities(descriptions: readonly CapabilityDescription[], spaceSize: number): PlacedCapability[] {
  const placed: PlacedCapability[] = [];
  let nextStd = PCI_STD_HEADER_SIZEOF;
  let nextExt = PCI_CFG_SPACE_SIZE;
  let firstExt = true;
  for (const description of descriptions) {
    const template = capabilityTemplate(description);
    const { extended, size } = template;
    if (extended && spaceSize <= PCI_CFG_SPACE_SIZE) {
      throw bad(`extended capability '${description.type}' needs a PCI Express (4 KiB) config space`);
    }
    const lo = extended ? PCI_CFG_SPACE_SIZE : PCI_STD_HEADER_SIZEOF;
    const hi = extended ? spaceSize : PCI_CFG_SPACE_SIZE;
    let offset: number;
    if (description.offset !== undefined) {
      offset = description.offset;
      if (!Number.isInteger(offset) || offset % 4 !== 0 || offset < lo) {
        throw bad(`capability '${description.type}' offset ${offset} is not dword-aligned at or after ${hex(lo)}`);
      }
    } else {
      offset = roundUp4(extended ? nextExt : nextStd);
    }
    if (extended && firstExt && offset !== PCI_CFG_SPACE_SIZE) {
      throw bad(`the first extended capability must be at ${hex(PCI_CFG_SPACE_SIZE)}, not ${hex(offset)}`);
    }
    if (offset + size > hi) {
      throw new PciError(
        'ERR_PCI_NO_SPACE',
        `no config space left for capability '${description.type}' of ${size} bytes at ${hex(offset)}`,
      );
    }
    for (const other of placed) {
      if (offset < other.offset + other.size && other.offset < offset + size) {
        throw bad(`capability '${description.type}' at ${hex(offset)} overlaps '${other.description.type}' at ${hex(other.offset)}`);
      }
    }
    placed.push({ description, template, offset, size });
    if (extended) {
      firstExt = false;
      nextExt = Math.max(nextExt, offset + size);
    } else {
      nextStd = Math.max(nextStd, offset + size);
    }
  }
  return placed;
}

/** Write the placed capabilities' bytes and next pointers into `bytes`; returns the first standard offset (0 if none). */
export function linkCapabilities(bytes: Uint8Array, placed: readonly PlacedCapability[]): number {
  const std = placed.filter((c) => !c.template.extended);
  const ext = placed.filter((c) => c.template.extended);
  for (const c of placed) bytes.set(c.template.bytes, c.offset);
  std.forEach((c, i) => {
    bytes[c.offset + PCI_CAP_LIST_NEXT] = std[i + 1]?.offset ?? 0;
  });
  ext.forEach((c, i) => {
    const next = ext[i + 1]?.offset ?? 0;
    // Bits 31..20 of the header dword hold the next offset: the top 12 bits of bytes 2..3.
    bytes[c.offset + 2] = (bytes[c.offset + 2]! & 0x0f) | ((next & 0xf) << 4);
    bytes[c.offset + 3] = next >>> 4;
  });
  return std[0]?.offset ?? 0;
}
