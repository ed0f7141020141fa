/** `npm start`'s virtio-over-vfio-user part: our virtio-blk PCI device in a process of its own, our virtio PCI driver here. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { runVirtioPciDemo } from '../src/demo/virtio-pci-demo.js';

test('the virtio PCI demo writes, reads back and checks 8 MiB through both ring layouts', { timeout: 60_000 }, async () => {
  const lines: string[] = [];
  await runVirtioPciDemo((l) => lines.push(l));
  const out = lines.join('\n');
  assert.match(out, /PCI 1af4:1042, .*split rings of 128: features VERSION_1 EVENT_IDX /);
  assert.match(out, /packed rings of 128: features VERSION_1 RING_PACKED /);
  assert.equal(out.match(/2 queues, 3 MSI-X vectors/g)?.length, 2, out);
  assert.equal(out.match(/read it back in \d+ ms \(\d+ MB\/s\): identical, and in the image file/g)?.length, 2, out);
  assert.equal(out.match(/id "vdevkit-vpci-demo"/g)?.length, 2, out);
});
