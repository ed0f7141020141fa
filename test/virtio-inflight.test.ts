import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  createDeviceQueue,
  GuestMemory,
  InflightRegion,
  inflightQueueSize,
  PackedInflightQueue,
  type DeviceQueueOptions,
} from '../src/virtio/index.js';
import { availBits, availPublish, NEXT, packedDesc, splitDesc, throwsCode, WRITE } from './virtio-fixtures.test.js';

const N = 8;
const DESC = 0x1000;
const AVAIL = 0x2000;
const USEDR = 0x3000;
const align64 = (n: number): number => Math.ceil(n / 64) * 64;
const u64 = (dv: DataView, o: number): number => Number(dv.getBigUint64(o, true));

/** Guest memory over `bytes` (a new GuestMemory each time: a new back-end process after a crash). */
function memoryOver(bytes: Uint8Array): GuestMemory {
  const memory = new GuestMemory();
  memory.add({ guestPhysAddr: 0, size: bytes.length, userAddr: 0x7f00_0000_0000, mmapOffset: 0 }, bytes);
  return memory;
}

function open(guest: Uint8Array, inflightBytes: Uint8Array, packed: boolean, more: Partial<DeviceQueueOptions> = {}) {
  const region = new InflightRegion(inflightBytes, 2, N, packed);
  return createDeviceQueue({
    memory: memoryOver(guest),
    size: N,
    packed,
    desc: DESC,
    driver: AVAIL,
    device: USEDR,
    eventIdx: false,
    indirect: false,
    inflight: region.queue(1),
    ...more,
  });
}

test('inflight: region sizes match libvhost-user (split) and DPDK (split, packed)', () => {
  for (let qs = 1; qs <= 1024; qs++) {
    assert.equal(inflightQueueSize(qs, false), align64(16 * qs + 2), `libvhost-user split ${qs}`);
    assert.equal(inflightQueueSize(qs, false), align64(16 * qs + 8 + 2 * 4), `DPDK split ${qs}`);
    assert.equal(inflightQueueSize(qs, true), align64(32 * qs + 8 + 2 * 6 + 9), `DPDK packed ${qs}`);
  }
  assert.equal(inflightQueueSize(128, false), 2112);
  assert.equal(InflightRegion.size(2, 256, true), 2 * 8256);
  throwsCode(() => new InflightRegion(new Uint8Array(100), 2, 8, false), 'INFLIGHT_LAYOUT');
  throwsCode(() => inflightQueueSize(0, false), 'INFLIGHT_LAYOUT');
});

test('inflight: a new region is initialised (version, desc_num; packed free list and wrap counters)', () => {
  const split = new Uint8Array(InflightRegion.size(2, N, false)).fill(0xaa, 200);
  const sdv = new DataView(split.buffer);
  sdv.setUint16(8, 0, true);
  new InflightRegion(split, 2, N, false).queue(0);
  assert.equal(sdv.getUint16(8, true), 1);
  assert.equal(sdv.getUint16(10, true), N);
  const packed = new Uint8Array(InflightRegion.size(1, N, true));
  const pdv = new DataView(packed.buffer);
  const q = new InflightRegion(packed, 1, N, true).queue(0);
  assert.ok(q instanceof PackedInflightQueue && q.fresh);
  assert.equal(pdv.getUint16(8, true), 1);
  for (let i = 0; i < N; i++) assert.equal(pdv.getUint16(32 + 32 * i + 2, true), i + 1, `next of ${i}`);
  assert.equal(pdv.getUint8(20), 1);
  assert.equal(pdv.getUint8(21), 1);
  // desc_num mismatch on an initialised region
  throwsCode(() => new InflightRegion(packed, 1, 4, true).queue(0), 'INFLIGHT_LAYOUT');
});

/** Split ring with heads 0..5, each one readable descriptor at 0x4000 + 0x100 * i and one writable. */
function splitGuest(): { guest: Uint8Array; dv: DataView } {
  const guest = new Uint8Array(0x10000);
  const dv = new DataView(guest.buffer);
  for (let i = 0; i < 6; i++) {
    guest[0x4000 + 0x100 * i] = 0x10 + i;
    splitDesc(dv, DESC, i, 0x4000 + 0x100 * i, 1, 0);
  }
  return { guest, dv };
}

