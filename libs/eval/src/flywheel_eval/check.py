"""Dataset checker: `python -m flywheel_eval.check DATASET_DIR` validates a dataset and prints a summary."""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

from selectolax.lexbor import LexborHTMLParser

from flywheel_eval.dataset import (
    PAGE_SUFFIX,
    PAGES_DIR,
    QA_FILE,
    SPLITS,
    DatasetError,
    QAItem,
    compute_content_hash,
    decode_utf8,
    integrity_errors,
    parse_qa,
    read_pages,
)
from flywheel_eval.metrics import normalize_answer

DEFAULT_NEAR_DUPLICATE = 0.8
# Elements whose text is not page content: invisible ones, and the page chrome that the model path
# (flywheel_model.retrieval.html_to_text) also drops, so an answer found here is one the model can read.
_INVISIBLE = "head, script, style, noscript, template, svg, nav, header, footer, aside, form, iframe, button"
# Block-level elements get line breaks around them so text in adjacent cells or paragraphs never fuses.
_BLOCKS = (
    "address, article, aside, blockquote, br, dd, div, dl, dt, figcaption, figure, footer, form, h1, h2, h3, "
    "h4, h5, h6, header, hr, li, main, nav, ol, p, pre, section, table, tr, ul"
)
# Table cells are blocks too, but for sentences a row is one statement ("columns per index | 32").
_CELLS = "td, th"
_GATE_SPLIT = "gate"
# Sentences end at a block boundary (a table row counts as one), or at . ! ? (perhaps closed by a bracket
# or quote) followed by space and a word, number, quote or bracket, except after "e.g." and the like;
# "3.11" and shell code such as "then . ~/.bashrc" stay whole. The block mark is a paragraph separator,
# which page text never needs.
_BLOCK_MARK = "\u2029"
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][)\]\"'\u2019\u201d]))\s+(?=[\w\"'(\[\u2018\u201c])")
_ABBREVIATION = re.compile(r"(?:^|\W)(?:e\.g|i\.e|cf|vs|etc)\.$", re.IGNORECASE)
# Words that say nothing about which sentence a question paraphrases.
_FUNCTION_WORDS = frozenset(
    {
        "about", "am", "and", "are", "as", "at", "be", "been", "being", "by", "can", "could", "did", "do",
        "does", "for", "from", "had", "has", "have", "how", "i", "if", "in", "into", "is", "it", "its", "me",
        "my", "of", "on", "or", "s", "so", "should", "than", "that", "there", "these", "this", "those", "to",
        "was", "we", "were", "what", "whats", "when", "where", "which", "who", "why", "will", "with", "would",
        "you", "your",
    }
)  # fmt: skip


def _visible_text(html: str, block_mark: str, cell_mark: str) -> str:
    tree = LexborHTMLParser(html)
    for node in tree.css(_INVISIBLE):
        node.decompose()
    for selector, mark in ((_BLOCKS, block_mark), (_CELLS, cell_mark)):
        for node in tree.css(selector):
            node.insert_before(mark)
            node.insert_after(mark)
    # Inline elements join without a separator: `<code>__init__</code>.py` reads as "__init__.py".
    root = tree.body or tree.root
    return "" if root is None else root.text(separator="")


def html_to_text(html: str) -> str:
    """Readable text of an HTML page: scripts, styles and page chrome dropped, line breaks at blocks."""
    return _visible_text(html, "\n", "\n")


def page_sentences(html: str) -> list[str]:
    """The normalised sentences of a page's visible text, in page order; a table row or list item is one."""
    sentences: list[str] = []
    for block in _visible_text(html, _BLOCK_MARK, " ").split(_BLOCK_MARK):
        pieces: list[str] = []
        for piece in _SENTENCE_END.split(block):
            if pieces and _ABBREVIATION.search(pieces[-1]):
                pieces[-1] += " " + piece
            else:
                pieces.append(piece)
        sentences += [normalised for piece in pieces if (normalised := normalize_answer(piece))]
    return sentences


def answer_sentence(item: QAItem, sentences: Sequence[str]) -> int | None:
    """Index of the sentence that answers an item: the one holding its first answer, None if none does.

    When the first answer occurs in several sentences, the one sharing the most words with the question
    (function words aside) is taken, as a question paraphrases its sentence; the earliest on a tie.
    """
    if not item.answers:
        return None
    answer = f" {normalize_answer(item.answers[0])} "
    holding = [index for index, sentence in enumerate(sentences) if answer in f" {sentence} "]
    if not holding:
        return None
    asked = question_tokens(item.question) - _FUNCTION_WORDS
    return max(holding, key=lambda index: (len(asked & set(sentences[index].split())), -index))


def question_tokens(question: str) -> frozenset[str]:
    """The set of normalised tokens of a question, for near-duplicate detection."""
    return frozenset(normalize_answer(question).split())


def jaccard(first: frozenset[str], second: frozenset[str]) -> float:
    """Token Jaccard similarity; two empty sets count as identical."""
    union = first | second
    return len(first & second) / len(union) if union else 1.0


