"""mAP equals copairs (the JUMP consortium reference) within 1e-6: APs, mAPs, p-values, BH, fraction retrieved."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from vitally_jax.benchmarks import mapk
from vitally_jax.errors import BenchmarkInputError

copairs_map = pytest.importorskip("copairs.map")
from copairs.matching import assign_reference_index  # noqa: E402


def _wells(seed=0, n_perts=25, n_ctrl=40, d=12):
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for c in range(n_ctrl):
        rows.append(rng.normal(size=d))
        labels.append("DMSO")
    for p in range(n_perts):
        effect = rng.normal(size=d) * (p % 4) * 0.6  # a quarter of perturbations have no effect
        for r in range(2 + p % 4):
            rows.append(effect + rng.normal(size=d))
            labels.append(f"P{p:02d}")
    x = np.array(rows)
    x[5] = x[6]  # duplicated control well: exact ties between negatives
    x[n_ctrl + 1] = x[n_ctrl]  # duplicated replicate: a tie between positives
    return x, pd.DataFrame({"pert": labels})


def test_phenotypic_activity_equals_copairs(tmp_path):
    x, md = _wells()
    meta = assign_reference_index(md, "pert == 'DMSO'", reference_col="ref")
    ref_ap = copairs_map.average_precision(
        meta,
        x,
        pos_sameby=["pert", "ref"],
        pos_diffby=[],
        neg_sameby=[],
        neg_diffby=["pert", "ref"],
        progress_bar=False,
    )
    ours_ap = mapk.average_precisions(x, md.pert.values, reference=(md.pert == "DMSO").values)
    np.testing.assert_allclose(ours_ap.average_precision, ref_ap.average_precision, atol=1e-6, equal_nan=True)
    np.testing.assert_array_equal(ours_ap.n_pos_pairs, ref_ap.n_pos_pairs)
    np.testing.assert_array_equal(ours_ap.n_total_pairs, ref_ap.n_total_pairs)

    ref_map = copairs_map.mean_average_precision(
        ref_ap, ["pert"], null_size=2000, threshold=0.05, seed=3, progress_bar=False, cache_dir=tmp_path
    )
    ours = mapk.phenotypic_activity(x, md, perturbation_col="pert", control_key="DMSO", null_size=2000, seed=3)
    assert list(ours.perturbation) == list(ref_map.pert)
    for a, b in [("mean_average_precision",) * 2, ("p_value",) * 2, ("corrected_p_value",) * 2]:
        np.testing.assert_allclose(ours[a], ref_map[b], atol=1e-6)
    np.testing.assert_array_equal(ours.below_corrected_p, ref_map.below_corrected_p)
    frac = ours.attrs["fraction_retrieved"]
    assert frac == pytest.approx(ref_map.below_corrected_p.mean()) and 0.3 < frac < 1.0


def test_phenotypic_consistency_equals_copairs(tmp_path):
    rng = np.random.default_rng(1)
    d, n = 10, 60
    complexes = [f"C{k}" for k in range(6)]
    centre = {c: rng.normal(size=d) * (k % 3) for k, c in enumerate(complexes)}
    ann = {f"G{i:02d}": complexes[i % 6] for i in range(48)}  # 12 unannotated genes
    ann["G00"] = ["C0", "C1"]  # multi-label: one profile per label
    genes = [f"G{i:02d}" for i in range(n)]
    x = np.array([(centre[complexes[i % 6]] if i < 48 else 0) + rng.normal(size=d) for i in range(n)])
    ours = mapk.phenotypic_consistency(x, genes, ann, null_size=1000, seed=7)
    prof = [(i, a) for i, g in enumerate(genes) for a in ([ann[g]] if isinstance(ann.get(g), str) else ann.get(g, []))]
    meta = pd.DataFrame({"complex": [a for _, a in prof]})
    feats = x[[i for i, _ in prof]]
    ref_ap = copairs_map.average_precision(
        meta, feats, pos_sameby=["complex"], pos_diffby=[], neg_sameby=[], neg_diffby=["complex"], progress_bar=False
    )
    ref = copairs_map.mean_average_precision(
        ref_ap, ["complex"], null_size=1000, threshold=0.05, seed=7, progress_bar=False, cache_dir=tmp_path
    )
    assert list(ours.annotation) == list(ref.complex)
    for col in ["mean_average_precision", "p_value", "corrected_p_value"]:
        np.testing.assert_allclose(ours[col], ref[col], atol=1e-6)
    assert ours.below_corrected_p.any() and not ours.below_corrected_p.all()


def test_benjamini_hochberg_matches_statsmodels():
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    p = np.random.default_rng(0).uniform(size=50) ** 3
    np.testing.assert_allclose(mapk.benjamini_hochberg(p), multitest.multipletests(p, method="fdr_bh")[1], rtol=1e-12)


def test_map_raises_without_replicates():
    x = np.random.default_rng(0).normal(size=(6, 4))
    with pytest.raises(BenchmarkInputError, match="positive pair"):
        mapk.phenotypic_activity(x, labels=["DMSO", "DMSO", "A", "B", "C", "D"], control_key="DMSO")


def test_blocked_ap_stays_within_documented_memory_bound():
    """Peak allocations (tracemalloc) of all-vs-all AP <= 8*N*D + 12*B*N + 8*B*D + 96*N (mapk docstring), and the
    per-block term really scales with the block size."""
    import tracemalloc

    n, d = 3000, 64
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d))
    groups = np.arange(n) // 4
    peaks = {}
    for b in (100, 400):
        tracemalloc.start()
        out = mapk.average_precisions(x, groups, block_rows=b)
        peaks[b] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peaks[b] <= 8 * n * d + 12 * b * n + 8 * b * d + 96 * n
        assert out.average_precision.notna().all()
    assert (peaks[400] - peaks[100]) / (300 * n) > 10  # ~12 bytes per extra (query, column) of the block
