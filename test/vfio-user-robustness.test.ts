/** Regression tests for peer behaviour found in review: none of it may crash, hang or leak. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { VfioUserServer } from '../src/vfio-user/server.js';
import { VfioUserClient } from '../src/vfio-user/client.js';
import { VfioUserDevice } from '../src/vfio-user/client-device.js';
import { gpioDevice } from '../src/devices/gpio.js';
import { RawVfioUserClient, Bytes } from '../src/testing/index.js';
import { EventFd, Fd } from '../src/sys/index.js';
import type { DeviceContext } from '../src/vfio-user/device.js';
import { openFdCount, openFdsBackTo, tick } from './helpers/sys.js';

const sock = (name: string): string => path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'rob-')), name);
const GET_INFO = new Bytes().u32(16).u32(0).u32(0).u32(0).build();

test('thousands of commands queued behind a slow reset are served in order, without recursion', async () => {
  let release!: () => void;
  const dev = { ...gpioDevice(), reset: () => new Promise<void>((r) => (release = r)) };
  const server = VfioUserServer.listen(sock('q.sock'), { device: dev });
  const c = await RawVfioUserClient.connect(server.path);
  await c.version();
  c.send(13);
  const N = 20000;
  for (let i = 0; i < N; i++) c.send(4, GET_INFO, { flags: 0x10 }); // posted: no replies to read
  const last = c.send(4, GET_INFO);
  await tick(200);
  release();
  const reset = await c.next(10000);
  assert.equal(reset.cmd, 13);
  const r = await c.next(10000);
  assert.equal(r.id, last);
  c.close();
  server.close();
});

test('a second VERSION while commands are queued ends the connection cleanly, no write after end', async () => {
  let release!: () => void;
  const dev = { ...gpioDevice(), reset: () => new Promise<void>((r) => (release = r)) };
  const server = VfioUserServer.listen(sock('v.sock'), { device: dev });
  const c = await RawVfioUserClient.connect(server.path);
  await c.version();
  c.send(13);
  c.send(1, new Bytes().u16(0).u16(2).build());
  c.send(4, GET_INFO);
  await tick(50);
  release();
  await c.whenClosed(5000);
  const again = await RawVfioUserClient.connect(server.path);
  assert.equal((await again.version()).isError, false);
  again.close();
  server.close();
});

test('fds piling up for a message that never completes close the connection', async () => {
  const before = openFdCount();
  const server = VfioUserServer.listen(sock('f.sock'), { device: () => gpioDevice() });
  const c = await RawVfioUserClient.connect(server.path);
  await c.version();
  const e = EventFd.create();
  c.sendBytes(new Bytes().u16(9).u16(4).u32(64 * 1024).u32(0).u32(0).build());
  for (let i = 0; i < 10; i++) c.sendBytes(Uint8Array.of(0), Array(60).fill(e.fd));
  await c.whenClosed(5000);
  e.close();
  server.close();
  await openFdsBackTo(before, 'fds left after the connection was closed');
  assert.equal(openFdCount(), before);
});

test('an "eventfd" that cannot be signalled loses the interrupt instead of crashing the device', async () => {
  let ctx: DeviceContext | null = null;
  const server = VfioUserServer.listen(sock('e.sock'), {
    device: { pci: { vendorId: 1, deviceId: 2, classCode: 0 }, irqs: { msix: 1 }, attach: (c) => (ctx = c) },
  });
  const c = await RawVfioUserClient.connect(server.path);
  await c.version();
  const devnull = new Fd(fs.openSync('/dev/null', 'r'));
  const r = await c.call(8, new Bytes().u32(20).u32(0x24).u32(2).u32(0).u32(1).build(), { fds: [devnull] });
  assert.equal(r.isError, false);
  ctx!.trigger('msix', 0); // must not throw
  assert.equal((await c.call(4, GET_INFO)).isError, false);
  devnull.close();
  c.close();
  server.close();
});

test('client: region reads are chunked by the smaller of the two limits; bad posted writes throw at once', async () => {
  const server = VfioUserServer.listen(sock('c.sock'), { device: gpioDevice(), maxDataXferSize: 4 << 20 });
  const client = await VfioUserClient.connect(server.path, { maxDataXferSize: 4096 });
  assert.equal(client.maxXfer, 4096);
  const dev = new VfioUserDevice(client);
  const cfg = await dev.read(7, 0, 256);
  assert.equal(cfg.length, 256);
  await assert.rejects(client.regionWrite(0, 2 ** 64, Uint8Array.of(1), { posted: true }), /bad region access/);
  assert.equal((await dev.info()).numRegions, 9);
  client.close();
  server.close();
});

test('a client that never sends VERSION is dropped after the deadline, freeing a shared device', async () => {
  // 1 s, not less: the second client's VERSION must be refused before the deadline drops the silent one.
  const server = VfioUserServer.listen(sock('t.sock'), { device: gpioDevice(), versionTimeoutMs: 1000 });
  const silent = await RawVfioUserClient.connect(server.path);
  const second = await RawVfioUserClient.connect(server.path);
  assert.equal((await second.version()).errno, 16, 'busy while the silent one holds it');
  await silent.whenClosed(5000);
  const third = await RawVfioUserClient.connect(server.path);
  assert.equal((await third.version()).isError, false);
  third.close();
  server.close();
});
