/**
 * Every codec fixture, framed into one byte stream and fed through the frame
 * reader split at many offsets: each message comes out whole and decodes to
 * the spec's value, whatever the split.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { FrameReader } from '../src/wire/reader.js';
import { decodeMessage, codecLimits } from '../src/vfio-user/messages.js';
import { F, FIXTURES, message } from './fixtures/vfio-user-bytes.js';

const spec = {
  headerSize: 16,
  frameSize: (h: Uint8Array) => h[4]! | (h[5]! << 8) | (h[6]! << 16) | (h[7]! * 2 ** 24),
  maxFrameSize: 1 << 22,
};

const limits = codecLimits(1 << 20, 1 << 22);
const fixtures = FIXTURES.filter((f) => !f.decodeOnly);
const stream = Buffer.concat(fixtures.map((f, i) => message(i, f.cmd, f.kind === 'reply' ? F.REPLY : F.COMMAND, f.body)));

function feed(splits: number[]): unknown[] {
  const out: unknown[] = [];
  const reader = new FrameReader(spec, {
    frame: (frame) => {
      const m = decodeMessage(frame, limits);
      assert.notEqual(m.kind, 'error');
      out.push((m as { body: unknown }).body);
    },
    oversized: () => false,
    fatal: (r) => assert.fail(r),
  });
  let at = 0;
  for (const s of [...splits, stream.length]) {
    reader.push(stream.subarray(at, s));
    at = s;
  }
  return out;
}

const normalise = (v: unknown): unknown =>
  v === undefined ? null : JSON.parse(JSON.stringify(v, (_k, x: unknown) => (typeof x === 'bigint' ? `${x}n` : x instanceof Uint8Array ? [...x] : x)));

test(`${fixtures.length} fixtures in one stream, split at every single offset`, () => {
  const expected = fixtures.map((f) => normalise(f.value));
  for (let s = 1; s < stream.length; s++) {
    const got = feed([s]).map(normalise);
    assert.equal(got.length, fixtures.length, `split at ${s}`);
    for (let i = 0; i < got.length; i++) assert.deepEqual(got[i], expected[i], `${fixtures[i]!.name}, split at ${s}`);
  }
});

test('the same stream in chunks of every size from 1 to 64 bytes', () => {
  const expected = fixtures.map((f) => normalise(f.value));
  for (let size = 1; size <= 64; size++) {
    const splits: number[] = [];
    for (let s = size; s < stream.length; s += size) splits.push(s);
    assert.deepEqual(feed(splits).map(normalise), expected, `chunks of ${size}`);
  }
});
