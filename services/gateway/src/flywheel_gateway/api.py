"""The gateway's HTTP application: the widget's calls, the review console, the widget's files, probes."""

from __future__ import annotations

import asyncio
import time
from html import escape
from importlib import resources
from pathlib import Path
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from flywheel_gateway.clients import ServiceClients
from flywheel_gateway.review import ReviewApi
from flywheel_gateway.settings import GatewaySettings
from flywheel_gateway.visitors import VisitorApi
from flywheel_gateway.web import Guard, SecurityHeaders

_STATIC = {
    "widget.js": "text/javascript; charset=utf-8",
    "widget.css": "text/css; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
}


# How long a readiness answer is reused: the probe is public, and each answer costs two gRPC calls.
READY_TTL_S = 1.0


class Gateway:
    """Builds the application from its parts; `asgi()` is what uvicorn serves."""

    def __init__(
        self,
        settings: GatewaySettings,
        clients: ServiceClients,
        *,
        session_key: bytes,
        visitor_token: str,
    ) -> None:
        self.settings = settings
        self.clients = clients
        self.guard = Guard(settings)
        self.visitors = VisitorApi(
            settings, clients, self.guard, session_key=session_key, visitor_token=visitor_token
        )
        self.review = ReviewApi(settings, clients, self.guard)
        self._static = {
            name: resources.files("flywheel_gateway").joinpath("static", name) for name in _STATIC
        }
        self._ready: tuple[float, dict[str, bool]] = (float("-inf"), {})
        self._ready_lock = asyncio.Lock()

    def asgi(self) -> ASGIApp:
        """The Starlette application, wrapped in the security-headers and metrics middleware."""
        routes = [
            *(Route(f"/{name}", self.asset, methods=["GET"]) for name in _STATIC),
            *self.visitors.routes(),
            *self.review.routes(),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
        ]
        if self.settings.demo_pages_dir is not None:
            routes += [
                Route("/demo/", self.demo_index, methods=["GET"]),
                Route("/demo/{name}", self.demo_page, methods=["GET"]),
            ]
        known = {r.path for r in routes if "{" not in r.path}
        return SecurityHeaders(Starlette(routes=routes), known)

    async def asset(self, request: Request) -> Response:
        """The widget's and the console's files (any page may load the widget's)."""
        name = request.url.path.lstrip("/")
        headers = {"cache-control": "public, max-age=300", "cross-origin-resource-policy": "cross-origin"}
        return Response(self._static[name].read_bytes(), media_type=_STATIC[name], headers=headers)

    def _demo_pages(self) -> dict[str, Path]:
        folder = self.settings.demo_pages_dir
        assert folder is not None
        return {p.name: p for p in sorted(folder.glob("*.html"))}

    async def demo_index(self, request: Request) -> Response:
        links = "".join(f'<li><a href="{quote(n)}">{escape(n)}</a></li>' for n in self._demo_pages())
        head = '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Pages</title></head>'
        return HTMLResponse(f"{head}<body><h1>Pages with the widget</h1><ul>{links}</ul></body></html>")

    async def demo_page(self, request: Request) -> Response:
        """A page of the demo folder with the widget's script tag added, as a site owner would."""
        path = self._demo_pages().get(request.path_params["name"])
        if path is None:
            return JSONResponse({"error": "no such page"}, status_code=404)
        html = path.read_text(encoding="utf-8")
        tag = '<script src="/widget.js" defer></script>'
        html = html.replace("</body>", f"{tag}\n</body>") if "</body>" in html else html + tag
        return HTMLResponse(html)

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        """Ready when the services visitors need (inference, feedback) report SERVING; the answer
        is reused for `READY_TTL_S`, so a flood of probes is not a flood of health checks."""
        async with self._ready_lock:
            checked, ready = self._ready
            if time.monotonic() - checked >= READY_TTL_S:
                ready = {name: await self.clients.serving(name) for name in ("inference", "feedback")}
                self._ready = (time.monotonic(), ready)
        return JSONResponse(ready, status_code=200 if all(ready.values()) else 503)
