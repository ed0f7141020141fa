/**
 * The vhost-user back-end and the vhost-user-blk device, driven over a real
 * UNIX socket by a raw front-end written here from the spec: every message
 * built by hand (12-byte header, payload at its documented offsets), guest
 * memory a memfd, the split ring laid out by hand at fixed GPAs, kicks and
 * calls real eventfds.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { EventFd, SharedMemory } from '../src/sys/index.js';
import { NEED_REPLY, RawFrontEnd, state, u64, VERSION } from './helpers/vhost-user-raw.js';
import { VhostUserBackend } from '../src/vhost-user/backend.js';
import { VhostUserBlkDevice } from '../src/devices/vhost-user-blk.js';

// Guest layout (GPAs) and the front-end's virtual address of GPA 0.
const MEM_SIZE = 1 << 20;
const UVA = 0x7f1200000000;
const DESC = 0x1000;
const AVAIL = 0x2000;
const USED = 0x3000;
const QSIZE = 8;
const DATA = 0x10000;

const F_PROTOCOL_FEATURES = 1n << 30n;
const F_VERSION_1 = 1n << 32n;
const PF_MQ = 1n << 0n;
const PF_REPLY_ACK = 1n << 3n;
const PF_CONFIG = 1n << 9n;
const PF_INFLIGHT = 1n << 12n;
const PF_MEM_SLOTS = 1n << 15n;
const PF_STATUS = 1n << 16n;

function scratch(): { dir: string; sock: string; img: string; done(): void } {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdevkit-vu-'));
  return { dir, sock: path.join(dir, 'blk.sock'), img: path.join(dir, 'disk.img'), done: () => fs.rmSync(dir, { recursive: true, force: true }) };
}

function openFds(): number {
  return fs.readdirSync('/proc/self/fd').length;
}

/** Writes split descriptor i: addr u64, len u32, flags u16, next u16 (virtio 1.2 2.7.5). */
function desc(mem: DataView, i: number, addr: number, len: number, flags: number, next: number): void {
  const o = DESC + 16 * i;
  mem.setBigUint64(o, BigInt(addr), true);
  mem.setUint32(o + 8, len, true);
  mem.setUint16(o + 12, flags, true);
  mem.setUint16(o + 14, next, true);
}
const NEXT = 1;
const WRITE = 2;

/** Offers head `head` in avail slot `slot` and publishes avail.idx = slot + 1. */
function offer(mem: DataView, slot: number, head: number): void {
  mem.setUint16(AVAIL + 4 + 2 * (slot % QSIZE), head, true);
  mem.setUint16(AVAIL + 2, (slot + 1) & 0xffff, true);
}

async function setup(t: { sock: string }, fe: RawFrontEnd, shm: SharedMemory, kick: EventFd, call: EventFd): Promise<void> {
  const feats = (await fe.call(1)).readBigUInt64LE(0); // GET_FEATURES
  assert.ok(feats & F_PROTOCOL_FEATURES, 'offers PROTOCOL_FEATURES');
  assert.ok(feats & F_VERSION_1, 'offers VERSION_1');
  const proto = (await fe.call(15)).readBigUInt64LE(0); // GET_PROTOCOL_FEATURES
  for (const [name, b] of [['MQ', PF_MQ], ['REPLY_ACK', PF_REPLY_ACK], ['CONFIG', PF_CONFIG], ['INFLIGHT_SHMFD', PF_INFLIGHT], ['CONFIGURE_MEM_SLOTS', PF_MEM_SLOTS], ['STATUS', PF_STATUS]] as const) {
    assert.ok(proto & b, `offers ${name}`);
  }
  fe.send(16, u64(PF_MQ | PF_REPLY_ACK | PF_CONFIG | PF_MEM_SLOTS | PF_STATUS | PF_INFLIGHT)); // SET_PROTOCOL_FEATURES
  assert.equal(await fe.acked(3), 0n); // SET_OWNER, acked
  assert.equal((await fe.call(17)).readBigUInt64LE(0), 1n); // GET_QUEUE_NUM
  assert.equal((await fe.call(36)).readBigUInt64LE(0) >= 8n, true); // GET_MAX_MEM_SLOTS
  assert.equal(await fe.acked(2, u64(F_VERSION_1 | F_PROTOCOL_FEATURES | (1n << 9n))), 0n); // SET_FEATURES: + FLUSH
  // ADD_MEM_REG: padding u64, then guest_phys_addr, memory_size, userspace_addr, mmap_offset.
  const reg = Buffer.alloc(40);
  reg.writeBigUInt64LE(0n, 8);
  reg.writeBigUInt64LE(BigInt(MEM_SIZE), 16);
  reg.writeBigUInt64LE(BigInt(UVA), 24);
  reg.writeBigUInt64LE(0n, 32);
  assert.equal(await fe.acked(37, reg, [shm.fd]), 0n);
  assert.equal(await fe.acked(8, state(0, QSIZE)), 0n); // SET_VRING_NUM
  assert.equal(await fe.acked(10, state(0, 0)), 0n); // SET_VRING_BASE
  const addr = Buffer.alloc(40); // index, flags, desc, used, avail, log (user addresses)
  addr.writeUInt32LE(0, 0);
  addr.writeUInt32LE(0, 4);
  addr.writeBigUInt64LE(BigInt(UVA + DESC), 8);
  addr.writeBigUInt64LE(BigInt(UVA + USED), 16);
  addr.writeBigUInt64LE(BigInt(UVA + AVAIL), 24);
  addr.writeBigUInt64LE(0n, 32);
  assert.equal(await fe.acked(9, addr), 0n); // SET_VRING_ADDR
  assert.equal(await fe.acked(13, u64(0), [call.fd]), 0n); // SET_VRING_CALL
  assert.equal(await fe.acked(12, u64(0), [kick.fd]), 0n); // SET_VRING_KICK: the ring starts
  assert.equal(await fe.acked(18, state(0, 1)), 0n); // SET_VRING_ENABLE
  void t;
}

