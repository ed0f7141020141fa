import { test } from 'node:test';
import assert from 'node:assert/strict';
import { DmaMapTable, VfioError } from '../src/vfio/index.js';
import type { DmaRegion } from '../src/vfio/index.js';

const R = 1;
const W = 2;
const RW = R | W;
const K = 0x1000;

function rejects(fn: () => unknown, code: string, errno: number): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof VfioError, `expected VfioError, got ${String(err)}`);
    assert.equal(err.code, code);
    assert.equal(err.errno, errno);
    return true;
  });
}

function table(opts: ConstructorParameters<typeof DmaMapTable<string>>[0] = {}): DmaMapTable<string> {
  return new DmaMapTable<string>(opts);
}

test('map: alignment, size, flags and range rules', () => {
  const t = table();
  rejects(() => t.map({ iova: 0x1800, size: K, prot: RW, offset: 0, handle: 'a' }), 'DMA_MAP_UNALIGNED', 22);
  rejects(() => t.map({ iova: K, size: 0x1800, prot: RW, offset: 0, handle: 'a' }), 'DMA_MAP_UNALIGNED', 22);
  rejects(() => t.map({ iova: K, size: K, prot: RW, offset: 0x10, handle: 'a' }), 'DMA_MAP_UNALIGNED', 22);
  rejects(() => t.map({ iova: K, size: 0, prot: RW, offset: 0, handle: 'a' }), 'DMA_MAP_EMPTY', 22);
  rejects(() => t.map({ iova: K, size: K, prot: 4, offset: 0, handle: 'a' }), 'DMA_MAP_BAD_FLAGS', 22);
  rejects(() => t.map({ iova: 2 ** 53 - K, size: 2 * K, prot: RW, offset: 0, handle: 'a' }), 'DMA_RANGE_OVERFLOW', 22);
  rejects(() => t.map({ iova: 2 ** 64, size: K, prot: RW, offset: 0, handle: 'a' }), 'DMA_BAD_RANGE', 22);
  assert.equal(t.map({ iova: K, size: K, prot: 0, offset: 0, handle: 'a' }).added, true); // libvfio-user accepts prot 0
  rejects(() => table({ requireProt: true }).map({ iova: K, size: K, prot: 0, offset: 0, handle: 'a' }), 'DMA_MAP_NO_PROT', 22);
  const loose = table({ pageSize: 1 });
  assert.equal(loose.map({ iova: 3, size: 5, prot: R, offset: 7, handle: 'a' }).added, true);
  const big = table({ pageSize: 0x10000 });
  rejects(() => big.map({ iova: 0x10000, size: K, prot: R, offset: 0, handle: 'a' }), 'DMA_MAP_UNALIGNED', 22);
  assert.throws(() => table({ pageSize: 3000 }), RangeError);
});

test('map: overlap is EEXIST (spec) or EINVAL (libvfio-user); adjacent is fine', () => {
  for (const [style, errno] of [['spec', 17], ['libvfio-user', 22]] as const) {
    const t = table({ errnoStyle: style });
    t.map({ iova: 0x10 * K, size: 0x10 * K, prot: RW, offset: 0, handle: 'a' });
    rejects(() => t.map({ iova: 0x18 * K, size: 0x10 * K, prot: RW, offset: 0, handle: 'b' }), 'DMA_MAP_OVERLAP', errno);
    rejects(() => t.map({ iova: 0x8 * K, size: 0x9 * K, prot: RW, offset: 0, handle: 'b' }), 'DMA_MAP_OVERLAP', errno);
    rejects(() => t.map({ iova: 0, size: 0x100 * K, prot: RW, offset: 0, handle: 'b' }), 'DMA_MAP_OVERLAP', errno);
    rejects(() => t.map({ iova: 0x11 * K, size: K, prot: RW, offset: 0, handle: 'b' }), 'DMA_MAP_OVERLAP', errno);
    t.map({ iova: 0x20 * K, size: K, prot: R, offset: 0, handle: 'c' });
    t.map({ iova: 0xf * K, size: K, prot: R, offset: 0, handle: 'd' });
    assert.deepEqual(t.regions().map((r) => r.handle), ['d', 'a', 'c']);
  }
});

