/**
 * The vhost-user back-end's less travelled paths, each over a real socket with
 * the raw front-end (test/helpers/vhost-user-raw.ts, bytes at the spec's
 * offsets) and a test device that holds requests until the test completes
 * them: the dirty log (SET_LOG_BASE, LOG_ALL, VRING_F_LOG), the back-end
 * channel (CONFIG_CHANGE_MSG), SET/GET_STATUS, a malformed chain breaking the
 * ring (err eventfd), inflight tracking across a reconnect at the protocol
 * level, NET_SET_MTU / SEND_RARP, SET_MEM_TABLE, rings without
 * PROTOCOL_FEATURES.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { EventFd, SharedMemory, socketPairFds, UnixSocket, type Fd } from '../src/sys/index.js';
import { VhostUserBackend, type VhostQueue, type VhostUserDevice } from '../src/vhost-user/backend.js';
import type { DescChain } from '../src/virtio/index.js';
import { NEED_REPLY, RawFrontEnd, REPLY, state, u64, VERSION } from './helpers/vhost-user-raw.js';

const MEM = 1 << 20;
const UVA = 0x7e0000000000;
const DESC = 0x1000;
const AVAIL = 0x2000;
const USED = 0x3000;
const QSIZE = 8;
const F_VERSION_1 = 1n << 32n;
const F_PROTOCOL = 1n << 30n;
const F_LOG_ALL = 1n << 26n;
const PF = { MQ: 0, LOG_SHMFD: 1, RARP: 2, REPLY_ACK: 3, NET_MTU: 4, BACKEND_REQ: 5, CONFIG: 9, INFLIGHT: 12, MEM_SLOTS: 15, STATUS: 16 };
const pf = (...bits: number[]): bigint => bits.reduce((a, b) => a | (1n << BigInt(b)), 0n);

/** Holds every chain it is given until the test completes it. */
class HoldDevice implements VhostUserDevice {
  readonly features = F_VERSION_1;
  readonly numQueues = 1;
  held: { q: VhostQueue; chain: DescChain }[] = [];
  mtu = 0;
  rarp: Uint8Array | null = null;
  #wake: (() => void) | null = null;
  handleQueue(q: VhostQueue): void {
    let c: DescChain | null;
    while ((c = q.pop()) !== null) this.held.push({ q, chain: c });
    this.#wake?.();
  }
  config(): Uint8Array {
    return Uint8Array.from([1, 2, 3, 4, 5, 6, 7, 8]);
  }
  setMtu(mtu: number): boolean {
    this.mtu = mtu;
    return mtu >= 68;
  }
  sendRarp(mac: Uint8Array): void {
    this.rarp = mac;
  }
  async waitHeld(n: number): Promise<void> {
    const deadline = Date.now() + 5000;
    while (this.held.length < n) {
      if (Date.now() > deadline) throw new Error(`${this.held.length} chains held, waiting for ${n}`);
      await new Promise<void>((r) => {
        this.#wake = r;
        setTimeout(r, 50);
      });
    }
  }
  /** Writes `data` into the chain's first writable buffer and completes it. */
  complete(k: number, data: Uint8Array): void {
    const { q, chain } = this.held[k]!;
    chain.writable[0]!.set(data);
    q.push(chain, data.length);
    q.notify();
  }
}

function scratch(): { sock: string; done(): void } {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdevkit-vuf-'));
  return { sock: path.join(dir, 'be.sock'), done: () => fs.rmSync(dir, { recursive: true, force: true }) };
}

function region(gpa: number, size: number, uva: number, offset: number): Buffer {
  const b = Buffer.alloc(32);
  b.writeBigUInt64LE(BigInt(gpa), 0);
  b.writeBigUInt64LE(BigInt(size), 8);
  b.writeBigUInt64LE(BigInt(uva), 16);
  b.writeBigUInt64LE(BigInt(offset), 24);
  return b;
}

