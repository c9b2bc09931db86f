"""CellProfiler-style features on rendered discs of known area, position and intensity."""

import numpy as np
import pytest

from vitally_jax.errors import DataError
from vitally_jax.features import measure_cells, measure_objects, segment_cells, segment_nuclei

H = 160
# (row, col, radius, DNA level): well separated discs
DISCS = [(35, 40, 10, 200), (40, 115, 13, 150), (110, 45, 8, 120), (115, 120, 12, 230)]


def _disc(cy, cx, r, shape=(H, H)):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _labels():
    lab = np.zeros((H, H), np.int32)
    for k, (cy, cx, r, _) in enumerate(DISCS, start=1):
        lab[_disc(cy, cx, r)] = k
    return lab


def _dna(background=10):
    img = np.full((H, H), background, np.uint8)
    for cy, cx, r, v in DISCS:
        img[_disc(cy, cx, r)] = v
    return img


def test_measure_objects_exact_area_centre_intensity():
    lab = _labels()
    dna = _dna()
    rng = np.random.default_rng(0)
    other = rng.integers(0, 256, (H, H), dtype=np.uint8)
    img = np.stack([dna, other], -1)
    df = measure_objects(img, lab, ["DNA", "ER"])
    assert list(df["ObjectNumber"]) == [1, 2, 3, 4]
    for k, (cy, cx, r, v) in enumerate(DISCS):
        row = df.iloc[k]
        mask = _disc(cy, cx, r)
        # pixel counts and sums are exact integers; the disc is symmetric about its centre
        assert row["AreaShape_Area"] == mask.sum()
        assert row["AreaShape_Center_X"] == pytest.approx(cx, abs=1e-9)
        assert row["AreaShape_Center_Y"] == pytest.approx(cy, abs=1e-9)
        assert row["Intensity_MeanIntensity_DNA"] == pytest.approx(v / 255, rel=1e-12)
        assert row["Intensity_IntegratedIntensity_DNA"] == pytest.approx(mask.sum() * v / 255, rel=1e-12)
        assert row["Intensity_StdIntensity_DNA"] == pytest.approx(0.0, abs=1e-12)
        er = other[mask].astype(np.float64) / 255
        assert row["Intensity_MeanIntensity_ER"] == pytest.approx(er.mean(), rel=1e-12)
        assert row["Intensity_MedianIntensity_ER"] == pytest.approx(np.median(er), rel=1e-12)
        # a digital disc: eccentricity near 0, form factor 4 pi A / P^2 near (a little below) 1
        assert row["AreaShape_Eccentricity"] < 0.15
        assert 0.85 < row["AreaShape_FormFactor"] < 1.05
        assert row["AreaShape_EquivalentDiameter"] == pytest.approx(2 * np.sqrt(mask.sum() / np.pi), rel=1e-9)
        # uniform object: no grey-level variation at any offset
        for d in range(4):
            assert row[f"Texture_Contrast_DNA_3_{d:02d}_16"] == pytest.approx(0.0, abs=1e-12)
            assert row[f"Texture_AngularSecondMoment_DNA_3_{d:02d}_16"] == pytest.approx(1.0, abs=1e-12)
    assert df.filter(like="Texture_").shape[1] == 2 * 4 * 13  # 2 channels x 4 directions x 13 Haralick features


