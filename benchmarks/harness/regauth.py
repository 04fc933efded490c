"""Registry authentication for httpx: answer a 401 challenge with Basic or a bearer token.

:class:`ChallengeAuth` is an ``httpx.Auth`` that does what docker, containerd and skopeo do:

* ``401`` + ``WWW-Authenticate: Basic …`` → retry with the credentials;
* ``401`` + ``WWW-Authenticate: Bearer realm=R,service=S,scope=X`` → ``GET R?service=S&scope=X``
  (with the credentials as Basic auth, if any), then retry with ``Bearer <token>``.

The last ``Authorization`` that worked is sent up front on later requests, so a streamed
upload body is sent once: ``push_image`` authenticates on the small ``POST`` that opens an
upload and the big ``PUT`` reuses it. (A body that is a generator cannot be replayed; if the
pre-sent header is refused anyway, httpx raises instead of sending a truncated body.)
"""

from __future__ import annotations

import base64
import re
from collections.abc import Generator

import httpx

Credentials = tuple[str, str]

_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="r",service="s"`` → ("bearer", {"realm": "r", "service": "s"})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {key.lower(): quoted or bare for key, quoted, bare in _PARAM.findall(rest)}
    return scheme.lower(), params


def basic_header(credentials: Credentials) -> str:
    user, password = credentials
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class RegistryAuthError(RuntimeError):
    """The registry's challenge could not be answered (bad credentials, token server error)."""


class ChallengeAuth(httpx.Auth):
    """Answers registry 401 challenges; ``credentials`` None means anonymous."""

    requires_response_body = True

    def __init__(self, credentials: Credentials | None = None) -> None:
        self.credentials = credentials
        self._authorization: str | None = None

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if self._authorization is not None and "Authorization" not in request.headers:
            request.headers["Authorization"] = self._authorization
        response = yield request
        if response.status_code != 401:
            return
        scheme, params = parse_challenge(response.headers.get("WWW-Authenticate", ""))
        if scheme == "basic":
            if self.credentials is None:
                return
            authorization = basic_header(self.credentials)
        elif scheme == "bearer" and "realm" in params:
            query: dict[str, str] = {k: params[k] for k in ("service", "scope") if k in params}
            token_request = httpx.Request("GET", params["realm"], params=query)
            if self.credentials is not None:
                token_request.headers["Authorization"] = basic_header(self.credentials)
            token_response = yield token_request
            if token_response.status_code != 200:
                raise RegistryAuthError(
                    f"token server {params['realm']} answered {token_response.status_code}: "
                    f"{token_response.text[:300]}"
                )
            body = token_response.json()
            token = body.get("token") or body.get("access_token")
            if not isinstance(token, str):
                raise RegistryAuthError(f"token server sent no token: {body!r}"[:300])
            authorization = f"Bearer {token}"
        else:
            return
        if authorization == request.headers.get("Authorization"):
            return  # the same answer was just refused; asking again would loop
        self._authorization = authorization
        request.headers["Authorization"] = authorization
        yield request
