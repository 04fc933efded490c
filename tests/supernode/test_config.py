"""Configuration: TOML file, flag overrides, and errors that name the option."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from supernode.config import (
    ConfigError,
    from_mapping,
    load_config,
    normalize_upstream,
    parse_hostport,
)

BASE: dict[str, Any] = {"data_dir": "/tmp/sn", "allowed_upstreams": ["https://r.example"]}


def test_file_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "supernode.toml"
    path.write_text(
        """
listen = "0.0.0.0:7000"
advertise = "10.0.0.5:7000"
data_dir = "cache"
quota_bytes = 1_000_000
allowed_upstreams = ["HTTPS://Registry-1.Docker.IO:443/", "http://127.0.0.1:5000/"]
failed_task_ttl = 5
seed = 3
zone = "eu-1"

[scheduler]
max_parents = 6
peer_ttl = 20
seeder_elders = 0
even_out = false

[fetch]
retries = 0
read_timeout = 2.5
"""
    )
    config = load_config(path)
    assert (config.listen_host, config.listen_port) == ("0.0.0.0", 7000)
    assert config.advertise == "10.0.0.5:7000"
    assert config.data_dir == tmp_path / "cache"  # relative to the file
    assert config.allowed_upstreams == ("https://registry-1.docker.io", "http://127.0.0.1:5000")
    assert (config.quota_bytes, config.failed_task_ttl, config.seed) == (1_000_000, 5.0, 3)
    assert (config.scheduler.max_parents, config.scheduler.peer_ttl) == (6, 20.0)
    assert config.scheduler.seeder_upload_slots == 64  # default kept
    assert config.scheduler.seeder_elders == 0
    assert config.scheduler.even_out is False
    assert (config.fetch.retries, config.fetch.read_timeout) == (0, 2.5)

    flagged = load_config(
        path,
        {
            "listen": "127.0.0.1:0",
            "advertise": "127.0.0.1:9",
            "allowed_upstreams": ["http://127.0.0.1:6000"],
            "data_dir": "/elsewhere",
        },
    )
    assert (flagged.listen_host, flagged.listen_port) == ("127.0.0.1", 0)
    assert flagged.allowed_upstreams == ("http://127.0.0.1:6000",)
    assert flagged.data_dir == Path("/elsewhere")
    assert flagged.upstream_allowed("http://127.0.0.1:6000/") == "http://127.0.0.1:6000"
    assert flagged.upstream_allowed("https://registry-1.docker.io") is None


def test_defaults() -> None:
    config = from_mapping(BASE)
    assert (config.listen_host, config.listen_port, config.advertise) == ("127.0.0.1", 65002, None)
    assert config.advertise_for(65002) == "127.0.0.1:65002"
    assert config.quota_bytes is None and config.seeder_id == "supernode"
    assert from_mapping({**BASE, "listen": "[::1]:0"}).advertise_for(4000) == "[::1]:4000"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"data_dir": None}, "data_dir: required"),
        ({"allowed_upstreams": []}, "allowed_upstreams: at least one"),
        ({"allowed_upstreams": ["ftp://x"]}, "allowed_upstreams[0]: not an http(s)://"),
        ({"allowed_upstreams": ["https://u:p@x"]}, "allowed_upstreams[0]: user info"),
        ({"allowed_upstreams": [3]}, "allowed_upstreams[0]: expected a string"),
        ({"listen": "localhost"}, "listen: expected HOST:PORT"),
        ({"listen": "::1:80"}, "listen: an IPv6 host needs brackets"),
        ({"listen": "0.0.0.0:80"}, "advertise: required when listening on the wildcard"),
        ({"advertise": "10.0.0.1:0"}, "advertise:"),
        ({"advertise": "bad host:80"}, "advertise:"),
        ({"seeder_id": "has space"}, "seeder_id:"),
        ({"quota_bytes": 0}, "quota_bytes: must be positive"),
        ({"quota_bytes": True}, "quota_bytes: expected int"),
        ({"failed_task_ttl": -1}, "failed_task_ttl: must be >= 0"),
        ({"failed_task_ttl": "30"}, "failed_task_ttl: expected a number"),
        ({"log_level": "loud"}, "log_level: one of"),
        ({"listen_port": 80}, "listen_port: unknown option"),
        ({"scheduler": {"max_parent": 3}}, "scheduler.max_parent: unknown option"),
        ({"scheduler": {"max_parents": -1}}, "scheduler.max_parents: must be"),
        ({"scheduler": {"max_blame": 0}}, "scheduler.max_blame: must be"),
        ({"scheduler": {"peer_ttl": 0}}, "scheduler.peer_ttl: must be > 0"),
        ({"scheduler": {"control_rate": -1}}, "scheduler.control_rate: must be >= 0"),
        ({"scheduler": 5}, "scheduler: expected dict"),
        ({"fetch": {"retries": 1000}}, "fetch.retries: must be 0..100"),
        ({"fetch": {"read_timeout": float("inf")}}, "fetch.read_timeout: expected a number"),
        ({"fetch": {"trust_env": 1}}, "fetch.trust_env: expected bool"),
    ],
)
def test_errors_name_the_option(change: dict[str, Any], message: str) -> None:
    raw = {**BASE, **change}
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(ConfigError) as info:
        from_mapping(raw)
    assert str(info.value).startswith(message), str(info.value)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("listen = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_address_helpers() -> None:
    assert parse_hostport("[::1]:80") == ("::1", 80)
    assert parse_hostport("example.org:443") == ("example.org", 443)
    for bad in ("x:65536", "x:", ":", "x:-1"):
        with pytest.raises(ValueError):
            parse_hostport(bad)
    assert normalize_upstream("HTTP://[::1]:80/v/") == "http://[::1]/v"
    assert normalize_upstream("https://r:8443") == "https://r:8443"


def test_environment_sits_between_the_file_and_the_flags(tmp_path: Path) -> None:
    path = tmp_path / "supernode.toml"
    path.write_text(
        'data_dir = "/tmp/sn"\nallowed_upstreams = ["https://r.example"]\nzone = "file"\n'
        "quota_bytes = 100\n[fetch]\nretries = 1\nbackoff = 0.25\n"
    )
    env = {
        "SUPERNODE_CONFIG": str(path),
        "SUPERNODE_ZONE": "env",
        "SUPERNODE_ALLOWED_UPSTREAMS": "https://a.example, https://b.example",
        "SUPERNODE_FETCH_RETRIES": "7",
        "SUPERNODE_FETCH_TRUST_ENV": "yes",
        "SUPERNODE_SCHEDULER_PEER_TTL": "12.5",
        "SUPERNODE_LOG_FORMAT": "json",
        "SUPERNODE_SEED": "",  # empty: unset
        "PATH": "/usr/bin",
    }
    config = load_config(None, {}, env)
    assert config.zone == "env" and config.quota_bytes == 100  # env over the file
    assert config.allowed_upstreams == ("https://a.example", "https://b.example")
    assert (config.fetch.retries, config.fetch.backoff) == (7, 0.25)  # table merged
    assert config.fetch.trust_env is True and config.scheduler.peer_ttl == 12.5
    assert config.log_format == "json" and config.seed is None
    flagged = load_config(None, {"zone": "flag", "fetch.retries": 2}, env)
    assert (flagged.zone, flagged.fetch.retries, flagged.fetch.trust_env) == ("flag", 2, True)
    # without an environment given, none is read
    assert load_config(path, {}).zone == "file"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SUPERNODE_QUOTA_BYTES": "lots"}, "quota_bytes: want an integer, got 'lots' (set by "),
        ({"SUPERNODE_QUOTA_BYTES": "-1"}, "quota_bytes: must be positive, got -1 (set by "),
        ({"SUPERNODE_FETCH_RETRIES": "500"}, "fetch.retries: must be 0..100, got 500 (set by "),
        ({"SUPERNODE_FETCH_TRUST_ENV": "maybe"}, "fetch.trust_env: want true or false"),
        ({"SUPERNODE_SCHEDULER_PEER_TTL": "0"}, "scheduler.peer_ttl: must be > 0"),
        ({"SUPERNODE_ALLOWED_UPSTREAMS": "ftp://x"}, "allowed_upstreams[0]: not an http(s)"),
        ({"SUPERNODE_LISTEN": "nowhere"}, "listen: expected HOST:PORT"),
        ({"SUPERNODE_LOG_FORMAT": "xml"}, "log_format: one of text, json"),
    ],
)
def test_bad_environment_values_name_the_variable(env: dict[str, str], message: str) -> None:
    (var,) = env
    with pytest.raises(ConfigError) as info:
        load_config(None, {}, {**BASE_ENV, **env})
    assert str(info.value).startswith(message), str(info.value)
    assert str(info.value).endswith(f"(set by {var})")


BASE_ENV = {"SUPERNODE_DATA_DIR": "/d", "SUPERNODE_ALLOWED_UPSTREAMS": "https://r.example"}


def test_an_unknown_variable_is_an_error() -> None:
    with pytest.raises(ConfigError, match="SUPERNODE_UPSTREAMS: unknown environment variable"):
        load_config(None, {}, {**BASE_ENV, "SUPERNODE_UPSTREAMS": ""})


def test_a_bad_flag_is_named() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {"fetch.retries": 101}, BASE_ENV)
    assert str(info.value) == "fetch.retries: must be 0..100, got 101 (set by --fetch-retries)"


def test_kubernetes_service_variables_are_not_ours() -> None:
    """A Service named "supernode" puts SUPERNODE_PORT, SUPERNODE_SERVICE_HOST, ... in every
    pod of its namespace; they must not stop the daemon (other unknown names still do)."""
    links = {
        "SUPERNODE_PORT": "tcp://10.96.0.7:65002",
        "SUPERNODE_PORT_65002_TCP": "tcp://10.96.0.7:65002",
        "SUPERNODE_PORT_65002_TCP_ADDR": "10.96.0.7",
        "SUPERNODE_SERVICE_HOST": "10.96.0.7",
        "SUPERNODE_SERVICE_PORT": "65002",
        "SUPERNODE_SERVICE_PORT_HTTP": "65002",
    }
    config = load_config(None, {}, {**BASE_ENV, **links})
    assert str(config.data_dir) == "/d"
    with pytest.raises(ConfigError, match="SUPERNODE_PORTS: unknown environment variable"):
        load_config(None, {}, {**BASE_ENV, **links, "SUPERNODE_PORTS": "1"})
