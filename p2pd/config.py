"""The daemon's settings: one frozen `P2pdConfig`, from a TOML file, the environment and flags.

Rules:
- Every option has one name, the same in the TOML file and in `P2pdConfig` (``mirror_listen``);
  its flag is that name with dashes (``--mirror-listen``) and its environment variable is
  ``P2PD_`` and the name in capitals (``P2PD_MIRROR_LISTEN``; the file itself: ``P2PD_CONFIG``).
  An unknown key in the file, or an unknown ``P2PD_*`` variable, is an error (a typo must not
  silently fall back to a default). An empty variable counts as unset.
- Precedence: the file, then the environment, then flags. A list (``--supernodes a,b``,
  ``P2PD_SUPERNODES=a,b``) replaces the list below it; a table (``--registry NAME=URL``,
  repeatable; ``P2PD_REGISTRIES=NAME=URL,NAME=URL``) adds to or overrides the entries below it
  one by one.
- Everything is checked once, when the config is built; a bad value raises `ConfigError`
  naming the option, and the variable or flag that set it, so the daemon refuses to start
  instead of misbehaving later. SIGHUP builds the config again the same way.
- Upstream registries are an allow-list: the mirror only talks to the base URLs named here
  (``default_upstream``, ``registries``, ``prefixes``); it is not an open proxy.

Example (``/etc/p2pd/p2pd.toml``)::

    mirror_listen = "127.0.0.1:65001"
    peer_listen = "0.0.0.0:65003"
    advertise = "10.0.0.7:65003"
    supernodes = ["http://10.0.0.2:8002", "http://10.0.0.3:8002"]
    default_upstream = "https://registry-1.docker.io"   # requests that name no registry
    data_dir = "/var/lib/p2pd"
    quota_bytes = 100_000_000_000
    zone = "rack-12"

    [registries]            # containerd's ?ns=<host> -> where that registry really is
    "docker.io" = "https://registry-1.docker.io"
    "registry.example.com" = "https://registry.example.com"

    [prefixes]              # registries.conf mirror "127.0.0.1:65001/quay" -> /v2/quay/...
    "quay" = "https://quay.io"
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from p2pd.core.layout import MAX_BLOB_SIZE
from p2pd.wire import MAX_UPLOAD_SLOTS


class ConfigError(ValueError):
    """A bad option value; `option` names it as in the TOML file, `source` (if known) the
    environment variable or flag that set it."""

    def __init__(self, option: str, message: str, source: str | None = None) -> None:
        where = f" (set by {source})" if source else ""
        super().__init__(f"option {option}: {message}{where}")
        self.option = option
        self.message = message
        self.source = source


@dataclass(frozen=True, slots=True)
class Address:
    """A ``host:port`` to listen on or to be reached at; IPv6 hosts are bracketed in text."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_wildcard(self) -> bool:
        return self.host in ("0.0.0.0", "::", "")


_HOSTNAME = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?")
_ID_CHARS = re.compile(r"[A-Za-z0-9._:-]")  # p2pd.wire's peer id / zone alphabet
_NAME_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_PREFIX = re.compile(rf"{_NAME_COMPONENT}(?:/{_NAME_COMPONENT})*")
# A registry host as containerd writes it in ?ns=: a name or IPv4 with an optional port, or a
# bracketed IPv6 address with one.
_REGISTRY_HOST = re.compile(r"(?:[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?|\[[0-9a-f:.]+\])(?::[0-9]{1,5})?")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


