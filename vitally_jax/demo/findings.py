"""The demo's analysis: ceilings and headroom, the gene-group probe with error bars, the per-process decoding
table, and the findings (each claim of the paper the demo can test, with an interval and a verdict).

Verdicts: "holds" (the interval of claimed-better minus other lies above 0), "fails" (below 0), "not resolved"
(the interval includes 0), "not testable here" / "not testable in this world" (with the reason). Recall intervals
are paired bootstraps over the annotated pairs (both maps share the genes, so the pairs are resampled together);
probe intervals are paired bootstraps over the genes of the evaluation half (each gene's correctness is its share
of the CV seeds).
"""

from __future__ import annotations

import pathlib

import numpy as np
import pandas as pd

from vitally_jax.demo.stages import BASELINES, CEILINGS
from vitally_jax.probes import instruments as I

RECALL_CHANCE = 0.10  # 5% + 95% tails of the null
NON_LEARNED = ("image_stats", "crop_stats", "cellprofiler", "random_init")
HEADROOM_MAX = 0.8  # above this, a baseline closes the gap: the comparison with it is not testable in this world


def _get(summary: pd.DataFrame, model: str, alignment: str, col: str) -> float:
    m = summary[(summary["model_key"] == model) & (summary["alignment"] == alignment)]
    return float(m[col].iloc[0]) if len(m) and col in m else float("nan")


def gene_group_summary(cv: pd.DataFrame, readouts: dict, depth: int | None = None) -> pd.DataFrame:
    """Evaluation-half gene-group score (mean, SD over CV seeds) of every representation at its readout (and of
    the trained MAE's last block at its pooling, source `mae_last`, when `depth` is given)."""
    ev = cv[cv["split"] == "eval"]
    rows = []
    if depth is not None and "model" in readouts:
        t = ev[(ev["source"] == "model") & (ev["pooling"] == readouts["model"]["pooling"]) & (ev["block"] == depth)]
        if len(t):
            rows.append(
                {
                    "source": "mae_last",
                    "mean": float(t["score"].mean()),
                    "sd": float(t["score"].std(ddof=1)),
                    "seeds": len(t),
                }
            )
    for src, t in ev.groupby("source", sort=False):
        if src in readouts:
            t = t[(t["pooling"] == readouts[src]["pooling"]) & (t["block"] == readouts[src]["block"])]
        rows.append(
            {"source": src, "mean": float(t["score"].mean()), "sd": float(t["score"].std(ddof=1)), "seeds": len(t)}
        )
    return pd.DataFrame(rows)


def ceilings_table(
    summary: pd.DataFrame, gg: pd.DataFrame, n_groups: int, *, primary: str, labels: dict
) -> pd.DataFrame:
    """Per metric: chance, oracle, visible oracle, the best non-learned baseline (over alignments), its headroom
    (best - chance) / (oracle - chance), and the trained MAE (b*) and random-init ViT at the primary alignment."""
    rows = []
    metrics = [c for c in ("recall CORUM", "recall StringDB", "recall synthetic world") if c in summary.columns]
    ggm = dict(zip(gg["source"], gg["mean"]))
    for metric in [*metrics, "gene-group probe"]:
        if metric == "gene-group probe":
            chance = 1.0 / n_groups

            def val(m, a=None):
                return ggm.get({"mae_bstar": "model"}.get(m, m), float("nan"))

            best_of = {m: val(m) for m in NON_LEARNED}
        else:
            chance = RECALL_CHANCE

            def val(m, a=primary, metric=metric):
                return _get(summary, m, a, metric)

            best_of = {
                m: np.nanmax([_get(summary, m, a, metric) for a in summary["alignment"].unique()] + [-np.inf])
                for m in NON_LEARNED
            }
        oracle = val("oracle", "unaligned")
        best = max(best_of, key=lambda k: best_of[k] if np.isfinite(best_of[k]) else -np.inf)
        rows.append(
            {
                "metric": metric,
                "chance": chance,
                "oracle": oracle,
                "visible oracle": val("oracle_visible", "unaligned"),
                "best non-learned baseline": labels.get(best, best),
                "its value": best_of[best],
                "headroom": (best_of[best] - chance) / (oracle - chance) if oracle > chance else float("nan"),
                "trained MAE (b*)": val("mae_bstar"),
                "random-init ViT": val("random_init"),
            }
        )
    return pd.DataFrame(rows)


