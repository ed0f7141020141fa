/**
 * DEVICE_FEATURE (with the data of each migration feature) and the migration
 * data stream messages MIG_DATA_READ / MIG_DATA_WRITE.
 */
import { ProtocolError } from '../wire/errors.js';
import type { ValueOfLayout } from '../wire/layout.js';
import { readU32, view } from '../wire/layout.js';
import { FEATURE_FLAGS_VALID, FeatureFlags, MigrationState } from './constants.js';
import {
  DEVICE_FEATURE,
  FEATURE_DMA_LOGGING_CONTROL,
  FEATURE_DMA_LOGGING_RANGE,
  FEATURE_DMA_LOGGING_REPORT,
  FEATURE_MIG_STATE,
  FEATURE_MIGRATION,
  MIG_DATA,
} from './messages-layouts.js';
import type { BodyCodec } from './messages-codec.js';
import {
  badCount,
  badFlags,
  badValue,
  encodeError,
  exactSize,
  fixedBody,
  isPowerOfTwo,
  minArgsz,
  minSize,
  mustBeZero,
  noOverflow,
  validFlags,
  xferLimit,
} from './messages-codec.js';

/** DEVICE_FEATURE request and reply: the feature's data is opaque here (see the decode*Feature helpers). */
export type DeviceFeature = ValueOfLayout<typeof DEVICE_FEATURE> & { data: Uint8Array };
export type MigDataRead = ValueOfLayout<typeof MIG_DATA>;
/** MIG_DATA_READ reply and MIG_DATA_WRITE request: `data` holds `size` bytes. */
export type MigData = MigDataRead & { data: Uint8Array };

export type FeatureMigration = ValueOfLayout<typeof FEATURE_MIGRATION>;
export type FeatureMigState = ValueOfLayout<typeof FEATURE_MIG_STATE>;
export interface DmaLoggingRange {
  iova: number;
  length: number;
}
export interface DmaLoggingControl {
  pageSize: number;
  ranges: DmaLoggingRange[];
}
export type DmaLoggingReportRequest = ValueOfLayout<typeof FEATURE_DMA_LOGGING_REPORT>;
export type DmaLoggingReport = DmaLoggingReportRequest & { bitmap: Uint8Array };

const OPS = FeatureFlags.GET | FeatureFlags.SET | FeatureFlags.PROBE;

function checkFeatureFlags(flags: number): void {
  validFlags(flags, FEATURE_FLAGS_VALID, 'device_feature.flags');
  if ((flags & OPS) === 0) throw badFlags('device_feature.flags', flags, 'no GET, SET or PROBE');
  const getAndSet = FeatureFlags.GET | FeatureFlags.SET;
  if ((flags & getAndSet) === getAndSet && !(flags & FeatureFlags.PROBE)) {
    throw badFlags('device_feature.flags', flags, 'GET and SET together need PROBE');
  }
}

function featureBody(request: boolean): BodyCodec<DeviceFeature> {
  return {
    decode(body) {
      minSize(body, DEVICE_FEATURE.size, 'device_feature');
      const v = DEVICE_FEATURE.decode(body, 0) as DeviceFeature;
      minArgsz(v.argsz, DEVICE_FEATURE.size, 'device_feature');
      if (request) checkFeatureFlags(v.flags);
      v.data = view(body, DEVICE_FEATURE.size);
      return v;
    },
    headSize: () => DEVICE_FEATURE.size,
    write(v, buf, offset) {
      DEVICE_FEATURE.encode(v, buf, offset);
    },
    tail: (v) => (v.data.length > 0 ? v.data : undefined),
  };
}

/** DEVICE_FEATURE request: feature index and op bits (GET and SET only together with PROBE), then data. */
export const deviceFeatureRequest = featureBody(true);
/** DEVICE_FEATURE reply: SET/PROBE echo the request; GET appends the feature's data. */
export const deviceFeatureReply = featureBody(false);