/** Waits for the call eventfd, then returns used.idx. */
async function completed(mem: DataView, call: EventFd, want: number): Promise<void> {
  const deadline = Date.now() + 5000;
  while (mem.getUint16(USED + 2, true) !== want) {
    if (Date.now() > deadline) throw new Error(`used.idx ${mem.getUint16(USED + 2, true)}, waiting for ${want}`);
    await Promise.race([call.wait(), new Promise((r) => setTimeout(r, 50))]);
  }
}

test('vhost-user-blk over a raw front-end: handshake, config, write, read back, flush, get-id, errors, stop', async () => {
  const t = scratch();
  const fdsBefore = openFds();
  fs.writeFileSync(t.img, Buffer.alloc(64 * 1024));
  const disk = VhostUserBlkDevice.open({ file: t.img, serial: 'test-serial-0001' });
  const be = VhostUserBackend.listen(t.sock, disk);
  const shm = SharedMemory.create(MEM_SIZE);
  const kick = EventFd.create();
  const call = EventFd.create();
  const fe = await RawFrontEnd.connect(t.sock);
  try {
    const mem = shm.view;
    await setup(t, fe, shm, kick, call);

    // GET_CONFIG: offset, size, flags, then size bytes; capacity (u64 @0) = 128 sectors.
    const cfgReq = Buffer.alloc(12 + 60);
    cfgReq.writeUInt32LE(0, 0);
    cfgReq.writeUInt32LE(60, 4);
    const cfg = await fe.call(24, cfgReq);
    assert.equal(cfg.length, 72);
    assert.equal(cfg.readUInt32LE(4), 60);
    assert.equal(cfg.readBigUInt64LE(12), 128n, 'capacity in sectors');
    assert.equal(cfg.readUInt32LE(12 + 20), 512, 'blk_size');

    // OUT at sector 2: header (type 1, reserved, sector), 512 data bytes, status.
    mem.setUint32(DATA, 1, true);
    mem.setBigUint64(DATA + 8, 2n, true);
    for (let i = 0; i < 512; i++) mem.setUint8(DATA + 0x100 + i, (i * 7 + 3) & 0xff);
    mem.setUint8(DATA + 0x400, 0xff);
    desc(mem, 0, DATA, 16, NEXT, 1);
    desc(mem, 1, DATA + 0x100, 512, NEXT, 2);
    desc(mem, 2, DATA + 0x400, 1, WRITE, 0);
    offer(mem, 0, 0);
    kick.signal();
    await completed(mem, call, 1);
    assert.equal(mem.getUint32(USED + 4, true), 0, 'used[0].id = head 0');
    assert.equal(mem.getUint32(USED + 8, true), 1, 'used[0].len = the status byte');
    assert.equal(mem.getUint8(DATA + 0x400), 0, 'VIRTIO_BLK_S_OK');
    const file = fs.readFileSync(t.img);
    for (let i = 0; i < 512; i++) assert.equal(file[1024 + i], (i * 7 + 3) & 0xff, `disk byte ${1024 + i}`);

    // IN of sector 2 into another buffer, header and data+status in one writable descriptor... split as 3.
    mem.setUint32(DATA + 0x800, 0, true);
    mem.setBigUint64(DATA + 0x808, 2n, true);
    desc(mem, 3, DATA + 0x800, 16, NEXT, 4);
    desc(mem, 4, DATA + 0x1000, 512, NEXT | WRITE, 5);
    desc(mem, 5, DATA + 0x1400, 1, WRITE, 0);
    mem.setUint8(DATA + 0x1400, 0xff);
    offer(mem, 1, 3);
    kick.signal();
    await completed(mem, call, 2);
    assert.equal(mem.getUint32(USED + 4 + 8, true), 3);
    assert.equal(mem.getUint32(USED + 8 + 8, true), 513, 'data + status written');
    assert.equal(mem.getUint8(DATA + 0x1400), 0);
    for (let i = 0; i < 512; i++) assert.equal(mem.getUint8(DATA + 0x1000 + i), (i * 7 + 3) & 0xff);

    // FLUSH, GET_ID, a read past the end (IOERR), an unknown type (UNSUPP), all in one kick.
    const reqs: [number, bigint, number][] = [
      [4, 0n, 0],
      [8, 0n, 20],
      [0, 127n, 1024],
      [99, 0n, 0],
    ];
    reqs.forEach(([type, sector, dataLen], k) => {
      const base = DATA + 0x2000 + k * 0x1000;
      mem.setUint32(base, type, true);
      mem.setBigUint64(base + 8, sector, true);
      // two descriptors per request, heads 6, 0, 2, 4 (the earlier chains are done)
      const h = (6 + k * 2) % QSIZE;
      desc(mem, h, base, 16, NEXT, h + 1);
      desc(mem, h + 1, base + 0x100, dataLen + 1, WRITE, 0);
      offer(mem, 2 + k, h);
    });
    kick.signal();
    await completed(mem, call, 6);
    const status = (k: number, dataLen: number): number => mem.getUint8(DATA + 0x2000 + k * 0x1000 + 0x100 + dataLen);
    assert.equal(status(0, 0), 0, 'FLUSH ok');
    assert.equal(status(1, 20), 0, 'GET_ID ok');
    assert.equal(Buffer.from(shm.bytes.subarray(DATA + 0x3100, DATA + 0x3100 + 16)).toString(), 'test-serial-0001');
    assert.equal(status(2, 1024), 1, 'read past the end: IOERR');
    assert.equal(status(3, 0), 2, 'unknown request: UNSUPP');
    assert.equal(disk.stats.flushes, 1);

    // GET_VRING_BASE stops the ring and answers the next avail index (6).
    const base = await fe.call(11, state(0, 0));
    assert.equal(base.readUInt32LE(0), 0);
    assert.equal(base.readUInt32LE(4), 6);

    // Bad input: a ring that does not exist, a region without its fd, a wrong-size payload.
    assert.notEqual(await fe.acked(8, state(7, QSIZE)), 0n, 'SET_VRING_NUM of vring 7: refused');
    assert.notEqual(await fe.acked(8, state(0, 0)), 0n, 'a ring of size 0: refused');
    const reg = Buffer.alloc(40);
    reg.writeBigUInt64LE(0x100000n, 8);
    reg.writeBigUInt64LE(0x1000n, 16);
    assert.notEqual(await fe.acked(37, reg), 0n, 'ADD_MEM_REG without an fd: refused');
    // and the connection still works
    assert.equal((await fe.call(17)).readBigUInt64LE(0), 1n);
    // A payload whose size does not match its request breaks the framing: the connection closes.
    fe.send(8, Buffer.alloc(3), [], VERSION | NEED_REPLY);
    assert.equal(await fe.recv(), null, 'closed on a 3-byte vring state');
  } finally {
    fe.close();
    be.close();
    disk.close();
    shm.close();
    kick.close();
    call.close();
    t.done();
  }
  await new Promise((r) => setTimeout(r, 50));
  assert.equal(openFds(), fdsBefore, 'no fd leaked');
});

