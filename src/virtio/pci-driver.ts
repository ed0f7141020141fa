/**
 * The driver side of the virtio PCI modern transport (virtio 1.2 section 4.1)
 * over a vfio-user client: what a guest kernel's virtio_pci_modern does, from
 * Node, for any virtio device behind a vfio-user socket.
 *
 *   const t = await VirtioPciTransport.open(await VfioUserClient.connect(path));
 *   await t.reset();
 *   const features = await t.negotiate(wanted);          // ACK, DRIVER, features, FEATURES_OK checked
 *   const [cfgIrq, qIrq] = await t.setupInterrupts(2);  // MSI-X vectors 0 and 1 -> eventfds
 *   const q = await t.setupQueue(0, { size: 128, vector: 1 });  // rings in DMA memory, the device told
 *   await t.driverOk();
 *   q.ring.add(bufs, token); if (q.ring.needsKick()) q.notify();
 *
 * Discovery walks the capability list of config space (4.1.4): the first
 * vendor capability of each cfg_type 1-4 with a BAR 0-5 (others are ignored,
 * as the spec asks), and MSI-X. Every field the device gives is untrusted:
 * capability pointers must stay inside the 256-byte header and not loop, a
 * capability's [offset, offset + length) must lie inside its BAR's region,
 * the common cfg must be at least the 56 bytes of virtio 1.0, a queue's
 * notify address inside the notify capability. A breach is a
 * VirtioPciError, never a crash.
 *
 * BAR accesses go through VfioUserDevice: straight to the mapping when the
 * server offered the BAR (or a sparse area of it) by fd, by REGION_READ /
 * REGION_WRITE otherwise. Queue notifications signal the ioeventfd the
 * server offers (GET_REGION_IO_FDS) for the queue's notify address, as a
 * VMM wires them into KVM; without one, a posted REGION_WRITE of the queue
 * index (no reply awaited) when posted writes are allowed.
 *
 * Guest memory: SharedMemory regions the transport creates and DMA-maps into
 * the device by fd (IOVA = guest-physical address, no ACCESS_PLATFORM), laid
 * end to end from `iovaBase`; `memory` is the GuestMemoryView the driver
 * queues (src/virtio/driver*.ts) write their rings through.
 *
 * Interrupts: MSI-X vectors wired to eventfds with SET_IRQS; vector 0 is the
 * config interrupt ('config' event). Without MSI-X, INTx (setupIntx): the
 * ISR read at each interrupt tells queue from config, then the line is
 * unmasked.
 */
import { EventEmitter } from 'node:events';
import { EventFd, SharedMemory, type Fd } from '../sys/index.js';
import { VfioUserClient } from '../vfio-user/client.js';
import { VfioUserDevice } from '../vfio-user/client-device.js';
import { ConnectionError } from '../vfio-user/connection.js';
import { Command, IoFdType } from '../vfio-user/constants.js';
import { PciIrq, PciRegion, RegionInfoFlag } from '../vfio/uapi.js';
import { PCI_CFG_SPACE_SIZE, PCI_STD_HEADER_SIZEOF, PCI_STD_NUM_BARS, PciCapId, PciMsix, PciReg, PciStatus } from '../pci/regs.js';
import { CommonCfg, VIRTIO_MSI_NO_VECTOR, VIRTIO_PCI_DEVICE_ID_BASE, VIRTIO_PCI_VENDOR_ID, VirtioPciCapType, VirtioStatus } from '../devices/virtio-pci.js';
import { GuestMemory } from './memory.js';
import { ringLayout, type DriverQueue } from './driver.js';
import { createDriverQueue } from './driver-queue.js';

export type VirtioPciErrorCode =
  /** Not a virtio PCI device (vendor, device id), or not the kind the caller drives. */
  | 'NOT_VIRTIO'
  /** The capability list is malformed: a pointer out of the header, a loop, a vendor cap too short. */
  | 'CAPABILITY'
  /** A capability the driver needs is missing (common, notify, ISR). */
  | 'MISSING_CAP'
  /** A capability's range lies outside its BAR's region, or the region cannot be accessed. */
  | 'CAP_RANGE'
  /** The device refused FEATURES_OK, or does not offer a feature the driver needs. */
  | 'FEATURES'
  /** A queue the device does not have, a size it does not take, a notify offset out of range. */
  | 'QUEUE'
  /** No MSI-X, too few vectors, or a vector the device would not take. */
  | 'NO_MSIX'
  /** The server refused a BAR access, a DMA mapping or SET_IRQS (its error is the cause). */
  | 'REFUSED'
  /** The device did not read status 0 after a reset in time. */
  | 'RESET_TIMEOUT'
  /** config_generation kept changing while the device config was read. */
  | 'CONFIG_GENERATION'
  /** The device set DEVICE_NEEDS_RESET, or broke a ring's rules (a used id not in flight, ...). */
  | 'DEVICE_ERROR'
  /** The vfio-user connection went away. */
  | 'DISCONNECTED'
  /** A request was not completed in time, or the server did not reply in time. */
  | 'TIMEOUT'
  /** The driver was used wrongly (a call out of order, after close). */
  | 'STATE';

export class VirtioPciError extends Error {
  readonly code: VirtioPciErrorCode;
  constructor(code: VirtioPciErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'VirtioPciError';
    this.code = code;
  }
}

