/**
 * The driver side of split and packed rings, checked against bytes at the
 * spec's offsets (VIRTIO 1.2 2.7 and 2.8): descriptors, avail ring, indirect
 * tables, event suppression; the device's part written by hand; a device that
 * lies (used id not in flight, used length too long, used idx too far) breaks
 * the queue. Then the driver against our own device-side engine on the same
 * memory, both layouts, with and without EVENT_IDX.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createDeviceQueue, createDriverQueue, ringLayout, VirtioError, type DriverBuffer } from '../src/virtio/index.js';
import { AVAIL, flatMemory, INDIRECT, le16, le32, NEXT, raw, USED, WRITE } from './virtio-fixtures.test.js';

const N = 8;
const DESC = 0x1000;
const AV = 0x2000;
const USEDR = 0x3000;
const TABLES = 0x4000;

const le64 = (v: number): number[] => [...le32(v % 0x1_0000_0000), ...le32(Math.floor(v / 0x1_0000_0000))];

function split(opts: { eventIdx?: boolean; indirect?: boolean } = {}) {
  const m = flatMemory(0x10000);
  const q = createDriverQueue<string>({ memory: m.memory, size: N, packed: false, desc: DESC, driver: AV, device: USEDR, eventIdx: opts.eventIdx ?? false, indirect: opts.indirect ?? false, indirectTables: TABLES, indirectMax: 4 });
  return { ...m, q };
}

const chain: DriverBuffer[] = [
  { addr: 0x8000, len: 16, write: false },
  { addr: 0x1_2345_6000, len: 4096, write: true },
  { addr: 0x9000, len: 1, write: true },
];

/** The device's used element {id, len} in slot `slot`, then used.idx = idx. */
function splitUsed(dv: DataView, slot: number, id: number, len: number, idx: number): void {
  dv.setUint32(USEDR + 4 + 8 * slot, id, true);
  dv.setUint32(USEDR + 4 + 8 * slot + 4, len, true);
  dv.setUint16(USEDR + 2, idx, true);
}

test('split driver: a chain of three as descriptors 0-2, avail ring entry and idx at their offsets', () => {
  const { bytes, dv, q } = split();
  assert.equal(q.add(chain, 'a'), true);
  assert.deepEqual(raw(bytes, DESC, 16), [...le64(0x8000), ...le32(16), ...le16(NEXT), ...le16(1)]);
  assert.deepEqual(raw(bytes, DESC + 16, 16), [...le64(0x1_2345_6000), ...le32(4096), ...le16(NEXT | WRITE), ...le16(2)]);
  assert.deepEqual(raw(bytes, DESC + 32, 16), [...le64(0x9000), ...le32(1), ...le16(WRITE), ...le16(0)]);
  assert.deepEqual(raw(bytes, AV, 6), [...le16(0), ...le16(1), ...le16(0)], 'avail flags 0, idx 1, ring[0] = head 0');
  assert.equal(q.numFree, N - 3);
  assert.equal(q.needsKick(), true, 'no NO_NOTIFY: kick');
  assert.equal(q.needsKick(), false, 'nothing new');
  assert.equal(q.getUsed(), null);
  splitUsed(dv, 0, 0, 4097, 1);
  assert.deepEqual(q.getUsed(), { token: 'a', len: 4097 });
  assert.equal(q.numFree, N);
  assert.equal(q.inFlight, 0);
  // The next chain reuses the freed descriptors, head first (LIFO free list).
  assert.equal(q.add([{ addr: 0xa000, len: 8, write: false }], 'b'), true);
  assert.equal(dv.getUint16(AV + 4 + 2, true), 0, 'ring[1] = head 0 again');
  assert.equal(dv.getUint16(AV + 2, true), 2);
});

