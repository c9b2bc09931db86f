"""Mean average precision (mAP) with permutation p-values, numerically equal to copairs 0.5.

Profiles are ranked for each query profile by cosine similarity (float32, as copairs stores it); at equal
similarity a positive ranks before a negative. AP(q) = mean over positives t of t / rank_t, where
rank_t = t + #{negatives ranked before positive t}. Two uses:

- phenotypic activity: queries are the wells of each perturbation; positives are its other replicate wells,
  negatives are the negative-control wells. mAP per perturbation = mean AP over its wells.
- phenotypic consistency: queries are map rows (perturbations) with an annotation (complex, pathway, target);
  positives share the annotation, negatives have a different one. mAP per annotation.

Significance: for each (#positives, #total) configuration a null of `null_size` random rankings (copairs' exact
random stream for a given seed); a group's null is the mean of its members' nulls; p = (#{null > mAP} + 1) /
(null_size + 1), Benjamini-Hochberg across groups, retrieved = corrected p < threshold.

The ranking is vectorised: per block of queries one matmul, one sort of all negative keys (row index in the high
32 bits, order-preserving float bits in the low 32), and one searchsorted for all positives.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from vitally_jax.benchmarks.cosine import normalize_rows
from vitally_jax.benchmarks.validate import as_features, as_labels, check_has_controls
from vitally_jax.errors import BenchmarkInputError


def _ordered_bits(keys: np.ndarray) -> np.ndarray:
    """float32 -> uint64 whose integer order equals the float order (-0.0 == 0.0 handled by adding 0.0)."""
    b = (np.asarray(keys, np.float32) + np.float32(0.0)).view(np.uint32).astype(np.uint64)
    neg = (b >> np.uint64(31)) == 1
    return np.where(neg, np.uint64(0xFFFFFFFF) - b, b | np.uint64(0x80000000))


def average_precision_block(
    sims: np.ndarray, pos: np.ndarray, neg: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AP of each query row. sims (B, M) float32 similarities; pos, neg (B, M) bool masks.

    Returns ap (B,) float64 (NaN where no positive), n_pos (B,), n_total (B,).
    """
    keys = np.float32(1.0) - sims.astype(np.float32)
    ob = _ordered_bits(keys)
    row = np.arange(len(sims), dtype=np.uint64)[:, None] << np.uint64(32)
    comb = ob | row
    neg_sorted = np.sort(comb[neg])
    r_pos, c_pos = np.nonzero(pos)
    pos_comb = np.sort(comb[r_pos, c_pos])
    r_sorted = (pos_comb >> np.uint64(32)).astype(np.int64)
    row_start = np.searchsorted(neg_sorted, np.arange(len(sims), dtype=np.uint64) << np.uint64(32))
    n_before = np.searchsorted(neg_sorted, pos_comb, "left") - row_start[r_sorted]
    n_pos = pos.sum(axis=1)
    first = np.concatenate([[0], np.cumsum(n_pos)[:-1]])
    t = np.arange(len(pos_comb)) - np.repeat(first, n_pos) + 1
    contrib = t / (t + n_before)
    sums = np.zeros(len(sims))
    np.add.at(sums, r_sorted, contrib)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = np.where(n_pos > 0, sums / n_pos, np.nan)
    return ap, n_pos, n_pos + neg.sum(axis=1)


def average_precisions(
    x: np.ndarray, groups: np.ndarray, *, reference: np.ndarray | None = None, block_rows: int = 512
) -> pd.DataFrame:
    """AP for every profile. x (N, D); groups (N,) labels; reference (N,) bool marks negative-control profiles.

    With `reference`: positives = same group (non-reference), negatives = reference profiles; reference rows get
    NaN. Without: positives = same group, negatives = different group.
    Returns DataFrame(average_precision, n_pos_pairs, n_total_pairs), one row per profile.
    """
    xn = normalize_rows(x)
    codes = np.unique(np.asarray(groups).astype(str), return_inverse=True)[1].ravel()
    n = len(xn)
    ap = np.full(n, np.nan)
    npos = np.zeros(n, np.int64)
    ntot = np.zeros(n, np.int64)
    ref = np.zeros(n, bool) if reference is None else np.asarray(reference, bool)
    queries = np.nonzero(~ref)[0]
    ref_rows = np.nonzero(ref)[0]
    for q0 in range(0, len(queries), block_rows):
        q = queries[q0 : q0 + block_rows]
        if reference is not None:  # columns: the queries' groups + all controls
            cols = np.concatenate([np.nonzero(np.isin(codes, np.unique(codes[q])) & ~ref)[0], ref_rows])
        else:
            cols = np.arange(n)
        sims = (xn[q] @ xn[cols].T).astype(np.float32)
        same = codes[q][:, None] == codes[cols][None, :]
        pos = same & (q[:, None] != cols[None, :]) & ~ref[cols][None, :]
        neg = ref[cols][None, :] & np.ones((len(q), 1), bool) if reference is not None else ~same
        a, p_, t_ = average_precision_block(sims, pos, neg)
        ap[q], npos[q], ntot[q] = a, p_, t_
    if reference is not None:  # a control is a negative for every query (no positives of its own)
        ntot[ref_rows] = len(queries)
    return pd.DataFrame({"average_precision": ap, "n_pos_pairs": npos, "n_total_pairs": ntot})


