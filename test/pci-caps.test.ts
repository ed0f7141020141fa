import { test } from 'node:test';
import assert from 'node:assert/strict';
import { PciConfigSpace, PciError, type PciDeviceDescription } from '../src/pci/index.js';

const bytes = (...b: number[]): Uint8Array => Uint8Array.from(b);
const dw = (v: number): Uint8Array => bytes(v & 0xff, (v >>> 8) & 0xff, (v >>> 16) & 0xff, v >>> 24);
const w16 = (v: number): Uint8Array => bytes(v & 0xff, v >>> 8);

function refused(fn: () => void, code: string, errno: number): void {
  assert.throws(fn, (e: unknown) => e instanceof PciError && e.code === code && e.errno === errno);
}

/**
 * PM + MSI (64-bit, per-vector mask, 4 vectors) + MSI-X (8 vectors in BAR2) + PCIe + vendor,
 * then DSN and a VSEC in extended space. Offsets by hand:
 *   PM     0x40, 8 bytes        -> next 0x48
 *   MSI    0x48, 0x18 bytes     -> next 0x60
 *   MSI-X  0x60, 12 bytes       -> next 0x6c
 *   PCIe   0x6c, 0x3c bytes     -> next 0xa8
 *   vendor 0xa8, 3 + 5 bytes    -> end 0xb0
 *   DSN    0x100, 12 bytes      -> next 0x10c
 *   VSEC   0x10c, 8 + 4 bytes
 */
const full: PciDeviceDescription = {
  vendorId: 0x4e58,
  deviceId: 0x0001,
  classCode: 0xff0000,
  bars: [undefined, undefined, { type: 'mem32', size: 0x1000 }],
  capabilities: [
    { type: 'pm' },
    { type: 'msi', vectors: 4, address64: true, perVectorMask: true },
    { type: 'msix', tableSize: 8, tableBar: 2, tableOffset: 0, pbaBar: 2, pbaOffset: 0x800 },
    { type: 'express' },
    { type: 'vendor', payload: [0xde, 0xad, 0xbe, 0xef, 0x42] },
    { type: 'dsn', serial: 0x0123456789abcdefn },
    { type: 'ext-vendor', vsecId: 0x42, vsecRev: 1, payload: [1, 2, 3, 4] },
  ],
};

test('capability chain bytes, by hand', () => {
  const cs = new PciConfigSpace(full);
  assert.equal(cs.size, 4096);
  assert.equal(cs.readU16(0x06) & 0x10, 0x10, 'STATUS.CAP_LIST');
  assert.equal(cs.readU8(0x34), 0x40, 'capability pointer');
  // prettier-ignore
  const expected = [
    // PM at 0x40: id 1, next 0x48, PMC version 3, PMCSR D0, BSE, data
    0x01, 0x48, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00,
    // MSI at 0x48: id 5, next 0x60, flags = MMC 4 vectors (0x4) | 64-bit (0x80) | mask (0x100)
    0x05, 0x60, 0x84, 0x01,
    0x00, 0x00, 0x00, 0x00, // address lo
    0x00, 0x00, 0x00, 0x00, // address hi
    0x00, 0x00, 0x00, 0x00, // data, reserved
    0x00, 0x00, 0x00, 0x00, // mask
    0x00, 0x00, 0x00, 0x00, // pending
    // MSI-X at 0x60: id 0x11, next 0x6c, table size 8 -> 7, table BAR2 @0, PBA BAR2 @0x800
    0x11, 0x6c, 0x07, 0x00,
    0x02, 0x00, 0x00, 0x00,
    0x02, 0x08, 0x00, 0x00,
    // PCIe at 0x6c: id 0x10, next 0xa8, version 2 endpoint
    0x10, 0xa8, 0x02, 0x00,
    0x00, 0x80, 0x00, 0x00, // DEVCAP: RBER, 128-byte payload
    0x10, 0x28, 0x00, 0x00, // DEVCTL: relaxed ordering, no snoop, 512-byte read requests; DEVSTA
    0x11, 0x00, 0x00, 0x00, // LNKCAP: 2.5 GT/s, x1
    0x00, 0x00, 0x11, 0x00, // LNKCTL; LNKSTA: 2.5 GT/s, x1
    0x00, 0x00, 0x00, 0x00, // SLTCAP
    0x00, 0x00, 0x00, 0x00, // SLTCTL, SLTSTA
    0x00, 0x00, 0x00, 0x00, // RTCTL, RTCAP
    0x00, 0x00, 0x00, 0x00, // RTSTA
    0x10, 0x00, 0x00, 0x00, // DEVCAP2: completion timeout disable supported
    0x00, 0x00, 0x00, 0x00, // DEVCTL2, DEVSTA2
    0x02, 0x00, 0x00, 0x00, // LNKCAP2: 2.5 GT/s
    0x01, 0x00, 0x00, 0x00, // LNKCTL2 target 2.5 GT/s; LNKSTA2
    0x00, 0x00, 0x00, 0x00, // SLTCAP2
    0x00, 0x00, 0x00, 0x00, // SLTCTL2, SLTSTA2
    // vendor at 0xa8: id 9, next 0 (end), length 8, payload
    0x09, 0x00, 0x08, 0xde, 0xad, 0xbe, 0xef, 0x42,
  ];
  assert.deepEqual([...cs.read(0x40, expected.length)], expected);
  assert.deepEqual([...cs.read(0xb0, 0x50)], new Array(0x50).fill(0));
  // prettier-ignore
  const ext = [
    // DSN at 0x100: id 3, version 1, next 0x10c -> 0x10c10003; serial lo, hi
    0x03, 0x00, 0xc1, 0x10,
    0xef, 0xcd, 0xab, 0x89,
    0x67, 0x45, 0x23, 0x01,
    // VSEC at 0x10c: id 0xb, version 1, next 0; VSEC id 0x42, rev 1, length 12
    0x0b, 0x00, 0x01, 0x00,
    0x42, 0x00, 0xc1, 0x00,
    0x01, 0x02, 0x03, 0x04,
  ];
  assert.deepEqual([...cs.read(0x100, ext.length)], ext);
});

