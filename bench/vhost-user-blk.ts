/**
 * bench/vhost-user-blk: our userspace virtio-blk driver (VirtioBlkDriver,
 * through `vdevkit blk-bench`, a process of its own) against two null
 * back-ends in the same run, alternating: qemu-storage-daemon's null-co export
 * (read-zeroes=on) and ours (`vdevkit vhost-user-blk --null`, which zeroes
 * reads too). 4 KiB random reads at queue depth 1 and 32 (per queue), on 1 and
 * 4 queues. Beside them the C floor of any vhost-user round trip
 * (bench/ref/pingpong.c: two processes, a shared memory word and two eventfds).
 *
 *   npm run bench:blk -- [--seconds 3] [--rounds 2] [--setups pinned,unpinned]
 *
 * pinned: every process (back-end, driver, both ping-pong processes) under
 * `taskset -c 0`; unpinned: no taskset. Reports IOPS and p50/p99 per job,
 * ours / qsd ratios (IOPS), and the QD1 p50 of the driver over the floor's
 * p50. `uptime`'s load is printed before and after.
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { compileReference, formatTable, median, repoRoot, runContender, uptime } from './common.js';
import { scratchDir } from '../test/interop/peers.js';

const { values } = parseArgs({
  options: {
    seconds: { type: 'string', default: '3' },
    rounds: { type: 'string', default: '2' },
    setups: { type: 'string', default: 'pinned,unpinned' },
  },
});
const seconds = Number(values.seconds);
const rounds = Number(values.rounds);
const setups = values.setups.split(',') as ('pinned' | 'unpinned')[];
const CLI = path.join(repoRoot(), 'dist', 'src', 'cli', 'main.js');
const JOBS = [
  { depth: 1, queues: 1 },
  { depth: 32, queues: 1 },
  { depth: 1, queues: 4 },
  { depth: 32, queues: 4 },
];
type Backend = 'qsd' | 'ours';

const withCpus = (cpus: string | undefined, file: string, args: string[]): [string, string[]] => (cpus ? ['taskset', ['-c', cpus, file, ...args]] : [file, args]);

async function startBackend(kind: Backend, socket: string, cpus: string | undefined): Promise<ChildProcess> {
  const [file, args] =
    kind === 'qsd'
      ? withCpus(cpus, 'qemu-storage-daemon', [
          '--blockdev',
          'driver=null-co,node-name=null0,size=1073741824,read-zeroes=on',
          '--export',
          `type=vhost-user-blk,id=exp0,node-name=null0,addr.type=unix,addr.path=${socket},writable=on,num-queues=4`,
        ])
      : withCpus(cpus, process.execPath, [CLI, 'vhost-user-blk', '--socket', socket, '--null', '1G', '--queues', '4']);
  const p = spawn(file, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  p.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  const end = Date.now() + 10_000;
  while (!fs.existsSync(socket)) {
    if (p.exitCode !== null || Date.now() > end) throw new Error(`${kind} did not listen on ${socket}:\n${err}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  return p;
}

async function stopBackend(p: ChildProcess): Promise<void> {
  if (p.exitCode !== null || p.signalCode !== null) return;
  const gone = new Promise((r) => p.once('exit', r));
  p.kill('SIGTERM');
  const t = setTimeout(() => p.kill('SIGKILL'), 2000);
  await gone;
  clearTimeout(t);
}

interface Job {
  iops: number;
  p50: number;
  p99: number;
}

/** One blk-bench job (our driver in its own process) against the back-end at `socket`. */
function blkBench(socket: string, depth: number, queues: number, cpus: string | undefined): Promise<Job> {
  const [file, args] = withCpus(cpus, process.execPath, [CLI, 'blk-bench', '--socket', socket, '--rw', 'randread', '--bs', '4k', '--depth', String(depth), '--queues', String(queues), '--time', String(seconds), '--json']);
  return new Promise((resolve, reject) => {
    execFile(file, args, { timeout: (seconds + 30) * 1000 }, (err, stdout, stderr) => {
      if (err) return reject(new Error(`blk-bench: ${err.message}\n${stderr}`));
      const r = JSON.parse(stdout.trim().split('\n').pop()!) as { iops: number; errors: number; latency: { p50: number; p99: number } };
      if (r.errors > 0) return reject(new Error(`blk-bench: ${r.errors} errors`));
      resolve({ iops: r.iops, p50: r.latency.p50, p99: r.latency.p99 });
    });
  });
}

