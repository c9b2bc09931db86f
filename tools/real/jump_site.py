"""One real JUMP Cell Painting site through the image path: fetch and import it, then measure what models read.

  python tools/real/jump_site.py fetch  [--cache DIR] [--store OUT] [--overwrite]
  python tools/real/jump_site.py report [--cache DIR] [--steps 500] [--doc docs/real-data.md]

The site is plate BR00116991, well A01, site 1 of the JUMP pilot (cpg0000, source_4), as shipped in the source
distribution of `deepprofiler==0.5.1` on PyPI: five 1080 x 1080 uint16 TIFFs `r01c01f01p01-ch{1..5}sk1fk1fl1.tiff`
(Phenix channel numbers: ch5 DNA, ch4 ER, ch3 RNA, ch1 AGP, ch2 Mito) and `Nuclei.csv`, CellProfiler's own
measurements of its 109 nuclei. `fetch` runs `pip download --no-deps --no-binary :all: deepprofiler==0.5.1` into
the cache (pip is the only network this uses), extracts that folder, writes a JUMP load_data CSV (channels named
through the channel registry's `phenix-jump` source) and imports it with the JUMP importer (the 16-bit to uint8
rule of `vitally_jax/data/importers.py`) into an image store. The images stay in the cache; they are never part of
the repository.

The cache (default `$VITALLY_JAX_CACHE/jump_site`, else `~/.cache/vitally_jax/jump_site`) is this command's own
folder, marked by `jump_site.json`: a non-empty folder without that marker is refused, never written into.

`report` pretrains a tiny MAE on random crops of the site's left 80% for `--steps` steps (a few minutes on 2 CPU
cores), compares its held-out reconstruction loss on crops of the right 20% with the predict-the-mean baseline and
a random-init MAE, embeds 64 px crops centred on CellProfiler's 109 nuclei at every block in one pass, fits
cross-validated ridge probes to CellProfiler's nuclear measurements, runs this project's CellProfiler baseline
(`vitally_jax.features`) on the site and matches its nuclei to CellProfiler's, and rewrites the `site` section of
docs/real-data.md with figures under docs/real-data/.
Exit codes: 0 ok, 4 bad data, 8 download or write failed, 10 output refused (see vitally_jax/errors.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np

from vitally_jax.metrics import host

PACKAGE = "deepprofiler==0.5.1"
SITE = "tests/data/cpg0000/BR00116991/A01-1"
PLATE, WELL, SITE_NO = "BR00116991", "A01", 1
PHENIX_CHANNELS = ("ch1", "ch2", "ch3", "ch4", "ch5")
TIFF = "r01c01f01p01-{}sk1fk1fl1.tiff"
NUCLEI_CSV = "Nuclei.csv"
SHAPE = (1080, 1080)
CACHE_KIND = "jump site cache"
MARKER = "jump_site.json"
NETWORK_HINTS = (
    "NewConnectionError",
    "Max retries exceeded",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "Could not fetch URL",
    "No matching distribution found",
    "Connection refused",
    "ConnectTimeout",
    "ReadTimeout",
)
REPO = pathlib.Path(__file__).resolve().parents[2]
FIG_DIR = REPO / "docs" / "real-data"
FIG_KIND = "real-data figure"
# CellProfiler's nuclear measurements the probes predict (columns of Nuclei.csv)
TARGETS = (
    "AreaShape_Area",
    "AreaShape_FormFactor",
    "AreaShape_Eccentricity",
    "AreaShape_Solidity",
    "Intensity_MeanIntensity_DNA",
    "Intensity_IntegratedIntensity_DNA",
    "Texture_Contrast_DNA_3_00_256",
    "Texture_AngularSecondMoment_DNA_3_00_256",
)


class NetworkError(Exception):
    """pip could not reach the package index (callers may skip rather than fail)."""


# ------------------------------------------------------------------------------------------------ cache -----
def default_cache() -> pathlib.Path:
    root = os.environ.get("VITALLY_JAX_CACHE")
    base = pathlib.Path(root).expanduser() if root else pathlib.Path.home() / ".cache" / "vitally_jax"
    return base / "jump_site"


def claim_cache(cache: pathlib.Path) -> pathlib.Path:
    """Make `cache` this command's folder (create + mark it), or refuse a folder that someone else owns."""
    from vitally_jax.errors import OutputError
    from vitally_jax.fileio import ARTEFACT_KEY, write_text

    cache = pathlib.Path(cache).expanduser()
    marker = cache / MARKER
    if cache.exists() and not cache.is_dir():
        raise OutputError(f"{cache}: exists and is not a folder; expected a new path or a {CACHE_KIND}")
    if cache.is_dir() and any(cache.iterdir()):
        try:
            doc = json.loads(marker.read_text())
        except (OSError, ValueError):
            doc = None
        if not isinstance(doc, dict) or doc.get(ARTEFACT_KEY) != CACHE_KIND:
            raise OutputError(f"{cache}: exists and is not a {CACHE_KIND} (no {MARKER}); refusing to write into it")
        return cache
    cache.mkdir(parents=True, exist_ok=True)
    write_text(marker, json.dumps({ARTEFACT_KEY: CACHE_KIND, "package": PACKAGE, "site": SITE}, indent=1) + "\n")
    return cache


