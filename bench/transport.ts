/**
 * bench/transport: round-trip latency of a 24-byte message between two
 * processes over a UNIX socketpair, with one fd (an eventfd) attached to
 * every 64th message, through vdevkit's UnixSocket, against a C reference
 * (bench/ref/transport.c, sendmsg/recvmsg with blocking I/O) and, for
 * context, Node's own `net` module (same ping-pong, no fds: net cannot send
 * them).
 *
 *   node dist/bench/transport.js [--rounds 5] [--iters 20000] [--warmup 5000]
 *                                [--setups pinned,unpinned] [--only c,ours,net[,raw]]
 *
 * The driver compiles the C reference, then for each setup runs the three
 * contenders one after the other (C, ours, net, C, ours, net, ...), each in a
 * fresh process tree: "pinned" launches it under `taskset -c 0` (its child
 * inherits the affinity, so both ends share CPU 0), "unpinned" under
 * `taskset -c 0-(N-1)` (all CPUs). Every contender does a warm-up, then times
 * ITERS round trips with a monotonic clock, verifies every echo byte for
 * byte, and has its echo child report how many fds it received, whether each
 * came with the right message, and whether it has more descriptors open than
 * at the start. A failed check fails the benchmark.
 *
 * `--only c,ours,net,raw` adds a diagnostic contender, raw: the same
 * ping-pong on the bare addon (a uv_poll watcher, recvmsg, sendmsg) with no
 * UnixSocket, the floor under ours.
 *
 * `--breakdown` instead measures, in one process pinned to CPU 0 (no context
 * switches), what one message costs in each layer of our path next to the
 * bare system calls in C, to show where the time of a round trip goes.
 *
 * Internal modes (same file):
 *   --run ours|net|raw ITERS WARMUP FD_EVERY   the timing parent; prints RESULT {json}
 *   --echo ours|net|raw FD_EVERY WARMUP        the echo child; its socket is fd 3
 *   --breakdown-run N                          the in-process measurements of --breakdown
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import { UnixSocket, EventFd, Fd, socketPairFds, closeAll, nativeAddon as native } from '../src/sys/index.js';
import {
  allowedCpus,
  compileReference,
  formatTable,
  median,
  printResult,
  runContender,
  uptime,
  type RunResult,
} from './common.js';

const MSG = 24;
const KIND_PING = 0;
const KIND_STOP = 1;
const THIS_FILE = fileURLToPath(import.meta.url);

type Impl = 'ours' | 'net' | 'raw';
const CONTENDERS = ['c', 'ours', 'net', 'raw'] as const;
type Contender = (typeof CONTENDERS)[number];
/** What runs unless --only says otherwise (raw is a diagnostic, see --only). */
const DEFAULT_CONTENDERS: Contender[] = ['c', 'ours', 'net'];
const LABEL: Record<Contender, string> = { c: 'C', ours: 'ours', net: 'net', raw: 'raw' };

/* ------------------------------------------------------------------ */
/* Messages (same layout as bench/ref/transport.c)                     */

/** seq (u32), kind (u32), 16 pattern bytes derived from seq. */
function build(m: Buffer, seq: number, kind: number): void {
  m.writeUInt32LE(seq >>> 0, 0);
  m.writeUInt32LE(kind, 4);
  for (let k = 8; k < MSG; k++) m[k] = (seq * 7 + k) & 0xff;
}

/**
 * Cuts a byte stream into MSG-byte messages. A message that arrives whole in
 * one chunk is handed over as a view of the chunk (no copy); one split
 * across chunks is assembled into a fresh buffer.
 */
class Framer {
  #buf = Buffer.alloc(MSG);
  #off = 0;

  constructor(private readonly onMessage: (m: Buffer) => void) {}

  /** Bytes of the message in progress (0 when the stream is at a boundary). */
  get partial(): number {
    return this.#off;
  }

