"""Supernode configuration: a TOML file, the environment, then flags, validated in one place.

The file (every key optional unless marked; `load_config` documents the override keys)::

    listen = "127.0.0.1:65002"        # where the control API and the piece server listen
    advertise = "10.0.0.5:65002"      # what peers dial for pieces; default: listen
    data_dir = "/var/lib/supernode"   # required (file or --data-dir); relative to the file
    quota_bytes = 200_000_000_000     # cache quota; absent = unlimited
    allowed_upstreams = ["https://registry-1.docker.io"]   # required: the fetch allowlist
    failed_task_ttl = 30.0            # seconds a FAILED blob is remembered before a retry
    seed = 1                          # scheduler rng seed; absent = random
    seeder_id = "supernode"           # the seeder's peer id in every task
    zone = ""                         # the seeder's zone
    log_level = "info"
    log_format = "text"               # or "json": one object per line, one per fetched blob
    cluster_secret_file = "/etc/p2pd/cluster.secret"   # shared by the fleet; absent = open

    [scheduler]                       # p2pd.core.scheduler.SchedulerConfig
    max_parents = 8
    seeder_upload_slots = 64
    seeder_elders = 64                # first children it serves in full once it holds a blob
    even_out = true                   # a host's last download takes parents from richer hosts
    peer_ttl = 60.0
    max_blame = 1
    control_rate = 7800.0             # messages/s it paces downloading peers to; 0 = no pacing

    [fetch]                           # how the seeder talks to the upstream registry
    connect_timeout = 10.0
    read_timeout = 30.0               # per read: a stalled upstream counts as an error
    retries = 3                       # extra attempts after a connection error, 5xx or 429
    backoff = 0.5                     # first retry delay, doubled per attempt ...
    backoff_max = 8.0                 # ... up to this
    trust_env = false                 # use HTTP(S)_PROXY / NO_PROXY from the environment

Every option is also an environment variable, ``SUPERNODE_`` and its name in capitals with the
table's name joined by ``_`` (``SUPERNODE_QUOTA_BYTES``, ``SUPERNODE_FETCH_RETRIES``; the file
itself: ``SUPERNODE_CONFIG``; lists comma-separated; booleans true/false), and a flag
(`OPTIONS` lists them). Precedence: the file, then the environment, then flags. An empty
variable counts as unset; an unknown ``SUPERNODE_*`` variable is an error.

Rules: an unknown key, a wrong type (``true`` is not a number, ``1`` is not a string) or a
value out of range is a `ConfigError` whose text starts with the option's name
(``fetch.retries: ...``), so an operator knows what to fix. Upstream URLs are normalised
(`normalize_upstream`) so that ``HTTPS://Registry:443/`` and ``https://registry`` are the same
entry of the allowlist.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlsplit

from p2pd import wire
from p2pd.config import is_service_link
from p2pd.core.bitfield import Bitfield
from p2pd.core.scheduler import SchedulerConfig, SchedulerError

DEFAULT_LISTEN = "127.0.0.1:65002"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
ENV_PREFIX = "SUPERNODE_"
_WILDCARD_HOSTS = ("0.0.0.0", "::", "")
_DEFAULT_PORTS = {"http": 80, "https": 443}

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration that cannot run; the text names the option and the rule it broke.

    `option` is the option's dotted name (``fetch.retries``, ``allowed_upstreams[0]``) when
    the error is about one option."""

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


@dataclass(frozen=True, slots=True)
class Option:
    """One option: its dotted name in the file, its TOML type, its flag and its variable."""

    name: str  # "quota_bytes", "fetch.retries"
    kind: type  # int, float, str, bool or list (of strings)
    flag: str
    help: str

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.replace(".", "_").upper()


def _option(name: str, kind: type, help: str, flag: str | None = None) -> Option:
    return Option(name, kind, flag or "--" + name.replace(".", "-").replace("_", "-"), help)