function vringAddr(flags: number, log: number): Buffer {
  const a = Buffer.alloc(40);
  a.writeUInt32LE(0, 0);
  a.writeUInt32LE(flags, 4);
  a.writeBigUInt64LE(BigInt(UVA + DESC), 8);
  a.writeBigUInt64LE(BigInt(UVA + USED), 16);
  a.writeBigUInt64LE(BigInt(UVA + AVAIL), 24);
  a.writeBigUInt64LE(BigInt(log), 32);
  return a;
}

/** One request: a device-writable buffer of `len` bytes at `gpa`, head `head`, offered in avail slot `slot`. */
function offerWritable(mem: DataView, head: number, slot: number, gpa: number, len: number): void {
  const o = DESC + 16 * head;
  mem.setBigUint64(o, BigInt(gpa), true);
  mem.setUint32(o + 8, len, true);
  mem.setUint16(o + 12, 2, true); // VIRTQ_DESC_F_WRITE
  mem.setUint16(o + 14, 0, true);
  mem.setUint16(AVAIL + 4 + 2 * (slot % QSIZE), head, true);
  mem.setUint16(AVAIL + 2, slot + 1, true);
}

interface Setup {
  features?: bigint;
  protocol?: bigint;
  logAddr?: { flags: number; log: number };
  before?: (fe: RawFrontEnd) => Promise<void>;
  base?: number;
}

/** Negotiates, maps `shm` as guest memory (SET_MEM_TABLE), sets up ring 0 and starts it. */
async function bringUp(fe: RawFrontEnd, shm: SharedMemory, kick: EventFd, call: EventFd, err: EventFd, o: Setup = {}): Promise<void> {
  const features = o.features ?? F_VERSION_1 | F_PROTOCOL;
  if (features & F_PROTOCOL) fe.send(16, u64(o.protocol ?? pf(PF.REPLY_ACK))); // SET_PROTOCOL_FEATURES
  fe.send(3); // SET_OWNER
  fe.send(2, u64(features)); // SET_FEATURES
  const table = Buffer.concat([Buffer.from([1, 0, 0, 0, 0, 0, 0, 0]), region(0, MEM, UVA, 0)]);
  fe.send(5, table, [shm.fd]); // SET_MEM_TABLE
  await o.before?.(fe);
  fe.send(8, state(0, QSIZE));
  fe.send(10, state(0, o.base ?? 0));
  fe.send(9, vringAddr(o.logAddr?.flags ?? 0, o.logAddr?.log ?? 0));
  fe.send(13, u64(0), [call.fd]);
  fe.send(14, u64(0), [err.fd]);
  fe.send(12, u64(0), [kick.fd]);
  if (features & F_PROTOCOL) fe.send(18, state(0, 1)); // SET_VRING_ENABLE
  // A round trip that always replies: everything before it was handled.
  assert.equal((await fe.call(17)).readBigUInt64LE(0), 1n);
}

async function withBackend(fn: (ctx: { dev: HoldDevice; be: VhostUserBackend; fe: RawFrontEnd; shm: SharedMemory; kick: EventFd; call: EventFd; err: EventFd; sock: string }) => Promise<void>): Promise<void> {
  const t = scratch();
  const dev = new HoldDevice();
  const be = VhostUserBackend.listen(t.sock, dev);
  const shm = SharedMemory.create(MEM);
  const kick = EventFd.create();
  const call = EventFd.create();
  const err = EventFd.create();
  const fe = await RawFrontEnd.connect(t.sock);
  try {
    await fn({ dev, be, fe, shm, kick, call, err, sock: t.sock });
  } finally {
    fe.close();
    be.close();
    shm.close();
    kick.close();
    call.close();
    err.close();
    t.done();
  }
}

