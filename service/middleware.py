"""The request guard, a raw ASGI middleware that answers before any route reads the body.

1. Authentication: when `TL_API_KEY` is set, every `/v1` path needs `Authorization: Bearer <key>`
   (compared in constant time); other paths (`/healthz`, `/readyz`, `/metrics`, `/docs`,
   `/openapi.json`) stay open. A missing or wrong key is a 401 with `WWW-Authenticate: Bearer`.
   The path checked is the path as routed: under `uvicorn --root-path /api`, `scope["path"]` starts with
   the root path, which is stripped first (as Starlette's router does), so a prefix never opens a route.
2. Body size: a `Content-Length` over `TL_MAX_UPLOAD_BYTES` (`TL_MAX_DATASET_BYTES` for a dataset upload)
   is a 413 without reading a byte of the body; a chunked body (no length) is counted as it arrives and
   cut off at the limit, and whatever the
   route was about to answer is replaced by the same 413. So no request ever holds more than the limit
   in memory.
   Closing a connection with unread request data makes the kernel answer with a reset, which most clients
   (urllib, requests, SDKs: they write the whole body before reading) report instead of the answer. So
   every answer the guard gives to a request whose body is still coming has `Connection: close` and is
   followed by a lingering close, as nginx does: the rest of the body is read and dropped (at most
   `max(2 x limit, 64 MiB)`, for at most 10 s, 2 s idle) before the answer ends and the connection closes.
   A request that sent `Expect: 100-continue` has not sent its body: nothing is read.
3. Query strings: an empty parameter (`?status=&limit=50`) counts as absent, so API.md's templates work as
   written.
4. Web pages: with no key set, the service must not be usable by whatever page the user's browser shows.
   - Host (DNS rebinding: a page whose own name now points at this service): a `Host` that is not in
     `TL_ALLOWED_HOSTS`, not this machine's hostname and not the address the connection came in on is a
     421. `/healthz`, `/readyz`, `/metrics` and `/v2/health/*` answer any Host, so probes that address a
     pod or container by a name of their own keep working (they hold nothing a page could use).
   - Origin (cross-site requests): a POST/PUT/PATCH/DELETE whose `Origin` is not this service (the same
     host and port as `Host`, or as `X-Forwarded-Host`, which no page can set) is a 403, as is one with no
     Origin that the browser marks `Sec-Fetch-Site: cross-site`. The API sends no CORS headers, so no page
     of another origin had a legitimate use for it anyway.
   - Content-Type: a state-changing request with a body but no `Content-Type` is a 415 (a page can send a
     body without one). Inference routes change nothing and decide themselves: `/v1` predict answers 415,
     while the KServe v2 and TF Serving protocols read such a body as JSON, as their clients expect
     (`tritonclient.http`, `requests.post(url, data=...)` send none).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import problem_bytes

PROTECTED_PREFIX = "/v1"
DATASET_UPLOAD_PATH = "/v1/datasets"
#: Answered whatever the Host: liveness/readiness probes and scrapers address the process by names of their own.
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_DEFAULT_PORTS = {"http": 80, "https": 443}
#: Lingering close of a refused body: drop at least this much more of it (twice the limit when that is more) ...
LINGER_MIN_BYTES = 64 * 1024 * 1024
#: ... for at most this long in all, and this long without a byte.
LINGER_SECONDS = 10.0
LINGER_IDLE_SECONDS = 2.0


class BodyTooLarge(Exception):
    """Raised from `receive` once a streamed body passes the limit (turned into a 413 by the guard)."""


def is_protected(path: str) -> bool:
    """`/v1` and the Open Inference Protocol's `/v2` (its `/v2/health/*` probes stay open, like `/readyz`)."""
    if path == "/v2" or (path.startswith("/v2/") and not path.startswith("/v2/health/")):
        return True
    return path == PROTECTED_PREFIX or path.startswith(PROTECTED_PREFIX + "/")


def is_inference(path: str) -> bool:
    """Predict routes of every protocol: `/v1/predict`, `/v1/models/{ref}/predict`, TF Serving's
    `/v1/models/{name}:predict`, and everything under `/v2` (KServe's Open Inference Protocol)."""
    return path.startswith("/v2/") or path.endswith(("/predict", ":predict"))


def speaks_protocol_errors(path: str) -> bool:
    """The standard protocols' routes (KServe v2 under `/v2`, TF Serving's `:predict`) answer errors as their
    clients expect, `{"error": "..."}`; every other route answers problem+json."""
    return path == "/v2" or path.startswith("/v2/") or path.endswith(":predict")


def routed_path(scope: Scope) -> str:
    """The path the router matches: `scope["path"]` without the `root_path` in front of it (ASGI servers such
    as uvicorn `--root-path` put it there), exactly as Starlette's routing strips it (`starlette._utils.get_route_path`,
    private there)."""
    path: str = scope["path"]
    root = scope.get("root_path") or ""
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root):]
    return path


