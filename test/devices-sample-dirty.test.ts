/**
 * Review: the sample device's copy into an fd-mapped destination uses
 * ctx.dma.readInto(view). view({write:true}) marks the pages dirty when the
 * view is taken; the bytes land later, chunk by chunk. A dirty-page report
 * taken mid-copy clears those bits and nothing marks the later bytes again,
 * so a migration that re-sends only re-dirtied pages misses them.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { VfioUserServer } from '../src/vfio-user/server.js';
import { VfioUserClient } from '../src/vfio-user/client.js';
import { VfioUserDevice } from '../src/vfio-user/client-device.js';
import { sampleDevice, SampleReg } from '../src/devices/sample.js';
import { SharedMemory } from '../src/sys/index.js';

const sock = (name: string): string => path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'rv-dirty-')), name);
const KiB = 1024;
const MiB = 1024 * KiB;
const u64 = (v: number): Buffer => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt(v));
  return b;
};
const u32 = (v: number): Buffer => {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(v >>> 0);
  return b;
};

test('sample copy message -> fd window with dirty logging: pages written after a mid-copy report are reported again', async () => {
  const sample = sampleDevice();
  const server = VfioUserServer.listen(sock('s.sock'), { device: sample, maxDataXferSize: 64 * KiB });
  const client = await VfioUserClient.connect(server.path, { maxDataXferSize: 64 * KiB });
  const dev = new VfioUserDevice(client);
  const F = 0x1000_0000;
  const M = 0x2000_0000;
  const len = 3 * MiB;
  const fdMem = SharedMemory.create(4 * MiB);
  const msgMem = SharedMemory.create(4 * MiB);
  try {
    for (let i = 0; i < len; i++) msgMem.bytes[i] = (i * 7 + 1) & 0xff;
    await client.dmaMap({ iova: F, size: 4 * MiB, memory: fdMem });
    await client.dmaMap({ iova: M, size: 4 * MiB, memory: msgMem, passFd: false });
    await dev.startDmaLogging(4096);
    await dev.dmaLoggingReport(F, 4 * MiB, 4096); // start clean
    await dev.write(0, SampleReg.DMA_SRC, u64(M));
    await dev.write(0, SampleReg.DMA_DST, u64(F));
    await dev.write(0, SampleReg.DMA_LEN, u32(len));
    await dev.write(0, SampleReg.DMA_CMD, u32(1));
    // Pre-copy round: report, then copy the reported pages.
    const r1 = await dev.dmaLoggingReport(F, 4 * MiB, 4096);
    const migrated = Buffer.from(fdMem.bytes.slice()); // at least as new as the report
    await sample.idle();
    const r2 = await dev.dmaLoggingReport(F, 4 * MiB, 4096);
    const bit = (b: Uint8Array, p: number): boolean => ((b[p >> 3]! >> (p & 7)) & 1) === 1;
    let stale = 0;
    let firstStale = -1;
    for (let p = 0; p < len / 4096; p++) {
      if (!bit(r1, p)) continue;
      const cur = fdMem.bytes.subarray(p * 4096, (p + 1) * 4096);
      const old = migrated.subarray(p * 4096, (p + 1) * 4096);
      if (!Buffer.from(cur).equals(old) && !bit(r2, p)) {
        stale++;
        if (firstStale < 0) firstStale = p;
      }
    }
    assert.equal(Buffer.from(fdMem.bytes.subarray(0, len)).equals(Buffer.from(msgMem.bytes.subarray(0, len))), true, 'copy done');
    assert.equal(stale, 0, `${stale} pages changed after report 1 but are clean in report 2 (first: page ${firstStale})`);
  } finally {
    dev.close();
    client.close();
    server.close();
    fdMem.close();
    msgMem.close();
    sample.dispose();
  }
});
