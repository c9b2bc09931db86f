"""The quality filter against the synthetic world's artefact ground truth: debris is found by the cobright
measure, and the demo's thresholds remove about the designed artefact rate with high precision."""

import numpy as np
import pandas as pd
import pytest

from vitally_jax.curation import stats as cs
from vitally_jax.curation.core import CurationConfig, quality_flags


def test_cobright_flags_a_clump_bright_in_every_channel():
    rng = np.random.default_rng(0)
    imgs = rng.integers(10, 60, (4, 64, 64, 3)).astype(np.uint8)
    # stained structures: bright in one channel each, at different places
    imgs[:, 5:15, 5:15, 0] = 200
    imgs[:, 30:40, 30:40, 1] = 200
    imgs[:, 45:55, 10:20, 2] = 200
    imgs[1, 20:30, 40:52] = 230  # debris: one clump bright in all channels
    q = pd.DataFrame(cs.image_quality(imgs))
    assert q["cobright"][1] > 0.02 and (q["cobright"].drop(1) < 0.005).all()
    meta = pd.DataFrame({"plate": ["p"] * 4})
    flags = quality_flags(meta, q, CurationConfig(debris_min_cobright=0.005))
    assert flags["debris"].tolist() == [False, True, False, False]
    assert "debris" not in quality_flags(meta, q, CurationConfig()).columns  # off by default
    with pytest.raises(Exception, match="cobright"):
        quality_flags(meta, q.drop(columns="cobright"), CurationConfig(debris_min_cobright=0.01))


def test_demo_quality_filter_against_the_artefact_truth(tmp_path):
    """On a small world with the demo's fields and thresholds: precision and recall against truth.parquet."""
    from vitally_jax import config_lib
    from vitally_jax.data import synthetic
    from vitally_jax.data.store import ImageStore

    cfg = synthetic.preset("tiny", image_size=128, cell_radius=10.0, cells_per_image=45.0)  # demo-like fields
    synthetic.generate_screen(tmp_path / "s", cfg)
    store = ImageStore.open(tmp_path / "s")
    cc = config_lib.load("demo", "ci").curate
    config = CurationConfig(
        blank_max_contrast=cc.blank_max_contrast,
        saturated_max_fraction=cc.saturated_max_fraction,
        focus_min_ratio=cc.focus_min_ratio,
        debris_min_cobright=cc.debris_min_cobright,
    )
    flags = quality_flags(store.metadata, cs.store_quality(store), config)
    truth = pd.read_parquet(tmp_path / "s" / "truth.parquet").set_index("image_id").loc[store.metadata["image_id"]]
    art = truth["artefact"].to_numpy() != "none"
    removed = flags.to_numpy().any(axis=1)
    assert art.sum() >= 2
    precision = (removed & art).sum() / max(removed.sum(), 1)
    recall = (removed & art).sum() / art.sum()
    assert precision >= 0.6 and recall >= 0.5, (precision, recall, int(art.sum()), int(removed.sum()))
    assert removed[~art].mean() < 0.03  # clean images are rarely removed
