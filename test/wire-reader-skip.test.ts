/**
 * Review: after a large frame, FrameReader.readTarget() hands the socket a
 * fresh 32-byte buffer whenever nothing is buffered; that includes the whole
 * time an oversized frame's body is being skipped, so the skip proceeds 32
 * bytes per recvmsg (a bounded number per poll wake-up).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Connection } from '../src/vfio-user/connection.js';
import { Command } from '../src/vfio-user/constants.js';
import { codecLimits } from '../src/vfio-user/messages.js';
import { socketPair } from '../src/sys/index.js';
import { rawMessage } from '../src/testing/index.js';

const KiB = 1024;
const MiB = 1024 * KiB;

for (const bigFirst of [false, true]) {
  test(`an oversized 4 MiB command is skipped in a bounded number of reads${bigFirst ? ' (after a 512 KiB command)' : ''}`, async () => {
    const [a, b] = socketPair();
    const seen: number[] = [];
    const conn = new Connection(b, {
      limits: codecLimits(MiB),
      onRequest: (msg) => {
        seen.push(msg.header.msgSize);
        const { offset, region, count } = msg.body as { offset: number; region: number; count: number };
        return { body: { offset, region, count } };
      },
    });
    let chunks = 0;
    b.on('data', () => chunks++);
    a.on('data', () => {}); // replies
    const region = (n: number, id: number) => {
      const p = Buffer.alloc(16 + n);
      p.writeUInt32LE(n, 12);
      return rawMessage(Command.REGION_WRITE, p, id);
    };
    if (bigFirst) a.write(region(512 * KiB, 1));
    a.write(region(4 * MiB, 2)); // over the 1 MiB + 32 limit: skipped
    a.write(region(4, 3));
    const t0 = performance.now();
    while (seen.length < (bigFirst ? 2 : 1) && performance.now() - t0 < 20000) await new Promise((r) => setTimeout(r, 5));
    const ms = performance.now() - t0;
    conn.close();
    a.destroy();
    assert.equal(seen.length, bigFirst ? 2 : 1, 'the small command after the oversized one arrived');
    assert.ok(chunks < 2000, `${chunks} reads for ${bigFirst ? 4.5 : 4} MiB (${ms.toFixed(0)} ms)`);
  });
}
