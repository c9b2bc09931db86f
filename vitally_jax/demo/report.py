"""The demo's report: every stage's outputs composed into one self-contained page plus results.json/.csv."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pandas as pd

from vitally_jax.demo import html as R
from vitally_jax.demo.stages import CEILINGS, StageRunner


def sample_images(store_path: str, n_genes: int = 3):
    """A few images to show: a negative control and the strongest-phenotype genes. -> (uint8 (n,H,W,C), labels)."""
    from vitally_jax.data.store import ImageStore

    store = ImageStore.open(store_path)
    meta = store.metadata
    picks, labels = [], []
    ctrl = np.flatnonzero(
        meta["is_control"].astype(bool).to_numpy() & (meta["control_type"].astype(str) == "negative").to_numpy()
    )
    if len(ctrl):
        picks.append(int(ctrl[0]))
        labels.append(f"control\n{meta['experiment'].iloc[ctrl[0]]}")
    genes_file = pathlib.Path(store_path) / "genes.parquet"
    gene_rows = meta.index[(meta["perturbation_type"] == "gene").to_numpy()]
    order = list(dict.fromkeys(meta.loc[gene_rows, "perturbation"]))
    if genes_file.is_file():
        g = pd.read_parquet(genes_file)
        if {"gene", "strength"} <= set(g.columns):
            rank = g.sort_values("strength", ascending=False)["gene"].tolist()
            order = [x for x in rank if x in set(order)] or order
    for gene in order[:n_genes]:
        i = int(np.flatnonzero((meta["perturbation"] == gene).to_numpy())[0])
        picks.append(i)
        labels.append(f"{gene}\n{meta['experiment'].iloc[i]}")
    comp = np.flatnonzero((meta["perturbation_type"] == "compound").to_numpy())
    if len(comp):
        conc = meta["concentration"].to_numpy()[comp]
        i = int(comp[np.nanargmax(conc)])
        labels.append(f"{meta['perturbation'].iloc[i]}\n{conc.max():g} nM")
        picks.append(i)
    return np.stack([store.read(i) for i in picks]), labels, list(store.channel_names)


def stage_report(config, workdir: pathlib.Path, outputs: dict, runner: StageRunner) -> dict:
    """report.html (self-contained) + results.json / results.csv."""
    from vitally_jax.demo.findings import analysis

    summary = pd.read_parquet(outputs["benchmarks"]["summary"])
    recall = pd.read_parquet(outputs["benchmarks"]["recall"])
    sweep = pd.read_csv(outputs["probe"]["table"])
    readouts = outputs["probe"]["readouts"]
    b_used = int(outputs["probe"]["b_star_used"])
    depth = int(outputs["embed"]["depth"])
    an = analysis(config, outputs)
    primary = an["primary"]
    findings, ceilings, decoding, gg = an["findings"], an["ceilings"], an["decoding"], an["gene_groups"]

    results = summary.copy()
    ggm = dict(zip(gg["source"], zip(gg["mean"], gg["sd"])))
    src_of = {"mae_bstar": "model"}
    results["probe gene groups"] = [ggm.get(src_of.get(k, k), (np.nan, np.nan))[0] for k in results["model_key"]]
    results["probe gene groups SD"] = [ggm.get(src_of.get(k, k), (np.nan, np.nan))[1] for k in results["model_key"]]
    pert = sweep[sweep["task"] == "perturbation"]
    pick = {
        "mae_bstar": ("model", readouts["model"]["block"]),
        "mae_last": ("model", depth),
        "random_init": ("random_init", readouts["random_init"]["block"]),
    }
    vals = []
    for k in results["model_key"]:
        srcb = pick.get(k, (k, 0))
        v = pert[(pert["source"] == srcb[0]) & (pert["block"] == srcb[1])]["score"]
        vals.append(float(v.iloc[0]) if len(v) else float("nan"))
    results["probe perturbation"] = vals
    times = runner.times()
    times = pd.concat([times, pd.DataFrame([{"stage": "report", "seconds": float("nan"), "reused": False}])])
    cfg_text = config.to_json_best_effort(indent=1) if hasattr(config, "to_json_best_effort") else str(config)
    qc_path = outputs["curate"].get("quality_check")
    qc = json.loads(pathlib.Path(qc_path).read_text()) if qc_path and pathlib.Path(qc_path).is_file() else {}

    rep = R.Report("vitally_jax demo: from pixels to a scored map")
    rep.text(
        "A synthetic Cell Painting screen, a small MAE pretrained on it, every block and pooling of it and of a "
        "random-init ViT probed, maps built and scored against known gene relationships, next to non-learned "
        "baselines and the ceilings of this world. Each claim of the paper below has an interval: it holds only "
        "where the interval excludes zero. Read the ceilings first: a comparison is only informative where the "
        "oracle leaves room above the baselines."
    )
    rep.heading("Findings")
    rep.table(
        findings,
        caption=(
            "difference = value - compared with; lo / hi: 95% paired bootstrap interval "
            f"({int(config.bench.bootstrap)} resamples; recall over annotated pairs, {primary} maps; "
            "probes over the genes of the evaluation half)"
        ),
    )
    rep.heading("Ceilings and headroom")
    rep.text(
        "Oracle: the true per-well process activations through the same probes and benchmarks; visible oracle: "
        "without the processes a self-standardised crop cannot see (sensitivity table below); headroom = (best "
        f"non-learned baseline - chance) / (oracle - chance). Above {0.8:g}, the baselines close the gap and a "
        "claim against them is not testable in this world."
    )
    rep.table(ceilings, caption=f"recall: 5%/95% tails ({primary} maps; ceilings unaligned); probe: balanced accuracy")
    rep.table(
        gg.drop(columns=["source"])[["representation", "mean", "sd", "seeds"]],
        caption=(
            f"gene-group probe: {outputs['probe']['groups']} CORUM groups, {outputs['probe']['genes']} genes; "
            "readouts chosen on one half of the experiments, scored on the other; mean and SD over CV seeds"
        ),
    )
    rep.table(pd.DataFrame([{"readout of": k, **v} for k, v in readouts.items()]), caption="chosen readouts")
    if len(an["recall_intervals"]):
        rep.table(an["recall_intervals"], caption="recall with 95% bootstrap intervals over the annotated pairs")
    if len(decoding):
        rep.heading("Which biology each representation reads")
        rep.table(
            decoding.assign(visible=decoding["visible"].map({True: "yes", False: "no"})),
            caption="cross-validated R² of each true process from each representation (ridge, folds by perturbation)",
        )
    if len(an["sensitivity"]):
        rep.table(
            an["sensitivity"].assign(visible=an["sensitivity"]["visible"].map({True: "yes", False: "no"})),
            caption="change of the model's input (self-standardised crops) for +1.5 on each process vs a x1.4 gain",
        )

    rep.heading("The screen")
    imgs, row_labels, channels = sample_images(outputs["screen"]["store"])
    rep.figure(
        R.channel_montage(imgs, channels, row_labels),
        caption="sample wells, one column per channel (each panel contrast-stretched), and a composite",
    )
    wells = pd.read_parquet(outputs["maps"]["wells"])
    counts = (
        wells.groupby("perturbation_type")
        .agg(
            wells=("well_id", "size"), perturbations=("perturbation", "nunique"), experiments=("experiment", "nunique")
        )
        .reset_index()
    )
    rep.table(counts, caption=f"{len(wells)} wells in {wells['plate'].nunique()} plates")

    cur = outputs["curate"]
    if cur.get("report") and pathlib.Path(cur["report"]).is_file():
        rep.heading("Curation of the training set")
        steps = json.loads(pathlib.Path(cur["report"]).read_text())["steps"]
        cols = ["step", "images", "wells", "perturbations", "control_wells", "experiments"]
        rep.table(pd.DataFrame(steps).reindex(columns=cols), caption="counts after each curation step")
        flat = {k: v for k, v in qc.items() if isinstance(v, (int, float))}
        flat.update({f"removed: {k}": v for k, v in qc.get("removed_by_reason", {}).items()})
        flat.update({f"recall on {k}": v for k, v in qc.get("recall_by_artefact", {}).items()})
        if flat:
            rep.table(
                pd.DataFrame(list(flat.items()), columns=["measure", "value"]),
                caption="the quality filter against the artefact ground truth, and the phenotypic genes kept",
            )

    rep.heading("Pretraining")
    from vitally_jax.metrics import read_metrics

    tdir = pathlib.Path(outputs["pretrain"]["workdir"])
    metrics = pd.DataFrame(read_metrics(tdir))
    if len(metrics):
        rep.figure(
            R.training_curves(metrics),
            caption=f"{len(metrics)} logged steps; loss = 0.99 masked MSE + 0.01 Fourier loss; one-cycle learning rate",
        )
    for png in _reconstruction_pngs(tdir)[-1:]:
        rep.figure(
            png.read_bytes(),
            max_width="420px",
            caption=f"reconstructions at the end of training "
            f"({png.name}): original, masked input, reconstruction, per channel",
        )

    rep.heading("Block search")
    rep.figure(
        R.probe_curves(
            sweep[["source", "task", "block", "score"]],
            {"gene_groups": b_used},
            labels={"model": "trained MAE", "random_init": "random-init ViT", **an["baseline_names"]},
        ),
        caption=(
            f"per-block probe scores of both encoders at their chosen poolings (gene groups: evaluation half); "
            f"b* = {b_used} of {depth}, chosen on the selection half"
        ),
    )
    curves = sweep[sweep["source"].isin(["model", "random_init"])].pivot_table(
        index="block", columns=["source", "task"], values="score"
    )
    curves.columns = [f"{s} {t}" for s, t in curves.columns]
    rep.table(curves.reset_index(), caption="per-block curves")

    rep.heading("Maps and benchmarks")
    rep.figure(
        R.recall_bars(recall[(recall["alignment"] == primary) | recall["model_key"].isin(list(CEILINGS))]),
        caption=f"known-relationship recall (5%/95% tails) per source and model ({primary}; ceilings unaligned)",
    )
    mae = recall[recall["model_key"] == "mae_bstar"].assign(model=lambda d: d["alignment"])
    rep.figure(R.recall_bars(mae), caption="recall of the MAE (b*) map per alignment")
    rep.table(results.drop(columns=["model_key"]), caption="results.csv: one row per model and alignment")

    rep.heading("Run time per stage")
    rep.table(times[times["seconds"].notna()])
    rep.figure(
        R.stage_times(times[times["seconds"].notna()]),
        caption="wall time per stage (this or the run that produced the reused outputs)",
    )
    rep.heading("Versions and configuration")
    rep.table(pd.DataFrame(list(R.environment().items()), columns=["package", "version"]))
    rep.pre(cfg_text)

    html_path = rep.write(workdir / "report.html")
    R.write_results(
        results.drop(columns=["model_key"]),
        workdir,
        extra={
            "findings": findings.to_dict("records"),
            "ceilings": ceilings.to_dict("records"),
            "gene_groups": gg.to_dict("records"),
            "decoding": decoding.to_dict("records"),
            "sensitivity": an["sensitivity"].to_dict("records"),
            "recall_intervals": an["recall_intervals"].to_dict("records"),
            "curation_check": qc,
            "readouts": readouts,
            "b_star_used": b_used,
            "depth": depth,
            "primary_alignment": primary,
            "stage_seconds": {k: v for k, v in zip(times["stage"], times["seconds"]) if v == v},
        },
    )
    return {"report": str(html_path), "results": str(workdir / "results.json")}


def _reconstruction_pngs(tdir: pathlib.Path) -> list[pathlib.Path]:
    pngs = [p for p in tdir.rglob("*.png") if "recon" in p.name or "recon" in p.parent.name]
    return sorted(pngs, key=lambda p: (p.stat().st_mtime, p.name))
