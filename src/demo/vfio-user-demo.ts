/**
 * The demo `npm start` runs: first, when libvfio-user is built, a live
 * migration from libvfio-user's C gpio into ours and back (cross-migration-demo.ts); then a GPIO device (libvfio-user's gpio sample, in
 * TypeScript) served over vfio-user, driven by a client in another process,
 * then live-migrated to a second server; then the `sample` device's DMA
 * engine copies 64 MiB out of a client window the server reaches only by
 * DMA_READ messages (pipelined, received straight into a mapped window).
 * No QEMU needed.
 */
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { VfioUserServer } from '../vfio-user/server.js';
import { gpioDevice } from '../devices/gpio.js';
import { sampleDevice, SampleReg, SampleStatus } from '../devices/sample.js';
import { VfioUserClient } from '../vfio-user/client.js';
import { VfioUserDevice } from '../vfio-user/client-device.js';
import { PciIrq } from '../vfio/uapi.js';
import { EventFd, SharedMemory } from '../sys/index.js';
import { RawVfioUserClient, Bytes } from '../testing/index.js';
import { runCrossMigrationDemo } from './cross-migration-demo.js';

export async function runVfioUserDemo(log: (line: string) => void = console.log): Promise<void> {
  await runCrossMigrationDemo(log);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdevkit-demo-'));
  const a = gpioDevice();
  const b = gpioDevice();
  const serverA = VfioUserServer.listen(path.join(dir, 'gpio-a.sock'), { device: a, log: (l) => log(`  [server A] ${l}`) });
  const serverB = VfioUserServer.listen(path.join(dir, 'gpio-b.sock'), { device: b, log: (l) => log(`  [server B] ${l}`) });
  const sample = sampleDevice({ log: (l) => log(`  [server C] ${l}`) });
  const serverC = VfioUserServer.listen(path.join(dir, 'sample.sock'), { device: sample });
  log(`vdevkit demo: a gpio-pci-idio-16 device served over vfio-user at ${serverA.path}`);
  const child = spawn(process.execPath, [fileURLToPath(import.meta.url), '--client', serverA.path, serverB.path, serverC.path], {
    stdio: ['ignore', 'inherit', 'inherit'],
  });
  const code = await new Promise<number | null>((resolve) => child.on('exit', resolve));
  log(`device A pin 0 count ${a.pins[0]}, device B (migrated) ${b.pins[0]}`);
  serverA.close();
  serverB.close();
  serverC.close();
  fs.rmSync(dir, { recursive: true, force: true });
  if (code !== 0) throw new Error(`demo client failed with exit code ${code}`);
  if (a.pins[0] !== 6 || b.pins[0] !== 9) throw new Error('migrated state does not match');
  log('demo done: the migrated device went on counting where the first one stopped, and message DMA moved 64 MiB each way');
}

const u32 = (v: number): Bytes => new Bytes().u32(v);

/**
 * Message DMA: the sample device copies 64 MiB from a window without fd (DMA_READs) into one
 * mapped by fd, then 64 MiB back (DMA_WRITEs, spliced from the fd window: no copy on the
 * server's side).
 */
