/**
 * The fuzz harness: runs a target's endpoint in this process against the
 * mutated peer, one input per connection, and checks the invariants after
 * each input (no exception escaped a handler, the endpoint answered, closed
 * or legitimately waits, no hang) and after each batch (no fd leaked, heap
 * bounded, a new connection still gets a valid round trip). A finding is
 * saved with its seed and inputs as a reproducer file.
 */
import fs from 'node:fs';
import path from 'node:path';
import { EventFd, Fd as FdClass, SharedMemory, socketPairFds, type UnixSocket } from '../sys/index.js';
import { Rng } from './rng.js';
import { concat, inputFromJson, inputToJson, type FdKind, type FuzzInput } from './mutator.js';

/** An invariant the endpoint broke. */
export class Finding extends Error {
  constructor(
    readonly kind: 'exception' | 'hang' | 'leak' | 'memory' | 'invariant',
    message: string,
  ) {
    super(`${kind}: ${message}`);
  }
}

/** One fd of each kind, held for the whole run; messages carry (copies of) these. */
export class FdPool {
  readonly mem = SharedMemory.create(1 << 20);
  readonly ev = EventFd.create();
  readonly #pair = socketPairFds();
  readonly #null = new FdClass(fs.openSync('/dev/null', 'r+'));
  readonly #dir = new FdClass(fs.openSync('/', 'r'));

  fd(kind: FdKind): number {
    switch (kind) {
      case 'memfd':
        return this.mem.fd.value;
      case 'eventfd':
        return this.ev.fd.value;
      case 'socket':
        return this.#pair[0].value;
      case 'devnull':
        return this.#null.value;
      case 'dir':
        return this.#dir.value;
    }
  }

  close(): void {
    this.mem.close();
    this.ev.close();
    this.#pair[0].close();
    this.#pair[1].close();
    this.#null.close();
    this.#dir.close();
  }
}

/** Where the fds of a message come from: the run's FdPool, or a target's own (per-connection memory, sockets). */
export interface FdSource {
  fd(kind: FdKind): number;
}

/**
 * Writes the input's messages on `sock`, cut at `input.cuts` into separate
 * writes; each message's fds go with the write holding its first byte.
 */
export async function writeInput(sock: UnixSocket, input: FuzzInput, pool: FdSource, msgs = input.msgs): Promise<void> {
  const stream = concat(msgs.map((m) => m.bytes));
  const starts: { at: number; fds: FdKind[] }[] = [];
  let at = 0;
  for (const m of msgs) {
    if (m.fds.length) starts.push({ at: Math.min(at, Math.max(0, stream.length - 1)), fds: m.fds });
    at += m.bytes.length;
  }
  const bounds = [...new Set([0, ...input.cuts.filter((c) => c > 0 && c < stream.length), stream.length])].sort((a, b) => a - b);
  for (let i = 0; i + 1 < bounds.length || (i === 0 && stream.length === 0); i++) {
    const lo = bounds[i]!;
    const hi = bounds[i + 1] ?? 0;
    const fds: number[] = [];
    for (const s of starts) if (s.at >= lo && (s.at < hi || (hi === lo && s.at === lo))) for (const k of s.fds) fds.push(pool.fd(k));
    if (sock.closed) return;
    if (hi > lo) sock.write(stream.subarray(lo, hi), fds.length ? fds.slice(0, 253) : null);
    if (i + 2 < bounds.length) await new Promise((r) => setImmediate(r));
    if (stream.length === 0) break;
  }
}

/** A running endpoint under test. */
export interface Instance {
  /** Runs one input on a new connection; throws Finding when an invariant breaks. */
  run(input: FuzzInput): Promise<void>;
  /** A valid round trip on a new connection (other connections still work). */
  probe(): Promise<void>;
  close(): Promise<void>;
}

export interface FuzzTarget {
  name: string;
  generate(rng: Rng): FuzzInput;
  start(pool: FdPool): Promise<Instance>;
  /**
   * Inputs run at once, each on its own connection (default 1). For targets whose inputs mostly
   * wait (reply timeouts, closes): the run's CPU, not the waits, sets its rate. The instance's
   * run() must then not assume it is alone (per-batch checks, such as sessions drained, go in
   * probe(), which runs with nothing else in flight).
   */
  concurrency?: number;
}

export function openFdCount(): number {
  return fs.readdirSync('/proc/self/fd').length;
}

/** What each open fd is (readlink of /proc/self/fd/N), for a leak's report. */
export function openFdNames(): Map<number, string> {
  const m = new Map<number, string>();
  for (const n of fs.readdirSync('/proc/self/fd')) {
    try {
      m.set(Number(n), fs.readlinkSync(`/proc/self/fd/${n}`));
    } catch {
      // closed meanwhile (the directory's own fd)
    }
  }
  return m;
}

