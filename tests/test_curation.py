"""Curation: filters, replicate-consistency permutation test, Cauchy combination, index and report output."""

from __future__ import annotations

import json
import pathlib
import types

import numpy as np
import pandas as pd
import pytest
from conftest import tool_main
from scipy import ndimage, stats

from vitally_jax.curation import core as cu
from vitally_jax.curation import stats as cs
from vitally_jax.errors import ConfigError, DataError

ROOT = pathlib.Path(__file__).resolve().parent.parent


def simulate(n_genes=40, n_exp=4, plates=2, reps=2, n_ctrl=20, d=16, frac_active=0.5, strength=1.0, sites=1, seed=0):
    """Metadata (one row per image) and embeddings of a screen where a known half of the genes shift the
    embedding of their wells; plates and experiments add strong offsets. Returns (meta, emb, active)."""
    rng = np.random.default_rng(seed)
    genes = [f"G{i}" for i in range(n_genes)]
    active = rng.random(n_genes) < frac_active
    prog = rng.normal(size=(n_genes, d)) * strength * active[:, None]
    rows, emb = [], []
    for e in range(n_exp):
        eoff = rng.normal(size=d) * 3
        for p in range(plates):
            poff = eoff + rng.normal(size=d)
            w = 0
            for g in list(range(n_genes)) * reps + [None] * n_ctrl:
                ct = "" if g is not None else ("positive" if w % 4 == 0 else "negative")
                for s in range(sites):
                    rows.append(
                        dict(
                            image_id=f"e{e}p{p}w{w}s{s}",
                            well_id=f"w{w}",
                            plate=f"e{e}p{p}",
                            experiment=f"e{e}",
                            perturbation=genes[g] if ct == "" else ct[:3].upper(),
                            perturbation_type="gene" if ct == "" else "control",
                            is_control=ct != "",
                            control_type=ct,
                        )
                    )
                    emb.append(poff + (prog[g] if g is not None else 0) + rng.normal(size=d))
                w += 1
    return pd.DataFrame(rows), np.asarray(emb, np.float32), dict(zip(genes, active))


# --------------------------------------------------------------------------------- Cauchy combination


def test_cauchy_combination_matches_closed_form():
    rng = np.random.default_rng(0)
    p = rng.uniform(1e-6, 1, size=(50, 4))
    expected = 0.5 - np.arctan(np.mean(np.tan((0.5 - p) * np.pi), axis=1)) / np.pi
    np.testing.assert_allclose(cs.cauchy_combination(p), expected, rtol=1e-9, atol=1e-12)
    # NaN entries are ignored: K counts the available experiments only
    q = p.copy()
    q[:, 3] = np.nan
    exp3 = 0.5 - np.arctan(np.mean(np.tan((0.5 - p[:, :3]) * np.pi), axis=1)) / np.pi
    np.testing.assert_allclose(cs.cauchy_combination(q), exp3, rtol=1e-9)
    # weights, a single p-value (identity), all-NaN rows, tiny p keeps relative precision
    w = np.array([0.1, 0.2, 0.3, 0.4])
    np.testing.assert_allclose(
        cs.cauchy_combination(p, w), 0.5 - np.arctan(np.tan((0.5 - p) * np.pi) @ w) / np.pi, rtol=1e-9
    )
    np.testing.assert_allclose(cs.cauchy_combination(p[:, :1]), p[:, 0], rtol=1e-9)
    assert np.isnan(cs.cauchy_combination(np.full((1, 3), np.nan)))[0]
    tiny = cs.cauchy_combination(np.array([[1e-12, 1e-12]]))[0]
    assert tiny == pytest.approx(1e-12, rel=1e-6)
    # one strong experiment dominates a mediocre one (a property of the test, not of averaging p-values)
    assert cs.cauchy_combination(np.array([[1e-4, 0.6]]))[0] < 1e-3
    with pytest.raises(ValueError):
        cs.cauchy_combination(np.array([[0.0, 0.5]]))


def test_cauchy_combination_is_uniform_for_independent_uniform_p():
    p = np.random.default_rng(1).uniform(size=(4000, 3))
    assert stats.kstest(cs.cauchy_combination(p), "uniform").pvalue > 0.01


