"""Model versions in service: follows the registry's rollout state and hot-swaps engines.

A new version is loaded beside the old one and swapped in atomically; the old engine finishes the
requests it holds before it is closed, so a swap drops nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from flywheel_common.errors import FailedPrecondition, Unavailable
from flywheel_common.registry import ModelRegistry, RolloutState
from flywheel_inference.metrics import MODEL_INFO, record_drafts
from flywheel_model.engine import AnswerEngine, EngineSettings
from flywheel_model.runtime import OrtSettings

log = logging.getLogger(__name__)

LOCAL_VERSION = "local"
# A version whose files did not match its manifest is checked again (hashing its weights) at most
# this often, not on every poll.
RECHECK_REFUSED_S = 60.0
# Shutdown's time for the engines to finish, all together: the gRPC grace (20 s), this and the
# interaction sink's close (15 s) fit the pod's 45 s terminationGracePeriodSeconds.
ENGINES_CLOSE_S = 5.0


@dataclass(frozen=True)
class Loaded:
    """An engine and the version it serves."""

    version: str
    engine: AnswerEngine


def in_canary(key: bytes, session_id: str, fraction: float) -> bool:
    """Stable assignment of a session to the canary: the same session always lands on one side.

    The hash is keyed with a server secret, so a client cannot pick a session id that lands on the
    arm it wants to steer; it can only learn its arm by asking.
    """
    if not session_id or fraction <= 0:
        return False
    digest = hmac.new(key, f"canary:{session_id}".encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


class ModelRouter:
    """Holds the production and canary engines and routes each request to one of them."""

    def __init__(
        self,
        registry: ModelRegistry | None,
        ort_settings: OrtSettings,
        engine_settings: EngineSettings,
        *,
        canary_key: bytes,
        local_model_dir: Path | None = None,
    ) -> None:
        self._registry = registry
        self._canary_key = canary_key
        self._ort = ort_settings
        self._engine_settings = engine_settings
        self._local_model_dir = local_model_dir
        self._engines: dict[str, Loaded] = {}
        self._production: Loaded | None = None
        self._canary: Loaded | None = None
        self._fraction = 0.0
        self._generation = -1
        self._lock = asyncio.Lock()
        # Versions refused for files that do not match their manifest: when, and why.
        self._refused: dict[str, tuple[float, FailedPrecondition]] = {}

    @property
    def ready(self) -> bool:
        return self._production is not None

    @property
    def production_version(self) -> str | None:
        return self._production.version if self._production else None

    @property
    def canary_version(self) -> str | None:
        return self._canary.version if self._canary else None

    def route(self, session_id: str) -> Loaded:
        """The engine that serves this session."""
        production, canary = self._production, self._canary
        if production is None:
            raise Unavailable("no model is loaded yet")
        if canary is not None and in_canary(self._canary_key, session_id, self._fraction):
            return canary
        return production

    def in_flight(self) -> int:
        return sum(loaded.engine.generator.load for loaded in self._engines.values())

    async def _load(self, version: str, model_dir: Path) -> Loaded:
        existing = self._engines.get(version)
        if existing is not None:
            return existing
        log.info("loading model version %s from %s", version, model_dir)
        engine = await asyncio.to_thread(
            AnswerEngine, model_dir, self._ort, self._engine_settings, partial(record_drafts, version)
        )
        loaded = Loaded(version, engine)
        self._engines[version] = loaded
        return loaded

    async def _load_registered(self, name: str) -> Loaded:
        """A registered version's engine, loaded once its model files are exactly those registered."""
        if name in self._engines:
            return self._engines[name]
        assert self._registry is not None
        refused = self._refused.get(name)
        if refused is not None and time.monotonic() - refused[0] < RECHECK_REFUSED_S:
            raise refused[1]
        try:
            version = await asyncio.to_thread(self._registry.verify, name, "model")
        except FailedPrecondition as exc:
            self._refused[name] = (time.monotonic(), exc)
            raise
        self._refused.pop(name, None)
        return await self._load(version.version, version.model_dir)

    async def refresh(self) -> bool:
        """Converges on the registry's rollout state; returns True when something changed."""
        async with self._lock:
            if self._local_model_dir is not None:
                if self._production is None:
                    self._production = await self._load(LOCAL_VERSION, self._local_model_dir)
                    self._publish()
                    return True
                return False
            assert self._registry is not None
            state: RolloutState = await asyncio.to_thread(self._registry.state)
            if state.generation == self._generation:
                return False
            production = canary = None
            if state.production:
                production = await self._load_registered(state.production)
            if state.canary and state.canary_fraction > 0:
                canary = await self._load_registered(state.canary)
            self._production, self._canary = production, canary
            self._fraction = state.canary_fraction if canary else 0.0
            self._generation = state.generation
            await self._retire()
            self._publish()
            log.info(
                "serving production=%s canary=%s (%.0f%%)",
                self.production_version,
                self.canary_version,
                self._fraction * 100,
            )
            return True

    async def _retire(self) -> None:
        keep = {loaded.version for loaded in (self._production, self._canary) if loaded}
        for version in [v for v in self._engines if v not in keep]:
            retired = self._engines.pop(version)
            # Requests already on the old engine run to completion before it closes.
            asyncio.get_running_loop().run_in_executor(None, retired.engine.close)
            log.info("retiring model version %s", version)

    def _publish(self) -> None:
        MODEL_INFO.clear()
        for role, loaded in (("production", self._production), ("canary", self._canary)):
            if loaded is not None:
                MODEL_INFO.labels(loaded.version, role, loaded.engine.provider).set(1)

    async def watch(self, interval_s: float) -> None:
        """Polls the registry until cancelled; a failed load is logged and retried."""
        while True:
            try:
                await self.refresh()
            except Exception:
                log.exception("could not apply the registry's rollout state")
            await asyncio.sleep(interval_s)

    async def close(self, timeout_s: float = ENGINES_CLOSE_S) -> None:
        """Lets every engine finish what it holds, all within `timeout_s`: after the gRPC grace the
        calls are cancelled, so this is normally quick, and shutdown must fit the pod's grace period
        (an engine still busy then is left to the process's exit)."""
        deadline = time.monotonic() + timeout_s
        for loaded in list(self._engines.values()):
            with contextlib.suppress(Exception):
                await asyncio.to_thread(loaded.engine.close, max(0.0, deadline - time.monotonic()))
        self._engines.clear()
