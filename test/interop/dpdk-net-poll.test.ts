/**
 * The polling mode against DPDK 22.11 testpmd (`net_virtio_user`): our switch
 * on its worker thread (NetSwitchThread), both ports' TX rings busy-polled
 * with kicks off, testpmd txonly on port A and rxonly on port B, split and
 * packed rings. Counted on both sides as in dpdk-net.test.ts: what A's testpmd
 * sent is what the switch took (less at most a ring left in A's ring at its
 * exit), what B's testpmd received is what the switch wrote into B (less at
 * most a ring B had not taken at its exit), every frame taken is delivered or
 * dropped with a cause, and they are testpmd's 64-byte frames.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { NetSwitchThread } from '../../src/devices/net-switch-thread.js';
import type { PortSnapshot } from '../../src/devices/net-switch.js';
import { scratchDir, type Peer } from './peers.js';
import { parseTestpmd, startTestpmd, stopTestpmd } from '../helpers/testpmd.js';

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function until(what: string, ok: () => Promise<boolean>, timeoutMs: number, peers: Peer[]): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!(await ok())) {
    for (const p of peers) if (p.proc.exitCode !== null) throw new Error(`${what}: testpmd exited (${p.proc.exitCode}):\n${p.output().slice(-2000)}`);
    if (Date.now() > end) throw new Error(`${what}: not after ${timeoutMs} ms`);
    await sleep(50);
  }
}

for (const [ring, devargs] of [['split', ''], ['packed', 'packed_vq=1']] as const) {
  test(`DPDK testpmd txonly -> our polling switch (worker thread) -> testpmd rxonly: ${ring} ring`, { timeout: 90_000 }, async (t) => {
    const scratch = scratchDir('vdevkit-dpdk-poll-');
    const sockA = path.join(scratch.dir, 'a.sock');
    const sockB = path.join(scratch.dir, 'b.sock');
    const sw = await NetSwitchThread.start({ ports: [{ path: sockA, device: { poll: true } }, { path: sockB, device: { poll: true } }] });
    const peers: Peer[] = [];
    let outA = '';
    let outB = '';
    const snap = async (): Promise<[PortSnapshot, PortSnapshot]> => (await sw.snapshot()) as [PortSnapshot, PortSnapshot];
    try {
      const rx = startTestpmd({ socket: sockB, mode: 'rxonly', prefix: `vdk-prx-${process.pid}`, devargs, mainLcore: 0 });
      peers.push(rx);
      await until('testpmd rxonly connected to port B', async () => (await snap())[1].connected, 20_000, peers);
      await sleep(500);
      const tx = startTestpmd({ socket: sockA, mode: 'txonly', prefix: `vdk-ptx-${process.pid}`, devargs, mainLcore: 1 });
      peers.push(tx);
      await until('frames from testpmd A', async () => (await snap())[0].txPackets > 0, 20_000, peers);
      assert.ok((await sw.pollPasses()) > 0, 'the poll loop runs');
      await sleep(3000);
      outA = await stopTestpmd(tx);
      let last = -1;
      await until('the switch idle', async () => {
        const [, b] = await snap();
        const n = b.rxPackets + b.drops['no-rx-buffer'];
        const idle = n === last;
        last = n;
        return idle;
      }, 10_000, []);
      await sleep(300);
      outB = await stopTestpmd(rx);
      const sa = parseTestpmd(outA);
      const sb = parseTestpmd(outB);
      const [a, b] = await snap();
      const drops = Object.values(b.drops).reduce((x, y) => x + y, 0);
      t.diagnostic(`testpmd A sent ${sa.txPackets}, the switch took ${a.txPackets}, wrote ${b.rxPackets} into B (${drops} dropped: ${JSON.stringify(b.drops)}), testpmd B received ${sb.rxPackets}`);
      assert.ok(sa.txPackets > 1000, `testpmd A sent only ${sa.txPackets}`);
      assert.ok(a.txPackets <= sa.txPackets && sa.txPackets - a.txPackets <= 256, `the switch took ${a.txPackets} of ${sa.txPackets}`);
      assert.equal(a.txBytes, 64 * a.txPackets, '64-byte frames from A');
      assert.equal(b.rxBytes, 64 * b.rxPackets, '64-byte frames into B');
      assert.ok(sb.rxPackets <= b.rxPackets && b.rxPackets - sb.rxPackets <= 256, `testpmd B received ${sb.rxPackets} of the ${b.rxPackets} written into B`);
      assert.ok(sb.rxPackets > 1000, `testpmd B received only ${sb.rxPackets}`);
      assert.equal(b.rxPackets + drops, a.txPackets, 'each frame taken from A delivered to B or dropped with a cause');
    } catch (err) {
      for (const p of peers) if (p.proc.exitCode === null) await stopTestpmd(p, 5000);
      throw new Error(`${(err as Error).message}\n--- testpmd A:\n${(outA || peers[1]?.output() || '').slice(-2500)}\n--- testpmd B:\n${(outB || peers[0]?.output() || '').slice(-2500)}`, { cause: err });
    } finally {
      for (const p of peers) await p.stop(2000);
      await sw.close();
      scratch.remove();
    }
  });
}
