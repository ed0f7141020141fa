/**
 * bench/vfio-user-rtt: the REGION_READ round trip of our vfio-user server
 * against libvfio-user's, both driven by the same C client of ours
 * (bench/ref/rtt.c, compiled at bench time):
 *
 *   ours  our gpio device (src/devices/gpio.ts) served by VfioUserServer in a
 *         Node process of its own (this file's --server mode);
 *   C     libvfio-user's samples/gpio-pci-idio-16 (the same 16-pin card),
 *         from the peer build (scripts/build-peers.sh, or VDEVKIT_LIBVFIO_USER_GPIO).
 *
 * The client negotiates VERSION, then reads 1 byte of BAR2 (region 2, an I/O
 * BAR served by a callback) at offset 1, one request at a time, each reply
 * checked (id, command, flags, size, the echoed access, the same data byte
 * every time); WARMUP reads untimed, then ITERS in batches of BATCH, each
 * batch timed. A contender's figure is the median of its per-batch means.
 *
 *   node dist/bench/vfio-user-rtt.js [--rounds 5] [--iters 20000] [--warmup 5000]
 *        [--batch 1000] [--setups pinned,unpinned] [--only ours,c]
 *
 * Per setup both servers are started (and at the end stopped, by pid), then
 * the client runs against them alternately, ours then C in odd rounds, C then
 * ours in even ones, each run a fresh client process. "pinned": both servers
 * and every client under `taskset -c 0` (the headline: one CPU, as
 * shared/docs/benchmarking.md asks for latency); "unpinned": everything free
 * on all CPUs. Reports medians, the ratio ours/C of the medians and the
 * median of the per-round ratios ("paired"), and the load.
 *
 * For profiling our server: VDEVKIT_BENCH_SERVER_NODE_FLAGS="--cpu-prof --cpu-prof-dir=DIR"
 * is passed to its node. Internal mode: --server PATH (prints READY; serves until killed).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { gpioDevice } from '../src/devices/gpio.js';
import { VfioUserServer } from '../src/vfio-user/server.js';
import { allowedCpus, compileReference, formatTable, median, runContender, uptime, type RunResult } from './common.js';

const THIS_FILE = fileURLToPath(import.meta.url);
const DEFAULT_GPIO = '/root/.cache/vdevkit-peers/libvfio-user-7e7a0a6c/libvfio-user/build/samples/gpio-pci-idio-16';

type Contender = 'ours' | 'c';
const LABEL: Record<Contender, string> = { ours: 'ours', c: 'libvfio-user' };

/* ------------------------------------------------------------------ */
/* Our server process (--server)                                       */

function runServer(sockPath: string): void {
  const server = VfioUserServer.listen(sockPath, { device: gpioDevice() });
  const stop = (): void => {
    server.close();
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  process.stdout.write('READY\n');
}

/* ------------------------------------------------------------------ */
/* The driver                                                          */

interface Options {
  rounds: number;
  iters: number;
  warmup: number;
  batch: number;
  setups: string[];
  only: Contender[];
}

function parseOptions(argv: string[]): Options {
  const o: Options = { rounds: 5, iters: 20000, warmup: 5000, batch: 1000, setups: ['pinned', 'unpinned'], only: ['ours', 'c'] };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    const v = argv[i + 1];
    const num = (): number => {
      const n = Number(v);
      if (!Number.isInteger(n) || n < 0) throw new Error(`${a} needs a whole number`);
      i++;
      return n;
    };
    if (a === '--rounds') o.rounds = Math.max(1, num());
    else if (a === '--iters') o.iters = Math.max(1, num());
    else if (a === '--warmup') o.warmup = num();
    else if (a === '--batch') o.batch = Math.max(1, num());
    else if (a === '--setups' && v) {
      o.setups = v.split(',');
      i++;
    } else if (a === '--only' && v) {
      o.only = v.split(',') as Contender[];
      i++;
    } else throw new Error(`unknown argument ${a}`);
  }
  for (const s of o.setups) if (s !== 'pinned' && s !== 'unpinned') throw new Error(`unknown setup ${s}`);
  for (const c of o.only) if (c !== 'ours' && c !== 'c') throw new Error(`unknown contender ${c}`);
  return o;
}

function serverNodeFlags(): string[] {
  const s = process.env['VDEVKIT_BENCH_SERVER_NODE_FLAGS'];
  return s ? s.split(/\s+/).filter((x) => x !== '') : [];
}

