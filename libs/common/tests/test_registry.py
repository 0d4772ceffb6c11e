"""The model registry: immutable versions, atomic rollout state, decisions."""

import json
import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from flywheel_common.errors import FailedPrecondition, InvalidArgument, NotFound
from flywheel_common.registry import ModelRegistry, RolloutState


def model_folder(tmp_path: Path, name: str = "m") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"onnx-bytes")
    (folder / "tokenizer.json").write_text("{}")
    return folder


def test_register_makes_numbered_read_only_versions_with_hashes(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "root")
    v1 = registry.register(model_folder(tmp_path), kind="base", metadata={"note": "x"})
    v2 = registry.register(model_folder(tmp_path, "n"), kind="candidate", hf_dir=model_folder(tmp_path, "hf"))
    assert (v1.version, v2.version) == ("v1", "v2")
    assert v1.kind == "base" and v1.manifest["note"] == "x"
    assert set(v1.manifest["files"]) == {"model/model.onnx", "model/tokenizer.json"}
    assert (v2.hf_dir / "model.onnx").is_file()
    mode = (v1.model_dir / "model.onnx").stat().st_mode
    assert not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    assert [v.version for v in registry.list_versions()] == ["v1", "v2"]
    registry.verify("v1")


def test_frozen_source_files_are_shared_and_writable_ones_copied(tmp_path: Path) -> None:
    source = model_folder(tmp_path)
    (source / "model.onnx.data").write_bytes(b"weights")
    for name in ("model.onnx", "model.onnx.data"):  # as a prepared model's files are (freeze_tree)
        (source / name).chmod(0o444)
    version = ModelRegistry(tmp_path / "root").register(source, kind="base")
    shared, copied = version.model_dir / "model.onnx", version.model_dir / "tokenizer.json"
    assert shared.stat().st_ino == (source / "model.onnx").stat().st_ino
    assert copied.stat().st_ino != (source / "tokenizer.json").stat().st_ino
    # onnx.load refuses external data with more than one link: it is copied.
    assert (version.model_dir / "model.onnx.data").stat().st_nlink == 1
    # The copy is frozen; the writable source stays writable.
    assert not copied.stat().st_mode & 0o222 and (source / "tokenizer.json").stat().st_mode & 0o200


