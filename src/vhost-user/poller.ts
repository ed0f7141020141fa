/**
 * Busy-polling of rings, as DPDK's PMDs do: a polled ring has its kick
 * notifications switched off (VRING_USED_F_NO_NOTIFY / the packed ring's
 * device event suppression DISABLE), and instead of waiting for a kick the
 * thread's poll loop calls the device's handler for it over and over.
 *
 * The loop runs one pass over every polled ring per turn of the event loop
 * (setImmediate), so the same thread still serves its sockets (the vhost-user
 * control messages, other ports' kicks) between passes: the thread spins at
 * 100% of a core while a ring is polled and goes back to sleep when the last
 * one stops. Run it on a worker thread (src/devices/net-switch-thread.ts) to
 * keep the main thread free.
 *
 * One loop per thread: every back-end in the thread shares it.
 */

export interface Pollable {
  /** One pass: take what the ring has (the handler must not re-enable notifications); false: nothing done. */
  pollOnce(): boolean;
}

/**
 * A pass in which no ring made progress is followed by a sleep this long (a futex
 * wait): on a machine with fewer cores than spinning threads the peers we wait for
 * (a receiver refilling its ring) get the CPU, instead of us spinning on it.
 */
const IDLE_SLEEP_MS = 0.02;

export class Poller {
  readonly #rings = new Set<Pollable>();
  readonly #sleeper = new Int32Array(new SharedArrayBuffer(4));
  #running = false;
  /** Passes run so far (every ring once per pass). */
  passes = 0;
  /** Passes that found nothing to do (each followed by a short sleep). */
  idlePasses = 0;

  get size(): number {
    return this.#rings.size;
  }

  add(r: Pollable): void {
    this.#rings.add(r);
    if (!this.#running) {
      this.#running = true;
      setImmediate(this.#turn);
    }
  }

  delete(r: Pollable): void {
    this.#rings.delete(r);
  }

  readonly #turn = (): void => {
    if (this.#rings.size === 0) {
      this.#running = false;
      return;
    }
    this.passes++;
    let busy = false;
    for (const r of this.#rings) if (r.pollOnce()) busy = true;
    if (!busy) {
      this.idlePasses++;
      Atomics.wait(this.#sleeper, 0, 0, IDLE_SLEEP_MS);
    }
    setImmediate(this.#turn);
  };
}

/** The poll loop of this thread. */
export const threadPoller = new Poller();
