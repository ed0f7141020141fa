import { test } from 'node:test';
import assert from 'node:assert/strict';
import { IrqState, VfioError, validateSetIrqs } from '../src/vfio/index.js';
import type { IrqEventFd, IrqSetHeader, SetIrqsOp } from '../src/vfio/index.js';

// Flag values written out from linux/vfio.h, not taken from the module under test.
const NONE = 1;
const BOOL = 2;
const EVENTFD = 4;
const MASK = 8;
const UNMASK = 0x10;
const TRIGGER = 0x20;

/** INTx 1, MSI 4, MSI-X 8, ERR 1, REQ 1. */
const COUNTS = [1, 4, 8, 1, 1];

function payload(flags: number, index: number, start: number, count: number, data: number[] = []): Uint8Array {
  const b = new Uint8Array(20 + data.length);
  const v = new DataView(b.buffer);
  v.setUint32(0, b.length, true);
  v.setUint32(4, flags, true);
  v.setUint32(8, index, true);
  v.setUint32(12, start, true);
  v.setUint32(16, count, true);
  b.set(data, 20);
  return b;
}

function hdrOf(p: Uint8Array): IrqSetHeader {
  const v = new DataView(p.buffer, p.byteOffset, p.byteLength);
  return { argsz: v.getUint32(0, true), flags: v.getUint32(4, true), index: v.getUint32(8, true), start: v.getUint32(12, true), count: v.getUint32(16, true) };
}

function validate(p: Uint8Array, nfds = 0, counts = COUNTS): SetIrqsOp {
  return validateSetIrqs(hdrOf(p), counts, p, nfds);
}

function rejects(fn: () => unknown, code: string): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof VfioError, `expected VfioError, got ${String(err)}`);
    assert.equal(err.code, code);
    assert.equal(err.errno, 22);
    return true;
  });
}

test('accepts: eventfd assign, de-assign without fds, disable, bool, none', () => {
  assert.deepEqual(validate(payload(TRIGGER | EVENTFD, 2, 0, 8), 8), {
    kind: 'eventfd', action: 'trigger', index: 2, start: 0, count: 8, assign: true,
  });
  assert.deepEqual(validate(payload(TRIGGER | EVENTFD, 2, 5, 3), 0), {
    kind: 'eventfd', action: 'trigger', index: 2, start: 5, count: 3, assign: false,
  });
  assert.deepEqual(validate(payload(TRIGGER | NONE, 1, 0, 0)), { kind: 'disable', index: 1 });
  assert.deepEqual(validate(payload(MASK | BOOL, 1, 1, 3, [1, 0, 1])), {
    kind: 'bool', action: 'mask', index: 1, start: 1, count: 3, bools: Uint8Array.of(1, 0, 1),
  });
  assert.deepEqual(validate(payload(UNMASK | NONE, 0, 0, 1)), { kind: 'none', action: 'unmask', index: 0, start: 0, count: 1 });
  assert.deepEqual(validate(payload(UNMASK | EVENTFD, 0, 0, 1), 1), {
    kind: 'eventfd', action: 'unmask', index: 0, start: 0, count: 1, assign: true,
  });
  assert.equal(validate(payload(TRIGGER | EVENTFD, 3, 0, 1), 1).kind, 'eventfd');
  assert.equal(validate(payload(TRIGGER | NONE, 4, 0, 0)).kind, 'disable');
  // Bytes after the struct are ignored for NONE and EVENTFD, as in the kernel.
  assert.equal(validate(payload(TRIGGER | NONE, 2, 0, 2, [9, 9, 9, 9])).kind, 'none');
  assert.equal(validate(payload(TRIGGER | EVENTFD, 2, 0, 1, [0xff, 0xff, 0xff, 0xff]), 1).kind, 'eventfd');
});

