"""The real LINCS Cell Painting plate (cpg0004 SQ00015054) through `tools/real/lincs_plate.py`: copairs 0.5.5
parity on real profiles (AP, normalised AP, mAP, p-values, BH and hierarchical corrections, multilabel target mAP)
and the benchmark's own numbers. The plate is not part of the repository: the tests skip when it is absent."""

from __future__ import annotations

import importlib.util
import pathlib
import warnings

import numpy as np
import pandas as pd
import pytest

from vitally_jax.errors import DataError

ROOT = pathlib.Path(__file__).resolve().parent.parent
PLATE = ROOT.parent / "shared" / "data" / "real" / "SQ00015054.csv.gz"
TOL = 1e-6

needs_plate = pytest.mark.skipif(not PLATE.is_file(), reason=f"LINCS plate not found at {PLATE} (not in the repo)")


def _tool():
    spec = importlib.util.spec_from_file_location("lincs_plate", ROOT / "tools" / "real" / "lincs_plate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tool():
    return _tool()


@pytest.fixture(scope="module")
def result(tool):
    if not PLATE.is_file():
        pytest.skip(f"LINCS plate not found at {PLATE} (not in the repo)")
    # null 2000, seed 0: with a float64 tie rule 3 of the 338 compound x dose p-values would differ from copairs
    return tool.run(PLATE, null_size=2000, seed=0, with_alignment=True)


@needs_plate
def test_plate_activity_equals_copairs(result):
    pytest.importorskip("copairs")
    p = result["parity"]
    assert p["flat_groups"] == p["hier_groups"] == 338
    assert p["flat_p_equal"] == p["hier_p_equal"] == 338
    for key, v in p.items():
        if not key.endswith(("_groups", "_p_equal")):
            assert v <= TOL, (key, v)


@needs_plate
def test_plate_target_multilabel_equals_copairs(tool, result, tmp_path):
    copairs_map = pytest.importorskip("copairs.map")
    from copairs.map import multilabel as copairs_multilabel

    x, meta = tool.load_plate(PLATE)
    xc, info = tool.compound_profiles(x, meta)
    ann = info[info[tool.TARGET].notna()]
    meta_c = pd.DataFrame({"t": [v.split("|") for v in ann[tool.TARGET]], "pid": np.arange(len(ann))})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_ap = copairs_multilabel.average_precision(
            meta_c, xc[ann.index.to_numpy()], pos_sameby=["t"], pos_diffby=[], neg_sameby=[], neg_diffby=["t"],
            multilabel_col="t", progress_bar=False,
        )  # fmt: skip
        ref = copairs_map.mean_average_precision(
            ref_ap, ["t"], null_size=2000, threshold=0.05, seed=0, progress_bar=False, cache_dir=tmp_path
        )
    ours = result["consistency"]["target"]["table"]
    assert list(ours.annotation) == list(ref.t) and len(ours) >= 5
    for col in ["mean_average_precision", "mean_normalized_average_precision", "p_value", "corrected_p_value"]:
        np.testing.assert_allclose(ours[col], ref[col], atol=TOL, err_msg=col)


@needs_plate
def test_plate_benchmark_numbers(tool, result, tmp_path):
    assert result["shape"] == (384, 454) and result["n_dmso"] == 24 and result["n_compounds"] == 58
    act = result["activity"]
    flat, hier, per_cpd = act["flat"], act["hierarchical"], act["per_compound"]
    assert len(flat) == len(hier) == 338 and len(per_cpd) == 58
    # real compound activity is detected, and not everywhere: between a third and 90% of the tests
    for t in (flat, hier, per_cpd):
        assert 0.3 < t.below_corrected_p.mean() < 0.9
    # the hierarchical correction can only zero out families that fail stage 1 and BH within a smaller family:
    # it never reports a p-value smaller than the raw one
    assert (hier.corrected_p_value >= hier.p_value - 1e-15).all()
    trend = result["trend"]
    assert len(trend) == 56 and trend.spearman_rho.dropna().between(-1, 1).all()
    al = result["alignment"].set_index("alignment")
    assert al.loc["TVN on DMSO", "dims"] == 23  # 24 DMSO wells span 23 centred dimensions
    assert (al.retrieved_hier.between(0.3, 1.0)).all()
    body = tool.render(result, command="python tools/real/lincs_plate.py --plate P", null_size=2000, seed=0)
    assert "Command: `python tools/real/lincs_plate.py --plate P`" in body and "cores, load average" in body
    import sys

    sys.path.insert(0, str(ROOT / "tools" / "real"))
    from _doc import write_section

    doc = tmp_path / "real-data.md"
    doc.write_text("# Real data\n\n<!-- other:begin -->\nkeep me\n<!-- other:end -->\n")
    write_section("lincs", body, doc=doc)
    text = doc.read_text()
    assert "keep me" in text and f"{hier.below_corrected_p.mean():.3f}" in text


def test_bad_plate_inputs(tool, tmp_path):
    with pytest.raises(DataError, match="no such file"):
        tool.load_plate(tmp_path / "missing.csv.gz")
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"Metadata_broad_sample": ["DMSO"], "f1": [1.0]}).to_csv(bad, index=False)
    with pytest.raises(DataError, match="missing metadata columns"):
        tool.load_plate(bad)
    nan = tmp_path / "nan.csv"
    cols = {c: ["DMSO", "A"] for c in ("Metadata_broad_sample", "Metadata_moa", "Metadata_target")}
    pd.DataFrame({**cols, "Metadata_mmoles_per_liter": [0, 1], "f1": [1.0, "x"]}).to_csv(nan, index=False)
    with pytest.raises(DataError, match="non-numeric/NaN feature values .*'f1'"):
        tool.load_plate(nan)
