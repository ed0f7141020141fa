/**
 * Our vhost-user front-end and VirtioBlkDriver against real back-ends:
 *
 * - qemu-storage-daemon (libvhost-user), file export: a pattern written, read
 *   back identical, flush, get-id, discard, write-zeroes; the data is in the
 *   host file. Its null-co export with 4 queues: thousands of requests in
 *   flight on every queue complete.
 * - our back-end as a process of its own (`vdevkit vhost-user-blk`): the same
 *   block tests, split and packed rings (qemu-storage-daemon has no packed).
 * - reconnect: qemu-storage-daemon SIGKILLed mid-I/O and started again on the
 *   same socket; it offers no INFLIGHT_SHMFD (7.2), so the driver resubmits
 *   what was on its rings; every write is in the host file.
 *
 * Peers are started here (by pid); a missing one fails the test.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { scratchDir, startPeer, waitForSocket, type Peer } from './peers.js';
import { VirtioBlkDriver } from '../../src/vhost-user/blk-driver.js';
import { VhostUserFrontend } from '../../src/vhost-user/frontend.js';

const MiB = 1 << 20;
const CLI = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../src/cli/main.js');

function pattern(n: number, seed: number): Buffer {
  const b = Buffer.alloc(n);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < n; i += 4) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b.writeUInt32LE(x >>> 0, i);
  }
  return b;
}

async function withPeer(kind: 'qsd-file' | 'qsd-null' | 'ours', queues: number, fn: (socket: string, image: string, peer: Peer) => Promise<void>): Promise<void> {
  const scratch = scratchDir('vdevkit-fe-');
  const image = path.join(scratch.dir, 'disk.img');
  const socket = path.join(scratch.dir, 'blk.sock');
  writeFileSync(image, '');
  truncateSync(image, 64 * MiB);
  const args =
    kind === 'ours'
      ? [CLI, 'vhost-user-blk', '--socket', socket, '--file', image, '--queues', String(queues)]
      : [
          '--blockdev',
          kind === 'qsd-file' ? `driver=file,node-name=disk0,filename=${image},cache.direct=off` : 'driver=null-co,node-name=disk0,size=1073741824,read-zeroes=on',
          '--export',
          `type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=${socket},writable=on,num-queues=${queues}`,
        ];
  const peer = startPeer(kind === 'ours' ? process.execPath : 'qemu-storage-daemon', args);
  try {
    await waitForSocket(socket, peer);
    await fn(socket, image, peer);
  } catch (err) {
    throw new Error(`${(err as Error).stack}\n--- peer output:\n${peer.output()}`);
  } finally {
    await peer.stop();
    scratch.remove();
  }
}

/** The block tests every back-end passes. */
async function blockTests(d: VirtioBlkDriver, image: string, expectId: RegExp): Promise<void> {
  assert.equal(d.size, 64 * MiB);
  const a = pattern(256 * 1024, 1);
  const b = pattern(3 * MiB, 2); // larger than one transfer: split in pieces
  await d.write(0, a);
  await d.write(8 * MiB, b);
  assert.ok((await d.read(0, a.length)).equals(a), 'read back identical');
  assert.ok((await d.read(8 * MiB, b.length)).equals(b), 'the 3 MiB write read back identical');
  await d.flush();
  assert.match(await d.getId(), expectId);
  const file = readFileSync(image);
  assert.ok(file.subarray(0, a.length).equals(a), 'the data is in the host file');
  assert.ok(file.subarray(8 * MiB, 8 * MiB + b.length).equals(b));
  await d.writeZeroes(4096, 8192);
  const z = await d.read(0, 16384);
  assert.ok(z.subarray(4096, 12288).every((x) => x === 0), 'write-zeroes range reads as zeros');
  assert.ok(z.subarray(0, 4096).equals(a.subarray(0, 4096)) && z.subarray(12288).equals(a.subarray(12288, 16384)), 'around it unchanged');
  await d.discard(16 * MiB, MiB);
  await d.flush();
  assert.ok(readFileSync(image).subarray(4096, 12288).every((x) => x === 0), 'zeros in the host file');
  // Many requests in flight on every queue, verified.
  const ps: Promise<void>[] = [];
  for (let i = 0; i < 512; i++) {
    const off = 20 * MiB + i * 4096;
    const data = pattern(4096, 100 + i);
    ps.push(d.write(off, data, { queue: i % d.numQueues }).then(async () => assert.ok((await d.read(off, 4096, { queue: (i + 1) % d.numQueues })).equals(data), `block ${i}`)));
  }
  await Promise.all(ps);
  assert.equal(d.inFlight, 0);
}

