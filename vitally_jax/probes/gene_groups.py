"""Functional gene groups for the Anax-style probe task, built from the bundled CORUM complex table.

The paper's "Anax" task labels 348 genes by 40 functional groups (an internal table). We rebuild the idea from
public annotations (`vitally_jax/annotations/CORUM_clusters.tsv`, one complex per line: name, tab, genes; read by
`vitally_jax.benchmarks.annotations.load_clusters`, a repeated complex name keeping the union of its genes):

1. Restrict every complex to the genes present in the screen (if a gene list is given).
2. Keep complexes with `min_size`..`max_size` present genes (default 5-20).
3. Visit them largest first (ties by name, so the result is deterministic); a complex keeps only genes not already
   taken by an earlier group, and becomes a group if it still has `min_size` genes. Groups are therefore disjoint,
   and a gene belongs to at most one group.
4. Stop after `max_groups` groups (default 40).

The label of a gene is the name of its group; genes in no group are not used by the task.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterable

from vitally_jax.errors import BenchmarkInputError, ConfigError


def functional_gene_groups(
    genes: Iterable[str] | None = None,
    *,
    min_size: int = 5,
    max_size: int = 20,
    max_groups: int = 40,
    table: str | pathlib.Path | None = None,
) -> dict[str, list[str]]:
    """Disjoint functional groups (group name -> sorted genes), chosen as described in the module docstring."""
    if min_size < 2 or max_size < min_size or max_groups < 2:
        raise ConfigError(
            f"gene groups: need 2 <= min_size <= max_size and max_groups >= 2, got "
            f"min_size={min_size} max_size={max_size} max_groups={max_groups}"
        )
    from vitally_jax.benchmarks.annotations import load_clusters

    complexes = load_clusters("CORUM" if table is None else table, repeated="union")
    present = None if genes is None else set(genes)
    candidates = []
    for name, members in complexes.items():
        members = sorted({g for g in members if present is None or g in present})
        if min_size <= len(members) <= max_size:
            candidates.append((name, members))
    candidates.sort(key=lambda c: (-len(c[1]), c[0]))
    taken: set[str] = set()
    groups: dict[str, list[str]] = {}
    for name, members in candidates:
        free = [g for g in members if g not in taken]
        if len(free) >= min_size:
            groups[name] = free
            taken.update(free)
            if len(groups) == max_groups:
                break
    return groups


def gene_labels(groups: dict[str, list[str]]) -> dict[str, str]:
    """Gene -> group name for disjoint groups."""
    labels: dict[str, str] = {}
    for name, members in groups.items():
        for g in members:
            if g in labels:
                raise BenchmarkInputError(
                    f"gene groups: {g} is in both {labels[g]!r} and {name!r}; groups must be disjoint"
                )
            labels[g] = name
    return labels
