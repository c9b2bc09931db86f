"""Parity with the PyTorch reference (timm 0.9.7 / timm >= 1.0.25 and the torch MAE of tools/goldens/make_goldens.py).

The goldens are committed npz files; this test never imports torch.
"""

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vitally_jax.errors import WeightsError
from vitally_jax.interop.openphenom import OPENPHENOM_ENCODER, load_mae_weights, mae_params_from_openphenom
from vitally_jax.interop.timm_vit import encoder_to_timm
from vitally_jax.models.layers import unpatchify, unpatchify_channels
from vitally_jax.models.mae import MAE, fourier_image, mae_config
from vitally_jax.models.preprocess import self_standardize

GOLDENS = pathlib.Path(__file__).parent / "goldens"
ATOL, LOSS_ATOL = 1e-5, 5e-6
# The image-mode Fourier loss is ~25 here (a float32 ulp is 1.9e-6) and comes from two different float32 FFTs
# (PyTorch's and XLA's) and sums over 3,456 terms: each rounds to ~1e-6 relative, so allow 2e-6 relative on top.
FOURIER_RTOL = 2e-6


def load(name):
    z = np.load(GOLDENS / f"{name}.npz")
    meta = json.loads(str(z["meta"]))
    sd = {k[3:]: z[k] for k in z.files if k.startswith("sd/")}
    arrays = {k: z[k] for k in z.files if not k.startswith("sd/") and k != "meta"}
    return meta, sd, arrays


def golden_config(meta):
    ca = meta["channel_agnostic"]
    return mae_config(
        "CA-mu/8" if ca else "mu/8",
        width=meta["width"],
        depth=meta["depth"],
        num_heads=meta["heads"],
        mlp_dim=meta["width"] * meta["mlp_ratio"],
        patch_size=meta["patch"],
        img_size=meta["img"],
        in_chans=meta["chans"],
        max_in_chans=meta["ca_max_chans"],
        decoder_width=meta["dec_width"],
        decoder_depth=meta["ca_dec_depth"] if ca else meta["dec_depth"],
        decoder_heads=meta["dec_heads"],
        cross_attn_heads=meta["ca_cross_heads"],
        decoder_channels=meta["chans"],
        mask_ratio=meta["mask_ratio"],
        fourier_weight=meta["fourier_weight"],
        fourier="reference",
    )


_COMPILED = {}


def run_model(meta, sd, arrays, mlp_bias):
    """Load the golden state dict into our MAE; one jitted pass: encoder readouts + MAE outputs."""
    cfg = golden_config(meta)
    cfg = dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, bias=mlp_bias))  # blocks as the file's
    mae = nnx.eval_shape(lambda: MAE(cfg, rngs=nnx.Rngs(0)))  # every value comes from the golden
    load_mae_weights(mae, sd, mlp_bias=mlp_bias, source="golden")
    graphdef, state = nnx.split(mae)
    if cfg not in _COMPILED:

        @jax.jit
        def fwd(state, x, noise):
            m = nnx.merge(graphdef, state)
            return m.encoder(x), m(x, noise=noise)

        _COMPILED[cfg] = fwd
    enc, out = _COMPILED[cfg](state, jnp.asarray(arrays["x"]), jnp.asarray(arrays["noise"]))
    return cfg, mae, jax.tree.map(np.asarray, (enc, out))


CASES = {"mae_legacy": "legacy", "ca_mae_legacy": "legacy", "mae_new": "new"}


@pytest.fixture(scope="module", params=sorted(CASES))
def golden(request):
    name = request.param
    meta, sd, arrays = load(name)
    cfg, mae, result = run_model(meta, sd, arrays, CASES[name])
    return name, meta, sd, arrays, cfg, mae, result


def test_self_standardize_matches_reference(golden):
    _, _, _, arrays, *_ = golden
    np.testing.assert_allclose(np.asarray(self_standardize(jnp.asarray(arrays["pixels"]))), arrays["x"], atol=1e-5)


def test_encoder_tokens_and_every_block_readout(golden):
    name, meta, sd, arrays, cfg, mae, (enc, out) = golden
    tokens = arrays["block_tokens"]  # (nb, B, N, D)
    np.testing.assert_allclose(enc["tokens"], tokens[-1], atol=ATOL)
    # every block: CLS and mean of the patch tokens straight from the reference's per-block tokens
    np.testing.assert_allclose(enc["blocks"]["cls"], tokens[:, :, 0].transpose(1, 0, 2), atol=ATOL)
    np.testing.assert_allclose(enc["blocks"]["mean"], tokens[:, :, 1:].mean(2).transpose(1, 0, 2), atol=ATOL)
    for key in ("cls", "cls_norm", "mean", "mean_norm"):
        np.testing.assert_allclose(enc["blocks"][key], arrays[key], atol=ATOL, err_msg=f"{name}: {key}")
    # timm's own pooled embedding: global_pool='token' -> CLS after norm; 'avg' -> fc_norm(mean)
    readout = "mean_norm" if meta["channel_agnostic"] else "cls_norm"
    np.testing.assert_allclose(enc["blocks"][readout][:, -1], arrays["timm_embedding"], atol=ATOL)
    assert np.abs(tokens[-1]).max() > 0.5  # not a degenerate near-zero network


