/**
 * The vfio-user server over a real socket, driven by the raw-bytes client:
 * every payload is built by hand from the spec's tables.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { VfioUserServer } from '../src/vfio-user/server.js';
import { gpioDevice } from '../src/devices/gpio.js';
import { RawVfioUserClient, FLAG_NO_REPLY, Bytes } from '../src/testing/index.js';
import { SharedMemory, EventFd } from '../src/sys/index.js';
import type { DeviceContext, VfioUserDeviceSpec } from '../src/vfio-user/device.js';
import { openFdCount, openFdsBackTo, tick, until } from './helpers/sys.js';

const EINVAL = 22;
const b = (): Bytes => new Bytes();
const sock = (name: string): string => path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'vfu-')), name);

// Commands, written out from the spec's table.
const VERSION = 1, DMA_MAP = 2, DMA_UNMAP = 3, GET_INFO = 4, GET_REGION_INFO = 5, GET_IRQ_INFO = 7, SET_IRQS = 8;
const REGION_READ = 9, REGION_WRITE = 10, DMA_READ = 11, DMA_WRITE = 12, RESET = 13, WRITE_MULTI = 15, FEATURE = 16;
const MIG_READ = 17, MIG_WRITE = 18;

async function start(device: VfioUserDeviceSpec | (() => VfioUserDeviceSpec) = gpioDevice()) {
  const server = VfioUserServer.listen(sock('s.sock'), { device });
  const client = await RawVfioUserClient.connect(server.path);
  return { server, client };
}

async function started(device?: VfioUserDeviceSpec | (() => VfioUserDeviceSpec)) {
  const s = await start(device);
  const v = await s.client.version();
  assert.equal(v.isError, false);
  return s;
}

const regionRead = (region: number, offset: number, count: number) => b().u64(offset).u32(region).u32(count).build();
const regionWrite = (region: number, offset: number, data: number[]) => b().u64(offset).u32(region).u32(data.length).bytes(data).build();

test('VERSION: min of the minors, our capabilities, JSON NUL-terminated', async () => {
  const { server, client } = await start();
  const r = await client.call(VERSION, b().u16(0).u16(7).ascii('{"capabilities":{"max_msg_fds":4,"unknown":1}}').u8(0).build());
  assert.equal(r.isError, false);
  assert.equal(r.cmd, VERSION);
  assert.equal(r.body.readUInt16LE(0), 0);
  assert.equal(r.body.readUInt16LE(2), 2);
  assert.equal(r.body[r.body.length - 1], 0);
  const caps = JSON.parse(r.body.subarray(4, r.body.length - 1).toString()).capabilities;
  assert.equal(caps.max_msg_fds, 16);
  assert.equal(caps.max_data_xfer_size, 1048576);
  assert.equal(caps.write_multiple, true);
  assert.equal(caps.pgsizes, 4096);
  assert.equal(caps.migration.pgsize, 4096);
  assert.equal(caps.twin_socket, undefined);
  client.close();
  server.close();
});

test('VERSION: a client proposing 0.0 gets 0.0', async () => {
  const { server, client } = await start();
  const r = await client.call(VERSION, b().u16(0).u16(0).build());
  assert.equal(r.body.readUInt16LE(2), 0);
  client.close();
  server.close();
});

for (const [name, payload] of [
  ['major 1', b().u16(1).u16(0).build()],
  ['JSON without NUL', b().u16(0).u16(2).ascii('{}').build()],
  ['max_msg_fds of the wrong type', b().u16(0).u16(2).ascii('{"capabilities":{"max_msg_fds":"8"}}').u8(0).build()],
] as const) {
  test(`VERSION with ${name}: EINVAL and the connection is dropped`, async () => {
    const { server, client } = await start();
    const r = await client.call(VERSION, payload);
    assert.equal(r.isError, true);
    assert.equal(r.errno, EINVAL);
    await client.whenClosed();
    server.close();
  });
}

test('a command before VERSION: EINVAL and the connection is dropped', async () => {
  const { server, client } = await start();
  const r = await client.call(GET_INFO, b().u32(16).u32(0).u32(0).u32(0).build());
  assert.equal(r.isError, true);
  assert.equal(r.errno, EINVAL);
  await client.whenClosed();
  server.close();
});

test('DEVICE_GET_INFO, REGION_INFO and IRQ_INFO of the gpio device', async () => {
  const { server, client } = await started();
  const info = await client.call(GET_INFO, b().u32(16).u32(0).u32(0).u32(0).build());
  assert.deepEqual([info.body.readUInt32LE(0), info.body.readUInt32LE(4), info.body.readUInt32LE(8), info.body.readUInt32LE(12)], [16, 3, 9, 5]);

  const region = async (index: number) => client.call(GET_REGION_INFO, b().u32(32).u32(0).u32(index).u32(0).u64(0).u64(0).build());
  const bar2 = await region(2);
  assert.equal(bar2.body.length, 32);
  assert.deepEqual([bar2.body.readUInt32LE(0), bar2.body.readUInt32LE(4), bar2.body.readUInt32LE(8)], [32, 3, 2]);
  assert.equal(bar2.body.readBigUInt64LE(16), 0x100n);
  const cfg = await region(7);
  assert.equal(cfg.body.readBigUInt64LE(16), 256n);
  const bar0 = await region(0);
  assert.equal(bar0.body.readUInt32LE(4), 0);
  assert.equal(bar0.body.readBigUInt64LE(16), 0n);
  const bad = await region(9);
  assert.equal(bad.errno, EINVAL);

  const irq = async (index: number) => client.call(GET_IRQ_INFO, b().u32(16).u32(0).u32(index).u32(0).build());
  const intx = await irq(0);
  assert.equal(intx.body.readUInt32LE(12), 1);
  assert.equal(intx.body.readUInt32LE(4) & 1, 1, 'EVENTFD');
  assert.equal((await irq(2)).body.readUInt32LE(12), 0);
  assert.equal((await irq(5)).errno, EINVAL);
  client.close();
  server.close();
});

test('BAR2 follows the gpio sample: a write to 0x0 / 0x4 toggles pins, 0x1 / 0x5 read the pins whose count is divisible by 3', async () => {
  const { server, client } = await started();
  const read = async (off: number): Promise<number> => {
    const r = await client.call(REGION_READ, regionRead(2, off, 1));
    assert.equal(r.body.length, 17);
    assert.equal(r.body.readUInt32LE(12), 1);
    return r.body[16]!;
  };
  // All counts 0: every pin reads as set.
  assert.equal(await read(0x1), 0xff);
  assert.equal(await read(0x5), 0xff);
  // Toggle pin 0 once, pin 1 three times, pin 15 twice.
  assert.equal((await client.call(REGION_WRITE, regionWrite(2, 0x0, [0x03]))).isError, false);
  assert.equal((await client.call(REGION_WRITE, regionWrite(2, 0x0, [0x02]))).isError, false);
  assert.equal((await client.call(REGION_WRITE, regionWrite(2, 0x0, [0x02]))).isError, false);
  assert.equal((await client.call(REGION_WRITE, regionWrite(2, 0x4, [0x80]))).isError, false);
  assert.equal((await client.call(REGION_WRITE, regionWrite(2, 0x4, [0x80]))).isError, false);
  assert.equal(await read(0x1), 0b11111110);
  assert.equal(await read(0x5), 0b01111111);
  // Other offsets: reads are 0, writes change nothing.
  assert.equal(await read(0x0), 0);
  assert.equal(await read(0x2), 0);
  assert.equal((await client.call(REGION_WRITE, regionWrite(2, 0x1, [0xff]))).isError, false);
  assert.equal(await read(0x1), 0b11111110);
  client.close();
  server.close();
});

test('config space: ids read back; a write to the vendor id is refused and the connection survives', async () => {
  const { server, client } = await started();
  const ids = await client.call(REGION_READ, regionRead(7, 0, 4));
  assert.equal(ids.body.readUInt16LE(16), 0x494f);
  assert.equal(ids.body.readUInt16LE(18), 0x0dc8);
  const w = await client.call(REGION_WRITE, regionWrite(7, 0, [0xff, 0xff]));
  assert.equal(w.isError, true);
  assert.equal(w.errno, EINVAL);
  const again = await client.call(REGION_READ, regionRead(7, 0, 2));
  assert.equal(again.body.readUInt16LE(16), 0x494f);
  client.close();
  server.close();
});

test('region access errors: out of bounds, bad region, count mismatch; count 0 succeeds', async () => {
  const { server, client } = await started();
  assert.equal((await client.call(REGION_READ, regionRead(2, 0xff, 2))).errno, EINVAL);
  assert.equal((await client.call(REGION_READ, regionRead(9, 0, 1))).errno, EINVAL);
  assert.equal((await client.call(REGION_READ, regionRead(0, 0, 4))).errno, EINVAL);
  assert.equal((await client.call(REGION_READ, regionRead(2, 0, 2 << 20))).errno, EINVAL);
  const mismatch = b().u64(0).u32(2).u32(4).bytes([1, 2]).build();
  assert.equal((await client.call(REGION_WRITE, mismatch)).errno, EINVAL);
  const zero = await client.call(REGION_READ, regionRead(2, 4, 0));
  assert.equal(zero.isError, false);
  client.close();
  server.close();
});

test('posted writes (No_reply) are applied in order and get no reply', async () => {
  const { server, client } = await started();
  // COMMAND register (config offset 4): memory enable, then bus master too.
  client.send(REGION_WRITE, regionWrite(7, 4, [0x02, 0x00]), { flags: FLAG_NO_REPLY });
  client.send(REGION_WRITE, regionWrite(7, 4, [0x06, 0x00]), { flags: FLAG_NO_REPLY });
  const r = await client.call(REGION_READ, regionRead(7, 4, 2));
  assert.equal(r.body.readUInt16LE(16), 0x06);
  // A posted write that fails also sends nothing.
  client.send(REGION_WRITE, regionWrite(7, 0, [1]), { flags: FLAG_NO_REPLY });
  const info = await client.call(GET_INFO, b().u32(16).u32(0).u32(0).u32(0).build());
  assert.equal(info.cmd, GET_INFO);
  client.close();
  server.close();
});

test('REGION_WRITE_MULTI applies every write and answers the count', async () => {
  const { server, client } = await started();
  const entry = (region: number, offset: number, data: number[]) =>
    b().u64(offset).u32(region).u32(data.length).bytes([...data, ...Array(8 - data.length).fill(0)]).build();
  const payload = Buffer.concat([b().u64(2).build(), entry(7, 0x3c, [0x0b]), entry(7, 0x0d, [0x40])]);
  const r = await client.call(WRITE_MULTI, payload);
  assert.equal(r.isError, false);
  assert.equal(r.body.readBigUInt64LE(0), 2n);
  const line = await client.call(REGION_READ, regionRead(7, 0x3c, 1));
  assert.equal(line.body[16], 0x0b);
  client.close();
  server.close();
});

test('unknown, obsolete and server-to-client commands: EINVAL, the connection goes on', async () => {
  const { server, client } = await started();
  assert.equal((await client.call(99, b().u32(0).build())).errno, EINVAL);
  assert.equal((await client.call(14, b().u32(8).u32(0).build())).errno, EINVAL);
  assert.equal((await client.call(DMA_READ, b().u64(0).u64(4).build())).errno, EINVAL);
  assert.equal((await client.call(GET_INFO, b().u32(8).build())).errno, EINVAL);
  const ok = await client.call(GET_INFO, b().u32(16).u32(0).u32(0).u32(0).build());
  assert.equal(ok.isError, false);
  client.close();
  server.close();
});

test('a message larger than the limit is refused from its header, never buffered', async () => {
  const { server, client } = await started();
  // Header announcing 2 MiB + 16: refused at once with EINVAL (as libvfio-user), the body skipped as it streams.
  const size = (2 << 20) + 16;
  const id = 0x4242;
  client.sendBytes(b().u16(id).u16(REGION_WRITE).u32(size).u32(0).u32(0).build());
  const r = await client.next();
  assert.equal(r.id, id);
  assert.equal(r.isError, true);
  assert.equal(r.errno, EINVAL);
  client.sendBytes(Buffer.alloc(size - 16));
  const ok = await client.call(GET_INFO, b().u32(16).u32(0).u32(0).u32(0).build());
  assert.equal(ok.isError, false);
  client.close();
  server.close();
});

test('a header with msg_size < 16 breaks the stream: that connection only is closed', async () => {
  const { server, client } = await started(() => gpioDevice());
  const other = await RawVfioUserClient.connect(server.path);
  await other.version();
  client.sendBytes(b().u16(1).u16(GET_INFO).u32(8).u32(0).u32(0).build());
  await client.whenClosed();
  const ok = await other.call(GET_INFO, b().u32(16).u32(0).u32(0).u32(0).build());
  assert.equal(ok.isError, false);
  other.close();
  server.close();
});

test('a shared device serves one client at a time: a second gets EBUSY', async () => {
  const { server, client } = await started();
  const second = await RawVfioUserClient.connect(server.path);
  const r = await second.version();
  assert.equal(r.isError, true);
  assert.equal(r.errno, 16);
  await second.whenClosed();
  // After the first leaves, the next may drive the device, whose state was kept.
  await client.call(REGION_WRITE, regionWrite(2, 0, [0x01]));
  client.close();
  await until(() => server.sessions.size === 0, 5000, 'the server notices the first client left');
  const third = await RawVfioUserClient.connect(server.path);
  await third.version();
  const r3 = await third.call(REGION_WRITE, regionWrite(2, 0, [0x01]));
  assert.equal(r3.isError, false);
  assert.equal((server.runtime!.spec as ReturnType<typeof gpioDevice>).pins[0], 2);
  third.close();
  server.close();
});

test('with a device factory, many clients are served at once', async () => {
  const server = VfioUserServer.listen(sock('many.sock'), { device: () => gpioDevice() });
  const clients = await Promise.all(Array.from({ length: 5 }, () => RawVfioUserClient.connect(server.path)));
  for (const c of clients) assert.equal((await c.version()).isError, false);
  for (const c of clients) assert.equal((await c.call(REGION_READ, regionRead(2, 0, 1))).body[16], 0);
  for (const c of clients) c.close();
  server.close();
});

test('fds sent with commands that do not use them are closed; none leak', async () => {
  const before = openFdCount();
  const { server, client } = await started();
  const e = EventFd.create();
  for (let i = 0; i < 50; i++) {
    const r = await client.call(GET_INFO, b().u32(16).u32(0).u32(0).u32(0).build(), { fds: [e.fd, e.fd] });
    assert.equal(r.isError, false);
  }
  const bad = await client.call(REGION_READ, regionRead(9, 0, 1), { fds: [e.fd] });
  assert.equal(bad.errno, EINVAL);
  client.close();
  server.close();
  e.close();
  await openFdsBackTo(before, 'fds left after the session');
  assert.equal(openFdCount(), before);
});

/** A device that raises interrupts and does DMA when its BAR0 is written. */
function dmaDevice(log: string[] = []) {
  let ctx: DeviceContext | null = null;
  const spec: VfioUserDeviceSpec & { ctx(): DeviceContext } = {
    ctx: () => ctx!,
    pci: { vendorId: 0x1af4, deviceId: 0x10f0, classCode: 0xff0000 },
    regions: { 0: { size: 4096, read: (_o, out) => out.fill(0), write: () => {} } },
    irqs: { intx: true, msix: 4 },
    attach: (c) => (ctx = c),
    dmaMapped: (w) => log.push(`map ${w.iova.toString(16)} ${w.mapped}`),
    dmaUnmapped: (w) => log.push(`unmap ${w.iova.toString(16)}`),
  };
  return spec;
}

