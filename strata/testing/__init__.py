"""Test support that ships with Strata: a simulated asynchronous device for CPU machines
(``strata.testing.sim``), and the tier conformance kit (``strata.testing.tiers``:
``check_tier``), which any tier author runs against their tier."""

from strata.testing.tiers import RawStorage, TierReport, check_tier

__all__ = ["RawStorage", "TierReport", "check_tier"]
