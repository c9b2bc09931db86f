"""The image store: a screen as one TensorStore zarr v3 uint8 array (N, H, W, C) plus a Parquet metadata table.

Layout of a store folder (see docs/architecture.md, "Data contract"):

- `images.zarr`: zarr v3, uint8, shape (N, H, W, C); outer chunks (shards) hold several whole images, inner
  chunks are (1, h, w, C) tiles of at most 128x128 pixels, zstd-compressed with a CRC32C checksum (a damaged
  tile is a `DataError`, never wrong pixels), so a random crop decodes one or a few tiles only.
- `metadata.parquet`: one row per image, row i describes image i, exactly the columns in `METADATA_COLUMNS`;
  `well_row` / `well_col` are 1-based plate coordinates (A01 -> 1, 1), `concentration` is in nM (NaN if none).
- `store.json`: channel names, shape, provenance (`attrs`) and the format version.

`write_store` builds everything in a temporary folder and renames it into place, so a failed import never
leaves a partial store behind.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd

from vitally_jax.errors import DataError
from vitally_jax.fileio import ARTEFACT_KEY, atomic_path, check_output

FORMAT_VERSION = 1
IMAGES = "images.zarr"
METADATA = "metadata.parquet"
STORE_JSON = "store.json"
KIND = "image store"  # the artefact kind named in store.json (see vitally_jax.fileio)

# column -> kind ('str', 'int', 'float', 'bool'); order is the order written to Parquet.
METADATA_COLUMNS: dict[str, str] = {
    "image_id": "str",
    "well_id": "str",
    "plate": "str",
    "experiment": "str",
    "well_row": "int",
    "well_col": "int",
    "site": "int",
    "perturbation": "str",
    "perturbation_type": "str",
    "guide_id": "str",
    "concentration": "float",
    "is_control": "bool",
    "control_type": "str",
}
PERTURBATION_TYPES = ("gene", "compound", "control")
CONTROL_TYPES = ("negative", "positive", "")

INNER_TILE = 128  # largest inner-chunk side in pixels (a random 256 crop decodes <= 2.25x its size)
SHARD_BYTES = 32 << 20  # target size of one outer chunk (uncompressed)


def normalize_metadata(metadata: pd.DataFrame, *, source: str = "metadata") -> pd.DataFrame:
    """Check and coerce a metadata table to the store contract; returns a new DataFrame in column order.

    Raises `DataError` (one line naming `source` and the column/row) on missing or extra columns, values of the
    wrong type, unknown perturbation/control types, or duplicate `image_id`s.
    """
    if not isinstance(metadata, pd.DataFrame):
        raise DataError(f"{source}: expected a pandas DataFrame, got {type(metadata).__name__}")
    missing = [c for c in METADATA_COLUMNS if c not in metadata.columns]
    if missing:
        raise DataError(f"{source}: missing required column(s) {', '.join(missing)}")
    extra = [c for c in metadata.columns if c not in METADATA_COLUMNS]
    if extra:
        raise DataError(
            f"{source}: unexpected column(s) {', '.join(map(str, extra))}; "
            f"expected exactly {', '.join(METADATA_COLUMNS)}"
        )
    out = {}
    for col, kind in METADATA_COLUMNS.items():
        s = metadata[col].reset_index(drop=True)
        try:
            if kind == "str":
                out[col] = s.fillna("").astype(str)
            elif kind == "int":
                if s.isna().any():
                    raise ValueError("missing values")
                out[col] = s.astype(np.int64)
            elif kind == "float":
                out[col] = pd.to_numeric(s).astype(np.float64)
            else:
                if s.isna().any():
                    raise ValueError("missing values")
                vals = set(pd.unique(s))
                if not vals <= {True, False}:
                    raise ValueError(f"values {sorted(map(str, vals))[:3]}")
                out[col] = s.astype(bool)
        except (ValueError, TypeError) as e:
            raise DataError(f"{source}: column {col!r} must be {kind} ({e})") from None
    df = pd.DataFrame(out)
    bad = ~df["perturbation_type"].isin(PERTURBATION_TYPES)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{source}: row {i} ({df.image_id[i]}): perturbation_type "
            f"{df.perturbation_type[i]!r} not one of {PERTURBATION_TYPES}"
        )
    bad = ~df["control_type"].isin(CONTROL_TYPES)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{source}: row {i} ({df.image_id[i]}): control_type {df.control_type[i]!r} "
            f"not one of 'negative', 'positive', ''"
        )
    if (df["image_id"] == "").any():
        i = int(np.flatnonzero(df["image_id"] == "")[0])
        raise DataError(f"{source}: row {i}: empty image_id")
    dup = df["image_id"].duplicated()
    if dup.any():
        i = int(np.flatnonzero(dup)[0])
        raise DataError(f"{source}: duplicate image_id {df.image_id[i]!r} (row {i})")
    return df


_DEFAULTS = {"str": "", "int": 0, "float": np.nan, "bool": False}


def metadata_frame(image_ids: Sequence[str], **columns) -> pd.DataFrame:
    """A contract metadata table for `image_ids`; other columns from `columns` (scalars or sequences), the rest
    filled with defaults ('' / 0 / NaN / False; perturbation_type 'control' when is_control else 'gene';
    well_id = image_id)."""
    n = len(image_ids)
    unknown = [c for c in columns if c not in METADATA_COLUMNS]
    if unknown:
        raise DataError(f"metadata: unknown column(s) {', '.join(unknown)}")
    df = pd.DataFrame({"image_id": list(map(str, image_ids))})
    for col, kind in METADATA_COLUMNS.items():
        if col == "image_id":
            continue
        if col in columns:
            df[col] = columns[col] if np.ndim(columns[col]) else [columns[col]] * n
        elif col == "well_id":
            df[col] = df["image_id"]
        elif col == "perturbation_type":
            df[col] = np.where(df["is_control"], "control", "gene") if "is_control" in df else "gene"
        else:
            df[col] = [_DEFAULTS[kind]] * n
    return df[list(METADATA_COLUMNS)]


def _zarr_spec(path: pathlib.Path, shape: Sequence[int], images_per_shard: int) -> dict:
    n, h, w, c = shape
    inner = [1, min(h, INNER_TILE), min(w, INNER_TILE), c]
    # the shard must be a whole number of inner tiles; zarr allows edge chunks to overhang the array
    outer = [images_per_shard, -(-h // inner[1]) * inner[1], -(-w // inner[2]) * inner[2], c]
    return {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": str(path)},
        "metadata": {
            "shape": list(shape),
            "data_type": "uint8",
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": outer}},
            "chunk_key_encoding": {"name": "default"},
            "dimension_names": ["image", "y", "x", "channel"],
            "codecs": [
                {
                    "name": "sharding_indexed",
                    "configuration": {
                        "chunk_shape": inner,
                        # crc32c: a damaged tile fails to read instead of decoding to wrong pixels
                        "codecs": [
                            {"name": "bytes"},
                            {"name": "zstd", "configuration": {"level": 3}},
                            {"name": "crc32c"},
                        ],
                        "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
                    },
                }
            ],
        },
        "create": True,
        "delete_existing": True,
        # write every shard, even all-zero ones: a missing shard file then always means a damaged store
        "store_data_equal_to_fill_value": True,
    }


def _check_image(img: Any, i: int, expect: tuple | None, image_id: str) -> np.ndarray:
    if not isinstance(img, np.ndarray):
        raise DataError(f"image {i} ({image_id}): expected a numpy array, got {type(img).__name__}")
    if img.dtype != np.uint8:
        raise DataError(f"image {i} ({image_id}): dtype {img.dtype}, expected uint8")
    if img.ndim != 3:
        raise DataError(f"image {i} ({image_id}): shape {img.shape}, expected (height, width, channels)")
    if expect is not None and img.shape != expect:
        raise DataError(f"image {i} ({image_id}): shape {img.shape}, expected {expect} like the first image")
    return img


def write_store(
    path: str | os.PathLike,
    images: np.ndarray | Iterable[np.ndarray],
    metadata: pd.DataFrame,
    channel_names: Sequence[str],
    attrs: dict | None = None,
    *,
    overwrite: bool = False,
    inputs: Sequence[str | os.PathLike] = (),
) -> pathlib.Path:
    """Write a store folder atomically; returns its path.

    images: uint8 array (N, H, W, C) or an iterable of N uint8 arrays (H, W, C) (a generator is consumed once,
        shard by shard, so screens larger than memory work). N must equal `len(metadata)`.
    metadata: DataFrame with exactly the contract columns (see `METADATA_COLUMNS`); row i describes image i.
    channel_names: C names in channel order. attrs: JSON-serialisable provenance stored in `store.json`.
    Any failure (bad shape/dtype/count/metadata, an exception raised by the image iterator) removes the
    temporary folder and leaves `path` untouched.
    overwrite: replace an image store already at `path` (anything else there is refused, see `fileio`).
    inputs: paths the images come from; an output equal to or inside one of them is refused.
    """
    import tensorstore as ts

    path = pathlib.Path(path)
    check_output(path, KIND, overwrite=overwrite, inputs=inputs)
    meta = normalize_metadata(metadata, source=f"{path}: metadata")
    n = len(meta)
    if n == 0:
        raise DataError(f"{path}: metadata has no rows; a store needs at least one image")
    channel_names = [str(c) for c in channel_names]
    if len(set(channel_names)) != len(channel_names):
        raise DataError(f"{path}: duplicate channel names {channel_names}")
    try:
        json.dumps(attrs or {})
    except TypeError as e:
        raise DataError(f"{path}: attrs must be JSON-serialisable ({e})") from None

    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise DataError(f"{path}: images shape {images.shape}, expected (N, height, width, channels)")
        if images.shape[0] != n:
            raise DataError(f"{path}: {images.shape[0]} images but {n} metadata rows")
        if images.dtype != np.uint8:
            raise DataError(f"{path}: images dtype {images.dtype}, expected uint8")
        it: Iterator[np.ndarray] = iter(images)
    else:
        it = iter(images)

    ids = meta["image_id"].tolist()
    with atomic_path(path, is_dir=True) as tmp:
        first = next(it, None)
        if first is None:
            raise DataError(f"{path}: no images given for {n} metadata rows")
        first = _check_image(first, 0, None, ids[0])
        h, w, c = first.shape
        if c != len(channel_names):
            raise DataError(f"image 0 ({ids[0]}): {c} channels but {len(channel_names)} channel names {channel_names}")
        per_shard = int(max(1, min(n, SHARD_BYTES // (h * w * c))))
        arr = ts.open(_zarr_spec(tmp / IMAGES, (n, h, w, c), per_shard)).result()
        buf = np.empty((per_shard, h, w, c), np.uint8)
        buf[0] = first
        filled, start = 1, 0
        for i in range(1, n):
            if filled == per_shard:
                arr[start : start + filled].write(buf[:filled]).result()
                start, filled = start + filled, 0
            img = next(it, None)
            if img is None:
                raise DataError(f"{path}: only {i} images for {n} metadata rows")
            buf[filled] = _check_image(img, i, (h, w, c), ids[i])
            filled += 1
        arr[start : start + filled].write(buf[:filled]).result()
        if next(it, None) is not None:
            raise DataError(f"{path}: more images than the {n} metadata rows")
        meta.to_parquet(tmp / METADATA, index=False)
        info = {
            ARTEFACT_KEY: KIND,
            "format_version": FORMAT_VERSION,
            "shape": [n, h, w, c],
            "channel_names": channel_names,
            "attrs": attrs or {},
        }
        (tmp / STORE_JSON).write_text(json.dumps(info, indent=1))
    return path


class ImageStore:
    """Read access to a store folder; picklable (the TensorStore handle is reopened lazily per process).

    Attributes: `path`, `metadata` (DataFrame, row i = image i), `channel_names`, `shape` (N, H, W, C), `attrs`.
    """

    def __init__(self, path: pathlib.Path, info: dict, metadata: pd.DataFrame):
        self.path = path
        self.metadata = metadata
        self.channel_names: list[str] = list(info["channel_names"])
        self.shape: tuple[int, int, int, int] = tuple(int(s) for s in info["shape"])
        self.attrs: dict = info.get("attrs", {})
        self._arr = None

    @classmethod
    def open(cls, path: str | os.PathLike) -> ImageStore:
        """Open a store folder; one-line `DataError` if it is missing pieces or inconsistent."""
        path = pathlib.Path(path)
        if not path.is_dir():
            raise DataError(f"{path}: no image store here (expected a folder with {IMAGES}, {METADATA}, {STORE_JSON})")
        for name in (IMAGES, METADATA, STORE_JSON):
            if not (path / name).exists():
                raise DataError(f"{path}: not an image store, {name} is missing")
        try:
            info = json.loads((path / STORE_JSON).read_text())
            version, shape = info["format_version"], info["shape"]
            info["channel_names"]
        except (ValueError, KeyError) as e:
            raise DataError(f"{path / STORE_JSON}: unreadable store description ({e})") from None
        if version > FORMAT_VERSION:
            raise DataError(f"{path}: store format {version} is newer than this reader ({FORMAT_VERSION})")
        try:
            meta = pd.read_parquet(path / METADATA)
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise DataError(f"{path / METADATA}: unreadable Parquet ({e})") from None
        meta = normalize_metadata(meta, source=str(path / METADATA))
        if len(meta) != shape[0]:
            raise DataError(f"{path}: {len(meta)} metadata rows but {shape[0]} images")
        return cls(path, info, meta)

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_arr"] = None
        return state

    @property
    def array(self):
        """The TensorStore handle (opened on first use in each process)."""
        if self._arr is None:
            import tensorstore as ts

            ctx = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
            spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(self.path / IMAGES)}}
            try:
                self._arr = ts.open(spec, read=True, context=ctx).result()
            except ValueError as e:
                raise DataError(f"{self.path / IMAGES}: cannot open image array ({e})") from None
            if tuple(self._arr.shape) != self.shape or self._arr.dtype.numpy_dtype != np.uint8:
                raise DataError(
                    f"{self.path / IMAGES}: array {self._arr.shape} {self._arr.dtype}, expected "
                    f"{self.shape} uint8 as in {STORE_JSON}"
                )
            self._check_shards(int(self._arr.chunk_layout.write_chunk.shape[0]))
        return self._arr

    def _check_shards(self, per_shard: int) -> None:
        """Every shard file the writer produced must exist: zarr reads a missing one as zeros, silently."""
        n_shards = -(-self.shape[0] // per_shard)
        root = self.path / IMAGES / "c"
        present = set(os.listdir(root)) if root.is_dir() else set()
        missing = [k for k in range(n_shards) if str(k) not in present]
        if missing:
            k = missing[0]
            raise DataError(
                f"{self.path / IMAGES}: {len(missing)} of {n_shards} image files missing (first: c/{k}, "
                f"images {k * per_shard}..{min(self.shape[0], (k + 1) * per_shard) - 1}); "
                "the store is incomplete"
            )

    def read(self, i: int) -> np.ndarray:
        """Image i as uint8 (H, W, C)."""
        return self.result(self.array[int(i)].read(), f"image {i}")

    def read_many(self, start: int, stop: int) -> np.ndarray:
        """Images start..stop-1 as uint8 (stop-start, H, W, C)."""
        return self.result(self.array[int(start) : int(stop)].read(), f"images {start}..{stop - 1}")

    def read_crop(self, i: int, y: int, x: int, size: int) -> np.ndarray:
        """The crop image[i, y:y+size, x:x+size, :] as uint8 (size, size, C); must lie inside the image."""
        _, h, w, _ = self.shape
        if not (0 <= y <= h - size and 0 <= x <= w - size):
            raise DataError(f"{self.path}: crop ({y}, {x}) of size {size} outside the {h}x{w} image {i}")
        return self.result(self.array[int(i), y : y + size, x : x + size, :].read(), f"image {i}")

    def result(self, future, what: str = "images") -> np.ndarray:
        """Wait for a read future; a damaged or truncated image file becomes a one-line `DataError`."""
        try:
            return future.result()
        except ValueError as e:
            raise DataError(
                f"{self.path / IMAGES}: cannot read {what}, the image data is damaged "
                f"({' '.join(str(e).split())[:240]})"
            ) from None

    def read_crop_async(self, i: int, y: int, x: int, size: int):
        """A TensorStore future for `read_crop` (call `.result()`); lets callers overlap many reads."""
        return self.array[int(i), y : y + size, x : x + size, :].read()

    def index_of(self, image_ids: Iterable[str], *, source: str = "index") -> np.ndarray:
        """Row numbers (int64) of the given image ids, in the given order; `DataError` naming unknown ids."""
        pos = pd.Index(self.metadata["image_id"])
        ids = list(image_ids)
        rows = pos.get_indexer(ids)
        if (rows < 0).any():
            bad = ids[int(np.flatnonzero(rows < 0)[0])]
            raise DataError(
                f"{source}: image_id {bad!r} is not in the store {self.path} ({int((rows < 0).sum())} unknown)"
            )
        return rows.astype(np.int64)
