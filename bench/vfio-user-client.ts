/**
 * bench/vfio-user-client: what the vfio-user client (VfioUserClient,
 * VfioUserDevice) costs, with the server in another Node process, against
 * the transport under it and C references measured in the same run:
 *
 *   (a) round trips: 4-byte REGION_READs through client.regionRead (gpio
 *       device, BAR2 = region 2, offset 4), each awaited; and posted 4-byte
 *       REGION_WRITEs through client.regionWrite(..., { posted: true }),
 *       BATCH of them then one REGION_READ to sync (in-order processing: its
 *       reply means every write before it was served), in writes per second,
 *       two ways: "coalesced" (the writes issued back to back, not awaited:
 *       the client packs up to 200 of them into one REGION_WRITE_MULTI) and
 *       "each" (every write awaited, so each leaves as a REGION_WRITE of its
 *       own, the way QEMU's vCPUs post them). Next to bench/transport's
 *       bare-addon ping-pong ("raw", run as is: dist/bench/transport.js
 *       --run raw) and the C round trip (bench/ref/transport.c), both without
 *       fds (FD_EVERY larger than the run);
 *   (b) message DMA: the sample device's DMA engine (BAR0 registers
 *       programmed through the client) copies CMD_LEN bytes per command
 *       between two client windows, one mapped WITHOUT an fd (dmaMap passFd
 *       false, so the server reaches it only by DMA_READ / DMA_WRITE
 *       messages, which the client serves from its memory) and one mapped
 *       with its fd (the server copies to/from it directly). "DMA_READ":
 *       message window -> fd window (only DMA_READs cross the socket);
 *       "DMA_WRITE": fd window -> message window (only DMA_WRITEs; the data
 *       is in a window the client shared by fd, so the server splices it);
 *       "fill": the sample's FILL_CMD into the message window (DMA_WRITEs of
 *       a buffer of the device's own, which the server copies into the
 *       socket, as it must for memory the client does not own).
 *       max_data_xfer_size is negotiated (client and server option) to the
 *       chunk size, 64 KiB or 1 MiB, so every message carries one chunk.
 *       Timed from the DMA_CMD register write to the completion interrupt
 *       (MSI-X vector 0 on an eventfd). Against bench/ref/copy.c: the same
 *       bytes in the same chunks over a UNIX socketpair between two C
 *       processes, streamed one way from and into one chunk-sized buffer
 *       ("stream", raw socket throughput, cache-hot), streamed one way from
 *       and into CMD_LEN-sized memfd mappings, chunk after chunk ("window":
 *       the same memory traffic as the DMA between two windows), and as
 *       request/reply ("rpc", one 16-byte request, one chunk back, like
 *       DMA_READ). The timed DMA commands come after --dma-warmup untimed
 *       ones per direction (default: as many as make 8192 messages or 4 GiB,
 *       whichever is less: V8 runs the per-message path unoptimized for the
 *       first thousands of messages, 4x slower at 64 KiB chunks);
 *   (c) mapped memory: the sample device's BAR2 sparse mmap areas as
 *       VfioUserDevice.regionInfo maps them ([0, 16 KiB) and [32 KiB, 64 KiB);
 *       no area holds a 64 KiB block), read and written with Uint8Array.set of
 *       one whole area per call ("set"), and through VfioUserDevice.read/write
 *       ("api"), against C memcpy of the same blocks out of and into a
 *       MAP_SHARED memfd (bench/ref/copy.c memcpy).
 *
 *   node dist/bench/vfio-user-client.js [--rounds 5] [--setups pinned,unpinned]
 *        [--only rt,dma,mapped] [--iters 10000] [--warmup 5000] [--batch 200]
 *        [--batches 50] [--batch-warmup 10] [--chunks 65536,1048576]
 *        [--dma-bytes 67108864] [--cmd-len 8388608] [--dma-warmup N] [--mapped-bytes 1073741824]
 *
 * Conventions as bench/transport: every contender runs in a fresh process
 * tree (ours: the client process, which spawns the server process), the
 * contenders of a part alternate (C, ours, C, ours, ...) over the rounds,
 * medians and ratios (also "paired": the median of the per-round ratios);
 * "pinned" launches every contender under `taskset -c 0` (the children
 * inherit it: client and server share CPU 0), "unpinned" under all CPUs.
 *
 * Checks: every REGION_READ reply's data (the gpio reads 0 at offset 4); the
 * server process counts the reads and writes its device served and checks
 * that the written values arrive in sequence (each write carries the next
 * u32 of a counter), and the client compares its report with what it sent;
 * every DMA command's destination is compared byte for byte with the source
 * pattern (two random patterns alternate, the destination is zeroed first),
 * DMA_STATUS must say DONE and DMA_COUNT must count every command, and the
 * server reports which windows it mapped by fd (exactly one); the mapped
 * copies are checked against what the device's memory holds, read and
 * written by REGION_READ/WRITE messages. Any failed check fails the run.
 *
 * Internal modes (same file):
 *   --server gpio|sample PATH MAX_XFER        the server process; READY, then SERVER {json} at disconnect
 *   --run rt ITERS WARMUP BATCH BATCHES BATCH_WARMUP
 *   --run dma CHUNK CMD_LEN CMDS WARMUP_CMDS
 *   --run mapped TOTAL
 * Each --run prints RESULT {json}. VDEVKIT_BENCH_SERVER_NODE_FLAGS (e.g.
 * "--cpu-prof --cpu-prof-dir=DIR") is passed to the server's node.
 * VDEVKIT_BENCH_DMA_DIRS (e.g. "read" or "read,fill") limits --run dma to
 * those directions. --run dma also reports the server's CPU time within
 * each direction's timed commands (read_server_cpu_us ..., from /proc
 * schedstat of every server thread), beside the client's.
 */
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { randomFillSync } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { EventFd, SharedMemory } from '../src/sys/index.js';
import { gpioDevice } from '../src/devices/gpio.js';
import { sampleDevice, SampleReg, SampleStatus, type SampleDevice } from '../src/devices/sample.js';
import { VfioUserServer } from '../src/vfio-user/server.js';
import { VfioUserClient } from '../src/vfio-user/client.js';
import { VfioUserDevice } from '../src/vfio-user/client-device.js';
import { DEFAULT_MAX_DATA_XFER_SIZE } from '../src/vfio-user/constants.js';
import { PciIrq } from '../src/vfio/uapi.js';
import type { VfioUserDeviceSpec } from '../src/vfio-user/device.js';
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

