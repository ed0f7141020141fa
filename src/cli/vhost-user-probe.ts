/**
 * `vdevkit vhost-user-probe --socket PATH`: what a vhost-user back-end offers
 * (features and protocol features by name, queue count, memory slots, config
 * decoded for blk / net / fs) and a non-destructive conformance check with a
 * pass/fail table: the handshake, reply validation, memory table, a ring set
 * up and stopped with its base given back, status, a NACK for a request the
 * back-end does not know. No I/O is made available on any ring.
 */
import { parseArgs } from 'node:util';
import { EventFd } from '../sys/eventfd.js';
import { SharedMemory } from '../sys/shm.js';
import { PROTOCOL_FEATURE_NAMES, ProtocolFeature as PF, VirtioFeature, bit } from '../vhost-user/constants.js';
import { VhostUserError } from '../vhost-user/errors.js';
import { VhostUserFrontend, bitNames } from '../vhost-user/frontend.js';
import { BlkFeature } from '../devices/vhost-user-blk.js';
import { decodeBlkConfig } from '../vhost-user/blk-driver.js';
import { ringLayout } from '../virtio/driver.js';

export const VHOST_USER_PROBE_HELP = `Usage: vdevkit vhost-user-probe --socket PATH [options]

Connects to a vhost-user back-end, prints what it offers (virtio features and
protocol features by name, queues, memory slots, its config space decoded for
blk, net or fs) and runs a non-destructive conformance check (no request is
made available on any ring), with a pass/fail table.

Options:
  -s, --socket PATH    the back-end's socket
      --type TYPE      blk, net or fs (default: guessed from the features)
      --timeout MS     per-request reply timeout (default 3000)
      --json           one JSON object instead of text
  -h, --help
`;

const TRANSPORT_NAMES: Record<number, string> = Object.fromEntries(Object.entries(VirtioFeature).map(([k, v]) => [v, k]));
const BLK_NAMES: Record<number, string> = Object.fromEntries(Object.entries(BlkFeature).map(([k, v]) => [v, k]));
const NET_NAMES: Record<number, string> = {
  0: 'CSUM', 1: 'GUEST_CSUM', 2: 'CTRL_GUEST_OFFLOADS', 3: 'MTU', 5: 'MAC', 6: 'GSO', 7: 'GUEST_TSO4', 8: 'GUEST_TSO6', 9: 'GUEST_ECN', 10: 'GUEST_UFO',
  11: 'HOST_TSO4', 12: 'HOST_TSO6', 13: 'HOST_ECN', 14: 'HOST_UFO', 15: 'MRG_RXBUF', 16: 'STATUS', 17: 'CTRL_VQ', 18: 'CTRL_RX', 19: 'CTRL_VLAN',
  20: 'CTRL_RX_EXTRA', 21: 'GUEST_ANNOUNCE', 22: 'MQ', 23: 'CTRL_MAC_ADDR', 41: 'GUEST_RSC4', 42: 'GUEST_RSC6', 52: 'VQ_NOTF_COAL', 53: 'NOTF_COAL',
  54: 'GUEST_USO4', 55: 'GUEST_USO6', 56: 'HOST_USO', 57: 'HASH_REPORT', 59: 'GUEST_HDRLEN', 60: 'RSS', 61: 'RSC_EXT', 62: 'STANDBY', 63: 'SPEED_DUPLEX',
};
const FS_NAMES: Record<number, string> = { 0: 'NOTIFICATION' };
const DEVICE_NAMES = { blk: BLK_NAMES, net: NET_NAMES, fs: FS_NAMES } as const;
type DeviceType = keyof typeof DEVICE_NAMES;

/** Guesses the device type from the offered device feature bits (0-23) and protocol features. */
export function guessDeviceType(features: bigint, protocol: bigint): DeviceType {
  const dev = features & 0xffffffn;
  if ((protocol & (bit(PF.RARP) | bit(PF.NET_MTU))) !== 0n || (dev & (bit(15) | bit(17) | bit(5))) === (bit(15) | bit(17) | bit(5))) return 'net';
  if ((dev & ~bit(0)) === 0n) return 'fs';
  return 'blk';
}

export interface ProbeCheck {
  name: string;
  /** warn: a deviation from the spec that front-ends tolerate (does not fail the probe). */
  result: 'pass' | 'fail' | 'skip' | 'warn';
  detail: string;
}

export interface ProbeReport {
  socket: string;
  type: DeviceType;
  features: { value: string; names: string[] };
  protocolFeatures: { value: string; names: string[] } | null;
  queues: number | null;
  memSlots: number | null;
  config: Record<string, unknown> | null;
  checks: ProbeCheck[];
}