  push(chunk: Buffer): void {
    if (this.#off === 0 && chunk.length === MSG) {
      this.onMessage(chunk);
      return;
    }
    let p = 0;
    while (p < chunk.length) {
      if (this.#off === 0 && chunk.length - p >= MSG) {
        this.onMessage(chunk.subarray(p, p + MSG));
        p += MSG;
        continue;
      }
      const n = Math.min(MSG - this.#off, chunk.length - p);
      chunk.copy(this.#buf, this.#off, p, p + n);
      this.#off += n;
      p += n;
      if (this.#off === MSG) {
        this.#off = 0;
        const whole = this.#buf;
        this.#buf = Buffer.alloc(MSG);
        this.onMessage(whole);
      }
    }
  }
}

function openFdCount(): number {
  return fs.readdirSync('/proc/self/fd').length - 1; // minus readdir's own descriptor
}

/* ------------------------------------------------------------------ */
/* A transport-neutral face over UnixSocket and net.Socket             */

interface Endpoint {
  /** data handler: chunk and the fds that came with it (always [] for net). */
  onData(fn: (chunk: Buffer, fds: Fd[]) => void): void;
  onClose(fn: (err?: Error) => void): void;
  send(data: Buffer, fds: Fd[] | null): void;
  /** Sends what is queued, then closes. */
  end(data?: Buffer): void;
  destroy(): void;
}

function oursEndpoint(fd: Fd): Endpoint {
  const sock = new UnixSocket(fd);
  return {
    onData: (fn) => void sock.on('data', fn),
    onClose: (fn) => void sock.on('close', fn),
    send: (data, fds) => void sock.write(data, fds),
    end: (data) => {
      if (data) sock.write(data);
      sock.end();
    },
    destroy: () => sock.destroy(),
  };
}

const NO_FDS: Fd[] = [];

function netEndpoint(fd: number): Endpoint {
  const sock = new net.Socket({ fd, readable: true, writable: true });
  let failed: Error | undefined;
  sock.on('error', (err) => (failed = err));
  return {
    onData: (fn) => void sock.on('data', (chunk: Buffer) => fn(chunk, NO_FDS)),
    onClose: (fn) => void sock.on('close', () => fn(failed)),
    send: (data, fds) => {
      if (fds) throw new Error('net cannot send fds');
      sock.write(data);
    },
    end: (data) => void (data ? sock.end(data) : sock.end()),
    destroy: () => void sock.destroy(),
  };
}

/**
 * The addon without UnixSocket: one uv_poll watcher, one recvmsg per
 * readable event, sendmsg straight from the caller. Not a usable socket (no
 * write queue: a send that the kernel does not take whole fails): it is the
 * floor under ours, to tell the cost of the UnixSocket layer from that of
 * the event loop and the N-API calls.
 */
function rawEndpoint(fd: number): Endpoint {
  const pool = Buffer.allocUnsafe(64 * 1024);
  const fdsOut = new Int32Array(1 + native.SCM_MAX_FD);
  let dataFn: (chunk: Buffer, fds: Fd[]) => void = (_chunk, fds) => closeAll(fds);
  let closeFn: (err?: Error) => void = () => {};
  let open = true;
  const close = (err?: Error): void => {
    if (!open) return;
    open = false;
    native.pollClose(handle);
    native.close(fd);
    closeFn(err);
  };
  const handle = native.pollNew(fd, (status) => {
    if (!open) return;
    if (status < 0) return close(new Error(`poll failed with status ${status}`));
    let n: number;
    try {
      n = native.recvmsg(fd, pool, 0, pool.length, fdsOut);
    } catch (err) {
      return close(err as Error);
    }
    if (n < 0) return;
    if (n === 0) return close();
    const fds: Fd[] = [];
    for (let k = 0; k < fdsOut[0]!; k++) fds.push(new Fd(fdsOut[1 + k]!));
    dataFn(pool.subarray(0, n), fds); // valid until the next read; the handlers copy what they keep
  });
  native.pollStart(handle, 1);
  const send = (data: Buffer, fds: Fd[] | null): void => {
    const n = native.sendmsg(fd, data, fds ? fds.map((f) => f.value) : null);
    if (n !== data.length) throw new Error(`raw: sendmsg took ${n} of ${data.length} bytes`);
  };
  return {
    onData: (fn) => void (dataFn = fn),
    onClose: (fn) => void (closeFn = fn),
    send,
    end: (data) => {
      if (data) send(data, null);
      close();
    },
    destroy: () => close(),
  };
}

function endpoint(impl: Impl, fd: Fd): Endpoint {
  if (impl === 'ours') return oursEndpoint(fd);
  return impl === 'net' ? netEndpoint(fd.release()) : rawEndpoint(fd.release());
}

/* ------------------------------------------------------------------ */
/* The timing parent (--run)                                           */

async function runParent(impl: Impl, iters: number, warmup: number, fdEvery: number): Promise<void> {
  const [mine, theirs] = socketPairFds();
  const child: ChildProcess = spawn(process.execPath, [THIS_FILE, '--echo', impl, String(fdEvery), String(warmup)], {
    stdio: ['ignore', 'inherit', 'inherit', theirs.value],
  });
  theirs.close();
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  const ep = endpoint(impl, mine);
  const withFds = impl !== 'net';
  const efd = withFds ? EventFd.create() : null;
  const fdList = efd ? [efd.fd] : null;

  const total = warmup + iters;
  const msg = Buffer.alloc(MSG);
  let seq = 0;
  let fdsSent = 0;
  let t0 = 0n;
  let t1 = 0n;
  let cpu0 = process.cpuUsage();
  let cpu1 = cpu0;
  let report: Buffer | null = null;

  const done = new Promise<void>((resolve, reject) => {
    const send = (): void => {
      build(msg, seq, KIND_PING);
      const attach = fdList !== null && seq % fdEvery === 0;
      if (attach) fdsSent++;
      ep.send(msg, attach ? fdList : null);
    };
    const framer = new Framer((echo) => {
      if (seq === total) {
        report = Buffer.from(echo); // the child's answer to the stop message
        resolve();
        return;
      }
      if (!echo.equals(msg)) {
        reject(new Error(`echo of message ${seq} differs from what was sent`));
        return;
      }
      seq++;
      if (seq === warmup) {
        t0 = process.hrtime.bigint();
        cpu0 = process.cpuUsage();
      }
      if (seq < total) {
        send();
        return;
      }
      t1 = process.hrtime.bigint();
      cpu1 = process.cpuUsage(cpu0);
      build(msg, seq, KIND_STOP);
      ep.send(msg, null);
    });
    ep.onData((chunk, fds) => {
      if (fds.length > 0) {
        closeAll(fds);
        reject(new Error('the parent received fds it did not expect'));
        return;
      }
      framer.push(chunk);
    });
    ep.onClose((err) => reject(err ?? new Error(`socket closed after ${seq} round trips`)));
    if (warmup === 0) {
      t0 = process.hrtime.bigint();
      cpu0 = process.cpuUsage();
    }
    send();
  });

  try {
    await done;
  } finally {
    ep.destroy();
    efd?.close();
  }
  const code = await exited;
  if (code !== 0) throw new Error(`echo child exited with ${code}`);
  const r = report as Buffer | null;
  if (!r) throw new Error('no report from the echo child');
  const fdsReceived = r.readUInt32LE(0);
  const fdLeak = r.readInt32LE(4);
  const bad = r.readUInt32LE(8);
  const seen = r.readUInt32LE(12);
  const childUser = r.readUInt32LE(16);
  const childSys = r.readUInt32LE(20);
  if (seen !== total) throw new Error(`the echo child saw ${seen} messages, ${total} were sent`);
  if (bad !== 0) throw new Error(`the echo child saw ${bad} messages out of order or with fds where none belonged`);
  if (fdsReceived !== fdsSent) throw new Error(`the echo child received ${fdsReceived} fds, ${fdsSent} were sent`);
  if (fdLeak !== 0) throw new Error(`the echo child has ${fdLeak} more descriptors open than at the start`);
  printResult(impl, iters, t1 - t0, {
    warmup,
    fd_every: withFds ? fdEvery : 0,
    fds_sent: fdsSent,
    fds_received: fdsReceived,
    fd_leak: fdLeak,
    // CPU time of both processes during the timed round trips.
    user_us_per_rt: Number(((cpu1.user + childUser) / iters).toFixed(3)),
    sys_us_per_rt: Number(((cpu1.system + childSys) / iters).toFixed(3)),
  });
}

/* ------------------------------------------------------------------ */
/* The echo child (--echo)                                             */

function runEcho(impl: Impl, fdEvery: number, warmup: number): void {
  const ep = endpoint(impl, new Fd(3));
  // Counted after the endpoint exists: libuv keeps a spare /dev/null
  // descriptor that it opens with the first stream (net) handle.
  const openBefore = openFdCount();
  let expect = 0; // seq of the next ping
  let bad = 0;
  let fdsTotal = 0;
  let stopped = false;
  let cpu0 = process.cpuUsage();
  const framer = new Framer((m) => {
    const seq = m.readUInt32LE(0);
    if (m.readUInt32LE(4) === KIND_STOP) {
      stopped = true;
      const cpu = process.cpuUsage(cpu0);
      const reply = Buffer.alloc(MSG);
      reply.writeUInt32LE(fdsTotal, 0);
      reply.writeInt32LE(openFdCount() - openBefore, 4);
      reply.writeUInt32LE(bad, 8);
      reply.writeUInt32LE(expect, 12);
      reply.writeUInt32LE(Math.min(cpu.user, 0xffffffff), 16);
      reply.writeUInt32LE(Math.min(cpu.system, 0xffffffff), 20);
      ep.end(reply);
      return;
    }
    if (seq === warmup) cpu0 = process.cpuUsage();
    if (seq !== expect) bad++;
    expect++;
    ep.send(m, null);
  });
  ep.onData((chunk, fds) => {
    const nfds = fds.length;
    if (nfds > 0) {
      closeAll(fds); // the receiver owns them: no leaks
      fdsTotal += nfds;
    }
    framer.push(chunk);
    if (nfds > 0) {
      // The fds belong to the message holding the chunk's last byte.
      const owner = framer.partial > 0 ? expect : expect - 1;
      if (nfds !== 1 || owner % fdEvery !== 0) bad++;
    }
    // A ping that should have carried an fd but did not shows in the
    // parent's count (fds_received !== fds_sent).
  });
  ep.onClose((err) => {
    if (stopped) return; // the report is out; how the parent hangs up does not matter
    console.error(`echo child: the socket closed before the stop message${err ? `: ${err.message}` : ''}`);
    process.exitCode = 1;
  });
}

/* ------------------------------------------------------------------ */
/* --breakdown: per-layer cost of one message, in one process          */

/** ns per iteration of a synchronous loop. */
function timeSync(n: number, fn: () => void): number {
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < n; i++) fn();
  return Number(process.hrtime.bigint() - t0) / n;
}

/** ns per message of a loop driven by the event loop: `start(next)` runs n hops. */
function timeLoop(n: number, setup: (hop: () => boolean) => () => void): Promise<number> {
  return new Promise((resolve) => {
    let left = n;
    let t0 = 0n;
    let cleanup: () => void = () => {};
    const hop = (): boolean => {
      if (left === n) t0 = process.hrtime.bigint();
      if (--left > 0) return true;
      const ns = Number(process.hrtime.bigint() - t0) / (n - 1);
      setImmediate(() => {
        cleanup();
        resolve(ns);
      });
      return false;
    };
    cleanup = setup(hop);
  });
}

async function breakdownRun(n: number): Promise<void> {
  const msg = Buffer.alloc(MSG);
  build(msg, 1, KIND_PING);
  const pool = Buffer.allocUnsafe(64 * 1024);
  const fdsOut = new Int32Array(1 + native.SCM_MAX_FD);
  const out: Record<string, number> = {};
  const [a, b] = native.socketpair();

  const pair = (): void => {
    native.sendmsg(a, msg, null);
    if (native.recvmsg(b, pool, 0, pool.length, fdsOut) !== MSG) throw new Error('recvmsg');
  };
  const eagain = (): void => {
    if (native.recvmsg(b, pool, 0, pool.length, fdsOut) !== -1) throw new Error('recvmsg on an empty socket');
  };
  for (let w = 0; w < 2; w++) {
    // The second pass is the one kept: the first warms up the JIT.
    out['napi_sendmsg_recvmsg_ns'] = timeSync(n, pair);
    out['napi_recvmsg_eagain_ns'] = timeSync(n, eagain);
  }

  // UnixSocket.write (nothing queued, so it calls sendmsg at once) + a raw recvmsg.
  const wa = new UnixSocket(new Fd(native.dup(a)));
  const writePair = (): void => {
    wa.write(msg);
    if (native.recvmsg(b, pool, 0, pool.length, fdsOut) !== MSG) throw new Error('recvmsg');
  };
  for (let w = 0; w < 2; w++) out['socket_write_recvmsg_ns'] = timeSync(n, writePair);
  wa.destroy();

  // One event-loop turn per message: a uv_poll watcher whose JS callback
  // reads the message and sends the next one (raw addon calls).
  for (let w = 0; w < 2; w++) {
    out['loop_raw_ns'] = await timeLoop(n, (hop) => {
      const h = native.pollNew(b, () => {
        if (native.recvmsg(b, pool, 0, pool.length, fdsOut) !== MSG) throw new Error('recvmsg');
        if (hop()) native.sendmsg(a, msg, null);
      });
      native.pollStart(h, 1);
      native.sendmsg(a, msg, null);
      return () => native.pollClose(h);
    });
  }

  // The same through UnixSocket: 'data' on one end, write() on the other.
  for (let w = 0; w < 2; w++) {
    out['loop_socket_ns'] = await timeLoop(n, (hop) => {
      const sa = new UnixSocket(new Fd(native.dup(a)));
      const sb = new UnixSocket(new Fd(native.dup(b)));
      sb.on('data', (chunk) => {
        if (chunk.length !== MSG) throw new Error('short read');
        if (hop()) sa.write(msg);
      });
      sa.write(msg);
      return () => {
        sa.destroy();
        sb.destroy();
      };
    });
  }
  native.close(a);
  native.close(b);
  process.stdout.write(`MICRO ${JSON.stringify({ impl: 'node', n, ...out })}\n`);
}

async function breakdown(argv: string[]): Promise<void> {
  let rounds = 5;
  let n = 100000;
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--rounds') rounds = Math.max(1, Number(argv[++i]));
    else if (argv[i] === '--n') n = Math.max(1000, Number(argv[++i]));
    else throw new Error(`unknown argument ${argv[i]}`);
  }
  const cbin = compileReference('transport');
  console.log(`bench/transport --breakdown: cost of one ${MSG}-byte message per layer, one process on CPU 0, ${rounds} rounds x ${n}`);
  console.log(`uptime before: ${uptime()}`);
  const runs: Record<string, number[]> = {};
  const runMicro = (cmd: string, args: string[]): Promise<Record<string, number>> =>
    new Promise((resolve, reject) => {
      const child = spawn('taskset', ['-c', '0', cmd, ...args], { stdio: ['ignore', 'pipe', 'inherit'] });
      let text = '';
      child.stdout.setEncoding('utf8').on('data', (d: string) => (text += d));
      child.on('close', (code) => {
        const line = text.split('\n').find((l) => l.startsWith('MICRO '));
        if (code !== 0 || !line) reject(new Error(`${cmd} ${args.join(' ')} failed (exit ${code})\n${text}`));
        else resolve(JSON.parse(line.slice(6)) as Record<string, number>);
      });
    });
  for (let r = 0; r < rounds; r++) {
    for (const res of [await runMicro(cbin, ['--micro', String(n)]), await runMicro(process.execPath, [THIS_FILE, '--breakdown-run', String(n)])]) {
      for (const [k, v] of Object.entries(res)) if (typeof v === 'number' && k.endsWith('_ns')) (runs[k] ??= []).push(v);
    }
  }
  const m = (k: string): number => median(runs[k] ?? []);
  const us = (ns: number): string => (ns / 1000).toFixed(2);
  const cPair = m('sendmsg_recvmsg_ns');
  const epoll = m('epoll_pwait0_idle_ns') + m('epoll_pwait0_ready_ns');
  const rows: string[][] = [
    ['C: sendmsg + recvmsg of 24 bytes (kernel work)', us(cPair)],
    ['C: recvmsg on an empty socket (EAGAIN)', us(m('recvmsg_eagain_ns'))],
    ['C: epoll_pwait(timeout 0), nothing ready + one ready', us(epoll)],
    ['addon: native.sendmsg + native.recvmsg', us(m('napi_sendmsg_recvmsg_ns'))],
    ['  = N-API call overhead, two calls', us(m('napi_sendmsg_recvmsg_ns') - cPair)],
    ['addon: native.recvmsg EAGAIN, minus C', us(m('napi_recvmsg_eagain_ns') - m('recvmsg_eagain_ns'))],
    ['UnixSocket.write() + raw recvmsg, minus the addon pair', us(m('socket_write_recvmsg_ns') - m('napi_sendmsg_recvmsg_ns'))],
    ['loop: uv_poll -> JS callback -> recvmsg + sendmsg (raw addon)', us(m('loop_raw_ns'))],
    ['  = one event-loop turn + callback, beyond the addon pair', us(m('loop_raw_ns') - m('napi_sendmsg_recvmsg_ns'))],
    ['    of which epoll_pwait x2 in the kernel (C figure above)', us(epoll)],
    ['loop: UnixSocket data -> write()', us(m('loop_socket_ns'))],
    ['  = UnixSocket read + emit + write, beyond the raw loop', us(m('loop_socket_ns') - m('loop_raw_ns'))],
    ['per message: ours minus C (loop_socket - C pair)', us(m('loop_socket_ns') - cPair)],
  ];
  console.log('');
  console.log(formatTable(['per message (medians)', 'us'], rows));
  console.log(`uptime after: ${uptime()}`);
  console.log(`BREAKDOWN ${JSON.stringify(Object.fromEntries(Object.keys(runs).map((k) => [k, m(k)])))}`);
}