const GPIO_REGION = 2;
const GPIO_OFFSET = 4; // not 0: a read of offset 0 runs the gpio input counter
/** FD_EVERY for the transport contenders: larger than any run, so only message 0 carries an fd. */
const NO_FD_EVERY = 1_000_000_000;
const IOVA_MSG = 0x1000_0000;
const IOVA_FD = 0x2000_0000;
const SAMPLE_BAR2 = 2;

/* ------------------------------------------------------------------ */
/* The server process (--server)                                       */

function runServer(kind: string, sockPath: string, maxXfer: number): void {
  const counters = { reads: 0, writes: 0, bad_writes: 0, last_value: -1 };
  let sample: SampleDevice | null = null;
  let spec: VfioUserDeviceSpec;
  if (kind === 'gpio') {
    const g = gpioDevice();
    const r2 = g.regions![GPIO_REGION]!;
    const read = r2.read!.bind(r2);
    const write = r2.write!.bind(r2);
    r2.read = (offset, out) => {
      counters.reads++;
      read(offset, out);
    };
    r2.write = (offset, data) => {
      counters.writes++;
      const v = data.length === 4 ? (data[0]! | (data[1]! << 8) | (data[2]! << 16) | (data[3]! << 24)) >>> 0 : -1;
      if (offset !== GPIO_OFFSET || v !== counters.last_value + 1) counters.bad_writes++;
      counters.last_value = v;
      write(offset, data);
    };
    spec = g;
  } else if (kind === 'sample') {
    sample = sampleDevice();
    spec = sample;
  } else {
    throw new Error(`unknown device ${kind}`);
  }
  const server = VfioUserServer.listen(sockPath, { device: spec, maxDataXferSize: maxXfer });
  let cpu0 = process.cpuUsage();
  server.on('session', (session) => {
    cpu0 = process.cpuUsage();
    session.conn.on('close', () => {
      const cpu = process.cpuUsage(cpu0);
      const report: Record<string, unknown> = { ...counters, cpu_user_us: cpu.user, cpu_sys_us: cpu.system };
      if (sample) {
        const r = sample.registers;
        report['dma_count'] = r.dmaCount;
        report['dma_status'] = r.dmaStatus;
        report['dma_errno'] = r.dmaErrno;
        report['windows'] = sample.unmapped.map((w) => ({ iova: w.iova, size: w.size, mapped: w.mapped }));
      }
      process.stdout.write(`SERVER ${JSON.stringify(report)}\n`);
      server.close();
      sample?.dispose();
      process.exit(0);
    });
  });
  process.stdout.write('READY\n');
}

interface ServerChild {
  path: string;
  /** CPU time the server process has used so far, all its threads, in ns (/proc schedstat, ns resolution). */
  cpuNs(): number;
  /** The SERVER report, once the server process has exited. */
  report: Promise<Record<string, unknown>>;
  cleanup(): void;
}

function serverNodeFlags(): string[] {
  const s = process.env['VDEVKIT_BENCH_SERVER_NODE_FLAGS'];
  return s ? s.split(/\s+/).filter((x) => x !== '') : [];
}

async function startServer(kind: 'gpio' | 'sample', maxXfer: number): Promise<ServerChild> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdevkit-bench-client-'));
  const sockPath = path.join(dir, `${kind}.sock`);
  const child = spawn(process.execPath, [...serverNodeFlags(), THIS_FILE, '--server', kind, sockPath, String(maxXfer)], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  let out = '';
  child.stdout.setEncoding('utf8');
  const ready = new Promise<void>((resolve, reject) => {
    child.stdout.on('data', (s: string) => {
      out += s;
      if (out.includes('READY\n')) resolve();
    });
    child.on('error', reject);
    child.on('exit', (code) => reject(new Error(`server process exited (${code}) before READY`)));
  });
  const report = new Promise<Record<string, unknown>>((resolve, reject) => {
    child.on('close', (code) => {
      const line = out.split('\n').find((l) => l.startsWith('SERVER '));
      if (code !== 0 || !line) reject(new Error(`server process failed (exit ${code})\n${out}`));
      else resolve(JSON.parse(line.slice(7)) as Record<string, unknown>);
    });
  });
  report.catch(() => {}); // awaited later
  await ready;
  const pid = child.pid!;
  return { path: sockPath, report, cpuNs: () => processCpuNs(pid), cleanup: () => fs.rmSync(dir, { recursive: true, force: true }) };
}

/**
 * CPU time of every thread of `pid` so far, in ns: the first field of each
 * /proc/PID/task/TID/schedstat (run time, ns resolution, unlike the 10 ms
 * ticks of /proc/PID/stat). A thread that exits meanwhile is left out.
 */
function processCpuNs(pid: number): number {
  let ns = 0;
  for (const tid of fs.readdirSync(`/proc/${pid}/task`)) {
    try {
      ns += Number(fs.readFileSync(`/proc/${pid}/task/${tid}/schedstat`, 'utf8').split(' ')[0]);
    } catch {
      // gone
    }
  }
  return ns;
}

