/**
 * FrameReader driven the way UnixSocket drives it, with random read sizes:
 * reads into readTarget() (reported by pushTarget, as the socket's
 * targetRead does, or by push() of a view, as a plain 'data' listener
 * would), tails into a pool chunk (readTail), ordinary pool reads, and pool
 * memory reused whenever retainsLastChunk says nothing kept the last chunk.
 * The stream mixes small frames, placed frames (some declined), and frames
 * large enough for a buffer of their own. Expected bytes come from the
 * test's own pattern, not from the reader.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { FrameReader } from '../src/wire/reader.js';

const HEADER = 8;
const PREFIX = 16;
const BIG = 20_000; // bigFrameSize
const POOL = 64 * 1024;

/** xorshift32: the same sequence for a seed on every run. */
function rng(seed: number): (n: number) => number {
  let x = seed >>> 0 || 1;
  return (n: number) => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x % n;
  };
}

/** A frame: u32 size, u8 kind (0 small, 1 placed, 2 declined, 3 big), u8 tag, then a pattern of the tag. */
function mkFrame(size: number, kind: number, tag: number): Uint8Array {
  const f = new Uint8Array(size);
  f[0] = size & 0xff;
  f[1] = (size >>> 8) & 0xff;
  f[2] = (size >>> 16) & 0xff;
  f[3] = 0;
  f[4] = kind;
  f[5] = tag;
  for (let i = 6; i < size; i++) f[i] = (i * 31 + tag * 7 + kind) & 0xff;
  return f;
}

interface Got {
  frame: Uint8Array;
  placed: Uint8Array | undefined;
}

function runSeed(seed: number, viaPushTarget: boolean): void {
  const r = rng(seed);
  // The stream.
  const frames: Uint8Array[] = [];
  for (let i = 0; i < 120; i++) {
    const kind = r(4);
    const size =
      kind === 0 ? HEADER + r(300) : kind === 3 ? BIG + r(30_000) : 4096 + r(36_000); // placed / declined: at least placeMinSize, some past 16 KiB
    frames.push(mkFrame(size, kind, i & 0xff));
  }
  const stream = new Uint8Array(frames.reduce((s, f) => s + f.length, 0));
  let o = 0;
  for (const f of frames) {
    stream.set(f, o);
    o += f.length;
  }
  // Placed frames get a target of their own (kept, to check afterwards).
  const targets: Uint8Array[] = [];
  const got: Got[] = [];
  const reader = new FrameReader(
    {
      headerSize: HEADER,
      frameSize: (h) => h[0]! | (h[1]! << 8) | (h[2]! << 16),
      maxFrameSize: 1 << 20,
      bigFrameSize: BIG,
      placePrefix: PREFIX,
      place: (prefix, size) => {
        assert.equal(prefix.length, PREFIX);
        if (prefix[4] !== 1) return null;
        const t = new Uint8Array(size - PREFIX);
        targets.push(t);
        return t;
      },
    },
    {
      frame: (frame, fds, placed) => {
        assert.deepEqual(fds, []);
        got.push({ frame, placed });
      },
      oversized: () => false,
      fatal: (why) => assert.fail(`seed ${seed}: ${why}`),
    },
  );
  // The socket.
  let pool = new Uint8Array(POOL);
  let poolAt = 0;
  let at = 0; // stream bytes read so far
  const take = (dst: Uint8Array, dstAt: number, max: number): number => {
    const n = Math.min(max, stream.length - at);
    dst.set(stream.subarray(at, at + n), dstAt);
    at += n;
    return n;
  };
  while (at < stream.length) {
    const target = reader.readTarget();
    if (target) {
      assert.ok(target.length > 0);
      // A short read now and then, as when the peer's write is not all in yet.
      const n = take(target, 0, r(4) === 0 ? 1 + r(target.length) : target.length);
      const tailWant = n === target.length ? Math.min(reader.readTail(), r(3) === 0 ? r(PREFIX + 1) : PREFIX) : 0;
      if (viaPushTarget) reader.pushTarget(n);
      else reader.push(target.subarray(0, n));
      if (tailWant > 0 && at < stream.length) {
        if (POOL - poolAt < tailWant) {
          pool = new Uint8Array(POOL);
          poolAt = 0;
        }
        const m = take(pool, poolAt, tailWant);
        reader.push(pool.subarray(poolAt, poolAt + m));
        if (reader.retainsLastChunk) poolAt += m;
      }
    } else {
      const want = 1 + r(r(2) === 0 ? 64 : 40_000);
      if (POOL - poolAt < want) {
        pool = new Uint8Array(POOL);
        poolAt = 0;
      }
      const m = take(pool, poolAt, want);
      reader.push(pool.subarray(poolAt, poolAt + m));
      if (reader.retainsLastChunk) poolAt += m; // else the same memory takes the next read
    }
  }
  // Every frame, in order, with the right bytes: checked after all pool reuse, so a frame handed
  // out as a view of memory the socket then reused would show here.
  assert.equal(got.length, frames.length, `seed ${seed}: frames delivered`);
  assert.equal(reader.buffered, 0);
  let t = 0;
  for (let i = 0; i < frames.length; i++) {
    const f = frames[i]!;
    const g = got[i]!;
    const what = `seed ${seed} frame ${i} (kind ${f[4]}, ${f.length} bytes)`;
    if (f[4] === 1) {
      const target = targets[t++]!;
      assert.equal(g.placed, target, what);
      assert.equal(g.frame.length, PREFIX, what);
      assert.ok(Buffer.from(g.frame).equals(Buffer.from(f.subarray(0, PREFIX))), `${what}: prefix`);
      assert.ok(Buffer.from(target).equals(Buffer.from(f.subarray(PREFIX))), `${what}: payload`);
    } else {
      assert.equal(g.placed, undefined, what);
      assert.ok(Buffer.from(g.frame).equals(Buffer.from(f)), `${what}: bytes`);
    }
  }
  assert.equal(t, targets.length);
}

test('FrameReader under random reads, targets reported by pushTarget (the socket targetRead path): every frame intact', () => {
  for (let seed = 1; seed <= 60; seed++) runSeed(seed, true);
});

test('FrameReader under random reads, targets reported by push() of a view: every frame intact', () => {
  for (let seed = 1001; seed <= 1060; seed++) runSeed(seed, false);
});
