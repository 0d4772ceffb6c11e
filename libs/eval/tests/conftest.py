"""Fixtures that build small datasets in temporary folders."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

PAGE_HTML = """<!DOCTYPE html>
<html><head><title>Fruit</title><style>.secret { color: red }</style></head>
<body>
<h1>Fruit facts</h1>
<p>The banana is a <em>berry</em>, botanically speaking.</p>
<p>Apples float because they are 25% air.</p>
<script>var hidden = "pineapple";</script>
<table><tr><td>Lemon</td><td>Lime</td></tr></table>
<p>Configure it with <code>fruit.toml</code>.</p>
</body></html>
"""

PAGE_TWO_HTML = "<html><body><p>Carrots are roots. Onions are bulbs.</p></body></html>"

GOOD_ITEMS: list[dict[str, Any]] = [
    {"id": "q1", "page": "fruit", "question": "What kind of fruit is a banana?", "answers": ["a berry"],
     "split": "traffic"},
    {"id": "q2", "page": "fruit", "question": "How much of an apple is air?", "answers": ["25%", "25% air"],
     "split": "exam"},
    {"id": "q3", "page": "veg", "question": "Which part of the carrot do we eat?", "answers": ["roots"],
     "split": "gate"},
    {"id": "q4", "page": "veg", "question": "Who first grew onions?", "answers": [], "split": "gate"},
    {"id": "q5", "page": "fruit", "question": "Name of the config file?", "answers": ["fruit.toml"],
     "split": "traffic"},
]  # fmt: skip

DatasetFactory = Callable[..., Path]


def write_dataset(
    root: Path,
    items: list[dict[str, Any]] | None = None,
    pages: dict[str, str] | None = None,
    qa_text: str | None = None,
) -> Path:
    """Write a dataset folder; `qa_text` overrides the JSON lines made from `items`."""
    (root / "pages").mkdir(parents=True, exist_ok=True)
    for page_id, html in (pages if pages is not None else {"fruit": PAGE_HTML, "veg": PAGE_TWO_HTML}).items():
        (root / "pages" / f"{page_id}.html").write_text(html, encoding="utf-8")
    if qa_text is None:
        qa_text = "".join(json.dumps(item) + "\n" for item in (items if items is not None else GOOD_ITEMS))
    (root / "qa.jsonl").write_text(qa_text, encoding="utf-8")
    return root


@pytest.fixture
def make_dataset(tmp_path: Path) -> DatasetFactory:
    """Build a dataset under a fresh temporary folder; defaults to a small valid one."""
    counter = iter(range(1_000_000))

    def factory(**kwargs: Any) -> Path:
        return write_dataset(tmp_path / f"ds{next(counter)}", **kwargs)

    return factory


@pytest.fixture
def good_items() -> list[dict[str, Any]]:
    """A fresh copy of the valid items, safe to mutate."""
    return copy.deepcopy(GOOD_ITEMS)
