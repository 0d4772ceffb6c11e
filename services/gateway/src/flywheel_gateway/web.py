"""HTTP plumbing every route shares: errors, the origin and rate-limit guard, bodies, security headers."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Collection
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as AsgiMessage

from flywheel_common.networks import network_block, parse_address
from flywheel_gateway import metrics
from flywheel_gateway.ratelimit import RateLimiter
from flywheel_gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

# Nothing but the gateway's own files, and fetches to itself: the console and demo pages run no
# inline script or style, and no page may frame them.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
]
# Status of a service's gRPC error as the browser gets it; anything else is a 502 with no details.
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

Handler = Callable[[Request], Awaitable[Response]]


class HttpError(Exception):
    """An error the browser gets as `{"error": message}` with `status`."""

    def __init__(self, status: int, message: str, *, reason: str = "", retry_after_s: float = 0) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason
        self.retry_after_s = retry_after_s


def error_response(error: HttpError, headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON response of an error; refusals are counted by reason."""
    if error.reason:
        metrics.REFUSED.labels(error.reason).inc()
    extra = dict(headers or {})
    if error.retry_after_s:
        extra["retry-after"] = str(max(1, round(error.retry_after_s)))
    return JSONResponse({"error": error.message}, status_code=error.status, headers=extra)


def from_rpc(error: grpc.aio.AioRpcError) -> HttpError:
    """A service's error as the browser sees it: its message for client errors, nothing for the rest."""
    status = _HTTP_STATUS.get(error.code(), 502)
    if status >= 500:
        log.warning("service call failed: %s", error.code().name)
        return HttpError(status, "the service is unavailable; try again shortly")
    return HttpError(status, error.details() or error.code().name.lower())


def unicode_text(name: str, value: str) -> str:
    """The value, unless it holds what no service can encode (a lone surrogate JSON allows): 400."""
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            raise HttpError(400, f"{name} is not valid Unicode text", reason="invalid") from None
    return value


def text_field(body: dict[str, Any], name: str, max_chars: int, *, required: bool = True) -> str:
    """A string field of a JSON body, stripped and bounded."""
    value = body.get(name, "")
    if not isinstance(value, str):
        raise HttpError(400, f"{name} must be a string", reason="invalid")
    value = unicode_text(name, value.strip())
    if required and not value:
        raise HttpError(400, f"{name} is required", reason="invalid")
    if len(value) > max_chars:
        raise HttpError(400, f"{name} is longer than {max_chars} characters", reason="invalid")
    return value


def message_dict(message: Message) -> dict[str, Any]:
    """A proto message as JSON (field names as in the proto)."""
    return MessageToDict(message, preserving_proto_field_name=True)


def address_key(host: str, ipv6_prefix_length: int) -> str:
    """The rate-limit key of a client address: an IPv4 address itself (also when carried in IPv6),
    an IPv6 one its network."""
    address = parse_address(host)
    if address is None:
        return host
    if address.version == 6:
        return network_block(address, 32, ipv6_prefix_length)
    return str(address)


class Guard:
    """Origins, rate limits and bodies: what every route checks before it calls a service."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.sites = set(settings.sites)
        limits = settings.rate_limit
        self.addresses = RateLimiter(limits.address, max_keys=limits.max_keys)
        self.networks = RateLimiter(limits.network, max_keys=limits.max_keys)

    def handle(self, handler: Handler, *, cors: bool = False) -> Handler:
        """Runs a handler after the per-address rate limit, turning HttpError into its JSON response
        (with CORS headers for site calls)."""

        async def run(request: Request) -> Response:
            try:
                self.limit_address(request)
                return await handler(request)
            except HttpError as error:
                return error_response(error, self.cors(request) if cors else None)

        return run

    def check_origin(self, request: Request, *, sites: bool) -> None:
        """Refuses a request whose Origin is neither the gateway's own nor (for site calls) a site's.

        Browsers send Origin with every cross-origin request and every POST: a state-changing call
        without one is not from a page and is refused too.
        """
        origin = (request.headers.get("origin") or "").lower()
        if not origin:
            if request.method == "GET":
                return
            raise HttpError(403, "an Origin header is required", reason="origin")
        own = f"{request.url.scheme}://{request.url.netloc}".lower()
        if origin == own or (sites and origin in self.sites):
            return
        raise HttpError(403, "this origin is not allowed", reason="origin")

    def cors(self, request: Request) -> dict[str, str]:
        """CORS headers for a configured site's origin (credentials allowed); none for anyone else."""
        origin = (request.headers.get("origin") or "").lower()
        if origin not in self.sites:
            return {}
        return {
            "access-control-allow-origin": origin,
            "access-control-allow-credentials": "true",
            # The widget reads it to say how long a visitor over the question limit must wait.
            "access-control-expose-headers": "retry-after",
            "vary": "Origin",
        }

    def limit(self, limiter: RateLimiter, key: str) -> None:
        """Takes a token from `key`'s bucket; 429 with Retry-After when it is empty."""
        wait = limiter.take(key)
        if wait:
            raise HttpError(429, "too many requests; slow down", reason="rate_limit", retry_after_s=wait)

    def limit_address(self, request: Request) -> None:
        """The client's network's bucket, then its address's (the address the last trusted proxy
        saw; an IPv6 client's is its /64). The network's comes first, so that requests it refuses
        make no address buckets: a holder of a whole block cannot crowd out everyone else's."""
        host = request.client.host if request.client else "unknown"
        address = parse_address(host)
        if address is not None:
            evidence = self.settings.evidence
            network = network_block(address, evidence.ipv4_prefix_length, evidence.ipv6_prefix_length)
            self.limit(self.networks, network)
        self.limit(self.addresses, address_key(host, self.settings.rate_limit.ipv6_prefix_length))

    async def json(self, request: Request) -> dict[str, Any]:
        """The request's JSON object, bounded in size."""
        limit = self.settings.limits.max_body_bytes
        declared = request.headers.get("content-length") or "0"
        if not declared.isdigit() or int(declared) > limit:
            raise HttpError(413, f"the request is larger than {limit} bytes", reason="invalid")
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise HttpError(415, "send application/json", reason="invalid")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise HttpError(413, f"the request is larger than {limit} bytes", reason="invalid")
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            raise HttpError(400, "the body is not valid JSON", reason="invalid") from None
        if not isinstance(data, dict):
            raise HttpError(400, "the body must be a JSON object", reason="invalid")
        return data


class SecurityHeaders:
    """Adds the security headers to every response and counts responses by route and status."""

    def __init__(self, app: ASGIApp, routes: Collection[str]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = path if path in self.routes else "/demo" if path.startswith("/demo/") else "other"

        async def send_with_headers(message: AsgiMessage) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *_SECURITY_HEADERS]
                metrics.REQUESTS.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, send_with_headers)