/* ------------------------------------------------------------------ */
/* (a) round trips: --run rt                                           */

async function runRt(iters: number, warmup: number, batch: number, batches: number, batchWarmup: number): Promise<void> {
  const srv = await startServer('gpio', DEFAULT_MAX_DATA_XFER_SIZE);
  const client = await VfioUserClient.connect(srv.path);
  if (!client.postedWrites || !client.serverCaps.writeMultiple) throw new Error('posted writes / WRITE_MULTI not negotiated');
  let reads = 0;
  const read = async (): Promise<void> => {
    const d = await client.regionRead(GPIO_REGION, GPIO_OFFSET, 4);
    reads++;
    if (d.length !== 4 || (d[0]! | d[1]! | d[2]! | d[3]!) !== 0) throw new Error(`REGION_READ returned ${Buffer.from(d).toString('hex')}`);
  };
  for (let i = 0; i < warmup; i++) await read();
  let cpu0 = process.cpuUsage();
  let t0 = process.hrtime.bigint();
  for (let i = 0; i < iters; i++) await read();
  const readNs = process.hrtime.bigint() - t0;
  const readCpu = process.cpuUsage(cpu0);

  let seq = 0;
  const buf = new Uint8Array(4);
  const dv = new DataView(buf.buffer);
  const fail = (err: unknown): never => {
    throw err;
  };
  /** BATCH posted writes, then one read to sync. */
  const postBatch = async (each: boolean): Promise<void> => {
    for (let k = 0; k < batch; k++) {
      dv.setUint32(0, seq++, true);
      if (each) await client.regionWrite(GPIO_REGION, GPIO_OFFSET, buf, { posted: true });
      else client.regionWrite(GPIO_REGION, GPIO_OFFSET, buf, { posted: true }).catch(fail);
    }
    await read();
  };
  const writes: Record<string, { ns: bigint; cpu: NodeJS.CpuUsage }> = {};
  for (const mode of ['coalesced', 'each'] as const) {
    const each = mode === 'each';
    for (let b = 0; b < batchWarmup; b++) await postBatch(each);
    cpu0 = process.cpuUsage();
    t0 = process.hrtime.bigint();
    for (let b = 0; b < batches; b++) await postBatch(each);
    writes[mode] = { ns: process.hrtime.bigint() - t0, cpu: process.cpuUsage(cpu0) };
  }
  client.close();
  const server = await srv.report;
  srv.cleanup();
  const sentWrites = seq;
  if (server['reads'] !== reads) throw new Error(`the server served ${server['reads']} reads, we sent ${reads}`);
  if (server['writes'] !== sentWrites || server['bad_writes'] !== 0 || server['last_value'] !== sentWrites - 1) {
    throw new Error(`posted writes: sent ${sentWrites}, server reports ${JSON.stringify(server)}`);
  }
  const total = batch * batches;
  const perWrite = (m: string): number => Number(writes[m]!.ns) / total;
  printResult('vfio', iters, readNs, {
    read_cpu_us_per_rt: Number(((readCpu.user + readCpu.system) / iters).toFixed(3)),
    batch,
    batches,
    coalesced_ns_per_write: Number(perWrite('coalesced').toFixed(1)),
    coalesced_writes_per_s: Math.round(1e9 / perWrite('coalesced')),
    each_ns_per_write: Number(perWrite('each').toFixed(1)),
    each_writes_per_s: Math.round(1e9 / perWrite('each')),
    each_client_cpu_ns_per_write: Number((((writes['each']!.cpu.user + writes['each']!.cpu.system) * 1000) / total).toFixed(1)),
    server_reads: server['reads'],
    server_writes: server['writes'],
  });
}

/* ------------------------------------------------------------------ */
/* (b) message DMA: --run dma                                          */

function u32le(v: number): Uint8Array {
  const b = new Uint8Array(4);
  new DataView(b.buffer).setUint32(0, v >>> 0, true);
  return b;
}

function u64le(v: number): Uint8Array {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setBigUint64(0, BigInt(v), true);
  return b;
}

function same(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && Buffer.from(a.buffer, a.byteOffset, a.length).equals(Buffer.from(b.buffer, b.byteOffset, b.length));
}

