/**
 * Fault injection under a real Linux guest: QEMU 7.2 (TCG) runs a write loop
 * on vhost-user-blk-pci while our back-end (`vdevkit vhost-user-blk`, a
 * process of its own, on a raw image file) is killed with SIGKILL 20 times
 * and started again on the same socket and image each time. QEMU's chardev
 * reconnects (reconnect=1); on each start it gives the new back-end the
 * inflight region (SET_INFLIGHT_FD), and what was in flight at the kill is
 * resubmitted.
 *
 * The guest writes passes 1..P over N blocks, one O_DIRECT block per dd with
 * conv=fsync (a write and a flush), no retry: any I/O error fails it. Every
 * request is held 40 ms by the back-end (--latency-ms), so most kills land on
 * one in flight. A kill comes at a random delay after a progress line, and
 * only once the guest has printed progress for blocks the restarted back-end
 * must have served (two progress steps past what was seen at the last kill):
 * the device is running again, past QEMU's handshake (see below).
 *
 * Checked:
 * - at each kill, the image (no writer alive) is the write loop's state after
 *   some W writes, W at least the progress the guest had printed: blocks
 *   [0, K) of pass P, the rest of pass P - 1 (zeros for pass 1), block K
 *   (the write in flight) anything; no consistent W is a lost write;
 * - the guest finishes every pass, with no write error, and reads the last
 *   pass back (O_DIRECT) identical;
 * - the image holds every block of the last pass (none torn, none older);
 * - QEMU reconnected each time, and the back-ends resubmitted requests.
 *
 * Why the kill waits for progress: QEMU 7.2 never reconnects after a back-end
 * that died while it was in vhost_dev_init (the reconnect's first messages,
 * GET_FEATURES .. SET_OWNER, GET_FEATURES, SET_VRING_CALL / ERR). The failure
 * path's vhost_dev_cleanup zeroes the vhost_dev, so vhost_user_async_close_bh
 * (71e076a07d "hw/virtio: generalise CHR_EVENT_CLOSED handling", new in 7.2)
 * skips the disconnect callback that would install the chardev's event handler
 * again: "vhost_backend_init failed: Protocol error", then no connection ever,
 * and the guest's I/O waits for good (fixed upstream in 2024, "vhost-user: fix
 * lost reconnect"). A kill later in the handshake (vhost_user_blk_start:
 * SET_FEATURES .. SET_INFLIGHT_FD, ADD_MEM_REG, the rings, the last SET_STATUS)
 * is recovered: "Error starting vhost", QEMU disconnects and reconnects. No
 * back-end can mend the first case, so each kill here waits until the restarted
 * back-end has served writes (the device runs). docs/reliability.md has the
 * sweep over the handshake and the figures.
 *
 * A missing QEMU / busybox / cpio, or a guest that cannot be built, fails
 * (never skips). VDEVKIT_KILL_SEED=<u32> replays a kill schedule's delays.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, truncateSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Rng } from '../../src/fuzz/rng.js';
import { scratchDir, startPeer, type Peer } from './peers.js';
import { blkWriteLoopScript, blockPasses, guestSha256, parseProgress, patternSha256, runGuest, vhostUserBlkArgs } from './guest.js';

const CLI = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../src/cli/main.js');
const MiB = 1 << 20;

const KILLS = 20;
const LATENCY_MS = 40;
/** The write loop: PASSES passes over BLOCKS blocks of BLOCK_SIZE, a progress line every EVERY blocks. */
const BLOCKS = 48;
const BLOCK_SIZE = 4096;
const PASSES = 8;
const EVERY = 4;
const SEED = 0x5eed16;

/**
 * Our back-end, restartable: each start is a new process on the same socket and
 * image, listening once it printed its `vhost-user-blk: ... on <socket>` line.
 */
class RestartableBackend {
  readonly generations: Peer[] = [];
  constructor(
    readonly socket: string,
    readonly image: string,
  ) {}

  get current(): Peer {
    const p = this.generations[this.generations.length - 1];
    if (!p) throw new Error('the back-end was never started');
    return p;
  }

