/**
 * Our vhost-user-blk back-end (`vdevkit vhost-user-blk`, a process of its
 * own) under a real Linux guest: QEMU 7.2 (TCG) with vhost-user-blk-pci on
 * our socket, the guest harness of guest.ts (Debian kernel, busybox
 * initramfs). The same scripts and checks as qemu-storage-daemon's in
 * guest-boot.test.ts:
 *
 * - O_DIRECT write of a pattern and of random data, read back identical in
 *   the guest, and the host file holds it (block by block / by hash);
 * - two queues under a write loop of three passes, every block verified;
 * - the back-end killed (SIGKILL) in the middle of a guest write loop with
 *   no pause between writes (each request held 60 ms, and the kill comes 70 ms
 *   after a progress line, so one is in flight at it), and started again: QEMU reconnects
 *   (reconnect=1), gives back the inflight region, requests in flight at
 *   the kill are resubmitted, the guest finishes, and every block is the
 *   last pass's (no lost or torn write).
 *
 * A missing QEMU / busybox / cpio fails (never skips).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readFileSync, truncateSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { scratchDir, startPeer, waitForSocket, type Peer } from './peers.js';
import { assertBlocks, blkWriteLoopScript, blkWriteReadScript, guestSha256, parseProgress, patternSha256, runGuest, vhostUserBlkArgs } from './guest.js';

const MiB = 1 << 20;
const CLI = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../src/cli/main.js');

/** Our back-end on a fresh raw file; `restart` starts it again on the same file and socket. */
async function ourDisk(sizeMiB = 64, queues = 1, extra: string[] = [], waitListen = true): Promise<{ image: string; socket: string; peer: Peer; restart(): Promise<void>; close(): Promise<void> }> {
  const scratch = scratchDir('vdevkit-vublk-');
  const image = path.join(scratch.dir, 'disk.img');
  const socket = path.join(scratch.dir, 'blk.sock');
  writeFileSync(image, '');
  truncateSync(image, sizeMiB * MiB);
  const start = async (): Promise<Peer> => {
    const p = startPeer(process.execPath, [CLI, 'vhost-user-blk', '--socket', socket, '--file', image, '--queues', String(queues), '--verbose', ...extra]);
    if (waitListen) await waitForSocket(socket, p);
    return p;
  };
  let peer: Peer;
  try {
    peer = await start();
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
    async restart() {
      peer = await start();
    },
    async close() {
      await peer.stop();
      scratch.remove();
    },
  };
}

test('vhost-user-blk (ours) under a Linux guest: O_DIRECT write, read back, the data in the host file', { timeout: 180_000 }, async () => {
  const disk = await ourDisk();
  try {
    const range = { start: 0, blocks: 256, blockSize: 4096, seed: 0xb1c };
    const r = await runGuest({ script: blkWriteReadScript({ device: '/dev/vda', ...range }), qemuArgs: vhostUserBlkArgs(disk.socket) });
    assert.equal(r.exitCode, 0, `${r.output}\n--- back-end:\n${disk.peer.output()}`);
    assert.match(r.output, /VDEVKIT-BLK \/dev\/vda size=67108864/);
    assert.equal(guestSha256(r.output), patternSha256(range), r.output);
    const image = readFileSync(disk.image);
    assertBlocks(image, range);
    assert.ok(image.subarray(256 * 4096).every((b) => b === 0), 'nothing written past the range');

    const r2 = await runGuest({
      script: blkWriteReadScript({ device: '/dev/vda', start: 1000, blocks: 64, blockSize: 8192, seed: 1, data: 'random' }),
      qemuArgs: vhostUserBlkArgs(disk.socket, { id: 'disk' }),
    });
    assert.equal(r2.exitCode, 0, `${r2.output}\n--- back-end:\n${disk.peer.output()}`);
    const written = readFileSync(disk.image).subarray(1000 * 8192, 1064 * 8192);
    assert.equal(guestSha256(r2.output), createHash('sha256').update(written).digest('hex'), r2.output);
  } finally {
    await disk.close();
  }
});