async function runDma(chunk: number, cmdLen: number, cmds: number, warmCmds: number): Promise<void> {
  const srv = await startServer('sample', chunk);
  const client = await VfioUserClient.connect(srv.path, { maxDataXferSize: chunk });
  if (client.maxXfer !== chunk) throw new Error(`server max_data_xfer_size ${client.maxXfer}, wanted ${chunk}`);
  const dev = new VfioUserDevice(client);
  const done = EventFd.create();
  const err = EventFd.create();
  await dev.setEventFds(PciIrq.MSIX, 0, [done]);
  await dev.setEventFds(PciIrq.ERR, 0, [err]);
  let waiting: { resolve: () => void; reject: (e: Error) => void } | null = null;
  const unsubDone = done.subscribe(() => {
    const w = waiting;
    waiting = null;
    w?.resolve();
  });
  const unsubErr = err.subscribe(() => {
    const w = waiting;
    waiting = null;
    w?.reject(new Error('the DMA command failed (ERR interrupt)'));
  });

  const msgMem = SharedMemory.create(cmdLen, { name: 'bench-dma-msg' });
  const fdMem = SharedMemory.create(cmdLen, { name: 'bench-dma-fd' });
  await client.dmaMap({ iova: IOVA_MSG, size: cmdLen, memory: msgMem, passFd: false });
  await client.dmaMap({ iova: IOVA_FD, size: cmdLen, memory: fdMem });
  const patterns = [randomFillSync(new Uint8Array(cmdLen)), randomFillSync(new Uint8Array(cmdLen))];
  await client.regionWrite(0, SampleReg.DMA_LEN, u32le(cmdLen));

  let commands = 0;
  /**
   * One DMA command (a copy from src to dst, or with `fill` a fill of dst with FILL_PATTERN);
   * returns its ns (command register write to completion interrupt).
   */
  const command = async (src: number, dst: number, fill = false): Promise<{ ns: bigint; cpu: number; serverCpuNs: number }> => {
    await client.regionWrite(0, SampleReg.DMA_SRC, u64le(src));
    await client.regionWrite(0, SampleReg.DMA_DST, u64le(dst));
    const finished = new Promise<void>((resolve, reject) => (waiting = { resolve, reject }));
    const server0 = srv.cpuNs();
    const cpu0 = process.cpuUsage();
    const t0 = process.hrtime.bigint();
    await client.regionWrite(0, fill ? SampleReg.FILL_CMD : SampleReg.DMA_CMD, u32le(1));
    await finished;
    const ns = process.hrtime.bigint() - t0;
    const serverCpuNs = srv.cpuNs() - server0;
    const cpu = process.cpuUsage(cpu0);
    commands++;
    const status = new DataView((await client.regionRead(0, SampleReg.DMA_STATUS, 4)).slice().buffer).getUint32(0, true);
    if (status !== SampleStatus.DONE) throw new Error(`DMA_STATUS 0x${status.toString(16)} after a command`);
    await client.regionWrite(0, SampleReg.DMA_STATUS, u32le(SampleStatus.DONE));
    return { ns, cpu: cpu.user + cpu.system, serverCpuNs };
  };

  // VDEVKIT_BENCH_DMA_DIRS (e.g. "read"): only those directions, for A/B runs of one of them.
  const all = ['read', 'write', 'fill'] as const;
  const only = process.env['VDEVKIT_BENCH_DMA_DIRS']?.split(',');
  const dirs = only ? all.filter((d) => only.includes(d)) : all;
  const ns = { read: 0n, write: 0n, fill: 0n };
  const cpu = { read: 0, write: 0, fill: 0 };
  const serverCpu = { read: 0, write: 0, fill: 0 };
  // fill: DMA_WRITE of the device's own memory (a buffer the sample device keeps per pattern),
  // which is copied into the socket, not spliced: only data in a window shared by fd is.
  const FILL = 0xa5c3_0f96;
  const fillWord = Buffer.alloc(4);
  fillWord.writeUInt32LE(FILL);
  const filled = Buffer.alloc(cmdLen).fill(fillWord);
  await client.regionWrite(0, SampleReg.FILL_PATTERN, u32le(FILL));
  for (let i = 0; i < warmCmds + cmds; i++) {
    const p = patterns[i & 1]!;
    for (const dir of dirs) {
      if (dir === 'fill') {
        msgMem.bytes.fill(0);
        const r = await command(0, IOVA_MSG, true);
        if (!same(msgMem.bytes, filled)) throw new Error(`DMA fill: the destination differs from the pattern after command ${i}`);
        if (i >= warmCmds) {
          ns.fill += r.ns;
          cpu.fill += r.cpu;
          serverCpu.fill += r.serverCpuNs;
        }
        continue;
      }
      // read: the message window is the source (DMA_READ); write: it is the destination (DMA_WRITE).
      const [srcMem, dstMem, src, dst] = dir === 'read' ? [msgMem, fdMem, IOVA_MSG, IOVA_FD] : [fdMem, msgMem, IOVA_FD, IOVA_MSG];
      srcMem.bytes.set(p);
      dstMem.bytes.fill(0);
      const r = await command(src, dst);
      if (!same(dstMem.bytes, p)) throw new Error(`DMA ${dir}: the destination differs from the source after command ${i}`);
      if (i >= warmCmds) {
        ns[dir] += r.ns;
        cpu[dir] += r.cpu;
        serverCpu[dir] += r.serverCpuNs;
      }
    }
  }
  const count = new DataView((await client.regionRead(0, SampleReg.DMA_COUNT, 4)).slice().buffer).getUint32(0, true);
  if (count !== commands) throw new Error(`DMA_COUNT ${count}, ${commands} commands ran`);
  unsubDone();
  unsubErr();
  client.close();
  const server = await srv.report;
  srv.cleanup();
  done.close();
  err.close();
  msgMem.close();
  fdMem.close();
  const windows = server['windows'] as { iova: number; mapped: boolean }[];
  const byFd = windows.filter((w) => w.mapped).map((w) => w.iova);
  if (windows.length !== 2 || byFd.length !== 1 || byFd[0] !== IOVA_FD) throw new Error(`server windows ${JSON.stringify(windows)}`);
  const bytes = cmdLen * cmds;
  printResult('dma', cmds * 3, ns.read + ns.write + ns.fill, {
    chunk,
    bytes,
    read_ns: Number(ns.read),
    write_ns: Number(ns.write),
    read_gb_s: Number((bytes / Number(ns.read)).toFixed(3)),
    write_gb_s: Number((bytes / Number(ns.write)).toFixed(3)),
    fill_ns: Number(ns.fill),
    fill_gb_s: Number((bytes / Number(ns.fill)).toFixed(3)),
    read_client_cpu_us: cpu.read,
    write_client_cpu_us: cpu.write,
    fill_client_cpu_us: cpu.fill,
    read_server_cpu_us: Math.round(serverCpu.read / 1000),
    write_server_cpu_us: Math.round(serverCpu.write / 1000),
    fill_server_cpu_us: Math.round(serverCpu.fill / 1000),
    server_cpu_us: Number(server['cpu_user_us']) + Number(server['cpu_sys_us']),
    dma_count: count,
  });
}

