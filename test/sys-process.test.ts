/** Tests that cross a process boundary: a real child process on the other end. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { once } from 'node:events';
import { SharedMemory, EventFd, UnixSocket, socketPairFds } from '../src/sys/index.js';
import { receive } from './helpers/sys.js';

const CHILD = fileURLToPath(new URL('./helpers/child.js', import.meta.url));

function startChild(...args: string[]): { child: ChildProcess; sock: UnixSocket; exit: Promise<number | null> } {
  const [mine, theirs] = socketPairFds();
  const child = spawn(process.execPath, [CHILD, ...args], { stdio: ['ignore', 'inherit', 'inherit', theirs.value] });
  theirs.close();
  const exit = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  return { child, sock: new UnixSocket(mine), exit };
}

test('a child maps our memfd: both sides see each other\'s writes, eventfds wake both ways', async () => {
  const { sock, exit } = startChild('shm');
  const shm = SharedMemory.create(4096, { sealSize: true });
  const toChild = EventFd.create();
  const fromChild = EventFd.create();
  sock.write(Buffer.from('fds'), [shm.fd, toChild.fd, fromChild.fd]);
  for (const v of [1, 20, 300]) {
    shm.view.setUint32(0, v, true);
    toChild.signal();
    assert.equal(await fromChild.wait(), 1);
    assert.equal(shm.view.getUint32(4, true), v * 2 + 1);
  }
  assert.equal(await exit, 0);
  sock.destroy();
  shm.close();
  toChild.close();
  fromChild.close();
});

test('many fds in one message reach another process intact and in order', async () => {
  const { sock, exit } = startChild('count-fds', '1');
  const efds = Array.from({ length: 250 }, () => EventFd.create());
  sock.write(Buffer.from('many'), efds.map((e) => e.fd));
  const r = await receive(sock, 64);
  assert.equal(r.bytes.toString().trim(), 'counts 250 bytes 4');
  efds.forEach((e, i) => assert.equal(e.read(), i + 1, `eventfd ${i}`));
  assert.equal(await exit, 0);
  for (const e of efds) e.close();
  sock.destroy();
});

test('fds split across several messages arrive with their messages', async () => {
  const { sock, exit } = startChild('count-fds', '3');
  const efds = Array.from({ length: 6 }, () => EventFd.create());
  sock.write(Buffer.alloc(16, 1), efds.slice(0, 1).map((e) => e.fd));
  sock.write(Buffer.alloc(16, 2), efds.slice(1, 3).map((e) => e.fd));
  sock.write(Buffer.alloc(16, 3));
  sock.write(Buffer.alloc(16, 4), efds.slice(3, 6).map((e) => e.fd));
  const r = await receive(sock, 64);
  assert.equal(r.bytes.toString().trim(), 'counts 1,2,3 bytes 64');
  efds.forEach((e, i) => assert.equal(e.read(), i + 1, `eventfd ${i}`));
  assert.equal(await exit, 0);
  for (const e of efds) e.close();
  sock.destroy();
});

test('a peer process that dies mid-message: partial bytes, then end and close', async () => {
  const { sock, exit } = startChild('half');
  const parts: Buffer[] = [];
  sock.on('data', (c) => parts.push(Buffer.from(c)));
  await once(sock, 'end');
  assert.equal(Buffer.concat(parts).length, 30);
  assert.equal(sock.closed, true);
  assert.equal(await exit, 0);
});
