import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ProtocolError } from '../src/wire/errors.js';
import { Command, HeaderFlags } from '../src/vfio-user/constants.js';
import { Errno } from '../src/vfio-user/errno.js';
import {
  codecLimits,
  decodeDmaLoggingControl,
  decodeDmaLoggingReport,
  decodeDmaLoggingReportRequest,
  decodeFeatureMigState,
  decodeFeatureMigration,
  decodeHeader,
  decodeMessage,
  decodeReplyBody,
  decodeRequestBody,
  dmaLoggingBitmapSize,
  encodeDmaLoggingControl,
  encodeDmaLoggingReport,
  encodeDmaLoggingReportRequest,
  encodeErrorReply,
  encodeFeatureMigState,
  encodeFeatureMigration,
  encodeHeader,
  encodeReply,
  encodeRequest,
  GATHER_THRESHOLD,
  layouts,
} from '../src/vfio-user/messages.js';
import type { CodecCommand, Encoded, Message } from '../src/vfio-user/messages.js';
import { b, F, FIXTURES, message } from './fixtures/vfio-user-bytes.js';

const flat = (e: Encoded): Buffer => Buffer.concat(Array.isArray(e) ? e : [e]);

function isProtocolError(code: string, errno: number = Errno.EINVAL) {
  return (err: unknown): boolean => {
    assert.ok(err instanceof ProtocolError, `expected ProtocolError, got ${String(err)}`);
    assert.equal(err.code, code, err.message);
    assert.equal(err.errno, errno);
    return true;
  };
}

test('struct sizes match the spec', () => {
  const sizes: Record<string, number> = {
    HEADER: 16,
    VERSION: 4,
    DMA_MAP: 32,
    DMA_UNMAP: 24,
    BITMAP: 16,
    DEVICE_INFO: 16,
    REGION_INFO: 32,
    CAP_HEADER: 8,
    REGION_IO_FDS: 16,
    REGION_IO_FD: 40,
    IRQ_INFO: 16,
    IRQ_SET: 20,
    REGION_ACCESS: 16,
    DMA_ACCESS: 16,
    WRITE_MULTI: 8,
    WRITE_ONE: 24,
    DEVICE_FEATURE: 8,
    MIG_DATA: 8,
    FEATURE_MIGRATION: 8,
    FEATURE_MIG_STATE: 8,
    FEATURE_DMA_LOGGING_CONTROL: 16,
    FEATURE_DMA_LOGGING_RANGE: 16,
    FEATURE_DMA_LOGGING_REPORT: 24,
  };
  for (const [name, size] of Object.entries(sizes)) {
    assert.equal((layouts as unknown as Record<string, { size: number }>)[name]!.size, size, name);
  }
});

test('field offsets match the spec tables', () => {
  assert.equal(layouts.HEADER.offsetOf('msgSize'), 4);
  assert.equal(layouts.HEADER.offsetOf('errorNo'), 12);
  assert.equal(layouts.DMA_MAP.offsetOf('offset'), 8);
  assert.equal(layouts.DMA_MAP.offsetOf('address'), 16);
  assert.equal(layouts.DMA_MAP.offsetOf('size'), 24);
  assert.equal(layouts.DMA_UNMAP.offsetOf('address'), 8);
  assert.equal(layouts.REGION_INFO.offsetOf('capOffset'), 12);
  assert.equal(layouts.REGION_INFO.offsetOf('offset'), 24);
  assert.equal(layouts.REGION_IO_FD.offsetOf('fdIndex'), 16);
  assert.equal(layouts.REGION_IO_FD.offsetOf('datamatch'), 32);
  assert.equal(layouts.IRQ_SET.offsetOf('count'), 16);
  assert.equal(layouts.REGION_ACCESS.offsetOf('count'), 12);
  assert.equal(layouts.DMA_ACCESS.offsetOf('count'), 8);
  assert.equal(layouts.WRITE_ONE.offsetOf('data'), 16);
});

test('every command 1-18 but 14 has request and reply fixtures', () => {
  for (let cmd = 1; cmd <= 18; cmd++) {
    if (cmd === 14) continue;
    for (const kind of ['request', 'reply']) {
      assert.ok(FIXTURES.some((f) => f.cmd === cmd && f.kind === kind), `${Command[cmd]} ${kind}`);
    }
  }
});

