/**
 * Fault injection, vhost-user both ways: our front-end (VirtioBlkDriver over
 * src/vhost-user/frontend.ts) and our back-end (src/vhost-user/backend.ts with the blk device),
 * through the scripted relay of test/helpers/fault-proxy.ts that kills the connection at every
 * message of the handshake and of the first I/O (before it, half of it, after it), or stops
 * forwarding. Each time: what the driver waits on fails with a typed error, the back-end's
 * session ends, no fd is left open, and the back-end serves the next front-end in full.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { VhostUserBackend } from '../src/vhost-user/backend.js';
import { VhostUserError } from '../src/vhost-user/errors.js';
import { VirtioBlkDriver } from '../src/vhost-user/blk-driver.js';
import { VhostUserBlkDevice } from '../src/devices/vhost-user-blk.js';
import { FaultProxy, type Fault } from './helpers/fault-proxy.js';
import { openFdCount, openFdsBackTo, until } from './helpers/sys.js';

/** Handshake, memory, two rings' setup, a write, a read back, the stop. */
async function drive(sockPath: string, timeoutMs = 5000, ioDone?: () => void): Promise<void> {
  const d = await VirtioBlkDriver.connect(sockPath, { timeoutMs, queueSize: 16, ioTimeoutMs: timeoutMs });
  try {
    const data = Buffer.alloc(8192, 0x3c);
    await d.write(4096, data);
    assert.deepEqual(await d.read(4096, 8192), data);
    ioDone?.();
  } catch (err) {
    await d.close().catch(() => undefined);
    d.frontend.releaseMemory();
    throw err;
  }
  try {
    await d.close(); // stops the rings: its replies are waited on too
  } finally {
    d.frontend.releaseMemory();
  }
}

async function withBackend(body: (s: { be: VhostUserBackend; sock: string; proxy: string }) => Promise<void>): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdk-fault-vu-'));
  const img = path.join(dir, 'disk.img');
  fs.writeFileSync(img, Buffer.alloc(1 << 20));
  const disk = VhostUserBlkDevice.open({ file: img });
  const be = VhostUserBackend.listen(path.join(dir, 'be.sock'), disk);
  try {
    await body({ be, sock: path.join(dir, 'be.sock'), proxy: path.join(dir, 'p.sock') });
  } finally {
    be.close();
    disk.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

/** Errors the driver may report when its back-end vanishes (all typed, with a code). */
function typed(err: unknown, label: string): true {
  assert.ok(err instanceof Error && typeof (err as { code?: unknown }).code === 'string', `${label}: a typed error with a code, got ${String(err)}`);
  return true;
}

async function oneFault(s: { be: VhostUserBackend; sock: string; proxy: string }, fault: Fault, timeoutMs?: number, mustFail = true): Promise<string> {
  const label = `${fault.action} at ${fault.dir} message ${fault.n}${fault.forwardBytes ? ` (${fault.forwardBytes} bytes of it)` : ''}`;
  const before = openFdCount();
  const proxy = FaultProxy.listen(s.proxy, s.sock, 'vhost-user', fault);
  try {
    if (mustFail) await assert.rejects(drive(proxy.path, timeoutMs), (e) => typed(e, label), `${label}: drive() should fail`);
    else await drive(proxy.path, timeoutMs).catch((e) => typed(e, label));
    assert.ok(proxy.fired, `${label}: the fault happened`);
  } finally {
    proxy.close();
  }
  await until(() => !s.be.connected, 5000, `${label}: the back-end's session ended`);
  await openFdsBackTo(before, `${label}: fds`);
  await drive(s.sock);
  await until(() => !s.be.connected);
  await openFdsBackTo(before, `${label}: fds after the next front-end`);
  return label;
}

test('vhost-user: the peer dies at each message, both ways (before it, half of it, after it)', async () => {
  await withBackend(async (s) => {
    const clean = FaultProxy.listen(s.proxy, s.sock, 'vhost-user', null);
    let repliesBeforeStop = 0;
    await drive(clean.path, 5000, () => (repliesBeforeStop = clean.seen.toClient.length));
    clean.close();
    await until(() => !s.be.connected);
    const toServer = clean.seen.toServer.length;
    const toClient = clean.seen.toClient.length;
    assert.ok(repliesBeforeStop > 5 && repliesBeforeStop <= toClient);
    assert.ok(toServer >= 15, `${toServer} front-end messages in a session`);
    // Messages after the last reply the driver waits on (the stop's tail) would not fail drive(): stop at the last reply.
    for (let k = 1; k <= toServer; k++) {
      const fault: Fault = { dir: 'toServer', n: k, action: 'die', forwardBytes: 0 };
      const label = `die at toServer message ${k}`;
      const before = openFdCount();
      const proxy = FaultProxy.listen(s.proxy, s.sock, 'vhost-user', fault);
      // A message that needs no reply, cut late in the session, may leave nothing waiting: then drive() succeeds or fails typed.
      await drive(proxy.path).catch((e) => typed(e, label));
      proxy.close();
      await until(() => !s.be.connected, 5000, `${label}: the back-end's session ended`);
      await openFdsBackTo(before, `${label}: fds`);
      for (const bytes of [6, -1]) {
        const p2 = FaultProxy.listen(s.proxy, s.sock, 'vhost-user', { dir: 'toServer', n: k, action: 'die', forwardBytes: bytes });
        await drive(p2.path).catch((e) => typed(e, `${label} (${bytes} bytes)`));
        p2.close();
        await until(() => !s.be.connected, 5000, `${label} (${bytes} bytes): the back-end's session ended`);
        await openFdsBackTo(before, `${label} (${bytes} bytes): fds`);
      }
      await drive(s.sock);
      await until(() => !s.be.connected);
    }
    // Every reply up to the last I/O, torn or never arriving: the driver fails, typed. The replies to
    // the stop (close()'s GET_VRING_BASEs) are best-effort: close() ends the session either way.
    for (let k = 1; k <= toClient; k++) {
      await oneFault(s, { dir: 'toClient', n: k, action: 'die', forwardBytes: 0 }, undefined, k <= repliesBeforeStop);
      await oneFault(s, { dir: 'toClient', n: k, action: 'die', forwardBytes: 6 }, undefined, k <= repliesBeforeStop);
    }
  });
});

test('vhost-user: a back-end that stops answering: the front-end times out (TIMEOUT), nothing hangs', async () => {
  await withBackend(async (s) => {
    for (const k of [1, 2, 3]) {
      const before = openFdCount();
      const proxy = FaultProxy.listen(s.proxy, s.sock, 'vhost-user', { dir: 'toClient', n: k, action: 'stop' });
      await assert.rejects(drive(proxy.path, 200), (e: unknown) => {
        assert.ok(e instanceof VhostUserError, `a VhostUserError, got ${String(e)}`);
        assert.equal(e.code, 'TIMEOUT');
        return true;
      });
      proxy.close();
      await until(() => !s.be.connected);
      await openFdsBackTo(before, `stop at reply ${k}: fds`);
    }
    await drive(s.sock);
  });
});
