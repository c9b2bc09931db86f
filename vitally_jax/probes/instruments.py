"""Instruments with error bars for comparing representations of a screen.

- `repeated_group_cv`: the gene-group probe scored by stratified k-fold cross-validation over genes, repeated over
  several CV seeds (every block of a representation in one probe call per fold): mean and SD over the seeds.
- `recall_pair_hits` / `paired_bootstrap_recall`: known-relationship recall as a mean of per-pair indicators
  (a pair counts when its cosine lies in the lower `lo` or upper `hi` tail of all gene-gene cosines, exactly as
  `vitally_jax.benchmarks.recall`), and a paired bootstrap over the annotated pairs of the difference in recall
  between two maps of the same genes (the null thresholds are held fixed; the resampling unit is the pair).
- `decoding_r2`: cross-validated R² of each true process from a representation (ridge regression, folds grouped
  by perturbation so that no perturbation is in both the training and the test folds).
- `verdict`: holds / fails / not resolved from an interval of a difference.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from vitally_jax.errors import BenchmarkInputError, ConfigError
from vitally_jax.probes.linear import LinearProbe, balanced_accuracy


# --------------------------------------------------------------------------------------------- gene-group probe
def repeated_group_cv(
    x: np.ndarray,
    labels: Sequence[str],
    *,
    probe: LinearProbe,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    n_splits=5,
    return_correct: bool = False,
):
    """x (nb, n, D) of labelled items (genes), labels (n,) -> balanced accuracy (nb, len(seeds)) of pooled
    out-of-fold predictions of a stratified `n_splits`-fold CV, one column per CV seed. With `return_correct`,
    also the share of seeds in which each item was predicted correctly (nb, n), for `paired_bootstrap_balanced`."""
    from sklearn.model_selection import StratifiedKFold

    x = np.asarray(x, np.float32)
    y = np.asarray(labels).astype(str)
    if x.ndim != 3 or x.shape[1] != len(y):
        raise BenchmarkInputError(f"gene-group probe: expected x (blocks, {len(y)}, D), got {x.shape}")
    counts = pd.Series(y).value_counts()
    if len(counts) < 2 or counts.min() < n_splits:
        raise BenchmarkInputError(
            f"gene-group probe: need >= 2 groups of >= {n_splits} items (n_splits), got sizes {sorted(counts)}"
        )
    out = np.zeros((x.shape[0], len(seeds)))
    correct = np.zeros((x.shape[0], len(y)))
    for j, seed in enumerate(seeds):
        pred = np.empty((x.shape[0], len(y)), dtype=object)
        for tr, te in StratifiedKFold(n_splits, shuffle=True, random_state=int(seed)).split(y, y):
            pred[:, te] = probe.fit_predict(x[:, tr], y[tr], x[:, te])
        out[:, j] = [balanced_accuracy(y, p.astype(str)) for p in pred]
        correct += pred.astype(str) == y[None]
    return (out, correct / len(seeds)) if return_correct else out


def paired_bootstrap_balanced(
    correct_a: np.ndarray, correct_b: np.ndarray, labels: Sequence[str], *, n_boot: int = 2000, seed: int = 0
) -> dict:
    """Difference in balanced accuracy a - b with a paired bootstrap over items (genes resampled together for
    both): per-item correctness (n,) in [0, 1] (e.g. the share of CV seeds), labels (n,). Balanced accuracy of a
    resample = mean over its classes of the mean correctness of its items of that class."""
    a, b = np.asarray(correct_a, np.float64), np.asarray(correct_b, np.float64)
    codes, uniq = pd.factorize(np.asarray(labels).astype(str))
    if a.shape != b.shape or a.shape != codes.shape:
        raise BenchmarkInputError(f"paired bootstrap: expected equal shapes, got {a.shape} {b.shape} {codes.shape}")
    onehot = np.eye(len(uniq))[codes]  # (n, K)
    rng = np.random.default_rng(seed)
    w = np.zeros((n_boot, len(a)))
    np.add.at(w, (np.repeat(np.arange(n_boot), len(a)), rng.integers(0, len(a), n_boot * len(a))), 1.0)

    def bal(c, weights):
        per_class_n = weights @ onehot
        per_class = (weights * c) @ onehot / np.maximum(per_class_n, 1e-12)
        return np.where(per_class_n > 0, per_class, np.nan)

    full = np.ones((1, len(a)))
    va, vb = np.nanmean(bal(a, full)), np.nanmean(bal(b, full))
    d = np.nanmean(bal(a, w), axis=1) - np.nanmean(bal(b, w), axis=1)
    return {
        "value": float(va - vb),
        "lo": float(np.quantile(d, 0.025)),
        "hi": float(np.quantile(d, 0.975)),
        "a": float(va),
        "b": float(vb),
        "items": int(len(a)),
    }


# ------------------------------------------------------------------------------------------------------ recall
def recall_pair_hits(
    gmap: np.ndarray, genes: Sequence[str], source, *, lo: float = 0.05, hi: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """Per-pair recall indicators of a gene map (G, D): (hits (Q,) bool, pairs (Q, 2) row indices) for the annotated
    pairs of `source` (a bundled name, CSV path or DataFrame entity1, entity2) with both genes in the map; the
    mean of `hits` is `known_relationship_recall`'s recall at (lo, hi)."""
    from vitally_jax.benchmarks.annotations import load_relationships, relationship_index_pairs
    from vitally_jax.benchmarks.cosine import cosine_matrix, upper_triangle

    labels = np.asarray(genes).astype(str)
    pairs = relationship_index_pairs(load_relationships(source), labels, source=str(source)[:40], warn_unknown=False)
    if len(pairs) == 0:
        raise BenchmarkInputError(f"recall: no annotated pair of {str(source)[:40]!r} has both genes in the map")
    s = cosine_matrix(np.asarray(gmap, np.float64))
    null = np.sort(upper_triangle(s))
    q = s[pairs[:, 0], pairs[:, 1]]
    rank_left = np.searchsorted(null, q, "left") / len(null)
    rank_right = np.searchsorted(null, q, "right") / len(null)
    return (rank_right <= lo) | (rank_left >= hi), pairs


