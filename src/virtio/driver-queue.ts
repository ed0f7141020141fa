/** Creates the driver side of a split or packed queue (see driver.ts). */
import type { DriverQueue, DriverQueueOptions } from './driver.js';
import { SplitDriverQueue } from './driver-split.js';
import { PackedDriverQueue } from './driver-packed.js';

export function createDriverQueue<T>(options: DriverQueueOptions): DriverQueue<T> {
  return options.packed ? new PackedDriverQueue<T>(options) : new SplitDriverQueue<T>(options);
}
