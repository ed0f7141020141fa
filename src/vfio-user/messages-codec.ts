/**
 * The shape every per-command body codec has, and the syntax checks they
 * share. Checks here are about the bytes only (sizes, counts, reserved bits,
 * overflow, configured limits); negotiated or device state is the handler's.
 */
import { ProtocolError } from '../wire/errors.js';
import type { Layout } from '../wire/layout.js';
import { view } from '../wire/layout.js';
import { DEFAULT_MAX_DATA_XFER_SIZE, HEADER_SIZE } from './constants.js';

/** Limits the decoder enforces, from our side's configuration and advertised capabilities. */
export interface CodecLimits {
  /**
   * Largest `count`/`size` accepted in REGION/DMA READ/WRITE and MIG_DATA
   * bodies: the max_data_xfer_size we advertised (the sender must honour it).
   */
  readonly maxDataXferSize: number;
  /** Largest msg_size accepted, header included; bigger messages desynchronise the stream. */
  readonly maxMsgSize: number;
}

/**
 * Limits for a given max_data_xfer_size. The default message bound leaves
 * room for the header and one 16-byte access header, as libvfio-user does.
 */
export function codecLimits(
  maxDataXferSize = DEFAULT_MAX_DATA_XFER_SIZE,
  maxMsgSize = HEADER_SIZE + 16 + maxDataXferSize,
): CodecLimits {
  return Object.freeze({ maxDataXferSize, maxMsgSize });
}

export const DEFAULT_LIMITS: CodecLimits = codecLimits();

/**
 * Decoder and encoder of one command body in one direction. Encoding is
 * split so a message can be assembled without intermediate buffers: `write`
 * puts the head (fixed part and small inline parts) after the header, and
 * `tail` is a payload appended as is (sent as a separate chunk when large).
 */
export interface BodyCodec<T> {
  /** Decodes a body (the bytes after the header; exactly msg_size - 16). Throws ProtocolError. */
  decode(body: Uint8Array, limits: CodecLimits): T;
  /** Size of what `write` writes. Throws ProtocolError WIRE_VALUE for an inconsistent value. */
  headSize(value: T): number;
  write(value: T, buf: Uint8Array, offset: number): void;
  /** Payload appended after the head, or undefined. */
  tail(value: T): Uint8Array | undefined;
  /**
   * Decodes a body whose payload was received elsewhere (FrameReader
   * placement): `head` is the fixed part, `data` the payload. Only codecs
   * whose body is a fixed head plus data have it.
   */
  decodePlaced?(head: Uint8Array, data: Uint8Array, limits: CodecLimits): T;
}

/** A body with no payload: the empty body decodes to `undefined`. */
export const emptyBody: BodyCodec<undefined> = {
  decode(body) {
    if (body.length !== 0) throw badSize('body', body.length, 0);
    return undefined;
  },
  headSize: () => 0,
  write() {},
  tail: () => undefined,
};

/** A body that is exactly one layout, with an optional extra syntax check. */
export function fixedBody<T>(layout: Layout<T>, check?: (value: T, limits: CodecLimits) => void): BodyCodec<T> {
  return {
    decode(body, limits) {
      exactSize(body, layout.size, layout.name);
      const value = layout.decode(body, 0);
      if (check) check(value, limits);
      return value;
    },
    headSize: () => layout.size,
    write(value, buf, offset) {
      layout.encode(value, buf, offset);
    },
    tail: () => undefined,
  };
}

function badSize(what: string, have: number, want: number): ProtocolError {
  return new ProtocolError('VFU_BAD_SIZE', `${what}: body is ${have} bytes, expected ${want}`, {
    field: what,
    value: have,
    limit: want,
  });
}

/** The body must be at least `min` bytes. */
export function minSize(body: Uint8Array, min: number, what: string): void {
  if (body.length < min) {
    throw new ProtocolError('VFU_SHORT', `${what}: body is ${body.length} bytes, need at least ${min}`, {
      field: what,
      value: body.length,
      limit: min,
    });
  }
}

/** The body must be exactly `size` bytes (VFU_SHORT if shorter, VFU_BAD_SIZE if longer). */
export function exactSize(body: Uint8Array, size: number, what: string): void {
  minSize(body, size, what);
  if (body.length !== size) throw badSize(what, body.length, size);
}

/** argsz must cover at least `min` bytes. */
export function minArgsz(argsz: number, min: number, what: string): void {
  if (argsz < min) {
    throw new ProtocolError('VFU_BAD_ARGSZ', `${what}: argsz ${argsz} is smaller than ${min}`, {
      field: `${what}.argsz`,
      value: argsz,
      limit: min,
    });
  }
}

