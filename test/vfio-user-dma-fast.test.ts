/**
 * The DMA message fast paths, with byte fixtures built by hand:
 * - the client answering DMA_READ / DMA_WRITE without decoding them
 *   (Connection fastRequest), and the usual path taking over for anything
 *   it does not accept, against a raw server written here;
 * - the server side's chunked transfers (runDmaTransfer over
 *   Connection.requestRaw and a ReplySink), against a raw peer.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { VfioUserClient } from '../src/vfio-user/client.js';
import { Connection, ConnectionError } from '../src/vfio-user/connection.js';
import { runDmaTransfer } from '../src/vfio-user/dma-transfer.js';
import { codecLimits } from '../src/vfio-user/messages.js';
import { Command } from '../src/vfio-user/constants.js';
import { EventFd, SharedMemory, UnixServer, UnixSocket, socketPair, socketPairFds } from '../src/sys/index.js';
import { Bytes } from '../src/testing/index.js';
import { until } from './helpers/sys.js';

const ENOENT = 2;
const EACCES = 13;
const EINVAL = 22;
const KiB = 1024;

const sock = (name: string): string => path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'vfd-')), name);

/** Cuts a byte stream into vfio-user messages by their msg_size (the test's own framing). */
class Frames {
  #buf = Buffer.alloc(0);
  readonly list: Buffer[] = [];
  #waiters: (() => void)[] = [];
  constructor(s: UnixSocket) {
    s.on('data', (chunk, fds) => {
      for (const f of fds) f.close();
      this.#buf = Buffer.concat([this.#buf, chunk]);
      while (this.#buf.length >= 16 && this.#buf.length >= this.#buf.readUInt32LE(4)) {
        const size = this.#buf.readUInt32LE(4);
        this.list.push(Buffer.from(this.#buf.subarray(0, size)));
        this.#buf = this.#buf.subarray(size);
      }
      for (const w of this.#waiters.splice(0)) w();
    });
  }
  /** Waits until `n` messages have arrived in all. */
  async count(n: number): Promise<void> {
    await until(() => this.list.length >= n, 5000, () => `${this.list.length} of ${n} messages`);
  }
}

/** header(id, cmd, size, flags, error) + body */
function msg(id: number, cmd: number, flags: number, body: Uint8Array, error = 0, size?: number): Buffer {
  return new Bytes()
    .u16(id)
    .u16(cmd)
    .u32(size ?? 16 + body.length)
    .u32(flags)
    .u32(error)
    .bytes(body)
    .build();
}

const access = (address: number, count: number): Buffer => new Bytes().u64(address).u64(count).build();

/**
 * A raw server that completes VERSION and acknowledges DMA_MAPs, then hands
 * the connection to the test; replies the client sends are collected.
 */
async function clientAgainstRawServer(t: TestContext, clientMaxXfer = 64 * KiB) {
  const server = UnixServer.listen(sock('raw.sock'));
  let peer: UnixSocket | null = null;
  let frames: Frames | null = null;
  server.on('connection', (s) => {
    peer = s;
    frames = new Frames(s);
    let handled = 0;
    s.on('data', () => {
      // Answer the client's own requests (VERSION, DMA_MAP); leave the rest to the test.
      for (; handled < frames!.list.length; handled++) {
        const m = frames!.list[handled]!;
        const id = m.readUInt16LE(0);
        const cmd = m.readUInt16LE(2);
        if ((m.readUInt32LE(8) & 0xf) !== 0) continue; // a reply to one of our requests: the test reads it
        if (cmd === Command.VERSION) {
          const json = '{"capabilities":{"max_data_xfer_size":65536}}';
          s.write(new Bytes().u16(id).u16(1).u32(16 + 4 + json.length + 1).u32(1).u32(0).u16(0).u16(0).ascii(json).u8(0).build());
        } else if (cmd === Command.DMA_MAP || cmd === Command.DMA_UNMAP) {
          s.write(msg(id, cmd, 1, new Uint8Array(0)));
        }
      }
    });
  });
  const client = await VfioUserClient.connect(server.path, { maxDataXferSize: clientMaxXfer });
  const a = SharedMemory.create(64 * KiB);
  const b = SharedMemory.create(64 * KiB);
  const ro = SharedMemory.create(16 * KiB);
  for (let i = 0; i < a.size; i++) a.bytes[i] = (i * 7 + 1) & 0xff;
  for (let i = 0; i < b.size; i++) b.bytes[i] = (i * 5 + 3) & 0xff;
  ro.bytes.fill(0x5a);
  // Two adjacent windows (0x100000 and 0x110000) and a read-only one, served by messages (no fds).
  await client.dmaMap({ iova: 0x100000, size: a.size, memory: a, passFd: false });
  await client.dmaMap({ iova: 0x110000, size: b.size, memory: b, passFd: false });
  await client.dmaMap({ iova: 0x200000, size: ro.size, memory: ro, passFd: false, prot: 1 });
  t.after(() => {
    client.close();
    server.close();
    a.close();
    b.close();
    ro.close();
  });
  await until(() => peer !== null);
  const p = peer as unknown as UnixSocket;
  const f = frames as unknown as Frames;
  const seen = f.list.length;
  /** Sends raw bytes and resolves with the next message the client sends back. */
  let next = seen;
  const ask = async (bytes: Buffer): Promise<Buffer> => {
    p.write(bytes);
    await f.count(next + 1);
    return f.list[next++]!;
  };
  return { client, a, b, ro, peer: p, frames: f, ask, skip: () => next++, at: () => next };
}

const errorReply = (id: number, cmd: number, errno: number): number[] => [...msg(id, cmd, 0x21, new Uint8Array(0), errno)];

test('client fast path: DMA_READ inside one window is answered byte for byte from our memory', { timeout: 20_000 }, async (t) => {
  const env = await clientAgainstRawServer(t);
  const r = await env.ask(msg(0x77, Command.DMA_READ, 0, access(0x100010, 4096)));
  const want = Buffer.concat([msg(0x77, Command.DMA_READ, 1, access(0x100010, 4096), 0, 32 + 4096).subarray(0, 32), env.a.bytes.subarray(0x10, 0x10 + 4096)]);
  assert.deepEqual([...r], [...want]);
  // A small read, and one ending exactly at the window's end.
  const r2 = await env.ask(msg(0x78, Command.DMA_READ, 0, access(0x10fff0, 16)));
  assert.deepEqual([...r2.subarray(32)], [...env.a.bytes.subarray(0xfff0)]);
  assert.equal(r2.readUInt32LE(4), 48);
});

test('client: a DMA_READ spanning two windows is served by the usual path, gathered from both', { timeout: 20_000 }, async (t) => {
  const env = await clientAgainstRawServer(t);
  const r = await env.ask(msg(5, Command.DMA_READ, 0, access(0x10ff00, 512)));
  assert.equal(r.readUInt32LE(8), 1, 'a reply');
  assert.deepEqual([...r.subarray(32)], [...env.a.bytes.subarray(0xff00), ...env.b.bytes.subarray(0, 256)]);
});

test('client: DMA_READs the fast path refuses get the usual path’s errno replies', { timeout: 20_000 }, async (t) => {
  const env = await clientAgainstRawServer(t);
  // Outside every window: ENOENT.
  assert.deepEqual([...(await env.ask(msg(1, Command.DMA_READ, 0, access(0x300000, 64))))], errorReply(1, Command.DMA_READ, ENOENT));
  // Past the end of the last window: ENOENT.
  assert.deepEqual([...(await env.ask(msg(2, Command.DMA_READ, 0, access(0x11ffff, 2))))], errorReply(2, Command.DMA_READ, ENOENT));
  // The error field set in a command (reserved): EINVAL.
  assert.deepEqual([...(await env.ask(msg(3, Command.DMA_READ, 0, access(0x100000, 64), 9)))], errorReply(3, Command.DMA_READ, EINVAL));
  // An undefined flag bit: EINVAL.
  assert.deepEqual([...(await env.ask(msg(4, Command.DMA_READ, 0x100, access(0x100000, 64))))], errorReply(4, Command.DMA_READ, EINVAL));
  // More than our max_data_xfer_size: EINVAL.
  assert.deepEqual([...(await env.ask(msg(6, Command.DMA_READ, 0, access(0x100000, 64 * KiB + 1))))], errorReply(6, Command.DMA_READ, EINVAL));
  // A body longer than address + count: EINVAL.
  const long = Buffer.concat([access(0x100000, 64), Buffer.alloc(8)]);
  assert.deepEqual([...(await env.ask(msg(7, Command.DMA_READ, 0, long)))], errorReply(7, Command.DMA_READ, EINVAL));
  // An address that is not a safe integer: refused, not read from somewhere else.
  const huge = new Bytes().u64(0xffff_ffff_ffff_f000n).u64(16).build();
  const r = await env.ask(msg(8, Command.DMA_READ, 0, huge));
  assert.equal(r.readUInt32LE(8), 0x21, 'an error reply');
  // No_reply: served without a reply; the next request's reply is the next message.
  const quiet = msg(9, Command.DMA_READ, 0x10, access(0x100000, 16));
  const r10 = await env.ask(Buffer.concat([quiet, msg(10, Command.DMA_READ, 0, access(0x100000, 16))]));
  assert.equal(r10.readUInt16LE(0), 10);
  assert.deepEqual([...r10.subarray(32)], [...env.a.bytes.subarray(0, 16)]);
});

test('client fast path: a placed DMA_WRITE lands in our memory and gets a 32-byte reply', { timeout: 20_000 }, async (t) => {
  const env = await clientAgainstRawServer(t);
  const data = Buffer.alloc(8 * KiB);
  for (let i = 0; i < data.length; i++) data[i] = (i * 11 + 9) & 0xff;
  const r = await env.ask(msg(0x1234, Command.DMA_WRITE, 0, Buffer.concat([access(0x101000, data.length), data])));
  assert.deepEqual([...r], [...msg(0x1234, Command.DMA_WRITE, 1, access(0x101000, data.length))]);
  assert.deepEqual([...env.a.bytes.subarray(0x1000, 0x1000 + data.length)], [...data]);
  // A small DMA_WRITE (not placed): the usual path, the same reply.
  const r2 = await env.ask(msg(0x1235, Command.DMA_WRITE, 0, Buffer.concat([access(0x110000, 3), Buffer.from([1, 2, 3])])));
  assert.deepEqual([...r2], [...msg(0x1235, Command.DMA_WRITE, 1, access(0x110000, 3))]);
  assert.deepEqual([...env.b.bytes.subarray(0, 3)], [1, 2, 3]);
});

test('client: refused DMA_WRITEs leave our memory untouched', { timeout: 20_000 }, async (t) => {
  const env = await clientAgainstRawServer(t);
  const data = Buffer.alloc(8 * KiB, 0xee);
  const before = Buffer.from(env.ro.bytes);
  // A read-only window: EACCES.
  const r = await env.ask(msg(1, Command.DMA_WRITE, 0, Buffer.concat([access(0x200000, 4096), data.subarray(0, 4096)])));
  assert.deepEqual([...r], errorReply(1, Command.DMA_WRITE, EACCES));
  assert.ok(Buffer.from(env.ro.bytes).equals(before));
  // The error field set: EINVAL, and the data was not placed into the window first.
  const aBefore = Buffer.from(env.a.bytes);
  const r2 = await env.ask(msg(2, Command.DMA_WRITE, 0, Buffer.concat([access(0x100000, data.length), data]), 5));
  assert.deepEqual([...r2], errorReply(2, Command.DMA_WRITE, EINVAL));
  // count larger than the data that follows it: EINVAL.
  const r3 = await env.ask(msg(3, Command.DMA_WRITE, 0, Buffer.concat([access(0x100000, data.length + 16), data])));
  assert.deepEqual([...r3], errorReply(3, Command.DMA_WRITE, EINVAL));
  assert.ok(Buffer.from(env.a.bytes).equals(aBefore));
});

/* ------------------------------------------------------------------ */
/* The server side: runDmaTransfer over requestRaw                     */

function transferPair(t: TestContext, timeoutMs = 5000) {
  const [ours, theirs] = socketPair();
  const conn = new Connection(ours, { limits: codecLimits(64 * KiB), onRequest: () => {}, timeoutMs });
  const frames = new Frames(theirs);
  t.after(() => {
    conn.close();
    theirs.destroy();
  });
  return { conn, peer: theirs, frames };
}

/** Checks a DMA request's bytes against the spec's layout and returns its id, address and count. */
function parseDmaRequest(m: Buffer, cmd: number): { id: number; address: number; count: number; data: Buffer } {
  assert.equal(m.readUInt16LE(2), cmd);
  assert.equal(m.readUInt32LE(8), 0, 'flags: a command, reply wanted');
  assert.equal(m.readUInt32LE(12), 0, 'error field: 0');
  const address = Number(m.readBigUInt64LE(16));
  const count = Number(m.readBigUInt64LE(24));
  assert.equal(m.readUInt32LE(4), 32 + (cmd === Command.DMA_WRITE ? count : 0), 'msg_size');
  return { id: m.readUInt16LE(0), address, count, data: m.subarray(32) };
}

const fill = (n: number, seed: number): Buffer => {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = (i * 13 + seed) & 0xff;
  return b;
};

test('runDmaTransfer DMA_READ: requests with the spec layout, all in flight, replies received into their chunks', { timeout: 20_000 }, async (t) => {
  const { conn, peer, frames } = transferPair(t);
  const dest = Buffer.alloc(5 * 8 * KiB + 100);
  const chunks = [0, 1, 2, 3, 4].map((i) => ({ address: 0x40000 + i * 8 * KiB, bytes: dest.subarray(i * 8 * KiB, (i + 1) * 8 * KiB) }));
  chunks.push({ address: 0x90000, bytes: dest.subarray(5 * 8 * KiB) }); // a small one: its reply comes whole
  const done = runDmaTransfer(conn, Command.DMA_READ, chunks, 8 * KiB);
  await frames.count(6); // every chunk's request is out before any reply
  for (const m of frames.list) {
    const r = parseDmaRequest(m, Command.DMA_READ);
    peer.write(msg(r.id, Command.DMA_READ, 1, Buffer.concat([access(r.address, r.count), fill(r.count, r.address >> 12)])));
  }
  await done;
  for (const c of chunks) assert.ok(Buffer.from(c.bytes).equals(fill(c.bytes.length, c.address >> 12)), `chunk at 0x${c.address.toString(16)}`);
  assert.equal(conn.pendingCount, 0);
});

test('runDmaTransfer: a window of 2 MiB in flight, refilled by halves', { timeout: 20_000 }, async (t) => {
  const { conn, peer, frames } = transferPair(t);
  const chunk = 64 * KiB;
  const dest = Buffer.alloc(80 * chunk);
  const chunks = Array.from({ length: 80 }, (_, i) => ({ address: i * chunk, bytes: dest.subarray(i * chunk, (i + 1) * chunk) }));
  const done = runDmaTransfer(conn, Command.DMA_READ, chunks, chunk);
  await frames.count(32);
  await new Promise((r) => setTimeout(r, 20));
  assert.equal(frames.list.length, 32, '2 MiB of 64 KiB requests, no more');
  const answer = (from: number, to: number): void => {
    for (const m of frames.list.slice(from, to)) {
      const r = parseDmaRequest(m, Command.DMA_READ);
      peer.write(msg(r.id, Command.DMA_READ, 1, Buffer.concat([access(r.address, r.count), Buffer.alloc(r.count, r.address / chunk)])));
    }
  };
  answer(0, 15);
  await new Promise((r) => setTimeout(r, 20));
  assert.equal(frames.list.length, 32, 'not refilled above half the window');
  answer(15, 16);
  await frames.count(48); // 16 in flight: refilled to 32 at once
  answer(16, 48);
  await frames.count(80);
  answer(48, 80);
  await done;
  assert.ok(chunks.every((c) => c.bytes.every((x) => x === (c.address / chunk) % 256)));
});

test('runDmaTransfer: a bad reply fails the transfer after the chunks in flight settle; no request after it', { timeout: 20_000 }, async (t) => {
  const { conn, peer, frames } = transferPair(t);
  const dest = Buffer.alloc(4 * 8 * KiB);
  const chunks = [0, 1, 2, 3].map((i) => ({ address: i * 8 * KiB, bytes: dest.subarray(i * 8 * KiB, (i + 1) * 8 * KiB) }));
  let settled = false;
  const done = runDmaTransfer(conn, Command.DMA_READ, chunks, 8 * KiB).finally(() => (settled = true));
  await frames.count(4);
  const reqs = frames.list.map((m) => parseDmaRequest(m, Command.DMA_READ));
  // The second reply names another address.
  peer.write(msg(reqs[0]!.id, Command.DMA_READ, 1, Buffer.concat([access(reqs[0]!.address, 8 * KiB), Buffer.alloc(8 * KiB)])));
  peer.write(msg(reqs[1]!.id, Command.DMA_READ, 1, Buffer.concat([access(0x999000, 8 * KiB), Buffer.alloc(8 * KiB)])));
  await new Promise((r) => setTimeout(r, 20));
  assert.equal(settled, false, 'chunks 2 and 3 are still in flight');
  peer.write(msg(reqs[2]!.id, Command.DMA_READ, 0x21, new Uint8Array(0), 5)); // and an error reply
  peer.write(msg(reqs[3]!.id, Command.DMA_READ, 1, Buffer.concat([access(reqs[3]!.address, 8 * KiB), Buffer.alloc(8 * KiB)])));
  await assert.rejects(done, (e: unknown) => e instanceof ConnectionError && e.code === 'VFU_BAD_REPLY' && /address or count/.test(e.message));
  assert.equal(frames.list.length, 4);
});

test('runDmaTransfer: error replies, replies to another command, and short data fail it with clear errors', { timeout: 20_000 }, async (t) => {
  const { conn, peer, frames } = transferPair(t);
  const one = async (answer: (id: number, address: number) => Buffer): Promise<unknown> => {
    const before = frames.list.length;
    const p = runDmaTransfer(conn, Command.DMA_READ, [{ address: 0x1000, bytes: Buffer.alloc(16) }], 16).then(
      () => null,
      (e: unknown) => e,
    );
    await frames.count(before + 1);
    const r = parseDmaRequest(frames.list[before]!, Command.DMA_READ);
    peer.write(answer(r.id, r.address));
    return p;
  };
  const e1 = (await one((id) => msg(id, Command.DMA_READ, 0x21, new Uint8Array(0), EACCES))) as ConnectionError;
  assert.ok(e1 instanceof ConnectionError && e1.code === 'VFU_PEER_ERROR' && e1.errno === EACCES, String(e1));
  const e2 = (await one((id, a) => msg(id, Command.DMA_WRITE, 1, access(a, 16)))) as ConnectionError;
  assert.ok(e2 instanceof ConnectionError && e2.code === 'VFU_BAD_REPLY' && /says command 12/.test(e2.message), String(e2));
  const e3 = (await one((id, a) => msg(id, Command.DMA_READ, 1, Buffer.concat([access(a, 16), Buffer.alloc(8)])))) as ConnectionError;
  assert.ok(e3 instanceof ConnectionError && e3.code === 'VFU_BAD_REPLY', String(e3));
  const e4 = (await one((id, a) => msg(id, Command.DMA_READ, 0x11, Buffer.concat([access(a, 16), Buffer.alloc(16)])))) as ConnectionError;
  assert.ok(e4 instanceof ConnectionError && e4.code === 'VFU_BAD_REPLY' && /flags/.test(e4.message), String(e4));
  // The connection is still usable after all of them.
  const fine = await one((id, a) => msg(id, Command.DMA_READ, 1, Buffer.concat([access(a, 16), Buffer.alloc(16, 1)])));
  assert.equal(fine, null);
});

test('runDmaTransfer DMA_WRITE: the data follows each header; reply bodies of 0, 12 and 16 bytes accepted, 8 refused', { timeout: 20_000 }, async (t) => {
  const { conn, peer, frames } = transferPair(t);
  const src = fill(3 * 8 * KiB, 3);
  const chunks = [0, 1, 2].map((i) => ({ address: 0x8000 + i * 8 * KiB, bytes: src.subarray(i * 8 * KiB, (i + 1) * 8 * KiB) }));
  const done = runDmaTransfer(conn, Command.DMA_WRITE, chunks, 8 * KiB);
  await frames.count(3);
  const bodies = [new Uint8Array(0), new Bytes().u64(0).u32(0).build(), access(0, 0)];
  frames.list.forEach((m, i) => {
    const r = parseDmaRequest(m, Command.DMA_WRITE);
    assert.equal(r.address, chunks[i]!.address);
    assert.ok(r.data.equals(Buffer.from(chunks[i]!.bytes)));
    peer.write(msg(r.id, Command.DMA_WRITE, 1, bodies[i]!));
  });
  await done;
  const bad = runDmaTransfer(conn, Command.DMA_WRITE, [{ address: 0, bytes: Buffer.alloc(4) }], 4);
  await frames.count(4);
  peer.write(msg(frames.list[3]!.readUInt16LE(0), Command.DMA_WRITE, 1, Buffer.alloc(8)));
  await assert.rejects(bad, (e: unknown) => e instanceof ConnectionError && e.code === 'VFU_BAD_REPLY' && /8 bytes/.test(e.message));
});

test('runDmaTransfer: beforeSend throwing stops new chunks; the sent ones settle first', { timeout: 20_000 }, async (t) => {
  const { conn, peer, frames } = transferPair(t);
  const chunks = [0, 1, 2, 3].map((i) => ({ address: i * 16, bytes: Buffer.alloc(16) }));
  const gone = new Error('window unmapped');
  const done = runDmaTransfer(conn, Command.DMA_READ, chunks, 16, (i) => {
    if (i === 2) throw gone;
  });
  await frames.count(2);
  await new Promise((r) => setTimeout(r, 20));
  assert.equal(frames.list.length, 2);
  for (const m of frames.list) {
    const r = parseDmaRequest(m, Command.DMA_READ);
    peer.write(msg(r.id, Command.DMA_READ, 1, Buffer.concat([access(r.address, 16), Buffer.alloc(16, 7)])));
  }
  await assert.rejects(done, (e) => e === gone);
  assert.ok(chunks[0]!.bytes.every((x) => x === 7) && chunks[1]!.bytes.every((x) => x === 7));
  assert.equal(conn.pendingCount, 0);
});

test('runDmaTransfer: a silent peer times out, a closing one fails every chunk; a closed connection rejects at once', { timeout: 20_000 }, async (t) => {
  const quiet = transferPair(t, 100);
  const p1 = runDmaTransfer(quiet.conn, Command.DMA_READ, [{ address: 0, bytes: Buffer.alloc(8) }], 8);
  await assert.rejects(p1, (e: unknown) => e instanceof ConnectionError && e.code === 'VFU_TIMEOUT');
  const dying = transferPair(t);
  const p2 = runDmaTransfer(dying.conn, Command.DMA_WRITE, [0, 1, 2].map((i) => ({ address: i, bytes: Buffer.alloc(8 * KiB) })), 8 * KiB);
  await dying.frames.count(3);
  dying.peer.destroy();
  await assert.rejects(p2, (e: unknown) => e instanceof ConnectionError && e.code === 'VFU_CLOSED');
  assert.equal(dying.conn.pendingCount, 0);
  await assert.rejects(
    runDmaTransfer(dying.conn, Command.DMA_READ, [{ address: 0, bytes: Buffer.alloc(8) }], 8),
    (e: unknown) => e instanceof ConnectionError && e.code === 'VFU_CLOSED',
  );
  // Nothing to do: resolves without a request.
  await runDmaTransfer(dying.conn, Command.DMA_READ, [], 8);
});

/* ------------------------------------------------------------------ */
/* Review findings (each failed before its fix)                        */

test('runDmaTransfer: a destination that goes away mid-transfer fails the transfer; the process does not crash', { timeout: 20_000 }, async (t) => {
  const { conn, peer, frames } = transferPair(t);
  let uncaught: unknown = null;
  const onUncaught = (e: unknown): void => {
    uncaught = e;
  };
  process.on('uncaughtException', onUncaught);
  t.after(() => process.off('uncaughtException', onUncaught));
  for (const variant of ['count 0', 'full data']) {
    const mem = SharedMemory.create(4096);
    const before = frames.list.length;
    const p = runDmaTransfer(conn, Command.DMA_READ, [{ address: 0x5000, bytes: mem.bytes.subarray(0, 64) }], 64);
    await frames.count(before + 1);
    const r = parseDmaRequest(frames.list[before]!, Command.DMA_READ);
    mem.close(); // the view is detached now (length 0), as after a DMA_UNMAP of that window
    const reply =
      variant === 'count 0'
        ? msg(r.id, Command.DMA_READ, 1, access(r.address, 0))
        : msg(r.id, Command.DMA_READ, 1, Buffer.concat([access(r.address, 64), Buffer.alloc(64, 1)]));
    peer.write(reply);
    await assert.rejects(p, (e: unknown) => e instanceof ConnectionError && e.code === 'VFU_BAD_REPLY', variant);
  }
  assert.equal(uncaught, null);
  assert.equal(conn.pendingCount, 0);
});

test('runDmaTransfer DMA_WRITE: a reply whose u64 fields are out of range is refused, as the codec refuses it', { timeout: 20_000 }, async (t) => {
  const { conn, peer, frames } = transferPair(t);
  for (const body of [Buffer.alloc(16, 0xff), new Bytes().u64(0xffff_ffff_ffff_ffffn).u32(1).build(), new Bytes().u64(0).u64(2n ** 60n).build()]) {
    const before = frames.list.length;
    const p = runDmaTransfer(conn, Command.DMA_WRITE, [{ address: 0, bytes: Buffer.alloc(4) }], 4);
    await frames.count(before + 1);
    peer.write(msg(frames.list[before]!.readUInt16LE(0), Command.DMA_WRITE, 1, body));
    await assert.rejects(p, (e: unknown) => e instanceof ConnectionError && e.code === 'VFU_BAD_REPLY' && /out of range/.test(e.message));
  }
});

test('client: DMA requests whose address + count passes 2^53 - 1 are refused, and nothing is written', { timeout: 20_000 }, async (t) => {
  const env = await clientAgainstRawServer(t);
  const top = SharedMemory.create(8 * KiB);
  t.after(() => top.close());
  const base = 2 ** 53 - 8 * KiB; // a window ending exactly at 2^53, which DMA_MAP allows
  await env.client.dmaMap({ iova: base, size: top.size, memory: top, passFd: false });
  env.skip(); // the DMA_MAP request the raw server answered
  const read = await env.ask(msg(0x42, Command.DMA_READ, 0, access(base + 4 * KiB, 4 * KiB)));
  assert.equal(read.readUInt32LE(8), 0x21, 'an error reply');
  assert.equal(read.readUInt32LE(4), 16);
  const data = Buffer.alloc(4 * KiB, 0xab);
  const write = await env.ask(msg(0x43, Command.DMA_WRITE, 0, Buffer.concat([access(base + 4 * KiB, data.length), data])));
  assert.equal(write.readUInt32LE(8), 0x21, 'an error reply');
  assert.ok(top.bytes.every((x) => x === 0), 'the window was not written');
  // Inside it, below 2^53 - 1, both work.
  const ok = await env.ask(msg(0x44, Command.DMA_READ, 0, access(base, 4 * KiB)));
  assert.equal(ok.readUInt32LE(8), 1);
});

test('client: a DMA_WRITE whose window is unmapped while its data streams in gets ENOENT, not success', { timeout: 20_000 }, async (t) => {
  const env = await clientAgainstRawServer(t);
  const data = Buffer.alloc(8 * KiB, 0x3c);
  const whole = msg(0x51, Command.DMA_WRITE, 0, Buffer.concat([access(0x101000, data.length), data]));
  env.peer.write(whole.subarray(0, 132)); // the prefix and some data: placed into the window
  await new Promise((r) => setTimeout(r, 30));
  env.client.dma.unmap(0x100000, 64 * KiB); // as a DMA_UNMAP reply on the main socket would, with a twin socket
  env.peer.write(whole.subarray(132));
  await env.frames.count(env.at() + 1);
  const r = env.frames.list[env.at()]!;
  env.skip();
  assert.deepEqual([...r], errorReply(0x51, Command.DMA_WRITE, ENOENT));
});

test('client: a server that sends DMA_READs and does not read the replies cannot make our queue grow without bound', { timeout: 20_000 }, async (t) => {
  const env = await clientAgainstRawServer(t);
  const n = 600; // 600 x 64 KiB = 37.5 MiB of replies
  env.peer.pause(); // not reading
  const reqs = Buffer.concat(Array.from({ length: n }, (_, i) => msg(0x1000 + i, Command.DMA_READ, 0, access(0x100000, 64 * KiB))));
  env.peer.write(reqs);
  let most = 0;
  const sock = env.client.conn.socket;
  const started = Date.now();
  while (Date.now() - started < 300) {
    most = Math.max(most, sock.writableLength);
    await new Promise((r) => setTimeout(r, 5));
  }
  assert.ok(most > 0, 'replies are waiting');
  assert.ok(most <= (16 << 20) + 64 * KiB + 32, `at most 16 MiB and one reply queued, saw ${most}`);
  // A DMA_WRITE meanwhile makes the client copy what is queued: bounded by the same limit.
  env.peer.write(msg(0x2000, Command.DMA_WRITE, 0, Buffer.concat([access(0x110000, 4), Buffer.from([9, 9, 9, 9])])));
  env.peer.resume();
  await env.frames.count(env.at() + n + 1);
  const replies = env.frames.list.slice(env.at(), env.at() + n + 1);
  assert.deepEqual(
    replies.map((m) => m.readUInt16LE(0)),
    [...Array.from({ length: n }, (_, i) => 0x1000 + i), 0x2000],
    'every reply, in order',
  );
  assert.ok(replies.slice(0, n).every((m) => m.readUInt32LE(8) === 1 && m.length === 32 + 64 * KiB));
  assert.deepEqual([...env.b.bytes.subarray(0, 4)], [9, 9, 9, 9]);
});

/* ------------------------------------------------------------------ */
/* With a twin socket (second review)                                  */

/** A raw server that offers a twin socket; the test drives the twin's peer end. */
async function clientWithTwin(t: TestContext) {
  const MiB = 1 << 20;
  const server = UnixServer.listen(sock('twin.sock'));
  let twin: UnixSocket | null = null;
  let twinFrames: Frames | null = null;
  server.on('connection', (s) => {
    const frames = new Frames(s);
    let handled = 0;
    s.on('data', () => {
      for (; handled < frames.list.length; handled++) {
        const m = frames.list[handled]!;
        const id = m.readUInt16LE(0);
        const cmd = m.readUInt16LE(2);
        if ((m.readUInt32LE(8) & 0xf) !== 0) continue;
        if (cmd === Command.VERSION) {
          const [mine, theirs] = socketPairFds();
          twin = new UnixSocket(mine);
          twinFrames = new Frames(twin);
          const json = `{"capabilities":{"max_data_xfer_size":${MiB},"twin_socket":{"supported":true,"fd_index":0}}}`;
          s.write(new Bytes().u16(id).u16(1).u32(16 + 4 + json.length + 1).u32(1).u32(0).u16(0).u16(0).ascii(json).u8(0).build(), [theirs]);
          theirs.close();
        } else if (cmd === Command.DMA_MAP) {
          s.write(msg(id, cmd, 1, new Uint8Array(0)));
        } else if (cmd === Command.DMA_UNMAP) {
          s.write(msg(id, cmd, 1, m.subarray(16))); // its reply echoes the request's body
        }
      }
    });
  });
  const client = await VfioUserClient.connect(server.path, { maxDataXferSize: MiB, twinSocket: true });
  const mem = SharedMemory.create(MiB);
  mem.bytes.fill(0xaa);
  await client.dmaMap({ iova: 0x100000, size: MiB, memory: mem, passFd: false });
  t.after(() => {
    client.close();
    server.close();
    mem.close();
    twin?.destroy();
  });
  return { client, mem, twin: twin! as UnixSocket, twinFrames: twinFrames! as Frames };
}

test('twin socket: a DMA_WRITE streaming in when its window is unmapped stops landing there and is refused', { timeout: 20_000 }, async (t) => {
  const { client, mem, twin, twinFrames } = await clientWithTwin(t);
  const data = Buffer.alloc(512 * KiB, 0xbb);
  const whole = msg(7, Command.DMA_WRITE, 0, Buffer.concat([access(0x100000, data.length), data]));
  twin.write(whole.subarray(0, 32 + 64 * KiB));
  await until(() => mem.bytes[64 * KiB - 1] === 0xbb, 5000, () => 'the first 64 KiB placed');
  await client.dmaUnmap(0x100000, 1 << 20); // acknowledged on the main socket, ahead of the twin's data
  mem.bytes[100 * KiB] = 0x11; // the application's memory again
  twin.write(whole.subarray(32 + 64 * KiB));
  await twinFrames.count(1);
  const r = twinFrames.list[0]!;
  assert.equal(r.readUInt32LE(8), 0x21, 'an error reply');
  assert.equal(mem.bytes[100 * KiB], 0x11, 'nothing landed after the unmap');
  assert.equal(mem.bytes[511 * KiB], 0xaa);
});

test('twin socket: DMA_READ replies still queued when their window is unmapped carry the data from before', { timeout: 20_000 }, async (t) => {
  const { client, mem, twin, twinFrames } = await clientWithTwin(t);
  twin.pause(); // the server does not read its replies for now
  const n = 24;
  for (let i = 0; i < n; i++) twin.write(msg(i, Command.DMA_READ, 0, access(0x100000, 1 << 20)));
  await until(() => client.conn.pendingCount === 0 && twin.writableLength === 0);
  await new Promise((r) => setTimeout(r, 50));
  await client.dmaUnmap(0x100000, 1 << 20);
  mem.bytes.fill(0x11); // reused after dmaUnmap resolved
  twin.resume();
  await twinFrames.count(n);
  // Served before the unmap: the data as it was then. Served after it (commands wait while 16 MiB
  // of replies are unread): ENOENT. Never bytes written after dmaUnmap() resolved.
  const served = twinFrames.list.filter((m) => m.readUInt32LE(8) === 1);
  const refused = twinFrames.list.filter((m) => m.readUInt32LE(8) === 0x21);
  assert.equal(served.length + refused.length, n);
  assert.ok(served.length > 0);
  assert.ok(refused.every((m) => m.readUInt32LE(12) === ENOENT));
  const stale = served.filter((m) => m.length !== 32 + (1 << 20) || m.subarray(32).some((x) => x !== 0xaa));
  assert.equal(stale.length, 0, `${stale.length} of ${served.length} replies carry bytes written after the unmap`);
});

test('twin socket: when the twin closes, the client closes (its DMA channel is gone) and says why', { timeout: 20_000 }, async (t) => {
  const { client, twin } = await clientWithTwin(t);
  const closed = new Promise<Error | undefined>((r) => client.once('close', r));
  twin.destroy();
  const err = await closed;
  assert.ok(client.conn.closed);
  assert.ok(err === undefined || /twin/.test(err.message), String(err));
  await assert.rejects(client.regionRead(0, 0, 4), (e: unknown) => e instanceof ConnectionError && e.code === 'VFU_CLOSED');
});

test('a handler reply the socket refuses (more fds than one message carries) becomes an errno reply, not a crash', { timeout: 20_000 }, async (t) => {
  const [ours, theirs] = socketPair();
  const e = EventFd.create();
  const errors: Error[] = [];
  const conn = new Connection(ours, {
    limits: codecLimits(64 * KiB),
    // Async, so a throw would surface as an unhandled rejection; 300 fds cannot go in one sendmsg.
    onRequest: async () => ({ body: null, fds: Array.from({ length: 300 }, () => e.fd) }),
  });
  conn.on('error', (err) => errors.push(err));
  const frames = new Frames(theirs);
  t.after(() => {
    conn.close();
    theirs.destroy();
    e.close();
  });
  theirs.write(msg(0x33, Command.DEVICE_RESET, 0, new Uint8Array(0)));
  theirs.write(msg(0x34, Command.DEVICE_RESET, 0, new Uint8Array(0)));
  await frames.count(2);
  assert.deepEqual([...frames.list[0]!], errorReply(0x33, Command.DEVICE_RESET, EINVAL));
  assert.deepEqual([...frames.list[1]!], errorReply(0x34, Command.DEVICE_RESET, EINVAL), 'the connection goes on');
  assert.equal(errors.length, 2);
  assert.ok(!conn.closed);
});
