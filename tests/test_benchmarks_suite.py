"""Whole-suite behaviour: validation errors, blockwise recall, replicate consistency, compound-gene activity,
`benchmark(...)` and the `tools/benchmark.py` command line."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pandas as pd
import pytest

from vitally_jax import benchmarks as B
from vitally_jax.benchmarks import annotations as ann
from vitally_jax.benchmarks import compound
from vitally_jax.errors import BenchmarkInputError


def _screen(n_filler=100, reps=4, batches=3, ctrl=10, d=12, signal=1.0, seed=0):
    """Well-level screen with real genes: 4 CORUM complexes share signatures, plus `n_filler` other annotated genes
    with their own random signatures; metadata per the data contract."""
    rng = np.random.default_rng(seed)
    clusters = [sorted(c) for c in ann.load_clusters("CORUM").values() if 10 <= len(c) <= 15][:4]
    genes = sorted({g for c in clusters for g in c})
    pool = sorted(set(ann.load_relationships("HuMAP").entity1) - set(genes))
    genes += list(rng.choice(pool, n_filler, replace=False))
    sig = {g: rng.normal(size=d) * (0.3 if k < len(genes) - n_filler else 1.0) for k, g in enumerate(genes)}
    for c in clusters:
        centre = rng.normal(size=d)
        for g in c:
            if g in sig:
                sig[g] = sig[g] + centre
    rows, meta = [], []
    off = rng.normal(size=(batches, d)) * 2
    for b in range(batches):
        for k in range(ctrl):
            rows.append(off[b] + rng.normal(size=d) * 0.5)
            meta.append(("EMPTY", f"exp{b}", True, f"nt{k % 2}"))
        for g in genes:
            for r in range(reps if b < 2 else 1):
                rows.append(off[b] + signal * sig[g] + rng.normal(size=d) * 0.5)
                meta.append((g, f"exp{b}", False, f"{g}_{r}"))
    md = pd.DataFrame(meta, columns=["perturbation", "experiment", "is_control", "guide_id"])
    md["perturbation_type"] = np.where(md.is_control, "control", "gene")
    return np.array(rows), md


def test_validation_errors_are_one_line_benchmark_input_errors():
    x, md = _screen()
    bad = x.copy()
    bad[3, 2] = np.nan
    cases = [
        (lambda: B.align(bad, md, control_col="is_control"), "NaN/inf"),
        (lambda: B.align(x, md.assign(is_control=False)), "none found"),
        (lambda: B.known_relationship_recall(x[:30], ["A"] * 30), "duplicate labels"),
        (lambda: B.known_relationship_recall(x[:30], [f"NOTAGENE{i}" for i in range(30)]), "no annotated pair"),
        (lambda: B.known_relationship_recall(x[:5], ["SNRPE", "SNRPF", "SNRPG", "A", "B"]), "at least 20"),
        (lambda: B.benchmark(x, md.assign(perturbation=[f"u{i}" for i in range(len(md))])), "replicate wells"),
        (
            lambda: B.known_relationship_recall(
                x[:30], [f"G{i}" for i in range(30)], sources=[pd.DataFrame({"a": ["G1"], "b": ["G2"]})]
            ),
            "missing columns",
        ),
        (lambda: B.cluster_benchmark(x[:30], [f"G{i}" for i in range(30)]), "no complex"),
    ]
    for fn, match in cases:
        with pytest.raises(BenchmarkInputError, match=match) as e:
            fn()
        assert "\n" not in str(e.value) and e.value.exit_code == 7


def test_user_table_with_unknown_genes_warns_with_counts():
    x = np.random.default_rng(0).normal(size=(25, 6))
    labels = [f"G{i}" for i in range(25)]
    table = pd.DataFrame({"entity1": ["G1", "G2", "G3", "X1"], "entity2": ["G2", "G1", "G9", "X2"]})
    with pytest.warns(UserWarning, match=r"2 of 3 pairs skipped|1 of 3 pairs skipped"):
        rec = B.known_relationship_recall(x, labels, sources={"mine": table})
    assert rec.query_distribution_size.tolist() == [2]  # G1-G2 (deduplicated) and G3-G9


@pytest.mark.parametrize("threads", [1, 2])
def test_blockwise_recall_equals_dense(threads):
    rng = np.random.default_rng(3)
    genes = sorted(set(ann.load_relationships("CORUM").entity1))[:400]
    x = rng.normal(size=(400, 8))
    x[5] = x[6]  # exact ties between a query and null entries
    dense = B.known_relationship_recall(x, genes, dense=True)
    block = B.known_relationship_recall(x, genes, dense=False, block_rows=33, threads=threads)
    pd.testing.assert_frame_equal(dense, block)
    sn = B.SortedNull(x, block_rows=33, threads=threads)
    assert sn.size == 400 * 399 // 2
    # same pairs; blocked BLAS products may differ from the full product in the last bits: a length-8 dot product
    # of unit vectors is within 8 * 2^-53 (8.9e-16) of exact, so two evaluations within 2e-15
    np.testing.assert_allclose(sn.values(), np.sort(B.cosine_matrix(x)[np.triu_indices(400, 1)]), rtol=0, atol=2e-15)
    q = np.array([-0.5, 0.0, 0.1, 0.99])
    below, below_eq = sn.counts(q)
    np.testing.assert_array_equal(below, np.searchsorted(sn.values(), q, "left"))
    np.testing.assert_array_equal(below_eq, np.searchsorted(sn.values(), q, "right"))


def test_replicate_consistency_detects_signal_and_its_absence():
    x, md = _screen()
    x = B.align(x, md)  # TVN removes the batch offsets
    live = B.replicate_consistency(x, md.perturbation, md.experiment, controls=["EMPTY"], seed=1)
    x0, md0 = _screen(signal=0.0)
    dead = B.replicate_consistency(B.align(x0, md0), md0.perturbation, md0.experiment, controls=["EMPTY"], seed=1)
    assert live["ks_stat"] > 0.5 and live["cvm_pval"] < 1e-6
    assert live["mean_replicate_cosine"] > live["mean_random_cosine"] + 0.3
    assert dead["ks_stat"] < 0.15 and dead["ks_pval"] > 1e-3
    n_genes = md.perturbation.nunique() - 1
    assert live["n_replicate_pairs"] == n_genes * (4 * 4 + 4 + 4)  # exp0-exp1, exp0-exp2, exp1-exp2 pairs


def test_average_precision_and_auc_match_sklearn():
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(0)
    for k in range(5):
        y = (rng.uniform(size=30) < 0.3).astype(float)
        y[0], y[1] = 1, 0
        s = np.round(rng.uniform(size=30), 1 if k % 2 else 6)  # with and without ties
        assert compound.average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)
        assert compound.roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_compound_gene_activity_scores_planted_targets():
    rng = np.random.default_rng(0)
    genes = [f"G{i}" for i in range(120)]
    gx = rng.normal(size=(120, 16))
    comp_rows, comp_lab, known = [], [], []
    for c in range(12):
        targets = rng.choice(120, 3, replace=False)
        for conc in (100.0, 1000.0, 10000.0):
            v = rng.normal(size=16) * 0.5
            if conc >= 1000:
                v = v - gx[targets].sum(0) * (0.6 if conc > 1000 else 0.3)  # anti-correlated: |cos| counts
            comp_rows.append(v)
            comp_lab.append(f"C{c}")
        known += [(f"C{c}", genes[t], 300.0) for t in targets]
        known.append((f"C{c}", genes[(targets[0] + 1) % 120], 5000.0))  # grey zone: excluded
    known = pd.DataFrame(known, columns=["compound", "gene", "potency_nM"])
    scores = B.compound_gene_scores(np.array(comp_rows), comp_lab, gx, genes)
    assert scores.shape == (12, 120)
    r = B.compound_gene_activity(scores, known, n_seeds=20)
    assert r["n_compounds"] == 12 and r["ap_mean"] > 0.6 and r["auc_mean"] > 0.8 and r["z_score"] > 5
    assert 0.2 < r["rand_ap_mean"] < 0.45  # 3 actives vs 20 negatives: random AP ~ 3/23 + small-sample excess
    shuffled = scores.copy()
    shuffled[:] = rng.permutation(scores.to_numpy().ravel()).reshape(scores.shape)
    r0 = B.compound_gene_activity(shuffled, known, n_seeds=20)
    assert abs(r0["z_score"]) < 3


def test_benchmark_report_and_cli(tmp_path, repo_root, capsys):
    x, md = _screen()
    rep = B.benchmark(x, md, map_null_size=500)
    s = rep.summary
    assert s["CORUM_recall_0.05_0.95"] > 0.5  # complexes share signatures
    assert s["replicate_ks_stat"] > 0.5 and s["map_activity_fraction_retrieved"] > 0.5
    assert set(rep.tables) >= {"recall", "clusters", "consistency", "magnitude", "map_activity"}
    emb, meta = tmp_path / "emb.npy", tmp_path / "meta.parquet"
    np.save(emb, x)
    md.to_parquet(meta)
    out = tmp_path / "report"
    spec = importlib.util.spec_from_file_location("benchmark_cli", repo_root / "tools" / "benchmark.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert (
        cli.main(["--embeddings", str(emb), "--metadata", str(meta), "--out", str(out), "--map-null-size", "500"]) == 0
    )
    got = json.loads((out / "summary.json").read_text())["summary"]
    assert got["CORUM_recall_0.05_0.95"] == pytest.approx(s["CORUM_recall_0.05_0.95"])
    for f in ["summary.csv", "report.md", "recall.csv", "recall.png", "similarities.png", "map_activity.csv"]:
        assert (out / f).stat().st_size > 100, f
    assert (out / "recall.png").read_bytes()[:4] == b"\x89PNG"
    # bad input: one line, exit code 7, and no output folder left behind
    x[0, 0] = np.inf
    np.save(emb, x)
    capsys.readouterr()
    assert cli.main(["--embeddings", str(emb), "--metadata", str(meta), "--out", str(tmp_path / "bad")]) == 7
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.strip().count("\n") == 0 and "NaN/inf" in err
    assert not (tmp_path / "bad").exists()