test('dirty log: SET_LOG_BASE (LOG_SHMFD) replies; with LOG_ALL the written buffer and the used ring are marked', async () => {
  await withBackend(async ({ dev, fe, shm, kick, call, err }) => {
    const log = SharedMemory.create(4096);
    try {
      await bringUp(fe, shm, kick, call, err, {
        features: F_VERSION_1 | F_PROTOCOL | F_LOG_ALL,
        protocol: pf(PF.REPLY_ACK, PF.LOG_SHMFD),
        logAddr: { flags: 1, log: USED }, // VHOST_VRING_F_LOG, log_guest_addr = the used ring's GPA
        before: async (f) => {
          const p = Buffer.alloc(16);
          p.writeBigUInt64LE(4096n, 0); // mmap_size
          p.writeBigUInt64LE(0n, 8); // mmap_offset
          const r = await f.call(6, p, [log.fd]);
          assert.equal(r.length, 8, 'SET_LOG_BASE replies with a u64');
        },
      });
      const mem = shm.view;
      offerWritable(mem, 0, 0, 0x25000, 100);
      kick.signal();
      await dev.waitHeld(1);
      dev.complete(0, new Uint8Array(100).fill(0xab));
      // Page 0x25 (the buffer): byte 4, bit 5. Page 3 (the used ring): byte 0, bit 3.
      assert.equal(log.bytes[0x25 >> 3]! & (1 << (0x25 & 7)), 1 << 5, 'the written page is dirty');
      assert.equal(log.bytes[0]! & (1 << 3), 1 << 3, 'the used ring page is dirty');
      const others = [...log.bytes].map((b, i) => (i === 0 ? b & ~(1 << 3) : i === 4 ? b & ~(1 << 5) : b));
      assert.ok(others.every((b) => b === 0), 'nothing else marked');
      assert.equal(mem.getUint16(USED + 2, true), 1);
    } finally {
      log.close();
    }
  });
});

test('back-end channel: CONFIG_CHANGE_MSG with NEED_REPLY, resolved by the front-end\'s ack', async () => {
  await withBackend(async ({ be, fe }) => {
    fe.send(16, u64(pf(PF.REPLY_ACK, PF.BACKEND_REQ, PF.CONFIG)));
    const [mine, theirs] = socketPairFds();
    assert.equal(await fe.acked(21, Buffer.alloc(0), [theirs]), 0n, 'SET_BACKEND_REQ_FD acked');
    theirs.close();
    const chan = new RawFrontEnd(new UnixSocket(mine)); // reads the back-end's requests the same way
    const done = be.configChanged();
    const m = await chan.recv();
    assert.ok(m);
    assert.equal(m.request, 2, 'BACKEND_CONFIG_CHANGE_MSG');
    assert.equal(m.flags, VERSION | NEED_REPLY);
    assert.equal(m.payload.length, 0);
    chan.send(2, u64(0), [], VERSION | REPLY);
    await done;
    // A failure ack rejects.
    const failing = be.configChanged();
    await chan.recv();
    chan.send(2, u64(1), [], VERSION | REPLY);
    await assert.rejects(failing, /failed CONFIG_CHANGE_MSG/);
    chan.close();
  });
});