/** Decodes a config space by device type. */
export function decodeConfig(type: DeviceType, b: Buffer): Record<string, unknown> {
  if (type === 'blk') {
    const c = decodeBlkConfig(b);
    return { ...c, capacity: c.capacity.toString(), capacityBytes: (c.capacity * 512n).toString() };
  }
  if (type === 'net') {
    const mac = [...b.subarray(0, 6)].map((x) => x.toString(16).padStart(2, '0')).join(':');
    return { mac, status: b.length >= 8 ? b.readUInt16LE(6) : 0, maxVirtqueuePairs: b.length >= 10 ? b.readUInt16LE(8) : 0, mtu: b.length >= 12 ? b.readUInt16LE(10) : 0, speed: b.length >= 16 ? b.readUInt32LE(12) : 0, duplex: b.length >= 17 ? b[16] : 0 };
  }
  const tag = b.subarray(0, 36);
  const nul = tag.indexOf(0);
  return { tag: tag.subarray(0, nul < 0 ? 36 : nul).toString('utf8'), numRequestQueues: b.length >= 40 ? b.readUInt32LE(36) : 0 };
}

const WARN_MARK = '\u0000warn:';
const WARN = (detail: string): string => WARN_MARK + detail;

const CONFIG_SIZE: Record<DeviceType, number> = { blk: 60, net: 20, fs: 40 };

/** Runs the probe; never throws for a misbehaving back-end (that is a failed check). */
export async function probe(socket: string, options: { type?: DeviceType; timeoutMs?: number } = {}): Promise<ProbeReport> {
  const checks: ProbeCheck[] = [];
  const check = async (name: string, fn: () => Promise<string | null>): Promise<boolean> => {
    try {
      const detail = await fn();
      if (detail === null) checks.push({ name, result: 'skip', detail: 'not offered' });
      else if (detail.startsWith(WARN_MARK)) checks.push({ name, result: 'warn', detail: detail.slice(WARN_MARK.length) });
      else checks.push({ name, result: 'pass', detail });
      return true;
    } catch (err) {
      checks.push({ name, result: 'fail', detail: (err as Error).message });
      return false;
    }
  };
  const fe = await VhostUserFrontend.connect(socket, { timeoutMs: options.timeoutMs ?? 3000 });
  const report: ProbeReport = { socket, type: options.type ?? 'blk', features: { value: '0x0', names: [] }, protocolFeatures: null, queues: null, memSlots: null, config: null, checks };
  const kick = EventFd.create();
  const call = EventFd.create();
  try {
    const ok = await check('handshake (GET_FEATURES .. SET_OWNER, replies validated)', async () => {
      await fe.handshake({ config: 'use' });
      return `features 0x${fe.offeredFeatures.toString(16)}, protocol 0x${fe.offeredProtocolFeatures.toString(16)}`;
    });
    report.type = options.type ?? guessDeviceType(fe.offeredFeatures, fe.offeredProtocolFeatures);
    report.features = { value: `0x${fe.offeredFeatures.toString(16)}`, names: bitNames(fe.offeredFeatures, { ...DEVICE_NAMES[report.type], ...TRANSPORT_NAMES }) };
    if ((fe.offeredFeatures & bit(VirtioFeature.PROTOCOL_FEATURES)) !== 0n) {
      report.protocolFeatures = { value: `0x${fe.offeredProtocolFeatures.toString(16)}`, names: bitNames(fe.offeredProtocolFeatures, PROTOCOL_FEATURE_NAMES) };
    }
    report.queues = fe.maxQueues;
    report.memSlots = fe.offeredMemSlots;
    if (!ok) return report;
    await check('VIRTIO_F_VERSION_1 offered', async () => {
      if ((fe.offeredFeatures & bit(VirtioFeature.VERSION_1)) === 0n) throw new Error('not offered (a legacy-only device)');
      return 'yes';
    });
    await check('SET_FEATURES accepted', async () => {
      const f = await fe.setFeatures(fe.offeredFeatures & ~bit(VirtioFeature.RING_PACKED) & ~bit(VirtioFeature.LOG_ALL));
      return `0x${f.toString(16)}`;
    });
    await check('GET_CONFIG: header echoed, exact size', async () => {
      if (!fe.hasProtocol(PF.CONFIG)) return null;
      const b = await fe.getConfig(0, CONFIG_SIZE[report.type]);
      report.config = decodeConfig(report.type, b);
      return `${b.length} bytes`;
    });
    const mem = SharedMemory.create(1 << 20, { name: 'vdevkit-probe' });
    fe.addMemory(mem, 0);
    await check(`memory table (${fe.hasProtocol(PF.CONFIGURE_MEM_SLOTS) ? 'ADD_MEM_REG' : 'SET_MEM_TABLE'})${fe.replyAck ? ', acked' : ''}`, async () => {
      await fe.syncMemory();
      return '1 MiB memfd region';
    });
    const layout = ringLayout(64, false);
    await check('vring 0 set up at base 7, stopped: base 7 back', async () => {
      // A ring as if 7 requests were done: avail idx = used idx = 7, so nothing is available.
      new DataView(mem.buffer).setUint16(layout.driver + 2, 7, true);
      new DataView(mem.buffer).setUint16(layout.device + 2, 7, true);
      await fe.setupVring(0, { size: 64, desc: layout.desc, driver: layout.driver, device: layout.device, base: 7, kick, call });
      const base = await fe.stopVring(0);
      if (base !== 7) throw new Error(`GET_VRING_BASE gave ${base}`);
      return 'base 7';
    });
    await check('REM_MEM_REG acked', async () => {
      if (!fe.hasProtocol(PF.CONFIGURE_MEM_SLOTS)) return null;
      fe.removeMemory(fe.regions[0]!);
      await fe.syncMemory();
      mem.close();
      return 'region removed';
    });
    await check('SET_STATUS / GET_STATUS round trip', async () => {
      if (!fe.hasProtocol(PF.STATUS)) return null;
      await fe.setStatus(3);
      const s = await fe.getStatus();
      if (s !== 3) throw new Error(`GET_STATUS gave ${s} after SET_STATUS 3`);
      await fe.setStatus(0);
      return 'status 3';
    });
    await check('unknown request (200) NACKed', async () => {
      if (!fe.replyAck) return null;
      try {
        const r = await fe.request(200, new Uint8Array(0), null, { needReply: true });
        const v = r!.payload.length === 8 ? r!.payload.readBigUInt64LE(0) : -1n;
        if (v === 0n) return WARN('acked 0: claims to have done a request it does not know');
        return v > 0n ? `NACK ${v}` : `a ${r!.payload.length}-byte reply`;
      } catch (err) {
        if (err instanceof VhostUserError && (err.code === 'DISCONNECTED' || err.code === 'TIMEOUT')) return `no reply (${err.code.toLowerCase()})`;
        throw err;
      }
    });
    return report;
  } finally {
    fe.close();
    fe.releaseMemory();
    kick.close();
    call.close();
  }
}

