import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MigrationFsm, VfioError, directArcs, migrationPath, nextState } from '../src/vfio/index.js';

// States and flags written out from linux/vfio.h.
const NAMES = ['ERROR', 'STOP', 'RUNNING', 'STOP_COPY', 'RESUMING', 'RUNNING_P2P', 'PRE_COPY', 'PRE_COPY_P2P'];
const S: Record<string, number> = Object.fromEntries(NAMES.map((n, i) => [n, i]));
const SHORT: Record<string, string> = {
  E: 'ERROR', S: 'STOP', R: 'RUNNING', SC: 'STOP_COPY', RS: 'RESUMING', RP: 'RUNNING_P2P', PC: 'PRE_COPY', PCP: 'PRE_COPY_P2P',
};
const STOP_COPY = 1;
const P2P = 2;
const PRE_COPY = 4;

/**
 * Expected next hop, worked out by hand from the kernel's table and its skip
 * rule. Rows: from; columns: to, in state order
 * ERROR STOP RUNNING STOP_COPY RESUMING RUNNING_P2P PRE_COPY PRE_COPY_P2P.
 * 'x' = EINVAL.
 */
const EXPECTED: Record<string, string[]> = {
  'STOP_COPY|P2P|PRE_COPY': [
    /* ERROR        */ 'x x  x  x   x  x  x  x',
    /* STOP         */ 'x S  RP SC  RS RP RP RP',
    /* RUNNING      */ 'x RP R  RP  RP RP PC RP',
    /* STOP_COPY    */ 'x S  S  SC  S  S  x  x',
    /* RESUMING     */ 'x S  S  S   RS S  S  S',
    /* RUNNING_P2P  */ 'x S  R  S   S  RP R  PCP',
    /* PRE_COPY     */ 'x R  R  PCP R  R  PC PCP',
    /* PRE_COPY_P2P */ 'x RP RP SC  RP RP PC PCP',
  ],
  STOP_COPY: [
    'x x x x  x  x x x',
    'x S R SC RS x x x',
    'x S R S  S  x x x',
    'x S S SC S  x x x',
    'x S S S  RS x x x',
    'x x x x  x  x x x',
    'x x x x  x  x x x',
    'x x x x  x  x x x',
  ],
  'STOP_COPY|P2P': [
    'x x  x  x  x  x  x x',
    'x S  RP SC RS RP x x',
    'x RP R  RP RP RP x x',
    'x S  S  SC S  S  x x',
    'x S  S  S  RS S  x x',
    'x S  R  S  S  RP x x',
    'x x  x  x  x  x  x x',
    'x x  x  x  x  x  x x',
  ],
  'STOP_COPY|PRE_COPY': [
    'x x x x  x  x x  x',
    'x S R SC RS x R  x',
    'x S R S  S  x PC x',
    'x S S SC S  x x  x',
    'x S S S  RS x S  x',
    'x x x x  x  x x  x',
    'x R R SC R  x PC x',
    'x x x x  x  x x  x',
  ],
};

const FLAGS: Record<string, number> = {
  'STOP_COPY|P2P|PRE_COPY': STOP_COPY | P2P | PRE_COPY,
  STOP_COPY,
  'STOP_COPY|P2P': STOP_COPY | P2P,
  'STOP_COPY|PRE_COPY': STOP_COPY | PRE_COPY,
};

for (const [label, rows] of Object.entries(EXPECTED)) {
  test(`nextState: every (from, to) pair matches the kernel, flags ${label}`, () => {
    const flags = FLAGS[label]!;
    rows.forEach((row, from) => {
      const cells = row.trim().split(/\s+/);
      assert.equal(cells.length, 8);
      cells.forEach((cell, to) => {
        const what = `${NAMES[from]} -> ${NAMES[to]}`;
        if (cell === 'x') {
          assert.throws(
            () => nextState(from, to, flags),
            (err: unknown) => err instanceof VfioError && err.errno === 22,
            `${what} should be EINVAL`,
          );
        } else {
          assert.equal(NAMES[nextState(from, to, flags)], SHORT[cell], what);
        }
      });
    });
  });
}

test('nextState: out-of-range and non-integer states are EINVAL', () => {
  const all = STOP_COPY | P2P | PRE_COPY;
  for (const bad of [8, 9, -1, 1.5, 255]) {
    assert.throws(() => nextState(S.RUNNING!, bad, all), (e: unknown) => e instanceof VfioError && e.errno === 22);
    assert.throws(() => nextState(bad, S.RUNNING!, all), (e: unknown) => e instanceof VfioError && e.errno === 22);
  }
  // Without STOP_COPY no state is valid.
  assert.throws(() => nextState(S.RUNNING!, S.STOP!, P2P | PRE_COPY), VfioError);
});

