/**
 * Message-based DMA in chunks: a transfer of many DMA_READ or DMA_WRITE
 * requests to the client, several in flight, as one object.
 *
 * Each chunk is one message of at most the negotiated transfer size. The
 * transfer keeps a window of requests in flight and refills it by halves from
 * inside the reply handler (Connection.requestRaw / ReplySink), so the
 * requests of one refill leave together with the other writes of that read,
 * and nothing per message is a promise or a decoded message object: a 64 KiB
 * chunk costs the two kernel copies and little else (docs/benchmarks.md).
 *
 * The client serves requests in order; the transfer does not rely on it for
 * correctness (every reply is matched by id and checked against its chunk).
 * After the first failure no chunk starts; the ones in flight are awaited
 * (so nothing lands in the destination after the promise settles), then the
 * failure is thrown.
 */
import { Command, HEADER_SIZE } from './constants.js';
import { ConnectionError, PLACE_PREFIX, type Connection, type ReplySink } from './connection.js';
import { Errno } from './errno.js';

/** Bytes of DMA messages a transfer keeps in flight. */
export const DMA_WINDOW_BYTES = 2 << 20;
/** At most this many DMA requests in flight per transfer. */
export const DMA_WINDOW_MAX = 32;

/** DMA_WRITE reply bodies accepted: QEMU's none, the spec table's u64 + u32, libvfio-user's u64 + u64. */
const DMA_WRITE_REPLY_SIZES = [0, 12, 16];

export interface DmaChunk {
  address: number;
  /** DMA_READ: where the chunk's data goes (its length is the count). DMA_WRITE: the data. */
  bytes: Uint8Array;
}

/**
 * Runs the chunks on `conn`. `beforeSend` runs before each request is sent
 * (a window unmapped meanwhile must not be touched again): if it throws, that
 * chunk fails. `shared` (DMA_WRITE): the chunks' data is memory the client
 * shared with us by fd, so it is spliced into the socket, not copied.
 */
export function runDmaTransfer(
  conn: Connection,
  command: Command.DMA_READ | Command.DMA_WRITE,
  chunks: readonly DmaChunk[],
  chunkSize: number,
  beforeSend?: (index: number) => void,
  shared = false,
): Promise<void> {
  if (chunks.length === 0) return Promise.resolve();
  return new Promise((resolve, reject) => new DmaTransfer(conn, command, chunks, chunkSize, beforeSend, shared, resolve, reject).start());
}

class DmaTransfer implements ReplySink {
  readonly #conn: Connection;
  readonly #command: Command.DMA_READ | Command.DMA_WRITE;
  readonly #chunks: readonly DmaChunk[];
  /** Each chunk's count as sent (its bytes may be a view of memory that goes away meanwhile). */
  readonly #counts: number[] = [];
  readonly #window: number;
  readonly #beforeSend: ((index: number) => void) | undefined;
  readonly #shared: boolean;
  readonly #resolve: () => void;
  readonly #reject: (err: unknown) => void;
  #next = 0;
  #inFlight = 0;
  #failure: unknown = undefined;
  #failed = false;
  #settled = false;

  constructor(
    conn: Connection,
    command: Command.DMA_READ | Command.DMA_WRITE,
    chunks: readonly DmaChunk[],
    chunkSize: number,
    beforeSend: ((index: number) => void) | undefined,
    shared: boolean,
    resolve: () => void,
    reject: (err: unknown) => void,
  ) {
    this.#conn = conn;
    this.#command = command;
    this.#chunks = chunks;
    this.#window = Math.max(2, Math.min(DMA_WINDOW_MAX, Math.floor(DMA_WINDOW_BYTES / Math.max(1, chunkSize))));
    this.#beforeSend = beforeSend;
    this.#shared = shared;
    this.#resolve = resolve;
    this.#reject = reject;
  }

  start(): void {
    this.#fill();
    this.#settleIfDone();
  }

