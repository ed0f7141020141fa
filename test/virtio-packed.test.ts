import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createDeviceQueue, DirtyLog, type DeviceQueueOptions, type DescChain } from '../src/virtio/index.js';
import { availBits, flatMemory, INDIRECT, le16, le32, NEXT, packedDesc, raw, throwsCode, WRITE } from './virtio-fixtures.test.js';

const RING = 0x1000;
const DRV = 0x2000; // driver event suppression: le16 desc (off | wrap << 15) @0, le16 flags @2
const DEV = 0x3000; // device event suppression

function packedSetup(n: number, extra: Partial<DeviceQueueOptions> = {}) {
  const m = flatMemory();
  const q = (more: Partial<DeviceQueueOptions> = {}) =>
    createDeviceQueue({
      memory: m.memory,
      size: n,
      packed: true,
      desc: RING,
      driver: DRV,
      device: DEV,
      eventIdx: false,
      indirect: true,
      ...extra,
      ...more,
    });
  return { ...m, q };
}

/** A used descriptor as the device must write it: len @8, id @12, flags @14. */
function usedBytes(bytes: Uint8Array, slot: number): { len: number; id: number; flags: number } {
  const dv = new DataView(bytes.buffer, bytes.byteOffset);
  const o = RING + 16 * slot;
  return { len: dv.getUint32(o + 8, true), id: dv.getUint16(o + 12, true), flags: dv.getUint16(o + 14, true) };
}

test('packed: a two-descriptor chain, buffer id from the last descriptor, used descriptor byte by byte', () => {
  const { bytes, dv, q } = packedSetup(4);
  for (let i = 0; i < 16; i++) bytes[0x4000 + i] = i;
  packedDesc(dv, RING, 1, 0x5000, 64, 7, availBits(true) | WRITE);
  packedDesc(dv, RING, 0, 0x4000, 16, 0xbeef, availBits(true) | NEXT); // first made available last
  const queue = q();
  assert.equal(queue.available(), true);
  const c = queue.pop()!;
  assert.equal(queue.available(), false);
  assert.equal(c.id, 7);
  assert.equal(c.descCount, 2);
  assert.deepEqual(Array.from(c.readable[0]!), raw(bytes, 0x4000, 16));
  assert.equal(c.writableBytes, 64);
  assert.equal(queue.pop(), null);
  queue.push(c, 10);
  // slot 0: addr untouched, len 10, id 7, flags AVAIL | USED | WRITE
  assert.deepEqual(raw(bytes, RING, 16), [0, 0x40, 0, 0, 0, 0, 0, 0, ...le32(10), ...le16(7), ...le16(0x8082)]);
  // slot 1 untouched
  assert.deepEqual(usedBytes(bytes, 1), { len: 64, id: 7, flags: 0x82 });
  // avail side 2 (wrap 1), used side 2 (wrap 1)
  assert.equal(queue.base(), 0x8002_8002);
});

test('packed: descriptors not available: wrong AVAIL bit, or used pattern', () => {
  const { dv, q } = packedSetup(4);
  packedDesc(dv, RING, 0, 0x4000, 16, 1, availBits(false)); // a driver with wrap 0: not for us yet
  const queue = q();
  assert.equal(queue.pop(), null);
  packedDesc(dv, RING, 0, 0x4000, 16, 1, 0x8080); // AVAIL == USED: used
  assert.equal(queue.pop(), null);
  packedDesc(dv, RING, 0, 0x4000, 16, 1, 0);
  assert.equal(queue.pop(), null);
  packedDesc(dv, RING, 0, 0x4000, 16, 1, availBits(true));
  assert.equal(queue.pop()!.id, 1);
});

