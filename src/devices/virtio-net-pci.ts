/**
 * virtio-net over vfio-user: the vhost-user-net device object
 * (VhostUserNetDevice, the one VhostUserBackend serves as a switch port)
 * behind the virtio PCI modern transport (virtio-pci.ts), as a port of a
 * NetSwitch (net-switch.ts). Frames flow between this PCI port and the
 * switch's other ports: vhost-user sockets (QEMU -netdev vhost-user, DPDK
 * net_virtio_user, our VirtioNetDriver) or other PCI ports.
 *
 *   const sw = new NetSwitch();
 *   sw.listen('/tmp/a.sock');                                   // a vhost-user port
 *   const spec = virtioNetPciDevice({ switch: sw, mac: '52:54:00:12:34:56' });
 *   VfioUserServer.listen('/tmp/vnet.sock', { device: spec }); // a PCI port (0x1af4:0x1041)
 *
 * `vdevkit serve virtio-net --socket PATH [--mac MAC] [--vhost-user PATH,...]`.
 *
 * The port is up (a flooding target, its MACs learned) while a vfio-user
 * client is connected; it goes down, its MACs forgotten, when the client goes.
 * The PCI queues lack the switch's `unpop` and `polled`: the device wraps
 * them (NetQueueAdapter, vhost-user-net.ts). The port is event-driven (kicks
 * through the notify area or the ioeventfds); polling is vhost-user only.
 *
 * Migration (vfio-user v2, the transport's record): the device's control-queue
 * state (promiscuous, all-multicast, MAC tables, the MAC the driver set,
 * active pairs) goes in the record's device section (VhostUserNetDevice's
 * migrationState / loadMigrationState, the transport's VirtioPciModelState);
 * the config's mac is restored from it, not compared (configDriverMutable).
 */
import { NetSwitch, type SwitchPort } from './net-switch.js';
import { VhostUserNetDevice, type VhostUserNetOptions } from './vhost-user-net.js';
import { virtioPciDevice, type VirtioPciDeviceSpec, type VirtioPciOptions } from './virtio-pci.js';

/** The virtio device id of a network device (PCI device id 0x1041, class 0x020000). */
export const VIRTIO_ID_NET = 1;

export type VirtioNetPciOptions = Omit<VhostUserNetOptions, 'poll' | 'holdMs'> &
  Pick<VirtioPciOptions, 'ioeventfds' | 'accessPlatform' | 'bounceLimit'> & {
    /** The switch to join (default: a new one, closed with the spec). */
    switch?: NetSwitch;
    /** Queue pairs (the same as queuePairs; default 1). */
    queues?: number;
  };

/** The spec, with the net device, its switch port and the switch (close() leaves a given switch open). */
export type VirtioNetPciDeviceSpec = VirtioPciDeviceSpec & {
  readonly net: VhostUserNetDevice;
  readonly port: SwitchPort;
  readonly switch: NetSwitch;
};

export function virtioNetPciDevice(options: VirtioNetPciOptions = {}): VirtioNetPciDeviceSpec {
  const { switch: given, queues, ioeventfds, accessPlatform, bounceLimit, ...net } = options;
  const pairs = queues ?? net.queuePairs;
  const device = new VhostUserNetDevice({ ...net, ...(pairs !== undefined ? { queuePairs: pairs } : {}), poll: false });
  const spec = virtioPciDevice(device, {
    deviceId: VIRTIO_ID_NET,
    name: 'virtio-net',
    ...(net.log ? { log: net.log } : {}),
    ...(ioeventfds !== undefined ? { ioeventfds } : {}),
    ...(accessPlatform !== undefined ? { accessPlatform } : {}),
    ...(bounceLimit !== undefined ? { bounceLimit } : {}),
  });
  const sw = given ?? new NetSwitch(net.log ? { log: net.log } : {});
  const port = sw.attach(device);
  const attach = spec.attach;
  const detach = spec.detach;
  const closeTransport = spec.close;
  return Object.assign(spec, {
    net: device,
    port,
    switch: sw,
    attach: (ctx: Parameters<NonNullable<typeof attach>>[0]) => {
      attach?.(ctx);
      sw.setConnected(port, true);
    },
    detach: () => {
      sw.setConnected(port, false);
      detach?.();
    },
    close: () => {
      sw.setConnected(port, false);
      closeTransport();
      if (!given) sw.close();
    },
  });
}

/**
 * `vdevkit serve virtio-net` (the devices registry, src/devices/index.ts): the
 * PCI port's options from the command line; `--vhost-user PATH[,PATH...]` adds
 * vhost-user ports (listening on those sockets) to its switch.
 */
export function virtioNetPciFromCli(values: Record<string, string | boolean | undefined>, log: (line: string) => void): VirtioNetPciDeviceSpec {
  const int = (name: string): number | undefined => {
    const v = values[name];
    if (v === undefined) return undefined;
    const n = Number(v);
    if (typeof v !== 'string' || !Number.isInteger(n) || n < 1) throw new RangeError(`--${name}: a positive integer`);
    return n;
  };
  const queues = int('queues');
  const mtu = int('mtu');
  const sw = new NetSwitch({ log });
  let spec: VirtioNetPciDeviceSpec;
  try {
    spec = virtioNetPciDevice({
      switch: sw,
      log,
      ...(typeof values.mac === 'string' ? { mac: values.mac } : {}),
      ...(queues !== undefined ? { queues } : {}),
      ...(mtu !== undefined ? { mtu } : {}),
      ...(values['no-mrg-rxbuf'] === true ? { mrgRxbuf: false } : {}),
    });
    const paths = typeof values['vhost-user'] === 'string' ? values['vhost-user'].split(',').filter((p) => p !== '') : [];
    for (const p of paths) sw.listen(p, mtu !== undefined ? { mtu } : {}, { log });
  } catch (err) {
    sw.close();
    throw err;
  }
  const close = spec.close;
  return Object.assign(spec, {
    close: () => {
      close();
      sw.close();
    },
  });
}