test('map: the identical mapping again is accepted and changes nothing', () => {
  const t = table();
  const first = t.map({ iova: 0x10 * K, size: 4 * K, prot: RW, offset: 8 * K, handle: 'fd' });
  const again = t.map({ iova: 0x10 * K, size: 4 * K, prot: RW, offset: 8 * K, handle: 'fd' });
  assert.equal(first.added, true);
  assert.equal(again.added, false);
  assert.deepEqual(again.region, first.region);
  assert.equal(t.size, 1);
  rejects(() => t.map({ iova: 0x10 * K, size: 4 * K, prot: R, offset: 8 * K, handle: 'fd' }), 'DMA_MAP_OVERLAP', 17);
  rejects(() => t.map({ iova: 0x10 * K, size: 4 * K, prot: RW, offset: 0, handle: 'fd' }), 'DMA_MAP_OVERLAP', 17);
  rejects(() => t.map({ iova: 0x10 * K, size: 4 * K, prot: RW, offset: 8 * K, handle: 'other' }), 'DMA_MAP_OVERLAP', 17);
  const byFile = new DmaMapTable<{ file: string }>({ sameHandle: (a, b) => (a as { file: string }).file === (b as { file: string }).file });
  byFile.map({ iova: 0, size: K, prot: R, offset: 0, handle: { file: 'x' } });
  assert.equal(byFile.map({ iova: 0, size: K, prot: R, offset: 0, handle: { file: 'x' } }).added, false);
});

test('map: max maps and max size', () => {
  const t = table({ maxMaps: 2 });
  t.map({ iova: 0, size: K, prot: R, offset: 0, handle: 'a' });
  t.map({ iova: K, size: K, prot: R, offset: 0, handle: 'b' });
  rejects(() => t.map({ iova: 2 * K, size: K, prot: R, offset: 0, handle: 'c' }), 'DMA_MAP_LIMIT', 28);
  assert.equal(t.map({ iova: K, size: K, prot: R, offset: 0, handle: 'b' }).added, false); // identical re-map still fine
  const lv = table({ maxMaps: 1, errnoStyle: 'libvfio-user' });
  lv.map({ iova: 0, size: K, prot: R, offset: 0, handle: 'a' });
  rejects(() => lv.map({ iova: K, size: K, prot: R, offset: 0, handle: 'b' }), 'DMA_MAP_LIMIT', 22);
  const small = table({ maxMapSize: 4 * K });
  small.map({ iova: 0, size: 4 * K, prot: R, offset: 0, handle: 'a' });
  rejects(() => small.map({ iova: 8 * K, size: 8 * K, prot: R, offset: 0, handle: 'b' }), 'DMA_MAP_TOO_LARGE', 28);
  rejects(() => table().map({ iova: 0, size: 16 * 2 ** 40, prot: R, offset: 0, handle: 'a' }), 'DMA_MAP_TOO_LARGE', 28);
});

test('unmap: exact match only, listeners told of each removal', () => {
  const t = table();
  const seen: DmaRegion<string>[] = [];
  const off = t.onUnmap((r) => seen.push(r));
  t.map({ iova: 0x10 * K, size: 4 * K, prot: RW, offset: 0, handle: 'a' });
  t.map({ iova: 0x20 * K, size: 4 * K, prot: RW, offset: 0, handle: 'b' });
  rejects(() => t.unmap(0x10 * K, 2 * K), 'DMA_UNMAP_NOT_FOUND', 2);
  rejects(() => t.unmap(0x11 * K, 3 * K), 'DMA_UNMAP_NOT_FOUND', 2);
  rejects(() => t.unmap(0x10 * K, 0x14 * K), 'DMA_UNMAP_NOT_FOUND', 2);
  rejects(() => t.unmap(0x40 * K, 4 * K), 'DMA_UNMAP_NOT_FOUND', 2);
  assert.equal(seen.length, 0);
  const removed = t.unmap(0x10 * K, 4 * K);
  assert.deepEqual(removed.map((r) => r.handle), ['a']);
  assert.deepEqual(seen.map((r) => r.handle), ['a']);
  assert.equal(t.find(0x10 * K), undefined);
  off();
  t.unmap(0x20 * K, 4 * K);
  assert.equal(seen.length, 1);
  assert.equal(t.size, 0);
});

