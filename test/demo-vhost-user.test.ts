/** `npm start`'s vhost-user part: our back-end in a process of its own, our front-end and driver here. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { runVhostUserDemo } from '../src/demo/vhost-user-demo.js';

test('the vhost-user demo writes, reads back and checks 16 MiB through both ring layouts', { timeout: 60_000 }, async () => {
  const lines: string[] = [];
  await runVhostUserDemo((l) => lines.push(l));
  const out = lines.join('\n');
  assert.match(out, /\(split rings\): features VERSION_1 /);
  assert.match(out, /\(packed rings\): features VERSION_1 RING_PACKED /);
  assert.equal(out.match(/read it back in \d+ ms: identical, and in the image file/g)?.length, 2, out);
  assert.equal(out.match(/discard of 1 MiB: reads back as zeros/g)?.length, 2, out);
  assert.match(out, /the back-end: \d+ reads .* 0 errors; IOTLB: [1-9]\d* misses/);
  const m = /behind an IOMMU .*: 1 MiB written and read back identical; the back-end missed (\d+) IOTLB pages, each answered with an UPDATE \((\d+)\)/.exec(out);
  assert.ok(m, out);
  assert.ok(Number(m[1]) >= 3 && m[1] === m[2], out);
});
