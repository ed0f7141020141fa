/**
 * bench/vfio-user-server: what one vfio-user message costs through our server
 * (VfioUserServer + Session + Connection + UnixSocket, serving the gpio
 * device), measured from a client in another process, next to the bare
 * transport under it and a C reference:
 *
 *   (a) REGION_READ round trips: 4 bytes of BAR2 (region 2, offset 4), each
 *       request waits for its reply;
 *   (b) posted REGION_WRITEs (No_reply, 4 bytes each): N writes, then one
 *       REGION_READ whose reply says (in-order processing) that all N were
 *       processed; writes per second. Twice: the N writes (and the read) sent
 *       in one sendmsg ("batched"), and one sendmsg per message ("each", the
 *       way QEMU sends them);
 *   (c) the transport's round trip, for reference: bench/transport.js's
 *       own contender `ours` (24-byte ping-pong over UnixSocket between two
 *       Node processes; run as is, not copied) and the C reference
 *       bench/ref/transport.c. Both with no fds (FD_EVERY larger than the run:
 *       only the first warm-up message carries one), since the vfio-user
 *       messages here carry none.
 *
 *   node dist/bench/vfio-user-server.js [--rounds 5] [--iters 20000] [--warmup 5000]
 *        [--batch 256] [--batches 100] [--batch-warmup 20]
 *        [--setups pinned,unpinned] [--only c,transport,vfio[,raw]]
 *
 * Same conventions as bench/transport: each contender runs in a fresh
 * process tree, the contenders alternate (C, transport, vfio, C, ...), 5
 * rounds, medians and ratios (also the median of per-round ratios, "paired");
 * "pinned" launches every contender under `taskset -c 0` (the child process
 * inherits it, so client and server share CPU 0: the headline), "unpinned"
 * under all CPUs. `raw` (only with --only) is transport.js's bare-addon
 * ping-pong.
 *
 * Checks, so nothing can measure nothing: every reply is checked (id, command,
 * flags = plain reply, msg_size, errno, the echoed offset/region/count, data
 * length and bytes); an unexpected message (e.g. a reply to a posted write)
 * fails the run; the server process counts the reads and writes its device
 * saw, checks that the written values arrive in sequence (each write carries
 * the next u32 of a counter) and reports counts, the last value and its CPU
 * time per phase, which the client compares with what it sent.
 *
 * Internal modes (same file):
 *   --run ITERS WARMUP BATCH BATCHES BATCH_WARMUP [batched,each]
 *                                                   the client; spawns the server, prints RESULT {json}
 *   --server PATH                                   the server process; prints READY, then SERVER {json} at disconnect
 *
 * For profiling the server process: VDEVKIT_BENCH_SERVER_NODE_FLAGS="--cpu-prof --cpu-prof-dir=DIR"
 * (or --perf-basic-prof) is passed to the server's node; --run with BATCHES 0 skips the writes,
 * ITERS 0 the timed reads, and a last argument `batched` or `each` runs only that way of posting.
 */
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Fd, UnixSocket, nativeAddon as native } from '../src/sys/index.js';
import { RawVfioUserClient, FLAG_NO_REPLY, FLAG_REPLY, rawMessage } from '../src/testing/index.js';
import { gpioDevice } from '../src/devices/gpio.js';
import { VfioUserServer } from '../src/vfio-user/server.js';
import { Session } from '../src/vfio-user/session.js';
import { DeviceRuntime } from '../src/vfio-user/runtime.js';
import { Command, DEFAULT_MAX_DATA_XFER_SIZE } from '../src/vfio-user/constants.js';
import { codecLimits, decodeMessage, encodeReply } from '../src/vfio-user/messages.js';
import { FrameReader } from '../src/wire/reader.js';
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

const THIS_FILE = fileURLToPath(import.meta.url);
const TRANSPORT_JS = path.join(path.dirname(THIS_FILE), 'transport.js');

const CMD_REGION_READ = 9;
const CMD_REGION_WRITE = 10;
const REGION = 2; // BAR2 of the gpio device, 256 bytes, served by callbacks
const OFFSET = 4; // not 0: a read of offset 0 runs the gpio input counter
/** Reads of this offset are markers: the server notes its CPU time (start/end of a timed phase). */
const MARK_OFFSET = 8;
const COUNT = 4;
const READ_REQ_SIZE = 16 + 16; // header + region_access
const READ_REPLY_SIZE = 16 + 16 + COUNT;
const WRITE_SIZE = 16 + 16 + COUNT;
/** FD_EVERY for the transport contenders: larger than any run, so only message 0 carries an fd. */
const NO_FD_EVERY = 1_000_000_000;

/* ------------------------------------------------------------------ */
/* Framing by hand                                                     */

function put16(b: Uint8Array, o: number, v: number): void {
  b[o] = v & 0xff;
  b[o + 1] = (v >>> 8) & 0xff;
}
function put32(b: Uint8Array, o: number, v: number): void {
  b[o] = v & 0xff;
  b[o + 1] = (v >>> 8) & 0xff;
  b[o + 2] = (v >>> 16) & 0xff;
  b[o + 3] = (v >>> 24) & 0xff;
}
function get16(b: Uint8Array, o: number): number {
  return b[o]! | (b[o + 1]! << 8);
}
function get32(b: Uint8Array, o: number): number {
  return (b[o]! | (b[o + 1]! << 8) | (b[o + 2]! << 16) | (b[o + 3]! << 24)) >>> 0;
}

