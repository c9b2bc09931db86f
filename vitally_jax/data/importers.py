"""Importers of real screen layouts into an image store (`store.py`).

RxRx1 / RxRx3 / RxRx3-core: a metadata CSV plus one single-channel image per channel per site, PNG or JPEG 2000
(decoded with imagecodecs), at `<image_root>/<path_template>`. Default templates:

- RxRx1 (`metadata.csv`: site_id, well_id, cell_type, dataset, experiment, plate, well, site, well_type, sirna,
  sirna_id): `{experiment}/Plate{plate}/{well}_s{site}_w{channel}.png`, or with a leading `{dataset}/` folder
  (train/test) when that is where the first row's image lies;
- RxRx3-core (`metadata_rxrx3_core.csv`: well_id, experiment_name, plate, address, gene, treatment, SMILES,
  concentration [uM], perturbation_type CRISPR | COMPOUND, cell_type): `{experiment_name}/Plate{plate}/
  {address}_s1_{channel}.jp2`.

JUMP cpg0016: a CellProfiler load_data CSV with Metadata_Plate, Metadata_Well, Metadata_Site (and optionally
Metadata_Source / Metadata_Batch) and `FileName_Orig{DNA,ER,RNA,AGP,Mito}` / `PathName_Orig*` columns; TIFF files
of 8 or 16 bits. Perturbations come from the CSV (`Metadata_JCP2022` or `Metadata_perturbation`) or a separate
table joined on plate and well.

16-bit to uint8 rule (any format): per plate and channel, the 0.1% and 99.9% percentiles (`percentiles`) of a
pixel sample from all that plate's images (every k-th pixel, <= 16,384 per image) set lo and hi, and
uint8 = round(255 * clip((x - lo) / (hi - lo), 0, 1)). 8-bit images are stored unchanged. Mixing 8- and 16-bit
files in one import is an error.

Wells: `well_row` / `well_col` are 1-based (A01 -> 1, 1; rows after Z are AA, AB, ... -> 27, 28, ...).
Every bad input raises a one-line `DataError` naming the file or row; the store is written atomically.
"""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd

from vitally_jax.data.channels import canonical_order
from vitally_jax.data.store import KIND, write_store
from vitally_jax.errors import DataError
from vitally_jax.fileio import check_output

NEGATIVE_CONTROLS = frozenset({"EMPTY", "EMPTY_control", "DMSO", "non-targeting", "JCP2022_033924"})
RXRX1_TEMPLATE = "{dataset}/{experiment}/Plate{plate}/{well}_s{site}_w{channel}.png"
RXRX3_CORE_TEMPLATE = "{experiment_name}/Plate{plate}/{address}_s1_{channel}.jp2"
JUMP_CHANNELS = ("DNA", "ER", "RNA", "AGP", "Mito")
_SAMPLE = 16384


# ------------------------------------------------------------------------------------------ decoding
def read_channel_image(path: pathlib.Path, context: str = "") -> np.ndarray:
    """Decode one single-channel image file (PNG, JPEG 2000, TIFF) to a 2-D uint8/uint16 array."""
    import imagecodecs

    where = f" ({context})" if context else ""
    if not path.is_file():
        raise DataError(f"{path}: image file not found{where}")
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            img = tifffile.imread(path)
        elif suffix == ".png":
            img = imagecodecs.png_decode(path.read_bytes())
        elif suffix in (".jp2", ".j2k", ".jpx"):
            img = imagecodecs.jpeg2k_decode(path.read_bytes())
        else:
            img = imagecodecs.imread(path)
    except Exception as e:  # decoders raise many types
        raise DataError(f"{path}: cannot decode image{where}: {' '.join(str(e).split()) or type(e).__name__}") from None
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim != 2:
        raise DataError(f"{path}: image of shape {img.shape}{where}, expected one channel per file")
    if img.dtype not in (np.uint8, np.uint16):
        raise DataError(f"{path}: dtype {img.dtype}{where}, expected uint8 or uint16")
    return img


def parse_well(name: str) -> tuple[int, int]:
    """'B03' -> (2, 3); 'AA02' -> (27, 2) (1-based row and column)."""
    m = re.fullmatch(r"([A-Za-z]+)0*(\d+)", str(name).strip())
    if not m:
        raise DataError(f"well {name!r}: expected a plate address like B03")
    row = 0
    for ch in m.group(1).upper():
        row = row * 26 + ord(ch) - 64
    return row, int(m.group(2))


