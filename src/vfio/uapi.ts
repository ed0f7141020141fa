/**
 * The Linux VFIO uapi constants (include/uapi/linux/vfio.h) that vfio-user
 * reuses. Values are fixed user ABI; names follow the header without the
 * `VFIO_` prefixes so they read as `PciRegion.CONFIG`, `IrqSetFlag.DATA_BOOL`.
 */

/** Size of struct vfio_region_info: argsz, flags, index, cap_offset (u32 each), size, offset (u64 each). */
export const REGION_INFO_SIZE = 32;
/** Size of struct vfio_info_cap_header: id u16, version u16, next u32. */
export const INFO_CAP_HEADER_SIZE = 8;
/** Size of the fixed part of struct vfio_irq_set: argsz, flags, index, start, count. */
export const IRQ_SET_SIZE = 20;
/** Size of struct vfio_irq_info: argsz, flags, index, count. */
export const IRQ_INFO_SIZE = 16;
/** Size of struct vfio_device_info as vfio-user sends it: argsz, flags, num_regions, num_irqs. */
export const DEVICE_INFO_SIZE = 16;

/** Fixed region indexes of a vfio-pci device (VFIO_PCI_*_REGION_INDEX). */
export const PciRegion = {
  /** PCI BAR 0. */
  BAR0: 0,
  /** PCI BAR 1. */
  BAR1: 1,
  /** PCI BAR 2. */
  BAR2: 2,
  /** PCI BAR 3. */
  BAR3: 3,
  /** PCI BAR 4. */
  BAR4: 4,
  /** PCI BAR 5. */
  BAR5: 5,
  /** Expansion ROM. */
  ROM: 6,
  /** PCI configuration space. */
  CONFIG: 7,
  /** Legacy VGA ranges (I/O 0x3b0-0x3bb, 0x3c0-0x3df; MMIO 0xa0000-0xbffff) at their identity offsets. */
  VGA: 8,
} as const;
export type PciRegion = (typeof PciRegion)[keyof typeof PciRegion];
/** Number of fixed PCI region indexes; indexes >= 9 are device specific and carry a TYPE cap. */
export const PCI_NUM_REGIONS = 9;

/** Fixed IRQ indexes of a vfio-pci device (VFIO_PCI_*_IRQ_INDEX). */
export const PciIrq = {
  /** Legacy INTx: one level-triggered, automasked line. */
  INTX: 0,
  /** MSI vectors. */
  MSI: 1,
  /** MSI-X vectors. */
  MSIX: 2,
  /** Error notification (AER) to user space. */
  ERR: 3,
  /** Device request notification (the host wants the device back). */
  REQ: 4,
} as const;
export type PciIrq = (typeof PciIrq)[keyof typeof PciIrq];
/** Number of fixed PCI IRQ indexes. */
export const PCI_NUM_IRQS = 5;

/** struct vfio_region_info flags. */
export const RegionInfoFlag = {
  /** The region supports read. */
  READ: 1 << 0,
  /** The region supports write. */
  WRITE: 1 << 1,
  /** The region supports mmap (in vfio-user: the reply carries an fd). */
  MMAP: 1 << 2,
  /** The info carries a capability chain at cap_offset. */
  CAPS: 1 << 3,
} as const;
export type RegionInfoFlag = (typeof RegionInfoFlag)[keyof typeof RegionInfoFlag];

/** Capability ids of the region info capability chain (VFIO_REGION_INFO_CAP_*). */
export const RegionInfoCap = {
  /** Sparse mmap: only the listed areas of the region may be mmapped. */
  SPARSE_MMAP: 1,
  /** Device specific region type and subtype. */
  TYPE: 2,
  /** The MSI-X table and PBA of a BAR may be mmapped (header only). */
  MSIX_MAPPABLE: 3,
  /** NVLink2 GPU RAM system address (deprecated, no longer provided). */
  NVLINK2_SSATGT: 4,
  /** NVLink2 link speed (deprecated, no longer provided). */
  NVLINK2_LNKSPD: 5,
} as const;
export type RegionInfoCap = (typeof RegionInfoCap)[keyof typeof RegionInfoCap];

/** Region types carried by the TYPE capability (VFIO_REGION_TYPE_*). */
export const RegionType = {
  /** Bit 31 marks a PCI vendor type; the low 16 bits hold the vendor id. */
  PCI_VENDOR_TYPE: 0x8000_0000,
  /** Graphics regions. */
  GFX: 1,
  /** s390 channel I/O regions. */
  CCW: 2,
  /** The v1 migration region (removed from vfio-user in 0.9.2). */
  MIGRATION_DEPRECATED: 3,
} as const;
export type RegionType = (typeof RegionType)[keyof typeof RegionType];
/** Mask of the vendor id inside a PCI_VENDOR_TYPE region type. */
export const REGION_TYPE_PCI_VENDOR_MASK = 0xffff;