/** The combination paths listed in the kernel's vfio_mig_get_next_state comment (all features). */
const KERNEL_PATHS = [
  'PRE_COPY PRE_COPY_P2P STOP_COPY',
  'PRE_COPY RUNNING RUNNING_P2P',
  'PRE_COPY RUNNING RUNNING_P2P STOP',
  'PRE_COPY RUNNING RUNNING_P2P STOP RESUMING',
  'PRE_COPY_P2P RUNNING_P2P RUNNING',
  'PRE_COPY_P2P RUNNING_P2P STOP',
  'PRE_COPY_P2P RUNNING_P2P STOP RESUMING',
  'RESUMING STOP RUNNING_P2P',
  'RESUMING STOP RUNNING_P2P PRE_COPY_P2P',
  'RESUMING STOP RUNNING_P2P RUNNING',
  'RESUMING STOP RUNNING_P2P RUNNING PRE_COPY',
  'RESUMING STOP STOP_COPY',
  'RUNNING RUNNING_P2P PRE_COPY_P2P',
  'RUNNING RUNNING_P2P STOP',
  'RUNNING RUNNING_P2P STOP RESUMING',
  'RUNNING RUNNING_P2P STOP STOP_COPY',
  'RUNNING_P2P RUNNING PRE_COPY',
  'RUNNING_P2P STOP RESUMING',
  'RUNNING_P2P STOP STOP_COPY',
  'STOP RUNNING_P2P PRE_COPY_P2P',
  'STOP RUNNING_P2P RUNNING',
  'STOP RUNNING_P2P RUNNING PRE_COPY',
  'STOP_COPY STOP RESUMING',
  'STOP_COPY STOP RUNNING_P2P',
  'STOP_COPY STOP RUNNING_P2P RUNNING',
];

test('migrationPath: the kernel comment combination paths (all features)', () => {
  const all = STOP_COPY | P2P | PRE_COPY;
  for (const line of KERNEL_PATHS) {
    const [from, ...rest] = line.split(' ').map((n) => S[n]!);
    assert.deepEqual(migrationPath(from!, rest[rest.length - 1]!, all).map((s) => NAMES[s]), rest.map((s) => NAMES[s]), line);
  }
});

test('migrationPath: lengths, including vfio-user (STOP_COPY|PRE_COPY) paths', () => {
  const vfu = STOP_COPY | PRE_COPY;
  const p = (from: string, to: string, flags: number): string[] => migrationPath(S[from]!, S[to]!, flags).map((s) => NAMES[s]!);
  assert.deepEqual(p('RUNNING', 'RESUMING', vfu), ['STOP', 'RESUMING']);
  assert.deepEqual(p('RESUMING', 'PRE_COPY', vfu), ['STOP', 'RUNNING', 'PRE_COPY']);
  assert.deepEqual(p('PRE_COPY', 'STOP', vfu), ['RUNNING', 'STOP']);
  assert.deepEqual(p('PRE_COPY', 'RESUMING', vfu), ['RUNNING', 'STOP', 'RESUMING']);
  assert.deepEqual(p('PRE_COPY', 'STOP_COPY', vfu), ['STOP_COPY']);
  assert.deepEqual(p('STOP_COPY', 'RUNNING', vfu), ['STOP', 'RUNNING']);
  assert.deepEqual(p('RUNNING', 'RUNNING', vfu), []);
  assert.deepEqual(p('RUNNING', 'STOP', STOP_COPY), ['STOP']);
  assert.deepEqual(p('STOP', 'RUNNING', STOP_COPY | P2P), ['RUNNING_P2P', 'RUNNING']);

  const longest = (flags: number, states: number[]): number =>
    Math.max(...states.flatMap((f) => states.map((t) => migrationPath(f, t, flags).length)));
  assert.equal(longest(STOP_COPY, [1, 2, 3, 4]), 2);
  assert.equal(longest(STOP_COPY | P2P, [1, 2, 3, 4, 5]), 3);
  assert.equal(longest(vfu, [1, 2, 4, 6]), 3); // STOP_COPY is left out: it cannot reach PRE_COPY
  assert.equal(longest(STOP_COPY | P2P | PRE_COPY, [1, 2, 4, 5, 6, 7]), 4);
  assert.throws(() => migrationPath(S.STOP_COPY!, S.PRE_COPY!, vfu), VfioError);
});

test('directArcs: the arcs each feature set requires', () => {
  const names = (flags: number): string[] => directArcs(flags).map(([f, t]) => `${NAMES[f]}>${NAMES[t]}`).sort();
  assert.deepEqual(names(STOP_COPY), ['RESUMING>STOP', 'RUNNING>STOP', 'STOP>RESUMING', 'STOP>RUNNING', 'STOP>STOP_COPY', 'STOP_COPY>STOP']);
  assert.deepEqual(names(STOP_COPY | PRE_COPY), [
    'PRE_COPY>RUNNING', 'PRE_COPY>STOP_COPY', 'RESUMING>STOP', 'RUNNING>PRE_COPY', 'RUNNING>STOP',
    'STOP>RESUMING', 'STOP>RUNNING', 'STOP>STOP_COPY', 'STOP_COPY>STOP',
  ]);
  assert.deepEqual(names(STOP_COPY | P2P | PRE_COPY), [
    'PRE_COPY>PRE_COPY_P2P', 'PRE_COPY>RUNNING', 'PRE_COPY_P2P>PRE_COPY', 'PRE_COPY_P2P>RUNNING_P2P',
    'PRE_COPY_P2P>STOP_COPY', 'RESUMING>STOP', 'RUNNING>PRE_COPY', 'RUNNING>RUNNING_P2P', 'RUNNING_P2P>PRE_COPY_P2P',
    'RUNNING_P2P>RUNNING', 'RUNNING_P2P>STOP', 'STOP>RESUMING', 'STOP>RUNNING_P2P', 'STOP>STOP_COPY', 'STOP_COPY>STOP',
  ]);
});

