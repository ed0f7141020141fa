export * from './sys/index.js';
export { VERSION } from './version.js';
