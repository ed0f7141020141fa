/**
 * virtio-net as a virtio PCI modern device over vfio-user, a port of our
 * switch: our VfioUserClient plays the guest's virtio-net driver (config
 * space walked by hand, the common cfg, the device cfg at virtio 1.2 5.1.4's
 * offsets, RX and TX rings laid out by hand in a memfd DMA window, a
 * virtio_net_hdr before every frame, MSI-X vector eventfds), and a
 * VirtioNetDriver on a vhost-user port of the same switch is the other end.
 * Frames go both ways and are checked byte for byte; split and packed rings,
 * MRG_RXBUF over small buffers, the control queue, two PCI ports on one
 * switch, a reset in the middle of traffic, and migrations: the rings with
 * RX buffers held, the control queue's state (RX filter, MAC table, a MAC set
 * by MAC_ADDR_SET) mid-traffic, and garbled states refused.
 *
 * The guest driver is test/helpers/virtio-net-pci-guest.ts: every offset and
 * bit there is from the spec, none imported from the code under test.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { spawn, spawnSync } from 'node:child_process';
import { VfioUserClient } from '../src/vfio-user/client.js';
import { VfioUserDevice } from '../src/vfio-user/client-device.js';
import { NetSwitch } from '../src/devices/net-switch.js';
import { VirtioNetDriver } from '../src/vhost-user/net-driver.js';
import { NetQueueAdapter, type NetQueueHandle, type VhostUserNetDevice } from '../src/devices/vhost-user-net.js';
import type { VhostQueue } from '../src/vhost-user/backend.js';
import { ethFrame } from './helpers/net-driver.js';
import { tick } from './helpers/sys.js';
import { serveSpec, type Served } from './helpers/vfio-user-serve.js';
import { migrate } from '../src/vfio-user/migrate.js';
import { virtioNetPciDevice, type VirtioNetPciDeviceSpec } from '../src/devices/virtio-net-pci.js';
import { CTRL_RX, CTRL_RX_ALLMULTI, CTRL_RX_PROMISC, CTRL_MAC_TABLE_SET, ctrlCommand, macOf, macTableData, type GuestRing } from './helpers/virtio-net-pci-guest.js';
import { B, CFG_CLASS, CFG_DEVICE, CFG_REVISION, CFG_SUBSYS, CFG_SUBSYS_VENDOR, CFG_VENDOR, CTRL, CTRL_MAC, CTRL_MAC_ADDR_SET, CTRL_OK, C_GF, C_GFSEL, C_NUMQ, C_STATUS, F_CSUM, F_CTRL_MAC_ADDR, F_CTRL_RX, F_CTRL_VQ, F_EVENT_IDX, F_GSO, F_GUEST_CSUM, F_INDIRECT, F_IN_ORDER, F_MAC, F_MQ, F_MRG_RXBUF, F_MTU, F_RING_PACKED, F_STATUS, F_VERSION_1, Guest, HDR, HDR_NUM_BUFFERS, NC_MAC, NC_MTU, NC_PAIRS, NC_STATUS, NET_S_LINK_UP, RAM_BYTES, RAM_GPA, RX, Ram, type Rx, RxQueue, S_ACK, S_DRIVER, S_FEATURES_OK, Split, TX, T_COMMON, T_DEVICE, T_ISR, T_NOTIFY, TxQueue, type Up, bringUp, pciPort, until, S_DRIVER_OK } from './helpers/virtio-net-pci-guest.js';

const MAC_P = '52:54:00:aa:00:01';
const MAC_Q = '52:54:00:aa:00:02';
const MAC_V = '52:54:00:bb:00:01';
const SIZES = [60, 61, 64, 100, 128, 255, 256, 500, 511, 512, 1000, 1024, 1400, 1500, 1514];

async function vhostPort(t: TestContext, sw: NetSwitch, dir: string, packed: boolean): Promise<VirtioNetDriver> {
  const sock = path.join(dir, 'v.sock');
  sw.listen(sock, { mac: MAC_V });
  const nic = await VirtioNetDriver.connect(sock, { packed });
  t.after(() => nic.close());
  return nic;
}

const tmpdir = (): string => fs.mkdtempSync(path.join(os.tmpdir(), 'vdk-vnetpci-'));

/** Frames from the guest's TX to the vhost-user driver: each received byte for byte, the TX chains used with length 0. */
async function pciToVhost(up: Up, nic: VirtioNetDriver, frames: Buffer[]): Promise<void> {
  const got: Buffer[] = [];
  const all = (async () => {
    while (got.length < frames.length) got.push(await nic.receive({ timeoutMs: 5000 }));
  })();
  let used = 0;
  // In slices a ring can hold (each frame takes at most 2 descriptors).
  for (let i = 0; i < frames.length; i += 16) {
    await up.tx.send(frames.slice(i, i + 16));
    await until(() => (used += up.tx.reap()) >= Math.min(frames.length, i + 16), () => `TX used ${used}`);
  }
  await all;
  for (let i = 0; i < frames.length; i++) assert.ok(got[i]!.equals(frames[i]!), `frame ${i} (${frames[i]!.length} bytes) came as ${got[i]!.length} bytes, not the same`);
}

/** Frames from the vhost-user driver into the guest's RX ring, checked byte for byte with their virtio_net_hdr. */
async function vhostToPci(up: Up, nic: VirtioNetDriver, frames: Buffer[], o: { mrg: boolean }): Promise<Rx[]> {
  const start = up.rx.frames.length;
  await nic.sendBatch(frames);
  await until(() => (up.rx.reap(), up.rx.frames.length - start >= frames.length), () => `${up.rx.frames.length - start} of ${frames.length} frames in the guest's RX ring`);
  const got = up.rx.frames.slice(start);
  for (let i = 0; i < frames.length; i++) {
    const r = got[i]!;
    assert.ok(r.frame.equals(frames[i]!), `frame ${i} (${frames[i]!.length} bytes) came as ${r.frame.length} bytes, not the same`);
    assert.deepEqual([...r.hdr.subarray(0, HDR_NUM_BUFFERS)], new Array(HDR_NUM_BUFFERS).fill(0), 'no flags, no GSO, no checksum fields');
    const need = Math.ceil((HDR + frames[i]!.length) / up.rx.bufSize);
    assert.equal(r.buffers, o.mrg ? need : 1, `num_buffers of a ${frames[i]!.length}-byte frame in ${up.rx.bufSize}-byte buffers`);
  }
  return got;
}

