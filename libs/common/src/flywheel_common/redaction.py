"""Personal data in free text is replaced by placeholders before anything leaves the service."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import re
import sys
import urllib.parse
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import phonenumbers

from flywheel_proto.flywheel.events.v1 import events_pb2

log = logging.getLogger(__name__)

# Every pattern below is linear on hostile input: no nested unbounded repetition
# (libs/common/tests/test_redaction.py times them on 8,000 characters built to backtrack).

# Secrets first: they hold digits and dashes the later rules would cut into pieces.
_SECRET_TOKENS = re.compile(
    r"-----BEGIN [A-Z ]{0,40}PRIVATE KEY-----[\s\S]{0,10000}?-----END [A-Z ]{0,40}PRIVATE KEY-----"
    r"|\b(?:sk|rk|pk)[-_](?:proj-|live_|test_|ant-)?[A-Za-z0-9_-]{16,}"  # OpenAI, Stripe, Anthropic
    r"|\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}\b"  # AWS access key ids
    r"|\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"  # JWT (base64url JSON header)
    r"|\bgh[pousr]_[A-Za-z0-9]{30,}|\bgithub_pat_[A-Za-z0-9_]{22,}"  # GitHub
    r"|\bxox[abposr]-[A-Za-z0-9-]{10,}"  # Slack
    r"|\bAIza[0-9A-Za-z_-]{35}"  # Google API keys
    r"|\bglpat-[A-Za-z0-9_-]{20,}"  # GitLab
    r"|\b(?:pypi-AgE[A-Za-z0-9_-]{50,}"  # PyPI (a macaroon whose first field names pypi.org)
    r"|hf_[A-Za-z0-9]{30,}"  # Hugging Face
    r"|npm_[A-Za-z0-9]{36}\b"  # npm
    r"|SG\.[A-Za-z0-9_-]{22}\.[A-Za-z0-9_-]{43})"  # SendGrid
)
# `scheme://user:password@host`: the user and password go, the scheme and host stay.
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]{0,30}://)([^\s/?#@:\[\]]{0,100}:[^\s/?#@]{1,200})@")
# `Basic <base64>` (HTTP Basic authentication): only what decodes to printable `user:password` counts,
# so "Basic Usage" stays whatever the words.
_BASIC_CREDENTIALS = re.compile(r"\b((?i:basic)\s{1,3})([A-Za-z0-9+/]{4,400}={0,2})(?![\w+/=-])")
# The value after a secret's label: up to 200 characters, not ending in punctuation.
_SECRET_VALUE = r"[^\s\"',;]{3,199}[^\s\"',;.!?:)\]]"
# A quoted value may hold spaces ("correct horse battery staple"), not the punctuation of code around it.
_QUOTED_SECRET = r"(?<=[\"'])[^\s\"'(),;=<>{}\[\]][^\"'\n(),;=<>{}\[\]]{1,98}[^\s\"'(),;=<>{}\[\]]"
# Not a value: a placeholder an earlier rule wrote (`API_KEY=[SECRET]`), or an empty one (`"password": null`).
_NOT_A_SECRET = r"(?!(?-i:\[[A-Z]{2,8}\])|(?:null|none|true|false)(?![\w-]))"
# `password: hunter2`, `api_key=...`, `pw=...`, `DB_PASSWORD=...`, `"password": "..."`: the label stays,
# the value goes. A label may end a variable name (`AWS_SECRET_ACCESS_KEY`), not a word (`bypass`).
_SECRET_ASSIGNMENT = re.compile(
    r"(?i)(?<![^\W_])(pass(?:word|wd|phrase|code)?|pwd|pw|secret(?:[ _-]?key)?|api[ _-]?key|access[ _-]?key|"
    r"(?:access|auth|bearer|refresh)[ _-]?token|client[ _-]?secret)"
    rf"([\"']?\s*[:=]\s*|\s+is\s+)([\"']?){_NOT_A_SECRET}({_QUOTED_SECRET}|{_SECRET_VALUE})\3"
)
# `token: ...` and `Bearer ...` also start ordinary text ("the token: a string", "bearer tokens"),
# so only a value holding a digit counts.
_TOKEN_ASSIGNMENT = re.compile(
    r"(?i)\b((?:[a-z]{1,20}[_-])?token(?:\s{0,3}[:=]\s{0,3}|\s{1,3}is\s{1,3})[\"']?|bearer\s{1,3})"
    rf"((?=[^\s\"',;]{{0,198}}\d){_SECRET_VALUE})"
)
# What may stand between a label and its value: a colon, an equals sign, "is" or nothing.
_LABEL_END = r"\s{0,3}(?:[:=]\s{0,3}|is\s{1,3})?"
# A PIN is 4-8 digits right after its label ("PIN 1234"); "pin the version" has none.
_PIN = re.compile(rf"(?i)\b(pin(?:\s{{0,3}}(?:code|number))?{_LABEL_END})(\d{{4,8}})\b(?![.,]\d)")
_EMAIL = re.compile(r"(?<![\w.%+-])[\w.%+-]{1,64}@[\w-]{1,63}(?:\.[\w-]{1,63}){0,8}\.[^\W\d_]{2,24}\b")
# "john dot smith at gmail dot com", "jane(at)example(dot)com", "bob [at] example [dot] org".
_WORD = r"[\w+-]{1,64}"
_DOT = r"(?:\s{0,3}[\(\[\{<]\s{0,2}dot\s{0,2}[\)\]\}>]\s{0,3}|\s{1,3}dot\s{1,3})"
_BRACKET_AT = r"\s{0,3}[\(\[\{<]\s{0,2}at\s{0,2}[\)\]\}>]\s{0,3}"
_OBFUSCATED_EMAIL = re.compile(
    rf"(?i)(?<![\w.+-]){_WORD}(?:(?:{_DOT}|\.){_WORD}){{0,4}}"
    rf"(?:{_BRACKET_AT}{_WORD}(?:(?:{_DOT}|\.){_WORD}){{1,5}}"
    rf"|\s{{1,3}}at\s{{1,3}}{_WORD}(?:(?:{_DOT}|\.){_WORD}){{0,4}}{_DOT}[a-z]{{2,24}})\b"
    # "john.smith at gmail.com": with a spelled at and a literal dot the name must hold a dot too,
    # or "look at python.org" would be an address.
    rf"|(?<![\w.+-]){_WORD}(?:(?:{_DOT}|\.){_WORD}){{1,4}}\s{{1,3}}at\s{{1,3}}{_WORD}(?:\.{_WORD}){{0,4}}"
    rf"\.[a-z]{{2,24}}\b"
)
# "john at gmail.com": a name without a dot before a spelled at is an address only where the domain is
# a mail provider's, or where a cue says an address follows ("write to maria at example.org"); "look at
# docs.python.org", "arrive at 10.30" and "the answer is at page.html" have neither.
_MAIL_PROVIDER = (
    r"(?:gmail|googlemail|yahoo|ymail|hotmail|outlook|aol|msn|icloud|protonmail|proton|gmx|yandex|zoho|"
    r"fastmail|tutanota|posteo|hushmail|qq|163|126|naver|rediffmail|libero|laposte|wanadoo|t-online|"
    r"btinternet|comcast|sbcglobal)(?:\.[a-z]{2,3}){1,2}"
    r"|(?:web\.de|mail\.ru|mail\.com|me\.com|mac\.com|live\.com|pm\.me|hey\.com)"
)
_EMAIL_CUE = (
    r"(?:e-?mail(?:\s{1,3}address)?|mail\s{1,3}me|mailto|write\s{1,3}(?:to|me)|contact|reach\s{1,3}me|"
    r"send\s{1,3}(?:it\s{1,3})?to)"
)
# Words that stand before " at " in sentences ("look at", "sign in at", "is at"), never taken for a name;
# nor is a word after a pronoun ("I work at", "we met at"): that is a verb.
_NOT_A_MAILBOX = (
    r"(?:a|an|the|is|are|was|were|be|been|am|it|its|this|that|here|there|me|us|you|him|her|them|we|they|"
    r"in|on|up|out|off|back|now|only|also|just|still|not|and|or|but|look|looked|looking|looks|sign|signed|"
    r"log|logged|go|went|work|works|worked|job|available|hosted|located|found|online|page|site|website|"
    r"account|inbox|mail|email|e-mail|address)\b"
)
_AFTER_PRONOUN = r"(?<!\bi )(?<!\bwe )(?<!\bhe )(?<!\bshe )(?<!\byou )(?<!\bthey )"
# Last labels that name a file rather than a domain ("page.html").
_FILE_SUFFIX = (
    r"(?:html?|php|aspx?|py|txt|md|rst|pdf|json|xml|ya?ml|toml|ini|cfg|csv|zip|gz|tar|exe|png|jpe?g|gif|svg|"
    r"js|css|sh)\b"
)
# Cue first: its first letter lets the engine skip most positions without trying the words.
_CUED_AT_EMAIL = re.compile(
    rf"(?i)(?=[cemrsw])(\b{_EMAIL_CUE}(?:\s{{0,3}}[:,]|\s{{1,3}}(?:is|me|us|at|to|via|on)\b){{0,3}}\s{{1,3}})"
    rf"(?!{_NOT_A_MAILBOX}){_WORD}\s{{1,3}}at\s{{1,3}}{_WORD}(?:\.{_WORD}){{0,4}}\.(?!{_FILE_SUFFIX})[a-z]{{2,24}}\b"
)
# The lookahead for " at " first: the word lists are tried only where an address may follow.
_PROVIDER_AT_EMAIL = re.compile(
    rf"(?i)(?<![\w.+-])(?=[\w+-]{{1,64}}\s{{1,3}}at\s){_AFTER_PRONOUN}(?!{_NOT_A_MAILBOX})"
    rf"{_WORD}\s{{1,3}}at\s{{1,3}}(?:{_MAIL_PROVIDER})\b"
)
# UK bank details after their label: an account number and a sort code.
_ACCOUNT_NUMBER = re.compile(
    rf"(?i)\b((?:account|acct)\.?\s{{1,3}}(?:number|no\.?|#){_LABEL_END})(\d(?:[ -]?\d){{5,16}})\b"
)
_SORT_CODE = re.compile(rf"(?i)\b(sort\s{{0,3}}code{_LABEL_END})(\d{{2}}([- ]?)\d{{2}}\3\d{{2}})\b")
# An IBAN, grouped by spaces or not; the ISO 7064 mod-97 check decides. ASCII only: in Unicode mode
# (?i) lets [A-Z] match the Kelvin sign (U+212A) and "İ" (U+0130), which are no base-36 digits.
_IBAN = re.compile(r"(?ai)\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b")
# 13-19 digits, optionally grouped by spaces or dashes; the Luhn check decides.
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
# US SSN: formatted as the SSA writes it, never an impossible area, group or serial; nine bare
# digits only next to words that say what they are.
_SSN = re.compile(
    r"\b(?!000|666|9\d\d)\d{3}([- ])(?!00)\d{2}\1(?!0000)\d{4}\b"
    r"|(?i:(?<=ssn)|(?<=ssn:)|(?<=ssn )|(?<=ssn: )|(?<=security number )|(?<=security no\. ))"
    r"(?!000|666|9\d\d)\d{3}(?!00)\d{2}(?!0000)\d{4}\b"
)
# UK National Insurance number: two prefix letters (the disallowed ones excluded), six digits, A-D.
_NINO = re.compile(
    r"(?i)\b(?!BG|GB|NK|KN|TN|NT|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b"
)
_MONTH = r"(?:jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]{0,6}\.?"
_DATE = (
    rf"(?:\d{{1,4}}[./-]\d{{1,2}}[./-]\d{{2,4}}"
    rf"|\d{{1,2}}(?:st|nd|rd|th)?\s{{1,3}}(?:of\s{{1,3}})?{_MONTH},?\s{{1,3}}\d{{4}}"
    rf"|{_MONTH}\s{{1,3}}\d{{1,2}}(?:st|nd|rd|th)?,?\s{{1,3}}\d{{4}})"
)
# A date is personal when it says it is a birth date; other dates (releases, events) stay.
_DOB = re.compile(
    rf"(?i)(\b(?:born(?:\s{{1,3}}on)?|d\.?o\.?b\.?|date\s{{1,3}}of\s{{1,3}}birth|birth\s{{0,3}}date|"
    rf"birthday(?:\s{{1,3}}is)?)\b[\s:,-]{{0,5}}(?:is\s{{1,3}}|was\s{{1,3}}|on\s{{1,3}})?(?:the\s{{1,3}})?)({_DATE})"
)
_STREET_TYPES = (
    r"(?:street|st|road|rd|avenue|ave|lane|ln|drive|dr|boulevard|blvd|way|court|ct|place|pl|terrace|"
    r"close|crescent|square|sq|parkway|pkwy|highway|hwy|row|gardens|grove|mews|circle|cir|walk)"
)
_UK_POSTCODE = r"[A-Z]{1,2}\d[A-Z\d]? ?\d[A-Z]{2}"
_US_ZIP = r"(?:[A-Z]{2} )?\d{5}(?:-\d{4})?"
_CAPWORD = r"[A-ZÀ-Þ][\wÀ-ÿ'\u2019.-]{0,30}"
# A word of a town's name (capitalised, no digits), so a postcode after it is left to the postcode rule.
_TOWNWORD = r"[A-ZÀ-Þ][a-zß-ÿ'\u2019.-]{1,30}"
# A street address: house number, up to four capitalised words, a street type; then optionally a
# flat, up to three ", Town" parts and a postcode or ZIP.
_ADDRESS = re.compile(
    rf"\b\d{{1,5}}[A-Za-z]?(?:[-/]\d{{1,5}})?,?\s{{1,3}}(?:{_CAPWORD}\s{{1,3}}){{0,4}}"
    rf"(?i:{_STREET_TYPES})\b\.?"
    rf"(?:,?\s{{1,3}}(?i:apt|apartment|suite|unit|flat)\.?\s{{0,3}}[\w-]{{1,8}})?"
    rf"(?:,\s{{0,3}}{_TOWNWORD}(?:\s{{1,3}}{_TOWNWORD}){{0,2}}){{0,3}}"
    rf"(?:,?\s{{1,3}}(?:{_UK_POSTCODE}|{_US_ZIP}))?"
    # Streets named first, number after ("Hauptstraße 5, 10115 Berlin").
    rf"|\b[A-ZÄÖÜ][\wäöüß-]{{0,30}}(?:straße|strasse|str\.|weg|platz|gasse|allee|gracht|laan|"
    rf"rue\s{{1,3}}[\w'\u2019-]{{2,30}})\s{{1,3}}\d{{1,4}}[a-z]?\b(?:,\s{{0,3}}\d{{4,5}}\s{{1,3}}{_CAPWORD})?"
)
# A postcode or "Town, ST 12345" without a street still places a person.
_POSTCODE = re.compile(
    rf"\b{_UK_POSTCODE}\b|\b{_CAPWORD}(?:\s{{1,3}}{_CAPWORD}){{0,2}},\s{{0,3}}[A-Z]{{2}}\s{{1,3}}\d{{5}}(?:-\d{{4}})?\b"
)
# A UK postcode or US ZIP after its label may be written in lowercase ("my postcode is sw1a 2aa").
_CUED_POSTCODE = re.compile(
    rf"(?i)\b((?:post\s{{0,3}}code|postal\s{{1,3}}code|zip(?:\s{{0,3}}code)?){_LABEL_END})"
    rf"({_UK_POSTCODE}|\d{{5}}(?:-\d{{4}})?)\b"
)
_PORT = r"(?::\d{1,5}\b)?"
_IPV4 = re.compile(
    r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\d.])"
    + _PORT
)
# Not after a name or bracket: `s[::2]` and `s[1::2]` are slices.
_IPV6 = re.compile(
    r"\[(?<![\w)\]]\[)(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}\]"
    + _PORT
    + r"|(?<![\w:.\[])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{0,4}|(?:\d{1,3}\.){3}\d{1,3})(?![\w:])"
)
# Phone-like digit groups libphonenumber rejects (e.g. unassigned ranges): 9+ digits with separators.
_PHONE = re.compile(r"(?<![\w+])\+?\(?\d{1,4}\)?(?:[ .-]?\(?\d{2,4}\)?){2,5}(?![\w])")
# Regions whose numbering plans are tried on text written without a country code.
_PHONE_REGIONS = ("US", "GB", "DE", "FR", "IN")
# Failed candidates libphonenumber may try per region and text (found numbers do not count).
_PHONE_MAX_TRIES = 100
# Names, where the text says that a name follows (no named-entity model: see docs/security.md).
_NAME = rf"{_CAPWORD}(?:[ -](?:(?:van|von|de|da|del|der|di|le|la|bin|al)\s)?{_CAPWORD}){{0,3}}"
# After "my name is" a name may be in any case ("my name is john smith"); words that commonly follow
# the cue instead ("my name is not on the list") end it. Names in capitals these words stop ("My name
# is An Nguyen") are still found by the capitalised rule after it.
_NOT_A_NAME = (
    r"(?i:a|an|the|and|or|but|not|no|is|was|in|on|at|of|to|for|from|with|by|as|so|if|it|this|that|"
    r"here|there|also|still|now|just|please|spelled|spelt|wrong|missing|listed|shown|written|i|my)\b"
)
_ANYCASE_WORD = rf"(?!{_NOT_A_NAME})[^\W\d_](?:[^\W\d_]|['\u2019.]){{0,30}}"
_ANYCASE_PART = rf"{_ANYCASE_WORD}(?:-{_ANYCASE_WORD})?"
_ANYCASE_NEXT = rf"(?:[ \t]{{1,3}}{_ANYCASE_PART})"
_PERSON = re.compile(
    rf"(?i:\bmy\s{{1,3}}name(?:\s{{1,3}}is|'s|\u2019s))[ \t]{{1,3}}({_ANYCASE_PART}{_ANYCASE_NEXT}{{0,3}})"
    # A "Name:" label too, when it starts a line and two to four words fill the rest of it: one word
    # is more often a package or a YAML key's value ("Name: pytest", "name: nginx").
    rf"|(?<![^\n])[ \t]{{0,3}}(?i:(?:full\s|first\s|last\s|sur)?name)[ \t]{{0,2}}:[ \t]{{1,3}}"
    rf"({_ANYCASE_PART}{_ANYCASE_NEXT}{{1,3}})(?=[ \t]{{0,3}}(?:[\n,;.]|$))"
    rf"|(?:(?i:\bmy\s{{1,3}}name(?:\s{{1,3}}is|'s|\u2019s)|\bcall\s{{1,3}}me|\bname\s{{0,2}}:|"
    rf"\b(?:regards|sincerely|cheers|thanks|best|signed|yours)\s{{0,3}},?|"
    rf"\b(?:mr|mrs|ms|miss|mx|dr|prof|sir|dame)\.?)\s{{1,3}})({_NAME})"
    rf"|(?i:\bi\s{{0,2}}am|\bi['\u2019]m)\s{{1,3}}({_CAPWORD}\s{{1,3}}{_CAPWORD}(?:\s{{1,3}}{_CAPWORD})?)"
)

# Query keys whose values are credentials: OAuth codes and tokens, signatures of signed URLs, API
# keys, passwords, session ids.
_CREDENTIAL_KEY = re.compile(
    r"(?i)token|code|sig|signature|key|apikey|pass(?:word)?|pwd|secret|auth|sid|(?:j|php)?sess(?:ion)?(?:id)?"
    r"|[\w-]{0,40}[_-](?:token|key|secret|signature)"
)
# `;jsessionid=...` and other path parameters: their values are replaced, whatever they are.
_PATH_PARAM = re.compile(r"(;[^/;=]{1,100}=)[^/;]+")
# Opaque tokens in a path (reset links, session ids, UUIDs) rather than words: a run of 12+ hex digits,
# or a run of 16+ in which 8 letters and digits in a row mix both. Slugs ("how-to-read-a-file-in-python3")
# mix them only in short words, and stay.
_PATH_RUN = re.compile(r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{12,}(?![A-Za-z0-9_-])")
_HEX_RUN = re.compile(r"[0-9A-Fa-f]{12,}")
_MIXED_PIECE = re.compile(r"(?=[A-Za-z0-9]{0,7}\d)(?=[A-Za-z0-9]{0,7}[A-Za-z])[A-Za-z0-9]{8}")

# The Presidio recognizers that need no NLP model (patterns, checksums and context words).
_PRESIDIO_RECOGNIZERS = (
    "CreditCardRecognizer",
    "CryptoRecognizer",
    "IbanRecognizer",
    "IpRecognizer",
    "MacAddressRecognizer",
    "UkNinoRecognizer",
    "UsSsnRecognizer",
    "UsItinRecognizer",
)
# Presidio's entity names as the placeholders call them.
_SHORT = {
    "CREDIT_CARD": "CARD",
    "IP_ADDRESS": "IP",
    "PHONE_NUMBER": "PHONE",
    "IBAN_CODE": "IBAN",
    "US_SSN": "SSN",
    "UK_NINO": "NINO",
    "US_ITIN": "ITIN",
    "MAC_ADDRESS": "MAC",
}

# Kafka header a producer sets on an Interaction it redacted; consumers redact events without it.
REDACTED_HEADER = "flywheel-redacted"

KINDS = (
    "SECRET",
    "EMAIL",
    "IBAN",
    "CARD",
    "SSN",
    "NINO",
    "DOB",
    "ADDRESS",
    "ACCOUNT",
    "IP",
    "PHONE",
    "NAME",
    "CRYPTO",
    "ITIN",
    "MAC",
)


def luhn_valid(digits: str) -> bool:
    """Whether a digit string passes the Luhn checksum of payment card numbers."""
    # Any decimal digits (a card typed with full-width digits is still a card); nothing int() rejects.
    if not digits.isdecimal():
        return False
    total = 0
    for i, char in enumerate(reversed(digits)):
        d = int(char)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def iban_valid(iban: str) -> bool:
    """Whether a string (spaces allowed) is a well-formed IBAN with a valid ISO 7064 mod-97 check."""
    # An IBAN is ASCII; other letters may upper-case to no base-36 digit (the Kelvin sign stays itself).
    if not iban.isascii():
        return False
    compact = iban.replace(" ", "").upper()
    if not 15 <= len(compact) <= 34 or not compact[:2].isalpha() or not compact[2:4].isdigit():
        return False
    digits = "".join(str(int(c, 36)) for c in compact[4:] + compact[:4])
    return int(digits) % 97 == 1


@dataclass
class Redacted:
    """Text with personal data replaced, and how many of each kind were found."""

    text: str
    found: Counter[str] = field(default_factory=Counter)


Replace = Callable[[re.Match[str]], str | None]


def _card(match: re.Match[str]) -> str | None:
    digits = re.sub(r"\D", "", match.group())
    return "[CARD]" if 13 <= len(digits) <= 19 and luhn_valid(digits) else None


def _iban(match: re.Match[str]) -> str | None:
    return "[IBAN]" if iban_valid(match.group()) else None


def _ipv6(match: re.Match[str]) -> str | None:
    candidate = match.group()
    bracketed = re.fullmatch(r"\[([^\]]+)\](?::\d{1,5})?", candidate)
    address = bracketed.group(1) if bracketed else candidate
    # A digit too: `a::b` and `dead::beef` are C++ and jokes more often than addresses.
    if address.count(":") < 2 or not re.search(r"\d", address):
        return None
    try:
        ipaddress.IPv6Address(address)
    except ValueError:
        return None
    return "[IP]"


def _phone(match: re.Match[str]) -> str | None:
    # Nine digits at least, so dates and short numbers stay; libphonenumber found the valid ones.
    return "[PHONE]" if len(re.sub(r"\D", "", match.group())) >= 9 else None


def _basic_credentials(match: re.Match[str]) -> str | None:
    encoded = match.group(2)
    try:
        decoded = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    return f"{match.group(1)}[SECRET]" if ":" in decoded and decoded.isprintable() else None


def _keep_prefix(kind: str, group: int = 1) -> Replace:
    """Keeps the words that announced the value (group `group`) and replaces the rest."""

    def replace(match: re.Match[str]) -> str:
        return f"{match.group(group)}[{kind}]"

    return replace


def _secret_assignment(match: re.Match[str]) -> str:
    return f"{match.group(1)}{match.group(2)}{match.group(3)}[SECRET]{match.group(3)}"


def _person(match: re.Match[str]) -> str:
    start, end = match.span(match.lastindex or 0)
    whole = match.group()
    offset = match.start()
    return f"{whole[: start - offset]}[NAME]{whole[end - offset :]}"


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
    """Replaces personal data and secrets with `[KIND]` placeholders (KINDS lists them).

    Flywheel's own rules run first, most specific first (a secret before the digits in it, an IBAN
    before the card and phone rules, an SSN before the phone rules): secrets, API keys, PINs, HTTP Basic
    credentials and URL user info, e-mail addresses (internationalised and obfuscated ones too, and
    "name at domain" after a cue or at a mail provider), UK bank account numbers and sort
    codes, IBANs (mod-97), payment cards (Luhn), US SSNs, UK National Insurance numbers, dates of
    birth, street addresses and postcodes, IP addresses with their port, phone numbers (Google's
    libphonenumber, then a digit-group rule) and names announced as such ("my name is", "Dr.",
    sign-offs). Presidio's model-free recognizers (a
    maintained PII library) then add what they find: crypto wallets, ITINs, MAC addresses and their
    own checks of the kinds above. Text without a digit skips Presidio (its recognizers all need one).
    """

    def __init__(self, *, presidio: bool = True, score_threshold: float = 0.3) -> None:
        self._rules: list[tuple[str, re.Pattern[str], Replace]] = [
            ("SECRET", _SECRET_TOKENS, lambda m: "[SECRET]"),
            ("SECRET", _URL_USERINFO, lambda m: f"{m.group(1)}[SECRET]@"),
            ("SECRET", _BASIC_CREDENTIALS, _basic_credentials),
            ("SECRET", _SECRET_ASSIGNMENT, _secret_assignment),
            ("SECRET", _TOKEN_ASSIGNMENT, _keep_prefix("SECRET")),
            ("SECRET", _PIN, _keep_prefix("SECRET")),
            ("EMAIL", _EMAIL, lambda m: "[EMAIL]"),
            ("EMAIL", _OBFUSCATED_EMAIL, lambda m: "[EMAIL]"),
            ("EMAIL", _CUED_AT_EMAIL, _keep_prefix("EMAIL")),
            ("EMAIL", _PROVIDER_AT_EMAIL, lambda m: "[EMAIL]"),
            ("ACCOUNT", _ACCOUNT_NUMBER, _keep_prefix("ACCOUNT")),
            ("ACCOUNT", _SORT_CODE, _keep_prefix("ACCOUNT")),
            ("IBAN", _IBAN, _iban),
            ("CARD", _CARD, _card),
            ("SSN", _SSN, lambda m: "[SSN]"),
            ("NINO", _NINO, lambda m: "[NINO]"),
            ("DOB", _DOB, _keep_prefix("DOB")),
            ("ADDRESS", _ADDRESS, lambda m: "[ADDRESS]"),
            ("ADDRESS", _POSTCODE, lambda m: "[ADDRESS]"),
            ("ADDRESS", _CUED_POSTCODE, _keep_prefix("ADDRESS")),
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
        text = self._sub(text, "NAME", _PERSON, _person, found)
        if self._analyzer is not None and any(c.isdigit() for c in text):
            text = self._presidio(text, found)
        return Redacted(text, found)

    @staticmethod
    def _sub(text: str, kind: str, pattern: re.Pattern[str], replace: Replace, found: Counter[str]) -> str:
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
            # Candidates that are not numbers cost libphonenumber ~1 ms each: 8,000 characters of
            # "1/1/1/..." took 4 s. The digit-group rule after it still sees what it gives up on.
            matcher = phonenumbers.PhoneNumberMatcher(
                text, region, leniency=phonenumbers.Leniency.VALID, max_tries=_PHONE_MAX_TRIES
            )
            for match in matcher:
                spans.append((match.start, match.end))
        return _replace_spans(text, spans, "PHONE", found)

    def _presidio(self, text: str, found: Counter[str]) -> str:
        assert self._analyzer is not None
        results = self._analyzer.analyze(text=text, language="en", score_threshold=self._threshold)
        kinds = {(r.start, r.end): r.entity_type for r in results}
        out, last = [], 0
        for start, end in _merge(sorted(kinds)):
            kind = _SHORT.get(kinds.get((start, end), "PII"), kinds.get((start, end), "PII"))
            out += [text[last:start], f"[{kind}]"]
            found[kind] += 1
            last = end
        return "".join([*out, text[last:]])


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


def redact_url(
    url: str, redactor: Redactor, *, keep_query: bool = False, known: list[tuple[str, str]] | None = None
) -> tuple[str, Counter[str]]:
    """The URL without credentials or fragment (`#access_token=` lives there), and without its query
    unless `keep_query` (then credential values such as `?token=` are replaced). Opaque tokens, `;param`
    values, personal data and the `known` cued values (see `cued_values`) are replaced in what is kept.
    """
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        return "", Counter({"URL": 1})  # not a URL: nothing of it is kept
    host = parts.hostname or ""
    netloc = (f"[{host}]" if ":" in host else host) + (f":{port}" if port is not None else "")
    found: Counter[str] = Counter()
    if parts.username or parts.password:
        found["SECRET"] += 1

    def clean(text: str) -> str:
        redacted = redactor.redact(text)
        found.update(redacted.found)
        return _replace_known(redacted.text, known or [], found)

    path = _redact_path(urllib.parse.unquote(parts.path), clean, found)
    query = _redact_query(parts.query, clean, found) if keep_query else ""
    return urllib.parse.urlunsplit((parts.scheme, netloc, path, query, "")), found


def _redact_path(path: str, clean: Callable[[str], str], found: Counter[str]) -> str:
    def secret(match: re.Match[str]) -> str:
        found["SECRET"] += 1
        return f"{match.group(1)}[SECRET]"

    def token(match: re.Match[str]) -> str:
        run = match.group()
        if not (_HEX_RUN.fullmatch(run) or (len(run) >= 16 and _MIXED_PIECE.search(run))):
            return run
        found["SECRET"] += 1
        return "[SECRET]"

    path = _PATH_PARAM.sub(secret, path)
    path = clean(_PATH_RUN.sub(token, path))
    # Quoted again, so that a decoded `%3F` or `%23` cannot start a query or fragment here.
    return urllib.parse.quote(path, safe="/:@!$&'()*+,;=[]")


def _redact_query(query: str, clean: Callable[[str], str], found: Counter[str]) -> str:
    pairs = []
    for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if value and _CREDENTIAL_KEY.fullmatch(key):
            found["SECRET"] += 1
            pairs.append((key, "[SECRET]"))
        else:
            pairs.append((clean(key), clean(value)))
    return urllib.parse.urlencode(pairs, safe="[]")


def cued_values(text: str) -> list[tuple[str, str]]:
    """(kind, value) of what only a cue identifies ("my name is X", "born on D", "password: P"):
    the same value elsewhere (the model's answer repeating the name) has no cue of its own."""
    values: list[tuple[str, str]] = []
    for match in _PERSON.finditer(text):
        name = match.group(match.lastindex or 0).rstrip(".")  # a name's words may hold dots, not its end
        values.append(("NAME", name))
        # A name's parts alone ("Smith") identify too; short particles do not, nor do the words of a
        # lowercase name (its cue is less sure: "my name is spelled wrong").
        values += [
            ("NAME", part) for part in re.split(r"[\s-]+", name) if len(part) >= 3 and part[0].isupper()
        ]
    values += [("DOB", match.group(2)) for match in _DOB.finditer(text)]
    values += [("SECRET", match.group(4)) for match in _SECRET_ASSIGNMENT.finditer(text)]
    for kind, pattern in (("SECRET", _TOKEN_ASSIGNMENT), ("SECRET", _PIN), ("ACCOUNT", _ACCOUNT_NUMBER)):
        values += [(kind, match.group(2)) for match in pattern.finditer(text)]
    return values


def _replace_known(text: str, known: list[tuple[str, str]], found: Counter[str]) -> str:
    for kind, value in known:  # longest first, so "John Smith" goes before "Smith"
        pattern = re.compile(rf"(?<!\w){re.escape(value)}(?!\w)")
        text, count = pattern.subn(f"[{kind}]", text)
        found[kind] += count
    return text


def redact_interaction(
    event: events_pb2.Interaction, redactor: Redactor, *, keep_url_query: bool = False
) -> Counter[str]:
    """Redacts an Interaction in place (question, answer, title, URL, passages); returns the kinds found.

    A value found through a cue in one field (a name after "my name is" in the question) is also
    removed where it appears without one (the answer that repeats it).
    """
    found: Counter[str] = Counter()
    fields = ("question", "answer", "page_title")
    known = sorted(
        {kv for name in fields for kv in cued_values(getattr(event, name))}, key=lambda kv: -len(kv[1])
    )
    for name in fields:
        redacted = redactor.redact(getattr(event, name))
        setattr(event, name, _replace_known(redacted.text, known, found))
        found.update(redacted.found)
    passages = []
    for passage in event.passages:
        redacted = redactor.redact(passage)
        passages.append(_replace_known(redacted.text, known, found))
        found.update(redacted.found)
    del event.passages[:]
    event.passages.extend(passages)
    event.page_url, url_found = redact_url(event.page_url, redactor, keep_query=keep_url_query, known=known)
    found.update(url_found)
    return found
