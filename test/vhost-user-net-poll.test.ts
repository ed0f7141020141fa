/**
 * The polling mode: the switch on a worker thread (NetSwitchThread), one port
 * busy-polled, one event-driven, each driven by the hand-written driver of
 * test/helpers/net-driver.ts on the main thread over real sockets and memfd
 * memory. A polled TX ring is served without any kick and has its kick
 * notifications switched off (read from the ring bytes at the spec's offsets:
 * split used->flags = VRING_USED_F_NO_NOTIFY, packed device event suppression
 * flags = RING_EVENT_FLAGS_DISABLE); an event-driven ring still waits for kicks;
 * the poll loop stops spinning when no polled ring is left.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { NetSwitchThread } from '../src/devices/net-switch-thread.js';
import { NetDriver, ethFrame } from './helpers/net-driver.js';

const MAC_A = '52:54:00:00:00:0a';
const MAC_B = '52:54:00:00:00:0b';
const BCAST = 'ff:ff:ff:ff:ff:ff';
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

for (const packed of [false, true]) {
  test(`a polled port is served without kicks, kicks off; an event-driven one waits for them (${packed ? 'packed' : 'split'})`, async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdevkit-poll-'));
    const a = path.join(dir, 'a.sock');
    const b = path.join(dir, 'b.sock');
    const sw = await NetSwitchThread.start({ ports: [{ path: a, device: { poll: true } }, { path: b }] });
    const ds: NetDriver[] = [];
    try {
      // Without EVENT_IDX the split ring's suppression is the used ring's flags word.
      const da = await NetDriver.open(a, { packed, eventIdx: false });
      ds.push(da);
      const db = await NetDriver.open(b, { packed, eventIdx: false });
      ds.push(db);
      da.postRx(0, 32);
      db.postRx(0, 32);
      const tx = da.rings[1]!;
      const flagsAt = packed ? tx.device + 2 : tx.device;
      for (let i = 0; i < 200 && da.mem.getUint16(flagsAt, true) !== 1; i++) await sleep(5);
      assert.equal(da.mem.getUint16(flagsAt, true), 1, 'the polled TX ring asks for no kicks');
      assert.equal(db.mem.getUint16(db.rings[1]!.device + (packed ? 2 : 0), true), 0, 'the event-driven TX ring wants kicks');

      // A sends without kicking: B gets the frames all the same.
      const fa = [ethFrame(BCAST, MAC_A, 60, 1), ethFrame(MAC_B, MAC_A, 1514, 2), ethFrame(MAC_B, MAC_A, 333, 3)];
      da.send(0, fa, { kick: false });
      assert.deepEqual(await db.receive(0, 3), fa);
      const used = await da.waitUsed(1, 3);
      assert.equal(used.length, 3, 'the TX chains were used');

      // B sends without kicking: nothing moves until it kicks.
      const fb = ethFrame(MAC_A, MAC_B, 100, 4);
      db.send(0, [fb], { kick: false });
      assert.deepEqual(await da.receive(0, 0, { settleMs: 150 }), [], 'an event-driven ring is not polled');
      db.kicks[1]!.signal();
      assert.deepEqual(await da.receive(0, 1), [fb]);

      const snap = await sw.snapshot();
      assert.equal(snap[0]!.txPackets, 3);
      assert.equal(snap[1]!.rxPackets, 3);
      assert.equal(snap[1]!.txPackets, 1);
      assert.equal(snap[0]!.rxPackets, 1);

      // The poll loop spins while A is up and stops once its rings are gone.
      const p1 = await sw.pollPasses();
      await sleep(50);
      const p2 = await sw.pollPasses();
      assert.ok(p2 > p1, `the poll loop runs (${p1} -> ${p2})`);
      da.close();
      ds.shift();
      let p3 = await sw.pollPasses();
      for (let i = 0; i < 100; i++) {
        await sleep(20);
        const p4 = await sw.pollPasses();
        if (p4 === p3) break;
        p3 = p4;
      }
      await sleep(50);
      assert.equal(await sw.pollPasses(), p3, 'no polled ring left: the loop sleeps');
    } finally {
      for (const d of ds) d.close();
      await sw.close();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
}

test('NetSwitchThread.start rejects a port it cannot open, and the worker ends', async () => {
  await assert.rejects(
    NetSwitchThread.start({ ports: [{ path: path.join(os.tmpdir(), 'vdevkit-no-such-dir', 'x', 'a.sock') }] }),
    /ENOENT|no such|cannot/i,
  );
});

test('a polled port holds frames while the receiver has no RX buffer, and drops them after holdMs', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdevkit-poll-'));
  const a = path.join(dir, 'a.sock');
  const b = path.join(dir, 'b.sock');
  const c = path.join(dir, 'c.sock');
  // A holds for a long time, C not at all; B is the receiver.
  const sw = await NetSwitchThread.start({
    ports: [{ path: a, device: { poll: true, holdMs: 60_000 } }, { path: b }, { path: c, device: { poll: true, holdMs: 0 } }],
  });
  const ds: NetDriver[] = [];
  try {
    const da = await NetDriver.open(a);
    ds.push(da);
    const db = await NetDriver.open(b);
    ds.push(db);
    await sleep(50);
    // Only A and B up: A's broadcast has one receiver, which has no buffer.
    const fa = [ethFrame(BCAST, MAC_A, 60, 1), ethFrame(BCAST, MAC_A, 61, 2), ethFrame(BCAST, MAC_A, 62, 3)];
    da.send(0, fa);
    await sleep(200);
    let snap = await sw.snapshot();
    assert.equal(snap[1]!.drops['no-rx-buffer'], 0, 'held, not dropped');
    assert.equal(snap[0]!.txPackets, 0, 'not sent yet');
    assert.deepEqual(await da.waitUsed(1, 0, 10), [], 'A keeps its TX buffers');
    db.postRx(0, 2);
    assert.deepEqual(await db.receive(0, 2), fa.slice(0, 2), 'the first two, in order, as buffers came');
    db.postRx(0, 2);
    assert.deepEqual(await db.receive(0, 1), fa.slice(2));
    assert.equal((await da.waitUsed(1, 3)).length, 3);
    snap = await sw.snapshot();
    assert.equal(snap[0]!.txPackets, 3);
    assert.equal(snap[1]!.rxPackets, 3);
    assert.equal(snap[1]!.drops['no-rx-buffer'], 0);

    // C (holdMs 0) unicast to A, which has no buffer: dropped at once, C's buffers used.
    const dc = await NetDriver.open(c);
    ds.push(dc);
    await sleep(50);
    dc.send(0, [ethFrame(MAC_A, '52:54:00:00:00:0c', 70, 4)]);
    assert.equal((await dc.waitUsed(1, 1)).length, 1);
    snap = await sw.snapshot();
    assert.equal(snap[0]!.drops['no-rx-buffer'], 1);
  } finally {
    for (const d of ds) d.close();
    await sw.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