for (const f of FIXTURES) {
  test(`fixture: ${f.name}`, () => {
    const msgId = 0x1234 + f.cmd;
    const frame = message(msgId, f.cmd, f.kind === 'request' ? F.COMMAND : F.REPLY, f.body);
    const m = decodeMessage(frame, codecLimits(1 << 20));
    assert.equal(m.kind, f.kind);
    assert.equal(m.header.msgId, msgId);
    assert.equal(m.header.cmd, f.cmd);
    assert.equal(m.header.msgSize, frame.length);
    assert.deepEqual((m as Exclude<Message, { kind: 'error' }>).body, f.value);

    // The same body through the per-command decoders.
    const direct =
      f.kind === 'request'
        ? decodeRequestBody(f.cmd as CodecCommand, f.body)
        : decodeReplyBody(f.cmd as CodecCommand, f.body);
    assert.deepEqual(direct, f.value);

    if (!f.decodeOnly) {
      const cmd = f.cmd as CodecCommand;
      const enc =
        f.kind === 'request'
          ? encodeRequest(cmd, msgId, f.value as never)
          : encodeReply(cmd, msgId, f.value as never);
      assert.deepEqual(flat(enc), frame);
    }
  });
}

test('decoded data fields are views into the frame (zero copy)', () => {
  const frame = message(1, 10, F.COMMAND, b().u64(0).u32(0).u32(4).bytes([1, 2, 3, 4]).build());
  const m = decodeMessage(frame);
  assert.ok(m.kind === 'request' && m.command === Command.REGION_WRITE);
  assert.equal(m.body.data.buffer, frame.buffer);
  assert.equal(m.body.data.byteOffset, frame.byteOffset + 32);
});

test('frames may sit at an offset in a larger buffer and carry trailing bytes', () => {
  const inner = message(7, 4, F.REPLY, b().u32(16).u32(3).u32(9).u32(5).build());
  const big = Buffer.concat([Buffer.alloc(5, 0xee), inner, Buffer.alloc(9, 0xee)]);
  const m = decodeMessage(big.subarray(5));
  assert.equal(m.kind, 'reply');
  assert.deepEqual(decodeHeader(big, 5), { msgId: 7, cmd: 4, msgSize: 32, flags: 1, errorNo: 0 });
});

test('large payloads are gathered, not copied', () => {
  const data = Buffer.alloc(GATHER_THRESHOLD, 0x5a);
  const enc = encodeRequest(Command.REGION_WRITE, 9, { offset: 0, region: 0, count: data.length, data });
  assert.ok(Array.isArray(enc));
  assert.equal(enc[1], data);
  assert.equal(enc[0].length, 32);
  const expected = message(9, 10, F.COMMAND, Buffer.concat([b().u64(0).u32(0).u32(data.length).build(), data]));
  assert.deepEqual(flat(enc), expected);
  const small = encodeRequest(Command.REGION_WRITE, 9, { offset: 0, region: 0, count: 4, data: data.subarray(0, 4) });
  assert.ok(!Array.isArray(small));
});

test('NO_REPLY is carried in request flags; other flags are refused', () => {
  const enc = flat(encodeRequest(Command.DEVICE_RESET, 3, undefined, HeaderFlags.NO_REPLY));
  assert.deepEqual(enc, message(3, 13, F.NO_REPLY, Buffer.alloc(0)));
  assert.throws(() => encodeRequest(Command.DEVICE_RESET, 3, undefined, HeaderFlags.ERROR), isProtocolError('WIRE_VALUE'));
});

test('error replies: header only, any command', () => {
  const enc = encodeErrorReply(0x42, 99, Errno.ENOENT);
  assert.deepEqual(Buffer.from(enc), message(0x42, 99, F.REPLY | F.ERROR, Buffer.alloc(0), 2));
  const m = decodeMessage(message(0x42, 3, F.REPLY | F.ERROR, Buffer.alloc(0), 2));
  assert.deepEqual({ kind: m.kind, command: m.command, errno: (m as { errno: number }).errno }, {
    kind: 'error',
    command: 3,
    errno: 2,
  });
  // libvfio-user may attach a body to an error reply; it is ignored.
  const withBody = decodeMessage(message(5, 10, F.REPLY | F.ERROR, b().u64(0).u32(7).u32(4).build(), 22));
  assert.equal(withBody.kind, 'error');
});