def bearer_token(scope: Scope) -> bytes | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
            return None
    return None


class RequestGuard:
    """Host, Origin, bearer key on /v1 paths, Content-Type and the request body limit, in that order.

    `allowed_hosts` None answers any Host (as does a `*` among them)."""

    def __init__(self, app: ASGIApp, *, api_key: str | None, max_body_bytes: int,
                 max_dataset_bytes: int | None = None, allowed_hosts: Iterable[str] | None = None,
                 linger_min_bytes: int = LINGER_MIN_BYTES,
                 linger_seconds: float = LINGER_SECONDS, linger_idle_seconds: float = LINGER_IDLE_SECONDS) -> None:
        self.app = app
        names = None if allowed_hosts is None else {name.lower().rstrip(".") for name in allowed_hosts}
        if names is not None and "*" in names:
            names = None
        if names is not None:
            names.add(socket.gethostname().lower())
        self._hosts = None if names is None else frozenset(n for n in names if not n.startswith("."))
        self._host_suffixes = () if names is None else tuple(n for n in names if n.startswith("."))
        self._key = api_key.encode() if api_key else None
        self._limit = max_body_bytes
        self._dataset_limit = max_dataset_bytes if max_dataset_bytes is not None else max_body_bytes
        self._linger = (linger_min_bytes, linger_seconds, linger_idle_seconds)

    def _limit_for(self, scope: Scope) -> tuple[int, str]:
        """The body limit of this request and the variable that sets it."""
        if scope["method"] == "POST" and routed_path(scope).rstrip("/") == DATASET_UPLOAD_PATH:
            return self._dataset_limit, "TL_MAX_DATASET_BYTES"
        return self._limit, "TL_MAX_UPLOAD_BYTES"

    def _host_allowed(self, scope: Scope, name: str) -> bool:
        if self._hosts is None or name in self._hosts:
            return True
        if any(name == suffix[1:] or name.endswith(suffix) for suffix in self._host_suffixes):
            return True
        server = scope.get("server")  # the local address the connection came in on: no rebinding names that
        return server is not None and str(server[0]).lower() == name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = routed_path(scope)
        host = _header(scope, b"host")
        if host is not None and path not in PROBE_PATHS:
            name, _ = split_host(host.decode("latin-1"))
            if not self._host_allowed(scope, name):
                await self._refuse(scope, receive, send, 421,
                                   f"this service does not answer to Host {name[:100]!r}: add the name to "
                                   "TL_ALLOWED_HOSTS (comma-separated) if it is really this service's")
                return
        if scope["method"] in UNSAFE_METHODS:
            refused = cross_origin(scope)
            if refused is not None:
                await self._refuse(scope, receive, send, 403, refused)
                return
        if self._key is not None and is_protected(path):
            token = bearer_token(scope)
            if token is None or not hmac.compare_digest(token, self._key):
                detail = ("missing bearer token: send 'Authorization: Bearer <TL_API_KEY>'" if token is None
                          else "invalid bearer token")
                challenge = 'Bearer realm="tl"' + ('' if token is None else ', error="invalid_token"')
                await self._refuse(scope, receive, send, 401, detail, [(b"www-authenticate", challenge.encode())])
                return
        length = _content_length(scope)
        if length == -1:
            await _answer(send, 400, "invalid Content-Length header", close=True,
                          protocol=speaks_protocol_errors(path))
            return
        if (scope["method"] in UNSAFE_METHODS and _body_expected(scope) and not is_inference(path)
                and not (_header(scope, b"content-type") or b"").strip()):
            await self._refuse(scope, receive, send, 415,
                               "missing Content-Type: a request body must say what it is (application/json, "
                               "multipart/form-data, or the image or archive type)")
            return
        limit, variable = self._limit_for(scope)
        detail = f"request body too large: at most {limit} bytes ({variable})"
        if length is not None and length > limit:
            await self._refuse(scope, receive, send, 413, detail)
            return
        query = scope.get("query_string", b"")
        if query:
            scope = {**scope, "query_string": drop_empty_query_values(query)}
        await self._call_limited(scope, receive, send, limit, detail)

    async def _call_limited(self, scope: Scope, receive: Receive, send: Send, limit: int, detail: str) -> None:
        received = 0
        exceeded = False
        started = False
        more_body = True

        async def limited_receive() -> Message:
            nonlocal received, exceeded, more_body
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                more_body = bool(message.get("more_body", False))
                if received > limit:
                    exceeded = True
                    raise BodyTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                return  # the route's own answer to the cut-off body is replaced by the 413 below
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            await self._refuse(scope, receive, send, 413, detail, body_left=more_body)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, status: int, detail: str,
                      extra: list[tuple[bytes, bytes]] | None = None, *, body_left: bool | None = None) -> None:
        """Answer before (the rest of) the body was read; with a body still coming, a lingering close."""
        if body_left is None:
            body_left = _body_expected(scope)
        protocol = speaks_protocol_errors(routed_path(scope))
        if not body_left:
            await _answer(send, status, detail, extra, protocol=protocol)
            return
        if _expects_continue(scope):  # the client waits for "100 Continue" before sending: nothing to drain
            await _answer(send, status, detail, extra, close=True, protocol=protocol)
            return
        limit, _ = self._limit_for(scope)
        floor, seconds, idle = self._linger
        await _answer(send, status, detail, extra, close=True, more_body=True, protocol=protocol)
        await _discard(receive, max(floor, 2 * limit), seconds, idle)
        await send({"type": "http.response.body", "body": b""})


