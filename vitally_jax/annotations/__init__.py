"""Bundled gene-relationship tables (CORUM, hu.MAP, Reactome, SIGNOR, StringDB; CORUM complexes).

Licences per file in `LICENSE` beside this file. `read_clusters` is the one parser of cluster tables
(`name<TAB>space-separated genes`); `vitally_jax.benchmarks.annotations.load_clusters` (sets, for the benchmarks)
and the synthetic world (ordered gene lists) build on it.
"""

from __future__ import annotations

import os
import pathlib

DIR = pathlib.Path(__file__).resolve().parent


def read_clusters(source: str | os.PathLike = "CORUM") -> list[tuple[str, list[str]]]:
    """(name, genes) per non-empty line of a cluster table, in file order; genes in file order, duplicates dropped.

    `source`: 'CORUM' (the bundled `CORUM_clusters.tsv`) or a path. Raises `FileNotFoundError` for a missing
    file and `ValueError` naming the line for a line that is not `name<TAB>genes`.
    """
    path = DIR / "CORUM_clusters.tsv" if source == "CORUM" else pathlib.Path(os.fspath(source))
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.strip().split("\t")
            if len(parts) != 2:
                raise ValueError(f"{path}:{n}: expected 'name<TAB>space-separated genes'")
            out.append((parts[0], list(dict.fromkeys(parts[1].split()))))
    return out
