/**
 * `npm run fuzz -- <target|all> --seconds N [--seed S] [--inputs N] [--from I] [--no-save]`:
 * runs a fuzz target (all of them one after the other), prints inputs per
 * second and totals, and saves each finding as a reproducer under
 * test/fixtures/fuzz/<target>/ (replayed by test/fuzz-regressions.test.ts).
 * `--from I` starts at input index I of the seed: a long run is resumed from the
 * "next index" of its last progress line, or split into ranges run side by side.
 */
import { runTarget } from './harness.js';
import { TARGETS, targetByName } from './targets/index.js';

function usage(): never {
  console.error(`usage: fuzz <target|all> --seconds N [--seed S] [--inputs N] [--from I] [--no-save]\ntargets: ${TARGETS.map((t) => t.name).join(', ')}`);
  process.exit(2);
}

async function main(): Promise<void> {
  const args = process.argv.slice(2);
  const name = args[0];
  if (!name || name.startsWith('-')) usage();
  let seconds = 10;
  let seed = (Date.now() & 0x7fffffff) >>> 0;
  let maxInputs: number | undefined;
  let from = 0;
  let save = true;
  for (let i = 1; i < args.length; i++) {
    const a = args[i]!;
    const v = (): number => {
      const n = Number(args[++i]);
      if (!Number.isFinite(n)) usage();
      return n;
    };
    if (a === '--seconds') seconds = v();
    else if (a === '--seed') seed = v() >>> 0;
    else if (a === '--inputs') maxInputs = v();
    else if (a === '--from') from = v();
    else if (a === '--no-save') save = false;
    else usage();
  }
  const targets = name === 'all' ? TARGETS : [targetByName(name) ?? usage()];
  // SIGINT / SIGTERM end a run cleanly: the inputs begun are finished and checked, and the report
  // gives the exact range run (a long run resumes with --from at its end).
  const stop = new AbortController();
  for (const sig of ['SIGINT', 'SIGTERM'] as const) process.once(sig, () => stop.abort());
  let findings = 0;
  let total = 0;
  for (const t of targets) {
    const r = await runTarget(t, {
      seconds,
      seed,
      from,
      signal: stop.signal,
      ...(maxInputs !== undefined ? { maxInputs } : {}),
      ...(save ? {} : { saveDir: null }),
      log: (l) => console.log(l),
    });
    findings += r.findings.length;
    total += r.inputs;
    if (stop.signal.aborted) console.log(`${r.target}: stopped by a signal; resume with --from ${r.from + r.inputs}`);
    console.log(`${r.target}: seed 0x${r.seed.toString(16)}, inputs ${r.from}..${r.from + r.inputs - 1}: ${r.inputs} inputs in ${r.seconds.toFixed(1)} s = ${Math.round(r.perSecond)} inputs/s, ${r.findings.length} findings`);
    for (const f of r.findings) console.log(`  ${f.kind}: ${f.message.split('\n')[0]}${f.file ? ` -> ${f.file}` : ''}`);
  }
  if (targets.length > 1) console.log(`total: ${total} inputs, ${findings} findings`);
  process.exitCode = findings > 0 ? 1 : 0;
}

await main();
