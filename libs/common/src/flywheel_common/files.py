"""Small file helpers: hashing, atomic JSON writes, and where the checkout and its caches are."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(path: Path, data: Any) -> None:
    """Writes JSON atomically (temp file + rename)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def repo_root() -> Path:
    """The checkout the workspace is installed from (uv installs its members editable)."""
    return Path(__file__).resolve().parents[4]


def cache_root() -> Path:
    """The checkout's `.cache`: prepared models, export caches, Kafka's jars (git-ignored)."""
    return repo_root() / ".cache"