OPTIONS: tuple[Option, ...] = (
    _option("listen", str, f"address of the control API and piece server ({DEFAULT_LISTEN})"),
    _option("advertise", str, "address peers dial (default: listen; required with 0.0.0.0)"),
    _option("data_dir", str, "cache directory (required)"),
    _option("quota_bytes", int, "cache quota in bytes (default: unlimited)", "--quota"),
    _option(
        "allowed_upstreams",
        list,
        "registry base URL the supernode may fetch from (repeatable; at least one)",
        "--upstream",
    ),
    _option("failed_task_ttl", float, "seconds a failed blob is remembered (30)"),
    _option("seed", int, "scheduler random seed (default: random)"),
    _option("seeder_id", str, "the seeder's peer id (supernode)"),
    _option("zone", str, "the seeder's zone"),
    _option("log_level", str, "debug, info, warning or error (info)"),
    _option("log_format", str, "text or json (text)"),
    _option("cluster_secret_file", str, "the fleet's shared secret: sign and check messages"),
    _option("scheduler.max_parents", int, "parents per peer (8)"),
    _option("scheduler.seeder_upload_slots", int, "peers the seeder feeds at once (64)"),
    _option(
        "scheduler.seeder_elders",
        int,
        "first children served in full once the seeder holds a blob; 0 = none (64)",
    ),
    _option(
        "scheduler.even_out",
        bool,
        "a host's only download takes parents from hosts with two more (true)",
    ),
    _option("scheduler.peer_ttl", float, "seconds a silent peer is kept (60)"),
    _option("scheduler.max_blame", int, "bad pieces before a parent is banned (1)"),
    _option(
        "scheduler.control_rate",
        float,
        "messages/s the supernode paces downloading peers to; 0 = no pacing (7800)",
    ),
    _option("fetch.connect_timeout", float, "seconds to connect to the registry (10)"),
    _option("fetch.read_timeout", float, "seconds a registry read may stall (30)"),
    _option("fetch.retries", int, "extra attempts after a transient error (3)"),
    _option("fetch.backoff", float, "first retry delay in seconds, doubled per attempt (0.5)"),
    _option("fetch.backoff_max", float, "longest retry delay in seconds (8)"),
    _option("fetch.trust_env", bool, "use HTTP(S)_PROXY / NO_PROXY (false)"),
)
_BY_NAME = {o.name: o for o in OPTIONS}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def parse_bool(text: str) -> bool:
    """true/false, yes/no, on/off, 1/0 (any case); ValueError otherwise."""
    low = text.strip().lower()
    if low in _TRUE or low in _FALSE:
        return low in _TRUE
    raise ValueError(f"want true or false, got {text!r}")


@dataclass(frozen=True, slots=True)
class FetchConfig:
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    retries: int = 3
    backoff: float = 0.5
    backoff_max: float = 8.0
    trust_env: bool = False

    def delay(self, attempt: int) -> float:
        """The pause before retry number `attempt` (1-based): exponential, capped."""
        return float(min(self.backoff * 2 ** (attempt - 1), self.backoff_max))


@dataclass(frozen=True, slots=True)
class SupernodeConfig:
    data_dir: Path
    allowed_upstreams: tuple[str, ...]
    listen_host: str = "127.0.0.1"
    listen_port: int = 65002
    advertise: str | None = None
    quota_bytes: int | None = None
    failed_task_ttl: float = 30.0
    seed: int | None = None
    seeder_id: str = "supernode"
    zone: str = ""
    log_level: str = "info"
    log_format: str = "text"
    cluster_secret_file: Path | None = None  # see p2pd.clusterauth
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)

    def advertise_for(self, bound_port: int) -> str:
        """The address peers dial: `advertise`, or the listen host with the bound port."""
        if self.advertise is not None:
            return self.advertise
        return format_hostport(self.listen_host, bound_port)

    def upstream_allowed(self, url: str) -> str | None:
        """The allowlist entry `url` names (normalised), or None if it is not allowed."""
        try:
            normal = normalize_upstream(url)
        except ValueError:
            return None
        return normal if normal in self.allowed_upstreams else None


# -- helpers shared with the CLI -----------------------------------------------------------------


