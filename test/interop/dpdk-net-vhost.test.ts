/**
 * Our VirtioNetDriver as the front-end of DPDK 22.11 testpmd's own
 * vhost-user back-end (`--vdev net_vhost0,iface=SOCK,queues=N`,
 * ../shared/docs/peers.md):
 * - rxonly: the frames we send (60..1514 bytes) are counted by testpmd,
 *   packets and bytes (its NIC statistics, and the forward statistics it
 *   prints at exit), every one of them;
 * - txonly: the frames testpmd sends reach us, as many as it says it sent,
 *   each the 64-byte Ethernet/IPv4/UDP frame app/test-pmd/txonly.c builds
 *   (checked against a frame laid out here, its IPv4 checksum computed here);
 * split and packed rings (net_vhost follows what the front-end negotiates),
 * 2 queue pairs, and net_vhost as the socket client (client=1, we listen).
 *
 * testpmd runs without hugepages, its own --file-prefix, started and stopped
 * by pid (SIGINT: it prints its statistics and exits); a missing dpdk-testpmd
 * fails (apt-get install dpdk-dev; .ci/run does).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { VirtioNetDriver, type VirtioNetDriverOptions } from '../../src/vhost-user/net-driver.js';
import { VirtioFeature as VF, bit } from '../../src/vhost-user/constants.js';
import { NetFeature } from '../../src/devices/vhost-user-net.js';
import { scratchDir, type Peer } from './peers.js';
import { parseTestpmd, startTestpmd, stopTestpmd } from '../helpers/testpmd.js';

/** The last "NIC statistics for port 0" block testpmd printed (each --stats-period). */
function nicStats(out: string): { rxPackets: number; rxBytes: number; txPackets: number; txBytes: number } | null {
  const at = out.lastIndexOf('NIC statistics for port 0');
  if (at < 0) return null;
  const block = out.slice(at, at + 1200);
  const num = (re: RegExp): number => Number(re.exec(block)?.[1] ?? NaN);
  const r = { rxPackets: num(/RX-packets: *(\d+)/), rxBytes: num(/RX-bytes: *(\d+)/), txPackets: num(/TX-packets: *(\d+)/), txBytes: num(/TX-bytes: *(\d+)/) };
  return Object.values(r).some(Number.isNaN) ? null : r;
}

