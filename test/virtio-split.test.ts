import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  createDeviceQueue,
  DirtyLog,
  GuestMemory,
  vringNeedEvent,
  type DeviceQueueOptions,
  type DescChain,
} from '../src/virtio/index.js';
import { availPublish, flatMemory, INDIRECT, le16, le32, NEXT, raw, splitDesc, throwsCode, WRITE } from './virtio-fixtures.test.js';

const N = 8;
const DESC = 0x1000;
const AVAIL = 0x2000;
const USEDR = 0x3000;
const USED_EVENT = AVAIL + 4 + 2 * N;
const AVAIL_EVENT = USEDR + 4 + 8 * N;

function setup(extra: Partial<DeviceQueueOptions> = {}, size = 0x10000) {
  const m = flatMemory(size);
  const q = (more: Partial<DeviceQueueOptions> = {}) =>
    createDeviceQueue({
      memory: m.memory,
      size: N,
      packed: false,
      desc: DESC,
      driver: AVAIL,
      device: USEDR,
      eventIdx: false,
      indirect: true,
      ...extra,
      ...more,
    });
  return { ...m, q };
}

function fill(bytes: Uint8Array, at: number, n: number, seed: number): void {
  for (let i = 0; i < n; i++) bytes[at + i] = (seed + i) & 0xff;
}

const concat = (views: Uint8Array[]): number[] => views.flatMap((v) => Array.from(v));

test('split: a readable + writable chain, popped and pushed, used ring checked byte by byte', () => {
  const { bytes, dv, q } = setup();
  fill(bytes, 0x4000, 16, 1);
  splitDesc(dv, DESC, 3, 0x4000, 16, NEXT, 5);
  splitDesc(dv, DESC, 5, 0x5000, 32, WRITE);
  availPublish(dv, AVAIL, N, 3);
  const queue = q();
  assert.equal(queue.available(), true);
  const c = queue.pop();
  assert.ok(c);
  assert.equal(queue.available(), false);
  assert.equal(c.id, 3);
  assert.equal(c.descCount, 1);
  assert.equal(c.readableBytes, 16);
  assert.equal(c.writableBytes, 32);
  assert.deepEqual(concat(c.readable), raw(bytes, 0x4000, 16));
  assert.equal(queue.inFlight, 1);
  assert.equal(queue.pop(), null);
  // The writable view is guest memory.
  c.writable[0]!.set([9, 8, 7], 0);
  assert.deepEqual(raw(bytes, 0x5000, 3), [9, 8, 7]);
  queue.push(c, 3);
  assert.equal(queue.inFlight, 0);
  // used: flags 0, idx 1, ring[0] = { id 3, len 3 }
  assert.deepEqual(raw(bytes, USEDR, 12), [...le16(0), ...le16(1), ...le32(3), ...le32(3)]);
  assert.equal(queue.base(), 1);
});

test('split: out-of-order completion, batch push, several chains', () => {
  const { bytes, dv, q } = setup();
  splitDesc(dv, DESC, 0, 0x4000, 8, 0);
  splitDesc(dv, DESC, 1, 0x4100, 64, WRITE);
  splitDesc(dv, DESC, 2, 0x4200, 8, NEXT, 4);
  splitDesc(dv, DESC, 4, 0x4300, 100, WRITE);
  availPublish(dv, AVAIL, N, 0, 1, 2);
  const queue = q();
  const cs: DescChain[] = [];
  for (let c = queue.pop(); c !== null; c = queue.pop()) cs.push(c);
  assert.deepEqual(
    cs.map((c) => [c.id, c.readableBytes, c.writableBytes]),
    [
      [0, 8, 0],
      [1, 0, 64],
      [2, 8, 100],
    ],
  );
  queue.push(cs[2]!, 50);
  queue.pushBatch([cs[1]!, cs[0]!], [64, 0]);
  assert.deepEqual(raw(bytes, USEDR, 4 + 24), [
    ...le16(0),
    ...le16(3),
    ...le32(2),
    ...le32(50),
    ...le32(1),
    ...le32(64),
    ...le32(0),
    ...le32(0),
  ]);
  assert.equal(queue.inFlight, 0);
});

