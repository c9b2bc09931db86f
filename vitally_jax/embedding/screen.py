"""Whole-screen embedding: every image tiled into crops, every block embedded, one resumable store on disk.

Each image is cut into non-overlapping `crop` x `crop` tiles (row-major; a remainder narrower than a crop at the
right/bottom edge is not used), every tile is embedded by the jitted every-block pass
(`vitally_jax.embedding.blocks`), and the tile embeddings are averaged per image. Sites of one well are averaged
later (`well_features`).

Embedding store layout (a folder):

- `embedding.json`: format version, blocks (1-based), poolings, width, number of images, images per chunk, crop,
  dtype, the encoder config and the source image store.
- `<pooling>.zarr`: zarr v3 array (blocks, images, width), float32 or float16, one zarr chunk per image chunk.
- `metadata.parquet`: a copy of the image store's metadata table (row i = image i).
- `done/chunk_<k>`: written (atomically) after chunk k's rows of every pooling array are written.

Resuming: a rerun with the same settings skips chunks that are marked done and computes only the rest; results
are identical to an uninterrupted run because each chunk is always embedded in the same batches. Several processes
can share one run: process `pid` of `nproc` takes chunks k with k % nproc == pid. These are independent workers
(each with its own devices, e.g. one per host or per GPU); a mesh passed in is used by that worker alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import time
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from vitally_jax.embedding.blocks import DEFAULT_POOLING
from vitally_jax.errors import ConfigError, DataError, OutputError
from vitally_jax.fileio import ARTEFACT_KEY, atomic_path, check_output, folder_kind, swap_in, write_parquet, write_text

FORMAT_VERSION = 1
KIND = "embedding store"  # the artefact kind named in embedding.json (see vitally_jax.fileio)
MANIFEST = "embedding.json"
METADATA = "metadata.parquet"
DONE = "done"
WELL_KEYS = ("plate", "well_id")


def _zarr_spec(path: pathlib.Path, shape: Sequence[int], chunk_images: int, dtype: str) -> dict:
    nb, n, d = shape
    return {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": str(path)},
        "metadata": {
            "shape": [nb, n, d],
            "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [nb, chunk_images, d]}},
            "chunk_key_encoding": {"name": "default"},
            "dimension_names": ["block", "image", "feature"],
            "codecs": [
                {"name": "bytes", "configuration": {"endian": "little"}},
                {"name": "zstd", "configuration": {"level": 3}},
            ],
            "fill_value": 0,
        },
    }


def _open_array(path: pathlib.Path, *, create: bool = False, shape=None, chunk_images=None, dtype=None):
    import tensorstore as ts

    if create:
        spec = _zarr_spec(path, shape, chunk_images, dtype)
        return ts.open(spec, create=True, open=True).result()
    try:
        return ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}, read=True).result()
    except ValueError as e:
        raise DataError(f"{path}: cannot open embedding array ({e})") from None


@dataclasses.dataclass
class EmbeddingStore:
    """Read access to an embedding store folder (see the module docstring)."""

    path: pathlib.Path
    manifest: dict
    metadata: pd.DataFrame

    @classmethod
    def open(cls, path: str | os.PathLike) -> EmbeddingStore:
        path = pathlib.Path(path)
        if not (path / MANIFEST).is_file():
            raise DataError(f"{path}: not an embedding store ({MANIFEST} is missing)")
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            manifest["blocks"], manifest["poolings"], manifest["num_images"]
        except (ValueError, KeyError) as e:
            raise DataError(f"{path / MANIFEST}: unreadable embedding description ({e})") from None
        if not (path / METADATA).is_file():
            raise DataError(f"{path}: {METADATA} is missing")
        return cls(path, manifest, pd.read_parquet(path / METADATA))

    @property
    def blocks(self) -> list[int]:
        return list(self.manifest["blocks"])

    @property
    def poolings(self) -> list[str]:
        return list(self.manifest["poolings"])

    @property
    def num_chunks(self) -> int:
        return -(-self.manifest["num_images"] // self.manifest["chunk_images"])

    def done_chunks(self) -> set[int]:
        d = self.path / DONE
        return {int(p.name.split("_")[1]) for p in d.glob("chunk_*")} if d.is_dir() else set()

    def missing_chunks(self) -> list[int]:
        done = self.done_chunks()
        return [k for k in range(self.num_chunks) if k not in done]

    def _check(self, pooling: str) -> None:
        if pooling not in self.poolings:
            raise ConfigError(f"pooling: {pooling!r} is not in the embedding store {self.path} ({self.poolings})")
        missing = self.missing_chunks()
        if missing:
            raise DataError(
                f"{self.path}: embedding run incomplete, {len(missing)} of {self.num_chunks} chunks missing "
                "(rerun the embedding to finish it)"
            )

    def features(self, pooling: str, blocks: Iterable[int] | None = None) -> np.ndarray:
        """Per-image embeddings (len(blocks), images, width) float32; default all stored blocks."""
        self._check(pooling)
        arr = _open_array(self.path / f"{pooling}.zarr")
        if blocks is None:
            return np.asarray(arr.read().result(), np.float32)
        index = {b: i for i, b in enumerate(self.blocks)}
        bad = [b for b in blocks if b not in index]
        if bad:
            raise ConfigError(f"blocks: {bad} not in the embedding store {self.path} (has {self.blocks})")
        return np.stack([np.asarray(arr[index[b]].read().result(), np.float32) for b in blocks])


def well_features(features: np.ndarray, metadata: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame]:
    """Mean over the sites of each well: (nb, images, D) -> ((nb, wells, D), well metadata).

    Wells are keyed by (plate, well_id) in order of first appearance; the well table keeps the first site's
    columns (minus image_id and site) and adds `n_sites`.
    """
    if features.shape[1] != len(metadata):
        raise DataError(f"well_features: {features.shape[1]} embeddings for {len(metadata)} metadata rows")
    keys = metadata[list(WELL_KEYS)].astype(str).agg("\x1f".join, axis=1)
    codes, uniques = pd.factorize(keys, sort=False)
    sums = np.zeros((features.shape[0], len(uniques), features.shape[2]), np.float64)
    np.add.at(sums, (slice(None), codes), features.astype(np.float64))
    counts = np.bincount(codes, minlength=len(uniques))
    first = np.unique(codes, return_index=True)[1]
    wells = metadata.iloc[first].drop(columns=[c for c in ("image_id", "site") if c in metadata]).reset_index(drop=True)
    wells["n_sites"] = counts
    return (sums / counts[None, :, None]).astype(np.float32), wells


def _manifest(encoder, image_store, *, blocks, poolings, crop, chunk_images, dtype) -> dict:
    from vitally_jax.data.pipeline import tiles_per_image
    from vitally_jax.embedding.blocks import encoder_depth

    if tiles_per_image(image_store.shape[1], image_store.shape[2], crop) == 0:
        raise ConfigError(
            f"crop: {crop} px does not fit the {image_store.shape[1]}x{image_store.shape[2]} px images "
            f"of {image_store.path}"
        )

    cfg = getattr(encoder, "cfg", None)
    cfg_dict = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else {}
    width = int(cfg_dict.get("width", 0)) or None
    return {
        ARTEFACT_KEY: KIND,
        "format_version": FORMAT_VERSION,
        "blocks": list(blocks),
        "poolings": list(poolings),
        "depth": encoder_depth(encoder),
        "width": width,
        "num_images": len(image_store),
        "chunk_images": int(chunk_images),
        "crop": int(crop),
        "dtype": dtype,
        "tiles_per_image": tiles_per_image(image_store.shape[1], image_store.shape[2], crop),
        "image_store": str(pathlib.Path(image_store.path).resolve()),
        "encoder_config": json.loads(json.dumps(cfg_dict, default=str)),
    }


def _same_settings(path: pathlib.Path, manifest: dict) -> bool:
    """Whether the embedding store at `path` was started with `manifest` (the kind tag aside)."""
    try:
        old = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    strip = lambda d: {k: v for k, v in d.items() if k != ARTEFACT_KEY}
    return isinstance(old, dict) and strip(old) == strip(manifest)


def embed_screen(
    encoder,
    image_store,
    out: str | os.PathLike,
    *,
    blocks: Iterable[int] | None = None,
    pooling: str | Sequence[str] = DEFAULT_POOLING,
    crop: int = 256,
    batch_size: int = 64,
    chunk_images: int = 64,
    dtype: str = "float32",
    mesh=None,
    process_index: int = 0,
    process_count: int = 1,
    stop_after: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
    micro_batch: int | str = "auto",
) -> dict:
    """Embed every image of a screen into a resumable per-block store at `out`.

    Args:
      encoder: a `ViTEncoder`. image_store: an `ImageStore` or the path of one.
      blocks, pooling: as in `vitally_jax.embedding.blocks.embed` (default: all blocks; `DEFAULT_POOLING`,
        'cls_norm' and 'mean').
      crop: tile side in pixels; batch_size: crops per forward pass; chunk_images: images per resumable chunk.
      micro_batch: crops per slice inside one forward pass ("auto": cache-sized slices on CPU, the whole batch
        elsewhere; see `vitally_jax.embedding.blocks.BlockExtractor`); the results do not depend on it beyond
        float rounding.
      dtype: 'float32' or 'float16' on disk. mesh: optional mesh (batch sharded over data/fsdp).
      process_index, process_count: this process takes chunks k with k % process_count == process_index.
      stop_after: stop after computing this many chunks (for interrupted-run tests and time-boxed jobs).
      overwrite: start afresh although an embedding store is at `out`: the new one is built (resumably) in the
        hidden folder `.OUT.replacement` beside it and swapped in when complete, so the old one stays readable
        until then. Without it, an embedding store with the same settings is resumed and one with other
        settings is refused. Anything but an embedding store at `out` is always refused.

    Returns: {'computed': [chunk ids computed now], 'skipped': [already done], 'complete': bool, 'seconds': float}.
    """
    from vitally_jax.data.store import ImageStore
    from vitally_jax.embedding.blocks import make_extractor, padded_step

    if not isinstance(image_store, ImageStore):
        image_store = ImageStore.open(image_store)
    if dtype not in ("float32", "float16"):
        raise ConfigError(f"dtype: expected 'float32' or 'float16', got {dtype!r}")
    if chunk_images < 1 or not 0 <= process_index < process_count:
        raise ConfigError(
            f"chunk_images must be >= 1 and 0 <= process_index < process_count, got "
            f"{chunk_images}, {process_index}, {process_count}"
        )
    extractor = make_extractor(encoder, blocks=blocks, pooling=pooling, mesh=mesh, micro_batch=micro_batch)
    final = pathlib.Path(out)
    manifest = _manifest(
        encoder,
        image_store,
        blocks=extractor.blocks,
        poolings=extractor.poolings,
        crop=crop,
        chunk_images=chunk_images,
        dtype=dtype,
    )
    inputs = [image_store.path]
    existed = check_output(final, KIND, overwrite=overwrite, resume=not overwrite, inputs=inputs)
    out = final
    if overwrite and existed:
        out = final.with_name(f".{final.name}.replacement")
        if out.exists() and not (folder_kind(out) == KIND and _same_settings(out, manifest)):
            check_output(out, KIND, overwrite=True)  # a replacement of ours with other settings: start it anew
            shutil.rmtree(out)
    if (out / MANIFEST).is_file():
        old = json.loads((out / MANIFEST).read_text())
        if not _same_settings(out, manifest):
            diff = sorted(k for k in set(old) | set(manifest) if k != ARTEFACT_KEY and old.get(k) != manifest.get(k))
            raise OutputError(
                f"{out}: an embedding store with different settings is here (differs in {diff}); "
                "use another output folder, or --overwrite to replace it"
            )
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_parquet(out / METADATA, image_store.metadata)
        write_text(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    (out / DONE).mkdir(exist_ok=True)

    n = len(image_store)
    nchunks = -(-n // chunk_images)
    done = EmbeddingStore(out, manifest, image_store.metadata).done_chunks()
    mine = [k for k in range(nchunks) if k % process_count == process_index]
    todo = [k for k in mine if k not in done]
    step = padded_step(extractor, batch_size)
    arrays: dict = {}
    computed: list[int] = []
    t0 = time.perf_counter()
    size = {k: min(n, (k + 1) * chunk_images) - k * chunk_images for k in range(nchunks)}
    bar = _progress(sum(size[k] for k in mine), sum(size[k] for k in mine if k in done), enabled=progress)
    try:
        for k in todo:
            if stop_after is not None and len(computed) >= stop_after:
                break
            start, stop = k * chunk_images, min(n, (k + 1) * chunk_images)
            per_image = _embed_chunk(extractor, image_store, start, stop, crop=crop, step=step)
            for p, e in per_image.items():  # e: (nb, images, D)
                if p not in arrays:
                    arrays[p] = _open_array(
                        out / f"{p}.zarr",
                        create=True,
                        shape=(e.shape[0], n, e.shape[2]),
                        chunk_images=chunk_images,
                        dtype=dtype,
                    )
                arrays[p][:, start:stop, :].write(e.astype(dtype)).result()
            write_text(out / DONE / f"chunk_{k:06d}", f"{stop - start}\n")
            computed.append(k)
            bar.update(stop - start)
    finally:
        bar.close()
    complete = not EmbeddingStore(out, manifest, image_store.metadata).missing_chunks()
    if complete and out != final:
        swap_in(out, final)  # the previous store stays readable until this atomic exchange
    return {
        "computed": computed,
        "skipped": sorted(set(mine) - set(todo)),
        "complete": complete,
        "seconds": time.perf_counter() - t0,
    }


def _embed_chunk(extractor, image_store, start: int, stop: int, *, crop: int, step: int) -> dict[str, np.ndarray]:
    """Mean tile embedding of images start..stop-1 -> {pooling: (nb, stop - start, D) float32}."""
    from vitally_jax.data.pipeline import inference_tiles
    from vitally_jax.embedding.blocks import run_padded

    sums: dict[str, np.ndarray] = {}
    counts = np.zeros(stop - start, np.int64)
    for image_index, _, crops in inference_tiles(image_store, crop=crop, start=start, stop=stop, batch_size=step):
        rows = image_index - start
        for p, e in run_padded(extractor, crops, step).items():  # e: (b, nb, D)
            if p not in sums:
                sums[p] = np.zeros((stop - start,) + e.shape[1:], np.float64)
            np.add.at(sums[p], rows, e)
        counts += np.bincount(rows, minlength=stop - start)
    return {p: (v / counts[:, None, None]).astype(np.float32).transpose(1, 0, 2) for p, v in sums.items()}


def _progress(total: int, initial: int, *, enabled: bool):
    """A progress bar over images with rate and ETA (tqdm)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="image", desc="embedding", disable=not enabled, smoothing=0.1)


