"""The connector's worker half: it moves the bytes the scheduler half planned.

Loads are asynchronous by default: vLLM parks the request (WAITING_FOR_REMOTE_KVS) while the
others keep stepping. A ``Loader`` thread reads its chunks from the store (a host cache takes them
straight from the store's bytes into its blocks; a device cache gets them in pinned host bundles,
which the step's thread then copies into the blocks on a side stream, after an event, never a host
synchronisation). ``finished`` reports the request once every byte is in its blocks; a chunk that
fails, and every chunk after it in its request, is reported as load errors (vLLM recomputes them).
A request that finishes while its load runs is cancelled, but reported only once nothing of its
load can still write its blocks: vLLM frees them only then. A synchronous load (``strata.load_async:
false``, or a spec made by hand) is done before the forward, as before; with ``strata.layerwise:
true`` it is started before the forward and released to it layer by layer (``vllm_layerwise``).

Saves: each chunk to save is copied out of the paged cache (on a device: on the side stream,
after an event of the forward, the compute stream waiting for the copies' event in turn, so a block
is reused only once it was read) into a host bundle, then put by one background thread. One bound
(``strata.max_pending_saves``) covers every save from the copy to the put, and one counter
(``saves_dropped``) what it turned away. In layer-wise mode each chunk's layers are copied out as
the forward hands them over (``save_kv_layer``), under the same bound and into the same bundle.

It also holds the KV cache tensors (given back around sleep), serves the scheduler's lookups from
the rank-0 worker, and counts what it moved for vLLM's stats.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch.profiler import record_function

from strata import streams
from strata.errors import StoreError
from strata.kv.lookup import LookupServer
from strata.kv.paged import PagedKV
from strata.kv.vllm_context import Context
from strata.kv.vllm_layerwise import LayerwiseLoad, LayerwiseSave
from strata.kv.vllm_meta import BlockSpan, LoadSpec, StrataConnectorMetadata
from strata.kv.vllm_metrics import COUNTERS, MAX_TIMINGS, TIMINGS
from strata.timeline import profiling as _profiling

log = logging.getLogger("strata.kv")

STORE_STATS_EVERY_S = 5.0  # the worker also sends the store's stats this often without KV traffic
SAVE_BATCH = 16  # queued saves the saver takes at once (one lookup round trip for all of them)


def _range(name: str):
    """A ``torch.profiler`` range around a step's KV work, only while a profiler records."""
    return record_function(name) if _profiling() else nullcontext()


def _warn_misfit(span: BlockSpan, e: StoreError) -> None:
    log.warning("strata: KV chunk %s does not fit this cache (%s); recomputed", span.chunk.key.name[:16], e)


