"""The synthetic Cell Painting screen: the embedded default world with known biology and batch effects.

World model (all deterministic from `SyntheticConfig.seed`):

- The biology is a list of processes (`PROCESSES`, written down with their mechanisms in `docs/world.md`):
  a well's phenotype is a vector of process activations in z units, rendered by `render.py`.
- Genes are real symbols. Phenotype programs are real CORUM complexes (3..`max_complex_size` genes, chosen
  without overlap; with `exclusive_complexes`, drawn in proportion to size squared and never linked to another
  planted gene by a CORUM pair): every gene of a complex shares the complex's random phenotype direction.
  Complexes are grouped into pathways whose (weaker) direction is added to all their genes. Extra genes from the other
  annotation tables have a private phenotype or none. A fraction of genes has no phenotype at all, and each
  gene has its own strength; each guide of a gene has its own knockout efficiency.
- Compounds hit 1-3 phenotypic genes with a potency (nM) per target; the phenotype at a concentration is the
  targets' knockout phenotype times a Hill dose-response, plus off-target effects at high doses.
- Experiments contain plates (96/384/1536 wells); each perturbation (guide, or compound at a concentration)
  has `replicates` wells in different experiments; every plate has >= `control_fraction` negative-control wells
  (and a few positive controls) at random positions.
- Batch effects per experiment (and smaller per plate): per-channel gain and offset, illumination gradient and
  vignetting, defocus blur, cell density and cell size, staining efficiency per channel in the nucleus and
  in the cytoplasm; wells on the plate edge have fewer, brighter cells.
- Artefacts per image (out of focus, debris, empty field) at the configured rates, independent of the biology.

`generate_screen(path, cfg)` writes a store (`store.py`) plus the ground truth: `genes.parquet`,
`compound_targets.parquet` (RxRx3-core form: compound, gene, concentration in nM), `world_pairs.parquet`, and
`truth.parquet` (per image: the well's true process activations `proc_<name>` and the `artefact`).
`render_probe(cfg, z, gain=...)` renders control-background fields with chosen activations at fixed batch
effects (for sensitivity checks of a readout).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import os
import pathlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from vitally_jax.data.render import ARTEFACTS, PHENOTYPE_DIM, PROCESSES, Imaging, Renderer, neutral_imaging
from vitally_jax.data.store import KIND, METADATA_COLUMNS, write_store
from vitally_jax.errors import ConfigError
from vitally_jax.fileio import atomic_path, check_output

CHANNEL_NAMES = ("DNA", "ER", "Actin", "RNA", "Mito", "Golgi")
PLATE_FORMATS = {96: (8, 12), 384: (16, 24), 1536: (32, 48)}
NEGATIVE_CONTROL = "EMPTY"
_RENDER_BATCH = 8
WORLD_VERSION = 2  # the processes and mechanisms of docs/world.md; bumped whenever the pixels of a config change


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes, biology and batch-effect strengths of a synthetic screen (see the module docstring)."""

    n_genes: int = 48
    guides_per_gene: int = 2
    n_compounds: int = 6
    concentrations_nM: tuple[float, ...] = (30.0, 1000.0, 10000.0)
    n_experiments: int = 4
    replicates: int = 2  # wells per guide / compound-concentration, each in a different experiment
    plates_per_experiment: int | None = None  # None: as many as the wells need
    plate_format: int = 96
    image_size: int = 64
    cell_radius: float = 6.0  # pixels
    cells_per_image: float = 14.0
    control_fraction: float = 0.15  # negative-control wells per plate (>= 0.10)
    positive_controls_per_plate: int = 2
    complex_gene_fraction: float = 0.75  # share of genes drawn from CORUM complexes
    max_complex_size: int = 8
    # True: no CORUM pair links two planted complexes or a complex gene and an extra gene, so every CORUM pair
    # among the screened genes is a planted relationship (the world's biology agrees with the annotation)
    exclusive_complexes: bool = False
    complexes_per_pathway: int = 3
    pathway_strength: float = 0.4  # pathway direction relative to the complex direction
    no_phenotype_fraction: float = 0.2
    strength_range: tuple[float, float] = (0.6, 1.5)
    knockout_efficiency_range: tuple[float, float] = (0.4, 1.0)
    phenotype_scale: float = 1.6  # norm of a program direction / sqrt(PHENOTYPE_DIM)
    well_noise: float = 0.35  # biological well-to-well variation (phenotype units)
    penetrance: float = 0.85  # share of a well's cells that show its phenotype (the rest look like controls)
    gain_sigma: float = 0.35  # log-normal per experiment and channel
    offset_max: float = 16.0  # intensity units added per experiment and channel
    illumination: float = 0.3  # max relative illumination gradient across the field
    blur_max: float = 1.2  # max extra defocus sigma (pixels)
    density_sigma: float = 0.25
    size_sigma: float = 0.08
    stain_sigma: float = 0.15  # log-normal staining efficiency per experiment, channel and compartment
    out_of_focus_rate: float = 0.02  # artefacts: share of images
    debris_rate: float = 0.015
    empty_rate: float = 0.01
    plate_jitter: float = 0.25  # plate effects relative to experiment effects
    edge_effect: float = 0.15
    seed: int = 0

    def replace(self, **kw) -> SyntheticConfig:
        return dataclasses.replace(self, **kw)


