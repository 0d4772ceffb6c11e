"""Retrieval: HTML to text, passages, and choosing passages within a budget."""

import pytest

from flywheel_model.retrieval import Retriever, html_to_text, split_passages


def words(text: str) -> int:
    return len(text.split())


def pieces(text: str) -> int:
    """A token count in which a word takes a token per four characters, as long runs of text do."""
    return sum(-(-len(word) // 4) for word in text.split())


def test_html_to_text_drops_scripts_navigation_and_keeps_blocks() -> None:
    html = (
        "<html><head><title>FAQ</title><style>p{}</style></head><body><nav>Home | About</nav>"
        "<h1>General</h1><p>Python is a <b>programming</b> language.</p><script>var x;</script>"
        "<ul><li>one</li><li>two</li></ul><footer>(c) 2026</footer></body></html>"
    )
    text, title = html_to_text(html)
    assert title == "FAQ"
    assert text.splitlines() == ["General", "Python is a programming language.", "one", "two"]


def test_split_passages_respects_word_limit_and_splits_long_lines_on_sentences() -> None:
    long_line = " ".join(f"Sentence {i} has five words." for i in range(10))
    passages = split_passages("Title\n" + long_line, max_words=12)
    assert all(words(p) <= 12 for p in passages)
    assert " ".join(" ".join(passages).split()) == " ".join(("Title " + long_line).split())


def test_select_prefers_matching_passages_and_keeps_page_order() -> None:
    text = "\n".join(
        ["Cats sleep a lot.", "Python was released in 1991.", "Dogs bark.", "Python 3 came out in 2008."]
    )
    retriever = Retriever(words, max_words=5)
    chosen = retriever.select(text, "When was Python released?", token_budget=100)
    assert [p.text for p in chosen] == ["Python was released in 1991.", "Python 3 came out in 2008."]
    assert chosen[0].score > chosen[1].score > 0


def test_select_fits_the_budget() -> None:
    text = "\n".join(f"Python fact number {i} is here." for i in range(50))
    chosen = Retriever(words, max_words=6).select(text, "python fact", token_budget=20)
    assert sum(words(p.text) for p in chosen) <= 20
    assert chosen


def test_select_without_any_match_falls_back_to_the_start_of_the_page() -> None:
    text = "First line here.\nSecond line here.\nThird line."
    chosen = Retriever(words, max_words=3).select(text, "zebra?", token_budget=6)
    assert [p.index for p in chosen] == [0, 1]


def test_a_single_passage_over_budget_is_cut() -> None:
    text = " ".join(["word"] * 100)
    chosen = Retriever(words, max_words=200).select(text, "word", token_budget=10)
    assert len(chosen) == 1 and chosen[0].text == " ".join(["word"] * 10)


def test_a_passage_of_one_long_word_is_cut_to_the_budget() -> None:
    # A base64 blob, minified code or a long URL: one "word" of 30,000 characters was kept whole.
    text = "Kafka" + "x" * 30_000 + " Kafka is here"
    chosen = Retriever(pieces).select(text, "What is Kafka?", token_budget=50)
    assert len(chosen) == 1 and 0 < pieces(chosen[0].text) <= 50
    assert text.startswith(chosen[0].text)
    # Where whole words fit, the cut ends after one.
    text = "Kafka is here " + "x" * 30_000
    chosen = Retriever(pieces).select(text, "What is Kafka?", token_budget=50)
    assert [p.text for p in chosen] == ["Kafka is here"]
    assert Retriever(pieces).select(text, "What is Kafka?", token_budget=0) == []


@pytest.mark.parametrize("text", ["x", "é", "a b c d", "the of and", "!!! ???", "😀 😀"])
def test_a_page_without_an_indexable_word_is_read_in_page_order(text: str) -> None:
    chosen = Retriever(words).select(text, "What does the page say?", token_budget=100)
    assert [(p.index, p.text, p.score) for p in chosen] == [(0, text, 0.0)]


def test_passages_without_an_indexable_word_fill_the_budget_in_page_order() -> None:
    text = "the of and\n!!! ???\na b c d\n😀"
    chosen = Retriever(words, max_words=3).select(text, "the", token_budget=6)
    assert [p.text for p in chosen] == ["the of and", "!!! ???", "😀"]  # "a b c d" does not fit


def test_the_page_cache_is_bounded_by_bytes_not_only_by_pages() -> None:
    retriever = Retriever(words, max_words=50, cache_size=256, cache_bytes=2 * 1024 * 1024)
    pages = [
        f"Page {n}.\n" + "\n".join(f"Line {i} of page {n} is here." for i in range(4000)) for n in range(8)
    ]
    for page in pages:
        assert retriever.select(page, "line", token_budget=20)
        assert 0 < retriever.cached_bytes <= 2 * 1024 * 1024
    # A page larger than the whole cache is answered, and not kept.
    small = Retriever(words, max_words=50, cache_bytes=1024)
    assert small.select(pages[0], "line", token_budget=20) and small.cached_bytes == 0


def test_html_to_text_reads_whitespace_as_a_browser_renders_it() -> None:
    html = (
        "<body><p>The unittest module is modelled on Java and\n  Smalltalk testing frameworks.</p>"
        "<pre>def f(x):\n    return x</pre><p>one<br>two</p></body>"
    )
    text, _title = html_to_text(html)
    assert text.splitlines() == [
        "The unittest module is modelled on Java and Smalltalk testing frameworks.",
        "def f(x):",
        "return x",
        "one",
        "two",
    ]