test('rejects: argsz below 20 or not the payload length', () => {
  const p = payload(TRIGGER | NONE, 2, 0, 1);
  rejects(() => validateSetIrqs({ ...hdrOf(p), argsz: 16 }, COUNTS, 16, 0), 'IRQ_SET_ARGSZ');
  rejects(() => validateSetIrqs({ ...hdrOf(p), argsz: 24 }, COUNTS, p, 0), 'IRQ_SET_ARGSZ');
  rejects(() => validateSetIrqs(hdrOf(p), COUNTS, 19, 0), 'IRQ_SET_ARGSZ');
});

test('rejects: unknown flag bits, bad index, non-u32 fields', () => {
  rejects(() => validate(payload(TRIGGER | NONE | 0x40, 2, 0, 1)), 'IRQ_SET_BAD_FLAGS');
  rejects(() => validate(payload(TRIGGER | NONE, 5, 0, 1)), 'IRQ_SET_BAD_INDEX');
  rejects(() => validateSetIrqs({ argsz: 20, flags: TRIGGER | NONE, index: 0, start: -1, count: 1 }, COUNTS, 20, 0), 'IRQ_SET_BAD_FIELD');
});

test('rejects: start/count overflow and out of the index range', () => {
  rejects(() => validate(payload(TRIGGER | NONE, 2, 1, 0xffff_fffe)), 'IRQ_SET_OVERFLOW');
  rejects(() => validate(payload(TRIGGER | NONE, 2, 0, 0xffff_ffff)), 'IRQ_SET_OVERFLOW');
  rejects(() => validate(payload(TRIGGER | NONE, 1, 4, 0)), 'IRQ_SET_BAD_RANGE'); // start >= count
  rejects(() => validate(payload(TRIGGER | NONE, 1, 2, 3)), 'IRQ_SET_BAD_RANGE'); // start + count > 4
  rejects(() => validate(payload(TRIGGER | NONE, 1, 0, 0), 0, [1, 0, 8, 1, 1]), 'IRQ_SET_BAD_RANGE'); // no vectors at all
  assert.equal(validate(payload(TRIGGER | NONE, 1, 0, 4)).kind, 'none'); // exactly the whole index
});

test('rejects: not exactly one data type or one action', () => {
  rejects(() => validate(payload(TRIGGER, 2, 0, 1)), 'IRQ_SET_BAD_DATA_TYPE');
  rejects(() => validate(payload(TRIGGER | NONE | BOOL, 2, 0, 1, [1])), 'IRQ_SET_BAD_DATA_TYPE');
  rejects(() => validate(payload(TRIGGER | NONE | EVENTFD, 2, 0, 1)), 'IRQ_SET_BAD_DATA_TYPE');
  rejects(() => validate(payload(NONE, 2, 0, 1)), 'IRQ_SET_BAD_ACTION');
  rejects(() => validate(payload(MASK | UNMASK | NONE, 0, 0, 1)), 'IRQ_SET_BAD_ACTION');
  rejects(() => validate(payload(MASK | TRIGGER | NONE, 0, 0, 1)), 'IRQ_SET_BAD_ACTION');
});

test('rejects: BOOL without exactly count bytes', () => {
  rejects(() => validate(payload(TRIGGER | BOOL, 1, 0, 2, [1])), 'IRQ_SET_BAD_DATA_SIZE');
  rejects(() => validate(payload(TRIGGER | BOOL, 1, 0, 2, [1, 1, 1])), 'IRQ_SET_BAD_DATA_SIZE');
  assert.equal(validate(payload(TRIGGER | BOOL, 1, 0, 2, [1, 1])).kind, 'bool');
});

test('rejects: count 0 other than DATA_NONE | ACTION_TRIGGER', () => {
  rejects(() => validate(payload(TRIGGER | BOOL, 1, 0, 0)), 'IRQ_SET_BAD_COUNT');
  rejects(() => validate(payload(MASK | NONE, 0, 0, 0)), 'IRQ_SET_BAD_COUNT');
  rejects(() => validate(payload(TRIGGER | EVENTFD, 1, 0, 0)), 'IRQ_SET_BAD_COUNT');
});

