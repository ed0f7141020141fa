/**
 * Random messages at the server: whatever arrives, the server answers with a
 * reply or an errno (or nothing for No_reply), never crashes, never hangs,
 * never leaks an fd, and other connections are unaffected.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { VfioUserServer } from '../src/vfio-user/server.js';
import { sampleDevice } from '../src/devices/sample.js';
import { RawVfioUserClient, Bytes, type RawMessage } from '../src/testing/index.js';
import { EventFd, SharedMemory } from '../src/sys/index.js';
import { openFdCount, openFdsBackTo, tick } from './helpers/sys.js';

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

const GET_INFO = new Bytes().u32(16).u32(0).u32(0).u32(0).build();

test('2000 random messages: every one answered or refused, the server stays up, no fd leaks', async () => {
  const before = openFdCount();
  const devices: ReturnType<typeof sampleDevice>[] = [];
  const server = VfioUserServer.listen(path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'fuzz-')), 'f.sock'), {
    device: () => {
      const d = sampleDevice();
      devices.push(d);
      return d;
    },
    maxDataXferSize: 64 * 1024,
  });
  const bystander = await RawVfioUserClient.connect(server.path);
  await bystander.version();
  const mem = SharedMemory.create(64 * 1024);
  const efd = EventFd.create();
  const rand = rng(Number(process.env['VDK_FUZZ_SEED'] ?? 0x5eed1234));
  const int = (n: number): number => Math.floor(rand() * n);

  let client = await RawVfioUserClient.connect(server.path);
  await client.version();
  let reconnects = 0;
  let errors = 0;
  for (let i = 0; i < 2000; i++) {
    const cmd = int(20);
    const flags = [0, 0, 0, 0x10, 0x1, 0x20, 0x40][int(7)]!;
    const len = [0, 4, 8, 16, 20, 24, 32, 40, int(80)][int(9)]!;
    const body = new Bytes();
    // Mostly plausible small fields (argsz, flags, indexes), sometimes raw noise.
    for (let k = 0; k < len; k += 4) body.u32(rand() < 0.7 ? [0, 1, 2, 3, 4, 7, 8, 16, 20, 24, 32, 0x1000, 0x10000][int(13)]! : int(0x1_0000_0000));
    const payload = body.build().subarray(0, len);
    const fds = rand() < 0.1 ? [rand() < 0.5 ? mem.fd : efd.fd] : undefined;
    if (client.closed) {
      client = await RawVfioUserClient.connect(server.path);
      await client.version();
      reconnects++;
    }
    client.send(cmd, payload, { flags, ...(fds ? { fds } : {}) });
    // Sync: the GET_INFO reply must come back; anything before it is the random message's answer.
    const syncId = client.send(4, GET_INFO);
    let m: RawMessage | null = null;
    for (;;) {
      try {
        m = await client.next(3000);
      } catch {
        m = null;
        break; // connection closed by the server (allowed: a stream it could not frame)
      }
      for (const f of m.fds) f.close();
      if (m.id === syncId && m.cmd === 4) break;
      if (m.isError) errors++;
    }
    if (m) assert.equal(m.isError, false, `GET_INFO after message ${i} (cmd ${cmd}) failed: errno ${m.errno}`);
  }
  assert.ok(errors > 100, `the fuzzer provoked errors (${errors})`);
  // The bystander never noticed.
  const r = await bystander.call(4, GET_INFO);
  assert.equal(r.isError, false);
  client.close();
  bystander.close();
  server.close();
  await tick(50);
  for (const d of devices) d.dispose();
  mem.close();
  efd.close();
  await openFdsBackTo(before, `fds leaked (reconnects: ${reconnects})`);
  assert.equal(openFdCount(), before, `fds leaked (reconnects: ${reconnects})`);
});
