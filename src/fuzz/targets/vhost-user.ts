/**
 * vhost-user fuzz targets: the codec (MessageChannel over a socketpair), the
 * back-end (VhostUserBackend serving a null vhost-user-blk disk) against a
 * mutated front-end, and the front-end (VhostUserFrontend) against a mutated
 * back-end. Message layouts are written here from the spec
 * (docs/interop/vhost-user.rst; shared/docs/reference/protocol-checklist.md
 * section 2), not taken from the code under test.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { connectUnix, EventFd, nativeAddon, SharedMemory, socketPair, socketPairFds, UnixSocket, type Fd } from '../../sys/index.js';
import { MessageChannel, type VhostUserMessage } from '../../vhost-user/channel.js';
import { VhostUserBackend } from '../../vhost-user/backend.js';
import { VhostUserFrontend } from '../../vhost-user/frontend.js';
import { VhostUserError } from '../../vhost-user/errors.js';
import { BackendReq, bit, ProtocolFeature, Req, VirtioFeature } from '../../vhost-user/constants.js';
import { VhostUserBlkDevice } from '../../devices/vhost-user-blk.js';
import { concat, framesExactly, generate, mutate, SeedBuilder, type FdKind, type Framing, type FuzzInput, type Seed, type WireMessage } from '../mutator.js';
import { deadline, Finding, tick, writeInput, type FdPool, type FdSource, type FuzzTarget, type Instance } from '../harness.js';
import { Rng } from '../rng.js';

export const VHOST_FRAMING: Framing = { sizeOff: 8, headerSize: 12, includesHeader: false };
/** The channel's payload limit (MAX_PAYLOAD in the spec's terms: our back-end takes at most 4096). */
const MAX_PAYLOAD = 4096;
const MAX_FRAME = 12 + MAX_PAYLOAD;

// Header flags (spec: bits 0-1 version, 2 reply, 3 need_reply).
const V = 0x1;
const REPLY = 0x4;
const NEED_REPLY = 0x8;

// Request numbers and feature bits: the spec's tables (src/vhost-user/constants.ts holds them).
const R = Req;
const B = BackendReq;
const PF = ProtocolFeature;
const VF = VirtioFeature;

/** Requests whose reply is part of the protocol, NEED_REPLY or not. */
const ALWAYS_REPLIED = new Set<number>([R.GET_FEATURES, R.GET_PROTOCOL_FEATURES, R.GET_QUEUE_NUM, R.GET_MAX_MEM_SLOTS, R.GET_VRING_BASE, R.GET_CONFIG, R.GET_INFLIGHT_FD, R.GET_STATUS, R.SET_LOG_BASE]);

/** Debugging: VDK_FUZZ_LOG=1 prints the endpoints' logs and every request, VDK_FUZZ_STATS=1 what the run reached. */
const DEBUG_LOG = process.env.VDK_FUZZ_LOG === '1';
const DEBUG_STATS = process.env.VDK_FUZZ_STATS === '1';

/** A vhost-user message seed: the 12-byte header (request, flags, size), then the body; the size is set to the body's. */
function vmsg(name: string, request: number, flags: number, body: (b: SeedBuilder) => void, fds: FdKind[] = []): Seed {
  const b = new SeedBuilder().u32(request).u32(flags).u32(0);
  body(b);
  const s = b.build(name, fds);
  new DataView(s.bytes.buffer).setUint32(8, s.bytes.length - 12, true);
  return s;
}

function u64Buf(v: bigint | number): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt(v), 0);
  return b;
}

function frame(request: number, flags: number, payload: Uint8Array = new Uint8Array(0)): Buffer {
  const h = Buffer.alloc(12 + payload.length);
  h.writeUInt32LE(request >>> 0, 0);
  h.writeUInt32LE(flags >>> 0, 4);
  h.writeUInt32LE(payload.length, 8);
  h.set(payload, 12);
  return h;
}

interface RawMsg {
  request: number;
  flags: number;
  payload: Buffer;
  fds: Fd[];
}

/**
 * One end of a vhost-user connection that only knows bytes: frames parsed by
 * hand from the 12-byte header; the fds of a read go with the message that
 * read completes. Either pulled (next()) or pushed (onMessage).
 */
class RawEnd {
  readonly sock: UnixSocket;
  #buf: Buffer = Buffer.alloc(0);
  #fds: Fd[] = [];
  #queue: RawMsg[] = [];
  #waiters: (() => void)[] = [];
  closed = false;
  /** Bytes that do not frame (a header announcing more than MAX_FRAME): the stream is garbage from there. */
  garbage = false;
  onMessage: ((m: RawMsg) => void) | null = null;
  constructor(sock: UnixSocket) {
    this.sock = sock;
    sock.on('data', (chunk, fds) => {
      if (this.closed) {
        for (const f of fds) f.close();
        return;
      }
      this.#fds.push(...fds);
      this.#buf = this.#buf.length ? Buffer.concat([this.#buf, chunk]) : Buffer.from(chunk);
      this.#parse();
      for (const w of this.#waiters.splice(0)) w();
    });
    sock.on('error', () => {});
    sock.on('close', () => this.#closed());
  }
  #parse(): void {
    while (!this.garbage && this.#buf.length >= 12) {
      const size = this.#buf.readUInt32LE(8);
      if (size > MAX_FRAME) {
        this.garbage = true;
        break;
      }
      if (this.#buf.length < 12 + size) break;
      const m: RawMsg = { request: this.#buf.readUInt32LE(0), flags: this.#buf.readUInt32LE(4), payload: Buffer.from(this.#buf.subarray(12, 12 + size)), fds: this.#fds };
      this.#fds = [];
      this.#buf = this.#buf.subarray(12 + size);
      if (this.onMessage) this.onMessage(m);
      else this.#queue.push(m);
    }
  }
  #closed(): void {
    if (this.closed) return;
    this.closed = true;
    for (const f of this.#fds) f.close();
    this.#fds = [];
    for (const w of this.#waiters.splice(0)) w();
  }
  /** The next message, null once closed with none left; throws Finding('hang') after `ms`. */
  async next(ms: number, what: string): Promise<RawMsg | null> {
    const t0 = Date.now();
    for (;;) {
      const m = this.#queue.shift();
      if (m) return m;
      if (this.closed) return null;
      const left = t0 + ms - Date.now();
      if (left <= 0) throw new Finding('hang', what);
      await new Promise<void>((r) => {
        const t = setTimeout(r, left);
        this.#waiters.push(() => {
          clearTimeout(t);
          r();
        });
      });
    }
  }
  send(request: number, flags: number, payload?: Uint8Array, fds?: readonly (Fd | number)[]): void {
    if (this.closed) return;
    this.sock.write(frame(request, flags, payload), fds?.length ? fds : null);
  }
  /** Closes the socket and every fd received and not taken. */
  close(): void {
    for (const m of this.#queue.splice(0)) for (const f of m.fds) f.close();
    this.sock.destroy();
    this.#closed();
  }
}

async function untilTrue(cond: () => boolean, ms: number, what: string): Promise<void> {
  const t0 = Date.now();
  while (!cond()) {
    if (Date.now() - t0 > ms) throw new Finding('hang', what);
    await tick(1);
  }
}

/** The /proc/self/fd link names of the open fds. */
function openFdNames(): Set<string> {
  const out = new Set<string>();
  for (const n of fs.readdirSync('/proc/self/fd')) {
    try {
      out.add(fs.readlinkSync(`/proc/self/fd/${n}`));
    } catch {
      // closed meanwhile
    }
  }
  return out;
}

function tmpDir(tag: string): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), `vdk-fuzz-${tag}-`));
}

/** Frames in the stream if it frames exactly (sizes within MAX_FRAME), else null. */
function frameCount(msgs: readonly WireMessage[]): number | null {
  const s = concat(msgs.map((m) => m.bytes));
  const dv = new DataView(s.buffer, s.byteOffset, s.length);
  let n = 0;
  let at = 0;
  while (at < s.length) {
    if (s.length - at < 12) return null;
    const size = dv.getUint32(at + 8, true);
    if (size > MAX_PAYLOAD) return null;
    at += 12 + size;
    n++;
  }
  return at === s.length ? n : null;
}

/** Whether the stream frames exactly and every header says version 1 (only then must the peer read on). */
function framesCleanly(msgs: readonly WireMessage[]): boolean {
  if (!framesExactly(msgs, VHOST_FRAMING, MAX_FRAME)) return false;
  const s = concat(msgs.map((m) => m.bytes));
  const dv = new DataView(s.buffer, s.byteOffset, s.length);
  for (let at = 0; at < s.length; at += 12 + dv.getUint32(at + 8, true)) if ((dv.getUint32(at + 4, true) & 3) !== 1) return false;
  return true;
}

/**
 * Seed lists are built once, in `VARIANTS` variants each from its own generator (building them per
 * input cost more than running it); an input picks a variant, so it stays a function of its seed.
 */
const VARIANTS = 32;
const variantCache = new Map<string, unknown[]>();
function variant<T>(key: string, rng: Rng, build: (r: Rng) => T): T {
  let v = variantCache.get(key) as T[] | undefined;
  if (!v) {
    v = Array.from({ length: VARIANTS }, (_, i) => build(new Rng(0x7685_7573 + i)));
    variantCache.set(key, v);
  }
  return v[rng.int(VARIANTS)]!;
}

// ---- the codec -------------------------------------------------------------------------------

/** Every message type either way, for the codec. */
function anySeeds(rng: Rng): Seed[] {
  return [...frontendRequestSeeds(rng, defaultLayout(rng)), ...backendReplySeeds(rng), ...backendRequestSeeds(rng)];
}

const SENTINEL = 0x7ffffff1;