test('rejects: ERR and REQ take only TRIGGER and one vector', () => {
  rejects(() => validate(payload(MASK | NONE, 3, 0, 1)), 'IRQ_SET_BAD_ACTION');
  rejects(() => validate(payload(UNMASK | NONE, 4, 0, 1)), 'IRQ_SET_BAD_ACTION');
  const two = [1, 4, 8, 2, 2];
  rejects(() => validate(payload(TRIGGER | NONE, 3, 0, 2), 0, two), 'IRQ_SET_BAD_COUNT');
  assert.equal(validateSetIrqs(hdrOf(payload(TRIGGER | NONE, 3, 0, 2)), two, 20, 0, { pci: false }).kind, 'none');
});

test('rejects: fds without DATA_EVENTFD, or a count other than 0 or count', () => {
  rejects(() => validate(payload(TRIGGER | NONE, 2, 0, 1), 1), 'IRQ_SET_BAD_FDS');
  rejects(() => validate(payload(TRIGGER | BOOL, 2, 0, 1, [1]), 1), 'IRQ_SET_BAD_FDS');
  rejects(() => validate(payload(TRIGGER | NONE, 2, 0, 0), 1), 'IRQ_SET_BAD_FDS');
  rejects(() => validate(payload(TRIGGER | EVENTFD, 0, 0, 1), 2), 'IRQ_SET_BAD_FDS'); // 2 fds for count 1
  rejects(() => validate(payload(TRIGGER | EVENTFD, 2, 0, 3), 1), 'IRQ_SET_BAD_FDS');
});

class FakeFd implements IrqEventFd {
  signals = 0;
  closed = false;
  signal(): boolean {
    assert.equal(this.closed, false, 'signal after close');
    this.signals++;
    return true;
  }
  close(): void {
    assert.equal(this.closed, false, 'double close');
    this.closed = true;
  }
}

const INTX = { count: 1, flags: 1 | 2 | 4 }; // EVENTFD | MASKABLE | AUTOMASKED
const MSI = { count: 4, flags: 1 | 8 }; // EVENTFD | NORESIZE
const MSIX = { count: 8, flags: 1 | 2 }; // EVENTFD | MASKABLE
const ONE = { count: 1, flags: 1 };

function state(strictMask = false): IrqState {
  return new IrqState([INTX, MSI, MSIX, ONE, ONE], { strictMask });
}

function apply(s: IrqState, p: Uint8Array, fds: FakeFd[] = []): void {
  s.apply(validateSetIrqs(hdrOf(p), s.counts, p, fds.length), fds);
}

test('IrqState: assign, trigger, replace and de-assign eventfds', () => {
  const s = state();
  const a = [new FakeFd(), new FakeFd(), new FakeFd()];
  apply(s, payload(TRIGGER | EVENTFD, 1, 0, 3), a);
  assert.equal(s.enabled(1), true);
  assert.equal(s.trigger(1, 1), 'signalled');
  assert.equal(a[1]!.signals, 1);
  assert.equal(s.trigger(1, 3), 'unassigned');
  const b = new FakeFd();
  apply(s, payload(TRIGGER | EVENTFD, 1, 1, 1), [b]);
  assert.equal(a[1]!.closed, true);
  assert.equal(s.slot(1, 1).trigger, b);
  apply(s, payload(TRIGGER | EVENTFD, 1, 0, 2)); // a run of -1 fds: de-assign
  assert.equal(a[0]!.closed, true);
  assert.equal(b.closed, true);
  assert.equal(s.slot(1, 0).trigger, undefined);
  assert.equal(a[2]!.closed, false);
  apply(s, payload(TRIGGER | NONE, 1, 0, 0)); // disable the index
  assert.equal(a[2]!.closed, true);
  assert.equal(s.enabled(1), false);
});

