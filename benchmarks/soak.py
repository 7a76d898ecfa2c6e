"""Soak: threads and processes hammering one ``cpu -> cxl -> file`` store, with SIGKILLs.

    python benchmarks/soak.py [--seconds 120] [--procs 2] [--threads 2] [--kill-every 2.0] [--dir DIR]
                              [--layout cpu-cxl-file|cpu-cxl|cxl-file|cpu-file]

Worker processes (``--procs``, each with ``--threads`` threads) put, get, lease and delete random
keys of one store in a temporary directory: a small cpu tier (write-back, so evictions demote),
a cxl region file and a file tier, all small, so eviction and demotion happen all the time
(``--layout`` takes others: the cpu tier over the region alone, the region on top of the file
tier, the cpu tier over the file tier; ``LAYOUTS``). Every
``--kill-every`` seconds (on average) one worker is SIGKILLed and a new one takes its place.

Every value is self-describing (``reliability.value_of``), so each read is checked on the spot
(a lease twice: once more after holding it a moment while the others put and delete):
since the processes share the persistent tiers, a read may return any version of that key that
any writer ever put, or None; never other bytes. Afterwards each read's version is checked
against every writer's log (written before each put starts). Prints ops/s, divergences and the
damaged records the workers cleared from the region (a committed slot whose record fails its
header, or a copy of another record over its own: no SIGKILL of a process may leave one; twins,
which a put of the same value killed midway leaves too, are printed apart), and exits 1 on a
divergence, a damaged record or a worker that died without being killed.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reliability  # noqa: E402
from reliability import AppendLog, identify, key, raw_bytes, read_log, value_of  # noqa: E402

_HOLD_S = 0.002  # a lease is held this long after its check, then checked again
_PROGRESS_EVERY = 100  # a thread logs its op count this often (what a killed worker did is counted from it)


# the stores a soak may hammer (``--layout``): the tiers, top first, of each
LAYOUTS = {
    "cpu-cxl-file": "cpu 512 KiB (write-back) -> cxl 4 MiB region -> file 2 MiB",
    "cpu-cxl": "cpu 512 KiB (write-through) -> cxl 4 MiB region",
    "cxl-file": "cxl 2 MiB region (write-back) -> file 2 MiB",
    "cpu-file": "cpu 512 KiB (write-back) -> file 2 MiB",
}


def store_config(root: Path, layout: str = "cpu-cxl-file") -> dict:
    tiers = {
        "cpu": {"kind": "cpu", "capacity": "512KiB", "write": "back" if "file" in layout else "through"},
        "cxl": {"kind": "cxl", "path": str(root / "region"), "size": "2MiB" if layout == "cxl-file" else "4MiB",
                **({"write": "back"} if layout == "cxl-file" else {})},
        "file": {"kind": "file", "path": str(root / "files"), "capacity": "2MiB"},
    }
    return {"tiers": [tiers[name] for name in layout.split("-")]}


def identify_raw(name: str, raw: bytes) -> str | None:
    """Like ``identify`` for a lease view, which shows the stored bytes whatever the value's type."""
    try:
        parts = raw.split(b"|", 4)
        if len(parts) < 5 or parts[0] != b"RV1" or parts[1].decode() != name:
            return None
        version, length = parts[2].decode(), int(parts[3])
    except (ValueError, UnicodeDecodeError):
        return None
    return version if raw_bytes(value_of(name, version, length)) == raw else None


def _thread(store, wid: int, tid: int, names: list[str], seed: int, stop: str, log: AppendLog,
            reads_path: Path) -> None:
    rng = random.Random(seed)
    region = next((t for t in store.tiers if t.kind == "cxl"), None)  # its ``discarded``: damaged records cleared
    seq = n = hits = 0
    with open(reads_path, "a", buffering=1) as reads:  # line-buffered: a kill loses no checked read
        while n % 16 or not os.path.exists(stop):
            name = rng.choice(names)
            r = rng.random()
            n += 1
            if r < 0.40:
                ver = f"{wid}.{tid}.{seq}"
                seq += 1
                log.line("s", name, ver)  # before the put starts: a reader elsewhere may see it at once
                store.put(key(name), value_of(name, ver, rng.randint(256, 48 << 10)))
            elif r < 0.48:
                store.delete(key(name))
            elif r < 0.60:
                with store.lease(key(name)) as view:
                    first = None if view is None else raw_bytes(view)
                    seen = None if view is None else identify_raw(name, first)
                    hits += _record(log, reads, name, view, seen, "lease")
                    if seen is not None:  # held while the other processes put and delete: must not change
                        time.sleep(_HOLD_S)
                        if raw_bytes(view) != first:
                            log.line("X", name, "lease-held", seen, len(first), raw_bytes(view)[:40].hex())
            else:
                got = store.get(key(name))
                hits += _record(log, reads, name, got, None if got is None else identify(name, got), "get")
            if n % _PROGRESS_EVERY == 0:
                log.line("n", tid, n, hits, *_damage(region))
    log.line("n", tid, n, hits, *_damage(region))