test('vhost-user-blk (ours), 2 queues: a write loop of three passes, every block verified on the host', { timeout: 180_000 }, async () => {
  const disk = await ourDisk(64, 2);
  try {
    const range = { start: 32, blocks: 96, blockSize: 4096, seed: 42 };
    const r = await runGuest({
      script: `[ "$(ls /sys/block/vda/mq | wc -l)" = 2 ] || { echo "VDEVKIT-ERROR not 2 queues: $(ls /sys/block/vda/mq)"; exit 9; }\n${blkWriteLoopScript({ ...range, passes: 3, progressEvery: 32 })}`,
      qemuArgs: vhostUserBlkArgs(disk.socket, { queues: 2 }),
      cpus: 2,
    });
    assert.equal(r.exitCode, 0, `${r.output}\n--- back-end:\n${disk.peer.output()}`);
    assert.equal(guestSha256(r.output), patternSha256({ ...range, pass: 3 }));
    const image = readFileSync(disk.image);
    assertBlocks(image, { ...range, pass: 3 });
    assert.ok(image.subarray(0, 32 * 4096).every((b) => b === 0), 'blocks before the range untouched');
    assert.ok(image.subarray(128 * 4096).every((b) => b === 0), 'blocks after the range untouched');
  } finally {
    await disk.close();
  }
});

test('vhost-user-blk (ours) killed mid-write-loop and restarted: QEMU reconnects, in-flight requests resubmitted, every block correct', { timeout: 240_000 }, async (t) => {
  // Each request completes 60 ms after its I/O, so the kill lands while one is in flight.
  const disk = await ourDisk(64, 1, ['--latency-ms', '60', '--trace']);
  try {
    const range = { blocks: 96, blockSize: 4096, seed: 77 };
    let restarted: Promise<void> | undefined;
    let killedOutput = '';
    const r = await runGuest({
      // No pause between writes: the guest keeps a request going, so the kill lands on one.
      script: blkWriteLoopScript({ ...range, passes: 2, progressEvery: 8 }),
      qemuArgs: vhostUserBlkArgs(disk.socket, { reconnect: 1 }),
      onLine: (l) => {
        const p = parseProgress(l);
        if (!restarted && p?.pass === 1 && p.blocks === 40) {
          // The line comes between two blocks' dd runs: wait into the next block's write.
          const old = disk.peer;
          restarted = new Promise((r) => setTimeout(r, 70)).then(async () => {
            process.kill(old.pid, 'SIGKILL');
            await old.exited;
            killedOutput = old.output();
            await disk.restart();
          });
        }
      },
    });
    assert.ok(restarted, 'the back-end was killed');
    await restarted;
    assert.equal(r.exitCode, 0, `${r.output}\n--- first back-end:\n${killedOutput}\n--- second:\n${disk.peer.output()}`);
    assert.match(r.output, /VDEVKIT-PASS-DONE pass=2/);
    assertBlocks(readFileSync(disk.image), { ...range, pass: 2 });
    assert.match(disk.peer.output(), /front-end connected/, 'QEMU reconnected to the new back-end');
    const resubmitted = /resubmitting (\d+) request/.exec(disk.peer.output());
    assert.ok(resubmitted && Number(resubmitted[1]) >= 1, `a request was in flight at the kill and resubmitted:\n${disk.peer.output()}`);
    t.diagnostic(`requests in flight at the kill, resubmitted by the new back-end: ${resubmitted[1]}`);
  } finally {
    await disk.close();
  }
});

