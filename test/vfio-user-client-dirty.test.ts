/**
 * The client's own dirty log of the DMA_WRITEs it serves, merged into
 * VfioUserDevice.dmaLoggingReport. Against a server written here with
 * hand-built bytes (never our encoder): it answers VERSION, DMA_MAP and
 * DEVICE_FEATURE, records every DEVICE_FEATURE it gets, and sends DMA_WRITE
 * requests of its own. libvfio-user behaves this way: it cannot log the
 * writes it makes by message (samples/server.c: "the client is responsible
 * for tracking pages that are dirtied") and refuses a REPORT for a window
 * without an fd.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { VfioUserClient } from '../src/vfio-user/client.js';
import { VfioUserDevice } from '../src/vfio-user/client-device.js';
import { ConnectionError } from '../src/vfio-user/connection.js';
import { SharedMemory, UnixServer, type UnixSocket } from '../src/sys/index.js';
import { b, message, F } from './fixtures/vfio-user-bytes.js';
import { openFdCount, openFdsBackTo, until } from './helpers/sys.js';

const PAGE = 4096;
const MSG_IOVA = 0x10000;
const FD_IOVA = 0x20000;
const WIN = 4 * PAGE;
// DEVICE_FEATURE flags, written out: GET 1 << 16, SET 1 << 17; START 6, STOP 7, REPORT 8.
const SET_START = 0x20006;
const SET_STOP = 0x20007;
const GET_REPORT = 0x10008;

interface Feature {
  flags: number;
  data: Buffer;
}

/** The hand-built server; `failNext` makes the next DEVICE_FEATURE of those flags fail with that errno. */
function dirtyServer() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vfc-dirty-'));
  const server = UnixServer.listen(path.join(dir, 's.sock'));
  const features: Feature[] = [];
  const dmaReplies: Buffer[] = [];
  const failNext = new Map<number, number>();
  /** The bitmap the server claims for the next REPORT (its own log). */
  let serverBitmap = Buffer.alloc(8);
  let conn: UnixSocket | undefined;
  server.on('connection', (s) => {
    conn = s;
    let buf = Buffer.alloc(0);
    s.on('data', (chunk, fds) => {
      fds.forEach((f) => f.close());
      buf = Buffer.concat([buf, chunk]);
      while (buf.length >= 16 && buf.length >= buf.readUInt32LE(4)) {
        const size = buf.readUInt32LE(4);
        const m = Buffer.from(buf.subarray(0, size));
        buf = buf.subarray(size);
        const id = m.readUInt16LE(0);
        const cmd = m.readUInt16LE(2);
        const body = m.subarray(16);
        if ((m.readUInt32LE(8) & 0xf) === F.REPLY) {
          dmaReplies.push(m);
          continue;
        }
        if (cmd === 1) {
          s.write(message(id, 1, F.REPLY, b().u16(0).u16(2).ascii('{}').u8(0).build()));
        } else if (cmd === 2) {
          s.write(message(id, 2, F.REPLY, new Uint8Array(0)));
        } else if (cmd === 16) {
          const flags = body.readUInt32LE(4);
          features.push({ flags, data: Buffer.from(body.subarray(8)) });
          const errno = failNext.get(flags);
          if (errno !== undefined) {
            failNext.delete(flags);
            s.write(message(id, 16, F.REPLY | F.ERROR, new Uint8Array(0), errno));
          } else if (flags === GET_REPORT) {
            const req = body.subarray(8, 32); // iova, length, page_size
            s.write(message(id, 16, F.REPLY, b().u32(32 + serverBitmap.length).u32(flags).bytes(req).bytes(serverBitmap).build()));
          } else {
            s.write(message(id, 16, F.REPLY, body)); // SET: the request echoed, as libvfio-user does
          }
        } else {
          s.write(message(id, cmd, F.REPLY | F.ERROR, new Uint8Array(0), 22));
        }
      }
    });
  });
  let nextId = 0x700;
  return {
    path: server.path,
    features,
    failNext,
    setServerBitmap: (bm: number[]) => (serverBitmap = Buffer.from(bm)),
    /** Sends DMA_WRITE(address, data) to the client and waits for its reply. */
    async dmaWrite(address: number, data: Buffer): Promise<Buffer> {
      const n = dmaReplies.length;
      conn!.write(message(nextId++, 12, F.COMMAND, b().u64(address).u64(data.length).bytes(data).build()));
      await until(() => dmaReplies.length > n, 5000, 'DMA_WRITE reply');
      return dmaReplies[n]!;
    },
    close() {
      server.close();
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

test('dirty logging: the DMA_WRITEs the client serves are logged by the client and OR-ed into dmaLoggingReport', async () => {
  const before = openFdCount();
  const srv = dirtyServer();
  const client = await VfioUserClient.connect(srv.path);
  const dev = new VfioUserDevice(client);
  const msgMem = SharedMemory.create(WIN);
  const fdMem = SharedMemory.create(WIN);
  try {
    await client.dmaMap({ iova: MSG_IOVA, size: WIN, memory: msgMem, passFd: false });
    await client.dmaMap({ iova: FD_IOVA, size: WIN, memory: fdMem });

    // Not logging: a DMA_WRITE is served and nothing is recorded.
    await srv.dmaWrite(MSG_IOVA, Buffer.alloc(8, 1));
    assert.equal(client.dma.loggingPageSize, 0);

    // A START the server refuses leaves the client's log off too.
    srv.failNext.set(SET_START, 5);
    await assert.rejects(dev.startDmaLogging(PAGE), (e: unknown) => e instanceof ConnectionError && e.errno === 5);
    assert.equal(client.dma.loggingPageSize, 0);
    await dev.startDmaLogging(PAGE);
    assert.equal(client.dma.loggingPageSize, PAGE);
    assert.equal(srv.features.at(-1)!.flags, SET_START);
    assert.equal(srv.features.at(-1)!.data.readBigUInt64LE(0), 4096n, 'page_size sent');
    // A page size the log cannot take is refused before the server is asked.
    const asked = srv.features.length;
    await assert.rejects(dev.startDmaLogging(8192), /page size/);
    assert.equal(srv.features.length, asked);

    // A small DMA_WRITE (decoded, then served) and a large one (received in place) are both logged.
    const r1 = await srv.dmaWrite(MSG_IOVA + 2 * PAGE + 100, Buffer.from('0123456789'));
    assert.equal(r1.readUInt32LE(8), F.REPLY, 'DMA_WRITE answered without error');
    assert.equal(Buffer.from(msgMem.bytes.subarray(2 * PAGE + 100, 2 * PAGE + 110)).toString(), '0123456789');
    const big = Buffer.alloc(5000, 0x5a);
    const r2 = await srv.dmaWrite(FD_IOVA + PAGE, big);
    assert.equal(r2.readUInt32LE(8), F.REPLY);
    assert.ok(Buffer.from(fdMem.bytes.subarray(PAGE, PAGE + 5000)).equals(big));

    // The window without an fd: answered from the client's log alone, no REPORT sent.
    const n = srv.features.length;
    assert.deepEqual([...(await dev.dmaLoggingReport(MSG_IOVA, WIN, PAGE))], [0b0100, 0, 0, 0, 0, 0, 0, 0]);
    assert.equal(srv.features.length, n, 'no DEVICE_FEATURE for a window the server cannot write directly');
    assert.deepEqual([...(await dev.dmaLoggingReport(MSG_IOVA, WIN, PAGE))], [0, 0, 0, 0, 0, 0, 0, 0], 'cleared by the report');

    // The fd window: the server's report (its page 3) OR the client's (pages 1 and 2).
    srv.setServerBitmap([0b1000, 0, 0, 0, 0, 0, 0, 0]);
    assert.deepEqual([...(await dev.dmaLoggingReport(FD_IOVA, WIN, PAGE))], [0b1110, 0, 0, 0, 0, 0, 0, 0]);
    const rep = srv.features.at(-1)!;
    assert.equal(rep.flags, GET_REPORT);
    assert.deepEqual([rep.data.readBigUInt64LE(0), rep.data.readBigUInt64LE(8), rep.data.readBigUInt64LE(16)], [0x20000n, 0x4000n, 4096n]);

    // A failed server report keeps the client's bits for the next one.
    srv.setServerBitmap([0, 0, 0, 0, 0, 0, 0, 0]);
    await srv.dmaWrite(FD_IOVA, Buffer.alloc(4, 7));
    srv.failNext.set(GET_REPORT, 5);
    await assert.rejects(dev.dmaLoggingReport(FD_IOVA, WIN, PAGE), (e: unknown) => e instanceof ConnectionError && e.errno === 5);
    assert.deepEqual([...(await dev.dmaLoggingReport(FD_IOVA, WIN, PAGE))], [0b0001, 0, 0, 0, 0, 0, 0, 0]);

    // STOP stops the client's log as well.
    await dev.stopDmaLogging();
    assert.equal(srv.features.at(-1)!.flags, SET_STOP);
    assert.equal(client.dma.loggingPageSize, 0);
  } finally {
    dev.close();
    client.close();
    msgMem.close();
    fdMem.close();
    srv.close();
  }
  await openFdsBackTo(before, 'fds after the test');
});
