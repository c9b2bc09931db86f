"""Demo stages from pixels to embeddings: screen, curate, pretrain, embed."""

from __future__ import annotations

import json
import pathlib
import time

from vitally_jax.demo.stages import _csv, fresh_dir, log
from vitally_jax.errors import ConfigError
from vitally_jax.fileio import folder_kind, write_marker, write_npy, write_text


# -------------------------------------------------------------------------------------------------- stages
def stage_screen(config, workdir: pathlib.Path) -> dict:
    """Generate the synthetic screen into WORKDIR/screen unless a store is given or already there."""
    from vitally_jax.data.store import ImageStore

    if config.screen.store:
        store = ImageStore.open(config.screen.store)
        log(f"using the existing store {store.path} ({len(store)} images)")
        return {
            "store": str(pathlib.Path(config.screen.store).resolve()),
            "generated": False,
            "images": len(store),
            "shape": list(store.shape),
        }
    from vitally_jax.data import synthetic

    path = workdir / "screen"
    cfg = synthetic_config(config)
    if not (
        (path / "store.json").is_file()
        and (path / "world_pairs.parquet").is_file()
        and ImageStore.open(path).attrs.get("config") == synthetic.config_attrs(cfg)
    ):
        log(f"generating the synthetic screen (preset {config.screen.preset!r}) into {path}")
        synthetic.generate_screen(path, cfg, overwrite=True)  # replaces only a store of its own
    store = ImageStore.open(path)
    meta = store.metadata
    log(
        f"screen: {len(store)} images of {store.shape[1]}x{store.shape[2]}x{store.shape[3]}, "
        f"{meta['perturbation'][~meta['is_control']].nunique()} perturbations, "
        f"{meta['experiment'].nunique()} experiments"
    )
    return {"store": str(path.resolve()), "generated": True, "images": len(store), "shape": list(store.shape)}


def synthetic_config(config):
    """The SyntheticConfig preset named in config.screen.preset with config.screen.overrides, then the declared
    world keys (config.world: seed, image_size, ...), applied; checked (`config_checks.check_world`)."""
    from vitally_jax.config_checks import check_world

    return check_world(config)


def stage_curate(config, workdir: pathlib.Path, store_path: str) -> dict:
    """Image statistics and statistics of the self-standardised crops of every image (also two of the baselines),
    then curation with both as embedding sets of the consistency filter."""
    from vitally_jax.data.store import ImageStore
    from vitally_jax.embedding.image_stats import store_image_statistics

    store = ImageStore.open(store_path)
    t0 = time.perf_counter()
    stats = store_image_statistics(store)
    write_npy(workdir / "features" / "image_stats.npy", stats)
    log(f"image statistics: {stats.shape[1]} features per image in {time.perf_counter() - t0:.1f} s")
    from vitally_jax.demo.baselines import store_crop_statistics

    t0 = time.perf_counter()
    crop_stats = store_crop_statistics(store, int(config.embed.crop))
    write_npy(workdir / "features" / "crop_stats.npy", crop_stats)
    log(f"crop statistics: {crop_stats.shape[1]} features per image in {time.perf_counter() - t0:.1f} s")
    out = {
        "image_stats": str(workdir / "features" / "image_stats.npy"),
        "crop_stats": str(workdir / "features" / "crop_stats.npy"),
        "index": None,
    }
    if not config.curate.enabled:
        return out
    from vitally_jax.curation.core import CurationConfig, curate_store, write_curation

    cc = config.curate
    ccfg = CurationConfig(
        min_experiments=cc.min_experiments,
        min_wells=cc.min_wells,
        keep_positive_controls=cc.keep_positive_controls,
        keep_negative_controls=cc.keep_negative_controls,
        n_permutations=cc.n_permutations,
        alpha=cc.alpha,
        seed=config.seed,
        blank_max_contrast=cc.blank_max_contrast,
        saturated_max_fraction=cc.saturated_max_fraction,
        focus_min_ratio=cc.focus_min_ratio,
        debris_min_cobright=cc.debris_min_cobright,
    )
    # two prior models, as the paper's consistency filter: a perturbation is kept if either finds it consistent
    result = curate_store(store, {"image_stats": stats, "crop_stats": crop_stats}, ccfg, quality=cc.quality)
    index = workdir / "curation" / "curated_index.parquet"
    write_curation(result, index, overwrite=True)  # its own outputs inside the demo workdir
    check = curation_check(store_path, store.metadata, result)
    write_text(index.parent / "quality_check.json", json.dumps(check, indent=1) + "\n")
    out["quality_check"] = str(index.parent / "quality_check.json")
    if "quality_precision" in check:
        log(
            f"  quality filter: removed {check['removed_fraction']:.3f} of images (designed artefact rate "
            f"{check['artefact_rate']:.3f}); precision {check['quality_precision']:.3f}, "
            f"recall {check['quality_recall']:.3f}"
        )
    if "phenotypic_genes_kept" in check:
        log(f"  curation keeps {check['phenotypic_genes_kept']:.3f} of the phenotypic genes")
    steps = result.report["steps"]
    for s in steps:
        log(f"  curation {s['step']:<22} images {s.get('images', ''):>6}  perturbations {s.get('perturbations', '')}")
    out.update(
        index=str(index),
        report=str(index.with_suffix("")) + ".report.json",
        kept_images=int(len(result.index)),
        input_images=len(store),
    )
    return out