def decoding_table(maps: dict, wells: pd.DataFrame, processes, visible, primary: str, labels: dict) -> pd.DataFrame:
    """Cross-validated R² of each true process from each representation's `primary`-aligned well map (folds
    grouped by perturbation). `maps`: "model__alignment" -> file."""
    key = "oracle__unaligned"
    if key not in maps:
        return pd.DataFrame()
    truth = np.load(maps[key]).astype(np.float64)
    groups = wells["perturbation"].astype(str).to_numpy()
    out = pd.DataFrame({"process": list(processes), "visible": [p in set(visible) for p in processes]})
    for model in ("mae_bstar", "mae_last", "random_init", "image_stats", "crop_stats", "cellprofiler"):
        f = maps.get(f"{model}__{primary}")
        if f:
            out[labels.get(model, model)] = I.decoding_r2(np.load(f), truth, groups)
    return out


def _row(claim, metric, d, note="", verdict=None):
    return {
        "claim": claim,
        "metric": metric,
        "difference": d.get("value", float("nan")),
        "lo": d.get("lo", float("nan")),
        "hi": d.get("hi", float("nan")),
        "value": d.get("a", float("nan")),
        "compared with": d.get("b", float("nan")),
        "verdict": verdict or I.verdict(d.get("lo", float("nan")), d.get("hi", float("nan"))),
        "note": note,
    }


