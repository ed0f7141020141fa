/**
 * The Node floor for message DMA: what DMA_READ streaming costs in Node with
 * no library at all, only the addon's sendmsg / recvmsg and uv polls.
 *
 * The parent plays the server: it keeps WINDOW 32-byte DMA_READ-shaped
 * requests in flight (refilled by halves, each refill one sendmsg) and
 * receives each reply's data straight into an 8 MiB destination with a
 * scatter read that also takes the next reply's 32-byte prefix, as vdevkit
 * does. The child plays the client: it reads requests in 256 KiB pool reads
 * and answers each with a 32-byte head plus a view of an 8 MiB source,
 * gathered into one sendmsg per wake-up. No framing checks, no ids matched,
 * no errors handled beyond stopping: a floor to compare the library with
 * (docs/benchmarks.md, "Message DMA, third pass"), not a protocol
 * implementation.
 *
 *   taskset -c 0 node dist/bench/dma-floor.js [CHUNK] [CMDS] [WARM_CMDS]
 *
 * prints RESULT {"impl":"node-floor","gb_s":...}. A command is 8 MiB.
 */
import { fork } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { nativeAddon as native } from '../src/sys/index.js';
import type { PollHandle } from '../src/sys/native.js';

const WIN = 8 << 20;
const INFLIGHT = 32;
const HEAD = 32;
const READABLE = 1;
const WRITABLE = 2;
const fdsOut = new Int32Array(8);
/** Poll handles must stay referenced: a collected one is closed by its finalizer. */
const polls: PollHandle[] = [];

function client(fd: number): void {
  native.setSendBuffer(fd, 4 << 20);
  const src = Buffer.alloc(WIN, 7);
  const pool = Buffer.allocUnsafe(256 * 1024);
  let have = 0;
  let out: Uint8Array[] = [];
  let outBytes = 0;
  const poll = native.pollNew(fd, (_status, events) => {
    if (events & READABLE) {
      for (;;) {
        const n = native.recvmsg(fd, pool, have, pool.length - have, fdsOut);
        if (n === 0) process.exit(0);
        if (n < 0) break;
        have += n;
        let at = 0;
        for (; have - at >= HEAD; at += HEAD) {
          const off = pool.readUInt32LE(at + 16);
          const count = pool.readUInt32LE(at + 24);
          const h = Buffer.allocUnsafe(HEAD);
          pool.copy(h, 0, at, at + HEAD);
          h.writeUInt32LE(HEAD + count, 4);
          h.writeUInt32LE(1, 8);
          out.push(h, src.subarray(off, off + count));
          outBytes += HEAD + count;
        }
        pool.copy(pool, 0, at, have);
        have -= at;
      }
    }
    // Send what is queued, 64 buffers per sendmsg; what the kernel does not take waits for POLLOUT.
    while (out.length > 0) {
      const part = out.slice(0, 64);
      const n = native.sendmsg(fd, part, null);
      if (n < 0) break;
      let left = n;
      outBytes -= n;
      while (left > 0) {
        const b = out[0]!;
        if (left >= b.length) {
          left -= b.length;
          out.shift();
        } else {
          out[0] = b.subarray(left);
          left = 0;
        }
      }
      if (n < part.reduce((s, b) => s + b.length, 0)) break;
    }
    if (out.length === 0) out = [];
    native.pollStart(poll, READABLE | (outBytes > 0 ? WRITABLE : 0));
  });
  polls.push(poll);
  native.pollStart(poll, READABLE);
}

function server(chunk: number, cmds: number, warm: number): void {
  const [a, b] = native.socketpair();
  const child = fork(fileURLToPath(import.meta.url), ['--client'], { stdio: ['inherit', 'inherit', 'inherit', 'ipc', b] });
  native.close(b);
  native.setSendBuffer(a, 4 << 20);
  const dst = Buffer.alloc(WIN);
  const per = WIN / chunk;
  const prefix = Buffer.allocUnsafe(HEAD);
  const tail = Buffer.allocUnsafe(HEAD);
  let cmd = 0;
  let next = 0;
  let outstanding = 0;
  let received = 0;
  let prefixGot = 0;
  let cur = 0;
  let curGot = 0;
  let t0 = 0n;
  const sendBatch = (): void => {
    const want = Math.min(INFLIGHT - outstanding, per - next);
    if (want <= 0) return;
    const req = Buffer.alloc(HEAD * want);
    for (let k = 0; k < want; k++, next++, outstanding++) {
      const o = k * HEAD;
      req.writeUInt16LE(next & 0xffff, o);
      req.writeUInt16LE(11, o + 2); // DMA_READ
      req.writeUInt32LE(HEAD, o + 4);
      req.writeUInt32LE(next * chunk, o + 16);
      req.writeUInt32LE(chunk, o + 24);
    }
    if (native.sendmsg(a, req, null) !== req.length) throw new Error('request batch not sent whole (send buffer too small)');
  };
  const startCommand = (): void => {
    if (cmd === warm) t0 = process.hrtime.bigint();
    next = 0;
    received = 0;
    sendBatch();
  };
  const poll = native.pollNew(a, () => {
    for (;;) {
      if (prefixGot < HEAD) {
        const n = native.recvmsg(a, prefix, prefixGot, HEAD - prefixGot, fdsOut);
        if (n <= 0) return;
        prefixGot += n;
        if (prefixGot < HEAD) continue;
        cur = prefix.readUInt16LE(0);
        curGot = 0;
      }
      const target = dst.subarray((cur % per) * chunk + curGot, ((cur % per) + 1) * chunk);
      const n = native.recvmsg(a, target, 0, target.length, fdsOut, tail, 0, HEAD);
      if (n <= 0) return;
      const body = Math.min(n, target.length);
      curGot += body;
      if (curGot < chunk) return;
      outstanding--;
      received++;
      prefixGot = n - body;
      if (prefixGot > 0) {
        tail.copy(prefix, 0, 0, prefixGot);
        if (prefixGot === HEAD) {
          cur = prefix.readUInt16LE(0);
          curGot = 0;
        }
      }
      if (outstanding <= INFLIGHT / 2) sendBatch();
      if (received === per) {
        if (++cmd === warm + cmds) {
          const ns = Number(process.hrtime.bigint() - t0);
          const bytes = cmds * WIN;
          console.log(`RESULT ${JSON.stringify({ impl: 'node-floor', chunk, bytes, ns, gb_s: Number((bytes / ns).toFixed(3)) })}`);
          native.pollClose(poll);
          child.kill();
          native.close(a);
          return;
        }
        startCommand();
      }
    }
  });
  polls.push(poll);
  native.pollStart(poll, READABLE);
  startCommand();
}

if (process.argv[2] === '--client') client(4);
else server(Number(process.argv[2] ?? 65536), Number(process.argv[3] ?? 256), Number(process.argv[4] ?? 64));
