import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createDeviceQueue, GuestMemory, type DeviceQueue, type VirtioErrorCode } from '../src/virtio/index.js';
import { availBits, availPublish, INDIRECT, NEXT, packedDesc, splitDesc, throwsCode, WRITE } from './virtio-fixtures.test.js';

const N = 8;
const DESC = 0x1000;
const AVAIL = 0x2000;
const USEDR = 0x3000;
const T = 0x6000;
const MEM = 0x10000;
const GUARD = 0x1000;

/**
 * Guest memory of 64 KiB inside a larger buffer with guard bytes on both
 * sides: whatever the queue does, the guards must stay untouched.
 */
function guarded(indirect = true, packed = false) {
  const backing = new Uint8Array(GUARD + MEM + GUARD).fill(0x5a);
  const bytes = backing.subarray(GUARD, GUARD + MEM).fill(0);
  const memory = new GuestMemory();
  memory.add({ guestPhysAddr: 0, size: MEM, userAddr: 0x7f00_0000_0000, mmapOffset: 0 }, bytes);
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
  const q = (): DeviceQueue =>
    createDeviceQueue({ memory, size: N, packed, desc: DESC, driver: AVAIL, device: USEDR, eventIdx: true, indirect });
  const guardsIntact = (): boolean =>
    backing.subarray(0, GUARD).every((b) => b === 0x5a) && backing.subarray(GUARD + MEM).every((b) => b === 0x5a);
  return { dv, q, guardsIntact };
}

/** Pops once: the error code, the queue broken with it, later pops null, nothing written outside memory. */
function malformed(q: DeviceQueue, code: VirtioErrorCode, guardsIntact: () => boolean): void {
  const before = q.inFlight;
  throwsCode(() => q.pop(), code);
  assert.equal(q.broken?.code, code);
  assert.equal(q.pop(), null, 'a broken queue pops nothing');
  assert.equal(q.inFlight, before, 'the malformed chain is not in flight');
  assert.ok(guardsIntact(), 'no write outside guest memory');
}

/** One split case: `build` writes the descriptors, head 0 is made available. */
function splitCase(code: VirtioErrorCode, build: (dv: DataView) => void, indirect = true): void {
  const g = guarded(indirect);
  build(g.dv);
  availPublish(g.dv, AVAIL, N, 0);
  malformed(g.q(), code, g.guardsIntact);
}

test('split malformed: loops, indices, lengths, addresses', () => {
  splitCase('DESC_LOOP', (dv) => {
    splitDesc(dv, DESC, 0, 0x4000, 4, NEXT, 1);
    splitDesc(dv, DESC, 1, 0x4000, 4, NEXT, 0);
  });
  splitCase('DESC_LOOP', (dv) => splitDesc(dv, DESC, 0, 0x4000, 4, NEXT, 0));
  splitCase('DESC_INDEX', (dv) => splitDesc(dv, DESC, 0, 0x4000, 4, NEXT, N));
  splitCase('GPA_OUT_OF_RANGE', (dv) => splitDesc(dv, DESC, 0, MEM, 1, 0));
  splitCase('GPA_OUT_OF_RANGE', (dv) => splitDesc(dv, DESC, 0, MEM - 4, 8, WRITE));
  splitCase('GPA_OUT_OF_RANGE', (dv) => splitDesc(dv, DESC, 0, 2 ** 60, 8, 0));
  splitCase('GPA_OUT_OF_RANGE', (dv) => dv.setBigUint64(DESC, 0xffff_ffff_ffff_fff0n, true));
  splitCase('LENGTH_OVERFLOW', (dv) => {
    splitDesc(dv, DESC, 0, 0x4000, 0x10, NEXT | WRITE, 1);
    splitDesc(dv, DESC, 1, 0x4000, 0xffff_fff8, WRITE);
  });
  splitCase('WRITE_BEFORE_READ', (dv) => {
    splitDesc(dv, DESC, 0, 0x4000, 4, NEXT | WRITE, 1);
    splitDesc(dv, DESC, 1, 0x4100, 4, 0);
  });
  splitCase('WRITE_BEFORE_READ', (dv) => {
    splitDesc(dv, DESC, 0, 0x4000, 0, NEXT | WRITE, 1); // even a zero-length writable one
    splitDesc(dv, DESC, 1, 0x4100, 4, 0);
  });
});

