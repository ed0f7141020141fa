/**
 * bench/vhost-user-net: 64-byte frames from DPDK testpmd txonly (net_virtio_user)
 * through our switch (port A) to testpmd rxonly on port B, against testpmd
 * txonly into DPDK's own net_vhost rxonly (C), in the same run, alternating.
 * Split and packed rings, event-driven (the polling mode is not written yet).
 *
 *   npm run -s build && node dist/bench/vhost-user-net.js [--seconds 6] [--rounds 2]
 *
 * Reports, per round: DPDK's Mpps (what net_vhost received), ours taken from
 * port A and delivered into port B (what B's testpmd received), and ours / DPDK.
 * `uptime`'s load is printed: the figures move with what else runs here.
 */
import { execFileSync } from 'node:child_process';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { NetSwitch } from '../src/devices/net-switch.js';
import { scratchDir } from '../test/interop/peers.js';
import { parseTestpmd, startTestpmd, stopTestpmd } from '../test/helpers/testpmd.js';

const { values } = parseArgs({ options: { seconds: { type: 'string', default: '6' }, rounds: { type: 'string', default: '2' } } });
const seconds = Number(values.seconds);
const rounds = Number(values.rounds);

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function waitFor(ok: () => boolean, ms: number, what: string): Promise<void> {
  const end = Date.now() + ms;
  while (!ok()) {
    if (Date.now() > end) throw new Error(`${what} after ${ms} ms`);
    await sleep(50);
  }
}

/** testpmd txonly -> testpmd net_vhost rxonly: Mpps received by net_vhost. */
async function dpdk(devargs: string): Promise<number> {
  const s = scratchDir('vdevkit-bench-net-');
  const sock = path.join(s.dir, 'v.sock');
  const be = startTestpmd({ socket: sock, vhost: true, mode: 'rxonly', prefix: `vdkb-be-${process.pid}`, mainLcore: 0 });
  try {
    await waitFor(() => be.output().includes('Press enter') || be.output().includes('forwarding packets'), 20_000, 'net_vhost ready');
    await sleep(500);
    const fe = startTestpmd({ socket: sock, mode: 'txonly', prefix: `vdkb-fe-${process.pid}`, devargs, mainLcore: 1 });
    await sleep(1000 + seconds * 1000);
    await stopTestpmd(fe);
    const out = await stopTestpmd(be);
    if (!(parseTestpmd(out).rxPackets > 0)) throw new Error(`net_vhost received nothing:\n${out.slice(-2000)}`);
    return medianRate(out) / 1e6;
  } finally {
    await be.stop(1000);
    s.remove();
  }
}

/** The median of testpmd's nonzero per-second "Rx-pps" figures. */
function medianRate(out: string): number {
  const v = [...out.matchAll(/Rx-pps: +(\d+)/g)].map((m) => Number(m[1])).filter((x) => x > 0).sort((x, y) => x - y);
  return v.length ? v[Math.floor(v.length / 2)]! : 0;
}

/** testpmd txonly -> our switch -> testpmd rxonly: Mpps taken from A and delivered into B, over the same window. */
async function ours(devargs: string): Promise<{ taken: number; delivered: number }> {
  const s = scratchDir('vdevkit-bench-net-');
  const sw = new NetSwitch();
  const a = sw.listen(path.join(s.dir, 'a.sock'));
  const b = sw.listen(path.join(s.dir, 'b.sock'));
  const rx = startTestpmd({ socket: path.join(s.dir, 'b.sock'), mode: 'rxonly', prefix: `vdkb-rx-${process.pid}`, devargs, mainLcore: 0 });
  try {
    await waitFor(() => b.connected && b.device.rxReady, 20_000, 'rxonly on port B');
    const tx = startTestpmd({ socket: path.join(s.dir, 'a.sock'), mode: 'txonly', prefix: `vdkb-tx-${process.pid}`, devargs, mainLcore: 1 });
    await waitFor(() => a.device.stats.txPackets > 0, 20_000, 'txonly on port A');
    await sleep(1000);
    const t0 = performance.now();
    const a0 = a.device.stats.txPackets;
    const b0 = b.device.stats.rxPackets;
    await sleep(seconds * 1000);
    const dt = (performance.now() - t0) / 1000;
    const taken = (a.device.stats.txPackets - a0) / dt / 1e6;
    const delivered = (b.device.stats.rxPackets - b0) / dt / 1e6;
    await stopTestpmd(tx);
    await stopTestpmd(rx);
    return { taken, delivered };
  } finally {
    await rx.stop(1000);
    sw.close();
    s.remove();
  }
}

const load = (): string => execFileSync('uptime', { encoding: 'utf8' }).trim();
console.log(`# vhost-user-net bench: ${seconds} s per run, ${rounds} round(s); ${load()}`);
console.log('| ring | round | DPDK net_vhost Mpps | ours taken from A | ours into B | ours(B) / DPDK |');
console.log('| --- | --- | --- | --- | --- | --- |');
for (const [ring, devargs] of [['split', ''], ['packed', 'packed_vq=1']] as const) {
  for (let r = 1; r <= rounds; r++) {
    const d = await dpdk(devargs);
    const o = await ours(devargs);
    console.log(`| ${ring} | ${r} | ${d.toFixed(2)} | ${o.taken.toFixed(3)} | ${o.delivered.toFixed(3)} | ${(o.delivered / d).toFixed(3)} |`);
  }
}
console.log(`# ${load()}`);
