"""The connector's scheduler half: how many leading prompt tokens the store holds, and what each
step's worker must load and save.

vLLM calls it from its scheduler, request by request: ``lookup`` (whole chunks, then the partial
last chunk, less what vLLM's own prefix cache has), ``allocated`` once vLLM gave the request its
blocks, ``build`` once per step (the loads of the requests just allocated, the saves of the
prompts just completed), ``finished`` at the end. One ``RequestState`` per request holds all it
knows of it between those calls.

When the worker's store lives in another process (vLLM's multiprocess executor), ``_held`` asks the
rank-0 worker over a Unix socket (``strata.kv.lookup``), else the store of this process.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from strata.kv.chunks import Chunk
from strata.kv.lookup import LookupClient, local_server
from strata.kv.vllm_context import Context
from strata.kv.vllm_meta import LoadSpec, SaveSpec, StrataConnectorMetadata


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

    hit: Hit | None = None  # the last lookup's hit, until vLLM allocates blocks for it
    load: Hit | None = None  # an allocated hit, until the next metadata carries it to the worker
    prompt: list[int] | None = None  # known once the request is scheduled
    block_ids: list[int] = field(default_factory=list)
    saved: bool = False  # its prompt's chunks went into a SaveSpec (again after a preemption)


class SchedulerHalf:
    """The scheduler's connector: what the store spares vLLM computing, request by request, and
    each step's plan for the worker (``vllm_meta``). It moves no bytes."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.requests: dict[str, RequestState] = {}
        self._lookup = LookupClient(ctx.lookup_path)

    # ------------------------------------------------------------------ lookups
    def lookup(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        """Tokens the store holds beyond the ``num_computed_tokens`` vLLM has; never asynchronous."""
        hit = self._find(list(request.prompt_token_ids or []), num_computed_tokens)
        if hit is None:
            state = self.requests.get(request.request_id)
            if state is not None:
                state.hit = None
            return 0, False
        self.requests.setdefault(request.request_id, RequestState()).hit = hit
        return hit.end - num_computed_tokens, False

    def _find(self, tokens: list[int], num_computed_tokens: int) -> Hit | None:
        """The leading chunks the store holds (up to the last whole block before the final token,
        which vLLM always computes), or None when they add nothing to what vLLM has."""
        bs = self.ctx.block_size
        limit = (len(tokens) - 1) // bs * bs
        chunks = self.ctx.hasher.chunks(tokens, limit, partial=self.ctx.save_partial)
        found = []
        for chunk, present in zip(chunks, self._held([c.key for c in chunks])):
            if not present:
                break
            found.append(chunk)
        end = found[-1].end if found else 0
        if end <= num_computed_tokens:
            return None
        return Hit([c for c in found if c.end > num_computed_tokens], num_computed_tokens, end)

    def _held(self, keys: list) -> list[bool]:
        """Which keys the worker's store holds: asked over its socket when it runs in another process."""
        if local_server(self.ctx.lookup_path) is None:
            held = self._lookup.contains_many(keys)
            if held is not None:
                return held
        return self.ctx.store.contains_many(keys)

    def allocated(self, request, num_external_tokens: int) -> None:
        """vLLM gave the request its blocks: the hit becomes a load when vLLM counts on it."""
        state = self.requests.get(request.request_id)
        if state is None:
            return
        hit, state.hit = state.hit, None
        if num_external_tokens > 0 and hit is not None:
            state.load = hit

    # ------------------------------------------------------------------ each step's metadata
    def build(self, scheduler_output) -> StrataConnectorMetadata:
        meta = StrataConnectorMetadata()
        for req in scheduler_output.scheduled_new_reqs:
            state = self.requests.setdefault(req.req_id, RequestState())
            state.block_ids = list(req.block_ids[0])
            state.prompt = list(req.prompt_token_ids or [])
            self._take_load(meta, req.req_id, state)
            done = req.num_computed_tokens + scheduler_output.num_scheduled_tokens.get(req.req_id, 0)
            self._maybe_save(meta, req.req_id, state, done)
        cached = scheduler_output.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            state = self.requests.setdefault(rid, RequestState())
            self._follow_blocks(meta, rid, state, cached.new_block_ids[i], rid in cached.resumed_req_ids)
            done = cached.num_computed_tokens[i] + scheduler_output.num_scheduled_tokens.get(rid, 0)
            self._maybe_save(meta, rid, state, done)
        return meta

    def _follow_blocks(self, meta: StrataConnectorMetadata, rid: str, state: RequestState, new_ids,
                       resumed: bool) -> None:
        """A running request's new blocks extend its list; a resumed (preempted) one starts over
        with new blocks: what it hit in the store is loaded into them, its prompt saved again."""
        if resumed:
            state.block_ids = list(new_ids[0]) if new_ids else []
            state.saved = False
            self._take_load(meta, rid, state)
        elif new_ids:
            state.block_ids.extend(new_ids[0])

    def _take_load(self, meta: StrataConnectorMetadata, rid: str, state: RequestState) -> None:
        """The request's allocated hit, if any, as a load into its blocks (once)."""
        if state.load is not None:
            hit, state.load = state.load, None
            meta.loads.append(LoadSpec.plan(rid, state.block_ids, hit.chunks, hit.first_token, self.ctx.block_size))

    def _maybe_save(self, meta: StrataConnectorMetadata, rid: str, state: RequestState,
                    computed_after_step: int) -> None:
        """Once the prompt is computed: the chunks of it that the store lacks."""
        prompt = state.prompt
        if prompt is None or state.saved or computed_after_step < len(prompt):
            return
        state.saved = True
        chunks = self._chunks_to_save(prompt)
        new = [c for c, have in zip(chunks, self._held([c.key for c in chunks])) if not have]
        if new:
            meta.saves.append(SaveSpec.plan(rid, state.block_ids, new, self.ctx.block_size))

    def _chunks_to_save(self, prompt: list[int]) -> list[Chunk]:
        """Whole chunks of the prompt (for longer prompts that extend it), and the chunks a repeat of
        this very prompt will look up: up to its last whole block before the final token."""
        hasher, bs = self.ctx.hasher, self.ctx.block_size
        chunks = {c.key: c for c in hasher.chunks(prompt, len(prompt), partial=False)}
        repeat = (len(prompt) - 1) // bs * bs
        chunks.update((c.key, c) for c in hasher.chunks(prompt, repeat, partial=self.ctx.save_partial))
        return sorted(chunks.values(), key=lambda c: (c.start, c.end))

    # ------------------------------------------------------------------ the end
    def finished(self, request) -> None:
        self.requests.pop(request.request_id, None)

    def close(self) -> None:
        self._lookup.close()
