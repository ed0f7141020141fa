/**
 * Client memory messages: DMA_MAP and DMA_UNMAP (client to server), and the
 * message-based DMA_READ and DMA_WRITE (server to client).
 */
import type { ValueOfLayout } from '../wire/layout.js';
import { readU32, readU64, view } from '../wire/layout.js';
import { DMA_MAP_FLAGS_VALID, DMA_UNMAP_FLAGS_VALID, DmaMapFlags, DmaUnmapFlags } from './constants.js';
import { BITMAP, DMA_ACCESS, DMA_MAP, DMA_UNMAP } from './messages-layouts.js';
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
  noOverflow,
  orEmpty,
  validFlags,
  withData,
  xferLimit,
} from './messages-codec.js';
import { ProtocolError } from '../wire/errors.js';

export type DmaMap = ValueOfLayout<typeof DMA_MAP>;
export type DmaUnmapHead = ValueOfLayout<typeof DMA_UNMAP>;
export type Bitmap = ValueOfLayout<typeof BITMAP>;

/** DMA_UNMAP request: `bitmap` is present exactly when flags has GET_DIRTY_BITMAP (legacy). */
export interface DmaUnmap extends DmaUnmapHead {
  bitmap?: Bitmap;
}

/** DMA_UNMAP reply: the request entry echoed, with the dirty bitmap in the legacy mode. */
export interface DmaUnmapReply extends DmaUnmapHead {
  bitmap?: Bitmap & { data: Uint8Array };
}

export type DmaAccess = ValueOfLayout<typeof DMA_ACCESS>;
export type DmaAccessData = DmaAccess & { data: Uint8Array };

/** DMA_MAP: argsz is the request size (32); the flags are READ/WRITE plus libvfio-user's MMAP/FILE_IO. */
export const dmaMapRequest = fixedBody(DMA_MAP, (v) => {
  if (v.argsz !== DMA_MAP.size) {
    throw new ProtocolError('VFU_BAD_ARGSZ', `dma_map.argsz ${v.argsz} is not the request size ${DMA_MAP.size}`, {
      field: 'dma_map.argsz',
      value: v.argsz,
      limit: DMA_MAP.size,
    });
  }
  validFlags(v.flags, DMA_MAP_FLAGS_VALID, 'dma_map.flags');
  if (v.flags & DmaMapFlags.MMAP && v.flags & DmaMapFlags.FILE_IO) {
    throw badFlags('dma_map.flags', v.flags, 'MMAP and FILE_IO are exclusive');
  }
  noOverflow(v.address, v.size, 'dma_map.address');
  noOverflow(v.offset, v.size, 'dma_map.offset');
});

function checkUnmapHead(v: DmaUnmapHead, what: string): void {
  validFlags(v.flags, DMA_UNMAP_FLAGS_VALID, `${what}.flags`);
  if (v.flags & DmaUnmapFlags.ALL) {
    if (v.flags & DmaUnmapFlags.GET_DIRTY_BITMAP) {
      throw badFlags(`${what}.flags`, v.flags, 'ALL cannot be combined with GET_DIRTY_BITMAP');
    }
    mustBeZero(v.address, `${what}.address`);
    mustBeZero(v.size, `${what}.size`);
  }
  noOverflow(v.address, v.size, `${what}.address`);
}

const UNMAP_WITH_BITMAP = DMA_UNMAP.size + BITMAP.size;

export const dmaUnmapRequest: BodyCodec<DmaUnmap> = {
  decode(body, limits) {
    minSize(body, DMA_UNMAP.size, 'dma_unmap');
    const v: DmaUnmap = DMA_UNMAP.decode(body, 0);
    checkUnmapHead(v, 'dma_unmap');
    if (v.flags & DmaUnmapFlags.GET_DIRTY_BITMAP) {
      exactSize(body, UNMAP_WITH_BITMAP, 'dma_unmap');
      const bitmap = BITMAP.decode(body, DMA_UNMAP.size);
      xferLimit(bitmap.size, limits, 'dma_unmap.bitmap.size');
      minArgsz(v.argsz, UNMAP_WITH_BITMAP + bitmap.size, 'dma_unmap');
      v.bitmap = bitmap;
    } else {
      exactSize(body, DMA_UNMAP.size, 'dma_unmap');
      minArgsz(v.argsz, DMA_UNMAP.size, 'dma_unmap');
    }
    return v;
  },
  headSize(v) {
    if (!(v.flags & DmaUnmapFlags.GET_DIRTY_BITMAP) !== !v.bitmap) {
      throw encodeError('dma_unmap.bitmap', 'present exactly when flags has GET_DIRTY_BITMAP');
    }
    return v.bitmap ? UNMAP_WITH_BITMAP : DMA_UNMAP.size;
  },
  write(v, buf, offset) {
    DMA_UNMAP.encode(v, buf, offset);
    if (v.bitmap) BITMAP.encode(v.bitmap, buf, offset + DMA_UNMAP.size);
  },
  tail: () => undefined,
};

