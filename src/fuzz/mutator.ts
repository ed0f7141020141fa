/**
 * The structure-aware mutator. A target describes valid messages of each
 * type as seeds: the bytes, where the numeric fields are (so mutations hit
 * sizes, counts, indexes and flags rather than only random bytes), where the
 * frame's size field is (so a changed body keeps or deliberately breaks the
 * framing), and the fds that travel with it. An input is a few messages on
 * one connection, written in chunks cut at random points (message boundary
 * splits), sometimes truncated, sometimes plain random bytes.
 */
import type { Rng } from './rng.js';

/** Kinds of fd a message can carry (the harness holds one of each). */
export const FD_KINDS = ['memfd', 'eventfd', 'socket', 'devnull', 'dir'] as const;
export type FdKind = (typeof FD_KINDS)[number];

export interface Field {
  off: number;
  size: 1 | 2 | 4 | 8;
}

/** Where a frame says how long it is. */
export interface Framing {
  /** Offset of the u32 size field. */
  sizeOff: number;
  headerSize: number;
  /** The size counts the header too (vfio-user) or only the payload (vhost-user). */
  includesHeader: boolean;
}

/** A valid message to mutate. */
export interface Seed {
  name: string;
  bytes: Uint8Array;
  fields: Field[];
  fds: FdKind[];
}

/** One message as sent. */
export interface WireMessage {
  bytes: Uint8Array;
  fds: FdKind[];
}

/** One fuzz input: what the mutated peer sends on one connection, and target-specific knobs. */
export interface FuzzInput {
  msgs: WireMessage[];
  /** Stream offsets where a write ends (the rest goes in later writes). */
  cuts: number[];
  /** Target-specific small integers (which operations to run, ring sizes, ...). */
  extra: number[];
}

const INTERESTING_32 = [0, 1, 2, 3, 4, 7, 8, 12, 15, 16, 17, 24, 31, 32, 40, 63, 64, 0x7f, 0x80, 0xff, 0x100, 0x3ff, 0x400, 0xfff, 0x1000, 0x1001, 0x7fff, 0x8000, 0xffff, 0x10000, 0x100000, 0x7fffffff, 0x80000000, 0xfffffff0, 0xfffffffe, 0xffffffff];
const INTERESTING_64 = [2 ** 32, 2 ** 32 + 1, 2 ** 40, 2 ** 47, 2 ** 52, 2 ** 53 - 1, 2 ** 53, 2 ** 63, 2 ** 64 - 4096, 2 ** 64 - 1];

function writeField(b: Uint8Array, f: Field, v: number | bigint): void {
  const dv = new DataView(b.buffer, b.byteOffset, b.length);
  if (f.off + f.size > b.length) return;
  const big = BigInt.asUintN(64, typeof v === 'bigint' ? v : BigInt(Math.floor(v)));
  if (f.size === 1) dv.setUint8(f.off, Number(big & 0xffn));
  else if (f.size === 2) dv.setUint16(f.off, Number(big & 0xffffn), true);
  else if (f.size === 4) dv.setUint32(f.off, Number(big & 0xffffffffn), true);
  else dv.setBigUint64(f.off, big, true);
}

function readField(b: Uint8Array, f: Field): bigint {
  if (f.off + f.size > b.length) return 0n;
  const dv = new DataView(b.buffer, b.byteOffset, b.length);
  if (f.size === 1) return BigInt(dv.getUint8(f.off));
  if (f.size === 2) return BigInt(dv.getUint16(f.off, true));
  if (f.size === 4) return BigInt(dv.getUint32(f.off, true));
  return dv.getBigUint64(f.off, true);
}

function interesting(rng: Rng, f: Field, len: number): number | bigint {
  const roll = rng.int(10);
  if (roll === 0) return len + rng.range(-16, 16);
  if (roll === 1 && f.size === 8) return BigInt(rng.pick(INTERESTING_64));
  if (roll === 2) return rng.u32();
  return rng.pick(INTERESTING_32);
}

/** Sets the frame's size field to what the bytes hold. */
export function fixFrame(b: Uint8Array, framing: Framing): void {
  if (b.length < framing.sizeOff + 4) return;
  const size = framing.includesHeader ? b.length : Math.max(0, b.length - framing.headerSize);
  new DataView(b.buffer, b.byteOffset, b.length).setUint32(framing.sizeOff, size, true);
}

