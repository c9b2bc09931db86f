"""Normalised average precision: AP rescaled so that a random ranking scores 0 and a perfect one 1 (copairs 0.5.5).

For a query with M positives among L = M + N ranked items, the expected AP of a uniformly random ranking is the
exact finite-sample value

    mu0 = (1 / L) * ((M - 1) / (L - 1) * (L - H_L) + H_L),     H_L = sum_{k=1..L} 1 / k,

with mu0 = 1 when every item is positive (or L = 1 and M = 1) and mu0 = 0 when M = 0. The normalised score is
(AP - mu0) / max(1 - mu0, 1e-10), clipped to [-1, 1]. Unlike AP, it does not rise with the share of positives, so
it can be compared across queries with different (M, L).
"""

from __future__ import annotations

import numpy as np

from vitally_jax.errors import BenchmarkInputError

_EPS = 1e-10


def _harmonic(n: np.ndarray) -> np.ndarray:
    """H_n for an integer array (H_0 = 0), summed in increasing k (the same float64 rounding as a plain loop)."""
    top = int(n.max()) if n.size else 0
    table = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, top + 1, dtype=np.float64))])
    return table[n]


def expected_average_precision(n_pos, n_total) -> np.ndarray:
    """Expected AP of a random ranking with `n_pos` positives among `n_total` items (arrays broadcast)."""
    m = np.asarray(n_pos, dtype=np.int64)
    length = np.asarray(n_total, dtype=np.int64)
    m, length = np.broadcast_arrays(m, length)
    if np.any(length < 1) or np.any(m < 0) or np.any(m > length):
        raise BenchmarkInputError("normalised AP: expected 0 <= n_pos_pairs <= n_total_pairs and n_total_pairs >= 1")
    h = _harmonic(length)
    lf, mf = length.astype(np.float64), m.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        mu0 = (1.0 / lf) * (((mf - 1.0) / (lf - 1.0)) * (lf - h) + h)
    mu0 = np.where(m == 0, 0.0, mu0)
    mu0 = np.where(m == length, 1.0, mu0)  # includes L = 1, M = 1
    return mu0


def normalized_average_precision(ap, n_pos, n_total) -> np.ndarray:
    """(AP - mu0) / (1 - mu0) clipped to [-1, 1]; NaN where AP is NaN or the query has no pairs."""
    ap = np.asarray(ap, dtype=np.float64)
    m = np.asarray(n_pos, dtype=np.int64)
    length = np.asarray(n_total, dtype=np.int64)
    ok = (length >= 1) & np.isfinite(ap)
    out = np.full(np.broadcast(ap, m, length).shape, np.nan)
    if ok.any():
        ap_b, m_b, l_b, ok_b = np.broadcast_arrays(ap, m, length, ok)
        mu0 = expected_average_precision(m_b[ok_b], l_b[ok_b])
        out[ok_b] = np.clip((ap_b[ok_b] - mu0) / np.maximum(1.0 - mu0, _EPS), -1.0, 1.0)
    return out
