"""Fixtures of the deploy checks: the tools (a test skips cleanly where one is missing), cached renders."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from flywheel_cli.local.prometheus import find_tool as local_tool

# The checks live beside the tests; --import-mode=importlib does not put this folder on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import flywheel_deploy_checks as dc


def find_tool(name: str) -> Path:
    """The tool from .cache/tools/bin (scripts/install-deploy-tools) or PATH; skips the test otherwise."""
    found = local_tool(name)
    if found is None:
        pytest.skip(f"{name} is not installed: run scripts/install-deploy-tools")
    return found


@pytest.fixture(scope="session")
def helm() -> Path:
    return find_tool("helm")


@pytest.fixture(scope="session")
def promtool() -> Path:
    return find_tool("promtool")


@pytest.fixture(scope="session")
def hadolint() -> Path:
    return find_tool("hadolint")


@pytest.fixture(scope="session")
def kubernetes_validate() -> object:
    return pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed: uv sync")


@pytest.fixture(scope="session")
def jsonschema() -> object:
    return pytest.importorskip("jsonschema", reason="jsonschema is not installed: uv sync")


@pytest.fixture(scope="session")
def renders(helm: Path) -> dict[str, dc.Render]:
    """Every ci/*-values.yaml scenario, rendered once for the session."""
    return {name: dc.render(helm, "-f", str(dc.CHART / "ci" / name)) for name in dc.SCENARIOS}