const QOFF = inflightQueueSize(N, false); // queue 1's region
const sEntry = (i: number): number => QOFF + 16 + 16 * i;

test('inflight split: record, complete, crash, resubmit in counter order', () => {
  const { guest, dv } = splitGuest();
  const inflight = new Uint8Array(InflightRegion.size(2, N, false));
  const idv = new DataView(inflight.buffer);
  availPublish(dv, AVAIL, N, 4, 0, 2, 5);
  const q1 = open(guest, inflight, false);
  const popped = [q1.pop()!, q1.pop()!, q1.pop()!, q1.pop()!];
  assert.deepEqual(
    popped.map((c) => c.id),
    [4, 0, 2, 5],
  );
  for (const [k, head] of [4, 0, 2, 5].entries()) {
    assert.equal(idv.getUint8(sEntry(head)), 1, `head ${head} in flight`);
    assert.equal(u64(idv, sEntry(head) + 8), k, `counter of ${head}`);
  }
  q1.push(popped[2]!, 0); // head 2
  assert.equal(idv.getUint8(sEntry(2)), 0);
  assert.equal(idv.getUint16(QOFF + 12, true), 2, 'last_batch_head');
  assert.equal(idv.getUint16(QOFF + 14, true), 1, 'used_idx');
  q1.pushBatch([popped[3]!], [0]); // head 5
  assert.equal(idv.getUint16(QOFF + 14, true), 2);
  // Crash. A new process, the same guest memory and inflight buffer; QEMU sends base = used idx.
  const q2 = open(guest, inflight, false, { base: 2 });
  assert.equal(q2.base(), 4, 'next avail = used idx 2 + 2 in flight');
  assert.equal(q2.inFlight, 0);
  const again = q2.resubmit();
  assert.deepEqual(
    again.map((c) => [c.id, c.readable[0]![0]]),
    [
      [4, 0x14],
      [0, 0x10],
    ],
  );
  assert.equal(q2.inFlight, 2);
  assert.deepEqual(q2.resubmit(), [], 'only once');
  availPublish(dv, AVAIL, N, 1);
  const next = q2.pop()!;
  assert.equal(next.id, 1);
  assert.equal(u64(idv, sEntry(1) + 8), 2, 'the counter continues after the largest in flight');
  for (const c of [...again, next]) q2.push(c, 0);
  assert.equal(dv.getUint16(USEDR + 2, true), 5);
});

test('inflight split: a crash after the used idx store, before the batch was cleared', () => {
  const { guest, dv } = splitGuest();
  const inflight = new Uint8Array(InflightRegion.size(2, N, false));
  const idv = new DataView(inflight.buffer);
  availPublish(dv, AVAIL, N, 3, 1);
  const q1 = open(guest, inflight, false);
  q1.pop();
  q1.pop();
  // The old process published head 3 by hand and died: used elem, batch list, used idx; inflight not cleared.
  dv.setUint32(USEDR + 4, 3, true);
  idv.setUint16(sEntry(3) + 6, idv.getUint16(QOFF + 12, true), true);
  idv.setUint16(QOFF + 12, 3, true);
  dv.setUint16(USEDR + 2, 1, true);
  assert.equal(idv.getUint8(sEntry(3)), 1);
  const q2 = open(guest, inflight, false);
  assert.equal(idv.getUint8(sEntry(3)), 0, 'the last batch is cleared');
  assert.equal(idv.getUint16(QOFF + 14, true), 1, 'used_idx := used->idx');
  assert.deepEqual(
    q2.resubmit().map((c) => c.id),
    [1],
  );
  assert.equal(q2.base(), 2);
});

test('inflight split: a crash before any completion keeps every head in flight (used idx not 0 at start)', () => {
  // The DPDK/SPDK restart bug area: used_idx 0 in the region against a used ring at 5 cleared desc[0].
  const { guest, dv } = splitGuest();
  dv.setUint16(USEDR + 2, 5, true);
  dv.setUint16(AVAIL + 2, 5, true);
  const inflight = new Uint8Array(InflightRegion.size(2, N, false));
  availPublish(dv, AVAIL, N, 0, 3);
  const q1 = open(guest, inflight, false, { base: 5 });
  assert.equal(new DataView(inflight.buffer).getUint16(QOFF + 14, true), 5, 'used_idx synced when the region is new');
  q1.pop();
  q1.pop();
  const q2 = open(guest, inflight, false, { base: 5 });
  assert.deepEqual(
    q2.resubmit().map((c) => c.id),
    [0, 3],
  );
  assert.equal(q2.base(), 7);
});

