/**
 * vfio-user fuzz targets: the codec (decodeMessage and FrameReader), the
 * server (a sample device per connection) against a mutated client, and the
 * client (VfioUserClient + VfioUserDevice) against a mutated server.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { connectUnix, EventFd, socketPair, type Fd, type UnixSocket } from '../../sys/index.js';
import { VfioUserServer } from '../../vfio-user/server.js';
import { VfioUserClient } from '../../vfio-user/client.js';
import { VfioUserDevice } from '../../vfio-user/client-device.js';
import { decodeMessage, codecLimits, encodeRequest, type CodecCommand } from '../../vfio-user/messages.js';
import { ProtocolError } from '../../wire/errors.js';
import { FrameReader } from '../../wire/reader.js';
import { sampleDevice, type SampleDevice } from '../../devices/sample.js';
import { RawVfioUserClient, rawMessage, FLAG_REPLY, FLAG_ERROR, type RawMessage } from '../../testing/vfio-user-raw.js';
import { concat, framesExactly, generate, SeedBuilder, type Framing, type FuzzInput, type Seed } from '../mutator.js';
import { deadline, Finding, tick, writeInput, type FdPool, type FuzzTarget, type Instance } from '../harness.js';
import type { Rng } from '../rng.js';

export const VFIO_FRAMING: Framing = { sizeOff: 4, headerSize: 16, includesHeader: true };
const MAX_XFER = 64 * 1024;
/** The server's largest message: max_data_xfer_size plus headers (what it frames without closing). */
const MAX_FRAME = MAX_XFER + 1024;

/** A vfio-user message seed: the 16-byte header (id, cmd, size, flags, error), then the body. */
function msg(name: string, cmd: number, body: (b: SeedBuilder) => void, o: { id?: number; flags?: number; errno?: number; fds?: Seed['fds'] } = {}): Seed {
  const b = new SeedBuilder().u16(o.id ?? 0).u16(cmd).u32(0).u32(o.flags ?? 0).u32(o.errno ?? 0);
  body(b);
  const s = b.build(name, o.fds ?? []);
  new DataView(s.bytes.buffer).setUint32(4, s.bytes.length, true);
  return s;
}

const ascii = (t: string): Uint8Array => Uint8Array.from(Buffer.from(`${t}\0`, 'latin1'));

function versionJson(rng: Rng): string {
  const caps = [
    '{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":65536}}',
    '{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":65536,"migration":{"pgsize":4096,"max_bitmap_size":1048576},"twin_socket":{"supported":false},"write_multiple":true}}',
    '{"capabilities":{"max_msg_fds":1,"pgsizes":4096,"max_dma_maps":4}}',
    '{}',
  ];
  return rng.pick(caps);
}

function versionSeed(rng: Rng, id = 0): Seed {
  return msg('VERSION', 1, (b) => b.u16(0).u16(2).raw(ascii(versionJson(rng))), { id });
}

