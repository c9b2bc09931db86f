"""Perturbation signal consistency (EFAAR `pert_signal_consistency_benchmark`), vectorised.

A perturbation's consistency is the mean pairwise cosine among its replicate wells (cosines clipped to [-1, 1];
NaN with fewer than 2 replicates). Its p-value is `1 - searchsorted(null, c, 'left') / |null|` where the null is
the same statistic over the negative-control perturbations (e.g. non-expressed genes).

EFAAR keeps the NaN statistics of one-replicate negative controls in the null, so they count in |null| and shrink
every p-value. By default we drop them (fixed); `efaar_quirk=True` reproduces the reference numbers.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from vitally_jax.benchmarks.cosine import normalize_rows
from vitally_jax.benchmarks.validate import as_features, as_labels, check_min_count


def group_rows(labels: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Labels (N,) -> unique labels in order of first appearance, and the row indices of each."""
    _, first, inv = np.unique(labels, return_index=True, return_inverse=True)
    order = np.argsort(first)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    g = rank[inv.ravel()]
    sort = np.argsort(g, kind="stable")
    bounds = np.searchsorted(g[sort], np.arange(len(order) + 1))
    return labels[first[order]], [sort[bounds[k] : bounds[k + 1]] for k in range(len(order))]


def mean_replicate_cosine(x: np.ndarray, groups: list[np.ndarray]) -> np.ndarray:
    """Mean pairwise cosine within each group of rows (NaN for groups of < 2), batched by group size."""
    xn = normalize_rows(x)
    out = np.full(len(groups), np.nan)
    sizes = np.array([len(g) for g in groups])
    for n in np.unique(sizes):
        if n < 2:
            continue
        ks = np.nonzero(sizes == n)[0]
        rows = np.stack([groups[k] for k in ks])  # (G, n)
        v = xn[rows]  # (G, n, D)
        gram = np.clip(np.matmul(v, v.transpose(0, 2, 1)), -1, 1)
        il = np.tril_indices(n, k=-1)
        out[ks] = gram[:, il[0], il[1]].mean(axis=1)
    return out


def null_pvalues(stat: np.ndarray, null: np.ndarray, side: str, efaar_quirk: bool) -> np.ndarray:
    """p = 1 - searchsorted(sorted null, stat, side) / |null|; NaN null entries count in |null| only with the quirk."""
    null = np.sort(null)
    if not efaar_quirk:
        null = null[~np.isnan(null)]
    if len(null) == 0:
        return np.full(len(stat), np.nan)
    p = 1 - np.searchsorted(null, stat, side) / len(null)
    return np.where(np.isnan(stat), np.nan, p)


def signal_consistency(
    features,
    metadata: pd.DataFrame | None = None,
    *,
    negative_controls,
    perturbation_col: str = "perturbation",
    labels=None,
    drop=(),
    efaar_quirk: bool = False,
) -> pd.DataFrame:
    """Per perturbation: mean replicate cosine and its p-value against negative-control perturbations.

    Returns DataFrame(pert, avgcossim, pval, n_replicates) in order of first appearance, negative controls excluded.
    """
    x = as_features(features)
    lab = as_labels(metadata[perturbation_col] if labels is None else labels, len(x), perturbation_col)
    keep = ~np.isin(lab.astype(str), np.asarray(list(map(str, drop))))
    x, lab = x[keep], lab[keep].astype(str)
    uniq, groups = group_rows(lab)
    stat = mean_replicate_cosine(x, groups)
    is_neg = np.isin(uniq, np.asarray(list(map(str, negative_controls))))
    check_min_count(int(is_neg.sum()), 1, "negative-control perturbations present")
    p = null_pvalues(stat[~is_neg], stat[is_neg], "left", efaar_quirk)
    return pd.DataFrame(
        {
            "pert": uniq[~is_neg],
            "avgcossim": stat[~is_neg],
            "pval": p,
            "n_replicates": np.array([len(g) for g in groups])[~is_neg],
        }
    )
