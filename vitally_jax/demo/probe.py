"""Demo stage `probe`: every block and pooling of both encoders, readouts chosen on held-out data.

The experiments are split in two halves (alternating in sorted order). Each gene's embedding is the mean of its
wells in one half. On the *selection* half, the gene-group probe (repeated stratified CV over genes,
`probe.select_seeds` seeds) scores every (pooling, block) of each encoder; each encoder's readout is its best
(pooling, block) there, chosen by the same rule for the trained MAE and the random-init ViT (ties to the shallower
block, then to the earlier pooling in `probe.pooling`). Every reported gene-group score comes from the *evaluation*
half (`probe.cv_seeds` CV seeds, mean +- SD), so the choice and the score never see the same wells. The baselines
and ceilings are scored the same way. The RxRx1-style perturbation probe (train on some experiments, test on the
others) is reported per block at each encoder's chosen pooling.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pandas as pd

from vitally_jax.demo.stages import BASELINES, CEILINGS, _csv, load_representation, log, well_table
from vitally_jax.errors import BenchmarkInputError, ConfigError
from vitally_jax.fileio import write_parquet, write_text

ENCODERS = {"mae": "model", "random_init": "random_init"}  # stage key -> source name in the tables


def split_experiments(wells: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (selection, evaluation) of the wells: experiments alternate between halves (sorted)."""
    exps = sorted(wells["experiment"].astype(str).unique())
    if len(exps) < 2:
        raise BenchmarkInputError(f"probe: need wells of >= 2 experiments to select on held-out data, got {exps}")
    sel = set(exps[::2])
    is_sel = wells["experiment"].astype(str).isin(sel).to_numpy()
    return is_sel, ~is_sel


def gene_group_items(wells: pd.DataFrame, config) -> tuple[list[str], np.ndarray]:
    """Genes labelled by disjoint CORUM groups (`probe.group_*`) and their labels."""
    from vitally_jax.probes.gene_groups import functional_gene_groups, gene_labels

    genes = sorted(set(wells.loc[(wells["perturbation_type"].astype(str) == "gene").to_numpy(), "perturbation"]))
    groups = functional_gene_groups(
        genes,
        min_size=int(config.probe.group_min_size),
        max_size=int(config.probe.group_max_size),
        max_groups=int(config.probe.max_groups),
    )
    lab = gene_labels(groups)
    names = sorted(lab)
    if len(groups) < 2:
        raise BenchmarkInputError(f"gene-group probe: only {len(groups)} CORUM group(s) among {len(genes)} genes")
    return names, np.array([lab[g] for g in names])


def gene_means(x: np.ndarray, wells: pd.DataFrame, rows: np.ndarray, genes: list[str]) -> np.ndarray:
    """(nb, wells, D) -> (nb, len(genes), D): mean over each gene's wells among `rows` (a boolean mask)."""
    pert = wells["perturbation"].astype(str).to_numpy()
    is_gene = (wells["perturbation_type"].astype(str) == "gene").to_numpy() & ~wells["is_control"].astype(
        bool
    ).to_numpy()
    code = {g: i for i, g in enumerate(genes)}
    r = np.flatnonzero(np.asarray(rows, bool) & is_gene)
    r = r[[p in code for p in pert[r]]]
    idx = np.array([code[p] for p in pert[r]], np.int64)
    sums = np.zeros((x.shape[0], len(genes), x.shape[2]), np.float64)
    np.add.at(sums, (slice(None), idx), x[:, r].astype(np.float64))
    counts = np.bincount(idx, minlength=len(genes))
    if (counts == 0).any():
        raise BenchmarkInputError(f"gene-group probe: {int((counts == 0).sum())} labelled genes have no well in a half")
    return (sums / counts[None, :, None]).astype(np.float32)


def choose_readout(table: pd.DataFrame, source: str, poolings: list[str]) -> dict:
    """The (pooling, block) with the best mean selection score of one source (ties: shallower block, then the
    earlier pooling)."""
    t = table[(table["source"] == source) & (table["split"] == "select")]
    m = t.groupby(["pooling", "block"])["score"].mean().reset_index()
    m["pool_rank"] = m["pooling"].map(poolings.index)
    m = m.sort_values(["score", "block", "pool_rank"], ascending=[False, True, True])
    best = m.iloc[0]
    return {"pooling": str(best["pooling"]), "block": int(best["block"]), "select_score": float(best["score"])}


