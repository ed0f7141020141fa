/**
 * Hand-built ring images for the virtio engine tests: every helper writes
 * fields with a DataView at the offsets the VIRTIO spec gives (split 2.7,
 * packed 2.8), never through the engine. The tests at the end check the
 * helpers themselves against raw bytes.
 */
import { test } from 'node:test';
import { pathToFileURL } from 'node:url';
import assert from 'node:assert/strict';
import { GuestMemory, VirtioError, type VirtioErrorCode } from '../src/virtio/index.js';

export const NEXT = 1;
export const WRITE = 2;
export const INDIRECT = 4;
export const AVAIL = 0x80;
export const USED = 0x8000;

/** Guest memory with one region at GPA 0 over `bytes`. */
export function flatMemory(size = 0x10000): { memory: GuestMemory; bytes: Uint8Array; dv: DataView } {
  const bytes = new Uint8Array(size);
  const memory = new GuestMemory();
  memory.add({ guestPhysAddr: 0, size, userAddr: 0x7f00_0000_0000, mmapOffset: 0 }, bytes);
  return { memory, bytes, dv: new DataView(bytes.buffer) };
}

/** struct virtq_desc { le64 addr; le32 len; le16 flags; le16 next; } at table + 16 * i. */
export function splitDesc(dv: DataView, table: number, i: number, addr: number, len: number, flags: number, next = 0): void {
  const o = table + 16 * i;
  dv.setBigUint64(o, BigInt(addr), true);
  dv.setUint32(o + 8, len, true);
  dv.setUint16(o + 12, flags, true);
  dv.setUint16(o + 14, next, true);
}

/** Puts `heads` in the avail ring (le16 flags @0, le16 idx @2, le16 ring[n] @4) after idx, then bumps idx. */
export function availPublish(dv: DataView, avail: number, n: number, ...heads: number[]): void {
  let idx = dv.getUint16(avail + 2, true);
  for (const h of heads) {
    dv.setUint16(avail + 4 + 2 * (idx % n), h, true);
    idx = (idx + 1) & 0xffff;
  }
  dv.setUint16(avail + 2, idx, true);
}

/** struct pvirtq_desc { le64 addr; le32 len; le16 id; le16 flags; } at ring + 16 * i. */
export function packedDesc(dv: DataView, ring: number, i: number, addr: number, len: number, id: number, flags: number): void {
  const o = ring + 16 * i;
  dv.setBigUint64(o, BigInt(addr), true);
  dv.setUint32(o + 8, len, true);
  dv.setUint16(o + 12, id, true);
  dv.setUint16(o + 14, flags, true);
}

/** The AVAIL/USED bits a driver with wrap counter `wrap` puts on an available descriptor. */
export function availBits(wrap: boolean): number {
  return wrap ? AVAIL : USED;
}

/** Bytes [at, at + n) as a plain array (for deepEqual on raw memory). */
export function raw(bytes: Uint8Array, at: number, n: number): number[] {
  return Array.from(bytes.subarray(at, at + n));
}

/** Little-endian bytes of a u16 / u32. */
export const le16 = (v: number): number[] => [v & 0xff, (v >>> 8) & 0xff];
export const le32 = (v: number): number[] => [v & 0xff, (v >>> 8) & 0xff, (v >>> 16) & 0xff, (v >>> 24) & 0xff];

/** Asserts fn throws VirtioError with `code`. */
export function throwsCode(fn: () => unknown, code: VirtioErrorCode): VirtioError {
  let caught: unknown = null;
  try {
    fn();
  } catch (err) {
    caught = err;
  }
  assert.ok(caught instanceof VirtioError, `expected VirtioError ${code}, got ${String(caught)}`);
  assert.equal(caught.code, code, caught.message);
  return caught;
}

/** The self-tests run only when this file is the one run (not when a test imports it). */
const main = process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href;

function selfTests(): void {
  test('fixtures: split descriptor and avail ring at spec offsets', () => {
    const { bytes, dv } = flatMemory(0x100);
    splitDesc(dv, 0x10, 1, 0x1122_3344_5566, 0x0a0b0c0d, NEXT | WRITE, 0x0203);
    assert.deepEqual(raw(bytes, 0x20, 16), [0x66, 0x55, 0x44, 0x33, 0x22, 0x11, 0, 0, 0x0d, 0x0c, 0x0b, 0x0a, 3, 0, 3, 2]);
    availPublish(dv, 0x80, 4, 9, 8);
    assert.deepEqual(raw(bytes, 0x80, 8), [0, 0, 2, 0, 9, 0, 8, 0]);
  });

  test('fixtures: packed descriptor at spec offsets', () => {
    const { bytes, dv } = flatMemory(0x100);
    packedDesc(dv, 0x40, 0, 0x1000, 0x20, 0x0105, availBits(true) | NEXT);
    assert.deepEqual(raw(bytes, 0x40, 16), [0, 0x10, 0, 0, 0, 0, 0, 0, 0x20, 0, 0, 0, 5, 1, 0x81, 0]);
    packedDesc(dv, 0x40, 1, 0, 0, 0, availBits(false));
    assert.deepEqual(raw(bytes, 0x5e, 2), [0, 0x80]);
  });
}

if (main) selfTests();
