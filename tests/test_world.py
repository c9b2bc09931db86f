"""The world's processes, artefacts, head-room, placement and ground truth (docs/world.md).

Every process is rendered at z = 0 and z = +1.5 (control background, fixed batch effects) and a measurable
named for it in docs/world.md must move in the stated direction by more than 4 standard deviations of that
measurable across independent z = 0 renders."""

import pathlib

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi

from vitally_jax.data import synthetic
from vitally_jax.data.render import ARTEFACTS, Renderer, neutral_imaging
from vitally_jax.data.store import ImageStore
from vitally_jax.errors import ConfigError

CFG = synthetic.preset("demo", image_size=128)  # the demo's cells: radius 10 px, ~45 per field
N = 8  # fields per render
NOISE_SEEDS = 5


class Fields:
    """Segmentation-free measurables of a set of fields, with thresholds fixed by the z = 0 reference."""

    def __init__(self, imgs: np.ndarray, ref: "Fields | None" = None):
        x = imgs.astype(np.float32)
        self.x = x
        dna = ndi.gaussian_filter(x[..., 0], (0, 1.0, 1.0))
        body = ndi.gaussian_filter(x[..., 1] + x[..., 4] + x[..., 5], (0, 1.5, 1.5))
        if ref is None:
            lo = np.percentile(x, 5, axis=(0, 1, 2))
            hi = np.percentile(x, 99, axis=(0, 1, 2))
            self.t = lo + 0.3 * (hi - lo)
            self.t_dna = np.percentile(dna, 5) + 0.3 * (np.percentile(dna, 99) - np.percentile(dna, 5))
            self.t_body = np.percentile(body, 2) + 0.2 * (np.percentile(body, 50) - np.percentile(body, 2))
            self.t_ves = np.percentile(ndi.gaussian_filter(x[..., 5], (0, 0.7, 0.7)), 99)
        else:
            self.t, self.t_dna, self.t_body, self.t_ves = ref.t, ref.t_dna, ref.t_body, ref.t_ves
        self.nuc = dna > self.t_dna
        self.cellmask = (body > self.t_body) | self.nuc
        self.cyto = self.cellmask & ~ndi.binary_dilation(self.nuc, iterations=1, structure=np.ones((1, 3, 3)))
        self.dist = np.stack([ndi.distance_transform_edt(~m) for m in self.nuc])
        self.objs = []  # per field: (area, mean DNA, eccentricity, boundary / sqrt(area)) of each DNA object
        for i in range(len(x)):
            lab, n = ndi.label(self.nuc[i])
            idx = np.arange(1, n + 1)
            yy, xx = np.mgrid[0 : x.shape[1], 0 : x.shape[2]]
            area = ndi.sum(np.ones_like(lab), lab, idx)
            peak = ndi.mean(x[i, ..., 0], lab, idx)
            my, mx = ndi.mean(yy, lab, idx), ndi.mean(xx, lab, idx)
            vyy = ndi.mean(yy * yy, lab, idx) - my**2 + 1 / 12
            vxx = ndi.mean(xx * xx, lab, idx) - mx**2 + 1 / 12
            vxy = ndi.mean(yy * xx, lab, idx) - my * mx
            tr, det = vyy + vxx, vyy * vxx - vxy**2
            l1 = tr / 2 + np.sqrt(np.maximum(tr**2 / 4 - det, 0))
            l2 = np.maximum(tr / 2 - np.sqrt(np.maximum(tr**2 / 4 - det, 0)), 1e-6)
            edge = self.nuc[i] & ~ndi.binary_erosion(self.nuc[i])
            perim = ndi.sum(edge, lab, idx)
            self.objs.append(np.stack([area, peak, np.sqrt(1 - l2 / l1), perim / np.sqrt(area)], 1))
        allobj = np.concatenate(self.objs)
        self.big_area = 0.3 * np.median(allobj[:, 0]) if ref is None else ref.big_area
        self.bright = 1.8 * np.median(x[..., 0][self.nuc]) if ref is None else ref.bright

    def big(self):
        return [o[o[:, 0] >= self.big_area] for o in self.objs]

    def lap(self, k, mask):
        v = self.x[..., k]
        lap = np.abs(4 * v[:, 1:-1, 1:-1] - v[:, :-2, 1:-1] - v[:, 2:, 1:-1] - v[:, 1:-1, :-2] - v[:, 1:-1, 2:])
        m = mask[:, 1:-1, 1:-1]
        return lap[m].mean() / v[:, 1:-1, 1:-1][m].mean()

    def maxima(self, k, mask, thr):
        v = ndi.gaussian_filter(self.x[..., k], (0, 0.7, 0.7))
        peak = (v == ndi.maximum_filter(v, size=(1, 3, 3))) & mask & (v > thr)
        return peak.sum()