test('encodeHeader writes the spec layout', () => {
  const h = { msgId: 0xbeef, cmd: 5, msgSize: 48, flags: 1, errorNo: 0 };
  assert.deepEqual(Buffer.from(encodeHeader(h)), b().u16(0xbeef).u16(5).u32(48).u32(1).u32(0).build());
});

// ---- header errors ----

test('header framing errors: short, msg_size < 16, msg_size over the limit', () => {
  assert.throws(() => decodeHeader(Buffer.alloc(15)), isProtocolError('VFU_SHORT'));
  const small = b().u16(1).u16(4).u32(15).u32(0).u32(0).build();
  assert.throws(() => decodeHeader(small), (e: unknown) => {
    isProtocolError('VFU_BAD_SIZE')(e);
    const p = e as ProtocolError;
    return p.desync && p.msgId === 1 && p.command === 4;
  });
  const big = b().u16(2).u16(10).u32(1024 * 1024 + 33).u32(0).u32(0).build();
  assert.throws(() => decodeHeader(big, 0, codecLimits()), (e: unknown) => isProtocolError('VFU_TOO_BIG')(e) && (e as ProtocolError).desync);
  assert.doesNotThrow(() => decodeHeader(big));
  assert.throws(() => decodeMessage(big), isProtocolError('VFU_TOO_BIG'));
  // A frame shorter than its msg_size.
  assert.throws(() => decodeMessage(message(1, 13, 0, Buffer.alloc(4)).subarray(0, 18)), isProtocolError('VFU_SHORT'));
});

test('header flag errors carry the message id and command', () => {
  const cases: [number, number, string][] = [
    [0x2, 0, 'VFU_BAD_FLAGS'], // type 2
    [0x40, 0, 'VFU_BAD_FLAGS'], // undefined bit
    [F.ERROR, 0, 'VFU_BAD_FLAGS'], // Error in a command
    [F.REPLY | F.NO_REPLY, 0, 'VFU_BAD_FLAGS'], // No_reply in a reply
    [F.COMMAND, 22, 'VFU_RESERVED'], // error field in a command
  ];
  for (const [flags, errorNo, code] of cases) {
    assert.throws(
      () => decodeMessage(message(0x77, 13, flags, Buffer.alloc(0), errorNo)),
      (e: unknown) => isProtocolError(code)(e) && (e as ProtocolError).msgId === 0x77 && (e as ProtocolError).command === 13,
    );
  }
});

test('unknown and obsolete commands', () => {
  assert.throws(() => decodeMessage(message(1, 99, 0, Buffer.alloc(0))), (e: unknown) => isProtocolError('VFU_BAD_COMMAND')(e) && (e as ProtocolError).msgId === 1);
  assert.throws(() => decodeMessage(message(1, 0, 0, Buffer.alloc(0))), isProtocolError('VFU_BAD_COMMAND'));
  assert.throws(() => decodeMessage(message(1, 14, 0, b().u32(8).u32(1).build())), isProtocolError('VFU_OBSOLETE_COMMAND'));
});

// ---- body errors ----

const req = (cmd: number, body: Buffer) => () => decodeMessage(message(9, cmd, F.COMMAND, body), codecLimits(4096));
const rep = (cmd: number, body: Buffer) => () => decodeMessage(message(9, cmd, F.REPLY, body), codecLimits(4096));

test('VERSION errors', () => {
  assert.throws(req(1, b().u16(0).build()), isProtocolError('VFU_SHORT'));
  assert.throws(req(1, b().u16(0).u16(0).ascii('{}').build()), isProtocolError('VFU_BAD_VERSION'));
  assert.throws(req(1, b().u16(0).u16(0).ascii('{}').u8(0).ascii('x').u8(0).build()), isProtocolError('VFU_BAD_VERSION'));
  assert.throws(req(1, b().u16(0).u16(0).bytes([0x22, 0xff, 0x22]).u8(0).build()), isProtocolError('VFU_BAD_VERSION'));
  assert.deepEqual(decodeRequestBody(Command.VERSION, b().u16(0).u16(0).u8(0).build()), { major: 0, minor: 0 });
  assert.throws(() => encodeRequest(Command.VERSION, 1, { major: 0, minor: 0, json: 'a\0b' }), isProtocolError('WIRE_VALUE'));
});

