"""Personal data is redacted from free text; ordinary text is left alone."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from flywheel_common.redaction import KINDS, Redactor, iban_valid, luhn_valid, redact_interaction, redact_url
from flywheel_proto.flywheel.events.v1 import events_pb2

# Each case: the text, the kind it holds (NONE: nothing to redact) and the values that must not
# survive. bench/redaction.py prints the recall per kind over the same corpus.
CORPUS = [
    json.loads(line)
    for line in (Path(__file__).parent / "data" / "pii_corpus.jsonl").read_text().splitlines()
]


@pytest.fixture(scope="module")
def redactor() -> Redactor:
    return Redactor(presidio=False)


@pytest.fixture(scope="module")
def presidio() -> Redactor:
    return Redactor(presidio=True)


def test_luhn() -> None:
    assert luhn_valid("4111111111111111")
    assert luhn_valid("79927398713")
    assert not luhn_valid("4111111111111112")
    assert luhn_valid("\uff14\uff11" + "\uff11" * 14)  # full-width digits, as Japanese input methods type
    assert not luhn_valid("411111111111111\u00b2")  # a superscript two is a digit to isdigit(), not to int()


def test_iban_check_digits() -> None:
    assert iban_valid("GB82 WEST 1234 5698 7654 32")
    assert iban_valid("DE89370400440532013000")
    assert not iban_valid("GB82 WEST 1234 5698 7654 33")
    assert not iban_valid("GB82WEST")
    assert not iban_valid("\u212a\u212a00" + "\u212a" * 12)  # the Kelvin sign upper-cases to itself
    assert not iban_valid("GB82 WEST 1234 5698 7654 3\u0130")


# Letters that (?i) matches as [A-Z] in Unicode mode but that are no base-36 digit: the Kelvin sign
# (U+212A) and a dotted capital I (U+0130). They once raised ValueError from the IBAN check.
@pytest.mark.parametrize("with_presidio", [False, True], ids=["built-in", "with-presidio"])
@pytest.mark.parametrize(
    "look_alike",
    [
        "ref \u212a\u212a12 " + " ".join(["\u212a" * 4] * 3),
        "ref \u0130\u0130121234567812345678",
        "\u212a\u212a00" + "\u212a" * 12,
    ],
    ids=["kelvin-grouped", "dotted-i", "kelvin-compact"],
)
def test_iban_look_alikes_in_other_letters_are_kept_beside_a_redacted_iban(
    look_alike: str, with_presidio: bool, redactor: Redactor, presidio: Redactor
) -> None:
    result = (presidio if with_presidio else redactor).redact(
        f"{look_alike}, iban GB82 WEST 1234 5698 7654 32."
    )
    assert result.text == f"{look_alike}, iban [IBAN]."
    assert result.found == {"IBAN": 1}


def test_the_corpus_covers_every_kind_the_issue_names() -> None:
    kinds = {case["kind"] for case in CORPUS}
    assert len([c for c in CORPUS if c["kind"] != "NONE"]) >= 40
    assert kinds >= {
        "EMAIL",
        "PHONE",
        "CARD",
        "IBAN",
        "SSN",
        "NINO",
        "DOB",
        "ADDRESS",
        "IP",
        "SECRET",
        "NAME",
    }
    assert kinds - {"NONE"} <= set(KINDS)


@pytest.mark.parametrize("with_presidio", [False, True], ids=["built-in", "with-presidio"])
@pytest.mark.parametrize("case", CORPUS, ids=lambda c: f"{c['kind']}:{c['text'][:30]}")
def test_corpus(case: dict[str, Any], with_presidio: bool, redactor: Redactor, presidio: Redactor) -> None:
    result = (presidio if with_presidio else redactor).redact(case["text"])
    if case["kind"] == "NONE":
        assert result.text == case["text"]
        assert not result.found
        return
    assert f"[{case['kind']}]" in result.text, result.text
    assert result.found[case["kind"]] >= 1
    for value in case["values"]:
        assert value not in result.text, f"{value!r} survived: {result.text}"


@pytest.mark.parametrize(
    "text",
    [
        "a at " * 1600,
        "a dot " * 1400,
        "a (at) b " * 900,
        "My name is " + "Aa " * 2600,
        "12 " + "Abc " * 2000,
        "1-" * 4000,
        ":" * 8000,
        "a." * 4000 + "@",
        "eyJ" + "a" * 7990,
        "password: " + "x" * 7990,
        "born on " + "1/" * 3900,
        "my name is " + "ab " * 2600,
        "\nname: ab cd" * 1000,
        "bearer " + "a" * 7990,
        "token: " + "a" * 7990,
        "a.b at " * 1200,
        "account number " + "1 " * 3990,
        "sort code " + "12-" * 2600,
        "write to " + "a at " * 1600,
        "Basic " + "QUFB" * 2000,
        "x://" + "a:" * 4000,
        'password: "' + "a " * 3990,
        "a_password=" * 730,
    ],
    ids=lambda t: repr(t[:12]),
)
def test_no_pattern_backtracks_on_hostile_input(redactor: Redactor, text: str) -> None:
    started = time.perf_counter()
    redactor.redact(text[:8000])
    assert time.perf_counter() - started < 3.0  # a backtracking pattern takes minutes


@pytest.mark.parametrize("path", [";a=" * 2600, "a-" * 4000, "a1" * 4000, "%3F" * 2600], ids=lambda p: p[:6])
def test_no_url_pattern_backtracks_on_hostile_input(redactor: Redactor, path: str) -> None:
    started = time.perf_counter()
    redact_url(f"https://x.example/{path}?{'token=a&' * 500}", redactor, keep_query=True)
    assert time.perf_counter() - started < 3.0


@pytest.mark.parametrize(
    ("text", "expected", "kind"),
    [
        ("mail me at jane.doe+news@example.co.uk please", "mail me at [EMAIL] please", "EMAIL"),
        ("card 4111 1111 1111 1111 thanks", "card [CARD] thanks", "CARD"),
        ("card 4111-1111-1111-1111.", "card [CARD].", "CARD"),
        ("amex 378282246310005", "amex [CARD]", "CARD"),
        ("from 192.168.1.20 today", "from [IP] today", "IP"),
        ("at 192.168.1.20:8080 today", "at [IP] today", "IP"),
        ("SSN 536-22-8726 please", "SSN [SSN] please", "SSN"),
        ("iban GB82 WEST 1234 5698 7654 32.", "iban [IBAN].", "IBAN"),
        ("v6 2001:db8::8a2e:370:7334 here", "v6 [IP] here", "IP"),
        ("call +1 415-555-0132 now", "call [PHONE] now", "PHONE"),
        ("call (212) 555-0199 now", "call [PHONE] now", "PHONE"),
        ("ring 020 7946 0958 now", "ring [PHONE] now", "PHONE"),
        ("ring +44 20 7946 0958 now", "ring [PHONE] now", "PHONE"),
        ("write to maria at example.org please", "write to [EMAIL] please", "EMAIL"),
        ("Authorization: Basic dXNlcjpwYXNz", "Authorization: Basic [SECRET]", "SECRET"),
        (
            "psql postgresql://app:s3cret@db.internal/prod",
            "psql postgresql://[SECRET]@db.internal/prod",
            "SECRET",
        ),
        ('{"password": "correct horse"}', '{"password": "[SECRET]"}', "SECRET"),
    ],
)
def test_redacts(redactor: Redactor, text: str, expected: str, kind: str) -> None:
    result = redactor.redact(text)
    assert result.text == expected
    assert result.found[kind] == 1


@pytest.mark.parametrize(
    "text",
    [
        "The answer says the tower is 330 metres tall, but it is 324.",
        "Version 1.2.3 was released at 12:30 on 2024-05-01.",
        "It costs 1999 dollars for 3 items.",
        "Nothing personal here at all.",
    ],
)
def test_leaves_ordinary_text(redactor: Redactor, text: str) -> None:
    result = redactor.redact(text)
    assert result.text == text
    assert not result.found


def test_a_non_luhn_long_number_is_not_called_a_card(redactor: Redactor) -> None:
    assert "[CARD]" not in redactor.redact("order 4111 1111 1111 1112").text


def test_many_kinds_in_one_text(redactor: Redactor) -> None:
    text = "I am bob@example.org, 4111111111111111, 10.0.0.1, +1 (415) 555-0132."
    result = redactor.redact(text)
    assert result.text == "I am [EMAIL], [CARD], [IP], [PHONE]."
    assert set(result.found) == {"EMAIL", "CARD", "IP", "PHONE"}


def test_presidio_adds_what_it_detects(presidio: Redactor) -> None:
    assert presidio.uses_presidio
    result = presidio.redact("wire to DE89370400440532013000 or btc 1BoatSLRHtKNngkdXEeobR76b53LETtpyT")
    assert "DE89370400440532013000" not in result.text
    assert "1BoatSLRHtKNngkdXEeobR76b53LETtpyT" not in result.text
    assert result.found["IBAN"] == 1
    assert result.found["CRYPTO"] == 1
    # And it keeps the built-in rules.
    assert presidio.redact("jane@example.com 4111111111111111").text == "[EMAIL] [CARD]"


@pytest.mark.parametrize(
    ("url", "keep_query", "expected"),
    [
        ("https://example.org/a/b?token=abc&x=1#frag", False, "https://example.org/a/b"),
        ("https://user:pw@example.org:8443/p", False, "https://example.org:8443/p"),
        ("https://example.org/users/jane@example.com/", False, "https://example.org/users/[EMAIL]/"),
        (
            "https://example.org/a?email=jane%40example.com&page=2",
            True,
            "https://example.org/a?email=[EMAIL]&page=2",
        ),
        ("http://[2001:db8::1]:80/x?q", False, "http://[2001:db8::1]:80/x"),
        ("http://example.org:99999/bad-port", False, ""),
        (
            "https://x.example/cb?code=4/0AXabc&state=xyz#access_token=ya29.abc&id_token=abc",
            True,
            "https://x.example/cb?code=[SECRET]&state=xyz",
        ),
        (
            "https://x.example/dl?token=9f8e7d6c5b4a&sig=AbCdEf123&X-Amz-Security-Token=x",
            True,
            "https://x.example/dl?token=[SECRET]&sig=[SECRET]&X-Amz-Security-Token=[SECRET]",
        ),
        ("https://x.example/a?email=a@b.com#access_token=zzz", True, "https://x.example/a?email=[EMAIL]"),
        # The query is encoded again: a decoded `%26` must not become a parameter of its own.
        ("https://x.example/a?q=%26token%3Dabc", True, "https://x.example/a?q=%26token%3Dabc"),
        (
            "https://x.example/account/orders/reset/9f8e7d6c5b4a3928",
            False,
            "https://x.example/account/orders/reset/[SECRET]",
        ),
        (
            "https://x.example/u/550e8400-e29b-41d4-a716-446655440000/x",
            False,
            "https://x.example/u/[SECRET]/x",
        ),
        ("https://x.example/a;jsessionid=ABCDEF0123456789", False, "https://x.example/a;jsessionid=[SECRET]"),
        # Decoding must not turn path text into a query: the token goes and `?` stays encoded.
        ("https://x.example/p%3Ftoken%3Dsecret123456/x", False, "https://x.example/p%3Ftoken=[SECRET]"),
    ],
)
def test_urls_lose_credentials_query_and_fragment(
    redactor: Redactor, url: str, keep_query: bool, expected: str
) -> None:
    assert redact_url(url, redactor, keep_query=keep_query)[0] == expected


@pytest.mark.parametrize(
    "url",
    [
        "https://docs.python.org/3/library/os.path.html",
        "https://en.wikipedia.org/wiki/Python_(programming_language)",
        "https://blog.example/2024/05/01/release-notes/",
        "https://x.example/questions/12345678/how-to-read-a-file-in-python3",
        "https://www.gnu.org/software/bash/manual/html_node/Bash-Conditional-Expressions.html",
        "https://x.example/a%2520b",
    ],
)
def test_ordinary_url_paths_are_kept(redactor: Redactor, url: str) -> None:
    assert redact_url(url, redactor) == (url, {})


def test_a_cued_name_is_removed_from_the_url_too(redactor: Redactor) -> None:
    event = events_pb2.Interaction(
        question="My name is John Smith, where are my orders?",
        page_url="https://x.example/account/John-Smith/orders?user=John+Smith&page=2",
    )
    redact_interaction(event, redactor, keep_url_query=True)
    assert event.page_url == "https://x.example/account/[NAME]-[NAME]/orders?user=[NAME]&page=2"


def test_cued_lowercase_names_pins_tokens_and_accounts_are_removed_where_repeated(
    redactor: Redactor,
) -> None:
    event = events_pb2.Interaction(
        question="my name is jane doe. My pin: 4821, token: ab12cd34ef, account number 87654321. Safe?",
        answer="jane doe, never share 4821, ab12cd34ef or 87654321.",
    )
    redact_interaction(event, redactor)
    assert event.answer == "[NAME], never share [SECRET], [SECRET] or [ACCOUNT]."


def test_an_interaction_is_redacted_field_by_field_and_cued_values_everywhere(redactor: Redactor) -> None:
    event = events_pb2.Interaction(
        query_id="q1",
        page_url="https://example.org/p?session=abc",
        page_title="Notes by Dr. Ada Byron",
        question="My name is John Smith, my password: hunter2; born on 1/2/1980. What is my name?",
        answer="Your name is John Smith; Smith was born 1/2/1980, password hunter2",
        passages=["Write to ada@example.org.", "Ada Byron lives at 12 Oak Lane, Oxford OX1 2JD."],
        model_version="v1",
    )
    found = redact_interaction(event, redactor)
    raw = event.SerializeToString().decode(errors="replace")
    for value in (
        "John",
        "Smith",
        "hunter2",
        "1/2/1980",
        "session=abc",
        "ada@example.org",
        "Byron",
        "Oak Lane",
        "OX1",
    ):
        assert value not in raw, value
    assert event.answer == "Your name is [NAME]; [NAME] was born [DOB], password [SECRET]"
    assert (event.query_id, event.model_version) == ("q1", "v1")
    assert found["NAME"] >= 4 and found["EMAIL"] == 1 and found["ADDRESS"] == 1