# ====================================================================== saves
class SaveQueue:
    """Every save from its copy out of the cache to its put into the store, under one bound: a
    copy still running on the device (``gathering``, the step's thread only), a chunk waiting for
    the saver thread, the chunks being put. When ``bound`` are pending, a new save is dropped and
    counted (``saves_dropped``): back-pressure never grows memory or stalls a step."""

    def __init__(self, store, bound: int, counters: dict, timings: dict):
        self.store, self.bound, self.counters, self.timings = store, bound, counters, timings
        self._gathering: deque = deque()  # (chunk, bundle, event), in the order the copies were issued
        self._cond = threading.Condition()
        self._ready: deque = deque()  # (chunk, bundle) for the saver thread
        self._busy = 0
        self._stop = False
        self._thread: threading.Thread | None = None

    def room(self) -> int:
        with self._cond:
            return self.bound - len(self._gathering) - len(self._ready) - self._busy

    def drop(self, n: int) -> None:
        self.counters["saves_dropped"] += n

    def add(self, chunk, bundle: torch.Tensor, event) -> None:
        """A save whose copy was issued; ``event`` fires once ``bundle`` holds the blocks (None: it
        already does)."""
        if event is None:
            self._hand_over([(chunk, bundle)])
        else:
            self._gathering.append((chunk, bundle, event))

    def poll(self) -> None:
        """Hand the saves whose copies have completed to the saver (never waits)."""
        done = []
        while self._gathering and self._gathering[0][2].query():
            chunk, bundle, _ = self._gathering.popleft()
            done.append((chunk, bundle))
        self._hand_over(done)

    def _hand_over(self, items: list) -> None:
        if not items:
            return
        with self._cond:
            self._ready.extend(items)
            self._cond.notify_all()
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="strata-kv-saver", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._ready and not self._stop:
                    self._cond.wait()
                if not self._ready:
                    return
                batch = [self._ready.popleft() for _ in range(min(SAVE_BATCH, len(self._ready)))]
                self._busy += len(batch)
            try:
                self._put_many(batch)
            finally:
                with self._cond:
                    self._busy -= len(batch)
                    self._cond.notify_all()

    def _put_many(self, batch: list) -> None:
        """Put the chunks the store does not hold yet (another request may have saved one since the
        scheduler planned it)."""
        try:
            held = self.store.contains_many([chunk.key for chunk, _ in batch])
        except Exception:  # a lookup that fails: put them all
            held = [False] * len(batch)
        todo = [(chunk, bundle) for (chunk, bundle), have in zip(batch, held) if not have]
        if not todo:
            return
        t0 = time.perf_counter()
        try:  # one batch: a backing tier takes the chunks in round trips of many
            oks = self.store.put_many([(chunk.key, bundle) for chunk, bundle in todo])
        except Exception:  # e.g. one chunk larger than every tier: each on its own, so the others go
            for chunk, bundle in todo:
                self._put(chunk, bundle)
            return
        share = (time.perf_counter() - t0) / len(todo)
        for (chunk, bundle), ok in zip(todo, oks):
            self._count_save(chunk, bundle, ok, share)

    def _count_save(self, chunk, bundle: torch.Tensor, ok: bool, elapsed: float) -> None:
        if ok:
            self.counters["chunks_saved"] += 1
            self.counters["tokens_saved"] += chunk.end - chunk.start
            self.counters["bytes_saved"] += bundle.numel() * bundle.element_size()
            self.counters["save_seconds"] += elapsed
            self.timings["save_times"].append(elapsed)
        else:  # the store is full of what it may not evict: a future miss
            self.counters["saves_rejected"] += 1

    def _put(self, chunk, bundle: torch.Tensor) -> None:
        t0 = time.perf_counter()
        try:
            ok = self.store.put(chunk.key, bundle)
            self._count_save(chunk, bundle, ok, time.perf_counter() - t0)
        except StoreError as e:  # e.g. a chunk larger than every tier
            self.counters["saves_rejected"] += 1
            if self.counters["saves_rejected"] == 1:
                log.warning("strata: a KV chunk cannot be stored (%s); such saves are dropped", e)
        except Exception:  # a failing save is a future miss, never an error in serving
            log.exception("strata: saving a KV chunk failed")

    def flush(self) -> None:
        """Wait until every pending save has reached the store (the step's thread only)."""
        while self._gathering:
            chunk, bundle, event = self._gathering.popleft()
            event.synchronize()
            self._hand_over([(chunk, bundle)])
        with self._cond:
            while self._ready or self._busy:
                self._cond.wait()
        self.store.flush()

    def close(self) -> None:
        self.flush()
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None


# ====================================================================== asynchronous loads
class LoadJob:
    """One request's asynchronous load, from the metadata to its report in ``finished``."""

    def __init__(self, req_id: str, spans: list[BlockSpan], paged: PagedKV | None):
        self.req_id, self.spans, self.paged = req_id, spans, paged
        self.cancelled = False  # its request finished: write nothing more, report nothing failed
        self.read = False  # the loader thread is done with it
        self.written: list[int] = []  # bytes of each leading span in its blocks (or copied there)
        self.bundles: list[torch.Tensor] = []  # a device cache's host bundles, until their copies are done
        self.copied = None  # the event after its copies (a device cache), None before they are issued
        self.seconds = 0.0

    def done(self) -> bool:
        """Whether nothing of this load can still write its blocks (the step's thread only)."""
        if not self.read or (self.bundles and self.copied is None):  # read, but its copies not issued yet
            return False
        return self.copied is None or self.copied.query()