PRESETS = {
    # tests: ~250 images of 64x64
    "tiny": SyntheticConfig(),
    # a CPU demo: ~2,600 wells at 128x128 in 6 experiments, dense fields as in real Cell Painting
    "demo": SyntheticConfig(
        n_genes=360,
        complex_gene_fraction=0.85,
        max_complex_size=16,
        exclusive_complexes=True,
        guides_per_gene=2,
        n_compounds=40,
        n_experiments=6,
        replicates=3,
        plate_format=384,
        image_size=128,
        cell_radius=10.0,
        cells_per_image=45.0,
    ),
    # an accelerator-scale run: ~50k wells at 256x256 on 1536-well plates
    "full": SyntheticConfig(
        n_genes=1500,
        guides_per_gene=4,
        n_compounds=400,
        n_experiments=12,
        replicates=6,
        concentrations_nM=(1.0, 10.0, 100.0, 1000.0, 3000.0, 10000.0),
        plate_format=1536,
        image_size=256,
        cell_radius=16.0,
        cells_per_image=28.0,
    ),
}


def preset(name: str, **overrides) -> SyntheticConfig:
    """A named configuration ('tiny', 'demo', 'full') with optional field overrides."""
    if name not in PRESETS:
        raise ConfigError(f"synthetic preset {name!r} unknown; choose one of {', '.join(PRESETS)}")
    try:
        return PRESETS[name].replace(**overrides)
    except TypeError as e:
        raise ConfigError(f"synthetic preset {name!r}: {e}") from None


def build_world_check(cfg: SyntheticConfig) -> None:
    """`ConfigError` (one line naming the field) unless `cfg` describes a world `build_world` can make."""
    _check(cfg)


def _check(cfg: SyntheticConfig) -> None:
    if cfg.plate_format not in PLATE_FORMATS:
        raise ConfigError(f"plate_format {cfg.plate_format} not one of {sorted(PLATE_FORMATS)}")
    if not 0.10 <= cfg.control_fraction < 0.9:
        raise ConfigError(f"control_fraction {cfg.control_fraction} must be in [0.10, 0.9)")
    if not 1 <= cfg.replicates <= cfg.n_experiments:
        raise ConfigError(f"replicates {cfg.replicates} must be in [1, n_experiments={cfg.n_experiments}]")
    if cfg.n_genes < 4 or cfg.guides_per_gene < 1 or cfg.image_size < 16:
        raise ConfigError("n_genes >= 4, guides_per_gene >= 1 and image_size >= 16 are required")
    if not (isinstance(cfg.penetrance, (int, float)) and 0.0 < cfg.penetrance <= 1.0):
        raise ConfigError(f"penetrance {cfg.penetrance!r} must be a number in (0, 1]")
    rates = {k: getattr(cfg, f"{k}_rate") for k in ARTEFACTS[1:]}
    for k, r in rates.items():
        if not (isinstance(r, (int, float)) and 0.0 <= r <= 0.5):
            raise ConfigError(f"{k}_rate {r!r} must be a number in [0, 0.5]")
    if sum(rates.values()) > 0.5:
        raise ConfigError(f"artefact rates sum to {sum(rates.values()):g}; expected at most 0.5")
    if not cfg.cell_radius * 2 < cfg.image_size:
        raise ConfigError(f"cell_radius {cfg.cell_radius} must be below half the image_size {cfg.image_size}")