def test_verify_detects_a_changed_an_added_and_a_missing_file(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "root")
    version = registry.register(model_folder(tmp_path), kind="base")
    model = version.model_dir
    assert registry.verify(version.version, "model").version == version.version
    os.chmod(model, 0o755)
    (model / "extra.onnx.data").write_bytes(b"weights from elsewhere")
    with pytest.raises(FailedPrecondition, match=r"model/extra\.onnx\.data is not in its manifest"):
        registry.verify(version.version, "model")
    (model / "extra.onnx.data").unlink()
    os.chmod(model / "model.onnx", 0o644)
    (model / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(FailedPrecondition, match=r"model/model\.onnx does not match"):
        registry.verify(version.version, "model")
    (model / "tokenizer.json").unlink()
    with pytest.raises(FailedPrecondition, match=r"model/tokenizer\.json is missing"):
        registry.verify(version.version)


def test_a_failed_registration_leaves_nothing(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "root")
    with pytest.raises(InvalidArgument):
        registry.register(tmp_path, kind="base")  # no model.onnx
    assert registry.list_versions() == []
    assert not list(registry.versions_dir.iterdir())


def test_rollout_state_moves_atomically_and_keeps_history(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "root")
    v1 = registry.register(model_folder(tmp_path), kind="base").version
    v2 = registry.register(model_folder(tmp_path, "n"), kind="candidate").version
    assert registry.state().production is None
    registry.set_production(v1)
    state = registry.set_canary(v2, 0.1, reason="gate passed")
    assert (state.production, state.canary, state.canary_fraction) == (v1, v2, 0.1)
    state = registry.set_production(v2)
    assert (state.production, state.canary, state.canary_fraction) == (v2, None, 0.0)
    assert [h["generation"] for h in state.history] == [1, 2, 3]
    assert json.loads(registry.state_path.read_text())["production"] == v2
    with pytest.raises(NotFound):
        registry.set_production("v9")
    with pytest.raises(InvalidArgument):
        registry.set_canary(v1, 1.5)
    with pytest.raises(InvalidArgument):
        registry.get("../etc")


def test_concurrent_registrations_get_distinct_versions(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "root")
    folders = [model_folder(tmp_path, f"m{i}") for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        versions = list(pool.map(lambda f: registry.register(f, kind="candidate").version, folders))
    assert sorted(versions, key=lambda v: int(v[1:])) == [f"v{i}" for i in range(1, 7)]


def test_reports_and_decisions(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "root")
    version = registry.register(model_folder(tmp_path), kind="base").version
    path = registry.write_report(version, "report.json", '{"accuracy": 0.5}')
    assert json.loads(path.read_text()) == {"accuracy": 0.5}
    registry.append_decision({"version": version, "passed": True})
    registry.append_decision({"version": version, "passed": False})
    assert [d["passed"] for d in registry.decisions()] == [True, False]


def test_marks_are_notes_beside_an_immutable_version(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "artifacts")
    version = registry.register(model_folder(tmp_path), kind="base")
    assert registry.marks(version.version) == []
    registry.mark(version.version, {"kind": "forgotten_data", "datasets": ["ds-1"]})
    registry.mark(version.version, {"kind": "forgotten_data", "datasets": ["ds-2"]})
    assert [m["datasets"] for m in registry.marks(version.version)] == [["ds-1"], ["ds-2"]]
    registry.verify(version.version)  # the version itself is unchanged
    with pytest.raises(NotFound):
        registry.mark("v99", {"kind": "x"})


def test_prune_removes_the_weights_nothing_needs_and_keeps_the_record(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "root")
    registry.register(model_folder(tmp_path, "base"), kind="base")  # v1
    for i in range(2, 8):
        if i == 5:  # its files frozen in a prepared cache: hard-linked, so removing them frees nothing
            frozen = model_folder(tmp_path, "frozen")
            for f in frozen.iterdir():
                f.chmod(0o444)
            registry.register(frozen, kind="candidate")
        else:
            registry.register(
                model_folder(tmp_path, f"m{i}"), kind="candidate", hf_dir=model_folder(tmp_path, f"h{i}")
            )
    for version in ("v2", "v3", "v4", "v5", "v6"):  # v7 is not gated yet
        registry.append_decision({"version": version, "action": "gate"})
    registry.write_report("v2", "gate.md", "rejected")
    registry.set_production("v3")
    registry.set_production("v4")  # v3 is what a rollback restores
    registry.set_canary("v6", 0.25)
    (registry.versions_dir / ".pruning-stale").mkdir()  # a prune that stopped midway

    planned = registry.prune(1, dry_run=True)
    assert [(p.version, p.freed_bytes) for p in planned] == [("v2", 24), ("v5", 0)]
    assert not registry.get("v2").pruned

    assert registry.prune(1) == planned
    assert [v.version for v in registry.list_versions() if v.pruned] == ["v2", "v5"]
    assert not (registry.versions_dir / "v2" / "hf").exists()
    assert (tmp_path / "frozen" / "model.onnx").read_bytes() == b"onnx-bytes"  # the shared copy stays
    assert registry.get("v2").manifest["kind"] == "candidate"
    assert (registry.reports_dir / "v2" / "gate.md").is_file()
    assert registry.marks("v2")[-1]["kind"] == "pruned"
    assert not list(registry.versions_dir.glob(".pruning-*"))
    with pytest.raises(FailedPrecondition, match="removed by retention"):
        registry.verify("v2")
    with pytest.raises(FailedPrecondition, match="cannot serve"):
        registry.set_production("v2")
    assert registry.state().production == "v4"
    assert registry.prune(1) == []
    # Without the newest kept, only what serves, rolls back, the base and the ungated stay.
    assert [p.version for p in registry.prune(0)] == []
    registry.set_canary(None)
    assert [p.version for p in registry.prune(0)] == ["v6"]
    with pytest.raises(InvalidArgument):
        registry.prune(-1)


def test_a_rollback_keeps_no_previous_production_and_an_outbox_write_no_generation(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "root")
    for name in ("a", "b"):
        registry.register(model_folder(tmp_path, name), kind="candidate")
    registry.set_production("v1")
    assert registry.set_production("v2").previous_production == "v1"

    def back(state: RolloutState) -> str:
        state.production = "v1"
        return "production -> v1 (rolled back)"

    # Kept as the previous production, v2 would be what the next rollback without a version restores.
    state = registry.update_state(back, rollback=True)
    assert (state.production, state.previous_production) == ("v1", None)

    def queue(state: RolloutState) -> str:
        state.outbox.append({"decision_id": "d1"})
        return ""

    # Nothing replicas follow moved: they have nothing to reload.
    queued = registry.update_state(queue)
    assert queued.generation == state.generation and queued.history == state.history
    assert registry.state().outbox == [{"decision_id": "d1"}]


def test_prune_removes_staging_a_killed_registration_left_once_it_is_a_day_old(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "root")
    old, fresh = registry.versions_dir / ".staging-old", registry.versions_dir / ".staging-fresh"
    for staging in (old, fresh):
        (staging / "hf").mkdir(parents=True)
        (staging / "hf" / "w.bin").write_bytes(b"\0" * 1024)
        (staging / "hf" / "w.bin").chmod(0o444)  # as freeze_tree leaves it
    day_ago = time.time() - 24 * 3600 - 60
    os.utime(old, (day_ago, day_ago))
    registry.prune(0, dry_run=True)  # a dry run removes nothing
    assert old.is_dir() and fresh.is_dir()
    # A live registration holds no lock while it copies: a fresh folder may be one, and stays.
    registry.prune(0)
    assert not old.exists() and fresh.is_dir()
    registry.prune(0, staging_max_age_s=0)
    assert not fresh.exists()


def test_list_versions_leaves_out_a_version_whose_manifest_cannot_be_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry = ModelRegistry(tmp_path / "root")
    for name in ("a", "b", "c", "d", "e"):
        registry.register(model_folder(tmp_path, name), kind="candidate")
    broken = {"v2": b"", "v3": b'{"version": "v3", "secret-ish', "v4": b"\xff\xfe", "v5": b"[1, 2]"}
    for version, content in broken.items():
        manifest = registry.versions_dir / version / "manifest.json"
        manifest.chmod(0o644)
        manifest.write_bytes(content)  # what a power loss before writeback can leave, and worse
    assert [v.version for v in registry.list_versions()] == ["v1"]
    assert "left out" in caplog.text and "secret-ish" not in caplog.text
    for version in broken:
        registry.append_decision({"version": version, "action": "gate"})
    registry.append_decision({"version": "v1", "action": "gate"})
    assert [p.version for p in registry.prune(0)] == ["v1"]  # prune still runs over the rest
    assert registry.register(model_folder(tmp_path, "f"), kind="candidate").version == "v6"


def test_register_flushes_the_version_to_disk_before_and_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = ModelRegistry(tmp_path / "root")
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src: str | Path, dst: str | Path) -> None:
        events.append(("rename", str(dst)))
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    registry.register(model_folder(tmp_path), kind="base", hf_dir=model_folder(tmp_path, "hf"))
    renamed = events.index(("rename", str(registry.versions_dir / "v1")))
    before = {Path(path).name for kind, path in events[:renamed] if kind == "fsync"}
    # The manifest, every file and every folder of the staged version (its names are temporary).
    assert {"model.onnx", "tokenizer.json", "model", "hf"} <= before
    assert any(name.startswith(".manifest.json.") or name == "manifest.json" for name in before)
    assert any(name.startswith(".staging-") for name in before)
    assert ("fsync", str(registry.versions_dir)) in events[renamed + 1 :]
    assert json.loads((registry.versions_dir / "v1" / "manifest.json").read_text())["version"] == "v1"