function leakDetail(before: Map<number, string>): string {
  const extra = [...openFdNames()].filter(([n, what]) => before.get(n) !== what).map(([n, what]) => `${n} -> ${what}`);
  return extra.length ? `; new: ${extra.slice(0, 8).join(', ')}` : '';
}

export const tick = (ms = 0): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Rejects with a hang Finding after `ms`. */
export function deadline<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let t: NodeJS.Timeout;
  return Promise.race([
    p.finally(() => clearTimeout(t)),
    new Promise<never>((_, reject) => {
      t = setTimeout(() => reject(new Finding('hang', `${what}: nothing within ${ms} ms`)), ms);
    }),
  ]);
}

async function fdsBackTo(n: number, ms: number): Promise<number> {
  const t0 = Date.now();
  for (;;) {
    const c = openFdCount();
    if (c <= n || Date.now() - t0 > ms) return c;
    await tick(5);
  }
}

export interface RunOptions {
  seconds: number;
  seed: number;
  /** Stop after this many inputs (default: no limit). */
  maxInputs?: number;
  /**
   * Index of the first input (default 0). Input i of a seed is the same whatever run makes it, so a
   * long run of seed S is resumed, or split across processes, by giving each part its own range.
   */
  from?: number;
  /** Where reproducers go (default: test/fixtures/fuzz/<target>/); null: not saved. */
  saveDir?: string | null;
  /** Inputs per batch (fd and probe checks between batches). */
  batch?: number;
  log?: (line: string) => void;
  /** Stop at the first finding. */
  stopOnFinding?: boolean;
  /** Stop when aborted (the CLI's SIGINT / SIGTERM): the inputs begun are finished and checked, the report is exact. */
  signal?: AbortSignal;
}

export interface RunReport {
  target: string;
  seed: number;
  /** Index of the first input run. */
  from: number;
  inputs: number;
  seconds: number;
  perSecond: number;
  findings: { kind: string; message: string; file: string | null }[];
}

