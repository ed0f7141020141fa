/**
 * A GPIO card that looks like libvfio-user's gpio-pci-idio-16 sample: same
 * PCI ids (0x494f:0x0dc8), one 256-byte BAR2 served by callbacks, one INTx
 * line, DMA accepted, and the input pin counter as its migration state.
 * Existing guests and tests of that sample work with it.
 *
 * Register behaviour, as in the sample: a read of offset 0 returns the
 * counter divided by 3 in its first byte and counts up (so the guest sees
 * the input pins change every third read); other bytes read as 0; writes
 * are accepted and logged.
 */
import type { VfioUserDeviceSpec, DeviceContext } from '../vfio-user/device.js';

export interface GpioOptions {
  log?: (line: string) => void;
}

export interface GpioDevice extends VfioUserDeviceSpec {
  /** The input counter (migration state). */
  readonly pin: number;
}

export function gpioDevice(options: GpioOptions = {}): GpioDevice {
  let pin = 0;
  let ctx: DeviceContext | null = null;
  const log = options.log;
  return {
    name: 'gpio-pci-idio-16',
    get pin() {
      return pin;
    },
    pci: { vendorId: 0x494f, deviceId: 0x0dc8, subsystemVendorId: 0, subsystemId: 0, classCode: 0 },
    regions: {
      2: {
        size: 0x100,
        read(offset, out) {
          out.fill(0);
          if (offset === 0) {
            out[0] = Math.floor(pin / 3) & 0xff;
            pin = (pin + 1) | 0;
          }
          log?.(`region2: read ${out.length > 0 ? out[0] : 0} from (${offset}:${out.length})`);
        },
        write(offset, data) {
          log?.(`region2: wrote 0x${Buffer.from(data).reverse().toString('hex')} to (${offset}:${data.length})`);
        },
      },
    },
    irqs: { intx: true },
    attach(c) {
      ctx = c;
    },
    detach() {
      ctx = null;
    },
    migration: {
      save() {
        const b = new Uint8Array(4);
        new DataView(b.buffer).setInt32(0, pin, true);
        return b;
      },
      load(data) {
        if (data.length !== 4) throw Object.assign(new Error('gpio state is 4 bytes'), { errno: 22 });
        pin = new DataView(data.buffer, data.byteOffset, 4).getInt32(0, true);
      },
      transition(from, to) {
        log?.(`migration: transition ${from} -> ${to}`);
      },
    },
    reset() {
      log?.('reset');
    },
    dmaMapped(w) {
      void ctx;
      log?.(`dma: mapped 0x${w.iova.toString(16)}+0x${w.size.toString(16)}${w.mapped ? '' : ' (by messages)'}`);
    },
    dmaUnmapped(w) {
      log?.(`dma: unmapped 0x${w.iova.toString(16)}+0x${w.size.toString(16)}`);
    },
  };
}