test('unmap: UNMAP_ALL needs iova and size 0; other flags are rejected', () => {
  const t = table();
  const seen: string[] = [];
  t.onUnmap((r) => seen.push(r.handle));
  t.map({ iova: 0, size: K, prot: R, offset: 0, handle: 'a' });
  t.map({ iova: 4 * K, size: K, prot: R, offset: 0, handle: 'b' });
  rejects(() => t.unmap(0, K, 2), 'DMA_UNMAP_ALL_RANGE', 22);
  rejects(() => t.unmap(K, 0, 2), 'DMA_UNMAP_ALL_RANGE', 22);
  rejects(() => t.unmap(0, K, 1), 'DMA_UNMAP_BAD_FLAGS', 22);
  rejects(() => t.unmap(0, K, 4), 'DMA_UNMAP_BAD_FLAGS', 22);
  assert.deepEqual(t.unmap(0, 0, 2).map((r) => r.handle), ['a', 'b']);
  assert.deepEqual(seen, ['a', 'b']);
  assert.equal(t.size, 0);
  assert.deepEqual(t.unmap(0, 0, 2), []);
});

test('unmap: a throwing listener does not stop the others', () => {
  const t = table();
  const seen: string[] = [];
  t.onUnmap(() => {
    throw new Error('boom');
  });
  t.onUnmap((r) => seen.push(r.handle));
  t.map({ iova: 0, size: K, prot: R, offset: 0, handle: 'a' });
  assert.throws(() => t.unmap(0, K), /boom/);
  assert.deepEqual(seen, ['a']);
  assert.equal(t.size, 0);
});

test('lookup: across adjacent mappings, never partial, prot checked', () => {
  const t = table();
  t.map({ iova: 0x10 * K, size: 4 * K, prot: RW, offset: 0x100 * K, handle: 'a' });
  t.map({ iova: 0x14 * K, size: 4 * K, prot: R, offset: 0, handle: 'b' });
  t.map({ iova: 0x20 * K, size: 4 * K, prot: RW, offset: 0, handle: 'c' });
  const segs = t.lookup(0x13 * K + 0x10, 2 * K);
  assert.deepEqual(
    segs.map((s) => ({ h: s.region.handle, iova: s.iova, length: s.length, regionOffset: s.regionOffset, fileOffset: s.fileOffset })),
    [
      { h: 'a', iova: 0x13010, length: 0xff0, regionOffset: 0x3010, fileOffset: 0x103010 },
      { h: 'b', iova: 0x14000, length: 0x1010, regionOffset: 0, fileOffset: 0 },
    ],
  );
  rejects(() => t.lookup(0x17 * K, 2 * K), 'DMA_NOT_MAPPED', 2); // runs off the end of b into a gap
  rejects(() => t.lookup(0x1f * K, 2 * K), 'DMA_NOT_MAPPED', 2); // starts in a gap
  rejects(() => t.lookup(0x30 * K, 1), 'DMA_NOT_MAPPED', 2);
  rejects(() => t.lookup(0x13 * K, 2 * K, W), 'DMA_ACCESS', 13); // b is read-only
  assert.deepEqual(t.lookup(0x20 * K, 0), []);
  assert.equal(t.lookup(0x23 * K, K, RW)[0]?.length, K);
  const one = t.translate(0x21 * K + 8, 16, W);
  assert.deepEqual({ h: one.region.handle, off: one.regionOffset }, { h: 'c', off: K + 8 });
  rejects(() => t.translate(0x13 * K, 2 * K), 'DMA_NOT_MAPPED', 2); // spans two mappings
  rejects(() => t.translate(0x15 * K, 8, W), 'DMA_ACCESS', 13);
  assert.equal(t.find(0x17 * K + 0xfff)?.handle, 'b');
  assert.equal(t.find(0x18 * K), undefined);
});

