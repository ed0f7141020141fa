/**
 * VERSION negotiation: the capabilities JSON (`{"capabilities": {...}}`),
 * parsed with defaults filled, built for our side, and checked the way a
 * client checks a server's reply. The codec has already checked that the
 * version data was NUL-terminated UTF-8; here it is a string.
 */
import { ProtocolError } from '../wire/errors.js';
import {
  DEFAULT_MAX_BITMAP_SIZE,
  DEFAULT_MAX_DATA_XFER_SIZE,
  DEFAULT_MAX_DMA_MAPS,
  DEFAULT_MAX_MSG_FDS,
  DEFAULT_PGSIZES,
  MAX_MSG_FDS_LIMIT,
  QEMU_MAX_DATA_XFER_SIZE,
  QEMU_MAX_MSG_FDS,
  VFIO_USER_MAJOR,
  VFIO_USER_MINOR,
} from './constants.js';

/** Legacy (0.9.1) `migration` capability, still sent by QEMU and libvfio-user. */
export interface MigrationCaps {
  /** Dirty bitmap page size. */
  pgsize: number;
  /** Largest dirty bitmap, when given. */
  maxBitmapSize?: number;
}

export interface TwinSocketCaps {
  supported: boolean;
  /** Reply only: index in the reply's fds of the server-to-client command socket. */
  fdIndex?: number;
}

/** Capabilities of one side, spec defaults filled in for what it did not say. */
export interface Capabilities {
  /** Most fds the sender of this field can receive in one message (default 1). */
  maxMsgFds: number;
  /** Largest count the sender accepts in DMA/REGION READ/WRITE (default 1 MiB). */
  maxDataXferSize: number;
  /** Most DMA map windows valid at once (default 65535). */
  maxDmaMaps: number;
  /** Page sizes supported in DMA_MAP, OR-ed together (default 4 KiB only). A bitmask, hence bigint. */
  pgsizes: bigint;
  /** REGION_WRITE_MULTI is accepted (default false). */
  writeMultiple: boolean;
  /** Present only if the JSON had it. */
  migration?: MigrationCaps;
  /** Present only if the JSON had it. */
  twinSocket?: TwinSocketCaps;
}

export interface ParsedCapabilities extends Capabilities {
  /** Keys we do not know (dotted paths); tolerated, reported for logging. */
  unknownKeys: string[];
}

export const DEFAULT_CAPABILITIES: Readonly<Capabilities> = Object.freeze({
  maxMsgFds: DEFAULT_MAX_MSG_FDS,
  maxDataXferSize: DEFAULT_MAX_DATA_XFER_SIZE,
  maxDmaMaps: DEFAULT_MAX_DMA_MAPS,
  pgsizes: DEFAULT_PGSIZES,
  writeMultiple: false,
});

const U64_MAX = 0xffff_ffff_ffff_ffffn;

function badCaps(path: string, why: string): ProtocolError {
  return new ProtocolError('VFU_BAD_CAPS', `capabilities: ${path} ${why}`, { field: path });
}

function incompatible(path: string, value: number | bigint, limit: number | bigint, why: string): ProtocolError {
  const message = `capabilities: ${path} ${value} ${why}`;
  return new ProtocolError('VFU_INCOMPATIBLE_CAPS', message, { field: path, value, limit });
}

type JsonObject = Record<string, unknown>;

function isObject(v: unknown): v is JsonObject {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function objectAt(v: unknown, path: string): JsonObject {
  if (!isObject(v)) throw badCaps(path, 'is not an object');
  return v;
}

function uintAt(v: unknown, path: string): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) throw badCaps(path, 'is not a non-negative integer');
  return v;
}

/** A bitmask number; above 2^53 JSON numbers are doubles, whose integer value is taken as is. */
function maskAt(v: unknown, path: string): bigint {
  if (typeof v !== 'number' || !Number.isInteger(v) || v < 0) throw badCaps(path, 'is not a non-negative integer');
  const b = BigInt(v);
  if (b > U64_MAX) throw badCaps(path, 'does not fit in 64 bits');
  return b;
}

function boolAt(v: unknown, path: string): boolean {
  if (typeof v !== 'boolean') throw badCaps(path, 'is not a boolean');
  return v;
}

function unknownKeys(o: JsonObject, known: readonly string[], path: string, out: string[]): void {
  for (const k of Object.keys(o)) if (!known.includes(k)) out.push(path ? `${path}.${k}` : k);
}

/**
 * Parses version data. Missing data, a missing `capabilities` object and
 * missing members all mean the spec defaults; unknown keys are tolerated;
 * a member of the wrong type (or a number that is not a non-negative
 * integer) is refused with VFU_BAD_CAPS (EINVAL). A max_msg_fds above 1024
 * is refused as libvfio-user does (VFU_INCOMPATIBLE_CAPS).
 */
