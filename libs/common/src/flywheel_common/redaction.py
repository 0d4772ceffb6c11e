"""Personal data in free text is replaced by placeholders before anything leaves the service."""

from __future__ import annotations

import ipaddress
import logging
import re
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import phonenumbers

log = logging.getLogger(__name__)

_EMAIL = re.compile(r"(?<![\w.%+-])[\w.%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
# 13-19 digits, optionally grouped by spaces or dashes; the Luhn check decides.
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_IPV4 = re.compile(
    r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\d.])"
)
_IPV6 = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{0,4}|(?:\d{1,3}\.){3}\d{1,3})(?![\w:])"
)
# Phone-like digit groups libphonenumber rejects (e.g. unassigned ranges): 9+ digits with separators.
_PHONE = re.compile(r"(?<![\w+])\+?\(?\d{1,4}\)?(?:[ .-]?\(?\d{2,4}\)?){2,5}(?![\w])")
# Regions whose numbering plans are tried on text written without a country code.
_PHONE_REGIONS = ("US", "GB", "DE", "FR", "IN")

# The Presidio recognizers that need no NLP model (patterns and checksums).
_PRESIDIO_RECOGNIZERS = (
    "CreditCardRecognizer",
    "CryptoRecognizer",
    "IbanRecognizer",
    "IpRecognizer",
    "PhoneRecognizer",
    "UsSsnRecognizer",
    "UsItinRecognizer",
)


def luhn_valid(digits: str) -> bool:
    """Whether a digit string passes the Luhn checksum of payment card numbers."""
    total = 0
    for i, char in enumerate(reversed(digits)):
        d = int(char)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


@dataclass
class Redacted:
    """Text with personal data replaced, and how many of each kind were found."""

    text: str
    found: Counter[str] = field(default_factory=Counter)


def _card(match: re.Match[str]) -> str | None:
    digits = re.sub(r"\D", "", match.group())
    return "[CARD]" if 13 <= len(digits) <= 19 and luhn_valid(digits) else None


def _ipv6(match: re.Match[str]) -> str | None:
    candidate = match.group()
    if candidate.count(":") < 2 or not re.search(r"[0-9A-Fa-f]", candidate):
        return None
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return None
    return "[IP]"


def _phone(match: re.Match[str]) -> str | None:
    # Nine digits at least, so dates and short numbers stay; libphonenumber found the valid ones.
    return "[PHONE]" if len(re.sub(r"\D", "", match.group())) >= 9 else None


def _presidio_analyzer() -> Any:
    """Presidio's AnalyzerEngine with model-free recognizers on a blank spaCy pipeline."""
    import spacy

    # Presidio imports torch and transformers when installed (for NER recognizers not used here),
    # which costs ~10 s of CPU at start in the workspace's shared environment: hide them meanwhile.
    hidden = [name for name in ("torch", "transformers") if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
        from presidio_analyzer import predefined_recognizers as recognizers
        from presidio_analyzer.nlp_engine import SpacyNlpEngine
    finally:
        for name in hidden:
            del sys.modules[name]

    class BlankSpacyEngine(SpacyNlpEngine):  # type: ignore[misc]
        """Tokenisation only: no statistical model is downloaded or needed."""

        def __init__(self) -> None:
            super().__init__(models=[{"lang_code": "en", "model_name": "blank"}])

        def load(self) -> None:
            self.nlp = {"en": spacy.blank("en")}  # type: ignore[assignment]

    engine = BlankSpacyEngine()
    engine.load()
    registry = RecognizerRegistry(supported_languages=["en"])
    for name in _PRESIDIO_RECOGNIZERS:
        registry.add_recognizer(getattr(recognizers, name)())
    return AnalyzerEngine(registry=registry, nlp_engine=engine, supported_languages=["en"])


class Redactor:
    """Replaces emails, phone numbers, payment cards (Luhn) and IP addresses, then what Presidio finds.

    The built-in rules are fast and always on; Presidio (a maintained PII library) adds IBANs,
    crypto wallets, US SSN/ITIN and its own phone and card rules. Text without a digit skips it.
    """

    def __init__(self, *, presidio: bool = True, score_threshold: float = 0.3) -> None:
        self._rules: list[tuple[str, re.Pattern[str], Callable[[re.Match[str]], str | None]]] = [
            ("EMAIL", _EMAIL, lambda m: "[EMAIL]"),
            ("CARD", _CARD, _card),
            ("IP", _IPV4, lambda m: "[IP]"),
            ("IP", _IPV6, _ipv6),
        ]
        self._threshold = score_threshold
        self._analyzer = _presidio_analyzer() if presidio else None

    @property
    def uses_presidio(self) -> bool:
        """Whether Presidio runs after the built-in rules."""
        return self._analyzer is not None

    def redact(self, text: str) -> Redacted:
        """The text with every piece of personal data found replaced by `[KIND]`."""
        found: Counter[str] = Counter()
        for kind, pattern, replace in self._rules:
            text = self._sub(text, kind, pattern, replace, found)
        text = self._phones(text, found)
        text = self._sub(text, "PHONE", _PHONE, _phone, found)
        if self._analyzer is not None and any(c.isdigit() for c in text):
            text = self._presidio(text, found)
        return Redacted(text, found)

    @staticmethod
    def _sub(
        text: str,
        kind: str,
        pattern: re.Pattern[str],
        replace: Callable[[re.Match[str]], str | None],
        found: Counter[str],
    ) -> str:
        def substitute(match: re.Match[str]) -> str:
            replacement = replace(match)
            if replacement is None:
                return match.group()
            found[kind] += 1
            return replacement

        return pattern.sub(substitute, text)

    @staticmethod
    def _phones(text: str, found: Counter[str]) -> str:
        spans: list[tuple[int, int]] = []
        for region in _PHONE_REGIONS:
            for match in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.VALID):
                spans.append((match.start, match.end))
        return _replace_spans(text, spans, "PHONE", found)

    def _presidio(self, text: str, found: Counter[str]) -> str:
        assert self._analyzer is not None
        results = self._analyzer.analyze(text=text, language="en", score_threshold=self._threshold)
        kinds = {(r.start, r.end): r.entity_type for r in results}
        spans = sorted(kinds)
        out, last = [], 0
        for start, end in _merge(spans):
            kind = kinds.get((start, end), "PII")
            out += [text[last:start], f"[{_SHORT.get(kind, kind)}]"]
            found[_SHORT.get(kind, kind)] += 1
            last = end
        return "".join([*out, text[last:]])


_SHORT = {"CREDIT_CARD": "CARD", "IP_ADDRESS": "IP", "PHONE_NUMBER": "PHONE", "IBAN_CODE": "IBAN"}


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start < merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def _replace_spans(text: str, spans: list[tuple[int, int]], kind: str, found: Counter[str]) -> str:
    out, last = [], 0
    for start, end in _merge(spans):
        out += [text[last:start], f"[{kind}]"]
        found[kind] += 1
        last = end
    return "".join([*out, text[last:]])
