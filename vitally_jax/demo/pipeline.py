"""The embedded default: one command from pixels to a scored map.

    python -m vitally_jax.main --config=configs/demo.py            # ~10-15 min on a 2-core laptop CPU
    python -m vitally_jax.main --config=configs/demo.py:ci         # shrunken, ~2-3 min

Stages (each prints progress and its wall time, writes its outputs atomically and then a done-marker under
`<workdir>/stages/`, so a rerun reuses finished stages; a stage whose config changed is rerun, and so is
everything after it):

  screen      generate the synthetic Cell Painting screen (if absent)
  curate      Phenoprints-style curation of the training set (image-statistics embeddings)
  pretrain    a small MAE on the curated crops
  embed       every block of the trained MAE and of a random-init ViT of the same size; image statistics
  probe       linear-probe sweep over blocks -> b*
  maps        maps per model (MAE at b*, MAE last block, random-init ViT, image statistics) and alignment
              (unaligned, PCA-center-scale, TVN)
  benchmarks  recall per annotation source, replicate consistency, compound-gene activity, mAP
  report      report.html (self-contained), results.json, results.csv
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import time
from typing import Any, Callable

from vitally_jax.errors import ConfigError, OutputError
from vitally_jax.fileio import check_output, folder_kind, write_marker, write_npy, write_parquet, write_text

STAGES = ("screen", "curate", "pretrain", "embed", "probe", "maps", "benchmarks", "report")


def log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------ stage machinery
@dataclasses.dataclass
class StageRecord:
    """What a finished stage leaves behind in `<workdir>/stages/<name>.json`."""

    name: str
    fingerprint: str
    seconds: float
    outputs: dict[str, Any]
    reused: bool = False


def fingerprint(section: Any, upstream: str = "") -> str:
    """Stable short hash of a config section (anything JSON-serialisable) and the upstream fingerprint."""
    blob = json.dumps(section, sort_keys=True, default=str) + "|" + upstream
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class StageRunner:
    """Runs named stages in order, reusing those whose done-marker matches their fingerprint.

    A stage function takes no arguments and returns a JSON-serialisable dict of outputs (paths as strings,
    small numbers); it must write its own files atomically. The marker is written only after it returns.
    """

    def __init__(self, workdir: str | os.PathLike, *, force: tuple[str, ...] = ()):
        self.workdir = pathlib.Path(workdir)
        self.marker_dir = self.workdir / "stages"
        self.records: dict[str, StageRecord] = {}
        self.force = set(force)
        self._upstream = ""
        self._invalidated = False
        self.current_fingerprint = ""  # of the stage being run (for `fresh_dir`)

    def marker(self, name: str) -> pathlib.Path:
        return self.marker_dir / f"{name}.json"

    def run(self, name: str, section: Any, fn: Callable[[], dict]) -> dict:
        fp = fingerprint(section, self._upstream)
        self._upstream = fp
        n = len(self.records) + 1
        marker = self.marker(name)
        if marker.exists() and not self._invalidated and name not in self.force:
            rec = json.loads(marker.read_text())
            if rec.get("fingerprint") == fp:
                r = StageRecord(name, fp, float(rec["seconds"]), rec["outputs"], reused=True)
                self.records[name] = r
                log(f"stage {n} {name}: reused (finished earlier in {r.seconds:.1f} s)")
                return r.outputs
            log(f"stage {n} {name}: configuration changed; rerunning it and every later stage")
        self._invalidated = True  # everything after a rerun stage is rerun too
        log(f"stage {n} {name}: running")
        self.current_fingerprint = fp
        t0 = time.perf_counter()
        outputs = fn() or {}
        dt = time.perf_counter() - t0
        write_text(marker, json.dumps({"name": name, "fingerprint": fp, "seconds": dt, "outputs": outputs},
                                      indent=2, default=str) + "\n")
        self.records[name] = StageRecord(name, fp, dt, outputs)
        log(f"stage {n} {name}: done in {dt:.1f} s")
        return outputs

    def times(self):
        """DataFrame stage, seconds, reused (seconds are those of the run that produced the outputs)."""
        import pandas as pd

        return pd.DataFrame([{"stage": r.name, "seconds": r.seconds, "reused": r.reused}
                             for r in self.records.values()])


def fresh_dir(path: pathlib.Path, fp: str) -> pathlib.Path:
    """A working folder for a stage that resumes itself (training, embedding): kept when it was started with the
    same fingerprint (an interrupted run resumes), emptied when it belongs to another configuration."""
    import shutil

    tag = path / ".demo_fingerprint"
    if path.exists() and not (tag.is_file() and tag.read_text().strip() == fp):
        if not tag.is_file() and any(path.iterdir()):  # not a stage folder of the demo: not ours to empty
            raise OutputError(f"{path}: exists and is not a demo stage folder (no .demo_fingerprint); "
                              "refusing to touch it (move it away or choose another workdir)")
        log(f"  {path} holds outputs of another configuration; starting it afresh")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    if not tag.is_file():
        write_text(tag, fp + "\n")
    return path


# ------------------------------------------------------------------------------------------------- helpers
def _csv(s: str) -> list[str]:
    return [p.strip() for p in str(s or "").split(",") if p.strip()]


def _section(config, name: str) -> dict:
    sec = getattr(config, name)
    return sec.to_dict() if hasattr(sec, "to_dict") else dict(sec)


# -------------------------------------------------------------------------------------------------- stages
def stage_screen(config, workdir: pathlib.Path) -> dict:
    """Generate the synthetic screen into WORKDIR/screen unless a store is given or already there."""
    from vitally_jax.data.store import ImageStore

    if config.screen.store:
        store = ImageStore.open(config.screen.store)
        log(f"using the existing store {store.path} ({len(store)} images)")
        return {"store": str(pathlib.Path(config.screen.store).resolve()), "generated": False,
                "images": len(store), "shape": list(store.shape)}
    from vitally_jax.data import synthetic

    path = workdir / "screen"
    cfg = synthetic_config(config)
    if not ((path / "store.json").is_file() and (path / "world_pairs.parquet").is_file()
            and ImageStore.open(path).attrs.get("config") == synthetic.config_attrs(cfg)):
        log(f"generating the synthetic screen (preset {config.screen.preset!r}) into {path}")
        synthetic.generate_screen(path, cfg, overwrite=True)  # replaces only a store of its own
    store = ImageStore.open(path)
    meta = store.metadata
    log(f"screen: {len(store)} images of {store.shape[1]}x{store.shape[2]}x{store.shape[3]}, "
        f"{meta['perturbation'][~meta['is_control']].nunique()} perturbations, "
        f"{meta['experiment'].nunique()} experiments")
    return {"store": str(path.resolve()), "generated": True, "images": len(store), "shape": list(store.shape)}


def synthetic_config(config):
    """The SyntheticConfig preset named in config.screen.preset with config.screen.overrides applied."""
    from vitally_jax.data import synthetic

    ov = config.screen.overrides
    overrides = ov.to_dict() if hasattr(ov, "to_dict") else dict(ov or {})
    overrides = {k: (tuple(v) if isinstance(v, list) else v) for k, v in overrides.items()}
    return synthetic.preset(config.screen.preset, **overrides)


def stage_curate(config, workdir: pathlib.Path, store_path: str) -> dict:
    """Image-statistics features of every image (also the image-statistics baseline), then curation."""
    from vitally_jax.data.store import ImageStore
    from vitally_jax.image_stats import store_image_statistics

    store = ImageStore.open(store_path)
    t0 = time.perf_counter()
    stats = store_image_statistics(store)
    write_npy(workdir / "features" / "image_stats.npy", stats)
    log(f"image statistics: {stats.shape[1]} features per image in {time.perf_counter() - t0:.1f} s")
    out = {"image_stats": str(workdir / "features" / "image_stats.npy"), "index": None}
    if not config.curate.enabled:
        return out
    from vitally_jax.curation import CurationConfig, curate_store, write_curation

    cc = config.curate
    ccfg = CurationConfig(min_experiments=cc.min_experiments, min_wells=cc.min_wells,
                          keep_positive_controls=cc.keep_positive_controls,
                          keep_negative_controls=cc.keep_negative_controls, n_permutations=cc.n_permutations,
                          alpha=cc.alpha, seed=config.seed)
    result = curate_store(store, {"image_stats": stats}, ccfg, quality=cc.quality)
    index = workdir / "curation" / "curated_index.parquet"
    write_curation(result, index, overwrite=True)  # its own outputs inside the demo workdir
    steps = result.report["steps"]
    for s in steps:
        log(f"  curation {s['step']:<22} images {s.get('images', ''):>6}  perturbations {s.get('perturbations', '')}")
    out.update(index=str(index), report=str(index.with_suffix("")) + ".report.json",
               kept_images=int(len(result.index)), input_images=len(store))
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
        log(f"pretraining stopped at step {summary.get('step')} ({summary.get('stopped')}); rerun the same command "
            "to resume it")
        raise KeyboardInterrupt
    enc = tdir / "encoder"
    if not enc.exists():
        raise ConfigError(f"{enc}: the trainer did not export the encoder (train.checkpoint.export_encoder)")
    return {"workdir": str(tdir), "encoder": str(enc), "steps": int(tcfg.total_steps)}


def stage_embed(config, workdir: pathlib.Path, store_path: str, encoder_path: str, fp: str) -> dict:
    """Every block of the trained MAE encoder and of a random-init encoder of the same architecture."""
    from flax import nnx

    from vitally_jax.checkpoint import load_encoder
    from vitally_jax.embed_screen import embed_screen
    from vitally_jax.models.vit import ViTEncoder

    encoder, cfg = load_encoder(encoder_path)
    random_encoder = ViTEncoder(cfg, rngs=nnx.Rngs(int(config.embed.random_seed)))
    out = {}
    fresh_dir(workdir / "embeddings", fp)
    for name, enc in (("mae", encoder), ("random_init", random_encoder)):
        path = workdir / "embeddings" / name
        t0 = time.perf_counter()
        res = embed_screen(enc, store_path, path, pooling=tuple(_csv(config.embed.poolings)),
                           crop=int(config.embed.crop),
                           batch_size=int(config.embed.batch_size), chunk_images=4 * int(config.embed.batch_size),
                           progress=True)
        if not res["complete"]:
            raise ConfigError(f"{path}: embedding did not complete")
        log(f"embedded every block of {name} in {time.perf_counter() - t0:.1f} s")
        out[name] = str(path)
    out["depth"] = int(cfg.depth)
    out["width"] = int(cfg.width)
    return out


def well_table(store_path: str, features_by_model: dict) -> tuple[dict, "pd.DataFrame"]:
    """Per-image features {name: (nb, images, D)} -> per-well features {name: (nb, wells, D)} and well metadata."""
    from vitally_jax.data.store import ImageStore
    from vitally_jax.embed_screen import well_features

    meta = ImageStore.open(store_path).metadata
    out, wells = {}, None
    for name, f in features_by_model.items():
        out[name], wells = well_features(f, meta)
    return out, wells


def load_features(workdir: pathlib.Path, outputs: dict, pooling: str) -> dict:
    """{model: (blocks, features (nb, images, D))} for the MAE, the random-init encoder and image statistics."""
    import numpy as np

    from vitally_jax.embed_screen import EmbeddingStore

    feats = {}
    for name in ("mae", "random_init"):
        es = EmbeddingStore.open(outputs["embed"][name])
        feats[name] = (es.blocks, es.features(pooling))
    stats = np.load(outputs["curate"]["image_stats"]).astype(np.float32)
    feats["image_stats"] = ([0], stats[None])
    return feats


_SOURCE_NAMES = {"mae": "model", "random_init": "random_init", "image_stats": "image_stats"}  # store -> sweep


def _probe_table(config, outputs: dict, pooling: str, *, sources=("mae", "random_init", "image_stats")):
    """The probe sweep table of the named feature sources (both encoders, the image-statistics baseline) with one
    pooling. Sources are probed independently, so tables of disjoint sources concatenate (`_merge_tables`)."""
    from vitally_jax import probe_sweep
    from vitally_jax.linear_probe import make_probe

    feats = {k: v for k, v in load_features(None, outputs, pooling).items() if k in sources}
    wells_f, wells = well_table(outputs["screen"]["store"], {k: v[1] for k, v in feats.items()})
    by_name = {_SOURCE_NAMES[k]: (wells_f[k], list(v[0])) for k, v in feats.items()}
    options = {"perturbation": {"test_fraction": float(config.probe.test_fraction)},
               "gene_groups": {"n_splits": int(config.probe.folds), "min_size": int(config.probe.group_min_size),
                               "max_size": int(config.probe.group_max_size), "seed": int(config.seed)}}
    return probe_sweep.run_sweep(by_name, wells, task_options=options, probe=make_probe(config.probe.backend))


def _merge_tables(*tables):
    """Concatenate sweep tables of disjoint sources in run_sweep's own row order (task, then source)."""
    import pandas as pd

    from vitally_jax import probe_sweep

    t = pd.concat(tables, ignore_index=True)
    order = list(_SOURCE_NAMES.values())
    key = t["task"].map(list(probe_sweep.TASKS).index) * len(order) + t["source"].map(order.index)
    return t.iloc[key.argsort(kind="stable")].reset_index(drop=True)


