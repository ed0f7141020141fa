/**
 * A virtio device served over vfio-user as a whole PCI device: the virtio
 * PCI modern transport (virtio 1.2 section 4.1) around any VirtioDeviceModel
 * (the blk device of vhost-user-blk.ts is one), on the same ring engine
 * (src/virtio/) the vhost-user back-end uses.
 *
 *   const disk = VhostUserBlkDevice.open({ file: 'disk.img' });
 *   VfioUserServer.listen('/tmp/vblk.sock', { device: virtioPciDevice(disk, { deviceId: 2 }) });
 *
 * PCI identity: vendor 0x1af4, device 0x1040 + the virtio device id,
 * revision 1 (a modern-only device), subsystem 0x1af4 / the virtio device id.
 *
 * BAR4 (16 KiB, 32-bit memory, served by callbacks) holds the virtio
 * structures, each described by a vendor capability (cap_vndr 0x09) in
 * config space:
 *
 *   0x0000  common cfg (virtio_pci_common_cfg, 60 bytes)     cfg_type 1
 *   0x1000  ISR status (1 byte, read to clear)               cfg_type 3
 *   0x2000  device cfg (the device's config())               cfg_type 4
 *   0x3000  notify area, queue n at 0x3000 + 4 n             cfg_type 2, notify_off_multiplier 4
 *
 * BAR1 holds the MSI-X table (vector 0 .. numQueues: one for config, one per
 * queue; the driver picks) and the PBA. INTx is offered too (with ISR).
 *
 * Queue notifications: a REGION_WRITE to the notify area, or the queue's
 * ioeventfd (offered with GET_REGION_IO_FDS on BAR4, one per queue, any
 * access size). Interrupts: the queue's MSI-X vector when the driver gave one
 * (queue_msix_vector), else ISR bit 0 and INTx.
 *
 * Queue memory: IOVA = guest-physical address. Windows the client mapped
 * with an fd, readable and writable, are guest memory for the ring engine
 * (read and written in place). A window without fd is reached only by
 * DMA_READ / DMA_WRITE messages: buffers there go through bounce buffers
 * (BounceMemory: read in when the engine's pop misses them, the pop run
 * again; device-writable ones written back before the chain is pushed,
 * capped by `bounceLimit`); rings there are staged (StagedRing: copied in on
 * a kick, the engine run over the copies, what it wrote flushed back before
 * the interrupt decision, one sequential loop per queue). Read-only windows
 * are not used (a ring or buffer there breaks the queue, DEVICE_NEEDS_RESET,
 * a log line that says why).
 *
 * VIRTIO_PCI_CAP_PCI_CFG (cfg_type 5, config space 0x84): config accesses
 * to its pci_cfg_data reach BAR4 at cap.offset, cap.length bytes.
 *
 * Migration (records mode): at STOP the device quiesces as the vhost-user
 * back-end does at GET_VRING_BASE: no new requests are taken, those in flight
 * complete (into the rings, with their interrupts), then the state is saved:
 * the common cfg registers, ISR, and per queue its size, vector, enable,
 * addresses and ring base (next avail index; nothing is in flight), then
 * the device config, which the destination compares with its own but for the
 * bytes the driver may change (configDriverMutable). A device with state of
 * its own (VirtioPciModelState.migrationState: virtio-net's RX filter, MAC
 * tables and MAC) adds it as a tagged section (version 2 of the record; a
 * device without writes version 1, as before). The
 * destination loads it and starts the rings at RUNNING; every started queue
 * is then looked at once, so buffers made available while the device was
 * stopped are served. Dirty pages: every ring write and the bytes written
 * into device-writable buffers go to the server's DMA log.
 */
import { EventFd } from '../sys/index.js';
import { VfioError, Errno } from '../vfio/errors.js';
import { GuestMemory, type DirtyLog } from '../virtio/memory.js';
import { createDeviceQueue, type DeviceQueue } from '../virtio/queue.js';
import { VirtioError, hex } from '../virtio/errors.js';
import { BounceMemory, BounceMiss } from '../virtio/bounce-memory.js';
import { StagedRing, ringAreas } from '../virtio/staged-ring.js';
import type { DescChain, GuestMemoryView } from '../virtio/types.js';
import type { VirtioDeviceModel, VirtioQueueHandle } from '../virtio/device-queue-handle.js';
import type { ConfigReader, DeviceContext, DmaWindow, IoEventFdSpec, VfioUserDeviceSpec } from '../vfio-user/device.js';

export const VIRTIO_PCI_VENDOR_ID = 0x1af4;
/** Modern devices: 0x1040 + the virtio device id. */
export const VIRTIO_PCI_DEVICE_ID_BASE = 0x1040;

/** virtio_pci_cap cfg_type values (4.1.4). */
export const VirtioPciCapType = { COMMON: 1, NOTIFY: 2, ISR: 3, DEVICE: 4, PCI: 5 } as const;

/** device_status bits (2.1). */
export const VirtioStatus = {
  ACKNOWLEDGE: 1,
  DRIVER: 2,
  DRIVER_OK: 4,
  FEATURES_OK: 8,
  DEVICE_NEEDS_RESET: 64,
  FAILED: 128,
} as const;

export const VIRTIO_MSI_NO_VECTOR = 0xffff;

/** Byte offsets in struct virtio_pci_common_cfg (4.1.4.3). */
export const CommonCfg = {
  DEVICE_FEATURE_SELECT: 0,
  DEVICE_FEATURE: 4,
  DRIVER_FEATURE_SELECT: 8,
  DRIVER_FEATURE: 12,
  CONFIG_MSIX_VECTOR: 16,
  NUM_QUEUES: 18,
  DEVICE_STATUS: 20,
  CONFIG_GENERATION: 21,
  QUEUE_SELECT: 22,
  QUEUE_SIZE: 24,
  QUEUE_MSIX_VECTOR: 26,
  QUEUE_ENABLE: 28,
  QUEUE_NOTIFY_OFF: 30,
  QUEUE_DESC: 32,
  QUEUE_DRIVER: 40,
  QUEUE_DEVICE: 48,
  QUEUE_NOTIFY_DATA: 56,
  QUEUE_RESET: 58,
  SIZE: 60,
} as const;

/** Where the structures are (BAR4) and the MSI-X table (BAR1). */
export const VirtioPciLayout = {
  BAR: 4,
  BAR_SIZE: 0x4000,
  COMMON: 0x0000,
  ISR: 0x1000,
  DEVICE: 0x2000,
  DEVICE_SIZE: 0x1000,
  NOTIFY: 0x3000,
  NOTIFY_SIZE: 0x1000,
  NOTIFY_OFF_MULTIPLIER: 4,
  MSIX_BAR: 1,
} as const;

/** Feature bits the transport handles (the rest of the device's are dropped). */
const F_INDIRECT_DESC = 28;
const F_EVENT_IDX = 29;
const F_VERSION_1 = 32;
const F_ACCESS_PLATFORM = 33;
const F_RING_PACKED = 34;
const bit = (n: number): bigint => 1n << BigInt(n);
/** Device-type bits 0..23, and the ring features the engine implements. */
const TRANSPORT_FEATURES = (bit(24) - 1n) | bit(F_INDIRECT_DESC) | bit(F_EVENT_IDX) | bit(F_VERSION_1) | bit(F_RING_PACKED);

/**
 * Where the VIRTIO_PCI_CAP_PCI_CFG capability sits in config space: after the
 * four others (0x40 common 16 bytes, 0x50 notify 20, 0x64 ISR 16, 0x74 device 16).
 */
export const PCI_CFG_CAP_OFFSET = 0x84;
/** pci_cfg_data in that capability (after its 16-byte virtio_pci_cap). */
const PCI_CFG_DATA = PCI_CFG_CAP_OFFSET + 16;

const MAX_QUEUES = VirtioPciLayout.NOTIFY_SIZE / VirtioPciLayout.NOTIFY_OFF_MULTIPLIER;
/** Version 1: the transport's state only; version 2: tagged sections after it (a device without them still writes version 1). */
const STATE_MAGIC = 'vdkvpci\x01';
const STATE_MAGIC_V2 = 'vdkvpci\x02';
const STATE_HEAD = 48;
const STATE_QUEUE = 40;
/** A version-2 section: tag (le32), length (le32), then its bytes. */
const SECTION_HEAD = 8;
/** The device model's own state (VirtioPciModelState.migrationState). */
const SECTION_MODEL = 1;

/**
 * What a device model may add to the transport's migration (all optional:
 * the blk device has none of it). The names are not saveState / loadState:
 * on a VhostUserDevice those make the vhost-user back-end offer DEVICE_STATE.
 */
export interface VirtioPciModelState {
  /**
   * The device's own state beyond its queues (virtio-net: the RX filter and
   * MAC table of the control queue, the MAC the driver set), saved at
   * STOP_COPY once the queues are quiesced; carried as a section of the
   * transport's state.
   */
  migrationState?(): Uint8Array;
  /**
   * Loads what migrationState() gave on the source. The bytes are untrusted:
   * throw on anything malformed or that this device cannot take, having
   * changed nothing; the transport then refuses the whole state (EINVAL).
   */
  loadMigrationState?(state: Uint8Array): void;
  /**
   * Device config bytes the driver can change through the device (virtio-net:
   * the mac, by VIRTIO_NET_CTRL_MAC_ADDR_SET). When the state carries the
   * device's section (whose load restores them) the destination leaves them
   * out of its comparison with the source's config; every other byte must match.
   */
  readonly configDriverMutable?: readonly { readonly offset: number; readonly length: number }[];
  /**
   * The device runs again on a state loaded here (RESUMING, then RUNNING): the guest
   * moved to this device. virtio-net announces the guest's MAC from here, as QEMU's
   * qemu_announce_self() does after a migration.
   */
  migrated?(): void;
}

