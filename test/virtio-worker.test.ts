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
/** A wait longer than this without a kick / interrupt while work is pending counts as lost (a 2 s stall of the other thread is not expected). */
const WAIT_MS = 2000;

interface Setup {
  guest: SharedArrayBuffer;
  ctl: SharedArrayBuffer;
  eventIdx: boolean;
  packed: boolean;
}

/** The device: echo each request's bytes reversed into its writable buffer. */
function device({ guest, ctl, eventIdx, packed }: Setup): void {
  const memory = new GuestMemory();
  memory.add({ guestPhysAddr: 0, size: MEM, userAddr: 0, mmapOffset: 0 }, new Uint8Array(guest));
  const c32 = new Int32Array(ctl);
  const q = createDeviceQueue({ memory, size: N, packed, desc: DESC, driver: AVAIL, device: USEDR, eventIdx, indirect: false });
  let lostKicks = 0;
  let processed = 0;
  /** The last wait timed out: work found now was made available without a kick reaching us. */
  let timedOut = false;
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
      if (timedOut) lostKicks++;
      q.pushBatch(batch, written);
      processed += batch.length;
      batch.length = 0;
      written.length = 0;
      if (q.needsNotify()) {
        Atomics.add(c32, IRQ, 1);
        Atomics.notify(c32, IRQ);
      }
    }
    timedOut = false;
    if (Atomics.load(c32, STOP) !== 0) break;
    const seen = Atomics.load(c32, KICK);
    if (q.enableNotifications()) continue;
    timedOut = Atomics.wait(c32, KICK, seen, WAIT_MS) === 'timed-out';
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
  const device = startDevice({ guest, ctl, eventIdx, packed: false });

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
    if (Atomics.wait(c32, IRQ, seen, WAIT_MS) === 'timed-out' && Atomics.load(used16, 1) !== lastUsed) lostIrqs++;
    if (!eventIdx) Atomics.store(avail16, 0, NO_INTERRUPT);
  }
  await device.stop(total, lostIrqs);
}

/** The device on a worker; stop() ends it and checks its counts. */
function startDevice(setup: Setup): { stop(total: number, lostIrqs: number): Promise<void> } {
  const worker = new Worker(new URL(import.meta.url), { workerData: { virtioDevice: true, setup } });
  const result = new Promise<{ lostKicks: number; processed: number }>((resolve, reject) => {
    worker.once('message', resolve);
    worker.once('error', reject);
  });
  const c32 = new Int32Array(setup.ctl);
  return {
    async stop(total, lostIrqs) {
      Atomics.store(c32, STOP, 1);
      Atomics.add(c32, KICK, 1);
      Atomics.notify(c32, KICK);
      const r = await result;
      await worker.terminate();
      assert.equal(r.processed, total);
      assert.equal(r.lostKicks, 0, 'no kick lost');
      assert.equal(lostIrqs, 0, 'no interrupt lost');
    },
  };
}

/**
 * The packed driver: chains of two descriptors (readable, writable) with the
 * buffer id on the second, the first made available last; used descriptors
 * read at the driver's used slot; kicks and interrupts through the event areas.
 */
