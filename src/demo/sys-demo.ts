/**
 * The sys-layer demo (`npm start`): two processes share a memfd and wake each
 * other through eventfds, all three fds passed over a UNIX socketpair.
 */
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { SharedMemory, EventFd, UnixSocket, socketPairFds, type Fd } from '../sys/index.js';

const ROUNDS = 5;

/** Receives the first chunk that carries fds. */
function nextFds(sock: UnixSocket): Promise<{ chunk: Buffer; fds: Fd[] }> {
  return new Promise((resolve, reject) => {
    const onData = (chunk: Buffer, fds: Fd[]): void => {
      sock.off('close', onClose);
      sock.off('data', onData);
      resolve({ chunk, fds });
    };
    const onClose = (): void => reject(new Error('socket closed before the fds arrived'));
    sock.on('data', onData);
    sock.once('close', onClose);
  });
}

export async function runSysDemo(log: (line: string) => void = console.log): Promise<void> {
  const shm = SharedMemory.create(4096, { name: 'vdevkit-demo', sealSize: true });
  const toChild = EventFd.create();
  const toParent = EventFd.create();
  const [mine, theirs] = socketPairFds();
  const child = spawn(process.execPath, [fileURLToPath(import.meta.url), '--child'], {
    stdio: ['inherit', 'inherit', 'inherit', theirs.value],
  });
  theirs.close();
  const sock = new UnixSocket(mine);
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));

  log(`parent ${process.pid}: memfd ${shm.fd.value} (${shm.size} bytes), eventfds ${toChild.fd.value}/${toParent.fd.value}`);
  sock.write(Buffer.from('vdevkit-demo'), [shm.fd, toChild.fd, toParent.fd]);

  const text = new TextDecoder();
  const enc = new TextEncoder();
  for (let i = 1; i <= ROUNDS; i++) {
    const msg = enc.encode(`ping ${i} from ${process.pid}\0`);
    shm.bytes.set(msg, 0);
    toChild.signal();
    await toParent.wait();
    const reply = shm.bytes.subarray(2048, shm.bytes.indexOf(0, 2048));
    log(`parent: child wrote "${text.decode(reply)}" into the shared page`);
  }
  shm.view.setUint32(0, 0xffffffff, true); // tells the child to stop
  toChild.signal();
  const code = await exited;
  sock.destroy();
  shm.close();
  toChild.close();
  toParent.close();
  log(`parent: child exited with ${code}; ${ROUNDS} round trips through shared memory and eventfds`);
  if (code !== 0) throw new Error(`demo child failed with exit code ${code}`);
}

async function child(): Promise<void> {
  const { Fd } = await import('../sys/index.js');
  const sock = new UnixSocket(new Fd(3));
  const { chunk, fds } = await nextFds(sock);
  if (fds.length !== 3) throw new Error(`expected 3 fds, got ${fds.length}`);
  const [memfd, inFd, outFd] = fds as [Fd, Fd, Fd];
  const shm = SharedMemory.map(memfd);
  const wake = EventFd.from(inFd);
  const reply = EventFd.from(outFd);
  console.log(`child ${process.pid}: got "${chunk.toString()}" with fds ${fds.map((f) => f.value).join(', ')}`);
  const text = new TextDecoder();
  const enc = new TextEncoder();
  for (;;) {
    await wake.wait();
    if (shm.view.getUint32(0, true) === 0xffffffff) break;
    const got = text.decode(shm.bytes.subarray(0, shm.bytes.indexOf(0)));
    shm.bytes.set(enc.encode(`pong to "${got}"\0`), 2048);
    reply.signal();
  }
  shm.close();
  wake.close();
  reply.close();
  sock.destroy();
}

if (process.argv[2] === '--child' && process.argv[1] === fileURLToPath(import.meta.url)) {
  child().catch((err) => {
    console.error(err);
    process.exit(1);
  });
}
