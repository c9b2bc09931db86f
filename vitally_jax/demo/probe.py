"""Demo stage: the linear-probe block sweep (b*) and the pooling-sensitivity table."""

from __future__ import annotations

import pathlib

from vitally_jax.demo.stages import _csv, load_features, log, well_table
from vitally_jax.errors import ConfigError
from vitally_jax.fileio import write_parquet

_SOURCE_NAMES = {"mae": "model", "random_init": "random_init", "image_stats": "image_stats"}  # store -> sweep


def _probe_table(config, outputs: dict, pooling: str, *, sources=("mae", "random_init", "image_stats")):
    """The probe sweep table of the named feature sources (both encoders, the image-statistics baseline) with one
    pooling. Sources are probed independently, so tables of disjoint sources concatenate (`_merge_tables`)."""
    from vitally_jax.probes import sweep as probe_sweep
    from vitally_jax.probes.linear import make_probe

    feats = {k: v for k, v in load_features(None, outputs, pooling).items() if k in sources}
    wells_f, wells = well_table(outputs["screen"]["store"], {k: v[1] for k, v in feats.items()})
    by_name = {_SOURCE_NAMES[k]: (wells_f[k], list(v[0])) for k, v in feats.items()}
    options = {
        "perturbation": {"test_fraction": float(config.probe.test_fraction)},
        "gene_groups": {
            "n_splits": int(config.probe.folds),
            "min_size": int(config.probe.group_min_size),
            "max_size": int(config.probe.group_max_size),
            "seed": int(config.seed),
        },
    }
    return probe_sweep.run_sweep(by_name, wells, task_options=options, probe=make_probe(config.probe.backend))


def _merge_tables(*tables):
    """Concatenate sweep tables of disjoint sources in run_sweep's own row order (task, then source)."""
    import pandas as pd

    from vitally_jax.probes import sweep as probe_sweep

    t = pd.concat(tables, ignore_index=True)
    order = list(_SOURCE_NAMES.values())
    key = t["task"].map(list(probe_sweep.TASKS).index) * len(order) + t["source"].map(order.index)
    return t.iloc[key.argsort(kind="stable")].reset_index(drop=True)


def _model_score(table, b_star: dict) -> float:
    """The trained model's probe accuracy at its overall b*, averaged over tasks."""
    t = table[(table["source"] == "model") & (table["block"] == b_star["overall"])]
    return float(t["score"].mean())


def _pooling_sensitivity(config, outputs: dict, tables: dict, used: str):
    """Every stored pooling, both encoders, best block per task: how much the comparison depends on the readout.

    `tables`: probe tables already computed, by pooling; the others are computed here."""
    import pandas as pd

    rows = []
    for pool in _csv(config.embed.poolings):
        t = tables[pool] if pool in tables else _probe_table(config, outputs, pool, sources=("mae", "random_init"))
        for task, g in t[t["source"] != "image_stats"].groupby("task", sort=False):
            best = g.groupby("source")["score"].max()
            rows.append(
                {
                    "pooling": pool,
                    "task": task,
                    "trained MAE (best block)": float(best.get("model")),
                    "random-init ViT (best block)": float(best.get("random_init")),
                    "used for the maps": pool == used,
                }
            )
    return pd.DataFrame(rows)


def stage_probe(config, workdir: pathlib.Path, outputs: dict) -> dict:
    """Linear-probe sweep over every block of both encoders plus the image-statistics baseline; b*.

    `probe.pooling` may list several poolings ("mean,cls_norm"): each is probed and the one where the trained
    model's mean probe accuracy at its b* is highest is used for the maps (for every encoder)."""
    from vitally_jax.probes import sweep as probe_sweep

    poolings = _csv(config.probe.pooling)
    if not poolings:
        raise ConfigError("probe.pooling: empty; expected e.g. 'mean' or 'mean,cls_norm'")
    scores, tables = {}, {}
    if len(poolings) > 1:
        for pooling in poolings:
            tables[pooling] = _probe_table(config, outputs, pooling, sources=("mae", "random_init"))
            scores[pooling] = _model_score(tables[pooling], probe_sweep.best_blocks(tables[pooling]))
            log(f"  pooling {pooling:<9} trained-model probe accuracy at b* {scores[pooling]:.3f}")
        pooling = max(scores, key=scores.get)
        # the encoders' table at the chosen pooling is already computed: add only the baseline
        table = _merge_tables(tables[pooling], _probe_table(config, outputs, pooling, sources=("image_stats",)))
    else:
        pooling = poolings[0]
        table = _probe_table(config, outputs, pooling)
    out_dir = workdir / "probe"
    b_star = probe_sweep.write_sweep(table, out_dir, extra={"pooling": pooling, "pooling_scores": scores})
    write_parquet(
        out_dir / "pooling_sensitivity.parquet",
        _pooling_sensitivity(config, outputs, {**tables, pooling: table}, pooling),
    )
    for task in probe_sweep.TASKS:
        t = table[table["task"] == task]
        best = {s: float(g["score"].max()) for s, g in t.groupby("source")}
        log(
            f"  probe {task:<13} b*={b_star.get(task)}  best balanced accuracy "
            + ", ".join(f"{s} {v:.3f}" for s, v in best.items())
        )
    key = config.probe.b_star_task
    key = "overall" if key == "mean" else key
    if key not in b_star:
        raise ConfigError(f"probe.b_star_task: {config.probe.b_star_task!r}; expected 'mean' or one of {list(b_star)}")
    return {
        "dir": str(out_dir),
        "table": str(out_dir / "sweep.csv"),
        "b_star": b_star,
        "b_star_used": b_star[key],
        "pooling": pooling,
        "pooling_scores": scores,
        "pooling_sensitivity": str(out_dir / "pooling_sensitivity.parquet"),
    }
