"""Block search: linear probes on every block's embedding, the best block b*, and the encoder trimmed to b*.

Tasks (each returns one balanced accuracy per block):

- `perturbation`: RxRx1-style perturbation identity. Which perturbation did a well receive? Non-control wells only;
  the probe is trained on some experiments and scored on held-out experiments (the last `test_fraction` of the
  sorted experiment names), so it must generalise across batches. Only perturbations seen in both splits count.
- `gene_groups`: Anax-style functional groups. Wells of gene perturbations are averaged per gene; genes are labelled
  by disjoint CORUM complexes (`vitally_jax.probes.gene_groups`); stratified k-fold cross-validation over genes,
  scored by the balanced accuracy of the pooled out-of-fold predictions.

Sources: the model (one score per block) and baselines (a random-init encoder of the same architecture, per block;
image-statistics features, a single "block" 0). b* = argmax over the model's blocks, per task and overall (mean of
the tasks' scores; ties go to the shallower block).
"""

from __future__ import annotations

import json
import pathlib
import shutil
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from vitally_jax.embedding.blocks import DEFAULT_PROBE_POOLING
from vitally_jax.errors import BenchmarkInputError, ConfigError, OutputError
from vitally_jax.fileio import ARTEFACT_KEY, atomic_path, check_output, swap_in, write_marker, write_text
from vitally_jax.probes.gene_groups import functional_gene_groups, gene_labels
from vitally_jax.probes.linear import JaxLogisticProbe, LinearProbe, balanced_accuracy

TASKS = ("perturbation", "gene_groups")
MODEL = "model"


def _check_features(features: np.ndarray, meta: pd.DataFrame, what: str) -> np.ndarray:
    features = np.asarray(features)
    if features.ndim != 3 or features.shape[1] != len(meta):
        raise BenchmarkInputError(f"{what}: expected features (blocks, {len(meta)} wells, width), got {features.shape}")
    if not np.isfinite(features).all():
        raise BenchmarkInputError(f"{what}: features contain NaN or inf")
    return features


def _non_control(meta: pd.DataFrame) -> np.ndarray:
    pert = meta["perturbation"].astype(str)
    return (~meta["is_control"].astype(bool).to_numpy()) & (pert.str.len() > 0).to_numpy()


