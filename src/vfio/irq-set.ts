/**
 * SET_IRQS: validation of a request, and a model of the interrupt state it
 * changes.
 *
 * validateSetIrqs() applies the kernel's generic rules
 * (vfio_set_irqs_validate_and_prepare) and then the vfio-user rules
 * (libvfio-user's device_set_irqs_validate and the spec), and returns a
 * normalised operation; IrqState applies such operations to per-vector slots
 * and is what a device triggers.
 */
import { Errno, VfioError, invalid } from './errors.js';
import {
  IRQ_SET_ACTION_TYPE_MASK,
  IRQ_SET_DATA_TYPE_MASK,
  IRQ_SET_SIZE,
  IrqInfoFlag,
  IrqSetFlag,
  PciIrq,
} from './uapi.js';

/** The fixed 20-byte part of struct vfio_irq_set. */
export interface IrqSetHeader {
  /** In vfio-user: the size of the request payload (struct plus bool data). */
  argsz: number;
  flags: number;
  index: number;
  start: number;
  count: number;
}

export type IrqAction = 'mask' | 'unmask' | 'trigger';

/** A validated SET_IRQS request. */
export type SetIrqsOp =
  /** count 0 with DATA_NONE | ACTION_TRIGGER: disable every vector of the index. */
  | { kind: 'disable'; index: number }
  /** DATA_NONE: do the action on every vector of [start, start + count). */
  | { kind: 'none'; action: IrqAction; index: number; start: number; count: number }
  /** DATA_BOOL: do the action where bools[i] (payload byte IRQ_SET_SIZE + i) is non-zero. */
  | { kind: 'bool'; action: IrqAction; index: number; start: number; count: number; bools: Uint8Array }
  /**
   * DATA_EVENTFD: with `assign`, the message carries exactly `count` fds for
   * [start, start + count); without, it carries none and the range is
   * de-assigned (QEMU sends runs of -1 fds this way).
   */
  | { kind: 'eventfd'; action: IrqAction; index: number; start: number; count: number; assign: boolean };

export interface ValidateSetIrqsOptions {
  /**
   * Apply the PCI rule that ERR and REQ take only ACTION_TRIGGER with count
   * <= 1 (default true; the indexes are PciIrq.ERR and PciIrq.REQ).
   */
  pci?: boolean;
}

const U32_MAX = 0xffff_ffff;

const isU32 = (n: number): boolean => Number.isInteger(n) && n >= 0 && n <= U32_MAX;

function actionOf(flags: number): IrqAction | undefined {
  switch (flags & IRQ_SET_ACTION_TYPE_MASK) {
    case IrqSetFlag.ACTION_MASK:
      return 'mask';
    case IrqSetFlag.ACTION_UNMASK:
      return 'unmask';
    case IrqSetFlag.ACTION_TRIGGER:
      return 'trigger';
    default:
      return undefined;
  }
}

/**
 * Validates a SET_IRQS request and returns what it asks for, or throws
 * VfioError with errno EINVAL.
 *
 * @param hdr the 20-byte struct as decoded.
 * @param irqCounts vectors per IRQ index (index i has irqCounts[i]; the array
 *   length is the number of indexes).
 * @param payload the whole request payload (struct first; BOOL data follows
 *   it). Its length is checked against argsz; a number may be given instead
 *   when only the length is known (then a BOOL op carries no bytes).
 * @param nfds the number of fds that came with the message.
 *
 * Kernel rules: argsz >= 20; no flag bits outside DATA|ACTION; index < number
 * of indexes; count < U32_MAX - start (no overflow); start < vectors and
 * start + count <= vectors (so an index with 0 vectors accepts nothing);
 * exactly one DATA type; the data must fit in argsz (BOOL 1 byte per vector;
 * EVENTFD 4 bytes in the kernel, but in vfio-user the eventfds travel as fds).
 * vfio-user rules: argsz equals the payload length; exactly one ACTION;
 * count 0 only with DATA_NONE | ACTION_TRIGGER (disable); ERR and REQ only
 * TRIGGER with count <= 1; fds only with DATA_EVENTFD, and then exactly
 * `count` of them or none (de-assign); BOOL needs exactly `count` data bytes.
 * Bytes after the struct are ignored for NONE and EVENTFD, as the kernel does.
 */
