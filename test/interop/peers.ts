/**
 * Real peers for the interop tests: where they are built, and starting and
 * stopping their processes by pid. A peer that is missing fails the test
 * that needs it (never a skip): `scripts/build-peers.sh` builds libvfio-user
 * outside the repo, and `.ci/run` calls it.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { BUILD_HINT, findLibvfioUserBuild, libvfioUserCandidates } from '../../src/peers/libvfio-user.js';

/** The libvfio-user build directory (holding samples/), or an Error saying how to make one. */
export function libvfioUserBuild(): string {
  const dir = findLibvfioUserBuild();
  if (dir) return dir;
  throw new Error(`libvfio-user is not built (looked in ${libvfioUserCandidates().join(', ') || '~/.cache/vdevkit-peers'}): ${BUILD_HINT}`);
}

/** Path of one of libvfio-user's sample programs. */
export function libvfioUserSample(name: 'gpio-pci-idio-16' | 'server' | 'client' | 'lspci' | 'null'): string {
  return path.join(libvfioUserBuild(), 'samples', name);
}

/** A scratch directory removed by the returned function. */
export function scratchDir(prefix = 'vdevkit-interop-'): { dir: string; remove(): void } {
  const dir = mkdtempSync(path.join(tmpdir(), prefix));
  return { dir, remove: () => rmSync(dir, { recursive: true, force: true }) };
}

export interface Peer {
  readonly proc: ChildProcess;
  readonly pid: number;
  /** Everything it printed so far (stdout and stderr interleaved). */
  output(): string;
  /** Resolves with the exit code (or the signal name) once it has exited. */
  readonly exited: Promise<number | string>;
  /** SIGTERM, then SIGKILL after `graceMs`; resolves once it has exited. */
  stop(graceMs?: number): Promise<number | string>;
}

/** Starts a peer process; its output is kept for failure messages. */
export function startPeer(file: string, args: string[], options: { cwd?: string; env?: NodeJS.ProcessEnv } = {}): Peer {
  const proc = spawn(file, args, { cwd: options.cwd, env: options.env ?? process.env, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  proc.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  proc.stderr!.on('data', (d: Buffer) => (out += d.toString()));
  const exited = new Promise<number | string>((resolve) => {
    proc.on('exit', (code, signal) => resolve(code ?? signal ?? -1));
    proc.on('error', (err) => {
      out += `\nspawn error: ${err.message}`;
      resolve(-1);
    });
  });
  if (proc.pid === undefined) throw new Error(`could not start ${file}`);
  const pid = proc.pid;
  return {
    proc,
    pid,
    output: () => out,
    exited,
    async stop(graceMs = 2000) {
      if (proc.exitCode === null && proc.signalCode === null) {
        try {
          process.kill(pid, 'SIGTERM');
        } catch {
          /* already gone */
        }
        const timer = setTimeout(() => {
          try {
            process.kill(pid, 'SIGKILL');
          } catch {
            /* already gone */
          }
        }, graceMs);
        const r = await exited;
        clearTimeout(timer);
        return r;
      }
      return exited;
    },
  };
}

/** Waits until something accepts connections on `socketPath` (the peer is listening), or fails. */
export async function waitForSocket(socketPath: string, peer?: Peer, timeoutMs = 10_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    if (peer && (peer.proc.exitCode !== null || peer.proc.signalCode !== null)) {
      throw new Error(`peer exited before listening on ${socketPath}:\n${peer.output()}`);
    }
    if (existsSync(socketPath)) return;
    if (Date.now() > end) throw new Error(`nothing listens on ${socketPath} after ${timeoutMs} ms${peer ? `:\n${peer.output()}` : ''}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/**
 * Connects our client to a peer's socket. The socket file appears at bind(),
 * just before listen(): a refused connect is retried briefly.
 */
export async function connectPeer(
  socketPath: string,
  options: import('../../src/vfio-user/client.js').VfioUserClientOptions = {},
): Promise<import('../../src/vfio-user/client.js').VfioUserClient> {
  const { VfioUserClient } = await import('../../src/vfio-user/client.js');
  for (let attempt = 0; ; attempt++) {
    try {
      return await VfioUserClient.connect(socketPath, { timeoutMs: 5000, ...options });
    } catch (err) {
      if (attempt >= 50 || (err as NodeJS.ErrnoException).code !== 'ECONNREFUSED') throw err;
      await new Promise((r) => setTimeout(r, 20));
    }
  }
}