/* ------------------------------------------------------------------ */
/* The driver                                                          */

interface Options {
  rounds: number;
  iters: number;
  warmup: number;
  fdEvery: number;
  setups: string[];
  only: Contender[];
}

function parseOptions(argv: string[]): Options {
  const o: Options = { rounds: 5, iters: 20000, warmup: 5000, fdEvery: 64, setups: ['pinned', 'unpinned'], only: [...DEFAULT_CONTENDERS] };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    const v = argv[i + 1];
    const num = (): number => {
      const n = Number(v);
      if (!Number.isInteger(n) || n < 0) throw new Error(`${a} needs a non-negative integer`);
      i++;
      return n;
    };
    if (a === '--rounds') o.rounds = Math.max(1, num());
    else if (a === '--iters') o.iters = Math.max(1, num());
    else if (a === '--warmup') o.warmup = num();
    else if (a === '--fd-every') o.fdEvery = Math.max(1, num());
    else if (a === '--setups' && v) {
      o.setups = v.split(',');
      i++;
    } else if (a === '--only' && v) {
      o.only = v.split(',').filter((c): c is Contender => (CONTENDERS as readonly string[]).includes(c));
      if (o.only.length === 0) throw new Error(`--only wants some of ${CONTENDERS.join(',')}`);
      i++;
    } else throw new Error(`unknown argument ${a}`);
  }
  for (const s of o.setups) if (s !== 'pinned' && s !== 'unpinned') throw new Error(`unknown setup ${s}`);
  return o;
}