/** Subtypes of region type PCI_VENDOR_TYPE | 0x8086 (Intel). */
export const IntelRegionSubtype = {
  /** IGD OpRegion. */
  IGD_OPREGION: 1,
  /** IGD host bridge config space. */
  IGD_HOST_CFG: 2,
  /** IGD LPC bridge config space. */
  IGD_LPC_CFG: 3,
} as const;
/** Subtypes of region type GFX. */
export const GfxRegionSubtype = {
  /** Virtual display EDID and link state. */
  EDID: 1,
} as const;
/** Subtypes of region type CCW. */
export const CcwRegionSubtype = {
  /** Asynchronous command region. */
  ASYNC_CMD: 1,
  /** Subchannel information block. */
  SCHIB: 2,
  /** Channel report word. */
  CRW: 3,
} as const;
/** Subtypes of region type MIGRATION_DEPRECATED. */
export const MigrationRegionSubtype = {
  /** The v1 migration register region. */
  MIGRATION_DEPRECATED: 1,
} as const;

/** struct vfio_irq_info flags. */
export const IrqInfoFlag = {
  /** The index can signal through an eventfd. */
  EVENTFD: 1 << 0,
  /** The index supports the MASK and UNMASK actions. */
  MASKABLE: 1 << 1,
  /** After firing, the line masks itself and the user must unmask it (level-triggered INTx). */
  AUTOMASKED: 1 << 2,
  /** Vectors are set up as a set: new ones cannot be added without disabling the index. */
  NORESIZE: 1 << 3,
} as const;
export type IrqInfoFlag = (typeof IrqInfoFlag)[keyof typeof IrqInfoFlag];

/** struct vfio_irq_set flags: exactly one DATA type and exactly one ACTION. */
export const IrqSetFlag = {
  /** No data: do the action on every vector of [start, start+count). */
  DATA_NONE: 1 << 0,
  /** One bool byte per vector: do the action where the byte is true. */
  DATA_BOOL: 1 << 1,
  /** One eventfd per vector (in vfio-user: passed as fds, not in the payload). */
  DATA_EVENTFD: 1 << 2,
  /** Mask the vectors (user to device). */
  ACTION_MASK: 1 << 3,
  /** Unmask the vectors (user to device). */
  ACTION_UNMASK: 1 << 4,
  /** Trigger the vectors, or bind the eventfds the device signals (device to user). */
  ACTION_TRIGGER: 1 << 5,
} as const;
export type IrqSetFlag = (typeof IrqSetFlag)[keyof typeof IrqSetFlag];
/** All DATA_* bits. */
export const IRQ_SET_DATA_TYPE_MASK = 0x07;
/** All ACTION_* bits. */
export const IRQ_SET_ACTION_TYPE_MASK = 0x38;

/** struct vfio_device_info flags. */
export const DeviceInfoFlag = {
  /** The device supports reset. */
  RESET: 1 << 0,
  /** A vfio-pci device (the only kind vfio-user defines). */
  PCI: 1 << 1,
  /** A vfio-platform device. */
  PLATFORM: 1 << 2,
  /** A vfio-amba device. */
  AMBA: 1 << 3,
  /** A vfio-ccw device. */
  CCW: 1 << 4,
  /** A vfio-ap device. */
  AP: 1 << 5,
  /** A vfio-fsl-mc device. */
  FSL_MC: 1 << 6,
  /** The info carries a capability chain. */
  CAPS: 1 << 7,
  /** A vfio-cdx device. */
  CDX: 1 << 8,
} as const;
export type DeviceInfoFlag = (typeof DeviceInfoFlag)[keyof typeof DeviceInfoFlag];

/** Capability ids of the device info capability chain (VFIO_DEVICE_INFO_CAP_*). */
export const DeviceInfoCap = {
  /** s390 zPCI base information. */
  ZPCI_BASE: 1,
  /** s390 zPCI function group. */
  ZPCI_GROUP: 2,
  /** s390 zPCI utility string. */
  ZPCI_UTIL: 3,
  /** s390 zPCI function path. */
  ZPCI_PFIP: 4,
  /** PCIe AtomicOp completion widths supported by the root port. */
  PCI_ATOMIC_COMP: 5,
} as const;
export type DeviceInfoCap = (typeof DeviceInfoCap)[keyof typeof DeviceInfoCap];

