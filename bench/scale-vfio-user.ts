/**
 * bench/scale-vfio-user: one vfio-user server process with many connections
 * (issue 16). Our VfioUserServer serves libvfio-user's samples/server device
 * (src/devices/server-sample.ts, a device of its own per connection) in a
 * Node process of its own; our VfioUserClient, in another process, opens 1
 * and then CONNS (256) connections, each with the full handshake (VERSION,
 * DEVICE_GET_INFO, GET_REGION_INFO of BAR0 and BAR1, BAR1's sparse areas
 * mapped), and does REGION_READ round trips of BAR0 (8 bytes at offset 0:
 * the sample's "seconds since BAR0 was written", checked against the clock).
 *
 * Load model (the same schedule for every case):
 *   open loop: connection i of N sends a read every INTERVAL ms (default
 *     100), the N connections staggered evenly over the interval (read k of
 *     a slice is due at start + k * INTERVAL / N, on connection k mod N),
 *     whether or not earlier replies are in; total rate N * 1000 / INTERVAL
 *     per second (2560/s for 256: a few % of what the server can do). A
 *     read's latency is from just before it is sent (the client's timers
 *     fire at 1 ms granularity, so reads due inside one ms leave together)
 *     to its reply.
 *   cases: "1 conn, per-conn rate" (1 connection, a read every INTERVAL ms:
 *     the issue's reference, an otherwise idle server), "1 conn, total
 *     rate" (1 connection carrying the 256 connections' total, INTERVAL /
 *     256 ms apart: the same arrivals on one socket, so only the number of
 *     connections differs), "256 conns, open loop".
 *   closed loop (saturation, reported separately): every connection keeps
 *     one read outstanding; 1 connection, and all 256 at once. Reads/s,
 *     latency, the server's CPU time per read (/proc/PID/task/∗/schedstat).
 *
 * The machine is small and shared, so the cases are interleaved in time:
 * server A (1 connection) and server B (256) run side by side, and a round
 * is CYCLES (6) cycles of slices, A per-conn rate (2 x SLICE s), A total
 * rate (SLICE s), B (SLICE s; SLICE 2), every other cycle in reverse order;
 * then CLOSED_CYCLES (5) pairs of closed-loop slices (1 s), A then B or B
 * then A. Percentiles are over all of a case's reads in the round; the
 * figures printed are medians over rounds.
 *
 * Memory: our server B's VmRSS (/proc/PID/status; also RssAnon, RssShmem)
 * and V8 heap + external (process.memoryUsage after gc, in the server) with
 * no connection (after a 1 s warm-up connection, so JIT and first buffers
 * are not counted), with the 256 connected (handshake done), after the open
 * loop, after the closed loop, and after all are closed (leak check); per
 * connection = (after the open loop - before) / 256.
 *
 * Reference in the same run: libvfio-user's samples/server (C) under the same
 * load. It serves ONE connection per process (vfu_attach_ctx once, exits when
 * its client leaves; a second connection to its socket waits in the backlog
 * and is never served), so its "256 connections" are 256 server processes,
 * one socket each; its memory per connection is one process's PSS (RSS and
 * private memory beside it).
 *
 *   npm run -s build && node dist/bench/scale-vfio-user.js [--conns 256] [--interval 100]
 *     [--slice 2] [--cycles 6] [--closed-slice 1] [--closed-cycles 5] [--rounds 2]
 *     [--setups pinned,unpinned] [--only ours,c] [--client-procs 1] [--lead-in 0]
 *
 * pinned: servers and clients under `taskset -c 0` (one CPU, the latency
 * headline of ../shared/docs/benchmarking.md); unpinned: no taskset. Each
 * round starts fresh processes and alternates which contender goes first.
 * Every read is checked; any failed read, handshake, or connection closed
 * early counts as an error, and the run fails if there is one.
 *
 * --lead-in MS: each open-loop slice first runs MS ms on the same schedule
 * whose reads are not counted (0 by default, as in runs A-D of
 * docs/reliability.md). A diagnostic: what a slice's first reads after the
 * case's idle spell cost shows as the difference.
 *
 * Profiling our server: VDEVKIT_BENCH_SERVER_NODE_FLAGS="--cpu-prof --cpu-prof-dir=DIR";
 * the clients: VDEVKIT_BENCH_CLIENT_NODE_FLAGS (e.g. "--trace-gc");
 * VDEVKIT_BENCH_SLOW_DUMP=FILE appends every open-loop read slower than 1 ms
 * (client pid, its connections, send time in ms since the epoch, us, index in the slice).
 * Internal modes: --server PATH, --client (both driven over IPC).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { serverSampleDevice } from '../src/devices/server-sample.js';
import { VfioUserServer } from '../src/vfio-user/server.js';
import { VfioUserClient } from '../src/vfio-user/client.js';
import { VfioUserDevice } from '../src/vfio-user/client-device.js';
import { formatTable, median } from './common.js';
import { libvfioUserSample } from '../test/interop/peers.js';
import {
  ask,
  f1,
  forkChild,
  latencies,
  loadavg,
  procCpuMs,
  procMemory,
  Samples,
  serveParent,
  sleepUntil,
  stopChild,
  benchMain,
  type Lat,
  type ProcMemory,
} from './scale-common.js';

const THIS_FILE = fileURLToPath(import.meta.url);
/** Debugging: each open-loop read slower than 1 ms is appended here (pid, conns, send time, us, index). */
const SLOW_DUMP = process.env['VDEVKIT_BENCH_SLOW_DUMP'];