export const vhostUserCodec: FuzzTarget = {
  name: 'vhost-user-codec',
  concurrency: 8,
  generate: (rng) => generate(rng, { seeds: (r) => variant('any', r, anySeeds), framing: VHOST_FRAMING, maxMsgs: 8 }),
  async start(pool: FdPool): Promise<Instance> {
    return {
      async run(input: FuzzInput) {
        const [ours, theirs] = socketPair();
        const ch = new MessageChannel(theirs, { maxPayload: MAX_PAYLOAD });
        const got: VhostUserMessage[] = [];
        let fdsGot = 0;
        let errored = false;
        let closed = false;
        let wake: (() => void) | null = null;
        ch.on('message', (m) => {
          fdsGot += m.fds.length;
          for (const f of m.fds) f.close();
          got.push(m);
          if (m.request === SENTINEL) wake?.();
        });
        ch.on('error', () => void (errored = true));
        ch.on('close', () => {
          closed = true;
          wake?.();
        });
        // What the channel sends back (each message it cut, re-sent): read by hand on our end.
        const echo = new RawEnd(ours);
        await writeInput(ours, input, pool);
        const clean = framesCleanly(input.msgs);
        if (clean && !closed) {
          const arrived = new Promise<void>((r) => (wake = r));
          ours.write(frame(SENTINEL, V, Uint8Array.of(1, 2, 3, 4)), null);
          await deadline(arrived, 5000, 'the channel cut no message from a stream that frames exactly');
        } else await tick(0);
        for (const m of got) {
          if ((m.flags & 3) !== 1) throw new Finding('invariant', `a message of version ${m.flags & 3} was delivered`);
          if (m.payload.length > MAX_PAYLOAD) throw new Finding('memory', `a payload of ${m.payload.length} bytes was delivered (limit ${MAX_PAYLOAD})`);
        }
        if (clean && !errored) {
          // The messages the stream holds, cut by hand, are what was delivered.
          const want: { request: number; flags: number; payload: Buffer }[] = [];
          const s = Buffer.from(concat(input.msgs.map((m) => m.bytes)));
          for (let at = 0; at < s.length; ) {
            const size = s.readUInt32LE(at + 8);
            want.push({ request: s.readUInt32LE(at), flags: s.readUInt32LE(at + 4), payload: s.subarray(at + 12, at + 12 + size) });
            at += 12 + size;
          }
          if (got.length !== want.length + 1) throw new Finding('invariant', `${got.length - 1} messages delivered from a stream of ${want.length}`);
          want.forEach((w, i) => {
            const g = got[i]!;
            if (g.request !== w.request || g.flags !== w.flags || !g.payload.equals(w.payload)) throw new Finding('invariant', `message ${i} delivered as request ${g.request} flags 0x${g.flags.toString(16)} ${g.payload.length} B, sent as ${w.request} 0x${w.flags.toString(16)} ${w.payload.length} B`);
          });
          // writeInput sends the fds with the bytes: an empty stream carries none.
          const sent = s.length === 0 ? 0 : input.msgs.reduce((n, m) => n + m.fds.length, 0);
          if (fdsGot !== sent) throw new Finding('invariant', `${fdsGot} fds delivered of ${sent} sent on a stream that frames exactly`);
          // Encode: each delivered message re-sent reads back the same by hand.
          const back: Buffer[] = [];
          if (!closed) for (const m of got) {
            ch.send(m.request, m.flags, m.payload);
            back.push(frame(m.request, m.flags, m.payload));
          }
          for (const b of back) {
            const m = await echo.next(5000, 'a message sent on the channel did not arrive');
            if (!m) break;
            if (!frame(m.request, m.flags, m.payload).equals(b)) throw new Finding('invariant', `send(${b.readUInt32LE(0)}) wrote other bytes than the header and payload`);
          }
        }
        const gone = new Promise<void>((r) => (wake = r));
        echo.close();
        if (!closed) await deadline(gone, 5000, 'the channel did not close after its peer did');
      },
      async probe() {},
      async close() {},
    };
  },
};

// ---- the back-end -----------------------------------------------------------------------------

/**
 * Where the front-end's memory is: one 256 KiB memfd at GPA 0, seen at UVA by the front-end (small:
 * every mapping the back-end makes counts as external memory, which drives V8's collections).
 */
const MEM_SIZE = 0x40000;
const UVA = 0x7f00_0000_0000;
/** Per queue q: descriptor table / ring at 0x4000 q, driver area + 0x1000, device area + 0x2000. */
const ringAt = (q: number): { desc: number; avail: number; used: number } => ({ desc: 0x4000 * q, avail: 0x4000 * q + 0x1000, used: 0x4000 * q + 0x2000 });
const INDIRECT_AREA = 0x8000;
const DATA_AREA = 0x10000;
const LOG_OFFSET = 0x38000;
const INFLIGHT_OFFSET = 0x20000;
const INFLIGHT_SIZE = 0x10000;
const BLK_QUEUES = 2;
const BLK_MAX_QUEUE = 256;

/** What the ring setup of an input says (so the rings written into memory match it). */
interface Layout {
  packed: boolean;
  eventIdx: boolean;
  indirect: boolean;
  logAll: boolean;
  sizes: number[];
  protocol: bigint;
  /** ACCESS_PLATFORM acked: ring and buffer addresses are IOVAs (the back-end's IOTLB). */
  iommu?: boolean;
}

const OFFERED_PROTOCOL = [PF.MQ, PF.LOG_SHMFD, PF.REPLY_ACK, PF.BACKEND_REQ, PF.RESET_DEVICE, PF.CONFIGURE_MEM_SLOTS, PF.STATUS, PF.CONFIG, PF.INFLIGHT_SHMFD, PF.DEVICE_STATE, PF.INBAND_NOTIFICATIONS];

function defaultLayout(rng: Rng): Layout {
  const size = (): number => (rng.chance(0.9) ? rng.pick([8, 16, 64, 256]) : rng.pick([1, 7, 255, 257, 0, 0x8000]));
  let protocol = 0n;
  for (const f of OFFERED_PROTOCOL) if (rng.chance(f === PF.REPLY_ACK ? 0.8 : f === PF.INBAND_NOTIFICATIONS ? 0.1 : 0.4)) protocol |= bit(f);
  if (protocol & bit(PF.INBAND_NOTIFICATIONS) && rng.chance(0.8)) protocol |= bit(PF.BACKEND_REQ) | bit(PF.REPLY_ACK);
  return { packed: rng.chance(0.3), eventIdx: rng.chance(0.5), indirect: rng.chance(0.5), logAll: rng.chance(0.15), sizes: [size(), size()], protocol };
}

function featuresOf(l: Layout): bigint {
  let f = bit(VF.VERSION_1) | bit(VF.PROTOCOL_FEATURES);
  if (l.packed) f |= bit(VF.RING_PACKED);
  if (l.eventIdx) f |= bit(VF.EVENT_IDX);
  if (l.indirect) f |= bit(VF.INDIRECT_DESC);
  if (l.logAll) f |= bit(VF.LOG_ALL);
  if (l.iommu) f |= bit(VF.ACCESS_PLATFORM);
  return f;
}

const vringState = (b: SeedBuilder, index: number, num: number): SeedBuilder => b.u32(index).u32(num);
const region = (b: SeedBuilder, gpa: number, size: number, uva: number, off: number): SeedBuilder => b.u64(gpa).u64(size).u64(uva).u64(off);

/** Valid front-end requests of every type (what a back-end receives). */
function frontendRequestSeeds(rng: Rng, l: Layout): Seed[] {
  const fl = (): number => (rng.chance(0.4) ? V | NEED_REPLY : V);
  const q = (): number => (rng.chance(0.9) ? rng.int(BLK_QUEUES) : rng.pick([2, 255, 0xffffffff]));
  const qi = q();
  const r = ringAt(qi < BLK_QUEUES ? qi : 0);
  return [
    vmsg('GET_FEATURES', R.GET_FEATURES, V, () => {}),
    vmsg('SET_FEATURES', R.SET_FEATURES, fl(), (b) => b.u64(featuresOf(l))),
    vmsg('SET_OWNER', R.SET_OWNER, fl(), () => {}),
    vmsg('RESET_OWNER', R.RESET_OWNER, fl(), () => {}),
    vmsg('SET_MEM_TABLE', R.SET_MEM_TABLE, fl(), (b) => region(b.u32(1).u32(0, false), 0, MEM_SIZE, UVA, 0), ['memfd']),
    vmsg('SET_MEM_TABLE/2', R.SET_MEM_TABLE, fl(), (b) => region(region(b.u32(2).u32(0, false), 0, MEM_SIZE / 2, UVA, 0), MEM_SIZE / 2, MEM_SIZE / 2, UVA + MEM_SIZE / 2, MEM_SIZE / 2), ['memfd', 'memfd']),
    vmsg('SET_MEM_TABLE/0', R.SET_MEM_TABLE, fl(), (b) => b.u32(0).u32(0, false)),
    vmsg('SET_LOG_BASE', R.SET_LOG_BASE, V, (b) => b.u64(0x1000).u64(LOG_OFFSET), ['memfd']),
    vmsg('SET_LOG_FD', R.SET_LOG_FD, fl(), () => {}, ['eventfd']),
    vmsg('SET_VRING_NUM', R.SET_VRING_NUM, fl(), (b) => vringState(b, qi, l.sizes[qi % 2]!)),
    vmsg('SET_VRING_ADDR', R.SET_VRING_ADDR, fl(), (b) => b.u32(qi).u32(rng.chance(0.2) ? 1 : 0).u64(UVA + r.desc).u64(UVA + r.used).u64(UVA + r.avail).u64(rng.pick([0, r.used, 0x200000]))),
    vmsg('SET_VRING_BASE', R.SET_VRING_BASE, fl(), (b) => vringState(b, qi, l.packed ? rng.pick([0x80008000, 0, 0x8000]) : rng.pick([0, 1, 0xffff]))),
    vmsg('GET_VRING_BASE', R.GET_VRING_BASE, V, (b) => vringState(b, qi, 0)),
    vmsg('SET_VRING_KICK', R.SET_VRING_KICK, fl(), (b) => b.u64(qi), ['eventfd']),
    vmsg('SET_VRING_KICK/nofd', R.SET_VRING_KICK, fl(), (b) => b.u64(qi | 0x100)),
    vmsg('SET_VRING_CALL', R.SET_VRING_CALL, fl(), (b) => b.u64(qi), ['eventfd']),
    vmsg('SET_VRING_CALL/nofd', R.SET_VRING_CALL, fl(), (b) => b.u64(qi | 0x100)),
    vmsg('SET_VRING_ERR', R.SET_VRING_ERR, fl(), (b) => b.u64(qi), ['eventfd']),
    vmsg('GET_PROTOCOL_FEATURES', R.GET_PROTOCOL_FEATURES, V, () => {}),
    vmsg('SET_PROTOCOL_FEATURES', R.SET_PROTOCOL_FEATURES, fl(), (b) => b.u64(l.protocol)),
    vmsg('GET_QUEUE_NUM', R.GET_QUEUE_NUM, V, () => {}),
    vmsg('SET_VRING_ENABLE', R.SET_VRING_ENABLE, fl(), (b) => vringState(b, qi, rng.chance(0.8) ? 1 : 0)),
    vmsg('SEND_RARP', R.SEND_RARP, fl(), (b) => b.u32(0x00163e00).u32(0x0201)),
    vmsg('NET_SET_MTU', R.NET_SET_MTU, fl(), (b) => b.u64(1500)),
    vmsg('SET_BACKEND_REQ_FD', R.SET_BACKEND_REQ_FD, fl(), () => {}, ['socket']),
    vmsg('IOTLB_MSG', R.IOTLB_MSG, V, (b) => b.u64(0).u64(0x1000).u64(UVA).u8(3).u8(2).u16(0, false).u32(0, false)),
    vmsg('SET_VRING_ENDIAN', R.SET_VRING_ENDIAN, fl(), (b) => vringState(b, qi, 1)),
    vmsg('GET_CONFIG', R.GET_CONFIG, V, (b) => b.u32(rng.pick([0, 20, 34])).u32(60).u32(0).raw(new Uint8Array(60))),
    vmsg('SET_CONFIG', R.SET_CONFIG, fl(), (b) => b.u32(rng.pick([0, 32])).u32(1).u32(0).u8(1)),
    vmsg('POSTCOPY_ADVISE', R.POSTCOPY_ADVISE, V, () => {}),
    vmsg('GET_INFLIGHT_FD', R.GET_INFLIGHT_FD, V, (b) => b.u64(0).u64(0).u16(BLK_QUEUES).u16(l.sizes[0]!).u32(0, false)),
    vmsg('SET_INFLIGHT_FD', R.SET_INFLIGHT_FD, fl(), (b) => b.u64(INFLIGHT_SIZE).u64(INFLIGHT_OFFSET).u16(rng.pick([1, 2])).u16(l.sizes[0]!).u32(0, false), ['memfd']),
    vmsg('RESET_DEVICE', R.RESET_DEVICE, fl(), () => {}),
    vmsg('VRING_KICK', R.VRING_KICK, fl(), (b) => vringState(b, qi, 0)),
    vmsg('GET_MAX_MEM_SLOTS', R.GET_MAX_MEM_SLOTS, V, () => {}),
    vmsg('ADD_MEM_REG', R.ADD_MEM_REG, fl(), (b) => region(b.u64(0, false), 0, MEM_SIZE, UVA, 0), ['memfd']),
    vmsg('ADD_MEM_REG/hi', R.ADD_MEM_REG, fl(), (b) => region(b.u64(0, false), 0x100000, 0x10000, UVA + 0x100000, 0x30000), ['memfd']),
    vmsg('REM_MEM_REG', R.REM_MEM_REG, fl(), (b) => region(b.u64(0, false), 0, MEM_SIZE, UVA, 0)),
    vmsg('SET_STATUS', R.SET_STATUS, fl(), (b) => b.u64(rng.pick([0, 1, 3, 7, 0xf, 0x4f, 0x80]))),
    vmsg('GET_STATUS', R.GET_STATUS, V, () => {}),
    vmsg('GET_SHARED_OBJECT', R.GET_SHARED_OBJECT, V, (b) => b.u64(rng.u32()).u64(rng.u32())),
    vmsg('SET_DEVICE_STATE_FD', R.SET_DEVICE_STATE_FD, V, (b) => b.u32(rng.int(2)).u32(0), [rng.pick(['devnull', 'socket', 'memfd'] as const)]),
    vmsg('CHECK_DEVICE_STATE', R.CHECK_DEVICE_STATE, V, () => {}),
    vmsg('unknown', rng.pick([0, 26, 27, 29, 30, 33, 44, 45, 1000]), fl(), (b) => b.u64(0)),
  ];
}