/** Feature indexes of VFIO_DEVICE_FEATURE (the low 16 bits of its flags). */
export const DeviceFeature = {
  /** SR-IOV VF token (kernel only). */
  PCI_VF_TOKEN: 0,
  /** GET: the migration flags (MigrationFlag) the device supports. */
  MIGRATION: 1,
  /** GET/SET the migration state (MigrationState) and data fd. */
  MIG_DEVICE_STATE: 2,
  /** Enter runtime low power (kernel only). */
  LOW_POWER_ENTRY: 3,
  /** Enter runtime low power with a wake-up eventfd (kernel only). */
  LOW_POWER_ENTRY_WITH_WAKEUP: 4,
  /** Leave runtime low power (kernel only). */
  LOW_POWER_EXIT: 5,
  /** SET: start logging the pages the device writes by DMA. */
  DMA_LOGGING_START: 6,
  /** SET: stop DMA logging. */
  DMA_LOGGING_STOP: 7,
  /** GET: read and clear the DMA write log of an IOVA range as a bitmap. */
  DMA_LOGGING_REPORT: 8,
  /** GET: estimated bytes still to come in STOP_COPY (kernel only). */
  MIG_DATA_SIZE: 9,
} as const;
export type DeviceFeature = (typeof DeviceFeature)[keyof typeof DeviceFeature];

/** Operation bits of VFIO_DEVICE_FEATURE flags, above the feature index. */
export const DeviceFeatureOp = {
  /** Mask of the feature index. */
  MASK: 0xffff,
  /** Read the feature's data. */
  GET: 1 << 16,
  /** Write the feature's data. */
  SET: 1 << 17,
  /** Only ask whether the other listed operations are supported. */
  PROBE: 1 << 18,
} as const;
export type DeviceFeatureOp = (typeof DeviceFeatureOp)[keyof typeof DeviceFeatureOp];

/** Flags of the MIGRATION feature: which optional parts of the state machine a device has. */
export const MigrationFlag = {
  /** STOP_COPY, STOP, RUNNING and RESUMING; mandatory for a migratable device. */
  STOP_COPY: 1 << 0,
  /** The RUNNING_P2P quiescent state (and PRE_COPY_P2P with PRE_COPY). */
  P2P: 1 << 1,
  /** The PRE_COPY state: data is read while the device still runs. */
  PRE_COPY: 1 << 2,
} as const;
export type MigrationFlag = (typeof MigrationFlag)[keyof typeof MigrationFlag];

/** enum vfio_device_mig_state (migration v2). */
export const MigrationState = {
  /** The device failed an arc and could not restore a valid state; only a reset leaves it. */
  ERROR: 0,
  /** Not running; DMA and interrupts stopped, internal state unchanged. */
  STOP: 1,
  /** Running normally (the state after reset). */
  RUNNING: 2,
  /** Stopped, and its state is being read out through the data stream. */
  STOP_COPY: 3,
  /** Stopped, and a saved state is being written in through the data stream. */
  RESUMING: 4,
  /** Running but not initiating peer-to-peer DMA (optional, P2P). */
  RUNNING_P2P: 5,
  /** Running while an initial part of its state is read out (optional, PRE_COPY). */
  PRE_COPY: 6,
  /** PRE_COPY without initiating peer-to-peer DMA (optional, P2P and PRE_COPY). */
  PRE_COPY_P2P: 7,
} as const;
export type MigrationState = (typeof MigrationState)[keyof typeof MigrationState];
/** Number of migration states (states are 0 .. 7). */
export const MIGRATION_NUM_STATES = 8;

const MIGRATION_STATE_NAMES: readonly string[] = Object.keys(MigrationState);

/** The name of a migration state (`STOP_COPY`), or `state N` if out of range. */
export function migrationStateName(state: number): string {
  return MIGRATION_STATE_NAMES[state] ?? `state ${state}`;
}

/** True when n is one of the eight migration states. */
export function isMigrationState(n: number): n is MigrationState {
  return Number.isInteger(n) && n >= 0 && n < MIGRATION_NUM_STATES;
}

/** Protection flags of a DMA map (VFIO_DMA_MAP_FLAG_* / VFIO_USER_F_DMA_REGION_*). */
export const DmaMapFlag = {
  /** The device may read the mapping. */
  READ: 1 << 0,
  /** The device may write the mapping. */
  WRITE: 1 << 1,
} as const;
export type DmaMapFlag = (typeof DmaMapFlag)[keyof typeof DmaMapFlag];

/** Flags of a DMA unmap (VFIO_DMA_UNMAP_FLAG_*). */
export const DmaUnmapFlag = {
  /** Legacy: return the dirty bitmap of the range being unmapped. */
  GET_DIRTY_BITMAP: 1 << 0,
  /** Unmap everything; iova and size must be 0. */
  ALL: 1 << 1,
  /** Kernel live-update vaddr invalidation; not used by vfio-user. */
  VADDR: 1 << 2,
} as const;
export type DmaUnmapFlag = (typeof DmaUnmapFlag)[keyof typeof DmaUnmapFlag];
