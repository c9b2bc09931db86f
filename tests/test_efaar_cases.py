"""EFAAR_benchmarking 1.0's own small cases (its tests/test_benchmarking.py and tests/test_efaar.py), restated
against our implementations: recall with integer nulls and ties, relationship de-duplication, energy distance,
consistency, and the center-scale / aggregate examples. The expected numbers are EFAAR's."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from vitally_jax.benchmarks import aggregate_arrays, centerscale, centerscale_on_controls, signal_consistency
from vitally_jax.benchmarks.annotations import load_relationships, relationship_index_pairs
from vitally_jax.benchmarks.consistency import mean_replicate_cosine, null_pvalues
from vitally_jax.benchmarks.magnitude import energy_distances, signal_magnitude
from vitally_jax.benchmarks.recall import recall_dense, recall_from_counts

ROW = np.array([1.0, 2, 3, 4, 5])


def test_recall_integer_null_with_ties():
    # null 1..5, queries at both ends and tied with null values: ranks left/right are 0/0.2 and 0.8/1.0
    null, queries = np.array([1, 2, 3, 4, 5]), np.array([1, 5])
    got = recall_dense(null, queries, [(0.1, 0.9), (0.2, 0.8)])
    assert got == {"recall_0.1_0.9": 0.0, "recall_0.2_0.8": 1.0}
    # the same from the raw counts (#null < q, #null <= q), the form the blockwise whole-genome path uses
    assert recall_from_counts(5, np.array([0, 4]), np.array([1, 5]), [(0.2, 0.8)]) == {"recall_0.2_0.8": 1.0}
    # thresholds given high-first mean the same pair; a query strictly inside the null is never recalled
    assert recall_dense(null, np.array([3]), [(0.9, 0.1)]) == {"recall_0.1_0.9": 0.0}


def test_relationships_drop_reversed_duplicates_and_self_pairs():
    df = pd.DataFrame({"entity1": ["A", "B", "A", "C", "D"], "entity2": ["B", "A", "A", "D", "C"]})
    out = load_relationships(df)
    assert out.to_dict("list") == {"entity1": ["A", "C"], "entity2": ["B", "D"]}
    pairs = relationship_index_pairs(out, np.array(["D", "C", "B", "A", "E"]))
    np.testing.assert_array_equal(pairs, [[2, 3], [0, 1]])  # (i, j) with i < j, table order


def test_energy_distance_zero_for_identical_sets_and_22_for_a_shift_of_5():
    arr1 = np.tile(ROW, (5, 1))
    arr2 = arr1 + 5
    same = energy_distances(arr1, [np.arange(5)], arr1)[0]
    shifted = energy_distances(arr2, [np.arange(5)], arr1)[0]
    assert abs(same) <= 1e-12  # 2 E|x-y| - E|x-x'| - E|y-y'| with every distance floored at 1e-4
    # 2 * sqrt(5 * 25) - 2 * 1e-4 = 22.3605; EFAAR's test checks round(.) == 22
    assert shifted == pytest.approx(2 * np.sqrt(125) - 2e-4, rel=1e-12) and round(shifted) == 22
    # with the null [1..5]: the p-value of 22.36 is 0, as in EFAAR
    assert null_pvalues(np.array([shifted]), np.array([1.0, 2, 3, 4, 5]), "right", False)[0] == 0.0
    # through the public benchmark: 5 wells of P shifted by 5 against 5 control wells
    x = np.vstack([arr1, arr2, np.tile(ROW, (5, 1)) * 1.0])
    labels = ["CTRL"] * 5 + ["P"] * 5 + ["NEG"] * 5
    res = signal_magnitude(x, labels=labels, negative_controls=["NEG"], control_key="CTRL")
    assert res.set_index("pert").loc["P", "edist"] == pytest.approx(shifted, rel=1e-12)


def test_consistency_is_one_for_identical_rows():
    arr = np.tile(ROW, (5, 1))
    c = mean_replicate_cosine(arr, [np.arange(5)])[0]
    assert c == pytest.approx(1.0, abs=1e-12) and c <= 1.0  # clipped to [-1, 1] as in EFAAR
    assert null_pvalues(np.array([c]), np.array([1.0, 2, 3, 4, 5]), "left", False)[0] == pytest.approx(1.0)
    x = np.vstack([arr, np.random.default_rng(0).normal(size=(6, 5))])
    res = signal_consistency(
        x, labels=["P"] * 5 + ["N1", "N1", "N2", "N2", "N3", "N3"], negative_controls=["N1", "N2", "N3"]
    )
    assert res.avgcossim[0] == pytest.approx(1.0, abs=1e-12) and res.pval[0] == 0.0


def test_centerscale_and_aggregate_examples():
    feats = np.array([[1.0, 2, 3], [4, 5, 6], [7, 8, 9]])
    np.testing.assert_array_equal(centerscale(feats, np.array(["b1", "b1", "b2"])), [[-1] * 3, [1] * 3, [0] * 3])
    got = centerscale_on_controls(feats, np.array([True, False, True]))
    np.testing.assert_array_equal(got, [[-1] * 3, [0] * 3, [1] * 3])
    emb = np.array([[1.0, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]])
    means, labels, counts = aggregate_arrays(emb, np.array(["control", "gene1", "gene1", "gene2"]), drop=["control"])
    np.testing.assert_allclose(means, [[5.5, 6.5, 7.5], [10, 11, 12]], rtol=1e-15)
    assert list(labels) == ["gene1", "gene2"] and list(counts) == [2, 1]
