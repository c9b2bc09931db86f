"""Known-relationship tables (CORUM, hu.MAP, Reactome, SIGNOR, StringDB) and CORUM complexes.

The tables ship in `vitally_jax/annotations/` (see the LICENSE there). Users can pass their own: a CSV/DataFrame
with columns `entity1,entity2` for pairs, or a TSV `name<TAB>space-separated genes` / dict for clusters.
"""

from __future__ import annotations

import functools
import os
import pathlib
import warnings

import numpy as np
import pandas as pd

from vitally_jax.errors import BenchmarkInputError, ConfigError

ANNOTATION_DIR = pathlib.Path(__file__).resolve().parent.parent / "annotations"
SOURCES = ("CORUM", "HuMAP", "Reactome", "SIGNOR", "StringDB")


def _read_pairs_file(path: str) -> pd.DataFrame:
    try:
        try:
            df = pd.read_csv(path, dtype=str, engine="pyarrow")
        except (ImportError, ValueError):
            df = pd.read_csv(path, dtype=str)
    except FileNotFoundError:
        raise BenchmarkInputError(f"{path}: annotation table not found") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise BenchmarkInputError(f"{path}: not a CSV table with columns entity1,entity2 ({e})") from None
    return df


@functools.lru_cache(maxsize=16)
def _bundled_relationships(name: str) -> pd.DataFrame:
    return load_relationships(_read_pairs_file(str(ANNOTATION_DIR / f"{name}.txt")))


def load_relationships(source) -> pd.DataFrame:
    """Annotated gene pairs: a bundled source name, a CSV path, or a DataFrame -> DataFrame(entity1, entity2).

    Pairs are put in sorted order (entity1 < entity2); self-pairs and duplicates are removed, as in EFAAR.
    Bundled tables are parsed once per process.
    """
    if isinstance(source, str) and source in SOURCES:
        return _bundled_relationships(source).copy()
    if isinstance(source, pd.DataFrame):
        df, where = source, "relationship table"
    else:
        path = ANNOTATION_DIR / f"{source}.txt" if str(source) in SOURCES else pathlib.Path(os.fspath(source))
        df, where = _read_pairs_file(str(path)), str(path)
    missing = {"entity1", "entity2"} - set(df.columns)
    if missing:
        raise BenchmarkInputError(
            f"{where}: missing columns {sorted(missing)}; expected columns entity1,entity2 (got {list(df.columns)[:5]})"
        )
    a = df["entity1"].astype(str).to_numpy()
    b = df["entity2"].astype(str).to_numpy()
    codes, uniq = pd.factorize(np.concatenate([a, b]))
    ca, cb = codes[: len(a)], codes[len(a) :]
    lo, hi = np.minimum(ca, cb).astype(np.int64), np.maximum(ca, cb).astype(np.int64)
    cand = np.nonzero(lo != hi)[0]
    _, first = np.unique(lo[cand] * max(len(uniq), 1) + hi[cand], return_index=True)
    rows = np.sort(cand[first])  # first occurrence of each unordered pair, table order
    a, b = a[rows], b[rows]
    swap = a > b
    out = pd.DataFrame({"entity1": np.where(swap, b, a), "entity2": np.where(swap, a, b)})
    return out


def relationship_index_pairs(
    rels: pd.DataFrame, labels: np.ndarray, *, source: str = "relationships", warn_unknown: bool = False
) -> np.ndarray:
    """Pairs whose two genes are both in the map -> (Q, 2) int row indices into `labels`, each row (i, j), i < j.

    Order follows the table order (after de-duplication), matching EFAAR's query order.
    """
    index = pd.Index(np.asarray(labels).astype(str))
    i = index.get_indexer(rels["entity1"].to_numpy())
    j = index.get_indexer(rels["entity2"].to_numpy())
    keep = (i >= 0) & (j >= 0)
    if warn_unknown and not keep.all():
        genes = set(rels["entity1"]) | set(rels["entity2"])
        unknown = len(genes - set(index))
        warnings.warn(
            f"{source}: {int((~keep).sum())} of {len(rels)} pairs skipped; {unknown} of {len(genes)} genes "
            f"are not in the map",
            stacklevel=2,
        )
    pairs = np.stack([i[keep], j[keep]], axis=1)
    return np.sort(pairs, axis=1)


def load_clusters(source="CORUM", *, repeated: str = "last") -> dict[str, set[str]]:
    """Gene clusters: 'CORUM' (bundled), a TSV path (name<TAB>space-separated genes), or a dict name -> genes.

    The one reader of cluster tables. A repeated cluster name keeps its first position and, with
    `repeated="last"`, its last gene set (as a Python dict does in EFAAR); with `repeated="union"`, the union of
    its gene sets.
    """
    if repeated not in ("last", "union"):
        raise ConfigError(f"repeated: expected 'last' or 'union', got {repeated!r}")
    if isinstance(source, dict):
        return {str(k): set(map(str, v)) for k, v in source.items()}
    from vitally_jax.annotations import read_clusters

    path = ANNOTATION_DIR / "CORUM_clusters.tsv" if source == "CORUM" else pathlib.Path(os.fspath(source))
    out: dict[str, set[str]] = {}
    try:
        rows = read_clusters(path)
    except FileNotFoundError:
        raise BenchmarkInputError(f"{path}: cluster table not found") from None
    except ValueError as e:
        raise BenchmarkInputError(str(e)) from None
    for name, genes in rows:
        if repeated == "union" and name in out:
            out[name] |= set(genes)
        else:
            out[name] = set(genes)
    return out


def clusters_in_map(clusters: dict[str, set[str]], labels, min_genes: int) -> dict[str, list[str]]:
    """Clusters restricted to genes in the map, kept when at least `min_genes` remain; genes sorted."""
    genes = set(np.asarray(labels).astype(str))
    out = {}
    for name, members in clusters.items():
        g = members & genes
        if len(g) >= min_genes:
            out[name] = sorted(g)
    return out
