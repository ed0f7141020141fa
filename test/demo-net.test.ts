/** `npm start`'s net part: our switch (polling, its own process) between two of our VirtioNetDrivers. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { runNetDemo } from '../src/demo/net-demo.js';

test('the net demo sends 20000 frames through the polling switch, each checked, none dropped', { timeout: 60_000 }, async () => {
  const lines: string[] = [];
  await runNetDemo((l) => lines.push(l));
  const out = lines.join('\n');
  assert.match(out, /A -> B: 20000 frames of 60\.\.1514 bytes through the switch in \d+ ms .* every one checked byte for byte/);
  assert.match(out, /B -> A: a 1514-byte reply/);
  assert.match(out, /port a\.sock: 20001 frames from its driver, 2 to it, 0 dropped/, out);
  assert.match(out, /port b\.sock: 2 frames from its driver, 20001 to it, 0 dropped/, out);
});
