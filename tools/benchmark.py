"""Score a screen's well embeddings: align, aggregate, benchmark; write a report folder.

    python tools/benchmark.py --embeddings emb.npy --metadata metadata.parquet --out report/ \
        [--perturbation-col perturbation] [--control-key EMPTY] [--batch-col experiment] [--align tvn]

Embeddings: .npy (N, D), .parquet (numeric feature columns, or one list column), or a zarr array
(folder; read with TensorStore). Metadata: Parquet, one row per embedding row.
Output folder: summary.csv, summary.json, report.md, one CSV per benchmark, recall.png, similarities.png.
Exit codes: 7 bad benchmark input, 4 unreadable data, 8 unwritable output (see vitally_jax/errors.py).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np
import pandas as pd

from vitally_jax.cli import run_cli
from vitally_jax.errors import DataError

META_HINTS = (
    "perturbation",
    "well",
    "plate",
    "experiment",
    "image_id",
    "guide",
    "site",
    "concentration",
    "is_control",
    "control",
    "batch",
    "gene",
    "row",
    "col",
)


def read_embeddings(path: str) -> np.ndarray:
    """Embeddings from .npy, .parquet or a zarr folder -> (N, D) float64."""
    p = pathlib.Path(path)
    if not p.exists():
        raise DataError(f"{p}: embeddings file not found")
    try:
        if p.suffix == ".npy":
            return np.load(p, allow_pickle=False).astype(np.float64)
        if p.suffix == ".parquet":
            df = pd.read_parquet(p)
            lists = [
                c
                for c in df.columns
                if df[c].dtype == object
                and len(df)
                and hasattr(df[c].iloc[0], "__len__")
                and not isinstance(df[c].iloc[0], str)
            ]
            if len(lists) == 1:
                return np.stack(df[lists[0]].to_numpy()).astype(np.float64)
            num = [
                c
                for c in df.columns
                if pd.api.types.is_numeric_dtype(df[c])
                and not pd.api.types.is_bool_dtype(df[c])
                and not any(h in str(c).lower() for h in META_HINTS)
            ]
            if not num:
                raise DataError(f"{p}: no numeric feature columns (or one list column) found")
            return df[num].to_numpy(np.float64)
        if p.is_dir() or p.suffix == ".zarr":
            import tensorstore as ts

            for driver in ("zarr3", "zarr"):
                try:
                    arr = ts.open({"driver": driver, "kvstore": {"driver": "file", "path": str(p)}}).result()
                    return np.asarray(arr.read().result(), dtype=np.float64)
                except ValueError:
                    continue
            raise DataError(f"{p}: not a zarr v2/v3 array")
    except (OSError, ValueError) as e:
        raise DataError(f"{p}: cannot read embeddings ({e})") from None
    raise DataError(f"{p}: unknown embeddings format; expected .npy, .parquet or a zarr folder")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Benchmark a map of cell-microscopy embeddings.")
    ap.add_argument("--embeddings", required=True)
    ap.add_argument("--metadata", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--perturbation-col", default="perturbation")
    ap.add_argument("--control-key", default=None, help="label of control wells (default: is_control column)")
    ap.add_argument("--batch-col", default="experiment", help="'none' to align without batches")
    ap.add_argument(
        "--align",
        default="tvn",
        choices=["tvn", "centerscale", "centerscale_on_controls", "pca", "pca_centerscale", "none"],
    )
    ap.add_argument("--aggregate", default="mean", choices=["mean", "median"])
    ap.add_argument("--negative-controls", default=None, help="comma-separated perturbations for p-value nulls")
    ap.add_argument(
        "--skip",
        default="",
        help="comma-separated benchmarks to skip (recall,cluster,consistency,magnitude,replicate,map)",
    )
    ap.add_argument("--map-null-size", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a benchmark report already at --out (nothing else is ever replaced)",
    )
    ap.add_argument("--debug", action="store_true")
    a = ap.parse_args(argv)

    def work():
        from vitally_jax.benchmarks import benchmark
        from vitally_jax.benchmarks.report import KIND
        from vitally_jax.benchmarks.suite import ALL
        from vitally_jax.fileio import check_output

        inputs = [a.embeddings, a.metadata]
        check_output(a.out, KIND, overwrite=a.overwrite, inputs=inputs)  # before any work
        x = read_embeddings(a.embeddings)
        try:
            md = pd.read_parquet(a.metadata)
        except (OSError, ValueError) as e:
            raise DataError(f"{a.metadata}: cannot read metadata Parquet ({e})") from None
        skip = {s.strip() for s in a.skip.split(",") if s.strip()}
        rep = benchmark(
            x,
            md,
            perturbation_col=a.perturbation_col,
            control_key=a.control_key,
            batch_col=None if a.batch_col.lower() == "none" else a.batch_col,
            align_method=a.align,
            aggregate_method=a.aggregate,
            negative_controls=a.negative_controls.split(",") if a.negative_controls else None,
            map_null_size=a.map_null_size,
            seed=a.seed,
            include=tuple(b for b in ALL if b not in skip),
        )
        out = rep.write(a.out, plots=not a.no_plots, overwrite=a.overwrite, inputs=inputs)
        print(rep.to_markdown())
        print(f"wrote {out}")
        return 0

    return run_cli(work, debug=a.debug)


if __name__ == "__main__":
    sys.exit(main())