const dmaMap = (flags: number, offset: number, iova: number, size: number) => b().u32(32).u32(flags).u64(offset).u64(iova).u64(size).build();
const dmaUnmap = (flags: number, iova: number, size: number) => b().u32(24).u32(flags).u64(iova).u64(size).build();

test('DMA through a mapped memfd: the device reads and writes guest memory directly; unmap empties its views', async () => {
  const log: string[] = [];
  const dev = dmaDevice(log);
  const { server, client } = await started(dev);
  const guest = SharedMemory.create(0x4000);
  guest.bytes.set([1, 2, 3, 4], 0x1000);
  const r = await client.call(DMA_MAP, dmaMap(3, 0x1000, 0x10000, 0x2000), { fds: [guest.fd] });
  assert.equal(r.isError, false);
  assert.deepEqual(log, ['map 10000 true']);
  const ctx = dev.ctx();
  assert.deepEqual([...(await ctx.dma.read(0x10000, 4))], [1, 2, 3, 4]);
  await ctx.dma.write(0x10ffe, Uint8Array.from([9, 9, 9, 9]));
  assert.deepEqual([...guest.bytes.subarray(0x1ffe, 0x2002)], [9, 9, 9, 9]);
  const view = ctx.dma.view(0x10000, 16, { write: true })!;
  view[15] = 0x77;
  assert.equal(guest.bytes[0x100f], 0x77);
  assert.equal(ctx.dma.view(0x11000, 0x2000), null, 'range beyond the window');
  // The same map again (same file, offset, prot) is accepted and keeps the first mapping;
  // the same range from another file is not.
  assert.equal((await client.call(DMA_MAP, dmaMap(3, 0x1000, 0x10000, 0x2000), { fds: [guest.fd] })).isError, false);
  const other = SharedMemory.create(0x4000);
  assert.equal((await client.call(DMA_MAP, dmaMap(3, 0x1000, 0x10000, 0x2000), { fds: [other.fd] })).errno, 17);
  other.close();
  assert.equal(view[15], 0x77, 'the first mapping is still the one in use');
  assert.deepEqual(log, ['map 10000 true'], 'no second dmaMapped');
  // Overlap is EEXIST; a partial unmap is ENOENT; the exact range unmaps.
  assert.equal((await client.call(DMA_MAP, dmaMap(3, 0, 0x11000, 0x1000), { fds: [guest.fd] })).errno, 17);
  assert.equal((await client.call(DMA_UNMAP, dmaUnmap(0, 0x10000, 0x1000))).errno, 2);
  const u = await client.call(DMA_UNMAP, dmaUnmap(0, 0x10000, 0x2000));
  assert.equal(u.isError, false);
  assert.deepEqual([u.body.readUInt32LE(0), u.body.readBigUInt64LE(8), u.body.readBigUInt64LE(16)], [24, 0x10000n, 0x2000n]);
  assert.equal(view.length, 0, 'a view into an unmapped window is empty, not stale');
  await assert.rejects(ctx.dma.read(0x10000, 4));
  assert.deepEqual(log, ['map 10000 true', 'unmap 10000']);
  guest.close();
  client.close();
  server.close();
});

