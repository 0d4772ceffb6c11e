"""The router's checks before it loads a registered version, without a model."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from flywheel_common.errors import FailedPrecondition
from flywheel_common.registry import ModelRegistry
from flywheel_inference.router import RECHECK_REFUSED_S, ModelRouter
from flywheel_model.engine import EngineSettings
from flywheel_model.runtime import OrtSettings


async def test_a_version_whose_files_changed_is_refused_and_not_hashed_on_every_poll(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.onnx").write_bytes(b"onnx-bytes")
    registry = ModelRegistry(tmp_path / "artifacts")
    version = registry.register(model, kind="base")
    registry.set_production(version.version)
    os.chmod(version.model_dir, 0o755)
    (version.model_dir / "model.onnx.data").write_bytes(b"weights the manifest does not list")
    checks: list[str] = []
    verify = registry.verify

    def counted(name: str, part: str = "") -> object:
        checks.append(name)
        return verify(name, part)

    monkeypatch.setattr(registry, "verify", counted)
    router = ModelRouter(registry, OrtSettings(), EngineSettings(), canary_key=b"c" * 16)
    for _ in range(3):  # the watch loop's polls
        with pytest.raises(FailedPrecondition, match=r"model\.onnx\.data is not in its manifest"):
            await router.refresh()
    assert checks == ["v1"] and not router.ready
    # A minute later it is checked again (the operator may have restored the files).
    refused_at, reason = router._refused["v1"]
    router._refused["v1"] = (refused_at - RECHECK_REFUSED_S, reason)
    with pytest.raises(FailedPrecondition):
        await router.refresh()
    assert checks == ["v1", "v1"]


async def test_closing_waits_for_the_engines_all_together_within_its_bound() -> None:
    # Each engine was given 30 s, one after another: production and a canary could hold shutdown
    # past the pod's grace period, and the interactions still to flush were killed with it.
    given: list[float] = []

    class BusyEngine:
        def close(self, timeout: float | None = None) -> None:
            given.append(timeout or 0.0)
            time.sleep(timeout or 0.0)

    router = ModelRouter(
        None, OrtSettings(), EngineSettings(), canary_key=b"c" * 16, local_model_dir=Path("x")
    )
    router._engines = {v: SimpleNamespace(engine=BusyEngine()) for v in ("v1", "v2")}
    started = time.monotonic()
    await router.close(timeout_s=0.4)
    assert time.monotonic() - started < 0.8 and given[0] <= 0.4 and given[1] < 0.05
    assert not router._engines