/* ------------------------------------------------------------------ */
/* (c) mapped copies: --run mapped                                     */

/** Least untimed calls before a timed mapped-copy loop (see runMapped's time()). */
const MAPPED_WARM_CALLS = 1 << 19;

async function runMapped(total: number): Promise<void> {
  const srv = await startServer('sample', DEFAULT_MAX_DATA_XFER_SIZE);
  const client = await VfioUserClient.connect(srv.path);
  const dev = new VfioUserDevice(client);
  const region = await dev.regionInfo(SAMPLE_BAR2);
  if (region.mapped.length !== 2) throw new Error(`BAR2: ${region.mapped.length} mapped areas`);
  const out: Record<string, number> = {};
  const time = (n: number, fn: (i: number) => void): number => {
    // Untimed calls first, enough for V8 to have tiered the loop up: with a tenth of 65 536
    // calls (1 GiB in 16 KiB blocks) the timed loop still ran partly unoptimized, 30-40% slower
    // than its steady state (measured: 40-58 GB/s after that warm-up, 68-70 after 200 000 calls).
    const warm = Math.max(Math.floor(n / 10) + 1, MAPPED_WARM_CALLS);
    for (let i = 0; i < warm; i++) fn(i);
    const t0 = process.hrtime.bigint();
    for (let i = warm; i < warm + n; i++) fn(i);
    return Number(process.hrtime.bigint() - t0);
  };
  for (const area of region.mapped) {
    const block = area.size;
    const n = Math.ceil(total / block);
    const bytes = area.memory.bytes;
    if (bytes.length !== block) throw new Error('area mapping size');
    // The device's memory, written by message, seen through the mapping.
    const expect = randomFillSync(new Uint8Array(block));
    await client.regionWrite(SAMPLE_BAR2, area.offset, expect);
    const srcs = [randomFillSync(new Uint8Array(block)), randomFillSync(new Uint8Array(block))];
    const local = new Uint8Array(block);
    let last: Uint8Array = local;

    // set: Uint8Array.set of the whole area per call
    const readSet = time(n, () => local.set(bytes));
    if (!same(local, expect)) throw new Error(`set read of area ${area.offset}: differs from the device's memory`);
    const writeSet = time(n, (i) => bytes.set((last = srcs[i & 1]!)));
    if (!same(await client.regionRead(SAMPLE_BAR2, area.offset, block), last)) throw new Error(`set write of area ${area.offset}: the device's memory differs`);

    // api: VfioUserDevice.read / write (synchronous once the range is mapped; awaited as an API user would)
    await client.regionWrite(SAMPLE_BAR2, area.offset, expect);
    const warm = Math.floor(n / 10) + 1;
    let got: Uint8Array = local;
    let t0 = 0n;
    for (let i = 0; i < warm + n; i++) {
      if (i === warm) t0 = process.hrtime.bigint();
      got = await dev.read(SAMPLE_BAR2, area.offset, block);
    }
    const readApi = Number(process.hrtime.bigint() - t0);
    if (!same(got, expect)) throw new Error(`api read of area ${area.offset}: differs from the device's memory`);
    for (let i = 0; i < warm + n; i++) {
      if (i === warm) t0 = process.hrtime.bigint();
      await dev.write(SAMPLE_BAR2, area.offset, (last = srcs[i & 1]!));
    }
    const writeApi = Number(process.hrtime.bigint() - t0);
    if (!same(await client.regionRead(SAMPLE_BAR2, area.offset, block), last)) throw new Error(`api write of area ${area.offset}: the device's memory differs`);

    const b = n * block;
    const k = `b${block}`;
    out[`${k}_offset`] = area.offset;
    out[`${k}_bytes`] = b;
    out[`${k}_set_read_gb_s`] = b / readSet;
    out[`${k}_set_write_gb_s`] = b / writeSet;
    out[`${k}_api_read_gb_s`] = b / readApi;
    out[`${k}_api_write_gb_s`] = b / writeApi;
  }
  dev.close();
  client.close();
  await srv.report;
  srv.cleanup();
  printResult('mapped', 1, 1n, out);
}

/* ------------------------------------------------------------------ */
/* The driver                                                          */

const PARTS = ['rt', 'dma', 'mapped'] as const;
type Part = (typeof PARTS)[number];

interface Options {
  rounds: number;
  setups: string[];
  only: Part[];
  iters: number;
  warmup: number;
  batch: number;
  batches: number;
  batchWarmup: number;
  chunks: number[];
  dmaBytes: number;
  cmdLen: number;
  /**
   * Untimed DMA commands per direction first; -1 (default): enough for 8192
   * messages or 4 GiB, whichever is less (V8 needs thousands of messages
   * before the whole path runs optimized code; see docs/benchmarks.md).
   */
  dmaWarmup: number;
  mappedBytes: number;
}