function fmt(n: number, digits = 1): string {
  return Number.isFinite(n) ? n.toFixed(digits) : '-';
}

async function driver(argv: string[]): Promise<void> {
  const o = parseOptions(argv);
  const cbin = compileReference('transport');
  const allCpus = `0-${os.cpus().length - 1}`;
  const cpuModel = os.cpus()[0]?.model ?? 'unknown CPU';
  console.log(`bench/transport: ${MSG}-byte round trips between two processes over a UNIX socketpair, an fd with every ${o.fdEvery}th message (all but net)`);
  console.log(`machine: nproc ${os.cpus().length} (${cpuModel}), node ${process.version}, linux ${os.release()}`);
  console.log(`driver allowed CPUs: ${allowedCpus()}; ${o.rounds} rounds x ${o.iters} round trips after ${o.warmup} warm-up, per contender and setup`);
  const loadBefore = uptime();
  console.log(`uptime before: ${loadBefore}`);

  const started = Date.now();
  const others = o.only.filter((c) => c !== 'c');
  const hasC = o.only.includes('c');
  const rows: string[][] = [];
  const cpuRows: string[][] = [];
  const details: string[] = [];
  const summary: Record<string, unknown>[] = [];
  for (const setup of o.setups) {
    const cpus = setup === 'pinned' ? '0' : allCpus;
    const load1 = os.loadavg()[0]!;
    const times = {} as Record<Contender, number[]>;
    const user = {} as Record<Contender, number[]>;
    const sys = {} as Record<Contender, number[]>;
    for (const c of o.only) [times[c], user[c], sys[c]] = [[], [], []];
    for (let round = 0; round < o.rounds; round++) {
      for (const c of o.only) {
        const common = [String(o.iters), String(o.warmup), String(o.fdEvery)];
        const r: RunResult =
          c === 'c'
            ? await runContender(cbin, common, { cpus })
            : await runContender(process.execPath, [THIS_FILE, '--run', c, ...common], { cpus });
        checkResult(c, r, o);
        times[c].push(r.us_per_rt);
        user[c].push(Number(r['user_us_per_rt']));
        sys[c].push(Number(r['sys_us_per_rt']));
      }
    }
    const med = (c: Contender): number => median(times[c]);
    // Each round's contenders ran back to back, under the same load: the
    // median of the per-round ratios is steadier than the ratio of medians
    // when the machine's load drifts between rounds.
    const paired = (c: Contender): number => median(times[c].map((v, i) => v / times.c[i]!));
    const row = [setup, fmt(load1, 2), ...o.only.map((c) => fmt(med(c)))];
    const result: Record<string, unknown> = { setup, load1 };
    for (const c of o.only) result[`${c}_us`] = med(c);
    if (hasC) {
      row.push(...others.map((c) => fmt(med(c) / med('c'), 2)), ...others.map((c) => fmt(paired(c), 2)));
      for (const c of others) {
        result[`${c}_over_c`] = med(c) / med('c');
        result[`${c}_over_c_paired`] = paired(c);
      }
    }
    rows.push(row);
    for (const c of o.only) {
      cpuRows.push([setup, LABEL[c], fmt(med(c)), fmt(median(user[c])), fmt(median(sys[c]))]);
      details.push(`  ${setup.padEnd(8)} ${LABEL[c].padEnd(4)} us/rt per round: ${times[c].map((t) => fmt(t)).join(' ')}`);
    }
    summary.push({ ...result, rounds: times, user_us: user, sys_us: sys });
  }

  const header = ['setup', 'load1', ...o.only.map((c) => `${LABEL[c]} us/rt`)];
  if (hasC) header.push(...others.map((c) => `${LABEL[c]}/C`), ...others.map((c) => `${LABEL[c]}/C paired`));
  console.log('');
  console.log(formatTable(header, rows));
  console.log('');
  console.log('us/rt: medians of the rounds; X/C: ratio of those medians; X/C paired: median of the per-round');
  console.log(`ratios (each round runs ${o.only.map((c) => LABEL[c]).join(', ')} back to back). Per-round figures:`);
  for (const d of details) console.log(d);
  console.log('');
  console.log('CPU time per round trip, both processes together (getrusage / process.cpuUsage), medians:');
  console.log(formatTable(['setup', 'impl', 'wall us', 'user us', 'sys us'], cpuRows));
  console.log(`uptime after: ${uptime()}`);
  console.log(`total ${((Date.now() - started) / 1000).toFixed(1)} s`);
  console.log(`BENCH ${JSON.stringify({ bench: 'transport', nproc: os.cpus().length, iters: o.iters, warmup: o.warmup, fd_every: o.fdEvery, results: summary })}`);
}

