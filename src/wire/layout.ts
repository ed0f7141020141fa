/**
 * Declarative wire structs. A struct is declared once as a table of fields;
 * its size, decoder and encoder are derived from the table, so the offsets in
 * the table are the only place a layout is written down (and tests pin them to
 * the spec).
 *
 * All integers are little-endian: vfio-user and vhost-user use host byte
 * order and every platform we run on (x86-64, arm64) is little-endian.
 *
 * Each layout gets a generated decoder and encoder (see defineLayout): one
 * object literal per decode, no DataView, no per-field closures. Byte fields
 * decode as views into the input (zero copy); callers that keep them beyond
 * the life of the input buffer must copy.
 */
import { ProtocolError } from './errors.js';

/** Fixed-width integer types. `u64` decodes to a number and rejects values >= 2^53; `u64big` decodes to a bigint. */
export type ScalarType = 'u8' | 'u16' | 'u32' | 'i32' | 'u64' | 'u64big';

/** A fixed-length byte array. */
export interface BytesType<N extends number = number> {
  readonly bytes: N;
}

export type FieldType = ScalarType | BytesType;

/** A byte-array field type of length n. */
export function bytes<N extends number>(n: N): BytesType<N> {
  if (!Number.isInteger(n) || n < 0) throw new RangeError(`bytes(${n}): length must be a non-negative integer`);
  return { bytes: n };
}

/** One row of a layout table. `offset` defaults to the end of the previous field. */
export interface FieldSpec {
  readonly name: string;
  readonly type: FieldType;
  readonly offset?: number;
}

type ValueOfType<T> = T extends 'u64big' ? bigint : T extends BytesType ? Uint8Array : number;

/** The decoded object type of a field table. */
export type LayoutValue<F extends readonly FieldSpec[]> = {
  -readonly [K in F[number] as K['name']]: ValueOfType<K['type']>;
};

/** The value type of a layout: `ValueOfLayout<typeof DMA_MAP>`. */
export type ValueOfLayout<L> = L extends Layout<infer T> ? T : never;

/** A field after offsets are resolved. */
export interface ResolvedField {
  readonly name: string;
  readonly type: FieldType;
  readonly offset: number;
  readonly size: number;
}

export interface Layout<T> {
  readonly name: string;
  /** Size in bytes on the wire. */
  readonly size: number;
  readonly fields: readonly ResolvedField[];
  /** Offset of a field by name (throws for an unknown name: a programming error). */
  offsetOf(name: keyof T & string): number;
  /** Decodes `size` bytes at `offset`; throws ProtocolError WIRE_SHORT if the buffer is too short. */
  decode(buf: Uint8Array, offset?: number): T;
  /**
   * Encodes into `buf` at `offset` (a fresh zeroed buffer of `size` bytes when
   * omitted) and returns the buffer. Gaps between fields are left untouched,
   * so pass a zeroed buffer when the layout has gaps.
   */
  encode(value: T, buf?: Uint8Array, offset?: number): Uint8Array;
}

const enum Kind {
  U8,
  U16,
  U32,
  I32,
  U64,
  U64Big,
  Bytes,
}

const KIND: Record<ScalarType, Kind> = {
  u8: Kind.U8,
  u16: Kind.U16,
  u32: Kind.U32,
  i32: Kind.I32,
  u64: Kind.U64,
  u64big: Kind.U64Big,
};
const SCALAR_SIZE: Record<ScalarType, number> = { u8: 1, u16: 2, u32: 4, i32: 4, u64: 8, u64big: 8 };

const TWO_32 = 0x1_0000_0000;
/** Largest high word of a u64 that still decodes to a safe integer. */
const MAX_SAFE_HI = 0x1f_ffff;
const U64_MAX = 0xffff_ffff_ffff_ffffn;

/**
 * A plain Uint8Array view of b[start, end). Decoders return these for data
 * fields: the same type whatever the input (Buffer or not), and cheaper to
 * make than Buffer#subarray. Bounds are the caller's to check.
 */
export function view(b: Uint8Array, start: number, end: number = b.length): Uint8Array {
  return new Uint8Array(b.buffer, b.byteOffset + start, end - start);
}

export function readU16(b: Uint8Array, o: number): number {
  return b[o]! | (b[o + 1]! << 8);
}

export function readU32(b: Uint8Array, o: number): number {
  return (b[o]! | (b[o + 1]! << 8) | (b[o + 2]! << 16)) + b[o + 3]! * 0x100_0000;
}

export function readI32(b: Uint8Array, o: number): number {
  return b[o]! | (b[o + 1]! << 8) | (b[o + 2]! << 16) | (b[o + 3]! << 24);
}

