/**
 * The vfio-user codec: pure functions from bytes to typed messages and back.
 * No sockets, no ids, no state. One body codec per command and direction,
 * in two tables (requests, replies); the command families live in
 * messages-*.ts.
 *
 * Decoding checks syntax only (sizes against msg_size, argsz, reserved bits,
 * counts, overflow, the caller's limits) before anything is allocated for
 * the payload; data fields are views into the input. Every failure is a
 * ProtocolError carrying the errno to reply with and, once the header is
 * known, the message's id and command.
 */
import { ProtocolError } from '../wire/errors.js';
import type { ValueOfLayout } from '../wire/layout.js';
import { view } from '../wire/layout.js';
import { Command, HEADER_FLAGS_DEFINED, HEADER_SIZE, HeaderFlags, isCommand, MessageType } from './constants.js';
import { HEADER } from './messages-layouts.js';
import type { BodyCodec, CodecLimits } from './messages-codec.js';
import { DEFAULT_LIMITS, emptyBody, encodeError } from './messages-codec.js';
import type { DmaAccess, DmaAccessData, DmaMap, DmaUnmap, DmaUnmapReply } from './messages-dma.js';
import {
  dmaAccessWithData,
  dmaMapRequest,
  dmaReadRequest,
  dmaUnmapReply,
  dmaUnmapRequest,
  dmaWriteReply,
} from './messages-dma.js';
import type { DeviceInfo, IrqInfo, RegionIoFdsHead, RegionIoFdsReply, SetIrqs, Version } from './messages-device.js';
import {
  deviceInfoReply,
  deviceInfoRequest,
  irqInfoReply,
  irqInfoRequest,
  regionIoFdsReply,
  regionIoFdsRequest,
  setIrqsRequest,
  versionBody,
} from './messages-device.js';
import type { RegionInfo, RegionInfoReply } from './messages-region-info.js';
import { regionInfoReply, regionInfoRequest } from './messages-region-info.js';
import type { RegionAccess, RegionAccessData, RegionWriteMulti, RegionWriteMultiReply } from './messages-region.js';
import {
  regionReadReply,
  regionReadRequest,
  regionWriteMultiReply,
  regionWriteMultiRequest,
  regionWriteReply,
  regionWriteRequest,
} from './messages-region.js';
import type { DeviceFeature, MigData, MigDataRead } from './messages-migration.js';
import {
  deviceFeatureReply,
  deviceFeatureRequest,
  migDataReadReply,
  migDataReadRequest,
  migDataWriteRequest,
} from './messages-migration.js';

export * from './messages-codec.js';
export * from './messages-dma.js';
export * from './messages-device.js';
export * from './messages-region-info.js';
export * from './messages-region.js';
export * from './messages-migration.js';
export * as layouts from './messages-layouts.js';

/** The 16-byte header: msg_id, cmd, msg_size (header included), flags, error_no. */
export type Header = ValueOfLayout<typeof HEADER>;

/** Commands with a codec: all but the obsolete DIRTY_PAGES, which is only ever rejected. */
export type CodecCommand = Exclude<Command, Command.DIRTY_PAGES>;

/** Request body type of each command (`undefined` where the request has no payload). */
export interface RequestBodies {
  [Command.VERSION]: Version;
  [Command.DMA_MAP]: DmaMap;
  [Command.DMA_UNMAP]: DmaUnmap;
  [Command.DEVICE_GET_INFO]: DeviceInfo;
  [Command.DEVICE_GET_REGION_INFO]: RegionInfo;
  [Command.DEVICE_GET_REGION_IO_FDS]: RegionIoFdsHead;
  [Command.DEVICE_GET_IRQ_INFO]: IrqInfo;
  [Command.DEVICE_SET_IRQS]: SetIrqs;
  [Command.REGION_READ]: RegionAccess;
  [Command.REGION_WRITE]: RegionAccessData;
  [Command.DMA_READ]: DmaAccess;
  [Command.DMA_WRITE]: DmaAccessData;
  [Command.DEVICE_RESET]: undefined;
  [Command.REGION_WRITE_MULTI]: RegionWriteMulti;
  [Command.DEVICE_FEATURE]: DeviceFeature;
  [Command.MIG_DATA_READ]: MigDataRead;
  [Command.MIG_DATA_WRITE]: MigData;
}

