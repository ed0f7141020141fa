/**
 * DPDK 22.11 testpmd (`net_virtio_user`, ../shared/docs/peers.md) on a
 * vhost-user port of our switch, and a PCI port of the same switch served
 * over vfio-user (virtioNetPciDevice) whose guest driver is our
 * VfioUserClient (test/helpers/virtio-net-pci-guest.ts: rings by hand in a
 * memfd window, RX reaped on its MSI-X interrupt):
 *
 * - testpmd txonly -> the switch -> the PCI guest's RX ring: what testpmd
 *   sent is what the switch took from its port (less at most a ring left at
 *   its exit), every frame taken is in the guest's RX ring or dropped with a
 *   cause, and the first 2000 are testpmd's 64-byte IPv4/UDP frame. Split,
 *   and packed on both sides.
 * - the PCI guest's TX -> the switch -> testpmd rxonly: every frame the guest
 *   sent was written into testpmd's ring or dropped with a cause, and testpmd
 *   counted what was written (less at most a ring).
 *
 * A missing dpdk-testpmd fails (apt-get install dpdk-dev; .ci/run does).
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { NetSwitch } from '../../src/devices/net-switch.js';
import { scratchDir, type Peer } from './peers.js';
import { parseTestpmd, startTestpmd, stopTestpmd } from '../helpers/testpmd.js';
import { ethFrame } from '../helpers/net-driver.js';
import { RX, bringUp, pciPort, until, type PciPort } from '../helpers/virtio-net-pci-guest.js';

const MAC_P = '52:54:00:aa:00:01';

/** testpmd's txonly frame (app/test-pmd/txonly.c): 64 bytes, to eth-peer 0, IPv4 UDP 198.18.0.1:9 -> 198.18.0.2:9. */
function isTxonlyFrame(b: Buffer): boolean {
  return (
    b.length === 64 &&
    b.subarray(0, 6).toString('hex') === '020000000000' &&
    b.readUInt16BE(12) === 0x0800 &&
    b[23] === 17 &&
    b.subarray(26, 34).join('.') === '198.18.0.1.198.18.0.2' &&
    b.readUInt16BE(34) === 9 &&
    b.readUInt16BE(36) === 9
  );
}

const dropsOf = (d: Record<string, number>): number => Object.values(d).reduce((a, b) => a + b, 0);

/** A switch with a PCI port (our guest) in a scratch dir; testpmd's output on failure; peers stopped, all removed after. */
async function withPciPort(t: TestContext, fn: (o: { dir: string; sw: NetSwitch; p: PciPort; peers: Peer[]; out: { text: string } }) => Promise<void>): Promise<void> {
  const scratch = scratchDir('vdevkit-dpdk-pci-');
  const sw = new NetSwitch();
  const peers: Peer[] = [];
  const out = { text: '' };
  try {
    const p = await pciPort(t, scratch.dir, 'p.sock', { mac: MAC_P, switch: sw });
    await fn({ dir: scratch.dir, sw, p, peers, out });
  } catch (err) {
    throw new Error(`${(err as Error).message}\n--- testpmd:\n${(out.text || peers[0]?.output() || '').slice(-2500)}`, { cause: err });
  } finally {
    for (const peer of peers) await peer.stop(2000);
    sw.close();
    scratch.remove();
  }
}

async function txonlyToPci(t: TestContext, packed: boolean): Promise<void> {
  await withPciPort(t, async ({ dir, sw, p, peers, out }) => {
    const up = await bringUp(p, { packed, rxBuf: 2048, size: 256 });
    let received = 0;
    let notTestpmd = 0;
    const reap = (): void => {
      for (const f of up.rx.reap()) if (received++ < 2000 && !isTxonlyFrame(f.frame)) notTestpmd++;
      up.rx.frames.length = 0; // the count, not the frames
    };
    // RX on its MSI-X vector, and a slow timer for used entries after the last interrupt.
    const unsub = p.guest.irqs[1 + RX]!.subscribe(reap);
    const timer = setInterval(reap, 20);
    try {
      const sockA = path.join(dir, 'a.sock');
      const portA = sw.listen(sockA);
      const tx = startTestpmd({ socket: sockA, mode: 'txonly', prefix: `vdk-pci-tx-${process.pid}`, devargs: packed ? 'packed_vq=1' : undefined, mainLcore: 1 });
      peers.push(tx);
      await until(() => portA.connected && portA.device.stats.txPackets > 0, () => `testpmd txonly sending on port A:\n${tx.output().slice(-2000)}`, 20_000);
      await new Promise((r) => setTimeout(r, 2000));
      out.text = await stopTestpmd(tx);
      let last = -1;
      await until(() => {
        reap();
        const n = p.spec.net.stats.rxPackets + dropsOf(p.spec.net.stats.drops);
        const idle = n === last;
        last = n;
        return idle;
      }, () => 'the switch idle', 10_000);
      reap();
      const sa = parseTestpmd(out.text);
      const taken = portA.device.stats.txPackets;
      const st = p.spec.net.stats;
      t.diagnostic(`testpmd sent ${sa.txPackets}, the switch took ${taken}, the PCI guest received ${received}, drops at the PCI port ${JSON.stringify(st.drops)}`);
      assert.ok(sa.txPackets > 1000, `testpmd sent only ${sa.txPackets}`);
      assert.ok(taken <= sa.txPackets && sa.txPackets - taken <= 256, `the switch took ${taken} of ${sa.txPackets} (at most a ring left behind)`);
      assert.equal(st.rxPackets, received, 'every frame written into the RX ring reached the guest');
      assert.equal(st.rxPackets + dropsOf(st.drops), taken, 'each frame taken from testpmd delivered to the PCI guest or dropped with a cause');
      assert.equal(st.rxBytes, 64 * st.rxPackets);
      assert.ok(received > 1000, `the guest received only ${received}`);
      assert.equal(notTestpmd, 0, `${notTestpmd} of the first ${Math.min(received, 2000)} frames were not testpmd's txonly frame`);
      assert.ok(p.guest.interrupts[1 + RX]! > 0, 'MSI-X interrupts on the RX vector');
    } finally {
      unsub();
      clearInterval(timer);
    }
  });
}

