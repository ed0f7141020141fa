/**
 * One client connection to a served device: the server-side dispatch table.
 * Every arm decodes (done by the connection), checks semantics, calls the
 * device runtime, and returns the reply body; errors become errno replies.
 */
import { fstatSync, readlinkSync } from 'node:fs';
import { EventFd, Fd, SharedMemory, socketPairFds, UnixSocket } from '../sys/index.js';
import { VfioError, Errno as VErrno } from '../vfio/errors.js';
import {
  DmaMapTable,
  IrqState,
  InfoCapChainBuilder,
  composeRegionInfoReply,
  validateSetIrqs,
  type DmaRegion,
} from '../vfio/index.js';
import { DeviceInfoFlag, DmaMapFlag, DmaUnmapFlag, IrqInfoFlag, PciIrq, PCI_NUM_IRQS } from '../vfio/uapi.js';
import { Command, DeviceFeature, FeatureFlags, DmaMapFlags, IoFdType, VFIO_USER_MAJOR, VFIO_USER_MINOR } from './constants.js';
import { buildCapabilitiesJson, negotiateVersion, parseCapabilities, type ParsedCapabilities } from './caps.js';
import {
  codecLimits,
  decodeDmaLoggingControl,
  decodeDmaLoggingReportRequest,
  encodeFeatureMigState,
  encodeFeatureMigration,
  encodeDmaLoggingReportRequest,
  type CodecLimits,
  type RequestMessage,
} from './messages.js';
import { Connection, type HandlerReply } from './connection.js';
import { runDmaTransfer, type DmaChunk } from './dma-transfer.js';
import type { DeviceRuntime } from './runtime.js';
import type { DeviceContext, DmaAccess, DmaWindow, IrqName } from './device.js';

/** What the session keeps per DMA window. */
export interface DmaHandle {
  /** The mapping of the client's fd; null when DMA goes through messages. */
  shm: SharedMemory | null;
  /**
   * Transfers whose outgoing messages are views of this mapping (a device's
   * dma.write of a view): while any is in flight, an unmap of the window
   * defers the munmap, so queued messages never point at unmapped memory.
   * (Messages already spliced into the socket hold the pages themselves: the
   * client reads them from its own memory as it is when it reads them.)
   */
  pins: number;
  closeWhenUnpinned: boolean;
  /**
   * The file behind the client's fd ("dev:ino" from fstat), or null for a
   * window without fd: a second identical DMA_MAP is the same mapping when
   * this matches (libvfio-user compares the files the same way).
   */
  file: string | null;
  /** A DMA_UNMAP of the window waits for this (its reply goes out once no transfer reads the window). */
  onUnpinned?: () => void;
}

export interface SessionOptions {
  /** Largest count we accept in region/DMA transfers (our max_data_xfer_size; default 1 MiB). */
  maxDataXferSize: number;
  /** Most fds we accept in one message (our max_msg_fds; default 16, QEMU's limit). */
  maxMsgFds: number;
  /** Timeout of our DMA_READ/DMA_WRITE requests to the client, ms. */
  timeoutMs: number;
  log: (line: string) => void;
  trace?: ((line: string) => void) | undefined;
  /** How long a new connection may take to send VERSION, ms (default 10000). */
  versionTimeoutMs?: number;
}

const IRQ_NAMES: Record<IrqName, number> = { intx: PciIrq.INTX, msi: PciIrq.MSI, msix: PciIrq.MSIX, err: PciIrq.ERR, req: PciIrq.REQ };
const PAGE = 4096;
/** Largest total of dirty bitmaps DMA_LOGGING_START may set up (QEMU's max_bitmap_size). */
const MAX_LOG_BITMAP_BYTES = 256 * 1024 * 1024;
const einval = (code: string, msg: string): VfioError => new VfioError(code, VErrno.EINVAL, msg);

/** Takes an Fd out of a message's list, so the connection does not close it after the handler. */
const takeFd = (fd: Fd): Fd => new Fd(fd.release());

/**
 * An interrupt fd from the client. An eventfd is used as it is: O_NONBLOCK
 * belongs to the file description, which the client shares, so setting it
 * here would make the client's blocking read() fail with EAGAIN (libvfio-user's
 * samples/client reads its INTx eventfd that way); and a write to an eventfd
 * cannot block short of overflowing its counter. Any other kind of fd is made
 * non-blocking, so that signalling it can never stall the event loop.
 */
