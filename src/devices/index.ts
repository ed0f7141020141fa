/** The ready-made devices, by the name the CLI uses. */
import type { VfioUserDeviceSpec } from '../vfio-user/device.js';
import { gpioDevice } from './gpio.js';
import { sampleDevice } from './sample.js';
import { serverSampleDevice } from './server-sample.js';
import { virtioBlkPciDevice } from './virtio-blk-pci.js';
import { virtioNetPciDevice, virtioNetPciFromCli } from './virtio-net-pci.js';

/** A device option on the command line (`vdevkit serve <device> --name VALUE`). */
export interface DeviceOption {
  type: 'string' | 'boolean';
  help: string;
}

export interface DeviceEntry {
  description: string;
  /** The device's own command-line options, by long name. */
  options?: Record<string, DeviceOption>;
  /** `values`: the device's options given on the command line. */
  create(options: { log: (line: string) => void; values?: Record<string, string | boolean | undefined> }): VfioUserDeviceSpec;
  /** Called when the server stopped (close files, eventfds). */
  dispose?(spec: VfioUserDeviceSpec): void;
}

export const devices: Record<string, DeviceEntry> = {
  gpio: {
    description: "libvfio-user's gpio-pci-idio-16 sample: 16 pins on I/O BAR2, its migration stream (0x494f:0x0dc8)",
    create: ({ log }) => gpioDevice({ log }),
  },
  sample: {
    description: 'a device using every server feature: register BAR with a DMA engine, mmap-able BAR, MSI-X, migration',
    create: () => sampleDevice(),
  },
  'libvfio-user-server': {
    description: "libvfio-user's samples/server: time_t BAR0 timer, INTx and DMA, sparse-mmap BAR1, its migration stream (0xdead:0xbeef)",
    create: ({ log }) => serverSampleDevice({ log }),
  },
  'virtio-blk': {
    description: 'a virtio-blk disk as a virtio PCI modern device (0x1af4:0x1042), the vhost-user-blk device behind it: --file IMAGE',
    options: {
      file: { type: 'string', help: 'the disk image (default: a null disk of 1 GiB)' },
      'read-only': { type: 'boolean', help: 'refuse writes (VIRTIO_BLK_F_RO)' },
      queues: { type: 'string', help: 'request queues (default 1)' },
      serial: { type: 'string', help: 'the GET_ID answer (default vdevkit-blk)' },
    },
    create: ({ log, values = {} }) => {
      const queues = values.queues === undefined ? undefined : Number(values.queues);
      if (queues !== undefined && !(Number.isInteger(queues) && queues >= 1)) throw new RangeError('--queues: a positive integer');
      return virtioBlkPciDevice({
        ...(typeof values.file === 'string' ? { file: values.file } : {}),
        ...(values['read-only'] === true ? { readOnly: true } : {}),
        ...(queues !== undefined ? { queues } : {}),
        ...(typeof values.serial === 'string' ? { serial: values.serial } : {}),
        log,
      });
    },
    dispose: (spec) => (spec as ReturnType<typeof virtioBlkPciDevice>).close(),
  },
  'virtio-net': {
    description: 'a virtio-net NIC as a virtio PCI modern device (0x1af4:0x1041), a port of our learning switch: --vhost-user PATH,... adds vhost-user ports',
    options: {
      mac: { type: 'string', help: 'the MAC in virtio_net_config (default 02:76 + 4 random bytes)' },
      queues: { type: 'string', help: 'queue pairs (default 1; more offers MQ)' },
      mtu: { type: 'string', help: 'the MTU in virtio_net_config (default 1500)' },
      'no-mrg-rxbuf': { type: 'boolean', help: 'do not offer VIRTIO_NET_F_MRG_RXBUF' },
      'vhost-user': { type: 'string', help: 'vhost-user sockets (comma-separated) to listen on, ports of the same switch' },
    },
    create: ({ log, values = {} }) => virtioNetPciFromCli(values, log),
    dispose: (spec) => (spec as ReturnType<typeof virtioNetPciDevice>).close(),
  },
};

export { gpioDevice, sampleDevice, serverSampleDevice, virtioBlkPciDevice, virtioNetPciDevice };
