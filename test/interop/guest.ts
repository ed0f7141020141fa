/**
 * A real Linux guest for the interop tests: QEMU 7.2 (TCG, q35, memfd-backed
 * shared RAM) boots Debian's 6.1 kernel with a busybox initramfs that
 * `scripts/build-guest.sh` builds outside the repo (cached in
 * ~/.cache/vdevkit-guest). Each run appends a small cpio archive holding the
 * test's `/test.sh`; the guest's /init loads the virtio modules, runs it,
 * prints `VDEVKIT-GUEST-EXIT <rc>` on the serial console and powers off.
 *
 *   const { exitCode, output } = await runGuest({
 *     script: blkWriteReadScript({ device: '/dev/vda', blocks: 256, blockSize: 4096, seed: 7 }),
 *     qemuArgs: vhostUserBlkArgs(socketPath),
 *   });
 *
 * A missing qemu-system-x86_64, busybox-static or cpio is an error naming the
 * package (never a skip). QEMU is started and stopped by pid.
 *
 * The block scripts write self-describing data so that the host can check the
 * back-end's file without trusting the guest: block i of pass p is 64-byte
 * records `vdk s=<seed> b=<i> p=<p> o=<offset in block>`, space-padded to 63
 * bytes and a newline; `expectedBlock()` computes the same bytes.
 */
