"""Which chunks does the worker's store hold: asked by vLLM's scheduler from another process.

vLLM puts the scheduler (engine core) and the workers in different processes whenever it runs a
multiprocess executor (always on its CPU platform, and for TP > 1). A store whose tiers live in the
worker's memory is then invisible to the scheduler's lookups. The worker of rank 0 therefore
serves ``contains_many`` over a Unix socket named after the engine id; the scheduler asks it, and
falls back to its own engine (which still sees the shared tiers: CXL, files, Redis) when the
socket is absent or slow. Only key bytes cross the socket, decoded by ``Key.decode``: nothing is
unpickled.

Wire format, all integers big-endian: request ``u32 n`` then ``n`` times ``u32 len, key bytes``;
reply ``n`` bytes, 1 for present and 0 for absent.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import socket
import socketserver
import struct
import tempfile
import threading
import time

from strata.errors import StoreError
from strata.keys import Key

log = logging.getLogger("strata.kv")

MAX_KEYS = 1 << 16
MAX_KEY_BYTES = 1 << 14

_servers: dict[str, "LookupServer"] = {}  # socket path -> the server of this process
_lock = threading.Lock()


def socket_path(engine_id: str) -> str:
    """The socket of one vLLM engine: the same in its scheduler and its workers."""
    tag = hashlib.sha256(str(engine_id).encode()).hexdigest()[:20]
    return os.path.join(tempfile.gettempdir(), f"strata-kv-{tag}.sock")


def _read_exact(f, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise EOFError
    return data


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        store = self.server.store
        try:
            while True:
                (n,) = struct.unpack(">I", _read_exact(self.rfile, 4))
                if n > MAX_KEYS:
                    return
                keys = []
                for _ in range(n):
                    (size,) = struct.unpack(">I", _read_exact(self.rfile, 4))
                    if size > MAX_KEY_BYTES:
                        return
                    keys.append(Key.decode(_read_exact(self.rfile, size)))
                self.wfile.write(bytes(store.contains_many(keys)))
                self.wfile.flush()
        except (EOFError, ConnectionError, StoreError):
            return  # the client went away, or sent bytes that are no key: drop the connection


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class LookupServer:
    """Serves ``store.contains_many`` at ``path`` on a daemon thread until ``close()``."""

    def __init__(self, store, path: str):
        self.path = path
        if os.path.exists(path):  # left by a process that died; a live one would own its engine id
            os.unlink(path)
        old = os.umask(0o177)  # the socket is the user's alone
        try:
            self._server = _Server(path, _Handler)
        finally:
            os.umask(old)
        self._server.store = store
        self._thread = threading.Thread(target=self._server.serve_forever, name="strata-kv-lookup", daemon=True)
        self._thread.start()
        with _lock:
            _servers[path] = self
        atexit.register(self.close)

    def close(self) -> None:
        with _lock:
            if _servers.pop(self.path, None) is None:
                return
        self._server.shutdown()
        self._server.server_close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def local_server(path: str) -> "LookupServer | None":
    """The server at ``path`` if this very process runs it (then ask the store directly)."""
    with _lock:
        return _servers.get(path)


class LookupClient:
    """Asks the server at ``path``; ``contains_many`` returns None when it cannot (no server yet,
    a dead one, a timeout), and tries again at most once a second after a failure."""

    def __init__(self, path: str, timeout_s: float = 2.0):
        self.path = path
        self.timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._retry_at = 0.0
        self.errors = 0
        self.asked = 0

    def contains_many(self, keys: list[Key]) -> "list[bool] | None":
        if not keys:
            return []
        if self._sock is None:
            if time.monotonic() < self._retry_at:
                return None
            sock = None
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.timeout_s)
                sock.connect(self.path)
                self._sock = sock
            except OSError:
                if sock is not None:
                    sock.close()
                self._retry_at = time.monotonic() + 1.0
                return None
        try:
            msg = [struct.pack(">I", len(keys))]
            for k in keys:
                msg += [struct.pack(">I", len(k.encoded)), k.encoded]
            self._sock.sendall(b"".join(msg))
            reply = bytearray()
            while len(reply) < len(keys):
                part = self._sock.recv(len(keys) - len(reply))
                if not part:
                    raise ConnectionError("lookup server closed the connection")
                reply += part
        except OSError as e:
            self.errors += 1
            log.warning("strata: KV lookup at %s failed (%s); the scheduler's own store answers for now", self.path, e)
            self.close()
            self._retry_at = time.monotonic() + 1.0
            return None
        self.asked += 1
        return [b == 1 for b in reply]

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
