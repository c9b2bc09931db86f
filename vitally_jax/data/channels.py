"""Channel registry: every source's channel names mapped onto one canonical Cell Painting order.

Canonical order (index: name, stain, what it shows):

0 DNA    Hoechst 33342              nuclei
1 ER     concanavalin A             endoplasmic reticulum
2 Actin  phalloidin                 F-actin (JUMP "AGP" = actin + Golgi + plasma membrane maps here)
3 RNA    SYTO 14                    nucleoli, cytoplasmic RNA
4 Mito   MitoTracker Deep Red       mitochondria
5 Golgi  wheat-germ agglutinin      Golgi and plasma membrane (absent in 5-channel JUMP data)

Stores keep the canonical names of the channels they hold, in canonical order: RxRx1 / RxRx3 (w1..w6) give all
six; JUMP cpg0016 gives DNA, ER, Actin, RNA, Mito (the JUMP pilot's Phenix files number them ch5, ch4, ch1,
ch3, ch2: source `phenix-jump`). `conform` turns any store's channels into a requested canonical list (e.g. a
6-channel model on 5-channel JUMP data: the missing Golgi channel is filled with zeros only when asked to), so
5- and 6-channel data map predictably.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vitally_jax.errors import DataError

CANONICAL = ("DNA", "ER", "Actin", "RNA", "Mito", "Golgi")

SOURCES: dict[str, dict[str, str]] = {
    # RxRx1 / RxRx3 / RxRx3-core: file suffix w1..w6 (or _1.._6)
    "rxrx": {"1": "DNA", "2": "ER", "3": "Actin", "4": "RNA", "5": "Mito", "6": "Golgi"},
    # JUMP cpg0016 load_data: FileName_Orig<name>
    "jump": {"DNA": "DNA", "ER": "ER", "AGP": "Actin", "RNA": "RNA", "Mito": "Mito"},
    # Phenix file names of the JUMP pilot (cpg0000, source_4): r01c01f01p01-ch<k>sk1fk1fl1.tiff
    "phenix-jump": {"ch5": "DNA", "ch4": "ER", "ch1": "Actin", "ch3": "RNA", "ch2": "Mito"},
    # stores written by this package (and the synthetic screen) already use canonical names
    "canonical": {c: c for c in CANONICAL},
}

ALIASES = {
    "dna": "DNA",
    "hoechst": "DNA",
    "dapi": "DNA",
    "nucleus": "DNA",
    "nuclei": "DNA",
    "er": "ER",
    "cona": "ER",
    "concanavalin": "ER",
    "actin": "Actin",
    "phalloidin": "Actin",
    "agp": "Actin",
    "rna": "RNA",
    "syto14": "RNA",
    "nucleoli": "RNA",
    "mito": "Mito",
    "mitotracker": "Mito",
    "mitochondria": "Mito",
    "golgi": "Golgi",
    "wga": "Golgi",
    "membrane": "Golgi",
}


def canonical_name(source: str, name: str) -> str:
    """Canonical channel name of channel `name` of `source` ('rxrx', 'jump', 'canonical'); stain names and
    common aliases (Hoechst, WGA, ...) are accepted for any source."""
    if source not in SOURCES:
        raise DataError(f"channel source {source!r} unknown; known: {', '.join(SOURCES)}")
    key = str(name)
    if key in SOURCES[source]:
        return SOURCES[source][key]
    alias = ALIASES.get(key.lower().replace(" ", "").replace("-", ""))
    if alias is None:
        raise DataError(
            f"channel {name!r} of source {source!r} is not in the channel registry "
            f"(known: {', '.join(SOURCES[source])})"
        )
    return alias


def canonical_order(source: str, names: Sequence[str]) -> list[tuple[str, str]]:
    """[(source name, canonical name)] for `names`, sorted into canonical order; duplicates are an error."""
    pairs = [(n, canonical_name(source, n)) for n in names]
    seen: dict[str, str] = {}
    for n, c in pairs:
        if c in seen:
            raise DataError(f"channels {seen[c]!r} and {n!r} of source {source!r} both map to {c}")
        seen[c] = n
    return sorted(pairs, key=lambda p: CANONICAL.index(p[1]))


def conform(
    images: np.ndarray, channel_names: Sequence[str], target: Sequence[str] = CANONICAL, *, fill_missing: bool = False
) -> np.ndarray:
    """Reorder / select the last axis of `images` (..., C) from `channel_names` to the canonical names `target`.

    A target channel the images lack is an error, or zeros when `fill_missing`.
    """
    idx = {c: i for i, c in enumerate(channel_names)}
    missing = [t for t in target if t not in idx]
    if missing and not fill_missing:
        raise DataError(
            f"images have channels {list(channel_names)}, missing {missing} "
            f"(pass fill_missing=True to fill them with zeros)"
        )
    out = np.zeros(images.shape[:-1] + (len(target),), images.dtype)
    for j, t in enumerate(target):
        if t in idx:
            out[..., j] = images[..., idx[t]]
    return out
