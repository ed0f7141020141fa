/**
 * bench/scale-vhost-user-blk: one back-end process serving DEVICES (16)
 * vhost-user-blk devices, under our front-end's load (issue 16).
 *
 *   ours  VhostUserBlkDevice + VhostUserBackend, DEVICES of them (16
 *         sockets, 16 null disks of 1 GiB whose reads give zeros) in one
 *         Node process (this file's --backend mode: the CLI serves one socket
 *         per process);
 *   qsd   qemu-storage-daemon with DEVICES null-co blockdevs
 *         (read-zeroes=on) and DEVICES vhost-user-blk exports in one process.
 *
 * The front-end is our VirtioBlkDriver, all devices driven from one other
 * Node process (--frontend mode): per device, DEPTH workers each issuing
 * 4 KiB random reads on queue 0, one at a time (queue depth DEPTH per
 * device); every read is checked (4096 bytes, all zero). Cases: 1 device and
 * all DEVICES at once, at QD1 and QD32, for SECONDS each. Reports total IOPS,
 * per-device IOPS (min - max), latency p50 / p99 over all reads and the worst
 * device's p99, the back-end's and the front-end's CPU time per I/O
 * (/proc/PID/task/∗/schedstat), the back-end's VmRSS halfway through each
 * case (and before the first), the ratio ours / qsd (IOPS) and DEVICES / 1
 * device (IOPS).
 *
 *   npm run -s build && node dist/bench/scale-vhost-user-blk.js [--devices 16] [--seconds 5]
 *     [--rounds 2] [--setups pinned,unpinned] [--only ours,qsd]
 *
 * pinned: back-end and front-end under `taskset -c 0`; unpinned: no taskset.
 * Each round starts fresh back-ends (kept across that round's cases) and
 * alternates which goes first. Any failed read or connection is an error;
 * the run fails if there is one.
 *
 * Internal modes: --backend DIR N, --frontend (driven over IPC).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { VhostUserBlkDevice } from '../src/devices/vhost-user-blk.js';
import { VhostUserBackend } from '../src/vhost-user/backend.js';
import { VirtioBlkDriver } from '../src/vhost-user/blk-driver.js';
import { formatTable, median } from './common.js';
import { qemuStorageDaemon } from '../test/interop/guest.js';
import { ask, benchMain, f1, forkChild, latencies, loadavg, procCpuMs, procMemory, Samples, serveParent, sleepUntil, stopChild, type Lat } from './scale-common.js';

const THIS_FILE = fileURLToPath(import.meta.url);
const BS = 4096;
const DISK_BYTES = 1 << 30;

/* ------------------------------------------------------------------ */
/* Our back-end process (--backend DIR N)                              */

function runBackend(dir: string, n: number): void {
  let errors = 0;
  const disks: VhostUserBlkDevice[] = [];
  const backends: VhostUserBackend[] = [];
  for (let i = 0; i < n; i++) {
    const disk = VhostUserBlkDevice.open({ size: DISK_BYTES, queues: 1 });
    const be = VhostUserBackend.listen(path.join(dir, `ours-${i}.sock`), disk);
    be.on('disconnect', (err) => {
      if (err) {
        errors++;
        process.stderr.write(`  [our back-end] device ${i}: ${err.message}\n`);
      }
    });
    disks.push(disk);
    backends.push(be);
  }
  serveParent(async (m) => {
    if (m['cmd'] === 'stats') return { errors: errors + disks.reduce((a, d) => a + d.stats.errors, 0), reads: disks.reduce((a, d) => a + d.stats.reads, 0) };
    throw new Error(`unknown command ${String(m['cmd'])}`);
  });
  process.on('SIGTERM', () => {
    for (const b of backends) b.close();
    for (const d of disks) d.close();
    process.exit(0);
  });
  process.send!({ ready: true });
}

/* ------------------------------------------------------------------ */
/* The front-end process (--frontend)                                  */

interface DeviceRun {
  ios: number;
  errors: number;
  lat: Float64Array;
  firstError?: string;
}

