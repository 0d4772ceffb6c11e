"""Untrusted text made safe to log, produce and train on: control, escape and bidi characters removed."""

from __future__ import annotations

import re

# C0 controls but tab and newline (NUL, ESC that starts ANSI sequences, ...), DEL and C1 controls;
# the bidirectional embeddings, overrides and isolates that make text display other than it reads
# ("Trojan Source"); the line and paragraph separators that split log lines.
_UNSAFE = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029\ufeff]"
)
# An ANSI/VT100 escape sequence (CSI ... final byte, or ESC and one character): removed whole, so
# no "[31m" residue is left once ESC itself is gone.
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")


def clean_text(value: str) -> str:
    """`value` without ANSI escape sequences and unsafe characters; carriage returns become newlines."""
    value = _ANSI.sub("", value).replace("\r\n", "\n").replace("\r", "\n")
    return _UNSAFE.sub("", value)


def has_unsafe(value: str) -> bool:
    """Whether `value` holds a character clean_text removes (or a carriage return)."""
    return bool(_UNSAFE.search(value) or "\r" in value)
