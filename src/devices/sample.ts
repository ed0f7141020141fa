/**
 * A sample device that exercises every feature of the vfio-user server: a
 * register BAR with behaviour, an mmap-able memory BAR with sparse areas, a
 * ROM, a device-specific region, every interrupt index, an ioeventfd, a DMA
 * engine (through fd-mapped windows and through messages), dirty logging,
 * reset and migration with pre-copy. It is a plain VfioUserDeviceSpec, plus
 * read-only accessors of its state for tests.
 *
 * Regions
 *   BAR0 (region 0)  4 KiB mem32, registers served by callbacks (below).
 *   BAR1             chosen by the runtime for the MSI-X table and PBA.
 *   BAR2 (region 2)  64 KiB mem64 prefetchable memory, a memfd. The client may
 *                    mmap [0, 16 KiB) and [32 KiB, 64 KiB); the hole
 *                    [16 KiB, 32 KiB) is reached by REGION_READ/WRITE only
 *                    (served from the same memory, counted in `trapped`).
 *                    Message accesses to the mmap areas hit the memory too.
 *   ROM (region 6)   2 KiB, read-only: 0x55 0xaa, then zeros.
 *   region 9         4 KiB read-only device-specific region (CAP_TYPE
 *                    0x80000000 | vendor id, subtype 1): an ASCII banner.
 *
 * BAR0 register map (little-endian; accesses of 1, 2, 4 or 8 bytes at an
 * offset aligned to their size, anything else is EINVAL; offsets 0x40 and
 * up read as 0 and ignore writes):
 *   0x00 ID          u32 RO   0x53414d50 ("PMAS" in memory).
 *   0x04 SCRATCH     u32 RW   power-on 0.
 *   0x08 DOORBELL    u32 WO   writing V triggers MSI-X vector V (V out of range: ignored). Reads 0.
 *                             Also wired as an ioeventfd (GET_REGION_IO_FDS): a 4-byte write of
 *                             DOORBELL_EVENTFD_VECTOR (1) may arrive through the eventfd instead.
 *   0x0c IRQ_RAISE   u32 WO   bit 0 INTx, bit 1 ERR, bit 2 REQ: trigger that interrupt. Reads 0.
 *   0x10 DMA_SRC     u64 RW   source IOVA of a copy.
 *   0x18 DMA_DST     u64 RW   destination IOVA of a copy or a fill.
 *   0x20 DMA_LEN     u32 RW   bytes to copy or fill (at most `maxDmaLength`).
 *   0x24 DMA_CMD     u32 WO   1: copy DMA_LEN bytes from DMA_SRC to DMA_DST: when the destination
 *                             lies in one fd-mapped window, ctx.dma.readInto a view of it; else
 *                             when the source does, ctx.dma.write of a view of it; else
 *                             ctx.dma.read then ctx.dma.write, 1 MiB at a time (so by mapping or
 *                             by DMA_READ/DMA_WRITE messages). Reads 0. Other values are ignored.
 *   0x28 DMA_STATUS  u32 R/W1C bit 0 BUSY (read-only), bit 1 DONE, bit 2 ERROR; writing 1 clears
 *                             DONE/ERROR. A command sets BUSY; on success DONE and MSI-X vector 0
 *                             is triggered, on failure ERROR, DMA_ERRNO, and the ERR interrupt.
 *   0x2c FILL_PATTERN u32 RW  the fill pattern, repeated little-endian from DMA_DST.
 *   0x30 FILL_CMD    u32 WO   1: fill [DMA_DST, +DMA_LEN) with FILL_PATTERN, through a direct view
 *                             (ctx.dma.view with write) when the range lies in one fd-mapped
 *                             window, else with ctx.dma.write (of a device buffer, built once per
 *                             pattern and kept, up to 16 MiB, for the next fill). Completion as
 *                             DMA_CMD. Reads 0.
 *   0x34 DMA_ERRNO   u32 RO   errno of the last failed command (0 if none).
 *   0x38 DMA_COUNT   u32 RO   commands completed successfully.
 *   0x3c reserved    reads 0.
 * While the device is stopped for migration (STOP, STOP_COPY, RESUMING) the
 * registers still take writes but nothing is triggered and no DMA starts.
 *
 * Migration: save('pre-copy') gives the BAR2 memory; save('stop-copy') the
 * registers and the memory again (waiting for a running DMA command first).
 * Each is one record: u32 magic 0x47494d53 ("SMIG"), u32 kind (1 pre-copy,
 * 2 stop-copy), u32 register bytes (0 or 0x40), u32 memory bytes (65536),
 * then the registers and the memory. load() takes them in order.
 */
