"""The connector's scheduler half: how many leading prompt tokens the store holds, and what each
step's worker must load and save.

vLLM calls it from its scheduler, request by request: ``lookup`` (whole chunks, then the partial
last chunk, less what vLLM's own prefix cache has), ``allocated`` once vLLM gave the request its
blocks (the hit becomes a load into them), ``build`` once per step (the loads just planned, the
saves of the prompts just completed), ``connector_output`` with what the workers reported, and
``finished`` at the end. One ``RequestState`` per request holds all it knows of it between those
calls.

A lookup never blocks the scheduler: when the answer needs a socket or a network round trip (the
worker's store lives in another process and is asked over ``strata.kv.lookup``, or the store has a
remote tier), it is asked on a background thread and ``lookup`` answers None ("not yet": vLLM asks
again next step) until the answer is in. A hit is loaded asynchronously by default (vLLM parks the
request in WAITING_FOR_REMOTE_KVS until the worker reports it finished).
"""

from __future__ import annotations

import logging
import uuid
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from strata.keys import Key
from strata.kv.chunks import Chunk
from strata.kv.lookup import LookupClient, local_server
from strata.kv.vllm_context import Context
from strata.kv.vllm_meta import LoadSpec, SaveSpec, StrataConnectorMetadata

log = logging.getLogger("strata.kv")


@dataclass(frozen=True)
class Hit:
    """What one lookup found, computed once: the held chunks vLLM lacks, from ``first_token`` (the
    tokens vLLM already has, block aligned) to ``end`` (one past the last held token)."""

    chunks: list[Chunk]
    first_token: int
    end: int


@dataclass
class RequestState:
    """All the scheduler half knows of one request, from its first lookup to its end."""

    chunks: list[Chunk] | None = None  # what a lookup asks for (the prompt's, computed once)
    asking: Future | None = None  # a lookup on the background thread
    answer: list[bool] | None = None  # its answer, per chunk, until vLLM allocates the request
    held: set[Key] = field(default_factory=set)  # keys the store was last seen to hold (not saved again)
    hit: Hit | None = None  # the last lookup's hit, until vLLM allocates blocks for it
    load_cap: int | None = None  # a load failed from this token on: later lookups stop there
    prompt: list[int] | None = None  # known once the request is scheduled
    block_ids: list[int] = field(default_factory=list)
    saved: bool = False  # its prompt's chunks went into a SaveSpec (again after a preemption)