def _require(df: pd.DataFrame, cols: Sequence[str], source: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise DataError(f"{source}: missing required column(s) {', '.join(missing)}")


def _read_csv(path) -> pd.DataFrame:
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError(f"{path}: metadata CSV not found")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as e:
        raise DataError(f"{path}: unreadable CSV ({e})") from None


# ------------------------------------------------------------------------------- the shared import engine
def _site_stream(
    files: list[list[pathlib.Path]],
    ids: list[str],
    plates: np.ndarray,
    percentiles: tuple[float, float],
    channel_names: list[str],
) -> Iterator[np.ndarray]:
    """Yield uint8 (H, W, C) per site from its channel files, scaling 16-bit data per plate and channel."""
    first = read_channel_image(files[0][0], f"image {ids[0]}, channel {channel_names[0]}")
    lohi = None
    if first.dtype == np.uint16:
        samples: dict[tuple[str, int], list[np.ndarray]] = {}
        for i, site in enumerate(files):
            for c, f in enumerate(site):
                img = read_channel_image(f, f"image {ids[i]}, channel {channel_names[c]}")
                step = max(1, img.size // _SAMPLE)
                samples.setdefault((plates[i], c), []).append(img.ravel()[::step])
        lohi = {}
        for key, s in samples.items():
            lo, hi = np.percentile(np.concatenate(s), percentiles)
            lohi[key] = (float(lo), float(max(hi, lo + 1)))
    for i, site in enumerate(files):
        chans = []
        for c, f in enumerate(site):
            img = first if (i, c) == (0, 0) else read_channel_image(f, f"image {ids[i]}, channel {channel_names[c]}")
            if img.dtype != first.dtype:
                raise DataError(f"{f}: {img.dtype} image in a {first.dtype} import (image {ids[i]})")
            if chans and img.shape != chans[0].shape:
                raise DataError(
                    f"{f}: size {img.shape} differs from channel {channel_names[0]} {chans[0].shape} (image {ids[i]})"
                )
            if lohi is not None:
                lo, hi = lohi[(plates[i], c)]
                img = np.rint(np.clip((img.astype(np.float64) - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
            chans.append(img)
        yield np.stack(chans, axis=-1)


def _write(
    out, meta: pd.DataFrame, files, channel_names, percentiles, attrs, *, overwrite: bool, inputs
) -> pathlib.Path:
    if len(meta) == 0:
        raise DataError(f"{out}: the metadata selects no images")
    stream = _site_stream(files, meta.image_id.tolist(), meta.plate.to_numpy(), percentiles, channel_names)
    return write_store(out, stream, meta, channel_names, attrs, overwrite=overwrite, inputs=inputs)


def _control_columns(pert: pd.Series, negatives) -> tuple[np.ndarray, np.ndarray]:
    neg = pert.isin(set(negatives)).to_numpy()
    return neg, np.where(neg, "negative", "")


# ----------------------------------------------------------------------------------------------- RxRx
def _rxrx1_template(df: pd.DataFrame, root: pathlib.Path, channel: str) -> str:
    """RxRx1 as released keeps images/<experiment>/...; the older Kaggle copy adds a train/ or test/ folder
    (the `dataset` column): use the layout in which the first row's first channel exists."""
    bare = RXRX1_TEMPLATE[len("{dataset}/") :]
    if "dataset" in df.columns and len(df):
        first = df.iloc[0].to_dict()
        if (root / RXRX1_TEMPLATE.format(channel=channel, **first)).is_file():
            return RXRX1_TEMPLATE
    return bare


def import_rxrx(
    metadata_csv: str | os.PathLike,
    image_root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    path_template: str | None = None,
    channels: Sequence[str] = ("1", "2", "3", "4", "5", "6"),
    concentration_unit: str = "uM",
    negative_controls=NEGATIVE_CONTROLS,
    percentiles: tuple[float, float] = (0.1, 99.9),
    limit: int | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Import an RxRx1 or RxRx3(-core) folder into a store at `out` (the flavour is detected from the columns).

    `out` must not be, or lie inside, the image root or the CSV; an image store already there is replaced only
    with `overwrite=True`, and anything else there is refused (see `vitally_jax.fileio`).

    `path_template` is formatted with the metadata row's columns and `channel` (default: see module doc).
    RxRx3-core concentrations are in `concentration_unit` ('uM' or 'nM') and stored in nM. `limit` imports only
    the first rows (for a quick look).
    """
    csv = pathlib.Path(metadata_csv)
    inputs = [csv, image_root]
    check_output(out, KIND, overwrite=overwrite, inputs=inputs)
    df = _read_csv(csv)
    if limit is not None:
        df = df.iloc[:limit].reset_index(drop=True)
    root = pathlib.Path(image_root)
    order = canonical_order("rxrx", channels)
    if "sirna" in df.columns or "well_type" in df.columns:  # RxRx1
        _require(df, ["experiment", "plate", "well", "site", "well_type", "sirna"], str(csv))
        template = path_template or _rxrx1_template(df, root, order[0][0])
        kind = df.well_type.str.lower()
        bad = ~kind.isin(["treatment", "negative_control", "positive_control"])
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"{csv}: row {i}: well_type {df.well_type[i]!r} not one of treatment, "
                f"negative_control, positive_control"
            )
        is_ctrl = (kind != "treatment").to_numpy()
        plate_name = df.experiment + "_" + df.plate
        wells = [parse_well(w) for w in df.well]
        site = pd.to_numeric(df.site, errors="coerce")
        if site.isna().any():
            raise DataError(f"{csv}: column 'site' must be integers (row {int(np.flatnonzero(site.isna())[0])})")
        meta = pd.DataFrame(
            {
                "image_id": plate_name + "_" + df.well + "_s" + df.site,
                "well_id": plate_name + "_" + df.well,
                "plate": plate_name,
                "experiment": df.experiment,
                "well_row": [r for r, _ in wells],
                "well_col": [c for _, c in wells],
                "site": site.astype(int),
                "perturbation": df.sirna,
                "perturbation_type": np.where(is_ctrl, "control", "gene"),
                "guide_id": df.sirna,
                "concentration": np.nan,
                "is_control": is_ctrl,
                "control_type": np.where(
                    kind == "negative_control", "negative", np.where(kind == "positive_control", "positive", "")
                ),
            }
        )
        flavour = "rxrx1"
    else:  # RxRx3 / RxRx3-core
        _require(
            df,
            ["experiment_name", "plate", "address", "gene", "treatment", "concentration", "perturbation_type"],
            str(csv),
        )
        template = path_template or RXRX3_CORE_TEMPLATE
        if concentration_unit not in ("uM", "nM"):
            raise DataError(f"concentration_unit {concentration_unit!r}: expected 'uM' or 'nM'")
        ptype = df.perturbation_type.str.upper()
        bad = ~ptype.isin(["CRISPR", "COMPOUND"])
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"{csv}: row {i}: perturbation_type {df.perturbation_type[i]!r} not CRISPR or COMPOUND")
        pert = pd.Series(np.where(ptype == "CRISPR", df.gene, df.treatment))
        neg, ctype = _control_columns(pert, negative_controls)
        conc = pd.to_numeric(df.concentration.replace("", np.nan), errors="coerce")
        conc = conc * (1000.0 if concentration_unit == "uM" else 1.0)
        plate_name = df.experiment_name + "_" + df.plate
        wells = [parse_well(w) for w in df.address]
        meta = pd.DataFrame(
            {
                "image_id": plate_name + "_" + df.address + "_s1",
                "well_id": plate_name + "_" + df.address,
                "plate": plate_name,
                "experiment": df.experiment_name,
                "well_row": [r for r, _ in wells],
                "well_col": [c for _, c in wells],
                "site": 1,
                "perturbation": pert,
                "perturbation_type": np.where(neg, "control", np.where(ptype == "CRISPR", "gene", "compound")),
                "guide_id": "",
                "concentration": np.where(ptype == "COMPOUND", conc, np.nan),
                "is_control": neg,
                "control_type": ctype,
            }
        )
        flavour = "rxrx3"
    rows = df.to_dict("records")
    try:
        files = [[root / template.format(channel=src, **r) for src, _ in order] for r in rows]
    except KeyError as e:
        raise DataError(f"path_template {template!r} names column {e} that {csv} lacks") from None
    attrs = {
        "source": flavour,
        "metadata_csv": str(csv.resolve()),
        "image_root": str(root.resolve()),
        "path_template": template,
        "source_channels": [s for s, _ in order],
        "uint16_rule": f"per plate and channel {percentiles[0]}/{percentiles[1]} percentile scaling",
    }
    return _write(out, meta, files, [c for _, c in order], percentiles, attrs, overwrite=overwrite, inputs=inputs)


# ----------------------------------------------------------------------------------------------- JUMP
def _jump_path(pathname: str, filename: str, image_root: pathlib.Path | None, base: pathlib.Path) -> pathlib.Path:
    m = re.match(r"^[a-z0-9]+://[^/]+/(.*)$", pathname)  # s3://bucket/key... -> key under image_root
    if m:
        if image_root is None:
            raise DataError(f"PathName {pathname!r} is remote; pass image_root pointing at a local copy")
        return image_root / m.group(1) / filename
    p = pathlib.Path(pathname)
    if not p.is_absolute():
        p = (image_root or base) / p
    return p / filename


def import_jump(
    load_data_csv: str | os.PathLike,
    out: str | os.PathLike,
    *,
    image_root=None,
    channels: Sequence[str] = JUMP_CHANNELS,
    perturbations: pd.DataFrame | str | None = None,
    perturbation_type: str = "compound",
    negative_controls=NEGATIVE_CONTROLS,
    percentiles: tuple[float, float] = (0.1, 99.9),
    limit: int | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Import a JUMP cpg0016 load_data CSV (+ TIFFs) into a store at `out`.

    `out` is checked as in `import_rxrx` (inputs: the CSV, `image_root`, a perturbations CSV).

    Relative PathName_* folders are resolved against `image_root` (default: the CSV's folder); s3:// paths map to
    `image_root/<key>`. Perturbations: `perturbations` (DataFrame or CSV with Metadata_Plate, Metadata_Well,
    perturbation, and optionally perturbation_type, concentration [nM], control_type), else the CSV's
    Metadata_JCP2022 / Metadata_perturbation column, else none ('' with `perturbation_type`).
    """
    csv = pathlib.Path(load_data_csv)
    inputs = [csv, image_root, perturbations if not isinstance(perturbations, pd.DataFrame) else None]
    check_output(out, KIND, overwrite=overwrite, inputs=inputs)
    df = _read_csv(csv)
    if limit is not None:
        df = df.iloc[:limit].reset_index(drop=True)
    order = canonical_order("jump", channels)
    need = ["Metadata_Plate", "Metadata_Well", "Metadata_Site"]
    need += [f"{k}_Orig{s}" for s, _ in order for k in ("FileName", "PathName")]
    _require(df, need, str(csv))
    if perturbation_type not in ("gene", "compound"):
        raise DataError(f"perturbation_type {perturbation_type!r}: expected 'gene' or 'compound'")
    root = pathlib.Path(image_root) if image_root is not None else None
    site = pd.to_numeric(df.Metadata_Site, errors="coerce")
    if site.isna().any():
        raise DataError(f"{csv}: Metadata_Site must be integers (row {int(np.flatnonzero(site.isna())[0])})")
    conc = pd.Series(np.nan, index=df.index)
    ctype = pd.Series("", index=df.index)
    ptype = pd.Series(perturbation_type, index=df.index)
    if perturbations is not None:
        table = perturbations if isinstance(perturbations, pd.DataFrame) else _read_csv(perturbations)
        src = "perturbations" if isinstance(perturbations, pd.DataFrame) else str(perturbations)
        _require(table, ["Metadata_Plate", "Metadata_Well", "perturbation"], src)
        table = table.astype({"Metadata_Plate": str, "Metadata_Well": str})
        if table.duplicated(["Metadata_Plate", "Metadata_Well"]).any():
            raise DataError(f"{src}: more than one perturbation for a plate and well")
        j = df[["Metadata_Plate", "Metadata_Well"]].merge(table, how="left", on=["Metadata_Plate", "Metadata_Well"])
        if j.perturbation.isna().any():
            i = int(np.flatnonzero(j.perturbation.isna())[0])
            raise DataError(f"{src}: no perturbation for plate {df.Metadata_Plate[i]} well {df.Metadata_Well[i]}")
        pert = j.perturbation.astype(str)
        if "perturbation_type" in j:
            ptype = j.perturbation_type.astype(str)
        if "concentration" in j:
            conc = pd.to_numeric(j.concentration, errors="coerce")
        if "control_type" in j:
            ctype = j.control_type.fillna("").astype(str)
    elif "Metadata_JCP2022" in df.columns:
        pert = df.Metadata_JCP2022
    elif "Metadata_perturbation" in df.columns:
        pert = df.Metadata_perturbation
    else:
        pert = pd.Series("", index=df.index)
    neg, neg_type = _control_columns(pert, negative_controls)
    ctype = pd.Series(np.where(neg, neg_type, ctype))
    is_ctrl = (ctype != "").to_numpy()
    ptype = pd.Series(np.where(is_ctrl, "control", ptype))
    plate = df.Metadata_Plate
    experiment = df.get("Metadata_Batch", df.get("Metadata_Source", plate))
    wells = [parse_well(w) for w in df.Metadata_Well]
    meta = pd.DataFrame(
        {
            "image_id": plate + "_" + df.Metadata_Well + "_s" + df.Metadata_Site,
            "well_id": plate + "_" + df.Metadata_Well,
            "plate": plate,
            "experiment": experiment,
            "well_row": [r for r, _ in wells],
            "well_col": [c for _, c in wells],
            "site": site.astype(int),
            "perturbation": pert,
            "perturbation_type": ptype,
            "guide_id": "",
            "concentration": conc,
            "is_control": is_ctrl,
            "control_type": ctype,
        }
    )
    files = [
        [_jump_path(r[f"PathName_Orig{s}"], r[f"FileName_Orig{s}"], root, csv.parent) for s, _ in order]
        for r in df.to_dict("records")
    ]
    attrs = {
        "source": "jump-cpg0016",
        "load_data_csv": str(csv.resolve()),
        "source_channels": [s for s, _ in order],
        "uint16_rule": f"per plate and channel {percentiles[0]}/{percentiles[1]} percentile scaling",
    }
    return _write(out, meta, files, [c for _, c in order], percentiles, attrs, overwrite=overwrite, inputs=inputs)
