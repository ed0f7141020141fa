/**
 * vhost-user-net ports on the learning switch, each driven over a real UNIX
 * socket by a hand-written driver (test/helpers/net-driver.ts: vhost-user
 * messages as bytes, split and packed rings laid out from the spec, memfd
 * guest memory, eventfd kicks): learning, flooding, MRG_RXBUF with and
 * without, the ring rules (disabled RX gets nothing, disabled TX is
 * discarded), drops with their cause, the control queue, queue pairs,
 * SEND_RARP, NET_SET_MTU, disconnect and reconnect, ageing.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { NetSwitch } from '../src/devices/net-switch.js';
import { macNumber, parseMac, NetCtrl } from '../src/devices/vhost-user-net.js';
import { NetDriver, ethFrame, F, type NetDriverOptions } from './helpers/net-driver.js';
import { u64 } from './helpers/vhost-user-raw.js';

const MAC_A = '52:54:00:00:00:0a';
const MAC_B = '52:54:00:00:00:0b';
const MAC_C = '52:54:00:00:00:0c';
const BCAST = 'ff:ff:ff:ff:ff:ff';

interface PortsOptions {
  ageingMs?: number;
  ports?: Parameters<NetSwitch['listen']>[1];
  /** Driver options, for all ports or per port. */
  drivers?: NetDriverOptions | NetDriverOptions[];
}

/** A switch with `n` listening ports and a driver on each; everything closed after `fn`. */
/** The drivers of the ports, in port order (as many as were asked for). */
type Drivers = [NetDriver, NetDriver, NetDriver];

