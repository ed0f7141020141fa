import { test } from 'node:test';
import assert from 'node:assert/strict';
import { FrameReader, type FrameSpec } from '../src/wire/reader.js';
import { EventFd, type Fd } from '../src/sys/index.js';
import { openFdCount } from './helpers/sys.js';

/** Test framing: a u32 little-endian total size, then the body. */
const spec: FrameSpec = {
  headerSize: 4,
  frameSize: (h) => h[0]! | (h[1]! << 8) | (h[2]! << 16) | (h[3]! * 2 ** 24),
  maxFrameSize: 64,
};

function frame(body: number[]): number[] {
  const n = body.length + 4;
  return [n & 0xff, (n >> 8) & 0xff, (n >> 16) & 0xff, n >>> 24, ...body];
}

function collector(onOversize: (size: number) => boolean = () => false) {
  const frames: number[][] = [];
  const fdCounts: number[] = [];
  const fatal: string[] = [];
  const oversized: number[] = [];
  const reader = new FrameReader(spec, {
    frame(f, fds) {
      frames.push([...f]);
      fdCounts.push(fds.length);
      for (const fd of fds) fd.close();
    },
    oversized(_h, size) {
      oversized.push(size);
      return onOversize(size);
    },
    fatal(reason) {
      fatal.push(reason);
    },
  });
  return { reader, frames, fdCounts, fatal, oversized };
}

const fds = (n: number): Fd[] => Array.from({ length: n }, () => EventFd.create().fd);

test('frames split at every offset come out whole and in order', () => {
  const stream = [...frame([1, 2, 3]), ...frame([]), ...frame([9, 9, 9, 9, 9, 9, 9, 9, 9, 9])];
  for (let a = 0; a <= stream.length; a++) {
    for (let b = a; b <= stream.length; b++) {
      const { reader, frames, fatal } = collector();
      reader.push(Uint8Array.from(stream.slice(0, a)));
      reader.push(Uint8Array.from(stream.slice(a, b)));
      reader.push(Uint8Array.from(stream.slice(b)));
      assert.deepEqual(frames, [frame([1, 2, 3]), frame([]), frame([9, 9, 9, 9, 9, 9, 9, 9, 9, 9])], `split ${a}/${b}`);
      assert.deepEqual(fatal, []);
      assert.equal(reader.buffered, 0);
    }
  }
});

test('a frame inside one chunk is a view, not a copy', () => {
  const chunk = Uint8Array.from([...frame([5, 6]), ...frame([7])]);
  const views: Uint8Array[] = [];
  const r = new FrameReader(spec, { frame: (f) => views.push(f), oversized: () => false, fatal: () => {} });
  r.push(chunk);
  assert.equal(views.length, 2);
  assert.equal(views[0]!.buffer, chunk.buffer);
  assert.equal(views[1]!.byteOffset, chunk.byteOffset + 6);
});

test('fds go to the frame holding the last byte of the chunk that carried them', () => {
  const before = openFdCount();
  const { reader, frames, fdCounts } = collector();
  // One chunk: frame A whole, and the start of frame B; its 2 fds belong to B.
  const a = frame([1]);
  const b = frame([2, 2, 2]);
  const c = frame([3]);
  reader.push(Uint8Array.from([...a, ...b.slice(0, 2)]), fds(2));
  reader.push(Uint8Array.from(b.slice(2)));
  reader.push(Uint8Array.from(c), fds(1));
  assert.deepEqual(frames, [a, b, c]);
  assert.deepEqual(fdCounts, [0, 2, 1]);
  assert.equal(openFdCount(), before);
});

test('an oversized frame is skipped without buffering its body, and its fds are closed', () => {
  const before = openFdCount();
  const { reader, frames, oversized, fatal, fdCounts } = collector(() => true);
  const big = frame(Array(100).fill(1));
  const after = frame([4, 4]);
  reader.push(Uint8Array.from(big.slice(0, 10)), fds(3));
  assert.deepEqual(oversized, [104]);
  assert.equal(reader.buffered, 0, 'body bytes are not kept');
  reader.push(Uint8Array.from(big.slice(10, 60)));
  assert.equal(reader.buffered, 0);
  reader.push(Uint8Array.from([...big.slice(60), ...after]));
  assert.deepEqual(frames, [after]);
  assert.deepEqual(fdCounts, [0]);
  assert.deepEqual(fatal, []);
  assert.equal(openFdCount(), before);
});

test('an oversized frame that is not skipped stops the reader', () => {
  const before = openFdCount();
  const { reader, fatal } = collector(() => false);
  reader.push(Uint8Array.from(frame(Array(100).fill(1)).slice(0, 8)), fds(2));
  assert.equal(fatal.length, 1);
  assert.equal(reader.stopped, true);
  reader.push(Uint8Array.from([1, 2, 3]), fds(1));
  assert.equal(openFdCount(), before);
});

test('a header announcing less than a header is fatal', () => {
  const { reader, fatal, frames } = collector();
  reader.push(Uint8Array.from([2, 0, 0, 0, 1, 1]));
  assert.equal(frames.length, 0);
  assert.match(fatal[0]!, /invalid size 2/);
});

test('close releases buffered fds', () => {
  const before = openFdCount();
  const { reader } = collector();
  reader.push(Uint8Array.from(frame([1, 2, 3]).slice(0, 5)), fds(4));
  reader.close();
  assert.equal(openFdCount(), before);
});

test('large frames are gathered in a buffer of their own, also when the socket reads straight into it', () => {
  const bigSpec: FrameSpec = { ...spec, maxFrameSize: 1 << 20, bigFrameSize: 64 * 1024 };
  const body = (n: number, v: number): number[] => Array.from({ length: n }, (_, i) => (i * 7 + v) & 0xff);
  const a = frame(body(100_000, 1));
  const b = frame([9, 9]);
  const c = frame(body(70_000, 3));
  const stream = Uint8Array.from([...a, ...b, ...c]);
  for (const inPlace of [false, true]) {
    for (const step of [1000, 4096, 65536, 99_999, 170_011]) {
      const before = openFdCount();
      const frames: number[][] = [];
      const fdCounts: number[] = [];
      const r = new FrameReader(bigSpec, {
        frame: (f, fds) => {
          frames.push([f.length, f[4]!, f[f.length - 1]!]);
          fdCounts.push(fds.length);
          fds.forEach((x) => x.close());
        },
        oversized: () => false,
        fatal: (why) => assert.fail(why),
      });
      let at = 0;
      let n = 0;
      while (at < stream.length) {
        const target = inPlace ? r.readTarget() : null;
        const len = Math.min(step, stream.length - at, target ? target.length : Infinity);
        let chunk: Uint8Array;
        if (target) {
          target.set(stream.subarray(at, at + len));
          chunk = target.subarray(0, len);
        } else chunk = stream.slice(at, at + len);
        // fds with the chunk that starts frame c
        const fds = at <= a.length + b.length && a.length + b.length < at + len ? [EventFd.create().fd] : [];
        r.push(chunk, fds);
        at += len;
        n++;
      }
      assert.deepEqual(frames, [[a.length, a[4], a[a.length - 1]], [b.length, 9, 9], [c.length, c[4], c[c.length - 1]]], `step ${step} inPlace ${inPlace}`);
      assert.equal(fdCounts.reduce((x, y) => x + y, 0), 1);
      assert.ok(n > 0);
      assert.equal(openFdCount(), before);
    }
  }
});