def _model_score(table, b_star: dict) -> float:
    """The trained model's probe accuracy at its overall b*, averaged over tasks."""
    t = table[(table["source"] == "model") & (table["block"] == b_star["overall"])]
    return float(t["score"].mean())


def _pooling_sensitivity(config, outputs: dict, tables: dict, used: str):
    """Every stored pooling, both encoders, best block per task: how much the comparison depends on the readout.

    `tables`: probe tables already computed, by pooling; the others are computed here."""
    import pandas as pd

    rows = []
    for pool in _csv(config.embed.poolings):
        t = tables[pool] if pool in tables else _probe_table(config, outputs, pool, sources=("mae", "random_init"))
        for task, g in t[t["source"] != "image_stats"].groupby("task", sort=False):
            best = g.groupby("source")["score"].max()
            rows.append({"pooling": pool, "task": task, "trained MAE (best block)": float(best.get("model")),
                         "random-init ViT (best block)": float(best.get("random_init")),
                         "used for the maps": pool == used})
    return pd.DataFrame(rows)


def stage_probe(config, workdir: pathlib.Path, outputs: dict) -> dict:
    """Linear-probe sweep over every block of both encoders plus the image-statistics baseline; b*.

    `probe.pooling` may list several poolings ("mean,cls_norm"): each is probed and the one where the trained
    model's mean probe accuracy at its b* is highest is used for the maps (for every encoder)."""
    from vitally_jax import probe_sweep

    poolings = _csv(config.probe.pooling)
    if not poolings:
        raise ConfigError("probe.pooling: empty; expected e.g. 'mean' or 'mean,cls_norm'")
    scores, tables = {}, {}
    if len(poolings) > 1:
        for pooling in poolings:
            tables[pooling] = _probe_table(config, outputs, pooling, sources=("mae", "random_init"))
            scores[pooling] = _model_score(tables[pooling], probe_sweep.best_blocks(tables[pooling]))
            log(f"  pooling {pooling:<9} trained-model probe accuracy at b* {scores[pooling]:.3f}")
        pooling = max(scores, key=scores.get)
        # the encoders' table at the chosen pooling is already computed: add only the baseline
        table = _merge_tables(tables[pooling], _probe_table(config, outputs, pooling, sources=("image_stats",)))
    else:
        pooling = poolings[0]
        table = _probe_table(config, outputs, pooling)
    out_dir = workdir / "probe"
    b_star = probe_sweep.write_sweep(table, out_dir, extra={"pooling": pooling, "pooling_scores": scores})
    write_parquet(out_dir / "pooling_sensitivity.parquet",
                  _pooling_sensitivity(config, outputs, {**tables, pooling: table}, pooling))
    for task in probe_sweep.TASKS:
        t = table[table["task"] == task]
        best = {s: float(g["score"].max()) for s, g in t.groupby("source")}
        log(f"  probe {task:<13} b*={b_star.get(task)}  best balanced accuracy " +
            ", ".join(f"{s} {v:.3f}" for s, v in best.items()))
    key = config.probe.b_star_task
    key = "overall" if key == "mean" else key
    if key not in b_star:
        raise ConfigError(f"probe.b_star_task: {config.probe.b_star_task!r}; expected 'mean' or one of {list(b_star)}")
    return {"dir": str(out_dir), "table": str(out_dir / "sweep.csv"), "b_star": b_star, "b_star_used": b_star[key],
            "pooling": pooling, "pooling_scores": scores,
            "pooling_sensitivity": str(out_dir / "pooling_sensitivity.parquet")}