test('packed: ring wrap-around (non power of two size), wrap counters flip on both sides', () => {
  const { bytes, dv, q } = packedSetup(3);
  const queue = q();
  // chain A: slots 0, 1 (lap 1)
  packedDesc(dv, RING, 1, 0x4100, 8, 10, availBits(true) | WRITE);
  packedDesc(dv, RING, 0, 0x4000, 8, 0, availBits(true) | NEXT);
  const a = queue.pop()!;
  assert.equal(a.id, 10);
  queue.push(a, 8);
  assert.deepEqual(usedBytes(bytes, 0), { len: 8, id: 10, flags: 0x8082 });
  // chain B: slot 2 (lap 1) then slot 0 (lap 2: the driver's wrap counter is 0)
  packedDesc(dv, RING, 0, 0x4300, 8, 11, availBits(false) | WRITE);
  packedDesc(dv, RING, 2, 0x4200, 8, 0, availBits(true) | NEXT);
  const b = queue.pop()!;
  assert.equal(b.id, 11);
  assert.equal(b.descCount, 2);
  assert.equal(queue.base() & 0xffff, 1, 'avail side at slot 1, wrap 0');
  queue.push(b, 0);
  // written at the device's used slot 2 with its wrap counter 1, no WRITE (len 0)
  assert.deepEqual(usedBytes(bytes, 2), { len: 0, id: 11, flags: 0x8080 });
  assert.equal(queue.base(), 0x0001_0001);
  // chain C: slot 1 in lap 2; used at slot 1 with wrap 0: flags without AVAIL/USED
  packedDesc(dv, RING, 1, 0x4400, 8, 12, availBits(false) | WRITE);
  const c = queue.pop()!;
  queue.push(c, 4);
  assert.deepEqual(usedBytes(bytes, 1), { len: 4, id: 12, flags: WRITE });
  assert.equal(queue.base(), 0x0002_0002);
});

test('packed: out-of-order completion writes used descriptors in completion order', () => {
  const { bytes, dv, q } = packedSetup(8);
  packedDesc(dv, RING, 0, 0x4000, 8, 0, availBits(true) | NEXT);
  packedDesc(dv, RING, 1, 0x4100, 8, 1, availBits(true) | WRITE);
  packedDesc(dv, RING, 2, 0x4200, 8, 2, availBits(true) | WRITE);
  packedDesc(dv, RING, 3, 0x4300, 8, 3, availBits(true) | WRITE);
  const queue = q();
  const cs: DescChain[] = [];
  for (let c = queue.pop(); c !== null; c = queue.pop()) cs.push(c);
  assert.deepEqual(
    cs.map((c) => [c.id, c.descCount]),
    [
      [1, 2],
      [2, 1],
      [3, 1],
    ],
  );
  queue.push(cs[1]!, 1); // used slot 0, next used slot 1
  queue.pushBatch([cs[0]!, cs[2]!], [2, 3]); // slots 1 (2 descriptors), 3
  assert.deepEqual(usedBytes(bytes, 0), { len: 1, id: 2, flags: 0x8082 });
  assert.deepEqual(usedBytes(bytes, 1), { len: 2, id: 1, flags: 0x8082 });
  assert.deepEqual(usedBytes(bytes, 3), { len: 3, id: 3, flags: 0x8082 });
  assert.equal(queue.base(), 0x8004_8004);
  assert.equal(queue.inFlight, 0);
});

test('packed: indirect descriptor', () => {
  const { dv, q } = packedSetup(4);
  const T = 0x6000;
  packedDesc(dv, T, 0, 0x4000, 12, 0, 0);
  packedDesc(dv, T, 1, 0x4100, 20, 0, WRITE | NEXT); // NEXT ignored in an indirect table
  packedDesc(dv, T, 2, 0x4200, 30, 0, WRITE);
  packedDesc(dv, RING, 0, T, 48, 5, availBits(true) | INDIRECT);
  const c = q().pop()!;
  assert.equal(c.id, 5);
  assert.equal(c.descCount, 1);
  assert.equal(c.readableBytes, 12);
  assert.deepEqual(
    c.writable.map((v) => v.length),
    [20, 30],
  );
});