/** Catches what escapes handlers while a run is on. */
class Escapes {
  readonly errors: unknown[] = [];
  readonly #onErr = (e: unknown): void => void this.errors.push(e);
  install(): void {
    process.on('uncaughtException', this.#onErr);
    process.on('unhandledRejection', this.#onErr);
  }
  remove(): void {
    process.off('uncaughtException', this.#onErr);
    process.off('unhandledRejection', this.#onErr);
  }
  take(): unknown[] {
    return this.errors.splice(0);
  }
}

const MAX_HEAP = 768 << 20;

async function baseline(inst: Instance): Promise<number> {
  await inst.probe();
  await tick(20);
  return openFdCount();
}

function describe(e: unknown): string {
  return e instanceof Error ? (e.stack ?? e.message) : String(e);
}

/** Runs `target` for `seconds` (or `maxInputs`), restarting the endpoint after each finding. */
export async function runTarget(target: FuzzTarget, o: RunOptions): Promise<RunReport> {
  const from = o.from ?? 0;
  if (!Number.isSafeInteger(from) || from < 0) throw new RangeError(`from must be a non-negative integer, not ${from}`);
  const log = o.log ?? (() => {});
  const batch = o.batch ?? 50;
  const escapes = new Escapes();
  escapes.install();
  const pool = new FdPool();
  const findings: RunReport['findings'] = [];
  const t0 = performance.now();
  const end = t0 + o.seconds * 1000;
  let inputs = 0;
  // The first write to a piped stdout makes libuv open its one reserve fd (/dev/null, for EMFILE):
  // log before the fd baseline is taken, or that fd counts as the first batch's leak.
  log(`${target.name}: seed 0x${o.seed.toString(16)}, from input ${from}, concurrency ${target.concurrency ?? 1}`);
  let inst = await target.start(pool);
  let base = await baseline(inst);
  let baseNames = openFdNames();
  let pending: { index: number; input: FuzzInput }[] = [];
  let lastReport = t0;
  const found = async (f: Finding | Error, batchInputs: { index: number; input: FuzzInput }[]): Promise<void> => {
    const kind = f instanceof Finding ? f.kind : 'exception';
    let file: string | null = null;
    if (o.saveDir !== null) file = saveReproducer(o.saveDir ?? path.join('test', 'fixtures', 'fuzz', target.name), target.name, o.seed, batchInputs, describe(f));
    findings.push({ kind, message: f.message, file });
    log(`FINDING ${kind} at input ${batchInputs[batchInputs.length - 1]?.index}: ${f.message}${file ? ` (saved ${file})` : ''}`);
    await inst.close().catch(() => {});
    escapes.take();
    inst = await target.start(pool);
    base = await baseline(inst);
    baseNames = openFdNames();
    pending = [];
  };
  /** The per-batch checks over the inputs since the last ones: a probe on a new connection, fds, heap, escapes. */
  const checkBatch = async (): Promise<void> => {
    const inBatch = pending;
    pending = [];
    try {
      await deadline(inst.probe(), 10_000, 'probe on a new connection');
      const now = await fdsBackTo(base, 2000);
      if (now > base) throw new Finding('leak', `${now - base} fds more than at the start of the batch (${now} open, ${base} expected)${leakDetail(baseNames)}`);
      const heap = process.memoryUsage().heapUsed;
      if (heap > MAX_HEAP) throw new Finding('memory', `heap at ${heap >> 20} MiB`);
      const esc = escapes.take();
      if (esc.length) throw new Finding('exception', `escaped a handler: ${describe(esc[0])}`);
    } catch (e) {
      await found(e as Error, inBatch);
    }
  };
  try {
    while (performance.now() < end && (o.maxInputs === undefined || inputs < o.maxInputs) && !o.signal?.aborted) {
      if (o.stopOnFinding && findings.length) break;
      if (findings.length >= 20) break;
      const group: { index: number; input: FuzzInput }[] = [];
      const k = Math.max(1, Math.min(target.concurrency ?? 1, o.maxInputs === undefined ? Infinity : o.maxInputs - inputs));
      for (let j = 0; j < k; j++) {
        const index = from + inputs++;
        group.push({ index, input: target.generate(Rng.forInput(o.seed, index)) });
      }
      pending.push(...group);
      try {
        const settled = await Promise.allSettled(group.map((g) => deadline(inst.run(g.input), 10_000, 'input')));
        const failed = settled.find((r): r is PromiseRejectedResult => r.status === 'rejected');
        if (failed) throw failed.reason;
        const esc = escapes.take();
        if (esc.length) throw new Finding('exception', `escaped a handler: ${describe(esc[0])}`);
      } catch (e) {
        await found(e as Error, group);
        continue;
      }
      if (pending.length >= batch) await checkBatch();
      if (performance.now() - lastReport > 10_000) {
        lastReport = performance.now();
        const s = (lastReport - t0) / 1000;
        log(`${target.name}: ${inputs} inputs in ${s.toFixed(0)} s (${Math.round(inputs / s)}/s, next index ${from + inputs}), ${findings.length} findings`);
      }
    }
    // The last inputs get their batch checks too: every input counted in the report was checked whole.
    if (pending.length > 0 && !(o.stopOnFinding && findings.length)) await checkBatch();
  } finally {
    await inst.close().catch(() => {});
    pool.close();
    await tick(10);
    escapes.remove();
  }
  const seconds = (performance.now() - t0) / 1000;
  return { target: target.name, seed: o.seed, from, inputs, seconds, perSecond: inputs / seconds, findings };
}

export interface Reproducer {
  target: string;
  seed: number;
  /** Input indexes of the run (each input is Rng.forInput(seed, index)). */
  indexes: number[];
  inputs: unknown[];
  finding: string;
}

function saveReproducer(dir: string, target: string, seed: number, batch: { index: number; input: FuzzInput }[], finding: string): string {
  fs.mkdirSync(dir, { recursive: true });
  const first = batch[0]?.index ?? 0;
  const file = path.join(dir, `seed-${seed.toString(16)}-${first}.json`);
  const r: Reproducer = { target, seed, indexes: batch.map((b) => b.index), inputs: batch.map((b) => inputToJson(b.input)), finding };
  fs.writeFileSync(file, `${JSON.stringify(r, null, 1)}\n`);
  return file;
}

/** Replays a reproducer's inputs on a fresh endpoint; throws the Finding if it still breaks. */
export async function replay(target: FuzzTarget, r: Reproducer): Promise<void> {
  const escapes = new Escapes();
  escapes.install();
  const pool = new FdPool();
  const inst = await target.start(pool);
  try {
    const base = await baseline(inst);
    for (const j of r.inputs) {
      await deadline(inst.run(inputFromJson(j)), 10_000, 'input');
      const esc = escapes.take();
      if (esc.length) throw new Finding('exception', `escaped a handler: ${describe(esc[0])}`);
    }
    await deadline(inst.probe(), 10_000, 'probe');
    const now = await fdsBackTo(base, 2000);
    if (now > base) throw new Finding('leak', `${now - base} fds leaked`);
  } finally {
    await inst.close().catch(() => {});
    pool.close();
    await tick(10);
    escapes.remove();
  }
}