async function until(what: string, ok: () => boolean, timeoutMs: number, peer: Peer): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!ok()) {
    if (Date.now() > end) throw new Error(`${what} after ${timeoutMs} ms\n--- testpmd:\n${peer.output().slice(-3000)}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** The ones' complement sum of 16-bit words (RFC 1071). */
function inetChecksum(b: Uint8Array): number {
  let sum = 0;
  for (let i = 0; i < b.length; i += 2) sum += (b[i]! << 8) | (b[i + 1] ?? 0);
  while (sum > 0xffff) sum = (sum & 0xffff) + (sum >>> 16);
  return ~sum & 0xffff;
}

/**
 * The first 42 bytes of testpmd's txonly frame, from app/test-pmd/txonly.c
 * and testpmd's defaults: Ethernet to eth-peer 0 (02:00:00:00:00:00) from the
 * port's MAC (net_vhost: 56:48:4f:53:54:00, "VHOST" + the port id), IPv4
 * (version 4, IHL 5, total length 50, TTL 64, UDP, 198.18.0.1 -> 198.18.0.2,
 * header checksum), UDP 9 -> 9, length 30, checksum 0. The 22 payload bytes
 * are whatever the mbuf held.
 */
function txonlyHeaders(): Buffer {
  const f = Buffer.alloc(42);
  Buffer.from([2, 0, 0, 0, 0, 0]).copy(f, 0);
  Buffer.from([0x56, 0x48, 0x4f, 0x53, 0x54, 0x00]).copy(f, 6);
  f.writeUInt16BE(0x0800, 12);
  f[14] = 0x45;
  f.writeUInt16BE(20 + 8 + 22, 16);
  f[22] = 64;
  f[23] = 17;
  Buffer.from([198, 18, 0, 1]).copy(f, 26);
  Buffer.from([198, 18, 0, 2]).copy(f, 30);
  f.writeUInt16BE(inetChecksum(f.subarray(14, 34)), 24);
  f.writeUInt16BE(9, 34);
  f.writeUInt16BE(9, 36);
  f.writeUInt16BE(8 + 22, 38);
  return f;
}

interface Run {
  mode: 'rxonly' | 'txonly';
  packed?: boolean;
  queues?: number;
  /** net_vhost connects to us (client=1); we listen. */
  client?: boolean;
  mrgRxbuf?: boolean;
  /** net_vhost with iommu-support=1 and us as its IOMMU (ACCESS_PLATFORM, IOTLB misses answered, 4 KiB pages). */
  iommu?: boolean;
}

async function withTestpmd(r: Run, fn: (d: VirtioNetDriver, tp: Peer) => Promise<void>): Promise<void> {
  const scratch = scratchDir('vdevkit-netvhost-');
  const sock = path.join(scratch.dir, 'vhost.sock');
  const q = r.queues ?? 1;
  const o: VirtioNetDriverOptions & { connectTimeoutMs: number; acceptTimeoutMs: number } = { packed: r.packed ?? false, queuePairs: q, mrgRxbuf: r.mrgRxbuf, connectTimeoutMs: 20_000, acceptTimeoutMs: 20_000, ...(r.iommu ? { iommu: 'identity' as const } : {}) };
  let tp: Peer | null = null;
  let d: VirtioNetDriver | null = null;
  try {
    const start = (): Peer => startTestpmd({ socket: sock, vhost: true, mode: r.mode, prefix: `vdk-nv-${process.pid}`, queues: q, devargs: [r.client ? 'client=1' : '', r.iommu ? 'iommu-support=1' : ''].filter(Boolean).join(',') || undefined, mainLcore: 0 });
    if (r.client) {
      const accepting = VirtioNetDriver.accept(sock, o);
      tp = start();
      d = await accepting;
    } else {
      tp = start();
      d = await VirtioNetDriver.connect(sock, o);
    }
    assert.equal(d.packed, r.packed ?? false);
    assert.equal((d.features & bit(VF.RING_PACKED)) !== 0n, r.packed ?? false, 'RING_PACKED negotiated as asked');
    assert.notEqual(d.features & bit(VF.VERSION_1), 0n);
    for (const f of [0, 1, 7, 8, 9, 10]) assert.equal((d.features >> BigInt(f)) & 1n, 0n, `offload bit ${f} not acked`);
    assert.equal(d.config.fromDevice, false, 'net_vhost offers no CONFIG');
    assert.equal((d.features & bit(VF.ACCESS_PLATFORM)) !== 0n, r.iommu ?? false, 'ACCESS_PLATFORM negotiated with an IOMMU only');
    await fn(d, tp);
    if (r.iommu) {
      const s = d.frontend.iotlbStats;
      console.log(`IOTLB: ${JSON.stringify(s)}`);
      // Every ring and buffer page net_vhost touched came through a MISS we answered with an UPDATE.
      assert.ok(s.misses > 0 && s.updates === s.misses, `IOTLB misses answered: ${JSON.stringify(s)}`);
      assert.equal(s.refused, 0, 'no MISS outside our memory');
    }
  } catch (err) {
    throw new Error(`${(err as Error).message}\n--- testpmd:\n${(tp?.output() ?? '').slice(-3000)}`, { cause: err });
  } finally {
    if (tp && tp.proc.exitCode === null && tp.proc.signalCode === null) await stopTestpmd(tp, 5000);
    await d?.close();
    if (tp) {
      await tp.stop(2000);
      assert.ok(tp.proc.exitCode !== null || tp.proc.signalCode !== null, 'testpmd exited');
    }
    scratch.remove();
  }
}

/** rxonly: every frame we send is counted by testpmd, packets and bytes. */
async function rxonly(t: { diagnostic(s: string): void }, r: Omit<Run, 'mode'>): Promise<void> {
  await withTestpmd({ ...r, mode: 'rxonly' }, async (d, tp) => {
    const q = r.queues ?? 1;
    // testpmd drains its RX queues when forwarding starts (flush_fwd_rx_queues): frames taken then are in its
    // NIC statistics but not its forward statistics. With client=1 we are connected before that, so wait for it.
    await until('testpmd forwarding (its first statistics)', () => nicStats(tp.output()) !== null, 20_000, tp);
    const sizes: number[] = [];
    for (let i = 0; i < 3000; i++) sizes.push(60 + ((i * 97) % 1455));
    sizes.push(60, 1514);
    let bytes = 0;
    const sends: Promise<void>[] = [];
    sizes.forEach((n, i) => {
      const f = Buffer.alloc(n, i & 0xff);
      Buffer.from([2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2]).copy(f, 0);
      f.writeUInt16BE(0x88b5, 12);
      bytes += n;
      sends.push(d.send(f, { queue: i % q }));
    });
    await Promise.all(sends);
    const ours = d.totals();
    assert.equal(ours.txCompleted, sizes.length, 'net_vhost used every TX buffer');
    await until(`testpmd counted ${sizes.length} frames`, () => (nicStats(tp.output())?.rxPackets ?? 0) >= sizes.length, 15_000, tp);
    const nic = nicStats(tp.output())!;
    const out = await stopTestpmd(tp);
    const acc = parseTestpmd(out);
    t.diagnostic(`sent ${sizes.length} frames (${bytes} bytes); testpmd NIC stats ${JSON.stringify(nic)}; forward stats RX ${acc.rxPackets}`);
    assert.equal(nic.rxPackets, sizes.length, 'testpmd RX-packets');
    assert.equal(nic.rxBytes, bytes, 'testpmd RX-bytes: the frames without the virtio-net header');
    assert.equal(acc.rxPackets, sizes.length, 'testpmd forward statistics at exit');
    if (q > 1) assert.deepEqual([...acc.rxQueues].sort(), [0, 1], 'testpmd received on both queues');
  });
}

/** txonly: what testpmd says it sent reaches us, each frame its txonly frame. */
async function txonly(t: { diagnostic(s: string): void }, r: Omit<Run, 'mode'>): Promise<void> {
  await withTestpmd({ ...r, mode: 'txonly' }, async (d, tp) => {
    const q = r.queues ?? 1;
    const want = txonlyHeaders();
    let n = 0;
    let bad: string | null = null;
    const perQueue = new Array<number>(q).fill(0);
    d.on('frame', (f, pair) => {
      perQueue[pair]!++;
      if (n++ < 5000 && bad === null && (f.length !== 64 || !f.subarray(0, 42).equals(want))) bad = `frame ${n}: ${f.toString('hex')} (expected ${want.toString('hex')} + 22 bytes)`;
    });
    await until('frames from testpmd txonly', () => n > 20_000, 20_000, tp);
    const out = await stopTestpmd(tp);
    // testpmd's exit closes the connection; the driver reaps what was published before.
    await until('the disconnect seen', () => d.closed, 5000, tp);
    const acc = parseTestpmd(out);
    const ours = d.totals();
    t.diagnostic(`testpmd sent ${acc.txPackets}; we received ${ours.rxPackets} (${ours.rxBuffers} buffers, ${ours.rxDrops} dropped), per queue ${perQueue.join('/')}`);
    assert.equal(bad, null, String(bad));
    assert.ok(acc.txPackets > 20_000, `testpmd sent ${acc.txPackets}`);
    assert.equal(ours.rxPackets, acc.txPackets, 'every frame testpmd counted as sent reached us');
    assert.equal(ours.rxBytes, 64 * ours.rxPackets);
    assert.equal(ours.rxBuffers, ours.rxPackets, 'one buffer per 64-byte frame');
    assert.equal(ours.rxDrops, 0);
    if (q > 1) for (let i = 0; i < q; i++) assert.ok(perQueue[i]! > 0, `frames on receiveq${i}: ${perQueue.join('/')}`);
  });
}

test('DPDK net_vhost rxonly: frames we send are counted by testpmd (split ring, MRG_RXBUF)', { timeout: 60_000 }, async (t) => {
  await rxonly(t, {});
});

test('DPDK net_vhost rxonly: packed ring', { timeout: 60_000 }, async (t) => {
  await rxonly(t, { packed: true });
});

test('DPDK net_vhost txonly: frames testpmd sends reach us (split ring, MRG_RXBUF)', { timeout: 60_000 }, async (t) => {
  await txonly(t, {});
});

test('DPDK net_vhost behind our IOMMU (ACCESS_PLATFORM, IOTLB misses answered by UPDATEs): rxonly and txonly, split and packed', { timeout: 120_000 }, async (t) => {
  await rxonly(t, { iommu: true });
  await txonly(t, { iommu: true, packed: true });
});

test('DPDK net_vhost txonly: packed ring, and split without MRG_RXBUF', { timeout: 90_000 }, async (t) => {
  await txonly(t, { packed: true });
  await txonly(t, { mrgRxbuf: false });
});

test('DPDK net_vhost with 2 queue pairs: rxonly and txonly on both queues', { timeout: 90_000 }, async (t) => {
  await rxonly(t, { queues: 2 });
  await txonly(t, { queues: 2, packed: true });
});

test('DPDK net_vhost as the socket client (client=1): we listen, it connects; rxonly and txonly', { timeout: 90_000 }, async (t) => {
  await rxonly(t, { client: true });
  await txonly(t, { client: true });
});

test('the features we ack to net_vhost: MRG_RXBUF on by default and off when asked, never MQ with one pair', { timeout: 60_000 }, async () => {
  for (const mrgRxbuf of [true, false]) {
    await withTestpmd({ mode: 'rxonly', mrgRxbuf }, async (d) => {
      assert.equal(d.mergeable, mrgRxbuf);
      assert.equal(d.features & bit(NetFeature.MQ), 0n);
      assert.equal(d.features & bit(NetFeature.CTRL_VQ), 0n, 'no control queue unless asked');
    });
  }
});