  /** Sends requests until the window is full; the ones sent here leave in one sendmsg. */
  #fill(): void {
    if (this.#failed || this.#next >= this.#chunks.length) return;
    this.#conn.batch(() => {
      while (!this.#failed && this.#next < this.#chunks.length && this.#inFlight < this.#window) this.#send(this.#next++);
    });
  }

  #send(index: number): void {
    const chunk = this.#chunks[index]!;
    const count = chunk.bytes.length;
    const read = this.#command === Command.DMA_READ;
    try {
      this.#beforeSend?.(index);
    } catch (err) {
      this.#fail(err);
      return;
    }
    // Header (the id is filled in by requestRaw), then struct vfio_user_dma_region_access.
    // Off-heap (Buffer's pool): an on-heap Uint8Array would be copied out when sendmsg asks for its memory.
    this.#counts[index] = count;
    const head = Buffer.allocUnsafe(PLACE_PREFIX);
    head[2] = this.#command;
    head[3] = 0;
    putU32(head, 4, PLACE_PREFIX + (read ? 0 : count));
    putU32(head, 8, 0); // flags: a command
    putU32(head, 12, 0); // error: reserved in commands
    writeU64(head, HEADER_SIZE, chunk.address);
    writeU64(head, HEADER_SIZE + 8, count);
    this.#inFlight++;
    try {
      // A write that fails after this is reported through fail().
      this.#conn.requestRaw(this.#command, head, read ? null : chunk.bytes, read ? chunk.bytes : undefined, this, index, this.#shared);
    } catch (err) {
      this.#inFlight--; // the connection was closed: nothing was sent
      this.#fail(err);
    }
  }

  reply(frame: Uint8Array, placed: Uint8Array | undefined, index: number): void {
    this.#inFlight--;
    let why: string | undefined;
    try {
      why =
        this.#command === Command.DMA_READ
          ? checkReadReply(frame, placed, this.#chunks[index]!, this.#counts[index]!)
          : checkWriteReply(frame, placed);
    } catch (err) {
      why = (err as Error).message; // never out of here: this runs inside the socket's read handler
    }
    if (why !== undefined) this.#fail(new ConnectionError('VFU_BAD_REPLY', `${Command[this.#command]} reply: ${why}`, Errno.EIO));
    else if (this.#inFlight <= this.#window >> 1) this.#fill(); // refill by halves: the next requests leave together
    this.#settleIfDone();
  }

  fail(err: Error, _index: number): void {
    this.#inFlight--;
    this.#fail(err);
    this.#settleIfDone();
  }

  #fail(err: unknown): void {
    if (this.#failed) return;
    this.#failed = true;
    this.#failure = err;
  }

  #settleIfDone(): void {
    if (this.#settled || this.#inFlight > 0) return;
    if (!this.#failed && this.#next < this.#chunks.length) return;
    this.#settled = true;
    if (this.#failed) this.#reject(this.#failure);
    else this.#resolve();
  }
}

/**
 * Checks a DMA_READ reply against its chunk (`count` as requested); copies its
 * data if it was not received in place.
 */
function checkReadReply(frame: Uint8Array, placed: Uint8Array | undefined, chunk: DmaChunk, count: number): string | undefined {
  if (frame.length < PLACE_PREFIX) return `${frame.length} bytes, less than header and address/count`;
  if (readU64(frame, HEADER_SIZE) !== chunk.address || readU64(frame, HEADER_SIZE + 8) !== count) {
    return 'address or count differs from the request';
  }
  if (placed !== undefined) {
    // Received in place: its length was checked against msg_size; a lost placement is empty.
    if (placed !== chunk.bytes || placed.length !== count) return 'data not received';
    return undefined;
  }
  if (frame.length !== PLACE_PREFIX + count) return `${frame.length - PLACE_PREFIX} data bytes for a count of ${count}`;
  // The destination may be a view of a window unmapped meanwhile (detached: length 0).
  if (chunk.bytes.length !== count) return 'the destination went away during the transfer';
  chunk.bytes.set(frame.subarray(PLACE_PREFIX)); // a small reply arrives whole, not placed
  return undefined;
}

function checkWriteReply(frame: Uint8Array, placed: Uint8Array | undefined): string | undefined {
  if (placed !== undefined) return 'a payload where none was expected';
  const body = frame.length - HEADER_SIZE;
  if (!DMA_WRITE_REPLY_SIZES.includes(body)) return `a body of ${body} bytes`;
  // The codec's rule for u64 fields: below 2^53 (the address, and a 16-byte body's count).
  if (body >= 12 && readU64(frame, HEADER_SIZE) < 0) return 'address out of range';
  if (body === 16 && readU64(frame, HEADER_SIZE + 8) < 0) return 'count out of range';
  return undefined;
}

/** A little-endian u64 as a Number, or -1 if it is not a safe integer (never equal to a valid address or count). */
export function readU64(b: Uint8Array, at: number): number {
  const lo = (b[at]! | (b[at + 1]! << 8) | (b[at + 2]! << 16) | (b[at + 3]! << 24)) >>> 0;
  const hi = (b[at + 4]! | (b[at + 5]! << 8) | (b[at + 6]! << 16) | (b[at + 7]! << 24)) >>> 0;
  return hi > 0x1fffff ? -1 : hi * 2 ** 32 + lo;
}

/** Writes a safe non-negative integer as a little-endian u64. */
export function writeU64(b: Uint8Array, at: number, v: number): void {
  putU32(b, at, v % 2 ** 32);
  putU32(b, at + 4, Math.floor(v / 2 ** 32));
}

/** Writes a u32, little-endian (plain stores: no argument checks on the hot path). */
export function putU32(b: Uint8Array, at: number, v: number): void {
  b[at] = v & 0xff;
  b[at + 1] = (v >>> 8) & 0xff;
  b[at + 2] = (v >>> 16) & 0xff;
  b[at + 3] = (v >>> 24) & 0xff;
}
