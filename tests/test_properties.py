"""Property-based tests (hypothesis): alignment and map metrics, and the whole-image crop tiler.

Data are drawn from numpy generators seeded by hypothesis, so every example is a realistic screen (controls in
every batch, continuous features) while hypothesis still explores sizes, batch counts, permutations, signs and
scales. Properties:

- alignment (TVN, center-scale, PCA) commutes with any reordering of the wells;
- TVN of per-column sign-flipped features equals TVN of the original up to one sign per output column, so the
  map's cosines and its recall do not change;
- cosine similarity and known-relationship recall ignore a positive scale per map row and the row order;
- mAP of every well is unchanged by reordering the wells;
- the inference tiler covers every pixel of the tiled region exactly once, puts each tile where it belongs and
  drops only the bottom/right remainder narrower than a crop.
"""

from __future__ import annotations

import tempfile

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vitally_jax.benchmarks import align
from vitally_jax.benchmarks.cosine import cosine_matrix
from vitally_jax.benchmarks.mapk import average_precisions
from vitally_jax.benchmarks.recall import known_relationship_recall

FAST = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def screen(seed: int, n_batches: int, n_features: int, n_perts: int = 6, reps: int = 3, n_ctrl: int = 6):
    """Well embeddings (N, D) with batch effects and metadata (perturbation, experiment, is_control)."""
    rng = np.random.default_rng(seed)
    effects = rng.normal(size=(n_perts, n_features)) * 2.0
    xs, rows = [], []
    for b in range(n_batches):
        shift = rng.normal(size=n_features) * 3.0
        scale = rng.uniform(0.5, 2.0, size=n_features)
        for _ in range(n_ctrl):
            xs.append(shift + scale * rng.normal(size=n_features))
            rows.append(("EMPTY", f"exp{b}", True))
        for p in range(n_perts):
            for _ in range(reps):
                xs.append(shift + scale * (effects[p] + rng.normal(size=n_features)))
                rows.append((f"G{p}", f"exp{b}", False))
    md = pd.DataFrame(rows, columns=["perturbation", "experiment", "is_control"])
    return np.asarray(xs), md


@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    n_batches=st.integers(1, 3),
    n_features=st.integers(2, 7),
    method=st.sampled_from(["tvn", "centerscale", "centerscale_on_controls", "pca", "pca_centerscale"]),
    perm_seed=st.integers(0, 2**31 - 1),
)
def test_alignment_commutes_with_row_order(seed, n_batches, n_features, method, perm_seed):
    x, md = screen(seed, n_batches, n_features)
    perm = np.random.default_rng(perm_seed).permutation(len(x))
    kw = dict(method=method, n_components=min(4, n_features))
    ref = align(x, md, **kw)
    got = align(x[perm], md.iloc[perm].reset_index(drop=True), **kw)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref[perm], rtol=1e-7, atol=1e-9)


@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    n_batches=st.integers(1, 3),
    n_features=st.integers(2, 7),
    flips=st.lists(st.booleans(), min_size=7, max_size=7),
)
def test_tvn_is_equivariant_to_column_sign_flips(seed, n_batches, n_features, flips):
    x, md = screen(seed, n_batches, n_features)
    signs = np.where(np.asarray(flips[:n_features]), -1.0, 1.0)
    ref = align(x, md, method="tvn")
    got = align(x * signs, md, method="tvn")
    # one sign per output column, the same for every well
    col_sign = np.sign(np.sum(got * ref, axis=0))
    assert np.all(col_sign != 0)
    np.testing.assert_allclose(got, ref * col_sign, rtol=1e-7, atol=1e-9)
    # hence the map's cosines are unchanged
    np.testing.assert_allclose(cosine_matrix(got), cosine_matrix(ref), atol=1e-10)


def map_with_pairs(seed: int, n_perts: int, n_features: int):
    """A map (P, D) whose first genes form planted groups, and an annotation table of pairs within groups."""
    rng = np.random.default_rng(seed)
    labels = np.array([f"GENE{i:03d}" for i in range(n_perts)])
    x = rng.normal(size=(n_perts, n_features))
    centers = rng.normal(size=(3, n_features)) * 2
    groups = [list(range(g, min(n_perts, 12), 3)) for g in range(3)]
    for g, members in enumerate(groups):
        x[members] += centers[g]
    pairs = [(labels[a], labels[b]) for m in groups for i, a in enumerate(m) for b in m[i + 1 :]]
    pairs += [("GENE000", "NOT_A_GENE")]  # an unknown gene is skipped
    table = pd.DataFrame(pairs, columns=["entity1", "entity2"])
    return x, labels, {"planted": table}


