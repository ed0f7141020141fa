/**
 * A learning L2 switch whose ports are vhost-user-net devices
 * (src/devices/vhost-user-net.ts), each on its own vhost-user socket:
 *
 *   const sw = new NetSwitch();
 *   sw.listen('/tmp/a.sock');                  // DPDK net_virtio_user / QEMU -netdev vhost-user connect here
 *   await sw.connect('/tmp/b.sock');           // or we connect to a front-end that listens (server=1)
 *
 * - The source MAC of each frame a guest transmits is learned for its port;
 *   entries age out after `ageingMs` without traffic (default 300 s, as
 *   802.1D), and a port's entries go when its front-end disconnects.
 * - Unicast to a learned MAC goes to that port; broadcast, multicast and
 *   unknown unicast are flooded to every other connected port.
 * - Frames are copied from the sending guest's TX buffers straight into each
 *   receiving guest's RX buffers; RX chains are pushed and notified once per
 *   TX batch (up to 256 frames per wake-up of the sending ring).
 * - A port whose front-end goes away stays attached: the same socket takes
 *   the next front-end (listen), or the back-end reconnects (connect).
 */
import { EventEmitter } from 'node:events';
import { VhostUserBackend, type IotlbStats, type VhostUserBackendOptions } from '../vhost-user/backend.js';
import { VhostUserNetDevice, isMulticast, formatMac, readAt, type Frame, type FrameSink, type NetPortStats, type VhostUserNetOptions } from './vhost-user-net.js';

export interface NetSwitchOptions {
  /** A learned MAC is forgotten after this long without a frame from it (default 300000 ms). */
  ageingMs?: number;
  /** Sees a copy of every frame a port transmits (tests, debugging; costs a copy per frame). */
  inspect?: (from: SwitchPort, frame: Uint8Array) => void;
  log?: (line: string) => void;
}

export interface SwitchPort {
  readonly id: number;
  readonly name: string;
  readonly device: VhostUserNetDevice;
  readonly backend: VhostUserBackend | null;
  /** A front-end is connected (the port is a forwarding target). */
  readonly connected: boolean;
}

export interface PortSnapshot extends NetPortStats {
  id: number;
  name: string;
  connected: boolean;
  /** The port's IOTLB counters (its back-end offers ACCESS_PLATFORM: VhostUserBackendOptions.iommu). */
  iotlb?: IotlbStats;
}

interface MacEntry {
  port: Port;
  seen: number;
}

class Port implements SwitchPort {
  readonly id: number;
  readonly name: string;
  readonly device: VhostUserNetDevice;
  backend: VhostUserBackend | null = null;
  connected = false;
  touched = false;
  constructor(id: number, device: VhostUserNetDevice) {
    this.id = id;
    this.device = device;
    this.name = device.name;
  }
}

type SwitchEvents = {
  'port-up': [port: SwitchPort];
  'port-down': [port: SwitchPort, err: Error | undefined];
};

export class NetSwitch extends EventEmitter<SwitchEvents> implements FrameSink {
  readonly ageingMs: number;
  readonly #ports: Port[] = [];
  /** Connected ports (flooding targets). */
  #up: Port[] = [];
  readonly #byDevice = new Map<VhostUserNetDevice, Port>();
  readonly #table = new Map<number, MacEntry>();
  readonly #touched: Port[] = [];
  readonly #log: (line: string) => void;
  readonly #inspect: ((from: SwitchPort, frame: Uint8Array) => void) | null;
  #now = Date.now();
  readonly #clock: NodeJS.Timeout;
  #nextId = 0;

  constructor(options: NetSwitchOptions = {}) {
    super();
    this.ageingMs = options.ageingMs ?? 300_000;
    this.#log = options.log ?? (() => undefined);
    this.#inspect = options.inspect ?? null;
    // A coarse clock for ageing (no Date.now() per frame), which also sweeps old entries.
    this.#clock = setInterval(() => this.tick(), Math.min(1000, Math.max(10, this.ageingMs / 4)));
    this.#clock.unref();
  }

  get ports(): readonly SwitchPort[] {
    return this.#ports;
  }

