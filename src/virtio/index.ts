export type * from './types.js';
export { VirtioError } from './errors.js';
export type { VirtioErrorCode } from './errors.js';
export { GuestMemory, DirtyLog, LOG_PAGE_SIZE } from './memory.js';
export { Iotlb, IotlbMiss, IOTLB_PERM_READ, IOTLB_PERM_WRITE } from './iotlb.js';
export type { DmaTranslator, IotlbEntryInfo, IotlbOptions } from './iotlb.js';
export { createDeviceQueue } from './queue.js';
export type { DeviceQueue, DeviceQueueOptions } from './queue.js';
export { DESC_F_NEXT, DESC_F_WRITE, DESC_F_INDIRECT, DESC_F_AVAIL, DESC_F_USED } from './base.js';
export { vringNeedEvent } from './split.js';
export {
  inflightQueueSize,
  InflightRegion,
  SplitInflightQueue,
  PackedInflightQueue,
} from './inflight.js';
export type { InflightQueue, PackedDescs, PackedRecovery } from './inflight.js';
export { ringLayout, DriverQueueBase } from './driver.js';
export type { DriverBuffer, DriverQueue, DriverQueueOptions, RingLayout, UsedBuffer } from './driver.js';
export { SplitDriverQueue } from './driver-split.js';
export { PackedDriverQueue } from './driver-packed.js';
export { createDriverQueue } from './driver-queue.js';
export type { VirtioQueueHandle, VirtioDeviceModel } from './device-queue-handle.js';
