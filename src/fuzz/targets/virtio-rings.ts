/**
 * Virtqueue fuzz targets (`virtio-split`, `virtio-packed`): the device side of
 * the ring engine (src/virtio/) over guest memory in a real memfd mapping,
 * three regions (two adjacent in guest-physical space but not in the host
 * mapping, one after a hole) with guard pages around each.
 *
 * An input is a list of guest writes (the ring image before the queue is
 * created, more before each device round, and "TOCTOU" writes that land on
 * the k-th guest-memory lookup the engine makes, i.e. between two of its
 * reads of a chain: the guest rewriting descriptors while they are read) plus
 * the queue configuration and a seed for the device's own choices. The
 * generator writes valid rings first (chains with NEXT, INDIRECT tables,
 * WRITE flags, avail/used indexes, packed wrap counters, EVENT_IDX fields),
 * then mutates them (flags, lengths, addresses near and over region bounds,
 * loops, indirect inside indirect, huge lengths, indexes jumping by more than
 * the queue size, wrap counter lies, plain random bytes).
 *
 * The device pops until null, reads and writes the chains' views, pushes
 * (single, batch, out of order, some held across rounds), asks needsNotify,
 * enables/disables notifications, optionally tracks inflight I/O and
 * reconnects (a new queue on the same ring and inflight region, resubmit),
 * and sometimes changes the memory table. Checked on every input:
 * - only VirtioError escapes the engine (a RangeError only where the device misused push);
 * - every VirtioError but USED_ID breaks the queue, and a broken queue pops
 *   nothing, reports nothing available and writes nothing more to the rings;
 * - every view of a chain lies inside one present region of the mapping, the
 *   views add up to readableBytes / writableBytes, the chain is at most
 *   2^32 - 1 bytes and maxChainLength buffers, ids are in range and unique in flight;
 * - used idx / used descriptors move only by the chains pushed, with their id and length;
 * - needsNotify, enableNotifications, disableNotifications and avail_event
 *   agree with the spec computed here from the ring and our own count;
 * - inflight resubmission gives back the chains held at the "crash", in order;
 * - the engine writes guest memory only in its own areas (used ring / packed
 *   ring and device event area): the rest matches a shadow copy of what the
 *   guest and the device wrote, and the guard pages stay zero;
 * - bounded work: guest-memory lookups per engine call and pops per round.
 */
import { SharedMemory } from '../../sys/shm.js';
import { GuestMemory, DirtyLog, LOG_PAGE_SIZE } from '../../virtio/memory.js';
import { createDeviceQueue, type DeviceQueue, type DeviceQueueOptions } from '../../virtio/queue.js';
import { VirtioError } from '../../virtio/errors.js';
import { inflightQueueSize, PackedInflightQueue, SplitInflightQueue } from '../../virtio/inflight.js';
import type { DescChain, GuestMemoryView } from '../../virtio/types.js';
import { Finding, type FuzzTarget, type Instance } from '../harness.js';
import { mutate, type Field, type FuzzInput, type Seed, type WireMessage } from '../mutator.js';
import { Rng } from '../rng.js';

// ---------------------------------------------------------------- guest memory layout

const PAGE = 4096;
interface RegionDef {
  readonly gpa: number;
  readonly size: number;
  /** Offset in the mapping. */
  readonly host: number;
}
const R0: RegionDef = { gpa: 0x10000, size: 0x100000, host: PAGE };
const R1: RegionDef = { gpa: 0x110000, size: 0x10000, host: 2 * PAGE + 0x100000 };
const R2: RegionDef = { gpa: 0x130000, size: 0x10000, host: 3 * PAGE + 0x110000 };
const REGIONS: readonly RegionDef[] = [R0, R1, R2];
const MAP_SIZE = 4 * PAGE + 0x120000;
const MEM_END = R2.gpa + R2.size;
const GUARDS: readonly [number, number][] = [
  [0, R0.host],
  [R0.host + R0.size, R1.host],
  [R1.host + R1.size, R2.host],
  [R2.host + R2.size, MAP_SIZE],
];
const end = (r: RegionDef): number => r.gpa + r.size;

// ---------------------------------------------------------------- the input

/** extra[]: the queue configuration and the device's seed. */
const X_SIZE = 0;
const X_FLAGS = 1;
/** -1: no base option. */
const X_BASE = 2;
const X_DESC = 3;
const X_DRIVER = 4;
const X_DEVICE = 5;
/** 0: the default (queue size). */
const X_MAXCHAIN = 6;
const X_SEED = 7;
const X_ROUNDS = 8;
/** Bytes of the dirty log (with F_LOG). */
const X_LOG = 9;
const X_COUNT = 10;

const F_EVENT_IDX = 1;
const F_INDIRECT = 2;
const F_INFLIGHT = 4;
const F_RECONNECT = 8;
/** Guest writes hit areas only the device writes (used ring, device event area) or the inflight buffer. */
const F_LIES = 16;
const F_LOG = 32;
const F_MEMCHANGE = 64;
const F_MISUSE = 128;

/**
 * A guest write: u8 phase, u8 space, u16 trigger, u32 address, then the bytes.
 * Phase 0: before the queue is created; 1..rounds: before that device round;
 * PH_RESUBMIT: after the reconnect's queue is created, before resubmit();
 * PH_TOCTOU: on the `trigger`-th guest-memory lookup of the run.
 * Space 0: guest-physical address; 1: offset in the inflight buffer (the front-end's).
 */
const HDR = 8;
const PH_RESUBMIT = 0xfd;
const PH_TOCTOU = 0xff;
const MAX_ROUNDS = 8;

/** Descriptor flags (the spec's bits; not imported from the engine). */
const NEXT = 1;
const WRITE = 2;
const INDIRECT = 4;
const AVAIL = 0x80;
const USED = 0x8000;

interface Write {
  phase: number;
  space: number;
  trigger: number;
  addr: number;
  /** The message: the data is bytes[HDR..]. */
  bytes: Uint8Array;
  len: number;
}

/** Little-endian stores and loads on byte arrays (a DataView per small write costs more than the write). */
function put16(b: Uint8Array, off: number, v: number): void {
  b[off] = v & 0xff;
  b[off + 1] = (v >>> 8) & 0xff;
}

function put32(b: Uint8Array, off: number, v: number): void {
  put16(b, off, v & 0xffff);
  put16(b, off + 2, (v >>> 16) & 0xffff);
}

const get16 = (b: Uint8Array, off: number): number => b[off]! | (b[off + 1]! << 8);
const get32 = (b: Uint8Array, off: number): number => (get16(b, off) | (get16(b, off + 2) << 16)) >>> 0;

/** dst[at..] = src[from..from + n) (a loop for the small writes, set() for large ones). */
function copy(dst: Uint8Array, at: number, src: Uint8Array, from: number, n: number): void {
  if (n > 64) {
    dst.set(src.subarray(from, from + n), at);
    return;
  }
  for (let i = 0; i < n; i++) dst[at + i] = src[from + i]!;
}

function decodeWrite(m: WireMessage): Write | null {
  const b = m.bytes;
  if (b.length < HDR) return null;
  return { phase: b[0]!, space: b[1]!, trigger: get16(b, 2), addr: get32(b, 4), bytes: b, len: b.length - HDR };
}

interface RingLayout {
  packed: boolean;
  size: number;
  desc: number;
  driver: number;
  device: number;
  eventIdx: boolean;
}

/** [gpa, length) of the descriptor table / ring, driver area and device area (spec sizes, EVENT_IDX words included). */
function areas(l: RingLayout): { desc: [number, number]; driver: [number, number]; device: [number, number] } {
  const n = l.size;
  if (l.packed) return { desc: [l.desc, 16 * n], driver: [l.driver, 4], device: [l.device, 4] };
  const extra = l.eventIdx ? 2 : 0;
  return { desc: [l.desc, 16 * n], driver: [l.driver, 4 + 2 * n + extra], device: [l.device, 4 + 8 * n + extra] };
}

// ---------------------------------------------------------------- the generator

const ZERO16 = new Uint8Array(16);

type Kind = 'sdesc' | 'pdesc' | 'u16' | 'raw';

/** A write as the generator builds it: its kind says where its fields are. */
interface GenWrite {
  msg: WireMessage;
  kind: Kind;
}

const FIELDS: Record<Kind, Field[]> = {
  sdesc: [
    { off: HDR, size: 8 },
    { off: HDR + 8, size: 4 },
    { off: HDR + 12, size: 2 },
    { off: HDR + 14, size: 2 },
  ],
  pdesc: [
    { off: HDR, size: 8 },
    { off: HDR + 8, size: 4 },
    { off: HDR + 12, size: 2 },
    { off: HDR + 14, size: 2 },
  ],
  u16: [{ off: HDR, size: 2 }],
  raw: [],
};

function header(b: Uint8Array, phase: number, space: number, trigger: number, addr: number): void {
  b[0] = phase;
  b[1] = space;
  put16(b, 2, trigger);
  put32(b, 4, addr >>> 0);
}

function setAddr(b: Uint8Array, off: number, addr: number): void {
  if (addr >= 2 ** 64 - 1) {
    put32(b, off, 0xffffffff);
    put32(b, off + 4, 0xffffffff);
    return;
  }
  put32(b, off, addr % 0x1_0000_0000);
  put32(b, off + 4, Math.floor(addr / 0x1_0000_0000) >>> 0);
}

interface ChainRec {
  /** GPA of each descriptor written for the chain (ring / table entries), and the table entries' kinds. */
  descs: { gpa: number; kind: Kind; head: boolean }[];
  head: number;
  id: number;
}

class Gen {
  readonly writes: GenWrite[] = [];
  readonly chains: ChainRec[] = [];
  /** GPAs of the avail ring entries written (split). */
  readonly availSlots: number[] = [];
  lies = false;
  /** Lookups the engine is expected to make (TOCTOU triggers are drawn below this). */
  reads = 3;
  readonly l: RingLayout;
  readonly rounds: number;
  /** The data zone in R0 after the rings (GPA). */
  readonly zone: number;
  readonly indirect: boolean;

