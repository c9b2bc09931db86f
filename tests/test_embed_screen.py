"""Whole-screen embedding store: tiling and averaging, resume after interruption, processes, exports."""

import json

import numpy as np
import pandas as pd
import pytest
from flax import nnx

import vitally_jax.embedding.blocks as probe
from vitally_jax.data.store import ImageStore, write_store
from vitally_jax.embedding.screen import EmbeddingStore, embed_screen, export_anndata, export_parquet, well_features
from vitally_jax.errors import ConfigError, DataError, OutputError
from vitally_jax.models.vit import ViTEncoder, vit_config

POOL = ("cls_norm", "mean")
RUN = dict(pooling=POOL, crop=16, batch_size=8, chunk_images=4, progress=False)


@pytest.fixture(scope="module")
def encoder():
    enc = ViTEncoder(vit_config("mu/8", depth=3, in_chans=4), rngs=nnx.Rngs(0))
    enc.blocks.gamma[...] = 0.5 * np.ones(enc.blocks.gamma[...].shape, np.float32)  # blocks visibly differ
    return enc


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """11 wells x 2 sites of 32x32x4 images (4 tiles of 16x16 each)."""
    rng = np.random.default_rng(0)
    n = 22
    rows = []
    for i in range(n):
        well = i // 2
        rows.append(
            dict(
                image_id=f"img{i:02d}",
                well_id=f"W{well:02d}",
                plate="P1",
                experiment="E1",
                well_row=well,
                well_col=1,
                site=i % 2 + 1,
                perturbation=f"g{well % 3}",
                perturbation_type="gene",
                guide_id="",
                concentration=np.nan,
                is_control=False,
                control_type="",
            )
        )
    images = rng.integers(0, 256, (n, 32, 32, 4), dtype=np.uint8)
    path = write_store(tmp_path_factory.mktemp("screen") / "screen", images, pd.DataFrame(rows), list("ABCD"))
    return ImageStore.open(path)


@pytest.fixture(scope="module")
def reference(encoder, store, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "emb"
    result = embed_screen(encoder, store, out, **RUN)
    assert result["computed"] == list(range(6)) and result["complete"]
    return out


def _arrays(path):
    s = EmbeddingStore.open(path)
    return {p: s.features(p) for p in POOL}


def test_store_holds_mean_of_tile_embeddings(encoder, store, reference):
    s = EmbeddingStore.open(reference)
    assert s.blocks == [1, 2, 3] and s.poolings == list(POOL) and s.missing_chunks() == []
    assert json.loads((reference / "embedding.json").read_text())["tiles_per_image"] == 4
    feats = s.features("mean")
    assert feats.shape == (3, 22, 64) and feats.dtype == np.float32
    pd.testing.assert_frame_equal(s.metadata, store.metadata)
    # image 5 by hand: its four 16x16 tiles embedded with `probe.embed`, then averaged
    img = store.read(5)
    tiles = np.stack([img[y : y + 16, x : x + 16] for y in (0, 16) for x in (0, 16)])
    direct = probe.embed(encoder, tiles, pooling="mean", batch_size=8)["mean"].mean(axis=0)  # (nb, D)
    np.testing.assert_allclose(feats[:, 5], direct, atol=1e-5)  # other batches, another tile-mean order: a few ulps
    np.testing.assert_array_equal(s.features("mean", [3, 1]), feats[[2, 0]])


def test_interrupted_run_resumes_identically(encoder, store, reference, tmp_path, monkeypatch):
    out = tmp_path / "emb"
    first = embed_screen(encoder, store, out, stop_after=2, **RUN)
    assert first["computed"] == [0, 1] and not first["complete"]
    with pytest.raises(DataError, match="incomplete, 4 of 6 chunks missing"):
        EmbeddingStore.open(out).features("mean")

    # a crash in the middle of chunk 3 (its first batch goes through, the second fails)
    calls = {"n": 0}
    real = probe.run_padded

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(probe, "run_padded", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        embed_screen(encoder, store, out, **RUN)
    monkeypatch.setattr(probe, "run_padded", real)
    assert EmbeddingStore.open(out).done_chunks() == {0, 1, 2}
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "done").iterdir()}

    last = embed_screen(encoder, store, out, **RUN)
    assert last["skipped"] == [0, 1, 2] and last["computed"] == [3, 4, 5] and last["complete"]
    assert all((out / "done" / name).stat().st_mtime_ns == t for name, t in stamps.items())  # not recomputed
    ref, got = _arrays(reference), _arrays(out)
    for p in POOL:
        np.testing.assert_array_equal(got[p], ref[p])

    again = embed_screen(encoder, store, out, **RUN)
    assert again["computed"] == [] and again["skipped"] == list(range(6))


