"""The evaluation dataset format: a folder of `pages/<page_id>.html` and a `qa.jsonl` of questions."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal, cast

Split = Literal["traffic", "exam", "gate"]
SPLITS: Final[tuple[Split, ...]] = ("traffic", "exam", "gate")
PAGES_DIR: Final = "pages"
QA_FILE: Final = "qa.jsonl"
PAGE_SUFFIX: Final = ".html"
# Page ids become file names and appear in URLs and logs, so keep them plain.
PAGE_ID_PATTERN: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_FIELDS: Final = frozenset({"id", "page", "question", "answers", "split"})


class DatasetError(Exception):
    """A problem with a dataset, located by file and (for qa.jsonl) line."""

    def __init__(self, message: str, path: Path | str | None = None, line: int | None = None) -> None:
        self.message = message
        self.path = Path(path) if path is not None else None
        self.line = line
        super().__init__(str(self))

    def __str__(self) -> str:
        where = "" if self.path is None else f"{self.path}:{self.line}: " if self.line else f"{self.path}: "
        return f"{where}{self.message}"


@dataclass(frozen=True, slots=True)
class QAItem:
    """One question about one page; no acceptable answers means the page does not answer it."""

    id: str
    page: str
    question: str
    answers: tuple[str, ...]
    split: Split
    # Where the item was read from, for messages; not part of its identity.
    line: int = field(default=0, compare=False)

    @property
    def answerable(self) -> bool:
        """Whether the page answers the question (some acceptable answer is given)."""
        return bool(self.answers)


@dataclass(frozen=True, slots=True)
class Dataset:
    """A loaded dataset: raw page HTML by page id, and the items in file order."""

    root: Path
    pages: dict[str, str]
    items: tuple[QAItem, ...]
    content_hash: str

    @property
    def name(self) -> str:
        """The dataset's folder name."""
        return self.root.name

    @property
    def version(self) -> str:
        """A short, human-sized form of the content hash: `<name>@<12 hex digits>`."""
        return f"{self.name}@{self.content_hash[:12]}"

    def split(self, name: Split | str) -> list[QAItem]:
        """The items of one split, in file order."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        return [item for item in self.items if item.split == name]

    def item(self, item_id: str) -> QAItem:
        """The item with the given id."""
        for item in self.items:
            if item.id == item_id:
                return item
        raise KeyError(item_id)


def parse_item(record: object, path: Path | str | None = None, line: int | None = None) -> QAItem:
    """Validate one decoded qa.jsonl record and build its `QAItem`."""

    def fail(message: str) -> DatasetError:
        return DatasetError(message, path, line)

    if not isinstance(record, dict):
        raise fail(f"expected a JSON object, got {type(record).__name__}")
    missing = sorted(_FIELDS - record.keys())
    if missing:
        raise fail(f"missing field(s): {', '.join(missing)}")
    unknown = sorted(record.keys() - _FIELDS)
    if unknown:
        raise fail(f"unknown field(s): {', '.join(unknown)}")
    for name in ("id", "page", "question"):
        value = record[name]
        if not isinstance(value, str) or not value.strip():
            raise fail(f"field {name!r} must be a non-empty string")
    if not PAGE_ID_PATTERN.match(record["page"]):
        raise fail(f"page id {record['page']!r} is not a plain file name ({PAGE_ID_PATTERN.pattern})")
    answers = record["answers"]
    if not isinstance(answers, list) or not all(isinstance(answer, str) for answer in answers):
        raise fail("field 'answers' must be a list of strings")
    if any(not answer.strip() for answer in answers):
        raise fail("answers must not be blank; use an empty list for an unanswerable question")
    split = record["split"]
    if split not in SPLITS:
        raise fail(f"split {split!r} is not one of {', '.join(SPLITS)}")
    return QAItem(
        id=record["id"],
        page=record["page"],
        question=record["question"],
        answers=tuple(answers),
        split=cast(Split, split),
        line=line or 0,
    )


def parse_qa(text: str, path: Path | str | None = None) -> tuple[list[QAItem], list[DatasetError]]:
    """Parse qa.jsonl text, collecting every bad line instead of stopping at the first; blank lines skip."""
    items: list[QAItem] = []
    errors: list[DatasetError] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            errors.append(DatasetError(f"invalid JSON: {exc.msg} (column {exc.colno})", path, number))
            continue
        try:
            items.append(parse_item(record, path, number))
        except DatasetError as exc:
            errors.append(exc)
    return items, errors


def integrity_errors(
    pages: dict[str, str], items: Iterable[QAItem], qa_path: Path | str | None = None
) -> list[DatasetError]:
    """Structural problems across items: duplicate ids and questions about pages that do not exist."""
    errors: list[DatasetError] = []
    first_line: dict[str, int] = {}
    for item in items:
        if item.id in first_line:
            errors.append(
                DatasetError(
                    f"duplicate id {item.id!r} (first on line {first_line[item.id]})", qa_path, item.line
                )
            )
        else:
            first_line[item.id] = item.line
        if item.page not in pages:
            errors.append(
                DatasetError(
                    f"item {item.id!r}: page {item.page!r} not found in {PAGES_DIR}/", qa_path, item.line
                )
            )
    return errors


def read_pages(root: Path) -> dict[str, bytes]:
    """Raw bytes of every `pages/*.html`, keyed by page id (the file stem)."""
    pages_dir = root / PAGES_DIR
    if not pages_dir.is_dir():
        raise DatasetError(f"missing {PAGES_DIR}/ folder", root)
    pages: dict[str, bytes] = {}
    for path in sorted(pages_dir.glob(f"*{PAGE_SUFFIX}")):
        if not PAGE_ID_PATTERN.match(path.stem):
            raise DatasetError(f"page file name is not a plain page id ({PAGE_ID_PATTERN.pattern})", path)
        pages[path.stem] = path.read_bytes()
    return pages


def decode_utf8(raw: bytes, path: Path | str | None = None) -> str:
    """Decode a dataset file as UTF-8, the only encoding the format allows."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"not valid UTF-8 (byte {exc.start})", path) from exc


def compute_content_hash(pages: dict[str, bytes], qa: bytes) -> str:
    """SHA-256 over page ids, page bytes and qa.jsonl bytes; any change to the data changes it."""
    digest = hashlib.sha256()
    # Length-prefix every part so that moving bytes between a name and its content cannot collide.
    for page_id in sorted(pages):
        for part in (b"page", page_id.encode(), pages[page_id]):
            digest.update(len(part).to_bytes(8, "big") + part)
    for part in (b"qa", qa):
        digest.update(len(part).to_bytes(8, "big") + part)
    return digest.hexdigest()


def load_dataset(root: Path | str) -> Dataset:
    """Load and structurally validate a dataset folder; raises `DatasetError` on the first problem."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError("dataset folder not found", root)
    raw_pages = read_pages(root)
    qa_path = root / QA_FILE
    if not qa_path.is_file():
        raise DatasetError(f"missing {QA_FILE}", root)
    qa_bytes = qa_path.read_bytes()
    pages = {
        page_id: decode_utf8(raw, root / PAGES_DIR / f"{page_id}{PAGE_SUFFIX}")
        for page_id, raw in raw_pages.items()
    }
    items, errors = parse_qa(decode_utf8(qa_bytes, qa_path), qa_path)
    errors += integrity_errors(pages, items, qa_path)
    if errors:
        raise errors[0]
    return Dataset(
        root=root,
        pages=pages,
        items=tuple(items),
        content_hash=compute_content_hash(raw_pages, qa_bytes),
    )