def parse_hostport(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); ValueError with the reason."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or len(port) > 5 or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"an IPv6 host needs brackets ([::1]:PORT), got {text!r}")
    return host, int(port)


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def normalize_upstream(url: str) -> str:
    """The canonical form of a registry base URL: lower-case scheme and host, no default
    port, no trailing slash. ValueError if it is not a plain http(s) base URL."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not a URL: {url!r} ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"not an http(s):// URL with a host: {url!r}")
    if parts.username is not None or parts.password is not None or parts.query or parts.fragment:
        raise ValueError(f"user info, query and fragment are not allowed: {url!r}")
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port in (None, _DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    return f"{scheme}://{netloc}{parts.path.rstrip('/')}"


# -- loading --------------------------------------------------------------------------------------


def load_config(
    path: Path | None = None,
    overrides: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
) -> SupernodeConfig:
    """Read the TOML file at `path` (if any; else ``SUPERNODE_CONFIG`` of `environ`), apply
    the ``SUPERNODE_*`` variables of `environ` and then `overrides`, and validate.

    `overrides` are the flags' values by dotted option name (``listen``, ``quota_bytes``,
    ``fetch.retries``, ...); a value replaces what the file or the environment said. A relative
    ``data_dir`` from the file is taken relative to the file's directory. `environ` defaults to
    none at all: the command passes ``os.environ``.
    """
    env = _from_environ(environ or {})
    if path is None and "config" in env:
        path = Path(str(env["config"]))
    env.pop("config", None)
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with path.open("rb") as f:
                raw = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        data_dir = raw.get("data_dir")
        if isinstance(data_dir, str) and not Path(data_dir).is_absolute():
            raw["data_dir"] = str(path.parent / data_dir)
    origin: dict[str, str] = {}
    for name, value in env.items():
        _put(raw, name, value)
        origin[name] = _BY_NAME[name].env
    for name, value in (overrides or {}).items():
        _put(raw, name, value)
        option = _BY_NAME.get(name)
        origin[name] = option.flag if option else name
    try:
        return from_mapping(raw)
    except ConfigError as exc:
        source = origin.get(re.sub(r"\[\d+\]$", "", exc.option or ""))
        if source is None:
            raise
        raise ConfigError(f"{exc} (set by {source})", exc.option) from None


def _put(raw: dict[str, Any], name: str, value: object) -> None:
    """Set dotted option `name` in the document `raw` (a table is copied, not changed)."""
    section, dot, key = name.partition(".")
    if not dot:
        raw[name] = value
        return
    table = raw.get(section)
    raw[section] = {**table, key: value} if isinstance(table, dict) else {key: value}


def _from_environ(environ: Mapping[str, str]) -> dict[str, object]:
    """The options set by ``SUPERNODE_*`` variables, parsed to the TOML file's types."""
    known = {o.env: o for o in OPTIONS}
    out: dict[str, object] = {}
    for var in sorted(environ):
        if not var.startswith(ENV_PREFIX) or (var not in known and is_service_link(var)):
            continue
        text = environ[var].strip()
        if var == ENV_PREFIX + "CONFIG":
            if text:
                out["config"] = text
            continue
        option = known.get(var)
        if option is None:
            names = ", ".join([ENV_PREFIX + "CONFIG", *sorted(known)])
            raise ConfigError(f"{var}: unknown environment variable (known: {names})")
        if not text:
            continue
        try:
            out[option.name] = parse_text(option, text)
        except ValueError as exc:
            raise ConfigError(f"{option.name}: {exc} (set by {var})", option.name) from None
    return out


def parse_text(option: Option, text: str) -> object:
    """A variable's text as the option's TOML type; ValueError saying what was wanted."""
    if option.kind is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"want an integer, got {text!r}") from None
    if option.kind is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"want a number, got {text!r}") from None
    if option.kind is bool:
        return parse_bool(text)
    if option.kind is list:
        return [item.strip() for item in text.split(",") if item.strip()]
    return text


