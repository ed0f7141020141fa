/**
 * The vhost-user part of `npm start`: our vhost-user-blk back-end in a process
 * of its own (`vdevkit vhost-user-blk --file IMAGE --queues 2`), driven by our
 * front-end and userspace virtio-blk driver in this one, over a real UNIX
 * socket with memfd guest memory and eventfd kicks and calls. The same
 * back-end serves a Linux guest under QEMU (test/interop/vhost-user-blk.test.ts);
 * no QEMU is needed here.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { VirtioBlkDriver } from '../vhost-user/blk-driver.js';
import { VirtioFeature as VF } from '../vhost-user/constants.js';
import { BlkFeature } from '../devices/vhost-user-blk.js';

const MAIN = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../cli/main.js');
const MiB = 1024 * 1024;

const FEATURE_NAMES: [number, string][] = [
  [VF.VERSION_1, 'VERSION_1'],
  [VF.RING_PACKED, 'RING_PACKED'],
  [VF.EVENT_IDX, 'EVENT_IDX'],
  [VF.INDIRECT_DESC, 'INDIRECT_DESC'],
  [BlkFeature.MQ, 'MQ'],
  [BlkFeature.FLUSH, 'FLUSH'],
  [BlkFeature.DISCARD, 'DISCARD'],
  [BlkFeature.WRITE_ZEROES, 'WRITE_ZEROES'],
  [BlkFeature.SEG_MAX, 'SEG_MAX'],
  [BlkFeature.BLK_SIZE, 'BLK_SIZE'],
];

/** The byte of the pattern at `offset` (the same on both sides). */
function patternByte(offset: number): number {
  return (offset * 2654435761 + (offset >>> 12)) >>> 24;
}

export async function runVhostUserDemo(log: (line: string) => void = console.log): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdevkit-vu-demo-'));
  const image = path.join(dir, 'disk.img');
  const sock = path.join(dir, 'blk.sock');
  fs.writeFileSync(image, '');
  fs.truncateSync(image, 64 * MiB);
  log(`vdevkit demo: a virtio-blk disk over vhost-user: vdevkit vhost-user-blk --file ${image} --queues 2 --iommu (a process of its own)`);
  const backend = spawn(process.execPath, [MAIN, 'vhost-user-blk', '--socket', sock, '--file', image, '--queues', '2', '--iommu'], { stdio: ['ignore', 'ignore', 'pipe'] });
  let backendLog = '';
  backend.stderr!.on('data', (d: Buffer) => (backendLog += d.toString()));
  const exited = new Promise<void>((resolve) => backend.once('exit', () => resolve()));
  try {
    for (let i = 0; !fs.existsSync(sock); i++) {
      if (i > 500 || backend.exitCode !== null) throw new Error(`the back-end did not start:\n${backendLog}`);
      await new Promise((r) => setTimeout(r, 10));
    }
    for (const packed of [false, true]) {
      const disk = await VirtioBlkDriver.connect(sock, { queues: 2, packed });
      try {
        const fe = disk.frontend;
        const names = FEATURE_NAMES.filter(([b]) => fe.hasFeature(b)).map(([, n]) => n);
        log(`  our front-end connected (${packed ? 'packed' : 'split'} rings): features ${names.join(' ')}; ${disk.size / MiB} MiB, ${disk.numQueues} queues, id "${await disk.getId()}"`);
        // 16 MiB in 256 KiB writes, all in flight at once over both queues, then read back.
        const chunk = 256 * 1024;
        const total = 16 * MiB;
        const base = packed ? 32 * MiB : 0;
        const data = Buffer.alloc(total);
        for (let i = 0; i < total; i++) data[i] = patternByte(base + i);
        let t0 = performance.now();
        const writes: Promise<void>[] = [];
        for (let at = 0; at < total; at += chunk) writes.push(disk.write(base + at, data.subarray(at, at + chunk), { queue: (at / chunk) % 2 }));
        await Promise.all(writes);
        await disk.flush();
        const tw = performance.now() - t0;
        t0 = performance.now();
        const reads: Promise<Buffer>[] = [];
        for (let at = 0; at < total; at += chunk) reads.push(disk.read(base + at, chunk, { queue: (at / chunk) % 2 }));
        const back = Buffer.concat(await Promise.all(reads));
        const tr = performance.now() - t0;
        if (!back.equals(data)) throw new Error('read back differs from what was written');
        const onDisk = Buffer.alloc(total);
        const fd = fs.openSync(image, 'r');
        fs.readSync(fd, onDisk, 0, total, base);
        fs.closeSync(fd);
        if (!onDisk.equals(data)) throw new Error('the image file does not hold what was written');
        log(`  wrote 16 MiB (64 requests in flight, 2 queues) + flush in ${tw.toFixed(0)} ms, read it back in ${tr.toFixed(0)} ms: identical, and in the image file`);
        await disk.discard(base, MiB);
        const z = await disk.read(base, MiB);
        log(`  discard of 1 MiB: reads back ${z.every((b) => b === 0) ? 'as zeros' : 'NOT as zeros'}`);
      } finally {
        await disk.close();
      }
    }
    // Behind an IOMMU: the driver's addresses are IOVAs; the back-end asks for each page it lacks
    // (BACKEND_IOTLB_MSG MISS) and our front-end answers as QEMU's vIOMMU does (IOTLB_MSG UPDATE).
    {
      const disk = await VirtioBlkDriver.connect(sock, { iommu: 'identity' });
      try {
        const data = Buffer.alloc(MiB);
        for (let i = 0; i < data.length; i++) data[i] = patternByte(48 * MiB + i);
        for (let at = 0; at < MiB; at += 64 * 1024) await disk.write(48 * MiB + at, data.subarray(at, at + 64 * 1024));
        const back = await disk.read(48 * MiB, MiB);
        if (!back.equals(data)) throw new Error('read back behind the IOMMU differs from what was written');
        const st = disk.frontend.iotlbStats;
        log(`  behind an IOMMU (ACCESS_PLATFORM, our front-end as the IOMMU): 1 MiB written and read back identical; the back-end missed ${st.misses} IOTLB pages, each answered with an UPDATE (${st.updates})`);
      } finally {
        await disk.close();
      }
    }
    log('  the same back-end serves a Linux guest under QEMU 7.2, behind its intel-iommu too (npm run test:interop)');
  } finally {
    backend.kill('SIGTERM');
    await exited;
    fs.rmSync(dir, { recursive: true, force: true });
  }
  const stats = /stopped: (.*)/.exec(backendLog);
  if (stats) log(`  the back-end: ${stats[1]}`);
}
