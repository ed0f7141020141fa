/**
 * `vdevkit migrate --from SRC --to DST`: live-migrates a device from one
 * vfio-user server to another (any two implementations of the same device
 * model: ours, libvfio-user's, ...), as QEMU's migration would between hosts.
 */
import { parseArgs } from 'node:util';
import { VfioUserClient } from '../vfio-user/client.js';
import { VfioUserDevice } from '../vfio-user/client-device.js';
import { migrate } from '../vfio-user/migrate.js';

export const MIGRATE_HELP = `Usage: vdevkit migrate --from SOCKET --to SOCKET [--chunk N] [--no-pre-copy]

Connects to both vfio-user servers, puts the destination in RESUMING, moves
the source's migration stream (PRE_COPY while it runs, when offered, then
STOP_COPY), each chunk written as it was read; then the source is STOP and
the destination RUNNING. On a failure the source is put back to RUNNING.

Options:
      --from SOCKET     the source server's socket
      --to SOCKET       the destination server's socket
      --chunk N         bytes per MIG_DATA_READ (default: the source's
                        max_data_xfer_size; libvfio-user's gpio needs 64)
      --no-pre-copy     stop-copy only
      --timeout MS      per-request timeout (default 5000)
`;

export async function migrateCommand(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      from: { type: 'string' },
      to: { type: 'string' },
      chunk: { type: 'string' },
      'no-pre-copy': { type: 'boolean' },
      timeout: { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help) {
    process.stdout.write(MIGRATE_HELP);
    return 0;
  }
  if (!values.from || !values.to) {
    process.stderr.write(`vdevkit migrate: --from and --to are required\n\n${MIGRATE_HELP}`);
    return 2;
  }
  const chunk = values.chunk !== undefined ? Number(values.chunk) : undefined;
  const timeoutMs = values.timeout !== undefined ? Number(values.timeout) : 5000;
  if ((chunk !== undefined && (!Number.isSafeInteger(chunk) || chunk <= 0)) || !(timeoutMs > 0)) {
    process.stderr.write('vdevkit migrate: --chunk and --timeout take positive integers\n');
    return 2;
  }
  const src = await VfioUserClient.connect(values.from, { timeoutMs });
  let dst: VfioUserClient | undefined;
  try {
    dst = await VfioUserClient.connect(values.to, { timeoutMs });
    const r = await migrate(new VfioUserDevice(src), new VfioUserDevice(dst), {
      ...(chunk !== undefined ? { chunkSize: chunk } : {}),
      preCopy: !values['no-pre-copy'],
    });
    process.stdout.write(
      `migrated: ${r.preCopyBytes} bytes in pre-copy (${r.preCopyRounds} round${r.preCopyRounds === 1 ? '' : 's'}), ` +
        `${r.stopCopyBytes} in stop-copy, ${r.chunks.length} writes\n`,
    );
    return 0;
  } finally {
    dst?.close();
    src.close();
  }
}