@dataclass
class CheckReport:
    """What the checker found: errors fail the check, warnings are printed only."""

    root: Path
    errors: list[DatasetError] = field(default_factory=list)
    warnings: list[DatasetError] = field(default_factory=list)
    # Answer sentences shared across splits; also in `errors`, or in `warnings` when not strict.
    shared_sentences: list[DatasetError] = field(default_factory=list)
    items: list[QAItem] = field(default_factory=list)
    page_ids: list[str] = field(default_factory=list)
    content_hash: str = ""

    @property
    def ok(self) -> bool:
        """Whether the dataset passed (no errors)."""
        return not self.errors


def _check_answers(item: QAItem, padded_text: str | None, qa_path: Path) -> list[DatasetError]:
    errors: list[DatasetError] = []
    if not item.answers:
        if item.split != _GATE_SPLIT:
            errors.append(
                DatasetError(
                    f"item {item.id!r}: empty answers (unanswerable) are only allowed in the "
                    f"{_GATE_SPLIT!r} split, not {item.split!r}",
                    qa_path,
                    item.line,
                )
            )
        return errors
    for answer in item.answers:
        normalised = normalize_answer(answer)
        if not normalised:
            errors.append(
                DatasetError(
                    f"item {item.id!r}: answer {answer!r} is empty after normalisation", qa_path, item.line
                )
            )
        elif padded_text is not None and f" {normalised} " not in padded_text:
            errors.append(
                DatasetError(
                    f"item {item.id!r}: answer {answer!r} is not a span of page {item.page!r} "
                    f"(normalised: {normalised!r})",
                    qa_path,
                    item.line,
                )
            )
    return errors


def _check_splits(
    items: Sequence[QAItem], threshold: float, qa_path: Path
) -> tuple[list[DatasetError], list[DatasetError]]:
    errors: list[DatasetError] = []
    warnings: list[DatasetError] = []
    # Normalise once per item; the pairwise loop below is quadratic in the number of items.
    tokens = {item.id: question_tokens(item.question) for item in items}
    texts = {item.id: normalize_answer(item.question) for item in items}
    answers = {item.id: {normalize_answer(answer) for answer in item.answers} for item in items}
    for item in items:
        if not tokens[item.id]:
            errors.append(
                DatasetError(f"item {item.id!r}: question is empty after normalisation", qa_path, item.line)
            )
    for first, second in combinations(items, 2):
        similarity = jaccard(tokens[first.id], tokens[second.id])
        same_text = texts[first.id] == texts[second.id]
        pair = f"items {first.id!r} (line {first.line}, {first.split}) and {second.id!r} ({second.split})"
        if first.split != second.split:
            if same_text:
                errors.append(DatasetError(f"same question in two splits: {pair}", qa_path, second.line))
            elif similarity >= threshold:
                errors.append(
                    DatasetError(
                        f"near-duplicate questions across splits (token Jaccard {similarity:.2f} >= "
                        f"{threshold}): {pair}",
                        qa_path,
                        second.line,
                    )
                )
            elif first.page == second.page and answers[first.id] & answers[second.id]:
                # Same fact, different wording: training on one split teaches the other's answer.
                warnings.append(
                    DatasetError(f"same answer on the same page in two splits: {pair}", qa_path, second.line)
                )
        elif same_text:
            warnings.append(DatasetError(f"repeated question within a split: {pair}", qa_path, second.line))
    return errors, warnings


def _check_sentences(
    items: Sequence[QAItem], sentences: dict[str, list[str]], qa_path: Path
) -> list[DatasetError]:
    # Two questions answered by one sentence ask about one fact: training on one split teaches the other.
    by_sentence: defaultdict[tuple[str, int], list[QAItem]] = defaultdict(list)
    for item in items:
        index = answer_sentence(item, sentences.get(item.page, []))
        if index is not None:
            by_sentence[(item.page, index)].append(item)
    problems: list[DatasetError] = []
    for (page, index), group in by_sentence.items():
        if len({item.split for item in group}) > 1:
            excerpt = " ".join(sentences[page][index].split()[:12])
            listed = ", ".join(f"{item.id!r} ({item.split})" for item in group)
            problems.append(
                DatasetError(
                    f"answer sentence shared across splits on page {page!r} ({excerpt!r}...): {listed}",
                    qa_path,
                    group[-1].line,
                )
            )
    return problems


