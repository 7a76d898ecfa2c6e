"""The process's shared engines (``strata.store.shared``): one per config, and a forked child's own."""

import os
import signal

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


def test_a_store_used_in_a_forked_child_is_a_clear_error_and_its_close_there_lets_nothing_go(tmp_path):
    """A forked child using its parent's store would share the parent's region lock and pins
    (they belong to the open file) without the parent's threads: every call says so instead,
    and closing the copy in the child leaves the parent's pins and lock in place."""
    cfg = {"tiers": [{"kind": "cxl", "path": str(tmp_path / "r"), "size": "1MiB"}]}
    k, k2 = strata.Key("kv", "fork", "k"), strata.Key("kv", "fork", "k2")
    with strata.open_store(cfg) as parent:
        assert parent.put(k, torch.arange(600 << 10, dtype=torch.uint8))
        with parent.lease(k) as view:
            pid = os.fork()
            if pid == 0:
                code = 1
                signal.signal(signal.SIGALRM, signal.SIG_DFL)  # the parent's engine may hang here (it did, in
                signal.alarm(30)  # torch's code): killed by the alarm, never a hung test
                try:
                    try:
                        parent.get(k)
                        code = 2
                    except strata.StoreError as e:
                        code = 0 if "fork" in str(e) and "open a store in the child" in str(e) else 3
                    parent.close()
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            with strata.open_store(cfg) as other:  # the parent's pin still holds k's bytes
                assert other.delete(k)
                assert not other.put(k2, torch.ones(600 << 10, dtype=torch.uint8))
            assert torch.equal(view, torch.arange(600 << 10, dtype=torch.uint8))
        assert parent.put(k2, torch.ones(600 << 10, dtype=torch.uint8))  # its lock works as before