/** Reply body type of each command (`undefined` where the reply has no payload, null for header-only peers). */
export interface ReplyBodies {
  [Command.VERSION]: Version;
  [Command.DMA_MAP]: undefined;
  [Command.DMA_UNMAP]: DmaUnmapReply;
  [Command.DEVICE_GET_INFO]: DeviceInfo;
  [Command.DEVICE_GET_REGION_INFO]: RegionInfoReply;
  [Command.DEVICE_GET_REGION_IO_FDS]: RegionIoFdsReply;
  [Command.DEVICE_GET_IRQ_INFO]: IrqInfo;
  [Command.DEVICE_SET_IRQS]: undefined;
  [Command.REGION_READ]: RegionAccessData | null;
  [Command.REGION_WRITE]: RegionAccess;
  [Command.DMA_READ]: DmaAccessData;
  [Command.DMA_WRITE]: DmaAccess | null;
  [Command.DEVICE_RESET]: undefined;
  [Command.REGION_WRITE_MULTI]: RegionWriteMultiReply;
  [Command.DEVICE_FEATURE]: DeviceFeature;
  [Command.MIG_DATA_READ]: MigData;
  [Command.MIG_DATA_WRITE]: undefined;
}

/** Dispatch table: the request body codec of each command. */
export const requestCodecs: { readonly [C in CodecCommand]: BodyCodec<RequestBodies[C]> } = Object.freeze({
  [Command.VERSION]: versionBody,
  [Command.DMA_MAP]: dmaMapRequest,
  [Command.DMA_UNMAP]: dmaUnmapRequest,
  [Command.DEVICE_GET_INFO]: deviceInfoRequest,
  [Command.DEVICE_GET_REGION_INFO]: regionInfoRequest,
  [Command.DEVICE_GET_REGION_IO_FDS]: regionIoFdsRequest,
  [Command.DEVICE_GET_IRQ_INFO]: irqInfoRequest,
  [Command.DEVICE_SET_IRQS]: setIrqsRequest,
  [Command.REGION_READ]: regionReadRequest,
  [Command.REGION_WRITE]: regionWriteRequest,
  [Command.DMA_READ]: dmaReadRequest,
  [Command.DMA_WRITE]: dmaAccessWithData,
  [Command.DEVICE_RESET]: emptyBody,
  [Command.REGION_WRITE_MULTI]: regionWriteMultiRequest,
  [Command.DEVICE_FEATURE]: deviceFeatureRequest,
  [Command.MIG_DATA_READ]: migDataReadRequest,
  [Command.MIG_DATA_WRITE]: migDataWriteRequest,
});

/** Dispatch table: the reply body codec of each command. */
export const replyCodecs: { readonly [C in CodecCommand]: BodyCodec<ReplyBodies[C]> } = Object.freeze({
  [Command.VERSION]: versionBody,
  [Command.DMA_MAP]: emptyBody,
  [Command.DMA_UNMAP]: dmaUnmapReply,
  [Command.DEVICE_GET_INFO]: deviceInfoReply,
  [Command.DEVICE_GET_REGION_INFO]: regionInfoReply,
  [Command.DEVICE_GET_REGION_IO_FDS]: regionIoFdsReply,
  [Command.DEVICE_GET_IRQ_INFO]: irqInfoReply,
  [Command.DEVICE_SET_IRQS]: emptyBody,
  [Command.REGION_READ]: regionReadReply,
  [Command.REGION_WRITE]: regionWriteReply,
  [Command.DMA_READ]: dmaAccessWithData,
  [Command.DMA_WRITE]: dmaWriteReply,
  [Command.DEVICE_RESET]: emptyBody,
  [Command.REGION_WRITE_MULTI]: regionWriteMultiReply,
  [Command.DEVICE_FEATURE]: deviceFeatureReply,
  [Command.MIG_DATA_READ]: migDataReadReply,
  [Command.MIG_DATA_WRITE]: emptyBody,
});

