"""Untrusted text loses control, escape and bidi characters and keeps everything else."""

import pytest

from flywheel_common.text import clean_text, has_unsafe


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("plain text, ünïcödé and 中文 stay", "plain text, ünïcödé and 中文 stay"),
        ("tabs\tand\nnewlines stay", "tabs\tand\nnewlines stay"),
        ("nul\x00byte", "nulbyte"),
        ("\x1b[31mred\x1b[0m text", "red text"),
        ("\x1b]0;title\x07osc", "osc"),
        ("bell\x07 and del\x7f and c1\x85", "bell and del and c1"),
        ("access\u202e\u2066level\u2069 check", "accesslevel check"),
        ("rtl\u200fmark\u061c", "rtlmark"),
        ("windows\r\nline\rends", "windows\nline\nends"),
        ("log\u2028line\u2029split\ufeff", "loglinesplit"),
    ],
)
def test_clean_text(raw: str, clean: str) -> None:
    assert clean_text(raw) == clean
    assert has_unsafe(raw) == (raw != clean)
    assert not has_unsafe(clean_text(raw))
