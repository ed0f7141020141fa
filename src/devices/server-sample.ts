/**
 * libvfio-user's samples/server (at commit 7e7a0a6c) seen from the wire, so
 * that its samples/client passes against us (test/interop/libvfio-user-client.test.ts).
 * What it presents, read from samples/server.c and lib/:
 *
 * - PCI ids 0xdead:0xbeef, subsystem 0xcafe:0xbabe, class 0, a conventional
 *   256-byte config space without capabilities. 9 regions.
 * - BAR0 (region 0): 8 bytes, a time_t (int64, little-endian), served by
 *   callbacks; only 8-byte accesses at offset 0 (EINVAL otherwise). Writing t
 *   while RUNNING arms a one-shot timer of t - now seconds (now = whole
 *   seconds, as time(NULL)): a time in the past is refused with EINVAL (the
 *   sample's setitimer fails) and t == now disarms. In other states the value
 *   is only stored. A read returns now - BAR0. (In config space the BAR
 *   decodes 16 bytes: the smallest memory BAR.)
 * - BAR1 (region 1): 0x3000 bytes of shared memory (a memfd), offered by fd
 *   with the sparse mmap areas [0, 0x1000) and [0x2000, 0x3000) as the
 *   sample declares (the middle page is reached by messages; Linux cannot
 *   stop a client mapping it anyway). Message accesses read and write the
 *   same memory. (The sample's bar1_access copies reads from offset 0
 *   whatever the offset asked; this device reads at the offset asked: its
 *   client only reads at 0.) In config space the BAR decodes 0x4000 bytes.
 * - Interrupts: one INTx line, plus ERR and REQ (libvfio-user gives those a
 *   count of 1 on every device). No MSI, no MSI-X.
 * - DMA windows are kept in slots in the order they are mapped (the first
 *   free slot, as the sample's table; an unmap frees its slot). When the
 *   timer fires the device triggers INTx, then does DMA: "DIRECT" on the
 *   window in slot 1, through a view of its mapping (marked dirty): 4 writes
 *   of 1024 bytes filled with 'A', 'B', 'C', 'D' from the window's start,
 *   then 2 reads of 2048 bytes compared with what was written; then
 *   "MESSAGE" on the window in slot 0, the same pattern by DMA_WRITE /
 *   DMA_READ messages even though the window is mapped (the sample's
 *   vfu_sgl_write / vfu_sgl_read always use messages: its client counts
 *   them, 4 writes then 4 reads of 1024 bytes, chunked by its
 *   max_data_xfer_size). Those writes are the client's to log as dirty; our
 *   server logs them too. Where the sample exits on a failure (a slot empty,
 *   a window not mapped, a mismatch), this device logs it and goes on.
 * - DEVICE_RESET logs "device reset callback" and changes nothing else.
 * - Migration (stream mode, PRE_COPY offered): the pre-copy data is BAR1
 *   (0x3000 bytes), the stop-and-copy data BAR1 then BAR0 (0x3008 bytes),
 *   read in pieces of any size (each phase restarts at byte 0); an empty read
 *   ends the phase. Replies to MIG_DATA_READ are padded to the size asked, as
 *   libvfio-user's (its samples/client needs it). The destination takes up
 *   to 0x3008 bytes in the same layout (more is EINVAL), and RESUMING -> STOP
 *   with fewer fails that arc (the device goes to ERROR; the sample asserts
 *   when it next enters RUNNING). STOP_COPY and STOP cancel the timer;
 *   entering RUNNING from STOP after a restore, or with a timer cancelled by
 *   STOP, arms it again from BAR0, as the sample's RUNNING arc does (a BAR0
 *   time already past arms nothing here: the sample would fail the arc).
 */
import { SharedMemory } from '../sys/index.js';
import { VfioError, Errno } from '../vfio/errors.js';
import type { DeviceContext, DmaWindow, VfioUserDeviceSpec } from '../vfio-user/device.js';