async function main(): Promise<void> {
  const pingpong = compileReference('pingpong');
  process.stdout.write(`bench/vhost-user-blk: ${seconds} s per job, ${rounds} round(s), 4 KiB randread; load before: ${uptime()}\n`);
  const s = scratchDir('vdevkit-bench-blk-');
  try {
    for (const setup of setups) {
      const cpus = setup === 'pinned' ? '0' : undefined;
      const res = new Map<string, Job[]>();
      const floor: number[] = [];
      const floor99: number[] = [];
      const add = (k: string, j: Job): void => void (res.get(k) ?? res.set(k, []).get(k)!).push(j);
      for (let round = 0; round < rounds; round++) {
        const f = await runContender(pingpong, ['200000', '20000'], { cpus });
        floor.push(f['p50_us'] as number);
        floor99.push(f['p99_us'] as number);
        // Alternate which back-end goes first.
        const order: Backend[] = round % 2 === 0 ? ['qsd', 'ours'] : ['ours', 'qsd'];
        for (const job of JOBS) {
          for (const kind of order) {
            const socket = path.join(s.dir, `${kind}.sock`);
            fs.rmSync(socket, { force: true });
            const be = await startBackend(kind, socket, cpus);
            try {
              add(`${kind} qd${job.depth} q${job.queues}`, await blkBench(socket, job.depth, job.queues, cpus));
            } finally {
              await stopBackend(be);
            }
          }
        }
      }
      const m = (k: string, f: (j: Job) => number): number => Math.round(median(res.get(k)!.map(f)) * 10) / 10;
      const rows: string[][] = [];
      for (const job of JOBS) {
        const q = `qsd qd${job.depth} q${job.queues}`;
        const o = `ours qd${job.depth} q${job.queues}`;
        rows.push([
          `QD${job.depth} x ${job.queues}q`,
          String(m(q, (j) => j.iops)),
          `${m(q, (j) => j.p50)} / ${m(q, (j) => j.p99)}`,
          String(m(o, (j) => j.iops)),
          `${m(o, (j) => j.p50)} / ${m(o, (j) => j.p99)}`,
          (m(o, (j) => j.iops) / m(q, (j) => j.iops)).toFixed(2),
        ]);
      }
      process.stdout.write(`\n${setup} (${cpus ? `taskset -c ${cpus}` : 'no taskset'}), medians of ${rounds}:\n`);
      process.stdout.write(formatTable(['job', 'qsd IOPS', 'qsd p50/p99 us', 'ours IOPS', 'ours p50/p99 us', 'ours/qsd'], rows));
      const fl = median(floor);
      process.stdout.write(
        `\nC floor (eventfd ping-pong through shared memory, 2 processes): p50 ${fl.toFixed(2)} us, p99 ${median(floor99).toFixed(2)} us\n` +
          `driver QD1 x 1q p50 / floor p50: against qsd ${(m('qsd qd1 q1', (j) => j.p50) / fl).toFixed(1)}x, against ours ${(m('ours qd1 q1', (j) => j.p50) / fl).toFixed(1)}x (target 1.5x)\n` +
          `ours / qsd at QD32 x 1q: ${(m('ours qd32 q1', (j) => j.iops) / m('qsd qd32 q1', (j) => j.iops)).toFixed(2)}x, x 4q: ${(m('ours qd32 q4', (j) => j.iops) / m('qsd qd32 q4', (j) => j.iops)).toFixed(2)}x (target >= 1.0x)\n`,
      );
    }
  } finally {
    s.remove();
  }
  process.stdout.write(`load after: ${uptime()}\n`);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
