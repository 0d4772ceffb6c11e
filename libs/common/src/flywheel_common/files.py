"""Small file helpers: hashing, atomic JSON writes, and where the checkout and its caches are."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
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


def tree_bytes(root: Path, *, unshared: bool = False) -> int:
    """Bytes of the regular files under `root` (links not followed); with `unshared`, only of those
    no other path links to, which is what deleting the tree frees. A file deleted meanwhile counts 0."""
    total = 0
    for path in root.rglob("*"):
        try:
            info = path.lstat()
        except OSError:
            continue
        if stat.S_ISREG(info.st_mode) and (info.st_nlink == 1 or not unshared):
            total += info.st_size
    return total


def write_json(path: Path, data: Any) -> None:
    """Writes JSON atomically (temp file + rename), making its folder if need be."""
    path.parent.mkdir(parents=True, exist_ok=True)
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


def freeze_tree(root: Path) -> None:
    """Marks every file under `root` read-only: the folder is final, and its files may be shared."""
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            p.chmod(0o444)


def share_tree(source: Path, target: Path) -> None:
    """Copies `source` to `target`, hard-linking the files `freeze_tree` marked read-only instead
    of copying them when both sides are on one file system (a model's weights are shared, not
    duplicated, between the prepared cache and every registry that registers it).

    ONNX external data is always copied: the onnx library refuses to read a data file that has
    more than one link (its guard against hard-link attacks)."""

    def link_or_copy(src: str, dst: str) -> object:
        if not os.stat(src).st_mode & 0o222 and not src.endswith(".onnx.data"):
            try:
                os.link(src, dst)
                return dst
            except OSError:
                pass
        return shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link_or_copy)