test('config space: virtio-net ids and capabilities; features; virtio_net_config at the spec\'s offsets', async (t) => {
  const dir = tmpdir();
  const p = await pciPort(t, dir, 'p.sock', { mac: MAC_P, mtu: 9000 });
  const c = p.guest.config;
  assert.equal(c.readUInt16LE(CFG_VENDOR), 0x1af4);
  assert.equal(c.readUInt16LE(CFG_DEVICE), 0x1041, 'modern virtio-net: 0x1040 + 1');
  assert.equal(c[CFG_REVISION], 1);
  assert.equal(c.readUIntLE(CFG_CLASS, 3), 0x020000, 'network controller, ethernet');
  assert.equal(c.readUInt16LE(CFG_SUBSYS_VENDOR), 0x1af4);
  assert.equal(c.readUInt16LE(CFG_SUBSYS), 1);
  for (const type of [T_COMMON, T_NOTIFY, T_ISR, T_DEVICE]) assert.ok(p.guest.caps.has(type), `virtio capability ${type}`);
  assert.equal(p.guest.caps.get(T_NOTIFY)!.length, 3 * 4, 'three queues (rx, tx, ctrl) in the notify area');
  assert.equal(p.guest.caps.get(T_DEVICE)!.length, 12, 'virtio_net_config: mac, status, max_virtqueue_pairs, mtu');
  assert.equal(p.guest.msixVectors, 4, 'config + 3 queues');
  assert.equal(await p.guest.rd(T_COMMON, C_NUMQ, 2), 3);
  const f = await p.guest.offered();
  for (const [name, bit] of Object.entries({ F_VERSION_1, F_MAC, F_MRG_RXBUF, F_STATUS, F_MTU, F_CTRL_VQ, F_CTRL_RX, F_CTRL_MAC_ADDR, F_EVENT_IDX, F_INDIRECT, F_RING_PACKED })) {
    assert.notEqual(f & bit, 0n, `${name} offered`);
  }
  assert.equal(f & (F_CSUM | F_GUEST_CSUM | F_GSO), 0n, 'no checksum or GSO offloads');
  assert.equal(f & F_MQ, 0n, 'one queue pair: no MQ');
  assert.equal(f & F_IN_ORDER, 0n, 'IN_ORDER is not offered over PCI');
  assert.equal(f & B(30), 0n, 'no vhost-user bit (PROTOCOL_FEATURES)');
  // Device config, by field.
  assert.equal((await p.guest.deviceCfg(NC_MAC, 6)).toString('hex').match(/../g)!.join(':'), MAC_P);
  assert.equal((await p.guest.deviceCfg(NC_STATUS, 2)).readUInt16LE(0), NET_S_LINK_UP);
  assert.equal((await p.guest.deviceCfg(NC_PAIRS, 2)).readUInt16LE(0), 1);
  assert.equal((await p.guest.deviceCfg(NC_MTU, 2)).readUInt16LE(0), 9000);
  // A byte at a time reads the same MAC.
  const bytes = [];
  for (let i = 0; i < 6; i++) bytes.push((await p.guest.deviceCfg(NC_MAC + i, 1))[0]!);
  assert.deepEqual(bytes, MAC_P.split(':').map((h) => parseInt(h, 16)));
  // Two pairs: MQ and max_virtqueue_pairs 2, five queues.
  const q = await pciPort(t, dir, 'q.sock', { mac: MAC_Q, queues: 2 });
  assert.notEqual((await q.guest.offered()) & F_MQ, 0n);
  assert.equal((await q.guest.deviceCfg(NC_PAIRS, 2)).readUInt16LE(0), 2);
  assert.equal(await q.guest.rd(T_COMMON, C_NUMQ, 2), 5);
  assert.equal(q.guest.msixVectors, 6);
  // FEATURES_OK without VERSION_1 is refused.
  await p.guest.wr(T_COMMON, C_STATUS, 1, 0);
  await until(async () => (await p.guest.rd(T_COMMON, C_STATUS, 1)) === 0, () => 'reset');
  await p.guest.wr(T_COMMON, C_STATUS, 1, S_ACK | S_DRIVER);
  await p.guest.wr(T_COMMON, C_GFSEL, 4, 0);
  await p.guest.wr(T_COMMON, C_GF, 4, Number(F_MAC));
  await p.guest.wr(T_COMMON, C_STATUS, 1, S_ACK | S_DRIVER | S_FEATURES_OK);
  assert.equal(await p.guest.rd(T_COMMON, C_STATUS, 1), S_ACK | S_DRIVER);
});

for (const packed of [false, true]) {
  const kind = packed ? 'packed' : 'split';
  // Split: 2048-byte RX buffers (one per frame); packed: 512-byte ones (MRG_RXBUF joins up to 3).
  const rxBuf = packed ? 512 : 2048;
  test(`frames between a PCI port and a vhost-user port of one switch, both ways, byte for byte, MSI-X on RX (${kind} rings, ${rxBuf}-byte RX buffers)`, async (t) => {
    const dir = tmpdir();
    const sw = new NetSwitch();
    t.after(() => sw.close());
    const p = await pciPort(t, dir, 'p.sock', { mac: MAC_P, switch: sw });
    await until(() => p.spec.port.connected, () => 'the PCI port up once a client is attached');
    const up = await bringUp(p, { packed, rxBuf });
    assert.equal(up.features & F_MRG_RXBUF, F_MRG_RXBUF);
    const nic = await vhostPort(t, sw, dir, packed);
    assert.equal(nic.packed, packed);

    const toV = SIZES.map((n, i) => ethFrame(MAC_V, MAC_P, n, i));
    await pciToVhost(up, nic, toV);
    assert.equal(sw.lookup(0x525400aa0001)?.id, p.spec.port.id, "the PCI port's MAC learned on its port");
    const irqBefore = p.guest.interrupts[1 + RX]!;
    const toP = SIZES.map((n, i) => ethFrame(MAC_P, MAC_V, n, 100 + i));
    await vhostToPci(up, nic, [...toP, ...toP], { mrg: true });
    assert.ok(p.guest.interrupts[1 + RX]! > irqBefore, 'MSI-X interrupts on the RX vector');
    // More frames than the RX ring holds buffers: they are re-posted as the guest reaps.
    const many = Array.from({ length: 200 }, (_, i) => ethFrame(MAC_P, MAC_V, 60 + ((i * 97) % 1455), 1000 + i));
    for (let i = 0; i < many.length; i += 20) await vhostToPci(up, nic, many.slice(i, i + 20), { mrg: true });
    const more = Array.from({ length: 100 }, (_, i) => ethFrame(MAC_V, MAC_P, 60 + ((i * 53) % 1455), 2000 + i));
    await pciToVhost(up, nic, more);

    const st = p.spec.net.stats;
    assert.equal(st.txPackets, toV.length + more.length);
    assert.equal(st.txBytes, [...toV, ...more].reduce((n, f) => n + f.length, 0));
    assert.equal(st.rxPackets, 2 * toP.length + many.length);
    assert.equal(Object.values(st.drops).reduce((a, b) => a + b, 0), 0, `no drops: ${JSON.stringify(st.drops)}`);
    assert.equal(nic.totals().rxDrops, 0);
    assert.equal(p.spec.transport.stats.brokenQueues, 0);
  });
}

