"""Fixtures shared by every test tier: the prepared base model (made once, cached under .cache/)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def prepared_model() -> Path:
    """The prepared SmolLM2 folder (`hf/`, `onnx/`, manifest), prepared on first use."""
    from flywheel_model.prepare import ExportOptions, ensure_prepared

    return ensure_prepared(None, ExportOptions(), None, force=False)


@pytest.fixture(scope="session")
def onnx_model_dir(prepared_model: Path) -> Path:
    return prepared_model / "onnx"