function parseOptions(argv: string[]): Options {
  const o: Options = {
    rounds: 5,
    setups: ['pinned', 'unpinned'],
    only: [...PARTS],
    iters: 10000,
    warmup: 5000,
    batch: 200,
    batches: 50,
    batchWarmup: 10,
    chunks: [65536, 1 << 20],
    dmaBytes: 64 << 20,
    cmdLen: 8 << 20,
    dmaWarmup: -1,
    mappedBytes: 1 << 30,
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    const v = argv[i + 1];
    const num = (): number => {
      const n = Number(v);
      if (!Number.isSafeInteger(n) || n < 0) throw new Error(`${a} needs a non-negative integer`);
      i++;
      return n;
    };
    const list = (): string[] => {
      if (!v) throw new Error(`${a} needs a list`);
      i++;
      return v.split(',');
    };
    if (a === '--rounds') o.rounds = Math.max(1, num());
    else if (a === '--setups') o.setups = list();
    else if (a === '--only') o.only = list().filter((p): p is Part => (PARTS as readonly string[]).includes(p));
    else if (a === '--iters') o.iters = Math.max(1, num());
    else if (a === '--warmup') o.warmup = num();
    else if (a === '--batch') o.batch = Math.max(1, num());
    else if (a === '--batches') o.batches = Math.max(1, num());
    else if (a === '--batch-warmup') o.batchWarmup = num();
    else if (a === '--chunks') o.chunks = list().map(Number);
    else if (a === '--dma-bytes') o.dmaBytes = Math.max(1, num());
    else if (a === '--cmd-len') o.cmdLen = Math.max(1, num());
    else if (a === '--dma-warmup') o.dmaWarmup = num();
    else if (a === '--mapped-bytes') o.mappedBytes = Math.max(1, num());
    else throw new Error(`unknown argument ${a}`);
  }
  for (const s of o.setups) if (s !== 'pinned' && s !== 'unpinned') throw new Error(`unknown setup ${s}`);
  if (o.only.length === 0) throw new Error(`--only wants some of ${PARTS.join(',')}`);
  for (const c of o.chunks) {
    if (!Number.isInteger(c) || c < 4096 || o.cmdLen % c !== 0) throw new Error(`chunk ${c}: at least 4096 and dividing --cmd-len`);
  }
  if (o.dmaBytes % o.cmdLen !== 0) throw new Error('--dma-bytes must be a multiple of --cmd-len');
  if (o.cmdLen > 16 << 20) throw new Error('--cmd-len at most 16 MiB (the sample device refuses longer commands)');
  return o;
}

const fmt = (n: number, digits = 1): string => (Number.isFinite(n) ? n.toFixed(digits) : '-');
const kib = (n: number): string => (n >= 1 << 20 ? `${n / (1 << 20)} MiB` : `${n / 1024} KiB`);

/** The median of the per-round ratios a[i]/b[i] (each round ran both back to back). */
function paired(a: number[], b: number[]): number {
  return median(a.map((v, i) => v / b[i]!));
}