export interface VirtioPciOptions {
  /** The virtio device id (1 net, 2 block, ...): PCI device id 0x1040 + id. */
  deviceId: number;
  /** PCI class code (default: 0x010000 for block, 0x020000 for net, 0xff0000 otherwise). */
  classCode?: number;
  /** PCI subsystem id (default: the virtio device id); the subsystem vendor is 0x1af4. */
  subsystemId?: number;
  /** Offer VIRTIO_F_ACCESS_PLATFORM (the driver then gives IOVAs through its DMA API; default false: IOVA = GPA). */
  accessPlatform?: boolean;
  /** Offer one ioeventfd per queue on the notify area with GET_REGION_IO_FDS (default true). */
  ioeventfds?: boolean;
  /**
   * Most bytes of buffers in DMA windows without fd held in bounce buffers at
   * once, per queue (default 16 MiB): a chain larger than this breaks the queue.
   */
  bounceLimit?: number;
  /** Name for the server's logs. */
  name?: string;
  log?: (line: string) => void;
}

/** The spec, with the transport (for tests and statistics) and close() (the ioeventfds). */
export type VirtioPciDeviceSpec = VfioUserDeviceSpec & { readonly transport: VirtioPciTransport; close(): void };

/**
 * Builds the vfio-user device spec of `device` behind the virtio PCI modern
 * transport. One spec per server: it holds the transport's state.
 */
export function virtioPciDevice(device: VirtioDeviceModel & VirtioPciModelState, options: VirtioPciOptions): VirtioPciDeviceSpec {
  const t = new VirtioPciTransport(device, options);
  const L = VirtioPciLayout;
  const vectors = 1 + device.numQueues;
  const tableBytes = vectors * 16;
  const pbaOffset = Math.ceil(tableBytes / 64) * 64;
  let msixSize = 4096;
  while (msixSize < pbaOffset + Math.ceil(vectors / 64) * 8) msixSize *= 2;
  const cap = (type: number, offset: number, length: number, extra?: number): number[] => {
    // virtio_pci_cap from cfg_type on (the library writes cap_vndr, cap_next, cap_len):
    // cfg_type, bar, id, padding[2], offset (le32), length (le32) [, notify_off_multiplier (le32)].
    const p = [type, L.BAR, 0, 0, 0, ...le32(offset), ...le32(length)];
    if (extra !== undefined) p.push(...le32(extra));
    return p;
  };
  const classCode = options.classCode ?? (options.deviceId === 2 ? 0x010000 : options.deviceId === 1 ? 0x020000 : 0xff0000);
  const spec: VfioUserDeviceSpec = {
    name: options.name ?? `virtio-pci (device ${options.deviceId})`,
    pci: {
      vendorId: VIRTIO_PCI_VENDOR_ID,
      deviceId: VIRTIO_PCI_DEVICE_ID_BASE + options.deviceId,
      subsystemVendorId: VIRTIO_PCI_VENDOR_ID,
      subsystemId: options.subsystemId ?? options.deviceId,
      revision: 1,
      classCode,
      capabilities: [
        { type: 'vendor', readOnly: true, payload: cap(VirtioPciCapType.COMMON, L.COMMON, CommonCfg.SIZE) },
        {
          type: 'vendor',
          readOnly: true,
          payload: cap(VirtioPciCapType.NOTIFY, L.NOTIFY, device.numQueues * L.NOTIFY_OFF_MULTIPLIER, L.NOTIFY_OFF_MULTIPLIER),
        },
        { type: 'vendor', readOnly: true, payload: cap(VirtioPciCapType.ISR, L.ISR, 1) },
        { type: 'vendor', readOnly: true, payload: cap(VirtioPciCapType.DEVICE, L.DEVICE, t.configSize) },
        // virtio_pci_cfg_cap (4.1.4.9): the driver writes bar, offset, length, then reads or writes pci_cfg_data.
        { type: 'vendor', offset: PCI_CFG_CAP_OFFSET, payload: [VirtioPciCapType.PCI, 0, 0, 0, 0, ...le32(0), ...le32(0), ...le32(0)] },
      ],
    },
    regions: {
      [L.MSIX_BAR]: { size: msixSize },
      [L.BAR]: {
        size: L.BAR_SIZE,
        read: (offset, out) => t.barRead(offset, out),
        write: (offset, data) => t.barWrite(offset, data),
        ...(t.ioEventFds.length > 0 ? { ioEventFds: t.ioEventFds } : {}),
      },
    },
    irqs: { intx: true, msix: vectors, msixBar: { bar: L.MSIX_BAR, tableOffset: 0, pbaOffset } },
    configAccess: {
      read: (offset, out, config) => t.pciCfgRead(offset, out, config),
      write: (offset, data, config) => t.pciCfgWrite(offset, data, config),
    },
    attach: (ctx) => t.attach(ctx),
    detach: () => t.detach(),
    reset: () => t.deviceReset(),
    dmaMapped: (w) => t.dmaMapped(w),
    dmaUnmapped: (w) => t.dmaUnmapped(w),
    migration: {
      save: () => t.save(),
      load: (data) => t.load(data),
      transition: (from, to) => t.transition(from, to),
    },
  };
  return Object.assign(spec, { transport: t, close: () => t.close() });
}

/** The tagged sections of a version-2 state from `at` to its end (each tag once); malformed: refused. */
function readSections(b: Buffer, at: number, refuse: (why: string) => never): Map<number, Buffer> {
  const out = new Map<number, Buffer>();
  while (at < b.length) {
    if (b.length - at < SECTION_HEAD) refuse(`a section header cut at byte ${at} of ${b.length}`);
    const tag = b.readUInt32LE(at);
    const len = b.readUInt32LE(at + 4);
    if (len > b.length - at - SECTION_HEAD) refuse(`section ${tag} of ${len} bytes, ${b.length - at - SECTION_HEAD} left`);
    if (tag !== SECTION_MODEL) refuse(`unknown section ${tag}`);
    if (out.has(tag)) refuse(`section ${tag} twice`);
    out.set(tag, b.subarray(at + SECTION_HEAD, at + SECTION_HEAD + len));
    at += SECTION_HEAD + len;
  }
  return out;
}

/** The first byte where the saved config differs from ours outside `skip`, or null when they match (lengths too). */
function configDiffers(saved: Uint8Array, ours: Uint8Array, skip: readonly { offset: number; length: number }[]): number | null {
  if (saved.length !== ours.length) return Math.min(saved.length, ours.length);
  for (let i = 0; i < ours.length; i++) {
    if (saved[i] !== ours[i] && !skip.some((r) => i >= r.offset && i < r.offset + r.length)) return i;
  }
  return null;
}

function le32(v: number): number[] {
  return [v & 0xff, (v >>> 8) & 0xff, (v >>> 16) & 0xff, (v >>> 24) & 0xff];
}

const RUNNING_STATES = new Set(['RUNNING', 'PRE_COPY', 'RUNNING_P2P', 'PRE_COPY_P2P']);

/**
 * Guest memory for the ring engine: the client's fd-backed, read-write DMA
 * windows (IOVA = GPA). The others are remembered to explain a failure.
 */
class DmaMemory implements GuestMemoryView {
  readonly mapped = new GuestMemory();
  /** Windows the engine cannot use (not both readable and writable). */
  readonly unusable: DmaWindow[] = [];
  /** Read-write windows without fd: buffers there are copied in and out by DMA_READ / DMA_WRITE (BounceMemory). */
  messages: DmaWindow[] = [];
  #messagesGen = 0;
  /**
   * Windows the client unmapped while requests were in flight: kept (their
   * mapping held) until those complete, so completions reach the rings; no
   * new request is taken meanwhile.
   */
  ghosts: DmaWindow[] = [];

  get generation(): number {
    return this.mapped.generation + this.#messagesGen;
  }

  get regions(): readonly { guestPhysAddr: number; size: number }[] {
    return this.mapped.regions;
  }

  addMessageWindow(w: DmaWindow): void {
    this.messages = [...this.messages, w].sort((a, b) => a.iova - b.iova);
    this.#messagesGen++;
  }

  /** Removes a window without fd; false when it is not one. */
  removeMessageWindow(w: DmaWindow): boolean {
    const before = this.messages.length;
    this.messages = this.messages.filter((m) => !(m.iova === w.iova && m.size === w.size));
    if (this.messages.length === before) return false;
    this.#messagesGen++;
    return true;
  }

  /** The window without fd overlapping [gpa, +length), if any. */
  messageAt(gpa: number, length: number): DmaWindow | undefined {
    return this.messages.find((w) => gpa < w.iova + w.size && w.iova < gpa + Math.max(1, length));
  }

  view(gpa: number, length: number): Uint8Array | null {
    try {
      return this.mapped.view(gpa, length);
    } catch (err) {
      throw this.#explain(err, gpa, length);
    }
  }

  slices(gpa: number, length: number): Uint8Array[] {
    try {
      return this.mapped.slices(gpa, length);
    } catch (err) {
      throw this.#explain(err, gpa, length);
    }
  }

  uvaToGpa(uva: number): number {
    return uva; // no front-end virtual addresses in PCI: IOVA = GPA
  }