async function dmaDemo(pathC: string, say: (line: string) => void): Promise<void> {
  const MiB = 1 << 20;
  const client = await VfioUserClient.connect(pathC, { maxDataXferSize: MiB });
  const dev = new VfioUserDevice(client);
  const done = EventFd.create();
  await dev.setEventFds(PciIrq.MSIX, 0, [done]);
  const len = 8 * MiB;
  const MSG = 0x1000_0000;
  const FD = 0x2000_0000;
  const msg = SharedMemory.create(len, { name: 'demo-dma-msg' });
  const fd = SharedMemory.create(len, { name: 'demo-dma-fd' });
  await client.dmaMap({ iova: MSG, size: len, memory: msg, passFd: false });
  await client.dmaMap({ iova: FD, size: len, memory: fd });
  for (let i = 0; i < len; i += 4) msg.view.setUint32(i, (i * 2654435761) >>> 0, true);
  const original = Buffer.from(msg.bytes); // a copy, to check the way back
  const reg32 = (v: number): Uint8Array => new Bytes().u32(v).build();
  const reg64 = (v: number): Uint8Array => new Bytes().u64(v).build();
  const commands = 8;
  /** `commands` copies of `len` bytes from src to dst; returns GB/s. */
  const copy = async (src: number, dst: number): Promise<number> => {
    await client.regionWrite(0, SampleReg.DMA_SRC, reg64(src));
    await client.regionWrite(0, SampleReg.DMA_DST, reg64(dst));
    await client.regionWrite(0, SampleReg.DMA_LEN, reg32(len));
    const t0 = process.hrtime.bigint();
    for (let i = 0; i < commands; i++) {
      const finished = new Promise<void>((resolve) => {
        const stop = done.subscribe(() => {
          stop();
          resolve();
        });
      });
      await client.regionWrite(0, SampleReg.DMA_CMD, reg32(1));
      await finished;
      const status = new DataView((await client.regionRead(0, SampleReg.DMA_STATUS, 4)).slice().buffer).getUint32(0, true);
      if (status !== SampleStatus.DONE) throw new Error(`DMA_STATUS 0x${status.toString(16)}`);
      await client.regionWrite(0, SampleReg.DMA_STATUS, reg32(SampleStatus.DONE));
    }
    return (commands * len) / (Number(process.hrtime.bigint() - t0) / 1e9) / 1e9;
  };
  const same = (a: Uint8Array, b: Uint8Array): boolean => Buffer.from(a.buffer, a.byteOffset, a.length).equals(Buffer.from(b.buffer, b.byteOffset, b.length));
  const there = await copy(MSG, FD);
  if (!same(fd.bytes, original)) throw new Error('the DMA destination differs from the source');
  say(
    `message DMA: ${commands} x ${len / MiB} MiB copied by the sample device through DMA_READs of 1 MiB ` +
      `(the window has no fd), ${there.toFixed(2)} GB/s cold (no JIT warm-up), destination checked`,
  );
  msg.bytes.fill(0);
  const back = await copy(FD, MSG);
  if (!same(msg.bytes, original)) throw new Error('the DMA destination differs from the source (the way back)');
  say(
    `message DMA back: ${commands} x ${len / MiB} MiB through DMA_WRITEs of 1 MiB, their data spliced from the fd window ` +
      `(no copy in the server), ${back.toFixed(2)} GB/s cold, destination checked`,
  );
  client.close();
  done.close();
  msg.close();
  fd.close();
}

async function client(pathA: string, pathB: string, pathC: string): Promise<void> {
  const say = (line: string): void => console.log(`  [client ${process.pid}] ${line}`);
  const a = await RawVfioUserClient.connect(pathA);
  const v = await a.version();
  const json = v.body.subarray(4, v.body.length - 1).toString();
  say(`VERSION 0.${v.body.readUInt16LE(2)}, server capabilities ${json}`);
  const info = await a.call(4, u32(16).u32(0).u32(0).u32(0).build());
  say(`DEVICE_GET_INFO: flags 0x${info.body.readUInt32LE(4).toString(16)}, ${info.body.readUInt32LE(8)} regions, ${info.body.readUInt32LE(12)} irq types`);
  const ids = await a.call(9, new Bytes().u64(0).u32(7).u32(4).build());
  say(`config space: vendor 0x${ids.body.readUInt16LE(16).toString(16)} device 0x${ids.body.readUInt16LE(18).toString(16)}`);
  // Toggle pins 0-7 (a byte to 0x0), then read the input register 0x1: pins whose count is divisible by 3.
  const togglePins = async (c: RawVfioUserClient, n: number): Promise<string[]> => {
    const out: string[] = [];
    for (let i = 0; i < n; i++) {
      await c.call(10, new Bytes().u64(0).u32(2).u32(1).u8(0xff).build());
      out.push((await c.call(9, new Bytes().u64(1).u32(2).u32(1).build())).body[16]!.toString(16).padStart(2, '0'));
    }
    return out;
  };
  say(`BAR2: 6 toggles of pins 0-7, input register after each: ${(await togglePins(a, 6)).join(' ')}`);

  const setState = async (c: RawVfioUserClient, state: number): Promise<void> => {
    const r = await c.call(16, u32(16).u32((1 << 17) | 2).u32(state).u32(0xffffffff).build());
    if (r.isError) throw new Error(`MIG_DEVICE_STATE ${state} failed: errno ${r.errno}`);
  };
  await setState(a, 3); // STOP_COPY
  const data = await a.call(17, u32(8 + 64).u32(64).build());
  const state = data.body.subarray(8, 8 + data.body.readUInt32LE(4));
  say(`migration: STOP_COPY, read ${state.length} bytes of device state`);
  await setState(a, 1); // STOP
  a.close();

  const b = await RawVfioUserClient.connect(pathB);
  await b.version();
  await setState(b, 4); // RESUMING
  await b.call(18, u32(8 + state.length).u32(state.length).bytes(state).build());
  await setState(b, 2); // RUNNING
  say(`migration: restored into server B; 3 more toggles there, input register: ${(await togglePins(b, 3)).join(' ')}`);
  b.close();
  await dmaDemo(pathC, say);
}

if (process.argv[2] === '--client' && process.argv[1] === fileURLToPath(import.meta.url)) {
  client(process.argv[3]!, process.argv[4]!, process.argv[5]!).catch((err) => {
    console.error(err);
    process.exit(1);
  });
}