/* ------------------------------------------------------------------ */
/* Our server process (--server PATH)                                  */

function runServer(sock: string): void {
  let closedWithError = 0;
  const errors: string[] = [];
  const server = VfioUserServer.listen(sock, { device: () => serverSampleDevice() });
  server.on('error', (err) => errors.push(err.message));
  server.on('session', (s) => {
    s.conn.on('close', (err) => {
      if (err) {
        closedWithError++;
        if (errors.length < 5) errors.push(err.message);
      }
    });
  });
  const gc = (globalThis as { gc?: () => void }).gc;
  serveParent(async (m) => {
    if (m['cmd'] === 'mem') {
      gc?.();
      gc?.();
      const u = process.memoryUsage();
      return { heapUsed: u.heapUsed, external: u.external, arrayBuffers: u.arrayBuffers, sessions: server.sessions.size, closedWithError, errors };
    }
    throw new Error(`unknown command ${String(m['cmd'])}`);
  });
  process.on('SIGTERM', () => {
    server.close();
    process.exit(0);
  });
  process.send!({ ready: true });
}

interface ServerMem {
  heapUsed: number;
  external: number;
  arrayBuffers: number;
  sessions: number;
  closedWithError: number;
  errors: string[];
}

/* ------------------------------------------------------------------ */
/* The client process (--client)                                       */

interface Conn {
  client: VfioUserClient;
  dev: VfioUserDevice;
}

interface PhaseResult {
  lat: Float64Array;
  errors: number;
  reads: number;
  firstError?: string;
  /** Open loop: the 99th percentile of how late reads left against their schedule, ms. */
  lagP99?: number;
}

