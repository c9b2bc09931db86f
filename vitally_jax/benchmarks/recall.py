"""Known-relationship recall (EFAAR `known_relationship_benchmark`), exact and blockwise for whole genomes.

For a map with P perturbations, the null is every cosine above the diagonal (P(P-1)/2 values, float64); the
queries are the cosines of annotated pairs with both genes in the map. A query's left/right percentile ranks are
`searchsorted(null, q, 'left'|'right') / |null|` and recall(lo, hi) is the share of queries with
`rank_right <= lo or rank_left >= hi`.

Whole-genome maps (20,000 genes: 2e8 null values) are handled exactly without a P x P matrix: rows are processed in
blocks; each block's slice of the null is sorted (in worker threads, numpy releases the GIL) and kept; the rank of
a query in the whole null is the sum of its ranks in the sorted slices. Query values are read from the same
computed blocks, so each query is bit-identical to its own copy in the null. Memory: 8 bytes per null value plus
two blocks (20,000 genes: 1.6 GB of null values). Ranks are exact for the float64 cosines computed; a blocked BLAS
product may differ from a full-matrix product (and from scikit-learn's) in the last bit of a cosine, which can only
matter for a query within 1 ulp of a percentile boundary.
"""

from __future__ import annotations

import concurrent.futures as cf

import numpy as np
import pandas as pd

from vitally_jax.benchmarks.annotations import SOURCES, load_relationships, relationship_index_pairs
from vitally_jax.benchmarks.cosine import cosine_matrix, normalize_rows, upper_triangle
from vitally_jax.benchmarks.validate import as_features, as_labels, check_min_count, check_unique_labels, unpack_map
from vitally_jax.errors import BenchmarkInputError

THRESHOLDS = ((0.05, 0.95), (0.1, 0.9))


def recall_from_counts(n_null: int, below: np.ndarray, below_or_equal: np.ndarray, thresholds=THRESHOLDS) -> dict:
    """Recall at each (lo, hi) from per-query counts #{null < q} and #{null <= q}."""
    rank_left = below / n_null
    rank_right = below_or_equal / n_null
    out = {}
    for pair in thresholds:
        lo, hi = min(pair), max(pair)
        out[f"recall_{lo}_{hi}"] = float(np.sum((rank_right <= lo) | (rank_left >= hi)) / len(below))
    return out


def recall_dense(null: np.ndarray, queries: np.ndarray, thresholds=THRESHOLDS) -> dict:
    """Recall of `queries` (Q,) against an unsorted `null` (M,)."""
    s = np.sort(null)
    return recall_from_counts(
        len(s), np.searchsorted(s, queries, "left"), np.searchsorted(s, queries, "right"), thresholds
    )


