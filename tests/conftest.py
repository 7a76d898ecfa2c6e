import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "strata", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "strata"))
torch.manual_seed(0)


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
