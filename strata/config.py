"""Typed store configuration: YAML presets, dicts, validation with clear errors.

Every error names the field (``tiers[1].capacity``) and what is allowed, and an
unknown key is refused with the closest allowed spelling.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Mapping

import yaml

from strata.errors import ConfigError, allowed
from strata.keys import namespaces

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
# Built-in kinds whose own keys TierConfig carries as attributes (cfg.path, cfg.url), with their
# class's defaults, rather than in ``options``; their errors name no class, as they always did.
_ATTRIBUTE_KINDS = frozenset({"cpu", "file", "ranges", "cxl", "redis"})
UNBOUNDED = 1 << 62
POLICIES = ("lru", "s3fifo")
WRITE_MODES = ("through", "back")
EVICT_MODES = ("drop", "lower", "never")


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
    "param": NamespacePolicy(evict="lower", priority=10),
}

_TOP_KEYS = {"tiers", "namespaces", "writeback", "promote"}
_NS_KEYS = {"evict", "priority", "quota"}
_WB_KEYS = {"max_pending", "max_pending_bytes"}


def _check_keys(where: str, got: Mapping, allowed_keys: set[str]) -> None:
    if not isinstance(got, Mapping):
        raise ConfigError(f"{where}: got {type(got).__name__}; allowed: a mapping with keys {', '.join(sorted(allowed_keys))}")
    for k in got:
        if k not in allowed_keys:
            raise ConfigError("unknown key " + allowed(f"{where}", k, allowed_keys))


def _choice(where: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(allowed(where, value, choices))
    return value  # type: ignore[return-value]


def _bool(where: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: got {value!r}; allowed: true, false")
    return value


def _int(where: str, value: object, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where}: got {value!r}; allowed: an integer >= {minimum}")
    return value


def positive_int(value: object, where: str) -> int:
    """an integer >= 1"""
    return _int(where, value, 1)


def _tier(i: int, raw: Mapping) -> TierConfig:
    where = f"tiers[{i}]"
    if not isinstance(raw, Mapping) or "kind" not in raw:
        raise ConfigError(f"{where}.kind: missing; allowed: {', '.join(TIER_KINDS)}, or an installed tier plugin's kind")
    kind = raw["kind"]
    if isinstance(kind, str) and kind in DECLARED_KINDS:
        return _declared_tier(where, raw, declared_class(kind), None if kind in _ATTRIBUTE_KINDS else "tier kind")
    return _plugin_tier(where, raw)


def _plugin_tier(where: str, raw: Mapping) -> TierConfig:
    """A tier of a kind an installed plugin adds (entry point group ``strata.tiers``): the common
    keys checked as for every tier, the plugin's own by the specs its class declares
    (``config_keys``, ``config_required``), into ``TierConfig.options``. The plugin is imported
    here, only for a config that names it (and the import of its registry with it: no cycle)."""
    from strata.store.tiers import registry

    kind = raw["kind"]
    if not registry.is_plugin(kind):
        plugins = registry.plugin_kinds()
        installed = (f"; tier plugins installed: {', '.join(plugins)}" if plugins
                     else "; no tier plugins are installed")
        raise ConfigError(allowed(f"{where}.kind", kind, [*TIER_KINDS, *plugins])
                          + f"{installed} (entry point group {registry.GROUP})")
    return _declared_tier(where, raw, registry.tier_class(kind, f"{where}.kind"), "tier plugin")


def _is_backing(kind: str) -> bool:
    """Whether tiers of ``kind`` keep their objects in a store that is its own index (remote)."""
    from strata.store.tiers import registry

    cls = declared_class(kind) if kind in DECLARED_KINDS else registry.tier_class(kind)
    return bool(getattr(cls, "remote", False))


def declared_class(kind: str) -> type:
    """The class of a built-in kind of ``DECLARED_KINDS``, imported now."""
    import importlib

    module, _, name = DECLARED_KINDS[kind].partition(":")
    return getattr(importlib.import_module(module), name)


def _declared_tier(where: str, raw: Mapping, cls: type, what: str | None) -> TierConfig:
    """A tier of any kind, checked by what its class declares (strata.store.tiers.registry): the
    common keys as for every tier, the class's own by their specs, then its ``check_config``. The
    kinds of ``_ATTRIBUTE_KINDS`` (``what`` None) keep their keys in ``TierConfig``'s attributes,
    with the class's ``defaults``, and their messages name no class; the others' keys land in
    ``TierConfig.options``, and ``what`` (``"tier plugin"``) names the class in messages."""
    from strata.store.tiers import registry

    kind = raw["kind"]
    specs = registry.config_keys(cls)
    keys = (set(registry.COMMON_KEYS) - set(registry.config_refused(cls))) | set(specs)
    about = f" (the keys of {what} {kind!r}, {cls.__module__}.{cls.__qualname__})" if what else ""
    for k in raw:
        if k not in keys:
            raise ConfigError(f"unknown key {allowed(where, k, keys)}{about}")
    for k in registry.config_required(cls):
        if k not in raw:
            text = "bytes as an int or a string like '8GiB'" if k == "capacity" else _spec_text(specs.get(k))
            by = f" (required by {what} {kind!r})" if what else ""
            raise ConfigError(f"{where}.{k}: missing; allowed: {text}{by}")
    values = _common(where, raw, kind, bool(getattr(cls, "persistent", False)))
    values.update((k, _option(f"{where}.{k}", raw[k], spec)) for k, spec in specs.items() if k in raw)
    values = registry.check_config(cls, values, raw, where)
    if what is None:
        return TierConfig(**{**getattr(cls, "defaults", {}), **values})
    own = Options({k: v for k, v in values.items() if k not in registry.COMMON_KEYS})
    return TierConfig(**{k: v for k, v in values.items() if k in registry.COMMON_KEYS}, options=own)


def _common(where: str, raw: Mapping, kind: str, persistent: bool) -> dict[str, Any]:
    """The common keys every tier takes, checked (a persistent tier always verifies)."""
    capacity = parse_size(raw.get("capacity", UNBOUNDED), f"{where}.capacity")
    if capacity == 0:
        raise ConfigError(f"{where}.capacity: got {raw['capacity']!r}; allowed: more than 0 bytes")
    name = raw.get("name", kind)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}.name: got {name!r}; allowed: a non-empty string")
    kw: dict[str, Any] = dict(kind=kind, name=name, capacity=capacity, verify=persistent)
    if "policy" in raw:
        kw["policy"] = _choice(f"{where}.policy", raw["policy"], POLICIES)
    if "write" in raw:
        kw["write"] = _choice(f"{where}.write", raw["write"], WRITE_MODES)
    if "verify" in raw:
        kw["verify"] = _bool(f"{where}.verify", raw["verify"]) or persistent
    return kw


def _spec_text(spec: object) -> str:
    """What a plugin key's spec allows, for a message: its choices, its type, or the first line of
    its validator's docstring."""
    if isinstance(spec, tuple):
        return ", ".join(spec)
    if isinstance(spec, type):
        return f"a {spec.__name__}"
    doc = (getattr(spec, "__doc__", None) or "").strip().splitlines()
    return doc[0].rstrip(".") if doc else "a value"


