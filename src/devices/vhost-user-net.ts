/**
 * vhost-user-net: one virtio-net device (virtio 1.2 section 5.1) per switch
 * port, served by VhostUserBackend, or as a whole virtio PCI device over
 * vfio-user (src/devices/virtio-net-pci.ts: the same object behind the PCI
 * transport, its queues adapted with NetQueueAdapter). The device owns the rings of one
 * front-end (QEMU's `-netdev vhost-user`, DPDK's net_virtio_user, our own
 * front-end): frames the guest transmits are handed to a FrameSink (the
 * switch, src/devices/net-switch.ts), and frames for the guest are copied by
 * `deliver()` straight from the source guest's TX buffers into this guest's
 * RX buffers (no intermediate buffer).
 *
 * Features: VERSION_1, MAC, MTU, STATUS, MRG_RXBUF (optional), CTRL_VQ with
 * CTRL_RX (promiscuous, all-multicast) and CTRL_MAC_ADDR (MAC table and
 * address), MQ (queue pairs without RSS), EVENT_IDX, INDIRECT_DESC,
 * RING_PACKED, IN_ORDER (optional). Checksum and GSO offloads are not offered;
 * the 12-byte virtio_net_hdr (10 bytes for a legacy driver without
 * MRG_RXBUF) is written zero but for num_buffers.
 *
 * Ring rules (vhost-user "started" and "enabled"): a started but disabled TX
 * ring is still processed, its frames discarded (counted as `tx-disabled`); a
 * disabled RX ring is given nothing. RX chains taken for a frame that then
 * could not be completed (MRG_RXBUF, too few buffers) are held for the next
 * frame and given back empty when the ring stops.
 */
import type { DescChain } from '../virtio/types.js';
import type { VirtioDeviceModel, VirtioQueueHandle } from '../virtio/device-queue-handle.js';
import { bit, VirtioFeature as VF } from '../vhost-user/constants.js';
import type { VhostQueue, VhostUserDevice } from '../vhost-user/backend.js';

/**
 * A queue as the net device uses it: the transport-neutral handle plus what a
 * switch port needs. The vhost-user back-end's VhostQueue is one as it is; a
 * handle without these (the virtio PCI transport's PciQueue) is wrapped in a
 * NetQueueAdapter by the device itself (handleQueue takes any VirtioQueueHandle).
 */
export interface NetQueueHandle extends VirtioQueueHandle {
  /**
   * The ring may be given frames (RX) and its frames forwarded (TX). vhost-user:
   * SET_VRING_ENABLE (a started, disabled TX ring is served and its frames
   * discarded); PCI: the ring runs.
   */
  readonly enabled: boolean;
  /** Busy-polled: kicks stay off, the handler is called on every pass (no rescheduling). */
  readonly polled: boolean;
  /** Gives back a chain popped and not pushed: the next pop() returns it again. */
  unpop(chain: DescChain): void;
  /** Calls the device's handler for this queue again soon (without waiting for a kick). */
  schedule(): void;
}

/** Compile-time check that VhostQueue is a NetQueueHandle as it is (no adapter for vhost-user). */
type Holds<T extends true> = T;
export type VhostQueueIsNetQueueHandle = Holds<VhostQueue extends NetQueueHandle ? true : false>;

/** The parts a handle may have of NetQueueHandle (PciQueue has `enabled` and `schedule`, not `unpop` or `polled`). */
type PartialNetQueue = VirtioQueueHandle & { readonly enabled?: boolean; schedule?(): void; unpop?: unknown; polled?: unknown };

/**
 * A NetQueueHandle over a handle that lacks `unpop` / `polled`: chains given
 * back wait in a stack that pop() serves first (as VhostQueue's), `polled` is
 * false, `enabled` means the ring runs (and, where the handle has it, its own
 * `enabled`), `schedule` is the handle's or a setImmediate of `again`.
 */
export class NetQueueAdapter implements NetQueueHandle {
  readonly polled = false;
  readonly inner: VirtioQueueHandle;
  readonly #schedule: () => void;
  readonly #unpopped: DescChain[] = [];
  #scheduled = false;