class Loader:
    """Reads asynchronous loads on one background thread, in the order they came. A host cache's
    chunks are written into their blocks here (a plain copy from the store's bytes); a device
    cache's are read into pinned host bundles, copied into the blocks by the step's thread."""

    def __init__(self, store):
        self.store = store
        self._cond = threading.Condition()
        self._queue: deque[LoadJob] = deque()
        self._current: LoadJob | None = None
        self._stop = False
        self._thread: threading.Thread | None = None

    def submit(self, job: LoadJob) -> None:
        with self._cond:
            self._queue.append(job)
            self._cond.notify_all()
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="strata-kv-loader", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if not self._queue:
                    return
                job = self._current = self._queue.popleft()
            t0 = time.perf_counter()
            try:
                if not job.cancelled and job.paged is not None:
                    self._run(job)
            except Exception:  # the rest of the load fails (recomputed), never the step
                log.exception("strata: loading KV chunks failed; recomputed")
            finally:
                with self._cond:
                    job.seconds = time.perf_counter() - t0
                    job.read, self._current = True, None
                    self._cond.notify_all()

    def _run(self, job: LoadJob) -> None:
        keys = [s.chunk.key for s in job.spans]
        paged = job.paged
        if not paged.dev.is_async_device(paged.device):
            with self.store.lease_many(keys) as views:
                for span, view in zip(job.spans, views):
                    if job.cancelled or view is None or not self._scatter(paged, span, view):
                        return
                    job.written.append(view.numel() * view.element_size())
            return
        self.store.prefetch(keys)  # a remote tier's chunks come up in a few round trips
        for span in job.spans:
            if job.cancelled:
                return
            bundle = paged.host_bundle(len(span.block_ids))
            try:
                if not self.store.get_into(span.chunk.key, bundle):
                    return
            except StoreError as e:
                _warn_misfit(span, e)
                return
            job.bundles.append(bundle)

    @staticmethod
    def _scatter(paged: PagedKV, span: BlockSpan, view: torch.Tensor) -> bool:
        try:
            paged.scatter(view, span.block_ids, first=span.skip)
            return True
        except StoreError as e:
            _warn_misfit(span, e)
            return False

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every job submitted so far has been read (or cancelled); whether they were."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queue or self._current is not None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self) -> None:
        with self._cond:
            for job in self._queue:
                job.cancelled = True
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None


