"""Fuzzing the object header and each tier's on-media format.

Whatever bytes a tier finds (random, a valid header with bits flipped, cut short or
extended, another key's header on this key's payload), parsing raises nothing but
``CorruptObject``, a header that parses re-packs to exactly the bytes it was read from
(nothing slipped through unchecked), and a tier never hands out a tensor for another key
or a payload whose checksum does not match.
"""

from __future__ import annotations

import shutil
import struct

import pytest
import torch
import xxhash
from hypothesis import HealthCheck, given, settings, strategies as st

import strata
from strata import Key
from strata.store.codec import (FIXED_HEADER_SIZE, KIND_BYTES, KIND_TENSOR, MAX_NDIM, CorruptObject, ObjectMeta,
                                checksum, flat_bytes, header_size, pack_header, unpack_header)
from strata.store.tiers.base import Entry, NotStored

DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16,
          torch.float32, torch.float64, torch.bool, torch.complex64, torch.complex128]
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


# -- strategies ------------------------------------------------------------------------------
@st.composite
def headers(draw) -> tuple[bytes, ObjectMeta]:
    """A key (any bytes) and a meta as ``describe`` would make them, with a payload checksum."""
    key = draw(st.binary(max_size=80))
    checksum_ = draw(st.integers(0, 2**64 - 1))
    if draw(st.booleans()):
        n = draw(st.integers(0, 1 << 40))
        return key, ObjectMeta(KIND_BYTES, torch.uint8, (n,), n, checksum_)
    dtype = draw(st.sampled_from(DTYPES))
    few = draw(st.booleans())  # up to 4 dims of any size, or up to MAX_NDIM small ones (nbytes < 2**64)
    shape = tuple(draw(st.lists(st.integers(0, 4096 if few else 3), max_size=4 if few else MAX_NDIM)))
    numel = 1
    for d in shape:
        numel *= d
    return key, ObjectMeta(KIND_TENSOR, dtype, shape, numel * dtype.itemsize, checksum_)


_pos = st.one_of(st.integers(0, 63), st.integers(0, 1 << 16))  # near the start (the header) or anywhere
mutations = st.lists(st.one_of(
    st.tuples(st.just("flip"), _pos, st.integers(0, 7)),
    st.tuples(st.just("set"), _pos, st.integers(0, 255)),
    st.tuples(st.just("cut"), _pos),
    st.tuples(st.just("extend"), st.binary(min_size=1, max_size=40)),
    st.tuples(st.just("insert"), _pos, st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), _pos, st.integers(1, 8)),
), min_size=1, max_size=4)


def mutate(buf: bytes, ops, resize: bool = True) -> bytes:
    """``buf`` with ``ops`` applied. Without ``resize`` (a mapped region) length never changes."""
    b = bytearray(buf)
    for op in ops:
        kind = op[0]
        if kind in ("flip", "set") and b:
            i = op[1] % len(b)
            b[i] = b[i] ^ (1 << op[2]) if kind == "flip" else op[2]
        elif not resize:
            continue
        elif kind == "cut":
            del b[op[1] % (len(b) + 1):]
        elif kind == "extend":
            b += op[1]
        elif kind == "insert":
            i = op[1] % (len(b) + 1)
            b[i:i] = op[2]
        elif kind == "delete" and b:
            i = op[1] % len(b)
            del b[i : i + op[2]]
    return bytes(b)


def parse(buf: bytes):
    """(key, meta, header length) or None when the bytes are refused; any other exception fails."""
    try:
        n = header_size(buf)
        key, meta = unpack_header(buf)
    except CorruptObject:
        return None
    assert n >= FIXED_HEADER_SIZE and len(buf) >= n
    # nothing unchecked: the fields re-pack to exactly the bytes they were read from
    assert pack_header(key, meta) == buf[:n]
    return key, meta, n


# -- the header alone ------------------------------------------------------------------------
@FAST
@given(st.one_of(st.binary(max_size=300), st.binary(max_size=300).map(lambda b: b"STRO\x01" + b)))
def test_random_bytes_are_refused_or_repack_exactly(buf):
    parse(buf)


