import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ProtocolError } from '../src/wire/errors.js';
import {
  buildCapabilitiesJson,
  checkVersionReply,
  DEFAULT_CAPABILITIES,
  negotiateVersion,
  parseCapabilities,
  validateServerCapabilities,
} from '../src/vfio-user/caps.js';
import { decodeMessage, encodeReply } from '../src/vfio-user/messages.js';
import { Command } from '../src/vfio-user/constants.js';
import { b, F, message } from './fixtures/vfio-user-bytes.js';

const isCode = (code: string) => (e: unknown) => {
  assert.ok(e instanceof ProtocolError, String(e));
  assert.equal(e.code, code, e.message);
  assert.equal(e.errno, 22);
  return true;
};

/** What QEMU 10.2's client sends (observed on the wire). */
const QEMU =
  '{"capabilities":{"pgsizes":4096,"max_msg_fds":16,"max_dma_maps":65535,"max_data_xfer_size":1048576,' +
  '"migration":{"max_bitmap_size":268435456,"pgsize":4096},"write_multiple":true}}';
/** What libvfio-user's server sends (json-c formatting). */
const LIBVFIO_USER =
  '{ "capabilities": { "max_msg_fds": 8, "max_data_xfer_size": 1048576, "migration": { "pgsize": 4096 }, ' +
  '"twin_socket": { "supported": true, "fd_index": 0 } } }';

test('defaults when there is no JSON, no capabilities object, or members are missing', () => {
  const defaults = { ...DEFAULT_CAPABILITIES, unknownKeys: [] };
  assert.deepEqual(parseCapabilities(undefined), defaults);
  assert.deepEqual(parseCapabilities('{}'), defaults);
  assert.deepEqual(parseCapabilities('{"capabilities":{}}'), defaults);
  assert.deepEqual(defaults, {
    maxMsgFds: 1,
    maxDataXferSize: 1048576,
    maxDmaMaps: 65535,
    pgsizes: 4096n,
    writeMultiple: false,
    unknownKeys: [],
  });
});

test("QEMU's capabilities parse", () => {
  assert.deepEqual(parseCapabilities(QEMU), {
    maxMsgFds: 16,
    maxDataXferSize: 1048576,
    maxDmaMaps: 65535,
    pgsizes: 4096n,
    writeMultiple: true,
    migration: { pgsize: 4096, maxBitmapSize: 268435456 },
    unknownKeys: [],
  });
});

test("libvfio-user's capabilities parse and pass the client checks", () => {
  const caps = validateServerCapabilities(LIBVFIO_USER, { proposedTwinSocket: true, fdCount: 1 });
  assert.equal(caps.maxMsgFds, 8);
  assert.deepEqual(caps.migration, { pgsize: 4096 });
  assert.deepEqual(caps.twinSocket, { supported: true, fdIndex: 0 });
});

test('unknown keys are tolerated and reported', () => {
  const caps = parseCapabilities('{"capabilities":{"max_msg_fds":2,"future":[1],"migration":{"pgsize":4096,"x":1}},"extra":null}');
  assert.equal(caps.maxMsgFds, 2);
  assert.deepEqual(caps.unknownKeys, ['extra', 'capabilities.future', 'capabilities.migration.x']);
});

test('wrong types are refused with VFU_BAD_CAPS (EINVAL)', () => {
  const bad = [
    'not json',
    '[]',
    'null',
    '{"capabilities":[]}',
    '{"capabilities":1}',
    '{"capabilities":{"max_msg_fds":"8"}}',
    '{"capabilities":{"max_msg_fds":-1}}',
    '{"capabilities":{"max_msg_fds":1.5}}',
    '{"capabilities":{"max_data_xfer_size":true}}',
    '{"capabilities":{"max_data_xfer_size":1e300}}',
    '{"capabilities":{"max_dma_maps":null}}',
    '{"capabilities":{"pgsizes":-4096}}',
    '{"capabilities":{"pgsizes":1e30}}',
    '{"capabilities":{"write_multiple":1}}',
    '{"capabilities":{"migration":4096}}',
    '{"capabilities":{"migration":{"pgsize":"4k"}}}',
    '{"capabilities":{"migration":{"pgsize":4096,"max_bitmap_size":-1}}}',
    '{"capabilities":{"twin_socket":true}}',
    '{"capabilities":{"twin_socket":{"supported":"yes"}}}',
    '{"capabilities":{"twin_socket":{"supported":true,"fd_index":-1}}}',
  ];
  for (const json of bad) assert.throws(() => parseCapabilities(json), isCode('VFU_BAD_CAPS'), json);
});

test('max_msg_fds above 1024 is refused as libvfio-user does', () => {
  assert.equal(parseCapabilities('{"capabilities":{"max_msg_fds":1024}}').maxMsgFds, 1024);
  assert.throws(() => parseCapabilities('{"capabilities":{"max_msg_fds":2000}}'), isCode('VFU_INCOMPATIBLE_CAPS'));
});

test('pgsizes is a bigint bitmask up to 64 bits', () => {
  assert.equal(parseCapabilities('{"capabilities":{"pgsizes":18446744073709547520}}').pgsizes, 0xffff_ffff_ffff_f000n);
  assert.equal(parseCapabilities('{"capabilities":{"pgsizes":1052672}}').pgsizes, 0x101000n);
});