def null_average_precisions(confs: np.ndarray, null_size: int, seed: int) -> np.ndarray:
    """Null AP distributions (K, null_size) float32 for unique sorted (n_pos, n_total) rows, copairs' stream."""
    seeds = np.random.default_rng(seed).integers(8096, size=len(confs))
    out = np.empty((len(confs), null_size), np.float32)
    for i, (k, total) in enumerate(confs):
        rng = np.random.default_rng(seeds[i])
        dtype = np.uint16 if total < 2**16 else np.uint32
        idx = np.tile(np.arange(total, dtype=dtype), (null_size, 1))
        rng.permuted(idx, axis=1, out=idx)
        rel = np.sort(idx[:, :k], axis=1)
        pr = np.arange(1, k + 1, dtype=np.float32) / (rel + 1)
        out[i] = (pr.sum(axis=1) / k).astype(np.float32)
    return out


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


def mean_average_precision(
    ap: pd.DataFrame, groups, *, null_size: int = 10000, threshold: float = 0.05, seed: int = 0
) -> pd.DataFrame:
    """Group APs into mAP with p-values. `ap` from `average_precisions`; `groups` (N,) labels.

    Returns one row per group (sorted): group, mean_average_precision, n_profiles, p_value, corrected_p_value,
    below_p, below_corrected_p. `df.attrs['fraction_retrieved']` = share of groups with corrected p < threshold.
    """
    df = ap.assign(group=np.asarray(groups))
    df = df[df.average_precision.notna() & (df.n_pos_pairs > 0)].reset_index(drop=True)
    if len(df) == 0:
        raise BenchmarkInputError("mAP: no profile has a positive pair (need >= 2 replicates / annotated members)")
    confs, rev = np.unique(df[["n_pos_pairs", "n_total_pairs"]].to_numpy(), axis=0, return_inverse=True)
    rev = rev.ravel()
    nulls = null_average_precisions(confs, null_size, seed)
    rows = []
    for g, idx in df.groupby("group", sort=True).indices.items():
        m = df.average_precision.to_numpy()[idx].mean()
        null = nulls[rev[idx]].mean(axis=0)
        rows.append((g, m, len(idx), (int((null > m).sum()) + 1) / (null_size + 1)))
    out = pd.DataFrame(rows, columns=["group", "mean_average_precision", "n_profiles", "p_value"])
    out["corrected_p_value"] = benjamini_hochberg(out.p_value.to_numpy())
    out["below_p"] = out.p_value < threshold
    out["below_corrected_p"] = out.corrected_p_value < threshold
    out.attrs["fraction_retrieved"] = float(out.below_corrected_p.mean())
    return out


def phenotypic_activity(
    features,
    metadata: pd.DataFrame | None = None,
    *,
    perturbation_col: str = "perturbation",
    control_key: str | None = None,
    labels=None,
    is_control=None,
    null_size: int = 10000,
    threshold: float = 0.05,
    seed: int = 0,
) -> pd.DataFrame:
    """mAP of each perturbation's replicate wells against negative-control wells (wells x features in)."""
    x = as_features(features)
    lab = as_labels(metadata[perturbation_col] if labels is None else labels, len(x), perturbation_col).astype(str)
    ctrl = (lab == str(control_key)) if is_control is None else np.asarray(is_control, bool)
    check_has_controls(ctrl, "negative-control wells")
    ap = average_precisions(x, lab, reference=ctrl)
    out = mean_average_precision(ap[~ctrl], lab[~ctrl], null_size=null_size, threshold=threshold, seed=seed)
    return out.rename(columns={"group": "perturbation"})


def phenotypic_consistency(
    map_features, perturbations, annotation, *, null_size: int = 10000, threshold: float = 0.05, seed: int = 0
) -> pd.DataFrame:
    """mAP of perturbations sharing an annotation. `annotation`: dict/Series perturbation -> label (or labels).

    A perturbation with several labels is one profile per label; unannotated perturbations are left out.
    """
    x = as_features(map_features, "map features")
    labels = as_labels(perturbations, len(x)).astype(str)
    mapping = dict(annotation)
    rows, groups = [], []
    for i, p in enumerate(labels):
        v = mapping.get(p)
        for a in [] if v is None else [v] if isinstance(v, str) else list(v):
            rows.append(i)
            groups.append(str(a))
    if not rows:
        raise BenchmarkInputError("annotation: no perturbation of the map is annotated")
    rows = np.asarray(rows)
    ap = average_precisions(x[rows], np.asarray(groups))
    out = mean_average_precision(ap, np.asarray(groups), null_size=null_size, threshold=threshold, seed=seed)
    return out.rename(columns={"group": "annotation"})