  constructor(
    readonly rng: Rng,
    l: RingLayout,
    o: { rounds: number; zone: number; indirect: boolean },
  ) {
    this.l = l;
    this.rounds = o.rounds;
    this.zone = o.zone;
    this.indirect = o.indirect;
  }

  put(phase: number, addr: number, data: Uint8Array, kind: Kind, space = 0, trigger = 0): GenWrite {
    const b = new Uint8Array(HDR + data.length);
    header(b, phase, space, trigger, addr);
    b.set(data, HDR);
    const w = { msg: { bytes: b, fds: [] }, kind };
    this.writes.push(w);
    return w;
  }

  u16(phase: number, addr: number, v: number, trigger = 0): GenWrite {
    return this.put(phase, addr, Uint8Array.of(v & 0xff, (v >>> 8) & 0xff), 'u16', 0, trigger);
  }

  desc(phase: number, gpa: number, kind: 'sdesc' | 'pdesc', addr: number, len: number, a: number, b: number, trigger = 0): GenWrite {
    // sdesc: a = flags, b = next; pdesc: a = id, b = flags.
    const w = this.put(phase, gpa, ZERO16, kind, 0, trigger);
    const d = w.msg.bytes;
    setAddr(d, HDR, addr);
    put32(d, HDR + 8, len >>> 0);
    put16(d, HDR + 12, a & 0xffff);
    put16(d, HDR + 14, b & 0xffff);
    return w;
  }

  /** A buffer length of a valid chain. */
  len(): number {
    const r = this.rng.int(100);
    if (r < 5) return 0;
    if (r < 85) return 1 + this.rng.int(256);
    return 257 + this.rng.int(3840);
  }

  /** A buffer address for `len` bytes, valid (mostly after the rings in R0; sometimes across R0/R1, in R1, R2, or anywhere). */
  addr(len: number, align = 1): number {
    const rng = this.rng;
    const r = rng.int(100);
    let a: number;
    if (r < 75 && end(R0) - this.zone > len + 64) a = this.zone + rng.int(end(R0) - this.zone - len);
    else if (r < 85) a = R0.gpa + R0.size - rng.int(Math.max(1, Math.min(len, 0x8000))); // across R0 | R1
    else if (r < 95) {
      const reg = rng.chance(0.5) ? R1 : R2;
      a = reg.gpa + rng.int(Math.max(1, reg.size - len));
    } else a = R0.gpa + rng.int(MEM_END - R0.gpa - len);
    return a - (a % align);
  }

  /** An address that is probably not all inside memory, or only just. */
  badAddr(len: number): number {
    const rng = this.rng;
    const l = this.l;
    const a = areas(l);
    const k = rng.range(-4, 4);
    return rng.pick([
      R0.gpa - 1 - rng.int(16),
      end(R0) - len + k,
      end(R1) - len + k,
      end(R1) + rng.int(0x10000),
      R2.gpa - 1,
      MEM_END - len + k,
      MEM_END,
      0,
      2 ** 32,
      2 ** 53 - 1,
      2 ** 53,
      2 ** 64 - 1,
      rng.u32(),
      a.desc[0],
      a.driver[0],
      a.device[0],
      (rng.u32() & 0x1fffff) * 0x1_0000_0000 + rng.u32(),
    ]);
  }

  badLen(): number {
    const rng = this.rng;
    const n = this.l.size;
    return rng.pick([0, 1, 2, 15, 16, 17, 0x7fffffff, 0x80000000, 0xffffffff, 0xfffffff0, 0x10000, R0.size, R0.size + 1, 16 * n, 16 * (n + 1), 16 * n - 8, rng.u32()]);
  }

  /** A split chain: `direct` descriptors in the table from `at`, maybe ending with an INDIRECT one. */
  splitChain(phase: number, first: number): { head: number; used: number } {
    const rng = this.rng;
    const n = this.l.size;
    const maxLen = Math.min(n, rng.chance(0.85) ? 3 : 16);
    const count = 1 + rng.int(maxLen);
    const indirect = this.indirect && rng.chance(0.3);
    const rec: ChainRec = { descs: [], head: first % n, id: first % n };
    const idx = (k: number): number => (first + k) % n;
    let writes = rng.int(count + 1);
    if (indirect) writes = 0; // the direct part readable, the table decides
    for (let k = 0; k < count; k++) {
      const gpa = this.l.desc + 16 * idx(k);
      const last = k === count - 1;
      if (last && indirect) {
        const m = 1 + rng.int(rng.chance(0.9) ? 4 : 32);
        const table = this.addr(16 * m, 16);
        this.desc(phase, gpa, 'sdesc', table, 16 * m, INDIRECT, 0);
        rec.descs.push({ gpa, kind: 'sdesc', head: k === 0 });
        // Entries chained from entry 0: in order, or through a permutation.
        const order = [0, ...Array.from({ length: m - 1 }, (_, i) => i + 1)];
        if (rng.chance(0.3)) for (let i = m - 1; i > 1; i--) {
          const j = 1 + rng.int(i);
          [order[i], order[j]] = [order[j]!, order[i]!];
        }
        const tw = rng.int(m + 1);
        for (let e = 0; e < m; e++) {
          const slot = order[e]!;
          const len = this.len();
          const flags = (e < m - 1 ? NEXT : 0) | (e >= m - tw ? WRITE : 0);
          this.desc(phase, table + 16 * slot, 'sdesc', this.addr(len), len, flags, e < m - 1 ? order[e + 1]! : 0);
          rec.descs.push({ gpa: table + 16 * slot, kind: 'sdesc', head: false });
        }
        this.reads += m + 1;
      } else {
        const len = this.len();
        const flags = (last ? 0 : NEXT) | (k >= count - writes ? WRITE : 0);
        this.desc(phase, gpa, 'sdesc', this.addr(len), len, flags, idx(k + 1));
        rec.descs.push({ gpa, kind: 'sdesc', head: k === 0 });
        this.reads += 1;
      }
    }
    this.chains.push(rec);
    return { head: idx(0), used: count };
  }

  /** A packed chain at ring slot `slot` with wrap counter `wrap`; returns the descriptors it took. */
  packedChain(phase: number, slot: number, wrap: boolean, id: number, room: number): number {
    const rng = this.rng;
    const n = this.l.size;
    const count = 1 + rng.int(Math.min(room, rng.chance(0.85) ? 3 : 16));
    const indirect = this.indirect && rng.chance(0.3);
    const rec: ChainRec = { descs: [], head: slot, id };
    const bits = wrap ? AVAIL : USED;
    let writes = rng.int(count + 1);
    if (indirect) writes = 0;
    let s = slot;
    for (let k = 0; k < count; k++) {
      const gpa = this.l.desc + 16 * s;
      const last = k === count - 1;
      const more = last ? 0 : NEXT;
      if (last && indirect) {
        const m = 1 + rng.int(rng.chance(0.9) ? 4 : 32);
        const table = this.addr(16 * m, 16);
        this.desc(phase, gpa, 'pdesc', table, 16 * m, id, INDIRECT | bits);
        const tw = rng.int(m + 1);
        for (let e = 0; e < m; e++) {
          const len = this.len();
          this.desc(phase, table + 16 * e, 'pdesc', this.addr(len), len, 0, e >= m - tw ? WRITE : 0);
          rec.descs.push({ gpa: table + 16 * e, kind: 'pdesc', head: false });
        }
        this.reads += m + 1;
      } else {
        const len = this.len();
        this.desc(phase, gpa, 'pdesc', this.addr(len), len, id, more | bits | (k >= count - writes ? WRITE : 0));
        this.reads += 1;
      }
      rec.descs.push({ gpa, kind: 'pdesc', head: k === 0 });
      if (++s === n) s = 0;
    }
    this.chains.push(rec);
    return count;
  }

  /** A random phase for a mutation write (before the queue, or before a round). */
  phase(): number {
    return this.rng.int(this.rounds + 1);
  }

  /** A write to the inflight buffer (the front-end's): a field of an entry or the header, or random bytes. */
  inflightLie(phase: number, trigger: number): void {
    const rng = this.rng;
    const l = this.l;
    const n = l.size;
    if (rng.chance(0.6)) {
      // A field of an entry (split: inflight, next; packed: inflight, next, last, num, id, flags, len) or of the header.
      const [hdr, ent] = l.packed ? [32, 32] : [16, 16];
      const e = rng.chance(0.7) ? rng.int(Math.min(n, 8)) : rng.int(n);
      const field = rng.chance(0.2) ? rng.pick(l.packed ? [8, 10, 12, 14, 16, 18, 20] : [8, 10, 12, 14]) : hdr + ent * e + rng.pick(l.packed ? [0, 2, 4, 6, 16, 18, 20] : [0, 6]);
      const v = rng.pick([0, 1, 2, n - 1, n, n + 1, 0x8000, 0xffff, rng.u32() & 0xffff]);
      this.put(phase, field, Uint8Array.of(v & 0xff, v >>> 8), 'raw', 1, trigger);
    } else {
      const off = rng.chance(0.3) ? rng.int(32) : rng.int(inflightQueueSize(n, l.packed));
      this.put(phase, off, rng.chance(0.5) ? rng.bytes(1 + rng.int(4)) : Uint8Array.of(rng.pick([0, 1, 2, 0xff]), rng.pick([0, 0x80, 0xff])), 'raw', 1, trigger);
    }
  }

