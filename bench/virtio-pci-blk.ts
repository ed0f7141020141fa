/**
 * bench/virtio-pci-blk: our virtio PCI driver over vfio-user
 * (VirtioPciBlkDriver, src/virtio/pci-blk-driver.ts) against the same disk
 * object served over vhost-user and driven by VirtioBlkDriver, in the same
 * run, alternating (A B, B A, ...): `vdevkit serve virtio-blk` (a 1 GiB null
 * disk) and `vdevkit vhost-user-blk --null 1G`, each a process of its own;
 * the drivers run in this process. Both use the same ring code on both sides
 * (src/virtio/); what differs is the transport: REGION_WRITE kicks and MSI-X
 * eventfds over vfio-user, eventfd kicks and calls over vhost-user.
 *
 *   node dist/bench/virtio-pci-blk.js [--seconds 2] [--rounds 3] [--packed]
 *
 * Jobs: 4 KiB random reads at queue depth 1 and 32, 128 KiB sequential
 * writes at depth 16; one queue. Reports IOPS (and MB/s) medians per
 * transport and the ratio vfio-user / vhost-user. `uptime`'s load is printed
 * before and after.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { formatTable, median, repoRoot, uptime } from './common.js';
import { VirtioPciBlkDriver } from '../src/virtio/pci-blk-driver.js';
import { VirtioBlkDriver } from '../src/vhost-user/blk-driver.js';
import { startPeer, waitForSocket, type Peer } from '../test/interop/peers.js';

const { values } = parseArgs({
  options: {
    seconds: { type: 'string', default: '2' },
    rounds: { type: 'string', default: '3' },
    packed: { type: 'boolean', default: false },
  },
});
const seconds = Number(values.seconds);
const rounds = Number(values.rounds);
const packed = values.packed;
const CLI = path.join(repoRoot(), 'dist', 'src', 'cli', 'main.js');
const DISK = 1 << 30;

type Transport = 'vfio-user' | 'vhost-user';
/** What both drivers offer the jobs. */
interface Disk {
  read(offset: number, length: number): Promise<Buffer>;
  write(offset: number, data: Uint8Array): Promise<void>;
  close(): Promise<void>;
}

const JOBS = [
  { name: '4K randread QD1', op: 'read', size: 4096, depth: 1 },
  { name: '4K randread QD32', op: 'read', size: 4096, depth: 32 },
  { name: '128K seqwrite QD16', op: 'write', size: 128 * 1024, depth: 16 },
] as const;

async function startServer(kind: Transport, socket: string): Promise<Peer> {
  const args = kind === 'vfio-user' ? [CLI, 'serve', 'virtio-blk', '--socket', socket, '--quiet'] : [CLI, 'vhost-user-blk', '--socket', socket, '--null', '1G'];
  const peer = startPeer(process.execPath, args);
  await waitForSocket(socket, peer);
  return peer;
}

async function connect(kind: Transport, socket: string): Promise<Disk> {
  const o = { queues: 1, queueSize: 128, packed };
  return kind === 'vfio-user' ? VirtioPciBlkDriver.connect(socket, o) : VirtioBlkDriver.connect(socket, o);
}

/** `depth` workers issuing one request after another for `seconds`: completed requests per second. */
async function runJob(disk: Disk, job: (typeof JOBS)[number]): Promise<number> {
  const data = Buffer.alloc(job.size, 0x5a);
  const end = performance.now() + seconds * 1000;
  let done = 0;
  let seq = 0;
  const blocks = DISK / job.size;
  const worker = async (): Promise<void> => {
    while (performance.now() < end) {
      if (job.op === 'read') await disk.read(Math.floor(Math.random() * blocks) * job.size, job.size);
      else await disk.write((seq++ % blocks) * job.size, data);
      done++;
    }
  };
  const t0 = performance.now();
  await Promise.all(Array.from({ length: job.depth }, worker));
  return done / ((performance.now() - t0) / 1000);
}

async function main(): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdevkit-bench-vpci-'));
  const results = new Map<string, number[]>();
  console.log(`bench/virtio-pci-blk: ${seconds} s per job, ${rounds} rounds, ${packed ? 'packed' : 'split'} rings, 1 queue of 128; ${os.cpus().length} CPUs`);
  console.log(`before: ${uptime()}`);
  try {
    for (let r = 0; r < rounds; r++) {
      const order: Transport[] = r % 2 === 0 ? ['vfio-user', 'vhost-user'] : ['vhost-user', 'vfio-user'];
      for (const kind of order) {
        const socket = path.join(dir, `${kind}-${r}.sock`);
        const server = await startServer(kind, socket);
        try {
          const disk = await connect(kind, socket);
          try {
            for (const job of JOBS) {
              const iops = await runJob(disk, job);
              const key = `${job.name}|${kind}`;
              results.set(key, [...(results.get(key) ?? []), iops]);
            }
          } finally {
            await disk.close();
          }
        } finally {
          await server.stop();
        }
      }
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  const rows = JOBS.map((job) => {
    const pci = median(results.get(`${job.name}|vfio-user`) ?? []);
    const vu = median(results.get(`${job.name}|vhost-user`) ?? []);
    const mb = (iops: number): string => `${((iops * job.size) / 1e6).toFixed(0)} MB/s`;
    return [job.name, `${pci.toFixed(0)} (${mb(pci)})`, `${vu.toFixed(0)} (${mb(vu)})`, (pci / vu).toFixed(2)];
  });
  console.log(formatTable(['job (IOPS, medians)', 'vfio-user PCI', 'vhost-user', 'ratio'], rows));
  console.log(`after: ${uptime()}`);
}

main().catch((err: unknown) => {
  console.error(err);
  process.exitCode = 1;
});