test('vhost-user-blk (ours), packed ring (vhost-user-blk-pci packed=on): write, read back, host file checked', { timeout: 180_000 }, async () => {
  const disk = await ourDisk(64, 2, ['--trace']);
  try {
    const range = { start: 8, blocks: 128, blockSize: 4096, seed: 0xacced };
    const args = vhostUserBlkArgs(disk.socket, { queues: 2 });
    args[args.length - 1] += ',packed=on';
    const r = await runGuest({ script: blkWriteReadScript({ device: '/dev/vda', ...range }), qemuArgs: args, cpus: 2 });
    assert.equal(r.exitCode, 0, `${r.output}\n--- back-end:\n${disk.peer.output()}`);
    assert.equal(guestSha256(r.output), patternSha256(range), r.output);
    assertBlocks(readFileSync(disk.image), range);
    // SET_FEATURES carried VIRTIO_F_RING_PACKED (bit 34): the rings were packed.
    const set = /SET_FEATURES flags 0x\d+ 8 B ([0-9a-f]{16})/.exec(disk.peer.output());
    assert.ok(set, disk.peer.output());
    assert.ok(Buffer.from(set[1]!, 'hex').readBigUInt64LE(0) & (1n << 34n), 'RING_PACKED negotiated');
  } finally {
    await disk.close();
  }
});

test('vhost-user-blk (ours) connecting to QEMU (chardev server=on, vdevkit --connect)', { timeout: 180_000 }, async () => {
  const disk = await ourDisk(64, 1, ['--connect'], false);
  try {
    const range = { start: 0, blocks: 64, blockSize: 4096, seed: 9 };
    const r = await runGuest({ script: blkWriteReadScript({ device: '/dev/vda', ...range }), qemuArgs: vhostUserBlkArgs(disk.socket, { server: true }) });
    assert.equal(r.exitCode, 0, `${r.output}\n--- back-end:\n${disk.peer.output()}`);
    assertBlocks(readFileSync(disk.image), range);
    assert.match(disk.peer.output(), /front-end connected/);
  } finally {
    await disk.close();
  }
});

for (const packed of [false, true]) {
  test(`vhost-user-blk (ours, --iommu) behind QEMU's intel-iommu, ${packed ? 'packed' : 'split'} ring: the guest's DMA addresses are IOVAs, translated through the IOTLB QEMU sends; every block correct`, { timeout: 240_000 }, async (t) => {
    const disk = await ourDisk(64, 1, ['--iommu']);
    try {
      const range = { start: 0, blocks: 256, blockSize: 4096, seed: packed ? 0x10c : 0x10b };
      const device = `disable-legacy=on,iommu_platform=on,ats=on${packed ? ',packed=on' : ''}`;
      const r = await runGuest({
        // Strict mode: the guest unmaps each request's buffers at once (QEMU sends INVALIDATEs).
        script: `ls /sys/class/iommu/ | sed 's/^/VDEVKIT-IOMMU /'\n${blkWriteReadScript({ device: '/dev/vda', ...range })}`,
        qemuArgs: ['-device', 'intel-iommu,intremap=off,device-iotlb=on', ...vhostUserBlkArgs(disk.socket).map((a) => (a.startsWith('vhost-user-blk-pci') ? `${a},${device}` : a))],
        append: 'intel_iommu=on iommu.strict=1',
      });
      assert.equal(r.exitCode, 0, `${r.output}\n--- back-end:\n${disk.peer.output()}`);
      assert.match(r.output, /VDEVKIT-IOMMU dmar\d/, 'the guest runs with the Intel IOMMU');
      assert.equal(guestSha256(r.output), patternSha256(range), r.output);
      assertBlocks(readFileSync(disk.image), range);
      await disk.peer.stop();
      const m = /IOTLB: (\d+) misses, (\d+) updates, (\d+) invalidations/.exec(disk.peer.output());
      assert.ok(m, disk.peer.output());
      t.diagnostic(m[0]);
      // Every request's buffers are at new IOVAs (strict unmapping): far more misses than the rings' three.
      assert.ok(Number(m[1]) >= 256, `misses: ${m[0]}`);
      assert.ok(Number(m[2]) >= Number(m[1]) - 3, `each miss answered by an UPDATE: ${m[0]}`);
      assert.ok(Number(m[3]) > 0, `the guest's unmaps reach us as INVALIDATEs: ${m[0]}`);
    } finally {
      await disk.close();
    }
  });
}