class SortedNull:
    """The upper-triangle cosine null of a map, held as sorted blocks; exact rank counts for any query."""

    def __init__(
        self,
        features: np.ndarray,
        *,
        block_rows: int | None = None,
        threads: int = 2,
        query_pairs: np.ndarray | None = None,
    ):
        xn = normalize_rows(features)
        p = len(xn)
        self.size = p * (p - 1) // 2
        if block_rows is None:  # <= 1024 rows and <= 128 MiB of float64 per block: little wasted lower triangle
            block_rows = max(64, min(1024, (16 << 20) // max(p, 1)))
        pairs = np.zeros((0, 2), np.int64) if query_pairs is None else np.asarray(query_pairs, np.int64)
        self.query_values = np.empty(len(pairs))
        row_of = pairs[:, 0] if len(pairs) else np.zeros(0, np.int64)
        self.blocks: list[np.ndarray] = []

        def work(r0: int) -> np.ndarray:
            r1 = min(p, r0 + block_rows)
            s = xn[r0:r1] @ xn[r0:].T  # rows r0..r1 against columns r0..P
            sel = np.nonzero((row_of >= r0) & (row_of < r1))[0]
            if len(sel):
                self.query_values[sel] = s[pairs[sel, 0] - r0, pairs[sel, 1] - r0]
            vals = np.concatenate([s[i, i + 1 :] for i in range(r1 - r0)])  # above the diagonal, row-major
            vals.sort()
            return vals

        starts = range(0, p, block_rows)
        if threads > 1:
            with cf.ThreadPoolExecutor(threads) as ex:
                self.blocks = [b for b in ex.map(work, starts) if len(b)]
        else:
            self.blocks = [b for b in map(work, starts) if len(b)]

    def counts(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(Q,) -> #{null < q}, #{null <= q} (int64)."""
        below = np.zeros(len(q), np.int64)
        below_eq = np.zeros(len(q), np.int64)
        for b in self.blocks:
            below += np.searchsorted(b, q, "left")
            below_eq += np.searchsorted(b, q, "right")
        return below, below_eq

    def values(self) -> np.ndarray:
        """All null values, sorted (M,)."""
        return np.sort(np.concatenate(self.blocks)) if self.blocks else np.zeros(0)


def known_relationship_recall(
    map_features,
    perturbations=None,
    *,
    perturbation_col: str = "perturbation",
    sources=SOURCES,
    thresholds=THRESHOLDS,
    min_perturbations: int = 20,
    block_rows: int | None = None,
    threads: int = 2,
    dense: bool | None = None,
) -> pd.DataFrame:
    """Recall of annotated relationships for a map (P, D) with labels (P,) (or a `PerturbationMap` / EFAAR Bunch).

    `sources`: bundled names, CSV paths or DataFrames (entity1, entity2); a dict name -> source is accepted too.
    Returns one row per source with any annotated pair in the map: source, null_distribution_size,
    query_distribution_size, recall_{lo}_{hi}... Raises `BenchmarkInputError` if no source has a pair in the map.
    `dense=None` picks the dense path for maps of up to 2,000 perturbations.
    """
    map_features, perturbations = unpack_map(map_features, perturbations, perturbation_col)
    x = as_features(map_features, "map features")
    labels = as_labels(perturbations, len(x)).astype(str)
    check_unique_labels(labels)
    check_min_count(len(x), max(2, min_perturbations), "perturbations in the map")
    named = (
        sources.items()
        if isinstance(sources, dict)
        else [(s if isinstance(s, str) else getattr(s, "name", f"table{k}"), s) for k, s in enumerate(sources)]
    )
    per_source = []
    for name, src in named:
        rels = load_relationships(src)
        per_source.append(
            (
                name,
                relationship_index_pairs(
                    rels, labels, source=name, warn_unknown=not isinstance(src, str) or src not in SOURCES
                ),
            )
        )
    if not any(len(p) for _, p in per_source):
        raise BenchmarkInputError(
            f"annotations: no annotated pair has both genes in the map "
            f"({len(labels)} perturbations, e.g. {str(labels[0])!r}); are labels gene symbols?"
        )
    all_pairs = np.concatenate([p for _, p in per_source]) if per_source else np.zeros((0, 2), np.int64)
    use_dense = len(x) <= 2000 if dense is None else dense
    if use_dense:
        s = cosine_matrix(x)
        null = np.sort(upper_triangle(s))
        qv = s[all_pairs[:, 0], all_pairs[:, 1]]
        counts = lambda q: (np.searchsorted(null, q, "left"), np.searchsorted(null, q, "right"))  # noqa: E731
        n_null = len(null)
    else:
        sn = SortedNull(x, block_rows=block_rows, threads=threads, query_pairs=all_pairs)
        qv, counts, n_null = sn.query_values, sn.counts, sn.size
    rows, start = [], 0
    for name, pairs in per_source:
        q = qv[start : start + len(pairs)]
        start += len(pairs)
        if len(q) == 0:
            continue
        below, below_eq = counts(q)
        rows.append(
            {
                "source": name,
                "null_distribution_size": n_null,
                "query_distribution_size": len(q),
                **recall_from_counts(n_null, below, below_eq, thresholds),
            }
        )
    return pd.DataFrame(rows)
