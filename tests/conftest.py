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
