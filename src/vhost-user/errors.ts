/** Errors of the vhost-user layer, with a code a program can test. */
export type VhostUserErrorCode =
  /** The peer broke the framing or sent a malformed payload. */
  | 'PROTOCOL'
  /** A request the back-end does not handle, or one gated on a feature not negotiated. */
  | 'UNSUPPORTED'
  /** A request with a bad argument (ring index, size, address). */
  | 'INVALID'
  /** The connection went away. */
  | 'DISCONNECTED'
  /** A reply did not come in time. */
  | 'TIMEOUT'
  /** The peer truncated shared memory we had mapped (an access faulted; SIGBUS was contained). */
  | 'MEMORY_FAULT';

export class VhostUserError extends Error {
  readonly code: VhostUserErrorCode;
  constructor(code: VhostUserErrorCode, message: string) {
    super(message);
    this.name = 'VhostUserError';
    this.code = code;
  }
}