  /** A structure-aware bad write, at `phase` (with `trigger` for TOCTOU). */
  bad(phase: number, trigger: number, inflight: boolean): void {
    const rng = this.rng;
    const l = this.l;
    const n = l.size;
    const a = areas(l);
    const chain = this.chains.length ? rng.pick(this.chains) : null;
    const d = chain ? rng.pick(chain.descs) : null;
    switch (rng.int(12)) {
      case 0:
      case 1:
      case 2: {
        // One field of a descriptor of some chain.
        if (!d) break;
        const f = rng.int(4);
        const buf = new Uint8Array(f === 0 ? 8 : f === 1 ? 4 : 2);
        const off = f === 0 ? 0 : f === 1 ? 8 : f === 2 ? 12 : 14;
        if (f === 0) setAddr(buf, 0, this.badAddr(rng.int(4096)));
        else if (f === 1) put32(buf, 0, this.badLen() >>> 0);
        else {
          const isFlags = d.kind === 'sdesc' ? f === 2 : f === 3;
          if (isFlags) put16(buf, 0, rng.chance(0.7) ? rng.pick([NEXT, WRITE, INDIRECT, NEXT | WRITE, INDIRECT | WRITE, NEXT | INDIRECT, AVAIL, USED, AVAIL | USED, AVAIL | NEXT, USED | NEXT, AVAIL | INDIRECT, 0]) | (rng.chance(0.5) ? (rng.chance(0.5) ? AVAIL : USED) : 0) : rng.u32() & 0xffff);
          else put16(buf, 0, rng.pick([0, 1, n - 1, n, n + 1, 0xffff, rng.int(n), chain!.head, rng.u32() & 0xffff]));
        }
        this.put(phase, d.gpa + off, buf, 'raw', 0, trigger);
        break;
      }
      case 3: {
        // A loop: the chain's last direct descriptor gets NEXT back to its head (split), or NEXT on a packed one.
        if (!chain || !d) break;
        if (d.kind === 'sdesc') this.put(phase, d.gpa + 12, Uint8Array.of(NEXT | (rng.chance(0.3) ? WRITE : 0), 0, chain.head & 0xff, chain.head >>> 8), 'raw', 0, trigger);
        else this.put(phase, d.gpa + 14, Uint8Array.of(NEXT | (rng.chance(0.5) ? AVAIL : 0), rng.chance(0.5) ? 0x80 : 0), 'raw', 0, trigger);
        break;
      }
      case 4: {
        // Split: avail idx jumps (by more than the size, backwards, anywhere). Packed: the driver event area.
        if (!l.packed) this.u16(phase, l.driver + 2, rng.pick([n + 1 + rng.int(n + 1), 0xffff, rng.u32(), rng.int(2 * n + 2), 0]), trigger);
        else this.put(phase, l.driver, Uint8Array.of(rng.u32() & 0xff, rng.u32() & 0xff, rng.int(4), 0), 'raw', 0, trigger);
        break;
      }
      case 5: {
        // Split: an avail ring entry out of range or a duplicate head. Packed: a wrap counter lie on a slot.
        const slot = this.availSlots.length && rng.chance(0.8) ? rng.pick(this.availSlots) : l.driver + 4 + 2 * rng.int(n);
        if (!l.packed) this.u16(phase, slot, rng.pick([n, n + rng.int(100), 0xffff, chain?.head ?? 0, rng.int(n)]), trigger);
        else {
          const fl = (rng.u32() & 7) | rng.pick([AVAIL, USED, AVAIL | USED, 0]);
          this.put(phase, l.desc + 16 * rng.int(n) + 14, Uint8Array.of(fl & 0xff, fl >>> 8), 'raw', 0, trigger);
        }
        break;
      }
      case 6: {
        // INDIRECT inside an indirect table, or on a head with NEXT.
        if (!chain) break;
        const t = chain.descs.find((x) => !x.head) ?? chain.descs[0]!;
        const at = t.kind === 'sdesc' ? 12 : 14;
        this.put(phase, t.gpa + at, Uint8Array.of(INDIRECT | (rng.chance(0.5) ? NEXT : 0) | (rng.chance(0.3) ? WRITE : 0), t.kind === 'pdesc' && rng.chance(0.7) ? 0x00 : 0), 'raw', 0, trigger);
        break;
      }
      case 7: {
        // Huge lengths on several descriptors (the 2^32 - 1 bound).
        if (!chain) break;
        for (const x of chain.descs) if (rng.chance(0.7)) this.put(phase, x.gpa + 8, Uint8Array.of(0xff, 0xff, 0xff, rng.pick([0xff, 0x7f, 0x80])), 'raw', 0, trigger);
        break;
      }
      case 8: {
        // Random bytes over a part of the rings (sometimes the device's own areas: a lie).
        const which = rng.pick([a.desc, a.desc, a.driver, a.device]);
        const off = rng.int(which[1]);
        const len = 1 + rng.int(Math.min(64, which[1] - off));
        this.put(phase, which[0] + off, rng.bytes(len), 'raw', 0, trigger);
        break;
      }
      case 9: {
        // The guest rewrites a whole descriptor: another chain's, or a valid-looking one elsewhere.
        if (!d) break;
        const len = rng.chance(0.5) ? this.len() : this.badLen();
        const addr = rng.chance(0.5) ? this.addr(len) : this.badAddr(len);
        if (d.kind === 'sdesc') this.desc(phase, d.gpa, 'sdesc', addr, len, rng.u32() & 7, rng.int(n + 1), trigger);
        else this.desc(phase, d.gpa, 'pdesc', addr, len, rng.chance(0.5) ? chain!.id : rng.u32(), (rng.u32() & 7) | rng.pick([AVAIL, USED, 0, AVAIL | USED]), trigger);
        break;
      }
      case 10: {
        // Event fields: split used_event (and the avail flags), packed driver event off_wrap / flags.
        if (!l.packed) {
          if (l.eventIdx) this.u16(phase, l.driver + 4 + 2 * n, rng.u32(), trigger);
          else this.u16(phase, l.driver, rng.int(4), trigger);
        } else this.u16(phase, l.driver + rng.pick([0, 2]), rng.u32(), trigger);
        break;
      }
      default: {
        // The inflight buffer (the front-end's memory) or the used ring: both lies.
        if (inflight && rng.chance(0.6)) this.inflightLie(phase, trigger);
        else this.put(phase, a.device[0] + rng.int(a.device[1]), rng.bytes(1 + rng.int(4)), 'raw', 0, trigger);
      }
    }
  }
}

function pickSize(rng: Rng, packed: boolean): number {
  if (rng.chance(0.01)) return rng.pick(packed ? [0, 32769, 65536, 1.5] : [0, 3, 6, 65536, 32769]);
  const r = rng.int(100);
  if (!packed) {
    const k = r < 60 ? rng.int(5) : r < 90 ? 5 + rng.int(4) : r < 98 ? 9 + rng.int(4) : 13 + rng.int(3);
    return 1 << k;
  }
  if (r < 60) return 1 + rng.int(16);
  if (r < 90) return 17 + rng.int(240);
  if (r < 98) return 257 + rng.int(3840);
  return 4097 + rng.int(32768 - 4096);
}

function align(v: number, a: number): number {
  return Math.ceil(v / a) * a;
}