function runClient(): void {
  let conns: Conn[] = [];
  let dropped = 0;
  let firstError: string | undefined;
  const noteError = (err: unknown): void => {
    firstError ??= (err as Error).message ?? String(err);
  };

  /** One checked read of BAR0: 8 bytes, the seconds since BAR0 was written (0: the epoch). */
  const read = async (c: Conn): Promise<void> => {
    const d = await c.client.regionRead(0, 0, 8);
    if (d.length !== 8) throw new Error(`BAR0 read gave ${d.length} bytes`);
    const v = Number(new DataView(d.buffer, d.byteOffset, 8).getBigInt64(0, true));
    if (Math.abs(v - Date.now() / 1000) > 5) throw new Error(`BAR0 read ${v}, not the time`);
  };

  const connect = async (paths: string[]): Promise<{ connected: number; errors: number; handshakeMs: Float64Array }> => {
    const hs = new Samples();
    let errors = 0;
    const one = async (p: string): Promise<void> => {
      const t0 = performance.now();
      try {
        const client = await VfioUserClient.connect(p, { timeoutMs: 20_000 });
        const dev = new VfioUserDevice(client);
        const info = await dev.info();
        if (info.numRegions < 2) throw new Error(`${info.numRegions} regions`);
        const bar0 = await dev.regionInfo(0);
        if (bar0.size !== 8) throw new Error(`BAR0 of ${bar0.size} bytes`);
        await dev.regionInfo(1);
        client.on('close', (err) => {
          if (conns.some((c) => c.client === client)) {
            dropped++;
            noteError(err ?? new Error('connection closed'));
          }
        });
        conns.push({ client, dev });
        hs.push(performance.now() - t0);
      } catch (err) {
        errors++;
        noteError(err);
      }
    };
    // 16 handshakes at a time.
    for (let i = 0; i < paths.length; i += 16) await Promise.all(paths.slice(i, i + 16).map(one));
    return { connected: conns.length, errors, handshakeMs: hs.take() };
  };

  const openLoop = async (o: { intervalMs: number; seconds: number; leadInMs: number; base: number; total: number; startEpoch: number }): Promise<PhaseResult> => {
    const n = conns.length;
    const lat = new Samples();
    const lag = new Samples();
    let errors = 0;
    const t0 = performance.now() + (o.startEpoch - Date.now());
    // Reads due in the lead-in are sent on the same schedule but not counted.
    const measureFrom = t0 + o.leadInMs;
    const end = measureFrom + o.seconds * 1000;
    let measured = 0;
    const pending = new Set<Promise<void>>();
    const drop0 = dropped;
    let k = 0;
    const due = (i: number): number => t0 + Math.floor(i / n) * o.intervalMs + ((o.base + (i % n)) * o.intervalMs) / o.total;
    const fire = (c: Conn, counted: boolean): void => {
      const s = performance.now();
      if (counted) measured++;
      const p = read(c).then(
        () => {
          if (!counted) return;
          const us = (performance.now() - s) * 1000;
          lat.push(us);
          if (SLOW_DUMP !== undefined && us > 1000) fs.appendFileSync(SLOW_DUMP, `${process.pid} ${n} ${(s + performance.timeOrigin).toFixed(3)} ${us.toFixed(0)} ${k}\n`);
        },
        (err: unknown) => {
          errors++;
          noteError(err);
        },
      );
      pending.add(p);
      void p.finally(() => pending.delete(p));
    };
    await new Promise<void>((resolve) => {
      const tick = (): void => {
        const now = performance.now();
        while (due(k) <= now && due(k) < end) {
          const counted = due(k) >= measureFrom;
          if (counted) lag.push(now - due(k));
          fire(conns[k % n]!, counted);
          k++;
        }
        if (due(k) >= end) resolve();
        else setTimeout(tick, Math.max(0, due(k) - performance.now()));
      };
      setTimeout(tick, Math.max(0, t0 - performance.now()));
    });
    await Promise.all(pending);
    const lags = latencies([lag.take()]);
    return { lat: lat.take(), errors: errors + (dropped - drop0), reads: measured, lagP99: lags.p99, ...(firstError ? { firstError } : {}) };
  };

  const closedLoop = async (o: { seconds: number; startEpoch: number }): Promise<PhaseResult> => {
    const lat = new Samples();
    let errors = 0;
    let reads = 0;
    const drop0 = dropped;
    await sleepUntil(performance.now() + (o.startEpoch - Date.now()));
    const end = performance.now() + o.seconds * 1000;
    const worker = async (c: Conn): Promise<void> => {
      for (;;) {
        const s = performance.now();
        if (s >= end) return;
        reads++;
        try {
          await read(c);
          lat.push((performance.now() - s) * 1000);
        } catch (err) {
          errors++;
          noteError(err);
          if (c.client.closed) return;
        }
      }
    };
    await Promise.all(conns.map(worker));
    return { lat: lat.take(), errors: errors + (dropped - drop0), reads, ...(firstError ? { firstError } : {}) };
  };

  serveParent(async (m) => {
    switch (m['cmd']) {
      case 'connect':
        return connect(m['paths'] as string[]);
      case 'open':
        return openLoop(m as unknown as Parameters<typeof openLoop>[0]);
      case 'closed':
        return closedLoop(m as unknown as Parameters<typeof closedLoop>[0]);
      case 'disconnect': {
        const old = conns;
        conns = [];
        for (const c of old) {
          c.dev.close();
          c.client.close();
        }
        const e = dropped;
        dropped = 0;
        firstError = undefined;
        return { dropped: e };
      }
      default:
        throw new Error(`unknown command ${String(m['cmd'])}`);
    }
  });
}

/* ------------------------------------------------------------------ */
/* The driver                                                          */

type Contender = 'ours' | 'c';
const LABEL: Record<Contender, string> = { ours: 'ours', c: 'libvfio-user' };

