/**
 * The vhost-user front-end against in-test back-ends that misbehave: a
 * reply of the wrong type, with wrong flags, too short, an oversized config,
 * fds nobody asked for, a close in the middle of the handshake, silence, an
 * oversized header, a NACK. Each gives a typed VhostUserError, nothing hangs,
 * every fd received is closed. Then the back-end request channel (CONFIG_CHANGE,
 * host notifiers, an unknown request: acked 0 / 0 / 1), and a handshake
 * against our own back-end with its sequence checked.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { EventFd, SharedMemory, UnixServer, UnixSocket, type Fd } from '../src/sys/index.js';
import { MessageChannel, type VhostUserMessage } from '../src/vhost-user/channel.js';
import { VhostUserFrontend } from '../src/vhost-user/frontend.js';
import { VhostUserError } from '../src/vhost-user/errors.js';
import { VhostUserBackend } from '../src/vhost-user/backend.js';
import { VhostUserBlkDevice } from '../src/devices/vhost-user-blk.js';
import { VirtioBlkDriver } from '../src/vhost-user/blk-driver.js';
import { NEED_REPLY, REPLY, u64, VERSION } from './helpers/vhost-user-raw.js';
import { connectUnix } from '../src/sys/socket.js';
import { until } from './helpers/sys.js';

const F_PROTOCOL = 1n << 30n;
const F_VERSION_1 = 1n << 32n;
/** Protocol feature bits (vhost-user.rst): REPLY_ACK 3, BACKEND_REQ 5, CONFIG 9, BACKEND_SEND_FD 10, HOST_NOTIFIER 11. */
const [PF_REPLY_ACK, PF_BACKEND_REQ, PF_CONFIG, PF_SEND_FD, PF_HOST_NOTIFIER] = [3n, 5n, 9n, 10n, 11n].map((b) => 1n << b) as [bigint, bigint, bigint, bigint, bigint];

const openFds = (): number => fs.readdirSync('/proc/self/fd').length;

type Reply = (request: number, payload?: Uint8Array, flags?: number, fds?: (Fd | number)[]) => void;

