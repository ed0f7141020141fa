/**
 * The virtio-over-vfio-user part of `npm start`: our virtio-blk PCI device
 * in a process of its own (`vdevkit serve virtio-blk --file IMAGE --queues 2`),
 * driven from this one by VirtioPciBlkDriver (src/virtio/pci-blk-driver.ts)
 * as a guest kernel would: config space capabilities walked, BAR4 common cfg
 * programmed over REGION_READ/WRITE, rings and buffers in memfd memory
 * DMA-mapped into the device, kicks written to the notify area, completions
 * by MSI-X eventfds. No QEMU is needed.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { VirtioPciBlkDriver } from '../virtio/pci-blk-driver.js';
import { VirtioFeature as VF } from '../vhost-user/constants.js';
import { BlkFeature } from '../devices/vhost-user-blk.js';

const MAIN = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../cli/main.js');
const MiB = 1024 * 1024;
const IMAGE_BYTES = 32 * MiB;
/** Bytes written and read back per ring layout, in requests of CHUNK. */
const TOTAL = 8 * MiB;
const CHUNK = 128 * 1024;

/** The features worth naming, by bit. */
const NAMED: Record<string, number> = {
  VERSION_1: VF.VERSION_1,
  RING_PACKED: VF.RING_PACKED,
  EVENT_IDX: VF.EVENT_IDX,
  INDIRECT_DESC: VF.INDIRECT_DESC,
  MQ: BlkFeature.MQ,
  FLUSH: BlkFeature.FLUSH,
  DISCARD: BlkFeature.DISCARD,
  WRITE_ZEROES: BlkFeature.WRITE_ZEROES,
  SEG_MAX: BlkFeature.SEG_MAX,
  BLK_SIZE: BlkFeature.BLK_SIZE,
};

/** The demo's byte at `offset` of the disk (a different run of bytes per ring layout). */
const demoByte = (offset: number, seed: number): number => ((offset >>> 10) * 59 + offset * 17 + seed) & 0xff;

const mbps = (bytes: number, ms: number): string => (bytes / 1e6 / (ms / 1000)).toFixed(0);

export async function runVirtioPciDemo(log: (line: string) => void = console.log): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdevkit-vpci-demo-'));
  const image = path.join(dir, 'disk.img');
  const sock = path.join(dir, 'vblk.sock');
  fs.writeFileSync(image, '');
  fs.truncateSync(image, IMAGE_BYTES);
  log(`vdevkit demo: a virtio-blk PCI device over vfio-user: vdevkit serve virtio-blk --file ${image} --queues 2 (a process of its own), driven by our userspace virtio PCI driver`);
  const server = spawn(process.execPath, [MAIN, 'serve', 'virtio-blk', '--socket', sock, '--file', image, '--queues', '2', '--serial', 'vdevkit-vpci-demo'], { stdio: ['ignore', 'ignore', 'pipe'] });
  let serverLog = '';
  server.stderr!.on('data', (d: Buffer) => (serverLog += d.toString()));
  const exited = new Promise<void>((resolve) => server.once('exit', () => resolve()));
  try {
    for (let i = 0; !fs.existsSync(sock); i++) {
      if (i > 500 || server.exitCode !== null) throw new Error(`the server did not start:\n${serverLog}`);
      await new Promise((r) => setTimeout(r, 10));
    }
    for (const packed of [false, true]) {
      const disk = await VirtioPciBlkDriver.connect(sock, { queues: 2, packed });
      try {
        const t = disk.transport;
        const names = Object.keys(NAMED).filter((n) => t.hasFeature(NAMED[n]!));
        log(
          `  PCI ${hex4(t.ids.vendorId)}:${hex4(t.ids.deviceId)}, common cfg BAR${t.common.bar}+0x${t.common.offset.toString(16)}, notify BAR${t.notifyCap.bar}+0x${t.notifyCap.offset.toString(16)} x${t.notifyMultiplier}; ` +
            `${packed ? 'packed' : 'split'} rings of ${disk.queueSize}: features ${names.join(' ')}; ${disk.numQueues} queues, ${disk.vectors} MSI-X vectors (config + one per queue), kicks by ${disk.notifyBy}; ` +
            `${disk.capacity / MiB} MiB, id "${await disk.getId()}"`,
        );
        const seed = packed ? 1 : 0;
        const base = packed ? 16 * MiB : 0;
        const data = Buffer.alloc(TOTAL);
        for (let i = 0; i < TOTAL; i++) data[i] = demoByte(base + i, seed);
        const n = TOTAL / CHUNK;
        let t0 = performance.now();
        const writes: Promise<void>[] = [];
        for (let k = 0; k < n; k++) writes.push(disk.write(base + k * CHUNK, data.subarray(k * CHUNK, (k + 1) * CHUNK), { queue: k % 2 }));
        await Promise.all(writes);
        await disk.flush();
        const tw = performance.now() - t0;
        t0 = performance.now();
        const reads: Promise<Buffer>[] = [];
        for (let k = 0; k < n; k++) reads.push(disk.read(base + k * CHUNK, CHUNK, { queue: (k + 1) % 2 }));
        const back = Buffer.concat(await Promise.all(reads));
        const tr = performance.now() - t0;
        if (!back.equals(data)) throw new Error('read back differs from what was written');
        if (!fs.readFileSync(image).subarray(base, base + TOTAL).equals(data)) throw new Error('the image file does not hold what was written');
        log(
          `  wrote ${TOTAL / MiB} MiB (${n} requests of ${CHUNK / 1024} KiB in flight, 2 queues) + flush in ${tw.toFixed(0)} ms (${mbps(TOTAL, tw)} MB/s), ` +
            `read it back in ${tr.toFixed(0)} ms (${mbps(TOTAL, tr)} MB/s): identical, and in the image file; ${disk.stats.kicks} kicks, ${disk.stats.interrupts} interrupts for ${disk.stats.completed} requests`,
        );
      } finally {
        await disk.close();
      }
    }
    log('  the device is the vhost-user-blk disk of the vhost-user demo behind the virtio PCI modern transport (src/devices/virtio-blk-pci.ts)');
  } finally {
    server.kill('SIGTERM');
    await exited;
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

const hex4 = (n: number): string => n.toString(16).padStart(4, '0');