@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    n_perts=st.integers(20, 40),
    n_features=st.integers(3, 12),
    perm_seed=st.integers(0, 2**31 - 1),
    log_scales=st.lists(st.floats(-6, 6, allow_nan=False), min_size=40, max_size=40),
)
def test_recall_and_cosine_ignore_row_order_and_row_scale(seed, n_perts, n_features, perm_seed, log_scales):
    x, labels, sources = map_with_pairs(seed, n_perts, n_features)
    scale = np.exp(np.asarray(log_scales[:n_perts]))
    perm = np.random.default_rng(perm_seed).permutation(n_perts)
    np.testing.assert_allclose(cosine_matrix(x * scale[:, None]), cosine_matrix(x), atol=1e-12)
    with pytest.warns(UserWarning, match="not in the map"):
        ref = known_relationship_recall(x, labels, sources=sources)
    with pytest.warns(UserWarning, match="not in the map"):
        got = known_relationship_recall((x * scale[:, None])[perm], labels[perm], sources=sources)
    with pytest.warns(UserWarning, match="not in the map"):
        flipped = known_relationship_recall(x * np.where(np.arange(n_features) % 2, -1.0, 1.0), labels, sources=sources)
    for other in (got, flipped):
        assert other.query_distribution_size.tolist() == ref.query_distribution_size.tolist()
        assert other.null_distribution_size.tolist() == [n_perts * (n_perts - 1) // 2]
        for col in ("recall_0.05_0.95", "recall_0.1_0.9"):
            assert other[col].tolist() == pytest.approx(ref[col].tolist(), abs=1e-12)


@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    n_features=st.integers(3, 8),
    perm_seed=st.integers(0, 2**31 - 1),
    scale=st.floats(1e-3, 1e3),
)
def test_average_precision_ignores_row_order_and_scale(seed, n_features, perm_seed, scale):
    x, md = screen(seed, 2, n_features)
    groups = md.perturbation.to_numpy()
    ref_rows = md.is_control.to_numpy()
    perm = np.random.default_rng(perm_seed).permutation(len(x))
    ref = average_precisions(x, groups, reference=ref_rows)
    got = average_precisions(x[perm] * scale, groups[perm], reference=ref_rows[perm])
    a, b = ref.average_precision.to_numpy()[perm], got.average_precision.to_numpy()
    assert np.array_equal(np.isnan(a), ref_rows[perm]) and np.array_equal(np.isnan(b), np.isnan(a))
    np.testing.assert_allclose(b[~np.isnan(b)], a[~np.isnan(a)], rtol=1e-5)
    assert got.n_pos_pairs.tolist() == ref.n_pos_pairs.to_numpy()[perm].tolist()


# ------------------------------------------------------------------------------------------------------------
# The inference tiler
# ------------------------------------------------------------------------------------------------------------


def coordinate_store(root: str, n: int, h: int, w: int):
    """A real image store whose pixels record (row, column, image): channel 0 = y, 1 = x, 2 = image index."""
    from vitally_jax.data.store import ImageStore, metadata_frame, write_store

    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    images = np.stack([np.stack([yy, xx, np.full_like(yy, i)], -1) for i in range(n)]).astype(np.uint8)
    path = write_store(f"{root}/store", images, metadata_frame([f"img{i}" for i in range(n)]), ["y", "x", "image"])
    return ImageStore.open(path)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 4),
    ty=st.integers(1, 4),
    tx=st.integers(1, 4),
    crop=st.sampled_from([4, 5, 8, 16]),
    rem_y=st.integers(0, 3),
    rem_x=st.integers(0, 3),
    batch_size=st.integers(1, 9),
    data=st.data(),
)
def test_tiler_covers_every_pixel_exactly_once(n, ty, tx, crop, rem_y, rem_x, batch_size, data):
    from vitally_jax.data.pipeline import inference_tiles, tiles_per_image

    h, w = ty * crop + rem_y, tx * crop + rem_x
    start = data.draw(st.integers(0, n - 1))
    stop = data.draw(st.integers(start, n))
    with tempfile.TemporaryDirectory() as root:
        store = coordinate_store(root, n, h, w)
        batches = list(inference_tiles(store, crop=crop, start=start, stop=stop, batch_size=batch_size))
    assert tiles_per_image(h, w, crop) == ty * tx
    total = (stop - start) * ty * tx
    sizes = [len(b[0]) for b in batches]
    assert sum(sizes) == total and all(s == batch_size for s in sizes[:-1]) and (not sizes or sizes[-1] >= 1)
    covered = np.zeros((n, h, w), np.int64)
    order = []
    for image_index, tile_index, crops in batches:
        assert crops.dtype == np.uint8 and crops.shape[1:] == (crop, crop, 3)
        for i, t, c in zip(image_index, tile_index, crops):
            order.append((int(i), int(t)))
            assert np.all(c[..., 2] == i)  # the tile comes from image i
            y0, x0 = int(c[0, 0, 0]), int(c[0, 0, 1])
            assert (y0, x0) == ((t // tx) * crop, (t % tx) * crop)  # row-major tile position
            np.testing.assert_array_equal(c[..., 0], (y0 + np.arange(crop))[:, None].repeat(crop, 1))
            np.testing.assert_array_equal(c[..., 1], (x0 + np.arange(crop))[None, :].repeat(crop, 0))
            covered[i, y0 : y0 + crop, x0 : x0 + crop] += 1
    assert order == [(i, t) for i in range(start, stop) for t in range(ty * tx)]
    inside = covered[start:stop, : ty * crop, : tx * crop]
    assert np.all(inside == 1)  # every pixel of the tiled region exactly once
    assert covered.sum() == total * crop * crop  # nothing outside it (the remainder < crop is dropped)
    assert not covered[:start].any() and not covered[stop:].any()