test('split malformed: indirect tables', () => {
  splitCase('INDIRECT_NOT_NEGOTIATED', (dv) => splitDesc(dv, DESC, 0, T, 16, INDIRECT), false);
  splitCase('INDIRECT_LENGTH', (dv) => splitDesc(dv, DESC, 0, T, 0, INDIRECT));
  splitCase('INDIRECT_LENGTH', (dv) => splitDesc(dv, DESC, 0, T, 17, INDIRECT));
  splitCase('INDIRECT_NEXT', (dv) => {
    splitDesc(dv, DESC, 0, T, 16, INDIRECT | NEXT, 1);
    splitDesc(dv, DESC, 1, 0x4000, 4, 0);
  });
  splitCase('NESTED_INDIRECT', (dv) => {
    splitDesc(dv, T, 0, 0x4000, 4, NEXT, 1);
    splitDesc(dv, T, 1, T + 0x100, 16, INDIRECT);
    splitDesc(dv, DESC, 0, T, 32, INDIRECT);
  });
  splitCase('DESC_LOOP', (dv) => {
    splitDesc(dv, T, 0, 0x4000, 4, NEXT, 1);
    splitDesc(dv, T, 1, 0x4000, 4, NEXT, 0);
    splitDesc(dv, DESC, 0, T, 32, INDIRECT);
  });
  splitCase('DESC_INDEX', (dv) => {
    splitDesc(dv, T, 0, 0x4000, 4, NEXT, 2);
    splitDesc(dv, DESC, 0, T, 32, INDIRECT);
  });
  splitCase('GPA_OUT_OF_RANGE', (dv) => splitDesc(dv, DESC, 0, MEM - 16, 32, INDIRECT));
  // A chain longer than the queue: an indirect table of N + 1 entries all chained.
  splitCase('CHAIN_TOO_LONG', (dv) => {
    for (let i = 0; i <= N; i++) splitDesc(dv, T, i, 0x4000, 4, i < N ? NEXT : 0, i + 1);
    splitDesc(dv, DESC, 0, T, 16 * (N + 1), INDIRECT);
  });
  // ... and N entries is fine.
  const g = guarded();
  for (let i = 0; i < N; i++) splitDesc(g.dv, T, i, 0x4000, 4, i < N - 1 ? NEXT : 0, i + 1);
  splitDesc(g.dv, DESC, 0, T, 16 * N, INDIRECT);
  availPublish(g.dv, AVAIL, N, 0);
  assert.equal(g.q().pop()!.readable.length, N);
});

test('split malformed: avail ring (head index, idx jump, head in flight)', () => {
  const a = guarded();
  availPublish(a.dv, AVAIL, N, N + 1);
  malformed(a.q(), 'DESC_INDEX', a.guardsIntact);
  const b = guarded();
  b.dv.setUint16(AVAIL + 2, N + 1, true);
  malformed(b.q(), 'AVAIL_IDX', b.guardsIntact);
  const c = guarded();
  splitDesc(c.dv, DESC, 0, 0x4000, 4, 0);
  availPublish(c.dv, AVAIL, N, 0, 0);
  const q = c.q();
  assert.equal(q.pop()!.id, 0);
  throwsCode(() => q.pop(), 'ID_IN_USE');
  assert.equal(q.broken?.code, 'ID_IN_USE');
});

test('split malformed: ring memory removed under a queue', () => {
  const memory = new GuestMemory();
  const bytes = new Uint8Array(MEM);
  memory.add({ guestPhysAddr: 0, size: MEM, userAddr: 0, mmapOffset: 0 }, bytes);
  const q = createDeviceQueue({ memory, size: N, packed: false, desc: DESC, driver: AVAIL, device: USEDR, eventIdx: false, indirect: false });
  memory.clear();
  malformed(q, 'RING_LAYOUT', () => true);
});

/** One packed case: `build` writes descriptors from slot 0 (available, wrap 1). */
function packedCase(code: VirtioErrorCode, build: (dv: DataView) => void, indirect = true): void {
  const g = guarded(indirect, true);
  build(g.dv);
  malformed(g.q(), code, g.guardsIntact);
}