async function driver(argv: string[]): Promise<void> {
  const o = parseOptions(argv);
  const transportBin = compileReference('transport');
  const copyBin = compileReference('copy');
  const allCpus = `0-${os.cpus().length - 1}`;
  console.log('bench/vfio-user-client: the vfio-user client against the transport, a UNIX socket and memcpy in C');
  console.log(`machine: nproc ${os.cpus().length} (${os.cpus()[0]?.model ?? 'unknown CPU'}), node ${process.version}, linux ${os.release()}`);
  console.log(
    `driver allowed CPUs: ${allowedCpus()}; ${o.rounds} rounds; parts ${o.only.join(',')}; rt: ${o.iters} reads after ${o.warmup}, ` +
      `${o.batches} x ${o.batch} posted writes; dma: ${kib(o.dmaBytes)} per direction in ${kib(o.cmdLen)} commands after ${o.dmaWarmup >= 0 ? o.dmaWarmup : 'min(8192 messages, 4 GiB) of'} untimed, chunks ${o.chunks.map(kib).join(', ')}; ` +
      `mapped: ${kib(o.mappedBytes)} per loop`,
  );
  console.log(`uptime before: ${uptime()}`);
  const started = Date.now();
  const cmds = o.dmaBytes / o.cmdLen;
  const rtRows: string[][] = [];
  const dmaRows: string[][] = [];
  const mapRows: string[][] = [];
  const details: string[] = [];
  const summary: Record<string, unknown>[] = [];

  for (const setup of o.setups) {
    const cpus = setup === 'pinned' ? '0' : allCpus;
    const load1 = os.loadavg()[0]!;
    const rt = { c: [] as number[], raw: [] as number[], read: [] as number[], coalesced: [] as number[], each: [] as number[] };
    type DmaRounds = { stream: number[]; window: number[]; rpc: number[]; read: number[]; write: number[]; fill: number[]; cpu: string[] };
    const dma = new Map<number, DmaRounds>();
    for (const c of o.chunks) dma.set(c, { stream: [], window: [], rpc: [], read: [], write: [], fill: [], cpu: [] });
    const mapped = new Map<number, Record<string, number[]>>();

    for (let round = 0; round < o.rounds; round++) {
      if (o.only.includes('rt')) {
        const common = [String(o.iters), String(o.warmup), String(NO_FD_EVERY)];
        const c = await runContender(transportBin, common, { cpus });
        checkTransport('c', c, o);
        const raw = await runContender(process.execPath, [TRANSPORT_JS, '--run', 'raw', ...common], { cpus });
        checkTransport('raw', raw, o);
        const v = await runContender(
          process.execPath,
          [THIS_FILE, '--run', 'rt', String(o.iters), String(o.warmup), String(o.batch), String(o.batches), String(o.batchWarmup)],
          { cpus },
        );
        if (v.impl !== 'vfio' || v.iters !== o.iters) throw new Error(`rt contender reported ${JSON.stringify(v)}`);
        rt.c.push(c.us_per_rt);
        rt.raw.push(raw.us_per_rt);
        rt.read.push(v.us_per_rt);
        rt.coalesced.push(Number(v['coalesced_ns_per_write']) / 1000);
        rt.each.push(Number(v['each_ns_per_write']) / 1000);
      }
      if (o.only.includes('dma')) {
        for (const chunk of o.chunks) {
          const d = dma.get(chunk)!;
          // WARMUP = one command's bytes; WINDOW = the command length (the DMA windows' size).
          const c = await runContender(copyBin, ['socket', String(chunk), String(o.dmaBytes), String(o.cmdLen), String(o.cmdLen)], { cpus });
          if (c.impl !== 'c-socket' || c['bytes'] !== o.dmaBytes || c['window'] !== o.cmdLen) throw new Error(`copy socket reported ${JSON.stringify(c)}`);
          const warm = o.dmaWarmup >= 0 ? o.dmaWarmup : Math.ceil(Math.min(8192 * chunk, 4 * 2 ** 30) / o.cmdLen);
          const v = await runContender(process.execPath, [THIS_FILE, '--run', 'dma', String(chunk), String(o.cmdLen), String(cmds), String(warm)], {
            cpus,
          });
          if (v.impl !== 'dma' || v['chunk'] !== chunk || v['bytes'] !== o.dmaBytes) throw new Error(`dma contender reported ${JSON.stringify(v)}`);
          d.stream.push(o.dmaBytes / Number(c['stream_ns']));
          d.window.push(o.dmaBytes / Number(c['window_ns']));
          d.rpc.push(o.dmaBytes / Number(c['rpc_ns']));
          d.read.push(Number(v['read_gb_s']));
          d.write.push(Number(v['write_gb_s']));
          d.fill.push(Number(v['fill_gb_s']));
          // CPU us per message, client/server, per direction; and the C stream's writer per chunk.
          const msgs = o.dmaBytes / chunk;
          const per = (k: string): string => fmt(Number(v[k]) / msgs, 1);
          d.cpu.push(
            `R ${per('read_client_cpu_us')}/${per('read_server_cpu_us')} W ${per('write_client_cpu_us')}/${per('write_server_cpu_us')} ` +
              `F ${per('fill_client_cpu_us')}/${per('fill_server_cpu_us')} C ${fmt(Number(c['stream_parent_cpu_us']) / msgs, 1)}`,
          );
        }
      }
      if (o.only.includes('mapped')) {
        const cs: RunResult[] = [];
        for (const [block, offset] of [
          [16384, 0],
          [32768, 32768],
        ] as const) {
          const c = await runContender(copyBin, ['memcpy', String(block), String(offset), String(o.mappedBytes)], { cpus });
          if (c.impl !== 'c-memcpy' || c['block'] !== block) throw new Error(`copy memcpy reported ${JSON.stringify(c)}`);
          cs.push(c);
        }
        const v = await runContender(process.execPath, [THIS_FILE, '--run', 'mapped', String(o.mappedBytes)], { cpus });
        for (const c of cs) {
          const block = Number(c['block']);
          const k = `b${block}`;
          if (v[`${k}_bytes`] !== Number(c['bytes'])) throw new Error(`mapped contender: ${k} moved ${String(v[`${k}_bytes`])} bytes, C ${String(c['bytes'])}`);
          if (!mapped.has(block)) mapped.set(block, { cRead: [], cWrite: [], setRead: [], setWrite: [], apiRead: [], apiWrite: [] });
          const m = mapped.get(block)!;
          m['cRead']!.push(Number(c['bytes']) / Number(c['read_ns']));
          m['cWrite']!.push(Number(c['bytes']) / Number(c['write_ns']));
          m['setRead']!.push(Number(v[`${k}_set_read_gb_s`]));
          m['setWrite']!.push(Number(v[`${k}_set_write_gb_s`]));
          m['apiRead']!.push(Number(v[`${k}_api_read_gb_s`]));
          m['apiWrite']!.push(Number(v[`${k}_api_write_gb_s`]));
        }
      }
    }

    const result: Record<string, unknown> = { setup, load1 };
    if (o.only.includes('rt')) {
      const m = (a: number[]): number => median(a);
      rtRows.push([
        setup,
        fmt(load1, 2),
        fmt(m(rt.c)),
        fmt(m(rt.raw)),
        fmt(m(rt.read)),
        fmt(m(rt.read) / m(rt.raw), 2),
        fmt(paired(rt.read, rt.raw), 2),
        fmt(m(rt.read) / m(rt.c), 2),
        fmt(m(rt.coalesced), 2),
        fmt(1e6 / m(rt.coalesced) / 1000, 0),
        fmt(m(rt.each), 1),
        fmt(1e6 / m(rt.each) / 1000, 0),
        fmt(m(rt.each) / m(rt.raw), 2),
      ]);
      details.push(`  ${setup.padEnd(8)} rt us per round: C ${rt.c.map((x) => fmt(x)).join(' ')}; raw ${rt.raw.map((x) => fmt(x)).join(' ')}; read ${rt.read.map((x) => fmt(x)).join(' ')}; posted each ${rt.each.map((x) => fmt(x)).join(' ')}`);
      result['rt'] = rt;
    }
    if (o.only.includes('dma')) {
      for (const [chunk, d] of dma) {
        const m = median;
        dmaRows.push([
          setup,
          fmt(load1, 2),
          kib(chunk),
          fmt(m(d.stream), 2),
          fmt(m(d.window), 2),
          fmt(m(d.rpc), 2),
          fmt(m(d.read), 2),
          fmt(m(d.write), 2),
          fmt(m(d.read) / m(d.stream), 2),
          fmt(m(d.write) / m(d.stream), 2),
          fmt(paired(d.read, d.stream), 2),
          fmt(paired(d.write, d.stream), 2),
          fmt(m(d.read) / m(d.window), 2),
          fmt(m(d.write) / m(d.window), 2),
          fmt(m(d.fill), 2),
          fmt(m(d.fill) / m(d.stream), 2),
          fmt(paired(d.fill, d.stream), 2),
        ]);
        details.push(
          `  ${setup.padEnd(8)} dma ${kib(chunk)} GB/s per round: stream ${d.stream.map((x) => fmt(x, 2)).join(' ')}; window ${d.window.map((x) => fmt(x, 2)).join(' ')}; ` +
            `rpc ${d.rpc.map((x) => fmt(x, 2)).join(' ')}; DMA_READ ${d.read.map((x) => fmt(x, 2)).join(' ')}; DMA_WRITE ${d.write.map((x) => fmt(x, 2)).join(' ')}; ` +
            `fill ${d.fill.map((x) => fmt(x, 2)).join(' ')}`,
          `  ${setup.padEnd(8)} dma ${kib(chunk)} CPU us per message, client/server (C: the stream's sending side per chunk), per round: ${d.cpu.join('; ')}`,
        );
      }
      result['dma'] = Object.fromEntries(dma);
    }
    if (o.only.includes('mapped')) {
      for (const [block, mm] of mapped) {
        const m = (k: string): number => median(mm[k]!);
        mapRows.push([
          setup,
          kib(block),
          fmt(m('cRead'), 1),
          fmt(m('setRead'), 1),
          fmt(m('setRead') / m('cRead'), 2),
          fmt(paired(mm['setRead']!, mm['cRead']!), 2),
          fmt(m('apiRead'), 1),
          fmt(m('apiRead') / m('cRead'), 2),
          fmt(m('cWrite'), 1),
          fmt(m('setWrite'), 1),
          fmt(m('setWrite') / m('cWrite'), 2),
          fmt(paired(mm['setWrite']!, mm['cWrite']!), 2),
          fmt(m('apiWrite'), 1),
          fmt(m('apiWrite') / m('cWrite'), 2),
        ]);
        details.push(`  ${setup.padEnd(8)} mapped ${kib(block)} GB/s per round: C read ${mm['cRead']!.map((x) => fmt(x)).join(' ')}; set read ${mm['setRead']!.map((x) => fmt(x)).join(' ')}; C write ${mm['cWrite']!.map((x) => fmt(x)).join(' ')}; set write ${mm['setWrite']!.map((x) => fmt(x)).join(' ')}`);
      }
      result['mapped'] = Object.fromEntries(mapped);
    }
    summary.push(result);
  }

  console.log('');
  if (rtRows.length > 0) {
    console.log('(a) round trips, us (medians); posted writes: us per write and thousands of writes/s');
    console.log(
      formatTable(
        ['setup', 'load1', 'C rt', 'raw rt', 'regionRead', 'read/raw', 'paired', 'read/C', 'posted coalesced', 'k/s', 'posted each', 'k/s', 'each/raw'],
        rtRows,
      ),
    );
    console.log('');
  }
  if (dmaRows.length > 0) {
    console.log(
      '(b) message DMA, GB/s (1e9 bytes/s, medians): C over a socketpair (stream: one hot buffer; window: through DMA-window-sized mappings; rpc) ' +
        'against DMA_READ / DMA_WRITE served by the client. DMA_WRITE sends data from a window the client shared by fd (spliced); ' +
        '"fill" is DMA_WRITE of the device\'s own memory (copied)',
    );
    console.log(
      formatTable(
        ['setup', 'load1', 'chunk', 'C stream', 'C window', 'C rpc', 'DMA_READ', 'DMA_WRITE', 'R/stream', 'W/stream', 'R paired', 'W paired', 'R/window', 'W/window', 'fill', 'F/stream', 'F paired'],
        dmaRows,
      ),
    );
    console.log('');
  }
  if (mapRows.length > 0) {
    console.log('(c) mapped BAR2 copies, GB/s (medians): C memcpy against Uint8Array.set ("set") and VfioUserDevice.read/write ("api")');
    console.log(
      formatTable(
        ['setup', 'block', 'C read', 'set read', 'set/C', 'paired', 'api read', 'api/C', 'C write', 'set write', 'set/C', 'paired', 'api write', 'api/C'],
        mapRows,
      ),
    );
    console.log('');
  }
  console.log('Per-round figures:');
  for (const d of details) console.log(d);
  console.log(`uptime after: ${uptime()}`);
  console.log(`total ${((Date.now() - started) / 1000).toFixed(1)} s`);
  console.log(`BENCH ${JSON.stringify({ bench: 'vfio-user-client', nproc: os.cpus().length, options: o, results: summary })}`);
}