/** The valid opening a front-end sends (QEMU's order), then memory and the rings set up (mode 1). */
function frontendOpening(rng: Rng, l: Layout, rings: boolean): Seed[] {
  const fl = (): number => (l.protocol & bit(PF.REPLY_ACK) && rng.chance(0.5) ? V | NEED_REPLY : V);
  const out: Seed[] = [
    vmsg('GET_FEATURES', R.GET_FEATURES, V, () => {}),
    vmsg('GET_PROTOCOL_FEATURES', R.GET_PROTOCOL_FEATURES, V, () => {}),
    vmsg('SET_PROTOCOL_FEATURES', R.SET_PROTOCOL_FEATURES, V, (b) => b.u64(l.protocol)),
  ];
  if (l.protocol & bit(PF.MQ)) out.push(vmsg('GET_QUEUE_NUM', R.GET_QUEUE_NUM, V, () => {}));
  if (l.protocol & bit(PF.BACKEND_REQ) && rng.chance(0.7)) out.push(vmsg('SET_BACKEND_REQ_FD', R.SET_BACKEND_REQ_FD, fl(), () => {}, ['socket']));
  out.push(vmsg('SET_OWNER', R.SET_OWNER, fl(), () => {}));
  out.push(vmsg('SET_FEATURES', R.SET_FEATURES, fl(), (b) => b.u64(featuresOf(l))));
  if (!rings) return out;
  if (l.protocol & bit(PF.CONFIGURE_MEM_SLOTS) && rng.chance(0.7)) out.push(vmsg('ADD_MEM_REG', R.ADD_MEM_REG, fl(), (b) => region(b.u64(0, false), 0, MEM_SIZE, UVA, 0), ['memfd']));
  else out.push(vmsg('SET_MEM_TABLE', R.SET_MEM_TABLE, fl(), (b) => region(b.u32(1).u32(0, false), 0, MEM_SIZE, UVA, 0), ['memfd']));
  if (l.logAll && l.protocol & bit(PF.LOG_SHMFD)) out.push(vmsg('SET_LOG_BASE', R.SET_LOG_BASE, V, (b) => b.u64(0x1000).u64(LOG_OFFSET), ['memfd']));
  if (l.protocol & bit(PF.INFLIGHT_SHMFD) && rng.chance(0.5)) {
    if (rng.chance(0.5)) out.push(vmsg('GET_INFLIGHT_FD', R.GET_INFLIGHT_FD, V, (b) => b.u64(0).u64(0).u16(BLK_QUEUES).u16(l.sizes[0]!).u32(0, false)));
    else out.push(vmsg('SET_INFLIGHT_FD', R.SET_INFLIGHT_FD, fl(), (b) => b.u64(INFLIGHT_SIZE).u64(INFLIGHT_OFFSET).u16(1).u16(l.sizes[0]!).u32(0, false), ['memfd']));
  }
  const nq = rng.chance(0.6) ? 1 : 2;
  for (let q = 0; q < nq; q++) {
    const r = ringAt(q);
    out.push(
      vmsg('SET_VRING_NUM', R.SET_VRING_NUM, fl(), (b) => vringState(b, q, l.sizes[q]!)),
      vmsg('SET_VRING_BASE', R.SET_VRING_BASE, fl(), (b) => vringState(b, q, l.packed ? 0x80008000 : 0)),
      vmsg('SET_VRING_ADDR', R.SET_VRING_ADDR, fl(), (b) => b.u32(q).u32(l.logAll ? 1 : 0).u64(UVA + r.desc).u64(UVA + r.used).u64(UVA + r.avail).u64(r.used)),
    );
    const inband = (l.protocol & bit(PF.INBAND_NOTIFICATIONS)) !== 0n && rng.chance(0.5);
    out.push(inband ? vmsg('SET_VRING_KICK/nofd', R.SET_VRING_KICK, fl(), (b) => b.u64(q | 0x100)) : vmsg('SET_VRING_KICK', R.SET_VRING_KICK, fl(), (b) => b.u64(q), ['eventfd']));
    out.push(inband ? vmsg('SET_VRING_CALL/nofd', R.SET_VRING_CALL, fl(), (b) => b.u64(q | 0x100)) : vmsg('SET_VRING_CALL', R.SET_VRING_CALL, fl(), (b) => b.u64(q), ['eventfd']));
    if (rng.chance(0.3)) out.push(vmsg('SET_VRING_ERR', R.SET_VRING_ERR, fl(), (b) => b.u64(q), ['eventfd']));
    out.push(vmsg('SET_VRING_ENABLE', R.SET_VRING_ENABLE, fl(), (b) => vringState(b, q, 1)));
    if (inband) out.push(vmsg('VRING_KICK', R.VRING_KICK, fl(), (b) => vringState(b, q, 0)));
  }
  return out;
}

// Descriptor flags (split and packed): NEXT, WRITE, INDIRECT; packed AVAIL / USED.
const D_NEXT = 1;
const D_WRITE = 2;
const D_INDIRECT = 4;
const P_AVAIL = 1 << 7;
const P_USED = 1 << 15;

interface Desc {
  addr: number;
  len: number;
  flags: number;
}

/** One virtio-blk request chain: header (type, sector), maybe data, status byte; mostly valid, sometimes bent. */
function blkChain(r: Rng): Desc[] {
  const data = (): number => DATA_AREA + (r.int(0x7000) & ~15);
  const type = r.pick([0, 0, 1, 4, 8, 8, 11, 13, r.u32()]);
  const out: Desc[] = [{ addr: data(), len: r.chance(0.9) ? 16 : r.pick([0, 8, 15, 32]), flags: 0 }];
  const hdr = out[0]!.addr;
  const writable = type === 0 || type === 8;
  if (r.chance(0.8)) out.push({ addr: data(), len: type === 8 ? 20 : r.pick([512, 1024, 4096, 20, 513, 0]), flags: writable ? D_WRITE : 0 });
  out.push({ addr: data(), len: 1, flags: D_WRITE });
  if (r.chance(0.1)) out.push({ addr: data(), len: r.pick([1, 16, 0x10000000]), flags: r.int(8) });
  for (const d of out) {
    if (r.chance(0.05)) d.addr = r.pick([MEM_SIZE - 8, MEM_SIZE, 2 ** 40, 0xfffffffff000]);
    if (r.chance(0.05)) d.len = r.pick([0, 0xffffffff, 0x100000, MEM_SIZE]);
    if (r.chance(0.03)) d.flags ^= 1 << r.int(3);
  }
  (out as Desc[] & { hdr?: number; type?: number }).hdr = hdr;
  (out as Desc[] & { type?: number }).type = type;
  return out;
}

/**
 * The driver side of the rings in memory, from the input's seed: chains of blk requests in the
 * descriptor table (some through an indirect table, some bent: loops, bad lengths, addresses out of
 * memory), the avail ring / packed flags announcing them, sometimes plain random bytes.
 */
