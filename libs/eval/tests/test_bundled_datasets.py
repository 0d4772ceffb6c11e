"""Runs the dataset checker over every dataset bundled in the repository's datasets/ folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from flywheel_eval.check import check_dataset, main
from flywheel_eval.dataset import SPLITS, load_dataset


def _repo_root() -> Path:
    # Walk up rather than count parents, so the test survives being moved within the repository.
    for folder in Path(__file__).resolve().parents:
        if (folder / "datasets").is_dir() and (folder / "pyproject.toml").is_file():
            return folder
    raise RuntimeError("repository root with a datasets/ folder not found")


DATASETS = _repo_root() / "datasets"
PYTHON_FAQ = DATASETS / "python-faq"
POSTGRESQL_DOCS = DATASETS / "postgresql-docs"
BASH_MANUAL = DATASETS / "bash-manual"
# python-faq predates the answer-sentence rule: four of its sentences each answer questions in two splits.
PYTHON_FAQ_SHARED_SENTENCES = 4


def test_python_faq_passes_the_checker(capsys: pytest.CaptureFixture[str]) -> None:
    report = check_dataset(PYTHON_FAQ)
    assert report.ok, "\n".join(str(error) for error in report.errors)
    assert report.warnings == report.shared_sentences, "\n".join(str(warning) for warning in report.warnings)
    assert len(report.shared_sentences) == PYTHON_FAQ_SHARED_SENTENCES
    assert main([str(PYTHON_FAQ)]) == 0
    assert "OK: " in capsys.readouterr().out


@pytest.mark.parametrize("folder", [POSTGRESQL_DOCS, BASH_MANUAL], ids=lambda folder: folder.name)
def test_newer_datasets_pass_the_strict_checker(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = check_dataset(folder, strict_sentences=True)
    assert report.ok, "\n".join(str(error) for error in report.errors)
    assert not report.warnings, "\n".join(str(warning) for warning in report.warnings)
    assert main(["--strict-sentences", str(folder)]) == 0
    assert "OK: " in capsys.readouterr().out


@pytest.mark.parametrize("folder", [PYTHON_FAQ, POSTGRESQL_DOCS, BASH_MANUAL], ids=lambda folder: folder.name)
def test_dataset_shape(folder: Path) -> None:
    dataset = load_dataset(folder)
    assert len(dataset.pages) >= 6
    assert len(dataset.items) >= 160
    shares = {split: len(dataset.split(split)) / len(dataset.items) for split in SPLITS}
    assert 0.45 <= shares["traffic"] <= 0.55
    assert 0.20 <= shares["exam"] <= 0.30
    assert 0.20 <= shares["gate"] <= 0.30
    # Every page is represented in every split.
    for split in SPLITS:
        assert {item.page for item in dataset.split(split)} == set(dataset.pages), split
    unanswerable = [item for item in dataset.items if not item.answerable]
    assert 4 <= len(unanswerable) <= 8
    assert {item.split for item in unanswerable} == {"gate"}


def test_every_bundled_dataset_passes_the_checker() -> None:
    folders = sorted(path for path in DATASETS.iterdir() if (path / "qa.jsonl").is_file())
    assert {PYTHON_FAQ, POSTGRESQL_DOCS, BASH_MANUAL} <= set(folders)
    for folder in folders:
        report = check_dataset(folder)
        assert report.ok, "\n".join(str(error) for error in report.errors)