def _feature_table(store: EmbeddingStore, block: int, pooling: str, level: str) -> tuple[np.ndarray, pd.DataFrame]:
    x = store.features(pooling, [block])
    if level == "image":
        return x[0], store.metadata.reset_index(drop=True)
    if level == "well":
        w, meta = well_features(x, store.metadata)
        return w[0], meta
    raise ConfigError(f"level: expected 'image' or 'well', got {level!r}")


TABLE_KIND = "embedding table"
ANNDATA_KIND = "embedding AnnData"


def export_parquet(
    store: EmbeddingStore | str | os.PathLike,
    path: str | os.PathLike,
    *,
    block: int,
    pooling: str = "mean",
    level: str = "well",
    overwrite: bool = False,
) -> pathlib.Path:
    """One block as a Parquet table: metadata columns then feature columns `feature_0000`.. (float32).

    An existing file is replaced only with `overwrite=True`, and only if it is such a table written here."""
    store = store if isinstance(store, EmbeddingStore) else EmbeddingStore.open(store)
    check_output(path, TABLE_KIND, overwrite=overwrite, inputs=[store.path])
    x, meta = _feature_table(store, block, pooling, level)
    feats = pd.DataFrame(x, columns=[f"feature_{i:04d}" for i in range(x.shape[1])])
    return write_parquet(path, pd.concat([meta, feats], axis=1), TABLE_KIND)