/** A virtio_pci_cap found in config space (4.1.4). */
export interface VirtioPciCap {
  /** Where it sits in config space. */
  at: number;
  cfgType: number;
  bar: number;
  offset: number;
  length: number;
}

export interface VirtioPciIds {
  vendorId: number;
  deviceId: number;
  subsystemVendorId: number;
  subsystemId: number;
  revision: number;
  /** The virtio device id (1 net, 2 block, ...): device id - 0x1040, or the subsystem id of a transitional device. */
  virtioId: number;
}

export interface VirtioPciTransportOptions {
  /** How long a reset may take to read back status 0 (default 1000 ms). */
  resetTimeoutMs?: number;
  /** IOVA of the first DMA region (default 4 GiB); regions follow at 2 MiB boundaries. */
  iovaBase?: number;
  /** Close the client with the transport (default true). */
  ownsClient?: boolean;
  /**
   * Kick through the ioeventfds the server offers on the notify area
   * (GET_REGION_IO_FDS: the eventfd whose range and datamatch a write of the
   * queue index would hit is signalled instead of sending the write), as QEMU
   * wires them into KVM (default true; without a matching one, REGION_WRITE).
   */
  ioeventfds?: boolean;
}

export interface QueueSetupOptions {
  /** Ring size (a power of two for split rings; at most the device's queue_size). */
  size: number;
  /** The MSI-X vector of the queue's interrupts (setupInterrupts() wired it), or VIRTIO_MSI_NO_VECTOR. */
  vector: number;
  /** Default: what was negotiated (RING_PACKED, EVENT_IDX, INDIRECT_DESC). */
  packed?: boolean;
  eventIdx?: boolean;
  indirect?: boolean;
  /** Entries per indirect table (default 4). */
  indirectMax?: number;
}

/** A DMA region: client memory the device reaches at `iova`. */
export interface DmaRegion {
  readonly memory: SharedMemory;
  readonly iova: number;
  readonly size: number;
}

/** A queue set up on the device: its driver ring, the notify address, the interrupt eventfd. */
export interface VirtioPciQueue<T> {
  readonly index: number;
  readonly ring: DriverQueue<T>;
  readonly vector: number;
  /** The queue's interrupt eventfd (its vector's, or with INTx the transport's queue eventfd), or null without one. */
  readonly interrupt: EventFd | null;
  /** Offset of the queue's notify address in the notify capability's BAR. */
  readonly notifyOffset: number;
  /** How notify() reaches the device: the server's ioeventfd for the address, or a REGION_WRITE. */
  readonly notifyBy: 'ioeventfd' | 'message';
  /** Notifies the device (a posted write of the queue index); errors go to the transport's 'error' event. */
  notify(): void;
}

type TransportEvents = {
  /** The config interrupt (vector 0) fired: the device config or the status changed. */
  config: [];
  /** The connection went away (DISCONNECTED). */
  close: [err: VirtioPciError];
  /** A posted notify could not be sent. */
  error: [err: Error];
};

const F_VERSION_1 = 32n;
const F_ACCESS_PLATFORM = 33n;
const F_RING_PACKED = 34n;
const F_EVENT_IDX = 29n;
const F_INDIRECT_DESC = 28n;
const has = (features: bigint, b: bigint): boolean => (features & (1n << b)) !== 0n;
/** The 1.0 common cfg ends after queue_device (8 bytes at 48). */
const COMMON_MIN = CommonCfg.QUEUE_DEVICE + 8;
/** A vendor capability with bar, offset and length: 16 bytes; the notify cap adds its multiplier. */
const VNDR_CAP_LEN = 16;
const NOTIFY_CAP_LEN = 20;
const MAX_CAPS = 48;
const MAX_MSIX = 2048;
const REGION_ALIGN = 0x20_0000;
const CONFIG_GENERATION_TRIES = 16;
/** ISR status bits (4.1.4.5): a queue interrupt, a config change. */
const ISR_QUEUE = 1;
const ISR_CONFIG = 2;
/** GET_REGION_IO_FDS: the 16-byte head, 40-byte entries; KVM_IOEVENTFD_FLAG_DATAMATCH. */
const IO_FDS_HEAD = 16;
const IO_FD_ENTRY = 40;
const MAX_IO_FDS = 1024;
const IOEVENTFD_DATAMATCH = 1;

const err = (code: VirtioPciErrorCode, message: string, cause?: unknown): VirtioPciError => new VirtioPciError(code, message, cause === undefined ? undefined : { cause });