def _record(log: AppendLog, reads, name: str, got, seen: str | None, how: str) -> int:
    """Check one read (a divergence is logged at once); 1 for a hit, 0 for a miss."""
    if got is None:
        return 0
    if seen is None:
        shape = "bytes" if isinstance(got, bytes) else f"{got.dtype}{tuple(got.shape)}"
        log.line("X", name, how, shape, len(raw_bytes(got)), raw_bytes(got)[:40].hex())
    else:
        reads.write(f"r {name} {seen}\n")
    return 1


def _damage(region) -> tuple[int, int]:
    """The region's records cleared as damage no crash explains, and its twins (a copy elsewhere, or
    the same value's older version a killed put left: ``CxlTier``'s docstring)."""
    return (region.discarded - region.twins, region.twins) if region is not None else (0, 0)


def _worker(cfg: dict, wid: int, threads: int, names: list[str], seed: int, stop: str, logdir: str) -> None:
    """One worker process: ``threads`` threads over one store until ``stop`` exists (a file, not an
    Event: a worker SIGKILLed while holding an Event's lock would stop the others forever)."""
    reliability.use_namespace()
    import strata

    log = AppendLog(os.path.join(logdir, f"w{wid}.log"))
    errors: list[str] = []
    with strata.open_store(cfg) as store:
        def run(tid: int) -> None:
            try:
                _thread(store, wid, tid, names, seed * 1000 + tid, stop, log,
                        Path(logdir) / f"w{wid}-t{tid}.reads")
            except BaseException as e:  # a thread that raises fails the worker (exit 1)
                errors.append(f"thread {tid}: {type(e).__name__}: {e}")
                log.line("E", tid, f"{type(e).__name__}: {e}".replace("\n", " "))

        ts = [threading.Thread(target=run, args=(tid,)) for tid in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        s = store.stats()
    faults = sum(reliability.fault_counters(t) for t in s["tiers"].values())
    evictions = ",".join(f"{name}={t['evictions']}" for name, t in s["tiers"].items())
    log.line("F", faults, s["writeback"]["dropped_dirty"], evictions)
    if errors:
        sys.exit(1)


def soak(seconds: float, procs: int, threads: int, kill_every: float, keys: int, root: Path, seed: int,
         layout: str = "cpu-cxl-file") -> dict:
    rng = random.Random(seed)
    cfg = store_config(root, layout)
    logdir = root / "logs"
    logdir.mkdir(parents=True)
    stop = str(root / "stop")
    names = [f"k{i}" for i in range(keys)]
    ctx = reliability.context()
    wid = 0
    live: dict[int, object] = {}  # wid -> process
    ended: dict[int, object] = {}  # wid -> exit code (or "hung") of workers that ended unkilled
    killed = 0

    def spawn() -> None:
        nonlocal wid
        p = ctx.Process(target=_spawn_target, args=(cfg, wid, threads, names, rng.randrange(1 << 30), stop,
                                                    str(logdir)), daemon=True)
        p.start()
        live[wid] = p
        wid += 1

    t0 = time.monotonic()
    for _ in range(procs):
        spawn()
    deadline = t0 + seconds
    while True:
        now = time.monotonic()
        if now >= deadline:
            break
        time.sleep(min(deadline - now, rng.expovariate(1 / kill_every)))  # the random moment of the next kill
        for w, p in list(live.items()):  # a worker that ended by itself is a crash
            if not p.is_alive():
                ended[w] = p.exitcode
                del live[w]
                spawn()
        if time.monotonic() >= deadline:
            break
        victim = rng.choice(list(live))
        live[victim].kill()
        live[victim].join()
        del live[victim]
        killed += 1
        spawn()
    Path(stop).touch()
    for w, p in live.items():
        p.join(120)
        if p.is_alive():
            p.kill()
            p.join()
            ended[w] = "hung"
        else:
            ended[w] = p.exitcode
    elapsed = time.monotonic() - t0
    return _report(logdir, ended, killed, elapsed, procs, threads, keys)


def _spawn_target(cfg, wid, threads, names, seed, stop, logdir) -> None:
    import torch

    torch.set_num_threads(1)
    _worker(cfg, wid, threads, names, seed, stop, logdir)


def _report(logdir: Path, ended: dict, killed: int, elapsed: float, procs: int, threads: int, keys: int) -> dict:
    started: dict[str, set[str]] = {}
    divergences: list[str] = []
    ops = hits = faults = damaged = twins = 0
    evictions: dict[str, int] = {}  # by the workers that ran to the end
    for log in sorted(logdir.glob("w*.log")):
        progress: dict[str, tuple[int, int]] = {}
        cleared = twinned = 0  # this worker's damaged records and twins cleared (its threads share the counts)
        for ln in read_log(log):
            if ln[0] == "s":
                started.setdefault(ln[1], set()).add(ln[2])
            elif ln[0] == "n":
                progress[ln[1]] = max(progress.get(ln[1], (0, 0)), (int(ln[2]), int(ln[3])))
                cleared = max(cleared, int(ln[4]))
                twinned = max(twinned, int(ln[5]) if len(ln) > 5 else 0)
            elif ln[0] == "X":
                divergences.append(f"{log.stem}: {' '.join(ln[1:])}")
            elif ln[0] == "E":
                divergences.append(f"{log.stem}: thread {ln[1]} raised {' '.join(ln[2:])}")
            elif ln[0] == "F":
                faults += int(ln[1])
                for item in ln[3].split(","):
                    tier, n = item.split("=")
                    evictions[tier] = evictions.get(tier, 0) + int(n)
        ops += sum(n for n, _ in progress.values())
        hits += sum(h for _, h in progress.values())
        damaged += cleared
        twins += twinned
    checked = 0
    for reads in sorted(logdir.glob("w*-t*.reads")):
        for ln in read_log(reads):
            checked += 1
            if ln[2] not in started.get(ln[1], ()):
                divergences.append(f"{reads.stem}: {ln[1]} read v{ln[2]}, which no writer put")
    crashes = {w: c for w, c in ended.items() if c != 0}
    return {"seconds": round(elapsed, 1), "procs": procs, "threads": threads, "keys": keys, "ops": ops,
            "ops_per_s": round(ops / elapsed), "read_hits": hits, "reads_checked_against_logs": checked,
            "kills": killed, "divergences": len(divergences), "crashes": len(crashes), "faults_counted": faults,
            "damaged_records": damaged, "twins": twins,
            "evictions": evictions, "first_divergences": divergences[:20], "crashed_workers": crashes}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kill-every", type=float, default=2.0, help="mean seconds between SIGKILLs of a worker")
    ap.add_argument("--keys", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", help="parent of the store's temporary directory")
    ap.add_argument("--layout", choices=sorted(LAYOUTS), default="cpu-cxl-file", help="the store's tiers, top first")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        r = soak(args.seconds, args.procs, args.threads, args.kill_every, args.keys, Path(tmp), args.seed,
                 args.layout)
    print(f"soak: {r['seconds']} s, {r['procs']} processes x {r['threads']} threads, {r['keys']} keys, "
          f"{LAYOUTS[args.layout]}")
    print(f"ops: {r['ops']} ({r['ops_per_s']} ops/s; 40% put, 8% delete, 12% lease, 40% get), reads that hit "
          f"(each checked on the spot): {r['read_hits']}, worker SIGKILLs: {r['kills']}")
    print(f"reads checked afterwards against the writers' logs: {r['reads_checked_against_logs']}, "
          f"in the workers that ran to the end, faults counted: {r['faults_counted']}, evictions: "
          + ", ".join(f"{t} {n}" for t, n in r["evictions"].items()))
    print(f"divergences: {r['divergences']}, crashed workers: {r['crashes']}, damaged records cleared in the "
          f"region: {r['damaged_records']} (and twins, which a killed put of the same value leaves too: {r['twins']})")
    for d in r["first_divergences"]:
        print(f"  {d}")
    for w, c in r["crashed_workers"].items():
        print(f"  worker {w}: exit {c}")
    return 1 if r["divergences"] or r["crashes"] or r["damaged_records"] else 0


if __name__ == "__main__":
    sys.exit(main())
