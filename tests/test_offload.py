"""strata.offload on CPU: exact greedy tokens, budgets, detach, hooks, bad input."""


import pytest
import torch

import strata
from strata import OffloadError
from tiny_models import VOCAB, greedy, make

IDS = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))


def snapshot(model):
    return {n: t.detach().clone() for n, t in model.state_dict(keep_vars=True).items()}


def assert_restored(model, before):
    after = model.state_dict(keep_vars=True)
    assert after.keys() == before.keys()
    for n, t in before.items():
        a = after[n]
        assert a.dtype == t.dtype and a.shape == t.shape and a.device == t.device, n
        assert torch.equal(a.view(torch.uint8) if a.dtype == torch.bool else a, t), n


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "mixtral", "opt"])
@pytest.mark.parametrize("prefetch", [1, 2])
def test_greedy_tokens_match_and_detach_restores_every_bit(arch, prefetch):
    model = make(arch, layers=5)
    ref = greedy(model, IDS)
    before = snapshot(model)
    params_before = {n: p for n, p in model.named_parameters()}
    handle = strata.offload(model, device="cpu", prefetch=prefetch, progress=False)
    assert handle.plan.offloaded == tuple(range(5))
    assert greedy(model, IDS) == ref
    assert greedy(model, IDS[:1]) == greedy_ref_single(arch, IDS[:1])
    s = handle.stats()
    assert s["copies"] > 0 and s["bytes_streamed"] > 0 and s["forwards"] > 0
    assert s["resident_blocks"] == 0 and s["store_param_bytes"] == s["offloaded_bytes"]
    # between forwards the offloaded weights are placeholders: shape-true, no real memory
    layer_param = next(handle.layouts[0].tensors[0] for _ in [0])
    assert layer_param.stride() == (0,) * layer_param.dim()
    handle.detach()
    assert_restored(model, before)
    assert all(p is params_before[n] for n, p in model.named_parameters())  # same Parameter objects
    assert greedy(model, IDS) == ref


_SINGLE: dict = {}


def greedy_ref_single(arch, ids):
    if arch not in _SINGLE:
        _SINGLE[arch] = greedy(make(arch, layers=5), ids)
    return _SINGLE[arch]


@pytest.mark.parametrize("prefetch", [1, 2])
def test_budget_keeps_some_blocks_resident_and_still_matches(prefetch):
    model = make("llama", layers=6)
    ref = greedy(model, IDS)
    block = 148_224  # one tiny Llama block, packed
    budget = 70_000 + (prefetch + 1 + 2) * block
    handle = strata.offload(model, device="cpu", gpu_budget={"cpu": budget}, prefetch=prefetch, progress=False)
    assert len(handle.plan.resident) == 2 and len(handle.plan.offloaded) == 4
    assert greedy(model, IDS) == ref
    text = handle.placement()
    assert "resident on device" in text and "streamed from the store" in text
    handle.detach()
    assert greedy(model, IDS) == ref


def test_works_under_inference_mode_and_for_plain_forward_calls():
    model = make("qwen2")
    with torch.no_grad():
        want = model(IDS).logits
    with strata.offload(model, device="cpu", progress=False) as handle:
        with torch.inference_mode():
            got = model(IDS).logits
        with torch.no_grad():
            again = model(IDS).logits
        assert handle.stats()["forwards"] == 2
    assert torch.equal(got, want) and torch.equal(again, want)


