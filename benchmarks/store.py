"""Store throughput and latency per tier, each next to a same-run baseline.

    python benchmarks/store.py [--quick] [--tiers cpu,file,cxl,redis,redis-cluster,mooncake]

CPU tier: put vs ``dst.copy_(src)`` into preallocated memory, get vs ``src.clone()``,
get_into vs ``dst.copy_(src)``. File tier: put vs a plain write+rename of the same
bytes, get vs a plain read into a preallocated buffer. CXL tier (a mapped file under
``/dev/shm``, or ``$STRATA_BENCH_CXL_DIR``): put and get_into vs a plain copy into and out of
a mapping of the same kind, with the payload checksum (``verify``, the default) and
without; with CUDA also ``get_into`` a GPU tensor from the registered mapping (``h2d``) vs
a copy from pinned memory; and the re-read of the slot table after another process's put
(``re-sync``) vs the same re-read parsing every header. Redis tier (a redis-server started on a free port of 127.0.0.1, or ``--redis-url``):
put and get vs the plain ``redis`` client's ``set`` and ``get`` of the same bytes over the
same connection settings, and ``get_many`` of 16 keys vs the same GETs in one client pipeline;
and weights streamed through a CPU tier a third their size (``stream-ke``: a pass of ``get_into``
with ``param``'s default ``promote: keep``; ``stream-ev``: with ``promote: evict``, each read a
miss read from Redis and promoted) vs the client's GETs of the same bytes.
Redis Cluster (``--tiers redis-cluster``: 3 primaries, ``--cluster-replicas`` replicas each,
redis-server processes started on loopback, and one more single redis-server in the same run):
``put_many`` and ``get_many`` of 1 MiB and 32 MiB values through a redis tier with ``cluster:
true`` vs the same calls through a redis tier on the single server, timed pass by pass in turn,
so that both see the same load of a shared machine. Mooncake Store (``--tiers mooncake``: a
mooncake_master and one store-server process holding the pool's segment, both started here,
tests/mooncake_server.py): ``put_many`` and ``get_many`` of 1 MiB and 32 MiB values through a
store whose only tier is mooncake (``segment: 0``) vs the Mooncake client's own batch calls on
the same bytes from the same process (another ``MooncakeDistributedStore``, ``segment`` 0, the
same buffer): ``batch_upsert_from`` for puts, ``batch_get_buffer`` (what the tier calls: values
left in the client's buffer) and ``batch_get_into`` (into preallocated memory) for gets, timed
in turn as the cluster rows are. The working set cycles through enough distinct tensors to leave the CPU caches
for sizes of 1 MiB and up.
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import strata  # noqa: E402
from strata import Key  # noqa: E402

SIZES = {"4KiB": 4 << 10, "1MiB": 1 << 20, "32MiB": 32 << 20}


def timed(fn, items, repeat):
    """Median seconds per call of ``fn(item)`` over ``repeat`` passes through ``items``."""
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for it in items:
            fn(it)
        samples.append((time.perf_counter() - t0) / len(items))
    return statistics.median(samples)


def row(tier, op, size_name, nbytes, t, base, base_name):
    gbs = nbytes / t / 1e9
    print(f"{tier:5} {op:9} {size_name:6} {gbs:8.2f} GB/s {t * 1e6:10.1f} us   "
          f"baseline {base_name:12} {nbytes / base / 1e9:8.2f} GB/s {base * 1e6:10.1f} us   ratio {t / base:5.2f}x")


def bench_cpu(size_name, nbytes, count, repeat):
    srcs = [torch.randint(0, 255, (nbytes,), dtype=torch.uint8) for _ in range(count)]
    dsts = [torch.empty(nbytes, dtype=torch.uint8) for _ in range(count)]
    for d in dsts:
        d.fill_(1)  # touch the baseline's pages, as the store's slab is touched by warm-up
    keys = [Key("kv", "bench", f"{size_name}-{i}") for i in range(count)]
    cap = 3 * nbytes * count + (64 << 20)
    with strata.open_store({"tiers": [{"kind": "cpu", "capacity": cap, "pin": "auto"}]}) as store:
        for _ in range(3):  # warm-up: every extent of the slab written at least once
            for k, s in zip(keys, srcs):
                store.put(k, s)
        pairs = list(zip(keys, srcs, dsts))
        base_copy = timed(lambda p: p[2].copy_(p[1]), pairs, repeat)
        put = timed(lambda p: store.put(p[0], p[1]), pairs, repeat)
        row("cpu", "put", size_name, nbytes, put, base_copy, "copy_")
        base_clone = timed(lambda p: p[1].clone(), pairs, repeat)
        get = timed(lambda p: store.get(p[0]), pairs, repeat)
        row("cpu", "get", size_name, nbytes, get, base_clone, "clone")
        get_into = timed(lambda p: store.get_into(p[0], p[2]), pairs, repeat)
        row("cpu", "get_into", size_name, nbytes, get_into, base_copy, "copy_")


def bench_file(size_name, nbytes, count, repeat, root):
    srcs = [torch.randint(0, 255, (nbytes,), dtype=torch.uint8) for _ in range(count)]
    dst = torch.empty(nbytes, dtype=torch.uint8)
    keys = [Key("kv", "bench", f"{size_name}-{i}") for i in range(count)]
    plain = os.path.join(root, "plain")
    os.makedirs(plain, exist_ok=True)

    def plain_write(i):
        tmp = os.path.join(plain, f"{i}.tmp")
        with open(tmp, "wb") as f:
            f.write(memoryview(srcs[i].numpy()))
        os.replace(tmp, os.path.join(plain, f"{i}.bin"))

    def plain_read(i):
        with open(os.path.join(plain, f"{i}.bin"), "rb") as f:
            f.readinto(memoryview(dst.numpy()))

    cfg = {"tiers": [{"kind": "file", "path": os.path.join(root, "tier"), "capacity": 3 * nbytes * count + (64 << 20)}]}
    idx = list(range(count))
    with strata.open_store(cfg) as store:
        base_w = timed(plain_write, idx, repeat)
        put = timed(lambda i: store.put(keys[i], srcs[i]), idx, repeat)
        row("file", "put", size_name, nbytes, put, base_w, "write")
        base_r = timed(plain_read, idx, repeat)
        get_into = timed(lambda i: store.get_into(keys[i], dst), idx, repeat)
        row("file", "get_into", size_name, nbytes, get_into, base_r, "read")


def bench_cxl(size_name, nbytes, count, repeat, root):
    srcs = [torch.randint(0, 255, (nbytes,), dtype=torch.uint8) for _ in range(count)]
    dst = torch.empty(nbytes, dtype=torch.uint8)
    dst.fill_(1)
    keys = [Key("kv", "bench", f"{size_name}-{i}") for i in range(count)]
    plain_path = os.path.join(root, "plain-map")
    with open(plain_path, "wb") as f:
        f.truncate(nbytes * count)
    with open(plain_path, "r+b") as f:
        plain_map = mmap.mmap(f.fileno(), nbytes * count)
    plain = torch.frombuffer(plain_map, dtype=torch.uint8)
    plain.fill_(1)  # touch it, as the warm-up touches the tier's region
    views = [plain[i * nbytes:(i + 1) * nbytes] for i in range(count)]
    idx = list(range(count))
    base_w = timed(lambda i: views[i].copy_(srcs[i]), idx, repeat)
    base_r = timed(lambda i: dst.copy_(views[i]), idx, repeat)
    for verify in (True, False):
        region = os.path.join(root, f"region-{size_name}-{verify}")
        cfg = {"tiers": [{"kind": "cxl", "path": region, "size": 3 * nbytes * count + (64 << 20), "verify": verify}]}
        with strata.open_store(cfg) as store:
            for _ in range(2):  # warm-up: the region's pages touched
                for k, src in zip(keys, srcs):
                    store.put(k, src)
            name = "cxl" if verify else "cxl-nv"
            put = timed(lambda i: store.put(keys[i], srcs[i]), idx, repeat)
            row(name, "put", size_name, nbytes, put, base_w, "copy_ in")
            get_into = timed(lambda i: store.get_into(keys[i], dst), idx, repeat)
            row(name, "get_into", size_name, nbytes, get_into, base_r, "copy_ out")
        os.unlink(region)
    if torch.cuda.is_available():
        bench_cxl_h2d(size_name, nbytes, count, repeat, root, srcs, keys)
    del views, plain
    plain_map.close()
    os.unlink(plain_path)


def bench_cxl_sync(repeat, root, quick):
    """What every process sharing a region pays once for each change another process made: the
    re-read of the slot table (here by a ``contains`` after the other store's put), only the slots
    that changed since the last read indexed, vs the same re-read indexing every committed slot and
    rebuilding the allocator (as every re-read did before, headers still cached by slot). Timed in
    turn, median."""
    size, n = ("256MiB", 1000) if quick else ("1GiB", 5000)
    cfg = {"tiers": [{"kind": "cxl", "path": os.path.join(root, "region-sync"), "size": size}]}
    with strata.open_store(cfg) as mine, strata.open_store(cfg) as other:
        mine.put_many([(Key("kv", "sync", f"k{i}"), torch.ones(64)) for i in range(n)])
        tier, probe = mine.tiers[0], Key("kv", "sync", "k0")

        def resync(whole: bool) -> float:
            other.put(Key("kv", "sync", "change"), torch.ones(64))  # a change ``mine`` has not seen
            if whole:
                tier._table = None  # no copy to compare with: every slot is indexed again
            t0 = time.perf_counter()
            mine.contains(probe)
            return time.perf_counter() - t0

        resync(False)
        pairs = [(resync(False), resync(True)) for _ in range(3 * repeat)]
    os.unlink(cfg["tiers"][0]["path"])
    t, base = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
    print(f"cxl   re-sync   {size} region, {n} objects {t * 1e3:8.2f} ms   baseline index every slot "
          f"{base * 1e3:8.2f} ms   ratio {t / base:5.3f}x")


def bench_cxl_h2d(size_name, nbytes, count, repeat, root, srcs, keys):
    """get_into a GPU tensor from the region registered with CUDA vs a copy from pinned memory."""
    gpu = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    pinned = [s.pin_memory() for s in srcs]
    idx = list(range(count))

    def h2d(i):
        gpu.copy_(pinned[i], non_blocking=True)
        torch.cuda.synchronize()

    base = timed(h2d, idx, repeat)
    for verify in (True, False):
        cfg = {"tiers": [{"kind": "cxl", "path": os.path.join(root, f"h2d-{size_name}-{verify}"),
                          "size": 3 * nbytes * count + (64 << 20), "verify": verify}]}
        with strata.open_store(cfg) as store:
            tier = store.tiers[0]
            if not tier.pinned:
                print(f"cxl h2d: the mapping is not registered ({tier.stats()['cuda']['reason']})")
            for k, src in zip(keys, srcs):
                store.put(k, src)

            def get(i):
                store.get_into(keys[i], gpu)
                torch.cuda.synchronize()

            got = timed(get, idx, repeat)
            row("cxl" if verify else "cxl-nv", "h2d", size_name, nbytes, got, base, "pinned h2d")


def bench_redis(size_name, nbytes, count, repeat, url):
    import redis

    srcs = [torch.randint(0, 255, (nbytes,), dtype=torch.uint8) for _ in range(count)]
    raw = [s.numpy().tobytes() for s in srcs]
    dst = torch.empty(nbytes, dtype=torch.uint8)
    keys = [Key("kv", "bench", f"{size_name}-{i}") for i in range(count)]
    plain = redis.Redis.from_url(url, socket_timeout=5)
    names = [f"plain:{size_name}:{i}".encode() for i in range(count)]
    idx = list(range(count))
    cfg = {"tiers": [{"kind": "redis", "url": url, "timeout_ms": 5000, "key_prefix": "bench:"}]}
    with strata.open_store(cfg) as store:
        for i in idx:  # warm-up: keys exist on both sides, connections open
            plain.set(names[i], raw[i])
            store.put(keys[i], srcs[i])
        base_w = timed(lambda i: plain.set(names[i], raw[i]), idx, repeat)
        put = timed(lambda i: store.put(keys[i], srcs[i]), idx, repeat)
        row("redis", "put", size_name, nbytes, put, base_w, "client set")
        base_r = timed(lambda i: plain.get(names[i]), idx, repeat)
        get = timed(lambda i: store.get(keys[i]), idx, repeat)
        row("redis", "get", size_name, nbytes, get, base_r, "client get")
        get_into = timed(lambda i: store.get_into(keys[i], dst), idx, repeat)
        row("redis", "get_into", size_name, nbytes, get_into, base_r, "client get")
        # a batch of 16 (a 4K-token prompt's chunks), per key: vs the same GETs in one client pipeline
        groups = [idx[lo:lo + 16] for lo in range(0, count - 15, 16)] or [idx]

        def plain_many(group):
            pipe = plain.pipeline(transaction=False)
            for i in group:
                pipe.get(names[i])
            pipe.execute()

        per = len(groups[0])
        base_m = timed(plain_many, groups, repeat) / per
        many = timed(lambda g: store.get_many([keys[i] for i in g]), groups, repeat) / per
        row("redis", "get_many", size_name, nbytes, many, base_m, "pipelined")
    plain.flushdb()
    plain.close()


def bench_redis_stream(size_name, nbytes, count, repeat, url):
    """Weights streamed through a CPU tier a third their size over Redis (``evict: lower``, write
    through): a pass of ``get_into`` over all of them in order vs the plain client's GETs of the same
    bytes, with ``param``'s default ``promote: keep`` (the CPU tier keeps the third it holds: those
    hit, the rest are read from Redis and not copied up) and with ``promote: evict`` (each read
    promoted while another is evicted: under LRU, every read a miss); per pass, the CPU hits and
    the objects written to Redis (those evicted are still there: none)."""
    import redis

    srcs = [torch.randint(0, 255, (nbytes,), dtype=torch.uint8) for _ in range(count)]
    dst = torch.empty(nbytes, dtype=torch.uint8)
    plain = redis.Redis.from_url(url, socket_timeout=5)
    names = [f"plain-stream:{size_name}:{i}".encode() for i in range(count)]
    idx = list(range(count))
    for i in idx:
        plain.set(names[i], srcs[i].numpy().tobytes())
    base = timed(lambda i: plain.get(names[i]), idx, repeat)
    per_mode = {}
    for promote in ("keep", "evict"):
        keys = [Key("param", "bench-stream", f"{size_name}-{promote}-{i}") for i in idx]
        cfg = {"tiers": [{"kind": "cpu", "capacity": count // 3 * (nbytes + 4096), "write": "through"},
                         {"kind": "redis", "url": url, "timeout_ms": 5000, "key_prefix": "bench-stream:"}],
               "namespaces": {"param": {"evict": "lower", "promote": promote}}}
        with strata.open_store(cfg) as store:
            for i in idx:
                store.put(keys[i], srcs[i])
            before = store.stats()["tiers"]
            got = per_mode[promote] = timed(lambda i: store.get_into(keys[i], dst), idx, repeat)
            after = store.stats()["tiers"]
            hits = (after["cpu"]["hits"] - before["cpu"]["hits"]) / repeat
            written = (after["redis"]["puts"] - before["redis"]["puts"]) / repeat
            row("redis", "stream-" + promote[:2], size_name, nbytes, got, base, "client get")
            print(f"      (promote: {promote}: a pass over {count} weights through a CPU tier a third their "
                  f"size hit {hits:g} in the CPU tier and wrote {written:g} to Redis)")
    print(f"      keep / evict per object: {per_mode['keep'] / per_mode['evict']:.2f}x")
    plain.close()


def timed_in_turn(fns, items, repeat):
    """Per function, the median seconds per item of ``fn(item)`` over ``repeat`` passes, the
    functions' passes interleaved (A, B, A, B, ...): a comparison on shared cores, where the
    load moves during a run, sees the same load on both sides."""
    samples = [[] for _ in fns]
    for _ in range(repeat):
        for fn, got in zip(fns, samples):
            t0 = time.perf_counter()
            for it in items:
                fn(it)
            got.append((time.perf_counter() - t0) / len(items))
    return [statistics.median(s) for s in samples]


# Redis Cluster: values per batch (a batch spans the shards: 16 chunks of a 4K-token prompt at
# 1 MiB; 6 at 32 MiB) and distinct values in the working set (3 batches; 1 with --quick).
CLUSTER_SIZES = {"1MiB": (1 << 20, 16), "32MiB": (32 << 20, 6)}


def bench_redis_cluster(size_name, nbytes, per_batch, batches, repeat, single_url, cluster_url):
    """put_many and get_many through a redis tier on a cluster vs the same on one server, per
    value; the ratio is cluster / single server."""
    srcs = [torch.randint(0, 255, (nbytes,), dtype=torch.uint8) for _ in range(per_batch * batches)]
    keys = [Key("kv", "bench", f"{size_name}-{i}") for i in range(len(srcs))]
    groups = [list(range(lo, lo + per_batch)) for lo in range(0, len(srcs), per_batch)]
    tier = {"kind": "redis", "timeout_ms": 5000, "key_prefix": "bench:"}
    with strata.open_store({"tiers": [{**tier, "url": single_url}]}) as single, \
            strata.open_store({"tiers": [{**tier, "url": cluster_url, "cluster": True}]}) as cluster:
        stores = (single, cluster)
        for store in stores:  # warm-up: every key exists, every node's connection is open
            for g in groups:
                assert store.put_many([(keys[i], srcs[i]) for i in g]) == [True] * len(g)
                assert all(v is not None for v in store.get_many([keys[i] for i in g]))
        put = [lambda g, s=s: s.put_many([(keys[i], srcs[i]) for i in g]) for s in stores]
        base, got = timed_in_turn(put, groups, repeat)
        row("redis-cluster", "put_many", size_name, nbytes, got / per_batch, base / per_batch, "1 server")
        get = [lambda g, s=s: s.get_many([keys[i] for i in g]) for s in stores]
        base, got = timed_in_turn(get, groups, repeat)
        row("redis-cluster", "get_many", size_name, nbytes, got / per_batch, base / per_batch, "1 server")
        hits = cluster.stats()["tiers"]["redis"]
        assert hits["misses"] == 0 and hits["errors"] == 0, hits  # a miss would time nothing


def run_redis_cluster(args, repeat) -> None:
    """A 3-primary cluster and a single server, both started here (tests/redis_server.py), then
    both rows per size; stopped whatever happens."""
    from redis_server import REDIS_SERVER, ClusterServers, RedisServer

    if REDIS_SERVER is None:
        print("redis-cluster: skipped (no redis-server on PATH)")
        return
    with tempfile.TemporaryDirectory() as root:
        single = RedisServer(root).start()  # its --dir: root; the cluster's nodes: root/cluster/PORT
        try:
            servers = ClusterServers(os.path.join(root, "cluster"), masters=3, replicas=args.cluster_replicas).start()
            try:
                print(f"redis-cluster: 3 primaries, {args.cluster_replicas} replica(s) each; baseline: one redis-server")
                for size_name, (nbytes, per_batch) in CLUSTER_SIZES.items():
                    bench_redis_cluster(size_name, nbytes, per_batch, 1 if args.quick else 3, repeat,
                                        single.url, servers.url)
            finally:
                servers.stop()
        finally:
            single.stop()


# Mooncake Store: the shapes of the redis-cluster rows.
MOONCAKE_SIZES = CLUSTER_SIZES
MOONCAKE_BUFFER = 256 << 20  # each client's local buffer: a 32 MiB batch's values fit in it


def bench_mooncake(size_name, nbytes, per_batch, batches, repeat, master):
    """put_many and get_many through a store whose only tier is mooncake vs the client's own
    batch calls on the same bytes, per value; the ratio is Strata / client."""
    from mooncake.store import MooncakeDistributedStore, ReplicateConfig

    srcs = [torch.randint(0, 255, (nbytes,), dtype=torch.uint8) for _ in range(per_batch * batches)]
    arrays = [s.numpy() for s in srcs]
    outs = [torch.empty(nbytes, dtype=torch.uint8).numpy() for _ in range(per_batch)]
    for o in outs:
        o.fill(1)  # touch the baseline's destination pages
    keys = [Key("kv", "bench", f"{size_name}-{i}") for i in range(len(srcs))]
    names = [f"plain/{size_name}/{i}" for i in range(len(srcs))]
    groups = [list(range(lo, lo + per_batch)) for lo in range(0, len(srcs), per_batch)]
    client = MooncakeDistributedStore()
    rc = client.setup("127.0.0.1", master.metadata_url, 0, MOONCAKE_BUFFER, "tcp", "", master.master)
    assert rc == 0, f"the baseline client's set-up failed ({rc})"
    cfg = ReplicateConfig()
    cfg.replica_num = 1
    tier = {"kind": "mooncake", "master": master.master, "metadata_url": master.metadata_url,
            "admin_url": master.admin_url, "segment": 0, "buffer": MOONCAKE_BUFFER, "timeout_ms": 5000,
            "key_prefix": "bench:"}

    def raw_put(g):
        codes = client.batch_upsert_from([names[i] for i in g], [arrays[i].ctypes.data for i in g],
                                         [nbytes] * len(g), cfg)
        assert codes == [0] * len(g), codes

    def raw_get_buffer(g):
        got = client.batch_get_buffer([names[i] for i in g])
        assert all(h is not None and h.size() == nbytes for h in got)

    def raw_get_into(g):
        got = client.batch_get_into([names[i] for i in g], [o.ctypes.data for o in outs], [nbytes] * len(g))
        assert got == [nbytes] * len(g), got

    try:
        with strata.open_store({"tiers": [tier]}) as store:
            for g in groups:  # warm-up: every value stored on both sides, read once
                assert store.put_many([(keys[i], srcs[i]) for i in g]) == [True] * len(g)
                assert all(v is not None for v in store.get_many([keys[i] for i in g]))
                raw_put(g)
                raw_get_into(g)
            put = lambda g: store.put_many([(keys[i], srcs[i]) for i in g])  # noqa: E731
            base, got = timed_in_turn([raw_put, put], groups, repeat)
            row("mooncake", "put_many", size_name, nbytes, got / per_batch, base / per_batch, "upsert_from")
            get = lambda g: store.get_many([keys[i] for i in g])  # noqa: E731
            buf, into, got = timed_in_turn([raw_get_buffer, raw_get_into, get], groups, repeat)
            row("mooncake", "get_many", size_name, nbytes, got / per_batch, buf / per_batch, "get_buffer")
            row("mooncake", "get_many", size_name, nbytes, got / per_batch, into / per_batch, "get_into")
            s = store.stats()["tiers"]["mooncake"]
            assert s["misses"] == 0 and s["errors"] == 0, s  # a miss would time nothing
            assert store.get_many([keys[0]])[0].equal(srcs[0])
    finally:
        client.batch_remove(names, True)
        client.close()


def run_mooncake(args, repeat) -> None:
    """A mooncake_master and a store server holding the pool (tests/mooncake_server.py), then
    both rows per size; stopped whatever happens."""
    from mooncake_server import MooncakeMaster, StoreServer, master_binary

    try:
        import mooncake.store  # noqa: F401
    except ImportError as e:
        print(f"mooncake: skipped (the client does not import: {e}; pip install 'strata[mooncake]', libibverbs1)")
        return
    if master_binary() is None:
        print("mooncake: skipped (mooncake_master is missing from the mooncake package)")
        return
    batches = 1 if args.quick else 3
    # both sides' values at once, with room to spare: upserts may allocate before freeing
    segment = 3 * sum(n * per for n, per in MOONCAKE_SIZES.values()) * batches
    with tempfile.TemporaryDirectory() as root:
        master = MooncakeMaster(root).start()
        try:
            with StoreServer(master, segment):
                print(f"mooncake: one master, one store server holding {segment >> 20} MiB (tcp, loopback); "
                      f"clients segment 0, buffer {MOONCAKE_BUFFER >> 20} MiB; baseline: the client's batch calls")
                for size_name, (nbytes, per_batch) in MOONCAKE_SIZES.items():
                    bench_mooncake(size_name, nbytes, per_batch, batches, repeat, master)
        finally:
            master.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (smoke run)")
    ap.add_argument("--tiers", default="cpu,file,cxl,redis", help="which tiers to measure, comma separated "
                    "(cpu, file, cxl, redis, redis-cluster, mooncake; default: all but redis-cluster and mooncake)")
    ap.add_argument("--redis-url", help="an existing Redis to measure against (default: start redis-server)")
    ap.add_argument("--cluster-replicas", type=int, default=1,
                    help="replicas per primary of the redis-cluster rows' cluster (default 1)")
    args = ap.parse_args()
    which = set(args.tiers.split(","))
    repeat = 3 if args.quick else 7
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cuda {torch.cuda.is_available()}")
    for size_name, nbytes in SIZES.items() if "cpu" in which else ():
        count = max(8, min(2048, (256 << 20) // nbytes))  # >= 256 MiB working set for large sizes
        if args.quick:
            count = max(4, count // 8)
        bench_cpu(size_name, nbytes, count, repeat)
    with tempfile.TemporaryDirectory(dir=os.environ.get("STRATA_BENCH_DIR")) as root:
        for size_name, nbytes in SIZES.items() if "file" in which else ():
            count = max(4, min(512, (128 << 20) // nbytes))
            if args.quick:
                count = max(4, count // 8)
            bench_file(size_name, nbytes, count, repeat, root)
    shm = os.environ.get("STRATA_BENCH_CXL_DIR", "/dev/shm" if os.path.isdir("/dev/shm") else None)
    with tempfile.TemporaryDirectory(dir=shm) as root:
        for size_name, nbytes in SIZES.items() if "cxl" in which else ():
            count = max(4, min(512, (128 << 20) // nbytes))
            if args.quick:
                count = max(4, count // 8)
            bench_cxl(size_name, nbytes, count, repeat, root)
        if "cxl" in which:
            bench_cxl_sync(repeat, root, args.quick)
    if "redis-cluster" in which:
        run_redis_cluster(args, repeat)
    if "mooncake" in which:
        run_mooncake(args, repeat)
    if "redis" in which:
        with tempfile.TemporaryDirectory() as root:
            from redis_server import REDIS_SERVER, RedisServer

            if not args.redis_url and REDIS_SERVER is None:
                print("redis: skipped (no redis-server on PATH; pass --redis-url to use a running server)")
                return
            server = None if args.redis_url else RedisServer(root).start()
            try:
                for size_name, nbytes in SIZES.items():
                    count = max(4, min(256, (64 << 20) // nbytes))
                    if args.quick:
                        count = max(4, count // 8)
                    bench_redis(size_name, nbytes, count, repeat, args.redis_url or server.url)
                for size_name, nbytes in SIZES.items():
                    count = max(6, min(48, (96 << 20) // nbytes))
                    bench_redis_stream(size_name, nbytes, count, repeat, args.redis_url or server.url)
            finally:
                if server is not None:
                    server.stop()


if __name__ == "__main__":
    main()
