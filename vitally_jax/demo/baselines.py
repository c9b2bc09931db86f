"""Demo stage `baselines`: the non-learned representations and the ceilings every report is measured against.

- crop statistics: simple statistics of the exact self-standardised crops the ViT sees (same tiling, same
  standardisation), averaged over an image's tiles: per channel the quantiles, the fraction above 1 SD, gradient,
  Laplacian and coarse-texture energy, and the correlation of every pair of channels (colocalisation survives a
  per-channel standardisation, intensity does not);
- CellProfiler measurements: nuclei and cells segmented with scikit-image, measured with `cp_measure`
  (`vitally_jax.features.cellprofiler`), the median over the cells of an image;
- the oracle: the world's true per-image process activations (`truth.parquet` of the synthetic screen), and the
  visible oracle: the same without the processes that a self-standardised crop cannot see, found by
  `process_sensitivity`.
"""

from __future__ import annotations

import pathlib
import time

import numpy as np
import pandas as pd

from vitally_jax.demo.stages import _csv, log
from vitally_jax.errors import DataError
from vitally_jax.fileio import write_npy, write_parquet, write_text

CROP_FEATURES = ("q10", "q50", "q90", "q99", "above_1sd", "gradient", "laplacian", "coarse_texture")


# ------------------------------------------------------------------------------------------ crop statistics
def standardized_tiles(images: np.ndarray, crop: int) -> np.ndarray:
    """uint8 (B, H, W, C) -> float32 (B, T, crop, crop, C): non-overlapping tiles (remainder dropped), each
    self-standardised per channel exactly as the model's input pipeline does."""
    from vitally_jax.data.pipeline import self_standardize_np

    b, h, w, c = images.shape
    ty, tx = h // crop, w // crop
    if ty == 0 or tx == 0:
        raise DataError(f"crop statistics: crop {crop} larger than the {h}x{w} images")
    t = images[:, : ty * crop, : tx * crop].reshape(b, ty, crop, tx, crop, c).transpose(0, 1, 3, 2, 4, 5)
    return self_standardize_np(t.reshape(b, ty * tx, crop, crop, c))


