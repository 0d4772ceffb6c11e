"""The gateway's parts, wired once: the gRPC clients, the HTTP application and its uvicorn server."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import uvicorn

from flywheel_common.secrets import read_secret
from flywheel_gateway.api import Gateway
from flywheel_gateway.clients import ServiceClients
from flywheel_gateway.settings import GatewaySettings

log = logging.getLogger("flywheel_gateway")

DEV_SESSION_KEY = b"flywheel-dev-gateway-session-key"
DEV_VISITOR_TOKEN = b"dev-user-token"


class GatewayApp:
    """`start` serves HTTP and returns the port; `stop` lets open requests finish, then closes the
    channels. Used by main() and by tests."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.clients = ServiceClients(settings.services)
        s = settings.session
        session_key = read_secret(s.key_file, name="gateway session key", dev_default=DEV_SESSION_KEY)
        visitor_token = read_secret(
            settings.auth.visitor_token_file, name="gateway visitor token", dev_default=DEV_VISITOR_TOKEN
        ).decode()
        self.gateway = Gateway(settings, self.clients, session_key=session_key, visitor_token=visitor_token)
        http = settings.http
        self.server = uvicorn.Server(
            uvicorn.Config(
                self.gateway.asgi(),
                host=http.host,
                port=http.port,
                proxy_headers=True,
                forwarded_allow_ips=http.forwarded_allow_ips,
                timeout_graceful_shutdown=int(http.grace_s) or None,
                lifespan="off",
                log_config=None,
                access_log=False,
                server_header=False,
            )
        )
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> int:
        """Listens (port 0 picks a free one) and returns the port."""
        self._task = asyncio.create_task(self.server.serve(), name="gateway-http")
        while not self.server.started:
            if self._task.done():
                self._task.result()  # raises why it could not start
                raise RuntimeError("the gateway's HTTP server stopped while starting")
            await asyncio.sleep(0.05)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        log.info("gateway ready on http://%s:%d", self.settings.http.host, self.port)
        return self.port

    @property
    def url(self) -> str:
        return f"http://{self.settings.http.host}:{self.port}"

    async def stop(self, grace: float | None = None) -> None:
        """Stops accepting, lets open requests finish within the grace (the settings' by default),
        closes the gRPC channels."""
        if grace is not None:
            self.server.config.timeout_graceful_shutdown = int(grace) or None
        self.server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.clients.close()
