"""Unit tests for loading datasets: parsing, errors with file and line, the content hash."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from flywheel_eval.dataset import DatasetError, QAItem, load_dataset, parse_item

DatasetFactory = Callable[..., Path]


def test_load_valid_dataset(make_dataset: DatasetFactory) -> None:
    dataset = load_dataset(make_dataset())
    assert sorted(dataset.pages) == ["fruit", "veg"]
    assert "<em>berry</em>" in dataset.pages["fruit"]
    assert [item.id for item in dataset.items] == ["q1", "q2", "q3", "q4", "q5"]
    assert dataset.items[1] == QAItem(
        "q2", "fruit", "How much of an apple is air?", ("25%", "25% air"), "exam"
    )
    assert dataset.items[1].line == 2
    assert [item.id for item in dataset.split("traffic")] == ["q1", "q5"]
    assert [item.id for item in dataset.split("gate")] == ["q3", "q4"]
    assert not dataset.item("q4").answerable and dataset.item("q3").answerable
    assert len(dataset.content_hash) == 64
    assert dataset.version == f"{dataset.root.name}@{dataset.content_hash[:12]}"


def test_unknown_split_name(make_dataset: DatasetFactory) -> None:
    with pytest.raises(ValueError, match="unknown split"):
        load_dataset(make_dataset()).split("train")


def test_content_hash_tracks_content_only(
    make_dataset: DatasetFactory, good_items: list[dict[str, Any]]
) -> None:
    first = load_dataset(make_dataset()).content_hash
    # The same files in another folder hash the same.
    assert load_dataset(make_dataset()).content_hash == first
    good_items[0]["answers"] = ["berry"]
    assert load_dataset(make_dataset(items=good_items)).content_hash != first
    changed_page = load_dataset(
        make_dataset(pages={"fruit": "<p>a berry 25% air fruit.toml</p>", "veg": "x"})
    )
    assert changed_page.content_hash != first


def test_blank_lines_are_skipped(make_dataset: DatasetFactory, good_items: list[dict[str, Any]]) -> None:
    text = "\n" + "\n\n".join(json.dumps(item) for item in good_items) + "\n"
    dataset = load_dataset(make_dataset(qa_text=text))
    assert len(dataset.items) == 5
    assert dataset.items[0].line == 2


def test_error_names_file_and_line(make_dataset: DatasetFactory, good_items: list[dict[str, Any]]) -> None:
    lines = [json.dumps(item) for item in good_items]
    lines[2] = "{not json"
    root = make_dataset(qa_text="\n".join(lines))
    with pytest.raises(DatasetError) as caught:
        load_dataset(root)
    assert caught.value.path == root / "qa.jsonl"
    assert caught.value.line == 3
    assert str(caught.value).startswith(f"{root / 'qa.jsonl'}:3: invalid JSON")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"split": "train"}, "split 'train' is not one of"),
        ({"answers": "a berry"}, "must be a list of strings"),
        ({"answers": ["ok", 3]}, "must be a list of strings"),
        ({"answers": ["  "]}, "must not be blank"),
        ({"question": ""}, "'question' must be a non-empty string"),
        ({"id": 7}, "'id' must be a non-empty string"),
        ({"page": "../etc/passwd"}, "not a plain file name"),
        ({"extra": 1}, "unknown field"),
    ],
)
def test_bad_records(change: dict[str, Any], message: str, good_items: list[dict[str, Any]]) -> None:
    record = {**good_items[0], **change}
    with pytest.raises(DatasetError, match=message):
        parse_item(record, "qa.jsonl", 1)


def test_missing_field() -> None:
    with pytest.raises(DatasetError, match=r"missing field.*answers, split"):
        parse_item({"id": "x", "page": "p", "question": "q?"})


def test_not_an_object() -> None:
    with pytest.raises(DatasetError, match="expected a JSON object, got list"):
        parse_item([1, 2])


def test_duplicate_ids(make_dataset: DatasetFactory, good_items: list[dict[str, Any]]) -> None:
    good_items[3]["id"] = "q1"
    with pytest.raises(DatasetError, match=r"qa.jsonl:4: duplicate id 'q1' \(first on line 1\)"):
        load_dataset(make_dataset(items=good_items))


def test_missing_page(make_dataset: DatasetFactory, good_items: list[dict[str, Any]]) -> None:
    good_items[0]["page"] = "meat"
    with pytest.raises(DatasetError, match=r"qa\.jsonl:1: item 'q1': page 'meat' not found"):
        load_dataset(make_dataset(items=good_items))


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="dataset folder not found"):
        load_dataset(tmp_path / "absent")
    with pytest.raises(DatasetError, match="missing pages/"):
        load_dataset(tmp_path)
    (tmp_path / "pages").mkdir()
    with pytest.raises(DatasetError, match=r"missing qa\.jsonl"):
        load_dataset(tmp_path)


def test_page_must_be_utf8(make_dataset: DatasetFactory) -> None:
    root = make_dataset()
    (root / "pages" / "veg.html").write_bytes(b"<p>caf\xe9</p>")
    with pytest.raises(DatasetError, match=r"veg.html: not valid UTF-8"):
        load_dataset(root)