def curation_check(store_path: str, meta, result) -> dict:
    """The curation measured against the world's ground truth (where the store has it): the quality filter's
    removed fraction, precision and recall against the artefact labels (truth.parquet), per artefact kind, and
    the fraction of phenotypic genes (genes.parquet strength > 0) the curated index keeps."""
    import pandas as pd

    out: dict = {"input_images": int(len(meta)), "kept_images": int(len(result.index))}
    root = pathlib.Path(store_path)
    flags = result.quality_flags
    if flags is not None:
        removed = flags.to_numpy().any(axis=1)
        out["removed_fraction"] = float(removed.mean())
        out["removed_by_reason"] = {k: int(flags[k].sum()) for k in flags.columns}
        if (root / "truth.parquet").is_file():
            truth = pd.read_parquet(root / "truth.parquet").set_index("image_id").loc[meta["image_id"].to_numpy()]
            art = truth["artefact"].astype(str).to_numpy()
            is_art = art != "none"
            tp = int((removed & is_art).sum())
            out["artefact_rate"] = float(is_art.mean())
            out["quality_precision"] = float(tp / max(int(removed.sum()), 1))
            out["quality_recall"] = float(tp / max(int(is_art.sum()), 1))
            out["recall_by_artefact"] = {k: float(removed[art == k].mean()) for k in sorted(set(art)) if k != "none"}
            out["false_positive_rate"] = float(removed[~is_art].mean()) if (~is_art).any() else 0.0
    if (root / "genes.parquet").is_file():
        g = pd.read_parquet(root / "genes.parquet")
        if {"gene", "strength"} <= set(g.columns):
            pheno = set(g.loc[g["strength"].to_numpy() > 0, "gene"].astype(str))
            kept = set(result.index["perturbation"].astype(str)) & pheno
            out["phenotypic_genes"] = len(pheno)
            out["phenotypic_genes_kept"] = float(len(kept) / max(len(pheno), 1))
            nonpheno = set(g.loc[g["strength"].to_numpy() <= 0, "gene"].astype(str))
            if nonpheno:
                kept_non = set(result.index["perturbation"].astype(str)) & nonpheno
                out["phenotype_free_genes_kept"] = float(len(kept_non) / len(nonpheno))
    return out


def stage_pretrain(config, workdir: pathlib.Path, store_path: str, index: str | None, fp: str) -> dict:
    """Train the small MAE with the trainer; the encoder is exported to WORKDIR/train/encoder."""
    import ml_collections

    from vitally_jax.train import train_and_evaluate

    tcfg = ml_collections.ConfigDict(config.train.to_dict())
    tcfg.job = "train"
    tcfg.seed = config.seed
    tcfg.input.store = store_path
    tcfg.input.synthetic = None
    tcfg.input.index = index
    tcfg.checkpoint.export_encoder = True
    tdir = fresh_dir(workdir / "train", fp)
    if folder_kind(tdir) is None:
        write_marker(tdir, "training workdir", created_by="vitally_jax.demo")
    summary = train_and_evaluate(tcfg, str(tdir))
    if summary.get("stopped", "done") != "done":
        log(
            f"pretraining stopped at step {summary.get('step')} ({summary.get('stopped')}); rerun the same command "
            "to resume it"
        )
        raise KeyboardInterrupt
    enc = tdir / "encoder"
    if not enc.exists():
        raise ConfigError(f"{enc}: the trainer did not export the encoder (train.checkpoint.export_encoder)")
    return {"workdir": str(tdir), "encoder": str(enc), "steps": int(tcfg.total_steps)}


def stage_embed(config, workdir: pathlib.Path, store_path: str, encoder_path: str, fp: str) -> dict:
    """Every block of the trained MAE encoder and of a random-init encoder of the same architecture."""
    from flax import nnx

    from vitally_jax.checkpoint import load_encoder
    from vitally_jax.embedding.screen import embed_screen
    from vitally_jax.models.vit import ViTEncoder

    encoder, cfg, _ = load_encoder(encoder_path)
    random_encoder = ViTEncoder(cfg, rngs=nnx.Rngs(int(config.embed.random_seed)))
    out = {}
    fresh_dir(workdir / "embeddings", fp)
    for name, enc in (("mae", encoder), ("random_init", random_encoder)):
        path = workdir / "embeddings" / name
        t0 = time.perf_counter()
        res = embed_screen(
            enc,
            store_path,
            path,
            pooling=tuple(_csv(config.embed.poolings)),
            crop=int(config.embed.crop),
            batch_size=int(config.embed.batch_size),
            chunk_images=4 * int(config.embed.batch_size),
            progress=True,
        )
        if not res["complete"]:
            raise ConfigError(f"{path}: embedding did not complete")
        log(f"embedded every block of {name} in {time.perf_counter() - t0:.1f} s")
        out[name] = str(path)
    out["depth"] = int(cfg.depth)
    out["width"] = int(cfg.width)
    return out