function checkResult(c: Contender, r: RunResult, o: Options): void {
  if (r.impl !== c || r.iters !== o.iters) throw new Error(`contender ${c} reported ${JSON.stringify(r)}`);
  const expectFds = c === 'net' ? 0 : Math.ceil((o.warmup + o.iters) / o.fdEvery);
  if (r['fds_sent'] !== expectFds || r['fds_received'] !== expectFds || r['fd_leak'] !== 0) {
    throw new Error(`contender ${c}: expected ${expectFds} fds sent and received and no leak, got ${JSON.stringify(r)}`);
  }
  if (!(r.us_per_rt > 0)) throw new Error(`contender ${c}: implausible time ${JSON.stringify(r)}`);
}

/* ------------------------------------------------------------------ */

function asImpl(s: string | undefined): Impl {
  if (s === 'ours' || s === 'net' || s === 'raw') return s;
  throw new Error(`unknown implementation ${s}`);
}

if (process.argv[1] === THIS_FILE) {
  const [mode, ...rest] = process.argv.slice(2);
  let main: Promise<void>;
  if (mode === '--run') {
    main = runParent(asImpl(rest[0]), Number(rest[1]), Number(rest[2]), Number(rest[3]));
  } else if (mode === '--breakdown') {
    main = breakdown(rest);
  } else if (mode === '--breakdown-run') {
    main = breakdownRun(Number(rest[0]));
  } else if (mode === '--echo') {
    main = Promise.resolve().then(() => runEcho(asImpl(rest[0]), Number(rest[1]), Number(rest[2])));
  } else {
    main = driver(process.argv.slice(2));
  }
  main.catch((err: unknown) => {
    console.error(err instanceof Error ? (err.stack ?? err.message) : err);
    process.exit(1);
  });
}