export type RequestMessage = {
  [C in CodecCommand]: { kind: 'request'; header: Header; command: C; body: RequestBodies[C] };
}[CodecCommand];

export type ReplyMessage = {
  [C in CodecCommand]: { kind: 'reply'; header: Header; command: C; body: ReplyBodies[C] };
}[CodecCommand];

/** A reply with the Error bit. Any payload (libvfio-user sometimes sends one) is ignored. */
export interface ErrorReplyMessage {
  kind: 'error';
  header: Header;
  command: number;
  /** The peer's errno; may be 0 even though the command failed. */
  errno: number;
}

export type Message = RequestMessage | ReplyMessage | ErrorReplyMessage;

/** What an encoder returns: one buffer, or a head and a large payload to send gathered (no copy). */
export type Encoded = Uint8Array | [Uint8Array, Uint8Array];

/** Payloads of at least this many bytes are not copied into the message buffer. */
export const GATHER_THRESHOLD = 1024;

/**
 * Reads a header and checks what framing needs: msg_size must be at least 16
 * and within `limits.maxMsgSize` (errors with `desync`: the stream cannot be
 * trusted past this header). Flags are checked by decodeMessage, so a reader
 * can always skip a well-framed bad message and answer it.
 */
export function decodeHeader(buf: Uint8Array, offset = 0, limits?: Pick<CodecLimits, 'maxMsgSize'>): Header {
  if (buf.length - offset < HEADER_SIZE) {
    throw new ProtocolError('VFU_SHORT', `header: ${buf.length - offset} bytes, need ${HEADER_SIZE}`, {
      field: 'header',
      value: buf.length - offset,
      limit: HEADER_SIZE,
    });
  }
  const h = HEADER.decode(buf, offset);
  if (h.msgSize < HEADER_SIZE) {
    const why = `msg_size ${h.msgSize} is smaller than the header`;
    throw new ProtocolError('VFU_BAD_SIZE', why, msgSizeError(h, HEADER_SIZE));
  }
  if (limits && h.msgSize > limits.maxMsgSize) {
    const why = `msg_size ${h.msgSize} exceeds ${limits.maxMsgSize}`;
    throw new ProtocolError('VFU_TOO_BIG', why, msgSizeError(h, limits.maxMsgSize));
  }
  return h;
}

function msgSizeError(h: Header, limit: number) {
  return { command: h.cmd, msgId: h.msgId, field: 'header.msg_size', value: h.msgSize, limit, desync: true };
}

/**
 * Checks the header's flags: a defined type, no undefined bits, Error only in
 * replies, No_reply only in commands, and the Error field zero in commands
 * (it is reserved there).
 */
export function checkHeaderFlags(h: Header): void {
  const type = h.flags & HeaderFlags.TYPE_MASK;
  let why: string | undefined;
  if ((h.flags & ~HEADER_FLAGS_DEFINED) >>> 0 !== 0) why = 'undefined bits';
  else if (type !== MessageType.COMMAND && type !== MessageType.REPLY) why = `type ${type}`;
  else if (type === MessageType.COMMAND && h.flags & HeaderFlags.ERROR) why = 'Error set in a command';
  else if (type === MessageType.REPLY && h.flags & HeaderFlags.NO_REPLY) why = 'No_reply set in a reply';
  if (why) {
    throw new ProtocolError('VFU_BAD_FLAGS', `header flags 0x${h.flags.toString(16)}: ${why}`, {
      command: h.cmd,
      msgId: h.msgId,
      field: 'header.flags',
      value: h.flags,
    });
  }
  if (type === MessageType.COMMAND && h.errorNo !== 0) {
    throw new ProtocolError('VFU_RESERVED', `header error ${h.errorNo} in a command`, {
      command: h.cmd,
      msgId: h.msgId,
      field: 'header.error',
      value: h.errorNo,
      limit: 0,
    });
  }
}