def crop_statistics(images: np.ndarray, crop: int) -> np.ndarray:
    """uint8 (B, H, W, C) -> float32 (B, 8 C + C (C - 1) / 2): statistics of the self-standardised tiles (see the
    module docstring), averaged over the tiles of each image. Columns: `crop_feature_names`.

    Self-standardisation is an increasing affine map per tile and channel, z = (x / 255 - m) / s with
    s = sqrt(var + 1e-5) (`self_standardize_np`), so the statistics are computed exactly on the uint8 tiles
    (quantiles and the share above z = 1 from 256-bin histograms, differences in int16) and mapped through it."""
    from vitally_jax.data.pipeline import EPS

    images = np.asarray(images)
    b, h, w, c = images.shape
    ty, tx = h // crop, w // crop
    if ty == 0 or tx == 0:
        raise DataError(f"crop statistics: crop {crop} larger than the {h}x{w} images")
    t = images[:, : ty * crop, : tx * crop].reshape(b, ty, crop, tx, crop, c).transpose(0, 1, 3, 2, 4, 5)
    t = t.reshape(b * ty * tx, crop, crop, c)
    n, npx = len(t), crop * crop
    key = (np.arange(n, dtype=np.int64)[:, None, None, None] * c + np.arange(c)) * 256 + t
    hist = np.bincount(key.ravel(), minlength=n * c * 256).reshape(n, c, 256).astype(np.float64)
    v = np.arange(256, dtype=np.float64) / 255.0
    mean = hist @ v / npx
    var = np.maximum(hist @ (v * v) / npx - mean**2, 0.0)
    sd = np.sqrt(var + EPS)  # (n, c)
    cdf = np.cumsum(hist, axis=-1)
    q = [(np.argmax(cdf >= qq * npx, axis=-1) / 255.0 - mean) / sd for qq in (0.1, 0.5, 0.9, 0.99)]
    above = (hist * (v > mean[..., None] + sd[..., None])).sum(-1) / npx
    scale = 1.0 / (255.0 * sd)
    xi = t.astype(np.int16)
    grad = (np.abs(np.diff(xi, axis=1)).mean((1, 2)) + np.abs(np.diff(xi, axis=2)).mean((1, 2))) * scale
    lap = np.abs(4 * xi[:, 1:-1, 1:-1] - xi[:, :-2, 1:-1] - xi[:, 2:, 1:-1] - xi[:, 1:-1, :-2] - xi[:, 1:-1, 2:])
    lap = lap.mean((1, 2)) * scale
    h4 = crop // 4 * 4
    coarse = xi[:, :h4, :h4].reshape(n, h4 // 4, 4, h4 // 4, 4, c).mean((2, 4)).std((1, 2)) * scale
    z = (t.reshape(n, npx, c).astype(np.float32) / 255.0 - mean[:, None].astype(np.float32)) / sd[:, None].astype(
        np.float32
    )
    corr = np.matmul(z.transpose(0, 2, 1), z) / npx  # (n, c, c): standardised, so the correlation matrix
    iu = np.triu_indices(c, 1)
    per_channel = np.stack([*q, above, grad, lap, coarse], axis=-1).reshape(n, -1)  # (n, c * 8)
    feats = np.concatenate([per_channel, corr[:, iu[0], iu[1]]], axis=-1)
    return feats.reshape(b, ty * tx, -1).mean(axis=1).astype(np.float32)


def crop_feature_names(channel_names) -> list[str]:
    """Column names of `crop_statistics`."""
    ch = list(channel_names)
    pairs = [f"corr_{ch[i]}_{ch[j]}" for i, j in zip(*np.triu_indices(len(ch), 1))]
    return [f"{c}_{f}" for c in ch for f in CROP_FEATURES] + pairs


def store_crop_statistics(store, crop: int, batch_size: int = 128) -> np.ndarray:
    """`crop_statistics` of every image of a store, in store order."""
    n = len(store)
    return np.concatenate(
        [crop_statistics(store.read_many(i, min(i + batch_size, n)), crop) for i in range(0, n, batch_size)]
    )


# ------------------------------------------------------------------------------------------------ CellProfiler
def segment_image(image: np.ndarray, names: list[str], dna: str, cyto: str, *, max_cells: int = 0, seed: int = 0):
    """Nuclei and cell labels of one uint8 image (H, W, C); with `max_cells` > 0 only a seeded random subset of
    that many cells (and their nuclei) is kept, to bound the cost of measuring them."""
    from vitally_jax.features.cellprofiler import segment_cells, segment_nuclei

    nuclei = segment_nuclei(image[..., names.index(dna)])
    cells = segment_cells(nuclei, image[..., names.index(cyto)])
    ids = np.unique(cells[cells > 0])
    if max_cells and len(ids) > max_cells:
        keep = np.random.default_rng(seed).choice(ids, max_cells, replace=False)
        cells = np.where(np.isin(cells, keep), cells, 0)
        nuclei = np.where(np.isin(nuclei, keep), nuclei, 0)
    return nuclei, cells


def cellprofiler_features(
    image: np.ndarray,
    channel_names,
    dna: str,
    cyto: str,
    *,
    features=("sizeshape", "intensity"),
    max_cells: int = 0,
    seed: int = 0,
) -> pd.Series:
    """One uint8 image (H, W, C) -> the median over its cells of the CellProfiler measurements of the cells
    (`Cells_*`: shape, intensity in every channel) and of their nuclei (`Nuclei_*`: shape, intensity in the DNA
    channel). An image without cells gives an empty series (filled by the caller)."""
    from vitally_jax.features.cellprofiler import measure_objects

    names = list(channel_names)
    nuclei, cells = segment_image(image, names, dna, cyto, max_cells=max_cells, seed=seed)
    parts = []
    for prefix, labels, channels in (("Cells", cells, names), ("Nuclei", nuclei, [dna])):
        if not (labels > 0).any():
            continue
        t = measure_objects(image, labels, names, features=tuple(features), channels=channels)
        t = t.select_dtypes("number")
        t = t.drop(columns=[k for k in t.columns if k == "ObjectNumber" or "Center" in k or k.startswith("Location")])
        parts.append(t.median(axis=0).add_prefix(prefix + "_"))
    out = pd.concat(parts) if parts else pd.Series(dtype=np.float64)
    return out.replace([np.inf, -np.inf], np.nan)


def _cellprofiler_rows(store_path: str, start: int, stop: int, dna: str, cyto: str, kw: dict) -> list[pd.Series]:
    from vitally_jax.data.store import ImageStore

    store = ImageStore.open(store_path)
    return [
        cellprofiler_features(store.read(i), store.channel_names, dna, cyto, seed=i, **kw) for i in range(start, stop)
    ]


def store_cellprofiler(store, dna: str, cyto: str, *, workers: int = 1, **kw) -> tuple[np.ndarray, list[str]]:
    """CellProfiler features (N, F) of every image of a store (median over cells), and the feature names;
    measurements missing for an image (no cells) are set to the median of the other images. `workers` > 1
    measures chunks of images in that many processes (spawned: they share nothing but the store path)."""
    n = len(store)
    path = str(store.path)
    if workers > 1 and n > 1:
        import concurrent.futures as cf
        import multiprocessing as mp

        step = -(-n // (4 * workers))
        chunks = [(i, min(i + step, n)) for i in range(0, n, step)]
        with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
            parts = list(ex.map(_cellprofiler_rows, *zip(*[(path, a, b, dna, cyto, kw) for a, b in chunks])))
        rows = [r for part in parts for r in part]
    else:
        rows = _cellprofiler_rows(path, 0, n, dna, cyto, kw)
    df = pd.DataFrame(rows).reset_index(drop=True)
    df = df.fillna(df.median(axis=0)).fillna(0.0)
    keep = df.columns[df.std(axis=0).to_numpy() > 0]  # constant measurements carry nothing
    return df[keep].to_numpy(np.float32), [str(k) for k in keep]


# ---------------------------------------------------------------------------------------------- the ceilings
def read_truth(store_path: str, meta: pd.DataFrame) -> pd.DataFrame | None:
    """truth.parquet of a synthetic store aligned with the metadata rows (None where the store has none)."""
    p = pathlib.Path(store_path) / "truth.parquet"
    if not p.is_file():
        return None
    t = pd.read_parquet(p)
    if "image_id" not in t.columns:
        raise DataError(f"{p}: no image_id column (expected one row per image)")
    t = t.set_index("image_id")
    missing = set(meta["image_id"]) - set(t.index)
    if missing:
        raise DataError(f"{p}: {len(missing)} images of the store have no truth row (e.g. {sorted(missing)[0]!r})")
    return t.loc[meta["image_id"].to_numpy()].reset_index()


def process_sensitivity(
    world_cfg, processes, *, crop: int, z: float = 1.5, gain: float = 1.4, n: int = 8, seed: int = 0
) -> pd.DataFrame:
    """How much each process changes the model's input, against a x`gain` gain change.

    Images of a control background (`render_probe`, the same cells for every call) at z = 0 and at z = +`z` on one
    process; both are tiled and self-standardised as the model's input. The change of a channel is
    ||S(process) - S(control)|| / ||S(control)|| over the tiles; a process's change is the largest over channels,
    before (raw, on x/255) and after standardisation. The reference is the same measure for a x`gain` change of
    every channel's gain. A process is `visible` to a self-standardised crop when its standardised change exceeds
    the reference's."""
    from vitally_jax.data.synthetic import render_probe

    p = len(processes)

    def change(a, b, standardized):
        if standardized:
            a, b = standardized_tiles(a, crop), standardized_tiles(b, crop)
            axes = (0, 1, 2, 3)
        else:
            a, b = a.astype(np.float64) / 255.0, b.astype(np.float64) / 255.0
            axes = (0, 1, 2)
        num = np.sqrt(np.square(a.astype(np.float64) - b).sum(axis=axes))
        den = np.sqrt(np.square(b.astype(np.float64)).sum(axis=axes))
        return float((num / np.maximum(den, 1e-12)).max())

    base = render_probe(world_cfg, np.zeros(p), n=n, seed=seed)
    g = render_probe(world_cfg, np.zeros(p), gain=gain, n=n, seed=seed)
    ref_raw, ref_std = change(g, base, False), change(g, base, True)
    rows = []
    for k, name in enumerate(processes):
        v = np.zeros(p)
        v[k] = z
        img = render_probe(world_cfg, v, n=n, seed=seed)
        raw, std = change(img, base, False), change(img, base, True)
        rows.append(
            {
                "process": name,
                "change raw": raw,
                "change standardised": std,
                f"x{gain:g} gain, standardised": ref_std,
                "ratio to gain change": std / max(ref_std, 1e-12),
                "visible": bool(std > ref_std),
            }
        )
    out = pd.DataFrame(rows)
    out.attrs["gain_change_raw"] = ref_raw
    return out


# ----------------------------------------------------------------------------------------------------- stage
def stage_baselines(config, workdir: pathlib.Path, store_path: str, curate_outputs: dict, world_cfg=None) -> dict:
    """Crop statistics (from the curate stage), CellProfiler features, the oracle and the visible oracle (per
    image, aligned with the store's rows; wells are formed later, as for every representation). `world_cfg`: the
    SyntheticConfig of a generated screen (None for a given store: no ceilings)."""
    from vitally_jax.data.store import ImageStore

    store = ImageStore.open(store_path)
    meta = store.metadata
    out_dir = workdir / "features"
    out: dict = {}
    crop = int(config.embed.crop)
    out["crop_stats"] = curate_outputs["crop_stats"]  # computed by the curate stage (one of its embedding sets)
    bc = config.baselines
    if bc.cellprofiler:
        t0 = time.perf_counter()
        cp, names = store_cellprofiler(
            store,
            bc.dna_channel,
            bc.cyto_channel,
            features=tuple(_csv(bc.cp_features)),
            max_cells=int(bc.cp_max_cells),
            workers=int(bc.cp_workers),
        )
        write_npy(out_dir / "cellprofiler.npy", cp)
        write_text(out_dir / "cellprofiler_features.txt", "\n".join(names) + "\n")
        out["cellprofiler"] = str(out_dir / "cellprofiler.npy")
        log(f"CellProfiler measurements: {cp.shape[1]} features per image in {time.perf_counter() - t0:.1f} s")
    truth = read_truth(store_path, meta) if world_cfg is not None else None  # the ceilings need the world
    if truth is not None:
        from vitally_jax.data.synthetic import PROCESSES

        cols = [f"proc_{p}" for p in PROCESSES]
        oracle = truth[cols].to_numpy(np.float32)
        write_npy(out_dir / "oracle.npy", oracle)
        write_parquet(out_dir / "artefacts.parquet", truth[["image_id", "artefact"]])
        out.update(
            oracle=str(out_dir / "oracle.npy"), processes=list(PROCESSES), artefacts=str(out_dir / "artefacts.parquet")
        )
        sens = process_sensitivity(world_cfg, PROCESSES, crop=crop, seed=int(config.seed))
        write_parquet(out_dir / "sensitivity.parquet", sens)
        visible = [p for p, v in zip(PROCESSES, sens["visible"]) if v]
        write_npy(out_dir / "oracle_visible.npy", oracle[:, [PROCESSES.index(p) for p in visible]])
        out.update(
            oracle_visible=str(out_dir / "oracle_visible.npy"),
            visible=visible,
            sensitivity=str(out_dir / "sensitivity.parquet"),
        )
        log(f"sensitivity: {len(visible)} of {len(PROCESSES)} processes visible to a self-standardised crop")
    return out