/** Spawns a server (under taskset when `cpus` is given); resolves once it listens on `sockPath`. */
async function startServer(which: Contender, sockPath: string, cpus: string | undefined, gpioBin: string): Promise<ChildProcess> {
  const argv = which === 'ours' ? [process.execPath, ...serverNodeFlags(), THIS_FILE, '--server', sockPath] : [gpioBin, sockPath];
  const [cmd, args] = cpus !== undefined ? ['taskset', ['-c', cpus, ...argv]] : [argv[0]!, argv.slice(1)];
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'inherit'] });
  child.stdout!.setEncoding('utf8');
  child.stdout!.on('data', (s: string) => {
    for (const l of s.split('\n')) if (l !== '' && l !== 'READY') process.stderr.write(`  [${which} server] ${l}\n`);
  });
  const deadline = Date.now() + 10_000;
  // Both make the socket file when they listen (ours before READY, libvfio-user in vfu_create_ctx).
  while (!fs.existsSync(sockPath)) {
    if (child.exitCode !== null) throw new Error(`the ${LABEL[which]} server exited (${child.exitCode}) before listening`);
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(`the ${LABEL[which]} server did not listen on ${sockPath} within 10 s`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  return child;
}

async function stopServer(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  child.kill('SIGTERM');
  const t = setTimeout(() => child.kill('SIGKILL'), 3000);
  await exited;
  clearTimeout(t);
}

async function driver(argv: string[]): Promise<void> {
  const o = parseOptions(argv);
  const gpioBin = process.env['VDEVKIT_LIBVFIO_USER_GPIO'] ?? DEFAULT_GPIO;
  if (o.only.includes('c') && !fs.existsSync(gpioBin)) {
    throw new Error(`libvfio-user's gpio-pci-idio-16 is not built (${gpioBin}): run scripts/build-peers.sh, or set VDEVKIT_LIBVFIO_USER_GPIO`);
  }
  const client = compileReference('rtt');
  const all = allowedCpus();
  process.stderr.write(
    `vfio-user-rtt: ${o.rounds} rounds, ${o.iters} reads (batches of ${o.batch}) after ${o.warmup} warm-up, ` +
      `1-byte REGION_READ of BAR2 offset 1; CPUs ${all}; ${uptime()}; ${new Date().toISOString()}\n`,
  );
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdevkit-rtt-'));
  const lines: string[] = [];
  try {
    for (const setup of o.setups) {
      const cpus = setup === 'pinned' ? '0' : undefined;
      const servers = new Map<Contender, { child: ChildProcess; sock: string }>();
      try {
        for (const c of o.only) {
          const sock = path.join(dir, `${c}-${setup}.sock`);
          servers.set(c, { child: await startServer(c, sock, cpus, gpioBin), sock });
        }
        const results: Record<Contender, RunResult[]> = { ours: [], c: [] };
        for (let r = 0; r < o.rounds; r++) {
          const order = r % 2 === 0 ? o.only : [...o.only].reverse();
          for (const c of order) {
            const s = servers.get(c)!;
            const res = await runContender(client, [s.sock, String(o.iters), String(o.warmup), String(o.batch), c], { cpus });
            results[c].push(res);
            process.stderr.write(
              `  ${setup} round ${r + 1}: ${LABEL[c].padEnd(12)} ${Number(res['median_batch_us']).toFixed(2)} us ` +
                `(mean ${res.us_per_rt.toFixed(2)}, batches ${Number(res['min_batch_us']).toFixed(2)}-${Number(res['max_batch_us']).toFixed(2)})\n`,
            );
          }
        }
        const med = (c: Contender): number => median(results[c].map((x) => Number(x['median_batch_us'])));
        const rows = o.only.map((c) => [LABEL[c], med(c).toFixed(2), median(results[c].map((x) => x.us_per_rt)).toFixed(2), String(results[c].length)]);
        lines.push(`\n${setup} (${cpus !== undefined ? `taskset -c ${cpus}` : `CPUs ${all}`}):`);
        lines.push(formatTable(['server', 'median us/read', 'mean us/read', 'runs'], rows));
        if (o.only.length === 2) {
          const paired = median(results.ours.map((x, i) => Number(x['median_batch_us']) / Number(results.c[i]!['median_batch_us'])));
          lines.push(`ours / libvfio-user: ${(med('ours') / med('c')).toFixed(2)}x (paired ${paired.toFixed(2)}x)`);
        }
      } finally {
        for (const s of servers.values()) await stopServer(s.child);
      }
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  process.stdout.write(`${lines.join('\n')}\n\n${uptime()}; ${new Date().toISOString()}\n`);
}

if (process.argv[1] === THIS_FILE) {
  const [mode, ...rest] = process.argv.slice(2);
  if (mode === '--server') runServer(rest[0]!);
  else
    driver(process.argv.slice(2)).catch((err: unknown) => {
      process.stderr.write(`vfio-user-rtt: ${(err as Error).stack ?? String(err)}\n`);
      process.exit(1);
    });
}
