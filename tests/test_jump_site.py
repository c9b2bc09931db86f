"""The real JUMP site: fetched with pip from scratch, imported with the JUMP importer, checked against its TIFFs."""

import json
import runpy

import numpy as np
import pytest
import tifffile
from conftest import ROOT

from vitally_jax.data.store import ImageStore
from vitally_jax.errors import OutputError

TOOL = runpy.run_path(str(ROOT / "tools" / "real" / "jump_site.py"))
# the JUMP pilot's Phenix channel numbers, in the store's canonical order
PHENIX = {"DNA": "ch5", "ER": "ch4", "Actin": "ch1", "RNA": "ch3", "Mito": "ch2"}


@pytest.fixture(scope="module")
def fetched(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache") / "jump_site"
    try:
        store = TOOL["fetch"](cache)
    except TOOL["NetworkError"] as e:
        pytest.skip(f"the package index is not reachable from here: {e}")
    return cache, store


def test_fetch_imports_the_site_as_the_tiffs_say(fetched):
    cache, store_path = fetched
    st = ImageStore.open(store_path)
    assert st.shape == (1, 1080, 1080, 5)
    assert list(st.channel_names) == ["DNA", "ER", "Actin", "RNA", "Mito"]
    m = st.metadata.iloc[0]
    assert (m.plate, m.well_row, m.well_col, int(m.site)) == ("BR00116991", 1, 1, 1)
    img = st.read(0)
    assert img.dtype == np.uint8
    raw = {}
    for c, (name, ch) in enumerate(PHENIX.items()):
        x = tifffile.imread(cache / "site" / f"r01c01f01p01-{ch}sk1fk1fl1.tiff")
        assert x.shape == (1080, 1080) and x.dtype == np.uint16
        raw[name] = x
        # the documented 16-bit rule: 0.1 / 99.9 percentiles of every k-th pixel (<= 16,384 per image) as lo / hi
        step = max(1, x.size // 16384)
        lo, hi = np.percentile(x.ravel()[::step], (0.1, 99.9))
        expect = np.rint(np.clip((x.astype(np.float64) - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
        np.testing.assert_array_equal(img[..., c], expect)
        # value range: the percentile stretch saturates ~0.1% at each end and spans the full uint8 range
        assert img[..., c].min() == 0 and img[..., c].max() == 255
        assert 0.0002 < np.mean(img[..., c] == 255) < 0.005
    # channel order is not interchangeable: each store channel matches its own TIFF far better than any other
    for c, name in enumerate(PHENIX):
        r = {n: np.corrcoef(img[::4, ::4, c].ravel(), x[::4, ::4].ravel())[0, 1] for n, x in raw.items()}
        assert max(r, key=r.get) == name and r[name] > 0.95


def test_fetch_reuses_the_cache_and_refuses_foreign_folders(fetched, tmp_path):
    cache, store_path = fetched
    marker = json.loads((cache / "jump_site.json").read_text())
    assert marker["artefact"] == "jump site cache"
    # a second fetch finds the site and the store in the cache: no download, same store
    assert TOOL["fetch"](cache) == store_path
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="not a jump site cache"):
        TOOL["fetch"](foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_report_probe_is_ridge_cv_and_matching_is_mutual():
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    x = rng.normal(size=(109, 48)) * rng.uniform(0.1, 10, 48)
    y = x[:, :5] @ rng.normal(size=5) + rng.normal(size=109)
    alphas = np.logspace(-2, 5, 15)
    ref = make_pipeline(StandardScaler(), RidgeCV(alphas=alphas)).fit(x[:87], y[:87]).predict(x[87:])
    got = TOOL["_ridge_fit_predict"](x[:87], y[:87], x[87:], alphas)
    np.testing.assert_allclose(got, ref, rtol=1e-8, atol=1e-8 * np.abs(ref).max())
    ours = np.array([[10.0, 10.0], [50.0, 50.0], [53.0, 50.0], [200.0, 200.0]])
    cp = np.array([[11.0, 10.0], [51.0, 50.0], [100.0, 100.0]])
    # (0, 0) matches; CellProfiler's (51, 50) is nearest to ours[1] and ours[2] is not mutual; (100, 100) is too far
    assert TOOL["_match"](ours, cp, radius=5.0) == [(0, 0), (1, 1)]
