import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { socketPair, SharedMemory, EventFd, SysError, connectUnix, UnixServer } from '../src/sys/index.js';
import { receive, closed, openFdCount, openFdsBackTo } from './helpers/sys.js';

test('no fd leaks over a thousand open/send/receive/close cycles, errors included', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdk-leak-'));
  const server = UnixServer.listen(path.join(dir, 's.sock'));
  server.on('connection', (s) => s.on('data', (_c, fds) => fds.forEach((f) => f.close())));
  const before = openFdCount();
  for (let i = 0; i < 1000; i++) {
    const [a, b] = socketPair();
    const shm = SharedMemory.create(4096);
    const ev = EventFd.create();
    a.write(Buffer.from('msg'), [shm.fd, ev.fd]);
    const got = await receive(b, 3);
    assert.equal(got.fds.length, 2);
    const mapped = SharedMemory.map(got.fds[0]!.fd);
    mapped.close();
    got.fds[1]!.fd.close();
    // Error paths: mmap past the end, use after close, write to a dead peer.
    assert.throws(() => SharedMemory.map(shm.fd, { size: 8192 }), SysError);
    shm.close();
    assert.throws(() => shm.bytes, SysError);
    ev.close();
    assert.throws(() => ev.signal(), SysError);
    b.destroy();
    a.write(Buffer.from('late'));
    await closed(a);
    if (i % 100 === 0) {
      await assert.rejects(connectUnix(path.join(dir, 'missing.sock')), SysError);
      const c = await connectUnix(server.path);
      c.write(Buffer.from('x'), [c.fdNumber]);
      c.destroy();
    }
  }
  await openFdsBackTo(before, 'fds left after the cycles'); // the server closes its ends when it sees them close
  assert.equal(openFdCount(), before);
  server.close();
});
