/**
 * Child side of the cross-process tests. Runs with its socket end as fd 3
 * and a mode in argv[2]. Reports with small text messages over the socket.
 */
import { UnixSocket, SharedMemory, EventFd, Fd, nativeAddon as native } from '../../src/sys/index.js';

const sock = new UnixSocket(new Fd(3));
const mode = process.argv[2];
const inbox: { chunk: Buffer; fds: Fd[] }[] = [];
let wake: (() => void) | null = null;
sock.on('data', (chunk, fds) => {
  inbox.push({ chunk: Buffer.from(chunk), fds });
  wake?.();
});

async function next(): Promise<{ chunk: Buffer; fds: Fd[] }> {
  while (inbox.length === 0) await new Promise<void>((r) => (wake = r));
  return inbox.shift()!;
}

function reply(text: string): void {
  sock.write(Buffer.from(text.padEnd(64, ' ')));
}

async function main(): Promise<void> {
  switch (mode) {
    case 'shm': {
      // fds: memfd, wake eventfd, reply eventfd
      const { fds } = await next();
      const shm = SharedMemory.map(fds[0]!);
      const wakeUp = EventFd.from(fds[1]!);
      const answer = EventFd.from(fds[2]!);
      for (let round = 0; round < 3; round++) {
        await wakeUp.wait();
        const v = shm.view.getUint32(0, true);
        shm.view.setUint32(4, v * 2 + 1, true);
        answer.signal();
      }
      shm.close();
      wakeUp.close();
      answer.close();
      break;
    }
    case 'count-fds': {
      // Receives `n` messages, signals every received eventfd with its index + 1, reports counts.
      const n = Number(process.argv[3]);
      const counts: number[] = [];
      let index = 0;
      let bytes = 0;
      while (counts.length < n) {
        const { chunk, fds } = await next();
        bytes += chunk.length;
        if (fds.length > 0) counts.push(fds.length);
        for (const fd of fds) {
          native.eventfdWrite(fd.value, ++index);
          fd.close();
        }
      }
      reply(`counts ${counts.join(',')} bytes ${bytes}`);
      break;
    }
    case 'half': {
      // Writes half of a 64-byte message and dies.
      sock.write(Buffer.from('x'.repeat(30)));
      await new Promise((r) => setTimeout(r, 20));
      process.exit(0);
    }
  }
  sock.end();
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
