"""Tier kinds by name."""

from strata.store.tiers.base import Tier
from strata.store.tiers.cpu import CpuTier
from strata.store.tiers.cxl import CxlTier
from strata.store.tiers.file import FileTier
from strata.store.tiers.ranges import Extent, RangesTier
from strata.store.tiers.redis import RedisTier

TIER_CLASSES: dict[str, type[Tier]] = {"cpu": CpuTier, "file": FileTier, "ranges": RangesTier, "cxl": CxlTier,
                                       "redis": RedisTier}


def build_tier(cfg, store_cfg) -> Tier:
    return TIER_CLASSES[cfg.kind](cfg, store_cfg)


__all__ = ["Tier", "CpuTier", "CxlTier", "Extent", "FileTier", "RangesTier", "RedisTier", "TIER_CLASSES", "build_tier"]