export const dmaUnmapReply: BodyCodec<DmaUnmapReply> = {
  decode(body) {
    minSize(body, DMA_UNMAP.size, 'dma_unmap reply');
    const v: DmaUnmapReply = DMA_UNMAP.decode(body, 0);
    checkUnmapHead(v, 'dma_unmap reply');
    if (v.flags & DmaUnmapFlags.GET_DIRTY_BITMAP) {
      minSize(body, UNMAP_WITH_BITMAP, 'dma_unmap reply');
      const bitmap = BITMAP.decode(body, DMA_UNMAP.size);
      if (body.length - UNMAP_WITH_BITMAP !== bitmap.size) {
        const have = body.length - UNMAP_WITH_BITMAP;
        throw badCount('dma_unmap.bitmap.size', bitmap.size, have, 'does not match the bitmap length');
      }
      v.bitmap = { pgsize: bitmap.pgsize, size: bitmap.size, data: view(body, UNMAP_WITH_BITMAP) };
    } else {
      exactSize(body, DMA_UNMAP.size, 'dma_unmap reply');
    }
    return v;
  },
  headSize(v) {
    if (!(v.flags & DmaUnmapFlags.GET_DIRTY_BITMAP) !== !v.bitmap) {
      throw encodeError('dma_unmap.bitmap', 'present exactly when flags has GET_DIRTY_BITMAP');
    }
    if (v.bitmap && v.bitmap.data.length !== v.bitmap.size) {
      throw encodeError('dma_unmap.bitmap.size', 'must equal data.length');
    }
    return v.bitmap ? UNMAP_WITH_BITMAP : DMA_UNMAP.size;
  },
  write(v, buf, offset) {
    DMA_UNMAP.encode(v, buf, offset);
    if (v.bitmap) BITMAP.encode(v.bitmap, buf, offset + DMA_UNMAP.size);
  },
  tail: (v) => v.bitmap?.data,
};

/** DMA_READ request (server to client): address and count, no data. */
export const dmaReadRequest = fixedBody(DMA_ACCESS, (v, limits) => {
  xferLimit(v.count, limits, 'dma_access.count');
  noOverflow(v.address, v.count, 'dma_access.address');
});

/** DMA_READ reply and DMA_WRITE request: address, count and count data bytes. */
export const dmaAccessWithData: BodyCodec<DmaAccessData> = withData(DMA_ACCESS, 'address');

/** Size of DMA_WRITE's reply as the spec's table has it: u64 address, u32 count. */
const DMA_WRITE_REPLY_SPEC_TABLE = 12;
const dmaAccessOnly = fixedBody(DMA_ACCESS);

/**
 * DMA_WRITE reply. We send {u64 address, u64 count} as libvfio-user expects;
 * we accept that, the spec table's literal 12-byte form (u32 count), and
 * QEMU's header-only reply (null).
 */
export const dmaWriteReply: BodyCodec<DmaAccess | null> = orEmpty<DmaAccess>({
  decode(body, limits) {
    if (body.length === DMA_WRITE_REPLY_SPEC_TABLE) {
      return { address: readU64(body, 0, 'dma_access.address'), count: readU32(body, 8) };
    }
    return dmaAccessOnly.decode(body, limits);
  },
  headSize: () => DMA_ACCESS.size,
  write(v, buf, offset) {
    DMA_ACCESS.encode(v, buf, offset);
  },
  tail: () => undefined,
});