test('DMA without an fd goes through DMA_READ/DMA_WRITE messages, chunked by the client\'s max_data_xfer_size', async () => {
  const dev = dmaDevice();
  const server = VfioUserServer.listen(sock('dmamsg.sock'), { device: dev });
  const client = await RawVfioUserClient.connect(server.path);
  await client.version('{"capabilities":{"max_data_xfer_size":4096}}');
  const memory = Buffer.alloc(0x3000);
  for (let i = 0; i < memory.length; i++) memory[i] = i & 0xff;
  const seen: string[] = [];
  client.onCommand = (m) => {
    const addr = Number(m.body.readBigUInt64LE(0));
    const count = Number(m.body.readBigUInt64LE(8));
    seen.push(`${m.cmd === DMA_READ ? 'R' : 'W'} ${addr.toString(16)} ${count}`);
    const reply = new Bytes().u16(m.id).u16(m.cmd);
    if (m.cmd === DMA_READ) {
      const data = memory.subarray(addr - 0x20000, addr - 0x20000 + count);
      client.sendBytes(reply.u32(16 + 16 + count).u32(1).u32(0).u64(addr).u64(count).bytes(data).build());
    } else {
      m.body.subarray(16).copy(memory, addr - 0x20000);
      client.sendBytes(reply.u32(32).u32(1).u32(0).u64(addr).u64(count).build());
    }
  };
  assert.equal((await client.call(DMA_MAP, dmaMap(3, 0, 0x20000, 0x3000))).isError, false);
  // An identical second map of the window is accepted (0, as libvfio-user answers); a different prot is not.
  assert.equal((await client.call(DMA_MAP, dmaMap(3, 0, 0x20000, 0x3000))).isError, false);
  assert.equal((await client.call(DMA_MAP, dmaMap(1, 0, 0x20000, 0x3000))).errno, 17);
  const ctx = dev.ctx();
  const data = await ctx.dma.read(0x20100, 0x2000);
  assert.deepEqual(seen, ['R 20100 4096', 'R 21100 4096']);
  assert.ok(data.every((v, i) => v === ((0x100 + i) & 0xff)));
  assert.equal(ctx.dma.view(0x20000, 16), null, 'no direct view without an fd');
  await ctx.dma.write(0x20000, Buffer.alloc(5000, 0xab));
  assert.deepEqual(seen.slice(2), ['W 20000 4096', 'W 21000 904']);
  assert.equal(memory[4999], 0xab);
  assert.equal(memory[5000], 5000 & 0xff);
  client.close();
  server.close();
});

