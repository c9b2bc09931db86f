"""Linear probes (JAX vs scikit-learn), functional gene groups, sweep tasks, table/plot, trimmed export."""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score

from vitally_jax.benchmarks.annotations import load_clusters
from vitally_jax.errors import BenchmarkInputError, ConfigError, DataError
from vitally_jax.probes.gene_groups import functional_gene_groups, gene_labels
from vitally_jax.probes.linear import (
    JaxLogisticProbe,
    SklearnLogisticProbe,
    balanced_accuracy,
    make_probe,
    probe_scores,
)
from vitally_jax.probes.sweep import (
    best_blocks,
    perturbation_split,
    run_sweep,
    task_gene_groups,
    task_perturbation,
    write_sweep,
)


def _blobs(rng, n, centers, scales, noise=2.0):
    """(len(scales), n, d) features whose class separability grows with scale; labels (n,) as strings."""
    y = rng.integers(0, len(centers), n)
    x = np.stack([centers[y] * s + rng.normal(size=(n, centers.shape[1])) * noise for s in scales])
    return x.astype(np.float32), np.array([f"class_{c:02d}" for c in y])


def test_jax_probe_agrees_with_sklearn_within_one_point():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(12, 24))
    scales = (0.25, 0.5, 0.8, 1.2)
    trx, try_ = _blobs(rng, 600, centers, scales)
    tex, tey = _blobs(rng, 600, centers, scales)
    acc_jax = probe_scores(trx, try_, tex, tey, probe=JaxLogisticProbe(C=0.5))
    acc_sk = probe_scores(trx, try_, tex, tey, probe=SklearnLogisticProbe(C=0.5))
    assert acc_jax.shape == acc_sk.shape == (4,)
    np.testing.assert_allclose(acc_jax, acc_sk, atol=0.01)
    assert np.all(np.diff(acc_sk) > 0)  # more separable blocks score higher
    assert acc_sk[0] > 1.5 / 12 and acc_sk[-1] > 0.7  # chance is 1/12
    # predictions themselves nearly identical, and string labels come back
    p_jax = JaxLogisticProbe(C=0.5).fit_predict(trx, try_, tex)
    p_sk = SklearnLogisticProbe(C=0.5).fit_predict(trx, try_, tex)
    assert p_jax.dtype.kind == "U" and (p_jax == p_sk).mean() > 0.97


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_balanced_accuracy_matches_sklearn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 5, 200)
    p = np.where(rng.random(200) < 0.6, y, rng.integers(0, 7, 200))
    assert balanced_accuracy(y, p) == pytest.approx(balanced_accuracy_score(y, p), abs=1e-12)
    with pytest.raises(DataError, match="equal-length"):
        balanced_accuracy(y, p[:-1])


def test_probe_input_errors():
    x = np.zeros((2, 10, 3), np.float32)
    with pytest.raises(DataError, match="at least 2 classes"):
        JaxLogisticProbe().fit_predict(x, np.zeros(10), x)
    with pytest.raises(DataError, match="10 training samples"):
        JaxLogisticProbe().fit_predict(x, np.arange(9) % 2, x)
    with pytest.raises(DataError, match="differ in blocks or features"):
        SklearnLogisticProbe().fit_predict(x, np.arange(10) % 2, x[:1])
    with pytest.raises(ConfigError, match="'jax' or 'sklearn'"):
        make_probe("torch")


def test_functional_gene_groups_are_disjoint_and_sized():
    groups = functional_gene_groups()
    assert len(groups) == 40
    sizes = [len(v) for v in groups.values()]
    assert min(sizes) >= 5 and max(sizes) <= 20
    labels = gene_labels(groups)
    assert len(labels) == sum(sizes)  # disjoint
    complexes = load_clusters("CORUM", repeated="union")
    for name, genes in groups.items():
        assert set(genes) <= set(complexes[name])
    # restricted to the screened genes, deterministic
    screened = sorted(labels)[::2] + ["NOT_A_GENE"]
    small = functional_gene_groups(screened, min_size=3, max_size=10, max_groups=15)
    assert small == functional_gene_groups(screened, min_size=3, max_size=10, max_groups=15)
    assert 0 < len(small) <= 15
    assert all(set(v) <= set(screened) and 3 <= len(v) <= 10 for v in small.values())
    with pytest.raises(ConfigError, match="min_size"):
        functional_gene_groups(min_size=10, max_size=5)


