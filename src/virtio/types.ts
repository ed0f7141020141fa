/**
 * The contract between the virtqueue engine (src/virtio/) and its users: the
 * vhost-user back-end (src/vhost-user/), the front-end's userspace driver, and
 * a virtio device served over vfio-user. Guest memory is an interface so unit
 * tests use plain buffers and production uses mapped memfds; a queue can be
 * processed on a worker thread that maps the same fds (nothing here holds a
 * socket or an event loop object).
 *
 * Addresses are numbers (guest-physical and front-end-virtual addresses are
 * below 2^53 in practice; decoders check it and refuse larger ones).
 */

/** A region of guest memory as vhost-user describes it (SET_MEM_TABLE / ADD_MEM_REG). */
export interface MemoryRegionInfo {
  /** Guest-physical address of the region's first byte. */
  guestPhysAddr: number;
  /** Bytes. */
  size: number;
  /** The front-end's virtual address of the first byte (ring addresses in SET_VRING_ADDR are these). */
  userAddr: number;
  /** Offset of the region in its fd's mapping. */
  mmapOffset: number;
}

/** Guest memory: GPA and front-end-virtual-address translation, bounds-checked. */
export interface GuestMemoryView {
  /**
   * A view of [gpa, gpa + length) when it lies inside one region; throws
   * VirtioError('GPA_OUT_OF_RANGE') when any byte of it is outside guest memory.
   * May return null when the range is inside memory but crosses a region boundary
   * (use `slices`).
   */
  view(gpa: number, length: number): Uint8Array | null;
  /** [gpa, gpa + length) as consecutive views, one per region crossed; throws when any byte is outside memory. */
  slices(gpa: number, length: number): Uint8Array[];
  /** The GPA of a front-end virtual address range lying in one region; throws when it does not. */
  uvaToGpa(uva: number, length: number): number;
  /** Bumped whenever the region set changes (queues re-resolve their ring views). */
  readonly generation: number;
}

/** One descriptor chain popped from a queue: the buffers split by direction, in order. */
export interface DescChain {
  /** The id to give back with the used element (split: head index; packed: buffer id). */
  readonly id: number;
  /** Descriptors the chain used up (packed rings advance by this; split: 1 ring slot). */
  readonly descCount: number;
  /** Device-readable buffers (the driver's request), views into guest memory. */
  readonly readable: Uint8Array[];
  /** Device-writable buffers (for the reply), views into guest memory. */
  readonly writable: Uint8Array[];
  /** Total bytes of `readable` / `writable`. */
  readonly readableBytes: number;
  readonly writableBytes: number;
}