test('packed: base() encoding and SET_VRING_BASE values', () => {
  const { bytes, dv, q } = packedSetup(8);
  assert.equal(q().base(), 0x8000_8000, 'default: both sides at 0, wrap counters 1');
  assert.equal(q({ base: 0x0003 }).base(), 0x0003_0003, 'avail side only: used side the same');
  const queue = q({ base: 0x0002_8005 }); // avail 5 wrap 1, used 2 wrap 0
  assert.equal(queue.base(), 0x0002_8005);
  packedDesc(dv, RING, 5, 0x4000, 8, 9, availBits(true) | WRITE);
  const c = queue.pop()!;
  queue.push(c, 8);
  assert.equal(usedBytes(bytes, 2).flags, WRITE, 'used at slot 2, wrap 0');
  assert.equal(queue.base(), 0x0003_8006);
  throwsCode(() => q({ base: 0x8008 }), 'RING_LAYOUT');
});

test('packed: driver event suppression decides interrupts (ENABLE, DISABLE, DESC with off_wrap)', () => {
  const { dv, q } = packedSetup(4, { eventIdx: true });
  const queue = q();
  let slot = 0;
  let wrap = true;
  const round = (k: number): boolean => {
    for (let i = 0; i < k; i++) {
      packedDesc(dv, RING, slot, 0x4000, 8, i, availBits(wrap) | WRITE);
      if (++slot === 4) {
        slot = 0;
        wrap = !wrap;
      }
    }
    for (let c = queue.pop(); c !== null; c = queue.pop()) queue.push(c, 0);
    return queue.needsNotify();
  };
  assert.equal(queue.needsNotify(), false, 'nothing pushed');
  dv.setUint16(DRV + 2, 1, true); // DISABLE
  assert.equal(round(1), false); // used 0 -> 1
  dv.setUint16(DRV + 2, 0, true); // ENABLE
  assert.equal(round(1), true); // 1 -> 2
  dv.setUint16(DRV + 2, 2, true); // DESC
  dv.setUint16(DRV, 3 | 0x8000, true); // at slot 3, wrap 1
  assert.equal(round(1), false); // 2 -> 3: slot 3 not written yet
  assert.equal(round(1), true); // 3 -> 0 (wrap flips to 0): slot 3 written
  dv.setUint16(DRV, 1, true); // slot 1, wrap 0
  assert.equal(round(1), false); // 0 -> 1 (wrap 0)
  assert.equal(round(2), true); // 1 -> 3
  dv.setUint16(DRV, 3 | 0x8000, true); // slot 3 of the previous lap (wrap 1): already passed
  assert.equal(round(1), false); // 3 -> 0
});

test('packed: enable/disable notifications write the device event area', () => {
  const a = packedSetup(4);
  const qa = a.q();
  qa.disableNotifications();
  assert.deepEqual(raw(a.bytes, DEV, 4), [0, 0, 1, 0]);
  assert.equal(qa.enableNotifications(), false);
  assert.deepEqual(raw(a.bytes, DEV, 4), [0, 0, 0, 0]);
  packedDesc(a.dv, RING, 0, 0x4000, 8, 1, availBits(true));
  assert.equal(qa.enableNotifications(), true, 'a buffer is available: pop again');

  const b = packedSetup(4, { eventIdx: true });
  packedDesc(b.dv, RING, 0, 0x4000, 8, 1, availBits(true) | NEXT);
  packedDesc(b.dv, RING, 1, 0x4000, 8, 1, availBits(true));
  const qb = b.q();
  assert.equal(qb.enableNotifications(), true);
  assert.deepEqual(raw(b.bytes, DEV, 4), [...le16(0x8000), ...le16(2)], 'DESC at slot 0, wrap 1');
  qb.pop();
  assert.deepEqual(raw(b.bytes, DEV, 2), le16(0x8002), 'the event follows each pop');
});

test('packed: dirty log marks the used descriptor and the written bytes', () => {
  const { dv, q } = packedSetup(4);
  const logBytes = new Uint8Array(2);
  packedDesc(dv, RING, 0, 0x7000, 0x100, 3, availBits(true) | WRITE);
  const queue = q({ log: new DirtyLog(logBytes) });
  queue.push(queue.pop()!, 1);
  assert.deepEqual(Array.from(logBytes), [0b1000_0010, 0]); // page 1 (ring), page 7 (buffer)
});