test('inflight: a region for a larger queue size serves a smaller ring (the driver shrank it)', () => {
  const { guest, dv } = splitGuest();
  const inflight = new Uint8Array(InflightRegion.size(1, 2 * N, false));
  const region = new InflightRegion(inflight, 1, 2 * N, false);
  const make = () =>
    createDeviceQueue({ memory: memoryOver(guest), size: N, packed: false, desc: DESC, driver: AVAIL, device: USEDR, eventIdx: false, indirect: false, inflight: region.queue(0) });
  availPublish(dv, AVAIL, N, 2);
  make().pop();
  assert.deepEqual(
    make().resubmit().map((c) => c.id),
    [2],
  );
  const small = new InflightRegion(new Uint8Array(InflightRegion.size(1, N / 2, false)), 1, N / 2, false);
  throwsCode(
    () => createDeviceQueue({ memory: memoryOver(guest), size: N, packed: false, desc: DESC, driver: AVAIL, device: USEDR, eventIdx: false, indirect: false, inflight: small.queue(0) }),
    'INFLIGHT_LAYOUT',
  );
});

test('inflight split: a crash after a batch of two was published clears both', () => {
  const { guest, dv } = splitGuest();
  const inflight = new Uint8Array(InflightRegion.size(2, N, false));
  const idv = new DataView(inflight.buffer);
  availPublish(dv, AVAIL, N, 3, 1, 4);
  const q1 = open(guest, inflight, false);
  q1.pop();
  q1.pop();
  q1.pop();
  // By hand, as push() does it for a batch: heads 4 then 1 linked into the last-batch list, used idx += 2.
  for (const [slot, head] of [4, 1].entries()) {
    dv.setUint32(USEDR + 4 + 8 * slot, head, true);
    idv.setUint16(sEntry(head) + 6, idv.getUint16(QOFF + 12, true), true);
    idv.setUint16(QOFF + 12, head, true);
  }
  dv.setUint16(USEDR + 2, 2, true);
  const q2 = open(guest, inflight, false);
  assert.deepEqual(
    q2.resubmit().map((c) => c.id),
    [3],
  );
  assert.equal(idv.getUint8(sEntry(1)), 0);
  assert.equal(idv.getUint8(sEntry(4)), 0);
  assert.equal(q2.base(), 3);
});

/** Packed ring of 8: chain A (ids on last: 1) slots 0-1, B (2) slot 2, C (3) slot 3. */
function packedGuest(): { guest: Uint8Array; dv: DataView } {
  const guest = new Uint8Array(0x10000);
  const dv = new DataView(guest.buffer);
  for (let i = 0; i < 4; i++) guest[0x4000 + 0x100 * i] = 0x20 + i;
  packedDesc(dv, DESC, 1, 0x4100, 1, 1, availBits(true) | WRITE);
  packedDesc(dv, DESC, 0, 0x4000, 1, 0x99, availBits(true) | NEXT);
  packedDesc(dv, DESC, 2, 0x4200, 1, 2, availBits(true));
  packedDesc(dv, DESC, 3, 0x4300, 1, 3, availBits(true));
  return { guest, dv };
}

const PQOFF = inflightQueueSize(N, true);
const pEntry = (i: number): number => PQOFF + 32 + 32 * i;

