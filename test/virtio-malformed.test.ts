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
