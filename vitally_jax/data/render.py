"""Vectorised numpy rendering of 6-channel Cell Painting images from per-image phenotype vectors.

Every cell is an object drawn in a small P x P window around its centre: an irregular ellipse (cell body) with
an off-centre nucleus. All cells of a batch of images are drawn at once as (M, P, P) arrays and scatter-added
into the images with `np.bincount`, then the imaging chain is applied per image: illumination field, per-channel
gain and offset, optical blur, shot and read noise, uint8 quantisation.

Channels (canonical order, see `channels.py`): 0 DNA (nucleus, chromatin texture), 1 ER (perinuclear
reticulum), 2 actin (cortex and stress fibres), 3 RNA (nucleoli and cytoplasmic RNA), 4 mitochondria
(punctate cytoplasmic network), 5 Golgi / plasma membrane (membrane ring and a juxtanuclear Golgi blob).

The phenotype vector z (PHENOTYPE_DIM = 12, one per image, ~N(0, 1) scale) moves, in this order:
nucleus size, cell size, cell count, elongation, DNA, ER, actin, RNA/nucleoli, mito intensity, mito texture,
Golgi compactness and intensity, membrane intensity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter, gaussian_filter1d

PHENOTYPE_NAMES = (
    "nucleus_size",
    "cell_size",
    "cell_count",
    "elongation",
    "dna",
    "er",
    "actin",
    "rna_nucleoli",
    "mito",
    "mito_texture",
    "golgi",
    "membrane",
)
PHENOTYPE_DIM = len(PHENOTYPE_NAMES)
N_CHANNELS = 6
# base brightness of each channel (0-255 scale before gain) and the background level
_BASE = np.array([150.0, 70.0, 70.0, 60.0, 80.0, 70.0], np.float32)
_BACKGROUND = np.array([4.0, 6.0, 5.0, 5.0, 4.0, 5.0], np.float32)


@dataclass(frozen=True)
class Imaging:
    """Per-image acquisition parameters (batch effects), each an array over the B images of a batch.

    gain (B, 6), offset (B, 6) intensity units, gradient (B, 2) relative change across the field (y, x),
    vignette (B,) relative darkening at the corners, blur (B,) extra Gaussian sigma in pixels,
    density (B,) cell-count multiplier, size (B,) cell-size multiplier.
    """

    gain: np.ndarray
    offset: np.ndarray
    gradient: np.ndarray
    vignette: np.ndarray
    blur: np.ndarray
    density: np.ndarray
    size: np.ndarray


def _noise_bank(rng: np.random.Generator, n: int, p: int, sigma: float) -> np.ndarray:
    """n smooth random textures (n, p, p), zero mean and unit std each, periodic (wrap) smoothing."""
    t = gaussian_filter(rng.standard_normal((n, p, p)).astype(np.float32), (0, sigma, sigma), mode="wrap")
    t -= t.mean(axis=(1, 2), keepdims=True)
    t /= t.std(axis=(1, 2), keepdims=True) + 1e-6
    return t


class Renderer:
    """Draws images of size `image_size` with cells of typical radius `cell_radius` pixels.

    `cells_per_image` is the expected count at zero phenotype and density 1. Texture banks are fixed by `seed`.
    """

    def __init__(self, image_size: int, cell_radius: float, cells_per_image: float, seed: int = 0):
        self.size = int(image_size)
        self.radius = float(cell_radius)
        self.cells = float(cells_per_image)
        self.p = int(2 * np.ceil(1.7 * cell_radius))  # window side: up to 1.7 radii from the centre
        rng = np.random.default_rng((seed, 990))
        self.tex_fine = _noise_bank(rng, 64, self.p, max(0.6, cell_radius / 14))
        self.tex_coarse = _noise_bank(rng, 64, self.p, max(1.2, cell_radius / 5))
        self.max_cells = int(np.ceil(cells_per_image * 4)) + 4
        self._fine_flat = self.tex_fine.reshape(len(self.tex_fine), -1)
        self._coarse_flat = self.tex_coarse.reshape(len(self.tex_coarse), -1)
        self.seed = seed
        self._noise = np.zeros(0, np.float32)

    def render(self, z: np.ndarray, imaging: Imaging, rng: np.random.Generator) -> np.ndarray:
        """z float (B, PHENOTYPE_DIM) -> uint8 images (B, S, S, 6)."""
        z = np.clip(np.asarray(z, np.float32), -3.5, 3.5)
        b, s, p = z.shape[0], self.size, self.p
        # ---- cells per image, per-cell parameters (M cells in total) ----
        lam = self.cells * imaging.density * np.exp(0.3 * z[:, 2])
        counts = np.clip(rng.poisson(lam), 1, self.max_cells)
        owner = np.repeat(np.arange(b), counts)
        m = owner.size
        zc = z[owner]  # (M, 12)

        def normal(*shape):
            return rng.standard_normal((m, *shape), dtype=np.float32)

        def uniform(lo, hi, *shape):
            return rng.uniform(lo, hi, (m, *shape)).astype(np.float32)

        r_cell = self.radius * imaging.size[owner] * np.exp(0.16 * zc[:, 1] + 0.12 * normal())
        elong = np.exp(0.22 * zc[:, 3] + 0.2 * normal() + 0.18)
        a = np.minimum(r_cell * np.sqrt(elong), 0.49 * p)  # semi-axes in pixels
        bax = np.minimum(r_cell / np.sqrt(elong), 0.49 * p)
        theta = uniform(0, np.pi)
        wob, wph = uniform(0, 0.08, 2), uniform(0, 2 * np.pi)
        r_nuc = np.minimum(bax, a) * np.clip(0.55 * np.exp(0.18 * zc[:, 0] + 0.08 * normal()), 0.25, 0.85)
        nuc_el = np.exp(0.1 * normal())
        nuc_off = uniform(-0.25, 0.25, 2) * (a - r_nuc)[:, None]
        n_nucleoli = np.clip(np.round(1.6 + 0.8 * zc[:, 7] + 0.6 * normal()), 0, 3)
        spot_pos = uniform(-0.5, 0.5, 3, 2) * r_nuc[:, None, None]
        gdir = uniform(0, 2 * np.pi)
        inten = _BASE * np.exp(0.28 * zc[:, [4, 5, 6, 7, 8, 11]] + 0.12 * normal(6))
        fibre_amp = np.clip(0.5 + 0.25 * zc[:, 6], 0, 1)
        mito_tex = np.clip(0.7 + 0.3 * zc[:, 9], 0.2, 1.6)
        golgi_sd = 0.35 * r_nuc * np.exp(-0.2 * zc[:, 10])
        golgi_amp = np.exp(0.3 * zc[:, 10])
        ti = rng.integers(0, len(self.tex_fine), (m, 3))
        # cell centres: uniform over the field with a margin, so cells may be cut by the border
        cy = rng.uniform(-0.3 * self.radius, s + 0.3 * self.radius, m).astype(np.float32)
        cx = rng.uniform(-0.3 * self.radius, s + 0.3 * self.radius, m).astype(np.float32)

        # ---- window geometry (M, P, P); then keep only pixels that can belong to a cell ----
        iy0 = np.floor(cy).astype(np.int64) - p // 2
        ix0 = np.floor(cx).astype(np.int64) - p // 2
        grid = np.arange(p, dtype=np.float32)
        u = (iy0[:, None] + grid[None, :] - cy[:, None])[:, :, None]  # (M, P, 1) y offsets
        v = (ix0[:, None] + grid[None, :] - cx[:, None])[:, None, :]  # (M, 1, P) x offsets
        ct, st = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
        along = ct * u + st * v  # major-axis coordinate
        across = ct * v - st * u
        rho0 = (along / a[:, None, None]) ** 2 + (across / bax[:, None, None]) ** 2
        sel = np.flatnonzero(rho0 < 1.19**2)  # the wobble changes the radius by at most 16%
        c = sel // (p * p)  # cell of each kept pixel
        iy = iy0[c] + (sel // p) % p
        ix = ix0[c] + sel % p
        ok = (iy >= 0) & (iy < s) & (ix >= 0) & (ix < s)
        sel, c, iy, ix = sel[ok], c[ok], iy[ok], ix[ok]
        al, ac = along.ravel()[sel], across.ravel()[sel]
        rho0 = np.sqrt(rho0.ravel()[sel])
        win = sel % (p * p)  # position inside the window, for textures

        rr = np.sqrt(al * al + ac * ac) + np.float32(1e-3)
        cos1, sin1 = al / rr, ac / rr
        cos2, sin2 = cos1 * cos1 - sin1 * sin1, 2 * sin1 * cos1
        wc, ws = (wob[:, 0] * np.cos(wph))[c], (wob[:, 0] * np.sin(wph))[c]
        wobble = 1 + wc * cos2 - ws * sin2 + wob[c, 1] * cos1 * (4 * cos1 * cos1 - 3)
        rho_c = rho0 / wobble
        cell = np.clip((1 - rho_c) * (bax / 1.5)[c], 0, 1)
        nu, nv = al - nuc_off[c, 0], ac - nuc_off[c, 1]
        rho_n = np.sqrt(np.square(nu * (1 / (r_nuc * nuc_el))[c]) + np.square(nv * (nuc_el / r_nuc)[c]))
        nuc = np.clip((1 - rho_n) * (r_nuc / 1.2)[c], 0, 1)
        cyto = cell * (1 - nuc)
        fine = self._fine_flat[ti[c, 0], win]
        fine2 = self._fine_flat[ti[c, 1], win]
        coarse = self._coarse_flat[ti[c, 2], win]
        inten_c = inten[c]  # (K, 6)

        dna = nuc * inten_c[:, 0] * (0.8 + 0.25 * coarse + 0.1 * fine) * (1.1 - 0.25 * rho_n)
        envelope = np.clip(1 - np.abs(rho_n - 1) * 5, 0, None)  # nuclear envelope (ER is continuous with it)
        er = inten_c[:, 1] * (cyto * (1 - 0.65 * rho_c) * np.clip(1 + 0.7 * fine, 0, None) + 0.25 * envelope)
        ring = np.exp(-np.square((rho_c - 0.9) * np.float32(1 / 0.12)))
        fibres = 0.5 + 0.5 * np.cos(ac * np.float32(2 * np.pi / max(2.5, self.radius / 4)) + 3 * coarse)
        actin = cell * inten_c[:, 2] * (0.25 + 0.7 * ring + (0.6 * fibre_amp)[c] * fibres)
        # nucleoli: up to 3 spots, evaluated on nucleus pixels only; their number grows with z_rna
        ins = np.flatnonzero(nuc > 0)
        ci = c[ins]
        nucleoli = np.zeros_like(nuc)
        inv_var2 = 1 / (2 * np.square(0.18 * r_nuc))
        for j in range(3):
            d2 = np.square(nu[ins] - spot_pos[ci, j, 0]) + np.square(nv[ins] - spot_pos[ci, j, 1])
            nucleoli[ins] += (n_nucleoli > j)[ci] * np.exp(-d2 * inv_var2[ci])
        rna = inten_c[:, 3] * (nuc * (0.2 + 1.1 * nucleoli) + cyto * 0.35 * np.clip(1 + 0.5 * coarse, 0, None))
        mt = mito_tex[c]
        mito = cyto * inten_c[:, 4] * (1 - 0.45 * rho_c) * np.clip(fine2 * mt + 0.5 - 0.3 * mt, 0, None)
        gy = nuc_off[:, 0] + 1.05 * r_nuc * np.cos(gdir)
        gx = nuc_off[:, 1] + 1.05 * r_nuc * np.sin(gdir)
        golgi = np.exp(-(np.square(al - gy[c]) + np.square(ac - gx[c])) * (1 / (2 * np.square(golgi_sd)))[c]) * cyto
        memb = inten_c[:, 5] * (0.8 * ring * cell + (1.2 * golgi_amp)[c] * golgi + 0.1 * cyto)

        # ---- scatter-add into (B, S, S) per channel ----
        flat = owner[c] * (s * s) + iy * s + ix
        img = np.empty((b, s, s, N_CHANNELS), np.float32)
        for k, ch in enumerate((dna, er, actin, rna, mito, memb)):
            img[..., k] = np.bincount(flat, weights=ch, minlength=b * s * s).reshape(b, s, s)
        return self._acquire(img, imaging, rng)

    def _acquire(self, img: np.ndarray, im: Imaging, rng: np.random.Generator) -> np.ndarray:
        """Illumination, gain/offset, blur and noise, one image at a time (cache-sized): float (B, S, S, 6) ->
        uint8. Noise std = 1.2 + 0.06 * intensity (shot + read noise), drawn as random windows of a fixed
        Gaussian bank."""
        b, s = img.shape[0], img.shape[1]
        n = s * s * N_CHANNELS
        if len(self._noise) < 2 * n:
            self._noise = np.random.default_rng((self.seed, 991)).standard_normal(4 * n, dtype=np.float32)
        starts = rng.integers(0, len(self._noise) - n, b)
        t = (np.arange(s, dtype=np.float32) + 0.5) / s - 0.5
        out = np.empty(img.shape, np.uint8)
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