# ----------------------------------------------------------------------------------------------- biology
def _complexes(max_size: int) -> list[tuple[str, list[str]]]:
    from vitally_jax.annotations import read_clusters

    return [(name, g) for name, g in read_clusters("CORUM") if 3 <= len(g) <= max_size]


@functools.lru_cache(maxsize=1)
def _corum_partners() -> dict[str, frozenset[str]]:
    """Every gene of the bundled CORUM pair table -> the genes it is paired with there."""
    df = pd.read_csv(importlib.resources.files("vitally_jax.annotations").joinpath("CORUM.txt"))
    out: dict[str, set[str]] = {}
    for a, b in zip(df.iloc[:, 0].astype(str), df.iloc[:, 1].astype(str), strict=True):
        if a != b:
            out.setdefault(a, set()).add(b)
            out.setdefault(b, set()).add(a)
    return {k: frozenset(v) for k, v in out.items()}


@functools.lru_cache(maxsize=1)
def _all_symbols() -> list[str]:
    syms: set[str] = set()
    for f in ("CORUM.txt", "Reactome.txt", "SIGNOR.txt"):
        df = pd.read_csv(importlib.resources.files("vitally_jax.annotations").joinpath(f))
        syms.update(df.iloc[:, 0].astype(str))
        syms.update(df.iloc[:, 1].astype(str))
    return sorted(s for s in syms if s.isidentifier() or s.replace("-", "").isalnum())


def make_biology(cfg: SyntheticConfig) -> tuple[pd.DataFrame, np.ndarray, pd.DataFrame]:
    """Genes and their knockout phenotypes.

    Returns (genes table, phenotypes float32 (n_genes, PHENOTYPE_DIM) in table order, world pairs table).
    genes columns: gene, complex, pathway, programs (';'-joined), strength, has_phenotype.
    """
    rng = np.random.default_rng((cfg.seed, 1))
    complexes = _complexes(cfg.max_complex_size)
    if cfg.exclusive_complexes:  # complexes in proportion to size squared: large ones carry most annotated pairs
        size = np.array([len(g) for _, g in complexes], np.float64)
        order = np.argsort(-np.log(rng.random(len(complexes))) / size**2)  # weighted draw without replacement
    else:
        order = rng.permutation(len(complexes))
    want = int(round(cfg.complex_gene_fraction * cfg.n_genes))
    used: set[str] = set()
    linked: set[str] = set()  # CORUM partners of the genes chosen so far (exclusive_complexes)
    partners = _corum_partners() if cfg.exclusive_complexes else {}
    chosen: list[tuple[str, list[str]]] = []
    for i in order:
        name, g = complexes[i]
        if used.intersection(g) or len(used) + len(g) > want or linked.intersection(g):
            continue
        chosen.append((name, g))
        used.update(g)
        for gene in g:
            linked.update(partners.get(gene, ()))
        if len(used) >= want - 2:
            break
    # cached list: do not modify
    others = [s for s in _all_symbols() if s not in used and not (cfg.exclusive_complexes and s in partners)]
    extra = [others[i] for i in rng.choice(len(others), cfg.n_genes - len(used), replace=False)]
    scale = cfg.phenotype_scale * np.sqrt(PHENOTYPE_DIM)

    def direction():
        d = rng.standard_normal(PHENOTYPE_DIM)
        return d / np.linalg.norm(d) * scale

    n_path = max(1, int(np.ceil(len(chosen) / cfg.complexes_per_pathway)))
    path_dirs = [direction() for _ in range(n_path)]
    rows, pheno = [], []
    for k, (name, g) in enumerate(chosen):
        cdir, pw = direction(), k % n_path
        for gene in g:
            rows.append((gene, name, f"pathway_{pw:03d}"))
            pheno.append(cdir + cfg.pathway_strength * path_dirs[pw] + 0.25 * direction())
    for gene in extra:
        rows.append((gene, "", ""))
        pheno.append(direction())
    genes = pd.DataFrame(rows, columns=["gene", "complex", "pathway"])
    genes["programs"] = [";".join(p for p in (c, w) if p) for c, w in zip(genes.complex, genes.pathway)]
    strength = rng.uniform(*cfg.strength_range, len(genes))
    has = rng.random(len(genes)) >= cfg.no_phenotype_fraction
    genes["strength"] = np.where(has, strength, 0.0)
    genes["has_phenotype"] = has
    pheno = (np.asarray(pheno) * genes["strength"].to_numpy()[:, None]).astype(np.float32)

    pairs = []
    complex_of = dict(zip(genes.gene, genes.complex))
    for kind in ("complex", "pathway"):
        for prog, grp in genes[genes[kind] != ""].groupby(kind):
            members = sorted(grp.gene)
            for i in range(len(members)):
                for j in range(i + 1, len(members)):
                    if kind == "pathway" and complex_of[members[i]] == complex_of[members[j]]:
                        continue  # already a complex pair
                    pairs.append((members[i], members[j], prog, kind))
    world = pd.DataFrame(pairs, columns=["gene_a", "gene_b", "program", "kind"])
    hp = dict(zip(genes.gene, genes.has_phenotype))
    world["both_have_phenotype"] = [hp[a] and hp[b] for a, b in zip(world.gene_a, world.gene_b)]
    return genes, pheno, world