test('DMA_MAP errors', () => {
  const map = (argsz: number, flags: number, offset: number | bigint, addr: number | bigint, size: number | bigint) =>
    b().u32(argsz).u32(flags).u64(offset).u64(addr).u64(size).build();
  assert.throws(req(2, map(32, 3, 0, 0, 0x1000).subarray(0, 24)), isProtocolError('VFU_SHORT'));
  assert.throws(req(2, Buffer.concat([map(32, 3, 0, 0, 0x1000), Buffer.alloc(8)])), isProtocolError('VFU_BAD_SIZE'));
  assert.throws(req(2, map(16, 3, 0, 0, 0x1000)), isProtocolError('VFU_BAD_ARGSZ'));
  assert.throws(req(2, map(32, 0x10, 0, 0, 0x1000)), isProtocolError('VFU_BAD_FLAGS'));
  assert.throws(req(2, map(32, 0xc, 0, 0, 0x1000)), isProtocolError('VFU_BAD_FLAGS'));
  assert.throws(req(2, map(32, 3, 0, 2 ** 53 - 0x1000, 0x2000)), isProtocolError('VFU_OVERFLOW'));
  assert.throws(req(2, map(32, 3, 0, 0xffff_ffff_ffff_f000n, 0x1000)), isProtocolError('WIRE_U64_RANGE'));
  assert.doesNotThrow(req(2, map(32, 0x7, 0, 0, 0x1000)));
});

test('DMA_UNMAP errors', () => {
  const unmap = (argsz: number, flags: number, addr: number, size: number) => b().u32(argsz).u32(flags).u64(addr).u64(size);
  assert.throws(req(3, unmap(24, 0, 0, 0).build().subarray(0, 20)), isProtocolError('VFU_SHORT'));
  assert.throws(req(3, unmap(20, 0, 0x1000, 0x1000).build()), isProtocolError('VFU_BAD_ARGSZ'));
  assert.throws(req(3, unmap(24, 4, 0x1000, 0x1000).build()), isProtocolError('VFU_BAD_FLAGS'));
  assert.throws(req(3, unmap(24, 3, 0, 0).build()), isProtocolError('VFU_BAD_FLAGS'));
  assert.throws(req(3, unmap(24, 2, 0x1000, 0).build()), isProtocolError('VFU_RESERVED'));
  assert.throws(req(3, unmap(24, 0, 0x1000, 0x1000).u64(0).build()), isProtocolError('VFU_BAD_SIZE'));
  assert.throws(req(3, unmap(48, 1, 0, 0x40000).build()), isProtocolError('VFU_SHORT'));
  assert.throws(req(3, unmap(40, 1, 0, 0x40000).u64(4096).u64(8).build()), isProtocolError('VFU_BAD_ARGSZ'));
  assert.throws(req(3, unmap(0xffff_ffff, 1, 0, 0x40000).u64(4096).u64(8192).build()), isProtocolError('VFU_TOO_BIG'));
  assert.throws(rep(3, unmap(48, 1, 0, 0x40000).u64(4096).u64(8).zeros(4).build()), isProtocolError('VFU_BAD_COUNT'));
});

test('info request errors: argsz too small, must-be-zero fields', () => {
  assert.throws(req(4, b().u32(8).u32(0).u32(0).u32(0).build()), isProtocolError('VFU_BAD_ARGSZ'));
  assert.throws(req(4, b().u32(16).u32(0).u32(1).u32(0).build()), isProtocolError('VFU_RESERVED'));
  assert.throws(req(4, b().u32(16).build()), isProtocolError('VFU_SHORT'));
  assert.throws(req(4, Buffer.alloc(0)), isProtocolError('VFU_SHORT'));
  assert.throws(req(5, b().u32(16).u32(0).u32(7).u32(0).u64(0).u64(0).build()), isProtocolError('VFU_BAD_ARGSZ'));
  assert.throws(req(5, b().u32(32).u32(0).u32(7).u32(32).u64(0).u64(0).build()), isProtocolError('VFU_RESERVED'));
  assert.throws(req(6, b().u32(16).u32(1).u32(0).u32(0).build()), isProtocolError('VFU_RESERVED'));
  assert.throws(req(7, b().u32(16).u32(0).u32(0).u32(3).build()), isProtocolError('VFU_RESERVED'));
  assert.throws(req(7, b().u32(12).u32(0).u32(0).u32(0).build()), isProtocolError('VFU_BAD_ARGSZ'));
});

