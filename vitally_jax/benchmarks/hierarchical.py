"""Two-stage (hierarchical) false-discovery control for grouped hypotheses, as copairs 0.5.5's `hierarchical_by`.

Typical use: one mAP test per compound x dose, grouped by compound. Only high doses are expected to be active, so
correcting all compound x dose tests together spends power on doses nobody expects to act.

- Stage 1: a family's p-value is the minimum p-value of its members; Benjamini-Hochberg over families; a family
  passes when its BH decision at level `alpha` rejects (p_(i) <= alpha * i / n for some i at or above its rank).
- Stage 2: within each family that passed, BH over its members (a one-member family keeps its p-value); members of
  a family that did not pass get corrected p-value 1.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from vitally_jax.benchmarks.validate import as_labels
from vitally_jax.errors import BenchmarkInputError


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """BH-adjusted p-values (same as statsmodels `multipletests(method='fdr_bh')`)."""
    p = np.asarray(p, np.float64)
    order = np.argsort(p, kind="mergesort")
    n = len(p)
    adj = p[order] / (np.arange(1, n + 1) / n)
    adj = np.minimum.accumulate(adj[::-1])[::-1]
    out = np.empty(n)
    out[order] = np.minimum(adj, 1.0)
    return out


def bh_reject(p: np.ndarray, alpha: float) -> np.ndarray:
    """Benjamini-Hochberg decisions at level `alpha` (the step-up rule, as statsmodels `multipletests`)."""
    p = np.asarray(p, np.float64)
    order = np.argsort(p, kind="mergesort")
    n = len(p)
    ok = p[order] <= np.arange(1, n + 1) / n * alpha
    out = np.zeros(n, bool)
    if ok.any():
        out[order[: int(np.nonzero(ok)[0].max()) + 1]] = True
    return out


def hierarchical_fdr(p_values, families, *, alpha: float = 0.05) -> pd.DataFrame:
    """Corrected p-values for tests `p_values` (K,) grouped by `families` (K,) labels.

    Returns a DataFrame aligned with the input: corrected_p_value, stage1_p_value, stage1_corrected_p_value,
    stage1_significant.
    """
    p = np.asarray(p_values, np.float64)
    if p.ndim != 1 or np.any(~np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise BenchmarkInputError("p_values: expected a 1-D array of finite p-values in [0, 1]")
    fam = as_labels(families, len(p), "hierarchical_by").astype(str)
    names, inv = np.unique(fam, return_inverse=True)
    inv = inv.ravel()
    stage1 = np.full(len(names), np.inf)
    np.minimum.at(stage1, inv, p)
    stage1_corr = benjamini_hochberg(stage1)
    passed = bh_reject(stage1, alpha)
    corrected = np.ones(len(p))
    for k in np.nonzero(passed)[0]:
        idx = np.nonzero(inv == k)[0]
        corrected[idx] = p[idx] if len(idx) == 1 else benjamini_hochberg(p[idx])
    return pd.DataFrame(
        {
            "corrected_p_value": corrected,
            "stage1_p_value": stage1[inv],
            "stage1_corrected_p_value": stage1_corr[inv],
            "stage1_significant": passed[inv],
        }
    )
