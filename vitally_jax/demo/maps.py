"""The demo's maps and benchmarks: every model x three alignments, each scored like a real screen.

Models: the trained MAE at b* and at its last block, a random-init ViT of the same architecture at its own
chosen readout, the non-learned baselines (image statistics, statistics of the self-standardised crops,
CellProfiler measurements) and the ceilings (oracle, visible oracle; unaligned: they carry no batch effect).
Alignments: none, PCA-center-scale and TVN fitted on control wells per batch. Benchmarks per map:
known-relationship recall per annotation source (and the synthetic world's own pairs, with the per-pair hits
kept for paired bootstrap intervals), replicate consistency against pseudo-perturbations made of control wells,
compound-gene activity (RxRx3-core style), and copairs-style mAP (phenotypic activity; consistency of CORUM
complexes).
"""

from __future__ import annotations

import pathlib
import time

from vitally_jax.demo.stages import _csv, log, well_table
from vitally_jax.errors import ConfigError
from vitally_jax.fileio import write_npy, write_parquet

ALIGN_METHODS = {"unaligned": "none", "pca_centerscale": "pca_centerscale", "tvn": "tvn"}
ENCODER_MODELS = ("mae_bstar", "mae_last", "random_init")


def model_picks(outputs: dict) -> dict[str, tuple[str, str | None, int]]:
    """model key -> (representation, pooling, block): the MAE at its chosen readout and at its last block (same
    pooling), the random-init ViT at its own chosen readout, then every baseline and ceiling the run has."""
    from vitally_jax.demo.stages import BASELINES, CEILINGS

    depth = int(outputs["embed"]["depth"])
    r = outputs["probe"]["readouts"]
    picks = {
        "mae_bstar": ("mae", r["model"]["pooling"], int(r["model"]["block"])),
        "mae_last": ("mae", r["model"]["pooling"], depth),
        "random_init": ("random_init", r["random_init"]["pooling"], int(r["random_init"]["block"])),
    }
    for name in (*BASELINES, *CEILINGS):
        stage = {**BASELINES, **CEILINGS}[name][0]
        if outputs.get(stage, {}).get(name):
            picks[name] = (name, None, 0)
    return picks


def model_labels(outputs: dict) -> dict[str, str]:
    """Display names of the demo's models."""
    from vitally_jax.demo.stages import BASELINES, CEILINGS

    depth = int(outputs["embed"]["depth"])
    r = outputs["probe"]["readouts"]
    labels = {
        "mae_bstar": f"MAE block {r['model']['block']} (b*, {r['model']['pooling']})",
        "mae_last": f"MAE block {depth} (last, {r['model']['pooling']})",
        "random_init": f"random-init ViT block {r['random_init']['block']} ({r['random_init']['pooling']})",
    }
    labels.update({k: v[1] for k, v in {**BASELINES, **CEILINGS}.items()})
    return labels


def stage_maps(config, workdir: pathlib.Path, outputs: dict) -> dict:
    """Aligned well embeddings of every model x alignment (maps/<model>__<alignment>.npy, maps/wells.parquet)."""
    import numpy as np

    from vitally_jax.benchmarks.align import align
    from vitally_jax.demo.stages import load_representation

    picks = model_picks(outputs)
    selected = {}
    for model, (src, pooling, block) in picks.items():
        blocks, f = load_representation(outputs, src, pooling)
        selected[model] = f[list(blocks).index(block)][None]
    wells_f, wells = well_table(outputs["screen"]["store"], selected)
    out_dir = workdir / "maps"
    write_parquet(out_dir / "wells.parquet", wells)
    alignments = _csv(config.bench.alignments)
    bad = [a for a in alignments if a not in ALIGN_METHODS]
    if bad:
        raise ConfigError(f"bench.alignments: unknown {bad}; expected some of {list(ALIGN_METHODS)}")
    n_comp = int(config.bench.pca_components) or None
    files = {}
    from vitally_jax.demo.stages import CEILINGS

    for model in picks:
        x = wells_f[model][0].astype(np.float64)
        # the true activations carry no batch effect (and controls sit at exactly 0): not aligned
        for a in ["unaligned"] if model in CEILINGS else alignments:
            y = align(x, wells, method=ALIGN_METHODS[a], batch_col=config.bench.batch_col, n_components=n_comp)
            path = out_dir / f"{model}__{a}.npy"
            write_npy(path, y.astype(np.float32))
            files[f"{model}__{a}"] = str(path)
    log(f"  {len(files)} maps: {len(picks)} models x {len(alignments)} alignments, {len(wells)} wells")
    return {
        "dir": str(out_dir),
        "wells": str(out_dir / "wells.parquet"),
        "files": files,
        "labels": model_labels(outputs),
    }