test('region info reply errors', () => {
  // CAPS set but cap_offset inside the struct or past the body.
  assert.throws(rep(5, b().u32(40).u32(8).u32(0).u32(16).u64(0).u64(0).zeros(8).build()), isProtocolError('VFU_BAD_CAP'));
  assert.throws(rep(5, b().u32(40).u32(8).u32(0).u32(36).u64(0).u64(0).zeros(8).build()), isProtocolError('VFU_BAD_CAP'));
  // argsz smaller than the body sent.
  assert.throws(rep(5, b().u32(32).u32(0).u32(0).u32(0).u64(0).u64(0).zeros(8).build()), isProtocolError('VFU_BAD_ARGSZ'));
  // Truncated reply (argsz says more is needed): accepted, caps empty.
  const m = decodeReplyBody(Command.DEVICE_GET_REGION_INFO, b().u32(64).u32(7).u32(0).u32(0).u64(0x4000).u64(0).build());
  assert.equal(m.argsz, 64);
  assert.equal(m.caps.length, 0);
});

test('region io fds reply errors', () => {
  const head = (argsz: number, count: number) => b().u32(argsz).u32(0).u32(0).u32(count);
  assert.throws(rep(6, head(16 + 30, 1).zeros(30).build()), isProtocolError('VFU_BAD_COUNT'));
  assert.throws(rep(6, head(16 + 80, 1).zeros(40).build()), isProtocolError('VFU_BAD_COUNT'));
  assert.throws(rep(6, head(16 + 40, 0).zeros(40).build()), isProtocolError('VFU_BAD_COUNT'));
  assert.throws(rep(6, b().u32(16).u32(1).u32(0).u32(0).build()), isProtocolError('VFU_RESERVED'));
});

test('SET_IRQS errors', () => {
  const set = (argsz: number, flags: number, start: number, count: number) => b().u32(argsz).u32(flags).u32(2).u32(start).u32(count);
  assert.throws(req(8, set(24, 0x24, 0, 1).build()), isProtocolError('VFU_BAD_ARGSZ'));
  assert.throws(req(8, set(20, 0x25, 0, 1).build()), isProtocolError('VFU_BAD_FLAGS'));
  assert.throws(req(8, set(20, 0x30, 0, 1).build()), isProtocolError('VFU_BAD_FLAGS'));
  assert.throws(req(8, set(20, 0x04, 0, 1).build()), isProtocolError('VFU_BAD_FLAGS'));
  assert.throws(req(8, set(20, 0x64, 0, 1).build()), isProtocolError('VFU_BAD_FLAGS'));
  assert.throws(req(8, set(20, 0x21, 0xffff_ffff, 2).build()), isProtocolError('VFU_OVERFLOW'));
  assert.throws(req(8, set(22, 0x22, 0, 3).u8(1).u8(1).build()), isProtocolError('VFU_BAD_COUNT'));
  assert.throws(req(8, set(21, 0x21, 0, 1).u8(1).build()), isProtocolError('VFU_BAD_SIZE'));
  assert.throws(req(8, set(16, 0x21, 0, 1).build().subarray(0, 16)), isProtocolError('VFU_SHORT'));
});

test('region access errors', () => {
  const acc = (offset: number, region: number, count: number) => b().u64(offset).u32(region).u32(count);
  assert.throws(req(9, acc(0, 0, 4097).build()), isProtocolError('VFU_TOO_BIG'));
  assert.throws(req(9, acc(2 ** 53 - 2, 0, 4).build()), isProtocolError('VFU_OVERFLOW'));
  assert.throws(req(9, acc(0, 0, 4).u32(0).build()), isProtocolError('VFU_BAD_SIZE'));
  assert.throws(req(10, acc(0, 0, 4).bytes([1, 2]).build()), isProtocolError('VFU_BAD_COUNT'));
  assert.throws(req(10, acc(0, 0, 4097).zeros(4097).build()), isProtocolError('VFU_TOO_BIG'));
  assert.throws(req(10, acc(0, 0, 0).build().subarray(0, 12)), isProtocolError('VFU_SHORT'));
  assert.throws(rep(9, acc(0, 0, 4).bytes([1, 2, 3]).build()), isProtocolError('VFU_BAD_COUNT'));
  assert.throws(
    () => encodeRequest(Command.REGION_WRITE, 1, { offset: 0, region: 0, count: 3, data: new Uint8Array(2) }),
    isProtocolError('WIRE_VALUE'),
  );
});

