"""Rewrite one marked section of docs/real-data.md, leaving the other sections as they are.

Each real-data command owns one section, between `<!-- NAME:begin -->` and `<!-- NAME:end -->`; a missing file or
section is created. The file is replaced atomically (temporary name, then rename).
"""

from __future__ import annotations

import pathlib

from vitally_jax.fileio import write_text

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "real-data.md"
HEADER = (
    "# Real data\n\n"
    "Figures on data nobody on this project generated. Each section below is rewritten by the command it names;\n"
    "nothing in it is typed by hand.\n"
)


def write_section(name: str, body: str, doc: pathlib.Path = DOC) -> pathlib.Path:
    """Replace section `name` of `doc` with `body` (markdown) and return the path."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = doc.read_text() if doc.exists() else HEADER
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    write_text(doc, text)
    return doc