/** A u64 as a number; throws WIRE_U64_RANGE at or above 2^53. `field` names it in the error. */
export function readU64(b: Uint8Array, o: number, field = 'u64'): number {
  const hi = readU32(b, o + 4);
  if (hi > MAX_SAFE_HI) {
    throw new ProtocolError('WIRE_U64_RANGE', `${field}: 64-bit value does not fit in 53 bits`, {
      field,
      value: readU64Big(b, o),
      limit: Number.MAX_SAFE_INTEGER,
    });
  }
  return hi * TWO_32 + readU32(b, o);
}

export function readU64Big(b: Uint8Array, o: number): bigint {
  return (BigInt(readU32(b, o + 4)) << 32n) | BigInt(readU32(b, o));
}

export function writeU16(b: Uint8Array, o: number, v: number): void {
  b[o] = v & 0xff;
  b[o + 1] = (v >>> 8) & 0xff;
}

export function writeU32(b: Uint8Array, o: number, v: number): void {
  b[o] = v & 0xff;
  b[o + 1] = (v >>> 8) & 0xff;
  b[o + 2] = (v >>> 16) & 0xff;
  b[o + 3] = (v >>> 24) & 0xff;
}

/** Writes a safe non-negative integer as u64 (unchecked: the caller has range-checked it). */
export function writeU64(b: Uint8Array, o: number, v: number): void {
  writeU32(b, o, v >>> 0);
  writeU32(b, o + 4, Math.floor(v / TWO_32));
}

export function writeU64Big(b: Uint8Array, o: number, v: bigint): void {
  writeU32(b, o, Number(v & 0xffff_ffffn));
  writeU32(b, o + 4, Number((v >> 32n) & 0xffff_ffffn));
}

function isUint(v: unknown, max: number): v is number {
  return typeof v === 'number' && Number.isInteger(v) && v >= 0 && v <= max;
}

const IDENTIFIER = /^[A-Za-z_$][A-Za-z0-9_$]*$/;

/** Helpers the generated accessors call; passed in, so the generated code closes over nothing else. */
const helpers = {
  view,
  readU64,
  readU64Big,
  writeU16,
  writeU32,
  writeU64,
  writeU64Big,
  isUint,
  badValue,
  short,
  U64_MAX,
};

/**
 * Builds a layout from its field table. Offsets given explicitly must not
 * overlap earlier fields; `options.size` pads the struct (and must cover all
 * fields).
 *
 * The decoder and encoder are generated once per layout as straight-line
 * code (an object literal of byte reads; one range check and write per
 * field), which V8 compiles to monomorphic code. The generated source is
 * built only from field names checked to be identifiers and integer offsets.
 */
export function defineLayout<const F extends readonly FieldSpec[]>(
  name: string,
  fields: F,
  options: { size?: number } = {},
): Layout<LayoutValue<F>> {
  const resolved: ResolvedField[] = [];
  let end = 0;
  for (const f of fields) {
    const size = typeof f.type === 'string' ? SCALAR_SIZE[f.type] : f.type.bytes;
    const offset = f.offset ?? end;
    if (!Number.isInteger(offset) || offset < end) {
      throw new RangeError(`layout ${name}: field ${f.name} at ${offset} overlaps the previous field (ends at ${end})`);
    }
    if (!IDENTIFIER.test(f.name)) throw new RangeError(`layout ${name}: field name ${f.name} is not an identifier`);
    if (resolved.some((r) => r.name === f.name)) throw new RangeError(`layout ${name}: duplicate field ${f.name}`);
    resolved.push(Object.freeze({ name: f.name, type: f.type, offset, size }));
    end = offset + size;
  }
  const size = options.size ?? end;
  if (size < end) throw new RangeError(`layout ${name}: size ${size} is smaller than its fields (${end})`);

  const decode = compileDecoder(name, size, resolved) as Layout<LayoutValue<F>>['decode'];
  const encode = compileEncoder(name, size, resolved) as Layout<LayoutValue<F>>['encode'];
  const offsetOf = (field: string): number => {
    const f = resolved.find((r) => r.name === field);
    if (!f) throw new RangeError(`layout ${name}: no field ${field}`);
    return f.offset;
  };
  return Object.freeze({ name, size, fields: Object.freeze(resolved), offsetOf, decode, encode });
}

function kindOf(t: FieldType): Kind {
  return typeof t === 'string' ? KIND[t] : Kind.Bytes;
}

