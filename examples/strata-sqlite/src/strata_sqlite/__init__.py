"""strata-sqlite: a Strata tier in one local SQLite database file (``kind: sqlite``).

Installed, it registers itself by entry point (group ``strata.tiers``, name ``sqlite``); Strata
imports it only when a config names ``kind: sqlite``. See README.md and ``tier.py``.
"""

from strata_sqlite.tier import SqliteAbsent, SqliteTier

__all__ = ["SqliteAbsent", "SqliteTier"]
__version__ = "0.1.0"
