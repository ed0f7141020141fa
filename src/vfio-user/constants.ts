/**
 * vfio-user protocol constants, named after the spec
 * (QEMU docs/interop/vfio-user.rst) and <linux/vfio.h>. Each enum is closed:
 * the codec converts raw numbers once and rejects anything not listed.
 */

/** Message command numbers (the header's Command field). */
export enum Command {
  /** Proposes (request) or accepts (reply) a protocol version and capabilities; the first message on a connection. */
  VERSION = 1,
  /** Informs the server of a memory region it may access for DMA, optionally with an fd to mmap. */
  DMA_MAP = 2,
  /** Informs the server that a DMA region previously mapped is no longer available. */
  DMA_UNMAP = 3,
  /** Queries basic device information: flags, number of regions and of IRQ types. */
  DEVICE_GET_INFO = 4,
  /** Queries information about one device region, with an optional capability chain. */
  DEVICE_GET_REGION_INFO = 5,
  /** Queries the sub-regions of a region to be wired to ioeventfds or ioregionfds. */
  DEVICE_GET_REGION_IO_FDS = 6,
  /** Queries information about one device interrupt type. */
  DEVICE_GET_IRQ_INFO = 7,
  /** Sets actions (trigger, mask, unmask) for a range of interrupts of one type. */
  DEVICE_SET_IRQS = 8,
  /** Reads from a device region that is not mmapped. */
  REGION_READ = 9,
  /** Writes to a device region that is not mmapped. */
  REGION_WRITE = 10,
  /** Server to client: reads client memory previously exported with DMA_MAP. */
  DMA_READ = 11,
  /** Server to client: writes client memory previously exported with DMA_MAP. */
  DMA_WRITE = 12,
  /** Resets the device; neither the request nor the reply has a payload. */
  DEVICE_RESET = 13,
  /** Legacy (spec 0.9.1 and earlier) dirty page tracking; removed from the protocol and only ever rejected. */
  DIRTY_PAGES = 14,
  /** Coalesces several device writes of at most 8 bytes each into one message. */
  REGION_WRITE_MULTI = 15,
  /** Gets, sets or probes device feature data (migration, DMA logging); analogous to VFIO_DEVICE_FEATURE. */
  DEVICE_FEATURE = 16,
  /** Reads migration data from a server in a saving state (PRE_COPY or STOP_COPY). */
  MIG_DATA_READ = 17,
  /** Writes migration data to a server in the RESUMING state. */
  MIG_DATA_WRITE = 18,
}

/** True for the numbers listed in Command (including the obsolete 14). */
export function isCommand(n: number): n is Command {
  return Number.isInteger(n) && n >= Command.VERSION && n <= Command.MIG_DATA_WRITE;
}

/** Header Flags field. */
export enum HeaderFlags {
  /** Bits 0-3: the message type (MessageType). */
  TYPE_MASK = 0xf,
  /** In a command: no reply is needed for this command. */
  NO_REPLY = 0x10,
  /** In a reply: the command failed and the Error field is valid. */
  ERROR = 0x20,
}

/** The Type bits of the header Flags. */
export enum MessageType {
  /** A command message. */
  COMMAND = 0,
  /** A reply acknowledging a previous command with the same message ID. */
  REPLY = 1,
}

/** Every flag bit the spec defines; the others are reserved. */
export const HEADER_FLAGS_DEFINED = HeaderFlags.TYPE_MASK | HeaderFlags.NO_REPLY | HeaderFlags.ERROR;

/** VFIO_USER_DMA_MAP flags. */
export enum DmaMapFlags {
  /** The region can be read from. */
  READ = 1 << 0,
  /** The region can be written to. */
  WRITE = 1 << 1,
  /** libvfio-user extension, not in the spec: an fd is sent and the server mmaps it. */
  MMAP = 1 << 2,
  /** libvfio-user extension, not in the spec: an fd is sent and the server uses pread/pwrite on it. */
  FILE_IO = 1 << 3,
}
export const DMA_MAP_FLAGS_VALID = DmaMapFlags.READ | DmaMapFlags.WRITE | DmaMapFlags.MMAP | DmaMapFlags.FILE_IO;

/** VFIO_USER_DMA_UNMAP flags (values of linux/vfio.h; the 0.9.2 spec says the field is unused). */
export enum DmaUnmapFlags {
  /** Legacy (0.9.1): a vfio_bitmap follows the request and the reply carries the dirty bitmap. */
  GET_DIRTY_BITMAP = 1 << 0,
  /** Unmap every region; address and size must be zero. */
  ALL = 1 << 1,
}
export const DMA_UNMAP_FLAGS_VALID = DmaUnmapFlags.GET_DIRTY_BITMAP | DmaUnmapFlags.ALL;

/** VFIO_USER_DEVICE_GET_REGION_INFO reply flags. */
export enum RegionInfoFlags {
  /** Allows client read access to the region. */
  READ = 1 << 0,
  /** Allows client write access to the region. */
  WRITE = 1 << 1,
  /** The client can mmap() the region; the reply carries an fd. */
  MMAP = 1 << 2,
  /** Additional capabilities are found in the reply, starting at cap_offset. */
  CAPS = 1 << 3,
}