def _site_complete(site: pathlib.Path) -> bool:
    return all((site / TIFF.format(c)).is_file() for c in PHENIX_CHANNELS) and (site / NUCLEI_CSV).is_file()


def fetch_site(cache: pathlib.Path) -> pathlib.Path:
    """The extracted site folder `cache/site` (downloaded with pip and extracted on first use)."""
    from vitally_jax.errors import DataError, ResourceError
    from vitally_jax.fileio import atomic_path

    cache = claim_cache(cache)
    site = cache / "site"
    if _site_complete(site):
        return site
    with tempfile.TemporaryDirectory(prefix=".download.", dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", PACKAGE, "-d", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            raise NetworkError(f"pip download {PACKAGE}: no answer within 600 s") from None
        if proc.returncode != 0:
            out = proc.stdout + proc.stderr
            last = " ".join(out.strip().splitlines()[-1:]) if out.strip() else f"exit {proc.returncode}"
            if any(h in out for h in NETWORK_HINTS):
                raise NetworkError(f"pip download {PACKAGE}: cannot reach the package index ({last})")
            raise ResourceError(f"pip download {PACKAGE} failed: {last}")
        sdists = sorted(pathlib.Path(tmp).glob("deepprofiler-*.tar.gz"))
        if not sdists:
            raise DataError(f"pip download {PACKAGE}: no source archive in {tmp}")
        names = [TIFF.format(c) for c in PHENIX_CHANNELS] + [NUCLEI_CSV]
        with tarfile.open(sdists[0]) as tar, atomic_path(site, is_dir=True) as out:
            members = {pathlib.PurePosixPath(m.name).name: m for m in tar.getmembers() if SITE in m.name}
            missing = [n for n in names if n not in members or not members[n].isfile()]
            if missing:
                raise DataError(f"{sdists[0].name}: {SITE} lacks {missing}")
            for n in names:
                with tar.extractfile(members[n]) as src, open(out / n, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    return site


def load_data_csv(site: pathlib.Path, path: pathlib.Path) -> pathlib.Path:
    """Write the JUMP load_data CSV of the site (channel names from the registry's `phenix-jump` source)."""
    import pandas as pd

    from vitally_jax.data.channels import SOURCES
    from vitally_jax.fileio import atomic_path

    jump_name = {canon: name for name, canon in SOURCES["jump"].items()}  # canonical -> JUMP load_data name
    row = {
        "Metadata_Source": "source_4",
        "Metadata_Batch": "cpg0000-jump-pilot",
        "Metadata_Plate": PLATE,
        "Metadata_Well": WELL,
        "Metadata_Site": str(SITE_NO),
    }
    for ch in PHENIX_CHANNELS:
        name = jump_name[SOURCES["phenix-jump"][ch]]
        row[f"FileName_Orig{name}"] = TIFF.format(ch)
        row[f"PathName_Orig{name}"] = str(site.resolve())
    with atomic_path(path) as tmp:
        pd.DataFrame([row]).to_csv(tmp, index=False)
    return path


def fetch(cache: pathlib.Path, store: pathlib.Path | None = None, *, overwrite: bool = False) -> pathlib.Path:
    """Download (once), extract and import the site; returns the image store's path (default `cache/store`)."""
    from vitally_jax.data.importers import JUMP_CHANNELS, import_jump
    from vitally_jax.fileio import folder_kind

    site = fetch_site(cache)
    store = pathlib.Path(store) if store is not None else pathlib.Path(cache).expanduser() / "store"
    if folder_kind(store) == "image store" and not overwrite and store.parent == site.parent:
        return store  # the cache's own store, already imported
    csv = load_data_csv(site, site.parent / "load_data.csv")
    return import_jump(csv, store, channels=JUMP_CHANNELS, overwrite=overwrite or store.parent == site.parent)


# ---------------------------------------------------------------------------------------------- report ------
def _load() -> str:
    try:
        one, five, fifteen = os.getloadavg()
        return f"load average {one:.1f} / {five:.1f} / {fifteen:.1f} (1 / 5 / 15 min)"
    except OSError:
        return "load average unknown"


def _savefig(fig, name: str, dpi: int = 80) -> str:
    from vitally_jax.fileio import TAG, atomic_path

    path = FIG_DIR / name
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, metadata={TAG: FIG_KIND})
    return f"real-data/{name}"


def _fig_path_check(names) -> None:
    """Figures are replaced only where they are this command's own (tagged) PNGs."""
    from vitally_jax.fileio import check_output

    for n in names:
        check_output(FIG_DIR / n, FIG_KIND, overwrite=True)


def _crops_at(image: np.ndarray, xy: np.ndarray, size: int) -> np.ndarray:
    """`size` px crops centred on (x, y) points, shifted inside the image where a point is near its edge."""
    h, w = image.shape[:2]
    out = []
    for x, y in xy:
        r0 = int(np.clip(round(y) - size // 2, 0, h - size))
        c0 = int(np.clip(round(x) - size // 2, 0, w - size))
        out.append(image[r0 : r0 + size, c0 : c0 + size])
    return np.stack(out)


def _pretrain(store_path: pathlib.Path, train_img: np.ndarray, workdir: pathlib.Path, steps: int, seed: int):
    from vitally_jax import config_lib, train
    from vitally_jax.data.store import metadata_frame, write_store

    meta = metadata_frame(
        [f"{PLATE}_{WELL}_s{SITE_NO}_train"],
        well_id=f"{PLATE}_{WELL}",
        plate=PLATE,
        experiment="cpg0000",
        well_row=1,
        well_col=1,
        site=SITE_NO,
    )
    train_store = write_store(workdir / "train_store", train_img[None], meta, CHANNELS_CACHE["names"])
    c = config_lib.build(
        dict(
            variant="mu/8",
            total_steps=steps,
            global_batch=32,
            peak_lr=1.5e-3,
            drop_path_rate=0.0,
            mesh=(-1, 1, 1),
            peak_flops=None,
        ),
        None,
    )
    c.seed = seed
    c.model.in_chans = train_img.shape[-1]
    c.model.width, c.model.depth, c.model.num_heads, c.model.mlp_dim = 48, 6, 2, 192
    c.model.init_values = 0.1
    c.model.decoder_depth, c.model.decoder_width, c.model.decoder_heads = 1, 64, 2
    c.optax.name = "adamw"
    c.input.store = str(train_store)
    c.input.crop = 64
    c.input.in_memory = True
    c.checkpoint.every_steps = steps
    c.checkpoint.keep = 1
    c.checkpoint.export_encoder = False
    c.log.every_steps = max(steps // 10, 1)
    c.log.recon_every_steps = None
    c.log.tensorboard = False
    t0 = time.perf_counter()
    res = train.train_and_evaluate(c, workdir / "pretrain")
    return res, c, time.perf_counter() - t0


CHANNELS_CACHE: dict = {}


def _heldout_losses(graphdef, state, mae_cfg, crops: np.ndarray, draws: int = 4) -> dict:
    """Masked reconstruction MSE on held-out crops (self-standardised units) for the model and the mean baseline,
    averaged over `draws` masks; per-crop values for intervals."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from vitally_jax.models.mae import masked_mse
    from vitally_jax.models.preprocess import self_standardize

    n_tok = mae_cfg.encoder.num_patches

    @jax.jit
    def one(state, images, key):
        model = nnx.merge(graphdef, state)
        model = model[0] if isinstance(model, tuple) else model
        x = self_standardize(images)
        noise = jax.random.uniform(key, (x.shape[0], n_tok), jnp.float32)
        out = model(x, noise=noise)
        per = jax.vmap(masked_mse)(out["pred"][:, None], out["target"][:, None], out["mask"][:, None])
        base = jax.vmap(masked_mse)(
            jnp.zeros_like(out["target"])[:, None], out["target"][:, None], out["mask"][:, None]
        )
        return per, base

    per, base = [], []
    for d in range(draws):
        p, b = one(state, jnp.asarray(crops), jax.random.key(1000 + d))
        per.append(np.asarray(p))
        base.append(np.asarray(b))
    return {"model": np.mean(per, 0), "mean": np.mean(base, 0)}


def _standardised_stats(crops: np.ndarray) -> np.ndarray:
    """Statistics of the crops as the encoders see them (self-standardised per crop and channel): per channel the
    1/5/25/50/75/95/99th percentiles and the mean absolute horizontal and vertical differences."""
    import jax.numpy as jnp

    from vitally_jax.models.preprocess import self_standardize

    x = np.asarray(self_standardize(jnp.asarray(crops)), np.float64)
    q = np.percentile(x, [1, 5, 25, 50, 75, 95, 99], axis=(1, 2)).transpose(1, 0, 2).reshape(len(x), -1)
    gy = np.abs(np.diff(x, axis=1)).mean((1, 2))
    gx = np.abs(np.diff(x, axis=2)).mean((1, 2))
    return np.concatenate([q, gy, gx], axis=1)


def _ci_mean(x: np.ndarray, seed: int = 0, n: int = 2000) -> tuple[float, float, float]:
    rng = np.random.default_rng(seed)
    boots = [rng.choice(x, len(x)).mean() for _ in range(n)]
    return float(np.mean(x)), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def _fisher_ci(r: float, n: int) -> tuple[float, float]:
    z, se = np.arctanh(np.clip(r, -0.999999, 0.999999)), 1.0 / np.sqrt(max(n - 3, 1))
    return float(np.tanh(z - 1.96 * se)), float(np.tanh(z + 1.96 * se))


def _ridge_fit_predict(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """Standardised ridge regression with alpha chosen by exact leave-one-out error on the training rows (the
    closed form through the SVD, as RidgeCV's GCV); returns predictions for `xte`."""
    mu, sd = xtr.mean(0), xtr.std(0)
    sd[sd == 0] = 1.0
    a, t = (xtr - mu) / sd, (xte - mu) / sd
    ym = ytr.mean()
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    uty = u.T @ (ytr - ym)
    shrink = s[None] ** 2 / (s[None] ** 2 + alphas[:, None])  # (alphas, k)
    fitted = (u[None] * shrink[:, None, :]) @ uty  # (alphas, n)
    hat = (u[None] ** 2 * shrink[:, None, :]).sum(-1) + 1.0 / len(ytr)  # leverage incl. the intercept
    loo = (((ytr - ym)[None] - fitted) / (1.0 - hat)) ** 2
    best = int(np.argmin(loo.mean(1)))
    coef = vt.T @ (s / (s**2 + alphas[best]) * uty)
    return t @ coef + ym


def _ridge_r2(x: np.ndarray, y: np.ndarray, seeds: int = 5, folds: int = 5) -> np.ndarray:
    """Out-of-fold R² of a standardised ridge probe per seed: (seeds,), each pooled over its `folds` folds."""
    from sklearn.metrics import r2_score
    from sklearn.model_selection import KFold

    alphas = np.logspace(-2, 5, 15)
    out = []
    for s in range(seeds):
        pred = np.zeros_like(y)
        for tr, te in KFold(folds, shuffle=True, random_state=s).split(x):
            pred[te] = _ridge_fit_predict(x[tr], y[tr], x[te], alphas)
        out.append(r2_score(y, pred))
    return np.asarray(out)


def _match(ours: np.ndarray, ref: np.ndarray, radius: float) -> list[tuple[int, int]]:
    """Mutual nearest neighbours between two (n, 2) centre sets, closer than `radius` px."""
    from scipy.spatial import cKDTree

    if len(ours) == 0:
        return []
    d1, i1 = cKDTree(ours).query(ref)
    _, i2 = cKDTree(ref).query(ours)
    return [(int(i1[j]), j) for j in range(len(ref)) if d1[j] < radius and i2[i1[j]] == j]


def report(cache: pathlib.Path, steps: int, seed: int, doc: pathlib.Path | None) -> pathlib.Path:
    import jax
    import matplotlib
    import pandas as pd

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from flax import nnx

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    from _doc import DOC, write_section

    from vitally_jax.data.store import ImageStore
    from vitally_jax.embedding.blocks import embed
    from vitally_jax.embedding.image_stats import image_statistics
    from vitally_jax.features import measure_objects, segment_nuclei
    from vitally_jax.models.layers import unpatchify

    t_start = time.perf_counter()
    started = datetime.datetime.now(datetime.UTC)
    figs = ["site_overview.png", "site_reconstruction.png", "site_probes.png", "site_cellprofiler.png"]
    _fig_path_check(figs)
    store_path = fetch(cache)
    site = pathlib.Path(cache).expanduser() / "site"
    st = ImageStore.open(store_path)
    img = st.read(0)
    names = list(st.channel_names)
    CHANNELS_CACHE["names"] = names
    nuclei = pd.read_csv(site / NUCLEI_CSV)
    xy = nuclei[["AreaShape_Center_X", "AreaShape_Center_Y"]].to_numpy(np.float64)
    load_before = _load()

    # ---- pretraining on the left 80%, held-out crops from the right 20% -----------------------------------
    split = 864
    work = pathlib.Path(tempfile.mkdtemp(prefix=".report.", dir=pathlib.Path(cache).expanduser()))
    try:
        res, cfg, t_train = _pretrain(store_path, img[:, :split], work, steps, seed)
        graphdef, state, mae_cfg = res["graphdef"], res["state"], res["mae_config"]
        model = nnx.merge(graphdef, state)[0]
        m_graph, m_state = nnx.split(model)
        rand_model = type(model)(mae_cfg, rngs=nnx.Rngs(seed + 1))
        r_graph, r_state = nnx.split(rand_model)
        held = np.stack(
            [img[r : r + 64, c : c + 64] for r in range(0, 1080 - 63, 64) for c in range(split, 1080 - 63, 64)]
        )
        loss_tr = _heldout_losses(m_graph, m_state, mae_cfg, held)
        loss_rd = _heldout_losses(r_graph, r_state, mae_cfg, held)
        train_loss = float(res["metrics"].get("loss_rec", np.nan))

        # reconstruction figure: 2 held-out crops, DNA / RNA / AGP channels
        from vitally_jax.models.preprocess import self_standardize

        sel = held[[5, 20]]
        x = self_standardize(jax.numpy.asarray(sel))
        noise = jax.random.uniform(jax.random.key(7), (2, mae_cfg.encoder.num_patches))
        outs = {k: g(x, noise=noise) for k, g in (("pretrained", model), ("random init", rand_model))}
        p = mae_cfg.encoder.patch_size
        grid = (64 // p, 64 // p)
        mask = np.asarray(outs["pretrained"]["mask"]).reshape(2, *grid, 1)
        mask = np.repeat(np.repeat(mask, p, 1), p, 2)
        xs = np.asarray(x)
        show = [names.index(n) for n in ("DNA", "RNA", "Actin") if n in names]
        fig, axes = plt.subplots(2 * len(show), 4, figsize=(6.4, 1.7 * 2 * len(show)), squeeze=False)
        for i in range(2):
            for k, ch in enumerate(show):
                row = i * len(show) + k
                lo, hi = np.percentile(xs[i, ..., ch], [1, 99])
                hidden = mask[i, ..., 0] > 0
                panels = [("original", xs[i, ..., ch]), ("masked", np.where(hidden, np.nan, xs[i, ..., ch]))]
                for name, o in outs.items():
                    rec = np.asarray(unpatchify(o["pred"], p, grid, xs.shape[-1]))[i, ..., ch]
                    panels.append((name, np.where(hidden, rec, xs[i, ..., ch])))
                for j, (title, a) in enumerate(panels):
                    ax = axes[row, j]
                    ax.imshow(a, cmap="gray", vmin=lo, vmax=hi)
                    ax.set_xticks([])
                    ax.set_yticks([])
                    if row == 0:
                        ax.set_title(title, fontsize=8)
                    if j == 0:
                        ax.set_ylabel(f"crop {i + 1} {names[ch]}", fontsize=7)
        fig.tight_layout()
        rec_fig = _savefig(fig, figs[1], dpi=64)
        plt.close(fig)

        # ---- nucleus-centred crops, every block in one pass -----------------------------------------------
        crops = _crops_at(img, xy, 64)
        t0 = time.perf_counter()
        emb_tr = embed(model.encoder, crops, pooling=("mean", "cls_norm"))
        emb_rd = embed(rand_model.encoder, crops, pooling=("mean", "cls_norm"))
        t_embed = time.perf_counter() - t0
        depth = emb_tr["mean"].shape[1]
    finally:
        shutil.rmtree(work, ignore_errors=True)  # our own temporary folder inside the cache

    # ---- ridge probes -------------------------------------------------------------------------------------
    from threadpoolctl import threadpool_limits

    print(f"pretrained {t_train:.0f} s, embedded in {t_embed:.0f} s; probing", flush=True)
    t0 = time.perf_counter()
    stats = image_statistics(crops).astype(np.float64)
    stats_std = _standardised_stats(crops)
    targets = [t for t in TARGETS if t in nuclei.columns]
    rows = []
    limit = threadpool_limits(1)  # thousands of tiny SVDs: threads only contend
    for t in targets:
        y = nuclei[t].to_numpy(np.float64)
        r = _ridge_r2(stats, y)
        rows.append(dict(target=t, source="crop statistics", block=0, pooling="-", r2=r.mean(), sd=r.std()))
        r = _ridge_r2(stats_std, y)
        rows.append(
            dict(target=t, source="standardised crop statistics", block=0, pooling="-", r2=r.mean(), sd=r.std())
        )
        for src, emb in (("pretrained", emb_tr), ("random init", emb_rd)):
            for pool in ("mean", "cls_norm"):
                for b in range(depth):
                    r = _ridge_r2(emb[pool][:, b].astype(np.float64), y)
                    rows.append(dict(target=t, source=src, block=b + 1, pooling=pool, r2=r.mean(), sd=r.std()))
    limit.unregister()
    probes = pd.DataFrame(rows)
    t_probe = time.perf_counter() - t0
    print(f"probes in {t_probe:.0f} s; our CellProfiler baseline", flush=True)

    fig, axes = plt.subplots(2, (len(targets) + 1) // 2, figsize=(11, 4.8), squeeze=False)
    for ax, t in zip(axes.ravel(), targets):
        d = probes[probes.target == t]
        for src, colour in (("pretrained", "C0"), ("random init", "C1")):
            e = d[(d.source == src) & (d.pooling == "mean")]
            ax.errorbar(e.block, e.r2, yerr=e.sd, color=colour, marker="o", ms=3, capsize=2, label=f"{src} (mean)")
        s = d[d.source == "crop statistics"].iloc[0]
        ax.axhline(s.r2, color="k", ls="--", lw=1, label="crop statistics")
        ax.axhspan(s.r2 - s.sd, s.r2 + s.sd, color="k", alpha=0.08)
        s2 = d[d.source == "standardised crop statistics"].iloc[0]
        ax.axhline(s2.r2, color="g", ls=":", lw=1, label="standardised crop statistics")
        ax.set_title(t.replace("_3_00_256", "").replace("AreaShape_", "").replace("Intensity_", ""), fontsize=8)
        ax.set_xlabel("block", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.set_ylim(min(-0.2, float(d.r2.min()) - 0.05), 1.0)
    axes.ravel()[0].set_ylabel("CV R²", fontsize=8)
    axes.ravel()[0].legend(fontsize=6)
    for ax in axes.ravel()[len(targets) :]:
        ax.axis("off")
    fig.tight_layout()
    probe_fig = _savefig(fig, figs[2])
    plt.close(fig)

    # ---- our CellProfiler baseline vs CellProfiler's own nuclei -------------------------------------------
    t0 = time.perf_counter()
    dna = img[..., names.index("DNA")]
    diameter = float(2 * np.sqrt(nuclei.AreaShape_Area.median() / np.pi))
    labels = segment_nuclei(dna, diameter=diameter)
    ours = measure_objects(img, labels, names, features=("sizeshape", "intensity"), channels=["DNA"])
    t_cp = time.perf_counter() - t0
    radius = diameter / 3
    pairs = _match(ours[["AreaShape_Center_X", "AreaShape_Center_Y"]].to_numpy(), xy, radius)
    oi, ri = (np.array([p[k] for p in pairs], int) for k in (0, 1))
    cmp_rows = []
    for col in ("AreaShape_Area", "Intensity_MeanIntensity_DNA", "AreaShape_FormFactor", "AreaShape_Eccentricity"):
        a, b = ours[col].to_numpy()[oi], nuclei[col].to_numpy()[ri]
        r = float(np.corrcoef(a, b)[0, 1])
        lo, hi = _fisher_ci(r, len(pairs))
        cmp_rows.append((col, r, lo, hi, float(np.median(a / b))))
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
    from vitally_jax.data.channels import CANONICAL, conform
    from vitally_jax.data.render import composite_rgb

    rgb = composite_rgb(conform(img[None], names, CANONICAL, fill_missing=True))[0]
    axes[0].imshow(rgb)
    axes[0].contour(labels > 0, levels=[0.5], colors="y", linewidths=0.4)
    axes[0].plot(xy[:, 0], xy[:, 1], "c+", ms=4, mew=0.8, label="CellProfiler nuclei")
    axes[0].set_title(f"our nuclei (yellow outlines, {labels.max()}) vs CellProfiler's ({len(xy)}, +)", fontsize=8)
    axes[0].set_xticks([])
    axes[0].set_yticks([])
    for ax, (col, unit) in zip(axes[1:], (("AreaShape_Area", "px"), ("Intensity_MeanIntensity_DNA", ""))):
        a, b = ours[col].to_numpy()[oi], nuclei[col].to_numpy()[ri]
        ax.scatter(b, a, s=8)
        if col == "AreaShape_Area":  # intensities are on different scales: no identity line there
            lim = [min(a.min(), b.min()), max(a.max(), b.max())]
            ax.plot(lim, lim, "k--", lw=0.8)
        r = next(x for x in cmp_rows if x[0] == col)
        ax.set_title(f"{col.split('_', 1)[1]}: r = {r[1]:.3f} [{r[2]:.3f}, {r[3]:.3f}], n = {len(pairs)}", fontsize=8)
        ax.set_xlabel(f"CellProfiler {unit}".strip(), fontsize=8)
        ax.set_ylabel(f"ours (uint8 store) {unit}".strip(), fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    cp_fig = _savefig(fig, figs[3])
    plt.close(fig)

    # overview: the site's RGB composite with crop boxes and the train / held-out split
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.imshow(rgb)
    ax.axvline(split, color="w", lw=1)
    for x0, y0 in xy:
        ax.add_patch(plt.Rectangle((x0 - 32, y0 - 32), 64, 64, fill=False, ec="y", lw=0.3))
    ax.set_title("BR00116991 A01 site 1: pretraining left of the line, held-out right; nucleus crops", fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    ov_fig = _savefig(fig, figs[0])
    plt.close(fig)

    # ---- the document -------------------------------------------------------------------------------------
    mt, mlo, mhi = _ci_mean(loss_tr["model"])
    rt, rlo, rhi = _ci_mean(loss_rd["model"])
    bt, blo, bhi = _ci_mean(loss_tr["mean"])
    diff = loss_tr["model"] - loss_tr["mean"]
    dt, dlo, dhi = _ci_mean(diff)
    total = time.perf_counter() - t_start

    def best(src):
        d = probes[probes.source == src]
        return d.loc[d.groupby("target").r2.idxmax()].set_index("target")

    btr, brd, bst = best("pretrained"), best("random init"), best("crop statistics")
    bss = best("standardised crop statistics")
    last = probes[(probes.source == "pretrained") & (probes.block == depth) & (probes.pooling == "mean")]
    last = last.set_index("target")
    lines = [
        "## One JUMP site through the image path",
        "",
        f"Regenerate: `python tools/real/jump_site.py report --steps {steps} --seed {seed}` "
        f"(ran {started:%Y-%m-%d %H:%M} UTC on {host()['cpu']}, {host()['cores']} cores; {load_before} at the start; "
        f"{total / 60:.1f} min in all).",
        "",
        "Data: JUMP pilot (cpg0000) plate BR00116991, well A01, site 1, as shipped in the `deepprofiler==0.5.1` "
        "source distribution, fetched and imported by `python tools/real/jump_site.py fetch` (pip download into "
        f"the cache, JUMP load_data CSV, `import_jump`): one image of {st.shape[1]}x{st.shape[2]}, channels "
        f"{', '.join(names)} (Phenix ch5, ch4, ch1, ch3, ch2), uint8 by the importer's per-plate 0.1 / 99.9 "
        f"percentile rule; `Nuclei.csv`: CellProfiler's measurements of {len(nuclei)} nuclei.",
        "",
        f"![site]({ov_fig})",
        "",
        "### A tiny MAE pretrained on the site",
        "",
        f"ViT width 48, depth {depth}, patch {mae_cfg.encoder.patch_size}, 64 px crops, 5 channels, AdamW, "
        f"{res['step']} steps of batch {cfg.input.global_batch} on random crops (flips, 90° turns) of columns "
        f"0-{split - 1}, {t_train:.0f} s. Held-out: the {len(held)} non-overlapping 64 px crops of columns "
        f"{split}-1079, each under 4 random masks (75%); loss = masked MSE in self-standardised units, mean over "
        "crops with a bootstrap 95% interval over crops.",
        "",
        "| model | held-out masked MSE | 95% interval |",
        "|---|---|---|",
        f"| predict the mean (0 = each crop's channel mean) | {bt:.4f} | [{blo:.4f}, {bhi:.4f}] |",
        f"| random-init MAE | {rt:.4f} | [{rlo:.4f}, {rhi:.4f}] |",
        f"| pretrained MAE | {mt:.4f} | [{mlo:.4f}, {mhi:.4f}] |",
        "",
        f"Pretrained minus mean baseline, paired per crop: {dt:+.4f} [{dlo:+.4f}, {dhi:+.4f}]. "
        f"Last logged training loss (reconstruction term): {train_loss:.4f}.",
        "",
        f"![reconstructions]({rec_fig})",
        "",
        "### What the embeddings of CellProfiler's nuclei predict",
        "",
        f"64 px crops centred on the {len(nuclei)} nuclei (`AreaShape_Center_X/Y`; shifted inside the image at the "
        f"edges), embedded at all {depth} blocks in one pass (`vitally_jax.embedding.blocks.embed`, poolings `mean` "
        f"and `cls_norm`, {t_embed:.1f} s for both encoders). Probe: standardise, RidgeCV (alpha 1e-2..1e5), "
        "5-fold CV; R² of the out-of-fold predictions, mean ± SD over 5 fold seeds. Crop statistics: "
        f"`image_statistics` of the same crops ({stats.shape[1]} features). With {len(nuclei)} nuclei, "
        "differences under ~0.1 R² are within the noise of the split. The encoders see each crop self-standardised "
        "per channel (mean 0, SD 1, `models/preprocess.self_standardize`, as the reference models were trained): "
        "a nucleus's absolute brightness is gone before the first block, and only its contrast with the rest of "
        "the crop is left. 'Standardised crop statistics' (percentiles and mean absolute differences of that input, "
        f"{stats_std.shape[1]} features) show what simple statistics still recover from what the encoders see.",
        "",
        "| CellProfiler target | crop statistics | standardised crop statistics | random init, best block | "
        "pretrained, best block | pretrained, last block (mean) |",
        "|---|---|---|---|---|---|",
    ]
    for t in targets:
        s, s2, r, p, lb = bst.loc[t], bss.loc[t], brd.loc[t], btr.loc[t], last.loc[t]
        lines.append(
            f"| `{t}` | {s.r2:.3f} ± {s.sd:.3f} | {s2.r2:.3f} ± {s2.sd:.3f} | "
            f"{r.r2:.3f} ± {r.sd:.3f} (b{int(r.block)} {r.pooling}) | "
            f"{p.r2:.3f} ± {p.sd:.3f} (b{int(p.block)} {p.pooling}) | {lb.r2:.3f} ± {lb.sd:.3f} |"
        )
    n_better = int(sum(btr.loc[t].r2 - btr.loc[t].sd > brd.loc[t].r2 + brd.loc[t].sd for t in targets))
    n_stats = int(sum(btr.loc[t].r2 - btr.loc[t].sd > bst.loc[t].r2 + bst.loc[t].sd for t in targets))
    n_std = int(sum(btr.loc[t].r2 - btr.loc[t].sd > bss.loc[t].r2 + bss.loc[t].sd for t in targets))
    lines += [
        "",
        f"Pretrained beats random init (best block vs best block, beyond one SD of each) on {n_better} of "
        f"{len(targets)} targets, crop statistics on {n_stats} and standardised crop statistics on {n_std}. "
        "The best block is chosen on the same folds it is scored on, so best-block values are optimistic by a "
        "similar amount for both encoders.",
        "",
        f"![probes]({probe_fig})",
        "",
        "### Our CellProfiler baseline against CellProfiler",
        "",
        f"`vitally_jax.features.segment_nuclei` on the store's DNA channel (uint8), nucleus diameter "
        f"{diameter:.1f} px (the equivalent diameter of CellProfiler's median nucleus), then `measure_objects` "
        f"(cp_measure), {t_cp:.1f} s. Matching: mutual nearest centres closer than {radius:.1f} px.",
        "",
        f"- ours: {int(labels.max())} nuclei; CellProfiler: {len(nuclei)}; matched: {len(pairs)} "
        f"(match rate {len(pairs) / len(nuclei):.1%} of CellProfiler's nuclei, {len(pairs) / max(labels.max(), 1):.1%} "
        "of ours).",
        "",
        "| measurement | Pearson r (matched) | 95% interval (Fisher z) | median ratio ours / CellProfiler |",
        "|---|---|---|---|",
    ]
    for col, r, lo, hi, ratio in cmp_rows:
        lines.append(f"| `{col}` | {r:.3f} | [{lo:.3f}, {hi:.3f}] | {ratio:.3f} |")
    lines += [
        "",
        "Intensities differ in scale (ours: the uint8 store in [0, 1]; CellProfiler: the raw 16-bit image in [0, 1]), "
        "so only correlations and ratios are comparable.",
        "",
        f"![cellprofiler]({cp_fig})",
    ]
    target = write_section("site", "\n".join(lines), doc=doc or DOC)
    print(f"{target}: section 'site' rewritten ({total:.0f} s); figures in {FIG_DIR}")
    return target


def main(argv=None) -> int:
    from vitally_jax.errors import ResourceError

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download (once) and import the site into an image store")
    f.add_argument("--cache", default=None, help="this command's own cache folder (default: %(default)s)")
    f.add_argument("--store", default=None, help="image store to write (default: CACHE/store)")
    f.add_argument("--overwrite", action="store_true", help="replace an image store already at --store")
    r = sub.add_parser("report", help="pretrain, probe and compare on the site; rewrite docs/real-data.md 'site'")
    r.add_argument("--cache", default=None)
    r.add_argument("--steps", type=int, default=500, help="pretraining steps (batch 32 of 64 px crops)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--doc", default=None, help="the Markdown file to update (default docs/real-data.md)")
    args = ap.parse_args(argv)
    cache = pathlib.Path(args.cache) if args.cache else default_cache()
    try:
        if args.cmd == "fetch":
            t0 = time.perf_counter()
            path = fetch(cache, args.store, overwrite=args.overwrite)
            from vitally_jax.data.store import ImageStore

            st = ImageStore.open(path)
            print(
                f"{path}: {st.shape[0]} image of {st.shape[1]}x{st.shape[2]}x{st.shape[3]} "
                f"({', '.join(st.channel_names)}) in {time.perf_counter() - t0:.1f} s"
            )
        else:
            report(cache, args.steps, args.seed, pathlib.Path(args.doc) if args.doc else None)
    except NetworkError as e:
        raise ResourceError(str(e)) from None
    return 0


if __name__ == "__main__":
    from vitally_jax.cli import run_cli

    sys.exit(run_cli(main))
