/**
 * VfioUserServer with a device factory releases each connection's device
 * when that connection closes (the device's dispose hook), so a server
 * taking connection after connection holds no fd or mapping per closed one;
 * a device object it was given is never disposed (its state outlives
 * connections). Driven by the raw-bytes client over real sockets.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { VfioUserServer } from '../src/vfio-user/server.js';
import { gpioDevice } from '../src/devices/gpio.js';
import { serverSampleDevice } from '../src/devices/server-sample.js';
import { RawVfioUserClient, Bytes } from '../src/testing/index.js';
import type { VfioUserDeviceSpec } from '../src/vfio-user/device.js';
import { openFdCount, openFdsBackTo, until } from './helpers/sys.js';

const REGION_READ = 9;
const sock = (name: string): string => path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'vfu-dispose-')), name);
// region_access: offset u64, region u32, count u32.
const readBar2 = new Bytes().u64(0).u32(2).u32(1).build();

/** The gpio device with its detach and dispose calls recorded in `log`. */
function recorded(log: string[], name: string): VfioUserDeviceSpec {
  const d = gpioDevice();
  return {
    ...d,
    detach: () => log.push(`detach ${name}`),
    dispose: () => log.push(`dispose ${name}`),
  };
}

test('a factory device is disposed after its own connection closes (after detach), the others not', async (t) => {
  const log: string[] = [];
  let n = 0;
  const server = VfioUserServer.listen(sock('f.sock'), { device: () => recorded(log, `d${++n}`) });
  const a = await RawVfioUserClient.connect(server.path);
  const b = await RawVfioUserClient.connect(server.path);
  t.after(() => {
    a.close();
    b.close();
    server.close();
  });
  assert.equal((await a.version()).isError, false);
  assert.equal((await b.version()).isError, false);
  assert.equal((await a.call(REGION_READ, readBar2)).isError, false);
  assert.equal((await b.call(REGION_READ, readBar2)).isError, false);
  // Which device is whose: the server numbers them in accept order; a connected first.
  a.close();
  await until(() => log.includes('dispose d1'), 5000, () => `log: ${log.join(', ')}`);
  assert.deepEqual(log, ['detach d1', 'dispose d1']);
  // b is still served by its device.
  assert.equal((await b.call(REGION_READ, readBar2)).isError, false);
  server.close();
  await until(() => log.includes('dispose d2'), 5000, () => `log: ${log.join(', ')}`);
  assert.deepEqual(log, ['detach d1', 'dispose d1', 'detach d2', 'dispose d2']);
  b.close();
});

test('a device object given to the server is never disposed across connections', async (t) => {
  const log: string[] = [];
  const device = recorded(log, 'shared');
  const server = VfioUserServer.listen(sock('s.sock'), { device });
  t.after(() => server.close());
  for (let i = 0; i < 3; i++) {
    const c = await RawVfioUserClient.connect(server.path);
    assert.equal((await c.version()).isError, false);
    c.close();
    await until(() => server.sessions.size === 0 && log.length === i + 1, 5000, () => `log: ${log.join(', ')}`);
  }
  server.close();
  assert.deepEqual(log, ['detach shared', 'detach shared', 'detach shared']);
});

test('a device the runtime refuses is disposed too', async (t) => {
  let disposed = 0;
  const logs: string[] = [];
  const server = VfioUserServer.listen(sock('r.sock'), {
    // Region 7 is config space, the library's: DeviceRuntime refuses a device that declares it.
    device: () => ({ ...gpioDevice(), regions: { 7: { size: 256 } }, dispose: () => void disposed++ }),
    log: (l) => logs.push(l),
  });
  const c = await RawVfioUserClient.connect(server.path);
  t.after(() => {
    c.close();
    server.close();
  });
  await until(() => logs.some((l) => l.includes('device setup failed')), 5000, () => logs.join('\n'));
  assert.equal(disposed, 1);
  c.close();
  server.close();
});

test('200 connections one after another to serverSampleDevice leave no fd behind (its BAR1 memfd is released)', async (t) => {
  const before = openFdCount();
  const server = VfioUserServer.listen(sock('m.sock'), { device: () => serverSampleDevice() });
  // One connection open: its socket and its device's memfd are held while it lasts.
  const first = await RawVfioUserClient.connect(server.path);
  t.after(() => {
    first.close();
    server.close();
  });
  assert.equal((await first.version()).isError, false);
  await until(() => server.sessions.size === 1);
  const held = openFdCount();
  for (let i = 0; i < 200; i++) {
    const c = await RawVfioUserClient.connect(server.path);
    assert.equal((await c.version()).isError, false);
    // BAR0 of the sample: 8 bytes at offset 0.
    assert.equal((await c.call(REGION_READ, new Bytes().u64(0).u32(0).u32(8).build())).isError, false);
    c.close();
  }
  await until(() => server.sessions.size === 1, 5000, () => `${server.sessions.size} sessions`);
  await openFdsBackTo(held, 'fds of closed connections');
  assert.equal(openFdCount(), held);
  first.close();
  server.close();
  await openFdsBackTo(before, 'fds after the server closed');
});