const A = availBits(true);

test('packed malformed: chains, indirect tables, addresses, ids', () => {
  packedCase('CHAIN_TOO_LONG', (dv) => {
    for (let i = 0; i < N; i++) packedDesc(dv, DESC, i, 0x4000, 4, 0, A | NEXT); // every slot says NEXT
  });
  packedCase('GPA_OUT_OF_RANGE', (dv) => packedDesc(dv, DESC, 0, MEM - 1, 2, 0, A));
  packedCase('GPA_OUT_OF_RANGE', (dv) => packedDesc(dv, DESC, 0, 2 ** 55, 2, 0, A | WRITE));
  packedCase('LENGTH_OVERFLOW', (dv) => {
    packedDesc(dv, DESC, 0, 0x4000, 0x100, 0, A | NEXT);
    packedDesc(dv, DESC, 1, 0x4000, 0xffff_ff01, 0, A);
  });
  packedCase('WRITE_BEFORE_READ', (dv) => {
    packedDesc(dv, DESC, 0, 0x4000, 4, 0, A | NEXT | WRITE);
    packedDesc(dv, DESC, 1, 0x4000, 4, 0, A);
  });
  packedCase('INDIRECT_NOT_NEGOTIATED', (dv) => packedDesc(dv, DESC, 0, T, 16, 0, A | INDIRECT), false);
  packedCase('INDIRECT_LENGTH', (dv) => packedDesc(dv, DESC, 0, T, 24, 0, A | INDIRECT));
  packedCase('INDIRECT_NEXT', (dv) => {
    packedDesc(dv, DESC, 0, T, 16, 0, A | INDIRECT | NEXT);
    packedDesc(dv, DESC, 1, 0x4000, 4, 0, A);
  });
  packedCase('NESTED_INDIRECT', (dv) => {
    packedDesc(dv, T, 0, 0x4000, 4, 0, 0);
    packedDesc(dv, T, 1, T, 16, 0, INDIRECT);
    packedDesc(dv, DESC, 0, T, 32, 0, A | INDIRECT);
  });
  packedCase('CHAIN_TOO_LONG', (dv) => {
    for (let i = 0; i <= N; i++) packedDesc(dv, T, i, 0x4000, 4, 0, 0);
    packedDesc(dv, DESC, 0, T, 16 * (N + 1), 0, A | INDIRECT);
  });
  const g = guarded(true, true);
  packedDesc(g.dv, DESC, 0, 0x4000, 4, 9, A);
  packedDesc(g.dv, DESC, 1, 0x4000, 4, 9, A);
  const q = g.q();
  assert.equal(q.pop()!.id, 9);
  throwsCode(() => q.pop(), 'ID_IN_USE');
  assert.ok(g.guardsIntact());
});

test('maxChainLength: lower or raise the buffers per chain', () => {
  const memory = new GuestMemory();
  const bytes = new Uint8Array(MEM);
  memory.add({ guestPhysAddr: 0, size: MEM, userAddr: 0, mmapOffset: 0 }, bytes);
  const dv = new DataView(bytes.buffer);
  for (let i = 0; i <= N; i++) splitDesc(dv, T, i, 0x4000, 4, i < N ? NEXT : 0, i + 1);
  splitDesc(dv, DESC, 0, T, 16 * (N + 1), INDIRECT);
  availPublish(dv, AVAIL, N, 0);
  const make = (maxChainLength: number) =>
    createDeviceQueue({ memory, size: N, packed: false, desc: DESC, driver: AVAIL, device: USEDR, eventIdx: false, indirect: true, maxChainLength });
  assert.equal(make(N + 1).pop()!.readable.length, N + 1);
  throwsCode(() => make(4).pop(), 'CHAIN_TOO_LONG');
  assert.throws(() => make(0), RangeError);
  assert.throws(() => make(65537), RangeError);
});

