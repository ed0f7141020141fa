/**
 * Live migration of a device between two vfio-user servers, driven by our
 * client: what QEMU's vfio migration code does between two hosts, in one
 * process. The servers need not be ours: any two that speak migration v2
 * (VFIO_DEVICE_FEATURE_MIGRATION / MIG_DEVICE_STATE, MIG_DATA_READ /
 * MIG_DATA_WRITE), with the same device model behind them.
 *
 * The stream is moved as it is read: each chunk read from the source is
 * written to the destination as one MIG_DATA_WRITE of the same size, so a
 * device that frames its data per message (libvfio-user's gpio sample
 * asserts that every read and write is exactly 64 bytes) sees on the
 * destination the messages its source produced. A read of 0 bytes ends a
 * phase (the end of pre-copy data for now, or the end of the stream in
 * STOP_COPY), as in VFIO migration v2; a short read does not.
 */
import { MigrationFlag, MigrationState } from '../vfio/uapi.js';
import { VfioError, Errno } from '../vfio/errors.js';
import type { VfioUserDevice } from './client-device.js';

export interface MigrateOptions {
  /** Bytes asked for per MIG_DATA_READ (default: the source's max_data_xfer_size). */
  chunkSize?: number;
  /** Use PRE_COPY when the source offers it (default true). */
  preCopy?: boolean;
  /**
   * Called once the pre-copy data available so far has been moved, while the
   * source still runs; `round` counts from 0. Return true to move the data
   * produced since (another pre-copy round), false to stop the source.
   */
  onPreCopy?: (round: number) => boolean | Promise<boolean>;
  /** Most pre-copy rounds (default 16). */
  maxPreCopyRounds?: number;
  /** The destination's state at the end (default RUNNING). */
  destinationState?: number;
  /** The source's state at the end (default STOP). */
  sourceState?: number;
  /** Most bytes moved before giving up (default 1 GiB). */
  maxBytes?: number;
}

export interface MigrateResult {
  preCopyBytes: number;
  stopCopyBytes: number;
  /** The MIG_DATA_WRITEs made, each the size of the read it carries. */
  chunks: number[];
  preCopyRounds: number;
}

/**
 * Moves the device state of `source` to `destination`: destination RESUMING;
 * source PRE_COPY (if offered and wanted) with the data moved as it comes;
 * source STOP_COPY with the rest; source STOP, destination RUNNING.
 * A failure anywhere puts the source back to RUNNING when it can and
 * rethrows: the source keeps the device.
 */
export async function migrate(source: VfioUserDevice, destination: VfioUserDevice, options: MigrateOptions = {}): Promise<MigrateResult> {
  const chunkSize = options.chunkSize ?? source.client.maxXfer;
  if (!Number.isInteger(chunkSize) || chunkSize <= 0) throw new TypeError(`chunkSize ${chunkSize}: a positive integer`);
  const maxBytes = options.maxBytes ?? 1 << 30;
  const maxRounds = options.maxPreCopyRounds ?? 16;
  const flags = await source.migrationFlags();
  if (!(flags & MigrationFlag.STOP_COPY)) throw new VfioError('MIGRATION_UNSUPPORTED', Errno.EOPNOTSUPP, 'the source does not offer STOP_COPY migration');
  const preCopy = (options.preCopy ?? true) && (flags & MigrationFlag.PRE_COPY) !== 0;
  const result: MigrateResult = { preCopyBytes: 0, stopCopyBytes: 0, chunks: [], preCopyRounds: 0 };
  let moved = 0;
  const drain = async (): Promise<number> => {
    let n = 0;
    for (;;) {
      const data = await source.readMigrationData(chunkSize);
      if (data.length === 0) return n;
      moved += data.length;
      if (moved > maxBytes) throw new VfioError('MIGRATION_TOO_BIG', Errno.EOVERFLOW, `migration stream over ${maxBytes} bytes`);
      await destination.writeMigrationData(data);
      result.chunks.push(data.length);
      n += data.length;
    }
  };
  await destination.setMigrationState(MigrationState.RESUMING);
  let sourceMoved = false;
  try {
    if (preCopy) {
      await source.setMigrationState(MigrationState.PRE_COPY);
      sourceMoved = true;
      for (;;) {
        result.preCopyBytes += await drain();
        const round = result.preCopyRounds++;
        const again = options.onPreCopy ? await options.onPreCopy(round) : false;
        if (!again || result.preCopyRounds >= maxRounds) break;
      }
    }
    await source.setMigrationState(MigrationState.STOP_COPY);
    sourceMoved = true;
    result.stopCopyBytes = await drain();
    await source.setMigrationState(MigrationState.STOP);
    // The destination loads the stream here (a refusal comes now): the source waits stopped.
    await destination.setMigrationState(options.destinationState ?? MigrationState.RUNNING);
  } catch (err) {
    if (sourceMoved) await source.setMigrationState(MigrationState.RUNNING).catch(() => undefined);
    await destination.setMigrationState(MigrationState.STOP).catch(() => undefined);
    throw err;
  }
  const finalSource = options.sourceState ?? MigrationState.STOP;
  if (finalSource !== MigrationState.STOP) await source.setMigrationState(finalSource);
  return result;
}