def bootstrap_mean(hits: np.ndarray, *, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean of per-pair indicators with a percentile bootstrap interval over pairs."""
    hits = np.asarray(hits, np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(hits), (n_boot, len(hits)))
    boots = hits[idx].mean(axis=1)
    a = (1 - level) / 2
    return {"value": float(hits.mean()), "lo": float(np.quantile(boots, a)), "hi": float(np.quantile(boots, 1 - a))}


def paired_bootstrap_recall(
    hits_a: np.ndarray, hits_b: np.ndarray, *, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> dict:
    """Recall difference a - b over the same pairs with a paired percentile bootstrap interval (pairs resampled
    together for both maps): {value, lo, hi, a, b, pairs}."""
    a, b = np.asarray(hits_a, np.float64), np.asarray(hits_b, np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise BenchmarkInputError(
            f"paired bootstrap: expected equal, non-empty 1-d hit vectors, got {a.shape} {b.shape}"
        )
    d = bootstrap_mean(a - b, n_boot=n_boot, seed=seed, level=level)
    return {**d, "a": float(a.mean()), "b": float(b.mean()), "pairs": int(len(a))}


# ---------------------------------------------------------------------------------------------------- decoding
def decoding_r2(
    x: np.ndarray, truth: np.ndarray, groups: Sequence, *, n_splits: int = 5, alphas=(0.1, 1.0, 10.0, 100.0, 1000.0)
) -> np.ndarray:
    """Cross-validated R² of each column of `truth` (n, P) from features `x` (n, D): robust scaling (median, IQR)
    clipped to +-5 (so that a few extreme wells cannot dominate a linear fit), standardisation, and ridge with its
    penalty chosen by leave-one-out inside each training fold; `n_splits` folds grouped by `groups` (n,).
    R² = 1 - sum of squared out-of-fold errors / sum of squares about the mean (can be negative)."""
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer, RobustScaler, StandardScaler

    x = np.asarray(x, np.float64)
    t = np.asarray(truth, np.float64)
    if x.ndim != 2 or t.ndim != 2 or len(x) != len(t):
        raise BenchmarkInputError(f"decoding: expected x (n, D) and truth (n, P) with equal n, got {x.shape} {t.shape}")
    groups = np.asarray(groups)
    if len(np.unique(groups)) < n_splits:
        raise BenchmarkInputError(f"decoding: fewer than {n_splits} groups")
    pred = np.zeros_like(t)
    for tr, te in GroupKFold(n_splits).split(x, t, groups):
        model = make_pipeline(RobustScaler(), FunctionTransformer(_clip5), StandardScaler(), RidgeCV(alphas=alphas))
        model.fit(x[tr], t[tr])
        pred[te] = model.predict(x[te])
    ss = np.square(t - t.mean(axis=0)).sum(axis=0)
    return 1.0 - np.square(t - pred).sum(axis=0) / np.maximum(ss, 1e-12)


def _clip5(x):
    return np.clip(x, -5.0, 5.0)


# ----------------------------------------------------------------------------------------------------- verdicts
def verdict(lo: float, hi: float) -> str:
    """'holds' when an interval of (claimed better - other) lies above 0, 'fails' below 0, else 'not resolved'."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "not testable here"
    if lo > hi:
        raise ConfigError(f"verdict: interval lower bound {lo} above upper bound {hi}")
    if lo > 0:
        return "holds"
    if hi < 0:
        return "fails"
    return "not resolved"


def mean_sd_interval(a: np.ndarray, b: np.ndarray, level_z: float = 1.96) -> dict:
    """Difference of two repeated-CV score vectors over the same seeds (paired): mean, and mean +- z SD/sqrt(n)."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    half = level_z * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else np.nan
    return {"value": float(d.mean()), "lo": float(d.mean() - half), "hi": float(d.mean() + half)}
