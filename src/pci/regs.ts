/**
 * PCI configuration space registers, offsets and bits, named after Linux
 * include/uapi/linux/pci_regs.h (the reader has that file open beside this one).
 * Only what a type-0 endpoint and the capabilities of caps.ts need.
 */

/** Size of conventional config space; extended (PCIe) config space is 4 KiB. */
export const PCI_CFG_SPACE_SIZE = 256;
export const PCI_CFG_SPACE_EXP_SIZE = 4096;
/** Size of the standard type-0 header; capabilities start at or after it. */
export const PCI_STD_HEADER_SIZEOF = 64;
export const PCI_STD_NUM_BARS = 6;

/** Type-0 header register offsets. */
export const PciReg = {
  /** Vendor ID, 16 bits, read-only. */
  VENDOR_ID: 0x00,
  /** Device ID, 16 bits, read-only. */
  DEVICE_ID: 0x02,
  /** Command, 16 bits; see {@link PciCommand}. */
  COMMAND: 0x04,
  /** Status, 16 bits; see {@link PciStatus}. Error bits are write-1-to-clear. */
  STATUS: 0x06,
  /** Revision ID, 8 bits. */
  REVISION_ID: 0x08,
  /** Programming interface, low byte of the 24-bit class code. */
  CLASS_PROG: 0x09,
  /** Sub-class (0x0a) and base class (0x0b). */
  CLASS_DEVICE: 0x0a,
  CACHE_LINE_SIZE: 0x0c,
  LATENCY_TIMER: 0x0d,
  /** Header type: bit 7 multi-function, low 7 bits the layout (0 = normal device). */
  HEADER_TYPE: 0x0e,
  BIST: 0x0f,
  BASE_ADDRESS_0: 0x10,
  BASE_ADDRESS_1: 0x14,
  BASE_ADDRESS_2: 0x18,
  BASE_ADDRESS_3: 0x1c,
  BASE_ADDRESS_4: 0x20,
  BASE_ADDRESS_5: 0x24,
  CARDBUS_CIS: 0x28,
  SUBSYSTEM_VENDOR_ID: 0x2c,
  SUBSYSTEM_ID: 0x2e,
  /** Expansion ROM base: bits 31..11 address, bit 0 enable. */
  ROM_ADDRESS: 0x30,
  /** Offset of the first capability (8 bits). */
  CAPABILITY_LIST: 0x34,
  INTERRUPT_LINE: 0x3c,
  /** 0 = none, 1..4 = INTA#..INTD#. */
  INTERRUPT_PIN: 0x3d,
  MIN_GNT: 0x3e,
  MAX_LAT: 0x3f,
} as const;

/** Offset of BAR `index` (0..5). */
export function barOffset(index: number): number {
  return PciReg.BASE_ADDRESS_0 + 4 * index;
}

/** Command register bits. */
export const PciCommand = {
  /** Respond to I/O space accesses. */
  IO: 0x1,
  /** Respond to memory space accesses. */
  MEMORY: 0x2,
  /** Bus master: the function may issue DMA (and MSI/MSI-X writes). */
  MASTER: 0x4,
  SPECIAL: 0x8,
  /** Memory write and invalidate. */
  INVALIDATE: 0x10,
  VGA_PALETTE: 0x20,
  /** Parity error response. */
  PARITY: 0x40,
  WAIT: 0x80,
  /** SERR# enable. */
  SERR: 0x100,
  FAST_BACK: 0x200,
  /** INTx emulation disable: the function must not assert INTx. */
  INTX_DISABLE: 0x400,
} as const;

/** Status register bits. */
export const PciStatus = {
  IMM_READY: 0x01,
  /** INTx asserted by the function (read-only; the device sets it). */
  INTERRUPT: 0x08,
  /** A capability list is present at CAPABILITY_LIST. */
  CAP_LIST: 0x10,
  '66MHZ': 0x20,
  FAST_BACK: 0x80,
  /** Master data parity error (RW1C). */
  PARITY: 0x100,
  DEVSEL_MASK: 0x600,
  /** Signaled target abort (RW1C). */
  SIG_TARGET_ABORT: 0x800,
  /** Received target abort (RW1C). */
  REC_TARGET_ABORT: 0x1000,
  /** Received master abort (RW1C). */
  REC_MASTER_ABORT: 0x2000,
  /** Signaled system error (RW1C). */
  SIG_SYSTEM_ERROR: 0x4000,
  /** Detected parity error (RW1C). */
  DETECTED_PARITY: 0x8000,
} as const;

