/**
 * libvfio-user's samples/client (commit 7e7a0a6c), a real C client, against
 * our `libvfio-user-server` device (src/devices/server-sample.ts) served by
 * `vdevkit serve`, and, side by side, against libvfio-user's own
 * samples/server: the client's output must be the same line for line (but
 * for the values it reads from BAR0 and our INTx flags).
 *
 * What the client does (samples/client.c): VERSION (max_msg_fds 32,
 * max_data_xfer_size 1024); a REGION_READ of region 0xdeadbeef must fail with
 * EINVAL; GET_INFO must say 9 regions; GET_REGION_INFO of each (region 1
 * asked again with the argsz the first reply gave, which must bring the
 * sparse mmap capability and one fd, whose areas it mmaps); the config
 * header must hold 0xdead:0xbeef, subsystem 0xcafe:0xbabe; DEVICE_RESET;
 * 2 x max_msg_fds one-page DMA windows of one file, by fd; GET_IRQ_INFO of
 * the 5 indexes and an eventfd on INTx; DMA logging on; BAR0 = now + 1, read
 * back; a blocking read of the eventfd; then exactly 4 DMA_WRITEs and 4
 * DMA_READs of 1024 bytes to serve; a dirty report of every window (the first
 * two must be dirty: the first by the DMA_WRITEs it served, the second by the
 * server's own writes through its mapping); logging off; the first half of
 * the windows unmapped; BAR0 = now + 10; PRE_COPY with a thread writing
 * random bytes to BAR1 meanwhile, 12 MIG_DATA_READs of 1024 bytes (none may
 * be empty); STOP_COPY, 13 reads (12 x 1024 and 8: every reply must be
 * 8 + 1024 bytes long); STOP. Then the destination: it forks, and the
 * PARENT execs `dirname(argv[0])/server -v SOCKET_migrated` (so the process
 * the test started becomes the destination server), while the child goes
 * on as the client: it polls stat() until the socket file exists, connects,
 * RESUMING, writes the 13 chunks, STOP, reads BAR1 (0x3000 bytes: its CRC
 * must match the last bytes the thread wrote), RUNNING, maps the second half
 * of the windows, sets INTx again, waits for the interrupt the migrated
 * BAR0 schedules, serves 4 + 4 DMA messages again, unmaps all and exits 0.
 *
 * Its exit status: the child's parent is the destination server. Ours (Node)
 * never reaps a child it did not spawn, so the client stays a zombie whose
 * status the test reads from /proc/PID/stat until it stops that server. The
 * C destination exits when the client disconnects (status 0), and the
 * client is then reaped by init: for that run, the test takes the C
 * destination's exit status and the client's output, as libvfio-user's own
 * test-client-server.sh does.
 *
 * A missing peer fails the test (libvfioUserSample throws), never skips.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { libvfioUserSample, scratchDir, startPeer, waitForSocket, type Peer } from './peers.js';

const REPO = fileURLToPath(new URL('../../..', import.meta.url));
const CLI = path.join(REPO, 'dist', 'src', 'cli', 'main.js');
const STDBUF = ['/usr/bin/stdbuf', '/bin/stdbuf'].find((p) => fs.existsSync(p));

/** A process's state letter and, for a zombie, its wait status (/proc/PID/stat fields 3 and 52). */
function procStat(pid: number): { state: string; ppid: number; exitStatus: number } | null {
  let text: string;
  try {
    text = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return null;
  }
  const f = text.slice(text.lastIndexOf(')') + 2).trim().split(' ');
  return { state: f[0]!, ppid: Number(f[1]), exitStatus: Number(f[49]) };
}

/** The pids whose parent is `pid`. */
function childrenOf(pid: number): number[] {
  const out: number[] = [];
  for (const e of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(e)) continue;
    if (procStat(Number(e))?.ppid === pid) out.push(Number(e));
  }
  return out;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

interface ClientRun {
  /** The client's exit: its own status when it ended before forking, or the forked client's; for the C destination, that server's. */
  status: number | string;
  /** The forked client's wait status was read from its zombie (our destination). */
  fromZombie: boolean;
  /** The client's lines on stdout ("client: ...", in order; its warnings go to stderr, not ordered with them). */
  lines: string[];
  /** Everything the client process printed, the destination server's log included (it is the same process after exec). */
  output: string;
  source: Peer;
  /** The pid the destination launcher wrote (ours only). */
  destinationPid: number | null;
  /** The pid of the client process the test started. */
  clientPid: number;
  ms: number;
}

/**
 * Runs samples/client from a scratch dir whose `server` is either our
 * launcher (ours: `vdevkit serve libvfio-user-server`) or libvfio-user's
 * samples/server, against a source server of the same kind. Everything it
 * started is stopped by pid after the test.
 */