test('a conventional device: MSI 32-bit without masking and a vendor cap at a fixed offset', () => {
  const cs = new PciConfigSpace({
    vendorId: 1,
    deviceId: 2,
    classCode: 0,
    capabilities: [
      { type: 'msi', vectors: 1, address64: false },
      { type: 'vendor', payload: [7], offset: 0x80 },
      { type: 'pm', d1: true, pmeSupport: 0x19 },
    ],
  });
  assert.equal(cs.size, 256);
  // MSI at 0x40 is 10 bytes (0x4a) -> vendor fixed at 0x80 -> PM after the furthest: 0x84.
  assert.deepEqual([...cs.read(0x40, 12)], [0x05, 0x80, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 0]);
  assert.deepEqual([...cs.read(0x80, 4)], [0x09, 0x84, 0x04, 0x07]);
  // PMC = 3 | D1 (0x200) | PME 0x19 << 11 (0xc800) = 0xca03
  assert.deepEqual([...cs.read(0x84, 8)], [0x01, 0x00, 0x03, 0xca, 0, 0, 0, 0]);
});

test('capabilities that do not fit or overlap are refused', () => {
  const base = { vendorId: 1, deviceId: 2, classCode: 0 };
  const big = { type: 'vendor' as const, payload: new Array(200).fill(0) };
  refused(() => new PciConfigSpace({ ...base, capabilities: [big] }), 'ERR_PCI_NO_SPACE', 28);
  refused(
    () => new PciConfigSpace({ ...base, capabilities: [{ type: 'pm', offset: 0x40 }, { type: 'pm', offset: 0x44 }] }),
    'ERR_PCI_BAD_DESCRIPTION',
    22,
  );
  refused(
    () => new PciConfigSpace({ ...base, capabilities: [{ type: 'pm', offset: 0x42 }] }),
    'ERR_PCI_BAD_DESCRIPTION',
    22,
  );
  refused(
    () => new PciConfigSpace({ ...base, express: true, capabilities: [{ type: 'dsn', serial: 1n, offset: 0x200 }] }),
    'ERR_PCI_BAD_DESCRIPTION',
    22,
  );
});

