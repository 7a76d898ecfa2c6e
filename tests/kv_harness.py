"""Drive the StrataConnector through vLLM's own v1 Scheduler and a fake worker, in one process.

Starting a vLLM engine costs minutes here; most connector behaviour does not need one. As vLLM's
connector unit tests do (tests/v1/kv_connector/unit/utils.py: create_scheduler,
create_model_runner_output), this builds the real ``Scheduler`` with a ``kv_transfer_config`` that
loads ``strata.kv.vllm``, so vLLM itself calls the scheduler half (lookups, allocation, metadata,
request_finished, load-error rollback). The worker is a ``StrataConnector`` in the WORKER role over
a small real paged KV cache, driven step by step the way vLLM's model runner does (bind, load,
forward, save, load errors, stats, clear). Both halves share one in-process store.

The fake forward writes, for each token it computes, a value that depends on the whole prefix up
to it (as real KV does), so a block holding another prefix's KV, a stale block or a block never
loaded is told apart from the right one. Blocks vLLM hands out fresh are poisoned (NaN) the moment
it allocates them, and after every step the harness checks the invariant the connector exists for:
every token vLLM counts as computed holds exactly the KV the forward would have written, except in
blocks the worker reported as failed to load (vLLM recomputes those). ``wrong`` lists the violations.

The fake forward goes layer by layer as vLLM's attention layers do: ``wait_for_layer_load`` before
a layer's tokens are written, ``save_kv_layer`` after (``layer_hook`` lets a test act between
them); under a simulated device in layer-wise mode each layer's cache is declared read there
(the checker tracks a whole layer: outside that mode an asynchronous load's copies into another
request's blocks of the layer may rightly still run). ``start_load_kv``
comes before the forward in a step with synchronous loads and after it otherwise, as vLLM's
``_get_kv_connector_output`` orders it.

Asynchronous loads run as vLLM's model runner drives them: the worker's ``get_finished`` gets the
step's finished requests and returns the loads that are complete, which go back to vLLM's scheduler
with the load errors (a step that schedules nothing still calls the worker, as
``kv_connector_no_forward`` does). With ``settle`` (the default) each step waits until the worker's
loader has read what it was given, so step counts do not depend on thread timing; tests of slow
stores turn it off. ``streams`` runs the worker on another device seam (``SimStreams``: its side-
stream copies run as late or early as their waits allow); a step that schedules nothing then lets
the device catch up, as a GPU does while the engine idles.
"""

from __future__ import annotations

import json
import pickle
import socketserver
import struct
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from vllm import SamplingParams
from vllm.config import CacheConfig, DeviceConfig, KVTransferConfig, ModelConfig, SchedulerConfig, VllmConfig
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus
from vllm.v1.structured_output import StructuredOutputManager

from strata import streams as strata_streams
from strata.keys import Key

LAYERS = ("layers.0.attn", "layers.1.attn")
HEADS, HEAD_SIZE = 2, 4
SAMPLED = 7  # the token every decode step "samples" (never EOS: requests end by max_tokens)
MODULUS = 1_000_003  # prefix values stay below 2**24: exact in float32


def write_model_config(path: Path) -> Path:
    """A config.json vLLM's ModelConfig accepts (no weights, no tokenizer: nothing runs a model)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": len(LAYERS), "num_attention_heads": 4,
        "num_key_value_heads": HEADS, "max_position_embeddings": 4096, "torch_dtype": "float32"}))
    return path


def prefix_values(tokens: list[int]) -> list[float]:
    """The fake KV of each position: a rolling hash of every token up to and including it."""
    out, v = [], 0
    for t in tokens:
        v = (v * 31 + t + 1) % MODULUS
        out.append(float(v))
    return out


def tokens(n: int, seed: int) -> list[int]:
    """``n`` prompt token ids, deterministic in ``seed`` (distinct seeds: distinct prompts)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 500, (n,), generator=g).tolist()


@dataclass
class Step:
    """What one step did: vLLM's scheduler output, the connector metadata the worker was bound to,
    the block ids it reported as failed to load, and the worker's stats for the step."""

    output: SchedulerOutput
    meta: object
    invalid: set[int]
    stats: dict = field(default_factory=dict)
    recving: set[str] = field(default_factory=set)  # asynchronous loads the worker reported complete


