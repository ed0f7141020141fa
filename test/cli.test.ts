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

test('vdevkit migrate moves a gpio between two servers (another process drives both)', async () => {
  const a = gpioDevice();
  const b = gpioDevice();
  const sa = VfioUserServer.listen(sock('ma.sock'), { device: a });
  const sb = VfioUserServer.listen(sock('mb.sock'), { device: b });
  const client = await VfioUserClient.connect(sa.path);
  const dev = new VfioUserDevice(client);
  await dev.write(2, 4, Uint8Array.of(0x81)); // pins 8 and 15
  await dev.write(2, 4, Uint8Array.of(0x01)); // pin 8 again
  dev.close();
  client.close();
  const { execFile } = await import('node:child_process');
  const out = await new Promise<string>((resolve, reject) =>
    execFile(process.execPath, [MAIN, 'migrate', '--from', sa.path, '--to', sb.path, '--chunk', '64'], (err, stdout, stderr) =>
      err ? reject(new Error(`${err.message}\n${stderr}`)) : resolve(stdout),
    ),
  );
  assert.match(out, /migrated: 64 bytes in pre-copy \(1 round\), 0 in stop-copy, 1 writes/);
  assert.deepEqual(b.pins, [0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 1]);
  // Bad arguments: exit 2, nothing connected.
  const bad = await new Promise<number>((resolve) =>
    execFile(process.execPath, [MAIN, 'migrate', '--from', sa.path], (err) => resolve((err as { code?: number } | null)?.code ?? 0)),
  );
  assert.equal(bad, 2);
  sa.close();
  sb.close();
});