export class VirtioPciTransport extends EventEmitter<TransportEvents> {
  readonly client: VfioUserClient;
  readonly device: VfioUserDevice;
  readonly ids: VirtioPciIds;
  readonly common: VirtioPciCap;
  readonly notifyCap: VirtioPciCap;
  readonly notifyMultiplier: number;
  readonly isr: VirtioPciCap;
  /** The device-specific config (cfg_type 4), or null when the device has none. */
  readonly deviceCfg: VirtioPciCap | null;
  /** MSI-X vectors the device has (its MSI-X capability's table size, within the server's irq info). */
  readonly msixVectors: number;
  /** The driver's view of its DMA regions (for createDriverQueue). */
  readonly memory = new GuestMemory();
  /** Features offered (after negotiate()) and accepted with FEATURES_OK. */
  offeredFeatures = 0n;
  features = 0n;
  readonly #options: Required<VirtioPciTransportOptions>;
  readonly #regions: DmaRegion[] = [];
  #nextIova: number;
  #irqs: EventFd[] = [];
  #intx: { line: EventFd; queues: EventFd; stop: () => void } | null = null;
  #unsubscribe: (() => void)[] = [];
  readonly #queues = new Map<number, VirtioPciQueue<unknown>>();
  #closed: VirtioPciError | null = null;
  #closing: Promise<void> | null = null;
  #ioFds: Promise<IoEventFd[]> | null = null;

  private constructor(client: VfioUserClient, device: VfioUserDevice, found: Discovered, options: Required<VirtioPciTransportOptions>) {
    super();
    this.client = client;
    this.device = device;
    this.ids = found.ids;
    this.common = found.common;
    this.notifyCap = found.notify;
    this.notifyMultiplier = found.multiplier;
    this.isr = found.isr;
    this.deviceCfg = found.device;
    this.msixVectors = found.msixVectors;
    this.#options = options;
    this.#nextIova = options.iovaBase;
    const onClose = (e: Error | undefined): void => {
      this.#closed ??= err('DISCONNECTED', `the vfio-user connection closed${e ? `: ${e.message}` : ''}`, e);
      this.emit('close', this.#closed);
    };
    client.on('close', onClose);
    this.#unsubscribe.push(() => client.off('close', onClose));
  }

  /** Connects to the vfio-user server at `path` and discovers the device (the transport owns the client). */
  static async connect(path: string, options: VirtioPciTransportOptions & { client?: import('../vfio-user/client.js').VfioUserClientOptions } = {}): Promise<VirtioPciTransport> {
    let client: VfioUserClient;
    try {
      client = await VfioUserClient.connect(path, options.client);
    } catch (e) {
      throw err('DISCONNECTED', `cannot connect to ${path}: ${(e as Error).message}`, e);
    }
    try {
      return await VirtioPciTransport.open(client, { ...options, ownsClient: true });
    } catch (e) {
      client.close();
      throw e;
    }
  }

  /** Discovers the virtio PCI device behind a connected client: ids, capabilities, BARs, MSI-X. */
  static async open(client: VfioUserClient, options: VirtioPciTransportOptions = {}): Promise<VirtioPciTransport> {
    const device = new VfioUserDevice(client);
    try {
      const found = await discover(device);
      return new VirtioPciTransport(client, device, found, {
        resetTimeoutMs: options.resetTimeoutMs ?? 1000,
        iovaBase: options.iovaBase ?? 0x1_0000_0000,
        ownsClient: options.ownsClient ?? true,
        ioeventfds: options.ioeventfds ?? true,
      });
    } catch (e) {
      device.close();
      if (e instanceof VirtioPciError) throw e;
      throw client.closed ? err('DISCONNECTED', `the server went away during discovery: ${(e as Error).message}`, e) : err('CAPABILITY', `discovery failed: ${(e as Error).message}`, e);
    }
  }

  get closed(): boolean {
    return this.#closed !== null || this.#closing !== null;
  }

  #check(): void {
    if (this.#closed) throw this.#closed;
    if (this.#closing) throw err('STATE', 'the transport is closed');
  }

  /** A BAR access, its failures typed (the connection gone: DISCONNECTED). */
  async #io<R>(what: string, fn: () => Promise<R>): Promise<R> {
    this.#check();
    try {
      return await fn();
    } catch (e) {
      if (this.#closed) throw this.#closed;
      if (this.client.closed) throw err('DISCONNECTED', `${what}: the connection closed`, e);
      if (e instanceof ConnectionError && e.code === 'VFU_TIMEOUT') throw err('TIMEOUT', `${what}: ${e.message}`, e);
      throw err('REFUSED', `${what}: ${(e as Error).message}`, e);
    }
  }

  async #read(cap: VirtioPciCap, off: number, size: number, what: string): Promise<Uint8Array> {
    if (off + size > cap.length) throw err('STATE', `${what}: [${off}, +${size}) is outside the ${cap.length}-byte capability`);
    const b = await this.#io(what, () => this.device.read(cap.bar, cap.offset + off, size));
    if (b.length !== size) throw err('REFUSED', `${what}: ${b.length} of ${size} bytes read`);
    return b;
  }

  async #write(cap: VirtioPciCap, off: number, data: Uint8Array, what: string): Promise<void> {
    if (off + data.length > cap.length) throw err('STATE', `${what}: [${off}, +${data.length}) is outside the ${cap.length}-byte capability`);
    await this.#io(what, () => this.device.write(cap.bar, cap.offset + off, data));
  }

  /** Reads a common cfg field of 1, 2 or 4 bytes (little-endian, 4.1.3.1: the field's own width). */
  async readCommon(off: number, size: 1 | 2 | 4): Promise<number> {
    const b = await this.#read(this.common, off, size, `common cfg @${off}`);
    return Buffer.from(b.buffer, b.byteOffset, size).readUIntLE(0, size);
  }

