"""Rebuild pages/ from Debian's bash-doc reference manual: one page per section, navigation dropped."""

from __future__ import annotations

import argparse
import html
import re
from pathlib import Path

from selectolax.lexbor import LexborHTMLParser

# Page id -> the manual's anchor of the section (its subsections come with it).
PAGES = {
    "introduction": "Introduction",
    "special-parameters": "Special-Parameters",
    "redirections": "Redirections",
    "exit-status": "Exit-Status",
    "bash-startup-files": "Bash-Startup-Files",
    "bash-conditional-expressions": "Bash-Conditional-Expressions",
    "arrays": "Arrays",
    "controlling-the-prompt": "Controlling-the-Prompt",
}
DEFAULT_SOURCE = Path("/usr/share/doc/bash/bashref.html")
# The manual is one HTML file whose copyright and licence notice sits in a comment in <head>; each page
# carries it in its footer, as the GFDL asks of every copy.
NOTICE = re.compile(r'Copyright \(C\).*?"GNU Free Documentation License"\.', re.DOTALL)
# Boilerplate inside a section: the next/previous/up bar above each (sub)section, the list of links to
# its subsections, and the hidden anchors.
DROP = "div.header, ul.section-toc, a.copiable-anchor, script, style"
HEADING = "h2, h3, h4"

TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<!-- Section {anchor} of bashref.html, the Bash 5.2 reference manual (Debian bash-doc), trimmed. -->
</head>
<body>
<main>
{article}
</main>
<footer>
{footer}
</footer>
</body>
</html>
"""


def notice(source: str) -> str:
    """The manual's copyright and licence notice as footer paragraphs."""
    found = NOTICE.search(source)
    if found is None:
        raise SystemExit("bashref.html: no copyright notice")
    paragraphs = [" ".join(part.split()) for part in found.group(0).split("\n\n")]
    return "\n".join(f"<p>{html.escape(part)}</p>" for part in paragraphs if part)


def trim(tree: LexborHTMLParser, anchor: str, footer: str) -> str:
    """One section of the manual wrapped in a minimal document."""
    section = tree.css_first(f'div[id="{anchor}"]')
    heading = section.css_first(HEADING) if section is not None else None
    if section is None or heading is None:
        raise SystemExit(f"{anchor}: unexpected page layout")
    for node in section.css(DROP):
        node.decompose()
    return TEMPLATE.format(
        title=html.escape(" ".join(heading.text().split())),
        anchor=anchor,
        article=(section.html or "").strip(),
        footer=footer,
    )


def main() -> None:
    """Write pages/<page>.html beside this script from the installed manual."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    args = parser.parse_args()
    out = Path(__file__).resolve().parent / "pages"
    out.mkdir(exist_ok=True)
    source = args.source.read_text(encoding="utf-8")
    footer = notice(source)
    for page, anchor in PAGES.items():
        # A fresh parse per page: trimming one section must not touch the next.
        (out / f"{page}.html").write_text(trim(LexborHTMLParser(source), anchor, footer), encoding="utf-8")


if __name__ == "__main__":
    main()