/** Valid commands a client sends (layouts from the spec tables). */
function clientSeeds(rng: Rng): Seed[] {
  const id = (): number => 1 + rng.int(200);
  const region = (): number => rng.pick([0, 1, 2, 6, 7, 9, 8]);
  return [
    msg('DMA_MAP', 2, (b) => b.u32(32).u32(3).u64(rng.pick([0, 0x1000])).u64(rng.pick([0, 0x10000, 0x100000])).u64(rng.pick([0x1000, 0x10000])), { id: id(), fds: ['memfd'] }),
    msg('DMA_MAP/nofd', 2, (b) => b.u32(32).u32(3).u64(0).u64(0x200000).u64(0x1000), { id: id() }),
    msg('DMA_UNMAP', 3, (b) => b.u32(24).u32(0).u64(rng.pick([0, 0x10000])).u64(rng.pick([0x1000, 0x10000])), { id: id() }),
    msg('DMA_UNMAP/all', 3, (b) => b.u32(24).u32(2).u64(0).u64(0), { id: id() }),
    msg('GET_INFO', 4, (b) => b.u32(16).u32(0).u32(0).u32(0), { id: id() }),
    msg('GET_REGION_INFO', 5, (b) => b.u32(rng.pick([32, 64, 256])).u32(0).u32(region()).u32(0).u64(0).u64(0), { id: id() }),
    msg('GET_REGION_IO_FDS', 6, (b) => b.u32(rng.pick([16, 56, 256])).u32(0).u32(region()).u32(0), { id: id() }),
    msg('GET_IRQ_INFO', 7, (b) => b.u32(16).u32(0).u32(rng.int(6)).u32(0), { id: id() }),
    msg('SET_IRQS/eventfd', 8, (b) => b.u32(20).u32(0x24).u32(rng.pick([0, 2])).u32(0).u32(1), { id: id(), fds: ['eventfd'] }),
    msg('SET_IRQS/bool', 8, (b) => b.u32(21).u32(0x22).u32(rng.pick([0, 2])).u32(0).u32(1).u8(1), { id: id() }),
    msg('SET_IRQS/none', 8, (b) => b.u32(20).u32(0x21).u32(2).u32(0).u32(rng.int(8)), { id: id() }),
    msg('REGION_READ', 9, (b) => b.u64(rng.pick([0, 4, 0x10, 0x40])).u32(region()).u32(rng.pick([1, 2, 4, 8, 64])), { id: id() }),
    msg('REGION_WRITE', 10, (b) => b.u64(rng.pick([0, 4, 8, 0x10, 0x18, 0x20])).u32(region()).u32(4).u32(rng.u32(), false), { id: id(), flags: rng.chance(0.3) ? 0x10 : 0 }),
    msg('RESET', 13, () => {}, { id: id() }),
    msg('WRITE_MULTI', 15, (b) => b.u64(2).u64(0x10).u32(0).u32(4).u64(1).u64(0x14).u32(0).u32(4).u64(2), { id: id() }),
    msg('FEATURE/migration', 16, (b) => b.u32(16).u32(0x10001).u64(0), { id: id() }),
    msg('FEATURE/state', 16, (b) => b.u32(16).u32(0x20000 | 2).u32(rng.pick([1, 2, 3, 4])).u32(0xffffffff), { id: id() }),
    msg('FEATURE/log_start', 16, (b) => b.u32(40).u32(0x20000 | 6).u64(4096).u32(1).u32(0).u64(0).u64(0x10000), { id: id() }),
    msg('FEATURE/log_report', 16, (b) => b.u32(32).u32(0x10000 | 8).u64(0).u64(0x10000).u64(4096), { id: id() }),
    msg('MIG_DATA_READ', 17, (b) => b.u32(8).u32(rng.pick([16, 4096])), { id: id() }),
    msg('MIG_DATA_WRITE', 18, (b) => b.u32(12).u32(4).u32(0, false), { id: id() }),
    msg('DMA_READ/wrongway', 11, (b) => b.u64(0).u64(8), { id: id() }),
  ];
}

const CLIENT_SEEDS_CACHE = new Map<number, Seed[]>();

export const vfioUserCodec: FuzzTarget = {
  name: 'vfio-user-codec',
  generate: (rng) =>
    generate(rng, {
      seeds: (r) => [...clientSeeds(r), ...serverSeeds(r)],
      framing: VFIO_FRAMING,
      maxMsgs: 8,
    }),
  async start(): Promise<Instance> {
    const limits = codecLimits(MAX_XFER);
    return {
      async run(input: FuzzInput) {
        // Each message alone through the decoder: it decodes or throws ProtocolError.
        for (const m of input.msgs) {
          let decoded: ReturnType<typeof decodeMessage> | null = null;
          try {
            decoded = decodeMessage(m.bytes, limits);
          } catch (e) {
            if (!(e instanceof ProtocolError)) throw new Finding('exception', `decodeMessage threw ${String((e as Error)?.stack ?? e)}`);
          }
          if (decoded?.kind === 'request') {
            // What decoded re-encodes (the encoder accepts what the decoder produced).
            try {
              const enc = encodeRequest(decoded.command as CodecCommand, decoded.header.msgId, decoded.body as never);
              const bytes = enc instanceof Uint8Array ? enc : concat(enc);
              decodeMessage(bytes, limits);
            } catch (e) {
              if (!(e instanceof ProtocolError)) throw new Finding('exception', `re-encode of a decoded ${decoded.command} threw ${String((e as Error)?.stack ?? e)}`);
            }
          }
        }
        // The whole stream through a FrameReader, in the input's chunks.
        const stream = concat(input.msgs.map((m) => m.bytes));
        let frames = 0;
        let fatal = false;
        const reader = new FrameReader(
          { headerSize: 16, frameSize: (h) => h[4]! | (h[5]! << 8) | (h[6]! << 16) | (h[7]! * 2 ** 24), maxFrameSize: MAX_FRAME, bigFrameSize: 4096 },
          { frame: () => void frames++, oversized: () => true, fatal: () => void (fatal = true) },
        );
        const bounds = [0, ...input.cuts.filter((c) => c > 0 && c < stream.length), stream.length];
        for (let i = 0; i + 1 < bounds.length && !fatal; i++) reader.push(stream.subarray(bounds[i]!, bounds[i + 1]!), []);
        if (!fatal && framesExactly(input.msgs, VFIO_FRAMING, MAX_FRAME) && reader.buffered !== 0) {
          throw new Finding('invariant', `FrameReader holds ${reader.buffered} bytes after a stream that frames exactly (${frames} frames)`);
        }
        reader.close();
      },
      async probe() {},
      async close() {},
    };
  },
};

