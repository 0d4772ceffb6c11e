"""A training job's result file: how the job tells the trainer what it did, whatever launched it.

<artifact root>/jobs/<job_id>/result.json   status, reason, candidate version, lineage summary
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flywheel_common.files import write_json


def result_path(artifact_root: Path, job_id: str) -> Path:
    return Path(artifact_root) / "jobs" / job_id / "result.json"


def write_result(artifact_root: Path, job_id: str, result: dict[str, Any]) -> Path:
    """Writes (atomically) the job's result."""
    path = result_path(artifact_root, job_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, result)
    return path


def read_result(artifact_root: Path, job_id: str) -> dict[str, Any] | None:
    """The job's result, or None when it wrote none (it never started, or died)."""
    path = result_path(artifact_root, job_id)
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None
