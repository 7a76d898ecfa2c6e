"""strata.offload(static=True) on CUDA: the tokens of the model fully on the GPU, eagerly, under
torch.compile, and replayed from a captured CUDA graph (vLLM's compiled mode relies on the last).

The capture test uses a plain stack of MLP blocks rather than a transformers model, whose forward
makes host-side decisions (mask building, cache objects) that no CUDA graph can hold; the static
ring does not care what a block computes. Six blocks through two fixed slots: each replay must
copy four blocks into slots other blocks used in the same replay, so wrong logits mean the
captured graph lost a copy or a wait."""

import pytest
import torch

import strata

from .cases import LAYERS, NEW_TOKENS, prompt, reference_tokens
from tiny_models import greedy, make


@pytest.mark.parametrize("prefetch", (1, 2))
def test_static_offload_gives_the_greedy_tokens_of_the_model_on_the_device(device, prefetch):
    ref = reference_tokens("llama", device)
    model = make("llama", layers=LAYERS)
    handle = strata.offload(model, device=device, prefetch=prefetch, progress=False, static=True)
    try:
        assert greedy(model, prompt(device), NEW_TOKENS) == ref
        assert handle.stats()["copies"] > 0
    finally:
        handle.detach()


class Stack(torch.nn.Module):
    def __init__(self, width: int = 256, depth: int = 6):
        super().__init__()
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(width, 2 * width), torch.nn.GELU(), torch.nn.Linear(2 * width, width))
            for _ in range(depth))

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


def _stack_and_reference(device):
    torch.manual_seed(0)
    model = Stack()
    inputs = [torch.randn(4, 256, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    with torch.no_grad():
        ref = [Stack.forward(model.to(device), x.to(device)).cpu() for x in inputs]
    return model.cpu(), inputs, ref


@pytest.mark.cuda_only
def test_a_captured_cuda_graph_replays_the_copies_and_waits(device):
    model, inputs, ref = _stack_and_reference(device)
    handle = strata.offload(model, device=device, prefetch=1, progress=False, static=True, blocks="blocks")
    ring = handle.scheduler
    try:
        assert ring.slots == 2 and len(handle.plan.offloaded) == 6
        static_in = inputs[0].to(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.no_grad(), torch.cuda.stream(side):  # warm-up, as vLLM does before capturing
            for _ in range(2):
                model(static_in)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        ring.sync()  # what vLLM's capture calls first (sync_prev_onload)
        with torch.no_grad(), torch.cuda.graph(graph):
            static_out = model(static_in)
            ring.join()  # and last (join_after_forward)
        for x, want in zip(inputs * 2, ref * 2):
            static_in.copy_(x.to(device))
            ring.sync()
            graph.replay()
            torch.cuda.synchronize(device)
            assert torch.allclose(static_out.cpu(), want, atol=1e-5, rtol=1e-5)
        with torch.no_grad():  # eager forwards after the capture still wait on valid events
            for x, want in zip(inputs, ref):
                assert torch.allclose(model(x.to(device)).cpu(), want, atol=1e-5, rtol=1e-5)
    finally:
        handle.detach()


@pytest.mark.cuda_only
def test_torch_compile_reduce_overhead_gives_the_same_outputs(device):
    torch._dynamo.reset()
    model, inputs, ref = _stack_and_reference(device)
    handle = strata.offload(model, device=device, prefetch=1, progress=False, static=True, blocks="blocks")
    try:
        compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
        with torch.no_grad():
            for x, want in zip(inputs * 3, ref * 3):
                out = compiled(x.to(device)).clone()
                torch.cuda.synchronize(device)
                assert torch.allclose(out.cpu(), want, atol=1e-4, rtol=1e-4)
    finally:
        handle.detach()
        torch._dynamo.reset()