test('qemu-storage-daemon file export: pattern, read back, flush, get-id, discard, write-zeroes; the data in the host file', { timeout: 60_000 }, async () => {
  await withPeer('qsd-file', 2, async (socket, image) => {
    const d = await VirtioBlkDriver.connect(socket, { queues: 2 });
    try {
      assert.equal(d.packed, false, 'qemu-storage-daemon has no packed rings');
      assert.equal(d.frontend.offeredMemSlots, 32);
      await blockTests(d, image, /^vhost_user_blk$/);
    } finally {
      await d.close();
    }
    // It serves the next front-end after a disconnect: again, with a new session.
    const d2 = await VirtioBlkDriver.connect(socket, { queues: 1, indirect: false, eventIdx: false });
    try {
      assert.ok((await d2.read(0, 4096)).equals(pattern(256 * 1024, 1).subarray(0, 4096)));
    } finally {
      await d2.close();
    }
  });
});

test('qemu-storage-daemon null-co export, 4 queues: 20000 requests, up to 128 in flight per queue', { timeout: 60_000 }, async () => {
  await withPeer('qsd-null', 4, async (socket) => {
    const d = await VirtioBlkDriver.connect(socket, { queues: 4, queueSize: 128 });
    try {
      assert.equal(d.numQueues, 4);
      assert.equal(d.size, 1 << 30);
      let maxInFlight = 0;
      const ps: Promise<unknown>[] = [];
      for (let i = 0; i < 20000; i++) {
        ps.push(i % 2 ? d.read((i % 4096) * 4096, 4096, { queue: i % 4 }) : d.write((i % 4096) * 4096, Buffer.alloc(4096, i), { queue: i % 4 }));
        if (i % 1000 === 999) maxInFlight = Math.max(maxInFlight, d.inFlight);
      }
      const done = await Promise.all(ps);
      assert.equal(done.length, 20000);
      assert.ok(maxInFlight > 128, `${maxInFlight} requests in flight or waiting at once`);
      assert.ok(((await d.read(0, 4096)) as Buffer).every((x) => x === 0), 'null-co reads zeroes');
    } finally {
      await d.close();
    }
  });
});

for (const packed of [false, true]) {
  test(`our back-end (vdevkit vhost-user-blk process), ${packed ? 'packed' : 'split'} rings, 2 queues: the same block tests`, { timeout: 60_000 }, async () => {
    await withPeer('ours', 2, async (socket, image) => {
      const d = await VirtioBlkDriver.connect(socket, { queues: 2, packed });
      try {
        assert.equal(d.packed, packed);
        await blockTests(d, image, /^vdevkit-blk$/);
      } finally {
        await d.close();
      }
    });
  });
}

test('probe-level front-end against qemu-storage-daemon and ours: features, protocol features, queue count, config', { timeout: 60_000 }, async () => {
  for (const kind of ['qsd-file', 'ours'] as const) {
    await withPeer(kind, 2, async (socket) => {
      const fe = await VhostUserFrontend.connect(socket);
      try {
        await fe.handshake({ queues: 2, config: 'require' });
        assert.equal(fe.maxQueues, 2);
        assert.ok(fe.offeredFeatures & (1n << 32n), 'VERSION_1');
        const cfg = await fe.getConfig(0, 36);
        assert.equal(cfg.readBigUInt64LE(0), BigInt((64 * MiB) / 512));
        assert.equal(cfg.readUInt16LE(34), 2, 'num_queues');
      } finally {
        fe.close();
      }
    });
  }
});

