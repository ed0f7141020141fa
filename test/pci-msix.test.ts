import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  MsiController,
  MsixController,
  PciConfigSpace,
  PciError,
  type MsiMessage,
  type PciDeviceDescription,
} from '../src/pci/index.js';

const bytes = (...b: number[]): Uint8Array => Uint8Array.from(b);
const dw = (v: number): Uint8Array => bytes(v & 0xff, (v >>> 8) & 0xff, (v >>> 16) & 0xff, v >>> 24);
const w16 = (v: number): Uint8Array => bytes(v & 0xff, v >>> 8);

function refused(fn: () => void, code: string, errno: number): void {
  assert.throws(fn, (e: unknown) => e instanceof PciError && e.code === code && e.errno === errno);
}

/** MSI-X cap at 0x40 (control at 0x42): 8 vectors, table at BAR2+0, PBA at BAR2+0x800. MSI cap at 0x4c. */
const device: PciDeviceDescription = {
  vendorId: 0x4e58,
  deviceId: 0x0002,
  classCode: 0xff0000,
  bars: [undefined, undefined, { type: 'mem32', size: 0x1000 }],
  capabilities: [
    { type: 'msix', tableSize: 8, tableBar: 2, tableOffset: 0, pbaBar: 2, pbaOffset: 0x800 },
    { type: 'msi', vectors: 4, address64: true, perVectorMask: true },
  ],
};
const MSIX_CTRL = 0x42;
const MSI = 0x4c;

function setUp() {
  const cs = new PciConfigSpace(device);
  const delivered: [number, MsiMessage][] = [];
  const msix: MsixController = MsixController.attach(cs, (v) => delivered.push([v, msix.message(v)]));
  return { cs, msix, delivered };
}

test('the MSI-X capability sits where the fixtures expect', () => {
  const cs = new PciConfigSpace(device);
  assert.deepEqual([...cs.read(0x40, 12)], [0x11, 0x4c, 0x07, 0x00, 0x02, 0x00, 0x00, 0x00, 0x02, 0x08, 0x00, 0x00]);
  assert.deepEqual([...cs.read(MSI, 4)], [0x05, 0x00, 0x84, 0x01]);
});

test('MSI-X table: power-on state, DWORD and QWORD reads and writes', () => {
  const { msix } = setUp();
  assert.equal(msix.tableLength, 128);
  assert.equal(msix.pbaLength, 8);
  // Every vector starts masked: vector control = 1.
  assert.deepEqual([...msix.readTable(8, 8)], [0, 0, 0, 0, 0x01, 0, 0, 0]);
  msix.writeTable(16, bytes(0x03, 0x00, 0xe0, 0xfe, 0x01, 0x00, 0x00, 0x00)); // vector 1 address (QWORD)
  msix.writeTable(24, dw(0x00004021)); // data
  msix.writeTable(28, dw(0xfffffffe)); // vector control: reserved bits read 0, mask cleared
  assert.deepEqual(
    [...msix.readTable(16, 8)].concat([...msix.readTable(24, 8)]),
    [0x00, 0x00, 0xe0, 0xfe, 0x01, 0x00, 0x00, 0x00, 0x21, 0x40, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00],
  );
  assert.deepEqual(msix.entry(1), { address: 0x1_fee0_0000n, data: 0x4021, masked: false });
});

test('MSI-X table: other widths, misaligned and out-of-range accesses are refused', () => {
  const { msix } = setUp();
  refused(() => msix.readTable(0, 2), 'ERR_PCI_BAD_ACCESS', 22);
  refused(() => msix.readTable(0, 1), 'ERR_PCI_BAD_ACCESS', 22);
  refused(() => msix.readTable(2, 4), 'ERR_PCI_BAD_ACCESS', 22);
  refused(() => msix.readTable(4, 8), 'ERR_PCI_BAD_ACCESS', 22);
  refused(() => msix.writeTable(0, bytes(1, 2, 3)), 'ERR_PCI_BAD_ACCESS', 22);
  refused(() => msix.readTable(128, 4), 'ERR_PCI_OUT_OF_RANGE', 22);
  refused(() => msix.readTable(-8, 8), 'ERR_PCI_OUT_OF_RANGE', 22);
  refused(() => msix.readPba(8, 8), 'ERR_PCI_OUT_OF_RANGE', 22);
  refused(() => msix.readPba(0, 2), 'ERR_PCI_BAD_ACCESS', 22);
});

