import { test } from 'node:test';
import assert from 'node:assert/strict';
import { DirtyLog, GuestMemory } from '../src/virtio/index.js';
import { SharedMemory } from '../src/sys/index.js';
import { throwsCode } from './virtio-fixtures.test.js';

/** Two adjacent regions [0x1000, 0x2000) and [0x2000, 0x3000), a third apart at [0x10000, 0x11000). */
function threeRegions() {
  const a = new Uint8Array(0x1000).fill(1);
  const b = new Uint8Array(0x1000).fill(2);
  const c = new Uint8Array(0x1000).fill(3);
  const released: string[] = [];
  const memory = new GuestMemory();
  memory.add({ guestPhysAddr: 0x2000, size: 0x1000, userAddr: 0x9000, mmapOffset: 0 }, b, () => released.push('b'));
  memory.add({ guestPhysAddr: 0x10000, size: 0x1000, userAddr: 0x20000, mmapOffset: 0x1000 }, c, () => released.push('c'));
  memory.add({ guestPhysAddr: 0x1000, size: 0x1000, userAddr: 0x5000, mmapOffset: 0 }, a, () => released.push('a'));
  return { memory, a, b, c, released };
}

test('guest memory: regions sorted, views inside one region, null across a boundary', () => {
  const { memory, a } = threeRegions();
  assert.deepEqual(
    memory.regions.map((r) => r.guestPhysAddr),
    [0x1000, 0x2000, 0x10000],
  );
  assert.equal(memory.generation, 3);
  const v = memory.view(0x1ff0, 16)!;
  assert.equal(v.length, 16);
  v[0] = 9;
  assert.equal(a[0xff0], 9, 'a view is the memory');
  assert.equal(memory.view(0x1ff0, 32), null, 'inside memory, across a boundary');
  assert.equal(memory.view(0x1234, 0)!.length, 0);
  throwsCode(() => memory.view(0x2ff0, 32), 'GPA_OUT_OF_RANGE'); // into the gap
  throwsCode(() => memory.view(0x3000, 1), 'GPA_OUT_OF_RANGE');
  throwsCode(() => memory.view(0x11000, 1), 'GPA_OUT_OF_RANGE');
});

test('guest memory: slices, read and write across regions', () => {
  const { memory, a, b } = threeRegions();
  const s = memory.slices(0x1ffe, 4);
  assert.deepEqual(
    s.map((x) => Array.from(x)),
    [
      [1, 1],
      [2, 2],
    ],
  );
  memory.write(0x1fff, Uint8Array.from([7, 8]));
  assert.equal(a[0xfff], 7);
  assert.equal(b[0], 8);
  assert.deepEqual(Array.from(memory.read(0x1ffe, 4)), [1, 7, 8, 2]);
  assert.deepEqual(memory.slices(0x1000, 0), []);
  throwsCode(() => memory.write(0x2fff, Uint8Array.from([1, 2])), 'GPA_OUT_OF_RANGE');
  assert.equal(b[0xfff], 2, 'nothing written when the range is not all in memory');
});

test('guest memory: uvaToGpa in one region only', () => {
  const { memory } = threeRegions();
  assert.equal(memory.uvaToGpa(0x5010, 16), 0x1010);
  assert.equal(memory.uvaToGpa(0x20000, 0x1000), 0x10000);
  throwsCode(() => memory.uvaToGpa(0x5ff0, 32), 'UVA_OUT_OF_RANGE'); // UVA 0x6000 is not mapped
  throwsCode(() => memory.uvaToGpa(0x4fff, 1), 'UVA_OUT_OF_RANGE');
  throwsCode(() => memory.uvaToGpa(-5, 1), 'UVA_OUT_OF_RANGE');
});

test('guest memory: overlaps refused, bad regions refused', () => {
  const { memory } = threeRegions();
  const gen = memory.generation;
  throwsCode(() => memory.add({ guestPhysAddr: 0x2800, size: 0x1000, userAddr: 0x90000, mmapOffset: 0 }, new Uint8Array(0x1000)), 'REGION_OVERLAP');
  throwsCode(() => memory.add({ guestPhysAddr: 0x40000, size: 0x1000, userAddr: 0x5800, mmapOffset: 0 }, new Uint8Array(0x1000)), 'REGION_OVERLAP');
  assert.throws(() => memory.add({ guestPhysAddr: 0x40000, size: 0x1000, userAddr: 0x90000, mmapOffset: 0 }, new Uint8Array(16)), RangeError);
  assert.throws(() => memory.add({ guestPhysAddr: 0x40000, size: 0, userAddr: 0x90000, mmapOffset: 0 }, new Uint8Array(0)), RangeError);
  throwsCode(() => memory.add({ guestPhysAddr: 2 ** 53, size: 1, userAddr: 0x90000, mmapOffset: 0 }, new Uint8Array(1)), 'GPA_OUT_OF_RANGE');
  assert.equal(memory.generation, gen, 'refused adds change nothing');
});

test('guest memory: remove and clear call release and bump the generation', () => {
  const { memory, released } = threeRegions();
  const gen = memory.generation;
  assert.equal(memory.remove({ guestPhysAddr: 0x2000, size: 0x1000, userAddr: 0x1234 }), false);
  assert.equal(memory.remove({ guestPhysAddr: 0x2000, size: 0x1000, userAddr: 0x9000 }), true);
  assert.deepEqual(released, ['b']);
  assert.equal(memory.generation, gen + 1);
  throwsCode(() => memory.view(0x2000, 1), 'GPA_OUT_OF_RANGE');
  memory.clear();
  assert.deepEqual(released.sort(), ['a', 'b', 'c']);
  assert.equal(memory.regions.length, 0);
  assert.equal(memory.generation, gen + 2);
});

test('dirty log: bit page % 8 of byte page / 8, whole bytes, pages past the end counted', () => {
  const bytes = new Uint8Array(4); // pages 0..31
  const log = new DirtyLog(bytes);
  log.mark(9 * 4096 + 100, 1); // page 9
  assert.deepEqual(Array.from(bytes), [0, 0b10, 0, 0]);
  log.mark(4095, 2); // pages 0, 1
  assert.deepEqual(Array.from(bytes), [0b11, 0b10, 0, 0]);
  log.mark(16 * 4096, 8 * 4096); // pages 16..23: byte 2 whole
  assert.deepEqual(Array.from(bytes), [0b11, 0b10, 0xff, 0]);
  log.mark(0x5000, 0);
  assert.deepEqual(Array.from(bytes), [0b11, 0b10, 0xff, 0]);
  log.mark(30 * 4096, 4 * 4096); // pages 30, 31 marked; 32, 33 past the end
  assert.deepEqual(Array.from(bytes), [0b11, 0b10, 0xff, 0b1100_0000]);
  assert.equal(log.overflow, 2);
});

test('dirty log: Atomics.or works on a mapped (non-shared) memfd', () => {
  const shm = SharedMemory.create(4096);
  try {
    const log = new DirtyLog(new Uint8Array(shm.buffer));
    log.mark(3 * 4096, 4096);
    assert.equal(new Uint8Array(shm.buffer)[0], 0b1000);
  } finally {
    shm.close();
  }
});
