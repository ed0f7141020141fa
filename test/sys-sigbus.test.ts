/**
 * SIGBUS containment: a peer that truncates the memfd we mapped must not kill us.
 * SharedMemory.map() guards the mapping (native/vdevkit.c: sigbus_handler): touching a
 * lost page replaces the mapping with zero pages and sets `faulted`.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { SharedMemory, SysError, nativeAddon } from '../src/sys/index.js';

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
