"""The embedded default: stage reuse, the report's figures and tables, and the shrunken demo end to end."""

import json
import math

import numpy as np
import pandas as pd
import pytest

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


def test_findings_verdicts_follow_the_intervals():
    """Findings: verdicts from paired bootstrap intervals; the depth rule; a closed gap makes the comparison with
    baselines untestable; the curation row asks for the ablation."""
    from vitally_jax.demo.findings import findings_table

    rng = np.random.default_rng(0)
    n = 400
    strong = rng.random(n) < 0.6
    weak = rng.random(n) < 0.2
    hits = {
        "mae_bstar__tvn__CORUM": strong,
        "random_init__tvn__CORUM": weak,
        "mae_last__tvn__CORUM": strong.copy(),
        "image_stats__tvn__CORUM": strong | (rng.random(n) < 0.5),
        "mae_bstar__unaligned__CORUM": strong,
        "mae_bstar__pca_centerscale__CORUM": strong,
    }
    groups = np.repeat([f"g{k}" for k in range(20)], 5)
    good, bad = (rng.random(100) < 0.8).astype(float), (rng.random(100) < 0.3).astype(float)
    correct = pd.DataFrame({"group": groups, "model|mean|2": good, "model|mean|6": good, "random_init|cls|3": bad})
    correct["image_stats||0"] = good
    readouts = {"model": {"pooling": "mean", "block": 2}, "random_init": {"pooling": "cls", "block": 3}}
    ceil = pd.DataFrame({"metric": ["recall CORUM"], "headroom": [0.5]})
    f = findings_table(hits, correct, readouts, ceil, depth=6, primary="tvn", n_boot=500)
    v = dict(zip(f["claim"] + " / " + f["metric"], f["verdict"]))
    assert v["trained MAE beats a random-init ViT (each at its own readout) / CORUM recall"] == "holds"
    assert v["trained MAE beats a random-init ViT (each at its own readout) / gene-group probe"] == "holds"
    # identical maps: a zero-width interval at 0 is not resolved
    assert v["an intermediate block b* beats the last block / CORUM recall"] == "not resolved"
    assert v["trained MAE beats image statistics / CORUM recall"] == "fails"
    assert v["trained MAE beats CellProfiler features / CORUM recall"] == "not testable here"
    cur = f[f["claim"].str.startswith("curating")]
    assert cur["verdict"].tolist() == ["not testable here"] and "demo.py:ablation" in cur["note"].iloc[0]
    row = f[f["claim"].str.contains("random-init") & (f["metric"] == "CORUM recall")].iloc[0]
    assert row["lo"] < row["difference"] < row["hi"]
    assert row["difference"] == pytest.approx(strong.mean() - weak.mean(), abs=1e-12)
    # a shallow encoder cannot test b*; a closed gap makes the baseline comparisons untestable
    f3 = findings_table(hits, correct, readouts, ceil.assign(headroom=0.95), depth=3, primary="tvn", n_boot=200)
    v3 = dict(zip(f3["claim"] + " / " + f3["metric"], f3["verdict"]))
    assert v3["an intermediate block b* beats the last block / CORUM recall"] == "not testable at this depth"
    assert v3["trained MAE beats image statistics / CORUM recall"] == "not testable in this world"
    assert "holds" not in " ".join(f3["note"])  # no headline count of holding claims
    # headroom is per metric: a closed CORUM gap leaves the gene-group comparison testable
    ceil2 = pd.DataFrame({"metric": ["recall CORUM", "gene-group probe"], "headroom": [0.95, 0.4]})
    f4 = findings_table(hits, correct, readouts, ceil2, depth=6, primary="tvn", n_boot=200)
    v4 = dict(zip(f4["claim"] + " / " + f4["metric"], f4["verdict"]))
    assert v4["trained MAE beats image statistics / CORUM recall"] == "not testable in this world"
    assert v4["trained MAE beats image statistics / gene-group probe"] == "not resolved"  # same per-gene scores
    # the selection half chose the last block: its best intermediate block is still compared with the last
    last = {**readouts, "model": {"pooling": "mean", "block": 6}}
    correct5 = correct.assign(**{"model|mean|6": bad})
    cv = pd.DataFrame(
        [
            {"source": "model", "split": "select", "pooling": "mean", "block": b, "seed": 0, "score": sc}
            for b, sc in ((1, 0.1), (2, 0.3), (6, 0.5))
        ]
    )
    f5 = findings_table(hits, correct5, last, ceil, depth=6, primary="tvn", n_boot=500, cv=cv)
    r5 = f5[f5["claim"].str.startswith("an intermediate") & (f5["metric"] == "gene-group probe")].iloc[0]
    assert r5["verdict"] == "holds" and "(2, mean)" in r5["note"]  # block 2 is good on the evaluation half
    assert r5["difference"] == pytest.approx(good.mean() - bad.mean(), abs=0.05)
    r5m = f5[f5["claim"].str.startswith("an intermediate") & (f5["metric"] == "CORUM recall")].iloc[0]
    assert r5m["verdict"] == "fails" and np.isnan(r5m["difference"])