@FAST
@given(headers(), mutations)
def test_a_mutated_header_is_refused_or_is_the_original(header, ops):
    key, meta = header
    good = pack_header(key, meta)
    assert parse(good) == (key, meta, len(good))
    bad = mutate(good, ops)
    got = parse(bad)
    if got is not None:  # only a change outside the header (bytes added after it) goes unseen
        assert got == (key, meta, len(good)) and bad[: len(good)] == good


@FAST
@given(headers(), st.integers(0, 2**64 - 1), st.sampled_from(["nbytes", "shape"]))
def test_a_header_whose_sizes_disagree_is_refused_even_with_a_valid_checksum(header, n, what):
    """A well-checksummed header another writer got wrong (nbytes not the shape's byte size)
    would make a tier build a view of the wrong size: refused as CorruptObject."""
    key, meta = header
    if what == "nbytes":
        if n == meta.nbytes:
            n += 1
        bad = meta._replace(nbytes=n % 2**64)
    elif meta.kind == KIND_BYTES:
        bad = meta._replace(shape=(meta.nbytes + 1 + n % 7,))
    else:
        bad = meta._replace(shape=meta.shape + (2 + n % 7,)) if meta.nbytes else meta._replace(shape=(1 + n % 7,))
    with pytest.raises(CorruptObject):
        unpack_header(pack_header(key, bad))


# -- each tier's on-media format -------------------------------------------------------------
def sample_values():
    """Two objects with the same dtype and shape (so a header of one fits the other's payload)."""
    a, b = Key("kv", "fuzz", "a"), Key("kv", "fuzz", "b")
    va = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    vb = -va
    return (a, va), (b, vb)


def meta_of(value: torch.Tensor) -> ObjectMeta:
    return ObjectMeta(KIND_TENSOR, value.dtype, tuple(value.shape), value.numel() * value.element_size(),
                      checksum(value))


def payload_bytes(value: torch.Tensor) -> bytes:
    return flat_bytes(value.contiguous()).numpy().tobytes()


def splice(own: bytes, other: bytes, own_head: int, other_head: int) -> bytes:
    """Another key's header in front of this value's payload."""
    return other[:other_head] + own[own_head:]


value_damage = st.one_of(
    mutations.map(lambda ops: ("mutate", ops)),
    st.tuples(st.just("other"), st.booleans()),  # another key's whole value, or its header on ours
)


def _redis_value(key: bytes, value: torch.Tensor) -> tuple[bytes, int]:
    """A redis value as the tier writes it: header, zeros up to a 16-byte boundary, payload."""
    head = pack_header(key, meta_of(value))
    pad = -len(head) % 16
    return head + bytes(pad) + payload_bytes(value), len(head) + pad


@SLOW
@given(value_damage)
def test_the_redis_decoder_serves_the_asked_key_checked_or_nothing(damage):
    pytest.importorskip("redis")
    from strata.store.tiers.backing import decode_value, encode_value, payload_offset as _payload_offset

    (a, va), (b, vb) = sample_values()
    value_a, off_a = _redis_value(a.encoded, va)
    value_b, off_b = _redis_value(b.encoded, vb)
    assert off_a == _payload_offset(header_size(value_a))
    e = Entry(a.encoded, "kv", meta_of(va), 0, None)
    assert value_a == encode_value(e.key, e.meta, va)  # the format built here is the backing tiers' own
    if damage[0] == "mutate":
        bad = mutate(value_a, damage[1])
    else:
        bad = value_b if damage[1] else splice(value_a, value_b, off_a, off_b)
    probe = Entry(a.encoded, "kv", None, 0, None)  # as the tier's probe() makes it: nothing known
    try:
        probe.meta, got = decode_value(probe.key, bad)
    except CorruptObject:
        return
    except NotStored:
        raise AssertionError("a value that is there is not a plain miss")
    n = header_size(value_a)
    assert bad[:n] == value_a[:n] and len(bad) == len(value_a)  # only padding bytes (unread) may differ
    assert got.dtype == va.dtype and tuple(got.shape) == tuple(va.shape) and torch.equal(got, va)
    assert probe.meta == meta_of(va) and checksum(got.contiguous()) == probe.meta.checksum


