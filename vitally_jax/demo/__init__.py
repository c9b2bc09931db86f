"""The embedded default: one command from pixels to a scored map.

    python -m vitally_jax.main --config=configs/demo.py            # 2 CPU cores, budget <= 15 min
    python -m vitally_jax.main --config=configs/demo.py:ci         # shrunken, budget <= 3 min

Stages (each prints progress and its wall time, writes its outputs atomically and then a done-marker under
`<workdir>/stages/`, so a rerun reuses finished stages; a stage whose config changed is rerun, and so is
everything after it):

  screen      generate the synthetic Cell Painting screen (if absent)
  curate      Phenoprints-style curation of the training set (image-statistics embeddings), with the quality
              filter's precision and recall against the world's artefact ground truth
  baselines   statistics of the self-standardised crops, CellProfiler measurements, the oracle (true process
              activations) and the visible oracle (processes a self-standardised crop can see)
  pretrain    a small MAE on the curated crops
  embed       every block and pooling of the trained MAE and of a random-init ViT of the same size
  probe       gene-group probe (repeated CV) over every block and pooling of both encoders: each encoder's
              readout chosen on one half of the experiments, scored on the other; perturbation probe per block
  maps        maps per model (MAE at b* and at its last block, random-init ViT at its own readout, baselines,
              ceilings) and alignment (unaligned, PCA-center-scale, TVN)
  benchmarks  recall per annotation source (with per-pair hits for paired bootstrap intervals), replicate
              consistency, compound-gene activity, mAP
  report      report.html (self-contained), results.json, results.csv: ceilings, headroom, per-process decoding,
              findings with intervals and verdicts
"""

from __future__ import annotations

import os
import pathlib
import time

from vitally_jax.demo.baselines import stage_baselines
from vitally_jax.demo.maps import stage_benchmarks, stage_maps
from vitally_jax.demo.prepare import stage_curate, stage_embed, stage_pretrain, stage_screen, synthetic_config
from vitally_jax.demo.probe import stage_probe
from vitally_jax.demo.report import stage_report
from vitally_jax.demo.stages import STAGES, StageRunner, _csv, _section, log
from vitally_jax.errors import ConfigError
from vitally_jax.fileio import check_output, folder_kind, write_marker

__all__ = ["run", "run_pipeline", "STAGES", "WORKDIR_KIND"]

# -------------------------------------------------------------------------------------------------- run
WORKDIR_KIND = "demo workdir"


def run(config, workdir: str | os.PathLike | None = None) -> int:
    """Entry point for `vitally_jax.main` (job "demo"): run the pipeline into `workdir` (default
    `config.workdir`); returns the exit status 0. Errors are `VitallyError`s with one-line messages. With
    `ablation.enabled` (configs/demo.py:ablation), the curated-vs-uncurated ablation runs instead."""
    if config.get("ablation") is not None and config.ablation.enabled:
        from vitally_jax.demo.ablation import run_ablation

        wd = pathlib.Path(workdir or config.workdir)
        check_output(wd, WORKDIR_KIND, resume=True, inputs=[config.screen.store])
        wd.mkdir(parents=True, exist_ok=True)
        if folder_kind(wd) is None:
            write_marker(wd, WORKDIR_KIND, created_by="vitally_jax.demo")
        run_ablation(config, wd)
        return 0
    out = run_pipeline(config, workdir)
    log_findings(pathlib.Path(out["report"]["report"]).parent / "results.json")
    return 0


def log_findings(results_json: pathlib.Path) -> None:
    """Print the ceilings' headroom and the findings table of a finished run (what the report shows first)."""
    import json
    import math

    r = json.loads(pathlib.Path(results_json).read_text())
    for c in r.get("ceilings", []):
        log(
            f"  headroom {c['metric']:<22} {c['headroom']:6.3f}  (oracle {c['oracle']:.3f}, chance {c['chance']:.3f}, "
            f"best non-learned: {c['best non-learned baseline']} {c['its value']:.3f})"
        )
    log("findings (difference [95% interval] -> verdict):")
    for f in r.get("findings", []):
        d = f.get("difference")
        ci = "" if d is None or math.isnan(d) else f" {d:+.3f} [{f['lo']:+.3f}, {f['hi']:+.3f}]"
        note = f"  ({f['note']})" if f.get("note") else ""
        log(f"  {f['claim']} | {f['metric'] or '-'} |{ci} -> {f['verdict']}{note}")


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
    o["curate"] = runner.run(
        "curate",
        {"curate": _section(config, "curate"), "crop": int(config.embed.crop)},
        lambda: stage_curate(config, workdir, o["screen"]["store"]),
    )
    o["baselines"] = runner.run(
        "baselines",
        {"baselines": _section(config, "baselines"), "crop": int(config.embed.crop), "seed": config.seed},
        lambda: stage_baselines(
            config,
            workdir,
            o["screen"]["store"],
            o["curate"],
            synthetic_config(config) if o["screen"]["generated"] else None,
        ),
    )
    o["pretrain"] = runner.run(
        "pretrain",
        _section(config, "train"),
        lambda: stage_pretrain(config, workdir, o["screen"]["store"], o["curate"]["index"], runner.current_fingerprint),
    )
    o["embed"] = runner.run(
        "embed",
        _section(config, "embed"),
        lambda: stage_embed(
            config, workdir, o["screen"]["store"], o["pretrain"]["encoder"], runner.current_fingerprint
        ),
    )
    o["probe"] = runner.run("probe", _section(config, "probe"), lambda: stage_probe(config, workdir, o))
    o["maps"] = runner.run("maps", _section(config, "bench"), lambda: stage_maps(config, workdir, o))
    o["benchmarks"] = runner.run("benchmarks", _section(config, "bench"), lambda: stage_benchmarks(config, workdir, o))
    o["report"] = runner.run("report", {"seed": config.seed}, lambda: stage_report(config, workdir, o, runner))
    for r in runner.records.values():
        log(f"  {r.name:<11} {r.seconds:8.1f} s{'  (reused)' if r.reused else ''}")
    log(f"finished in {time.perf_counter() - t0:.1f} s; report: {o['report']['report']}")
    return o