def from_mapping(raw: Mapping[str, Any]) -> SupernodeConfig:
    """Validate an already-parsed configuration (the TOML document's shape)."""
    top = _Section("", raw)
    listen = top.get("listen", str, DEFAULT_LISTEN)
    try:
        host, port = parse_hostport(listen)
    except ValueError as exc:
        top.fail("listen", str(exc))
    advertise = top.get("advertise", str, None)
    data_dir = top.get("data_dir", str, None)
    if not data_dir:
        top.fail("data_dir", "required (the cache directory): set it in the file or --data-dir")
    upstreams = top.get("allowed_upstreams", list, None)
    if not upstreams:
        top.fail(
            "allowed_upstreams",
            "at least one registry base URL is required (file or --upstream): the supernode "
            "fetches only from listed registries",
        )
    allowed: list[str] = []
    for i, url in enumerate(upstreams):
        if not isinstance(url, str):
            top.fail(f"allowed_upstreams[{i}]", f"expected a string, got {type(url).__name__}")
        try:
            allowed.append(normalize_upstream(url))
        except ValueError as exc:
            top.fail(f"allowed_upstreams[{i}]", str(exc))
    quota = top.get("quota_bytes", int, None)
    if quota is not None and quota <= 0:
        top.fail("quota_bytes", f"must be positive, got {quota}")
    ttl = top.number("failed_task_ttl", 30.0, positive=False)
    seed = top.get("seed", int, None)
    if seed is not None and seed < 0:
        top.fail("seed", f"must be non-negative, got {seed}")
    log_level = top.get("log_level", str, "info").lower()
    if log_level not in LOG_LEVELS:
        top.fail("log_level", f"one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
    log_format = top.get("log_format", str, "text").lower()
    if log_format not in LOG_FORMATS:
        top.fail("log_format", f"one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    seeder_id = top.get("seeder_id", str, "supernode")
    zone = top.get("zone", str, "")
    secret_file = top.get("cluster_secret_file", str, None)
    if secret_file is not None:
        try:
            if len(Path(secret_file).read_bytes().strip()) < 16:
                top.fail("cluster_secret_file", f"{secret_file} holds fewer than 16 bytes")
        except OSError as exc:
            top.fail("cluster_secret_file", f"cannot read {secret_file}: {exc.strerror}")
    scheduler = _scheduler_config(top.section("scheduler"))
    fetch = _fetch_config(top.section("fetch"))
    top.done()

    if advertise is None and host in _WILDCARD_HOSTS:
        top.fail("advertise", f"required when listening on the wildcard address {listen!r}")
    if advertise is not None:
        try:
            parse_hostport(advertise)
        except ValueError as exc:
            top.fail("advertise", str(exc))
    # The seeder's identity travels in every Assignment: check it against the wire rules now
    # rather than on the first register.
    address = advertise if advertise is not None else format_hostport(host, port or 1)
    _wire_check(top, "advertise", address=address)
    _wire_check(top, "seeder_id", peer_id=seeder_id)
    _wire_check(top, "zone", zone=zone)
    return SupernodeConfig(
        data_dir=Path(data_dir),
        allowed_upstreams=tuple(dict.fromkeys(allowed)),
        listen_host=host,
        listen_port=port,
        advertise=advertise,
        quota_bytes=quota,
        failed_task_ttl=ttl,
        seed=seed,
        seeder_id=seeder_id,
        zone=zone,
        log_level=log_level,
        log_format=log_format,
        cluster_secret_file=Path(secret_file) if secret_file is not None else None,
        scheduler=scheduler,
        fetch=fetch,
    )


def _wire_check(section: _Section, option: str, **field: str) -> None:
    fields = {"peer_id": "p", "address": "127.0.0.1:1", "zone": ""} | field
    try:
        wire.ParentInfo(pieces=Bitfield(0), **fields)
    except wire.ProtocolError as exc:
        section.fail(option, str(exc).split(": ", 1)[-1])


def _scheduler_config(section: _Section) -> SchedulerConfig:
    d = SchedulerConfig()
    try:
        config = SchedulerConfig(
            max_parents=section.get("max_parents", int, d.max_parents),
            seeder_upload_slots=section.get("seeder_upload_slots", int, d.seeder_upload_slots),
            seeder_elders=section.get("seeder_elders", int, d.seeder_elders),
            even_out=section.get("even_out", bool, d.even_out),
            peer_ttl=section.number("peer_ttl", d.peer_ttl, positive=True),
            max_blame=section.get("max_blame", int, d.max_blame),
            control_rate=section.number("control_rate", d.control_rate, positive=False),
        )
    except SchedulerError as exc:  # its text starts with the field's name
        name, _, problem = str(exc).partition(" ")
        section.fail(name, problem)
    section.done()
    return config


def _fetch_config(section: _Section) -> FetchConfig:
    d = FetchConfig()
    config = FetchConfig(
        connect_timeout=section.number("connect_timeout", d.connect_timeout, positive=True),
        read_timeout=section.number("read_timeout", d.read_timeout, positive=True),
        retries=section.get("retries", int, d.retries),
        backoff=section.number("backoff", d.backoff, positive=False),
        backoff_max=section.number("backoff_max", d.backoff_max, positive=False),
        trust_env=section.get("trust_env", bool, d.trust_env),
    )
    if not 0 <= config.retries <= 100:
        section.fail("retries", f"must be 0..100, got {config.retries}")
    section.done()
    return config


class _Section:
    """One table of the document: typed reads that name the option, and a check that every
    key was read (so a typo is an error, not a silently ignored setting)."""

    def __init__(self, prefix: str, raw: Mapping[str, Any]) -> None:
        self.prefix = prefix
        self.raw = raw
        self.seen: set[str] = set()

    def fail(self, key: str, problem: str) -> NoReturn:
        name = f"{self.prefix}{key}" if key else self.prefix.rstrip(".") or "config"
        raise ConfigError(f"{name}: {problem}", name)

    def get(self, key: str, kind: type[T], default: T) -> T:
        self.seen.add(key)
        if key not in self.raw:
            return default
        value = self.raw[key]
        # Exact types: TOML's `true` must not pass for the int 1.
        if type(value) is not kind:
            self.fail(key, f"expected {kind.__name__}, got {type(value).__name__} {value!r}")
        return value

    def number(self, key: str, default: float, *, positive: bool) -> float:
        """A finite int or float; > 0 if `positive`, else >= 0."""
        self.seen.add(key)
        value = self.raw.get(key, default)
        if type(value) not in (int, float) or not math.isfinite(value):
            self.fail(key, f"expected a number, got {type(value).__name__} {value!r}")
        if value < 0 or (positive and value == 0):
            self.fail(key, f"must be {'> 0' if positive else '>= 0'}, got {value}")
        return float(value)

    def section(self, key: str) -> _Section:
        value = self.get(key, dict, {})
        return _Section(f"{self.prefix}{key}.", value)

    def done(self) -> None:
        unknown = sorted(set(self.raw) - self.seen)
        if unknown:
            self.fail(unknown[0], "unknown option")
