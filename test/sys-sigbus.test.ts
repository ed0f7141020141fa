/**
 * SIGBUS containment: a peer that truncates the memfd we mapped must not kill us.
 * SharedMemory.map() guards the mapping (native/vdevkit.c: sigbus_handler): touching a
 * lost page replaces the mapping with zero pages and sets `faulted`.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { EventFd, SharedMemory, SysError, nativeAddon, type Fd } from '../src/sys/index.js';
import { VhostUserBackend } from '../src/vhost-user/backend.js';
import { VhostUserError } from '../src/vhost-user/errors.js';
import { VhostUserBlkDevice } from '../src/devices/vhost-user-blk.js';
import { RawFrontEnd, state, u64 } from './helpers/vhost-user-raw.js';
import { openFdCount, openFdsBackTo } from './helpers/sys.js';
import { VfioUserServer } from '../src/vfio-user/server.js';
import type { DeviceContext, VfioUserDeviceSpec } from '../src/vfio-user/device.js';
import { Bytes, RawVfioUserClient } from '../src/testing/index.js';

const PAGE = nativeAddon.PAGE_SIZE;

/** A memfd of `pages` pages filled with 0xA5, our own mapping of it, and a second (peer-style) mapping of a dup. */
function shared(pages: number, sealSize = false): { owner: SharedMemory; mapped: SharedMemory } {
  const owner = SharedMemory.create(pages * PAGE, { sealSize });
  owner.bytes.fill(0xa5);
  const mapped = SharedMemory.map(owner.fd.dup());
  return { owner, mapped };
}

test('a guarded mapping survives the file shrinking under it: zeros, faulted, process alive', () => {
  const { owner, mapped } = shared(4);
  try {
    assert.equal(mapped.guarded, true);
    assert.equal(mapped.faulted, false);
    assert.equal(mapped.bytes[3 * PAGE + 7], 0xa5);
    const before = SharedMemory.sigbusContained;
    nativeAddon.ftruncate(owner.fd.value, PAGE); // the "peer" keeps one page
    assert.equal(mapped.faulted, false, 'no access to a lost page yet');
    // Touch a lost page: without the guard this is SIGBUS and the test process dies.
    assert.equal(mapped.bytes[3 * PAGE + 7], 0);
    assert.equal(mapped.faulted, true);
    assert.equal(SharedMemory.sigbusContained, before + 1);
    // The whole mapping is now private zero pages: reads give zeros everywhere, writes land nowhere shared.
    assert.ok(mapped.bytes.every((b) => b === 0));
    mapped.bytes[0] = 0x11;
    assert.equal(mapped.bytes[0], 0x11);
    assert.equal(owner.bytes[0], 0xa5, 'the write did not reach the file');
    mapped.view.setUint32(2 * PAGE, 0xdeadbeef, true);
    assert.equal(mapped.view.getUint32(2 * PAGE, true), 0xdeadbeef);
  } finally {
    mapped.close();
    owner.close();
  }
  assert.equal(mapped.faulted, false, 'closed');
});

test('other guarded mappings are untouched when one faults', () => {
  const a = shared(2);
  const b = shared(2);
  try {
    nativeAddon.ftruncate(a.owner.fd.value, 0);
    assert.equal(a.mapped.bytes[PAGE], 0);
    assert.equal(a.mapped.faulted, true);
    assert.equal(b.mapped.faulted, false);
    assert.equal(b.mapped.bytes[PAGE], 0xa5);
    b.owner.bytes[PAGE] = 0x5a;
    assert.equal(b.mapped.bytes[PAGE], 0x5a, 'b still shares the file');
  } finally {
    for (const s of [a.mapped, a.owner, b.mapped, b.owner]) s.close();
  }
});

test('a truncation by another process is contained too', async () => {
  const { owner, mapped } = shared(8);
  try {
    const child = spawn('truncate', ['-s', String(PAGE), '/dev/fd/3'], { stdio: ['ignore', 'ignore', 'inherit', owner.fd.value] });
    const code = await new Promise<number | null>((resolve) => child.on('exit', (c) => resolve(c)));
    assert.equal(code, 0);
    assert.equal(owner.fd.stat().size, PAGE);
    assert.equal(mapped.bytes[5 * PAGE], 0);
    assert.equal(mapped.faulted, true);
  } finally {
    mapped.close();
    owner.close();
  }
});

test('F_SEAL_SHRINK: a sealed memfd cannot shrink, so there is nothing to contain', () => {
  const { owner, mapped } = shared(2, true);
  try {
    assert.throws(() => nativeAddon.ftruncate(owner.fd.value, 0), (e: unknown) => e instanceof SysError && e.code === 'EPERM');
    assert.equal(mapped.bytes[PAGE], 0xa5);
    assert.equal(mapped.faulted, false);
  } finally {
    mapped.close();
    owner.close();
  }
});