class Harness:
    """vLLM's Scheduler with the StrataConnector, and a fake worker over a real paged KV cache."""

    def __init__(self, tmp_path: Path, *, num_blocks: int = 16, block_size: int = 16, chunk_size: int = 32,
                 max_batched_tokens: int = 512, save_partial: bool = True, store: str = "cpu",
                 prefix_caching: bool = False, extra: dict | None = None, streams=None, model: Path | None = None):
        self.block_size, self.num_blocks = block_size, num_blocks
        # own keys per harness, unless it is handed another's model (the same keys: one store's chunks)
        self.model = model or write_model_config(Path(tmp_path) / f"model-{uuid.uuid4().hex[:8]}")
        model = self.model
        self.config = self._vllm_config(model, block_size, max_batched_tokens, prefix_caching, {
            "strata.config": store, "strata.chunk_size": chunk_size, "strata.save_partial": save_partial,
            **(extra or {})})
        spec = FullAttentionSpec(block_size=block_size, num_kv_heads=HEADS, head_size=HEAD_SIZE, dtype=torch.float32)
        self.kv_cache_config = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                                             kv_cache_groups=[KVCacheGroupSpec(list(LAYERS), spec)])
        self.config.cache_config.num_gpu_blocks = num_blocks
        self.scheduler = Scheduler(vllm_config=self.config, kv_cache_config=self.kv_cache_config, log_stats=True,
                                   structured_output_manager=StructuredOutputManager(self.config),
                                   block_size=block_size)
        self._held: dict[str, set[int]] = {}  # the blocks each request held at its last allocation
        self._spy_on_allocation()
        self.worker = KVConnectorFactory.create_connector(self.config, KVConnectorRole.WORKER, self.kv_cache_config)
        shape = (num_blocks, block_size, 2, HEADS, HEAD_SIZE)
        self.kv = {name: self._empty_layer(shape, streams) for name in LAYERS}
        self.sim = streams
        if streams is not None:
            with strata_streams.use(streams):  # the worker keeps the seam it registered under
                self.worker.register_kv_caches(self.kv)
        else:
            self.worker.register_kv_caches(self.kv)
        self.settle = True  # each step waits until the loader has read what it was given
        self.steps: list[Step] = []
        self.wrong: list[str] = []  # violations of "computed tokens hold the right KV"
        self.generated: dict[str, list[int]] = {}  # the tokens vLLM kept, per request
        self.recving: list[set[str]] = []  # the loads the worker reported finished, step by step
        self.layer_hook: Callable[[str, str], None] | None = None  # (phase, layer name), around each layer

    @staticmethod
    def _empty_layer(shape: tuple, sim) -> torch.Tensor:
        """A layer of the KV cache, all NaN; under a simulated device, in its "device" memory (so it
        checks the copies into it)."""
        if sim is None:
            return torch.full(shape, float("nan"))
        numel = 1
        for d in shape:
            numel *= d
        return sim.device_empty(numel * 4, torch.device("cpu")).view(torch.float32).view(shape)  # 0xFF bytes: NaN

    @staticmethod
    def _vllm_config(model: Path, block_size: int, max_batched_tokens: int, prefix_caching: bool,
                     extra: dict) -> VllmConfig:
        model_config = ModelConfig(model=str(model), skip_tokenizer_init=True, dtype="float32", seed=0)
        return VllmConfig(
            model_config=model_config,
            scheduler_config=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=max_batched_tokens,
                                             max_model_len=2048, enable_chunked_prefill=True,
                                             is_encoder_decoder=False),
            # vLLM's prefix cache off by default: every reused token comes from the store (as in the demo)
            cache_config=CacheConfig(block_size=block_size, cache_dtype="auto", enable_prefix_caching=prefix_caching),
            kv_transfer_config=KVTransferConfig(
                kv_connector="StrataConnector", kv_connector_module_path="strata.kv.vllm", kv_role="kv_both",
                kv_load_failure_policy="recompute", kv_connector_extra_config=extra),
            device_config=DeviceConfig("cpu"))

    def _spy_on_allocation(self) -> None:
        """Poison the blocks vLLM gives a request the moment it allocates them (before the worker
        can load into them): those it did not hold before and that vLLM's prefix cache did not fill
        (a cached block carries its hash). A request admitted without computed tokens (new,
        preempted, or after a failed asynchronous load) holds nothing before."""
        conn = self.scheduler.connector
        allocated = conn.update_state_after_alloc

        def spy(request, blocks, num_external_tokens):
            rid = request.request_id
            held = self._held.get(rid, set()) if request.num_computed_tokens > 0 else set()
            fresh = [b.block_id for b in blocks.blocks[0] if b.block_id not in held and b.block_hash is None]
            for layer in self.kv.values():
                layer[fresh] = float("nan")
            self._held[rid] = set(blocks.get_block_ids()[0])
            return allocated(request, blocks, num_external_tokens)

        conn.update_state_after_alloc = spy

    # ------------------------------------------------------------------ the two connectors
    @property
    def scheduler_connector(self):
        return self.scheduler.connector

    @property
    def layerwise(self) -> bool:
        return self.worker.worker_half.ctx.layerwise

    @property
    def store(self):
        return self.worker.store

    # ------------------------------------------------------------------ requests
    def add(self, prompt: list[int], max_tokens: int = 2, rid: str | None = None) -> str:
        rid = rid or f"req-{uuid.uuid4().hex[:8]}"
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        self.scheduler.add_request(Request(request_id=rid, prompt_token_ids=list(prompt), sampling_params=params,
                                           pooling_params=None, block_hasher=self._block_hasher()))
        return rid

    def abort(self, rid: str) -> None:
        self.scheduler.finish_requests(rid, RequestStatus.FINISHED_ABORTED)

    def abort_all(self) -> None:
        self.scheduler.finish_requests(None, RequestStatus.FINISHED_ABORTED)

    def request(self, rid: str) -> Request:
        return self.scheduler.requests[rid]

    def block_ids(self, rid: str) -> list[int]:
        return list(self.scheduler.kv_cache_manager.get_block_ids(rid)[0])

    # ------------------------------------------------------------------ steps
    def step(self, before_load: Callable[[Step], None] | None = None) -> Step:
        """One engine step: schedule, then the worker as vLLM's model runner drives it."""
        out = self.scheduler.schedule()
        step = Step(out, out.kv_connector_metadata, set())
        self._poison_growth(out)
        w = self.worker
        # the worker gets its own copy, as from vLLM's multiprocess executor (which pickles the
        # scheduler output to its workers): nothing may ride on sharing the scheduler's objects
        w.bind_connector_metadata(pickle.loads(pickle.dumps(out.kv_connector_metadata)))
        if before_load is not None:
            before_load(step)
        if out.has_sync_kv_loads:
            w.start_load_kv(None)
        self._forward(out)
        if not out.has_sync_kv_loads:
            w.start_load_kv(None)
        w.wait_for_save()
        if self.settle:
            assert w.worker_half.wait_loads(timeout=60), "the loader did not finish"
        if self.sim is not None and not out.num_scheduled_tokens:
            self.sim.synchronize()  # the engine idles: the device catches up
        _, step.recving = w.get_finished(out.finished_req_ids)
        step.invalid = set(w.get_block_ids_with_load_errors())
        stats = w.get_kv_connector_stats()
        step.stats = dict(stats.data) if stats is not None else {}
        w.clear_connector_metadata()
        self._check(out, step.invalid)
        self.recving.append(set(step.recving or ()))
        self._record(self.scheduler.update_from_output(out, self._runner_output(out, step, stats)))
        self.steps.append(step)
        return step

    def run(self, max_steps: int = 50, before_load: Callable[[Step], None] | None = None) -> list[Step]:
        """Steps until every request has finished; then every queued save has reached the store."""
        steps = []
        while self.scheduler.has_unfinished_requests():
            assert len(steps) < max_steps, "requests did not finish"
            steps.append(self.step(before_load))
        self.worker.flush()
        return steps

    def waiting_for_kv(self) -> set[str]:
        """The requests vLLM parks while their asynchronous load runs."""
        return {rid for rid, r in self.scheduler.requests.items() if r.status == RequestStatus.WAITING_FOR_REMOTE_KVS}

    def _scheduled(self, out: SchedulerOutput):
        """(request, first computed position, tokens computed this step) for every scheduled request."""
        for rid, n in out.num_scheduled_tokens.items():
            req = self.scheduler.requests[rid]
            yield req, req.num_computed_tokens - n, n  # the scheduler has already advanced the count

    def _block_hasher(self):
        """vLLM's prefix-cache block hashes (only needed, and only set up, with its prefix cache on)."""
        if not self.config.cache_config.enable_prefix_caching:
            return None
        from vllm.utils.hashing import sha256
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash

        init_none_hash(sha256)
        return get_request_block_hasher(self.block_size, sha256)

    def _poison_growth(self, out: SchedulerOutput) -> None:
        """Blocks a running request grows by (admissions are poisoned when vLLM allocates them)
        hold someone else's KV or nothing: NaN, so a token never computed shows."""
        fresh = []
        cached = out.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            if rid not in cached.resumed_req_ids and cached.new_block_ids[i]:
                fresh += cached.new_block_ids[i][0]
        for layer in self.kv.values():
            layer[fresh] = float("nan")

    def _forward(self, out: SchedulerOutput) -> None:
        """Write the fake KV of every token computed this step into the request's blocks, layer by
        layer between the connector's layer hooks (vLLM calls them around each attention layer of a
        step that computes). Under a simulated device (layer-wise mode) each layer is read once its
        wait returned; a copy into the cache must wait for the forward."""
        if not out.num_scheduled_tokens:
            return
        bs, w = self.block_size, self.worker
        work = [(prefix_values(req.all_token_ids[: start + n]), self.block_ids(req.request_id), start, n)
                for req, start, n in self._scheduled(out)]
        for i, (name, layer) in enumerate(self.kv.items()):
            self._layer_phase("before", name)
            w.wait_for_layer_load(name)
            self._layer_phase("loaded", name)
            if self.sim is not None and self.layerwise:
                self.sim.reads([layer])
            for values, ids, start, n in work:
                for pos in range(start, start + n):
                    layer[ids[pos // bs], pos % bs] = values[pos] + 0.5 * i
            w.save_kv_layer(name, layer, None)
            self._layer_phase("saved", name)
        if self.sim is not None:
            self.sim.read_done(list(self.kv.values()))

    def _layer_phase(self, phase: str, name: str) -> None:
        if self.layer_hook is not None:
            self.layer_hook(phase, name)

    def expected_blocks(self, prompt: list[int], start: int, end: int) -> torch.Tensor:
        """The bundle ``[layers, blocks, *block]`` the forward writes for tokens ``start..end``."""
        values = torch.tensor(prefix_values(prompt[:end])[start:end]).view(-1, self.block_size)
        shape = (len(self.kv), values.shape[0], self.block_size, 2, HEADS, HEAD_SIZE)
        out = torch.empty(shape)
        for i in range(len(self.kv)):
            out[i] = (values + 0.5 * i).view(values.shape[0], self.block_size, 1, 1, 1).expand(shape[1:])
        return out

    def _check(self, out: SchedulerOutput, invalid: set[int]) -> None:
        """Every token vLLM counts as computed after this step holds its own KV, unless its block is
        one the worker reported failed (vLLM rolls the request back and recomputes it)."""
        bs = self.block_size
        for req, start, n in self._scheduled(out):
            ids = self.block_ids(req.request_id)
            values = prefix_values(req.all_token_ids[: start + n])
            for pos in range(start + n):
                if ids[pos // bs] in invalid:
                    continue
                for i, layer in enumerate(self.kv.values()):
                    got = layer[ids[pos // bs], pos % bs]
                    if not bool((got == values[pos] + 0.5 * i).all()):
                        self.wrong.append(f"{req.request_id}: token {pos} (block {ids[pos // bs]}, layer {i})")
                        break

    def _runner_output(self, out: SchedulerOutput, step: Step, stats) -> ModelRunnerOutput:
        """What the model runner returns: a token for each request whose prompt is done, none for a
        partial prefill; the worker's load errors and stats."""
        kv_out = KVConnectorOutput(finished_recving=set(step.recving or ()), invalid_block_ids=step.invalid,
                                   kv_connector_stats=stats)
        rids = list(out.num_scheduled_tokens)
        if not rids:  # vLLM's model runner: kv_connector_no_forward
            return ModelRunnerOutput.with_kv_conn_output_only(kv_out)
        sampled = []
        for req, start, n in self._scheduled(out):
            sampled.append([SAMPLED] if start + n >= req.num_tokens else [])
        return ModelRunnerOutput(
            req_ids=rids, req_id_to_index={r: i for i, r in enumerate(rids)}, sampled_token_ids=sampled,
            logprobs=None, prompt_logprobs_dict={}, pooler_output=None, kv_connector_output=kv_out)

    def _record(self, outputs: dict) -> None:
        """The tokens vLLM delivered (a step vLLM rolled back for a failed load delivers none)."""
        for engine_outputs in outputs.values():
            for o in engine_outputs.outputs:
                self.generated.setdefault(o.request_id, []).extend(o.new_token_ids)

    # ------------------------------------------------------------------ the end
    def close(self) -> None:
        for conn in (self.worker, self.scheduler_connector):
            conn.shutdown()


@contextmanager
def _misses(n: int):
    yield [None] * n


class GatedStore:
    """Wraps the worker's store reads (``lease_many``, ``get_into``) so a test decides when they
    may go on: each read waits for ``gate``; ``entered`` is set once a read is waiting. ``fail``
    makes reads find nothing. A read on the step's own thread (a load that stalls the batch) is
    refused at once with an AssertionError instead of waiting. Installed on the shared engine
    object, undone by ``remove``."""

    def __init__(self, store):
        self.store = store
        self.gate, self.entered = threading.Event(), threading.Event()
        self.fail = False
        self.reads = 0
        self._lease_many, self._get_into = store.lease_many, store.get_into
        store.lease_many, store.get_into = self._gated_lease_many, self._gated_get_into

    def _wait(self) -> None:
        assert threading.current_thread() is not threading.main_thread(), "a store read stalled the step"
        self.reads += 1
        self.entered.set()
        assert self.gate.wait(timeout=60), "the test never opened the gate"

    def _gated_lease_many(self, keys, **kw):
        self._wait()
        return _misses(len(keys)) if self.fail else self._lease_many(keys, **kw)

    def _gated_get_into(self, key, out, **kw):
        self._wait()
        return False if self.fail else self._get_into(key, out, **kw)

    def remove(self) -> None:
        self.gate.set()
        del self.store.lease_many, self.store.get_into


class GatedPuts:
    """Holds the store's puts (the saver's thread) until ``gate`` is set; ``entered`` is set once a
    put is waiting. Undone by ``remove``."""

    def __init__(self, store):
        self.store = store
        self.gate, self.entered = threading.Event(), threading.Event()
        self._put, self._put_many = store.put, store.put_many
        store.put, store.put_many = self._gated_put, self._gated_put_many

    def _wait(self) -> None:
        self.entered.set()
        assert self.gate.wait(timeout=60), "the test never opened the gate"

    def _gated_put(self, key, value):
        self._wait()
        return self._put(key, value)

    def _gated_put_many(self, items):
        self._wait()
        return self._put_many(items)

    def remove(self) -> None:
        self.gate.set()
        del self.store.put, self.store.put_many


class _GatedHandler(socketserver.StreamRequestHandler):
    """strata.kv.lookup's wire format, answered from the store once the server's gate is open."""

    def handle(self) -> None:
        srv = self.server
        try:
            while True:
                head = self.rfile.read(4)
                if len(head) < 4:
                    return
                (n,) = struct.unpack(">I", head)
                keys = []
                for _ in range(n):
                    (size,) = struct.unpack(">I", self.rfile.read(4))
                    keys.append(Key.decode(self.rfile.read(size)))
                srv.asked.set()
                if not srv.gate.wait(timeout=60):
                    return
                self.wfile.write(bytes(srv.store.contains_many(keys)))
                self.wfile.flush()
                srv.answered += 1
        except (ConnectionError, OSError):
            return


class _GatedServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class GatedLookupServer:
    """A lookup server in place of the worker's (which the scheduler would ask directly, in the
    same process) that answers only once ``gate`` is set: the scheduler's lookup then has to wait
    on a socket, as when the worker lives in another process. ``asked`` is set once a lookup came in."""

    def __init__(self, h: Harness):
        half = h.worker.worker_half
        if half._lookup_server is not None:
            half._lookup_server.close()
            half._lookup_server = None
        self.path = h.scheduler_connector.scheduler_half.ctx.lookup_path
        self._server = _GatedServer(self.path, _GatedHandler)
        self._server.store, self._server.gate, self._server.asked = h.store, threading.Event(), threading.Event()
        self._server.answered = 0
        self.gate, self.asked = self._server.gate, self._server.asked
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def answered(self) -> int:
        return self._server.answered

    def close(self) -> None:
        self.gate.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
        assert not self._thread.is_alive()
        Path(self.path).unlink(missing_ok=True)
