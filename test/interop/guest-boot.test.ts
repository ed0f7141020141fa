/**
 * The guest harness (guest.ts) proved on its own and against a real
 * vhost-user-blk back-end, qemu-storage-daemon 7.2 (libvhost-user), so that
 * our back-end's tests can reuse it unchanged:
 *
 * - a boot with no virtio device: the kernel is the one built, the modules
 *   load, /sys/bus/virtio is empty, the script's exit code comes back, and a
 *   guest that never powers off is killed at the timeout (by pid);
 * - qemu-storage-daemon exporting a 64 MiB raw file: the guest writes blocks
 *   with O_DIRECT, reads them back and hashes them; the host checks the file
 *   block by block with expectedBlock();
 * - the same back-end under blkWriteLoopScript (one flushed write per block,
 *   three passes): every block of the range holds the last pass, and the
 *   blocks around it are untouched;
 * - the back-end killed (SIGKILL) on a progress line mid-loop and started
 *   again on the same socket: QEMU reconnects (chardev reconnect=1), the guest
 *   carries on and every block holds the last pass. The kill comes while the
 *   guest sleeps between writes (pauseMs): qemu-storage-daemon offers no
 *   INFLIGHT_SHMFD, so a request in flight at the kill would be lost.
 *
 * A missing QEMU, busybox-static, cpio or qemu-storage-daemon fails (never skips).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readFileSync, truncateSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { scratchDir, startPeer, waitForSocket, type Peer } from './peers.js';
import {
  assertBlocks,
  blkWriteLoopScript,
  blkWriteReadScript,
  blockPasses,
  ensureGuest,
  guestSha256,
  parseProgress,
  patternSha256,
  qemuStorageDaemon,
  qsdBlkArgs,
  runGuest,
  vhostUserBlkArgs,
} from './guest.js';

const MiB = 1 << 20;

/** qemu-storage-daemon exporting a fresh raw file of `sizeMiB` as vhost-user-blk (`queues` queues); stopped by pid and removed by `close`. */
async function qsdDisk(sizeMiB = 64, queues = 1): Promise<{ image: string; socket: string; peer: Peer; restart(): Promise<void>; close(): Promise<void> }> {
  const scratch = scratchDir('vdevkit-guest-blk-');
  const image = path.join(scratch.dir, 'disk.img');
  const socket = path.join(scratch.dir, 'blk.sock');
  writeFileSync(image, '');
  truncateSync(image, sizeMiB * MiB);
  let peer: Peer;
  try {
    peer = startPeer(qemuStorageDaemon(), qsdBlkArgs(image, socket, { queues }));
    await waitForSocket(socket, peer);
  } catch (err) {
    scratch.remove();
    throw err;
  }
  return {
    image,
    socket,
    get peer() {
      return peer;
    },
    /** A new qemu-storage-daemon on the same file and socket (after the last one exited). */
    async restart() {
      peer = startPeer(qemuStorageDaemon(), qsdBlkArgs(image, socket, { queues }));
      await waitForSocket(socket, peer);
    },
    async close() {
      await peer.stop();
      scratch.remove();
    },
  };
}

test('guest: boots with no virtio device, loads the modules, gets its files, reports the exit code', { timeout: 120_000 }, async (t) => {
  const guest = ensureGuest();
  const r = await runGuest({
    script: [
      'echo "uname=$(uname -r)"',
      'echo "virtio=[$(ls /sys/bus/virtio/devices)]"',
      'for m in $(cat /lib/modules/vdevkit/order); do grep -q "^$m " /proc/modules && echo "loaded $m"; done',
      'echo "file=$(cat /etc/vdk/hello.txt)"',
      'exit 3',
    ].join('\n'),
    files: { 'etc/vdk/hello.txt': 'hello from the host\n' },
  });
  assert.equal(r.exitCode, 3, r.output);
  assert.equal(r.qemuExit, 0, r.output);
  assert.match(r.output, new RegExp(`^uname=${guest.kernelRelease.replace(/\./g, '\\.')}$`, 'm'));
  assert.match(r.output, /^virtio=\[\]$/m);
  assert.match(r.output, /^file=hello from the host$/m);
  const loaded = [...r.output.matchAll(/^loaded (\S+)$/gm)].map((m) => m[1]);
  assert.deepEqual(loaded, guest.modules);
  for (const m of ['virtio_ring', 'virtio', 'virtio_pci_modern_dev', 'virtio_pci_legacy_dev', 'virtio_pci', 'virtio_blk', 'failover', 'net_failover', 'virtio_net']) {
    assert.ok(guest.modules.includes(m), `${m} is in the initramfs`);
  }
  t.diagnostic(`boot to poweroff: ${r.wallMs} ms wall, /test.sh started at ${r.guestStart} s guest uptime`);
});

