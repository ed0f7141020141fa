import fs from 'node:fs';
import type { TestContext } from 'node:test';
import { nativeAddon, type UnixSocket, type Fd } from '../../src/sys/index.js';

/** Number of open fds of this process. */
export function openFdCount(): number {
  return fs.readdirSync('/proc/self/fd').length;
}

export interface Received {
  bytes: Buffer;
  /** fds with the byte offset (in the stream) of the last byte of the chunk they came with. */
  fds: { fd: Fd; at: number }[];
}

/** Collects everything a socket receives until `bytes` bytes have arrived. */
export function receive(sock: UnixSocket, bytes: number, timeoutMs = 5000): Promise<Received> {
  return new Promise((resolve, reject) => {
    const parts: Buffer[] = [];
    const fds: Received['fds'] = [];
    let total = 0;
    const timer = setTimeout(() => finish(new Error(`timed out after ${total} of ${bytes} bytes`)), timeoutMs);
    const onData = (chunk: Buffer, got: Fd[]): void => {
      parts.push(Buffer.from(chunk));
      total += chunk.length;
      for (const fd of got) fds.push({ fd, at: total - 1 });
      if (total >= bytes) finish();
    };
    const onClose = (): void => finish(new Error(`closed after ${total} of ${bytes} bytes`));
    function finish(err?: Error): void {
      clearTimeout(timer);
      sock.off('data', onData);
      sock.off('close', onClose);
      if (err) {
        for (const f of fds) f.fd.close();
        reject(err);
      } else resolve({ bytes: Buffer.concat(parts), fds });
    }
    sock.on('data', onData);
    sock.on('close', onClose);
  });
}

export async function closed(sock: UnixSocket): Promise<Error | undefined> {
  if (sock.closed) return undefined;
  // Not events.once: it rejects on 'error', and a close after an error is what we wait for.
  return new Promise((resolve) => sock.once('close', (err) => resolve(err)));
}

export function tick(ms = 0): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/**
 * Waits until `cond()` is true, checking every few ms; throws after `timeoutMs`.
 * For effects that happen "soon" (an event, a close, a counter reaching N): a fixed
 * sleep is a guess that a loaded machine can miss, this waits as long as needed.
 * `what` describes the condition in the error (a function is called at the timeout,
 * so it can show the value it saw); by default the condition's source text.
 */
export async function until(cond: () => boolean, timeoutMs = 5000, what?: string | (() => string)): Promise<void> {
  const t0 = performance.now();
  for (;;) {
    if (cond()) return;
    if (performance.now() - t0 >= timeoutMs) {
      const desc = typeof what === 'function' ? what() : (what ?? cond.toString());
      throw new Error(`condition not met within ${timeoutMs} ms: ${desc}`);
    }
    await tick(5);
  }
}

/**
 * Waits until this process has `n` open fds again (fds close asynchronously when a
 * peer or server notices a close), or throws after `timeoutMs` with the count it saw.
 */
export function openFdsBackTo(n: number, what = 'open fds', timeoutMs = 5000): Promise<void> {
  return until(() => openFdCount() === n, timeoutMs, () => `${what}: ${openFdCount()} open, ${n} expected`);
}

/**
 * Counts native pipeSend calls (spliced sends, see UnixSocket.write's `shared`) until the test
 * ends; `n` may be reset. Servers in the test's process use the same addon object.
 */
export function countSplices(t: TestContext): { n: number } {
  const pipeSend = nativeAddon.pipeSend;
  const count = { n: 0 };
  nativeAddon.pipeSend = (...args) => {
    count.n++;
    return pipeSend(...args);
  };
  t.after(() => (nativeAddon.pipeSend = pipeSend));
  return count;
}
