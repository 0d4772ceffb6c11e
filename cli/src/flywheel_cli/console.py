"""The CLI's console (Rich), shared by the commands."""

from __future__ import annotations

from rich.console import Console


def make_console() -> Console:
    """Rich's console; into a file or a pipe, wide enough that the report's table does not wrap."""
    console = Console()
    return console if console.is_terminal else Console(width=max(console.width, 160))