def _immutable(mapping: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class P2pdConfig:
    """Every option of the daemon. Build it with `from_mapping`, `load` or `from_args`, which
    check every value; the defaults here are those of an empty config file."""

    mirror_listen: Address = Address("127.0.0.1", 65001)
    peer_listen: Address = Address("127.0.0.1", 65003)
    # How other peers reach peer_listen; None in the input means "the same as peer_listen".
    advertise: Address = Address("127.0.0.1", 65003)
    peer_id: str = "127.0.0.1:65003"
    supernodes: tuple[str, ...] = ()
    default_upstream: str = ""
    registries: Mapping[str, str] = field(default_factory=lambda: _immutable({}), hash=False)
    prefixes: Mapping[str, str] = field(default_factory=lambda: _immutable({}), hash=False)
    data_dir: Path = Path("/var/lib/p2pd")
    quota_bytes: int = 0
    zone: str = ""
    upload_rate: int = 0
    download_rate: int = 0
    upload_slots: int = 8
    back_to_source_after: float = 15.0
    access_cache_ttl: float = 60.0
    log_level: str = "info"
    log_format: str = "text"  # "text", or "json": one JSON object per line
    # file holding the fleet's shared secret; pieces and control messages are then signed and
    # checked (p2pd.clusterauth); None: open to anyone who can reach the piece port
    cluster_secret_file: Path | None = None

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> P2pdConfig:
        """Build and check a config from TOML-like values (unknown keys are errors)."""
        return _build(raw)

    @classmethod
    def load(cls, path: Path) -> P2pdConfig:
        return _build(read_toml(path))

    @property
    def log_level_number(self) -> int:
        return logging.getLevelNamesMapping()[self.log_level.upper()]

    def upstreams(self) -> frozenset[str]:
        """Every upstream base URL the mirror may contact."""
        found = {*self.registries.values(), *self.prefixes.values()}
        if self.default_upstream:
            found.add(self.default_upstream)
        return frozenset(found)


OPTIONS = tuple(f.name for f in fields(P2pdConfig))
ENV_PREFIX = "P2PD_"
_INT_OPTIONS = frozenset({"quota_bytes", "upload_rate", "download_rate", "upload_slots"})
_FLOAT_OPTIONS = frozenset({"back_to_source_after", "access_cache_ttl"})
_TABLE_OPTIONS = frozenset({"registries", "prefixes"})
_FLAG_NAMES = {"registries": "--registry", "prefixes": "--prefix"}


def env_name(option: str) -> str:
    """The environment variable of `option` (``quota_bytes`` -> ``P2PD_QUOTA_BYTES``)."""
    return ENV_PREFIX + option.upper()


def flag_name(option: str) -> str:
    return _FLAG_NAMES.get(option, "--" + option.replace("_", "-"))


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"{path} is not valid TOML: {exc}") from exc


# -- command line -------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and one flag per option; absent flags leave the file's values alone."""
    group = parser.add_argument_group("daemon options (override the config file)")
    s = argparse.SUPPRESS
    group.add_argument("--config", type=Path, default=s, metavar="FILE", help="TOML config file")
    group.add_argument("--mirror-listen", default=s, metavar="HOST:PORT")
    group.add_argument("--peer-listen", default=s, metavar="HOST:PORT")
    group.add_argument("--advertise", default=s, metavar="HOST:PORT")
    group.add_argument("--peer-id", default=s)
    group.add_argument(
        "--supernodes", default=s, metavar="URL,URL", help="comma-separated; replaces the file's"
    )
    group.add_argument("--default-upstream", default=s, metavar="URL")
    group.add_argument(
        "--registry",
        dest="registries",
        action="append",
        default=s,
        metavar="NAME=URL",
        help="registry host (as in ?ns=) -> base URL; repeatable",
    )
    group.add_argument(
        "--prefix",
        dest="prefixes",
        action="append",
        default=s,
        metavar="PREFIX=URL",
        help="path prefix -> base URL; repeatable",
    )
    group.add_argument("--data-dir", type=Path, default=s, metavar="DIR")
    group.add_argument("--cluster-secret-file", type=Path, default=s, metavar="FILE")
    group.add_argument("--quota-bytes", type=int, default=s, metavar="N")
    group.add_argument("--zone", default=s)
    group.add_argument("--upload-rate", type=int, default=s, metavar="BYTES_PER_S")
    group.add_argument("--download-rate", type=int, default=s, metavar="BYTES_PER_S")
    group.add_argument("--upload-slots", type=int, default=s, metavar="N")
    group.add_argument("--back-to-source-after", type=float, default=s, metavar="SECONDS")
    group.add_argument("--access-cache-ttl", type=float, default=s, metavar="SECONDS")
    group.add_argument("--log-level", default=s, choices=LOG_LEVELS)
    group.add_argument("--log-format", default=s, choices=LOG_FORMATS)


