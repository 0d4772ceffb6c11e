"""Rebuild pages/ from Debian's python3.11-doc FAQ: keep the article, drop navigation and scripts."""

from __future__ import annotations

import argparse
import html
from pathlib import Path

from selectolax.lexbor import LexborHTMLParser

PAGES = ("general", "programming", "design", "library", "extending", "windows", "gui", "installed")
DEFAULT_SOURCE = Path("/usr/share/doc/python3.11-doc/html/faq")
# The original footer is kept up to its licence lines; donation, build date and generator notes go.
FOOTER_END = "The Python Software Foundation is a non-profit"
# Boilerplate inside the article: the per-page table of contents and the pilcrow permalinks.
DROP = "nav.contents, a.headerlink, script, style"

TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<!-- faq/{page}.html of the Python 3.11.2 docs (Debian python3.11-doc), trimmed to the article. -->
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


def trim(source: str, page: str) -> str:
    """The article of one Sphinx page wrapped in a minimal document."""
    tree = LexborHTMLParser(source)
    title_node = tree.css_first("title")
    article = tree.css_first('div.body[role="main"]')
    footer_node = tree.css_first("div.footer")
    footer = footer_node.inner_html if footer_node is not None else None
    if title_node is None or article is None or footer is None or FOOTER_END not in footer:
        raise SystemExit(f"{page}: unexpected page layout")
    for node in article.css(DROP):
        node.decompose()
    # Heading links only point back at the dropped table of contents; keep their text.
    for node in article.css("a.toc-backref"):
        node.unwrap()
    return TEMPLATE.format(
        title=html.escape(title_node.text()),
        page=page,
        article=(article.inner_html or "").strip(),
        footer=footer.split(FOOTER_END)[0].strip(),
    )


def main() -> None:
    """Write pages/<page>.html beside this script from the installed documentation."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    args = parser.parse_args()
    out = Path(__file__).resolve().parent / "pages"
    out.mkdir(exist_ok=True)
    for page in PAGES:
        text = (args.source / f"{page}.html").read_text(encoding="utf-8")
        (out / f"{page}.html").write_text(trim(text, page), encoding="utf-8")


if __name__ == "__main__":
    main()