test('an unguarded mapping still dies of SIGBUS (the handler only contains registered mappings)', async () => {
  const shm = fileURLToPath(new URL('../src/sys/index.js', import.meta.url));
  const script = `
    import { SharedMemory, nativeAddon } from ${JSON.stringify(shm)};
    const own = SharedMemory.create(2 * nativeAddon.PAGE_SIZE);
    const m = SharedMemory.map(own.fd.dup(), { guard: false });
    console.log('guarded=' + m.guarded);
    nativeAddon.ftruncate(own.fd.value, 0);
    console.log('read ' + m.bytes[nativeAddon.PAGE_SIZE]);
  `;
  const child = spawn(process.execPath, ['--input-type=module', '-e', script], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr.resume();
  const [code, signal] = await new Promise<[number | null, NodeJS.Signals | null]>((resolve) => child.on('exit', (c, s) => resolve([c, s])));
  assert.match(out, /guarded=false/);
  assert.doesNotMatch(out, /read/);
  assert.equal(signal, 'SIGBUS', `exit code ${code}, signal ${signal}`);
});

/* ---- A vhost-user back-end whose front-end truncates the guest memory it shared. ---- */

const MEM = 1 << 20;
const UVA = 0x7f3400000000;
const RING = { desc: 0x1000, avail: 0x2000, used: 0x3000, size: 8 };
const BUF = 0x10000;

/** Raw front-end handshake (vhost-user spec, payloads by hand): features, SET_MEM_TABLE, one ring. */
async function startRing(fe: RawFrontEnd, mem: SharedMemory, kick: EventFd, call: EventFd): Promise<void> {
  const F_VERSION_1 = 1n << 32n;
  const F_PROTOCOL = 1n << 30n;
  const table = Buffer.alloc(8 + 32); // num_regions u32, padding u32, {gpa, size, uva, mmap_offset}
  table.writeUInt32LE(1, 0);
  table.writeBigUInt64LE(BigInt(MEM), 16);
  table.writeBigUInt64LE(BigInt(UVA), 24);
  const addr = Buffer.alloc(40); // index, flags, desc, used, avail, log
  addr.writeBigUInt64LE(BigInt(UVA + RING.desc), 8);
  addr.writeBigUInt64LE(BigInt(UVA + RING.used), 16);
  addr.writeBigUInt64LE(BigInt(UVA + RING.avail), 24);
  fe.send(2, u64(F_VERSION_1 | F_PROTOCOL)); // SET_FEATURES
  fe.send(16, u64(1n << 3n)); // SET_PROTOCOL_FEATURES: REPLY_ACK
  const steps: [number, Buffer, Fd[]][] = [
    [3, Buffer.alloc(0), []], // SET_OWNER
    [5, table, [mem.fd]], // SET_MEM_TABLE
    [8, state(0, RING.size), []], // SET_VRING_NUM
    [10, state(0, 0), []], // SET_VRING_BASE
    [9, addr, []], // SET_VRING_ADDR
    [13, u64(0), [call.fd]], // SET_VRING_CALL
    [12, u64(0), [kick.fd]], // SET_VRING_KICK
    [18, state(0, 1), []], // SET_VRING_ENABLE
  ];
  for (const [req, payload, fds] of steps) assert.equal(await fe.acked(req, payload, fds), 0n, `request ${req} acked`);
}

/** Offers a FLUSH (virtio-blk type 4: 16-byte header, 1-byte status) as request number n; waits for used.idx = n + 1. */
async function flush(mem: DataView, kick: EventFd, call: EventFd, n: number): Promise<number> {
  const head = (2 * n) % RING.size;
  const hdr = BUF + n * 0x100;
  mem.setUint32(hdr, 4, true);
  mem.setUint8(hdr + 0x80, 0xff);
  for (const [i, a, len, flags, next] of [[head, hdr, 16, 1, head + 1], [head + 1, hdr + 0x80, 1, 2, 0]] as const) {
    mem.setBigUint64(RING.desc + 16 * i, BigInt(a), true);
    mem.setUint32(RING.desc + 16 * i + 8, len, true);
    mem.setUint16(RING.desc + 16 * i + 12, flags, true);
    mem.setUint16(RING.desc + 16 * i + 14, next, true);
  }
  mem.setUint16(RING.avail + 4 + 2 * (n % RING.size), head, true);
  mem.setUint16(RING.avail + 2, n + 1, true);
  kick.signal();
  while (mem.getUint16(RING.used + 2, true) !== n + 1) await call.wait();
  return mem.getUint8(hdr + 0x80);
}

test('a vhost-user back-end whose front-end truncates its memory closes that session (MEMORY_FAULT) and keeps serving', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdk-sigbus-'));
  const before = openFdCount();
  const make = (name: string) => {
    fs.writeFileSync(path.join(dir, `${name}.img`), Buffer.alloc(64 * 1024));
    const disk = VhostUserBlkDevice.open({ file: path.join(dir, `${name}.img`) });
    const be = VhostUserBackend.listen(path.join(dir, `${name}.sock`), disk);
    return { disk, be, sock: path.join(dir, `${name}.sock`), mem: SharedMemory.create(MEM), kick: EventFd.create(), call: EventFd.create() };
  };
  const a = make('a');
  const b = make('b');
  const fes: RawFrontEnd[] = [];
  try {
    for (const x of [a, b]) {
      const fe = await RawFrontEnd.connect(x.sock);
      fes.push(fe);
      await startRing(fe, x.mem, x.kick, x.call);
      assert.equal(await flush(x.mem.view, x.kick, x.call, 0), 0, 'FLUSH ok before the truncation');
    }
    const disconnected = new Promise<Error | undefined>((resolve) => a.be.once('disconnect', (err) => resolve(err)));
    // A's front-end shrinks its guest memory to nothing and kicks: the back-end's ring access faults.
    nativeAddon.ftruncate(a.mem.fd.value, 0);
    a.kick.signal();
    const err = await disconnected;
    assert.ok(err instanceof VhostUserError, `typed error, got ${String(err)}`);
    assert.equal(err.code, 'MEMORY_FAULT');
    assert.equal(await fes[0]!.recv(), null, 'the front-end sees the connection close');
    assert.ok(SharedMemory.sigbusContained > 0);
    // B is untouched, and A takes the next front-end.
    assert.equal(await flush(b.mem.view, b.kick, b.call, 1), 0, 'the other back-end still serves');
    const again = await RawFrontEnd.connect(a.sock);
    fes.push(again);
    assert.ok((await again.call(1)).readBigUInt64LE(0) & (1n << 32n), 'GET_FEATURES on the next connection');
  } finally {
    for (const fe of fes) fe.close();
    for (const x of [a, b]) {
      x.be.close();
      x.disk.close();
      x.kick.close();
      x.call.close();
      x.mem.close();
    }
    fs.rmSync(dir, { recursive: true, force: true });
  }
  await openFdsBackTo(before, 'fds left after the sessions closed');
});

