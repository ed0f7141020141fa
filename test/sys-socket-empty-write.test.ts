/**
 * Review: a zero-length write queued while corked is never removed from the
 * write queue: #flush sends 0 bytes, consumes nothing, and loops forever
 * inside uncork() (the process hangs). Run in a child so the suite survives.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';

test('cork(); write(empty); uncork() returns', () => {
  const sys = new URL('../src/sys/index.js', import.meta.url).href;
  const script = `
    import { socketPair } from ${JSON.stringify(sys)};
    const [a, b] = socketPair();
    a.cork();
    a.write(Buffer.alloc(4));
    a.write(Buffer.alloc(0));
    a.uncork();
    a.destroy();
    b.destroy();
  `;
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], { timeout: 10_000 });
  assert.equal(r.signal, null, 'uncork() did not return within 10 s (killed)');
  assert.equal(r.status, 0, r.stderr.toString());
});
