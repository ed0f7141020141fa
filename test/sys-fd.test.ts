import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Fd, SysError, EventFd, nativeAddon as native } from '../src/sys/index.js';

test('Fd close is idempotent and use after close is EBADF', () => {
  const e = EventFd.create();
  const fd = e.fd;
  assert.equal(fd.closed, false);
  fd.close();
  fd.close();
  assert.equal(fd.closed, true);
  assert.throws(() => fd.value, (err: unknown) => err instanceof SysError && err.code === 'EBADF');
  assert.throws(() => e.signal(), (err: unknown) => err instanceof SysError && err.code === 'EBADF');
});

test('negative and non-integer fds are refused with EBADF', () => {
  assert.throws(() => new Fd(-1), (err: unknown) => err instanceof SysError && err.code === 'EBADF');
  assert.throws(() => new Fd(1.5), (err: unknown) => err instanceof SysError && err.code === 'EBADF');
  assert.throws(() => native.close(-3), (err: unknown) => err instanceof SysError && err.code === 'EBADF');
});

test('closing an fd that is not open reports EBADF from the kernel', () => {
  const e = EventFd.create();
  const n = e.fd.release();
  native.close(n);
  assert.throws(
    () => native.close(n),
    (err: unknown) => err instanceof SysError && err.code === 'EBADF' && err.syscall === 'close' && err.errno === 9,
  );
});

test('release hands over ownership; dup makes an independent owner', () => {
  const e = EventFd.create();
  const copy = e.fd.dup();
  assert.notEqual(copy.value, e.fd.value);
  e.signal(5);
  const other = new EventFd(copy);
  assert.equal(other.read(), 5);
  const raw = e.fd.release();
  assert.equal(e.fd.closed, true);
  native.close(raw);
  other.close();
});

test('native calls check argument types', () => {
  assert.throws(() => native.close('3' as unknown as number), TypeError);
  assert.throws(() => native.sendmsg(0, 'x' as unknown as Uint8Array, null), TypeError);
  assert.throws(() => native.recvmsg(0, new Uint8Array(4), 2, 4, new Int32Array(2)), RangeError);
});