const { values: opt } = parseArgs({
  args: process.argv[1] === THIS_FILE && !['--server', '--client'].includes(process.argv[2] ?? '') ? process.argv.slice(2) : [],
  options: {
    conns: { type: 'string', default: '256' },
    interval: { type: 'string', default: '100' },
    slice: { type: 'string', default: '2' },
    cycles: { type: 'string', default: '6' },
    'closed-slice': { type: 'string', default: '1' },
    'closed-cycles': { type: 'string', default: '5' },
    rounds: { type: 'string', default: '2' },
    setups: { type: 'string', default: 'pinned,unpinned' },
    only: { type: 'string', default: 'ours,c' },
    'client-procs': { type: 'string', default: '1' },
    'lead-in': { type: 'string', default: '0' },
  },
});
const CONNS = Number(opt.conns);
const INTERVAL = Number(opt.interval);
const SLICE = Number(opt.slice);
const CYCLES = Number(opt.cycles);
const CLOSED_SLICE = Number(opt['closed-slice']);
const CLOSED_CYCLES = Number(opt['closed-cycles']);
const ROUNDS = Number(opt.rounds);
const CLIENT_PROCS = Math.max(1, Number(opt['client-procs']));
const LEAD_IN_MS = Math.max(0, Number(opt['lead-in']));

const C_PER = '1 conn, per-conn rate';
const C_TOTAL = '1 conn, total rate';
const C_MANY = `${CONNS} conns, open loop`;
const C_CLOSED1 = '1 conn, closed loop';
const C_CLOSEDN = `${CONNS} conns, closed loop`;

interface CaseResult {
  lat: Lat;
  reads: number;
  errors: number;
  seconds: number;
  /** Server CPU ms over the case (sum over its server processes). */
  serverCpuMs: number;
  /** Open loop: the worst slice's 99th percentile of how late reads left, ms. */
  lagP99?: number;
  /** Each slice's p99 (us), in order: slice k of two cases ran in the same cycle. */
  sliceP99: number[];
}

/** A case's slices, summed. */
class CaseAcc {
  parts: Float64Array[] = [];
  reads = 0;
  errors = 0;
  seconds = 0;
  serverCpuMs = 0;
  lagP99: number | undefined;
  /** Each slice's p99, in order. */
  sliceP99: number[] = [];
  result(): CaseResult {
    return {
      lat: latencies(this.parts),
      reads: this.reads,
      errors: this.errors,
      seconds: this.seconds,
      serverCpuMs: this.serverCpuMs,
      sliceP99: this.sliceP99,
      ...(this.lagP99 !== undefined ? { lagP99: this.lagP99 } : {}),
    };
  }
}

interface MemResult {
  label: string;
  rssKb: number;
  anonKb: number;
  shmemKb: number;
  heapBytes?: number;
  fds: number;
}

interface RoundResult {
  cases: Map<string, CaseResult>;
  mem: MemResult[];
  /** kB per connection: ours the VmRSS delta; C one process's PSS. */
  perConnKb: number;
  /** Ours: the VmRSS delta per connection after the closed loop too. */
  perConnKbClosed?: number;
  perConnHeap?: number;
  perConnNote: string;
  handshakeMs: number;
  errors: number;
}

function serverNodeFlags(): string[] {
  const s = process.env['VDEVKIT_BENCH_SERVER_NODE_FLAGS'];
  return ['--expose-gc', ...(s ? s.split(/\s+/).filter((x) => x !== '') : [])];
}

/** Node flags for the client processes (VDEVKIT_BENCH_CLIENT_NODE_FLAGS, e.g. "--trace-gc"). */
function clientNodeFlags(): string[] {
  const s = process.env['VDEVKIT_BENCH_CLIENT_NODE_FLAGS'];
  return s ? s.split(/\s+/).filter((x) => x !== '') : [];
}

