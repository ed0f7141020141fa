/**
 * A GPIO card that is libvfio-user's gpio-pci-idio-16 sample (at commit
 * 7e7a0a6c) seen from the wire: a guest program or a client written for
 * that sample drives this one, and its migration stream goes both ways
 * between the two (test/interop/gpio.test.ts migrates a running C gpio into
 * this one and back).
 *
 * - PCI ids 0x494f:0x0dc8, subsystem 0000:0000, class 0, no capabilities.
 * - BAR2: an I/O port BAR of 256 bytes (the sample registers it without
 *   VFU_REGION_FLAG_MEM), served by callbacks. No other BAR.
 * - 16 pins, each with a toggle count. A write to offset 0x0 counts a toggle
 *   on each of pins 0-7 whose bit is set in the first byte written; 0x4 the
 *   same for pins 8-15. A read of 0x1 returns a byte with bit i set when the
 *   count of pin i is divisible by 3 (pins 0-7); 0x5 the same for pins 8-15.
 *   Any other offset reads as zeros and ignores writes; a longer access uses
 *   its first byte only, as the sample's switch on the offset does.
 * - One INTx line; DMA accepted (nothing done with it).
 * - Migration (PRE_COPY and STOP_COPY offered): the stream is the 16 counts
 *   as little-endian int32 (64 bytes, `int pin[16]`), no framing. A read
 *   returns them only when they changed since the last read (and on the
 *   first read after start or after a restore), else an empty read ends the
 *   phase; a write must be 64 bytes and replaces the counts. A read asking
 *   for fewer than 64 bytes is refused with EINVAL (the C sample asserts).
 */
import type { VfioUserDeviceSpec } from '../vfio-user/device.js';
import { VfioError, Errno } from '../vfio/errors.js';

export const GPIO_PINS = 16;
/** Bytes of the migration stream: int32 per pin. */
export const GPIO_STATE_BYTES = GPIO_PINS * 4;

/** BAR2 register offsets. */
export const GpioReg = {
  /** Write: toggle pins 0-7. */
  OUT_LO: 0x0,
  /** Read: pins 0-7 whose count is divisible by 3. */
  IN_LO: 0x1,
  /** Write: toggle pins 8-15. */
  OUT_HI: 0x4,
  /** Read: pins 8-15 whose count is divisible by 3. */
  IN_HI: 0x5,
} as const;

export interface GpioOptions {
  log?: (line: string) => void;
}

export interface GpioDevice extends VfioUserDeviceSpec {
  /** The 16 toggle counts (a copy). */
  readonly pins: readonly number[];
}

export function gpioDevice(options: GpioOptions = {}): GpioDevice {
  const pin = new Int32Array(GPIO_PINS);
  let dirty = true;
  const log = options.log;

  const inputs = (base: number): number => {
    let b = 0;
    for (let i = 0; i < 8; i++) if (pin[base + i]! % 3 === 0) b |= 1 << i;
    return b;
  };
  const toggle = (base: number, bits: number): void => {
    for (let i = 0; i < 8; i++) if (bits & (1 << i)) pin[base + i]! += 1;
  };

  return {
    name: 'gpio-pci-idio-16',
    get pins() {
      return Array.from(pin);
    },
    pci: { vendorId: 0x494f, deviceId: 0x0dc8, subsystemVendorId: 0, subsystemId: 0, classCode: 0 },
    regions: {
      2: {
        size: 0x100,
        barType: 'io',
        read(offset, out) {
          out.fill(0);
          if (out.length > 0) {
            if (offset === GpioReg.IN_LO) out[0] = inputs(0);
            else if (offset === GpioReg.IN_HI) out[0] = inputs(8);
          }
          log?.(`region2: read ${out.length > 0 ? out[0] : 0} from (${offset}:${out.length})`);
        },
        write(offset, data) {
          if (data.length > 0) {
            if (offset === GpioReg.OUT_LO) toggle(0, data[0]!);
            else if (offset === GpioReg.OUT_HI) toggle(8, data[0]!);
          }
          dirty = true;
          log?.(`region2: wrote 0x${Buffer.from(data).reverse().toString('hex')} to (${offset}:${data.length})`);
        },
      },
    },
    irqs: { intx: true },
    migration: {
      preCopy: true,
      readData(size) {
        if (size < GPIO_STATE_BYTES) {
          throw new VfioError('GPIO_MIG_SHORT', Errno.EINVAL, `a gpio state read takes ${GPIO_STATE_BYTES} bytes, not ${size}`);
        }
        if (!dirty) return new Uint8Array(0);
        dirty = false;
        const out = new Uint8Array(GPIO_STATE_BYTES);
        const v = new DataView(out.buffer);
        for (let i = 0; i < GPIO_PINS; i++) v.setInt32(i * 4, pin[i]!, true);
        return out;
      },
      writeData(data) {
        if (data.length !== GPIO_STATE_BYTES) {
          throw new VfioError('GPIO_MIG_SIZE', Errno.EINVAL, `gpio state is ${GPIO_STATE_BYTES} bytes, not ${data.length}`);
        }
        const v = new DataView(data.buffer, data.byteOffset, data.length);
        for (let i = 0; i < GPIO_PINS; i++) pin[i] = v.getInt32(i * 4, true);
        dirty = true;
      },
      transition(from, to) {
        log?.(`migration: transition ${from} -> ${to}`);
      },
    },
    reset() {
      log?.('reset');
    },
    dmaMapped(w) {
      log?.(`dma: mapped 0x${w.iova.toString(16)}+0x${w.size.toString(16)}${w.mapped ? '' : ' (by messages)'}`);
    },
    dmaUnmapped(w) {
      log?.(`dma: unmapped 0x${w.iova.toString(16)}+0x${w.size.toString(16)}`);
    },
  };
}
