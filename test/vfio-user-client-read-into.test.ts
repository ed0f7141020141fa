/**
 * VfioUserDevice.readInto: region reads into the caller's buffer, by
 * REGION_READ messages whose data the socket receives in place, or from a
 * mapped sparse area.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { VfioUserServer } from '../src/vfio-user/server.js';
import { VfioUserClient } from '../src/vfio-user/client.js';
import { VfioUserDevice } from '../src/vfio-user/client-device.js';
import { sampleDevice, SAMPLE_BAR2_SIZE } from '../src/devices/sample.js';
import type { VfioUserDeviceSpec } from '../src/vfio-user/device.js';

const KiB = 1024;
const MiB = 1024 * 1024;
const sock = (name: string): string => path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'vfu-readinto-')), name);
/** The byte the device serves at region offset i (computed independently below). */
const byteAt = (i: number): number => ((i * 7) ^ (i >>> 9)) & 0xff;

test('readInto of 3 MiB + 5 bytes from a message-only region in 64 KiB REGION_READs: exact bytes, nothing outside dest written', async (t) => {
  const size = 4 * MiB;
  const device: VfioUserDeviceSpec = {
    pci: { vendorId: 0x1af4, deviceId: 0x10f2, classCode: 0xff0000 },
    regions: {
      0: {
        size,
        read: (offset, out) => {
          for (let i = 0; i < out.length; i++) out[i] = byteAt(offset + i);
        },
      },
    },
  };
  const server = VfioUserServer.listen(sock('r.sock'), { device, maxDataXferSize: 64 * KiB });
  const client = await VfioUserClient.connect(server.path, { maxDataXferSize: 64 * KiB });
  const dev = new VfioUserDevice(client);
  t.after(() => {
    dev.close();
    client.close();
    server.close();
  });
  const len = 3 * MiB + 5;
  const offset = 4096 + 3;
  const backing = new Uint8Array(len + 64).fill(0xa5);
  const dest = backing.subarray(32, 32 + len);
  await dev.readInto(0, offset, dest);
  for (let i = 0; i < len; i += 997) assert.equal(dest[i], byteAt(offset + i), `byte ${i}`);
  assert.equal(dest[len - 1], byteAt(offset + len - 1), 'last byte');
  assert.deepEqual([...backing.subarray(0, 32)], Array(32).fill(0xa5), 'before dest');
  assert.deepEqual([...backing.subarray(32 + len)], Array(32).fill(0xa5), 'after dest');
  // The same through read(): equal.
  const copy = await dev.read(0, offset, len);
  assert.ok(Buffer.from(copy).equals(Buffer.from(dest)));
  // dest of the wrong size for one message is refused by regionRead.
  await assert.rejects(client.regionRead(0, 0, 16, new Uint8Array(8)), /into has 8 bytes/);
});

test('readInto from a mapped sparse area copies from the mapping; from the hole by messages', async (t) => {
  const sample = sampleDevice();
  const server = VfioUserServer.listen(sock('s.sock'), { device: sample });
  const client = await VfioUserClient.connect(server.path);
  const dev = new VfioUserDevice(client);
  t.after(() => {
    dev.close();
    client.close();
    server.close();
    sample.dispose();
  });
  const pattern = new Uint8Array(SAMPLE_BAR2_SIZE);
  for (let i = 0; i < pattern.length; i++) pattern[i] = byteAt(i);
  sample.bar2Memory.bytes.set(pattern);
  await dev.regionInfo(2); // maps the sparse areas
  const holeBefore = sample.trapped;
  const mapped = new Uint8Array(8 * KiB);
  await dev.readInto(2, 1024, mapped); // inside [0, 16 KiB): the mapping
  assert.ok(Buffer.from(mapped).equals(Buffer.from(pattern.subarray(1024, 1024 + 8 * KiB))));
  assert.equal(sample.trapped, holeBefore, 'no message for a mapped range');
  const hole = new Uint8Array(8 * KiB);
  await dev.readInto(2, 20 * KiB, hole); // inside the hole: REGION_READ
  assert.ok(Buffer.from(hole).equals(Buffer.from(pattern.subarray(20 * KiB, 28 * KiB))));
  assert.ok(sample.trapped > holeBefore, 'read by messages');
});