test('inflight packed: record copies descriptors, completion relinks the free list', () => {
  const { guest } = packedGuest();
  const inflight = new Uint8Array(InflightRegion.size(2, N, true));
  const idv = new DataView(inflight.buffer);
  const q1 = open(guest, inflight, true);
  const a = q1.pop()!;
  assert.equal(a.id, 1);
  // entry 0 is A's head: inflight 1, num 2, last 1, counter 0; entries 0 and 1 hold the two descriptors
  assert.equal(idv.getUint8(pEntry(0)), 1);
  assert.equal(idv.getUint16(pEntry(0) + 6, true), 2, 'num');
  assert.equal(idv.getUint16(pEntry(0) + 4, true), 1, 'last');
  assert.equal(u64(idv, pEntry(0) + 8), 0, 'counter');
  assert.equal(idv.getUint16(pEntry(0) + 16, true), 0x99, 'id copied');
  assert.equal(idv.getUint16(pEntry(0) + 18, true), availBits(true) | NEXT, 'flags copied');
  assert.equal(idv.getUint32(pEntry(0) + 20, true), 1, 'len copied');
  assert.equal(u64(idv, pEntry(0) + 24), 0x4000, 'addr copied');
  assert.equal(u64(idv, pEntry(1) + 24), 0x4100);
  assert.equal(idv.getUint16(PQOFF + 12, true), 2, 'free_head');
  assert.equal(idv.getUint16(PQOFF + 14, true), 2, 'old_free_head');
  q1.push(a, 1);
  assert.equal(idv.getUint8(pEntry(0)), 0);
  assert.equal(idv.getUint16(PQOFF + 12, true), 0, 'free_head back to A');
  assert.equal(idv.getUint16(pEntry(1) + 2, true), 2, "A's last links to the old free head");
  assert.equal(idv.getUint16(PQOFF + 14, true), 0, 'old_free_head committed');
  assert.equal(idv.getUint16(PQOFF + 16, true), 2, 'used_idx');
  assert.equal(idv.getUint16(PQOFF + 18, true), 2, 'old_used_idx');
  assert.equal(idv.getUint8(PQOFF + 20), 1);
  assert.equal(idv.getUint8(PQOFF + 21), 1);
});

test('inflight packed: crash and resubmit in counter order, rebuilt from the copies', () => {
  const { guest, dv } = packedGuest();
  const inflight = new Uint8Array(InflightRegion.size(2, N, true));
  const q1 = open(guest, inflight, true);
  const [a, b, c] = [q1.pop()!, q1.pop()!, q1.pop()!];
  assert.deepEqual(
    [a.id, b.id, c.id],
    [1, 2, 3],
  );
  q1.push(b, 0); // used slot 0
  // The driver reuses B's ring slot 0 for something else: the copies, not the ring, rebuild A.
  packedDesc(dv, DESC, 0, 0x4300, 1, 0x77, 0);
  const q2 = open(guest, inflight, true); // QEMU cannot give a base for packed after a crash
  // used side from the region (slot 1, wrap 1), avail side 1 + the 3 descriptors of A and C
  assert.equal(q2.base(), (1 | 0x8000) * 0x10000 + (4 | 0x8000));
  const again = q2.resubmit();
  assert.deepEqual(
    again.map((x) => [x.id, x.descCount, x.readable.length, x.readable[0]![0]]),
    [
      [1, 2, 1, 0x20],
      [3, 1, 1, 0x23],
    ],
  );
  assert.equal(again[0]!.writableBytes, 1);
  assert.equal(q2.inFlight, 2);
  q2.push(again[1]!, 0);
  q2.push(again[0]!, 1);
  assert.equal(q2.base(), (4 | 0x8000) + (4 | 0x8000) * 0x10000);
});

test('inflight packed: crash mid-completion, published (commit) or not (roll back)', () => {
  for (const published of [true, false]) {
    const { guest, dv } = packedGuest();
    const inflight = new Uint8Array(InflightRegion.size(2, N, true));
    const region = new InflightRegion(inflight, 2, N, true);
    const memory = memoryOver(guest);
    const q1 = createDeviceQueue({ memory, size: N, packed: true, desc: DESC, driver: AVAIL, device: USEDR, eventIdx: false, indirect: false, inflight: region.queue(1) });
    const a = q1.pop()!;
    q1.pop();
    // The old process began completing A (entries freed, used side moved) and died before clearing it.
    const iq = region.queue(1) as PackedInflightQueue;
    iq.free(0);
    iq.setUsed(2, true);
    if (published) {
      dv.setUint16(DESC + 12, a.id, true);
      dv.setUint16(DESC + 14, 0x8080, true); // used, wrap 1
    }
    const q2 = open(guest, inflight, true);
    assert.deepEqual(
      q2.resubmit().map((x) => x.id),
      published ? [2] : [1, 2],
      published ? 'A was published: committed' : 'A was not published: rolled back',
    );
    assert.equal(q2.base() >>> 16, published ? 0x8002 : 0x8000);
    assert.equal(q2.base() & 0xffff, 0x8003);
  }
});
