"""Replicate consistency across batches: are a perturbation's replicate wells in DIFFERENT batches more similar
than random well pairs from different batches?

Definition used here (the paper does not publish its exact one):
- replicate pairs: every pair of wells of the same (non-control) perturbation lying in different batches;
- random pairs: `n_random` pairs of wells of different (non-control) perturbations lying in different batches,
  drawn uniformly with `seed`;
- statistics: two-sample Kolmogorov-Smirnov and Cramer-von Mises statistics (with p-values) between the cosine
  similarities of the two sets, plus both means. Higher statistics mean replicates agree across batches, i.e. the
  map keeps biology while removing batch effects. At most `max_pairs` replicate pairs are used (seeded subsample).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import cramervonmises_2samp, ks_2samp

from vitally_jax.benchmarks.consistency import group_rows
from vitally_jax.benchmarks.cosine import normalize_rows
from vitally_jax.benchmarks.validate import as_features, as_labels
from vitally_jax.errors import BenchmarkInputError


def replicate_pair_cosines(x: np.ndarray, labels: np.ndarray, batches: np.ndarray) -> np.ndarray:
    """Cosines of all same-label well pairs in different batches (batched by group size)."""
    xn = normalize_rows(x)
    _, groups = group_rows(labels)
    _, bcode = np.unique(batches.astype(str), return_inverse=True)
    sizes = np.array([len(g) for g in groups])
    out = []
    for n in np.unique(sizes):
        if n < 2:
            continue
        rows = np.stack([groups[k] for k in np.nonzero(sizes == n)[0]])  # (G, n)
        v = xn[rows]
        gram = np.matmul(v, v.transpose(0, 2, 1))
        iu = np.triu_indices(n, k=1)
        b = bcode.ravel()[rows]
        diff = b[:, iu[0]] != b[:, iu[1]]
        out.append(gram[:, iu[0], iu[1]][diff])
    return np.concatenate(out) if out else np.zeros(0)


def random_pair_cosines(x: np.ndarray, labels: np.ndarray, batches: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Cosines of `n` random pairs with different labels and different batches."""
    xn = normalize_rows(x)
    rng = np.random.default_rng(seed)
    _, lab = np.unique(labels.astype(str), return_inverse=True)
    _, bat = np.unique(batches.astype(str), return_inverse=True)
    got, total = [], 0
    for _ in range(100):
        i = rng.integers(len(x), size=2 * n)
        j = rng.integers(len(x), size=2 * n)
        ok = (lab[i] != lab[j]) & (bat[i] != bat[j])
        i, j = i[ok], j[ok]
        got.append(np.einsum("ij,ij->i", xn[i], xn[j]))
        total += len(i)
        if total >= n:
            break
    return np.concatenate(got)[:n]


def replicate_consistency(
    features, labels, batches, *, controls=(), n_random: int = 20000, max_pairs: int = 200000, seed: int = 0
) -> dict:
    """KS and Cramer-von Mises between replicate-pair and random-pair cosines across batches. Returns a dict."""
    x = as_features(features)
    lab = as_labels(labels, len(x)).astype(str)
    bat = as_labels(batches, len(x), "batch").astype(str)
    keep = ~np.isin(lab, np.asarray(list(map(str, controls))))
    x, lab, bat = x[keep], lab[keep], bat[keep]
    if len(np.unique(bat)) < 2:
        raise BenchmarkInputError("batch: replicate consistency across batches needs at least 2 batches")
    rep = replicate_pair_cosines(x, lab, bat)
    if len(rep) == 0:
        raise BenchmarkInputError("replicates: no perturbation has wells in two different batches")
    rng = np.random.default_rng(seed)
    if len(rep) > max_pairs:
        rep = rng.choice(rep, max_pairs, replace=False)
    rnd = random_pair_cosines(x, lab, bat, n_random, seed + 1)
    ks = ks_2samp(rep, rnd)
    cvm = cramervonmises_2samp(rep, rnd)
    return {
        "n_replicate_pairs": int(len(rep)),
        "n_random_pairs": int(len(rnd)),
        "mean_replicate_cosine": float(rep.mean()),
        "mean_random_cosine": float(rnd.mean()),
        "ks_stat": float(ks.statistic),
        "ks_pval": float(ks.pvalue),
        "cvm_stat": float(cvm.statistic),
        "cvm_pval": float(cvm.pvalue),
        "_replicate_cosines": rep,
        "_random_cosines": rnd,
    }
