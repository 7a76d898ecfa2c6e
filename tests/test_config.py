import pytest

import strata
from strata import ConfigError, load_config, parse_size


def test_presets_load_and_default_is_cpu():
    assert {"cpu", "cpu_file", "cpu_cxl", "cpu_redis"} <= set(strata.presets())
    cfg = load_config(None)
    assert [t.kind for t in cfg.tiers] == ["cpu"]
    two = load_config("cpu_file")
    assert [t.kind for t in two.tiers] == ["cpu", "file"] and two.tiers[0].write == "back"
    cxl = load_config("cpu_cxl").tiers[1]
    assert (cxl.kind, cxl.path, cxl.size, cxl.capacity, cxl.verify) == ("cxl", "/dev/shm/strata-cxl", 16 << 30,
                                                                        16 << 30, True)
    remote = load_config("cpu_redis")
    assert [t.write for t in remote.tiers] == ["back", "through"]
    assert (remote.tiers[1].kind, remote.tiers[1].url, remote.tiers[1].timeout_ms) == ("redis", "redis://127.0.0.1:6379/0", 200)


def test_yaml_path(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("tiers:\n  - kind: cpu\n    capacity: 2MiB\n    policy: s3fifo\n")
    cfg = load_config(str(p))
    assert cfg.tiers[0].capacity == 2 << 20 and cfg.tiers[0].policy == "s3fifo"


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"tiers": [{"kind": "cpu", "capacty": "1GiB"}]}, r"unknown key tiers\[0\]: got 'capacty'.*did you mean 'capacity'"),
        ({"tiers": [{"kind": "gpu", "capacity": 1}]}, r"tiers\[0\].kind: got 'gpu'; allowed: cpu, cxl, file"),
        ({"tiers": [{"kind": "cpu", "capacity": -5}]}, r"tiers\[0\].capacity: got -5; allowed: a size of 0 bytes or more"),
        ({"tiers": [{"kind": "cpu", "capacity": "4 GB of ram"}]}, r"tiers\[0\].capacity: got '4 GB of ram'"),
        ({"tiers": [{"kind": "cpu"}]}, r"tiers\[0\].capacity: missing"),
        ({"tiers": [{"kind": "cpu", "capacity": 1, "policy": "fifo"}]}, r"tiers\[0\].policy: got 'fifo'; allowed: lru, s3fifo"),
        ({"tiers": [{"kind": "cpu", "capacity": 1, "write": "around"}]}, r"tiers\[0\].write: got 'around'; allowed: back, through"),
        ({"tiers": [{"kind": "file", "capacity": 1}]}, r"tiers\[0\].path: got None"),
        ({"tiers": [{"kind": "cpu", "capacity": 1, "verify": "yes"}]}, r"tiers\[0\].verify: got 'yes'; allowed: true, false"),
        ({"tiers": []}, r"tiers: got \[\]; allowed: a non-empty list"),
        ({"tiers": [{"kind": "cpu", "capacity": 1}, {"kind": "cpu", "capacity": 1}]}, r"tiers\[1\].name: 'cpu' is used twice"),
        ({"tiers": [{"kind": "cpu", "capacity": 1}], "namespaces": {"weights": {}}}, r"namespaces: got 'weights'; allowed: kv, param"),
        ({"tiers": [{"kind": "cpu", "capacity": 1}], "namespaces": {"kv": {"evict": "sometimes"}}}, r"namespaces.kv.evict: got 'sometimes'; allowed: drop, lower, never"),
        ({"tiers": [{"kind": "cpu", "capacity": 1}], "namespaces": {"param": {"promote": "lru"}}}, r"namespaces.param.promote: got 'lru'; allowed: evict, keep"),
        ({"tiers": [{"kind": "cpu", "capacity": 1}], "namespaces": {"kv": {"quota": {"ssd": 1}}}}, r"namespaces.kv.quota: got 'ssd'; allowed: cpu"),
        ({"tiers": [{"kind": "cpu", "capacity": 1}], "writeback": {"max_pending": 0}}, r"writeback.max_pending: got 0; allowed: an integer >= 1"),
        ({"tier": []}, r"unknown key config: got 'tier'.*did you mean 'tiers'"),
    ],
)
def test_bad_config_names_the_field_and_the_allowed_values(cfg, message):
    with pytest.raises(ConfigError, match=message):
        load_config(cfg)


def test_unknown_preset_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"config: got 'cpux'.*allowed: cpu, cpu_cxl, cpu_file"):
        load_config("cpux")
    p = tmp_path / "bad.yaml"
    p.write_text("tiers: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(p))


def test_parse_size():
    assert parse_size("8GiB") == 8 << 30
    assert parse_size("512 MB") == 512 * 10**6
    assert parse_size("1.5KiB") == 1536
    assert parse_size(4096) == 4096
    with pytest.raises(ConfigError, match="units"):
        parse_size("3 parsecs")
    with pytest.raises(ConfigError):
        parse_size(True)


def test_quota_applies_to_every_tier_when_given_as_one_size(tmp_path):
    cfg = load_config({
        "tiers": [{"kind": "cpu", "capacity": "1MiB"}, {"kind": "file", "path": str(tmp_path), "capacity": "2MiB"}],
        "namespaces": {"kv": {"quota": "512KiB", "priority": 3}},
    })
    assert dict(cfg.policy("kv").quota) == {"cpu": 512 << 10, "file": 512 << 10}
    assert cfg.policy("kv").priority == 3
    assert cfg.policy("param").evict == "lower"  # default policy
