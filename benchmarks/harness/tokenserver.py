"""A Docker-Hub-style token server, for registries that use bearer-token auth.

The flow it serves (Docker registry token authentication; the "Docker Hub flow"):

1. A client asks the registry for something and gets ``401`` with
   ``WWW-Authenticate: Bearer realm="<our /token>",service="…",scope="repository:NAME:pull"``.
2. It asks us ``GET /token?service=S&scope=repository:NAME:pull,push[&scope=…]``, with HTTP
   Basic credentials or none (anonymous). containerd, when it has a password, first tries the
   OAuth2 form ``POST /token`` (``grant_type=password``, ``username``, ``password``,
   ``service``, space-separated ``scope``); both are served.
3. We answer ``{"token", "access_token", "expires_in", "issued_at"}``; the token is an RS256
   JWT whose ``access`` claim lists, per requested resource, the requested actions that this
   account is granted. A request for more than is granted is not an error: the token simply
   carries less, and the registry answers the client 401/403 (that is how Docker Hub behaves).
4. The client retries at the registry with ``Authorization: Bearer <token>``.

How the registry trusts the token (distribution 2.8, ``registry/auth/token/token.go``): ``iss``
must equal its configured ``issuer``, ``aud`` (a single string in 2.8) its ``service``,
``nbf``/``exp`` must hold within 60 s of leeway, and the signing key comes from the header's
``x5c`` chain, which must verify against ``rootcertbundle``. We sign with a fresh RSA key whose
self-signed certificate is both the whole ``x5c`` chain and the bundle. The header also has a
libtrust-style ``kid`` (the registry loads the bundle's keys as trusted keys too), so a
registry that ignored ``x5c`` would still find the key.

Accounts and grants are plain data: ``users`` (name → password), ``grants`` (name →
repository pattern → actions) and ``anonymous`` (repository pattern → actions, for requests
without credentials; also granted to every authenticated user). Patterns are
``fnmatch``-style, so ``"public/*"`` matches ``public/app`` and ``public/a/b``.

The server runs on 127.0.0.1 in a thread of the test process (stdlib ``http.server``); the
thread is stopped and joined when the ``with`` block ends. :attr:`TokenServer.issued` records
every token handed out, so tests can check which account asked for what.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import fnmatch
import hashlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from benchmarks.harness.procs import LOOPBACK, HarnessError, Managed
from benchmarks.harness.registry import TokenAuth


@dataclass(frozen=True)
class Access:
    """One entry of a token's ``access`` claim."""

    type: str
    name: str
    actions: tuple[str, ...]

    def claim(self) -> dict[str, Any]:
        return {"type": self.type, "name": self.name, "actions": list(self.actions)}


@dataclass(frozen=True)
class IssuedToken:
    """A token we handed out: to whom (None = anonymous), what was asked and what was given.

    ``method`` is "GET" for the classic token request, "POST" for the OAuth2 password grant.
    """

    method: str
    account: str | None
    service: str
    requested: tuple[Access, ...]
    granted: tuple[Access, ...]
    token: str


