/**
 * Device region access by message: REGION_READ, REGION_WRITE and
 * REGION_WRITE_MULTI (all client to server).
 */
import type { ValueOfLayout } from '../wire/layout.js';
import { readU64, view } from '../wire/layout.js';
import { WRITE_MULTI_DATA } from './constants.js';
import { REGION_ACCESS, WRITE_MULTI, WRITE_ONE } from './messages-layouts.js';
import type { BodyCodec } from './messages-codec.js';
import {
  badCount,
  encodeError,
  fixedBody,
  minSize,
  noOverflow,
  orEmpty,
  withData,
  xferLimit,
} from './messages-codec.js';

export type RegionAccess = ValueOfLayout<typeof REGION_ACCESS>;
export type RegionAccessData = RegionAccess & { data: Uint8Array };

/** REGION_WRITE_MULTI request: wr_cnt is `writes.length`; each write holds at most 8 bytes. */
export interface RegionWriteMulti {
  writes: RegionAccessData[];
}

export type RegionWriteMultiReply = ValueOfLayout<typeof WRITE_MULTI>;

/** REGION_READ request: offset, region, count; no data. */
export const regionReadRequest = fixedBody(REGION_ACCESS, (v, limits) => {
  xferLimit(v.count, limits, 'region_access.count');
  noOverflow(v.offset, v.count, 'region_access.offset');
});

/**
 * REGION_READ reply: the access header and count bytes of data. libvfio-user
 * answers a zero-count read with no body at all, which decodes as null.
 */
export const regionReadReply: BodyCodec<RegionAccessData | null> = orEmpty(withData(REGION_ACCESS, 'offset'));

/** REGION_WRITE request: the access header and count bytes of data. */
export const regionWriteRequest: BodyCodec<RegionAccessData> = withData(REGION_ACCESS, 'offset');

/** REGION_WRITE reply: the access header echoed, no data. */
export const regionWriteReply = fixedBody(REGION_ACCESS);

export const regionWriteMultiRequest: BodyCodec<RegionWriteMulti> = {
  decode(body) {
    minSize(body, WRITE_MULTI.size, 'write_multi');
    const wrCnt = readU64(body, 0, 'write_multi.wr_cnt');
    const room = (body.length - WRITE_MULTI.size) / WRITE_ONE.size;
    if (wrCnt !== room) throw badCount('write_multi.wr_cnt', wrCnt, room, 'does not match the writes that follow');
    const writes: RegionAccessData[] = new Array<RegionAccessData>(wrCnt);
    for (let i = 0; i < wrCnt; i++) {
      const w = WRITE_ONE.decode(body, WRITE_MULTI.size + i * WRITE_ONE.size);
      if (w.count > WRITE_MULTI_DATA) {
        throw badCount(`write_multi.wrs[${i}].count`, w.count, WRITE_MULTI_DATA, 'a write carries at most 8 bytes');
      }
      noOverflow(w.offset, w.count, `write_multi.wrs[${i}].offset`);
      writes[i] = { offset: w.offset, region: w.region, count: w.count, data: view(w.data, 0, w.count) };
    }
    return { writes };
  },
  headSize(v) {
    for (const w of v.writes) {
      if (w.count > WRITE_MULTI_DATA || w.data.length !== w.count) {
        throw encodeError('write_multi.wrs.count', 'must equal data.length and be at most 8');
      }
    }
    return WRITE_MULTI.size + v.writes.length * WRITE_ONE.size;
  },
  write(v, buf, offset) {
    WRITE_MULTI.encode({ wrCnt: v.writes.length }, buf, offset);
    let o = offset + WRITE_MULTI.size;
    for (const w of v.writes) {
      WRITE_ONE.encode(w, buf, o);
      o += WRITE_ONE.size;
    }
  },
  tail: () => undefined,
};

/** REGION_WRITE_MULTI reply: the number of writes completed. */
export const regionWriteMultiReply = fixedBody(WRITE_MULTI);