test('interrupts: eventfds from SET_IRQS are signalled by the device; INTx masks itself until unmasked', async () => {
  const dev = dmaDevice();
  const { server, client } = await started(dev);
  const intx = EventFd.create();
  const setIrqs = (flags: number, index: number, start: number, count: number, extra: number[] = []) =>
    b().u32(20 + extra.length).u32(flags).u32(index).u32(start).u32(count).bytes(extra).build();
  // ACTION_TRIGGER | DATA_EVENTFD on INTx.
  assert.equal((await client.call(SET_IRQS, setIrqs(0x24, 0, 0, 1), { fds: [intx.fd] })).isError, false);
  dev.ctx().trigger('intx');
  assert.equal(await intx.wait(), 1);
  dev.ctx().trigger('intx'); // automasked: pending until UNMASK
  await tick(10);
  assert.equal(intx.read(), 0);
  assert.equal((await client.call(SET_IRQS, setIrqs(0x11, 0, 0, 1))).isError, false); // UNMASK | DATA_NONE
  assert.equal(await intx.wait(), 1);
  // MSI-X: four vectors, each its own eventfd.
  const v = [0, 1, 2, 3].map(() => EventFd.create());
  assert.equal((await client.call(SET_IRQS, setIrqs(0x24, 2, 0, 4), { fds: v.map((e) => e.fd) })).isError, false);
  dev.ctx().trigger('msix', 2);
  assert.equal(await v[2]!.wait(), 1);
  assert.equal(v[1]!.read(), 0);
  // Validation: two fds for one vector, start beyond count, two actions.
  assert.equal((await client.call(SET_IRQS, setIrqs(0x24, 0, 0, 1), { fds: [intx.fd, intx.fd] })).errno, EINVAL);
  assert.equal((await client.call(SET_IRQS, setIrqs(0x21, 2, 4, 1))).errno, EINVAL);
  assert.equal((await client.call(SET_IRQS, setIrqs(0x29, 0, 0, 1))).errno, EINVAL);
  // count 0 with DATA_NONE|TRIGGER disables the index: the device's trigger goes nowhere.
  assert.equal((await client.call(SET_IRQS, setIrqs(0x21, 2, 0, 0))).isError, false);
  dev.ctx().trigger('msix', 2);
  await tick(10);
  assert.equal(v[2]!.read(), 0);
  for (const e of [intx, ...v]) e.close();
  client.close();
  server.close();
});