function writeRings(mem: Uint8Array, seed: number, l: Layout): void {
  const r = new Rng(seed);
  mem.fill(0, 0, 0x20000);
  const dv = new DataView(mem.buffer, mem.byteOffset, mem.length);
  if (r.chance(0.3)) mem.fill(0, INFLIGHT_OFFSET, INFLIGHT_OFFSET + INFLIGHT_SIZE);
  else for (let i = r.int(32); i > 0; i--) mem[INFLIGHT_OFFSET + r.int(0x2000)] = r.u32() & 0xff;
  if (r.chance(0.08)) {
    for (let o = 0; o < 0x8000; o += 4) dv.setUint32(o, r.u32(), true);
    return;
  }
  for (let q = 0; q < BLK_QUEUES; q++) {
    const size = Math.min(l.sizes[q]!, BLK_MAX_QUEUE);
    if (size < 1) continue;
    const at = ringAt(q);
    const chains = r.int(Math.min(size, 6) + 1);
    let slot = 0;
    let indirectAt = INDIRECT_AREA + q * 0x4000;
    const heads: number[] = [];
    for (let c = 0; c < chains && slot < size; c++) {
      const chain = blkChain(r);
      const hdr = (chain as Desc[] & { hdr?: number }).hdr!;
      dv.setUint32(hdr - 0 + 0, (chain as Desc[] & { type?: number }).type!, true);
      dv.setBigUint64(hdr + 8, BigInt(r.pick([0, 1, 2047, 2048, 2 ** 40])), true);
      const head = slot;
      let list = chain;
      if (l.indirect && r.chance(0.3) && indirectAt + 16 * chain.length < INDIRECT_AREA + (q + 1) * 0x4000) {
        // The chain in an indirect table, one descriptor in the ring pointing at it.
        chain.forEach((d, i) => {
          const o = indirectAt + 16 * i;
          dv.setBigUint64(o, BigInt(d.addr), true);
          dv.setUint32(o + 8, d.len, true);
          dv.setUint16(o + 12, d.flags | (i + 1 < chain.length ? D_NEXT : 0), true);
          dv.setUint16(o + 14, r.chance(0.95) ? i + 1 : r.int(8), true);
        });
        list = [{ addr: indirectAt, len: r.chance(0.9) ? 16 * chain.length : r.pick([0, 8, 17]), flags: D_INDIRECT | (r.chance(0.05) ? D_NEXT : 0) }];
        indirectAt += 16 * chain.length;
      }
      const n = Math.min(list.length, size - slot);
      for (let i = 0; i < n; i++) {
        const d = list[i]!;
        const o = at.desc + 16 * ((slot + i) % size);
        dv.setBigUint64(o, BigInt(d.addr), true);
        dv.setUint32(o + 8, d.len, true);
        const next = i + 1 < n;
        if (l.packed) {
          // id on every descriptor (the device reads the last); AVAIL set, USED clear: wrap counter 1.
          dv.setUint16(o + 12, c, true);
          dv.setUint16(o + 14, (d.flags & ~D_NEXT) | (next ? D_NEXT : 0) | (r.chance(0.97) ? P_AVAIL : P_USED), true);
        } else {
          dv.setUint16(o + 12, (d.flags & ~D_NEXT) | (next ? D_NEXT : 0), true);
          dv.setUint16(o + 14, r.chance(0.95) ? (slot + i + 1) % size : r.int(size + 2), true);
        }
      }
      heads.push(r.chance(0.97) ? head : r.int(size * 2));
      slot += n;
    }
    if (l.packed) {
      // Driver event suppression: enable (0), disable (1) or desc (2) with an offset.
      dv.setUint16(at.avail, r.int(0x8000), true);
      dv.setUint16(at.avail + 2, r.pick([0, 0, 1, 2]), true);
    } else {
      dv.setUint16(at.avail, r.chance(0.8) ? 0 : 1, true);
      dv.setUint16(at.avail + 2, r.chance(0.95) ? heads.length : r.pick([size + 1, 0xffff, 0x8000]), true);
      heads.forEach((h, i) => dv.setUint16(at.avail + 4 + 2 * (i % size), h, true));
      dv.setUint16(at.avail + 4 + 2 * size, r.int(4), true); // used_event
    }
  }
}

function fixedLayout(extra: readonly number[]): Layout {
  const x = extra[1] ?? 0;
  return { packed: (x & 1) !== 0, eventIdx: (x & 2) !== 0, indirect: (x & 4) !== 0, logAll: (x & 8) !== 0, sizes: [extra[2] ?? 8, extra[3] ?? 8], protocol: 0n };
}

interface BackendVariant {
  l: Layout;
  seeds: Seed[];
  /** Openings with the rings set up, and without. */
  rings: Seed[][];
  bare: Seed[][];
}

function backendVariant(r: Rng): BackendVariant {
  const l = defaultLayout(r);
  return { l, seeds: frontendRequestSeeds(r, l), rings: Array.from({ length: 6 }, () => frontendOpening(r, l, true)), bare: Array.from({ length: 2 }, () => frontendOpening(r, l, false)) };
}

/** struct vhost_iotlb_msg as an IOTLB_MSG seed (flags V: it is always answered). */
const iotlbSeed = (name: string, iova: number, size: number, uaddr: number, perm: number, type: number): Seed =>
  vmsg(name, R.IOTLB_MSG, V, (b) => b.u64(iova).u64(size).u64(uaddr).u8(perm).u8(type).u16(0, false).u32(0, false));
const IOTLB_UPDATE = 2;
const IOTLB_INVALIDATE = 3;

/**
 * The IOTLB an IOMMU opening sets up after the memory table: IOVA = UVA for the rings (SET_VRING_ADDR
 * gives UVA + offset) and IOVA = GPA for the buffers (the chains hold GPAs), both to the same pages;
 * often whole and read-write, sometimes partial or read-only (the back-end then misses and waits).
 */
function iotlbOpening(r: Rng): Seed[] {
  const map = (name: string, iova: number): Seed[] => {
    if (r.chance(0.8)) return [iotlbSeed(name, iova, MEM_SIZE, UVA, 3, IOTLB_UPDATE)];
    const out: Seed[] = [];
    for (let off = 0; off < MEM_SIZE; off += 0x1000) if (r.chance(0.7)) out.push(iotlbSeed(`${name}/page`, iova + off, 0x1000, UVA + off, r.pick([1, 2, 3, 3]), IOTLB_UPDATE));
    return out;
  };
  return [...map('IOTLB rings', UVA), ...map('IOTLB buffers', 0)];
}

/** An IOMMU layout: ACCESS_PLATFORM with what it needs (BACKEND_REQ, REPLY_ACK, the channel), and IOTLB requests. */
function iommuVariant(r: Rng): BackendVariant {
  const l: Layout = { ...defaultLayout(r), iommu: true };
  l.protocol |= bit(PF.BACKEND_REQ) | bit(PF.REPLY_ACK);
  const page = (): number => r.int(MEM_SIZE >> 12) << 12;
  const seeds = [
    ...frontendRequestSeeds(r, l),
    iotlbSeed('IOTLB_MSG/update page', page(), 0x1000, UVA + page(), r.pick([1, 2, 3]), IOTLB_UPDATE),
    iotlbSeed('IOTLB_MSG/update rings', UVA, MEM_SIZE, UVA, 3, IOTLB_UPDATE),
    iotlbSeed('IOTLB_MSG/update outside', 0, 0x1000, UVA + MEM_SIZE, 3, IOTLB_UPDATE),
    iotlbSeed('IOTLB_MSG/invalidate page', page(), 0x1000, 0, 0, IOTLB_INVALIDATE),
    iotlbSeed('IOTLB_MSG/invalidate all', 0, 0, 0, 0, IOTLB_INVALIDATE),
    iotlbSeed('IOTLB_MSG/invalidate rings', UVA, MEM_SIZE, 0, 0, IOTLB_INVALIDATE),
    iotlbSeed('IOTLB_MSG/miss', page(), 0, 0, 1, 1),
  ];
  const opening = (rings: boolean): Seed[] => {
    const o = frontendOpening(r, l, rings);
    // The channel the misses go on, before SET_FEATURES (which needs it negotiated, not open: QEMU opens it first).
    if (!o.some((x) => x.name === 'SET_BACKEND_REQ_FD') && r.chance(0.9)) {
      o.splice(o.findIndex((x) => x.name === 'SET_OWNER'), 0, vmsg('SET_BACKEND_REQ_FD', R.SET_BACKEND_REQ_FD, V, () => {}, ['socket']));
    }
    const mem = o.findIndex((x) => x.name === 'SET_MEM_TABLE' || x.name === 'ADD_MEM_REG');
    if (mem >= 0) o.splice(mem + 1, 0, ...iotlbOpening(r));
    return o;
  };
  return { l, seeds, rings: Array.from({ length: 6 }, () => opening(true)), bare: Array.from({ length: 2 }, () => opening(false)) };
}

/**
 * A back-end input: an opening (the handshake, often memory and rings set up; rarely mutated),
 * then valid and mutated requests of every type. extra: [memory seed, layout bits, ring sizes,
 * kicks, messages in the opening]; the opening is written and synced before the rest, so its
 * rings run (their chains are served) before the rest stops or breaks them.
 */
function backendInput(rng: Rng): FuzzInput {
  const input = backendInputOf(rng, variant('backend', rng, backendVariant), 0);
  // Behind an IOMMU in a fifth of the inputs: drawn last, so the other inputs are what they were
  // before the IOTLB existed (the long run of 10^7 before it, docs/reliability.md, stays theirs).
  return rng.chance(0.2) ? backendInputOf(rng, variant('backend-iommu', rng, iommuVariant), 0x10) : input;
}

/** extra[1] bit 4 (`iommuBit`): an IOMMU layout (the rings are written the same). */
function backendInputOf(rng: Rng, v: BackendVariant, iommuBit: number): FuzzInput {
  const l = v.l;
  const opening = rng.chance(0.05) ? [] : rng.pick(rng.chance(0.7) ? v.rings : v.bare);
  const rest = generate(rng, { seeds: () => v.seeds, framing: VHOST_FRAMING, maxMsgs: 6 });
  const head: WireMessage[] = opening.map((s) => (rng.chance(0.04) ? mutate(rng, s, v.seeds, VHOST_FRAMING) : { bytes: s.bytes, fds: s.fds }));
  const shift = head.reduce((n, m) => n + m.bytes.length, 0);
  return {
    msgs: [...head, ...rest.msgs],
    cuts: rest.cuts.map((c) => c + shift),
    extra: [rng.u32(), (l.packed ? 1 : 0) | (l.eventIdx ? 2 : 0) | (l.indirect ? 4 : 0) | (l.logAll ? 8 : 0) | iommuBit, l.sizes[0]!, l.sizes[1]!, rng.int(4), head.length, rng.chance(0.001) ? 1 : 0],
  };
}

/**
 * The input's messages from `from` to `to`, as their own input: cuts made relative, and cuts added
 * around each message with fds (a front-end sends each message in one sendmsg; the kernel then hands
 * its fds to the read that ends with it), unless `keepCuts` (the fds then go with whatever write).
 */
function part(input: FuzzInput, from: number, to: number, keepCuts: boolean): FuzzInput {
  let at = 0;
  for (let i = 0; i < from; i++) at += input.msgs[i]!.bytes.length;
  const msgs = input.msgs.slice(from, to);
  const len = msgs.reduce((n, m) => n + m.bytes.length, 0);
  const cuts = input.cuts.filter((c) => c > at && c < at + len).map((c) => c - at);
  if (!keepCuts) {
    let o = 0;
    for (const m of msgs) {
      if (m.fds.length) cuts.push(o, o + m.bytes.length);
      o += m.bytes.length;
    }
  }
  return { msgs, cuts: [...new Set(cuts)].sort((a, b) => a - b), extra: input.extra };
}
/** One back-end with its own memory, kick eventfd and sockets: inputs run at once each on their own. */
interface Slot {
  path: string;
  backend: VhostUserBackend;
  device: VhostUserBlkDevice;
  mem: SharedMemory;
  ev: EventFd;
}

