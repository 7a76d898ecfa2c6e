"""The offload ring and the store's asynchronous copies under the simulated device.

``strata.testing.sim.SimStreams`` runs side-stream copies as late, as early, or as randomly as
the recorded waits allow, and checks the happens-before rules. Every configuration must give
the greedy tokens of the model without Strata and no violation, under every schedule; each
seeded fault (a dropped wait, a slot refilled before its previous user is done, a lease let go
at issue) must be caught.
"""

import pytest
import torch

import strata
from strata import streams
from strata.offload import find_blocks
from strata.offload.scheduler import PrefetchScheduler
from strata.store.tiers.memory import MemoryTier
from strata.testing.sim import SimStreams, attach_checker

from tiny_models import greedy, make

IDS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
SCHEDULES = [("late", 0), ("early", 0), ("random", 1), ("random", 2)]
CPU = {"tiers": [{"kind": "cpu", "capacity": "64MiB"}]}


def offloaded_run(sim, arch="llama", layers=5, prefetch=1, budget=None, store_cfg=CPU, steps=6, model=None):
    """(tokens without Strata, tokens with Strata under ``sim``, the offload handle)."""
    model = model or make(arch, layers=layers)
    want = greedy(model, IDS, steps)
    with streams.use(sim):
        store = strata.open_store(store_cfg)
        handle = strata.offload(model, store=store, device="cpu", prefetch=prefetch, gpu_budget=budget,
                                progress=False)
        attach_checker(model, find_blocks(model, None)[1], sim)
        got = greedy(model, IDS, steps)
        handle.detach()
        store.close()
    return want, got, handle


def block_bytes(layers=5, arch="llama") -> int:
    model = make(arch, layers=layers)
    return sum(p.numel() * p.element_size() for p in find_blocks(model, None)[1][0].parameters())


@pytest.mark.parametrize("mode,seed", SCHEDULES, ids=[f"{m}{s}" for m, s in SCHEDULES])
@pytest.mark.parametrize("layers,prefetch", [(5, 1), (5, 2), (5, 3), (6, 3), (7, 2), (2, 3)],
                         ids=["5x1", "5x2", "5x3", "6x3", "7x2-not-divisible", "2x3-ring-larger-than-set"])
def test_every_schedule_gives_the_tokens_and_breaks_no_rule(mode, seed, layers, prefetch):
    sim = SimStreams(mode, seed)
    want, got, handle = offloaded_run(sim, layers=layers, prefetch=prefetch)
    assert got == want
    assert sim.violations == []
    assert sim.copies_run >= handle.scheduler.copies - handle.scheduler.slots  # the copies went through the sim
    if mode == "late":
        assert sim.copies_deferred == handle.scheduler.copies  # every copy ran after its issue returned


@pytest.mark.parametrize("mode,seed", SCHEDULES, ids=[f"{m}{s}" for m, s in SCHEDULES])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "mixtral"])
def test_resident_blocks_between_streamed_ones(mode, seed, arch):
    one = block_bytes(arch=arch)
    sim = SimStreams(mode, seed)
    want, got, handle = offloaded_run(sim, arch=arch, layers=6, prefetch=1, budget=one * 5)
    assert handle.plan.resident and handle.plan.offloaded
    assert got == want and sim.violations == []


@pytest.mark.parametrize("mode,seed", SCHEDULES, ids=[f"{m}{s}" for m, s in SCHEDULES])
def test_a_store_that_evicts_and_promotes_under_the_copies(tmp_path, mode, seed):
    """A CPU tier for two of five blocks over a file tier: blocks are promoted and evicted while
    copies from the CPU tier are still in flight; leases must hold their bytes."""
    cfg = {"tiers": [{"kind": "cpu", "capacity": 2 * block_bytes() + 4096, "policy": "s3fifo"},
                     {"kind": "file", "path": str(tmp_path), "capacity": "64MiB"}],
           "namespaces": {"param": {"evict": "lower"}}}
    sim = SimStreams(mode, seed)
    want, got, _ = offloaded_run(sim, prefetch=2, store_cfg=cfg, steps=8)
    assert got == want and sim.violations == []


