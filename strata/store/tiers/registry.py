"""Third-party tier kinds, found by entry point.

A distribution adds a tier kind by declaring an entry point in the group ``strata.tiers``:
the name is the kind users write in a config (``kind: sqlite``), the value ``module:Class``
names a ``Tier`` subclass. Nothing of a plugin is imported until a config names a kind that is
not built in: ``strata.config_load`` asks this module then, and only then. The class declares the
keys it takes beside the common ones (``COMMON_KEYS``, validated by Strata as for every tier):

- ``config_keys``: ``{key: spec}``, where a spec is a type (``str``, ``int``, ``float``,
  ``bool``: the value must be one), a tuple of strings (the value must be one of them), or a
  callable ``spec(value, where) -> value`` that returns the value to keep or raises
  ``ConfigError`` (or ValueError / TypeError) saying what is allowed (``strata.config.parse_size``
  is one);
- ``config_required``: the keys that must be given (its own or common ones, e.g. ``capacity``);
- ``defaults``: ``{key: value}`` for its own keys a config leaves out (the class applies them);
- ``config_refused``: common keys the kind does not take (a redis tier has the server's
  capacity and eviction: ``("capacity", "policy", "verify")``), refused as unknown keys;
- ``check_config(cls, values, raw, where) -> values``, a classmethod: the rules between keys and
  what follows from them, run once each key has passed its spec. ``values`` holds the checked
  common keys (``kind``, ``name``, ``capacity``, ``policy``, ``write``, ``verify``) and the own
  keys the config gave; ``raw`` is the tier's mapping as written, ``where`` its field
  (``tiers[1]``). It returns the values to keep (a cxl tier's capacity defaults to its size) or
  raises ``ConfigError`` naming the field (``f"{where}.url"``) and what is allowed.

What a config gives of its own keys lands, checked, in ``TierConfig.options`` (read-only). The
built-in kinds declare theirs the same way next to their classes (``strata.store.tiers.cpu``,
``file``, ``ranges``, ``cxl``, ``redis``, ``mooncake``); the five older ones land in
``TierConfig``'s attributes instead (``cfg.path``, ``cfg.url``), with their ``defaults`` applied.
Built-in kinds win over a plugin of the same name (with a warning): a plugin cannot change what
an existing config means. A plugin that cannot be loaded is a ``ConfigError`` naming the entry
point and its error when a config names it, never an error at ``import strata``.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from importlib import metadata
from typing import Mapping

from strata.config import TIER_KINDS
from strata.errors import ConfigError
from strata.store.tiers.base import Tier

GROUP = "strata.tiers"
# Keys every tier takes, validated by strata.config_load; a plugin declares only its own beside them.
COMMON_KEYS = frozenset({"kind", "name", "capacity", "policy", "write", "verify"})


def _describe(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    source = f", from {dist.name} {dist.version}" if dist is not None and getattr(dist, "name", None) else ""
    return f"entry point {GROUP}: {ep.name} = {ep.value}{source}"


@functools.lru_cache(maxsize=None)
def _entry_points() -> dict[str, metadata.EntryPoint]:
    """Installed plugin kinds by name (read once per process; ``refresh()`` reads again). A name
    of a built-in kind, or one a distribution before it took, is skipped with a warning."""
    found: dict[str, metadata.EntryPoint] = {}
    for ep in metadata.entry_points(group=GROUP):
        if ep.name in TIER_KINDS:
            warnings.warn(f"tier plugin ignored: {_describe(ep)}: {ep.name!r} is a built-in tier kind, and built-in "
                          "kinds win (rename the entry point)", RuntimeWarning, stacklevel=2)
        elif ep.name in found:
            warnings.warn(f"tier plugin ignored: {_describe(ep)}: kind {ep.name!r} is taken by "
                          f"{_describe(found[ep.name])}", RuntimeWarning, stacklevel=2)
        else:
            found[ep.name] = ep
    return found


def refresh() -> None:
    """Forget what was found and loaded: the next lookup reads the installed entry points again
    (a plugin installed while the process runs, or a test)."""
    _entry_points.cache_clear()
    _loaded.clear()


def plugin_kinds() -> list[str]:
    """The kinds installed plugins add (without loading any of them)."""
    return sorted(_entry_points())


def is_plugin(kind: object) -> bool:
    return isinstance(kind, str) and kind in _entry_points()


def tier_class(kind: str, where: str = "kind") -> type[Tier]:
    """The class of the installed plugin ``kind``, loaded once. ConfigError (naming ``where``)
    if no plugin adds ``kind``, or if its entry point fails to load or names no usable class."""
    ep = _entry_points().get(kind)
    if ep is None:
        raise ConfigError(f"{where}: no tier plugin of kind {kind!r} is installed; installed: "
                          f"{', '.join(plugin_kinds()) or 'none'} (entry point group {GROUP})")
    cls, error = _load(ep)
    if error:
        raise ConfigError(f"{where}: the tier plugin {kind!r} cannot be used: {_describe(ep)}: {error}")
    return cls


_loaded: dict[tuple[str, str], tuple[type[Tier] | None, str | None]] = {}  # (name, value) -> what _load made


def _load(ep: metadata.EntryPoint) -> tuple[type[Tier] | None, str | None]:
    """(class, None), or (None, what is wrong with it), once per entry point."""
    key = (ep.name, ep.value)
    if key not in _loaded:
        _loaded[key] = _load_now(ep)
    return _loaded[key]


def _load_now(ep: metadata.EntryPoint) -> tuple[type[Tier] | None, str | None]:
    """Import the entry point's object and check it; any error of the plugin's import is caught."""
    try:
        obj = ep.load()
    except BaseException as e:  # a plugin's import may raise anything, SystemExit included
        if isinstance(e, KeyboardInterrupt):
            raise
        return None, f"loading it raised {type(e).__name__}: {e}"
    if not (isinstance(obj, type) and issubclass(obj, Tier)):
        return None, f"it names {obj!r}; allowed: a subclass of strata.store.tiers.base.Tier"
    problem = _check_declarations(obj)
    return (None, problem) if problem else (obj, None)


def _check_declarations(cls: type) -> str | None:
    """What is wrong with a plugin class's ``config_keys`` / ``config_required``, or None."""
    keys = getattr(cls, "config_keys", {})
    if not isinstance(keys, Mapping):
        return f"{cls.__name__}.config_keys is a {type(keys).__name__}; allowed: a dict of key -> spec"
    for key, spec in keys.items():
        if not isinstance(key, str) or key in COMMON_KEYS:
            return (f"{cls.__name__}.config_keys declares {key!r}; allowed: string keys other than the common ones "
                    f"({', '.join(sorted(COMMON_KEYS))}), which Strata validates itself")
        choices_ok = isinstance(spec, tuple) and spec and all(isinstance(c, str) for c in spec)
        if not (choices_ok or callable(spec)):
            return (f"{cls.__name__}.config_keys[{key!r}] is {spec!r}; allowed: a type, a tuple of strings, or a "
                    "callable (value, where) -> value")
    required = getattr(cls, "config_required", ())
    unknown = [k for k in required if k not in keys and k not in COMMON_KEYS]
    if isinstance(required, str) or unknown:
        return (f"{cls.__name__}.config_required names {unknown or required!r}; allowed: a tuple of its "
                "config_keys or common keys")
    refused = getattr(cls, "config_refused", ())
    if isinstance(refused, str) or any(k not in COMMON_KEYS or k in ("kind", "name") for k in refused):
        return (f"{cls.__name__}.config_refused is {refused!r}; allowed: a tuple of common keys other than kind "
                "and name")
    return None


def config_keys(cls: type) -> Mapping[str, object]:
    return getattr(cls, "config_keys", {})


def config_required(cls: type) -> tuple[str, ...]:
    return tuple(getattr(cls, "config_required", ()))


def config_refused(cls: type) -> tuple[str, ...]:
    return tuple(getattr(cls, "config_refused", ()))


def check_config(cls: type, values: dict, raw: Mapping, where: str) -> dict:
    """The class's ``check_config`` hook on a tier's checked values, or the values as they are."""
    hook = getattr(cls, "check_config", None)
    return values if hook is None else hook(values, raw, where)


def build(cls: type[Tier], cfg, store_cfg, create: bool = True) -> Tier:
    """An instance of a plugin class. ``create`` is passed only to a class whose ``__init__``
    takes it (``create=False``: open only what exists, as ``strata stats`` does)."""
    try:
        takes_create = "create" in inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        takes_create = False
    return cls(cfg, store_cfg, create=create) if takes_create else cls(cfg, store_cfg)


__all__ = ["COMMON_KEYS", "GROUP", "build", "check_config", "config_keys", "config_refused", "config_required",
           "is_plugin", "plugin_kinds", "refresh", "tier_class"]