test('IrqState: loopback TRIGGER with NONE and BOOL', () => {
  const s = state();
  const fds = Array.from({ length: 4 }, () => new FakeFd());
  apply(s, payload(TRIGGER | EVENTFD, 2, 2, 4), fds);
  apply(s, payload(TRIGGER | NONE, 2, 2, 4));
  assert.deepEqual(fds.map((f) => f.signals), [1, 1, 1, 1]);
  apply(s, payload(TRIGGER | BOOL, 2, 2, 4, [0, 1, 0, 1]));
  assert.deepEqual(fds.map((f) => f.signals), [1, 2, 1, 2]);
});

test('IrqState: masked vectors keep the interrupt pending until unmask', () => {
  const s = state();
  const fd = new FakeFd();
  apply(s, payload(TRIGGER | EVENTFD, 2, 0, 1), [fd]);
  apply(s, payload(MASK | NONE, 2, 0, 1));
  assert.equal(s.trigger(2, 0), 'pending');
  assert.equal(s.trigger(2, 0), 'pending');
  assert.equal(fd.signals, 0);
  assert.equal(s.slot(2, 0).pending, true);
  apply(s, payload(UNMASK | BOOL, 2, 0, 1, [1]));
  assert.equal(fd.signals, 1); // delivered once at unmask
  assert.deepEqual({ masked: s.slot(2, 0).masked, pending: s.slot(2, 0).pending }, { masked: false, pending: false });
  assert.equal(s.trigger(2, 0), 'signalled');
  assert.equal(fd.signals, 2);
});

test('IrqState: AUTOMASKED INTx masks itself on every delivery', () => {
  const s = state();
  const fd = new FakeFd();
  apply(s, payload(TRIGGER | EVENTFD, 0, 0, 1), [fd]);
  assert.equal(s.trigger(0), 'signalled');
  assert.equal(s.slot(0, 0).masked, true);
  assert.equal(s.trigger(0), 'pending');
  apply(s, payload(UNMASK | NONE, 0, 0, 1));
  assert.equal(fd.signals, 2); // the pending one, delivered at unmask
  assert.equal(s.slot(0, 0).masked, true); // and masked again
  apply(s, payload(UNMASK | NONE, 0, 0, 1));
  assert.equal(s.slot(0, 0).masked, false);
  const resample = new FakeFd();
  apply(s, payload(UNMASK | EVENTFD, 0, 0, 1), [resample]);
  assert.equal(s.slot(0, 0).unmaskFd, resample);
  s.closeAll();
  assert.equal(fd.closed && resample.closed, true);
});

test('IrqState: MASK on a non-maskable index is a no-op, or EINVAL when strict', () => {
  const lenient = state();
  const fd = new FakeFd();
  apply(lenient, payload(TRIGGER | EVENTFD, 1, 0, 1), [fd]);
  apply(lenient, payload(MASK | NONE, 1, 0, 1));
  assert.equal(lenient.slot(1, 0).masked, false);
  assert.equal(lenient.trigger(1, 0), 'signalled');
  const given = new FakeFd();
  apply(lenient, payload(UNMASK | EVENTFD, 1, 0, 1), [given]);
  assert.equal(given.closed, true); // not kept
  const strict = state(true);
  rejects(() => apply(strict, payload(MASK | NONE, 1, 0, 1)), 'IRQ_NOT_MASKABLE');
});

test('IrqState: misuse from the device side', () => {
  const s = state();
  rejects(() => s.trigger(9, 0), 'IRQ_BAD_INDEX');
  rejects(() => s.trigger(1, 4), 'IRQ_BAD_VECTOR');
  rejects(() => s.apply({ kind: 'eventfd', action: 'trigger', index: 1, start: 0, count: 2, assign: true }, [new FakeFd()]), 'IRQ_SET_BAD_FDS');
  assert.deepEqual(s.counts, [1, 4, 8, 1, 1]);
  assert.equal(s.flags(0), 7);
});