def _option(where: str, value: object, spec: object) -> Any:
    """A plugin key's value checked by its spec: a type, a tuple of allowed strings, or a
    callable ``spec(value, where) -> value``."""
    if isinstance(spec, tuple):
        return _choice(where, value, spec)
    if spec is bool:
        return _bool(where, value)
    if spec is int or spec is float:
        if isinstance(value, bool) or not isinstance(value, (int, float) if spec is float else int):
            raise ConfigError(f"{where}: got {value!r}; allowed: {'a number' if spec is float else 'an integer'}")
        return spec(value)
    if isinstance(spec, type):
        if not isinstance(value, spec):
            raise ConfigError(f"{where}: got {value!r}; allowed: a {spec.__name__}")
        return value
    try:
        return spec(value, where)  # type: ignore[operator]
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: got {value!r}; {e}") from None


def _namespace(ns: str, raw: Mapping, tier_names: list[str], remote: tuple[str, ...] = ()) -> NamespacePolicy:
    where = f"namespaces.{ns}"
    _check_keys(where, raw, _NS_KEYS)
    base = DEFAULT_POLICIES.get(ns, NamespacePolicy())
    evict = _choice(f"{where}.evict", raw.get("evict", base.evict), EVICT_MODES)
    prio = raw.get("priority", base.priority)
    if isinstance(prio, bool) or not isinstance(prio, int):
        raise ConfigError(f"{where}.priority: got {prio!r}; allowed: an integer (lower is evicted first)")
    quota_raw = raw.get("quota")
    quota: dict[str, int] = {}
    if isinstance(quota_raw, Mapping):
        for tname, size in quota_raw.items():
            if tname not in tier_names:
                raise ConfigError(allowed(f"{where}.quota", tname, tier_names))
            if tname in remote:
                raise ConfigError(f"{where}.quota.{tname}: a redis tier is bounded by the server's maxmemory; "
                                  f"allowed: quotas on {', '.join(t for t in tier_names if t not in remote) or 'no tier'}")
            quota[tname] = parse_size(size, f"{where}.quota.{tname}")
    elif quota_raw is not None:
        size = parse_size(quota_raw, f"{where}.quota")
        quota = {t: size for t in tier_names if t not in remote}
    return NamespacePolicy(evict=evict, priority=prio, quota=quota)


