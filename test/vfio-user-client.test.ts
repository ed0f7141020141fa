/** The vfio-user client and client device, end to end against our server, and against misbehaving servers. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { VfioUserServer } from '../src/vfio-user/server.js';
import { VfioUserClient } from '../src/vfio-user/client.js';
import { VfioUserDevice } from '../src/vfio-user/client-device.js';
import { ConnectionError } from '../src/vfio-user/connection.js';
import { Command } from '../src/vfio-user/constants.js';
import { gpioDevice } from '../src/devices/gpio.js';
import { SharedMemory, EventFd, UnixServer, type UnixSocket } from '../src/sys/index.js';
import { Bytes } from '../src/testing/index.js';
import type { DeviceContext, VfioUserDeviceSpec } from '../src/vfio-user/device.js';
import { openFdCount, openFdsBackTo, tick } from './helpers/sys.js';

const sock = (name: string): string => path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'vfc-')), name);

function dmaDevice() {
  let ctx: DeviceContext | null = null;
  const bar2 = SharedMemory.create(0x10000);
  const spec: VfioUserDeviceSpec & { ctx(): DeviceContext; bar2: SharedMemory } = {
    ctx: () => ctx!,
    bar2,
    pci: { vendorId: 0x1af4, deviceId: 0x10f0, classCode: 0xff0000 },
    regions: {
      0: { size: 4096, read: (_o, out) => out.fill(0xab), write: () => {} },
      2: { size: 0x10000, memory: bar2, mmapAreas: [{ offset: 0, size: 0x4000 }, { offset: 0x8000, size: 0x8000 }] },
    },
    irqs: { intx: true, msix: 5 },
    attach: (c) => (ctx = c),
    migration: { save: () => bar2.bytes.slice(0, 16), load: (d) => bar2.bytes.set(d, 0) },
  };
  return spec;
}

async function setup(device: VfioUserDeviceSpec = gpioDevice(), serverOpts: { maxMsgFds?: number; trace?: (l: string) => void } = {}, clientOpts = {}) {
  const server = VfioUserServer.listen(sock('s.sock'), { device, ...serverOpts });
  const client = await VfioUserClient.connect(server.path, clientOpts);
  const dev = new VfioUserDevice(client);
  return { server, client, dev };
}

test('connect, negotiate, query the gpio device', async () => {
  const { server, client, dev } = await setup();
  assert.equal(client.version.major, 0);
  assert.equal(client.version.minor, 2);
  assert.equal(client.serverCaps.writeMultiple, true);
  assert.equal(client.serverCaps.maxMsgFds, 16);
  const info = await dev.info();
  assert.deepEqual(info, { flags: 3, numRegions: 9, numIrqs: 5 });
  const bar2 = await dev.regionInfo(2);
  assert.equal(bar2.size, 0x100);
  assert.equal(bar2.mapped.length, 0);
  const ids = await dev.read(7, 0, 4);
  assert.deepEqual([...ids], [0x4f, 0x49, 0xc8, 0x0d]);
  // Pin 3 toggled once, then twice more: IN_LO loses bit 3, then has it again.
  assert.equal((await dev.read(2, 1, 1))[0], 0xff);
  await dev.write(2, 0, Uint8Array.of(0x08));
  assert.equal((await dev.read(2, 1, 1))[0], 0xf7);
  await dev.write(2, 0, Uint8Array.of(0x08));
  await dev.write(2, 0, Uint8Array.of(0x08));
  assert.equal((await dev.read(2, 1, 1))[0], 0xff);
  assert.deepEqual(await dev.irqInfo(0), { index: 0, flags: 7, count: 1 });
  await assert.rejects(dev.regionInfo(9), (e: unknown) => (e as { errno?: number }).errno === 22);
  client.close();
  server.close();
});

test('posted writes and REGION_WRITE_MULTI coalescing keep order with later reads', async () => {
  const lines: string[] = [];
  const { server, client, dev } = await setup(gpioDevice(), { trace: (l) => lines.push(l) });
  assert.equal(client.postedWrites, true);
  // Five posted 1-byte writes in one burst: one REGION_WRITE_MULTI, no replies.
  for (let i = 0; i < 5; i++) void dev.write(7, 0x3c, Uint8Array.of(i + 1), { posted: true });
  const line = await dev.read(7, 0x3c, 1);
  assert.equal(line[0], 5);
  assert.equal(lines.filter((l) => l.includes('<- ') && l.includes('REGION_WRITE_MULTI')).length, 1);
  assert.equal(lines.filter((l) => l.includes('-> ') && l.includes('REGION_WRITE_MULTI')).length, 0, 'no reply to a posted batch');
  // A posted write of more than 8 bytes goes alone.
  await dev.write(2, 0x10, new Uint8Array(16), { posted: true });
  await dev.read(7, 0, 2);
  assert.ok(lines.some((l) => l.includes('<- ') && /REGION_WRITE \(command, no reply/.test(l)));
  client.close();
  server.close();
});

test('migration of the gpio device from one server to another, through the client', async () => {
  const a = await setup(gpioDevice());
  const bDev = gpioDevice();
  const b = await setup(bDev);
  // Toggle pins 0 and 2 seven times, pin 9 twice.
  for (let i = 0; i < 7; i++) await a.dev.write(2, 0, Uint8Array.of(0b101));
  for (let i = 0; i < 2; i++) await a.dev.write(2, 4, Uint8Array.of(0b10));
  assert.equal((await a.dev.migrationFlags()) & 1, 1);
  const stream = await a.dev.save();
  // The stream is the sample's int pin[16], little-endian, no framing.
  const expected = Buffer.alloc(64);
  expected.writeInt32LE(7, 0);
  expected.writeInt32LE(7, 8);
  expected.writeInt32LE(2, 36);
  assert.deepEqual(Buffer.from(stream), expected);
  assert.equal(await a.dev.migrationState(), 1);
  await b.dev.restore(stream);
  assert.equal(await b.dev.migrationState(), 2);
  assert.deepEqual(bDev.pins, [7, 0, 7, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0]);
  // Pin 0 and 2 counts are 7 (not divisible by 3), the others 0 or 2: IN_LO = 0b11111010, IN_HI = 0b11111101.
  assert.deepEqual([...(await b.dev.read(2, 1, 1))], [0b11111010]);
  assert.deepEqual([...(await b.dev.read(2, 5, 1))], [0b11111101]);
  for (const s of [a, b]) {
    s.client.close();
    s.server.close();
  }
});

test('a mmap-able region: sparse areas mapped by the client, accesses go to the mapping, posted writes turn off', async () => {
  const d = dmaDevice();
  const { server, client, dev } = await setup(d);
  const r = await dev.regionInfo(2);
  assert.equal(r.mapped.length, 2);
  assert.deepEqual(r.caps.map((c) => c.kind), ['sparse-mmap']);
  assert.equal(client.postedWrites, false);
  await dev.write(2, 0x9000, Uint8Array.of(1, 2, 3));
  assert.deepEqual([...d.bar2.bytes.subarray(0x9000, 0x9003)], [1, 2, 3], 'written through the mapping');
  d.bar2.bytes.set([7, 7], 0x5000); // in the hole: reached by REGION_READ
  assert.deepEqual([...(await dev.read(2, 0x5000, 2))], [7, 7]);
  dev.close();
  client.close();
  server.close();
  d.bar2.close();
});

test('DMA: by fd the server maps our memory; without, the client serves DMA_READ/WRITE (also over a twin socket)', async () => {
  for (const twinSocket of [false, true]) {
    const d = dmaDevice();
    const { server, client } = await setup(d, {}, { twinSocket, maxDataXferSize: 4096 });
    const guest = SharedMemory.create(0x10000);
    guest.bytes.set([5, 6, 7], 0x100);
    await client.dmaMap({ iova: 0x100000, size: 0x8000, memory: guest });
    await client.dmaMap({ iova: 0x200000, size: 0x8000, memory: guest, offset: 0x8000, passFd: false });
    const ctx = d.ctx();
    assert.deepEqual([...(await ctx.dma.read(0x100100, 3))], [5, 6, 7]);
    assert.ok(ctx.dma.view(0x100000, 16) !== null);
    assert.equal(ctx.dma.view(0x200000, 16), null);
    guest.bytes.fill(9, 0x8000, 0x8000 + 10000);
    const got = await ctx.dma.read(0x200000, 10000); // 3 DMA_READs of <= 4096
    assert.ok(got.every((v) => v === 9));
    await ctx.dma.write(0x200010, Uint8Array.of(1, 2));
    assert.deepEqual([...guest.bytes.subarray(0x8010, 0x8012)], [1, 2]);
    // Outside every window: the client refuses with an errno, the device sees an error.
    await assert.rejects(ctx.dma.read(0x300000, 4));
    await client.dmaUnmap(0x100000, 0x8000);
    await client.dmaUnmapAll();
    assert.equal(client.dma.size, 0);
    guest.close();
    client.close();
    server.close();
    d.bar2.close();
  }
});

test('SET_IRQS eventfds are chunked by the server\'s max_msg_fds; interrupts arrive', async () => {
  const d = dmaDevice();
  const lines: string[] = [];
  const { server, client, dev } = await setup(d, { maxMsgFds: 2, trace: (l) => lines.push(l) });
  const efds = Array.from({ length: 5 }, () => EventFd.create());
  await dev.setEventFds(2, 0, efds);
  assert.equal(lines.filter((l) => l.startsWith('[1] <- ') && l.includes('DEVICE_SET_IRQS')).length, 3);
  d.ctx().trigger('msix', 4);
  assert.equal(await efds[4]!.wait(), 1);
  await dev.setEventFds(2, 3, [null, null]); // de-assign 3 and 4
  d.ctx().trigger('msix', 4);
  await tick(10);
  assert.equal(efds[4]!.read(), 0);
  await dev.disableIrqs(2);
  for (const e of efds) e.close();
  client.close();
  server.close();
  d.bar2.close();
});

test('dirty logging through the client device', async () => {
  const d = dmaDevice();
  const { server, client, dev } = await setup(d);
  const guest = SharedMemory.create(8 * 4096);
  await client.dmaMap({ iova: 0x40000, size: 8 * 4096, memory: guest });
  await dev.startDmaLogging(4096);
  await d.ctx().dma.write(0x40000 + 5 * 4096, Uint8Array.of(1));
  const bitmap = await dev.dmaLoggingReport(0x40000, 8 * 4096, 4096);
  assert.deepEqual([...bitmap], [1 << 5, 0, 0, 0, 0, 0, 0, 0]);
  await dev.stopDmaLogging();
  guest.close();
  client.close();
  server.close();
  d.bar2.close();
});

// --- misbehaving servers, written in the test with hand-built bytes ---

/** A server that answers each message with whatever `answer` writes. */
function rawServer(answer: (s: UnixSocket, msg: Buffer) => void) {
  const server = UnixServer.listen(sock('raw.sock'));
  server.on('connection', (s) => {
    let buf = Buffer.alloc(0);
    s.on('data', (chunk, fds) => {
      fds.forEach((f) => f.close());
      buf = Buffer.concat([buf, chunk]);
      while (buf.length >= 16 && buf.length >= buf.readUInt32LE(4)) {
        const size = buf.readUInt32LE(4);
        // Commands only: our answers to its unsolicited replies (EINVAL) are not answered.
        if ((buf[8]! & 0xf) === 0) answer(s, buf.subarray(0, size));
        buf = buf.subarray(size);
      }
    });
  });
  return server;
}