def from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> P2pdConfig:
    """The config file (``--config``, else ``P2PD_CONFIG``, else none), overridden by the
    ``P2PD_*`` variables of `environ` (default: this process's), overridden by the flags."""
    env = _from_environ(os.environ if environ is None else environ)
    given = vars(args)
    if "config" in given:
        raw: dict[str, Any] = dict(read_toml(given["config"]))
    elif "config" in env:
        raw = dict(read_toml(Path(env.pop("config"))))
    else:
        raw = {}
    env.pop("config", None)
    origin: dict[str, str] = {}
    for name, value in env.items():
        raw[name] = _merge_table(raw, name, value) if name in _TABLE_OPTIONS else value
        origin[name] = env_name(name)
    for name in OPTIONS:
        if name not in given:
            continue
        value = given[name]
        if name == "supernodes":
            value = _split_list(str(value))
        elif name in _TABLE_OPTIONS:
            value = _merge_table(raw, name, _pairs(name, value, flag_name(name)))
        elif name in ("data_dir", "cluster_secret_file"):
            value = str(value)
        raw[name] = value
        origin[name] = flag_name(name)
    try:
        return _build(raw)
    except ConfigError as exc:
        source = origin.get(exc.option.split(".", 1)[0])
        if source is None or exc.source is not None:
            raise
        raise ConfigError(exc.option, exc.message, source) from None


# Variables Kubernetes puts in every pod for each Service of its namespace (a Service named
# "p2pd" or "supernode" brings P2PD_PORT, SUPERNODE_SERVICE_HOST, ...): not ours, not errors.
_SERVICE_LINK = re.compile(
    r".*_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT(_[0-9]+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)?)"
)


def is_service_link(var: str) -> bool:
    """Whether `var` looks like a Kubernetes service-link variable (see `_SERVICE_LINK`)."""
    return _SERVICE_LINK.fullmatch(var) is not None


def _from_environ(environ: Mapping[str, str]) -> dict[str, Any]:
    """The options set by ``P2PD_*`` variables, parsed to the TOML file's types."""
    out: dict[str, Any] = {}
    known = {env_name(o): o for o in (*OPTIONS, "config")}
    for var in sorted(environ):
        if not var.startswith(ENV_PREFIX) or (var not in known and is_service_link(var)):
            continue
        text = environ[var].strip()
        name = known.get(var)
        if name is None:
            options = ", ".join(sorted(known))
            raise ConfigError(var, f"unknown environment variable (known: {options})")
        if not text:
            continue
        value: Any = text
        try:
            if name in _INT_OPTIONS:
                value = int(text)
            elif name in _FLOAT_OPTIONS:
                value = float(text)
        except ValueError:
            kind = "an integer" if name in _INT_OPTIONS else "a number"
            raise ConfigError(name, f"want {kind}, got {text!r}", var) from None
        if name == "supernodes":
            value = _split_list(text)
        elif name in _TABLE_OPTIONS:
            value = _pairs(name, _split_list(text), var)
        out[name] = value
    return out


def _split_list(text: str) -> list[str]:
    return [u.strip() for u in text.split(",") if u.strip()]


def _merge_table(raw: Mapping[str, Any], name: str, pairs: Mapping[str, str]) -> dict[str, Any]:
    below = raw.get(name)
    table = dict(below) if isinstance(below, dict) else {}
    table.update(pairs)
    return table