test('guest: a guest that does not power off is killed at the timeout, with its output', { timeout: 60_000 }, async () => {
  let seen = '';
  await assert.rejects(
    runGuest({ script: 'echo "about to hang"; sleep 1000', timeoutMs: 8_000, onLine: (l) => (seen ||= l.includes('about to hang') ? l : '') }),
    (err: Error) => /did not power off within 8000 ms/.test(err.message) && /about to hang/.test(err.message),
  );
  assert.equal(seen, 'about to hang', 'onLine saw the line before the timeout');
});

test('guest: qemu-storage-daemon as vhost-user-blk, O_DIRECT write and read back, checked on the host file', { timeout: 180_000 }, async () => {
  const disk = await qsdDisk();
  try {
    const range = { start: 0, blocks: 256, blockSize: 4096, seed: 0x5eed };
    const r = await runGuest({ script: blkWriteReadScript({ device: '/dev/vda', ...range }), qemuArgs: vhostUserBlkArgs(disk.socket) });
    assert.equal(r.exitCode, 0, r.output);
    assert.match(r.output, /VDEVKIT-BLK \/dev\/vda size=67108864/);
    assert.equal(guestSha256(r.output), patternSha256(range), r.output);
    const image = readFileSync(disk.image);
    assertBlocks(image, range);
    assert.ok(image.subarray(256 * 4096).every((b) => b === 0), 'nothing written past the range');

    // Random data at an offset: the host file's bytes hash to what the guest wrote.
    const r2 = await runGuest({
      script: blkWriteReadScript({ device: '/dev/vda', start: 1000, blocks: 64, blockSize: 8192, seed: 1, data: 'random' }),
      qemuArgs: vhostUserBlkArgs(disk.socket, { id: 'disk' }),
    });
    assert.equal(r2.exitCode, 0, r2.output);
    const written = readFileSync(disk.image).subarray(1000 * 8192, 1064 * 8192);
    assert.equal(guestSha256(r2.output), createHash('sha256').update(written).digest('hex'), r2.output);
  } finally {
    await disk.close();
  }
});

test('guest: qemu-storage-daemon under blkWriteLoopScript, every block verified on the host', { timeout: 180_000 }, async () => {
  const disk = await qsdDisk(64, 2);
  try {
    const range = { start: 32, blocks: 96, blockSize: 4096, seed: 42 };
    const progress: { pass: number; blocks: number }[] = [];
    const r = await runGuest({
      script: blkWriteLoopScript({ ...range, passes: 3, progressEvery: 32 }),
      qemuArgs: vhostUserBlkArgs(disk.socket, { queues: 2 }),
      onLine: (l) => {
        const p = parseProgress(l);
        if (p) progress.push(p);
      },
    });
    assert.equal(r.exitCode, 0, r.output);
    assert.deepEqual(
      progress,
      [1, 2, 3].flatMap((pass) => [32, 64, 96].map((blocks) => ({ pass, blocks }))),
    );
    assert.equal(guestSha256(r.output), patternSha256({ ...range, pass: 3 }));
    const image = readFileSync(disk.image);
    assertBlocks(image, { ...range, pass: 3 });
    assert.deepEqual(new Set(blockPasses(image, range)), new Set([3]));
    assert.ok(image.subarray(0, 32 * 4096).every((b) => b === 0), 'blocks before the range untouched');
    assert.ok(image.subarray(128 * 4096).every((b) => b === 0), 'blocks after the range untouched');
  } finally {
    await disk.close();
  }
});

test('guest: qemu-storage-daemon killed and restarted mid-loop, QEMU reconnects, every block verified', { timeout: 180_000 }, async () => {
  const disk = await qsdDisk();
  try {
    const range = { blocks: 64, blockSize: 4096, seed: 77 };
    let restarted: Promise<void> | undefined;
    const r = await runGuest({
      script: blkWriteLoopScript({ ...range, passes: 2, progressEvery: 8, pauseMs: 50 }),
      qemuArgs: vhostUserBlkArgs(disk.socket, { reconnect: 1 }),
      onLine: (l) => {
        const p = parseProgress(l);
        if (!restarted && p?.pass === 1 && p.blocks === 24) {
          const old = disk.peer;
          process.kill(old.pid, 'SIGKILL');
          restarted = old.exited.then(() => disk.restart());
        }
      },
    });
    assert.ok(restarted, 'the back-end was killed');
    await restarted;
    assert.equal(r.exitCode, 0, r.output);
    assert.match(r.output, /VDEVKIT-PASS-DONE pass=2/);
    assertBlocks(readFileSync(disk.image), { ...range, pass: 2 });
  } finally {
    await disk.close();
  }
});
