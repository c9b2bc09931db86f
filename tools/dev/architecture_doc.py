"""Regenerate the module table of docs/architecture.md from the package tree (one line per module).

    python tools/dev/architecture_doc.py          # rewrite the table between the markers
    python tools/dev/architecture_doc.py --check  # exit 1 if the table is stale (what the test checks)

Each row is a module's path and the first sentence of its docstring, so the purpose is written once, where the
code is. `tests/test_architecture_doc.py` fails when a module is missing from the page or the table is stale.
"""

from __future__ import annotations

import argparse
import ast
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "architecture.md"
START, END = "<!-- modules:start (tools/dev/architecture_doc.py) -->", "<!-- modules:end -->"


def modules() -> list[pathlib.Path]:
    """Every .py module of the package, in tree order (packages before their modules)."""
    pkg = ROOT / "vitally_jax"
    return sorted(pkg.rglob("*.py"), key=lambda p: (p.parent.relative_to(pkg).parts, p.name != "__init__.py", p.name))


def purpose(path: pathlib.Path) -> str:
    """The first sentence of the module docstring, on one line."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    text = " ".join(doc.strip().split("\n\n")[0].split())
    if ". " in text:
        text = text.split(". ")[0] + "."
    if len(text) > 160:
        text = text[:160].rsplit(" ", 1)[0] + " ..."
    return text.replace("|", "\\|")


def table() -> str:
    rows = ["| module | purpose |", "|---|---|"]
    for p in modules():
        rows.append(f"| `{p.relative_to(ROOT)}` | {purpose(p)} |")
    return "\n".join(rows)


def render(doc: str) -> str:
    if START not in doc or END not in doc:
        raise SystemExit(f"{DOC}: markers {START!r} / {END!r} not found")
    head, rest = doc.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table()}\n{END}{tail}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only check; exit 1 if the table is stale")
    args = ap.parse_args(argv)
    doc = DOC.read_text()
    new = render(doc)
    if args.check:
        if new != doc:
            print(f"{DOC}: the module table is stale; run python tools/dev/architecture_doc.py", file=sys.stderr)
            return 1
        return 0
    if new != doc:
        tmp = DOC.with_name(f".{DOC.name}.tmp")
        tmp.write_text(new)
        tmp.replace(DOC)
        print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
