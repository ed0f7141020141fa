/**
 * The VFIO migration v2 state machine as a table.
 *
 * FSM_TABLE is the kernel's vfio_from_fsm_table (drivers/vfio/vfio_main.c,
 * vfio_mig_get_next_state): for a current state (row) and a target
 * (column), the next state on the shortest path when the device supports
 * every optional state. The path never passes through a saving state
 * (PRE_COPY, PRE_COPY_P2P, STOP_COPY) in its interior. When the device lacks
 * an optional state the table is simply re-read from that state until a
 * supported one comes up, so the device sees one arc across the skipped
 * states (e.g. STOP -> RUNNING directly when RUNNING_P2P is unsupported).
 * STOP_COPY -> PRE_COPY and STOP_COPY -> PRE_COPY_P2P are blocked.
 *
 * One deliberate difference from older kernels: their skip loop did not stop
 * at ERROR, and looped forever on a blocked arc of a PRE_COPY device; a 2026
 * fix stops it there, and so do we (the result is EINVAL).
 */
import { Errno, VfioError, errnoOf, invalid } from './errors.js';
import { MIGRATION_NUM_STATES, MigrationFlag, MigrationState, isMigrationState, migrationStateName } from './uapi.js';

const { ERROR, STOP, RUNNING, STOP_COPY, RESUMING, RUNNING_P2P, PRE_COPY, PRE_COPY_P2P } = MigrationState;

/** Next hop from row to column when every optional state is supported (ERROR: no path). */
export const FSM_TABLE: readonly (readonly MigrationState[])[] = [
  //  to: ERROR  STOP         RUNNING      STOP_COPY     RESUMING     RUNNING_P2P  PRE_COPY  PRE_COPY_P2P
  /* ERROR */ [ERROR, ERROR, ERROR, ERROR, ERROR, ERROR, ERROR, ERROR],
  /* STOP */ [ERROR, STOP, RUNNING_P2P, STOP_COPY, RESUMING, RUNNING_P2P, RUNNING_P2P, RUNNING_P2P],
  /* RUNNING */ [ERROR, RUNNING_P2P, RUNNING, RUNNING_P2P, RUNNING_P2P, RUNNING_P2P, PRE_COPY, RUNNING_P2P],
  /* STOP_COPY */ [ERROR, STOP, STOP, STOP_COPY, STOP, STOP, ERROR, ERROR],
  /* RESUMING */ [ERROR, STOP, STOP, STOP, RESUMING, STOP, STOP, STOP],
  /* RUNNING_P2P */ [ERROR, STOP, RUNNING, STOP, STOP, RUNNING_P2P, RUNNING, PRE_COPY_P2P],
  /* PRE_COPY */ [ERROR, RUNNING, RUNNING, PRE_COPY_P2P, RUNNING, RUNNING, PRE_COPY, PRE_COPY_P2P],
  /* PRE_COPY_P2P */ [ERROR, RUNNING_P2P, RUNNING_P2P, STOP_COPY, RUNNING_P2P, RUNNING_P2P, PRE_COPY, PRE_COPY_P2P],
];

const SC = MigrationFlag.STOP_COPY;
const P2P = MigrationFlag.P2P;
const PRE = MigrationFlag.PRE_COPY;

/** MigrationFlag bits a device needs for each state; ERROR can never be requested. */
const STATE_FLAGS: readonly number[] = [
  /* ERROR */ -1,
  /* STOP */ SC,
  /* RUNNING */ SC,
  /* STOP_COPY */ SC,
  /* RESUMING */ SC,
  /* RUNNING_P2P */ SC | P2P,
  /* PRE_COPY */ SC | PRE,
  /* PRE_COPY_P2P */ SC | P2P | PRE,
];

function checkFlags(flags: number): void {
  if (!Number.isInteger(flags) || flags < 0) throw new RangeError(`bad migration flags ${flags}`);
}

/** True when a device with these MigrationFlag bits has `state` (ERROR never counts). */
export function isStateSupported(state: number, flags: number): boolean {
  checkFlags(flags);
  if (!isMigrationState(state) || state === ERROR) return false;
  const need = STATE_FLAGS[state]!;
  return (flags & need) === need;
}

/**
 * The next state on the way from `from` to `to` for a device with
 * `flags` (MigrationFlag bits); `to` itself when from === to or the arc is
 * direct. Throws VfioError EINVAL when `to` is ERROR, out of range or not
 * supported, when `from` is ERROR or not supported, or when no path exists
 * (STOP_COPY to a PRE_COPY state).
 */
export function nextState(from: number, to: number, flags: number): MigrationState {
  checkFlags(flags);
  if (from === ERROR) throw invalid('MIG_IN_ERROR', 'the device is in ERROR; only a reset leaves it');
  if (!isStateSupported(from, flags)) {
    throw invalid('MIG_STATE_UNSUPPORTED', `current state ${migrationStateName(from)} is not supported by the device`);
  }
  if (to === ERROR) throw invalid('MIG_TO_ERROR', 'ERROR cannot be requested');
  if (!isMigrationState(to)) throw invalid('MIG_BAD_STATE', `no migration state ${to}`);
  if (!isStateSupported(to, flags)) {
    throw invalid('MIG_STATE_UNSUPPORTED', `state ${migrationStateName(to)} is not supported by the device`);
  }
  let next = FSM_TABLE[from]![to]!;
  while (next !== ERROR && !isStateSupported(next, flags)) next = FSM_TABLE[next]![to]!;
  if (next === ERROR) {
    throw invalid('MIG_ARC_BLOCKED', `${migrationStateName(from)} -> ${migrationStateName(to)} is not allowed`);
  }
  return next;
}

