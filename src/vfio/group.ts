/**
 * VFIO groups and devices on the client side (Linux vfio.c's vfio_group and
 * vfio_device). A group holds devices and is attached to at most one
 * container; the container gives every device of every attached group the
 * same DMA mappings (container.ts).
 *
 * Errnos, following the kernel where it has an answer:
 * - attach (GROUP_SET_CONTAINER): to the container it is already in, EINVAL
 *   (the kernel's answer to any second SET_CONTAINER); while in another
 *   container, EBUSY (the kernel says EINVAL there too; EBUSY tells the two
 *   apart); a noiommu group where noiommu is not allowed, or mixing noiommu
 *   and IOMMU groups, EPERM.
 * - detach (GROUP_UNSET_CONTAINER): not attached, EINVAL; a device of the
 *   group open, EBUSY (the kernel's "other users" answer).
 * - device open (GROUP_GET_DEVICE_FD): group not attached, no IOMMU set on
 *   the container, or group not viable: EINVAL, as the kernel; a noiommu
 *   group without permission: EPERM (the kernel's only EPERM there, for
 *   lack of CAP_SYS_RAWIO); no such device: ENODEV; already open: EBUSY
 *   (this model allows one opener; the kernel counts opens).
 * - add device: the name taken in the group, EEXIST; the target already in
 *   a group, EBUSY. Remove device: unknown, ENODEV; open, EBUSY.
 *
 * Viability: the kernel's group is viable when every device in it is bound
 * to a VFIO-safe driver; here each device has a `viable` flag and an empty
 * group is viable.
 *
 * Group operations run one at a time per group (and their container part on
 * the container's queue, so after the container operations queued before).
 */
import type { VfioContainer } from './container.js';
import { ENODEV, SerialQueue, checkDmaTarget } from './dma-target.js';
import type { DmaTarget } from './dma-target.js';
import { Errno, VfioError, invalid } from './errors.js';

/** VFIO_GROUP_GET_STATUS flags. */
export const GroupStatusFlag = {
  VIABLE: 1 << 0,
  CONTAINER_SET: 1 << 1,
} as const;

export interface VfioGroupOptions {
  /** A vfio-noiommu group: no IOMMU protection; needs a container with allowNoIommu. */
  noiommu?: boolean;
}

export interface AddDeviceOptions {
  /** Whether the device is bound, making it count as viable (default true). */
  viable?: boolean;
}

const targetsInUse = new WeakSet<object>();
let groupCount = 0;

/** A device of a group: a DmaTarget with a name, a group and an open/close lifecycle. */
export class VfioDevice<M = unknown> {
  readonly target: DmaTarget<M>;
  /** The kernel's "bound to a VFIO driver": a group is viable when all its devices are. */
  viable: boolean;
  #group: VfioGroup<M> | undefined;
  #open = false;

  /** @internal Made by VfioGroup.addDevice. */
  constructor(group: VfioGroup<M>, target: DmaTarget<M>, viable: boolean) {
    this.#group = group;
    this.target = target;
    this.viable = viable;
  }

  get name(): string {
    return this.target.name;
  }

  /** The group, or undefined once the device was removed from it. */
  get group(): VfioGroup<M> | undefined {
    return this.#group;
  }

  /** The container of the device's group, if attached. */
  get container(): VfioContainer<M> | undefined {
    return this.#group?.container;
  }

  get isOpen(): boolean {
    return this.#open;
  }

  /** Opens the device (see the errno list at the top of the file). */
  open(): Promise<void> {
    const g = this.#group;
    if (g === undefined) return Promise.reject(removed(this.name));
    return g._run(() => this._openNow());
  }

