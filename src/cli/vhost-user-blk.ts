/** `vdevkit vhost-user-blk --socket PATH --file disk.img`: a virtio-blk disk over vhost-user. */
import { parseArgs } from 'node:util';
import { VhostUserBackend } from '../vhost-user/backend.js';
import { VhostUserBlkDevice } from '../devices/vhost-user-blk.js';

export const VHOST_USER_BLK_HELP = `Usage: vdevkit vhost-user-blk --socket PATH (--file IMAGE | --null SIZE) [options]

Serves a virtio-blk disk to a vhost-user front-end (QEMU's vhost-user-blk-pci,
DPDK, vdevkit's own front-end) on a UNIX socket. One front-end at a time; when
it disconnects the next may connect (QEMU's reconnect=N), and requests that
were in flight are resubmitted from the inflight region it gives back.

Options:
  -s, --socket PATH    socket to listen on (or to connect to, with --connect)
  -f, --file IMAGE     the disk image (a regular file; its size is the capacity)
      --null SIZE      no image: a null disk of SIZE bytes (K, M, G suffixes)
  -q, --queues N       request queues (default 1)
      --readonly       refuse writes (the guest sees a read-only disk)
      --serial ID      GET_ID answer (at most 20 bytes; default vdevkit-blk)
      --connect        connect to a front-end that listens (QEMU server=on)
      --latency-ms N   complete each request N ms late (tests of slow disks)
      --iommu          offer VIRTIO_F_ACCESS_PLATFORM: work behind the front-end's
                       IOMMU (QEMU: intel-iommu and iommu_platform=on), translating
                       IOVAs through the IOTLB it sends
  -v, --verbose        log protocol events
  -t, --trace          log every front-end message
`;

function parseSize(s: string): number {
  const m = /^(\d+)([KMG]?)$/i.exec(s);
  if (!m) throw new Error(`bad size '${s}'`);
  const mult = { '': 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3 }[m[2]!.toUpperCase() as '' | 'K' | 'M' | 'G'];
  return Number(m[1]) * mult;
}

export async function vhostUserBlkCommand(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      socket: { type: 'string', short: 's' },
      file: { type: 'string', short: 'f' },
      null: { type: 'string' },
      queues: { type: 'string', short: 'q' },
      readonly: { type: 'boolean' },
      serial: { type: 'string' },
      connect: { type: 'boolean' },
      'latency-ms': { type: 'string' },
      iommu: { type: 'boolean' },
      verbose: { type: 'boolean', short: 'v' },
      trace: { type: 'boolean', short: 't' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help) {
    process.stdout.write(VHOST_USER_BLK_HELP);
    return 0;
  }
  const fail = (msg: string): number => {
    process.stderr.write(`vdevkit vhost-user-blk: ${msg}\n\n${VHOST_USER_BLK_HELP}`);
    return 2;
  };
  if (!values.socket) return fail('--socket PATH is required');
  if ((values.file === undefined) === (values.null === undefined)) return fail('give one of --file IMAGE and --null SIZE');
  const queues = values.queues !== undefined ? Number(values.queues) : 1;
  if (!Number.isInteger(queues) || queues < 1 || queues > 256) return fail('--queues must be 1..256');
  const latencyMs = values['latency-ms'] !== undefined ? Number(values['latency-ms']) : 0;
  if (!Number.isFinite(latencyMs) || latencyMs < 0) return fail('--latency-ms must be a number >= 0');
  const log = (line: string): void => void process.stderr.write(`vdevkit: ${line}\n`);
  let size: number | undefined;
  try {
    size = values.null !== undefined ? parseSize(values.null) : undefined;
  } catch (err) {
    return fail((err as Error).message);
  }
  const disk = VhostUserBlkDevice.open({
    ...(values.file !== undefined ? { file: values.file } : {}),
    ...(size !== undefined ? { size } : {}),
    readOnly: values.readonly === true,
    queues,
    latencyMs,
    ...(values.serial !== undefined ? { serial: values.serial } : {}),
    log,
  });
  const options = {
    ...(values.verbose ? { log } : {}),
    ...(values.trace ? { trace: (l: string) => log(`<- ${l}`) } : {}),
    ...(values.iommu ? { iommu: true } : {}),
  };
  const backend = values.connect ? await VhostUserBackend.connect(values.socket, disk, { ...options, timeoutMs: 30_000 }) : VhostUserBackend.listen(values.socket, disk, options);
  backend.on('connect', () => log('front-end connected'));
  backend.on('disconnect', (err) => log(`front-end disconnected${err ? `: ${err.message}` : ''}`));
  log(`vhost-user-blk: ${values.file ?? 'null disk'}, ${disk.capacity} sectors, ${queues} queue(s)${disk.readOnly ? ', read-only' : ''}, on ${values.socket}`);
  await new Promise<void>((resolve) => {
    const stop = (): void => resolve();
    process.once('SIGINT', stop);
    process.once('SIGTERM', stop);
  });
  backend.close();
  disk.close();
  const s = disk.stats;
  const t = backend.iotlbStats;
  log(`stopped: ${s.reads} reads (${s.bytesRead} B), ${s.writes} writes (${s.bytesWritten} B), ${s.flushes} flushes, ${s.errors} errors${values.iommu ? `; IOTLB: ${t.misses} misses, ${t.updates} updates, ${t.invalidations} invalidations` : ''}`);
  return 0;
}