  constructor(inner: VirtioQueueHandle, again: () => void) {
    this.inner = inner;
    const s = (inner as PartialNetQueue).schedule;
    this.#schedule =
      typeof s === 'function'
        ? () => s.call(inner)
        : () => {
            if (this.#scheduled) return;
            this.#scheduled = true;
            setImmediate(() => {
              this.#scheduled = false;
              again();
            });
          };
  }

  get index(): number {
    return this.inner.index;
  }

  get ring(): VirtioQueueHandle['ring'] {
    return this.inner.ring;
  }

  get features(): bigint {
    return this.inner.features;
  }

  get enabled(): boolean {
    return this.inner.ring !== null && (this.inner as PartialNetQueue).enabled !== false;
  }

  /** Chains given back and not yet popped again. */
  get unpopped(): number {
    return this.#unpopped.length;
  }

  pop(): DescChain | null {
    if (this.#unpopped.length > 0) {
      if (this.inner.ring === null) return null;
      return this.#unpopped.pop()!;
    }
    return this.inner.pop();
  }

  unpop(chain: DescChain): void {
    // The ring stopped meanwhile: complete it empty now (the transport drops or counts it).
    if (this.inner.ring === null) this.inner.push(chain, 0);
    else this.#unpopped.push(chain);
  }

  push(chain: DescChain, written: number): void {
    this.inner.push(chain, written);
  }

  pushBatch(chains: readonly DescChain[], written: ArrayLike<number>): void {
    this.inner.pushBatch(chains, written);
  }

  notify(): void {
    this.inner.notify();
  }

  schedule(): void {
    this.#schedule();
  }

  /** Completes the chains given back with length 0 (the ring is stopping). */
  giveBack(): void {
    if (this.#unpopped.length === 0) return;
    const chains = this.#unpopped.splice(0);
    this.inner.pushBatch(chains, new Array<number>(chains.length).fill(0));
  }
}

function isNetQueue(q: VirtioQueueHandle): q is NetQueueHandle {
  const p = q as PartialNetQueue;
  return typeof p.unpop === 'function' && typeof p.polled === 'boolean' && typeof p.enabled === 'boolean' && typeof p.schedule === 'function';
}

/** virtio-net feature bits (virtio 1.2 5.1.3). */
export const NetFeature = {
  CSUM: 0,
  GUEST_CSUM: 1,
  MTU: 3,
  MAC: 5,
  MRG_RXBUF: 15,
  STATUS: 16,
  CTRL_VQ: 17,
  CTRL_RX: 18,
  CTRL_VLAN: 19,
  CTRL_RX_EXTRA: 20,
  GUEST_ANNOUNCE: 21,
  MQ: 22,
  CTRL_MAC_ADDR: 23,
} as const;

/** Control virtqueue classes and commands (5.1.6.5). */
export const NetCtrl = {
  RX: 0,
  RX_PROMISC: 0,
  RX_ALLMULTI: 1,
  MAC: 1,
  MAC_TABLE_SET: 0,
  MAC_ADDR_SET: 1,
  MQ: 4,
  MQ_VQ_PAIRS_SET: 0,
  OK: 0,
  ERR: 1,
} as const;

export const NET_S_LINK_UP = 1;
/** virtio_net_hdr with num_buffers (VERSION_1 or MRG_RXBUF). */
export const NET_HDR_SIZE = 12;
/** The legacy header without num_buffers. */
export const NET_HDR_LEGACY_SIZE = 10;
const ETH_HLEN = 14;
/** Allowed above the MTU: the Ethernet header and one VLAN tag. */
const L2_OVERHEAD = 18;
/** TX chains handled per batch, and batches per wake-up before yielding to other rings. */
const TX_BATCH = 64;
const TX_TURNS = 32;
/** A polled port holds a frame for a receiver without RX buffers this long, then drops it (default). */
const HOLD_MS = 2;
/** The largest control command accepted (a MAC table of ~10000 entries). */
const MAX_CTRL = 64 * 1024;
/** The device's migration state (migrationState): version, and its fixed part before the MAC tables. */
const NET_STATE_VERSION = 1;
const NET_STATE_HEAD = 20;
/** Most MAC table entries a state may carry (what one control command can set). */
const MAX_TABLE = Math.floor(MAX_CTRL / 6);

/** Why a frame was dropped. tx-side causes count on the sending port, rx-side on the receiving one. */
export type DropCause =
  /** tx: the TX ring was started but disabled: processed and discarded. */
  | 'tx-disabled'
  /** tx: shorter than an Ethernet header (or than the virtio header). */
  | 'runt'
  /** tx: longer than the MTU allows. */
  | 'oversize'
  /** tx: offload flags or GSO in the header, which were not negotiated. */
  | 'bad-header'
  /** tx: no other port is up, or the destination is the sending port itself. */
  | 'no-destination'
  /** rx: no started and enabled RX ring. */
  | 'rx-not-ready'
  /** rx: the RX ring had no (or not enough) buffers. */
  | 'no-rx-buffer'
  /** rx: without MRG_RXBUF, the buffer could not hold the frame. */
  | 'rx-buffer-too-small'
  /** rx: the port's RX filter (promiscuous off, MAC table) refused it. */
  | 'filtered';

export const DROP_CAUSES: readonly DropCause[] = ['tx-disabled', 'runt', 'oversize', 'bad-header', 'no-destination', 'rx-not-ready', 'no-rx-buffer', 'rx-buffer-too-small', 'filtered'];

export interface NetPortStats {
  /** Frames and bytes (Ethernet frames, no virtio header) the guest transmitted and the switch took. */
  txPackets: number;
  txBytes: number;
  /** Frames and bytes written into the guest's RX buffers. */
  rxPackets: number;
  rxBytes: number;
  drops: Record<DropCause, number>;
  /** Control commands answered OK / ERR. */
  ctrlOk: number;
  ctrlErr: number;
}

/** An Ethernet frame inside guest (or host) memory: `length` bytes from `offset` of consecutive views. */
export interface Frame {
  views: readonly Uint8Array[];
  offset: number;
  length: number;
}

/** Where the frames a guest transmits go (the switch). */
export interface FrameSink {
  /**
   * One frame from `from`'s TX queue pair `pair`; `dst` and `src` are the MACs as 48-bit
   * numbers. With `hold`, a frame whose only receiver has no RX buffer is neither
   * delivered nor dropped: the sink returns false and the sender gives it again later.
   */
  forward(from: VhostUserNetDevice, frame: Frame, dst: number, src: number, pair: number, hold?: boolean): boolean | void;
  /** The end of a batch: push what was delivered into RX rings and notify. */
  flush(): void;
  /** SEND_RARP: a frame the port announces for the guest (after a migration). */
  announce(from: VhostUserNetDevice, frame: Frame, mac: number): void;
}

export interface VhostUserNetOptions {
  /** The MAC in config space (default 52:54:00 + 3 random bytes). */
  mac?: Uint8Array | string;
  /** Queue pairs (default 1); more than 1 offers MQ. */
  queuePairs?: number;
  /** MTU in config space (default 1500; offered with VIRTIO_NET_F_MTU). */
  mtu?: number;
  /** Offer MRG_RXBUF (default true). */
  mrgRxbuf?: boolean;
  /** Offer the control virtqueue (default true). */
  ctrlVq?: boolean;
  /** Offer RING_PACKED (default true). */
  packed?: boolean;
  /** Offer IN_ORDER (default false). */
  inOrder?: boolean;
  /** Largest ring (default 1024; DPDK uses 256, QEMU 256 or 1024). */
  maxQueueSize?: number;
  /** A name for logs (the socket path). */
  name?: string;
  log?: (line: string) => void;
  /**
   * Busy-poll this port's TX rings (kicks switched off while they run, as DPDK's PMD)
   * instead of waiting for kicks. The thread spins while the port is up: run the switch
   * on a worker (NetSwitchThread). A polled port holds a frame whose only receiver is
   * out of RX buffers (for up to `holdMs`, retried on every pass) instead of dropping
   * it. Default false (event-driven).
   */
  poll?: boolean;
  /** How long a polled port holds a frame for a receiver without buffers (default 2 ms; 0: drop at once). */
  holdMs?: number;
  /**
   * RARP frames the port sends for the guest's MAC once it runs on a migrated state (the
   * PCI transport; over vhost-user the front-end asks with SEND_RARP instead): QEMU's
   * announce defaults, 5 rounds, the first at once and then 50, 150, 250 and 350 ms apart.
   * 0: none.
   */
  announceRounds?: number;
}

export function parseMac(s: string): Uint8Array {
  const m = /^([0-9a-f]{2})(?::([0-9a-f]{2})){5}$/i.exec(s);
  if (!m) throw new Error(`bad MAC address '${s}'`);
  return Uint8Array.from(s.split(':').map((h) => parseInt(h, 16)));
}

export function formatMac(mac: number | Uint8Array): string {
  const b = typeof mac === 'number' ? macBytes(mac) : mac;
  return Array.from(b, (x) => x.toString(16).padStart(2, '0')).join(':');
}

/** The 48-bit number of 6 bytes at `at`. */
export function macNumber(b: Uint8Array, at = 0): number {
  return (b[at]! * 256 + b[at + 1]!) * 0x100000000 + (((b[at + 2]! << 24) | (b[at + 3]! << 16) | (b[at + 4]! << 8) | b[at + 5]!) >>> 0);
}

export function macBytes(mac: number): Uint8Array {
  const out = new Uint8Array(6);
  const hi = Math.floor(mac / 0x100000000);
  const lo = mac >>> 0;
  out[0] = hi >>> 8;
  out[1] = hi & 0xff;
  out[2] = lo >>> 24;
  out[3] = (lo >>> 16) & 0xff;
  out[4] = (lo >>> 8) & 0xff;
  out[5] = lo & 0xff;
  return out;
}

export const BROADCAST = 0xffffffffffff;
/** The group bit (multicast and broadcast). */
export function isMulticast(mac: number): boolean {
  return Math.floor(mac / 0x10000000000) % 2 === 1;
}

function emptyDrops(): Record<DropCause, number> {
  return Object.fromEntries(DROP_CAUSES.map((c) => [c, 0])) as Record<DropCause, number>;
}

/** Copies `length` bytes of a frame, from frame position `pos`, into consecutive views starting at `at`; returns the bytes copied. */
class FrameReader {
  views: readonly Uint8Array[] = [];
  vi = 0;
  off = 0;
  /** Positions the reader at byte `pos` of the views. */
  seek(views: readonly Uint8Array[], pos: number): void {
    this.views = views;
    let vi = 0;
    while (vi < views.length && pos >= views[vi]!.byteLength) pos -= views[vi++]!.byteLength;
    this.vi = vi;
    this.off = pos;
  }
  /** Copies up to `length` bytes into `dst` views from view `di` offset `doff`; returns the bytes copied. */
  copyTo(dst: readonly Uint8Array[], di: number, doff: number, length: number): number {
    const views = this.views;
    let done = 0;
    while (done < length && this.vi < views.length && di < dst.length) {
      const s = views[this.vi]!;
      const d = dst[di]!;
      const n = Math.min(s.byteLength - this.off, d.byteLength - doff, length - done);
      if (n > 0) {
        d.set(this.off === 0 && n === s.byteLength ? s : s.subarray(this.off, this.off + n), doff);
        done += n;
        this.off += n;
        doff += n;
      }
      if (this.off >= s.byteLength) {
        this.vi++;
        this.off = 0;
      }
      if (doff >= d.byteLength) {
        di++;
        doff = 0;
      }
    }
    return done;
  }
}

/** Writes `bytes` into consecutive views from `at`; returns whether all fit. */
function writeAt(views: readonly Uint8Array[], at: number, bytes: Uint8Array): boolean {
  let o = 0;
  for (const v of views) {
    if (o >= bytes.length) break;
    if (at >= v.byteLength) {
      at -= v.byteLength;
      continue;
    }
    const n = Math.min(v.byteLength - at, bytes.length - o);
    v.set(bytes.subarray(o, o + n), at);
    o += n;
    at = 0;
  }
  return o >= bytes.length;
}

/** `length` bytes from `at` of consecutive views, copied into `out` (headers, MACs, control commands). */
export function readAt(views: readonly Uint8Array[], at: number, out: Uint8Array, length: number): boolean {
  let o = 0;
  for (const v of views) {
    if (o >= length) break;
    if (at >= v.byteLength) {
      at -= v.byteLength;
      continue;
    }
    const n = Math.min(v.byteLength - at, length - o);
    out.set(v.subarray(at, at + n), o);
    o += n;
    at = 0;
  }
  return o >= length;
}

/** Per RX ring: chains taken and held for the next frame, and what was filled this batch. */
class RxState {
  readonly held: DescChain[] = [];
  readonly chains: DescChain[] = [];
  readonly written: number[] = [];
  queue: NetQueueHandle | null = null;
}

/**
 * A virtio-net device, a port of a switch: for VhostUserBackend (a
 * VhostUserDevice) or behind the virtio PCI transport over vfio-user (a
 * VirtioDeviceModel: src/devices/virtio-net-pci.ts).
 */
export class VhostUserNetDevice implements VhostUserDevice, VirtioDeviceModel {
  readonly features: bigint;
  readonly numQueues: number;
  readonly maxQueueSize: number;
  readonly queuePairs: number;
  readonly name: string;
  /** TX rings are busy-polled (VhostUserNetOptions.poll). */
  readonly poll: boolean;
  /** virtio_net_config.mac: the driver sets it (MAC_ADDR_SET); migrated in migrationState(), not compared. */
  readonly configDriverMutable = [{ offset: 0, length: 6 }] as const;
  readonly holdMs: number;
  readonly announceRounds: number;
  /** The self-announcement after a migration in progress (migrated()). */
  #announceTimer: NodeJS.Timeout | null = null;
  mac: Uint8Array;
  mtu: number;
  readonly stats: NetPortStats = { txPackets: 0, txBytes: 0, rxPackets: 0, rxBytes: 0, drops: emptyDrops(), ctrlOk: 0, ctrlErr: 0 };
  sink: FrameSink | null = null;
  /** RX filter (CTRL_RX, MAC table); promiscuous by default, as QEMU's virtio-net. */
  promisc = true;
  allMulti = true;
  readonly macTableUni = new Set<number>();
  readonly macTableMulti = new Set<number>();
  /** Pairs the driver uses (VQ_PAIRS_SET; all until then). */
  activePairs: number;
  #acked = 0n;
  #hdrLen = NET_HDR_SIZE;
  #mrg = false;
  #mtuAcked = false;
  readonly #ctrlIndex: number;
  /** The MAC given at construction (restored by reset()). */
  readonly #configuredMac: Uint8Array;
  readonly #rx: RxState[];
  readonly #log: (line: string) => void;
  readonly #reader = new FrameReader();
  readonly #frame: Frame = { views: [], offset: 0, length: 0 };
  readonly #scratch = new Uint8Array(NET_HDR_SIZE);
  readonly #macs = new Uint8Array(12);
  readonly #txChains: DescChain[] = [];
  readonly #txWritten: number[] = [];
  readonly #dirtyRx: RxState[] = [];
  /** When the frame at the head of a polled TX ring was first held (0: none is). */
  #heldSince = 0;
  /** Adapters of the handles that are not NetQueueHandles (PCI queues), by handle. */
  readonly #adapters = new WeakMap<VirtioQueueHandle, NetQueueAdapter>();

  constructor(options: VhostUserNetOptions = {}) {
    this.queuePairs = options.queuePairs ?? 1;
    if (!Number.isInteger(this.queuePairs) || this.queuePairs < 1 || this.queuePairs > 127) throw new RangeError(`queuePairs: ${this.queuePairs} (1..127)`);
    const ctrl = options.ctrlVq !== false;
    this.numQueues = 2 * this.queuePairs + (ctrl ? 1 : 0);
    this.#ctrlIndex = ctrl ? 2 * this.queuePairs : -1;
    this.maxQueueSize = options.maxQueueSize ?? 1024;
    this.mtu = options.mtu ?? 1500;
    if (!Number.isInteger(this.mtu) || this.mtu < 68 || this.mtu > 65535) throw new RangeError(`mtu: ${this.mtu} (68..65535)`);
    this.mac = typeof options.mac === 'string' ? parseMac(options.mac) : options.mac ? Uint8Array.from(options.mac) : randomMac();
    this.#configuredMac = Uint8Array.from(this.mac);
    this.name = options.name ?? formatMac(this.mac);
    this.#log = options.log ?? (() => undefined);
    this.activePairs = this.queuePairs;
    this.poll = options.poll === true;
    this.holdMs = options.holdMs ?? HOLD_MS;
    this.announceRounds = options.announceRounds ?? 5;
    if (!Number.isInteger(this.announceRounds) || this.announceRounds < 0 || this.announceRounds > 100) throw new RangeError(`announceRounds: ${this.announceRounds} (0..100)`);
    if (!(this.holdMs >= 0)) throw new RangeError(`holdMs: ${this.holdMs}`);
    this.#rx = Array.from({ length: this.queuePairs }, () => new RxState());
    let f = bit(VF.VERSION_1) | bit(VF.INDIRECT_DESC) | bit(VF.EVENT_IDX);
    if (options.packed !== false) f |= bit(VF.RING_PACKED);
    if (options.inOrder === true) f |= bit(VF.IN_ORDER);
    f |= bit(NetFeature.MAC) | bit(NetFeature.MTU) | bit(NetFeature.STATUS);
    if (options.mrgRxbuf !== false) f |= bit(NetFeature.MRG_RXBUF);
    if (ctrl) f |= bit(NetFeature.CTRL_VQ) | bit(NetFeature.CTRL_RX) | bit(NetFeature.CTRL_MAC_ADDR);
    if (this.queuePairs > 1) f |= bit(NetFeature.MQ);
    this.features = f;
  }

  /** The acked features (0 before SET_FEATURES). */
  get ackedFeatures(): bigint {
    return this.#acked;
  }

  /** The virtio-net header length the driver uses (12, or 10 for a legacy driver without MRG_RXBUF). */
  get headerLength(): number {
    return this.#hdrLen;
  }

  get mergeable(): boolean {
    return this.#mrg;
  }

  /** virtio_net_config: mac, status, max_virtqueue_pairs, mtu. */
  config(): Uint8Array {
    const b = Buffer.alloc(12);
    b.set(this.mac, 0);
    b.writeUInt16LE(NET_S_LINK_UP, 6);
    b.writeUInt16LE(this.queuePairs, 8);
    b.writeUInt16LE(this.mtu, 10);
    return b;
  }

  setFeatures(features: bigint): void {
    this.#acked = features;
    const has = (n: number): boolean => (features & bit(n)) !== 0n;
    this.#mrg = has(NetFeature.MRG_RXBUF);
    this.#hdrLen = has(VF.VERSION_1) || this.#mrg ? NET_HDR_SIZE : NET_HDR_LEGACY_SIZE;
    this.#mtuAcked = has(NetFeature.MTU);
  }

  setMtu(mtu: number): boolean {
    if (mtu < 68 || mtu > 65535) return false;
    this.mtu = mtu;
    this.#mtuAcked = true;
    return true;
  }

  /**
   * The PCI transport runs this device on a loaded state: the guest arrived here. Its MAC
   * (the one the driver set, migrated) is announced by RARP broadcasts through the switch, so
   * the switch and every network behind it learn the guest's new port at once, without
   * waiting for the guest's next frame: qemu_announce_self() (net/announce.c) for a NIC
   * without VIRTIO_NET_F_GUEST_ANNOUNCE, which this device does not offer.
   */
  migrated(): void {
    if (this.#announceTimer) clearTimeout(this.#announceTimer);
    this.#announceTimer = null;
    const mac = Uint8Array.from(this.mac);
    let round = 0;
    const once = (): void => {
      this.#announceTimer = null;
      this.sendRarp(mac);
      if (++round >= this.announceRounds) return;
      // net/announce.c qemu_announce_timer_step: initial + (rounds - round - 1) * step, at most max (50, 100, 550).
      this.#announceTimer = setTimeout(once, Math.min(50 + (round - 1) * 100, 550));
      this.#announceTimer.unref();
    };
    if (this.announceRounds > 0) once();
  }

  sendRarp(mac: Uint8Array): void {
    const f = new Uint8Array(60);
    f.fill(0xff, 0, 6);
    f.set(mac.subarray(0, 6), 6);
    f[12] = 0x80;
    f[13] = 0x35; // ETH_P_RARP
    f.set([0, 1, 8, 0, 6, 4, 0, 3], 14); // Ethernet, IPv4, hlen 6, plen 4, op 3 (reverse request)
    f.set(mac.subarray(0, 6), 22); // sender hardware address; sender IP 0
    f.set(mac.subarray(0, 6), 32); // target hardware address; target IP 0
    this.#log(`${this.name}: SEND_RARP for ${formatMac(mac.subarray(0, 6))}`);
    this.sink?.announce(this, { views: [f], offset: 0, length: f.length }, macNumber(mac));
  }

  /** TX rings are served while disabled (their frames discarded); RX and control rings are not. */
  serveDisabled(queueIndex: number): boolean {
    return queueIndex !== this.#ctrlIndex && queueIndex % 2 === 1;
  }

  queueStopping(queue: VirtioQueueHandle): void {
    const q = this.#net(queue);
    if (q instanceof NetQueueAdapter) q.giveBack();
    if (q.index % 2 !== 0 || q.index === this.#ctrlIndex) return;
    const rx = this.#rx[q.index / 2];
    if (!rx) return;
    this.#flushRx(rx);
    this.#giveBack(rx, q);
  }

  /** The handle itself when it is a NetQueueHandle (VhostQueue), else its adapter. */
  #net(q: VirtioQueueHandle): NetQueueHandle {
    if (isNetQueue(q)) return q;
    let a = this.#adapters.get(q);
    if (a === undefined) {
      const adapter = new NetQueueAdapter(q, () => this.handleQueue(adapter));
      this.#adapters.set(q, adapter);
      a = adapter;
    }
    return a;
  }

  reset(): void {
    for (const rx of this.#rx) {
      const q = rx.queue;
      rx.chains.length = 0;
      rx.written.length = 0;
      // The session is closed: these pushes only release the chains' memory.
      if (q) this.#giveBack(rx, q);
      rx.queue = null;
    }
    this.#dirtyRx.length = 0;
    this.promisc = true;
    this.allMulti = true;
    this.macTableUni.clear();
    this.macTableMulti.clear();
    this.activePairs = this.queuePairs;
    // A device reset puts back the configured MAC, as QEMU's virtio_net_reset does after a MAC_ADDR_SET.
    this.mac = Uint8Array.from(this.#configuredMac);
  }

  /**
   * The control queue's state, for the virtio PCI transport's migration
   * (VirtioPciModelState; not saveState, which would make the vhost-user
   * back-end offer DEVICE_STATE). Little-endian:
   *   0  u8 version (1)    1  u8 flags: bit 0 promiscuous, bit 1 all-multicast
   *   2  mac[6] (virtio_net_config.mac, MAC_ADDR_SET)
   *   8  u16 active queue pairs (VQ_PAIRS_SET)    10  u16 0
   *   12 u32 unicast entries    16 u32 multicast entries
   *   20 the unicast MACs, then the multicast ones, 6 bytes each
   */
  migrationState(): Uint8Array {
    const uni = [...this.macTableUni];
    const multi = [...this.macTableMulti];
    const b = Buffer.alloc(NET_STATE_HEAD + 6 * (uni.length + multi.length));
    b[0] = NET_STATE_VERSION;
    b[1] = (this.promisc ? 1 : 0) | (this.allMulti ? 2 : 0);
    b.set(this.mac, 2);
    b.writeUInt16LE(this.activePairs, 8);
    b.writeUInt32LE(uni.length, 12);
    b.writeUInt32LE(multi.length, 16);
    let at = NET_STATE_HEAD;
    for (const m of [...uni, ...multi]) {
      b.set(macBytes(m), at);
      at += 6;
    }
    return b;
  }

  /** Loads a migrationState() of the source; untrusted: checked whole, then taken (throws and changes nothing if bad). */
  loadMigrationState(state: Uint8Array): void {
    const b = Buffer.from(state.buffer, state.byteOffset, state.byteLength);
    if (b.length < NET_STATE_HEAD) throw new Error(`virtio-net state of ${b.length} bytes (at least ${NET_STATE_HEAD})`);
    if (b[0] !== NET_STATE_VERSION) throw new Error(`virtio-net state version ${b[0]} (${NET_STATE_VERSION} known)`);
    const flags = b[1]!;
    if (flags & ~3) throw new Error(`virtio-net state flags 0x${flags.toString(16)}`);
    const pairs = b.readUInt16LE(8);
    if (pairs < 1 || pairs > this.queuePairs) throw new Error(`${pairs} active queue pairs (this device has ${this.queuePairs})`);
    if (b.readUInt16LE(10) !== 0) throw new Error('virtio-net state: reserved bytes not zero');
    const nUni = b.readUInt32LE(12);
    const nMulti = b.readUInt32LE(16);
    if (nUni + nMulti > MAX_TABLE) throw new Error(`MAC tables of ${nUni} + ${nMulti} entries (at most ${MAX_TABLE})`);
    if (b.length !== NET_STATE_HEAD + 6 * (nUni + nMulti)) throw new Error(`virtio-net state of ${b.length} bytes for ${nUni} + ${nMulti} MAC table entries`);
    const table = (from: number, n: number): number[] => Array.from({ length: n }, (_, i) => macNumber(b, from + 6 * i));
    const uni = table(NET_STATE_HEAD, nUni);
    const multi = table(NET_STATE_HEAD + 6 * nUni, nMulti);
    this.promisc = (flags & 1) !== 0;
    this.allMulti = (flags & 2) !== 0;
    this.mac = Uint8Array.from(b.subarray(2, 8));
    this.activePairs = pairs;
    this.macTableUni.clear();
    this.macTableMulti.clear();
    for (const m of uni) this.macTableUni.add(m);
    for (const m of multi) this.macTableMulti.add(m);
    this.#log(`${this.name}: migrated in: mac ${formatMac(this.mac)}, promiscuous ${this.promisc ? 'on' : 'off'}, all-multicast ${this.allMulti ? 'on' : 'off'}, MAC tables ${nUni} + ${nMulti}, ${pairs} pair(s)`);
  }

  /** TX rings of a polling port are busy-polled; RX and control rings stay event-driven. */
  pollQueue(queueIndex: number): boolean {
    return this.poll && queueIndex !== this.#ctrlIndex && queueIndex % 2 === 1;
  }

  handleQueue(queue: VirtioQueueHandle): boolean | void {
    const q = this.#net(queue);
    if (q.index === this.#ctrlIndex) return this.#handleCtrl(q);
    if (q.index % 2 === 1) return this.#handleTx(q);
    // RX: buffers are taken when frames come; the driver's kicks are not needed.
    const rx = this.#rx[q.index / 2];
    if (rx) rx.queue = q;
    q.ring?.disableNotifications();
  }

  /** Whether the RX filter takes a frame for `dst`. */
  accepts(dst: number): boolean {
    if (this.promisc) return true;
    if (isMulticast(dst)) return dst === BROADCAST || this.allMulti || this.macTableMulti.has(dst);
    return dst === macNumber(this.mac) || this.macTableUni.has(dst);
  }

  /** Whether some RX ring is started and enabled (the port can be given frames). */
  get rxReady(): boolean {
    return this.#rxQueue(0) !== null;
  }

  /**
   * Copies `frame` into this guest's RX buffers (queue pair chosen from `pair`), a
   * virtio-net header first; the chains are pushed at flush(). Returns 1 (delivered),
   * 0 (dropped, the cause counted) or, with `hold`, -1 when the ring has not the buffers
   * for it now (nothing counted; give it again later).
   */
  deliver(frame: Frame, pair: number, hold = false): number {
    const rx = this.#rxQueue(pair);
    if (rx === null) return this.#dropped('rx-not-ready');
    const q = rx.queue!;
    const hdr = this.#hdrLen;
    const need = hdr + frame.length;
    const held = rx.held;
    const start = rx.chains.length;
    // Take chains (held ones first) until they hold the header and the frame.
    let have = 0;
    let n = 0;
    while (have < need) {
      let c: DescChain | null;
      if (n < held.length) c = held[n]!;
      else {
        c = q.pop();
        if (c === null) break;
        held.push(c);
      }
      n++;
      have += c.writableBytes;
      if (!this.#mrg) break;
    }
    if (have < need || held[0]!.writableBytes < hdr) {
      if (n === 0) return hold ? -1 : this.#dropped('no-rx-buffer');
      if (!this.#mrg) return this.#dropped('rx-buffer-too-small');
      return hold ? -1 : this.#dropped('no-rx-buffer');
    }
    // The header: all zero (no offloads) but num_buffers.
    const h = this.#scratch;
    h.fill(0);
    if (hdr === NET_HDR_SIZE) {
      h[10] = n & 0xff;
      h[11] = n >>> 8;
    }
    const r = this.#reader;
    r.seek(frame.views, frame.offset);
    let left = frame.length;
    for (let i = 0; i < n; i++) {
      const c = held[i]!;
      let w = 0;
      if (i === 0) {
        writeAt(c.writable, 0, h.subarray(0, hdr));
        const room = c.writableBytes - hdr;
        const { di, doff } = locate(c.writable, hdr);
        w = hdr + r.copyTo(c.writable, di, doff, Math.min(left, room));
      } else {
        w = r.copyTo(c.writable, 0, 0, Math.min(left, c.writableBytes));
      }
      left -= i === 0 ? w - hdr : w;
      rx.chains.push(c);
      rx.written.push(w);
    }
    held.splice(0, n);
    if (start === 0) this.#dirtyRx.push(rx);
    this.stats.rxPackets++;
    this.stats.rxBytes += frame.length;
    return 1;
  }

  /** Pushes the chains filled since the last flush into their RX rings and notifies. */
  flush(): void {
    const d = this.#dirtyRx;
    for (let i = 0; i < d.length; i++) this.#flushRx(d[i]!);
    d.length = 0;
  }

  /** Counts a drop; returns false (for `return this.drop(...)`). */
  drop(cause: DropCause): false {
    return this.#drop(cause);
  }

  #drop(cause: DropCause): false {
    this.stats.drops[cause]++;
    return false;
  }

  #dropped(cause: DropCause): 0 {
    this.stats.drops[cause]++;
    return 0;
  }

  #flushRx(rx: RxState): void {
    const q = rx.queue;
    if (q === null || rx.chains.length === 0) return;
    q.pushBatch(rx.chains, rx.written);
    rx.chains.length = 0;
    rx.written.length = 0;
    q.notify();
  }

  #giveBack(rx: RxState, q: NetQueueHandle): void {
    if (rx.held.length === 0) return;
    const zeros = new Array<number>(rx.held.length).fill(0);
    q.pushBatch(rx.held, zeros);
    rx.held.length = 0;
    q.notify();
  }

  /** A started, enabled RX ring for `pair` (its own, else the next that is), or null. */
  #rxQueue(pair: number): RxState | null {
    const pairs = Math.min(this.activePairs, this.#rx.length);
    for (let k = 0; k < pairs; k++) {
      const rx = this.#rx[(pair + k) % pairs]!;
      const q = rx.queue;
      if (q !== null && q.enabled && q.ring !== null) return rx;
    }
    return null;
  }

  #handleTx(q: NetQueueHandle): boolean {
    const ring = q.ring;
    if (!ring) return false;
    const pair = (q.index - 1) / 2;
    const chains = this.#txChains;
    const written = this.#txWritten;
    const polled = q.polled;
    let progress = false;
    for (let turn = 0; turn < TX_TURNS; turn++) {
      if (!polled) ring.disableNotifications();
      let n = 0;
      let c: DescChain | null;
      let blocked = false;
      while (n < TX_BATCH && (c = q.pop()) !== null) {
        if (!q.enabled) this.#drop('tx-disabled');
        else if (!this.#transmit(c, pair, polled)) {
          // Its receiver has no buffer now: the poll loop gives it again.
          q.unpop(c);
          blocked = true;
          break;
        }
        chains.push(c);
        written.push(0);
        n++;
      }
      if (n > 0) progress = true;
      this.sink?.flush();
      if (n > 0) {
        q.pushBatch(chains, written);
        chains.length = 0;
        written.length = 0;
        q.notify();
      }
      if (ring.broken) return progress;
      if (n === TX_BATCH) continue;
      // Polled: kicks stay off, the poll loop comes back on its next pass.
      if (blocked || polled || !ring.enableNotifications()) return progress;
    }
    if (polled) return progress;
    // Still busy: yield to the other rings, come back without waiting for a kick.
    q.schedule();
    return progress;
  }

  /** False: held (a polled port's frame whose receiver has no buffer now). */
  #transmit(c: DescChain, pair: number, polled: boolean): boolean {
    const hdr = this.#hdrLen;
    const len = c.readableBytes - hdr;
    if (len < ETH_HLEN) return this.#drop('runt') || true;
    if (len > (this.#mtuAcked ? this.mtu : 65535) + L2_OVERHEAD) return this.#drop('oversize') || true;
    const views = c.readable;
    // The header's flags and gso_type must be 0 (no offload was negotiated), then the MACs.
    let macs: Uint8Array;
    let at: number;
    const v0 = views[0]!;
    if (v0.byteLength >= hdr + 12) {
      if (v0[0] !== 0 || v0[1] !== 0) {
        this.#drop('bad-header');
        return true;
      }
      macs = v0;
      at = hdr;
    } else {
      const h = this.#scratch;
      readAt(views, 0, h, 2);
      if (h[0] !== 0 || h[1] !== 0) {
        this.#drop('bad-header');
        return true;
      }
      macs = this.#macs;
      readAt(views, hdr, macs, 12);
      at = 0;
    }
    const dst = macNumber(macs, at);
    const src = macNumber(macs, at + 6);
    const f = this.#frame;
    f.views = views;
    f.offset = hdr;
    f.length = len;
    if (this.sink === null) {
      this.#drop('no-destination');
    } else {
      // A polled port holds a frame for a receiver out of buffers, up to holdMs.
      const hold = polled && this.holdMs > 0 && (this.#heldSince === 0 || performance.now() - this.#heldSince < this.holdMs);
      if (this.sink.forward(this, f, dst, src, pair, hold) === false) {
        if (this.#heldSince === 0) this.#heldSince = performance.now();
        return false;
      }
      this.#heldSince = 0;
    }
    this.stats.txPackets++;
    this.stats.txBytes += len;
    return true;
  }

  #handleCtrl(q: NetQueueHandle): void {
    let c: DescChain | null;
    while ((c = q.pop()) !== null) {
      let status: number = NetCtrl.ERR;
      if (c.writableBytes >= 1 && c.readableBytes >= 2 && c.readableBytes <= MAX_CTRL) {
        const cmd = new Uint8Array(c.readableBytes);
        readAt(c.readable, 0, cmd, cmd.length);
        status = this.#control(cmd[0]!, cmd[1]!, cmd.subarray(2)) ? NetCtrl.OK : NetCtrl.ERR;
      }
      if (status === NetCtrl.OK) this.stats.ctrlOk++;
      else this.stats.ctrlErr++;
      if (c.writableBytes >= 1) {
        const last = c.writable[c.writable.length - 1]!;
        last[last.byteLength - 1] = status;
        q.push(c, 1);
      } else q.push(c, 0);
    }
    q.notify();
  }

  #control(cls: number, cmd: number, data: Uint8Array): boolean {
    const has = (n: number): boolean => (this.#acked & bit(n)) !== 0n;
    const dv = new DataView(data.buffer, data.byteOffset, data.byteLength);
    switch (cls) {
      case NetCtrl.RX: {
        if (!has(NetFeature.CTRL_RX) || data.length !== 1 || data[0]! > 1) return false;
        if (cmd === NetCtrl.RX_PROMISC) this.promisc = data[0] === 1;
        else if (cmd === NetCtrl.RX_ALLMULTI) this.allMulti = data[0] === 1;
        else return false;
        this.#log(`${this.name}: promiscuous ${this.promisc ? 'on' : 'off'}, all-multicast ${this.allMulti ? 'on' : 'off'}`);
        return true;
      }
      case NetCtrl.MAC: {
        if (cmd === NetCtrl.MAC_ADDR_SET) {
          if (!has(NetFeature.CTRL_MAC_ADDR) || data.length !== 6) return false;
          this.mac = Uint8Array.from(data);
          return true;
        }
        if (cmd !== NetCtrl.MAC_TABLE_SET || !has(NetFeature.CTRL_RX)) return false;
        // Two tables: u32 entries then 6-byte MACs, unicast then multicast.
        const tables: number[][] = [];
        let at = 0;
        for (let t = 0; t < 2; t++) {
          if (at + 4 > data.length) return false;
          const n = dv.getUint32(at, true);
          at += 4;
          if (at + 6 * n > data.length) return false;
          const macs: number[] = [];
          for (let i = 0; i < n; i++, at += 6) macs.push(macNumber(data, at));
          tables.push(macs);
        }
        if (at !== data.length) return false;
        this.macTableUni.clear();
        this.macTableMulti.clear();
        for (const m of tables[0]!) this.macTableUni.add(m);
        for (const m of tables[1]!) this.macTableMulti.add(m);
        return true;
      }
      case NetCtrl.MQ: {
        if (cmd !== NetCtrl.MQ_VQ_PAIRS_SET || !has(NetFeature.MQ) || data.length !== 2) return false;
        const pairs = dv.getUint16(0, true);
        if (pairs < 1 || pairs > this.queuePairs) return false;
        this.activePairs = pairs;
        return true;
      }
      default:
        return false;
    }
  }
}

/** The view index and offset of byte `at` of consecutive views. */
function locate(views: readonly Uint8Array[], at: number): { di: number; doff: number } {
  let di = 0;
  while (di < views.length && at >= views[di]!.byteLength) at -= views[di++]!.byteLength;
  return { di, doff: at };
}

/** A locally administered unicast MAC (52:54:00 is QEMU's prefix; ours is 02:vd:...). */
function randomMac(): Uint8Array {
  const m = new Uint8Array(6);
  crypto.getRandomValues(m);
  m[0] = 0x02;
  m[1] = 0x76; // 'v'
  return m;
}
