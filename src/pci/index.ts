export * from './errors.js';
export * from './regs.js';
export * from './caps.js';
export * from './cap-state.js';
export * from './config-space.js';
export * from './msix.js';