const versionReply = (id: number, json: string) =>
  new Bytes().u16(id).u16(1).u32(16 + 4 + json.length + 1).u32(1).u32(0).u16(0).u16(0).ascii(json).u8(0).build();

test('misbehaving servers: bad caps, wrong ids, silence, death mid-reply, hostile info; no hangs, no leaks', async () => {
  const before = openFdCount();
  const cases: [string, (s: UnixSocket, m: Buffer) => void, (e: unknown) => boolean][] = [
    ['caps of the wrong type', (s, m) => s.write(versionReply(m.readUInt16LE(0), '{"capabilities":{"max_msg_fds":"16"}}')), (e) => (e as Error).message.includes('max_msg_fds')],
    ['max_msg_fds above 16', (s, m) => s.write(versionReply(m.readUInt16LE(0), '{"capabilities":{"max_msg_fds":64}}')), (e) => (e as Error).message.includes('max_msg_fds')],
    ['a twin socket that was not asked for', (s, m) => s.write(versionReply(m.readUInt16LE(0), '{"capabilities":{"twin_socket":{"supported":true,"fd_index":0}}}')), (e) => (e as Error).message.includes('twin_socket')],
    ['a major version of 1', (s, m) => s.write(new Bytes().u16(m.readUInt16LE(0)).u16(1).u32(20).u32(1).u32(0).u16(1).u16(0).build()), (e) => (e as Error).message.includes('major')],
    ['silence', () => {}, (e) => e instanceof ConnectionError && e.code === 'VFU_TIMEOUT'],
    ['death mid-reply', (s) => { s.write(Buffer.from([1, 0, 1, 0, 100, 0])); setTimeout(() => s.destroy(), 5); }, (e) => e instanceof ConnectionError && e.code === 'VFU_CLOSED'],
  ];
  for (const [name, answer, check] of cases) {
    const server = rawServer(answer);
    // Only 'silence' is meant to time out: the others must get (and fail on) their reply first, however slow the machine.
    const timeoutMs = name === 'silence' ? 200 : 5000;
    await assert.rejects(VfioUserClient.connect(server.path, { timeoutMs }), check, name);
    server.close();
  }
  // A reply with the wrong id does not match the request (it is answered EINVAL), so the request times out.
  let stage = 0;
  const wrongId = rawServer((s, m) => {
    const id = m.readUInt16LE(0);
    if (stage++ === 0) s.write(versionReply(id, '{}'));
    else s.write(new Bytes().u16(id + 1).u16(4).u32(32).u32(1).u32(0).u32(16).u32(3).u32(9).u32(5).build());
  });
  // VERSION must succeed (default timeout); only the GET_INFO with the wrong-id reply times out.
  const c1 = await VfioUserClient.connect(wrongId.path);
  await assert.rejects(
    c1.request(Command.DEVICE_GET_INFO, { argsz: 16, flags: 0, numRegions: 0, numIrqs: 0 }, { timeoutMs: 200 }),
    (e: unknown) => e instanceof ConnectionError && e.code === 'VFU_TIMEOUT',
  );
  c1.close();
  wrongId.close();
  // Too many regions.
  stage = 0;
  const hostile = rawServer((s, m) => {
    const id = m.readUInt16LE(0);
    if (stage++ === 0) s.write(versionReply(id, '{}'));
    else s.write(new Bytes().u16(id).u16(4).u32(32).u32(1).u32(0).u32(16).u32(3).u32(1000).u32(5).build());
  });
  const c2 = await VfioUserClient.connect(hostile.path);
  await assert.rejects(new VfioUserDevice(c2).info(), /1000 regions/);
  c2.close();
  hostile.close();
  // A region-info capability chain that loops back on itself.
  stage = 0;
  const loop = rawServer((s, m) => {
    const id = m.readUInt16LE(0);
    const cmd = m.readUInt16LE(2);
    if (stage++ === 0) return s.write(versionReply(id, '{}'));
    if (cmd === 4) return s.write(new Bytes().u16(id).u16(4).u32(32).u32(1).u32(0).u32(16).u32(3).u32(9).u32(5).build());
    // region info: argsz 48, flags READ|CAPS, index 0, cap_offset 32, size 4096, offset 0; cap id 2 v1 next=32 (itself)
    const body = new Bytes().u32(48).u32(1 | 8).u32(0).u32(32).u64(4096).u64(0).u16(2).u16(1).u32(32).u32(0).u32(0).build();
    s.write(Buffer.concat([new Bytes().u16(id).u16(5).u32(16 + body.length).u32(1).u32(0).build(), body]));
  });
  const c3 = await VfioUserClient.connect(loop.path);
  await assert.rejects(new VfioUserDevice(c3).regionInfo(0), (e: unknown) => (e as { errno?: number }).errno === 22);
  c3.close();
  loop.close();
  await openFdsBackTo(before, 'fds left after the misbehaving servers');
  assert.equal(openFdCount(), before);
});

