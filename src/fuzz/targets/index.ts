import type { FuzzTarget } from '../harness.js';
import { vfioUserClient, vfioUserCodec, vfioUserServer } from './vfio-user.js';
import { vhostUserBackend, vhostUserCodec, vhostUserFrontend } from './vhost-user.js';
import { virtioPacked, virtioSplit } from './virtio-rings.js';

/** Every fuzz target, by name. */
export const TARGETS: readonly FuzzTarget[] = [vfioUserCodec, vfioUserServer, vfioUserClient, vhostUserCodec, vhostUserBackend, vhostUserFrontend, virtioSplit, virtioPacked];

export function targetByName(name: string): FuzzTarget | undefined {
  return TARGETS.find((t) => t.name === name);
}