def stage_probe(config, workdir: pathlib.Path, outputs: dict) -> dict:
    """Gene-group probes of every (pooling, block) of both encoders (selection and evaluation halves), of every
    baseline and ceiling (evaluation half), the readouts, and the perturbation probe (see the module docstring)."""
    from vitally_jax.probes.instruments import repeated_group_cv
    from vitally_jax.probes.linear import make_probe
    from vitally_jax.probes.sweep import task_perturbation

    poolings = _csv(config.probe.pooling)
    if not poolings:
        raise ConfigError("probe.pooling: empty; expected e.g. 'mean' or 'cls,cls_norm,mean,mean_norm'")
    probe = make_probe(config.probe.backend)
    sel_seeds = list(range(int(config.probe.select_seeds)))
    ev_seeds = list(range(100, 100 + int(config.probe.cv_seeds)))
    folds = int(config.probe.folds)
    rows: list[dict] = []
    correct: dict[str, np.ndarray] = {}  # "source|pooling|block" -> per-gene share of CV seeds correct (eval half)
    wells = genes = labels = is_sel = is_ev = None

    def score(src, pooling, blocks, x, splits):
        nonlocal wells, genes, labels, is_sel, is_ev
        xw, w = well_table(outputs["screen"]["store"], {"x": x})
        if wells is None:
            wells = w
            genes, labels = gene_group_items(wells, config)
            is_sel, is_ev = split_experiments(wells)
        for split in splits:
            mask, seeds = (is_sel, sel_seeds) if split == "select" else (is_ev, ev_seeds)
            s, corr = repeated_group_cv(
                gene_means(xw["x"], wells, mask, genes),
                labels,
                probe=probe,
                seeds=seeds,
                n_splits=folds,
                return_correct=True,
            )
            if split == "eval":
                for bi, b in enumerate(blocks):
                    correct[f"{src}|{pooling}|{int(b)}"] = corr[bi]
            for bi, b in enumerate(blocks):
                for si, seed in enumerate(seeds):
                    rows.append(
                        {
                            "source": src,
                            "pooling": pooling,
                            "block": int(b),
                            "split": split,
                            "seed": seed,
                            "score": float(s[bi, si]),
                        }
                    )
        return xw["x"]

    for enc, src in ENCODERS.items():
        for pooling in poolings:
            blocks, x = load_representation(outputs, enc, pooling)
            score(src, pooling, blocks, x, ("select", "eval"))
        log(f"  probed every block and pooling of {enc}")
    table = pd.DataFrame(rows)
    readouts = {src: choose_readout(table, src, poolings) for src in ENCODERS.values()}
    for name in (*BASELINES, *CEILINGS):
        rep = load_representation(outputs, name)
        if rep is not None:
            score(name, "", rep[0], rep[1], ("eval",))
    table = pd.DataFrame(rows)

    # the perturbation probe per block at each encoder's chosen pooling (and the baselines)
    pert_rows = []
    for enc, src in ENCODERS.items():
        blocks, x = load_representation(outputs, enc, readouts[src]["pooling"])
        xw, _ = well_table(outputs["screen"]["store"], {"x": x})
        s = task_perturbation(xw["x"], wells, probe=probe, test_fraction=float(config.probe.test_fraction))
        pert_rows += [
            {"source": src, "task": "perturbation", "block": int(b), "score": float(v)} for b, v in zip(blocks, s)
        ]
    for name in (*BASELINES, *CEILINGS):
        rep = load_representation(outputs, name)
        if rep is not None:
            xw, _ = well_table(outputs["screen"]["store"], {"x": rep[1]})
            s = task_perturbation(xw["x"], wells, probe=probe, test_fraction=float(config.probe.test_fraction))
            pert_rows.append({"source": name, "task": "perturbation", "block": 0, "score": float(s[0])})
    # sweep.csv: the per-block curves (gene groups: evaluation mean at each encoder's chosen pooling)
    ev = table[table["split"] == "eval"]
    gg = []
    for src, t in ev.groupby("source", sort=False):
        if src in readouts:
            t = t[t["pooling"] == readouts[src]["pooling"]]
        m = t.groupby("block")["score"].agg(["mean", "std"]).reset_index()
        gg += [
            {"source": src, "task": "gene_groups", "block": int(r.block), "score": float(r.mean), "sd": float(r.std)}
            for r in m.itertuples()
        ]
    sweep = pd.DataFrame(gg + pert_rows)
    out_dir = workdir / "probe"
    write_parquet(out_dir / "gene_groups_cv.parquet", table)
    write_parquet(
        out_dir / "gene_groups_correct.parquet",
        pd.DataFrame({"gene": genes, "group": labels, **{k: v for k, v in correct.items()}}),
    )
    sweep_path = out_dir / "sweep.csv"
    from vitally_jax.fileio import atomic_path

    with atomic_path(sweep_path) as tmp:
        sweep.to_csv(tmp, index=False)
    import json

    info = {
        "readouts": readouts,
        "groups": int(len(set(labels))),
        "genes": int(len(genes)),
        "selection_experiments": sorted(set(wells.loc[is_sel, "experiment"].astype(str))),
        "evaluation_experiments": sorted(set(wells.loc[is_ev, "experiment"].astype(str))),
    }
    write_text(out_dir / "readouts.json", json.dumps(info, indent=1) + "\n")
    for src, r in readouts.items():
        e = ev[(ev["source"] == src) & (ev["pooling"] == r["pooling"]) & (ev["block"] == r["block"])]["score"]
        log(f"  {src:<12} readout {r['pooling']} block {r['block']}: gene groups {e.mean():.3f} +- {e.std():.3f}")
    log(f"  gene-group task: {info['groups']} groups, {info['genes']} genes")
    return {
        "dir": str(out_dir),
        "table": str(sweep_path),
        "cv": str(out_dir / "gene_groups_cv.parquet"),
        "correct": str(out_dir / "gene_groups_correct.parquet"),
        "readouts": readouts,
        "b_star_used": readouts["model"]["block"],
        "pooling": readouts["model"]["pooling"],
        "groups": info["groups"],
        "genes": info["genes"],
    }
