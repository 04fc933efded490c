"""A real upstream registry (Docker distribution 2.8, ``docker-registry``) for tests and demos.

:class:`Registry` starts ``docker-registry serve CONFIG`` on 127.0.0.1 with a free port and
filesystem storage inside its work directory, waits until ``GET /v2/`` answers, and stops the
process by PID. Auth is off, HTTP Basic (:class:`BasicAuth`, an htpasswd file), or Docker-Hub
style bearer tokens (:class:`TokenAuth`, usually from ``TokenServer.registry_auth()``).

Counting what left the registry
-------------------------------
Besides its logrus lines, the registry writes one Apache "combined" access line per request
when the response is finished, for every request including those refused by auth (which get
no logrus "response completed" line, only "error authorizing context")::

    127.0.0.1 - - [27/Nov/2026:05:26:09 +0000] "GET /v2/a/blobs/sha256:4… HTTP/1.1" 200 16000 "" "x"

The size there is the number of body bytes actually written, so an interrupted download
shows fewer bytes and a ranged GET shows 206. (For a HEAD the size can be non-zero: the
registry "writes" a body that Go's server then drops; HEADs are never counted.) With the
filesystem driver the registry serves blob bytes itself (200 or 206); it never redirects
(only the cloud drivers answer 307). :meth:`Registry.blob_gets` and
:meth:`Registry.blob_bytes_served` count from these lines; that is how a test proves that a
layer left the registry exactly once.

A line is written just after the response's last byte, so a client can finish before its line
is in the log. :meth:`Registry.sync` closes that gap: it sends a marker request and waits for
the marker's line; the counters call it first.

The config is written as JSON, which is valid YAML, so no YAML library (or escaping) is needed.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import httpx

from benchmarks.harness.procs import (
    LOOPBACK,
    HarnessError,
    Managed,
    Process,
    free_port,
    http_responds,
    require_binary,
    tail,
    wait_for,
)

# Cost 4 is bcrypt's minimum. The registry checks the hash on every request; at the default
# cost of 12 that is ≈300 ms per request, which would dominate every timing.
BCRYPT_COST = 4


@dataclass(frozen=True)
class BasicAuth:
    """HTTP Basic auth from an htpasswd file: ``users`` maps user name to password."""

    users: Mapping[str, str]
    realm: str = "harness-registry"


@dataclass(frozen=True)
class TokenAuth:
    """Bearer-token auth: the registry sends clients to ``realm`` and trusts ``rootcertbundle``.

    ``service`` must equal the token's ``aud`` and ``issuer`` its ``iss``.
    """

    realm: str
    service: str
    issuer: str
    rootcertbundle: Path


RegistryAuth = BasicAuth | TokenAuth


@dataclass(frozen=True)
class RequestRecord:
    """One finished request, from the registry's access log line."""

    remote: str
    method: str
    uri: str
    status: int
    written: int
    user_agent: str

    @property
    def path(self) -> str:
        return self.uri.split("?", 1)[0]

    @property
    def blob_digest(self) -> str | None:
        """The digest if this is a ``/v2/<name>/blobs/<digest>`` request, else None."""
        match = _BLOB_PATH.fullmatch(self.path)
        return match.group("digest") if match else None

    @property
    def served_blob_bytes(self) -> bool:
        """A GET of a blob that sent body bytes (200 or 206); HEADs and redirects do not."""
        return (
            self.method == "GET"
            and self.status in (200, 206)
            and self.written > 0
            and self.blob_digest is not None
        )


_BLOB_PATH = re.compile(r"/v2/(?P<name>.+)/blobs/(?P<digest>[a-z0-9]+(?:[+._-][a-z0-9]+)*:[^/]+)")
_ACCESS_LINE = re.compile(
    r'(?P<remote>\S+) \S+ \S+ \[[^\]]*\] "(?P<method>[A-Z]+) (?P<uri>\S+) HTTP/[\d.]+" '
    r'(?P<status>\d{3}) (?P<size>\d+|-)(?: "[^"]*" "(?P<agent>.*)")?'
)


def parse_log_line(line: str) -> RequestRecord | None:
    """The request in one registry access-log line, or None for any other line."""
    match = _ACCESS_LINE.fullmatch(line.rstrip("\n"))
    if match is None:
        return None
    size = match.group("size")
    return RequestRecord(
        remote=match.group("remote"),
        method=match.group("method"),
        uri=match.group("uri"),
        status=int(match.group("status")),
        written=0 if size == "-" else int(size),
        user_agent=match.group("agent") or "",
    )


def write_htpasswd(path: Path, users: Mapping[str, str]) -> None:
    """An htpasswd file with bcrypt hashes (the only scheme distribution accepts)."""
    lines = []
    for user, password in users.items():
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=BCRYPT_COST))
        lines.append(f"{user}:{hashed.decode()}\n")
    path.write_text("".join(lines))