function checkTransport(c: string, r: RunResult, o: Options): void {
  const expectFds = Math.ceil((o.warmup + o.iters) / NO_FD_EVERY);
  if (r.impl !== c || r.iters !== o.iters || r['fds_sent'] !== expectFds || r['fds_received'] !== expectFds || r['fd_leak'] !== 0) {
    throw new Error(`transport contender ${c} reported ${JSON.stringify(r)}`);
  }
}

/* ------------------------------------------------------------------ */

if (process.argv[1] === THIS_FILE) {
  const [mode, ...rest] = process.argv.slice(2);
  const n = (i: number): number => {
    const v = Number(rest[i]);
    if (!Number.isSafeInteger(v) || v < 0) throw new Error(`argument ${i + 1} of ${mode}: ${rest[i]}`);
    return v;
  };
  let main: Promise<void>;
  if (mode === '--server') {
    main = Promise.resolve().then(() => runServer(rest[0]!, rest[1]!, Number(rest[2])));
  } else if (mode === '--run' && rest[0] === 'rt') {
    rest.shift();
    main = runRt(n(0), n(1), n(2), n(3), n(4));
  } else if (mode === '--run' && rest[0] === 'dma') {
    rest.shift();
    main = runDma(n(0), n(1), n(2), n(3));
  } else if (mode === '--run' && rest[0] === 'mapped') {
    rest.shift();
    main = runMapped(n(0));
  } else {
    main = driver(process.argv.slice(2));
  }
  main.catch((err: unknown) => {
    console.error(err instanceof Error ? (err.stack ?? err.message) : err);
    process.exit(1);
  });
}