const feature = (flags: number, data: Uint8Array = new Uint8Array(0), argsz = 8 + data.length) =>
  b().u32(argsz).u32(flags).bytes(data).build();
const GET = 1 << 16, SET = 1 << 17, PROBE = 1 << 18;

async function setState(client: RawVfioUserClient, state: number) {
  const r = await client.call(FEATURE, feature(SET | 2, b().u32(state).u32(0xffffffff).build()));
  assert.equal(r.isError, false, `set state ${state}: errno ${r.errno}`);
}

test('migration: a gpio device saved through STOP_COPY and restored through RESUMING has the same state', async () => {
  const a = await started(gpioDevice());
  const b2 = await started(gpioDevice());
  for (let i = 0; i < 10; i++) await a.client.call(REGION_WRITE, regionWrite(2, 4, [0x21]));
  // MIGRATION feature: STOP_COPY supported.
  const mf = await a.client.call(FEATURE, feature(GET | 1, new Uint8Array(0), 16));
  assert.equal(mf.body.readUInt32LE(0), 16);
  assert.equal(mf.body.readBigUInt64LE(8) & 1n, 1n);
  assert.equal((await a.client.call(FEATURE, feature(PROBE | GET | 2, b().u32(0).u32(0).build()))).isError, false);
  // RUNNING -> STOP_COPY (through STOP), read the data until it runs out.
  await setState(a.client, 3);
  const st = await a.client.call(FEATURE, feature(GET | 2, b().u32(0).u32(0).build()));
  assert.equal(st.body.readUInt32LE(8), 3);
  assert.equal((await a.client.call(REGION_READ, regionRead(2, 0, 1))).errno, EINVAL, 'no region access in STOP_COPY');
  // The gpio stream is int pin[16] in one read of 64 bytes; less is refused, as the C sample cannot take it.
  assert.equal((await a.client.call(MIG_READ, b().u32(8 + 3).u32(3).build())).errno, EINVAL);
  const chunks: Buffer[] = [];
  for (;;) {
    const r = await a.client.call(MIG_READ, b().u32(8 + 64).u32(64).build());
    assert.equal(r.isError, false);
    const size = r.body.readUInt32LE(4);
    chunks.push(r.body.subarray(8, 8 + size));
    if (size === 0) break;
  }
  const expected = Buffer.alloc(64);
  expected.writeInt32LE(10, 32); // pin 8
  expected.writeInt32LE(10, 52); // pin 13
  assert.deepEqual(chunks, [expected, Buffer.alloc(0)]);
  await setState(a.client, 1);
  // Restore into the second server: STOP -> RESUMING, write, -> STOP -> RUNNING.
  assert.equal((await b2.client.call(MIG_WRITE, b().u32(9).u32(1).u8(0).build())).errno, EINVAL, 'not RESUMING');
  await setState(b2.client, 4);
  for (const c of chunks) {
    if (c.length === 0) continue;
    assert.equal((await b2.client.call(MIG_WRITE, b().u32(8 + c.length).u32(c.length).bytes(c).build())).isError, false);
  }
  await setState(b2.client, 2);
  const pins = [0, 0, 0, 0, 0, 0, 0, 0, 10, 0, 0, 0, 0, 10, 0, 0];
  assert.deepEqual((b2.server.runtime!.spec as ReturnType<typeof gpioDevice>).pins, pins);
  assert.deepEqual((a.server.runtime!.spec as ReturnType<typeof gpioDevice>).pins, pins);
  // Invalid transitions: to ERROR, to an unknown state.
  assert.equal((await a.client.call(FEATURE, feature(SET | 2, b().u32(0).u32(0).build()))).errno, EINVAL);
  assert.equal((await a.client.call(FEATURE, feature(SET | 2, b().u32(9).u32(0).build()))).errno, EINVAL);
  for (const s of [a, b2]) {
    s.client.close();
    s.server.close();
  }
});

