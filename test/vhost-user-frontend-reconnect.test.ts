/**
 * VirtioBlkDriver reconnect (QEMU's vhost-user-blk reconnect, libblkio's
 * model: the driver keeps its memory, rings and the inflight region across
 * connections) against our vhost-user-blk back-end as a process of its own,
 * SIGKILLed with requests in flight and started again on the same socket:
 *
 * - with inflight tracking (`vdevkit vhost-user-blk --latency-ms`), split and
 *   packed rings, two queues: the inflight region (read here by hand, from the
 *   spec's layout) shows every request the back-end took; after the kill the
 *   requests stay pending, the driver reconnects, gives the region back, the
 *   new back-end resubmits exactly those, and every request settles once with
 *   the right data (reads against the image, writes found in the image);
 * - without inflight tracking (a back-end with INFLIGHT_SHMFD off, this file
 *   run as a child): the driver lays its rings out again and resubmits;
 * - a back-end that never comes back (nothing listening; a listener that
 *   accepts and never answers): pending requests fail with a
 *   VhostUserReconnectError (TIMEOUT after the time limit, DISCONNECTED after
 *   the attempts), nothing hangs, no fd is left open;
 * - a back-end that comes back as another device (read-only): UNSUPPORTED.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { UnixServer, type UnixSocket } from '../src/sys/index.js';
import { VhostUserBackend } from '../src/vhost-user/backend.js';
import { VhostUserBlkDevice } from '../src/devices/vhost-user-blk.js';
import { VirtioBlkDriver, type ReconnectInfo } from '../src/vhost-user/blk-driver.js';
import { VhostUserReconnectError } from '../src/vhost-user/frontend.js';
import type { VhostUserError } from '../src/vhost-user/errors.js';
import { openFdCount, openFdsBackTo, until } from './helpers/sys.js';

const HERE = fileURLToPath(import.meta.url);
const CLI = path.resolve(path.dirname(HERE), '../src/cli/main.js');
const CHILD = 'VDEVKIT_RECONNECT_CHILD';
const BLOCK = 4096;

if (process.env[CHILD]) {
  // Child mode: our back-end without inflight tracking. argv: socket image latencyMs queues
  const [socket, image, latency, queues] = process.argv.slice(2) as [string, string, string, string];
  const disk = VhostUserBlkDevice.open({ file: image, latencyMs: Number(latency), queues: Number(queues) });
  const be = VhostUserBackend.listen(socket, disk, { inflight: false });
  process.stderr.write(`vdevkit: vhost-user-blk: listening on ${socket}\n`);
  process.once('SIGTERM', () => {
    be.close();
    disk.close();
  });
} else {
  tests();
}

/** A pattern for block `n` of pass `pass` (4 KiB). */
function block(n: number, pass: number): Buffer {
  const b = Buffer.alloc(BLOCK);
  let x = (n * 2654435761 + pass * 40503 + 1) >>> 0 || 1;
  for (let i = 0; i < BLOCK; i += 4) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b.writeUInt32LE(x >>> 0, i);
  }
  return b;
}

interface Backend {
  proc: ChildProcess;
  output(): string;
  exited: Promise<void>;
}

/** Starts a back-end process and resolves once it listens (its log line). */
async function startBackend(args: string[], env: NodeJS.ProcessEnv = process.env): Promise<Backend> {
  const proc = spawn(process.execPath, args, { stdio: ['ignore', 'ignore', 'pipe'], env });
  let out = '';
  const exited = new Promise<void>((r) => proc.once('close', () => r()));
  await new Promise<void>((resolve, reject) => {
    proc.stderr!.on('data', (c: Buffer) => {
      out += c.toString();
      if (/ on \S+\n/.test(out)) resolve();
    });
    void exited.then(() => reject(new Error(`the back-end exited before listening:\n${out}`)));
  });
  return { proc, output: () => out, exited };
}

async function stop(b: Backend | null, signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
  if (!b || b.proc.exitCode !== null || b.proc.signalCode !== null) return b?.exited;
  b.proc.kill(signal);
  await b.exited;
}

