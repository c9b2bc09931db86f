"""Cluster benchmark (EFAAR `cluster_benchmark`): for each CORUM complex with >= `min_genes` genes in the map,
a two-sample KS test of within-complex cosines (pairs above the diagonal) against complex-to-rest cosines.

The map's cosine matrix is computed once and sliced per complex (the reference recomputes it per complex).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import ks_2samp

from vitally_jax.benchmarks.annotations import clusters_in_map, load_clusters
from vitally_jax.benchmarks.cosine import cosine_matrix
from vitally_jax.benchmarks.validate import as_features, as_labels, check_unique_labels, unpack_map
from vitally_jax.errors import BenchmarkInputError

COLUMNS = [
    "cluster",
    "within_cossim_mean",
    "between_cossim_mean",
    "genes",
    "cluster_size",
    "not_cluster_size",
    "ks_stat",
    "ks_pval",
]


def cluster_benchmark(
    map_features,
    perturbations=None,
    *,
    perturbation_col: str = "perturbation",
    source="CORUM",
    min_genes: int = 10,
    require_clusters: bool = True,
) -> pd.DataFrame:
    """One row per complex: cluster, within/between mean cosine, genes, sizes, ks_stat, ks_pval."""
    map_features, perturbations = unpack_map(map_features, perturbations, perturbation_col)
    x = as_features(map_features, "map features")
    labels = as_labels(perturbations, len(x)).astype(str)
    check_unique_labels(labels)
    clusters = clusters_in_map(load_clusters(source), labels, min_genes)
    if not clusters and require_clusters:
        raise BenchmarkInputError(
            f"clusters: no complex has >= {min_genes} genes in the map "
            f"({len(labels)} perturbations); lower min_genes or check gene symbols"
        )
    s = cosine_matrix(x) if clusters else None
    rows = []
    for name, genes in clusters.items():
        inside = np.isin(labels, genes)
        idx, rest = np.nonzero(inside)[0], np.nonzero(~inside)[0]
        sub = s[np.ix_(idx, idx)]
        within = sub[np.triu_indices(len(idx), k=1)]
        between = s[np.ix_(idx, rest)].ravel()
        ks = ks_2samp(within, between)
        rows.append(
            [
                name,
                within.mean(),
                between.mean(),
                list(labels[idx]) if not np.isnan(ks.pvalue) else [],
                len(idx),
                len(rest),
                ks.statistic,
                ks.pvalue,
            ]
        )
    return pd.DataFrame(rows, columns=COLUMNS)
