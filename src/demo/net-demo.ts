/**
 * The vhost-user-net part of `npm start`: our learning switch in a process of
 * its own (`vdevkit vhost-user-net --socket A --socket B --poll`: both ports'
 * TX rings busy-polled on a worker thread), and two of our userspace virtio-net
 * drivers (VirtioNetDriver) in this one, one per port, exchanging frames over
 * real UNIX sockets, memfd guest memory and eventfds. The same switch takes
 * DPDK testpmd ports and QEMU guests (test/interop/dpdk-net*.test.ts,
 * vhost-user-net-guest.test.ts); no peer is needed here.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { VirtioNetDriver } from '../vhost-user/net-driver.js';

const MAIN = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../cli/main.js');
const FRAMES = 20_000;

function frame(dst: Uint8Array, src: Uint8Array, seq: number, size: number): Buffer {
  const f = Buffer.alloc(size);
  f.set(dst, 0);
  f.set(src, 6);
  f.writeUInt16BE(0x88b5, 12); // IEEE local experimental ethertype
  f.writeUInt32BE(seq, 14);
  for (let i = 18; i < size; i++) f[i] = (seq + i) & 0xff;
  return f;
}

function macOf(i: number): Uint8Array {
  return Uint8Array.from([0x52, 0x54, 0x00, 0xde, 0x00, i]);
}

export async function runNetDemo(log: (line: string) => void = console.log): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdevkit-net-demo-'));
  const a = path.join(dir, 'a.sock');
  const b = path.join(dir, 'b.sock');
  log(`vdevkit demo: a virtual switch: vdevkit vhost-user-net --socket ${a} --socket ${b} --poll (a process of its own, TX rings busy-polled on a worker thread)`);
  const sw = spawn(process.execPath, [MAIN, 'vhost-user-net', '--socket', a, '--socket', b, '--poll', '--json'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  sw.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  sw.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  const exited = new Promise<void>((resolve) => sw.once('exit', () => resolve()));
  const drivers: VirtioNetDriver[] = [];
  try {
    for (let i = 0; !(fs.existsSync(a) && fs.existsSync(b)); i++) {
      if (i > 500 || sw.exitCode !== null) throw new Error(`the switch did not start:\n${err}`);
      await new Promise((r) => setTimeout(r, 10));
    }
    const da = await VirtioNetDriver.connect(a, { packed: false });
    drivers.push(da);
    const db = await VirtioNetDriver.connect(b, { packed: true });
    drivers.push(db);
    log(`  two VirtioNetDrivers plugged in: port A split rings, port B packed rings, MRG_RXBUF ${da.mergeable ? 'on' : 'off'}`);
    const [ma, mb] = [macOf(0xa), macOf(0xb)];
    // B announces itself (a broadcast, flooded to A); the switch learns both MACs.
    await db.send(frame(Uint8Array.from([255, 255, 255, 255, 255, 255]), mb, 0, 60));
    await da.receive({ timeoutMs: 5000 });
    const t0 = performance.now();
    const sizes = (i: number): number => 60 + ((i * 37) % 1455);
    // A window below B's 256 RX buffers: the switch never runs out of room for them
    // (without one, a frame waiting over 2 ms for a buffer is dropped, as a switch does).
    let received = 0;
    let wake: () => void = () => undefined;
    const receiving = (async () => {
      for (let i = 1; i <= FRAMES; i++) {
        const got = await db.receive({ timeoutMs: 10_000 });
        received = i;
        wake();
        const want = frame(mb, ma, i, sizes(i));
        if (!got.equals(want)) throw new Error(`frame ${i}: ${got.length} bytes, not the ${want.length} sent`);
      }
    })();
    for (let i = 1; i <= FRAMES; i++) {
      const f = frame(mb, ma, i, sizes(i));
      while (i - received > 128) await new Promise<void>((r) => (wake = r));
      while (!da.trySend(f)) await da.writable();
    }
    await receiving;
    const ms = performance.now() - t0;
    log(`  A -> B: ${FRAMES} frames of 60..1514 bytes through the switch in ${ms.toFixed(0)} ms (${((FRAMES / ms) * 1000).toFixed(0)} frames/s), every one checked byte for byte`);
    await da.send(frame(mb, ma, 0, 100));
    await db.send(frame(ma, mb, 7, 1514));
    const back = await da.receive({ timeoutMs: 5000 });
    log(`  B -> A: a ${back.length}-byte reply, unicast to A's learned port`);
    void (await db.receive({ timeoutMs: 5000 }));
  } finally {
    for (const d of drivers) d.close();
    if (sw.exitCode === null) sw.kill('SIGINT');
    await Promise.race([exited, new Promise((r) => setTimeout(r, 3000))]);
    if (sw.exitCode === null) sw.kill('SIGKILL');
    fs.rmSync(dir, { recursive: true, force: true });
  }
  const lines = out.trim().split('\n').filter(Boolean);
  const last = lines.length ? (JSON.parse(lines[lines.length - 1]!) as { final?: boolean; ports: { name: string; rxPackets: number; txPackets: number; drops: Record<string, number> }[] }) : null;
  if (last?.final) {
    for (const p of last.ports) {
      const drops = Object.values(p.drops).reduce((x, y) => x + y, 0);
      log(`  the switch, port ${path.basename(p.name)}: ${p.txPackets} frames from its driver, ${p.rxPackets} to it, ${drops} dropped`);
    }
  }
}
