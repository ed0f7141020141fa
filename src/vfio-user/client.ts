/**
 * The vfio-user client connection (QEMU's hw/vfio-user/proxy.c, in
 * TypeScript): version and capability negotiation with the server's reply
 * validated, requests by id with timeouts, the three send modes, posted
 * writes and REGION_WRITE_MULTI coalescing, the twin socket, and the
 * server's DMA_READ / DMA_WRITE requests served from the client's memory.
 *
 * Send modes, as in the seed:
 * - wait: `request()` sends and resolves with the reply;
 * - nowait: `requestNoWait()` sends and tracks the reply; `waitAll()`
 *   settles every one sent so far (DMA map/unmap batches);
 * - async: `post()` sends with No_reply and forgets it (posted writes).
 */
import { EventEmitter } from 'node:events';
import { connectUnix, UnixSocket, type Fd, type SharedMemory } from '../sys/index.js';
import { DmaMapTable } from '../vfio/dma.js';
import { VfioError, Errno as VErrno } from '../vfio/errors.js';
import { DmaMapFlag } from '../vfio/uapi.js';
import { Command, HEADER_SIZE, HeaderFlags, MessageType, DEFAULT_MAX_DATA_XFER_SIZE, QEMU_MAX_MSG_FDS, VFIO_USER_MAJOR, VFIO_USER_MINOR, WRITE_MULTI_DATA, QEMU_WRITE_MULTI_MAX } from './constants.js';
import { buildCapabilitiesJson, checkVersionReply, validateServerCapabilities, type Capabilities } from './caps.js';
import { codecLimits, type CodecCommand, type RequestBodies, type RegionAccessData } from './messages.js';
import { Connection, ConnectionError, PLACE_PREFIX, type HandlerReply, type ReplyWithFds } from './connection.js';
import { putU32, readU64 } from './dma-transfer.js';

export interface VfioUserClientOptions {
  /** Reply timeout, ms (default 5000, QEMU's x-msg-timeout). */
  timeoutMs?: number;
  /** The largest count we accept in DMA_READ/DMA_WRITE from the server (default 1 MiB). */
  maxDataXferSize?: number;
  /** The most fds we accept in one message (default 16). */
  maxMsgFds?: number;
  /** Ask for a twin socket for server-to-client requests (default false). */
  twinSocket?: boolean;
  /** Send REGION_WRITEs posted (No_reply) where allowed (default true). */
  postedWrites?: boolean;
  /** Coalesce small posted writes into REGION_WRITE_MULTI when the server accepts it (default true). */
  writeMultiple?: boolean;
  /** Page size of our DMA windows (default 4096). */
  pageSize?: number;
  log?: (line: string) => void;
}

/** The memory behind one DMA window: the client's own, so it can serve the server's DMA requests. */
interface Window {
  memory: SharedMemory;
  /** Offset of the window in `memory`. */
  offset: number;
  /** false when the memory's fd did not go to the server: every write to the window is then a DMA_WRITE we serve. */
  passFd?: boolean;
}

export interface DmaMapOptions {
  iova: number;
  size: number;
  /** The client memory the window shows. */
  memory: SharedMemory;
  /** Offset in `memory` (and in its fd) of the window's first byte (default 0). */
  offset?: number;
  /** DmaMapFlag READ | WRITE (default both). */
  prot?: number;
  /** Pass the memory's fd so the server maps it (default true); false makes DMA go through messages. */
  passFd?: boolean;
}

type ClientEvents = { close: [err: Error | undefined]; error: [err: Error] };

type ResolvedOptions = Required<Omit<VfioUserClientOptions, 'log'>> & { log: (line: string) => void };

export class VfioUserClient extends EventEmitter<ClientEvents> {
  readonly conn: Connection;
  readonly version: { major: number; minor: number };
  readonly serverCaps: Capabilities;
  readonly #twin: Connection | null;
  readonly #options: ResolvedOptions;
  /**
   * Our DMA windows. Its dirty log (started and stopped with the device's DMA
   * logging, VfioUserDevice.startDmaLogging) records the DMA_WRITEs we serve:
   * the server cannot log writes it asks us to make.
   */
  readonly dma: DmaMapTable<Window>;
  #posted: boolean;
  #nowait: Promise<unknown>[] = [];
  #multi: RegionAccessData[] | null = null;
  #multiScheduled = false;
  #closing = false;
  /** Per connection, the DMA_WRITE being received into one of our windows (at most one each). */
  readonly #placing = new Map<Connection, { target: Uint8Array; address: number; count: number }>();

