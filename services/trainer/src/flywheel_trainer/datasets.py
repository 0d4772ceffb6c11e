"""Immutable training datasets in the artifact store: JSONL files plus a manifest with counts and hashes.

Layout under the artifact root:
    datasets/<dataset_id>/examples.jsonl    training examples (corrections, positives), batch order
    datasets/<dataset_id>/negatives.jsonl   low-rated answers: reporting and preference data, never targets
    datasets/<dataset_id>/manifest.json     id, reason, example ids, counts by source, file hashes, sha256

A dataset is never changed: forgetting a session writes a new version without its examples (its
manifest names the ids it `replaces`) and deletes the old one.
"""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flywheel_common.errors import FailedPrecondition, InvalidArgument, NotFound
from flywheel_trainer.policy import Source

FORMAT = "flywheel-training-v1"
# A staging folder this old is what a killed write left, not a write in progress: a write stages three
# files and renames them within seconds. Only the trainer writes datasets, one write at a time.
STAGING_MAX_AGE_S = 600.0
FILES = ("examples.jsonl", "negatives.jsonl")
# Fields a training example carries into the dataset (no pseudonyms: the store never had them).
EXAMPLE_FIELDS = (
    "id", "source", "query_id", "page_title", "passages", "question", "answer",
    "model_answer", "model_version",
)  # fmt: skip


@dataclass(frozen=True)
class Dataset:
    """A dataset read back from the artifact store, hashes verified."""

    dataset_id: str
    path: Path
    manifest: dict[str, Any]
    examples: list[dict[str, Any]]
    negatives: list[dict[str, Any]]

    @property
    def sha256(self) -> str:
        return str(self.manifest["sha256"])


def datasets_dir(artifact_root: Path) -> Path:
    return Path(artifact_root) / "datasets"


