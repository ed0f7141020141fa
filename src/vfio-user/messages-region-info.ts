/**
 * DEVICE_GET_REGION_INFO. The reply is the 32-byte struct vfio_region_info
 * followed by an optional capability chain whose offsets (cap_offset, next)
 * count from the start of the struct. The codec carries the chain as bytes
 * and checks only that cap_offset lands inside them; building and walking the
 * chain is the VFIO model's job (src/vfio/region-info.ts).
 */
import { ProtocolError } from '../wire/errors.js';
import type { ValueOfLayout } from '../wire/layout.js';
import { view } from '../wire/layout.js';
import { RegionInfoFlags } from './constants.js';
import { CAP_HEADER, REGION_INFO } from './messages-layouts.js';
import type { BodyCodec } from './messages-codec.js';
import { fixedBody, minArgsz, minSize, mustBeZero, noOverflow } from './messages-codec.js';

export type RegionInfo = ValueOfLayout<typeof REGION_INFO>;
/**
 * GET_REGION_INFO reply: the struct and `caps`, the capability bytes after
 * it (from offset 32; empty when none or when argsz was too small). Decoding
 * also sets `raw`, the whole payload (struct and caps) that capability
 * offsets count from; encoding ignores it.
 */
export type RegionInfoReply = RegionInfo & { caps: Uint8Array; raw?: Uint8Array };

const regionInfoStruct = fixedBody(REGION_INFO, (v) => {
  minArgsz(v.argsz, REGION_INFO.size, 'region_info');
  mustBeZero(v.flags, 'region_info.flags');
  mustBeZero(v.capOffset, 'region_info.cap_offset');
  mustBeZero(v.size, 'region_info.size');
  mustBeZero(v.offset, 'region_info.offset');
});

/**
 * GET_REGION_INFO request: argsz and index; the other fields must be zero.
 * The body is the 32-byte struct, or the whole argsz-sized buffer of the
 * ioctl with zeros after the struct (libvfio-user's samples/client sends
 * that when it asks again with the argsz the first reply gave; libvfio-user
 * takes any body of at least 32 bytes).
 */
export const regionInfoRequest: BodyCodec<RegionInfo> = {
  ...regionInfoStruct,
  decode(body, limits) {
    if (body.length <= REGION_INFO.size) return regionInfoStruct.decode(body, limits);
    const v = regionInfoStruct.decode(view(body, 0, REGION_INFO.size), limits);
    if (body.length > v.argsz) {
      throw new ProtocolError('VFU_BAD_SIZE', `region_info: body is ${body.length} bytes, more than argsz ${v.argsz}`, {
        field: 'region_info',
        value: body.length,
        limit: v.argsz,
      });
    }
    for (let i = REGION_INFO.size; i < body.length; i++) {
      if (body[i] !== 0) throw new ProtocolError('VFU_RESERVED', `region_info: byte ${i} after the struct is not zero`, { field: 'region_info', value: i, limit: 0 });
    }
    return v;
  },
};

function badCap(why: string, value?: number): ProtocolError {
  return new ProtocolError('VFU_BAD_CAP', `region_info capability chain: ${why}`, { field: 'region_info.cap', value });
}

/**
 * GET_REGION_INFO reply: argsz is the full size needed, the body may be
 * shorter (truncated to the client's argsz). With CAPS set, cap_offset must
 * point at a capability header inside the body.
 */
export const regionInfoReply: BodyCodec<RegionInfoReply> = {
  decode(body) {
    minSize(body, REGION_INFO.size, 'region_info');
    const v = REGION_INFO.decode(body, 0) as RegionInfoReply;
    minArgsz(v.argsz, body.length, 'region_info');
    noOverflow(v.offset, v.size, 'region_info.offset');
    if (v.flags & RegionInfoFlags.CAPS) {
      if (v.capOffset < REGION_INFO.size || v.capOffset + CAP_HEADER.size > body.length) {
        throw badCap(`cap_offset ${v.capOffset} is outside the reply`, v.capOffset);
      }
    }
    v.caps = view(body, REGION_INFO.size);
    v.raw = view(body, 0);
    return v;
  },
  headSize: () => REGION_INFO.size,
  write(v, buf, offset) {
    REGION_INFO.encode(v, buf, offset);
  },
  tail: (v) => (v.caps.length > 0 ? v.caps : undefined),
};
