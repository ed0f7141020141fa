/**
 * A virtqueue as a device sees it, whatever transport carries it: the
 * vhost-user back-end's VhostQueue (src/vhost-user/backend.ts) and the virtio
 * PCI transport served over vfio-user (src/devices/virtio-pci.ts) both give
 * their devices this, so one device object (the blk device of
 * src/devices/vhost-user-blk.ts) runs behind either.
 *
 * VhostQueue satisfies it structurally; nothing here imports a transport.
 */
import type { DescChain } from './types.js';
import type { DeviceQueue } from './queue.js';

export interface VirtioQueueHandle {
  /** The queue's index in the device (0-based). */
  readonly index: number;
  /**
   * The ring engine's queue while the ring runs, null when stopped (not yet
   * started, reset, stopped for a migration). For notification control
   * (disableNotifications / enableNotifications) and `broken`; chains are
   * taken and given back through the handle, not through the ring.
   */
  readonly ring: DeviceQueue | null;
  /** The negotiated virtio features. */
  readonly features: bigint;
  /** The next chain to serve, or null (none available, ring stopped, broken). */
  pop(): DescChain | null;
  /** Completes a chain, `written` bytes written to its device-writable buffers. */
  push(chain: DescChain, written: number): void;
  /** Completes several chains, published to the driver at once. */
  pushBatch(chains: readonly DescChain[], written: ArrayLike<number>): void;
  /** Interrupts the driver if it asked for it since the last notify. */
  notify(): void;
}

/**
 * A virtio device the transports serve: its features, queues and config
 * space, and a handler called when a queue has buffers. The blk device
 * (VhostUserBlkDevice) is one; VhostUserDevice (the vhost-user back-end's)
 * is this with VhostQueue and vhost-user's extra hooks.
 */
export interface VirtioDeviceModel {
  /** The virtio features offered (VERSION_1, ring layouts, device bits). */
  readonly features: bigint;
  /** Queues the device has. */
  readonly numQueues: number;
  /** Largest ring the device accepts (default 32768). */
  readonly maxQueueSize?: number;
  /** The device-specific config space (read by the driver). */
  config?(): Uint8Array;
  /**
   * A queue has buffers (a kick, or its start): pop chains, complete each
   * with push() (now or later), then notify().
   */
  handleQueue(queue: VirtioQueueHandle): void;
  /** The features the driver accepted (FEATURES_OK / SET_FEATURES). */
  setFeatures?(features: bigint): void;
  /**
   * The queue is stopping (reset, a migration's STOP): give back every chain
   * the device holds popped and not pushed, or the stop waits for them.
   */
  queueStopping?(queue: VirtioQueueHandle): void;
  /** The device was reset: forget per-driver state. */
  reset?(): void;
}
