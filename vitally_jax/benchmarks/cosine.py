"""Cosine similarity with the exact numerics of scikit-learn's `cosine_similarity` (float64).

Rows are L2-normalised with `einsum`-based norms; all-zero rows keep norm 1, so their cosine with anything is 0
(the EFAAR/scikit-learn convention). Every benchmark takes its cosines from here, so a pair's value is the same
bits wherever it is used.
"""

from __future__ import annotations

import numpy as np


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """(N, D) -> (N, D) float64 rows of unit L2 norm (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    norms[norms < 10 * np.finfo(np.float64).eps] = 1.0
    return x / norms[:, None]


def cosine_matrix(x: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
    """(N, D), (M, D) -> (N, M) cosine similarities; `y=None` means `x` against itself."""
    xn = normalize_rows(x)
    yn = xn if y is None else normalize_rows(y)
    return xn @ yn.T


def upper_triangle(s: np.ndarray) -> np.ndarray:
    """(N, N) -> (N*(N-1)/2,) entries above the diagonal, row-major."""
    return s[np.triu_indices(s.shape[0], k=1)]