  /**
   * Attaches a device as a port. With a back-end, the port is up while a front-end
   * is connected; without one (tests), call setConnected().
   */
  attach(device: VhostUserNetDevice, backend: VhostUserBackend | null = null): SwitchPort {
    if (this.#byDevice.has(device)) throw new Error(`${device.name} is already a port`);
    const port = new Port(this.#nextId++, device);
    device.sink = this;
    this.#ports.push(port);
    this.#byDevice.set(device, port);
    if (backend) {
      port.backend = backend;
      backend.on('connect', () => this.setConnected(port, true));
      backend.on('disconnect', (err) => this.setConnected(port, false, err));
      if (backend.connected) this.setConnected(port, true);
    }
    return port;
  }

  /** A port whose back-end listens on `path`. */
  listen(path: string, device: VhostUserNetOptions = {}, backend: VhostUserBackendOptions = {}): SwitchPort {
    const d = new VhostUserNetDevice({ name: path, ...device });
    return this.attach(d, VhostUserBackend.listen(path, d, backend));
  }

  /** A port whose back-end connects to a front-end listening on `path` (DPDK server=1, QEMU server=on). */
  async connect(path: string, device: VhostUserNetOptions = {}, backend: VhostUserBackendOptions & { timeoutMs?: number } = {}): Promise<SwitchPort> {
    const d = new VhostUserNetDevice({ name: path, ...device });
    const be = await VhostUserBackend.connect(path, d, backend);
    return this.attach(d, be);
  }

  /** Marks a port up (a front-end connected) or down (gone: its MACs are forgotten). */
  setConnected(port: SwitchPort, connected: boolean, err?: Error): void {
    const p = this.#byDevice.get(port.device);
    if (!p || p.connected === connected) return;
    p.connected = connected;
    this.#up = this.#ports.filter((x) => x.connected);
    if (connected) {
      this.#log(`port ${p.id} (${p.name}) up`);
      this.emit('port-up', p);
      return;
    }
    let forgotten = 0;
    for (const [mac, e] of this.#table) {
      if (e.port === p) {
        this.#table.delete(mac);
        forgotten++;
      }
    }
    this.#log(`port ${p.id} (${p.name}) down${err ? `: ${err.message}` : ''}; ${forgotten} MAC(s) forgotten`);
    this.emit('port-down', p, err);
  }

  /** The learned MACs: address, port id, age in ms. */
  macTable(): { mac: string; port: number; ageMs: number }[] {
    const now = Date.now();
    return [...this.#table].map(([mac, e]) => ({ mac: formatMac(mac), port: e.port.id, ageMs: Math.max(0, now - e.seen) }));
  }

  /** Which port a MAC was learned on (undefined: unknown or aged). */
  lookup(mac: number): SwitchPort | undefined {
    const e = this.#table.get(mac);
    return e && this.#now - e.seen <= this.ageingMs ? e.port : undefined;
  }

  snapshot(): PortSnapshot[] {
    return this.#ports.map((p) => {
      const iotlb = p.backend && p.backend.iotlbStats.updates + p.backend.iotlbStats.misses > 0 ? { iotlb: { ...p.backend.iotlbStats } } : {};
      return { id: p.id, name: p.name, connected: p.connected, ...p.device.stats, drops: { ...p.device.stats.drops }, ...iotlb };
    });
  }

  /** Advances the ageing clock and forgets aged entries (runs on a timer; tests call it). */
  tick(now = Date.now()): void {
    this.#now = now;
    for (const [mac, e] of this.#table) if (now - e.seen > this.ageingMs) this.#table.delete(mac);
  }

  /**
   * One frame from a port. With `hold` (a polled port), a frame whose only receiver
   * has no RX buffer now is neither delivered nor dropped: false is returned and the
   * port gives it again (a frame flooded to several ports is never held: a partial
   * delivery cannot be retried without duplicates).
   */
  forward(from: VhostUserNetDevice, frame: Frame, dst: number, src: number, pair: number, hold = false): boolean {
    const port = this.#byDevice.get(from);
    if (!port) return true;
    if (!isMulticast(src)) this.#learn(src, port);
    let ok = true;
    let done = false;
    if (!isMulticast(dst)) {
      const e = this.#table.get(dst);
      if (e !== undefined) {
        if (this.#now - e.seen <= this.ageingMs && e.port.connected) {
          if (e.port === port) from.drop('no-destination');
          else ok = this.#deliver(e.port, frame, dst, pair, hold);
          done = true;
        } else {
          this.#table.delete(dst);
        }
      }
    }
    if (!done) ok = this.#flood(port, frame, dst, pair, hold);
    if (ok && this.#inspect !== null) this.#inspect(port, copyFrame(frame));
    return ok;
  }

  announce(from: VhostUserNetDevice, frame: Frame, mac: number): void {
    const port = this.#byDevice.get(from);
    if (!port) return;
    if (!isMulticast(mac)) this.#learn(mac, port);
    this.#flood(port, frame, 0xffffffffffff, 0);
    this.flush();
  }

  flush(): void {
    const t = this.#touched;
    for (let i = 0; i < t.length; i++) {
      const p = t[i]!;
      p.touched = false;
      p.device.flush();
    }
    t.length = 0;
  }

  /** Detaches every port and closes the back-ends. */
  close(): void {
    clearInterval(this.#clock);
    for (const p of this.#ports) p.backend?.close();
    this.#up = [];
    this.#table.clear();
  }

  #learn(mac: number, port: Port): void {
    const e = this.#table.get(mac);
    if (e === undefined) {
      this.#table.set(mac, { port, seen: this.#now });
      this.#log(`learned ${formatMac(mac)} on port ${port.id}`);
    } else {
      if (e.port !== port) this.#log(`${formatMac(mac)} moved from port ${e.port.id} to port ${port.id}`);
      e.port = port;
      e.seen = this.#now;
    }
  }

  #flood(from: Port, frame: Frame, dst: number, pair: number, hold = false): boolean {
    const up = this.#up;
    if (hold && up.length === 2 && (up[0] === from || up[1] === from)) {
      // One receiver: the frame can wait for its buffers.
      return this.#deliver(up[0] === from ? up[1]! : up[0]!, frame, dst, pair, true);
    }
    let sent = 0;
    for (let i = 0; i < up.length; i++) {
      const p = up[i]!;
      if (p === from) continue;
      this.#deliver(p, frame, dst, pair);
      sent++;
    }
    if (sent === 0) from.device.drop('no-destination');
    return true;
  }

  /** False: held (`hold` and no RX buffer for it now). */
  #deliver(to: Port, frame: Frame, dst: number, pair: number, hold = false): boolean {
    const d = to.device;
    if (!d.accepts(dst)) {
      d.drop('filtered');
      return true;
    }
    const r = d.deliver(frame, pair, hold);
    if (r < 0) return false;
    if (r > 0 && !to.touched) {
      to.touched = true;
      this.#touched.push(to);
    }
    return true;
  }
}

function copyFrame(f: Frame): Uint8Array {
  const out = new Uint8Array(f.length);
  readAt(f.views, f.offset, out, f.length);
  return out;
}
