import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  InfoCapChainBuilder,
  VfioError,
  checkSparseAreas,
  composeRegionInfoReply,
  decodeRegionInfo,
  parseInfoCapChain,
  parseRegionInfoReply,
} from '../src/vfio/index.js';

/** A tiny little-endian byte builder, independent of the encoder under test. */
class Bytes {
  readonly parts: number[] = [];
  u8(v: number): this {
    this.parts.push(v & 0xff);
    return this;
  }
  u16(v: number): this {
    return this.u8(v).u8(v >>> 8);
  }
  u32(v: number): this {
    return this.u16(v & 0xffff).u16(v >>> 16);
  }
  u64(v: number | bigint): this {
    const b = BigInt(v);
    return this.u32(Number(b & 0xffffffffn)).u32(Number(b >> 32n));
  }
  zeros(n: number): this {
    for (let i = 0; i < n; i++) this.u8(0);
    return this;
  }
  get length(): number {
    return this.parts.length;
  }
  done(): Uint8Array {
    return Uint8Array.from(this.parts);
  }
}

/** struct vfio_region_info by hand. */
function regionInfo(b: Bytes, f: { argsz: number; flags: number; index: number; capOffset: number; size: number; offset: number }): Bytes {
  return b.u32(f.argsz).u32(f.flags).u32(f.index).u32(f.capOffset).u64(f.size).u64(f.offset);
}

/** The chain of a sparse mmap cap (2 areas) then a TYPE cap, laid out after a 32-byte struct. */
function sparsePlusTypeChain(): Bytes {
  return new Bytes()
    .u16(1).u16(1).u32(80) // SPARSE_MMAP v1 at 32, next at 32 + 48
    .u32(2).u32(0)
    .u64(0x1000).u64(0x2000)
    .u64(0x4000).u64(0x10000)
    .u16(2).u16(1).u32(0) // TYPE v1 at 80, last
    .u32(0x8000_8086).u32(1);
}

function rejects(fn: () => unknown, code: string, errno = 22): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof VfioError, `expected VfioError, got ${String(err)}`);
    assert.equal(err.code, code);
    assert.equal(err.errno, errno);
    return true;
  });
}

test('builder: sparse mmap with 2 areas + type cap is byte-exact', () => {
  const chain = new InfoCapChainBuilder()
    .sparseMmap([
      { offset: 0x1000, size: 0x2000 },
      { offset: 0x4000, size: 0x10000 },
    ])
    .type(0x8000_8086, 1);
  assert.equal(chain.byteLength, 64);
  assert.deepEqual(chain.encode(), sparsePlusTypeChain().done());
});

test('builder: bodies are padded to 8 bytes and next offsets follow the base', () => {
  const chain = new InfoCapChainBuilder().add(0x99, 3, Uint8Array.of(0xaa, 0xbb, 0xcc)).msixMappable();
  const expected = new Bytes()
    .u16(0x99).u16(3).u32(16 + 16) // base 16: next cap at 16 + 16
    .u8(0xaa).u8(0xbb).u8(0xcc).zeros(5)
    .u16(3).u16(1).u32(0)
    .done();
  assert.deepEqual(chain.encode(16), expected);
  assert.throws(() => chain.encode(12), RangeError);
  assert.equal(new InfoCapChainBuilder().encode().length, 0);
});

test('reply: caps included when argsz holds them, with CAPS and cap_offset 32', () => {
  const chain = new InfoCapChainBuilder().sparseMmap([
    { offset: 0x1000, size: 0x2000 },
    { offset: 0x4000, size: 0x10000 },
  ]).type(0x8000_8086, 1);
  const r = composeRegionInfoReply(4096, { index: 0, flags: 0x7, size: 0x20000, offset: 0x1000 }, chain);
  const expected = regionInfo(new Bytes(), { argsz: 96, flags: 0xf, index: 0, capOffset: 32, size: 0x20000, offset: 0x1000 });
  expected.parts.push(...sparsePlusTypeChain().parts);
  assert.deepEqual(r.bytes, expected.done());
  assert.equal(r.argsz, 96);
  assert.equal(r.capsIncluded, true);
});