  async start(): Promise<void> {
    const peer = startPeer(process.execPath, [CLI, 'vhost-user-blk', '--socket', this.socket, '--file', this.image, '--latency-ms', String(LATENCY_MS), '--verbose']);
    this.generations.push(peer);
    const end = Date.now() + 15_000;
    while (!peer.output().includes(` on ${this.socket}`)) {
      if (peer.proc.exitCode !== null || peer.proc.signalCode !== null) throw new Error(`the back-end exited before listening:\n${peer.output()}`);
      if (Date.now() > end) throw new Error(`the back-end is not listening after 15 s:\n${peer.output()}`);
      await new Promise((r) => setTimeout(r, 10));
    }
  }

  /** SIGKILL, resolved once it has exited. */
  async kill(): Promise<void> {
    const p = this.current;
    process.kill(p.pid, 'SIGKILL');
    const how = await p.exited;
    if (how !== 'SIGKILL') throw new Error(`the back-end ended with ${String(how)}, not SIGKILL:\n${p.output()}`);
  }

  /** Every generation's output, the last `lines` lines of each. */
  tail(lines = 30): string {
    return this.generations.map((p, i) => `--- back-end #${i} (pid ${p.pid}):\n${p.output().split('\n').slice(-lines).join('\n')}`).join('\n');
  }
}

/** The pass each block of the range holds: 0 for a zero block, null for no pattern (torn, foreign). */
function imagePasses(image: Buffer): (number | null)[] {
  const passes = blockPasses(image, { blocks: BLOCKS, blockSize: BLOCK_SIZE, seed: SEED });
  return passes.map((p, i) => (p === null && image.subarray(i * BLOCK_SIZE, (i + 1) * BLOCK_SIZE).every((b) => b === 0) ? 0 : p));
}

/**
 * The number of writes W >= `atLeast` after which the loop leaves the image as
 * `passes` shows (block W mod N, the write in flight, may hold anything), or
 * null when there is none: a write the guest saw complete is not on the disk.
 */
function writesDone(passes: readonly (number | null)[], atLeast: number): number | null {
  const n = passes.length;
  for (let w = atLeast; w <= n * PASSES; w++) {
    const pass = Math.floor(w / n) + 1;
    const k = w % n;
    let ok = true;
    for (let i = 0; i < n && ok; i++) {
      if (i === k && w < n * PASSES) continue; // in flight
      ok = passes[i] === (i < k ? pass : pass - 1);
    }
    if (ok) return w;
  }
  return null;
}

