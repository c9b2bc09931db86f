"""Vectorised numpy rendering of 6-channel Cell Painting images from per-image process activations.

The biology is written down in `docs/world.md`: `PROCESSES` (20 of them, mostly morphological and spatial) each
have one mechanism here. A batch of images is drawn at once:

1. cell centres per image by sequential rejection (no two closer than one cell radius), all images together;
2. every cell is an irregular ellipse in a small P x P window around its centre; every pixel goes to the cell
   whose ellipse holds it with the smallest normalised radius (a Voronoi-limited mask, no additive overlap);
3. the six channels are evaluated on the pixels each cell owns (nuclei, nucleoli, micronuclei, ER, actin,
   mitochondria, Golgi and vesicles), the membrane and cortical actin on the boundaries of the label image;
4. artefacts (debris, empty fields, out of focus) and the imaging chain per image: illumination field,
   per-channel gain and offset, optical blur, shot and read noise, uint8 quantisation.

Channels (canonical order, see `channels.py`): 0 DNA, 1 ER, 2 actin, 3 RNA, 4 mitochondria, 5 Golgi / plasma
membrane (WGA).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter, gaussian_filter1d

PROCESSES = (
    "cell_density",
    "cell_area",
    "elongation",
    "nuclear_size",
    "nuclear_shape",
    "chromatin_condensation",
    "micronuclei",
    "multinucleation",
    "mitotic_arrest",
    "nucleolar_number",
    "rna_translocation",
    "er_spread",
    "er_texture",
    "stress_fibres",
    "mito_fragmentation",
    "mito_perinuclear",
    "golgi_dispersal",
    "vesicle_puncta",
    "dna_content",
    "mito_abundance",
)
PHENOTYPE_NAMES = PROCESSES  # the name used before the processes were written down
PHENOTYPE_DIM = len(PROCESSES)
N_CHANNELS = 6
ARTEFACTS = ("none", "out_of_focus", "debris", "empty")
_P = {name: i for i, name in enumerate(PROCESSES)}
# base brightness of each channel (0-255 scale before gain) and the background level; chosen so that at +2 sigma
# gain (x2) and full illumination at most 0.5% of a channel's pixels reach 255
_BASE = np.array([48.0, 30.0, 30.0, 34.0, 18.0, 30.0], np.float32)
_BACKGROUND = np.array([4.0, 6.0, 5.0, 5.0, 4.0, 5.0], np.float32)
_MAX_NUCLEOLI = 6


@dataclass(frozen=True)
class Imaging:
    """Per-image acquisition parameters (batch effects), each an array over the B images of a batch.

    gain (B, 6), offset (B, 6) intensity units, gradient (B, 2) relative change across the field (y, x),
    vignette (B,) relative darkening at the corners, blur (B,) extra Gaussian sigma in pixels,
    density (B,) cell-count multiplier, size (B,) cell-size multiplier, stain (B, 6, 2) staining efficiency of
    each channel in the nucleus and in the cytoplasm (None = 1), artefact (B,) index into `ARTEFACTS`
    (None = none).
    """

    gain: np.ndarray
    offset: np.ndarray
    gradient: np.ndarray
    vignette: np.ndarray
    blur: np.ndarray
    density: np.ndarray
    size: np.ndarray
    stain: np.ndarray | None = None
    artefact: np.ndarray | None = None


def neutral_imaging(n: int, gain=1.0, offset: float = 8.0) -> Imaging:
    """Fixed batch effects for n images: gain (scalar or per channel), constant offset, flat field, no blur,
    unit density, size and staining, no artefacts."""
    g = np.broadcast_to(np.asarray(gain, np.float32), (N_CHANNELS,))
    ones = np.ones(n, np.float32)
    return Imaging(
        np.tile(g, (n, 1)).astype(np.float32),
        np.full((n, N_CHANNELS), offset, np.float32),
        np.zeros((n, 2), np.float32),
        np.zeros(n, np.float32),
        np.zeros(n, np.float32),
        ones,
        ones.copy(),
        np.ones((n, N_CHANNELS, 2), np.float32),
        np.zeros(n, np.int64),
    )


def _noise_bank(rng: np.random.Generator, n: int, p: int, sigma: float) -> np.ndarray:
    """n smooth random textures (n, p, p), zero mean and unit std each, periodic (wrap) smoothing."""
    t = gaussian_filter(rng.standard_normal((n, p, p)).astype(np.float32), (0, sigma, sigma), mode="wrap")
    t -= t.mean(axis=(1, 2), keepdims=True)
    t /= t.std(axis=(1, 2), keepdims=True) + 1e-6
    return t


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _profile_norm(length: float, r0: float) -> float:
    """Mean over the unit disk's annulus r0 <= rho <= 1 (area-weighted) of exp(-(rho - r0) / length)."""
    lo = (r0 + length) - np.exp(-(1 - r0) / length) * (1 + length)
    return float(2 * length * lo / (1 - r0 * r0))


