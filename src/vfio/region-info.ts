/**
 * Region info and its capability chain, built and walked the way the kernel's
 * info-cap helpers do (vfio_info_cap_add / vfio_info_cap_shift):
 *
 * - each capability starts with {u16 id, u16 version, u32 next} and is padded
 *   to a multiple of 8 bytes, so every capability stays 8-byte aligned;
 * - capabilities are appended in order, and `next` (like the info struct's
 *   cap_offset) counts from the start of the info struct, not of the chain:
 *   the chain is laid out after the 32-byte struct vfio_region_info, so every
 *   offset is shifted by 32; `next` 0 ends the chain.
 *
 * The parser treats its input as hostile (a client reads a server's reply):
 * it checks every header and body against the buffer, requires strictly
 * increasing offsets (so a chain cannot loop) and bounds the walk.
 */
import { Errno, VfioError, invalid } from './errors.js';
import { INFO_CAP_HEADER_SIZE, REGION_INFO_SIZE, RegionInfoCap, RegionInfoFlag } from './uapi.js';

/** One mmappable area of a region (offsets relative to the region). */
export interface SparseMmapArea {
  offset: number;
  size: number;
}

/** A parsed capability. Known capabilities of version 1 are decoded; anything else is kept raw. */
export type InfoCap =
  | { kind: 'sparse-mmap'; id: typeof RegionInfoCap.SPARSE_MMAP; version: number; offset: number; areas: SparseMmapArea[] }
  | { kind: 'type'; id: typeof RegionInfoCap.TYPE; version: number; offset: number; type: number; subtype: number }
  | { kind: 'msix-mappable'; id: typeof RegionInfoCap.MSIX_MAPPABLE; version: number; offset: number }
  | {
      kind: 'raw';
      id: number;
      version: number;
      offset: number;
      /** Bytes after the header, up to the next capability (or the end of the buffer for the last one). */
      body: Uint8Array;
    };

/** Version of the capability layouts this module decodes. */
const CAP_VERSION_1 = 1;
/** Fixed part of the SPARSE_MMAP body: nr_areas u32, reserved u32. */
const SPARSE_MMAP_FIXED = 8;
/** One sparse mmap area: offset u64, size u64. */
const SPARSE_MMAP_AREA = 16;
/** TYPE body: type u32, subtype u32. */
const TYPE_BODY = 8;
const TWO_32 = 0x1_0000_0000;

const align8 = (n: number): number => (n + 7) & ~7;

function writeU64(view: DataView, at: number, value: number): void {
  if (!Number.isSafeInteger(value) || value < 0) {
    throw new RangeError(`u64 field must be a safe non-negative integer, got ${value}`);
  }
  view.setUint32(at, value % TWO_32, true);
  view.setUint32(at + 4, Math.floor(value / TWO_32), true);
}

function readU64(view: DataView, at: number, what: string): number {
  const value = view.getUint32(at + 4, true) * TWO_32 + view.getUint32(at, true);
  if (!Number.isSafeInteger(value)) {
    throw new VfioError('VALUE_TOO_LARGE', Errno.EOVERFLOW, `${what} does not fit in 53 bits`);
  }
  return value;
}

function u32(value: number, what: string): number {
  if (!Number.isInteger(value) || value < 0 || value > 0xffff_ffff) {
    throw new RangeError(`${what} must be a u32, got ${value}`);
  }
  return value;
}

const view = (b: Uint8Array): DataView => new DataView(b.buffer, b.byteOffset, b.byteLength);

/**
 * Collects capabilities and lays them out as a chain. The builder only holds
 * bodies; offsets are assigned by encode(), for the base the chain will sit at.
 */
export class InfoCapChainBuilder {
  readonly #caps: { id: number; version: number; body: Uint8Array }[] = [];

  /** Appends a capability with an arbitrary body (padded to 8 bytes on encode). */
  add(id: number, version: number, body: Uint8Array = new Uint8Array(0)): this {
    if (!Number.isInteger(id) || id < 0 || id > 0xffff) throw new RangeError(`cap id must be a u16, got ${id}`);
    if (!Number.isInteger(version) || version < 0 || version > 0xffff) {
      throw new RangeError(`cap version must be a u16, got ${version}`);
    }
    this.#caps.push({ id, version, body: body.slice() });
    return this;
  }

