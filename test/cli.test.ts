import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { VfioUserServer } from '../src/vfio-user/server.js';
import { VfioUserClient } from '../src/vfio-user/client.js';
import { VfioUserDevice } from '../src/vfio-user/client-device.js';
import { describeDevice, formatLspci, probe, decodeCapabilities } from '../src/cli/lspci.js';
import { gpioDevice } from '../src/devices/gpio.js';

const MAIN = fileURLToPath(new URL('../src/cli/main.js', import.meta.url));
const sock = (name: string): string => path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'cli-')), name);

test('vdevkit --version and --help', () => {
  const pkg = JSON.parse(fs.readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string };
  assert.equal(execFileSync(process.execPath, [MAIN, '--version']).toString().trim(), pkg.version);
  assert.match(execFileSync(process.execPath, [MAIN, '--help']).toString(), /serve .*lspci .*probe/s);
});

test('lspci describes a device with MSI-X and PCIe capabilities', async () => {
  const server = VfioUserServer.listen(sock('l.sock'), {
    device: {
      pci: { vendorId: 0x1af4, deviceId: 0x1234, classCode: 0x020000, revision: 3, capabilities: [{ type: 'pm' }, { type: 'express' }] },
      regions: { 0: { size: 4096, read: (_o, out) => out.fill(0) }, 2: { size: 1 << 20, barType: 'mem64', prefetchable: true, read: (_o, out) => out.fill(0) } },
      irqs: { intx: true, msix: 4 },
    },
  });
  const client = await VfioUserClient.connect(server.path);
  const dev = new VfioUserDevice(client);
  const r = await describeDevice(dev);
  assert.equal(r.vendorId, 0x1af4);
  assert.equal(r.classCode, 0x020000);
  assert.equal(r.revision, 3);
  assert.deepEqual(r.bars.map((b) => [b.index, b.size]), [[0, 4096], [1, 4096], [2, 1 << 20]]);
  assert.match(r.bars[2]!.type, /64-bit, prefetchable/);
  assert.deepEqual(r.capabilities.map((c) => c.name), ['Power Management', 'Express', 'MSI-X']);
  assert.match(r.capabilities[2]!.detail!, /Count=4 .*BAR=1/);
  assert.equal(r.irqs[2]!.count, 4);
  const text = formatLspci(r);
  assert.match(text, /\[1af4:1234\]/);
  assert.match(text, /Capabilities: \[[0-9a-f]+\] MSI-X/);
  dev.close();
  client.close();
  server.close();
});

test('capability walk stops on a loop', () => {
  const cfg = new Uint8Array(256);
  cfg[6] = 0x10;
  cfg[0x34] = 0x40;
  cfg[0x40] = 0x01;
  cfg[0x41] = 0x40; // points to itself
  assert.equal(decodeCapabilities(cfg).length, 1);
});

test('probe passes against our server', async () => {
  const server = VfioUserServer.listen(sock('p.sock'), { device: gpioDevice() });
  const results = await probe(server.path, 2000);
  assert.ok(results.length > 15);
  assert.deepEqual(results.filter((r) => !r.ok), []);
  server.close();
});