const GET_ID = 8;
/** What a flooding front-end sends without reading, and how much of it the back-end may take. */
const FLOOD = 6 << 20;
const FLOOD_LIMIT = 3 << 20;
const FLOOD_REQUESTS = new Set<number>([R.GET_FEATURES, R.GET_PROTOCOL_FEATURES, R.GET_QUEUE_NUM, R.GET_MAX_MEM_SLOTS, R.GET_STATUS]);

export const vhostUserBackend: FuzzTarget = {
  name: 'vhost-user-backend',
  concurrency: 4,
  generate: backendInput,
  async start(pool: FdPool): Promise<Instance> {
    const dir = tmpDir('vub');
    const slots: Slot[] = [];
    for (let i = 0; i < 4; i++) {
      const p = path.join(dir, `b${i}.sock`);
      const device = VhostUserBlkDevice.open({ size: 1 << 20, queues: BLK_QUEUES, maxQueueSize: BLK_MAX_QUEUE });
      // ACCESS_PLATFORM offered (iommu): the IOMMU inputs ack it; a small IOTLB, so eviction runs too.
      const opts = { iommu: true, iotlbEntries: 32, ...(DEBUG_LOG ? { log: (l: string) => console.log(`b${i}: ${l}`), trace: (l: string) => console.log(`b${i}> ${l}`) } : {}) };
      slots.push({ path: p, device, backend: VhostUserBackend.listen(p, device, opts), mem: SharedMemory.create(MEM_SIZE), ev: EventFd.create() });
    }
    const free = [...slots];
    const waiting: ((s: Slot) => void)[] = [];
    const take = (): Promise<Slot> => {
      const s = free.shift();
      return s ? Promise.resolve(s) : new Promise((r) => waiting.push(r));
    };
    const give = (s: Slot): void => {
      const w = waiting.shift();
      if (w) w(s);
      else free.push(s);
    };
    /**
     * A connection the back-end has accepted (its session exists): connect() returns once the kernel
     * queued it, and a session not yet accepted would look ended, and then refuse the next front-end.
     */
    const connectSlot = async (s: Slot): Promise<RawEnd> => {
      const accepted = new Promise<void>((r) => s.backend.once('connect', () => r()));
      const c = new RawEnd(await connectUnix(s.path));
      await deadline(accepted, 5000, 'the back-end did not accept a connection');
      return c;
    };
    const ended = async (s: Slot, what: string): Promise<void> => {
      if (!s.backend.connected) return;
      const gone = new Promise<void>((r) => s.backend.once('disconnect', () => r()));
      if (s.backend.connected) await deadline(gone, 5000, `${what}: the back-end session stayed open after the front-end closed`);
    };

    const runOne = async (s: Slot, input: FuzzInput): Promise<void> => {
      writeRings(s.mem.bytes, input.extra[0] ?? 0, fixedLayout(input.extra));
      // The back-end channel (SET_BACKEND_REQ_FD): a socketpair per input; its far end is a
      // front-end that acks what asks for it, and closes once the input is over.
      // Only for inputs that send a socket (a socketpair and its reader cost more than most inputs).
      const usesSocket = input.msgs.some((m) => m.fds.includes('socket'));
      const [near, farFd] = usesSocket ? socketPairFds() : [null, null];
      // Blocking in half the inputs, as front-ends make them (QEMU's socketpair and pipes are).
      if (near && (input.extra[0] ?? 0) & 0x10) nativeAddon.setNonBlock(near.value, false);
      const nearName = near ? fs.readlinkSync(`/proc/self/fd/${near.value}`) : '';
      const far = farFd ? new RawEnd(new UnixSocket(farFd)) : null;
      let violation: Finding | null = null;
      if (far) {
        far.onMessage = (m) => {
          for (const f of m.fds) f.close();
          if (m.flags & REPLY) violation ??= new Finding('invariant', `the back-end sent a reply (request ${m.request}) on its own request channel`);
          if (m.request === B.IOTLB_MSG) {
            // A MISS: 32 bytes, type MISS, a perm of read / write / both, an address below 2^53; never NEED_REPLY.
            const p = m.payload;
            const ok = p.length === 32 && p[25] === 1 && p[24]! >= 1 && p[24]! <= 3 && p.readBigUInt64LE(0) <= BigInt(Number.MAX_SAFE_INTEGER) && !(m.flags & NEED_REPLY);
            if (!ok) violation ??= new Finding('invariant', `a malformed BACKEND_IOTLB_MSG: flags 0x${m.flags.toString(16)} ${p.toString('hex')}`);
          }
          if (m.flags & NEED_REPLY) far.send(m.request, V | REPLY, u64Buf(0));
        };
      }
      const fds: FdSource = {
        fd: (k) => (k === 'memfd' ? s.mem.fd.value : k === 'eventfd' ? s.ev.fd.value : k === 'socket' && near ? near.value : pool.fd(k)),
      };
      let c: RawEnd | null = null;
      /** The sync request: every message before it was answered or ignored, then it is (or the connection closed). */
      const sync = async (end: RawEnd): Promise<void> => {
        end.send(R.GET_QUEUE_NUM, V);
        let released = false;
        for (;;) {
          let m: RawMsg | null;
          try {
            m = await end.next(released ? 5000 : 200, 'no reply to GET_QUEUE_NUM after the input, and no close');
          } catch (e) {
            if (released) throw e;
            // A device state transfer may wait on the back-end channel socket: the front-end goes.
            released = true;
            far?.close();
            continue;
          }
          if (!m) return;
          for (const f of m.fds) f.close();
          if (m.flags !== (V | REPLY)) throw new Finding('invariant', `the back-end sent request ${m.request} with flags 0x${m.flags.toString(16)} on the front-end channel`);
          if (m.request === R.GET_QUEUE_NUM) {
            if (m.payload.length !== 8 || m.payload.readBigUInt64LE(0) !== BigInt(BLK_QUEUES)) throw new Finding('invariant', `GET_QUEUE_NUM answered ${m.payload.toString('hex')}`);
            return;
          }
        }
      };
      try {
        c = await connectSlot(s);
        const n = input.extra[5] ?? 0;
        const keepCuts = ((input.extra[0] ?? 0) & 0xf) === 0;
        const head = part(input, 0, n, keepCuts);
        const rest = part(input, n, input.msgs.length, keepCuts);
        if (input.extra[6] === 1) await flood(c, input);
        else if (n > 0) {
          await writeInput(c.sock, head, fds);
          if (!framesCleanly(head.msgs) || c.closed) {
            // The rest would only continue a broken stream.
            await writeInput(c.sock, rest, fds);
          } else {
            await sync(c);
            // The rings of the opening run: kicks, a turn of the loop for the device.
            for (let k = input.extra[4] ?? 0; k > 0; k--) s.ev.signal(1);
            await new Promise((r) => setImmediate(r));
            if (!c.closed) await writeInput(c.sock, rest, fds);
          }
        } else await writeInput(c.sock, rest, fds);
        near?.close();
        if (input.extra[6] !== 1 && framesCleanly(input.msgs) && !c.closed) await sync(c);
      } finally {
        near?.close();
        c?.close();
      }
      try {
        await ended(s, 'input');
        // No fd of the session outlives it: the socket the front-end gave (the back-end channel, a
        // device state pipe) is closed once the session is over, while the front-end keeps its end.
        if (usesSocket) await untilTrue(() => !openFdNames().has(nearName), 1000, `the back-end holds the socket the front-end gave (${nearName}) after the session ended`);
      } finally {
        far?.close();
      }
      if (violation) throw violation;
    };

    /**
     * A front-end that sends and never reads: the back-end must stop reading it once the replies it
     * owes pile up (backpressure), not buffer them without bound. FLOOD bytes of the input's requests
     * (or GET_FEATURES) go into our queue; if the back-end takes them all while we read nothing, it
     * buffered the replies. If our queue stops moving first, it pushed back.
     */
    const flood = async (c: RawEnd, input: FuzzInput): Promise<void> => {
      c.sock.pause();
      // Requests that are always answered and carry nothing (the input's, else GET_FEATURES): every
      // 12 bytes sent owe a 20-byte reply, so what it must not take is well above what it may queue.
      const owed = input.msgs.filter((m) => {
        if (m.fds.length || m.bytes.length !== 12) return false;
        const dv = new DataView(m.bytes.buffer, m.bytes.byteOffset, 12);
        return FLOOD_REQUESTS.has(dv.getUint32(0, true)) && dv.getUint32(4, true) === V && dv.getUint32(8, true) === 0;
      });
      const unit = Buffer.from(concat(owed.length ? owed.map((m) => m.bytes) : [frame(R.GET_FEATURES, V)]));
      const chunk = Buffer.concat(Array.from({ length: Math.ceil(65536 / unit.length) }, () => unit));
      for (let sent = 0; sent < FLOOD && !c.closed; sent += chunk.length) c.sock.write(chunk, null);
      // Stalled: the queue did not move in 5 turns of the loop (each turn the back-end could read).
      let last = c.sock.writableLength;
      for (let still = 0; still < 5; ) {
        await tick(2);
        if (c.closed) return;
        const now = c.sock.writableLength;
        if (FLOOD - now > FLOOD_LIMIT) throw new Finding('memory', `the back-end read ${(FLOOD - now) >> 20} MiB of requests from a front-end that read none of its replies (it buffers them without bound)`);
        still = now === last ? still + 1 : 0;
        last = now;
      }
    };

    /** A valid session: handshake, memory, ring 0 with a GET_ID request, its completion read back. */
    const probeOne = async (s: Slot): Promise<void> => {
      const c = await connectSlot(s);
      const kick = EventFd.create();
      const call = EventFd.create();
      try {
        const call1 = async (req: number, payload?: Uint8Array, fds?: (Fd | number)[], flags = V): Promise<Buffer> => {
          c.send(req, flags, payload, fds);
          const m = await c.next(5000, `probe: no reply to request ${req}`);
          if (!m) throw new Finding('invariant', `probe: the back-end closed on request ${req}`);
          for (const f of m.fds) f.close();
          if (m.request !== req || m.flags !== (V | REPLY)) throw new Finding('invariant', `probe: reply ${m.request}/0x${m.flags.toString(16)} to request ${req}`);
          return m.payload;
        };
        const acked = async (req: number, payload?: Uint8Array, fds?: (Fd | number)[]): Promise<void> => {
          const p = await call1(req, payload, fds, V | NEED_REPLY);
          if (p.length !== 8 || p.readBigUInt64LE(0) !== 0n) throw new Finding('invariant', `probe: request ${req} acked ${p.toString('hex')}`);
        };
        const features = (await call1(R.GET_FEATURES)).readBigUInt64LE(0);
        if (!(features & bit(VF.VERSION_1)) || !(features & bit(VF.PROTOCOL_FEATURES))) throw new Finding('invariant', `probe: features 0x${features.toString(16)}`);
        const proto = (await call1(R.GET_PROTOCOL_FEATURES)).readBigUInt64LE(0);
        if (!(proto & bit(PF.REPLY_ACK))) throw new Finding('invariant', `probe: protocol features 0x${proto.toString(16)}`);
        c.send(R.SET_PROTOCOL_FEATURES, V, u64Buf(bit(PF.REPLY_ACK) | bit(PF.MQ)));
        const nq = await call1(R.GET_QUEUE_NUM);
        if (nq.readBigUInt64LE(0) !== BigInt(BLK_QUEUES)) throw new Finding('invariant', `probe: GET_QUEUE_NUM ${nq.toString('hex')}`);
        await acked(R.SET_OWNER);
        await acked(R.SET_FEATURES, u64Buf(bit(VF.VERSION_1) | bit(VF.PROTOCOL_FEATURES)));
        const mt = Buffer.alloc(40);
        mt.writeUInt32LE(1, 0);
        mt.writeBigUInt64LE(0n, 8);
        mt.writeBigUInt64LE(BigInt(MEM_SIZE), 16);
        mt.writeBigUInt64LE(BigInt(UVA), 24);
        await acked(R.SET_MEM_TABLE, mt, [s.mem.fd]);
        // Ring 0, 8 entries: desc 0 header (GET_ID), desc 1 the 20-byte id, desc 2 the status.
        const mem = s.mem.bytes;
        mem.fill(0, 0, 0x20000);
        const dv = new DataView(mem.buffer, mem.byteOffset, mem.length);
        const at = ringAt(0);
        const descs: Desc[] = [
          { addr: DATA_AREA, len: 16, flags: D_NEXT },
          { addr: DATA_AREA + 0x100, len: 20, flags: D_NEXT | D_WRITE },
          { addr: DATA_AREA + 0x200, len: 1, flags: D_WRITE },
        ];
        descs.forEach((d, i) => {
          dv.setBigUint64(at.desc + 16 * i, BigInt(d.addr), true);
          dv.setUint32(at.desc + 16 * i + 8, d.len, true);
          dv.setUint16(at.desc + 16 * i + 12, d.flags, true);
          dv.setUint16(at.desc + 16 * i + 14, i + 1, true);
        });
        dv.setUint32(DATA_AREA, GET_ID, true);
        mem[DATA_AREA + 0x200] = 0xff;
        dv.setUint16(at.avail + 2, 1, true);
        const vs = (a: number, b: number): Buffer => Buffer.from(new Uint32Array([a, b]).buffer);
        await acked(R.SET_VRING_NUM, vs(0, 8));
        await acked(R.SET_VRING_BASE, vs(0, 0));
        const va = Buffer.alloc(40);
        va.writeBigUInt64LE(BigInt(UVA + at.desc), 8);
        va.writeBigUInt64LE(BigInt(UVA + at.used), 16);
        va.writeBigUInt64LE(BigInt(UVA + at.avail), 24);
        await acked(R.SET_VRING_ADDR, va);
        await acked(R.SET_VRING_CALL, u64Buf(0), [call.fd]);
        await acked(R.SET_VRING_KICK, u64Buf(0), [kick.fd]);
        await acked(R.SET_VRING_ENABLE, vs(0, 1));
        kick.signal(1);
        await untilTrue(() => dv.getUint16(at.used + 2, true) === 1, 5000, 'probe: the GET_ID request was not completed');
        const id = Buffer.from(mem.subarray(DATA_AREA + 0x100, DATA_AREA + 0x100 + 11)).toString('latin1');
        if (mem[DATA_AREA + 0x200] !== 0 || id !== 'vdevkit-blk' || dv.getUint32(at.used + 8, true) !== 21) {
          throw new Finding('invariant', `probe: GET_ID completed with status ${mem[DATA_AREA + 0x200]}, id ${JSON.stringify(id)}, length ${dv.getUint32(at.used + 8, true)}`);
        }
        const base = await call1(R.GET_VRING_BASE, vs(0, 0));
        if (base.readUInt32LE(4) !== 1) throw new Finding('invariant', `probe: GET_VRING_BASE ${base.toString('hex')} after one request`);
      } finally {
        c.close();
        kick.close();
        call.close();
      }
      await ended(s, 'probe');
    };

    return {
      async run(input) {
        const s = await take();
        try {
          await runOne(s, input);
        } finally {
          give(s);
        }
      },
      async probe() {
        for (const s of slots) await probeOne(s);
      },
      async close() {
        if (DEBUG_STATS) console.log(JSON.stringify(slots.map((s) => ({ ...s.device.stats, iotlb: s.backend.iotlbStats }))));
        for (const s of slots) {
          s.backend.close();
          s.device.close();
        }
        await tick(20);
        for (const s of slots) {
          s.mem.close();
          s.ev.close();
        }
        fs.rmSync(dir, { recursive: true, force: true });
      },
    };
  },
};