async function frontendRun(m: { sockets: string[]; depth: number; seconds: number; startEpoch: number}): Promise<{ devices: DeviceRun[]; seconds: number }> {
  const drivers: VirtioBlkDriver[] = [];
  const out: DeviceRun[] = m.sockets.map(() => ({ ios: 0, errors: 0, lat: new Float64Array(0) }));
  try {
    const queueSize = Math.max(16, 2 ** Math.ceil(Math.log2(m.depth)));
    for (const s of m.sockets) drivers.push(await VirtioBlkDriver.connect(s, { queues: 1, queueSize, dmaBytes: Math.max(1 << 20, BS * m.depth * 2), ioTimeoutMs: 10_000 }));
    const blocks = Math.floor(DISK_BYTES / BS);
    for (const d of drivers) if (d.size < DISK_BYTES) throw new Error(`a disk of ${d.size} bytes`);
    await sleepUntil(performance.now() + (m.startEpoch - Date.now()));
    const start = performance.now();
    const end = start + m.seconds * 1000;
    const zero = Buffer.alloc(BS);
    await Promise.all(
      drivers.map(async (d, i) => {
        const r = out[i]!;
        const lat = new Samples();
        const worker = async (): Promise<void> => {
          for (;;) {
            const t0 = performance.now();
            if (t0 >= end) return;
            try {
              const b = await d.read(Math.floor(Math.random() * blocks) * BS, BS);
              if (b.length !== BS || !b.equals(zero)) throw new Error(`read ${b.length} bytes, not ${BS} zeros`);
              lat.push((performance.now() - t0) * 1000);
              r.ios++;
            } catch (err) {
              r.errors++;
              r.firstError ??= (err as Error).message;
              if (d.frontend.closed) return;
            }
          }
        };
        await Promise.all(Array.from({ length: m.depth }, worker));
        r.lat = lat.take();
      }),
    );
    const seconds = (performance.now() - start) / 1000;
    return { devices: out, seconds };
  } finally {
    await Promise.all(drivers.map((d) => d.close()));
  }
}

/* ------------------------------------------------------------------ */
/* The driver                                                          */

type Backend = 'ours' | 'qsd';

const { values: opt } = parseArgs({
  args: process.argv[1] === THIS_FILE && !['--backend', '--frontend'].includes(process.argv[2] ?? '') ? process.argv.slice(2) : [],
  options: {
    devices: { type: 'string', default: '16' },
    seconds: { type: 'string', default: '5' },
    rounds: { type: 'string', default: '2' },
    setups: { type: 'string', default: 'pinned,unpinned' },
    only: { type: 'string', default: 'ours,qsd' },
  },
});
const DEVICES = Number(opt.devices);
const SECONDS = Number(opt.seconds);
const ROUNDS = Number(opt.rounds);
const CASES = [
  { devices: 1, depth: 1 },
  { devices: 1, depth: 32 },
  { devices: DEVICES, depth: 1 },
  { devices: DEVICES, depth: 32 },
];
const caseName = (c: { devices: number; depth: number }): string => `${c.devices} dev QD${c.depth}`;

interface CaseResult {
  iops: number;
  perDevMin: number;
  perDevMax: number;
  lat: Lat;
  worstP99: number;
  errors: number;
  cpuUsPerIo: number;
  /** The front-end process's CPU time per I/O. */
  feCpuUsPerIo: number;
  /** The back-end's VmRSS halfway through the case, kB. */
  beRssKb: number;
}

function sockPath(dir: string, kind: Backend, i: number): string {
  return path.join(dir, `${kind}-${i}.sock`);
}