test('reply: caps that do not fit are left out; length is min(32 + caps, argsz); argsz is the full size', () => {
  const chain = new InfoCapChainBuilder().sparseMmap([{ offset: 0, size: 0x1000 }]);
  const small = composeRegionInfoReply(32, { index: 2, flags: 0x7 | 0x8, size: 0x1000, offset: 0 }, chain);
  assert.deepEqual(small.bytes, regionInfo(new Bytes(), { argsz: 64, flags: 0x7, index: 2, capOffset: 0, size: 0x1000, offset: 0 }).done());
  assert.equal(small.capsIncluded, false);

  const between = composeRegionInfoReply(40, { index: 2, flags: 0x7, size: 0x1000, offset: 0 }, chain);
  assert.equal(between.bytes.length, 40);
  assert.deepEqual(between.bytes.subarray(32), new Uint8Array(8));
  assert.equal(decodeRegionInfo(between.bytes).flags, 0x7);

  const none = composeRegionInfoReply(1024, { index: 7, flags: 0x3, size: 256, offset: 0 });
  assert.deepEqual(none.bytes, regionInfo(new Bytes(), { argsz: 32, flags: 0x3, index: 7, capOffset: 0, size: 256, offset: 0 }).done());

  rejects(() => composeRegionInfoReply(16, { index: 0, flags: 0, size: 0, offset: 0 }), 'REGION_INFO_ARGSZ');
});

test('parser: reads a hand-built chain into typed caps', () => {
  const buf = regionInfo(new Bytes(), { argsz: 96, flags: 0xf, index: 0, capOffset: 32, size: 0x20000, offset: 0 });
  buf.parts.push(...sparsePlusTypeChain().parts);
  const caps = parseInfoCapChain(buf.done(), 32);
  assert.deepEqual(caps, [
    {
      kind: 'sparse-mmap',
      id: 1,
      version: 1,
      offset: 32,
      areas: [
        { offset: 0x1000, size: 0x2000 },
        { offset: 0x4000, size: 0x10000 },
      ],
    },
    { kind: 'type', id: 2, version: 1, offset: 80, type: 0x8000_8086, subtype: 1 },
  ]);
  const reply = parseRegionInfoReply(buf.done());
  assert.equal(reply.complete, true);
  assert.equal(reply.caps.length, 2);
  assert.equal(reply.info.size, 0x20000);
});

test('parser: unknown caps and other versions are kept raw; cap_offset 0 is no chain', () => {
  const buf = new Bytes()
    .zeros(32)
    .u16(0x77).u16(1).u32(48).u32(0xdeadbeef).u32(1) // unknown id, body up to next
    .u16(1).u16(2).u32(0).u32(5); // SPARSE_MMAP version 2: not decoded
  const caps = parseInfoCapChain(buf.done(), 32);
  assert.equal(caps.length, 2);
  assert.deepEqual(caps[0], { kind: 'raw', id: 0x77, version: 1, offset: 32, body: new Bytes().u32(0xdeadbeef).u32(1).done() });
  assert.deepEqual(caps[1], { kind: 'raw', id: 1, version: 2, offset: 48, body: new Bytes().u32(5).done() });
  assert.deepEqual(parseInfoCapChain(buf.done(), 0), []);
});

test('parser: rejects a chain that loops', () => {
  const self = new Bytes().zeros(32).u16(3).u16(1).u32(32).done();
  rejects(() => parseInfoCapChain(self, 32), 'CAP_CHAIN_LOOP');
  const back = new Bytes().zeros(32).u16(3).u16(1).u32(40).u16(3).u16(1).u32(32).done();
  rejects(() => parseInfoCapChain(back, 32), 'CAP_CHAIN_LOOP');
  const intoHeader = new Bytes().zeros(32).u16(3).u16(1).u32(36).zeros(8).done();
  rejects(() => parseInfoCapChain(intoHeader, 32), 'CAP_CHAIN_LOOP');
});

test('parser: rejects offsets outside the buffer or inside the fixed struct', () => {
  const b = new Bytes().zeros(32).u16(3).u16(1).u32(4096).done();
  rejects(() => parseInfoCapChain(b, 32), 'CAP_OUT_OF_BOUNDS');
  rejects(() => parseInfoCapChain(b, 36), 'CAP_OUT_OF_BOUNDS');
  rejects(() => parseInfoCapChain(b, 8), 'CAP_OFFSET_INVALID');
  const lastByte = new Bytes().zeros(32).u16(3).u16(1).u32(0).zeros(4).done();
  rejects(() => parseInfoCapChain(lastByte, 37), 'CAP_OUT_OF_BOUNDS');
});

