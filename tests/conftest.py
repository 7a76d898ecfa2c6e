import os
import threading
import time
import traceback

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "strata", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
settings.register_profile("deep", parent=settings.get_profile("strata"), max_examples=500)  # a hunt, not CI
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "strata"))
torch.manual_seed(0)


@pytest.fixture(autouse=True)
def thread_exceptions_fail_the_test():
    """An exception no thread caught fails the test that was running (pytest only warns).

    Threads that end normally, daemon or not (the write-back flusher on close), never trip it:
    only ``threading.excepthook`` calls, i.e. uncaught exceptions, are recorded. Non-daemon
    threads the test started and left running get a bounded join first, so an exception they
    raise while finishing is not lost."""
    before = set(threading.enumerate())
    caught: list[str] = []
    previous = threading.excepthook

    def record(args):
        name = args.thread.name if args.thread is not None else "<unknown>"
        caught.append(f"thread {name}: " + "".join(
            traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback)))
        previous(args)

    threading.excepthook = record
    try:
        yield
        deadline = time.monotonic() + 5
        for t in set(threading.enumerate()) - before:
            if not t.daemon and t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))
    finally:
        threading.excepthook = previous
    if caught:
        pytest.fail(f"{len(caught)} uncaught exception(s) in threads:\n" + "\n".join(caught), pytrace=False)


@pytest.fixture
def cpu_file_config(tmp_path):
    def make(write="through", cpu="1MiB", file="16MiB", **extra):
        cfg = {
            "tiers": [
                {"kind": "cpu", "capacity": cpu, "write": write},
                {"kind": "file", "path": str(tmp_path / "tier"), "capacity": file},
            ]
        }
        cfg.update(extra)
        return cfg

    return make


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A redis-server shared by the session's tests; each test keeps to its own key prefix."""
    from redis_server import RedisServer, need_redis

    need_redis()
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server.url
    server.stop()


@pytest.fixture
def redis_server(tmp_path):
    """A redis-server of this test's own, to stop and restart."""
    from redis_server import RedisServer, need_redis

    need_redis()
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()