test('MSI-X: trigger while disabled sets the pending bit; enabling with the vector unmasked delivers it', () => {
  const { cs, msix, delivered } = setUp();
  msix.writeTable(0, bytes(0x00, 0x10, 0xe0, 0xfe, 0, 0, 0, 0)); // vector 0 address 0xfee01000
  msix.writeTable(8, bytes(0x30, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00)); // data 0x30, unmasked
  assert.equal(msix.trigger(0), 'pending');
  assert.deepEqual([...msix.readPba(0, 8)], [0x01, 0, 0, 0, 0, 0, 0, 0]);
  cs.write(MSIX_CTRL, w16(0xc000)); // enable with the function mask: still pending
  assert.equal(delivered.length, 0);
  assert.equal(msix.trigger(0), 'pending');
  cs.write(MSIX_CTRL, w16(0x8000)); // function mask cleared: delivered once, pending cleared
  assert.deepEqual(delivered, [[0, { address: 0xfee01000n, data: 0x30 }]]);
  assert.deepEqual([...msix.readPba(0, 4)], [0, 0, 0, 0]);
  assert.equal(msix.trigger(0), 'delivered');
  assert.equal(delivered.length, 2);
});

test('MSI-X: a masked vector goes pending and is delivered on unmask', () => {
  const { cs, msix, delivered } = setUp();
  cs.write(MSIX_CTRL, w16(0x8000));
  msix.writeTable(3 * 16 + 8, dw(0x33)); // vector 3 data, still masked
  assert.equal(msix.trigger(3), 'pending');
  assert.equal(msix.trigger(7), 'pending');
  assert.deepEqual([...msix.readPba(0, 4)], [0x88, 0, 0, 0]);
  assert.ok(msix.isPending(3) && msix.isMasked(3));
  msix.writePba(0, dw(0)); // the PBA is read-only
  assert.deepEqual([...msix.readPba(0, 4)], [0x88, 0, 0, 0]);
  msix.writeTable(3 * 16 + 12, dw(0)); // unmask vector 3
  assert.deepEqual(delivered, [[3, { address: 0n, data: 0x33 }]]);
  assert.deepEqual([...msix.readPba(0, 4)], [0x80, 0, 0, 0]);
  msix.writeTable(3 * 16 + 12, dw(1)); // mask again: nothing to deliver
  msix.writeTable(3 * 16 + 12, dw(0));
  assert.equal(delivered.length, 1);
  refused(() => msix.trigger(8), 'ERR_PCI_BAD_VECTOR', 22);
});

test('MSI-X: BAR routing to the table and the PBA', () => {
  const { msix } = setUp();
  assert.ok(msix.claims(2, 0x70, 4));
  assert.ok(msix.claims(2, 0x800, 8));
  assert.ok(!msix.claims(2, 0x80, 4));
  assert.ok(!msix.claims(0, 0x0, 4));
  msix.barWrite(2, 0x7c, dw(0)); // vector 7 control
  assert.equal(msix.entry(7).masked, false);
  assert.deepEqual([...msix.barRead(2, 0x800, 8)], [0, 0, 0, 0, 0, 0, 0, 0]);
  refused(() => msix.barRead(2, 0x400, 4), 'ERR_PCI_OUT_OF_RANGE', 22);
});

test('MSI-X: config space reset resets the table and the control state', () => {
  const { cs, msix } = setUp();
  cs.write(MSIX_CTRL, w16(0x8000));
  msix.writeTable(12, dw(0));
  msix.writeTable(0, dw(0xfee00000));
  assert.ok(msix.isEnabled);
  cs.reset();
  assert.ok(!msix.isEnabled);
  assert.deepEqual([...msix.readTable(0, 8), ...msix.readTable(8, 8)], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]);
  msix.detach();
  cs.write(MSIX_CTRL, w16(0x8000));
  assert.ok(!msix.isEnabled, 'detached controllers stop following the config space');
});

test('MSI: vectors, data low bits, per-vector mask and pending', () => {
  const cs = new PciConfigSpace(device);
  const delivered: [number, MsiMessage][] = [];
  const msi: MsiController = MsiController.attach(cs, (v) => delivered.push([v, msi.message(v)]));
  assert.equal(msi.trigger(0), 'dropped'); // MSI disabled
  cs.write(MSI + 4, dw(0xfee00000));
  cs.write(MSI + 0x0c, w16(0x4020));
  cs.write(MSI + 2, w16(0x0021)); // enable, 4 vectors
  assert.equal(msi.trigger(1), 'delivered');
  assert.deepEqual(delivered, [[1, { address: 0xfee00000n, data: 0x4021 }]]);
  cs.write(MSI + 0x10, dw(0x4)); // mask vector 2
  assert.equal(msi.trigger(2), 'pending');
  assert.deepEqual([...cs.read(MSI + 0x14, 4)], [0x04, 0, 0, 0]); // pending register
  cs.write(MSI + 0x14, dw(0)); // read-only to the guest
  assert.ok(msi.isPending(2));
  cs.write(MSI + 0x10, dw(0)); // unmask: delivered, pending cleared
  assert.deepEqual(delivered[1], [2, { address: 0xfee00000n, data: 0x4022 }]);
  assert.deepEqual([...cs.read(MSI + 0x14, 4)], [0, 0, 0, 0]);
  cs.write(MSI + 2, w16(0x0011)); // only 2 vectors allocated
  assert.equal(msi.trigger(3), 'dropped');
  refused(() => msi.trigger(4), 'ERR_PCI_BAD_VECTOR', 22);
  msi.detach();
});
