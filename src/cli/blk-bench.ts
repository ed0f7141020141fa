/**
 * `vdevkit blk-bench --socket PATH`: a small fio-like job through
 * VirtioBlkDriver against any vhost-user-blk back-end: read, write,
 * randread or randwrite, a block size, a depth per queue, several queues, a
 * duration; IOPS, MB/s and latency percentiles, a progress line each second
 * and --json for machines. --verify (write jobs) reads every block written
 * back at the end and checks it.
 */
import { parseArgs } from 'node:util';
import { VirtioBlkDriver } from '../vhost-user/blk-driver.js';

export const BLK_BENCH_HELP = `Usage: vdevkit blk-bench --socket PATH [options]

Runs an I/O job through vdevkit's userspace virtio-blk driver against a
vhost-user-blk back-end (qemu-storage-daemon, vdevkit vhost-user-blk, SPDK...).

Options:
  -s, --socket PATH      the back-end's socket
      --rw MODE          read, write, randread or randwrite (default randread)
      --bs SIZE          block size, a multiple of 512 (default 4k; k, m suffixes)
      --depth N          requests in flight per queue (default 1)
      --queues N         queues (default 1)
      --time SECONDS     duration (default 5)
      --size SIZE        the range used from offset 0 (default: the whole disk)
      --verify           write jobs: read every block written back and check it
      --packed           packed rings (the back-end must offer RING_PACKED)
      --json             one JSON object with the results
      --quiet            no progress line
  -h, --help
`;

const MODES = ['read', 'write', 'randread', 'randwrite'] as const;
type Mode = (typeof MODES)[number];

/** "4k", "1m", "512", "1g" -> bytes. */
export function parseBytes(s: string): number {
  const m = /^(\d+)\s*([kmg]?)i?b?$/i.exec(s.trim());
  if (!m) throw new Error(`bad size '${s}'`);
  const shift = { '': 0, k: 10, m: 20, g: 30 }[m[2]!.toLowerCase() as '' | 'k' | 'm' | 'g'];
  return Number(m[1]) * 2 ** shift;
}

export interface BenchOptions {
  socket: string;
  rw: Mode;
  bs: number;
  depth: number;
  queues: number;
  seconds: number;
  size?: number;
  verify?: boolean;
  packed?: boolean;
  /** Called about once a second with the running totals. */
  progress?: (elapsedS: number, ios: number, bytes: number) => void;
}

export interface BenchResult {
  rw: Mode;
  bs: number;
  depth: number;
  queues: number;
  packed: boolean;
  seconds: number;
  ios: number;
  iops: number;
  mbps: number;
  /** Microseconds. */
  latency: { min: number; mean: number; p50: number; p90: number; p99: number; p999: number; max: number };
  errors: number;
  verified: number | null;
  verifyFailures: number | null;
}

/** A block's content for verify: its offset and the generation that wrote it, repeated. */
function stamp(buf: Buffer, offset: number, gen: number): void {
  for (let i = 0; i < buf.length; i += 16) {
    buf.writeDoubleLE(offset, i);
    buf.writeDoubleLE(gen + i, i + 8);
  }
}

function percentile(sorted: Float64Array, p: number): number {
  if (sorted.length === 0) return 0;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!;
}

