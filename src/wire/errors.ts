/**
 * The error class of the wire layer (struct layouts and the protocol codecs
 * built on them). Every malformed or out-of-limit input raises a
 * ProtocolError; nothing else escapes a decoder, so a caller can answer the
 * peer (vfio-user: an error reply carrying `errno`) or drop the connection
 * (`desync`) without inspecting messages.
 */

/** EINVAL (Linux): the errno a malformed message is answered with. */
const EINVAL = 22;

/**
 * Stable error codes. `WIRE_*` come from the generic layouts, `VFU_*` from the
 * vfio-user codec and capability parser. Other protocol codecs add their own
 * prefix (e.g. `VHU_*`); the type stays open for them.
 */
export type WireErrorCode =
  /** The buffer ends before the struct does. */
  | 'WIRE_SHORT'
  /** A u64 decoded as a number is at or above 2^53. */
  | 'WIRE_U64_RANGE'
  /** A value handed to an encoder does not fit its field. */
  | 'WIRE_VALUE';

export type VfuErrorCode =
  /** The message (or its body) is shorter than the fixed part it must hold. */
  | 'VFU_SHORT'
  /** msg_size or the body length disagrees with what the fields say. */
  | 'VFU_BAD_SIZE'
  /** msg_size, a count or a size is above the negotiated or configured limit. */
  | 'VFU_TOO_BIG'
  /** Undefined, reserved or mutually exclusive flag bits. */
  | 'VFU_BAD_FLAGS'
  /** argsz is smaller than the fixed part it has to cover, or disagrees with the body. */
  | 'VFU_BAD_ARGSZ'
  /** A field the spec says must be zero is not. */
  | 'VFU_RESERVED'
  /** A field holds a value outside its closed enum or format (e.g. a page size not a power of two). */
  | 'VFU_BAD_VALUE'
  /** A count or stride is inconsistent with the data that follows. */
  | 'VFU_BAD_COUNT'
  /** offset + count (or address + size) wraps or passes 2^53. */
  | 'VFU_OVERFLOW'
  /** The command number is not a vfio-user command. */
  | 'VFU_BAD_COMMAND'
  /** A command removed from the protocol (VFIO_USER_DIRTY_PAGES, 14). */
  | 'VFU_OBSOLETE_COMMAND'
  /** VERSION data is not NUL-terminated UTF-8, or a version number is unacceptable. */
  | 'VFU_BAD_VERSION'
  /** The capabilities JSON is malformed or has a member of the wrong type. */
  | 'VFU_BAD_CAPS'
  /** A peer's capabilities are well formed but outside what we accept. */
  | 'VFU_INCOMPATIBLE_CAPS'
  /** A region capability chain is malformed (bad offset, loop, short cap). */
  | 'VFU_BAD_CAP';

export type ProtocolErrorCode = WireErrorCode | VfuErrorCode | (string & {});

/** Structured context of a ProtocolError; every member is optional. */
export interface ProtocolErrorDetails {
  /** Linux errno to answer with (default EINVAL, 22). */
  errno?: number;
  /** Command number of the message, when known. */
  command?: number;
  /** Message ID of the message, when known (so an error reply can be sent). */
  msgId?: number;
  /** Struct or field the error is about, in spec spelling. */
  field?: string;
  /** The offending value. */
  value?: number | bigint;
  /** The limit or expected value it was checked against. */
  limit?: number | bigint;
  /**
   * True when the byte stream can no longer be framed (msg_size itself is
   * unusable): the connection must be closed after any error reply.
   */
  desync?: boolean;
}

export class ProtocolError extends Error {
  readonly code: ProtocolErrorCode;
  /** Linux errno the peer should get in an error reply. */
  readonly errno: number;
  readonly command: number | undefined;
  readonly msgId: number | undefined;
  readonly field: string | undefined;
  readonly value: number | bigint | undefined;
  readonly limit: number | bigint | undefined;
  readonly desync: boolean;

  constructor(code: ProtocolErrorCode, message: string, details: ProtocolErrorDetails = {}) {
    super(message);
    this.name = 'ProtocolError';
    this.code = code;
    this.errno = details.errno ?? EINVAL;
    this.command = details.command;
    this.msgId = details.msgId;
    this.field = details.field;
    this.value = details.value;
    this.limit = details.limit;
    this.desync = details.desync ?? false;
  }

  /** A copy with message identity filled in (used when a body error surfaces at message level). */
  withMessage(command: number, msgId: number): ProtocolError {
    if (this.command === command && this.msgId === msgId) return this;
    const e = new ProtocolError(this.code, this.message, {
      errno: this.errno,
      command,
      msgId,
      field: this.field,
      value: this.value,
      limit: this.limit,
      desync: this.desync,
    });
    e.stack = this.stack;
    return e;
  }
}