interface Scene {
  dir: string;
  socket: string;
  image: string;
  remove(): void;
}

/** A scratch dir with an image of `blocks` blocks, block n holding block(n, 0). */
function scene(blocks: number): Scene {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdevkit-reconnect-'));
  const image = path.join(dir, 'disk.img');
  const data = Buffer.alloc(blocks * BLOCK);
  for (let n = 0; n < blocks; n++) block(n, 0).copy(data, n * BLOCK);
  fs.writeFileSync(image, data);
  return { dir, socket: path.join(dir, 'blk.sock'), image, remove: () => fs.rmSync(dir, { recursive: true, force: true }) };
}

const cliArgs = (s: Scene, latencyMs: number, queues: number, extra: string[] = []): string[] => [CLI, 'vhost-user-blk', '--socket', s.socket, '--file', s.image, '--queues', String(queues), '--latency-ms', String(latencyMs), ...extra];
const childArgs = (s: Scene, latencyMs: number, queues: number): string[] => [HERE, s.socket, s.image, String(latencyMs), String(queues)];

/**
 * Heads marked in flight in the inflight region, per queue, read from the
 * spec's layout: split = 16-byte header + 16-byte entries, packed = 32 + 32;
 * `inflight` is the entry's first byte; each queue region 64-byte aligned.
 */
function inflightHeads(region: Uint8Array, queues: number, size: number, packed: boolean): number[] {
  const entry = packed ? 32 : 16;
  const per = Math.ceil((entry + entry * size) / 64) * 64;
  const out: number[] = [];
  for (let q = 0; q < queues; q++) {
    let n = 0;
    for (let i = 0; i < size; i++) if (region[q * per + entry + i * entry] === 1) n++;
    out.push(n);
  }
  return out;
}

/** Issues `writes` writes (blocks 0.., pass 1) and `reads` reads (blocks 512..), alternating. */
function issue(d: VirtioBlkDriver, writes: number, reads: number): { settled: Promise<PromiseSettledResult<unknown>[]>; reads: { n: number; p: Promise<Buffer> }[] } {
  const ps: Promise<unknown>[] = [];
  const rs: { n: number; p: Promise<Buffer> }[] = [];
  for (let i = 0; i < Math.max(writes, reads); i++) {
    if (i < writes) ps.push(d.write(i * BLOCK, block(i, 1)));
    if (i < reads) {
      const p = d.read((512 + i) * BLOCK, BLOCK);
      rs.push({ n: 512 + i, p });
      ps.push(p);
    }
  }
  return { settled: Promise.allSettled(ps), reads: rs };
}

async function checkAll(s: Scene, work: ReturnType<typeof issue>, writes: number): Promise<void> {
  const settled = await work.settled;
  const failed = settled.filter((r) => r.status === 'rejected') as PromiseRejectedResult[];
  assert.equal(failed.length, 0, `failed: ${failed.map((f) => String(f.reason)).join('; ')}`);
  for (const r of work.reads) assert.ok((await r.p).equals(block(r.n, 0)), `read of block ${r.n}`);
  const img = fs.readFileSync(s.image);
  for (let n = 0; n < writes; n++) assert.ok(img.subarray(n * BLOCK, (n + 1) * BLOCK).equals(block(n, 1)), `block ${n} written`);
  assert.ok(img.subarray(writes * BLOCK, 512 * BLOCK).equals(Buffer.concat(Array.from({ length: 512 - writes }, (_, i) => block(writes + i, 0)))), 'blocks not written are as they were');
}