/** A back-end written here: `handle` sees each front-end message (after `standard` answered what it knows, unless handle returns true). */
function fakeBackend(handle: (msg: VhostUserMessage, reply: Reply, ch: MessageChannel) => boolean | void, protocol = PF_REPLY_ACK | PF_CONFIG): { sock: string; done(): void; seen: number[] } {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdevkit-fe-'));
  const sock = path.join(dir, 'be.sock');
  const server = UnixServer.listen(sock);
  const seen: number[] = [];
  const chans: MessageChannel[] = [];
  server.on('connection', (s: UnixSocket) => {
    const ch = new MessageChannel(s);
    chans.push(ch);
    ch.on('error', () => {});
    ch.on('message', (m) => {
      seen.push(m.request);
      const reply: Reply = (request, payload = new Uint8Array(0), flags = VERSION | REPLY, fds) => {
        if (!ch.closed) ch.send(request, flags, payload, fds ?? null);
      };
      const took = handle(m, reply, ch);
      if (took !== true) standard(m, reply, protocol);
      for (const f of m.fds) f.close();
    });
  });
  return {
    sock,
    seen,
    done() {
      for (const c of chans) c.close();
      server.close();
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** What a minimal good back-end answers. */
function standard(m: VhostUserMessage, reply: Reply, protocol: bigint): void {
  switch (m.request) {
    case 1:
      return reply(1, u64(F_VERSION_1 | F_PROTOCOL));
    case 15:
      return reply(15, u64(protocol));
    case 17:
      return reply(17, u64(1n));
    case 36:
      return reply(36, u64(8n));
    default:
      if (m.flags & NEED_REPLY) reply(m.request, u64(0n));
  }
}

async function rejects(p: Promise<unknown>, code: string, re: RegExp): Promise<VhostUserError> {
  try {
    await p;
  } catch (err) {
    assert.ok(err instanceof VhostUserError, `a VhostUserError, got ${String(err)}`);
    assert.equal(err.code, code, err.message);
    assert.match(err.message, re);
    return err;
  }
  assert.fail(`expected ${code}`);
}

test('front-end: misbehaving back-ends give typed errors, close the connection, leak no fd', async () => {
  const before = openFds();
  const cases: { what: string; code: string; re: RegExp; handle: (m: VhostUserMessage, r: Reply) => boolean | void; run?: (fe: VhostUserFrontend) => Promise<unknown> }[] = [
    { what: 'wrong reply type', code: 'PROTOCOL', re: /unexpected msg type.*GET_FEATURES.*GET_PROTOCOL_FEATURES/, handle: (m, r) => m.request === 1 && (r(15, u64(0n)), true) },
    { what: 'reply without REPLY', code: 'PROTOCOL', re: /flags 0x1 instead of 0x5/, handle: (m, r) => m.request === 1 && (r(1, u64(F_VERSION_1), VERSION), true) },
    { what: 'reply with NEED_REPLY too', code: 'PROTOCOL', re: /flags 0xd instead of 0x5/, handle: (m, r) => m.request === 1 && (r(1, u64(F_VERSION_1), VERSION | REPLY | NEED_REPLY), true) },
    { what: 'short reply', code: 'PROTOCOL', re: /GET_FEATURES reply of 4 bytes/, handle: (m, r) => m.request === 1 && (r(1, Buffer.alloc(4)), true) },
    {
      what: 'unexpected fds',
      code: 'PROTOCOL',
      re: /carries 1 fd/,
      handle: (m, r) => {
        if (m.request !== 1) return;
        const ev = EventFd.create();
        r(1, u64(F_VERSION_1), VERSION | REPLY, [ev.fd]);
        ev.close();
        return true;
      },
    },
    { what: 'close mid-handshake', code: 'DISCONNECTED', re: /closed/, handle: (m) => m.request === 15 && (setImmediate(() => closeAll()), true) },
    { what: 'silence', code: 'TIMEOUT', re: /no reply to GET_QUEUE_NUM in 200 ms/, handle: (m) => m.request === 15 || m.request === 17 ? m.request === 17 : undefined, run: async (fe) => { await fe.getFeatures(); return fe.getQueueNum(); } },
    { what: 'oversized header', code: 'PROTOCOL', re: /announces 100000 payload bytes/, handle: (m) => m.request === 1 && (hugeHeader(), true) },
    {
      what: 'oversized config',
      code: 'PROTOCOL',
      re: /GET_CONFIG reply of 80 bytes \(expected 72\)/,
      handle: (m, r) => m.request === 24 && (r(24, Buffer.alloc(80)), true),
      run: async (fe) => {
        await fe.handshake({ config: 'require' });
        return fe.getConfig(0, 60);
      },
    },
    {
      what: 'unsolicited message',
      code: 'DISCONNECTED',
      re: /unsolicited GET_FEATURES/,
      handle: (m, r) => m.request === 3 && (r(3, u64(0n)), setTimeout(() => r(1, u64(0n)), 10), true),
      run: async (fe) => {
        await fe.handshake();
        await new Promise((res) => setTimeout(res, 50));
        return fe.getFeatures();
      },
    },
  ];
  let closeAll = (): void => {};
  let hugeHeader = (): void => {};
  for (const c of cases) {
    let chan: MessageChannel | null = null;
    const be = fakeBackend((m, r, ch) => {
      chan = ch;
      return c.handle(m, r);
    });
    closeAll = () => chan?.close();
    hugeHeader = () => {
      const h = Buffer.alloc(12);
      h.writeUInt32LE(1, 0);
      h.writeUInt32LE(VERSION | REPLY, 4);
      h.writeUInt32LE(100000, 8);
      chan?.socket.write(h);
    };
    const fe = await VhostUserFrontend.connect(be.sock, { timeoutMs: 200 });
    const t0 = Date.now();
    const err = await rejects(c.run ? c.run(fe) : fe.handshake(), c.code, c.re);
    assert.ok(Date.now() - t0 < 2000, `${c.what}: answered in time`);
    await fe.waitClosed();
    assert.equal(fe.closed, true, `${c.what}: the connection is closed`);
    assert.ok(err.message.length > 10);
    // Anything asked afterwards fails at once.
    await rejects(fe.getFeatures(), 'DISCONNECTED', /GET_FEATURES/);
    fe.releaseMemory();
    be.done();
  }
  await new Promise((r) => setTimeout(r, 50));
  assert.equal(openFds(), before, 'no fd leaked');
});

test('front-end: a NACK fails that request only; requests queued behind a disconnect all fail', async () => {
  const be = fakeBackend((m, r) => m.request === 3 && (r(3, u64(1n)), true));
  const fe = await VhostUserFrontend.connect(be.sock, { timeoutMs: 1000 });
  await rejects(fe.handshake(), 'INVALID', /refused SET_OWNER \(ack 1\)/);
  assert.equal(fe.closed, false);
  assert.equal(await fe.getFeatures(), F_VERSION_1 | F_PROTOCOL);
  fe.close();
  be.done();

  let ch: MessageChannel | null = null;
  const be2 = fakeBackend((m, _r, c) => {
    ch = c;
    if (m.request === 17) {
      setTimeout(() => ch?.close(), 20);
      return true;
    }
  });
  const fe2 = await VhostUserFrontend.connect(be2.sock, { timeoutMs: 5000 });
  const ps = [fe2.getQueueNum(), fe2.getFeatures(), fe2.getProtocolFeatures()];
  for (const p of ps) await rejects(p, 'DISCONNECTED', /closed/);
  be2.done();
});

test('front-end: the handshake follows the seed: CONFIG required, HOST_NOTIFIER only with BACKEND_REQ and BACKEND_SEND_FD', async () => {
  const be = fakeBackend(() => {}, PF_REPLY_ACK);
  const fe = await VhostUserFrontend.connect(be.sock);
  await rejects(fe.handshake({ config: 'require' }), 'UNSUPPORTED', /expects VHOST_USER_PROTOCOL_F_CONFIG/);
  fe.close();
  be.done();

  let acked = -1n;
  const be2 = fakeBackend((m) => {
    if (m.request === 16) acked = m.payload.readBigUInt64LE(0);
  }, PF_REPLY_ACK | PF_HOST_NOTIFIER | PF_SEND_FD | PF_CONFIG | (1n << 8n));
  const fe2 = await VhostUserFrontend.connect(be2.sock);
  await fe2.handshake({ config: 'never' });
  assert.equal(acked, PF_REPLY_ACK, 'no CONFIG (never), no PAGEFAULT (not ours), no SEND_FD / HOST_NOTIFIER without BACKEND_REQ');
  await rejects(fe2.getConfig(0, 8), 'UNSUPPORTED', /CONFIG/);
  await rejects(fe2.handshake({ queues: 2 }), 'UNSUPPORTED', /maximum number of queues supported by the back-end is 1/);
  fe2.close();
  be2.done();
});

test('front-end: the back-end channel: CONFIG_CHANGE and host notifiers acked 0, an unknown request acked 1', async () => {
  const before = openFds();
  let backendCh: MessageChannel | null = null;
  const acks: bigint[] = [];
  const be = fakeBackend((m) => {
    if (m.request === 21) {
      backendCh = new MessageChannel(new UnixSocket(m.fds.shift()!));
      backendCh.on('message', (a) => {
        assert.equal(a.flags, VERSION | REPLY);
        acks.push(a.payload.readBigUInt64LE(0));
      });
    }
  }, PF_REPLY_ACK | PF_CONFIG | PF_BACKEND_REQ | PF_SEND_FD | PF_HOST_NOTIFIER);
  const fe = await VhostUserFrontend.connect(be.sock);
  let changes = 0;
  const notifiers: (number | null)[] = [];
  fe.on('configChange', () => changes++);
  fe.on('hostNotifier', (i, n) => notifiers.push(n ? i : null));
  await fe.handshake();
  assert.ok(backendCh);
  const ch = backendCh as MessageChannel;
  ch.send(2, VERSION | NEED_REPLY);
  const area = Buffer.alloc(24);
  area.writeBigUInt64LE(1n, 0);
  area.writeBigUInt64LE(4096n, 8);
  const shm = SharedMemory.create(4096);
  ch.send(3, VERSION | NEED_REPLY, area, [shm.fd]);
  ch.send(99, VERSION | NEED_REPLY);
  area.writeBigUInt64LE(1n | 0x100n, 0);
  ch.send(3, VERSION | NEED_REPLY, area);
  shm.close();
  const end = Date.now() + 2000;
  while (acks.length < 4 && Date.now() < end) await new Promise((r) => setTimeout(r, 10));
  assert.deepEqual(acks, [0n, 0n, 1n, 0n]);
  assert.equal(changes, 1);
  assert.deepEqual(notifiers, [1, null]);
  fe.close();
  ch.close();
  be.done();
  await new Promise((r) => setTimeout(r, 50));
  assert.equal(openFds(), before, 'no fd leaked');
});

test('front-end as IOMMU: ACCESS_PLATFORM acked with BACKEND_REQ + REPLY_ACK only; rings as IOVAs; a MISS answered by an UPDATE before its ack, a MISS outside memory refused; ACCESS_FAIL reported', async (t) => {
  const F_ACCESS_PLATFORM = 1n << 33n;
  const before = openFds();
  let backendCh: MessageChannel | null = null;
  const acks: bigint[] = [];
  /** What the front-end sent: SET_FEATURES values, SET_VRING_ADDR payloads, IOTLB_MSG payloads with their flags. */
  const features: bigint[] = [];
  const vringAddr: Buffer[] = [];
  const iotlb: { flags: number; p: Buffer }[] = [];
  const order: string[] = [];
  const be = fakeBackend((m, reply) => {
    if (m.request === 1) {
      reply(1, u64(F_VERSION_1 | F_PROTOCOL | F_ACCESS_PLATFORM));
      return true;
    }
    if (m.request === 2) features.push(m.payload.readBigUInt64LE(0));
    if (m.request === 9) vringAddr.push(Buffer.from(m.payload));
    if (m.request === 22) {
      iotlb.push({ flags: m.flags, p: Buffer.from(m.payload) });
      order.push('UPDATE');
    }
    if (m.request === 5) order.push('SET_MEM_TABLE');
    if (m.request === 21) {
      backendCh = new MessageChannel(new UnixSocket(m.fds.shift()!));
      backendCh.on('message', (a) => {
        assert.equal(a.flags, VERSION | REPLY);
        assert.equal(a.request, 1, 'the ack is of BACKEND_IOTLB_MSG');
        acks.push(a.payload.readBigUInt64LE(0));
        order.push(`ack ${a.payload.readBigUInt64LE(0)}`);
      });
    }
    return undefined;
  }, PF_REPLY_ACK | PF_BACKEND_REQ);
  t.after(() => be.done());
  // Without an IOMMU the bit is never acked.
  const plain = await VhostUserFrontend.connect(be.sock);
  t.after(() => plain.close());
  await plain.handshake();
  await plain.setFeatures(F_VERSION_1 | F_ACCESS_PLATFORM);
  assert.equal(features.pop()! & F_ACCESS_PLATFORM, 0n, 'ACCESS_PLATFORM not acked without an IOMMU');
  plain.close();
  (backendCh as MessageChannel | null)?.close();

  const fe = await VhostUserFrontend.connect(be.sock);
  t.after(() => {
    fe.close();
    (backendCh as MessageChannel | null)?.close();
  });
  await fe.handshake({ iommu: 'identity' });
  const misses: [number, number, unknown][] = [];
  const fails: [number, number][] = [];
  fe.on('iotlbMiss', (iova, perm, e) => misses.push([iova, perm, e]));
  fe.on('iotlbAccessFail', (iova, perm) => fails.push([iova, perm]));
  const mem = SharedMemory.create(0x20_0000);
  fe.addMemory(mem, 0x4000_0000);
  await fe.syncMemory();
  await fe.setFeatures(F_VERSION_1 | F_ACCESS_PLATFORM);
  assert.equal(features.pop(), F_VERSION_1 | F_PROTOCOL | F_ACCESS_PLATFORM, 'ACCESS_PLATFORM acked');
  assert.equal(fe.iommuEnabled, true);
  // SET_VRING_ADDR carries the IOVAs (= our GPAs with the identity IOMMU), not user addresses.
  await fe.setVringAddr(0, 0x4000_1000, 0x4000_2000, 0x4000_3000);
  const va = vringAddr.pop()!;
  assert.deepEqual([va.readBigUInt64LE(8), va.readBigUInt64LE(16), va.readBigUInt64LE(24)], [0x4000_1000n, 0x4000_3000n, 0x4000_2000n], 'desc, used, avail as IOVAs');

  assert.ok(backendCh);
  const ch = backendCh as MessageChannel;
  // struct vhost_iotlb_msg by hand: iova u64, size u64, uaddr u64, perm u8, type u8, 6 bytes padding.
  const msg = (iova: bigint, perm: number, type: number): Buffer => {
    const b = Buffer.alloc(32);
    b.writeBigUInt64LE(iova, 0);
    b[24] = perm;
    b[25] = type;
    return b;
  };
  order.length = 0;
  ch.send(1, VERSION | NEED_REPLY, msg(0x4000_1234n, 3, 1)); // MISS, RW, inside the region
  ch.send(1, VERSION | NEED_REPLY, msg(0x9000_0000n, 1, 1)); // MISS outside every region
  ch.send(1, VERSION | NEED_REPLY, msg(0x4000_1234n, 2, 4)); // ACCESS_FAIL
  ch.send(1, VERSION | NEED_REPLY, msg(0x4000_1234n, 3, 7)); // an unknown type
  ch.send(1, VERSION | NEED_REPLY, Buffer.alloc(8)); // short
  const end = Date.now() + 2000;
  while (acks.length < 5 && Date.now() < end) await new Promise((r) => setTimeout(r, 10));
  assert.deepEqual(acks, [0n, 1n, 0n, 1n, 1n], 'acked in the order of the requests');
  assert.deepEqual(order.slice(0, 2), ['UPDATE', 'ack 0'], "the MISS's UPDATE was sent (and acked) before the MISS was acked");
  assert.equal(iotlb.length, 1, 'one UPDATE, none for the refused MISS');
  const u = iotlb[0]!;
  assert.equal(u.flags, VERSION | NEED_REPLY, 'IOTLB_MSG asks for an ack');
  // The 4 KiB page of 0x40001234, at the region's user address + 0x1000, read-write, type UPDATE.
  assert.equal(u.p.length, 32);
  assert.deepEqual([u.p.readBigUInt64LE(0), u.p.readBigUInt64LE(8), u.p.readBigUInt64LE(16), u.p[24], u.p[25]], [0x4000_1000n, 0x1000n, BigInt(fe.regions[0]!.userAddr + 0x1000), 3, 2]);
  assert.deepEqual(u.p.subarray(26), Buffer.alloc(6), 'padding zero');
  assert.equal(misses.length, 2);
  assert.deepEqual(misses[1], [0x9000_0000, 1, null]);
  assert.deepEqual(fails, [[0x4000_1234, 2]]);
  assert.deepEqual(fe.iotlbStats, { misses: 1, refused: 1, updates: 1, invalidates: 0, accessFails: 1 });
  // INVALIDATE from the API: type 3, size given, uaddr and perm 0.
  await fe.iotlbInvalidate(0x4000_1000, 0x1000);
  const inv = iotlb[1]!.p;
  assert.deepEqual([inv.readBigUInt64LE(0), inv.readBigUInt64LE(8), inv.readBigUInt64LE(16), inv[24], inv[25]], [0x4000_1000n, 0x1000n, 0n, 0, 3]);
  await rejects(fe.iotlbUpdate({ iova: 0, size: 0, uaddr: 0, perm: 3 }), 'INVALID', /UPDATE of 0 bytes/);
  // A region taken out under the identity IOMMU: its whole range is invalidated before the new memory table.
  fe.removeMemory(fe.regions[0]!).close();
  order.length = 0;
  await fe.syncMemory();
  const gone = iotlb[2]!.p;
  assert.deepEqual([gone.readBigUInt64LE(0), gone.readBigUInt64LE(8), gone[25]], [0x4000_0000n, 0x20_0000n, 3], 'INVALIDATE of the region');
  assert.deepEqual(order, ['UPDATE', 'SET_MEM_TABLE'], 'the INVALIDATE (IOTLB_MSG) before SET_MEM_TABLE');
  fe.close();
  ch.close();
  be.done();
  await new Promise((r) => setTimeout(r, 50));
  assert.equal(openFds(), before, 'no fd leaked');
});

test('front-end against our back-end: the message sequence, CONFIG_CHANGE through the back-end channel, block I/O', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdevkit-fe-'));
  const sock = path.join(dir, 'blk.sock');
  const img = path.join(dir, 'disk.img');
  fs.writeFileSync(img, Buffer.alloc(1 << 20));
  const trace: string[] = [];
  const be = VhostUserBackend.listen(sock, VhostUserBlkDevice.open({ file: img, queues: 2, serial: 'fe-unit' }), { trace: (l) => trace.push(l.split(' ')[0]!) });
  const before = openFds();
  try {
    for (const packed of [false, true]) {
      trace.length = 0;
      const d = await VirtioBlkDriver.connect(sock, { queues: 2, packed, queueSize: 16 });
      assert.equal(d.packed, packed);
      assert.deepEqual(trace.slice(0, 7), ['GET_FEATURES', 'GET_PROTOCOL_FEATURES', 'SET_PROTOCOL_FEATURES', 'GET_QUEUE_NUM', 'GET_MAX_MEM_SLOTS', 'SET_BACKEND_REQ_FD', 'SET_OWNER']);
      assert.ok(trace.includes('ADD_MEM_REG') && !trace.includes('SET_MEM_TABLE'), 'memory slots when offered');
      let changed = 0;
      d.frontend.on('configChange', () => changed++);
      await be.configChanged();
      assert.equal(changed, 1);
      const data = Buffer.alloc(64 * 1024, packed ? 0x5a : 0xa5);
      await Promise.all([d.write(0, data, { queue: 0 }), d.write(65536, data, { queue: 1 })]);
      assert.deepEqual(await d.read(0, 131072), Buffer.concat([data, data]));
      assert.equal(await d.getId(), 'fe-unit');
      const results = await d.submitBatch([{ op: 'read', offset: 0, length: 512 }, { op: 'flush' }, { op: 'read', offset: 1 << 20, length: 512 }]);
      assert.deepEqual(results[0], data.subarray(0, 512));
      assert.equal(results[1], undefined);
      assert.ok(results[2] instanceof RangeError);
      await d.close();
      assert.ok(trace.includes('GET_VRING_BASE'));
    }
    await new Promise((r) => setTimeout(r, 100));
    assert.equal(openFds(), before, 'no fd leaked');
  } finally {
    be.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('front-end accepting a back-end that connects to us (QEMU server=on): VirtioBlkDriver.open on it', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdevkit-fe-'));
  const sock = path.join(dir, 'fe.sock');
  const img = path.join(dir, 'disk.img');
  fs.writeFileSync(img, Buffer.alloc(1 << 20));
  const accepting = VhostUserFrontend.accept(sock, { acceptTimeoutMs: 5000 });
  const bePromise = VhostUserBackend.connect(sock, VhostUserBlkDevice.open({ file: img }));
  const fe = await accepting;
  const be = await bePromise;
  try {
    assert.equal(fs.existsSync(sock), false, 'the listening socket is gone once a back-end connected');
    const d = await VirtioBlkDriver.open(fe, { queueSize: 8 });
    const data = Buffer.alloc(4096, 0x33);
    await d.write(512, data);
    assert.deepEqual(await d.read(512, 4096), data);
    assert.deepEqual(fs.readFileSync(img).subarray(512, 4608), data);
    await d.close();
  } finally {
    be.close();
  }
  await rejects(VhostUserFrontend.accept(sock + '2', { acceptTimeoutMs: 100 }), 'TIMEOUT', /no back-end connected/);
  assert.equal(fs.existsSync(sock + '2'), false, 'no socket left behind');
  fs.rmSync(dir, { recursive: true, force: true });
});

test('front-end against our back-end: SET_LOG_BASE, GET/SET_INFLIGHT_FD, SET/GET_STATUS, SET_CONFIG, gated requests refused before sending', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdevkit-fe-'));
  const sock = path.join(dir, 'blk.sock');
  const before = openFds();
  const be = VhostUserBackend.listen(sock, VhostUserBlkDevice.open({ size: 1 << 20 }));
  try {
    const fe = await VhostUserFrontend.connect(sock);
    await fe.handshake({ config: 'require' });
    await fe.setFeatures(F_VERSION_1);
    const log = SharedMemory.create(4096);
    await fe.setLogBase(log);
    log.close();
    const inf = await fe.getInflightFd(1, 64);
    assert.ok(inf.memory && inf.mmapSize > 0, 'an inflight region, mapped');
    await fe.setInflightFd(inf);
    inf.memory.close();
    await fe.setStatus(0xb);
    assert.equal(await fe.getStatus(), 0xb);
    const cfg = await fe.getConfig(0, 36);
    assert.equal(cfg.readBigUInt64LE(0), BigInt((1 << 20) / 512));
    // writeback is writable only with CONFIG_WCE: an ack of 0 or a NACK (INVALID), the connection stays.
    await fe.setConfig(32, Buffer.from([1])).catch((e: VhostUserError) => assert.equal(e.code, 'INVALID'));
    assert.throws(() => fe.netSetMtu(1500), /NET_MTU/);
    await assert.rejects(fe.getConfig(0, 300), /bad config size/);
    assert.equal(fe.closed, false);
    fe.close();
  } finally {
    be.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
  await new Promise((r) => setTimeout(r, 50));
  assert.equal(openFds(), before, 'no fd leaked');
});

test('front-end reconnect(): a new connection to the same path, negotiated state from scratch, memory regions kept and sent again; requests queued before the close never reach the new connection', async () => {
  const before = openFds();
  const seenFds: number[][] = [];
  const be = fakeBackend((m) => {
    if (m.request === 5) seenFds.push([m.fds.length]); // SET_MEM_TABLE
  });
  const fe = await VhostUserFrontend.connect(be.sock);
  try {
    await rejects(fe.reconnect(), 'INVALID', /while the connection is up/);
    await fe.handshake({ config: 'require' });
    assert.equal(fe.protocolFeatures, PF_REPLY_ACK | PF_CONFIG);
    fe.addMemory(SharedMemory.create(1 << 20), 0);
    await fe.syncMemory();
    // Requests made now are queued behind a GET_FEATURES; the close comes first.
    const queued = [fe.getFeatures(), fe.getQueueNum(), fe.setOwner()];
    fe.close();
    for (const p of queued) await rejects(p, 'DISCONNECTED', /closed/);
    const sentBefore = be.seen.length;
    let reconnected = 0;
    fe.on('reconnect', () => reconnected++);
    await fe.reconnect();
    assert.equal(reconnected, 1);
    assert.equal(fe.closed, false);
    assert.equal(fe.features, 0n, 'negotiated state starts over');
    assert.equal(fe.protocolFeatures, 0n);
    assert.equal(fe.regions.length, 1, 'the region is kept');
    await fe.handshake({ config: 'require' });
    await fe.syncMemory();
    // The new connection saw the handshake and the memory table only (GET_FEATURES 1, GET_PROTOCOL 15, SET_PROTOCOL 16, SET_OWNER 3, SET_MEM_TABLE 5).
    assert.deepEqual(be.seen.slice(sentBefore), [1, 15, 16, 3, 5]);
    assert.deepEqual(seenFds, [[1], [1]], 'SET_MEM_TABLE with the region fd on both connections');
    assert.equal(fe.memory.view(0, 16)?.length, 16, 'the driver side still sees the region');
    fe.close();
    fe.releaseMemory();
    const s = VhostUserFrontend.fromSocket(await connectUnix(be.sock));
    s.close();
    await rejects(s.reconnect(), 'UNSUPPORTED', /made from one/);
  } finally {
    fe.close();
    be.done();
  }
  await until(() => openFds() === before, 5000, () => `fds: ${openFds()} open, ${before} before`);
});