async function runClient(t: TestContext, kind: 'ours' | 'libvfio-user'): Promise<ClientRun> {
  const clientBin = libvfioUserSample('client'); // throws (the test fails) if the peer is not built
  const cServer = libvfioUserSample('server');
  const scratch = scratchDir(`vdevkit-lvu-client-${kind}-`);
  const socket = path.join(scratch.dir, 's.sock');
  const pidFile = path.join(scratch.dir, 'destination.pid');
  fs.symlinkSync(clientBin, path.join(scratch.dir, 'client'));
  if (kind === 'ours') {
    // The client runs `dirname(argv[0])/server -v SOCKET_migrated` in its own process (after fork).
    fs.writeFileSync(
      path.join(scratch.dir, 'server'),
      [
        '#!/bin/sh',
        '# samples/client starts its migration destination as: server -v SOCKET',
        '[ "$1" = -v ] && [ -n "$2" ] || { echo "server: usage: server -v SOCKET" >&2; exit 2; }',
        `echo $$ > '${pidFile}'`,
        'unset LD_PRELOAD _STDBUF_O _STDBUF_E',
        `exec '${process.execPath}' '${CLI}' serve libvfio-user-server --socket "$2"`,
        '',
      ].join('\n'),
      { mode: 0o755 },
    );
  } else {
    fs.symlinkSync(cServer, path.join(scratch.dir, 'server'));
  }
  const source =
    kind === 'ours'
      ? startPeer(process.execPath, [CLI, 'serve', 'libvfio-user-server', '--socket', socket], { cwd: scratch.dir })
      : startPeer(cServer, ['-v', socket], { cwd: scratch.dir });
  let client: Peer | undefined;
  let zombie: number | null = null;
  t.after(async () => {
    await client?.stop(2000);
    await source.stop(2000);
    if (zombie !== null && procStat(zombie)?.state !== 'Z' && procStat(zombie)) {
      try {
        process.kill(zombie, 'SIGKILL');
      } catch {
        /* gone */
      }
    }
    scratch.remove();
  });
  await waitForSocket(socket, source, 10_000);
  const clientPath = path.join(scratch.dir, 'client');
  const t0 = Date.now();
  // Line-buffered, so a client that hangs or aborts still shows how far it got.
  client = STDBUF ? startPeer(STDBUF, ['-oL', '-eL', clientPath, socket], { cwd: scratch.dir }) : startPeer(clientPath, [socket], { cwd: scratch.dir });
  const c = client;
  let stdout = '';
  c.proc.stdout!.on('data', (d: Buffer) => (stdout += d.toString()));
  let status: number | string | undefined;
  let fromZombie = false;
  const end = Date.now() + 60_000;
  while (status === undefined) {
    if (c.proc.exitCode !== null || c.proc.signalCode !== null) {
      status = await c.exited; // before forking, or the C destination
      break;
    }
    if (zombie === null) zombie = childrenOf(c.pid)[0] ?? null;
    if (zombie !== null) {
      const s = procStat(zombie);
      if (s?.state === 'Z') {
        const w = s.exitStatus;
        status = w & 0x7f ? `signal ${w & 0x7f}` : (w >> 8) & 0xff;
        fromZombie = true;
        break;
      }
    }
    if (Date.now() > end) throw new Error(`${kind}: the client did not finish in 60 s:\n${c.output()}\n--- source:\n${source.output()}`);
    await sleep(20);
  }
  const ms = Date.now() - t0;
  if (fromZombie) await c.stop(2000); // the destination: the client is done with it
  // All it printed is in hand once its pipes have closed (they close when the last holder exits).
  await Promise.race([
    Promise.all([c.proc.stdout!, c.proc.stderr!].map((st) => (st.closed ? undefined : new Promise((r) => st.once('close', r))))),
    sleep(5000),
  ]);
  const output = c.output();
  const destinationPid = fs.existsSync(pidFile) ? Number(fs.readFileSync(pidFile, 'utf8').trim()) : null;
  return {
    status: status!,
    fromZombie,
    lines: stdout.split('\n').filter((l) => l.startsWith('client: ')),
    output,
    source,
    destinationPid,
    clientPid: c.pid,
    ms,
  };
}

/** The client's lines with what legitimately differs between two runs or two servers masked. */
function normalized(lines: string[]): string[] {
  return lines.map((l) =>
    l
      .replace(/(wrote to|read from) BAR0: -?\d+/, '$1 BAR0: N')
      // Our INTx is EVENTFD | MASKABLE | AUTOMASKED as the kernel's vfio-pci; libvfio-user says EVENTFD only.
      .replace(/IRQ INTx: count=1 flags=0x[0-9a-f]+/, 'IRQ INTx: count=1 flags=F'),
  );
}

