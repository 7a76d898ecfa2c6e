"""The connector's layer-wise mode (``strata.layerwise: true``): a step's loads are released to the
forward layer by layer, and its saves are gathered layer by layer as the forward finishes each.

vLLM (0.32, CPU and GPU builds alike) wraps every attention layer's op: ``wait_for_layer_load(name)``
before it runs, ``save_kv_layer(name, ...)`` after (``maybe_transfer_kv_layer``). In this mode a hit
is a synchronous load from the scheduler's view: vLLM schedules the request in the very step that
allocated its blocks, and ``start_load_kv`` only starts the load; layer ``i``'s attention waits for
layer ``i``'s blocks alone, so it computes while later layers are still being written.

The chunk format is the normal mode's (one bundle per chunk, every layer in it): a chunk saved in
one mode loads in the other. Layer 0 needs every chunk's layer 0, so every chunk must have been read
before layer 0 can be released: the reads run whole (one per chunk) on a background thread, and the
pipelining is in the scatter. ``LayerwiseLoad``:

- a cache in host memory (vLLM's CPU build): the thread leases every chunk from the store, checks
  each, then scatters layer 0 of every chunk, sets layer 0's event, scatters layer 1, ... ; layer
  ``i``'s wait is that event (the forward's layer 0 runs while the thread writes layer 1).
- a device cache (GPU): the thread reads every chunk into a pinned host bundle; the first layer
  wait takes the bundles and issues every layer's copies on the side stream (after an event of the
  compute stream recorded at ``start_load_kv``), one event per layer; layer ``i``'s wait makes the
  compute stream wait for layer ``i``'s event, never the host.

Failures. A chunk that misses, fails its checksum (the store drops it) or does not fit the cache
is found by the read, before layer 0 is released, as every failure the store can report is: that
chunk and every later chunk of its request are not written and are reported through
``get_block_ids_with_load_errors`` in the same step. vLLM's contract for synchronous loads (the
only loads a layer-wise connector has) takes such a report after the forward: its scheduler drops
that step's output of the request and rolls ``num_computed_tokens`` back to the first failed
block (``_update_requests_with_invalid_blocks``), so a forward that ran on those blocks never
reaches the user, and the blocks are recomputed. That is also the answer to the hard case, a
failure after some layers were released (an error while writing layer ``k``): every block of
every chunk of the step's layer-wise load is reported, the waits of the layers left are released
at once, and vLLM recomputes all of it: a wrong byte may be computed on, never served. (LMCache's
layer-wise mode, by contrast, only logs a short retrieval.)

The step's end (``wait_for_save``, or ``get_finished`` / ``get_block_ids_with_load_errors`` when
vLLM defers ``wait_for_save``) finishes the load: every layer written (or, on a device, the compute
stream waiting for the last copies), whether or not the forward waited for each layer.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from strata.errors import StoreError
from strata.kv.paged import PagedKV
from strata.kv.vllm_meta import BlockSpan

log = logging.getLogger("strata.kv")


def _misfit(span: BlockSpan, e: StoreError) -> None:
    log.warning("strata: KV chunk %s does not fit this cache (%s); recomputed", span.chunk.key.name[:16], e)


class LayerwiseLoad:
    """One step's synchronous loads (``requests``: each request's spans, in order), read on
    ``pool``'s thread and released layer by layer (see the module docstring). Built, waited for and
    finished on the step's thread."""

    def __init__(self, requests: list[list[BlockSpan]], paged: PagedKV, store, pool: ThreadPoolExecutor, side=None,
                 owners: list[str] | None = None):
        self.requests, self.paged, self.store, self.side = requests, paged, store, side
        self.owners = owners if owners is not None else [str(i) for i in range(len(requests))]  # request ids
        self.dev = paged.dev
        n = len(paged.layers)
        self.ready = [threading.Event() for _ in range(n)]  # a host cache: layer i is in its blocks
        self.good: list[tuple[BlockSpan, torch.Tensor]] = []  # chunks read and checked, with their bytes
        self.failed: list[BlockSpan] = []  # chunks not written (reported as load errors)
        self.broken = False  # an error after a layer may have been released: every chunk is reported
        self.seconds = 0.0
        self._events: list | None = None  # a device cache: each layer's copies' event, once issued
        self._finished = False
        self._issued = None
        if side is not None:  # the blocks' previous users: everything the compute stream issued so far
            self._issued = self.dev.event()
            self._issued.record(self.dev.current_stream(paged.device))
        self._t0 = time.perf_counter()
        self._future: Future = pool.submit(self._run)

    # ------------------------------------------------------------------ the background thread
    def _run(self) -> None:
        try:
            if self.side is None:
                self._lease_and_scatter()
            else:
                self._read_bundles()
        except Exception:  # never into the forward: the chunks become recomputed blocks
            log.exception("strata: a layer-wise KV load failed; its chunks are recomputed")
            self.broken = True
        finally:
            self.seconds = time.perf_counter() - self._t0
            for event in self.ready:  # a wait never outlives the load
                event.set()

    def _lease_and_scatter(self) -> None:
        """A host cache: lease every chunk (held until the last layer is written), check each, then
        write layer by layer, releasing each layer as soon as every chunk's slice of it is in."""
        keys = [s.chunk.key for spans in self.requests for s in spans]
        with self.store.lease_many(keys) as views:
            self._keep(iter(views), self._checked)
            for i, event in enumerate(self.ready):
                for span, view in self.good:
                    self.paged.scatter_layer(i, view, span.block_ids, span.skip)
                event.set()
            self.good = [(span, None) for span, _ in self.good]  # the leases end here

    def _read_bundles(self) -> None:
        """A device cache: every chunk into a pinned host bundle (a remote tier's in a few round trips)."""
        keys = [s.chunk.key for spans in self.requests for s in spans]
        self.store.prefetch(keys)
        self._keep(iter([None] * len(keys)), self._read)

    def _keep(self, views, fetch) -> None:
        """Per request, the leading chunks ``fetch`` brings; from the first it cannot, none."""
        for spans in self.requests:
            for k, span in enumerate(spans):
                got = fetch(span, next(views))
                if got is None:
                    self.failed.extend(spans[k:])
                    for _ in spans[k + 1:]:
                        next(views)
                    break
                self.good.append((span, got))

    def _checked(self, span: BlockSpan, view: torch.Tensor | None) -> torch.Tensor | None:
        if view is None:
            return None
        try:
            self.paged.check(view, span.block_ids)
            return view
        except StoreError as e:
            _misfit(span, e)
            return None

    def _read(self, span: BlockSpan, _unused) -> torch.Tensor | None:
        bundle = self.paged.host_bundle(len(span.block_ids))
        try:
            return bundle if self.store.get_into(span.chunk.key, bundle) else None
        except StoreError as e:
            _misfit(span, e)
            return None

    # ------------------------------------------------------------------ the step's thread
    def wait(self, i: int) -> None:
        """Return once layer ``i`` may be computed on: its blocks written (a host cache) or the
        compute stream ordered after their copies (a device cache)."""
        if self.side is None:
            self.ready[i].wait()
            return
        self._issue()
        self.dev.current_stream(self.paged.device).wait_event(self._events[i])

    def _issue(self) -> None:
        """Once the reads are in: every layer's copies on the side stream, layer by layer, each
        layer's event recorded after its copies (so layer 0's fires while layer 1's still run)."""
        if self._events is not None:
            return
        self._future.result()
        dev, side, events = self.dev, self.side, []
        with dev.stream(side):
            side.wait_event(self._issued)
            try:
                for i in range(len(self.paged.layers)):
                    for span, bundle in self.good:
                        self.paged.copy_in_layer(i, bundle, span.block_ids, span.skip)
                    events.append(dev.event())
                    events[-1].record(side)
            except Exception:
                log.exception("strata: issuing a layer-wise KV load failed; its chunks are recomputed")
                self.broken = True
                events.append(dev.event())
                events[-1].record(side)
        self._events = events + [events[-1]] * (len(self.paged.layers) - len(events))

    def finish(self) -> None:
        """Every layer written, or (a device cache) the compute stream ordered after the last copies,
        whatever the forward waited for; then ``good`` are the chunks loaded, ``failed`` the rest."""
        if self._finished:
            return
        self._finished = True
        self._future.result()
        if self.side is not None:
            self._issue()
            self.dev.current_stream(self.paged.device).wait_event(self._events[-1])
        if self.broken:
            self.failed = [s for spans in self.requests for s in spans]
            self.good = []

    def loaded(self) -> list[tuple[BlockSpan, int]]:
        """Each chunk in its blocks, with its bytes (after ``finish``)."""
        size = self.paged.dtype.itemsize
        return [(span, math.prod(self.paged.bundle_shape(len(span.block_ids))) * size) for span, _ in self.good]

    def failed_from(self) -> dict[str, int]:
        """Each request with a chunk not written: the first token of its first such chunk (after
        ``finish``)."""
        failed = {id(s) for s in self.failed}
        out = {}
        for owner, spans in zip(self.owners, self.requests):
            first = next((s.chunk.start for s in spans if id(s) in failed), None)
            if first is not None:
                out[owner] = first
        return out

    def retired(self) -> bool:
        """Whether nothing of it can still run on the device (its host bundles may go)."""
        return self._events is None or self._events[-1].query()


