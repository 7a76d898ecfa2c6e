"""Read-only tensors over stored bytes: what ``StorageEngine.lease`` hands out.

A lease is a zero-copy view of bytes every later reader shares, so a caller that changed
it in place would change the stored object for everyone. ``ReadOnlyView`` is a tensor
subclass whose ``__torch_function__`` refuses every operation that would write into it:
in-place methods (``zero_``, ``add_``, ``copy_`` into it ...), item assignment, in-place
operators, and ``out=`` naming it. Views of it (slices, ``view``, ``reshape``, ``split``)
stay read-only; anything computed from it (``v * 2``, ``v.clone()``, a copy into another
tensor) is an ordinary tensor of the caller's. ``numpy()`` gives a read-only array.

A view is valid while its lease lasts (the ``with`` block of ``lease``): after that the bytes may
be evicted and reused by another object, so any operation on the view, or on a view of it, raises
instead of reading them (``.clone()`` inside the block to keep a copy).

What it cannot see: writes through raw pointers (``data_ptr()`` handed to ctypes or a CUDA
kernel, ``untyped_storage()``); those are the caller's to avoid.
"""

from __future__ import annotations

import torch

from strata.errors import StoreError

_IN_PLACE_OPERATORS = frozenset({
    "__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__",
    "__ipow__", "__imatmul__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__",
})
_TO_NUMPY = frozenset({"numpy", "__array__"})


def _name(func) -> str:
    return getattr(func, "__name__", "") or ""


def _writes_into(func, args: tuple, kwargs: dict) -> bool:
    """True when ``func(*args, **kwargs)`` would write into a ReadOnlyView."""
    out = kwargs.get("out")
    if out is not None:
        outs = out if isinstance(out, (tuple, list)) else (out,)
        if any(isinstance(o, ReadOnlyView) for o in outs):
            return True
    if not args or not isinstance(args[0], ReadOnlyView):
        return False
    name = _name(func)
    return name in _IN_PLACE_OPERATORS or (name.endswith("_") and not name.endswith("__"))


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class Lease:
    """What the views of one lease share: whether it has ended."""

    __slots__ = ("ended",)

    def __init__(self):
        self.ended = False


def _lease_of(args: tuple) -> "Lease | None":
    for a in args:
        if isinstance(a, ReadOnlyView):
            return getattr(a, "_strata_lease", None)
    return None


class ReadOnlyView(torch.Tensor):
    """A tensor over stored bytes that refuses to be written (see the module docstring)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        lease = _lease_of(args)
        if lease is not None and lease.ended:
            if _name(func) == "__repr__":  # a traceback or a debugger showing it must not raise
                with torch._C.DisableTorchFunctionSubclass():
                    return f"ReadOnlyView(shape={list(args[0].shape)}, dtype={args[0].dtype}, lease ended)"
            raise StoreError(f"{_name(func) or func}: a leased view used after its lease ended (the with block of "
                             "store.lease / lease_many): its bytes may hold another object by now; allowed: use it "
                             "inside the block, or .clone() it there to keep a copy")
        if _writes_into(func, args, kwargs):
            raise StoreError(f"{_name(func) or func}: a leased view is read-only (its bytes are the stored object "
                             "every reader shares); allowed: read it, or .clone() it and change the copy")
        with torch._C.DisableTorchFunctionSubclass():
            ret = func(*args, **kwargs)
            if _name(func) in _TO_NUMPY:
                ret.flags.writeable = False
                return ret
            leased = {_storage(a) for a in args if isinstance(a, ReadOnlyView)}
            return _mark_aliases(ret, leased, lease) if leased else ret


def _mark_aliases(ret, leased: set[int], lease: "Lease | None"):
    """Results that share the leased bytes (views) stay read-only, and end with the lease; new
    tensors are the caller's. Runs with subclass dispatch disabled (inside ``__torch_function__``)."""
    if isinstance(ret, torch.Tensor) and not isinstance(ret, ReadOnlyView):
        if ret.device.type != "meta" and _storage(ret) in leased:
            return read_only(ret, lease)
        return ret
    if isinstance(ret, (tuple, list)) and any(isinstance(r, torch.Tensor) for r in ret):
        return type(ret)([_mark_aliases(r, leased, lease) for r in ret])
    return ret


def read_only(t: torch.Tensor, lease: "Lease | None" = None) -> torch.Tensor:
    """``t`` as a ReadOnlyView (no copy), valid until ``lease`` ends (None: for good)."""
    view = t if isinstance(t, ReadOnlyView) else t.as_subclass(ReadOnlyView)
    if lease is not None:
        view._strata_lease = lease
    return view