def export_anndata(
    store: EmbeddingStore | str | os.PathLike,
    path: str | os.PathLike,
    *,
    block: int,
    pooling: str = "mean",
    level: str = "well",
    overwrite: bool = False,
) -> pathlib.Path:
    """One block as AnnData .h5ad: X (observations, width) float32, obs = metadata, uns = block/pooling/level.

    An existing file is replaced only with `overwrite=True`, and only if it is such an export written here."""
    try:
        import anndata
    except ImportError:
        raise ConfigError("export .h5ad: the 'anndata' package is not installed (pip install anndata)") from None
    store = store if isinstance(store, EmbeddingStore) else EmbeddingStore.open(store)
    check_output(path, ANNDATA_KIND, overwrite=overwrite, inputs=[store.path])
    x, meta = _feature_table(store, block, pooling, level)
    obs = meta.copy()
    obs.index = (
        obs["image_id"] if level == "image" else obs["plate"].astype(str) + "/" + obs["well_id"].astype(str)
    ).astype(str)
    obs.index.name = None
    adata = anndata.AnnData(X=x.astype(np.float32), obs=obs)
    adata.uns["vitally_jax"] = {"block": int(block), "pooling": pooling, "level": level, ARTEFACT_KEY: ANNDATA_KIND}
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)
    return pathlib.Path(path)