def test_mae_latent_mask_reconstruction_losses(golden):
    name, meta, sd, arrays, cfg, mae, (enc, out) = golden
    np.testing.assert_array_equal(out["mask"], arrays["mask"])
    assert out["mask"].sum() == arrays["mask"].sum() > 0
    np.testing.assert_allclose(out["latent"], arrays["latent"], atol=ATOL)
    np.testing.assert_allclose(out["target"], arrays["target"], atol=1e-6)
    np.testing.assert_allclose(out["pred"], arrays["pred"], atol=ATOL)
    np.testing.assert_allclose(out["loss_rec"], arrays["loss_rec"], atol=LOSS_ATOL)
    np.testing.assert_allclose(out["loss_fourier"], arrays["loss_fourier_reference"], atol=LOSS_ATOL)
    np.testing.assert_allclose(out["loss"], arrays["loss_reference"], atol=LOSS_ATOL)
    # image-mode Fourier loss of the same reconstruction
    p, g, c = meta["patch"], meta["img"] // meta["patch"], meta["chans"]
    unpatch = unpatchify_channels if meta["channel_agnostic"] else unpatchify
    ft = fourier_image(unpatch(jnp.asarray(out["pred"]), p, (g, g), c), jnp.asarray(arrays["x"]))
    np.testing.assert_allclose(ft, arrays["loss_fourier_image"], atol=LOSS_ATOL, rtol=FOURIER_RTOL)
    total = (1 - meta["fourier_weight"]) * out["loss_rec"] + meta["fourier_weight"] * ft
    np.testing.assert_allclose(total, arrays["loss_image"], atol=LOSS_ATOL)


def test_mlp_bias_flag_is_real(golden):
    """Loading with the other bias semantics must break parity by a wide margin."""
    name, meta, sd, arrays, cfg, mae, _ = golden
    if meta["channel_agnostic"]:
        pytest.skip("one flip check per semantics is enough")
    other = "new" if CASES[name] == "legacy" else "legacy"
    _, _, (enc, out) = run_model(meta, sd, arrays, other)
    assert np.abs(enc["tokens"] - arrays["block_tokens"][-1]).max() > 0.05
    assert np.abs(out["pred"] - arrays["pred"]).max() > 0.05


def test_encoder_round_trip_to_timm_keys(golden):
    name, meta, sd, arrays, cfg, mae, _ = golden
    prefix = OPENPHENOM_ENCODER
    back = encoder_to_timm(mae.encoder, mlp_bias=CASES[name], prefix=prefix)
    theirs = {k: v for k, v in sd.items() if k.startswith(prefix)}
    assert sorted(back) == sorted(theirs)
    for k in theirs:
        np.testing.assert_allclose(back[k], theirs[k], atol=1e-6, err_msg=k)


def test_bad_state_dicts_raise_weights_error():
    meta, sd, arrays = load("mae_legacy")
    cfg = golden_config(meta)
    k_missing = "encoder.vit_backbone.blocks.1.mlp_bias"
    k_shape = "decoder.blocks.0.attn.qkv.weight"
    bad = {k: v for k, v in sd.items() if k != k_missing}
    bad["encoder.vit_backbone.reg_token"] = np.zeros((1, 1, 4), np.float32)
    bad[k_shape] = sd[k_shape][:, :-1]
    with pytest.raises(WeightsError) as e:
        mae_params_from_openphenom(bad, cfg, source="ckpt.safetensors")
    msg = str(e.value)
    assert "\n" not in msg and "ckpt.safetensors" in msg
    assert k_missing in msg and "reg_token" in msg and k_shape in msg
    wrong_pos = dict(sd)
    wrong_pos["decoder.pos_embeddings"] = sd["decoder.pos_embeddings"] + 0.1
    with pytest.raises(WeightsError, match="sin-cos"):
        mae_params_from_openphenom(wrong_pos, cfg)
    with pytest.raises(WeightsError, match="mlp_bias"):
        mae_params_from_openphenom(sd, cfg, mlp_bias="both")
