/**
 * Every fixed-size vfio-user wire struct, declared once. Offsets are those of
 * the spec tables (counted from the end of the 16-byte header for bodies);
 * names are the spec's, in camelCase. Padding and reserved words are gaps:
 * zero on encode, ignored on decode unless a codec checks them.
 */
import { bytes, defineLayout } from '../wire/layout.js';

/** The header before every command and reply. */
export const HEADER = defineLayout('header', [
  { name: 'msgId', type: 'u16', offset: 0 },
  { name: 'cmd', type: 'u16', offset: 2 },
  /** The whole message, header included. */
  { name: 'msgSize', type: 'u32', offset: 4 },
  { name: 'flags', type: 'u32', offset: 8 },
  { name: 'errorNo', type: 'u32', offset: 12 },
]);

/** VFIO_USER_VERSION, before the optional NUL-terminated JSON. */
export const VERSION = defineLayout('version', [
  { name: 'major', type: 'u16', offset: 0 },
  { name: 'minor', type: 'u16', offset: 2 },
]);

/** VFIO_USER_DMA_MAP request (struct vfio_iommu_type1_dma_map). */
export const DMA_MAP = defineLayout('dma_map', [
  { name: 'argsz', type: 'u32', offset: 0 },
  { name: 'flags', type: 'u32', offset: 4 },
  /** File offset into the passed fd; 0 if none. */
  { name: 'offset', type: 'u64', offset: 8 },
  { name: 'address', type: 'u64', offset: 16 },
  { name: 'size', type: 'u64', offset: 24 },
]);

/** VFIO_USER_DMA_UNMAP request and reply (struct vfio_iommu_type1_dma_unmap). */
export const DMA_UNMAP = defineLayout('dma_unmap', [
  { name: 'argsz', type: 'u32', offset: 0 },
  { name: 'flags', type: 'u32', offset: 4 },
  { name: 'address', type: 'u64', offset: 8 },
  { name: 'size', type: 'u64', offset: 16 },
]);

/** struct vfio_bitmap, after DMA_UNMAP with GET_DIRTY_BITMAP (legacy); the bitmap bytes follow in the reply. */
export const BITMAP = defineLayout('bitmap', [
  { name: 'pgsize', type: 'u64', offset: 0 },
  { name: 'size', type: 'u64', offset: 8 },
]);

/** VFIO_USER_DEVICE_GET_INFO request and reply (struct vfio_device_info). */
export const DEVICE_INFO = defineLayout('device_info', [
  { name: 'argsz', type: 'u32', offset: 0 },
  { name: 'flags', type: 'u32', offset: 4 },
  { name: 'numRegions', type: 'u32', offset: 8 },
  { name: 'numIrqs', type: 'u32', offset: 12 },
]);

/** VFIO_USER_DEVICE_GET_REGION_INFO request and reply (struct vfio_region_info). */
export const REGION_INFO = defineLayout('region_info', [
  { name: 'argsz', type: 'u32', offset: 0 },
  { name: 'flags', type: 'u32', offset: 4 },
  { name: 'index', type: 'u32', offset: 8 },
  /** Offset of the first capability, from the start of this struct. */
  { name: 'capOffset', type: 'u32', offset: 12 },
  { name: 'size', type: 'u64', offset: 16 },
  /** mmap offset for the region's fd, and base of sparse mmap areas. */
  { name: 'offset', type: 'u64', offset: 24 },
]);

/** struct vfio_info_cap_header; `next` is relative to the start of the region info. */
export const CAP_HEADER = defineLayout('cap_header', [
  { name: 'id', type: 'u16', offset: 0 },
  { name: 'version', type: 'u16', offset: 2 },
  { name: 'next', type: 'u32', offset: 4 },
]);

/** VFIO_USER_DEVICE_GET_REGION_IO_FDS request and reply head; sub-regions follow in the reply. */
export const REGION_IO_FDS = defineLayout('region_io_fds', [
  { name: 'argsz', type: 'u32', offset: 0 },
  { name: 'flags', type: 'u32', offset: 4 },
  { name: 'index', type: 'u32', offset: 8 },
  { name: 'count', type: 'u32', offset: 12 },
]);

/** One sub-region of GET_REGION_IO_FDS (ioeventfd or ioregionfd; padding at 28). */
export const REGION_IO_FD = defineLayout('region_io_fd', [
  { name: 'offset', type: 'u64', offset: 0 },
  { name: 'size', type: 'u64', offset: 8 },
  { name: 'fdIndex', type: 'u32', offset: 16 },
  { name: 'type', type: 'u32', offset: 20 },
  { name: 'flags', type: 'u32', offset: 24 },
  /** ioeventfd: datamatch; ioregionfd: user_data. */
  { name: 'datamatch', type: 'u64big', offset: 32 },
]);