def perturbation_split(meta: pd.DataFrame, *, test_fraction: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, test) of non-control wells split by experiment; perturbations in both splits only."""
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction: expected a value in (0, 1), got {test_fraction}")
    keep = _non_control(meta)
    experiments = sorted(meta.loc[keep, "experiment"].astype(str).unique())
    if len(experiments) < 2:
        raise BenchmarkInputError(
            f"perturbation task: need non-control wells in >= 2 experiments, found {len(experiments)}"
        )
    n_test = min(len(experiments) - 1, max(1, int(round(test_fraction * len(experiments)))))
    test_exps = set(experiments[-n_test:])
    is_test = meta["experiment"].astype(str).isin(test_exps).to_numpy()
    pert = meta["perturbation"].astype(str).to_numpy()
    shared = set(pert[keep & ~is_test]) & set(pert[keep & is_test])
    in_shared = np.isin(pert, sorted(shared))
    train = np.flatnonzero(keep & ~is_test & in_shared)
    test = np.flatnonzero(keep & is_test & in_shared)
    if len(shared) < 2:
        raise BenchmarkInputError(
            "perturbation task: fewer than 2 perturbations occur in both the train and the "
            f"held-out experiments ({sorted(test_exps)})"
        )
    return train, test


def task_perturbation(
    features: np.ndarray, meta: pd.DataFrame, *, probe: LinearProbe, test_fraction: float = 0.25
) -> np.ndarray:
    """features (nb, wells, D) -> balanced accuracy per block (nb,) on held-out experiments."""
    features = _check_features(features, meta, "perturbation task")
    train, test = perturbation_split(meta, test_fraction=test_fraction)
    y = meta["perturbation"].astype(str).to_numpy()
    pred = probe.fit_predict(features[:, train], y[train], features[:, test])
    return np.array([balanced_accuracy(y[test], p) for p in pred])


def gene_embeddings(features: np.ndarray, meta: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """Mean over the wells of each gene perturbation: (nb, wells, D) -> ((nb, genes, D), sorted gene symbols)."""
    is_gene = (meta["perturbation_type"].astype(str) == "gene").to_numpy() & _non_control(meta)
    genes = meta["perturbation"].astype(str).to_numpy()
    names = sorted(set(genes[is_gene]))
    if not names:
        raise BenchmarkInputError("gene groups task: no wells with perturbation_type == 'gene'")
    code = {g: i for i, g in enumerate(names)}
    rows = np.flatnonzero(is_gene)
    idx = np.array([code[g] for g in genes[rows]])
    sums = np.zeros((features.shape[0], len(names), features.shape[2]), np.float64)
    np.add.at(sums, (slice(None), idx), features[:, rows].astype(np.float64))
    counts = np.bincount(idx, minlength=len(names))
    return (sums / counts[None, :, None]).astype(np.float32), names


def task_gene_groups(
    features: np.ndarray,
    meta: pd.DataFrame,
    *,
    probe: LinearProbe,
    groups: Mapping[str, Sequence[str]] | None = None,
    min_size: int = 5,
    max_size: int = 20,
    max_groups: int = 40,
    n_splits: int = 5,
    seed: int = 0,
) -> np.ndarray:
    """features (nb, wells, D) -> balanced accuracy per block (nb,) of gene-group labels, k-fold over genes."""
    from sklearn.model_selection import StratifiedKFold

    features = _check_features(features, meta, "gene groups task")
    gene_x, genes = gene_embeddings(features, meta)
    if groups is None:
        groups = functional_gene_groups(genes, min_size=min_size, max_size=max_size, max_groups=max_groups)
    labels = gene_labels({k: list(v) for k, v in groups.items()})
    keep = np.array([g in labels for g in genes])
    y = np.array([labels[g] for g in np.asarray(genes)[keep]])
    counts = pd.Series(y).value_counts()
    if len(counts) < 2 or counts.min() < 2:
        raise BenchmarkInputError(
            f"gene groups task: need >= 2 groups of >= 2 screened genes, found {len(counts)} groups "
            f"(sizes {sorted(counts.tolist())}); lower --group-min-size or screen more genes"
        )
    x = gene_x[:, keep]
    folds = StratifiedKFold(n_splits=int(min(n_splits, counts.min())), shuffle=True, random_state=seed)
    pred = np.empty((x.shape[0], len(y)), dtype=y.dtype)
    for train, test in folds.split(np.zeros(len(y)), y):
        pred[:, test] = probe.fit_predict(x[:, train], y[train], x[:, test])
    return np.array([balanced_accuracy(y, p) for p in pred])


def run_sweep(
    sources: Mapping[str, tuple[np.ndarray, Sequence[int]]],
    meta: pd.DataFrame,
    *,
    tasks: Sequence[str] = TASKS,
    probe: LinearProbe | None = None,
    task_options: Mapping | None = None,
) -> pd.DataFrame:
    """Score every source's blocks on every task.

    sources: name -> (features (nb, wells, D), block numbers (nb,)); meta: one row per well.
    Returns a table with columns source, task, block, score (balanced accuracy), chance (1 / number of classes).
    """
    probe = probe or JaxLogisticProbe()
    options = dict(task_options or {})
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ConfigError(f"tasks: expected names from {TASKS}, got {unknown}")
    rows = []
    for task in tasks:
        opts = options.get(task, {})
        for name, (features, blocks) in sources.items():
            if len(blocks) != np.asarray(features).shape[0]:
                raise BenchmarkInputError(
                    f"source {name!r}: {len(blocks)} block numbers for {np.asarray(features).shape[0]} blocks"
                )
            if task == "perturbation":
                scores = task_perturbation(features, meta, probe=probe, **opts)
            else:
                scores = task_gene_groups(features, meta, probe=probe, **opts)
            rows += [dict(source=name, task=task, block=int(b), score=float(s)) for b, s in zip(blocks, scores)]
    return pd.DataFrame(rows, columns=["source", "task", "block", "score"])


def best_blocks(table: pd.DataFrame, source: str = MODEL) -> dict[str, int]:
    """b* per task and 'overall' (argmax of the mean over tasks) for one source; ties go to the shallower block."""
    sub = table[table["source"] == source]
    if sub.empty:
        raise BenchmarkInputError(f"sweep table: no rows for source {source!r}")
    pivot = sub.pivot_table(index="block", columns="task", values="score").sort_index()
    out = {task: int(pivot[task].idxmax()) for task in pivot.columns}
    out["overall"] = int(pivot.mean(axis=1).idxmax())
    return out


def plot_sweep(table: pd.DataFrame, b_star: Mapping[str, int], path: str | pathlib.Path) -> None:
    """PNG: score per block per task (one panel per task), b* marked, single-block baselines as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    tasks = list(dict.fromkeys(table["task"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        sub = table[table["task"] == task]
        for name, grp in sub.groupby("source", sort=False):
            grp = grp.sort_values("block")
            if len(grp) == 1 and name != MODEL:
                ax.axhline(grp["score"].iloc[0], ls="--", lw=1, color="grey", label=name)
            else:
                ax.plot(grp["block"], grp["score"], marker="o", ms=3, label=name, lw=2 if name == MODEL else 1)
        if task in b_star:
            best = sub[(sub["source"] == MODEL) & (sub["block"] == b_star[task])]["score"]
            if len(best):
                ax.scatter(
                    [b_star[task]],
                    [best.iloc[0]],
                    s=120,
                    marker="*",
                    color="crimson",
                    zorder=5,
                    label=f"b* = {b_star[task]}",
                )
        ax.set_title(task)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("block")
        ax.set_ylabel("balanced accuracy")
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


KIND = "probe sweep"  # the artefact kind named in sweep.json (see vitally_jax.fileio)


def write_sweep(table: pd.DataFrame, out_dir: str | pathlib.Path, *, extra: Mapping | None = None) -> dict[str, int]:
    """Write sweep.csv, sweep.json (table, b*, extra info) and sweep.png into out_dir; return b*.

    `out_dir` must be new, empty or a probe sweep folder (`OutputError` otherwise); sweep.json is written last,
    with `"complete": true`."""
    out_dir = pathlib.Path(out_dir)
    check_output(out_dir, KIND, resume=True)
    b_star = best_blocks(table)
    with atomic_path(out_dir / "sweep.csv") as tmp:
        table.to_csv(tmp, index=False)
    plot_sweep(table, b_star, out_dir / "sweep.png")
    payload = {
        ARTEFACT_KEY: KIND,
        "complete": True,
        "b_star": b_star,
        "rows": table.to_dict(orient="records"),
        **dict(extra or {}),
    }
    write_text(out_dir / "sweep.json", json.dumps(payload, indent=1, default=float) + "\n")
    return b_star


# ----------------------------------------------------------------------------------------------------------------
# The whole block search on a screen
# ----------------------------------------------------------------------------------------------------------------


def sweep_screen(
    encoder,
    image_store,
    out_dir: str | pathlib.Path,
    *,
    pooling: str = DEFAULT_PROBE_POOLING,
    baselines: Sequence[str] = ("random_init", "image_stats"),
    tasks: Sequence[str] = TASKS,
    probe: LinearProbe | None = None,
    task_options: Mapping | None = None,
    crop: int = 256,
    batch_size: int = 64,
    chunk_images: int = 64,
    blocks: Sequence[int] | None = None,
    mesh=None,
    seed: int = 0,
    progress: bool = True,
    overwrite: bool = False,
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Embed a screen (resumably, into out_dir/embeddings/<source>), probe every block, write the sweep table/plot.

    Sources: 'model' (the encoder), optional baselines 'random_init' (same architecture, random weights from
    `seed`) and 'image_stats'. Features are averaged per well before probing. Returns (table, b*).
    An unfinished sweep at `out_dir` is resumed; a finished one is replaced only with `overwrite=True` (built
    in `.OUT.replacement` beside it and swapped in when done); anything else at `out_dir` is refused.
    """
    from flax import nnx

    from vitally_jax.data.store import ImageStore
    from vitally_jax.embedding.screen import EmbeddingStore, embed_screen, well_features

    unknown = [b for b in baselines if b not in ("random_init", "image_stats")]
    if unknown:
        raise ConfigError(f"baselines: expected names from ('random_init', 'image_stats'), got {unknown}")
    if not isinstance(image_store, ImageStore):
        image_store = ImageStore.open(image_store)
    final = pathlib.Path(out_dir)
    out_dir = start_sweep_folder(final, overwrite=overwrite, inputs=[image_store.path])
    encoders = {MODEL: encoder}
    if "random_init" in baselines:
        encoders["random_init"] = type(encoder)(encoder.cfg, rngs=nnx.Rngs(seed))
    sources = {}
    well_meta = None
    for name, enc in encoders.items():
        path = out_dir / "embeddings" / name
        embed_screen(
            enc,
            image_store,
            path,
            blocks=blocks,
            pooling=(pooling,),
            crop=crop,
            batch_size=batch_size,
            chunk_images=chunk_images,
            mesh=mesh,
            progress=progress,
        )
        store = EmbeddingStore.open(path)
        feats, well_meta = well_features(store.features(pooling), store.metadata)
        sources[name] = (feats, store.blocks)
    if "image_stats" in baselines:
        from vitally_jax.embedding.image_stats import store_image_statistics

        stats = store_image_statistics(image_store)[None]  # (1, images, F): one pseudo-block
        feats, well_meta = well_features(stats, image_store.metadata)
        sources["image_stats"] = (feats, [0])
    options = {k: dict(v) for k, v in (task_options or {}).items()}
    extra = {
        "pooling": pooling,
        "crop": crop,
        "probe": type(probe or JaxLogisticProbe()).__name__,
        "image_store": str(image_store.path),
        "wells": int(len(well_meta)),
        "encoder_depth": int(encoder.cfg.depth),
    }
    if "gene_groups" in tasks:  # fix the groups once, and record them with the table
        opts = options.setdefault("gene_groups", {})
        if "groups" not in opts:
            genes = well_meta.loc[well_meta["perturbation_type"].astype(str) == "gene", "perturbation"].astype(str)
            opts["groups"] = functional_gene_groups(
                sorted(set(genes)),
                min_size=opts.pop("min_size", 5),
                max_size=opts.pop("max_size", 20),
                max_groups=opts.pop("max_groups", 40),
            )
        extra["gene_groups"] = {k: list(v) for k, v in opts["groups"].items()}
    table = run_sweep(sources, well_meta, tasks=tasks, probe=probe, task_options=options)
    b_star = write_sweep(table, out_dir, extra=extra)
    if out_dir != final:
        swap_in(out_dir, final)
    return table, b_star


def check_sweep_folder(path: str | pathlib.Path, *, overwrite: bool = False, inputs=()) -> bool:
    """Refuse `path` as a sweep output unless it is new, empty, an unfinished sweep, or (with `overwrite`) a
    finished one; returns whether a sweep is there already. Touches nothing."""
    path = pathlib.Path(path)
    existed = check_output(path, KIND, overwrite=overwrite, resume=not overwrite, inputs=inputs)
    marker = _read_marker(path) or {}
    if existed and not overwrite and marker.get("complete", "b_star" in marker):
        raise OutputError(f"{path}: a finished probe sweep is here; pass --overwrite to replace it")
    return existed


def start_sweep_folder(path: pathlib.Path, *, overwrite: bool = False, inputs=()) -> pathlib.Path:
    """Check `path` (see `sweep_screen`) and return the folder to work in, with its marker written."""
    existed = check_sweep_folder(path, overwrite=overwrite, inputs=inputs)
    work = path
    if overwrite and existed:
        work = path.with_name(f".{path.name}.replacement")
        if work.exists() and (_read_marker(work) or {}).get("complete"):
            check_output(work, KIND, overwrite=True)  # ours, finished but never swapped in: start it anew
            shutil.rmtree(work)
    check_output(work, KIND, resume=True)
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "sweep.json").is_file():
        write_marker(work, KIND, complete=False)
    return work


def _read_marker(path: pathlib.Path) -> dict | None:
    try:
        doc = json.loads((path / "sweep.json").read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None