/** Sub-region types of VFIO_USER_DEVICE_GET_REGION_IO_FDS. */
export enum IoFdType {
  /** The fd is to be configured as a KVM ioeventfd. */
  IOEVENTFD = 0,
  /** The fd is to be configured as an ioregionfd (never merged in mainline KVM). */
  IOREGIONFD = 1,
}

/** VFIO_USER_DEVICE_SET_IRQS flags: exactly one DATA_* and one ACTION_*. */
export enum SetIrqsFlags {
  /** No data field; the action is performed unconditionally. */
  DATA_NONE = 1 << 0,
  /** The data field is an array of boolean bytes; the action is performed where true. */
  DATA_BOOL = 1 << 1,
  /** Eventfds come in the message's fds; none de-assigns the range. */
  DATA_EVENTFD = 1 << 2,
  /** A masking event. */
  ACTION_MASK = 1 << 3,
  /** An unmasking event. */
  ACTION_UNMASK = 1 << 4,
  /** A triggering event. */
  ACTION_TRIGGER = 1 << 5,
}
export const SET_IRQS_DATA_MASK = SetIrqsFlags.DATA_NONE | SetIrqsFlags.DATA_BOOL | SetIrqsFlags.DATA_EVENTFD;
export const SET_IRQS_ACTION_MASK =
  SetIrqsFlags.ACTION_MASK | SetIrqsFlags.ACTION_UNMASK | SetIrqsFlags.ACTION_TRIGGER;

/** VFIO_USER_DEVICE_FEATURE flags: bits 0-15 are the feature index, bits 16-18 the operation. */
export enum FeatureFlags {
  /** VFIO_DEVICE_FEATURE_MASK: the feature index bits. */
  MASK = 0xffff,
  /** Get the feature's data. */
  GET = 1 << 16,
  /** Set the feature's data to the request's data. */
  SET = 1 << 17,
  /** Probe for support; with GET and/or SET, succeeds only if all are supported. */
  PROBE = 1 << 18,
}
export const FEATURE_FLAGS_VALID = FeatureFlags.MASK | FeatureFlags.GET | FeatureFlags.SET | FeatureFlags.PROBE;

/** Device feature indexes used by vfio-user. */
export enum DeviceFeature {
  /** The device supports the migration API; GET returns the supported migration flags. */
  MIGRATION = 1,
  /** Gets the migration state, or sets it (the transition completes before the reply). */
  MIG_DEVICE_STATE = 2,
  /** Starts logging DMA writes over the given IOVA ranges. */
  DMA_LOGGING_START = 6,
  /** Stops DMA logging. */
  DMA_LOGGING_STOP = 7,
  /** Returns the dirty bitmap of an IOVA range. */
  DMA_LOGGING_REPORT = 8,
}

/**
 * VFIO uapi values shared with the kernel model (device info, region caps,
 * irq info, migration flags and states) live in src/vfio/uapi.ts.
 */
export { MigrationState } from '../vfio/uapi.js';

/** Protocol version we implement: major 0 as every peer; minor 2 as libvfio-user (QEMU proposes 0.0). */
export const VFIO_USER_MAJOR = 0;
export const VFIO_USER_MINOR = 2;

/** Size of the message header that precedes every command and reply. */
export const HEADER_SIZE = 16;
/** Spec default of max_data_xfer_size when the peer does not give one. */
export const DEFAULT_MAX_DATA_XFER_SIZE = 1024 * 1024;
/** Spec default of max_msg_fds when the peer does not give one. */
export const DEFAULT_MAX_MSG_FDS = 1;
/** Spec default of max_dma_maps (the kernel's dma_entry_limit). */
export const DEFAULT_MAX_DMA_MAPS = 65535;
/** Spec default of pgsizes: 4 KiB pages only. */
export const DEFAULT_PGSIZES = 4096n;
/** Legacy migration.max_bitmap_size default and QEMU's upper bound: 256 MiB. */
export const DEFAULT_MAX_BITMAP_SIZE = 256 * 1024 * 1024;
/** QEMU's client refuses a server max_msg_fds above this (VFIO_USER_MAX_MAX_FDS). */
export const QEMU_MAX_MSG_FDS = 16;
/** QEMU's client refuses a server max_data_xfer_size above this (VFIO_USER_MAX_MAX_XFER). */
export const QEMU_MAX_DATA_XFER_SIZE = 64 * 1024 * 1024;
/** libvfio-user refuses a client max_msg_fds above this (VFIO_USER_CLIENT_MAX_MSG_FDS_LIMIT). */
export const MAX_MSG_FDS_LIMIT = 1024;
/** REGION_WRITE_MULTI: each write carries at most this many data bytes. */
export const WRITE_MULTI_DATA = 8;
/** REGION_WRITE_MULTI: QEMU batches at most this many writes (VFIO_USER_MULTI_MAX); the spec sets no bound. */
export const QEMU_WRITE_MULTI_MAX = 200;
/** Size of an ioeventfd/ioregionfd sub-region entry in the spec (libvfio-user sends 48). */
export const REGION_IO_FD_ENTRY_SIZE = 40;