test('samples/client passes against our libvfio-user-server device (migration to a second one included), as against samples/server', async (t) => {
  const [ours, ref] = await Promise.all([runClient(t, 'ours'), runClient(t, 'libvfio-user')]);
  const show = (r: ClientRun): string => `${r.output}\n--- source server:\n${r.source.output()}`;

  // The reference: libvfio-user against itself.
  assert.equal(ref.status, 0, `samples/client against samples/server:\n${show(ref)}`);

  // Ours: the forked client exited 0 (read from its zombie, so not the destination's status).
  assert.equal(ours.fromZombie, true, `the client ended before it started the destination:\n${show(ours)}`);
  assert.equal(ours.status, 0, `samples/client against ours exited ${ours.status}:\n${show(ours)}`);
  // The destination is the process the test started (the client's parent side of its fork).
  assert.equal(ours.destinationPid, ours.clientPid, 'the launcher ran in the client process');

  // Key lines, in order.
  // Its warning (stderr) when the bogus region is refused with EINVAL, as it requires.
  assert.match(ours.output, /client: failed to read from region -559038737 0-0x3: Invalid argument/);
  const expected = [
    'client: devinfo: flags 0x3, num_regions 9, num_irqs 5',
    'client: get_device_region_info: region_info[0] offset 0 flags 0x3 size 8 cap_sz 0 #FDs 0',
    'client: get_device_region_info: region_info[1] offset 0 flags 0xf size 12288 cap_sz 48 #FDs 1',
    'client: get_region_vfio_caps: Sparse cap nr_mmap_areas 2',
    'client: get_region_vfio_caps: area 0 offset 0 size 4096',
    'client: get_region_vfio_caps: area 1 offset 0x2000 size 4096',
    'client: get_device_region_info: region_info[7] offset 0 flags 0x3 size 256 cap_sz 0 #FDs 0',
    'client: IRQ INTx: count=1 flags=0x7',
    'client: IRQ ERR: count=1 flags=0x1',
    'client: IRQ REQ: count=1 flags=0x1',
    'client: INTx triggered!',
    'client: get_dirty_bitmap: 0-0xfff\t0x1',
    'client: get_dirty_bitmap: 0x1000-0x1fff\t0x1',
    'client: get_dirty_bitmap: 0x2000-0x2fff\t0',
    'client: stopping fake guest thread',
    'client: setting device state to stop-and-copy',
    'client: starting destination server',
    'client: IRQ INTx: count=1 flags=0x7',
    'client: INTx triggered!',
  ];
  let at = 0;
  for (const line of expected) {
    const i = ours.lines.indexOf(line, at);
    assert.ok(i >= 0, `"${line}" after line ${at} of:\n${ours.lines.join('\n')}`);
    at = i + 1;
  }
  // 16 one-page windows dirty-reported (max_msg_fds 16 x 2), the first two dirty only.
  const dirty = ours.lines.filter((l) => l.startsWith('client: get_dirty_bitmap: '));
  assert.equal(dirty.length, 32);
  assert.deepEqual(dirty.map((l) => l.endsWith('\t0x1')), dirty.map((_l, i) => i < 2));

  // Line for line what libvfio-user's own server gets out of it (its max_msg_fds is 8: 16 windows).
  const dirtyFree = (ls: string[]): string[] => normalized(ls).filter((l) => !l.startsWith('client: get_dirty_bitmap: '));
  assert.deepEqual(dirtyFree(ours.lines), dirtyFree(ref.lines));

  // Both of our servers did the sample's DMA, direct and by messages, with success.
  const src = ours.source.output();
  for (const out of [src, ours.output]) {
    const log = out.split('\n').filter((l) => l.startsWith('vdevkit: ')).join('\n');
    assert.match(log, /do_dma_io: DIRECT success/);
    assert.match(log, /do_dma_io: MESSAGE success/);
    assert.doesNotMatch(log, /failed|error/i);
  }
  assert.match(src, /migration: transition RUNNING -> PRE_COPY[\s\S]*PRE_COPY -> STOP_COPY[\s\S]*STOP_COPY -> STOP/);
  assert.match(ours.output, /STOP -> RESUMING[\s\S]*RESUMING -> STOP[\s\S]*STOP -> RUNNING[\s\S]*arming timer to trigger in \d+ seconds/);
  t.diagnostic(`ours: ${ours.ms} ms, libvfio-user: ${ref.ms} ms`);
});