  /** SPARSE_MMAP v1: the areas of the region that may be mmapped. */
  sparseMmap(areas: readonly SparseMmapArea[]): this {
    const body = new Uint8Array(SPARSE_MMAP_FIXED + areas.length * SPARSE_MMAP_AREA);
    const v = view(body);
    v.setUint32(0, u32(areas.length, 'nr_areas'), true);
    areas.forEach((a, i) => {
      writeU64(v, SPARSE_MMAP_FIXED + i * SPARSE_MMAP_AREA, a.offset);
      writeU64(v, SPARSE_MMAP_FIXED + i * SPARSE_MMAP_AREA + 8, a.size);
    });
    return this.add(RegionInfoCap.SPARSE_MMAP, CAP_VERSION_1, body);
  }

  /** TYPE v1: a device specific region's type and subtype. */
  type(type: number, subtype: number): this {
    const body = new Uint8Array(TYPE_BODY);
    const v = view(body);
    v.setUint32(0, u32(type, 'type'), true);
    v.setUint32(4, u32(subtype, 'subtype'), true);
    return this.add(RegionInfoCap.TYPE, CAP_VERSION_1, body);
  }

  /** MSIX_MAPPABLE v1 (header only). */
  msixMappable(): this {
    return this.add(RegionInfoCap.MSIX_MAPPABLE, CAP_VERSION_1);
  }

  /** Number of capabilities added. */
  get count(): number {
    return this.#caps.length;
  }

  /** Bytes the encoded chain occupies (every capability rounded up to 8 bytes). */
  get byteLength(): number {
    let n = 0;
    for (const c of this.#caps) n += align8(INFO_CAP_HEADER_SIZE + c.body.length);
    return n;
  }

  /**
   * The chain's bytes, to be placed at offset `base` of the info struct
   * (default: right after struct vfio_region_info). The first capability is
   * at `base`, each `next` is an offset from the start of the info struct,
   * and the last `next` is 0. Empty when no capability was added.
   */
  encode(base: number = REGION_INFO_SIZE): Uint8Array {
    if (!Number.isInteger(base) || base < 0 || base % 8 !== 0) {
      throw new RangeError(`chain base must be a multiple of 8, got ${base}`);
    }
    const out = new Uint8Array(this.byteLength);
    const v = view(out);
    let at = 0;
    this.#caps.forEach((c, i) => {
      const size = align8(INFO_CAP_HEADER_SIZE + c.body.length);
      const last = i === this.#caps.length - 1;
      v.setUint16(at, c.id, true);
      v.setUint16(at + 2, c.version, true);
      v.setUint32(at + 4, last ? 0 : u32(base + at + size, 'next'), true);
      out.set(c.body, at + INFO_CAP_HEADER_SIZE);
      at += size;
    });
    return out;
  }
}

export interface ParseCapChainOptions {
  /** Lowest offset a capability may start at: the size of the fixed info struct (default 32). */
  minOffset?: number;
  /** Most capabilities accepted in one chain (default 64). */
  maxCaps?: number;
}

function capError(code: string, message: string): VfioError {
  return invalid(code, message);
}

/**
 * Walks the chain that starts at `capOffset` of `buf` (the whole info reply,
 * struct included, as offsets count from its start). `capOffset` 0 means no
 * chain. Throws VfioError (EINVAL) on a header or body outside the buffer, a
 * `next` that does not move forward, a known capability whose body is
 * truncated or runs into the next one, or too many capabilities.
 */