/** Header + region_access (offset u64, region u32, count u32) at `o`. */
function putAccess(b: Uint8Array, o: number, id: number, cmd: number, size: number, flags: number, offset: number): void {
  put16(b, o, id);
  put16(b, o + 2, cmd);
  put32(b, o + 4, size);
  put32(b, o + 8, flags);
  put32(b, o + 12, 0);
  put32(b, o + 16, offset);
  put32(b, o + 20, 0);
  put32(b, o + 24, REGION);
  put32(b, o + 28, COUNT);
}

/** Why the frame at b[p..p+size) is not the reply to REGION_READ `id` of `offset`, or null. */
function checkReadReply(b: Uint8Array, p: number, size: number, id: number, offset: number): string | null {
  if (size !== READ_REPLY_SIZE) return `reply of ${size} bytes, expected ${READ_REPLY_SIZE}`;
  if (get16(b, p) !== id) return `reply id ${get16(b, p)}, expected ${id}`;
  if (get16(b, p + 2) !== CMD_REGION_READ) return `reply to command ${get16(b, p + 2)}, expected REGION_READ`;
  const flags = get32(b, p + 8);
  if (flags !== FLAG_REPLY) return `reply flags 0x${flags.toString(16)} (errno ${get32(b, p + 12)})`;
  if (get32(b, p + 12) !== 0) return `reply errno ${get32(b, p + 12)}`;
  if (get32(b, p + 16) !== offset || get32(b, p + 20) !== 0) return 'reply offset differs';
  if (get32(b, p + 24) !== REGION) return 'reply region differs';
  if (get32(b, p + 28) !== COUNT || size - 32 !== COUNT) return `reply count ${get32(b, p + 28)}, data ${size - 32} bytes`;
  // The gpio device reads 0 everywhere but offset 0.
  if (get32(b, p + 32) !== 0) return `reply data 0x${get32(b, p + 32).toString(16)}, expected 0`;
  return null;
}

/** Cuts the reply stream into frames (by msg_size); a frame split across chunks is assembled in a copy. */
class ReplyFramer {
  #rest: Buffer | null = null;
  onFrame: (b: Uint8Array, p: number, size: number) => void = () => {};
  onError: (err: Error) => void = () => {};

