"""docs/architecture.md lists every module of the package, with the purpose its docstring states."""

from __future__ import annotations

import pathlib
import runpy
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "dev" / "architecture_doc.py"


def test_every_module_is_listed():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    missing = [
        str(p.relative_to(ROOT))
        for p in sorted((ROOT / "vitally_jax").rglob("*.py"))
        if f"`{p.relative_to(ROOT)}`" not in doc
    ]
    assert not missing, f"modules missing from docs/architecture.md: {missing}"


def test_module_table_is_regenerated_from_the_tree():
    gen = runpy.run_path(str(TOOL))
    doc = (ROOT / "docs" / "architecture.md").read_text()
    assert gen["render"](doc) == doc, "stale table: run python tools/dev/architecture_doc.py"
    rows = [ln for ln in gen["table"]().splitlines()[2:]]
    assert len(rows) == len(list((ROOT / "vitally_jax").rglob("*.py")))
    assert all(ln.count("|") >= 3 and ln.split("|")[2].strip() for ln in rows), "a module without a docstring"


def test_check_mode_fails_on_a_stale_table(tmp_path, monkeypatch):
    gen = runpy.run_path(str(TOOL))
    stale = tmp_path / "architecture.md"
    stale.write_text(f"x\n{gen['START']}\n| old |\n{gen['END']}\n")
    main = gen["main"]
    main.__globals__["DOC"] = stale
    monkeypatch.setattr(sys, "argv", ["architecture_doc.py"])
    assert main(["--check"]) == 1
    assert main([]) == 0 and main(["--check"]) == 0