export function parseCapabilities(json: string | undefined): ParsedCapabilities {
  const caps: ParsedCapabilities = { ...DEFAULT_CAPABILITIES, unknownKeys: [] };
  if (json === undefined || json.trim() === '') return caps;
  let root: unknown;
  try {
    root = JSON.parse(json);
  } catch {
    throw badCaps('version data', 'is not valid JSON');
  }
  const top = objectAt(root, 'version data');
  unknownKeys(top, ['capabilities'], '', caps.unknownKeys);
  if (top.capabilities === undefined) return caps;
  const c = objectAt(top.capabilities, 'capabilities');
  unknownKeys(c, CAPABILITY_KEYS, 'capabilities', caps.unknownKeys);
  if (c.max_msg_fds !== undefined) {
    caps.maxMsgFds = uintAt(c.max_msg_fds, 'max_msg_fds');
    if (caps.maxMsgFds > MAX_MSG_FDS_LIMIT) {
      throw incompatible('max_msg_fds', caps.maxMsgFds, MAX_MSG_FDS_LIMIT, 'is too large');
    }
  }
  if (c.max_data_xfer_size !== undefined) caps.maxDataXferSize = uintAt(c.max_data_xfer_size, 'max_data_xfer_size');
  if (c.max_dma_maps !== undefined) caps.maxDmaMaps = uintAt(c.max_dma_maps, 'max_dma_maps');
  if (c.pgsizes !== undefined) caps.pgsizes = maskAt(c.pgsizes, 'pgsizes');
  if (c.write_multiple !== undefined) caps.writeMultiple = boolAt(c.write_multiple, 'write_multiple');
  if (c.migration !== undefined) caps.migration = parseMigration(c.migration, caps.unknownKeys);
  if (c.twin_socket !== undefined) caps.twinSocket = parseTwinSocket(c.twin_socket, caps.unknownKeys);
  return caps;
}

const CAPABILITY_KEYS = [
  'max_msg_fds',
  'max_data_xfer_size',
  'max_dma_maps',
  'pgsizes',
  'twin_socket',
  'write_multiple',
  'migration',
] as const;

function parseMigration(v: unknown, unknown: string[]): MigrationCaps {
  const m = objectAt(v, 'migration');
  unknownKeys(m, ['pgsize', 'max_bitmap_size'], 'capabilities.migration', unknown);
  const migration: MigrationCaps = { pgsize: Number(DEFAULT_PGSIZES) };
  if (m.pgsize !== undefined) migration.pgsize = uintAt(m.pgsize, 'migration.pgsize');
  if (m.max_bitmap_size !== undefined) migration.maxBitmapSize = uintAt(m.max_bitmap_size, 'migration.max_bitmap_size');
  return migration;
}

function parseTwinSocket(v: unknown, unknown: string[]): TwinSocketCaps {
  const t = objectAt(v, 'twin_socket');
  unknownKeys(t, ['supported', 'fd_index'], 'capabilities.twin_socket', unknown);
  const twin: TwinSocketCaps = { supported: false };
  if (t.supported !== undefined) twin.supported = boolAt(t.supported, 'twin_socket.supported');
  if (t.fd_index !== undefined) twin.fdIndex = uintAt(t.fd_index, 'twin_socket.fd_index');
  return twin;
}

function buildError(path: string, why: string): ProtocolError {
  return new ProtocolError('WIRE_VALUE', `capabilities: ${path} ${why}`, { field: path });
}

function uintText(v: number, path: string): string {
  if (!Number.isSafeInteger(v) || v < 0) throw buildError(path, `${v} is not a non-negative integer`);
  return String(v);
}

/**
 * Builds version data from the members given (omitted ones are left to the
 * peer's defaults), in the spec's member order. The result has no NUL; the
 * VERSION encoder appends it.
 */
export function buildCapabilitiesJson(caps: Partial<Capabilities>): string {
  const m: string[] = [];
  const uint = (key: string, v: number | undefined, out = m, path = key): void => {
    if (v !== undefined) out.push(`"${key}":${uintText(v, path)}`);
  };
  uint('max_msg_fds', caps.maxMsgFds);
  uint('max_data_xfer_size', caps.maxDataXferSize);
  uint('max_dma_maps', caps.maxDmaMaps);
  if (caps.pgsizes !== undefined) {
    if (caps.pgsizes < 0n || caps.pgsizes > U64_MAX) throw buildError('pgsizes', 'does not fit in u64');
    m.push(`"pgsizes":${caps.pgsizes}`);
  }
  if (caps.twinSocket !== undefined) {
    const t = [`"supported":${caps.twinSocket.supported}`];
    uint('fd_index', caps.twinSocket.fdIndex, t, 'twin_socket.fd_index');
    m.push(`"twin_socket":{${t.join(',')}}`);
  }
  if (caps.writeMultiple !== undefined) m.push(`"write_multiple":${caps.writeMultiple}`);
  if (caps.migration !== undefined) {
    const g: string[] = [];
    uint('pgsize', caps.migration.pgsize, g, 'migration.pgsize');
    uint('max_bitmap_size', caps.migration.maxBitmapSize, g, 'migration.max_bitmap_size');
    m.push(`"migration":{${g.join(',')}}`);
  }
  return `{"capabilities":{${m.join(',')}}}`;
}