test(`vhost-user-blk (ours) SIGKILLed and restarted ${KILLS} times under a guest write loop (QEMU 7.2, reconnect=1): no lost or torn write`, { timeout: 420_000 }, async (t) => {
  const seed = process.env.VDEVKIT_KILL_SEED ? Number(process.env.VDEVKIT_KILL_SEED) >>> 0 : (Date.now() & 0xffffffff) >>> 0;
  const rng = new Rng(seed);
  const scratch = scratchDir('vdevkit-vublk-kills-');
  const image = path.join(scratch.dir, 'disk.img');
  writeFileSync(image, '');
  truncateSync(image, 16 * MiB);
  const be = new RestartableBackend(path.join(scratch.dir, 'blk.sock'), image);
  /** One record per kill: progress seen, writes found done in the image, delay after the progress line. */
  const kills: { seen: number; done: number | null; delayMs: number; passes: (number | null)[] }[] = [];
  let failure: Error | undefined;
  try {
    await be.start();
    let seen = 0; // absolute writes the guest reported (progress lines)
    let nextKillAt = 2 * EVERY; // a kill only after progress at or past this
    let busy: Promise<void> | null = null;
    const onProgress = (abs: number): void => {
      seen = Math.max(seen, abs);
      if (busy || kills.length >= KILLS || seen < nextKillAt || failure) return;
      const delayMs = rng.int(3 * LATENCY_MS);
      busy = (async () => {
        await new Promise((r) => setTimeout(r, delayMs));
        const seenAtKill = seen;
        await be.kill();
        // No writer is alive: the image is what the dead back-end left.
        const passes = imagePasses(readFileSync(image));
        const done = writesDone(passes, seenAtKill);
        kills.push({ seen: seenAtKill, done, delayMs, passes });
        await be.start();
        // The next kill once the guest printed progress for writes the new back-end served:
        // anything up to the next progress line may have completed before the kill.
        nextKillAt = seenAtKill + 2 * EVERY + rng.int(3) * EVERY;
      })()
        .catch((err: Error) => void (failure ??= err))
        .finally(() => (busy = null));
    };
    const r = await runGuest({
      script: blkWriteLoopScript({ blocks: BLOCKS, blockSize: BLOCK_SIZE, seed: SEED, passes: PASSES, progressEvery: EVERY }),
      qemuArgs: vhostUserBlkArgs(be.socket, { reconnect: 1 }),
      timeoutMs: 360_000,
      onLine: (l) => {
        const p = parseProgress(l);
        if (p) onProgress((p.pass - 1) * BLOCKS + p.blocks);
      },
    });
    while (busy) await busy;
    const why = `seed ${seed}\n${r.output.split('\n').slice(-60).join('\n')}\n${be.tail()}`;
    if (failure) throw new Error(`${failure.message}\n${why}`);
    assert.equal(r.exitCode, 0, why);
    assert.doesNotMatch(r.output, /VDEVKIT-WRITE-ERROR/, why);
    assert.match(r.output, new RegExp(`VDEVKIT-PASS-DONE pass=${PASSES}`), why);
    assert.equal(guestSha256(r.output), patternSha256({ blocks: BLOCKS, blockSize: BLOCK_SIZE, seed: SEED, pass: PASSES }), why);
    assert.equal(kills.length, KILLS, `${kills.length} kills, not ${KILLS}: the loop ended first\n${why}`);

    const lost = kills.filter((k) => k.done === null);
    assert.deepEqual(
      lost.map((k) => `kill after ${k.seen} writes: ${JSON.stringify(k.passes)}`),
      [],
      `the image at a kill is no state of the write loop at or past what the guest saw complete (a lost write)\n${why}`,
    );

    const final = imagePasses(readFileSync(image));
    const torn = final.flatMap((p, i) => (p === null ? [i] : []));
    const stale = final.flatMap((p, i) => (p !== null && p !== PASSES ? [i] : []));
    assert.deepEqual(torn, [], `blocks holding no pass's pattern (torn)\n${why}`);
    assert.deepEqual(stale, [], `blocks not of pass ${PASSES} (lost)\n${why}`);

    // Every kill was followed by a reconnection of QEMU to the next back-end.
    for (const [i, g] of be.generations.entries()) assert.match(g.output(), /front-end connected/, `back-end #${i} was never connected\n${why}`);
    const resubmitted = be.generations.map((g) => [...g.output().matchAll(/resubmitting (\d+) request/g)].reduce((s, m) => s + Number(m[1]), 0));
    const withResubmit = resubmitted.filter((n) => n > 0).length;
    const total = resubmitted.reduce((a, b) => a + b, 0);
    assert.ok(withResubmit >= 1, `no restart resubmitted a request in flight at the kill\n${why}`);
    // QEMU's own reports of the disconnects (stderr), counted by message with the numbers taken out.
    const qemuSays = new Map<string, number>();
    for (const l of r.output.split('\n')) {
      if (!/^qemu-system|vhost/i.test(l)) continue;
      const key = l.replace(/^qemu-system-x86_64: /, '').replace(/\d+/g, 'N');
      qemuSays.set(key, (qemuSays.get(key) ?? 0) + 1);
    }
    t.diagnostic(`seed ${seed}: ${kills.length} kills, ${be.generations.length} back-ends; ${withResubmit} restarts resubmitted ${total} request(s) in flight at the kill`);
    t.diagnostic(`writes done at each kill (guest had printed): ${kills.map((k) => `${k.done}(${k.seen})`).join(' ')}`);
    t.diagnostic(`${BLOCKS} blocks x ${PASSES} passes = ${BLOCKS * PASSES} writes; ${BLOCKS} blocks checked in the image, lost 0, torn 0; guest ${r.guestEnd - r.guestStart} s, wall ${r.wallMs} ms`);
    t.diagnostic(`QEMU: ${[...qemuSays].map(([m, n]) => `${n} x "${m}"`).join('; ')}`);
  } finally {
    await be.current.stop().catch(() => undefined);
    scratch.remove();
  }
});
