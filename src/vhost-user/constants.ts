/**
 * vhost-user protocol numbers (docs/interop/vhost-user.rst in QEMU; the
 * checklist in shared/docs/reference/protocol-checklist.md section 2).
 */

/** Header: request u32, flags u32, size u32 (native byte order; little-endian on our hosts). */
export const HEADER_SIZE = 12;
/** flags bits 0-1: the protocol version, always 1. */
export const FLAG_VERSION = 0x1;
export const FLAG_VERSION_MASK = 0x3;
export const FLAG_REPLY = 0x4;
export const FLAG_NEED_REPLY = 0x8;
/** At most this many fds travel with one message (QEMU's VHOST_MEMORY_BASELINE_NREGIONS). */
export const MAX_FDS = 8;
/** Regions in one SET_MEM_TABLE. */
export const MAX_MEM_TABLE_REGIONS = 8;
/** The largest payload we accept (QEMU's payload union is far smaller; a config is at most 256 + 12). */
export const MAX_PAYLOAD = 4096;
/** GET_CONFIG / SET_CONFIG payload bytes at most (QEMU's VHOST_USER_MAX_CONFIG_SIZE). */
export const MAX_CONFIG_SIZE = 256;

/** Front-end -> back-end requests. */
export const Req = {
  GET_FEATURES: 1,
  SET_FEATURES: 2,
  SET_OWNER: 3,
  RESET_OWNER: 4,
  SET_MEM_TABLE: 5,
  SET_LOG_BASE: 6,
  SET_LOG_FD: 7,
  SET_VRING_NUM: 8,
  SET_VRING_ADDR: 9,
  SET_VRING_BASE: 10,
  GET_VRING_BASE: 11,
  SET_VRING_KICK: 12,
  SET_VRING_CALL: 13,
  SET_VRING_ERR: 14,
  GET_PROTOCOL_FEATURES: 15,
  SET_PROTOCOL_FEATURES: 16,
  GET_QUEUE_NUM: 17,
  SET_VRING_ENABLE: 18,
  SEND_RARP: 19,
  NET_SET_MTU: 20,
  SET_BACKEND_REQ_FD: 21,
  IOTLB_MSG: 22,
  SET_VRING_ENDIAN: 23,
  GET_CONFIG: 24,
  SET_CONFIG: 25,
  CREATE_CRYPTO_SESSION: 26,
  CLOSE_CRYPTO_SESSION: 27,
  POSTCOPY_ADVISE: 28,
  POSTCOPY_LISTEN: 29,
  POSTCOPY_END: 30,
  GET_INFLIGHT_FD: 31,
  SET_INFLIGHT_FD: 32,
  GPU_SET_SOCKET: 33,
  RESET_DEVICE: 34,
  VRING_KICK: 35,
  GET_MAX_MEM_SLOTS: 36,
  ADD_MEM_REG: 37,
  REM_MEM_REG: 38,
  SET_STATUS: 39,
  GET_STATUS: 40,
  GET_SHARED_OBJECT: 41,
  SET_DEVICE_STATE_FD: 42,
  CHECK_DEVICE_STATE: 43,
  GET_SHMEM_CONFIG: 44,
} as const;

export const REQ_NAMES: Record<number, string> = Object.fromEntries(Object.entries(Req).map(([k, v]) => [v, k]));

/** Back-end -> front-end requests (the SET_BACKEND_REQ_FD channel). */
export const BackendReq = {
  IOTLB_MSG: 1,
  CONFIG_CHANGE_MSG: 2,
  VRING_HOST_NOTIFIER_MSG: 3,
  VRING_CALL: 4,
  VRING_ERR: 5,
  SHARED_OBJECT_ADD: 6,
  SHARED_OBJECT_REMOVE: 7,
  SHARED_OBJECT_LOOKUP: 8,
} as const;

/** Protocol feature bits (GET/SET_PROTOCOL_FEATURES). */
export const ProtocolFeature = {
  MQ: 0,
  LOG_SHMFD: 1,
  RARP: 2,
  REPLY_ACK: 3,
  NET_MTU: 4,
  BACKEND_REQ: 5,
  CROSS_ENDIAN: 6,
  CRYPTO_SESSION: 7,
  PAGEFAULT: 8,
  CONFIG: 9,
  BACKEND_SEND_FD: 10,
  HOST_NOTIFIER: 11,
  INFLIGHT_SHMFD: 12,
  RESET_DEVICE: 13,
  INBAND_NOTIFICATIONS: 14,
  CONFIGURE_MEM_SLOTS: 15,
  STATUS: 16,
  XEN_MMAP: 17,
  SHARED_OBJECT: 18,
  DEVICE_STATE: 19,
} as const;

export const PROTOCOL_FEATURE_NAMES: Record<number, string> = Object.fromEntries(
  Object.entries(ProtocolFeature).map(([k, v]) => [v, k]),
);

/** Virtio feature bits the transport cares about. */
export const VirtioFeature = {
  NOTIFY_ON_EMPTY: 24,
  ANY_LAYOUT: 27,
  INDIRECT_DESC: 28,
  EVENT_IDX: 29,
  /** VHOST_USER_F_PROTOCOL_FEATURES: the legacy UNUSED bit. */
  PROTOCOL_FEATURES: 30,
  /** VHOST_F_LOG_ALL: dirty logging of every guest-memory write. */
  LOG_ALL: 26,
  VERSION_1: 32,
  ACCESS_PLATFORM: 33,
  RING_PACKED: 34,
  IN_ORDER: 35,
  ORDER_PLATFORM: 36,
  SR_IOV: 37,
  NOTIFICATION_DATA: 38,
  RING_RESET: 40,
} as const;

/** SET_VRING_KICK / CALL / ERR payload: bits 0-7 the ring, bit 8 no fd attached. */
export const VRING_IDX_MASK = 0xff;
export const VRING_NOFD = 0x100;
/** SET_VRING_ADDR flags bit 0: log used-ring writes at log_guest_addr. */
export const VRING_F_LOG = 0x1;
/** The dirty log's page size. */
export const LOG_PAGE = 0x1000;
/** Memory slots we offer with CONFIGURE_MEM_SLOTS (QEMU clamps to it; libvhost-user offers 509). */
export const MAX_MEM_SLOTS = 509;

export const bit = (n: number): bigint => 1n << BigInt(n);
