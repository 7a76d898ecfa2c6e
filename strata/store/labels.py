"""Scope labels: the facts a scope fingerprints (model, dtype, layout ...), kept beside the store.

A scope is a one-way hash of its facts (``strata.keys.make_scope``), so ``strata inspect`` can
show only the hash unless the writer also records what went into it. A label is no object: it
is never counted in a tier's objects or bytes, never charged to capacity or a quota, never
evicted, and never listed by ``keys()`` or ``orphans()``. It lives where the store persists:

- a file tier: ``<path>/labels/``, one JSON file per (namespace, scope), written under a temporary
  name and renamed, so processes sharing the directory never lose each other's labels;
- a cxl tier whose region is a file: ``<region>.labels/`` beside it, likewise; a region on a DAX
  device has no place beside it, so its labels live in memory only;
- a redis tier: one hash, ``<key_prefix>__scope_labels__``, a field per ``<namespace>:<scope>``
  (the redis tier's listing leaves that key out);
- always: this process's memory (a cpu-only store keeps them there alone).

A record is plain JSON, ``{"namespace", "scope", "facts": {str: str}, "at": unix time}``, never
pickle. Writes are validated (errors name the field); reads skip whatever fails the same checks.
Each place holds at most ``MAX_LABELS``: past it, labels of owners that have exited go first
(``strata.store.owners``), then the oldest. Reading creates nothing: a store opened to look
(``create=False``) finds no labels where none were written. A place that cannot be written
degrades to ``False`` from ``put`` and an ``errors`` count, never an exception.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import stat
import threading
import time
import uuid
from pathlib import Path

from strata.errors import StoreError
from strata.keys import check_namespace
from strata.store.tiers.backing import LABELS_KEY

log = logging.getLogger("strata.labels")

MAX_LABELS = 1024  # per place: past it the labels of exited owners, then the oldest, are dropped
MAX_FACTS = 16
MAX_NAME = 32  # characters of a fact's name
MAX_VALUE = 200  # characters of a fact's value
MAX_SCOPE = 512  # characters of a scope
MAX_RECORD = 4096  # bytes of one stored record
_NAME_CHARS = "letters, digits, '_', '-', '.'"
_VALUE_RULE = f"a str of at most {MAX_VALUE} characters, no control characters"


def clip(text: object, limit: int = MAX_VALUE, tail: bool = False) -> str:
    """``text`` as a label value: cut to ``limit`` characters (keeping the end with ``tail``, as a
    model path's last part names it), control characters replaced by spaces."""
    text = "".join(" " if _control(c) else c for c in str(text))
    if len(text) <= limit:
        return text
    return "..." + text[-(limit - 3):] if tail else text[: limit - 3] + "..."


def _control(c: str) -> bool:
    return c < " " or "\x7f" <= c <= "\x9f"


def check_facts(facts: object, field: str = "facts") -> dict[str, str]:
    """``facts`` as a label: a non-empty dict of at most ``MAX_FACTS`` names to short strings; a
    StoreError naming the field otherwise."""
    if not isinstance(facts, dict):
        raise StoreError(f"{field}: got {type(facts).__name__}; allowed: a dict of str to str, like "
                         "{'model': 'llama-3-8b', 'dtype': 'bfloat16'}")
    if not 1 <= len(facts) <= MAX_FACTS:
        raise StoreError(f"{field}: got {len(facts)} facts; allowed: 1 to {MAX_FACTS}")
    for name, value in facts.items():
        if (not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME
                or not all(c.isascii() and (c.isalnum() or c in "_-.") for c in name)):
            raise StoreError(f"{field} key {name!r}: allowed: 1 to {MAX_NAME} {_NAME_CHARS}")
        if not isinstance(value, str):
            raise StoreError(f"{field}[{name!r}]: got {type(value).__name__}; allowed: {_VALUE_RULE} "
                             "(convert with str(), shorten with strata.store.labels.clip())")
        if len(value) > MAX_VALUE or any(_control(c) for c in value):
            raise StoreError(f"{field}[{name!r}]: got {clip(value, 40)!r} ({len(value)} characters); "
                             f"allowed: {_VALUE_RULE} (strata.store.labels.clip() makes one)")
    if len(_encode({"namespace": "", "scope": "", "facts": facts, "at": 0.0})) > MAX_RECORD - MAX_SCOPE - 64:
        raise StoreError(f"{field}: allowed: at most {MAX_RECORD - MAX_SCOPE - 64} bytes of JSON in all")
    return dict(facts)


def check_scope(scope: object) -> str:
    if not isinstance(scope, str) or not 1 <= len(scope) <= MAX_SCOPE or any(_control(c) for c in scope):
        shown = type(scope).__name__ if not isinstance(scope, str) else repr(clip(scope, 40))
        raise StoreError(f"scope: got {shown}; allowed: a non-empty str of at most {MAX_SCOPE} characters, "
                         "no control characters (a Key's scope)")
    return scope


def _encode(record: dict) -> bytes:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")


def _decode(raw: bytes) -> dict | None:
    """A record read back, or None where it is too long, no JSON or fails the write checks."""
    if len(raw) > MAX_RECORD:
        return None
    try:
        rec = json.loads(raw.decode("utf-8"))
        ns, scope, at = rec["namespace"], rec["scope"], float(rec["at"])
        if not isinstance(ns, str) or not ns or not all(c.isalnum() or c in "_-." for c in ns):
            return None  # another process's namespace is fine, so no registry check
        return {"namespace": ns, "scope": check_scope(scope), "facts": check_facts(rec["facts"]), "at": at}
    except (ValueError, TypeError, KeyError, StoreError):
        return None


def _dead(rec: dict) -> bool:
    from strata.store.owners import is_alive, owner_of

    owner = owner_of(rec["scope"])
    return owner is not None and is_alive(owner) is False


def _to_drop(records: list[dict], limit: int) -> list[dict]:
    """The records to drop so that ``limit`` remain: exited owners' first, then the oldest."""
    excess = len(records) - limit
    if excess <= 0:
        return []
    return sorted(records, key=lambda r: (not _dead(r), r["at"]))[:excess]


class _Directory:
    """Labels as one JSON file per (namespace, scope) in a directory made at the first write."""

    def __init__(self, path: Path):
        self.path = path

    def __str__(self) -> str:
        return str(self.path)

    @staticmethod
    def _name(ns: str, scope: str) -> str:
        return hashlib.sha256(f"{ns}\0{scope}".encode("utf-8", "surrogatepass")).hexdigest()[:32] + ".json"

    def write(self, rec: dict) -> None:
        self.path.mkdir(exist_ok=True)
        tmp = self.path / f"{os.getpid()}-{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "xb") as f:
                f.write(_encode(rec))
            os.replace(tmp, self.path / self._name(rec["namespace"], rec["scope"]))
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise
        self._bound()

    def _bound(self) -> None:
        names = self._json_names()
        if len(names) <= MAX_LABELS:
            return
        records = [r for r in (self._read(n) for n in names) if r is not None]
        for rec in _to_drop(records, MAX_LABELS):
            with contextlib.suppress(OSError):
                (self.path / self._name(rec["namespace"], rec["scope"])).unlink(missing_ok=True)

    def _json_names(self) -> list[str]:
        try:
            return [n for n in os.listdir(self.path) if n.endswith(".json")]
        except FileNotFoundError:
            return []

    def _read(self, name: str) -> dict | None:
        try:
            with open(self.path / name, "rb") as f:
                raw = f.read(MAX_RECORD + 1)
        except OSError:
            return None
        return _decode(raw)

    def read_all(self) -> list[dict]:
        return [r for r in (self._read(n) for n in self._json_names()) if r is not None]


class _RedisHash:
    """Labels as the fields of one hash under the redis tier's prefix, through its bounded calls."""

    def __init__(self, tier):
        self.tier, self.key = tier, tier.prefix + LABELS_KEY

    def __str__(self) -> str:
        return f"{self.tier.url} {self.key!r}"

    @staticmethod
    def _field(ns: str, scope: str) -> bytes:
        return f"{ns}:{scope}".encode("utf-8", "surrogatepass")  # a namespace holds no ':'

    def write(self, rec: dict) -> None:
        client = self.tier.client
        self.tier._call(lambda: client.hset(self.key, self._field(rec["namespace"], rec["scope"]), _encode(rec)),
                        "HSET")
        if self.tier._call(lambda: client.hlen(self.key), "HLEN") > MAX_LABELS:
            drop = _to_drop(self.read_all(), MAX_LABELS)
            if drop:
                fields = [self._field(r["namespace"], r["scope"]) for r in drop]
                self.tier._call(lambda: client.hdel(self.key, *fields), "HDEL")

    def read_all(self) -> list[dict]:
        values = self.tier._call(lambda: self.tier.client.hgetall(self.key), "HGETALL")
        return [r for r in (_decode(v) for v in values.values() if isinstance(v, bytes)) if r is not None]


def _place(tier):
    """Where ``tier`` keeps labels beside its objects, or None (memory only)."""
    if tier.kind == "file":
        return _Directory(Path(tier.root) / "labels")
    if tier.kind == "cxl":
        try:
            regular = stat.S_ISREG(os.stat(tier.path).st_mode)
        except OSError:
            return None
        return _Directory(Path(f"{tier.path}.labels")) if regular else None
    if tier.kind == "redis":
        return _RedisHash(tier)
    return None


class ScopeLabels:
    """The labels of one store: this process's, and those its persistent tiers keep."""

    def __init__(self, tiers):
        self._places = [p for p in (_place(t) for t in tiers) if p is not None]
        self._memory: dict[tuple[str, str], dict] = {}
        self._written: dict[tuple[str, str], dict] = {}  # what every place took, so not written again
        self._lock = threading.Lock()
        self._last_at = 0.0
        self.errors = 0  # writes or reads a place failed

    def put(self, namespace: str, scope: str, facts: dict) -> bool:
        """Record ``facts`` for ``(namespace, scope)``, replacing an older label. True when every
        place took it (or it was already written); False, logged and counted, when one did not."""
        check_namespace(namespace)
        check_scope(scope)
        facts = check_facts(facts)
        at_key = (namespace, scope)
        with self._lock:
            if self._written.get(at_key) == facts:
                return True
            self._last_at = max(time.time(), self._last_at + 1e-6)  # strictly newer than this process's last
            rec = {"namespace": namespace, "scope": scope, "facts": facts, "at": self._last_at}
            self._memory[at_key] = rec
            for old in _to_drop(list(self._memory.values()), MAX_LABELS):
                self._memory.pop((old["namespace"], old["scope"]), None)
        ok = True
        for place in self._places:
            try:
                place.write(rec)
            except OSError as e:
                ok = False
                self.errors += 1
                log.warning("strata: the label of scope %s could not be kept at %s (%s); it lives in this "
                            "process only", scope, place, e)
        if ok:
            with self._lock:
                self._written[at_key] = facts
        return ok

    def all(self) -> dict[tuple[str, str], dict[str, str]]:
        """Every label, the newest record of each (namespace, scope) winning; unreadable ones left out."""
        with self._lock:
            best = dict(self._memory)
        for place in self._places:
            try:
                records = place.read_all()
            except OSError:
                self.errors += 1
                continue
            for rec in records:
                at_key = (rec["namespace"], rec["scope"])
                if at_key not in best or best[at_key]["at"] < rec["at"]:
                    best[at_key] = rec
        return {k: dict(r["facts"]) for k, r in best.items()}