/** Runs one job. */
export async function runBench(o: BenchOptions): Promise<BenchResult> {
  const d = await VirtioBlkDriver.connect(o.socket, { queues: o.queues, packed: o.packed === true, queueSize: Math.max(16, 2 ** Math.ceil(Math.log2(Math.max(o.depth, 1)))), dmaBytes: Math.max(16 << 20, o.bs * o.depth * o.queues * 2) });
  try {
    const span = Math.min(o.size ?? d.size, d.size);
    const blocks = Math.floor(span / o.bs);
    if (blocks < 1) throw new Error(`the ${span}-byte range holds no ${o.bs}-byte block`);
    if (o.bs % 512 !== 0) throw new Error('--bs must be a multiple of 512');
    if ((o.rw === 'write' || o.rw === 'randwrite') && d.readOnly) throw new Error('the disk is read-only');
    const write = o.rw === 'write' || o.rw === 'randwrite';
    const random = o.rw === 'randread' || o.rw === 'randwrite';
    let lat = new Float64Array(1 << 16);
    let nLat = 0;
    let ios = 0;
    let errors = 0;
    let seqNext = 0;
    let generation = 0;
    const written = o.verify && write ? new Map<number, number>() : null;
    const busy = written ? new Set<number>() : null;
    const start = process.hrtime.bigint();
    const endAt = start + BigInt(Math.round(o.seconds * 1e9));
    let lastProgress = start;
    const worker = async (q: number): Promise<void> => {
      const buf = Buffer.alloc(o.bs, 0xa5);
      for (;;) {
        const t0 = process.hrtime.bigint();
        if (t0 >= endAt) return;
        let block = random ? Math.floor(Math.random() * blocks) : seqNext++ % blocks;
        // Verify: never two writes of one block in flight (their completion order is the device's).
        while (busy && busy.has(block) && busy.size < blocks) block = (block + 1) % blocks;
        if (busy?.has(block)) continue;
        busy?.add(block);
        const off = block * o.bs;
        try {
          if (write) {
            if (written) {
              const gen = ++generation;
              stamp(buf, off, gen);
              written.set(off, gen);
            }
            await d.write(off, buf, { queue: q });
          } else await d.read(off, o.bs, { queue: q });
        } catch (err) {
          errors++;
          if (d.frontend.closed) throw err;
          continue;
        } finally {
          busy?.delete(block);
        }
        const t1 = process.hrtime.bigint();
        if (nLat === lat.length) {
          const bigger = new Float64Array(lat.length * 2);
          bigger.set(lat);
          lat = bigger;
        }
        lat[nLat++] = Number(t1 - t0) / 1000;
        ios++;
        if (o.progress && t1 - lastProgress >= 1_000_000_000n) {
          lastProgress = t1;
          o.progress(Number(t1 - start) / 1e9, ios, ios * o.bs);
        }
      }
    };
    const workers: Promise<void>[] = [];
    for (let q = 0; q < d.numQueues; q++) for (let k = 0; k < o.depth; k++) workers.push(worker(q));
    await Promise.all(workers);
    const elapsed = Number(process.hrtime.bigint() - start) / 1e9;
    let verified: number | null = null;
    let verifyFailures: number | null = null;
    if (written) {
      verified = 0;
      verifyFailures = 0;
      const want = Buffer.alloc(o.bs);
      const entries = [...written];
      for (let i = 0; i < entries.length; i += 64) {
        const batch = entries.slice(i, i + 64);
        const got = await Promise.all(batch.map(([off]) => d.read(off, o.bs)));
        batch.forEach(([off, gen], k) => {
          stamp(want, off, gen);
          if (got[k]!.equals(want)) verified!++;
          else verifyFailures!++;
        });
      }
    }
    const sorted = lat.slice(0, nLat).sort();
    let sum = 0;
    for (const v of sorted) sum += v;
    const r = (v: number): number => Math.round(v * 10) / 10;
    return {
      rw: o.rw,
      bs: o.bs,
      depth: o.depth,
      queues: d.numQueues,
      packed: d.packed,
      seconds: r(elapsed),
      ios,
      iops: Math.round(ios / elapsed),
      mbps: r((ios * o.bs) / elapsed / 1e6),
      latency: { min: r(sorted[0] ?? 0), mean: r(nLat ? sum / nLat : 0), p50: r(percentile(sorted, 50)), p90: r(percentile(sorted, 90)), p99: r(percentile(sorted, 99)), p999: r(percentile(sorted, 99.9)), max: r(sorted[nLat - 1] ?? 0) },
      errors,
      verified,
      verifyFailures,
    };
  } finally {
    await d.close();
  }
}