import { EventFd, SharedMemory } from '../sys/index.js';
import { VfioError, Errno } from '../vfio/errors.js';
import type { DeviceContext, DmaWindow, IrqName, VfioUserDeviceSpec } from '../vfio-user/device.js';

export const SAMPLE_ID = 0x53414d50;

/** BAR0 register offsets. */
export const SampleReg = {
  ID: 0x00,
  SCRATCH: 0x04,
  DOORBELL: 0x08,
  IRQ_RAISE: 0x0c,
  DMA_SRC: 0x10,
  DMA_DST: 0x18,
  DMA_LEN: 0x20,
  DMA_CMD: 0x24,
  DMA_STATUS: 0x28,
  FILL_PATTERN: 0x2c,
  FILL_CMD: 0x30,
  DMA_ERRNO: 0x34,
  DMA_COUNT: 0x38,
} as const;

/** DMA_STATUS bits. */
export const SampleStatus = { BUSY: 1, DONE: 2, ERROR: 4 } as const;

/** The register file's size: everything from 0x40 reads as 0. */
export const SAMPLE_REGS_SIZE = 0x40;
export const SAMPLE_BAR0_SIZE = 0x1000;
export const SAMPLE_BAR2_SIZE = 0x10000;
/** The parts of BAR2 the client may mmap. */
export const SAMPLE_BAR2_MMAP_AREAS: readonly { offset: number; size: number }[] = [
  { offset: 0, size: 0x4000 },
  { offset: 0x8000, size: 0x8000 },
];
export const SAMPLE_ROM_SIZE = 0x800;
/** The MSI-X vector the doorbell's ioeventfd stands for (its datamatch). */
export const DOORBELL_EVENTFD_VECTOR = 1;

const MIG_MAGIC = 0x47494d53;
const MIG_PRE_COPY = 1;
const MIG_STOP_COPY = 2;
const MIG_HEADER = 16;
/** A copy through a buffer of its own moves at most this many bytes per read/write pair. */
const COPY_CHUNK = 1 << 20;
/** Largest fill buffer the device keeps for the next fill of the same pattern. */
const FILL_CACHE_MAX = 16 << 20;

export interface SampleOptions {
  /** PCI vendor and device ids (default 0x1234:0x5a31). */
  vendorId?: number;
  deviceId?: number;
  /** MSI-X vectors (default 8). */
  msixVectors?: number;
  /** Offer the doorbell ioeventfd (default true). */
  ioEventFd?: boolean;
  /** Longest DMA command in bytes (default 16 MiB); longer ones fail with EINVAL. */
  maxDmaLength?: number;
  log?: (line: string) => void;
}

/** A snapshot of the BAR0 registers. */
export interface SampleRegisters {
  id: number;
  scratch: number;
  dmaSrc: bigint;
  dmaDst: bigint;
  dmaLen: number;
  dmaStatus: number;
  fillPattern: number;
  dmaErrno: number;
  dmaCount: number;
}