const GET_INFO_BODY = Uint8Array.from([16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
const SYNC_ID = 0xfffe;

function tmpSocket(tag: string): { dir: string; sock: string } {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), `vdk-fuzz-${tag}-`));
  return { dir, sock: path.join(dir, 's.sock') };
}

async function untilTrue(cond: () => boolean, ms: number, what: string): Promise<void> {
  const t0 = Date.now();
  while (!cond()) {
    if (Date.now() - t0 > ms) throw new Finding('hang', what);
    await tick(2);
  }
}

/** Reads messages until the reply to `id`, or the close; checks every reply is one. */
async function syncOn(client: RawVfioUserClient, id: number, cmd: number, what: string): Promise<RawMessage | null> {
  for (;;) {
    let m: RawMessage;
    try {
      m = await client.next(5000);
    } catch {
      if (client.closed) return null;
      throw new Finding('hang', `${what}: no reply to the sync request and no close`);
    }
    for (const f of m.fds) f.close();
    if (!m.isReply) throw new Finding('invariant', `${what}: the server sent command ${m.cmd} where a reply was due`);
    if (m.id === id && m.cmd === cmd) return m;
  }
}

export const vfioUserServer: FuzzTarget = {
  name: 'vfio-user-server',
  concurrency: 8,
  generate: (rng) => generate(rng, { prefix: (r) => [versionSeed(r)], seeds: clientSeeds, framing: VFIO_FRAMING, maxMsgs: 6 }),
  async start(pool: FdPool): Promise<Instance> {
    const { dir, sock } = tmpSocket('vus');
    let last: SampleDevice | null = null;
    const server = VfioUserServer.listen(sock, {
      device: () => (last = sampleDevice()),
      maxDataXferSize: MAX_XFER,
      maxMsgFds: 8,
      timeoutMs: 500,
      versionTimeoutMs: 2000,
    });
    server.on('session', (s) => {
      const d = last!;
      s.conn.on('close', () => d.dispose());
    });
    const connect = async (): Promise<RawVfioUserClient> => {
      const c = new RawVfioUserClient(await connectUnix(sock));
      // The server's DMA requests (the sample device's DMA engine): refused.
      c.onCommand = (m) => {
        for (const f of m.fds) f.close();
        if (!c.closed) c.sendBytes(rawMessage(m.cmd, new Uint8Array(0), m.id, FLAG_REPLY | FLAG_ERROR, 22));
      };
      return c;
    };
    const closeAndWait = async (c: RawVfioUserClient, what: string): Promise<void> => {
      // Replies not read (no sync after an input that does not frame) may hold fds: ours to close.
      for (;;) {
        const m = await c.next(0).catch(() => null);
        if (!m) break;
        for (const f of m.fds) f.close();
      }
      c.close();
      // Other inputs run at once (concurrency): their sessions are open. The probe, alone, checks that all closed.
      if (what === 'probe') await untilTrue(() => server.sessions.size === 0, 5000, 'a session stayed open after its client closed');
    };
    return {
      async run(input) {
        const c = await connect();
        await writeInput(c.socket, input, pool);
        if (framesExactly(input.msgs, VFIO_FRAMING, MAX_FRAME) && !c.closed) {
          c.send(4, GET_INFO_BODY, { id: SYNC_ID });
          const r = await syncOn(c, SYNC_ID, 4, 'after the input');
          if (r && !r.isError && r.body.length < 16) throw new Finding('invariant', `GET_INFO reply of ${r.body.length} bytes`);
        }
        await closeAndWait(c, 'input');
      },
      async probe() {
        await untilTrue(() => server.sessions.size === 0, 5000, 'a session stayed open after its client closed');
        const c = await connect();
        const v = await c.version();
        if (v.isError) throw new Finding('invariant', `probe: VERSION failed with errno ${v.errno}`);
        const info = await c.call(4, GET_INFO_BODY);
        if (info.isError || info.body.readUInt32LE(8) < 9) throw new Finding('invariant', 'probe: GET_INFO failed');
        const rd = await c.call(9, Uint8Array.from([0, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 4, 0, 0, 0]));
        if (rd.isError || rd.body.length !== 20) throw new Finding('invariant', `probe: config read failed (errno ${rd.errno})`);
        await closeAndWait(c, 'probe');
      },
      async close() {
        server.close();
        await tick(20);
        fs.rmSync(dir, { recursive: true, force: true });
      },
    };
  },
};