export function validateSetIrqs(
  hdr: IrqSetHeader,
  irqCounts: readonly number[],
  payload: Uint8Array | number,
  nfds: number,
  options: ValidateSetIrqsOptions = {},
): SetIrqsOp {
  const { argsz, flags, index, start, count } = hdr;
  const payloadLen = typeof payload === 'number' ? payload : payload.length;
  if (![argsz, flags, index, start, count].every(isU32)) {
    throw invalid('IRQ_SET_BAD_FIELD', 'irq set fields must be u32 values');
  }
  if (argsz < IRQ_SET_SIZE) throw invalid('IRQ_SET_ARGSZ', `argsz ${argsz} is below ${IRQ_SET_SIZE}`);
  if (argsz !== payloadLen) {
    throw invalid('IRQ_SET_ARGSZ', `argsz ${argsz} does not match the ${payloadLen}-byte payload`);
  }
  if ((flags & ~(IRQ_SET_DATA_TYPE_MASK | IRQ_SET_ACTION_TYPE_MASK)) !== 0) {
    throw invalid('IRQ_SET_BAD_FLAGS', `unknown flag bits in ${flags.toString(16)}`);
  }
  if (index >= irqCounts.length) throw invalid('IRQ_SET_BAD_INDEX', `irq index ${index} >= ${irqCounts.length}`);
  if (count >= U32_MAX - start) throw invalid('IRQ_SET_OVERFLOW', `start ${start} + count ${count} overflows`);
  const vectors = irqCounts[index] ?? 0;
  if (start >= vectors || start + count > vectors) {
    throw invalid('IRQ_SET_BAD_RANGE', `[${start}, +${count}) is outside the ${vectors} vectors of index ${index}`);
  }
  const dataType = flags & IRQ_SET_DATA_TYPE_MASK;
  if (dataType !== IrqSetFlag.DATA_NONE && dataType !== IrqSetFlag.DATA_BOOL && dataType !== IrqSetFlag.DATA_EVENTFD) {
    throw invalid('IRQ_SET_BAD_DATA_TYPE', `need exactly one DATA type, flags ${flags.toString(16)}`);
  }
  const action = actionOf(flags);
  if (action === undefined) throw invalid('IRQ_SET_BAD_ACTION', `need exactly one ACTION, flags ${flags.toString(16)}`);
  const dataLen = argsz - IRQ_SET_SIZE;
  if (dataType === IrqSetFlag.DATA_BOOL && dataLen !== count) {
    throw invalid('IRQ_SET_BAD_DATA_SIZE', `DATA_BOOL needs ${count} bytes, got ${dataLen}`);
  }
  if (count === 0 && (dataType !== IrqSetFlag.DATA_NONE || action !== 'trigger')) {
    throw invalid('IRQ_SET_BAD_COUNT', 'count 0 is only valid with DATA_NONE | ACTION_TRIGGER');
  }
  if ((options.pci ?? true) && (index === PciIrq.ERR || index === PciIrq.REQ)) {
    if (action !== 'trigger') throw invalid('IRQ_SET_BAD_ACTION', `index ${index} only supports ACTION_TRIGGER`);
    if (count > 1) throw invalid('IRQ_SET_BAD_COUNT', `index ${index} has at most one vector`);
  }
  if (!Number.isInteger(nfds) || nfds < 0) throw invalid('IRQ_SET_BAD_FDS', `bad fd count ${nfds}`);
  if (dataType !== IrqSetFlag.DATA_EVENTFD && nfds !== 0) {
    throw invalid('IRQ_SET_BAD_FDS', `${nfds} fds sent without DATA_EVENTFD`);
  }
  if (dataType === IrqSetFlag.DATA_EVENTFD && nfds !== 0 && nfds !== count) {
    throw invalid('IRQ_SET_BAD_FDS', `DATA_EVENTFD needs ${count} fds (or none to de-assign), got ${nfds}`);
  }

  if (count === 0) return { kind: 'disable', index };
  switch (dataType) {
    case IrqSetFlag.DATA_NONE:
      return { kind: 'none', action, index, start, count };
    case IrqSetFlag.DATA_BOOL: {
      const bools =
        typeof payload === 'number' ? new Uint8Array(0) : payload.slice(IRQ_SET_SIZE, IRQ_SET_SIZE + count);
      return { kind: 'bool', action, index, start, count, bools };
    }
    default:
      return { kind: 'eventfd', action, index, start, count, assign: nfds !== 0 };
  }
}

/** What IrqState needs of an eventfd: the sys layer's EventFd fits. */
export interface IrqEventFd {
  signal(): unknown;
  close(): void;
}