/* ---- A vfio-user server whose client truncates a DMA window's memfd. ---- */

test('a vfio-user server whose client truncates a mapped DMA window closes that session and keeps serving', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vfu-sigbus-'));
  const before = openFdCount();
  const logs: string[] = [];
  const contexts: DeviceContext[] = [];
  // BAR0 reads return the first bytes of the DMA window at IOVA 0x10000 (read in place, through a view).
  const device = (): VfioUserDeviceSpec => {
    let ctx: DeviceContext | null = null;
    return {
      pci: { vendorId: 0x1af4, deviceId: 0x10f0, classCode: 0xff0000 },
      regions: { 0: { size: 4096, read: (off, out) => out.set(ctx?.dma.view(0x10000 + 4 * PAGE - out.length, out.length) ?? new Uint8Array(out.length)), write: () => {} } },
      attach: (c) => {
        ctx = c;
        contexts.push(c);
      },
    };
  };
  const server = VfioUserServer.listen(path.join(dir, 's.sock'), { device, log: (l: string) => logs.push(l) });
  // DMA_MAP (flags READ|WRITE, offset 0, iova 0x10000, size 4 pages) and REGION_READ (offset 0, region 0, count 4), by hand.
  const map = new Bytes().u32(32).u32(3).u64(0).u64(0x10000).u64(4 * PAGE).build();
  const read = new Bytes().u64(0).u32(0).u32(4).build();
  const clients: RawVfioUserClient[] = [];
  const mems: SharedMemory[] = [];
  try {
    const open = async () => {
      const c = await RawVfioUserClient.connect(server.path);
      clients.push(c);
      assert.equal((await c.version()).isError, false);
      const mem = SharedMemory.create(4 * PAGE);
      mems.push(mem);
      mem.bytes.fill(0xa5);
      assert.equal((await c.call(2, map, { fds: [mem.fd] })).isError, false, 'DMA_MAP');
      const r = await c.call(9, read);
      assert.equal(r.isError, false);
      assert.deepEqual([...r.body.subarray(16, 20)], [0xa5, 0xa5, 0xa5, 0xa5], 'the window read in place');
      return { c, mem };
    };
    const a = await open();
    const b = await open();
    // A's client shrinks its window's file to one page; the next read of its last page faults (contained).
    nativeAddon.ftruncate(a.mem.fd.value, PAGE);
    await assert.rejects(a.c.call(9, read), /closed/, 'the session is closed, not answered with zeros');
    await a.c.whenClosed();
    assert.ok(logs.some((l) => /truncated a DMA window/.test(l)), logs.join('\n'));
    assert.equal(contexts[0]!.dma.faulted(), true);
    // B, in the same process, reads its memory as before; a new client is served.
    const rb = await b.c.call(9, read);
    assert.deepEqual([...rb.body.subarray(16, 20)], [0xa5, 0xa5, 0xa5, 0xa5]);
    assert.equal(contexts[1]!.dma.faulted(), false);
    await open();
  } finally {
    for (const c of clients) c.close();
    server.close();
    for (const m of mems) m.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
  await openFdsBackTo(before, 'fds left after the sessions closed');
});