test('the control queue over PCI: MAC_ADDR_SET changes virtio_net_config.mac, a reset puts the configured one back; without MRG_RXBUF a frame takes one buffer, too big is dropped', async (t) => {
  const dir = tmpdir();
  const sw = new NetSwitch();
  t.after(() => sw.close());
  const p = await pciPort(t, dir, 'p.sock', { mac: MAC_P, switch: sw });
  const want = F_VERSION_1 | F_MAC | F_CTRL_VQ | F_CTRL_MAC_ADDR | F_EVENT_IDX;
  const up = await bringUp(p, { packed: false, rxBuf: 1024, want });
  assert.equal(up.features, want);
  // class, command, the new MAC (readable); the ack byte (writable).
  const cmd = p.ram.alloc(8);
  const ack = p.ram.alloc(1);
  p.ram.b.set([CTRL_MAC, CTRL_MAC_ADDR_SET, 0x52, 0x54, 0x00, 0xaa, 0x00, 0x99], p.ram.at(cmd));
  p.ram.b[p.ram.at(ack)] = 0xff;
  const id = up.ctrl.add([{ gpa: cmd, len: 8 }, { gpa: ack, len: 1, writable: true }]);
  await p.guest.kick(CTRL);
  let used: { id: number; len: number }[] = [];
  await until(() => (used = up.ctrl.used()).length > 0, () => 'the control command used');
  assert.deepEqual(used, [{ id, len: 1 }]);
  assert.equal(p.ram.b[p.ram.at(ack)], CTRL_OK);
  assert.equal((await p.guest.deviceCfg(NC_MAC, 6)).toString('hex'), '525400aa0099');

  const nic = await vhostPort(t, sw, dir, false);
  const fit = [60, 500, 1000, 1012].map((n, i) => ethFrame('52:54:00:aa:00:99', MAC_V, n, i));
  await vhostToPci(up, nic, fit, { mrg: false });
  // 1013 + 12 > 1024: dropped (rx-buffer-too-small), the buffer kept for the next frame.
  await nic.send(ethFrame('52:54:00:aa:00:99', MAC_V, 1013, 9));
  await until(() => p.spec.net.stats.drops['rx-buffer-too-small'] === 1, () => 'the big frame dropped');
  await vhostToPci(up, nic, [ethFrame('52:54:00:aa:00:99', MAC_V, 61, 10)], { mrg: false });

  // A device reset (status 0) puts back the MAC the device was made with, as QEMU's virtio_net_reset.
  await p.guest.wr(T_COMMON, C_STATUS, 1, 0);
  await until(async () => (await p.guest.rd(T_COMMON, C_STATUS, 1)) === 0, () => 'status 0 after reset');
  assert.equal((await p.guest.deviceCfg(NC_MAC, 6)).toString('hex'), MAC_P.replaceAll(':', ''));
});

test('two PCI ports of one switch: frames between two vfio-user guests, both ways, split on one and packed on the other', async (t) => {
  const dir = tmpdir();
  const sw = new NetSwitch();
  t.after(() => sw.close());
  const a = await pciPort(t, dir, 'a.sock', { mac: MAC_P, switch: sw });
  const b = await pciPort(t, dir, 'b.sock', { mac: MAC_Q, switch: sw });
  const ua = await bringUp(a, { packed: false, rxBuf: 1536 });
  const ub = await bringUp(b, { packed: true, rxBuf: 256 });
  for (const [from, to, src, dst, seed] of [[ua, ub, MAC_P, MAC_Q, 1], [ub, ua, MAC_Q, MAC_P, 50]] as const) {
    const frames = SIZES.map((n, i) => ethFrame(dst, src, n, seed + i));
    const start = to.rx.frames.length;
    let used = 0;
    await from.tx.send(frames);
    await until(() => (used += from.tx.reap()) === frames.length, () => `TX used ${used}`);
    await until(() => (to.rx.reap(), to.rx.frames.length - start === frames.length), () => `${to.rx.frames.length - start} received`);
    to.rx.frames.slice(start).forEach((r, i) => {
      assert.ok(r.frame.equals(frames[i]!), `frame ${i} not the same`);
      assert.equal(r.buffers, Math.ceil((HDR + frames[i]!.length) / to.rx.bufSize));
    });
  }
  assert.equal(sw.snapshot().reduce((n, s) => n + Object.values(s.drops).reduce((x, y) => x + y, 0), 0), 0);
});

test('two queue pairs over PCI (MQ): each TX queue reaches the vhost-user driver on its pair, each pair\'s frames land in that RX queue', async (t) => {
  const dir = tmpdir();
  const sw = new NetSwitch();
  t.after(() => sw.close());
  const p = await pciPort(t, dir, 'p.sock', { mac: MAC_P, switch: sw, queues: 2 });
  const features = await p.guest.init(F_VERSION_1 | F_MAC | F_MRG_RXBUF | F_MQ | F_CTRL_VQ);
  assert.equal(features & F_MQ, F_MQ);
  // rx0 0, tx0 1, rx1 2, tx1 3, ctrl 4 (5.1.2).
  const rx = [new RxQueue(p.ram, new Split(p.ram, 32), 2048), new RxQueue(p.ram, new Split(p.ram, 32), 2048)];
  const tx = [new TxQueue(p.ram, new Split(p.ram, 32), p.guest, 1), new TxQueue(p.ram, new Split(p.ram, 32), p.guest, 3)];
  for (let pair = 0; pair < 2; pair++) {
    await p.guest.queue(2 * pair, rx[pair]!.ring);
    await p.guest.queue(2 * pair + 1, tx[pair]!.ring);
  }
  await p.guest.queue(4, new Split(p.ram, 4));
  for (const r of rx) r.post(32);
  await p.guest.driverOk();
  await until(() => p.spec.net.rxReady, () => 'RX running');
  const sock = path.join(dir, 'v.sock');
  sw.listen(sock, { mac: MAC_V, queuePairs: 2 });
  const nic = await VirtioNetDriver.connect(sock, { queuePairs: 2 });
  t.after(() => nic.close());
  for (let pair = 0; pair < 2; pair++) {
    const out = SIZES.map((n, i) => ethFrame(MAC_V, MAC_P, n, 10 * pair + i));
    const got = (async () => {
      const r: Buffer[] = [];
      while (r.length < out.length) r.push(await nic.receive({ queue: pair, timeoutMs: 5000 }));
      return r;
    })();
    let used = 0;
    await tx[pair]!.send(out);
    await until(() => (used += tx[pair]!.reap()) === out.length, () => `TX${pair} used ${used}`);
    assert.deepEqual(await got, out, `pair ${pair}: frames from tx${pair} on the driver's pair ${pair}`);
    const back = SIZES.map((n, i) => ethFrame(MAC_P, MAC_V, n, 100 + 10 * pair + i));
    await nic.sendBatch(back, { queue: pair });
    await until(() => (rx[pair]!.reap(), rx[pair]!.frames.length === back.length), () => `rx${pair}: ${rx[pair]!.frames.length}`);
    assert.deepEqual(rx[pair]!.frames.map((f) => f.frame), back);
  }
  assert.equal(rx[0]!.frames.length, SIZES.length, 'nothing of pair 1 on rx0');
  assert.ok(p.guest.interrupts[1 + 0]! > 0 && p.guest.interrupts[1 + 2]! > 0, 'MSI-X on both RX vectors');
});