@pytest.fixture(scope="module")
def file_objects(tmp_path_factory):
    """A file tier's directory holding two objects, and each object's path and bytes."""
    root = tmp_path_factory.mktemp("file-tier")
    (a, va), (b, vb) = sample_values()
    with strata.open_store({"tiers": [{"kind": "file", "path": str(root), "capacity": "1MiB"}]}) as store:
        assert store.put(a, va) and store.put(b, vb)
        tier = store.tiers[0]
        objects = {k: (tier.index[k.encoded].loc, tier.index[k.encoded].loc.read_bytes()) for k in (a, b)}
    for k, v in ((a, va), (b, vb)):  # the format: header, then the payload, nothing else
        raw = objects[k][1]
        n = header_size(raw)
        assert unpack_header(raw[:n]) == (k.encoded, meta_of(v)) and raw[n:] == payload_bytes(v)
    return root, objects


def _file_damage(objects, damage) -> bytes:
    (a, _), (b, _) = sample_values()
    raw_a, raw_b = objects[a][1], objects[b][1]
    if damage[0] == "mutate":
        return mutate(raw_a, damage[1])
    return raw_b if damage[1] else splice(raw_a, raw_b, header_size(raw_a), header_size(raw_b))


@SLOW
@given(value_damage)
def test_a_file_tier_read_of_a_damaged_file_is_corrupt_or_the_original(file_objects, damage):
    """A file changed under a running store (media, another process): ``read_into`` checks it."""
    root, objects = file_objects
    (a, va), _ = sample_values()
    with strata.open_store({"tiers": [{"kind": "file", "path": str(root), "capacity": "1MiB"}]}) as store:
        tier = store.tiers[0]
        e = tier.index[a.encoded]
        e.loc.write_bytes(_file_damage(objects, damage))
        out = torch.full(e.meta.shape, float("nan"), dtype=e.meta.dtype)
        try:
            tier.read_into(e, out)
        except CorruptObject:
            pass
        else:
            assert torch.equal(out, va) and checksum(out) == e.meta.checksum
        finally:
            e.loc.write_bytes(objects[a][1])


@SLOW
@given(value_damage)
def test_a_file_tier_reopened_over_a_damaged_file_drops_it_or_serves_the_original(file_objects, damage):
    """The recovery scan on open: a damaged file is discarded or (untouched where it counts) served."""
    root, objects = file_objects
    (a, va), (b, vb) = sample_values()
    shutil.rmtree(root / "objects")
    for k, (path, raw) in objects.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_file_damage(objects, damage) if k == a else raw)
    with strata.open_store({"tiers": [{"kind": "file", "path": str(root), "capacity": "1MiB"}]}) as store:
        got = store.get(a)
        assert got is None or torch.equal(got, va)
        assert torch.equal(store.get(b), vb)


_SLOT = struct.Struct("<QQQQ")  # the cxl slot: commit, offset, length, seq
_SLOTS_AT = 4096