def _jsonl(records: Iterable[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in records).encode()


def content_hash(file_digests: dict[str, str]) -> str:
    """The dataset's hash: SHA-256 over its files' names and digests."""
    text = "".join(f"{name}:{file_digests[name]}\n" for name in sorted(file_digests))
    return hashlib.sha256(text.encode()).hexdigest()


def build(
    dataset_id: str, rows: list[dict[str, Any]], *, created_at: float, reason: str
) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The files and manifest of a dataset made of store rows (deterministic: same rows, same bytes)."""
    examples = [
        {k: r.get(k, "") for k in EXAMPLE_FIELDS} for r in rows if r["source"] != Source.NEGATIVE.value
    ]
    corrected = {e["query_id"]: e["answer"] for e in examples if e["source"] == Source.CORRECTION.value}
    negatives = [
        {
            "id": r["id"],
            "query_id": r["query_id"],
            "page_title": r["page_title"],
            "passages": r["passages"],
            "question": r["question"],
            # The answer users rated low; `chosen` is the expert's correction when this batch has one.
            "rejected": r["model_answer"],
            "chosen": corrected.get(r["query_id"], ""),
            "rating": r.get("rating", 0),
            "model_version": r["model_version"],
        }
        for r in rows
        if r["source"] == Source.NEGATIVE.value
    ]
    files = {"examples.jsonl": _jsonl(examples), "negatives.jsonl": _jsonl(negatives)}
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    counts = collections.Counter(r["source"] for r in rows)
    manifest = {
        "dataset_id": dataset_id,
        "format": FORMAT,
        "created_at": dt.datetime.fromtimestamp(created_at, dt.UTC).isoformat(timespec="seconds"),
        "reason": reason,
        "examples": len(examples),
        "negatives": len(negatives),
        "counts": {s.value: counts.get(s.value, 0) for s in Source},
        "example_ids": [e["id"] for e in examples],
        "negative_ids": [n["id"] for n in negatives],
        "files": digests,
        "sha256": content_hash(digests),
    }
    return files, manifest


def write(artifact_root: Path, dataset_id: str, files: dict[str, bytes], manifest: dict[str, Any]) -> Path:
    """Writes a dataset folder all or nothing (staged, fsynced, read-only, renamed into place).

    A folder already there (a crash after the rename) is accepted only with the same hash.
    """
    root = datasets_dir(artifact_root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / dataset_id
    if final.exists():
        existing = json.loads((final / "manifest.json").read_text())
        if existing.get("sha256") != manifest["sha256"]:
            raise FailedPrecondition(f"dataset {dataset_id} exists with other content")
        return final
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".staging-{dataset_id}-"))
    try:
        all_files = {**files, "manifest.json": json.dumps(manifest, indent=2, sort_keys=True).encode()}
        for name, data in all_files.items():
            path = staging / name
            with path.open("wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            path.chmod(0o444)
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def without(
    dataset: Dataset, drop: Callable[[dict[str, Any]], bool]
) -> tuple[str, dict[str, bytes], dict[str, Any]] | None:
    """A new version of `dataset` without the records `drop` selects (None when it drops none): its id
    (the old one's time stamp, so it sorts in the same place; a new digest), files and manifest."""
    examples = [e for e in dataset.examples if not drop(e)]
    negatives = [n for n in dataset.negatives if not drop(n)]
    if len(examples) == len(dataset.examples) and len(negatives) == len(dataset.negatives):
        return None
    # A negative's `chosen` is the batch's correction of that answer (`build`): once the correction
    # is dropped (its reviewer forgotten), its text must not stay behind in the negative.
    corrected = {e["query_id"]: e["answer"] for e in examples if e["source"] == Source.CORRECTION.value}
    negatives = [
        n if not n.get("chosen") or n["query_id"] in corrected else {**n, "chosen": ""} for n in negatives
    ]
    stamp = dataset.dataset_id.rpartition("-")[0] or dataset.dataset_id
    kept = "\n".join([dataset.dataset_id, *(e["id"] for e in [*examples, *negatives])])
    new_id = f"{stamp}-{hashlib.sha256(kept.encode()).hexdigest()[:8]}"
    files = {"examples.jsonl": _jsonl(examples), "negatives.jsonl": _jsonl(negatives)}
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    old = dataset.manifest
    counts = collections.Counter(e["source"] for e in examples)
    manifest = {
        **old,
        "dataset_id": new_id,
        "examples": len(examples),
        "negatives": len(negatives),
        "counts": {s.value: counts.get(s.value, 0) for s in Source} | {Source.NEGATIVE.value: len(negatives)},
        "example_ids": [e["id"] for e in examples],
        "negative_ids": [n["id"] for n in negatives],
        "files": digests,
        "sha256": content_hash(digests),
        # Lineage: a version trained on any of these was trained on this dataset's data.
        "replaces": [dataset.dataset_id, *old.get("replaces", [])],
    }
    return new_id, files, manifest


def sweep_staging(
    artifact_root: Path, *, max_age_s: float = STAGING_MAX_AGE_S
) -> tuple[list[str], list[str]]:
    """Removes the `.staging-*` folders last changed more than `max_age_s` ago: a write killed before
    its rename (OOM, node loss) leaves one, full of examples that no scan or forget searches.

    Returns the names removed and those left as too young (possibly a write still in progress).
    """
    root = datasets_dir(artifact_root)
    if not root.is_dir():
        return [], []
    cutoff = time.time() - max_age_s
    removed: list[str] = []
    young: list[str] = []
    for staging in sorted(root.glob(".staging-*")):
        try:
            if staging.stat().st_mtime >= cutoff:
                young.append(staging.name)
                continue
        except OSError:
            continue  # renamed into place meanwhile
        # Its files are read-only; the folder's own permission is what lets them go.
        shutil.rmtree(staging, ignore_errors=True)
        removed.append(staging.name)
    return removed, young


def delete(artifact_root: Path, dataset_id: str) -> None:
    """Removes a dataset folder (its files are read-only: the folder's permission is what counts)."""
    path = datasets_dir(artifact_root) / dataset_id
    if path.is_dir():
        shutil.rmtree(path)


def all_datasets(artifact_root: Path) -> list[Dataset]:
    """Every readable dataset, oldest first."""
    return scan(artifact_root)[0]


def scan(artifact_root: Path) -> tuple[list[Dataset], list[str]]:
    """Every readable dataset, oldest first, and the folder names of those that fail to read or to
    match their manifest (forgetting must say what it could not check)."""
    root = datasets_dir(artifact_root)
    if not root.is_dir():
        return [], []
    found, damaged = [], []
    for path in sorted(root.iterdir()):
        if path.name.startswith(".") or not (path / "manifest.json").is_file():
            continue
        try:
            found.append(load(artifact_root, path.name))
        except (FailedPrecondition, InvalidArgument, ValueError, KeyError, OSError):
            damaged.append(path.name)
    return found, damaged


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def resolve(artifact_root: Path, dataset: str) -> Path:
    """A dataset folder from its id (under the artifact root) or a path."""
    if "/" not in dataset and not dataset.startswith("."):
        path = datasets_dir(artifact_root) / dataset
    else:
        path = Path(dataset)
    if not (path / "manifest.json").is_file():
        raise NotFound(f"no dataset {dataset} (looked in {path})")
    return path


def load(artifact_root: Path, dataset: str) -> Dataset:
    """Reads a dataset and checks every file against its manifest."""
    path = resolve(artifact_root, dataset)
    manifest = json.loads((path / "manifest.json").read_text())
    if manifest.get("format") != FORMAT:
        raise InvalidArgument(f"dataset {path} has format {manifest.get('format')!r}, not {FORMAT}")
    digests = {}
    for name in FILES:
        digests[name] = hashlib.sha256((path / name).read_bytes()).hexdigest()
        if digests[name] != manifest["files"].get(name):
            raise FailedPrecondition(f"dataset {path}: {name} does not match its manifest")
    if content_hash(digests) != manifest["sha256"]:
        raise FailedPrecondition(f"dataset {path}: hash does not match its manifest")
    return Dataset(
        dataset_id=str(manifest["dataset_id"]),
        path=path,
        manifest=manifest,
        examples=_read_jsonl(path / "examples.jsonl"),
        negatives=_read_jsonl(path / "negatives.jsonl"),
    )


def earlier(artifact_root: Path, dataset_id: str) -> list[Dataset]:
    """Datasets created before `dataset_id` (ids sort by time), oldest first; unreadable ones skipped."""
    return [d for d in all_datasets(artifact_root) if d.dataset_id < dataset_id]