test('reset in the middle of traffic: chains the device holds are given back, the reset completes, the port goes on after a new bring-up', async (t) => {
  const dir = tmpdir();
  const sw = new NetSwitch();
  t.after(() => sw.close());
  const p = await pciPort(t, dir, 'p.sock', { mac: MAC_P, switch: sw });
  // Two 512-byte RX buffers: a 1514-byte frame needs 3 (MRG_RXBUF), so the device takes two and holds them.
  const up = await bringUp(p, { packed: false, rxBuf: 512, rxCount: 2, size: 16 });
  const nic = await vhostPort(t, sw, dir, false);
  await pciToVhost(up, nic, [ethFrame(MAC_V, MAC_P, 60, 1)]); // MAC_P learned
  await nic.send(ethFrame(MAC_P, MAC_V, 1514, 2));
  await until(() => p.spec.net.stats.drops['no-rx-buffer'] === 1, () => 'the big frame dropped');
  const rxRing = up.rx.ring as Split;
  assert.equal(rxRing.usedIdx, 0, 'both buffers held by the device, none used yet');
  // Traffic both ways while the driver resets the device: more frames too big for the two held buffers, TX in flight.
  const flood = Array.from({ length: 32 }, (_, i) => ethFrame(MAC_P, MAC_V, 1514 - i, 100 + i));
  const resets = p.spec.transport.stats.resets;
  const sending = nic.sendBatch(flood);
  await up.tx.send(Array.from({ length: 8 }, (_, i) => ethFrame(MAC_V, MAC_P, 70 + i, 200 + i)));
  await p.guest.wr(T_COMMON, C_STATUS, 1, 0);
  await until(async () => (await p.guest.rd(T_COMMON, C_STATUS, 1)) === 0, () => 'status 0: the reset did not wait forever for the held chains');
  await sending;
  assert.equal(p.spec.transport.stats.resets, resets + 1);
  // The two held buffers were given back, used with length 0, before the rings stopped.
  assert.deepEqual(rxRing.used().map((u) => u.len), [0, 0]);
  // Every frame the vhost-user side sent was dropped with a cause (no buffers before the reset, no ring after).
  const st = p.spec.net.stats;
  assert.equal(st.rxPackets, 0);
  assert.equal(st.drops['no-rx-buffer'] + st.drops['rx-not-ready'], 1 + flood.length, JSON.stringify(st.drops));
  assert.ok(p.spec.port.connected, 'the port stays up across a virtio reset');
  // A new bring-up, packed rings elsewhere in RAM: traffic both ways again.
  const again = await bringUp(p, { packed: true, rxBuf: 2048 });
  await vhostToPci(again, nic, SIZES.map((n, i) => ethFrame(MAC_P, MAC_V, n, 300 + i)), { mrg: true });
  const back2 = SIZES.map((n, i) => ethFrame(MAC_V, MAC_P, n, 400 + i));
  // Frames from before the reset may still be arriving: skip anything not from this batch's seed.
  const got: Buffer[] = [];
  const recv = (async () => {
    while (got.length < back2.length) {
      const f = await nic.receive({ timeoutMs: 5000 });
      if (back2.some((b) => b.equals(f))) got.push(f);
    }
  })();
  await again.tx.send(back2.slice(0, 15));
  await recv;
  assert.deepEqual(got, back2.slice(0, 15));
  assert.equal(p.spec.transport.stats.brokenQueues, 0);
});

/**
 * A migration's two servers, PCI ports with MAC_P of one switch, guest RAM mapped in both; the
 * guest brought up on the source; a vhost-user port (MAC_V) on the switch.
 */
async function migrationPair(t: TestContext, o: Parameters<typeof bringUp>[1]) {
  const dir = tmpdir();
  const sw = new NetSwitch();
  t.after(() => sw.close());
  const src = await serveSpec(t, path.join(dir, 'src.sock'), virtioNetPciDevice({ mac: MAC_P, switch: sw }));
  const dst = await serveSpec(t, path.join(dir, 'dst.sock'), virtioNetPciDevice({ mac: MAC_P, switch: sw }));
  const ram = new Ram();
  t.after(() => ram.shm.close());
  for (const c of [src.client, dst.client]) await c.dmaMap({ iova: RAM_GPA, size: RAM_BYTES, memory: ram.shm });
  const g = new Guest(src.dev);
  t.after(() => g.close());
  await g.probe();
  const up = await bringUp({ ...src, guest: g, ram }, o);
  const nic = await vhostPort(t, sw, dir, false);
  return { sw, src, dst, ram, g, up, nic };
}

/** After a migration the VMM leaves the source (its port goes down) and wires the destination's interrupts; the destination runs. */
async function switchOver(t: TestContext, src: Served<VirtioNetPciDeviceSpec>, dst: Served<VirtioNetPciDeviceSpec>): Promise<Guest> {
  src.dev.close();
  src.client.close();
  await until(() => !src.spec.port.connected, () => 'the source port down once its client went');
  const g2 = new Guest(dst.dev);
  t.after(() => g2.close());
  await g2.probe();
  await g2.wireIrqs();
  assert.equal(await g2.rd(T_COMMON, C_STATUS, 1), S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK, 'the destination runs');
  return g2;
}