def test_hooks_already_on_the_model_still_run():
    from accelerate.hooks import ModelHook, add_hook_to_module

    model = make("llama")
    ref = greedy(model, IDS)
    seen = {"torch": 0, "accelerate": 0}

    class Counting(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            seen["accelerate"] += 1
            return args, kwargs

    layer = model.model.layers[1]
    layer.register_forward_hook(lambda *a: seen.__setitem__("torch", seen["torch"] + 1))
    add_hook_to_module(layer, Counting())
    handle = strata.offload(model, device="cpu", progress=False)
    assert greedy(model, IDS) == ref
    assert seen["torch"] == seen["accelerate"] > 0
    handle.detach()
    n = seen["torch"]
    model(IDS)
    assert seen["torch"] == seen["accelerate"] == n + 1  # still there after detach
    assert len(layer._forward_pre_hooks) == 0 and len(layer._forward_hooks) == 1


def test_streams_from_a_file_tier_when_the_cpu_tier_is_too_small(tmp_path):
    model = make("llama", layers=6)
    ref = greedy(model, IDS)
    cfg = {"tiers": [{"kind": "cpu", "capacity": "400KiB"}, {"kind": "file", "path": str(tmp_path), "capacity": "8MiB"}],
           "namespaces": {"param": {"evict": "lower"}}}
    with strata.open_store(cfg) as store:
        handle = strata.offload(model, store=store, device="cpu", progress=False)
        assert greedy(model, IDS) == ref
        tiers = store.stats()["tiers"]
        assert tiers["file"]["hits"] > 0 and tiers["file"]["namespaces"]["param"]["objects"] == 6
        assert tiers["cpu"]["bytes"] <= tiers["cpu"]["capacity"]
        # Each forward reads the blocks in one order: those the CPU tier holds hit there every
        # time, and those read from the file are not copied up over them (promote: keep).
        held = tiers["cpu"]["namespaces"]["param"]["objects"]
        assert 0 < held < 6
        with torch.no_grad():
            model(IDS)
        after = store.stats()["tiers"]
        assert after["cpu"]["hits"] - tiers["cpu"]["hits"] == held
        assert after["file"]["hits"] - tiers["file"]["hits"] == 6 - held
        assert after["cpu"]["promotions"] == tiers["cpu"]["promotions"] == 0
        handle.detach()
        assert not store.keys("param")  # detach gives the space back


def test_shares_a_store_with_kv_and_a_full_store_is_a_clear_error_that_loses_nothing():
    model = make("llama")
    before = snapshot(model)
    with strata.open_store({"tiers": [{"kind": "cpu", "capacity": "300KiB"}],
                            "namespaces": {"param": {"evict": "never"}}}) as store:
        kv = strata.Key("kv", "other-model", "chunk")
        store.put(kv, torch.ones(1024))
        with pytest.raises(OffloadError, match=r"store: could not take block model.layers.2 \(144.5 KiB\)"):
            strata.offload(model, store=store, device="cpu", progress=False)
        assert_restored(model, before)
        assert not store.keys("param")
        assert not hasattr(model, "_strata_offload")
        assert store.get(kv) is None  # the KV chunk was evictable, the weights were not


def test_bad_input_is_refused_clearly():
    model = make("llama")
    with pytest.raises(OffloadError, match=r"device: got 'cuda' but CUDA is not available here; allowed: 'cpu'"):
        strata.offload(model, device="cuda")
    with pytest.raises(OffloadError, match=r"device: got 'tpu'"):
        strata.offload(model, device="tpu")
    with pytest.raises(OffloadError, match=r"prefetch: got -1; allowed: an integer >= 0"):
        strata.offload(model, device="cpu", prefetch=-1)
    with pytest.raises(OffloadError, match=r"gpu_budget: got 100.0 KiB; allowed: at least .* ring of prefetch\+1=2 buffers"):
        strata.offload(model, device="cpu", gpu_budget="100KiB")
    with pytest.raises(OffloadError, match=r"gpu_budget: got 'lots'"):
        strata.offload(model, device="cpu", gpu_budget="lots")
    with pytest.raises(OffloadError, match=r"blocks: found no repeated blocks in Linear.*pass blocks="):
        strata.offload(torch.nn.Linear(4, 4), device="cpu")
    with pytest.raises(OffloadError, match=r"blocks: got 'model.layerz', no such submodule; module lists in this model: model.layers"):
        strata.offload(model, device="cpu", blocks="model.layerz")
    handle = strata.offload(model, device="cpu", progress=False)
    with pytest.raises(OffloadError, match="already offloaded"):
        strata.offload(model, device="cpu")
    handle.detach()


def test_everything_fitting_the_budget_is_said_not_silently_ignored():
    model = make("llama")
    with pytest.warns(UserWarning, match="fits gpu_budget.*nothing is offloaded"):
        handle = strata.offload(model, device="cpu", gpu_budget="1GiB", progress=False)
    assert handle.stats()["offloaded_blocks"] == 0 and handle.scheduler is None
    handle.detach()


def test_explicit_blocks_and_budget_dict():
    model = make("gpt2")
    ref = greedy(model, IDS)
    handle = strata.offload(model, device="cpu", blocks=list(model.transformer.h)[1:], progress=False)
    assert handle.names == [f"transformer.h.{i}" for i in range(1, 4)]
    assert greedy(model, IDS) == ref
    handle.detach()
