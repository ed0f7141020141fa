/**
 * Random and mutated front-end messages at the vhost-user back-end (a null
 * vhost-user-blk disk): whatever arrives, each message with NEED_REPLY is
 * answered or the connection is closed (never a hang), the process stays up,
 * no fd leaks, and a new front-end is served afterwards. (It found two fd
 * leaks: fds attached to requests that take none, and a SET_INFLIGHT_FD whose
 * queue size the layout refuses.)
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { EventFd, SharedMemory, type Fd } from '../src/sys/index.js';
import { VhostUserBackend } from '../src/vhost-user/backend.js';
import { VhostUserBlkDevice } from '../src/devices/vhost-user-blk.js';
import { NEED_REPLY, RawFrontEnd, u64, VERSION } from './helpers/vhost-user-raw.js';
import { openFdCount, openFdsBackTo } from './helpers/sys.js';

/** xorshift32: a fixed seed makes every run the same. */
function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x / 0x1_0000_0000;
  };
}

/** Valid payloads of each request, to mutate (layouts from the spec). */
function validPayload(req: number, r: () => number): Buffer {
  const b = (n: number): Buffer => Buffer.alloc(n);
  switch (req) {
    case 2:
    case 16:
    case 39:
    case 20:
      return u64(BigInt(Math.floor(r() * 2 ** 32)) | (1n << 32n));
    case 5: {
      const n = Math.floor(r() * 3);
      const p = b(8 + 32 * n);
      p.writeUInt32LE(n, 0);
      for (let i = 0; i < n; i++) {
        p.writeBigUInt64LE(BigInt(i * 0x100000), 8 + 32 * i);
        p.writeBigUInt64LE(BigInt(r() < 0.5 ? 0x100000 : Math.floor(r() * 2 ** 40)), 16 + 32 * i);
        p.writeBigUInt64LE(BigInt(0x7f0000000000 + i * 0x100000), 24 + 32 * i);
      }
      return p;
    }
    case 37:
    case 38: {
      const p = b(40);
      p.writeBigUInt64LE(BigInt(Math.floor(r() * 4) * 0x100000), 8);
      p.writeBigUInt64LE(BigInt(r() < 0.7 ? 0x100000 : Math.floor(r() * 2 ** 50)), 16);
      p.writeBigUInt64LE(0x7f0000000000n, 24);
      p.writeBigUInt64LE(BigInt(r() < 0.8 ? 0 : Math.floor(r() * 2 ** 33)), 32);
      return p;
    }
    case 8:
    case 10:
    case 11:
    case 18:
    case 35: {
      const p = b(8);
      p.writeUInt32LE(r() < 0.8 ? 0 : Math.floor(r() * 300), 0);
      p.writeUInt32LE(r() < 0.5 ? 256 : Math.floor(r() * 70000), 4);
      return p;
    }
    case 9: {
      const p = b(40);
      p.writeUInt32LE(r() < 0.9 ? 0 : 5, 0);
      p.writeUInt32LE(r() < 0.5 ? 0 : 1, 4);
      for (let k = 8; k < 40; k += 8) p.writeBigUInt64LE(BigInt(0x7f0000000000 + Math.floor(r() * 0x100000)), k);
      return p;
    }
    case 12:
    case 13:
    case 14:
      return u64(BigInt(r() < 0.7 ? 0 : r() < 0.5 ? 0x100 : Math.floor(r() * 2 ** 16)));
    case 24:
    case 25: {
      const size = r() < 0.7 ? 60 : Math.floor(r() * 400);
      const p = b(12 + (r() < 0.8 ? size : Math.floor(r() * 300)));
      p.writeUInt32LE(Math.floor(r() * 64), 0);
      p.writeUInt32LE(size, 4);
      return p;
    }
    case 6: {
      const p = b(16);
      p.writeBigUInt64LE(BigInt(r() < 0.7 ? 4096 : Math.floor(r() * 2 ** 40)), 0);
      p.writeBigUInt64LE(BigInt(r() < 0.8 ? 0 : Math.floor(r() * 2 ** 20)), 8);
      return p;
    }
    case 31:
    case 32: {
      const p = b(24);
      p.writeBigUInt64LE(BigInt(r() < 0.5 ? 8192 : Math.floor(r() * 2 ** 30)), 0);
      p.writeUInt16LE(Math.floor(r() * 3), 16);
      p.writeUInt16LE(r() < 0.6 ? 256 : Math.floor(r() * 65536), 18);
      return p;
    }
    case 42: {
      const p = b(8);
      p.writeUInt32LE(Math.floor(r() * 3), 0);
      p.writeUInt32LE(r() < 0.8 ? 0 : 1, 4);
      return p;
    }
    default:
      return b(r() < 0.5 ? 0 : 8);
  }
}

