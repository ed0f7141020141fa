/**
 * `vdevkit vhost-user-net` as a process (test/helpers/vhost-user-net-cli.ts):
 * two ports, two hand-written drivers, frames across, the per-second JSON
 * reports count them, SIGINT ends it with the totals.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { NetDriver, ethFrame } from './helpers/net-driver.js';

const CLI = path.join(path.dirname(fileURLToPath(import.meta.url)), 'helpers', 'vhost-user-net-cli.js');

for (const poll of [false, true]) test(`vdevkit vhost-user-net --json${poll ? ' --poll-port A (A sends without kicking)' : ''}: frames across two ports, counted once a second, totals on SIGINT`, { timeout: 30_000 }, async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdevkit-netcli-'));
  const a = path.join(dir, 'a.sock');
  const b = path.join(dir, 'b.sock');
  const proc = spawn(process.execPath, [CLI, '--socket', a, '--socket', b, '--json', ...(poll ? ['--poll-port', a] : [])], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  proc.stdout.on('data', (d: Buffer) => (out += d.toString()));
  proc.stderr.on('data', (d: Buffer) => (err += d.toString()));
  const exited = new Promise<number | string>((r) => proc.on('exit', (code, sig) => r(code ?? sig ?? -1)));
  const drivers: NetDriver[] = [];
  try {
    for (let i = 0; i < 100 && !(fs.existsSync(a) && fs.existsSync(b)); i++) await new Promise((r) => setTimeout(r, 50));
    const da = await NetDriver.open(a);
    drivers.push(da);
    const db = await NetDriver.open(b);
    drivers.push(db);
    await new Promise((r) => setTimeout(r, 50));
    db.postRx(0, 32);
    const frames = Array.from({ length: 20 }, (_, i) => ethFrame('ff:ff:ff:ff:ff:ff', '52:54:00:00:00:0a', 100 + i, i));
    // Polled: A's TX ring is served without a kick.
    da.send(0, frames, { kick: !poll });
    assert.deepEqual(await db.receive(0, 20), frames);
    // Wait for a report that shows them.
    const end = Date.now() + 5000;
    type Report = { ports: { name: string; rxPackets: number; txPackets: number; txBytes: number; connected: boolean }[] };
    let seen: Report | undefined;
    while (Date.now() < end && !seen) {
      for (const l of out.split('\n').filter(Boolean)) {
        const r = JSON.parse(l) as Report;
        if (r.ports[1]?.rxPackets === 20) seen = r;
      }
      if (!seen) await new Promise((r) => setTimeout(r, 100));
    }
    assert.ok(seen, `no report counted the frames:\n${out}\n${err}`);
    assert.equal(seen.ports.length, 2);
    assert.equal(seen.ports[0]!.name, a);
    assert.equal(seen.ports[0]!.txPackets, 20);
    assert.equal(seen.ports[0]!.txBytes, frames.reduce((s, f) => s + f.length, 0));
    assert.ok(seen.ports.every((p) => p.connected));
    proc.kill('SIGINT');
    assert.equal(await exited, 0, err);
    const last = JSON.parse(out.trim().split('\n').pop()!) as { final?: boolean; ports: { rxPackets: number }[] };
    assert.equal(last.final, true);
    assert.equal(last.ports[1]!.rxPackets, 20);
    if (poll) assert.match(err, /polling .*a\.sock on a worker thread/);
  } finally {
    for (const d of drivers) d.close();
    if (proc.exitCode === null) proc.kill('SIGKILL');
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