class TokenRequestError(Exception):
    """A token request we refuse: carries the HTTP status and the reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def parse_scope(scope: str) -> Access:
    """``repository:NAME:pull,push`` → Access; NAME may itself contain ``:`` (a port)."""
    kind, sep, rest = scope.partition(":")
    name, sep2, actions = rest.rpartition(":")
    if not sep or not sep2 or not kind or not name:
        raise TokenRequestError(400, f"malformed scope {scope!r}")
    return Access(kind, name, tuple(a for a in actions.split(",") if a))


def libtrust_key_id(public_key: rsa.RSAPublicKey) -> str:
    """The key ID distribution's libtrust computes: base32(sha256(SPKI DER)[:30]) in 4s."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    b32 = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(b32[i : i + 4] for i in range(0, len(b32), 4))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer(Managed):
    """Issues registry tokens on ``http://127.0.0.1:PORT/token``; use as a context manager.

    ``workdir`` receives ``token-cert.pem``, the bundle the registry must trust.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        users: Mapping[str, str],
        grants: Mapping[str, Mapping[str, Sequence[str]]],
        anonymous: Mapping[str, Sequence[str]] | None = None,
        service: str = "harness-registry",
        issuer: str = "harness-token-server",
        ttl: int = 300,
    ) -> None:
        self.workdir = workdir
        self.users = dict(users)
        self.grants = {user: dict(g) for user, g in grants.items()}
        self.anonymous = dict(anonymous or {})
        self.service = service
        self.issuer = issuer
        self.ttl = ttl
        self.cert_path = workdir / "token-cert.pem"
        self.issued: list[IssuedToken] = []
        self._lock = threading.Lock()
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._cert = self._self_signed_cert()
        self._x5c = base64.b64encode(self._cert.public_bytes(serialization.Encoding.DER)).decode()
        self._kid = libtrust_key_id(self._key.public_key())
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def _self_signed_cert(self) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.issuer)])
        now = dt.datetime.now(dt.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )

    # -- life-cycle --------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._server is None:
            raise HarnessError("token server is not running")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def realm(self) -> str:
        return f"{self.url}/token"

    def registry_auth(self) -> TokenAuth:
        """The ``auth: token:`` settings a :class:`Registry` needs to trust this server."""
        return TokenAuth(
            realm=self.realm,
            service=self.service,
            issuer=self.issuer,
            rootcertbundle=self.cert_path,
        )

    def start(self) -> None:
        if self._server is not None:
            raise HarnessError("token server already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cert_path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        server = ThreadingHTTPServer((LOOPBACK, 0), _handler_for(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="token-server"
        )
        self._thread.start()

    def stop(self) -> None:
        server, self._server = self._server, None
        thread, self._thread = self._thread, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    # -- policy and tokens (no HTTP here) ----------------------------------------------------

    def authenticate(self, username: str | None, password: str | None) -> str | None:
        """The account for these credentials (None = anonymous); raises 401 if they are wrong."""
        if username is None:
            return None
        if self.users.get(username) != password:
            raise TokenRequestError(401, f"bad credentials for {username!r}")
        return username

    def allowed(self, account: str | None, requested: Access) -> Access:
        """The part of ``requested`` this account may do."""
        tables: list[Mapping[str, Sequence[str]]] = [self.anonymous]
        if account is not None:
            tables.append(self.grants.get(account, {}))
        granted: set[str] = set()
        if requested.type == "repository":
            for table in tables:
                for pattern, actions in table.items():
                    if fnmatch.fnmatchcase(requested.name, pattern):
                        granted.update(actions)
        actions = tuple(a for a in requested.actions if a in granted or "*" in granted)
        return Access(requested.type, requested.name, actions)

    def issue(
        self, account: str | None, service: str, scopes: Sequence[str], *, method: str = "GET"
    ) -> IssuedToken:
        """Sign a token for ``account`` covering what it may do of ``scopes``."""
        if service != self.service:
            raise TokenRequestError(400, f"unknown service {service!r}; we serve {self.service!r}")
        requested = tuple(parse_scope(s) for s in scopes)
        granted = tuple(self.allowed(account, r) for r in requested)
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": account or "",
            "aud": self.service,
            "exp": now + self.ttl,
            "nbf": now - 1,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": [g.claim() for g in granted],
        }
        header = {"typ": "JWT", "alg": "RS256", "kid": self._kid, "x5c": [self._x5c]}
        signing_input = (
            _b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + _b64url(json.dumps(claims, separators=(",", ":")).encode())
        )
        signature = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        issued = IssuedToken(
            method, account, service, requested, granted, f"{signing_input}.{_b64url(signature)}"
        )
        with self._lock:
            self.issued.append(issued)
        return issued

    def response_body(self, issued: IssuedToken) -> dict[str, Any]:
        issued_at = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {
            "token": issued.token,
            "access_token": issued.token,
            "expires_in": self.ttl,
            "issued_at": issued_at,
        }


def _basic_credentials(header: str | None) -> tuple[str | None, str | None]:
    if not header or not header.lower().startswith("basic "):
        return None, None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError) as e:
        raise TokenRequestError(400, "malformed Basic credentials") from e
    user, sep, password = decoded.partition(":")
    if not sep:
        raise TokenRequestError(400, "malformed Basic credentials")
    return user, password


def _handler_for(server: TokenServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            def issue() -> IssuedToken:
                url = urlsplit(self.path)
                if url.path != "/token":
                    raise TokenRequestError(404, "not found")
                query = parse_qs(url.query)
                user, password = _basic_credentials(self.headers.get("Authorization"))
                account = server.authenticate(user, password)
                return server.issue(account, query.get("service", [""])[0], query.get("scope", []))

            self._answer(issue)

        def do_POST(self) -> None:
            def issue() -> IssuedToken:
                if urlsplit(self.path).path != "/token":
                    raise TokenRequestError(404, "not found")
                length = int(self.headers.get("Content-Length") or 0)
                if length > 64 * 1024:
                    raise TokenRequestError(413, "form too large")
                form = parse_qs(self.rfile.read(length).decode("utf-8", "replace"))
                if form.get("grant_type", [""])[0] != "password":
                    raise TokenRequestError(400, "unsupported_grant_type")
                account = server.authenticate(
                    form.get("username", [None])[0], form.get("password", [""])[0]
                )
                scopes = " ".join(form.get("scope", [])).split()
                return server.issue(account, form.get("service", [""])[0], scopes, method="POST")

            self._answer(issue)

        def _answer(self, issue: Callable[[], IssuedToken]) -> None:
            try:
                issued = issue()
            except TokenRequestError as e:
                self._send(e.status, {"errors": [{"code": "DENIED", "message": e.reason}]})
                return
            self._send(200, server.response_body(issued))

        def _send(self, status: int, body: Mapping[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status == 401:
                self.send_header("WWW-Authenticate", 'Basic realm="harness-token-server"')
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            # Quiet: tests read `server.issued` instead of a log.
            pass

    return Handler