  push(chunk: Buffer): void {
    let b: Buffer = chunk;
    if (this.#rest) {
      b = Buffer.concat([this.#rest, chunk]);
      this.#rest = null;
    }
    let p = 0;
    while (b.length - p >= 16) {
      const size = get32(b, p + 4);
      if (size < 16 || size > 4096) {
        this.onError(new Error(`reply with msg_size ${size}`));
        return;
      }
      if (b.length - p < size) break;
      this.onFrame(b, p, size);
      p += size;
    }
    if (p < b.length) this.#rest = Buffer.from(b.subarray(p));
  }
}

/* ------------------------------------------------------------------ */
/* The server process (--server)                                       */

interface ServerReport {
  reads: number;
  marks: number;
  writes: number;
  /** Writes whose value was not the previous one plus 1. */
  outOfSequence: number;
  lastValue: number;
  /** process.cpuUsage() at each marker read, µs. */
  cpu: { user: number; system: number }[];
}

function runServer(sockPath: string): void {
  const dev = gpioDevice();
  const bar = dev.regions![2]!;
  const read = bar.read!;
  const write = bar.write!;
  const report: ServerReport = { reads: 0, marks: 0, writes: 0, outOfSequence: 0, lastValue: 0xffffffff, cpu: [] };
  // Thin counting wrappers around the gpio callbacks (a few ns each).
  bar.read = (offset, out) => {
    if (offset === MARK_OFFSET) {
      report.marks++;
      report.cpu.push(process.cpuUsage());
    } else report.reads++;
    read.call(bar, offset, out);
  };
  bar.write = (offset, data) => {
    report.writes++;
    const v = data.length === 4 ? get32(data, 0) : -1;
    if (v !== ((report.lastValue + 1) >>> 0)) report.outOfSequence++;
    report.lastValue = v;
    write.call(bar, offset, data);
  };
  const server = VfioUserServer.listen(sockPath, { device: dev });
  server.on('session', (session) => {
    session.conn.on('close', () => {
      server.close();
      process.stdout.write(`SERVER ${JSON.stringify(report)}\n`);
    });
  });
  process.stdout.write('READY\n');
}

/* ------------------------------------------------------------------ */
/* The client (--run)                                                  */

interface Phase {
  ns: number;
  user: number;
  system: number;
}

class BenchClient {
  readonly sock: UnixSocket;
  readonly #framer = new ReplyFramer();
  #id = 1;
  #fail: ((err: Error) => void) | null = null;
  /** Reads sent at OFFSET, markers sent, writes sent, the next write value. */
  reads = 0;
  marks = 0;
  writes = 0;
  nextValue = 0;

  constructor(sock: UnixSocket) {
    this.sock = sock;
    this.#framer.onError = (err) => this.#failWith(err);
    this.#framer.onFrame = (b, p) => this.#failWith(new Error(`unexpected message: id ${get16(b, p)} cmd ${get16(b, p + 2)} flags 0x${get32(b, p + 8).toString(16)}`));
    sock.on('data', (chunk, fds) => {
      if (fds.length > 0) {
        fds.forEach((f) => f.close());
        this.#failWith(new Error('the server sent fds'));
      }
      this.#framer.push(chunk);
    });
    sock.on('close', () => this.#failWith(new Error('the server closed the connection')));
  }

  #failWith(err: Error): void {
    const f = this.#fail;
    this.#fail = null;
    if (f) f(err);
    else throw err;
  }

  #nextId(): number {
    const id = this.#id;
    this.#id = (this.#id + 1) & 0xffff;
    return id;
  }

  /** n REGION_READs of `offset`, one at a time, each reply checked. */
  reads1by1(n: number, offset: number): Promise<void> {
    if (n === 0) return Promise.resolve();
    return new Promise((resolve, reject) => {
      this.#fail = reject;
      const req = Buffer.alloc(READ_REQ_SIZE);
      let id = this.#nextId();
      putAccess(req, 0, id, CMD_REGION_READ, READ_REQ_SIZE, 0, offset);
      let left = n;
      const framer = this.#framer;
      const unexpected = framer.onFrame;
      framer.onFrame = (b, p, size) => {
        const bad = checkReadReply(b, p, size, id, offset);
        if (bad) {
          this.#failWith(new Error(bad));
          return;
        }
        if (--left === 0) {
          framer.onFrame = unexpected;
          this.#fail = null;
          resolve();
          return;
        }
        id = this.#nextId();
        put16(req, 0, id); // the request is sent whole before its reply comes: safe to reuse
        this.sock.write(req);
      };
      if (offset === MARK_OFFSET) this.marks += n;
      else this.reads += n;
      this.sock.write(req);
    });
  }

  /**
   * `batches` times: `k` posted REGION_WRITEs of the next counter values,
   * then one REGION_READ, whose reply is awaited. `each`: one write() (one
   * sendmsg) per message; otherwise the whole batch in one.
   */
  postedWrites(batches: number, k: number, each: boolean): Promise<void> {
    if (batches === 0) return Promise.resolve();
    return new Promise((resolve, reject) => {
      this.#fail = reject;
      const buf = Buffer.alloc(k * WRITE_SIZE + READ_REQ_SIZE);
      for (let j = 0; j < k; j++) putAccess(buf, j * WRITE_SIZE, 0, CMD_REGION_WRITE, WRITE_SIZE, FLAG_NO_REPLY, OFFSET);
      const readAt = k * WRITE_SIZE;
      putAccess(buf, readAt, 0, CMD_REGION_READ, READ_REQ_SIZE, 0, OFFSET);
      const parts: Buffer[] = [];
      for (let j = 0; j <= k; j++) parts.push(buf.subarray(j * WRITE_SIZE, j * WRITE_SIZE + (j < k ? WRITE_SIZE : READ_REQ_SIZE)));
      let id = 0;
      const send = (): void => {
        // The previous batch was sent whole (its read was answered): safe to rewrite.
        for (let j = 0; j < k; j++) {
          const o = j * WRITE_SIZE;
          put16(buf, o, this.#nextId());
          put32(buf, o + 32, this.nextValue);
          this.nextValue = (this.nextValue + 1) >>> 0;
        }
        id = this.#nextId();
        put16(buf, readAt, id);
        this.writes += k;
        this.reads++;
        if (each) for (const part of parts) this.sock.write(part);
        else this.sock.write(buf);
      };
      let left = batches;
      const framer = this.#framer;
      const unexpected = framer.onFrame;
      framer.onFrame = (b, p, size) => {
        const bad = checkReadReply(b, p, size, id, OFFSET);
        if (bad) {
          this.#failWith(new Error(bad));
          return;
        }
        if (--left === 0) {
          framer.onFrame = unexpected;
          this.#fail = null;
          resolve();
          return;
        }
        send();
      };
      send();
    });
  }

  /** A marker read (the server notes its CPU time), then the timed phase, then another marker. */
  async timed(fn: () => Promise<void>): Promise<Phase> {
    await this.reads1by1(1, MARK_OFFSET);
    const cpu0 = process.cpuUsage();
    const t0 = process.hrtime.bigint();
    await fn();
    const t1 = process.hrtime.bigint();
    const cpu = process.cpuUsage(cpu0);
    await this.reads1by1(1, MARK_OFFSET);
    return { ns: Number(t1 - t0), user: cpu.user, system: cpu.system };
  }
}

function serverNodeFlags(): string[] {
  const s = process.env['VDEVKIT_BENCH_SERVER_NODE_FLAGS'];
  return s ? s.split(/\s+/).filter((x) => x !== '') : [];
}

async function runClient(iters: number, warmup: number, k: number, batches: number, batchWarmup: number, modes: string[]): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdevkit-bench-'));
  const sockPath = path.join(dir, 'gpio.sock');
  const server = spawn(process.execPath, [...serverNodeFlags(), THIS_FILE, '--server', sockPath], { stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  server.stdout.setEncoding('utf8');
  const ready = new Promise<void>((resolve, reject) => {
    server.stdout.on('data', (s: string) => {
      out += s;
      if (out.includes('READY\n')) resolve();
    });
    server.on('exit', (code) => reject(new Error(`the server exited (${code}) before it was ready\n${out}`)));
  });
  const exited = new Promise<number | null>((resolve) => server.on('exit', (code) => resolve(code)));
  try {
    await ready;
    const raw = await RawVfioUserClient.connect(sockPath);
    const v = await raw.version();
    if (!v.isReply || v.isError || v.cmd !== 1) throw new Error(`VERSION failed: flags 0x${v.flags.toString(16)} errno ${v.errno}`);
    // From here on the client frames by hand on the same socket.
    raw.socket.removeAllListeners('data');
    const c = new BenchClient(raw.socket);

    await c.reads1by1(warmup, OFFSET);
    const read = await c.timed(() => c.reads1by1(iters, OFFSET));
    // A mode left out (for profiling one of them) still sends its two markers.
    const nb = modes.includes('batched') ? batches : 0;
    const ne = modes.includes('each') ? batches : 0;
    await c.postedWrites(nb && batchWarmup, k, false);
    const batched = await c.timed(() => c.postedWrites(nb, k, false));
    await c.postedWrites(ne && batchWarmup, k, true);
    const each = await c.timed(() => c.postedWrites(ne, k, true));

    raw.socket.removeAllListeners('close');
    raw.close();
    const timer = setTimeout(() => server.kill('SIGKILL'), 10_000);
    const code = await exited;
    clearTimeout(timer);
    if (code !== 0) throw new Error(`the server exited with ${code}`);
    const line = out.split('\n').find((l) => l.startsWith('SERVER '));
    for (const l of out.split('\n')) if (l !== '' && l !== 'READY' && !l.startsWith('SERVER ')) process.stderr.write(`  [server] ${l}\n`);
    if (!line) throw new Error(`the server printed no report\n${out}`);
    const s = JSON.parse(line.slice(7)) as ServerReport;
    const check = (what: string, got: number, want: number): void => {
      if (got !== want) throw new Error(`server saw ${got} ${what}, the client sent ${want}`);
    };
    check('reads', s.reads, c.reads);
    check('marker reads', s.marks, c.marks);
    check('writes', s.writes, c.writes);
    check('writes out of sequence', s.outOfSequence, 0);
    check('as last written value', s.lastValue, (c.nextValue - 1) >>> 0);
    if (s.cpu.length !== 6) throw new Error(`server noted ${s.cpu.length} markers, expected 6`);
    const scpu = (i: number): { user: number; system: number } => ({
      user: s.cpu[2 * i + 1]!.user - s.cpu[2 * i]!.user,
      system: s.cpu[2 * i + 1]!.system - s.cpu[2 * i]!.system,
    });
    const nWrites = nb * k;
    const per = (x: number, n: number): number => Number((n > 0 ? x / n : NaN).toFixed(3));
    const phaseFields = (name: string, p: Phase, i: number, n: number): Record<string, number> => {
      const sc = scpu(i);
      return {
        [`${name}_client_user_us`]: per(p.user, n),
        [`${name}_client_sys_us`]: per(p.system, n),
        [`${name}_server_user_us`]: per(sc.user, n),
        [`${name}_server_sys_us`]: per(sc.system, n),
      };
    };
    printResult('vfio', iters, BigInt(read.ns), {
      warmup,
      batch: k,
      batches,
      writes: nWrites,
      server_reads: s.reads,
      server_writes: s.writes,
      ...phaseFields('read', read, 0, iters),
      batched_ns: batched.ns,
      batched_us_per_write: per(batched.ns / 1e3, nWrites),
      batched_writes_per_s: Math.round(nWrites / (batched.ns / 1e9)),
      ...phaseFields('batched', batched, 1, nWrites),
      each_ns: each.ns,
      each_us_per_write: per(each.ns / 1e3, ne * k),
      each_writes_per_s: Math.round((ne * k) / (each.ns / 1e9)),
      ...phaseFields('each', each, 2, ne * k),
    });
  } finally {
    if (server.exitCode === null) server.kill('SIGKILL');
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

/* ------------------------------------------------------------------ */
/* --breakdown: what each layer of the server costs per message, in one process */

/** ns per call of fn(i), i = 0..n-1. */
function timeSync(n: number, fn: (i: number) => void): number {
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < n; i++) fn(i);
  return Number(process.hrtime.bigint() - t0) / n;
}

/**
 * ns per round trip of a loop driven by the event loop, in this process: a
 * raw addon client on one end of a socketpair (uv_poll, recvmsg, sendmsg)
 * sends `req`, waits for a reply of `replySize` bytes, sends the next.
 */
function timeLoop(n: number, fd: number, req: Buffer, replySize: number): Promise<number> {
  return new Promise((resolve, reject) => {
    const buf = Buffer.allocUnsafe(64 * 1024);
    const fdsOut = new Int32Array(1 + native.SCM_MAX_FD);
    let left = n + 1; // the first round trip is not timed
    let t0 = 0n;
    const h = native.pollNew(fd, () => {
      const got = native.recvmsg(fd, buf, 0, buf.length, fdsOut);
      if (got < 0) return;
      if (got !== replySize) {
        native.pollClose(h);
        reject(new Error(`in-process loop: reply of ${got} bytes, expected ${replySize}`));
        return;
      }
      if (left === n + 1) t0 = process.hrtime.bigint();
      if (--left === 0) {
        const ns = Number(process.hrtime.bigint() - t0) / n;
        native.pollClose(h);
        resolve(ns);
        return;
      }
      native.sendmsg(fd, req, null);
    });
    native.pollStart(h, 1);
    native.sendmsg(fd, req, null);
  });
}

async function breakdownRun(n: number): Promise<void> {
  const out: Record<string, number> = {};
  const limits = codecLimits(DEFAULT_MAX_DATA_XFER_SIZE);
  const K = 256;
  let sink = 0;
  // Frames as the server gets them: Buffer views into an off-heap pool (UnixSocket's reads).
  const pool = Buffer.allocUnsafeSlow(64 * 1024);
  for (let j = 0; j < K; j++) {
    putAccess(pool, j * WRITE_SIZE, j, CMD_REGION_WRITE, WRITE_SIZE, FLAG_NO_REPLY, OFFSET);
    put32(pool, j * WRITE_SIZE + 32, j);
  }
  const chunk = pool.subarray(0, K * WRITE_SIZE);
  const frames: Buffer[] = [];
  for (let j = 0; j < K; j++) frames.push(chunk.subarray(j * WRITE_SIZE, (j + 1) * WRITE_SIZE));
  const readAt = K * WRITE_SIZE + 64;
  putAccess(pool, readAt, 7, CMD_REGION_READ, READ_REQ_SIZE, 0, OFFSET);
  const readFrame = pool.subarray(readAt, readAt + READ_REQ_SIZE);
  const data4 = new Uint8Array(pool.buffer, pool.byteOffset + 32, 4);
  const reader = new FrameReader(
    { headerSize: 16, frameSize: (h) => h[4]! | (h[5]! << 8) | (h[6]! << 16) | (h[7]! * 2 ** 24), maxFrameSize: limits.maxMsgSize },
    { frame: (f) => void (sink += f.length), oversized: () => false, fatal: (r) => { throw new Error(r); } },
  );
  const gpio = new DeviceRuntime(gpioDevice());
  const bare = new DeviceRuntime({
    ...gpioDevice(),
    regions: { 2: { size: 0x100, read: (_o, o) => void o.fill(0), write: () => {} } },
  });
  const [a, b] = native.socketpair();
  const sa = new UnixSocket(new Fd(a)); // nothing is read on it: the loop below never yields
  const rbuf = Buffer.allocUnsafe(64 * 1024);
  const fdsOut = new Int32Array(1 + native.SCM_MAX_FD);
  const drain = (): void => {
    if (native.recvmsg(b, rbuf, 0, rbuf.length, fdsOut) !== READ_REPLY_SIZE) throw new Error('recvmsg');
  };
  const fixed = Buffer.allocUnsafeSlow(READ_REPLY_SIZE);
  const body = { offset: OFFSET, region: REGION, count: COUNT, data: data4 };
  for (let pass = 0; pass < 2; pass++) {
    // The second pass is the one kept: the first warms up the JIT.
    out['reader_per_frame_ns'] = timeSync(Math.ceil(n / K), () => reader.push(chunk)) / K;
    out['decode_write_ns'] = timeSync(n, (i) => void (sink += decodeMessage(frames[i % K]!, limits).header.msgId));
    out['decode_read_ns'] = timeSync(n, () => void (sink += decodeMessage(readFrame, limits).header.msgId));
    out['device_write_gpio_ns'] = timeSync(n, () => gpio.write(REGION, OFFSET, data4));
    out['device_write_bare_ns'] = timeSync(n, () => bare.write(REGION, OFFSET, data4));
    out['device_read_gpio_ns'] = timeSync(n, () => gpio.read(REGION, OFFSET, new Uint8Array(COUNT)));
    out['encode_read_reply_ns'] = timeSync(n, (i) => void (sink += (encodeReply(Command.REGION_READ, i & 0xffff, body) as Uint8Array).length));
    out['send_recv_fixed_ns'] = timeSync(n, () => {
      sa.write(fixed);
      drain();
    });
    out['send_recv_alloc_unsafe_ns'] = timeSync(n, () => {
      sa.write(Buffer.allocUnsafe(READ_REPLY_SIZE));
      drain();
    });
    out['send_recv_alloc_ns'] = timeSync(n, () => {
      sa.write(Buffer.alloc(READ_REPLY_SIZE));
      drain();
    });
    out['send_recv_encoded_ns'] = timeSync(n, (i) => {
      sa.write(encodeReply(Command.REGION_READ, i & 0xffff, body) as Uint8Array);
      drain();
    });
  }
  sa.destroy();
  native.close(b);

  // Whole request -> reply loops through the event loop, in this process:
  // a UnixSocket that answers each request with a fixed 36-byte buffer, and a Session.
  const req = Buffer.from(readFrame);
  {
    const [c, s] = native.socketpair();
    const sock = new UnixSocket(new Fd(s));
    sock.on('data', () => sock.write(fixed));
    for (let pass = 0; pass < 2; pass++) out['loop_socket_echo_ns'] = await timeLoop(n, c, req, READ_REPLY_SIZE);
    sock.destroy();
    native.close(c);
  }
  {
    const [c, s] = native.socketpair();
    const session = new Session(new UnixSocket(new Fd(s)), new DeviceRuntime(gpioDevice()), {
      maxDataXferSize: DEFAULT_MAX_DATA_XFER_SIZE,
      maxMsgFds: 16,
      timeoutMs: 5000,
      log: () => {},
    });
    const json = Buffer.from('{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576}}\0');
    const version = rawMessage(1, Buffer.concat([Buffer.from([0, 0, 2, 0]), json]), 1);
    const cs = new UnixSocket(new Fd(native.dup(c)));
    await new Promise<void>((resolve) => {
      cs.once('data', () => resolve());
      cs.write(version);
    });
    cs.destroy();
    for (let pass = 0; pass < 2; pass++) out['loop_session_ns'] = await timeLoop(n, c, req, READ_REPLY_SIZE);
    session.close();
    native.close(c);
  }
  if (sink === 0.5) console.error(sink); // keep the results alive
  process.stdout.write(`MICRO ${JSON.stringify({ n, ...out })}\n`);
}

async function breakdown(argv: string[]): Promise<void> {
  let rounds = 5;
  let n = 100000;
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--rounds') rounds = Math.max(1, Number(argv[++i]));
    else if (argv[i] === '--n') n = Math.max(1000, Number(argv[++i]));
    else throw new Error(`unknown argument ${argv[i]}`);
  }
  console.log(`bench/vfio-user-server --breakdown: per-message cost of each server layer, one process on CPU 0, ${rounds} rounds x ${n}`);
  console.log(`uptime before: ${uptime()}`);
  const runs: Record<string, number[]> = {};
  for (let r = 0; r < rounds; r++) {
    const res = await new Promise<Record<string, number>>((resolve, reject) => {
      const child = spawn('taskset', ['-c', '0', process.execPath, THIS_FILE, '--breakdown-run', String(n)], { stdio: ['ignore', 'pipe', 'inherit'] });
      let text = '';
      child.stdout.setEncoding('utf8').on('data', (d: string) => (text += d));
      child.on('close', (code) => {
        const line = text.split('\n').find((l) => l.startsWith('MICRO '));
        if (code !== 0 || !line) reject(new Error(`--breakdown-run failed (exit ${code})\n${text}`));
        else resolve(JSON.parse(line.slice(6)) as Record<string, number>);
      });
    });
    for (const [k, v] of Object.entries(res)) if (k.endsWith('_ns')) (runs[k] ??= []).push(v);
  }
  const m = (k: string): number => median(runs[k] ?? []);
  const us = (ns: number): string => (ns / 1000).toFixed(2);
  const rows: string[][] = [
    ['FrameReader: one 36-byte frame out of a 256-frame chunk', us(m('reader_per_frame_ns'))],
    ['decodeMessage: REGION_WRITE (4 bytes)', us(m('decode_write_ns'))],
    ['decodeMessage: REGION_READ', us(m('decode_read_ns'))],
    ['DeviceRuntime.write -> gpio write callback', us(m('device_write_gpio_ns'))],
    ['  the same with a callback that does nothing', us(m('device_write_bare_ns'))],
    ['DeviceRuntime.read -> gpio read callback (+ new Uint8Array(4))', us(m('device_read_gpio_ns'))],
    ['encodeReply: REGION_READ reply (36 bytes)', us(m('encode_read_reply_ns'))],
    ['UnixSocket.write + raw recvmsg: one preallocated 36-byte buffer', us(m('send_recv_fixed_ns'))],
    ['  a fresh Buffer.allocUnsafe(36) each time (off-heap pool)', us(m('send_recv_alloc_unsafe_ns'))],
    ['  a fresh Buffer.alloc(36) each time (on-heap: N-API makes it off-heap)', us(m('send_recv_alloc_ns'))],
    ['  encodeReply(...) each time, as the server does', us(m('send_recv_encoded_ns'))],
    ['loop: REGION_READ -> UnixSocket answering a fixed 36-byte buffer', us(m('loop_socket_echo_ns'))],
    ['loop: REGION_READ -> Session (Connection, codec, gpio) -> reply', us(m('loop_session_ns'))],
    ['  = the server path beyond a bare UnixSocket answer, per request', us(m('loop_session_ns') - m('loop_socket_echo_ns'))],
  ];
  console.log('');
  console.log(formatTable(['per message (medians)', 'us'], rows));
  console.log(`uptime after: ${uptime()}`);
  console.log(`BREAKDOWN ${JSON.stringify(Object.fromEntries(Object.keys(runs).map((k) => [k, m(k)])))}`);
}

/* ------------------------------------------------------------------ */
/* The driver                                                          */

const CONTENDERS = ['c', 'transport', 'raw', 'vfio'] as const;
type Contender = (typeof CONTENDERS)[number];
const LABEL: Record<Contender, string> = { c: 'C', transport: 'transport', raw: 'raw', vfio: 'vfio read' };

interface Options {
  rounds: number;
  iters: number;
  warmup: number;
  batch: number;
  batches: number;
  batchWarmup: number;
  setups: string[];
  only: Contender[];
}

function parseOptions(argv: string[]): Options {
  const o: Options = {
    rounds: 5,
    iters: 20000,
    warmup: 5000,
    batch: 256,
    batches: 100,
    batchWarmup: 20,
    setups: ['pinned', 'unpinned'],
    only: ['c', 'transport', 'vfio'],
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    const v = argv[i + 1];
    const num = (min: number): number => {
      const n = Number(v);
      if (!Number.isInteger(n) || n < min) throw new Error(`${a} needs an integer >= ${min}`);
      i++;
      return n;
    };
    if (a === '--rounds') o.rounds = num(1);
    else if (a === '--iters') o.iters = num(1);
    else if (a === '--warmup') o.warmup = num(0);
    else if (a === '--batch') o.batch = num(1);
    else if (a === '--batches') o.batches = num(1);
    else if (a === '--batch-warmup') o.batchWarmup = num(0);
    else if (a === '--setups' && v) {
      o.setups = v.split(',');
      i++;
    } else if (a === '--only' && v) {
      o.only = v.split(',').filter((c): c is Contender => (CONTENDERS as readonly string[]).includes(c));
      if (!o.only.includes('vfio')) throw new Error('--only needs vfio among its contenders');
      i++;
    } else throw new Error(`unknown argument ${a}`);
  }
  for (const s of o.setups) if (s !== 'pinned' && s !== 'unpinned') throw new Error(`unknown setup ${s}`);
  return o;
}

function fmt(n: number, digits = 1): string {
  return Number.isFinite(n) ? n.toFixed(digits) : '-';
}

function checkResult(c: Contender, r: RunResult, o: Options): void {
  if (r.iters !== o.iters || !(r.us_per_rt > 0)) throw new Error(`contender ${c} reported ${JSON.stringify(r)}`);
  if (c === 'vfio') {
    if (r.impl !== 'vfio' || r['writes'] !== o.batch * o.batches) throw new Error(`vfio reported ${JSON.stringify(r)}`);
    return;
  }
  const impl = c === 'transport' ? 'ours' : c;
  // Only message 0 (warm-up) carries an fd.
  if (r.impl !== impl || r['fds_sent'] !== 1 || r['fds_received'] !== 1 || r['fd_leak'] !== 0) {
    throw new Error(`contender ${c} reported ${JSON.stringify(r)}`);
  }
}

async function driver(argv: string[]): Promise<void> {
  const o = parseOptions(argv);
  if (!fs.existsSync(TRANSPORT_JS)) throw new Error(`${TRANSPORT_JS} is missing: build first (npx tsc -p .)`);
  const cbin = compileReference('transport');
  const allCpus = `0-${os.cpus().length - 1}`;
  console.log('bench/vfio-user-server: vfio-user REGION_READ round trips and posted REGION_WRITEs, client and server in two processes,');
  console.log('against the bare transport round trip (bench/transport.js "ours", 24 bytes) and its C reference, no fds');
  console.log(`machine: nproc ${os.cpus().length} (${os.cpus()[0]?.model ?? 'unknown CPU'}), node ${process.version}, linux ${os.release()}`);
  console.log(
    `driver allowed CPUs: ${allowedCpus()}; ${o.rounds} rounds; ${o.iters} round trips after ${o.warmup} warm-up; ` +
      `posted writes: ${o.batches} batches of ${o.batch} after ${o.batchWarmup} warm-up batches`,
  );
  console.log(`uptime before: ${uptime()}`);
  const started = Date.now();
  const rows: string[][] = [];
  const writeRows: string[][] = [];
  const cpuRows: string[][] = [];
  const bothRows: string[][] = [];
  const details: string[] = [];
  const summary: Record<string, unknown>[] = [];
  const ref: Contender = o.only.includes('transport') ? 'transport' : o.only.includes('raw') ? 'raw' : 'vfio';
  for (const setup of o.setups) {
    const cpus = setup === 'pinned' ? '0' : allCpus;
    const load1 = os.loadavg()[0]!;
    const times = {} as Record<Contender, number[]>;
    const res = {} as Record<Contender, RunResult[]>;
    for (const c of o.only) [times[c], res[c]] = [[], []];
    for (let round = 0; round < o.rounds; round++) {
      for (const c of o.only) {
        const common = [String(o.iters), String(o.warmup)];
        let r: RunResult;
        if (c === 'c') r = await runContender(cbin, [...common, String(NO_FD_EVERY)], { cpus });
        else if (c === 'vfio') {
          const args = [...common, String(o.batch), String(o.batches), String(o.batchWarmup)];
          r = await runContender(process.execPath, [THIS_FILE, '--run', ...args], { cpus });
        } else {
          const impl = c === 'transport' ? 'ours' : 'raw';
          r = await runContender(process.execPath, [TRANSPORT_JS, '--run', impl, ...common, String(NO_FD_EVERY)], { cpus });
        }
        checkResult(c, r, o);
        times[c].push(r.us_per_rt);
        res[c].push(r);
      }
    }
    const med = (c: Contender): number => median(times[c]);
    const paired = (c: Contender, base: Contender): number => median(times[c].map((t, i) => t / times[base][i]!));
    const vf = res.vfio;
    const vmed = (k: string): number => median(vf.map((r) => Number(r[k])));
    const row = [setup, fmt(load1, 2), ...o.only.map((c) => fmt(med(c)))];
    const result: Record<string, unknown> = { setup, load1 };
    for (const c of o.only) result[`${c}_us`] = med(c);
    if (ref !== 'vfio') {
      row.push(fmt(med('vfio') / med(ref), 2), fmt(paired('vfio', ref), 2));
      result[`vfio_over_${ref}`] = med('vfio') / med(ref);
      result[`vfio_over_${ref}_paired`] = paired('vfio', ref);
    }
    if (o.only.includes('c')) {
      row.push(fmt(paired('vfio', 'c'), 2));
      result['vfio_over_c_paired'] = paired('vfio', 'c');
      if (ref !== 'vfio') {
        row.push(fmt(paired(ref, 'c'), 2));
        result[`${ref}_over_c_paired`] = paired(ref, 'c');
      }
    }
    rows.push(row);
    for (const mode of ['batched', 'each']) {
      const perWrite = vmed(`${mode}_us_per_write`);
      writeRows.push([setup, mode, fmt(vmed(`${mode}_writes_per_s`) / 1000, 0), fmt(perWrite, 2), fmt(perWrite / med(ref), 3)]);
      result[`${mode}_writes_per_s`] = vmed(`${mode}_writes_per_s`);
      result[`${mode}_us_per_write`] = perWrite;
    }
    for (const [phase, unit] of [['read', 'per round trip'], ['batched', 'per write'], ['each', 'per write']] as const) {
      cpuRows.push([
        setup,
        `${phase} (${unit})`,
        fmt(phase === 'read' ? med('vfio') : vmed(`${phase}_us_per_write`), 2),
        fmt(vmed(`${phase}_client_user_us`), 2),
        fmt(vmed(`${phase}_client_sys_us`), 2),
        fmt(vmed(`${phase}_server_user_us`), 2),
        fmt(vmed(`${phase}_server_sys_us`), 2),
      ]);
    }
    for (const c of o.only) {
      const user = median(res[c].map((r) => Number(r['user_us_per_rt'] ?? Number(r['read_client_user_us']) + Number(r['read_server_user_us']))));
      const sys = median(res[c].map((r) => Number(r['sys_us_per_rt'] ?? Number(r['read_client_sys_us']) + Number(r['read_server_sys_us']))));
      bothRows.push([setup, LABEL[c], fmt(med(c), 2), fmt(user, 2), fmt(sys, 2), fmt(user + sys, 2)]);
    }
    for (const c of o.only) details.push(`  ${setup.padEnd(8)} ${LABEL[c].padEnd(9)} us/rt per round: ${times[c].map((t) => fmt(t)).join(' ')}`);
    for (const mode of ['batched', 'each']) {
      details.push(`  ${setup.padEnd(8)} ${`${mode} us/write`.padEnd(9)} per round: ${vf.map((r) => fmt(Number(r[`${mode}_us_per_write`]), 2)).join(' ')}`);
    }
    summary.push({ ...result, rounds: times, vfio: vf });
  }

  const header = ['setup', 'load1', ...o.only.map((c) => `${LABEL[c]} us/rt`)];
  if (ref !== 'vfio') header.push(`read/${LABEL[ref]}`, `read/${LABEL[ref]} paired`);
  if (o.only.includes('c')) header.push('read/C paired', ...(ref !== 'vfio' ? [`${LABEL[ref]}/C paired`] : []));
  console.log('');
  console.log('(a) REGION_READ round trips (4 bytes, BAR2 offset 4) against the transport round trip:');
  console.log(formatTable(header, rows));
  console.log('');
  console.log(`(b) posted REGION_WRITEs (4 bytes, No_reply), ${o.batch} then one REGION_READ, medians:`);
  console.log(formatTable(['setup', 'sent as', 'k writes/s', 'us/write', `write/${LABEL[ref]} rt`], writeRows));
  console.log('  batched: the writes and the read in one sendmsg; each: one sendmsg per message');
  console.log('');
  console.log('us/rt: medians of the rounds; X/Y: ratio of medians; paired: median of the per-round ratios. Per round:');
  for (const d of details) console.log(d);
  console.log('');
  console.log('CPU time per round trip, both processes together (getrusage / process.cpuUsage), medians, us:');
  console.log(formatTable(['setup', 'contender', 'wall', 'user', 'sys', 'user+sys'], bothRows));
  console.log('');
  console.log('CPU time of the vfio contender by process and phase (process.cpuUsage), medians, us:');
  console.log(formatTable(['setup', 'phase', 'wall', 'client user', 'client sys', 'server user', 'server sys'], cpuRows));
  console.log(`uptime after: ${uptime()}`);
  console.log(`total ${((Date.now() - started) / 1000).toFixed(1)} s`);
  console.log(
    `BENCH ${JSON.stringify({ bench: 'vfio-user-server', nproc: os.cpus().length, iters: o.iters, warmup: o.warmup, batch: o.batch, batches: o.batches, results: summary })}`,
  );
}

/* ------------------------------------------------------------------ */

if (process.argv[1] === THIS_FILE) {
  const [mode, ...rest] = process.argv.slice(2);
  let main: Promise<void>;
  if (mode === '--run') {
    const [iters, warmup, k, batches, batchWarmup] = rest.slice(0, 5).map(Number);
    const modes = (rest[5] ?? 'batched,each').split(',');
    main = runClient(iters ?? 0, warmup ?? 0, k ?? 1, batches ?? 0, batchWarmup ?? 0, modes);
  } else if (mode === '--server') {
    main = Promise.resolve().then(() => runServer(rest[0]!));
  } else if (mode === '--breakdown') {
    main = breakdown(rest);
  } else if (mode === '--breakdown-run') {
    main = breakdownRun(Number(rest[0]));
  } else {
    main = driver(process.argv.slice(2));
  }
  main.catch((err: unknown) => {
    console.error(err instanceof Error ? (err.stack ?? err.message) : err);
    process.exit(1);
  });
}
