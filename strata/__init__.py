"""Strata: one tiered tensor store for offloaded weights and reusable KV cache."""

from strata.config import StoreConfig, parse_size
from strata.config_load import load_config, presets
from strata.errors import ConfigError, StoreError, StrataError
from strata.keys import Key, make_scope, namespaces, register_namespace
from strata.offload import OffloadError, OffloadHandle, handle_of, offload
from strata.offload.loading import load
from strata.store.engine import StorageEngine, open_store

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "Key",
    "OffloadError",
    "OffloadHandle",
    "StorageEngine",
    "StoreConfig",
    "StoreError",
    "StrataError",
    "handle_of",
    "load",
    "load_config",
    "make_scope",
    "namespaces",
    "offload",
    "open_store",
    "parse_size",
    "presets",
    "register_namespace",
]
