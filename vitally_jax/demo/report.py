"""The demo's report: every stage's outputs composed into one self-contained page plus results.json/.csv."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pandas as pd

from vitally_jax.demo import html as R
from vitally_jax.demo.stages import StageRunner


def demo_findings(summary: pd.DataFrame, sweep: pd.DataFrame, b_star: int) -> pd.DataFrame:
    """The paper's claims, checked on this run's numbers.

    summary: one row per (model_key, alignment) with `recall <source>` columns; sweep: the probe sweep table.
    Returns rows: claim, trained / aligned value, baseline value, holds (bool).
    """
    rows = []

    def get(model, alignment, col):
        m = summary[(summary["model_key"] == model) & (summary["alignment"] == alignment)]
        return float(m[col].iloc[0]) if len(m) and col in m else float("nan")

    best_align = "tvn" if (summary["alignment"] == "tvn").any() else summary["alignment"].iloc[0]
    for source in ("CORUM", "StringDB"):
        col = f"recall {source}"
        a, b = get("mae_bstar", best_align, col), get("random_init", best_align, col)
        rows.append(
            {
                "claim": f"trained MAE (b*) beats random-init ViT on {source} recall ({best_align})",
                "value": a,
                "baseline": b,
                "holds": bool(a > b),
            }
        )
    for task in dict.fromkeys(sweep["task"]):
        t = sweep[sweep["task"] == task]
        a = t[(t["source"] == "model") & (t["block"] == b_star)]["score"]
        b = t[t["source"] == "random_init"]["score"]
        a, b = (float(a.iloc[0]) if len(a) else float("nan")), (float(b.max()) if len(b) else float("nan"))
        name = task.replace("_", " ")
        rows.append(
            {
                "claim": f"trained MAE (b*) beats the best block of random-init ViT on {name} probe",
                "value": a,
                "baseline": b,
                "holds": bool(a > b),
            }
        )
    if {"tvn", "unaligned"} <= set(summary["alignment"]):
        rec_cols = [c for c in summary.columns if c.startswith("recall ")]
        for model in ("mae_bstar",):
            a = float(np.mean([get(model, "tvn", c) for c in rec_cols]))
            b = float(np.mean([get(model, "unaligned", c) for c in rec_cols]))
            rows.append(
                {
                    "claim": "TVN-aligned map beats the unaligned map on recall (MAE b*, mean over sources)",
                    "value": a,
                    "baseline": b,
                    "holds": bool(a > b),
                }
            )
    return pd.DataFrame(rows, columns=["claim", "value", "baseline", "holds"])


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

    summary = pd.read_parquet(outputs["benchmarks"]["summary"])
    recall = pd.read_parquet(outputs["benchmarks"]["recall"])
    sweep = pd.read_csv(outputs["probe"]["table"])
    b_star, b_used = outputs["probe"]["b_star"], int(outputs["probe"]["b_star_used"])
    depth = int(outputs["embed"]["depth"])

    # the results table: benchmarks per model x alignment plus the model's probe accuracy
    block_of = {
        "mae_bstar": ("model", b_used),
        "mae_last": ("model", depth),
        "random_init": ("random_init", depth),
        "image_stats": ("image_stats", 0),
    }
    results = summary.copy()
    for task in dict.fromkeys(sweep["task"]):
        vals = []
        for key in results["model_key"]:
            src, blk = block_of[key]
            s = sweep[(sweep["task"] == task) & (sweep["source"] == src) & (sweep["block"] == blk)]["score"]
            vals.append(float(s.iloc[0]) if len(s) else float("nan"))
        results[f"probe {task.replace('_', ' ')}"] = vals
    findings = demo_findings(summary, sweep, b_used)
    times = runner.times()
    times = pd.concat([times, pd.DataFrame([{"stage": "report", "seconds": float("nan"), "reused": False}])])
    cfg_text = config.to_json_best_effort(indent=1) if hasattr(config, "to_json_best_effort") else str(config)

    rep = R.Report("vitally_jax demo: from pixels to a scored map")
    n_hold = int(findings["holds"].sum())
    rep.text(
        f"A synthetic Cell Painting screen, a small MAE pretrained on it, every block probed, maps built and "
        f"scored against known gene relationships. {n_hold} of {len(findings)} of the paper's claims hold here, "
        f"with the {outputs['probe'].get('pooling', '?')} pooling that the trained model's probe chose (the "
        f"second table shows how the encoders compare under every pooling)."
    )
    rep.heading("Findings")
    rep.table(
        findings.assign(holds=findings["holds"].map({True: "holds", False: "does not hold"})),
        caption="value = trained MAE / aligned map; baseline = random-init ViT / unaligned map",
    )
    sens_path = outputs["probe"].get("pooling_sensitivity")
    if sens_path and pathlib.Path(sens_path).is_file():
        sens = pd.read_parquet(sens_path)
        rep.text(
            "How much the encoder comparison depends on the readout: every stored pooling, both encoders, best "
            "block per probe task. The pooling used for the maps is chosen by the trained model's own probe "
            "(it never looks at the random-init numbers)."
        )
        rep.table(
            sens.assign(**{"used for the maps": sens["used for the maps"].map({True: "yes", False: ""})}),
            caption="pooling sensitivity (balanced accuracy)",
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
            sweep,
            {t: b for t, b in b_star.items() if t != "overall"},
            labels={"model": "trained MAE", "random_init": "random-init ViT", "image_stats": "image statistics"},
        ),
        caption=f"linear-probe balanced accuracy per block; b* (used for maps) = {b_used} of {depth}",
    )
    best = sweep.groupby(["task", "source"])["score"].agg(["max", "idxmax"]).reset_index()
    best["best block"] = sweep.loc[best["idxmax"], "block"].to_numpy()
    rep.table(best.drop(columns="idxmax").rename(columns={"max": "best balanced accuracy"}))

    rep.heading("Maps and benchmarks")
    align_show = "tvn" if (recall["alignment"] == "tvn").any() else recall["alignment"].iloc[0]
    rep.figure(
        R.recall_bars(recall[recall["alignment"] == align_show]),
        caption=f"known-relationship recall (5%/95% tails) per annotation source and model, {align_show} maps",
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
            "b_star": b_star,
            "b_star_used": b_used,
            "stage_seconds": {k: v for k, v in zip(times["stage"], times["seconds"]) if v == v},
        },
    )
    return {"report": str(html_path), "results": str(workdir / "results.json")}


def _reconstruction_pngs(tdir: pathlib.Path) -> list[pathlib.Path]:
    pngs = [p for p in tdir.rglob("*.png") if "recon" in p.name or "recon" in p.parent.name]
    return sorted(pngs, key=lambda p: (p.stat().st_mtime, p.name))
