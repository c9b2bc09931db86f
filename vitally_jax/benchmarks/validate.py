"""Input checks for the map benchmarks: each problem raises `BenchmarkInputError` with one line.

The reference implementation builds some of these errors without raising them; here they always raise.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from vitally_jax.errors import BenchmarkInputError


def as_features(x, name: str = "embeddings") -> np.ndarray:
    """Any 2-D array-like (ndarray, DataFrame) -> finite float64 (N, D); raises on NaN/inf or wrong rank."""
    arr = np.asarray(getattr(x, "values", x), dtype=np.float64)
    if arr.ndim != 2:
        raise BenchmarkInputError(f"{name}: expected a 2-D array (wells x features), got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise BenchmarkInputError(f"{name}: no rows")
    bad = ~np.isfinite(arr)
    if bad.any():
        rows = np.unique(np.nonzero(bad)[0])
        raise BenchmarkInputError(
            f"{name}: {bad.sum()} NaN/inf values in {len(rows)} rows "
            f"(first row {int(rows[0])}); expected finite numbers"
        )
    return arr


def as_labels(labels, n: int, name: str = "perturbation") -> np.ndarray:
    """Labels as an object array of length `n`; raises on length mismatch or missing values."""
    arr = np.asarray(getattr(labels, "values", labels), dtype=object)
    if arr.ndim != 1 or len(arr) != n:
        raise BenchmarkInputError(f"{name}: expected {n} labels (one per row), got shape {arr.shape}")
    missing = np.asarray(pd.isna(arr), dtype=bool)
    if missing.any():
        raise BenchmarkInputError(
            f"{name}: {int(missing.sum())} missing labels (first at row "
            f"{int(np.argmax(missing))}); expected a label for every row"
        )
    return arr


def check_unique_labels(labels: np.ndarray, name: str = "map perturbations") -> None:
    """Raise if a map has the same perturbation label on more than one row."""
    uniq, counts = np.unique(labels.astype(str), return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1]
        raise BenchmarkInputError(
            f"{name}: {len(dup)} duplicate labels (e.g. {dup[0]!r}); expected one row per "
            "perturbation (aggregate first)"
        )


def check_has_controls(is_control: np.ndarray, what: str = "control wells") -> None:
    """Raise if there are no control rows."""
    if not np.any(is_control):
        raise BenchmarkInputError(f"{what}: none found; expected at least one control well to fit the alignment")


def check_min_count(n: int, minimum: int, what: str) -> None:
    """Raise if `n < minimum` with a message naming `what`."""
    if n < minimum:
        raise BenchmarkInputError(f"{what}: found {n}, need at least {minimum}")


def unpack_map(map_data, perturbations=None, perturbation_col: str = "perturbation"):
    """Accept (features, labels), a `PerturbationMap`, or an EFAAR-style Bunch (features, metadata DataFrames)."""
    if perturbations is not None:
        return map_data, perturbations
    if hasattr(map_data, "perturbations"):
        return map_data.features, map_data.perturbations
    if hasattr(map_data, "features") and hasattr(map_data, "metadata"):
        md = map_data.metadata
        col = perturbation_col if perturbation_col in md.columns else md.columns[0]
        return map_data.features, md[col]
    raise BenchmarkInputError("perturbations: labels are required with a plain feature array")
