import { test } from 'node:test';
import assert from 'node:assert/strict';
import { VfioContainer, type VfioContainerOptions } from '../src/vfio/container.js';
import { IommuType, VfioExtension } from '../src/vfio/iommu.js';
import { GroupStatusFlag, VfioGroup } from '../src/vfio/group.js';
import { DmaTargetError, type DmaLogging, type DmaTarget, type DmaTargetMapping } from '../src/vfio/dma-target.js';
import { VfioError } from '../src/vfio/errors.js';

const K = 0x1000;
const K64 = 0x10000;
const R = 1;
const W = 2;
const RW = R | W;

const EPERM = 1;
const ENOENT = 2;
const EIO = 5;
const ENOMEM = 12;
const EBUSY = 16;
const EEXIST = 17;
const ENODEV = 19;
const EINVAL = 22;
const ENOTTY = 25;
const ENOSPC = 28;

/** An error with an errno, as a vfio-user client reply error would carry. */
class ErrnoError extends Error {
  constructor(readonly errno: number, message = `errno ${errno}`) {
    super(message);
  }
}

interface FakeOptions {
  pgsizes?: bigint;
  maxDmaMaps?: number;
  unmapAll?: boolean;
  logging?: boolean;
  /** Random delay per call, to shake out ordering bugs. */
  jitter?: boolean;
}

/** Dirty log of a fake device: pages (at the logging page size) it wrote. */
class FakeLogging implements DmaLogging {
  pageSize = 0;
  dirty = new Set<number>();
  fail: string | undefined;
  badLength = false;
  constructor(private readonly dev: FakeDevice) {}

  async start(pageSize: number, ranges: readonly { iova: number; length: number }[]): Promise<void> {
    await this.dev.tick(`logStart ${pageSize} ${ranges.length}`);
    if (this.fail === 'start') throw new ErrnoError(EIO);
    this.pageSize = pageSize;
  }
  async stop(): Promise<void> {
    await this.dev.tick('logStop');
    this.pageSize = 0;
    this.dirty.clear();
  }
  async report(iova: number, length: number, pageSize: number): Promise<Uint8Array> {
    await this.dev.tick(`logReport ${hex(iova)}+${hex(length)}`);
    if (this.fail === 'report') throw new ErrnoError(EIO);
    const out = new Uint8Array(Math.ceil(Math.ceil(length / pageSize) / 64) * 8 + (this.badLength ? 1 : 0));
    for (const p of [...this.dirty]) {
      const from = Math.max(p * this.pageSize, iova);
      const to = Math.min((p + 1) * this.pageSize, iova + length);
      if (from >= to) continue;
      for (let b = Math.floor((from - iova) / pageSize); b <= Math.floor((to - 1 - iova) / pageSize); b++) out[b >> 3]! |= 1 << (b & 7);
      if (p * this.pageSize >= iova && (p + 1) * this.pageSize <= iova + length) this.dirty.delete(p);
    }
    return out;
  }
  /** The device wrote [iova, +len). */
  write(iova: number, len: number): void {
    for (let p = Math.floor(iova / this.pageSize); p <= Math.floor((iova + len - 1) / this.pageSize); p++) this.dirty.add(p);
  }
}

/** A DmaTarget that records every call and can be told to fail. */
class FakeDevice implements DmaTarget<string> {
  readonly pgsizes: bigint;
  readonly maxDmaMaps: number;
  readonly calls: string[] = [];
  readonly maps = new Map<number, DmaTargetMapping<string>>();
  failMap: ((m: DmaTargetMapping<string>) => boolean) | undefined;
  failUnmap = false;
  dmaUnmapAll?: () => Promise<void>;
  readonly dmaLogging: FakeLogging | undefined;
  #inFlight = 0;
  maxInFlight = 0;
  readonly #jitter: boolean;

  constructor(readonly name: string, o: FakeOptions = {}) {
    this.pgsizes = o.pgsizes ?? 4096n;
    this.maxDmaMaps = o.maxDmaMaps ?? 65535;
    this.#jitter = o.jitter ?? false;
    this.dmaLogging = o.logging ? new FakeLogging(this) : undefined;
    if (o.unmapAll ?? true) {
      this.dmaUnmapAll = async () => {
        await this.tick('unmapAll');
        if (this.failUnmap) throw new ErrnoError(EIO);
        this.maps.clear();
      };
    }
  }

