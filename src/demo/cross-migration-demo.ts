/**
 * The first part of `npm start`, when libvfio-user is built (scripts/build-peers.sh):
 * a live migration across implementations. libvfio-user's own gpio sample (C)
 * runs; our client toggles its pins, migrates it live into our TypeScript
 * gpio, which counts on, and back into a fresh C gpio; the counts are the
 * same at every step. Without the build it says how to get it.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { VfioUserServer } from '../vfio-user/server.js';
import { VfioUserClient } from '../vfio-user/client.js';
import { VfioUserDevice } from '../vfio-user/client-device.js';
import { migrate } from '../vfio-user/migrate.js';
import { gpioDevice } from '../devices/gpio.js';
import { MigrationState } from '../vfio/uapi.js';
import { BUILD_HINT, findLibvfioUserBuild } from '../peers/libvfio-user.js';

const BAR2 = 2;

async function connect(socket: string): Promise<VfioUserDevice> {
  for (let attempt = 0; ; attempt++) {
    try {
      return new VfioUserDevice(await VfioUserClient.connect(socket, { timeoutMs: 5000 }));
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (attempt >= 100 || (code !== 'ECONNREFUSED' && code !== 'ENOENT')) throw err;
      await new Promise((r) => setTimeout(r, 20));
    }
  }
}

const close = (d: VfioUserDevice): void => {
  d.close();
  d.client.close();
};

/** The 16 counts out of a gpio's 64-byte record (little-endian int32). */
const counts = (rec: Uint8Array): number[] => Array.from({ length: 16 }, (_v, i) => Buffer.from(rec.buffer, rec.byteOffset, rec.length).readInt32LE(i * 4));

export async function runCrossMigrationDemo(log: (line: string) => void): Promise<boolean> {
  const build = findLibvfioUserBuild();
  if (!build) {
    log(`(libvfio-user is not built, so the cross-implementation migration is not shown: ${BUILD_HINT})`);
    return false;
  }
  const bin = path.join(build, 'samples', 'gpio-pci-idio-16');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdevkit-xdemo-'));
  const procs: ChildProcess[] = [];
  const startC = (name: string): string => {
    const socket = path.join(dir, name);
    procs.push(spawn(bin, [socket], { stdio: 'ignore' }));
    return socket;
  };
  const ours = gpioDevice();
  const server = VfioUserServer.listen(path.join(dir, 'ours.sock'), { device: ours });
  try {
    log(`cross-implementation live migration: libvfio-user's gpio-pci-idio-16 (C, ${bin})`);
    const c1 = await connect(startC('c1.sock'));
    for (const v of [0xff, 0x0f, 0x03]) await c1.write(BAR2, 0, Uint8Array.of(v));
    await c1.write(BAR2, 4, Uint8Array.of(0x81));
    log(`  C gpio: pins toggled through BAR2 (I/O port BAR); inputs 0x1=${hex((await c1.read(BAR2, 1, 1))[0]!)} 0x5=${hex((await c1.read(BAR2, 5, 1))[0]!)}`);
    const mid = await connect(server.path);
    const r = await migrate(c1, mid, {
      chunkSize: 64,
      onPreCopy: async (round) => {
        if (round === 0) await c1.write(BAR2, 0, Uint8Array.of(0x80)); // while it still runs
        return round === 0;
      },
    });
    log(`  C -> TypeScript: ${r.preCopyRounds} pre-copy rounds (a toggle made during the first went along), ${r.chunks.length} records of 64 bytes`);
    log(`  our gpio now counts ${ours.pins.join(' ')}`);
    await mid.write(BAR2, 4, Uint8Array.of(0x02));
    log(`  toggled pin 9 on ours:  ${ours.pins.join(' ')}`);
    // Back into a fresh C gpio. The sample's write_data returns 0 after taking the
    // 64 bytes, so libvfio-user answers the write EINVAL: the data is in all the same.
    const c2 = await connect(startC('c2.sock'));
    await mid.setMigrationState(MigrationState.STOP_COPY);
    const rec = await mid.readMigrationData(64);
    await mid.setMigrationState(MigrationState.STOP);
    await c2.setMigrationState(MigrationState.RESUMING);
    await c2.writeMigrationData(rec).catch(() => log('  (libvfio-user answers the MIG_DATA_WRITE EINVAL: its sample returns 0 from write_data; see test/interop/gpio.test.ts)'));
    await c2.setMigrationState(MigrationState.RUNNING);
    await c2.setMigrationState(MigrationState.STOP_COPY);
    const back = counts(await c2.readMigrationData(64));
    await c2.setMigrationState(MigrationState.STOP);
    log(`  TypeScript -> fresh C gpio: it counts ${back.join(' ')}`);
    const same = back.join() === ours.pins.join();
    log(same ? '  the same counts in C, in TypeScript and in C again' : '  COUNTS DIFFER');
    for (const d of [c1, mid, c2]) close(d);
    if (!same) throw new Error('cross-implementation migration: counts differ');
    return true;
  } finally {
    server.close();
    for (const p of procs) p.kill('SIGTERM');
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

const hex = (n: number): string => `0x${n.toString(16).padStart(2, '0')}`;