  /** Closes the device: EINVAL when it is not open. */
  close(): Promise<void> {
    const g = this.#group;
    if (g === undefined) return Promise.reject(removed(this.name));
    return g._run(() => {
      if (!this.#open) throw invalid('DEVICE_NOT_OPEN', `device ${this.name} is not open`);
      this.#open = false;
    });
  }

  /** @internal Runs on the group's queue. */
  _openNow(): void {
    const g = this.#group;
    if (g === undefined) throw removed(this.name);
    const c = g.container;
    if (c === undefined) throw invalid('GROUP_NO_CONTAINER', `group ${g.name} is not attached to a container`);
    if (c.iommu === undefined) throw invalid('CONTAINER_NO_IOMMU', 'the container has no IOMMU set');
    if (!g.viable) throw invalid('GROUP_NOT_VIABLE', `group ${g.name} is not viable (a device is not bound)`);
    if (g.noiommu && !c._allowNoIommu) throw new VfioError('DEVICE_NOIOMMU_DENIED', Errno.EPERM, `group ${g.name} is noiommu`);
    if (this.#open) throw new VfioError('DEVICE_ALREADY_OPEN', Errno.EBUSY, `device ${this.name} is already open`);
    this.#open = true;
  }

  /** @internal The device left its group. */
  _removed(): void {
    this.#group = undefined;
  }
}

function removed(name: string): VfioError {
  return new VfioError('DEVICE_NOT_FOUND', ENODEV, `device ${name} is not in a group`);
}

/** A group: devices that share an IOMMU context, attached to at most one container. */
export class VfioGroup<M = unknown> {
  readonly name: string;
  readonly noiommu: boolean;
  readonly #queue = new SerialQueue();
  readonly #devices: VfioDevice<M>[] = [];
  #container: VfioContainer<M> | undefined;

  constructor(name?: string, options: VfioGroupOptions = {}) {
    this.name = name ?? `group${groupCount++}`;
    this.noiommu = options.noiommu ?? false;
  }

  /** The container the group is attached to. */
  get container(): VfioContainer<M> | undefined {
    return this.#container;
  }

  /** The devices, in the order they were added. */
  devices(): VfioDevice<M>[] {
    return [...this.#devices];
  }

  /** The device with this name. */
  device(name: string): VfioDevice<M> | undefined {
    return this.#devices.find((d) => d.name === name);
  }

  /** Every device viable (an empty group is viable). */
  get viable(): boolean {
    return this.#devices.every((d) => d.viable);
  }

  /** VFIO_GROUP_GET_STATUS: GroupStatusFlag bits. */
  get status(): number {
    return (this.viable ? GroupStatusFlag.VIABLE : 0) | (this.#container !== undefined ? GroupStatusFlag.CONTAINER_SET : 0);
  }

  /**
   * VFIO_GROUP_SET_CONTAINER. When the container already has mappings,
   * every device of the group gets them first; if any device fails, the
   * others lose them again and the group is not attached.
   */
  attach(container: VfioContainer<M>): Promise<void> {
    return this.#queue.run(async () => {
      if (this.#container === container) throw invalid('GROUP_ALREADY_ATTACHED', `group ${this.name} is already in this container`);
      if (this.#container !== undefined) {
        throw new VfioError('GROUP_IN_OTHER_CONTAINER', Errno.EBUSY, `group ${this.name} is attached to another container`);
      }
      await container._attachGroup(this);
      this.#container = container;
    });
  }

  /**
   * VFIO_GROUP_UNSET_CONTAINER: the group's devices lose the container's
   * mappings (best effort). The last group out releases the container's
   * IOMMU and every mapping.
   */
  detach(): Promise<void> {
    return this.#queue.run(async () => {
      const c = this.#container;
      if (c === undefined) throw invalid('GROUP_NO_CONTAINER', `group ${this.name} is not attached to a container`);
      const open = this.#devices.find((d) => d.isOpen);
      if (open !== undefined) throw new VfioError('GROUP_DEVICE_OPEN', Errno.EBUSY, `device ${open.name} of group ${this.name} is open`);
      await c._detachGroup(this);
      this.#container = undefined;
    });
  }

  /**
   * Adds a device. In an attached group it first gets every mapping of the
   * container (and starts dirty logging if the container logs); if that
   * fails it is not added and the error (a DmaTargetError, or EINVAL/ENOSPC
   * when its pgsizes or max_dma_maps cannot hold the existing mappings) is
   * thrown.
   */
  addDevice(target: DmaTarget<M>, options: AddDeviceOptions = {}): Promise<VfioDevice<M>> {
    return this.#queue.run(async () => {
      checkDmaTarget(target);
      if (this.device(target.name) !== undefined) {
        throw new VfioError('DEVICE_NAME_EXISTS', Errno.EEXIST, `group ${this.name} already has a device ${target.name}`);
      }
      if (targetsInUse.has(target)) throw new VfioError('DEVICE_TARGET_IN_USE', Errno.EBUSY, `device ${target.name} is already in a group`);
      targetsInUse.add(target);
      const device = new VfioDevice<M>(this, target, options.viable ?? true);
      const commit = (): void => {
        this.#devices.push(device);
      };
      try {
        if (this.#container !== undefined) await this.#container._addDevice(target, commit);
        else commit();
      } catch (err) {
        targetsInUse.delete(target);
        throw err;
      }
      return device;
    });
  }

  /**
   * Removes a device, given as itself, its target or its name (ENODEV if not
   * here, EBUSY if open); in an attached group its mappings go first (best
   * effort).
   */
  removeDevice(device: VfioDevice<M> | DmaTarget<M> | string): Promise<void> {
    return this.#queue.run(async () => {
      const d = this.#devices.find((x) => (typeof device === 'string' ? x.name === device : x === device || x.target === device));
      if (d === undefined) {
        const name = typeof device === 'string' ? device : device.name;
        throw new VfioError('DEVICE_NOT_FOUND', ENODEV, `group ${this.name} has no device ${name}`);
      }
      if (d.isOpen) throw new VfioError('DEVICE_OPEN', Errno.EBUSY, `device ${d.name} is open`);
      const commit = (): void => {
        this.#devices.splice(this.#devices.indexOf(d), 1);
        d._removed();
        targetsInUse.delete(d.target);
      };
      if (this.#container !== undefined) await this.#container._removeDevice(d.target, commit);
      else commit();
    });
  }

  /**
   * VFIO_GROUP_GET_DEVICE_FD: opens the named device. The group's checks
   * (EINVAL, EPERM) come before the name lookup (ENODEV), as in the kernel.
   */
  openDevice(name: string): Promise<VfioDevice<M>> {
    return this.#queue.run(() => {
      const c = this.#container;
      if (c === undefined) throw invalid('GROUP_NO_CONTAINER', `group ${this.name} is not attached to a container`);
      if (c.iommu === undefined) throw invalid('CONTAINER_NO_IOMMU', 'the container has no IOMMU set');
      if (!this.viable) throw invalid('GROUP_NOT_VIABLE', `group ${this.name} is not viable (a device is not bound)`);
      if (this.noiommu && !c._allowNoIommu) throw new VfioError('DEVICE_NOIOMMU_DENIED', Errno.EPERM, `group ${this.name} is noiommu`);
      const d = this.device(name);
      if (d === undefined) throw new VfioError('DEVICE_NOT_FOUND', ENODEV, `group ${this.name} has no device ${name}`);
      d._openNow();
      return d;
    });
  }

  /** @internal Runs fn on the group's queue. */
  _run<T>(fn: () => T | Promise<T>): Promise<T> {
    return this.#queue.run(fn);
  }
}
