/**
 * The error class of the virtqueue engine. A malformed ring or chain (the
 * driver's fault) marks the queue broken; the vhost-user back-end then reports
 * it (VRING_ERR / NEEDS_RESET). Misuse by the device side (pushing an id that
 * is not in flight) throws without breaking the queue.
 */

export type VirtioErrorCode =
  /** An address range (buffer, indirect table, ring) is not inside guest memory, or not a safe integer. */
  | 'GPA_OUT_OF_RANGE'
  /** A front-end virtual address range is not inside one region. */
  | 'UVA_OUT_OF_RANGE'
  /** A region added to GuestMemory overlaps an existing one (guest-physical or front-end-virtual range). */
  | 'REGION_OVERLAP'
  /** A descriptor index (avail ring entry, `next`) is not below the table size. */
  | 'DESC_INDEX'
  /** A chain visits more descriptors than its table holds: it loops. */
  | 'DESC_LOOP'
  /** A chain has more descriptors than allowed (queue size by default, `maxChainLength`). */
  | 'CHAIN_TOO_LONG'
  /** An INDIRECT descriptor inside an indirect table. */
  | 'NESTED_INDIRECT'
  /** An indirect table length of 0 or not a multiple of 16. */
  | 'INDIRECT_LENGTH'
  /** INDIRECT set while VIRTIO_F_INDIRECT_DESC was not negotiated. */
  | 'INDIRECT_NOT_NEGOTIATED'
  /** INDIRECT and NEXT on the same descriptor (the spec forbids it). */
  | 'INDIRECT_NEXT'
  /** The chain's total length is above 2^32 - 1. */
  | 'LENGTH_OVERFLOW'
  /** A device-readable descriptor after a device-writable one. */
  | 'WRITE_BEFORE_READ'
  /** The driver's avail idx moved more than the queue size past the device's next avail idx. */
  | 'AVAIL_IDX'
  /** The driver made available a chain whose id (split head / packed buffer id) is still in flight. */
  | 'ID_IN_USE'
  /** Ring addresses not in one region, misaligned, a bad queue size or base. */
  | 'RING_LAYOUT'
  /** The queue was marked broken earlier. */
  | 'BROKEN'
  /** push() of a chain that is not in flight on this queue (device-side misuse; the queue is not broken). */
  | 'USED_ID'
  /** An inflight region too small, or its header does not match the queue. */
  | 'INFLIGHT_LAYOUT';

export class VirtioError extends Error {
  /** Stable machine-readable code. */
  readonly code: VirtioErrorCode;

  constructor(code: VirtioErrorCode, message: string) {
    super(message);
    this.name = 'VirtioError';
    this.code = code;
  }
}

/** `0x1f` style hex for messages. */
export function hex(n: number): string {
  return `0x${n.toString(16)}`;
}
