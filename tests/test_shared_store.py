"""The process's shared engines (``strata.store.shared``): one per config, and a forked child's own."""

import os

import torch

import strata
from strata.store.shared import shared_store


def test_one_engine_per_config_in_a_process(tmp_path):
    cfg = {"tiers": [{"kind": "cxl", "path": str(tmp_path / "r"), "size": "4MiB"}]}
    store = shared_store(cfg)
    try:
        assert shared_store(cfg) is store
    finally:
        store.close()
    assert shared_store(cfg) is not store  # closed: a new one
    shared_store(cfg).close()


def test_a_forked_child_opens_its_own_engine_and_leaves_the_parents_locks_alone(tmp_path):
    """A child forked after the parent opened a cxl store gets an engine of its own (its own
    open file: its own region lock and pins), not the parent's copy, whose region lock and pins
    the child would share (they belong to the open file) and whose flusher thread is gone."""
    cfg = {"tiers": [{"kind": "cxl", "path": str(tmp_path / "r"), "size": "4MiB"}]}
    parent = shared_store(cfg)
    k, c = strata.Key("kv", "fork", "parent"), strata.Key("kv", "fork", "child")
    try:
        assert parent.put(k, torch.full((1000,), 3.0))
        with parent.lease(k) as view:
            pid = os.fork()
            if pid == 0:  # the child: report through the exit code only
                code = 1
                try:
                    store = shared_store(cfg)
                    ok = store is not parent and torch.equal(store.get(k), torch.full((1000,), 3.0))
                    ok = ok and store.delete(k) and store.put(c, torch.full((1000,), 4.0))
                    store.close()
                    code = 0 if ok else 2
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            assert torch.equal(view, torch.full((1000,), 3.0))  # the lease's pin held against the child
        assert parent.get(k) is None and torch.equal(parent.get(c), torch.full((1000,), 4.0))
    finally:
        parent.close()
