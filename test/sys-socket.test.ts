import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { once } from 'node:events';
import {
  socketPair, socketPairFds, UnixSocket, UnixServer, connectUnix, EventFd, SysError, Fd, nativeAddon as native,
} from '../src/sys/index.js';
import { receive, closed, until } from './helpers/sys.js';

const isSys = (code: string) => (err: unknown) => err instanceof SysError && err.code === code;
const tmp = (name: string): string => path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'vdk-')), name);

test('bytes and fds cross a socketpair; received fds are live duplicates', async () => {
  const [a, b] = socketPair();
  const e = EventFd.create();
  a.write(Buffer.from('hello'), [e.fd]);
  const got = await receive(b, 5);
  assert.equal(got.bytes.toString(), 'hello');
  assert.equal(got.fds.length, 1);
  const theirs = EventFd.from(got.fds[0]!.fd);
  theirs.signal(7);
  assert.equal(e.read(), 7);
  theirs.close();
  e.close();
  a.destroy();
  b.destroy();
});

test('many fds in one message', async () => {
  const [a, b] = socketPair();
  const efds = Array.from({ length: 200 }, () => EventFd.create());
  a.write(Buffer.from([1, 2, 3]), efds.map((e) => e.fd));
  const got = await receive(b, 3);
  assert.equal(got.fds.length, 200);
  // Order is kept: signalling received fd i wakes our eventfd i.
  got.fds.forEach((f, i) => native.eventfdWrite(f.fd.value, i + 1));
  efds.forEach((e, i) => assert.equal(e.read(), i + 1));
  for (const f of got.fds) f.fd.close();
  for (const e of efds) e.close();
  a.destroy();
  b.destroy();
});

test('fds travel with the write that carried them, across several messages', async () => {
  const [a, b] = socketPair();
  const e1 = EventFd.create();
  const e2 = EventFd.create();
  const e3 = EventFd.create();
  // Five 8-byte messages queued before the reader runs; 2, 3 and 5 carry fds.
  const msg = (n: number): Buffer => Buffer.alloc(8, n);
  a.write(msg(1));
  a.write(msg(2), [e1.fd]);
  a.write(msg(3), [e2.fd, e3.fd]);
  a.write(msg(4));
  a.write(msg(5), [e1.fd]);
  const got = await receive(b, 40);
  assert.deepEqual([...got.bytes], [1, 2, 3, 4, 5].flatMap((n) => Array(8).fill(n)));
  // The chunk carrying fds ends inside the message they were sent with.
  const owner = got.fds.map((f) => got.bytes[f.at]);
  assert.deepEqual(owner, [2, 3, 3, 5]);
  for (const f of got.fds) f.fd.close();
  for (const e of [e1, e2, e3]) e.close();
  a.destroy();
  b.destroy();
});

test('more fds than the kernel allows in one message is a typed error', () => {
  const [a, b] = socketPair();
  const e = EventFd.create();
  const fds = Array(254).fill(e.fd);
  assert.throws(() => a.write(Buffer.from('x'), fds), isSys('EINVAL'));
  assert.throws(() => native.sendmsg(a.fdNumber, Buffer.from('x'), Array(300).fill(e.fd.value)), isSys('EINVAL'));
  assert.throws(() => a.write(Buffer.alloc(0), [e.fd]), isSys('EINVAL'));
  e.close();
  a.destroy();
  b.destroy();
});

test('a receiver that allows fewer fds drops the connection, and leaks none', async () => {
  const [x, y] = socketPairFds();
  const a = new UnixSocket(x);
  const b = new UnixSocket(y, { maxRecvFds: 2 });
  const before = fs.readdirSync('/proc/self/fd').length;
  const e = EventFd.create();
  a.write(Buffer.from('abc'), [e.fd, e.fd, e.fd]);
  const errors: Error[] = [];
  b.on('error', (err) => errors.push(err));
  const err = await closed(b);
  assert.ok(err instanceof SysError && err.code === 'ENOBUFS', String(err));
  assert.equal(errors.length, 1);
  e.close();
  a.destroy();
  assert.equal(fs.readdirSync('/proc/self/fd').length, before - 2);
});

test('a fd sent with a write that had to be queued is still delivered after the sender closed it', async () => {
  const [a, b] = socketPair({ highWaterMark: 1 << 30 });
  b.pause();
  // Fill the socket buffer so the next write is queued.
  const big = Buffer.alloc(1 << 20);
  a.write(big);
  const e = EventFd.create();
  a.write(Buffer.from('late'), [e.fd]);
  assert.ok(a.writableLength > 0, 'write was queued');
  const mine = e.fd.dup();
  e.close(); // the queued write holds its own duplicate
  b.resume();
  const got = await receive(b, big.length + 4);
  assert.equal(got.fds.length, 1);
  assert.equal(got.bytes.subarray(-4).toString(), 'late');
  native.eventfdWrite(got.fds[0]!.fd.value, 3);
  assert.equal(native.eventfdRead(mine.value), 3);
  got.fds[0]!.fd.close();
  mine.close();
  a.destroy();
  b.destroy();
});