def _pairs(option: str, items: Sequence[str], source: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, url = item.partition("=")
        if not sep or not key.strip() or not url.strip():
            raise ConfigError(option, f"want KEY=URL, got {item!r}", source)
        out[key.strip()] = url.strip()
    return out


# -- checking -----------------------------------------------------------------------------------


def _build(raw: Mapping[str, Any]) -> P2pdConfig:
    unknown = sorted(set(raw) - set(OPTIONS))
    if unknown:
        raise ConfigError(unknown[0], f"unknown option (known: {', '.join(OPTIONS)})")
    d = P2pdConfig()
    peer_listen = _address(raw, "peer_listen", d.peer_listen, listen=True)
    if raw.get("advertise") is not None:
        advertise = _address(raw, "advertise", d.advertise, listen=False)
    elif peer_listen.is_wildcard or peer_listen.port == 0:
        raise ConfigError(
            "advertise",
            f"must be set: peer_listen {peer_listen} is not an address other hosts can use",
        )
    else:
        advertise = peer_listen
    if advertise.is_wildcard or advertise.port == 0:
        raise ConfigError("advertise", f"{advertise} is not an address other hosts can use")
    peer_id = _string(raw, "peer_id", "") or _derive_peer_id(advertise)
    _check_id("peer_id", peer_id, min_len=1)
    zone = _string(raw, "zone", d.zone)
    _check_id("zone", zone, min_len=0)
    supernodes = raw.get("supernodes", [])
    if not isinstance(supernodes, list):
        raise ConfigError("supernodes", "must be a list of http(s)://host:port URLs")
    level = _string(raw, "log_level", d.log_level).lower()
    if level not in LOG_LEVELS:
        raise ConfigError("log_level", f"must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    default_upstream = _string(raw, "default_upstream", "")
    return P2pdConfig(
        mirror_listen=_address(raw, "mirror_listen", d.mirror_listen, listen=True),
        peer_listen=peer_listen,
        advertise=advertise,
        peer_id=peer_id,
        supernodes=tuple(_base_url("supernodes", u, allow_path=False) for u in supernodes),
        default_upstream=_base_url("default_upstream", default_upstream)
        if default_upstream
        else "",
        registries=_table(raw, "registries", _REGISTRY_HOST, str.lower),
        prefixes=_table(raw, "prefixes", _PREFIX, lambda k: k.strip("/")),
        data_dir=_data_dir(raw, d.data_dir),
        quota_bytes=_int(raw, "quota_bytes", d.quota_bytes, MAX_BLOB_SIZE * 1024),
        zone=zone,
        upload_rate=_int(raw, "upload_rate", d.upload_rate, 1 << 50),
        download_rate=_int(raw, "download_rate", d.download_rate, 1 << 50),
        upload_slots=_int(raw, "upload_slots", d.upload_slots, MAX_UPLOAD_SLOTS),
        back_to_source_after=_seconds(raw, "back_to_source_after", d.back_to_source_after, 0.1),
        access_cache_ttl=_seconds(raw, "access_cache_ttl", d.access_cache_ttl, 0.0),
        log_level=level,
        log_format=_log_format(raw, d.log_format),
        cluster_secret_file=_secret_file(raw),
    )


def _log_format(raw: Mapping[str, Any], default: str) -> str:
    value = _string(raw, "log_format", default).lower()
    if value not in LOG_FORMATS:
        raise ConfigError("log_format", f"must be one of {', '.join(LOG_FORMATS)}, got {value!r}")
    return value


def _string(raw: Mapping[str, Any], name: str, default: str) -> str:
    value = raw.get(name, default)
    if not isinstance(value, str):
        raise ConfigError(name, f"must be a string, got {value!r}")
    return value.strip()


def _int(raw: Mapping[str, Any], name: str, default: int, maximum: int) -> int:
    value = raw.get(name, default)
    if type(value) is not int or not 0 <= value <= maximum:
        raise ConfigError(name, f"must be an integer from 0 to {maximum}, got {value!r}")
    return value


def _seconds(raw: Mapping[str, Any], name: str, default: float, minimum: float) -> float:
    value = raw.get(name, default)
    if type(value) not in (int, float) or not minimum <= value <= 86400 * 7:
        raise ConfigError(name, f"must be a number of seconds from {minimum} to 604800")
    return float(value)


def _address(raw: Mapping[str, Any], name: str, default: Address, *, listen: bool) -> Address:
    value = raw.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise ConfigError(name, f"must be a 'host:port' string, got {value!r}")
    text = value.strip()
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(name, f"bad IPv6 address in {text!r}") from None
    elif not sep or _HOSTNAME.fullmatch(host) is None:
        raise ConfigError(name, f"want host:port (IPv6 as [addr]:port), got {text!r}")
    if not port_text.isdigit() or len(port_text) > 5 or int(port_text) > 65535:
        raise ConfigError(name, f"bad port in {text!r}")
    port = int(port_text)
    if port == 0 and not listen:
        raise ConfigError(name, f"port 0 in {text!r}: peers need a real port")
    return Address(host, port)


def _base_url(name: str, value: object, *, allow_path: bool = True) -> str:
    """An http(s) base URL, normalised without a trailing slash."""
    if not isinstance(value, str):
        raise ConfigError(name, f"must be an http(s) URL string, got {value!r}")
    text = value.strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(name, f"bad URL {text!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(name, f"want an http:// or https:// URL with a host, got {text!r}")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(name, f"credentials in a URL are not allowed: {parts.hostname}")
    if parts.query or parts.fragment or "#" in text:
        raise ConfigError(name, f"a base URL has no query or fragment: {text!r}")
    if port == 0:
        raise ConfigError(name, f"port 0 in {text!r}")
    path = parts.path.rstrip("/")
    if path and (not allow_path or not re.fullmatch(r"(?:/[A-Za-z0-9._~-]+)+", path)):
        raise ConfigError(name, f"unexpected path {parts.path!r} in {text!r}")
    if any(seg in (".", "..") for seg in path.split("/")):
        raise ConfigError(name, f"dot segments in {text!r}")
    return f"{parts.scheme}://{parts.netloc.lower()}{path}"


def _table(
    raw: Mapping[str, Any], name: str, key_re: re.Pattern[str], norm: Callable[[str], str]
) -> Mapping[str, str]:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(name, "must be a table of KEY = URL")
    out: dict[str, str] = {}
    for key, url in value.items():
        k = norm(str(key).strip())
        if key_re.fullmatch(k) is None:
            raise ConfigError(name, f"bad key {key!r}")
        if k in out:
            raise ConfigError(name, f"key {key!r} given twice")
        out[k] = _base_url(f"{name}.{key}", url)
    return _immutable(out)


def _data_dir(raw: Mapping[str, Any], default: Path) -> Path:
    text = _string(raw, "data_dir", str(default))
    if not text or "\x00" in text:
        raise ConfigError("data_dir", "must be a directory path")
    return Path(text)


def _secret_file(raw: Mapping[str, Any]) -> Path | None:
    text = _string(raw, "cluster_secret_file", "")
    if not text:
        return None
    path = Path(text)
    try:
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError("cluster_secret_file", f"cannot read {path}: {exc.strerror}") from None
    if len(secret) < 16:
        raise ConfigError("cluster_secret_file", f"{path} holds fewer than 16 bytes")
    return path


def _derive_peer_id(advertise: Address) -> str:
    # The wire format's peer id alphabet has no brackets; "[::1]:9" becomes "::1:9".
    text = f"{advertise.host}:{advertise.port}"
    return "".join(c if _ID_CHARS.fullmatch(c) else "_" for c in text)[-64:]


def _check_id(name: str, value: str, *, min_len: int) -> None:
    if not min_len <= len(value) <= 64 or any(_ID_CHARS.fullmatch(c) is None for c in value):
        raise ConfigError(name, f"want {min_len}..64 of A-Z a-z 0-9 . _ : -, got {value!r}")