  async writeCommon(off: number, size: 1 | 2 | 4, value: number): Promise<void> {
    const b = Buffer.alloc(size);
    b.writeUIntLE(value, 0, size);
    await this.#write(this.common, off, b, `common cfg @${off}`);
  }

  /** A 64-bit queue address as two 32-bit writes, low first (4.1.3.1 allows it; every device takes it). */
  async #writeCommon64(off: number, value: number): Promise<void> {
    await this.writeCommon(off, 4, value % 2 ** 32);
    await this.writeCommon(off + 4, 4, Math.floor(value / 2 ** 32));
  }

  async status(): Promise<number> {
    return this.readCommon(CommonCfg.DEVICE_STATUS, 1);
  }

  async setStatus(status: number): Promise<void> {
    await this.writeCommon(CommonCfg.DEVICE_STATUS, 1, status);
  }

  /** Writes status 0 and waits for it to read back 0 (4.1.4.3.2); queues and features are forgotten. */
  async reset(): Promise<void> {
    await this.setStatus(0);
    const t0 = Date.now();
    while ((await this.status()) !== 0) {
      if (Date.now() - t0 > this.#options.resetTimeoutMs) throw err('RESET_TIMEOUT', `the device did not read status 0 within ${this.#options.resetTimeoutMs} ms of a reset`);
      await new Promise((r) => setTimeout(r, 1));
    }
    this.features = 0n;
    this.#queues.clear();
  }

  /** The 64 feature bits the device offers (device_feature_select 0 and 1). */
  async deviceFeatures(): Promise<bigint> {
    let f = 0n;
    for (const sel of [0, 1]) {
      await this.writeCommon(CommonCfg.DEVICE_FEATURE_SELECT, 4, sel);
      f |= BigInt(await this.readCommon(CommonCfg.DEVICE_FEATURE, 4)) << BigInt(32 * sel);
    }
    return f;
  }

  /**
   * 3.1.1 up to FEATURES_OK: ACKNOWLEDGE, DRIVER, the features (offered &
   * `wanted`, or & what `wanted(offered)` returns: it may throw) written, FEATURES_OK set and read back. VERSION_1 must be
   * offered; ACCESS_PLATFORM, which the transport cannot honour (it gives
   * guest-physical addresses), is never accepted. Call after reset().
   */
  async negotiate(wanted: bigint | ((offered: bigint) => bigint)): Promise<bigint> {
    this.#check();
    const S = VirtioStatus;
    await this.setStatus(S.ACKNOWLEDGE);
    await this.setStatus(S.ACKNOWLEDGE | S.DRIVER);
    const offered = await this.deviceFeatures();
    this.offeredFeatures = offered;
    if (!has(offered, F_VERSION_1)) {
      await this.setStatus(S.ACKNOWLEDGE | S.DRIVER | S.FAILED);
      throw err('FEATURES', 'the device does not offer VIRTIO_F_VERSION_1 (a legacy device)');
    }
    let asked: bigint;
    try {
      asked = typeof wanted === 'function' ? wanted(offered) : wanted;
    } catch (e) {
      await this.setStatus(S.ACKNOWLEDGE | S.DRIVER | S.FAILED);
      throw e;
    }
    const f = offered & (asked | (1n << F_VERSION_1)) & ~(1n << F_ACCESS_PLATFORM);
    for (const sel of [0, 1]) {
      await this.writeCommon(CommonCfg.DRIVER_FEATURE_SELECT, 4, sel);
      await this.writeCommon(CommonCfg.DRIVER_FEATURE, 4, Number((f >> BigInt(32 * sel)) & 0xffff_ffffn));
    }
    await this.setStatus(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK);
    const st = await this.status();
    if ((st & S.FEATURES_OK) === 0) {
      await this.setStatus(S.ACKNOWLEDGE | S.DRIVER | S.FAILED);
      throw err('FEATURES', `the device refused FEATURES_OK for features 0x${f.toString(16)} (status 0x${st.toString(16)})`);
    }
    this.features = f;
    return f;
  }

  hasFeature(b: number): boolean {
    return has(this.features, BigInt(b));
  }

  async numQueues(): Promise<number> {
    return this.readCommon(CommonCfg.NUM_QUEUES, 2);
  }

  /** The largest ring of queue `index` (0: the queue does not exist). */
  async maxQueueSize(index: number): Promise<number> {
    await this.writeCommon(CommonCfg.QUEUE_SELECT, 2, index);
    return this.readCommon(CommonCfg.QUEUE_SIZE, 2);
  }

  /** Creates `size` bytes of client memory (rounded to pages) and DMA-maps it into the device by fd. */
  async allocate(size: number, name = 'vdevkit-virtio-pci'): Promise<DmaRegion> {
    this.#check();
    const bytes = Math.ceil(size / 4096) * 4096;
    const memory = SharedMemory.create(bytes, { name });
    const iova = this.#nextIova;
    try {
      await this.#io('DMA_MAP', () => this.client.dmaMap({ iova, size: bytes, memory }));
      this.memory.add({ guestPhysAddr: iova, size: bytes, userAddr: iova, mmapOffset: 0 }, memory.bytes);
    } catch (e) {
      memory.close();
      throw e;
    }
    this.#nextIova = Math.ceil((iova + bytes) / REGION_ALIGN) * REGION_ALIGN;
    const region: DmaRegion = Object.freeze({ memory, iova, size: bytes });
    this.#regions.push(region);
    return region;
  }

  /**
   * Wires MSI-X vectors [0, count) to fresh eventfds (SET_IRQS), vector 0
   * being the config interrupt, and sets config_msix_vector to 0 (read back).
   * Returns the eventfds (vector i at [i]); the transport closes them.
   */
  async setupInterrupts(count: number): Promise<EventFd[]> {
    this.#check();
    if (this.msixVectors === 0) throw err('NO_MSIX', 'the device has no MSI-X vectors');
    if (!Number.isInteger(count) || count < 1 || count > this.msixVectors) throw err('NO_MSIX', `${count} vectors asked for; the device has ${this.msixVectors}`);
    await this.#disableIrqs();
    const fds = Array.from({ length: count }, () => EventFd.create());
    this.#irqs = fds;
    await this.#io('SET_IRQS', () => this.device.setEventFds(PciIrq.MSIX, 0, fds));
    this.#unsubscribe.push(fds[0]!.subscribe(() => this.emit('config')));
    await this.writeCommon(CommonCfg.CONFIG_MSIX_VECTOR, 2, 0);
    const v = await this.readCommon(CommonCfg.CONFIG_MSIX_VECTOR, 2);
    if (v !== 0) throw err('NO_MSIX', `the device did not take vector 0 for config interrupts (reads 0x${v.toString(16)})`);
    return fds;
  }

  async #disableIrqs(): Promise<void> {
    const intx = this.#intx;
    this.#intx = null;
    if (intx) {
      intx.stop();
      try {
        if (!this.client.closed) await this.device.disableIrqs(PciIrq.INTX);
      } finally {
        intx.line.close();
        intx.queues.close();
      }
    }
    if (this.#irqs.length === 0) return;
    const old = this.#irqs;
    this.#irqs = [];
    try {
      if (!this.client.closed) await this.device.disableIrqs(PciIrq.MSIX);
    } finally {
      for (const f of old) f.close();
    }
  }

  /**
   * INTx instead of MSI-X (4.1.4.5): the line's eventfd wired with SET_IRQS;
   * at each interrupt the ISR is read (which clears it), bit 1 is the
   * 'config' event, bit 0 signals the eventfd returned here, which every
   * queue set up with VIRTIO_MSI_NO_VECTOR gets as its `interrupt`; then the
   * line, automasked when it fired, is unmasked. Returns that eventfd.
   */
  async setupIntx(): Promise<EventFd> {
    this.#check();
    const info = await this.#io('GET_IRQ_INFO', () => this.device.irqInfo(PciIrq.INTX)).catch(() => null);
    if (!info || info.count < 1) throw err('NO_MSIX', 'the device has neither MSI-X vectors nor an INTx line');
    await this.#disableIrqs();
    const line = EventFd.create();
    const queues = EventFd.create();
    let running = false;
    let again = false;
    const service = async (): Promise<void> => {
      if (running) {
        again = true;
        return;
      }
      running = true;
      try {
        do {
          again = false;
          const isr = await this.readIsr();
          if (isr & ISR_CONFIG) this.emit('config');
          if (isr & ISR_QUEUE) queues.signal(1);
          await this.#io('SET_IRQS unmask', () => this.device.setIrqs(PciIrq.INTX, 'unmask', 0, 1));
        } while (again && !this.closed);
      } catch (e) {
        if (!this.closed && this.listenerCount('error') > 0) this.emit('error', e as Error);
      } finally {
        running = false;
      }
    };
    const stop = line.subscribe(() => void service());
    this.#intx = { line, queues, stop };
    try {
      await this.#io('SET_IRQS', () => this.device.setEventFds(PciIrq.INTX, 0, [line]));
    } catch (e) {
      await this.#disableIrqs();
      throw e;
    }
    return queues;
  }

  /**
   * Lays out a ring (driver.ts ringLayout) in a DMA region of its own and
   * sets queue `index` up on the device (4.1.5.1.3): size, vector (read
   * back), the three areas, notify offset (bounds-checked), enable. The
   * queue is usable once driverOk() was called.
   */
  async setupQueue<T>(index: number, o: QueueSetupOptions): Promise<VirtioPciQueue<T>> {
    this.#check();
    const C = CommonCfg;
    const packed = o.packed ?? has(this.features, F_RING_PACKED);
    const eventIdx = o.eventIdx ?? has(this.features, F_EVENT_IDX);
    const indirect = o.indirect ?? has(this.features, F_INDIRECT_DESC);
    if (packed && !has(this.features, F_RING_PACKED)) throw err('FEATURES', 'a packed ring without VIRTIO_F_RING_PACKED negotiated');
    const max = await this.maxQueueSize(index);
    if (max === 0) throw err('QUEUE', `the device has no queue ${index}`);
    if (!Number.isInteger(o.size) || o.size < 1 || o.size > max) throw err('QUEUE', `queue ${index}: size ${o.size}; the device takes 1..${max}`);
    if (!packed && (o.size & (o.size - 1)) !== 0) throw err('QUEUE', `queue ${index}: a split ring's size must be a power of two, not ${o.size}`);
    if ((await this.readCommon(C.QUEUE_ENABLE, 2)) !== 0) throw err('QUEUE', `queue ${index} is enabled already (reset first)`);
    const indirectMax = o.indirectMax ?? 4;
    const layout = ringLayout(o.size, packed, indirect ? indirectMax : 0);
    const region = await this.allocate(layout.bytes, `vdevkit-virtio-pci-q${index}`);
    const gpa = (part: number): number => region.iova + part;
    const ring = createDriverQueue<T>({ memory: this.memory, size: o.size, packed, eventIdx, indirect, indirectMax, desc: gpa(layout.desc), driver: gpa(layout.driver), device: gpa(layout.device), ...(indirect ? { indirectTables: gpa(layout.indirectTables) } : {}) });
    await this.writeCommon(C.QUEUE_SIZE, 2, o.size);
    await this.writeCommon(C.QUEUE_MSIX_VECTOR, 2, o.vector);
    if (o.vector !== VIRTIO_MSI_NO_VECTOR) {
      const v = await this.readCommon(C.QUEUE_MSIX_VECTOR, 2);
      if (v !== o.vector) throw err('NO_MSIX', `queue ${index}: the device did not take vector ${o.vector} (reads 0x${v.toString(16)})`);
      if (o.vector >= this.#irqs.length) throw err('NO_MSIX', `queue ${index}: vector ${o.vector} is not wired (setupInterrupts)`);
    }
    await this.#writeCommon64(C.QUEUE_DESC, gpa(layout.desc));
    await this.#writeCommon64(C.QUEUE_DRIVER, gpa(layout.driver));
    await this.#writeCommon64(C.QUEUE_DEVICE, gpa(layout.device));
    const notifyOff = await this.readCommon(C.QUEUE_NOTIFY_OFF, 2);
    const at = notifyOff * this.notifyMultiplier;
    if (at + 2 > this.notifyCap.length) {
      throw err('QUEUE', `queue ${index}: notify offset ${notifyOff} x ${this.notifyMultiplier} is outside the ${this.notifyCap.length}-byte notify capability`);
    }
    await this.writeCommon(C.QUEUE_ENABLE, 2, 1);
    const notifyOffset = this.notifyCap.offset + at;
    const idx = Buffer.alloc(2);
    idx.writeUInt16LE(index);
    const kick = (await this.#ioEventFds()).find((e) => e.offset === notifyOffset && (e.size === 0 || e.size === 2) && (e.datamatch === null || e.datamatch === BigInt(index)))?.fd ?? null;
    const q: VirtioPciQueue<T> = {
      index,
      ring,
      vector: o.vector,
      interrupt: o.vector === VIRTIO_MSI_NO_VECTOR ? (this.#intx?.queues ?? null) : this.#irqs[o.vector]!,
      notifyOffset,
      notifyBy: kick ? 'ioeventfd' : 'message',
      notify: kick ? () => void (this.#closed || this.#closing || kick.closed || kick.signal(1)) : () => this.#notify(notifyOffset, idx),
    };
    this.#queues.set(index, q as VirtioPciQueue<unknown>);
    return q;
  }

  /**
   * The ioeventfds of the notify capability's BAR (GET_REGION_IO_FDS, asked
   * once: the size, then the entries with their fds), each entry checked
   * (type ioeventfd, its fd sent, its range inside the BAR). A server that
   * refuses the command or answers it badly gets REGION_WRITE kicks.
   */
  #ioEventFds(): Promise<IoEventFd[]> {
    this.#ioFds ??= (async (): Promise<IoEventFd[]> => {
      if (!this.#options.ioeventfds) return [];
      const bar = this.notifyCap.bar;
      const ask = (argsz: number) => this.client.request(Command.DEVICE_GET_REGION_IO_FDS, { argsz, flags: 0, index: bar, count: 0 }, { takeFds: true });
      let fds: Fd[] = [];
      try {
        const head = await ask(IO_FDS_HEAD);
        fds = head.fds;
        const argsz = head.body.argsz;
        if (head.body.count === 0 || argsz > IO_FDS_HEAD + MAX_IO_FDS * IO_FD_ENTRY) return [];
        for (const f of fds.splice(0)) f.close();
        const r = await ask(argsz);
        fds = r.fds;
        const size = (await this.device.regionInfo(bar)).size;
        const out: IoEventFd[] = [];
        const used = new Set<number>();
        for (const e of r.body.entries) {
          if (e.type !== IoFdType.IOEVENTFD || e.fdIndex >= fds.length || used.has(e.fdIndex) || e.offset + e.size > size) continue;
          used.add(e.fdIndex);
          out.push({ offset: e.offset, size: e.size, datamatch: (e.flags & IOEVENTFD_DATAMATCH) !== 0 ? e.datamatch : null, fd: EventFd.from(fds[e.fdIndex]!) });
        }
        fds = fds.filter((_, i) => !used.has(i));
        return out;
      } catch (e) {
        if (this.client.closed) throw err('DISCONNECTED', `GET_REGION_IO_FDS: the connection closed`, e);
        return [];
      } finally {
        for (const f of fds) f.close();
      }
    })();
    return this.#ioFds;
  }

  #notify(offset: number, idx: Buffer): void {
    if (this.#closed || this.#closing) return;
    this.device.write(this.notifyCap.bar, offset, idx, { posted: true }).catch((e: unknown) => {
      if (!this.#closed && this.listenerCount('error') > 0) this.emit('error', e as Error);
    });
  }

  /** Sets DRIVER_OK (3.1.1 step 8) and checks the device did not ask for a reset meanwhile. */
  async driverOk(): Promise<void> {
    const S = VirtioStatus;
    await this.setStatus(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK);
    const st = await this.status();
    if (st & S.DEVICE_NEEDS_RESET) throw err('DEVICE_ERROR', `the device set DEVICE_NEEDS_RESET at DRIVER_OK (status 0x${st.toString(16)})`);
    if ((st & S.DRIVER_OK) === 0) throw err('DEVICE_ERROR', `DRIVER_OK did not stick (status 0x${st.toString(16)})`);
  }

  /**
   * Reads [offset, offset + length) of the device config, consistently:
   * config_generation before and after must match (4.1.4.3.1), retried a
   * few times, then CONFIG_GENERATION.
   */
  async readConfig(offset: number, length: number): Promise<Buffer> {
    const cap = this.deviceCfg;
    if (!cap) throw err('MISSING_CAP', 'the device has no device config capability');
    if (!Number.isInteger(offset) || !Number.isInteger(length) || offset < 0 || length < 0 || offset + length > cap.length) {
      throw err('STATE', `device config [${offset}, +${length}) is outside its ${cap.length} bytes`);
    }
    for (let i = 0; i < CONFIG_GENERATION_TRIES; i++) {
      const before = await this.readCommon(CommonCfg.CONFIG_GENERATION, 1);
      const b = await this.#read(cap, offset, length, 'device config');
      if ((await this.readCommon(CommonCfg.CONFIG_GENERATION, 1)) === before) return Buffer.from(b);
    }
    throw err('CONFIG_GENERATION', `config_generation changed on each of ${CONFIG_GENERATION_TRIES} reads of the device config`);
  }

  /** Reads the ISR status (read to clear, 4.1.4.5). */
  async readIsr(): Promise<number> {
    return (await this.#read(this.isr, 0, 1, 'ISR'))[0]!;
  }

  /**
   * Resets the device (when still connected), unwires interrupts, unmaps and
   * frees the DMA regions and closes the client (when owned). Queue views
   * into those regions are dead afterwards: stop using the rings first.
   */
  close(): Promise<void> {
    this.#closing ??= (async () => {
      const up = !this.client.closed;
      if (up) {
        try {
          await this.setStatus(0);
        } catch {
          // the device may be gone; the regions are ours to free either way
        }
      }
      try {
        await this.#disableIrqs();
      } catch {
        // as above
      }
      for (const u of this.#unsubscribe) u();
      this.#unsubscribe = [];
      for (const r of this.#regions) {
        try {
          if (!this.client.closed) await this.client.dmaUnmap(r.iova, r.size);
        } catch {
          // the window goes with the connection
        }
      }
      this.memory.clear();
      this.device.close();
      if (this.#options.ownsClient) this.client.close();
      for (const r of this.#regions.splice(0)) r.memory.close();
      for (const e of await (this.#ioFds ?? Promise.resolve([])).catch(() => [])) e.fd.close();
      this.#queues.clear();
    })();
    return this.#closing;
  }
}

/** An ioeventfd of GET_REGION_IO_FDS: a write to [offset, offset + size) (size 0: any) of datamatch (null: any) signals `fd`. */
interface IoEventFd {
  offset: number;
  size: number;
  datamatch: bigint | null;
  fd: EventFd;
}

interface Discovered {
  ids: VirtioPciIds;
  common: VirtioPciCap;
  notify: VirtioPciCap;
  multiplier: number;
  isr: VirtioPciCap;
  device: VirtioPciCap | null;
  msixVectors: number;
}

/** Reads config space and walks its capability list (4.1.4), every pointer and range checked. */
async function discover(device: VfioUserDevice): Promise<Discovered> {
  const cfgInfo = await device.regionInfo(PciRegion.CONFIG);
  if (cfgInfo.size < PCI_CFG_SPACE_SIZE) throw err('CAPABILITY', `config space is ${cfgInfo.size} bytes (at least ${PCI_CFG_SPACE_SIZE})`);
  const c = Buffer.from(await device.read(PciRegion.CONFIG, 0, PCI_CFG_SPACE_SIZE));
  if (c.length !== PCI_CFG_SPACE_SIZE) throw err('CAPABILITY', `config space read gave ${c.length} bytes`);
  const ids = decodeIds(c);
  if ((c.readUInt16LE(PciReg.STATUS) & PciStatus.CAP_LIST) === 0) throw err('MISSING_CAP', 'config space has no capability list');
  const caps = new Map<number, VirtioPciCap>();
  let multiplier = 0;
  let msixTable = 0;
  const seen = new Set<number>();
  for (let at = c[PciReg.CAPABILITY_LIST]! & 0xfc; at !== 0; at = c[at + 1]! & 0xfc) {
    if (at < PCI_STD_HEADER_SIZEOF || at + 2 > PCI_CFG_SPACE_SIZE) throw err('CAPABILITY', `a capability pointer 0x${at.toString(16)} outside [0x40, 0x100)`);
    if (seen.has(at) || seen.size >= MAX_CAPS) throw err('CAPABILITY', `the capability list loops (at 0x${at.toString(16)})`);
    seen.add(at);
    const id = c[at]!;
    if (id === PciCapId.MSIX) {
      if (at + PciMsix.SIZEOF > PCI_CFG_SPACE_SIZE) throw err('CAPABILITY', `the MSI-X capability at 0x${at.toString(16)} runs past config space`);
      msixTable = (c.readUInt16LE(at + PciMsix.FLAGS) & PciMsix.FLAGS_QSIZE) + 1;
    }
    if (id !== PciCapId.VNDR) continue;
    const len = c[at + 2]!;
    if (len < VNDR_CAP_LEN || at + len > PCI_CFG_SPACE_SIZE) throw err('CAPABILITY', `vendor capability at 0x${at.toString(16)}: cap_len ${len}`);
    const cap: VirtioPciCap = { at, cfgType: c[at + 3]!, bar: c[at + 4]!, offset: c.readUInt32LE(at + 8), length: c.readUInt32LE(at + 12) };
    // 4.1.4: ignore reserved cfg_type and bar values; the first usable one of each type is preferred.
    if (cap.cfgType < VirtioPciCapType.COMMON || cap.cfgType > VirtioPciCapType.DEVICE || cap.bar >= PCI_STD_NUM_BARS || caps.has(cap.cfgType)) continue;
    if (cap.cfgType === VirtioPciCapType.NOTIFY) {
      if (len < NOTIFY_CAP_LEN) throw err('CAPABILITY', `notify capability at 0x${at.toString(16)}: cap_len ${len} < ${NOTIFY_CAP_LEN}`);
      multiplier = c.readUInt32LE(at + 16);
    }
    caps.set(cap.cfgType, cap);
  }
  const need = (type: number, what: string): VirtioPciCap => {
    const cap = caps.get(type);
    if (!cap) throw err('MISSING_CAP', `no ${what} capability (cfg_type ${type})`);
    return cap;
  };
  const common = need(VirtioPciCapType.COMMON, 'common cfg');
  const notify = need(VirtioPciCapType.NOTIFY, 'notify');
  const isr = need(VirtioPciCapType.ISR, 'ISR');
  const dev = caps.get(VirtioPciCapType.DEVICE) ?? null;
  if (common.length < COMMON_MIN) throw err('CAPABILITY', `the common cfg is ${common.length} bytes (at least ${COMMON_MIN})`);
  if (isr.length < 1) throw err('CAPABILITY', 'the ISR capability is empty');
  if (notify.length < 2) throw err('CAPABILITY', `the notify capability is ${notify.length} bytes`);
  for (const cap of [common, notify, isr, ...(dev ? [dev] : [])]) await checkInBar(device, cap);
  let msixVectors = 0;
  const irq = await device.irqInfo(PciIrq.MSIX).catch(() => null);
  if (irq && msixTable > 0) msixVectors = Math.min(msixTable, irq.count, MAX_MSIX);
  return { ids, common, notify, multiplier, isr, device: dev, msixVectors };
}

function decodeIds(c: Buffer): VirtioPciIds {
  const vendorId = c.readUInt16LE(PciReg.VENDOR_ID);
  const deviceId = c.readUInt16LE(PciReg.DEVICE_ID);
  const subsystemId = c.readUInt16LE(PciReg.SUBSYSTEM_ID);
  if (vendorId !== VIRTIO_PCI_VENDOR_ID || deviceId < 0x1000 || deviceId > 0x107f) {
    throw err('NOT_VIRTIO', `PCI ${vendorId.toString(16).padStart(4, '0')}:${deviceId.toString(16).padStart(4, '0')} is not a virtio device (1af4:1000-107f)`);
  }
  return {
    vendorId,
    deviceId,
    subsystemVendorId: c.readUInt16LE(PciReg.SUBSYSTEM_VENDOR_ID),
    subsystemId,
    revision: c[PciReg.REVISION_ID]!,
    virtioId: deviceId >= VIRTIO_PCI_DEVICE_ID_BASE ? deviceId - VIRTIO_PCI_DEVICE_ID_BASE : subsystemId,
  };
}

/** The capability's range must lie inside its BAR's region, which must be readable and writable. */
async function checkInBar(device: VfioUserDevice, cap: VirtioPciCap): Promise<void> {
  let info;
  try {
    info = await device.regionInfo(cap.bar);
  } catch (e) {
    throw err('CAP_RANGE', `capability cfg_type ${cap.cfgType} names BAR ${cap.bar}, whose region info failed: ${(e as Error).message}`, e);
  }
  const rw = RegionInfoFlag.READ | RegionInfoFlag.WRITE;
  if ((info.flags & rw) !== rw) throw err('CAP_RANGE', `capability cfg_type ${cap.cfgType}: BAR ${cap.bar} is not readable and writable (flags 0x${info.flags.toString(16)})`);
  if (cap.offset + cap.length > info.size) {
    throw err('CAP_RANGE', `capability cfg_type ${cap.cfgType}: [0x${cap.offset.toString(16)}, +0x${cap.length.toString(16)}) is past the end of BAR ${cap.bar} (0x${info.size.toString(16)} bytes)`);
  }
}
