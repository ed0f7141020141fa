/**
 * bench/vhost-user-net: 64-byte frames from DPDK testpmd txonly (net_virtio_user)
 * through our switch (port A) to testpmd rxonly on port B, against testpmd
 * txonly into DPDK's own net_vhost rxonly (C), in the same run, alternating.
 * Split and packed rings; our switch event-driven (in this process) and polling
 * (both ports' TX rings busy-polled on a worker thread, NetSwitchThread).
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
import { NetSwitch, type PortSnapshot } from '../src/devices/net-switch.js';
import { NetSwitchThread } from '../src/devices/net-switch-thread.js';
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
async function ours(devargs: string, poll: boolean): Promise<{ taken: number; delivered: number }> {
  const s = scratchDir('vdevkit-bench-net-');
  const pa = path.join(s.dir, 'a.sock');
  const pb = path.join(s.dir, 'b.sock');
  // Event-driven: the switch in this process. Polling: both ports busy-polled on a worker.
  let stats: () => Promise<PortSnapshot[]>;
  let close: () => Promise<void>;
  if (poll) {
    const t = await NetSwitchThread.start({ ports: [{ path: pa, device: { poll: true } }, { path: pb, device: { poll: true } }] });
    stats = () => t.snapshot();
    close = () => t.close();
  } else {
    const sw = new NetSwitch();
    sw.listen(pa);
    sw.listen(pb);
    stats = () => Promise.resolve(sw.snapshot());
    close = () => Promise.resolve(sw.close());
  }
  const rx = startTestpmd({ socket: pb, mode: 'rxonly', prefix: `vdkb-rx-${process.pid}`, devargs, mainLcore: 0 });
  try {
    await waitForAsync(async () => {
      const b = (await stats())[1]!;
      return b.connected;
    }, 20_000, 'rxonly on port B');
    await sleep(500);
    const tx = startTestpmd({ socket: pa, mode: 'txonly', prefix: `vdkb-tx-${process.pid}`, devargs, mainLcore: 1 });
    await waitForAsync(async () => (await stats())[0]!.txPackets > 0, 20_000, 'txonly on port A');
    await sleep(1000);
    const t0 = performance.now();
    const s0 = await stats();
    await sleep(seconds * 1000);
    const s1 = await stats();
    const dt = (performance.now() - t0) / 1000;
    const taken = (s1[0]!.txPackets - s0[0]!.txPackets) / dt / 1e6;
    const delivered = (s1[1]!.rxPackets - s0[1]!.rxPackets) / dt / 1e6;
    await stopTestpmd(tx);
    await stopTestpmd(rx);
    return { taken, delivered };
  } finally {
    await rx.stop(1000);
    await close();
    s.remove();
  }
}

async function waitForAsync(ok: () => Promise<boolean>, ms: number, what: string): Promise<void> {
  const end = Date.now() + ms;
  while (!(await ok())) {
    if (Date.now() > end) throw new Error(`${what} after ${ms} ms`);
    await sleep(50);
  }
}

const load = (): string => execFileSync('uptime', { encoding: 'utf8' }).trim();
console.log(`# vhost-user-net bench: ${seconds} s per run, ${rounds} round(s); ${load()}`);
console.log('| ring | round | DPDK net_vhost Mpps | ours | taken from A | into B | ours(B) / DPDK |');
console.log('| --- | --- | --- | --- | --- | --- | --- |');
for (const [ring, devargs] of [['split', ''], ['packed', 'packed_vq=1']] as const) {
  for (let r = 1; r <= rounds; r++) {
    const d = await dpdk(devargs);
    for (const poll of [false, true]) {
      const o = await ours(devargs, poll);
      console.log(`| ${ring} | ${r} | ${d.toFixed(2)} | ${poll ? 'polling' : 'event'} | ${o.taken.toFixed(3)} | ${o.delivered.toFixed(3)} | ${(o.delivered / d).toFixed(3)} |`);
    }
  }
}
console.log(`# ${load()}`);