  async tick(call: string): Promise<void> {
    this.calls.push(call);
    this.#inFlight++;
    this.maxInFlight = Math.max(this.maxInFlight, this.#inFlight);
    try {
      if (this.#jitter) await new Promise((r) => setTimeout(r, Math.random() * 2));
      else await Promise.resolve();
    } finally {
      this.#inFlight--;
    }
  }

  async dmaMap(m: DmaTargetMapping<string>): Promise<void> {
    await this.tick(`map ${hex(m.iova)}+${hex(m.size)}`);
    if (this.failMap?.(m)) throw new ErrnoError(ENOMEM);
    assert.ok(!this.maps.has(m.iova), `${this.name}: ${hex(m.iova)} mapped twice`);
    this.maps.set(m.iova, { ...m });
  }

  async dmaUnmap(m: { iova: number; size: number }): Promise<void> {
    await this.tick(`unmap ${hex(m.iova)}+${hex(m.size)}`);
    if (this.failUnmap) throw new ErrnoError(EIO);
    this.maps.delete(m.iova);
  }

  mapped(): string[] {
    return [...this.maps.values()].sort((a, b) => a.iova - b.iova).map((m) => `${hex(m.iova)}+${hex(m.size)}`);
  }
}

const hex = (n: number): string => `0x${n.toString(16)}`;

async function rejects(p: Promise<unknown>, code: string, errno: number): Promise<VfioError> {
  let caught: unknown;
  await assert.rejects(p, (err: unknown) => {
    caught = err;
    assert.ok(err instanceof VfioError, `expected VfioError, got ${String(err)}`);
    assert.equal(err.code, code, err.message);
    assert.equal(err.errno, errno, err.message);
    return true;
  });
  return caught as VfioError;
}

/** A type1 container with one group holding the given devices, attached. */
async function setup(
  devices: FakeDevice[],
  opts: VfioContainerOptions = {},
): Promise<{ c: VfioContainer<string>; g: VfioGroup<string> }> {
  const c = new VfioContainer<string>({ iommu: IommuType.TYPE1v2, ...opts });
  const g = new VfioGroup<string>('g');
  for (const d of devices) await g.addDevice(d);
  await g.attach(c);
  return { c, g };
}

const mapping = (iova: number, size: number, prot = RW, offset = 0) => ({ iova, size, prot, memory: 'mem', offset });

test('map reaches every device, in order, with the memory reference', async () => {
  const a = new FakeDevice('a');
  const b = new FakeDevice('b');
  const { c } = await setup([a, b]);
  await c.map(mapping(0x10 * K, 4 * K));
  await c.map({ iova: 0x20 * K, size: K, prot: R, memory: 'other', offset: 8 * K });
  for (const d of [a, b]) {
    assert.deepEqual(d.calls, ['map 0x10000+0x4000', 'map 0x20000+0x1000']);
    assert.deepEqual(d.maps.get(0x20 * K), { iova: 0x20 * K, size: K, prot: R, memory: 'other', offset: 8 * K });
  }
  assert.deepEqual(
    c.regions().map((r) => [r.iova, r.size, r.handle]),
    [
      [0x10 * K, 4 * K, 'mem'],
      [0x20 * K, K, 'other'],
    ],
  );
  const seg = c.translate(0x20 * K + 16, 8, R);
  assert.equal(seg.region.handle, 'other');
  assert.equal(seg.fileOffset, 8 * K + 16);
  assert.equal(c.find(0x13 * K)?.iova, 0x10 * K);
  // type1 rules
  await rejects(c.map(mapping(0x11 * K, K)), 'DMA_MAP_OVERLAP', EEXIST);
  await rejects(c.map(mapping(0x10 * K, 4 * K)), 'DMA_MAP_OVERLAP', EEXIST); // identical: EEXIST too (kernel type1)
  await rejects(c.map(mapping(0x40 * K, K, 0)), 'DMA_MAP_NO_PROT', EINVAL);
  await rejects(c.map(mapping(0x40 * K, 0)), 'DMA_MAP_EMPTY', EINVAL);
  await rejects(c.unmap(0x10 * K, K), 'DMA_UNMAP_NOT_FOUND', ENOENT);
  assert.equal(a.calls.length, 2, 'rejected requests never reach a device');
  assert.equal(await c.unmap(0x10 * K, 4 * K), undefined);
  assert.deepEqual(a.mapped(), ['0x20000+0x1000']);
  assert.deepEqual(b.calls.at(-1), 'unmap 0x10000+0x4000');
});

test('map is all or nothing: one device fails, the others are rolled back', async () => {
  const a = new FakeDevice('a');
  const b = new FakeDevice('b');
  const d = new FakeDevice('d');
  const cleanup: DmaTargetError[] = [];
  const { c } = await setup([a, b, d], { onCleanupError: (e) => cleanup.push(e) });
  await c.map(mapping(0, K));
  b.failMap = (m) => m.iova === 0x10 * K;
  const err = await rejects(c.map(mapping(0x10 * K, K)), 'DMA_TARGET_MAP_FAILED', ENOMEM);
  assert.ok(err instanceof DmaTargetError);
  assert.equal(err.target, 'b');
  assert.equal(err.op, 'map');
  assert.ok(err.cause instanceof ErrnoError);
  for (const x of [a, d]) assert.deepEqual(x.calls, ['map 0x0+0x1000', 'map 0x10000+0x1000', 'unmap 0x10000+0x1000']);
  assert.deepEqual(b.calls, ['map 0x0+0x1000', 'map 0x10000+0x1000']);
  for (const x of [a, b, d]) assert.deepEqual(x.mapped(), ['0x0+0x1000']);
  assert.deepEqual(
    c.regions().map((r) => r.iova),
    [0],
  );
  // a rollback failure is reported, not thrown over the map error
  b.failMap = () => true;
  a.failUnmap = true;
  await rejects(c.map(mapping(0x20 * K, K)), 'DMA_TARGET_MAP_FAILED', ENOMEM);
  assert.equal(cleanup.length, 1);
  assert.equal(cleanup[0]?.target, 'a');
  assert.equal(cleanup[0]?.op, 'unmap');
  // the range is free again once the device recovers
  b.failMap = undefined;
  a.failUnmap = false;
  a.maps.delete(0x20 * K);
  await c.map(mapping(0x20 * K, K));
  assert.equal(c.regions().length, 2);
});

test('alignment is the smallest page of the intersection of every pgsizes', async () => {
  const a = new FakeDevice('a', { pgsizes: BigInt(K | K64) });
  const b = new FakeDevice('b', { pgsizes: BigInt(K64) });
  const { c, g } = await setup([a, b]);
  assert.equal(c.pgsizes, BigInt(K64));
  assert.equal(c.pageSize, K64);
  await rejects(c.map(mapping(K, K)), 'DMA_MAP_UNALIGNED', EINVAL);
  await rejects(c.map(mapping(K64, K64 + K)), 'DMA_MAP_UNALIGNED', EINVAL);
  await rejects(c.map(mapping(K64, K64, RW, K)), 'DMA_MAP_UNALIGNED', EINVAL);
  await c.map(mapping(K64, K64));
  assert.deepEqual(a.calls, ['map 0x10000+0x10000']);
  // b leaves: 4K mappings become possible, the existing one stays
  await g.removeDevice('b');
  assert.equal(c.pageSize, K);
  assert.equal(c.pgsizes, BigInt(K | K64));
  await c.map(mapping(3 * K64 + K, K));
  assert.deepEqual(
    c.regions().map((r) => r.iova),
    [K64, 3 * K64 + K],
  );
  // a 64K-only device cannot join now: a mapping would break its alignment
  const b2 = new FakeDevice('b2', { pgsizes: BigInt(K64) });
  await rejects(g.addDevice(b2), 'CONTAINER_MAPPING_UNALIGNED', EINVAL);
  assert.deepEqual(b2.calls, []);
  assert.equal(c.pageSize, K);
  // nor one with no page size in common
  const huge = new FakeDevice('huge', { pgsizes: 1n << 21n });
  await rejects(g.addDevice(huge), 'CONTAINER_PGSIZES_DISJOINT', EINVAL);
  // the IOMMU's own page sizes count too
  const c2 = new VfioContainer<string>({ iommu: IommuType.TYPE1, iommuPgsizes: BigInt(K64) });
  const g2 = new VfioGroup<string>();
  await g2.addDevice(new FakeDevice('x', { pgsizes: BigInt(K | K64) }));
  await g2.attach(c2);
  assert.equal(c2.pageSize, K64);
  await assert.rejects(new VfioGroup<string>().addDevice(new FakeDevice('bad', { pgsizes: 0n })), /DMA_TARGET_BAD_PGSIZES/);
});

test('max_dma_maps is the minimum over the devices', async () => {
  const a = new FakeDevice('a', { maxDmaMaps: 8 });
  const b = new FakeDevice('b', { maxDmaMaps: 3 });
  const { c, g } = await setup([a, b], { maxDmaMaps: 100 });
  assert.equal(c.maxDmaMaps, 3);
  for (let i = 0; i < 3; i++) await c.map(mapping(i * K, K));
  assert.equal(c.dmaAvailable, 0);
  await rejects(c.map(mapping(0x100 * K, K)), 'DMA_MAP_LIMIT', ENOSPC);
  assert.equal(a.calls.length, 3);
  await rejects(g.addDevice(new FakeDevice('tiny', { maxDmaMaps: 2 })), 'CONTAINER_TOO_MANY_MAPS', ENOSPC);
  await g.removeDevice('b');
  assert.equal(c.maxDmaMaps, 8);
  assert.equal(c.dmaAvailable, 5);
  await c.map(mapping(0x100 * K, K));
  // the IOMMU's own limit is the ceiling
  const { c: c2 } = await setup([new FakeDevice('z', { maxDmaMaps: 65535 })], { maxDmaMaps: 2 });
  assert.equal(c2.maxDmaMaps, 2);
});

test('a device joining gets every mapping replayed; if that fails it is not added', async () => {
  const a = new FakeDevice('a');
  const { c, g } = await setup([a]);
  await c.map(mapping(0x30 * K, K));
  await c.map(mapping(0x10 * K, 2 * K, R, 4 * K));
  await c.map(mapping(0x20 * K, K));
  const b = new FakeDevice('b');
  const dev = await g.addDevice(b);
  assert.equal(dev.name, 'b');
  assert.equal(dev.group, g);
  assert.equal(dev.container, c);
  assert.deepEqual(b.calls, ['map 0x10000+0x2000', 'map 0x20000+0x1000', 'map 0x30000+0x1000']);
  assert.deepEqual(b.maps.get(0x10 * K), { iova: 0x10 * K, size: 2 * K, prot: R, memory: 'mem', offset: 4 * K });
  // a later map reaches it too
  await c.map(mapping(0x40 * K, K));
  assert.equal(b.maps.size, 4);
  // replay failure: what was replayed is unmapped, the device is not added
  const bad = new FakeDevice('bad', { unmapAll: false });
  bad.failMap = (m) => m.iova === 0x30 * K;
  const err = await rejects(g.addDevice(bad), 'DMA_TARGET_REPLAY_FAILED', ENOMEM);
  assert.equal((err as DmaTargetError).target, 'bad');
  assert.deepEqual(bad.calls, [
    'map 0x10000+0x2000',
    'map 0x20000+0x1000',
    'map 0x30000+0x1000',
    'unmap 0x20000+0x1000',
    'unmap 0x10000+0x2000',
  ]);
  assert.deepEqual(bad.mapped(), []);
  assert.equal(g.device('bad'), undefined);
  await c.map(mapping(0x50 * K, K));
  assert.equal(bad.calls.length, 5, 'a device that was not added gets nothing more');
  // the same target may try again once it works
  bad.failMap = undefined;
  bad.calls.length = 0;
  await g.addDevice(bad);
  assert.equal(bad.maps.size, 5);
});

test('a group attaching to a container with mappings: replay to every device, all or nothing', async () => {
  const a = new FakeDevice('a');
  const { c } = await setup([a]);
  await c.map(mapping(0, K));
  await c.map(mapping(K, K));
  const g2 = new VfioGroup<string>('g2');
  const x = new FakeDevice('x');
  const y = new FakeDevice('y');
  await g2.addDevice(x);
  await g2.addDevice(y);
  y.failMap = (m) => m.iova === K;
  await rejects(g2.attach(c), 'DMA_TARGET_REPLAY_FAILED', ENOMEM);
  assert.equal(g2.container, undefined);
  assert.deepEqual(c.groups.map((g) => g.name), ['g']);
  assert.deepEqual(x.mapped(), []);
  assert.deepEqual(x.calls, ['map 0x0+0x1000', 'map 0x1000+0x1000', 'unmapAll']);
  assert.deepEqual(y.mapped(), []);
  y.failMap = undefined;
  await g2.attach(c);
  assert.deepEqual(x.mapped(), ['0x0+0x1000', '0x1000+0x1000']);
  assert.deepEqual(y.mapped(), ['0x0+0x1000', '0x1000+0x1000']);
  assert.equal(c.devices().length, 3);
});

test('a device leaving loses its mappings, best effort', async () => {
  const a = new FakeDevice('a');
  const b = new FakeDevice('b', { unmapAll: false });
  const d = new FakeDevice('d');
  const cleanup: DmaTargetError[] = [];
  const { c, g } = await setup([a, b, d], { onCleanupError: (e) => cleanup.push(e) });
  await c.map(mapping(0, K));
  await c.map(mapping(4 * K, K));
  await g.removeDevice('b');
  assert.deepEqual(b.calls.slice(2), ['unmap 0x4000+0x1000', 'unmap 0x0+0x1000']);
  assert.deepEqual(b.mapped(), []);
  const bdev = g.device('a')!;
  assert.equal(bdev.name, 'a');
  // a failing unmap does not keep the device in
  a.failUnmap = true;
  const adev = g.device('a')!;
  await g.removeDevice(adev);
  assert.equal(adev.group, undefined);
  assert.equal(g.device('a'), undefined);
  assert.deepEqual(
    cleanup.map((e) => [e.target, e.op, e.errno]),
    [['a', 'unmapAll', EIO]],
  );
  await rejects(adev.open(), 'DEVICE_NOT_FOUND', ENODEV);
  // the others still get maps
  await c.map(mapping(8 * K, K));
  assert.equal(d.maps.size, 3);
  assert.equal(a.maps.size, 2);
  // open devices cannot leave; unknown ones are ENODEV
  const ddev = await g.openDevice('d');
  await rejects(g.removeDevice(ddev), 'DEVICE_OPEN', EBUSY);
  await rejects(g.removeDevice('nope'), 'DEVICE_NOT_FOUND', ENODEV);
  await ddev.close();
  await g.removeDevice(ddev);
  assert.deepEqual(c.devices(), []);
  // a group without devices still holds the IOMMU and the mappings
  assert.equal(c.regions().length, 3);
});

test('group attach / detach rules and the IOMMU (set_iommu)', async () => {
  const c = new VfioContainer<string>();
  const other = new VfioContainer<string>();
  const g = new VfioGroup<string>('g');
  const a = new FakeDevice('a');
  const adev = await g.addDevice(a);
  assert.equal(g.status, GroupStatusFlag.VIABLE);
  await rejects(c.setIommu(IommuType.TYPE1v2), 'CONTAINER_NO_GROUPS', EINVAL);
  await rejects(c.map(mapping(0, K)), 'CONTAINER_NO_IOMMU', EINVAL);
  await rejects(adev.open(), 'GROUP_NO_CONTAINER', EINVAL);
  await rejects(g.detach(), 'GROUP_NO_CONTAINER', EINVAL);
  assert.equal(c.checkExtension(VfioExtension.TYPE1v2_IOMMU), 1);
  assert.equal(c.checkExtension(VfioExtension.NOIOMMU_IOMMU), 0);
  assert.equal(c.checkExtension(VfioExtension.SPAPR_TCE_IOMMU), 0);

  await g.attach(c);
  assert.equal(g.container, c);
  assert.equal(g.status, GroupStatusFlag.VIABLE | GroupStatusFlag.CONTAINER_SET);
  await rejects(g.attach(c), 'GROUP_ALREADY_ATTACHED', EINVAL);
  await rejects(g.attach(other), 'GROUP_IN_OTHER_CONTAINER', EBUSY);
  assert.equal(c.iommu, undefined);
  await rejects(c.map(mapping(0, K)), 'CONTAINER_NO_IOMMU', EINVAL);
  await rejects(adev.open(), 'CONTAINER_NO_IOMMU', EINVAL);
  await rejects(c.setIommu(42), 'CONTAINER_NO_IOMMU_DRIVER', ENODEV);
  await rejects(c.setIommu(IommuType.NOIOMMU), 'CONTAINER_NO_IOMMU_DRIVER', ENODEV);
  await rejects(c.setIommu(VfioExtension.UNMAP_ALL), 'CONTAINER_NOT_IOMMU_TYPE', EINVAL);
  await c.setIommu(IommuType.TYPE1v2);
  assert.equal(c.iommu, IommuType.TYPE1v2);
  await rejects(c.setIommu(IommuType.TYPE1), 'CONTAINER_IOMMU_SET', EINVAL);
  assert.equal(c.checkExtension(VfioExtension.UNMAP_ALL), 1);

  // viability
  a.calls.length = 0;
  adev.viable = false;
  assert.equal(g.status, GroupStatusFlag.CONTAINER_SET);
  await rejects(adev.open(), 'GROUP_NOT_VIABLE', EINVAL);
  await rejects(g.openDevice('a'), 'GROUP_NOT_VIABLE', EINVAL);
  adev.viable = true;
  await rejects(g.openDevice('zz'), 'DEVICE_NOT_FOUND', ENODEV);
  await adev.open();
  assert.equal(adev.isOpen, true);
  await rejects(adev.open(), 'DEVICE_ALREADY_OPEN', EBUSY);
  await rejects(g.detach(), 'GROUP_DEVICE_OPEN', EBUSY);
  await adev.close();
  await rejects(adev.close(), 'DEVICE_NOT_OPEN', EINVAL);

  // a second group shares the IOMMU; its detach takes only its devices' mappings
  const g2 = new VfioGroup<string>('g2');
  const b = new FakeDevice('b');
  await g2.addDevice(b);
  await g2.attach(c);
  await c.map(mapping(0, K));
  await g2.detach();
  assert.equal(g2.container, undefined);
  assert.deepEqual(b.calls, ['map 0x0+0x1000', 'unmapAll']);
  assert.deepEqual(a.mapped(), ['0x0+0x1000']);
  assert.equal(c.iommu, IommuType.TYPE1v2);
  // the same target cannot be in two groups
  await rejects(new VfioGroup<string>().addDevice(a), 'DEVICE_TARGET_IN_USE', EBUSY);
  await rejects(g.addDevice(new FakeDevice('a')), 'DEVICE_NAME_EXISTS', EEXIST);

  // the last group out releases the IOMMU and every mapping
  await g.detach();
  assert.equal(c.iommu, undefined);
  assert.deepEqual(c.regions(), []);
  assert.deepEqual(a.mapped(), []);
  assert.deepEqual(c.groups, []);
  // ... and the group can go elsewhere now
  await g.attach(other);
  assert.equal(g.container, other);
});

test('noiommu groups: EPERM unless allowed, no mixing, no DMA API', async () => {
  const plain = new VfioContainer<string>();
  const ng = new VfioGroup<string>('n', { noiommu: true });
  await ng.addDevice(new FakeDevice('n0'));
  await rejects(ng.attach(plain), 'GROUP_NOIOMMU_DENIED', EPERM);
  const c = new VfioContainer<string>({ allowNoIommu: true });
  assert.equal(c.checkExtension(VfioExtension.NOIOMMU_IOMMU), 1);
  await ng.attach(c);
  assert.equal(c.checkExtension(VfioExtension.TYPE1_IOMMU), 0);
  await rejects(new VfioGroup<string>().attach(c), 'CONTAINER_NOIOMMU_MIX', EPERM);
  await rejects(c.setIommu(IommuType.TYPE1), 'CONTAINER_NO_IOMMU_DRIVER', ENODEV);
  await c.setIommu(IommuType.NOIOMMU);
  await rejects(c.map(mapping(0, K)), 'CONTAINER_NOIOMMU_DMA', ENOTTY);
  const dev = await ng.openDevice('n0');
  assert.equal(dev.isOpen, true);
});

test('unmapAll: every mapping, from every device, with or without dmaUnmapAll', async () => {
  const a = new FakeDevice('a');
  const b = new FakeDevice('b', { unmapAll: false });
  const { c } = await setup([a, b]);
  for (const i of [3, 1, 2]) await c.map(mapping(i * K, K));
  assert.equal(await c.unmapAll(), 3);
  assert.deepEqual(c.regions(), []);
  assert.deepEqual(a.calls.slice(3), ['unmapAll']);
  assert.deepEqual(b.calls.slice(3), ['unmap 0x3000+0x1000', 'unmap 0x2000+0x1000', 'unmap 0x1000+0x1000']);
  assert.deepEqual(b.mapped(), []);
  assert.equal(await c.unmapAll(), 0);
  // a device failure is thrown after the container forgot the mappings
  await c.map(mapping(0, K));
  a.failUnmap = true;
  await rejects(c.unmapAll(), 'DMA_TARGET_UNMAP_ALL_FAILED', EIO);
  assert.deepEqual(c.regions(), []);
  assert.deepEqual(b.mapped(), []);
});

test('operations are serialized: 100 maps fired at once reach each device in call order', async () => {
  const devs = [new FakeDevice('a', { jitter: true }), new FakeDevice('b', { jitter: true }), new FakeDevice('d', { jitter: true })];
  const { c, g } = await setup(devs);
  const expected: string[] = [];
  const ops: Promise<unknown>[] = [];
  for (let i = 0; i < 100; i++) {
    const iova = ((i * 37) % 100) * K; // not in IOVA order
    ops.push(c.map(mapping(iova, K)));
    expected.push(`map ${hex(iova)}+0x1000`);
    if (i % 10 === 9) {
      ops.push(c.unmap(iova, K));
      expected.push(`unmap ${hex(iova)}+0x1000`);
    }
  }
  // a device added meanwhile sees the whole state once, then the rest in order
  const late = new FakeDevice('late', { jitter: true });
  const added = g.addDevice(late);
  await Promise.all([...ops, added]);
  for (const d of devs) {
    assert.deepEqual(d.calls, expected);
    assert.equal(d.maxInFlight, 1, 'one call at a time per device');
    assert.equal(d.maps.size, 90);
  }
  assert.equal(late.maps.size, 90);
  assert.equal(late.maxInFlight, 1);
  assert.equal(c.regions().length, 90);
});

test('dirty logging: the devices\' bitmaps and the container\'s own log are OR-ed', async () => {
  const a = new FakeDevice('a', { logging: true });
  const b = new FakeDevice('b', { logging: true });
  const { c, g } = await setup([a, b]);
  await c.map(mapping(0, 16 * K));
  await c.map(mapping(0x100 * K, 4 * K, R));
  await rejects(c.reportDirty(0, 16 * K, K), 'DMA_LOG_NOT_STARTED', EINVAL);
  await rejects(c.startDirtyLogging(100), 'DMA_LOG_BAD_PAGE_SIZE', EINVAL);
  await c.startDirtyLogging(K);
  assert.equal(c.dirtyLogging, true);
  assert.equal(c.dirtyPageSize, K);
  await rejects(c.startDirtyLogging(K), 'DMA_LOG_ALREADY_STARTED', EBUSY);
  assert.equal(a.dmaLogging?.pageSize, K);
  a.dmaLogging!.write(1 * K + 5, 10);
  b.dmaLogging!.write(5 * K, 2 * K);
  c.markDirty(9 * K, 1);
  const bits = await c.reportDirty(0, 16 * K, K);
  assert.equal(bits.length, 8);
  assert.deepEqual([...bits.slice(0, 2)], [0b0110_0010, 0b0000_0010]); // pages 1, 5, 6, 9
  assert.deepEqual([...(await c.reportDirty(0, 16 * K, K))], [0, 0, 0, 0, 0, 0, 0, 0], 'reporting clears');
  // coarser report pages
  a.dmaLogging!.write(3 * K, 1);
  const coarse = await c.reportDirty(0, 16 * K, 4 * K);
  assert.equal(coarse[0], 0b0001);

  // a failing device: the error is thrown, nothing is lost
  c.markDirty(2 * K, 1);
  b.dmaLogging!.write(12 * K, 1);
  a.dmaLogging!.fail = 'report';
  await rejects(c.reportDirty(0, 16 * K, K), 'DMA_TARGET_LOG_REPORT_FAILED', EIO);
  a.dmaLogging!.fail = undefined;
  const again = await c.reportDirty(0, 16 * K, K);
  assert.deepEqual([...again.slice(0, 2)], [0b0000_0100, 0b0001_0000]); // pages 2 and 12
  // a bitmap of the wrong size is EIO
  b.dmaLogging!.badLength = true;
  await rejects(c.reportDirty(0, 16 * K, K), 'DMA_TARGET_LOG_REPORT_FAILED', EIO);
  b.dmaLogging!.badLength = false;

  // a device without logging: every writable mapped page counts as dirty
  const plain = new FakeDevice('plain');
  await g.addDevice(plain);
  const all = await c.reportDirty(0, 0x200 * K, 16 * K);
  assert.equal(all[0], 0b1, 'the 16K writable mapping');
  assert.equal(all[2], 0, 'the read-only mapping at 0x100000 is not');
  await g.removeDevice(plain);
  // ... including what it may have written before leaving
  assert.equal((await c.reportDirty(0, 16 * K, K))[0], 0xff);

  // unmap while logging returns the range's dirty bitmap
  b.dmaLogging!.write(15 * K, 1);
  const unmapped = await c.unmap(0, 16 * K);
  assert.ok(unmapped);
  assert.equal(unmapped[1], 0b1000_0000);

  // a logging device leaving: its pending dirty pages stay with the container
  await c.map(mapping(0x200 * K, 4 * K));
  b.dmaLogging!.write(0x201 * K, 1);
  await g.removeDevice('b');
  assert.ok(b.calls.includes('logStop'));
  const kept = await c.reportDirty(0x200 * K, 4 * K, K);
  assert.equal(kept[0], 0b0010);

  // a device joining while logging starts logging too
  const late = new FakeDevice('late', { logging: true });
  await g.addDevice(late);
  assert.deepEqual(late.calls, ['map 0x100000+0x4000', 'map 0x200000+0x4000', `logStart ${K} 0`]);

  await c.stopDirtyLogging();
  assert.equal(c.dirtyLogging, false);
  assert.equal(a.dmaLogging?.pageSize, 0);
  assert.equal(late.dmaLogging?.pageSize, 0);
  await c.stopDirtyLogging(); // no-op
});

test('dirty logging start is all or nothing', async () => {
  const a = new FakeDevice('a', { logging: true });
  const b = new FakeDevice('b', { logging: true });
  const { c } = await setup([a, b]);
  await c.map(mapping(0, 4 * K));
  b.dmaLogging!.fail = 'start';
  await rejects(c.startDirtyLogging(K), 'DMA_TARGET_LOG_START_FAILED', EIO);
  assert.deepEqual(a.calls.slice(1), [`logStart ${K} 0`, 'logStop']);
  assert.equal(c.dirtyLogging, false);
  c.markDirty(0, K); // ignored when not logging
  b.dmaLogging!.fail = undefined;
  await c.startDirtyLogging(K, [{ iova: 0, length: 4 * K }]);
  assert.equal(a.calls.at(-1), `logStart ${K} 1`);
  assert.deepEqual([...(await c.reportDirty(0, 4 * K, K))], [0, 0, 0, 0, 0, 0, 0, 0]);
});

test('dirty logs survive a change of the container\'s limits', async () => {
  const a = new FakeDevice('a', { pgsizes: BigInt(K | K64), logging: true });
  const { c, g } = await setup([a]);
  await c.map(mapping(K64, K64));
  await c.startDirtyLogging(K);
  c.markDirty(K64 + 3 * K, 1);
  await g.addDevice(new FakeDevice('b', { pgsizes: BigInt(K64), maxDmaMaps: 10, logging: true }));
  assert.equal(c.pageSize, K64);
  assert.equal(c.maxDmaMaps, 10);
  const bits = await c.reportDirty(K64, K64, K);
  assert.equal(bits[0], 0b1000);
  c.markDirty(K64, 1);
  await g.removeDevice('b');
  assert.equal(c.pageSize, K);
  assert.equal((await c.reportDirty(K64, K64, K))[0], 0b1);
});