test('building JSON: only the given members, in spec order', () => {
  assert.equal(buildCapabilitiesJson({}), '{"capabilities":{}}');
  assert.equal(
    buildCapabilitiesJson({
      maxMsgFds: 8,
      maxDataXferSize: 1048576,
      maxDmaMaps: 100,
      pgsizes: 0xffff_ffff_ffff_f000n,
      twinSocket: { supported: true, fdIndex: 0 },
      writeMultiple: false,
      migration: { pgsize: 4096, maxBitmapSize: 1024 },
    }),
    '{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576,"max_dma_maps":100,' +
      '"pgsizes":18446744073709547520,"twin_socket":{"supported":true,"fd_index":0},"write_multiple":false,' +
      '"migration":{"pgsize":4096,"max_bitmap_size":1024}}}',
  );
  assert.throws(() => buildCapabilitiesJson({ maxMsgFds: -1 }), (e: unknown) => e instanceof ProtocolError && e.code === 'WIRE_VALUE');
});

test('build then parse round-trips', () => {
  const caps = { maxMsgFds: 8, maxDataXferSize: 4096, writeMultiple: true, twinSocket: { supported: true } };
  const parsed = parseCapabilities(buildCapabilitiesJson(caps));
  assert.deepEqual(parsed, { ...DEFAULT_CAPABILITIES, ...caps, unknownKeys: [] });
});

test('VERSION message carrying capabilities, end to end', () => {
  const json = buildCapabilitiesJson({ maxMsgFds: 8, maxDataXferSize: 1048576 });
  const enc = encodeReply(Command.VERSION, 0xda55, { major: 0, minor: 0, json });
  const frame = Buffer.concat(Array.isArray(enc) ? enc : [enc]);
  assert.deepEqual(frame, message(0xda55, 1, F.REPLY, b().u16(0).u16(0).ascii(json).u8(0).build()));
  const m = decodeMessage(frame);
  assert.ok(m.kind === 'reply' && m.command === Command.VERSION);
  assert.equal(validateServerCapabilities(m.body.json).maxMsgFds, 8);
});

test("client checks follow QEMU's proxy.c limits", () => {
  const cases: [string, string][] = [
    ['{"capabilities":{"max_msg_fds":17}}', 'max_msg_fds'],
    ['{"capabilities":{"max_data_xfer_size":67108865}}', 'max_data_xfer_size'],
    ['{"capabilities":{"pgsizes":2048}}', 'pgsizes'],
    ['{"capabilities":{"pgsizes":6144}}', 'pgsizes'],
    ['{"capabilities":{"max_dma_maps":65536}}', 'max_dma_maps'],
    ['{"capabilities":{"migration":{"pgsize":512}}}', 'migration.pgsize'],
    ['{"capabilities":{"migration":{"pgsize":4096,"max_bitmap_size":268435457}}}', 'migration.max_bitmap_size'],
  ];
  for (const [json, field] of cases) {
    assert.throws(
      () => validateServerCapabilities(json),
      (e: unknown) => isCode('VFU_INCOMPATIBLE_CAPS')(e) && (e as ProtocolError).field === field,
      json,
    );
  }
  const ok = validateServerCapabilities(
    '{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":67108864,"pgsizes":12288,"max_dma_maps":1,' +
      '"migration":{"pgsize":8192,"max_bitmap_size":268435456}}}',
  );
  assert.equal(ok.maxDataXferSize, 64 * 1024 * 1024);
  assert.throws(() => validateServerCapabilities('{"capabilities":{"write_multiple":"yes"}}'), isCode('VFU_BAD_CAPS'));
});

test('twin socket reply consistency', () => {
  const twin = (t: string) => `{"capabilities":{"twin_socket":${t}}}`;
  // Not supported, missing, or absent: fine, no twin socket.
  assert.equal(validateServerCapabilities(twin('{"supported":false}'), { proposedTwinSocket: true }).twinSocket?.supported, false);
  assert.equal(validateServerCapabilities(twin('{}'), { proposedTwinSocket: true }).twinSocket?.supported, false);
  // Supported without fd_index, with an fd_index past the fds, or never proposed: inconsistent.
  assert.throws(() => validateServerCapabilities(twin('{"supported":true}'), { proposedTwinSocket: true }), isCode('VFU_INCOMPATIBLE_CAPS'));
  assert.throws(
    () => validateServerCapabilities(twin('{"supported":true,"fd_index":1}'), { proposedTwinSocket: true, fdCount: 1 }),
    isCode('VFU_INCOMPATIBLE_CAPS'),
  );
  assert.throws(() => validateServerCapabilities(twin('{"supported":true,"fd_index":0}')), isCode('VFU_INCOMPATIBLE_CAPS'));
});

test('version negotiation', () => {
  assert.deepEqual(negotiateVersion({ major: 0, minor: 0 }), { major: 0, minor: 0 });
  assert.deepEqual(negotiateVersion({ major: 0, minor: 99 }), { major: 0, minor: 2 });
  assert.throws(() => negotiateVersion({ major: 1, minor: 0 }), isCode('VFU_BAD_VERSION'));
  assert.doesNotThrow(() => checkVersionReply({ major: 0, minor: 2 }, { major: 0, minor: 0 }));
  assert.throws(() => checkVersionReply({ major: 0, minor: 0 }, { major: 0, minor: 1 }), isCode('VFU_BAD_VERSION'));
  assert.throws(() => checkVersionReply({ major: 0, minor: 0 }, { major: 1, minor: 0 }), isCode('VFU_BAD_VERSION'));
});