test('backpressure: write returns false above the high-water mark, then drain', async () => {
  const [a, b] = socketPair({ highWaterMark: 64 * 1024 });
  b.pause();
  let writes = 0;
  const chunk = Buffer.alloc(32 * 1024, 7);
  while (a.write(chunk)) writes++;
  writes++;
  assert.ok(a.writableLength > 64 * 1024);
  const drained = once(a, 'drain');
  b.resume();
  const got = receive(b, writes * chunk.length);
  await drained;
  const r = await got;
  assert.equal(r.bytes.length, writes * chunk.length);
  assert.ok(r.bytes.every((x) => x === 7));
  a.destroy();
  b.destroy();
});

test('a peer that closes mid-message gives end and close; the partial bytes arrive first', async () => {
  const [a, b] = socketPair();
  const ended = once(b, 'end');
  const parts: Buffer[] = [];
  b.on('data', (c) => parts.push(Buffer.from(c)));
  a.write(Buffer.from('half a mess'));
  a.destroy();
  await ended;
  assert.equal(Buffer.concat(parts).toString(), 'half a mess');
  assert.equal(await closed(b), undefined);
  assert.equal(b.closed, true);
});

test('writing to a socket whose peer is gone closes it with EPIPE', async () => {
  const [a, b] = socketPair();
  b.destroy();
  const errs: Error[] = [];
  a.on('error', (e) => errs.push(e));
  a.write(Buffer.from('x'));
  const err = await closed(a);
  assert.ok(err instanceof SysError && (err.code === 'EPIPE' || err.code === 'ECONNRESET'), String(err));
  assert.throws(() => a.write(Buffer.from('y')), isSys('EPIPE'));
});

test('recv and send on a closed fd are typed errors', () => {
  const [x, y] = socketPairFds();
  const n = x.value;
  x.close();
  assert.throws(() => native.recvmsg(n, new Uint8Array(16), 0, 16, new Int32Array(4)), isSys('EBADF'));
  assert.throws(() => native.sendmsg(n, new Uint8Array(16), null), isSys('EBADF'));
  assert.throws(() => native.pollNew(n, () => {}), isSys('EBADF'));
  y.close();
});

test('use after close of a UnixSocket', async () => {
  const [a, b] = socketPair();
  a.destroy();
  a.destroy();
  assert.throws(() => a.write(Buffer.from('x')), isSys('EPIPE'));
  await closed(b);
});

test('server: listen, connect, exchange, close removes the socket file', async () => {
  const p = tmp('s.sock');
  const server = UnixServer.listen(p);
  const accepted = once(server, 'connection') as Promise<[UnixSocket]>;
  const client = await connectUnix(p);
  const [conn] = await accepted;
  client.write(Buffer.from('ping'));
  assert.equal((await receive(conn, 4)).bytes.toString(), 'ping');
  conn.write(Buffer.from('pong'));
  assert.equal((await receive(client, 4)).bytes.toString(), 'pong');
  client.destroy();
  conn.destroy();
  server.close();
  assert.equal(fs.existsSync(p), false);
});

test('server: a stale socket file is replaced, a live one is refused', async () => {
  const p = tmp('stale.sock');
  const first = UnixServer.listen(p);
  // Someone listens: refused.
  assert.throws(() => UnixServer.listen(p), isSys('EADDRINUSE'));
  // Simulate a dead process: close the listening fd but leave the file.
  const fdNum = (first as unknown as { path: string }).path;
  assert.equal(fdNum, p);
  const leftover = native.listen(p + '2', 1);
  native.close(leftover); // p2 is now a stale socket file
  const second = UnixServer.listen(p + '2');
  second.close();
  first.close();
  // A path that is not a socket is never unlinked.
  const plain = tmp('plain');
  fs.writeFileSync(plain, 'keep me');
  assert.throws(() => UnixServer.listen(plain), isSys('EADDRINUSE'));
  assert.equal(fs.readFileSync(plain, 'utf8'), 'keep me');
});

test('connect errors are typed', async () => {
  await assert.rejects(connectUnix(tmp('nobody.sock')), isSys('ENOENT'));
  await assert.rejects(connectUnix('x'.repeat(200)), isSys('ENAMETOOLONG'));
  const p = tmp('dead.sock');
  native.close(native.listen(p, 1));
  await assert.rejects(connectUnix(p), isSys('ECONNREFUSED'));
});

test('many connections to one server are independent', async () => {
  const p = tmp('many.sock');
  const server = UnixServer.listen(p);
  let serverClosed = 0;
  server.on('connection', (s) => {
    s.on('data', (c) => s.write(Buffer.from(c)));
    s.on('close', () => serverClosed++);
  });
  const clients = await Promise.all(Array.from({ length: 20 }, () => connectUnix(p)));
  clients[3]!.destroy();
  await until(() => serverClosed === 1, 5000, 'the server side of the destroyed client closes');
  const replies = await Promise.all(
    clients.map(async (c, i) => {
      if (i === 3) return 'gone';
      c.write(Buffer.from(`c${i}`.padEnd(4)));
      return (await receive(c, 4)).bytes.toString().trim();
    }),
  );
  assert.deepEqual(replies, clients.map((_, i) => (i === 3 ? 'gone' : `c${i}`)));
  for (const c of clients) c.destroy();
  server.close();
});

test('an Fd handed to UnixSocket is owned by it', async () => {
  const [x, y] = socketPairFds();
  const s = new UnixSocket(x);
  s.destroy();
  assert.equal(x.closed, true);
  const t = new UnixSocket(new Fd(y.release()));
  await closed(t).catch(() => undefined);
  t.destroy();
});