export function parseInfoCapChain(buf: Uint8Array, capOffset: number, options: ParseCapChainOptions = {}): InfoCap[] {
  const minOffset = options.minOffset ?? REGION_INFO_SIZE;
  const maxCaps = options.maxCaps ?? 64;
  const caps: InfoCap[] = [];
  if (capOffset === 0) return caps;
  const v = view(buf);
  let off = capOffset;
  for (;;) {
    if (!Number.isInteger(off) || off < minOffset) {
      throw capError('CAP_OFFSET_INVALID', `capability offset ${off} is inside the fixed info struct (< ${minOffset})`);
    }
    if (off + INFO_CAP_HEADER_SIZE > buf.length) {
      throw capError('CAP_OUT_OF_BOUNDS', `capability header at ${off} is outside the ${buf.length}-byte buffer`);
    }
    if (caps.length === maxCaps) {
      throw capError('CAP_CHAIN_TOO_LONG', `more than ${maxCaps} capabilities`);
    }
    const id = v.getUint16(off, true);
    const version = v.getUint16(off + 2, true);
    const next = v.getUint32(off + 4, true);
    if (next !== 0 && next < off + INFO_CAP_HEADER_SIZE) {
      throw capError('CAP_CHAIN_LOOP', `capability at ${off} has next ${next}, which does not move past its header`);
    }
    const end = next === 0 ? buf.length : Math.min(next, buf.length);
    const bodyAt = off + INFO_CAP_HEADER_SIZE;
    const need = (n: number): void => {
      if (bodyAt + n > buf.length) {
        throw capError('CAP_TRUNCATED', `capability ${id} at ${off} needs ${n} body bytes, the buffer ends at ${buf.length}`);
      }
      if (next !== 0 && bodyAt + n > next) {
        throw capError('CAP_OVERLAP', `capability ${id} at ${off} needs ${n} body bytes and runs into the next one at ${next}`);
      }
    };
    if (version === CAP_VERSION_1 && id === RegionInfoCap.SPARSE_MMAP) {
      need(SPARSE_MMAP_FIXED);
      const nr = v.getUint32(bodyAt, true);
      // Compare before multiplying: nr is attacker-chosen and up to 2^32-1.
      if (nr > (buf.length - bodyAt - SPARSE_MMAP_FIXED) / SPARSE_MMAP_AREA) {
        throw capError('CAP_TRUNCATED', `sparse mmap at ${off} claims ${nr} areas, more than the buffer holds`);
      }
      need(SPARSE_MMAP_FIXED + nr * SPARSE_MMAP_AREA);
      const areas: SparseMmapArea[] = [];
      for (let i = 0; i < nr; i++) {
        const a = bodyAt + SPARSE_MMAP_FIXED + i * SPARSE_MMAP_AREA;
        areas.push({ offset: readU64(v, a, 'sparse mmap area offset'), size: readU64(v, a + 8, 'sparse mmap area size') });
      }
      caps.push({ kind: 'sparse-mmap', id, version, offset: off, areas });
    } else if (version === CAP_VERSION_1 && id === RegionInfoCap.TYPE) {
      need(TYPE_BODY);
      caps.push({ kind: 'type', id, version, offset: off, type: v.getUint32(bodyAt, true), subtype: v.getUint32(bodyAt + 4, true) });
    } else if (version === CAP_VERSION_1 && id === RegionInfoCap.MSIX_MAPPABLE) {
      caps.push({ kind: 'msix-mappable', id, version, offset: off });
    } else {
      caps.push({ kind: 'raw', id, version, offset: off, body: buf.slice(bodyAt, Math.max(bodyAt, end)) });
    }
    if (next === 0) return caps;
    off = next;
  }
}

/**
 * Checks sparse mmap areas against their region: each area non-empty and
 * inside [0, regionSize). Throws VfioError EINVAL otherwise.
 */
export function checkSparseAreas(areas: readonly SparseMmapArea[], regionSize: number): void {
  for (const [i, a] of areas.entries()) {
    if (a.size === 0 || a.offset + a.size > regionSize) {
      throw invalid('CAP_SPARSE_AREA_OUTSIDE', `sparse mmap area ${i} [${a.offset}, +${a.size}) is not inside the ${regionSize}-byte region`);
    }
  }
}

/** struct vfio_region_info. */
export interface RegionInfo {
  /** In a request: the reply buffer size; in a reply: the size needed for everything. */
  argsz: number;
  /** RegionInfoFlag bits. */
  flags: number;
  index: number;
  /** Offset of the first capability from the start of this struct; 0 when none. */
  capOffset: number;
  size: number;
  /** Offset of the region in the device fd (in vfio-user: the mmap offset in the reply's fd). */
  offset: number;
}

/** Encodes the 32-byte struct vfio_region_info. */
export function encodeRegionInfo(info: RegionInfo): Uint8Array {
  const out = new Uint8Array(REGION_INFO_SIZE);
  writeRegionInfo(out, info);
  return out;
}

function writeRegionInfo(out: Uint8Array, info: RegionInfo): void {
  const v = view(out);
  v.setUint32(0, u32(info.argsz, 'argsz'), true);
  v.setUint32(4, u32(info.flags, 'flags'), true);
  v.setUint32(8, u32(info.index, 'index'), true);
  v.setUint32(12, u32(info.capOffset, 'cap_offset'), true);
  writeU64(v, 16, info.size);
  writeU64(v, 24, info.offset);
}

