/**
 * `vhost-user-probe` and `blk-bench` (the exported command functions, run in
 * a child process as the CLI will run them) against real back-ends:
 * qemu-storage-daemon, our vhost-user-blk process, virtiofsd (fs: its
 * features decoded; it offers no CONFIG), DPDK testpmd's net_vhost and our
 * vhost-user-net switch (net: features and config decoded). Peers are started here by pid; a
 * missing one fails.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdirSync, truncateSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { scratchDir, startPeer, waitForSocket, type Peer } from './peers.js';
import { startTestpmd, stopTestpmd } from '../helpers/testpmd.js';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const CLI = path.resolve(HERE, '../../src/cli/main.js');
const MODULE = { probe: path.resolve(HERE, '../../src/cli/vhost-user-probe.js'), bench: path.resolve(HERE, '../../src/cli/blk-bench.js') };

/** Runs vhostUserProbeCommand / blkBenchCommand in a child: exit code and output. */
function run(which: 'probe' | 'bench', args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const fn = which === 'probe' ? 'vhostUserProbeCommand' : 'blkBenchCommand';
  const code = `import(${JSON.stringify(MODULE[which])}).then(async (m) => { process.exitCode = await m.${fn}(${JSON.stringify(args)}); })`;
  return new Promise((resolve) => {
    const p = spawn(process.execPath, ['--input-type=module', '-e', code], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    p.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    p.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    p.on('exit', (c) => resolve({ code: c ?? -1, stdout, stderr }));
  });
}

type Kind = 'qsd' | 'ours' | 'virtiofsd' | 'dpdk' | 'ours-net';

async function peer(kind: Kind): Promise<{ socket: string; peer: Peer; close(): Promise<void> }> {
  const scratch = scratchDir('vdevkit-probe-');
  const socket = path.join(scratch.dir, 'be.sock');
  const image = path.join(scratch.dir, 'disk.img');
  writeFileSync(image, '');
  truncateSync(image, 32 << 20);
  let p: Peer;
  if (kind === 'qsd') {
    p = startPeer('qemu-storage-daemon', ['--blockdev', `driver=file,node-name=f0,filename=${image},cache.direct=off`, '--export', `type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path=${socket},writable=on,num-queues=2`]);
  } else if (kind === 'ours') {
    p = startPeer(process.execPath, [CLI, 'vhost-user-blk', '--socket', socket, '--file', image, '--queues', '2']);
  } else if (kind === 'dpdk') {
    p = startTestpmd({ socket, vhost: true, mode: 'rxonly', prefix: `vdk-probe-${process.pid}`, queues: 2 });
  } else if (kind === 'ours-net') {
    p = startPeer(process.execPath, [CLI, 'vhost-user-net', '--socket', socket, '--queues', '2', '--mtu', '9000']);
  } else {
    const dir = path.join(scratch.dir, 'share');
    mkdirSync(dir);
    p = startPeer('/usr/lib/qemu/virtiofsd', [`--socket-path=${socket}`, '-o', `source=${dir}`, '-o', 'cache=none']);
  }
  try {
    await waitForSocket(socket, p);
  } catch (err) {
    scratch.remove();
    throw err;
  }
  return {
    socket,
    peer: p,
    async close() {
      if (kind === 'dpdk') await stopTestpmd(p, 5000);
      await p.stop();
      scratch.remove();
    },
  };
}

interface Report {
  type: string;
  features: { names: string[] };
  protocolFeatures: { names: string[] } | null;
  queues: number | null;
  config: Record<string, unknown> | null;
  checks: { name: string; result: string; detail: string }[];
}

for (const kind of ['qsd', 'ours', 'virtiofsd', 'dpdk', 'ours-net'] as const) {
  test(`vhost-user-probe against ${kind}: decoded features, queues, config; every conformance check passes (or is skipped / a warning)`, { timeout: 30_000 }, async () => {
    const be = await peer(kind);
    try {
      const r = await run('probe', ['--socket', be.socket, '--json']);
      assert.equal(r.code, 0, `${r.stdout}\n${r.stderr}\n--- peer:\n${be.peer.output()}`);
      const rep = JSON.parse(r.stdout) as Report;
      assert.ok(rep.features.names.includes('VERSION_1'));
      assert.ok(rep.protocolFeatures?.names.includes('REPLY_ACK'));
      // GET_QUEUE_NUM: net_vhost answers 128 (its maximum); our net port 2 pairs + the control queue.
      assert.equal(rep.queues, kind === 'dpdk' ? 128 : kind === 'ours-net' ? 5 : 2);
      assert.ok(rep.checks.length >= 8);
      assert.ok(rep.checks.every((c) => c.result !== 'fail'), JSON.stringify(rep.checks));
      assert.equal(rep.checks.find((c) => c.name.startsWith('vring 0'))?.result, 'pass');
      if (kind === 'dpdk' || kind === 'ours-net') {
        assert.equal(rep.type, 'net');
        assert.ok(rep.features.names.includes('MRG_RXBUF'), rep.features.names.join(' '));
        assert.ok(rep.features.names.includes('CTRL_VQ'));
        if (kind === 'ours-net') {
          assert.ok(rep.features.names.includes('MQ'));
          assert.equal(rep.config?.maxVirtqueuePairs, 2);
          assert.equal(rep.config?.mtu, 9000);
        }
      } else if (kind === 'virtiofsd') {
        assert.equal(rep.type, 'fs');
        assert.equal(rep.config, null, 'virtiofsd 7.2 offers no CONFIG');
      } else {
        assert.equal(rep.type, 'blk');
        assert.ok(rep.features.names.includes(kind === 'qsd' ? 'SIZE_MAX' : 'SEG_MAX'));
        assert.equal(rep.config?.capacity, String((32 << 20) / 512));
        assert.equal(rep.config?.numQueues, 2);
        if (kind === 'ours') assert.ok(rep.features.names.includes('RING_PACKED'));
      }
      if (kind === 'qsd' || kind === 'ours') {
        const text = await run('probe', ['--socket', be.socket]);
        assert.equal(text.code, 0, text.stderr);
        assert.match(text.stdout, /check +result +detail/);
        assert.match(text.stdout, /PASS/);
      }
    } finally {
      await be.close();
    }
  });
}

test('blk-bench against qemu-storage-daemon and ours: randread at depth 8 on 2 queues; randwrite --verify (packed on ours)', { timeout: 60_000 }, async () => {
  for (const kind of ['qsd', 'ours'] as const) {
    const be = await peer(kind);
    try {
      const r = await run('bench', ['--socket', be.socket, '--rw', 'randread', '--depth', '8', '--queues', '2', '--time', '1', '--json']);
      assert.equal(r.code, 0, `${r.stderr}\n--- peer:\n${be.peer.output()}`);
      const res = JSON.parse(r.stdout) as { ios: number; iops: number; queues: number; errors: number; latency: { p50: number; p99: number } };
      assert.ok(res.ios > 100, `${res.ios} I/Os`);
      assert.equal(res.queues, 2);
      assert.equal(res.errors, 0);
      assert.ok(res.latency.p50 > 0 && res.latency.p99 >= res.latency.p50);
      const w = await run('bench', ['--socket', be.socket, '--rw', 'randwrite', '--bs', '8k', '--depth', '4', '--time', '1', '--size', '1m', '--verify', ...(kind === 'ours' ? ['--packed'] : [])]);
      assert.equal(w.code, 0, `${w.stdout}\n${w.stderr}`);
      assert.match(w.stdout, /verify: \d+ blocks OK, 0 bad/);
      assert.match(w.stdout, /IOPS/);
    } finally {
      await be.close();
    }
  }
});