/** One input for the split or packed target. */
export function generateRing(rng: Rng, packed: boolean): FuzzInput {
  const size = pickSize(rng, packed);
  const n = Number.isInteger(size) && size >= 1 && size <= 32768 ? size : 8;
  let flags = 0;
  if (rng.chance(0.5)) flags |= F_EVENT_IDX;
  if (rng.chance(0.6)) flags |= F_INDIRECT;
  if (rng.chance(0.25)) flags |= F_INFLIGHT | (rng.chance(0.6) ? F_RECONNECT : 0);
  if (rng.chance(0.15)) flags |= F_LOG;
  if (rng.chance(0.05)) flags |= F_MEMCHANGE;
  if (rng.chance(0.05)) flags |= F_MISUSE;
  const eventIdx = (flags & F_EVENT_IDX) !== 0;
  // Ring placement: consecutive and aligned in R0 (mostly), else misaligned, outside memory, across R0 | R1, overlapping, in R1 / R2.
  const l0: RingLayout = { packed, size: n, desc: 0, driver: 0, device: 0, eventIdx };
  const a0 = areas(l0);
  const total = a0.desc[1] + a0.driver[1] + a0.device[1] + 64;
  let at = R0.gpa + (R0.size - total > 0x10000 ? PAGE * rng.int(16) : 0);
  const desc = at;
  at = align(at + a0.desc[1] + (rng.chance(0.3) ? rng.int(64) : 0), packed ? 4 : 2);
  const driver = at;
  at = align(at + a0.driver[1] + (rng.chance(0.3) ? rng.int(64) : 0), 4);
  const device = at;
  const l: RingLayout = { ...l0, desc, driver, device };
  let zone = align(device + a0.device[1], 16);
  if (rng.chance(0.1)) {
    const which = rng.int(3);
    const v = rng.pick([
      (x: number) => x + rng.pick([1, 2, 8]),
      () => MEM_END - rng.int(64),
      () => end(R0) - 8 * rng.int(8),
      () => end(R1) + 16 * rng.int(16),
      () => (which === 0 ? l.driver : l.desc),
      () => R1.gpa + 16 * rng.int(64),
      () => R2.gpa + 16 * rng.int(64),
      () => rng.u32(),
    ])(which === 0 ? l.desc : which === 1 ? l.driver : l.device);
    if (which === 0) l.desc = v;
    else if (which === 1) l.driver = v;
    else l.device = v;
    zone = R0.gpa + R0.size / 2;
  }
  let base = -1;
  if (!packed) base = rng.chance(0.8) ? 0 : rng.u32() & 0xffff;
  else if (rng.chance(0.3)) {
    const side = (): number => rng.int(n) | (rng.chance(0.7) ? 0x8000 : 0);
    base = rng.chance(0.5) ? side() : (side() | (side() << 16)) >>> 0;
    if (rng.chance(0.03)) base = rng.u32();
  }
  const rounds = 1 + rng.int(rng.chance(0.9) ? 4 : MAX_ROUNDS);
  const g = new Gen(rng, l, { rounds, zone, indirect: (flags & F_INDIRECT) !== 0 || rng.chance(0.05) });
  const inflight = (flags & F_INFLIGHT) !== 0;

  if (rng.chance(0.03)) {
    // Plain random bytes: the descriptor table / ring and the driver area, then random rounds of the same.
    g.put(0, l.desc, rng.bytes(Math.min(16 * n, 4096)), 'raw');
    g.put(0, l.driver, rng.bytes(Math.min(areas(l).driver[1], 512)), 'raw');
    for (let r = 1; r <= rounds; r++) g.put(r, l.desc + 16 * rng.int(n), rng.bytes(1 + rng.int(64)), 'raw');
    g.reads = 64;
  } else if (n >= 4096 && rng.chance(0.3)) {
    // A chain of more than 2^32 - 1 bytes inside memory: 4097+ descriptors each covering R0 (LENGTH_OVERFLOW).
    const k = Math.min(n, 4097 + rng.int(8));
    const b = new Uint8Array(16 * k);
    for (let i = 0; i < k; i++) {
      setAddr(b, 16 * i, R0.gpa);
      put32(b, 16 * i + 8, R0.size);
      if (packed) {
        put16(b, 16 * i + 12, 0);
        put16(b, 16 * i + 14, (i < k - 1 ? NEXT : 0) | AVAIL | (rng.chance(0.5) ? WRITE : 0));
      } else {
        put16(b, 16 * i + 12, i < k - 1 ? NEXT : 0);
        put16(b, 16 * i + 14, i + 1);
      }
    }
    g.put(0, l.desc, b, 'raw');
    if (!packed) {
      g.u16(0, l.driver + 2, base + 1);
      g.u16(0, l.driver + 4 + 2 * (base % n), 0);
    }
  } else if (!packed) {
    // The split driver: avail idx starts at the base, used idx usually too.
    let avail = base;
    g.u16(0, l.driver + 2, avail);
    g.u16(0, l.device + 2, rng.chance(0.8) ? base : rng.u32());
    if (rng.chance(0.3)) g.u16(0, l.driver, 1); // VRING_AVAIL_F_NO_INTERRUPT
    if (eventIdx) g.u16(0, l.driver + 4 + 2 * n, (avail + rng.range(-2, 4)) & 0xffff);
    let next = 0;
    for (let r = 1; r <= rounds; r++) {
      const chains = 1 + rng.int(Math.min(n, rng.chance(0.8) ? 4 : 32));
      let room = n;
      for (let c = 0; c < chains && room > 0; c++) {
        const { head, used } = g.splitChain(r, next);
        next = (next + used) % n;
        room -= used;
        g.u16(r, l.driver + 4 + 2 * (avail % n), head);
        g.availSlots.push(l.driver + 4 + 2 * (avail % n));
        avail = (avail + 1) & 0xffff;
      }
      g.u16(r, l.driver + 2, avail);
      if (eventIdx && rng.chance(0.3)) g.u16(r, l.driver + 4 + 2 * n, (avail + rng.range(-4, 2)) & 0xffff);
    }
  } else {
    // The packed driver: slots from the base's avail side, wrap counter from its bit 15.
    const b = base < 0 ? 0x8000 : base & 0xffff;
    let slot = (b & 0x7fff) % n;
    let wrap = (b & 0x8000) !== 0;
    const ev = rng.pick([0, 0, 1, 2, 2, 3]); // ENABLE, DISABLE, DESC, reserved
    g.put(0, l.driver, Uint8Array.of(rng.int(256), (rng.int(128) % 0x80) | (rng.chance(0.6) ? 0x80 : 0), ev, 0), 'raw');
    let id = rng.chance(0.8) ? 0 : rng.u32() & 0xffff;
    for (let r = 1; r <= rounds; r++) {
      let room = n;
      const chains = 1 + rng.int(Math.min(n, rng.chance(0.8) ? 4 : 32));
      for (let c = 0; c < chains && room > 0; c++) {
        const used = g.packedChain(r, slot, wrap, id, room);
        room -= used;
        id = rng.chance(0.9) ? (id + 1) % Math.max(n, 1) : rng.u32() & 0xffff;
        slot += used;
        if (slot >= n) {
          slot -= n;
          wrap = !wrap;
        }
      }
      if (rng.chance(0.2)) g.u16(r, l.driver, ((slot + rng.range(-2, 2) + n) % n) | (wrap ? 0x8000 : 0));
    }
  }

  // Mutations: none (a valid ring), a few, or many; TOCTOU writes on the k-th lookup.
  if (!rng.chance(0.3)) {
    const muts = 1 + rng.int(rng.chance(0.2) ? 12 : 3);
    for (let i = 0; i < muts; i++) {
      const roll = rng.int(10);
      if (roll < 4) g.bad(PH_TOCTOU, 1 + rng.int(Math.min(0xffff, g.reads + 4)), inflight);
      else if (roll < 8) g.bad(g.phase(), 0, inflight);
      else if (roll < 9 && g.writes.length) {
        // The generic mutator on one write (its address, fields, bytes).
        const k = rng.int(g.writes.length);
        const w = g.writes[k]!;
        const seed: Seed = { name: w.kind, bytes: w.msg.bytes, fields: [{ off: 4, size: 4 }, ...FIELDS[w.kind]], fds: [] };
        const m = mutate(rng, seed, [seed], null);
        g.writes[k] = { msg: { bytes: m.bytes, fds: [] }, kind: w.kind };
      } else if (inflight) g.inflightLie(PH_RESUBMIT, 0);
      else g.bad(PH_TOCTOU, 1 + rng.int(Math.min(0xffff, g.reads + 4)), inflight);
    }
  }
  // Writes after the queue exists into the device's areas or the inflight buffer are lies.
  const ar = areas(l);
  const [ds, dl] = ar.device;
  for (const w of g.writes) {
    const d = decodeWrite(w.msg);
    if (!d || d.phase === 0) continue;
    if (d.space !== 0 || (d.addr < ds + dl && ds < d.addr + d.len)) g.lies = true;
  }
  if (g.lies) flags |= F_LIES;
  const extra = new Array<number>(X_COUNT).fill(0);
  extra[X_SIZE] = size;
  extra[X_FLAGS] = flags;
  extra[X_BASE] = base;
  extra[X_DESC] = l.desc;
  extra[X_DRIVER] = l.driver;
  extra[X_DEVICE] = l.device;
  extra[X_MAXCHAIN] = rng.chance(0.8) ? 0 : 1 + rng.int(Math.min(65536, n + 4));
  extra[X_SEED] = rng.u32();
  extra[X_ROUNDS] = rounds;
  extra[X_LOG] = rng.pick([8, 16, 40, 40, 40]);
  return { msgs: g.writes.map((w) => w.msg), cuts: [], extra };
}

// ---------------------------------------------------------------- the device under test

/** Guest memory as the engine sees it: every lookup counted, the scheduled guest writes done on the k-th. */
class ScribbleMemory implements GuestMemoryView {
  reads = 0;
  /** Scheduled writes done so far. */
  applied = 0;
  /** Lookups in the current engine call, and the bound. */
  opReads = 0;
  opLimit = Infinity;
  paused = false;
  #next = 0;

  constructor(
    readonly inner: GuestMemory,
    readonly scheduled: readonly Write[],
    readonly apply: (w: Write) => void,
    readonly deadline: number,
  ) {}

  get generation(): number {
    return this.inner.generation;
  }

  #tick(): void {
    this.reads++;
    if (++this.opReads > this.opLimit) throw new Finding('hang', `an engine call made more than ${this.opLimit} guest-memory lookups`);
    if ((this.reads & 1023) === 0 && performance.now() > this.deadline) throw new Finding('hang', 'one input ran for more than 5 s');
    if (this.paused) return;
    const s = this.scheduled;
    while (this.#next < s.length && s[this.#next]!.trigger <= this.reads) {
      this.apply(s[this.#next++]!);
      this.applied++;
    }
  }

  view(gpa: number, length: number): Uint8Array | null {
    this.#tick();
    return this.inner.view(gpa, length);
  }

  slices(gpa: number, length: number): Uint8Array[] {
    this.#tick();
    return this.inner.slices(gpa, length);
  }

  uvaToGpa(uva: number, length: number): number {
    return this.inner.uvaToGpa(uva, length);
  }
}

interface Held {
  c: DescChain;
  id: number;
  descCount: number;
  writable: Uint8Array[];
  writableBytes: number;
  /** Pop order (inflight resubmission comes back in it). */
  seq: number;
}

function describe(e: unknown): string {
  return e instanceof Error ? (e.stack ?? e.message) : String(e);
}

const MAX_U32 = 0xffffffff;
const WRITE_BUDGET = 4096;

/** The fixed state of one target instance: the mapping, its shadow, the inflight buffer. */
class Rig {
  readonly shm = SharedMemory.create(MAP_SIZE, { name: 'vdevkit-fuzz-rings' });
  readonly map = this.shm.bytes;
  readonly shadow = new Uint8Array(MAP_SIZE);
  readonly inflightShm = SharedMemory.create(inflightQueueSize(32768, true), { name: 'vdevkit-fuzz-inflight' });
  /** Buffers over the mapping and the shadow, for range compares without allocating. */
  readonly mapBuf = Buffer.from(this.map.buffer, this.map.byteOffset, this.map.length);
  readonly shadowBuf = Buffer.from(this.shadow.buffer);
  /** Snapshots of ring areas (at their mapping offsets) for the broken-queue check. */
  readonly scratch = Buffer.alloc(MAP_SIZE);

  close(): void {
    this.shm.close();
    this.inflightShm.close();
  }
}

/** Sorted, overlapping and touching ranges joined. */
function merge(ranges: [number, number][]): [number, number][] {
  if (ranges.length < 2) return ranges;
  ranges.sort((a, b) => a[0] - b[0]);
  const out: [number, number][] = [[ranges[0]![0], ranges[0]![1]]];
  for (let i = 1; i < ranges.length; i++) {
    const r = ranges[i]!;
    const last = out[out.length - 1]!;
    if (r[0] <= last[1]) last[1] = Math.max(last[1], r[1]);
    else out.push([r[0], r[1]]);
  }
  return out;
}

/** One input's run. */
class RingRun {
  readonly rig: Rig;
  readonly packed: boolean;
  readonly n: number;
  readonly flags: number;
  readonly layout: RingLayout;
  readonly rng: Rng;
  readonly memory = new GuestMemory();
  readonly mem: ScribbleMemory;
  readonly writes: Write[];
  readonly present = [true, true, true];
  /** Host ranges written (guest and device writes): zeroed afterwards, compared with the shadow. */
  readonly dirty: [number, number][] = [];
  readonly log: DirtyLog | null;
  inflightBytes: Uint8Array | null = null;
  q: DeviceQueue | null = null;
  opts: DeviceQueueOptions | null = null;
  readonly held = new Map<number, Held>();
  seq = 0;
  popped = 0;
  /** Model: split used idx / packed used slot and wrap; needsNotify's previous index and count. */
  usedIdx = 0;
  usedWrap = true;
  descsInFlight = 0;
  pushedSince = 0;
  signalled = 0;
  valid = false;
  notify = true;
  /** The queue broke: the device stops (pushes what it holds, no more pops). */
  stopped = false;
  /** A queue was created (the engine owns its areas from then on). */
  created = false;
  /** The device pushes nothing while popping (the round before a crash). */
  holding = false;
  /** The rings overlap (the engine's own writes may change what the guest wrote): no reference walk. */
  readonly overlap: boolean;