/** Replies and server commands a server sends; id 0 and cmd 0 mean "the request's" (filled when sent). */
function serverSeeds(rng: Rng): Seed[] {
  const R = { flags: FLAG_REPLY };
  return [
    msg('r/GET_INFO', 0, (b) => b.u32(16).u32(rng.pick([0, 1, 3])).u32(rng.pick([9, 10, 1, 0, 0xffff])).u32(rng.pick([5, 1, 0])), R),
    msg('r/REGION_INFO', 0, (b) => b.u32(32).u32(rng.pick([3, 7, 0xf])).u32(0).u32(0).u64(rng.pick([0, 0x1000, 0x10000])).u64(0), R),
    msg('r/REGION_INFO/caps', 0, (b) => b.u32(48).u32(0xf).u32(2).u32(32).u64(0x10000).u64(0).u16(1).u16(1).u32(0).u32(1).u32(0).u64(0).u64(0x1000), { ...R, fds: ['memfd'] }),
    msg('r/IRQ_INFO', 0, (b) => b.u32(16).u32(rng.pick([0x7, 0xf, 0])).u32(0).u32(rng.pick([1, 8, 2048])), R),
    msg('r/REGION_READ', 0, (b) => b.u64(0).u32(0).u32(4).u32(rng.u32(), false), R),
    msg('r/REGION_READ/big', 0, (b) => b.u64(0).u32(0).u32(64).raw(new Uint8Array(64)), R),
    msg('r/REGION_WRITE', 0, (b) => b.u64(0).u32(0).u32(3), R),
    msg('r/empty', 0, () => {}, R),
    msg('r/FEATURE/state', 0, (b) => b.u32(16).u32(0x2).u32(rng.pick([1, 2, 3])).u32(0), R),
    msg('r/FEATURE/report', 0, (b) => b.u32(40).u32(8).u64(0).u64(0x10000).u64(4096).u16(0xffff).u16(0), R),
    msg('r/MIG_DATA_READ', 0, (b) => b.u32(12).u32(4).u32(rng.u32(), false), R),
    msg('r/error', 0, () => {}, { flags: FLAG_REPLY | FLAG_ERROR, errno: rng.pick([22, 1, 95, 0, 0xffff]) }),
    msg('DMA_READ', 11, (b) => b.u64(rng.pick([0, 0x1000, 0xfff8])).u64(rng.pick([8, 0x1000, 0x10000])), { id: 0x7000 + rng.int(100) }),
    msg('DMA_WRITE', 12, (b) => b.u64(rng.pick([0, 0x1000])).u64(8).u64(0x1122334455667788n), { id: 0x7100 + rng.int(100) }),
  ];
}

function versionReplySeed(rng: Rng): Seed {
  const json = rng.pick([
    '{"capabilities":{"max_msg_fds":4,"max_data_xfer_size":4096,"write_multiple":true}}',
    '{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":65536,"migration":{"pgsize":4096,"max_bitmap_size":1048576}}}',
    '{"capabilities":{"max_msg_fds":1}}',
  ]);
  return msg('r/VERSION', 0, (b) => b.u16(0).u16(2).raw(ascii(json)), { flags: FLAG_REPLY });
}

const CLIENT_OPS = 11;

