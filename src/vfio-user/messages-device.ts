/**
 * Session and device information messages: VERSION, DEVICE_GET_INFO,
 * DEVICE_GET_REGION_IO_FDS, DEVICE_GET_IRQ_INFO, DEVICE_SET_IRQS.
 * (DEVICE_GET_REGION_INFO and its capability chain: messages-region-info.ts.)
 */
import { ProtocolError } from '../wire/errors.js';
import type { ValueOfLayout } from '../wire/layout.js';
import { view } from '../wire/layout.js';
import { REGION_IO_FD_ENTRY_SIZE, SET_IRQS_ACTION_MASK, SET_IRQS_DATA_MASK, SetIrqsFlags } from './constants.js';
import { DEVICE_INFO, IRQ_INFO, IRQ_SET, REGION_IO_FD, REGION_IO_FDS, VERSION } from './messages-layouts.js';
import type { BodyCodec } from './messages-codec.js';
import {
  badCount,
  badFlags,
  encodeError,
  exactSize,
  fixedBody,
  minArgsz,
  minSize,
  mustBeZero,
  validFlags,
} from './messages-codec.js';

/** VERSION request and reply. `json` is the version data without its NUL, absent when none was sent. */
export interface Version {
  major: number;
  minor: number;
  json?: string;
}

export type DeviceInfo = ValueOfLayout<typeof DEVICE_INFO>;
export type RegionIoFdsHead = ValueOfLayout<typeof REGION_IO_FDS>;
export type RegionIoFd = ValueOfLayout<typeof REGION_IO_FD>;
/** GET_REGION_IO_FDS reply. `entries` is empty when the client's argsz was too small for them. */
export interface RegionIoFdsReply extends RegionIoFdsHead {
  entries: RegionIoFd[];
}
export type IrqInfo = ValueOfLayout<typeof IRQ_INFO>;
/** SET_IRQS request; `data` holds the bool bytes of DATA_BOOL, and is empty otherwise. */
export type SetIrqs = ValueOfLayout<typeof IRQ_SET> & { data: Uint8Array };

const utf8 = new TextDecoder('utf-8', { fatal: true });

function badVersion(why: string): ProtocolError {
  return new ProtocolError('VFU_BAD_VERSION', `version data ${why}`, { field: 'version.data' });
}

/** VERSION: major, minor, then optional UTF-8 JSON whose only NUL is its last byte. */
export const versionBody: BodyCodec<Version> = {
  decode(body) {
    minSize(body, VERSION.size, 'version');
    const v: Version = VERSION.decode(body, 0);
    if (body.length > VERSION.size) {
      const end = body.length - 1;
      if (body[end] !== 0) throw badVersion('is not NUL-terminated');
      const text = body.subarray(VERSION.size, end);
      if (text.includes(0)) throw badVersion('has a NUL before its end');
      try {
        if (text.length > 0) v.json = utf8.decode(text);
      } catch {
        throw badVersion('is not valid UTF-8');
      }
    }
    return v;
  },
  headSize(v) {
    if (v.json === undefined) return VERSION.size;
    if (v.json.includes('\0')) throw encodeError('version.json', 'must not contain NUL');
    return VERSION.size + Buffer.byteLength(v.json, 'utf8') + 1;
  },
  write(v, buf, offset) {
    VERSION.encode(v, buf, offset);
    if (v.json !== undefined) {
      const n = Buffer.from(buf.buffer, buf.byteOffset, buf.byteLength).write(v.json, offset + VERSION.size, 'utf8');
      buf[offset + VERSION.size + n] = 0;
    }
  },
  tail: () => undefined,
};

/** DEVICE_GET_INFO request: argsz covers the 16-byte reply; all other fields must be zero. */
export const deviceInfoRequest = fixedBody(DEVICE_INFO, (v) => {
  minArgsz(v.argsz, DEVICE_INFO.size, 'device_info');
  mustBeZero(v.flags, 'device_info.flags');
  mustBeZero(v.numRegions, 'device_info.num_regions');
  mustBeZero(v.numIrqs, 'device_info.num_irqs');
});

export const deviceInfoReply = fixedBody(DEVICE_INFO, (v) => minArgsz(v.argsz, DEVICE_INFO.size, 'device_info'));

/** GET_REGION_IO_FDS request: argsz and index; flags and count must be zero. */
export const regionIoFdsRequest = fixedBody(REGION_IO_FDS, (v) => {
  minArgsz(v.argsz, REGION_IO_FDS.size, 'region_io_fds');
  mustBeZero(v.flags, 'region_io_fds.flags');
  mustBeZero(v.count, 'region_io_fds.count');
});

/**
 * GET_REGION_IO_FDS reply. Entries sit at a stride of (argsz - 16) / count
 * (40 bytes in the spec, 48 from libvfio-user); we read the spec's 40 bytes
 * of each and write 40-byte entries.
 */
