"""Argument types for whole-number flags: a bad value is a usage error, not a traceback mid-call."""

from __future__ import annotations

import argparse

# The requests' counts and limits are uint32 fields: a larger number cannot be sent at all.
UINT32_MAX = 2**32 - 1


def _whole_number(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value} is out of range: give {low} or more")
    if value > UINT32_MAX:
        raise argparse.ArgumentTypeError(f"{value} is out of range: give at most {UINT32_MAX}")
    return value


def non_negative_int(text: str) -> int:
    """A whole number from 0 to 2**32 - 1 (what a uint32 request field holds)."""
    return _whole_number(text, 0)


def positive_int(text: str) -> int:
    """A whole number from 1 to 2**32 - 1."""
    return _whole_number(text, 1)
