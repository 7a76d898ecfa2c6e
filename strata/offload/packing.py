"""One block's tensors packed into one contiguous byte buffer at aligned offsets.

Streaming a block is then one copy, and its parameters and buffers become views into
the ring slot it landed in. Between forwards they point at a one-element placeholder
expanded to their shape (NaN for floats), so shapes, dtypes and devices stay true and
any use outside the forward is loudly wrong instead of silently stale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ALIGN = 256


@dataclass(frozen=True)
class Slot:
    """Where one tensor lives inside a packed block."""

    module: torch.nn.Module
    name: str
    full_name: str  # dotted name in the model
    is_param: bool
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


class BlockLayout:
    """The packing of one block: every parameter and buffer it owns, shared ones once."""

    def __init__(self, block: torch.nn.Module, prefix: str, skip: set[int]):
        self.slots: list[Slot] = []
        self.tensors: list[torch.Tensor] = []  # the original tensors, in slot order
        seen: dict[int, int] = {}  # id(tensor) -> slot index
        self.aliases: list[tuple[torch.nn.Module, str, int]] = []  # buffers tied inside the block
        off = 0
        for mod_name, mod in block.named_modules():
            for is_param, table in ((True, mod._parameters), (False, mod._buffers)):
                for name, t in table.items():
                    if t is None or id(t) in skip:
                        continue
                    if id(t) in seen:
                        if not is_param:  # a tied Parameter is one object: binding it once binds all
                            self.aliases.append((mod, name, seen[id(t)]))
                        continue
                    nbytes = t.numel() * t.element_size()
                    seen[id(t)] = len(self.slots)
                    full = ".".join(p for p in (prefix, mod_name, name) if p)
                    self.slots.append(Slot(mod, name, full, is_param, t.dtype, tuple(t.shape), off, nbytes))
                    self.tensors.append(t)
                    off += (nbytes + ALIGN - 1) // ALIGN * ALIGN
        self.devices = [t.device for t in self.tensors]  # where each tensor lived before offload
        self.nbytes = off
        self.signature = tuple((s.dtype, s.shape, s.offset) for s in self.slots)

    def pack(self, out: torch.Tensor) -> torch.Tensor:
        """Copy the block's current tensors into flat uint8 ``out`` (any device)."""
        for s, t in zip(self.slots, self.tensors):
            if s.nbytes:
                out[s.offset : s.offset + s.nbytes].copy_(t.detach().reshape(-1).view(torch.uint8))
        return out

    def forget_buffers(self) -> None:
        """Drop the references to original buffers once packed, so their memory can go
        (parameters stay: they are the same objects before, during and after offload)."""
        self.tensors = [t if s.is_param else None for s, t in zip(self.slots, self.tensors)]

    def views(self, buf: torch.Tensor) -> list[torch.Tensor]:
        """Typed views of every slot inside flat uint8 ``buf``."""
        out = []
        for s in self.slots:
            raw = buf[s.offset : s.offset + s.nbytes]
            out.append(raw.view(s.dtype).view(s.shape) if s.nbytes else torch.empty(s.shape, dtype=s.dtype, device=buf.device))
        return out

    def placeholders(self, device: torch.device) -> list[torch.Tensor]:
        return [placeholder(s.shape, s.dtype, device) for s in self.slots]

    def bind(self, tensors: list[torch.Tensor]) -> None:
        """Point every parameter and buffer of the block at ``tensors`` (slot order)."""
        for s, t in zip(self.slots, tensors):
            set_tensor(s.module, s.name, s.is_param, t)
        for mod, name, index in self.aliases:
            mod._buffers[name] = tensors[index]


def placeholder(shape: "tuple[int, ...] | torch.Size", dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One element expanded to ``shape`` (NaN for floating and complex dtypes, else 0): shape, dtype
    and device true, no memory held, and loudly wrong wherever it is used as a weight."""
    fill = float("nan") if dtype.is_floating_point or dtype.is_complex else 0
    return torch.full((), fill, dtype=dtype, device=device).expand(shape)


def set_tensor(module: torch.nn.Module, name: str, is_param: bool, value: torch.Tensor) -> None:
    if is_param:
        module._parameters[name].data = value
    else:
        module._buffers[name] = value


def named_tensors(module: torch.nn.Module):
    """(owner module, attribute, is_param, dotted name, tensor) for every parameter and buffer
    reference, tied ones once per reference."""
    for prefix, mod in module.named_modules(remove_duplicate=False):
        for is_param, table in ((True, mod._parameters), (False, mod._buffers)):
            for name, t in table.items():
                if t is not None:
                    yield mod, name, is_param, f"{prefix}.{name}" if prefix else name, t


def tensor_names(module: torch.nn.Module) -> dict[int, list[str]]:
    """Every dotted name of each tensor (by ``id``): a tied tensor has several."""
    names: dict[int, list[str]] = {}
    for *_, full, t in named_tensors(module):
        names.setdefault(id(t), []).append(full)
    return names


def replace_tensors(module: torch.nn.Module, make, requires_grad: bool | None = None) -> int:
    """Put ``make(t)`` in place of every parameter and buffer ``t`` it returns a tensor for (None:
    keep ``t``), once per tensor so ties stay ties; a parameter's replacement becomes a Parameter with
    ``requires_grad`` (None: as ``t`` had it). How many tensors were replaced."""
    new: dict[int, torch.Tensor | None] = {}
    for mod, name, is_param, _, t in list(named_tensors(module)):
        if id(t) not in new:
            value = make(t)
            grad = t.requires_grad if requires_grad is None else requires_grad
            new[id(t)] = torch.nn.Parameter(value, requires_grad=grad) if is_param and value is not None else value
        if new[id(t)] is None:
            continue
        if is_param:
            mod._parameters[name] = new[id(t)]
        else:
            mod._buffers[name] = new[id(t)]
    return sum(v is not None for v in new.values())


def without_inference_tensors(module: torch.nn.Module) -> int:
    """Replace each tensor made under ``torch.inference_mode`` by a normal copy (ties kept); how many.

    Offloading points parameters at other bytes (``.data =``), which leaves an inference tensor
    unusable ("Inference tensors do not track version counter" at the next forward) and cannot
    be undone at detach; a model built or loaded under ``inference_mode`` has only such tensors."""
    with torch.inference_mode(False):
        return replace_tensors(module, lambda t: t.clone() if t.is_inference() else None)