def split_host(value: str) -> tuple[str, int | None]:
    """A Host header (or X-Forwarded-Host) -> (lower-case name without a trailing dot, port or None);
    `[::1]:8000` -> ("::1", 8000). A port that is not a number stays part of the name (so matches nothing)."""
    value = value.split(",", 1)[0].strip().lower()
    port: int | None = None
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
    elif value.count(":") == 1 and value.rpartition(":")[2].isdigit():
        name, _, digits = value.rpartition(":")
        port = int(digits)
    else:
        name = value
    return name.rstrip("."), port


def cross_origin(scope: Scope) -> str | None:
    """Why a state-changing request comes from another site (its detail), or None when it does not.

    Same origin: the `Origin` has the host and port of `Host` (or of `X-Forwarded-Host`, set by a proxy that
    rewrites Host; a page cannot send that header). No `Origin`: not a browser's cross-site request, unless
    `Sec-Fetch-Site` says it is."""
    origin = _header(scope, b"origin")
    if origin is None:
        site = (_header(scope, b"sec-fetch-site") or b"").strip().lower()
        if site in (b"cross-site", b"same-site"):
            return f"cross-site request refused (Sec-Fetch-Site: {site.decode('latin-1')}): this API takes no " \
                   "requests from other web sites"
        return None
    text = origin.decode("latin-1").strip()
    try:
        parts = urlsplit(text)
        origin_port = parts.port or _DEFAULT_PORTS.get(parts.scheme.lower())
        origin_name = (parts.hostname or "").rstrip(".")
    except ValueError:
        origin_port, origin_name = None, ""
    if origin_name and origin_port is not None:
        for header in (b"host", b"x-forwarded-host"):
            value = _header(scope, header)
            if value is None:
                continue
            name, port = split_host(value.decode("latin-1"))
            if name == origin_name and (port == origin_port if port is not None else origin_port in (80, 443)):
                return None
    return (f"cross-origin request refused: Origin {text[:100]!r} is not this service; this API takes no "
            "state-changing requests from other web sites")


def drop_empty_query_values(query: bytes) -> bytes:
    """`?status=&model=&limit=50` reads as `?limit=50`: an empty query parameter counts as not given
    (shared/API.md writes its query templates that way, and clients copy them)."""
    kept = [part for part in query.split(b"&") if part.partition(b"=")[2]]
    return b"&".join(kept)


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value)
    return None


def _body_expected(scope: Scope) -> bool:
    """Whether the request announced a body (a positive Content-Length, or Transfer-Encoding)."""
    length = _content_length(scope)
    return (length is not None and length > 0) or _header(scope, b"transfer-encoding") is not None


def _expects_continue(scope: Scope) -> bool:
    return (_header(scope, b"expect") or b"").strip().lower() == b"100-continue"


async def _discard(receive: Receive, max_bytes: int, seconds: float, idle: float) -> None:
    """Read and drop the rest of a request body: until its end, `max_bytes`, `seconds`, or `idle` seconds
    without a message, whichever comes first."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    dropped = 0
    while dropped <= max_bytes:
        remaining = deadline - loop.time()
        if remaining <= 0:
            return
        try:
            message = await asyncio.wait_for(receive(), min(idle, remaining))
        except TimeoutError:
            return
        if message["type"] != "http.request":  # http.disconnect
            return
        dropped += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def _content_length(scope: Scope) -> int | None:
    """The declared body length, None when absent, -1 when malformed."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                return -1
            return length if length >= 0 else -1
    return None


async def _answer(send: Send, status: int, detail: str, extra: list[tuple[bytes, bytes]] | None = None,
                  *, close: bool = False, more_body: bool = False, protocol: bool = False) -> None:
    """A problem+json answer (the protocols' own `{"error": ...}` JSON with `protocol`); with `more_body`, its
    bytes are sent but the response is left open (ended by an empty body message), so the server keeps
    delivering the request body meanwhile."""
    if protocol:
        body, media = json.dumps({"error": detail}).encode(), b"application/json"
    else:
        body, media = problem_bytes(status, detail), b"application/problem+json"
    headers = [(b"content-type", media), (b"content-length", str(len(body)).encode())]
    if close:  # the rest of the body was never read; the connection cannot be reused
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra or [])})
    await send({"type": "http.response.body", "body": body, "more_body": more_body})
