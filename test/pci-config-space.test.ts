import { test } from 'node:test';
import assert from 'node:assert/strict';
import { PciConfigSpace, PciError, type PciDeviceDescription } from '../src/pci/index.js';

/** A device with one BAR of each kind and a ROM; no capabilities. */
const plain: PciDeviceDescription = {
  vendorId: 0x1234,
  deviceId: 0x5678,
  subsystemVendorId: 0x9abc,
  subsystemId: 0xdef0,
  revision: 0x02,
  classCode: 0x010802,
  interruptPin: 1,
  bars: [
    { type: 'mem64', size: 0x4000, prefetchable: true },
    undefined,
    { type: 'mem32', size: 0x1000 },
    { type: 'io', size: 0x100 },
  ],
  rom: { size: 0x10000 },
};

const bytes = (...b: number[]): Uint8Array => Uint8Array.from(b);
/** Little-endian dword, written out for the fixtures. */
const dw = (v: number): Uint8Array => bytes(v & 0xff, (v >>> 8) & 0xff, (v >>> 16) & 0xff, v >>> 24);
const w16 = (v: number): Uint8Array => bytes(v & 0xff, v >>> 8);

function refused(fn: () => void, code: string, errno: number): void {
  assert.throws(fn, (e: unknown) => e instanceof PciError && e.code === code && e.errno === errno);
}

test('header bytes of a described device, by hand', () => {
  const cs = new PciConfigSpace(plain);
  assert.equal(cs.size, 256);
  // prettier-ignore
  const expected = [
    0x34, 0x12, 0x78, 0x56, // vendor, device
    0x00, 0x00, 0x00, 0x00, // command, status (no capabilities: CAP_LIST clear)
    0x02, 0x02, 0x08, 0x01, // revision, prog-if, sub-class, class
    0x00, 0x00, 0x00, 0x00, // cache line, latency, header type 0, BIST
    0x0c, 0x00, 0x00, 0x00, // BAR0: mem, 64-bit (0x4), prefetchable (0x8)
    0x00, 0x00, 0x00, 0x00, // BAR1: upper dword of BAR0
    0x00, 0x00, 0x00, 0x00, // BAR2: mem32, not prefetchable
    0x01, 0x00, 0x00, 0x00, // BAR3: I/O
    0x00, 0x00, 0x00, 0x00, // BAR4
    0x00, 0x00, 0x00, 0x00, // BAR5
    0x00, 0x00, 0x00, 0x00, // CardBus CIS
    0xbc, 0x9a, 0xf0, 0xde, // subsystem vendor, subsystem
    0x00, 0x00, 0x00, 0x00, // ROM
    0x00, 0x00, 0x00, 0x00, // capability pointer (none), reserved
    0x00, 0x00, 0x00, 0x00, // reserved
    0x00, 0x01, 0x00, 0x00, // interrupt line, pin INTA#, min gnt, max lat
  ];
  assert.deepEqual([...cs.read(0, 64)], expected);
  assert.deepEqual([...cs.read(64, 192)], new Array(192).fill(0));
});

test('reads of any width at any offset', () => {
  const cs = new PciConfigSpace(plain);
  assert.deepEqual([...cs.read(1, 3)], [0x12, 0x78, 0x56]);
  assert.equal(cs.readU16(0x2d), 0xf09a);
  assert.equal(cs.readU32(0x09), 0x00010802);
  assert.deepEqual([...cs.read(0, 0)], []);
});

