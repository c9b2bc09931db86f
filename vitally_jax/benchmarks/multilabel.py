"""Multilabel average precision: profiles carrying several labels (e.g. targets joined by `|`), as copairs 0.5.5's
`copairs.map.multilabel.average_precision` with the label column in both `pos_sameby` and `neg_diffby`.

For every label L held by at least two profiles, each holder q of L is a query:
- positives: the other holders of L;
- negatives: the profiles that share NO label with q;
- profiles sharing some other label with q but not L are left out of q's ranking for L.
Ranking, ties (a positive before a negative at equal similarity) and AP are those of `mapk.py`. One row per
(profile, label); `mapk.mean_average_precision` grouped by label gives the per-label mAP.

This differs from `mapk.phenotypic_consistency`, which copies a multi-label profile once per label and ranks each
copy against every profile with a different label (its own other copies included).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from vitally_jax.benchmarks.cosine import normalize_rows
from vitally_jax.benchmarks.mapk import average_precision_block, mean_average_precision
from vitally_jax.benchmarks.normalized import normalized_average_precision
from vitally_jax.benchmarks.validate import as_features, as_labels
from vitally_jax.errors import BenchmarkInputError


def split_labels(labels, n: int, sep: str = "|", name: str = "labels") -> list[list[str]]:
    """Labels per profile: a string joined by `sep`, or a list/tuple/set of strings. Empty parts are dropped."""
    arr = as_labels(labels, n, name)
    out = []
    for i, v in enumerate(arr):
        parts = v.split(sep) if isinstance(v, str) else list(v)
        parts = sorted({str(p).strip() for p in parts if str(p).strip()})
        if not parts:
            raise BenchmarkInputError(f"{name}: row {i} has no label; expected at least one per profile")
        out.append(parts)
    return out


def multilabel_average_precisions(x, labels, *, sep: str = "|", block_rows: int = 512) -> pd.DataFrame:
    """AP of every (profile, label) pair. x (N, D); labels (N,) strings joined by `sep` or label lists.

    Returns DataFrame(profile, label, average_precision, normalized_average_precision, n_pos_pairs,
    n_total_pairs), sorted by label then profile.
    """
    x = as_features(x)
    sets = split_labels(labels, len(x), sep)
    names = sorted({a for s in sets for a in s})
    code = {a: k for k, a in enumerate(names)}
    inc = np.zeros((len(x), len(names)), np.float32)
    for i, s in enumerate(sets):
        inc[i, [code[a] for a in s]] = 1.0
    xn = normalize_rows(x)
    frames = []
    for k, name in enumerate(names):
        members = np.nonzero(inc[:, k])[0]
        if len(members) < 2:
            continue
        for q0 in range(0, len(members), block_rows):
            q = members[q0 : q0 + block_rows]
            sims = (xn[q] @ xn.T).astype(np.float32)
            pos = (inc[:, k][None, :] > 0) & (q[:, None] != np.arange(len(x))[None, :])
            neg = (inc[q] @ inc.T) == 0
            ap, n_pos, n_tot = average_precision_block(sims, pos, neg)
            frames.append(
                pd.DataFrame(
                    {
                        "profile": q,
                        "label": name,
                        "average_precision": ap,
                        "normalized_average_precision": normalized_average_precision(ap, n_pos, n_tot),
                        "n_pos_pairs": n_pos,
                        "n_total_pairs": n_tot,
                    }
                )
            )
    if not frames:
        raise BenchmarkInputError("labels: no label is shared by two profiles; expected at least one positive pair")
    return pd.concat(frames, ignore_index=True)


def multilabel_consistency(
    map_features,
    perturbations,
    annotation,
    *,
    sep: str = "|",
    null_size: int = 10000,
    threshold: float = 0.05,
    seed: int = 0,
    hierarchical_by=None,
) -> pd.DataFrame:
    """mAP per label for perturbations annotated with one or more labels (`annotation`: dict/Series perturbation ->
    labels joined by `sep`, or a list). Unannotated perturbations are left out. One row per label (sorted)."""
    x = as_features(map_features, "map features")
    pert = as_labels(perturbations, len(x)).astype(str)
    mapping = dict(annotation)
    keep = [i for i, p in enumerate(pert) if p in mapping and not _missing(mapping[p])]
    if not keep:
        raise BenchmarkInputError("annotation: no perturbation of the map is annotated")
    keep = np.asarray(keep)
    ap = multilabel_average_precisions(x[keep], [mapping[p] for p in pert[keep]], sep=sep)
    out = mean_average_precision(
        ap, ap.label.to_numpy(), null_size=null_size, threshold=threshold, seed=seed, hierarchical_by=hierarchical_by
    )
    return out.rename(columns={"group": "annotation"})


def _missing(v) -> bool:
    if isinstance(v, str):
        return not v.strip()
    if isinstance(v, (list, tuple, set, frozenset, np.ndarray)):
        return len(v) == 0
    return bool(pd.isna(v))