async function withPorts(n: number, o: PortsOptions, fn: (sw: NetSwitch, d: Drivers, socks: string[]) => Promise<void>): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdevkit-net-'));
  const sw = new NetSwitch(o.ageingMs !== undefined ? { ageingMs: o.ageingMs } : {});
  const socks = Array.from({ length: n }, (_, i) => path.join(dir, `p${i}.sock`));
  for (const s of socks) sw.listen(s, o.ports ?? {});
  const ds: NetDriver[] = [];
  try {
    for (let i = 0; i < n; i++) ds.push(await NetDriver.open(socks[i]!, (Array.isArray(o.drivers) ? o.drivers[i] : o.drivers) ?? {}));
    await new Promise((r) => setTimeout(r, 20)); // rings started: handleQueue ran once
    await fn(sw, ds as Drivers, socks);
  } finally {
    for (const d of ds) d.close();
    sw.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

for (const packed of [false, true]) {
  test(`learning and flooding across three ports (${packed ? 'packed' : 'split'} rings)`, async () => {
    await withPorts(3, { drivers: { packed } }, async (sw, [a, b, c]) => {
      for (const d of [a, b, c]) d.postRx(0, 16);
      assert.ok(a.has(F.MRG_RXBUF), 'MRG_RXBUF acked by default');
      // A broadcasts: B and C get it, A is learned.
      const f1 = ethFrame(BCAST, MAC_A, 60, 1);
      a.send(0, [f1]);
      assert.deepEqual(await b.receive(0, 1), [f1]);
      assert.deepEqual(await c.receive(0, 1), [f1]);
      assert.equal(sw.lookup(macNumber(parseMac(MAC_A)))?.id, 0);
      // B answers A: unicast to a learned MAC reaches only A.
      const f2 = ethFrame(MAC_A, MAC_B, 1514, 2);
      b.send(0, [f2]);
      assert.deepEqual(await a.receive(0, 1), [f2]);
      // A to B (learned now), and to an unknown MAC (flooded to B and C).
      const f3 = ethFrame(MAC_B, MAC_A, 100, 3);
      const f4 = ethFrame(MAC_C, MAC_A, 200, 4);
      a.send(0, [f3, f4], { splitHeader: true });
      assert.deepEqual(await b.receive(0, 2), [f3, f4]);
      assert.deepEqual(await c.receive(0, 1), [f4]);
      assert.deepEqual(await c.receive(0, 0), [], 'C got nothing else');
      assert.deepEqual(await a.receive(0, 0), [], 'nothing came back to A');
      // TX chains completed with len 0, and counters.
      const used = await a.waitUsed(1, 0);
      void used;
      const s = sw.snapshot();
      assert.equal(s[0]!.txPackets, 3);
      assert.equal(s[0]!.txBytes, 60 + 100 + 200);
      assert.equal(s[0]!.rxPackets, 1);
      assert.equal(s[1]!.rxPackets, 3);
      assert.equal(s[2]!.rxPackets, 2);
      assert.equal(s[1]!.rxBytes, 60 + 100 + 200);
      assert.equal(sw.macTable().length, 2);
    });
  });
}

test('split to packed: a frame crosses from a split-ring guest into a packed-ring one and back', async () => {
  await withPorts(2, { drivers: [{ packed: false }, { packed: true }] }, async (_sw, [a, b]) => {
    a.postRx(0, 4);
    b.postRx(0, 4);
    const f1 = ethFrame(MAC_B, MAC_A, 64, 5);
    a.send(0, [f1]);
    assert.deepEqual(await b.receive(0, 1), [f1]);
    const f2 = ethFrame(MAC_A, MAC_B, 1000, 6);
    b.send(0, [f2]);
    assert.deepEqual(await a.receive(0, 1), [f2]);
  });
});

test('MRG_RXBUF: a frame over several buffers has num_buffers; without it a small buffer drops the frame', async () => {
  await withPorts(3, { drivers: [{}, { mrg: true }, { mrg: false }] }, async (sw, [a, b, c]) => {
    assert.ok(b.has(F.MRG_RXBUF));
    assert.ok(!c.has(F.MRG_RXBUF));
    b.postRx(0, 8, 512);
    c.postRx(0, 2, 1024, 2); // two descriptors of 512 per chain
    const big = ethFrame(BCAST, MAC_A, 1514, 7);
    const headers: Buffer[] = [];
    a.send(0, [big]);
    assert.deepEqual(await b.receive(0, 1, { headers }), [big]);
    assert.equal(headers[0]!.readUInt16LE(10), 3, 'num_buffers: 12 + 1514 bytes over 512-byte buffers');
    assert.deepEqual(await c.receive(0, 0), [], 'too big for one buffer without MRG_RXBUF');
    assert.equal(sw.snapshot()[2]!.drops['rx-buffer-too-small'], 1);
    // The buffer was kept: a frame that fits takes it (12 + 1000 bytes over its two descriptors).
    const small = ethFrame(BCAST, MAC_A, 1000, 8);
    a.send(0, [small]);
    assert.deepEqual(await c.receive(0, 1), [small]);
    assert.deepEqual(await b.receive(0, 1), [small]);
    // C has one buffer left; two frames: the second is dropped for want of buffers.
    a.send(0, [ethFrame(BCAST, MAC_A, 100, 9), ethFrame(BCAST, MAC_A, 100, 10)]);
    assert.equal((await c.receive(0, 1)).length, 1);
    assert.equal(sw.snapshot()[2]!.drops['no-rx-buffer'], 1);
    // B used 3 + 2 + 1 + 1 of its 8 buffers; a frame needing 3 takes the last one, holds it and is
    // dropped; the held buffer is given back empty (used len 0) when the ring stops.
    assert.equal((await b.receive(0, 2)).length, 2);
    assert.equal(b.rings[0]!.outstanding, 1);
    a.send(0, [ethFrame(BCAST, MAC_A, 1514, 11)]);
    await a.waitUsed(1, 5);
    assert.equal(sw.snapshot()[1]!.drops['no-rx-buffer'], 1);
    assert.equal(b.rings[0]!.used().length, 0, 'nothing completed for the dropped frame');
    assert.equal(await b.stopRing(0), 8, 'GET_VRING_BASE: 8 buffers taken');
    const back = await b.waitUsed(0, 1);
    assert.deepEqual(back.map((u) => u.len), [0], 'the held buffer given back empty');
  });
});

test('ring rules: a disabled RX ring gets no frame; a disabled TX ring is processed and its frames discarded', async () => {
  await withPorts(2, {}, async (sw, [a, b]) => {
    a.postRx(0, 4);
    b.postRx(0, 4);
    await b.enable(0, false);
    a.send(0, [ethFrame(BCAST, MAC_A, 60, 1)]);
    await new Promise((r) => setTimeout(r, 50));
    assert.equal(b.rings[0]!.used().length, 0, 'nothing in the disabled RX ring');
    assert.equal(sw.snapshot()[1]!.drops['rx-not-ready'], 1);
    await b.enable(0, true);
    await new Promise((r) => setTimeout(r, 20));
    const f = ethFrame(BCAST, MAC_A, 60, 2);
    a.send(0, [f]);
    assert.deepEqual(await b.receive(0, 1), [f]);
    // A's TX ring disabled: the chain is still consumed (used, len 0) but goes nowhere.
    await a.enable(1, false);
    a.send(0, [ethFrame(BCAST, MAC_A, 60, 3)]);
    const used = await a.waitUsed(1, 3);
    assert.equal(used.length, 3);
    assert.ok(used.every((u) => u.len === 0));
    assert.deepEqual(await b.receive(0, 0), []);
    assert.equal(sw.snapshot()[0]!.drops['tx-disabled'], 1);
  });
});

test('drops with their cause: runt, oversize after NET_SET_MTU, offload header, no destination', async () => {
  await withPorts(2, {}, async (sw, [a, b]) => {
    b.postRx(0, 8);
    assert.equal(await a.fe.acked(20, u64(1000)), 0n, 'NET_SET_MTU 1000');
    a.send(0, [Buffer.alloc(10)]);
    a.send(0, [ethFrame(BCAST, MAC_A, 1019, 1)]);
    const gso = new Uint8Array(12);
    gso[0] = 1; // NEEDS_CSUM, not negotiated
    a.send(0, [ethFrame(BCAST, MAC_A, 60, 2)], { header: gso });
    const ok = ethFrame(BCAST, MAC_A, 1018, 3);
    a.send(0, [ok]);
    assert.deepEqual(await b.receive(0, 1), [ok]);
    // To itself: A's MAC is learned on A.
    a.send(0, [ethFrame(MAC_A, MAC_A, 60, 4)]);
    await a.waitUsed(1, 5);
    const d = sw.snapshot()[0]!.drops;
    assert.equal(d.runt, 1);
    assert.equal(d.oversize, 1);
    assert.equal(d['bad-header'], 1);
    assert.equal(d['no-destination'], 1);
    assert.equal(await a.fe.acked(20, u64(20)), 1n, 'an MTU below 68 refused');
  });
});

test('control queue: promiscuous off and the MAC table filter; all-multicast; MAC address; bad commands', async () => {
  await withPorts(2, {}, async (sw, [a, b]) => {
    assert.ok(b.has(F.CTRL_VQ) && b.has(F.CTRL_RX));
    b.postRx(0, 16);
    assert.equal(await b.ctrl(NetCtrl.RX, NetCtrl.RX_PROMISC, Uint8Array.of(0)), NetCtrl.OK);
    assert.equal(await b.ctrl(NetCtrl.RX, NetCtrl.RX_ALLMULTI, Uint8Array.of(0)), NetCtrl.OK);
    assert.equal(await b.ctrl(NetCtrl.MAC, NetCtrl.MAC_ADDR_SET, parseMac(MAC_B)), NetCtrl.OK);
    // MAC table: unicast [52:54:00:00:00:0d], multicast [01:00:5e:00:00:01].
    const table = Buffer.alloc(4 + 6 + 4 + 6);
    table.writeUInt32LE(1, 0);
    Buffer.from(parseMac('52:54:00:00:00:0d')).copy(table, 4);
    table.writeUInt32LE(1, 10);
    Buffer.from(parseMac('01:00:5e:00:00:01')).copy(table, 14);
    assert.equal(await b.ctrl(NetCtrl.MAC, NetCtrl.MAC_TABLE_SET, table), NetCtrl.OK);
    const toB = ethFrame(MAC_B, MAC_A, 60, 1);
    const toD = ethFrame('52:54:00:00:00:0d', MAC_A, 60, 2);
    const toE = ethFrame('52:54:00:00:00:0e', MAC_A, 60, 3);
    const m1 = ethFrame('01:00:5e:00:00:01', MAC_A, 60, 4);
    const m2 = ethFrame('01:00:5e:00:00:02', MAC_A, 60, 5);
    const bc = ethFrame(BCAST, MAC_A, 60, 6);
    a.send(0, [toB, toD, toE, m1, m2, bc]);
    assert.deepEqual(await b.receive(0, 4), [toB, toD, m1, bc]);
    assert.equal(sw.snapshot()[1]!.drops.filtered, 2);
    assert.equal(await b.ctrl(NetCtrl.RX, NetCtrl.RX_ALLMULTI, Uint8Array.of(1)), NetCtrl.OK);
    a.send(0, [m2]);
    assert.deepEqual(await b.receive(0, 1), [m2]);
    assert.equal(await b.ctrl(NetCtrl.RX, 5, Uint8Array.of(1)), NetCtrl.ERR, 'NOBCAST needs CTRL_RX_EXTRA');
    assert.equal(await b.ctrl(NetCtrl.MAC, NetCtrl.MAC_TABLE_SET, table.subarray(0, 12)), NetCtrl.ERR, 'a truncated table');
    assert.equal(await b.ctrl(NetCtrl.MQ, NetCtrl.MQ_VQ_PAIRS_SET, Uint8Array.of(1, 0)), NetCtrl.ERR, 'MQ not negotiated');
    assert.equal(await b.ctrl(9, 0, Uint8Array.of()), NetCtrl.ERR, 'unknown class');
    assert.equal(sw.snapshot()[1]!.ctrlErr, 4);
    // GET_CONFIG is not negotiated by this driver's protocol features; the device's MAC moved.
    assert.deepEqual([...sw.ports[1]!.device.mac], [...parseMac(MAC_B)]);
  });
});

test('two queue pairs: a frame sent on transmitq1 arrives on receiveq1; VQ_PAIRS_SET 1 moves it to receiveq0', async () => {
  await withPorts(2, { ports: { queuePairs: 2 }, drivers: { pairs: 2 } }, async (_sw, [a, b]) => {
    assert.ok(a.has(F.MQ));
    for (const d of [a, b]) {
      d.postRx(0, 4);
      d.postRx(1, 4);
    }
    const f0 = ethFrame(BCAST, MAC_A, 60, 1);
    const f1 = ethFrame(BCAST, MAC_A, 61, 2);
    a.send(0, [f0]);
    a.send(1, [f1]);
    assert.deepEqual(await b.receive(0, 1), [f0]);
    assert.deepEqual(await b.receive(1, 1), [f1]);
    assert.equal(await b.ctrl(NetCtrl.MQ, NetCtrl.MQ_VQ_PAIRS_SET, Uint8Array.of(1, 0)), NetCtrl.OK);
    const f2 = ethFrame(BCAST, MAC_A, 62, 3);
    a.send(1, [f2]);
    assert.deepEqual(await b.receive(0, 1), [f2]);
  });
});

test('SEND_RARP broadcasts a RARP frame for the MAC to the other ports; the MAC is learned on the port', async () => {
  await withPorts(3, {}, async (sw, [a, b, c]) => {
    b.postRx(0, 2);
    c.postRx(0, 2);
    assert.equal(await a.fe.acked(19, Buffer.concat([Buffer.from(parseMac(MAC_A)), Buffer.alloc(2)])), 0n);
    const [r] = await b.receive(0, 1);
    assert.deepEqual(await c.receive(0, 1), [r]);
    assert.equal(r!.length, 60);
    assert.equal(r!.subarray(0, 6).toString('hex'), 'ffffffffffff');
    assert.equal(r!.subarray(6, 12).toString('hex'), '52540000000a');
    assert.equal(r!.readUInt16BE(12), 0x8035, 'ETH_P_RARP');
    assert.equal(r!.readUInt16BE(20), 3, 'reverse request');
    assert.equal(r!.subarray(32, 38).toString('hex'), '52540000000a', 'target hardware address');
    assert.equal(sw.lookup(macNumber(parseMac(MAC_A)))?.id, 0);
  });
});

test('a port whose front-end disconnects is removed (its MACs forgotten) and a new front-end on it works', async () => {
  await withPorts(2, {}, async (sw, [a, b], socks) => {
    a.postRx(0, 4);
    b.postRx(0, 4);
    b.send(0, [ethFrame(BCAST, MAC_B, 60, 1)]);
    await a.receive(0, 1);
    assert.equal(sw.lookup(macNumber(parseMac(MAC_B)))?.id, 1);
    b.close();
    await new Promise((r) => setTimeout(r, 50));
    assert.equal(sw.ports[1]!.connected, false);
    assert.equal(sw.lookup(macNumber(parseMac(MAC_B))), undefined, 'forgotten');
    a.send(0, [ethFrame(MAC_B, MAC_A, 60, 2)]);
    await a.waitUsed(1, 1);
    assert.equal(sw.snapshot()[0]!.drops['no-destination'], 1, 'no other port up');
    const again = await NetDriver.open(socks[1]!);
    try {
      await new Promise((r) => setTimeout(r, 20));
      assert.equal(sw.ports[1]!.connected, true);
      again.postRx(0, 4);
      const f = ethFrame(MAC_B, MAC_A, 70, 3);
      a.send(0, [f]);
      assert.deepEqual(await again.receive(0, 1), [f]);
    } finally {
      again.close();
    }
  });
});

test('ageing: a learned MAC is forgotten after ageingMs without frames, and unicast to it is flooded again', async () => {
  await withPorts(3, { ageingMs: 60_000 }, async (sw, [a, b, c]) => {
    for (const d of [a, b, c]) d.postRx(0, 4);
    b.send(0, [ethFrame(BCAST, MAC_B, 60, 1)]);
    await a.receive(0, 1);
    await c.receive(0, 1);
    const f = ethFrame(MAC_B, MAC_A, 60, 2);
    a.send(0, [f]);
    await b.receive(0, 1);
    assert.deepEqual(await c.receive(0, 0), [], 'unicast, not flooded');
    sw.tick(Date.now() + 61_000);
    assert.equal(sw.lookup(macNumber(parseMac(MAC_B))), undefined);
    a.send(0, [f]);
    assert.deepEqual(await b.receive(0, 1), [f]);
    assert.deepEqual(await c.receive(0, 1), [f], 'flooded once aged');
  });
});

test('without PROTOCOL_FEATURES the rings start enabled; a legacy-less driver with VERSION_1 has a 12-byte header', async () => {
  await withPorts(2, { ports: { mrgRxbuf: false }, drivers: { protocolFeatures: false } }, async (_sw, [a, b]) => {
    assert.ok(!a.has(F.MRG_RXBUF), 'not offered');
    b.postRx(0, 2);
    const f = ethFrame(BCAST, MAC_A, 60, 1);
    const headers: Buffer[] = [];
    a.send(0, [f]);
    assert.deepEqual(await b.receive(0, 1, { headers }), [f]);
    assert.equal(headers[0]!.readUInt16LE(10), 1, 'num_buffers 1 without MRG_RXBUF');
  });
});
