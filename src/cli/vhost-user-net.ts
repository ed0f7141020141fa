/** `vdevkit vhost-user-net --socket A.sock --socket B.sock`: a learning switch whose ports are vhost-user-net sockets. */
import { parseArgs } from 'node:util';
import { NetSwitch, type PortSnapshot } from '../devices/net-switch.js';
import { NetSwitchThread } from '../devices/net-switch-thread.js';
import type { VhostUserNetOptions } from '../devices/vhost-user-net.js';
import type { IotlbStats } from '../vhost-user/backend.js';

export const VHOST_USER_NET_HELP = `Usage: vdevkit vhost-user-net --socket PATH --socket PATH [options]

A learning L2 switch whose ports are virtio-net devices over vhost-user, one
per socket: QEMU's -netdev vhost-user, DPDK's net_virtio_user, or any other
vhost-user front-end plugs into each. Frames are copied from one guest's
memory straight into another's; MACs are learned and age out; broadcast and
unknown destinations are flooded. Prints each port's packet and byte rates
once a second.

Options:
  -s, --socket PATH    a port (repeat for each; at least one)
      --connect        connect to front-ends that listen (QEMU server=on, DPDK server=1)
  -q, --queues N       queue pairs per port (default 1; more offers MQ)
      --mtu N          MTU in config space (default 1500)
      --no-mrg-rxbuf   do not offer MRG_RXBUF
      --no-packed      do not offer RING_PACKED
      --in-order       offer IN_ORDER
      --ageing SECONDS MAC ageing time (default 300)
      --poll           busy-poll every port's TX rings (kicks off while polled, as
                       DPDK's PMD); the switch then runs on a worker thread
      --poll-port PATH busy-poll only this port (repeat); the others stay event-driven
      --iommu          offer VIRTIO_F_ACCESS_PLATFORM: work behind the front-ends'
                       IOMMU (QEMU: intel-iommu and iommu_platform=on)
      --json           one JSON object per second instead of the progress line
  -v, --verbose        log protocol and switch events
  -t, --trace          log every front-end message
`;

export async function vhostUserNetCommand(argv: string[]): Promise<number> {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv,
      options: {
        socket: { type: 'string', short: 's', multiple: true },
        connect: { type: 'boolean' },
        queues: { type: 'string', short: 'q' },
        mtu: { type: 'string' },
        'no-mrg-rxbuf': { type: 'boolean' },
        'no-packed': { type: 'boolean' },
        'in-order': { type: 'boolean' },
        ageing: { type: 'string' },
        poll: { type: 'boolean' },
        'poll-port': { type: 'string', multiple: true },
        json: { type: 'boolean' },
        iommu: { type: 'boolean' },
        verbose: { type: 'boolean', short: 'v' },
        trace: { type: 'boolean', short: 't' },
        help: { type: 'boolean', short: 'h' },
      },
    }));
  } catch (err) {
    process.stderr.write(`vdevkit vhost-user-net: ${(err as Error).message}\n\n${VHOST_USER_NET_HELP}`);
    return 2;
  }
  if (values.help) {
    process.stdout.write(VHOST_USER_NET_HELP);
    return 0;
  }
  const fail = (msg: string): number => {
    process.stderr.write(`vdevkit vhost-user-net: ${msg}\n\n${VHOST_USER_NET_HELP}`);
    return 2;
  };
  const sockets = values.socket ?? [];
  if (sockets.length === 0) return fail('give at least one --socket PATH');
  const queuePairs = values.queues !== undefined ? Number(values.queues) : 1;
  if (!Number.isInteger(queuePairs) || queuePairs < 1 || queuePairs > 127) return fail('--queues must be 1..127');
  const mtu = values.mtu !== undefined ? Number(values.mtu) : 1500;
  if (!Number.isInteger(mtu) || mtu < 68 || mtu > 65535) return fail('--mtu must be 68..65535');
  const ageing = values.ageing !== undefined ? Number(values.ageing) : 300;
  if (!(ageing > 0)) return fail('--ageing must be a number of seconds > 0');
  const log = (line: string): void => void process.stderr.write(`vdevkit: ${line}\n`);
  const pollPorts = values['poll-port'] ?? [];
  for (const p of pollPorts) if (!sockets.includes(p)) return fail(`--poll-port ${p} is not one of the --socket paths`);
  const polled = (s: string): boolean => values.poll === true || pollPorts.includes(s);
  const device: Omit<VhostUserNetOptions, 'log' | 'poll'> = {
    queuePairs,
    mtu,
    mrgRxbuf: values['no-mrg-rxbuf'] !== true,
    packed: values['no-packed'] !== true,
    inOrder: values['in-order'] === true,
  };
  let sw: { snapshot(): PortSnapshot[] | Promise<PortSnapshot[]>; close(): void | Promise<void> };
  if (sockets.some(polled)) {
    // Busy-polling spins its thread: the whole switch goes to a worker.
    try {
      const t = await NetSwitchThread.start({
        ageingMs: ageing * 1000,
        verbose: values.verbose === true || values.trace === true,
        ports: sockets.map((s) => ({ path: s, connect: values.connect === true, timeoutMs: 30_000, trace: values.trace === true, iommu: values.iommu === true, device: { ...device, poll: polled(s) } })),
      });
      t.on('log', log);
      t.on('port-up', (p) => log(`port ${p.id} ${p.name}: front-end connected`));
      t.on('port-down', (p, msg) => log(`port ${p.id} ${p.name}: front-end disconnected${msg ? `: ${msg}` : ''}`));
      t.on('error', (err) => log(`the switch thread failed: ${err.message}`));
      sw = t;
    } catch (err) {
      log(`cannot open the ports: ${(err as Error).message}`);
      return 1;
    }
  } else {
    const s = new NetSwitch({ ageingMs: ageing * 1000, ...(values.verbose ? { log } : {}) });
    const backendOptions = { ...(values.verbose ? { log } : {}), ...(values.trace ? { trace: (l: string) => log(`<- ${l}`) } : {}), ...(values.iommu ? { iommu: true } : {}) };
    s.on('port-up', (p) => log(`port ${p.id} ${p.name}: front-end connected`));
    s.on('port-down', (p, err) => log(`port ${p.id} ${p.name}: front-end disconnected${err ? `: ${err.message}` : ''}`));
    try {
      for (const path of sockets) {
        if (values.connect) await s.connect(path, { ...device, log }, { ...backendOptions, timeoutMs: 30_000 });
        else s.listen(path, { ...device, log }, backendOptions);
      }
    } catch (err) {
      s.close();
      log(`cannot open the ports: ${(err as Error).message}`);
      return 1;
    }
    sw = s;
  }
  log(`vhost-user-net: ${sockets.length} port(s), ${queuePairs} queue pair(s) each, ${values.connect ? 'connecting to' : 'listening on'} ${sockets.join(', ')}${sockets.some(polled) ? `; polling ${sockets.filter(polled).join(', ')} on a worker thread` : ''}`);

  const json = values.json === true;
  const tty = !json && process.stdout.isTTY === true;
  let last = await sw.snapshot();
  let lastT = performance.now();
  const t0 = lastT;
  const report = async (final: boolean): Promise<void> => {
    let snap: PortSnapshot[];
    try {
      snap = await sw.snapshot();
    } catch {
      return; // the switch thread is gone (its error was logged)
    }
    const now = performance.now();
    const dt = (now - lastT) / 1000;
    const rows = snap.map((p, i) => rates(p, last[i]!, dt));
    if (json) {
      process.stdout.write(`${JSON.stringify({ t: Math.round((now - t0) / 10) / 100, ...(final ? { final: true } : {}), ports: rows })}\n`);
    } else {
      const line = rows.map((r) => `${r.name}${r.connected ? '' : ' (down)'}: rx ${mpps(r.rxPps)} ${mbit(r.rxBps)} tx ${mpps(r.txPps)} ${mbit(r.txBps)}${r.dropped ? ` drops ${r.dropped}` : ''}`).join(' | ');
      if (final) process.stdout.write(`${tty ? '\r\x1b[K' : ''}${totals(snap)}\n`);
      else process.stdout.write(tty ? `\r\x1b[K${line}` : `${line}\n`);
    }
    last = snap;
    lastT = now;
  };
  const timer = setInterval(() => void report(false), 1000);
  await new Promise<void>((resolve) => {
    const stop = (): void => resolve();
    process.once('SIGINT', stop);
    process.once('SIGTERM', stop);
  });
  clearInterval(timer);
  await report(true);
  await sw.close();
  return 0;
}