def validate(raw: Mapping) -> StoreConfig:
    """Turn a plain mapping (from YAML or code) into a checked ``StoreConfig``."""
    _check_keys("config", raw, _TOP_KEYS)
    tiers_raw = raw.get("tiers")
    if not isinstance(tiers_raw, list) or not tiers_raw:
        raise ConfigError(f"tiers: got {tiers_raw!r}; allowed: a non-empty list of tiers, top (fastest) first")
    tiers = tuple(_tier(i, t) for i, t in enumerate(tiers_raw))
    names = [t.name for t in tiers]
    for i, n in enumerate(names):
        if n in names[:i]:
            raise ConfigError(f"tiers[{i}].name: {n!r} is used twice; allowed: a unique name per tier")
    for i, t in enumerate(tiers[:-1]):
        if _is_backing(t.kind):  # the store is the index: no tier below it would ever be written or read back
            raise ConfigError(f"tiers[{i + 1}] ({tiers[i + 1].kind}): placed below the {t.kind} tier {t.name!r}; "
                              f"allowed: a {t.kind} tier only as the last tier")
    ns_raw = raw.get("namespaces") or {}
    if not isinstance(ns_raw, Mapping):
        raise ConfigError(f"namespaces: got {type(ns_raw).__name__}; allowed: a mapping of namespace -> policy")
    known = namespaces()
    pols = {}
    for ns, pol in ns_raw.items():
        if ns not in known:
            raise ConfigError(allowed("namespaces", ns, known) + "; register others with strata.register_namespace()")
        pols[ns] = _namespace(ns, pol or {}, names, tuple(t.name for t in tiers if t.kind == "redis"))
    wb_raw = raw.get("writeback") or {}
    _check_keys("writeback", wb_raw, _WB_KEYS)
    wb = WritebackConfig(
        max_pending=_int("writeback.max_pending", wb_raw.get("max_pending", 1024), 1),
        max_pending_bytes=parse_size(wb_raw.get("max_pending_bytes", 1 << 30), "writeback.max_pending_bytes"),
    )
    promote = _bool("promote", raw.get("promote", True))
    return StoreConfig(tiers=tiers, namespaces=pols, writeback=wb, promote=promote)


# --------------------------------------------------------------------------- loading


def presets() -> list[str]:
    """Names of the YAML presets shipped with Strata."""
    return sorted(p.name[:-5] for p in resources.files("strata.configs").iterdir() if p.name.endswith(".yaml"))


def _read_yaml(text: str, origin: str) -> Mapping:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{origin}: not valid YAML: {e}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{origin}: got {type(data).__name__}; allowed: a YAML mapping with keys {', '.join(sorted(_TOP_KEYS))}")
    return data


def load_config(config: "StoreConfig | Mapping | str | os.PathLike | None" = None) -> StoreConfig:
    """A ``StoreConfig`` from None (the ``cpu`` preset), a preset name, a YAML path or a mapping."""
    if isinstance(config, StoreConfig):
        return config
    if config is None:
        config = "cpu"
    if isinstance(config, Mapping):
        return validate(config)
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        if path.is_file():
            return validate(_read_yaml(path.read_text(), str(path)))
        if str(config) in presets():
            res = resources.files("strata.configs").joinpath(f"{config}.yaml")
            return validate(_read_yaml(res.read_text(), f"preset {config}"))
        raise ConfigError(allowed("config", str(config), presets()) + " (a preset name), or a path to a YAML file that exists")
    raise ConfigError(f"config: got {type(config).__name__}; allowed: None, a preset name, a YAML path or a mapping")