test('BAR sizing: 32-bit memory, 64-bit memory (both dwords), I/O', () => {
  const cs = new PciConfigSpace(plain);
  cs.write(0x10, dw(0xffffffff));
  cs.write(0x14, dw(0xffffffff));
  cs.write(0x18, dw(0xffffffff));
  cs.write(0x1c, dw(0xffffffff));
  assert.deepEqual([...cs.read(0x10, 4)], [0x0c, 0xc0, 0xff, 0xff]); // ~(0x4000-1) | 64-bit | prefetch
  assert.deepEqual([...cs.read(0x14, 4)], [0xff, 0xff, 0xff, 0xff]); // upper dword: all address bits
  assert.deepEqual([...cs.read(0x18, 4)], [0x00, 0xf0, 0xff, 0xff]); // ~(0x1000-1)
  assert.deepEqual([...cs.read(0x1c, 4)], [0x01, 0xff, 0xff, 0xff]); // ~(0x100-1) | I/O
  // Empty BAR slots accept the write and keep reading 0.
  cs.write(0x20, dw(0xffffffff));
  assert.equal(cs.readU32(0x20), 0);
});

test('BAR sizing of a 64-bit BAR larger than 4 GiB', () => {
  const cs = new PciConfigSpace({ vendorId: 1, deviceId: 2, classCode: 0, bars: [{ type: 'mem64', size: 2 ** 33 }] });
  cs.write(0x10, bytes(0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff));
  assert.deepEqual([...cs.read(0x10, 8)], [0x04, 0x00, 0x00, 0x00, 0xfe, 0xff, 0xff, 0xff]);
});

test('BAR addresses keep the written bits masked to the size, with events', () => {
  const cs = new PciConfigSpace(plain);
  const seen: [number, bigint, bigint][] = [];
  cs.on('bar', (i, a, p) => seen.push([i, a, p]));
  cs.write(0x18, dw(0xfebf1234));
  assert.deepEqual([...cs.read(0x18, 4)], [0x00, 0x10, 0xbf, 0xfe]);
  assert.equal(cs.barAddress(2), 0xfebf1000n);
  cs.write(0x10, dw(0xfe00_4000));
  cs.write(0x14, dw(0x00000001));
  assert.deepEqual([...cs.read(0x10, 8)], [0x0c, 0x40, 0x00, 0xfe, 0x01, 0x00, 0x00, 0x00]);
  assert.equal(cs.barAddress(0), 0x1_fe00_4000n);
  cs.write(0x1c, dw(0xc0ff));
  assert.equal(cs.barAddress(3), 0xc000n);
  cs.write(0x18, dw(0xfebf1000)); // same address: no event
  assert.deepEqual(seen, [
    [2, 0xfebf1000n, 0n],
    [0, 0xfe004000n, 0n],
    [0, 0x1fe004000n, 0xfe004000n],
    [3, 0xc000n, 0n],
  ]);
  assert.equal(cs.bar(1), undefined);
  assert.deepEqual(
    cs.bars.map((b) => [b.index, b.type, b.size]),
    [
      [0, 'mem64', 0x4000],
      [2, 'mem32', 0x1000],
      [3, 'io', 0x100],
    ],
  );
});

test('ROM BAR: sizing, address and enable bit', () => {
  const cs = new PciConfigSpace(plain);
  const roms: [number, boolean][] = [];
  cs.on('rom', (a, e) => roms.push([a, e]));
  cs.write(0x30, dw(0xfffff800));
  assert.deepEqual([...cs.read(0x30, 4)], [0x00, 0x00, 0xff, 0xff]); // ~(64K-1), enable clear
  cs.write(0x30, dw(0xfeb00001));
  assert.deepEqual([...cs.read(0x30, 4)], [0x01, 0x00, 0xb0, 0xfe]);
  assert.equal(cs.romAddress, 0xfeb00000);
  assert.equal(cs.romEnabled, true);
  assert.deepEqual(roms, [
    [0xffff0000, false],
    [0xfeb00000, true],
  ]);
  const noRom = new PciConfigSpace({ vendorId: 1, deviceId: 2, classCode: 0 });
  noRom.write(0x30, dw(0xfffff800));
  assert.equal(noRom.readU32(0x30), 0);
});

