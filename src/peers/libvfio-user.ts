/**
 * Where a build of libvfio-user (a real peer, built from its source by
 * scripts/build-peers.sh outside the repo) is: the demo uses its gpio
 * sample when it finds one, the interop tests require it.
 */
import { existsSync, readdirSync } from 'node:fs';
import { homedir } from 'node:os';
import path from 'node:path';

/** The build directories looked at, in order: $VDEVKIT_LIBVFIO_USER_BUILD, then ~/.cache/vdevkit-peers/libvfio-user-* (newest name first). */
export function libvfioUserCandidates(): string[] {
  const candidates: string[] = [];
  const fromEnv = process.env.VDEVKIT_LIBVFIO_USER_BUILD;
  if (fromEnv) candidates.push(fromEnv);
  const cache = process.env.VDEVKIT_PEERS_DIR ?? path.join(homedir(), '.cache', 'vdevkit-peers');
  if (existsSync(cache)) {
    for (const name of readdirSync(cache).sort().reverse()) {
      if (name.startsWith('libvfio-user-')) candidates.push(path.join(cache, name, 'libvfio-user', 'build'));
    }
  }
  return candidates;
}

/** The first build directory holding the samples (server, gpio-pci-idio-16), or null. */
export function findLibvfioUserBuild(): string | null {
  for (const dir of libvfioUserCandidates()) {
    if (existsSync(path.join(dir, 'samples', 'server')) && existsSync(path.join(dir, 'samples', 'gpio-pci-idio-16'))) return dir;
  }
  return null;
}

export const BUILD_HINT =
  'run scripts/build-peers.sh (needs meson ninja-build pkg-config libjson-c-dev libcmocka-dev) or set VDEVKIT_LIBVFIO_USER_BUILD';