def _measurables(f: Fields) -> dict[str, float]:
    big = f.big()
    n_nuc = sum(len(o) for o in big)
    allbig = np.concatenate(big)
    small = sum(int(((o[:, 0] < f.big_area) & (o[:, 0] >= 2)).sum()) for o in f.objs)
    inner = f.nuc & ndi.binary_erosion(f.nuc, structure=np.ones((1, 3, 3)))
    near = f.cyto & (f.dist <= 2)
    far = f.cyto & (f.dist > 3.5)
    x = f.x
    return {
        "cell_density": n_nuc / len(x),
        "cell_area": f.cellmask.sum() / n_nuc,
        "elongation": allbig[:, 2].mean(),
        "nuclear_size": allbig[:, 0].mean(),
        "nuclear_shape": allbig[:, 3].mean(),
        "chromatin_condensation": f.lap(0, inner),
        "micronuclei": small / n_nuc,
        "multinucleation": n_nuc / len(x),
        "mitotic_arrest": (x[..., 0][f.nuc] > f.bright).mean(),
        "nucleolar_number": f.maxima(3, inner, f.t[3]) / n_nuc,
        "rna_translocation": x[..., 3][inner].mean() / x[..., 3][f.cyto].mean(),
        "er_spread": x[..., 1][far].mean() / x[..., 1][near].mean(),
        "er_texture": f.lap(1, f.cyto),
        "stress_fibres": x[..., 2][inner].mean() / x[..., 2][f.cellmask].mean(),
        "mito_fragmentation": f.lap(4, f.cyto),
        "mito_perinuclear": x[..., 4][near].mean() / x[..., 4][far].mean(),
        "golgi_dispersal": f.lap(5, f.cyto),
        "vesicle_puncta": f.maxima(5, f.cyto & (f.dist > 3), f.t_ves) / n_nuc,
        "dna_content": x[..., 0][f.nuc].mean(),
        "mito_abundance": x[..., 4].mean(),
    }


# the direction each measurable moves as its process goes from 0 to +1.5 (docs/world.md)
DIRECTION = {
    "cell_density": +1,
    "cell_area": +1,
    "elongation": +1,
    "nuclear_size": +1,
    "nuclear_shape": +1,
    "chromatin_condensation": +1,
    "micronuclei": +1,
    "multinucleation": +1,
    "mitotic_arrest": +1,
    "nucleolar_number": +1,
    "rna_translocation": +1,
    "er_spread": +1,
    "er_texture": +1,
    "stress_fibres": +1,
    "mito_fragmentation": +1,
    "mito_perinuclear": +1,
    "golgi_dispersal": +1,
    "vesicle_puncta": +1,
    "dna_content": +1,
    "mito_abundance": +1,
}


@pytest.fixture(scope="module")
def reference():
    p = len(synthetic.PROCESSES)
    ref = Fields(synthetic.render_probe(CFG, np.zeros(p), n=N, seed=0))
    noise = [_measurables(Fields(synthetic.render_probe(CFG, np.zeros(p), n=N, seed=s), ref)) for s in range(1, 7)]
    return ref, _measurables(ref), noise


def test_processes_are_documented():
    doc = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "world.md").read_text()
    assert 16 <= len(synthetic.PROCESSES) <= 20 and set(DIRECTION) == set(synthetic.PROCESSES)
    for k, name in enumerate(synthetic.PROCESSES):
        assert f"| {k} | `{name}` |" in doc, name


