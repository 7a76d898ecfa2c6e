"""A real redis-server for the tests: started on a free port of 127.0.0.1, stopped, restarted."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

# The server binary every test and benchmark starts: redis-server, or another that takes its
# flags and speaks its protocol (STRATA_REDIS_SERVER=valkey-server, where Valkey is installed).
SERVER_NAME = os.environ.get("STRATA_REDIS_SERVER", "redis-server")
REDIS_SERVER = shutil.which(SERVER_NAME)


def need_redis() -> None:
    import pytest

    if REDIS_SERVER is None:
        pytest.skip(f"{SERVER_NAME} is not installed (Debian: apt-get install redis-server; .ci/run installs it; "
                    "STRATA_REDIS_SERVER names another binary)")
    try:
        import redis  # noqa: F401
    except ImportError:
        pytest.skip("the redis client is not installed (pip install 'strata[redis]')")


class PrefixedRaw:
    """``check_tier``'s raw hook over one redis tier: its stored bytes under its key prefix, through
    a client of the test's own (a server's, or a cluster's)."""

    def __init__(self, client, tier: dict):
        self.client, self.prefix = client, tier["key_prefix"].encode()

    def get(self, key: bytes):
        return self.client.get(self.prefix + key)

    def set(self, key: bytes, value: bytes) -> None:
        self.client.set(self.prefix + key, value)

    def close(self) -> None:
        self.client.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One redis-server process with no persistence; ``stop()`` kills it, ``start()`` brings it
    back empty on the same port."""

    def __init__(self, workdir: "Path | str", maxmemory: str = "0", policy: str = "allkeys-lru"):
        self.port = free_port()
        self.workdir = workdir
        self.args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--dir", str(workdir), "--maxmemory", maxmemory,
                     "--maxmemory-policy", policy, "--protected-mode", "no"]
        self.proc: subprocess.Popen | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def client(self):
        import redis

        return redis.Redis.from_url(self.url)


class ClusterServers:
    """A Redis Cluster of ``masters`` primaries with ``replicas`` replicas each, redis-server
    processes on free loopback ports with no persistence. ``start()`` forms it (``redis-cli
    --cluster create``) and waits until every node says the cluster is ok; ``kill(port)`` stops
    one node, ``stop()`` all. ``node_timeout_ms`` is the cluster's failure detection: small, so a
    replica takes over a killed primary within seconds."""

    def __init__(self, workdir: "Path | str", masters: int = 3, replicas: int = 1, node_timeout_ms: int = 1000,
                 full_coverage: bool = True):
        self.workdir = Path(workdir)
        self.full_coverage = full_coverage  # False: the other shards serve while one has no primary
        self.masters, self.replicas, self.node_timeout_ms = masters, replicas, node_timeout_ms
        self.ports: list[int] = []
        self.bus: dict[int, int] = {}  # port -> cluster bus port (chosen: the default, port + 10000, may not exist)
        self.procs: dict[int, subprocess.Popen | None] = {}

    def _args(self, port: int) -> list[str]:
        d = self.workdir / str(port)
        d.mkdir(parents=True, exist_ok=True)
        return [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(d), "--cluster-enabled", "yes", "--cluster-port", str(self.bus[port]),
                "--cluster-config-file", str(d / "nodes.conf"),
                "--cluster-node-timeout", str(self.node_timeout_ms), "--protected-mode", "no",
                "--maxmemory-policy", "allkeys-lru", "--repl-diskless-sync-delay", "0",
                "--cluster-require-full-coverage", "yes" if self.full_coverage else "no"]

    def start(self) -> "ClusterServers":
        cli = shutil.which("redis-cli")
        try:
            for _ in range(self.masters * (1 + self.replicas)):
                port = free_port()
                self.ports.append(port)
                self.bus[port] = free_port()
                self.procs[port] = subprocess.Popen(self._args(port), stdout=subprocess.DEVNULL,
                                                    stderr=subprocess.DEVNULL)
            for port in self.ports:
                _wait_for_pong(port)
            if cli is not None:
                subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                                "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                               check=True, capture_output=True, timeout=60)
            else:
                self._form_by_hand()
            self.wait_ok()
        except BaseException:
            self.stop()
            raise
        return self

    def _form_by_hand(self) -> None:
        """What ``redis-cli --cluster create`` does, for a host without redis-cli: distinct config
        epochs, MEET, the slots split evenly over the first ``masters`` nodes, then the rest
        replicate them in turn."""
        masters, rest = self.ports[: self.masters], self.ports[self.masters:]
        for epoch, port in enumerate(self.ports, 1):
            self.command(port, "CLUSTER", "SET-CONFIG-EPOCH", epoch)
        for port in self.ports[1:]:
            self.command(self.ports[0], "CLUSTER", "MEET", "127.0.0.1", port, self.bus[port])
        step = 16384 // self.masters
        for i, port in enumerate(masters):
            hi = 16383 if i == self.masters - 1 else (i + 1) * step - 1
            self.command(port, "CLUSTER", "ADDSLOTSRANGE", i * step, hi)
        deadline = time.monotonic() + 30
        while any(self.cluster_info(p).get("cluster_known_nodes") != str(len(self.ports)) for p in self.ports):
            if time.monotonic() > deadline:
                raise RuntimeError("the nodes did not meet within 30s")
            time.sleep(0.05)
        ids = [self.node_id(p) for p in masters]
        for i, port in enumerate(rest):
            self.command(port, "CLUSTER", "REPLICATE", ids[i % self.masters])

    def wait_ok(self, limit_s: float = 30, replicas: int | None = None) -> None:
        """Until every live node reports cluster_state:ok with all 16384 slots ok, and every slot
        range lists ``replicas`` (default: the cluster's) replicas linked to their primary (a
        safety bound: it returns as soon as that holds)."""
        want = self.replicas if replicas is None else replicas
        deadline = time.monotonic() + limit_s
        while True:
            if all(self.cluster_info(p).get("cluster_state") == "ok"
                   and self.cluster_info(p).get("cluster_slots_ok") == "16384" for p in self.live()) \
                    and self._replicas_linked(want):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster is not ok after {limit_s}s: "
                                   f"{ {p: self.cluster_info(p) for p in self.live()} }")
            time.sleep(0.1)

    def _replicas_linked(self, want: int) -> bool:
        """Every live primary has ``want`` replicas (CLUSTER NODES), each with its link up."""
        try:
            primaries: dict[str, int] = {}
            replicas: list[tuple[str, int]] = []  # (primary id, replica port)
            for line in self.nodes_lines(self.live()[0]):
                node_id, addr, flags, primary = line.split()[:4]
                port = int(addr.split("@")[0].rsplit(":", 1)[1])
                if "fail" in flags or port not in self.live():
                    continue
                if "master" in flags:
                    primaries[node_id] = 0
                elif "slave" in flags:
                    replicas.append((primary, port))
            for primary, port in replicas:
                if self.command(port, "INFO", "replication").get("master_link_status") == "up" and primary in primaries:
                    primaries[primary] += 1
            return bool(primaries) and all(n >= want for n in primaries.values())
        except Exception:  # noqa: BLE001 - a node not up yet: not linked
            return False

    def nodes_lines(self, port: int) -> list[str]:
        raw = self.command(port, "CLUSTER", "NODES")
        return (raw.decode() if isinstance(raw, bytes) else str(raw)).strip().splitlines()

    def replicated(self, primary: int) -> bool:
        """Whether every replica of ``primary`` has acknowledged all it was sent (a step to poll)."""
        info = self.command(primary, "INFO", "replication")
        offset = info.get("master_repl_offset")
        links = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
        return bool(links) and all(int(v.get("offset", -1)) == offset for v in links)

    def live(self) -> list[int]:
        return [p for p, proc in self.procs.items() if proc is not None and proc.poll() is None]

    def command(self, port: int, *args):
        import redis

        with redis.Redis(host="127.0.0.1", port=port, socket_timeout=5) as r:
            return r.execute_command(*args)

    def cluster_info(self, port: int) -> dict:
        try:
            raw = self.command(port, "CLUSTER", "INFO")
        except Exception:  # noqa: BLE001 - a node that does not answer has no view
            return {}
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        return dict(line.split(":", 1) for line in text.split() if ":" in line)

    def primaries(self) -> dict[int, list[tuple[int, int]]]:
        """Live primary port -> its slot ranges, as CLUSTER SLOTS says from a live node."""
        out: dict[int, list[tuple[int, int]]] = {}
        for lo, hi, primary, *_ in self.command(self.live()[0], "CLUSTER", "SLOTS"):
            out.setdefault(int(primary[1]), []).append((int(lo), int(hi)))
        return out

    def node_id(self, port: int) -> str:
        raw = self.command(port, "CLUSTER", "MYID")
        return raw.decode() if isinstance(raw, bytes) else raw

    def restart(self, port: int) -> None:
        """Start the node on ``port`` again (its nodes.conf keeps its id, role and slots; no data)."""
        self.procs[port] = subprocess.Popen(self._args(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for_pong(port)

    def signal_all(self, sig: int) -> None:
        """Send ``sig`` to every live node (SIGSTOP: the whole cluster hangs; SIGCONT: it goes on)."""
        for port in self.live():
            os.kill(self.procs[port].pid, sig)

    def kill(self, port: int) -> None:
        proc = self.procs.get(port)
        if proc is not None:
            proc.kill()
            proc.wait()
            self.procs[port] = None

    def stop(self) -> None:
        for port in list(self.procs):
            self.kill(port)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}"


def _wait_for_pong(port: int, limit_s: float = 10) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"redis-server did not start on port {port}")