function commandOf(cmd: number): CodecCommand {
  if (!isCommand(cmd)) {
    throw new ProtocolError('VFU_BAD_COMMAND', `unknown command ${cmd}`, { field: 'header.cmd', value: cmd });
  }
  if (cmd === Command.DIRTY_PAGES) {
    throw new ProtocolError('VFU_OBSOLETE_COMMAND', 'VFIO_USER_DIRTY_PAGES (14) was removed from the protocol', {
      field: 'header.cmd',
      value: cmd,
    });
  }
  return cmd;
}

/**
 * Decodes one whole message. `frame` starts with the header and holds at
 * least msg_size bytes (bytes after msg_size are ignored). Data fields in
 * the result are views into `frame`.
 */
/**
 * Decodes one message. `placed`: the frame's payload was received elsewhere
 * (FrameReader placement), and `frame` holds only the header and the fixed
 * part of the body; only commands whose body is fixed fields plus data
 * (DMA_READ replies, DMA_WRITE, REGION_READ replies, ...) can be placed.
 */
export function decodeMessage(frame: Uint8Array, limits: CodecLimits = DEFAULT_LIMITS, placed?: Uint8Array): Message {
  const header = decodeHeader(frame, 0, limits);
  try {
    if (placed) return decodePlacedMessage(header, frame, placed, limits);
    if (frame.length < header.msgSize) {
      throw new ProtocolError('VFU_SHORT', `frame: ${frame.length} bytes, msg_size ${header.msgSize}`, {
        field: 'header.msg_size',
        value: frame.length,
        limit: header.msgSize,
      });
    }
    checkHeaderFlags(header);
    const reply = (header.flags & HeaderFlags.TYPE_MASK) === MessageType.REPLY;
    if (reply && header.flags & HeaderFlags.ERROR) {
      return { kind: 'error', header, command: header.cmd, errno: header.errorNo };
    }
    const command = commandOf(header.cmd);
    const body = view(frame, HEADER_SIZE, header.msgSize);
    if (reply) {
      const codec = replyCodecs[command] as BodyCodec<unknown>;
      return { kind: 'reply', header, command, body: codec.decode(body, limits) } as ReplyMessage;
    }
    const codec = requestCodecs[command] as BodyCodec<unknown>;
    return { kind: 'request', header, command, body: codec.decode(body, limits) } as RequestMessage;
  } catch (e) {
    throw e instanceof ProtocolError ? e.withMessage(header.cmd, header.msgId) : e;
  }
}

/** Whether a message of this command and direction can be received placed (its body is fixed fields + data). */
export function canPlace(cmd: number, reply: boolean): boolean {
  if (!isCommand(cmd)) return false;
  const codec = (reply ? replyCodecs : requestCodecs)[cmd as CodecCommand] as BodyCodec<unknown> | undefined;
  return codec?.decodePlaced !== undefined;
}

