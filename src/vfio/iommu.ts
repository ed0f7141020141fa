/**
 * The IOMMU driver registry of the client-side VFIO model (vfio.c's
 * iommu_drivers_list): which IOMMU types a container can be set to and
 * which VFIO_CHECK_EXTENSION ids they answer. Fixed: the type1 model and,
 * where allowed, vfio-noiommu. Also the limits a container derives from
 * its IOMMU and devices.
 */
import type { DmaTarget } from './dma-target.js';
import { invalid } from './errors.js';

/** VFIO_CHECK_EXTENSION ids (linux/vfio.h). */
export const VfioExtension = {
  TYPE1_IOMMU: 1,
  SPAPR_TCE_IOMMU: 2,
  TYPE1v2_IOMMU: 3,
  DMA_CC_IOMMU: 4,
  EEH: 5,
  TYPE1_NESTING_IOMMU: 6,
  SPAPR_TCE_v2_IOMMU: 7,
  NOIOMMU_IOMMU: 8,
  UNMAP_ALL: 9,
  UPDATE_VADDR: 10,
} as const;

/** The IOMMU types VfioContainer.setIommu accepts. */
export const IommuType = {
  TYPE1: VfioExtension.TYPE1_IOMMU,
  TYPE1v2: VfioExtension.TYPE1v2_IOMMU,
  NOIOMMU: VfioExtension.NOIOMMU_IOMMU,
} as const;
export type IommuType = (typeof IommuType)[keyof typeof IommuType];

export interface IommuDriver {
  readonly name: string;
  readonly noiommu: boolean;
  /** Arguments SET_IOMMU opens the driver with. */
  readonly types: ReadonlySet<number>;
  /** CHECK_EXTENSION answers 1 for these. */
  readonly extensions: ReadonlySet<number>;
}

export const TYPE1_DRIVER: IommuDriver = {
  name: 'vfio-iommu-type1',
  noiommu: false,
  types: new Set([IommuType.TYPE1, IommuType.TYPE1v2]),
  extensions: new Set([VfioExtension.TYPE1_IOMMU, VfioExtension.TYPE1v2_IOMMU, VfioExtension.UNMAP_ALL]),
};
export const NOIOMMU_DRIVER: IommuDriver = {
  name: 'vfio-noiommu',
  noiommu: true,
  types: new Set([IommuType.NOIOMMU]),
  extensions: new Set([VfioExtension.NOIOMMU_IOMMU]),
};

export const MASK64 = (1n << 64n) - 1n;
const MAX_PAGE = 1n << 52n;

/** What a container's mappings must respect. */
export interface Limits {
  /** Page sizes every party accepts (iova_pgsizes). */
  pgsizes: bigint;
  /** The smallest of them: the alignment of iova, size and offset. */
  pageSize: number;
  /** The least max_dma_maps. */
  maxMaps: number;
}

/**
 * The limits of an IOMMU (its pgsizes and mapping limit) shared with
 * devices: pgsizes intersected, max_dma_maps the least. EINVAL when no page
 * size is common, or the smallest common one is above 2^52.
 */
export function commonLimits(iommuPgsizes: bigint, iommuMaxMaps: number, targets: readonly DmaTarget<never>[]): Limits {
  let pgsizes = iommuPgsizes;
  let maxMaps = iommuMaxMaps;
  for (const t of targets) {
    pgsizes &= t.pgsizes;
    maxMaps = Math.min(maxMaps, t.maxDmaMaps);
  }
  if (pgsizes === 0n) throw invalid('CONTAINER_PGSIZES_DISJOINT', 'no page size is supported by the IOMMU and every device');
  const low = pgsizes & -pgsizes;
  if (low > MAX_PAGE) throw invalid('CONTAINER_PAGE_TOO_LARGE', `smallest common page size ${low} is above 2^52`);
  return { pgsizes, pageSize: Number(low), maxMaps };
}