test('dirty logging: device writes through mapped DMA show in the report, and only those pages', async () => {
  const dev = dmaDevice();
  const { server, client } = await started(dev);
  const guest = SharedMemory.create(16 * 4096);
  assert.equal((await client.call(DMA_MAP, dmaMap(3, 0, 0x100000, 16 * 4096), { fds: [guest.fd] })).isError, false);
  const start = b().u64(4096).u32(0).u32(0).build();
  assert.equal((await client.call(FEATURE, feature(SET | 6, start))).isError, false);
  const ctx = dev.ctx();
  await ctx.dma.write(0x100000 + 3 * 4096 + 10, Uint8Array.from([1]));
  ctx.dma.view(0x100000 + 9 * 4096, 4097, { write: true })![0] = 2; // pages 9 and 10
  await ctx.dma.read(0x100000 + 5 * 4096, 4096); // reads do not dirty
  const report = async () => {
    const req = b().u64(0x100000).u64(16 * 4096).u64(4096).build();
    const r = await client.call(FEATURE, feature(GET | 8, req, 8 + 24 + 8));
    assert.equal(r.isError, false, `errno ${r.errno}`);
    return r.body.readBigUInt64LE(8 + 24);
  };
  assert.equal(await report(), (1n << 3n) | (1n << 9n) | (1n << 10n));
  assert.equal(await report(), 0n, 'a report clears what it reported');
  assert.equal((await client.call(FEATURE, feature(SET | 7, start))).isError, false);
  guest.close();
  client.close();
  server.close();
});

test('DEVICE_RESET reaches the device', async () => {
  let resets = 0;
  const dev = { ...gpioDevice(), reset: () => void resets++ };
  const { server, client } = await started(dev);
  assert.equal((await client.call(RESET)).isError, false);
  assert.equal(resets, 1);
  client.close();
  server.close();
});