/** MIG_DATA_READ request: size <= max_data_xfer_size, argsz covers the 8-byte head and size bytes. */
export const migDataReadRequest = fixedBody(MIG_DATA, (v, limits) => {
  xferLimit(v.size, limits, 'mig_data.size');
  minArgsz(v.argsz, MIG_DATA.size + v.size, 'mig_data');
});

/**
 * MIG_DATA_READ reply: `size` bytes of data (fewer than asked means the
 * stream is done). libvfio-user pads the body to the size asked for; the
 * padding is accepted and dropped.
 */
export const migDataReadReply: BodyCodec<MigData> = {
  decode(body, limits) {
    minSize(body, MIG_DATA.size, 'mig_data');
    const v = MIG_DATA.decode(body, 0) as MigData;
    const room = body.length - MIG_DATA.size;
    xferLimit(room, limits, 'mig_data.size');
    if (v.size > room) throw badCount('mig_data.size', v.size, room, 'more than the data that follows');
    v.data = view(body, MIG_DATA.size, MIG_DATA.size + v.size);
    return v;
  },
  headSize(v) {
    if (v.data.length !== v.size) throw encodeError('mig_data.size', 'must equal data.length');
    return MIG_DATA.size;
  },
  write(v, buf, offset) {
    MIG_DATA.encode(v, buf, offset);
  },
  tail: (v) => (v.data.length > 0 ? v.data : undefined),
};

/** MIG_DATA_WRITE request: exactly `size` data bytes; argsz >= 8 + size as libvfio-user requires. */
export const migDataWriteRequest: BodyCodec<MigData> = {
  decode(body, limits) {
    minSize(body, MIG_DATA.size, 'mig_data');
    const v = MIG_DATA.decode(body, 0) as MigData;
    xferLimit(v.size, limits, 'mig_data.size');
    if (body.length - MIG_DATA.size !== v.size) {
      throw badCount('mig_data.size', v.size, body.length - MIG_DATA.size, 'does not match the data length');
    }
    minArgsz(v.argsz, MIG_DATA.size + v.size, 'mig_data');
    v.data = view(body, MIG_DATA.size);
    return v;
  },
  headSize: migDataReadReply.headSize,
  write: migDataReadReply.write,
  tail: migDataReadReply.tail,
};

// ---- feature data (the `data` of DEVICE_FEATURE), by feature index ----

/** VFIO_DEVICE_FEATURE_MIGRATION GET reply data: u64 migration flags. */
export function decodeFeatureMigration(data: Uint8Array): FeatureMigration {
  exactSize(data, FEATURE_MIGRATION.size, 'feature_migration');
  return FEATURE_MIGRATION.decode(data, 0);
}

export function encodeFeatureMigration(v: FeatureMigration): Uint8Array {
  return FEATURE_MIGRATION.encode(v);
}

/** VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE data: a state of enum vfio_device_mig_state, and the unused data_fd. */
export function decodeFeatureMigState(data: Uint8Array): FeatureMigState {
  exactSize(data, FEATURE_MIG_STATE.size, 'feature_mig_state');
  const v = FEATURE_MIG_STATE.decode(data, 0);
  if (v.deviceState > MigrationState.PRE_COPY_P2P) {
    throw badValue('feature_mig_state.device_state', v.deviceState, 'not a migration state');
  }
  return v;
}

export function encodeFeatureMigState(v: FeatureMigState): Uint8Array {
  return FEATURE_MIG_STATE.encode(v);
}