class LayerwiseSave:
    """One step's saves, each chunk's layer ``i`` copied out of the cache when vLLM hands over layer
    ``i`` (``layer``), into the chunk's one bundle; ``finish`` copies any layer not handed over and
    returns what goes to the save queue. On a device, each layer's copies run on the side stream
    after an event of the compute stream recorded when the layer was handed over."""

    def __init__(self, spans: list[BlockSpan], paged: PagedKV, side=None):
        self.spans, self.paged, self.side, self.dev = spans, paged, side, paged.dev
        self.bundles = [paged.host_bundle(len(s.block_ids)) for s in spans]
        self.done = [False] * len(paged.layers)

    def layer(self, i: int) -> None:
        if self.done[i] or not self.spans:
            return
        self.done[i] = True
        if self.side is None:
            for span, bundle in zip(self.spans, self.bundles):
                self.paged.gather_layer(i, span.block_ids, bundle[i])
            return
        dev = self.dev
        written = dev.event()
        written.record(dev.current_stream(self.paged.device))
        with dev.stream(self.side):
            self.side.wait_event(written)
            for span, bundle in zip(self.spans, self.bundles):
                self.paged.copy_out_layer(i, span.block_ids, bundle)

    def finish(self) -> list[tuple]:
        """(chunk, bundle, event or None: it already holds the blocks) for each chunk; on a device
        the compute stream waits for the copies' event before it runs on (and may reuse) the blocks."""
        for i in range(len(self.done)):
            self.layer(i)
        if not self.spans:
            return []
        copied = None
        if self.side is not None:
            copied = self.dev.event()
            copied.record(self.side)
            self.dev.current_stream(self.paged.device).wait_event(copied)
        return [(span.chunk, bundle, copied) for span, bundle in zip(self.spans, self.bundles)]