@pytest.mark.parametrize("name", synthetic.PROCESSES)
def test_each_process_changes_its_measurable(reference, name):
    """z = +1.5 of one process vs z = 0 (same seed): its measurable moves in the documented direction by more
    than 3 SD of that measurable over six independent z = 0 renders (a two-sided 0.3% false-alarm level for a
    process without effect; the noise SD is estimated on 5 degrees of freedom)."""
    ref, m0, noise = reference
    z = np.zeros(len(synthetic.PROCESSES), np.float32)
    z[synthetic.PROCESSES.index(name)] = 1.5
    m1 = _measurables(Fields(synthetic.render_probe(CFG, z, n=N, seed=0), ref))
    sd = np.std([d[name] for d in noise], ddof=1)
    effect = DIRECTION[name] * (m1[name] - m0[name])
    print(f"{name}: {m0[name]:.4f} -> {m1[name]:.4f}, noise SD {sd:.4f}, effect {effect / sd:.1f} SD")
    assert effect > 3 * sd and effect > 0


def test_saturation_at_two_sigma_gain():
    """At +2 sigma gain (x exp(2 gain_sigma)) at most 0.5% of any channel's pixels are 255: control fields and
    fields of typical perturbations (z ~ N(0, 1) per process)."""
    gain = float(np.exp(2 * CFG.gain_sigma))
    z = np.random.default_rng(0).standard_normal((16, len(synthetic.PROCESSES))).astype(np.float32)
    for zz, n in ((np.zeros(len(synthetic.PROCESSES)), 8), (z, 16)):
        imgs = synthetic.render_probe(CFG, zz, gain=gain, n=n, seed=3)
        sat = (imgs == 255).mean(axis=(0, 1, 2))
        print("share at 255 per channel:", np.round(sat, 5))
        assert sat.max() <= 0.005
        assert imgs.mean(axis=(0, 1, 2)).min() > 10  # not dark either


def test_cells_do_not_add_up():
    """Each pixel has one owner: a label image over disjoint cells, and a near-confluent field is no brighter
    than a sparse one (scatter-added overlaps would raise the top quantiles)."""
    r = Renderer(96, 8.0, 60.0, seed=0)
    z = np.zeros((4, len(synthetic.PROCESSES)), np.float32)
    im = neutral_imaging(4)
    dense, lab = r.render(z, im, np.random.default_rng(0), return_labels=True)
    assert lab.shape == (4, 96, 96) and lab.min() == -1
    owned = lab >= 0
    assert owned.mean() > 0.6  # near confluent
    for i in range(4):  # every placed cell owns pixels; ids are per batch, so images do not share cells
        ids = np.unique(lab[i][owned[i]])
        assert len(ids) >= 25 and not set(ids) & set(np.unique(lab[(i + 1) % 4][owned[(i + 1) % 4]]))
    sparse, lab_s = Renderer(96, 8.0, 8.0, seed=0).render(z, im, np.random.default_rng(0), return_labels=True)
    assert 0.05 < (lab_s >= 0).mean() < 0.3
    # the brightest pixels of touching cells are those of isolated ones; DNA, ER, RNA and Mito only: actin
    # and WGA line the cell boundaries, whose share of the pixels grows with confluence
    for k in (0, 1, 3, 4):
        qd, qs = np.percentile(dense[..., k][owned], 99), np.percentile(sparse[..., k][lab_s >= 0], 99)
        print(f"channel {k}: 99th percentile of cell pixels {qd:.0f} (confluent) vs {qs:.0f} (sparse)")
        assert qd <= 1.15 * qs + 3


