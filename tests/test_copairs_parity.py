"""copairs 0.5.5 parity for the features added on top of plain mAP: normalised AP, hierarchical FDR (compound over
doses), multilabel AP, and the float32 tie rule between an observed mAP and its null. Random data here; the real
LINCS plate in `test_lincs_plate.py`. Tolerance 1e-6 on every float (ours and copairs' agree to ~1e-15 in float64;
p-values are exact multiples of 1 / (null_size + 1))."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from vitally_jax.benchmarks import hierarchical, mapk, multilabel, normalized

copairs_map = pytest.importorskip("copairs.map")
from copairs.map import multilabel as copairs_multilabel  # noqa: E402
from copairs.map.normalization import expected_ap, normalize_ap  # noqa: E402
from copairs.matching import assign_reference_index  # noqa: E402

TOL = 1e-6


def _dose_wells(seed=0, n_cpd=12, n_ctrl=16, d=10):
    """Compounds at 4 doses x 2 replicates; a third of compounds active (effect rising with dose)."""
    rng = np.random.default_rng(seed)
    rows, cpd, dose = [], [], []
    for _ in range(n_ctrl):
        rows.append(rng.normal(size=d))
        cpd.append("DMSO")
        dose.append(0.0)
    for c in range(n_cpd):
        direction = rng.normal(size=d) * (4.0 if c % 3 == 0 else 0.0)
        for k, dz in enumerate([0.1, 0.3, 1.0, 3.0]):
            for _ in range(2):
                rows.append(direction * k / 3 + rng.normal(size=d))
                cpd.append(f"C{c:02d}")
                dose.append(dz)
    x = np.array(rows)
    x[1] = x[2]  # tied controls
    return x, pd.DataFrame({"cpd": cpd, "dose": dose})


def _copairs_ap(md, x):
    meta = assign_reference_index(md, "cpd == 'DMSO'", reference_col="ref")
    return copairs_map.average_precision(
        meta,
        x,
        pos_sameby=["cpd", "ref"],
        pos_diffby=[],
        neg_sameby=[],
        neg_diffby=["cpd", "ref"],
        progress_bar=False,
    )


def _key(df):
    return df.cpd.astype(str) + "@" + df.dose.map(repr)


def test_expected_and_normalized_ap_equal_copairs():
    m, n = np.meshgrid(np.arange(0, 40), np.arange(0, 60))
    m, n = m.ravel(), n.ravel()
    ok = m + n >= 1
    m, n = m[ok], n[ok]
    ours = normalized.expected_average_precision(m, m + n)
    ref = np.array([expected_ap(int(a), int(b)) for a, b in zip(m, n)])
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)
    ap = np.random.default_rng(0).uniform(size=len(m))
    np.testing.assert_allclose(
        normalized.normalized_average_precision(ap, m, m + n), normalize_ap(ap, m, n), rtol=0, atol=1e-12
    )
    # a random ranking scores ~0 on average, a perfect one 1, the worst one -1 after clipping
    null = mapk.null_average_precisions(np.array([[3, 30]]), 20000, 0)[0]
    assert abs(normalized.normalized_average_precision(null, 3, 30).mean()) < 0.02
    assert normalized.normalized_average_precision(1.0, 3, 30) == pytest.approx(1.0, abs=1e-12)
    mu0 = normalized.expected_average_precision(3, 30)
    assert normalized.normalized_average_precision(0.0, 3, 30) == pytest.approx(-mu0 / (1 - mu0), abs=1e-12)
    assert normalized.normalized_average_precision(0.0, 29, 30) == -1.0  # (0 - mu0) / (1 - mu0) < -1: clipped


def test_activity_with_normalized_ap_and_hierarchical_fdr_equals_copairs(tmp_path):
    x, md = _dose_wells()
    ref_ap = _copairs_ap(md, x)
    ctrl = (md.cpd == "DMSO").to_numpy()
    ours_ap = mapk.average_precisions(x, md.cpd.to_numpy(), reference=ctrl)
    for col in ["average_precision", "normalized_average_precision"]:
        np.testing.assert_allclose(ours_ap[col], ref_ap[col], atol=TOL, equal_nan=True)
    np.testing.assert_array_equal(ours_ap.n_total_pairs[~ctrl], ref_ap.n_total_pairs[~ctrl])

    kw = dict(null_size=400, threshold=0.05, seed=5, progress_bar=False)
    ref_flat = copairs_map.mean_average_precision(ref_ap[~ctrl], ["cpd", "dose"], cache_dir=tmp_path / "a", **kw)
    ref_h = copairs_map.mean_average_precision_hierarchical(
        ref_ap[~ctrl], ["cpd", "dose"], hierarchical_by=["cpd"], cache_dir=tmp_path / "b", **kw
    )
    groups = _key(md)[~ctrl].to_numpy()
    ours_flat = mapk.mean_average_precision(ours_ap[~ctrl], groups, null_size=400, seed=5)
    ours_h = mapk.mean_average_precision(
        ours_ap[~ctrl], groups, null_size=400, seed=5, hierarchical_by=md.cpd[~ctrl].to_numpy()
    )
    for ref, ours in [(ref_flat, ours_flat), (ref_h, ours_h)]:
        ref = ref.assign(group=_key(ref)).set_index("group").loc[ours.group]
        cols = ["mean_average_precision", "mean_normalized_average_precision", "p_value", "corrected_p_value"]
        for col in cols:
            np.testing.assert_allclose(ours[col], ref[col], atol=TOL, err_msg=col)
        np.testing.assert_array_equal(ours.below_corrected_p, ref.below_corrected_p)
    for col in ["stage1_p_value", "stage1_corrected_p_value"]:
        np.testing.assert_allclose(
            ours_h[col], ref_h.assign(group=_key(ref_h)).set_index("group").loc[ours_h.group][col]
        )
    # the test is not vacuous: some compounds pass stage 1 and some do not, and the two corrections differ
    assert 0 < ours_h.stage1_significant.mean() < 1
    assert np.abs(ours_h.corrected_p_value - ours_flat.corrected_p_value).max() > 0.05


def test_tie_rule_counts_null_values_in_float32():
    """An observed mAP one float64 ulp below a float32 null value does not count that value as above it."""
    confs = np.array([[2, 12]])
    null = mapk.null_average_precisions(confs, 300, 11)[0]
    v = float(np.sort(null)[150])
    obs = np.nextafter(v, -np.inf)
    ap = pd.DataFrame(
        {"average_precision": [obs], "normalized_average_precision": [0.0], "n_pos_pairs": [2], "n_total_pairs": [12]}
    )
    ours = mapk.mean_average_precision(ap, ["g"], null_size=300, seed=11)
    expected = ((null > np.float32(obs)).sum() + 1) / 301
    assert ours.p_value[0] == pytest.approx(expected, abs=1e-12)
    assert (null > obs).sum() > (null > np.float32(obs)).sum()  # the float64 rule would have differed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = copairs_map.get_map_pvalue(ap.assign(g="g"), ["g"], null_size=300, seed=11, progress_bar=False)
    assert ours.p_value[0] == pytest.approx(ref.p_value[0], abs=1e-12)


def test_multilabel_ap_equals_copairs(tmp_path):
    rng = np.random.default_rng(3)
    n, d = 45, 8
    names = list("ABCDEFGH")
    labs = [sorted(set(rng.choice(names, rng.integers(1, 4)))) for _ in range(n)]
    centre = {a: rng.normal(size=d) for a in names}
    x = np.array([sum(centre[a] for a in lab) * 0.7 + rng.normal(size=d) for lab in labs])
    x[3] = x[4]
    meta = pd.DataFrame({"t": labs, "pid": np.arange(n)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = copairs_multilabel.average_precision(
            meta, x, pos_sameby=["t"], pos_diffby=[], neg_sameby=[], neg_diffby=["t"], multilabel_col="t",
            progress_bar=False,
        )  # fmt: skip
    ref = ref.sort_values(["t", "pid"]).reset_index(drop=True)
    ours = multilabel.multilabel_average_precisions(x, ["|".join(lab) for lab in labs])
    ours = ours.sort_values(["label", "profile"]).reset_index(drop=True)
    np.testing.assert_array_equal(ours.profile, ref.pid)
    np.testing.assert_array_equal(ours.label, ref.t)
    np.testing.assert_array_equal(ours.n_pos_pairs, ref.n_pos_pairs)
    np.testing.assert_array_equal(ours.n_total_pairs, ref.n_total_pairs)
    for col in ["average_precision", "normalized_average_precision"]:
        np.testing.assert_allclose(ours[col], ref[col], atol=TOL)
    ref_map = copairs_map.mean_average_precision(
        ref, ["t"], null_size=500, threshold=0.05, seed=2, progress_bar=False, cache_dir=tmp_path
    )
    ann = {str(i): "|".join(lab) for i, lab in enumerate(labs)}
    ours_map = multilabel.multilabel_consistency(x, [str(i) for i in range(n)], ann, null_size=500, seed=2)
    assert list(ours_map.annotation) == list(ref_map.t)
    for col in ["mean_average_precision", "mean_normalized_average_precision", "p_value", "corrected_p_value"]:
        np.testing.assert_allclose(ours_map[col], ref_map[col], atol=TOL, err_msg=col)
    assert ours_map.below_corrected_p.any()


def test_counting_and_sorting_rank_paths_agree(monkeypatch):
    x, md = _dose_wells(seed=4)
    ctrl = (md.cpd == "DMSO").to_numpy()
    fast = mapk.average_precisions(x, md.cpd.to_numpy(), reference=ctrl, block_rows=7)
    monkeypatch.setattr(mapk, "_COUNT_MAX_POS", 0)
    slow = mapk.average_precisions(x, md.cpd.to_numpy(), reference=ctrl)
    # the same ranks through two code paths: only the summation order of <= n precision terms may differ
    np.testing.assert_allclose(fast.average_precision, slow.average_precision, rtol=1e-12, atol=0, equal_nan=True)
    full_fast = mapk.average_precisions(x[~ctrl], md.cpd[~ctrl].to_numpy())
    monkeypatch.setattr(mapk, "_COUNT_MAX_POS", 32)
    full_slow = mapk.average_precisions(x[~ctrl], md.cpd[~ctrl].to_numpy(), block_rows=5)
    np.testing.assert_allclose(full_fast.average_precision, full_slow.average_precision, rtol=1e-12, atol=0)


def test_hierarchical_fdr_rules():
    p = np.array([0.001, 0.2, 0.9, 0.04, 0.03, 0.5, 0.6])
    fam = np.array(["a", "a", "a", "b", "b", "c", "d"])
    h = hierarchical.hierarchical_fdr(p, fam)
    # stage 1: min p per family a .001, b .03, c .5, d .6; BH over 4: .004, .06, .6, .6 -> only a passes
    np.testing.assert_allclose(h.stage1_p_value, [0.001] * 3 + [0.03] * 2 + [0.5, 0.6])
    np.testing.assert_allclose(h.stage1_corrected_p_value, [0.004] * 3 + [0.06] * 2 + [0.6, 0.6], rtol=1e-12)
    assert list(h.stage1_significant) == [True] * 3 + [False] * 4
    np.testing.assert_allclose(h.corrected_p_value, [0.003, 0.3, 0.9, 1, 1, 1, 1], rtol=1e-12)
    with pytest.raises(Exception, match="hierarchical_by"):
        hierarchical.hierarchical_fdr(p, fam[:3])