  private constructor(
    conn: Connection,
    twin: Connection | null,
    version: { major: number; minor: number },
    caps: Capabilities,
    options: ResolvedOptions,
  ) {
    super();
    this.conn = conn;
    this.#twin = twin;
    this.version = version;
    this.serverCaps = caps;
    this.#options = options;
    this.#posted = options.postedWrites;
    this.dma = new DmaMapTable<Window>({ pageSize: options.pageSize, maxMaps: caps.maxDmaMaps });
    conn.on('close', (err) => {
      this.#twin?.close();
      this.emit('close', err);
    });
    // Without its twin the server cannot do DMA: the client goes down with it.
    twin?.on('close', (err) => {
      if (!this.#closing) this.conn.close(err ?? new ConnectionError('VFU_CLOSED', 'the twin socket closed'));
    });
    this.dma.onUnmap((r) => {
      // A DMA_WRITE still streaming into the window stops landing there (with a twin socket the
      // DMA_UNMAP reply can overtake it), and replies still queued that are views of our memory
      // are copied: after dmaUnmap() resolves the memory is the application's again.
      for (const [c, p] of this.#placing) {
        if (p.address < r.iova + r.size && r.iova < p.address + p.count) {
          c.dropPlacement(p.target);
          this.#placing.delete(c);
        }
      }
      this.#snapshotReplies();
    });
  }

  /** Connects to a server at `path` and negotiates the version. */
  static async connect(path: string, options: VfioUserClientOptions = {}): Promise<VfioUserClient> {
    return VfioUserClient.over(await connectUnix(path), options);
  }

  /** Negotiates over an already connected socket (e.g. one end of a socketpair). */
  static async over(socket: UnixSocket, options: VfioUserClientOptions = {}): Promise<VfioUserClient> {
    const opts: ResolvedOptions = {
      timeoutMs: options.timeoutMs ?? 5000,
      maxDataXferSize: options.maxDataXferSize ?? DEFAULT_MAX_DATA_XFER_SIZE,
      maxMsgFds: options.maxMsgFds ?? QEMU_MAX_MSG_FDS,
      twinSocket: options.twinSocket ?? false,
      postedWrites: options.postedWrites ?? true,
      writeMultiple: options.writeMultiple ?? true,
      pageSize: options.pageSize ?? 4096,
      log: options.log ?? (() => {}),
    };
    let client: VfioUserClient | null = null;
    const onRequest = (msg: Parameters<ConstructorParameters<typeof Connection>[1]['onRequest']>[0]): HandlerReply => {
      if (!client) throw new VfioError('NOT_READY', VErrno.EINVAL, 'request before VERSION completed');
      return client.#serve(msg);
    };
    // A large DMA_WRITE's data is received straight into our memory when it lies in one window.
    const placeOn =
      (which: () => Connection | null) =>
      (prefix: Uint8Array, size: number): Uint8Array | null => {
        const c = which();
        return client && c ? client.#placeDmaWrite(prefix, size, c) : null;
      };
    const limits = codecLimits(opts.maxDataXferSize);
    // DMA_READ / DMA_WRITE within one window are answered without decoding them into messages.
    const fastRequest = (frame: Uint8Array, placed: Uint8Array | undefined): Uint8Array[] | null =>
      client ? client.#fastServe(frame, placed) : null;
    const conn: Connection = new Connection(socket, {
      limits,
      timeoutMs: opts.timeoutMs,
      onRequest,
      placeRequest: placeOn(() => conn),
      fastRequest,
    });
    const proposed = { major: VFIO_USER_MAJOR, minor: VFIO_USER_MINOR };
    const json = buildCapabilitiesJson({
      maxMsgFds: opts.maxMsgFds,
      maxDataXferSize: opts.maxDataXferSize,
      pgsizes: BigInt(opts.pageSize),
      maxDmaMaps: 65535,
      migration: { pgsize: opts.pageSize, maxBitmapSize: 256 << 20 },
      writeMultiple: true,
      ...(opts.twinSocket ? { twinSocket: { supported: true } } : {}),
    });
    let reply: ReplyWithFds<Command.VERSION>;
    try {
      reply = await conn.request(Command.VERSION, { ...proposed, json });
    } catch (err) {
      conn.close();
      throw err;
    }
    let twin: Connection | null = null;
    try {
      checkVersionReply(proposed, reply.body);
      const caps = validateServerCapabilities(reply.body.json, { proposedTwinSocket: opts.twinSocket, fdCount: reply.fds.length });
      if (caps.twinSocket?.supported) {
        const fd = reply.fds[caps.twinSocket.fdIndex ?? 0]!;
        const twinSock = new UnixSocket(fd.dup());
        const twinConn: Connection = new Connection(twinSock, {
          limits,
          timeoutMs: opts.timeoutMs,
          onRequest,
          placeRequest: placeOn(() => twinConn),
          fastRequest,
        });
        twin = twinConn;
      }
      for (const f of reply.fds) f.close();
      client = new VfioUserClient(conn, twin, reply.body, caps, opts);
      return client;
    } catch (err) {
      for (const f of reply.fds) f.close();
      twin?.close();
      conn.close();
      throw err;
    }
  }

  get closed(): boolean {
    return this.conn.closed;
  }

  /** True while REGION_WRITEs may be posted. */
  get postedWrites(): boolean {
    return this.#posted;
  }

  /** Turns posted writes off for good (done once any region is mmap'd: a read through the mapping could pass a posted write). */
  disablePostedWrites(): void {
    this.#posted = false;
  }

  /** The largest region access to send: the server's max_data_xfer_size, and no more than we accept in a reply. */
  get maxXfer(): number {
    return Math.min(this.serverCaps.maxDataXferSize, this.#options.maxDataXferSize);
  }

  // --- send modes ---

  /**
   * wait mode: sends a command and resolves with its reply. A reply that
   * carries fds is an error unless `takeFds` says the command expects them
   * (then the caller owns them); unexpected fds are closed.
   */
  async request<C extends CodecCommand>(
    command: C,
    body: RequestBodies[C],
    options: { fds?: readonly (Fd | number)[]; timeoutMs?: number; takeFds?: boolean; into?: Uint8Array } = {},
  ): Promise<ReplyWithFds<C>> {
    this.#flushMulti();
    const r = await this.conn.request(command, body, options);
    if (!options.takeFds && r.fds.length > 0) {
      for (const f of r.fds) f.close();
      throw new ConnectionError('VFU_BAD_REPLY', `${Command[command]} reply carried ${r.fds.length} unexpected fd(s)`, VErrno.EINVAL);
    }
    return r;
  }

  /** nowait mode: sends now, the reply is checked by waitAll(). */
  requestNoWait<C extends CodecCommand>(command: C, body: RequestBodies[C], options: { fds?: readonly (Fd | number)[] } = {}): void {
    const p = this.request(command, body, options).then((r) => r.fds.forEach((f) => f.close()));
    p.catch(() => {}); // reported by waitAll()
    this.#nowait.push(p);
  }

  /** Settles every nowait request sent so far; rejects with the first failure. */
  async waitAll(): Promise<void> {
    const all = this.#nowait;
    this.#nowait = [];
    const results = await Promise.allSettled(all);
    const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) throw failed.reason;
  }

  /** async mode: sends with No_reply; nothing comes back, even on error. */
  post<C extends CodecCommand>(command: C, body: RequestBodies[C], fds?: readonly (Fd | number)[]): void {
    this.#flushMulti();
    this.conn.post(command, body, fds);
  }

  // --- regions ---

  /** REGION_READ of at most max_data_xfer_size bytes. */
  /**
   * REGION_READ of `count` bytes. With `into` (exactly `count` bytes), a large
   * reply's data is received straight into it and the result is `into`
   * itself; a short reply is returned as is (compare lengths).
   */
  async regionRead(index: number, offset: number, count: number, into?: Uint8Array): Promise<Uint8Array> {
    if (count > this.maxXfer) throw new VfioError('XFER_TOO_BIG', VErrno.EINVAL, `count ${count} > server max_data_xfer_size ${this.maxXfer}`);
    if (into && into.length !== count) throw new VfioError('READ_INTO_SIZE', VErrno.EINVAL, `into has ${into.length} bytes, count is ${count}`);
    const r = await this.request(Command.REGION_READ, { offset, region: index, count }, into ? { into } : {});
    const body = r.body;
    if (!body) {
      if (count === 0) return new Uint8Array(0);
      throw new ConnectionError('VFU_BAD_REPLY', 'REGION_READ reply without data');
    }
    if (body.count > count || body.data.length !== body.count || body.region !== index || body.offset !== offset) {
      throw new ConnectionError('VFU_BAD_REPLY', `REGION_READ reply (${body.count} bytes at ${body.offset}) does not match the request`);
    }
    return body.data;
  }

  /**
   * REGION_WRITE. Posted (No_reply, resolved at once) when `posted` and posted
   * writes are on; small posted writes are coalesced into REGION_WRITE_MULTI
   * when the server accepts it, flushed before any other command.
   */
  async regionWrite(index: number, offset: number, data: Uint8Array, options: { posted?: boolean } = {}): Promise<void> {
    if (data.length > this.maxXfer) throw new VfioError('XFER_TOO_BIG', VErrno.EINVAL, `count ${data.length} > server max_data_xfer_size ${this.maxXfer}`);
    const body = { offset, region: index, count: data.length, data };
    if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isInteger(index) || index < 0 || index > 0xffffffff) {
      throw new VfioError('REGION_ACCESS', VErrno.EINVAL, `bad region access: region ${index} offset ${offset}`);
    }
    if (options.posted && this.#posted) {
      if (this.#options.writeMultiple && this.serverCaps.writeMultiple && data.length <= WRITE_MULTI_DATA && data.length > 0) {
        (this.#multi ??= []).push({ ...body, data: Uint8Array.from(data) });
        if (this.#multi.length >= QEMU_WRITE_MULTI_MAX) this.#flushMulti();
        else if (!this.#multiScheduled) {
          this.#multiScheduled = true;
          queueMicrotask(() => this.#flushMulti());
        }
        return;
      }
      this.post(Command.REGION_WRITE, body);
      return;
    }
    const r = await this.request(Command.REGION_WRITE, body);
    if (r.body.count !== data.length) throw new ConnectionError('VFU_BAD_REPLY', `REGION_WRITE wrote ${r.body.count} of ${data.length} bytes`);
  }

  #flushMulti(): void {
    this.#multiScheduled = false;
    const writes = this.#multi;
    if (!writes) return;
    this.#multi = null;
    if (this.conn.closed) return;
    try {
      if (writes.length === 1) this.conn.post(Command.REGION_WRITE, writes[0]!);
      else this.conn.post(Command.REGION_WRITE_MULTI, { writes });
    } catch (err) {
      // Posted writes have no reply to carry an error: report it, never throw from a microtask.
      this.#options.log(`posted writes lost: ${(err as Error).message}`);
      if (this.listenerCount('error') > 0) this.emit('error', err as Error);
    }
  }

  // --- DMA ---

  /** DMA_MAP: the window is recorded here (to serve DMA_READ/WRITE) and sent with the memory's fd. */
  async dmaMap(m: DmaMapOptions): Promise<void> {
    const prot = m.prot ?? DmaMapFlag.READ | DmaMapFlag.WRITE;
    const offset = m.offset ?? 0;
    if (offset + m.size > m.memory.size) throw new VfioError('DMA_MAP_MEMORY', VErrno.EINVAL, 'window extends past its memory');
    const passFd = m.passFd ?? true;
    const { added } = this.dma.map({ iova: m.iova, size: m.size, prot, offset, handle: { memory: m.memory, offset, passFd } });
    if (!added) return;
    try {
      await this.request(
        Command.DMA_MAP,
        { argsz: 32, flags: prot, offset: passFd ? m.memory.offset + offset : 0, address: m.iova, size: m.size },
        passFd ? { fds: [m.memory.fd] } : {},
      );
    } catch (err) {
      this.dma.unmap(m.iova, m.size);
      throw err;
    }
  }

  /** DMA_UNMAP of a window mapped before (exact range). */
  async dmaUnmap(iova: number, size: number): Promise<void> {
    await this.request(Command.DMA_UNMAP, { argsz: 24, flags: 0, address: iova, size });
    this.dma.unmap(iova, size);
  }

  /** DMA_UNMAP with VFIO_DMA_UNMAP_FLAG_ALL. */
  async dmaUnmapAll(): Promise<void> {
    await this.request(Command.DMA_UNMAP, { argsz: 24, flags: 2, address: 0, size: 0 });
    this.dma.unmapAll();
  }

  /** Serves the server's DMA_READ / DMA_WRITE from our memory; anything else is refused. */
  #serve(msg: Parameters<ConstructorParameters<typeof Connection>[1]['onRequest']>[0]): HandlerReply {
    if (msg.command === Command.DMA_READ) {
      const { address, count } = msg.body;
      const segs = this.dma.lookup(address, count, DmaMapFlag.READ); // throws (an errno reply) outside our windows
      if (segs.length === 1) {
        // Zero copy: the reply is gathered straight from our memory (the kernel copies it at sendmsg).
        const w = segs[0]!.region.handle;
        return { body: { address, count, data: w.memory.subarray(w.offset + segs[0]!.regionOffset, count) } };
      }
      const data = Buffer.allocUnsafe(count); // every byte is written below
      for (const seg of segs) {
        const w = seg.region.handle;
        data.set(w.memory.subarray(w.offset + seg.regionOffset, seg.length), seg.iova - address);
      }
      return { body: { address, count, data } };
    }
    if (msg.command === Command.DMA_WRITE) {
      const { address, count, data } = msg.body;
      const segs = this.dma.lookup(address, count, DmaMapFlag.WRITE);
      this.#snapshotReplies();
      for (const seg of segs) {
        const w = seg.region.handle;
        const dest = w.memory.subarray(w.offset + seg.regionOffset, seg.length);
        const src = data.subarray(seg.iova - address, seg.iova - address + seg.length);
        if (src.buffer !== dest.buffer || src.byteOffset !== dest.byteOffset) dest.set(src); // else received in place
      }
      this.dma.markDirty(address, count); // the client's own dirty log (a no-op unless it runs)
      return { body: { address, count } };
    }
    throw new VfioError('CLIENT_COMMAND', VErrno.EINVAL, `${Command[msg.command]} is not a server-to-client command`);
  }

  /**
   * Connection fastRequest: a well-formed DMA_READ or (placed) DMA_WRITE
   * within one window we may access, answered straight from the frame's
   * bytes: the same checks and reply as #serve, without a decoded message.
   * Anything else (or any doubt) is null: #serve decides and answers errors.
   */
  #fastServe(frame: Uint8Array, placed: Uint8Array | undefined): Uint8Array[] | null {
    if (frame.length < PLACE_PREFIX) return null;
    const cmd = frame[2]! | (frame[3]! << 8);
    if (cmd !== Command.DMA_READ && cmd !== Command.DMA_WRITE) return null;
    // flags 0 (a command that wants a reply) and the error field 0.
    for (let i = 8; i < HEADER_SIZE; i++) if (frame[i] !== 0) return null;
    const size = (frame[4]! | (frame[5]! << 8) | (frame[6]! << 16) | (frame[7]! << 24)) >>> 0;
    const address = readU64(frame, HEADER_SIZE);
    const count = readU64(frame, HEADER_SIZE + 8);
    if (address < 0 || count <= 0 || count > this.#options.maxDataXferSize || address + count > Number.MAX_SAFE_INTEGER) return null;
    let data: Uint8Array | undefined;
    if (cmd === Command.DMA_READ) {
      if (placed !== undefined || frame.length !== PLACE_PREFIX || size !== PLACE_PREFIX) return null;
      const seg = this.dma.translate(address, count, DmaMapFlag.READ); // throws outside one window: null
      const w = seg.region.handle;
      data = w.memory.subarray(w.offset + seg.regionOffset, count); // gathered at sendmsg, not copied
    } else {
      // Only a DMA_WRITE received in place, and only if that memory is still the window's: it may
      // have been unmapped while the data streamed in (a twin socket is not ordered with the main one).
      if (placed === undefined || frame.length !== PLACE_PREFIX || size !== PLACE_PREFIX + count) return null;
      // Its placement was dropped (the window was unmapped, or its memory closed, while the data
      // streamed in): the rest was discarded, and the window is gone: ENOENT, as #serve says.
      if (placed.length === 0) return [errorReply(frame, VErrno.ENOENT)];
      if (placed.length !== count) return null;
      const r = this.dma.find(address);
      if (r === undefined || (r.prot & DmaMapFlag.WRITE) === 0 || address + count > r.iova + r.size) return null;
      const bytes = r.handle.memory.bytes; // throws once the memory is closed: null
      if (placed.buffer !== bytes.buffer || placed.byteOffset !== bytes.byteOffset + r.handle.offset + (address - r.iova)) return null;
      this.dma.markDirty(address, count); // the client's own dirty log (a no-op unless it runs)
    }
    // Off-heap (Buffer's pool): an on-heap Uint8Array would be copied out when sendmsg asks for its memory.
    const head = Buffer.allocUnsafe(PLACE_PREFIX);
    for (let i = 0; i < 4; i++) head[i] = frame[i]!; // id, command
    putU32(head, 4, PLACE_PREFIX + (data ? count : 0));
    putU32(head, 8, MessageType.REPLY);
    putU32(head, 12, 0);
    for (let i = HEADER_SIZE; i < PLACE_PREFIX; i++) head[i] = frame[i]!; // address and count, as asked
    return data ? [head, data] : [head];
  }

  /**
   * Connection placeRequest: for a DMA_WRITE whose range lies in one window
   * we may write, that memory (its data is received there); else null, and
   * the request is received and checked as usual (and refused if bad).
   */
  #placeDmaWrite(prefix: Uint8Array, size: number, conn: Connection): Uint8Array | null {
    if ((prefix[2]! | (prefix[3]! << 8)) !== Command.DMA_WRITE) return null;
    // Only a well-formed command (no reserved flag bits, no error field) is placed: a request
    // that will be refused must not have written our memory first.
    if ((prefix[8]! & ~HeaderFlags.NO_REPLY) !== 0 || (prefix[9]! | prefix[10]! | prefix[11]!) !== 0) return null;
    if ((prefix[12]! | prefix[13]! | prefix[14]! | prefix[15]!) !== 0) return null;
    const address = readU64(prefix, HEADER_SIZE);
    const count = readU64(prefix, HEADER_SIZE + 8);
    if (address < 0 || count !== size - prefix.length || count > this.#options.maxDataXferSize) return null;
    if (address + count > Number.MAX_SAFE_INTEGER) return null; // decodeMessage refuses it: write nothing
    try {
      const seg = this.dma.translate(address, count, DmaMapFlag.WRITE); // throws unless inside one window
      const w = seg.region.handle;
      const target = w.memory.subarray(w.offset + seg.regionOffset, count);
      this.#snapshotReplies();
      this.#placing.set(conn, { target, address, count });
      return target;
    } catch {
      return null; // outside our windows, or the memory was closed: refused by #serve
    }
  }

  /**
   * DMA_READ replies are views of our memory, sent when the socket takes them:
   * before a DMA_WRITE changes that memory, replies still queued are copied,
   * so an earlier read never returns a later write's data.
   */
  #snapshotReplies(): void {
    this.conn.socket.copyQueued();
    this.#twin?.socket.copyQueued();
  }

  close(): void {
    this.#closing = true;
    this.#flushMulti();
    this.#twin?.close();
    this.conn.close();
  }
}

/** A header-only error reply to the command in `frame` (its id and command, REPLY | ERROR, errno). */
function errorReply(frame: Uint8Array, errno: number): Uint8Array {
  const head = Buffer.allocUnsafe(HEADER_SIZE);
  for (let i = 0; i < 4; i++) head[i] = frame[i]!;
  putU32(head, 4, HEADER_SIZE);
  putU32(head, 8, MessageType.REPLY | HeaderFlags.ERROR);
  putU32(head, 12, errno);
  return head;
}