export interface SampleDevice extends VfioUserDeviceSpec {
  /** The registers now. */
  readonly registers: SampleRegisters;
  /** The raw register file (a copy, SAMPLE_REGS_SIZE bytes). */
  readonly registerBytes: Uint8Array;
  /** A copy of the BAR2 memory. */
  readonly bar2: Uint8Array;
  /** The BAR2 memfd (the device's own; do not close it). */
  readonly bar2Memory: SharedMemory;
  /** REGION_READ/WRITE accesses that hit the BAR2 hole (the part that is not mmap-able). */
  readonly trapped: number;
  /** The DMA windows mapped now, in mapping order. */
  readonly windows: readonly DmaWindow[];
  /** Every window unmapped so far, in order. */
  readonly unmapped: readonly DmaWindow[];
  /** Every migration arc, as 'FROM->TO'. */
  readonly arcs: readonly string[];
  /** Resets so far. */
  readonly resets: number;
  /** Records that load() took, in order ('pre-copy' or 'stop-copy'). */
  readonly loaded: readonly string[];
  /** irqMasked calls, as 'msix 3 masked'. */
  readonly maskEvents: readonly string[];
  /** True while a client is attached. */
  readonly attached: boolean;
  /** The doorbell's ioeventfd, if offered. */
  readonly doorbellEventFd: EventFd | null;
  /** Resolves once no DMA command is running. */
  idle(): Promise<void>;
  /** Closes the memfd and the eventfd. Call when done with the device. */
  dispose(): void;
}

const einval = (msg: string): VfioError => new VfioError('SAMPLE_BAD_ACCESS', Errno.EINVAL, msg);

/** What a byte of the register file is for. */
type ByteKind = 'ro' | 'rw' | 'action';

function byteKind(addr: number): ByteKind {
  if (addr >= SampleReg.SCRATCH && addr < SampleReg.SCRATCH + 4) return 'rw';
  if (addr >= SampleReg.DMA_SRC && addr < SampleReg.DMA_CMD) return 'rw'; // SRC, DST, LEN
  if (addr >= SampleReg.FILL_PATTERN && addr < SampleReg.FILL_PATTERN + 4) return 'rw';
  const reg = addr & ~3;
  if (
    reg === SampleReg.DOORBELL ||
    reg === SampleReg.IRQ_RAISE ||
    reg === SampleReg.DMA_CMD ||
    reg === SampleReg.DMA_STATUS ||
    reg === SampleReg.FILL_CMD
  ) {
    return 'action';
  }
  return 'ro';
}

function checkAccess(offset: number, size: number): void {
  if (size !== 1 && size !== 2 && size !== 4 && size !== 8) throw einval(`BAR0 access of ${size} bytes`);
  if (offset % size !== 0) throw einval(`BAR0 access of ${size} bytes at unaligned offset 0x${offset.toString(16)}`);
}

const RUNNING_STATES = new Set(['RUNNING', 'PRE_COPY', 'RUNNING_P2P', 'PRE_COPY_P2P']);

