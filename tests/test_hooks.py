"""strata.hooks: attach, chain and detach without touching anything else on the module."""

import pytest
import torch

import strata
from strata.hooks import ModuleHook, SequentialHook, attach_hook, detach_hook, hooks_of
from tiny_models import VOCAB, greedy, make


class Recorder(ModuleHook):
    def __init__(self, name, log):
        self.name, self.log = name, log

    def init_hook(self, module):
        self.log.append(("init", self.name))

    def pre_forward(self, module, args, kwargs):
        self.log.append(("pre", self.name))
        return args, kwargs

    def post_forward(self, module, output):
        self.log.append(("post", self.name))
        return output

    def detach_hook(self, module):
        self.log.append(("detach", self.name))


def test_hooks_chain_in_order_and_detach_restores_the_module_exactly():
    lin = torch.nn.Linear(3, 3)
    forward_before = lin.forward
    user_pre = lin.register_forward_pre_hook(lambda m, a: None)
    pre_dict, post_dict = dict(lin._forward_pre_hooks), dict(lin._forward_hooks)
    log = []
    a, b = attach_hook(lin, Recorder("a", log)), attach_hook(lin, Recorder("b", log))
    assert hooks_of(lin) == [a, b]
    lin(torch.ones(1, 3))
    assert log == [("init", "a"), ("init", "b"), ("pre", "a"), ("pre", "b"), ("post", "b"), ("post", "a")]
    detach_hook(lin, a)
    assert hooks_of(lin) == [b]
    detach_hook(lin)
    assert log[-2:] == [("detach", "a"), ("detach", "b")]
    assert dict(lin._forward_pre_hooks) == pre_dict and dict(lin._forward_hooks) == post_dict
    assert lin.forward == forward_before and not hasattr(lin, "_strata_hook")
    user_pre.remove()


def test_hooks_can_rewrite_inputs_and_outputs():
    class Double(ModuleHook):
        def pre_forward(self, module, args, kwargs):
            return (args[0] * 2,), kwargs

        def post_forward(self, module, output):
            return output + 1

    lin = torch.nn.Linear(2, 2, bias=False)
    torch.nn.init.eye_(lin.weight)
    attach_hook(lin, SequentialHook(Double()))
    assert torch.equal(lin(torch.ones(1, 2)), torch.full((1, 2), 3.0))
    detach_hook(lin)
    assert torch.equal(lin(torch.ones(1, 2)), torch.ones(1, 2))


def test_a_forward_that_raises_midway_leaves_the_next_one_correct():
    model = make("llama", layers=5)
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))
    ref = greedy(model, ids)
    boom = {"armed": True}

    class Fail(ModuleHook):
        def pre_forward(self, module, args, kwargs):
            if boom["armed"]:
                boom["armed"] = False
                raise RuntimeError("injected")
            return args, kwargs

    handle = strata.offload(model, device="cpu", prefetch=2, progress=False)
    attach_hook(model.model.layers[3], Fail())
    with pytest.raises(RuntimeError, match="injected"):
        model(ids)
    assert greedy(model, ids) == ref
    detach_hook(model.model.layers[3], hooks_of(model.model.layers[3])[-1])
    handle.detach()