function printReport(r: ProbeReport): void {
  const out: string[] = [];
  out.push(`vhost-user back-end at ${r.socket} (device type ${r.type})`);
  out.push(`features ${r.features.value}: ${r.features.names.join(' ')}`);
  out.push(r.protocolFeatures ? `protocol features ${r.protocolFeatures.value}: ${r.protocolFeatures.names.join(' ')}` : 'protocol features: none (no VHOST_USER_F_PROTOCOL_FEATURES)');
  out.push(`queues: ${r.queues ?? '1 (no MQ)'}, memory slots: ${r.memSlots ?? '8 (SET_MEM_TABLE)'}`);
  if (r.config) {
    out.push(`config (${r.type}):`);
    for (const [k, v] of Object.entries(r.config)) out.push(`  ${k}: ${typeof v === 'object' ? JSON.stringify(v) : String(v)}`);
  } else out.push('config: not available (no CONFIG protocol feature)');
  out.push('');
  const w = Math.max(...r.checks.map((c) => c.name.length));
  out.push(`${'check'.padEnd(w)}  result  detail`);
  for (const c of r.checks) out.push(`${c.name.padEnd(w)}  ${c.result.toUpperCase().padEnd(6)}  ${c.detail}`);
  const failed = r.checks.filter((c) => c.result === 'fail').length;
  const warned = r.checks.filter((c) => c.result === 'warn').length;
  if (warned > 0) out.push('', `${warned} warning(s): deviations front-ends tolerate`);
  out.push('', failed === 0 ? `all ${r.checks.length} checks passed or skipped` : `${failed} of ${r.checks.length} checks FAILED`);
  process.stdout.write(`${out.join('\n')}\n`);
}

export async function vhostUserProbeCommand(argv: string[]): Promise<number> {
  let values: { socket?: string; type?: string; timeout?: string; json?: boolean; help?: boolean };
  try {
    ({ values } = parseArgs({
      args: argv,
      options: { socket: { type: 'string', short: 's' }, type: { type: 'string' }, timeout: { type: 'string' }, json: { type: 'boolean' }, help: { type: 'boolean', short: 'h' } },
    }));
  } catch (err) {
    process.stderr.write(`vdevkit vhost-user-probe: ${(err as Error).message}\n\n${VHOST_USER_PROBE_HELP}`);
    return 2;
  }
  if (values.help) {
    process.stdout.write(VHOST_USER_PROBE_HELP);
    return 0;
  }
  const fail = (msg: string): number => {
    process.stderr.write(`vdevkit vhost-user-probe: ${msg}\n\n${VHOST_USER_PROBE_HELP}`);
    return 2;
  };
  if (!values.socket) return fail('--socket PATH is required');
  if (values.type !== undefined && !(values.type in DEVICE_NAMES)) return fail('--type must be blk, net or fs');
  const timeoutMs = values.timeout !== undefined ? Number(values.timeout) : 3000;
  if (!Number.isInteger(timeoutMs) || timeoutMs < 1) return fail('--timeout must be a positive integer');
  let report: ProbeReport;
  try {
    report = await probe(values.socket, { ...(values.type ? { type: values.type as DeviceType } : {}), timeoutMs });
  } catch (err) {
    process.stderr.write(`vdevkit vhost-user-probe: ${(err as Error).message}\n`);
    return 1;
  }
  if (values.json) process.stdout.write(`${JSON.stringify(report, null, 2)}\n`);
  else printReport(report);
  return report.checks.some((c) => c.result === 'fail') ? 1 : 0;
}
