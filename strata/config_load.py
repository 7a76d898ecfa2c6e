"""From what a user gives (None, a preset name, a YAML path or a mapping) to a checked
``StoreConfig`` (``strata.config``'s types).

Every error names the field (``tiers[1].capacity``) and what is allowed, and an unknown key is
refused with the closest allowed spelling. A tier's own keys are checked by what its class
declares (``strata.store.tiers.registry``).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import yaml

from strata.config import (DECLARED_KINDS, DEFAULT_POLICIES, EVICT_MODES, POLICIES, PROMOTE_MODES, TIER_KINDS,
                           UNBOUNDED, WRITE_MODES, NamespacePolicy, Options, StoreConfig, TierConfig, WritebackConfig,
                           declared_class, parse_size, positive_int)
from strata.errors import ConfigError, allowed
from strata.keys import namespaces
from strata.store.tiers import registry

# Built-in kinds whose own keys TierConfig carries as attributes (cfg.path, cfg.url), with their
# class's defaults, rather than in ``options``; their errors name no class, as they always did.
_ATTRIBUTE_KINDS = frozenset({"cpu", "file", "ranges", "cxl", "redis"})


_TOP_KEYS = {"tiers", "namespaces", "writeback", "promote"}


_NS_KEYS = {"evict", "priority", "quota", "promote"}


_WB_KEYS = {"max_pending", "max_pending_bytes"}


def _check_keys(where: str, got: Mapping, allowed_keys: set[str]) -> None:
    if not isinstance(got, Mapping):
        raise ConfigError(f"{where}: got {type(got).__name__}; allowed: a mapping with keys "
                          f"{', '.join(sorted(allowed_keys))}")
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


def _tier(i: int, raw: Mapping) -> TierConfig:
    where = f"tiers[{i}]"
    if not isinstance(raw, Mapping) or "kind" not in raw:
        raise ConfigError(f"{where}.kind: missing; allowed: {', '.join(TIER_KINDS)}, "
                          "or an installed tier plugin's kind")
    kind = raw["kind"]
    if isinstance(kind, str) and kind in DECLARED_KINDS:
        return _declared_tier(where, raw, declared_class(kind), None if kind in _ATTRIBUTE_KINDS else "tier kind")
    return _plugin_tier(where, raw)


def _plugin_tier(where: str, raw: Mapping) -> TierConfig:
    """A tier of a kind an installed plugin adds (entry point group ``strata.tiers``): the common
    keys checked as for every tier, the plugin's own by the specs its class declares
    (``config_keys``, ``config_required``), into ``TierConfig.options``. The plugin is imported
    here, only for a config that names it."""
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
    cls = declared_class(kind) if kind in DECLARED_KINDS else registry.tier_class(kind)
    return bool(getattr(cls, "remote", False))


def _declared_tier(where: str, raw: Mapping, cls: type, what: str | None) -> TierConfig:
    """A tier of any kind, checked by what its class declares (strata.store.tiers.registry): the
    common keys as for every tier, the class's own by their specs, then its ``check_config``. The
    kinds of ``_ATTRIBUTE_KINDS`` (``what`` None) keep their keys in ``TierConfig``'s attributes,
    with the class's ``defaults``, and their messages name no class; the others' keys land in
    ``TierConfig.options``, and ``what`` (``"tier plugin"``) names the class in messages."""
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
                                  "allowed: quotas on "
                                  f"{', '.join(t for t in tier_names if t not in remote) or 'no tier'}")
            quota[tname] = parse_size(size, f"{where}.quota.{tname}")
    elif quota_raw is not None:
        size = parse_size(quota_raw, f"{where}.quota")
        quota = {t: size for t in tier_names if t not in remote}
    promote = _choice(f"{where}.promote", raw.get("promote", base.promote), PROMOTE_MODES)
    return NamespacePolicy(evict=evict, priority=prio, quota=quota, promote=promote)


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
        max_pending=positive_int(wb_raw.get("max_pending", 1024), "writeback.max_pending"),
        max_pending_bytes=parse_size(wb_raw.get("max_pending_bytes", 1 << 30), "writeback.max_pending_bytes"),
    )
    promote = _bool("promote", raw.get("promote", True))
    return StoreConfig(tiers=tiers, namespaces=pols, writeback=wb, promote=promote)


def presets() -> list[str]:
    """Names of the YAML presets shipped with Strata."""
    return sorted(p.name[:-5] for p in resources.files("strata.configs").iterdir() if p.name.endswith(".yaml"))


def _read_yaml(text: str, origin: str) -> Mapping:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{origin}: not valid YAML: {e}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{origin}: got {type(data).__name__}; allowed: a YAML mapping with keys "
                          f"{', '.join(sorted(_TOP_KEYS))}")
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
        raise ConfigError(allowed("config", str(config), presets())
                          + " (a preset name), or a path to a YAML file that exists")
    raise ConfigError(f"config: got {type(config).__name__}; allowed: None, a preset name, a YAML path or a mapping")

