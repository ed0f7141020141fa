/** `vdevkit serve <device> --socket PATH`: serve a ready-made device over vfio-user. */
import { parseArgs } from 'node:util';
import { VfioUserServer } from '../vfio-user/server.js';
import { devices } from '../devices/index.js';

/** Every device's own options (each device takes only its own). */
const deviceOptions = Object.entries(devices).flatMap(([device, d]) =>
  Object.entries(d.options ?? {}).map(([name, o]) => ({ device, name, ...o })),
);

export const SERVE_HELP = `Usage: vdevkit serve <device> --socket PATH [--trace] [--quiet]

Serves a device to vfio-user clients (QEMU's vfio-user-pci, cloud-hypervisor,
vdevkit's own client) on a UNIX socket. One client at a time drives the
device; its state is kept when a client disconnects and reconnects.

Devices:
${Object.entries(devices)
  .map(([name, d]) => `  ${name.padEnd(10)} ${d.description}`)
  .join('\n')}

Options:
  -s, --socket PATH   socket path to listen on (a stale socket file is replaced)
  -t, --trace         print every message, decoded
  -q, --quiet         no connection log
      --max-data-xfer-size N   our max_data_xfer_size (default 1048576)

Device options:
${deviceOptions.map((o) => `  ${o.device.padEnd(10)} --${o.name}${o.type === 'string' ? ' VALUE' : ''}: ${o.help}`).join('\n')}
`;

export async function serve(argv: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      socket: { type: 'string', short: 's' },
      trace: { type: 'boolean', short: 't' },
      quiet: { type: 'boolean', short: 'q' },
      help: { type: 'boolean', short: 'h' },
      'max-data-xfer-size': { type: 'string' },
      ...Object.fromEntries(deviceOptions.map((o) => [o.name, { type: o.type }])),
    },
  });
  if (values.help) {
    process.stdout.write(SERVE_HELP);
    return 0;
  }
  const name = positionals[0];
  const entry = name ? devices[name] : undefined;
  if (!entry || !values.socket) {
    process.stderr.write(`vdevkit serve: ${!entry ? `unknown device '${name ?? ''}'` : '--socket PATH is required'}\n\n${SERVE_HELP}`);
    return 2;
  }
  const given = values as Record<string, string | boolean | undefined>;
  const foreign = deviceOptions.find((o) => o.device !== name && given[o.name] !== undefined && !entry.options?.[o.name]);
  if (foreign) {
    process.stderr.write(`vdevkit serve: --${foreign.name} is an option of ${foreign.device}, not of ${name}\n`);
    return 2;
  }
  const deviceValues = Object.fromEntries(Object.keys(entry.options ?? {}).map((k) => [k, given[k]]));
  const log = values.quiet ? () => {} : (line: string) => process.stderr.write(`vdevkit: ${line}\n`);
  const xfer = values['max-data-xfer-size'] ? Number(values['max-data-xfer-size']) : undefined;
  if (xfer !== undefined && (!Number.isSafeInteger(xfer) || xfer < 4096)) {
    process.stderr.write('vdevkit serve: --max-data-xfer-size must be an integer >= 4096\n');
    return 2;
  }
  let device;
  try {
    device = entry.create({ log: (line) => log(`${name}: ${line}`), values: deviceValues });
  } catch (err) {
    process.stderr.write(`vdevkit serve: ${name}: ${(err as Error).message}\n`);
    return 1;
  }
  const server = VfioUserServer.listen(values.socket, {
    device,
    log,
    ...(xfer !== undefined ? { maxDataXferSize: xfer } : {}),
    ...(values.trace ? { trace: (line: string) => process.stdout.write(`${line}\n`) } : {}),
  });
  log(`serving ${name} on ${server.path}`);
  await new Promise<void>((resolve) => {
    const stop = (): void => {
      server.close();
      resolve();
    };
    process.once('SIGINT', stop);
    process.once('SIGTERM', stop);
  });
  entry.dispose?.(device);
  log('stopped');
  return 0;
}
