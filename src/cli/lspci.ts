/**
 * `vdevkit lspci --socket PATH`: describes a vfio-user device the way
 * `lspci -vvv` would; `vdevkit probe --socket PATH`: a non-destructive
 * conformance check of any vfio-user server.
 */
import { parseArgs } from 'node:util';
import { VfioUserClient } from '../vfio-user/client.js';
import { VfioUserDevice, type RegionInfo, type IrqInfo } from '../vfio-user/client-device.js';
import { RegionInfoFlag, IrqInfoFlag } from '../vfio/uapi.js';

const REGION_NAMES = ['BAR0', 'BAR1', 'BAR2', 'BAR3', 'BAR4', 'BAR5', 'ROM', 'CONFIG', 'VGA'];
const IRQ_NAMES = ['INTx', 'MSI', 'MSI-X', 'ERR', 'REQ'];
const CAP_NAMES: Record<number, string> = {
  0x01: 'Power Management', 0x05: 'MSI', 0x09: 'Vendor Specific', 0x10: 'Express', 0x11: 'MSI-X', 0x12: 'SATA', 0x13: 'Advanced Features',
};
const EXT_CAP_NAMES: Record<number, string> = { 0x01: 'Advanced Error Reporting', 0x03: 'Device Serial Number', 0x0b: 'Vendor Specific' };

export interface PciCapabilityView {
  offset: number;
  id: number;
  name: string;
  extended: boolean;
  detail?: string;
}

export interface LspciReport {
  vendorId: number;
  deviceId: number;
  subsystemVendorId: number;
  subsystemId: number;
  classCode: number;
  revision: number;
  command: number;
  status: number;
  interruptPin: number;
  deviceFlags: number;
  bars: { index: number; name: string; size: number; flags: string[]; type: string; address: string }[];
  regions: { index: number; name: string; size: number; flags: string[]; mapped: number; caps: string[] }[];
  irqs: { index: number; name: string; count: number; flags: string[] }[];
  capabilities: PciCapabilityView[];
}

const hex = (n: number, w = 4): string => n.toString(16).padStart(w, '0');

function regionFlags(f: number): string[] {
  const out: string[] = [];
  if (f & RegionInfoFlag.READ) out.push('read');
  if (f & RegionInfoFlag.WRITE) out.push('write');
  if (f & RegionInfoFlag.MMAP) out.push('mmap');
  if (f & RegionInfoFlag.CAPS) out.push('caps');
  return out;
}

function irqFlags(f: number): string[] {
  const out: string[] = [];
  if (f & IrqInfoFlag.EVENTFD) out.push('eventfd');
  if (f & IrqInfoFlag.MASKABLE) out.push('maskable');
  if (f & IrqInfoFlag.AUTOMASKED) out.push('automasked');
  if (f & IrqInfoFlag.NORESIZE) out.push('noresize');
  return out;
}

