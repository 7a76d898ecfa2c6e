"""A real mooncake_master for the tests: on free ports of 127.0.0.1, with its own HTTP metadata
server; stopped (killed), restarted on the same ports, paused (SIGSTOP) and resumed. And a store
server: another process whose only job is to hold a segment of the pool, so that values outlive
the processes that wrote them (as store servers do in a deployment)."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.request import urlopen


def master_binary() -> str | None:
    """The mooncake_master the wheel ships inside its package (the one in the venv's bin is a
    Python wrapper that execs it), found without importing the client."""
    spec = importlib.util.find_spec("mooncake")
    if spec is None or not spec.submodule_search_locations:
        return None
    for d in spec.submodule_search_locations:
        path = Path(d) / "mooncake_master"
        if path.is_file():
            return str(path)
    return None


def need_mooncake() -> None:
    """Skip, saying why, where the client cannot run: no package, no libibverbs, no master."""
    import pytest

    if importlib.util.find_spec("mooncake") is None:
        pytest.skip("the Mooncake client is not installed (pip install 'strata[mooncake]')")
    try:
        import mooncake.store  # noqa: F401
    except ImportError as e:
        if "ibverbs" in str(e):
            pytest.skip(f"the Mooncake client needs libibverbs (Debian: apt-get install libibverbs1; .ci/run "
                        f"installs it): {e}")
        pytest.skip(f"the Mooncake client does not import: {e}")
    if master_binary() is None:
        pytest.skip("mooncake_master is missing from the mooncake package")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MooncakeMaster:
    """One mooncake_master: rpc, HTTP metadata and admin (metrics) ports on 127.0.0.1. Its index
    is in memory: a restart comes back empty, and clients remount their segments by themselves."""

    def __init__(self, workdir: "Path | str", lease_ttl_ms: int | None = None, client_ttl_s: int | None = None):
        self.workdir = Path(workdir)
        self.rpc_port, self.http_port, self.admin_port = free_port(), free_port(), free_port()
        self.args = [master_binary(), "--enable_http_metadata_server=true", "--http_metadata_server_host=127.0.0.1",
                     f"--http_metadata_server_port={self.http_port}", "--rpc_address=127.0.0.1",
                     f"--rpc_port={self.rpc_port}", "--metrics_host=127.0.0.1", f"--metrics_port={self.admin_port}",
                     "--rpc_thread_num=2", "--logtostderr"]
        if lease_ttl_ms is not None:
            self.args.append(f"--default_kv_lease_ttl={lease_ttl_ms}")
        if client_ttl_s is not None:
            self.args.append(f"--client_ttl={client_ttl_s}")
        self.proc: subprocess.Popen | None = None
        self.master = f"127.0.0.1:{self.rpc_port}"
        self.metadata_url = f"http://127.0.0.1:{self.http_port}/metadata"
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"

    def start(self, limit_s: float = 20) -> "MooncakeMaster":
        log = open(self.workdir / f"mooncake_master_{self.rpc_port}.log", "ab")
        self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:  # a safety bound: it returns as soon as the admin server says ok
            if self.proc.poll() is not None:
                raise RuntimeError(f"mooncake_master exited with {self.proc.returncode}; see {log.name}")
            if self.healthy():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mooncake_master did not answer on {self.admin_url}/health within {limit_s}s")

    def healthy(self) -> bool:
        try:
            with urlopen(self.admin_url + "/health", timeout=0.5) as r:
                ok = b'"ok"' in r.read()
            socket.create_connection(("127.0.0.1", self.rpc_port), timeout=0.5).close()
            return ok
        except OSError:
            return False

    def stop(self) -> None:
        """Kill it (SIGKILL: no goodbye to the clients)."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGCONT)  # a paused master dies only once resumed
                self.proc.kill()
            self.proc.wait()
            self.proc = None

    def restart(self) -> "MooncakeMaster":
        self.stop()
        return self.start()

    def pause(self) -> None:
        """SIGSTOP: its sockets stay open and nothing answers (a hung master, not a dead one). Returns
        once the kernel shows it stopped: the signal is delivered when the process is next scheduled,
        and until then a busy machine lets it answer a request more."""
        os.kill(self.proc.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("T", "t"):
                    return
            time.sleep(0.005)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def backend(self, **kw):
        """A MooncakeBackend on this master: small segment and buffer unless given."""
        from strata.store.tiers.mooncake import MooncakeBackend

        args = dict(master=self.master, metadata_url=self.metadata_url, admin_url=self.admin_url,
                    segment_bytes=128 << 20, buffer_bytes=64 << 20, timeout_ms=500)
        args.update(kw)
        return MooncakeBackend(**args)


# The store server's program: a plain client contributing SEGMENT bytes, held until stdin closes
# (its parent said so, or died). It says "ready 0" once the segment is mounted, "ready RC" if not.
STORE_SERVER = """
import sys
from mooncake.store import MooncakeDistributedStore
master, metadata_url, segment = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = MooncakeDistributedStore()
rc = s.setup("127.0.0.1", metadata_url, segment, 16 << 20, "tcp", "", master)
print(f"ready {rc}", flush=True)
if rc == 0:
    sys.stdin.read()
    s.close()
"""


class StoreServer:
    """A process holding ``segment_bytes`` of the pool on ``master``: what clients with
    ``segment: 0`` put lives there, and stays while this process runs. A context manager."""

    def __init__(self, master: MooncakeMaster, segment_bytes: int = 256 << 20):
        self.master, self.segment_bytes = master, segment_bytes
        self.proc: subprocess.Popen | None = None

    def start(self, limit_s: float = 60) -> "StoreServer":
        """Returns once the segment is mounted; ``limit_s`` bounds a set-up that hangs."""
        log = open(self.master.workdir / f"store_server_{self.master.rpc_port}.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-c", STORE_SERVER, self.master.master, self.master.metadata_url,
                                      str(self.segment_bytes)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=log, text=True)
        log.close()
        try:
            line = self._first_line(limit_s)
        except BaseException:
            self.stop()
            raise
        if line.strip() != "ready 0":
            self.stop()
            raise RuntimeError(f"mooncake store server did not mount its segment ({line.strip() or 'no answer'}); "
                               f"see {log.name}")
        return self

    def _first_line(self, limit_s: float) -> str:
        """The server's first line, or '' when it exits or ``limit_s`` passes first."""
        import selectors

        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout=limit_s):
                return ""
        return self.proc.stdout.readline()

    def stop(self) -> None:
        """Close its stdin (it unmounts its segment and exits); killed if it does not within 30 s."""
        if self.proc is None:
            return
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        finally:
            self.proc.stdout.close()
            self.proc = None

    def __enter__(self) -> "StoreServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