/** DMA_LOGGING_START/STOP data: page size hint and num_ranges IOVA ranges (0 = everything). */
export function decodeDmaLoggingControl(data: Uint8Array): DmaLoggingControl {
  minSize(data, FEATURE_DMA_LOGGING_CONTROL.size, 'feature_dma_logging_control');
  const head = FEATURE_DMA_LOGGING_CONTROL.decode(data, 0);
  mustBeZero(readU32(data, 12), 'feature_dma_logging_control.reserved');
  const room = (data.length - FEATURE_DMA_LOGGING_CONTROL.size) / FEATURE_DMA_LOGGING_RANGE.size;
  if (head.numRanges !== room) {
    throw badCount('feature_dma_logging_control.num_ranges', head.numRanges, room, 'does not match the ranges');
  }
  const ranges: DmaLoggingRange[] = [];
  for (let i = 0; i < head.numRanges; i++) {
    const r = FEATURE_DMA_LOGGING_RANGE.decode(
      data,
      FEATURE_DMA_LOGGING_CONTROL.size + i * FEATURE_DMA_LOGGING_RANGE.size,
    );
    noOverflow(r.iova, r.length, `feature_dma_logging_range[${i}].iova`);
    ranges.push(r);
  }
  return { pageSize: head.pageSize, ranges };
}

export function encodeDmaLoggingControl(v: DmaLoggingControl): Uint8Array {
  const out = Buffer.alloc(FEATURE_DMA_LOGGING_CONTROL.size + v.ranges.length * FEATURE_DMA_LOGGING_RANGE.size);
  FEATURE_DMA_LOGGING_CONTROL.encode({ pageSize: v.pageSize, numRanges: v.ranges.length }, out, 0);
  v.ranges.forEach((r, i) =>
    FEATURE_DMA_LOGGING_RANGE.encode(r, out, FEATURE_DMA_LOGGING_CONTROL.size + i * FEATURE_DMA_LOGGING_RANGE.size),
  );
  return out;
}

function checkReportHead(v: DmaLoggingReportRequest): void {
  if (!isPowerOfTwo(v.pageSize)) {
    throw badValue('feature_dma_logging_report.page_size', v.pageSize, 'must be a power of two');
  }
  noOverflow(v.iova, v.length, 'feature_dma_logging_report.iova');
}

/** DMA_LOGGING_REPORT GET request data: iova, length, page_size (a power of two). */
export function decodeDmaLoggingReportRequest(data: Uint8Array): DmaLoggingReportRequest {
  exactSize(data, FEATURE_DMA_LOGGING_REPORT.size, 'feature_dma_logging_report');
  const v = FEATURE_DMA_LOGGING_REPORT.decode(data, 0);
  checkReportHead(v);
  return v;
}

export function encodeDmaLoggingReportRequest(v: DmaLoggingReportRequest): Uint8Array {
  return FEATURE_DMA_LOGGING_REPORT.encode(v);
}

/** Bytes of the report bitmap: one bit per page, rounded up to whole u64s. */
export function dmaLoggingBitmapSize(length: number, pageSize: number): number {
  return Math.ceil(Math.ceil(length / pageSize) / 64) * 8;
}

/** DMA_LOGGING_REPORT reply data: the request echoed and the u64 bitmap from offset 24. */
export function decodeDmaLoggingReport(data: Uint8Array): DmaLoggingReport {
  minSize(data, FEATURE_DMA_LOGGING_REPORT.size, 'feature_dma_logging_report');
  const v = FEATURE_DMA_LOGGING_REPORT.decode(data, 0) as DmaLoggingReport;
  checkReportHead(v);
  const want = dmaLoggingBitmapSize(v.length, v.pageSize);
  if (data.length - FEATURE_DMA_LOGGING_REPORT.size !== want) {
    throw new ProtocolError('VFU_BAD_SIZE', `feature_dma_logging_report: bitmap is not ${want} bytes`, {
      field: 'feature_dma_logging_report.bitmap',
      value: data.length - FEATURE_DMA_LOGGING_REPORT.size,
      limit: want,
    });
  }
  v.bitmap = view(data, FEATURE_DMA_LOGGING_REPORT.size);
  return v;
}

export function encodeDmaLoggingReport(v: DmaLoggingReport): Uint8Array {
  const out = Buffer.alloc(FEATURE_DMA_LOGGING_REPORT.size + v.bitmap.length);
  FEATURE_DMA_LOGGING_REPORT.encode(v, out, 0);
  out.set(v.bitmap, FEATURE_DMA_LOGGING_REPORT.size);
  return out;
}