/** Walks the capability lists of a config space image (bounded: no loops). */
export function decodeCapabilities(cfg: Uint8Array): PciCapabilityView[] {
  const v = new DataView(cfg.buffer, cfg.byteOffset, cfg.length);
  const caps: PciCapabilityView[] = [];
  if (cfg.length >= 0x40 && v.getUint16(6, true) & 0x10) {
    let ptr = cfg[0x34]! & 0xfc;
    const seen = new Set<number>();
    while (ptr >= 0x40 && ptr + 2 <= Math.min(cfg.length, 256) && !seen.has(ptr) && caps.length < 48) {
      seen.add(ptr);
      const id = cfg[ptr]!;
      const cap: PciCapabilityView = { offset: ptr, id, name: CAP_NAMES[id] ?? `cap ${hex(id, 2)}`, extended: false };
      if (id === 0x11 && ptr + 12 <= cfg.length) {
        const ctl = v.getUint16(ptr + 2, true);
        const table = v.getUint32(ptr + 4, true);
        const pba = v.getUint32(ptr + 8, true);
        cap.detail = `Count=${(ctl & 0x7ff) + 1} Enable${ctl & 0x8000 ? '+' : '-'} Masked${ctl & 0x4000 ? '+' : '-'} Vector table: BAR=${table & 7} offset=${hex(table & ~7, 8)} PBA: BAR=${pba & 7} offset=${hex(pba & ~7, 8)}`;
      } else if (id === 0x05 && ptr + 4 <= cfg.length) {
        const ctl = v.getUint16(ptr + 2, true);
        cap.detail = `Enable${ctl & 1 ? '+' : '-'} Count=${1 << ((ctl >> 4) & 7)}/${1 << ((ctl >> 1) & 7)} 64bit${ctl & 0x80 ? '+' : '-'} Maskable${ctl & 0x100 ? '+' : '-'}`;
      }
      caps.push(cap);
      ptr = cfg[ptr + 1]! & 0xfc;
    }
  }
  if (cfg.length >= 0x104) {
    let ptr = 0x100;
    const seen = new Set<number>();
    while (ptr >= 0x100 && ptr + 4 <= cfg.length && !seen.has(ptr) && caps.length < 96) {
      seen.add(ptr);
      const hdr = v.getUint32(ptr, true);
      if (hdr === 0 || hdr === 0xffffffff) break;
      const id = hdr & 0xffff;
      caps.push({ offset: ptr, id, name: EXT_CAP_NAMES[id] ?? `ext cap ${hex(id)}`, extended: true });
      ptr = (hdr >>> 20) & 0xffc;
    }
  }
  return caps;
}

export async function describeDevice(dev: VfioUserDevice): Promise<LspciReport> {
  const info = await dev.info();
  const regions: RegionInfo[] = [];
  for (let i = 0; i < info.numRegions; i++) regions.push(await dev.regionInfo(i));
  const irqs: IrqInfo[] = [];
  for (let i = 0; i < info.numIrqs; i++) irqs.push(await dev.irqInfo(i));
  const cfgRegion = regions[7];
  const cfg = cfgRegion && cfgRegion.size > 0 ? await dev.read(7, 0, Math.min(cfgRegion.size, 4096)) : new Uint8Array(256);
  const v = new DataView(cfg.buffer, cfg.byteOffset, cfg.length);
  const bars: LspciReport['bars'] = [];
  for (let i = 0; i < 6; i++) {
    const r = regions[i];
    if (!r || r.size === 0) continue;
    const raw = v.getUint32(0x10 + i * 4, true);
    const io = (raw & 1) === 1;
    const type = io ? 'I/O ports' : ((raw >> 1) & 3) === 2 ? 'Memory (64-bit' : 'Memory (32-bit';
    const pf = !io && raw & 8 ? ', prefetchable)' : io ? '' : ', non-prefetchable)';
    bars.push({ index: i, name: `Region ${i}`, size: r.size, flags: regionFlags(r.flags), type: type + pf, address: hex(raw & (io ? ~3 : ~15), 8) });
  }
  return {
    vendorId: v.getUint16(0, true),
    deviceId: v.getUint16(2, true),
    command: v.getUint16(4, true),
    status: v.getUint16(6, true),
    revision: cfg[8]!,
    classCode: v.getUint32(8, true) >>> 8,
    subsystemVendorId: v.getUint16(0x2c, true),
    subsystemId: v.getUint16(0x2e, true),
    interruptPin: cfg[0x3d]!,
    deviceFlags: info.flags,
    bars,
    regions: regions.map((r, i) => ({
      index: i,
      name: REGION_NAMES[i] ?? `region ${i}`,
      size: r.size,
      flags: regionFlags(r.flags),
      mapped: r.mapped.length,
      caps: r.caps.map((c) => (c.kind === 'sparse-mmap' ? `sparse-mmap ${c.areas.map((a) => `[${hex(a.offset, 1)}+${hex(a.size, 1)}]`).join(' ')}` : c.kind)),
    })),
    irqs: irqs.map((q) => ({ index: q.index, name: IRQ_NAMES[q.index] ?? `irq ${q.index}`, count: q.count, flags: irqFlags(q.flags) })),
    capabilities: decodeCapabilities(cfg),
  };
}

function sizeText(n: number): string {
  for (const [unit, div] of [['G', 2 ** 30], ['M', 2 ** 20], ['K', 1024]] as const) if (n >= div && n % div === 0) return `${n / div}${unit}`;
  return String(n);
}