function irqEventFd(fd: Fd): EventFd {
  let target = '';
  try {
    target = readlinkSync(`/proc/self/fd/${fd.value}`);
  } catch {
    // unknown: treat as not an eventfd
  }
  return target === 'anon_inode:[eventfd]' ? new EventFd(fd) : EventFd.from(fd);
}

export class Session {
  readonly conn: Connection;
  readonly runtime: DeviceRuntime;
  #twin: Connection | null = null;
  #client: ParsedCapabilities | null = null;
  readonly #options: SessionOptions;
  readonly dma: DmaMapTable<DmaHandle>;
  readonly irqs: IrqState;
  readonly ctx: DeviceContext;
  #versionTimer: NodeJS.Timeout;
  /** SharedMemory.sigbusContained when this session last found none of its windows faulted. */
  #sigbusSeen = SharedMemory.sigbusContained;

  constructor(socket: UnixSocket, runtime: DeviceRuntime, options: SessionOptions) {
    this.runtime = runtime;
    this.#options = options;
    const limits = this.#limits();
    this.conn = new Connection(socket, {
      limits,
      onRequest: (msg, fds) => {
        const reply = this.#handle(msg, fds);
        this.memoryFaulted(); // the request touched a window the client truncated: end the session
        return reply;
      },
      // Until VERSION has succeeded, any bad message ends the connection (after its error reply).
      onBadRequest: () => {
        if (!this.#client) process.nextTick(() => this.conn.socket.end());
      },
      timeoutMs: options.timeoutMs,
      ...(options.trace ? { trace: (dir, h, detail) => options.trace!(traceLine(dir, h, detail)) } : {}),
    });
    this.dma = new DmaMapTable<DmaHandle>({
      pageSize: PAGE,
      errnoStyle: 'spec',
      // Identical re-map (same iova, size, offset, prot): the same file, or both without fd.
      sameHandle: (a, b) => (a as DmaHandle).file === (b as DmaHandle).file,
    });
    this.dma.onUnmap((region) => this.#unmapped(region));
    this.irqs = new IrqState(runtime.irqConfig);
    this.ctx = this.#context();
    this.conn.on('close', () => this.#teardown());
    // A client that never negotiates does not hold the device.
    this.#versionTimer = setTimeout(() => {
      if (!this.#client) {
        options.log('no VERSION in time: closing');
        this.conn.close();
      }
    }, options.versionTimeoutMs ?? 10_000);
    this.#versionTimer.unref();
    this.conn.on('error', (err) => options.log(`device error: ${err.message}`));
  }

  get versioned(): boolean {
    return this.#client !== null;
  }

  close(): void {
    this.conn.close();
  }

  /**
   * Whether the client truncated the memfd of a DMA window we mapped and an access faulted
   * (SIGBUS contained by src/sys/shm.ts: that window now holds zero pages, not guest memory).
   * If so the session is closed, with a log line; true then. Checked after each request and by
   * devices after work outside a request (ctx.dma.faulted()). Cheap when nothing faulted
   * anywhere: one read of the process's contained-fault counter.
   */
  memoryFaulted(): boolean {
    if (this.conn.closed) return true;
    const n = SharedMemory.sigbusContained;
    if (n === this.#sigbusSeen) return false;
    if (!this.dma.regions().some((r) => r.handle.shm?.faulted === true)) {
      this.#sigbusSeen = n; // another session's fault
      return false;
    }
    this.#options.log('the client truncated a DMA window\'s memory under our mapping (SIGBUS contained): session closed');
    this.conn.close();
    return true;
  }

  #limits(): CodecLimits {
    return codecLimits(this.#options.maxDataXferSize);
  }

  /** The client went away: unmap DMA, close irq fds; the device state stays. Every step runs, whatever throws. */
  #teardown(): void {
    clearTimeout(this.#versionTimer);
    const steps = [
      () => this.dma.unmapAll(),
      () => this.irqs.closeAll(),
      () => this.#twin?.close(),
      () => {
        if (this.#client) this.runtime.spec.detach?.();
      },
    ];
    for (const step of steps) {
      try {
        step();
      } catch (err) {
        this.#options.log(`teardown: ${(err as Error).message}`);
      }
    }
  }

  #handle(msg: RequestMessage, fds: Fd[]): HandlerReply | Promise<HandlerReply> {
    if (!this.#client && msg.command !== Command.VERSION) {
      process.nextTick(() => this.conn.socket.end());
      throw einval('NOT_NEGOTIATED', `${Command[msg.command]} before VERSION`);
    }
    switch (msg.command) {
      case Command.VERSION:
        return this.#version(msg.body, fds);
      case Command.DMA_MAP:
        return this.#dmaMap(msg.body, fds);
      case Command.DMA_UNMAP:
        return this.#dmaUnmap(msg.body);
      case Command.DEVICE_GET_INFO:
        return {
          body: {
            argsz: 16,
            flags: DeviceInfoFlag.RESET | DeviceInfoFlag.PCI,
            numRegions: this.runtime.numRegions,
            numIrqs: PCI_NUM_IRQS,
          },
        };
      case Command.DEVICE_GET_REGION_INFO:
        return this.#regionInfo(msg.body.argsz, msg.body.index);
      case Command.DEVICE_GET_REGION_IO_FDS:
        return this.#regionIoFds(msg.body.argsz, msg.body.index);
      case Command.DEVICE_GET_IRQ_INFO: {
        const { index } = msg.body;
        if (index >= PCI_NUM_IRQS) throw einval('IRQ_INDEX', `irq index ${index} >= ${PCI_NUM_IRQS}`);
        const c = this.runtime.irqConfig[index]!;
        return { body: { argsz: 16, flags: c.count > 0 ? c.flags : IrqInfoFlag.EVENTFD, index, count: c.count } };
      }
      case Command.DEVICE_SET_IRQS:
        return this.#setIrqs(msg.body, fds);
      case Command.REGION_READ: {
        const { offset, region, count } = msg.body;
        const data = new Uint8Array(count);
        this.runtime.read(region, offset, data);
        return { body: { offset, region, count, data } };
      }
      case Command.REGION_WRITE: {
        const { offset, region, count, data } = msg.body;
        this.runtime.write(region, offset, data);
        return { body: { offset, region, count } };
      }
      case Command.REGION_WRITE_MULTI: {
        for (const w of msg.body.writes) this.runtime.write(w.region, w.offset, w.data);
        return { body: { wrCnt: msg.body.writes.length } };
      }
      case Command.DEVICE_RESET:
        return this.runtime.reset().then(() => undefined);
      case Command.DEVICE_FEATURE:
        return this.#feature(msg.body);
      case Command.MIG_DATA_READ: {
        const max = this.#client!.maxDataXferSize;
        if (msg.body.size > max) throw einval('MIG_DATA_SIZE', `size ${msg.body.size} > max_data_xfer_size ${max}`);
        const asked = Math.min(msg.body.size, msg.body.argsz - 8);
        const data = this.runtime.readMigrationData(asked);
        if (this.runtime.spec.migration?.padReads && data.length < asked) {
          // libvfio-user's reply: `asked` data bytes, zeros after the `size` that are data.
          const raw = new Uint8Array(8 + asked);
          const v = new DataView(raw.buffer);
          v.setUint32(0, 8 + data.length, true);
          v.setUint32(4, data.length, true);
          raw.set(data, 8);
          return { raw };
        }
        return { body: { argsz: 8 + data.length, size: data.length, data } };
      }
      case Command.MIG_DATA_WRITE:
        this.runtime.writeMigrationData(msg.body.data);
        return;
      case Command.DMA_READ:
      case Command.DMA_WRITE:
        throw einval('WRONG_DIRECTION', `${Command[msg.command]} goes from server to client`);
    }
  }

  // --- VERSION ---

  #version(body: { major: number; minor: number; json?: string }, fds: Fd[]): HandlerReply {
    try {
      if (this.#client) throw einval('VERSION_AGAIN', 'VERSION already negotiated');
      if (fds.length > 0) throw einval('VERSION_FDS', 'VERSION carries no fds');
      const version = negotiateVersion(body, { major: VFIO_USER_MAJOR, minor: VFIO_USER_MINOR });
      const client = parseCapabilities(body.json);
      if (client.unknownKeys.length > 0) this.#options.log(`client capabilities ignored: ${client.unknownKeys.join(', ')}`);
      const mig = this.runtime.migration ? { pgsize: PAGE } : undefined;
      if (client.migration && mig && client.migration.pgsize !== PAGE) {
        throw einval('VERSION_PGSIZE', `migration pgsize ${client.migration.pgsize}: the server's is ${PAGE}`);
      }
      const replyFds: Fd[] = [];
      let twinSocket: { supported: boolean; fdIndex?: number } | undefined;
      if (client.twinSocket?.supported) {
        const [ours, theirs] = socketPairFds();
        this.#twin = new Connection(new UnixSocket(ours), {
          limits: this.#limits(),
          timeoutMs: this.#options.timeoutMs,
          onRequest: () => {
            throw einval('TWIN_COMMAND', 'the twin socket carries only DMA replies to the server');
          },
          ...(this.#options.trace ? { trace: (dir, h, detail) => this.#options.trace!(`[twin] ${traceLine(dir, h, detail)}`) } : {}),
        });
        replyFds.push(theirs);
        twinSocket = { supported: true, fdIndex: 0 };
      }
      const json = buildCapabilitiesJson({
        maxMsgFds: this.#options.maxMsgFds,
        maxDataXferSize: this.#options.maxDataXferSize,
        maxDmaMaps: 65535,
        pgsizes: BigInt(PAGE),
        writeMultiple: true,
        ...(mig ? { migration: mig } : {}),
        ...(twinSocket ? { twinSocket } : {}),
      });
      try {
        this.runtime.spec.attach?.(this.ctx);
      } catch (err) {
        replyFds.forEach((f) => f.close());
        throw err;
      }
      this.#client = client;
      // The reply's fds are ours to close once sent: the socket duplicates what it queues.
      process.nextTick(() => replyFds.forEach((f) => f.close()));
      return { body: { major: version.major, minor: version.minor, json }, fds: replyFds };
    } catch (err) {
      // A failed negotiation ends the connection after the error reply.
      process.nextTick(() => this.conn.socket.end());
      throw err;
    }
  }

  // --- DMA ---

  #dmaMap(body: { flags: number; offset: number; address: number; size: number }, fds: Fd[]): HandlerReply {
    if (fds.length > 1) throw einval('DMA_MAP_FDS', `${fds.length} fds; at most one`);
    const wantsFd = body.flags & (DmaMapFlags.MMAP | DmaMapFlags.FILE_IO);
    if (wantsFd && fds.length === 0) throw einval('DMA_MAP_NO_FD', 'MMAP/FILE_IO flag without an fd');
    const prot = body.flags & (DmaMapFlag.READ | DmaMapFlag.WRITE);
    let shm: SharedMemory | null = null;
    let file: string | null = null;
    if (fds.length === 1) {
      const fd = takeFd(fds[0]!);
      try {
        const st = fstatSync(fd.value);
        file = `${st.dev}:${st.ino}`;
      } catch (err) {
        fd.close();
        throw einval('DMA_MAP_BAD_FD', `fstat of the window's fd: ${(err as Error).message}`);
      }
      try {
        shm = SharedMemory.map(fd, { offset: body.offset, size: body.size, readOnly: !(prot & DmaMapFlag.WRITE) });
      } catch (err) {
        fd.close();
        // QEMU sends fds it cannot map either (e.g. ROM ranges): fall back to messages.
        this.#options.log(`DMA window 0x${body.address.toString(16)}: fd not mappable (${(err as Error).message}); using messages`);
        shm = null;
      }
    }
    let result;
    try {
      result = this.dma.map({ iova: body.address, size: body.size, prot, offset: body.offset, handle: { shm, pins: 0, closeWhenUnpinned: false, file } });
    } catch (err) {
      shm?.close();
      throw err;
    }
    if (!result.added) {
      shm?.close(); // identical re-map: keep the first mapping
      return;
    }
    this.runtime.spec.dmaMapped?.(windowOf(result.region));
  }