test('migration of the PCI port between two servers on one switch, RX buffers held at STOP: given back, the destination carries traffic on the same rings', async (t) => {
  const { sw, src, dst, ram, up, nic } = await migrationPair(t, { packed: false, rxBuf: 512, rxCount: 2, size: 32 });
  await pciToVhost(up, nic, SIZES.map((n, i) => ethFrame(MAC_V, MAC_P, n, i)));
  await vhostToPci(up, nic, [ethFrame(MAC_P, MAC_V, 100, 1)], { mrg: true });
  // A frame needing three buffers where two are: the device holds both.
  await nic.send(ethFrame(MAC_P, MAC_V, 1514, 2));
  await until(() => src.spec.net.stats.drops['no-rx-buffer'] === 1, () => 'held');
  await migrate(src.dev, dst.dev);
  // Running on the loaded state, the destination announces the guest's MAC at once (before the guest sends
  // anything): the switch moved MAC_P to its port, and the other ports got RARP broadcasts, 5 rounds spread out.
  assert.equal(sw.lookup(0x525400aa0001)?.id, dst.spec.port.id, "MAC_P learned on the destination port from its announcement");
  const t0 = Date.now();
  for (let i = 0; i < 5; i++) assert.deepEqual(await nic.receive({ timeoutMs: 3000 }), rarpFor(MAC_P), `announcement ${i}: a RARP request for MAC_P`);
  assert.ok(Date.now() - t0 >= 500, `5 rounds 50, 150, 250 and 350 ms apart, not at once (${Date.now() - t0} ms)`);
  up.rx.reap();
  assert.equal(up.rx.empties, 2, 'the two held RX buffers given back (used, length 0) before STOP completed');
  const g2 = await switchOver(t, src, dst);
  assert.equal(dst.spec.net.ackedFeatures, up.features, 'the features the driver accepted, set on the destination');
  // Same rings, served now by the destination: more RX buffers, frames both ways.
  up.rx.post(28);
  const moved = { ...up, tx: new TxQueue(ram, up.tx.ring, g2) };
  await vhostToPci(moved, nic, SIZES.map((n, i) => ethFrame(MAC_P, MAC_V, n, 50 + i)), { mrg: true });
  assert.ok(g2.interrupts[1 + RX]! > 0, "MSI-X on the destination's RX vector");
  await pciToVhost(moved, nic, SIZES.map((n, i) => ethFrame(MAC_V, MAC_P, n, 80 + i)));
  assert.equal(dst.spec.net.stats.rxPackets, SIZES.length);
  assert.equal(dst.spec.net.stats.txPackets, SIZES.length);
  assert.equal(sw.lookup(0x525400aa0001)?.id, dst.spec.port.id, 'MAC_P learned on the destination port');
});

/**
 * A RARP request announcing `mac` (RFC 903 over Ethernet, as QEMU's announce_self_create builds it):
 * broadcast from mac, ethertype 0x8035, htype 1, ptype 0x0800, hlen 6, plen 4, op 3 (request reverse),
 * sender and target hardware address mac, both IPs 0, zero-padded to the 60-byte minimum.
 */
function rarpFor(mac: string): Buffer {
  const m = [...macOf(mac)];
  return Buffer.from([...Array(6).fill(0xff), ...m, 0x80, 0x35, 0, 1, 8, 0, 6, 4, 0, 3, ...m, 0, 0, 0, 0, ...m, 0, 0, 0, 0, ...Array(18).fill(0)]);
}
const isRarp = (f: Buffer): boolean => f.length >= 14 && f.readUInt16BE(12) === 0x8035;

/** The next frame the vhost-user driver receives that is not an announcement (those go to `rarps`). */
async function receiveData(nic: VirtioNetDriver, rarps: Buffer[]): Promise<Buffer> {
  for (;;) {
    const f = await nic.receive({ timeoutMs: 5000 });
    if (!isRarp(f)) return f;
    rarps.push(f);
  }
}

// The RX filter a guest sets before the migrations below: promiscuous and all-multicast off, unicast table
// [L1, L2], multicast table [MC_1], and its own MAC changed to NEW with MAC_ADDR_SET.
const MAC_NEW = '52:54:00:aa:00:77';
const MAC_L1 = '52:54:00:cc:00:01';
const MAC_L2 = '52:54:00:cc:00:02';
const MAC_UNLISTED = '52:54:00:dd:00:01';
const MC_1 = '01:00:5e:00:00:fb';
const MC_2 = '01:00:5e:00:00:01';
const BCAST = 'ff:ff:ff:ff:ff:ff';
const MIG_ERROR = 0, MIG_STOP = 1, MIG_RUNNING = 2; // vfio_device_mig_state (linux/vfio.h)
const F_FILTER = F_VERSION_1 | F_MAC | F_MRG_RXBUF | F_STATUS | F_MTU | F_CTRL_VQ | F_CTRL_RX | F_CTRL_MAC_ADDR;
const macHex = (b: Buffer): string => b.toString('hex').match(/../g)!.join(':');

/** The guest's four control commands (5.1.6.5), each acked OK. */
async function setFilter(g: Guest, ram: Ram, ctrl: GuestRing): Promise<void> {
  assert.equal(await ctrlCommand(g, ram, ctrl, CTRL_RX, CTRL_RX_PROMISC, Buffer.from([0])), CTRL_OK, 'promiscuous off');
  assert.equal(await ctrlCommand(g, ram, ctrl, CTRL_RX, CTRL_RX_ALLMULTI, Buffer.from([0])), CTRL_OK, 'all-multicast off');
  assert.equal(await ctrlCommand(g, ram, ctrl, CTRL_MAC, CTRL_MAC_TABLE_SET, macTableData([MAC_L1, MAC_L2], [MC_1])), CTRL_OK, 'MAC table');
  assert.equal(await ctrlCommand(g, ram, ctrl, CTRL_MAC, CTRL_MAC_ADDR_SET, macOf(MAC_NEW)), CTRL_OK, 'MAC_ADDR_SET');
}

/**
 * Frames from the vhost-user driver to every kind of address (none learned: each is flooded to
 * the PCI port): only those setFilter's filter takes reach the guest's RX ring, in order, the
 * other three counted 'filtered' by the port. Frames in `ignore` (from earlier traffic) are skipped.
 */
async function filterCheck(rx: RxQueue, net: VhostUserNetDevice, nic: VirtioNetDriver, seed: number, ignore: Buffer[] = []): Promise<void> {
  const cases: [string, boolean][] = [[MAC_UNLISTED, false], [MAC_L1, true], [MAC_P, false], [MC_2, false], [MC_1, true], [BCAST, true], [MAC_L2, true], [MAC_NEW, true]];
  const frames = cases.map(([dst], i) => ethFrame(dst, MAC_V, 100 + 7 * i, seed + i));
  const want = frames.filter((_, i) => cases[i]![1]);
  const filtered = net.stats.drops.filtered;
  const start = rx.frames.length;
  const fresh = (): Buffer[] => rx.frames.slice(start).map((r) => r.frame).filter((f) => !ignore.some((x) => x.equals(f)));
  await nic.sendBatch(frames);
  await until(() => (rx.reap(), fresh().length >= want.length), () => `${fresh().length} of ${want.length} frames the filter takes`);
  assert.deepEqual(fresh().map((f) => macHex(f.subarray(0, 6))), want.map((f) => macHex(f.subarray(0, 6))), 'exactly the frames to L1, MC_1, broadcast, L2 and NEW');
  assert.deepEqual(fresh(), want, 'byte for byte');
  assert.equal(net.stats.drops.filtered - filtered, 3, 'to the unlisted MAC, to the old MAC, to the unlisted group: filtered');
}