def check_dataset(
    root: Path | str,
    *,
    near_duplicate_threshold: float = DEFAULT_NEAR_DUPLICATE,
    strict_sentences: bool = False,
) -> CheckReport:
    """Check a dataset folder and return every problem found (it does not stop at the first).

    Answer sentences shared across splits are warnings, or errors with `strict_sentences`: the bundled
    python-faq predates the rule and shares a few.
    """
    root = Path(root)
    report = CheckReport(root=root)
    if not root.is_dir():
        report.errors.append(DatasetError("dataset folder not found", root))
        return report
    try:
        raw_pages = read_pages(root)
    except DatasetError as exc:
        report.errors.append(exc)
        return report
    qa_path = root / QA_FILE
    if not qa_path.is_file():
        report.errors.append(DatasetError(f"missing {QA_FILE}", root))
        return report
    if not raw_pages:
        report.errors.append(DatasetError(f"no *{PAGE_SUFFIX} pages", root / PAGES_DIR))

    padded_texts: dict[str, str | None] = {}
    sentences: dict[str, list[str]] = {}
    for page_id, raw in raw_pages.items():
        page_path = root / PAGES_DIR / f"{page_id}{PAGE_SUFFIX}"
        try:
            page_html = decode_utf8(raw, page_path)
        except DatasetError as exc:
            report.errors.append(exc)
            padded_texts[page_id] = None
            continue
        normalised = normalize_answer(html_to_text(page_html))
        sentences[page_id] = page_sentences(page_html)
        if not normalised:
            report.errors.append(DatasetError("page has no visible text", page_path))
        padded_texts[page_id] = f" {normalised} "

    qa_bytes = qa_path.read_bytes()
    try:
        items, parse_errors = parse_qa(decode_utf8(qa_bytes, qa_path), qa_path)
    except DatasetError as exc:
        report.errors.append(exc)
        return report
    report.items = items
    report.page_ids = sorted(raw_pages)
    report.content_hash = compute_content_hash(raw_pages, qa_bytes)
    report.errors += parse_errors
    if not items and not parse_errors:
        report.errors.append(DatasetError("no questions", qa_path))
    report.errors += integrity_errors(dict.fromkeys(raw_pages, ""), items, qa_path)
    for item in items:
        report.errors += _check_answers(item, padded_texts.get(item.page), qa_path)
    split_errors, split_warnings = _check_splits(items, near_duplicate_threshold, qa_path)
    report.errors += split_errors
    report.warnings += split_warnings
    report.shared_sentences = _check_sentences(items, sentences, qa_path)
    if strict_sentences:
        report.errors += report.shared_sentences
    else:
        report.warnings += report.shared_sentences
    used = {item.page for item in items}
    for page_id in report.page_ids:
        if page_id not in used:
            report.warnings.append(
                DatasetError("page has no questions", root / PAGES_DIR / f"{page_id}{PAGE_SUFFIX}")
            )
    return report


def format_summary(report: CheckReport) -> str:
    """A table of item counts per page and split, with unanswerable counts and the content hash."""
    counts: defaultdict[str, Counter[str]] = defaultdict(Counter)
    for item in report.items:
        counts[item.page][item.split] += 1
    pages = sorted(set(report.page_ids) | set(counts))
    width = max([len("page"), len("total"), *(len(page) for page in pages)])
    header = f"{'page':<{width}}" + "".join(f"{split:>9}" for split in SPLITS) + f"{'total':>9}"
    lines = [f"dataset {report.root} ({report.content_hash[:12] or 'unhashed'})", header, "-" * len(header)]
    totals: Counter[str] = Counter()
    for page in pages:
        row = counts[page]
        totals.update(row)
        cells = "".join(f"{row[split]:>9}" for split in SPLITS)
        lines.append(f"{page:<{width}}{cells}{sum(row.values()):>9}")
    lines.append("-" * len(header))
    grand = sum(totals.values())
    lines.append(f"{'total':<{width}}" + "".join(f"{totals[s]:>9}" for s in SPLITS) + f"{grand:>9}")
    if grand:
        shares = ", ".join(f"{s} {totals[s] / grand:.0%}" for s in SPLITS)
        unanswerable = Counter(item.split for item in report.items if not item.answerable)
        lines.append(
            f"shares: {shares}; unanswerable: " + ", ".join(f"{s} {unanswerable[s]}" for s in SPLITS)
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Check one dataset folder; print problems and a summary; exit 1 on any error."""
    parser = argparse.ArgumentParser(prog="python -m flywheel_eval.check", description=__doc__)
    parser.add_argument("dataset", type=Path, help="dataset folder holding pages/ and qa.jsonl")
    parser.add_argument(
        "--near-duplicate",
        type=float,
        default=DEFAULT_NEAR_DUPLICATE,
        help="token Jaccard at or above which questions in different splits count as near-duplicates",
    )
    parser.add_argument(
        "--strict-sentences",
        action="store_true",
        help="fail, instead of warning, when questions in different splits share an answer sentence",
    )
    args = parser.parse_args(argv)
    report = check_dataset(
        args.dataset, near_duplicate_threshold=args.near_duplicate, strict_sentences=args.strict_sentences
    )
    if report.items or report.page_ids:
        print(format_summary(report), flush=True)
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for error in report.errors:
        print(f"error: {error}", file=sys.stderr)
    if report.errors:
        print(f"FAILED: {len(report.errors)} error(s), {len(report.warnings)} warning(s)", file=sys.stderr)
        return 1
    print(f"OK: {len(report.items)} items, {len(report.page_ids)} pages, {len(report.warnings)} warning(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
