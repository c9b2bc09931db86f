"""Instruments with error bars: repeated-CV gene-group probe, per-pair recall hits and paired bootstraps,
per-process decoding, verdicts; the demo's crop statistics and the process-sensitivity routine; norm_pix_loss."""

import numpy as np
import pandas as pd
import pytest

from vitally_jax.probes import instruments as I


def test_recall_pair_hits_match_known_relationship_recall():
    from vitally_jax.benchmarks.recall import known_relationship_recall

    rng = np.random.default_rng(0)
    genes = [f"G{k}" for k in range(60)]
    x = rng.normal(size=(60, 8))
    x[1] = x[0] + 0.05 * rng.normal(size=8)  # one strongly related pair
    pairs = pd.DataFrame({"entity1": genes[0:40:2], "entity2": genes[1:40:2]})
    hits, idx = I.recall_pair_hits(x, genes, pairs)
    ref = known_relationship_recall(x, genes, sources={"t": pairs}, min_perturbations=2)
    assert hits.mean() == pytest.approx(ref["recall_0.05_0.95"].iloc[0], abs=1e-12)
    assert len(hits) == 20 and hits[list(map(tuple, idx)).index((0, 1))]


def test_paired_bootstrap_covers_the_difference_and_pairs_cancel_shared_noise():
    rng = np.random.default_rng(1)
    base = rng.random(600) < 0.3
    better = base | (rng.random(600) < 0.1)  # a strict improvement of ~7 points on the same pairs
    d = I.paired_bootstrap_recall(better, base, n_boot=1000, seed=0)
    assert d["lo"] > 0 and d["lo"] <= d["value"] <= d["hi"]
    assert d["value"] == pytest.approx(better.mean() - base.mean())
    # unpaired intervals of the two recalls overlap more than the paired one allows
    a, b = I.bootstrap_mean(better, n_boot=1000), I.bootstrap_mean(base, n_boot=1000)
    assert (d["hi"] - d["lo"]) < (a["hi"] - a["lo"]) + (b["hi"] - b["lo"])
    same = I.paired_bootstrap_recall(base, base, n_boot=200)
    assert same["lo"] == same["hi"] == 0.0 and I.verdict(same["lo"], same["hi"]) == "not resolved"


def test_verdicts():
    assert I.verdict(0.01, 0.2) == "holds"
    assert I.verdict(-0.2, -0.01) == "fails"
    assert I.verdict(-0.01, 0.2) == "not resolved"
    assert I.verdict(float("nan"), 0.1) == "not testable here"


def test_repeated_group_cv_separates_signal_from_noise():
    from vitally_jax.probes.linear import make_probe

    rng = np.random.default_rng(2)
    labels = np.repeat([f"g{k}" for k in range(20)], 4)
    centers = rng.normal(size=(20, 6)) * 3
    signal = centers[np.repeat(np.arange(20), 4)] + rng.normal(size=(80, 6))
    noise = rng.normal(size=(80, 6))
    x = np.stack([signal, noise]).astype(np.float32)
    s, correct = I.repeated_group_cv(
        x, labels, probe=make_probe("sklearn"), seeds=(0, 1, 2), n_splits=4, return_correct=True
    )
    assert s.shape == (2, 3) and correct.shape == (2, 80)
    assert s[0].mean() > 0.6 and s[1].mean() < 0.2  # chance is 0.05
    d = I.paired_bootstrap_balanced(correct[0], correct[1], labels, n_boot=500)
    assert d["lo"] > 0.3
    # the balanced accuracy of the seed-averaged correctness is the mean of the per-seed scores
    assert d["a"] == pytest.approx(s[0].mean(), abs=1e-9)
    with pytest.raises(Exception, match="groups of >= 5"):
        I.repeated_group_cv(x, labels, probe=make_probe("sklearn"), n_splits=5)


def test_decoding_r2_reads_what_is_linearly_there():
    rng = np.random.default_rng(3)
    n = 300
    truth = rng.normal(size=(n, 3))
    x = np.c_[truth[:, :1] * 2 + 0.1 * rng.normal(size=(n, 1)), rng.normal(size=(n, 5))]
    groups = np.repeat(np.arange(60), 5)
    r2 = I.decoding_r2(x, truth, groups)
    assert r2[0] > 0.95 and abs(r2[1]) < 0.1 and abs(r2[2]) < 0.1


def test_crop_statistics_ignore_gain_but_see_structure():
    from vitally_jax.demo.baselines import crop_feature_names, crop_statistics

    rng = np.random.default_rng(4)
    img = rng.integers(20, 120, (2, 32, 32, 3)).astype(np.uint8)
    f = crop_statistics(img, 16)
    assert f.shape == (2, len(crop_feature_names(["a", "b", "c"])))
    brighter = np.clip(img.astype(np.float64) * 2, 0, 255).astype(np.uint8)  # a gain change, nothing clipped
    np.testing.assert_allclose(crop_statistics(brighter, 16), f, atol=0.02)
    smooth = img.copy()
    smooth[:, :, :, 0] = np.sort(smooth[:, :, :, 0], axis=1)  # a different spatial structure, same histogram
    g = crop_statistics(smooth, 16)
    names = crop_feature_names(["a", "b", "c"])
    k = names.index("a_gradient")
    assert g[0, k] < 0.5 * f[0, k]


def test_process_sensitivity_flags_intensity_only_processes():
    from vitally_jax.data import synthetic
    from vitally_jax.demo.baselines import process_sensitivity

    cfg = synthetic.preset("tiny")
    s = process_sensitivity(cfg, synthetic.PROCESSES, crop=32, n=4)
    assert list(s["process"]) == list(synthetic.PROCESSES)
    assert (s["change raw"] > 0).all()  # every process changes the pixels
    assert s["visible"].sum() >= len(synthetic.PROCESSES) // 2
    gain = s.iloc[0]["x1.4 gain, standardised"]
    assert (s["visible"] == (s["change standardised"] > gain)).all()


def test_norm_pix_loss_normalises_each_target_patch():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from vitally_jax.models.mae import MAE, mae_config, normalize_patches

    t = jax.random.normal(jax.random.key(0), (2, 5, 12)) * 3 + 7
    n = normalize_patches(t)
    np.testing.assert_allclose(np.asarray(n.mean(-1)), 0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(n.std(-1)), 1, atol=1e-3)
    from vitally_jax.models import layers
    from vitally_jax.models.mae import masked_mse

    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    noise = jax.random.uniform(jax.random.key(2), (2, 4))
    cfg = mae_config("mu/8", in_chans=3, img_size=16, norm_pix_loss=True)
    out = nnx.jit(lambda m, x, noise: m(x, noise=noise))(MAE(cfg, rngs=nnx.Rngs(0)), x, noise)
    # the loss's target is the per-patch z-score of the patchified image, and the reconstruction term uses it
    expected = normalize_patches(layers.patchify(x, 8))
    np.testing.assert_allclose(np.asarray(out["target"]), np.asarray(expected), atol=1e-5)
    rec = masked_mse(out["pred"], expected, out["mask"])
    assert float(out["loss_rec"]) == pytest.approx(float(rec), rel=1e-5)
    assert not np.allclose(np.asarray(out["target"]), np.asarray(layers.patchify(x, 8)), atol=0.1)
    assert jnp.isfinite(out["loss"])
