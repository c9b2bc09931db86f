"""Map alignment: center-scale, PCA, TVN with per-batch CORAL, in float64 (EFAAR_benchmarking 1.0 numerics).

Array-in/array-out cores take `x` (N, D), an optional `batches` (N,) label array and, where controls are used,
`is_control` (N,) bool. `align(...)` is the DataFrame-friendly wrapper. Differences from EFAAR, on purpose:
PCA always uses a full deterministic SVD (EFAAR's scikit-learn default may pick a randomized solver), and
TVN drops principal axes with no control variance when there are fewer controls than features (EFAAR keeps them
and divides rounding noise by ~1e-16).
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
from threadpoolctl import threadpool_limits

from vitally_jax.benchmarks.validate import as_features, as_labels, check_has_controls
from vitally_jax.errors import BenchmarkInputError

_EPS = np.finfo(np.float64).eps


def standard_scaler_fit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) -> mean (D,), scale (D,): population std (ddof 0), ~constant features get scale 1 (scikit-learn rule)."""
    n = x.shape[0]
    mean = x.mean(axis=0)
    var = ((x - mean) ** 2).mean(axis=0)
    constant = var <= n * _EPS * var + (n * mean * _EPS) ** 2
    scale = np.sqrt(var)
    scale[constant] = 1.0
    return mean, scale


def centerscale(x: np.ndarray, batches: np.ndarray | None = None) -> np.ndarray:
    """Standardise every feature, over all rows or within each batch. (N, D) -> (N, D)."""
    x = np.array(x, dtype=np.float64)
    if batches is None:
        mean, scale = standard_scaler_fit(x)
        x -= mean
        x /= scale
        return x
    for idx in _batch_indices(batches, len(x)):
        xb = x[idx]
        mean, scale = standard_scaler_fit(xb)
        xb -= mean
        xb /= scale
        x[idx] = xb
    return x


def centerscale_on_controls(x: np.ndarray, is_control: np.ndarray, batches: np.ndarray | None = None) -> np.ndarray:
    """Standardise with mean/std of the control rows (of each batch, if given). (N, D) -> (N, D)."""
    x = np.array(x, dtype=np.float64)
    is_control = np.asarray(is_control, dtype=bool)
    if batches is None:
        check_has_controls(is_control)
        mean, scale = standard_scaler_fit(x[is_control])
        x -= mean
        x /= scale
        return x
    for idx in _batch_indices(batches, len(x)):
        ctrl = idx[is_control[idx]]
        if len(ctrl) == 0:
            raise BenchmarkInputError(f"batch {batches[idx[0]]!r}: no control wells; expected controls in every batch")
        mean, scale = standard_scaler_fit(x[ctrl])
        xb = x[idx]
        xb -= mean
        xb /= scale
        x[idx] = xb
    return x


