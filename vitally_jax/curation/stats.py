"""Statistics behind training-set curation: image quality, replicate consistency, Cauchy combination.

Pure numpy functions; shapes in the docstrings. `vitally_jax.curation.core` applies them to a screen.

Replicate consistency of a set of n wells is the mean pairwise cosine of their embeddings. For unit vectors
u_1..u_n, sum_{i != j} u_i . u_j = ||sum u||^2 - n, so

    mean pairwise cosine = (||sum_i u_i||^2 - n) / (n (n - 1)).

The permutation null draws random sets of wells from a pool of the same experiment (`curation` uses its
negative-control wells). A random ordering prefix of length n is a uniform random n-subset, so one draw of P
random orderings (prefixes of length n_max) and a cumulative sum gives the null for every set size n <= n_max at
once, shared by all perturbations of that experiment.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy import linalg, sparse

if TYPE_CHECKING:
    import pandas as pd

# ----------------------------------------------------------------------------------------------- image quality


def image_quality(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image quality measures of a batch of uint8 images.

    images: (B, H, W, C) uint8 (H, W >= 3).
    Returns float64 arrays of shape (B,):
      `contrast`   max over channels of the per-channel pixel standard deviation (0 for a blank image);
      `saturation` max over channels of the fraction of pixels at 255;
      `focus`      mean over channels of the variance of the 4-neighbour Laplacian (low = out of focus);
      `cobright`   the fraction of pixels that are above their channel's 95th percentile in every channel at once
                   (autofluorescent debris is bright in all channels; stained structures are not).
    """
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[1] < 3 or x.shape[2] < 3:
        raise ValueError(f"images: expected (B, H, W, C) with H, W >= 3, got shape {x.shape}")
    b, _, _, c = x.shape
    contrast = np.empty(b)
    saturation = np.empty(b)
    focus = np.empty(b)
    cobright = np.empty(b)
    for i in range(b):  # one image at a time keeps float copies small for 2048x2048 wells
        img = x[i].astype(np.float32)
        contrast[i] = img.reshape(-1, c).std(axis=0, dtype=np.float64).max()
        saturation[i] = (x[i] == 255).reshape(-1, c).mean(axis=0).max()
        lap = (img[:-2, 1:-1] + img[2:, 1:-1] + img[1:-1, :-2] + img[1:-1, 2:]) - 4.0 * img[1:-1, 1:-1]
        focus[i] = lap.reshape(-1, c).var(axis=0, dtype=np.float64).mean()
        flat = img.reshape(-1, c)
        q95 = np.quantile(flat, 0.95, axis=0)
        cobright[i] = (flat > np.maximum(q95, flat.min(axis=0))).all(axis=1).mean()
    return {"contrast": contrast, "saturation": saturation, "focus": focus, "cobright": cobright}


def store_quality(store, batch_size: int = 32) -> pd.DataFrame:
    """`image_quality` of every image of an `ImageStore`, read `batch_size` images at a time.

    Returns a DataFrame (N rows, aligned with `store.metadata`) with columns contrast, saturation, focus,
    cobright.
    """
    import pandas as pd

    n = len(store)
    cols: dict[str, list] = {"contrast": [], "saturation": [], "focus": [], "cobright": []}
    for start in range(0, n, max(1, int(batch_size))):
        q = image_quality(store.read_many(start, min(n, start + batch_size)))
        for k in cols:
            cols[k].append(q[k])
    return pd.DataFrame({k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items()})


# ------------------------------------------------------------------------------------ replicate consistency


def well_means(x: np.ndarray, wells: np.ndarray, n_wells: int) -> np.ndarray:
    """Mean of rows x (N, D) per well code in [0, n_wells) -> (n_wells, D) float32 (rows of empty wells 0)."""
    counts = np.bincount(wells, minlength=n_wells)
    if len(wells) == n_wells and (counts == 1).all():  # one image per well: a reordering
        out = np.empty((n_wells, x.shape[1]), np.float32)
        out[wells] = x
        return out
    agg = sparse.csr_matrix(
        (np.ones(len(wells), np.float32), (wells, np.arange(len(wells)))), shape=(n_wells, len(wells))
    )
    return np.asarray(agg @ np.asarray(x, np.float32)) / np.maximum(counts, 1)[:, None].astype(np.float32)