/** One mutated message from `seed` (`pool`: other seeds to splice with). */
export function mutate(rng: Rng, seed: Seed, pool: readonly Seed[], framing: Framing | null): WireMessage {
  let b: Uint8Array = Uint8Array.from(seed.bytes);
  let fds = [...seed.fds];
  let reframe = false;
  const n = 1 + rng.int(rng.chance(0.2) ? 8 : 3);
  for (let k = 0; k < n; k++) {
    const fields = seed.fields.filter((f) => f.off + f.size <= b.length);
    switch (rng.int(12)) {
      case 0:
      case 1:
      case 2:
        if (fields.length) writeField(b, rng.pick(fields), interesting(rng, rng.pick(fields), b.length));
        break;
      case 3:
        if (fields.length) {
          const f = rng.pick(fields);
          writeField(b, f, readField(b, f) + BigInt(rng.range(-8, 8)));
        }
        break;
      case 4:
        if (b.length) b[rng.int(b.length)] = rng.u32() & 0xff;
        break;
      case 5:
        if (b.length) b[rng.int(b.length)]! ^= 1 << rng.int(8);
        break;
      case 6: {
        // Truncate (the header's size then says more than there is, unless refixed).
        b = b.subarray(0, rng.int(b.length + 1));
        reframe = rng.chance(0.7);
        break;
      }
      case 7: {
        // Extend: zeros, random bytes, or a copy of a piece of the message.
        const add = rng.chance(0.8) ? rng.int(64) : rng.int(8192);
        const ext = rng.chance(0.4) ? new Uint8Array(add) : rng.chance(0.5) ? rng.bytes(add) : repeat(b, add, rng);
        b = concat([b, ext]);
        reframe = rng.chance(0.7);
        break;
      }
      case 8: {
        // Splice: our head with another message's tail.
        const other = rng.pick(pool);
        const cut = rng.int(b.length + 1);
        b = concat([b.subarray(0, cut), other.bytes.subarray(Math.min(cut, other.bytes.length))]);
        reframe = rng.chance(0.5);
        if (rng.chance(0.5)) fds = [...other.fds];
        break;
      }
      case 9: {
        // fds: add, drop, change the kind.
        const r = rng.int(4);
        if (r === 0 || fds.length === 0) for (let i = rng.range(1, rng.chance(0.1) ? 40 : 3); i > 0; i--) fds.push(rng.pick(FD_KINDS));
        else if (r === 1) fds.splice(rng.int(fds.length), 1);
        else if (r === 2) fds[rng.int(fds.length)] = rng.pick(FD_KINDS);
        else fds = [];
        break;
      }
      case 10:
        if (framing && b.length >= framing.sizeOff + 4) writeField(b, { off: framing.sizeOff, size: 4 }, interesting(rng, { off: 0, size: 4 }, b.length));
        break;
      default:
        if (b.length) {
          // A run of random bytes.
          const at = rng.int(b.length);
          b.set(rng.bytes(Math.min(b.length - at, 1 + rng.int(16))), at);
        }
    }
  }
  if (framing && reframe) fixFrame(b, framing);
  return { bytes: b, fds };
}

function repeat(b: Uint8Array, n: number, rng: Rng): Uint8Array {
  const out = new Uint8Array(n);
  if (b.length === 0) return out;
  const start = rng.int(b.length);
  for (let i = 0; i < n; i++) out[i] = b[(start + i) % b.length]!;
  return out;
}

