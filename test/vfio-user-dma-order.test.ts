/**
 * Review: the client serves DMA_READ with a zero-copy view of its memory; the
 * 'data' handler's cork holds that reply until the whole chunk is processed,
 * so a DMA_WRITE to the same range later in the same chunk changes what the
 * earlier DMA_READ returns (commands must be processed in order).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { VfioUserServer } from '../src/vfio-user/server.js';
import { VfioUserClient } from '../src/vfio-user/client.js';
import { VfioUserDevice } from '../src/vfio-user/client-device.js';
import { SharedMemory } from '../src/sys/index.js';
import type { DeviceContext, VfioUserDeviceSpec } from '../src/vfio-user/device.js';

const sock = (name: string): string => path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'rv-cork-')), name);

for (const size of [1024, 8192]) {
  test(`DMA_READ then DMA_WRITE of the same ${size} bytes sent back to back: the read sees the old bytes`, async () => {
    let ctx: DeviceContext | null = null;
    const job: { result: Promise<Uint8Array> | null } = { result: null };
    const iova = 0x10000;
    const device: VfioUserDeviceSpec = {
      pci: { vendorId: 0x1af4, deviceId: 0x10f1, classCode: 0xff0000 },
      regions: {
        0: {
          size: 4096,
          read: (_o, out) => out.fill(0),
          write: () => {
            // In order: read the old bytes, then overwrite them.
            job.result = ctx!.dma.read(iova, size);
            void ctx!.dma.write(iova, new Uint8Array(size).fill(0xbb)).catch(() => {});
          },
        },
      },
      irqs: { msix: 1 },
      attach: (c) => (ctx = c),
    };
    const server = VfioUserServer.listen(sock('s.sock'), { device });
    const client = await VfioUserClient.connect(server.path);
    const dev = new VfioUserDevice(client);
    const guest = SharedMemory.create(0x10000);
    guest.bytes.fill(0xaa);
    try {
      await client.dmaMap({ iova, size: 0x10000, memory: guest, passFd: false });
      await dev.write(0, 0, Uint8Array.of(1, 0, 0, 0));
      assert.ok(job.result);
      const got = await job.result;
      assert.equal(guest.bytes[0], 0xbb, 'the write landed');
      assert.equal(got[0], 0xaa, `DMA_READ returned bytes written by the later DMA_WRITE (0x${got[0]!.toString(16)})`);
    } finally {
      dev.close();
      client.close();
      server.close();
      guest.close();
    }
  });
}