test("migration of the control queue's state mid-traffic: promiscuous off, a MAC table, a MAC set by MAC_ADDR_SET; the destination accepts, reads the new MAC, filters as the guest set", async (t) => {
  const { sw, src, dst, ram, g, up, nic } = await migrationPair(t, { packed: false, rxBuf: 2048, size: 64, want: F_FILTER });
  assert.equal(up.features, F_FILTER);
  await setFilter(g, ram, up.ctrl);
  assert.equal(macHex(await g.deviceCfg(NC_MAC, 6)), MAC_NEW, "the source's config space reads the MAC the driver set");
  await filterCheck(up.rx, src.spec.net, nic, 10);

  // Traffic both ways as the migration starts: TX chains made available and kicked, frames for the guest sent.
  const txOut = SIZES.map((n, i) => ethFrame(MAC_V, MAC_NEW, n, 500 + i));
  const rxIn = Array.from({ length: 64 }, (_, i) => ethFrame(MAC_L1, MAC_V, 60 + 20 * i, 600 + i));
  const got: Buffer[] = [];
  const rarps: Buffer[] = [];
  const receiving = (async () => {
    while (got.length < txOut.length) got.push(await receiveData(nic, rarps));
  })();
  const rxStart = up.rx.frames.length;
  await up.tx.send(txOut);
  const sending = nic.sendBatch(rxIn);
  await migrate(src.dev, dst.dev);
  await sending;
  assert.equal(await dst.dev.migrationState(), MIG_RUNNING, 'the destination accepted the state');
  const g2 = await switchOver(t, src, dst);
  // virtio_net_config at the destination (5.1.4): the MAC the driver set; status, pairs and MTU as configured.
  assert.equal(macHex(await g2.deviceCfg(NC_MAC, 6)), MAC_NEW, "the destination's config space reads the MAC the driver set");
  assert.equal((await g2.deviceCfg(NC_STATUS, 2)).readUInt16LE(0), NET_S_LINK_UP);
  assert.equal((await g2.deviceCfg(NC_PAIRS, 2)).readUInt16LE(0), 1);
  assert.equal((await g2.deviceCfg(NC_MTU, 2)).readUInt16LE(0), 1500);
  // Every TX frame reached the driver once, in order (taken by the source, or by the destination after RUNNING).
  await receiving;
  assert.deepEqual(got, txOut);
  // The destination announced the MAC the driver set (migrated with the control state), not its configured one.
  while (rarps.length === 0) {
    const f = await nic.receive({ timeoutMs: 5000 });
    assert.ok(isRarp(f), `a data frame of ${f.length} bytes where the announcement was due`);
    rarps.push(f);
  }
  assert.deepEqual(rarps[0], rarpFor(MAC_NEW));
  let used = 0;
  await until(() => (used += up.tx.reap()) === txOut.length, () => `TX used ${used} of ${txOut.length}`);
  // Frames for the guest during the migration: those that landed are intact and in order (some were dropped while stopped).
  up.rx.reap();
  let k = 0;
  for (const r of up.rx.frames.slice(rxStart)) {
    while (k < rxIn.length && !rxIn[k]!.equals(r.frame)) k++;
    assert.ok(k < rxIn.length, 'a frame in the RX ring that was not sent, or out of order');
    k++;
  }
  // The RX filter at the destination is the guest's.
  await filterCheck(up.rx, dst.spec.net, nic, 700, rxIn);
  // TX from the new MAC at the destination, and its control queue goes on: promiscuous on again, the unlisted MAC taken.
  const moved = new TxQueue(ram, up.tx.ring, g2);
  const back = ethFrame(MAC_V, MAC_NEW, 300, 800);
  await moved.send([back]);
  assert.ok((await receiveData(nic, rarps)).equals(back));
  assert.ok(rarps.every((f) => f.equals(rarpFor(MAC_NEW))), 'every announcement for MAC_NEW');
  assert.equal(sw.lookup(0x525400aa0077)?.id, dst.spec.port.id, 'MAC_NEW learned on the destination port');
  assert.equal(await ctrlCommand(g2, ram, up.ctrl, CTRL_RX, CTRL_RX_PROMISC, Buffer.from([1])), CTRL_OK);
  const stray = ethFrame(MAC_UNLISTED, MAC_V, 90, 900);
  const start = up.rx.frames.length;
  await nic.send(stray);
  await until(() => (up.rx.reap(), up.rx.frames.length > start), () => 'the frame to the unlisted MAC, promiscuous again');
  assert.ok(up.rx.frames[start]!.frame.equals(stray));
  assert.equal(dst.spec.transport.stats.brokenQueues, 0);
});