// ---- the front-end ---------------------------------------------------------------------------

/** Valid back-end replies of every type; request 0 means "the request's" (filled when sent). */
function backendReplySeeds(rng: Rng): Seed[] {
  const RF = V | REPLY;
  const u64r = (name: string, v: bigint | number): Seed => vmsg(name, 0, RF, (b) => b.u64(v));
  return [
    u64r('r/GET_FEATURES', bit(VF.VERSION_1) | bit(VF.PROTOCOL_FEATURES) | (rng.chance(0.5) ? bit(VF.RING_PACKED) | bit(VF.EVENT_IDX) : 0n)),
    u64r('r/GET_PROTOCOL_FEATURES', BigInt(rng.u32() & 0x1fffff) | bit(PF.REPLY_ACK)),
    u64r('r/GET_QUEUE_NUM', rng.pick([1, 2, 8, 0, 0x10000])),
    u64r('r/GET_MAX_MEM_SLOTS', rng.pick([8, 32, 509, 0, 1])),
    u64r('r/GET_STATUS', rng.pick([0, 0xf, 0x100])),
    u64r('r/ack', 0),
    u64r('r/nack', rng.pick([1, 22, -1])),
    vmsg('r/GET_VRING_BASE', 0, RF, (b) => vringState(b, 0, rng.pick([0, 1, 0x8000, 0xffffffff]))),
    vmsg('r/GET_CONFIG', 0, RF, (b) => b.u32(0).u32(60).u32(0).raw(rng.bytes(60))),
    vmsg('r/GET_CONFIG/4', 0, RF, (b) => b.u32(0).u32(4).u32(0).raw(rng.bytes(4))),
    vmsg('r/GET_CONFIG/empty', 0, RF, () => {}),
    vmsg('r/GET_INFLIGHT_FD', 0, RF, (b) => b.u64(rng.pick([0x1000, 0x2000, 0])).u64(0).u16(1).u16(256).u32(0, false), ['memfd']),
    vmsg('r/GET_INFLIGHT_FD/none', 0, RF, (b) => b.u64(0).u64(0).u16(1).u16(256).u32(0, false)),
    vmsg('r/SET_LOG_BASE', 0, RF, () => {}),
    vmsg('r/empty', 0, RF, () => {}),
  ];
}

/** Valid back-end-initiated requests (the SET_BACKEND_REQ_FD channel, or unsolicited on the main one). */
function backendRequestSeeds(rng: Rng): Seed[] {
  const fl = (): number => (rng.chance(0.6) ? V | NEED_REPLY : V);
  const idx = rng.pick([0, 0, 1, 255]);
  return [
    vmsg('IOTLB_MSG', B.IOTLB_MSG, fl(), (b) => b.u64(0).u64(0x1000).u64(UVA).u8(3).u8(1).u16(0, false).u32(0, false)),
    vmsg('CONFIG_CHANGE_MSG', B.CONFIG_CHANGE_MSG, fl(), () => {}),
    vmsg('VRING_HOST_NOTIFIER_MSG', B.VRING_HOST_NOTIFIER_MSG, fl(), (b) => b.u64(idx).u64(0x1000).u64(0), ['memfd']),
    vmsg('VRING_HOST_NOTIFIER_MSG/nofd', B.VRING_HOST_NOTIFIER_MSG, fl(), (b) => b.u64(idx | 0x100).u64(0).u64(0)),
    vmsg('VRING_CALL', B.VRING_CALL, V | NEED_REPLY, (b) => vringState(b, idx, 0)),
    vmsg('VRING_ERR', B.VRING_ERR, V | NEED_REPLY, (b) => vringState(b, idx, 0)),
    vmsg('SHARED_OBJECT_ADD', B.SHARED_OBJECT_ADD, fl(), (b) => b.u64(rng.u32()).u64(rng.u32())),
    vmsg('SHARED_OBJECT_REMOVE', B.SHARED_OBJECT_REMOVE, fl(), (b) => b.u64(rng.u32()).u64(rng.u32())),
    vmsg('SHARED_OBJECT_LOOKUP', B.SHARED_OBJECT_LOOKUP, fl(), (b) => b.u64(rng.u32()).u64(rng.u32()), ['socket']),
    vmsg('unknown', rng.pick([0, 9, 10, 11, 100]), fl(), (b) => b.u64(0)),
  ];
}

/** Front-end operations the target runs, in the order the input's extra lists them. */
const FE_OPS = 20;

/**
 * What a back-end answers to each front-end request the operations make, when it behaves: the
 * generator walks the operations with the protocol state they imply (so replies line up), then
 * mutates. An approximation of the front-end's logic is enough: a misaligned reply is fuzz too.
 */