def make_compounds(cfg: SyntheticConfig, genes: pd.DataFrame, pheno: np.ndarray):
    """Compounds with 1-3 targets. Returns (targets table compound/gene/concentration nM, list of
    (compound, target row indices, potencies nM, off-target direction))."""
    rng = np.random.default_rng((cfg.seed, 2))
    active = np.flatnonzero(genes.has_phenotype.to_numpy())
    table, comps = [], []
    for k in range(cfg.n_compounds):
        name = f"CPD{k + 1:04d}"
        n_t = int(rng.integers(1, 4))
        tgt = rng.choice(active, min(n_t, len(active)), replace=False)
        potency = 10 ** rng.uniform(0.5, 4.5, len(tgt))  # 3 nM .. 30 uM
        off = rng.standard_normal(PHENOTYPE_DIM) * 0.6
        comps.append((name, tgt, potency, off))
        for t, p in zip(tgt, potency):
            table.append((name, genes.gene.iloc[t], float(p)))
    return pd.DataFrame(table, columns=["compound", "gene", "concentration"]), comps


def compound_phenotype(pheno: np.ndarray, targets, potency, off, conc: float) -> np.ndarray:
    """Phenotype (PHENOTYPE_DIM,) of a compound at `conc` nM: Hill (n=1.5) response of each target's knockout
    phenotype plus an off-target component that appears above ~10 uM."""
    hill = conc**1.5 / (conc**1.5 + potency**1.5)
    z = (hill[:, None] * pheno[targets]).sum(0) / np.sqrt(len(targets))
    return (z + off * conc / (conc + 20000.0)).astype(np.float32)


