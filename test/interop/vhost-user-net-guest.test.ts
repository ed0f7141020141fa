/**
 * Two real Linux guests (QEMU 7.2, TCG, `-netdev vhost-user` + virtio-net-pci,
 * vectors=0) plugged into our switch (`vdevkit vhost-user-net`, a process of
 * its own, run by test/helpers/vhost-user-net-cli.ts): each guest configures
 * eth0 and pings the other, so ARP and ICMP cross the switch in both
 * directions; the switch's JSON report counts the frames on both ports.
 * A missing QEMU / busybox / cpio fails (never skips).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { scratchDir, startPeer, waitForSocket } from './peers.js';
import { runGuest, vhostUserNetArgs } from './guest.js';

const CLI = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../helpers/vhost-user-net-cli.js');

/**
 * Brings eth0 up as `me`, pings `peer` until 3 replies (or 90 s), then stays up until the peer is
 * done too: each guest, once done, adds a second address (`me` + 10 in the last byte) and waits
 * (at most 120 s) until the peer's answers. Under load one guest may boot tens of seconds after
 * the other (CI, with TCG), and a fixed wait let the first power off before the second pinged it.
 */
function pingScript(me: string, peer: string): string {
  const done = (ip: string): string => ip.replace(/\.(\d+)$/, (_, d: string) => `.${Number(d) + 10}`);
  return `set -u
ip link set eth0 up || { echo "VDEVKIT-ERROR no eth0: $(ls /sys/class/net)"; exit 3; }
ip addr add ${me}/24 dev eth0
echo "VDEVKIT-NET up $(cat /sys/class/net/eth0/address)"
ok=0
for i in $(seq 1 90); do
  if ping -c 1 -W 1 ${peer} >/dev/null 2>&1; then ok=$((ok+1)); [ $ok -ge 3 ] && break; fi
done
echo "VDEVKIT-PING ${peer} replies=$ok"
ping -c 3 -W 2 ${peer}
ip addr add ${done(me)}/24 dev eth0
for i in $(seq 1 120); do
  ping -c 1 -W 1 ${done(peer)} >/dev/null 2>&1 && break
done
sleep 3
[ $ok -ge 3 ]
`;
}

/** QEMU's arguments for a guest NIC on `sock`; behind QEMU's intel-iommu (strict unmapping in the guest) when `iommu`. */
function nic(sock: string, mac: string, iommu: boolean): { qemuArgs: string[]; append?: string } {
  const args = vhostUserNetArgs(sock, { mac });
  if (!iommu) return { qemuArgs: args };
  return {
    qemuArgs: ['-device', 'intel-iommu,intremap=off,device-iotlb=on', ...args.map((x) => (x.startsWith('virtio-net-pci') ? `${x},disable-legacy=on,iommu_platform=on,ats=on` : x))],
    append: 'intel_iommu=on iommu.strict=1',
  };
}

for (const iommu of [false, true]) test(`two Linux guests on our vhost-user-net switch ping each other (ARP and ICMP both ways)${iommu ? ', both behind QEMU\'s intel-iommu (the switch with --iommu)' : ''}`, { timeout: 300_000 }, async (t) => {
  const scratch = scratchDir('vdevkit-netguest-');
  const a = path.join(scratch.dir, 'a.sock');
  const b = path.join(scratch.dir, 'b.sock');
  const sw = startPeer(process.execPath, [CLI, '--socket', a, '--socket', b, '--json', '--verbose', ...(iommu ? ['--iommu'] : [])]);
  try {
    await waitForSocket(a, sw);
    await waitForSocket(b, sw);
    const [ga, gb] = await Promise.all([
      runGuest({ script: pingScript('10.0.0.1', '10.0.0.2'), ...nic(a, '52:54:00:12:34:01', iommu), timeoutMs: 240_000 }),
      runGuest({ script: pingScript('10.0.0.2', '10.0.0.1'), ...nic(b, '52:54:00:12:34:02', iommu), timeoutMs: 240_000 }),
    ]);
    const why = `\n--- guest A:\n${ga.output}\n--- guest B:\n${gb.output}\n--- switch:\n${sw.output().slice(-4000)}`;
    assert.equal(ga.exitCode, 0, why);
    assert.equal(gb.exitCode, 0, why);
    assert.match(ga.output, /VDEVKIT-PING 10\.0\.0\.2 replies=3/);
    assert.match(gb.output, /VDEVKIT-PING 10\.0\.0\.1 replies=3/);
    await sw.stop();
    const reports = sw.output().split('\n').filter((l) => l.startsWith('{'));
    const last = JSON.parse(reports.pop()!) as { final?: boolean; ports: { name: string; rxPackets: number; txPackets: number; iotlb?: { misses: number; updates: number; invalidations: number } }[] };
    assert.equal(last.final, true, sw.output());
    t.diagnostic(`switch totals: ${JSON.stringify(last.ports.map((p) => ({ port: path.basename(p.name), rx: p.rxPackets, tx: p.txPackets })))}`);
    for (const p of last.ports) {
      assert.ok(p.txPackets >= 7 && p.rxPackets >= 7, `port ${p.name}: ${p.txPackets} sent, ${p.rxPackets} received (ARP + 6 pings each way at least)`);
    }
    assert.match(sw.output(), /learned 52:54:00:12:34:01 on port 0/);
    assert.match(sw.output(), /learned 52:54:00:12:34:02 on port 1/);
    for (const p of last.ports) {
      if (!iommu) assert.equal(p.iotlb, undefined);
      else {
        // Every frame's buffers come through the port's IOTLB: misses answered by QEMU's vIOMMU.
        t.diagnostic(`${path.basename(p.name)} IOTLB: ${JSON.stringify(p.iotlb)}`);
        assert.ok(p.iotlb && p.iotlb.misses >= 3 && p.iotlb.updates >= p.iotlb.misses - 3, `port ${p.name}: ${JSON.stringify(p.iotlb)}`);
      }
    }
  } finally {
    await sw.stop();
    scratch.remove();
  }
});