/** One IRQ index as the device declares it (what GET_IRQ_INFO reports). */
export interface IrqIndexConfig {
  /** Number of vectors. */
  count: number;
  /** IrqInfoFlag bits; MASKABLE enables MASK/UNMASK, AUTOMASKED masks a vector each time it fires. */
  flags: number;
}

/** A read-only view of one vector. */
export interface IrqSlotView {
  /** The eventfd the device signals (ACTION_TRIGGER | DATA_EVENTFD). */
  readonly trigger: IrqEventFd | undefined;
  /** An eventfd the client signals to mask the vector (ACTION_MASK | DATA_EVENTFD). */
  readonly maskFd: IrqEventFd | undefined;
  /** An eventfd the client signals to unmask the vector (INTx resample; ACTION_UNMASK | DATA_EVENTFD). */
  readonly unmaskFd: IrqEventFd | undefined;
  readonly masked: boolean;
  /** Fired while masked; delivered (and cleared) at unmask. */
  readonly pending: boolean;
}

interface Slot {
  trigger: IrqEventFd | undefined;
  maskFd: IrqEventFd | undefined;
  unmaskFd: IrqEventFd | undefined;
  masked: boolean;
  pending: boolean;
}

/** Result of firing a vector. */
export type TriggerResult =
  /** The eventfd was signalled. */
  | 'signalled'
  /** The vector is masked: the interrupt is pending and will be delivered at unmask. */
  | 'pending'
  /** No eventfd is assigned: the interrupt is lost (libvfio-user returns ENOENT here). */
  | 'unassigned';

export interface IrqStateOptions {
  /**
   * MASK/UNMASK on an index without IrqInfoFlag.MASKABLE: false (default)
   * accepts them as a no-op (and closes any fds given), as libvfio-user does
   * and as QEMU's INTx path expects; true rejects them with EINVAL.
   */
  strictMask?: boolean;
}

/**
 * The interrupt state of a device: per index, a vector of slots with an
 * optional eventfd, a masked bit and a pending bit.
 *
 * Pending rule: firing a masked vector does not signal; it sets `pending`.
 * Unmasking a pending vector signals it right away (and, on an AUTOMASKED
 * index, masks it again as any delivery does). Firing a vector without an
 * eventfd loses the interrupt and sets nothing. Loopback triggers from the
 * client (ACTION_TRIGGER with DATA_NONE or DATA_BOOL) follow the same rule as
 * device triggers. Disabling an index or de-assigning a vector clears its
 * masked and pending bits.
 *
 * IrqState owns the eventfds it is given: it closes them when they are
 * replaced, de-assigned, disabled, or at closeAll().
 */
export class IrqState {
  readonly #config: readonly IrqIndexConfig[];
  readonly #slots: Slot[][];
  readonly #strictMask: boolean;