/** Status bits that are write-1-to-clear. */
export const PCI_STATUS_RW1C =
  PciStatus.PARITY |
  PciStatus.SIG_TARGET_ABORT |
  PciStatus.REC_TARGET_ABORT |
  PciStatus.REC_MASTER_ABORT |
  PciStatus.SIG_SYSTEM_ERROR |
  PciStatus.DETECTED_PARITY;

export const PCI_HEADER_TYPE_NORMAL = 0;

/** BAR low bits. */
export const PciBar = {
  /** Bit 0: 0 = memory, 1 = I/O. */
  SPACE_IO: 0x01,
  MEM_TYPE_MASK: 0x06,
  MEM_TYPE_32: 0x00,
  MEM_TYPE_64: 0x04,
  /** Prefetchable memory. */
  MEM_PREFETCH: 0x08,
  /** Address bits of a memory BAR (low 4 bits are flags). */
  MEM_MASK: 0xfffffff0,
  /** Address bits of an I/O BAR (low 2 bits are flags). */
  IO_MASK: 0xfffffffc,
} as const;

/** Expansion ROM BAR bits. */
export const PciRom = {
  ENABLE: 0x01,
  /** Address bits 31..11. */
  ADDRESS_MASK: 0xfffff800,
} as const;

/** Capability header layout: id byte, next byte. */
export const PCI_CAP_LIST_ID = 0;
export const PCI_CAP_LIST_NEXT = 1;

/** Standard capability ids. */
export const PciCapId = {
  PM: 0x01,
  MSI: 0x05,
  VNDR: 0x09,
  EXP: 0x10,
  MSIX: 0x11,
} as const;

/** Extended capability ids (in the 0x100+ space). */
export const PciExtCapId = {
  DSN: 0x03,
  VNDR: 0x0b,
} as const;

/** Power Management capability registers (offsets within the capability). */
export const PciPm = {
  PMC: 2,
  VER_MASK: 0x0007,
  CAP_PME_CLOCK: 0x0008,
  CAP_DSI: 0x0020,
  CAP_AUX_POWER: 0x01c0,
  CAP_D1: 0x0200,
  CAP_D2: 0x0400,
  /** PME# support mask (D0, D1, D2, D3hot, D3cold from bit 11). */
  CAP_PME_MASK: 0xf800,
  CAP_PME_SHIFT: 11,
  CTRL: 4,
  CTRL_STATE_MASK: 0x0003,
  CTRL_NO_SOFT_RESET: 0x0008,
  CTRL_PME_ENABLE: 0x0100,
  CTRL_DATA_SEL_MASK: 0x1e00,
  CTRL_DATA_SCALE_MASK: 0x6000,
  /** PME status (RW1C). */
  CTRL_PME_STATUS: 0x8000,
  PPB_EXTENSIONS: 6,
  DATA_REGISTER: 7,
  SIZEOF: 8,
} as const;

/** MSI capability registers. */
export const PciMsi = {
  FLAGS: 0x02,
  FLAGS_ENABLE: 0x0001,
  /** Multiple Message Capable: log2 of the vectors the function can use. */
  FLAGS_QMASK: 0x000e,
  /** Multiple Message Enable: log2 of the vectors software allocated. */
  FLAGS_QSIZE: 0x0070,
  FLAGS_64BIT: 0x0080,
  /** Per-vector masking capable. */
  FLAGS_MASKBIT: 0x0100,
  ADDRESS_LO: 0x04,
  ADDRESS_HI: 0x08,
  DATA_32: 0x08,
  MASK_32: 0x0c,
  PENDING_32: 0x10,
  DATA_64: 0x0c,
  MASK_64: 0x10,
  PENDING_64: 0x14,
} as const;

/** MSI-X capability registers and table entry layout. */
export const PciMsix = {
  FLAGS: 2,
  /** Table size minus one. */
  FLAGS_QSIZE: 0x07ff,
  /** Function mask: every vector masked. */
  FLAGS_MASKALL: 0x4000,
  FLAGS_ENABLE: 0x8000,
  TABLE: 4,
  PBA: 8,
  /** Low 3 bits of TABLE/PBA: the BAR index (BIR). */
  BIR_MASK: 0x00000007,
  OFFSET_MASK: 0xfffffff8,
  SIZEOF: 12,
  ENTRY_SIZE: 16,
  ENTRY_LOWER_ADDR: 0x0,
  ENTRY_UPPER_ADDR: 0x4,
  ENTRY_DATA: 0x8,
  ENTRY_VECTOR_CTRL: 0xc,
  ENTRY_CTRL_MASKBIT: 0x1,
  /** Most vectors a table can have (11-bit table size field). */
  MAX_VECTORS: 2048,
} as const;