  /** True when [gpa, +length) lies in usable windows. */
  has(gpa: number, length: number): boolean {
    try {
      this.mapped.slices(gpa, length);
      return true;
    } catch {
      return false;
    }
  }

  /** True when every byte of [gpa, +length) is in a usable window, mapped or reached by messages. */
  reachableByDma(gpa: number, length: number): boolean {
    if (!Number.isSafeInteger(gpa) || !Number.isSafeInteger(length) || gpa < 0 || length < 0 || !Number.isSafeInteger(gpa + length)) return false;
    const end = gpa + length;
    let p = gpa;
    while (p < end) {
      const r = this.mapped.regions.find((x) => p >= x.guestPhysAddr && p < x.guestPhysAddr + x.size);
      const w = r ? null : this.messages.find((x) => p >= x.iova && p < x.iova + x.size);
      if (r) p = r.guestPhysAddr + r.size;
      else if (w) p = w.iova + w.size;
      else return false;
    }
    return true;
  }

  /** The unusable window overlapping [gpa, +length), if any. */
  unusableAt(gpa: number, length: number): DmaWindow | undefined {
    return this.unusable.find((w) => gpa < w.iova + w.size && w.iova < gpa + Math.max(1, length));
  }

  #explain(err: unknown, gpa: number, length: number): unknown {
    const w = this.unusableAt(gpa, length);
    if (!(err instanceof VirtioError) || !w) return err;
    return new VirtioError(
      'GPA_OUT_OF_RANGE',
      `[${hex(gpa)}, +${length}) is in the DMA window [${hex(w.iova)}, +${hex(w.size)}), which ${whyUnusable(w)}`,
    );
  }
}

/** Why a window in `unusable` is (they are all read-only or write-only, mapped or not). */
function whyUnusable(w: DmaWindow): string {
  if (w.readable && w.writable) return 'could not be viewed here';
  return `is ${w.readable ? 'read-only' : 'write-only'}: rings and buffers need a readable and writable window`;
}

/** One virtqueue of the PCI transport: its common cfg registers and the ring engine's queue. */
export class PciQueue implements VirtioQueueHandle {
  readonly index: number;
  /** queue_size (reads the maximum after reset). */
  size: number;
  readonly maxSize: number;
  vector = VIRTIO_MSI_NO_VECTOR;
  enabled = false;
  desc = 0;
  driver = 0;
  device = 0;
  /**
   * The ring's base to start from (split: next avail idx; packed: the
   * engine's encoding), null for a new ring (split 0; packed 0 with both
   * wrap counters 1).
   */
  base: number | null = null;
  /** The ring engine's queue, from the ring's start (DRIVER_OK) to a reset. */
  engine: DeviceQueue | null = null;
  /** The engine's memory (fd windows in place, windows without fd through bounce buffers). */
  bounce: BounceMemory | null = null;
  /** Buffers of a chain being fetched by DMA_READ: no pop until they are in. */
  #fetching = false;
  /** The bounce budget is in use: no pop until a chain holding bounce buffers completes. */
  #waiting = false;
  /** The staged copies of the rings when some of them are in windows without fd (null: in place). */
  staged: StagedRing | null = null;
  /** A staged ring being read in at its start (its token), null otherwise. */
  starting: object | null = null;
  /** Staged: completions waiting for the loop, and how many chains it wrote into the staged rings not yet flushed. */
  #deferred: { chains: readonly DescChain[]; write: (ring: DeviceQueue) => void }[] = [];
  #applied = 0;
  #appliedTo: DeviceQueue | null = null;
  /** Staged: the loop runs; something came while it ran; a kick (refresh, then the handler) or a pop again (no refresh) is due. */
  #looping = false;
  #again = false;
  #wantKick = false;
  #wantRepop = false;
  /** Staged: a handler popped; once what it wrote is flushed, look whether more is available (one small read). */
  #lookAgain = false;
  /** Staged: a ring DMA failed with the windows there: the queue is broken, nothing more until a reset. */
  #stagedFailed = false;
  #idleWaiters: (() => void)[] = [];
  /** Chains popped (the loop looks again after a handler that popped). */
  #pops = 0;
  /** The bounce buffers of chains in flight. */
  readonly #bounced = new Map<DescChain, { memory: BounceMemory; buffers: Uint8Array[] }>();
  /** Chains popped and not yet pushed. */
  inFlight = 0;
  /** A kick came while the device was stopped (migration). */
  kickPending = false;
  /** An interrupt was due while the device was stopped. */
  irqPending = false;
  /** The memory generation at which `reachOk` was computed. */
  reachGen = -1;
  reachOk = false;
  /** Chains popped, by the ring they came from (pushes to a ring since replaced are dropped). */
  readonly #from = new WeakMap<DescChain, DeviceQueue>();
  #scheduled = false;
  #drainWaiters: (() => void)[] = [];
  readonly #t: VirtioPciTransport;

  /** @internal */
  constructor(index: number, maxSize: number, t: VirtioPciTransport) {
    this.index = index;
    this.maxSize = maxSize;
    this.size = maxSize;
    this.#t = t;
  }

  get features(): bigint {
    return this.#t.driverFeatures;
  }

  /**
   * The engine's queue while its rings are in the DMA windows mapped now;
   * null otherwise (a DMA_UNMAP and its re-map, a client reconnecting): the
   * device leaves it alone meanwhile, and is called again when they are back.
   */
  get ring(): DeviceQueue | null {
    const e = this.engine;
    return e && this.#t.reachable(this) ? e : null;
  }

  pop(): DescChain | null {
    const ring = this.ring;
    if (!ring || !this.#t.serving || this.#fetching || this.#waiting) return null;
    let chain: DescChain | null;
    try {
      chain = ring.pop();
    } catch (err) {
      if (err instanceof BounceMiss) this.#miss(err);
      else this.#t.queueBroken(this, err as Error);
      return null;
    }
    if (chain) {
      const memory = this.bounce;
      const buffers = memory?.claim() ?? [];
      if (memory && buffers.length > 0) this.#bounced.set(chain, { memory, buffers });
      this.#from.set(chain, ring);
      this.#pops++;
      this.inFlight++;
      this.#t.busy(1);
    }
    return chain;
  }

  push(chain: DescChain, written: number): void {
    this.#complete([chain], (ring) => ring.push(chain, written));
  }

  pushBatch(chains: readonly DescChain[], written: ArrayLike<number>): void {
    if (chains.length > 0) this.#complete(chains, (ring) => ring.pushBatch(chains, written));
  }

  /**
   * The engine needs buffers in windows without fd: read them (DMA_READ),
   * then pop again (the pop that missed advanced nothing).
   */
  #miss(miss: BounceMiss): void {
    if (miss.wait) {
      this.#waiting = true;
      return;
    }
    const dma = this.#t.dma;
    const memory = this.bounce;
    const engine = this.engine;
    if (!dma || !memory) return;
    this.#fetching = true;
    this.#t.stats.bounceReads += miss.ranges.length;
    Promise.all(
      miss.ranges.map(async (r) => {
        const b = new Uint8Array(r.length);
        await dma.readInto(r.gpa, b);
        return [r.gpa, b] as const;
      }),
    ).then(
      (fetched) => {
        this.#fetching = false;
        if (this.engine !== engine || this.bounce !== memory) return; // reset meanwhile
        for (const [gpa, b] of fetched) memory.fill(gpa, b);
        if (this.staged) {
          // The staged rings are as they were at the miss: pop again without a refresh.
          this.#wantRepop = true;
          this.#wake();
        } else {
          this.schedule();
        }
      },
      (err: Error) => {
        this.#fetching = false;
        if (this.engine !== engine) return;
        this.#t.queueBroken(this, new Error(`DMA_READ of a buffer failed: ${err.message}`));
      },
    );
  }