/** A field the spec says must be zero. */
export function mustBeZero(value: number, field: string): void {
  if (value !== 0) {
    throw new ProtocolError('VFU_RESERVED', `${field} must be zero, is ${value}`, { field, value, limit: 0 });
  }
}

/** Only the bits in `valid` may be set. */
export function validFlags(flags: number, valid: number, field: string): void {
  if ((flags & ~valid) >>> 0 !== 0) {
    throw new ProtocolError('VFU_BAD_FLAGS', `${field}: undefined bits 0x${((flags & ~valid) >>> 0).toString(16)}`, {
      field,
      value: flags,
      limit: valid,
    });
  }
}

export function badFlags(field: string, flags: number, why: string): ProtocolError {
  return new ProtocolError('VFU_BAD_FLAGS', `${field} 0x${flags.toString(16)}: ${why}`, { field, value: flags });
}

/** A transfer count within max_data_xfer_size. */
export function xferLimit(count: number, limits: CodecLimits, field: string): void {
  if (count > limits.maxDataXferSize) {
    throw new ProtocolError('VFU_TOO_BIG', `${field} ${count} exceeds max_data_xfer_size ${limits.maxDataXferSize}`, {
      field,
      value: count,
      limit: limits.maxDataXferSize,
    });
  }
}

/** start + count must stay a safe integer (both are already safe and non-negative). */
export function noOverflow(start: number, count: number, field: string): void {
  if (start + count > Number.MAX_SAFE_INTEGER) {
    throw new ProtocolError('VFU_OVERFLOW', `${field}: ${start} + ${count} overflows`, {
      field,
      value: start,
      limit: Number.MAX_SAFE_INTEGER - count,
    });
  }
}

/** A count that disagrees with the bytes that carry it. */
export function badCount(field: string, count: number, expected: number, why: string): ProtocolError {
  return new ProtocolError('VFU_BAD_COUNT', `${field} ${count}: ${why}`, { field, value: count, limit: expected });
}

/** A field outside its closed enum or format. */
export function badValue(field: string, value: number, why: string): ProtocolError {
  return new ProtocolError('VFU_BAD_VALUE', `${field} ${value}: ${why}`, { field, value });
}

export function isPowerOfTwo(n: number): boolean {
  return n > 0 && Number.isInteger(Math.log2(n));
}

/** An encoder given a value it cannot put on the wire (a caller bug, not peer input). */
export function encodeError(what: string, why: string): ProtocolError {
  return new ProtocolError('WIRE_VALUE', `${what}: ${why}`, { field: what });
}

/**
 * A fixed head with a `count` field followed by exactly `count` data bytes
 * (REGION_READ reply, REGION_WRITE request, DMA_READ reply, DMA_WRITE
 * request). `count` is bounded by max_data_xfer_size; `start` names the
 * address field whose sum with count must not overflow.
 */
export function withData<T extends { count: number }>(
  layout: Layout<T>,
  start: keyof T & string,
): BodyCodec<T & { data: Uint8Array }> {
  const what = layout.name;
  const decodeWith = (body: Uint8Array, dataLength: number, limits: CodecLimits): T & { data: Uint8Array } => {
    const value = layout.decode(body, 0) as T & { data: Uint8Array };
    xferLimit(value.count, limits, `${what}.count`);
    if (dataLength !== value.count) {
      throw badCount(`${what}.count`, value.count, dataLength, 'does not match the data length');
    }
    noOverflow(value[start] as number, value.count, `${what}.${start}`);
    return value;
  };
  return {
    decode(body, limits) {
      minSize(body, layout.size, what);
      const value = decodeWith(body, body.length - layout.size, limits);
      value.data = view(body, layout.size);
      return value;
    },
    decodePlaced(head, data, limits) {
      exactSize(head, layout.size, what);
      const value = decodeWith(head, data.length, limits);
      value.data = data;
      return value;
    },
    headSize(value) {
      if (value.data.length !== value.count) throw encodeError(`${what}.count`, 'must equal data.length');
      return layout.size;
    },
    write(value, buf, offset) {
      layout.encode(value, buf, offset);
    },
    tail: (value) => value.data,
  };
}

/** Accepts an empty body as `null` (peers that reply with the header only). */
export function orEmpty<T>(codec: BodyCodec<T>): BodyCodec<T | null> {
  return {
    decode: (body, limits) => (body.length === 0 ? null : codec.decode(body, limits)),
    headSize: (value) => (value === null ? 0 : codec.headSize(value)),
    write(value, buf, offset) {
      if (value !== null) codec.write(value, buf, offset);
    },
    tail: (value) => (value === null ? undefined : codec.tail(value)),
    // A placed body is never empty (it has a payload), so it is the wrapped codec's.
    ...(codec.decodePlaced ? { decodePlaced: codec.decodePlaced.bind(codec) } : {}),
  };
}