def _toy_wells(rng, genes_by_group, experiments=4, reps=2, d=16, noise=0.6):
    """Well table + per-block features: gene signal = group program + gene offset, grows with block."""
    rows, signal = [], []
    programs = {g: rng.normal(size=d) for g in genes_by_group}
    gene_off = {}
    for grp, genes in genes_by_group.items():
        for gene in genes:
            gene_off[gene] = programs[grp] + 0.5 * rng.normal(size=d)
    for e in range(experiments):
        for gene in gene_off:
            for r in range(reps):
                rows.append(
                    dict(
                        well_id=f"E{e}_{gene}_{r}",
                        plate=f"P{e}",
                        experiment=f"E{e}",
                        perturbation=gene,
                        perturbation_type="gene",
                        is_control=False,
                    )
                )
                signal.append(gene_off[gene])
        for r in range(3):
            rows.append(
                dict(
                    well_id=f"E{e}_ctl_{r}",
                    plate=f"P{e}",
                    experiment=f"E{e}",
                    perturbation="EMPTY",
                    perturbation_type="control",
                    is_control=True,
                )
            )
            signal.append(np.zeros(d))
    signal = np.asarray(signal)
    feats = np.stack([signal * s + noise * rng.normal(size=signal.shape) for s in (0.1, 0.5, 1.0)])
    return pd.DataFrame(rows), feats.astype(np.float32)


def test_sweep_tasks_table_and_plot(tmp_path):
    rng = np.random.default_rng(2)
    groups = {f"group_{i}": [f"G{i}_{j}" for j in range(5)] for i in range(4)}
    meta, feats = _toy_wells(rng, groups)
    train, test = perturbation_split(meta, test_fraction=0.25)
    assert set(meta.experiment[train]) == {"E0", "E1", "E2"} and set(meta.experiment[test]) == {"E3"}
    assert not meta.is_control[np.r_[train, test]].any()
    probe = JaxLogisticProbe()
    acc = task_perturbation(feats, meta, probe=probe)
    assert acc.shape == (3,) and acc[2] > acc[0] and acc[2] > 0.5
    acc_g = task_gene_groups(feats, meta, probe=probe, groups=groups)
    assert acc_g[2] > 0.6 and acc_g[2] > acc_g[0]
    table = run_sweep(
        {"model": (feats, [1, 2, 3])}, meta, probe=probe, task_options={"gene_groups": {"groups": groups}}
    )
    assert len(table) == 2 * 3
    np.testing.assert_allclose(table[table.task == "perturbation"]["score"], acc)
    b_star = write_sweep(table, tmp_path, extra={"note": "toy"})
    assert b_star["perturbation"] == 3 and b_star["overall"] == 3
    assert b_star == best_blocks(table)
    saved = pd.read_csv(tmp_path / "sweep.csv")
    assert list(saved.columns) == ["source", "task", "block", "score"] and len(saved) == 6
    payload = json.loads((tmp_path / "sweep.json").read_text())
    assert payload["b_star"]["overall"] == 3 and payload["note"] == "toy" and len(payload["rows"]) == 6
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_input_errors():
    rng = np.random.default_rng(3)
    groups = {f"group_{i}": [f"G{i}_{j}" for j in range(3)] for i in range(2)}
    meta, feats = _toy_wells(rng, groups, experiments=1)
    with pytest.raises(BenchmarkInputError, match=">= 2 experiments"):
        perturbation_split(meta)
    with pytest.raises(BenchmarkInputError, match=r"features \(blocks"):
        task_perturbation(feats[:, :-1], meta, probe=JaxLogisticProbe())
    with pytest.raises(BenchmarkInputError, match="2 groups"):
        task_gene_groups(feats, meta, probe=JaxLogisticProbe(), groups={"only": ["G0_0", "G0_1"]})
    with pytest.raises(ConfigError, match="tasks"):
        run_sweep({"model": (feats, [1, 2, 3])}, meta, tasks=["nope"])


