/**
 * The fuzzer in `npm test`: every saved reproducer (test/fixtures/fuzz/<target>/*.json)
 * replays with no finding, and each target runs a short seeded batch of inputs
 * (bounded by count, so the run is the same on every machine) with none.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { replay, runTarget, type Reproducer } from '../src/fuzz/harness.js';
import { TARGETS, targetByName } from '../src/fuzz/targets/index.js';

const FIXTURES = path.join(process.cwd(), 'test', 'fixtures', 'fuzz');

test('every saved fuzz reproducer replays without a finding', async () => {
  const files = fs.existsSync(FIXTURES)
    ? fs.readdirSync(FIXTURES).flatMap((d) => (fs.statSync(path.join(FIXTURES, d)).isDirectory() ? fs.readdirSync(path.join(FIXTURES, d)).filter((f) => f.endsWith('.json')).map((f) => path.join(FIXTURES, d, f)) : []))
    : [];
  for (const f of files) {
    const r = JSON.parse(fs.readFileSync(f, 'utf8')) as Reproducer;
    const t = targetByName(r.target);
    assert.ok(t, `${f}: unknown target ${r.target}`);
    await replay(t, r);
  }
});

const BOUNDED: Record<string, number> = {
  'vfio-user-codec': 3000, 'vfio-user-server': 300, 'vfio-user-client': 300,
  'vhost-user-codec': 1000, 'vhost-user-backend': 300, 'virtio-split': 5000, 'virtio-packed': 5000,
};

for (const t of TARGETS) {
  test(`fuzz ${t.name}: a seeded bounded run finds nothing`, { timeout: 60_000 }, async () => {
    const r = await runTarget(t, { seconds: 30, seed: 0x16f022, maxInputs: BOUNDED[t.name] ?? 100, saveDir: null, batch: 25 });
    assert.equal(r.inputs, BOUNDED[t.name] ?? 100);
    assert.deepEqual(r.findings, []);
  });
}