test('MSI: enable and multiple message enable are writable, the rest of control is not', () => {
  const cs = new PciConfigSpace(full);
  const states: { enabled: boolean; allocated: number }[] = [];
  cs.on('msi', (s) => states.push({ enabled: s.enabled, allocated: s.allocatedVectors }));
  cs.write(0x4a, w16(0x0021)); // enable, MME = 2 (4 vectors)
  assert.equal(cs.readU16(0x4a), 0x01a5);
  cs.write(0x4a, w16(0x0071)); // MME = 7 > MMC: clamped to 2, no change
  assert.equal(cs.readU16(0x4a), 0x01a5);
  cs.write(0x4a, w16(0xfe8f)); // MMC, 64-bit, mask-capable and reserved bits: ignored; MME 0, enable 1
  assert.equal(cs.readU16(0x4a), 0x0185);
  cs.write(0x4c, dw(0xfee00003)); // address bits 1..0 read 0
  cs.write(0x50, dw(0x00000001));
  cs.write(0x54, dw(0xffff4021)); // data 16 bits; the reserved upper half stays 0
  cs.write(0x58, dw(0xffffffff)); // mask: one bit per capable vector
  cs.write(0x5c, dw(0xffffffff)); // pending: read-only
  assert.deepEqual(
    [...cs.read(0x4c, 20)],
    [0x00, 0x00, 0xe0, 0xfe, 0x01, 0, 0, 0, 0x21, 0x40, 0, 0, 0x0f, 0, 0, 0, 0, 0, 0, 0],
  );
  const s = cs.msiState()!;
  assert.equal(s.address, 0x1_fee0_0000n);
  assert.equal(s.data, 0x4021);
  assert.equal(s.mask, 0xf);
  assert.deepEqual(states.slice(0, 3), [
    { enabled: true, allocated: 4 },
    { enabled: true, allocated: 1 },
    { enabled: true, allocated: 1 },
  ]);
  refused(() => cs.write(0x48, bytes(0x05)), 'ERR_PCI_CAP_READ_ONLY', 1); // capability header
  refused(() => cs.write(0x49, bytes(0x60)), 'ERR_PCI_CAP_READ_ONLY', 1);
});

test('MSI-X: enable and function mask are writable, table size and locations are not', () => {
  const cs = new PciConfigSpace(full);
  const seen: [boolean, boolean][] = [];
  cs.on('msix', (c) => seen.push([c.enabled, c.functionMask]));
  cs.write(0x62, w16(0xc000));
  assert.equal(cs.readU16(0x62), 0xc007);
  cs.write(0x63, bytes(0x80)); // byte write to the high half: clear the function mask
  assert.equal(cs.readU16(0x62), 0x8007);
  cs.write(0x62, w16(0x80ff)); // table size bits are read-only
  assert.equal(cs.readU16(0x62), 0x8007);
  cs.write(0x64, dw(0x12345678)); // table offset/BIR: read-only, write ignored
  assert.equal(cs.readU32(0x64), 0x00000002);
  assert.deepEqual(seen, [
    [true, true],
    [true, false],
  ]);
  assert.deepEqual(cs.msixControl(), { enabled: true, functionMask: false, tableSize: 8 });
});

test('PM: power state and PME bits', () => {
  const cs = new PciConfigSpace({ vendorId: 1, deviceId: 2, classCode: 0, capabilities: [{ type: 'pm', pmeSupport: 0x18 }] });
  const states: [number, number][] = [];
  cs.on('power-state', (s, p) => states.push([s, p]));
  cs.write(0x44, w16(0x0103)); // D3hot, PME enable
  assert.equal(cs.readU16(0x44), 0x0103);
  cs.write(0x44, w16(0x0101)); // D1 is not supported: the state stays D3hot
  assert.equal(cs.readU16(0x44), 0x0103);
  cs.poke(0x45, bytes(0x81)); // the device sets PME status
  cs.write(0x44, w16(0x8000)); // RW1C PME status, back to D0, PME disabled
  assert.equal(cs.readU16(0x44), 0x0000);
  cs.write(0x42, w16(0xffff)); // PMC is read-only
  assert.equal(cs.readU16(0x42), 0xc003);
  assert.deepEqual(states, [
    [3, 0],
    [0, 3],
  ]);
});

test('PCIe: device control and status, FLR', () => {
  const cs = new PciConfigSpace(full);
  const devctl = 0x6c + 0x08;
  const devsta = 0x6c + 0x0a;
  cs.write(devctl, w16(0x502f)); // error reporting enables, 256-byte payload, 4096-byte read requests
  assert.equal(cs.readU16(devctl), 0x502f);
  cs.write(devctl, w16(0x0600)); // phantom functions and aux power PM are not supported: read 0
  assert.equal(cs.readU16(devctl), 0x0000);
  refused(() => cs.write(devctl, w16(0x8000)), 'ERR_PCI_BAD_VALUE', 22); // FLR without FLR capability
  cs.poke(devsta, w16(0x0005));
  cs.write(devsta, w16(0x0001)); // RW1C
  assert.equal(cs.readU16(devsta), 0x0004);
  cs.write(0x6c + 0x10, w16(0xffff)); // LNKCTL: ASPM, RCB, CCC, ES, HAWD
  assert.equal(cs.readU16(0x6c + 0x10), 0x02cb);
  cs.write(0x6c + 0x0c, dw(0)); // LNKCAP is read-only
  assert.equal(cs.readU32(0x6c + 0x0c), 0x11);

  const flrDev = new PciConfigSpace({ vendorId: 1, deviceId: 2, classCode: 0, capabilities: [{ type: 'express', flr: true }] });
  let flrs = 0;
  flrDev.on('flr', () => flrs++);
  flrDev.write(0x48, w16(0x8000));
  assert.equal(flrs, 1);
  assert.equal(flrDev.readU16(0x48) & 0x8000, 0, 'initiate FLR reads 0');
  assert.equal(flrDev.readU32(0x44) & 0x10000000, 0x10000000, 'DEVCAP.FLR');
});