test('split driver: NO_NOTIFY suppresses the kick, NO_INTERRUPT is set by disableInterrupts', () => {
  const { dv, q } = split();
  dv.setUint16(USEDR, 1, true);
  q.add([{ addr: 0x8000, len: 4, write: false }], 'x');
  assert.equal(q.needsKick(), false);
  q.disableInterrupts();
  assert.equal(dv.getUint16(AV, true), 1);
  assert.equal(q.enableInterrupts(), false);
  assert.equal(dv.getUint16(AV, true), 0);
  splitUsed(dv, 0, 0, 0, 1);
  q.disableInterrupts();
  assert.equal(q.enableInterrupts(), true, 'a used entry is waiting: reap again');
});

test('split driver: EVENT_IDX kicks by avail_event, publishes used_event after each reap', () => {
  const { dv, q } = split({ eventIdx: true });
  const AVAIL_EVENT = USEDR + 4 + 8 * N;
  const USED_EVENT = AV + 4 + 2 * N;
  dv.setUint16(AVAIL_EVENT, 5, true);
  for (let i = 0; i < 3; i++) q.add([{ addr: 0x8000, len: 4, write: false }], `t${i}`);
  assert.equal(q.needsKick(), false, 'idx 0 -> 3 does not pass avail_event 5');
  for (let i = 3; i < 6; i++) q.add([{ addr: 0x8000, len: 4, write: false }], `t${i}`);
  assert.equal(q.needsKick(), true, 'idx 3 -> 6 passes 5');
  splitUsed(dv, 0, 0, 0, 1);
  assert.equal(q.getUsed()?.token, 't0');
  assert.equal(dv.getUint16(USED_EVENT, true), 1, 'used_event = next used idx');
});

test('split driver: indirect table for a chain of three, one descriptor in the ring', () => {
  const { bytes, dv, q } = split({ indirect: true });
  q.add(chain, 'i');
  assert.deepEqual(raw(bytes, DESC, 16), [...le64(TABLES), ...le32(48), ...le16(INDIRECT), ...le16(0)]);
  assert.deepEqual(raw(bytes, TABLES, 16), [...le64(0x8000), ...le32(16), ...le16(NEXT), ...le16(1)]);
  assert.deepEqual(raw(bytes, TABLES + 16, 16), [...le64(0x1_2345_6000), ...le32(4096), ...le16(NEXT | WRITE), ...le16(2)]);
  assert.deepEqual(raw(bytes, TABLES + 32, 16), [...le64(0x9000), ...le32(1), ...le16(WRITE), ...le16(0)]);
  assert.equal(q.numFree, N - 1);
  q.add(chain, 'j');
  assert.equal(dv.getUint32(DESC + 16, true), TABLES + 4 * 16, 'head 1 uses table 1');
  assert.equal(q.add([{ addr: 0, len: 1, write: false }, ...Array.from({ length: 4 }, () => ({ addr: 0x100, len: 1, write: true }))], 'k'), true, 'five buffers: direct');
  assert.equal(q.numFree, N - 2 - 5);
});

test('split driver: a device that lies breaks the queue', () => {
  for (const [what, poke] of [
    ['id not in flight', (dv: DataView) => splitUsed(dv, 0, 5, 0, 1)],
    ['id past the ring', (dv: DataView) => splitUsed(dv, 0, 99, 0, 1)],
    ['len past the writable bytes', (dv: DataView) => splitUsed(dv, 0, 0, 4098, 1)],
    ['used idx past what is in flight', (dv: DataView) => splitUsed(dv, 0, 0, 1, 2)],
  ] as const) {
    const { dv, q } = split();
    q.add(chain, 'a');
    poke(dv);
    assert.throws(() => q.getUsed(), VirtioError, what);
    assert.ok(q.broken, what);
    assert.equal(q.getUsed(), null);
    assert.throws(() => q.add(chain, 'b'), /broken/);
  }
});

test('split driver: refuses a full ring and malformed chains', () => {
  const { q } = split();
  assert.throws(() => q.add([], 'e'), RangeError);
  assert.throws(() => q.add([{ addr: 0, len: 1, write: true }, { addr: 0, len: 1, write: false }], 'e'), /readable buffer after/);
  for (let i = 0; i < N / 2; i++) assert.equal(q.add(chain.slice(0, 2), `c${i}`), true);
  assert.equal(q.canAdd(1), false);
  assert.equal(q.add([{ addr: 0, len: 1, write: false }], 'x'), false);
  assert.deepEqual(q.tokens().sort(), ['c0', 'c1', 'c2', 'c3']);
});

