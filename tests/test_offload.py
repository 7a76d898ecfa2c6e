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
    layers = model.model.layers
    # Before: a block given twice offloaded, then detach() failed halfway ("missing from the store"); an empty
    # list spoke of "blocks found at '<given>'"; overlapping blocks were taken without a word.
    with pytest.raises(OffloadError, match=r"blocks: model.layers.0 is given twice; allowed: each block once"):
        strata.offload(model, device="cpu", blocks=[layers[0], layers[1], layers[0]])
    with pytest.raises(OffloadError, match=r"blocks: got an empty list"):
        strata.offload(model, device="cpu", blocks=[])
    with pytest.raises(OffloadError, match=r"blocks: model.layers.1.mlp and model.layers.1 overlap "
                                           r"\(model.layers.1.mlp is in both\)"):
        strata.offload(model, device="cpu", blocks=[layers[0], layers[1].mlp, layers[1]])
    handle = strata.offload(model, device="cpu", progress=False)
    with pytest.raises(OffloadError, match="already offloaded"):
        strata.offload(model, device="cpu")
    handle.detach()


@pytest.mark.parametrize("static", [False, True], ids=["hook", "static"])
def test_an_offload_inside_or_around_an_offloaded_model_is_refused_and_harms_nothing(static):
    # Before: the second offload packed the first one's placeholders, a raw torch RuntimeError (or, around a
    # first offload that kept every block resident, two handles whose detach() undid each other).
    model = make("llama")
    ref = greedy(model, IDS)
    before = snapshot(model)
    for outer_first in (True, False):
        first = model if outer_first else model.model
        handle = strata.offload(first, device="cpu", progress=False, static=static)
        with pytest.raises(OffloadError, match=r"model: part of a LlamaForCausalLM already offloaded.*detach"
                           if outer_first else r"model: its submodule model is already offloaded.*detach"):
            strata.offload(model.model if outer_first else model, device="cpu", progress=False, static=static)
        assert greedy(model, IDS) == ref
        handle.detach()
        assert_restored(model, before)
    handle = strata.offload(model.model, device="cpu", progress=False, static=static)
    handle.detach()  # a detached handle holds nothing: the whole model offloads again
    handle = strata.offload(model, device="cpu", progress=False, static=static)
    assert greedy(model, IDS) == ref
    handle.detach()
    assert_restored(model, before)


@pytest.mark.parametrize("static", [False, True], ids=["hook", "static"])
def test_forwards_from_several_threads_run_one_at_a_time_each_on_its_own_weights(static):
    # Before: two threads generating on one offloaded model copied blocks into ring slots the other was
    # computing with (wrong tokens), and in hook mode left the ring's books wrong for every later forward.
    import threading

    model = make("llama", layers=5)
    prompts = [torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    refs = [greedy(model, p) for p in prompts]
    handle = strata.offload(model, device="cpu", prefetch=1, gpu_budget=None, progress=False, static=static)
    start = threading.Barrier(len(prompts))
    got: dict[int, list] = {}

    def run(i):
        start.wait()
        got[i] = [greedy(model, prompts[i]) for _ in range(4)]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert {i: [g == refs[i] for g in got.get(i, [])] for i in range(3)} == {i: [True] * 4 for i in range(3)}
    assert greedy(model, prompts[0]) == refs[0]

    # a forward that raises gives the lock back: another thread's forward runs, and so does this one's next
    boom = model.model.layers[2].register_forward_pre_hook(lambda *a: (_ for _ in ()).throw(ValueError("boom")))
    with pytest.raises(ValueError, match="boom"):
        greedy(model, prompts[1])
    boom.remove()
    other = threading.Thread(target=lambda: got.__setitem__("after", greedy(model, prompts[2])))
    other.start()
    other.join(timeout=60)
    assert got.get("after") == refs[2] and greedy(model, prompts[1]) == refs[1]
    handle.detach()
    assert greedy(model, prompts[0]) == refs[0]


@pytest.mark.parametrize("static", [False, True], ids=["hook", "static"])
@pytest.mark.parametrize("where", ["model-made-under-inference-mode", "offload-called-under-inference-mode"])
def test_inference_mode_around_the_model_or_the_offload_changes_nothing(static, where):
    # Before: a model built under torch.inference_mode() failed its first offloaded forward ("Inference
    # tensors do not track version counter"); an offload called under it gave placeholders detach() could not
    # undo ("Setting requires_grad=True on inference tensor"), failing midway through the detach.
    if where == "model-made-under-inference-mode":
        with torch.inference_mode():
            model = make("llama")
    else:
        model = make("llama")
    with torch.inference_mode():
        ref = greedy(model, IDS)
    with torch.inference_mode(where == "offload-called-under-inference-mode"):
        handle = strata.offload(model, device="cpu", progress=False, static=static)
    with torch.inference_mode():
        assert greedy(model, IDS) == ref
    assert greedy(model, IDS) == ref
    handle.detach()
    assert not any(t.is_inference() for t in model.state_dict().values())
    assert greedy(model, IDS) == ref
    with torch.inference_mode():
        assert greedy(model, IDS) == ref


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


@pytest.mark.parametrize("arch,static,budget", [("llama", False, None), ("gpt2", False, None),
                                                ("mixtral", False, "resident-2"), ("llama", True, None)])
def test_state_dict_of_an_offloaded_model_is_its_weights_and_saves_and_loads_back(tmp_path, arch, static, budget):
    """Between forwards an offloaded block's tensors are placeholders (or, static, views of a slot
    other blocks share): state_dict() returned those, so torch.save / save_file wrote NaN or another
    block's bytes without a word. It now returns what the store holds, each tensor its own storage."""
    from safetensors.torch import load_file, save_file

    model = make(arch, layers=4)
    ref = greedy(model, IDS)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    kw = {}
    if budget:  # some blocks resident on the device, the others streamed
        probe = strata.offload(model, device="cpu", progress=False)
        per_block, other = probe.layouts[0].nbytes, probe.plan.other_bytes
        probe.detach()
        kw = {"gpu_budget": int(other + 3.5 * per_block)}  # a ring of two and one block resident
    with strata.open_store() as store:
        handle = strata.offload(model, store=store, device="cpu", progress=False, static=static, **kw)
        assert handle.plan.offloaded and (not budget or handle.plan.resident)
        assert greedy(model, IDS) == ref  # a forward first: the ring's slots hold blocks now
        got = model.state_dict()
        assert got.keys() == want.keys()
        for k, v in want.items():
            assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v), k
        shared = {k: v for k, v in got.items() if k in ("lm_head.weight", "transformer.wte.weight")}
        save_file({k: v for k, v in got.items() if k != "lm_head.weight" or len(shared) < 2}, tmp_path / "m.st")
        torch.save(got, tmp_path / "m.pt")
        for k, v in load_file(tmp_path / "m.st").items():
            assert torch.equal(v, want[k]), k
        assert all(torch.equal(v, want[k]) for k, v in torch.load(tmp_path / "m.pt").items())
        assert greedy(model, IDS) == ref
        handle.detach()
    assert all(not b._state_dict_hooks and not b._load_state_dict_pre_hooks for b in model.modules())