test('packed malformed: the driver makes available more descriptors than the ring holds', () => {
  const g = guarded(true, true);
  for (let i = 0; i < N; i++) packedDesc(g.dv, DESC, i, 0x4000, 4, 1, A | (i < N - 1 ? NEXT : 0));
  const q = g.q();
  assert.equal(q.pop()!.descCount, N);
  // Slot 0 is still in flight; a driver in its next lap (wrap 0) marks it available again.
  packedDesc(g.dv, DESC, 0, 0x4000, 4, 2, availBits(false));
  malformed(q, 'AVAIL_IDX', g.guardsIntact);
  assert.equal(q.inFlight, 1);
});

test('guest memory: ranges are checked before any view is made', () => {
  const memory = new GuestMemory();
  memory.add({ guestPhysAddr: 0x1000, size: 0x1000, userAddr: 0, mmapOffset: 0 }, new Uint8Array(0x1000));
  for (const [gpa, len] of [
    [0xfff, 1],
    [0x1fff, 2],
    [0x2000, 1],
    [-1, 1],
    [0x1000, -1],
    [0.5, 1],
    [2 ** 53, 1],
    [2 ** 53 - 1, 1],
  ] as const) {
    throwsCode(() => memory.view(gpa, len), 'GPA_OUT_OF_RANGE');
    throwsCode(() => memory.slices(gpa, len), 'GPA_OUT_OF_RANGE');
  }
});

/** mulberry32: a reproducible stream of random u32. */
function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return (t ^ (t >>> 14)) >>> 0;
  };
}

test('fuzz: random rings and tables only ever give chains inside memory or VirtioError', () => {
  const outcomes = new Map<string, number>();
  const count = (k: string): void => void outcomes.set(k, (outcomes.get(k) ?? 0) + 1);
  for (const packed of [false, true]) {
    for (let seed = 1; seed <= 300; seed++) {
      const next = rng(seed * 7919 + (packed ? 1 : 0));
      const g = guarded(true, packed);
      const small = (): number => next() % 0x7000; // addresses mostly inside memory, some tables overlapping rings
      // Descriptor table / ring, avail ring and two indirect tables with random but plausible fields.
      for (const table of [DESC, T, T + 0x100]) {
        for (let i = 0; i < 16; i++) {
          const r = next();
          const flags = packed ? (r & 0x8087) | (i % 3 === 0 ? 0x80 : 0) : r & 7;
          const addr = r % 23 === 0 ? 2 ** 40 + small() : r % 5 === 0 ? T + (r % 3) * 0x100 : small();
          const len = r % 29 === 0 ? 0xffff_fff0 : r % 7 === 0 ? 16 * (1 + (r % 20)) : next() % 0x300;
          if (packed) packedDesc(g.dv, table, i, addr, len, next() % 12, flags);
          else splitDesc(g.dv, table, i, addr, len, flags, next() % (r % 11 === 0 ? 40 : N));
        }
      }
      if (!packed) {
        for (let i = 0; i < N; i++) g.dv.setUint16(AVAIL + 4 + 2 * i, next() % (next() % 13 === 0 ? 20 : N), true);
        g.dv.setUint16(AVAIL + 2, next() % (N + 3), true);
      }
      const q = g.q();
      for (let k = 0; k < 2 * N; k++) {
        let c;
        try {
          c = q.pop();
        } catch (err) {
          assert.ok(err instanceof Error && err.name === 'VirtioError', `seed ${seed}: ${String(err)}`);
          assert.ok(q.broken !== null);
          count(q.broken.code);
          break;
        }
        if (c === null) break;
        count(packed ? 'packed chain' : 'split chain');
        for (const v of [...c.readable, ...c.writable]) {
          assert.ok(v.byteOffset >= GUARD && v.byteOffset + v.length <= GUARD + MEM, `seed ${seed}: a view outside memory`);
        }
        assert.ok(c.readableBytes + c.writableBytes <= 0xffff_ffff);
        if (k % 2 === 0) q.push(c, c.writableBytes > 0 ? next() % Math.min(c.writableBytes + 1, 0x1000) : 0);
      }
      assert.ok(g.guardsIntact(), `seed ${seed}: guard bytes written`);
    }
  }
  // The inputs reach both outcomes and many checks.
  assert.ok((outcomes.get('split chain') ?? 0) > 20 && (outcomes.get('packed chain') ?? 0) > 20, JSON.stringify([...outcomes]));
  assert.ok(outcomes.size >= 8, JSON.stringify([...outcomes]));
});
