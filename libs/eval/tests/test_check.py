"""Tests for the dataset checker: it passes good data and fails broken inputs with clear messages."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from flywheel_eval.check import (
    answer_sentence,
    check_dataset,
    html_to_text,
    jaccard,
    main,
    page_sentences,
    question_tokens,
)
from flywheel_eval.dataset import QAItem

DatasetFactory = Callable[..., Path]


def messages(root: Path) -> list[str]:
    """The checker's error messages for a dataset folder."""
    return [str(error) for error in check_dataset(root).errors]


def test_html_to_text_drops_scripts_and_keeps_inline_words_whole() -> None:
    html = (
        "<html><head><title>T</title><style>p{}</style></head><body><p>Use <code>__init__</code>.py"
        "</p><script>secret()</script><table><tr><td>a</td><td>b</td></tr></table>c<br>d</body></html>"
    )
    text = html_to_text(html)
    assert "__init__.py" in text
    assert "secret" not in text and "p{}" not in text
    # Cells and line breaks never fuse into one word.
    assert text.split() == ["Use", "__init__.py", "a", "b", "c", "d"]


def test_jaccard() -> None:
    assert jaccard(question_tokens("How do I do it?"), question_tokens("how do i do it")) == 1.0
    assert jaccard(frozenset({"a", "b"}), frozenset({"b", "c"})) == pytest.approx(1 / 3)
    assert jaccard(frozenset(), frozenset()) == 1.0


