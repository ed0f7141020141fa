/**
 * ctx.dma.hold (the server feature the virtio PCI transport needs for its
 * I/O on libuv's thread pool): a held window stays mapped through a
 * DMA_UNMAP, which is answered only after the release, and through a
 * client's disconnect; windows without fd are skipped; a range not mapped
 * is ENOENT.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { VfioUserServer } from '../src/vfio-user/server.js';
import { VfioUserClient } from '../src/vfio-user/client.js';
import { SharedMemory } from '../src/sys/index.js';
import type { DeviceContext, DmaWindow, VfioUserDeviceSpec } from '../src/vfio-user/device.js';
import { tick } from './helpers/sys.js';

const IOVA = 0x10_0000;
const SIZE = 0x4000;

function device(): { spec: VfioUserDeviceSpec; ctx: () => DeviceContext; unmapped: DmaWindow[] } {
  let ctx: DeviceContext | null = null;
  const unmapped: DmaWindow[] = [];
  const spec: VfioUserDeviceSpec = {
    pci: { vendorId: 0x1234, deviceId: 0x5678, classCode: 0xff0000 },
    attach: (c) => (ctx = c),
    dmaUnmapped: (w) => unmapped.push(w),
  };
  return { spec, ctx: () => ctx!, unmapped };
}

const sock = (): string => path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'vdk-hold-')), 's.sock');

test('a held window stays mapped through DMA_UNMAP, answered after the release', async (t) => {
  const d = device();
  const server = VfioUserServer.listen(sock(), { device: d.spec });
  const client = await VfioUserClient.connect(server.path);
  t.after(() => {
    client.close();
    server.close();
  });
  const mem = SharedMemory.create(SIZE);
  t.after(() => mem.close());
  await client.dmaMap({ iova: IOVA, size: SIZE, memory: mem });
  const view = d.ctx().dma.view(IOVA, SIZE, { write: true })!;
  assert.equal(view.length, SIZE);
  const release = d.ctx().dma.hold(IOVA + 0x1000, 16);
  let answered = false;
  const unmap = client.dmaUnmap(IOVA, SIZE).then(() => (answered = true));
  await tick(30);
  assert.equal(d.unmapped.length, 1, 'dmaUnmapped ran at once');
  assert.equal(d.ctx().dma.windows().length, 0, 'the window left the table');
  assert.equal(d.ctx().dma.view(IOVA, 16), null, 'no new access finds it');
  assert.equal(answered, false, 'the DMA_UNMAP waits for the release');
  assert.equal(view.length, SIZE, 'the mapping is still there');
  view[5] = 0x77; // I/O still landing
  assert.equal(mem.bytes[5], 0x77);
  release();
  await unmap;
  assert.equal(view.length, 0, 'closed at the release');
  release(); // a second call does nothing
});

test('holds: released windows unmap at once; without fd they are skipped; unmapped ranges are ENOENT; a disconnect closes at the release', async (t) => {
  const d = device();
  const server = VfioUserServer.listen(sock(), { device: d.spec });
  t.after(() => server.close());
  let client = await VfioUserClient.connect(server.path);
  const mem = SharedMemory.create(SIZE);
  const side = SharedMemory.create(SIZE);
  t.after(() => {
    mem.close();
    side.close();
  });
  await client.dmaMap({ iova: IOVA, size: SIZE, memory: mem });
  await client.dmaMap({ iova: IOVA + SIZE, size: SIZE, memory: side, passFd: false });
  d.ctx().dma.hold(IOVA, SIZE)(); // held and released: nothing waits
  await client.dmaUnmap(IOVA, SIZE);
  const release = d.ctx().dma.hold(IOVA + SIZE, SIZE); // a message window: nothing to keep
  await client.dmaUnmap(IOVA + SIZE, SIZE);
  release();
  assert.throws(() => d.ctx().dma.hold(IOVA, 16), (err: Error & { errno?: number }) => err.errno === 2);

  await client.dmaMap({ iova: IOVA, size: SIZE, memory: mem });
  const view = d.ctx().dma.view(IOVA, SIZE)!;
  const held = d.ctx().dma.hold(IOVA, SIZE);
  client.close();
  await tick(30);
  assert.equal(view.length, SIZE, 'the client is gone, the held mapping stays');
  held();
  assert.equal(view.length, 0);
  // The device serves the next client as before.
  client = await VfioUserClient.connect(server.path);
  t.after(() => client.close());
  await client.dmaMap({ iova: IOVA, size: SIZE, memory: mem });
  assert.equal(d.ctx().dma.windows().length, 1);
});