def test_sweep_tool_on_synthetic_screen_and_trimmed_export(tmp_path, repo_root):
    """tools/probe_sweep.py end to end: embeddings, baselines, table + plot, b*, and the trimmed export."""
    import importlib.util

    from flax import nnx

    from vitally_jax.checkpoint import export_encoder, load_encoder
    from vitally_jax.data.store import ImageStore
    from vitally_jax.data.synthetic import generate_screen
    from vitally_jax.embedding.blocks import embed
    from vitally_jax.embedding.screen import EmbeddingStore
    from vitally_jax.models.vit import ViTEncoder, vit_config

    screen = ImageStore.open(generate_screen(tmp_path / "screen", "tiny"))
    enc = ViTEncoder(vit_config("mu/8", depth=3, in_chans=6), rngs=nnx.Rngs(1))
    enc.blocks.gamma[...] = 0.5 * np.ones(enc.blocks.gamma[...].shape, np.float32)  # blocks visibly differ
    export_encoder(tmp_path / "encoder", nnx.state(enc), enc.cfg)

    spec = importlib.util.spec_from_file_location("probe_sweep_tool", repo_root / "tools" / "probe_sweep.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "sweep"
    rc = tool.main(
        [
            "--encoder",
            str(tmp_path / "encoder"),
            "--store",
            str(screen.path),
            "--out",
            str(out),
            "--crop",
            "32",
            "--group-min-size",
            "3",
            "--folds",
            "3",
            "--chunk-images",
            "128",
            "--trim",
            str(tmp_path / "trimmed"),
            "--no-progress",
        ]
    )
    assert rc == 0
    table = pd.read_csv(out / "sweep.csv")
    counts = table.groupby(["source", "task"]).size().to_dict()
    assert counts == {
        (s, t): n
        for s, n in (("model", 3), ("random_init", 3), ("image_stats", 1))
        for t in ("perturbation", "gene_groups")
    }
    assert table["score"].between(0, 1).all()
    payload = json.loads((out / "sweep.json").read_text())
    b_star = payload["b_star"]
    model = table[table.source == "model"]
    for task in ("perturbation", "gene_groups"):
        scores = model[model.task == task].set_index("block")["score"]
        assert b_star[task] == scores.idxmax()
    stats = table[(table.source == "image_stats") & (table.task == "gene_groups")]["score"].iloc[0]
    assert stats > 2 / 11  # per-channel statistics see the synthetic biology (11 groups, chance 1/11)
    assert (out / "sweep.png").stat().st_size > 10_000

    # E: the trimmed export loads and reproduces block b*'s embeddings
    trimmed, cfg, _ = load_encoder(tmp_path / "trimmed")
    assert cfg.depth == b_star["overall"]
    stored = EmbeddingStore.open(out / "embeddings" / "model")
    imgs = screen.read_many(0, 3)
    tiles = imgs.reshape(3, 2, 32, 2, 32, 6).transpose(0, 1, 3, 2, 4, 5).reshape(12, 32, 32, 6)
    got = embed(trimmed, tiles, pooling="mean", batch_size=64)["mean"][:, -1].reshape(3, 4, -1).mean(axis=1)
    # a trimmed program and other batch sizes than the sweep's: float32 rounding may differ by a few ulps (|x| ~ 2)
    np.testing.assert_allclose(got, stored.features("mean", [b_star["overall"]])[0, :3], atol=1e-5)
    full = embed(enc, tiles, blocks=[b_star["overall"]], pooling="mean", batch_size=64)["mean"][:, 0]
    np.testing.assert_allclose(embed(trimmed, tiles, pooling="mean", batch_size=64)["mean"][:, -1], full, atol=1e-5)