  #unmapped(region: DmaRegion<DmaHandle>): void {
    try {
      this.runtime.spec.dmaUnmapped?.(windowOf(region));
    } finally {
      if (region.handle.pins > 0) region.handle.closeWhenUnpinned = true;
      else {
        region.handle.shm?.close(); // every view into it becomes empty
        // The device's hook may have dropped the last pin itself (nothing in flight): the DMA_UNMAP waiting on it goes.
        region.handle.onUnpinned?.();
      }
    }
  }

  #dmaUnmap(body: {
    argsz: number;
    flags: number;
    address: number;
    size: number;
    bitmap?: { pgsize: number; size: number };
  }): HandlerReply | Promise<HandlerReply> {
    let bitmap: { pgsize: number; size: number; data: Uint8Array } | undefined;
    if (body.flags & DmaUnmapFlag.GET_DIRTY_BITMAP && body.bitmap) {
      const region = this.dma.find(body.address);
      if (!region || region.iova !== body.address || region.size !== body.size) {
        throw new VfioError('DMA_UNMAP_UNKNOWN', VErrno.ENOENT, 'no mapping matches the range');
      }
      // Without logging there is nothing to report (all-clean would lose dirty pages).
      if (this.dma.loggingPageSize === 0) throw einval('DMA_LOGGING_OFF', 'GET_DIRTY_BITMAP needs DMA logging started');
      const data = this.dma.report(body.address, body.size, body.bitmap.pgsize);
      if (data.length > body.bitmap.size) throw einval('DMA_UNMAP_BITMAP', `bitmap needs ${data.length} bytes`);
      bitmap = { pgsize: body.bitmap.pgsize, size: data.length, data };
    }
    // A window a transfer is still sending from (DMA_WRITEs that are views of it, queued on a
    // socket) is answered once that transfer has stopped: after the reply, it is not read again.
    const affected = body.flags & DmaUnmapFlag.ALL ? this.dma.regions() : [this.dma.find(body.address)];
    const waits: Promise<void>[] = [];
    for (const r of affected) {
      if (r && r.handle.pins > 0) waits.push(new Promise<void>((resolve) => (r.handle.onUnpinned = resolve)));
    }
    this.dma.unmap(body.address, body.size, body.flags & DmaUnmapFlag.ALL);
    const reply = { body: { argsz: body.argsz, flags: body.flags, address: body.address, size: body.size, ...(bitmap ? { bitmap } : {}) } };
    return waits.length === 0 ? reply : Promise.all(waits).then(() => reply);
  }

  // --- info ---

  #regionInfo(argsz: number, index: number): HandlerReply {
    if (index >= this.runtime.numRegions) throw einval('REGION_INDEX', `region index ${index} >= ${this.runtime.numRegions}`);
    const r = this.runtime.regions.get(index);
    if (!r) {
      const reply = composeRegionInfoReply(argsz, { index, flags: 0, size: 0, offset: 0 });
      return { raw: reply.bytes };
    }
    const builder = new InfoCapChainBuilder();
    if (r.mmapAreas.length > 0) builder.sparseMmap(r.mmapAreas);
    if (r.spec?.type) builder.type(r.spec.type.type, r.spec.type.subtype);
    const memory = r.spec?.memory;
    const reply = composeRegionInfoReply(
      argsz,
      { index, flags: r.flags, size: r.size, offset: memory ? memory.offset : 0 },
      builder.count > 0 ? builder : undefined,
    );
    const fds = reply.capsIncluded && memory && r.mmapAreas.length > 0 ? [memory.fd] : undefined;
    return { raw: reply.bytes, ...(fds ? { fds } : {}) };
  }

  #regionIoFds(argsz: number, index: number): HandlerReply {
    if (index >= this.runtime.numRegions) throw einval('REGION_INDEX', `region index ${index} >= ${this.runtime.numRegions}`);
    const list = this.runtime.regions.get(index)?.spec?.ioEventFds ?? [];
    const needed = 16 + list.length * 40;
    const fit = argsz >= needed;
    if (fit && list.length > this.#client!.maxMsgFds) {
      throw new VfioError('IO_FDS_TOO_MANY', VErrno.E2BIG, `${list.length} fds exceed the client's max_msg_fds`);
    }
    const entries = fit
      ? list.map((e, i) => ({
          offset: e.offset,
          size: e.size,
          fdIndex: i,
          type: IoFdType.IOEVENTFD,
          flags: e.datamatch !== undefined ? 1 : 0, // KVM_IOEVENTFD_FLAG_DATAMATCH
          datamatch: e.datamatch ?? 0n,
        }))
      : [];
    return {
      body: { argsz: needed, flags: 0, index, count: list.length, entries },
      ...(fit && list.length > 0 ? { fds: list.map((e) => e.eventfd.fd) } : {}),
    };
  }

  // --- interrupts ---

  #setIrqs(body: { argsz: number; flags: number; index: number; start: number; count: number; data: Uint8Array }, fds: Fd[]): HandlerReply {
    const payload = new Uint8Array(20 + body.data.length);
    payload.set(body.data, 20);
    const op = validateSetIrqs(body, this.irqs.counts, payload, fds.length, { pci: true });
    const eventfds = op.kind === 'eventfd' && op.assign ? fds.map((f) => irqEventFd(takeFd(f))) : [];
    this.irqs.apply(op, eventfds);
    const notify = this.runtime.spec.irqMasked;
    if (notify && op.kind !== 'disable' && op.action !== 'trigger') {
      const name = (Object.keys(IRQ_NAMES) as IrqName[]).find((n) => IRQ_NAMES[n] === op.index)!;
      for (let v = op.start; v < op.start + op.count; v++) {
        if (op.kind === 'bool' && !op.bools[v - op.start]) continue;
        notify(name, v, op.action === 'mask');
      }
    }
  }

  // --- DEVICE_FEATURE ---

  async #feature(body: { argsz: number; flags: number; data: Uint8Array }): Promise<HandlerReply> {
    const feature = body.flags & FeatureFlags.MASK;
    const ops = body.flags & (FeatureFlags.GET | FeatureFlags.SET | FeatureFlags.PROBE);
    const get = (ops & FeatureFlags.GET) !== 0;
    const set = (ops & FeatureFlags.SET) !== 0;
    const probe = (ops & FeatureFlags.PROBE) !== 0;
    if (ops === 0 || (get && set)) throw einval('FEATURE_OPS', `feature flags 0x${body.flags.toString(16)}`);
    const mig = this.runtime.migration;
    const allowed = (g: boolean, s: boolean): void => {
      if ((get && !g) || (set && !s)) throw einval('FEATURE_OP', `operation not supported on feature ${feature}`);
    };
    const echo = (): HandlerReply => ({ body: { argsz: body.argsz, flags: body.flags, data: body.data } });
    const reply = (data: Uint8Array): HandlerReply => {
      if (body.argsz < 8 + data.length) throw einval('FEATURE_ARGSZ', `argsz ${body.argsz} < ${8 + data.length}`);
      return { body: { argsz: 8 + data.length, flags: body.flags, data } };
    };
    switch (feature) {
      case DeviceFeature.MIGRATION: {
        if (!mig) throw einval('NO_MIGRATION', 'the device does not migrate');
        allowed(true, false);
        if (probe) return echo();
        return reply(encodeFeatureMigration({ flags: BigInt(mig.flags) }));
      }
      case DeviceFeature.MIG_DEVICE_STATE: {
        if (!mig) throw einval('NO_MIGRATION', 'the device does not migrate');
        allowed(true, true);
        if (probe) return echo();
        if (get) return reply(encodeFeatureMigState({ deviceState: mig.state, dataFd: -1 }));
        if (body.data.length < 8) throw einval('FEATURE_DATA', 'MIG_DEVICE_STATE needs 8 bytes');
        const target = new DataView(body.data.buffer, body.data.byteOffset, 8).getUint32(0, true);
        await mig.setState(target);
        return echo();
      }
      case DeviceFeature.DMA_LOGGING_START:
      case DeviceFeature.DMA_LOGGING_STOP: {
        allowed(false, true);
        const ctl = decodeDmaLoggingControl(body.data);
        if (probe) return echo();
        if (feature === DeviceFeature.DMA_LOGGING_START) {
          // The bitmaps of every window must stay within a sane bound (a peer can map huge windows without memory).
          let bytes = 0;
          for (const r of this.dma.regions()) bytes += Math.ceil(r.size / ctl.pageSize / 8);
          if (bytes > MAX_LOG_BITMAP_BYTES) throw new VfioError('DMA_LOGGING_TOO_BIG', VErrno.ENOMEM, `dirty bitmaps would take ${bytes} bytes`);
          this.dma.startLogging(ctl.pageSize);
        }
        else this.dma.stopLogging();
        return echo();
      }
      case DeviceFeature.DMA_LOGGING_REPORT: {
        allowed(true, false);
        const req = decodeDmaLoggingReportRequest(body.data);
        if (probe) return echo();
        if (this.dma.loggingPageSize === 0) throw einval('DMA_LOGGING_OFF', 'DMA logging is not started');
        const bitmap = this.dma.report(req.iova, req.length, req.pageSize);
        const head = encodeDmaLoggingReportRequest(req);
        const data = new Uint8Array(head.length + bitmap.length);
        data.set(head);
        data.set(bitmap, head.length);
        return reply(data);
      }
      default:
        throw einval('FEATURE_UNKNOWN', `feature ${feature} is not supported`);
    }
  }

  // --- what the device sees ---

  #context(): DeviceContext {
    const session = this;
    const dma: DmaAccess = {
      read: (iova, length, options) => session.#dmaRead(iova, length, undefined, options?.messages ?? false),
      readInto: async (iova, dest, options) => {
        await session.#dmaRead(iova, dest.length, dest, options?.messages ?? false);
      },
      write: (iova, data, options) => session.#dmaWrite(iova, data, options?.messages ?? false),
      view(iova, length, options) {
        const prot = options?.write ? DmaMapFlag.WRITE : DmaMapFlag.READ;
        let seg;
        try {
          seg = session.dma.translate(iova, length, prot);
        } catch {
          return null;
        }
        const shm = seg.region.handle.shm;
        if (!shm) return null;
        if (options?.write) session.dma.markDirty(iova, length);
        return shm.subarray(seg.regionOffset, length);
      },
      markDirty: (iova, length) => session.dma.markDirty(iova, length),
      hold(iova, length) {
        const held = [...new Set(session.dma.lookup(iova, length).map((s) => s.region))].filter((r) => r.handle.shm !== null);
        for (const r of held) r.handle.pins++;
        let released = false;
        return () => {
          if (released) return;
          released = true;
          for (const r of held) session.#unpin(r);
        };
      },
      windows: () => session.dma.regions().map(windowOf),
      faulted: () => session.memoryFaulted(),
    };
    return {
      trigger(irq, vector = 0) {
        const index = IRQ_NAMES[irq];
        if (index === undefined) throw new RangeError(`unknown irq ${String(irq)}`);
        session.irqs.trigger(index, vector);
      },
      dma,
      log: (line) => session.#options.log(line),
    };
  }

  /** The socket server-to-client requests travel on: the twin socket when negotiated. */
  get #dmaConn(): Connection {
    return this.#twin ?? this.conn;
  }

  #chunk(): number {
    return Math.min(this.#client?.maxDataXferSize ?? 1 << 20, this.#options.maxDataXferSize);
  }

  /**
   * A message-based transfer awaits between chunks: the client may unmap the
   * window meanwhile, and after DMA_UNMAP the server must not touch it again.
   */
  #stillMapped(region: DmaRegion<DmaHandle>): void {
    if (this.dma.find(region.iova) !== region) {
      throw new VfioError('DMA_UNMAPPED', VErrno.ENOENT, `DMA window 0x${region.iova.toString(16)} was unmapped during the transfer`);
    }
  }

  /** One DMA_READ of a message-window range, its data received into `into` when given; the data, checked. */
  async #dmaReadMessage(region: DmaRegion<DmaHandle>, address: number, count: number, into?: Uint8Array): Promise<Uint8Array> {
    this.#stillMapped(region);
    const r = await this.#dmaConn.request(Command.DMA_READ, { address, count }, into ? { into } : {});
    if (r.body.count !== count || r.body.data.length !== count || r.body.address !== address) {
      throw new VfioError('DMA_READ_REPLY', VErrno.EIO, 'DMA_READ reply does not match the request');
    }
    if (into && r.body.data !== into) into.set(r.body.data); // a small reply arrives whole, not placed
    return r.body.data;
  }

  /**
   * Reads [iova, iova + length) into `into` (or a new buffer). Message windows
   * are read in chunks of the negotiated transfer size, several requests in
   * flight (the client serves them in order), each reply received straight
   * into its place in the destination. With `messages`, mapped windows are
   * read by messages too.
   */
  async #dmaRead(iova: number, length: number, into?: Uint8Array, messages = false): Promise<Uint8Array> {
    const segs = this.dma.lookup(iova, length, DmaMapFlag.READ);
    const only = segs.length === 1 ? segs[0]! : null;
    if (!into && only && (messages || !only.region.handle.shm) && length <= this.#chunk()) {
      // One message: its data (a buffer of its own) is the result, no copy.
      return this.#dmaReadMessage(only.region, iova, length);
    }
    const out = into ?? Buffer.allocUnsafe(length); // every byte is written below
    const chunk = this.#chunk();
    const chunks: DmaChunk[] = [];
    const regions: DmaRegion<DmaHandle>[] = [];
    for (const seg of segs) {
      const at = seg.iova - iova;
      const shm = messages ? null : seg.region.handle.shm;
      if (shm) {
        out.set(shm.subarray(seg.regionOffset, seg.length), at);
        continue;
      }
      for (let done = 0; done < seg.length; done += chunk) {
        const count = Math.min(chunk, seg.length - done);
        chunks.push({ address: seg.iova + done, bytes: out.subarray(at + done, at + done + count) });
        regions.push(seg.region);
      }
    }
    await runDmaTransfer(this.#dmaConn, Command.DMA_READ, chunks, chunk, (i) => this.#stillMapped(regions[i]!));
    return out;
  }

  async #dmaWrite(iova: number, data: Uint8Array, messages = false): Promise<void> {
    const segs = this.dma.lookup(iova, data.length, DmaMapFlag.WRITE);
    const chunk = this.#chunk();
    const chunks: DmaChunk[] = [];
    const regions: DmaRegion<DmaHandle>[] = [];
    const pinned: DmaRegion<DmaHandle>[] = [];
    for (const seg of segs) {
      const src = data.subarray(seg.iova - iova, seg.iova - iova + seg.length);
      const shm = messages ? null : seg.region.handle.shm;
      if (shm) {
        shm.subarray(seg.regionOffset, seg.length).set(src);
        continue;
      }
      for (let done = 0; done < seg.length; done += chunk) {
        chunks.push({ address: seg.iova + done, bytes: src.subarray(done, Math.min(done + chunk, seg.length)) });
        regions.push(seg.region);
      }
    }
    const beforeSend = (i: number): void => {
      this.#stillMapped(regions[i]!);
      // The source, if it is a mapped window, too: after DMA_UNMAP it is not read again.
      for (const r of pinned) this.#stillMapped(r);
    };
    // Messages queued on the socket may be views of `data`: if it is a view of a
    // mapped window, that mapping stays until they are sent (see DmaHandle.pins).
    pinned.push(...(chunks.length > 0 ? this.dma.regions().filter((r) => r.handle.shm?.contains(data)) : []));
    for (const r of pinned) r.handle.pins++;
    try {
      // Data in a window the client shared by fd is the client's own memory: spliced, not copied.
      await runDmaTransfer(this.#dmaConn, Command.DMA_WRITE, chunks, chunk, beforeSend, pinned.length > 0);
    } finally {
      // What reached the client may be part of it: all of it counts as dirty.
      for (const seg of segs) this.dma.markDirty(seg.iova, seg.length);
      for (const r of pinned) this.#unpin(r);
    }
  }

  /** Drops one pin of a window; the last one closes a window unmapped meanwhile and answers its DMA_UNMAP. */
  #unpin(r: DmaRegion<DmaHandle>): void {
    if (--r.handle.pins === 0 && r.handle.closeWhenUnpinned) {
      r.handle.shm?.close();
      r.handle.onUnpinned?.();
    }
  }
}

function windowOf(r: DmaRegion<DmaHandle>): DmaWindow {
  return {
    iova: r.iova,
    size: r.size,
    readable: (r.prot & DmaMapFlag.READ) !== 0,
    writable: (r.prot & DmaMapFlag.WRITE) !== 0,
    mapped: r.handle.shm !== null,
  };
}

function traceLine(dir: 'in' | 'out', h: { msgId: number; cmd: number; msgSize: number; flags: number; errorNo: number }, detail: unknown): string {
  const kind = h.flags & 0x20 ? `ERROR ${h.errorNo}` : (h.flags & 0xf) === 1 ? 'reply' : h.flags & 0x10 ? 'command, no reply' : 'command';
  let text = '';
  if (detail !== undefined) {
    text = ' ' + JSON.stringify(detail, (_k, v: unknown) =>
      typeof v === 'bigint' ? `0x${v.toString(16)}` : v instanceof Uint8Array ? `<${v.length} bytes>` : v,
    );
  }
  return `${dir === 'in' ? '<-' : '->'} #${h.msgId} ${Command[h.cmd] ?? `cmd ${h.cmd}`} (${kind}, ${h.msgSize} bytes)${text}`;
}