def _control_groups(wells, rows, size: int, seed: int):
    """Split negative-control wells into pseudo-perturbations of `size` wells (the consistency null)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = rng.permutation(rows)
    n = len(rows) // size
    return rows[: n * size], np.array([f"__control_{k // size}" for k in range(n * size)], dtype=object)


def benchmark_map(x, wells, *, world_pairs, compound_targets, config) -> tuple[dict, list[dict]]:
    """All benchmarks of one aligned well-level map x (wells, K). Returns (summary row, recall rows)."""
    import numpy as np
    import pandas as pd

    from vitally_jax.benchmarks.aggregate import aggregate_arrays
    from vitally_jax.benchmarks.consistency import signal_consistency
    from vitally_jax.benchmarks.recall import known_relationship_recall

    ptype = wells["perturbation_type"].astype(str).to_numpy()
    pert = wells["perturbation"].astype(str).to_numpy()
    is_ctrl = wells["is_control"].astype(bool).to_numpy()
    gene_rows = np.flatnonzero((ptype == "gene") & ~is_ctrl)
    row: dict = {}

    # gene map: mean of a gene's wells (all guides), recall of known relationships per source
    gmap, genes, _ = aggregate_arrays(x[gene_rows], pert[gene_rows])
    sources = {s: s for s in _csv(config.bench.sources)}
    if world_pairs is not None:
        sources["synthetic world"] = world_pairs
    rec = known_relationship_recall(gmap, genes, sources=sources)
    recall_rows = [
        {
            "source": r["source"],
            "recall": float(r["recall_0.05_0.95"]),
            "recall_10_90": float(r["recall_0.1_0.9"]),
            "pairs": int(r["query_distribution_size"]),
        }
        for r in rec.to_dict("records")
    ]
    for r in recall_rows:
        row[f"recall {r['source']}"] = r["recall"]
    # per-pair hits of the bootstrap sources (paired bootstrap intervals in the report)
    from vitally_jax.probes.instruments import recall_pair_hits

    hits = {}
    for s in _csv(config.bench.bootstrap_sources):
        if s in sources:
            hits[s] = recall_pair_hits(gmap, genes, sources[s])[0]
            if abs(hits[s].mean() - row[f"recall {s}"]) > 1e-9:
                raise ConfigError(f"recall of {s}: per-pair hits {hits[s].mean()} disagree with {row[f'recall {s}']}")
    row["_hits"] = hits

    # replicate consistency of genes against pseudo-perturbations made of negative-control wells
    ctrl_rows = np.flatnonzero(is_ctrl & (wells["control_type"].astype(str).to_numpy() != "positive"))
    size = int(max(2, np.median(pd.Series(pert[gene_rows]).value_counts())))
    crow, clab = _control_groups(wells, ctrl_rows, size, int(config.seed))
    rows = np.concatenate([gene_rows, crow])
    labels = np.concatenate([pert[gene_rows], clab])
    cons = signal_consistency(x[rows], labels=labels, negative_controls=sorted(set(clab)))
    row["consistent genes (p<0.05)"] = float((cons["pval"] < 0.05).mean())
    row["mean replicate cosine"] = float(np.nanmean(cons["avgcossim"]))

    # compound-gene activity: does a compound's profile resemble the knockout profiles of its targets?
    comp_rows = np.flatnonzero(ptype == "compound")
    if compound_targets is not None and len(comp_rows):
        from vitally_jax.benchmarks.compound import compound_gene_activity, compound_gene_scores

        conc = wells["concentration"].to_numpy()[comp_rows]
        key = np.array([f"{p}\x1f{c:g}" for p, c in zip(pert[comp_rows], conc)], dtype=object)
        cmap, ckeys, _ = aggregate_arrays(x[comp_rows], key)
        scores = compound_gene_scores(cmap, [k.split("\x1f")[0] for k in ckeys], gmap, genes)
        act = compound_gene_activity(
            scores, compound_targets, n_seeds=int(config.bench.compound_seeds), potency_col="concentration"
        )
        row["compound-gene AP"] = act["ap_mean"]
        row["compound-gene AP random"] = act["rand_ap_mean"]
        row["compound-gene z"] = act["z_score"]

    # copairs-style mAP: replicate wells vs negative controls; genes sharing a CORUM complex
    from vitally_jax.benchmarks.annotations import load_clusters
    from vitally_jax.benchmarks.mapk import phenotypic_activity, phenotypic_consistency

    null = int(config.bench.map_permutations)
    rows = np.concatenate([gene_rows, ctrl_rows])
    act = phenotypic_activity(
        x[rows],
        labels=pert[rows],
        is_control=np.r_[np.zeros(len(gene_rows), bool), np.ones(len(ctrl_rows), bool)],
        null_size=null,
        seed=int(config.seed),
    )
    row["mAP activity"] = float(act["mean_average_precision"].mean())
    row["activity retrieved"] = float(act.attrs["fraction_retrieved"])
    member = {}
    for name, members in load_clusters("CORUM").items():
        present = [g for g in members if g in set(genes)]
        if len(present) >= 3:
            for g in present:
                member.setdefault(g, []).append(name)
    if member:
        cons_map = phenotypic_consistency(gmap, genes, member, null_size=null, seed=int(config.seed))
        row["mAP CORUM consistency"] = float(cons_map["mean_average_precision"].mean())
        row["CORUM complexes retrieved"] = float(cons_map.attrs["fraction_retrieved"])
    return row, recall_rows


def stage_benchmarks(config, workdir: pathlib.Path, outputs: dict) -> dict:
    """Benchmark every map; writes benchmarks/summary.csv (model x alignment) and benchmarks/recall.csv."""
    import numpy as np
    import pandas as pd

    wells = pd.read_parquet(outputs["maps"]["wells"])
    world = None
    screen_dir = pathlib.Path(outputs["screen"]["store"])
    if (screen_dir / "world_pairs.parquet").is_file():
        wp = pd.read_parquet(screen_dir / "world_pairs.parquet")
        world = wp.rename(columns={wp.columns[0]: "entity1", wp.columns[1]: "entity2"})[["entity1", "entity2"]]
    targets = None
    if (screen_dir / "compound_targets.parquet").is_file():
        targets = pd.read_parquet(screen_dir / "compound_targets.parquet")
    labels = outputs["maps"]["labels"]
    summary, recall = [], []
    hits = {}
    for key, path in outputs["maps"]["files"].items():
        model, alignment = key.split("__")
        t0 = time.perf_counter()
        row, rec = benchmark_map(
            np.load(path).astype(np.float64), wells, world_pairs=world, compound_targets=targets, config=config
        )
        for s, h in row.pop("_hits").items():
            hits[f"{key}__{s}"] = h
        summary.append({"model": labels[model], "model_key": model, "alignment": alignment, **row})
        recall += [{"model": labels[model], "model_key": model, "alignment": alignment, **r} for r in rec]
        log(
            f"  benchmarked {labels[model]:<28} {alignment:<16} in {time.perf_counter() - t0:5.1f} s: "
            + " ".join(f"{r['source']}={r['recall']:.3f}" for r in rec)
        )
    out_dir = workdir / "benchmarks"
    write_parquet(out_dir / "summary.parquet", pd.DataFrame(summary))
    write_parquet(out_dir / "recall.parquet", pd.DataFrame(recall))
    from vitally_jax.fileio import atomic_path

    with atomic_path(out_dir / "recall_hits.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **hits)
    return {
        "summary": str(out_dir / "summary.parquet"),
        "recall": str(out_dir / "recall.parquet"),
        "hits": str(out_dir / "recall_hits.npz"),
    }
