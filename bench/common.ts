/**
 * Helpers shared by the benchmarks in bench/: locating the repository,
 * compiling the C references, running a contender in its own process
 * (optionally pinned with taskset) and reading its RESULT line, medians and
 * a plain-text table.
 *
 * A contender prints exactly one line `RESULT {json}` on stdout; anything
 * else it prints is passed through to the driver's stderr.
 */
import { spawn, execFileSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

/** The repository root (bench/common.ts and dist/bench/common.js both resolve to it). */
export function repoRoot(): string {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 4; i++) {
    if (fs.existsSync(path.join(dir, 'package.json'))) return dir;
    dir = path.dirname(dir);
  }
  throw new Error('bench: cannot find the repository root (package.json)');
}

/**
 * Compiles bench/ref/NAME.c with `cc -O2` into bench/ref/bin/NAME (skipped
 * when the binary is newer than the source). Returns the binary's path.
 */
export function compileReference(name: string, extraFlags: string[] = []): string {
  const root = repoRoot();
  const src = path.join(root, 'bench', 'ref', `${name}.c`);
  const binDir = path.join(root, 'bench', 'ref', 'bin');
  const bin = path.join(binDir, name);
  fs.mkdirSync(binDir, { recursive: true });
  const fresh = fs.existsSync(bin) && fs.statSync(bin).mtimeMs >= fs.statSync(src).mtimeMs;
  if (!fresh) {
    const cc = process.env['CC'] ?? 'cc';
    execFileSync(cc, ['-O2', '-Wall', '-Wextra', '-o', bin, src, ...extraFlags], { stdio: 'inherit' });
  }
  return bin;
}

/** What one contender run reported on its RESULT line. */
export interface RunResult {
  impl: string;
  iters: number;
  ns: number;
  us_per_rt: number;
  rt_per_s: number;
  [key: string]: unknown;
}

export interface RunOptions {
  /** CPU list for taskset -c (e.g. "0"); undefined runs without taskset. */
  cpus?: string | undefined;
  /** Kill the run after this long (default 120 s). */
  timeoutMs?: number;
}

/**
 * Runs `file args...` (under `taskset -c CPUS` when asked), waits for it to
 * exit 0 and returns the parsed RESULT line. Rejects on a non-zero exit, a
 * timeout or a missing RESULT line.
 */
export function runContender(file: string, args: string[], options: RunOptions = {}): Promise<RunResult> {
  const [cmd, argv] = options.cpus !== undefined ? ['taskset', ['-c', options.cpus, file, ...args]] : [file, args];
  const shown = [cmd, ...argv].join(' ');
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, argv, { stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    child.stdout.setEncoding('utf8');
    child.stdout.on('data', (s: string) => (out += s));
    const timer = setTimeout(() => child.kill('SIGKILL'), options.timeoutMs ?? 120_000);
    child.on('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      if (code !== 0) {
        reject(new Error(`${shown} failed (exit ${code}${signal ? `, signal ${signal}` : ''})\n${out}`));
        return;
      }
      let result: RunResult | undefined;
      for (const line of out.split('\n')) {
        if (line.startsWith('RESULT ')) result = JSON.parse(line.slice(7)) as RunResult;
        else if (line.trim() !== '') process.stderr.write(`  [${path.basename(file)}] ${line}\n`);
      }
      if (!result) reject(new Error(`${shown} printed no RESULT line\n${out}`));
      else resolve(result);
    });
  });
}

/** Prints the RESULT line of a contender (used by the contenders themselves). */
export function printResult(impl: string, iters: number, ns: bigint, extra: Record<string, unknown> = {}): void {
  const n = Number(ns);
  const result = {
    impl,
    iters,
    ...extra,
    ns: n,
    us_per_rt: Number((n / iters / 1e3).toFixed(3)),
    rt_per_s: Math.round(iters / (n / 1e9)),
  };
  process.stdout.write(`RESULT ${JSON.stringify(result)}\n`);
}

export function median(values: readonly number[]): number {
  if (values.length === 0) return NaN;
  const s = [...values].sort((a, b) => a - b);
  const mid = s.length >> 1;
  return s.length % 2 === 1 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
}

/** The output of `uptime` (falls back to os.loadavg()). */
export function uptime(): string {
  try {
    return execFileSync('uptime', { encoding: 'utf8' }).trim();
  } catch {
    return `load average: ${os
      .loadavg()
      .map((l) => l.toFixed(2))
      .join(', ')}`;
  }
}

/** The CPUs this process may run on (from /proc/self/status), e.g. "0-1". */
export function allowedCpus(): string {
  try {
    const m = /^Cpus_allowed_list:\s*(\S+)/m.exec(fs.readFileSync('/proc/self/status', 'utf8'));
    if (m) return m[1]!;
  } catch {
    // not Linux /proc
  }
  return `0-${os.cpus().length - 1}`;
}

/** A plain-text table with right-aligned columns (the first left-aligned). */
export function formatTable(header: readonly string[], rows: readonly (readonly string[])[]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const fmt = (cells: readonly string[]): string =>
    cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join('  ');
  return [fmt(header), widths.map((w) => '-'.repeat(w)).join('  '), ...rows.map(fmt)].join('\n');
}
