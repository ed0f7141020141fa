/**
 * The error class of the pci layer. Every refused access carries the Linux
 * errno the vfio-user server puts in its error reply (libvfio-user answers a
 * refused config-space write with EINVAL, a write to a capability header or a
 * read-only capability with EPERM).
 */

/** Linux errno values used by this layer. */
export const PciErrno = {
  EPERM: 1,
  EINVAL: 22,
  ENOSPC: 28,
  ENOTSUP: 95,
} as const;

export type PciErrorCode =
  /** Offset/length outside the space, or not an integer. errno EINVAL. */
  | 'ERR_PCI_OUT_OF_RANGE'
  /** Write to a read-only register the library refuses (vendor ID, header type...). errno EINVAL. */
  | 'ERR_PCI_READ_ONLY'
  /** Write to a capability header or a read-only capability. errno EPERM. */
  | 'ERR_PCI_CAP_READ_ONLY'
  /** A value the register does not accept (reserved COMMAND bits, FLR without FLR capability). errno EINVAL. */
  | 'ERR_PCI_BAD_VALUE'
  /** Width or alignment the register does not support (MSI-X table: aligned dword/qword only). errno EINVAL. */
  | 'ERR_PCI_BAD_ACCESS'
  /** The device description is inconsistent (bad BAR size, BAR overlap, bad capability...). errno EINVAL. */
  | 'ERR_PCI_BAD_DESCRIPTION'
  /** The capabilities do not fit in the config space. errno ENOSPC. */
  | 'ERR_PCI_NO_SPACE'
  /** A vector number outside the table (device-side misuse). errno EINVAL. */
  | 'ERR_PCI_BAD_VECTOR';

const ERRNO_OF: Record<PciErrorCode, number> = {
  ERR_PCI_OUT_OF_RANGE: PciErrno.EINVAL,
  ERR_PCI_READ_ONLY: PciErrno.EINVAL,
  ERR_PCI_CAP_READ_ONLY: PciErrno.EPERM,
  ERR_PCI_BAD_VALUE: PciErrno.EINVAL,
  ERR_PCI_BAD_ACCESS: PciErrno.EINVAL,
  ERR_PCI_BAD_DESCRIPTION: PciErrno.EINVAL,
  ERR_PCI_NO_SPACE: PciErrno.ENOSPC,
  ERR_PCI_BAD_VECTOR: PciErrno.EINVAL,
};

export class PciError extends Error {
  /** Stable machine-readable code. */
  readonly code: PciErrorCode;
  /** Linux errno (positive) for the error reply. */
  readonly errno: number;
  /** Offset of the refused access within its space, when there is one. */
  readonly offset: number | undefined;

  constructor(code: PciErrorCode, message: string, offset?: number) {
    super(message);
    this.name = 'PciError';
    this.code = code;
    this.errno = ERRNO_OF[code];
    this.offset = offset;
  }
}

/** `0x1f` style hex for messages. */
export function hex(n: number | bigint): string {
  return `0x${n.toString(16)}`;
}