  /**
   * Completes chains. Those with bounce buffers have their device-writable
   * ones written back first (DMA_WRITE, whole: the device may write anywhere
   * in them, as virtio-blk's status byte at their end); only once the client
   * has them are the chains pushed to the ring (data before the used entry),
   * then the interrupt.
   */
  #complete(chains: readonly DescChain[], write: (ring: DeviceQueue) => void): void {
    const backs: { gpa: number; bytes: Uint8Array }[] = [];
    const held: { memory: BounceMemory; buffers: Uint8Array[] }[] = [];
    for (const c of chains) {
      const b = this.#bounced.get(c);
      if (!b) continue;
      this.#bounced.delete(c);
      held.push(b);
      const seen = new Set<Uint8Array>();
      for (const v of c.writable) {
        const gpa = b.memory.gpaOf(v);
        if (gpa === undefined || seen.has(v)) continue;
        seen.add(v);
        backs.push({ gpa, bytes: v });
      }
    }
    if (held.length === 0) return this.#finish(chains, write);
    const release = (): void => {
      for (const h of held) h.memory.release(h.buffers);
      if (this.#waiting) {
        this.#waiting = false;
        this.schedule();
      }
    };
    const dma = this.#t.dma;
    if (backs.length === 0 || !dma) {
      if (backs.length > 0) this.#t.log(`queue ${this.index}: a completion dropped, no client to write its buffers back to`);
      release();
      return this.#finish(chains, backs.length === 0 ? write : null);
    }
    this.#t.stats.bounceWrites += backs.length;
    Promise.all(backs.map((b) => dma.write(b.gpa, b.bytes))).then(
      () => {
        release();
        this.#finish(chains, write);
        this.notify();
      },
      (err: Error) => {
        this.#t.log(`queue ${this.index}: a completion dropped, DMA_WRITE of its buffers failed: ${err.message}`);
        release();
        this.#finish(chains, null);
      },
    );
  }

  #finish(chains: readonly DescChain[], write: ((ring: DeviceQueue) => void) | null): void {
    if (this.staged && write) {
      // Staged rings: written by the loop, flushed, then the interrupt decided and the chains done.
      this.#deferred.push({ chains, write });
      this.#wake();
      return;
    }
    this.#settle(this.#apply(chains, write));
  }

  /** Writes the chains' used entries to the ring (unless it is gone: dropped); returns how many were in flight. */
  #apply(chains: readonly DescChain[], write: ((ring: DeviceQueue) => void) | null): number {
    const ring = write ? this.ring : null;
    const ours = ring !== null && chains.every((c) => this.#from.get(c) === ring);
    let n = 0;
    for (const c of chains) if (this.#from.delete(c)) n++;
    if (ours && write) {
      try {
        write(ring);
      } catch (err) {
        if (err instanceof VirtioError && err.code === 'USED_ID') this.#t.log(`queue ${this.index}: ${err.message}`);
        else this.#t.queueBroken(this, err as Error);
      }
    }
    // A completion for a ring that was reset (or replaced) is dropped: that ring is gone.
    if (!ours && write && this.engine && ring === null) this.#t.log(`queue ${this.index}: a completion dropped, the ring is not in the DMA windows mapped`);
    return n;
  }

  /** n chains are done (their used entries visible to the driver, or dropped). */
  #settle(n: number): void {
    if (n === 0) return;
    this.inFlight = Math.max(0, this.inFlight - n);
    this.#t.busy(-n);
    if (this.inFlight === 0 && this.#drainWaiters.length > 0) {
      const w = this.#drainWaiters;
      this.#drainWaiters = [];
      for (const f of w) f();
    }
  }

  notify(): void {
    // Staged rings: the loop decides once the used entries are flushed and the driver's event fields read.
    if (this.staged) return;
    const ring = this.ring;
    if (ring) this.#decide(ring);
  }

  /** Interrupts if the driver wants one for what was pushed (held while the device is stopped). */
  #decide(ring: DeviceQueue): void {
    try {
      if (!ring.needsNotify()) return;
    } catch (err) {
      this.#t.log(`queue ${this.index}: notify failed: ${(err as Error).message}`);
      return;
    }
    if (this.#t.interruptsAllowed) this.#t.interrupt(this);
    else this.irqPending = true;
  }

  /** Resolves once nothing is in flight. */
  drained(): Promise<void> {
    if (this.inFlight === 0) return Promise.resolve();
    return new Promise((resolve) => this.#drainWaiters.push(resolve));
  }

  /** Runs the device's handler for this queue soon (once per turn of the event loop). */
  schedule(): void {
    if (this.staged) {
      this.#wantKick = true;
      this.#wake();
      return;
    }
    if (this.#scheduled) return;
    this.#scheduled = true;
    setImmediate(() => {
      this.#scheduled = false;
      if (this.engine && this.#t.serving) this.#t.handle(this);
    });
  }

  /** Resolves once the staged loop (if any) is not running: no ring transfer of this queue is out. */
  idle(): Promise<void> {
    if (!this.#looping) return Promise.resolve();
    return new Promise((resolve) => this.#idleWaiters.push(resolve));
  }

  /** @internal A staged ring was read in and its engine built: the loop serves it from now on. */
  startStaged(engine: DeviceQueue, bounce: BounceMemory, st: StagedRing): void {
    this.engine = engine;
    this.bounce = bounce;
    this.staged = st;
    this.#stagedFailed = false;
    this.reachGen = -1;
    this.schedule(); // buffers may be waiting already
  }

  // --- rings in windows without fd: one sequential loop per queue ---

  #wake(): void {
    if (this.#looping) {
      this.#again = true;
      return;
    }
    this.#looping = true;
    void this.#run().finally(() => {
      this.#looping = false;
      if (this.#again) return this.#wake();
      for (const f of this.#idleWaiters.splice(0)) f();
    });
  }

  /** Completions of a ring that is gone (reset, replaced, broken): counted done, not written. */
  #dropAll(): void {
    if (this.#applied > 0) this.#settle(this.#applied);
    this.#applied = 0;
    this.#appliedTo = null;
    for (const d of this.#deferred.splice(0)) this.#settle(this.#apply(d.chains, null));
  }

  /**
   * The loop of a staged queue. Nothing else touches its staged rings, and
   * each step waits for the previous one's DMA, so no refresh lands over a
   * write not yet flushed:
   *   1. completions written into the staged rings (the engine's push);
   *   2. what the engine wrote flushed (DMA_WRITE): bodies, then the words
   *      that publish them (split used idx; packed flags); the buffers' data
   *      was written before the chains were pushed (bounce write-backs first);
   *   3. after a flush of completions: the driver's event fields read again,
   *      the interrupt decided; only now are those chains done (a STOP or a
   *      reset waits for this);
   *   4. on a kick: the driver areas read again and the device's handler run
   *      if a chain is available; after a handler that popped, once more from
   *      2: what it wrote (avail_event, flags) is flushed before the next look
   *      at the avail side (the avail idx, or the next packed head's flags;
   *      all of it again only if they moved), so a buffer the driver adds
   *      meanwhile is seen or kicked.
   * Rings not in the windows mapped now (a window unmapped, the client gone)
   * wait, completions kept, until they are back; a reset drops them.
   */
  async #run(): Promise<void> {
    for (;;) {
      this.#again = false;
      const st = this.staged;
      const engine = this.engine;
      if (this.#appliedTo !== null && this.#appliedTo !== engine) {
        this.#settle(this.#applied);
        this.#applied = 0;
        this.#appliedTo = null;
      }
      if (!st || !engine || this.#stagedFailed) {
        this.#dropAll();
        return;
      }
      const dma = this.#t.dma;
      if (!dma || !this.#t.reachable(this)) {
        if (!this.#t.running && (this.#applied > 0 || this.#deferred.length > 0)) {
          // Stopping: a STOP cannot wait for windows that may not come back.
          this.#stagedFailed = true;
          this.#t.queueBroken(this, new Error(`queue ${this.index}: completions due while its rings are not in the DMA windows mapped`));
          this.#dropAll();
        }
        return; // dmaMapped wakes it
      }
      try {
        if (this.#deferred.length > 0) {
          for (const d of this.#deferred.splice(0)) this.#applied += this.#apply(d.chains, d.write);
          this.#appliedTo = engine;
        }
        await st.flush(dma);
        if (this.engine !== engine) continue;
        if (this.#applied > 0) {
          await st.refreshEvents(dma);
          if (this.engine !== engine) continue;
          this.#decide(engine);
          const n = this.#applied;
          this.#applied = 0;
          this.#appliedTo = null;
          this.#settle(n);
        }
        if (this.#canKick(engine)) {
          const base = engine.packed ? engine.base() & 0xffff : engine.base();
          let refresh = this.#wantKick;
          const repop = this.#wantRepop;
          const look = this.#lookAgain;
          this.#wantKick = false;
          this.#wantRepop = false;
          this.#lookAgain = false;
          // After a handler: the avail idx (packed: the next head's flags) alone says whether to read it all again.
          if (!refresh && !repop && look) refresh = await st.moreAvailable(dma, base);
          if (this.engine !== engine) continue;
          if (refresh) {
            await st.refreshDriver(dma, base);
            if (this.engine !== engine) continue;
          }
          if ((refresh || repop) && this.#t.serving && engine.available()) {
            const before = this.#pops;
            this.#t.handle(this);
            if (this.#pops !== before) this.#lookAgain = true;
          }
        }
      } catch (err) {
        if (this.engine !== engine) continue;
        if (!this.#t.dma || !this.#t.reachable(this)) continue; // the windows went away meanwhile: wait for them
        this.#stagedFailed = true;
        this.#t.queueBroken(this, new Error(`queue ${this.index}: DMA of its rings failed: ${(err as Error).message}`));
        continue;
      }
      if (!this.#again && this.#deferred.length === 0 && !st.dirty && !this.#canKick(engine)) return;
    }
  }

  #canKick(engine: DeviceQueue): boolean {
    return (this.#wantKick || this.#wantRepop || this.#lookAgain) && this.#t.serving && !this.#fetching && !this.#waiting && engine.broken === null;
  }

  /** Back to the state after reset (the ring dropped; completions still due are discarded). */
  resetRegisters(): void {
    this.staged = null;
    this.starting = null;
    this.reachGen = -1; // reachability was computed for staged rings
    this.#stagedFailed = false;
    this.#wantKick = false;
    this.#wantRepop = false;
    this.#lookAgain = false;
    this.#dropAll();
    this.engine = null;
    this.bounce = null;
    this.#fetching = false;
    this.#waiting = false;
    this.size = this.maxSize;
    this.vector = VIRTIO_MSI_NO_VECTOR;
    this.enabled = false;
    this.desc = 0;
    this.driver = 0;
    this.device = 0;
    this.base = null;
    this.kickPending = false;
    this.irqPending = false;
  }
}

/** Counters for tests and logs. */
export interface VirtioPciStats {
  kicks: number;
  ioeventfdKicks: number;
  interrupts: number;
  resets: number;
  brokenQueues: number;
  /** DMA_READ transfers of buffers in windows without fd, and DMA_WRITE write-backs. */
  bounceReads: number;
  bounceWrites: number;
  /** DMA_READs and DMA_WRITEs of staged ring bytes (rings in windows without fd). */
  ringReads: number;
  ringWrites: number;
}

/** The transport's state: common cfg registers, queues, interrupts, DMA memory, migration. */
export class VirtioPciTransport {
  readonly device: VirtioDeviceModel & VirtioPciModelState;
  readonly queues: PciQueue[];
  readonly memory = new DmaMemory();
  readonly ioEventFds: IoEventFdSpec[] = [];
  readonly stats: VirtioPciStats = { kicks: 0, ioeventfdKicks: 0, interrupts: 0, resets: 0, brokenQueues: 0, bounceReads: 0, bounceWrites: 0, ringReads: 0, ringWrites: 0 };
  /** The features offered (device features the transport supports). */
  readonly offered: bigint;
  readonly configSize: number;
  readonly vectors: number;
  readonly bounceLimit: number;
  driverFeatures = 0n;
  deviceFeatureSelect = 0;
  driverFeatureSelect = 0;
  configVector = VIRTIO_MSI_NO_VECTOR;
  status = 0;
  configGeneration = 0;
  queueSelect = 0;
  isr = 0;
  readonly #log: (line: string) => void;
  #ctx: DeviceContext | null = null;
  /** False from a migration's STOP until RUNNING: no new requests, kicks remembered. */
  #running = true;
  /** False once a STOP completed: interrupts are held until RUNNING. */
  #irqsAllowed = true;
  /** A driver reset (status 0) waiting for requests in flight; status reads this meanwhile. */
  #resetShown: number | null = null;
  #resetDone: Promise<void> | null = null;
  #quiesced: Promise<void> | null = null;
  /** A state was loaded since the device last ran: the next RUNNING is the guest arriving (VirtioPciModelState.migrated). */
  #loaded = false;
  /**
   * Chains in flight on every queue. Each window mapped by fd is held from its DMA_MAP
   * (#holds): a DMA_UNMAP that comes while chains are in flight retires the hold, and its reply
   * waits until none is; one that comes with none in flight releases it at once. Holding per
   * window rather than per burst of requests keeps the request path free of hold/release work
   * (a null disk completes each request before the next pop: the burst was one request).
   */
  #busy = 0;
  readonly #holds = new Map<string, () => void>();
  /** Holds of windows unmapped while busy: released when nothing is in flight. */
  #retired: (() => void)[] = [];
  readonly #unsubscribe: (() => void)[] = [];
  readonly #dirtyLog: DirtyLog;
  #configWriteLogged = false;
  #pciCfgBadLogged = false;

  constructor(device: VirtioDeviceModel & VirtioPciModelState, options: VirtioPciOptions) {
    this.device = device;
    this.#log = options.log ?? (() => undefined);
    this.bounceLimit = options.bounceLimit ?? 16 << 20;
    if (!Number.isSafeInteger(this.bounceLimit) || this.bounceLimit < 4096) throw new RangeError(`bounceLimit ${this.bounceLimit}`);
    if (!Number.isInteger(options.deviceId) || options.deviceId < 1 || options.deviceId > 0xffff - VIRTIO_PCI_DEVICE_ID_BASE) {
      throw new RangeError(`virtio device id ${options.deviceId}`);
    }
    const n = device.numQueues;
    if (!Number.isInteger(n) || n < 1 || n > MAX_QUEUES) throw new RangeError(`numQueues ${n}: 1..${MAX_QUEUES}`);
    let max = Math.min(device.maxQueueSize ?? 32768, 32768);
    let p = 1;
    while (p * 2 <= max) p *= 2;
    max = p; // a power of two: valid for split and packed rings
    this.queues = Array.from({ length: n }, (_, i) => new PciQueue(i, max, this));
    this.vectors = 1 + n;
    let offered = device.features & TRANSPORT_FEATURES;
    if (options.accessPlatform) offered |= bit(F_ACCESS_PLATFORM);
    if (!(offered & bit(F_VERSION_1))) throw new RangeError('the device must offer VIRTIO_F_VERSION_1 (a modern device)');
    this.offered = offered;
    const cfg = device.config?.() ?? new Uint8Array(0);
    if (cfg.length > VirtioPciLayout.DEVICE_SIZE) throw new RangeError(`device config of ${cfg.length} bytes`);
    this.configSize = cfg.length;
    for (const r of device.configDriverMutable ?? []) {
      if (!Number.isInteger(r.offset) || !Number.isInteger(r.length) || r.offset < 0 || r.length < 1 || r.offset + r.length > cfg.length) {
        throw new RangeError(`configDriverMutable [${r.offset}, +${r.length}) outside the ${cfg.length}-byte device config`);
      }
    }
    const t = this;
    this.#dirtyLog = {
      bytes: new Uint8Array(0),
      overflow: 0,
      mark(gpa: number, length: number) {
        t.#ctx?.dma.markDirty(gpa, length);
      },
    };
    if (options.ioeventfds ?? true) {
      for (const q of this.queues) {
        const eventfd = EventFd.create();
        this.ioEventFds.push({ offset: VirtioPciLayout.NOTIFY + q.index * VirtioPciLayout.NOTIFY_OFF_MULTIPLIER, size: 0, eventfd });
        this.#unsubscribe.push(
          eventfd.subscribe(() => {
            this.stats.ioeventfdKicks++;
            this.kick(q);
          }),
        );
      }
    }
  }

  log(line: string): void {
    this.#log(line);
  }

  /** @internal The client's DMA, while one is connected. */
  get dma(): DeviceContext['dma'] | null {
    return this.#ctx?.dma ?? null;
  }

  /** Whether new requests are taken (not stopped, not resetting, no DMA_UNMAP waiting for requests in flight). */
  get serving(): boolean {
    return this.#running && this.#resetShown === null && this.memory.ghosts.length === 0;
  }

  /** A queue's ring layout as the driver set it. */
  #layout(q: PciQueue): { packed: boolean; eventIdx: boolean; size: number; desc: number; driver: number; device: number } {
    const f = this.driverFeatures;
    return { packed: (f & bit(F_RING_PACKED)) !== 0n, eventIdx: (f & bit(F_EVENT_IDX)) !== 0n, size: q.size, desc: q.desc, driver: q.driver, device: q.device };
  }

  /** The areas of a queue's rings: [what, gpa, bytes]. */
  #ringAreas(q: PciQueue): [string, number, number][] {
    const l = this.#layout(q);
    const names = l.packed ? { desc: 'descriptor ring', driver: 'driver area', device: 'device area' } : { desc: 'descriptor table', driver: 'avail ring', device: 'used ring' };
    return ringAreas(l).map(([what, gpa, len]) => [names[what], gpa, len]);
  }

  /** @internal Whether a queue's rings are all in the windows mapped now (cached per memory generation). */
  reachable(q: PciQueue): boolean {
    const g = this.memory.generation;
    if (q.reachGen !== g) {
      // Staged rings are reached by DMA (mapped windows or messages); the others in place (mapped windows).
      q.reachOk = this.#ringAreas(q).every(([, gpa, len]) => (q.staged ? this.memory.reachableByDma(gpa, len) : this.memory.has(gpa, len)));
      q.reachGen = g;
    }
    return q.reachOk;
  }

  get interruptsAllowed(): boolean {
    return this.#irqsAllowed;
  }

  get running(): boolean {
    return this.#running;
  }

  /** Closes the ioeventfds (after the server is closed). */
  close(): void {
    for (const u of this.#unsubscribe.splice(0)) u();
    for (const e of this.ioEventFds) e.eventfd.close();
    this.#releaseHolds();
  }

  // --- the server's hooks ---

  attach(ctx: DeviceContext): void {
    this.#ctx = ctx;
  }

  detach(): void {
    this.#ctx = null;
  }

  dmaMapped(w: DmaWindow): void {
    const ctx = this.#ctx;
    if (!ctx) return;
    if (!w.mapped && w.readable && w.writable) {
      // Reached by DMA_READ / DMA_WRITE: buffers there go through bounce buffers.
      this.memory.addMessageWindow(w);
      for (const q of this.queues) {
        if (q.enabled && !q.engine) this.#start(q); // rings waiting for it (staged)
        else if (q.engine) q.schedule();
      }
      return;
    }
    const bytes = w.mapped && w.readable && w.writable ? ctx.dma.view(w.iova, w.size) : null;
    if (!bytes) {
      this.memory.unusable.push(w);
      return;
    }
    // A window unmapped under I/O and mapped again before that I/O is done: the new mapping serves from now on.
    for (const g of this.memory.ghosts.filter((g) => g.iova < w.iova + w.size && w.iova < g.iova + g.size)) this.#dropGhost(g);
    this.memory.mapped.add({ guestPhysAddr: w.iova, size: w.size, userAddr: w.iova, mmapOffset: 0 }, bytes);
    this.#hold(w);
    // A ring waiting for its memory (a restored device whose client maps after RUNNING).
    for (const q of this.queues) {
      if (q.enabled && !q.engine) this.#start(q);
      else if (q.engine) q.schedule(); // rings that were out of reach may be back
    }
  }

  dmaUnmapped(w: DmaWindow): void {
    if (this.memory.removeMessageWindow(w)) return;
    const i = this.memory.unusable.findIndex((u) => u.iova === w.iova && u.size === w.size);
    if (i >= 0) {
      this.memory.unusable.splice(i, 1);
      return;
    }
    const key = `${w.iova}:${w.size}`;
    const held = this.#holds.get(key);
    this.#holds.delete(key);
    if (held && this.#busy > 0) {
      // Requests in flight may still complete into it: it stays (held) until they are done.
      this.#retired.push(held);
      this.memory.ghosts.push(w);
    } else {
      this.memory.mapped.remove({ guestPhysAddr: w.iova, size: w.size, userAddr: w.iova });
      held?.(); // nothing in flight: the DMA_UNMAP is answered now
    }
  }

  #dropGhost(g: DmaWindow): void {
    this.memory.ghosts = this.memory.ghosts.filter((x) => x !== g);
    this.memory.mapped.remove({ guestPhysAddr: g.iova, size: g.size, userAddr: g.iova });
    // A hold taken on it stays until nothing is in flight: the I/O may still write there.
  }

  /** DEVICE_RESET: a reset of the virtio device, once requests in flight are done. */
  async deviceReset(): Promise<void> {
    this.#driverReset();
    await this.#resetDone;
  }

  // --- VIRTIO_PCI_CAP_PCI_CFG (4.1.4.9) ---

  /** A config read overlapping pci_cfg_data: the BAR access cap.bar/offset/length names, its bytes in pci_cfg_data. */
  pciCfgRead(offset: number, out: Uint8Array, config: ConfigReader): void {
    if (offset >= PCI_CFG_DATA + 4 || offset + out.length <= PCI_CFG_DATA) return;
    const at = this.#pciCfgTarget(config);
    if (!at) return; // a bad window: pci_cfg_data reads as written
    const bytes = new Uint8Array(at.length);
    this.barRead(at.offset, bytes);
    for (let i = 0; i < at.length; i++) {
      const o = PCI_CFG_DATA + i - offset;
      if (o >= 0 && o < out.length) out[o] = bytes[i]!;
    }
  }

  /** A config write overlapping pci_cfg_data: the first cap.length bytes of it written to the BAR. */
  pciCfgWrite(offset: number, data: Uint8Array, config: ConfigReader): void {
    if (offset >= PCI_CFG_DATA + 4 || offset + data.length <= PCI_CFG_DATA) return;
    const at = this.#pciCfgTarget(config);
    if (at) this.barWrite(at.offset, config.read(PCI_CFG_DATA, at.length));
  }

  /**
   * cap.bar, cap.offset and cap.length as the driver set them, or null when
   * they do not name an aligned access of 1, 2 or 4 bytes inside BAR4 (the
   * driver MUST NOT use pci_cfg_data then; the access is ignored, logged once).
   */
  #pciCfgTarget(config: ConfigReader): { offset: number; length: number } | null {
    const c = config.read(PCI_CFG_CAP_OFFSET, 16);
    const v = new DataView(c.buffer, c.byteOffset, c.byteLength);
    const bar = c[4]!;
    const offset = v.getUint32(8, true);
    const length = v.getUint32(12, true);
    const L = VirtioPciLayout;
    if (bar === L.BAR && (length === 1 || length === 2 || length === 4) && offset % length === 0 && offset + length <= L.BAR_SIZE) {
      return { offset, length };
    }
    if (!this.#pciCfgBadLogged) {
      this.#pciCfgBadLogged = true;
      this.#log(`pci_cfg_data access ignored: cap.bar ${bar}, cap.offset ${hex(offset)}, cap.length ${length} (an aligned 1, 2 or 4 bytes in BAR${L.BAR})`);
    }
    return null;
  }

  // --- BAR4 ---

  barRead(offset: number, out: Uint8Array): void {
    const L = VirtioPciLayout;
    out.fill(0);
    const end = offset + out.length;
    const copy = (base: number, bytes: Uint8Array): void => {
      const from = Math.max(offset, base);
      const to = Math.min(end, base + bytes.length);
      if (from < to) out.set(bytes.subarray(from - base, to - base), from - offset);
    };
    if (offset < L.COMMON + CommonCfg.SIZE && end > L.COMMON) copy(L.COMMON, this.#commonImage());
    if (offset <= L.ISR && end > L.ISR) {
      out[L.ISR - offset] = this.isr;
      this.isr = 0; // read to clear (4.1.4.5)
    }
    if (offset < L.DEVICE + this.configSize && end > L.DEVICE) copy(L.DEVICE, this.device.config?.() ?? new Uint8Array(0));
  }

  barWrite(offset: number, data: Uint8Array): void {
    const L = VirtioPciLayout;
    const end = offset + data.length;
    if (offset < L.COMMON + CommonCfg.SIZE && end > L.COMMON) this.#commonWrite(offset - L.COMMON, data);
    if (offset >= L.NOTIFY && offset < L.NOTIFY + L.NOTIFY_SIZE) {
      const q = this.queues[Math.floor((offset - L.NOTIFY) / L.NOTIFY_OFF_MULTIPLIER)];
      if (q) {
        this.stats.kicks++;
        this.kick(q);
      }
    }
    if (offset < L.DEVICE + L.DEVICE_SIZE && end > L.DEVICE && !this.#configWriteLogged) {
      this.#configWriteLogged = true;
      this.#log('the driver wrote the device config: ignored (no writable config fields)');
    }
  }

  /** virtio_pci_common_cfg as the driver reads it now. */
  #commonImage(): Uint8Array {
    const b = new Uint8Array(CommonCfg.SIZE);
    const v = new DataView(b.buffer);
    const C = CommonCfg;
    v.setUint32(C.DEVICE_FEATURE_SELECT, this.deviceFeatureSelect, true);
    const sel = this.deviceFeatureSelect;
    v.setUint32(C.DEVICE_FEATURE, sel < 2 ? Number((this.offered >> BigInt(32 * sel)) & 0xffffffffn) : 0, true);
    v.setUint32(C.DRIVER_FEATURE_SELECT, this.driverFeatureSelect, true);
    const dsel = this.driverFeatureSelect;
    v.setUint32(C.DRIVER_FEATURE, dsel < 2 ? Number((this.driverFeatures >> BigInt(32 * dsel)) & 0xffffffffn) : 0, true);
    v.setUint16(C.CONFIG_MSIX_VECTOR, this.configVector, true);
    v.setUint16(C.NUM_QUEUES, this.queues.length, true);
    v.setUint8(C.DEVICE_STATUS, this.#resetShown ?? this.status);
    v.setUint8(C.CONFIG_GENERATION, this.configGeneration & 0xff);
    v.setUint16(C.QUEUE_SELECT, this.queueSelect, true);
    const q = this.queues[this.queueSelect];
    if (q) {
      v.setUint16(C.QUEUE_SIZE, q.size, true);
      v.setUint16(C.QUEUE_MSIX_VECTOR, q.vector, true);
      v.setUint16(C.QUEUE_ENABLE, q.enabled ? 1 : 0, true);
      v.setUint16(C.QUEUE_NOTIFY_OFF, q.index, true);
      v.setBigUint64(C.QUEUE_DESC, BigInt(q.desc), true);
      v.setBigUint64(C.QUEUE_DRIVER, BigInt(q.driver), true);
      v.setBigUint64(C.QUEUE_DEVICE, BigInt(q.device), true);
    }
    return b;
  }

  /** A write to the common cfg: each field it touches takes its new value, in offset order. */
  #commonWrite(offset: number, data: Uint8Array): void {
    const C = CommonCfg;
    const start = Math.max(0, offset);
    const end = Math.min(C.SIZE, offset + data.length);
    if (start >= end) return;
    const next = this.#commonImage();
    next.set(data.subarray(start - offset, end - offset), start);
    const v = new DataView(next.buffer);
    const touched = (at: number, size: number): boolean => at < end && start < at + size;
    const resetting = this.#resetShown !== null;
    if (touched(C.DEVICE_FEATURE_SELECT, 4)) this.deviceFeatureSelect = v.getUint32(C.DEVICE_FEATURE_SELECT, true);
    if (touched(C.DRIVER_FEATURE_SELECT, 4)) this.driverFeatureSelect = v.getUint32(C.DRIVER_FEATURE_SELECT, true);
    if (touched(C.DRIVER_FEATURE, 4) && this.driverFeatureSelect < 2 && !(this.status & VirtioStatus.FEATURES_OK)) {
      const shift = BigInt(32 * this.driverFeatureSelect);
      const word = BigInt(v.getUint32(C.DRIVER_FEATURE, true));
      this.driverFeatures = (this.driverFeatures & ~(0xffffffffn << shift)) | (word << shift);
    }
    if (touched(C.CONFIG_MSIX_VECTOR, 2)) this.configVector = this.#vector(v.getUint16(C.CONFIG_MSIX_VECTOR, true));
    if (touched(C.DEVICE_STATUS, 1)) this.#statusWrite(v.getUint8(C.DEVICE_STATUS));
    if (touched(C.QUEUE_SELECT, 2)) this.queueSelect = v.getUint16(C.QUEUE_SELECT, true);
    const q = this.queues[this.queueSelect];
    if (!q || resetting) return;
    if (touched(C.QUEUE_MSIX_VECTOR, 2)) q.vector = this.#vector(v.getUint16(C.QUEUE_MSIX_VECTOR, true));
    if (!q.enabled) {
      // The driver may not change a queue's size or addresses once enabled (4.1.4.3.2).
      if (touched(C.QUEUE_SIZE, 2)) q.size = v.getUint16(C.QUEUE_SIZE, true);
      if (touched(C.QUEUE_DESC, 8)) q.desc = Number(v.getBigUint64(C.QUEUE_DESC, true));
      if (touched(C.QUEUE_DRIVER, 8)) q.driver = Number(v.getBigUint64(C.QUEUE_DRIVER, true));
      if (touched(C.QUEUE_DEVICE, 8)) q.device = Number(v.getBigUint64(C.QUEUE_DEVICE, true));
    }
    if (touched(C.QUEUE_ENABLE, 2) && v.getUint16(C.QUEUE_ENABLE, true) === 1 && !q.enabled) {
      q.enabled = true;
      this.#start(q);
    }
  }

  /** A vector the device can use, or NO_VECTOR (4.1.5.1.2: the device reports NO_VECTOR for one it cannot map). */
  #vector(v: number): number {
    return v < this.vectors ? v : VIRTIO_MSI_NO_VECTOR;
  }

  #statusWrite(value: number): void {
    if (value === 0) {
      this.#driverReset();
      return;
    }
    if (this.#resetShown !== null) return; // still resetting: the driver waits for 0
    const S = VirtioStatus;
    let v = (value & ~S.DEVICE_NEEDS_RESET) | (this.status & S.DEVICE_NEEDS_RESET);
    const added = v & ~this.status;
    if (added & S.FEATURES_OK) {
      const f = this.driverFeatures;
      if ((f & ~this.offered) !== 0n || !(f & bit(F_VERSION_1))) {
        this.#log(`FEATURES_OK refused: driver features 0x${f.toString(16)} (offered 0x${this.offered.toString(16)}, VERSION_1 required)`);
        v &= ~S.FEATURES_OK;
      } else {
        this.device.setFeatures?.(f);
      }
    }
    this.status = v;
    if (added & S.DRIVER_OK) {
      if (!(v & S.FEATURES_OK)) this.#log('DRIVER_OK without FEATURES_OK: queues not started');
      else for (const q of this.queues) this.#start(q);
    }
  }

  /**
   * Status 0 (or DEVICE_RESET): queues stop at once (no new requests; what
   * completes afterwards is dropped), and the status reads as before until
   * the requests in flight are done, since their I/O may still write into
   * guest memory; then every register is back to its reset value.
   */
  #driverReset(): void {
    if (this.#resetShown !== null) return;
    this.stats.resets++;
    this.#resetShown = this.status;
    this.#stopping();
    for (const q of this.queues) q.engine = null;
    this.#resetDone = Promise.all(this.queues.map((q) => q.drained())).then(() => {
      for (const q of this.queues) q.resetRegisters();
      this.driverFeatures = 0n;
      this.deviceFeatureSelect = 0;
      this.driverFeatureSelect = 0;
      this.configVector = VIRTIO_MSI_NO_VECTOR;
      this.status = 0;
      this.queueSelect = 0;
      this.isr = 0;
      try {
        this.device.reset?.();
      } catch (err) {
        this.#log(`the device's reset threw: ${(err as Error).message}`);
      }
      this.#resetShown = null;
    });
  }

  // --- queues ---

  /** Tells the device its running queues stop: it gives back the chains it holds. */
  #stopping(): void {
    for (const q of this.queues) {
      try {
        if (q.engine) this.device.queueStopping?.(q);
      } catch (err) {
        this.#log(`queue ${q.index}: queueStopping threw: ${(err as Error).message}`);
      }
    }
  }

  /** Builds the ring of an enabled queue once the driver is ready (DRIVER_OK) and the device runs. */
  #start(q: PciQueue): void {
    if (q.engine || !q.enabled || !this.#running || this.#resetShown !== null) return;
    const S = VirtioStatus;
    if ((this.status & (S.DRIVER_OK | S.FEATURES_OK)) !== (S.DRIVER_OK | S.FEATURES_OK)) return;
    if (this.status & S.DEVICE_NEEDS_RESET) return;
    const f = this.driverFeatures;
    const packed = (f & bit(F_RING_PACKED)) !== 0n;
    const eventIdx = (f & bit(F_EVENT_IDX)) !== 0n;
    const n = q.size;
    if (q.starting) return; // its staged rings are being read in
    let staged = false;
    for (const [what, gpa, len] of this.#ringAreas(q)) {
      if (this.memory.has(gpa, len)) continue;
      const w = this.memory.unusableAt(gpa, len);
      if (!w && this.memory.reachableByDma(gpa, len)) {
        staged = true; // (part of it) in a window without fd: staged copies
        continue;
      }
      if (w) {
        this.queueBroken(q, new VirtioError('RING_LAYOUT', `queue ${q.index}: the ${what} at ${hex(gpa)} is in the DMA window [${hex(w.iova)}, +${hex(w.size)}), which ${whyUnusable(w)}`));
      } else {
        this.#log(`queue ${q.index}: the ${what} [${hex(gpa)}, +${len}) is not in the DMA windows mapped: waiting for them`);
      }
      return;
    }
    if (n < 1 || n > q.maxSize) {
      this.queueBroken(q, new VirtioError('RING_LAYOUT', `queue ${q.index}: size ${n} (1..${q.maxSize})`));
      return;
    }
    const build = (memory: (bounce: BounceMemory) => GuestMemoryView, log: DirtyLog): { engine: DeviceQueue; bounce: BounceMemory } => {
      const bounce = new BounceMemory(this.memory, () => this.memory.messages, () => this.memory.generation, this.bounceLimit);
      const engine = createDeviceQueue({
        memory: memory(bounce),
        size: n,
        packed,
        desc: q.desc,
        driver: q.driver,
        device: q.device,
        eventIdx,
        indirect: (f & bit(F_INDIRECT_DESC)) !== 0n,
        ...(q.base !== null ? { base: q.base } : {}),
        log,
      });
      return { engine, bounce };
    };
    if (staged) {
      this.#startStaged(q, build);
      return;
    }
    try {
      const { engine, bounce } = build((b) => b, this.#dirtyLog);
      q.engine = engine;
      q.bounce = bounce;
    } catch (err) {
      this.queueBroken(q, err as Error);
      return;
    }
    q.schedule(); // buffers may be waiting already
  }

  /**
   * Rings (some of their areas) in windows without fd: read them in, then
   * the engine over the staged copies (the PciQueue's loop serves it).
   */
  #startStaged(q: PciQueue, build: (memory: (bounce: BounceMemory) => GuestMemoryView, log: DirtyLog) => { engine: DeviceQueue; bounce: BounceMemory }): void {
    const dma = this.dma;
    if (!dma) return; // no client: started when its windows are mapped
    const layout = this.#layout(q);
    let st: StagedRing;
    try {
      st = new StagedRing(layout, this.stats);
    } catch (err) {
      this.queueBroken(q, new VirtioError('RING_LAYOUT', `queue ${q.index}: ${(err as Error).message}`));
      return;
    }
    const token = {};
    q.starting = token;
    const t = this;
    const log = {
      bytes: new Uint8Array(0),
      overflow: 0,
      mark(gpa: number, length: number) {
        t.#ctx?.dma.markDirty(gpa, length);
        st.mark(gpa, length);
      },
    } as DirtyLog;
    // Packed: the next avail slot and its wrap counter (a new ring: slot 0, wrap 1); a bad base is refused by the engine.
    const avail = layout.packed ? (q.base ?? 0x8000) & 0xffff : 0;
    st.load(dma, (avail & 0x7fff) < layout.size ? avail : 0x8000).then(
      () => {
        if (q.starting !== token) return; // reset meanwhile
        q.starting = null;
        const S = VirtioStatus;
        if (q.engine || !q.enabled || !this.#running || this.#resetShown !== null) return;
        if ((this.status & (S.DRIVER_OK | S.FEATURES_OK | S.DEVICE_NEEDS_RESET)) !== (S.DRIVER_OK | S.FEATURES_OK)) return;
        let built;
        try {
          built = build((bounce) => st.memory(bounce), log);
        } catch (err) {
          this.queueBroken(q, err as Error);
          return;
        }
        q.startStaged(built.engine, built.bounce, st);
      },
      (err: Error) => {
        if (q.starting !== token) return;
        q.starting = null;
        // The client left, or a window went away: started again when its windows are mapped.
        if (!this.dma || !this.#ringAreas(q).every(([, gpa, len]) => this.memory.reachableByDma(gpa, len))) return;
        this.queueBroken(q, new Error(`queue ${q.index}: reading its rings failed: ${err.message}`));
      },
    );
  }

  kick(q: PciQueue): void {
    if (!this.#running) {
      q.kickPending = true;
      return;
    }
    if (!q.engine) this.#start(q);
    if (q.engine) q.schedule();
  }

  /** @internal The device's handler, guarded. */
  handle(q: PciQueue): void {
    try {
      this.device.handleQueue(q);
    } catch (err) {
      this.#log(`queue ${q.index}: the device's handler threw: ${(err as Error).message}`);
    }
  }

  /** A malformed ring or chain: the queue stops and the device asks for a reset (DEVICE_NEEDS_RESET, a config interrupt). */
  queueBroken(q: PciQueue, err: Error): void {
    this.stats.brokenQueues++;
    this.#log(`queue ${q.index} broken: ${err.message}`);
    if (this.status & VirtioStatus.DEVICE_NEEDS_RESET) return;
    this.status |= VirtioStatus.DEVICE_NEEDS_RESET;
    if (this.status & VirtioStatus.DRIVER_OK) this.configChanged();
  }

  /** The device config (or DEVICE_NEEDS_RESET) changed: config_generation moves, config interrupt. */
  configChanged(): void {
    this.configGeneration = (this.configGeneration + 1) & 0xff;
    this.isr |= 2;
    this.#raise(this.configVector);
  }

  /** @internal A used-buffer notification for `q`. */
  interrupt(q: PciQueue): void {
    this.isr |= 1;
    this.#raise(q.vector);
  }

  #raise(vector: number): void {
    const ctx = this.#ctx;
    if (!ctx) return;
    this.stats.interrupts++;
    if (vector !== VIRTIO_MSI_NO_VECTOR) ctx.trigger('msix', vector);
    else ctx.trigger('intx');
  }

  /** @internal Chains in flight went up or down by n: while any is, the DMA windows stay mapped. */
  busy(n: number): void {
    const before = this.#busy;
    this.#busy = Math.max(0, before + n);
    if (before > 0 && this.#busy === 0 && (this.#retired.length > 0 || this.memory.ghosts.length > 0)) {
      const paused = this.memory.ghosts.length > 0;
      for (const g of [...this.memory.ghosts]) this.#dropGhost(g);
      const retired = this.#retired;
      this.#retired = [];
      for (const release of retired) release(); // answers the DMA_UNMAPs that waited
      if (paused) for (const q of this.queues) if (q.engine) q.schedule();
    }
  }

  #hold(w: DmaWindow): void {
    const key = `${w.iova}:${w.size}`;
    if (this.#holds.has(key) || !this.#ctx) return;
    try {
      this.#holds.set(key, this.#ctx.dma.hold(w.iova, w.size));
    } catch (err) {
      this.#log(`hold of DMA window ${hex(w.iova)}: ${(err as Error).message}`);
    }
  }

  #releaseHolds(): void {
    const all = [...this.#holds.values(), ...this.#retired];
    this.#holds.clear();
    this.#retired = [];
    for (const release of all) release();
  }

  // --- migration ---

  async transition(from: string, to: string): Promise<void> {
    const wasRunning = RUNNING_STATES.has(from);
    const nowRunning = RUNNING_STATES.has(to);
    if (wasRunning && !nowRunning) await this.#quiesce();
    else if (!wasRunning && nowRunning) this.#resume();
  }

  /**
   * Leaving RUNNING: no new requests; the requests in flight complete (their
   * used entries and interrupts reach the driver); then interrupts are held.
   */
  #quiesce(): Promise<void> {
    if (this.#quiesced) return this.#quiesced;
    this.#running = false;
    this.#stopping();
    for (const q of this.queues) if (q.staged) q.schedule(); // a staged loop waiting for its windows gives up now
    this.#quiesced = Promise.all(this.queues.map((q) => q.drained().then(() => q.idle()))).then(() => {
      for (const q of this.queues) q.notify(); // the interrupts the last completions are due
      this.#irqsAllowed = false;
    });
    return this.#quiesced;
  }

  #resume(): void {
    const migrated = this.#loaded;
    this.#loaded = false;
    this.#running = true;
    this.#irqsAllowed = true;
    this.#quiesced = null;
    for (const q of this.queues) {
      if (!q.engine) this.#start(q);
      if (q.irqPending) {
        q.irqPending = false;
        this.interrupt(q);
      }
      q.kickPending = false;
      // Buffers made available while stopped (their kick went elsewhere, or was held): look once.
      if (q.engine) q.schedule();
    }
    if (migrated) {
      try {
        this.device.migrated?.();
      } catch (err) {
        this.#log(`after the migration: ${(err as Error).message}`);
      }
    }
  }

  /** STOP_COPY: the state, once quiesced (nothing in flight). */
  async save(): Promise<Uint8Array> {
    await this.#quiesce();
    if (this.#resetShown !== null) await this.#resetDone;
    const cfg = this.device.config?.() ?? new Uint8Array(0);
    const model = this.device.migrationState ? this.device.migrationState() : null;
    const body = STATE_HEAD + this.queues.length * STATE_QUEUE + cfg.length;
    const out = Buffer.alloc(body + (model ? SECTION_HEAD + model.length : 0));
    out.write(model ? STATE_MAGIC_V2 : STATE_MAGIC, 0, 'latin1');
    out.writeUInt32LE(this.queues.length, 8);
    out.writeUInt32LE(cfg.length, 12);
    out.writeBigUInt64LE(this.offered, 16);
    out.writeBigUInt64LE(this.driverFeatures, 24);
    out.writeUInt32LE(this.deviceFeatureSelect, 32);
    out.writeUInt32LE(this.driverFeatureSelect, 36);
    out.writeUInt16LE(this.configVector, 40);
    out.writeUInt8(this.status, 42);
    out.writeUInt8(this.isr, 43);
    out.writeUInt8(this.configGeneration, 44);
    out.writeUInt16LE(this.queueSelect, 46);
    let o = STATE_HEAD;
    for (const q of this.queues) {
      out.writeUInt16LE(q.size, o);
      out.writeUInt16LE(q.vector, o + 2);
      const base = q.engine ? q.engine.base() : q.base;
      out.writeUInt8((q.enabled ? 1 : 0) | (q.engine ? 2 : 0) | (q.irqPending ? 4 : 0) | (base !== null ? 8 : 0), o + 4);
      out.writeUInt32LE(base ?? 0, o + 8);
      out.writeBigUInt64LE(BigInt(q.desc), o + 16);
      out.writeBigUInt64LE(BigInt(q.driver), o + 24);
      out.writeBigUInt64LE(BigInt(q.device), o + 32);
      o += STATE_QUEUE;
    }
    out.set(cfg, o);
    if (model) {
      out.writeUInt32LE(SECTION_MODEL, body);
      out.writeUInt32LE(model.length, body + 4);
      out.set(model, body + SECTION_HEAD);
    }
    return out;
  }

  /** RESUMING ended: the source's state replaces ours (rings start at RUNNING). */
  load(data: Uint8Array): void {
    const b = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
    const refuse = (why: string): never => {
      throw new VfioError('VIRTIO_PCI_STATE', Errno.EINVAL, `virtio-pci migration state refused: ${why}`);
    };
    const magic = b.length >= STATE_HEAD ? b.toString('latin1', 0, 8) : '';
    if (magic !== STATE_MAGIC && magic !== STATE_MAGIC_V2) refuse('not a virtio-pci state (version 1 or 2)');
    const n = b.readUInt32LE(8);
    const cfgLen = b.readUInt32LE(12);
    if (n !== this.queues.length) refuse(`${n} queues, this device has ${this.queues.length}`);
    const body = STATE_HEAD + n * STATE_QUEUE + cfgLen;
    if (magic === STATE_MAGIC ? b.length !== body : b.length < body) refuse(`${b.length} bytes`);
    const sections = magic === STATE_MAGIC_V2 ? readSections(b, body, refuse) : new Map<number, Buffer>();
    const model = sections.get(SECTION_MODEL);
    if (model && !this.device.loadMigrationState) refuse(`a device state of ${model.length} bytes, which this device does not take`);
    const driverFeatures = b.readBigUInt64LE(24);
    if (driverFeatures & ~this.offered) refuse(`driver features 0x${driverFeatures.toString(16)} not all offered here (0x${this.offered.toString(16)})`);
    const cfg = this.device.config?.() ?? new Uint8Array(0);
    // The bytes the driver may change are restored by the device's state, when it is there; the rest must match.
    const differs = configDiffers(b.subarray(body - cfgLen, body), cfg, model ? (this.device.configDriverMutable ?? []) : []);
    if (differs !== null) refuse(`the device config differs at byte ${differs} (another disk size or geometry, another MTU or queue count)`);
    const queues = [];
    let o = STATE_HEAD;
    for (let i = 0; i < n; i++) {
      const size = b.readUInt16LE(o);
      const flags = b.readUInt8(o + 4);
      if (size < 1 || size > this.queues[i]!.maxSize) refuse(`queue ${i} size ${size}`);
      queues.push({
        size,
        vector: b.readUInt16LE(o + 2),
        enabled: (flags & 1) !== 0,
        irqPending: (flags & 4) !== 0,
        base: flags & 8 ? b.readUInt32LE(o + 8) : null,
        desc: Number(b.readBigUInt64LE(o + 16)),
        driver: Number(b.readBigUInt64LE(o + 24)),
        device: Number(b.readBigUInt64LE(o + 32)),
      });
      o += STATE_QUEUE;
    }
    if (model) {
      // The device checks its state whole before it takes any of it: a refusal here changes nothing.
      try {
        this.device.loadMigrationState!(Uint8Array.from(model));
      } catch (err) {
        refuse(`the device state: ${(err as Error).message}`);
      }
    }
    // Accepted: replace everything.
    for (const q of this.queues) q.engine = null;
    this.driverFeatures = driverFeatures;
    this.deviceFeatureSelect = b.readUInt32LE(32);
    this.driverFeatureSelect = b.readUInt32LE(36);
    this.configVector = b.readUInt16LE(40);
    this.status = b.readUInt8(42);
    this.isr = b.readUInt8(43);
    this.configGeneration = b.readUInt8(44);
    this.queueSelect = b.readUInt16LE(46);
    queues.forEach((s, i) => {
      const q = this.queues[i]!;
      q.resetRegisters();
      Object.assign(q, s);
    });
    if (this.status & VirtioStatus.FEATURES_OK) this.device.setFeatures?.(driverFeatures);
    this.#loaded = true;
  }
}
