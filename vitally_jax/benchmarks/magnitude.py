"""Perturbation signal magnitude (EFAAR `pert_signal_magnitude_benchmark`): energy distance to control wells.

E(X, Y) = 2 E|x - y| - E|x - x'| - E|y - y'| (V-statistic: the diagonal is included), with Euclidean distances
computed as sqrt(max(|x|^2 + |y|^2 - 2 x.y, 1e-8)), exactly as the reference's energy kernel does (so a point's
distance to itself counts as 1e-4). Perturbations need at least 5 replicate wells (else NaN). Controls: up to
`max_controls` control wells, sampled with a seed (the reference samples without one).
p-value: `1 - searchsorted(null, e, 'right') / |null|` against the negative-control perturbations; NaN null
entries are dropped unless `efaar_quirk=True`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from vitally_jax.benchmarks.consistency import group_rows, null_pvalues
from vitally_jax.benchmarks.validate import as_features, as_labels, check_has_controls, check_min_count


def pairwise_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(N, D), (M, D) -> (N, M) sqrt(max(squared distance, 1e-8)) by the expansion |x|^2 - 2x.y + |y|^2."""
    d2 = (x * x).sum(-1)[:, None] - 2 * (x @ y.T) + (y * y).sum(-1)[None, :]
    return np.sqrt(np.maximum(d2, 1e-8))


def energy_distances(
    x: np.ndarray, groups: list[np.ndarray], controls: np.ndarray, min_replicates: int = 5, chunk_rows: int = 8192
) -> np.ndarray:
    """Energy distance of each group of rows of `x` to `controls` (M, D); NaN for groups below `min_replicates`."""
    yy = pairwise_distances(controls, controls).mean()
    out = np.full(len(groups), np.nan)
    valid = [k for k, g in enumerate(groups) if len(g) >= min_replicates]
    for c0 in range(0, len(valid), max(1, chunk_rows // 8)):
        ks = valid[c0 : c0 + max(1, chunk_rows // 8)]
        rows = np.concatenate([groups[k] for k in ks])
        xy = pairwise_distances(x[rows], controls).mean(axis=1)
        start = 0
        for k in ks:
            n = len(groups[k])
            xk = x[groups[k]]
            out[k] = 2 * xy[start : start + n].mean() - pairwise_distances(xk, xk).mean() - yy
            start += n
    return out


def signal_magnitude(
    features,
    metadata: pd.DataFrame | None = None,
    *,
    negative_controls,
    control_key: str,
    perturbation_col: str = "perturbation",
    labels=None,
    max_controls: int = 1000,
    min_replicates: int = 5,
    drop=(),
    seed: int = 0,
    efaar_quirk: bool = False,
) -> pd.DataFrame:
    """Per perturbation: energy distance to controls and its p-value. DataFrame(pert, edist, pval, n_replicates)."""
    x = as_features(features)
    lab = as_labels(metadata[perturbation_col] if labels is None else labels, len(x), perturbation_col).astype(str)
    keep = ~np.isin(lab, np.asarray(list(map(str, drop))))
    x, lab = x[keep], lab[keep]
    is_ctrl = lab == str(control_key)
    check_has_controls(is_ctrl, f"control wells ({perturbation_col} == {control_key!r})")
    ctrl_rows = np.nonzero(is_ctrl)[0]
    if len(ctrl_rows) > max_controls:
        ctrl_rows = np.sort(np.random.default_rng(seed).choice(ctrl_rows, max_controls, replace=False))
    controls = x[ctrl_rows]
    uniq, groups = group_rows(lab)
    stat = energy_distances(x, groups, controls, min_replicates)
    is_neg = np.isin(uniq, np.asarray(list(map(str, negative_controls))))
    check_min_count(int(is_neg.sum()), 1, "negative-control perturbations present")
    query = ~is_neg & (uniq != str(control_key))
    p = null_pvalues(stat[query], stat[is_neg], "right", efaar_quirk)
    return pd.DataFrame(
        {
            "pert": uniq[query],
            "edist": stat[query],
            "pval": p,
            "n_replicates": np.array([len(g) for g in groups])[query],
        }
    )
