"""A training job's result file: how the job tells the trainer what it did, whatever launched it.

<artifact root>/jobs/<job_id>/result.json   status, reason, candidate version, lineage summary
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flywheel_common.files import write_json
from flywheel_common.registry import ModelRegistry, ModelVersion


def result_path(artifact_root: Path, job_id: str) -> Path:
    return Path(artifact_root) / "jobs" / job_id / "result.json"


def write_result(artifact_root: Path, job_id: str, result: dict[str, Any]) -> Path:
    """Writes (atomically) the job's result."""
    path = result_path(artifact_root, job_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, result)
    return path


def read_result(artifact_root: Path, job_id: str) -> dict[str, Any] | None:
    """The job's result; None when it wrote none (it never started, or died). A file that cannot be
    read or is not a JSON object is a failed result saying so: the job ended, and not well."""
    path = result_path(artifact_root, job_id)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # ValueError: invalid JSON, and invalid UTF-8 too
        return {"status": "failed", "reason": f"unreadable result file: {type(exc).__name__}: {exc}"[:2000]}
    if not isinstance(data, dict):
        return {"status": "failed", "reason": f"unreadable result file: a JSON {type(data).__name__}"}
    return data


def registered_candidate(registry: ModelRegistry, job_id: str) -> ModelVersion | None:
    """The candidate version a job registered (its lineage names the job), or None.

    Registration is all or nothing, so such a version is the job's complete work even when the job
    died before writing its result; the oldest one when an earlier retry registered two.
    """
    for version in registry.list_versions():
        lineage = version.manifest.get("lineage") or {}
        if version.kind == "candidate" and lineage.get("job_id") == job_id:
            return version
    return None