export function formatLspci(r: LspciReport): string {
  const onOff = (bit: number, name: string): string => `${name}${r.command & bit ? '+' : '-'}`;
  const lines = [
    `vfio-user device: ${hex(r.classCode, 6)} [${hex(r.vendorId)}:${hex(r.deviceId)}] (rev ${hex(r.revision, 2)})`,
    `\tSubsystem: ${hex(r.subsystemVendorId)}:${hex(r.subsystemId)}`,
    `\tControl: ${[onOff(1, 'I/O'), onOff(2, 'Mem'), onOff(4, 'BusMaster'), onOff(0x400, 'DisINTx')].join(' ')}`,
    `\tStatus: Cap${r.status & 0x10 ? '+' : '-'} INTx${r.status & 8 ? '+' : '-'}`,
    `\tInterrupt: pin ${r.interruptPin ? String.fromCharCode(64 + r.interruptPin) : '?'}`,
    `\tDevice flags: ${[r.deviceFlags & 1 ? 'reset' : '', r.deviceFlags & 2 ? 'pci' : ''].filter(Boolean).join(' ')}`,
    ...r.bars.map((b) => `\t${b.name}: ${b.type} at ${b.address} [size=${sizeText(b.size)}] (${b.flags.join(', ')})`),
    ...r.capabilities.map((c) => `\tCapabilities: [${hex(c.offset, c.extended ? 3 : 2)}] ${c.name}${c.detail ? `\n\t\t${c.detail}` : ''}`),
    `\tvfio-user regions:`,
    ...r.regions.map((g) => `\t\t${String(g.index).padStart(2)} ${g.name.padEnd(7)} size ${sizeText(g.size).padStart(6)} ${g.flags.join(',') || '-'}${g.caps.length ? ` caps: ${g.caps.join('; ')}` : ''}${g.mapped ? ` (${g.mapped} area(s) mapped)` : ''}`),
    `\tvfio-user irqs:`,
    ...r.irqs.map((q) => `\t\t${q.index} ${q.name.padEnd(6)} count ${q.count} ${q.flags.join(',')}`),
  ];
  return lines.join('\n') + '\n';
}

interface ProbeResult {
  check: string;
  ok: boolean;
  detail: string;
}