def test_good_dataset_passes(make_dataset: DatasetFactory, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_dataset()
    report = check_dataset(root)
    assert report.ok, report.errors
    assert main([str(root)]) == 0
    out = capsys.readouterr().out
    assert "OK: 5 items, 2 pages" in out
    assert "unanswerable: traffic 0, exam 0, gate 1" in out


def test_answer_must_be_a_span_of_the_page(
    make_dataset: DatasetFactory, good_items: list[dict[str, Any]]
) -> None:
    good_items[0]["answers"] = ["a berry", "a vegetable"]
    found = messages(make_dataset(items=good_items))
    assert len(found) == 1
    assert "qa.jsonl:1: item 'q1': answer 'a vegetable' is not a span of page 'fruit'" in found[0]


def test_span_must_respect_token_boundaries(
    make_dataset: DatasetFactory, good_items: list[dict[str, Any]]
) -> None:
    good_items[0]["answers"] = ["berr"]
    assert "is not a span" in messages(make_dataset(items=good_items))[0]


def test_answers_hidden_in_scripts_or_styles_do_not_count(
    make_dataset: DatasetFactory, good_items: list[dict[str, Any]]
) -> None:
    good_items[0]["answers"] = ["pineapple"]
    good_items[1]["answers"] = ["color red"]
    assert len(messages(make_dataset(items=good_items))) == 2


def test_answers_only_in_page_chrome_do_not_count(
    make_dataset: DatasetFactory, good_items: list[dict[str, Any]]
) -> None:
    page = "<nav>Home</nav><p>a berry 25% air fruit.toml</p><footer>Copyright Fruit Inc.</footer>"
    good_items[0]["answers"] = ["Fruit Inc."]
    good_items[1]["answers"] = ["Home"]
    found = messages(make_dataset(items=good_items, pages={"fruit": page, "veg": "<p>roots</p>"}))
    assert len(found) == 2 and all("is not a span" in message for message in found)


def test_answer_that_normalises_to_nothing(
    make_dataset: DatasetFactory, good_items: list[dict[str, Any]]
) -> None:
    good_items[0]["answers"] = ["the"]
    assert "answer 'the' is empty after normalisation" in messages(make_dataset(items=good_items))[0]


def test_empty_answers_only_in_gate(make_dataset: DatasetFactory, good_items: list[dict[str, Any]]) -> None:
    good_items[3]["split"] = "exam"
    found = messages(make_dataset(items=good_items))
    assert len(found) == 1
    assert (
        "qa.jsonl:4: item 'q4': empty answers (unanswerable) are only allowed in the 'gate' split" in found[0]
    )


def test_same_question_in_two_splits(make_dataset: DatasetFactory, good_items: list[dict[str, Any]]) -> None:
    good_items.append(
        {**good_items[0], "id": "q6", "question": "what KIND of fruit is the banana", "split": "gate"}
    )
    found = messages(make_dataset(items=good_items))
    assert len(found) == 1
    assert "same question in two splits: items 'q1' (line 1, traffic) and 'q6' (gate)" in found[0]


def test_near_duplicate_questions_across_splits(
    make_dataset: DatasetFactory, good_items: list[dict[str, Any]]
) -> None:
    # {what, kind, of, fruit, is, banana} vs {what, kind, of, fruit, is, banana, really}: Jaccard 6/7.
    near = {
        **good_items[0],
        "id": "q6",
        "question": "What kind of fruit is a banana, really?",
        "split": "exam",
    }
    found = messages(make_dataset(items=[*good_items, near]))
    assert len(found) == 1
    assert "near-duplicate questions across splits (token Jaccard 0.86 >= 0.8)" in found[0]
    # A looser wording (Jaccard 5/9) is fine, and the same wording within one split is only a warning.
    loose = {**near, "question": "Is a banana really a fruit or a kind of herb?"}
    same_split = {**good_items[0], "id": "q7", "question": "What kind of fruit is a banana?"}
    report = check_dataset(make_dataset(items=[*good_items, loose, same_split]))
    assert report.ok, report.errors
    assert any("repeated question within a split" in str(warning) for warning in report.warnings)
    assert any("same answer on the same page in two splits" in str(warning) for warning in report.warnings)


def test_page_sentences_split_at_blocks_and_sentence_ends() -> None:
    html = (
        "<h1>Fruit</h1><p>Use it, e.g. with tea. (It keeps.) pH is 2.5! Sour?</p><pre>then . ~/.rc</pre>"
        "<table><tr><th>fruit</th><th>colour</th></tr><tr><td>lemon</td><td>yellow</td></tr></table>"
        "<footer>Copyright</footer>"
    )
    assert page_sentences(html) == [
        "fruit",
        "use it e g with tea",
        "it keeps",
        "ph is 25",
        "sour",
        # Code is not prose: "then . ~" starts no sentence.
        "then rc",
        # A table row is one statement, its cells joined.
        "fruit colour",
        "lemon yellow",
    ]


def _item(answers: list[str], question: str = "what about it") -> QAItem:
    return QAItem(id="q", page="p", question=question, answers=tuple(answers), split="exam")


def test_answer_sentence_holds_the_first_answer() -> None:
    sentences = ["lemons are sour", "limes are green", "limes are sour too"]
    assert answer_sentence(_item(["green"]), sentences) == 1
    # Only the first answer decides; an unanswerable item or an answer spanning sentences has none.
    assert answer_sentence(_item(["lemons", "green"]), sentences) == 0
    assert answer_sentence(_item([]), sentences) is None
    assert answer_sentence(_item(["sour limes"]), sentences) is None


def test_ambiguous_answer_sentence_is_the_one_closest_to_the_question() -> None:
    sentences = ["lemons are sour", "limes are green", "limes are sour too"]
    assert answer_sentence(_item(["sour"], "how do limes taste?"), sentences) == 2
    assert answer_sentence(_item(["sour"], "how do lemons taste?"), sentences) == 0
    # Function words do not count; with no content word in common the earliest sentence is taken.
    assert answer_sentence(_item(["sour"], "what is it and how is it"), sentences) == 0


def test_answer_sentence_shared_across_splits(
    make_dataset: DatasetFactory, good_items: list[dict[str, Any]]
) -> None:
    # q1 (traffic) asks what the banana is; this gate question is answered by the same sentence.
    same_sentence = {
        "id": "q6",
        "page": "fruit",
        "question": "In what sense is it a berry?",
        "answers": ["botanically speaking"],
        "split": "gate",
    }
    root = make_dataset(items=[*good_items, same_sentence])
    expected = (
        "answer sentence shared across splits on page 'fruit' ('banana is berry botanically speaking'...): "
        "'q1' (traffic), 'q6' (gate)"
    )
    report = check_dataset(root)
    assert report.ok, report.errors
    assert [str(warning).split("qa.jsonl:6: ")[1] for warning in report.warnings] == [expected]
    assert report.shared_sentences == report.warnings
    strict = check_dataset(root, strict_sentences=True)
    assert [str(error).split("qa.jsonl:6: ")[1] for error in strict.errors] == [expected]
    assert not strict.warnings
    # The same sentence within one split is fine.
    same_split = check_dataset(make_dataset(items=[*good_items, {**same_sentence, "split": "traffic"}]))
    assert not same_split.shared_sentences


def test_main_strict_sentences_flag(
    make_dataset: DatasetFactory, good_items: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    shared = {
        **good_items[0],
        "id": "q6",
        "question": "is it botanical?",
        "answers": ["botanically"],
        "split": "exam",
    }
    root = make_dataset(items=[*good_items, shared])
    assert main([str(root)]) == 0
    assert "warning: " in capsys.readouterr().err
    assert main(["--strict-sentences", str(root)]) == 1
    assert "error: " in capsys.readouterr().err


def test_duplicate_ids_and_missing_pages(
    make_dataset: DatasetFactory, good_items: list[dict[str, Any]]
) -> None:
    good_items[1]["id"] = "q1"
    good_items[2]["page"] = "meat"
    found = messages(make_dataset(items=good_items))
    assert any("qa.jsonl:2: duplicate id 'q1' (first on line 1)" in message for message in found)
    assert any("qa.jsonl:3: item 'q3': page 'meat' not found in pages/" in message for message in found)


def test_reports_every_bad_line_not_just_the_first(
    make_dataset: DatasetFactory, good_items: list[dict[str, Any]]
) -> None:
    lines = [json.dumps(item) for item in good_items]
    lines[0] = "{broken"
    lines[2] = json.dumps({**good_items[2], "split": "train"})
    lines[4] = json.dumps([1])
    found = messages(make_dataset(qa_text="\n".join(lines)))
    assert [message.split(": ")[0].rsplit(":", 1)[1] for message in found] == ["1", "3", "5"]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("no_folder", "dataset folder not found"),
        ("no_pages", "missing pages/ folder"),
        ("no_qa", "missing qa.jsonl"),
        ("empty_qa", "no questions"),
        ("bad_utf8", "not valid UTF-8"),
        ("blank_page", "page has no visible text"),
    ],
)
def test_broken_layouts(tmp_path: Path, make_dataset: DatasetFactory, setup: str, message: str) -> None:
    root = tmp_path / "absent"
    if setup == "no_pages":
        root.mkdir()
        (root / "qa.jsonl").write_text("")
    elif setup == "no_qa":
        root = make_dataset()
        (root / "qa.jsonl").unlink()
    elif setup == "empty_qa":
        root = make_dataset(qa_text="\n")
    elif setup == "bad_utf8":
        root = make_dataset()
        (root / "pages" / "veg.html").write_bytes(b"<p>roots caf\xe9</p>")
    elif setup == "blank_page":
        root = make_dataset()
        (root / "pages" / "empty.html").write_text("<html><script>x()</script></html>")
    assert any(message in found for found in messages(root)), messages(root)


def test_unused_page_is_a_warning(make_dataset: DatasetFactory) -> None:
    root = make_dataset(
        pages={
            "fruit": "<p>a berry</p><p>25% air</p><p>fruit.toml</p>",
            "veg": "<p>roots</p>",
            "x": "<p>x</p>",
        }
    )
    report = check_dataset(root)
    assert report.ok, report.errors
    assert [str(warning) for warning in report.warnings] == [
        f"{root / 'pages' / 'x.html'}: page has no questions"
    ]


def test_main_fails_with_messages(
    make_dataset: DatasetFactory, good_items: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    good_items[0]["answers"] = ["a melon"]
    assert main([str(make_dataset(items=good_items))]) == 1
    captured = capsys.readouterr()
    assert "error: " in captured.err and "is not a span of page 'fruit'" in captured.err
    assert "FAILED: 1 error(s)" in captured.err
    # The summary is still printed so the author can see what was checked.
    assert "traffic" in captured.out


def test_module_entry_point(make_dataset: DatasetFactory) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "flywheel_eval.check", str(make_dataset())],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "OK: 5 items" in result.stdout