_PERI_L, _PERI_R0 = 0.18, 0.4  # the perinuclear profile exp(-(rho - 0.4) / 0.18), mean 1 over the cytoplasm
_PERI_NORM = _profile_norm(_PERI_L, _PERI_R0)


class Renderer:
    """Draws images of size `image_size` with cells of typical radius `cell_radius` pixels.

    `cells_per_image` is the expected count at zero activation and density 1. `penetrance` is the share of cells
    that show the well's phenotype (the others look like control cells; the cell count is a property of the
    well and always responds). Texture banks are fixed by `seed`.
    """

    def __init__(
        self, image_size: int, cell_radius: float, cells_per_image: float, seed: int = 0, penetrance: float = 1.0
    ):
        self.size = int(image_size)
        self.penetrance = float(penetrance)
        self.radius = float(cell_radius)
        self.cells = float(cells_per_image)
        self.p = int(2 * np.ceil(1.7 * cell_radius))  # window side: up to 1.7 radii from the centre
        rng = np.random.default_rng((seed, 990))
        fine = _noise_bank(rng, 64, self.p, max(0.6, cell_radius / 14))
        coarse = _noise_bank(rng, 64, self.p, max(1.2, cell_radius / 5))
        self._fine = fine.reshape(len(fine), -1)
        self._coarse = coarse.reshape(len(coarse), -1)
        # mitochondrial textures, each scaled to mean 1 over the bank: a tubular network (ridges of a smooth
        # field) and puncta (peaks of a fine field)
        tub = np.exp(-np.square(self._coarse / 0.35))
        punct = np.clip(self._fine - 0.6, 0, 1.4)
        self._tubular = (tub / tub.mean()).astype(np.float32)
        self._punct = (punct / punct.mean()).astype(np.float32)
        self.max_cells = int(np.ceil(cells_per_image * 3)) + 8
        self.seed = seed
        self._noise = np.zeros(0, np.float32)

    # ------------------------------------------------------------------------------------------- placement
    def _place(self, want: np.ndarray, spacing: np.ndarray, rng: np.random.Generator):
        """Cell centres per image: candidates in random order, each accepted unless closer than `spacing` (B,)
        to an accepted one, the first `want` (B,) accepted kept. Returns (owner, cy, cx) of the kept cells."""
        b, c, s = len(want), self.max_cells, self.size
        margin = 0.3 * self.radius
        pos = rng.uniform(-margin, s + margin, (b, c, 2)).astype(np.float32)
        d2 = np.square(pos[:, :, None, :] - pos[:, None, :, :]).sum(-1)
        close = d2 < np.square(spacing)[:, None, None]
        acc = np.zeros((b, c), bool)
        for j in range(c):
            acc[:, j] = ~(close[:, j, :j] & acc[:, :j]).any(1)
        keep = acc & (np.cumsum(acc, 1) <= want[:, None])
        owner, slot = np.nonzero(keep)
        return owner, pos[owner, slot, 0], pos[owner, slot, 1]

    # ---------------------------------------------------------------------------------------------- render
    def render(self, z: np.ndarray, imaging: Imaging, rng: np.random.Generator, *, return_labels: bool = False):
        """z float (B, PHENOTYPE_DIM) -> uint8 images (B, S, S, 6) (and, with `return_labels`, int32 cell labels
        (B, S, S): each pixel's owning cell, numbered over the batch, -1 for background)."""
        z = np.clip(np.asarray(z, np.float32), -4.0, 4.0)
        if z.ndim != 2 or z.shape[1] != PHENOTYPE_DIM:
            raise ValueError(f"z: shape {z.shape}; expected (B, {PHENOTYPE_DIM})")
        b, s, p = z.shape[0], self.size, self.p
        art = np.zeros(b, np.int64) if imaging.artefact is None else np.asarray(imaging.artefact)
        stain = np.ones((b, N_CHANNELS, 2), np.float32) if imaging.stain is None else imaging.stain
        # ---- cells per image and their centres ----
        lam = self.cells * imaging.density * np.exp(0.35 * z[:, _P["cell_density"]])
        want = np.minimum(rng.poisson(lam), self.max_cells)
        want[art == ARTEFACTS.index("empty")] = 0
        spacing = self.radius * imaging.size * np.exp(0.18 * z[:, _P["cell_area"]])
        owner, cy, cx = self._place(want, spacing, rng)
        m = owner.size
        zc = z[owner]
        if self.penetrance < 1:
            zc = zc * (rng.random(m) < self.penetrance)[:, None].astype(np.float32)

        def col(name):
            return zc[:, _P[name]]

        def normal(*shape):
            return rng.standard_normal((m, *shape), dtype=np.float32)

        def uniform(lo, hi, *shape):
            return rng.uniform(lo, hi, (m, *shape)).astype(np.float32)

        # ---- per-cell parameters (M cells) ----
        mitotic = rng.random(m) < _sigmoid(1.5 * col("mitotic_arrest") - 3.2)
        r_cell = self.radius * imaging.size[owner] * np.exp(0.18 * col("cell_area") + 0.1 * normal())
        r_cell = np.where(mitotic, 0.7 * r_cell, r_cell)
        elong = np.where(mitotic, 1.0, np.exp(0.25 * col("elongation") + 0.15 * normal() + 0.2))
        a = np.minimum(r_cell * np.sqrt(elong), 0.49 * p)  # semi-axes in pixels
        bax = np.minimum(r_cell / np.sqrt(elong), 0.49 * p)
        theta = uniform(0, np.pi)
        wob, wph = uniform(0, 0.08, 2), uniform(0, 2 * np.pi)
        multi = ~mitotic & (rng.random(m) < _sigmoid(1.5 * col("multinucleation") - 3.0))
        r_nuc = np.sqrt(a * bax) * np.clip(0.5 * np.exp(0.2 * col("nuclear_size") + 0.07 * normal()), 0.22, 0.75)
        r_nuc = np.where(mitotic, 0.75 * r_nuc, np.where(multi, 0.78 * r_nuc, r_nuc))
        irr = _sigmoid(1.3 * col("nuclear_shape") - 1.0)
        nuc_el = np.power(elong, 0.4) * np.exp(0.4 * irr + 0.06 * normal())
        nuc_ax = np.minimum(r_nuc * np.sqrt(nuc_el), 0.8 * a)  # nucleus semi-axes, along / across the cell
        nuc_bx = np.minimum(r_nuc / np.sqrt(nuc_el), 0.8 * bax)
        lobe, lph = 0.25 * irr, uniform(0, 2 * np.pi)
        sep = np.where(multi, 1.2 * nuc_ax, 0.0)  # two nuclei side by side along the cell's axis
        nuc_off = uniform(-0.15, 0.15, 2) * np.maximum(a - nuc_ax - sep, 0)[:, None]
        has_mn = ~mitotic & (rng.random(m) < _sigmoid(1.5 * col("micronuclei") - 2.7))
        mn_dir = uniform(0, 2 * np.pi)
        mn_r = np.maximum(0.35 * r_nuc, 1.2)
        mn_y = nuc_off[:, 0] + (nuc_ax + sep + 1.6 * mn_r) * np.cos(mn_dir)
        mn_x = nuc_off[:, 1] + (nuc_bx + 1.6 * mn_r) * np.sin(mn_dir)
        n_nucleoli = np.where(
            mitotic, 0, np.clip(np.round(2.0 * np.exp(0.5 * col("nucleolar_number")) + 0.5 * normal()), 1, 6)
        )
        nucleolus_sd = 0.3 * r_nuc / np.sqrt(np.maximum(n_nucleoli, 1))
        spot = uniform(-0.55, 0.55, _MAX_NUCLEOLI, 2) * np.stack([nuc_ax, nuc_bx], 1)[:, None, :]
        inten = _BASE * np.exp(0.1 * normal(N_CHANNELS))
        inten[:, 0] *= np.exp(0.25 * col("dna_content")) * np.where(mitotic, 2.2, 1.0)
        inten[:, 4] *= np.exp(0.25 * col("mito_abundance"))
        cond = np.where(mitotic, 0.5, np.clip(0.3 * np.exp(0.5 * col("chromatin_condensation")), 0.03, 1.0))
        rna_nuc = _sigmoid(0.9 * col("rna_translocation") - 0.4)
        er_peri = _sigmoid(-0.9 * col("er_spread"))
        er_tex = np.clip(0.35 * np.exp(0.5 * col("er_texture")), 0.05, 1.2)
        fibre_w = np.where(mitotic, 0.0, _sigmoid(col("stress_fibres") - 0.8))
        mito_frag = _sigmoid(1.1 * col("mito_fragmentation") - 0.5)
        mito_peri = _sigmoid(col("mito_perinuclear") - 0.5)
        golgi_disp = _sigmoid(1.5 * col("golgi_dispersal") - 1.2)
        ves_thr = 2.3 - 0.5 * col("vesicle_puncta")
        gdir = uniform(0, 2 * np.pi)
        golgi_sd = 0.45 * r_nuc
        gy = nuc_off[:, 0] + (nuc_ax + sep + 0.4 * golgi_sd) * np.cos(gdir)
        gx = nuc_off[:, 1] + (nuc_bx + 0.4 * golgi_sd) * np.sin(gdir)
        # the compact Golgi holds as much stain as the dispersed fragments do over the cytoplasm (~0.75 of the cell)
        golgi_peak = 0.75 * a * bax / (2 * np.square(golgi_sd)) * float(np.clip(self._fine - 0.8, 0, None).mean())
        ti = rng.integers(0, len(self._fine), (m, 7))

        # ---- candidate pixels: every window pixel inside its cell's wobbly ellipse ----
        iy0 = np.floor(cy).astype(np.int64) - p // 2
        ix0 = np.floor(cx).astype(np.int64) - p // 2
        grid = np.arange(p, dtype=np.float32)
        u = (iy0[:, None] + grid[None, :] - cy[:, None])[:, :, None]  # (M, P, 1) y offsets
        v = (ix0[:, None] + grid[None, :] - cx[:, None])[:, None, :]  # (M, 1, P) x offsets
        ct, st = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
        along = ct * u + st * v  # major-axis coordinate
        across = ct * v - st * u
        rho0 = np.sqrt((along / a[:, None, None]) ** 2 + (across / bax[:, None, None]) ** 2)
        sel = np.flatnonzero(rho0 < 1.19)  # the wobble changes the radius by at most 16%
        c = sel // (p * p)
        iy = iy0[c] + (sel // p) % p
        ix = ix0[c] + sel % p
        ok = (iy >= 0) & (iy < s) & (ix >= 0) & (ix < s)
        sel, c, iy, ix = sel[ok], c[ok], iy[ok], ix[ok]
        al, ac = along.ravel()[sel], across.ravel()[sel]
        rr = np.sqrt(al * al + ac * ac) + np.float32(1e-3)
        cos1, sin1 = al / rr, ac / rr
        cos2, sin2 = cos1 * cos1 - sin1 * sin1, 2 * sin1 * cos1
        wobble = 1 + (wob[:, 0] * np.cos(wph))[c] * cos2 - (wob[:, 0] * np.sin(wph))[c] * sin2
        wobble += wob[c, 1] * cos1 * (4 * cos1 * cos1 - 3)
        rho_c = rho0.ravel()[sel] / wobble
        inside = rho_c < 1
        sel, c, iy, ix, al, ac, rho_c = (t[inside] for t in (sel, c, iy, ix, al, ac, rho_c))
        # ---- each pixel to the cell with the smallest normalised radius (no additive overlap) ----
        flat = owner[c] * (s * s) + iy * s + ix
        order = np.argsort(flat * 1024 + (rho_c * 1023).astype(np.int64))
        fs = flat[order]
        first = np.ones(len(fs), bool)
        first[1:] = fs[1:] != fs[:-1]
        w = order[first]
        sel, c, flat, al, ac, rho_c = sel[w], c[w], flat[w], al[w], ac[w], rho_c[w]
        win = sel % (p * p)  # position inside the window, for textures
        labels = np.full(b * s * s, -1, np.int32)
        labels[flat] = c
        lab = labels.reshape(b, s, s)
        edge = np.zeros((b, s, s), bool)  # pixels of a cell next to another cell or to the background
        edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
        edge[:, :-1] |= lab[:, :-1] != lab[:, 1:]
        edge[:, :, 1:] |= lab[:, :, 1:] != lab[:, :, :-1]
        edge[:, :, :-1] |= lab[:, :, :-1] != lab[:, :, 1:]
        edge_px = edge.reshape(-1)[flat].astype(np.float32)

        # ---- compartments on the owned pixels (K of them) ----
        cell = np.clip((1 - rho_c) * (bax / 1.2)[c], 0, 1)
        rn = _nucleus_rho(al - nuc_off[c, 0] - sep[c], ac - nuc_off[c, 1], nuc_ax[c], nuc_bx[c], lobe[c], lph[c])
        two = multi[c]
        if two.any():
            rn2 = _nucleus_rho(
                al[two] - nuc_off[c[two], 0] + sep[c[two]],
                ac[two] - nuc_off[c[two], 1],
                nuc_ax[c[two]],
                nuc_bx[c[two]],
                lobe[c[two]],
                lph[c[two]] + 1.0,
            )
            rn[two] = np.minimum(rn[two], rn2)
        nuc = np.clip((1 - rn) * (r_nuc / 0.7)[c], 0, 1)
        d_mn = np.sqrt(np.square(al - mn_y[c]) + np.square(ac - mn_x[c]))
        micro = has_mn[c] * np.clip((1 - d_mn / mn_r[c]) * (mn_r / 0.7)[c], 0, 1) * (1 - nuc)
        cyto = cell * (1 - nuc) * (1 - micro)
        fine = [self._fine[ti[c, k], win] for k in range(4)]
        coarse = self._coarse[ti[c, 4], win]

        # DNA: chromatin texture of amplitude `cond` at a constant mean (E relu(N) = 0.40)
        chrom = np.clip(1 + cond[c] * (2.5 * np.maximum(fine[0], 0) - 1.0), 0.15, None)
        dna = inten[c, 0] * (nuc * chrom * (1.05 - 0.15 * rn) + 1.3 * micro)
        # ER: perinuclear vs flat profile, reticular texture, nuclear envelope
        peri = np.exp(-(rho_c - _PERI_R0) * np.float32(1 / _PERI_L)) * np.float32(1 / _PERI_NORM)
        prof = er_peri[c] * np.minimum(peri, 2.5) + (1 - er_peri[c])
        envelope = np.clip(1 - np.abs(rn - 1) * 5, 0, None)
        er = inten[c, 1] * (cyto * prof * np.clip(1 + er_tex[c] * fine[1], 0, 2.2) + 0.3 * envelope)
        # actin: cortical ring on the cell boundary vs stress fibres along the cell's axis
        fibres = np.square(0.5 + 0.5 * np.cos(ac * np.float32(2 * np.pi / max(2.5, self.radius / 3)) + 2 * coarse))
        fw = fibre_w[c]
        cortex = np.where(mitotic, 2.6, 1.7)[c]
        actin = inten[c, 2] * (cell * (0.3 + 1.4 * fw * fibres) + (1 - fw) * cortex * edge_px)
        # RNA: nucleoli (few large or many small, constant area) and the nuclear / cytoplasmic balance
        nucleoli = np.zeros_like(nuc)
        ins = np.flatnonzero(nuc > 0)
        ci = c[ins]
        du0 = al[ins] - nuc_off[ci, 0]
        nu = du0 - sep[ci] * np.where(du0 >= 0, 1, -1)  # from the centre of the pixel's own nucleus
        nv = ac[ins] - nuc_off[ci, 1]
        inv2 = 1 / (2 * np.square(nucleolus_sd[ci]))
        for j in range(_MAX_NUCLEOLI):
            on = n_nucleoli[ci] > j
            d2 = np.square(nu - spot[ci, j, 0]) + np.square(nv - spot[ci, j, 1])
            nucleoli[ins] += on * np.exp(-d2 * inv2)
        nucleoli = np.minimum(nucleoli, 1.2)
        rq = rna_nuc[c]
        rna = inten[c, 3] * (
            nuc * (0.5 * rq + 1.3 * nucleoli) + cyto * (1 - rq) * 0.8 * np.clip(1 + 0.4 * coarse, 0, None)
        )
        # mitochondria: tubular vs punctate texture, perinuclear vs spread, abundance
        mf = mito_frag[c]
        mtex = (1 - mf) * self._tubular[ti[c, 5], win] + mf * self._punct[ti[c, 6], win]
        mprof = mito_peri[c] * np.minimum(peri, 2.5) + (1 - mito_peri[c])
        mito = inten[c, 4] * cyto * mprof * (0.5 + 0.5 * mtex)
        # Golgi / membrane (WGA): compact juxtanuclear Golgi vs dispersed fragments, vesicles, plasma membrane
        gd = golgi_disp[c]
        blob = golgi_peak[c] * np.exp(
            -(np.square(al - gy[c]) + np.square(ac - gx[c])) * (1 / (2 * np.square(golgi_sd)))[c]
        )
        frag = np.clip(fine[2] - 0.8, 0, None)
        ves = np.clip((fine[3] - ves_thr[c]) * 3.0, 0, 1)
        golgi = inten[c, 5] * (
            cyto * (np.minimum((1 - gd) * blob + gd * frag, 3.0) + 1.4 * ves + 0.08) + 0.9 * edge_px * cell
        )

        # ---- into (B, S, S, 6): one owner per pixel, so assignment, not summation ----
        img = np.zeros((b * s * s, N_CHANNELS), np.float32)
        nuc_w = np.maximum(nuc, micro)
        for k, ch in enumerate((dna, er, actin, rna, mito, golgi)):
            eff = stain[owner[c], k, 0] * nuc_w + stain[owner[c], k, 1] * (1 - nuc_w)
            img[flat, k] = ch * eff
        img = img.reshape(b, s, s, N_CHANNELS)
        for i in np.flatnonzero(art == ARTEFACTS.index("debris")):
            self._debris(img[i], rng)
        out = self._acquire(img, imaging, art, rng)
        return (out, lab) if return_labels else out

    def _debris(self, x: np.ndarray, rng: np.random.Generator) -> None:
        """1-3 bright irregular autofluorescent clumps (all channels) into the float image x (S, S, 6)."""
        s = x.shape[0]
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
        for _ in range(int(rng.integers(1, 4))):
            r = self.radius * rng.uniform(0.6, 1.6)
            y0, x0 = rng.uniform(0, s, 2)
            t = self._coarse[rng.integers(len(self._coarse))].reshape(self.p, self.p)
            ty = np.clip(((yy - y0) / r * 0.3 * self.p + self.p / 2).astype(int), 0, self.p - 1)
            tx = np.clip(((xx - x0) / r * 0.3 * self.p + self.p / 2).astype(int), 0, self.p - 1)
            d = np.sqrt(np.square(yy - y0) + np.square(xx - x0)) / r + 0.35 * t[ty, tx]
            clump = np.clip((1 - d) * r / 1.5, 0, 1)
            x += clump[..., None] * (rng.uniform(0.6, 1.4, N_CHANNELS) * 130.0).astype(np.float32)

    def _acquire(self, img: np.ndarray, im: Imaging, art: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Illumination, gain/offset, blur (defocus; out-of-focus fields much more) and noise, one image at a
        time (cache-sized): float (B, S, S, 6) -> uint8. Noise std = 1.2 + 0.06 * intensity (shot + read
        noise), drawn as random windows of a fixed Gaussian bank."""
        b, s = img.shape[0], img.shape[1]
        n = s * s * N_CHANNELS
        if len(self._noise) < 2 * n:
            self._noise = np.random.default_rng((self.seed, 991)).standard_normal(4 * n, dtype=np.float32)
        starts = rng.integers(0, len(self._noise) - n, b)
        t = (np.arange(s, dtype=np.float32) + 0.5) / s - 0.5
        out = np.empty(img.shape, np.uint8)
        defocus = max(2.5, 0.35 * self.radius)
        for i in range(b):
            field = (
                1
                + im.gradient[i, 0] * t[:, None]
                + im.gradient[i, 1] * t[None, :]
                - 2 * im.vignette[i] * (t[:, None] ** 2 + t[None, :] ** 2)
            )
            g = field[..., None] * im.gain[i]  # (S, S, 6)
            x = img[i]
            x += _BACKGROUND
            x *= g
            x += im.offset[i]
            sd = float(im.blur[i])
            if art[i] == ARTEFACTS.index("out_of_focus"):
                sd = float(np.hypot(sd, defocus))
            if sd >= 0.3:  # optics: defocus differs between batches (none below 0.3 px)
                gaussian_filter1d(x, sd, axis=0, output=x, mode="nearest", truncate=2.5)
                gaussian_filter1d(x, sd, axis=1, output=x, mode="nearest", truncate=2.5)
            noise = self._noise[starts[i] : starts[i] + n].reshape(x.shape)
            g = np.multiply(x, np.float32(0.06), out=g)
            g += np.float32(1.2)
            g *= noise
            x += g
            np.clip(x, 0, 255, out=x)
            np.rint(x, out=x)
            out[i] = x
        return out


def _nucleus_rho(du, dv, ax, bx, lobe, phase):
    """Normalised radius of pixels (du, dv) in a nucleus with semi-axes (ax, bx) and three-fold lobes."""
    q = np.sqrt(np.square(du / ax) + np.square(dv / bx))
    rr = np.sqrt(du * du + dv * dv) + np.float32(1e-3)
    cos1, sin1 = du / rr, dv / rr
    cos3 = cos1 * (4 * cos1 * cos1 - 3)
    sin3 = sin1 * (3 - 4 * sin1 * sin1)
    return q / (1 + lobe * (cos3 * np.cos(phase) - sin3 * np.sin(phase)))


def composite_rgb(images: np.ndarray) -> np.ndarray:
    """uint8 (B, H, W, 6) canonical channels -> uint8 RGB (B, H, W, 3) for viewing: red = actin + Golgi/membrane,
    green = ER + mito, blue = DNA, RNA added faintly to all; each channel stretched to its 99.5% quantile."""
    x = images.astype(np.float32)
    top = np.maximum(np.quantile(x, 0.995, axis=(0, 1, 2)), 1.0)
    x = np.clip(x / top, 0, 1)
    if x.shape[-1] < 6:
        x = np.concatenate([x, np.zeros(x.shape[:-1] + (6 - x.shape[-1],), np.float32)], -1)
    rgb = np.stack([0.6 * x[..., 2] + 0.6 * x[..., 5], 0.6 * x[..., 1] + 0.6 * x[..., 4], x[..., 0]], -1)
    rgb += 0.2 * x[..., 3:4]
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


MONTAGE_KIND = "montage"


def save_montage(images: np.ndarray, path, *, columns: int = 4, labels=None, overwrite: bool = False) -> None:
    """Write a PNG grid of RGB composites of `images` uint8 (B, H, W, C) (at most 64 images).

    An existing file is replaced only with `overwrite=True` and only if it is a montage written here."""
    from PIL import Image, ImageDraw, PngImagePlugin

    from vitally_jax.fileio import TAG, atomic_path, check_output

    check_output(path, MONTAGE_KIND, overwrite=overwrite)

    rgb = composite_rgb(np.asarray(images)[:64])
    b, h, w, _ = rgb.shape
    rows = -(-b // columns)
    grid = np.zeros((rows * (h + 2), columns * (w + 2), 3), np.uint8)
    for i in range(b):
        r, c = divmod(i, columns)
        grid[r * (h + 2) : r * (h + 2) + h, c * (w + 2) : c * (w + 2) + w] = rgb[i]
    im = Image.fromarray(grid)
    if labels is not None:
        draw = ImageDraw.Draw(im)
        for i, text in enumerate(list(labels)[:b]):
            r, c = divmod(i, columns)
            draw.text((c * (w + 2) + 2, r * (h + 2) + 1), str(text), fill=(255, 255, 255))
    info = PngImagePlugin.PngInfo()
    info.add_text(TAG, MONTAGE_KIND)
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG", pnginfo=info)
