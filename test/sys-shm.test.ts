import { test } from 'node:test';
import assert from 'node:assert/strict';
import { SharedMemory, SysError, Fd, nativeAddon as native } from '../src/sys/index.js';

const isSys = (code: string) => (err: unknown) => err instanceof SysError && err.code === code;

test('two mappings of one memfd see each other', () => {
  const a = SharedMemory.create(8192, { name: 'test' });
  const b = SharedMemory.map(a.fd.dup());
  assert.equal(b.size, 8192);
  a.view.setUint32(4096, 0xdeadbeef, true);
  assert.equal(b.view.getUint32(4096, true), 0xdeadbeef);
  b.bytes[10] = 42;
  assert.equal(a.bytes[10], 42);
  a.close();
  b.close();
});

test('mapping at an offset', () => {
  const a = SharedMemory.create(3 * native.PAGE_SIZE);
  a.bytes[native.PAGE_SIZE * 2] = 7;
  const b = SharedMemory.map(a.fd.dup(), { offset: native.PAGE_SIZE * 2, size: native.PAGE_SIZE });
  assert.equal(b.bytes[0], 7);
  assert.equal(b.size, native.PAGE_SIZE);
  b.close();
  a.close();
});

test('mmap beyond the end of the file is refused, not a SIGBUS later', () => {
  const a = SharedMemory.create(4096);
  assert.throws(() => SharedMemory.map(a.fd, { size: 8192 }), isSys('EINVAL'));
  assert.throws(() => SharedMemory.map(a.fd, { offset: 4096, size: 4096 }), isSys('EINVAL'));
  assert.throws(() => SharedMemory.map(a.fd, { offset: 100, size: 10 }), isSys('EINVAL'));
  assert.throws(() => native.mmap(a.fd.value, 0, 0, false), isSys('EINVAL'));
  a.close();
});

test('mmap of a closed or bad fd is EBADF', () => {
  assert.throws(() => native.mmap(99999, 0, 4096, false), isSys('EBADF'));
  const a = SharedMemory.create(4096);
  const fd = a.fd;
  a.close();
  assert.throws(() => SharedMemory.map(fd), isSys('EBADF'));
});

test('close detaches every view instead of leaving it dangling', () => {
  const a = SharedMemory.create(4096);
  const u8 = a.bytes;
  const view = a.subarray(100, 50);
  const buf = a.buffer;
  u8[0] = 1;
  a.close();
  a.close();
  assert.equal(buf.byteLength, 0);
  assert.equal(u8.length, 0);
  assert.equal(view.length, 0);
  assert.equal(u8[0], undefined);
  assert.throws(() => a.bytes, isSys('EBADF'));
  assert.equal(native.munmap(buf), false, 'a second munmap is a no-op');
});

test('subarray is bounds-checked', () => {
  const a = SharedMemory.create(4096);
  assert.throws(() => a.subarray(4000, 200), isSys('EINVAL'));
  assert.throws(() => a.subarray(-1, 2), isSys('EINVAL'));
  assert.equal(a.subarray(4000, 96).length, 96);
  a.close();
});

test('a sealed memfd cannot be shrunk by a peer', () => {
  const a = SharedMemory.create(8192, { sealSize: true });
  assert.throws(() => native.ftruncate(a.fd.value, 4096), isSys('EPERM'));
  a.close();
});

test('read-only mappings', () => {
  const a = SharedMemory.create(4096);
  a.bytes[1] = 9;
  const ro = SharedMemory.map(new Fd(native.dup(a.fd.value)), { readOnly: true });
  assert.equal(ro.readOnly, true);
  assert.equal(ro.bytes[1], 9);
  ro.close();
  a.close();
});