/** A non-destructive conformance check: queries and in-bounds reads, and a few requests that must fail. */
export async function probe(path: string, timeoutMs: number): Promise<ProbeResult[]> {
  const results: ProbeResult[] = [];
  const run = async (check: string, fn: () => Promise<string>): Promise<boolean> => {
    try {
      results.push({ check, ok: true, detail: await fn() });
      return true;
    } catch (err) {
      results.push({ check, ok: false, detail: (err as Error).message });
      return false;
    }
  };
  const expectErrno = async (fn: () => Promise<unknown>, ...errnos: number[]): Promise<string> => {
    const want = errnos.length > 0 ? errnos : [22];
    try {
      await fn();
    } catch (err) {
      const got = (err as { errno?: number }).errno;
      if (got !== undefined && want.includes(got)) return `refused with errno ${got}`;
      throw new Error(`refused with errno ${got ?? '?'} (${(err as Error).message}), expected ${want.join(' or ')}`);
    }
    throw new Error('accepted; expected an error reply');
  };
  let client: VfioUserClient | null = null;
  if (!(await run('VERSION and capabilities', async () => {
    client = await VfioUserClient.connect(path, { timeoutMs });
    return `0.${client.version.minor}, max_msg_fds ${client.serverCaps.maxMsgFds}, max_data_xfer_size ${client.serverCaps.maxDataXferSize}${client.serverCaps.writeMultiple ? ', write_multiple' : ''}`;
  }))) return results;
  const c = client as unknown as VfioUserClient;
  const dev = new VfioUserDevice(c);
  let numRegions = 0;
  let numIrqs = 0;
  await run('DEVICE_GET_INFO', async () => {
    const i = await dev.info();
    numRegions = i.numRegions;
    numIrqs = i.numIrqs;
    if (!(i.flags & 2)) throw new Error(`flags 0x${i.flags.toString(16)}: not a PCI device`);
    return `flags 0x${i.flags.toString(16)}, ${i.numRegions} regions, ${i.numIrqs} irq types`;
  });
  for (let i = 0; i < numRegions; i++) {
    await run(`GET_REGION_INFO ${REGION_NAMES[i] ?? i}`, async () => {
      const r = await dev.regionInfo(i);
      return `size ${r.size}, ${regionFlags(r.flags).join(',') || 'unset'}`;
    });
    const r = await dev.regionInfo(i).catch(() => null);
    if (r && r.size > 0 && r.flags & RegionInfoFlag.READ && (i === 7 || i >= 9)) {
      await run(`REGION_READ ${REGION_NAMES[i] ?? i} within bounds`, async () => `${(await dev.read(i, 0, Math.min(r.size, 64))).length} bytes`);
      await run(`REGION_READ past the end of ${REGION_NAMES[i] ?? i}`, () => expectErrno(() => c.regionRead(i, r.size, 4)));
    }
  }
  for (let i = 0; i < numIrqs; i++) await run(`GET_IRQ_INFO ${IRQ_NAMES[i] ?? i}`, async () => { const q = await dev.irqInfo(i); return `count ${q.count}`; });
  await run('GET_REGION_INFO past the last region', () => expectErrno(() => c.request(5, { argsz: 32, flags: 0, index: numRegions, capOffset: 0, size: 0, offset: 0 })));
  await run('GET_IRQ_INFO past the last index', () => expectErrno(() => c.request(7, { argsz: 16, flags: 0, index: numIrqs, count: 0 })));
  await run('REGION_READ of a region that does not exist', () => expectErrno(() => c.regionRead(numRegions, 0, 4)));
  // ENOENT per the kernel and libvfio-user; EINVAL from servers that do not track windows.
  await run('DMA_UNMAP of a window never mapped', () => expectErrno(() => c.request(3, { argsz: 24, flags: 0, address: 0x7000_0000, size: 4096 }), 2, 22));
  await run('connection still usable after the errors', async () => `${(await dev.info()).numRegions} regions`);
  dev.close();
  c.close();
  return results;
}

export const LSPCI_HELP = `Usage: vdevkit lspci --socket PATH [--json]
       vdevkit probe --socket PATH [--json] [--timeout MS]

lspci: ids, BARs with sizes and flags, the decoded capability list, regions
and irqs of the device behind a vfio-user socket.
probe: a non-destructive conformance check of any vfio-user server
(version and capabilities, every info query, in-bounds reads, and the error
replies to a few invalid requests); exits 1 if any check fails.
`;

export async function lspciCommand(cmd: 'lspci' | 'probe', argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: { socket: { type: 'string', short: 's' }, json: { type: 'boolean' }, timeout: { type: 'string' }, help: { type: 'boolean', short: 'h' } },
  });
  if (values.help || !values.socket) {
    (values.help ? process.stdout : process.stderr).write(LSPCI_HELP);
    return values.help ? 0 : 2;
  }
  const timeoutMs = values.timeout ? Number(values.timeout) : 5000;
  if (cmd === 'probe') {
    const results = await probe(values.socket, timeoutMs);
    if (values.json) process.stdout.write(JSON.stringify(results, null, 2) + '\n');
    else {
      const w = Math.max(...results.map((r) => r.check.length));
      for (const r of results) process.stdout.write(`${r.ok ? 'PASS' : 'FAIL'}  ${r.check.padEnd(w)}  ${r.detail}\n`);
      const failed = results.filter((r) => !r.ok).length;
      process.stdout.write(`${results.length - failed} passed, ${failed} failed\n`);
    }
    return results.every((r) => r.ok) ? 0 : 1;
  }
  const client = await VfioUserClient.connect(values.socket, { timeoutMs });
  const dev = new VfioUserDevice(client);
  try {
    const report = await describeDevice(dev);
    process.stdout.write(values.json ? JSON.stringify(report, null, 2) + '\n' : formatLspci(report));
  } finally {
    dev.close();
    client.close();
  }
  return 0;
}