test('DPDK testpmd txonly on a vhost-user port -> our switch -> the PCI port (split rings)', { timeout: 90_000 }, async (t) => {
  await txonlyToPci(t, false);
});

test('DPDK testpmd txonly on a vhost-user port -> our switch -> the PCI port (packed rings, packed_vq=1)', { timeout: 90_000 }, async (t) => {
  await txonlyToPci(t, true);
});

test('the PCI guest transmits -> our switch -> DPDK testpmd rxonly on a vhost-user port', { timeout: 90_000 }, async (t) => {
  await withPciPort(t, async ({ dir, sw, p, peers, out }) => {
    const up = await bringUp(p, { packed: false, rxBuf: 2048, size: 128 });
    const sockB = path.join(dir, 'b.sock');
    const portB = sw.listen(sockB);
    const rx = startTestpmd({ socket: sockB, mode: 'rxonly', prefix: `vdk-pci-rx-${process.pid}`, mainLcore: 0 });
    peers.push(rx);
    await until(() => portB.connected && portB.device.rxReady, () => `testpmd rxonly on port B:\n${rx.output().slice(-2000)}`, 20_000);
    // testpmd fills its RX ring once it forwards: a frame now and then until one lands there.
    let used = 0;
    let warm = 0;
    await until(async () => {
      if (portB.device.stats.rxPackets > 0) return true;
      await up.tx.send([ethFrame('02:00:00:00:00:0b', MAC_P, 60, warm++)]);
      await new Promise((r) => setTimeout(r, 50));
      return false;
    }, () => `testpmd's RX ring filled:\n${rx.output().slice(-2000)}`, 20_000);
    await until(() => (used += up.tx.reap()) === warm, () => `warm-up TX used ${used} of ${warm}`);
    const st0 = { tx: p.spec.net.stats.txPackets, rx: portB.device.stats.rxPackets, drops: dropsOf(portB.device.stats.drops) };
    used = 0;
    const n = 4000;
    for (let i = 0; i < n; i += 32) {
      await up.tx.send(Array.from({ length: 32 }, (_, k) => ethFrame('02:00:00:00:00:0b', MAC_P, 60 + (((i + k) * 37) % 1455), i + k)));
      await until(() => (used += up.tx.reap()) >= i + 32, () => `TX used ${used}`);
    }
    const sent = n;
    await new Promise((r) => setTimeout(r, 500));
    out.text = await stopTestpmd(rx);
    const sb = parseTestpmd(out.text);
    const st = p.spec.net.stats;
    const b = portB.device.stats;
    const written = b.rxPackets - st0.rx;
    t.diagnostic(`after ${warm} warm-up frames: the PCI guest sent ${sent}, the switch took ${st.txPackets - st0.tx}, wrote ${written} into testpmd's ring (drops ${JSON.stringify(b.drops)}), testpmd received ${sb.rxPackets} in all`);
    assert.equal(st.txPackets - st0.tx, sent, 'the switch took every frame the guest sent');
    assert.equal(written + dropsOf(b.drops) - st0.drops, sent, 'each delivered to testpmd or dropped with a cause');
    assert.ok(sb.rxPackets <= b.rxPackets && b.rxPackets - sb.rxPackets <= 256, `testpmd received ${sb.rxPackets} of the ${b.rxPackets} written (at most a ring left)`);
    assert.ok(written > sent / 2, `only ${written} of ${sent} written into testpmd's ring`);
  });
});