export const SERVER_SAMPLE_BAR0_SIZE = 8;
export const SERVER_SAMPLE_BAR1_SIZE = 0x3000;
/** The sparse mmap areas of BAR1. */
export const SERVER_SAMPLE_BAR1_AREAS = [
  { offset: 0, size: 0x1000 },
  { offset: 0x2000, size: 0x1000 },
] as const;
/** Bytes of the stop-and-copy stream (and of what the destination takes): BAR1, then BAR0. */
export const SERVER_SAMPLE_STATE_BYTES = SERVER_SAMPLE_BAR1_SIZE + SERVER_SAMPLE_BAR0_SIZE;
/** DMA slots (the sample's NR_DMA_REGIONS). */
export const SERVER_SAMPLE_DMA_SLOTS = 96;
/** The DMA the timer does: `count` chunks of `chunk` bytes, filled with 'A' + i. */
const DMA_CHUNK = 1024;
const DMA_CHUNKS = 4;

export interface ServerSampleOptions {
  log?: (line: string) => void;
  /** The clock, ms since the epoch (default Date.now); BAR0 holds whole seconds of it. */
  now?: () => number;
}

export interface ServerSampleDevice extends VfioUserDeviceSpec {
  /** BAR0's value (seconds). */
  readonly bar0: number;
  /** BAR1's memory (a live view). */
  readonly bar1: Uint8Array;
  readonly bar1Memory: SharedMemory;
  /** True while the timer is armed. */
  readonly timerArmed: boolean;
  /** The DMA windows by slot (null: free), as the timer's DMA uses them. */
  readonly dmaSlots: readonly (DmaWindow | null)[];
  /** The DMA the last timer started (resolves when it is done, failed or not). */
  readonly dmaDone: Promise<void>;
  /** Stops the timer and frees BAR1's memory. */
  dispose(): void;
}

const einval = (code: string, msg: string): VfioError => new VfioError(code, Errno.EINVAL, msg);

/** What the timer's DMA writes: 1024 x 'A', 'B', 'C', 'D'. */
export function serverSampleDmaPattern(): Uint8Array {
  const buf = new Uint8Array(DMA_CHUNK * DMA_CHUNKS);
  for (let i = 0; i < DMA_CHUNKS; i++) buf.fill(0x41 + i, i * DMA_CHUNK, (i + 1) * DMA_CHUNK);
  return buf;
}