export const regionIoFdsReply: BodyCodec<RegionIoFdsReply> = {
  decode(body) {
    minSize(body, REGION_IO_FDS.size, 'region_io_fds');
    const head = REGION_IO_FDS.decode(body, 0);
    minArgsz(head.argsz, REGION_IO_FDS.size, 'region_io_fds');
    mustBeZero(head.flags, 'region_io_fds.flags');
    const v: RegionIoFdsReply = { ...head, entries: [] };
    if (body.length === REGION_IO_FDS.size) return v;
    const stride = head.count === 0 ? 0 : (head.argsz - REGION_IO_FDS.size) / head.count;
    if (!Number.isInteger(stride) || stride < REGION_IO_FD_ENTRY_SIZE) {
      throw badCount('region_io_fds.count', head.count, REGION_IO_FD_ENTRY_SIZE, 'argsz does not hold count entries');
    }
    if (body.length !== head.argsz) {
      throw badCount('region_io_fds.count', head.count, head.argsz, 'body does not hold count entries');
    }
    for (let i = 0; i < head.count; i++) v.entries.push(REGION_IO_FD.decode(body, REGION_IO_FDS.size + i * stride));
    return v;
  },
  headSize(v) {
    if (v.entries.length === 0) return REGION_IO_FDS.size;
    if (v.entries.length !== v.count || v.argsz !== REGION_IO_FDS.size + v.count * REGION_IO_FD_ENTRY_SIZE) {
      throw encodeError('region_io_fds', 'entries must number count, with argsz = 16 + 40 * count');
    }
    return v.argsz;
  },
  write(v, buf, offset) {
    REGION_IO_FDS.encode(v, buf, offset);
    let o = offset + REGION_IO_FDS.size;
    for (const e of v.entries) {
      REGION_IO_FD.encode(e, buf, o);
      o += REGION_IO_FD_ENTRY_SIZE;
    }
  },
  tail: () => undefined,
};

/** GET_IRQ_INFO request: argsz and index; flags and count must be zero. */
export const irqInfoRequest = fixedBody(IRQ_INFO, (v) => {
  minArgsz(v.argsz, IRQ_INFO.size, 'irq_info');
  mustBeZero(v.flags, 'irq_info.flags');
  mustBeZero(v.count, 'irq_info.count');
});

export const irqInfoReply = fixedBody(IRQ_INFO, (v) => minArgsz(v.argsz, IRQ_INFO.size, 'irq_info'));

function oneBit(x: number): boolean {
  return x !== 0 && (x & (x - 1)) === 0;
}

/**
 * SET_IRQS request: argsz is the request size; exactly one DATA_* and one
 * ACTION_* flag; DATA_BOOL carries count bool bytes, the others no data
 * (eventfds travel as fds). Which index/range is valid is the handler's call.
 */
export const setIrqsRequest: BodyCodec<SetIrqs> = {
  decode(body) {
    minSize(body, IRQ_SET.size, 'irq_set');
    const v = IRQ_SET.decode(body, 0) as SetIrqs;
    if (v.argsz !== body.length) {
      throw new ProtocolError('VFU_BAD_ARGSZ', `irq_set.argsz ${v.argsz} is not the request size ${body.length}`, {
        field: 'irq_set.argsz',
        value: v.argsz,
        limit: body.length,
      });
    }
    validFlags(v.flags, SET_IRQS_DATA_MASK | SET_IRQS_ACTION_MASK, 'irq_set.flags');
    if (!oneBit(v.flags & SET_IRQS_DATA_MASK) || !oneBit(v.flags & SET_IRQS_ACTION_MASK)) {
      throw badFlags('irq_set.flags', v.flags, 'need exactly one DATA_* and one ACTION_* flag');
    }
    if (v.start + v.count > 0xffff_ffff) {
      throw new ProtocolError('VFU_OVERFLOW', `irq_set: start ${v.start} + count ${v.count} overflows`, {
        field: 'irq_set.start',
        value: v.start,
      });
    }
    if (v.flags & SetIrqsFlags.DATA_BOOL) {
      if (body.length - IRQ_SET.size !== v.count) {
        throw badCount('irq_set.count', v.count, body.length - IRQ_SET.size, 'DATA_BOOL needs count bool bytes');
      }
      v.data = view(body, IRQ_SET.size);
    } else {
      exactSize(body, IRQ_SET.size, 'irq_set');
      v.data = view(body, IRQ_SET.size);
    }
    return v;
  },
  headSize(v) {
    const bools = (v.flags & SetIrqsFlags.DATA_BOOL) !== 0;
    if (bools ? v.data.length !== v.count : v.data.length !== 0) {
      throw encodeError('irq_set.data', 'DATA_BOOL needs count bytes, other data types none');
    }
    return IRQ_SET.size;
  },
  write(v, buf, offset) {
    IRQ_SET.encode(v, buf, offset);
  },
  tail: (v) => (v.data.length > 0 ? v.data : undefined),
};