/** Reads bit i of a report the way the kernel defines it: bit i of the u64 array, LSB first. */
function bitsSet(bitmap: Uint8Array): number[] {
  const out: number[] = [];
  const v = new DataView(bitmap.buffer, bitmap.byteOffset, bitmap.byteLength);
  for (let w = 0; w < bitmap.length / 8; w++) {
    const word = v.getBigUint64(w * 8, true);
    for (let b = 0; b < 64; b++) if ((word >> BigInt(b)) & 1n) out.push(w * 64 + b);
  }
  return out;
}

test('dirty: bits for specific pages, cleared by the report', () => {
  const t = table();
  const base = 0x10 * K;
  t.map({ iova: base, size: 0x10 * K, prot: RW, offset: 0, handle: 'a' });
  t.markDirty(base, K); // logging off: nothing recorded
  t.startLogging(4096);
  t.markDirty(base + 3 * K, 1);
  t.markDirty(base + 6 * K - 1, 2); // straddles pages 5 and 6
  const r = t.report(base, 0x10 * K, 4096);
  assert.deepEqual(r, Uint8Array.of(0x68, 0, 0, 0, 0, 0, 0, 0));
  assert.deepEqual(bitsSet(r), [3, 5, 6]);
  assert.deepEqual(bitsSet(t.report(base, 0x10 * K, 4096)), []);
  t.markDirty(base + 3 * K, 1);
  t.markDirty(base + 5 * K, 2 * K);
  assert.deepEqual(bitsSet(t.report(base, 0x10 * K, 8192)), [1, 2, 3]);
  assert.deepEqual(t.report(base, 0x10 * K, 8192).length, 8);
});

test('dirty: bitmaps past 64 pages, across mappings and gaps, bits outside the range stay 0', () => {
  const t = table();
  t.startLogging(4096);
  t.map({ iova: 0, size: 0x100 * K, prot: RW, offset: 0, handle: 'a' }); // mapped while logging
  t.map({ iova: 0x200 * K, size: 0x10 * K, prot: RW, offset: 0, handle: 'b' });
  t.markDirty(70 * K, 1);
  t.markDirty(0x200 * K, 1);
  t.markDirty(0x180 * K, K); // unmapped: ignored
  const r = t.report(0, 0x210 * K, 4096);
  assert.equal(r.length, Math.ceil(0x210 / 64) * 8);
  assert.equal(r[8], 1 << 6);
  assert.deepEqual(bitsSet(r), [70, 0x200]);
  t.markDirty(0, 0x100 * K);
  const part = t.report(0x10 * K, 3 * K, 4096);
  assert.deepEqual(bitsSet(part), [0, 1, 2]);
  assert.equal(part.length, 8);
});

test('dirty: pages straddling the edge of the report are reported but stay dirty', () => {
  const t = table();
  const base = 0x10 * K;
  t.map({ iova: base, size: 4 * K, prot: RW, offset: 0, handle: 'a' });
  t.startLogging(4096);
  t.markDirty(base, 1);
  assert.deepEqual(bitsSet(t.report(base + 0x800, K, 4096)), [0]);
  assert.deepEqual(bitsSet(t.report(base, 4 * K, 4096)), [0]);
  assert.deepEqual(bitsSet(t.report(base, 4 * K, 4096)), []);
});