export function serverSampleDevice(options: ServerSampleOptions = {}): ServerSampleDevice {
  const log = options.log ?? ((): void => {});
  const nowMs = options.now ?? Date.now;
  const nowSec = (): number => Math.floor(nowMs() / 1000);
  const memory = SharedMemory.create(SERVER_SAMPLE_BAR1_SIZE, { name: 'libvfio-user-server-bar1', sealSize: true });
  const bar1 = memory.bytes.subarray(0, SERVER_SAMPLE_BAR1_SIZE);

  let bar0 = 0;
  let state = 'RUNNING';
  let timer: NodeJS.Timeout | null = null;
  /** A timer was cancelled by STOP, or a state was restored: RUNNING arms it again from BAR0. */
  let rearm = false;
  /** Bytes of the migration stream moved in this phase. */
  let transferred = 0;
  let ctx: DeviceContext | null = null;
  const slots: (DmaWindow | null)[] = new Array<DmaWindow | null>(SERVER_SAMPLE_DMA_SLOTS).fill(null);
  let dmaDone: Promise<void> = Promise.resolve();

  const disarm = (): void => {
    if (timer) clearTimeout(timer);
    timer = null;
  };
  /** setitimer(t - now seconds): past is EINVAL (unless `lenient`: nothing), now disarms. */
  const arm = (t: number, lenient = false): void => {
    const delta = t - nowSec();
    if (delta < 0 && !lenient) throw einval('SAMPLE_TIMER_PAST', `cannot arm the timer ${-delta} s in the past`);
    log(`arming timer to trigger in ${Math.max(delta, 0)} seconds`);
    disarm();
    if (delta <= 0) return;
    timer = setTimeout(fire, delta * 1000);
  };

  const fire = (): void => {
    timer = null;
    const c = ctx;
    if (!c) {
      log('timer fired with no client: no interrupt, no DMA');
      return;
    }
    c.trigger('intx', 0);
    log('doing dma io');
    dmaDone = dmaDone.then(async () => {
      await doDmaIo(c, 1, false);
      await doDmaIo(c, 0, true);
    });
  };

  /** The sample's do_dma_io: write the pattern in 4 chunks, read it back in 2, compare. */
  const doDmaIo = async (c: DeviceContext, slot: number, useMessages: boolean): Promise<void> => {
    const kind = useMessages ? 'MESSAGE' : 'DIRECT';
    try {
      const w = slots[slot];
      if (!w) throw new Error(`no DMA region in slot ${slot}`);
      const expected = serverSampleDmaPattern();
      for (let i = 0; i < DMA_CHUNKS; i++) {
        const addr = w.iova + i * DMA_CHUNK;
        const chunk = expected.subarray(i * DMA_CHUNK, (i + 1) * DMA_CHUNK);
        log(`do_dma_io: ${kind} WRITE addr 0x${addr.toString(16)} size ${DMA_CHUNK}`);
        if (useMessages) {
          await c.dma.write(addr, chunk, { messages: true });
        } else {
          const v = c.dma.view(addr, DMA_CHUNK, { write: true }); // marks the page dirty
          if (!v) throw new Error(`0x${addr.toString(16)} is not in a mapped DMA window`);
          v.set(chunk);
        }
      }
      const got = new Uint8Array(expected.length);
      for (let i = 0; i < DMA_CHUNKS; i += 2) {
        const addr = w.iova + i * DMA_CHUNK;
        log(`do_dma_io: ${kind} READ  addr 0x${addr.toString(16)} size ${2 * DMA_CHUNK}`);
        if (useMessages) {
          got.set(await c.dma.read(addr, 2 * DMA_CHUNK, { messages: true }), i * DMA_CHUNK);
        } else {
          const v = c.dma.view(addr, 2 * DMA_CHUNK);
          if (!v) throw new Error(`0x${addr.toString(16)} is not in a mapped DMA window`);
          got.set(v, i * DMA_CHUNK);
        }
      }
      if (!Buffer.from(got).equals(Buffer.from(expected))) throw new Error('DMA write and DMA read mismatch');
      log(`do_dma_io: ${kind} success`);
    } catch (err) {
      log(`do_dma_io: ${kind} failed: ${(err as Error).message}`);
    }
  };

  /** The migration stream: BAR1, then (stop-and-copy and resuming) BAR0 as int64 little-endian. */
  const bar0Bytes = (): Uint8Array => {
    const b = new Uint8Array(8);
    new DataView(b.buffer).setBigInt64(0, BigInt(bar0), true);
    return b;
  };

  const dev: ServerSampleDevice = {
    name: 'libvfio-user-server',
    get bar0() {
      return bar0;
    },
    bar1,
    bar1Memory: memory,
    get timerArmed() {
      return timer !== null;
    },
    get dmaSlots() {
      return slots.slice();
    },
    get dmaDone() {
      return dmaDone;
    },
    pci: { vendorId: 0xdead, deviceId: 0xbeef, subsystemVendorId: 0xcafe, subsystemId: 0xbabe, classCode: 0 },
    regions: {
      0: {
        size: SERVER_SAMPLE_BAR0_SIZE,
        read(offset, out) {
          if (out.length !== 8 || offset !== 0) throw einval('SAMPLE_BAR0_ACCESS', `bad BAR0 access 0x${offset.toString(16)}+${out.length}`);
          new DataView(out.buffer, out.byteOffset, 8).setBigInt64(0, BigInt(nowSec() - bar0), true);
        },
        write(offset, data) {
          if (data.length !== 8 || offset !== 0) throw einval('SAMPLE_BAR0_ACCESS', `bad BAR0 access 0x${offset.toString(16)}+${data.length}`);
          const t = Number(new DataView(data.buffer, data.byteOffset, 8).getBigInt64(0, true));
          if (state === 'RUNNING') arm(t);
          bar0 = t;
        },
      },
      1: {
        size: SERVER_SAMPLE_BAR1_SIZE,
        memory,
        mmapAreas: SERVER_SAMPLE_BAR1_AREAS.map((a) => ({ ...a })),
      },
    },
    irqs: { intx: true, err: true, req: true },
    attach(c) {
      ctx = c;
    },
    detach() {
      ctx = null;
      slots.fill(null);
    },
    reset() {
      log('device reset callback');
    },
    dmaMapped(w) {
      const i = slots.indexOf(null);
      if (i < 0) {
        log(`DMA window 0x${w.iova.toString(16)}: all ${SERVER_SAMPLE_DMA_SLOTS} slots taken, not used`);
        return;
      }
      slots[i] = w;
    },
    dmaUnmapped(w) {
      for (let i = 0; i < slots.length; i++) {
        if (slots[i] && slots[i]!.iova === w.iova && slots[i]!.size === w.size) slots[i] = null;
      }
    },
    migration: {
      preCopy: true,
      padReads: true,
      transition(from, to) {
        log(`migration: transition ${from} -> ${to}`);
        switch (to) {
          case 'STOP_COPY':
            disarm();
            transferred = 0;
            break;
          case 'PRE_COPY':
          case 'RESUMING':
            transferred = 0;
            break;
          case 'STOP':
            if (timer) rearm = true;
            disarm();
            if (from === 'RESUMING') {
              if (transferred !== SERVER_SAMPLE_STATE_BYTES) {
                throw einval('SAMPLE_MIG_SHORT', `migration data: ${transferred} of ${SERVER_SAMPLE_STATE_BYTES} bytes`);
              }
              rearm = true;
            }
            break;
          case 'RUNNING':
            if (from === 'STOP' && rearm) arm(bar0, true);
            rearm = false;
            break;
        }
        state = to;
      },
      readData(size, phase) {
        const total = SERVER_SAMPLE_BAR1_SIZE + (phase === 'stop-copy' ? SERVER_SAMPLE_BAR0_SIZE : 0);
        if (transferred >= total || size === 0) return new Uint8Array(0);
        const start = transferred;
        const end = Math.min(start + size, total);
        const out = new Uint8Array(end - start);
        if (start < SERVER_SAMPLE_BAR1_SIZE) out.set(bar1.subarray(start, Math.min(end, SERVER_SAMPLE_BAR1_SIZE)));
        if (end > SERVER_SAMPLE_BAR1_SIZE) {
          const from = Math.max(start, SERVER_SAMPLE_BAR1_SIZE);
          out.set(bar0Bytes().subarray(from - SERVER_SAMPLE_BAR1_SIZE, end - SERVER_SAMPLE_BAR1_SIZE), from - start);
        }
        transferred = end;
        return out;
      },
      writeData(data) {
        if (data.length > SERVER_SAMPLE_STATE_BYTES - transferred) {
          throw einval('SAMPLE_MIG_LONG', `migration data past ${SERVER_SAMPLE_STATE_BYTES} bytes`);
        }
        const start = transferred;
        const end = start + data.length;
        if (start < SERVER_SAMPLE_BAR1_SIZE) bar1.set(data.subarray(0, Math.min(end, SERVER_SAMPLE_BAR1_SIZE) - start), start);
        if (end > SERVER_SAMPLE_BAR1_SIZE) {
          const from = Math.max(start, SERVER_SAMPLE_BAR1_SIZE);
          const b = bar0Bytes();
          b.set(data.subarray(from - start), from - SERVER_SAMPLE_BAR1_SIZE);
          bar0 = Number(new DataView(b.buffer).getBigInt64(0, true));
        }
        transferred = end;
      },
    },
    dispose() {
      disarm();
      memory.close();
    },
  };
  return dev;
}