async function runPacked(eventIdx: boolean, total: number): Promise<void> {
  const guest = new SharedArrayBuffer(MEM);
  const ctl = new SharedArrayBuffer(16);
  const dv = new DataView(guest);
  const bytes = new Uint8Array(guest);
  const ring16 = new Uint16Array(guest, DESC, 8 * N);
  const drv16 = new Uint16Array(guest, AVAIL, 2); // driver event suppression (we write)
  const dev16 = new Uint16Array(guest, USEDR, 2); // device event suppression (we read)
  const c32 = new Int32Array(ctl);
  const device = startDevice({ guest, ctl, eventIdx, packed: true });
  const NEXT_F = 1;
  const WRITE_F = 2;
  const AVAIL_F = 0x80;
  const USED_F = 0x8000;
  const freeIds: number[] = Array.from({ length: N / 2 }, (_, i) => i);
  const pending = new Map<number, { len: number; seed: number }>();
  let apos = 0; // descriptors made available, free-running
  let upos = 0; // descriptors used, free-running
  let submitted = 0;
  let completed = 0;
  let lostIrqs = 0;
  const slotOf = (pos: number): number => pos % N;
  const wrapOf = (pos: number): boolean => Math.floor(pos / N) % 2 === 0; // lap 0 has wrap counter 1
  const availFlags = (pos: number): number => (wrapOf(pos) ? AVAIL_F : USED_F);
  while (completed < total) {
    const old = apos;
    while (freeIds.length > 0 && submitted < total) {
      const id = freeIds.pop()!;
      const len = 1 + ((submitted * 37) % 200);
      const seed = submitted & 0xff;
      const rbuf = BUF + id * 512;
      for (let i = 0; i < len; i++) bytes[rbuf + i] = (seed + i) & 0xff;
      const s0 = slotOf(apos);
      const s1 = slotOf(apos + 1);
      dv.setBigUint64(DESC + 16 * s1, BigInt(rbuf + 256), true);
      dv.setUint32(DESC + 16 * s1 + 8, 256, true);
      dv.setUint16(DESC + 16 * s1 + 12, id, true);
      dv.setUint16(DESC + 16 * s1 + 14, WRITE_F | availFlags(apos + 1), true);
      dv.setBigUint64(DESC + 16 * s0, BigInt(rbuf), true);
      dv.setUint32(DESC + 16 * s0 + 8, len, true);
      dv.setUint16(DESC + 16 * s0 + 12, 0xffff, true);
      Atomics.store(ring16, s0 * 8 + 7, NEXT_F | availFlags(apos)); // publishes the chain
      pending.set(id, { len, seed });
      apos += 2;
      submitted++;
    }
    if (apos !== old) {
      const flags = Atomics.load(dev16, 1) & 3;
      let kick = flags === 0;
      if (flags === 2) {
        const offWrap = Atomics.load(dev16, 0);
        const lap = Math.floor((apos - 1) / N);
        const evLap = ((offWrap & 0x8000) !== 0) === wrapOf(lap * N) ? lap : lap - 1;
        const ev = evLap * N + (offWrap & 0x7fff);
        kick = ev >= old && ev < apos;
      }
      if (kick) {
        Atomics.add(c32, KICK, 1);
        Atomics.notify(c32, KICK);
      }
    }
    let reaped = 0;
    for (;;) {
      const s = slotOf(upos);
      const f = Atomics.load(ring16, s * 8 + 7);
      const w = wrapOf(upos);
      if (((f & AVAIL_F) !== 0) !== w || ((f & USED_F) !== 0) !== w) break;
      const id = dv.getUint16(DESC + 16 * s + 12, true);
      const len = dv.getUint32(DESC + 16 * s + 8, true);
      const p = pending.get(id);
      assert.ok(p, `used id ${id} was not pending`);
      assert.equal(len, p.len);
      assert.equal((f & WRITE_F) !== 0, len > 0);
      const wbuf = BUF + id * 512 + 256;
      for (let i = 0; i < len; i++) {
        if (bytes[wbuf + i] !== ((p.seed + len - 1 - i) & 0xff)) assert.fail(`reply of ${id} byte ${i}`);
      }
      pending.delete(id);
      freeIds.push(id);
      upos += 2;
      completed++;
      reaped++;
    }
    if (reaped > 0 || (freeIds.length > 0 && submitted < total)) continue;
    const seen = Atomics.load(c32, IRQ);
    if (eventIdx) {
      Atomics.store(drv16, 0, slotOf(upos) | (wrapOf(upos) ? 0x8000 : 0));
      Atomics.store(drv16, 1, 2); // DESC
    } else {
      Atomics.store(drv16, 1, 0); // ENABLE
    }
    const s = slotOf(upos);
    const f = Atomics.load(ring16, s * 8 + 7);
    const usedNow = ((f & AVAIL_F) !== 0) === wrapOf(upos) && ((f & USED_F) !== 0) === wrapOf(upos);
    if (!usedNow) {
      const r = Atomics.wait(c32, IRQ, seen, WAIT_MS);
      const f2 = Atomics.load(ring16, s * 8 + 7);
      if (r === 'timed-out' && ((f2 & AVAIL_F) !== 0) === wrapOf(upos) && ((f2 & USED_F) !== 0) === wrapOf(upos)) lostIrqs++;
    }
    Atomics.store(drv16, 1, 1); // DISABLE while busy
  }
  await device.stop(total, lostIrqs);
}

if (isMainThread) {
  test('worker: split ring driven from another thread, EVENT_IDX', async () => {
    await run(true, 20000);
  });

  test('worker: split ring driven from another thread, flags', async () => {
    await run(false, 20000);
  });

  test('worker: packed ring driven from another thread, EVENT_IDX (DESC events)', async () => {
    await runPacked(true, 20000);
  });

  test('worker: packed ring driven from another thread, ENABLE/DISABLE', async () => {
    await runPacked(false, 20000);
  });
}