# ====================================================================== the worker half
class WorkerHalf:
    """The worker's connector: carries out the scheduler's plan against this rank's KV cache; it
    decides nothing about which chunks or blocks, so every rank moves exactly what was planned."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.paged: PagedKV | None = None
        self.kv_caches: dict[str, torch.Tensor] | None = None  # kept across sleep (vLLM 0.33)
        self.dev = streams.active()
        self._stream = None  # the side stream of loads' and saves' copies (a device cache)
        self._failed: set[int] = set()
        self.counters = dict.fromkeys(COUNTERS, 0)
        self._reported = dict(self.counters)  # what vLLM's stats have already been told
        self._timings = {k: deque(maxlen=MAX_TIMINGS) for k in TIMINGS}  # appended by two threads: deques
        self._store_stats_at = float("-inf")
        self.saves = SaveQueue(ctx.store, ctx.max_pending_saves, self.counters, self._timings)
        self.loader = Loader(ctx.store)
        self._jobs: list[LoadJob] = []  # asynchronous loads not reported finished yet, in order
        self._lookup_server: LookupServer | None = None
        self._layer_index: dict[str, int] = {}  # layer name -> its index in ``paged``
        self._layer_reader: ThreadPoolExecutor | None = None  # reads layer-wise loads
        self._layer_load: LayerwiseLoad | None = None  # this step's, until the step ends
        self._layer_save: LayerwiseSave | None = None  # this step's, until ``wait_for_save``
        self._retiring: list[LayerwiseLoad] = []  # finished, their device copies maybe still running
        self.layer_waits = 0  # wait_for_layer_load calls that waited on a layer-wise load (tests)
        self._failed_at: dict[str, int] = {}  # this step's synchronous loads that failed: request -> token

    # ------------------------------------------------------------------ the KV cache, and sleep
    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.kv_caches = kv_caches
        self.dev = streams.active()
        self.paged = self._paged_kv(kv_caches)
        if self.ctx.rank == 0 and self._lookup_server is None:
            try:
                self._lookup_server = LookupServer(self.ctx.store, self.ctx.lookup_path)
            except OSError as e:  # the scheduler then sees only the tiers shared between processes
                log.warning("strata: cannot serve KV lookups at %s (%s)", self.ctx.lookup_path, e)

    def _paged_kv(self, kv_caches: dict[str, torch.Tensor]) -> PagedKV:
        names = [n for n in self.ctx.layer_names if n in kv_caches]
        self._layer_index = {n: i for i, n in enumerate(names)}
        paged = PagedKV([kv_caches[n] for n in names], num_blocks=self.ctx.num_blocks, dev=self.dev)
        if self.dev.is_async_device(paged.device) and self._stream is None:
            self._stream = self.dev.new_stream(paged.device)
        return paged

    @property
    def _on_device(self) -> bool:
        return self.paged is not None and self._stream is not None

    def unregister(self) -> None:
        """Before sleep frees the KV cache: cancel the loads in flight (their requests were aborted;
        they are still reported finished), wait until none can write the cache, let go of the cache
        tensors and the staging bundle, so no load or save writes into or reads from memory that is
        no longer mapped (every step returns early without ``paged``), and forget load errors of
        requests that sleep aborted. Saves already copied out still reach the store. Idempotent."""
        if self.paged is None:
            return
        self._end_layer_load()
        self._layer_save = None
        for job in self._jobs:
            job.cancelled = True
        self.loader.wait_idle(timeout=30)
        if self.dev.is_async_device(self.paged.device):  # no copy of ours may still run into the cache
            self.dev.synchronize(self.paged.device)
        self.paged = None
        self._failed.clear()

    def restore(self) -> None:
        """After wake-up: the same cache tensors again (sleep keeps their addresses, not their bytes,
        and vLLM has reset its prefix cache, so Strata loads only what the store holds) with a new,
        empty staging bundle. Idempotent; nothing to do before the first ``register``."""
        if self.paged is None and self.kv_caches is not None:
            self.paged = self._paged_kv(self.kv_caches)

    # ------------------------------------------------------------------ loads
    def load(self, meta) -> None:
        """Synchronous loads now, before the forward; asynchronous ones handed to the loader."""
        if isinstance(meta, StrataConnectorMetadata) and meta.loads:
            with _range("strata.kv.load"):
                sync = [spec for spec in meta.loads if not spec.is_async]
                if sync and self.paged is not None:
                    if self.ctx.layerwise:
                        self._start_layer_load(sync)
                    else:
                        self._load_step(sync)
                for spec in meta.loads:
                    if spec.is_async:
                        self._submit(spec)
        self._advance()

    def _submit(self, spec: LoadSpec) -> None:
        job = LoadJob(spec.req_id, spec.planned(self.ctx.block_size), self.paged)
        self._jobs.append(job)
        if self.paged is None:  # asleep: nothing to load into; reported failed at once
            job.read = True
        else:
            self.loader.submit(job)

    def _advance(self) -> None:
        """The step's thread moves every asynchronous load on without waiting: issues the copies of
        a device cache's bundles once they were read, and hands completed saves to the saver."""
        self.saves.poll()
        if not self._on_device:
            return
        self._retiring = [load for load in self._retiring if not load.retired()]
        for job in self._jobs:
            if job.read and job.copied is None and job.bundles:
                if job.cancelled:
                    job.bundles = []
                else:
                    self._copy_in(job)

    def _copy_in(self, job: LoadJob) -> None:
        """Copy the read bundles into the job's blocks on the side stream, after everything the
        compute stream issued so far (the blocks' previous user), and record the event that says
        they are in."""
        dev, side = self.dev, self._stream
        issued = dev.event()
        issued.record(dev.current_stream(self.paged.device))
        copied = dev.event()
        with dev.stream(side):
            side.wait_event(issued)
            for span, bundle in zip(job.spans, job.bundles):
                try:
                    job.paged.copy_in(bundle, span.block_ids, first=span.skip)
                except StoreError as e:
                    _warn_misfit(span, e)
                    break
                job.written.append(bundle.numel() * bundle.element_size())
            copied.record(side)
        job.copied = copied

    def finished(self, finished_req_ids: set[str]) -> set[str]:
        """The requests whose asynchronous load is complete (every byte in its blocks, or nothing
        more that can be written): their failed blocks go to ``load_errors`` for this very step.
        Loads of requests in ``finished_req_ids`` (finished or aborted meanwhile) are cancelled."""
        self._end_layer_load()
        if finished_req_ids:
            for job in self._jobs:
                if job.req_id in finished_req_ids:
                    job.cancelled = True
        self._advance()
        done = set()
        keep = []
        for job in self._jobs:
            if job.done():
                self._account(job)
                done.add(job.req_id)
            else:
                keep.append(job)
        self._jobs = keep
        return done

    def _account(self, job: LoadJob) -> None:
        """Count a completed load; its blocks past the last chunk written are load errors (unless
        its request is gone)."""
        job.bundles = []
        n = len(job.written)
        for span, nbytes in zip(job.spans, job.written):
            self.counters["chunks_loaded"] += 1
            self.counters["tokens_loaded"] += span.tokens
            self.counters["bytes_loaded"] += nbytes
        if not job.cancelled:
            for span in job.spans[n:]:
                self._failed.update(span.new_block_ids)
                self.counters["chunks_failed"] += 1
        if n:
            self.counters["load_seconds"] += job.seconds
            self._timings["load_times"].append(job.seconds)

    def wait_loads(self, timeout: float | None = None) -> bool:
        """Wait until the loader has read every load handed to it (tests); whether it has."""
        return self.loader.wait_idle(timeout)

    # ------------------------------------------------------------------ synchronous loads
    def _load_step(self, specs: list[LoadSpec]) -> None:
        t0 = time.perf_counter()
        plans = [spec.planned(self.ctx.block_size) for spec in specs]
        with self._sources([s.chunk.key for spans in plans for s in spans]) as sources:
            views = iter(sources)
            for spec, spans in zip(specs, plans):
                self._note_failure(spec.req_id, self._load_request(spans, views))
        elapsed = time.perf_counter() - t0
        self.counters["load_seconds"] += elapsed
        self._timings["load_times"].append(elapsed)

    def _note_failure(self, req_id: str, token: int | None) -> None:
        """A synchronous load of ``req_id`` failed from ``token`` on (None: it did not)."""
        if token is not None:
            self._failed_at[req_id] = min(token, self._failed_at.get(req_id, token))

    def _load_request(self, spans: list[BlockSpan], views) -> int | None:
        """One request's chunks, in order: after the first that fails, none is loaded (vLLM
        recomputes from there), and every block from there on is reported. The first token of the
        first chunk that failed, None if none did."""
        failed = None
        for span in spans:
            view = next(views)
            loaded = 0 if failed is not None else self._load(span, view)
            if not loaded:
                failed = span.chunk.start if failed is None else failed
                self._failed.update(span.new_block_ids)
                self.counters["chunks_failed"] += 1
                continue
            self.counters["chunks_loaded"] += 1
            self.counters["tokens_loaded"] += span.tokens
            self.counters["bytes_loaded"] += loaded
        return failed

    @contextmanager
    def _sources(self, keys: list):
        """What a step's chunks load from, one batch for all of them (a remote tier's chunks come
        up in a few round trips). A cache in host memory gets views of the store's bytes, leased
        for the step; a device cache (one the device seam runs streams for) gets no views: each
        chunk goes through its staging bundle."""
        if not self._on_device:
            with self.ctx.store.lease_many(keys) as views:
                yield views
        else:
            self.ctx.store.prefetch(keys)
            yield [None] * len(keys)

    def _load(self, span: BlockSpan, view: "torch.Tensor | None") -> int:
        """Write a stored chunk into its new blocks; the bytes loaded, 0 on a miss or a bundle of
        another shape or dtype (the store's checks name which). A cache in host memory scatters
        straight from the leased ``view`` (None: a miss); a device cache takes one copy into its
        staging bundle (from pinned memory on a GPU), then scatters on the device."""
        ids, skip = span.block_ids, span.skip
        try:
            if not self._on_device:
                if view is None:
                    return 0
                self.paged.scatter(view, ids, first=skip)
                return view.numel() * view.element_size()
            bundle = self.paged.staging(len(ids))
            if not self.ctx.store.get_into(span.chunk.key, bundle):
                return 0
            self.paged.scatter(bundle, ids, first=skip)
            return bundle.numel() * bundle.element_size()
        except StoreError as e:
            _warn_misfit(span, e)
            return 0

    def load_errors(self) -> set[int]:
        """The blocks that failed to load since the last call (vLLM recomputes them)."""
        self._end_layer_load()
        failed, self._failed = self._failed, set()
        return failed

    # ------------------------------------------------------------------ layer-wise loads
    def _start_layer_load(self, specs: list[LoadSpec]) -> None:
        """Start reading this step's loads; ``wait_layer`` releases them to the forward layer by layer."""
        self._end_layer_load()  # a step that was never ended (defensive): its load first
        if self._layer_reader is None:
            self._layer_reader = ThreadPoolExecutor(1, thread_name_prefix="strata-kv-layerwise")
        requests = [spec.planned(self.ctx.block_size) for spec in specs]
        self._layer_load = LayerwiseLoad(requests, self.paged, self.ctx.store, self._layer_reader, self._stream,
                                         owners=[spec.req_id for spec in specs])

    def wait_layer(self, layer_name: str) -> None:
        """``wait_for_layer_load``: nothing to wait for outside layer-wise mode, in a step without a
        layer-wise load, or for a layer this connector does not hold."""
        load = self._layer_load
        i = self._layer_index.get(layer_name)
        if load is not None and i is not None:
            self.layer_waits += 1
            load.wait(i)

    def _end_layer_load(self) -> None:
        """The step's layer-wise load, finished (every layer in, or ordered before any later work
        on a device) and counted: its failed chunks' blocks become load errors for this step."""
        load, self._layer_load = self._layer_load, None
        if load is None:
            return
        load.finish()
        for span, nbytes in load.loaded():
            self.counters["chunks_loaded"] += 1
            self.counters["tokens_loaded"] += span.tokens
            self.counters["bytes_loaded"] += nbytes
        for span in load.failed:
            self._failed.update(span.new_block_ids)
            self.counters["chunks_failed"] += 1
        for req_id, token in load.failed_from().items():
            self._note_failure(req_id, token)
        self.counters["load_seconds"] += load.seconds
        self._timings["load_times"].append(load.seconds)
        if self._on_device:
            self._retiring.append(load)  # its host bundles live until its copies have run

    # ------------------------------------------------------------------ saves
    def save(self, meta) -> None:
        """``wait_for_save``: the step's saves go to the save queue (in layer-wise mode, the chunks
        the forward's layers were copied into); the step's layer-wise load, if any, is finished."""
        layered, self._layer_save = self._layer_save, None
        self._end_layer_load()
        if isinstance(meta, StrataConnectorMetadata) and meta.saves and self.paged is not None:
            unsafe = self._computed_on_failed_loads(meta)
            with _range("strata.kv.save"):
                if self.ctx.layerwise:
                    for chunk, bundle, event in (layered or self._start_layer_save(meta)).finish():
                        if chunk.key in unsafe:
                            self.counters["chunks_skipped"] += 1
                        else:
                            self.saves.add(chunk, bundle, event)
                else:
                    self._queue_saves(meta, unsafe)
        self._failed_at = {}
        self.saves.poll()

    def _computed_on_failed_loads(self, meta: StrataConnectorMetadata) -> set:
        """Keys of the step's chunks to save that its forward computed on top of a synchronous load
        that failed in this step (their bytes are wrong: vLLM drops them and recomputes, and the
        recomputation saves them)."""
        failed = self._failed_at
        return {c.key for spec in meta.saves if spec.req_id in failed
                for c in spec.chunks if c.end > failed[spec.req_id]}

    def save_layer(self, layer_name: str, meta) -> None:
        """``save_kv_layer`` (layer-wise mode): copy this layer of each chunk to save out of the
        cache now, the forward having written it; the chunks go to the save queue at ``save``."""
        i = self._layer_index.get(layer_name)
        if (not self.ctx.layerwise or i is None or self.paged is None
                or not isinstance(meta, StrataConnectorMetadata) or not meta.saves):
            return
        if self._layer_save is None:
            self._layer_save = self._start_layer_save(meta)
        self._layer_save.layer(i)

    def _start_layer_save(self, meta: StrataConnectorMetadata) -> LayerwiseSave:
        return LayerwiseSave(self._save_spans(meta), self.paged, self._stream)

    def _queue_saves(self, meta: StrataConnectorMetadata, unsafe: set) -> None:
        """Copy each whole chunk to save out of the cache (as many as the queue has room for; the
        rest are dropped and counted), but those in ``unsafe`` (skipped and counted)."""
        spans = self._save_spans(meta, unsafe)
        if not spans:
            return
        if not self._on_device:  # a host cache: a plain copy, the blocks may be reused after this step
            for span in spans:
                self.saves.add(span.chunk, self.paged.gather(span.block_ids), None)
            return
        self._copy_out(spans)

    def _save_spans(self, meta: StrataConnectorMetadata, unsafe: set = frozenset()) -> list[BlockSpan]:
        """The step's whole chunks to save, as many as the queue has room for (the chunks short of
        their blocks or in ``unsafe`` are skipped, those beyond the room dropped, all counted)."""
        bs = self.ctx.block_size
        spans = []
        for spec in meta.saves:
            for span in spec.planned(bs):
                if len(span.block_ids) * bs != span.chunk.end - span.chunk.start or span.chunk.key in unsafe:
                    self.counters["chunks_skipped"] += 1
                else:
                    spans.append(span)
        room = max(0, self.saves.room())
        if len(spans) > room:
            self.saves.drop(len(spans) - room)
            spans = spans[:room]
        return spans

    def _copy_out(self, spans: list[BlockSpan]) -> None:
        """On the side stream, after the forward that wrote the blocks: copy each chunk into a pinned
        host bundle; the compute stream waits for those copies before it runs on (and may reuse)
        the blocks; the saver gets each bundle once the copies' event has fired."""
        dev, side, paged = self.dev, self._stream, self.paged
        compute = dev.current_stream(paged.device)
        written = dev.event()
        written.record(compute)
        copied = dev.event()
        bundles = []
        with dev.stream(side):
            side.wait_event(written)
            for span in spans:
                bundle = paged.host_bundle(len(span.block_ids))
                paged.copy_out(span.block_ids, bundle)
                bundles.append(bundle)
            copied.record(side)
        compute.wait_event(copied)
        for span, bundle in zip(spans, bundles):
            self.saves.add(span.chunk, bundle, copied)

    # ------------------------------------------------------------------ stats and the end
    def stats_delta(self) -> dict[str, Any]:
        """What changed since the last call: counter deltas, the timings seen, and (sometimes) the
        store's own stats under ``store``."""
        now = dict(self.counters)
        data: dict[str, Any] = {k: now[k] - self._reported[k] for k in COUNTERS}
        self._reported = now
        for key, seen in self._timings.items():
            data[key] = [seen.popleft() for _ in range(len(seen))]
        store = self._store_stats(moved=any(data[k] for k in COUNTERS))
        if store is not None:
            data["store"] = {str(self.ctx.rank): store}
        return data

    def _store_stats(self, moved: bool) -> dict | None:
        """The store's stats, once the worker holds a KV cache, when KV moved in this step (a step
        that moved chunks can afford one ``stats()``) or every STORE_STATS_EVERY_S; else None.
        Never raises."""
        if self.kv_caches is None:
            return None
        now = time.monotonic()
        if not moved and now - self._store_stats_at < STORE_STATS_EVERY_S:
            return None
        self._store_stats_at = now
        try:
            return self.ctx.store.stats()
        except Exception as e:  # a metric must never fail a step
            log.warning("strata: the store's stats could not be read for vLLM's metrics (%s)", e)
            return None

    def flush(self) -> None:
        self.saves.flush()

    def close(self) -> None:
        if self._lookup_server is not None:
            self._lookup_server.close()
            self._lookup_server = None
        self._end_layer_load()
        if self._layer_reader is not None:
            self._layer_reader.shutdown(wait=True)
            self._layer_reader = None
        for job in self._jobs:
            job.cancelled = True
        self.loader.close()
        self.saves.close()
