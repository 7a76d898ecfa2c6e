"""Typed store configuration: sizes, the kinds of tier, and the frozen dataclasses a checked
config is made of. What turns a user's mapping, YAML file or preset into one, with an error that
names the field, is ``strata.config_load``. This module imports no tier (``declared_class``
imports one when called), so the tiers take their config types from it without a circle.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from strata.errors import ConfigError

# --------------------------------------------------------------------------- sizes

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(value: object, field: str = "size") -> int:
    """Bytes from an int or a string like ``"8GiB"``, ``"512 MB"``, ``"1.5GiB"``."""
    if isinstance(value, bool):
        raise ConfigError(f"{field}: got {value!r}; allowed: bytes as an int or a string like '8GiB'")
    if isinstance(value, int):
        n = value
    elif isinstance(value, float) and value.is_integer():
        n = int(value)
    elif isinstance(value, str) and (m := _SIZE_RE.match(value)) and m.group(2).lower() in _UNITS:
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    else:
        raise ConfigError(
            f"{field}: got {value!r}; allowed: bytes as an int or a string like '8GiB', '512MB' "
            f"(units: {', '.join(u for u in _UNITS if u)})"
        )
    if n < 0:
        raise ConfigError(f"{field}: got {value!r}; allowed: a size of 0 bytes or more")
    return n


def format_size(n: float) -> str:
    """``n`` bytes for humans; 'unbounded' for UNBOUNDED (or more), the capacity of a tier that
    sets none, which as a number would read as 4194304.0 TiB."""
    if n >= UNBOUNDED:
        return "unbounded"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# --------------------------------------------------------------------------- schema

# The built-in kinds. Each declares its config schema next to its class (``config_keys``,
# ``config_required``, ``defaults``, ``config_refused``, ``check_config``: strata.store.tiers.registry),
# as a tier plugin declares it; the class is imported when a config names its kind.
DECLARED_KINDS = {
    "cpu": "strata.store.tiers.cpu:CpuTier",
    "file": "strata.store.tiers.file:FileTier",
    "ranges": "strata.store.tiers.ranges:RangesTier",
    "cxl": "strata.store.tiers.cxl:CxlTier",
    "redis": "strata.store.tiers.redis:RedisTier",
    "mooncake": "strata.store.tiers.mooncake:MooncakeTier",
}
TIER_KINDS = tuple(DECLARED_KINDS)
UNBOUNDED = 1 << 62
POLICIES = ("lru", "s3fifo")
WRITE_MODES = ("through", "back")
EVICT_MODES = ("drop", "lower", "never")
PROMOTE_MODES = ("evict", "keep")


class Options(Mapping):
    """A tier plugin's own config keys, checked (``TierConfig.options``): read-only, and equal to a
    dict of the same items."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, Any] = ()):
        object.__setattr__(self, "_items", dict(items))

    def __setattr__(self, name, value):
        raise AttributeError("TierConfig.options is read-only")

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Options({self._items!r})"

    def __reduce__(self):
        return Options, (self._items,)


@dataclass(frozen=True)
class TierConfig:
    kind: str
    name: str
    capacity: int
    policy: str = "lru"
    write: str = "through"  # how writes to this tier reach the next one
    verify: bool = False  # verify checksums on every read (persistent tiers always do)
    # The built-in kinds' own keys: checked, and defaulted, by the specs their classes declare
    # (cpu.py, file.py, cxl.py, redis.py); None, False or () on a tier of another kind.
    pin: str | None = None  # cpu: pinned slab, cxl: mapping registered with CUDA (auto, always, never)
    path: str | None = None  # file: directory; cxl: a DAX device or a file to map
    fsync: bool = False  # file: fsync each object before it becomes visible
    size: int | None = None  # cxl: bytes of the region to map
    reset: bool = False  # cxl: wipe the region's objects on open
    numa_node: int | None = None  # cxl: bind the region's memory to this NUMA node
    url: str | None = None  # redis: redis://host:port/db, rediss:// (TLS) or unix:///path.sock
    password: str | None = field(default=None, repr=False)  # redis: never printed or logged
    password_env: str | None = None  # redis: the environment variable holding the password
    timeout_ms: int | None = None  # redis: the longest any one call may block
    max_connections: int | None = None  # redis: the connection pool's bound
    key_prefix: str | None = None  # redis: prepended to every key this tier reads or writes
    maxmemory: int | None = None  # redis: set on the server with CONFIG SET (None: leave it)
    maxmemory_policy: str | None = None  # redis: the server's eviction policy to set (None: leave it)
    cluster: bool = False  # redis: the url (and nodes) are seed nodes of a Redis Cluster
    nodes: tuple[str, ...] = ()  # redis cluster: more seed nodes, redis://host:port
    hash_tag: str | None = None  # redis cluster: "scope" keeps a scope's objects in one hash slot (one shard)
    # A tier plugin's own keys (strata.store.tiers.registry), checked by the specs its class declares.
    options: Mapping[str, Any] = field(default_factory=Options, hash=False)


@dataclass(frozen=True)
class NamespacePolicy:
    evict: str = "drop"  # drop: evict freely; lower: only once a lower tier holds it; never: pinned
    priority: int = 0  # lower priority is evicted first
    quota: Mapping[str, int] = field(default_factory=dict)  # tier name -> bytes
    # How a hit below is copied into a full tier above. evict: evicting as the tier's policy says
    # (what was read lately is read again: KV). keep: evicting only objects of namespaces of a
    # lower priority, never the namespace's own: weights are read in one cycle, every forward in
    # the same order, and LRU would evict the very block read next, so a tier smaller than the
    # cycle would hit nothing; kept, what it holds hits on every pass.
    promote: str = "evict"


@dataclass(frozen=True)
class WritebackConfig:
    max_pending: int = 1024  # objects waiting to be flushed before writers wait
    max_pending_bytes: int = 1 << 30


@dataclass(frozen=True)
class StoreConfig:
    tiers: tuple[TierConfig, ...]
    namespaces: Mapping[str, NamespacePolicy]
    writeback: WritebackConfig = WritebackConfig()
    promote: bool = True  # copy lower-tier hits into the tiers above

    def policy(self, namespace: str) -> NamespacePolicy:
        return self.namespaces.get(namespace) or DEFAULT_POLICIES.get(namespace) or NamespacePolicy()


DEFAULT_POLICIES = {
    "kv": NamespacePolicy(evict="drop", priority=0),
    "param": NamespacePolicy(evict="lower", priority=10, promote="keep"),
}


def _int(where: str, value: object, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where}: got {value!r}; allowed: an integer >= {minimum}")
    return value


def positive_int(value: object, where: str) -> int:
    """an integer >= 1"""
    return _int(where, value, 1)


def declared_class(kind: str) -> type:
    """The class of a built-in kind of ``DECLARED_KINDS``, imported now."""
    import importlib

    module, _, name = DECLARED_KINDS[kind].partition(":")
    return getattr(importlib.import_module(module), name)