async function waitForSockets(paths: string[], child: ChildProcess, what: string, stderr: () => string): Promise<void> {
  const deadline = Date.now() + 15_000;
  while (!paths.every((p) => fs.existsSync(p))) {
    if (child.exitCode !== null) throw new Error(`${what} exited (${child.exitCode}) before listening:\n${stderr()}`);
    if (Date.now() > deadline) throw new Error(`${what} did not listen on ${paths.length} sockets within 15 s:\n${stderr()}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

async function startBackend(kind: Backend, dir: string, cpus: string | undefined): Promise<ChildProcess> {
  const socks = Array.from({ length: DEVICES }, (_, i) => sockPath(dir, kind, i));
  if (kind === 'ours') {
    const child = forkChild(THIS_FILE, ['--backend', dir, String(DEVICES)], cpus);
    await new Promise<void>((resolve, reject) => {
      child.once('message', () => resolve());
      child.once('exit', (c) => reject(new Error(`our back-end exited (${c}) before READY`)));
    });
    return child;
  }
  const args: string[] = [];
  for (let i = 0; i < DEVICES; i++) {
    args.push('--blockdev', `driver=null-co,node-name=null${i},size=${DISK_BYTES},read-zeroes=on`);
    args.push('--export', `type=vhost-user-blk,id=exp${i},node-name=null${i},addr.type=unix,addr.path=${socks[i]},writable=on,num-queues=1`);
  }
  const bin = qemuStorageDaemon();
  const [cmd, argv] = cpus !== undefined ? ['taskset', ['-c', cpus, bin, ...args]] : [bin, args];
  const child = spawn(cmd, argv, { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  child.stderr!.on('data', (d: Buffer) => {
    if (err.length < 4000) err += d.toString();
  });
  await waitForSockets(socks, child, 'qemu-storage-daemon', () => err);
  return child;
}

async function runCase(fe: ChildProcess, be: ChildProcess, kind: Backend, dir: string, c: { devices: number; depth: number }): Promise<CaseResult> {
  const sockets = Array.from({ length: c.devices }, (_, i) => sockPath(dir, kind, i));
  let beRssKb = NaN;
  const probe = setTimeout(() => (beRssKb = procMemory(be.pid!).vmRss), 100 + (SECONDS * 1000) / 2);
  const cpu0 = procCpuMs(be.pid!);
  const fe0 = procCpuMs(fe.pid!);
  const r = await ask<{ devices: DeviceRun[]; seconds: number }>(fe, { cmd: 'run', sockets, depth: c.depth, seconds: SECONDS, startEpoch: Date.now() + 100 });
  const cpu1 = procCpuMs(be.pid!);
  const fe1 = procCpuMs(fe.pid!);
  clearTimeout(probe);
  const errors = r.devices.reduce((a, d) => a + d.errors, 0);
  if (errors > 0) process.stderr.write(`  ${kind} ${caseName(c)}: ${errors} errors; first: ${r.devices.find((d) => d.firstError)?.firstError}\n`);
  const ios = r.devices.reduce((a, d) => a + d.ios, 0);
  const per = r.devices.map((d) => d.ios / r.seconds);
  return {
    iops: ios / r.seconds,
    perDevMin: Math.min(...per),
    perDevMax: Math.max(...per),
    lat: latencies(r.devices.map((d) => d.lat)),
    worstP99: Math.max(...r.devices.map((d) => latencies([d.lat]).p99)),
    errors,
    cpuUsPerIo: ((cpu1 - cpu0) * 1000) / Math.max(1, ios),
    feCpuUsPerIo: ((fe1 - fe0) * 1000) / Math.max(1, ios),
    beRssKb,
  };
}

async function driver(): Promise<number> {
  const only = opt.only.split(',') as Backend[];
  const setups = opt.setups.split(',');
  process.stdout.write(
    `bench/scale-vhost-user-blk: ${DEVICES} devices in one back-end process, 4 KiB random reads, ${SECONDS} s per case, ${ROUNDS} round(s); ` +
      `${os.cpus().length} CPUs; loadavg ${loadavg()}; ${new Date().toISOString()}\n`,
  );
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdevkit-scale-blk-'));
  let totalErrors = 0;
  try {
    for (const setup of setups) {
      const cpus = setup === 'pinned' ? '0' : undefined;
      const res = new Map<string, CaseResult[]>();
      const rss = new Map<Backend, number[]>();
      for (let round = 0; round < ROUNDS; round++) {
        const order = round % 2 === 0 ? only : [...only].reverse();
        for (const kind of order) {
          process.stderr.write(`${setup} round ${round + 1}, ${kind} (loadavg ${loadavg()}):\n`);
          const be = await startBackend(kind, dir, cpus);
          const fe = forkChild(THIS_FILE, ['--frontend'], cpus);
          try {
            (rss.get(kind) ?? rss.set(kind, []).get(kind)!).push(procMemory(be.pid!).vmRss);
            for (const c of CASES) {
              const r = await runCase(fe, be, kind, dir, c);
              totalErrors += r.errors;
              const k = `${kind}: ${caseName(c)}`;
              (res.get(k) ?? res.set(k, []).get(k)!).push(r);
              process.stderr.write(`  ${k.padEnd(20)} ${Math.round(r.iops)} IOPS, p50 ${f1(r.lat.p50)} p99 ${f1(r.lat.p99)} us, ${r.errors} errors\n`);
            }
            if (kind === 'ours') {
              const s = await ask<{ errors: number }>(be, { cmd: 'stats' });
              totalErrors += s.errors;
            }
          } finally {
            await stopChild(fe);
            await stopChild(be);
            for (const f of fs.readdirSync(dir)) fs.rmSync(path.join(dir, f), { force: true });
          }
        }
      }
      const rows: string[][] = [];
      for (const kind of only) {
        for (const c of CASES) {
          const rs = res.get(`${kind}: ${caseName(c)}`)!;
          const m = (f: (x: CaseResult) => number): number => median(rs.map(f));
          rows.push([
            `${kind}: ${caseName(c)}`,
            String(Math.round(m((x) => x.iops))),
            `${Math.round(m((x) => x.perDevMin))} - ${Math.round(m((x) => x.perDevMax))}`,
            f1(m((x) => x.lat.p50)),
            f1(m((x) => x.lat.p99)),
            f1(m((x) => x.worstP99)),
            f1(m((x) => x.cpuUsPerIo)),
            f1(m((x) => x.feCpuUsPerIo)),
            String(Math.round(m((x) => x.beRssKb) / 1024)),
            String(rs.reduce((a, x) => a + x.errors, 0)),
          ]);
        }
      }
      const lines = [`\n${setup} (${cpus !== undefined ? `taskset -c ${cpus}` : 'no taskset'}), medians of ${ROUNDS} round(s); latencies in us; loadavg ${loadavg()}`];
      lines.push(formatTable(['case', 'IOPS', 'per device', 'p50', 'p99', 'worst dev p99', 'back-end CPU us/IO', 'front-end CPU us/IO', 'back-end RSS MiB', 'errors'], rows));
      const iops = (kind: Backend, c: { devices: number; depth: number }): number => median(res.get(`${kind}: ${caseName(c)}`)!.map((x) => x.iops));
      for (const c of CASES) {
        if (only.length === 2) {
          const paired = median(res.get(`ours: ${caseName(c)}`)!.map((x, i) => x.iops / res.get(`qsd: ${caseName(c)}`)![i]!.iops));
          lines.push(`ours / qsd, ${caseName(c)}: ${(iops('ours', c) / iops('qsd', c)).toFixed(2)} (paired ${paired.toFixed(2)})`);
        }
      }
      for (const kind of only) {
        lines.push(
          `${kind}: ${DEVICES} dev / 1 dev IOPS: QD1 ${(iops(kind, CASES[2]!) / iops(kind, CASES[0]!)).toFixed(2)}, QD32 ${(iops(kind, CASES[3]!) / iops(kind, CASES[1]!)).toFixed(2)}; ` +
            `back-end RSS before the first case ${Math.round(median(rss.get(kind)!) / 1024)} MiB`,
        );
      }
      process.stdout.write(`${lines.join('\n')}\n`);
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  return totalErrors;
}

benchMain(THIS_FILE, 'scale-vhost-user-blk', { '--backend': (a) => runBackend(a[0]!, Number(a[1])), '--frontend': () => serveParent(async (m) => frontendRun(m as unknown as Parameters<typeof frontendRun>[0])) }, driver);
