"""Rebuild pages/ from Debian's postgresql-doc-15 HTML: keep the section, drop navigation and contents."""

from __future__ import annotations

import argparse
import html
from pathlib import Path

from selectolax.lexbor import LexborHTMLParser

PAGES = (
    "history",
    "limits",
    "datatype-numeric",
    "datatype-character",
    "datatype-datetime",
    "indexes-types",
    "transaction-iso",
    "backup-dump",
)
DEFAULT_SOURCE = Path("/usr/share/doc/postgresql-doc-15/html")
# The pages carry no copyright line of their own; the licence asks for the notice in every copy, so the
# footer quotes it from the manual's legal notice page.
LEGAL_NOTICE = "legalnotice.html"
COPYRIGHT_PREFIX = "Portions Copyright"
# The article is the one <body> child that is not the prev/up/next navigation bar above or below it.
ARTICLE = "body > div:not(.navheader):not(.navfooter)"
# Boilerplate inside the article: the per-section table of contents.
DROP = "div.toc, script, style"

TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<!-- {page}.html of the PostgreSQL 15.20 docs (Debian postgresql-doc-15), trimmed to the section. -->
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


def copyright_lines(source: str) -> str:
    """The copyright lines of the legal notice page, one paragraph each."""
    notice = LexborHTMLParser(source).css_first("div.legalnotice")
    if notice is None:
        raise SystemExit(f"{LEGAL_NOTICE}: unexpected page layout")
    lines = [
        " ".join(node.text().split())
        for node in notice.css("p")
        if node.text().strip().startswith(COPYRIGHT_PREFIX)
    ]
    if not lines:
        raise SystemExit(f"{LEGAL_NOTICE}: no copyright lines")
    return "\n".join(f"<p>{html.escape(line)}</p>" for line in lines)


def trim(source: str, page: str, footer: str) -> str:
    """The section of one DocBook page wrapped in a minimal document."""
    tree = LexborHTMLParser(source)
    title_node = tree.css_first("title")
    articles = tree.css(ARTICLE)
    if title_node is None or len(articles) != 1:
        raise SystemExit(f"{page}: unexpected page layout")
    article = articles[0]
    for node in article.css(DROP):
        node.decompose()
    return TEMPLATE.format(
        title=html.escape(" ".join(title_node.text().split())),
        page=page,
        article=(article.html or "").strip(),
        footer=footer,
    )


def main() -> None:
    """Write pages/<page>.html beside this script from the installed documentation."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    args = parser.parse_args()
    out = Path(__file__).resolve().parent / "pages"
    out.mkdir(exist_ok=True)
    footer = copyright_lines((args.source / LEGAL_NOTICE).read_text(encoding="utf-8"))
    for page in PAGES:
        text = (args.source / f"{page}.html").read_text(encoding="utf-8")
        (out / f"{page}.html").write_text(trim(text, page, footer), encoding="utf-8")


if __name__ == "__main__":
    main()