test('read-only header fields are refused with EINVAL and nothing changes', () => {
  const cs = new PciConfigSpace(plain);
  refused(() => cs.write(0x00, w16(0xffff)), 'ERR_PCI_READ_ONLY', 22);
  refused(() => cs.write(0x02, bytes(0x00)), 'ERR_PCI_READ_ONLY', 22);
  refused(() => cs.write(0x0e, bytes(0x80)), 'ERR_PCI_READ_ONLY', 22); // header type
  refused(() => cs.write(0x0f, bytes(0x40)), 'ERR_PCI_READ_ONLY', 22); // BIST
  refused(() => cs.write(0x2c, dw(0)), 'ERR_PCI_READ_ONLY', 22); // subsystem
  refused(() => cs.write(0x34, bytes(0x80)), 'ERR_PCI_READ_ONLY', 22); // capability pointer
  refused(() => cs.write(0x38, bytes(0x01)), 'ERR_PCI_READ_ONLY', 22); // reserved
  // A write spanning device ID and COMMAND is refused as a whole.
  refused(() => cs.write(0x02, dw(0x0006_5678)), 'ERR_PCI_READ_ONLY', 22);
  assert.equal(cs.readU16(0x04), 0);
  assert.equal(cs.readU32(0x00), 0x56781234);
  // libvfio-user accepts and ignores revision, class, interrupt pin, MIN_GNT, MAX_LAT.
  cs.write(0x08, dw(0xffffffff));
  cs.write(0x3d, bytes(0x04, 0xff, 0xff));
  assert.equal(cs.readU32(0x08), 0x01080202);
  assert.deepEqual([...cs.read(0x3d, 3)], [0x01, 0x00, 0x00]);
});

test('COMMAND accepts its writable bits and reports changes', () => {
  const cs = new PciConfigSpace(plain);
  const seen: [number, number][] = [];
  cs.on('command', (v, p) => seen.push([v, p]));
  cs.write(0x04, w16(0x0006)); // memory + bus master
  assert.deepEqual([...cs.read(0x04, 2)], [0x06, 0x00]);
  assert.ok(cs.memoryEnabled && cs.busMasterEnabled && !cs.ioEnabled && !cs.intxDisabled);
  cs.write(0x05, bytes(0x04)); // byte write to the high half: INTx disable
  assert.equal(cs.command, 0x0406);
  assert.ok(cs.intxDisabled);
  cs.write(0x04, w16(0x0026)); // VGA palette snoop: accepted, reads 0; INTx disable cleared
  assert.equal(cs.command, 0x0006);
  refused(() => cs.write(0x04, w16(0x0008)), 'ERR_PCI_BAD_VALUE', 22); // special cycles
  refused(() => cs.write(0x04, w16(0x0200)), 'ERR_PCI_BAD_VALUE', 22); // fast back-to-back
  assert.equal(cs.command, 0x0006);
  assert.deepEqual(seen, [
    [0x0006, 0x0000],
    [0x0406, 0x0006],
    [0x0006, 0x0406],
  ]);
});

test('STATUS: error bits are write-1-to-clear, the rest read-only', () => {
  const cs = new PciConfigSpace({ ...plain, capabilities: [{ type: 'pm' }] });
  assert.equal(cs.readU16(0x06), 0x0010); // CAP_LIST
  cs.setStatusBits(0x0100 | 0x2000 | 0x0008, true); // parity, received master abort, INTx
  assert.equal(cs.readU16(0x06), 0x2118);
  cs.write(0x06, w16(0x2000 | 0x0010 | 0x0008)); // clear master abort; CAP_LIST and INTERRUPT stay
  assert.equal(cs.readU16(0x06), 0x0118);
  cs.write(0x04, dw(0xffff_0000)); // a dword over COMMAND+STATUS clears every RW1C bit
  assert.equal(cs.readU16(0x06), 0x0018);
});

test('cache line size, latency timer and interrupt line are read-write', () => {
  const cs = new PciConfigSpace(plain);
  cs.write(0x0c, bytes(0x10, 0x40));
  cs.write(0x3c, bytes(0x0b));
  assert.deepEqual([...cs.read(0x0c, 4)], [0x10, 0x40, 0x00, 0x00]);
  assert.equal(cs.interruptLine, 0x0b);
});