export function concat(parts: readonly Uint8Array[]): Uint8Array {
  let n = 0;
  for (const p of parts) n += p.length;
  const out = new Uint8Array(n);
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

export interface GenerateOptions {
  /** Valid messages that open a connection (VERSION, a handshake): sent first, rarely mutated. */
  prefix?: (rng: Rng) => Seed[];
  seeds: (rng: Rng) => Seed[];
  framing: Framing;
  maxMsgs?: number;
  extra?: (rng: Rng) => number[];
}

/** One input: a prefix, then valid and mutated messages, cut into writes, sometimes truncated or random. */
export function generate(rng: Rng, o: GenerateOptions): FuzzInput {
  const msgs: WireMessage[] = [];
  const pool = o.seeds(rng);
  if (o.prefix && !rng.chance(0.05)) {
    for (const s of o.prefix(rng)) msgs.push(rng.chance(0.05) ? mutate(rng, s, pool, o.framing) : { bytes: s.bytes, fds: s.fds });
  }
  const count = 1 + rng.int(o.maxMsgs ?? 6);
  for (let i = 0; i < count; i++) {
    const roll = rng.next();
    if (roll < 0.05) msgs.push({ bytes: rng.bytes(rng.int(128)), fds: rng.chance(0.2) ? [rng.pick(FD_KINDS)] : [] });
    else {
      const s = rng.pick(pool);
      msgs.push(roll < 0.25 ? { bytes: s.bytes, fds: s.fds } : mutate(rng, s, pool, o.framing));
    }
  }
  let total = 0;
  for (const m of msgs) total += m.bytes.length;
  const cuts: number[] = [];
  if (rng.chance(0.3)) for (let i = rng.range(1, 4); i > 0; i--) cuts.push(rng.int(total + 1));
  cuts.sort((a, b) => a - b);
  if (rng.chance(0.05) && msgs.length) {
    // Truncation: the peer stops mid-message.
    const last = msgs[msgs.length - 1]!;
    last.bytes = last.bytes.subarray(0, rng.int(last.bytes.length + 1));
  }
  return { msgs, cuts, extra: o.extra ? o.extra(rng) : [] };
}

/**
 * Whether `msgs` frame exactly (every size field consistent and the stream
 * ends at a message boundary): only then must a message sent after them be
 * read as a message. Also false when a size is below the header or above `max`.
 */
export function framesExactly(msgs: readonly WireMessage[], framing: Framing, max: number): boolean {
  const stream = concat(msgs.map((m) => m.bytes));
  const dv = new DataView(stream.buffer, stream.byteOffset, stream.length);
  let at = 0;
  while (at < stream.length) {
    if (stream.length - at < framing.headerSize) return false;
    const size = dv.getUint32(at + framing.sizeOff, true);
    const whole = framing.includesHeader ? size : size + framing.headerSize;
    if (whole < framing.headerSize || whole > max) return false;
    at += whole;
  }
  return at === stream.length;
}

/** A seed builder: little-endian fields appended in order, their offsets remembered. */
export class SeedBuilder {
  readonly #parts: number[] = [];
  readonly fields: Field[] = [];
  u8(v: number, field = true): this {
    return this.#put(1, BigInt(v), field);
  }
  u16(v: number, field = true): this {
    return this.#put(2, BigInt(v), field);
  }
  u32(v: number, field = true): this {
    return this.#put(4, BigInt(v >>> 0), field);
  }
  u64(v: number | bigint, field = true): this {
    return this.#put(8, BigInt(v), field);
  }
  raw(b: Uint8Array): this {
    for (const x of b) this.#parts.push(x);
    return this;
  }
  get length(): number {
    return this.#parts.length;
  }
  #put(size: 1 | 2 | 4 | 8, v: bigint, field: boolean): this {
    if (field) this.fields.push({ off: this.#parts.length, size });
    for (let i = 0; i < size; i++) this.#parts.push(Number((v >> BigInt(8 * i)) & 0xffn));
    return this;
  }
  build(name: string, fds: FdKind[] = []): Seed {
    return { name, bytes: Uint8Array.from(this.#parts), fields: this.fields, fds };
  }
}

/** JSON form of an input (bytes as hex). */
export function inputToJson(i: FuzzInput): unknown {
  return { msgs: i.msgs.map((m) => ({ hex: Buffer.from(m.bytes).toString('hex'), fds: m.fds })), cuts: i.cuts, extra: i.extra };
}

export function inputFromJson(j: unknown): FuzzInput {
  const o = j as { msgs: { hex: string; fds: FdKind[] }[]; cuts: number[]; extra: number[] };
  return { msgs: o.msgs.map((m) => ({ bytes: Uint8Array.from(Buffer.from(m.hex, 'hex')), fds: m.fds })), cuts: o.cuts, extra: o.extra };
}