/** Source of an expression reading field f at `o + f.offset` of `b`. */
function readExpr(layout: string, f: ResolvedField): string {
  const at = (k: number): string => `b[o + ${f.offset + k}]`;
  switch (kindOf(f.type)) {
    case Kind.U8:
      return at(0);
    case Kind.U16:
      return `(${at(0)} | (${at(1)} << 8))`;
    case Kind.U32:
      return `((${at(0)} | (${at(1)} << 8) | (${at(2)} << 16)) + ${at(3)} * 0x1000000)`;
    case Kind.I32:
      return `(${at(0)} | (${at(1)} << 8) | (${at(2)} << 16) | (${at(3)} << 24))`;
    case Kind.U64:
      return `h.readU64(b, o + ${f.offset}, ${JSON.stringify(`${layout}.${f.name}`)})`;
    case Kind.U64Big:
      return `h.readU64Big(b, o + ${f.offset})`;
    case Kind.Bytes:
      return `h.view(b, o + ${f.offset}, o + ${f.offset + f.size})`;
  }
}

type Decoder = (b: Uint8Array, o?: number) => unknown;
type Encoder = (v: unknown, b?: Uint8Array, o?: number) => Uint8Array;

function compileDecoder(layout: string, size: number, fields: readonly ResolvedField[]): Decoder {
  const props = fields.map((f) => `    ${f.name}: ${readExpr(layout, f)},`).join('\n');
  const src = `return function decode(b, o = 0) {
  if (o < 0 || b.length - o < ${size}) throw h.short(${JSON.stringify(layout)}, ${size}, b.length, o);
  return {
${props}
  };
};`;
  return new Function('h', src)(helpers) as Decoder;
}

/** Source of the statements checking and writing field f from `v` at `o + f.offset` of `b`. */
function writeStmt(layout: string, f: ResolvedField): string {
  const x = `v.${f.name}`;
  const at = `o + ${f.offset}`;
  const bad = (type: string): string =>
    `throw h.badValue(${JSON.stringify(layout)}, ${JSON.stringify(f.name)}, ${x}, ${JSON.stringify(type)});`;
  const check = (cond: string, type: string, write: string): string => `if (${cond}) ${bad(type)}\n  ${write};`;
  switch (kindOf(f.type)) {
    case Kind.U8:
      return check(`!h.isUint(${x}, 0xff)`, 'u8', `b[${at}] = ${x}`);
    case Kind.U16:
      return check(`!h.isUint(${x}, 0xffff)`, 'u16', `h.writeU16(b, ${at}, ${x})`);
    case Kind.U32:
      return check(`!h.isUint(${x}, 0xffffffff)`, 'u32', `h.writeU32(b, ${at}, ${x})`);
    case Kind.I32: {
      const cond = `typeof ${x} !== 'number' || !Number.isInteger(${x}) || ${x} < -0x80000000 || ${x} > 0x7fffffff`;
      return check(cond, 'i32', `h.writeU32(b, ${at}, ${x} >>> 0)`);
    }
    case Kind.U64:
      return check(`!h.isUint(${x}, ${Number.MAX_SAFE_INTEGER})`, 'u64 (safe integer)', `h.writeU64(b, ${at}, ${x})`);
    case Kind.U64Big:
      return check(
        `typeof ${x} !== 'bigint' || ${x} < 0n || ${x} > h.U64_MAX`,
        'u64 bigint',
        `h.writeU64Big(b, ${at}, ${x})`,
      );
    case Kind.Bytes:
      return check(
        `!(${x} instanceof Uint8Array) || ${x}.length > ${f.size}`,
        `bytes(${f.size})`,
        `b.set(${x}, ${at});\n  b.fill(0, ${at} + ${x}.length, ${at} + ${f.size})`,
      );
  }
}

function compileEncoder(layout: string, size: number, fields: readonly ResolvedField[]): Encoder {
  const body = fields.map((f) => `  ${writeStmt(layout, f)}`).join('\n');
  const src = `return function encode(v, b = Buffer.alloc(${size}), o = 0) {
  if (o < 0 || b.length - o < ${size}) throw h.short(${JSON.stringify(layout)}, ${size}, b.length, o);
${body}
  return b;
};`;
  return new Function('h', 'Buffer', src)(helpers, Buffer) as Encoder;
}

function short(layout: string, size: number, length: number, offset: number): ProtocolError {
  return new ProtocolError('WIRE_SHORT', `${layout}: need ${size} bytes at ${offset}, have ${length - offset}`, {
    field: layout,
    value: Math.max(0, length - offset),
    limit: size,
  });
}

function badValue(layout: string, field: string, x: unknown, type: string): ProtocolError {
  const shown = typeof x === 'bigint' ? `${x}n` : x instanceof Uint8Array ? `${x.length} bytes` : String(x);
  return new ProtocolError('WIRE_VALUE', `${layout}.${field}: ${shown} is not a valid ${type}`, {
    field: `${layout}.${field}`,
    value: typeof x === 'number' || typeof x === 'bigint' ? x : undefined,
  });
}
