"""Mean average precision (mAP) with permutation p-values, numerically equal to copairs 0.5.

Profiles are ranked for each query profile by cosine similarity (float32, as copairs stores it); at equal
similarity a positive ranks before a negative. AP(q) = mean over positives t of t / rank_t, where
rank_t = t + #{negatives ranked before positive t}. Two uses:

- phenotypic activity: queries are the wells of each perturbation; positives are its other replicate wells,
  negatives are the negative-control wells. mAP per perturbation = mean AP over its wells.
- phenotypic consistency: queries are map rows (perturbations) with an annotation (complex, pathway, target);
  positives share the annotation, negatives have a different one. mAP per annotation.

Significance: for each (#positives, #total) configuration a null of `null_size` random rankings (copairs' exact
random stream for a given seed); a group's null is the mean of its members' nulls (float32);
p = (#{null > mAP} + 1) / (null_size + 1), Benjamini-Hochberg across groups (or the two-stage hierarchical rule of
`hierarchical.py` with `hierarchical_by`), retrieved = corrected p < threshold.

Ties between the observed mAP and a null value: the comparison is made in float32, i.e. the observed mAP is first
rounded to float32 (copairs 0.5.5 compares its float32 null with a Python float, which NumPy >= 2 casts to the
array's float32). With few positives, AP takes few distinct rational values, so such ties are common: comparing in
float64 instead counts a null AP of 0.3125f as above an observed 0.31249999999999994 and shifts p by 1/(n+1).

Each AP also comes normalised (`normalized.py`): 0 for a random ranking, 1 for a perfect one.

The ranking is blocked over queries; per block of B query rows against M candidate columns, one float64 matmul
gives the similarities, cast to float32. When every query has at most 32 positives the rank of each positive is
counted directly (#negatives with a strictly smaller key, one pass over the block per positive slot). Otherwise
one sort of all negative keys (row index in the high 32 bits, order-preserving float bits in the low 32) and one
searchsorted for all positives. Both give the same integer ranks.

Memory bound (bytes, beyond the caller's input x), with N profiles of D features, blocks of B query rows and M
candidate columns per block: peak <= 8*N*D (the normalised copy) + 12*B*M + 8*B*D + 96*N on the counting path.
The 12*B*M is the float64 product (8) and its float32 copy (4), which live together once; after the product is
freed, the float32 keys (4) and the same/positive/negative/comparison masks (1 each) stay within it. 8*B*D is the
gathered query rows; 96*N the outputs and labels. One block is alive at a time. The sorting path (more than 32
positives per query) needs about 40*B*M instead. With `reference` M is the queries' group members plus the
controls; without it M = N. At the default B = 512, N = 50,000 profiles x 256 features: 0.10 GB + 0.31 GB.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from vitally_jax.benchmarks.cosine import normalize_rows
from vitally_jax.benchmarks.hierarchical import benjamini_hochberg, hierarchical_fdr
from vitally_jax.benchmarks.normalized import normalized_average_precision
from vitally_jax.benchmarks.validate import as_features, as_labels, check_has_controls
from vitally_jax.errors import BenchmarkInputError


def _ordered_bits(keys: np.ndarray) -> np.ndarray:
    """float32 -> uint64 whose integer order equals the float order (-0.0 == 0.0 handled by adding 0.0)."""
    b = (np.asarray(keys, np.float32) + np.float32(0.0)).view(np.uint32).astype(np.uint64)
    neg = (b >> np.uint64(31)) == 1
    return np.where(neg, np.uint64(0xFFFFFFFF) - b, b | np.uint64(0x80000000))


_COUNT_MAX_POS = 32


def _ap_by_counting(keys: np.ndarray, pos: np.ndarray, neg: np.ndarray, n_pos: np.ndarray) -> np.ndarray:
    """Sum over positives of t / (t + #negatives with a smaller key), positives taken in key order (B,)."""
    b, p_max = len(keys), int(n_pos.max())
    r_pos, c_pos = np.nonzero(pos)
    slot = np.arange(len(r_pos)) - np.repeat(np.cumsum(n_pos) - n_pos, n_pos)
    kp = np.full((b, p_max), np.inf, np.float32)
    kp[r_pos, slot] = keys[r_pos, c_pos]
    kp.sort(axis=1)
    sums = np.zeros(b)
    below = np.empty(keys.shape, bool)
    for j in range(p_max):
        np.less(keys, kp[:, j : j + 1], out=below)
        below &= neg
        t = j + 1
        nb = below.sum(axis=1)
        sums += np.where(n_pos >= t, t / (t + nb), 0.0)
    return sums


def average_precision_block(
    sims: np.ndarray, pos: np.ndarray, neg: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AP of each query row. sims (B, M) float32 similarities; pos, neg (B, M) bool masks.

    Returns ap (B,) float64 (NaN where no positive), n_pos (B,), n_total (B,).
    """
    keys = np.subtract(np.float32(1.0), sims, dtype=np.float32)
    n_pos = pos.sum(axis=1)
    if len(keys) and 0 < n_pos.max() <= _COUNT_MAX_POS:
        sums = _ap_by_counting(keys, pos, neg, n_pos)
        with np.errstate(invalid="ignore", divide="ignore"):
            ap = np.where(n_pos > 0, sums / n_pos, np.nan)
        return ap, n_pos, n_pos + neg.sum(axis=1)
    ob = _ordered_bits(keys)
    row = np.arange(len(sims), dtype=np.uint64)[:, None] << np.uint64(32)
    comb = ob | row
    neg_sorted = np.sort(comb[neg])
    r_pos, c_pos = np.nonzero(pos)
    pos_comb = np.sort(comb[r_pos, c_pos])
    r_sorted = (pos_comb >> np.uint64(32)).astype(np.int64)
    row_start = np.searchsorted(neg_sorted, np.arange(len(sims), dtype=np.uint64) << np.uint64(32))
    n_before = np.searchsorted(neg_sorted, pos_comb, "left") - row_start[r_sorted]
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
    NaN. Without: positives = same group, negatives = different group. `block_rows` queries are ranked at a time
    (memory bound in the module docstring).
    Returns DataFrame(average_precision, normalized_average_precision, n_pos_pairs, n_total_pairs), one row per
    profile.
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
    if block_rows < 1:
        raise BenchmarkInputError(f"block_rows: expected a positive integer, got {block_rows}")
    for q0 in range(0, len(queries), block_rows):
        q = queries[q0 : q0 + block_rows]
        if reference is not None:  # columns: the queries' groups + all controls
            cols = np.concatenate([np.nonzero(np.isin(codes, np.unique(codes[q])) & ~ref)[0], ref_rows])
            sims64 = xn[q] @ xn[cols].T
        else:
            cols = np.arange(n)
            sims64 = xn[q] @ xn.T
        sims = sims64.astype(np.float32)
        del sims64
        same = codes[q][:, None] == codes[cols][None, :]
        pos = same & (q[:, None] != cols[None, :]) & ~ref[cols][None, :]
        neg = np.broadcast_to(ref[cols][None, :], same.shape) if reference is not None else ~same
        a, p_, t_ = average_precision_block(sims, pos, neg)
        ap[q], npos[q], ntot[q] = a, p_, t_
        del sims, same, pos, neg  # free this block before the next block's product (the bound counts one block)
    if reference is not None:  # a control is a negative for every query (no positives of its own)
        ntot[ref_rows] = len(queries)
    nap = normalized_average_precision(ap, npos, np.maximum(ntot, 1))
    return pd.DataFrame(
        {"average_precision": ap, "normalized_average_precision": nap, "n_pos_pairs": npos, "n_total_pairs": ntot}
    )


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


def mean_average_precision(
    ap: pd.DataFrame,
    groups,
    *,
    null_size: int = 10000,
    threshold: float = 0.05,
    seed: int = 0,
    hierarchical_by=None,
) -> pd.DataFrame:
    """Group APs into mAP with p-values. `ap` from `average_precisions`; `groups` (N,) labels.

    `hierarchical_by` (N,) family labels (e.g. the compound when groups are compound x dose; constant within a
    group) switches the correction to the two-stage hierarchical rule and adds its stage1_* columns (stage 1 at
    level 0.05 whatever `threshold` is, as in copairs).
    Returns one row per group (sorted): group, mean_average_precision, mean_normalized_average_precision,
    n_profiles, p_value, corrected_p_value, below_p, below_corrected_p. `df.attrs['fraction_retrieved']` = share
    of groups with corrected p < threshold.
    """
    n_in = len(ap)
    df = ap.assign(group=as_labels(groups, n_in, "groups"))
    if hierarchical_by is not None:
        df["family"] = as_labels(hierarchical_by, n_in, "hierarchical_by").astype(str)
    if "normalized_average_precision" not in df:
        df["normalized_average_precision"] = normalized_average_precision(
            df.average_precision, df.n_pos_pairs, np.maximum(df.n_total_pairs, 1)
        )
    df = df[df.average_precision.notna() & (df.n_pos_pairs > 0)].reset_index(drop=True)
    if len(df) == 0:
        raise BenchmarkInputError("mAP: no profile has a positive pair (need >= 2 replicates / annotated members)")
    confs, rev = np.unique(df[["n_pos_pairs", "n_total_pairs"]].to_numpy(), axis=0, return_inverse=True)
    rev = rev.ravel()
    nulls = null_average_precisions(confs, null_size, seed)
    aps, naps = df.average_precision.to_numpy(), df.normalized_average_precision.to_numpy()
    rows, fams = [], []
    for g, idx in df.groupby("group", sort=True).indices.items():
        m = aps[idx].mean()
        null = nulls[rev[idx]].mean(axis=0)
        n_above = int((null > np.float32(m)).sum())  # float32 comparison: copairs' rule for ties
        rows.append((g, m, naps[idx].mean(), len(idx), (n_above + 1) / (null_size + 1)))
        if hierarchical_by is not None:
            fam = np.unique(df.family.to_numpy()[idx])
            if len(fam) != 1:
                raise BenchmarkInputError(
                    f"hierarchical_by: group {g!r} spans {len(fam)} families; expected one family per group"
                )
            fams.append(fam[0])
    cols = ["group", "mean_average_precision", "mean_normalized_average_precision", "n_profiles", "p_value"]
    out = pd.DataFrame(rows, columns=cols)
    if hierarchical_by is None:
        out["corrected_p_value"] = benjamini_hochberg(out.p_value.to_numpy())
    else:
        out["family"] = fams
        h = hierarchical_fdr(out.p_value.to_numpy(), out.family.to_numpy())
        out = pd.concat([out, h], axis=1)
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
    hierarchical_by=None,
) -> pd.DataFrame:
    """mAP of each perturbation's replicate wells against negative-control wells (wells x features in).

    `hierarchical_by` (N,) family labels per well (ignored on control wells) selects the hierarchical correction.
    """
    x = as_features(features)
    lab = as_labels(metadata[perturbation_col] if labels is None else labels, len(x), perturbation_col).astype(str)
    ctrl = (lab == str(control_key)) if is_control is None else np.asarray(is_control, bool)
    check_has_controls(ctrl, "negative-control wells")
    ap = average_precisions(x, lab, reference=ctrl)
    fam = None if hierarchical_by is None else as_labels(hierarchical_by, len(x), "hierarchical_by")[~ctrl]
    out = mean_average_precision(
        ap[~ctrl], lab[~ctrl], null_size=null_size, threshold=threshold, seed=seed, hierarchical_by=fam
    )
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