function mutate(p: Buffer, r: () => number): Buffer {
  const out = Buffer.from(p);
  const n = Math.floor(r() * 4);
  for (let i = 0; i < n && out.length > 0; i++) out[Math.floor(r() * out.length)] = Math.floor(r() * 256);
  if (r() < 0.1) return Buffer.concat([out, Buffer.alloc(Math.floor(r() * 16), Math.floor(r() * 256))]);
  if (r() < 0.1) return out.subarray(0, Math.floor(r() * out.length));
  return out;
}

test('1500 random and mutated messages: each answered or the connection closed, the back-end stays up, no fd leaks', { timeout: 120_000 }, async () => {
  const before = openFdCount();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdevkit-vufuzz-'));
  const sock = path.join(dir, 'f.sock');
  const disk = VhostUserBlkDevice.open({ size: 4 << 20, queues: 2 });
  const be = VhostUserBackend.listen(sock, disk);
  const r = rng(0x5eed1234);
  const memfd = SharedMemory.create(1 << 20);
  let answered = 0;
  let closedConns = 0;
  let fe = await RawFrontEnd.connect(sock);
  /** What this connection was sent, for the failure message. */
  let history: string[] = [];
  const fresh = async (): Promise<void> => {
    history = [];
    fe.close();
    fe = await RawFrontEnd.connect(sock);
    fe.send(16, u64(0xffffn & 0xb22bn), [], VERSION); // REPLY_ACK and most of what is offered
    fe.send(3);
  };
  await fresh();
  try {
    const REQS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 28, 31, 32, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 99, 0xffffffff];
    for (let i = 0; i < 1500; i++) {
      const req = REQS[Math.floor(r() * REQS.length)]!;
      const payload = r() < 0.15 ? Buffer.from(Array.from({ length: Math.floor(r() * 48) }, () => Math.floor(r() * 256))) : mutate(validPayload(req, r), r);
      const fds: (Fd | number)[] = [];
      const ev: EventFd[] = [];
      const nfds = r() < 0.6 ? 0 : Math.floor(r() * 3) + 1;
      for (let k = 0; k < nfds; k++) {
        if (r() < 0.5) fds.push(memfd.fd);
        else {
          const e = EventFd.create();
          ev.push(e);
          fds.push(e.fd);
        }
      }
      const flags = r() < 0.95 ? VERSION | NEED_REPLY : Math.floor(r() * 16);
      fe.send(req, payload, fds, flags);
      history.push(`${req}/${flags.toString(16)}/${payload.toString('hex')}/${nfds}`);
      for (const e of ev) e.close(); // the back-end has its own copies (or closed them)
      if (flags !== (VERSION | NEED_REPLY)) {
        // A reply may or may not come (GET_* always reply): take what came within 20 ms.
        await new Promise((res) => setTimeout(res, 20));
        for (;;) {
          const m = await fe.recv(1).catch(() => undefined);
          if (m === undefined) break;
          if (m === null) {
            closedConns++;
            await fresh();
            break;
          }
          for (const f of m.fds) f.close();
        }
        continue;
      }
      const m = await fe.recv(5000).catch((err: Error) => {
        throw new Error(`message ${i} (request ${req}, ${payload.length} B, ${nfds} fds): ${err.message}; this connection got: ${history.slice(-12).join(' ')}`);
      });
      if (m === null) {
        closedConns++;
        await fresh();
      } else {
        answered++;
        for (const f of m.fds) f.close();
      }
    }
    fe.close();
    // A well-behaved front-end is still served.
    await new Promise((res) => setTimeout(res, 50));
    const ok = await RawFrontEnd.connect(sock);
    assert.equal((await ok.call(17)).readBigUInt64LE(0), 2n, 'GET_QUEUE_NUM on a new connection');
    ok.close();
  } finally {
    be.close();
    disk.close();
    memfd.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
  assert.ok(answered > 300, `${answered} answered`);
  assert.ok(closedConns > 10, `${closedConns} connections closed on malformed frames`);
  await openFdsBackTo(before, 'open fds after the fuzz run');
});
