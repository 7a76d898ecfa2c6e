"""What the connector's scheduler half tells its worker half each step (vLLM carries it, pickled
when the two live in different processes): which chunks to load into which blocks, which to save
from which blocks, and whether a load is asynchronous (vLLM parks its request until the worker
reports it in ``get_finished``) or must be in the blocks before this step's forward.

The scheduler decides everything: the hit boundaries (which chunks, from which token on) and the
blocks under each chunk are computed once, there, and carried as ``BlockSpan`` s; the worker only
moves bytes. A spec built by hand (as tests do) is planned on first use, with the same function.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from strata.kv.chunks import Chunk


@dataclass(frozen=True)
class BlockSpan:
    """One chunk and the request's blocks under it. ``skip`` leading blocks are already in vLLM's
    cache (neither written by a load nor reported when it fails); ``tokens`` is what a load of the
    chunk brings to vLLM, what a save of it stores."""

    chunk: Chunk
    block_ids: list[int]
    skip: int = 0
    tokens: int = 0

    @property
    def new_block_ids(self) -> list[int]:
        """The blocks a load writes, and reports as failed when it cannot."""
        return self.block_ids[self.skip:]


def load_spans(block_ids: list[int], chunks: list[Chunk], first_token: int, block_size: int) -> list[BlockSpan]:
    """Each chunk to load with its blocks; tokens before ``first_token`` (block aligned) vLLM already has."""
    return [BlockSpan(c, block_ids[c.start // block_size: c.end // block_size],
                      skip=max(0, first_token - c.start) // block_size, tokens=c.end - max(c.start, first_token))
            for c in chunks]


def save_spans(block_ids: list[int], chunks: list[Chunk], block_size: int) -> list[BlockSpan]:
    """Each chunk to save with its blocks (fewer than the chunk covers: the worker skips it)."""
    return [BlockSpan(c, block_ids[c.start // block_size: c.end // block_size], tokens=c.end - c.start)
            for c in chunks]


@dataclass
class LoadSpec:
    """Load ``chunks`` of request ``req_id`` into its blocks: before this step's forward, or (with
    ``is_async``) in the background while vLLM keeps the request waiting (WAITING_FOR_REMOTE_KVS)."""

    req_id: str
    block_ids: list[int]
    chunks: list[Chunk]
    first_token: int  # tokens before this are already in vLLM's cache (block aligned)
    spans: list[BlockSpan] = field(default_factory=list)
    is_async: bool = False  # a spec made by hand (tests) loads synchronously

    def planned(self, block_size: int) -> list[BlockSpan]:
        """The spans the scheduler computed (``LoadSpec.plan``); computed here for a spec made by hand."""
        if len(self.spans) != len(self.chunks):
            self.spans = load_spans(self.block_ids, self.chunks, self.first_token, block_size)
        return self.spans

    @classmethod
    def plan(cls, req_id: str, block_ids: list[int], chunks: list[Chunk], first_token: int,
             block_size: int, is_async: bool = False) -> "LoadSpec":
        return cls(req_id, list(block_ids), chunks, first_token,
                   load_spans(block_ids, chunks, first_token, block_size), is_async)

    def first_failed_token(self, failed: set[int], block_size: int) -> int | None:
        """The first token of the first of its blocks in ``failed`` (None: none of its blocks)."""
        for i, block in enumerate(self.block_ids):
            if block in failed:
                return i * block_size
        return None


@dataclass
class SaveSpec:
    """Save ``chunks`` of request ``req_id`` from its blocks after the forward."""

    req_id: str
    block_ids: list[int]
    chunks: list[Chunk]
    spans: list[BlockSpan] = field(default_factory=list)

    def planned(self, block_size: int) -> list[BlockSpan]:
        """The spans the scheduler computed (``SaveSpec.plan``); computed here for a spec made by hand."""
        if len(self.spans) != len(self.chunks):
            self.spans = save_spans(self.block_ids, self.chunks, block_size)
        return self.spans

    @classmethod
    def plan(cls, req_id: str, block_ids: list[int], chunks: list[Chunk], block_size: int) -> "SaveSpec":
        return cls(req_id, list(block_ids), chunks, save_spans(block_ids, chunks, block_size))


@dataclass
class StrataConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