def center_scale(x: np.ndarray, batches: np.ndarray) -> np.ndarray:
    """Per batch: subtract the mean and divide by the std of each feature (constant features: scale 1)."""
    out = np.empty_like(x, dtype=np.float32)
    for b in np.unique(batches):
        sel = batches == b
        xb = x[sel].astype(np.float64)
        sd = xb.std(axis=0)
        out[sel] = (xb - xb.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    return out


def moments(x: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """(n, sum of rows (D,), sum of outer products (D, D)) of x (n, D), float64. Moments of disjoint row sets
    add, so those of a subset can be subtracted from the whole (see `covariance`)."""
    x = np.asarray(x, np.float64)
    return len(x), x.sum(axis=0), x.T @ x


def covariance(n: int, total: np.ndarray, outer: np.ndarray) -> np.ndarray:
    """Sample covariance (D, D) (ddof 1, n >= 2) of rows with the given `moments`."""
    mean = total / n
    return (outer - n * np.outer(mean, mean)) / (n - 1)


def whiten(x: np.ndarray, ref: np.ndarray | None, shrinkage: float, *, cov: np.ndarray | None = None) -> np.ndarray:
    """Whiten x (N, D) by S = cov(ref) + shrinkage I (or the given `cov` + shrinkage I): returns x L^-T with
    S = L L^T (Cholesky), float32.

    Every whitening W with W^T S W = I gives the same inner products (x W)(y W)^T = x S^-1 y^T, so cosines do
    not depend on the choice; Cholesky is the cheapest. A tiny ridge keeps a singular S (shrinkage 0) usable.
    """
    d = x.shape[1]
    if cov is None:
        cov = np.cov(np.asarray(ref, np.float64), rowvar=False)
    s = np.asarray(cov, np.float64).reshape(d, d) + shrinkage * np.eye(d)
    s += 1e-9 * max(float(np.trace(s)) / d, 1e-12) * np.eye(d)
    chol = linalg.cholesky(s, lower=True)
    inv_t = linalg.solve_triangular(chol, np.eye(d), lower=True).T.astype(np.float32)  # L^-T
    return np.asarray(x, np.float32) @ inv_t


def unit_rows(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows of x (N, D) scaled to unit L2 norm (zero rows stay zero); float32."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, eps)


def mean_pairwise_cosine(x: np.ndarray) -> float:
    """Mean cosine similarity over all pairs i < j of the rows of x (n, D), n >= 2 (direct O(n^2) form)."""
    u = unit_rows(x).astype(np.float64)
    n = len(u)
    if n < 2:
        raise ValueError(f"mean_pairwise_cosine needs at least 2 rows, got {n}")
    g = u @ u.T
    return float(g[np.triu_indices(n, 1)].mean())


def _random_prefixes(rng: np.random.Generator, pool: int, k: int, n_draws: int) -> np.ndarray:
    """(n_draws, k) int64: each row the first k entries of a uniform random ordering of range(pool), k <= pool."""
    if k * k <= 4 * pool:
        # Floyd's sampling: a uniform random k-subset per row in O(k^2), then a random order within the row.
        idx = np.empty((n_draws, k), dtype=np.int64)
        for i, j in enumerate(range(pool - k, pool)):
            t = rng.integers(0, j + 1, size=n_draws)
            dup = (idx[:, :i] == t[:, None]).any(axis=1)
            idx[:, i] = np.where(dup, j, t)
        return rng.permuted(idx, axis=1)
    keys = rng.random((n_draws, pool))
    return np.argsort(keys, axis=1)[:, :k]


def null_mean_cosines(
    u: np.ndarray, max_size: int, n_permutations: int, rng: np.random.Generator, chunk: int = 128
) -> np.ndarray:
    """Permutation null of the mean pairwise cosine of random well sets drawn from one experiment.

    u: (M, D) unit-norm well embeddings of the experiment. Returns (n_permutations, max_size + 1) float64;
    column n holds the null statistics for sets of n wells (columns 0 and 1 are NaN).
    """
    m = len(u)
    if max_size > m:
        raise ValueError(f"set size {max_size} exceeds the {m} wells available")
    out = np.full((n_permutations, max_size + 1), np.nan)
    if max_size < 2:
        return out
    sizes = np.arange(1, max_size + 1, dtype=np.float64)
    for s in range(0, n_permutations, chunk):
        p = min(chunk, n_permutations - s)
        idx = _random_prefixes(rng, m, max_size, p)
        run = np.zeros((p, u.shape[1]), np.float32)  # running sum of the first n wells of each draw
        sq = np.empty((p, max_size))
        for n in range(max_size):  # in place, row-contiguous: ~10x faster than cumsum over the middle axis
            run += u[idx[:, n]]
            sq[:, n] = np.einsum("pd,pd->p", run, run)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[s : s + p, 1:] = (sq - sizes) / (sizes * (sizes - 1.0))
    out[:, 1] = np.nan
    return out


def group_mean_cosines(u: np.ndarray, groups: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean pairwise cosine of each group of rows.

    u: (M, D) unit rows; groups: (M,) int in [0, n_groups) or -1 for rows in no group.
    Returns (stat (n_groups,) float64, NaN where a group has < 2 rows; size (n_groups,) int64).
    """
    groups = np.asarray(groups)
    sel = groups >= 0
    size = np.bincount(groups[sel], minlength=n_groups).astype(np.int64)
    rows = np.flatnonzero(sel)
    agg = sparse.csr_matrix((np.ones(len(rows)), (groups[sel], rows)), shape=(n_groups, len(groups)))
    sums = np.asarray(agg @ u.astype(np.float64))
    sq = np.einsum("gd,gd->g", sums, sums)
    with np.errstate(invalid="ignore", divide="ignore"):
        stat = (sq - size) / (size * (size - 1.0))
    stat[size < 2] = np.nan
    return stat, size


def permutation_pvalues(
    u: np.ndarray,
    groups: np.ndarray,
    n_groups: int,
    n_permutations: int,
    rng: np.random.Generator,
    pool: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Replicate-consistency p-values of groups of wells within ONE experiment.

    u: (M, D) unit-norm embeddings of the wells of the experiment; groups: (M,) group index or -1; pool: (M,)
    bool, the wells the null draws from (None: all M). p = (#{null >= observed} + 1) / (n_permutations + 1),
    the null drawn as random sets of the group's size from the pool wells; sets of one size share the same
    draws. Returns (p, stat, size), each (n_groups,); p and stat are NaN for groups with fewer than 2 wells.
    """
    stat, size = group_mean_cosines(u, groups, n_groups)
    p = np.full(n_groups, np.nan)
    ok = size >= 2
    if not ok.any():
        return p, stat, size
    ref = u if pool is None else u[np.asarray(pool, bool)]
    null = null_mean_cosines(ref, int(size[ok].max()), n_permutations, rng)
    for n in np.unique(size[ok]):
        col = np.sort(null[:, n])
        g = np.flatnonzero(size == n)
        n_ge = n_permutations - np.searchsorted(col, stat[g], side="left")
        p[g] = (n_ge + 1.0) / (n_permutations + 1.0)
    return p, stat, size


# -------------------------------------------------------------------------------------- Cauchy combination


def cauchy_combination(p: np.ndarray, weights: np.ndarray | None = None, axis: int = -1) -> np.ndarray:
    """Cauchy combination test (Liu & Xie 2020) over `axis`, ignoring NaN entries.

    T = sum_k w_k tan((0.5 - p_k) pi), w_k = 1/K over the K non-NaN entries unless `weights` are given
    (then renormalised over the non-NaN entries); combined p = 0.5 - arctan(T) / pi.
    Returns p with `axis` removed; NaN where every entry is NaN. p_k must lie in (0, 1].
    """
    p = np.moveaxis(np.asarray(p, dtype=np.float64), axis, -1)
    valid = ~np.isnan(p)
    if np.any((p[valid] <= 0) | (p[valid] > 1)):
        raise ValueError("p-values for the Cauchy combination must lie in (0, 1]")
    w = np.ones_like(p) if weights is None else np.broadcast_to(np.asarray(weights, np.float64), p.shape).copy()
    w = np.where(valid, w, 0.0)
    wsum = w.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        w = w / wsum
        pc = np.where(valid, p, 0.5)
        # tan((0.5 - p) pi) = 1 / tan(p pi); the second form keeps precision for tiny p
        t = np.where(pc < 1e-15, 1.0 / (pc * np.pi), np.tan((0.5 - pc) * np.pi))
        stat = (w * t).sum(axis=-1)
        # 0.5 - arctan(T)/pi, written as arctan(1/T)/pi for large T to keep small p-values exact
        out = np.where(stat > 1.0, np.arctan(1.0 / stat) / np.pi, 0.5 - np.arctan(stat) / np.pi)
    return np.where(wsum[..., 0] > 0, out, np.nan)