test('a server that dies fails every pending request, and only that client', async () => {
  const d = gpioDevice();
  const a = await setup(d);
  const pending = [a.dev.info(), a.dev.read(2, 0, 1), a.dev.irqInfo(0)];
  a.server.close(); // closes the session too
  const results = await Promise.allSettled(pending);
  for (const r of results) if (r.status === 'rejected') assert.ok(r.reason instanceof ConnectionError);
  await assert.rejects(a.dev.info(), ConnectionError);
});

test('a container with two vfio-user devices keeps their mappings in step', async () => {
  const { VfioContainer, VfioGroup, IommuType } = await import('../src/vfio/index.js');
  const { dmaTargetOf } = await import('../src/vfio-user/client-device.js');
  const d1 = dmaDevice();
  const d2 = dmaDevice();
  const s1 = await setup(d1);
  const s2 = await setup(d2);
  const container = new VfioContainer<SharedMemory>({ iommu: IommuType.TYPE1v2 });
  const group = new VfioGroup<SharedMemory>('g0');
  await group.addDevice(dmaTargetOf(s1.dev, 'dev1'));
  await group.attach(container);
  const ram = SharedMemory.create(0x20000);
  ram.bytes.set([1, 2, 3], 0x10000);
  await container.map({ iova: 0x80000000, size: 0x20000, prot: 3, memory: ram, offset: 0 });
  // A device added later gets the existing mapping replayed.
  await group.addDevice(dmaTargetOf(s2.dev, 'dev2'));
  for (const d of [d1, d2]) assert.deepEqual([...(await d.ctx().dma.read(0x80010000, 3))], [1, 2, 3]);
  // Dirty logging across both devices: their bitmaps are OR-ed.
  await container.startDirtyLogging(4096);
  await d1.ctx().dma.write(0x80000000 + 2 * 4096, Uint8Array.of(9));
  await d2.ctx().dma.write(0x80000000 + 7 * 4096, Uint8Array.of(9));
  const bitmap = await container.reportDirty(0x80000000, 0x20000, 4096);
  assert.equal(bitmap[0], (1 << 2) | (1 << 7));
  await container.stopDirtyLogging();
  await container.unmap(0x80000000, 0x20000);
  for (const d of [d1, d2]) assert.deepEqual(d.ctx().dma.windows(), []);
  ram.close();
  for (const s of [s1, s2]) {
    s.dev.close();
    s.client.close();
    s.server.close();
  }
  d1.bar2.close();
  d2.bar2.close();
});