class Registry(Managed):
    """A running ``docker-registry`` on 127.0.0.1; use as a context manager.

    ``workdir`` receives the config, the storage (``storage/``) and the log (``registry.log``).
    ``stop()`` then ``start()`` is an outage: same address, same content, the log goes on.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        auth: RegistryAuth | None = None,
        startup_timeout: float = 15.0,
    ) -> None:
        self.workdir = workdir
        self.auth = auth
        self.startup_timeout = startup_timeout
        self.storage_dir = workdir / "storage"
        self.config_path = workdir / "config.yml"
        self.log_path = workdir / "registry.log"
        self.port = 0
        self._process: Process | None = None

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``: what hosts.toml and registries.conf call this registry."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def pid(self) -> int:
        if self._process is None:
            raise HarnessError("registry is not running")
        return self._process.pid

    def start(self) -> None:
        """Start on a free port; after :meth:`stop`, restart on the same port and storage."""
        if self._process is not None:
            raise HarnessError("registry already running")
        binary = require_binary("docker-registry")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage_dir.mkdir(exist_ok=True)
        # A restart must keep its address (clients' configs name it). A fresh port may be
        # taken by someone else before the registry binds it, so then we try a few.
        restart = self.port != 0
        attempts = 1 if restart else 3
        for attempt in range(attempts):
            if not restart:
                self.port = free_port()
            self.config_path.write_text(json.dumps(self._config(), indent=2))
            process = Process(
                "docker-registry", [binary, "serve", str(self.config_path)], log_path=self.log_path
            )
            process.start()
            try:
                # 401 is "ready" too: the auth layer answered, so the whole app is up.
                process.wait_ready(
                    http_responds(f"{self.url}/v2/", statuses=(200, 401)),
                    timeout=self.startup_timeout,
                    what=f"GET {self.url}/v2/",
                )
            except BaseException as e:
                process.stop()
                port_taken = "address already in use" in tail(self.log_path, 5)
                if isinstance(e, HarnessError) and port_taken and attempt + 1 < attempts:
                    continue
                raise
            self._process = process
            return

    def _config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text"},
            "storage": {
                "cache": {"blobdescriptor": "inmemory"},
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "delete": {"enabled": True},
            },
            # A fixed secret silences the startup warning; uploads are single-instance anyway.
            "http": {"addr": self.host, "secret": "harness-not-a-secret"},
            "health": {"storagedriver": {"enabled": False}},
        }
        if isinstance(self.auth, BasicAuth):
            htpasswd = self.workdir / "htpasswd"
            write_htpasswd(htpasswd, self.auth.users)
            config["auth"] = {"htpasswd": {"realm": self.auth.realm, "path": str(htpasswd)}}
        elif isinstance(self.auth, TokenAuth):
            config["auth"] = {
                "token": {
                    "realm": self.auth.realm,
                    "service": self.auth.service,
                    "issuer": self.auth.issuer,
                    "rootcertbundle": str(self.auth.rootcertbundle),
                }
            }
        return config

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            process.stop()

    # -- what the registry served ------------------------------------------------------------

    def sync(self, timeout: float = 5.0) -> None:
        """Wait until every request that finished before this call is in the log."""
        marker = f"/v2/?harness-sync={uuid.uuid4().hex}"
        try:
            httpx.get(self.url + marker, timeout=timeout)
        except httpx.HTTPError as e:
            raise HarnessError(f"registry did not answer the log marker request: {e}") from e
        wait_for(
            lambda: marker in self._read_log(),
            timeout=timeout,
            what="the registry to log the marker request",
        )

    def requests(self) -> list[RequestRecord]:
        """Every request the registry has logged so far, in order (after :meth:`sync`).

        The marker requests of :meth:`sync` are left out.
        """
        self.sync()
        return [r for r in self._read_records() if "harness-sync=" not in r.uri]

    def _read_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _read_records(self) -> list[RequestRecord]:
        lines = self._read_log().splitlines()
        return [r for line in lines if (r := parse_log_line(line)) is not None]

    def blob_gets(self, digest: str) -> int:
        """How many GETs of blob ``digest`` sent bytes (200/206 with a body); HEADs excluded."""
        return sum(1 for r in self.requests() if r.served_blob_bytes and r.blob_digest == digest)

    def blob_bytes_by_digest(self) -> dict[str, int]:
        """Blob body bytes served so far, per digest."""
        served: dict[str, int] = {}
        for r in self.requests():
            if r.served_blob_bytes and r.blob_digest is not None:
                served[r.blob_digest] = served.get(r.blob_digest, 0) + r.written
        return served

    def blob_bytes_served(self) -> int:
        """Blob body bytes served so far, all digests together (the registry's blob egress)."""
        return sum(self.blob_bytes_by_digest().values())
