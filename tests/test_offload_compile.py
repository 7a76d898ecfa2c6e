"""strata.offload with torch.compile, and what a backward through streamed weights does.

Compiling is slow on a CPU (inductor runs a C compiler), so the models are tiny and each
compiled test generates a few tokens only."""

import pytest
import torch

import strata
from strata import OffloadError
from tiny_models import VOCAB, greedy, make

IDS = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))
N = 4  # tokens generated per compiled run


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles from scratch: cached graphs or a hit recompile limit from another
    test would let a test pass on code it never compiled."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Inductor:
    """backend="inductor" that also records the parameter names each compiled graph reads,
    to prove the streamed blocks really run compiled (not silently eager)."""

    def __init__(self):
        self.inputs: list[str] = []

    def __call__(self, gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        self.inputs += [n.target for n in gm.graph.nodes if n.op == "placeholder"]
        return compile_fx(gm, example_inputs)

    def compiled(self, fragment: str) -> bool:
        return any(fragment in name for name in self.inputs)


def test_compile_after_offload_gives_the_uncompiled_logits_and_streams():
    model = make("llama")
    handle = strata.offload(model, device="cpu", progress=False)
    with torch.no_grad():
        want = model(IDS).logits
        backend = Inductor()
        compiled = torch.compile(model, backend=backend)
        copies = handle.stats()["copies"]
        first = compiled(IDS).logits
        again = compiled(IDS).logits  # the cached graphs, with the weights in other ring slots
    assert torch.allclose(first, want, atol=1e-5) and torch.allclose(again, want, atol=1e-5)
    assert handle.stats()["copies"] > copies  # the hooks ran: the weights were streamed
    assert backend.compiled("mlp_modules_down_proj_parameters_weight")  # a block's body ran compiled
    handle.detach()
    with torch.no_grad():
        assert torch.allclose(compiled(IDS).logits, want, atol=1e-5)


def test_a_model_compiled_in_place_then_offloaded_generates_the_same_tokens():
    model = make("llama")
    ref = greedy(model, IDS, N)
    backend = Inductor()
    model.compile(backend=backend)  # generate() calls the model itself, so it must be compiled in place
    handle = strata.offload(model, device="cpu", progress=False)
    assert greedy(model, IDS, N) == ref
    assert handle.stats()["copies"] > 0
    assert backend.compiled("mlp_modules_down_proj_parameters_weight")
    handle.detach()
    assert greedy(model, IDS, N) == ref


def test_fullgraph_compile_is_refused_with_a_message_naming_the_way_out():
    model = make("llama", layers=2)
    with strata.offload(model, device="cpu", progress=False):
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        with pytest.raises(Exception, match="strata.offload") as info:
            with torch.no_grad():
                compiled(IDS)
        assert "fullgraph" in str(info.value)


def test_streamed_weights_do_not_require_grad_and_detach_gives_it_back():
    model = make("llama")
    model.model.layers[2].mlp.up_proj.weight.requires_grad_(False)  # the user's own choice, kept
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    handle = strata.offload(model, device="cpu", progress=False)
    prefixes = tuple(handle.names[b] + "." for b in handle.plan.offloaded)
    streamed = {n for n, _ in model.named_parameters() if n.startswith(prefixes)}
    assert streamed
    for n, p in model.named_parameters():
        assert p.requires_grad == (before[n] and n not in streamed), n
    handle.detach()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


def test_forward_with_grad_enabled_works_and_a_backward_through_streamed_blocks_is_refused():
    model = make("llama")
    with torch.no_grad():
        want = model(IDS).logits
    with strata.offload(model, device="cpu", progress=False):
        out = model(IDS).logits  # grad mode on, as in much user code: inference must still work
        assert torch.equal(out.detach(), want)
        with pytest.raises(OffloadError, match="inference only") as info:
            out.sum().backward()
        assert "torch.no_grad()" in str(info.value) and "detach()" in str(info.value)
    for p in model.parameters():  # nothing silently wrong was accumulated into the streamed blocks
        assert p.grad is None or torch.isfinite(p.grad).all()


def test_a_backward_that_needs_no_streamed_block_still_works():
    model = make("llama")
    model.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)
    with strata.offload(model, device="cpu", progress=False):
        model(IDS).logits.sum().backward()
    grad = model.lm_head.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
