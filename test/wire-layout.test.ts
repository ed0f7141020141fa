import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ProtocolError } from '../src/wire/errors.js';
import { bytes, defineLayout, readI32, readU32, readU64, readU64Big } from '../src/wire/layout.js';
import { b } from './fixtures/vfio-user-bytes.js';

const isCode = (code: string) => (e: unknown) => e instanceof ProtocolError && e.code === code && e.errno === 22;

const SAMPLE = defineLayout('sample', [
  { name: 'a', type: 'u8' },
  { name: 'b', type: 'u16' },
  { name: 'c', type: 'u32' },
  { name: 'd', type: 'u64' },
  { name: 'e', type: 'u64big' },
  { name: 'f', type: 'i32' },
  { name: 'g', type: bytes(3) },
]);

const sampleBytes = () =>
  b().u8(0x12).u16(0x3456).u32(0x89abcdef).u64(2 ** 53 - 1).u64(0xffff_ffff_ffff_ffffn).u32(0xffff_fffe).bytes([7, 8, 9]).build();

const sampleValue = {
  a: 0x12,
  b: 0x3456,
  c: 0x89abcdef,
  d: 2 ** 53 - 1,
  e: 0xffff_ffff_ffff_ffffn,
  f: -2,
  g: new Uint8Array([7, 8, 9]),
};

test('offsets follow each other when not given; size is derived', () => {
  assert.equal(SAMPLE.size, 1 + 2 + 4 + 8 + 8 + 4 + 3);
  assert.deepEqual(
    SAMPLE.fields.map((f) => [f.name, f.offset, f.size]),
    [
      ['a', 0, 1],
      ['b', 1, 2],
      ['c', 3, 4],
      ['d', 7, 8],
      ['e', 15, 8],
      ['f', 23, 4],
      ['g', 27, 3],
    ],
  );
  assert.equal(SAMPLE.offsetOf('e'), 15);
});

test('decode reads little-endian values of every type', () => {
  assert.deepEqual(SAMPLE.decode(sampleBytes()), sampleValue);
});

test('encode writes exactly the hand-built bytes', () => {
  assert.deepEqual(Buffer.from(SAMPLE.encode(sampleValue)), sampleBytes());
});

test('decode and encode at an offset', () => {
  const buf = Buffer.concat([Buffer.alloc(3, 0xaa), sampleBytes(), Buffer.alloc(2, 0xbb)]);
  assert.deepEqual(SAMPLE.decode(buf, 3), sampleValue);
  const out = Buffer.alloc(SAMPLE.size + 5, 0xcc);
  assert.equal(SAMPLE.encode(sampleValue, out, 2), out);
  assert.deepEqual(out.subarray(2, 2 + SAMPLE.size), sampleBytes());
  assert.equal(out[0], 0xcc);
  assert.equal(out[SAMPLE.size + 2], 0xcc);
});

test('byte fields decode as views and encode zero-padded', () => {
  const buf = sampleBytes();
  const v = SAMPLE.decode(buf);
  assert.equal(v.g.buffer, buf.buffer);
  const out = SAMPLE.encode({ ...sampleValue, g: Buffer.from([1]) });
  assert.deepEqual([...out.subarray(27)], [1, 0, 0]);
});

test('explicit offsets leave gaps; options.size pads', () => {
  const L = defineLayout(
    'gappy',
    [
      { name: 'x', type: 'u32', offset: 0 },
      { name: 'y', type: 'u64', offset: 8 },
    ],
    { size: 24 },
  );
  assert.equal(L.size, 24);
  const bytes = b().u32(5).u32(0xdeadbeef).u64(6).zeros(8).build();
  assert.deepEqual(L.decode(bytes), { x: 5, y: 6 });
  assert.deepEqual(Buffer.from(L.encode({ x: 5, y: 6 })), b().u32(5).zeros(4).u64(6).zeros(8).build());
});

test('bad tables are refused at definition', () => {
  assert.throws(() => defineLayout('overlap', [{ name: 'x', type: 'u32' }, { name: 'y', type: 'u32', offset: 2 }]), RangeError);
  assert.throws(() => defineLayout('dup', [{ name: 'x', type: 'u8' }, { name: 'x', type: 'u8' }]), RangeError);
  assert.throws(() => defineLayout('small', [{ name: 'x', type: 'u32' }], { size: 2 }), RangeError);
  assert.throws(() => bytes(-1), RangeError);
});

test('a short buffer is WIRE_SHORT with EINVAL', () => {
  assert.throws(() => SAMPLE.decode(sampleBytes().subarray(1)), isCode('WIRE_SHORT'));
  assert.throws(() => SAMPLE.decode(sampleBytes(), 1), isCode('WIRE_SHORT'));
  assert.throws(() => SAMPLE.encode(sampleValue, Buffer.alloc(SAMPLE.size), 1), isCode('WIRE_SHORT'));
});

test('u64 as number: 2^53 - 1 decodes, 2^53 is WIRE_U64_RANGE', () => {
  const L = defineLayout('n', [{ name: 'v', type: 'u64' }]);
  assert.equal(L.decode(b().u64(2 ** 53 - 1).build()).v, Number.MAX_SAFE_INTEGER);
  assert.equal(L.decode(b().u64(0x1_0000_0000).build()).v, 0x1_0000_0000);
  assert.throws(() => L.decode(b().u64(2n ** 53n).build()), (e: unknown) => isCode('WIRE_U64_RANGE')(e) && (e as ProtocolError).value === 2n ** 53n);
  assert.throws(() => L.encode({ v: 2 ** 53 }), isCode('WIRE_VALUE'));
});

test('encode refuses values that do not fit their field', () => {
  const bad: [string, unknown][] = [
    ['a', 256],
    ['a', -1],
    ['b', 0x10000],
    ['c', 0x1_0000_0000],
    ['c', 1.5],
    ['d', -1],
    ['e', 2n ** 64n],
    ['e', 1],
    ['f', 0x8000_0000],
    ['g', Buffer.alloc(4)],
    ['g', 'abc'],
  ];
  for (const [field, value] of bad) {
    assert.throws(() => SAMPLE.encode({ ...sampleValue, [field]: value } as typeof sampleValue), isCode('WIRE_VALUE'), field);
  }
});

test('read helpers', () => {
  const buf = b().u32(0xffff_ffff).u32(0x1f_ffff).build();
  assert.equal(readU32(buf, 0), 0xffff_ffff);
  assert.equal(readI32(buf, 0), -1);
  assert.equal(readU64(buf, 0), Number.MAX_SAFE_INTEGER);
  assert.equal(readU64Big(buf, 0), 2n ** 53n - 1n);
});