class SchedulerHalf:
    """The scheduler's connector: what the store spares vLLM computing, request by request, and
    each step's plan for the worker (``vllm_meta``). It moves no bytes."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.requests: dict[str, RequestState] = {}
        self._lookup = LookupClient(ctx.lookup_path)  # used on the lookup thread only
        self._asker: ThreadPoolExecutor | None = None
        self._remote_store = any(getattr(t, "remote", False) for t in ctx.store.tiers)
        self._loads: list[LoadSpec] = []  # planned by ``allocated``, carried by the next ``build``
        self._loading: dict[str, LoadSpec] = {}  # asynchronous loads the workers have not reported finished
        self._sync_loads: list[LoadSpec] = []  # synchronous loads of the last step, until its output

    # ------------------------------------------------------------------ lookups
    def lookup(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        """Tokens the store holds beyond the ``num_computed_tokens`` vLLM has, and whether they load
        asynchronously; (None, False) while the answer is not in yet."""
        state = self.requests.setdefault(request.request_id, RequestState())
        state.hit = None
        if state.chunks is None:
            state.chunks = self._lookup_chunks(list(request.prompt_token_ids or []))
        held = self._answer(state)
        if held is None:
            return None, False
        hit = self._hit(state, held, num_computed_tokens)
        if hit is None:
            return 0, False
        if self._loading_elsewhere(request.request_id, hit):
            return None, False  # once that load is in, vLLM's own prefix cache holds these blocks
        state.hit = hit
        return hit.end - num_computed_tokens, self.ctx.load_async

    def _lookup_chunks(self, tokens: list[int]) -> list[Chunk]:
        """The chunks a hit may cover: up to the last whole block before the final token (which vLLM
        always computes)."""
        bs = self.ctx.block_size
        return self.ctx.hasher.chunks(tokens, (len(tokens) - 1) // bs * bs, partial=self.ctx.save_partial)

    def _answer(self, state: RequestState) -> list[bool] | None:
        """Which of the request's chunks the store holds: asked once per allocation, on the lookup
        thread when asking may block (None until it has answered), else at once."""
        if state.answer is None:
            keys = [c.key for c in state.chunks]
            if state.asking is None and (not keys or not self._may_block()):
                state.answer = self._held(keys)
            else:
                if state.asking is None:
                    state.asking = self._start(keys)
                if not state.asking.done():
                    return None
                state.answer, state.asking = self._result(state.asking, len(keys)), None
            state.held = {c.key for c, have in zip(state.chunks, state.answer) if have}
        return state.answer

    def _hit(self, state: RequestState, held: list[bool], num_computed_tokens: int) -> Hit | None:
        """The leading held chunks (short of a token a load of this request failed at), or None when
        they add nothing to what vLLM has."""
        found = []
        for chunk, present in zip(state.chunks, held):
            if not present or (state.load_cap is not None and chunk.end > state.load_cap):
                break
            found.append(chunk)
        end = found[-1].end if found else 0
        if end <= num_computed_tokens:
            return None
        return Hit([c for c in found if c.end > num_computed_tokens], num_computed_tokens, end)

    def _loading_elsewhere(self, rid: str, hit: Hit) -> bool:
        """Whether another request is loading one of the hit's chunks while vLLM's prefix cache is
        on: waiting for it (a step or so) gives its blocks for free instead of a second load."""
        if not self.ctx.prefix_caching or not self._loading:
            return False
        keys = {c.key for c in hit.chunks}
        return any(other != rid and any(c.key in keys for c in spec.chunks) for other, spec in self._loading.items())

    def _may_block(self) -> bool:
        """Whether asking the store may wait on a socket or a network: the worker's store is in
        another process (asked over its socket), or the store has a remote tier."""
        return self._remote_store or local_server(self.ctx.lookup_path) is None

    def _start(self, keys: list[Key]) -> Future:
        if self._asker is None:
            self._asker = ThreadPoolExecutor(1, thread_name_prefix="strata-kv-lookup")
        return self._asker.submit(self._held, keys)

    @staticmethod
    def _result(asking: Future, n: int) -> list[bool]:
        """A finished lookup's answer; one that raised is a miss (logged), never an error in scheduling."""
        try:
            return asking.result()
        except Exception as e:
            log.warning("strata: a KV lookup failed (%s); treated as a miss", e)
            return [False] * n

    def _held(self, keys: list) -> list[bool]:
        """Which keys the worker's store holds: asked over its socket when it runs in another process."""
        if local_server(self.ctx.lookup_path) is None:
            held = self._lookup.contains_many(keys)
            if held is not None:
                return held
        return self.ctx.store.contains_many(keys)

    def wait_lookups(self, timeout: float | None = None) -> bool:
        """Wait until every lookup started so far has answered (tests, shutdown); whether they all did."""
        pending = [s.asking for s in self.requests.values() if s.asking is not None]
        return not wait(pending, timeout=timeout).not_done if pending else True

    # ------------------------------------------------------------------ allocation
    def allocated(self, request, blocks, num_external_tokens: int) -> None:
        """vLLM gave the request its blocks: the hit becomes a load into them when vLLM counts on it
        (carried by the next ``build``). The lookup's answer is spent: a later lookup (after a
        preemption) asks the store again."""
        state = self.requests.get(request.request_id)
        if state is None:
            return
        hit, state.hit, state.answer = state.hit, None, None
        if num_external_tokens <= 0 or hit is None:
            return
        block_ids = list(blocks.get_block_ids()[0])
        spec = LoadSpec.plan(request.request_id, block_ids, hit.chunks, hit.first_token, self.ctx.block_size,
                             is_async=self.ctx.load_async)
        self._loads.append(spec)
        if spec.is_async:
            self._loading[request.request_id] = spec
        else:
            self._sync_loads.append(spec)

    # ------------------------------------------------------------------ each step's metadata
    def build(self, scheduler_output) -> StrataConnectorMetadata:
        meta = StrataConnectorMetadata(loads=self._loads)
        self._loads = []
        for req in scheduler_output.scheduled_new_reqs:
            state = self.requests.setdefault(req.req_id, RequestState())
            state.block_ids = list(req.block_ids[0])
            state.prompt = list(req.prompt_token_ids or [])
            state.saved = False
            done = req.num_computed_tokens + scheduler_output.num_scheduled_tokens.get(req.req_id, 0)
            self._maybe_save(meta, req.req_id, state, done)
        cached = scheduler_output.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            state = self.requests.setdefault(rid, RequestState())
            self._follow_blocks(state, cached.new_block_ids[i], rid in cached.resumed_req_ids)
            done = cached.num_computed_tokens[i] + scheduler_output.num_scheduled_tokens.get(rid, 0)
            self._maybe_save(meta, rid, state, done)
        return meta

    @staticmethod
    def _follow_blocks(state: RequestState, new_ids, resumed: bool) -> None:
        """A running request's new blocks extend its list; a resumed (preempted) one starts over
        with new blocks (what it hit in the store was loaded into them), its prompt saved again."""
        if resumed:
            state.block_ids = list(new_ids[0]) if new_ids else []
            state.saved = False
        elif new_ids:
            state.block_ids.extend(new_ids[0])

    def _maybe_save(self, meta: StrataConnectorMetadata, rid: str, state: RequestState,
                    computed_after_step: int) -> None:
        """Once the prompt is computed: the chunks of it the store was not seen to hold by the
        request's lookup (asking again here could block the scheduler; the worker's saver skips a
        chunk another request saved meanwhile)."""
        prompt = state.prompt
        if prompt is None or state.saved or computed_after_step < len(prompt):
            return
        state.saved = True
        new = [c for c in self._chunks_to_save(prompt) if c.key not in state.held]
        if new:
            meta.saves.append(SaveSpec.plan(rid, state.block_ids, new, self.ctx.block_size))

    def _chunks_to_save(self, prompt: list[int]) -> list[Chunk]:
        """Whole chunks of the prompt (for longer prompts that extend it), and the chunks a repeat of
        this very prompt will look up: up to its last whole block before the final token."""
        hasher = self.ctx.hasher
        chunks = {c.key: c for c in hasher.chunks(prompt, len(prompt), partial=False)}
        chunks.update((c.key, c) for c in self._lookup_chunks(prompt))
        return sorted(chunks.values(), key=lambda c: (c.start, c.end))

    # ------------------------------------------------------------------ what the workers reported
    def connector_output(self, output) -> None:
        """Blocks that failed to load cap later lookups of their request (vLLM frees a request whose
        load failed from its first token and asks again: it must not be offered the same chunk
        forever) and make their chunks its to save again (a corrupt chunk was dropped by the store),
        also when the request was a synchronous load and is not admitted anew;
        a load reported finished no longer holds its chunks."""
        failed = set(output.invalid_block_ids or ())
        if failed:
            for spec in [*self._loading.values(), *self._sync_loads]:
                self._failed_from(spec, spec.first_failed_token(failed, self.ctx.block_size))
        self._sync_loads = []
        for rid in output.finished_recving or ():
            self._loading.pop(rid, None)

    def _failed_from(self, spec: LoadSpec, token: int | None) -> None:
        state = self.requests.get(spec.req_id)
        if token is None or state is None:
            return
        state.load_cap = token if state.load_cap is None else min(state.load_cap, token)
        state.held.difference_update(c.key for c in spec.chunks if c.end > token)
        state.saved = False  # a synchronous load's request recomputes from ``token`` and runs on: save again

    # ------------------------------------------------------------------ the end
    def finished(self, request) -> None:
        """The request is done. Its asynchronous load, if one is still running, stays tracked until
        the workers report it: vLLM keeps its blocks until then."""
        state = self.requests.pop(request.request_id, None)
        if state is not None and state.asking is not None:
            state.asking.cancel()

    def reset_cache(self) -> bool:
        """vLLM resets the connector's cache (before sleep, on a pause that clears caches, or on
        ``reset_prefix_cache(reset_connector=True)``): the weights may change before the next
        request, and a chunk's key names the model, not its weights. This engine's keys move to a
        new epoch of their scope, so every chunk saved before is a miss here from now on. Nothing
        is deleted: other engines sharing the store keep theirs, and the store evicts old ones as
        usual. What the requests still known were told is forgotten (they ask again)."""
        epoch = uuid.uuid4().hex[:16]
        self.ctx.new_epoch(epoch)
        for state in self.requests.values():
            if state.asking is not None:
                state.asking.cancel()
            state.chunks = state.asking = state.answer = state.hit = None
            state.held = set()
        log.info("strata: KV cache reset: this engine's chunks start a new epoch (%s) of their scope", epoch)
        return True

    def close(self) -> None:
        if self._asker is not None:
            self._asker.shutdown(wait=False, cancel_futures=True)
            self._asker = None
        self._lookup.close()