@pytest.mark.parametrize("mode,seed", SCHEDULES, ids=[f"{m}{s}" for m, s in SCHEDULES])
@pytest.mark.parametrize("kind", ["cpu-verify", "cxl"])
def test_a_verifying_tier_checks_the_bytes_a_device_copy_read(tmp_path, monkeypatch, mode, seed, kind):
    """A tier that checks checksums on every read (``verify: true``; a cxl region by default) and
    whose bytes are page-locked (the cxl mapping registered with the device): the copy to the
    device is asynchronous, and its bytes are checked once it has read them (the stream synchronised
    first), before the lease goes."""
    tier = ({"kind": "cpu", "capacity": "64MiB", "verify": True} if kind == "cpu-verify"
            else {"kind": "cxl", "path": str(tmp_path / "region"), "size": "64MiB"})
    checked = []
    check_view = MemoryTier.check_view
    monkeypatch.setattr(MemoryTier, "check_view", lambda self, e: (checked.append(self.name), check_view(self, e)))
    sim = SimStreams(mode, seed)
    want, got, handle = offloaded_run(sim, prefetch=2, store_cfg={"tiers": [tier]})
    assert got == want and sim.violations == []
    assert len(checked) >= len(handle.plan.offloaded) * 6  # every streamed block, every step, was checked


@pytest.mark.parametrize("mode", ["late", "early", "random"])
def test_a_forward_that_raises_midway_leaves_the_ring_sound(mode):
    model = make("llama", layers=5)
    want = greedy(model, IDS, 6)
    blocks = find_blocks(model, None)[1]
    sim = SimStreams(mode, 3)
    with streams.use(sim):
        store = strata.open_store(CPU)
        handle = strata.offload(model, store=store, device="cpu", prefetch=2, progress=False)
        attach_checker(model, blocks, sim)
        real = blocks[3].mlp.forward
        blocks[3].mlp.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
        with pytest.raises(RuntimeError, match="boom"):
            model(IDS)
        blocks[3].mlp.forward = real
        assert greedy(model, IDS, 6) == want
        handle.detach()
        store.close()
    assert sim.violations == []


def test_generate_with_many_steps_and_two_models_in_one_store():
    a, b = make("llama", layers=5, seed=1), make("qwen2", layers=4, seed=2)
    want_a, want_b = greedy(a, IDS, 24), greedy(b, IDS, 24)
    sim = SimStreams("random", 7)
    with streams.use(sim):
        store = strata.open_store(CPU)
        ha = strata.offload(a, store=store, device="cpu", prefetch=2, progress=False)
        hb = strata.offload(b, store=store, device="cpu", prefetch=1, progress=False)
        attach_checker(a, find_blocks(a, None)[1], sim)
        attach_checker(b, find_blocks(b, None)[1], sim)
        assert greedy(a, IDS, 24) == want_a
        assert greedy(b, IDS, 24) == want_b
        ha.detach(), hb.detach()
        store.close()
    assert sim.violations == []


# -- seeded faults: each must be caught ----------------------------------------------------------


def _dropped_wait(monkeypatch):
    monkeypatch.setattr(PrefetchScheduler, "_await_copy", lambda self, stream, slot: None)


def _slot_refilled_early(monkeypatch):
    monkeypatch.setattr(PrefetchScheduler, "_after_previous_user", lambda self, slot: None)


def _lease_released_at_issue(monkeypatch):
    monkeypatch.setattr(MemoryTier, "hold_until", lambda self, e, event: None)


FAULTS = {"dropped-wait": _dropped_wait, "slot-refilled-early": _slot_refilled_early,
          "lease-released-at-issue": _lease_released_at_issue}


@pytest.mark.parametrize("fault", FAULTS)
def test_each_seeded_fault_is_caught(monkeypatch, fault):
    FAULTS[fault](monkeypatch)
    sim = SimStreams("late", 0)
    want, got, _ = offloaded_run(sim, prefetch=2)
    assert sim.violations, f"{fault}: no rule violation seen"
    if fault == "dropped-wait":  # late copies: the block ran on bytes that had not landed
        assert got != want
