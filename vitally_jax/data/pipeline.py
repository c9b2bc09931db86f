"""Grain input pipelines over an image store: random training crops and whole-image inference tiles.

Training (`train_dataset`): the store's images (or a curated subset) are shuffled per epoch with `seed`, split
between processes by position (process p takes global positions p, p+P, p+2P, ...), and each element becomes a
random `crop` x `crop` window, optionally flipped / rotated by a multiple of 90 degrees. Crop offsets and
augmentations come from `np.random.default_rng((seed, epoch, k))` where k is the position of the image in the
index, so a batch depends only on (seed, step): runs are reproducible, and a restored Grain iterator state
continues bit-identically. `global_batches` turns per-process batches into global `jax.Array`s sharded over the
mesh's ('data', 'fsdp') axes, with a prefetch thread.

Inference (`inference_tiles`): every image is cut into non-overlapping `crop` x `crop` tiles in row-major order
starting at the top-left corner. If H or W is not a multiple of `crop`, the remainder at the bottom/right edge
is dropped (as the paper tiles a 2048x2048 well into 64 crops of 256); an image smaller than one crop is an error.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator

import numpy as np
import pandas as pd

from vitally_jax.data.store import ImageStore
from vitally_jax.errors import ConfigError, DataError

EPS = 1e-5


def self_standardize_np(x: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W, C) (or float in [0, 1]) -> float32: x/255 standardised per image and channel over H, W,
    (x - mean) / sqrt(biased var + 1e-5). Same formula as `vitally_jax.models.preprocess.self_standardize`, in
    numpy so that it runs in input threads without touching the accelerator. For uint8 input the mean and
    variance are exact (float64 from a 256-bin histogram per channel) and the output is a per-channel lookup
    table, so the result is the exact value rounded once to float32.

    As in the JAX version, the sums run on values shifted by each channel's first pixel (the same formula, since
    mean and variance are shift-invariant), so a constant channel is exactly 0: every shifted value is 0."""
    x = np.asarray(x)
    if x.dtype != np.uint8:  # float input is taken as already scaled to [0, 1]; float64 sums, like the histogram
        f = x.astype(np.float32).astype(np.float64)
        f = f - f[..., :1, :1, :]
        f = f - f.mean(axis=(-3, -2), keepdims=True)
        var = np.square(f).mean(axis=(-3, -2), keepdims=True)
        return (f / np.sqrt(var + EPS)).astype(np.float32)
    *lead, h, w, c = x.shape
    b = int(np.prod(lead)) if lead else 1
    idx = x.reshape(b, h * w, c) + (np.arange(b * c, dtype=np.int32) * 256).reshape(b, 1, c)
    hist = np.bincount(idx.ravel(), minlength=b * c * 256).reshape(b * c, 256)
    first = x.reshape(b, h * w, c)[:, 0].reshape(b * c).astype(np.int64)
    v = (np.arange(256)[None] - first[:, None]) / 255.0  # (b * c, 256), exactly 0 at the first pixel's value
    mean = (hist * v).sum(1) / (h * w)
    var = (hist * np.square(v - mean[:, None])).sum(1) / (h * w)
    lut = ((v - mean[:, None]) / np.sqrt(var[:, None] + EPS)).astype(np.float32)
    return lut.ravel()[idx].reshape(x.shape)