/**
 * Every state the device passes through from `from` to `to`, `to` included,
 * `from` not ([] when they are equal). Throws like nextState().
 */
export function migrationPath(from: number, to: number, flags: number): MigrationState[] {
  const path: MigrationState[] = [];
  let cur: number = from;
  while (cur !== to) {
    const next = nextState(cur, to, flags);
    path.push(next);
    cur = next;
    if (path.length > MIGRATION_NUM_STATES) throw new Error('migration table does not converge'); // unreachable
  }
  return path;
}

/** The direct arcs [from, to] a device with `flags` must implement: the only ones its transition callback sees. */
export function directArcs(flags: number): [MigrationState, MigrationState][] {
  const arcs: [MigrationState, MigrationState][] = [];
  for (let from = 0; from < MIGRATION_NUM_STATES; from++) {
    if (!isStateSupported(from, flags)) continue;
    for (let to = 0; to < MIGRATION_NUM_STATES; to++) {
      if (to === from || !isStateSupported(to, flags)) continue;
      try {
        if (nextState(from, to, flags) === to) arcs.push([from as MigrationState, to as MigrationState]);
      } catch {
        // blocked arc
      }
    }
  }
  return arcs;
}

/** Performs one direct arc on the device; throw (or reject) to fail it. */
export type MigrationArcHandler = (from: MigrationState, to: MigrationState) => void | Promise<void>;

export interface MigrationFsmOptions {
  /** MigrationFlag bits the device supports; STOP_COPY is required for any state to be valid. */
  flags: number;
  /** Called once per direct arc, in path order. */
  transition: MigrationArcHandler;
  /** State at creation (default RUNNING). */
  initial?: MigrationState;
  /**
   * What a failed arc leaves behind: 'error' (default) puts the device in
   * ERROR, from which only reset() leaves (the kernel uapi's rule for a
   * device that cannot restore a valid state); 'stay' keeps the last state
   * reached, as libvfio-user does.
   */
  onFailure?: 'error' | 'stay';
}

/**
 * A device's migration state, driven through the table. setState() walks the
 * path one direct arc at a time, calling `transition` for each, and the new
 * state is the one reached. Only one setState() runs at a time (EBUSY).
 */
export class MigrationFsm {
  readonly flags: number;
  readonly #transition: MigrationArcHandler;
  readonly #onFailure: 'error' | 'stay';
  #state: MigrationState;
  #busy = false;

  constructor(options: MigrationFsmOptions) {
    checkFlags(options.flags);
    this.flags = options.flags;
    this.#transition = options.transition;
    this.#onFailure = options.onFailure ?? 'error';
    const initial = options.initial ?? RUNNING;
    if (!isStateSupported(initial, this.flags)) {
      throw new RangeError(`initial state ${migrationStateName(initial)} is not supported with flags ${this.flags}`);
    }
    this.#state = initial;
  }

  /** The current state (MIG_DEVICE_STATE GET). */
  get state(): MigrationState {
    return this.#state;
  }

  /** True while a setState() is walking its path. */
  get busy(): boolean {
    return this.#busy;
  }

  /**
   * MIG_DEVICE_STATE SET: moves to `target` through the table. Rejects with
   * VfioError EINVAL (nothing done) for an invalid or unreachable target or
   * while in ERROR, EBUSY while another setState() runs; when an arc throws,
   * rejects with VfioError `MIG_ARC_FAILED` carrying the thrown errno (EIO if
   * none) and the thrown value as `cause`, leaving the state per onFailure.
   * Resolves with the new state.
   */
  async setState(target: number): Promise<MigrationState> {
    if (this.#busy) throw new VfioError('MIG_BUSY', Errno.EBUSY, 'a migration state change is in progress');
    if (this.#state === ERROR) throw invalid('MIG_IN_ERROR', 'the device is in ERROR; only a reset leaves it');
    if (target === this.#state) return this.#state;
    const path = migrationPath(this.#state, target, this.flags);
    this.#busy = true;
    try {
      for (const next of path) {
        const from = this.#state;
        try {
          await this.#transition(from, next);
        } catch (err) {
          if (this.#onFailure === 'error') this.#state = ERROR;
          throw new VfioError(
            'MIG_ARC_FAILED',
            errnoOf(err),
            `arc ${migrationStateName(from)} -> ${migrationStateName(next)} failed; now in ${migrationStateName(this.#state)}`,
            { cause: err },
          );
        }
        this.#state = next;
      }
      return this.#state;
    } finally {
      this.#busy = false;
    }
  }

  /**
   * Device reset: the state becomes RUNNING, whatever it was (the uapi's way
   * out of ERROR). The transition callback is not called; the device resets
   * itself. EBUSY while a setState() runs.
   */
  reset(): void {
    if (this.#busy) throw new VfioError('MIG_BUSY', Errno.EBUSY, 'a migration state change is in progress');
    this.#state = RUNNING;
  }
}
