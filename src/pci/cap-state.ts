/**
 * Capability state as the device sees it, and the side effects of a guest write
 * to a capability: MSI and MSI-X control decoded, MME clamped to MMC,
 * unsupported power states ignored, FLR requests reported.
 */

import { msiLayout, type PlacedCapability } from './caps.js';
import { PciExp, PciMsi, PciMsix, PciPm } from './regs.js';

/** MSI state decoded from the capability registers. */
export interface MsiState {
  enabled: boolean;
  /** Vectors the function can use (Multiple Message Capable). */
  capableVectors: number;
  /** Vectors software allocated (Multiple Message Enable). */
  allocatedVectors: number;
  address64: boolean;
  perVectorMask: boolean;
  address: bigint;
  data: number;
  /** Per-vector mask bits (0 without per-vector masking). */
  mask: number;
  /** Per-vector pending bits (0 without per-vector masking). */
  pending: number;
}

/** Decode the MSI capability at `off` of a config space view. */
export function decodeMsi(view: DataView, off: number): MsiState {
  const flags = view.getUint16(off + PciMsi.FLAGS, true);
  const layout = msiLayout(flags);
  const address64 = (flags & PciMsi.FLAGS_64BIT) !== 0;
  const lo = BigInt(view.getUint32(off + PciMsi.ADDRESS_LO, true));
  const hi = address64 ? BigInt(view.getUint32(off + PciMsi.ADDRESS_HI, true)) : 0n;
  return {
    enabled: (flags & PciMsi.FLAGS_ENABLE) !== 0,
    capableVectors: 1 << ((flags & PciMsi.FLAGS_QMASK) >> 1),
    allocatedVectors: 1 << ((flags & PciMsi.FLAGS_QSIZE) >> 4),
    address64,
    perVectorMask: layout.mask !== undefined,
    address: (hi << 32n) | lo,
    data: view.getUint16(off + layout.data, true),
    mask: layout.mask === undefined ? 0 : view.getUint32(off + layout.mask, true),
    pending: layout.pending === undefined ? 0 : view.getUint32(off + layout.pending, true),
  };
}

/** MSI-X Message Control decoded. */
export interface MsixControl {
  enabled: boolean;
  functionMask: boolean;
  tableSize: number;
}

export function decodeMsixControl(view: DataView, off: number): MsixControl {
  const flags = view.getUint16(off + PciMsix.FLAGS, true);
  return {
    enabled: (flags & PciMsix.FLAGS_ENABLE) !== 0,
    functionMask: (flags & PciMsix.FLAGS_MASKALL) !== 0,
    tableSize: (flags & PciMsix.FLAGS_QSIZE) + 1,
  };
}

/** Side effects of a capability write, for the config space to emit as events. */
export type CapabilityEffect =
  | { kind: 'msi'; state: MsiState }
  | { kind: 'msix'; control: MsixControl }
  | { kind: 'power-state'; state: number; previous: number }
  | { kind: 'flr' };

/** What a capability write hook sees. */
export interface CapabilityWriteContext {
  readonly cap: PlacedCapability;
  /** The whole config space after the masks were applied (the hook may fix bytes up). */
  readonly now: DataView;
  /** The whole config space before the write. */
  readonly before: DataView;
  /** The byte the guest wrote at config offset `off`, or undefined when the write did not cover it. */
  written(off: number): number | undefined;
}

/**
 * Fix up and report the effects of a guest write that touched `ctx.cap`:
 * MME clamped to MMC, unsupported power states ignored, FLR requests, and a
 * state change event for MSI / MSI-X / PM.
 */
export function capabilityAfterWrite(ctx: CapabilityWriteContext): CapabilityEffect[] {
  const { cap, now, before } = ctx;
  const off = cap.offset;
  const changed = (): boolean => {
    for (let i = off; i < off + cap.size; i++) if (now.getUint8(i) !== before.getUint8(i)) return true;
    return false;
  };
  switch (cap.template.type) {
    case 'msi': {
      const flags = now.getUint16(off + PciMsi.FLAGS, true);
      const mmc = (flags & PciMsi.FLAGS_QMASK) >> 1;
      const mme = (flags & PciMsi.FLAGS_QSIZE) >> 4;
      // Software must not enable more vectors than the function can use; clamp rather than lie.
      if (mme > mmc) now.setUint16(off + PciMsi.FLAGS, (flags & ~PciMsi.FLAGS_QSIZE) | (mmc << 4), true);
      return changed() ? [{ kind: 'msi', state: decodeMsi(now, off) }] : [];
    }
    case 'msix':
      return changed() ? [{ kind: 'msix', control: decodeMsixControl(now, off) }] : [];
    case 'pm': {
      const reg = off + PciPm.CTRL;
      const ctrl = now.getUint16(reg, true);
      const previous = before.getUint16(reg, true) & PciPm.CTRL_STATE_MASK;
      let state = ctrl & PciPm.CTRL_STATE_MASK;
      const pmc = now.getUint16(off + PciPm.PMC, true);
      // A write of an unsupported D-state is ignored: the state stays what it was.
      if ((state === 1 && !(pmc & PciPm.CAP_D1)) || (state === 2 && !(pmc & PciPm.CAP_D2))) {
        state = previous;
        now.setUint16(reg, (ctrl & ~PciPm.CTRL_STATE_MASK) | state, true);
      }
      return state !== previous ? [{ kind: 'power-state', state, previous }] : [];
    }
    case 'express': {
      const hiByte = ctx.written(off + PciExp.DEVCTL + 1);
      const devcap = now.getUint32(off + PciExp.DEVCAP, true);
      if (hiByte !== undefined && hiByte & (PciExp.DEVCTL_BCR_FLR >> 8) && devcap & PciExp.DEVCAP_FLR) {
        return [{ kind: 'flr' }];
      }
      return [];
    }
    default:
      return [];
  }
}
