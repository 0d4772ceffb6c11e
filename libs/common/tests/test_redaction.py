"""Personal data is redacted from free text; ordinary text is left alone."""

from __future__ import annotations

import pytest

from flywheel_common.redaction import Redactor, luhn_valid


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


@pytest.mark.parametrize(
    ("text", "expected", "kind"),
    [
        ("mail me at jane.doe+news@example.co.uk please", "mail me at [EMAIL] please", "EMAIL"),
        ("card 4111 1111 1111 1111 thanks", "card [CARD] thanks", "CARD"),
        ("card 4111-1111-1111-1111.", "card [CARD].", "CARD"),
        ("amex 378282246310005", "amex [CARD]", "CARD"),
        ("from 192.168.1.20 today", "from [IP] today", "IP"),
        ("v6 2001:db8::8a2e:370:7334 here", "v6 [IP] here", "IP"),
        ("call +1 415-555-0132 now", "call [PHONE] now", "PHONE"),
        ("call (212) 555-0199 now", "call [PHONE] now", "PHONE"),
        ("ring 020 7946 0958 now", "ring [PHONE] now", "PHONE"),
        ("ring +44 20 7946 0958 now", "ring [PHONE] now", "PHONE"),
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
