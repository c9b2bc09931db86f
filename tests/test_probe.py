"""The jitted every-block pass: equals truncated models, block subsets, sharding, padding, bad input."""

import numpy as np
import pytest
from flax import nnx

from vitally_jax.embedding.blocks import POOLINGS, embed, make_extractor, trim_encoder
from vitally_jax.errors import ConfigError, DataError
from vitally_jax.models.preprocess import self_standardize
from vitally_jax.models.vit import ViTEncoder, vit_config
from vitally_jax.sharding import make_mesh

DEPTH = 3


@pytest.fixture(scope="module")
def encoder():
    """A tiny encoder with every parameter moved away from its init (LayerScale 1e-4 would hide the blocks)."""
    enc = ViTEncoder(vit_config("mu/8", depth=DEPTH, in_chans=3), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    for path, var in nnx.iter_graph(enc):
        if isinstance(var, nnx.Param):
            x = np.asarray(var[...])
            shift = 0.5 if path[-1] == "gamma" else 0.0
            var[...] = (x + shift + 0.1 * rng.standard_normal(x.shape)).astype(x.dtype)
    return enc


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def all_blocks(encoder, images):
    return embed(encoder, images, pooling=POOLINGS, batch_size=8)


def test_single_pass_equals_truncated_models(encoder, images, all_blocks):
    assert all(v.shape == (10, DEPTH, 64) and v.dtype == np.float32 for v in all_blocks.values())
    scale = {p: np.abs(v).max() for p, v in all_blocks.items()}
    for b in range(1, DEPTH + 1):
        trimmed = trim_encoder(encoder, b)
        assert trimmed.cfg.depth == b
        assert nnx.state(trimmed, nnx.Param)["blocks"]["in_proj"][...].shape[0] == b
        truncated = embed(trimmed, images, pooling=POOLINGS, batch_size=8)
        for p in POOLINGS:
            assert truncated[p].shape == (10, b, 64)
            # another program (depth b): float32 rounding differs by a few ulps of the largest value
            np.testing.assert_allclose(all_blocks[p][:, b - 1], truncated[p][:, -1], atol=1e-5 * scale[p], rtol=0)
    # and the same through the encoder's own num_blocks argument, outside the jitted function
    direct = encoder(self_standardize(images), num_blocks=2)["blocks"]
    for p in POOLINGS:
        np.testing.assert_allclose(all_blocks[p][:, 1], np.asarray(direct[p][:, -1]), atol=1e-5 * scale[p], rtol=0)
    # blocks really differ from each other (the test would be vacuous otherwise)
    assert np.abs(all_blocks["mean"][:, 0] - all_blocks["mean"][:, -1]).max() > 0.1


def test_block_subset_and_pooling_selection(encoder, images, all_blocks):
    sub = embed(encoder, images, blocks=[3, 1], pooling="mean", batch_size=8)
    assert list(sub) == ["mean"] and sub["mean"].shape == (10, 2, 64)
    np.testing.assert_allclose(
        sub["mean"], all_blocks["mean"][:, [0, 2]], atol=1e-5 * np.abs(all_blocks["mean"]).max(), rtol=0
    )
    ex = make_extractor(encoder, blocks=[2])
    assert ex.blocks == (2,) and ex.poolings == ("cls_norm", "mean")


def test_sharded_batch_equals_single_device(encoder, images, all_blocks):
    mesh = make_mesh((4, 2, 1))
    ex = make_extractor(encoder, pooling=POOLINGS, mesh=mesh)
    assert ex.batch_multiple == 8
    out = ex(images[:8])  # one global batch over data x fsdp
    assert out["mean"].sharding.spec[0] == ("data", "fsdp")
    sharded = embed(encoder, images, pooling=POOLINGS, batch_size=5, mesh=mesh)  # 5 -> 8 rows per pass
    for p in POOLINGS:
        # partial sums over the fsdp shards are added in another order: a few ulps of the largest value
        np.testing.assert_allclose(sharded[p], all_blocks[p], atol=1e-5 * np.abs(all_blocks[p]).max(), rtol=0)


def test_bad_input(encoder, images):
    with pytest.raises(ConfigError, match=r"blocks: expected block numbers in 1\.\.3"):
        embed(encoder, images, blocks=[0, 2])
    with pytest.raises(ConfigError, match=r"1\.\.3, got \[5\]"):
        embed(encoder, images, blocks=[5])
    with pytest.raises(ConfigError, match="pooling"):
        embed(encoder, images, pooling=("mean", "max"))
    with pytest.raises(DataError, match="uint8"):
        embed(encoder, images.astype(np.float32))
    with pytest.raises(DataError, match=r"\(N, H, W, C\)"):
        embed(encoder, images[0])
    with pytest.raises(ConfigError, match="trim"):
        trim_encoder(encoder, DEPTH + 1)


def test_cpu_slices_equal_the_whole_batch(encoder, images, all_blocks):
    from vitally_jax.embedding.blocks import cpu_micro_batch

    # the slice rule: largest divisor of the batch whose rows fit; 0 when the batch fits or nothing >= 2 does
    assert cpu_micro_batch(64, 65) == 32 and cpu_micro_batch(32, 257) == 8 and cpu_micro_batch(16, 65) == 0
    assert cpu_micro_batch(48, 65) == 24 and cpu_micro_batch(37, 65) == 0 and cpu_micro_batch(4, 5000) == 0
    whole = make_extractor(encoder, pooling=POOLINGS, micro_batch=0)
    sliced = make_extractor(encoder, pooling=POOLINGS, micro_batch=2)
    auto = make_extractor(encoder, pooling=POOLINGS)
    assert whole.slice_size(images[:8].shape) == 0 and sliced.slice_size(images[:8].shape) == 2
    # 17 tokens per 32 px crop (8 px patches): 128 crops per slice; 1,025 tokens at 256 px: 2 crops
    assert auto.slice_size((256, 32, 32, 3)) == 128 and auto.slice_size((64, 256, 256, 3)) == 2
    a, b = whole(images[:8]), sliced(images[:8])
    for p in POOLINGS:
        assert b[p].shape == (8, DEPTH, 64)
        # the same computation on fewer rows per matmul: equal up to float32 rounding
        np.testing.assert_allclose(np.asarray(b[p]), np.asarray(a[p]), atol=1e-5 * np.abs(all_blocks[p]).max(), rtol=0)
        np.testing.assert_allclose(np.asarray(b[p]), all_blocks[p][:8], atol=1e-5 * np.abs(all_blocks[p]).max(), rtol=0)
    with pytest.raises(ConfigError, match="micro_batch 3: expected a divisor of the batch"):
        sliced.__class__(**{**sliced.__dict__, "micro_batch": 3})(images[:8])
