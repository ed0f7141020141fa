/**
 * What a device author writes: a plain object describing a PCI device. The
 * server (server.ts) does every protocol chore: config space, region info,
 * IRQ plumbing, DMA mapping, migration state and data, errno replies. A
 * device never sees a message.
 *
 * Optional hooks default to "not supported": a region without a read hook
 * answers reads with EINVAL, a device without `migration` answers the
 * migration features with EINVAL, and so on.
 */
import type { CapabilityDescription, BarType, PciDeviceDescription } from '../pci/index.js';
import type { SharedMemory } from '../sys/index.js';

/** A range inside a region. */
export interface Area {
  offset: number;
  size: number;
}

/** An ioeventfd the device asks the client to wire (GET_REGION_IO_FDS). */
export interface IoEventFdSpec {
  /** Offset of the watched range in the region. */
  offset: number;
  /** Access size that triggers it (1, 2, 4, 8), or 0 for any. */
  size: number;
  /** Only writes of this value trigger it (KVM_IOEVENTFD_FLAG_DATAMATCH). */
  datamatch?: bigint;
  /** Signalled by the client on a matching write; the device subscribes to it. */
  eventfd: import('../sys/index.js').EventFd;
}

export interface RegionSpec {
  /**
   * Bytes. Any size, as libvfio-user allows: the region (region info,
   * REGION_READ/WRITE bounds, mmap areas) is exactly `size` bytes, and a BAR
   * in config space decodes the next power of two (at least 16 bytes for
   * memory, 4 for I/O), the part past `size` being a hole.
   */
  size: number;
  /** Default true. */
  readable?: boolean;
  /** Default true. */
  writable?: boolean;
  /** BAR type (BARs only; default 'mem32'). */
  barType?: BarType;
  prefetchable?: boolean;
  /**
   * Backing memory (a memfd), offered to the client by fd so it can map the
   * `mmapAreas` directly. Accesses by message go to it too, unless hooks are given.
   */
  memory?: SharedMemory;
  /** Parts of `memory` the client may mmap (default: all of it). */
  mmapAreas?: Area[];
  /** Serves a read by message: fill `out` with the bytes at `offset`. Throw a VfioError/PciError to refuse. */
  read?(offset: number, out: Uint8Array): void;
  /** Serves a write by message. */
  write?(offset: number, data: Uint8Array): void;
  /** For device-specific regions (index >= 9): VFIO_REGION_INFO_CAP_TYPE. */
  type?: { type: number; subtype: number };
  /** ioeventfds for GET_REGION_IO_FDS. */
  ioEventFds?: IoEventFdSpec[];
}

/** Interrupt vectors per VFIO irq index. */
export interface IrqSpec {
  /** One INTx line (INTA#). */
  intx?: boolean;
  /** MSI vectors (1..32, a power of two); adds an MSI capability. */
  msi?: number;
  /** MSI-X vectors (1..2048); adds an MSI-X capability, table and PBA emulated in `msixBar`. */
  msix?: number;
  /** Where the MSI-X table and PBA live (default: BAR of the first free slot, table at 0, PBA after it). */
  msixBar?: { bar: number; tableOffset: number; pbaOffset: number };
  /** The error interrupt (VFIO_PCI_ERR_IRQ_INDEX). */
  err?: boolean;
  /** The device request interrupt (VFIO_PCI_REQ_IRQ_INDEX). */
  req?: boolean;
}

/** The interrupt indexes a device triggers through its context. */
export type IrqName = 'intx' | 'msi' | 'msix' | 'err' | 'req';

/** Config space as a device hook reads it. */
export interface ConfigReader {
  read(offset: number, length: number): Uint8Array;
}

/** A DMA window the client mapped, as the device sees it. */
export interface DmaWindow {
  readonly iova: number;
  readonly size: number;
  readonly readable: boolean;
  readonly writable: boolean;
  /** True when the memory is mapped here; false when it is reached by DMA_READ/DMA_WRITE messages. */
  readonly mapped: boolean;
}

/**
 * How a DMA read or write goes. `messages`: by DMA_READ / DMA_WRITE messages
 * even where the window is mapped here (libvfio-user's vfu_sgl_read/write
 * always do; a client may count on them, as its samples/client does).
 */
export interface DmaTransferOptions {
  messages?: boolean;
}

/** DMA as the device does it. Addresses are IOVAs the client mapped. */
export interface DmaAccess {
  /** Reads guest memory: from the mapping when there is one, else by DMA_READ messages. */
  read(iova: number, length: number, options?: DmaTransferOptions): Promise<Uint8Array>;
  /**
   * Reads guest memory into `dest` (dest.length bytes from iova): no buffer
   * of the library's in between; DMA_READ replies are received straight into
   * it. If it fails, dest's content is unspecified. `dest` may be a view of
   * another DMA window (from view()), which makes a copy between windows;
   * call markDirty on that range once it has completed (the bytes land while
   * the transfer runs, after view() marked the pages).
   */
  readInto(iova: number, dest: Uint8Array, options?: DmaTransferOptions): Promise<void>;
  /** Writes guest memory (marked dirty while logging is on). */
  write(iova: number, data: Uint8Array, options?: DmaTransferOptions): Promise<void>;
  /**
   * A direct view of mapped guest memory, or null if the range is not inside
   * one fd-backed window. With `write`, the pages are marked dirty. The view
   * becomes empty (length 0) when the window is unmapped: never stale.
   */
  view(iova: number, length: number, options?: { write?: boolean }): Uint8Array | null;
  /** Marks a range dirty (after writing through a view kept for a while). */
  markDirty(iova: number, length: number): void;
  /**
   * Keeps the fd-backed windows holding [iova, iova + length) mapped until the
   * returned function is called (once; later calls do nothing): for I/O that
   * runs outside the event loop into view()s (a readv on libuv's thread pool),
   * which must not see the memory unmapped under it. Meanwhile a DMA_UNMAP of
   * such a window takes it out of the table at once (dmaUnmapped runs, no new
   * access finds it) but is answered, and the mapping closed, only after the
   * release; a client that disconnects has it closed at the release. Windows
   * without fd in the range are skipped; a range not mapped is ENOENT.
   */
  hold(iova: number, length: number): () => void;
  /** The windows mapped now. */
  windows(): DmaWindow[];
  /**
   * Whether the client truncated a mapped window's memfd under us and an access faulted
   * (SIGBUS contained: the window reads zeros since). True means the session is closed now.
   * The server checks after each request; a device that touches views outside a request
   * (I/O completions, kicks by ioeventfd) calls this after such a batch.
   */
  faulted(): boolean;
}