test('misbehaving servers: an oversized reply, a cap chain pointing outside the reply, unexpected fds', async () => {
  const before = openFdCount();
  let stage = 0;
  const infoReply = (id: number) => new Bytes().u16(id).u16(4).u32(32).u32(1).u32(0).u32(16).u32(3).u32(9).u32(5).build();
  const server = rawServer((s, m) => {
    const id = m.readUInt16LE(0);
    const cmd = m.readUInt16LE(2);
    stage++;
    if (cmd === 1) return s.write(versionReply(id, '{}'));
    if (cmd === 4 && stage === 2) {
      // A reply announcing 8 MiB: refused from its header, its body skipped as it streams past.
      s.write(new Bytes().u16(id).u16(4).u32(8 << 20).u32(1).u32(0).build());
      s.write(Buffer.alloc((8 << 20) - 16));
      return;
    }
    if (cmd === 4 && stage === 3) return s.write(infoReply(id), [s.fdNumber]); // an fd nobody asked for
    if (cmd === 4) return s.write(infoReply(id));
    if (cmd === 5) {
      // flags READ|CAPS, cap_offset 32, one cap whose next points far outside the 40-byte reply.
      const body = new Bytes().u32(40).u32(1 | 8).u32(0).u32(32).u64(4096).u64(0).u16(2).u16(1).u32(4096).build();
      s.write(Buffer.concat([new Bytes().u16(id).u16(5).u32(16 + body.length).u32(1).u32(0).build(), body]));
    }
  });
  const client = await VfioUserClient.connect(server.path, { timeoutMs: 2000 });
  const dev = new VfioUserDevice(client);
  await assert.rejects(dev.info(), (e: unknown) => e instanceof ConnectionError && e.code === 'VFU_BAD_REPLY');
  await assert.rejects(dev.info(), (e: unknown) => e instanceof ConnectionError && /unexpected fd/.test(e.message));
  assert.equal((await dev.info()).numRegions, 9, 'the connection goes on');
  await assert.rejects(dev.regionInfo(0), (e: unknown) => (e as { errno?: number }).errno === 22);
  client.close();
  server.close();
  await openFdsBackTo(before, 'fds left after the misbehaving server');
  assert.equal(openFdCount(), before);
});

test('migration of the sample device between two servers, through the client', async () => {
  const { sampleDevice } = await import('../src/devices/sample.js');
  const a = sampleDevice();
  const b = sampleDevice();
  const sa = await setup(a);
  const sb = await setup(b);
  await sa.dev.write(0, 0x04, Uint8Array.of(0x78, 0x56, 0x34, 0x12)); // scratch register
  const r2 = await sa.dev.regionInfo(2);
  assert.ok(r2.mapped.length > 0);
  await sa.dev.write(2, 0x100, Uint8Array.of(1, 2, 3, 4)); // through the mapping
  const stream = await sa.dev.save();
  await sb.dev.restore(stream);
  assert.deepEqual([...(await sb.dev.read(0, 0x04, 4))], [0x78, 0x56, 0x34, 0x12]);
  assert.deepEqual([...(await sb.dev.read(2, 0x100, 4))], [1, 2, 3, 4]);
  for (const s of [sa, sb]) {
    s.dev.close();
    s.client.close();
    s.server.close();
  }
  a.dispose();
  b.dispose();
});