def test_texture_of_stripes_is_direction_dependent():
    # vertical stripes 3 px wide, levels 60 / 180: a horizontal offset of 3 always crosses a stripe edge,
    # a vertical offset never does
    lab = np.zeros((64, 64), np.int32)
    lab[8:56, 8:56] = 1
    cols = np.arange(64)
    stripes = np.where((cols // 3) % 2 == 0, 60, 180).astype(np.uint8)
    img = np.broadcast_to(stripes, (64, 64))[..., None].copy()
    df = measure_objects(img, lab, ["DNA"], features=("texture",), gray_levels=256)
    contrast = [df[f"Texture_Contrast_DNA_3_{d:02d}_256"].iloc[0] for d in range(4)]
    assert min(contrast) == pytest.approx(0.0, abs=1e-9)  # the vertical direction
    assert max(contrast) == pytest.approx(120.0**2, rel=1e-9)  # the horizontal direction: (180 - 60)^2


def test_segment_nuclei_recovers_discs():
    from scipy.stats import norm

    dna = _dna(background=10)
    rng = np.random.default_rng(1)
    noisy = np.clip(dna.astype(np.int16) + rng.integers(-8, 9, dna.shape), 0, 255).astype(np.uint8)
    # default (minimum cross-entropy) threshold: every disc found, centred within a pixel
    lab = segment_nuclei(noisy, diameter=20)
    assert lab.dtype == np.int32 and lab.max() == len(DISCS)
    # a given threshold t: the edge of a disc of level v over background b, smoothed by a Gaussian of sigma,
    # lies where b + (v - b) Phi(-s / sigma) = t, i.e. s = -sigma Phi^-1((t - b) / (v - b)) outside the true edge
    t, b, sigma = 100 / 255, 10 / 255, 2.0
    lab_t = segment_nuclei(noisy, diameter=20, smoothing=sigma, threshold=t)
    for labels in (lab, lab_t):
        df = measure_objects(noisy[..., None], labels, ["DNA"], features=("sizeshape",))
        assert len(df) == len(DISCS)
        for cy, cx, r, v in DISCS:
            d = np.hypot(df["AreaShape_Center_X"] - cx, df["AreaShape_Center_Y"] - cy)
            assert d.min() < 1.0
    df = measure_objects(noisy[..., None], lab_t, ["DNA"], features=("sizeshape",))
    for cy, cx, r, v in DISCS:
        row = df.iloc[int(np.argmin(np.hypot(df["AreaShape_Center_X"] - cx, df["AreaShape_Center_Y"] - cy)))]
        r_true = np.sqrt(_disc(cy, cx, r).sum() / np.pi)
        shift = -sigma * norm.ppf((t - b) / (v / 255 - b))
        expected = np.pi * (r_true + shift) ** 2
        # half a pixel of edge position (digitisation, noise, curvature) around the whole outline
        assert abs(row["AreaShape_Area"] - expected) <= 2 * np.pi * (r_true + shift) * 0.5


def test_segment_nuclei_splits_touching_discs():
    img = np.zeros((80, 100), np.uint8)
    img[_disc(40, 35, 14, (80, 100)) | _disc(40, 60, 14, (80, 100))] = 200  # centres 25 px apart, overlapping
    lab = segment_nuclei(img, diameter=28)
    assert lab.max() == 2
    df = measure_objects(img[..., None], lab, ["DNA"], features=("sizeshape",))
    assert sorted(np.round(df["AreaShape_Center_X"])) == pytest.approx([35 - 1, 60 + 1], abs=2)
    assert df["AreaShape_Area"].iloc[0] == pytest.approx(df["AreaShape_Area"].iloc[1], rel=0.05)


def test_blank_image_gives_no_objects():
    lab = segment_nuclei(np.full((32, 32), 7, np.uint8))
    assert lab.shape == (32, 32) and lab.max() == 0
    df = measure_objects(np.zeros((32, 32, 1), np.uint8), lab, ["DNA"])
    assert len(df) == 0 and "AreaShape_Center_X" in df.columns
    assert segment_cells(lab, np.ones((32, 32), np.uint8)).max() == 0


def test_segment_cells_grows_each_nucleus_into_its_cell():
    nuc = _labels()
    cyto = np.zeros((H, H), np.uint8)
    cells_true = {}
    for k, (cy, cx, r, _) in enumerate(DISCS, start=1):
        m = _disc(cy, cx, r + 12)
        cyto[m] = 100
        cells_true[k] = m
    cells = segment_cells(nuc, cyto, smoothing=1.0)
    assert set(np.unique(cells)) == {0, 1, 2, 3, 4}
    for k, m in cells_true.items():
        assert np.all(cells[nuc == k] == k)  # the nucleus lies inside its own cell
        got = cells == k
        iou = (got & m).sum() / (got | m).sum()
        assert iou > 0.9


def test_segment_cells_splits_touching_cells_between_nuclei():
    shape = (60, 120)
    nuc = np.zeros(shape, np.int32)
    nuc[_disc(30, 30, 6, shape)] = 1
    nuc[_disc(30, 90, 6, shape)] = 2
    cyto = np.zeros(shape, np.uint8)
    cyto[10:50, 5:115] = 120  # one connected cytoplasm over both nuclei
    cells = segment_cells(nuc, cyto, smoothing=1.0)
    left, right = (cells == 1).sum(), (cells == 2).sum()
    assert left + right == pytest.approx(40 * 110, rel=0.03)
    assert left == pytest.approx(right, rel=0.1)
    # the boundary between them lies midway between the nuclei
    cols1 = np.nonzero((cells == 1).any(axis=0))[0]
    assert abs(cols1.max() - 60) <= 4


def test_measure_cells_end_to_end():
    nuc = _dna(background=5)
    cyto = np.full((H, H), 5, np.uint8)
    for cy, cx, r, _ in DISCS:
        cyto[_disc(cy, cx, r + 10)] = 90
    img = np.stack([nuc, cyto, cyto // 2], -1)
    df = measure_cells(img, ["DNA", "ER", "RNA"], diameter=20, features=("sizeshape", "intensity"))
    assert len(df) == len(DISCS)
    assert (df["Cells_AreaShape_Area"] > df["Nuclei_AreaShape_Area"]).all()
    # ER mean over a cell (a disc of 90 with the nucleus inside) ~ 90/255
    np.testing.assert_allclose(df["Cells_Intensity_MeanIntensity_ER"], 90 / 255, rtol=0.05)
    # a nucleus mask holds its whole disc plus a rim of background (5): integrated DNA = v A + 5 (A_mask - A)
    for cy, cx, r, v in DISCS:
        d = np.hypot(df["Nuclei_AreaShape_Center_X"] - cx, df["Nuclei_AreaShape_Center_Y"] - cy)
        row = df.iloc[int(np.argmin(d))]
        assert d.min() < 1.0
        area = _disc(cy, cx, r).sum()
        assert row["Nuclei_AreaShape_Area"] >= area
        expected = (v * area + 5 * (row["Nuclei_AreaShape_Area"] - area)) / 255
        assert row["Nuclei_Intensity_IntegratedIntensity_DNA"] == pytest.approx(expected, rel=0.01)


def test_bad_inputs_raise_one_line_errors():
    lab = _labels()
    img = np.stack([_dna()] * 2, -1)
    with pytest.raises(DataError, match="channel_names"):
        measure_objects(img, lab, ["DNA"])
    with pytest.raises(DataError, match="labels"):
        measure_objects(img, lab[:10], ["DNA", "ER"])
    with pytest.raises(DataError, match=r"expected \[0, 1\]"):
        measure_objects(img.astype(np.float32), lab, ["DNA", "ER"])
    with pytest.raises(DataError, match="unknown feature sets"):
        measure_objects(img, lab, ["DNA", "ER"], features=("haralick",))
    with pytest.raises(DataError, match="2-D image"):
        segment_nuclei(img)
    with pytest.raises(DataError, match="same shape"):
        segment_cells(lab, np.zeros((5, 5), np.uint8))