function packed(opts: { eventIdx?: boolean; indirect?: boolean; size?: number } = {}) {
  const m = flatMemory(0x10000);
  const q = createDriverQueue<string>({ memory: m.memory, size: opts.size ?? N, packed: true, desc: DESC, driver: AV, device: USEDR, eventIdx: opts.eventIdx ?? false, indirect: opts.indirect ?? false, indirectTables: TABLES, indirectMax: 4 });
  return { ...m, q };
}

/** The device's used descriptor at `slot`: id, len, flags AVAIL|USED = wrap. */
function packedUsed(dv: DataView, slot: number, id: number, len: number, wrap: boolean): void {
  dv.setUint32(DESC + 16 * slot + 8, len, true);
  dv.setUint16(DESC + 16 * slot + 12, id, true);
  dv.setUint16(DESC + 16 * slot + 14, wrap ? AVAIL | USED : 0, true);
}

test('packed driver: a chain in consecutive slots, id in each, AVAIL=1 USED=0 on the first lap', () => {
  const { bytes, dv, q } = packed();
  q.add(chain, 'a');
  assert.deepEqual(raw(bytes, DESC, 16), [...le64(0x8000), ...le32(16), ...le16(0), ...le16(NEXT | AVAIL)]);
  assert.deepEqual(raw(bytes, DESC + 16, 16), [...le64(0x1_2345_6000), ...le32(4096), ...le16(0), ...le16(NEXT | WRITE | AVAIL)]);
  assert.deepEqual(raw(bytes, DESC + 32, 16), [...le64(0x9000), ...le32(1), ...le16(0), ...le16(WRITE | AVAIL)]);
  assert.equal(q.needsKick(), true, 'device event flags ENABLE');
  assert.equal(q.getUsed(), null);
  packedUsed(dv, 0, 0, 7, true);
  assert.deepEqual(q.getUsed(), { token: 'a', len: 7 });
  assert.equal(q.numFree, N);
});

test('packed driver: the second lap flips the wrap counter (AVAIL=0 USED=1); used descriptors the same way', () => {
  const { dv, q } = packed({ size: 4 });
  for (let lap = 0; lap < 3; lap++) {
    const wrap = lap % 2 === 0;
    for (let i = 0; i < 4; i++) assert.equal(q.add([{ addr: 0x8000, len: 4, write: false }], `l${lap}.${i}`), true);
    assert.equal(q.add([{ addr: 0x8000, len: 4, write: false }], 'no room'), false);
    for (let i = 0; i < 4; i++) assert.equal(dv.getUint16(DESC + 16 * i + 14, true), wrap ? AVAIL : USED, `lap ${lap} slot ${i}`);
    // The device uses them out of order: ids as it likes, slots in order.
    const ids = [0, 1, 2, 3].map((i) => dv.getUint16(DESC + 16 * i + 12, true));
    const order = [ids[2]!, ids[0]!, ids[3]!, ids[1]!];
    order.forEach((id, slot) => packedUsed(dv, slot, id, 0, wrap));
    const got = [0, 1, 2, 3].map(() => q.getUsed()?.token);
    assert.equal(got.length, 4);
    assert.equal(q.getUsed(), null);
    assert.equal(q.inFlight, 0);
  }
});