# ------------------------------------------------------------------------------------------------ layout
def make_layout(cfg: SyntheticConfig, genes: pd.DataFrame, pheno: np.ndarray, comps) -> tuple[pd.DataFrame, np.ndarray]:
    """All wells: (metadata in the store contract, mean phenotype per well float32 (N, PHENOTYPE_DIM))."""
    rng = np.random.default_rng((cfg.seed, 3))
    units = []  # (perturbation, type, guide_id, concentration, phenotype)
    eff = rng.uniform(*cfg.knockout_efficiency_range, (len(genes), cfg.guides_per_gene))
    for gi, gene in enumerate(genes.gene):
        for j in range(cfg.guides_per_gene):
            units.append((gene, "gene", f"{gene}_g{j + 1}", np.nan, eff[gi, j] * pheno[gi]))
    for name, tgt, potency, off in comps:
        for c in cfg.concentrations_nM:
            units.append((name, "compound", "", float(c), compound_phenotype(pheno, tgt, potency, off, c)))
    # replicate r of perturbation p (all its guides / concentrations) goes to experiment (offset_p + r) mod E:
    # replicates never share an experiment, and a perturbation's wells share its experiments' batch effects
    per_exp: list[list[int]] = [[] for _ in range(cfg.n_experiments)]
    names = list(dict.fromkeys(u[0] for u in units))
    offsets = dict(zip(names, rng.permutation(len(names)) % cfg.n_experiments))
    for u, unit in enumerate(units):
        for r in range(cfg.replicates):
            per_exp[(offsets[unit[0]] + r) % cfg.n_experiments].append(u)
    pos_dir = rng.standard_normal(PHENOTYPE_DIM)
    pos_dir = pos_dir / np.linalg.norm(pos_dir) * 2.5 * cfg.phenotype_scale * np.sqrt(PHENOTYPE_DIM)
    n_rows, n_cols = PLATE_FORMATS[cfg.plate_format]
    wells_per_plate = n_rows * n_cols
    n_pos = cfg.positive_controls_per_plate
    n_neg_full = int(np.ceil(cfg.control_fraction * wells_per_plate))
    capacity = wells_per_plate - n_neg_full - n_pos
    if capacity <= 0:
        raise ConfigError(f"plate_format {cfg.plate_format} has no room for perturbations next to the controls")
    records, z = [], []
    for e, members in enumerate(per_exp):
        members = [members[i] for i in rng.permutation(len(members))]
        n_plates = int(np.ceil(len(members) / capacity))
        if cfg.plates_per_experiment is not None:
            if n_plates > cfg.plates_per_experiment:
                raise ConfigError(
                    f"experiment {e} needs {n_plates} plates of {cfg.plate_format} wells, more than "
                    f"plates_per_experiment={cfg.plates_per_experiment}"
                )
            n_plates = cfg.plates_per_experiment
        exp = f"EXP{e + 1:02d}"
        for p, chunk in enumerate(np.array_split(np.asarray(members, int), n_plates)):
            plate = f"{exp}-P{p + 1}"
            n_neg = max(int(np.ceil(cfg.control_fraction / (1 - cfg.control_fraction) * (len(chunk) + n_pos))), 1)
            kinds = [("u", int(u)) for u in chunk] + [("neg", 0)] * n_neg + [("pos", 0)] * n_pos
            wells = rng.choice(wells_per_plate, len(kinds), replace=False)
            for (kind, u), w in sorted(zip(kinds, wells), key=lambda t: t[1]):
                row, col = divmod(int(w), n_cols)
                name = f"{chr(65 + row) if row < 26 else 'A' + chr(65 + row - 26)}{col + 1:02d}"
                if kind == "u":
                    pert, ptype, guide, conc, zz = units[u]
                    rec = (pert, ptype, guide, conc, False, "")
                elif kind == "neg":
                    rec, zz = (NEGATIVE_CONTROL, "control", "", np.nan, True, "negative"), np.zeros(PHENOTYPE_DIM)
                else:
                    rec, zz = ("POSITIVE_CONTROL", "control", "", np.nan, True, "positive"), pos_dir
                records.append((f"{plate}_{name}_s1", f"{plate}_{name}", plate, exp, row + 1, col + 1, 1) + rec)
                z.append(zz)
    return pd.DataFrame(records, columns=list(METADATA_COLUMNS)), np.asarray(z, np.float32)


def make_imaging(cfg: SyntheticConfig, meta: pd.DataFrame) -> Imaging:
    """Batch-effect parameters for every well (experiment effects, smaller plate effects, plate-edge effects)."""
    rng = np.random.default_rng((cfg.seed, 4))
    n_e = cfg.n_experiments
    exp_idx = meta.experiment.str[3:].astype(int).to_numpy() - 1
    plates, plate_idx = np.unique(meta.plate.to_numpy(), return_inverse=True)
    j = cfg.plate_jitter

    def per_exp_plate(sigma, shape=()):
        return (sigma * rng.standard_normal((n_e, *shape)))[exp_idx] + (
            j * sigma * rng.standard_normal((len(plates), *shape))
        )[plate_idx]

    n_rows, n_cols = PLATE_FORMATS[cfg.plate_format]
    edge = (
        ((meta.well_row == 1) | (meta.well_row == n_rows) | (meta.well_col == 1) | (meta.well_col == n_cols))
        .to_numpy()
        .astype(np.float32)
    )
    gain = np.exp(per_exp_plate(cfg.gain_sigma, (6,)) + cfg.edge_effect * edge[:, None])
    offset = np.abs(rng.uniform(0, cfg.offset_max, (n_e, 6))[exp_idx] + per_exp_plate(cfg.offset_max * 0.1, (6,)))
    grad_dir = rng.uniform(0, 2 * np.pi, n_e)[exp_idx]
    grad_mag = rng.uniform(0, cfg.illumination, n_e)[exp_idx]
    gradient = np.stack([np.cos(grad_dir), np.sin(grad_dir)], 1) * grad_mag[:, None]
    vignette = rng.uniform(0, 0.5 * cfg.illumination, n_e)[exp_idx]
    blur = rng.uniform(0, cfg.blur_max, n_e)[exp_idx]
    density = np.exp(per_exp_plate(cfg.density_sigma) - 2 * cfg.edge_effect * edge)
    size = np.exp(per_exp_plate(cfg.size_sigma))
    stain = np.exp(per_exp_plate(cfg.stain_sigma, (6, 2)))  # channel x (nucleus, cytoplasm)
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    return Imaging(
        f32(gain),
        f32(offset),
        f32(gradient),
        f32(vignette),
        f32(blur),
        f32(density),
        f32(size),
        f32(stain),
        make_artefacts(cfg, len(meta)),
    )