test('out-of-range and malformed accesses are refused', () => {
  const cs = new PciConfigSpace(plain);
  refused(() => cs.read(256, 1), 'ERR_PCI_OUT_OF_RANGE', 22);
  refused(() => cs.read(255, 2), 'ERR_PCI_OUT_OF_RANGE', 22);
  refused(() => cs.read(-1, 1), 'ERR_PCI_OUT_OF_RANGE', 22);
  refused(() => cs.read(0.5, 1), 'ERR_PCI_OUT_OF_RANGE', 22);
  refused(() => cs.readU32(254), 'ERR_PCI_OUT_OF_RANGE', 22);
  refused(() => cs.write(254, dw(0)), 'ERR_PCI_OUT_OF_RANGE', 22);
  refused(() => cs.write(0x80, bytes(1)), 'ERR_PCI_READ_ONLY', 22); // no capability there
  const pcie = new PciConfigSpace({ ...plain, express: true });
  assert.equal(pcie.size, 4096);
  assert.deepEqual([...pcie.read(0xffc, 4)], [0, 0, 0, 0]);
  refused(() => pcie.read(0xffe, 4), 'ERR_PCI_OUT_OF_RANGE', 22);
  refused(() => pcie.write(0x100, dw(0)), 'ERR_PCI_READ_ONLY', 22);
});

test('descriptions that cannot be built are refused', () => {
  const base = { vendorId: 1, deviceId: 2, classCode: 0 };
  const bad = (d: PciDeviceDescription): void => refused(() => new PciConfigSpace(d), 'ERR_PCI_BAD_DESCRIPTION', 22);
  bad({ ...base, vendorId: 0x10000 });
  bad({ ...base, bars: [{ type: 'mem32', size: 0x3000 }] });
  bad({ ...base, bars: [{ type: 'mem32', size: 8 }] });
  bad({ ...base, bars: [{ type: 'io', size: 0x100, prefetchable: true }] });
  bad({ ...base, bars: [{ type: 'mem64', size: 0x1000 }, { type: 'mem32', size: 0x1000 }] });
  bad({ ...base, bars: [undefined, undefined, undefined, undefined, undefined, { type: 'mem64', size: 0x1000 }] });
  bad({ ...base, rom: { size: 0x400 } });
  bad({ ...base, express: false, capabilities: [{ type: 'dsn', serial: 1n }] });
  bad({ ...base, capabilities: [{ type: 'msix', tableSize: 4, tableBar: 0, tableOffset: 0, pbaBar: 0, pbaOffset: 0x40 }] });
  bad({
    ...base,
    bars: [{ type: 'mem32', size: 0x1000 }],
    capabilities: [{ type: 'msix', tableSize: 4, tableBar: 0, tableOffset: 0, pbaBar: 0, pbaOffset: 0x20 }],
  });
  bad({ ...base, capabilities: [{ type: 'pm' }, { type: 'pm' }] });
});

test('reset restores the power-on contents', () => {
  const cs = new PciConfigSpace(plain);
  let resets = 0;
  cs.on('reset', () => resets++);
  cs.write(0x04, w16(0x0007));
  cs.write(0x18, dw(0xfebf0000));
  cs.reset();
  assert.equal(resets, 1);
  assert.equal(cs.command, 0);
  assert.equal(cs.readU32(0x18), 0);
  assert.equal(cs.readU32(0x10), 0x0c);
});

test('a throwing listener does not stop the others; its error surfaces after the write', () => {
  const cs = new PciConfigSpace(plain);
  let second = 0;
  const off = cs.on('command', () => {
    throw new Error('boom');
  });
  cs.on('command', () => second++);
  assert.throws(() => cs.write(0x04, w16(0x0002)), /boom/);
  assert.equal(second, 1);
  assert.equal(cs.command, 0x0002);
  off();
  cs.write(0x04, w16(0x0000));
  assert.equal(second, 2);
});