function frontendInput(rng: Rng): FuzzInput {
  const RF = V | REPLY;
  const ops: number[] = [0];
  if (rng.chance(0.8)) ops.push(1);
  for (let i = rng.int(8); i > 0; i--) ops.push(rng.chance(0.3) ? 2 : rng.int(FE_OPS));
  const offered = bit(VF.VERSION_1) | (rng.chance(0.9) ? bit(VF.PROTOCOL_FEATURES) : 0n) | (rng.chance(0.2) ? bit(VF.RING_PACKED) : 0n);
  let offeredP = 0n;
  for (const f of Object.values(PF)) if (rng.chance(f === PF.REPLY_ACK ? 0.8 : 0.5)) offeredP |= bit(f);
  const frontendP = [PF.MQ, PF.LOG_SHMFD, PF.RARP, PF.REPLY_ACK, PF.NET_MTU, PF.BACKEND_REQ, PF.CONFIG, PF.BACKEND_SEND_FD, PF.HOST_NOTIFIER, PF.INFLIGHT_SHMFD, PF.RESET_DEVICE, PF.CONFIGURE_MEM_SLOTS, PF.STATUS].reduce((a, f) => a | bit(f), 0n);
  let p = offeredP & frontendP;
  if (!(p & bit(PF.BACKEND_REQ))) p &= ~(bit(PF.BACKEND_SEND_FD) | bit(PF.HOST_NOTIFIER));
  if (!(p & bit(PF.BACKEND_SEND_FD))) p &= ~bit(PF.HOST_NOTIFIER);
  const has = (f: number): boolean => (offered & bit(VF.PROTOCOL_FEATURES)) !== 0n && (p & bit(f)) !== 0n;
  const ack = (): Seed => vmsg('r/ack', 0, RF, (b) => b.u64(0));
  const u64r = (name: string, v: bigint | number): Seed => vmsg(name, 0, RF, (b) => b.u64(v));
  const replies: Seed[] = [];
  const set = (): void => void (has(PF.REPLY_ACK) && replies.push(ack()));
  let regions = 0;
  /** The reply to SET_FEATURES (its ack, or the GET_FEATURES barrier): IOTLB misses go after it. */
  let featuresReply: Seed | null = null;
  for (const op of ops) {
    switch (op) {
      case 0:
        replies.push(u64r('r/GET_FEATURES', offered));
        if (offered & bit(VF.PROTOCOL_FEATURES)) {
          replies.push(u64r('r/GET_PROTOCOL_FEATURES', offeredP));
          if (has(PF.MQ)) replies.push(u64r('r/GET_QUEUE_NUM', rng.pick([1, 2])));
          if (has(PF.CONFIGURE_MEM_SLOTS)) replies.push(u64r('r/GET_MAX_MEM_SLOTS', rng.pick([8, 509])));
          if (has(PF.BACKEND_REQ)) set();
        }
        set();
        break;
      case 1:
        if (has(PF.REPLY_ACK)) set();
        else replies.push(u64r('r/GET_FEATURES', offered));
        featuresReply ??= replies[replies.length - 1] ?? null;
        break;
      case 2:
        regions++;
        set();
        break;
      case 3:
        if (regions === 0) break;
        for (let i = 0; i < 5 + (offered & bit(VF.PROTOCOL_FEATURES) ? 1 : 0); i++) set();
        break;
      case 4:
        replies.push(vmsg('r/GET_VRING_BASE', 0, RF, (b) => vringState(b, 0, rng.int(256))));
        break;
      case 5:
        if (offered & bit(VF.PROTOCOL_FEATURES)) set();
        replies.push(vmsg('r/GET_VRING_BASE', 0, RF, (b) => vringState(b, 0, rng.int(256))));
        break;
      case 6:
        if (has(PF.CONFIG)) replies.push(vmsg('r/GET_CONFIG', 0, RF, (b) => b.u32(0).u32(60).u32(0).raw(rng.bytes(60))));
        break;
      case 7:
        if (has(PF.CONFIG)) set();
        break;
      case 8:
        if (has(PF.STATUS)) set();
        break;
      case 9:
        if (has(PF.STATUS)) replies.push(u64r('r/GET_STATUS', 0xf));
        break;
      case 10:
        if (has(PF.LOG_SHMFD)) replies.push(rng.chance(0.5) ? vmsg('r/SET_LOG_BASE', 0, RF, () => {}) : u64r('r/SET_LOG_BASE/u64', 0));
        break;
      case 11:
        if (has(PF.INFLIGHT_SHMFD)) replies.push(vmsg('r/GET_INFLIGHT_FD', 0, RF, (b) => b.u64(rng.pick([0x1000, 0x3000])).u64(0).u16(1).u16(256).u32(0, false), ['memfd']));
        break;
      case 12:
        if (has(PF.INFLIGHT_SHMFD)) set();
        break;
      case 13:
      case 14:
        if (op === 13 || has(PF.NET_MTU)) set();
        break;
      case 16:
        if (has(PF.MQ) || rng.chance(0.5)) replies.push(u64r('r/GET_QUEUE_NUM', rng.pick([1, 2])));
        break;
      case 17:
        replies.push(u64r('r/GET_MAX_MEM_SLOTS', rng.pick([8, 509])));
        break;
      case 18:
        if (regions > 0) {
          regions--;
          set();
        }
        break;
      case 19:
        set();
        break;
      default:
        break;
    }
  }
  // Back-end requests between the replies (after the handshake: the request channel exists by then).
  const { all, requests } = variant('frontend', rng, (r) => {
    const requests = backendRequestSeeds(r);
    return { requests, all: [...backendReplySeeds(r), ...requests] };
  });
  const seq: Seed[] = [];
  replies.forEach((s, i) => {
    seq.push(s);
    if (i >= 3 && rng.chance(0.15)) seq.push(rng.pick(requests));
  });
  if (rng.chance(0.3)) seq.push(...Array.from({ length: 1 + rng.int(3) }, () => rng.pick(requests)));
  const msgs: WireMessage[] = seq.map((s) => (rng.chance(0.2) ? mutate(rng, s, all, VHOST_FRAMING) : { bytes: s.bytes, fds: s.fds }));
  if (rng.chance(0.05)) msgs.splice(rng.int(msgs.length + 1), 0, { bytes: rng.bytes(rng.int(64)), fds: [] });
  if (rng.chance(0.05) && msgs.length) {
    const last = msgs[msgs.length - 1]!;
    last.bytes = last.bytes.subarray(0, rng.int(last.bytes.length + 1));
  }
  // After the input: a back-end that answers every request well (1), or one that goes away (0).
  const behaved = rng.chance(0.6) ? 1 : 0;
  // Drawn last, so the inputs without it are those of the target before it: in a third of the inputs the
  // front-end is the device's IOMMU (the GET_FEATURES reply then offers ACCESS_PLATFORM): 'identity', or a
  // translation that answers hostile entries. extra[0] bit 1 / bit 2.
  let iommu = 0;
  if (rng.chance(1 / 3)) {
    iommu = rng.chance(0.7) ? 2 : 6;
    const first = msgs[0];
    if (first && first.bytes.length === 20 && new DataView(first.bytes.buffer, first.bytes.byteOffset).getUint32(0, true) === 0) {
      const b = Uint8Array.from(first.bytes);
      new DataView(b.buffer).setUint32(12 + 4, new DataView(b.buffer).getUint32(16, true) | 2, true); // bit 33
      msgs[0] = { bytes: b, fds: first.fds };
    }
    // Misses of pages in and out of the front-end's memory (its first region is at GPA 0, 64 KiB), after the features.
    for (let n = 1 + rng.int(3); n > 0; n--) {
      const miss = vmsg('IOTLB_MSG/miss', B.IOTLB_MSG, rng.chance(0.8) ? V | NEED_REPLY : V, (b) =>
        b.u64(rng.chance(0.8) ? rng.int(0x10000) : rng.pick([0x10000, 2 ** 53, 0xffff_ffff_ffff_f000])).u64(0).u64(0).u8(rng.pick([1, 2, 3, 0, 7])).u8(rng.chance(0.9) ? 1 : rng.pick([2, 3, 4, 9])).u16(0, false).u32(0, false),
      );
      const after = featuresReply ? seq.indexOf(featuresReply) : -1;
      msgs.splice(Math.min(msgs.length, after >= 0 ? after + 1 + rng.int(3) : 3 + rng.int(4)), 0, { bytes: miss.bytes, fds: [] });
    }
  }
  return { msgs, cuts: [], extra: [behaved | iommu, ...ops] };
}

/** A well-behaved back-end's reply to `req` (null: the request has none). */
function wellBehavedReply(req: RawMsg): Buffer | null {
  if (req.flags & NEED_REPLY && !ALWAYS_REPLIED.has(req.request)) return frame(req.request, V | REPLY, u64Buf(0));
  switch (req.request) {
    case R.GET_FEATURES:
      return frame(req.request, V | REPLY, u64Buf(bit(VF.VERSION_1) | bit(VF.PROTOCOL_FEATURES)));
    case R.GET_PROTOCOL_FEATURES:
      return frame(req.request, V | REPLY, u64Buf(bit(PF.REPLY_ACK)));
    case R.GET_QUEUE_NUM:
    case R.GET_MAX_MEM_SLOTS:
      return frame(req.request, V | REPLY, u64Buf(8));
    case R.GET_STATUS:
      return frame(req.request, V | REPLY, u64Buf(0));
    case R.GET_VRING_BASE:
      return frame(req.request, V | REPLY, Buffer.from(new Uint32Array([req.payload.length >= 4 ? req.payload.readUInt32LE(0) : 0, 0]).buffer));
    case R.GET_CONFIG: {
      const p = Buffer.from(req.payload);
      p.fill(0, 12);
      return frame(req.request, V | REPLY, p);
    }
    case R.GET_INFLIGHT_FD:
      return frame(req.request, V | REPLY, Buffer.alloc(24));
    case R.SET_LOG_BASE:
      return frame(req.request, V | REPLY);
    default:
      return null;
  }
}

const SYNC_BACKEND_REQ = 0x7ffe;

/** An IOMMU that answers misses with entries a careless front-end would send on: not covering, empty, huge, without access, throwing. */
const hostileIommu = {
  translate(iova: number, perm: number): { iova: number; size: number; uaddr: number; perm: number } | null {
    switch (Math.floor(iova / 0x1000) % 7) {
      case 0:
        return { iova: iova + 0x1000, size: 0x1000, uaddr: 0x7f00_0000_0000, perm: 3 };
      case 1:
        return { iova, size: 0, uaddr: 0, perm: 3 };
      case 2:
        return { iova: 0, size: 2 ** 60, uaddr: 2 ** 53 - 1, perm };
      case 3:
        return { iova, size: 0x1000, uaddr: 0x1000, perm: 0 };
      case 4:
        throw new Error('translate threw');
      case 5:
        return { iova: -1, size: -1, uaddr: -1, perm: 9 };
      default:
        return null;
    }
  },
};

/**
 * An IOTLB_MSG the front-end sent: only with ACCESS_PLATFORM acked and an IOMMU, with a 32-byte
 * struct vhost_iotlb_msg (type UPDATE or INVALIDATE), NEED_REPLY; an identity UPDATE maps a page
 * inside one of its regions at that region's user address, read-write.
 */