  constructor(rig: Rig, packed: boolean, input: FuzzInput) {
    this.rig = rig;
    this.packed = packed;
    const x = (i: number): number => {
      const v = input.extra[i];
      return typeof v === 'number' && Number.isFinite(v) ? v : 0;
    };
    this.flags = x(X_FLAGS);
    const size = x(X_SIZE);
    this.n = Number.isInteger(size) && size >= 1 && size <= 65536 ? size : 0;
    this.layout = { packed, size: this.n, desc: x(X_DESC), driver: x(X_DRIVER), device: x(X_DEVICE), eventIdx: (this.flags & F_EVENT_IDX) !== 0 };
    this.rng = new Rng(x(X_SEED) >>> 0);
    this.writes = [];
    for (const m of input.msgs) {
      const w = decodeWrite(m);
      if (w) this.writes.push(w);
    }
    const scheduled = this.writes.filter((w) => w.phase === PH_TOCTOU).sort((a, b) => a.trigger - b.trigger);
    this.mem = new ScribbleMemory(this.memory, scheduled, (w) => this.guestWrite(w), performance.now() + 5000);
    for (let i = 0; i < REGIONS.length; i++) this.addRegion(i);
    const ar = areas(this.layout);
    const list = [ar.desc, ar.driver, ar.device];
    this.overlap = list.some(([a, al], i) => list.some(([b, bl], j) => i < j && a < b + bl && b < a + al));
    this.log = (this.flags & F_LOG) !== 0 ? new DirtyLog(new Uint8Array(Math.max(1, Math.min(1024, x(X_LOG))))) : null;
    const mc = x(X_MAXCHAIN);
    const base = x(X_BASE);
    this.opts = {
      memory: this.mem,
      size,
      packed,
      desc: this.layout.desc,
      driver: this.layout.driver,
      device: this.layout.device,
      eventIdx: this.layout.eventIdx,
      indirect: (this.flags & F_INDIRECT) !== 0,
      log: this.log,
      ...(base >= 0 ? { base } : {}),
      ...(Number.isInteger(mc) && mc >= 1 && mc <= 65536 ? { maxChainLength: mc } : {}),
    };
  }

  get maxChain(): number {
    return this.opts?.maxChainLength ?? this.n;
  }

  addRegion(i: number): void {
    const r = REGIONS[i]!;
    this.memory.add({ guestPhysAddr: r.gpa, size: r.size, userAddr: 0x7f00_0000_0000 + r.gpa, mmapOffset: r.host }, this.rig.map.subarray(r.host, r.host + r.size));
    this.present[i] = true;
  }

  removeRegion(i: number): void {
    const r = REGIONS[i]!;
    this.memory.remove({ guestPhysAddr: r.gpa, size: r.size, userAddr: 0x7f00_0000_0000 + r.gpa });
    this.present[i] = false;
  }

  /** The guest (or the front-end, space 1) writes: only inside its memory; mirrored in the shadow. */
  guestWrite(w: Write): void {
    if (w.space === 1) {
      const b = this.inflightBytes;
      if (!b || w.addr >= b.length) return;
      copy(b, w.addr, w.bytes, HDR, Math.min(w.len, b.length - w.addr));
      return;
    }
    const lo = w.addr;
    const hi = w.addr + w.len;
    for (const r of REGIONS) {
      const s = Math.max(lo, r.gpa);
      const e = Math.min(hi, end(r));
      if (s >= e) continue;
      const h = r.host + (s - r.gpa);
      copy(this.rig.map, h, w.bytes, HDR + s - lo, e - s);
      copy(this.rig.shadow, h, w.bytes, HDR + s - lo, e - s);
      this.dirty.push([h, h + e - s]);
    }
  }

  phase(p: number): void {
    for (const w of this.writes) if (w.phase === p) this.guestWrite(w);
  }

  /** An engine call: VirtioError returned, anything else but a Finding is one. */
  call<T>(what: string, fn: () => T, limit = 2 * this.maxChain + this.n + 16): { ok: true; v: T } | { ok: false; err: VirtioError } {
    this.mem.opReads = 0;
    this.mem.opLimit = limit;
    try {
      return { ok: true, v: fn() };
    } catch (e) {
      if (e instanceof Finding) throw e;
      if (e instanceof VirtioError) return { ok: false, err: e };
      throw new Finding('exception', `${what} threw a non-VirtioError: ${describe(e)}`);
    } finally {
      this.mem.opLimit = Infinity;
    }
  }

  // ---- memory reads for the checks (DataView over the mapping at a GPA; null when not in one present region)

  #dv(gpa: number, len: number): DataView | null {
    for (let i = 0; i < REGIONS.length; i++) {
      const r = REGIONS[i]!;
      if (gpa >= r.gpa && gpa + len <= end(r)) return new DataView(this.rig.map.buffer, r.host + gpa - r.gpa, len);
    }
    return null;
  }

  u16(gpa: number): number {
    return this.#dv(gpa, 2)?.getUint16(0, true) ?? -1;
  }

  u32(gpa: number): number {
    return this.#dv(gpa, 4)?.getUint32(0, true) ?? -1;
  }

  // ---- checks

  checkView(v: Uint8Array, what: string): void {
    if (!(v instanceof Uint8Array) || v.buffer !== this.rig.map.buffer || v.length === 0) {
      throw new Finding('invariant', `${what}: a view that is not a non-empty view of guest memory`);
    }
    for (let i = 0; i < REGIONS.length; i++) {
      const r = REGIONS[i]!;
      if (this.present[i] && v.byteOffset >= r.host && v.byteOffset + v.length <= r.host + r.size) return;
    }
    throw new Finding('invariant', `${what}: view at mapping offset ${v.byteOffset} +${v.length} is outside guest memory`);
  }

  checkChain(c: DescChain, what: string): void {
    let rb = 0;
    let wb = 0;
    for (const v of c.readable) {
      this.checkView(v, what);
      rb += v.length;
    }
    for (const v of c.writable) {
      this.checkView(v, what);
      wb += v.length;
    }
    if (rb !== c.readableBytes || wb !== c.writableBytes) throw new Finding('invariant', `${what}: views hold ${rb}/${wb} bytes, the chain says ${c.readableBytes}/${c.writableBytes}`);
    if (rb + wb > MAX_U32) throw new Finding('invariant', `${what}: chain of ${rb + wb} bytes`);
    if (c.readable.length + c.writable.length > 2 * this.maxChain) throw new Finding('invariant', `${what}: ${c.readable.length + c.writable.length} views for at most ${this.maxChain} buffers`);
    if (!Number.isInteger(c.id) || c.id < 0 || c.id > (this.packed ? 0xffff : this.n - 1)) throw new Finding('invariant', `${what}: chain id ${String(c.id)}`);
    if (this.held.has(c.id)) throw new Finding('invariant', `${what}: chain id ${c.id} is already in flight`);
    if (!this.packed && c.descCount !== 1) throw new Finding('invariant', `${what}: split chain with descCount ${c.descCount}`);
    if (this.packed && (!Number.isInteger(c.descCount) || c.descCount < 1 || this.descsInFlight + c.descCount > this.n)) {
      throw new Finding('invariant', `${what}: packed chain of ${String(c.descCount)} descriptors with ${this.descsInFlight} in flight on a ring of ${this.n}`);
    }
  }

  /** Takes a popped (or resubmitted) chain in flight: checks it, reads its buffers, counts it. */
  take(c: DescChain, what: string, checkCount = true): void {
    this.checkChain(c, what);
    let acc = 0;
    for (const v of c.readable) acc ^= v[0]! ^ v[v.length - 1]!;
    void acc;
    this.held.set(c.id, { c, id: c.id, descCount: c.descCount, writable: c.writable, writableBytes: c.writableBytes, seq: this.seq++ });
    this.descsInFlight += c.descCount;
    this.popped++;
    if (checkCount && this.q!.inFlight !== this.held.size) throw new Finding('invariant', `${what}: inFlight ${this.q!.inFlight}, ${this.held.size} chains held`);
  }

  /** The device's reply: up to `written` bytes (at most 4 KiB really written), mirrored in the shadow. */
  fill(h: Held): number {
    const rng = this.rng;
    const r = rng.int(10);
    const written = r < 5 ? Math.min(h.writableBytes, rng.int(WRITE_BUDGET)) : r < 8 ? h.writableBytes : 0;
    let left = Math.min(written, WRITE_BUDGET);
    const pattern = 1 + rng.int(255);
    for (const v of h.writable) {
      if (left <= 0) break;
      const k = Math.min(left, v.length);
      v.fill(pattern, 0, k);
      this.rig.shadow.fill(pattern, v.byteOffset, v.byteOffset + k);
      this.dirty.push([v.byteOffset, v.byteOffset + k]);
      left -= k;
    }
    return written;
  }

  gpaOfHost(off: number): number {
    for (const r of REGIONS) if (off >= r.host && off < r.host + r.size) return r.gpa + off - r.host;
    return -1;
  }

  checkLogged(h: Held, written: number): void {
    const log = this.log;
    if (!log) return;
    let left = written;
    for (const v of h.writable) {
      if (left <= 0) break;
      const k = Math.min(left, v.length);
      const gpa = this.gpaOfHost(v.byteOffset);
      for (let p = Math.floor(gpa / LOG_PAGE_SIZE); p <= Math.floor((gpa + k - 1) / LOG_PAGE_SIZE); p++) {
        if (p >> 3 >= log.bytes.length) break;
        if ((log.bytes[p >> 3]! & (1 << (p & 7))) === 0) throw new Finding('invariant', `push of ${written} bytes: page ${p} not marked in the dirty log`);
      }
      left -= k;
    }
  }

