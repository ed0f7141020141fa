export * from './sys/index.js';
export { VERSION } from './version.js';
export { VfioUserServer } from './vfio-user/server.js';
export type { VfioUserServerOptions } from './vfio-user/server.js';
export type * from './vfio-user/device.js';
export { gpioDevice } from './devices/gpio.js';