def test_processes_split_chunks(encoder, store, reference, tmp_path):
    out = tmp_path / "emb"
    r1 = embed_screen(encoder, store, out, process_index=1, process_count=2, **RUN)
    assert r1["computed"] == [1, 3, 5] and not r1["complete"]
    r0 = embed_screen(encoder, store, out, process_index=0, process_count=2, **RUN)
    assert r0["computed"] == [0, 2, 4] and r0["complete"]
    ref, got = _arrays(reference), _arrays(out)
    for p in POOL:
        np.testing.assert_array_equal(got[p], ref[p])


def test_settings_change_refused(encoder, store, reference):
    with pytest.raises(OutputError, match=r"different settings.*crop"):
        embed_screen(encoder, store, reference, **{**RUN, "crop": 32})
    with pytest.raises(ConfigError, match="dtype"):
        embed_screen(encoder, store, reference, **{**RUN, "dtype": "int8"})
    with pytest.raises(ConfigError, match="does not fit"):
        embed_screen(encoder, store, reference.parent / "other", **{**RUN, "crop": 64})
    with pytest.raises(DataError, match="not an embedding store"):
        EmbeddingStore.open(store.path)


def test_well_average_and_exports(reference, tmp_path):
    import anndata

    s = EmbeddingStore.open(reference)
    feats = s.features("mean")
    wells, wmeta = well_features(feats, s.metadata)
    assert wells.shape == (3, 11, 64) and list(wmeta["n_sites"]) == [2] * 11
    np.testing.assert_allclose(wells[:, 4], feats[:, 8:10].mean(axis=1), atol=1e-6)
    assert "image_id" not in wmeta and wmeta["well_id"].tolist() == [f"W{i:02d}" for i in range(11)]

    table = pd.read_parquet(export_parquet(s, tmp_path / "b2.parquet", block=2, pooling="mean"))
    fcols = [c for c in table.columns if c.startswith("feature_")]
    assert len(table) == 11 and len(fcols) == 64 and table["perturbation"].tolist()[:3] == ["g0", "g1", "g2"]
    np.testing.assert_allclose(table[fcols].to_numpy(), wells[1], atol=1e-6)

    img_table = pd.read_parquet(export_parquet(s, tmp_path / "img.parquet", block=3, pooling="cls_norm", level="image"))
    assert len(img_table) == 22 and img_table["image_id"].iloc[0] == "img00"

    adata = anndata.read_h5ad(export_anndata(s, tmp_path / "b2.h5ad", block=2, pooling="mean"))
    assert adata.shape == (11, 64) and adata.uns["vitally_jax"]["block"] == 2
    np.testing.assert_allclose(adata.X, wells[1], atol=1e-6)
    assert adata.obs["perturbation"].tolist() == table["perturbation"].tolist()
    with pytest.raises(ConfigError, match="blocks"):
        export_parquet(s, tmp_path / "x.parquet", block=7)
    with pytest.raises(ConfigError, match="level"):
        export_parquet(s, tmp_path / "x.parquet", block=1, level="plate")
    assert not (tmp_path / "x.parquet").exists()


def test_embed_tool_runs_exports_and_reports_errors(encoder, store, reference, tmp_path, repo_root, capsys):
    import importlib.util

    from vitally_jax.checkpoint import export_encoder

    spec = importlib.util.spec_from_file_location("embed_tool", repo_root / "tools" / "embed.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    export_encoder(tmp_path / "encoder", nnx.state(encoder), encoder.cfg)
    out = tmp_path / "emb"
    rc = tool.main(
        [
            "--encoder",
            str(tmp_path / "encoder"),
            "--store",
            str(store.path),
            "--out",
            str(out),
            "--crop",
            "16",
            "--batch-size",
            "8",
            "--chunk-images",
            "4",
            "--dtype",
            "float16",
            "--export-block",
            "2",
            "--parquet",
            str(tmp_path / "b2.parquet"),
            "--no-progress",
        ]
    )
    assert rc == 0 and "computed 6 chunks" in capsys.readouterr().out
    got = EmbeddingStore.open(out)
    assert got.manifest["dtype"] == "float16"
    np.testing.assert_allclose(
        got.features("mean"), EmbeddingStore.open(reference).features("mean"), rtol=2e-3, atol=2e-3
    )
    assert len(pd.read_parquet(tmp_path / "b2.parquet")) == 11
    rc = tool.main(["--out", str(out), "--parquet", str(tmp_path / "x.parquet")])
    err = capsys.readouterr().err.strip()
    assert rc == 3 and err == "error: --parquet/--h5ad need --export-block"
    rc = tool.main(["--out", str(tmp_path / "nothing"), "--export-block", "1", "--h5ad", str(tmp_path / "x.h5ad")])
    err = capsys.readouterr().err.strip()
    assert rc == 4 and err.startswith("error: ") and "not an embedding store" in err and "\n" not in err