test('DMA access errors', () => {
  assert.throws(req(11, b().u64(0).u64(4097).build()), isProtocolError('VFU_TOO_BIG'));
  assert.throws(req(12, b().u64(0).u64(4).bytes([1, 2, 3]).build()), isProtocolError('VFU_BAD_COUNT'));
  assert.throws(rep(11, b().u64(0).u64(2 ** 40).build()), isProtocolError('VFU_TOO_BIG'));
  assert.throws(rep(12, b().u64(0).u32(0).build().subarray(0, 10)), isProtocolError('VFU_SHORT'));
  assert.throws(rep(12, b().u64(0).u64(0).u32(0).build()), isProtocolError('VFU_BAD_SIZE'));
});

test('DEVICE_RESET with a payload is refused', () => {
  assert.throws(req(13, Buffer.alloc(4)), isProtocolError('VFU_BAD_SIZE'));
});

test('REGION_WRITE_MULTI errors', () => {
  const one = (count: number) => b().u64(0).u32(0).u32(count).zeros(8).build();
  assert.throws(req(15, Buffer.alloc(4)), isProtocolError('VFU_SHORT'));
  assert.throws(req(15, Buffer.concat([b().u64(2).build(), one(4)])), isProtocolError('VFU_BAD_COUNT'));
  assert.throws(req(15, Buffer.concat([b().u64(1).build(), one(4), Buffer.alloc(3)])), isProtocolError('VFU_BAD_COUNT'));
  assert.throws(req(15, Buffer.concat([b().u64(1).build(), one(9)])), isProtocolError('VFU_BAD_COUNT'));
  assert.throws(req(15, b().u64(2n ** 60n).build()), isProtocolError('WIRE_U64_RANGE'));
  assert.deepEqual(decodeRequestBody(Command.REGION_WRITE_MULTI, b().u64(0).build()), { writes: [] });
});

test('DEVICE_FEATURE errors', () => {
  assert.throws(req(16, b().u32(8).build()), isProtocolError('VFU_SHORT'));
  assert.throws(req(16, b().u32(4).u32(0x10001).build()), isProtocolError('VFU_BAD_ARGSZ'));
  assert.throws(req(16, b().u32(8).u32(0x1).build()), isProtocolError('VFU_BAD_FLAGS'));
  assert.throws(req(16, b().u32(8).u32(0x30001).build()), isProtocolError('VFU_BAD_FLAGS'));
  assert.throws(req(16, b().u32(8).u32(0x80001).build()), isProtocolError('VFU_BAD_FLAGS'));
  assert.doesNotThrow(req(16, b().u32(8).u32(0x70001).build()));
});

test('MIG_DATA errors', () => {
  assert.throws(req(17, b().u32(8 + 4097).u32(4097).build()), isProtocolError('VFU_TOO_BIG'));
  assert.throws(req(17, b().u32(8).u32(16).build()), isProtocolError('VFU_BAD_ARGSZ'));
  assert.throws(req(17, b().u32(24).u32(16).u32(0).build()), isProtocolError('VFU_BAD_SIZE'));
  assert.throws(rep(17, b().u32(13).u32(5).bytes([1, 2]).build()), isProtocolError('VFU_BAD_COUNT'));
  assert.throws(req(18, b().u32(13).u32(5).bytes([1, 2]).build()), isProtocolError('VFU_BAD_COUNT'));
  assert.throws(req(18, b().u32(8).u32(2).bytes([1, 2]).build()), isProtocolError('VFU_BAD_ARGSZ'));
  assert.throws(req(18, b().u32(8 + 4097).u32(4097).zeros(4097).build()), isProtocolError('VFU_TOO_BIG'));
});