test('a truncated or garbled virtio-net state is refused (EINVAL): the destination keeps its own state, the source runs on; a version-1 record without the section still loads', async (t) => {
  const { src, dst, ram, g, up, nic } = await migrationPair(t, { packed: false, rxBuf: 2048, size: 64, want: F_FILTER });
  await setFilter(g, ram, up.ctrl);
  await filterCheck(up.rx, src.spec.net, nic, 10);

  // The source's stream: one record (u32 length, the state); the state as docs/virtio-over-vfio-user.md lays it out.
  const stream = Buffer.from(await src.dev.save());
  assert.equal(await src.dev.migrationState(), MIG_STOP);
  assert.equal(stream.readUInt32LE(0), stream.length - 4, 'one record');
  const state = stream.subarray(4);
  assert.equal(state.toString('latin1', 0, 8), 'vdkvpci\x02', 'version 2: sections after the transport state');
  assert.equal(state.readUInt32LE(8), 3, 'rx, tx, ctrl');
  assert.equal(state.readUInt32LE(12), 12, 'virtio_net_config is 12 bytes');
  const CFG = 48 + 3 * 40;
  const SEC = CFG + 12;
  assert.equal(macHex(state.subarray(CFG + NC_MAC, CFG + NC_MAC + 6)), MAC_NEW, "the config saved with the driver's MAC");
  assert.equal(state.readUInt32LE(SEC), 1, 'section 1: the device state');
  assert.equal(state.readUInt32LE(SEC + 4), 20 + 6 * 3, 'its fixed 20 bytes and three MACs');
  assert.equal(state.length, SEC + 8 + 38);
  const D = SEC + 8;
  assert.deepEqual([state[D], state[D + 1]], [1, 0], 'version 1; promiscuous and all-multicast off');
  assert.equal(macHex(state.subarray(D + 2, D + 8)), MAC_NEW);
  assert.deepEqual([state.readUInt16LE(D + 8), state.readUInt16LE(D + 10), state.readUInt32LE(D + 12), state.readUInt32LE(D + 16)], [1, 0, 2, 1]);
  assert.deepEqual([0, 1, 2].map((i) => macHex(state.subarray(D + 20 + 6 * i, D + 26 + 6 * i))), [MAC_L1, MAC_L2, MC_1]);

  const record = (s: Buffer): Buffer => {
    const n = Buffer.alloc(4);
    n.writeUInt32LE(s.length);
    return Buffer.concat([n, s]);
  };
  const edit = (f: (s: Buffer) => void): Buffer => {
    const s = Buffer.from(state);
    f(s);
    return record(s);
  };
  const section = (tag: number, bytes: Buffer): Buffer => {
    const h = Buffer.alloc(8);
    h.writeUInt32LE(tag);
    h.writeUInt32LE(bytes.length, 4);
    return Buffer.concat([h, bytes]);
  };
  const withDevice = (dev: Buffer): Buffer => record(Buffer.concat([state.subarray(0, SEC), section(1, dev)]));
  const dev = state.subarray(D);
  const devEdit = (f: (d: Buffer) => void): Buffer => {
    const d = Buffer.from(dev);
    f(d);
    return withDevice(d);
  };
  const v1 = (mac: string): Buffer => {
    const s = Buffer.from(state.subarray(0, SEC));
    s[7] = 1;
    macOf(mac).copy(s, CFG + NC_MAC);
    return record(s);
  };
  const bad: [string, Buffer][] = [
    ['the state cut by one byte', record(state.subarray(0, state.length - 1))],
    ['the state cut inside the section header', record(state.subarray(0, SEC + 5))],
    ['the stream cut inside its record', stream.subarray(0, stream.length - 1)],
    ['a section length past the end', edit((s) => s.writeUInt32LE(0xffffffff, SEC + 4))],
    ['an unknown section after it', record(Buffer.concat([state, section(9, Buffer.alloc(0))]))],
    ['the device section twice', record(Buffer.concat([state, section(1, dev)]))],
    ['a device state of 10 bytes', withDevice(dev.subarray(0, 10))],
    ['device state version 9', devEdit((d) => (d[0] = 9))],
    ['unknown flag bits', devEdit((d) => (d[1] = 0x84))],
    ['0 active pairs', devEdit((d) => d.writeUInt16LE(0, 8))],
    ['2 active pairs of 1', devEdit((d) => d.writeUInt16LE(2, 8))],
    ['reserved bytes set', devEdit((d) => d.writeUInt16LE(1, 10))],
    ['a unicast count past the bytes', devEdit((d) => d.writeUInt32LE(0x7fffffff, 12))],
    ['a multicast count one short of the bytes', devEdit((d) => d.writeUInt32LE(0, 16))],
    ['another MTU in the config', edit((s) => s.writeUInt16LE(9000, CFG + NC_MTU))],
    ['another max_virtqueue_pairs in the config', edit((s) => s.writeUInt16LE(2, CFG + NC_PAIRS))],
    ["version 1 (no section) with the driver's MAC: compared, differs", v1(MAC_NEW)],
  ];
  for (const [what, data] of bad) {
    await assert.rejects(dst.dev.restore(data), (err: Error & { errno?: number }) => err.errno === 22, what);
    const n = dst.spec.net;
    assert.deepEqual([formatted(n.mac), n.promisc, n.allMulti, n.macTableUni.size, n.macTableMulti.size, n.activePairs], [MAC_P, true, true, 0, 0, 1], `${what}: the destination's device state untouched`);
    assert.equal(dst.spec.transport.status, 0, `${what}: the destination's transport untouched`);
    // A failed arc leaves the device in ERROR (the vfio uapi's rule), still answering; a reset leaves it.
    assert.equal(await dst.dev.migrationState(), MIG_ERROR, what);
    await dst.dev.reset();
    assert.equal(await dst.dev.migrationState(), MIG_RUNNING);
  }
  // A version-1 record (as before the device section) whose config matches the destination's: loaded, the device keeps its own state.
  await dst.dev.restore(v1(MAC_P), MIG_STOP);
  assert.equal(dst.spec.transport.status, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
  assert.deepEqual([formatted(dst.spec.net.mac), dst.spec.net.promisc], [MAC_P, true]);

  // The source runs on, its filter as the guest set it.
  await src.dev.setMigrationState(MIG_RUNNING);
  await filterCheck(up.rx, src.spec.net, nic, 100);
  // And the real migration to that destination is accepted.
  await migrate(src.dev, dst.dev);
  assert.equal(await dst.dev.migrationState(), MIG_RUNNING);
  const n = dst.spec.net;
  assert.deepEqual([formatted(n.mac), n.promisc, n.allMulti, n.macTableUni.size, n.macTableMulti.size], [MAC_NEW, false, false, 2, 1]);
});

const formatted = (mac: Uint8Array): string => macHex(Buffer.from(mac));

test('an untrusted guest: runt, offload flags, oversize and a buffer outside its RAM; drops by cause, DEVICE_NEEDS_RESET, a new bring-up works; no fd left open', async (t) => {
  const fdsBefore = fs.readdirSync('/proc/self/fd').length;
  await t.test('the port\'s lifetime', async (st) => {
    const dir = tmpdir();
    const sw = new NetSwitch();
    st.after(() => sw.close());
    const p = await pciPort(st, dir, 'p.sock', { mac: MAC_P, switch: sw });
    const up = await bringUp(p, { packed: false, rxBuf: 2048 });
    assert.equal(up.features & F_MTU, F_MTU);
    const nic = await vhostPort(st, sw, dir, false);
    const tx = up.tx.ring;
    const frame = (len: number, hdr: number[] = []): number => {
      const gpa = p.ram.alloc(HDR + len);
      p.ram.b.fill(0, p.ram.at(gpa), p.ram.at(gpa) + HDR);
      p.ram.b.set(hdr, p.ram.at(gpa));
      (len >= 14 ? ethFrame(MAC_V, MAC_P, len, len) : Buffer.alloc(len, 0xab)).copy(p.ram.b, p.ram.at(gpa) + HDR);
      return gpa;
    };
    const ids = [
      tx.add([{ gpa: frame(13), len: HDR + 13 }]), // shorter than an Ethernet header
      tx.add([{ gpa: frame(100, [1]), len: HDR + 100 }]), // flags NEEDS_CSUM, not negotiated
      tx.add([{ gpa: frame(100, [0, 1]), len: HDR + 100 }]), // gso_type TCPV4
      tx.add([{ gpa: frame(1519), len: HDR + 1519 }]), // MTU 1500 + 18 < 1519
      tx.add([{ gpa: frame(1518), len: HDR + 1518 }]), // fits (a VLAN tag's room)
      tx.add([{ gpa: frame(5), len: 5 }]), // not even the virtio header
    ];
    await p.guest.kick(TX);
    let used: { id: number; len: number }[] = [];
    await until(() => (used.push(...tx.used()), used.length === ids.length), () => `TX used ${used.length}`);
    assert.deepEqual(used.map((u) => u.id), ids);
    assert.ok((await nic.receive({ timeoutMs: 5000 })).equals(ethFrame(MAC_V, MAC_P, 1518, 1518)));
    const d = p.spec.net.stats.drops;
    assert.deepEqual([d.runt, d['bad-header'], d.oversize], [2, 2, 1]);
    assert.equal(p.spec.net.stats.txPackets, 1);
    // A descriptor pointing past guest RAM: the queue breaks, the device asks for a reset.
    const cfgIrqs = p.guest.interrupts[0]!;
    tx.add([{ gpa: RAM_GPA + RAM_BYTES + 0x10000, len: 64 }]);
    await p.guest.kick(TX);
    await until(async () => ((await p.guest.rd(T_COMMON, C_STATUS, 1)) & 64) !== 0, () => 'DEVICE_NEEDS_RESET');
    await until(() => p.guest.interrupts[0]! > cfgIrqs, () => 'a config interrupt');
    assert.equal(p.spec.transport.stats.brokenQueues, 1);
    // Reset and bring up again: traffic flows.
    const again = await bringUp(p, { packed: true, rxBuf: 2048 });
    await pciToVhost(again, nic, [ethFrame(MAC_V, MAC_P, 64, 7)]);
    await vhostToPci(again, nic, [ethFrame(MAC_P, MAC_V, 64, 8)], { mrg: true });
  });
  await tick(20);
  assert.equal(fs.readdirSync('/proc/self/fd').length, fdsBefore, 'every fd of the server, client, switch, eventfds and memfd closed');
});

test('vdevkit serve virtio-net --socket PATH --mac MAC --vhost-user PATH: a frame each way between the PCI guest and a vhost-user driver', async (t) => {
  const dir = tmpdir();
  const sock = path.join(dir, 'cli.sock');
  const vsock = path.join(dir, 'cli-v.sock');
  const main = new URL('../src/cli/main.js', import.meta.url).pathname;
  const child = spawn(process.execPath, [main, 'serve', 'virtio-net', '--socket', sock, '--mac', MAC_P, '--vhost-user', vsock, '--mtu', '2000'], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (b: Buffer) => (stderr += b.toString()));
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  t.after(() => child.kill('SIGKILL'));
  await until(() => stderr.includes('serving virtio-net'), () => `the server starts (stderr: ${stderr})`, 10000);
  const client = await VfioUserClient.connect(sock);
  const dev = new VfioUserDevice(client);
  const ram = new Ram();
  t.after(() => ram.shm.close());
  await client.dmaMap({ iova: RAM_GPA, size: RAM_BYTES, memory: ram.shm });
  const guest = new Guest(dev);
  await guest.probe();
  assert.equal(guest.config.readUInt16LE(CFG_DEVICE), 0x1041);
  assert.equal((await guest.deviceCfg(NC_MAC, 6)).toString('hex'), MAC_P.replaceAll(':', ''));
  assert.equal((await guest.deviceCfg(NC_MTU, 2)).readUInt16LE(0), 2000);
  const features = await guest.init(F_VERSION_1 | F_MAC | F_MRG_RXBUF);
  const up: Up = { rx: new RxQueue(ram, new Split(ram, 16), 2048), tx: new TxQueue(ram, new Split(ram, 16), guest), ctrl: new Split(ram, 4), features };
  await guest.queue(RX, up.rx.ring);
  await guest.queue(TX, up.tx.ring);
  up.rx.post(16);
  await guest.driverOk();
  const nic = await VirtioNetDriver.connect(vsock);
  assert.equal(nic.config.mtu, 2000);
  await pciToVhost(up, nic, [ethFrame(MAC_V, MAC_P, 1800, 1)]);
  await vhostToPci(up, nic, [ethFrame(MAC_P, MAC_V, 1514, 2)], { mrg: true });
  await nic.close();
  guest.close();
  dev.close();
  client.close();
  child.kill('SIGTERM');
  assert.equal(await exited, 0);
  // An option of another device is refused.
  const foreign = spawnSync(process.execPath, [main, 'serve', 'virtio-net', '--file', 'x.img', '--socket', sock]);
  assert.equal(foreign.status, 2);
  const bad = spawnSync(process.execPath, [main, 'serve', 'virtio-net', '--mac', 'nope', '--socket', sock]);
  assert.equal(bad.status, 1);
  assert.match(bad.stderr.toString(), /bad MAC/);
});

test('NetQueueAdapter: unpop is a stack pop() serves first, giveBack completes what is left with length 0; VhostQueue needs no adapter', async () => {
  const pushed: { len: number }[] = [];
  let ring: object | null = {};
  const chains = [{ n: 1 }, { n: 2 }, { n: 3 }] as unknown as import('../src/virtio/types.js').DescChain[];
  let next = 0;
  const inner = {
    index: 1,
    features: 0n,
    get ring() {
      return ring as never;
    },
    pop: () => (ring && next < chains.length ? chains[next++]! : null),
    push: (_c: unknown, len: number) => void pushed.push({ len }),
    pushBatch: (cs: readonly unknown[], w: ArrayLike<number>) => cs.forEach((_, i) => pushed.push({ len: w[i]! })),
    notify: () => undefined,
  };
  let again = 0;
  const a = new NetQueueAdapter(inner, () => again++);
  assert.equal(a.polled, false);
  assert.equal(a.enabled, true);
  const c1 = a.pop()!;
  const c2 = a.pop()!;
  a.unpop(c2);
  a.unpop(c1);
  assert.equal(a.unpopped, 2);
  assert.equal(a.pop(), c1, 'the last given back first');
  a.giveBack();
  assert.deepEqual(pushed, [{ len: 0 }], 'c2 completed empty');
  assert.equal(a.pop(), chains[2]);
  ring = null;
  assert.equal(a.enabled, false, 'enabled: the ring runs');
  a.unpop(c1);
  assert.equal(a.unpopped, 0, 'a chain given back to a stopped ring is completed at once');
  assert.deepEqual(pushed, [{ len: 0 }, { len: 0 }]);
  // Without a schedule() of its own, the handler runs again once per turn of the event loop.
  a.schedule();
  a.schedule();
  assert.equal(again, 0);
  await tick(5);
  assert.equal(again, 1);
  // A VhostQueue is a NetQueueHandle as it is (a compile-time fact, checked here by assignment).
  const asNet = (q: VhostQueue): NetQueueHandle => q;
  assert.equal(typeof asNet, 'function');
});