import { spawn, execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { accessSync, constants, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { homedir, tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { gzipSync } from 'node:zlib';

/** Printed by the guest's /init after /test.sh returned: `VDEVKIT-GUEST-EXIT <rc> <uptime>`. */
export const EXIT_MARKER = 'VDEVKIT-GUEST-EXIT';
/** Printed by /init just before /test.sh runs: `VDEVKIT-GUEST-START <uname -r> <uptime>`. */
export const START_MARKER = 'VDEVKIT-GUEST-START';

export const QBOOT = '/usr/share/qemu/qboot.rom';

export interface Guest {
  /** The build directory (vmlinux, vmlinuz, initrd.img, kernel-release, modules, stamp). */
  dir: string;
  kernel: string;
  initrd: string;
  /** `uname -r` of the guest kernel, e.g. 6.1.0-50-amd64. */
  kernelRelease: string;
  /** The modules /init loads, in order. */
  modules: string[];
}

function repoRoot(): string {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (;;) {
    const pkg = path.join(dir, 'package.json');
    if (existsSync(pkg) && existsSync(path.join(dir, 'scripts', 'build-guest.sh'))) return dir;
    const up = path.dirname(dir);
    if (up === dir) throw new Error(`no repository root (package.json and scripts/build-guest.sh) above ${fileURLToPath(import.meta.url)}`);
    dir = up;
  }
}

/** The path of `name` on PATH, or undefined. */
export function which(name: string): string | undefined {
  for (const d of (process.env.PATH ?? '/usr/bin:/bin').split(':')) {
    if (!d) continue;
    const p = path.join(d, name);
    try {
      accessSync(p, constants.X_OK);
      return p;
    } catch {
      /* next */
    }
  }
  return undefined;
}

function isStaticBusybox(): boolean {
  for (const p of ['/bin/busybox', '/usr/bin/busybox']) {
    if (!existsSync(p)) continue;
    // A static ELF has no PT_INTERP: look for the loader's name in the first pages.
    const head = readFileSync(p).subarray(0, 4096);
    if (!head.includes('ld-linux')) return true;
  }
  return false;
}

/** Throws an Error naming the Debian packages that are missing for the guest tests. */
export function checkGuestTools(): void {
  const missing: string[] = [];
  if (!which('qemu-system-x86_64')) missing.push('qemu-system-x86 (qemu-system-x86_64)');
  else if (!existsSync(QBOOT)) missing.push(`qemu-system-data (${QBOOT})`);
  if (!isStaticBusybox()) missing.push('busybox-static (a static /bin/busybox)');
  if (!which('cpio')) missing.push('cpio');
  if (!which('dpkg-deb') || !which('apt-get')) missing.push('dpkg and apt (apt-get download, dpkg-deb)');
  if (missing.length > 0) {
    throw new Error(
      `the guest tests need ${missing.join(', ')}: apt-get install --no-install-recommends qemu-system-x86 busybox-static cpio (.ci/run does)`,
    );
  }
}

let cached: Guest | undefined;

/** The guest's cache directory ($VDEVKIT_GUEST_DIR or ~/.cache/vdevkit-guest). */
export function guestCacheDir(): string {
  return process.env.VDEVKIT_GUEST_DIR || path.join(homedir(), '.cache', 'vdevkit-guest');
}

function readBuild(dir: string): Guest {
  return {
    dir,
    // The ELF vmlinux (PVH boot, ~3 s) when the build could extract it, else the bzImage (~7 s).
    kernel: existsSync(path.join(dir, 'vmlinux')) ? path.join(dir, 'vmlinux') : path.join(dir, 'vmlinuz'),
    initrd: path.join(dir, 'initrd.img'),
    kernelRelease: readFileSync(path.join(dir, 'kernel-release'), 'utf8').trim(),
    modules: readFileSync(path.join(dir, 'modules'), 'utf8').split('\n').filter(Boolean),
  };
}

/**
 * The guest kernel and initramfs; runs `scripts/build-guest.sh` when the cache
 * is missing or was built by another version of the script.
 */
export function ensureGuest(): Guest {
  if (cached) return cached;
  checkGuestTools();
  const script = path.join(repoRoot(), 'scripts', 'build-guest.sh');
  const current = path.join(guestCacheDir(), 'current');
  const want = createHash('sha256').update(readFileSync(script)).digest('hex');
  let dir: string | undefined;
  try {
    const stamp = readFileSync(path.join(current, 'stamp'), 'utf8').split(' ')[0];
    if (stamp === want && existsSync(path.join(current, 'vmlinuz')) && existsSync(path.join(current, 'initrd.img'))) dir = current;
  } catch {
    /* not built */
  }
  if (!dir) {
    let out: string;
    try {
      out = execFileSync('bash', [script], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], maxBuffer: 16 << 20 });
    } catch (err) {
      const e = err as { stderr?: string; message: string };
      throw new Error(`scripts/build-guest.sh failed: ${e.stderr?.trim() || e.message}`);
    }
    dir = out.trim().split('\n').pop();
    if (!dir || !existsSync(path.join(dir, 'vmlinuz'))) throw new Error(`scripts/build-guest.sh printed no build directory:\n${out}`);
  }
  cached = readBuild(dir);
  return cached;
}

// ---------------------------------------------------------------------------
// The per-run initramfs: a newc cpio archive appended to the base one.

function newcEntry(name: string, mode: number, data: Buffer, ino: number): Buffer {
  const nameBytes = Buffer.from(`${name}\0`);
  const fields = [ino, mode, 0, 0, 1, 0, data.length, 0, 0, 0, 0, nameBytes.length, 0];
  const header = Buffer.from('070701' + fields.map((f) => f.toString(16).padStart(8, '0')).join(''), 'ascii');
  const pad = (n: number) => Buffer.alloc((4 - (n % 4)) % 4);
  return Buffer.concat([header, nameBytes, pad(header.length + nameBytes.length), data, pad(data.length)]);
}

/**
 * A gzip'd newc cpio archive with the given files (path -> contents, relative
 * to /; directories are made as needed; files are mode 0755).
 */
export function cpioArchive(files: Record<string, string | Buffer>): Buffer {
  const parts: Buffer[] = [];
  const dirs = new Set<string>();
  let ino = 0x7d00;
  for (const [name, contents] of Object.entries(files)) {
    const rel = name.replace(/^\/+/, '');
    if (!rel || rel.split('/').includes('..')) throw new Error(`bad guest file name ${name}`);
    const segs = rel.split('/');
    for (let i = 1; i < segs.length; i++) {
      const d = segs.slice(0, i).join('/');
      if (!dirs.has(d)) {
        dirs.add(d);
        parts.push(newcEntry(d, 0o040755, Buffer.alloc(0), ino++));
      }
    }
    parts.push(newcEntry(rel, 0o100755, Buffer.isBuffer(contents) ? contents : Buffer.from(contents), ino++));
  }
  parts.push(newcEntry('TRAILER!!!', 0, Buffer.alloc(0), 0));
  return gzipSync(Buffer.concat(parts));
}

// ---------------------------------------------------------------------------
// Running QEMU.

export interface RunGuestOptions {
  /** The guest's /test.sh (run by /bin/sh in /tmp); its exit code is the result's exitCode. */
  script: string;
  /** Appended to QEMU's command line (devices: vhostUserBlkArgs(), vhostUserNetArgs()). */
  qemuArgs?: string[];
  /** Guest RAM, shared (memfd). Default 512. */
  memoryMiB?: number;
  /** Kills QEMU (by pid) and fails after this long. Default 120000. */
  timeoutMs?: number;
  /** Each line of QEMU's output (the serial console, and QEMU's stderr), without the line end. */
  onLine?: (line: string) => void;
  /** More files for the guest's initramfs (path -> contents, mode 0755). */
  files?: Record<string, string | Buffer>;
  /** More kernel command line. */
  append?: string;
  /** Number of guest CPUs. Default 1. */
  cpus?: number;
  /** Aborting kills QEMU and fails the run. */
  signal?: AbortSignal;
}

export interface GuestResult {
  /** The exit code of /test.sh, from the `VDEVKIT-GUEST-EXIT` line. */
  exitCode: number;
  /** Everything QEMU printed (serial console and stderr), \r removed. */
  output: string;
  /** QEMU's exit code, or the signal that ended it. */
  qemuExit: number | string;
  /** Milliseconds from spawning QEMU to its exit. */
  wallMs: number;
  /** The guest's uptime (s) when /test.sh started and when it returned. */
  guestStart: number;
  guestEnd: number;
}

const running = new Set<number>();
let exitHookInstalled = false;
function track(pid: number): void {
  running.add(pid);
  if (!exitHookInstalled) {
    exitHookInstalled = true;
    process.once('exit', () => {
      for (const p of running) {
        try {
          process.kill(p, 'SIGKILL');
        } catch {
          /* gone */
        }
      }
    });
  }
}

/** QEMU's command line for booting `guest` with `initrd` (the base initrd with the run's archive appended). */
export function guestQemuArgs(guest: Guest, initrd: string, options: Pick<RunGuestOptions, 'memoryMiB' | 'append' | 'cpus' | 'qemuArgs'> = {}): string[] {
  const mem = options.memoryMiB ?? 512;
  return [
    '-machine', 'q35,accel=tcg,memory-backend=mem',
    '-object', `memory-backend-memfd,id=mem,size=${mem}M,share=on`,
    '-m', `${mem}M`,
    '-smp', String(options.cpus ?? 1),
    '-nographic', '-no-reboot', '-net', 'none', '-vga', 'none',
    '-bios', QBOOT,
    '-kernel', guest.kernel,
    '-initrd', initrd,
    '-append', `console=ttyS0 panic=-1 quiet${options.append ? ` ${options.append}` : ''}`,
    ...(options.qemuArgs ?? []),
  ];
}

/**
 * Boots the guest, runs `script` as its /test.sh and resolves once QEMU has
 * exited. Fails (with the output so far) when the guest does not report an
 * exit code, or after `timeoutMs` (QEMU is killed by pid).
 */
export async function runGuest(options: RunGuestOptions): Promise<GuestResult> {
  const guest = ensureGuest();
  const work = mkdtempSync(path.join(tmpdir(), 'vdevkit-guest-'));
  try {
    const initrd = path.join(work, 'initrd.img');
    writeFileSync(initrd, Buffer.concat([readFileSync(guest.initrd), cpioArchive({ ...options.files, 'test.sh': options.script })]));
    return await runQemu(guestQemuArgs(guest, initrd, options), options);
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}

function runQemu(args: string[], options: RunGuestOptions): Promise<GuestResult> {
  const timeoutMs = options.timeoutMs ?? 120_000;
  const t0 = Date.now();
  const proc = spawn('qemu-system-x86_64', args, { stdio: ['ignore', 'pipe', 'pipe'] });
  const lines: string[] = [];
  let exitCode: number | undefined;
  let guestStart = NaN;
  let guestEnd = NaN;
  const partial = { out: '', err: '' };
  const line = (l: string) => {
    lines.push(l);
    const start = l.indexOf(START_MARKER + ' ');
    if (start >= 0) guestStart = Number(l.slice(start).split(' ')[2]);
    const m = /VDEVKIT-GUEST-EXIT (\d+)(?: ([\d.]+))?/.exec(l);
    if (m) {
      exitCode = Number(m[1]);
      guestEnd = Number(m[2]);
    }
    options.onLine?.(l);
  };
  const feed = (key: 'out' | 'err', chunk: Buffer) => {
    const text = partial[key] + chunk.toString('latin1').replace(/\r/g, '');
    const parts = text.split('\n');
    partial[key] = parts.pop() ?? '';
    for (const p of parts) line(p);
  };
  proc.stdout.on('data', (d: Buffer) => feed('out', d));
  proc.stderr.on('data', (d: Buffer) => feed('err', d));
  return new Promise<GuestResult>((resolve, reject) => {
    let failure: string | undefined;
    const kill = (why: string) => {
      failure ??= why;
      if (proc.pid !== undefined && proc.exitCode === null && proc.signalCode === null) {
        try {
          process.kill(proc.pid, 'SIGKILL');
        } catch {
          /* gone */
        }
      }
    };
    const timer = setTimeout(() => kill(`the guest did not power off within ${timeoutMs} ms`), timeoutMs);
    const onAbort = () => kill(`aborted: ${String(options.signal?.reason ?? 'signal')}`);
    options.signal?.addEventListener('abort', onAbort, { once: true });
    if (options.signal?.aborted) onAbort();
    if (proc.pid !== undefined) track(proc.pid);
    let spawnError: Error | undefined;
    proc.on('error', (err) => (spawnError = err));
    proc.on('close', (code, sig) => {
      clearTimeout(timer);
      options.signal?.removeEventListener('abort', onAbort);
      if (proc.pid !== undefined) running.delete(proc.pid);
      for (const k of ['out', 'err'] as const) if (partial[k]) line(partial[k]);
      const output = lines.join('\n');
      const qemuExit = code ?? sig ?? -1;
      if (spawnError) return reject(new Error(`could not start qemu-system-x86_64: ${spawnError.message}`));
      if (failure) return reject(new Error(`${failure}; output so far:\n${output}`));
      if (exitCode === undefined) return reject(new Error(`QEMU exited (${qemuExit}) without the guest reporting ${EXIT_MARKER}:\n${output}`));
      resolve({ exitCode, output, qemuExit, wallMs: Date.now() - t0, guestStart, guestEnd });
    });
  });
}

// ---------------------------------------------------------------------------
// QEMU device arguments.

/** Escapes a value for a QEMU option list (a comma is doubled). */
function qemuValue(v: string): string {
  return v.replace(/,/g, ',,');
}

export interface VhostUserArgsOptions {
  /** Virtqueues. Default 1. */
  queues?: number;
  /** Seconds between reconnection attempts after the back-end went away (chardev reconnect=). */
  reconnect?: number;
  /** Device id; the chardev is `<id>-chr`. Default blk0 / net0. */
  id?: string;
  /** QEMU listens (server=on,wait=off) and the back-end connects, instead of QEMU connecting. */
  server?: boolean;
}

function chardev(socketPath: string, id: string, o: VhostUserArgsOptions): string[] {
  let spec = `socket,id=${id}-chr,path=${qemuValue(socketPath)}`;
  if (o.server) spec += ',server=on,wait=off';
  if (o.reconnect !== undefined) spec += `,reconnect=${o.reconnect}`;
  return ['-chardev', spec];
}

/** `-chardev socket,... -device vhost-user-blk-pci,...` for a back-end listening on `socketPath`. */
export function vhostUserBlkArgs(socketPath: string, o: VhostUserArgsOptions = {}): string[] {
  const id = o.id ?? 'blk0';
  return [...chardev(socketPath, id, o), '-device', `vhost-user-blk-pci,id=${id},chardev=${id}-chr,num-queues=${o.queues ?? 1}`];
}

/**
 * `-chardev ... -netdev vhost-user,... -device virtio-net-pci,...,vectors=0`.
 * vectors=0: QEMU 7.2 under TCG crashes (kvm_virtio_pci_irqfd_use) when a
 * vhost-user NIC uses MSI-X (../shared/docs/peers.md).
 */
export function vhostUserNetArgs(socketPath: string, o: VhostUserArgsOptions & { mac?: string } = {}): string[] {
  const id = o.id ?? 'net0';
  const queues = o.queues ?? 1;
  return [
    ...chardev(socketPath, id, o),
    '-netdev', `vhost-user,id=${id}-dev,chardev=${id}-chr,queues=${queues}`,
    '-device', `virtio-net-pci,id=${id},netdev=${id}-dev,mac=${o.mac ?? '52:54:00:12:34:56'},vectors=0${queues > 1 ? ',mq=on' : ''}`,
  ];
}

/** Path of qemu-storage-daemon, or an Error naming its package. */
export function qemuStorageDaemon(): string {
  const p = which('qemu-storage-daemon');
  if (!p) throw new Error('qemu-storage-daemon is missing: apt-get install --no-install-recommends qemu-system-common (comes with qemu-system-x86)');
  return p;
}

/** qemu-storage-daemon's arguments exporting a raw `image` as vhost-user-blk on `socketPath` (../shared/docs/peers.md). */
export function qsdBlkArgs(image: string, socketPath: string, o: { queues?: number } = {}): string[] {
  return [
    '--blockdev', `driver=file,node-name=file0,filename=${qemuValue(image)},cache.direct=off`,
    '--export', `type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path=${qemuValue(socketPath)},writable=on,num-queues=${o.queues ?? 1}`,
  ];
}

// ---------------------------------------------------------------------------
// The block pattern, on both sides.

/** Size of one record of the pattern. */
export const RECORD = 64;

function checkGeometry(blockSize: number, seed: number): void {
  if (!Number.isInteger(blockSize) || blockSize <= 0 || blockSize % 512 !== 0) throw new Error(`blockSize ${blockSize} is not a multiple of 512`);
  if (!Number.isInteger(seed) || seed < 0 || seed > 0xffffffff) throw new Error(`seed ${seed} is not a u32`);
}

/** One 64-byte record: `vdk s=<seed> b=<block> p=<pass> o=<offset>` space-padded to 63 bytes, then \n. */
function record(seed: number, block: number, pass: number, off: number): string {
  return `vdk s=${seed} b=${block} p=${pass} o=${off}`.padEnd(RECORD - 1, ' ') + '\n';
}

/**
 * The bytes the guest scripts write to block `block` (absolute on the
 * device, in units of `blockSize`) in pass `pass` (blkWriteReadScript writes
 * pass 1; blkWriteLoopScript passes 1..N).
 */
export function expectedBlock(block: number, blockSize: number, seed: number, pass = 1): Buffer {
  checkGeometry(blockSize, seed);
  let s = '';
  for (let off = 0; off < blockSize; off += RECORD) s += record(seed, block, pass, off);
  return Buffer.from(s, 'latin1');
}

/** Which pass wrote `data` as block `block`, or null when it is no block of the pattern. */
export function blockPass(data: Buffer, block: number, blockSize: number, seed: number): number | null {
  if (data.length !== blockSize) return null;
  const m = /^vdk s=(\d+) b=(\d+) p=(\d+) o=0 /.exec(data.subarray(0, RECORD).toString('latin1'));
  if (!m || Number(m[1]) !== seed || Number(m[2]) !== block) return null;
  const pass = Number(m[3]);
  return expectedBlock(block, blockSize, seed, pass).equals(data) ? pass : null;
}

export interface BlockRange {
  /** First block (absolute, in units of blockSize). Default 0. */
  start?: number;
  blocks: number;
  blockSize: number;
  seed: number;
}

/** For each block of the range in `image` (a file's contents): the pass that wrote it, or null. */
export function blockPasses(image: Buffer, r: BlockRange): (number | null)[] {
  const start = r.start ?? 0;
  const out: (number | null)[] = [];
  for (let k = 0; k < r.blocks; k++) {
    const i = start + k;
    out.push(blockPass(image.subarray(i * r.blockSize, (i + 1) * r.blockSize), i, r.blockSize, r.seed));
  }
  return out;
}

/** Throws, naming the first bad blocks, unless every block of the range in `image` is pass `pass`'s. */
export function assertBlocks(image: Buffer, r: BlockRange & { pass?: number }): void {
  const want = r.pass ?? 1;
  const passes = blockPasses(image, r);
  const bad = passes.flatMap((p, k) => (p === want ? [] : [`block ${(r.start ?? 0) + k}: ${p === null ? 'not the pattern' : `pass ${p}`}`]));
  if (bad.length > 0) throw new Error(`${bad.length} of ${r.blocks} blocks are not pass ${want}'s: ${bad.slice(0, 8).join('; ')}${bad.length > 8 ? '; ...' : ''}`);
}

/** sha256 (hex) of the pattern's blocks of a range (what blkWriteReadScript prints for `data: 'pattern'`). */
export function patternSha256(r: BlockRange & { pass?: number }): string {
  const h = createHash('sha256');
  for (let k = 0; k < r.blocks; k++) h.update(expectedBlock((r.start ?? 0) + k, r.blockSize, r.seed, r.pass ?? 1));
  return h.digest('hex');
}

/** The hash a block script printed (`VDEVKIT-SHA256 <hex>`), or undefined. */
export function guestSha256(output: string): string | undefined {
  return /VDEVKIT-SHA256 ([0-9a-f]{64})/.exec(output)?.[1];
}

/** A `VDEVKIT-PROGRESS pass=<p> blocks=<n>` line of blkWriteLoopScript, parsed. */
export function parseProgress(line: string): { pass: number; blocks: number } | undefined {
  const m = /VDEVKIT-PROGRESS pass=(\d+) blocks=(\d+)/.exec(line);
  return m ? { pass: Number(m[1]), blocks: Number(m[2]) } : undefined;
}

// ---------------------------------------------------------------------------
// Guest scripts (busybox ash). Lines they print: VDEVKIT-BLK (the device and
// its size), VDEVKIT-SHA256, VDEVKIT-PROGRESS, VDEVKIT-PASS-DONE,
// VDEVKIT-TIME <what> <seconds>, VDEVKIT-ERROR <why>.

function shellWord(v: string): string {
  return `'${v.replace(/'/g, `'\\''`)}'`;
}

export interface BlkScriptOptions {
  /** Default /dev/vda. */
  device?: string;
  /** First block written (in units of blockSize). Default 0. */
  start?: number;
  blocks: number;
  /** Bytes per block, a multiple of 512. Default 4096. */
  blockSize?: number;
  seed: number;
}

/** The shell functions and checks shared by the block scripts. */
function blkPrelude(o: BlkScriptOptions): string {
  const bs = o.blockSize ?? 4096;
  checkGeometry(bs, o.seed);
  const start = o.start ?? 0;
  if (!Number.isInteger(o.blocks) || o.blocks <= 0 || !Number.isInteger(start) || start < 0) throw new Error('blocks must be > 0 and start >= 0');
  return `
dev=${shellWord(o.device ?? '/dev/vda')}
bs=${bs}
start=${start}
n=${o.blocks}
seed=${o.seed}
now() { cut -d' ' -f1 /proc/uptime; }
fail() { echo "VDEVKIT-ERROR $*"; exit 1; }
# vdk_gen FIRST COUNT PASS: the pattern of blocks FIRST..FIRST+COUNT-1 on stdout (shell builtins only).
vdk_gen() {
  _b=$1; _e=$(($1 + $2))
  while [ $_b -lt $_e ]; do
    _o=0
    while [ $_o -lt $bs ]; do
      printf '%-63s\\n' "vdk s=$seed b=$_b p=$3 o=$_o"
      _o=$((_o + 64))
    done
    _b=$((_b + 1))
  done
}
i=0
while [ ! -b "$dev" ] && [ $i -lt 50 ]; do usleep 100000; i=$((i + 1)); done
[ -b "$dev" ] || { ls -l /sys/block; fail "no block device $dev"; }
size=$(blockdev --getsize64 "$dev") || fail "blockdev --getsize64 $dev"
echo "VDEVKIT-BLK $dev size=$size"
[ "$size" -ge $(( (start + n) * bs )) ] || fail "$dev has $size bytes, fewer than $(( (start + n) * bs ))"
`;
}

/**
 * Writes blocks start..start+blocks-1 with O_DIRECT (one dd, conv=fsync),
 * drops the page cache, reads them back with O_DIRECT, compares, and prints
 * `VDEVKIT-SHA256 <sha256 of the data written>`. `data: 'pattern'` (default)
 * writes expectedBlock(i, blockSize, seed, 1), which the host can check block
 * by block; `'random'` writes /dev/urandom (the host compares the hash).
 */
export function blkWriteReadScript(o: BlkScriptOptions & { data?: 'pattern' | 'random' }): string {
  return `${blkPrelude(o)}
t0=$(now)
${o.data === 'random' ? 'dd if=/dev/urandom of=/tmp/vdk-data bs=$bs count=$n 2>/tmp/dd.log || { cat /tmp/dd.log; fail "urandom"; }' : 'vdk_gen $start $n 1 >/tmp/vdk-data'}
t1=$(now)
dd if=/tmp/vdk-data of="$dev" bs=$bs seek=$start count=$n oflag=direct conv=fsync,notrunc 2>/tmp/dd.log || { cat /tmp/dd.log; fail "write $dev"; }
t2=$(now)
echo 3 >/proc/sys/vm/drop_caches
dd if="$dev" of=/tmp/vdk-back bs=$bs skip=$start count=$n iflag=direct 2>/tmp/dd.log || { cat /tmp/dd.log; fail "read $dev"; }
t3=$(now)
cmp /tmp/vdk-data /tmp/vdk-back || fail "read back differs from what was written"
echo "VDEVKIT-SHA256 $(sha256sum /tmp/vdk-data | cut -d' ' -f1)"
echo "VDEVKIT-TIME generate $t0 $t1"
echo "VDEVKIT-TIME write $t1 $t2"
echo "VDEVKIT-TIME read $t2 $t3"
rm -f /tmp/vdk-data /tmp/vdk-back
`;
}

/**
 * Writes the range `passes` times (pass 1..passes), one block per dd with
 * O_DIRECT (and conv=fsync, a flush, unless `fsync: false`), printing
 * `VDEVKIT-PROGRESS pass=<p> blocks=<written in this pass>` every
 * `progressEvery` blocks and `VDEVKIT-PASS-DONE pass=<p>` after each pass.
 * A failed write is retried every second up to `retries` times (default 0),
 * each failure printed as `VDEVKIT-WRITE-ERROR`. `pauseMs` sleeps between
 * blocks (to stretch the loop over a back-end restart). At the end it reads
 * the range back (O_DIRECT), compares it with the last pass and prints
 * `VDEVKIT-SHA256`. The host then checks every block with
 * assertBlocks(image, { ..., pass: passes }).
 */
export function blkWriteLoopScript(
  o: BlkScriptOptions & { passes?: number; progressEvery?: number; fsync?: boolean; retries?: number; pauseMs?: number },
): string {
  const passes = o.passes ?? 2;
  const every = o.progressEvery ?? 16;
  const pauseUs = Math.round((o.pauseMs ?? 0) * 1000);
  return `${blkPrelude(o)}
passes=${passes}
every=${every}
retries=${o.retries ?? 0}
t0=$(now)
p=1
while [ $p -le $passes ]; do
  vdk_gen $start $n $p >/tmp/vdk-pass
  k=0
  while [ $k -lt $n ]; do
    try=0
    until dd if=/tmp/vdk-pass of="$dev" bs=$bs skip=$k seek=$((start + k)) count=1 oflag=direct conv=notrunc${o.fsync === false ? '' : ',fsync'} 2>/tmp/dd.log; do
      try=$((try + 1))
      cat /tmp/dd.log
      echo "VDEVKIT-WRITE-ERROR pass=$p block=$((start + k)) try=$try"
      [ $try -gt $retries ] && fail "write of block $((start + k)) in pass $p"
      sleep 1
    done
    k=$((k + 1))
    [ $((k % every)) -eq 0 ] && echo "VDEVKIT-PROGRESS pass=$p blocks=$k"
    ${pauseUs > 0 ? `usleep ${pauseUs}` : ':'}
  done
  echo "VDEVKIT-PASS-DONE pass=$p"
  p=$((p + 1))
done
t1=$(now)
echo 3 >/proc/sys/vm/drop_caches
dd if="$dev" of=/tmp/vdk-back bs=$bs skip=$start count=$n iflag=direct 2>/tmp/dd.log || { cat /tmp/dd.log; fail "read $dev"; }
cmp /tmp/vdk-pass /tmp/vdk-back || fail "read back differs from pass $passes"
echo "VDEVKIT-SHA256 $(sha256sum /tmp/vdk-pass | cut -d' ' -f1)"
echo "VDEVKIT-TIME loop $t0 $t1"
rm -f /tmp/vdk-pass /tmp/vdk-back
`;
}