export function sampleDevice(options: SampleOptions = {}): SampleDevice {
  const log = options.log ?? (() => {});
  const vectors = options.msixVectors ?? 8;
  const maxDmaLength = options.maxDmaLength ?? 16 << 20;

  const regs = new Uint8Array(SAMPLE_REGS_SIZE);
  const rv = new DataView(regs.buffer);
  const powerOn = (): void => {
    regs.fill(0);
    rv.setUint32(SampleReg.ID, SAMPLE_ID, true);
  };
  powerOn();

  const memory = SharedMemory.create(SAMPLE_BAR2_SIZE, { name: 'sample-bar2', sealSize: true });
  const rom = new Uint8Array(SAMPLE_ROM_SIZE);
  rom[0] = 0x55;
  rom[1] = 0xaa;
  const info = new Uint8Array(0x1000);
  const banner = 'vdevkit sample device\n';
  for (let i = 0; i < banner.length; i++) info[i] = banner.charCodeAt(i);

  let ctx: DeviceContext | null = null;
  let running = true;
  /**
   * A refused migration record puts the state machine in ERROR, which only a
   * reset leaves (to RUNNING) without an arc the device is told about.
   */
  let migrationFailed = false;
  let trapped = 0;
  let resets = 0;
  /** Bumped by reset: a command that finishes after it leaves the registers alone. */
  let generation = 0;
  let engine: Promise<void> | null = null;
  const windows: DmaWindow[] = [];
  const unmapped: DmaWindow[] = [];
  const arcs: string[] = [];
  const loaded: string[] = [];
  const maskEvents: string[] = [];

  const trigger = (irq: IrqName, vector = 0): void => {
    if (!ctx || !running) return;
    try {
      ctx.trigger(irq, vector);
    } catch (err) {
      log(`trigger ${irq} ${vector}: ${(err as Error).message}`);
    }
  };

  // Watched only while a client is attached (a watched fd keeps the event loop alive).
  const doorbellEventFd = options.ioEventFd === false ? null : EventFd.create();
  let unsubscribe: (() => void) | null = null;

  // --- the DMA engine ---

  const finish = (gen: number, err: unknown): void => {
    if (gen !== generation) return; // reset meanwhile
    let status = rv.getUint32(SampleReg.DMA_STATUS, true) & ~SampleStatus.BUSY;
    if (err === null) {
      status |= SampleStatus.DONE;
      rv.setUint32(SampleReg.DMA_COUNT, (rv.getUint32(SampleReg.DMA_COUNT, true) + 1) >>> 0, true);
    } else {
      status |= SampleStatus.ERROR;
      const errno = (err as { errno?: unknown }).errno;
      rv.setUint32(SampleReg.DMA_ERRNO, typeof errno === 'number' && errno > 0 ? errno : Errno.EIO, true);
      log(`dma: command failed: ${(err as Error).message}`);
    }
    rv.setUint32(SampleReg.DMA_STATUS, status, true);
    if (err === null) trigger('msix', 0);
    else trigger('err');
  };

  const copy = async (c: DeviceContext, src: number, dst: number, len: number): Promise<void> => {
    if (len === 0) return;
    // A mapped end needs no buffer: the other end's DMA messages go straight to or from it.
    const into = c.dma.view(dst, len, { write: true });
    if (into) {
      try {
        return await c.dma.readInto(src, into);
      } finally {
        // The view marked the pages dirty when taken; the data landed since (a dirty
        // report may have cleared them meanwhile).
        c.dma.markDirty(dst, len);
      }
    }
    const from = c.dma.view(src, len);
    if (from) return c.dma.write(dst, from);
    for (let done = 0; done < len; done += COPY_CHUNK) {
      const n = Math.min(COPY_CHUNK, len - done);
      const data = await c.dma.read(src + done, n);
      await c.dma.write(dst + done, data);
    }
  };

  // The last fill's data (device memory: DMA_WRITE copies it into the messages), kept for the
  // next fill of the same pattern; only ever read, and one command runs at a time.
  let fillData: { pattern: number; bytes: Buffer } | null = null;
  const fill = async (c: DeviceContext, dst: number, len: number, pattern: number): Promise<void> => {
    let bytes: Uint8Array;
    if (fillData && fillData.pattern === pattern && fillData.bytes.length >= len) {
      bytes = fillData.bytes.subarray(0, len);
    } else {
      const word = Buffer.alloc(4);
      word.writeUInt32LE(pattern >>> 0);
      const made = Buffer.alloc(Math.max(len, 4)).fill(word);
      // Kept only up to FILL_CACHE_MAX: DMA_LEN is the driver's to choose.
      fillData = made.length <= FILL_CACHE_MAX ? { pattern, bytes: made } : null;
      bytes = made.subarray(0, len);
    }
    const view = len > 0 ? c.dma.view(dst, len, { write: true }) : null;
    if (view) view.set(bytes);
    else await c.dma.write(dst, bytes);
  };

  const start = (what: 'copy' | 'fill'): void => {
    if (!running) {
      log(`dma: ${what} ignored while stopped`);
      return;
    }
    if (engine) {
      log(`dma: ${what} ignored, a command is running`);
      return;
    }
    const src = Number(rv.getBigUint64(SampleReg.DMA_SRC, true));
    const dst = Number(rv.getBigUint64(SampleReg.DMA_DST, true));
    const len = rv.getUint32(SampleReg.DMA_LEN, true);
    const pattern = rv.getUint32(SampleReg.FILL_PATTERN, true);
    const status = rv.getUint32(SampleReg.DMA_STATUS, true) & ~(SampleStatus.DONE | SampleStatus.ERROR);
    rv.setUint32(SampleReg.DMA_STATUS, status | SampleStatus.BUSY, true);
    const gen = generation;
    const c = ctx;
    const run = async (): Promise<void> => {
      if (!c) throw new VfioError('SAMPLE_NO_CLIENT', Errno.EIO, 'no client attached: no DMA');
      if (len > maxDmaLength) throw einval(`DMA length ${len} > ${maxDmaLength}`);
      if (!Number.isSafeInteger(src) || !Number.isSafeInteger(dst)) throw einval('DMA address beyond 2^53');
      if (what === 'copy') await copy(c, src, dst, len);
      else await fill(c, dst, len, pattern);
    };
    const p: Promise<void> = run().then(
      () => finish(gen, null),
      (err: unknown) => finish(gen, err),
    );
    const tracked: Promise<void> = p.finally(() => {
      if (engine === tracked) engine = null;
    });
    engine = tracked;
  };

  // --- BAR0 ---

  const readRegs = (offset: number, out: Uint8Array): void => {
    checkAccess(offset, out.length);
    out.fill(0);
    if (offset >= SAMPLE_REGS_SIZE) return;
    out.set(regs.subarray(offset, offset + out.length));
  };

  const writeRegs = (offset: number, data: Uint8Array): void => {
    checkAccess(offset, data.length);
    if (offset >= SAMPLE_REGS_SIZE) return;
    const actions = new Map<number, number>();
    for (let i = 0; i < data.length; i++) {
      const addr = offset + i;
      const byte = data[i]!;
      const kind = byteKind(addr);
      if (kind === 'rw') regs[addr] = byte;
      else if (kind === 'action') {
        const reg = addr & ~3;
        actions.set(reg, ((actions.get(reg) ?? 0) | (byte << (8 * (addr & 3)))) >>> 0);
      }
    }
    for (const reg of [...actions.keys()].sort((a, b) => a - b)) {
      const v = actions.get(reg)!;
      switch (reg) {
        case SampleReg.DOORBELL:
          if (v < vectors) trigger('msix', v);
          else log(`doorbell: no vector ${v}`);
          break;
        case SampleReg.IRQ_RAISE:
          if (v & 1) trigger('intx');
          if (v & 2) trigger('err');
          if (v & 4) trigger('req');
          break;
        case SampleReg.DMA_STATUS: {
          const clear = v & (SampleStatus.DONE | SampleStatus.ERROR);
          rv.setUint32(SampleReg.DMA_STATUS, rv.getUint32(SampleReg.DMA_STATUS, true) & ~clear, true);
          break;
        }
        case SampleReg.DMA_CMD:
          if (v === 1) start('copy');
          break;
        case SampleReg.FILL_CMD:
          if (v === 1) start('fill');
          break;
      }
    }
  };

  // --- BAR2 ---

  const inHole = (offset: number, size: number): boolean =>
    !SAMPLE_BAR2_MMAP_AREAS.some((a) => offset >= a.offset && offset + size <= a.offset + a.size);

  // --- migration ---

  const record = (kind: number, withRegs: boolean): Uint8Array => {
    const regBytes = withRegs ? SAMPLE_REGS_SIZE : 0;
    const out = new Uint8Array(MIG_HEADER + regBytes + SAMPLE_BAR2_SIZE);
    const v = new DataView(out.buffer);
    v.setUint32(0, MIG_MAGIC, true);
    v.setUint32(4, kind, true);
    v.setUint32(8, regBytes, true);
    v.setUint32(12, SAMPLE_BAR2_SIZE, true);
    if (withRegs) out.set(regs, MIG_HEADER);
    out.set(memory.bytes, MIG_HEADER + regBytes);
    return out;
  };

  const refuse = (msg: string): VfioError => new VfioError('SAMPLE_BAD_STATE', Errno.EINVAL, msg);

  const loadRecord = (data: Uint8Array): void => {
    if (data.length < MIG_HEADER) throw refuse(`migration record of ${data.length} bytes`);
    const v = new DataView(data.buffer, data.byteOffset, data.length);
    const magic = v.getUint32(0, true);
    const kind = v.getUint32(4, true);
    const regBytes = v.getUint32(8, true);
    const memBytes = v.getUint32(12, true);
    if (magic !== MIG_MAGIC) throw refuse(`bad migration magic 0x${magic.toString(16)}`);
    const expectRegs = kind === MIG_PRE_COPY ? 0 : kind === MIG_STOP_COPY ? SAMPLE_REGS_SIZE : -1;
    if (expectRegs < 0) throw refuse(`unknown migration record kind ${kind}`);
    if (regBytes !== expectRegs || memBytes !== SAMPLE_BAR2_SIZE || data.length !== MIG_HEADER + regBytes + memBytes) {
      throw refuse('migration record sizes do not match this device');
    }
    if (regBytes > 0) {
      const saved = data.subarray(MIG_HEADER, MIG_HEADER + regBytes);
      if (new DataView(saved.buffer, saved.byteOffset, 4).getUint32(0, true) !== SAMPLE_ID) {
        throw refuse('migration record from another device');
      }
      regs.set(saved);
      rv.setUint32(SampleReg.DMA_STATUS, rv.getUint32(SampleReg.DMA_STATUS, true) & ~SampleStatus.BUSY, true);
    }
    memory.bytes.set(data.subarray(MIG_HEADER + regBytes));
    loaded.push(kind === MIG_PRE_COPY ? 'pre-copy' : 'stop-copy');
  };

  const device: SampleDevice = {
    name: 'vdevkit-sample',
    get registers(): SampleRegisters {
      return {
        id: rv.getUint32(SampleReg.ID, true),
        scratch: rv.getUint32(SampleReg.SCRATCH, true),
        dmaSrc: rv.getBigUint64(SampleReg.DMA_SRC, true),
        dmaDst: rv.getBigUint64(SampleReg.DMA_DST, true),
        dmaLen: rv.getUint32(SampleReg.DMA_LEN, true),
        dmaStatus: rv.getUint32(SampleReg.DMA_STATUS, true),
        fillPattern: rv.getUint32(SampleReg.FILL_PATTERN, true),
        dmaErrno: rv.getUint32(SampleReg.DMA_ERRNO, true),
        dmaCount: rv.getUint32(SampleReg.DMA_COUNT, true),
      };
    },
    get registerBytes() {
      return regs.slice();
    },
    get bar2() {
      return memory.bytes.slice();
    },
    get bar2Memory() {
      return memory;
    },
    get trapped() {
      return trapped;
    },
    get windows() {
      return [...windows];
    },
    get unmapped() {
      return [...unmapped];
    },
    get arcs() {
      return [...arcs];
    },
    get resets() {
      return resets;
    },
    get loaded() {
      return [...loaded];
    },
    get maskEvents() {
      return [...maskEvents];
    },
    get attached() {
      return ctx !== null;
    },
    get doorbellEventFd() {
      return doorbellEventFd;
    },
    async idle() {
      while (engine) await engine;
    },
    dispose() {
      unsubscribe?.();
      unsubscribe = null;
      doorbellEventFd?.close();
      memory.close();
    },

    pci: {
      vendorId: options.vendorId ?? 0x1234,
      deviceId: options.deviceId ?? 0x5a31,
      subsystemVendorId: options.vendorId ?? 0x1234,
      subsystemId: 0x0001,
      revision: 1,
      classCode: 0xff0000,
      capabilities: [
        { type: 'pm' },
        { type: 'express', deviceType: 'endpoint' },
        { type: 'vendor', payload: [0x53, 0x41, 0x4d, 0x50], readOnly: true },
        { type: 'dsn', serial: 0x0123456789abcdefn },
      ],
    },
    regions: {
      0: {
        size: SAMPLE_BAR0_SIZE,
        read: readRegs,
        write: writeRegs,
        ...(doorbellEventFd
          ? { ioEventFds: [{ offset: SampleReg.DOORBELL, size: 4, datamatch: BigInt(DOORBELL_EVENTFD_VECTOR), eventfd: doorbellEventFd }] }
          : {}),
      },
      2: {
        size: SAMPLE_BAR2_SIZE,
        barType: 'mem64',
        prefetchable: true,
        memory,
        mmapAreas: SAMPLE_BAR2_MMAP_AREAS.map((a) => ({ ...a })),
        read(offset, out) {
          if (inHole(offset, out.length)) trapped++;
          out.set(memory.bytes.subarray(offset, offset + out.length));
        },
        write(offset, data) {
          if (inHole(offset, data.length)) trapped++;
          memory.bytes.set(data, offset);
        },
      },
      6: {
        size: SAMPLE_ROM_SIZE,
        writable: false,
        read(offset, out) {
          out.set(rom.subarray(offset, offset + out.length));
        },
      },
      9: {
        size: info.length,
        writable: false,
        type: { type: (0x80000000 | (options.vendorId ?? 0x1234)) >>> 0, subtype: 1 },
        read(offset, out) {
          out.set(info.subarray(offset, offset + out.length));
        },
      },
    },
    irqs: { intx: true, msix: vectors, err: true, req: true },

    attach(c) {
      ctx = c;
      unsubscribe?.();
      unsubscribe = doorbellEventFd?.subscribe(() => trigger('msix', DOORBELL_EVENTFD_VECTOR)) ?? null;
      log('attached');
    },
    detach() {
      ctx = null;
      unsubscribe?.();
      unsubscribe = null;
      windows.length = 0;
      log('detached');
    },
    async reset() {
      resets++;
      generation++;
      engine = null;
      powerOn();
      if (migrationFailed) {
        migrationFailed = false;
        running = true;
      }
      log('reset');
    },
    dmaMapped(w) {
      windows.push(w);
      log(`dma: mapped 0x${w.iova.toString(16)}+0x${w.size.toString(16)}${w.mapped ? '' : ' (by messages)'}`);
    },
    dmaUnmapped(w) {
      const i = windows.findIndex((x) => x.iova === w.iova && x.size === w.size);
      if (i >= 0) windows.splice(i, 1);
      unmapped.push(w);
      log(`dma: unmapped 0x${w.iova.toString(16)}+0x${w.size.toString(16)}`);
    },
    irqMasked(irq, vector, masked) {
      maskEvents.push(`${irq} ${vector} ${masked ? 'masked' : 'unmasked'}`);
    },

    migration: {
      preCopy: true,
      async save(phase) {
        if (phase === 'pre-copy') return record(MIG_PRE_COPY, false);
        while (engine) await engine; // the registers settle before they are sent
        return record(MIG_STOP_COPY, true);
      },
      load(data) {
        try {
          loadRecord(data);
        } catch (err) {
          migrationFailed = true;
          throw err;
        }
      },
      async transition(from, to) {
        arcs.push(`${from}->${to}`);
        const run = RUNNING_STATES.has(to);
        // Quiesce before stopping: a running command completes (with its interrupt) first.
        if (!run) while (engine) await engine;
        running = run;
      },
    },
  };
  return device;
}