test('split: avail and used idx wrap at 65536', () => {
  const { bytes, dv, q } = setup();
  dv.setUint16(AVAIL + 2, 65534, true);
  dv.setUint16(USEDR + 2, 65534, true);
  for (let i = 0; i < 3; i++) splitDesc(dv, DESC, i, 0x4000 + 0x100 * i, 16, WRITE);
  availPublish(dv, AVAIL, N, 0, 1, 2); // slots 6, 7, 0; idx -> 1
  assert.equal(dv.getUint16(AVAIL + 2, true), 1);
  const queue = q({ base: 65534 });
  const ids: number[] = [];
  for (let c = queue.pop(); c !== null; c = queue.pop()) {
    ids.push(c.id);
    queue.push(c, c.id + 1);
  }
  assert.deepEqual(ids, [0, 1, 2]);
  assert.equal(queue.base(), 1);
  assert.equal(dv.getUint16(USEDR + 2, true), 1);
  // slot 6, 7, then 0
  assert.deepEqual(raw(bytes, USEDR + 4 + 8 * 6, 16), [...le32(0), ...le32(1), ...le32(1), ...le32(2)]);
  assert.deepEqual(raw(bytes, USEDR + 4, 8), [...le32(2), ...le32(3)]);
});

test('split: indirect table chained out of order, and an indirect descriptor ending a direct chain', () => {
  const { bytes, dv, q } = setup();
  const T = 0x6000;
  splitDesc(dv, T, 0, 0x4000, 10, NEXT, 2);
  splitDesc(dv, T, 2, 0x4100, 20, NEXT | WRITE, 1);
  splitDesc(dv, T, 1, 0x4200, 30, WRITE);
  fill(bytes, 0x4000, 10, 50);
  splitDesc(dv, DESC, 0, T, 48, INDIRECT);
  splitDesc(dv, DESC, 1, 0x4800, 4, NEXT, 2);
  splitDesc(dv, DESC, 2, T, 48, INDIRECT | WRITE); // WRITE on an indirect descriptor is ignored
  availPublish(dv, AVAIL, N, 0, 1);
  const queue = q();
  const a = queue.pop()!;
  assert.equal(a.readableBytes, 10);
  assert.deepEqual(
    a.writable.map((v) => v.length),
    [20, 30],
  );
  assert.deepEqual(concat(a.readable), raw(bytes, 0x4000, 10));
  const b = queue.pop()!;
  assert.equal(b.id, 1);
  assert.equal(b.readableBytes, 14);
  assert.equal(b.writableBytes, 50);
});

test('split: a buffer crossing a region boundary gives one view per region', () => {
  const lo = new Uint8Array(0x8000);
  const hi = new Uint8Array(0x8000);
  const memory = new GuestMemory();
  memory.add({ guestPhysAddr: 0, size: 0x8000, userAddr: 0x10_0000, mmapOffset: 0 }, lo);
  memory.add({ guestPhysAddr: 0x8000, size: 0x8000, userAddr: 0x20_0000, mmapOffset: 0 }, hi);
  const dv = new DataView(lo.buffer);
  fill(lo, 0x7ff0, 16, 1);
  fill(hi, 0, 16, 17);
  splitDesc(dv, DESC, 0, 0x7ff0, 32, NEXT, 1);
  splitDesc(dv, DESC, 1, 0x7ffc, 8, WRITE);
  availPublish(dv, AVAIL, N, 0);
  const queue = createDeviceQueue({ memory, size: N, packed: false, desc: DESC, driver: AVAIL, device: USEDR, eventIdx: false, indirect: false });
  const c = queue.pop()!;
  assert.deepEqual(
    c.readable.map((v) => v.length),
    [16, 16],
  );
  assert.deepEqual(concat(c.readable), [...Array.from({ length: 32 }, (_, i) => i + 1)]);
  assert.deepEqual(
    c.writable.map((v) => v.length),
    [4, 4],
  );
  c.writable[1]!.fill(0xee);
  assert.deepEqual(raw(hi, 0, 4), [0xee, 0xee, 0xee, 0xee]);
});

test('split: vring_need_event cases', () => {
  assert.equal(vringNeedEvent(0, 1, 0), true);
  assert.equal(vringNeedEvent(5, 2, 1), false);
  assert.equal(vringNeedEvent(5, 6, 2), true);
  assert.equal(vringNeedEvent(5, 5, 2), false); // event 5 not yet passed (entry 5 not written)
  assert.equal(vringNeedEvent(65535, 1, 65535), true); // wrap
  assert.equal(vringNeedEvent(1, 1, 65535), false);
  assert.equal(vringNeedEvent(65534, 1, 65535), false); // event before old: already handled
});

