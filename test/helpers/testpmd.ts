/**
 * DPDK testpmd for the net tests and the benchmark: started by pid with the
 * command lines of ../shared/docs/peers.md (no hugepages, one --file-prefix
 * each), stopped with SIGINT (it prints its statistics), parsed.
 */
import { startPeer, type Peer } from '../interop/peers.js';
import { which } from '../interop/guest.js';

function testpmdPath(): string {
  const p = which('dpdk-testpmd');
  if (!p) throw new Error('dpdk-testpmd is missing: apt-get install --no-install-recommends dpdk-dev (.ci/run installs it)');
  return p;
}

export interface TestpmdStats {
  rxPackets: number;
  txPackets: number;
  /** Streams (queues) that forwarded, from the per-stream blocks ("RX Port= 0/Queue= 1"). */
  rxQueues: Set<number>;
  txQueues: Set<number>;
}

/** testpmd's "Accumulated forward statistics" and the streams that forwarded. */
export function parseTestpmd(out: string): TestpmdStats {
  const acc = out.lastIndexOf('Accumulated forward statistics');
  if (acc < 0) throw new Error(`no "Accumulated forward statistics" in testpmd's output:\n${out.slice(-3000)}`);
  const tail = out.slice(acc);
  const num = (re: RegExp, s: string): number => Number(re.exec(s)?.[1] ?? NaN);
  const queues = (re: RegExp): Set<number> => new Set([...out.matchAll(re)].map((m) => Number(m[1])));
  return {
    rxPackets: num(/RX-packets: (\d+)/, tail),
    txPackets: num(/TX-packets: (\d+)/, tail),
    rxQueues: queues(/RX Port= *0\/Queue= *(\d+) ->/g),
    txQueues: queues(/-> TX Port= *0\/Queue= *(\d+)/g),
  };
}

export interface TestpmdOptions {
  /** The vdev: net_virtio_user0 with path= (or net_vhost0 with iface=, `vhost`) and these devargs. */
  socket: string;
  /** DPDK's own vhost-user back-end (net_vhost) instead of the virtio-user front-end. */
  vhost?: boolean;
  devargs?: string;
  mode: 'txonly' | 'rxonly' | 'io';
  prefix: string;
  queues?: number;
  /** More testpmd application arguments (after --). */
  extra?: string[];
  mainLcore?: number;
}

/** Starts testpmd (net_virtio_user on `socket`), forwarding at once, statistics each second. */
export function startTestpmd(o: TestpmdOptions): Peer {
  const q = o.queues ?? 1;
  const args = [
    '-l', '0,1', `--main-lcore=${o.mainLcore ?? 0}`, '--no-huge', '-m', '512', '--no-pci', `--file-prefix=${o.prefix}`,
    '--vdev', `${o.vhost ? `net_vhost0,iface=${o.socket}` : `net_virtio_user0,path=${o.socket}`},queues=${q}${o.devargs ? `,${o.devargs}` : ''}`,
    '--', '--total-num-mbufs=16384', `--forward-mode=${o.mode}`, '--stats-period=1', `--rxq=${q}`, `--txq=${q}`, ...(o.extra ?? []),
  ];
  return startPeer(testpmdPath(), args);
}

/** SIGINT (testpmd prints its statistics and exits), SIGKILL after `timeoutMs`; resolves with its output. */
export async function stopTestpmd(p: Peer, timeoutMs = 15_000): Promise<string> {
  if (p.proc.exitCode === null && p.proc.signalCode === null) {
    try {
      process.kill(p.pid, 'SIGINT');
    } catch {
      /* gone */
    }
  }
  const t = setTimeout(() => void p.stop(100), timeoutMs);
  await p.exited;
  clearTimeout(t);
  return p.output();
}

