/** The VFIO object model: uapi constants, region info, SET_IRQS, DMA map table, migration. */
export * from './errors.js';
export * from './uapi.js';
export * from './region-info.js';
export * from './irq-set.js';
export * from './dma.js';
export * from './migration.js';