def test_loading_a_state_dict_into_an_offloaded_model_is_refused_before_anything_loads():
    """Its values would go into placeholders (a torch error about overlapping memory) or, static,
    into ring slots the next copy overwrites (lost silently). Refused up front, naming the way out;
    nothing of the model changes; after detach() it loads as usual."""
    model = make("llama")
    ref = greedy(model, IDS)
    other = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    handle = strata.offload(model, device="cpu", progress=False)
    embed = model.model.embed_tokens.weight.detach().clone()
    with pytest.raises(OffloadError, match=r"load_state_dict: model\.layers\.0\..* belongs to block model\.layers\.0.*"
                                           r"handle\.detach\(\), load, and offload again"):
        model.load_state_dict(other)
    assert torch.equal(model.model.embed_tokens.weight, embed)  # refused before the modules ahead loaded
    with pytest.raises(OffloadError,
                       match=r"load_state_dict: self_attn\.q_proj\.weight belongs to block model\.layers\.2"):
        model.model.layers[2].load_state_dict({k[len("model.layers.2."):]: v for k, v in other.items()
                                               if k.startswith("model.layers.2.")})
    model.model.norm.load_state_dict({"weight": other["model.norm.weight"]})  # outside the blocks: as usual
    model.model.norm.load_state_dict({"weight": model.state_dict()["model.norm.weight"] - 1})
    assert greedy(model, IDS) == ref
    handle.detach()
    model.load_state_dict(other)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, other["model.layers.0.self_attn.q_proj.weight"])


@pytest.mark.parametrize("static", [False, True])
def test_a_cast_that_would_change_the_streamed_blocks_is_refused_before_anything_converts(static):
    """model.double() after offload replaced the streamed blocks' placeholders (static: the views of
    their ring buffers) with converted copies: a dtype error at the next forward, or, static, stale
    weights and other tokens without a word. Refused now, on the model or on a block, before any
    tensor converts; a call that changes nothing (model.to("cpu") on a model running there, as
    pipelines make) goes through; after detach() the model converts as usual."""
    model = make("llama")
    ref = greedy(model, IDS)
    with strata.open_store() as store:
        handle = strata.offload(model, store=store, device="cpu", progress=False, static=static)
        assert greedy(model, IDS) == ref
        for convert in (lambda: model.double(), lambda: model.half(), lambda: model.to(torch.bfloat16),
                        lambda: model.model.layers[1].to(torch.float16), lambda: model.model.layers[2].mlp.half()):
            with pytest.raises(OffloadError, match=r"torch\.float32 tensors on cpu into "
                                                   r"torch\.(float64|float16|bfloat16) on cpu.*convert the model "
                                                   r"before strata\.offload"):
                convert()
            assert model.model.embed_tokens.weight.dtype == torch.float32  # nothing converted
        assert model.to("cpu") is model and model.float() is model  # no change: through
        assert greedy(model, IDS) == ref
        handle.detach()
    model.double()
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float64
    assert not any("_apply" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("static", [False, True])
def test_copying_or_pickling_an_offloaded_model_is_refused_naming_detach(tmp_path, static):
    """copy.deepcopy(model) failed with "cannot pickle 'ChainLock' object" (the store's lock, met
    through the ring): refused now naming the way out; a detached model copies as usual."""
    import copy
    import pickle

    model = make("llama")
    ref = greedy(model, IDS)
    with strata.open_store() as store:
        handle = strata.offload(model, store=store, device="cpu", progress=False, static=static)
        for attempt in (lambda: copy.deepcopy(model), lambda: pickle.dumps(model),
                        lambda: torch.save(model, tmp_path / "model.pt")):
            with pytest.raises(OffloadError, match=r"cannot be copied or pickled.*handle\.detach\(\) first"):
                attempt()
        assert greedy(model, IDS) == ref
        handle.detach()
    assert greedy(copy.deepcopy(model), IDS) == ref