def test_artefact_rate_and_truth_alignment(tmp_path):
    """The artefacts drawn for a screen match the configured rates (99.9% binomial intervals), and
    truth.parquet is aligned with the store's metadata."""
    cfg = synthetic.preset("tiny", n_genes=300, guides_per_gene=2, n_experiments=4, replicates=2)
    *_, meta, z, imaging = synthetic.build_world(cfg)
    n = len(meta)
    counts = np.bincount(imaging.artefact, minlength=len(ARTEFACTS))
    for k, name in enumerate(ARTEFACTS[1:], 1):
        p = getattr(cfg, f"{name}_rate")
        half = 3.29 * np.sqrt(p * (1 - p) / n) + 1 / n
        print(f"{name}: {counts[k] / n:.4f} (configured {p}, n = {n})")
        assert abs(counts[k] / n - p) <= half
    # the artefacts are in the pixels: empty fields have no nuclei, out-of-focus ones lose fine detail
    idx = {a: np.flatnonzero(imaging.artefact == ARTEFACTS.index(a))[:3] for a in ARTEFACTS}
    imgs = {
        a: np.stack([next(synthetic.render_wells(cfg, z, imaging, int(i), int(i) + 1)) for i in idx[a]])
        for a in ARTEFACTS
    }
    assert imgs["empty"][..., 0].std() < 0.3 * imgs["none"][..., 0].std()

    def sharp(x):  # band-pass (1-3 px) energy of the DNA channel relative to its coarse contrast
        g1 = ndi.gaussian_filter(x[..., 0].astype(np.float32), (0, 1, 1))
        g3 = ndi.gaussian_filter(x[..., 0].astype(np.float32), (0, 3, 3))
        return (g1 - g3).std() / (g3.std() + 1e-6)

    assert sharp(imgs["out_of_focus"]) < 0.6 * sharp(imgs["none"])
    assert (
        imgs["debris"].astype(np.float32).max(axis=(1, 2)).mean()
        > imgs["none"].astype(np.float32).max(axis=(1, 2)).mean()
    )

    small = synthetic.preset("tiny", n_genes=12, n_compounds=2, image_size=32, cell_radius=4.0, n_experiments=2)
    path = synthetic.generate_screen(tmp_path / "s", small)
    meta = ImageStore.open(path).metadata
    truth = pd.read_parquet(path / "truth.parquet")
    assert list(truth.columns) == ["image_id", "well_id", *[f"proc_{p}" for p in synthetic.PROCESSES], "artefact"]
    assert (truth.image_id.to_numpy() == meta.image_id.to_numpy()).all()
    assert (truth.well_id.to_numpy() == meta.well_id.to_numpy()).all()
    assert set(truth.artefact) <= set(ARTEFACTS)
    proc = truth[[f"proc_{p}" for p in synthetic.PROCESSES]].to_numpy()
    neg = (meta.control_type == "negative").to_numpy()
    # controls: only the well-to-well variation; perturbed wells: more
    assert abs(proc[neg].std() - small.well_noise) < 0.25 * small.well_noise
    assert proc[~meta.is_control.to_numpy()].std() > 1.5 * small.well_noise
    for name in ("genes", "compound_targets", "world_pairs"):
        assert (path / f"{name}.parquet").is_file()


def test_determinism_and_probe_inputs():
    a = synthetic.render_probe(CFG.replace(image_size=64), np.ones(len(synthetic.PROCESSES)), n=2, seed=4)
    b = synthetic.render_probe(CFG.replace(image_size=64), np.ones(len(synthetic.PROCESSES)), n=2, seed=4)
    c = synthetic.render_probe(CFG.replace(image_size=64), np.ones(len(synthetic.PROCESSES)), n=2, seed=5)
    assert a.dtype == np.uint8 and a.shape == (2, 64, 64, 6)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    g = synthetic.render_probe(CFG.replace(image_size=64), np.ones(20), gain=[1, 1, 1, 1, 1, 1.4], n=2, seed=4)
    np.testing.assert_array_equal(g[..., :5], a[..., :5])  # the gain of one channel leaves the others alone
    assert g[..., 5].mean() > 1.2 * a[..., 5].mean()
    big = synthetic.render_probe(CFG.replace(image_size=256, cell_radius=16.0, cells_per_image=60), np.zeros(20), n=1)
    assert big.shape == (1, 256, 256, 6)
    with pytest.raises(ConfigError, match="render_probe z: shape"):
        synthetic.render_probe(CFG, np.zeros(3))
    with pytest.raises(ConfigError, match="render_probe gain"):
        synthetic.render_probe(CFG, np.zeros(20), gain=-1.0)
    with pytest.raises(ConfigError, match="debris_rate"):
        synthetic.build_world(synthetic.preset("tiny", debris_rate=0.9))


