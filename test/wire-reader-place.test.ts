import { test } from 'node:test';
import assert from 'node:assert/strict';
import { FrameReader, type FrameSpec } from '../src/wire/reader.js';
import { EventFd, type Fd } from '../src/sys/index.js';
import { openFdCount } from './helpers/sys.js';

/**
 * Test framing for placement: an 8-byte header whose bytes 0..3 are the
 * little-endian total size (header included) and bytes 4..7 a tag, then the
 * body. Fixtures are built by hand below; nothing is shared with the code
 * under test.
 */
const HEADER = 8;

const baseSpec: FrameSpec = {
  headerSize: HEADER,
  frameSize: (h) => h[0]! | (h[1]! << 8) | (h[2]! << 16) | (h[3]! * 2 ** 24),
  maxFrameSize: 1 << 20,
};

/** A frame of `size` bytes in total: header (size, tag), then a body pattern seeded by the tag. */
function mkFrame(size: number, tag: number): Uint8Array {
  assert.ok(size >= HEADER);
  const f = new Uint8Array(size);
  f[0] = size & 0xff;
  f[1] = (size >>> 8) & 0xff;
  f[2] = (size >>> 16) & 0xff;
  f[3] = (size >>> 24) & 0xff;
  f[4] = tag & 0xff;
  f[5] = (tag >>> 8) & 0xff;
  f[6] = 0xc3;
  f[7] = 0x3c;
  for (let i = HEADER; i < size; i++) f[i] = (i * 31 + tag * 7 + (i >>> 8)) & 0xff;
  return f;
}

