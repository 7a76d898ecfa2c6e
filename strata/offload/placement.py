"""Which blocks stay on the device under a budget, and how big the streaming ring is."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from strata.config import format_size
from strata.errors import OffloadError


@dataclass(frozen=True)
class Plan:
    resident: frozenset[int]  # block indices kept on the device
    offloaded: tuple[int, ...]  # block indices streamed, in execution order
    ring_slots: int
    slot_bytes: int
    other_bytes: int  # non-block parameters and buffers (always resident)

    @property
    def ring_bytes(self) -> int:
        return self.ring_slots * self.slot_bytes


def spread(n: int, k: int) -> list[int]:
    """``k`` of ``range(n)`` spaced evenly, so streamed blocks sit between resident ones."""
    if k <= 0:
        return []
    return sorted({min(n - 1, int((j + 0.5) * n / k)) for j in range(k)})


def ring_slots(streamed: int, prefetch: int, static: bool) -> int:
    """Ring buffers for ``streamed`` blocks: prefetch+1 (at most one per block), or what the static
    ring's fixed slot assignment needs (``strata.offload.static``)."""
    if static:
        from strata.offload.static import static_slots

        return static_slots(streamed, prefetch)
    return min(prefetch + 1, streamed)


def plan(block_bytes: list[int], other_bytes: int, budget: int | None, prefetch: int, static: bool = False) -> Plan:
    n = len(block_bytes)
    if budget is None:
        offloaded = tuple(range(n))
        return Plan(frozenset(), offloaded, ring_slots(n, prefetch, static), max(block_bytes), other_bytes)
    biggest = max(block_bytes)
    slots = min(prefetch + 1, n)
    minimum = other_bytes + slots * biggest
    if budget < minimum:
        raise OffloadError(
            f"gpu_budget: got {format_size(budget)}; allowed: at least {format_size(minimum)} here = the non-block "
            f"modules ({format_size(other_bytes)}) + a ring of prefetch+1={slots} buffers of the largest block "
            f"({format_size(biggest)}); raise the budget or lower prefetch"
        )
    if other_bytes + sum(block_bytes) <= budget:
        warnings.warn(
            f"strata.offload: the whole model ({format_size(other_bytes + sum(block_bytes))}) fits gpu_budget="
            f"{format_size(budget)}; nothing is offloaded", stacklevel=3)
        return Plan(frozenset(range(n)), (), 0, 0, other_bytes)
    for k in range(n - 1, -1, -1):
        keep = spread(n, k)
        ring = (ring_slots(n - len(keep), prefetch, True) if static else slots) * biggest
        if other_bytes + ring + sum(block_bytes[i] for i in keep) <= budget:
            break
    else:  # only the static ring's extra slots can get here: it needs more than prefetch+1 buffers
        raise OffloadError(
            f"gpu_budget: got {format_size(budget)}; allowed: at least {format_size(other_bytes + ring)} with "
            f"static=True ({ring_slots(n, prefetch, static)} fixed buffers of the largest block for {n} streamed "
            "blocks); raise the budget or lower prefetch")
    offloaded = tuple(i for i in range(n) if i not in keep)
    slot_bytes = max(block_bytes[i] for i in offloaded)
    return Plan(frozenset(keep), offloaded, ring_slots(len(offloaded), prefetch, static), slot_bytes, other_bytes)