function tests(): void {
  for (const packed of [false, true]) {
    test(`reconnect with inflight tracking (${packed ? 'packed' : 'split'}, 2 queues): SIGKILL with requests in flight, restart, the back-end resubmits, every request settles once with the right data`, { timeout: 60_000 }, async () => {
      const fds = openFdCount();
      const s = scene(1024);
      let be: Backend | null = null;
      try {
        be = await startBackend(cliArgs(s, 60_000, 2, ['--verbose']));
        const d = await VirtioBlkDriver.connect(s.socket, { queues: 2, queueSize: 32, packed, reconnect: { delayMs: 20, timeoutMs: 30_000 } });
        assert.equal(d.packed, packed);
        const region = d.inflightRegion;
        assert.ok(region?.memory, 'our back-end gave an inflight region');
        const events: string[] = [];
        let info: ReconnectInfo | undefined;
        d.on('disconnected', (e: VhostUserError) => events.push(`disconnected ${e.code}`));
        d.on('reconnected', (i) => {
          events.push('reconnected');
          info = i;
        });
        // 96 writes and 64 reads on 2 rings of 32: 64 taken by the back-end (held a minute), 96 waiting in the driver.
        const work = issue(d, 96, 64);
        await until(() => inflightHeads(region.memory!.bytes, 2, 32, packed).join() === '32,32', 10_000, () => `in flight: ${inflightHeads(region.memory!.bytes, 2, 32, packed).join()}`);
        assert.equal(d.inFlight, 160);
        await stop(be, 'SIGKILL');
        await until(() => d.reconnecting, 5000, 'the driver noticed the back-end went away');
        assert.deepEqual(events, ['disconnected DISCONNECTED']);
        assert.equal(d.inFlight, 160, 'nothing failed');
        be = await startBackend(cliArgs(s, 0, 2, ['--verbose']));
        await checkAll(s, work, 96);
        assert.deepEqual(events, ['disconnected DISCONNECTED', 'reconnected']);
        assert.equal(info?.resubmittedBy, 'backend');
        assert.equal(info?.pending, 64);
        const resubmitted = [...be.output().matchAll(/vring (\d+): resubmitting (\d+) request/g)].map((m) => `${m[1]}:${m[2]}`).sort();
        assert.deepEqual(resubmitted, ['0:32', '1:32'], be.output());
        assert.equal(d.inflightRegion, region, 'the same inflight region');
        assert.equal(d.inFlight, 0);
        // The rings go on: more I/O on both queues.
        for (let q = 0; q < 2; q++) {
          await d.write(900 * BLOCK, block(900, q + 2), { queue: q });
          assert.ok((await d.read(900 * BLOCK, BLOCK, { queue: q })).equals(block(900, q + 2)));
        }
        await d.close();
      } finally {
        await stop(be);
        s.remove();
      }
      await openFdsBackTo(fds, 'fds after the driver and the back-ends closed');
    });
  }

  for (const packed of [false, true]) {
    test(`reconnect to a back-end without inflight tracking (${packed ? 'packed' : 'split'}): the driver lays its rings out again and resubmits what was pending`, { timeout: 60_000 }, async () => {
      const fds = openFdCount();
      const s = scene(1024);
      const env = { ...process.env, [CHILD]: '1' };
      let be: Backend | null = null;
      try {
        be = await startBackend(childArgs(s, 60_000, 1), env);
        const d = await VirtioBlkDriver.connect(s.socket, { queueSize: 32, packed, reconnect: { delayMs: 20, timeoutMs: 30_000 } });
        assert.equal(d.inflightRegion, null, 'no inflight region offered');
        let info: ReconnectInfo | undefined;
        d.on('reconnected', (i) => (info = i));
        const work = issue(d, 40, 40);
        // Writes reach the image before the back-end holds their completion: the first one there means it took them.
        await until(() => fs.readFileSync(s.image).subarray(0, BLOCK).equals(block(0, 1)), 10_000, 'the first write reached the image');
        await stop(be, 'SIGKILL');
        await until(() => d.reconnecting, 5000, 'the driver noticed the back-end went away');
        assert.equal(d.inFlight, 80);
        be = await startBackend(childArgs(s, 0, 1), env);
        await checkAll(s, work, 40);
        assert.equal(info?.resubmittedBy, 'driver');
        assert.equal(info?.pending, 32, 'the ring was full; the rest waited in the driver');
        assert.equal(d.inFlight, 0);
        await d.write(1000 * BLOCK, block(1000, 5));
        assert.ok((await d.read(1000 * BLOCK, BLOCK)).equals(block(1000, 5)));
        await d.close();
      } finally {
        await stop(be);
        s.remove();
      }
      await openFdsBackTo(fds, 'fds after the driver and the back-ends closed');
    });
  }

  test('a back-end that never comes back: nothing listening (TIMEOUT), a listener that never answers (TIMEOUT), attempts used up (DISCONNECTED); no hang, no fd leak', { timeout: 60_000 }, async () => {
    const fds = openFdCount();
    const s = scene(1024);
    let be: Backend | null = null;
    const held: UnixSocket[] = [];
    try {
      for (const mode of ['nothing', 'mute', 'attempts'] as const) {
        be = await startBackend(cliArgs(s, 60_000, 1));
        const reconnect = mode === 'attempts' ? { delayMs: 10, maxAttempts: 3, timeoutMs: 60_000 } : { delayMs: 20, timeoutMs: 1500 };
        const d = await VirtioBlkDriver.connect(s.socket, { queueSize: 16, reconnect });
        const region = d.inflightRegion!;
        const work = issue(d, 8, 8);
        await until(() => inflightHeads(region.memory!.bytes, 1, 16, d.packed)[0] === 16, 10_000, 'the back-end took 16');
        await stop(be, 'SIGKILL');
        be = null;
        let server: UnixServer | null = null;
        if (mode === 'mute') {
          await until(() => d.reconnecting, 5000, 'reconnecting');
          fs.rmSync(s.socket, { force: true });
          server = UnixServer.listen(s.socket);
          server.on('connection', (sock) => held.push(sock));
        }
        const settled = await work.settled;
        server?.close();
        assert.equal(settled.length, 16);
        for (const r of settled) {
          assert.equal(r.status, 'rejected');
          const e = (r as PromiseRejectedResult).reason as VhostUserReconnectError;
          assert.ok(e instanceof VhostUserReconnectError, String(e));
          assert.equal(e.code, mode === 'attempts' ? 'DISCONNECTED' : 'TIMEOUT', e.message);
          if (mode === 'attempts') assert.equal(e.attempts, 3);
          assert.ok(e.attempts >= 1);
        }
        if (mode === 'mute') assert.ok(held.length >= 1, 'the mute listener was connected to');
        await assert.rejects(d.read(0, BLOCK), VhostUserReconnectError);
        await d.close();
        assert.equal(d.frontend.closed, true);
        for (const h of held.splice(0)) h.destroy();
      }
    } finally {
      await stop(be);
      for (const h of held) h.destroy();
      s.remove();
    }
    await openFdsBackTo(fds, 'fds after the driver gave up and closed');
  });

  test('a back-end that comes back as another device (read-only: other features): the pending requests fail with UNSUPPORTED at once', { timeout: 60_000 }, async () => {
    const fds = openFdCount();
    const s = scene(1024);
    let be: Backend | null = null;
    try {
      be = await startBackend(cliArgs(s, 60_000, 1));
      const d = await VirtioBlkDriver.connect(s.socket, { queueSize: 16, reconnect: { delayMs: 20, timeoutMs: 30_000 } });
      const work = issue(d, 0, 8);
      await until(() => inflightHeads(d.inflightRegion!.memory!.bytes, 1, 16, d.packed)[0] === 8, 10_000, 'the back-end took 8');
      await stop(be, 'SIGKILL');
      be = await startBackend(cliArgs(s, 0, 1, ['--readonly']));
      for (const r of await work.settled) {
        const e = (r as PromiseRejectedResult).reason as VhostUserReconnectError;
        assert.ok(e instanceof VhostUserReconnectError, String(e));
        assert.equal(e.code, 'UNSUPPORTED');
        assert.match(e.message, /another device: features/);
      }
      await d.close();
    } finally {
      await stop(be);
      s.remove();
    }
    await openFdsBackTo(fds, 'fds after the driver closed');
  });
}