test('split: EVENT_IDX notification decisions use used_event', () => {
  const { dv, q } = setup({ eventIdx: true });
  for (let i = 0; i < N; i++) splitDesc(dv, DESC, i, 0x4000 + 0x100 * i, 16, WRITE);
  const queue = q();
  const round = (k: number): boolean => {
    const heads = Array.from({ length: k }, (_, i) => i);
    availPublish(dv, AVAIL, N, ...heads);
    for (let c = queue.pop(); c !== null; c = queue.pop()) queue.push(c, 0);
    return queue.needsNotify();
  };
  assert.equal(queue.needsNotify(), false, 'nothing pushed');
  dv.setUint16(USED_EVENT, 100, true);
  assert.equal(round(1), true, 'the first decision notifies'); // used 0 -> 1
  dv.setUint16(USED_EVENT, 5, true);
  assert.equal(round(1), false); // 1 -> 2, event 5
  assert.equal(round(4), true); // 2 -> 6 passes 5
  assert.equal(round(2), false); // 6 -> 8, event 5 behind
  dv.setUint16(USED_EVENT, 8, true);
  assert.equal(round(1), true); // 8 -> 9 writes entry 8
  // NO_INTERRUPT is ignored with EVENT_IDX
  dv.setUint16(AVAIL, 1, true);
  dv.setUint16(USED_EVENT, 9, true);
  assert.equal(round(1), true);
});

test('split: flags-based interrupt suppression without EVENT_IDX', () => {
  const { dv, q } = setup();
  splitDesc(dv, DESC, 0, 0x4000, 16, WRITE);
  const queue = q();
  const round = (): boolean => {
    availPublish(dv, AVAIL, N, 0);
    queue.push(queue.pop()!, 1);
    return queue.needsNotify();
  };
  assert.equal(round(), true);
  dv.setUint16(AVAIL, 1, true); // VRING_AVAIL_F_NO_INTERRUPT
  assert.equal(round(), false);
  dv.setUint16(AVAIL, 0, true);
  assert.equal(round(), true);
  assert.equal(queue.needsNotify(), false, 'no push since');
});

test('split: enable/disable notifications (used.flags, avail_event) and the re-check race', () => {
  const a = setup();
  splitDesc(a.dv, DESC, 0, 0x4000, 16, WRITE);
  const qa = a.q();
  qa.disableNotifications();
  assert.deepEqual(raw(a.bytes, USEDR, 2), [1, 0]);
  assert.equal(qa.enableNotifications(), false);
  assert.deepEqual(raw(a.bytes, USEDR, 2), [0, 0]);
  availPublish(a.dv, AVAIL, N, 0);
  assert.equal(qa.enableNotifications(), true, 'a buffer arrived: pop again');

  const b = setup({ eventIdx: true });
  splitDesc(b.dv, DESC, 0, 0x4000, 16, WRITE);
  splitDesc(b.dv, DESC, 1, 0x4100, 16, WRITE);
  const qb = b.q();
  availPublish(b.dv, AVAIL, N, 0, 1);
  qb.pop();
  assert.equal(b.dv.getUint16(AVAIL_EVENT, true), 1, 'avail_event follows each pop');
  qb.disableNotifications();
  assert.deepEqual(raw(b.bytes, USEDR, 2), [0, 0], 'flags untouched with EVENT_IDX');
  qb.pop();
  assert.equal(b.dv.getUint16(AVAIL_EVENT, true), 1, 'not while disabled');
  assert.equal(qb.enableNotifications(), false);
  assert.equal(b.dv.getUint16(AVAIL_EVENT, true), 2);
});

