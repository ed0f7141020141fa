import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { VfioUserClient } from '../src/vfio-user/client.js';
import { VfioUserDevice } from '../src/vfio-user/client-device.js';
import { VfioUserServer } from '../src/vfio-user/server.js';
import { migrate } from '../src/vfio-user/migrate.js';
import { gpioDevice, type GpioDevice } from '../src/devices/gpio.js';
import { MigrationState } from '../src/vfio/uapi.js';
import { VfioError } from '../src/vfio/errors.js';
import type { VfioUserDeviceSpec } from '../src/vfio-user/device.js';

async function served(t: TestContext, device: VfioUserDeviceSpec): Promise<VfioUserDevice> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vfm-'));
  const server = VfioUserServer.listen(path.join(dir, 's.sock'), { device });
  const client = await VfioUserClient.connect(server.path);
  const dev = new VfioUserDevice(client);
  t.after(() => {
    dev.close();
    client.close();
    server.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });
  return dev;
}

/** The gpio record, by hand: 16 little-endian int32 counts. */
const record = (counts: number[]): Buffer => Buffer.concat(counts.map((c) => { const b = Buffer.alloc(4); b.writeInt32LE(c); return b; }));

test('migrate(): pre-copy rounds carry writes made while the source runs; each chunk written as read', async (t) => {
  const a = gpioDevice();
  const b = gpioDevice();
  const src = await served(t, a);
  const dst = await served(t, b);
  await src.write(2, 0, Uint8Array.of(0x03)); // pins 0, 1
  const seen: number[] = [];
  const r = await migrate(src, dst, {
    chunkSize: 64,
    onPreCopy: async (round) => {
      seen.push(round);
      if (round < 2) await src.write(2, 4, Uint8Array.of(0x80)); // pin 15, while running
      return round < 2;
    },
  });
  assert.deepEqual(seen, [0, 1, 2]);
  assert.deepEqual(r.chunks, [64, 64, 64]);
  assert.equal(r.preCopyBytes, 192);
  assert.equal(r.stopCopyBytes, 0);
  const want = [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
  assert.deepEqual(b.pins, want);
  assert.equal(await src.migrationState(), MigrationState.STOP);
  assert.equal(await dst.migrationState(), MigrationState.RUNNING);
  // And back, stop-copy only: the record is the layout built by hand.
  await src.setMigrationState(MigrationState.RUNNING);
  const back = await migrate(dst, src, { chunkSize: 64, preCopy: false });
  assert.deepEqual(back.chunks, [64]);
  assert.deepEqual(a.pins, want);
  assert.deepEqual(record(a.pins as number[]), record(want));
});

test('migrate(): a destination that refuses the stream leaves the source running with its state', async (t) => {
  const a: GpioDevice = gpioDevice();
  const src = await served(t, a);
  // A destination whose load refuses everything.
  const refusing: VfioUserDeviceSpec = {
    pci: { vendorId: 0x494f, deviceId: 0x0dc8, classCode: 0 },
    regions: {},
    migration: {
      save: () => new Uint8Array(0),
      load: () => {
        throw new VfioError('NOPE', 22, 'refused');
      },
    },
  };
  const dst = await served(t, refusing);
  await src.write(2, 0, Uint8Array.of(0x01));
  // gpio's stream goes by; the refusal comes when the destination leaves RESUMING.
  await assert.rejects(migrate(src, dst, { chunkSize: 64 }));
  assert.equal(await src.migrationState(), MigrationState.RUNNING);
  assert.deepEqual(a.pins.slice(0, 2), [1, 0]);
  await assert.rejects(migrate(src, dst, { chunkSize: 0 }), TypeError);
});