function rejectsWith(p: Promise<unknown>, code: string, errno: number): Promise<void> {
  return assert.rejects(p, (err: unknown) => {
    assert.ok(err instanceof VfioError, `expected VfioError, got ${String(err)}`);
    assert.equal(err.code, code);
    assert.equal(err.errno, errno);
    return true;
  });
}

test('MigrationFsm: calls the device once per arc, in order', async () => {
  const arcs: string[] = [];
  const fsm = new MigrationFsm({
    flags: STOP_COPY | PRE_COPY,
    transition: async (from, to) => {
      await Promise.resolve();
      arcs.push(`${NAMES[from]}>${NAMES[to]}`);
    },
  });
  assert.equal(fsm.state, S.RUNNING);
  assert.equal(await fsm.setState(S.RESUMING!), S.RESUMING);
  assert.equal(await fsm.setState(S.PRE_COPY!), S.PRE_COPY);
  assert.equal(await fsm.setState(S.PRE_COPY!), S.PRE_COPY);
  assert.deepEqual(arcs, ['RUNNING>STOP', 'STOP>RESUMING', 'RESUMING>STOP', 'STOP>RUNNING', 'RUNNING>PRE_COPY']);
});

test('MigrationFsm: invalid targets are EINVAL and call nothing', async () => {
  let calls = 0;
  const fsm = new MigrationFsm({ flags: STOP_COPY | PRE_COPY, transition: () => void calls++, initial: 3 });
  await rejectsWith(fsm.setState(S.PRE_COPY!), 'MIG_ARC_BLOCKED', 22);
  await rejectsWith(fsm.setState(S.ERROR!), 'MIG_TO_ERROR', 22);
  await rejectsWith(fsm.setState(S.RUNNING_P2P!), 'MIG_STATE_UNSUPPORTED', 22);
  await rejectsWith(fsm.setState(8), 'MIG_BAD_STATE', 22);
  assert.equal(calls, 0);
  assert.equal(fsm.state, S.STOP_COPY);
  assert.throws(() => new MigrationFsm({ flags: STOP_COPY, transition: () => {}, initial: 6 }), RangeError);
});

test('MigrationFsm: a failing arc enters ERROR; only reset leaves it', async () => {
  const fsm = new MigrationFsm({
    flags: STOP_COPY,
    transition: (_from, to) => {
      if (to === S.RESUMING) throw new VfioError('DEVICE_FULL', 28, 'no room');
    },
  });
  await assert.rejects(fsm.setState(S.RESUMING!), (err: unknown) => {
    assert.ok(err instanceof VfioError);
    assert.equal(err.code, 'MIG_ARC_FAILED');
    assert.equal(err.errno, 28);
    assert.ok(err.cause instanceof VfioError);
    return true;
  });
  assert.equal(fsm.state, S.ERROR);
  await rejectsWith(fsm.setState(S.RUNNING!), 'MIG_IN_ERROR', 22);
  await rejectsWith(fsm.setState(S.ERROR!), 'MIG_IN_ERROR', 22);
  fsm.reset();
  assert.equal(fsm.state, S.RUNNING);
  assert.equal(await fsm.setState(S.STOP!), S.STOP);
});

test('MigrationFsm: onFailure "stay" keeps the last state reached; plain errors map to EIO', async () => {
  const fsm = new MigrationFsm({
    flags: STOP_COPY,
    onFailure: 'stay',
    transition: (_from, to) => {
      if (to === S.RESUMING) throw new Error('disk gone');
    },
  });
  await rejectsWith(fsm.setState(S.RESUMING!), 'MIG_ARC_FAILED', 5);
  assert.equal(fsm.state, S.STOP);
});

test('MigrationFsm: one state change at a time', async () => {
  let release!: () => void;
  const gate = new Promise<void>((r) => (release = r));
  const fsm = new MigrationFsm({ flags: STOP_COPY, transition: () => gate });
  const first = fsm.setState(S.STOP!);
  assert.equal(fsm.busy, true);
  await rejectsWith(fsm.setState(S.STOP_COPY!), 'MIG_BUSY', 16);
  assert.throws(() => fsm.reset(), (e: unknown) => e instanceof VfioError && e.errno === 16);
  release();
  assert.equal(await first, S.STOP);
  assert.equal(fsm.busy, false);
});
