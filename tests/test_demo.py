"""The embedded default: stage reuse, the report's figures and tables, and the shrunken demo end to end."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from vitally_jax import config_lib
from vitally_jax.demo import html as R
from vitally_jax.demo.stages import StageRunner


# ------------------------------------------------------------------------------------------- stage machinery
def test_stage_runner_reuses_finished_stages_and_reruns_changed_ones(tmp_path):
    calls = []

    def stage(name, value):
        def fn():
            calls.append(name)
            return {"value": value}

        return fn

    def pipeline(a_cfg, b_cfg, force=()):
        r = StageRunner(tmp_path, force=force)
        a = r.run("a", a_cfg, stage("a", 1))
        b = r.run("b", b_cfg, stage("b", a["value"] + 1))
        c = r.run("c", {}, stage("c", b["value"] + 1))
        return r, c

    r, c = pipeline({"x": 1}, {"y": 1})
    assert calls == ["a", "b", "c"] and c == {"value": 3}
    assert json.loads((tmp_path / "stages" / "b.json").read_text())["outputs"] == {"value": 2}
    r, _ = pipeline({"x": 1}, {"y": 1})
    assert calls == ["a", "b", "c"], "a rerun with the same config must reuse every stage"
    assert list(r.times()["reused"]) == [True, True, True]
    pipeline({"x": 1}, {"y": 2})  # b's config changed: b and everything after it rerun, a is reused
    assert calls == ["a", "b", "c", "b", "c"]
    pipeline({"x": 1}, {"y": 2}, force=("c",))
    assert calls[-1] == "c" and calls.count("a") == 1


def test_stage_failure_leaves_no_marker(tmp_path):
    r = StageRunner(tmp_path)

    def boom():
        raise RuntimeError("stage failed")

    with pytest.raises(RuntimeError):
        r.run("a", {}, boom)
    assert not (tmp_path / "stages" / "a.json").exists()


# ------------------------------------------------------------------------------------------------ the report
def test_report_figures_decode_and_tables_are_finite(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, (2, 32, 32, 6), dtype=np.uint8)
    sweep = pd.DataFrame(
        [
            {"source": s, "task": t, "block": b, "score": 0.1 * b + (s == "model")}
            for s in ("model", "random_init")
            for t in ("perturbation", "gene_groups")
            for b in (1, 2, 3)
        ]
        + [{"source": "image_stats", "task": t, "block": 0, "score": 0.3} for t in ("perturbation", "gene_groups")]
    )
    recall = pd.DataFrame(
        [
            {"source": s, "model": m, "recall": 0.1 + 0.05 * k}
            for k, (s, m) in enumerate([(s, m) for s in ("CORUM", "StringDB") for m in ("a", "b")])
        ]
    )
    metrics = pd.DataFrame(
        {"step": np.arange(0, 100, 10), "loss": np.linspace(2, 1, 10), "lr": np.linspace(0, 1e-3, 10)}
    )
    rep = R.Report("test")
    rep.figure(R.channel_montage(imgs, list("ABCDEF"), ["w1", "w2"]))
    rep.figure(R.probe_curves(sweep, {"perturbation": 3}))
    rep.figure(R.recall_bars(recall))
    rep.figure(R.training_curves(metrics))
    rep.figure(R.stage_times(pd.DataFrame({"stage": ["a", "b"], "seconds": [1.0, 2.5]})))
    rep.table(pd.DataFrame({"name": ["x<y", "z"], "value": [1.23456, 2.0], "n": [3, 4]}))
    path = rep.write(tmp_path / "report.html")
    images = R.report_images(path)
    assert len(images) == 5
    for im in images:
        assert np.asarray(im.convert("L"), np.float32).std() > 0
    cells = R.report_numeric_cells(path)
    assert cells == ["1.235", "3", "2.000", "4"]
    assert "x&lt;y" in path.read_text()  # text is escaped
    R.write_results(pd.DataFrame({"model": ["a"], "recall": [0.5]}), tmp_path, extra={"b_star": 2})
    assert json.loads((tmp_path / "results.json").read_text()) == {
        "results": [{"model": "a", "recall": 0.5}],
        "b_star": 2,
    }
    assert pd.read_csv(tmp_path / "results.csv")["recall"].tolist() == [0.5]


def test_findings_compare_trained_and_random():
    summary = pd.DataFrame(
        [
            {"model_key": "mae_bstar", "alignment": "tvn", "recall CORUM": 0.4, "recall StringDB": 0.2},
            {"model_key": "random_init", "alignment": "tvn", "recall CORUM": 0.2, "recall StringDB": 0.25},
            {"model_key": "mae_bstar", "alignment": "unaligned", "recall CORUM": 0.1, "recall StringDB": 0.1},
        ]
    )
    sweep = pd.DataFrame(
        [
            {"source": "model", "task": "perturbation", "block": 2, "score": 0.5},
            {"source": "random_init", "task": "perturbation", "block": 1, "score": 0.3},
            {"source": "random_init", "task": "perturbation", "block": 2, "score": 0.6},
        ]
    )
    from vitally_jax.demo.report import demo_findings

    f = demo_findings(summary, sweep, b_star=2)
    assert f["holds"].tolist() == [True, False, False, True]
    assert f["value"].tolist() == [0.4, 0.2, 0.5, pytest.approx(0.3)]


# ------------------------------------------------------------------------------------- the demo end to end
@pytest.mark.slow
def test_shrunken_demo_end_to_end(tmp_path, repo_root, capsys):
    from vitally_jax import demo
    from vitally_jax.demo import probe as demo_probe

    config = config_lib.load("demo", "ci")
    out = demo.run_pipeline(config, tmp_path / "run")
    report = tmp_path / "run" / "report.html"
    assert report.is_file() and out["report"]["report"] == str(report)

    # C: every number in the report's tables and in results.json is finite
    cells = R.report_numeric_cells(report)
    assert len(cells) > 100
    assert all(math.isfinite(float(c)) for c in cells), [c for c in cells if not math.isfinite(float(c))]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    rows = results["results"]
    assert len(rows) == 4 * 3  # 4 models x 3 alignments
    for row in rows:
        for k, v in row.items():
            if k not in ("model", "alignment"):
                assert isinstance(v, (int, float)) and math.isfinite(v), (row["model"], k, v)
    # the readout check: every stored pooling probed for both encoders, the maps' pooling marked once per task
    sens = pd.read_parquet(tmp_path / "run" / "probe" / "pooling_sensitivity.parquet")
    assert set(sens["pooling"]) == {"cls", "cls_norm", "mean", "mean_norm"}
    assert set(sens[sens["used for the maps"]]["pooling"]) == {config.probe.pooling}
    assert sens[["trained MAE (best block)", "random-init ViT (best block)"]].notna().all().all()
    # the multi-pooling path probes the encoders first and adds the baseline after: probing sources apart and
    # merging must give exactly the table of probing them together
    pool = config.probe.pooling
    apart = demo_probe._merge_tables(
        demo_probe._probe_table(config, out, pool, sources=("mae", "random_init")),
        demo_probe._probe_table(config, out, pool, sources=("image_stats",)),
    )
    pd.testing.assert_frame_equal(apart, demo_probe._probe_table(config, out, pool))
    assert list(apart["source"].unique()) == ["model", "random_init", "image_stats"]
    table = pd.read_csv(tmp_path / "run" / "results.csv")
    assert {"recall CORUM", "recall StringDB", "compound-gene AP", "mAP activity", "probe perturbation"} <= set(table)
    assert set(table["alignment"]) == {"unaligned", "pca_centerscale", "tvn"}
    assert ((table["recall CORUM"] >= 0) & (table["recall CORUM"] <= 1)).all()
    assert 1 <= results["b_star_used"] <= config_depth(tmp_path / "run")

    # D: every image in the report decodes and is not blank; the report has all the promised figures
    images = R.report_images(report)
    assert len(images) >= 7  # montage, curves, reconstructions, probe curves, 2 recall charts, stage times
    for im in images:
        assert im.size[0] > 50 and im.size[1] > 50
        assert np.asarray(im.convert("L"), np.float32).std() > 0
    text = report.read_text()
    for heading in (
        "Findings",
        "The screen",
        "Pretraining",
        "Block search",
        "Maps and benchmarks",
        "Run time per stage",
        "Versions and configuration",
    ):
        assert f"<h2>{heading}</h2>" in text
    assert "http://" not in text and "https://" not in text  # self-contained

    # a rerun reuses every finished stage
    capsys.readouterr()
    demo.run_pipeline(config, tmp_path / "run")
    log = capsys.readouterr().out
    assert log.count(": reused") == len(demo.STAGES) and ": running" not in log


def config_depth(run_dir):
    return json.loads((run_dir / "stages" / "embed.json").read_text())["outputs"]["depth"]


def test_in_memory_training_crops_match_store_reads(tmp_path):
    """The demo's in-memory input mode gives the same batches and resumable iterator state as store reads,
    for the whole store and for an unordered, gapped index."""
    from vitally_jax.data.pipeline import train_dataset
    from vitally_jax.data.store import metadata_frame, write_store

    imgs = np.random.default_rng(3).integers(0, 256, (9, 24, 20, 3), dtype=np.uint8)
    path = tmp_path / "store"
    write_store(path, imgs, metadata_frame([f"im{i}" for i in range(9)]), ["a", "b", "c"])
    for index in (None, ["im7", "im0", "im3", "im4", "im8"]):
        kw = dict(crop=8, global_batch=4, seed=5, index=index, process_index=0, process_count=1)
        from_store = iter(train_dataset(path, **kw))
        from_memory = iter(train_dataset(path, in_memory=True, **kw))
        for _ in range(4):
            np.testing.assert_array_equal(next(from_store)["image"], next(from_memory)["image"])
        state = from_memory.get_state()
        expected = next(from_store)["image"]
        np.testing.assert_array_equal(next(from_memory)["image"], expected)
        resumed = iter(train_dataset(path, in_memory=True, **kw))
        resumed.set_state(state)
        np.testing.assert_array_equal(next(resumed)["image"], expected)
