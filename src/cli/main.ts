#!/usr/bin/env node
import { VERSION } from '../version.js';

const HELP = `vdevkit ${VERSION}: virtual devices out of process, in TypeScript

Usage: vdevkit <command> [options]

Commands:
  demo        run the demo (two processes sharing memory and eventfds over a UNIX socket)
  version     print the version
  help        print this help

Options:
  -h, --help      print this help
  -v, --version   print the version
`;

async function main(argv: string[]): Promise<number> {
  const cmd = argv[0];
  switch (cmd) {
    case undefined:
    case 'help':
    case '-h':
    case '--help':
      process.stdout.write(HELP);
      return 0;
    case 'version':
    case '-v':
    case '--version':
      process.stdout.write(`${VERSION}\n`);
      return 0;
    case 'demo': {
      const { runSysDemo } = await import('../demo/sys-demo.js');
      await runSysDemo();
      return 0;
    }
    default:
      process.stderr.write(`vdevkit: unknown command '${cmd}'\n\n${HELP}`);
      return 2;
  }
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (err: unknown) => {
    process.stderr.write(`vdevkit: ${err instanceof Error ? err.message : String(err)}\n`);
    process.exitCode = 1;
  },
);