test('dirty: start/stop and report rules', () => {
  const t = table();
  t.map({ iova: 0, size: 4 * K, prot: RW, offset: 0, handle: 'a' });
  rejects(() => t.report(0, 4 * K, 4096), 'DMA_LOG_NOT_STARTED', 22);
  rejects(() => t.startLogging(2048), 'DMA_LOG_BAD_PAGE_SIZE', 22);
  rejects(() => t.startLogging(12288), 'DMA_LOG_BAD_PAGE_SIZE', 22);
  t.startLogging(8192);
  t.startLogging(8192);
  rejects(() => t.startLogging(4096), 'DMA_LOG_PAGE_SIZE_CHANGED', 22);
  assert.equal(t.loggingPageSize, 8192);
  rejects(() => t.report(0, 4 * K, 1000), 'DMA_LOG_BAD_PAGE_SIZE', 22);
  rejects(() => t.report(0, 4 * K, 1024), 'DMA_LOG_BAD_PAGE_SIZE', 22);
  rejects(() => t.report(2 ** 53 - K, 2 * K, 4096), 'DMA_RANGE_OVERFLOW', 75);
  rejects(() => table({ maxBitmapBytes: 8 }).report(0, 0, 4096), 'DMA_LOG_NOT_STARTED', 22);
  const capped = table({ maxBitmapBytes: 8 });
  capped.startLogging(4096);
  rejects(() => capped.report(0, 65 * K, 4096), 'DMA_BITMAP_TOO_LARGE', 7);
  t.markDirty(K, 1);
  assert.deepEqual(bitsSet(t.report(0, 4 * K, 4096)), [0, 1]); // one 8 KiB logged page, two 4 KiB report bits
  t.stopLogging();
  t.stopLogging();
  assert.equal(t.loggingPageSize, 0);
  rejects(() => t.report(0, 4 * K, 4096), 'DMA_LOG_NOT_STARTED', 22);
});

test('property: random map/unmap/lookup sequences agree with a naive model', () => {
  let seed = 0x1234_5678;
  const rnd = (n: number): number => {
    seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
    return (seed >>> 8) % n;
  };
  const t = table({ maxMaps: 40 });
  const model: { iova: number; size: number; handle: string }[] = [];
  const covering = (a: number): (typeof model)[number] | undefined => model.find((m) => m.iova <= a && a < m.iova + m.size);
  for (let step = 0; step < 3000; step++) {
    const iova = rnd(256) * K;
    const size = (1 + rnd(8)) * K;
    const op = rnd(3);
    if (op === 0) {
      const overlaps = model.some((m) => m.iova < iova + size && iova < m.iova + m.size);
      const full = model.length >= 40;
      try {
        t.map({ iova, size, prot: RW, offset: 0, handle: `h${step}` });
        assert.ok(!overlaps && !full, `step ${step}: map should have failed`);
        model.push({ iova, size, handle: `h${step}` });
      } catch (err) {
        assert.ok(err instanceof VfioError);
        assert.ok(overlaps || full, `step ${step}: unexpected ${err.code}`);
      }
    } else if (op === 1) {
      const pick = model.length > 0 && rnd(2) === 0 ? model[rnd(model.length)]! : { iova, size, handle: '' };
      const exact = model.findIndex((m) => m.iova === pick.iova && m.size === pick.size);
      try {
        t.unmap(pick.iova, pick.size);
        assert.ok(exact >= 0, `step ${step}: unmap should have failed`);
        model.splice(exact, 1);
      } catch (err) {
        assert.ok(err instanceof VfioError && err.errno === 2);
        assert.equal(exact, -1);
      }
    } else {
      const len = 1 + rnd(4 * K);
      let ok = true;
      for (let a = iova; a < iova + len; a += 0x100) if (!covering(a)) ok = false;
      if (!covering(iova + len - 1)) ok = false;
      try {
        const segs = t.lookup(iova, len);
        assert.ok(ok, `step ${step}: lookup should have failed`);
        assert.equal(segs.reduce((n, s) => n + s.length, 0), len);
        for (const s of segs) assert.equal(covering(s.iova)?.handle, s.region.handle);
      } catch (err) {
        assert.ok(err instanceof VfioError && err.errno === 2, String(err));
        assert.ok(!ok, `step ${step}: lookup failed unexpectedly`);
      }
    }
    assert.equal(t.size, model.length);
  }
});