@pytest.fixture(scope="module")
def cxl_region(tmp_path_factory):
    """A cxl region holding two objects: its bytes, and each record's (offset, length)."""
    path = tmp_path_factory.mktemp("cxl") / "region"
    (a, va), (b, vb) = sample_values()
    cfg = {"tiers": [{"kind": "cxl", "path": str(path), "size": "1MiB", "pin": "never"}]}
    with strata.open_store(cfg) as store:
        assert store.put(a, va) and store.put(b, vb)
        tier = store.tiers[0]
        records = {k: tier.index[k.encoded].loc[1:2] + (tier.index[k.encoded].size,) for k in (a, b)}
    region = path.read_bytes()
    for k, v in ((a, va), (b, vb)):  # the format: header at the record's start, payload at 64 bytes
        off, length = records[k]
        rec = region[off : off + length]
        n = header_size(rec)
        assert unpack_header(rec[:n]) == (k.encoded, meta_of(v))
        assert rec[-(-n // 64) * 64 :] == payload_bytes(v)
        slots = [_SLOT.unpack_from(region, _SLOTS_AT + 32 * i) for i in range(256)]
        assert any(s[1] == off and s[2] == length for s in slots if s[0])
    return path, cfg, region, records


@SLOW
@given(value_damage)
def test_a_cxl_record_damaged_in_the_region_is_dropped_or_served_as_the_original(cxl_region, damage):
    path, cfg, region, records = cxl_region
    (a, va), (b, vb) = sample_values()
    (off_a, len_a), (off_b, len_b) = records[a], records[b]
    rec_a, rec_b = region[off_a : off_a + len_a], region[off_b : off_b + len_b]
    if damage[0] == "mutate":
        bad = mutate(rec_a, damage[1], resize=False)  # a mapped record keeps its length
    elif damage[1]:
        bad = rec_b  # b's whole record where a's slot points
    else:
        bad = splice(rec_a, rec_b, header_size(rec_a), header_size(rec_b))
    assert len(bad) == len_a
    damaged = bytearray(region)
    damaged[off_a : off_a + len_a] = bad
    path.write_bytes(bytes(damaged))
    with strata.open_store(cfg) as store:
        got = store.get(a)
        assert got is None or torch.equal(got, va)
        assert torch.equal(store.get(b), vb)
        for k, v in ((a, va), (b, vb)):
            with store.lease(k) as view:
                assert view is None or torch.equal(view, v)


def test_a_value_of_another_key_is_never_served_for_this_one():
    """The plain case the fuzzers above draw at random, spelled out for each decoder."""
    pytest.importorskip("redis")
    from strata.store.tiers.backing import decode_value

    (a, va), (b, vb) = sample_values()
    value_b, _ = _redis_value(b.encoded, vb)
    with pytest.raises(CorruptObject, match="another key"):
        decode_value(a.encoded, value_b)


def _inconsistent(key: bytes) -> tuple[bytes, bytes]:
    """A header with a valid checksum claiming a float32 (4, 6) tensor of 10 payload bytes (not
    96), and those 10 bytes, their checksum right: what a buggy or foreign writer could leave."""
    payload = bytes(range(10))
    meta = ObjectMeta(KIND_TENSOR, torch.float32, (4, 6), len(payload), checksum(torch.frombuffer(
        bytearray(payload), dtype=torch.uint8)))
    return pack_header(key, meta), payload


def test_a_redis_value_whose_header_sizes_disagree_is_corrupt():
    pytest.importorskip("redis")
    from strata.store.tiers.backing import decode_value

    a = Key("kv", "fuzz", "a")
    head, payload = _inconsistent(a.encoded)
    value = head + bytes(-len(head) % 16) + payload
    with pytest.raises(CorruptObject):  # not a RuntimeError from viewing 10 bytes as (4, 6) float32
        decode_value(a.encoded, value)


def test_a_cxl_record_whose_header_sizes_disagree_is_dropped_on_open(cxl_region, tmp_path):
    _, cfg, region, records = cxl_region
    (a, _), (b, vb) = sample_values()
    off, _ = records[a]
    head, payload = _inconsistent(a.encoded)
    start = off + -(-len(head) // 64) * 64
    length = start - off + len(payload)
    damaged = bytearray(region)
    damaged[off : off + len(head)] = head
    damaged[start : start + len(payload)] = payload
    for i in range(256):  # a's slot, rewritten for the new length and committed as a put would
        commit, o, _, seq = _SLOT.unpack_from(damaged, _SLOTS_AT + 32 * i)
        if commit and o == off:
            word = xxhash.xxh3_64_intdigest(struct.pack("<QQQ", off, length, seq)) | 1
            _SLOT.pack_into(damaged, _SLOTS_AT + 32 * i, word, off, length, seq)
    path = tmp_path / "region"
    path.write_bytes(bytes(damaged))
    cfg = {"tiers": [dict(cfg["tiers"][0], path=str(path))]}
    with strata.open_store(cfg) as store:  # not a RuntimeError out of open_store
        assert store.get(a) is None and torch.equal(store.get(b), vb)