test('vhost-user back-end: a second front-end after the first disconnects; payload too large closes', async () => {
  const t = scratch();
  const disk = VhostUserBlkDevice.open({ size: 1 << 20 });
  const be = VhostUserBackend.listen(t.sock, disk);
  try {
    for (let round = 0; round < 2; round++) {
      const fe = await RawFrontEnd.connect(t.sock);
      assert.equal((await fe.call(17)).readBigUInt64LE(0), 1n);
      fe.close();
      await new Promise((r) => setTimeout(r, 30));
    }
    const bad = await RawFrontEnd.connect(t.sock);
    bad.send(17, Buffer.alloc(0), [], 0x2);
    assert.equal(await bad.recv(), null, 'closed on a header with version 2');
    bad.close();
    await new Promise((r) => setTimeout(r, 30));
    const fe = await RawFrontEnd.connect(t.sock);
    const h = Buffer.alloc(12);
    h.writeUInt32LE(5, 0);
    h.writeUInt32LE(VERSION, 4);
    h.writeUInt32LE(1 << 30, 8); // a 1 GiB SET_MEM_TABLE
    fe.sock.write(h);
    assert.equal(await fe.recv(), null, 'closed, nothing allocated for the announced size');
    fe.close();
  } finally {
    be.close();
    disk.close();
    t.done();
  }
});