def pca_fit(x: np.ndarray, n_components: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic PCA by full SVD. (N, D) -> mean (D,), components (K, D), singular values (K,).

    Signs follow scikit-learn's `svd_flip(u_based_decision=False)`: each component's largest-|.| entry is > 0
    (near-ties go to the first such column, so the result does not depend on the order of the rows).
    K = n_components or min(N, D).
    """
    mean = x.mean(axis=0)
    with threadpool_limits(1):  # small LAPACK calls: threads only add contention (60x slower on a busy host)
        _, s, vt = scipy.linalg.svd(x - mean, full_matrices=False, lapack_driver="gesdd")
    # argmax of |.| with ties (within 1e-9 relative, e.g. the +-1/sqrt(2) components of 2 standardised features)
    # broken towards the first column, so the signs do not depend on rounding, hence not on the row order
    mag = np.abs(vt)
    rows = np.argmax(mag >= mag.max(axis=1, keepdims=True) * (1.0 - 1e-9), axis=1)
    signs = np.sign(vt[np.arange(len(vt)), rows])
    signs[signs == 0] = 1.0
    vt = vt * signs[:, None]
    k = min(x.shape) if n_components is None else int(n_components)
    if not 1 <= k <= min(x.shape):
        raise BenchmarkInputError(f"n_components: expected 1..{min(x.shape)}, got {n_components}")
    return mean, vt[:k], s[:k]


def pca_transform(x: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    """(N, D) -> (N, K) = (x - mean) @ components.T (computed as x @ C.T - mean @ C.T, like scikit-learn)."""
    return x @ components.T - mean @ components.T


def pca(x: np.ndarray, n_components: int | None = 128, batches: np.ndarray | None = None) -> np.ndarray:
    """EFAAR `embed_by_pca`: center-scale (per batch if given), then PCA to `n_components`. (N, D) -> (N, K)."""
    x = centerscale(x, batches)
    k = None if n_components is None else min(int(n_components), *x.shape)
    mean, comps, _ = pca_fit(x, k)
    return pca_transform(x, mean, comps)


def pca_centerscale(
    x: np.ndarray, is_control: np.ndarray, n_components: int | None = 128, batches: np.ndarray | None = None
) -> np.ndarray:
    """PCA (fitted on all wells) followed by center-scale on the controls of each batch. (N, D) -> (N, K)."""
    return centerscale_on_controls(pca(x, n_components, batches), is_control, batches)


def inverse_sqrt_psd(s: np.ndarray) -> np.ndarray:
    """Symmetric positive-definite (D, D) -> S^(-1/2) by eigendecomposition."""
    with threadpool_limits(1):
        w, v = np.linalg.eigh(s)
    return (v / np.sqrt(w)) @ v.T


def tvn_transforms(
    x: np.ndarray,
    is_control: np.ndarray,
    batches: np.ndarray | None = None,
    *,
    coral_ridge: float = 0.5,
    drop_degenerate: bool = True,
) -> list[tuple]:
    """Fit TVN on the control wells -> per batch (row indices (n_b,), matrix (D, K), offset (K,)).

    Aligned rows of batch b are `x[rows] @ matrix + offset`. See `tvn` for the steps.
    """
    x = as_features(x)
    is_control = np.asarray(is_control, dtype=bool)
    check_has_controls(is_control)
    xc = x[is_control]
    m1, s1 = standard_scaler_fit(xc)
    yc = (xc - m1) / s1
    m2, comps, sv = pca_fit(yc)
    if drop_degenerate:
        keep = sv > sv[0] * max(yc.shape) * _EPS if sv[0] > 0 else np.zeros(len(sv), bool)
        if not keep.any():
            raise BenchmarkInputError("control wells: all identical; TVN needs control variation")
        comps = comps[keep]
    yc = pca_transform(yc, m2, comps)
    m3, s3 = standard_scaler_fit(yc)
    yc = (yc - m3) / s3
    # composed affine map of steps 1-3: y = x @ a + c
    a = (comps / s1[None, :]).T / s3[None, :]
    c = ((-m1 / s1 - m2) @ comps.T - m3) / s3
    if batches is None:
        return [(np.arange(len(x)), a, c)]
    out = []
    ctrl_rows = np.nonzero(is_control)[0]
    for idx in _batch_indices(batches, len(x)):
        in_batch = np.isin(ctrl_rows, idx, assume_unique=True)
        if in_batch.sum() < 2:
            raise BenchmarkInputError(
                f"batch {batches[idx[0]]!r}: {int(in_batch.sum())} control wells; CORAL needs at least 2 per batch"
            )
        cov = np.cov(yc[in_batch], rowvar=False, ddof=1) + coral_ridge * np.eye(a.shape[1])
        w = inverse_sqrt_psd(np.atleast_2d(cov))
        out.append((idx, a @ w, c @ w))
    return out


def tvn(
    x: np.ndarray,
    is_control: np.ndarray,
    batches: np.ndarray | None = None,
    *,
    coral_ridge: float = 0.5,
    drop_degenerate: bool = True,
) -> np.ndarray:
    """Typical variation normalisation on controls, with per-batch CORAL. (N, D) -> (N, K), K = min(D, #controls).

    1. center-scale all wells on all controls; 2. PCA (all components) fitted on the controls;
    3. center-scale on controls again; 4. for each batch b: S = cov(controls_b, ddof=1) + ridge*I,
    X_b <- X_b S^(-1/2). With `drop_degenerate`, principal axes with no control variance (only possible with
    fewer controls than features) are dropped before step 3.

    Every step is affine and fitted on controls only, so the statistics are computed on the control wells and the
    composed map x -> x @ A_b + c_b is applied to each batch in one pass.
    """
    x = as_features(x)
    parts = tvn_transforms(x, is_control, batches, coral_ridge=coral_ridge, drop_degenerate=drop_degenerate)
    out = np.empty((len(x), parts[0][1].shape[1]))
    for idx, mat, off in parts:
        out[idx] = x[idx] @ mat + off
    return out


def _batch_indices(batches, n: int) -> list[np.ndarray]:
    """Row indices of each batch in order of first appearance (all rows if `batches` is None)."""
    if batches is None:
        return [np.arange(n)]
    b = as_labels(batches, n, "batch")
    _, first, inv = np.unique(b.astype(str), return_index=True, return_inverse=True)
    order = np.argsort(first)
    return [np.nonzero(inv == k)[0] for k in order]


METHODS = ("tvn", "centerscale", "centerscale_on_controls", "pca", "pca_centerscale", "none")


def align(
    features,
    metadata=None,
    *,
    method: str = "tvn",
    perturbation_col: str = "perturbation",
    control_key: str | None = None,
    control_col: str = "is_control",
    batch_col: str | None = "experiment",
    n_components: int | None = 128,
) -> np.ndarray:
    """Align well embeddings (ndarray or DataFrame, N x D) using metadata (DataFrame, N rows) -> (N, K) float64.

    Controls are rows whose `perturbation_col` equals `control_key` or, when `control_key` is None, rows where the
    boolean column `control_col` is true. `batch_col=None` aligns globally.
    """
    x = as_features(features)
    if method not in METHODS:
        raise BenchmarkInputError(f"method: expected one of {METHODS}, got {method!r}")
    batches = None
    is_control = None
    if metadata is not None:
        if len(metadata) != len(x):
            raise BenchmarkInputError(f"metadata: {len(metadata)} rows but embeddings have {len(x)}")
        if batch_col is not None:
            if batch_col not in metadata.columns:
                raise BenchmarkInputError(f"metadata: no column {batch_col!r} (batch_col)")
            batches = metadata[batch_col].to_numpy()
        if control_key is not None:
            if perturbation_col not in metadata.columns:
                raise BenchmarkInputError(f"metadata: no column {perturbation_col!r} (perturbation_col)")
            is_control = (metadata[perturbation_col] == control_key).to_numpy()
        elif control_col in metadata.columns:
            is_control = metadata[control_col].astype(bool).to_numpy()
    needs_controls = method in ("tvn", "centerscale_on_controls", "pca_centerscale")
    if needs_controls:
        if is_control is None:
            raise BenchmarkInputError(
                f"metadata: method {method!r} needs controls (give control_key or a {control_col!r} column)"
            )
        check_has_controls(is_control)
    if method == "tvn":
        return tvn(x, is_control, batches)
    if method == "centerscale":
        return centerscale(x, batches)
    if method == "centerscale_on_controls":
        return centerscale_on_controls(x, is_control, batches)
    if method == "pca":
        return pca(x, n_components, batches)
    if method == "pca_centerscale":
        return pca_centerscale(x, is_control, n_components, batches)
    return x.copy()
