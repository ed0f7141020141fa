/**
 * VirtioNetDriver (src/vhost-user/net-driver.ts) against our own
 * vhost-user-net switch, in process and as a `vdevkit vhost-user-net` child
 * process: two drivers on two ports exchange frames both ways, checked byte
 * for byte, 60..1514 bytes and jumbo frames over several MRG_RXBUF buffers,
 * split and packed rings, MRG_RXBUF on and off, two queue pairs, the control
 * queue, backpressure with trySend. Then in-test back-ends that lie (a used
 * length beyond the buffer, num_buffers 0 or beyond the ring, a used id never
 * made available) and one that never uses TX buffers: a typed error, no hang,
 * no fd leaked.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { NetSwitch } from '../src/devices/net-switch.js';
import { NetCtrl, NetFeature, type VhostUserNetOptions } from '../src/devices/vhost-user-net.js';
import { VhostUserBackend, type VhostQueue, type VhostUserDevice } from '../src/vhost-user/backend.js';
import { VirtioFeature as VF, bit } from '../src/vhost-user/constants.js';
import { VhostUserError } from '../src/vhost-user/errors.js';
import { VirtioNetDriver, type VirtioNetDriverOptions } from '../src/vhost-user/net-driver.js';
import { ethFrame } from './helpers/net-driver.js';

const MAC_A = '52:54:00:00:01:0a';
const MAC_B = '52:54:00:00:01:0b';
const openFds = (): number => fs.readdirSync('/proc/self/fd').length;

/** Two switch ports (MACs A and B) in this process, a VirtioNetDriver on each. */
async function withPair(o: { port?: VhostUserNetOptions; driver?: VirtioNetDriverOptions; drivers?: [VirtioNetDriverOptions, VirtioNetDriverOptions] }, fn: (a: VirtioNetDriver, b: VirtioNetDriver, sw: NetSwitch) => Promise<void>): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdevkit-netdrv-'));
  const sw = new NetSwitch();
  const sa = path.join(dir, 'a.sock');
  const sb = path.join(dir, 'b.sock');
  sw.listen(sa, { ...o.port, mac: MAC_A });
  sw.listen(sb, { ...o.port, mac: MAC_B });
  const ds: VirtioNetDriver[] = [];
  try {
    ds.push(await VirtioNetDriver.connect(sa, o.drivers?.[0] ?? o.driver ?? {}));
    ds.push(await VirtioNetDriver.connect(sb, o.drivers?.[1] ?? o.driver ?? {}));
    await new Promise((r) => setTimeout(r, 20));
    await fn(ds[0]!, ds[1]!, sw);
  } finally {
    for (const d of ds) await d.close();
    sw.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

async function receiveN(d: VirtioNetDriver, n: number, o: { queue?: number } = {}): Promise<Buffer[]> {
  const out: Buffer[] = [];
  while (out.length < n) out.push(await d.receive({ ...o, timeoutMs: 5000 }));
  return out;
}

/** Sends `frames` from `from` and checks `to` receives them, in order, byte for byte. */
async function exchange(from: VirtioNetDriver, to: VirtioNetDriver, frames: Buffer[], queue = 0): Promise<void> {
  const got = receiveN(to, frames.length, { queue });
  await from.sendBatch(frames, { queue });
  const back = await got;
  for (let i = 0; i < frames.length; i++) assert.ok(back[i]!.equals(frames[i]!), `frame ${i} (${frames[i]!.length} bytes) arrived as ${back[i]!.length} bytes, not identical`);
}

const SIZES = [60, 61, 64, 100, 127, 128, 255, 256, 512, 1000, 1023, 1024, 1400, 1499, 1500, 1513, 1514];

function frames(dst: string, src: string, sizes: number[], seed: number): Buffer[] {
  return sizes.map((n, i) => ethFrame(dst, src, n, seed + i));
}

for (const packed of [false, true]) {
  for (const mrg of [true, false]) {
    test(`two drivers through our switch, both ways, 60..1514 bytes (${packed ? 'packed' : 'split'}, ${mrg ? 'MRG_RXBUF' : 'no MRG_RXBUF'})`, async () => {
      await withPair({ driver: { packed, mrgRxbuf: mrg } }, async (a, b) => {
        assert.equal(a.packed, packed);
        assert.equal(a.mergeable, mrg);
        assert.equal(a.mac, MAC_A, 'the MAC from config');
        assert.equal(b.mac, MAC_B);
        assert.equal(a.config.mtu, 1500);
        assert.equal(a.config.linkUp, true);
        assert.equal(a.config.fromDevice, true);
        assert.equal((a.features & bit(NetFeature.MRG_RXBUF)) !== 0n, mrg);
        for (const f of [0, 1, 6, 7, 11, 12]) assert.equal((a.features >> BigInt(f)) & 1n, 0n, `offload bit ${f} declined`);
        assert.notEqual(a.features & bit(VF.EVENT_IDX), 0n);
        // 3 x the sizes: more than fits in flight at once is fine (256-entry rings).
        const ab = frames(MAC_B, MAC_A, [...SIZES, ...SIZES, ...SIZES], 1);
        await exchange(a, b, ab);
        const ba = frames(MAC_A, MAC_B, SIZES, 100);
        await exchange(b, a, ba);
        // 600 frames, more than a ring: the sends wait for room in order.
        const many = Array.from({ length: 600 }, (_, i) => ethFrame(MAC_B, MAC_A, 60 + ((i * 37) % 1455), i));
        await exchange(a, b, many);
        const sa = a.totals();
        const sb = b.totals();
        assert.equal(sa.txPackets, ab.length + many.length);
        assert.equal(sa.txCompleted, sa.txPackets);
        assert.equal(sa.txBytes, [...ab, ...many].reduce((n, f) => n + f.length, 0));
        assert.equal(sb.rxPackets, ab.length + many.length);
        assert.equal(sb.rxBytes, sa.txBytes);
        assert.equal(sb.rxBuffers, sb.rxPackets, 'one buffer per frame (2048-byte buffers)');
        assert.equal(sa.rxPackets, ba.length);
        assert.equal(sb.rxDrops + sa.rxDrops + sa.txDrops + sb.txDrops, 0);
      });
    });
  }
}

for (const packed of [false, true]) {
  test(`jumbo frames (MTU 9000): over several MRG_RXBUF buffers, and in one big buffer without (${packed ? 'packed' : 'split'})`, async () => {
    const sizes = [1515, 2036, 2037, 2048, 3000, 4096, 6000, 8000, 9000, 9018];
    await withPair({ port: { mtu: 9000 }, drivers: [{ packed, mrgRxbuf: false }, { packed, rxBufferSize: 2048 }] }, async (a, b) => {
      assert.equal(a.config.mtu, 9000);
      assert.equal(a.maxFrameSize, 9018);
      assert.ok(a.rxBufferSize >= 12 + 9018, `without MRG_RXBUF an RX buffer holds a whole frame (${a.rxBufferSize})`);
      assert.ok(b.mergeable);
      const ab = frames(MAC_B, MAC_A, [...sizes, 60, ...sizes], 7);
      await exchange(a, b, ab);
      const sb = b.totals();
      const need = ab.reduce((n, f) => n + Math.ceil((f.length + 12) / 2048), 0);
      assert.equal(sb.rxBuffers, need, 'each frame took ceil((len + 12) / 2048) buffers');
      assert.ok(sb.rxBuffers > sb.rxPackets);
      await exchange(b, a, frames(MAC_A, MAC_B, sizes, 9));
      assert.equal(a.totals().rxBuffers, sizes.length, 'one buffer each without MRG_RXBUF');
      await assert.rejects(a.send(Buffer.alloc(9019)), RangeError, 'larger than MTU + 18');
      await assert.rejects(a.send(Buffer.alloc(13)), RangeError, 'shorter than an Ethernet header');
    });
  });
}

test('two queue pairs: each TX queue arrives on the matching RX queue; per-queue counters', async () => {
  for (const packed of [false, true]) {
    await withPair({ port: { queuePairs: 2 }, driver: { queuePairs: 2, packed } }, async (a, b) => {
      assert.equal(a.queuePairs, 2);
      assert.equal(a.config.maxVirtqueuePairs, 2);
      await exchange(a, b, frames(MAC_B, MAC_A, SIZES, 1), 0);
      await exchange(a, b, frames(MAC_B, MAC_A, [...SIZES, 70], 50), 1);
      await exchange(b, a, frames(MAC_A, MAC_B, [64, 65], 90), 1);
      const [q0, q1] = b.stats;
      assert.equal(q0!.rxPackets, SIZES.length);
      assert.equal(q1!.rxPackets, SIZES.length + 1);
      assert.equal(a.stats[0]!.txPackets, SIZES.length);
      assert.equal(a.stats[1]!.txPackets, SIZES.length + 1);
      assert.equal(a.stats[1]!.rxPackets, 2);
      await assert.rejects(a.send(ethFrame(MAC_B, MAC_A, 60), { queue: 2 }), RangeError);
    });
  }
});

test('the control queue: VQ_PAIRS_SET at start, promiscuous off/on acked, a bad command NACKed', async () => {
  await withPair({ port: { queuePairs: 2 }, driver: { queuePairs: 2, ctrlVq: true } }, async (a, b, sw) => {
    assert.notEqual(a.features & bit(NetFeature.CTRL_VQ), 0n);
    assert.equal(sw.ports[0]!.device.activePairs, 2, 'VQ_PAIRS_SET 2');
    assert.equal(await b.control(NetCtrl.RX, NetCtrl.RX_PROMISC, Uint8Array.of(0)), NetCtrl.OK);
    assert.equal(sw.ports[1]!.device.promisc, false);
    // Not promiscuous, unicast to its own MAC still arrives.
    await exchange(a, b, frames(MAC_B, MAC_A, [60, 1514], 3));
    assert.equal(await b.control(NetCtrl.RX, NetCtrl.RX_PROMISC, Uint8Array.of(1)), NetCtrl.OK);
    assert.equal(await b.control(99, 0, Uint8Array.of(1)), NetCtrl.ERR);
  });
  await withPair({}, async (a) => {
    await assert.rejects(a.control(NetCtrl.RX, NetCtrl.RX_PROMISC, Uint8Array.of(0)), (e: unknown) => e instanceof VhostUserError && e.code === 'UNSUPPORTED');
  });
});

test('header in its own descriptor (indirect and not), on event and async iterator delivery, trySend backpressure', async () => {
  for (const indirect of [true, false]) {
    await withPair({ driver: { txHeaderSeparate: true, indirect, queueSize: 64 } }, async (a, b) => {
      assert.equal((a.features & bit(VF.INDIRECT_DESC)) !== 0n, indirect);
      await exchange(a, b, frames(MAC_B, MAC_A, SIZES, 4));
      // 'frame' listeners take the frames.
      const seen: Buffer[] = [];
      const onFrame = (f: Buffer, pair: number): void => {
        assert.equal(pair, 0);
        seen.push(f);
      };
      b.on('frame', onFrame);
      const fs2 = frames(MAC_B, MAC_A, [60, 70, 80], 5);
      await a.sendBatch(fs2);
      for (let i = 0; i < 100 && seen.length < 3; i++) await new Promise((r) => setTimeout(r, 10));
      b.off('frame', onFrame);
      assert.deepEqual(seen.map((f) => f.toString('hex')), fs2.map((f) => f.toString('hex')));
      // trySend until the 64-entry ring is full, then writable().
      let sent = 0;
      const total = 1000;
      const received = (async () => {
        let n = 0;
        for await (const f of b) {
          assert.equal(f.length, 60 + (n % 900), `frame ${n}`);
          assert.equal(f[14], ((14 * 31 + n * 7 + 1) & 0xff), `frame ${n} payload`);
          if (++n === total) return n;
        }
        return n;
      })();
      let refused = 0;
      while (sent < total) {
        if (a.trySend(ethFrame(MAC_B, MAC_A, 60 + (sent % 900), sent))) sent++;
        else {
          refused++;
          await a.writable();
        }
      }
      assert.equal(await received, total);
      assert.ok(refused > 0, 'the ring filled at least once');
    });
  }
});

test('a backlog beyond rxBacklog pauses reaping; the device sees a full ring and drops; reading resumes it', async () => {
  await withPair({ drivers: [{}, { rxBacklog: 8, queueSize: 16 }] }, async (a, b, sw) => {
    await a.sendBatch(frames(MAC_B, MAC_A, Array.from({ length: 100 }, () => 60), 0));
    for (let i = 0; i < 200 && b.rxPending < 8; i++) await new Promise((r) => setTimeout(r, 10));
    await new Promise((r) => setTimeout(r, 20));
    assert.equal(b.rxPending, 8, 'the backlog stops at rxBacklog');
    const dropped = sw.ports[1]!.device.stats.drops['no-rx-buffer'];
    assert.ok(dropped >= 100 - 8 - 16, `the device found the ring full (${dropped} dropped)`);
    // Reading resumes reaping: what the ring held comes too.
    const got: Buffer[] = [];
    for (;;) {
      const f = await b.receive({ timeoutMs: 200 }).catch(() => null);
      if (f === null) break;
      got.push(f);
    }
    assert.equal(got.length + dropped, 100, 'every frame received or dropped by the device');
    assert.ok(got.length > 8, `more than the backlog (${got.length})`);
    assert.ok(got.every((f) => f.length === 60));
    await exchange(a, b, frames(MAC_B, MAC_A, [100, 200], 1));
  });
});

test('against `vdevkit vhost-user-net` as a child process: both ways, packed, 2 queue pairs', { timeout: 30_000 }, async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdevkit-netdrv-cli-'));
  const sa = path.join(dir, 'a.sock');
  const sb = path.join(dir, 'b.sock');
  const cli = path.join(path.dirname(fileURLToPath(import.meta.url)), 'helpers', 'vhost-user-net-cli.js');
  const child = spawn(process.execPath, [cli, '--socket', sa, '--socket', sb, '--queues', '2'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr.on('data', (d: Buffer) => (out += d.toString()));
  const exited = new Promise((r) => child.on('exit', r));
  const ds: VirtioNetDriver[] = [];
  try {
    for (const s of [sa, sb]) ds.push(await VirtioNetDriver.connect(s, { packed: true, queuePairs: 2, connectTimeoutMs: 10_000 }));
    const [a, b] = ds as [VirtioNetDriver, VirtioNetDriver];
    const macA = a.mac!;
    const macB = b.mac!;
    assert.ok(macA && macB && macA !== macB, `${macA} ${macB}`);
    await exchange(a, b, frames(macB, macA, SIZES, 1), 0);
    await exchange(b, a, frames(macA, macB, SIZES, 2), 1);
  } catch (err) {
    throw new Error(`${(err as Error).message}\n--- vhost-user-net:\n${out}`, { cause: err });
  } finally {
    for (const d of ds) await d.close();
    child.kill('SIGTERM');
    await exited;
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

// ---- back-ends that lie -------------------------------------------------------

type Lie = 'none' | 'used-len' | 'num-buffers-zero' | 'num-buffers-huge' | 'num-buffers-held' | 'used-id' | 'tx-never' | 'tx-len';

/** A one-port virtio-net device that answers the first RX buffer (or every TX buffer) wrongly. */
class LyingNet implements VhostUserDevice {
  readonly features = bit(VF.VERSION_1) | bit(NetFeature.MRG_RXBUF) | bit(NetFeature.MAC) | bit(VF.EVENT_IDX);
  readonly numQueues = 2;
  rx: VhostQueue | null = null;
  backend: VhostUserBackend | null = null;
  constructor(readonly lie: Lie) {}
  config(): Uint8Array {
    return Uint8Array.of(2, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0xdc, 0x05);
  }
  handleQueue(q: VhostQueue): void {
    if (q.index === 0) {
      this.rx = q;
      return;
    }
    if (this.lie === 'tx-never') return;
    for (let c = q.pop(); c !== null; c = q.pop()) {
      q.push(c, 0);
      // What DPDK 22.11's packed dequeue does: the chain's length as the used len of a read-only chain.
      if (this.lie === 'tx-len') {
        const used = this.usedRing(q);
        used.setUint32(4 + 8 * ((used.getUint16(2, true) - 1) & (q.size - 1)) + 4, c.readableBytes, true);
      }
    }
    q.notify();
  }
  /** The split used ring of `q`, from the back-end's view of guest memory. */
  usedRing(q: VhostQueue): DataView {
    const mem = this.backend!.memory!;
    const len = 4 + 8 * q.size;
    const v = mem.view(mem.uvaToGpa(q.addr!.used, len), len)!;
    return new DataView(v.buffer, v.byteOffset, len);
  }
  /** Writes one frame into the first RX buffer, then lies as told. */
  inject(): void {
    const q = this.rx!;
    const frame = ethFrame(MAC_A, MAC_B, 60, 1);
    // num-buffers-held: 4 good frames, then a fifth claiming 16 buffers of a 16-entry ring (it holds 11 more).
    const n = this.lie === 'num-buffers-held' || this.lie === 'none' ? 5 : 1;
    const chains = [];
    for (let i = 0; i < n; i++) {
      const c = q.pop()!;
      const hdr = Buffer.alloc(12);
      const nb = this.lie === 'num-buffers-zero' ? 0 : this.lie === 'num-buffers-huge' ? 1000 : this.lie === 'num-buffers-held' && i === n - 1 ? 16 : 1;
      hdr.writeUInt16LE(nb, 10);
      c.writable[0]!.set(hdr, 0);
      c.writable[0]!.set(frame, 12);
      chains.push(c);
    }
    q.pushBatch(chains, chains.map(() => 72));
    if (this.lie === 'used-len' || this.lie === 'used-id') {
      // Rewrite the split used element just published: len beyond the buffer, or an id never made available.
      const size = q.size;
      const used = this.usedRing(q);
      const slot = (used.getUint16(2, true) - 1) & (size - 1);
      if (this.lie === 'used-len') used.setUint32(4 + 8 * slot + 4, 1 << 20, true);
      else used.setUint32(4 + 8 * slot, size + 3, true);
    }
    q.notify();
  }
}

for (const lie of ['used-len', 'num-buffers-zero', 'num-buffers-huge', 'num-buffers-held', 'used-id'] as const) {
  test(`a back-end that lies (${lie}): PROTOCOL error, receive() and send() reject, no hang, no fd leaked`, { timeout: 20_000 }, async () => {
    const before = openFds();
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdevkit-netlie-'));
    const sock = path.join(dir, 'be.sock');
    const dev = new LyingNet(lie);
    const be = VhostUserBackend.listen(sock, dev);
    dev.backend = be;
    try {
      // num-buffers-held: 16 buffers claimed with a ring of 16, one of them the head itself.
      const d = await VirtioNetDriver.connect(sock, { queueSize: 16 });
      try {
        assert.equal(d.mac, '02:00:00:00:00:01');
        for (let i = 0; i < 100 && dev.rx === null; i++) await new Promise((r) => setTimeout(r, 10));
        const errors: VhostUserError[] = [];
        d.on('error', (e) => errors.push(e));
        const pending = d.receive().then(
          (f) => f,
          (e: unknown) => e,
        );
        dev.inject();
        const first = await pending;
        if (lie === 'num-buffers-held') assert.ok(Buffer.isBuffer(first), 'the good frames before the lie were received');
        else assert.ok(first instanceof VhostUserError && first.code === 'PROTOCOL', `receive() rejected with PROTOCOL: ${String(first)}`);
        for (let i = 0; i < 100 && errors.length === 0; i++) await new Promise((r) => setTimeout(r, 10));
        assert.equal(errors.length, 1);
        const msg = errors[0]!.message;
        if (lie === 'used-len') assert.match(msg, /used len 1048576/);
        else if (lie === 'used-id') assert.match(msg, /used id 19/);
        else if (lie === 'num-buffers-held') assert.match(msg, /num_buffers 16 with 11 more buffers held/);
        else assert.match(msg, /num_buffers/);
        assert.equal(d.error, errors[0]);
        assert.ok(d.frontend.closed, 'the lying back-end is disconnected');
        await assert.rejects(d.send(ethFrame(MAC_B, MAC_A, 60)), (e: unknown) => e instanceof VhostUserError && e.code === 'PROTOCOL');
        await assert.rejects(d.receive(), (e: unknown) => e instanceof VhostUserError && e.code === 'PROTOCOL');
      } finally {
        await d.close();
      }
    } finally {
      be.close();
      fs.rmSync(dir, { recursive: true, force: true });
    }
    await new Promise((r) => setTimeout(r, 50));
    assert.equal(openFds(), before, 'no fd leaked');
  });
}

test('a back-end that never uses TX buffers: send() rejects with TIMEOUT after txTimeoutMs and the driver disconnects', { timeout: 20_000 }, async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdevkit-netlie-'));
  const sock = path.join(dir, 'be.sock');
  const dev = new LyingNet('tx-never');
  const be = VhostUserBackend.listen(sock, dev);
  try {
    const d = await VirtioNetDriver.connect(sock, { txTimeoutMs: 300 });
    try {
      await assert.rejects(d.send(ethFrame(MAC_B, MAC_A, 60)), (e: unknown) => e instanceof VhostUserError && e.code === 'TIMEOUT');
      assert.equal(d.totals().txDrops, 1);
      assert.ok(d.frontend.closed);
    } finally {
      await d.close();
    }
    // And a back-end that goes away: a pending receive() rejects DISCONNECTED.
    const d2 = await VirtioNetDriver.connect(sock);
    try {
      const pending = d2.receive();
      be.close();
      await assert.rejects(pending, (e: unknown) => e instanceof VhostUserError && e.code === 'DISCONNECTED');
      assert.ok(d2.closed);
    } finally {
      await d2.close();
    }
  } finally {
    be.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('a TX used len above 0 (DPDK packed dequeue writes the chain length) is taken as 0: the send completes', { timeout: 20_000 }, async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdevkit-netlie-'));
  const sock = path.join(dir, 'be.sock');
  const dev = new LyingNet('tx-len');
  const be = VhostUserBackend.listen(sock, dev);
  dev.backend = be;
  try {
    const d = await VirtioNetDriver.connect(sock);
    try {
      await d.sendBatch([ethFrame(MAC_B, MAC_A, 60), ethFrame(MAC_B, MAC_A, 1514)]);
      assert.equal(d.totals().txCompleted, 2);
      assert.equal(d.error, null);
      assert.equal(d.frontend.closed, false);
    } finally {
      await d.close();
    }
  } finally {
    be.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('frames a back-end published before it went away are still received, then DISCONNECTED', { timeout: 20_000 }, async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdevkit-netgone-'));
  const sock = path.join(dir, 'be.sock');
  const dev = new LyingNet('none');
  const be = VhostUserBackend.listen(sock, dev);
  dev.backend = be;
  try {
    const d = await VirtioNetDriver.connect(sock, { queueSize: 16 });
    try {
      for (let i = 0; i < 100 && dev.rx === null; i++) await new Promise((r) => setTimeout(r, 10));
      const closed = new Promise((r) => d.once('close', r));
      dev.inject();
      be.close();
      await closed;
      const want = ethFrame(MAC_A, MAC_B, 60, 1);
      for (let i = 0; i < 5; i++) assert.ok((await d.receive({ timeoutMs: 1000 })).equals(want), `frame ${i}`);
      await assert.rejects(d.receive(), (e: unknown) => e instanceof VhostUserError && e.code === 'DISCONNECTED');
      assert.equal(d.error, null, 'a disconnect is not a protocol error');
      await assert.rejects(d.send(want), (e: unknown) => e instanceof VhostUserError && e.code === 'DISCONNECTED');
    } finally {
      await d.close();
    }
  } finally {
    be.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