test('our back-end killed (SIGKILL) with requests in flight: every request settles at once (DISCONNECTED), the driver closes cleanly', { timeout: 30_000 }, async () => {
  await withPeer('ours', 2, async (socket, _image, peer) => {
    const d = await VirtioBlkDriver.connect(socket, { queues: 2 });
    const ps: Promise<unknown>[] = [];
    for (let i = 0; i < 2000; i++) ps.push(d.read((i % 1024) * 4096, 4096));
    process.kill(peer.pid, 'SIGKILL');
    const t0 = Date.now();
    const settled = await Promise.allSettled(ps);
    assert.ok(Date.now() - t0 < 5000, 'no hang');
    const failed = settled.filter((s) => s.status === 'rejected') as PromiseRejectedResult[];
    assert.ok(failed.length > 0, 'some requests were in flight at the kill');
    for (const f of failed) assert.equal((f.reason as { code?: string }).code, 'DISCONNECTED', String(f.reason));
    await assert.rejects(d.read(0, 512), /closed|DISCONNECTED/i);
    await d.close();
    assert.equal(d.frontend.closed, true);
  });
});

test('reconnect: qemu-storage-daemon (file export, 2 queues) SIGKILLed mid-I/O and started again on the same socket: every request completes once, the data in the host file', { timeout: 60_000 }, async (t) => {
  const scratch = scratchDir('vdevkit-fe-rc-');
  const image = path.join(scratch.dir, 'disk.img');
  const socket = path.join(scratch.dir, 'blk.sock');
  writeFileSync(image, '');
  truncateSync(image, 64 * MiB);
  const args = [
    '--blockdev',
    `driver=file,node-name=disk0,filename=${image},cache.direct=off`,
    '--export',
    `type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=${socket},writable=on,num-queues=2`,
  ];
  let peer = startPeer('qemu-storage-daemon', args);
  let first = '';
  try {
    await waitForSocket(socket, peer);
    const d = await VirtioBlkDriver.connect(socket, { queues: 2, queueSize: 128, reconnect: { delayMs: 20, timeoutMs: 20_000 } });
    try {
      // qemu-storage-daemon 7.2 does not offer INFLIGHT_SHMFD: the driver resubmits what it had on the rings.
      assert.equal(d.inflightRegion, null, 'no inflight region from qemu-storage-daemon');
      let info: { resubmittedBy: string; pending: number } | undefined;
      d.on('reconnected', (i) => (info = i));
      const N = 3000;
      let done = 0;
      let killed: Promise<void> | null = null;
      const ps: Promise<void>[] = [];
      for (let i = 0; i < N; i++) {
        ps.push(
          d.write(i * 4096, pattern(4096, i + 1)).then(() => {
            // After 200 completions the rings are full (2800 to go): SIGKILL, wait, start it again.
            if (++done === 200) {
              const old = peer;
              killed = (async () => {
                process.kill(old.pid, 'SIGKILL');
                await old.exited;
                first = old.output();
                rmSync(socket, { force: true });
                peer = startPeer('qemu-storage-daemon', args);
                await waitForSocket(socket, peer);
              })();
            }
          }),
        );
      }
      await Promise.all(ps);
      assert.ok(killed, 'qemu-storage-daemon was killed');
      await killed;
      assert.equal(info?.resubmittedBy, 'driver');
      assert.ok((info?.pending ?? 0) > 0, 'requests were on the rings at the kill');
      t.diagnostic(`requests on the rings at the kill, resubmitted by the driver: ${info?.pending}`);
      await d.flush();
      const img = readFileSync(image);
      for (let i = 0; i < N; i++) assert.ok(img.subarray(i * 4096, (i + 1) * 4096).equals(pattern(4096, i + 1)), `block ${i}`);
      assert.ok((await d.read(5 * 4096, 4096)).equals(pattern(4096, 6)));
    } finally {
      await d.close();
    }
  } catch (err) {
    throw new Error(`${(err as Error).stack}\n--- first qemu-storage-daemon:\n${first}\n--- second:\n${peer.output()}`);
  } finally {
    await peer.stop();
    scratch.remove();
  }
});