/** PCI Express capability registers and bits. */
export const PciExp = {
  FLAGS: 0x02,
  FLAGS_VERS: 0x000f,
  FLAGS_TYPE: 0x00f0,
  TYPE_ENDPOINT: 0x0,
  TYPE_LEG_END: 0x1,
  TYPE_RC_END: 0x9,
  DEVCAP: 0x04,
  DEVCAP_PAYLOAD: 0x00000007,
  DEVCAP_EXT_TAG: 0x00000020,
  DEVCAP_L0S: 0x000001c0,
  DEVCAP_L1: 0x00000e00,
  DEVCAP_RBER: 0x00008000,
  DEVCAP_FLR: 0x10000000,
  DEVCTL: 0x08,
  DEVCTL_CERE: 0x0001,
  DEVCTL_NFERE: 0x0002,
  DEVCTL_FERE: 0x0004,
  DEVCTL_URRE: 0x0008,
  DEVCTL_RELAX_EN: 0x0010,
  DEVCTL_PAYLOAD: 0x00e0,
  DEVCTL_EXT_TAG: 0x0100,
  DEVCTL_PHANTOM: 0x0200,
  DEVCTL_AUX_PME: 0x0400,
  DEVCTL_NOSNOOP_EN: 0x0800,
  DEVCTL_READRQ: 0x7000,
  /** Initiate Function Level Reset (reads as 0). */
  DEVCTL_BCR_FLR: 0x8000,
  DEVSTA: 0x0a,
  DEVSTA_CED: 0x0001,
  DEVSTA_NFED: 0x0002,
  DEVSTA_FED: 0x0004,
  DEVSTA_URD: 0x0008,
  DEVSTA_AUXPD: 0x0010,
  DEVSTA_TRPND: 0x0020,
  LNKCAP: 0x0c,
  LNKCAP_SLS: 0x0000000f,
  LNKCAP_MLW: 0x000003f0,
  LNKCTL: 0x10,
  LNKCTL_ASPMC: 0x0003,
  LNKCTL_RCB: 0x0008,
  LNKCTL_CCC: 0x0040,
  LNKCTL_ES: 0x0080,
  LNKCTL_CLKREQ_EN: 0x0100,
  LNKCTL_HAWD: 0x0200,
  LNKSTA: 0x12,
  LNKSTA_CLS: 0x000f,
  LNKSTA_NLW: 0x03f0,
  LNKSTA_NLW_SHIFT: 4,
  SLTCAP: 0x14,
  SLTCTL: 0x18,
  SLTSTA: 0x1a,
  RTCTL: 0x1c,
  RTCAP: 0x1e,
  RTSTA: 0x20,
  DEVCAP2: 0x24,
  DEVCAP2_COMP_TMOUT_DIS: 0x00000010,
  DEVCTL2: 0x28,
  DEVCTL2_COMP_TIMEOUT: 0x000f,
  DEVCTL2_COMP_TMOUT_DIS: 0x0010,
  DEVSTA2: 0x2a,
  LNKCAP2: 0x2c,
  /** Supported Link Speeds Vector: bit 1 = 2.5 GT/s ... bit 6 = 64 GT/s. */
  LNKCAP2_SLS_SHIFT: 1,
  LNKCTL2: 0x30,
  LNKCTL2_TLS: 0x000f,
  LNKSTA2: 0x32,
  SLTCAP2: 0x34,
  SLTCTL2: 0x38,
  SLTSTA2: 0x3a,
  /** Size of a version-2 capability structure including the slot-2 registers. */
  SIZEOF_V2: 0x3c,
} as const;

/** Extended capability header: id 15..0, version 19..16, next 31..20. */
export const PciExtCap = {
  HEADER_SIZEOF: 4,
  NEXT_SHIFT: 20,
  VERSION_SHIFT: 16,
  /** Device Serial Number capability size. */
  DSN_SIZEOF: 12,
  /** Vendor-specific header at +4: VSEC id 15..0, rev 19..16, length 31..20. */
  VNDR_HEADER: 4,
  VNDR_HEADER_SIZEOF: 8,
} as const;
