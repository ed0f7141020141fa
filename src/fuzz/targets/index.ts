import type { FuzzTarget } from '../harness.js';
import { vfioUserClient, vfioUserCodec, vfioUserServer } from './vfio-user.js';

/** Every fuzz target, by name. */
export const TARGETS: readonly FuzzTarget[] = [vfioUserCodec, vfioUserServer, vfioUserClient];

export function targetByName(name: string): FuzzTarget | undefined {
  return TARGETS.find((t) => t.name === name);
}
