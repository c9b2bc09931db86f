"""Aggregate well embeddings into a map: one row per perturbation (mean or median), labels sorted."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import scipy.sparse

from vitally_jax.benchmarks.validate import as_features, as_labels
from vitally_jax.errors import BenchmarkInputError


@dataclasses.dataclass(frozen=True)
class PerturbationMap:
    """A map: `features` (P, D) float64, one row per label in `perturbations` (P,), sorted, unique."""

    features: np.ndarray
    perturbations: np.ndarray
    n_replicates: np.ndarray

    def to_frame(self, perturbation_col: str = "perturbation") -> pd.DataFrame:
        """DataFrame with the perturbation column first, then feature columns 0..D-1."""
        df = pd.DataFrame(self.features)
        df.insert(0, perturbation_col, self.perturbations)
        return df


def aggregate_arrays(
    x: np.ndarray, labels: np.ndarray, method: str = "mean", drop=()
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, D) wells + (N,) labels -> features (P, D), sorted unique labels (P,), replicate counts (P,).

    Labels in `drop` (e.g. the control key) are removed before aggregating.
    """
    if method not in ("mean", "median"):
        raise BenchmarkInputError(f"method: expected 'mean' or 'median', got {method!r}")
    keep = ~np.isin(labels, np.asarray(list(drop), dtype=object)) if len(drop) else np.ones(len(labels), bool)
    if method == "median":
        x = x[keep]
    labels = labels[keep]
    if len(labels) == 0:
        raise BenchmarkInputError("aggregate: no wells left after removing " + ", ".join(map(repr, drop)))
    inv, uniq = pd.factorize(labels, sort=True)  # hash-based; uniques sorted like np.unique
    uniq = np.asarray(uniq, dtype=object)
    counts = np.bincount(inv, minlength=len(uniq))
    if method == "mean":  # one sparse (P x N) @ (N x D) product over the kept rows, no copies of x
        rows = np.nonzero(keep)[0]
        g = scipy.sparse.csr_matrix((1.0 / counts[inv], (inv, rows)), shape=(len(uniq), len(keep)))
        out = np.asarray(g @ x)
    else:
        order = np.argsort(inv, kind="stable")
        xs = x[order]
        starts = np.concatenate([[0], np.cumsum(counts)])
        out = np.empty((len(uniq), x.shape[1]))
        for size in np.unique(counts):  # batched median over groups of equal size
            groups = np.nonzero(counts == size)[0]
            rows = starts[groups][:, None] + np.arange(size)[None, :]
            out[groups] = np.median(xs[rows], axis=1)
    return out, uniq, counts


def aggregate(
    features,
    metadata: pd.DataFrame | None = None,
    *,
    perturbation_col: str = "perturbation",
    labels=None,
    method: str = "mean",
    drop=(),
) -> PerturbationMap:
    """Aggregate wells per perturbation. Labels come from `metadata[perturbation_col]` or `labels`."""
    x = as_features(features)
    if labels is None:
        if metadata is None or perturbation_col not in metadata.columns:
            raise BenchmarkInputError(f"metadata: no column {perturbation_col!r} (perturbation_col)")
        labels = metadata[perturbation_col]
    lab = as_labels(labels, len(x), perturbation_col)
    try:
        feats, uniq, counts = aggregate_arrays(x, lab, method, drop)
    except TypeError:  # mixed label types: compare as strings
        feats, uniq, counts = aggregate_arrays(x, lab.astype(str), method, [str(d) for d in drop])
    return PerturbationMap(feats, uniq, counts)


def aggregate_transformed(features, labels, transforms, *, drop=()) -> PerturbationMap:
    """Mean map of affinely aligned wells without materialising them: `transforms` from `align.tvn_transforms`.

    Means commute with affine maps, so per batch the wells are first summed per perturbation (one sparse product)
    and only those sums are transformed: mean_p = sum_b (S_pb @ M_b + n_pb * v_b) / n_p. Equals
    `aggregate(tvn(...), ...)` up to rounding, with ~#wells/#perturbations fewer matrix flops.
    """
    x = as_features(features)
    lab = as_labels(labels, len(x))
    keep = ~np.isin(lab, np.asarray(list(drop), dtype=object)) if len(drop) else np.ones(len(lab), bool)
    if not keep.any():
        raise BenchmarkInputError("aggregate: no wells left after removing " + ", ".join(map(repr, drop)))
    inv_all = np.full(len(lab), -1)
    inv, uniq = pd.factorize(lab[keep], sort=True)
    inv_all[keep] = inv
    uniq = np.asarray(uniq, dtype=object)
    counts = np.bincount(inv, minlength=len(uniq))
    out = np.zeros((len(uniq), transforms[0][1].shape[1]))
    for rows, mat, off in transforms:
        rows = rows[inv_all[rows] >= 0]
        g = scipy.sparse.csr_matrix(
            (np.ones(len(rows)), (inv_all[rows], np.arange(len(rows)))), shape=(len(uniq), len(rows))
        )
        sums = np.asarray(g @ x[rows])
        out += sums @ mat + np.bincount(inv_all[rows], minlength=len(uniq))[:, None] * off[None, :]
    return PerturbationMap(out / counts[:, None], uniq, counts)
