/**
 * Helpers of the scale benchmarks (bench/scale-vfio-user.ts,
 * bench/scale-vhost-user-blk.ts): child processes with an IPC channel
 * (optionally pinned), a request/response exchange over it, a process's
 * memory and CPU time from /proc, and percentiles of latency samples.
 */
import { fork, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';

/** Forks `file args...` with an IPC channel ('advanced' serialization: typed arrays pass as such), under `taskset -c cpus` when given. */
export function forkChild(file: string, args: string[], cpus: string | undefined, nodeFlags: string[] = []): ChildProcess {
  const execArgv = cpus !== undefined ? ['-c', cpus, process.execPath, ...nodeFlags] : nodeFlags;
  return fork(file, args, {
    serialization: 'advanced',
    stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
    execArgv,
    ...(cpus !== undefined ? { execPath: 'taskset' } : {}),
  });
}

/** Sends `msg` to the child and resolves with its next message (rejects if it exits first or sends {error}). */
export function ask<T>(child: ChildProcess, msg: unknown, timeoutMs = 300_000): Promise<T> {
  return new Promise((resolve, reject) => {
    const onMsg = (m: unknown): void => {
      cleanup();
      const e = (m as { error?: string } | null)?.error;
      if (e !== undefined) reject(new Error(e));
      else resolve(m as T);
    };
    const onExit = (code: number | null, sig: string | null): void => {
      cleanup();
      reject(new Error(`child ${child.pid} exited (${code ?? sig}) before answering ${JSON.stringify(msg).slice(0, 80)}`));
    };
    const timer = setTimeout(() => {
      cleanup();
      reject(new Error(`child ${child.pid} did not answer ${JSON.stringify(msg).slice(0, 80)} within ${timeoutMs} ms`));
    }, timeoutMs);
    const cleanup = (): void => {
      clearTimeout(timer);
      child.off('message', onMsg);
      child.off('exit', onExit);
    };
    child.on('message', onMsg);
    child.on('exit', onExit);
    child.send(msg as object);
  });
}

/** In a child: answers each message of the parent with `handler`'s result (or {error}). */
export function serveParent(handler: (msg: Record<string, unknown>) => Promise<unknown>): void {
  process.on('message', (m: Record<string, unknown>) => {
    handler(m).then(
      (r) => process.send!(r ?? {}),
      (err: unknown) => process.send!({ error: (err as Error).stack ?? String(err) }),
    );
  });
  process.on('disconnect', () => process.exit(0));
}

/** Stops a child (SIGTERM, SIGKILL after 3 s) and waits for it. */
export async function stopChild(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const gone = new Promise<void>((r) => child.once('exit', () => r()));
  child.kill('SIGTERM');
  const t = setTimeout(() => child.kill('SIGKILL'), 3000);
  await gone;
  clearTimeout(t);
}

export interface ProcMemory {
  /** kB, from /proc/PID/status. */
  vmRss: number;
  rssAnon: number;
  rssFile: number;
  rssShmem: number;
  /** kB from /proc/PID/smaps_rollup: proportional set size, and private (USS). */
  pss: number;
  priv: number;
  fds: number;
}

/** A process's memory (kB) and open fds, from /proc. */
export function procMemory(pid: number): ProcMemory {
  const st = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  const kb = (text: string, key: string): number => Number(new RegExp(`^${key}:\\s+(\\d+)`, 'm').exec(text)?.[1] ?? NaN);
  let pss = NaN;
  let priv = NaN;
  try {
    const r = fs.readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8');
    pss = kb(r, 'Pss');
    priv = kb(r, 'Private_Clean') + kb(r, 'Private_Dirty');
  } catch {
    // no smaps_rollup
  }
  return {
    vmRss: kb(st, 'VmRSS'),
    rssAnon: kb(st, 'RssAnon'),
    rssFile: kb(st, 'RssFile'),
    rssShmem: kb(st, 'RssShmem'),
    pss,
    priv,
    fds: fs.readdirSync(`/proc/${pid}/fd`).length,
  };
}

/** A process's CPU time, ms: the sum over its threads of /proc/PID/task/TID/schedstat's time on CPU (ns). */
export function procCpuMs(pid: number): number {
  let ns = 0;
  for (const t of fs.readdirSync(`/proc/${pid}/task`)) {
    try {
      ns += Number(fs.readFileSync(`/proc/${pid}/task/${t}/schedstat`, 'utf8').split(' ')[0]);
    } catch {
      // the thread ended
    }
  }
  return ns / 1e6;
}

/** Latency summary of samples (us): count and the p50 / p99 / p99.9 / max. */
export interface Lat {
  n: number;
  p50: number;
  p99: number;
  p999: number;
  max: number;
}

export function latencies(parts: readonly Float64Array[]): Lat {
  const all = new Float64Array(parts.reduce((a, p) => a + p.length, 0));
  parts.reduce((o, p) => (all.set(p, o), o + p.length), 0);
  all.sort();
  const n = all.length;
  const at = (q: number): number => (n === 0 ? NaN : all[Math.min(n - 1, Math.floor(q * n))]!);
  return { n, p50: at(0.5), p99: at(0.99), p999: at(0.999), max: n ? all[n - 1]! : NaN };
}

/** A growable list of samples. */
export class Samples {
  #a = new Float64Array(1 << 12);
  #n = 0;
  push(v: number): void {
    if (this.#n === this.#a.length) {
      const b = new Float64Array(this.#a.length * 2);
      b.set(this.#a);
      this.#a = b;
    }
    this.#a[this.#n++] = v;
  }
  get length(): number {
    return this.#n;
  }
  take(): Float64Array {
    return this.#a.slice(0, this.#n);
  }
}

export const f1 = (v: number): string => (Number.isFinite(v) ? v.toFixed(1) : '-');

/** The load averages, from /proc/loadavg. */
export function loadavg(): string {
  return fs.readFileSync('/proc/loadavg', 'utf8').trim();
}

/** Resolves at performance.now() == at (ms). */
export function sleepUntil(at: number): Promise<void> {
  return new Promise((r) => setTimeout(r, Math.max(0, at - performance.now())));
}

/**
 * The entry of a scale bench: an internal mode when argv[2] names one in
 * `modes` (given the rest of argv), else `driver`, whose run ends with the
 * error count and the load (exit code 1 when there were errors).
 */
export function benchMain(file: string, name: string, modes: Record<string, (args: string[]) => void>, driver: () => Promise<number>): void {
  if (process.argv[1] !== file) return;
  const mode = modes[process.argv[2] ?? ''];
  if (mode) {
    mode(process.argv.slice(3));
    return;
  }
  driver().then(
    (errors) => {
      process.stdout.write(`\nerrors: ${errors}; loadavg ${loadavg()}; ${new Date().toISOString()}\n`);
      if (errors > 0) process.exitCode = 1;
    },
    (err: unknown) => {
      process.stderr.write(`${name}: ${(err as Error).stack ?? String(err)}\n`);
      process.exit(1);
    },
  );
}
