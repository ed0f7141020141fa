/**
 * Fault injection, vfio-user both ways: our client and our server over real sockets, through
 * a scripted relay (test/helpers/fault-proxy.ts) that kills the connection at every message of
 * the handshake and of the first requests — before the message arrives, with half of it
 * delivered, or right after it — and one that stops forwarding (the peer hangs).
 * Each time: the client's pending request fails with a typed ConnectionError, the server's
 * session ends, no fd is left open, and the server takes the next connection.
 */
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
import { EventFd, SharedMemory } from '../src/sys/index.js';
import type { DeviceContext, VfioUserDeviceSpec } from '../src/vfio-user/device.js';
import { FaultProxy, type Fault } from './helpers/fault-proxy.js';
import { openFdCount, openFdsBackTo, until } from './helpers/sys.js';

const MSIX = 2; // VFIO_PCI_MSIX_IRQ_INDEX

/** A shared device (one client at a time: a session that is not cleaned up would refuse the next one). */
function device(): VfioUserDeviceSpec & { ctx(): DeviceContext } {
  let ctx: DeviceContext | null = null;
  return {
    ctx: () => ctx!,
    pci: { vendorId: 0x1af4, deviceId: 0x10f0, classCode: 0xff0000 },
    regions: { 0: { size: 0x10000, read: (o, out) => out.forEach((_, i) => (out[i] = (o + i) & 0xff)), write: () => {} } },
    irqs: { msix: 2 },
    attach: (c) => (ctx = c),
  };
}

/** The steps a client takes: VERSION, DMA_MAP, GET_INFO, GET_REGION_INFO, GET_IRQ_INFO, SET_IRQS, REGION_READ. */
async function drive(sockPath: string, mem: SharedMemory, ev: EventFd, timeoutMs = 5000): Promise<void> {
  const client = await VfioUserClient.connect(sockPath, { timeoutMs });
  try {
    const dev = new VfioUserDevice(client);
    await client.dmaMap({ iova: 0, size: mem.size, memory: mem });
    await dev.info();
    await dev.regionInfo(0);
    await dev.irqInfo(MSIX);
    await dev.setEventFds(MSIX, 0, [ev]);
    const data = await dev.read(0, 0x100, 0x2000);
    assert.equal(data.length, 0x2000);
    for (let i = 0; i < data.length; i += 997) assert.equal(data[i], (0x100 + i) & 0xff);
  } finally {
    client.close();
  }
}

function scratch(): { dir: string; server: string; proxy: string; done(): void } {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdk-fault-vfu-'));
  return { dir, server: path.join(dir, 's.sock'), proxy: path.join(dir, 'p.sock'), done: () => fs.rmSync(dir, { recursive: true, force: true }) };
}

async function withServer(body: (s: { server: VfioUserServer; spec: ReturnType<typeof device>; paths: ReturnType<typeof scratch>; mem: SharedMemory; ev: EventFd }) => Promise<void>): Promise<void> {
  const paths = scratch();
  const spec = device();
  const server = VfioUserServer.listen(paths.server, { device: spec });
  const mem = SharedMemory.create(0x10000);
  const ev = EventFd.create();
  try {
    await body({ server, spec, paths, mem, ev });
  } finally {
    server.close();
    mem.close();
    ev.close();
    paths.done();
  }
}

/** One fault: the client's run fails with `code`, then everything is back and the next client is served. */
async function oneFault(s: Parameters<Parameters<typeof withServer>[0]>[0], fault: Fault, code: ConnectionError['code'], timeoutMs?: number): Promise<string> {
  const before = openFdCount();
  const proxy = FaultProxy.listen(s.paths.proxy, s.paths.server, 'vfio-user', fault);
  const label = `${fault.action} at ${fault.dir} message ${fault.n}${fault.forwardBytes ? ` (${fault.forwardBytes} bytes of it)` : ''}`;
  try {
    await assert.rejects(drive(proxy.path, s.mem, s.ev, timeoutMs), (err: unknown) => {
      assert.ok(err instanceof ConnectionError, `${label}: a ConnectionError, got ${String(err)}`);
      assert.equal(err.code, code, `${label}: ${err.message}`);
      return true;
    });
    assert.ok(proxy.fired, `${label}: the fault happened`);
  } finally {
    proxy.close();
  }
  await until(() => s.server.sessions.size === 0, 5000, `${label}: the server's session ended`);
  await openFdsBackTo(before, `${label}: fds`);
  await drive(s.server.path, s.mem, s.ev); // the next connection is served in full
  await until(() => s.server.sessions.size === 0);
  await openFdsBackTo(before, `${label}: fds after the next client`);
  return label;
}

