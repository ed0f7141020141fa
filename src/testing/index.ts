export { Bytes } from './bytes.js';
export { RawVfioUserClient, rawMessage, FLAG_REPLY, FLAG_NO_REPLY, FLAG_ERROR, type RawMessage } from './vfio-user-raw.js';
