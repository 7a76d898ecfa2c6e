import subprocess
import sys

import pytest
import torch
from hypothesis import given, strategies as st

import strata
from strata import Key, StoreError

parts = st.text(max_size=12)


@given(parts, parts, parts, parts)
def test_distinct_keys_never_share_an_encoding(s1, n1, s2, n2):
    a, b = Key("kv", s1, n1), Key("kv", s2, n2)
    assert (a.encoded == b.encoded) == ((s1, n1) == (s2, n2))
    assert (a == b) == ((s1, n1) == (s2, n2))


@given(st.sampled_from(["kv", "param"]), parts, parts)
def test_decode_inverts_encode(ns, scope, name):
    k = Key(ns, scope, name)
    assert Key.decode(k.encoded) == k


@given(st.sampled_from(["kv", "param"]), parts, parts)
def test_keys_survive_pickling_as_vllm_sends_connector_metadata_to_workers(ns, scope, name):
    import pickle

    k = Key(ns, scope, name)
    back = pickle.loads(pickle.dumps(k))
    assert back == k and back.encoded == k.encoded and hash(back) == hash(k)


def test_separator_characters_do_not_alias():
    assert Key("kv", "a/b", "c").encoded != Key("kv", "a", "b/c").encoded
    assert Key("kv", "a\x00", "b").encoded != Key("kv", "a", "\x00b").encoded
    assert Key("kv", "s", "x") != Key("param", "s", "x")


def test_unknown_namespace_is_refused_with_the_allowed_ones():
    with pytest.raises(StoreError, match=r"namespace: got 'kvv'.*allowed: kv, param.*did you mean 'kv'"):
        Key("kvv", "s", "n")
    strata.register_namespace("user-ns")
    assert Key("user-ns", "s", "n").namespace == "user-ns"
    with pytest.raises(StoreError, match="namespace"):
        strata.register_namespace("bad name")


def test_key_parts_must_be_strings():
    with pytest.raises(StoreError, match=r"Key.scope: got int; allowed: str"):
        Key("kv", 3, "n")


def test_make_scope_is_stable_across_processes_and_hash_seeds():
    here = strata.make_scope(model="llama", dtype="bf16", tp=2)
    code = "import strata; print(strata.make_scope(tp=2, dtype='bf16', model='llama'))"
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin"}).stdout.strip()
        assert out == here
    assert strata.make_scope(model="llama", dtype="bf16", tp=1) != here


def test_make_scope_writes_sets_and_dicts_in_order_and_refuses_what_repr_cannot_tell_apart():
    """A set's repr follows the hash seed (another scope in every process: a cache never shared),
    a dict's its insertion order, an object's its address, and a tensor's elides most elements (two
    tensors, one scope: another's KV served). Sets and dicts are written sorted; the others refused.
    Scopes of plain values are what they were (bytes already stored keep their keys)."""
    assert strata.make_scope(model="llama", dtype="bf16", tp=2) == "dab4e039796220dd4cec1fdb89ac5920"
    assert strata.make_scope(names=("a.0", "a.1"), layout=((torch.bfloat16, (4, 4), 0),), n=None, f=1.5, b=True,
                             l=[1, "x"], d={"a": 1}, dev=torch.device("cpu"), one=("x",)) == \
        "9a84087d4f3edc29faf21859a9f7cd8d"
    here = strata.make_scope(layers={"q", "k", "v", "o"}, opts={"b": 1, "a": {2, 3}})
    assert here == strata.make_scope(opts={"a": {3, 2}, "b": 1}, layers={"o", "v", "k", "q"})
    code = "import strata; print(strata.make_scope(layers={'q', 'k', 'v', 'o'}, opts={'b': 1, 'a': {2, 3}}))"
    for seed in ("1", "2", "3"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin"}).stdout.strip()
        assert out == here
    with pytest.raises(StoreError, match=r"make_scope\(w=\.\.\.\): got Tensor; allowed: str, int, float"):
        strata.make_scope(w=torch.ones(2000))
    with pytest.raises(StoreError, match=r"make_scope\(cfg=\.\.\.\)\[1\]: got object"):
        strata.make_scope(cfg=(1, object()))