export const vfioUserClient: FuzzTarget = {
  name: 'vfio-user-client',
  concurrency: 512,
  generate: (rng) =>
    generate(rng, {
      prefix: (r) => [versionReplySeed(r)],
      seeds: serverSeeds,
      framing: VFIO_FRAMING,
      maxMsgs: 8,
      extra: (r) => Array.from({ length: 1 + r.int(6) }, () => r.u32()),
    }),
  async start(pool: FdPool): Promise<Instance> {
    const { dir, sock } = tmpSocket('vuc');
    // The probe talks to a real server.
    let last: SampleDevice | null = null;
    const real = VfioUserServer.listen(sock, { device: () => (last = sampleDevice()), maxDataXferSize: MAX_XFER });
    real.on('session', (s) => {
      const d = last!;
      s.conn.on('close', () => d.dispose());
    });
    const spare = EventFd.create();
    return {
      async run(input) {
        const [ours, theirs] = socketPair();
        let k = 0;
        let buf: Uint8Array = new Uint8Array(0);
        // The mutated server: the k-th request it reads gets the k-th message (ids and commands filled
        // when the seed left them 0), server commands in the list go right after; then it closes.
        const sendNext = (id: number, cmd: number): void => {
          for (;;) {
            const m = input.msgs[k++];
            if (!m) {
              theirs.destroy();
              return;
            }
            const b = Uint8Array.from(m.bytes);
            const dv = new DataView(b.buffer);
            const isCommand = b.length >= 12 && (dv.getUint32(8, true) & 0xf) === 0;
            if (!isCommand && b.length >= 4) {
              if (dv.getUint16(0, true) === 0) dv.setUint16(0, id, true);
              if (dv.getUint16(2, true) === 0) dv.setUint16(2, cmd, true);
            }
            void writeInput(theirs, { msgs: [{ bytes: b, fds: m.fds }], cuts: input.cuts.filter((c) => c < b.length), extra: [] }, pool);
            if (!isCommand) return;
          }
        };
        theirs.on('data', (chunk: Buffer, fds: Fd[]) => {
          for (const f of fds) f.close();
          buf = concat([buf, chunk]);
          while (buf.length >= 16) {
            const dv = new DataView(buf.buffer, buf.byteOffset, buf.length);
            const size = dv.getUint32(4, true);
            if (size < 16 || buf.length < size) break;
            const id = dv.getUint16(0, true);
            const cmd = dv.getUint16(2, true);
            const flags = dv.getUint32(8, true);
            buf = buf.subarray(size);
            if ((flags & 0xf) !== 0 || flags & 0x10) continue; // our replies to its DMA commands; posted writes
            if (!theirs.closed) sendNext(id, cmd);
          }
        });
        theirs.on('error', () => {});
        let client: VfioUserClient;
        try {
          client = await deadline(VfioUserClient.over(ours, { timeoutMs: 100, maxDataXferSize: MAX_XFER }), 5000, 'VERSION negotiation');
        } catch (e) {
          if (e instanceof Finding) throw e;
          if (!(e instanceof Error)) throw new Finding('invariant', `connect rejected with a non-Error: ${String(e)}`);
          ours.destroy();
          theirs.destroy();
          return;
        }
        const dev = new VfioUserDevice(client);
        const ops: ((x: number) => Promise<unknown>)[] = [
          () => dev.info(),
          (x) => dev.regionInfo(x % 10),
          (x) => dev.irqInfo(x % 6),
          (x) => dev.read(x % 9, (x >>> 4) % 512, 1 + ((x >>> 12) % 64)),
          (x) => dev.write(x % 9, (x >>> 4) % 512, Uint8Array.of(1, 2, 3, 4), { posted: (x & 0x100) !== 0 }),
          (x) => dev.setEventFds(x % 5, 0, [spare, null, spare]),
          () => dev.migrationState(),
          () => dev.readMigrationData(64),
          () => dev.dmaLoggingReport(0x10000, 0x10000, 4096),
          () => dev.reset(),
          (x) => client.dmaMap({ iova: (x % 4) * 0x10000, size: 0x10000, memory: pool.mem, passFd: (x & 1) === 0 }),
        ];
        for (const x of input.extra) {
          if (client.closed) break;
          try {
            await deadline(ops[x % CLIENT_OPS]!(x >>> 4), 5000, `client op ${x % CLIENT_OPS}`);
          } catch (e) {
            if (e instanceof Finding) throw e;
            if (!(e instanceof Error)) throw new Finding('invariant', `op ${x % CLIENT_OPS} rejected with a non-Error: ${String(e)}`);
          }
        }
        dev.close();
        client.close();
        theirs.destroy();
        await untilTrue(() => ours.closed, 2000, 'the client socket stayed open after close()');
      },
      async probe() {
        const client = await VfioUserClient.connect(sock, { timeoutMs: 2000 });
        const dev = new VfioUserDevice(client);
        const info = await dev.info();
        if (info.numRegions < 9) throw new Finding('invariant', `probe: ${info.numRegions} regions`);
        dev.close();
        client.close();
        await untilTrue(() => real.sessions.size === 0, 5000, 'probe session stayed open');
      },
      async close() {
        real.close();
        spare.close();
        await tick(20);
        fs.rmSync(dir, { recursive: true, force: true });
      },
    };
  },
};

void CLIENT_SEEDS_CACHE;
export type { UnixSocket };
