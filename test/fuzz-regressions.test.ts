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

test('runTarget --from: input i of a seed is the same in any run, so a long run resumes or splits by index range', async () => {
  const { Rng } = await import('../src/fuzz/rng.js');
  const seen: number[] = [];
  const recorder = {
    name: 'recorder',
    concurrency: 3,
    generate: (rng: InstanceType<typeof Rng>) => ({ msgs: [], cuts: [], extra: [rng.u32()] }),
    async start() {
      return {
        async run(input: { extra: number[] }) {
          seen.push(input.extra[0]!);
        },
        async probe() {},
        async close() {},
      };
    },
  };
  const whole = await runTarget(recorder, { seconds: 30, seed: 77, maxInputs: 10, saveDir: null, batch: 4 });
  assert.equal(whole.from, 0);
  const all = seen.splice(0);
  const a = await runTarget(recorder, { seconds: 30, seed: 77, maxInputs: 4, saveDir: null, batch: 4 });
  const b = await runTarget(recorder, { seconds: 30, seed: 77, from: 4, maxInputs: 6, saveDir: null, batch: 4 });
  assert.equal(a.inputs + b.inputs, 10);
  assert.equal(b.from, 4);
  assert.deepEqual(seen, all);
  // Independent of the harness: input i is generated from Rng.forInput(seed, i).
  assert.deepEqual(all, Array.from({ length: 10 }, (_, i) => Rng.forInput(77, i).u32()));
  await assert.rejects(runTarget(recorder, { seconds: 1, seed: 77, from: -1, maxInputs: 1, saveDir: null }), RangeError);
});