test('SET_STATUS / GET_STATUS; NET_SET_MTU and SEND_RARP reach the device; RESET_DEVICE clears the status', async () => {
  await withBackend(async ({ dev, fe }) => {
    const offered = (await fe.call(15)).readBigUInt64LE(0);
    assert.ok(offered & pf(PF.NET_MTU, PF.RARP, PF.STATUS), 'NET_MTU, RARP, STATUS offered (the device has setMtu / sendRarp)');
    fe.send(16, u64(pf(PF.REPLY_ACK, PF.STATUS, PF.NET_MTU, PF.RARP, 13)));
    assert.equal(await fe.acked(39, u64(0x0f)), 0n);
    assert.equal((await fe.call(40)).readBigUInt64LE(0), 0x0fn);
    assert.notEqual(await fe.acked(39, u64(0x100)), 0n, 'a status above a byte is refused');
    assert.equal(await fe.acked(20, u64(1500)), 0n);
    assert.equal(dev.mtu, 1500);
    assert.notEqual(await fe.acked(20, u64(20)), 0n, 'an MTU the device refuses is nacked');
    assert.equal(await fe.acked(19, Buffer.from([0x52, 0x54, 0, 0x12, 0x34, 0x56, 0, 0])), 0n);
    assert.deepEqual([...dev.rarp!], [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    assert.equal(await fe.acked(34), 0n, 'RESET_DEVICE');
    assert.equal((await fe.call(40)).readBigUInt64LE(0), 0n);
  });
});

test('a descriptor loop breaks the ring: err eventfd signalled, nothing more served, no write outside memory', async () => {
  await withBackend(async ({ dev, fe, shm, kick, call, err }) => {
    await bringUp(fe, shm, kick, call, err);
    const mem = shm.view;
    // head 0 -> 1 -> 0 with NEXT: a loop.
    for (const [i, next] of [[0, 1], [1, 0]] as const) {
      mem.setBigUint64(DESC + 16 * i, 0x20000n, true);
      mem.setUint32(DESC + 16 * i + 8, 16, true);
      mem.setUint16(DESC + 16 * i + 12, 1, true);
      mem.setUint16(DESC + 16 * i + 14, next, true);
    }
    mem.setUint16(AVAIL + 4, 0, true);
    mem.setUint16(AVAIL + 2, 1, true);
    kick.signal();
    assert.equal(await Promise.race([err.wait(), new Promise((r) => setTimeout(() => r(0), 3000))]), 1, 'err eventfd signalled');
    assert.equal(dev.held.length, 0, 'the looping chain was not handed to the device');
    // A good request after it is not served either: the ring is broken until it is set up again.
    offerWritable(mem, 2, 1, 0x21000, 8);
    kick.signal();
    await new Promise((r) => setTimeout(r, 100));
    assert.equal(dev.held.length, 0);
    assert.equal(mem.getUint16(USED + 2, true), 0, 'nothing used');
    // GET_VRING_BASE still answers (the spec: the back-end keeps replying).
    const base = await fe.call(11, state(0, 0));
    assert.equal(base.readUInt32LE(0), 0);
  });
});

test('inflight: a request held at a disconnect is resubmitted to the device after the front-end comes back with SET_INFLIGHT_FD', async () => {
  await withBackend(async ({ dev, fe, shm, kick, call, err, sock }) => {
    let inflightFd: Fd | undefined;
    let inflightSize = 0n;
    const proto = pf(PF.REPLY_ACK, PF.INFLIGHT);
    await bringUp(fe, shm, kick, call, err, {
      protocol: proto,
      before: async (f) => {
        const req = Buffer.alloc(24);
        req.writeUInt16LE(1, 16); // num_queues
        req.writeUInt16LE(QSIZE, 18); // queue_size
        f.send(31, req);
        const r = await f.recv();
        assert.ok(r);
        assert.equal(r.request, 31);
        assert.equal(r.flags, VERSION | REPLY);
        assert.equal(r.fds.length, 1, 'GET_INFLIGHT_FD returns a memfd');
        inflightSize = r.payload.readBigUInt64LE(0);
        assert.ok(inflightSize >= BigInt(16 + 16 * QSIZE), `mmap_size ${inflightSize} holds the split layout`);
        assert.equal(r.payload.readUInt16LE(16), 1);
        assert.equal(r.payload.readUInt16LE(18), QSIZE);
        inflightFd = r.fds[0];
      },
    });
    const mem = shm.view;
    offerWritable(mem, 3, 0, 0x30000, 16);
    kick.signal();
    await dev.waitHeld(1);
    assert.equal(dev.held[0]!.chain.id, 3);
    // The split inflight layout (header 16 B, then 16 B per descriptor): desc[3].inflight = 1.
    const region = SharedMemory.map(inflightFd!.dup(), { size: Number(inflightSize) });
    assert.equal(region.view.getUint16(8, true), 1, 'version 1');
    assert.equal(region.view.getUint16(10, true), QSIZE, 'desc_num');
    assert.equal(region.bytes[16 + 16 * 3], 1, 'desc[3] in flight');
    fe.close();
    await new Promise((r) => setTimeout(r, 50));

    // The front-end comes back (used idx still 0): SET_VRING_BASE 0, SET_INFLIGHT_FD, and a new request in slot 1.
    const fe2 = await RawFrontEnd.connect(sock);
    try {
      offerWritable(mem, 5, 1, 0x31000, 16);
      await bringUp(fe2, shm, kick, call, err, {
        protocol: proto,
        before: async (f) => {
          const p = Buffer.alloc(24);
          p.writeBigUInt64LE(inflightSize, 0);
          p.writeUInt16LE(1, 16);
          p.writeUInt16LE(QSIZE, 18);
          assert.equal(await f.acked(32, p, [inflightFd!]), 0n, 'SET_INFLIGHT_FD');
        },
      });
      await dev.waitHeld(3);
      assert.deepEqual(dev.held.slice(1).map((h) => h.chain.id), [3, 5], 'head 3 resubmitted first, then slot 1 (not slot 0 again)');
      dev.complete(1, Buffer.from('resubmitted ok!!'));
      dev.complete(2, Buffer.from('the new request.'));
      assert.equal(mem.getUint16(USED + 2, true), 2);
      assert.equal(mem.getUint32(USED + 4, true), 3);
      assert.equal(mem.getUint32(USED + 12, true), 5);
      assert.equal(region.bytes[16 + 16 * 3], 0, 'desc[3] no longer in flight');
      assert.equal(Buffer.from(shm.bytes.subarray(0x30000, 0x30010)).toString(), 'resubmitted ok!!');
    } finally {
      fe2.close();
      region.close();
      inflightFd!.close();
    }
  });
});

test('without PROTOCOL_FEATURES the ring is enabled at once; SET_MEM_TABLE with a missing fd and REM_MEM_REG of an unknown region are refused', async () => {
  await withBackend(async ({ dev, fe, shm, kick, call, err }) => {
    await bringUp(fe, shm, kick, call, err, { features: F_VERSION_1 });
    offerWritable(shm.view, 1, 0, 0x22000, 4);
    kick.signal();
    await dev.waitHeld(1);
    assert.equal(dev.held[0]!.chain.id, 1, 'served without SET_VRING_ENABLE');
  });
  await withBackend(async ({ fe, shm }) => {
    fe.send(16, u64(pf(PF.REPLY_ACK, PF.MEM_SLOTS)));
    const two = Buffer.concat([Buffer.from([2, 0, 0, 0, 0, 0, 0, 0]), region(0, MEM, UVA, 0), region(0x100000, MEM, UVA + 0x100000, 0)]);
    assert.notEqual(await fe.acked(5, two, [shm.fd]), 0n, 'two regions, one fd: refused');
    const rem = Buffer.concat([Buffer.alloc(8), region(0x500000, 4096, 0x1000, 0)]);
    assert.notEqual(await fe.acked(38, rem), 0n, 'REM_MEM_REG of a region never added: refused');
    const overlap = Buffer.concat([Buffer.from([2, 0, 0, 0, 0, 0, 0, 0]), region(0, MEM, UVA, 0), region(0x80000, MEM, UVA + 0x200000, 0)]);
    assert.notEqual(await fe.acked(5, overlap, [shm.fd, shm.fd]), 0n, 'overlapping regions: refused');
    const ok = Buffer.concat([Buffer.from([1, 0, 0, 0, 0, 0, 0, 0]), region(0, MEM, UVA, 0)]);
    assert.equal(await fe.acked(5, ok, [shm.fd]), 0n, 'one region, one fd: accepted');
    assert.equal(await fe.acked(38, Buffer.concat([Buffer.alloc(8), region(0, MEM, UVA, 0)])), 0n, 'REM_MEM_REG of it');
  });
});

test('DEVICE_STATE: the blk disk\'s state saved through a pipe, loaded into another, CHECK_DEVICE_STATE; a state of another size refused', async () => {
  const { VhostUserBlkDevice } = await import('../src/devices/vhost-user-blk.js');
  const { nativeAddon: native, Fd: FdClass } = await import('../src/sys/index.js');
  const t = scratch();
  const src = VhostUserBlkDevice.open({ size: 1 << 20 });
  const be = VhostUserBackend.listen(t.sock, src);
  const fe = await RawFrontEnd.connect(t.sock);
  const PF_DEVICE_STATE = 19;
  try {
    assert.ok((await fe.call(15)).readBigUInt64LE(0) & pf(PF_DEVICE_STATE), 'DEVICE_STATE offered (the disk has saveState / loadState)');
    fe.send(16, u64(pf(PF.REPLY_ACK, PF_DEVICE_STATE)));
    // SAVE: direction 0, phase 0 (stopped); we keep the read end.
    const [r, w] = native.pipe(65536).map((n) => new FdClass(n));
    const save = Buffer.alloc(8);
    const reply = await fe.call(42, save, [w!]);
    w!.close();
    assert.equal(reply.readBigUInt64LE(0), 0x100n, 'success (bits 0-7 zero), no fd returned (bit 8)');
    assert.equal((await fe.call(43)).readBigUInt64LE(0), 0n, 'CHECK_DEVICE_STATE: ok');
    const state = Buffer.alloc(64);
    const n = fs.readSync(r!.value, state, 0, 64, null);
    r!.close();
    assert.equal(n, 16);
    assert.equal(state.toString('latin1', 0, 8), 'vdkblk\x00\x01');
    assert.equal(state.readBigUInt64LE(8), 2048n, 'capacity in sectors');
    // LOAD into the same back-end (a destination would be another): the state goes in through a pipe.
    const load = async (bytes: Buffer): Promise<bigint> => {
      const [lr, lw] = native.pipe(65536).map((x) => new FdClass(x));
      const p = Buffer.alloc(8);
      p.writeUInt32LE(1, 0); // LOAD
      assert.equal((await fe.call(42, p, [lr!])).readBigUInt64LE(0), 0x100n);
      lr!.close();
      fs.writeSync(lw!.value, bytes);
      lw!.close();
      return (await fe.call(43)).readBigUInt64LE(0);
    };
    assert.equal(await load(state.subarray(0, 16)), 0n, 'its own state loads');
    const other = Buffer.from(state.subarray(0, 16));
    other.writeBigUInt64LE(4096n, 8);
    assert.notEqual(await load(other), 0n, 'a disk of another size: CHECK_DEVICE_STATE fails');
    const bad = Buffer.alloc(8);
    bad.writeUInt32LE(0, 0);
    bad.writeUInt32LE(1, 4); // phase 1 does not exist
    const [br, bw] = native.pipe(4096).map((x) => new FdClass(x));
    assert.equal((await fe.call(42, bad, [bw!])).readBigUInt64LE(0) & 0xffn, 1n, 'an unknown phase is refused in the reply');
    bw!.close();
    br!.close();
  } finally {
    fe.close();
    be.close();
    src.close();
    t.done();
  }
});

test('INBAND_NOTIFICATIONS: VRING_KICK serves the ring; with no call fd the back-end sends BACKEND_VRING_CALL; refused without BACKEND_REQ + REPLY_ACK', async () => {
  await withBackend(async ({ fe }) => {
    fe.send(16, u64(pf(PF.MQ, 14))); // INBAND without BACKEND_REQ / REPLY_ACK: the connection closes
    assert.equal(await fe.recv(), null);
  });
  await withBackend(async ({ dev, fe, shm, kick, call, err }) => {
    const proto = pf(PF.REPLY_ACK, PF.BACKEND_REQ, PF.CONFIG, 14);
    const [mine, theirs] = socketPairFds();
    await bringUp(fe, shm, kick, call, err, {
      protocol: proto,
      before: async (f) => {
        assert.equal(await f.acked(21, Buffer.alloc(0), [theirs]), 0n);
        theirs.close();
      },
    });
    const chan = new RawFrontEnd(new UnixSocket(mine));
    assert.equal(await fe.acked(13, u64(0x100)), 0n, 'SET_VRING_CALL with NOFD: no call fd');
    offerWritable(shm.view, 4, 0, 0x40000, 8);
    assert.equal(await fe.acked(35, state(0, 0)), 0n, 'VRING_KICK (in-band)');
    await dev.waitHeld(1);
    dev.complete(0, Buffer.from('inband!!'));
    const m = await chan.recv();
    assert.ok(m);
    assert.equal(m.request, 4, 'BACKEND_VRING_CALL');
    assert.equal(m.flags, VERSION | NEED_REPLY);
    assert.deepEqual([m.payload.readUInt32LE(0), m.payload.length], [0, 8], 'vring state of ring 0');
    chan.send(4, u64(0), [], VERSION | REPLY);
    chan.close();
  });
});
