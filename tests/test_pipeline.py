"""Grain training pipeline and inference tiler: exact crops, determinism, resumption, process sharding."""

import numpy as np
import pandas as pd
import pytest

from vitally_jax.data.pipeline import (
    global_batches,
    inference_tiles,
    self_standardize_np,
    tiles_per_image,
    train_dataset,
)
from vitally_jax.data.store import ImageStore, metadata_frame, write_store
from vitally_jax.errors import ConfigError, DataError

N, H, W, CROP = 10, 40, 36, 16


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Pixels encode where they come from: channel 0 = row, 1 = column, 2 = image index, 3 = noise."""
    y, x = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    noise = np.random.default_rng(0).integers(0, 256, (N, H, W), dtype=np.uint8)
    imgs = np.stack([np.stack([y, x, np.full_like(y, i), noise[i]], -1) for i in range(N)]).astype(np.uint8)
    path = tmp_path_factory.mktemp("pipe") / "store"
    write_store(path, imgs, metadata_frame([f"im{i}" for i in range(N)]), ["a", "b", "c", "d"])
    return path, imgs


def _take(it, k):
    return [next(it)["image"] for _ in range(k)]


def _undo(crop, imgs):
    """Find the dihedral transform that maps the source slice to `crop`; return (image, y, x) or fail."""
    i = int(crop[0, 0, 2])
    ys, xs = crop[..., 0], crop[..., 1]
    y, x = int(ys.min()), int(xs.min())
    ref = imgs[i, y : y + CROP, x : x + CROP]
    for t in range(4):
        for cand in (np.rot90(ref, t), np.rot90(ref[::-1], t)):
            if np.array_equal(cand, crop):
                return i, y, x
    raise AssertionError("crop is not a flip/rotation of any slice")


def test_crops_equal_numpy_slices(store):
    path, imgs = store
    ds = train_dataset(
        path,
        crop=CROP,
        global_batch=4,
        seed=3,
        flips=False,
        rot90=False,
        process_index=0,
        process_count=1,
        num_epochs=1,
    )
    seen = []
    for batch in ds:
        assert batch["image"].shape == (4, CROP, CROP, 4) and batch["image"].dtype == np.uint8
        for crop in batch["image"]:
            i, y, x = int(crop[0, 0, 2]), int(crop[0, 0, 0]), int(crop[0, 0, 1])
            np.testing.assert_array_equal(crop, imgs[i, y : y + CROP, x : x + CROP])
            # offsets follow the documented generator: default_rng((seed, epoch, k)), k = index position
            rng = np.random.default_rng((3, 0, i))
            assert (y, x) == (rng.integers(0, H - CROP + 1), rng.integers(0, W - CROP + 1))
            seen.append(i)
    assert len(seen) == 8 and len(set(seen)) == 8  # one epoch of 10, last partial batch dropped


def test_augmented_crops_are_dihedral_slices(store):
    path, imgs = store
    it = iter(train_dataset(path, crop=CROP, global_batch=5, seed=0, process_index=0, process_count=1))
    n_transformed = 0
    for b in _take(it, 4):
        for crop in b:
            i, y, x = _undo(crop, imgs)
            n_transformed += not np.array_equal(crop, imgs[i, y : y + CROP, x : x + CROP])
    assert n_transformed >= 10  # 7 of 8 transforms change the crop


def test_same_seed_same_batches_and_epochs_reshuffle(store):
    path, _ = store
    kw = dict(crop=CROP, global_batch=5, process_index=0, process_count=1)
    a = _take(iter(train_dataset(path, seed=7, **kw)), 4)
    b = _take(iter(train_dataset(path, seed=7, **kw)), 4)
    c = _take(iter(train_dataset(path, seed=8, **kw)), 4)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    ids = [sorted(int(v) for v in np.concatenate(a[2 * e : 2 * e + 2])[:, 0, 0, 2]) for e in range(2)]
    assert ids == [list(range(N))] * 2  # every epoch visits each image once
    order0 = np.concatenate(a[:2])[:, 0, 0, 2]
    order1 = np.concatenate(a[2:])[:, 0, 0, 2]
    assert not np.array_equal(order0, order1)


def test_resume_from_state_mid_epoch(store):
    path, _ = store
    ds = train_dataset(path, crop=CROP, global_batch=3, seed=1, process_index=0, process_count=1, standardize=True)
    it = iter(ds)
    _take(it, 2)
    state = it.get_state()
    expected = _take(it, 5)  # crosses the epoch boundary (10 images, batches of 3)
    it2 = iter(ds)
    it2.set_state(state)
    for x, y in zip(expected, _take(it2, 5)):
        assert x.dtype == np.float32
        np.testing.assert_array_equal(x, y)


def test_two_processes_disjoint_and_covering(store):
    path, _ = store
    got = []
    for p in range(2):
        ds = train_dataset(path, crop=CROP, global_batch=2, seed=5, process_index=p, process_count=2, num_epochs=1)
        got.append([int(v) for b in ds for v in b["image"][:, 0, 0, 2]])
    assert len(got[0]) == len(got[1]) == N // 2
    assert set(got[0]).isdisjoint(got[1]) and set(got[0]) | set(got[1]) == set(range(N))


def test_index_subset(store, tmp_path):
    path, _ = store
    pd.DataFrame({"image_id": ["im1", "im4", "im7"]}).to_parquet(tmp_path / "idx.parquet")
    ds = train_dataset(
        path,
        crop=CROP,
        global_batch=3,
        seed=0,
        index=tmp_path / "idx.parquet",
        process_index=0,
        process_count=1,
        num_epochs=2,
    )
    for b in ds:
        assert sorted(b["image"][:, 0, 0, 2].tolist()) == [1, 4, 7]
    with pytest.raises(DataError, match="'im99' is not in the store"):
        train_dataset(path, crop=CROP, global_batch=3, seed=0, index=["im1", "im99"], process_index=0, process_count=1)
    with pytest.raises(ConfigError, match="multiple of process_count"):
        train_dataset(path, crop=CROP, global_batch=3, seed=0, process_index=0, process_count=2)
    with pytest.raises(DataError, match="crop 64 larger"):
        train_dataset(path, crop=64, global_batch=2, seed=0, process_index=0, process_count=1)


def test_self_standardize_formula():
    x = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    x[1, ..., 2] = 7  # a constant channel: var 0 -> 0 / sqrt(1e-5)
    f = x.astype(np.float64) / 255
    ref = (f - f.mean((1, 2), keepdims=True)) / np.sqrt(f.var((1, 2), keepdims=True) + 1e-5)
    y = self_standardize_np(x)
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(self_standardize_np(x[1]), y[1])  # one image or a batch
    np.testing.assert_allclose(self_standardize_np((x / 255).astype(np.float32)), ref, atol=1e-5)
    assert not y[1, ..., 2].any() and not self_standardize_np((x / 255).astype(np.float32))[1, ..., 2].any()  # exact 0
    from vitally_jax.models.preprocess import self_standardize  # the model-side (JAX) definition

    np.testing.assert_allclose(np.asarray(self_standardize(x)), y, atol=2e-5)


def test_global_batches_on_mesh(store):
    import jax
    from jax.sharding import AxisType

    path, _ = store
    mesh = jax.make_mesh((4, 2, 1), ("data", "fsdp", "model"), axis_types=(AxisType.Auto,) * 3)
    local = train_dataset(path, crop=CROP, global_batch=8, seed=2, process_index=0, process_count=1)
    ref = _take(iter(local), 3)
    it = iter(global_batches(local, mesh))
    first = next(it)["image"]
    assert isinstance(first, jax.Array) and first.shape == (8, CROP, CROP, 4)
    assert len(first.sharding.device_set) == 8
    assert first.addressable_shards[0].data.shape == (1, CROP, CROP, 4)
    np.testing.assert_array_equal(np.asarray(first), ref[0])
    state = it.get_state()
    second = np.asarray(next(it)["image"])
    np.testing.assert_array_equal(second, ref[1])
    it2 = iter(global_batches(local, mesh))
    it2.set_state(state)
    np.testing.assert_array_equal(np.asarray(next(it2)["image"]), second)


def test_inference_tiles_order_and_remainder(store):
    path, imgs = store
    assert tiles_per_image(H, W, CROP) == 4  # 40x36 -> 2x2 tiles, 8 rows / 4 columns dropped
    st = ImageStore.open(path)
    batches = list(inference_tiles(st, crop=CROP, start=2, stop=5, batch_size=5))
    assert [len(b[0]) for b in batches] == [5, 5, 2]
    img_idx = np.concatenate([b[0] for b in batches])
    tile_idx = np.concatenate([b[1] for b in batches])
    tiles = np.concatenate([b[2] for b in batches])
    assert img_idx.tolist() == [2] * 4 + [3] * 4 + [4] * 4
    assert tile_idx.tolist() == [0, 1, 2, 3] * 3
    for i, t, tile in zip(img_idx, tile_idx, tiles):
        ty, tx = divmod(int(t), W // CROP)
        np.testing.assert_array_equal(tile, imgs[i, ty * CROP : (ty + 1) * CROP, tx * CROP : (tx + 1) * CROP])
    with pytest.raises(DataError, match="no tile fits"):
        next(inference_tiles(st, crop=41))