  /** Pushes `hs` (one push, or a batch) and checks the used ring / descriptors and the model. */
  push(hs: Held[], batch: boolean): void {
    const q = this.q!;
    const written = hs.map((h) => this.fill(h));
    const wasBroken = q.broken;
    if ((this.flags & F_MISUSE) !== 0 && this.rng.chance(0.3)) this.misuse(hs[0]!);
    const before = this.usedIdx;
    const r = batch ? this.call('pushBatch', () => q.pushBatch(hs.map((h) => h.c), written)) : this.call('push', () => q.push(hs[0]!.c, written[0]!));
    if (!r.ok) {
      if (r.err.code === 'USED_ID') throw new Finding('invariant', `push of chains in flight refused: ${r.err.message}`);
      this.broke(r.err, 'push', wasBroken);
      return;
    }
    if (q.broken !== wasBroken) throw new Finding('invariant', 'a successful push changed the broken state');
    const n = this.n;
    for (let k = 0; k < hs.length; k++) {
      const h = hs[k]!;
      if (!this.packed) {
        const slot = (before + k) & (n - 1);
        const at = this.layout.device + 4 + 8 * slot;
        if (this.u32(at) !== h.id || this.u32(at + 4) !== written[k]) {
          throw new Finding('invariant', `used element ${slot}: id ${this.u32(at)} len ${this.u32(at + 4)}, pushed id ${h.id} len ${written[k]}`);
        }
      } else {
        const at = this.layout.desc + 16 * this.usedIdx;
        const fl = this.u16(at + 14);
        const want = (this.usedWrap ? AVAIL | USED : 0) | (written[k]! > 0 ? WRITE : 0);
        if (this.u32(at + 8) !== written[k] || this.u16(at + 12) !== h.id || (fl & (AVAIL | USED | WRITE)) !== want) {
          throw new Finding('invariant', `used descriptor ${this.usedIdx}: len ${this.u32(at + 8)} id ${this.u16(at + 12)} flags ${fl.toString(16)}, pushed id ${h.id} len ${written[k]} (wrap ${this.usedWrap})`);
        }
        this.usedIdx += h.descCount;
        if (this.usedIdx >= n) {
          this.usedIdx -= n;
          this.usedWrap = !this.usedWrap;
        }
      }
      this.checkLogged(h, written[k]!);
      this.held.delete(h.id);
      this.descsInFlight -= h.descCount;
      this.pushedSince += this.packed ? h.descCount : 1;
    }
    if (!this.packed) {
      this.usedIdx = (before + hs.length) & 0xffff;
      if (this.u16(this.layout.device + 2) !== this.usedIdx) throw new Finding('invariant', `used idx ${this.u16(this.layout.device + 2)} after pushes, expected ${this.usedIdx}`);
    } else {
      const used = q.base() >>> 16;
      if (used !== (this.usedIdx | (this.usedWrap ? 0x8000 : 0))) throw new Finding('invariant', `base() used side ${used.toString(16)}, expected slot ${this.usedIdx} wrap ${this.usedWrap}`);
    }
    if (q.inFlight !== this.held.size) throw new Finding('invariant', `inFlight ${q.inFlight} after push, ${this.held.size} held`);
    if (!batch && (this.flags & F_MISUSE) !== 0 && this.rng.chance(0.5)) {
      // The same chain object again, before any pop reuses it: USED_ID, the queue not broken.
      const again = this.call('push again', () => q.push(hs[0]!.c, 0));
      if (again.ok || again.err.code !== 'USED_ID') throw new Finding('invariant', 'a chain pushed twice was accepted');
      if (q.broken !== wasBroken) throw new Finding('invariant', 'USED_ID broke the queue');
    }
  }

  /** Device-side misuse before a push: RangeError for bad counts, USED_ID for a batch with a chain twice; nothing changes. */
  misuse(h: Held): void {
    const q = this.q!;
    const wasBroken = q.broken;
    const usedBefore = this.packed ? q.base() : this.u16(this.layout.device + 2);
    for (const bad of [h.writableBytes + 1, -1, 0.5, Number.NaN]) {
      try {
        q.push(h.c, bad);
        throw new Finding('invariant', `push with written ${bad} of ${h.writableBytes} was accepted`);
      } catch (e) {
        if (e instanceof Finding) throw e;
        if (!(e instanceof RangeError)) throw new Finding('exception', `push with a bad count threw ${describe(e)}`);
      }
    }
    const r = this.call('pushBatch twice', () => q.pushBatch([h.c, h.c], [0, 0]));
    if (r.ok || r.err.code !== 'USED_ID') throw new Finding('invariant', 'a batch with one chain twice was accepted');
    const usedAfter = this.packed ? q.base() : this.u16(this.layout.device + 2);
    if (q.broken !== wasBroken || usedAfter !== usedBefore || q.inFlight !== this.held.size) throw new Finding('invariant', 'a refused push changed the queue');
  }

  /** A VirtioError from `what`: the queue must be broken with it (or was already); then it must stay inert. */
  broke(err: VirtioError, what: string, wasBroken: VirtioError | null): void {
    const q = this.q!;
    if (q.broken === null) throw new Finding('invariant', `${what} threw ${err.code} and the queue is not broken`);
    if (wasBroken === null && q.broken !== err) throw new Finding('invariant', `${what} threw ${err.code}, the queue is broken with ${q.broken.code}`);
    if (wasBroken !== null && q.broken !== wasBroken) throw new Finding('invariant', `the queue's broken error changed from ${wasBroken.code} to ${q.broken.code}`);
    this.stopped = true;
    this.checkInert();
  }

  /** A broken queue pops nothing, says nothing is available, and writes nothing to the rings. */
  checkInert(): void {
    const q = this.q!;
    const ar = areas(this.layout);
    const { map, mapBuf, scratch } = this.rig;
    const snaps = [ar.desc, ar.driver, ar.device].flatMap(([g, len]) => this.hostRanges(g, len));
    for (const [lo, hi] of snaps) scratch.set(map.subarray(lo, hi), lo);
    this.mem.paused = true;
    try {
      const broken = q.broken;
      const p = this.call('pop (broken)', () => q.pop());
      if (!p.ok || p.v !== null) throw new Finding('invariant', 'a broken queue popped a chain or threw');
      const a = this.call('available (broken)', () => q.available());
      if (!a.ok || a.v !== false) throw new Finding('invariant', 'a broken queue says a chain is available');
      const e = this.call('enableNotifications (broken)', () => q.enableNotifications());
      if (!e.ok || e.v !== false) throw new Finding('invariant', 'a broken queue asks to pop again');
      const d = this.call('disableNotifications (broken)', () => q.disableNotifications());
      if (!d.ok) throw new Finding('invariant', 'disableNotifications threw on a broken queue');
      this.call('needsNotify (broken)', () => q.needsNotify());
      if (this.pushedSince > 0) {
        // The engine's decision point moved as for any call with pushes.
        this.pushedSince = 0;
        this.valid = true;
        this.signalled = this.usedIdx;
      }
      this.call('base (broken)', () => q.base());
      if (q.broken !== broken) throw new Finding('invariant', 'the broken error changed');
      for (const [lo, hi] of snaps) if (mapBuf.compare(scratch, lo, hi, lo, hi) !== 0) throw new Finding('invariant', 'a broken queue wrote to its rings');
    } finally {
      this.mem.paused = false;
    }
  }

  // ---- notification oracles

  checkAvailEvent(what: string): void {
    if (!this.layout.eventIdx || !this.notify) return;
    const q = this.q!;
    const want = q.base() & 0xffff;
    const at = this.packed ? this.layout.device : this.layout.device + 4 + 8 * this.n;
    const got = this.u16(at);
    if (got !== want) throw new Finding('invariant', `${what}: ${this.packed ? 'device event off_wrap' : 'avail_event'} ${got}, next avail ${want}`);
  }

  needsNotify(): void {
    const q = this.q!;
    const applied = this.mem.applied;
    const pushed = this.pushedSince;
    const r = this.call('needsNotify', () => q.needsNotify());
    if (!r.ok) {
      this.broke(r.err, 'needsNotify', null);
      return;
    }
    if (pushed === 0) {
      if (r.v) throw new Finding('invariant', 'needsNotify true with nothing pushed');
      return;
    }
    const valid = this.valid;
    const old = this.signalled;
    this.pushedSince = 0;
    this.valid = true;
    this.signalled = this.usedIdx;
    if (this.mem.applied !== applied) return;
    const l = this.layout;
    let want: boolean;
    if (!this.packed) {
      if (!l.eventIdx) want = (this.u16(l.driver) & 1) === 0;
      else if (!valid || pushed >= 0x10000) want = true;
      else {
        const ev = this.u16(l.driver + 4 + 2 * this.n);
        want = ((this.usedIdx - ev - 1) & 0xffff) < ((this.usedIdx - old) & 0xffff);
      }
    } else {
      const fl = this.u16(l.driver + 2) & 3;
      if (fl === 1) want = false;
      else if (fl !== 2 || !l.eventIdx || !valid || pushed >= this.n) want = true;
      else {
        const ow = this.u16(l.driver);
        const ev = (ow & 0x7fff) - (((ow & 0x8000) !== 0) !== this.usedWrap ? this.n : 0);
        want = ev >= this.usedIdx - pushed && ev < this.usedIdx;
      }
    }
    if (r.v !== want) throw new Finding('invariant', `needsNotify said ${r.v} after ${pushed} pushed (used ${this.usedIdx}, previous ${old}), the ring says ${want}`);
  }

  /** Whether the ring has a chain available at the device's next position (from the ring and base()). */
  ringAvailable(): boolean {
    const q = this.q!;
    const b = q.base();
    if (!this.packed) return this.u16(this.layout.driver + 2) !== (b & 0xffff);
    const fl = this.u16(this.layout.desc + 16 * (b & 0x7fff) + 14);
    const wrap = (b & 0x8000) !== 0;
    return ((fl & AVAIL) !== 0) === wrap && ((fl & USED) !== 0) !== wrap;
  }

