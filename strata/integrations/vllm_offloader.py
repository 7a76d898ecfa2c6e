"""Strata's streaming rings as vLLM's offloader, so vLLM's CUDA-graph capture drains and joins them.

vLLM's model runner calls its process-wide offloader (``vllm.model_executor.offloader.base``,
``get_offloader``/``set_offloader``) around every CUDA-graph capture and replay:
``sync_prev_onload`` before (the compute stream waits for copies issued outside the graph) and
``join_after_forward`` before a capture ends (copies issued inside it rejoin the capturing stream).
``--load-format strata`` in compiled mode installs this one, which forwards both to the static
rings (``strata.offload.static``) of the models it loaded; the streaming itself runs as the
``strata::enter`` custom op inside the graphs. It never wraps modules: vLLM's own layer wrapping
(``wrap_modules``, for vLLM's prefetch offloader) is left as it found it.
"""

from __future__ import annotations

from vllm.model_executor.offloader.base import BaseOffloader, NoopOffloader, get_offloader, set_offloader

from strata.errors import ConfigError


class StrataOffloader(BaseOffloader):
    def __init__(self):
        self.rings: list = []

    def wrap_modules(self, modules_generator, prefix: str = "") -> list:
        return list(modules_generator)

    def sync_prev_onload(self) -> None:
        for ring in self.rings:
            ring.sync()

    def join_after_forward(self) -> None:
        for ring in self.rings:
            ring.join()


def install(ring) -> StrataOffloader:
    """Make vLLM's offloader forward capture's sync and join to ``ring`` (and the rings installed
    before it in this process). vLLM's own weight offload configured beside it is refused: two
    offloaders would stream the same layers."""
    current = get_offloader()
    if isinstance(current, StrataOffloader):
        current.rings.append(ring)
        return current
    if not isinstance(current, NoopOffloader):
        raise ConfigError(
            f"--load-format strata: vLLM's own weight offload is configured too ({type(current).__name__}, from "
            "--offload-backend / --cpu-offload-gb / --offload-group-size); allowed: one of the two")
    offloader = StrataOffloader()
    offloader.rings.append(ring)
    set_offloader(offloader)
    return offloader