function concat(...parts: Uint8Array[]): Uint8Array {
  const n = parts.reduce((s, p) => s + p.length, 0);
  const out = new Uint8Array(n);
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** Cuts `stream` at the given offsets into fresh, independent chunks (copies). */
function cut(stream: Uint8Array, offsets: number[]): Uint8Array[] {
  const out: Uint8Array[] = [];
  let prev = 0;
  for (const o of [...offsets, stream.length]) {
    out.push(stream.slice(prev, o));
    prev = o;
  }
  return out;
}

const fds = (n: number): Fd[] => Array.from({ length: n }, () => EventFd.create().fd);

interface Delivered {
  /** The frame as handed out (kept to check later that it is not a view of a chunk). */
  ref: Uint8Array;
  /** Its bytes at delivery time. */
  bytes: number[];
  fds: Fd[];
  /** The `placed` argument as handed out. */
  placed: Uint8Array | undefined;
  /** Whether a third argument was passed at all. */
  args: number;
}

interface PlaceCall {
  prefix: number[];
  size: number;
  target: Uint8Array | null;
}

interface Harness {
  reader: FrameReader;
  frames: Delivered[];
  fatal: string[];
  places: PlaceCall[];
}

/**
 * A reader whose place() calls `decide` (default: a fresh target of the right
 * size for every frame offered) and which records everything it gets.
 */
function harness(
  spec: Partial<FrameSpec> = {},
  decide: (prefix: Uint8Array, size: number) => Uint8Array | null = (_p, size) =>
    new Uint8Array(size - (spec.placePrefix ?? HEADER)),
): Harness {
  const frames: Delivered[] = [];
  const fatal: string[] = [];
  const places: PlaceCall[] = [];
  const full: FrameSpec = {
    ...baseSpec,
    place(prefix, size) {
      const target = decide(prefix, size);
      places.push({ prefix: [...prefix], size, target });
      return target;
    },
    ...spec,
  };
  const reader = new FrameReader(full, {
    frame(f, got, ...rest: [Uint8Array?]) {
      frames.push({ ref: f, bytes: [...f], fds: got, placed: rest[0], args: 2 + rest.length });
    },
    oversized: () => false,
    fatal: (why) => fatal.push(why),
  });
  return { reader, frames, fatal, places };
}

function closeDelivered(h: Harness): void {
  for (const f of h.frames) for (const fd of f.fds) fd.close();
}

/** Reason for the tests that hit the split-prefix bug (see the report). */

// ---------------------------------------------------------------------------
// 1. Split placed frames
// ---------------------------------------------------------------------------

/** Runs one split of [A small][P placed][B small] and checks everything about it. */
function checkSplit(prefixLen: number, offsets: number[]): void {
  const A = mkFrame(20, 1);
  const P = mkFrame(5000, 2);
  const B = mkFrame(30, 3);
  const stream = concat(A, P, B);
  const h = harness(prefixLen === HEADER ? {} : { placePrefix: prefixLen });
  const chunks = cut(stream, offsets);
  for (const c of chunks) h.reader.push(c);
  const what = `prefix ${prefixLen} split ${offsets.join('/')}`;
  assert.deepEqual(h.fatal, [], what);
  assert.equal(h.frames.length, 3, what);
  assert.equal(h.reader.buffered, 0, what);
  assert.equal(h.reader.readTarget(), null, what);
  // A and B: whole, unplaced, in order.
  assert.deepEqual(h.frames[0]!.bytes, [...A], what);
  assert.equal(h.frames[0]!.placed, undefined, what);
  assert.deepEqual(h.frames[2]!.bytes, [...B], what);
  assert.equal(h.frames[2]!.placed, undefined, what);
  // P: offered once, with its prefix and size.
  assert.equal(h.places.length, 1, what);
  assert.deepEqual(h.places[0]!.prefix, [...P.subarray(0, prefixLen)], what);
  assert.equal(h.places[0]!.size, P.length, what);
  const target = h.places[0]!.target!;
  const p = h.frames[1]!;
  assert.equal(p.placed, target, `${what}: placed is the target object itself`);
  assert.equal(p.args, 3, what);
  assert.equal(target.length, P.length - prefixLen, what);
  assert.ok(Buffer.from(target).equals(Buffer.from(P.subarray(prefixLen))), `${what}: target holds the payload`);
  assert.deepEqual(p.bytes, [...P.subarray(0, prefixLen)], what);
  assert.equal(p.ref.length, prefixLen, what);
  // A chunk that ends exactly where the prefix does (and holds all of it) is the prefix as it is, a
  // view (as small frames are: retainsLastChunk says so); otherwise the prefix is a copy.
  const k = offsets.indexOf(20 + prefixLen);
  const viewOf = k >= 0 && !offsets.some((o) => o > 20 && o < 20 + prefixLen) ? chunks[k]! : null;
  for (const c of chunks) {
    if (c === viewOf) assert.equal(p.ref.buffer, c.buffer, `${what}: prefix is a view of the chunk that ends with it`);
    else assert.notEqual(p.ref.buffer, c.buffer, `${what}: prefix is not a view of a chunk`);
  }
  // Scribble over every other chunk: the prefix and the target must not change.
  for (const c of chunks) if (c !== viewOf) c.fill(0xee);
  assert.deepEqual([...p.ref], [...P.subarray(0, prefixLen)], `${what}: prefix unchanged after chunks are reused`);
  assert.ok(Buffer.from(target).equals(Buffer.from(P.subarray(prefixLen))), `${what}: target unchanged`);
}

/** Whether a cut at `o` falls strictly inside P's prefix (P starts at offset 20 in checkSplit's stream). */
const cutsPrefix = (prefixLen: number, o: number): boolean => o > 20 && o < 20 + prefixLen;

const SPLIT_LEN = 20 + 5000 + 30;

function threeWayPoints(): number[] {
  const marks = [0, 20, 28, 36, 2520, 5020, 5050];
  const points = new Set<number>();
  for (const m of marks) for (let d = -9; d <= 9; d++) if (m + d >= 0 && m + d <= SPLIT_LEN) points.add(m + d);
  for (const x of [777, 1234, 3000, 4096, 4999]) points.add(x);
  return [...points].sort((x, y) => x - y);
}

test('a placed frame split into 2 chunks at every offset (prefix in one chunk): payload in the target, prefix a copy, neighbours intact', () => {
  for (const prefixLen of [HEADER, 16]) {
    for (let a = 0; a <= SPLIT_LEN; a++) if (!cutsPrefix(prefixLen, a)) checkSplit(prefixLen, [a]);
  }
});

test('a placed frame split into 2 chunks inside its prefix', () => {
  for (const prefixLen of [HEADER, 16]) {
    for (let a = 21; a < 20 + prefixLen; a++) checkSplit(prefixLen, [a]);
  }
});

test('a placed frame split into 3 chunks at many offset pairs (prefix in one chunk)', () => {
  const sorted = threeWayPoints();
  for (const prefixLen of [HEADER, 16]) {
    for (const a of sorted) {
      for (const b of sorted) {
        if (b >= a && !cutsPrefix(prefixLen, a) && !cutsPrefix(prefixLen, b)) checkSplit(prefixLen, [a, b]);
      }
    }
  }
});

test('a placed frame split into 3 chunks, cutting its prefix', () => {
  const sorted = threeWayPoints();
  for (const prefixLen of [HEADER, 16]) {
    for (const a of sorted) {
      for (const b of sorted) {
        if (b >= a && (cutsPrefix(prefixLen, a) || cutsPrefix(prefixLen, b))) checkSplit(prefixLen, [a, b]);
      }
    }
  }
});

test('the smallest reproduction: a placed frame whose header comes in two pushes', () => {
  const P = mkFrame(5000, 1);
  const h = harness();
  h.reader.push(P.slice(0, 4));
  assert.doesNotThrow(() => h.reader.push(P.slice(4)));
  assert.equal(h.frames.length, 1);
  assert.ok(Buffer.from(h.frames[0]!.placed!).equals(Buffer.from(P.subarray(HEADER))));
});

test('a placed frame fed one byte at a time', () => {
  const P = mkFrame(4200, 9);
  const B = mkFrame(12, 10);
  const h = harness({ placePrefix: 24 });
  const stream = concat(P, B);
  for (let i = 0; i < stream.length; i++) h.reader.push(stream.slice(i, i + 1));
  assert.deepEqual(h.fatal, []);
  assert.equal(h.places.length, 1);
  assert.equal(h.frames.length, 2);
  assert.deepEqual(h.frames[0]!.bytes, [...P.subarray(0, 24)]);
  assert.ok(Buffer.from(h.frames[0]!.placed!).equals(Buffer.from(P.subarray(24))));
  assert.deepEqual(h.frames[1]!.bytes, [...B]);
});

// ---------------------------------------------------------------------------
// 2. place() returning null
// ---------------------------------------------------------------------------

test('place() returning null: the frame is delivered whole, as before', () => {
  const A = mkFrame(5000, 1);
  const B = mkFrame(6000, 2);
  const C = mkFrame(10, 3);
  const stream = concat(A, B, C);
  for (const offsets of [[], [3], [100], [5000, 5004], [2500, 7000, 11000], [11000]]) {
    const h = harness({}, () => null);
    for (const c of cut(stream, offsets)) h.reader.push(c);
    const what = `split ${offsets.join('/')}`;
    assert.deepEqual(h.fatal, [], what);
    assert.equal(h.frames.length, 3, what);
    assert.deepEqual(h.frames[0]!.bytes, [...A], what);
    assert.deepEqual(h.frames[1]!.bytes, [...B], what);
    assert.deepEqual(h.frames[2]!.bytes, [...C], what);
    for (const f of h.frames) {
      assert.equal(f.placed, undefined, what);
      assert.equal(f.args, 2, `${what}: no placed argument for an unplaced frame`);
    }
    assert.ok(h.places.length >= 2, what);
    assert.deepEqual(
      [...new Set(h.places.map((p) => p.size))],
      [5000, 6000],
      `${what}: only A and B are offered`,
    );
    assert.equal(h.reader.buffered, 0, what);
  }
});

test('place() returning null for a frame at least bigFrameSize: gathered in its own buffer, delivered whole', () => {
  const A = mkFrame(10_000, 1);
  const B = mkFrame(9, 2);
  const stream = concat(A, B);
  for (const step of [1, 7, 100, 4096, 10_009]) {
    const h = harness({ bigFrameSize: 8192 }, () => null);
    for (let at = 0; at < stream.length; at += step) h.reader.push(stream.slice(at, at + step));
    assert.deepEqual(h.fatal, []);
    assert.equal(h.frames.length, 2, `step ${step}`);
    assert.deepEqual(h.frames[0]!.bytes, [...A], `step ${step}`);
    assert.equal(h.frames[0]!.placed, undefined);
    assert.deepEqual(h.frames[1]!.bytes, [...B]);
    assert.equal(h.places.length, 1, `step ${step}: asked once`);
  }
});

test(
  'place() returning null is asked only once per frame, however many chunks the frame comes in',
  () => {
    const A = mkFrame(5000, 1);
    const h = harness({}, () => null);
    for (const c of cut(A, [100, 1000, 2000, 3000, 4000])) h.reader.push(c);
    assert.equal(h.frames.length, 1);
    assert.deepEqual(h.frames[0]!.bytes, [...A]);
    assert.equal(h.places.length, 1, `place() was called ${h.places.length} times for one frame`);
  },
);

test('place() may decide per frame: placed and declined frames interleave', () => {
  const frames = [mkFrame(5000, 1), mkFrame(5000, 2), mkFrame(6000, 3), mkFrame(50, 4), mkFrame(4096, 5)];
  const stream = concat(...frames);
  // Place odd tags only (the tag is byte 4 of the prefix).
  const h = harness({}, (prefix, size) => (prefix[4]! % 2 === 1 ? new Uint8Array(size - HEADER) : null));
  for (let at = 0; at < stream.length; at += 1500) h.reader.push(stream.slice(at, at + 1500));
  assert.deepEqual(h.fatal, []);
  assert.equal(h.frames.length, 5);
  for (const [i, f] of frames.entries()) {
    const d = h.frames[i]!;
    if (i === 0 || i === 2 || i === 4) {
      assert.deepEqual(d.bytes, [...f.subarray(0, HEADER)], `frame ${i}`);
      assert.ok(Buffer.from(d.placed!).equals(Buffer.from(f.subarray(HEADER))), `frame ${i}`);
    } else {
      assert.deepEqual(d.bytes, [...f], `frame ${i}`);
      assert.equal(d.placed, undefined);
    }
  }
});

// ---------------------------------------------------------------------------
// 3. When place() is consulted
// ---------------------------------------------------------------------------

test('place() is consulted only for frames of at least placeMinSize (default 4096) and longer than the prefix', () => {
  {
    const small = mkFrame(4095, 1);
    const exact = mkFrame(4096, 2);
    const h = harness();
    h.reader.push(concat(small, exact));
    assert.deepEqual(h.places.map((p) => p.size), [4096]);
    assert.deepEqual(h.frames[0]!.bytes, [...small]);
    assert.equal(h.frames[0]!.placed, undefined);
    assert.deepEqual(h.frames[1]!.bytes, [...exact.subarray(0, HEADER)]);
    assert.ok(Buffer.from(h.frames[1]!.placed!).equals(Buffer.from(exact.subarray(HEADER))));
  }
  {
    const h = harness({ placeMinSize: 100 });
    const f99 = mkFrame(99, 1);
    const f100 = mkFrame(100, 2);
    h.reader.push(concat(f99, f100));
    assert.deepEqual(h.places.map((p) => p.size), [100]);
    assert.deepEqual(h.frames[0]!.bytes, [...f99]);
    assert.equal(h.frames[1]!.placed!.length, 100 - HEADER);
    assert.ok(Buffer.from(h.frames[1]!.placed!).equals(Buffer.from(f100.subarray(HEADER))));
  }
  {
    // A frame no longer than the prefix is never offered, whatever placeMinSize says.
    const h = harness({ placeMinSize: 8, placePrefix: 16 });
    const f16 = mkFrame(16, 1);
    const f17 = mkFrame(17, 2);
    const f8 = mkFrame(8, 3);
    h.reader.push(concat(f16, f8, f17));
    assert.deepEqual(h.places.map((p) => p.size), [17]);
    assert.deepEqual(h.frames[0]!.bytes, [...f16]);
    assert.deepEqual(h.frames[1]!.bytes, [...f8]);
    assert.deepEqual(h.frames[2]!.bytes, [...f17.subarray(0, 16)]);
    assert.deepEqual([...h.frames[2]!.placed!], [f17[16]]);
  }
});

test('place() is not asked while fewer than placePrefix bytes are buffered', () => {
  const P = mkFrame(6000, 5);
  {
    const h = harness();
    for (let n = 1; n < HEADER; n++) {
      h.reader.push(P.slice(n - 1, n));
      assert.equal(h.places.length, 0, `${n} header bytes`);
      assert.equal(h.reader.buffered, n);
      assert.equal(h.reader.readTarget(), null);
      assert.equal(h.reader.retainsLastChunk, true, 'a partial header stays buffered');
    }
  }
  {
    const h = harness({ placePrefix: 40 });
    h.reader.push(P.slice(0, 8));
    assert.equal(h.places.length, 0, 'header only');
    h.reader.push(P.slice(8, 39));
    assert.equal(h.places.length, 0, '39 of 40 prefix bytes');
    assert.equal(h.reader.buffered, 39);
    assert.equal(h.frames.length, 0);
  }
  {
    // Prefix and header in one chunk: asked at once.
    const h = harness({ placePrefix: 40 });
    h.reader.push(P.slice(0, 40));
    assert.equal(h.places.length, 1);
    assert.deepEqual(h.places[0]!.prefix, [...P.subarray(0, 40)]);
    assert.equal(h.places[0]!.size, 6000);
    h.reader.push(P.slice(40));
    assert.deepEqual(h.frames[0]!.bytes, [...P.subarray(0, 40)]);
    assert.ok(Buffer.from(h.frames[0]!.placed!).equals(Buffer.from(P.subarray(40))));
  }
});

test('place() waits until placePrefix bytes are buffered, then places the frame', () => {
  const P = mkFrame(6000, 5);
  {
    // Default prefix: the header.
    const h = harness();
    h.reader.push(P.slice(0, 5));
    assert.equal(h.places.length, 0, 'not asked on a partial header');
    assert.equal(h.reader.buffered, 5);
    assert.equal(h.reader.readTarget(), null);
    h.reader.push(P.slice(5, 8));
    assert.equal(h.places.length, 1, 'asked as soon as the header is in');
    assert.deepEqual(h.places[0]!.prefix, [...P.subarray(0, 8)]);
    assert.equal(h.places[0]!.size, 6000);
    assert.equal(h.frames.length, 0);
    h.reader.push(P.slice(8));
    assert.equal(h.frames.length, 1);
    assert.ok(Buffer.from(h.frames[0]!.placed!).equals(Buffer.from(P.subarray(8))));
  }
  {
    // A prefix longer than the header: header alone is not enough.
    const h = harness({ placePrefix: 40 });
    h.reader.push(P.slice(0, 8));
    assert.equal(h.places.length, 0, 'header only');
    h.reader.push(P.slice(8, 20));
    assert.equal(h.places.length, 0, '20 of 40 prefix bytes');
    h.reader.push(P.slice(20, 39));
    assert.equal(h.places.length, 0, '39 of 40 prefix bytes');
    assert.equal(h.reader.buffered, 39);
    h.reader.push(P.slice(39));
    assert.equal(h.places.length, 1);
    assert.deepEqual(h.places[0]!.prefix, [...P.subarray(0, 40)]);
    assert.equal(h.frames.length, 1);
    assert.deepEqual(h.frames[0]!.bytes, [...P.subarray(0, 40)]);
    assert.equal(h.frames[0]!.placed!.length, 6000 - 40);
    assert.ok(Buffer.from(h.frames[0]!.placed!).equals(Buffer.from(P.subarray(40))));
  }
});

// ---------------------------------------------------------------------------
// 4. readTarget()
// ---------------------------------------------------------------------------

test('readTarget() is the rest of the target; pushing views of it fills without a copy', () => {
  const P = mkFrame(9000, 4);
  const B = mkFrame(24, 5);
  const stream = concat(P, B);
  for (const step of [1, 333, 1000, 4096, 8992]) {
    // The target is a view at a nonzero offset of a larger buffer, to check the offset math.
    const backing = new ArrayBuffer(64 + (9000 - HEADER) + 64);
    const target = new Uint8Array(backing, 64, 9000 - HEADER);
    let copies = 0;
    let copied = 0;
    target.set = function (this: Uint8Array, src: ArrayLike<number>, offset?: number) {
      copies++;
      copied += src.length;
      Uint8Array.prototype.set.call(this, src, offset);
    } as Uint8Array['set'];
    const h = harness({}, () => target);
    assert.equal(h.reader.readTarget(), null, 'no frame yet');
    // Header plus 100 body bytes come from an ordinary (pooled) read.
    h.reader.push(stream.slice(0, HEADER + 100));
    assert.equal(h.places.length, 1);
    assert.equal(h.reader.retainsLastChunk, false);
    let at = HEADER + 100;
    let inPlacePushes = 0;
    while (at < P.length) {
      const t = h.reader.readTarget();
      assert.ok(t, `step ${step}: a target until the frame ends`);
      const done = at - HEADER;
      assert.equal(t.buffer, backing, `step ${step}`);
      assert.equal(t.byteOffset, 64 + done, `step ${step}: view at the next byte`);
      assert.equal(t.length, target.length - done, `step ${step}: up to the end of the target`);
      const n = Math.min(step, t.length);
      t.set(stream.subarray(at, at + n)); // the "socket" writes into the target...
      h.reader.push(t.subarray(0, n)); // ...and reports those bytes
      assert.equal(h.reader.retainsLastChunk, false, `step ${step}`);
      at += n;
      inPlacePushes++;
    }
    // A placed frame under 16 KiB: the next read is an ordinary one (a read of the prefix alone
    // would cost more than copying a small payload).
    assert.equal(h.reader.readTarget(), null, `step ${step}: no target after the frame end`);
    assert.ok(inPlacePushes > 0);
    assert.equal(copies, 1, `step ${step}: only the ordinary chunk was copied`);
    assert.equal(copied, 100);
    assert.equal(h.frames.length, 1);
    assert.equal(h.frames[0]!.placed, target);
    assert.deepEqual(h.frames[0]!.bytes, [...P.subarray(0, HEADER)]);
    assert.ok(Buffer.from(target).equals(Buffer.from(P.subarray(HEADER))), `step ${step}`);
    assert.deepEqual([...new Uint8Array(backing, 0, 64)], Array(64).fill(0), 'nothing written before the target');
    assert.deepEqual([...new Uint8Array(backing, 64 + target.length)], Array(64).fill(0), 'nothing written after it');
    // Then an ordinary chunk for the next frame.
    h.reader.push(stream.slice(at));
    assert.equal(h.frames.length, 2);
    assert.deepEqual(h.frames[1]!.bytes, [...B]);
    assert.deepEqual(h.fatal, []);
  }
});

test('readTarget(): mixing in-place reads and ordinary chunks', () => {
  const P = mkFrame(7000, 6);
  const target = new Uint8Array(7000 - 16);
  const h = harness({ placePrefix: 16 }, () => target);
  assert.equal(h.reader.readTarget(), null, 'nothing placed yet');
  h.reader.push(P.slice(0, 16));
  let t = h.reader.readTarget()!;
  assert.equal(t.buffer, target.buffer);
  assert.equal(t.byteOffset, target.byteOffset);
  assert.equal(t.length, target.length);
  let at = 16;
  let inPlace = true;
  while (at < P.length) {
    const n = Math.min(611, P.length - at);
    if (inPlace) {
      t = h.reader.readTarget()!;
      assert.equal(t.byteOffset, target.byteOffset + (at - 16));
      t.set(P.subarray(at, at + n));
      h.reader.push(t.subarray(0, n));
    } else {
      h.reader.push(P.slice(at, at + n));
    }
    at += n;
    inPlace = !inPlace;
  }
  assert.equal(h.frames.length, 1);
  assert.equal(h.frames[0]!.placed, target);
  assert.ok(Buffer.from(target).equals(Buffer.from(P.subarray(16))));
  assert.equal(h.reader.readTarget(), null, 'after a placed frame under 16 KiB: an ordinary read');
});

test('readTarget() after a large placed frame: the next prefix, or what is missing of it, not a pool-sized read', () => {
  const P = mkFrame(7000, 7);
  const Q = mkFrame(7000, 8);
  const targets = [new Uint8Array(7000 - 16), new Uint8Array(7000 - 16)];
  let n = 0;
  const h = harness({ placePrefix: 16, bigFrameSize: 4096 }, () => targets[n++]!);
  h.reader.push(P.slice(0, 16));
  h.reader.push(P.slice(16));
  assert.equal(h.frames.length, 1);
  let t = h.reader.readTarget();
  assert.equal(t?.length, 16, 'the whole next prefix');
  h.reader.push(Q.slice(0, 5)); // the peer's write ended inside the prefix
  t = h.reader.readTarget();
  assert.equal(t?.length, 11, 'the rest of the prefix');
  t!.set(Q.subarray(5, 16));
  h.reader.push(t!);
  t = h.reader.readTarget();
  assert.equal(t?.buffer, targets[1]!.buffer, 'then the payload goes to its place');
  h.reader.push(Q.slice(16));
  assert.equal(h.frames.length, 2);
  assert.ok(Buffer.from(targets[1]!).equals(Buffer.from(Q.subarray(16))));
  closeDelivered(h);
});

// ---------------------------------------------------------------------------
// 5. Several placed frames in one chunk
// ---------------------------------------------------------------------------

test('several placed frames in one chunk each go to their own target', () => {
  const P1 = mkFrame(5000, 1);
  const P2 = mkFrame(5000, 2);
  const P3 = mkFrame(5000, 3);
  const s1 = mkFrame(12, 4);
  for (const withTail of [false, true]) {
    const chunk = withTail ? concat(P1, s1, P2, P3, s1) : concat(P1, P2, P3);
    const h = harness();
    h.reader.push(chunk);
    assert.deepEqual(h.fatal, []);
    assert.equal(h.places.length, 3);
    const targets = h.places.map((p) => p.target!);
    assert.equal(new Set(targets).size, 3, 'three distinct targets');
    const placed = h.frames.filter((f) => f.placed);
    assert.equal(placed.length, 3);
    for (const [i, P] of [P1, P2, P3].entries()) {
      assert.equal(placed[i]!.placed, targets[i]);
      assert.deepEqual(placed[i]!.bytes, [...P.subarray(0, HEADER)], `frame ${i}`);
      assert.ok(Buffer.from(targets[i]!).equals(Buffer.from(P.subarray(HEADER))), `frame ${i}`);
      assert.notEqual(placed[i]!.ref.buffer, chunk.buffer);
    }
    if (withTail) {
      assert.equal(h.frames.length, 5);
      assert.deepEqual(h.frames[1]!.bytes, [...s1]);
      assert.deepEqual(h.frames[4]!.bytes, [...s1]);
      assert.equal(h.frames[4]!.ref.buffer, chunk.buffer, 'the small frame is a view');
      assert.equal(h.reader.retainsLastChunk, true);
    } else {
      assert.equal(h.frames.length, 3);
      assert.equal(h.reader.retainsLastChunk, false);
    }
    assert.equal(h.reader.buffered, 0);
    chunk.fill(0);
    for (const [i, P] of [P1, P2, P3].entries()) {
      assert.deepEqual([...placed[i]!.ref], [...P.subarray(0, HEADER)], 'prefix copies survive chunk reuse');
    }
  }
});

test('many placed frames in one large chunk, then one split across the next chunk', () => {
  const list = Array.from({ length: 40 }, (_, i) => mkFrame(4096 + i * 13, i + 1));
  const stream = concat(...list);
  const h = harness();
  const cutAt = stream.length - 2000;
  h.reader.push(stream.slice(0, cutAt));
  assert.equal(h.frames.length, 39);
  h.reader.push(stream.slice(cutAt));
  assert.deepEqual(h.fatal, []);
  assert.equal(h.frames.length, 40);
  for (const [i, f] of list.entries()) {
    assert.deepEqual(h.frames[i]!.bytes, [...f.subarray(0, HEADER)], `frame ${i}`);
    assert.ok(Buffer.from(h.frames[i]!.placed!).equals(Buffer.from(f.subarray(HEADER))), `frame ${i}`);
  }
});

// ---------------------------------------------------------------------------
// 6. Wrong target size
// ---------------------------------------------------------------------------

test('a target of the wrong size is fatal and stops the reader', () => {
  for (const delta of [-1, 1, -(5000 - HEADER)]) {
    const before = openFdCount();
    const A = mkFrame(16, 1);
    const P = mkFrame(5000, 2);
    const h = harness({}, (_p, size) => new Uint8Array(size - HEADER + delta));
    const chunk = concat(A, P);
    h.reader.push(chunk.slice(0, 16 + 100), fds(2));
    assert.equal(h.fatal.length, 1, `delta ${delta}`);
    assert.match(h.fatal[0]!, /place\(\)/);
    assert.equal(h.reader.stopped, true);
    assert.equal(h.frames.length, 1, 'the frame before it was delivered');
    assert.deepEqual(h.frames[0]!.bytes, [...A]);
    assert.equal(h.reader.readTarget(), null);
    h.reader.push(chunk.slice(16 + 100), fds(1));
    assert.equal(h.frames.length, 1, 'nothing after the stop');
    assert.equal(h.fatal.length, 1, 'fatal once');
    closeDelivered(h);
    assert.equal(openFdCount(), before, 'pending fds were closed');
  }
});

// ---------------------------------------------------------------------------
// 7. dropPlacement
// ---------------------------------------------------------------------------

test('dropPlacement mid-frame: the rest is discarded, the target is not written again, later frames parse', () => {
  const P = mkFrame(8000, 7);
  const B = mkFrame(40, 8);
  const C = mkFrame(5000, 9);
  const stream = concat(P, B, C);
  const SENTINEL = 0xa5;
  for (const dropAt of [HEADER, HEADER + 1, HEADER + 1000, 7999]) {
    for (const step of [1, 97, 3000, 100_000]) {
      const what = `drop at ${dropAt}, step ${step}`;
      const targets: Uint8Array[] = [];
      const h = harness({}, (_p, size) => {
        const t = new Uint8Array(size - HEADER).fill(SENTINEL);
        targets.push(t);
        return t;
      });
      h.reader.push(stream.slice(0, dropAt));
      const target = targets[0]!;
      assert.ok(target);
      const written = dropAt - HEADER;
      assert.ok(Buffer.from(target.subarray(0, written)).equals(Buffer.from(P.subarray(HEADER, dropAt))), what);
      h.reader.dropPlacement(new Uint8Array(target.length)); // another array: no effect
      assert.notEqual(h.reader.readTarget(), null, `${what}: an unrelated array does not drop`);
      h.reader.dropPlacement(target);
      assert.equal(h.reader.readTarget(), null, `${what}: nothing to read into after the drop`);
      // The rest of P in steps (the last step may run into B), then the rest in one chunk so that
      // C's prefix is not cut.
      let at = dropAt;
      while (at < P.length) {
        const to = Math.min(at + step, P.length + 4);
        h.reader.push(stream.slice(at, to));
        at = to;
      }
      h.reader.push(stream.slice(at));
      assert.deepEqual(h.fatal, [], what);
      assert.equal(h.frames.length, 3, what);
      const p = h.frames[0]!;
      assert.deepEqual(p.bytes, [...P.subarray(0, HEADER)], what);
      assert.ok(p.placed instanceof Uint8Array, what);
      assert.equal(p.placed!.length, 0, `${what}: placed is empty`);
      assert.ok(Buffer.from(target.subarray(0, written)).equals(Buffer.from(P.subarray(HEADER, dropAt))), what);
      assert.ok(
        target.subarray(written).every((b) => b === SENTINEL),
        `${what}: no byte written after the drop`,
      );
      assert.deepEqual(h.frames[1]!.bytes, [...B], what);
      assert.equal(h.frames[1]!.placed, undefined);
      // The next placed frame is placed normally.
      assert.equal(targets.length, 2, what);
      assert.equal(h.frames[2]!.placed, targets[1]);
      assert.ok(Buffer.from(targets[1]!).equals(Buffer.from(C.subarray(HEADER))), what);
      assert.equal(h.reader.buffered, 0, what);
    }
  }
});

test('dropPlacement of a finished frame’s target does not touch the next placed frame', () => {
  const P = mkFrame(5000, 1);
  const Q = mkFrame(5000, 2);
  const h = harness();
  h.reader.push(P);
  const first = h.places[0]!.target!;
  h.reader.push(Q.slice(0, 100));
  h.reader.dropPlacement(first);
  assert.notEqual(h.reader.readTarget(), null);
  h.reader.push(Q.slice(100));
  assert.equal(h.frames.length, 2);
  assert.equal(h.frames[1]!.placed, h.places[1]!.target);
  assert.ok(Buffer.from(h.frames[1]!.placed!).equals(Buffer.from(Q.subarray(HEADER))));
});

test('dropPlacement from inside a frame handler, before the next placed frame completes', () => {
  // The handler of small frame S drops the target of placed frame Q that is being received.
  const P = mkFrame(12, 1);
  const Q = mkFrame(6000, 2);
  const stream = concat(P, Q);
  const target = new Uint8Array(6000 - HEADER).fill(0x11);
  const got: { len: number; placed?: Uint8Array }[] = [];
  const reader = new FrameReader(
    { ...baseSpec, place: () => target },
    {
      frame(f, _fds, placed) {
        got.push({ len: f.length, placed });
      },
      oversized: () => false,
      fatal: (why) => assert.fail(why),
    },
  );
  reader.push(stream.slice(0, 12 + HEADER + 10));
  assert.equal(got.length, 1);
  reader.dropPlacement(target);
  reader.push(stream.slice(12 + HEADER + 10));
  assert.equal(got.length, 2);
  assert.equal(got[1]!.placed!.length, 0);
  assert.deepEqual([...target.subarray(0, 10)], [...Q.subarray(HEADER, HEADER + 10)]);
  assert.ok(target.subarray(10).every((b) => b === 0x11));
});

// ---------------------------------------------------------------------------
// 8. Detached target
// ---------------------------------------------------------------------------

function detach(u: Uint8Array): void {
  structuredClone(u.buffer, { transfer: [u.buffer] });
  assert.equal(u.length, 0, 'detached');
}

test(
  'a target detached mid-frame: the rest is discarded, placed is empty, the next frame is fine',
  () => {
    const P = mkFrame(8000, 1);
    const B = mkFrame(20, 2);
    const C = mkFrame(5000, 3);
    const stream = concat(P, B, C);
    const h = harness();
    h.reader.push(stream.slice(0, 1000));
    const target = h.places[0]!.target!;
    detach(target);
    assert.doesNotThrow(() => h.reader.push(stream.slice(1000, 3000)));
    assert.doesNotThrow(() => h.reader.push(stream.slice(3000)));
    assert.deepEqual(h.fatal, []);
    assert.equal(h.frames.length, 3);
    assert.deepEqual(h.frames[0]!.bytes, [...P.subarray(0, HEADER)]);
    assert.equal(h.frames[0]!.placed!.length, 0);
    assert.deepEqual(h.frames[1]!.bytes, [...B]);
    assert.ok(Buffer.from(h.frames[2]!.placed!).equals(Buffer.from(C.subarray(HEADER))));
    assert.equal(h.reader.buffered, 0);
  },
);

test(
  'readTarget() on a detached target returns null without throwing',
  () => {
    const P = mkFrame(8000, 1);
    const h = harness();
    h.reader.push(P.slice(0, 1000));
    detach(h.places[0]!.target!);
    let t: Uint8Array | null = new Uint8Array(1);
    assert.doesNotThrow(() => {
      t = h.reader.readTarget();
    });
    assert.equal(t, null);
    assert.doesNotThrow(() => h.reader.push(P.slice(1000)));
    assert.equal(h.frames.length, 1);
    assert.equal(h.frames[0]!.placed!.length, 0);
  },
);

test('a target detached in the same push that completes the frame (no throw if the detach comes after delivery)', () => {
  // Detaching from the handler after the frame was delivered is harmless: the reader is done with it.
  const P = mkFrame(5000, 1);
  const B = mkFrame(30, 2);
  const frames: { len: number; placedLen?: number }[] = [];
  const r = new FrameReader(
    { ...baseSpec, place: (_p, size) => new Uint8Array(size - HEADER) },
    {
      frame(f, _fds, placed) {
        frames.push({ len: f.length, placedLen: placed?.length });
        if (placed) detach(placed);
      },
      oversized: () => false,
      fatal: (why) => assert.fail(why),
    },
  );
  r.push(concat(P, B));
  assert.deepEqual(frames, [{ len: HEADER, placedLen: 5000 - HEADER }, { len: 30, placedLen: undefined }]);
});

// ---------------------------------------------------------------------------
// 9. fds
// ---------------------------------------------------------------------------

test('fds pushed with chunks of a placed frame come with that frame', () => {
  const before = openFdCount();
  const A = mkFrame(16, 1);
  const P = mkFrame(6000, 2);
  const B = mkFrame(24, 3);
  const stream = concat(A, P, B);
  const pEnd = 16 + 6000;
  const h = harness();
  const f1 = fds(1); // chunk holds A and ends at the end of P's header -> P
  const f2 = fds(2); // chunk ends in P's body -> P
  const f3 = fds(1); // chunk ends exactly at P's last byte -> P
  const f4 = fds(2); // chunk ends in B -> B
  h.reader.push(stream.slice(0, 16 + HEADER), f1);
  h.reader.push(stream.slice(16 + HEADER, 3000), f2);
  h.reader.push(stream.slice(3000, pEnd), f3);
  h.reader.push(stream.slice(pEnd), f4);
  assert.equal(h.frames.length, 3);
  assert.deepEqual(h.frames[0]!.fds, []);
  assert.deepEqual(h.frames[1]!.fds, [...f1, ...f2, ...f3]);
  assert.deepEqual(h.frames[2]!.fds, f4);
  closeDelivered(h);
  assert.equal(openFdCount(), before);
});

test('fds with a chunk that ends past a placed frame go to the next frame; in-place reads carry fds too', () => {
  const before = openFdCount();
  const P = mkFrame(6000, 2);
  const Q = mkFrame(5000, 3);
  const stream = concat(P, Q);
  const h = harness();
  const f1 = fds(1);
  const f2 = fds(1);
  const f3 = fds(3);
  h.reader.push(stream.slice(0, 500), f1);
  // An in-place read into P's target, with fds.
  const t = h.reader.readTarget()!;
  t.set(stream.subarray(500, 1500));
  h.reader.push(t.subarray(0, 1000), f2);
  // The rest of P and the start of Q in one chunk: its fds belong to Q.
  h.reader.push(stream.slice(1500, 6000 + 50), f3);
  assert.equal(h.frames.length, 1);
  assert.deepEqual(h.frames[0]!.fds, [...f1, ...f2]);
  h.reader.push(stream.slice(6000 + 50));
  assert.equal(h.frames.length, 2);
  assert.deepEqual(h.frames[1]!.fds, f3);
  assert.ok(Buffer.from(h.frames[0]!.placed!).equals(Buffer.from(P.subarray(HEADER))));
  assert.ok(Buffer.from(h.frames[1]!.placed!).equals(Buffer.from(Q.subarray(HEADER))));
  closeDelivered(h);
  assert.equal(openFdCount(), before);
});

test('fds of a dropped placement still come with its frame', () => {
  const before = openFdCount();
  const P = mkFrame(6000, 2);
  const h = harness();
  const f1 = fds(2);
  const f2 = fds(1);
  h.reader.push(P.slice(0, 100), f1);
  h.reader.dropPlacement(h.places[0]!.target!);
  h.reader.push(P.slice(100), f2);
  assert.equal(h.frames.length, 1);
  assert.equal(h.frames[0]!.placed!.length, 0);
  assert.deepEqual(h.frames[0]!.fds, [...f1, ...f2]);
  closeDelivered(h);
  assert.equal(openFdCount(), before);
});

// ---------------------------------------------------------------------------
// 10. retainsLastChunk
// ---------------------------------------------------------------------------

test('retainsLastChunk: false when every byte was placed or copied, true when a view was handed out or bytes remain', () => {
  const P = mkFrame(5000, 1);
  const Q = mkFrame(4500, 2);
  const s = mkFrame(20, 3);
  const h = harness();

  // A whole placed frame in one chunk.
  h.reader.push(P.slice());
  assert.equal(h.reader.retainsLastChunk, false, 'whole placed frame');

  // A small frame, delivered as a view.
  const sc = s.slice();
  h.reader.push(sc);
  assert.equal(h.frames.at(-1)!.ref.buffer, sc.buffer);
  assert.equal(h.reader.retainsLastChunk, true, 'small frame handed out as a view');

  // A partial header stays buffered.
  h.reader.push(s.slice(0, 3));
  assert.equal(h.reader.retainsLastChunk, true, 'partial header buffered');

  // The rest of it: delivered as a copy of two chunks.
  h.reader.push(s.slice(3));
  assert.equal(h.frames.at(-1)!.bytes.length, 20);
  assert.equal(h.reader.retainsLastChunk, false, 'a small frame spanning chunks is a copy');

  // A placed frame's header alone, in one chunk: it is the frame's prefix as it is (a view), placement starts.
  const qHead = Q.slice(0, 8);
  h.reader.push(qHead);
  assert.equal(h.reader.retainsLastChunk, true, 'the chunk is the prefix');

  // Body bytes go into the target.
  h.reader.push(Q.slice(8, 2000));
  assert.equal(h.reader.retainsLastChunk, false, 'body bytes placed');

  // End of Q plus a partial header of the next frame: those bytes stay buffered.
  h.reader.push(concat(Q.subarray(2000), s.subarray(0, 5)));
  assert.equal(h.reader.retainsLastChunk, true, 'bytes of the next frame remain buffered');

  assert.equal(h.frames.at(-1)!.ref, qHead, 'the placed frame is the chunk that was its prefix');
  // Rest of s, spanning two chunks: delivered as a copy.
  h.reader.push(s.slice(5));
  assert.equal(h.frames.at(-1)!.bytes.length, 20);
  assert.equal(h.reader.retainsLastChunk, false, 'a frame spanning chunks is a copy');

  // A small frame then a whole placed frame in one chunk: the view was handed out.
  h.reader.push(concat(s, P));
  assert.equal(h.reader.retainsLastChunk, true, 'small view + placed frame');

  // A placed frame then a small frame: the small one is a view.
  h.reader.push(concat(P, s));
  assert.equal(h.reader.retainsLastChunk, true, 'placed frame + small view');

  assert.deepEqual(h.fatal, []);
  assert.equal(h.frames.length, 9);
});

test('retainsLastChunk: true while a placed frame\'s partial header is buffered', () => {
  const P = mkFrame(5000, 1);
  const h = harness({ placePrefix: 32 });
  h.reader.push(P.slice(0, 3));
  assert.equal(h.reader.retainsLastChunk, true, 'partial header');
  const h2 = harness({ placePrefix: 32 });
  h2.reader.push(P.slice(0, 20));
  assert.equal(h2.reader.retainsLastChunk, true, 'header, partial prefix');
  assert.equal(h2.places.length, 0);
});

test('retainsLastChunk: true while a declined (null) frame is buffered; false after its copy is delivered', () => {
  const P = mkFrame(5000, 1);
  const h = harness({}, () => null);
  h.reader.push(P.slice(0, 2000));
  assert.equal(h.reader.retainsLastChunk, true, 'buffered');
  h.reader.push(P.slice(2000));
  assert.equal(h.frames.length, 1);
  assert.equal(h.reader.retainsLastChunk, false, 'delivered as a copy of two chunks');
  h.reader.push(P.slice());
  assert.equal(h.reader.retainsLastChunk, true, 'delivered as a view of one chunk');
});

test('retainsLastChunk: false after a dropped placement discards the chunk', () => {
  const P = mkFrame(5000, 1);
  const h = harness();
  h.reader.push(P.slice(0, 100));
  h.reader.dropPlacement(h.places[0]!.target!);
  h.reader.push(P.slice(100, 4000));
  assert.equal(h.reader.retainsLastChunk, false);
  h.reader.push(P.slice(4000));
  assert.equal(h.reader.retainsLastChunk, false);
  assert.equal(h.frames.length, 1);
});

test('thousands of placed frames in one chunk: handled in a loop, not by recursion', () => {
  const frames = Array.from({ length: 3000 }, (_, i) => mkFrame(4096, i & 0xffff));
  const stream = concat(...frames);
  const h = harness();
  assert.doesNotThrow(() => h.reader.push(stream));
  assert.deepEqual(h.fatal, []);
  assert.equal(h.frames.length, 3000);
  for (const i of [0, 1, 1500, 2999]) {
    assert.ok(Buffer.from(h.frames[i]!.placed!).equals(Buffer.from(frames[i]!.subarray(HEADER))), `frame ${i}`);
  }
  assert.equal(h.reader.buffered, 0);
  assert.equal(h.reader.retainsLastChunk, false);
});

test('after a large frame the reader asks for just the next prefix, so a large next frame is read in place', () => {
  const big = 300 * 1024; // >= bigFrameSize (256 KiB by default)
  const A = mkFrame(big, 1);
  const B = mkFrame(big, 2);
  const C = mkFrame(20, 3);
  const h = harness();
  const feed = (src: Uint8Array, from: number): number => {
    // Reads as a socket would: into readTarget() when there is one, else a 64 KiB chunk.
    const t = h.reader.readTarget();
    const n = Math.min(t ? t.length : 65536, src.length - from);
    if (t) {
      t.set(src.subarray(from, from + n));
      h.reader.push(t.subarray(0, n));
    } else {
      h.reader.push(src.slice(from, from + n));
    }
    return n;
  };
  const stream = concat(A, B, C);
  let at = 0;
  const targets: number[] = [];
  while (at < stream.length) {
    const t = h.reader.readTarget();
    targets.push(t ? t.length : -1);
    at += feed(stream, at);
  }
  assert.deepEqual(h.fatal, []);
  assert.equal(h.frames.length, 3);
  // A: a pooled read, then the rest of its target; then an 8-byte prefix read for B and B's whole
  // target; after B (large) again a prefix read, which brings C's header; then the pool.
  assert.deepEqual(targets, [-1, big - 65536, HEADER, big - HEADER, HEADER, -1], `reads: ${targets.join(',')}`);
  assert.ok(Buffer.from(h.frames[1]!.placed!).equals(Buffer.from(B.subarray(HEADER))));
  assert.deepEqual(h.frames[2]!.bytes, [...C]);
  // After a small frame, reads come from the pool again.
  assert.equal(h.reader.readTarget(), null);
});
