/**
 * The device side on a worker thread, a hand-written split-ring driver on the
 * main thread, the same SharedArrayBuffer as guest memory. The driver checks
 * every reply; both sides sleep on Atomics.wait between kicks / interrupts, so
 * a lost kick or interrupt shows up as a wait that timed out with work pending.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { isMainThread, parentPort, Worker, workerData } from 'node:worker_threads';
import { createDeviceQueue, GuestMemory, vringNeedEvent, type DescChain } from '../src/virtio/index.js';
import { NEXT, splitDesc, WRITE } from './virtio-fixtures.test.js';

const N = 64;
const DESC = 0x1000;
const AVAIL = 0x2000;
const USEDR = 0x3000;
const BUF = 0x10000;
const MEM = BUF + N * 256;
/** Control words (Int32Array over its own SharedArrayBuffer). */
const KICK = 0;
const IRQ = 1;
const STOP = 2;

interface Setup {
  guest: SharedArrayBuffer;
  ctl: SharedArrayBuffer;
  eventIdx: boolean;
}

/** The device: echo each request's bytes reversed into its writable buffer. */
function device({ guest, ctl, eventIdx }: Setup): void {
  const memory = new GuestMemory();
  memory.add({ guestPhysAddr: 0, size: MEM, userAddr: 0, mmapOffset: 0 }, new Uint8Array(guest));
  const c32 = new Int32Array(ctl);
  const avail16 = new Uint16Array(guest, AVAIL, 2);
  const q = createDeviceQueue({ memory, size: N, packed: false, desc: DESC, driver: AVAIL, device: USEDR, eventIdx, indirect: false });
  let lostKicks = 0;
  let processed = 0;
  const batch: DescChain[] = [];
  const written: number[] = [];
  for (;;) {
    q.disableNotifications();
    for (let c = q.pop(); c !== null; c = q.pop()) {
      const src = c.readable[0]!;
      const dst = c.writable[0]!;
      for (let i = 0; i < src.length; i++) dst[i] = src[src.length - 1 - i]!;
      batch.push(c);
      written.push(src.length);
    }
    if (batch.length > 0) {
      q.pushBatch(batch, written);
      processed += batch.length;
      batch.length = 0;
      written.length = 0;
      if (q.needsNotify()) {
        Atomics.add(c32, IRQ, 1);
        Atomics.notify(c32, IRQ);
      }
      continue;
    }
    if (Atomics.load(c32, STOP) !== 0) break;
    const seen = Atomics.load(c32, KICK);
    if (q.enableNotifications()) continue;
    if (Atomics.wait(c32, KICK, seen, 500) === 'timed-out' && Atomics.load(avail16, 1) !== q.base()) lostKicks++;
  }
  parentPort!.postMessage({ lostKicks, processed });
}

if (!isMainThread && (workerData as { virtioDevice?: boolean } | null)?.virtioDevice === true) {
  device((workerData as { setup: Setup }).setup);
}

/** The driver: TOTAL requests, up to N / 2 in flight, each reply checked. */
async function run(eventIdx: boolean, total: number): Promise<void> {
  const guest = new SharedArrayBuffer(MEM);
  const ctl = new SharedArrayBuffer(16);
  const dv = new DataView(guest);
  const bytes = new Uint8Array(guest);
  const avail16 = new Uint16Array(guest, AVAIL, 4 + 2 * N);
  const used16 = new Uint16Array(guest, USEDR, 4 + 8 * N);
  const c32 = new Int32Array(ctl);
  const worker = new Worker(new URL(import.meta.url), { workerData: { virtioDevice: true, setup: { guest, ctl, eventIdx } } });
  const result = new Promise<{ lostKicks: number; processed: number }>((resolve, reject) => {
    worker.once('message', resolve);
    worker.once('error', reject);
  });

  const free: number[] = Array.from({ length: N }, (_, i) => N - 1 - i);
  const pending = new Map<number, { w: number; len: number; seed: number }>();
  let availIdx = 0;
  let lastUsed = 0;
  let submitted = 0;
  let completed = 0;
  let lostIrqs = 0;
  const NO_INTERRUPT = 1;
  const NO_NOTIFY = 1;
  while (completed < total) {
    const old = availIdx;
    while (free.length >= 2 && submitted < total) {
      const r = free.pop()!;
      const w = free.pop()!;
      const len = 1 + ((submitted * 37) % 200);
      const seed = submitted & 0xff;
      for (let i = 0; i < len; i++) bytes[BUF + r * 256 + i] = (seed + i) & 0xff;
      splitDesc(dv, DESC, r, BUF + r * 256, len, NEXT, w);
      splitDesc(dv, DESC, w, BUF + w * 256, 256, WRITE);
      dv.setUint16(AVAIL + 4 + 2 * (availIdx % N), r, true);
      availIdx = (availIdx + 1) & 0xffff;
      Atomics.store(avail16, 1, availIdx); // publishes the entry (and the descriptors before it)
      pending.set(r, { w, len, seed });
      submitted++;
    }
    if (availIdx !== old) {
      // Atomics.store above and the loads here are sequentially consistent: the driver's full barrier.
      const kick = eventIdx
        ? vringNeedEvent(Atomics.load(used16, 2 + 4 * N), availIdx, old)
        : (Atomics.load(used16, 0) & NO_NOTIFY) === 0;
      if (kick) {
        Atomics.add(c32, KICK, 1);
        Atomics.notify(c32, KICK);
      }
    }
    let reaped = 0;
    for (let u = Atomics.load(used16, 1); lastUsed !== u; lastUsed = (lastUsed + 1) & 0xffff) {
      const e = USEDR + 4 + 8 * (lastUsed % N);
      const id = dv.getUint32(e, true);
      const len = dv.getUint32(e + 4, true);
      const p = pending.get(id);
      assert.ok(p, `used id ${id} was not pending`);
      assert.equal(len, p.len);
      for (let i = 0; i < len; i++) {
        const want = (p.seed + len - 1 - i) & 0xff;
        if (bytes[BUF + p.w * 256 + i] !== want) assert.fail(`reply of ${id} byte ${i}`);
      }
      pending.delete(id);
      free.push(id, p.w);
      completed++;
      reaped++;
    }
    if (reaped > 0 || (free.length >= 2 && submitted < total)) continue;
    // Nothing to do: ask for an interrupt, re-check, sleep.
    const seen = Atomics.load(c32, IRQ);
    if (eventIdx) Atomics.store(avail16, 2 + N, lastUsed);
    else Atomics.store(avail16, 0, 0);
    if (Atomics.load(used16, 1) !== lastUsed) continue;
    if (Atomics.wait(c32, IRQ, seen, 500) === 'timed-out' && Atomics.load(used16, 1) !== lastUsed) lostIrqs++;
    if (!eventIdx) Atomics.store(avail16, 0, NO_INTERRUPT);
  }
  Atomics.store(c32, STOP, 1);
  Atomics.add(c32, KICK, 1);
  Atomics.notify(c32, KICK);
  const r = await result;
  await worker.terminate();
  assert.equal(r.processed, total);
  assert.equal(r.lostKicks, 0, 'no kick lost');
  assert.equal(lostIrqs, 0, 'no interrupt lost');
}

if (isMainThread) {
  test('worker: split ring driven from another thread, EVENT_IDX', async () => {
    await run(true, 20000);
  });

  test('worker: split ring driven from another thread, flags', async () => {
    await run(false, 20000);
  });
}
