"""Objects owned by one live process, so that what a killed process left can be found and dropped.

An owned scope reads ``pid:<host>:<pid>:<start>:<fingerprint>``. ``start`` is the process start
time (field 22 of ``/proc/<pid>/stat``, clock ticks since boot), so a pid the kernel has given to a
new process no longer names the owner. ``host`` is the host name plus, where readable, the pid
namespace (``node1/4026531836``): two containers sharing a hostname and a store see different
pids, and a pid of another namespace is never judged here. Key encoding is length-prefixed, so
the ``:`` separators need no escaping; the fingerprint (the last part) may hold ``:`` too.

Only a definite "dead" makes an orphan: an owner on another host or pid namespace, or one whose
liveness cannot be read, is ``None`` (cannot tell) and its objects are kept.
"""

from __future__ import annotations

import functools
import os
import socket
from dataclasses import dataclass

_PREFIX = "pid"


@dataclass(frozen=True)
class Owner:
    """The process an owned scope names."""

    host: str  # host name, '/', pid namespace inode (or the host name alone)
    pid: int
    start: str  # start time in clock ticks since boot; "0" where /proc is absent
    fingerprint: str  # what the owner said makes the bytes valid (make_scope output)

    @property
    def scope(self) -> str:
        return f"{_PREFIX}:{self.host}:{self.pid}:{self.start}:{self.fingerprint}"


@functools.lru_cache(maxsize=1)
def this_host() -> str:
    """This host as owned scopes name it: the host name and the pid namespace."""
    host = socket.gethostname().replace(":", "_").replace("/", "_") or "localhost"
    try:
        ns = os.readlink("/proc/self/ns/pid")  # 'pid:[4026531836]'
    except OSError:
        return host
    inode = ns[ns.find("[") + 1 : ns.rfind("]")]
    return f"{host}/{inode}" if inode.isdigit() else host


def _stat(pid: int) -> tuple[str, str] | None:
    """(state, start time) of ``pid`` from /proc, or None where it has no entry; OSError where
    the entry cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw[raw.rfind(")") + 2 :].split()  # after the command name, which may hold spaces
    return fields[0], fields[19]  # fields 3 (state) and 22 (starttime)


def _has_proc() -> bool:
    return os.path.exists("/proc/self/stat")


def start_time(pid: int) -> str:
    """The start time of ``pid`` (clock ticks since boot) as text; "0" where /proc is absent."""
    if not _has_proc():
        return "0"
    st = _stat(pid)
    return st[1] if st else "0"


def owned_scope(fingerprint: str) -> str:
    """A scope owned by this process: objects under it are orphans once it has exited."""
    pid = os.getpid()
    return Owner(this_host(), pid, start_time(pid), fingerprint).scope


def owner_of(scope: str) -> Owner | None:
    """The owner an owned scope names, or None for any other scope."""
    parts = scope.split(":", 4)
    if len(parts) != 5 or parts[0] != _PREFIX or not parts[1]:
        return None
    _, host, pid, start, fingerprint = parts
    if not (pid.isdigit() and start.isdigit()):
        return None
    return Owner(host, int(pid), start, fingerprint)


def is_alive(owner: Owner) -> bool | None:
    """True while the owner runs, False once it has exited (a zombie has, a reused pid names
    another process), None where this process cannot tell (another host or pid namespace, no
    /proc and no permission to signal). Callers drop objects on False only."""
    if owner.host != this_host():
        return None
    if owner.pid == os.getpid() and owner.start == start_time(owner.pid):
        return True
    if owner.start != "0" and _has_proc():
        try:
            st = _stat(owner.pid)
        except OSError:
            return None
        if st is not None:
            state, start = st
            return start == owner.start and state not in ("Z", "X")
        # no entry: gone, unless /proc hides other users' processes (hidepid) and it runs
        return False if _exists(owner.pid) is False else None
    return _exists(owner.pid)


def _exists(pid: int) -> bool | None:
    """Whether a process ``pid`` exists (signal 0), None where the answer is unclear."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    except OSError:
        return None
    return True
