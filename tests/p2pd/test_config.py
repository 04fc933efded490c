"""P2pdConfig: defaults, the TOML file, flags over the file, and errors naming the option."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from p2pd.config import Address, ConfigError, P2pdConfig, add_arguments, from_args

TOML = """
mirror_listen = "127.0.0.1:7001"
peer_listen = "0.0.0.0:7003"
advertise = "10.0.0.7:7003"
supernodes = ["http://10.0.0.2:8002", "https://sn.example:8443/"]
default_upstream = "https://registry-1.docker.io/"
data_dir = "/tmp/p2pd-data"
quota_bytes = 100_000_000
zone = "rack-1"
upload_rate = 1_000_000
download_rate = 0
upload_slots = 4
back_to_source_after = 7.5
access_cache_ttl = 30
log_level = "DEBUG"

[registries]
"docker.io" = "https://registry-1.docker.io"
"Example.test" = "http://127.0.0.1:5000"

[prefixes]
"example.test/" = "http://127.0.0.1:5000"
"""


def parse(argv: list[str]) -> P2pdConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return from_args(parser.parse_args(argv))


def test_defaults() -> None:
    config = P2pdConfig.from_mapping({})
    assert config.mirror_listen == Address("127.0.0.1", 65001)
    assert config.peer_listen == config.advertise == Address("127.0.0.1", 65003)
    assert config.peer_id == "127.0.0.1:65003"
    assert config.supernodes == () and config.default_upstream == ""
    assert dict(config.registries) == {} and dict(config.prefixes) == {}
    assert (config.quota_bytes, config.upload_slots, config.zone) == (0, 8, "")
    assert (config.back_to_source_after, config.access_cache_ttl) == (15.0, 60.0)
    assert config.log_level == "info" and config.upstreams() == frozenset()
    assert parse([]) == config


def test_toml_file_is_read_and_normalised(tmp_path: Path) -> None:
    path = tmp_path / "p2pd.toml"
    path.write_text(TOML)
    config = P2pdConfig.load(path)
    assert str(config.mirror_listen) == "127.0.0.1:7001"
    assert config.peer_listen.is_wildcard and str(config.advertise) == "10.0.0.7:7003"
    assert config.peer_id == "10.0.0.7:7003"
    assert config.supernodes == ("http://10.0.0.2:8002", "https://sn.example:8443")
    assert config.default_upstream == "https://registry-1.docker.io"
    assert dict(config.registries) == {
        "docker.io": "https://registry-1.docker.io",
        "example.test": "http://127.0.0.1:5000",
    }
    assert dict(config.prefixes) == {"example.test": "http://127.0.0.1:5000"}
    assert config.data_dir == Path("/tmp/p2pd-data")
    assert (config.quota_bytes, config.upload_rate, config.upload_slots) == (100_000_000, 10**6, 4)
    assert (config.back_to_source_after, config.access_cache_ttl) == (7.5, 30.0)
    assert config.log_level == "debug" and config.log_level_number == 10
    assert config.upstreams() == {"https://registry-1.docker.io", "http://127.0.0.1:5000"}
    with pytest.raises(TypeError):
        config.registries["evil"] = "http://evil"  # type: ignore[index]


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = tmp_path / "p2pd.toml"
    path.write_text(TOML)
    config = parse(
        [
            "--config",
            str(path),
            "--mirror-listen",
            "127.0.0.1:0",
            "--supernodes",
            "http://a:1,http://b:2",
            "--registry",
            "docker.io=https://mirror.example",
            "--registry",
            "ghcr.io=https://ghcr.io",
            "--prefix",
            "q=https://quay.io",
            "--quota-bytes",
            "5",
            "--log-level",
            "warning",
            "--peer-id",
            "host-7",
        ]
    )
    assert config.mirror_listen.port == 0
    assert config.supernodes == ("http://a:1", "http://b:2")  # replaced
    assert dict(config.registries) == {  # merged entry by entry
        "docker.io": "https://mirror.example",
        "example.test": "http://127.0.0.1:5000",
        "ghcr.io": "https://ghcr.io",
    }
    assert dict(config.prefixes) == {
        "example.test": "http://127.0.0.1:5000",
        "q": "https://quay.io",
    }
    assert (config.quota_bytes, config.log_level, config.peer_id) == (5, "warning", "host-7")
    assert config.zone == "rack-1"  # untouched by flags
    assert parse(["--config", str(path), "--supernodes", ""]).supernodes == ()


def test_advertise_defaults_to_peer_listen_and_derives_the_peer_id() -> None:
    config = P2pdConfig.from_mapping({"peer_listen": "[::1]:7003"})
    assert str(config.advertise) == "[::1]:7003"
    assert config.peer_id == "::1:7003"


@pytest.mark.parametrize(
    ("raw", "option"),
    [
        ({"mirror_listn": "127.0.0.1:1"}, "mirror_listn"),
        ({"mirror_listen": "127.0.0.1"}, "mirror_listen"),
        ({"mirror_listen": "127.0.0.1:70000"}, "mirror_listen"),
        ({"mirror_listen": 65001}, "mirror_listen"),
        ({"peer_listen": "0.0.0.0:7003"}, "advertise"),  # others cannot reach 0.0.0.0
        ({"advertise": "10.0.0.1:0"}, "advertise"),
        ({"peer_id": "bad id!"}, "peer_id"),
        ({"zone": "z" * 65}, "zone"),
        ({"supernodes": "http://a:1"}, "supernodes"),
        ({"supernodes": ["ftp://a:1"]}, "supernodes"),
        ({"supernodes": ["http://a:1/path"]}, "supernodes"),
        ({"default_upstream": "registry.example"}, "default_upstream"),
        ({"default_upstream": "https://user:pw@registry.example"}, "default_upstream"),
        ({"default_upstream": "https://registry.example/?x=1"}, "default_upstream"),
        ({"registries": {"docker.io": "not a url"}}, "registries.docker.io"),
        ({"registries": {"bad host!": "https://x"}}, "registries"),
        ({"registries": {"A.test": "https://x", "a.test": "https://y"}}, "registries"),
        ({"registries": ["docker.io"]}, "registries"),
        ({"prefixes": {"Upper/Case": "https://x"}}, "prefixes"),
        ({"prefixes": {"a/../b": "https://x"}}, "prefixes"),
        ({"quota_bytes": -1}, "quota_bytes"),
        ({"quota_bytes": True}, "quota_bytes"),
        ({"quota_bytes": 1.5}, "quota_bytes"),
        ({"upload_slots": 100_000}, "upload_slots"),
        ({"back_to_source_after": 0}, "back_to_source_after"),
        ({"access_cache_ttl": -1}, "access_cache_ttl"),
        ({"access_cache_ttl": "60"}, "access_cache_ttl"),
        ({"log_level": "chatty"}, "log_level"),
        ({"data_dir": ""}, "data_dir"),
    ],
)
def test_bad_values_name_the_option(raw: dict[str, object], option: str) -> None:
    with pytest.raises(ConfigError) as info:
        P2pdConfig.from_mapping(raw)
    assert info.value.option == option
    assert f"option {option}:" in str(info.value)


def test_bad_files_and_flags(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        P2pdConfig.load(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("mirror_listen = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        P2pdConfig.load(broken)
    with pytest.raises(ConfigError, match="option registries: want KEY=URL"):
        parse(["--registry", "docker.io"])
    with pytest.raises(ConfigError, match="option upload_slots"):
        parse(["--upload-slots", "-3"])


def parse_env(argv: list[str], environ: dict[str, str]) -> P2pdConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return from_args(parser.parse_args(argv), environ)


def test_environment_sits_between_the_file_and_the_flags(tmp_path: Path) -> None:
    path = tmp_path / "p2pd.toml"
    path.write_text(TOML)
    env = {
        "P2PD_CONFIG": str(path),
        "P2PD_QUOTA_BYTES": "7_000",
        "P2PD_ZONE": "rack-env",
        "P2PD_SUPERNODES": "http://e1:1, http://e2:2",
        "P2PD_REGISTRIES": "docker.io=https://env-mirror.example,quay.io=https://quay.io",
        "P2PD_BACK_TO_SOURCE_AFTER": "2.5",
        "P2PD_LOG_FORMAT": "json",
        "P2PD_PEER_ID": "",  # empty: unset, the file's/derived value stays
        "HOME": "/root",  # other variables are none of our business
    }
    config = parse_env([], env)
    assert config.zone == "rack-env" and config.quota_bytes == 7000  # env over the file
    assert config.upload_rate == 1_000_000  # the file's, untouched by env
    assert config.supernodes == ("http://e1:1", "http://e2:2")
    assert dict(config.registries) == {
        "docker.io": "https://env-mirror.example",  # overridden entry
        "example.test": "http://127.0.0.1:5000",  # the file's entry stays
        "quay.io": "https://quay.io",  # added
    }
    assert config.back_to_source_after == 2.5 and config.log_format == "json"
    assert config.peer_id == "10.0.0.7:7003"
    flagged = parse_env(
        ["--zone", "rack-flag", "--registry", "docker.io=https://flag.example"], env
    )
    assert flagged.zone == "rack-flag" and flagged.quota_bytes == 7000  # flags over env
    assert flagged.registries["docker.io"] == "https://flag.example"
    assert flagged.registries["quay.io"] == "https://quay.io"
    # --config beats P2PD_CONFIG
    other = tmp_path / "other.toml"
    other.write_text('zone = "from-other"\n')
    assert parse_env(["--config", str(other)], {"P2PD_CONFIG": str(path)}).zone == "from-other"


@pytest.mark.parametrize(
    ("environ", "option", "source"),
    [
        ({"P2PD_QUOTA_BYTES": "ten"}, "quota_bytes", "P2PD_QUOTA_BYTES"),
        ({"P2PD_QUOTA_BYTES": "-5"}, "quota_bytes", "P2PD_QUOTA_BYTES"),
        ({"P2PD_ACCESS_CACHE_TTL": "soon"}, "access_cache_ttl", "P2PD_ACCESS_CACHE_TTL"),
        ({"P2PD_MIRROR_LISTEN": "nowhere"}, "mirror_listen", "P2PD_MIRROR_LISTEN"),
        ({"P2PD_REGISTRIES": "docker.io"}, "registries", "P2PD_REGISTRIES"),
        ({"P2PD_REGISTRIES": "docker.io=ftp://x"}, "registries.docker.io", "P2PD_REGISTRIES"),
        ({"P2PD_SUPERNODES": "http://a:1,sn:2"}, "supernodes", "P2PD_SUPERNODES"),
        ({"P2PD_LOG_LEVEL": "chatty"}, "log_level", "P2PD_LOG_LEVEL"),
        ({"P2PD_CONFIG": "/nonexistent.toml"}, "config", None),
        ({"P2PD_QUOTA": "5"}, "P2PD_QUOTA", None),  # a typo is not silently ignored
    ],
)
def test_bad_environment_values_name_the_variable(
    environ: dict[str, str], option: str, source: str | None
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_env([], environ)
    assert info.value.option == option
    assert info.value.source == source
    if source is not None:
        assert str(info.value).startswith(f"option {option}: ")
        assert str(info.value).endswith(f"(set by {source})")


def test_a_bad_flag_is_named_and_beats_a_good_variable() -> None:
    with pytest.raises(ConfigError) as info:
        parse_env(["--upload-slots", "100000"], {"P2PD_UPLOAD_SLOTS": "4"})
    assert (info.value.option, info.value.source) == ("upload_slots", "--upload-slots")


def test_kubernetes_service_variables_are_not_ours() -> None:
    """A Service named "p2pd" puts P2PD_PORT, P2PD_SERVICE_HOST, ... in every pod of its
    namespace; they must not stop the daemon (other unknown names still do)."""
    links = {
        "P2PD_PORT": "tcp://10.96.0.9:65003",
        "P2PD_PORT_65003_TCP_PROTO": "tcp",
        "P2PD_SERVICE_HOST": "10.96.0.9",
        "P2PD_SERVICE_PORT_PIECES": "65003",
    }
    config = parse_env([], {**links, "P2PD_UPLOAD_SLOTS": "4"})
    assert config.upload_slots == 4
    with pytest.raises(ConfigError) as info:
        parse_env([], {**links, "P2PD_PORTS": "1"})
    assert info.value.option == "P2PD_PORTS"