def test_world_config_keys():
    from vitally_jax import config_lib
    from vitally_jax.config_checks import check_world

    config = config_lib.load("demo", "ci")
    config.world.seed = 7
    config.world.image_size = 96
    cfg = check_world(config)
    assert cfg.seed == 7 and cfg.image_size == 96 and cfg.n_genes == config.world.n_genes
    tiny = synthetic.preset("tiny")
    assert abs(cfg.cells_per_image - tiny.cells_per_image * (96 / tiny.image_size) ** 2) < 1e-9  # same density
    for key, value, message in (
        ("seed", -1, "config.world.seed: -1; expected an integer >= 0"),
        ("image_size", 8, r"config.world.image_size: 8; expected an integer in \[32, 1024\]"),
        ("image_size", 0, "config.world.image_size: 0; expected a positive integer"),
        ("n_genes", 2, "config.world: n_genes >= 4"),
    ):
        bad = config_lib.load("demo", "ci")
        bad.world[key] = value
        with pytest.raises(ConfigError, match=message):
            check_world(bad)
    bad = config_lib.load("demo", "ci")
    bad.world.image_size = 32
    bad.embed.crop = 64
    with pytest.raises(ConfigError, match=r"world.image_size: 32; expected at least config.embed.crop \(64\)"):
        check_world(bad)


def test_staining_efficiency_per_compartment_survives_standardisation():
    """A batch with a weaker nuclear RNA stain (x 0.7) shifts the nuclear / cytoplasmic RNA balance, which a
    per-field standardisation keeps (a gain change of the whole channel would leave it alone)."""
    r = Renderer(128, 10.0, 45.0, seed=0)
    z = np.zeros((N, len(synthetic.PROCESSES)), np.float32)
    base = neutral_imaging(N)
    weak = neutral_imaging(N)
    weak.stain[:, 3, 0] = 0.7
    gain = neutral_imaging(N, gain=[1, 1, 1, 0.7, 1, 1])
    ref = Fields(r.render(z, base, np.random.default_rng(0)))
    m = {
        k: _measurables(Fields(r.render(z, im, np.random.default_rng(0)), ref))["rna_translocation"]
        for k, im in (("base", base), ("weak", weak), ("gain", gain))
    }
    print(m)

    def standardised_ratio(imgs):
        f = Fields(imgs, ref)
        x = (imgs[..., 3] - imgs[..., 3].mean()) / imgs[..., 3].std()
        return x[f.nuc].mean() - x[f.cyto].mean()

    s = {
        k: standardised_ratio(r.render(z, im, np.random.default_rng(0)))
        for k, im in (("base", base), ("weak", weak), ("gain", gain))
    }
    print(s)
    assert m["weak"] < 0.85 * m["base"]
    assert abs(s["gain"] - s["base"]) < 0.25 * abs(s["weak"] - s["base"])


def test_demo_world_plants_every_corum_pair():
    """With exclusive_complexes (the demo preset) every CORUM pair among the screened genes joins two genes of one
    planted complex, and the default seed screens enough pairs for a +-0.03 recall interval; the tiny preset keeps
    the uniform, non-exclusive draw."""
    from vitally_jax.benchmarks.annotations import load_relationships, relationship_index_pairs

    rels = load_relationships("CORUM")
    cfg = synthetic.preset("demo")
    assert cfg.exclusive_complexes and not synthetic.preset("tiny").exclusive_complexes
    genes, _, world = synthetic.make_biology(cfg)
    assert len(genes) == cfg.n_genes == 360
    labels = genes["gene"].to_numpy()
    pairs = relationship_index_pairs(rels, labels)
    cplx = genes["complex"].to_numpy()
    assert len(pairs) >= 1100  # 1.96 * sqrt(0.25 / 1100) = 0.030
    assert all(cplx[i] != "" and cplx[i] == cplx[j] for i, j in pairs)
    planted = world[world["kind"] == "complex"]
    # and nearly every planted pair is a CORUM pair (the clusters table holds a few pairs the pair table lacks)
    assert len(pairs) <= len(planted) <= 1.01 * len(pairs)
    frac = (genes["complex"] != "").mean()
    assert abs(frac - cfg.complex_gene_fraction) < 0.02
    # without the rule, CORUM links genes of different planted complexes (what the rule removes)
    g2, _, _ = synthetic.make_biology(cfg.replace(exclusive_complexes=False))
    c2 = g2["complex"].to_numpy()
    p2 = relationship_index_pairs(rels, g2["gene"].to_numpy())
    assert sum(c2[i] == "" or c2[i] != c2[j] for i, j in p2) > 50
