/** `npm start`'s demo with libvfio-user built: the cross-implementation migration runs and checks out. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { libvfioUserBuild } from './peers.js';

const MAIN = fileURLToPath(new URL('../../src/cli/main.js', import.meta.url));

test('the demo migrates libvfio-user\'s gpio into ours and back, counts equal', async () => {
  libvfioUserBuild(); // fails here if the peer is missing
  const out = await new Promise<string>((resolve, reject) =>
    execFile(process.execPath, [MAIN, 'demo'], { timeout: 120_000 }, (err, stdout, stderr) => (err ? reject(new Error(`${err.message}\n${stdout}\n${stderr}`)) : resolve(stdout))),
  );
  assert.match(out, /C -> TypeScript: 2 pre-copy rounds/);
  assert.match(out, /the same counts in C, in TypeScript and in C again/);
  assert.match(out, /demo done/);
});