# ------------------------------------------------------------------------------------ consistency test


def test_mean_pairwise_cosine_identity_and_null_sampler():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(30, 8))
    u = cs.unit_rows(x)
    groups = np.repeat(np.arange(6), 5)
    stat, size = cs.group_mean_cosines(u, groups, 6)
    direct = [cs.mean_pairwise_cosine(x[groups == g]) for g in range(6)]
    np.testing.assert_allclose(stat, direct, rtol=1e-5, atol=1e-6)
    assert size.tolist() == [5] * 6
    # random prefixes: distinct entries per row, uniform over the pool, both sampler branches
    for pool, k in [(50, 6), (10, 8)]:
        idx = cs._random_prefixes(np.random.default_rng(3), pool, k, 20000)
        assert all(len(set(r)) == k for r in idx[:500])
        freq = np.bincount(idx[:, -1], minlength=pool) / len(idx)
        assert np.abs(freq - 1 / pool).max() < 0.01
    # the null mean for set size n equals the mean cosine over all distinct pairs of the pool
    null = cs.null_mean_cosines(u, 7, 4000, np.random.default_rng(4))
    g = u.astype(np.float64) @ u.T.astype(np.float64)
    pair_mean = g[np.triu_indices(30, 1)].mean()
    assert np.isnan(null[:, :2]).all()
    for n in (2, 4, 7):
        assert null[:, n].mean() == pytest.approx(pair_mean, abs=0.01)