def findings_table(
    hits: dict,
    correct: pd.DataFrame,
    readouts: dict,
    ceilings: pd.DataFrame,
    *,
    depth: int,
    primary: str,
    n_boot: int = 2000,
    seed: int = 0,
    ablation: dict | None = None,
    cv: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """The findings. cv: the probe's per-seed scores (selection and evaluation halves) of every (pooling, block);
    hits: "model__alignment__source" -> per-pair hits; correct: per-gene correctness columns
    "source|pooling|block" (evaluation half) and `group`."""
    rows = []

    def rec(a, b, source="CORUM", align_a=primary, align_b=primary):
        ka, kb = f"{a}__{align_a}__{source}", f"{b}__{align_b}__{source}"
        if ka not in hits or kb not in hits:
            return {}
        return I.paired_bootstrap_recall(hits[ka], hits[kb], n_boot=n_boot, seed=seed)

    def col(src, pooling=None, block=None):
        if src in readouts:
            pooling = readouts[src]["pooling"] if pooling is None else pooling
            block = readouts[src]["block"] if block is None else block
            return f"{src}|{pooling}|{block}"
        return f"{src}||0"

    def probe(ca, cb):
        if ca not in correct or cb not in correct:
            return {}
        return I.paired_bootstrap_balanced(correct[ca], correct[cb], correct["group"], n_boot=n_boot, seed=seed)

    head = dict(zip(ceilings["metric"], ceilings["headroom"])) if len(ceilings) else {}
    head_key = {"CORUM recall": "recall CORUM", "gene-group probe": "gene-group probe"}

    def closed(metric: str) -> str:
        """The reason a comparison with a non-learned baseline is not testable on `metric` ('' if it is)."""
        h = head.get(head_key[metric], float("nan"))
        if not h > HEADROOM_MAX:
            return ""
        return (
            f"a non-learned baseline reaches {h:.2f} of the oracle's above-chance {metric}: no representation can "
            "beat it by much in this world"
        )

    # 1. trained vs random-init, best readout vs best readout
    rows.append(
        _row(
            "trained MAE beats a random-init ViT (each at its own readout)",
            "CORUM recall",
            rec("mae_bstar", "random_init"),
        )
    )
    rows.append(
        _row(
            "trained MAE beats a random-init ViT (each at its own readout)",
            "gene-group probe",
            probe(col("model"), col("random_init")),
        )
    )
    # 2. intermediate block vs last block
    if depth < 6:
        for metric in ("CORUM recall", "gene-group probe"):
            rows.append(
                _row(
                    "an intermediate block b* beats the last block",
                    metric,
                    {},
                    f"encoder depth {depth} < 6",
                    "not testable at this depth",
                )
            )
    elif readouts["model"]["block"] == depth:
        claim = "an intermediate block b* beats the last block"
        rows.append(
            _row(
                claim,
                "CORUM recall",
                {},
                "the selection half chose the last block, so the maps use it: no intermediate block was better there",
                "fails",
            )
        )
        cv = cv if cv is not None else pd.DataFrame(columns=["source", "split", "block", "pooling", "score"])
        t = cv[(cv["source"] == "model") & (cv["split"] == "select") & (cv["block"] >= 1) & (cv["block"] < depth)]
        if len(t):
            pool_int, block_int = t.groupby(["pooling", "block"])["score"].mean().idxmax()
            rows.append(
                _row(
                    claim,
                    "gene-group probe",
                    probe(col("model", pooling=pool_int, block=int(block_int)), col("model", block=depth)),
                    f"the selection half chose the last block; its best intermediate block ({int(block_int)}, "
                    f"{pool_int}) against the last, on the evaluation half",
                )
            )
        else:
            rows.append(_row(claim, "gene-group probe", {}, "no intermediate block was probed", "not testable here"))
    else:
        rows.append(
            _row(
                "an intermediate block b* beats the last block",
                "CORUM recall",
                rec("mae_bstar", "mae_last"),
                f"b* = {readouts['model']['block']} of {depth}",
            )
        )
        rows.append(
            _row(
                "an intermediate block b* beats the last block",
                "gene-group probe",
                probe(col("model"), col("model", block=depth)),
                f"b* = {readouts['model']['block']} of {depth}",
            )
        )
    # 3. MAE vs non-learned features
    for base, name in (("image_stats", "image statistics"), ("cellprofiler", "CellProfiler features")):
        for metric, d in (
            ("CORUM recall", rec("mae_bstar", base)),
            ("gene-group probe", probe(col("model"), col(base))),
        ):
            if not d:
                rows.append(
                    _row(f"trained MAE beats {name}", metric, {}, f"no {name} in this run", "not testable here")
                )
            elif closed(metric):
                rows.append(_row(f"trained MAE beats {name}", metric, d, closed(metric), "not testable in this world"))
            else:
                rows.append(_row(f"trained MAE beats {name}", metric, d))
    # 4. alignment
    for other, name in (("unaligned", "the unaligned map"), ("pca_centerscale", "PCA-center-scale")):
        rows.append(
            _row(
                f"TVN beats {name} (trained MAE b*)",
                "CORUM recall",
                rec("mae_bstar", "mae_bstar", align_a="tvn", align_b=other),
            )
        )
    # 5. curation
    if ablation:
        for metric, d in ablation.items():
            rows.append(
                _row("curating the training set helps (curated vs uncurated, equal steps)", metric, d, "2 seeds each")
            )
    else:
        rows.append(
            _row(
                "curating the training set helps (curated vs uncurated, equal steps)",
                "CORUM recall",
                {},
                "run the ablation: python -m vitally_jax.main --config=configs/demo.py:ablation",
                "not testable here",
            )
        )
    # 6. what a CPU demo cannot test
    for claim, why in (
        ("larger models and more data give better maps (MAE-G/8 vs L/8 vs S/16)", "one encoder size at CPU scale"),
        ("b* is deeper than half the depth for large models", "needs encoders of 24-48 blocks"),
    ):
        rows.append(_row(claim, "", {}, why, "not testable here"))
    return pd.DataFrame(rows)


def analysis(config, outputs: dict) -> dict:
    """Every table the report and results.json carry beyond the benchmark summary."""
    summary = pd.read_parquet(outputs["benchmarks"]["summary"])
    cv = pd.read_parquet(outputs["probe"]["cv"])
    correct = pd.read_parquet(outputs["probe"]["correct"])
    readouts = outputs["probe"]["readouts"]
    labels = outputs["maps"]["labels"]
    primary = str(config.bench.primary_alignment)
    if primary not in set(summary["alignment"]):
        primary = str(summary["alignment"].iloc[-1])
    gg = gene_group_summary(cv, readouts, int(outputs["embed"]["depth"]))
    ceilings = ceilings_table(summary, gg, int(outputs["probe"]["groups"]), primary=primary, labels=labels)
    hits = dict(np.load(outputs["benchmarks"]["hits"]))
    wells = pd.read_parquet(outputs["maps"]["wells"])
    base = outputs.get("baselines", {})
    decoding = decoding_table(
        outputs["maps"]["files"], wells, base.get("processes", []), base.get("visible", []), primary, labels
    )
    findings = findings_table(
        hits,
        correct,
        readouts,
        ceilings,
        depth=int(outputs["embed"]["depth"]),
        primary=primary,
        n_boot=int(config.bench.bootstrap),
        seed=int(config.seed),
        cv=cv,
    )
    # the recall interval of every model's own CORUM recall (primary alignment; ceilings unaligned)
    intervals = []
    for key, h in hits.items():
        model, alignment, source = key.split("__")
        if alignment == primary or model in CEILINGS:
            b = I.bootstrap_mean(h, n_boot=int(config.bench.bootstrap), seed=int(config.seed))
            intervals.append(
                {"model": labels.get(model, model), "alignment": alignment, "source": source, **b, "pairs": len(h)}
            )
    sens = base.get("sensitivity")
    return {
        "primary": primary,
        "gene_groups": gg.assign(
            representation=gg["source"].map(lambda s: labels.get({"model": "mae_bstar"}.get(s, s), s))
        ),
        "ceilings": ceilings,
        "decoding": decoding,
        "findings": findings,
        "recall_intervals": pd.DataFrame(intervals),
        "sensitivity": pd.read_parquet(sens) if sens and pathlib.Path(sens).is_file() else pd.DataFrame(),
        "baseline_names": {**{k: v[1] for k, v in BASELINES.items()}, **{k: v[1] for k, v in CEILINGS.items()}},
    }