async function waitForSocket(p: string, child: ChildProcess, what: string): Promise<void> {
  const deadline = Date.now() + 10_000;
  while (!fs.existsSync(p)) {
    if (child.exitCode !== null) throw new Error(`${what} exited (${child.exitCode}) before listening`);
    if (Date.now() > deadline) throw new Error(`${what} did not listen on ${p} within 10 s`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** Our server process: forked with IPC, resolves once it listens. */
async function startOurs(sock: string, cpus: string | undefined): Promise<ChildProcess> {
  const child = forkChild(THIS_FILE, ['--server', sock], cpus, serverNodeFlags());
  await new Promise<void>((resolve, reject) => {
    child.once('message', () => resolve());
    child.once('exit', (c) => reject(new Error(`our server exited (${c}) before READY`)));
  });
  return child;
}

/** libvfio-user's samples/server on `sock` (one connection, then it exits). */
async function startC(bin: string, sock: string, cpus: string | undefined): Promise<ChildProcess> {
  const [cmd, args] = cpus !== undefined ? ['taskset', ['-c', cpus, bin, sock]] : [bin, [sock]];
  const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  child.stderr!.on('data', (d: Buffer) => {
    if (err.length < 2000) err += d.toString();
  });
  child.on('exit', (code) => {
    if (code !== 0 && code !== null && err) process.stderr.write(`  [libvfio-user server] exit ${code}: ${err}\n`);
  });
  await waitForSocket(sock, child, 'libvfio-user samples/server');
  return child;
}

/** One slice of a case, over all its client processes, added to `acc`; server CPU from /proc. */
async function slice(acc: CaseAcc, clients: ChildProcess[], servers: number[], msg: (i: number) => object, seconds: number): Promise<void> {
  const cpu0 = servers.reduce((a, p) => a + procCpuMs(p), 0);
  const t0 = performance.now();
  const rs = await Promise.all(clients.map((c, i) => ask<PhaseResult>(c, msg(i))));
  const wall = (performance.now() - t0) / 1000;
  acc.serverCpuMs += servers.reduce((a, p) => a + procCpuMs(p), 0) - cpu0;
  const errors = rs.reduce((a, r) => a + r.errors, 0);
  if (errors > 0) process.stderr.write(`  ${errors} errors; first: ${rs.find((r) => r.firstError)?.firstError}\n`);
  acc.parts.push(...rs.map((r) => r.lat));
  acc.sliceP99.push(latencies(rs.map((r) => r.lat)).p99);
  acc.reads += rs.reduce((a, r) => a + r.reads, 0);
  acc.errors += errors;
  acc.seconds += Math.min(seconds, wall);
  for (const r of rs) if (r.lagP99 !== undefined) acc.lagP99 = Math.max(acc.lagP99 ?? 0, r.lagP99);
}

/** Splits `paths` over the client processes and connects; resolves with the median handshake ms. */
async function connectAll(clients: ChildProcess[], paths: string[]): Promise<{ errors: number; handshakeMs: number; split: number[] }> {
  const per = Math.ceil(paths.length / clients.length);
  const split = clients.map((_, i) => paths.slice(i * per, (i + 1) * per));
  const rs = await Promise.all(clients.map((c, i) => ask<{ connected: number; errors: number; handshakeMs: Float64Array }>(c, { cmd: 'connect', paths: split[i] })));
  return { errors: rs.reduce((a, r) => a + r.errors, 0), handshakeMs: latencies(rs.map((r) => r.handshakeMs)).p50, split: split.map((s) => s.length) };
}

const startAt = (): number => Date.now() + 150;

/**
 * One round against one contender: server A with 1 connection and server
 * B with CONNS (for C: CONNS processes) run side by side; the cases
 * alternate in short slices (A per-conn rate, A total rate, B; then the
 * other way round), so background load on this shared machine falls on
 * them alike.
 */
async function runContender(which: Contender, dir: string, cpus: string | undefined, cBin: string): Promise<RoundResult> {
  const acc = new Map<string, CaseAcc>([C_PER, C_TOTAL, C_MANY, C_CLOSED1, C_CLOSEDN].map((l) => [l, new CaseAcc()]));
  const mem: MemResult[] = [];
  let errors = 0;
  const clientA = forkChild(THIS_FILE, ['--client'], cpus, clientNodeFlags());
  const clientsB = Array.from({ length: CLIENT_PROCS }, () => forkChild(THIS_FILE, ['--client'], cpus, clientNodeFlags()));
  const children: ChildProcess[] = [];
  let oursB: ChildProcess | null = null;
  const oursMem = async (label: string): Promise<ServerMem> => {
    const m = await ask<ServerMem>(oursB!, { cmd: 'mem' });
    const p = procMemory(oursB!.pid!);
    mem.push({ label, rssKb: p.vmRss, anonKb: p.rssAnon, shmemKb: p.rssShmem, heapBytes: m.heapUsed + m.external, fds: p.fds });
    return m;
  };
  /** Waits until our server B has no session left; its memory then. */
  const oursIdle = async (label: string): Promise<ServerMem> => {
    for (let i = 0; ; i++) {
      const m = await oursMem(label);
      if (m.sessions === 0 || i === 100) return m;
      mem.pop();
      await new Promise((r) => setTimeout(r, 20));
    }
  };
  try {
    let pidsA: number[];
    let pidsB: number[];
    let sockA: string;
    let pathsB: string[];
    let before: ServerMem | null = null;
    if (which === 'ours') {
      sockA = path.join(dir, 'ours-a.sock');
      const sockB = path.join(dir, 'ours-b.sock');
      const a = await startOurs(sockA, cpus);
      children.push(a);
      oursB = await startOurs(sockB, cpus);
      children.push(oursB);
      pidsA = [a.pid!];
      pidsB = [oursB.pid!];
      await oursMem('fresh');
      // Warm B up with one connection (JIT, first buffers), so that is not counted per connection.
      const w = await connectAll(clientsB.slice(0, 1), [sockB]);
      errors += w.errors;
      await ask(clientsB[0]!, { cmd: 'closed', seconds: 1, startEpoch: startAt() });
      errors += (await ask<{ dropped: number }>(clientsB[0]!, { cmd: 'disconnect' })).dropped;
      before = await oursIdle('no connection (warmed up)');
      pathsB = Array.from({ length: CONNS }, () => sockB);
    } else {
      sockA = path.join(dir, 'c-a.sock');
      const a = await startC(cBin, sockA, cpus);
      children.push(a);
      pidsA = [a.pid!];
      pathsB = Array.from({ length: CONNS }, (_, i) => path.join(dir, `c-b${i}.sock`));
      const bs: ChildProcess[] = [];
      // CONNS processes, started 32 at a time.
      for (let i = 0; i < CONNS; i += 32) bs.push(...(await Promise.all(pathsB.slice(i, i + 32).map((p) => startC(cBin, p, cpus)))));
      children.push(...bs);
      pidsB = bs.map((c) => c.pid!);
    }
    errors += (await connectAll([clientA], [sockA])).errors;
    const many = await connectAll(clientsB, pathsB);
    errors += many.errors;
    if (which === 'ours') await oursMem(`${CONNS} connected`);
    let base = 0;
    const basesB = many.split.map((n) => ((base += n), base - n));
    const open =
      (interval: number, bases: number[], total: number, seconds: number) =>
      (i: number): object => ({ cmd: 'open', intervalMs: interval, seconds, leadInMs: LEAD_IN_MS, base: bases[i]!, total, startEpoch: startAt() });
    const steps: [string, () => Promise<void>][] = [
      [C_PER, () => slice(acc.get(C_PER)!, [clientA], pidsA, open(INTERVAL, [0], 1, 2 * SLICE), 2 * SLICE)],
      [C_TOTAL, () => slice(acc.get(C_TOTAL)!, [clientA], pidsA, open(INTERVAL / CONNS, [0], 1, SLICE), SLICE)],
      [C_MANY, () => slice(acc.get(C_MANY)!, clientsB, pidsB, open(INTERVAL, basesB, CONNS, SLICE), SLICE)],
    ];
    for (let c = 0; c < CYCLES; c++) for (const [, run] of c % 2 === 0 ? steps : [...steps].reverse()) await run();
    let perConnKb: number;
    let perConnKbClosed: number | undefined;
    let perConnHeap: number | undefined;
    let perConnNote: string;
    if (which === 'ours') {
      const after = await oursMem(`${CONNS} connected, after the open loop`);
      const b = mem.find((x) => x.label.startsWith('no connection'))!;
      perConnKb = (mem[mem.length - 1]!.rssKb - b.rssKb) / CONNS;
      perConnHeap = (after.heapUsed + after.external - (before!.heapUsed + before!.external)) / CONNS;
      perConnNote = 'server VmRSS delta / conns';
    } else {
      const ms: ProcMemory[] = pidsB.map((p) => procMemory(p));
      perConnKb = median(ms.map((m) => m.pss));
      perConnNote = `one process's PSS (RSS ${median(ms.map((m) => m.vmRss))} kB, private ${median(ms.map((m) => m.priv))} kB)`;
      mem.push({ label: `${CONNS} processes, each (median)`, rssKb: median(ms.map((m) => m.vmRss)), anonKb: median(ms.map((m) => m.rssAnon)), shmemKb: median(ms.map((m) => m.rssShmem)), fds: median(ms.map((m) => m.fds)) });
    }
    const closed = (seconds: number) => (): object => ({ cmd: 'closed', seconds, startEpoch: startAt() });
    for (let c = 0; c < CLOSED_CYCLES; c++) {
      const pair: [() => Promise<void>, () => Promise<void>] = [
        () => slice(acc.get(C_CLOSED1)!, [clientA], pidsA, closed(CLOSED_SLICE), CLOSED_SLICE),
        () => slice(acc.get(C_CLOSEDN)!, clientsB, pidsB, closed(CLOSED_SLICE), CLOSED_SLICE),
      ];
      for (const run of c % 2 === 0 ? pair : pair.reverse()) await run();
    }
    if (which === 'ours') {
      await oursMem(`${CONNS} connected, after the closed loop`);
      perConnKbClosed = (mem[mem.length - 1]!.rssKb - mem.find((x) => x.label.startsWith('no connection'))!.rssKb) / CONNS;
    }
    for (const c of [clientA, ...clientsB]) errors += (await ask<{ dropped: number }>(c, { cmd: 'disconnect' })).dropped;
    if (which === 'ours') {
      const m = await oursIdle('all closed');
      if (m.closedWithError > 0) {
        errors += m.closedWithError;
        process.stderr.write(`  our server: ${m.closedWithError} sessions closed with an error: ${m.errors.join('; ')}\n`);
      }
    }
    const cases = new Map<string, CaseResult>();
    for (const [l, a] of acc) {
      const r = a.result();
      cases.set(l, r);
      errors += r.errors;
      process.stderr.write(
        `  ${LABEL[which].padEnd(12)} ${l.padEnd(24)} ${String(r.reads).padStart(7)} reads, p50 ${f1(r.lat.p50)} p99 ${f1(r.lat.p99)} p99.9 ${f1(r.lat.p999)} us, ${r.errors} errors\n`,
      );
    }
    return {
      cases,
      mem,
      perConnKb,
      ...(perConnKbClosed !== undefined ? { perConnKbClosed } : {}),
      ...(perConnHeap !== undefined ? { perConnHeap } : {}),
      perConnNote,
      handshakeMs: many.handshakeMs,
      errors,
    };
  } finally {
    for (const c of [clientA, ...clientsB]) await stopChild(c);
    await Promise.all(children.map((c) => stopChild(c)));
  }
}

async function driver(): Promise<number> {
  const only = opt.only.split(',') as Contender[];
  const cBin = only.includes('c') ? libvfioUserSample('server') : '';
  const setups = opt.setups.split(',');
  process.stdout.write(
    `bench/scale-vfio-user: ${CONNS} connections, open loop 1 read / ${INTERVAL} ms per connection (${Math.round((CONNS * 1000) / INTERVAL)}/s in all), ` +
      `${CYCLES} cycles of slices (${2 * SLICE} s 1 conn per-conn rate, ${SLICE} s 1 conn total rate, ${SLICE} s ${CONNS} conns; each after a ${LEAD_IN_MS} ms lead-in not counted), ` +
      `closed loop ${CLOSED_CYCLES} x ${CLOSED_SLICE} s each; ${ROUNDS} round(s); ${CLIENT_PROCS} client process(es) for the ${CONNS}; ${os.cpus().length} CPUs; loadavg ${loadavg()}; ${new Date().toISOString()}\n`,
  );
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdevkit-scale-'));
  let totalErrors = 0;
  try {
    for (const setup of setups) {
      const cpus = setup === 'pinned' ? '0' : undefined;
      const results: Record<Contender, RoundResult[]> = { ours: [], c: [] };
      for (let r = 0; r < ROUNDS; r++) {
        const order = r % 2 === 0 ? only : [...only].reverse();
        for (const c of order) {
          process.stderr.write(`${setup} round ${r + 1}, ${LABEL[c]} (loadavg ${loadavg()}):\n`);
          const res = await runContender(c, dir, cpus, cBin);
          results[c].push(res);
          totalErrors += res.errors;
          for (const f of fs.readdirSync(dir)) fs.rmSync(path.join(dir, f), { force: true });
        }
      }
      const lines: string[] = [`\n${setup} (${cpus !== undefined ? `taskset -c ${cpus}` : 'no taskset'}), medians of ${ROUNDS} round(s); latencies in us; loadavg ${loadavg()}`];
      const labels = [...results[only[0]!][0]!.cases.keys()];
      const rows: string[][] = [];
      for (const c of only) {
        for (const l of labels) {
          const rs = results[c].map((x) => x.cases.get(l)!);
          const m = (f: (x: CaseResult) => number): number => median(rs.map(f));
          rows.push([
            `${LABEL[c]}: ${l}`,
            String(m((x) => x.reads)),
            String(rs.reduce((a, x) => a + x.errors, 0)),
            f1(m((x) => x.lat.p50)),
            f1(m((x) => x.lat.p99)),
            f1(m((x) => x.lat.p999)),
            String(Math.round(m((x) => x.reads / x.seconds))),
            f1(m((x) => (x.serverCpuMs * 1000) / Math.max(1, x.reads))),
          ]);
        }
      }
      lines.push(formatTable(['case', 'reads', 'errors', 'p50', 'p99', 'p99.9', 'reads/s', 'server CPU us/read'], rows));
      for (const c of only) {
        const p99 = (l: string): number => median(results[c].map((x) => x.cases.get(l)!.lat.p99));
        const paired = (l: string): number => median(results[c].map((x) => x.cases.get(`${CONNS} conns, open loop`)!.lat.p99 / x.cases.get(l)!.lat.p99));
        const many = p99(`${CONNS} conns, open loop`);
        // Per cycle (adjacent slices, the same background load): p99 of the CONNS slice / p99 of the 1-conn total-rate slice.
        const cycles = results[c].flatMap((x) => x.cases.get(C_MANY)!.sliceP99.map((v, k) => v / x.cases.get(C_TOTAL)!.sliceP99[k]!));
        lines.push(
          `${LABEL[c]}: per cycle, p99(${CONNS} conns slice) / p99(1 conn total-rate slice): median ${median(cycles).toFixed(2)} over ${cycles.length} cycles ` +
            `(${cycles.filter((r) => r <= 2).length} of them <= 2; range ${Math.min(...cycles).toFixed(2)} - ${Math.max(...cycles).toFixed(2)})`,
        );
        lines.push(
          `${LABEL[c]}: p99(${CONNS}) / p99(1 conn, per-conn rate) = ${(many / p99('1 conn, per-conn rate')).toFixed(2)} (paired ${paired('1 conn, per-conn rate').toFixed(2)}); ` +
            `/ p99(1 conn, total rate) = ${(many / p99('1 conn, total rate')).toFixed(2)} (paired ${paired('1 conn, total rate').toFixed(2)}); ` +
            `closed loop ${CONNS} / 1 reads/s = ${(median(results[c].map((x) => x.cases.get(`${CONNS} conns, closed loop`)!.reads / x.cases.get(`${CONNS} conns, closed loop`)!.seconds)) / median(results[c].map((x) => x.cases.get('1 conn, closed loop')!.reads / x.cases.get('1 conn, closed loop')!.seconds))).toFixed(2)}`,
        );
        const kb = median(results[c].map((x) => x.perConnKb));
        const heap = results[c][0]!.perConnHeap !== undefined ? `, V8 heap+external ${(median(results[c].map((x) => x.perConnHeap!)) / 1024).toFixed(1)} KiB` : '';
        const kbClosed = results[c][0]!.perConnKbClosed !== undefined ? `; after the closed loop too ${median(results[c].map((x) => x.perConnKbClosed!)).toFixed(1)} KiB` : '';
        lines.push(`${LABEL[c]}: memory per connection ${kb.toFixed(1)} KiB (${results[c][0]!.perConnNote}${heap})${kbClosed}; handshake p50 ${median(results[c].map((x) => x.handshakeMs)).toFixed(2)} ms`);
        lines.push(
          `${LABEL[c]} memory (round 1): ` +
            results[c][0]!.mem.map((m) => `${m.label}: RSS ${m.rssKb} kB (anon ${m.anonKb}, shmem ${m.shmemKb})${m.heapBytes !== undefined ? `, heap+ext ${(m.heapBytes / 1048576).toFixed(1)} MiB` : ''}, ${m.fds} fds`).join('; '),
        );
      }
      process.stdout.write(`${lines.join('\n')}\n`);
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  return totalErrors;
}

benchMain(THIS_FILE, 'scale-vfio-user', { '--server': (a) => runServer(a[0]!), '--client': () => runClient() }, driver);