/** The smallest page size QEMU's client accepts in pgsizes and migration.pgsize (VFIO_USER_DEF_PGSIZE). */
const QEMU_MIN_PGSIZE = 4096;

export interface ServerCapsOptions {
  /** Whether we proposed twin_socket.supported (the reply's set must be a subset of ours). */
  proposedTwinSocket?: boolean;
  /** Number of fds that came with the VERSION reply (fd_index must be below it). */
  fdCount?: number;
}

/**
 * A client's check of the server's VERSION reply capabilities: the parse
 * above plus QEMU's hw/vfio-user/proxy.c limits (max_msg_fds <= 16,
 * max_data_xfer_size <= 64 MiB, pgsizes and migration.pgsize without bits
 * below 4 KiB, max_dma_maps <= 65535, migration.max_bitmap_size <= 256 MiB),
 * and the spec's twin-socket consistency rule. Failures are
 * VFU_INCOMPATIBLE_CAPS (or VFU_BAD_CAPS for malformed JSON).
 */
export function validateServerCapabilities(
  json: string | undefined,
  options: ServerCapsOptions = {},
): ParsedCapabilities {
  const caps = parseCapabilities(json);
  if (caps.maxMsgFds > QEMU_MAX_MSG_FDS) {
    throw incompatible('max_msg_fds', caps.maxMsgFds, QEMU_MAX_MSG_FDS, 'is too large');
  }
  if (caps.maxDataXferSize > QEMU_MAX_DATA_XFER_SIZE) {
    throw incompatible('max_data_xfer_size', caps.maxDataXferSize, QEMU_MAX_DATA_XFER_SIZE, 'is too large');
  }
  if ((caps.pgsizes & BigInt(QEMU_MIN_PGSIZE - 1)) !== 0n) {
    throw incompatible('pgsizes', caps.pgsizes, QEMU_MIN_PGSIZE, 'has page sizes below 4 KiB');
  }
  if (caps.maxDmaMaps > DEFAULT_MAX_DMA_MAPS) {
    throw incompatible('max_dma_maps', caps.maxDmaMaps, DEFAULT_MAX_DMA_MAPS, 'can only lower the default');
  }
  if (caps.migration) {
    if (caps.migration.pgsize % QEMU_MIN_PGSIZE !== 0) {
      throw incompatible('migration.pgsize', caps.migration.pgsize, QEMU_MIN_PGSIZE, 'is not a multiple of 4 KiB');
    }
    const max = caps.migration.maxBitmapSize;
    if (max !== undefined && max > DEFAULT_MAX_BITMAP_SIZE) {
      throw incompatible('migration.max_bitmap_size', max, DEFAULT_MAX_BITMAP_SIZE, 'is too large');
    }
  }
  const twin = caps.twinSocket;
  if (twin?.supported) {
    if (!options.proposedTwinSocket) throw incompatible('twin_socket.supported', 1, 0, 'was not proposed');
    if (twin.fdIndex === undefined) throw incompatible('twin_socket.fd_index', -1, 0, 'is missing');
    if (options.fdCount !== undefined && twin.fdIndex >= options.fdCount) {
      throw incompatible('twin_socket.fd_index', twin.fdIndex, options.fdCount, 'does not name a passed fd');
    }
  }
  return caps;
}

export interface ProtocolVersion {
  major: number;
  minor: number;
}

function badVersion(why: string, value: number, limit: number): ProtocolError {
  return new ProtocolError('VFU_BAD_VERSION', `version ${why}`, { field: 'version', value, limit });
}

/**
 * Server side: the version to reply with. The major must be ours (otherwise
 * VFU_BAD_VERSION, and the server closes); the minor is the smaller of the
 * two, as "the minor version in the reply must be equal to or less than the
 * minor version proposed".
 */
export function negotiateVersion(
  proposed: ProtocolVersion,
  supported: ProtocolVersion = { major: VFIO_USER_MAJOR, minor: VFIO_USER_MINOR },
): ProtocolVersion {
  if (proposed.major !== supported.major) {
    throw badVersion(`major ${proposed.major} is not supported`, proposed.major, supported.major);
  }
  return { major: supported.major, minor: Math.min(proposed.minor, supported.minor) };
}

/** Client side: the server's reply must keep our major and not raise our minor. */
export function checkVersionReply(proposed: ProtocolVersion, reply: ProtocolVersion): void {
  if (reply.major !== proposed.major) {
    throw badVersion(`major ${reply.major} in reply to ${proposed.major}`, reply.major, proposed.major);
  }
  if (reply.minor > proposed.minor) {
    throw badVersion(`minor ${reply.minor} above proposed ${proposed.minor}`, reply.minor, proposed.minor);
  }
}