test('vendor capabilities: payload writable, header refused; DSN read-only', () => {
  const cs = new PciConfigSpace(full);
  const writes: string[] = [];
  cs.on('capability-write', (c) => writes.push(c.description.type));
  cs.write(0xab, bytes(0x01, 0x02));
  assert.deepEqual([...cs.read(0xa8, 8)], [0x09, 0x00, 0x08, 0x01, 0x02, 0xbe, 0xef, 0x42]);
  refused(() => cs.write(0xaa, bytes(0x10)), 'ERR_PCI_CAP_READ_ONLY', 1); // length byte
  refused(() => cs.write(0x104, dw(0)), 'ERR_PCI_CAP_READ_ONLY', 1); // DSN
  refused(() => cs.write(0x110, dw(0)), 'ERR_PCI_CAP_READ_ONLY', 1); // VSEC header
  cs.write(0x114, dw(0xa5a5a5a5));
  assert.equal(cs.readU32(0x114), 0xa5a5a5a5);
  refused(() => cs.write(0xb0, bytes(0)), 'ERR_PCI_READ_ONLY', 22); // past the last capability
  assert.deepEqual(writes, ['vendor', 'ext-vendor']);

  const ro = new PciConfigSpace({
    vendorId: 1,
    deviceId: 2,
    classCode: 0,
    capabilities: [{ type: 'vendor', payload: [1, 2], readOnly: true }],
  });
  refused(() => ro.write(0x43, bytes(9)), 'ERR_PCI_CAP_READ_ONLY', 1);
});

test('a write spanning two capabilities applies both rules', () => {
  const cs = new PciConfigSpace(full);
  // 0x5c..0x63: MSI pending (read-only) then MSI-X id/next (refused): refused as a whole.
  refused(() => cs.write(0x5c, bytes(0, 0, 0, 0, 0x11, 0x6c, 0, 0x80)), 'ERR_PCI_CAP_READ_ONLY', 1);
  assert.equal(cs.readU16(0x62), 0x0007);
});

test('random guest writes: refused ones change nothing, identity and chain bytes never change', () => {
  const cs = new PciConfigSpace(full);
  const fresh = new PciConfigSpace(full);
  let seed = 0x5eed;
  const rnd = (n: number): number => {
    seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
    return (seed >>> 8) % n;
  };
  let accepted = 0;
  for (let i = 0; i < 20000; i++) {
    // Bias towards the header and capabilities, where the rules are.
    const offset = rnd(4) === 0 ? rnd(cs.size + 8) : rnd(0x120);
    const data = Uint8Array.from({ length: [1, 2, 4, 8][rnd(4)]! }, () => rnd(256));
    const before = cs.read(0, cs.size);
    try {
      cs.write(offset, data);
      accepted++;
    } catch (e) {
      assert.ok(e instanceof PciError, String(e));
      assert.deepEqual(cs.read(0, cs.size), before, `refused write at ${offset} changed the space`);
    }
  }
  assert.ok(accepted > 1000);
  // Vendor/device, revision/class, header type/BIST, subsystem, capability pointer.
  for (const [off, len] of [[0x00, 4], [0x08, 4], [0x0e, 2], [0x2c, 4], [0x34, 1]] as const) {
    assert.deepEqual(cs.read(off, len), fresh.read(off, len), `header ${off}`);
  }
  for (const c of cs.capabilities) {
    const hdr = c.template.extended ? 4 : 2;
    assert.deepEqual(cs.read(c.offset, hdr), fresh.read(c.offset, hdr), `${c.description.type} header`);
  }
  assert.equal(cs.readU16(0x06) & 0x10, 0x10);
});