  enable(): boolean {
    const q = this.q!;
    const applied = this.mem.applied;
    const r = this.call('enableNotifications', () => q.enableNotifications());
    if (!r.ok) {
      this.broke(r.err, 'enableNotifications', null);
      return false;
    }
    this.notify = true;
    if (this.mem.applied !== applied) return r.v;
    const l = this.layout;
    if (this.packed) {
      const fl = this.u16(l.device + 2);
      if (fl !== (l.eventIdx ? 2 : 0)) throw new Finding('invariant', `enableNotifications left device event flags ${fl}`);
    } else if (!l.eventIdx && this.u16(l.device) !== 0) throw new Finding('invariant', `enableNotifications left used.flags ${this.u16(l.device)}`);
    this.checkAvailEvent('enableNotifications');
    if (r.v !== this.ringAvailable()) throw new Finding('invariant', `enableNotifications said ${r.v}, the ring says ${!r.v}`);
    return r.v;
  }

  disable(): void {
    const q = this.q!;
    const r = this.call('disableNotifications', () => q.disableNotifications());
    if (!r.ok) {
      this.broke(r.err, 'disableNotifications', null);
      return;
    }
    this.notify = false;
    const l = this.layout;
    if (this.packed && this.u16(l.device + 2) !== 1) throw new Finding('invariant', `disableNotifications left device event flags ${this.u16(l.device + 2)}`);
    if (!this.packed && !l.eventIdx && this.u16(l.device) !== 1) throw new Finding('invariant', `disableNotifications left used.flags ${this.u16(l.device)}`);
  }

  // ---- the device

  /** Pops until null (bounded); pushes some chains at once. Returns whether the last pop came after an enable that said true. */
  popAll(mustPop: boolean): void {
    const q = this.q!;
    const rng = this.rng;
    const bound = this.n * (2 + this.mem.scheduled.length + MAX_ROUNDS) + 64;
    for (let i = 0; ; i++) {
      if (this.stopped) return;
      if (i > bound) throw new Finding('hang', `more than ${bound} chains popped in one round`);
      const applied = this.mem.applied;
      let av: boolean | null = null;
      if (rng.chance(0.5)) {
        const a = this.call('available', () => q.available());
        if (!a.ok) return this.broke(a.err, 'available', null);
        av = a.v;
        if (this.mem.applied === applied && av !== this.ringAvailable()) throw new Finding('invariant', `available() said ${av}, the ring says ${!av}`);
      }
      const before = q.base();
      const applied2 = this.mem.applied;
      // The pop's only guest-memory write is the event word (split avail_event, packed device off_wrap),
      // after it read the chain: put back what was there for the reference walk.
      const ev = this.hostRanges(this.packed ? this.layout.device : this.layout.device + 4 + 8 * this.n, 2);
      const evWas = ev.map(([lo]) => [this.rig.map[lo]!, this.rig.map[lo + 1]]);
      const p = this.call('pop', () => q.pop());
      if (!p.ok) return this.broke(p.err, 'pop', null);
      const c = p.v;
      if (c !== null && this.mem.applied === applied2 && !this.overlap) {
        const evNow = ev.map(([lo, hi]) => this.rig.map.slice(lo, hi));
        ev.forEach(([lo, hi], k) => this.rig.map.set(Uint8Array.from(evWas[k]!.slice(0, hi - lo) as number[]), lo));
        try {
          this.refCheck(c, before);
        } finally {
          ev.forEach(([lo], k) => this.rig.map.set(evNow[k]!, lo));
        }
      }
      if (this.mem.applied === applied) {
        if (c === null && (av === true || (mustPop && i === 0))) throw new Finding('invariant', `pop gave null after ${av === true ? 'available()' : 'enableNotifications()'} said true`);
        if (c !== null && av === false && this.packed) throw new Finding('invariant', 'pop gave a chain after available() said false');
      }
      if (c === null) return;
      this.take(c, 'pop');
      this.checkAvailEvent('pop');
      if (!this.holding && rng.chance(0.4)) this.push([this.held.get(c.id)!], false);
    }
  }

  /** A byte of guest memory by GPA (-1 outside the regions). */
  byteAt(gpa: number): number {
    for (const r of REGIONS) if (gpa >= r.gpa && gpa < end(r)) return this.rig.map[r.host + gpa - r.gpa]!;
    return -1;
  }

  /** A little-endian field of `k` bytes at a GPA, byte by byte (a table may straddle regions). */
  rd(gpa: number, k: number): number {
    let v = 0;
    for (let i = k - 1; i >= 0; i--) v = v * 256 + this.byteAt(gpa + i);
    return v;
  }

  /**
   * The chain as the spec reads it from the ring now (nothing wrote guest memory during the pop):
   * its id and, per direction, the pieces of guest memory in order, against the chain's views.
   */
  refCheck(c: DescChain, before: number): void {
    const n = this.n;
    const l = this.layout;
    const segs: [number, number, boolean][] = [];
    let id = -1;
    const desc = (g: number): { addr: number; len: number; a: number; b: number } => ({ addr: this.rd(g, 8), len: this.rd(g + 8, 4), a: this.rd(g + 12, 2), b: this.rd(g + 14, 2) });
    if (!this.packed) {
      // virtq_desc {addr, len, flags, next}; the head from the avail ring at the next avail idx.
      id = this.rd(l.driver + 4 + 2 * (before & (n - 1)), 2);
      let i = id;
      for (let k = 0; k <= n; k++) {
        const d = desc(l.desc + 16 * i);
        if ((d.a & INDIRECT) !== 0) {
          for (let j = 0, m = 0; m <= d.len / 16; m++) {
            const e = desc(d.addr + 16 * j);
            segs.push([e.addr, e.len, (e.a & WRITE) !== 0]);
            if ((e.a & NEXT) === 0) break;
            j = e.b;
          }
          break;
        }
        segs.push([d.addr, d.len, (d.a & WRITE) !== 0]);
        if ((d.a & NEXT) === 0) break;
        i = d.b;
      }
    } else {
      // pvirtq_desc {addr, len, id, flags} from the next avail slot; an indirect table is used whole.
      let slot = before & 0x7fff;
      for (let k = 0; k < n; k++) {
        const d = desc(l.desc + 16 * slot);
        id = d.a;
        if ((d.b & INDIRECT) !== 0) {
          for (let off = 0; off + 16 <= d.len; off += 16) {
            const e = desc(d.addr + off);
            segs.push([e.addr, e.len, (e.b & WRITE) !== 0]);
          }
        } else segs.push([d.addr, d.len, (d.b & WRITE) !== 0]);
        if (++slot === n) slot = 0;
        if ((d.b & NEXT) === 0) break;
      }
    }
    if (c.id !== id) throw new Finding('invariant', `pop gave chain id ${c.id}, the ring says ${id}`);
    const want: [number[], number[]] = [[], []];
    for (const [addr, len, w] of segs) if (len > 0) for (const [lo, hi] of this.hostRanges(addr, len)) want[w ? 1 : 0]!.push(lo, hi);
    const got = (vs: Uint8Array[]): number[] => vs.flatMap((v) => [v.byteOffset, v.byteOffset + v.length]);
    const [gr, gw] = [got(c.readable), got(c.writable)];
    if (gr.join() !== want[0].join() || gw.join() !== want[1].join()) {
      throw new Finding('invariant', `chain ${c.id}: views ${gr.join()} / ${gw.join()}, the ring says ${want[0].join()} / ${want[1].join()}`);
    }
  }

  /** Pushes the held chains: some (or all), in random order, singly or in batches. */
  pushHeld(all: boolean): void {
    const rng = this.rng;
    let hs = [...this.held.values()];
    for (let i = hs.length - 1; i > 0; i--) {
      const j = rng.int(i + 1);
      [hs[i], hs[j]] = [hs[j]!, hs[i]!];
    }
    if (!all) hs = hs.filter(() => rng.chance(0.8));
    while (hs.length > 0) {
      const k = rng.chance(0.5) ? 1 : 1 + rng.int(hs.length);
      const part = hs.splice(0, k);
      this.push(part, part.length > 1 || rng.chance(0.3));
      if (!this.q) return;
    }
  }

  /** `hold`: the device keeps what it popped (a crash follows). */
  round(r: number, hold = false): void {
    const rng = this.rng;
    this.phase(r);
    if (this.stopped) return;
    if (rng.chance(0.5)) this.disable();
    let mustPop = false;
    for (let pass = 0; pass < 4 && !this.stopped; pass++) {
      this.popAll(mustPop);
      if (this.stopped) break;
      if (!hold && rng.chance(0.8)) this.pushHeld(false);
      if (!this.stopped && rng.chance(0.8)) this.needsNotify();
      if (this.stopped || !rng.chance(0.8)) break;
      mustPop = this.enable();
      if (!mustPop) break;
    }
    if ((this.flags & F_MEMCHANGE) !== 0 && rng.chance(0.5)) this.memChange();
  }

  memChange(): void {
    const i = this.rng.int(3);
    if (this.present[i]) {
      this.removeRegion(i);
      if (this.rng.chance(0.5)) this.addRegion(i);
    } else this.addRegion(i);
  }

  create(): boolean {
    const o = this.opts!;
    if ((this.flags & F_INFLIGHT) !== 0) {
      const n = this.n;
      const r = this.call('inflight region', () => {
        const bytes = this.rig.inflightShm.bytes.subarray(0, inflightQueueSize(n, this.packed));
        this.inflightBytes = bytes;
        return this.packed ? new PackedInflightQueue(bytes, n) : new SplitInflightQueue(bytes, n);
      });
      if (!r.ok) return false;
      o.inflight = r.v;
    }
    const r = this.call('createDeviceQueue', () => createDeviceQueue(o), Infinity);
    if (!r.ok) return false;
    this.q = r.v;
    this.created = true;
    if (r.v.broken !== null) throw new Finding('invariant', 'a new queue is broken');
    this.startModel();
    return true;
  }