/** VFIO_USER_DEVICE_GET_IRQ_INFO request and reply (struct vfio_irq_info). */
export const IRQ_INFO = defineLayout('irq_info', [
  { name: 'argsz', type: 'u32', offset: 0 },
  { name: 'flags', type: 'u32', offset: 4 },
  { name: 'index', type: 'u32', offset: 8 },
  { name: 'count', type: 'u32', offset: 12 },
]);

/** VFIO_USER_DEVICE_SET_IRQS request (struct vfio_irq_set); bool data follows. */
export const IRQ_SET = defineLayout('irq_set', [
  { name: 'argsz', type: 'u32', offset: 0 },
  { name: 'flags', type: 'u32', offset: 4 },
  { name: 'index', type: 'u32', offset: 8 },
  { name: 'start', type: 'u32', offset: 12 },
  { name: 'count', type: 'u32', offset: 16 },
]);

/** VFIO_USER_REGION_READ / REGION_WRITE access header; data follows where there is any. */
export const REGION_ACCESS = defineLayout('region_access', [
  { name: 'offset', type: 'u64', offset: 0 },
  { name: 'region', type: 'u32', offset: 8 },
  { name: 'count', type: 'u32', offset: 12 },
]);

/** VFIO_USER_DMA_READ / DMA_WRITE access header (spec and libvfio-user: u64 count, data at 16). */
export const DMA_ACCESS = defineLayout('dma_access', [
  { name: 'address', type: 'u64', offset: 0 },
  { name: 'count', type: 'u64', offset: 8 },
]);

/** VFIO_USER_REGION_WRITE_MULTI request head and reply. */
export const WRITE_MULTI = defineLayout('write_multi', [{ name: 'wrCnt', type: 'u64', offset: 0 }]);

/** One write of REGION_WRITE_MULTI: at most 8 data bytes. */
export const WRITE_ONE = defineLayout('write_one', [
  { name: 'offset', type: 'u64', offset: 0 },
  { name: 'region', type: 'u32', offset: 8 },
  { name: 'count', type: 'u32', offset: 12 },
  { name: 'data', type: bytes(8), offset: 16 },
]);

/** VFIO_USER_DEVICE_FEATURE head (struct vfio_device_feature); feature data follows. */
export const DEVICE_FEATURE = defineLayout('device_feature', [
  { name: 'argsz', type: 'u32', offset: 0 },
  { name: 'flags', type: 'u32', offset: 4 },
]);

/** VFIO_USER_MIG_DATA_READ / MIG_DATA_WRITE head; data follows where there is any. */
export const MIG_DATA = defineLayout('mig_data', [
  { name: 'argsz', type: 'u32', offset: 0 },
  { name: 'size', type: 'u32', offset: 4 },
]);

/** VFIO_DEVICE_FEATURE_MIGRATION data (GET reply). */
export const FEATURE_MIGRATION = defineLayout('feature_migration', [{ name: 'flags', type: 'u64big', offset: 0 }]);

/** VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE data; data_fd is unused (clients send -1). */
export const FEATURE_MIG_STATE = defineLayout('feature_mig_state', [
  { name: 'deviceState', type: 'u32', offset: 0 },
  { name: 'dataFd', type: 'i32', offset: 4 },
]);

/** VFIO_DEVICE_FEATURE_DMA_LOGGING_START/STOP data head (reserved word at 12); ranges follow. */
export const FEATURE_DMA_LOGGING_CONTROL = defineLayout(
  'feature_dma_logging_control',
  [
    { name: 'pageSize', type: 'u64', offset: 0 },
    { name: 'numRanges', type: 'u32', offset: 8 },
  ],
  { size: 16 },
);

/** One IOVA range of DMA_LOGGING_START/STOP. */
export const FEATURE_DMA_LOGGING_RANGE = defineLayout('feature_dma_logging_range', [
  { name: 'iova', type: 'u64', offset: 0 },
  { name: 'length', type: 'u64', offset: 8 },
]);

/** VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT data head; the reply appends the u64 bitmap at 24. */
export const FEATURE_DMA_LOGGING_REPORT = defineLayout('feature_dma_logging_report', [
  { name: 'iova', type: 'u64', offset: 0 },
  { name: 'length', type: 'u64', offset: 8 },
  { name: 'pageSize', type: 'u64', offset: 16 },
]);
