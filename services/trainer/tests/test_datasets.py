"""Datasets: deterministic, immutable, hash-checked; earlier ones found for replay."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from flywheel_common.errors import FailedPrecondition, NotFound
from flywheel_trainer import datasets


def rows(n: int, *, negative: bool = True) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        {
            "id": f"c-{i}",
            "source": "correction",
            "query_id": f"q{i}",
            "page_title": "P",
            "passages": ["text"],
            "question": f"question {i}?",
            "answer": f"answer {i}.",
            "model_answer": "wrong",
            "model_version": "v1",
            "feedback_id": "f",
        }
        for i in range(n)
    ]
    if negative:
        out.append({**out[0], "id": "n-q0", "source": "negative", "rating": 1})
    return out


def test_build_is_deterministic_and_counts_by_source() -> None:
    a = datasets.build("ds-1", rows(3), created_at=0, reason="size")
    b = datasets.build("ds-1", rows(3), created_at=0, reason="size")
    assert a == b
    files, manifest = a
    assert manifest["counts"] == {"correction": 3, "positive": 0, "negative": 1}
    assert manifest["example_ids"] == ["c-0", "c-1", "c-2"]
    assert manifest["negative_ids"] == ["n-q0"]
    negative = json.loads(files["negatives.jsonl"])
    assert (negative["rejected"], negative["chosen"]) == ("wrong", "answer 0.")
    assert "feedback_id" not in json.loads(files["examples.jsonl"].splitlines()[0])


def test_written_dataset_is_read_only_and_loads(tmp_path: Path) -> None:
    files, manifest = datasets.build("ds-20240101-000000-aaaa", rows(2), created_at=0, reason="size")
    path = datasets.write(tmp_path, "ds-20240101-000000-aaaa", files, manifest)
    assert all((p.stat().st_mode & 0o222) == 0 for p in path.iterdir())
    loaded = datasets.load(tmp_path, "ds-20240101-000000-aaaa")
    assert loaded.sha256 == manifest["sha256"]
    assert [e["id"] for e in loaded.examples] == ["c-0", "c-1"]
    # Writing it again (a crash after the rename) is accepted only with the same content.
    assert datasets.write(tmp_path, "ds-20240101-000000-aaaa", files, manifest) == path
    other_files, other = datasets.build("ds-20240101-000000-aaaa", rows(1), created_at=0, reason="size")
    with pytest.raises(FailedPrecondition):
        datasets.write(tmp_path, "ds-20240101-000000-aaaa", other_files, other)


def test_tampering_is_detected(tmp_path: Path) -> None:
    files, manifest = datasets.build("ds-x", rows(2), created_at=0, reason="size")
    path = datasets.write(tmp_path, "ds-x", files, manifest)
    target = path / "examples.jsonl"
    target.chmod(0o644)
    target.write_text(target.read_text().replace("answer 1.", "answer 2."))
    with pytest.raises(FailedPrecondition):
        datasets.load(tmp_path, "ds-x")
    with pytest.raises(NotFound):
        datasets.load(tmp_path, "ds-missing")


def test_earlier_lists_older_datasets_only(tmp_path: Path) -> None:
    for name in ("ds-20240101-000000-a", "ds-20240102-000000-b", "ds-20240103-000000-c"):
        files, manifest = datasets.build(name, rows(1, negative=False), created_at=0, reason="size")
        datasets.write(tmp_path, name, files, manifest)
    names = [d.dataset_id for d in datasets.earlier(tmp_path, "ds-20240103-000000-c")]
    assert names == ["ds-20240101-000000-a", "ds-20240102-000000-b"]
    assert datasets.earlier(tmp_path / "nowhere", "ds-1") == []
