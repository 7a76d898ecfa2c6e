"""Namespace-partitioned keys shared by every client of the store.

A key is ``(namespace, scope, name)``. ``namespace`` partitions clients (``kv`` for
KV-cache chunks, ``param`` for offloaded weights, plus user-registered ones);
``scope`` fingerprints what makes the bytes valid (model, dtype, layout, rank);
``name`` says which object inside the scope. The byte encoding is length-prefixed,
so no two distinct keys share an encoding whatever characters their parts hold.
"""

from __future__ import annotations

import hashlib
import numbers
import struct
import threading

from strata.errors import StoreError, allowed

_MAGIC = b"SK1"
_NAMESPACES: set[str] = {"kv", "param"}
_lock = threading.Lock()


def register_namespace(name: str) -> str:
    """Add a user namespace (letters, digits, '_', '-', '.'); registering twice is fine."""
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "_-." for c in name):
        raise StoreError(
            f"namespace: got {name!r}; allowed: a non-empty string of letters, digits, '_', '-', '.'"
        )
    with _lock:
        _NAMESPACES.add(name)
    return name


def namespaces() -> frozenset[str]:
    """The namespaces keys may use now."""
    return frozenset(_NAMESPACES)


def check_namespace(name: object, field: str = "namespace") -> str:
    if name not in _NAMESPACES:
        raise StoreError(allowed(field, name, _NAMESPACES) + "; register others with strata.register_namespace()")
    return name  # type: ignore[return-value]


class Key:
    """An immutable, hashable store key. ``encoded`` is its unambiguous byte form."""

    __slots__ = ("namespace", "scope", "name", "encoded", "_hash")

    def __init__(self, namespace: str, scope: str, name: str):
        check_namespace(namespace)
        for field, value in (("scope", scope), ("name", name)):
            if not isinstance(value, str):
                raise StoreError(f"Key.{field}: got {type(value).__name__}; allowed: str")
        parts = [p.encode("utf-8", "surrogatepass") for p in (namespace, scope, name)]
        enc = _MAGIC + b"".join(struct.pack(">I", len(p)) + p for p in parts)
        object.__setattr__(self, "namespace", namespace)
        object.__setattr__(self, "scope", scope)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "encoded", enc)
        object.__setattr__(self, "_hash", hash(enc))

    def __setattr__(self, *_):
        raise AttributeError("Key is immutable")

    def __reduce__(self):  # vLLM pickles connector metadata (holding keys) to its worker processes
        return (Key, (self.namespace, self.scope, self.name))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Key) and other.encoded == self.encoded

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"Key({self.namespace!r}, {self.scope!r}, {self.name!r})"

    @classmethod
    def decode(cls, encoded: bytes) -> "Key":
        """Inverse of ``encoded``; raises StoreError on bytes that are no key, or on a key of a
        namespace this process has not registered (storage code uses ``split_key`` instead)."""
        return cls(*split_key(encoded))


def split_key(encoded: bytes) -> tuple[str, str, str]:
    """``(namespace, scope, name)`` of an encoded key, checked for structure only: no namespace
    registry is consulted, so a tier recovering its objects can index those of namespaces this
    process never registered (another process's) instead of discarding them. StoreError on
    bytes that are no key."""
    if not encoded.startswith(_MAGIC):
        raise StoreError("Key.decode: bytes do not start with the key magic")
    parts, pos = [], len(_MAGIC)
    for _ in range(3):
        if pos + 4 > len(encoded):
            raise StoreError("Key.decode: truncated key")
        (n,) = struct.unpack_from(">I", encoded, pos)
        pos += 4
        if pos + n > len(encoded):
            raise StoreError("Key.decode: truncated key")
        try:
            parts.append(encoded[pos : pos + n].decode("utf-8", "surrogatepass"))
        except UnicodeDecodeError:
            raise StoreError("Key.decode: a key part is not UTF-8") from None
        pos += n
    if pos != len(encoded):
        raise StoreError("Key.decode: trailing bytes after key")
    return parts[0], parts[1], parts[2]


def key_namespace(encoded: bytes) -> str | None:
    """The namespace an encoded key names (registered or not), or None for bytes that are no key."""
    try:
        return split_key(encoded)[0]
    except StoreError:
        return None


def make_scope(**parts: object) -> str:
    """Fingerprint the facts that make bytes valid (model id, dtype, layout, rank ...).

    Deterministic across processes and Python versions: a SHA-256 over the sorted
    ``name=value`` pairs, each value written as its ``repr`` (dicts in key order, sets in
    element order, so neither insertion order nor the hash seed counts), never ``hash()``.
    A value whose ``repr`` would not say the same thing in every process (an object's address)
    or would not say all of it (a tensor's elided elements) is refused. Returns 32 hex characters.
    """
    h = hashlib.sha256()
    for k in sorted(parts):
        item = f"{k}={_canonical(parts[k], f'make_scope({k}=...)')}".encode()
        h.update(struct.pack(">I", len(item)) + item)
    return h.hexdigest()[:32]


_SCOPE_VALUES = ("str, int, float, bool, None, bytes, torch.dtype, torch.device, and tuples, lists, dicts and sets "
                 "of them")


def _canonical(value: object, where: str) -> str:
    """``repr(value)`` where that is the same in every process, dicts and sets sorted; StoreError
    for anything else."""
    if value is None or isinstance(value, (numbers.Number, str, bytes)) or _torch_fact(value):
        return repr(value)
    if isinstance(value, (tuple, list)):
        inner = [_canonical(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, list):
            return "[" + ", ".join(inner) + "]"
        return "(" + ", ".join(inner) + ("," if len(inner) == 1 else "") + ")"
    if isinstance(value, dict):
        items = sorted((_canonical(k, f"{where} key"), _canonical(v, f"{where}[{k!r}]")) for k, v in value.items())
        return "{" + ", ".join(f"{k}: {v}" for k, v in items) + "}"
    if isinstance(value, (set, frozenset)):
        inner = sorted(_canonical(v, f"{where} element") for v in value)
        return "{" + ", ".join(inner) + "}" if inner else "set()"
    raise StoreError(f"{where}: got {type(value).__name__}; allowed: {_SCOPE_VALUES} (a value whose repr is the "
                     "same in every process and says all of it)")


def _torch_fact(value: object) -> bool:
    """A torch.dtype or torch.device (told apart without importing torch here)."""
    t = type(value)
    return t.__module__ == "torch" and t.__name__ in ("dtype", "device")