def tiles_per_image(h: int, w: int, crop: int) -> int:
    """Number of non-overlapping crop x crop tiles of an h x w image (the bottom/right remainder is dropped)."""
    return (h // crop) * (w // crop)


def _open(store: str | os.PathLike | ImageStore) -> ImageStore:
    return store if isinstance(store, ImageStore) else ImageStore.open(store)


def resolve_index(store: ImageStore, index) -> np.ndarray:
    """Store rows (int64) selected by `index`: None (all images), a Parquet file with an `image_id` column,
    a sequence of image ids (str) or of row numbers (int)."""
    if index is None:
        return np.arange(len(store), dtype=np.int64)
    if isinstance(index, (str, os.PathLike)):
        p = pathlib.Path(index)
        if not p.exists():
            raise DataError(f"{p}: index file not found")
        try:
            df = pd.read_parquet(p)
        except Exception as e:
            raise DataError(f"{p}: unreadable Parquet index ({e})") from None
        if "image_id" not in df.columns:
            raise DataError(f"{p}: index has no 'image_id' column (columns: {', '.join(map(str, df.columns))})")
        rows = store.index_of(df["image_id"].astype(str), source=str(p))
    else:
        items = list(index)
        if items and all(isinstance(v, (int, np.integer)) for v in items):
            rows = np.asarray(items, dtype=np.int64)
            if rows.min() < 0 or rows.max() >= len(store):
                raise DataError(f"index: row numbers must lie in [0, {len(store)}), got {rows.min()}..{rows.max()}")
        else:
            rows = store.index_of(map(str, items))
    if len(rows) == 0:
        raise DataError("index: selects no images")
    return rows


class _MemoryImages:
    """The selected images held in memory as one uint8 array (n, H, W, C); crops are numpy slices. Offers the
    `shape` / `read_crop` subset of `ImageStore` that `_RandomCrop` uses, with row numbers into `rows`."""

    def __init__(self, store: ImageStore, rows: np.ndarray):
        rows = np.asarray(rows, np.int64)
        if len(rows) == len(store) and (rows == np.arange(len(store))).all():
            self.images = store.read_many(0, len(store))
        else:  # contiguous chunks of the sorted rows, then back into the index's order
            order = np.sort(np.unique(rows))
            parts, i = [], 0
            while i < len(order):
                j = i
                while j + 1 < len(order) and order[j + 1] == order[j] + 1:
                    j += 1
                parts.append(store.read_many(int(order[i]), int(order[j]) + 1))
                i = j + 1
            loaded = np.concatenate(parts)
            self.images = loaded[np.searchsorted(order, rows)]
        self.shape = self.images.shape

    def read_crop(self, i: int, y: int, x: int, size: int) -> np.ndarray:
        """image[i, y:y+size, x:x+size, :] (a view) for position i of the index."""
        return self.images[int(i), y : y + size, x : x + size, :]


class _RandomCrop:
    """Maps (position in the repeated shuffled stream, index position k) to {'image': crop}. Picklable."""

    def __init__(self, store, rows, crop, seed, flips, rot90, standardize, process_index, process_count):
        self.store, self.rows, self.crop, self.seed = store, rows, crop, seed
        self.flips, self.rot90, self.standardize = flips, rot90, standardize
        self.pi, self.pc = process_index, process_count

    def __call__(self, pos: int, k: int) -> dict:
        epoch = (pos * self.pc + self.pi) // len(self.rows)
        rng = np.random.default_rng((self.seed, epoch, int(k)))
        _, h, w, _ = self.store.shape
        y = int(rng.integers(0, h - self.crop + 1))
        x = int(rng.integers(0, w - self.crop + 1))
        flip_y, flip_x, turns = rng.integers(0, 2), rng.integers(0, 2), rng.integers(0, 4)
        img = self.store.read_crop(self.rows[k], y, x, self.crop)
        if self.flips:
            if flip_y:
                img = img[::-1]
            if flip_x:
                img = img[:, ::-1]
        if self.rot90 and turns:
            img = np.rot90(img, int(turns), axes=(0, 1))
        if self.standardize:  # (otherwise the flipped / rotated view is copied once, by batching)
            img = self_standardize_np(img)
        return {"image": img}


def train_dataset(
    store_path: str | os.PathLike | ImageStore,
    *,
    crop: int = 256,
    global_batch: int,
    seed: int,
    index=None,
    flips: bool = True,
    rot90: bool = True,
    standardize: bool = False,
    process_index: int | None = None,
    process_count: int | None = None,
    num_epochs: int | None = None,
    read_threads: int = 8,
    num_workers: int = 0,
    in_memory: bool = False,
):
    """A Grain `IterDataset` of this process's training batches `{'image': (b, crop, crop, C)}`.

    b = global_batch / process_count; images are uint8, or float32 self-standardised when `standardize`.
    `iter(ds)` gives an iterator with `get_state()` / `set_state()` (also usable with
    `grain.checkpoint.CheckpointSave`). `num_epochs=None` repeats forever; a final partial batch is dropped.
    `read_threads` parallelise crop reads inside this process; `num_workers > 0` adds Grain worker processes.
    `in_memory=True` (for small screens) reads the selected images once into a uint8 array and cuts crops with
    numpy: the batches and the iterator state are identical to reading crops from the store.
    Process index/count default to `jax.process_index()` / `jax.process_count()`.
    """
    import grain

    store = _open(store_path)
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ConfigError(f"process_index {process_index} outside [0, process_count={process_count})")
    if global_batch <= 0 or global_batch % process_count:
        raise ConfigError(f"global_batch {global_batch} must be a positive multiple of process_count {process_count}")
    _, h, w, _ = store.shape
    if crop > min(h, w):
        raise DataError(f"{store.path}: crop {crop} larger than the {h}x{w} images")
    rows = resolve_index(store, index)
    ds = grain.MapDataset.range(len(rows)).shuffle(seed=seed).repeat(num_epochs)
    ds = ds[process_index::process_count]
    if in_memory:
        source, source_rows = _MemoryImages(store, rows), np.arange(len(rows), dtype=np.int64)
        read_threads = min(read_threads, 2)  # numpy slicing: threads only add scheduling overhead
    else:
        source, source_rows = store, rows
    ds = ds.map_with_index(
        _RandomCrop(source, source_rows, crop, seed, flips, rot90, standardize, process_index, process_count)
    )
    it = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(2 * global_batch // process_count, 16))
    )
    if num_workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return it.batch(global_batch // process_count, drop_remainder=True)


class _ToGlobal:
    def __init__(self, sharding):
        self.sharding = sharding

    def __call__(self, batch: dict) -> dict:
        import jax

        return {k: jax.make_array_from_process_local_data(self.sharding, v) for k, v in batch.items()}


def global_batches(dataset, mesh, *, prefetch: int = 2):
    """Per-process batches (a Grain `IterDataset` from `train_dataset`) -> an `IterDataset` of global `jax.Array`
    batches sharded over ('data', 'fsdp'), built by `jax.make_array_from_process_local_data` in a prefetch
    thread `prefetch` batches ahead. Its iterator's `get_state()` / `set_state()` checkpoint the whole pipeline."""
    import grain

    from vitally_jax.sharding import batch_sharding

    ds = dataset.map(_ToGlobal(batch_sharding(mesh)))
    return grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)


def inference_tiles(
    store: str | os.PathLike | ImageStore,
    *,
    crop: int = 256,
    start: int = 0,
    stop: int | None = None,
    batch_size: int = 64,
    read_ahead: int = 4,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield (image_index int64 (b,), tile_index int64 (b,), crops uint8 (b, crop, crop, C)) for images
    start..stop-1, every image cut into `tiles_per_image` non-overlapping tiles, row-major, remainder dropped.

    Order is fixed: image by image, tile by tile; batches hold `batch_size` tiles (the last may be smaller).
    Whole images are read `read_ahead` ahead with asynchronous TensorStore reads.
    """
    store = _open(store)
    n, h, w, c = store.shape
    stop = n if stop is None else min(int(stop), n)
    if crop > h or crop > w:
        raise DataError(f"{store.path}: crop {crop} larger than the {h}x{w} images; no tile fits")
    if not 0 <= start <= stop:
        raise ConfigError(f"inference_tiles: start {start} / stop {stop} outside 0..{n}")
    ty, tx = h // crop, w // crop
    arr = store.array
    pending: list = []
    nxt = start
    buf_i, buf_t, buf_x = [], [], []
    filled = 0
    for i in range(start, stop):
        while nxt < stop and len(pending) < read_ahead:
            pending.append(arr[nxt, : ty * crop, : tx * crop, :].read())
            nxt += 1
        img = store.result(pending.pop(0), f"image {i}")
        tiles = img.reshape(ty, crop, tx, crop, c).transpose(0, 2, 1, 3, 4).reshape(ty * tx, crop, crop, c)
        for t0 in range(0, ty * tx):
            buf_i.append(i)
            buf_t.append(t0)
            buf_x.append(tiles[t0])
            filled += 1
            if filled == batch_size:
                yield np.asarray(buf_i, np.int64), np.asarray(buf_t, np.int64), np.stack(buf_x)
                buf_i, buf_t, buf_x, filled = [], [], [], 0
    if filled:
        yield np.asarray(buf_i, np.int64), np.asarray(buf_t, np.int64), np.stack(buf_x)
