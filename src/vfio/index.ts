/** The VFIO object model: uapi constants, region info, SET_IRQS, DMA map table, migration. */
export * from './errors.js';
export * from './uapi.js';
export * from './region-info.js';
export * from './irq-set.js';
export * from './dma.js';
export * from './migration.js';
export { VfioContainer } from './container.js';
export type { VfioContainerOptions, ContainerMapping } from './container.js';
export { VfioGroup, VfioDevice, GroupStatusFlag } from './group.js';
export type { VfioGroupOptions, AddDeviceOptions } from './group.js';
export { DmaTargetError, SerialQueue, dirtyBitmapBytes } from './dma-target.js';
export type { DmaTarget, DmaTargetMapping, DmaLogging, DmaTargetOp } from './dma-target.js';
export { VfioExtension, IommuType } from './iommu.js';