  constructor(indexes: readonly IrqIndexConfig[], options: IrqStateOptions = {}) {
    this.#config = indexes.map((c) => ({ count: c.count, flags: c.flags }));
    for (const c of this.#config) {
      if (!Number.isInteger(c.count) || c.count < 0 || c.count > U32_MAX) {
        throw new RangeError(`bad vector count ${c.count}`);
      }
    }
    this.#slots = this.#config.map((c) =>
      Array.from({ length: c.count }, () => ({
        trigger: undefined,
        maskFd: undefined,
        unmaskFd: undefined,
        masked: false,
        pending: false,
      })),
    );
    this.#strictMask = options.strictMask ?? false;
  }

  /** Vectors per index, the `irqCounts` argument of validateSetIrqs(). */
  get counts(): number[] {
    return this.#config.map((c) => c.count);
  }

  /** The IrqInfoFlag bits of an index (what GET_IRQ_INFO reports). */
  flags(index: number): number {
    return this.#index(index).flags;
  }

  /** A view of one vector. */
  slot(index: number, vector: number): IrqSlotView {
    return { ...this.#slot(index, vector) };
  }

  /** True when at least one vector of the index has a trigger eventfd. */
  enabled(index: number): boolean {
    this.#index(index);
    return this.#slots[index]!.some((s) => s.trigger !== undefined);
  }

  /**
   * Applies a validated SET_IRQS operation. `fds` must hold the message's fds
   * in order when the op assigns eventfds; IrqState takes ownership of them
   * (on error nothing is taken, and the caller still owns them).
   */
  apply(op: SetIrqsOp, fds: readonly IrqEventFd[] = []): void {
    const cfg = this.#index(op.index);
    if (op.kind === 'disable') {
      for (const s of this.#slots[op.index]!) this.#clear(s);
      return;
    }
    if (op.start + op.count > cfg.count) {
      throw invalid('IRQ_SET_BAD_RANGE', `[${op.start}, +${op.count}) is outside index ${op.index}`);
    }
    if (op.kind === 'eventfd' && op.assign && fds.length !== op.count) {
      throw invalid('IRQ_SET_BAD_FDS', `need ${op.count} fds, got ${fds.length}`);
    }
    if (op.kind === 'bool' && op.bools.length !== op.count) {
      throw invalid('IRQ_SET_BAD_DATA_SIZE', `need ${op.count} bool bytes, got ${op.bools.length}`);
    }
    const maskable = (cfg.flags & IrqInfoFlag.MASKABLE) !== 0;
    if (op.action !== 'trigger' && !maskable) {
      if (this.#strictMask) throw invalid('IRQ_NOT_MASKABLE', `index ${op.index} is not maskable`);
      if (op.kind === 'eventfd') for (const fd of fds) fd.close();
      return;
    }
    const slots = this.#slots[op.index]!;
    for (let i = 0; i < op.count; i++) {
      const s = slots[op.start + i]!;
      if (op.kind === 'eventfd') {
        const fd = op.assign ? fds[i] : undefined;
        if (op.action === 'trigger') {
          if (s.trigger !== fd) s.trigger?.close();
          s.trigger = fd;
          if (fd === undefined) {
            s.masked = false;
            s.pending = false;
          }
        } else if (op.action === 'mask') {
          if (s.maskFd !== fd) s.maskFd?.close();
          s.maskFd = fd;
        } else {
          if (s.unmaskFd !== fd) s.unmaskFd?.close();
          s.unmaskFd = fd;
        }
        continue;
      }
      if (op.kind === 'bool' && op.bools[i] === 0) continue;
      if (op.action === 'trigger') this.#fire(op.index, s);
      else if (op.action === 'mask') s.masked = true;
      else this.#unmask(op.index, s);
    }
  }

  /** Fires one vector from the device side (the library's vfu_irq_trigger). */
  trigger(index: number, vector = 0): TriggerResult {
    return this.#fire(index, this.#slot(index, vector));
  }

  /** Masks one vector from the device side (e.g. the guest masked it in the MSI-X table). */
  mask(index: number, vector = 0): void {
    this.#slot(index, vector).masked = true;
  }

  /** Unmasks one vector from the device side; a pending interrupt is delivered. */
  unmask(index: number, vector = 0): TriggerResult | undefined {
    return this.#unmask(index, this.#slot(index, vector));
  }

  /** Closes every eventfd and clears every bit: the client went away. */
  closeAll(): void {
    for (const slots of this.#slots) for (const s of slots) this.#clear(s);
  }

  #fire(index: number, s: Slot): TriggerResult {
    if (s.trigger === undefined) return 'unassigned';
    if (s.masked) {
      s.pending = true;
      return 'pending';
    }
    try {
      s.trigger.signal();
    } catch {
      // The client gave an fd that cannot be signalled (not an eventfd, closed): the interrupt is lost.
      return 'unassigned';
    }
    if ((this.#config[index]!.flags & IrqInfoFlag.AUTOMASKED) !== 0) s.masked = true;
    return 'signalled';
  }

  #unmask(index: number, s: Slot): TriggerResult | undefined {
    s.masked = false;
    if (!s.pending) return undefined;
    s.pending = false;
    return this.#fire(index, s);
  }

  #clear(s: Slot): void {
    s.trigger?.close();
    s.maskFd?.close();
    s.unmaskFd?.close();
    s.trigger = s.maskFd = s.unmaskFd = undefined;
    s.masked = false;
    s.pending = false;
  }

  #index(index: number): IrqIndexConfig {
    const cfg = this.#config[index];
    if (cfg === undefined) throw new VfioError('IRQ_BAD_INDEX', Errno.EINVAL, `no irq index ${index}`);
    return cfg;
  }

  #slot(index: number, vector: number): Slot {
    this.#index(index);
    const s = this.#slots[index]![vector];
    if (s === undefined) throw new VfioError('IRQ_BAD_VECTOR', Errno.EINVAL, `no vector ${vector} in irq index ${index}`);
    return s;
  }
}