/** What the server hands a device while a client is connected. */
export interface DeviceContext {
  /** Signals an interrupt vector (through the client's eventfd, honouring masks). */
  trigger(irq: IrqName, vector?: number): void;
  readonly dma: DmaAccess;
  /** Logs through the server's logger. */
  log(message: string): void;
}

/**
 * Migration. Two ways to give the state, pick one:
 * - records: `save` / `load`. The library takes the state whole at each phase
 *   and frames it (u32 length, then the bytes, one record per phase), and
 *   hands `load` each record. Simplest, but the stream is vdevkit's own.
 * - stream: `readData` / `writeData`, as libvfio-user's read_data /
 *   write_data callbacks. The device produces and consumes the migration
 *   stream itself, with no framing, so it can match another implementation's
 *   stream byte for byte (the gpio device does, to migrate to and from
 *   libvfio-user's gpio sample).
 */
export interface MigrationSpec {
  /** Offer PRE_COPY (state read while running; then STOP_COPY sends the rest). */
  preCopy?: boolean;
  /** Called on each arc of the state machine (after the library's own work). */
  transition?(from: string, to: string): void | Promise<void>;
  /** Records: the state to send, taken when the device enters STOP_COPY (or PRE_COPY for the pre-copy part). */
  save?(phase: 'pre-copy' | 'stop-copy'): Uint8Array | Promise<Uint8Array>;
  /** Records: each received record, in order, when RESUMING ends. Throw to refuse it. */
  load?(data: Uint8Array): void | Promise<void>;
  /**
   * Stream: one MIG_DATA_READ in PRE_COPY or STOP_COPY. Return at most `size`
   * bytes of the stream; an empty array says this phase has no more data.
   * Throw a VfioError to answer with its errno.
   */
  readData?(size: number, phase: 'pre-copy' | 'stop-copy'): Uint8Array;
  /**
   * Stream: answer every MIG_DATA_READ with as many data bytes as were asked
   * for, zeros after the `size` bytes readData gave (`size` and `argsz` still
   * say how many are data), as libvfio-user's server does. Its samples/client
   * reads exactly 8 + size asked bytes of reply and fails on a shorter one.
   * Default false: the reply holds the data only.
   */
  padReads?: boolean;
  /** Stream: one MIG_DATA_WRITE's bytes, while RESUMING. Throw a VfioError to refuse them. */
  writeData?(data: Uint8Array): void;
}

export interface VfioUserDeviceSpec {
  /** Identity and capabilities; BARs come from `regions`. */
  pci: Omit<PciDeviceDescription, 'bars' | 'rom'> & { capabilities?: readonly CapabilityDescription[] };
  /** Regions by VFIO index: 0-5 BARs, 6 ROM, 8 VGA, >= 9 device-specific. Index 7 (config) is the library's. */
  regions?: { [index: number]: RegionSpec };
  irqs?: IrqSpec;
  /** A client connected (VERSION done). */
  attach?(ctx: DeviceContext): void;
  /** The client went away; DMA windows are gone, interrupts unwired; device state is kept. */
  detach?(): void;
  /**
   * The server is done with the device: called by VfioUserServer for a
   * device its factory made, once that device's connection has closed (after
   * detach). Release what the device holds (fds, mappings, timers). Never
   * called for a device object the server was given (its state outlives
   * connections; its owner releases it).
   */
  dispose?(): void;
  /** DEVICE_RESET or a function-level reset. */
  reset?(): void | Promise<void>;
  /** A DMA window was mapped. */
  dmaMapped?(window: DmaWindow): void;
  /** A DMA window is being unmapped: stop using it before returning. */
  dmaUnmapped?(window: DmaWindow): void;
  /**
   * Config space accesses by message, after the library's own emulation (its
   * checks passed, a write applied): `read` may change `out` (the bytes at
   * `offset` the client gets), `write` sees what was written. `config` reads
   * config space as it is now. For registers whose value the device computes
   * on access, as virtio's VIRTIO_PCI_CAP_PCI_CFG window into its BARs.
   */
  configAccess?: {
    read?(offset: number, out: Uint8Array, config: ConfigReader): void;
    write?(offset: number, data: Uint8Array, config: ConfigReader): void;
  };
  /** Interrupt masking changed by SET_IRQS (libvfio-user's irq state callback). */
  irqMasked?(irq: IrqName, vector: number, masked: boolean): void;
  migration?: MigrationSpec;
  /** Name for logs. */
  name?: string;
}
