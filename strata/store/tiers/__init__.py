"""Tier kinds by name: the built-in ones here, third-party ones by entry point (``registry``)."""

from strata.config import DECLARED_KINDS, declared_class
from strata.store.tiers.base import Tier
from strata.store.tiers.cpu import CpuTier
from strata.store.tiers.cxl import CxlTier
from strata.store.tiers.cxl_region import RegionAbsent
from strata.store.tiers.file import DirectoryAbsent, FileTier
from strata.store.tiers.memory import MemoryTier
from strata.store.tiers.ranges import Extent, RangesTier
from strata.store.tiers.redis import RedisTier
from strata.store.tiers import registry

TIER_CLASSES: dict[str, type[Tier]] = {"cpu": CpuTier, "file": FileTier, "ranges": RangesTier, "cxl": CxlTier,
                                       "redis": RedisTier}


def build_tier(cfg, store_cfg, create: bool = True) -> Tier:
    """The tier ``cfg`` names. ``create=False`` opens only what exists: a cxl tier whose region is
    missing, or a file tier whose directory is, raises ``RegionAbsent`` (a StoreError) instead of
    creating one; other kinds ignore it (it is passed to a class whose ``__init__`` takes it)."""
    if cfg.kind in DECLARED_KINDS:  # built in (mooncake is imported only when a config names it)
        cls = TIER_CLASSES.get(cfg.kind) or declared_class(cfg.kind)
    else:  # an installed plugin's kind (loaded when its config was validated)
        cls = registry.tier_class(cfg.kind, f"tiers[{cfg.name}].kind")
    return registry.build(cls, cfg, store_cfg, create)


__all__ = ["Tier", "CpuTier", "CxlTier", "DirectoryAbsent", "Extent", "FileTier", "MemoryTier", "RangesTier",
           "RedisTier", "RegionAbsent", "TIER_CLASSES", "build_tier", "registry"]