# -------------------------------------------------------------------------------------------------- run
WORKDIR_KIND = "demo workdir"


def run(config, workdir: str | os.PathLike | None = None) -> int:
    """Entry point for `vitally_jax.main` (job "demo"): run the pipeline into `workdir` (default
    `config.workdir`); returns the exit status 0. Errors are `VitallyError`s with one-line messages."""
    run_pipeline(config, workdir)
    return 0


def run_pipeline(config, workdir: str | os.PathLike | None = None) -> dict:
    """Run the demo pipeline into `workdir` (default `config.workdir`); returns every stage's outputs."""
    workdir = pathlib.Path(workdir or config.workdir)
    # the demo resumes its own workdir stage by stage; any other non-empty folder is refused
    check_output(workdir, WORKDIR_KIND, resume=True, inputs=[config.screen.store])
    workdir.mkdir(parents=True, exist_ok=True)
    if folder_kind(workdir) is None:
        write_marker(workdir, WORKDIR_KIND, created_by="vitally_jax.demo")
    force = tuple(_csv(config.force))
    bad = [s for s in force if s not in STAGES]
    if bad:
        raise ConfigError(f"force: unknown stage(s) {bad}; expected some of {list(STAGES)}")
    runner = StageRunner(workdir, force=force)
    t0 = time.perf_counter()
    log(f"workdir {workdir.resolve()}")
    o: dict = {}
    o["screen"] = runner.run("screen", _section(config, "screen"), lambda: stage_screen(config, workdir))
    o["curate"] = runner.run("curate", _section(config, "curate"),
                             lambda: stage_curate(config, workdir, o["screen"]["store"]))
    o["pretrain"] = runner.run("pretrain", _section(config, "train"),
                               lambda: stage_pretrain(config, workdir, o["screen"]["store"], o["curate"]["index"],
                                                      runner.current_fingerprint))
    o["embed"] = runner.run("embed", _section(config, "embed"),
                            lambda: stage_embed(config, workdir, o["screen"]["store"], o["pretrain"]["encoder"],
                                                runner.current_fingerprint))
    o["probe"] = runner.run("probe", _section(config, "probe"), lambda: stage_probe(config, workdir, o))
    from vitally_jax.demo_maps import stage_benchmarks, stage_maps
    from vitally_jax.demo_report import stage_report

    o["maps"] = runner.run("maps", _section(config, "bench"), lambda: stage_maps(config, workdir, o))
    o["benchmarks"] = runner.run("benchmarks", _section(config, "bench"), lambda: stage_benchmarks(config, workdir, o))
    o["report"] = runner.run("report", {"seed": config.seed}, lambda: stage_report(config, workdir, o, runner))
    for r in runner.records.values():
        log(f"  {r.name:<11} {r.seconds:8.1f} s{'  (reused)' if r.reused else ''}")
    log(f"finished in {time.perf_counter() - t0:.1f} s; report: {o['report']['report']}")
    return o
