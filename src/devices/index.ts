/** The ready-made devices, by the name the CLI uses. */
import type { VfioUserDeviceSpec } from '../vfio-user/device.js';
import { gpioDevice } from './gpio.js';
import { sampleDevice } from './sample.js';
import { serverSampleDevice } from './server-sample.js';

export interface DeviceEntry {
  description: string;
  create(options: { log: (line: string) => void }): VfioUserDeviceSpec;
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
};

export { gpioDevice, sampleDevice, serverSampleDevice };
