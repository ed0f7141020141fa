export { SysError } from './errors.js';
export { Fd, closeAll } from './fd.js';
export { UnixSocket, UnixServer, socketPair, socketPairFds, connectUnix } from './socket.js';
export type { UnixSocketOptions, ConnectOptions, ListenOptions } from './socket.js';
export { SharedMemory } from './shm.js';
export type { CreateSharedMemoryOptions, MapOptions } from './shm.js';
export { EventFd } from './eventfd.js';
export type { EventFdOptions } from './eventfd.js';
export { native as nativeAddon } from './native.js';
