"""Compound-gene activity prediction (RxRx3-core style): does a compound's profile resemble the knockout profiles of
the genes it acts on?

- score(compound, gene) = max over the compound's concentrations of |cos(compound profile, gene profile)|;
- actives: known (compound, gene) pairs with potency <= 1,000 nM; pairs with 1,000 < potency <= 10,000 nM are a
  grey zone and excluded; every other gene of the map is a candidate negative;
- per compound with at least one active gene in the map: max(2 x #actives, 20) negatives are sampled (seeded);
  average precision (AP) and ROC-AUC of the scores; mean and median over compounds;
- repeated for `n_seeds` seeds and averaged; the same is done with uniform random scores, and
  z = (mean AP - mean random AP) / std of random AP over seeds.
AP uses scikit-learn's step definition (ties grouped); AUC is the Mann-Whitney statistic (ties count 1/2).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from vitally_jax.benchmarks.cosine import cosine_matrix
from vitally_jax.benchmarks.validate import as_features, as_labels
from vitally_jax.errors import BenchmarkInputError

ACTIVE_NM = 1000.0
GREY_NM = 10000.0


def average_precision(y: np.ndarray, s: np.ndarray) -> float:
    """scikit-learn `average_precision_score` for binary labels y and scores s."""
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # end of each tie group
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1)
    recall = tp / y.sum()
    return float(np.sum(np.diff(np.r_[0, recall]) * precision))


def roc_auc(y: np.ndarray, s: np.ndarray) -> float:
    """ROC-AUC via ranks with ties averaged (equals scikit-learn `roc_auc_score`)."""
    from scipy.stats import rankdata

    r = rankdata(s)
    n1 = y.sum()
    n0 = len(y) - n1
    return float((r[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def compound_gene_scores(compound_features, compound_labels, gene_features, gene_labels) -> pd.DataFrame:
    """|cos| between compound profiles (one row per compound x concentration) and gene profiles, max over
    concentrations -> DataFrame (compounds x genes)."""
    c = as_features(compound_features, "compound profiles")
    g = as_features(gene_features, "gene profiles")
    cl = as_labels(compound_labels, len(c), "compound").astype(str)
    gl = as_labels(gene_labels, len(g), "gene").astype(str)
    s = np.abs(cosine_matrix(c, g))
    return pd.DataFrame(s, columns=gl).groupby(cl, sort=True).max()


def compound_gene_activity(
    scores: pd.DataFrame,
    known: pd.DataFrame,
    *,
    n_seeds: int = 100,
    min_negatives: int = 20,
    compound_col: str = "compound",
    gene_col: str = "gene",
    potency_col: str = "potency_nM",
) -> dict:
    """Score a compounds x genes score table against known activities (compound, gene, potency in nM)."""
    for col in (compound_col, gene_col, potency_col):
        if col not in known.columns:
            raise BenchmarkInputError(f"known activities: missing column {col!r}")
    genes = np.asarray(scores.columns.astype(str))
    gpos = {g: i for i, g in enumerate(genes)}
    tasks = []
    for comp, sub in known.groupby(known[compound_col].astype(str)):
        if comp not in scores.index:
            continue
        pot = sub[potency_col].astype(float).to_numpy()
        gs = sub[gene_col].astype(str).to_numpy()
        act = sorted({gpos[g] for g, p in zip(gs, pot) if p <= ACTIVE_NM and g in gpos})
        grey = {gpos[g] for g, p in zip(gs, pot) if ACTIVE_NM < p <= GREY_NM and g in gpos}
        if not act:
            continue
        cand = np.setdiff1d(np.arange(len(genes)), np.array(sorted(set(act) | grey), dtype=int))
        tasks.append((comp, np.array(act), cand, scores.loc[comp].to_numpy(np.float64)))
    if not tasks:
        raise BenchmarkInputError("known activities: no compound has an active gene (<= 1000 nM) in the map")
    per_seed = {k: [] for k in ("ap_mean", "ap_median", "auc_mean", "auc_median", "rand_ap_mean")}
    for seed in range(n_seeds):
        rng = np.random.default_rng(seed)
        aps, aucs, raps = [], [], []
        for _comp, act, cand, s in tasks:
            n_neg = min(len(cand), max(2 * len(act), min_negatives))
            neg = rng.choice(cand, n_neg, replace=False)
            y = np.r_[np.ones(len(act)), np.zeros(n_neg)]
            sc = np.r_[s[act], s[neg]]
            aps.append(average_precision(y, sc))
            aucs.append(roc_auc(y, sc) if n_neg else np.nan)
            raps.append(average_precision(y, rng.uniform(size=len(y))))
        per_seed["ap_mean"].append(np.mean(aps))
        per_seed["ap_median"].append(np.median(aps))
        per_seed["auc_mean"].append(np.nanmean(aucs))
        per_seed["auc_median"].append(np.nanmedian(aucs))
        per_seed["rand_ap_mean"].append(np.mean(raps))
    r = {k: float(np.mean(v)) for k, v in per_seed.items()}
    sd = float(np.std(per_seed["rand_ap_mean"], ddof=1)) if n_seeds > 1 else float("nan")
    r["rand_ap_std"] = sd
    r["z_score"] = (r["ap_mean"] - r["rand_ap_mean"]) / sd if sd > 0 else float("nan")
    r["n_compounds"] = len(tasks)
    r["n_seeds"] = n_seeds
    return r