test('packed driver: event suppression both ways, EVENT_IDX offsets', () => {
  const { dv, q } = packed({ eventIdx: true });
  dv.setUint16(USEDR + 2, 1, true); // device: DISABLE
  q.add([{ addr: 0x8000, len: 4, write: false }], 'a');
  assert.equal(q.needsKick(), false);
  dv.setUint16(USEDR, 3 | 0x8000, true); // DESC at slot 3, wrap 1
  dv.setUint16(USEDR + 2, 2, true);
  q.add([{ addr: 0x8000, len: 4, write: false }], 'b');
  assert.equal(q.needsKick(), false, 'slots 1..2 do not reach 3');
  q.add([{ addr: 0x8000, len: 4, write: false }, { addr: 0x8000, len: 4, write: false }], 'c');
  assert.equal(q.needsKick(), true, 'slots 2..3 pass 3');
  // Ours: DESC with the next used slot and wrap after a reap.
  packedUsed(dv, 0, dv.getUint16(DESC + 12, true), 0, true);
  assert.equal(q.getUsed()?.token, 'a');
  assert.deepEqual([dv.getUint16(AV, true), dv.getUint16(AV + 2, true)], [1 | 0x8000, 2]);
  q.disableInterrupts();
  assert.equal(dv.getUint16(AV + 2, true), 1);
});

test('packed driver: indirect descriptor and its table; a lying device breaks the queue', () => {
  const { bytes, dv, q } = packed({ indirect: true });
  q.add(chain, 'i');
  assert.deepEqual(raw(bytes, DESC, 16), [...le64(TABLES), ...le32(48), ...le16(0), ...le16(INDIRECT | AVAIL)]);
  assert.deepEqual(raw(bytes, TABLES + 16, 16), [...le64(0x1_2345_6000), ...le32(4096), ...le16(0), ...le16(WRITE)]);
  packedUsed(dv, 0, 3, 0, true);
  assert.throws(() => q.getUsed(), /not a chain in flight/);
  assert.ok(q.broken);
});

for (const packedRing of [false, true]) {
  for (const eventIdx of [false, true]) {
    test(`driver against our device engine: ${packedRing ? 'packed' : 'split'}${eventIdx ? ' + EVENT_IDX' : ''}, 1000 chains, out-of-order completion`, () => {
      const size = 16;
      const layout = ringLayout(size, packedRing, 4);
      const m = flatMemory(0x40000);
      const opts = { memory: m.memory, size, packed: packedRing, desc: layout.desc, driver: layout.driver, device: layout.device, eventIdx, indirect: true };
      const drv = createDriverQueue<number>({ ...opts, indirectTables: layout.indirectTables, indirectMax: 4 });
      const dev = createDeviceQueue(opts);
      const DATA = 0x20000;
      let next = 0;
      let done = 0;
      const held: { chain: ReturnType<typeof dev.pop> & object; n: number }[] = [];
      let kicks = 0;
      let irqs = 0;
      while (done < 1000) {
        while (next < 1000 && drv.canAdd(3)) {
          const n = next % 3 === 0 ? 1 : 3;
          const bufs: DriverBuffer[] = [{ addr: DATA + 64 * (next % 512), len: 8, write: false }];
          if (n === 3) bufs.push({ addr: 0x30000, len: 32, write: true }, { addr: 0x30020, len: 1, write: true });
          m.dv.setUint32(DATA + 64 * (next % 512), next, true);
          assert.equal(drv.add(bufs, next), true);
          next++;
        }
        if (drv.needsKick()) kicks++;
        for (let c = dev.pop(); c !== null; c = dev.pop()) {
          const v = new DataView(c.readable[0]!.buffer, c.readable[0]!.byteOffset, 8).getUint32(0, true);
          held.push({ chain: c, n: v });
        }
        // Complete in reverse order, writing the token's length.
        while (held.length > 0) {
          const h = held.pop()!;
          dev.push(h.chain, h.chain.writableBytes > 0 ? 1 + (h.n % 32) : 0);
        }
        if (dev.needsNotify()) irqs++;
        for (let u = drv.getUsed(); u !== null; u = drv.getUsed()) {
          assert.equal(u.len, u.token % 3 === 0 ? 0 : 1 + (u.token % 32));
          done++;
        }
        drv.enableInterrupts();
        dev.enableNotifications();
      }
      assert.equal(drv.inFlight, 0);
      assert.equal(drv.numFree, size);
      assert.ok(kicks > 0 && irqs > 0, `${kicks} kicks, ${irqs} interrupts`);
    });
  }
}
