/**
 * The learning switch (net-switch.ts) on a worker thread: the whole data path
 * and the ports' vhost-user sockets live in the worker, so ports that busy-poll
 * their TX rings (VhostUserNetOptions.poll, DPDK-PMD style: kicks off while
 * polled) spin there and leave the main thread free. The main thread gets the
 * ports' counters (snapshot()), the port events and the log lines by message.
 *
 *   const sw = await NetSwitchThread.start({ ports: [
 *     { path: '/tmp/a.sock', device: { poll: true } },    // busy-polled
 *     { path: '/tmp/b.sock' },                            // event-driven, same thread
 *   ] });
 *   await sw.snapshot();
 *   await sw.close();
 *
 * The worker imports the native addon like the main thread (it is context aware);
 * the eventfds and sockets it opens belong to the process and are closed by the
 * worker when it closes.
 */
import { EventEmitter } from 'node:events';
import { isMainThread, parentPort, Worker, workerData } from 'node:worker_threads';
import { NetSwitch, type PortSnapshot } from './net-switch.js';
import type { VhostUserNetOptions } from './vhost-user-net.js';
import { threadPoller } from '../vhost-user/poller.js';

/** A port, as data (it crosses to the worker). */
export interface ThreadPortSpec {
  path: string;
  /** Connect to a front-end that listens (default: listen). */
  connect?: boolean;
  /** The device's options (no functions: log lines come back as 'log' events). */
  device?: Omit<VhostUserNetOptions, 'log'>;
  /** Log every front-end message as a 'log' event. */
  trace?: boolean;
  /** Offer ACCESS_PLATFORM (VhostUserBackendOptions.iommu). */
  iommu?: boolean;
  /** For connect: how long to retry (default 30000 ms). */
  timeoutMs?: number;
}

export interface NetSwitchThreadOptions {
  ports: readonly ThreadPortSpec[];
  ageingMs?: number;
  /** Send the switch's and back-ends' log lines as 'log' events. */
  verbose?: boolean;
}

type ThreadEvents = {
  'port-up': [port: { id: number; name: string }];
  'port-down': [port: { id: number; name: string }, message: string | undefined];
  log: [line: string];
  error: [err: Error];
};

type ToWorker = { op: 'snapshot'; id: number } | { op: 'close'; id: number } | { op: 'passes'; id: number };
type FromWorker =
  | { op: 'ready' }
  | { op: 'failed'; message: string }
  | { op: 'reply'; id: number; value: unknown }
  | { op: 'log'; line: string }
  | { op: 'port-up'; port: { id: number; name: string } }
  | { op: 'port-down'; port: { id: number; name: string }; message?: string };

const MARK = 'vdevkit-net-switch-thread';

export class NetSwitchThread extends EventEmitter<ThreadEvents> {
  readonly #worker: Worker;
  #nextId = 1;
  readonly #pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  #exited: Error | null = null;

  private constructor(worker: Worker) {
    super();
    this.#worker = worker;
  }

  /** Starts the worker and opens the ports; rejects when one cannot be opened. */
  static start(options: NetSwitchThreadOptions): Promise<NetSwitchThread> {
    const worker = new Worker(new URL(import.meta.url), { workerData: { [MARK]: true, options } });
    const t = new NetSwitchThread(worker);
    return new Promise<NetSwitchThread>((resolve, reject) => {
      let started = false;
      worker.on('message', (m: FromWorker) => {
        switch (m.op) {
          case 'ready':
            started = true;
            resolve(t);
            return;
          case 'failed':
            reject(new Error(m.message));
            void worker.terminate();
            return;
          case 'reply': {
            const p = t.#pending.get(m.id);
            t.#pending.delete(m.id);
            p?.resolve(m.value);
            return;
          }
          case 'log':
            t.emit('log', m.line);
            return;
          case 'port-up':
            t.emit('port-up', m.port);
            return;
          case 'port-down':
            t.emit('port-down', m.port, m.message);
            return;
        }
      });
      worker.on('error', (err) => {
        t.#fail(err);
        if (!started) reject(err);
        else if (t.listenerCount('error') > 0) t.emit('error', err);
      });
      worker.on('exit', (code) => {
        const err = new Error(`the switch thread exited (code ${code})`);
        t.#fail(err);
        if (!started) reject(err);
      });
    });
  }

  /** The ports' counters, as NetSwitch.snapshot() gives them in the worker. */
  snapshot(): Promise<PortSnapshot[]> {
    return this.#call('snapshot') as Promise<PortSnapshot[]>;
  }

  /** Passes the worker's poll loop has run (grows only while a ring is polled). */
  pollPasses(): Promise<number> {
    return this.#call('passes') as Promise<number>;
  }

  /** Closes the ports and ends the worker. */
  async close(): Promise<void> {
    if (this.#exited) return;
    try {
      await this.#call('close');
    } catch {
      // it went already
    }
    await this.#worker.terminate();
  }

  #call(op: ToWorker['op']): Promise<unknown> {
    if (this.#exited) return Promise.reject(this.#exited);
    const id = this.#nextId++;
    return new Promise((resolve, reject) => {
      this.#pending.set(id, { resolve, reject });
      this.#worker.postMessage({ op, id } satisfies ToWorker);
    });
  }

  #fail(err: Error): void {
    if (this.#exited) return;
    this.#exited = err;
    const p = [...this.#pending.values()];
    this.#pending.clear();
    for (const x of p) x.reject(err);
  }
}

/** The worker's side. */
async function runWorker(options: NetSwitchThreadOptions): Promise<void> {
  const port = parentPort!;
  const send = (m: FromWorker): void => port.postMessage(m);
  const log = options.verbose ? (line: string): void => send({ op: 'log', line }) : undefined;
  const sw = new NetSwitch({ ...(options.ageingMs !== undefined ? { ageingMs: options.ageingMs } : {}), ...(log ? { log } : {}) });
  sw.on('port-up', (p) => send({ op: 'port-up', port: { id: p.id, name: p.name } }));
  sw.on('port-down', (p, err) => send({ op: 'port-down', port: { id: p.id, name: p.name }, ...(err ? { message: err.message } : {}) }));
  port.on('message', (m: ToWorker) => {
    if (m.op === 'snapshot') send({ op: 'reply', id: m.id, value: sw.snapshot() });
    else if (m.op === 'passes') send({ op: 'reply', id: m.id, value: threadPoller.passes });
    else if (m.op === 'close') {
      sw.close();
      send({ op: 'reply', id: m.id, value: null });
      port.close();
    }
  });
  try {
    for (const p of options.ports) {
      const device = { ...(p.device ?? {}), ...(log ? { log } : {}) };
      const backend = { ...(log ? { log } : {}), ...(p.trace ? { trace: (l: string) => send({ op: 'log', line: `<- ${l}` }) } : {}), ...(p.iommu ? { iommu: true } : {}) };
      if (p.connect) await sw.connect(p.path, device, { ...backend, timeoutMs: p.timeoutMs ?? 30_000 });
      else sw.listen(p.path, device, backend);
    }
  } catch (err) {
    sw.close();
    send({ op: 'failed', message: (err as Error).message });
    return;
  }
  send({ op: 'ready' });
}

if (!isMainThread && (workerData as Record<string, unknown> | null)?.[MARK] === true) {
  void runWorker((workerData as { options: NetSwitchThreadOptions }).options);
}