function checkIotlbMsg(req: RawMsg, fe: VhostUserFrontend, mode: number, regions: Set<{ guestPhysAddr: number; size: number; userAddr: number }>): Finding | null {
  if (!mode || !fe.iommuEnabled) return new Finding('invariant', 'IOTLB_MSG sent without an IOMMU and ACCESS_PLATFORM');
  const p = req.payload;
  if (p.length !== 32 || !(req.flags & NEED_REPLY)) return new Finding('invariant', `IOTLB_MSG of ${p.length} bytes, flags 0x${req.flags.toString(16)}`);
  const iova = Number(p.readBigUInt64LE(0));
  const size = Number(p.readBigUInt64LE(8));
  const uaddr = Number(p.readBigUInt64LE(16));
  const [perm, type] = [p[24]!, p[25]!];
  if (type !== 2 && type !== 3) return new Finding('invariant', `IOTLB_MSG type ${type}`);
  if (type === 2 && (size === 0 || perm === 0 || perm > 3)) return new Finding('invariant', `IOTLB UPDATE of ${size} bytes, perm ${perm}`);
  if (mode === 2 && type === 2) {
    const r = [...regions].find((x) => iova >= x.guestPhysAddr && iova + size <= x.guestPhysAddr + x.size && uaddr === x.userAddr + (iova - x.guestPhysAddr));
    if (!r || uaddr !== r.userAddr + (iova - r.guestPhysAddr) || perm !== 3 || size > 0x1000) {
      return new Finding('invariant', `identity IOTLB UPDATE 0x${iova.toString(16)}+0x${size.toString(16)} at 0x${uaddr.toString(16)} perm ${perm}: not a page of a region`);
    }
  }
  return null;
}

export const vhostUserFrontend: FuzzTarget = {
  name: 'vhost-user-frontend',
  concurrency: 8,
  generate: frontendInput,
  async start(pool: FdPool): Promise<Instance> {
    const dir = tmpDir('vuf');
    const sockPath = path.join(dir, 'real.sock');
    // The probe talks to a real back-end.
    const disk = VhostUserBlkDevice.open({ size: 1 << 20, queues: 1 });
    const real = VhostUserBackend.listen(sockPath, disk);
    /** Requests the front-end made, by type (VDK_FUZZ_STATS prints them at the end). */
    const seen = new Map<number, number>();
    return {
      async run(input) {
        const [ours, theirs] = socketPair();
        const peer = new RawEnd(theirs);
        const behaved = ((input.extra[0] ?? 0) & 1) === 1;
        const iommuMode = (input.extra[0] ?? 0) & 6;
        /** Every region the front-end had during the input (a MISS may be answered for one removed since). */
        const everRegions = new Set<{ guestPhysAddr: number; size: number; userAddr: number }>();
        let k = 0;
        let mainSent: WireMessage[] = [];
        let backend: RawEnd | null = null;
        let backendSent: WireMessage[] = [];
        let syncing = false;
        let violation: Finding | null = null;
        const sendOn = (end: RawEnd, m: WireMessage): void => {
          if (end.closed) return;
          const fds = m.fds.map((f) => pool.fd(f));
          if (m.bytes.length) end.sock.write(m.bytes, fds.length ? fds.slice(0, 253) : null);
        };
        const isRequest = (b: Uint8Array): boolean => b.length >= 8 && (new DataView(b.buffer, b.byteOffset, b.length).getUint32(4, true) & REPLY) === 0;
        // Back-end requests at the head of what is left go out first (on the request channel when there is one).
        /**
         * A stream that does not frame (a truncated or oversized message, or an empty one where a reply
         * was due) leaves the front-end waiting for bytes: the rest of the input follows until it frames
         * with more than `before` frames, or the peer closes once nothing is left.
         */
        const settle = (before: number): void => {
          for (;;) {
            const n = frameCount(mainSent);
            if (peer.closed || (n !== null && n > before)) return;
            const more = input.msgs[k++];
            if (!more) {
              peer.close();
              return;
            }
            sendOn(peer, more);
            mainSent.push(more);
          }
        };
        const sendRequests = (): void => {
          while (k < input.msgs.length && isRequest(input.msgs[k]!.bytes)) {
            const m = input.msgs[k++]!;
            if (backend && !backend.closed) {
              sendOn(backend, m);
              backendSent.push(m);
            } else {
              // Unsolicited on the front-end channel.
              const before = frameCount(mainSent) ?? 0;
              sendOn(peer, m);
              mainSent.push(m);
              settle(before);
            }
          }
        };
        const sendReply = (req: RawMsg): void => {
          if (peer.closed) return;
          if (syncing || k >= input.msgs.length) {
            if (!behaved && !syncing) {
              peer.close();
              return;
            }
            const r = wellBehavedReply(req);
            if (r) {
              peer.sock.write(r, null);
              mainSent.push({ bytes: r, fds: [] });
            }
            return;
          }
          const before = frameCount(mainSent) ?? 0;
          const m = input.msgs[k++]!;
          const b = Uint8Array.from(m.bytes);
          if (b.length >= 4 && new DataView(b.buffer).getUint32(0, true) === 0) new DataView(b.buffer).setUint32(0, req.request, true);
          const w = { bytes: b, fds: m.fds };
          sendOn(peer, w);
          mainSent.push(w);
          settle(before);
        };
        peer.onMessage = (req) => {
          if (DEBUG_LOG) console.log(`peer< ${req.request} 0x${req.flags.toString(16)} ${req.payload.length} B; next ${k}/${input.msgs.length}`);
          seen.set(req.request, (seen.get(req.request) ?? 0) + 1);
          if (req.request === R.SET_BACKEND_REQ_FD && req.fds.length === 1) {
            backend?.close();
            backend = new RawEnd(new UnixSocket(req.fds.pop()!));
            backendSent = [];
          }
          for (const f of req.fds) f.close();
          if (req.flags & REPLY) violation ??= new Finding('invariant', `the front-end sent a reply (request ${req.request})`);
          for (const r of fe.regions) everRegions.add(r);
          if (req.request === R.IOTLB_MSG) violation ??= checkIotlbMsg(req, fe, iommuMode, everRegions);
          if (!syncing) sendRequests();
          if (req.flags & NEED_REPLY || ALWAYS_REPLIED.has(req.request)) sendReply(req);
        };
        const fe = VhostUserFrontend.fromSocket(ours, { timeoutMs: 2000, ...(DEBUG_LOG ? { log: (l: string) => console.log(`fe: ${l}`) } : {}) });
        fe.on('error', () => {});
        const kick = EventFd.create();
        const call = EventFd.create();
        const owned: SharedMemory[] = [];
        const region = (): SharedMemory => {
          const m = SharedMemory.create(0x10000);
          owned.push(m);
          return m;
        };
        const ops: (() => Promise<unknown>)[] = [
          () => fe.handshake({ queues: 1, ...(iommuMode === 2 ? { iommu: 'identity' as const } : iommuMode === 6 ? { iommu: hostileIommu } : {}) }),
          () => fe.setFeatures(bit(VF.VERSION_1) | bit(VF.RING_PACKED) | bit(VF.EVENT_IDX) | (iommuMode ? bit(VF.ACCESS_PLATFORM) : 0n)),
          () => {
            fe.addMemory(SharedMemory.create(0x10000));
            return fe.syncMemory();
          },
          () => fe.setupVring(0, { size: 256, desc: 0, driver: 0x1000, device: 0x2000, kick, call, err: null }),
          () => fe.getVringBase(0),
          () => fe.stopVring(0),
          () => fe.getConfig(0, 60),
          () => fe.setConfig(0, Uint8Array.of(1, 2, 3, 4)),
          () => fe.setStatus(0xf),
          () => fe.getStatus(),
          () => fe.setLogBase(region()),
          async () => {
            const info = await fe.getInflightFd(1, 256);
            info.memory?.close();
          },
          () => fe.setInflightFd({ memory: region(), mmapSize: 0x10000, mmapOffset: 0, numQueues: 1, queueSize: 256 }),
          () => fe.resetDevice(),
          () => fe.netSetMtu(1500),
          () => fe.sendRarp(Uint8Array.of(0, 0x16, 0x3e, 1, 2, 3)),
          () => fe.getQueueNum(),
          () => fe.getMaxMemSlots(),
          () => {
            const r = fe.regions[0];
            if (r) fe.removeMemory(r).close();
            return fe.syncMemory();
          },
          () => fe.setVringCall(0, null),
        ];
        try {
          for (const op of input.extra.slice(1)) {
            if (fe.closed) break;
            try {
              await deadline(
                (async () => ops[op % FE_OPS]!())(),
                5000,
                `front-end op ${op % FE_OPS}`,
              );
            } catch (e) {
              if (e instanceof Finding) throw e;
              if (!(e instanceof VhostUserError)) throw new Finding('invariant', `op ${op % FE_OPS} failed with ${e instanceof Error ? (e.stack ?? e.message) : String(e)} (not a VhostUserError)`);
              if (e.code === 'TIMEOUT') throw new Finding('hang', `op ${op % FE_OPS}: ${e.message} (the back-end answered or closed every request)`);
            }
          }
          if (!fe.closed) {
            // The connection still works: a well-behaved answer to GET_FEATURES is taken.
            syncing = true;
            try {
              await deadline(fe.getFeatures(), 5000, 'GET_FEATURES after the input');
            } catch (e) {
              if (e instanceof Finding) throw e;
              if (!fe.closed) throw new Finding('invariant', `GET_FEATURES after the input failed with the connection up: ${(e as Error).message}`);
            }
          }
          const be = backend as RawEnd | null;
          if (be && !be.closed && !fe.closed && framesCleanly(backendSent)) {
            // The request channel still works: an unknown request with NEED_REPLY is refused (or the channel closes).
            be.onMessage = null;
            be.send(SYNC_BACKEND_REQ, V | NEED_REPLY);
            for (;;) {
              const m = await be.next(5000, 'no reply on the back-end channel to a request with NEED_REPLY, and no close');
              if (!m) break;
              for (const f of m.fds) f.close();
              if (m.request !== SYNC_BACKEND_REQ) continue;
              if (m.flags !== (V | REPLY) || m.payload.length !== 8) throw new Finding('invariant', `back-end channel reply 0x${m.flags.toString(16)} of ${m.payload.length} B`);
              break;
            }
          }
        } finally {
          fe.close();
          fe.releaseMemory();
          for (const m of owned) m.close();
          kick.close();
          call.close();
          peer.close();
          (backend as RawEnd | null)?.close();
        }
        await untilTrue(() => ours.closed, 2000, 'the front-end socket stayed open after close()');
        if (violation) throw violation;
      },
      async probe() {
        const fe = await VhostUserFrontend.connect(sockPath, { timeoutMs: 2000 });
        try {
          await fe.handshake({ queues: 1, config: 'require' });
          const f = await fe.setFeatures(bit(VF.VERSION_1));
          if (!(f & bit(VF.VERSION_1))) throw new Finding('invariant', `probe: features 0x${f.toString(16)}`);
          const cfg = await fe.getConfig(0, 8);
          if (cfg.readBigUInt64LE(0) !== BigInt((1 << 20) / 512)) throw new Finding('invariant', `probe: capacity ${cfg.toString('hex')}`);
        } finally {
          fe.close();
        }
        await untilTrue(() => !real.connected, 5000, 'probe: the back-end session stayed open');
      },
      async close() {
        if (DEBUG_STATS) console.log(JSON.stringify(Object.fromEntries([...seen].sort((a, b) => a[0] - b[0]))));
        real.close();
        disk.close();
        await tick(20);
        fs.rmSync(dir, { recursive: true, force: true });
      },
    };
  },
};
