"""The curation ablation (`configs/demo.py:ablation`): the demo pipeline trained on the curated and on the
uncurated training set at equal steps, with `ablation.seeds` seeds each, on one shared screen.

Each run is a complete demo in WORKDIR/<curated|uncurated>_seed<k>/ (the screen is generated once, in
WORKDIR/screen, and reused). The comparison reads each run's trained MAE at its own chosen readout: CORUM recall
(primary alignment) as per-pair hits averaged over the seeds, and the gene-group probe as per-gene correctness
averaged over the seeds; the difference curated - uncurated gets a paired bootstrap interval over the pairs /
genes. Per-seed values are listed too: with 2 seeds the interval does not cover seed-to-seed variation, which the
table shows instead. Outputs: WORKDIR/report.html, WORKDIR/results.json.
"""

from __future__ import annotations

import copy
import json
import pathlib

import numpy as np
import pandas as pd

from vitally_jax.demo import html as R
from vitally_jax.demo.stages import _csv, log
from vitally_jax.errors import ConfigError


def _variant_config(config, *, curated: bool, seed: int, store: str):
    c = copy.deepcopy(config)
    c.ablation.enabled = False
    c.curate.enabled = bool(curated)
    c.seed = int(seed)
    c.screen.store = store
    c.baselines.cellprofiler = False  # the baselines do not depend on the training set
    return c


def run_ablation(config, workdir: pathlib.Path) -> dict:
    """Run every variant, then compare; returns {variant: outputs, "comparison": rows}."""
    from vitally_jax.demo import run_pipeline
    from vitally_jax.demo.prepare import stage_screen
    from vitally_jax.probes import instruments as I

    seeds = [int(s) for s in _csv(config.ablation.seeds)]
    if len(seeds) < 1:
        raise ConfigError("ablation.seeds: empty; expected e.g. '0,1'")
    store = stage_screen(config, workdir)["store"]
    primary = str(config.bench.primary_alignment)
    runs, rows = {}, []
    for curated in (True, False):
        for seed in seeds:
            name = f"{'curated' if curated else 'uncurated'}_seed{seed}"
            log(f"ablation: {name}")
            out = run_pipeline(_variant_config(config, curated=curated, seed=seed, store=store), workdir / name)
            runs[name] = out
            hits = dict(np.load(out["benchmarks"]["hits"]))
            correct = pd.read_parquet(out["probe"]["correct"])
            r = out["probe"]["readouts"]["model"]
            rows.append(
                {
                    "variant": name,
                    "curated": curated,
                    "seed": seed,
                    "training images": out["curate"].get("kept_images", out["screen"]["images"]),
                    "readout": f"{r['pooling']} block {r['block']}",
                    "_hits": hits.get(f"mae_bstar__{primary}__CORUM"),
                    "_correct": correct[f"model|{r['pooling']}|{r['block']}"].to_numpy(),
                    "_group": correct["group"].to_numpy(),
                }
            )
    n_boot, rs = int(config.bench.bootstrap), int(config.seed)
    cur = [r for r in rows if r["curated"]]
    unc = [r for r in rows if not r["curated"]]
    comparison = {}
    if all(r["_hits"] is not None for r in rows):
        comparison["CORUM recall"] = I.paired_bootstrap_recall(
            np.mean([r["_hits"] for r in cur], axis=0),
            np.mean([r["_hits"] for r in unc], axis=0),
            n_boot=n_boot,
            seed=rs,
        )
    comparison["gene-group probe"] = I.paired_bootstrap_balanced(
        np.mean([r["_correct"] for r in cur], axis=0),
        np.mean([r["_correct"] for r in unc], axis=0),
        cur[0]["_group"],
        n_boot=n_boot,
        seed=rs,
    )
    table = pd.DataFrame(
        [
            {
                "claim": "curating the training set helps (curated vs uncurated, equal steps)",
                "metric": m,
                "difference": d["value"],
                "lo": d["lo"],
                "hi": d["hi"],
                "curated": d["a"],
                "uncurated": d["b"],
                "verdict": I.verdict(d["lo"], d["hi"]),
            }
            for m, d in comparison.items()
        ]
    )
    per_run = pd.DataFrame(
        [
            {
                **{k: v for k, v in r.items() if not k.startswith("_")},
                "CORUM recall": float(np.mean(r["_hits"])) if r["_hits"] is not None else float("nan"),
                "gene-group probe": float(np.nanmean(pd.Series(r["_correct"]).groupby(r["_group"]).mean().to_numpy())),
            }
            for r in rows
        ]
    )
    rep = R.Report("vitally_jax demo: curated vs uncurated training set")
    rep.text(
        f"Each variant pretrains the same MAE for the same number of steps ({int(config.train.total_steps)}) on "
        f"the curated or on the whole training set, with seeds {seeds}. The trained MAE is read at each run's own "
        f"chosen readout. Intervals: 95% paired bootstrap over the annotated pairs (recall, {primary} maps) or the "
        "genes of the evaluation half (probe), on the seed-averaged hits; the per-run table shows the seed spread."
    )
    rep.heading("Findings")
    rep.table(table)
    rep.heading("Runs")
    rep.table(per_run.assign(curated=per_run["curated"].map({True: "yes", False: "no"})))
    html_path = rep.write(workdir / "report.html")
    R.write_results(
        per_run,
        workdir,
        extra={"findings": table.to_dict("records"), "runs": {k: str(workdir / k) for k in runs}},
    )
    log(f"ablation report: {html_path}")
    for m, d in comparison.items():
        log(f"  {m}: curated - uncurated {d['value']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]")
    return {"runs": list(runs), "comparison": comparison, "report": str(html_path)}


def read_findings(workdir: pathlib.Path) -> list[dict]:
    """The findings rows of a finished ablation's results.json."""
    return json.loads((pathlib.Path(workdir) / "results.json").read_text())["findings"]
