"""Tier kinds by name: the built-in ones here, third-party ones by entry point (``registry``)."""

from strata.config import DECLARED_KINDS, declared_class
from strata.store.tiers.base import Tier
from strata.store.tiers.cpu import CpuTier
from strata.store.tiers.cxl import CxlTier, RegionAbsent
from strata.store.tiers.file import DirectoryAbsent, FileTier
from strata.store.tiers.ranges import Extent, RangesTier
from strata.store.tiers.redis import RedisTier
from strata.store.tiers import registry

TIER_CLASSES: dict[str, type[Tier]] = {"cpu": CpuTier, "file": FileTier, "ranges": RangesTier, "cxl": CxlTier,
                                       "redis": RedisTier}


def build_tier(cfg, store_cfg, create: bool = True) -> Tier:
    """The tier ``cfg`` names. ``create=False`` opens only what exists: a cxl tier whose region is
    missing, or a file tier whose directory is, raises ``RegionAbsent`` (a StoreError) instead of
    creating one; other kinds ignore it."""
    if cfg.kind in ("cxl", "file"):
        return TIER_CLASSES[cfg.kind](cfg, store_cfg, create=create)
    if cfg.kind in DECLARED_KINDS:  # built in, imported only when a config names it
        return registry.build(declared_class(cfg.kind), cfg, store_cfg, create)
    if cfg.kind not in TIER_CLASSES:  # an installed plugin's kind (loaded when its config was validated)
        return registry.build(registry.tier_class(cfg.kind, f"tiers[{cfg.name}].kind"), cfg, store_cfg, create)
    return TIER_CLASSES[cfg.kind](cfg, store_cfg)


__all__ = ["Tier", "CpuTier", "CxlTier", "DirectoryAbsent", "Extent", "FileTier", "RangesTier", "RedisTier",
           "RegionAbsent", "TIER_CLASSES", "build_tier", "registry"]