test('feature data: MIGRATION and MIG_DEVICE_STATE', () => {
  assert.deepEqual(decodeFeatureMigration(b().u64(5).build()), { flags: 5n });
  assert.deepEqual(Buffer.from(encodeFeatureMigration({ flags: 5n })), b().u64(5).build());
  assert.deepEqual(decodeFeatureMigState(b().u32(3).u32(0xffff_ffff).build()), { deviceState: 3, dataFd: -1 });
  assert.deepEqual(Buffer.from(encodeFeatureMigState({ deviceState: 3, dataFd: -1 })), b().u32(3).u32(0xffff_ffff).build());
  assert.throws(() => decodeFeatureMigState(b().u32(8).u32(0).build()), isProtocolError('VFU_BAD_VALUE'));
  assert.throws(() => decodeFeatureMigration(b().u32(1).build()), isProtocolError('VFU_SHORT'));
});

test('feature data: DMA logging start/stop and report', () => {
  const control = b().u64(4096).u32(2).u32(0).u64(0).u64(0x10000).u64(0x100000).u64(0x2000).build();
  const value = { pageSize: 4096, ranges: [{ iova: 0, length: 0x10000 }, { iova: 0x100000, length: 0x2000 }] };
  assert.deepEqual(decodeDmaLoggingControl(control), value);
  assert.deepEqual(Buffer.from(encodeDmaLoggingControl(value)), control);
  assert.throws(() => decodeDmaLoggingControl(b().u64(4096).u32(1).u32(0).build()), isProtocolError('VFU_BAD_COUNT'));
  assert.throws(() => decodeDmaLoggingControl(b().u64(4096).u32(0).u32(1).build()), isProtocolError('VFU_RESERVED'));

  const reportReq = b().u64(0x100000).u64(0x41000).u64(4096).build();
  assert.deepEqual(decodeDmaLoggingReportRequest(reportReq), { iova: 0x100000, length: 0x41000, pageSize: 4096 });
  assert.deepEqual(Buffer.from(encodeDmaLoggingReportRequest({ iova: 0x100000, length: 0x41000, pageSize: 4096 })), reportReq);
  assert.throws(() => decodeDmaLoggingReportRequest(b().u64(0).u64(0x1000).u64(3000).build()), isProtocolError('VFU_BAD_VALUE'));
  // 0x41 pages: two u64s of bitmap.
  assert.equal(dmaLoggingBitmapSize(0x41000, 4096), 16);
  const bitmap = b().u64(1).u64(1).build();
  const report = Buffer.concat([reportReq, bitmap]);
  const decoded = decodeDmaLoggingReport(report);
  assert.deepEqual(decoded, { iova: 0x100000, length: 0x41000, pageSize: 4096, bitmap: new Uint8Array(bitmap) });
  assert.deepEqual(Buffer.from(encodeDmaLoggingReport(decoded)), report);
  assert.throws(() => decodeDmaLoggingReport(Buffer.concat([reportReq, Buffer.alloc(8)])), isProtocolError('VFU_BAD_SIZE'));
});

// ---- adversarial ----

test('every truncation of every fixture decodes or throws a ProtocolError', () => {
  for (const f of FIXTURES) {
    for (let n = 0; n < f.body.length; n++) {
      const frame = message(1, f.cmd, f.kind === 'request' ? F.COMMAND : F.REPLY, f.body.subarray(0, n));
      try {
        decodeMessage(frame);
      } catch (e) {
        assert.ok(e instanceof ProtocolError, `${f.name} cut at ${n}: ${String(e)}`);
      }
    }
  }
});

test('random byte flips decode or throw a ProtocolError', () => {
  let seed = 12345;
  const rand = () => {
    seed = (seed * 1103515245 + 12345) >>> 0;
    return seed;
  };
  for (const f of FIXTURES) {
    const frame = message(1, f.cmd, f.kind === 'request' ? F.COMMAND : F.REPLY, f.body);
    for (let i = 0; i < 200; i++) {
      const copy = Buffer.from(frame);
      const at = 16 + (rand() % Math.max(1, copy.length - 16));
      if (at < copy.length) copy[at] = rand() & 0xff;
      try {
        decodeMessage(copy);
      } catch (e) {
        assert.ok(e instanceof ProtocolError, `${f.name}: ${String(e)}`);
      }
    }
  }
});