test('split: dirty log marks used ring writes and the written bytes only', () => {
  const { dv, q } = setup();
  const logBytes = new Uint8Array(4); // 32 pages
  const log = new DirtyLog(logBytes);
  splitDesc(dv, DESC, 0, 0x4ff0, 0x10, NEXT | WRITE, 1);
  splitDesc(dv, DESC, 1, 0x5000, 0x2000, WRITE); // pages 5, 6
  availPublish(dv, AVAIL, N, 0);
  const queue = q({ log });
  const c = queue.pop()!;
  assert.deepEqual(Array.from(logBytes), [0, 0, 0, 0], 'pop writes nothing');
  queue.push(c, 0x20); // 0x10 in page 4, 0x10 in page 5
  // pages 3 (used ring), 4, 5
  assert.deepEqual(Array.from(logBytes), [0b0011_1000, 0, 0, 0]);

  const other = setup();
  const log2Bytes = new Uint8Array(4);
  splitDesc(other.dv, DESC, 0, 0x4000, 0x10, WRITE);
  availPublish(other.dv, AVAIL, N, 0);
  const q2 = other.q({ log: new DirtyLog(log2Bytes), logUsedAddr: 0x9000 });
  q2.push(q2.pop()!, 0);
  assert.deepEqual(Array.from(log2Bytes), [0, 0b10, 0, 0], 'used ring logged at log_guest_addr (page 9)');
});

test('split: push errors', () => {
  const { dv, q } = setup();
  splitDesc(dv, DESC, 0, 0x4000, 16, WRITE);
  availPublish(dv, AVAIL, N, 0);
  const queue = q();
  const c = queue.pop()!;
  assert.throws(() => queue.push(c, 17), RangeError);
  assert.throws(() => queue.push(c, -1), RangeError);
  assert.throws(() => queue.push(c, 1.5), RangeError);
  const otherQueue = q();
  throwsCode(() => otherQueue.push(c, 0), 'USED_ID');
  assert.throws(() => queue.pushBatch([c, c], [0, 0]), /twice/);
  queue.push(c, 16);
  throwsCode(() => queue.push(c, 0), 'USED_ID');
  assert.equal(queue.broken, null, 'device-side misuse does not break the queue');
});

test('split: base() resumes where SET_VRING_BASE said; rings re-resolved on a new memory table', () => {
  const m = setup();
  for (let i = 0; i < 4; i++) splitDesc(m.dv, DESC, i, 0x4000, 4, 0);
  availPublish(m.dv, AVAIL, N, 0, 1, 2, 3);
  const queue = m.q({ base: 2 });
  assert.equal(queue.base(), 2);
  assert.equal(queue.pop()!.id, 2);
  // The front-end moves memory: same GPA, new backing bytes (a copy).
  const moved = new Uint8Array(m.bytes);
  m.memory.remove({ guestPhysAddr: 0, size: 0x10000, userAddr: 0x7f00_0000_0000 });
  m.memory.add({ guestPhysAddr: 0, size: 0x10000, userAddr: 0x7f00_0000_0000, mmapOffset: 0 }, moved);
  new DataView(moved.buffer).setUint32(DESC + 3 * 16 + 8, 77, true); // only the new copy says len 77
  const c = queue.pop()!;
  assert.equal(c.id, 3);
  assert.equal(c.readableBytes, 77);
  queue.push(c, 0);
  assert.equal(new DataView(moved.buffer).getUint16(USEDR + 2, true), 1);
  assert.equal(m.dv.getUint16(USEDR + 2, true), 0, 'the old bytes are no longer written');
});

test('split: ring layout checks', () => {
  const { memory } = setup();
  const make = (o: Partial<DeviceQueueOptions>) => () =>
    createDeviceQueue({ memory, size: N, packed: false, desc: DESC, driver: AVAIL, device: USEDR, eventIdx: true, indirect: false, ...o });
  throwsCode(make({ desc: DESC + 8 }), 'RING_LAYOUT');
  throwsCode(make({ driver: AVAIL + 1 }), 'RING_LAYOUT');
  throwsCode(make({ device: USEDR + 2 }), 'RING_LAYOUT');
  throwsCode(make({ device: 0x10000 - 8 }), 'RING_LAYOUT');
  throwsCode(make({ desc: 0x20000 }), 'RING_LAYOUT');
  throwsCode(make({ size: 6 }), 'RING_LAYOUT');
  throwsCode(make({ size: 0 }), 'RING_LAYOUT');
  throwsCode(make({ size: 65536 }), 'RING_LAYOUT');
  throwsCode(make({ base: 0x10000 }), 'RING_LAYOUT');
  assert.equal(make({ size: 1 })().size, 1);
});
