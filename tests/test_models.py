"""ViT/MAE behaviour: per-block readouts vs truncation, parameter counts, channel-agnostic properties,
self-standardisation, masking, options (remat, dtype, stochastic depth, Fourier modes), config errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vitally_jax.errors import ConfigError, DataError
from vitally_jax.models import layers
from vitally_jax.models.layers import random_masking
from vitally_jax.models.mae import MAE, fourier_image, mae_config
from vitally_jax.models.preprocess import self_standardize
from vitally_jax.models.vit import ViTEncoder, count_params, vit_config


def perturbed(ctor, seed=0):
    """Model with random parameters well away from any init: LayerNorm scales 1 +- 0.1, LayerScale ~0.5,
    biases and tokens ~N(0, 0.2), weights ~N(0, 1/fan_in). Filled from numpy: no initialiser compiles."""
    graphdef, state = nnx.split(nnx.eval_shape(ctor))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = "/".join(str(getattr(p, "key", getattr(p, "name", ""))) for p in path)
        z = rng.standard_normal(leaf.shape).astype(np.float32)
        if name.endswith("scale/value"):
            return jnp.asarray(1.0 + 0.1 * z)
        if "gamma" in name:
            return jnp.asarray(0.5 + 0.1 * z)
        if name.endswith(("kernel/value", "in_proj/value")):
            return jnp.asarray(z / np.sqrt(leaf.shape[-2]))
        return jnp.asarray(0.2 * z)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def images(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


# ---------------------------------------------------------------------------------------------------------------
# C: one scan pass gives every block's readouts, identical to truncated models
# ---------------------------------------------------------------------------------------------------------------
def test_per_block_outputs_equal_truncated_models():
    cfg = vit_config("mu/8")
    enc = perturbed(lambda: ViTEncoder(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(enc)
    x = images((2, 32, 32, 6))

    @jax.jit
    def run(state, x):
        m = nnx.merge(graphdef, state)
        return m(x), [m(x, num_blocks=b) for b in range(1, cfg.depth + 1)]

    full, trunc = run(state, x)
    for b, out in enumerate(trunc, start=1):
        for key in ("cls", "cls_norm", "mean", "mean_norm"):
            assert out["blocks"][key].shape == (2, b, cfg.width)
            # separately compiled programs (other scan lengths) may round differently: a few ulps of |x| <= ~7
            np.testing.assert_allclose(full["blocks"][key][:, b - 1], out["blocks"][key][:, -1], atol=1e-5)
        np.testing.assert_allclose(out["tokens"][:, 0], full["blocks"]["cls"][:, b - 1], atol=1e-5)
    # the blocks really change the representation
    assert np.abs(np.diff(np.asarray(full["blocks"]["mean"]), axis=1)).max() > 0.1
    with pytest.raises(ConfigError, match="num_blocks"):
        enc(x, num_blocks=cfg.depth + 1)


# ---------------------------------------------------------------------------------------------------------------
# D: parameter counts without allocation
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "variant, overrides, expected",
    [
        ("S/16", {"in_chans": 6}, 21.9e6),
        ("L/8", {"in_chans": 6}, 302.6e6),
        ("G/8", {"in_chans": 6}, 1.84e9),
    ],
)
def test_encoder_parameter_counts(variant, overrides, expected):
    abstract = nnx.eval_shape(lambda: ViTEncoder(vit_config(variant, **overrides), rngs=nnx.Rngs(0)))
    n = count_params(abstract)
    assert abs(n - expected) / expected < 0.005, n


def test_openphenom_shaped_counts_match_the_reference_exactly():
    """CA-S/16: timm stores 162 encoder tensors, 22,459,776 values incl. its 11-channel pos table; the full
    OpenPhenom MAE has 178,045,568. With the default `bias='legacy'` we carry timm's one mlp_bias per block
    and no fixed tables; `bias='free'` adds explicit q/k/v biases (3*D per block)."""
    cfg = mae_config("CA-S/16")
    enc = cfg.encoder
    abstract = nnx.eval_shape(lambda: MAE(cfg, rngs=nnx.Rngs(0)))
    explicit_qkv = 0
    free = dataclasses.replace(enc, bias="free")
    abstract_free = nnx.eval_shape(lambda: ViTEncoder(free, rngs=nnx.Rngs(0)))
    assert count_params(abstract_free) - count_params(abstract.encoder) == enc.depth * 3 * enc.width
    enc_pos = (1 + enc.max_in_chans * enc.grid**2) * enc.width
    dec_pos = (1 + cfg.decoder_channels * enc.grid**2) * cfg.decoder_width
    placeholder = cfg.decoder_width
    assert count_params(abstract.encoder) - explicit_qkv + enc_pos == 22_459_776
    assert count_params(abstract) - explicit_qkv + enc_pos + dec_pos + placeholder == 178_045_568


# ---------------------------------------------------------------------------------------------------------------
# Channel-agnostic properties
# ---------------------------------------------------------------------------------------------------------------
def test_channel_agnostic_subsets_and_permutations():
    cfg = vit_config("CA-mu/8", in_chans=4, max_in_chans=4)
    enc = perturbed(lambda: ViTEncoder(cfg, rngs=nnx.Rngs(1)))
    graphdef, state = nnx.split(enc)
    x4 = images((2, 32, 32, 4), seed=3)
    perm = np.array([2, 0, 3, 1])
    n = (32 // 8) ** 2

    @jax.jit
    def run(state, x4):
        m = nnx.merge(graphdef, state)
        return (
            m.embed_patches(x4),
            m.embed_patches(x4[..., :3]),
            m.embed_patches(x4[..., perm]),
            m(x4)["tokens"],
            m(x4[..., perm])["tokens"],
            m(x4[..., :3])["tokens"],
        )

    e4, e3, ep, t4, tp, t3 = map(np.asarray, run(state, x4))
    assert e4.shape == (2, 4 * n, 64) and e3.shape == (2, 3 * n, 64) and t3.shape == (2, 1 + 3 * n, 64)
    # a 3-channel input uses the first three channel blocks (same tokens, same positions)
    # (values reach ~33, where a float32 ulp is 3.8e-6: tolerances scale with the largest value)
    np.testing.assert_allclose(e3, e4[:, : 3 * n], atol=2e-6 * np.abs(e4).max())
    # permuting channels permutes the token blocks, before and after the transformer
    blocks = e4.reshape(2, 4, n, -1)
    np.testing.assert_allclose(ep.reshape(2, 4, n, -1), blocks[:, perm], atol=2e-6 * np.abs(e4).max())
    tb = t4[:, 1:].reshape(2, 4, n, -1)
    np.testing.assert_allclose(tp[:, 1:].reshape(2, 4, n, -1), tb[:, perm], atol=1e-5 * np.abs(t4).max())
    np.testing.assert_allclose(tp[:, 0], t4[:, 0], atol=1e-5 * np.abs(t4).max())
    with pytest.raises(ConfigError, match="at most 4"):
        enc.embed_patches(images((1, 32, 32, 5)))


def test_position_table_is_row_first_with_zero_cls():
    t = layers.sincos_2d(3, 5, 8)
    assert t.shape == (16, 8) and not t[0].any()
    row, col = 2, 4  # token index 1 + 2*5 + 4
    w = 1.0 / 10000 ** (np.arange(2) / 2)
    expect = np.concatenate([np.sin(row * w), np.cos(row * w), np.sin(col * w), np.cos(col * w)])
    np.testing.assert_allclose(t[1 + row * 5 + col], expect, atol=1e-6)
    assert layers.sincos_2d(2, 2, 8, cls_row=False, repeat=3).shape == (12, 8)


# ---------------------------------------------------------------------------------------------------------------
# Self-standardisation and masking
# ---------------------------------------------------------------------------------------------------------------
def test_self_standardize_matches_numpy_two_pass():
    rng = np.random.default_rng(0)
    pix = rng.integers(0, 256, size=(3, 16, 12, 5), dtype=np.uint8)
    pix[1, ..., 2] = 7  # a constant channel
    x = pix.astype(np.float64) / 255.0
    mean = x.mean(axis=(1, 2), keepdims=True)
    var = ((x - mean) ** 2).mean(axis=(1, 2), keepdims=True)
    ref = (x - mean) / np.sqrt(var + 1e-5)
    out = np.asarray(self_standardize(jnp.asarray(pix)))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=2e-5)
    assert np.abs(out[1, ..., 2]).max() == 0  # exact by construction (shifted sums of zeros), on any CPU
    np.testing.assert_allclose(np.asarray(self_standardize(jnp.asarray(x, jnp.float32))), ref, atol=2e-5)
    assert not np.asarray(self_standardize(jnp.asarray(x, jnp.float32)))[1, ..., 2].any()  # float input: also exact 0
    with pytest.raises(DataError, match="B, H, W, C"):
        self_standardize(jnp.zeros((16, 16, 3), jnp.uint8))


@pytest.mark.parametrize("length, ratio", [(16, 0.75), (10, 0.75), (49, 0.6)])
def test_masking_semantics(length, ratio):
    noise = np.random.default_rng(length).random((3, length)).astype(np.float32)
    ids_keep, mask, restore = map(np.asarray, random_masking(jnp.asarray(noise), ratio))
    keep = int(length * (1 - ratio))
    shuffle = np.argsort(noise, axis=1)
    assert ids_keep.shape == (3, keep)
    np.testing.assert_array_equal(ids_keep, shuffle[:, :keep])
    np.testing.assert_array_equal(restore, np.argsort(shuffle, axis=1))
    expected = np.ones((3, length), np.float32)
    np.put_along_axis(expected, shuffle[:, :keep], 0.0, axis=1)
    np.testing.assert_array_equal(mask, expected)
    assert (mask.sum(1) == length - keep).all()


# ---------------------------------------------------------------------------------------------------------------
# Options: remat, stochastic depth, bfloat16, Fourier modes
# ---------------------------------------------------------------------------------------------------------------
def test_remat_and_drop_path_and_bfloat16():
    x = images((2, 32, 32, 6))
    results = {}
    for remat in ("none", "full", "dots_saveable"):
        cfg = vit_config("mu/8", depth=2, remat=remat, drop_path_rate=0.5)
        enc = perturbed(lambda: ViTEncoder(cfg, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(enc)

        def f(params, key):
            out = nnx.merge(graphdef, params)(x, drop_key=key)
            return jnp.mean(out["tokens"] ** 2) + jnp.mean(out["blocks"]["cls_norm"])

        step = jax.jit(jax.value_and_grad(f))
        results[remat] = step(state, jax.random.key(1))
        if remat == "none":
            again, other = step(state, jax.random.key(1))[0], step(state, jax.random.key(2))[0]
    l1, g1 = results["none"]
    assert float(again) == float(l1)  # stochastic depth is key-driven
    assert abs(float(other) - float(l1)) > 1e-4
    for remat in ("full", "dots_saveable"):
        lr, gr = results[remat]
        np.testing.assert_allclose(lr, l1, rtol=1e-5)  # the loss is ~64: a mean of 2,176 squares
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), gr, g1)

    cfg32 = vit_config("mu/8", depth=2)
    cfg16 = vit_config("mu/8", depth=2, dtype="bfloat16")
    e32 = perturbed(lambda: ViTEncoder(cfg32, rngs=nnx.Rngs(0)))
    e16 = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: ViTEncoder(cfg16, rngs=nnx.Rngs(0)))), nnx.state(e32))
    assert e16.blocks.in_proj[...].dtype == jnp.float32
    out32, out16 = jax.jit(lambda x: (e32(x), e16(x)))(x)
    assert out16["tokens"].dtype == jnp.bfloat16
    ref = np.asarray(out32["blocks"]["mean_norm"])
    err = np.abs(np.asarray(out16["blocks"]["mean_norm"]) - ref).max()
    assert 0 < err < 0.1 * np.abs(ref).max()


def test_patchify_round_trips():
    x = images((2, 16, 24, 3))
    t = layers.patchify(x, 8)
    assert t.shape == (2, 6, 192)
    np.testing.assert_array_equal(t[0, 1], np.asarray(x[0, 0:8, 8:16, :]).reshape(-1))
    np.testing.assert_array_equal(layers.unpatchify(t, 8, (2, 3), 3), x)
    tc = layers.patchify_channels(x, 8)
    assert tc.shape == (2, 18, 64)
    np.testing.assert_array_equal(tc[0, 6 + 4], np.asarray(x[0, 8:16, 8:16, 1]).reshape(-1))
    np.testing.assert_array_equal(layers.unpatchify_channels(tc, 8, (2, 3), 3), x)


def test_fourier_image_mode_and_loss_mix():
    cfg = mae_config("mu/8", fourier="image")
    model = perturbed(lambda: MAE(cfg, rngs=nnx.Rngs(0)))
    x = images((2, 32, 32, 6))
    out = jax.jit(lambda x, nz: model(x, noise=nz))(x, jax.random.uniform(jax.random.key(0), (2, 16)))
    np.testing.assert_array_equal(out["target"], layers.patchify(x, 8))
    ft = fourier_image(layers.unpatchify(out["pred"], 8, (4, 4), 6), x)
    np.testing.assert_allclose(out["loss_fourier"], ft, rtol=1e-5)  # a mean over 12,288 terms, summed in another order
    np.testing.assert_allclose(out["loss"], 0.99 * out["loss_rec"] + 0.01 * out["loss_fourier"], rtol=1e-6)
    assert out["mask"].sum() == 2 * (16 - 4)
    assert out["latent"].shape == (2, 5, 64)


# ---------------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------------
def test_variant_configs_and_errors():
    g = vit_config("G/8")
    assert (g.width, g.depth, g.num_heads, g.mlp_dim, g.patch_size) == (1664, 48, 16, 8192, 8)
    assert vit_config("G/8", num_heads=13).num_heads == 13
    ca = mae_config("CA-S/16")
    assert ca.decoder == "channel_agnostic" and ca.decoder_eps == 1e-5 and ca.encoder.global_pool == "avg"
    assert ca.encoder.max_in_chans == 11 and ca.decoder_channels == 6
    for v in ("L/8", "G/8"):
        m = mae_config(v)
        assert (m.decoder_depth, m.decoder_width, m.decoder_heads, m.decoder) == (8, 512, 16, "standard")
    assert mae_config("L/8", decoder_depth=4, depth=2).encoder.depth == 2
    with pytest.raises(ConfigError, match="unknown ViT variant"):
        vit_config("X/8")
    with pytest.raises(ConfigError, match="widht"):
        vit_config("S/16", widht=3)
    with pytest.raises(ConfigError, match="remat"):
        vit_config("S/16", remat="some")
    with pytest.raises(ConfigError, match="fourier"):
        mae_config("S/16", fourier="fft")
    with pytest.raises(ConfigError, match="model.attention_impl: 'flash'"):
        vit_config("S/16", attention_impl="flash")


@pytest.mark.parametrize("heads", [16, 6, 3])
def test_head_group_attention_equals_jax_attention(heads):
    """The CPU attention (independent groups of two heads; 3 heads -> one head per group) equals
    jax.nn.dot_product_attention in value and in every input gradient, and the default picks it on CPU."""
    rng = np.random.default_rng(heads)
    q, k, v = (jnp.asarray(rng.standard_normal((3, 17, heads, 8)), jnp.float32) for _ in range(3))
    k = k * 3.0  # sharper softmax rows
    ref = jax.nn.dot_product_attention(q, k, v, implementation="xla")
    got = layers.head_group_attention(q, k, v)
    # scores reach |s| ~ 17 (float32 ulp 1.9e-6); a score's rounding moves its softmax weight by that relative amount,
    # so two evaluation orders can differ by a few 1e-6 * max|v| (|v| < 4)
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=0)
    np.testing.assert_array_equal(layers.attention(q, k, v, None), got)  # auto on CPU
    np.testing.assert_array_equal(layers.attention(q, k, v, "xla"), ref)

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))

    g_ref = jax.grad(loss(lambda *a: jax.nn.dot_product_attention(*a, implementation="xla")), (0, 1, 2))(q, k, v)
    g_got = jax.grad(loss(layers.head_group_attention), (0, 1, 2))(q, k, v)
    for a, b in zip(g_got, g_ref):
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-5)  # as above, times |k| up to ~13 (k is scaled by 3)
    # bfloat16 inputs: bfloat16 output, float32 scores; close to the float32 result
    bf = layers.head_group_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
    assert bf.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(bf, np.float32), ref, atol=0.1)
