/**
 * The device side of a virtqueue, split or packed: pop the chains the driver
 * made available, push them back used, decide whether the driver wants an
 * interrupt, and ask for (or stop) the driver's kicks. Pure computation over
 * guest memory: no sockets, timers or event-loop objects, so a queue can run on
 * a worker thread that maps the same memory.
 *
 * Ordering: the driver-written index/flags word is read with Atomics.load
 * before the entries it publishes; used entries are written before the used
 * index (split) or the descriptor's flags (packed), which are stored with
 * Atomics.store. Guest memory is little-endian (VERSION_1); we run on
 * little-endian hosts (x86, arm64), so the Uint16Array views used for those
 * words read the right values (checked when a queue is created).
 */
import type { DmaTranslator } from './iotlb.js';
import type { DescChain, GuestMemoryView } from './types.js';
import type { DirtyLog } from './memory.js';
import type { InflightQueue } from './inflight.js';
import type { VirtioError } from './errors.js';
import { SplitQueue } from './split.js';
import { PackedQueue } from './packed.js';

export interface DeviceQueueOptions {
  memory: GuestMemoryView;
  /** Split: a power of two 1..32768; packed: 1..32768. */
  size: number;
  packed: boolean;
  /** GPA of the descriptor table (split) / descriptor ring (packed). */
  desc: number;
  /** GPA of the avail ring (split) / driver event suppression area (packed). */
  driver: number;
  /** GPA of the used ring (split) / device event suppression area (packed). */
  device: number;
  /** VIRTIO_F_EVENT_IDX negotiated. */
  eventIdx: boolean;
  /** VIRTIO_F_INDIRECT_DESC negotiated. */
  indirect: boolean;
  /**
   * SET_VRING_BASE in vhost-user encoding. Split: the next avail idx (0..65535).
   * Packed: bits 0-14 last avail idx, bit 15 avail wrap counter; bits 16-30 used
   * idx and bit 31 used wrap counter when the value is above 0xffff (else the
   * used side starts where the avail side does). Default: 0 (split), both
   * sides at 0 with wrap counters 1 (packed).
   */
  base?: number;
  /**
   * When set, every guest-memory write the queue makes or is told about is
   * marked: used-ring / descriptor-ring / event-area writes, and on push() the
   * first `written` bytes of the chain's writable buffers.
   */
  log?: DirtyLog | null;
  /**
   * Split: the GPA at which writes to the used ring are logged (vhost-user's
   * `log_guest_addr` of SET_VRING_ADDR); default `device`.
   */
  logUsedAddr?: number;
  /**
   * Behind an IOMMU (VIRTIO_F_ACCESS_PLATFORM): buffer and indirect-table addresses are IOVAs
   * translated by this (an Iotlb); the ring addresses above stay GPAs. A missing translation
   * makes pop() throw IotlbMiss, which leaves the queue as it was (not broken, nothing taken).
   * Default: buffer addresses are GPAs in `memory`.
   */
  dma?: DmaTranslator | null;
  /** Inflight tracking (vhost-user INFLIGHT_SHMFD): the queue's region, of the same ring kind and size. */
  inflight?: InflightQueue | null;
  /**
   * Most buffers (descriptors, indirect entries included, not counting the
   * descriptor that points at an indirect table) in one chain. Default and
   * the spec's limit: the queue size. At most 65536.
   */
  maxChainLength?: number;
}

export interface DeviceQueue {
  readonly size: number;
  readonly packed: boolean;
  /** Set once a malformed ring or chain was seen; pop() then returns null. */
  readonly broken: VirtioError | null;
  /**
   * The next available chain, or null when none is available (or the queue is
   * broken). A malformed ring or chain throws VirtioError and marks the queue
   * broken; nothing outside guest memory is ever read or written. The chain
   * stays valid until it is pushed; after push() its object is reused.
   */
  pop(): DescChain | null;
  /**
   * Gives a popped chain back as used, `written` bytes written into its
   * writable buffers; visible to the driver at once. Throws RangeError when
   * `written` is not an integer in 0..chain.writableBytes, VirtioError('USED_ID')
   * when the chain is not in flight on this queue.
   */
  push(chain: DescChain, written: number): void;
  /**
   * Pushes several chains, published to the driver at once (split: one used
   * idx store; packed: the first used descriptor's flags are stored last).
   * All are checked before anything is written.
   */
  pushBatch(chains: readonly DescChain[], written: ArrayLike<number>): void;
  /**
   * After one or more pushes: whether the driver wants an interrupt for the
   * used entries added since the previous needsNotify() call (split: avail
   * flags NO_INTERRUPT, or used_event with vring_need_event; packed: the
   * driver event suppression area). False when nothing was pushed since. The
   * first call after the queue was created says true when anything was pushed
   * and the driver does not disable interrupts by flags.
   */
  needsNotify(): boolean;
  /**
   * Asks the driver to kick again (split: clears used.flags NO_NOTIFY, or
   * writes avail_event; packed: device event area ENABLE, or DESC at the next
   * avail slot). Returns true when buffers are available now: pop again, the
   * driver may have added them before it saw the change.
   */
  enableNotifications(): boolean;
  /** Whether pop() would find a chain now (no side effect; false when broken). For polling. */
  available(): boolean;
  /** Asks the driver not to kick (while polling / processing a batch). */
  disableNotifications(): void;
  /** The GET_VRING_BASE value (split: next avail idx; packed: the encoding of `base`). */
  base(): number;
  /** Chains popped (or resubmitted) and not yet pushed. */
  readonly inFlight: number;
  /**
   * After a reconnect with inflight tracking: the chains the inflight region
   * records in flight, in submission (counter) order, rebuilt from the ring
   * (split: by head index; packed: from the descriptors the region copied),
   * now counted in flight. Empty without an inflight region, when the region
   * was new, and on a second call.
   */
  resubmit(): DescChain[];
}

export function createDeviceQueue(options: DeviceQueueOptions): DeviceQueue {
  return options.packed ? new PackedQueue(options) : new SplitQueue(options);
}