  startModel(): void {
    const q = this.q!;
    if (!this.packed) this.usedIdx = this.u16(this.layout.device + 2);
    else {
      const b = q.base() >>> 16;
      this.usedIdx = b & 0x7fff;
      this.usedWrap = (b & 0x8000) !== 0;
    }
    this.signalled = this.usedIdx;
    this.valid = false;
    this.pushedSince = 0;
    this.notify = true;
  }

  /** The back-end "crashes" holding its chains; a new queue on the same ring and inflight region resubmits them. */
  reconnect(): void {
    const old = this.q!;
    const lies = (this.flags & F_LIES) !== 0;
    const heldOrder = [...this.held.values()].sort((a, b) => a.seq - b.seq);
    const oldUsed = { idx: this.usedIdx, wrap: this.usedWrap };
    const o: DeviceQueueOptions = { ...this.opts!, base: old.base() };
    this.opts = o;
    this.held.clear();
    this.descsInFlight = 0;
    this.stopped = false;
    this.q = null;
    const r = this.call('createDeviceQueue (reconnect)', () => createDeviceQueue(o), Infinity);
    if (!r.ok) return;
    const q = r.v;
    this.q = q;
    this.startModel();
    if (!lies && this.packed && (this.usedIdx !== oldUsed.idx || this.usedWrap !== oldUsed.wrap)) {
      throw new Finding('invariant', `after a reconnect the used side is ${this.usedIdx}/${this.usedWrap}, it was ${oldUsed.idx}/${oldUsed.wrap}`);
    }
    this.phase(PH_RESUBMIT);
    const rs = this.call('resubmit', () => q.resubmit(), Infinity);
    if (!rs.ok) return this.broke(rs.err, 'resubmit', null);
    ringStats.reconnects++;
    ringStats.resubmitted += rs.v.length;
    for (const c of rs.v) this.take(c, 'resubmit', false);
    if (q.inFlight !== this.held.size) throw new Finding('invariant', `inFlight ${q.inFlight} after resubmitting ${this.held.size}`);
    const again = this.call('resubmit (second)', () => q.resubmit());
    if (!again.ok || again.v.length !== 0) throw new Finding('invariant', 'a second resubmit() gave chains or threw');
    if (!lies) {
      const got = rs.v.map((c) => c.id).join(',');
      const want = heldOrder.map((h) => h.id).join(',');
      if (got !== want) throw new Finding('invariant', `resubmit gave ids [${got}], in flight at the crash: [${want}]`);
      if (!this.packed && q.base() !== ((this.usedIdx + heldOrder.length) & 0xffff)) {
        throw new Finding('invariant', `after a reconnect the next avail idx is ${q.base()}, used ${this.usedIdx} + ${heldOrder.length} in flight`);
      }
    }
    this.round(MAX_ROUNDS + 1);
  }

  /** The engine wrote only its own areas: everything else matches the shadow; the guards are zero. */
  checkMemory(): void {
    const map = this.rig.map;
    const shadow = this.rig.shadow;
    const mb = this.rig.mapBuf;
    const sb = this.rig.shadowBuf;
    // The shadow's guards are never written: zero.
    for (const [lo, hi] of GUARDS) if (mb.compare(sb, lo, hi, lo, hi) !== 0) throw new Finding('invariant', `guard bytes in mapping [${lo}, ${hi}) were written`);
    const ar = areas(this.layout);
    const owned = (this.created ? (this.packed ? [ar.desc, ar.device] : [ar.device]) : []).flatMap(([g, len]) => this.hostRanges(g, len));
    const check = merge([...this.dirty, ...this.hostRanges(...ar.desc), ...this.hostRanges(...ar.driver)]);
    for (const [lo, hi] of check) {
      // [lo, hi) minus the owned ranges.
      let parts: [number, number][] = [[lo, hi]];
      for (const [os, oe] of owned) {
        const next: [number, number][] = [];
        for (const [s, e] of parts) {
          if (oe <= s || os >= e) next.push([s, e]);
          else {
            if (s < os) next.push([s, os]);
            if (oe < e) next.push([oe, e]);
          }
        }
        parts = next;
      }
      for (const [s, e] of parts) {
        if (mb.compare(sb, s, e, s, e) !== 0) {
          let at = s;
          while (at < e && map[at] === shadow[at]) at++;
          throw new Finding('invariant', `guest memory at mapping offset ${at} (GPA ${this.gpaOfHost(at).toString(16)}) changed outside the device's areas`);
        }
      }
    }
  }

  /** Host ranges of [gpa, gpa + len) inside the regions. */
  hostRanges(gpa: number, len: number): [number, number][] {
    const out: [number, number][] = [];
    if (!Number.isFinite(gpa) || !Number.isFinite(len)) return out;
    for (const r of REGIONS) {
      const s = Math.max(gpa, r.gpa);
      const e = Math.min(gpa + len, end(r));
      if (s < e) out.push([r.host + s - r.gpa, r.host + e - r.gpa]);
    }
    return out;
  }

  /** Zeroes what the input wrote (mapping, shadow, inflight buffer). */
  cleanup(): void {
    const ar = areas(this.layout);
    for (const [lo, hi] of merge(this.dirty)) {
      this.rig.map.fill(0, lo, hi);
      this.rig.shadow.fill(0, lo, hi);
    }
    for (const [g, len] of [ar.desc, ar.driver, ar.device]) for (const [lo, hi] of this.hostRanges(g, Math.min(len, MAP_SIZE))) this.rig.map.fill(0, lo, hi);
    this.inflightBytes?.fill(0);
  }
}

/** Runs one input; returns the chains popped (for the probe). */
/** What the inputs reached (counted over every run in this process; for tuning the generator). */
export const ringStats = {
  inputs: 0,
  queues: 0,
  chains: 0,
  broken: new Map<string, number>(),
  toctouApplied: 0,
  reconnects: 0,
  resubmitted: 0,
};

function runRings(rig: Rig, packed: boolean, input: FuzzInput): number {
  const run = new RingRun(rig, packed, input);
  ringStats.inputs++;
  try {
    run.phase(0);
    if (!run.create()) {
      run.checkMemory();
      return 0;
    }
    ringStats.queues++;
    const rounds = Math.max(1, Math.min(MAX_ROUNDS, input.extra[X_ROUNDS] ?? 1));
    const crash = (run.flags & (F_INFLIGHT | F_RECONNECT)) === (F_INFLIGHT | F_RECONNECT);
    const hold = crash && run.rng.chance(0.5);
    for (let r = 1; r <= rounds; r++) {
      run.holding = hold && r === rounds;
      run.round(r, run.holding);
    }
    run.holding = false;
    if (crash && run.q) run.reconnect();
    if (run.q && run.held.size > 0) run.pushHeld(true);
    if (run.q && !run.stopped && run.held.size > 0) throw new Finding('invariant', `${run.held.size} chains still held after pushing them all`);
    if (run.q?.broken) run.checkInert();
    run.checkMemory();
    return run.popped;
  } finally {
    ringStats.chains += run.popped;
    ringStats.toctouApplied += run.mem.applied;
    const code = run.q?.broken?.code;
    if (code) ringStats.broken.set(code, (ringStats.broken.get(code) ?? 0) + 1);
    run.cleanup();
  }
}

/** A valid ring of 8 with one chain (16 readable bytes, 16 writable), by hand. */
function probeInput(packed: boolean): FuzzInput {
  const DESC = R0.gpa;
  const DRIVER = R0.gpa + 0x100;
  const DEVICE = R0.gpa + 0x200;
  const w = (phase: number, addr: number, bytes: number[]): WireMessage => {
    const b = new Uint8Array(HDR + bytes.length);
    header(b, phase, 0, 0, addr);
    b.set(bytes, HDR);
    return { bytes: b, fds: [] };
  };
  const le = (v: number, k: number): number[] => Array.from({ length: k }, (_, i) => Math.floor(v / 2 ** (8 * i)) & 0xff);
  const desc = (addr: number, len: number, a: number, b: number): number[] => [...le(addr, 8), ...le(len, 4), ...le(a, 2), ...le(b, 2)];
  const msgs = packed
    ? [w(1, DESC, [...desc(0x20000, 16, 5, NEXT | AVAIL), ...desc(0x20100, 16, 5, WRITE | AVAIL)])]
    : [w(1, DESC, [...desc(0x20000, 16, NEXT, 1), ...desc(0x20100, 16, WRITE, 0)]), w(1, DRIVER + 4, le(0, 2)), w(1, DRIVER + 2, le(1, 2))];
  const extra = new Array<number>(X_COUNT).fill(0);
  extra[X_SIZE] = 8;
  extra[X_BASE] = packed ? -1 : 0;
  extra[X_DESC] = DESC;
  extra[X_DRIVER] = DRIVER;
  extra[X_DEVICE] = DEVICE;
  extra[X_SEED] = 1;
  extra[X_ROUNDS] = 1;
  return { msgs, cuts: [], extra };
}

const PROBE = [probeInput(false), probeInput(true)] as const;

function ringTarget(name: string, packed: boolean): FuzzTarget {
  return {
    name,
    generate: (rng) => generateRing(rng, packed),
    async start(): Promise<Instance> {
      const rig = new Rig();
      return {
        async run(input) {
          // The engine's errors are expected by the thousand: no stack traces while running (a tenth
          // of the time). A finding runs the input again with them, for the report (the run is deterministic).
          const limit = Error.stackTraceLimit;
          Error.stackTraceLimit = 0;
          try {
            runRings(rig, packed, input);
            return;
          } catch {
            // below
          } finally {
            Error.stackTraceLimit = limit;
          }
          runRings(rig, packed, input);
          throw new Finding('invariant', 'an input failed once and passed when run again (not deterministic)');
        },
        async probe() {
          if (runRings(rig, packed, PROBE[packed ? 1 : 0]) !== 1) throw new Finding('invariant', 'probe: a valid chain on a ring of 8 was not popped');
        },
        async close() {
          rig.close();
        },
      };
    },
  };
}

export const virtioSplit: FuzzTarget = ringTarget('virtio-split', false);
export const virtioPacked: FuzzTarget = ringTarget('virtio-packed', true);
