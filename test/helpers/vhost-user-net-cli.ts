/**
 * Runs `vdevkit vhost-user-net` (src/cli/vhost-user-net.ts) as a process of its
 * own for the tests, before the command is wired into src/cli/main.ts:
 *
 *   node dist/test/helpers/vhost-user-net-cli.js --socket a.sock --socket b.sock --json
 */
import { vhostUserNetCommand } from '../../src/cli/vhost-user-net.js';

process.exitCode = await vhostUserNetCommand(process.argv.slice(2));
