/**
 * virtio-blk over vfio-user: the vhost-user-blk device object
 * (VhostUserBlkDevice, the same one VhostUserBackend serves) behind the
 * virtio PCI modern transport (virtio-pci.ts). `vdevkit serve virtio-blk
 * --file disk.img --socket PATH`.
 */
import { VhostUserBlkDevice, type VhostUserBlkOptions } from './vhost-user-blk.js';
import { virtioPciDevice, type VirtioPciDeviceSpec, type VirtioPciOptions } from './virtio-pci.js';

/** The virtio device id of a block device. */
export const VIRTIO_ID_BLOCK = 2;

export type VirtioBlkPciOptions = VhostUserBlkOptions & Pick<VirtioPciOptions, 'ioeventfds' | 'accessPlatform' | 'bounceLimit'>;

/** The spec, with the disk (close() closes both the transport's eventfds and the file). */
export type VirtioBlkPciDeviceSpec = VirtioPciDeviceSpec & { readonly disk: VhostUserBlkDevice };

export function virtioBlkPciDevice(options: VirtioBlkPciOptions = {}): VirtioBlkPciDeviceSpec {
  const disk = VhostUserBlkDevice.open(options);
  let spec: VirtioPciDeviceSpec;
  try {
    spec = virtioPciDevice(disk, {
      deviceId: VIRTIO_ID_BLOCK,
      name: 'virtio-blk',
      ...(options.log ? { log: options.log } : {}),
      ...(options.ioeventfds !== undefined ? { ioeventfds: options.ioeventfds } : {}),
      ...(options.accessPlatform !== undefined ? { accessPlatform: options.accessPlatform } : {}),
      ...(options.bounceLimit !== undefined ? { bounceLimit: options.bounceLimit } : {}),
    });
  } catch (err) {
    disk.close();
    throw err;
  }
  const closeTransport = spec.close;
  return Object.assign(spec, {
    disk,
    close: () => {
      closeTransport();
      disk.close();
    },
  });
}
