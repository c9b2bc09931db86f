"""`benchmark(...)`: align, aggregate and score a screen in one call, returning a `BenchmarkReport`."""

from __future__ import annotations

import numpy as np
import pandas as pd

from vitally_jax.benchmarks import mapk
from vitally_jax.benchmarks.aggregate import aggregate
from vitally_jax.benchmarks.align import align
from vitally_jax.benchmarks.annotations import SOURCES, load_relationships, relationship_index_pairs
from vitally_jax.benchmarks.cluster import cluster_benchmark
from vitally_jax.benchmarks.consistency import signal_consistency
from vitally_jax.benchmarks.cosine import normalize_rows
from vitally_jax.benchmarks.magnitude import signal_magnitude
from vitally_jax.benchmarks.recall import known_relationship_recall
from vitally_jax.benchmarks.replicate import replicate_consistency
from vitally_jax.benchmarks.report import BenchmarkReport
from vitally_jax.benchmarks.validate import as_features, check_has_controls, check_min_count
from vitally_jax.errors import BenchmarkInputError

ALL = ("recall", "cluster", "consistency", "magnitude", "replicate", "map")


def benchmark(
    embeddings,
    metadata: pd.DataFrame,
    *,
    perturbation_col: str = "perturbation",
    control_key: str | None = None,
    control_col: str = "is_control",
    batch_col: str | None = "experiment",
    align_method: str = "tvn",
    aggregate_method: str = "mean",
    negative_controls=None,
    sources=SOURCES,
    clusters="CORUM",
    min_cluster_genes: int = 10,
    min_replicates: int = 2,
    map_null_size: int = 10000,
    seed: int = 0,
    include=ALL,
) -> BenchmarkReport:
    """Score well embeddings (N, D) with metadata (N rows). Controls: `perturbation_col == control_key`, or the
    boolean `control_col`. Gene perturbations only (rows with `perturbation_type == 'compound'` are left out).

    `negative_controls`: perturbation labels forming the null of the consistency/magnitude p-values; by default
    the control wells of each batch (and guide, if a `guide_id` column exists) act as negative-control groups.
    """
    x = as_features(embeddings)
    md = metadata.reset_index(drop=True)
    if len(md) != len(x):
        raise BenchmarkInputError(f"metadata: {len(md)} rows but embeddings have {len(x)}")
    if perturbation_col not in md.columns:
        raise BenchmarkInputError(f"metadata: no column {perturbation_col!r} (perturbation_col)")
    if batch_col is not None and batch_col not in md.columns:
        raise BenchmarkInputError(f"metadata: no column {batch_col!r} (batch_col)")
    unknown = set(include) - set(ALL)
    if unknown:
        raise BenchmarkInputError(f"include: unknown benchmarks {sorted(unknown)}; expected some of {ALL}")
    if "perturbation_type" in md.columns:
        genes_only = (md["perturbation_type"].astype(str) != "compound").to_numpy()
        x, md = x[genes_only], md[genes_only].reset_index(drop=True)
    if control_key is not None:
        is_ctrl = (md[perturbation_col].astype(str) == str(control_key)).to_numpy()
    elif control_col in md.columns:
        is_ctrl = md[control_col].astype(bool).to_numpy()
    else:
        raise BenchmarkInputError(f"metadata: no controls: give control_key or a boolean {control_col!r} column")
    check_has_controls(is_ctrl)
    labels = md[perturbation_col].astype(str).to_numpy()
    counts = pd.Series(labels[~is_ctrl]).value_counts()
    check_min_count(int((counts >= min_replicates).sum()), 2, f"perturbations with >= {min_replicates} replicate wells")
    report = BenchmarkReport()
    report.summary.update(
        {
            "wells": int(len(x)),
            "control_wells": int(is_ctrl.sum()),
            "perturbations": int(len(counts)),
            "features": int(x.shape[1]),
        }
    )
    aligned = align(x, md.assign(_ctrl=is_ctrl), method=align_method, control_col="_ctrl", batch_col=batch_col)
    report.notes.append(
        f"alignment: {align_method}, batches from {batch_col!r}"
        if batch_col
        else f"alignment: {align_method}, no batches"
    )
    ctrl_labels = sorted(set(labels[is_ctrl]))
    m = aggregate(aligned, labels=labels, method=aggregate_method, drop=ctrl_labels)
    report.tables["map_perturbations"] = pd.DataFrame({"perturbation": m.perturbations, "n_wells": m.n_replicates})

    # negative-control groups for the p-value nulls
    if negative_controls is None:
        parts = [labels]
        if batch_col is not None:
            parts.append(md[batch_col].astype(str).to_numpy())
        if "guide_id" in md.columns:
            parts.append(md["guide_id"].astype(str).to_numpy())
        null_labels = np.where(is_ctrl, ["|".join(t) for t in zip(*parts)], labels)
        negs = sorted(set(null_labels[is_ctrl]))
        report.notes.append(f"p-value null: {len(negs)} control-well groups (control x batch x guide)")
    else:
        null_labels, negs = labels, [str(n) for n in negative_controls]

    if "recall" in include:
        rec = known_relationship_recall(m.features, m.perturbations, sources=sources)
        report.tables["recall"] = rec
        for r in rec.to_dict(orient="records"):
            for c, v in r.items():
                if c.startswith("recall_"):
                    report.summary[f"{r['source']}_{c}"] = float(v)
        _similarity_samples(report, m, sources, seed)
    if "cluster" in include:
        cl = cluster_benchmark(
            m.features, m.perturbations, source=clusters, min_genes=min_cluster_genes, require_clusters=False
        )
        report.tables["clusters"] = cl
        report.summary["clusters_tested"] = int(len(cl))
        if len(cl):
            report.summary["clusters_ks_p_below_0.05"] = float((cl.ks_pval < 0.05).mean())
    if "consistency" in include:
        con = signal_consistency(
            aligned, labels=null_labels, negative_controls=negs, drop=[] if negative_controls is None else ctrl_labels
        )
        con = con[~np.isin(con.pert, ctrl_labels)]
        report.tables["consistency"] = con
        report.summary["consistency_p_below_0.05"] = float((con.pval.dropna() < 0.05).mean())
    if "magnitude" in include:
        ck = ctrl_labels[0]
        mag_labels = np.where(is_ctrl, ck, labels)
        # the magnitude null: control-well groups compared with all controls
        mag_x = np.concatenate([aligned, aligned[is_ctrl]])
        mag_l = np.concatenate([mag_labels, null_labels[is_ctrl]]) if negative_controls is None else mag_labels
        mag_x = mag_x if negative_controls is None else aligned
        mag = signal_magnitude(mag_x, labels=mag_l, negative_controls=negs, control_key=ck, seed=seed)
        mag = mag[~np.isin(mag.pert, negs)]
        report.tables["magnitude"] = mag
        if mag.pval.notna().any():
            report.summary["magnitude_p_below_0.05"] = float((mag.pval.dropna() < 0.05).mean())
        else:
            report.notes.append("magnitude: no perturbation has >= 5 replicate wells")
    if "replicate" in include and batch_col is not None:
        try:
            rc = replicate_consistency(aligned, labels, md[batch_col].to_numpy(), controls=ctrl_labels, seed=seed)
            report.distributions["replicate pairs (across batches)"] = rc.pop("_replicate_cosines")
            report.distributions["random pairs (across batches)"] = rc.pop("_random_cosines")
            report.summary.update({f"replicate_{k}": v for k, v in rc.items()})
        except BenchmarkInputError as e:
            report.notes.append(f"replicate consistency skipped: {e}")
    if "map" in include:
        act = mapk.phenotypic_activity(aligned, labels=labels, is_control=is_ctrl, null_size=map_null_size, seed=seed)
        report.tables["map_activity"] = act
        report.summary["map_activity_mean"] = float(act.mean_average_precision.mean())
        report.summary["map_activity_fraction_retrieved"] = act.attrs["fraction_retrieved"]
    return report


def _similarity_samples(report: BenchmarkReport, m, sources, seed: int, n_null: int = 50000) -> None:
    """Cosine samples for the similarity plot: random map pairs and the first source's annotated pairs."""
    rng = np.random.default_rng(seed)
    p = len(m.features)
    i, j = rng.integers(p, size=(2, n_null))
    ok = i != j
    xn = normalize_rows(m.features)
    report.distributions["all perturbation pairs (sample)"] = np.einsum("ij,ij->i", xn[i[ok]], xn[j[ok]])
    first = sources[0] if not isinstance(sources, dict) else next(iter(sources.values()))
    name = first if isinstance(first, str) else "annotated"
    pairs = relationship_index_pairs(load_relationships(first), m.perturbations)
    if len(pairs):
        report.distributions[f"{name} pairs"] = np.einsum("ij,ij->i", xn[pairs[:, 0]], xn[pairs[:, 1]])
