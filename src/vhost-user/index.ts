export { VhostUserBackend, VhostQueue } from './backend.js';
export type { VhostUserDevice, VhostUserBackendOptions, IotlbStats } from './backend.js';
export { VhostUserError } from './errors.js';
export type { VhostUserErrorCode } from './errors.js';
export { MessageChannel } from './channel.js';
export type { VhostUserMessage } from './channel.js';
export * as vhostUser from './constants.js';