def make_artefacts(cfg: SyntheticConfig, n: int) -> np.ndarray:
    """Artefact of each image (index into `ARTEFACTS`), drawn independently of the biology at the configured
    rates."""
    rng = np.random.default_rng((cfg.seed, 6))
    rates = np.array([getattr(cfg, f"{k}_rate") for k in ARTEFACTS[1:]], np.float64)
    probs = np.concatenate([[1.0 - rates.sum()], rates])
    return rng.choice(len(ARTEFACTS), n, p=probs).astype(np.int64)


def well_activations(cfg: SyntheticConfig, z: np.ndarray) -> np.ndarray:
    """The wells' true process activations: the perturbation's phenotype `z` (N, P) plus biological
    well-to-well variation (`well_noise`), deterministic by seed. This is what the renderer draws."""
    rng = np.random.default_rng((cfg.seed, 7))
    return (z + cfg.well_noise * rng.standard_normal(z.shape)).astype(np.float32)


def truth_table(cfg: SyntheticConfig, meta: pd.DataFrame, z: np.ndarray, imaging: Imaging) -> pd.DataFrame:
    """Ground truth per image, aligned with `meta`: image_id, well_id, proc_<name> (true activations, z units,
    no batch effects), artefact."""
    za = well_activations(cfg, z)
    t = pd.DataFrame({"image_id": meta.image_id.to_numpy(), "well_id": meta.well_id.to_numpy()})
    for k, name in enumerate(PROCESSES):
        t[f"proc_{name}"] = za[:, k].astype(np.float64)
    t["artefact"] = np.asarray(ARTEFACTS, dtype=object)[imaging.artefact]
    return t


# --------------------------------------------------------------------------------------------- rendering
def _take(im: Imaging, sl: slice) -> Imaging:
    return Imaging(*(None if (v := getattr(im, f.name)) is None else v[sl] for f in dataclasses.fields(Imaging)))