test('parser: rejects caps whose body is truncated or runs into the next cap', () => {
  const twoOfThree = new Bytes().zeros(32).u16(1).u16(1).u32(0).u32(3).u32(0).u64(0).u64(0x1000).u64(0x1000).u64(0x1000).done();
  rejects(() => parseInfoCapChain(twoOfThree, 32), 'CAP_TRUNCATED');
  const huge = new Bytes().zeros(32).u16(1).u16(1).u32(0).u32(0xffff_ffff).u32(0).done();
  rejects(() => parseInfoCapChain(huge, 32), 'CAP_TRUNCATED');
  const shortType = new Bytes().zeros(32).u16(2).u16(1).u32(0).u32(1).done();
  rejects(() => parseInfoCapChain(shortType, 32), 'CAP_TRUNCATED');
  const noFixed = new Bytes().zeros(32).u16(1).u16(1).u32(0).u32(0).done();
  rejects(() => parseInfoCapChain(noFixed, 32), 'CAP_TRUNCATED');
  const overlap = new Bytes()
    .zeros(32)
    .u16(1).u16(1).u32(48).u32(1).u32(0) // one area needs 16 more bytes, next cap at 48
    .u16(3).u16(1).u32(0).zeros(8)
    .done();
  rejects(() => parseInfoCapChain(overlap, 32), 'CAP_OVERLAP');
});

test('parser: bounds the chain length and rejects 64-bit values past 2^53', () => {
  const b = new Bytes().zeros(32);
  for (let i = 0; i < 5; i++) b.u16(3).u16(1).u32(i === 4 ? 0 : 32 + 8 * (i + 1));
  assert.equal(parseInfoCapChain(b.done(), 32).length, 5);
  rejects(() => parseInfoCapChain(b.done(), 32, { maxCaps: 4 }), 'CAP_CHAIN_TOO_LONG');
  const big = new Bytes().zeros(32).u16(1).u16(1).u32(0).u32(1).u32(0).u64(0).u64(2n ** 60n).done();
  rejects(() => parseInfoCapChain(big, 32), 'VALUE_TOO_LARGE', 75);
});

test('reply parser: CAPS without room, cap_offset past argsz, sparse areas outside the region', () => {
  const truncated = regionInfo(new Bytes(), { argsz: 80, flags: 0x7, index: 0, capOffset: 0, size: 0x1000, offset: 0 }).done();
  const r = parseRegionInfoReply(truncated);
  assert.equal(r.complete, false);
  assert.deepEqual(r.caps, []);
  const past = regionInfo(new Bytes(), { argsz: 32, flags: 0xf, index: 0, capOffset: 64, size: 0x1000, offset: 0 }).zeros(40).done();
  rejects(() => parseRegionInfoReply(past), 'CAP_OFFSET_INVALID');
  rejects(() => parseRegionInfoReply(new Uint8Array(31)), 'REGION_INFO_SHORT');
  checkSparseAreas([{ offset: 0, size: 0x1000 }], 0x1000);
  rejects(() => checkSparseAreas([{ offset: 0x800, size: 0x1000 }], 0x1000), 'CAP_SPARSE_AREA_OUTSIDE');
  rejects(() => checkSparseAreas([{ offset: 0, size: 0 }], 0x1000), 'CAP_SPARSE_AREA_OUTSIDE');
});

test('round trip: composed replies parse back to what went in', () => {
  const chain = new InfoCapChainBuilder().sparseMmap([{ offset: 0x3000, size: 0x1000 }]).msixMappable().add(42, 7, Uint8Array.of(1, 2));
  const r = composeRegionInfoReply(4096, { index: 4, flags: 0x7, size: 0x4000, offset: 0x10000 }, chain);
  const p = parseRegionInfoReply(r.bytes);
  assert.equal(p.complete, true);
  assert.deepEqual(p.info, { argsz: r.argsz, flags: 0xf, index: 4, capOffset: 32, size: 0x4000, offset: 0x10000 });
  assert.deepEqual(
    p.caps.map((c) => c.kind),
    ['sparse-mmap', 'msix-mappable', 'raw'],
  );
  const raw = p.caps[2];
  assert.ok(raw?.kind === 'raw');
  assert.deepEqual(raw.body, Uint8Array.of(1, 2, 0, 0, 0, 0, 0, 0));
});
