"""Phenoprints-style curation of a training set: which images of a screen to pretrain on.

Steps, in order (each counted in the report):

1. `missing_metadata`: drop images whose well, plate, experiment, perturbation or perturbation type is missing
   (and control images without a control type).
2. `image_quality`: drop blank, saturated and out-of-focus images (`CurationConfig` thresholds).
3. `min_replicates`: drop perturbations seen in fewer than `min_experiments` experiments or `min_wells` wells.
   Controls are exempt (step 4 handles them).
4. `control_undersampling`: keep a seeded random fraction of positive- and negative-control wells per plate.
5. `consistency`: keep a perturbation if its replicate wells are more alike than random negative-control wells
   of the same experiment (permutation test of the mean pairwise cosine, per experiment, p-values combined over
   experiments by the Cauchy combination test) with p < `alpha` under ANY of the supplied embedding sets.

Wells are the unit of steps 3-5: a well is (experiment, plate, well_id); its embedding is the mean of its
images' embeddings. Embedding sets are (N, D) arrays aligned with the metadata rows.

The consistency null is that a perturbation without phenotype has wells like negative-control wells, so the
null sets of an experiment are drawn from its negative-control wells that passed steps 1-2 (before
undersampling; from all its wells where it has fewer than max(10, 2 x its largest set), flagged in
`tests.null_pool`). The p-values are calibrated when, under that null, a perturbation's wells stay exchangeable
with the pool's wells after the transformation, so every fitted step treats the two alike:

- well embeddings are center-scaled per plate on ALL the plate's wells (tested and pool wells are in the fit);
- the wells of an experiment are then whitened on the negative controls of the OTHER experiments (tested and
  pool wells are outside the fit; with one experiment, on its own controls), so that replicate noise is
  isotropic. Raw image statistics are strongly correlated features; whitened on all wells instead, the
  covariance would hold the phenotypes. `tests/test_curation_calibration.py` asserts that under the default
  settings at least 85% of the planted genes of its synthetic screens are kept and at most 3% of the genes
  without phenotype.

Alternatives (synthetic screens, 50% of genes without phenotype, image statistics): a null drawn from all wells
(the paper's "random wells"; `null_pool="all"`) is anti-conservative. Centring on all wells shifts every
phenotype-free well by minus the plate's mean phenotype, so such wells are more alike than random wells, which mix
in phenotypic wells; `tests/test_curation_calibration.py` asserts that the default null gives uniform p-values
for genes without phenotype (KS p > 0.05, 3-7% below 0.05, median 0.4-0.6) and that `null_pool="all"` does not
(KS p < 1e-6, median below 0.4, more than 7% below 0.05). Centring on the controls with a null from all wells
makes it conservative (same-complex and positive-control pairs then fall in random sets). Centring or whitening
on the pool's own wells makes them look tighter or more isotropic than wells outside the fit, the more so as D
nears the number of controls. The null draws are not stratified by plate: a perturbation's wells are assumed to
lie on the experiment's plates as its controls do (at random in the synthetic layout).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping

import numpy as np
import pandas as pd

from vitally_jax.curation import stats as cs
from vitally_jax.errors import ConfigError, DataError
from vitally_jax.fileio import ARTEFACT_KEY, check_output, text_tag, write_parquet, write_text

REQUIRED = (
    "image_id",
    "well_id",
    "plate",
    "experiment",
    "perturbation",
    "perturbation_type",
    "is_control",
    "control_type",
)
_STORE_COLUMNS = set(REQUIRED) | {"well_row", "well_col", "site", "guide_id", "concentration", "n_sites"}
_MUST_BE_PRESENT = ("image_id", "well_id", "plate", "experiment", "perturbation", "perturbation_type", "is_control")
_TEST_COLUMNS = ["perturbation", "experiment", "n_wells", "mean_cosine", "p", "null_pool"]
# an experiment draws its null from its negative controls when it has at least max(this, 2 x its largest set)
_MIN_NULL_WELLS = 10


@dataclasses.dataclass(frozen=True)
class CurationConfig:
    """Curation settings; defaults follow the paper (3 experiments, 20 wells, 10% / 30% controls, p < 0.01)."""

    min_experiments: int = 3
    min_wells: int = 20
    keep_positive_controls: float = 0.1
    keep_negative_controls: float = 0.3
    n_permutations: int = 1000
    alpha: float = 0.01
    seed: int = 0
    # per-batch center-scale of well embeddings before cosines, on all wells of the batch: "plate", "experiment"
    # or "none"
    normalize: str = "plate"
    # then whiten on controls: X <- X (S + whiten_shrinkage I)^(-1/2) for the wells of an experiment, S the
    # covariance of the negative-control wells of the OTHER experiments (of all experiments when there is one;
    # all wells when there are fewer than 2 controls), so replicate noise is isotropic and the fit treats tested
    # and null wells alike; "none" to skip
    whiten: str = "controls"
    whiten_shrinkage: float = 0.5
    # wells the permutation null draws from, per experiment: "controls" = its negative-control wells (what a
    # perturbation without phenotype looks like; all its wells where it has fewer than max(10, 2 x its largest
    # set)), "all" = all its wells (the paper's "random wells"; miscalibrated, see the module docstring)
    null_pool: str = "controls"
    # image quality: blank if max channel std < blank_max_contrast (uint8 units); saturated if some channel has
    # more than saturated_max_fraction of its pixels at 255; out of focus if the Laplacian variance is below
    # focus_min_ratio x the plate's median (and below focus_min when set)
    blank_max_contrast: float = 2.0
    saturated_max_fraction: float = 0.05
    focus_min_ratio: float = 0.25
    focus_min: float | None = None
    # debris if more than this fraction of the pixels is above the 95th percentile of every channel at once
    # (the `cobright` measure; None = no debris flag)
    debris_min_cobright: float | None = None

    def __post_init__(self):
        for name in ("keep_positive_controls", "keep_negative_controls"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"curation.{name}: expected a fraction in [0, 1], got {v}")
        if not 0.0 < self.alpha < 1.0:
            raise ConfigError(f"curation.alpha: expected a value in (0, 1), got {self.alpha}")
        if self.n_permutations < 1:
            raise ConfigError(f"curation.n_permutations: expected >= 1, got {self.n_permutations}")
        if self.min_experiments < 1 or self.min_wells < 1:
            raise ConfigError("curation.min_experiments / min_wells: expected integers >= 1")
        if self.whiten not in ("controls", "none"):
            raise ConfigError(f"curation.whiten: expected 'controls' or 'none', got {self.whiten!r}")
        if self.null_pool not in ("controls", "all"):
            raise ConfigError(f"curation.null_pool: expected 'controls' or 'all', got {self.null_pool!r}")
        if self.whiten_shrinkage < 0:
            raise ConfigError(f"curation.whiten_shrinkage: expected >= 0, got {self.whiten_shrinkage}")
        if self.normalize not in ("plate", "experiment", "none"):
            raise ConfigError(f"curation.normalize: expected 'plate', 'experiment' or 'none', got {self.normalize!r}")


@dataclasses.dataclass
class CurationResult:
    """`index`: kept metadata rows (column `image_id` first); `report`: counts after each step;
    `perturbations`: one row per non-control perturbation that passed steps 1-2 (n_wells, n_experiments,
    `p_<set>` combined p per embedding set, kept, dropped_at: '', 'min_replicates' or 'consistency');
    `tests`: one row per (embedding set, perturbation, experiment) consistency test; `quality_flags`: the
    image-quality flags (blank, saturated, out_of_focus) of every input image, aligned with the input rows (None
    when the image-quality step was skipped)."""

    index: pd.DataFrame
    report: dict
    perturbations: pd.DataFrame
    tests: pd.DataFrame
    quality_flags: pd.DataFrame | None = None


# ------------------------------------------------------------------------------------------------ helpers


def _missing(col: pd.Series) -> np.ndarray:
    return (col.isna() | (col.astype(str) == "")).to_numpy()


def _counts(meta: pd.DataFrame, keep: np.ndarray) -> dict:
    m = meta[keep]
    ctrl = m["is_control"].astype(bool)
    return {
        "images": int(len(m)),
        "wells": int(m["_well"].nunique()),
        "perturbations": int(m.loc[~ctrl, "perturbation"].nunique()),
        "control_wells": int(m.loc[ctrl, "_well"].nunique()),
        "experiments": int(m["experiment"].nunique()),
        "plates": int(m["plate"].nunique()),
    }


# ------------------------------------------------------------------------------------------------- steps


def quality_flags(metadata: pd.DataFrame, quality: pd.DataFrame, config: CurationConfig) -> pd.DataFrame:
    """Boolean `blank`, `saturated`, `out_of_focus` (and `debris` when `debris_min_cobright` is set) per image
    from measures aligned with the metadata rows (`contrast`, `saturation`, `focus`, `cobright`, as from
    `curation_stats.image_quality`). The focus threshold is relative
    to the median focus of the non-blank images of the same plate."""
    for c in ("contrast", "saturation", "focus"):
        if c not in quality.columns:
            raise DataError(f"image quality table: missing column '{c}' (expected contrast, saturation, focus)")
    if len(quality) != len(metadata):
        raise DataError(f"image quality table: {len(quality)} rows, expected one per image ({len(metadata)})")
    q = quality.reset_index(drop=True)
    blank = q["contrast"].to_numpy() < config.blank_max_contrast
    saturated = q["saturation"].to_numpy() > config.saturated_max_fraction
    focus = q["focus"].to_numpy()
    plate_median = (
        pd.Series(np.where(blank, np.nan, focus)).groupby(metadata["plate"].to_numpy()).transform("median").to_numpy()
    )
    oof = focus < config.focus_min_ratio * np.nan_to_num(plate_median, nan=0.0)
    if config.focus_min is not None:
        oof |= focus < config.focus_min
    flags = pd.DataFrame({"blank": blank, "saturated": saturated & ~blank, "out_of_focus": oof & ~blank & ~saturated})
    if config.debris_min_cobright is not None:
        if "cobright" not in quality.columns:
            raise DataError("image quality table: missing column 'cobright' (needed by debris_min_cobright)")
        debris = q["cobright"].to_numpy() > config.debris_min_cobright
        flags["debris"] = debris & ~flags.to_numpy().any(axis=1)
    return flags


def undersample_controls(wells: pd.DataFrame, config: CurationConfig) -> np.ndarray:
    """Seeded choice of control wells to keep. wells: one row per well with `plate`, `control_type`, `is_control`.
    Per (plate, control type) keeps round(fraction x n) wells, at least one when the fraction is > 0.
    Returns a boolean (n_wells,) mask (True for every non-control well)."""
    keep = ~wells["is_control"].to_numpy(bool)
    rng = np.random.default_rng([config.seed, 1])
    frac = {"positive": config.keep_positive_controls, "negative": config.keep_negative_controls}
    ctrl = wells[~keep]
    for (_plate, ctype), grp in ctrl.groupby(["plate", "control_type"], sort=True):
        f = frac.get(ctype, 1.0)
        n = len(grp)
        k = 0 if f == 0 else max(1, int(np.floor(f * n + 0.5)))
        chosen = rng.choice(grp.index.to_numpy(), size=min(k, n), replace=False)
        keep[chosen] = True
    return keep


def consistency_tests(
    wells: pd.DataFrame, embeddings: np.ndarray, candidates: np.ndarray, config: CurationConfig
) -> pd.DataFrame:
    """Permutation tests of replicate consistency for one embedding set.

    wells: one row per well (the tested wells and the null pool) with `experiment`, `plate`, `perturbation`,
    `control_type`; embeddings: (n_wells, D) aligned with `wells`; candidates: the perturbations to test.
    Embeddings are center-scaled per batch on all its wells (`config.normalize`); the wells of an experiment are
    whitened on the negative controls of the other experiments (`config.whiten`) and their null sets are drawn
    from its negative-control wells (`config.null_pool`); see the module docstring for why.
    Returns one row per (perturbation, experiment) with columns perturbation, experiment, n_wells, mean_cosine,
    p (NaN with fewer than 2 wells), null_pool ('controls' or 'all': the wells the null was drawn from).
    """
    x = np.asarray(embeddings, np.float32)
    if config.normalize != "none":
        keys = wells["experiment"].astype(str)
        if config.normalize == "plate":
            keys = keys + "\x1f" + wells["plate"].astype(str)
        x = cs.center_scale(x, pd.factorize(keys)[0])
    neg = (wells["control_type"] == "negative").to_numpy() if "control_type" in wells else np.zeros(len(x), bool)
    ctrl_moments = cs.moments(x[neg]) if config.whiten == "controls" else None
    cand = pd.Index(pd.unique(np.asarray(candidates, dtype=object)))
    code = cand.get_indexer(wells["perturbation"].to_numpy(dtype=object))
    exps = wells["experiment"].to_numpy(dtype=object)
    rows = []
    for e_i, exp in enumerate(sorted(pd.unique(exps), key=str)):
        in_exp = exps == exp
        sel = np.flatnonzero(in_exp)
        groups = code[sel]
        present = np.unique(groups[groups >= 0])
        if len(present) == 0:
            continue
        remap = np.full(len(cand), -1)
        remap[present] = np.arange(len(present))
        g = np.where(groups >= 0, remap[np.maximum(groups, 0)], -1)
        xe = x[sel]
        if config.whiten == "controls":
            # the negative controls of the other experiments: the tested wells and the null pool are both outside
            # the fit (their moments are subtracted from those of all controls)
            n_all, sum_all, outer_all = ctrl_moments
            n_e, sum_e, outer_e = cs.moments(xe[neg[sel]])
            if n_all - n_e >= 2:
                cov = cs.covariance(n_all - n_e, sum_all - sum_e, outer_all - outer_e)
            elif n_all >= 2:  # one experiment: its own controls
                cov = cs.covariance(n_all, sum_all, outer_all)
            else:  # fewer than 2 controls: all wells
                cov = np.cov(x.astype(np.float64), rowvar=False)
            xe = cs.whiten(xe, None, config.whiten_shrinkage, cov=cov)
        largest = int(np.bincount(g[g >= 0]).max())
        pool = neg[sel]
        use_controls = config.null_pool == "controls" and pool.sum() >= max(_MIN_NULL_WELLS, 2 * largest)
        rng = np.random.default_rng([config.seed, 2, e_i])  # the same null draws for every set
        p, stat, size = cs.permutation_pvalues(
            cs.unit_rows(xe), g, len(present), config.n_permutations, rng, pool if use_controls else None
        )
        rows.append(
            pd.DataFrame(
                {
                    "perturbation": cand[present],
                    "experiment": exp,
                    "n_wells": size,
                    "mean_cosine": stat,
                    "p": p,
                    "null_pool": "controls" if use_controls else "all",
                }
            )
        )
    if not rows:
        return pd.DataFrame(columns=_TEST_COLUMNS)
    return pd.concat(rows, ignore_index=True)


def combine_experiments(tests: pd.DataFrame) -> pd.Series:
    """Cauchy-combined p per perturbation over its experiments (equal weights; NaN tests ignored)."""
    if tests.empty:
        return pd.Series(dtype=float)
    mat = tests.pivot_table(index="perturbation", columns="experiment", values="p", aggfunc="first", dropna=False)
    return pd.Series(cs.cauchy_combination(mat.to_numpy(dtype=float), axis=1), index=mat.index, name="p")


# ---------------------------------------------------------------------------------------------- pipeline


def check_metadata(metadata: pd.DataFrame, source: str = "metadata") -> None:
    """Raise DataError unless the curation columns exist and image ids are unique."""
    missing = [c for c in REQUIRED if c not in metadata.columns]
    if missing:
        raise DataError(f"{source}: missing column(s) {', '.join(missing)} (expected {', '.join(REQUIRED)})")
    dup = metadata["image_id"].duplicated()
    if dup.any():
        raise DataError(f"{source}: duplicate image_id {metadata['image_id'][dup].iloc[0]!r} (expected unique ids)")


def curate(
    metadata: pd.DataFrame,
    embeddings: Mapping[str, np.ndarray] | None = None,
    config: CurationConfig = CurationConfig(),
    quality: pd.DataFrame | None = None,
) -> CurationResult:
    """Run the curation steps on a screen's metadata (one row per image).

    embeddings: name -> (N, D) array aligned with the metadata rows (at least one for the consistency step;
    none skips it). quality: per-image `contrast`, `saturation`, `focus` aligned with the rows (None skips the
    image-quality step). Returns a `CurationResult`; nothing is written.
    """
    check_metadata(metadata)
    meta = metadata.reset_index(drop=True).copy()
    n = len(meta)
    embeddings = dict(embeddings or {})
    for name, e in embeddings.items():
        if np.ndim(e) != 2 or len(e) != n:
            raise DataError(
                f"embedding set '{name}': expected shape ({n}, D) aligned with the images, got {np.shape(e)}"
            )
        if not np.isfinite(np.asarray(e)).all():
            raise DataError(f"embedding set '{name}': contains NaN or infinite values")
    meta["_well"] = (
        meta["experiment"].astype(str) + "\x1f" + meta["plate"].astype(str) + "\x1f" + meta["well_id"].astype(str)
    )
    steps = [{"step": "input", **_counts(meta, np.ones(n, bool))}]

    # 1. missing metadata
    miss = np.zeros(n, bool)
    for c in _MUST_BE_PRESENT:
        miss |= _missing(meta[c])
    ctrl = meta["is_control"].fillna(False).astype(bool).to_numpy()
    miss |= ctrl & ~meta["control_type"].isin(["positive", "negative"]).to_numpy()
    keep = ~miss
    meta["is_control"] = ctrl
    steps.append({"step": "missing_metadata", "removed_images": int(miss.sum()), **_counts(meta, keep)})

    # 2. image quality
    flags = None
    if quality is not None:
        flags = quality_flags(meta, quality, config)
        removed = {k: int((flags[k].to_numpy() & keep).sum()) for k in flags.columns}
        bad = flags.to_numpy().any(axis=1) & keep
        keep &= ~bad
        steps.append(
            {
                "step": "image_quality",
                "removed_images": int(bad.sum()),
                "removed_by_reason": removed,
                **_counts(meta, keep),
            }
        )
    else:
        steps.append(
            {
                "step": "image_quality",
                "skipped": "no image quality measures",
                "removed_images": 0,
                **_counts(meta, keep),
            }
        )
    pool_keep = keep.copy()  # the consistency null draws from every well that passed steps 1-2

    # 3. minimum replicates (non-control perturbations)
    m = meta[keep & ~ctrl]
    per = m.groupby("perturbation").agg(n_wells=("_well", "nunique"), n_experiments=("experiment", "nunique"))
    enough = per.index[(per["n_wells"] >= config.min_wells) & (per["n_experiments"] >= config.min_experiments)]
    drop3 = keep & ~ctrl & ~meta["perturbation"].isin(enough).to_numpy()
    keep &= ~drop3
    steps.append(
        {
            "step": "min_replicates",
            "removed_images": int(drop3.sum()),
            "removed_perturbations": int(len(per) - len(enough)),
            **_counts(meta, keep),
        }
    )

    # 4. control undersampling (per well)
    wells_all = meta[keep].drop_duplicates("_well")[["_well", "plate", "control_type", "is_control"]]
    wells_all = wells_all.reset_index(drop=True)
    kept_wells = set(wells_all["_well"][undersample_controls(wells_all, config)])
    drop4 = keep & ~meta["_well"].isin(kept_wells).to_numpy()
    keep &= ~drop4
    steps.append({"step": "control_undersampling", "removed_images": int(drop4.sum()), **_counts(meta, keep)})

    # 5. replicate consistency
    per["dropped_at"] = np.where(per.index.isin(enough), "", "min_replicates")
    per["kept"] = per.index.isin(enough)
    tests = []
    if embeddings and len(enough):
        pool = meta[pool_keep]
        well_codes, well_keys = pd.factorize(pool["_well"])
        wells = pool.drop_duplicates("_well").set_index("_well").loc[well_keys].reset_index()
        for name, e in embeddings.items():
            x = cs.well_means(np.asarray(e)[pool_keep], well_codes, len(well_keys))
            t = consistency_tests(wells, x, enough.to_numpy(), config)
            t.insert(0, "embedding", name)
            tests.append(t)
            per[f"p_{name}"] = combine_experiments(t).reindex(per.index)
        consistent = (per[[f"p_{name}" for name in embeddings]] < config.alpha).any(axis=1).to_numpy()
        per.loc[per["kept"].to_numpy() & ~consistent, "dropped_at"] = "consistency"
        per["kept"] &= consistent
        drop5 = keep & ~ctrl & ~meta["perturbation"].isin(per.index[per["kept"]]).to_numpy()
        keep &= ~drop5
        pools = tests[0].drop_duplicates("experiment")["null_pool"]  # the same for every set
        steps.append(
            {
                "step": "consistency",
                "embedding_sets": list(embeddings),
                "alpha": config.alpha,
                "n_permutations": config.n_permutations,
                "null_pool": config.null_pool,
                "experiments_null_from_all_wells": int((pools == "all").sum()),
                "removed_images": int(drop5.sum()),
                "removed_perturbations": int((per["dropped_at"] == "consistency").sum()),
                "kept_by_set": {nm: int((per[f"p_{nm}"] < config.alpha).sum()) for nm in embeddings},
                **_counts(meta, keep),
            }
        )
    else:
        steps.append(
            {
                "step": "consistency",
                "skipped": "no embedding sets" if not embeddings else "nothing to test",
                "removed_images": 0,
                **_counts(meta, keep),
            }
        )

    index = meta.loc[keep, list(metadata.columns)].reset_index(drop=True)
    index = index[["image_id"] + [c for c in index.columns if c != "image_id"]]
    report = {"config": dataclasses.asdict(config), "steps": steps}
    tests_df = pd.concat(tests, ignore_index=True) if tests else pd.DataFrame(columns=["embedding", *_TEST_COLUMNS])
    return CurationResult(
        index=index, report=report, perturbations=per.reset_index(), tests=tests_df, quality_flags=flags
    )


def _align(df: pd.DataFrame, vals: np.ndarray, metadata: pd.DataFrame, source: str) -> np.ndarray:
    """Rows of vals (keyed by df's image_id, or by plate + well_id for well-level tables) for each image."""
    if "image_id" in df.columns:
        keys, want = df["image_id"].astype(str), metadata["image_id"].astype(str)
    elif {"plate", "well_id"} <= set(df.columns):
        keys = df["plate"].astype(str) + "\x1f" + df["well_id"].astype(str)
        want = metadata["plate"].astype(str) + "\x1f" + metadata["well_id"].astype(str)
    else:
        raise DataError(f"{source}: expected an 'image_id' column (or 'plate' and 'well_id') to align embeddings")
    rows = pd.Index(keys).get_indexer(want)
    if (rows < 0).any():
        bad = metadata["image_id"].iloc[int(np.flatnonzero(rows < 0)[0])]
        raise DataError(f"{source}: no embedding for image_id {bad!r} ({int((rows < 0).sum())} images missing)")
    return vals[rows]


def load_embeddings(path: str | os.PathLike, metadata: pd.DataFrame) -> np.ndarray:
    """An embedding set aligned with the metadata rows -> (N, D) float32.

    Formats: `.npy` (N, D) in row order; `.npz` (array `embeddings`, or its only array); `.parquet` with
    `feature_*` columns (or other numeric non-metadata columns, or one list-valued column) keyed by `image_id`
    or, for well-level tables, by `plate` + `well_id`; an embedding store folder (`vitally_jax.embedding.screen`:
    its last block, `mean` pooling when stored).
    """
    path = os.fspath(path)
    n = len(metadata)
    try:
        if os.path.isdir(path):
            from vitally_jax.embedding.screen import EmbeddingStore

            es = EmbeddingStore.open(path)
            pooling = "mean" if "mean" in es.poolings else es.poolings[0]
            x = _align(es.metadata, es.features(pooling, [max(es.blocks)])[0], metadata, path)
        elif path.endswith(".npy"):
            x = np.load(path)
        elif path.endswith(".npz"):
            with np.load(path) as z:
                keys = list(z.keys())
                if "embeddings" not in keys and len(keys) != 1:
                    raise DataError(f"{path}: expected an array named 'embeddings' (found {', '.join(keys)})")
                x = z["embeddings" if "embeddings" in keys else keys[0]]
        elif path.endswith(".parquet"):
            df = pd.read_parquet(path)
            feats = [c for c in df.columns if str(c).startswith("feature_")] or [
                c
                for c in df.columns
                if c not in _STORE_COLUMNS
                and pd.api.types.is_numeric_dtype(df[c])
                and not pd.api.types.is_bool_dtype(df[c])
            ]
            lists = [
                c
                for c in df.columns
                if df[c].dtype == object and len(df) and isinstance(df[c].iloc[0], (list, np.ndarray))
            ]
            if feats:
                vals = df[feats].to_numpy(np.float32)
            elif len(lists) == 1:
                vals = np.stack(df[lists[0]].to_numpy()).astype(np.float32)
            else:
                raise DataError(f"{path}: expected feature_* columns or one list-valued embedding column")
            x = _align(df, vals, metadata, path)
        else:
            raise DataError(
                f"{path}: unknown embedding file type (expected .npy, .npz, .parquet or an embedding store folder)"
            )
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable embeddings ({e})") from None
    if x.ndim != 2 or len(x) != n:
        raise DataError(f"{path}: embeddings of shape {x.shape}, expected ({n}, D) for the store's {n} images")
    return np.asarray(x, np.float32)


def curate_store(
    store,
    embeddings: Mapping[str, np.ndarray | str | os.PathLike] | None = None,
    config: CurationConfig = CurationConfig(),
    *,
    quality: bool = True,
    batch_size: int = 32,
) -> CurationResult:
    """`curate` an image store (an `ImageStore` or its folder). Embedding sets may be arrays aligned with the
    store's rows or files for `load_embeddings`. With `quality`, image quality is measured on the store's
    images, `batch_size` at a time."""
    from vitally_jax.data.store import ImageStore

    if not hasattr(store, "metadata"):
        store = ImageStore.open(store)
    meta = store.metadata
    sets = {
        k: (load_embeddings(v, meta) if isinstance(v, (str, os.PathLike)) else v) for k, v in (embeddings or {}).items()
    }
    q = cs.store_quality(store, batch_size) if quality else None
    return curate(meta, sets, config, quality=q)


# ------------------------------------------------------------------------------------------------ output


def report_markdown(report: dict) -> str:
    """The report as a Markdown table of counts after each step."""
    cols = ["images", "wells", "perturbations", "control_wells", "experiments", "plates", "removed_images"]
    lines = [
        "# Curation report",
        "",
        "| step | " + " | ".join(cols) + " | notes |",
        "|---|" + "---:|" * len(cols) + "---|",
    ]
    for s in report["steps"]:
        notes = []
        if "skipped" in s:
            notes.append(f"skipped: {s['skipped']}")
        if "removed_by_reason" in s:
            notes.append(", ".join(f"{k} {v}" for k, v in s["removed_by_reason"].items()))
        if "kept_by_set" in s:
            notes.append("kept by " + ", ".join(f"{k} {v}" for k, v in s["kept_by_set"].items()))
        if "removed_perturbations" in s:
            notes.append(f"{s['removed_perturbations']} perturbations removed")
        if s.get("null_pool") == "controls" and s.get("experiments_null_from_all_wells"):
            notes.append(
                f"null from all wells in {s['experiments_null_from_all_wells']} experiment(s) "
                "(too few negative controls)"
            )
        lines.append(f"| {s['step']} | " + " | ".join(str(s.get(c, "")) for c in cols) + f" | {'; '.join(notes)} |")
    cfg = report["config"]
    lines += ["", "Settings: " + ", ".join(f"{k}={v}" for k, v in cfg.items()), ""]
    return "\n".join(lines)


INDEX_KIND = "curation index"
REPORT_KIND = "curation report"
PERTURBATIONS_KIND = "curation perturbation table"


def curation_outputs(index_path: str | os.PathLike, report_path: str | os.PathLike | None = None) -> dict:
    """{path: kind} of the four files `write_curation` writes for this index path / report prefix."""
    index_path = os.fspath(index_path)
    base = os.fspath(report_path) if report_path else os.path.splitext(index_path)[0] + ".report"
    return {
        index_path: INDEX_KIND,
        base + ".perturbations.parquet": PERTURBATIONS_KIND,
        base + ".json": REPORT_KIND,
        base + ".md": REPORT_KIND,
    }


def check_curation_outputs(
    index_path: str | os.PathLike, report_path: str | os.PathLike | None = None, *, overwrite: bool = False, inputs=()
) -> None:
    """Refuse outputs that are not ours to write (see `vitally_jax.fileio.check_output`), before any work."""
    for path, kind in curation_outputs(index_path, report_path).items():
        check_output(path, kind, overwrite=overwrite, inputs=inputs)


def write_curation(
    result: CurationResult,
    index_path: str | os.PathLike,
    report_path: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
    inputs=(),
) -> None:
    """Write the curated index (Parquet, atomically), `<report>.json` / `<report>.md`, and the per-perturbation
    table `<report>.perturbations.parquet`. report_path defaults to the index path without its suffix.

    Existing files are replaced only with `overwrite=True` and only if they are curation outputs themselves.
    """
    check_curation_outputs(index_path, report_path, overwrite=overwrite, inputs=inputs)
    paths = list(curation_outputs(index_path, report_path))
    write_parquet(paths[0], result.index, INDEX_KIND)
    write_parquet(paths[1], result.perturbations, PERTURBATIONS_KIND)
    write_text(paths[2], json.dumps({ARTEFACT_KEY: REPORT_KIND, **result.report}, indent=2, default=str) + "\n")
    write_text(paths[3], text_tag(REPORT_KIND) + report_markdown(result.report))