function decodePlacedMessage(header: Header, frame: Uint8Array, placed: Uint8Array, limits: CodecLimits): Message {
  if (frame.length + placed.length !== header.msgSize) {
    throw new ProtocolError('VFU_SHORT', `frame: ${frame.length} + ${placed.length} placed bytes, msg_size ${header.msgSize}`, {
      field: 'header.msg_size',
      value: frame.length + placed.length,
      limit: header.msgSize,
    });
  }
  checkHeaderFlags(header);
  const reply = (header.flags & HeaderFlags.TYPE_MASK) === MessageType.REPLY;
  const command = commandOf(header.cmd);
  const codec = (reply ? replyCodecs[command] : requestCodecs[command]) as BodyCodec<unknown>;
  if (!codec.decodePlaced || (reply && header.flags & HeaderFlags.ERROR)) {
    throw new ProtocolError('VFU_BAD_COMMAND', `${Command[command]} ${reply ? 'reply' : 'request'} cannot be placed`);
  }
  const body = codec.decodePlaced(view(frame, HEADER_SIZE), placed, limits);
  return { kind: reply ? 'reply' : 'request', header, command, body } as Message;
}

/** Decodes a request body (the bytes after the header) of a known command. */
export function decodeRequestBody<C extends CodecCommand>(
  command: C,
  body: Uint8Array,
  limits: CodecLimits = DEFAULT_LIMITS,
): RequestBodies[C] {
  return (requestCodecs[command] as BodyCodec<RequestBodies[C]>).decode(body, limits);
}

/** Decodes a reply body (the bytes after the header) of a known command. */
export function decodeReplyBody<C extends CodecCommand>(
  command: C,
  body: Uint8Array,
  limits: CodecLimits = DEFAULT_LIMITS,
): ReplyBodies[C] {
  return (replyCodecs[command] as BodyCodec<ReplyBodies[C]>).decode(body, limits);
}

/** Writes a header (into a fresh 16-byte buffer when `buf` is omitted). */
export function encodeHeader(h: Header, buf?: Uint8Array, offset = 0): Uint8Array {
  return HEADER.encode(h, buf, offset);
}

function assemble<T>(codec: BodyCodec<T>, body: T, msgId: number, cmd: number, flags: number): Encoded {
  const head = codec.headSize(body);
  const tail = codec.tail(body);
  const tailLength = tail ? tail.length : 0;
  const msgSize = HEADER_SIZE + head + tailLength;
  if (msgSize > 0xffff_ffff) throw encodeError('header.msg_size', `${msgSize} does not fit in u32`);
  const gather = tail !== undefined && tailLength >= GATHER_THRESHOLD;
  // From Node's off-heap pool (a small Buffer.alloc lives on the V8 heap and must be moved for sendmsg); zeroed for padding.
  const buf = Buffer.allocUnsafe(gather ? HEADER_SIZE + head : msgSize).fill(0);
  HEADER.encode({ msgId, cmd, msgSize, flags, errorNo: 0 }, buf, 0);
  codec.write(body, buf, HEADER_SIZE);
  if (!tail) return buf;
  if (gather) return [buf, tail];
  buf.set(tail, HEADER_SIZE + head);
  return buf;
}

/** Encodes a command message. `flags` may only hold NO_REPLY. */
export function encodeRequest<C extends CodecCommand>(
  command: C,
  msgId: number,
  body: RequestBodies[C],
  flags: number = 0,
): Encoded {
  if ((flags & ~HeaderFlags.NO_REPLY) !== 0) throw encodeError('header.flags', 'a request may only set NO_REPLY');
  const codec = requestCodecs[command] as BodyCodec<RequestBodies[C]>;
  return assemble(codec, body, msgId, command, flags | MessageType.COMMAND);
}

/** Encodes a successful reply to message `msgId`. */
export function encodeReply<C extends CodecCommand>(command: C, msgId: number, body: ReplyBodies[C]): Encoded {
  return assemble(replyCodecs[command] as BodyCodec<ReplyBodies[C]>, body, msgId, command, MessageType.REPLY);
}

/** Encodes a header-only error reply (any command number, so unknown commands can be answered). */
export function encodeErrorReply(msgId: number, command: number, errno: number): Uint8Array {
  return HEADER.encode({
    msgId,
    cmd: command,
    msgSize: HEADER_SIZE,
    flags: MessageType.REPLY | HeaderFlags.ERROR,
    errorNo: errno,
  });
}