interface Rates {
  name: string;
  connected: boolean;
  rxPps: number;
  rxBps: number;
  txPps: number;
  txBps: number;
  rxPackets: number;
  rxBytes: number;
  txPackets: number;
  txBytes: number;
  /** Drops since the previous report. */
  dropped: number;
  /** IOTLB misses, updates, invalidations so far (--iommu). */
  iotlb?: IotlbStats;
  drops: PortSnapshot['drops'];
}

function sumDrops(p: PortSnapshot): number {
  return Object.values(p.drops).reduce((a, b) => a + b, 0);
}

function rates(p: PortSnapshot, before: PortSnapshot, dt: number): Rates {
  const per = (a: number, b: number): number => (dt > 0 ? Math.round((a - b) / dt) : 0);
  return {
    name: p.name,
    connected: p.connected,
    rxPps: per(p.rxPackets, before.rxPackets),
    rxBps: per(p.rxBytes, before.rxBytes),
    txPps: per(p.txPackets, before.txPackets),
    txBps: per(p.txBytes, before.txBytes),
    rxPackets: p.rxPackets,
    rxBytes: p.rxBytes,
    txPackets: p.txPackets,
    txBytes: p.txBytes,
    dropped: sumDrops(p) - sumDrops(before),
    drops: p.drops,
    ...(p.iotlb ? { iotlb: p.iotlb } : {}),
  };
}

function mpps(pps: number): string {
  return pps >= 1e6 ? `${(pps / 1e6).toFixed(2)} Mpps` : pps >= 1e3 ? `${(pps / 1e3).toFixed(1)} kpps` : `${pps} pps`;
}

function mbit(bytesPerS: number): string {
  return `${((bytesPerS * 8) / 1e6).toFixed(1)} Mbit/s`;
}

function totals(snap: PortSnapshot[]): string {
  return snap
    .map((p) => {
      const drops = Object.entries(p.drops).filter(([, n]) => n > 0).map(([c, n]) => `${c} ${n}`);
      return `${p.name}: rx ${p.rxPackets} (${p.rxBytes} B) tx ${p.txPackets} (${p.txBytes} B)${drops.length ? ` drops: ${drops.join(', ')}` : ''}`;
    })
    .join('\n');
}