export async function blkBenchCommand(argv: string[]): Promise<number> {
  let values: Record<string, string | boolean | undefined>;
  try {
    ({ values } = parseArgs({
      args: argv,
      options: {
        socket: { type: 'string', short: 's' },
        rw: { type: 'string' },
        bs: { type: 'string' },
        depth: { type: 'string' },
        queues: { type: 'string' },
        time: { type: 'string' },
        size: { type: 'string' },
        verify: { type: 'boolean' },
        packed: { type: 'boolean' },
        json: { type: 'boolean' },
        quiet: { type: 'boolean' },
        help: { type: 'boolean', short: 'h' },
      },
    }));
  } catch (err) {
    process.stderr.write(`vdevkit blk-bench: ${(err as Error).message}\n\n${BLK_BENCH_HELP}`);
    return 2;
  }
  if (values.help) {
    process.stdout.write(BLK_BENCH_HELP);
    return 0;
  }
  const fail = (msg: string): number => {
    process.stderr.write(`vdevkit blk-bench: ${msg}\n\n${BLK_BENCH_HELP}`);
    return 2;
  };
  if (typeof values.socket !== 'string') return fail('--socket PATH is required');
  const rw = (values.rw ?? 'randread') as Mode;
  if (!MODES.includes(rw)) return fail(`--rw must be one of ${MODES.join(', ')}`);
  let bs: number;
  let size: number | undefined;
  try {
    bs = parseBytes(typeof values.bs === 'string' ? values.bs : '4k');
    size = typeof values.size === 'string' ? parseBytes(values.size) : undefined;
  } catch (err) {
    return fail((err as Error).message);
  }
  if (bs < 512 || bs % 512 !== 0 || bs > 1 << 20) return fail('--bs must be a multiple of 512, at most 1m');
  const int = (v: string | boolean | undefined, dflt: number): number => (typeof v === 'string' ? Number(v) : dflt);
  const depth = int(values.depth, 1);
  const queues = int(values.queues, 1);
  const seconds = int(values.time, 5);
  if (!Number.isInteger(depth) || depth < 1 || depth > 1024) return fail('--depth must be 1..1024');
  if (!Number.isInteger(queues) || queues < 1 || queues > 64) return fail('--queues must be 1..64');
  if (!Number.isFinite(seconds) || seconds <= 0) return fail('--time must be a positive number of seconds');
  const json = values.json === true;
  const showProgress = !json && values.quiet !== true;
  let result: BenchResult;
  try {
    result = await runBench({
      socket: values.socket,
      rw,
      bs,
      depth,
      queues,
      seconds,
      ...(size !== undefined ? { size } : {}),
      verify: values.verify === true,
      packed: values.packed === true,
      ...(showProgress
        ? { progress: (t: number, ios: number, bytes: number) => void process.stderr.write(`\r[${t.toFixed(0).padStart(3)}s] ${Math.round(ios / t)} IOPS, ${(bytes / t / 1e6).toFixed(1)} MB/s   `) }
        : {}),
    });
  } catch (err) {
    if (showProgress) process.stderr.write('\n');
    process.stderr.write(`vdevkit blk-bench: ${(err as Error).message}\n`);
    return 1;
  }
  if (showProgress) process.stderr.write('\n');
  if (json) process.stdout.write(`${JSON.stringify(result)}\n`);
  else {
    const l = result.latency;
    process.stdout.write(
      `${result.rw} bs=${result.bs} depth=${result.depth} queues=${result.queues}${result.packed ? ' packed' : ''}: ${result.ios} I/Os in ${result.seconds} s\n` +
        `  ${result.iops} IOPS, ${result.mbps} MB/s, ${result.errors} errors\n` +
        `  latency (us): min ${l.min} mean ${l.mean} p50 ${l.p50} p90 ${l.p90} p99 ${l.p99} p99.9 ${l.p999} max ${l.max}\n` +
        (result.verified !== null ? `  verify: ${result.verified} blocks OK, ${result.verifyFailures} bad\n` : ''),
    );
  }
  return result.errors > 0 || (result.verifyFailures ?? 0) > 0 ? 1 : 0;
}
