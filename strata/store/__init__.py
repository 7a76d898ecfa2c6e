"""The tiered tensor store. Knows nothing of models or vLLM."""

from strata.store.engine import StorageEngine, open_store

__all__ = ["StorageEngine", "open_store"]