def render_wells(
    cfg: SyntheticConfig,
    z: np.ndarray,
    imaging: Imaging,
    start: int = 0,
    stop: int | None = None,
    *,
    threads: int | None = None,
):
    """Yield uint8 images (S, S, 6) of wells start..stop-1, in order. `z` is the perturbations' phenotypes
    from `build_world`; the wells' biological variation is added here (`well_activations`).

    Wells are drawn in fixed batches of `_RENDER_BATCH`; batch k uses the generator (seed, 5, k), so a well
    renders identically whatever start/stop/threads. `threads` (default: CPU count, at most 4) render batches
    concurrently; numpy releases the GIL in its array loops.
    """
    from concurrent.futures import ThreadPoolExecutor

    stop = len(z) if stop is None else stop
    za = well_activations(cfg, np.asarray(z, np.float32))
    rend = Renderer(cfg.image_size, cfg.cell_radius, cfg.cells_per_image, seed=cfg.seed, penetrance=cfg.penetrance)
    rend.render(za[:1], _take(imaging, slice(0, 1)), np.random.default_rng(0))  # builds shared buffers once

    def batch(b0: int) -> np.ndarray:
        b1 = min(b0 + _RENDER_BATCH, len(z))
        rng = np.random.default_rng((cfg.seed, 5, b0 // _RENDER_BATCH))
        return rend.render(za[b0:b1], _take(imaging, slice(b0, b1)), rng)

    starts = list(range(start - start % _RENDER_BATCH, stop, _RENDER_BATCH))
    threads = threads or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(threads) as pool:
        pending = [pool.submit(batch, b0) for b0 in starts[: threads + 1]]
        for k, b0 in enumerate(starts):
            imgs = pending.pop(0).result()
            if k + threads + 1 < len(starts):
                pending.append(pool.submit(batch, starts[k + threads + 1]))
            for i in range(max(b0, start), min(b0 + len(imgs), stop)):
                yield imgs[i - b0]


def build_world(cfg: SyntheticConfig):
    """Everything but the pixels: (genes, phenotypes, world pairs, compound targets, metadata, well phenotypes,
    imaging parameters)."""
    _check(cfg)
    genes, pheno, world = make_biology(cfg)
    targets, comps = make_compounds(cfg, genes, pheno)
    meta, z = make_layout(cfg, genes, pheno, comps)
    return genes, pheno, world, targets, meta, z, make_imaging(cfg, meta)


def config_attrs(cfg: SyntheticConfig) -> dict:
    """The world's settings as stored in the store's attrs (JSON types), with the `WORLD_VERSION` of the
    renderer: a store written by another version of the world compares unequal."""
    d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}
    return json.loads(json.dumps({**d, "world_version": WORLD_VERSION}))


def generate_screen(
    path: str | os.PathLike, cfg: SyntheticConfig | str = "tiny", *, overwrite: bool = False
) -> pathlib.Path:
    """Generate a synthetic screen into the store folder `path` (atomically) and return the path.

    Besides the store files, the folder gets genes.parquet, compound_targets.parquet, world_pairs.parquet and
    truth.parquet (`truth_table`: one row per image, in the store's metadata order).
    An image store already at `path` is replaced only with `overwrite=True`; anything else there is refused.
    """
    if isinstance(cfg, str):
        cfg = preset(cfg)
    check_output(path, KIND, overwrite=overwrite)
    genes, _, world, targets, meta, z, imaging = build_world(cfg)
    attrs = {
        "source": "synthetic",
        "generator": "vitally_jax.data.synthetic",
        "config": config_attrs(cfg),
    }
    path = pathlib.Path(path)
    with atomic_path(path, is_dir=True) as tmp:  # store and ground truth appear together or not at all
        write_store(tmp, render_wells(cfg, z, imaging), meta, CHANNEL_NAMES, attrs)
        genes.to_parquet(tmp / "genes.parquet", index=False)
        targets.to_parquet(tmp / "compound_targets.parquet", index=False)
        world.to_parquet(tmp / "world_pairs.parquet", index=False)
        truth_table(cfg, meta, z, imaging).to_parquet(tmp / "truth.parquet", index=False)
    return path


def render_probe(cfg: SyntheticConfig | str, z, *, gain=1.0, n: int = 8, seed: int = 0) -> np.ndarray:
    """n uint8 images (n, S, S, 6) of a control background with process activations `z` ((P,) or (n, P), z
    units, in `PROCESSES` order), fixed batch effects (flat field, constant offset, unit density, size and
    staining, no blur), an optional per-channel `gain` multiplier (scalar or (6,)) and no artefacts. The cells
    show `z` with the world's `penetrance`, as in a screen."""
    if isinstance(cfg, str):
        cfg = preset(cfg)
    _check(cfg)
    z = np.asarray(z, np.float32)
    if z.ndim == 1:
        z = np.broadcast_to(z, (n, z.shape[0]))
    if z.shape != (n, PHENOTYPE_DIM):
        raise ConfigError(f"render_probe z: shape {z.shape}; expected ({PHENOTYPE_DIM},) or ({n}, {PHENOTYPE_DIM})")
    g = np.asarray(gain, np.float32)
    if g.shape not in ((), (len(CHANNEL_NAMES),)) or not np.all(np.isfinite(g)) or np.any(g <= 0):
        raise ConfigError(f"render_probe gain: {gain!r}; expected a positive number or {len(CHANNEL_NAMES)} of them")
    rend = Renderer(cfg.image_size, cfg.cell_radius, cfg.cells_per_image, seed=cfg.seed, penetrance=cfg.penetrance)
    return rend.render(z, neutral_imaging(n, g, offset=cfg.offset_max / 2), np.random.default_rng((cfg.seed, 8, seed)))