def test_ceilings_and_headroom():
    from vitally_jax.demo.findings import ceilings_table

    rows = []
    for model, align, val in [
        ("oracle", "unaligned", 0.6),
        ("oracle_visible", "unaligned", 0.5),
        ("image_stats", "tvn", 0.3),
        ("image_stats", "pca_centerscale", 0.35),
        ("crop_stats", "tvn", 0.2),
        ("mae_bstar", "tvn", 0.25),
        ("random_init", "tvn", 0.15),
    ]:
        rows.append({"model_key": model, "alignment": align, "recall CORUM": val})
    gg = pd.DataFrame({"source": ["model", "random_init", "image_stats", "oracle"], "mean": [0.3, 0.2, 0.4, 0.9]})
    t = ceilings_table(pd.DataFrame(rows), gg, 20, primary="tvn", labels={"image_stats": "image statistics"})
    c = t.set_index("metric").loc["recall CORUM"]
    assert c["best non-learned baseline"] == "image statistics" and c["its value"] == 0.35  # best alignment
    assert c["headroom"] == pytest.approx((0.35 - 0.1) / (0.6 - 0.1))
    g = t.set_index("metric").loc["gene-group probe"]
    assert g["chance"] == pytest.approx(0.05) and g["headroom"] == pytest.approx((0.4 - 0.05) / (0.9 - 0.05))


# ------------------------------------------------------------------------------------- the demo end to end
@pytest.mark.slow
def test_shrunken_demo_end_to_end(shrunken_demo, capsys):
    from vitally_jax import demo

    config, out, run_dir = shrunken_demo
    report = run_dir / "report.html"
    assert report.is_file() and out["report"]["report"] == str(report)

    # every number in the report's tables and in results.json is finite where it is defined
    cells = R.report_numeric_cells(report)
    assert len(cells) > 100
    results = json.loads((run_dir / "results.json").read_text())
    rows = results["results"]
    models = {r["model"] for r in rows}
    assert len(models) == 8  # MAE b*, MAE last, random init, 3 baselines, 2 ceilings
    assert len(rows) == 6 * 3 + 2  # encoders and baselines x 3 alignments, ceilings unaligned
    for row in rows:
        assert 0 <= row["recall CORUM"] <= 1 and math.isfinite(row["mAP activity"])
    # ceilings, headroom, the per-process table, the findings with intervals and verdicts
    ceil = pd.DataFrame(results["ceilings"]).set_index("metric")
    assert {"recall CORUM", "gene-group probe"} <= set(ceil.index)
    assert (ceil["oracle"] > ceil["chance"]).all()
    assert ceil["headroom"].map(math.isfinite).all()
    dec = pd.DataFrame(results["decoding"])
    from vitally_jax.data.synthetic import PROCESSES

    assert dec["process"].tolist() == list(PROCESSES)
    assert (dec.drop(columns=["process", "visible"]) <= 1.0).all().all()
    sens = pd.DataFrame(results["sensitivity"])
    assert sens["visible"].sum() >= len(PROCESSES) // 2  # most of the world's biology survives standardisation
    f = pd.DataFrame(results["findings"])
    assert set(f["verdict"]) <= {
        "holds",
        "fails",
        "not resolved",
        "not testable here",
        "not testable in this world",
        "not testable at this depth",
    }
    tested = f[f["verdict"].isin(["holds", "fails", "not resolved"])]
    assert len(tested) >= 6 and (tested["lo"] <= tested["difference"]).all()
    assert (tested["difference"] <= tested["hi"]).all()
    for claim in ("random-init", "intermediate block", "image statistics", "CellProfiler", "TVN", "curating"):
        assert f["claim"].str.contains(claim).any(), claim
    gg = pd.DataFrame(results["gene_groups"])
    assert (gg["seeds"] == config.probe.cv_seeds).all() and (gg["sd"] >= 0).all()
    qc = results["curation_check"]
    assert 0 <= qc["quality_precision"] <= 1 and 0 <= qc["quality_recall"] <= 1
    # readouts of both encoders come from the same rule on the selection half
    for src in ("model", "random_init"):
        r = results["readouts"][src]
        assert r["pooling"] in config.probe.pooling.split(",") and 1 <= r["block"] <= results["depth"]

    images = R.report_images(report)
    assert len(images) >= 7
    for im in images:
        assert im.size[0] > 50 and im.size[1] > 50
        assert np.asarray(im.convert("L"), np.float32).std() > 0
    text = report.read_text()
    for heading in (
        "Findings",
        "Ceilings and headroom",
        "Which biology each representation reads",
        "The screen",
        "Curation of the training set",
        "Pretraining",
        "Block search",
        "Maps and benchmarks",
        "Run time per stage",
        "Versions and configuration",
    ):
        assert f"<h2>{heading}</h2>" in text, heading
    assert "http://" not in text and "https://" not in text  # self-contained
    assert " of " + str(len(f)) + " " not in text  # no "N of N hold" headline

    # a rerun reuses every finished stage
    capsys.readouterr()
    demo.run_pipeline(config, run_dir)
    log = capsys.readouterr().out
    assert log.count(": reused") == len(demo.STAGES) and ": running" not in log


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


def test_run_prints_headroom_and_findings(shrunken_demo, capsys):
    from vitally_jax.demo import log_findings

    _, _, run_dir = shrunken_demo
    results = json.loads((run_dir / "results.json").read_text())
    capsys.readouterr()
    log_findings(run_dir / "results.json")
    out = capsys.readouterr().out
    assert out.count("headroom ") == len(results["ceilings"]) >= 2
    rows = [ln for ln in out.splitlines() if " -> " in ln and "findings (" not in ln]
    assert len(rows) == len(results["findings"]) >= 10
    for f, ln in zip(results["findings"], rows, strict=True):
        assert f["claim"] in ln and ln.split(" -> ")[1].startswith(f["verdict"])
        if not math.isnan(f["difference"]):
            assert f"{f['difference']:+.3f} [{f['lo']:+.3f}, {f['hi']:+.3f}]" in ln
