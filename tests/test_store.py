"""Image store: exact round trip, crops, pickling, and one-line errors with no partial store left behind."""

import os
import pickle

import numpy as np
import pandas as pd
import pytest

from vitally_jax.data.store import METADATA_COLUMNS, ImageStore, metadata_frame, write_store
from vitally_jax.errors import DataError

CH = ["DNA", "ER", "Actin", "RNA", "Mito", "Golgi"]


def _meta(n, **kw):
    return metadata_frame(
        [f"img{i}" for i in range(n)],
        plate="P1",
        experiment="E1",
        well_row=np.arange(n) + 1,
        well_col=2,
        site=1,
        perturbation="TP53",
        guide_id="TP53_g1",
        **kw,
    )


def _images(n, h=40, w=36, c=6, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


def _leftovers(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir())


def test_round_trip_array_and_crops(tmp_path):
    imgs = _images(5, h=300, w=270)  # not multiples of the 256-pixel inner tiles
    meta = _meta(5, concentration=[np.nan, 1.0, 2.5, 10.0, 1e4])
    write_store(tmp_path / "s", imgs, meta, CH, attrs={"source": "test"})
    st = ImageStore.open(tmp_path / "s")
    assert st.shape == (5, 300, 270, 6) and st.channel_names == CH and st.attrs == {"source": "test"}
    np.testing.assert_array_equal(st.read_many(0, 5), imgs)
    np.testing.assert_array_equal(st.read(3), imgs[3])
    np.testing.assert_array_equal(st.read_crop(2, 40, 13, 256), imgs[2, 40:296, 13:269])
    assert list(st.metadata.columns) == list(METADATA_COLUMNS)
    pd.testing.assert_frame_equal(st.metadata, _meta(5, concentration=[np.nan, 1.0, 2.5, 10.0, 1e4]), check_dtype=False)
    assert st.metadata.well_row.dtype == np.int64 and st.metadata.is_control.dtype == bool
    with pytest.raises(DataError, match="outside"):
        st.read_crop(0, 100, 0, 256)
    assert _leftovers(tmp_path) == ["s"]


def test_round_trip_iterator_many_shards(tmp_path, monkeypatch):
    import vitally_jax.data.store as store_mod

    monkeypatch.setattr(store_mod, "SHARD_BYTES", 3 * 16 * 16 * 3)  # 3 images per shard -> 4 shards
    imgs = _images(10, 16, 16, 3, seed=1)
    write_store(tmp_path / "s", (im for im in imgs), _meta(10), ["a", "b", "c"])
    st = ImageStore.open(tmp_path / "s")
    np.testing.assert_array_equal(st.read_many(0, 10), imgs)
    assert len(st) == 10


def test_pickle_drops_handle(tmp_path):
    imgs = _images(2)
    write_store(tmp_path / "s", imgs, _meta(2), CH)
    st = ImageStore.open(tmp_path / "s")
    st.read(0)
    assert st._arr is not None
    st2 = pickle.loads(pickle.dumps(st))
    assert st2._arr is None
    np.testing.assert_array_equal(st2.read(1), imgs[1])


def test_index_of(tmp_path):
    write_store(tmp_path / "s", _images(3), _meta(3), CH)
    st = ImageStore.open(tmp_path / "s")
    assert st.index_of(["img2", "img0"]).tolist() == [2, 0]
    with pytest.raises(DataError, match="'nope' is not in the store"):
        st.index_of(["img1", "nope"])


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing_column", "missing required column\\(s\\) perturbation_type"),
        ("extra_column", "unexpected column\\(s\\) colour"),
        ("duplicate_id", "duplicate image_id 'img0' \\(row 2\\)"),
        ("bad_type", "perturbation_type 'crispr' not one of"),
        ("float_images", "dtype float32, expected uint8"),
        ("shape_mismatch", "image 2 \\(img2\\): shape \\(40, 30, 6\\), expected \\(40, 36, 6\\)"),
        ("too_few", "only 3 images for 4 metadata rows"),
        ("too_many", "more images than the 4 metadata rows"),
        ("channels", "6 channels but 5 channel names"),
        ("reader_fails", "cannot decode"),
    ],
)
def test_bad_input_leaves_nothing(tmp_path, case, match):
    imgs = list(_images(4))
    meta = _meta(4)
    names = CH
    if case == "missing_column":
        meta = meta.drop(columns="perturbation_type")
    elif case == "extra_column":
        meta["colour"] = "red"
    elif case == "duplicate_id":
        meta.loc[2, "image_id"] = "img0"
    elif case == "bad_type":
        meta.loc[1, "perturbation_type"] = "crispr"
    elif case == "float_images":
        imgs[0] = imgs[0].astype(np.float32)
    elif case == "shape_mismatch":
        imgs[2] = imgs[2][:, :30]
    elif case == "too_few":
        imgs = imgs[:3]
    elif case == "too_many":
        imgs = imgs + imgs[:1]
    elif case == "channels":
        names = CH[:5]

    def gen():
        for i, im in enumerate(imgs):
            if case == "reader_fails" and i == 3:
                raise DataError("well B03: cannot decode image")
            yield im

    write_store(tmp_path / "old", _images(1), _meta(1), CH)  # an existing store at the target stays intact
    with pytest.raises(DataError, match=match) as err:
        write_store(tmp_path / "old", gen(), meta, names, overwrite=True)
    assert "\n" not in str(err.value)
    assert _leftovers(tmp_path) == ["old"]
    np.testing.assert_array_equal(ImageStore.open(tmp_path / "old").read(0), _images(1)[0])


def test_open_errors(tmp_path):
    with pytest.raises(DataError, match="no image store here"):
        ImageStore.open(tmp_path / "none")
    write_store(tmp_path / "s", _images(2), _meta(2), CH)
    os.remove(tmp_path / "s" / "metadata.parquet")
    with pytest.raises(DataError, match="metadata.parquet is missing"):
        ImageStore.open(tmp_path / "s")