/** Decodes struct vfio_region_info from the start of `buf` (EINVAL if shorter than 32 bytes). */
export function decodeRegionInfo(buf: Uint8Array): RegionInfo {
  if (buf.length < REGION_INFO_SIZE) {
    throw invalid('REGION_INFO_SHORT', `region info needs ${REGION_INFO_SIZE} bytes, got ${buf.length}`);
  }
  const v = view(buf);
  return {
    argsz: v.getUint32(0, true),
    flags: v.getUint32(4, true),
    index: v.getUint32(8, true),
    capOffset: v.getUint32(12, true),
    size: readU64(v, 16, 'region size'),
    offset: readU64(v, 24, 'region offset'),
  };
}

/** What a server knows about a region when it answers GET_REGION_INFO. */
export interface RegionDescription {
  index: number;
  /** READ / WRITE / MMAP; a CAPS bit given here is ignored (the reply decides it). */
  flags: number;
  size: number;
  offset: number;
}

export interface RegionInfoReply {
  /** The reply payload: min(32 + caps, argsz) bytes. */
  bytes: Uint8Array;
  /** The size needed for the whole answer (the reply's argsz). */
  argsz: number;
  /** True when the chain fit and was included (CAPS set); only then does the reply carry the region fd. */
  capsIncluded: boolean;
}

/**
 * Composes a GET_REGION_INFO reply the way libvfio-user does: the reply's
 * argsz is the full size (32 + chain); the chain, the CAPS flag and
 * cap_offset = 32 are included only when the client's argsz holds it all; the
 * reply is min(32 + chain, client argsz) bytes, never padded up to argsz
 * (bytes past 32 are zero when the chain did not fit). A client argsz below
 * 32 is EINVAL.
 */
export function composeRegionInfoReply(
  clientArgsz: number,
  region: RegionDescription,
  caps?: InfoCapChainBuilder | null,
): RegionInfoReply {
  if (!Number.isInteger(clientArgsz) || clientArgsz < REGION_INFO_SIZE) {
    throw invalid('REGION_INFO_ARGSZ', `argsz ${clientArgsz} is below the ${REGION_INFO_SIZE}-byte region info`);
  }
  const chain = caps && caps.count > 0 ? caps.encode(REGION_INFO_SIZE) : new Uint8Array(0);
  const full = REGION_INFO_SIZE + chain.length;
  const capsIncluded = chain.length > 0 && clientArgsz >= full;
  const bytes = new Uint8Array(Math.min(full, clientArgsz));
  let flags = region.flags & ~RegionInfoFlag.CAPS;
  if (capsIncluded) flags |= RegionInfoFlag.CAPS;
  writeRegionInfo(bytes, {
    argsz: full,
    flags,
    index: region.index,
    capOffset: capsIncluded ? REGION_INFO_SIZE : 0,
    size: region.size,
    offset: region.offset,
  });
  if (capsIncluded) bytes.set(chain, REGION_INFO_SIZE);
  return { bytes, argsz: full, capsIncluded };
}

export interface ParsedRegionInfo {
  info: RegionInfo;
  caps: InfoCap[];
  /**
   * False when the server reported a larger argsz than the reply holds: the
   * chain did not fit, and the client should ask again with `info.argsz`.
   */
  complete: boolean;
}

/**
 * Parses a GET_REGION_INFO reply payload (client side). The chain is walked
 * only when CAPS is set and cap_offset is non-zero; cap_offset must then lie
 * in [32, length of the reply) and inside the reply's argsz, as QEMU checks.
 */
export function parseRegionInfoReply(buf: Uint8Array, options: ParseCapChainOptions = {}): ParsedRegionInfo {
  const info = decodeRegionInfo(buf);
  const complete = info.argsz <= buf.length;
  let caps: InfoCap[] = [];
  if ((info.flags & RegionInfoFlag.CAPS) !== 0 && info.capOffset !== 0) {
    if (info.capOffset > info.argsz) {
      throw invalid('CAP_OFFSET_INVALID', `cap_offset ${info.capOffset} is beyond argsz ${info.argsz}`);
    }
    const limit = Math.min(buf.length, Math.max(info.argsz, REGION_INFO_SIZE));
    caps = parseInfoCapChain(buf.subarray(0, limit), info.capOffset, options);
  }
  return { info, caps, complete };
}
