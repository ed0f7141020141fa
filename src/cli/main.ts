#!/usr/bin/env node
import { VERSION } from '../version.js';

const HELP = `vdevkit ${VERSION}: virtual devices out of process, in TypeScript

Usage: vdevkit <command> [options]

Commands:
  serve       serve a PCI device over vfio-user (vdevkit serve --help)
  lspci       describe the device behind a vfio-user socket, like lspci -vvv
  probe       conformance check of any vfio-user server
  migrate     live-migrate a device between two vfio-user servers
  vhost-user-blk  serve a virtio-blk disk over vhost-user (vdevkit vhost-user-blk --help)
  vhost-user-net  a learning L2 switch whose ports are vhost-user sockets
  vhost-user-probe  what a vhost-user back-end offers, and a conformance check
  blk-bench   a small fio-like job against a vhost-user-blk back-end
  demo [sys]  run the demo: a virtio-blk PCI device over vfio-user driven by
              our userspace virtio PCI driver; our switch (polling) between two of our virtio-net
              drivers; a virtio-blk disk over vhost-user driven by our
              front-end; a vfio-user device served, driven and migrated
              (sys: two processes sharing a memfd and eventfds)
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
    case 'serve': {
      const { serve } = await import('./serve.js');
      return serve(argv.slice(1));
    }
    case 'lspci':
    case 'probe': {
      const { lspciCommand } = await import('./lspci.js');
      return lspciCommand(cmd, argv.slice(1));
    }
    case 'migrate': {
      const { migrateCommand } = await import('./migrate.js');
      return migrateCommand(argv.slice(1));
    }
    case 'vhost-user-blk': {
      const { vhostUserBlkCommand } = await import('./vhost-user-blk.js');
      return vhostUserBlkCommand(argv.slice(1));
    }
    case 'vhost-user-net': {
      const { vhostUserNetCommand } = await import('./vhost-user-net.js');
      return vhostUserNetCommand(argv.slice(1));
    }
    case 'vhost-user-probe': {
      const { vhostUserProbeCommand } = await import('./vhost-user-probe.js');
      return vhostUserProbeCommand(argv.slice(1));
    }
    case 'blk-bench': {
      const { blkBenchCommand } = await import('./blk-bench.js');
      return blkBenchCommand(argv.slice(1));
    }
    case 'demo': {
      if (argv[1] === 'sys') {
        const { runSysDemo } = await import('../demo/sys-demo.js');
        await runSysDemo();
      } else {
        const { runVirtioPciDemo } = await import('../demo/virtio-pci-demo.js');
        await runVirtioPciDemo();
        const { runNetDemo } = await import('../demo/net-demo.js');
        await runNetDemo();
        const { runVhostUserDemo } = await import('../demo/vhost-user-demo.js');
        await runVhostUserDemo();
        const { runVfioUserDemo } = await import('../demo/vfio-user-demo.js');
        await runVfioUserDemo();
      }
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
