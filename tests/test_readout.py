"""The readout chosen by the block search (b* and the sweep's pooling) travels with the trimmed encoder export."""

import json
import runpy
import sys

import numpy as np
import pytest
from flax import nnx

from vitally_jax.checkpoint import export_encoder, load_encoder
from vitally_jax.data.store import ImageStore
from vitally_jax.data.synthetic import generate_screen
from vitally_jax.embedding.blocks import DEFAULT_POOLING, embed
from vitally_jax.errors import CheckpointError, ConfigError
from vitally_jax.models.vit import ViTEncoder, vit_config


def _sweep(repo_root, monkeypatch, encoder, screen, out, trimmed, pooling):
    argv = [
        "probe_sweep.py",
        "--encoder",
        str(encoder),
        "--store",
        str(screen),
        "--out",
        str(out),
        "--pooling",
        pooling,
        "--tasks",
        "perturbation",
        "--baselines",
        "none",
        "--crop",
        "32",
        "--chunk-images",
        "128",
        "--trim",
        str(trimmed),
        "--no-progress",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(repo_root / "tools" / "probe_sweep.py"), run_name="__main__")
    assert done.value.code == 0
    return json.loads((out / "sweep.json").read_text())["b_star"]["overall"]


def test_trimmed_export_carries_the_sweep_readout(tmp_path, repo_root, monkeypatch):
    screen = ImageStore.open(generate_screen(tmp_path / "screen", "tiny"))
    enc = ViTEncoder(vit_config("mu/8", depth=3, in_chans=6), rngs=nnx.Rngs(1))
    enc.blocks.gamma[...] = 0.5 * np.ones(enc.blocks.gamma[...].shape, np.float32)  # blocks visibly differ
    export_encoder(tmp_path / "encoder", nnx.state(enc), enc.cfg)
    tiles = screen.read_many(0, 3)[:, :32, :32]

    # an export without a readout argument (no block search yet): every block and the default pooling
    full, cfg, readout = load_encoder(tmp_path / "encoder")
    assert readout == {"blocks": (1, 2, 3), "pooling": DEFAULT_POOLING}
    assert list(embed(full, tiles)) == list(DEFAULT_POOLING)
    assert embed(full, tiles)["mean"].shape[1] == 3

    defaults = {}
    for pooling in ("mean", "cls"):
        trimmed_path = tmp_path / f"trimmed_{pooling}"
        b_star = _sweep(
            repo_root,
            monkeypatch,
            tmp_path / "encoder",
            screen.path,
            tmp_path / f"sweep_{pooling}",
            trimmed_path,
            pooling,
        )
        doc = json.loads((trimmed_path / "encoder.json").read_text())
        assert doc["readout"] == {"blocks": [b_star], "pooling": [pooling]}
        trimmed, tcfg, readout = load_encoder(trimmed_path)
        assert tcfg.depth == b_star
        assert readout == {"blocks": (b_star,), "pooling": (pooling,)}

        got = embed(trimmed, tiles, batch_size=8)  # no blocks / pooling: the recorded readout
        assert list(got) == [pooling] and got[pooling].shape[1] == 1
        ref = embed(enc, tiles, blocks=[b_star], pooling=pooling, batch_size=8)[pooling]
        scale = float(np.abs(ref).max())
        np.testing.assert_allclose(got[pooling], ref, rtol=0, atol=1e-5 * scale)
        # explicit arguments still win over the readout
        other = embed(trimmed, tiles, pooling="mean_norm", batch_size=8)
        assert list(other) == ["mean_norm"] and other["mean_norm"].shape[1] == 1
        defaults[pooling] = got[pooling][:, 0]

    # the pooling chosen at sweep time changes what embed() returns by default
    assert defaults["mean"].shape == defaults["cls"].shape
    assert not np.allclose(defaults["mean"], defaults["cls"], atol=1e-3)


def test_readout_recorded_validated_and_defaulted_for_older_exports(tmp_path):
    enc = ViTEncoder(vit_config("mu/8", depth=3, in_chans=6), rngs=nnx.Rngs(0))
    export_encoder(tmp_path / "e", nnx.state(enc), enc.cfg, num_blocks=2, readout={"pooling": "cls_norm"})
    assert load_encoder(tmp_path / "e")[2] == {"blocks": (1, 2), "pooling": ("cls_norm",)}  # blocks: all of depth 2
    export_encoder(tmp_path / "f", nnx.state(enc), enc.cfg, readout={"blocks": [1, 3], "pooling": ["mean", "cls"]})
    f, _, readout = load_encoder(tmp_path / "f")
    assert readout == {"blocks": (1, 3), "pooling": ("mean", "cls")}
    images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 6), dtype=np.uint8)
    got = embed(f, images)
    np.testing.assert_array_equal(got["cls"], embed(enc, images, blocks=[1, 3], pooling="cls")["cls"])

    with pytest.raises(ConfigError, match="blocks"):
        export_encoder(tmp_path / "g", nnx.state(enc), enc.cfg, num_blocks=2, readout={"blocks": 3})
    with pytest.raises(ConfigError, match="pooling"):
        export_encoder(tmp_path / "g", nnx.state(enc), enc.cfg, readout={"pooling": "max"})

    # an export written before readouts were recorded: every block of its depth and the default pooling
    meta = tmp_path / "e" / "encoder.json"
    doc = json.loads(meta.read_text())
    del doc["readout"]
    meta.write_text(json.dumps(doc))
    old, _, readout = load_encoder(tmp_path / "e")
    assert readout == {"blocks": (1, 2), "pooling": DEFAULT_POOLING}
    out = embed(old, images)
    assert list(out) == list(DEFAULT_POOLING) and out["mean"].shape[1] == 2

    doc["readout"] = {"blocks": [7], "pooling": ["mean"]}
    meta.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="readout"):
        load_encoder(tmp_path / "e")
