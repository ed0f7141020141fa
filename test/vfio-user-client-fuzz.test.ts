/**
 * A server that answers with random bytes: every client call settles (reply,
 * typed error or timeout), the process never crashes, no fd leaks.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { VfioUserClient } from '../src/vfio-user/client.js';
import { VfioUserDevice } from '../src/vfio-user/client-device.js';
import { UnixServer, EventFd } from '../src/sys/index.js';
import { Bytes } from '../src/testing/index.js';
import { openFdCount, openFdsBackTo } from './helpers/sys.js';

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

test('random replies: every client call settles with a value or an error; no crash, no leak', async () => {
  const before = openFdCount();
  const rand = rng(Number(process.env['VDK_FUZZ_SEED'] ?? 0xc11e47));
  const int = (n: number): number => Math.floor(rand() * n);
  const server = UnixServer.listen(path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'cfz-')), 's.sock'));
  const spare = EventFd.create();
  server.on('connection', (s) => {
    let buf = Buffer.alloc(0);
    s.on('data', (chunk, fds) => {
      fds.forEach((f) => f.close());
      buf = Buffer.concat([buf, chunk]);
      while (buf.length >= 16 && buf.length >= buf.readUInt32LE(4)) {
        const id = buf.readUInt16LE(0);
        const cmd = buf.readUInt16LE(2);
        const size = buf.readUInt32LE(4);
        buf = buf.subarray(size);
        if (cmd === 1) {
          const json = '{"capabilities":{"max_msg_fds":4,"max_data_xfer_size":4096,"write_multiple":true}}';
          s.write(new Bytes().u16(id).u16(1).u32(16 + 4 + json.length + 1).u32(1).u32(0).u16(0).u16(2).ascii(json).u8(0).build());
          continue;
        }
        const roll = rand();
        if (roll < 0.03) continue; // silence: the client times out
        const len = [0, 4, 8, 16, 24, 32, 40, int(200)][int(8)]!;
        const body = new Bytes();
        for (let k = 0; k < len; k += 4) body.u32(rand() < 0.6 ? [0, 1, 2, 3, 8, 16, 32, 40, 0x1000][int(9)]! : int(0x1_0000_0000));
        const payload = body.build().subarray(0, len);
        const flags = [1, 1, 1, 0x21, 0, 0x11, 0x41][int(7)]!;
        const rid = rand() < 0.85 ? id : int(0x10000);
        const rcmd = rand() < 0.85 ? cmd : int(20);
        const msg = new Bytes().u16(rid).u16(rcmd).u32(16 + payload.length).u32(flags).u32(flags & 0x20 ? int(200) : 0).bytes(payload).build();
        if (roll > 0.97) {
          s.write(msg.subarray(0, 6)); // a torn message, then the connection dies
          setTimeout(() => s.destroy(), 2);
          continue;
        }
        s.write(msg, rand() < 0.05 ? [spare.fd] : undefined);
      }
    });
  });

  let settled = 0;
  let connections = 0;
  for (let round = 0; round < 30; round++) {
    let client: VfioUserClient;
    try {
      client = await VfioUserClient.connect(server.path, { timeoutMs: 100 });
    } catch {
      continue;
    }
    connections++;
    const dev = new VfioUserDevice(client);
    const ops: (() => Promise<unknown>)[] = [
      () => dev.info(),
      () => dev.regionInfo(int(10)),
      () => dev.irqInfo(int(6)),
      () => dev.read(int(9), int(512), int(64)),
      () => dev.write(int(9), int(512), Uint8Array.of(1, 2, 3), { posted: rand() < 0.5 }),
      () => dev.setEventFds(int(5), 0, [spare, null, spare]),
      () => dev.migrationState(),
      () => dev.readMigrationData(64),
      () => dev.dmaLoggingReport(0x10000, 0x10000, 4096),
      () => dev.reset(),
    ];
    for (let i = 0; i < 20 && !client.closed; i++) {
      try {
        await ops[int(ops.length)]!();
      } catch (err) {
        assert.ok(err instanceof Error, `a typed error, got ${String(err)}`);
      }
      settled++;
    }
    dev.close();
    client.close();
  }
  assert.ok(connections > 10 && settled > 200, `connections ${connections}, calls ${settled}`);
  server.close();
  spare.close();
  await openFdsBackTo(before, 'fds left after the fuzz');
  assert.equal(openFdCount(), before);
});