test('vfio-user: the peer dies at each message, both ways (before it, half of it, after it)', async () => {
  await withServer(async (s) => {
    // A clean run through the relay gives the message sequence to break.
    const clean = FaultProxy.listen(s.paths.proxy, s.paths.server, 'vfio-user', null);
    await drive(clean.path, s.mem, s.ev);
    clean.close();
    const toServer = clean.seen.toServer;
    assert.deepEqual(toServer.slice(0, 3), [Command.VERSION, Command.DMA_MAP, Command.DEVICE_GET_INFO]);
    assert.ok(toServer.includes(Command.DEVICE_GET_REGION_INFO) && toServer.includes(Command.DEVICE_SET_IRQS) && toServer.includes(Command.REGION_READ));
    await until(() => s.server.sessions.size === 0);
    let n = 0;
    for (let k = 1; k <= toServer.length; k++) {
      // The server dies before request k arrives (the client waits on it), or the client dies
      // having sent half of it (the server holds a torn request), or all of it (the server answers a dead socket).
      await oneFault(s, { dir: 'toServer', n: k, action: 'die', forwardBytes: 0 }, 'VFU_CLOSED');
      await oneFault(s, { dir: 'toServer', n: k, action: 'die', forwardBytes: 10 }, 'VFU_CLOSED');
      await oneFault(s, { dir: 'toServer', n: k, action: 'die', forwardBytes: -1 }, 'VFU_CLOSED');
      // The reply to request k is torn: 10 bytes of its header (the REGION_READ reply: mid-data too).
      await oneFault(s, { dir: 'toClient', n: k, action: 'die', forwardBytes: 10 }, 'VFU_CLOSED');
      n += 4;
    }
    await oneFault(s, { dir: 'toClient', n: 1, action: 'die', forwardBytes: 16 + 16 + 0x1000, command: Command.REGION_READ }, 'VFU_CLOSED');
    assert.ok(n >= 28, `${n} faults`);
  });
});

test('vfio-user: a server that stops answering: the request times out (VFU_TIMEOUT), nothing hangs', async () => {
  await withServer(async (s) => {
    for (const k of [1, 2, 3, 7]) await oneFault(s, { dir: 'toServer', n: k, action: 'stop' }, 'VFU_TIMEOUT', 200);
  });
});

test('vfio-user: a client that disappears while the server sends DMA_READ: the device sees a typed error, the server goes on', async () => {
  await withServer(async (s) => {
    const before = openFdCount();
    for (const forwardBytes of [0, -1]) {
      const proxy = FaultProxy.listen(s.paths.proxy, s.paths.server, 'vfio-user', { dir: 'toClient', n: 1, command: Command.DMA_READ, action: 'die', forwardBytes });
      const client = await VfioUserClient.connect(proxy.path, { timeoutMs: 5000 });
      const closed = new Promise<void>((r) => client.once('close', () => r()));
      // passFd false: the server has no mapping, every DMA is a DMA_READ / DMA_WRITE message to us.
      await client.dmaMap({ iova: 0, size: s.mem.size, memory: s.mem, passFd: false });
      const dma = s.spec.ctx().dma.read(0, 0x8000);
      await assert.rejects(dma, (err: unknown) => {
        assert.ok(err instanceof ConnectionError, `a ConnectionError, got ${String(err)}`);
        assert.equal(err.code, 'VFU_CLOSED');
        return true;
      });
      await closed;
      assert.ok(proxy.fired);
      client.close();
      proxy.close();
      await until(() => s.server.sessions.size === 0);
      await openFdsBackTo(before, `DMA_READ cut (${forwardBytes} bytes forwarded): fds`);
      await drive(s.server.path, s.mem, s.ev);
      await until(() => s.server.sessions.size === 0);
    }
    await openFdsBackTo(before);
  });
});