def test_well_means_center_scale_and_whiten():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(7, 3)).astype(np.float32)
    wells = np.array([2, 0, 2, 1, 0, 2, 1])
    np.testing.assert_allclose(
        cs.well_means(x, wells, 4), [x[[1, 4]].mean(0), x[[3, 6]].mean(0), x[[0, 2, 5]].mean(0), np.zeros(3)], atol=1e-6
    )
    np.testing.assert_array_equal(cs.well_means(x, np.array([3, 1, 0, 2, 6, 5, 4]), 7)[[3, 1, 0]], x[:3])
    y = rng.normal(size=(400, 3)) * [1.0, 5.0, 0.0] + [3.0, -2.0, 7.0]
    z = cs.center_scale(y, np.repeat([0, 1], 200))
    np.testing.assert_allclose(z[:200].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(z[200:].std(0), [1, 1, 0], atol=1e-5)  # a constant feature stays 0
    mix = rng.normal(size=(5000, 4)) @ rng.normal(size=(4, 4))
    w = cs.whiten(mix.astype(np.float32), mix, 0.0)
    np.testing.assert_allclose(np.cov(w, rowvar=False), np.eye(4), atol=1e-3)
    # moments of a subset subtract from the whole: the covariance of the other rows, as used for whitening
    n, s, o = cs.moments(mix + 5.0)
    n1, s1, o1 = cs.moments(mix[:1200] + 5.0)
    np.testing.assert_allclose(
        cs.covariance(n - n1, s - s1, o - o1), np.cov(mix[1200:], rowvar=False), rtol=1e-8, atol=1e-8
    )
    np.testing.assert_allclose(
        cs.whiten(mix, None, 0.5, cov=np.cov(mix[1200:], rowvar=False)),
        cs.whiten(mix, mix[1200:], 0.5),
        rtol=1e-5,
        atol=1e-5,
    )


def _random_tests(n_pert=300, n_exp=3, reps=4, d=8, seed=5, n_perm=999):
    rows = []
    for e in range(n_exp):
        for i in range(n_pert):
            for r in range(reps):
                rows.append((f"e{e}", f"e{e}p{r}", f"P{i}"))
        for c in range(40):
            rows.append((f"e{e}", f"e{e}p{c % reps}", "CTRL"))
    wells = pd.DataFrame(rows, columns=["experiment", "plate", "perturbation"])
    wells["control_type"] = np.where(wells.perturbation == "CTRL", "negative", "")  # whitened on these
    emb = np.random.default_rng(seed).normal(size=(len(wells), d))
    cfg = cu.CurationConfig(n_permutations=n_perm, seed=seed, normalize="plate")
    return cu.consistency_tests(wells, emb, [f"P{i}" for i in range(n_pert)], cfg)


def test_pvalues_are_calibrated_under_the_null():
    t = _random_tests()
    assert len(t) == 900 and (t["n_wells"] == 4).all()
    assert stats.kstest(t["p"], "uniform").pvalue > 0.01
    combined = cu.combine_experiments(t)
    assert len(combined) == 300
    assert stats.kstest(combined, "uniform").pvalue > 0.01
    assert 0.0 <= (combined < 0.05).mean() <= 0.09


def test_null_is_drawn_from_negative_controls():
    # a tight pair tested against a pool of identical vectors scores no better than the pool: p = 1
    u = np.eye(12, dtype=np.float32)
    u[1] = u[0]
    u[6:] = u[11]
    groups = np.full(12, -1)
    groups[[0, 1]] = 0
    pool = np.zeros(12, bool)
    pool[6:] = True
    p_pool, _, _ = cs.permutation_pvalues(u, groups, 1, 99, np.random.default_rng(0), pool)
    p_all, _, _ = cs.permutation_pvalues(u, groups, 1, 99, np.random.default_rng(0))
    assert p_pool[0] == 1.0 and p_all[0] < 0.7
    # curation: negative controls are the pool when an experiment has max(10, 2 x largest set) of them
    rows = [("e0", "p0", f"P{i}", "") for i in range(6) for _ in range(4)]
    rows += [("e0", "p0", "NEG", "negative")] * 12 + [("e0", "p0", "POS", "positive")] * 30
    rows += [("e1", "p1", f"P{i}", "") for i in range(6) for _ in range(4)] + [("e1", "p1", "NEG", "negative")] * 7
    wells = pd.DataFrame(rows, columns=["experiment", "plate", "perturbation", "control_type"])
    emb = np.random.default_rng(1).normal(size=(len(wells), 5))
    emb[wells.control_type == "positive"] += 3.0  # a tight cluster of positive controls
    cfg = cu.CurationConfig(n_permutations=200)
    t = cu.consistency_tests(wells, emb, [f"P{i}" for i in range(6)], cfg)
    assert t.groupby("experiment").null_pool.first().to_dict() == {"e0": "controls", "e1": "all"}
    t_all = cu.consistency_tests(
        wells, emb, [f"P{i}" for i in range(6)], cu.CurationConfig(n_permutations=200, null_pool="all")
    )
    assert (t_all.null_pool == "all").all()
    np.testing.assert_allclose(t_all.mean_cosine, t.mean_cosine, rtol=1e-6)  # same statistics, other null
    # centred on all wells, the phenotype-free wells of e0 share an offset away from its positive-control
    # cluster, so they look more alike than random wells of e0 (the cause of the random-well null's small p)
    e0 = (t.experiment == "e0").to_numpy()
    assert (t_all.p[e0].to_numpy() < t.p[e0].to_numpy()).all()
    assert t_all.p[e0].max() < 0.2 < t.p[e0].max()


def test_permutation_pvalue_counts_exceedances():
    # two tight replicate pairs in a pool of orthogonal directions: no random pair is as similar
    u = np.eye(12, dtype=np.float32)
    u[1] = u[0]
    u[3] = u[2]
    groups = np.full(12, -1)
    groups[[0, 1]] = 0
    groups[[4, 5]] = 1  # orthogonal pair: every random pair scores >= 0
    p, stat, size = cs.permutation_pvalues(u, groups, 2, 99, np.random.default_rng(0))
    assert stat[0] == pytest.approx(1.0) and stat[1] == pytest.approx(0.0)
    # pairs (0,1) and (2,3) are the only ones with cosine 1: P(random pair scores >= 1) = 2/66
    assert p[0] < 0.15 and p[1] == 1.0
    assert size.tolist() == [2, 2]


# --------------------------------------------------------------------------------------------- curate


def test_planted_phenotypes_kept_and_null_genes_dropped():
    meta, emb, active = simulate(n_genes=60, strength=0.8, seed=7)
    cfg = cu.CurationConfig(min_wells=10, n_permutations=500)
    res = cu.curate(meta, {"prior": emb}, cfg)
    per = res.perturbations.set_index("perturbation")
    act = per.index.map(active).to_numpy(bool)
    kept = per["kept"].to_numpy()
    assert act.sum() >= 20 and (~act).sum() >= 20
    assert kept[act].mean() >= 0.85
    assert kept[~act].mean() <= 0.1
    # every kept gene image belongs to a kept perturbation; controls survive (undersampled)
    genes = res.index[~res.index["is_control"]]
    assert set(genes["perturbation"]) == set(per.index[kept])
    assert res.index["image_id"].is_unique and list(res.index.columns)[0] == "image_id"


def test_any_embedding_set_keeps_a_perturbation():
    meta, emb, active = simulate(n_genes=30, seed=8)
    noise = np.random.default_rng(9).normal(size=emb.shape).astype(np.float32)
    cfg = cu.CurationConfig(min_wells=10, n_permutations=300)
    both = cu.curate(meta, {"prior": emb, "noise": noise}, cfg).perturbations.set_index("perturbation")
    only = cu.curate(meta, {"prior": emb}, cfg).perturbations.set_index("perturbation")
    np.testing.assert_array_equal(both["p_prior"], only["p_prior"])  # same null draws for every set
    expected = (both["p_prior"] < 0.01) | (both["p_noise"] < 0.01)
    np.testing.assert_array_equal(both["kept"], expected)
    assert both["kept"].sum() >= only["kept"].sum()


def test_filters_and_report_counts():
    meta, emb, _ = simulate(n_genes=10, n_exp=4, plates=1, reps=3, n_ctrl=40, sites=2, seed=10)
    # G0 only in 2 experiments, G1 loses wells below the minimum; one image with a missing plate
    meta = meta[~((meta.perturbation == "G0") & meta.experiment.isin(["e2", "e3"]))]
    meta = meta[~((meta.perturbation == "G1") & (meta.well_id.isin(["w1", "w11"])))]
    emb = emb[meta.index]
    meta = meta.reset_index(drop=True)
    meta.loc[5, "plate"] = ""
    cfg = cu.CurationConfig(
        min_experiments=3,
        min_wells=10,
        keep_positive_controls=0.1,
        keep_negative_controls=0.3,
        n_permutations=50,
        alpha=0.99,
    )
    res = cu.curate(meta, {"e": emb}, cfg)
    steps = {s["step"]: s for s in res.report["steps"]}
    assert [s["step"] for s in res.report["steps"]] == [
        "input",
        "missing_metadata",
        "image_quality",
        "min_replicates",
        "control_undersampling",
        "consistency",
    ]
    assert steps["input"]["images"] == len(meta)
    assert steps["missing_metadata"]["removed_images"] == 1
    assert steps["min_replicates"]["removed_perturbations"] == 2  # G0 (2 experiments) and G1 (4 x 1 = 4 wells)
    assert steps["min_replicates"]["perturbations"] == 8
    per = res.perturbations.set_index("perturbation")
    assert per.loc[["G0", "G1"], "dropped_at"].tolist() == ["min_replicates"] * 2
    assert per.loc["G1", "n_wells"] == 4 and per.loc["G0", "n_experiments"] == 2
    assert set(per.dropped_at[per.kept]) == {""} and (per.dropped_at[~per.kept] != "").all()
    # controls per plate: 10 positive -> 1 kept, 30 negative -> 9 kept; 4 plates
    assert steps["control_undersampling"]["control_wells"] == 4 * (1 + 9)
    kept_ctrl = res.index[res.index.is_control].drop_duplicates(["plate", "well_id"])
    assert (kept_ctrl.control_type == "positive").sum() == 4
    assert steps["consistency"]["images"] == len(res.index)
    # seeded: same seed, same wells; another seed, other wells
    again = cu.curate(meta, {"e": emb}, cfg).index
    other = cu.curate(meta, {"e": emb}, cu.CurationConfig(**{**cfg.__dict__, "seed": 1})).index
    assert again["image_id"].tolist() == res.index["image_id"].tolist()
    assert set(other["image_id"]) != set(res.index["image_id"])
    md = cu.report_markdown(res.report)
    for s in steps:
        assert f"| {s} |" in md


def test_image_quality_flags_blank_saturated_and_blurred():
    rng = np.random.default_rng(11)
    imgs = rng.integers(20, 200, size=(8, 32, 32, 3)).astype(np.uint8)
    imgs = ndimage.gaussian_filter(imgs.astype(float), sigma=(0, 0.7, 0.7, 0)).astype(np.uint8)
    imgs[1] = 0  # blank
    imgs[2, :16, :, 1] = 255  # half a channel saturated
    imgs[3] = ndimage.gaussian_filter(imgs[3].astype(float), sigma=(3, 3, 0)).astype(np.uint8)  # out of focus
    q = pd.DataFrame(cs.image_quality(imgs))
    assert q["contrast"][1] == 0 and q["saturation"][2] == pytest.approx(0.5)
    meta = pd.DataFrame({"plate": ["p0"] * 8})
    flags = cu.quality_flags(meta, q, cu.CurationConfig())
    assert flags["blank"].tolist() == [False, True] + [False] * 6
    assert flags["saturated"].tolist() == [False, False, True] + [False] * 5
    assert flags["out_of_focus"].tolist() == [False, False, False, True] + [False] * 4


def test_store_curation_writes_index_and_report(tmp_path):
    from vitally_jax.data.store import METADATA_COLUMNS, ImageStore, write_store

    meta, emb, active = simulate(n_genes=12, n_exp=3, plates=1, reps=4, n_ctrl=8, seed=12)
    meta = meta.assign(well_row=0, well_col=0, site=0, guide_id="", concentration=np.nan)
    meta = meta[list(METADATA_COLUMNS)]
    rng = np.random.default_rng(13)
    imgs = ndimage.gaussian_filter(
        rng.integers(0, 200, (len(meta), 16, 16, 2)).astype(float), sigma=(0, 1, 1, 0)
    ).astype(np.uint8)
    imgs[0] = 0
    write_store(tmp_path / "s", imgs, meta, ["DNA", "ER"])
    np.save(tmp_path / "emb.npy", emb)
    # a well-level table as exported by embed_screen: metadata (numeric columns too) + feature_* columns
    emb_pq = pd.concat(
        [
            meta.drop(columns=["image_id", "site"]).reset_index(drop=True),
            pd.DataFrame(emb, columns=[f"feature_{i:04d}" for i in range(emb.shape[1])]),
        ],
        axis=1,
    )
    emb_pq.iloc[::-1].to_parquet(tmp_path / "emb.parquet")
    curate_cli = types.SimpleNamespace(main=tool_main("curate"))

    out = tmp_path / "cur" / "index.parquet"
    rc = curate_cli.main(
        [
            "--store",
            str(tmp_path / "s"),
            "--embeddings",
            f"a={tmp_path / 'emb.npy'}",
            "--embeddings",
            f"b={tmp_path / 'emb.parquet'}",
            "--out",
            str(out),
            "--min-wells",
            "8",
            "--permutations",
            "200",
            "--batch-size",
            "7",
        ]
    )
    assert rc == 0
    idx = pd.read_parquet(out)
    store = ImageStore.open(tmp_path / "s")
    rows = store.index_of(idx["image_id"])  # the index names images of the store
    from vitally_jax.data.pipeline import resolve_index

    np.testing.assert_array_equal(resolve_index(store, out), rows)  # what training reads via data.index
    assert len(rows) == len(idx) and meta.image_id[0] not in set(idx.image_id)
    report = json.loads((tmp_path / "cur" / "index.report.json").read_text())
    q = next(s for s in report["steps"] if s["step"] == "image_quality")
    assert q["removed_by_reason"]["blank"] == 1
    per = pd.read_parquet(tmp_path / "cur" / "index.report.perturbations.parquet")
    np.testing.assert_allclose(per["p_a"], per["p_b"])  # parquet rows re-aligned by plate + well
    md = (tmp_path / "cur" / "index.report.md").read_text().splitlines()
    assert [line for line in md if not line.startswith("<!--")][0] == "# Curation report"  # after the file tag
    # 6 negative controls per experiment are too few for sets of 4 wells: the null is drawn from all wells
    steps = {s["step"]: s for s in report["steps"]}
    assert steps["consistency"]["null_pool"] == "controls"
    assert steps["consistency"]["experiments_null_from_all_wells"] == 3
    assert any("null from all wells in 3 experiment(s)" in line for line in md)
    # bad input: one line, data exit code, nothing written
    bad = tmp_path / "bad" / "index.parquet"
    np.save(tmp_path / "short.npy", emb[:5])
    rc = curate_cli.main(
        [
            "--store",
            str(tmp_path / "s"),
            "--embeddings",
            f"a={tmp_path / 'short.npy'}",
            "--out",
            str(bad),
            "--no-quality",
        ]
    )
    assert rc == DataError.exit_code and not bad.exists()
    assert curate_cli.main(["--store", str(tmp_path / "s"), "--embeddings", "nopath", "--out", str(bad)]) == 3


def test_bad_input_errors():
    meta, emb, _ = simulate(n_genes=4, n_exp=1, plates=1, reps=1, n_ctrl=2)
    with pytest.raises(DataError, match="missing column"):
        cu.curate(meta.drop(columns=["experiment"]), {"a": emb})
    with pytest.raises(DataError, match="embedding set 'a'"):
        cu.curate(meta, {"a": emb[:-1]})
    with pytest.raises(DataError, match="NaN"):
        cu.curate(meta, {"a": np.full_like(emb, np.nan)})
    with pytest.raises(DataError, match="duplicate image_id"):
        cu.curate(pd.concat([meta, meta.iloc[:1]]), None)
    with pytest.raises(ConfigError, match="keep_positive_controls"):
        cu.CurationConfig(keep_positive_controls=1.5)
    with pytest.raises(ConfigError, match="normalize"):
        cu.CurationConfig(normalize="well")
    with pytest.raises(ConfigError, match="null_pool"):
        cu.CurationConfig(null_pool="positive")


def test_synthetic_screen_planted_genes_kept_with_image_statistics(tmp_path):
    """Acceptance on the embedded synthetic world: image-statistics embeddings, the full CLI path."""
    from vitally_jax.data.synthetic import generate_screen, preset

    path = generate_screen(
        tmp_path / "screen", preset("tiny", replicates=4, guides_per_gene=3, no_phenotype_fraction=0.4, seed=3)
    )
    curate_cli = types.SimpleNamespace(main=tool_main("curate"))

    out = tmp_path / "index.parquet"
    rc = curate_cli.main(
        ["--store", str(path), "--image-statistics", "--out", str(out), "--min-wells", "8", "--permutations", "500"]
    )
    assert rc == 0
    genes = pd.read_parquet(path / "genes.parquet").set_index("gene")
    per = pd.read_parquet(tmp_path / "index.report.perturbations.parquet").set_index("perturbation")
    g = genes.join(per, how="inner")
    assert len(g) == len(genes)
    # 12 wells in 4 experiments; a few images fail the quality filters
    assert (g.dropped_at == "min_replicates").sum() <= 2
    g = g[g.dropped_at != "min_replicates"]
    planted, null = g[g.has_phenotype], g[~g.has_phenotype]
    assert len(planted) >= 20 and len(null) >= 10
    print(
        "kept planted",
        planted.kept.mean(),
        "kept null",
        null.kept.mean(),
        "kept strong",
        planted[planted.strength >= 1.0].kept.mean(),
    )
    # per-channel image statistics of 64 px fields read only part of the world's (mostly spatial) processes
    # (docs/world.md), so fewer planted genes look consistent to them than to richer features
    assert planted.kept.mean() >= 0.45
    assert planted[planted.strength >= 1.0].kept.mean() >= 0.6
    assert null.kept.mean() <= 0.1
    idx = pd.read_parquet(out)
    assert set(idx.loc[idx.perturbation_type == "gene", "perturbation"]) == set(g.index[g.kept])
