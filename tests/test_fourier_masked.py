"""OpenPhenom as released: the masked Fourier loss (its default `mask_fourier_loss=True`), its decoder defaults,
the decoder settings read from a config.json or our export's metadata, and option validation on every path.

Golden: tests/goldens/openphenom_masked_fourier.npz, written by tools/goldens/make_goldens.py (timm 0.9.7 encoder,
the torch restatement of OpenPhenom's CAMAEDecoder with its defaults: 16-head blocks, 8-head cross-attention,
LayerNorm eps 1e-6; the masked Fourier loss as OpenPhenom's compute_MAE_loss reduces it). Never imports torch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from vitally_jax.errors import ConfigError, WeightsError
from vitally_jax.interop import openphenom
from vitally_jax.models.mae import MAE, fourier_masked, fourier_reference, mae_config

GOLDENS = pathlib.Path(__file__).resolve().parent / "goldens"
ATOL, LOSS_ATOL = 1e-5, 5e-6
LOGGER = "vitally_jax.interop"


def _load(name: str):
    with np.load(GOLDENS / name) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays.pop("meta"))) if "meta" in arrays else {}
    sd = {k[3:]: v.astype(np.float32) for k, v in arrays.items() if k.startswith("sd/")}
    return meta, sd, {k: v for k, v in arrays.items() if not k.startswith("sd/")}


@pytest.fixture(scope="module")
def golden():
    return _load("openphenom_masked_fourier.npz")


@pytest.fixture(scope="module")
def interop_golden():
    """OpenPhenom-shaped (6 decoder channels, 11-channel pos table) with 2-head decoder blocks and eps 1e-5."""
    meta, sd, arrays = _load("interop_openphenom.npz")
    return sd, arrays


def _run(mae, x, noise):
    graphdef, state = nnx.split(mae)
    out = jax.jit(lambda s, x, n: nnx.merge(graphdef, s)(x, noise=n))(state, jnp.asarray(x), jnp.asarray(noise))
    return jax.tree.map(np.asarray, out)


def test_masked_fourier_loss_matches_openphenom_golden(golden, caplog):
    meta, sd, g = golden
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        mae = openphenom.load_openphenom(sd, max_in_chans=meta["ca_max_chans"])  # nothing but the weights
    cfg = mae.cfg
    # OpenPhenom's defaults, and the one line that says they were used
    assert (cfg.decoder_heads, cfg.cross_attn_heads, cfg.decoder_eps, cfg.fourier) == (16, 8, 1e-6, "masked")
    assert (cfg.decoder_heads, cfg.cross_attn_heads, cfg.decoder_eps) == (
        meta["dec_heads"],
        meta["ca_cross_heads"],
        meta["dec_eps"],
    )
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert "decoder_heads=16, cross_attn_heads=8, decoder_eps=1e-06" in lines[0] and "not stored" in lines[0]
    out = _run(mae, g_x(golden), g["noise"])
    np.testing.assert_array_equal(out["mask"], g["mask"])
    np.testing.assert_allclose(out["latent"], g["latent"], atol=ATOL)
    np.testing.assert_allclose(out["pred"], g["pred"], atol=ATOL)
    np.testing.assert_allclose(out["target"], g["target"], atol=1e-6)
    np.testing.assert_allclose(out["loss_rec"], g["loss_rec"], atol=LOSS_ATOL)
    np.testing.assert_allclose(out["loss_fourier"], g["loss_fourier_masked"], atol=LOSS_ATOL)
    np.testing.assert_allclose(out["loss"], g["loss_masked"], atol=LOSS_ATOL)
    # the masked term is a different number from the unmasked mean (here by 3.8e-2), which 'reference' matches
    assert abs(g["loss_fourier_masked"] - g["loss_fourier_reference"]) > 1e-2
    ref = fourier_reference(jnp.asarray(out["pred"]), jnp.asarray(out["target"]), meta["chans"])
    np.testing.assert_allclose(ref, g["loss_fourier_reference"], atol=LOSS_ATOL)
    a = meta["fourier_weight"]
    np.testing.assert_allclose((1 - a) * out["loss_rec"] + a * ref, g["loss_reference"], atol=LOSS_ATOL)
    # the eps default is visible: the old 1e-5 moves the reconstruction by ~7e-5 (measured), beyond the tolerance
    old_eps = openphenom.load_openphenom(sd, max_in_chans=meta["ca_max_chans"], decoder_eps=1e-5)
    assert np.abs(_run(old_eps, g_x(golden), g["noise"])["pred"] - g["pred"]).max() > 3 * ATOL


def g_x(golden):
    """The golden's self-standardised input is not stored (it is recomputed from the pixels, tested elsewhere)."""
    from vitally_jax.models.preprocess import self_standardize

    return self_standardize(jnp.asarray(golden[2]["pixels"]))


def test_masked_fourier_formula_standard_decoder():
    """Standard decoder (M = 1): the loss equals the formula computed independently in float64 numpy."""
    cfg = mae_config("mu/8", fourier="masked", img_size=32, in_chans=3)
    mae = MAE(cfg, rngs=nnx.Rngs(3))
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    out = _run(mae, x, jax.random.uniform(jax.random.key(2), (2, 16)))
    pred, target, mask = (out[k].astype(np.float64) for k in ("pred", "target", "mask"))
    b, n, k = pred.shape
    shape = (b, k, 4, 4)  # s = sqrt(L / M) = 4
    per_elem = np.abs(np.abs(np.fft.fft2(pred.reshape(shape))) - np.abs(np.fft.fft2(target.reshape(shape))))
    want = (per_elem.reshape(b, n, k).mean(-1) * mask).sum() / mask.sum()
    # float32 FFTs of 16-point transforms and a mean over 4 x 192 terms per token: ~1e-6 relative
    np.testing.assert_allclose(out["loss_fourier"], want, rtol=1e-5)
    np.testing.assert_allclose(out["loss"], 0.99 * out["loss_rec"] + 0.01 * out["loss_fourier"], rtol=1e-6)
    direct = fourier_masked(jnp.asarray(out["pred"]), jnp.asarray(out["target"]), jnp.asarray(out["mask"]), 1)
    np.testing.assert_allclose(direct, out["loss_fourier"], rtol=1e-6)
    with pytest.raises(ConfigError, match="fourier='masked' needs L/M square"):
        fourier_masked(jnp.zeros((1, 12, 4)), jnp.zeros((1, 12, 4)), jnp.ones((1, 12)), 1)


# ------------------------------------------------------------------------------------------------------------------
# decoder settings from the file's config.json / our export's metadata
# ------------------------------------------------------------------------------------------------------------------


def _phenom_config(**decoder) -> dict:
    """The shape of OpenPhenom's public config.json (phenom_beta), with this golden's decoder."""
    dec = {
        "_target_": "mae_modules.CAMAEDecoder",
        "depth": 1,
        "embed_dim": 16,
        "mlp_ratio": 4,
        "norm_layer": {"_partial_": True, "_target_": "torch.nn.LayerNorm", "eps": 1e-5},
        "num_heads": 2,
        "num_modalities": 6,
        "qkv_bias": True,
        "tokens_per_modality": 9,
    }
    dec.update(decoder)
    return {"model_type": "MAE", "decoder": dec, "mask_fourier_loss": True, "fourier_loss_weight": 0.0}


def _checkpoint(tmp_path, sd, config: dict | None) -> pathlib.Path:
    """A folder as OpenPhenom's save_pretrained leaves it: model.safetensors (+ config.json)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "model.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(path))
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    return path


def test_decoder_settings_are_read_from_config_json(tmp_path, interop_golden, caplog):
    sd, g = interop_golden
    path = _checkpoint(tmp_path, sd, _phenom_config())
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        mae = openphenom.load_openphenom(path)
    assert not [r for r in caplog.records if r.name == LOGGER]  # nothing defaulted, nothing to say
    cfg = mae.cfg
    assert (cfg.decoder_heads, cfg.cross_attn_heads, cfg.decoder_eps, cfg.fourier) == (2, 8, 1e-5, "masked")
    # the values are really used: the reconstruction matches the torch golden built with them
    out = _run(mae, _x(g), g["noise"])
    np.testing.assert_allclose(out["pred"], g["masked/pred"], atol=ATOL)
    # explicit arguments beat the file; mask_fourier_loss=false selects the unmasked mean
    assert openphenom.load_openphenom(path, decoder_eps=1e-6).cfg.decoder_eps == 1e-6
    (tmp_path / "config.json").write_text(json.dumps(dict(_phenom_config(), mask_fourier_loss=False)))
    assert openphenom.load_openphenom(path).cfg.fourier == "reference"
    # a config passed explicitly takes the place of the file beside the weights
    other = tmp_path / "elsewhere.json"
    other.write_text(json.dumps(_phenom_config(num_heads=4)))
    assert openphenom.load_openphenom(path, config=other).cfg.decoder_heads == 4
    assert openphenom.load_openphenom(sd, config=_phenom_config(num_heads=8)).cfg.decoder_heads == 8


def test_config_json_that_contradicts_the_weights(tmp_path, interop_golden):
    sd, _ = interop_golden
    path = _checkpoint(tmp_path / "a", sd, _phenom_config(depth=4))
    with pytest.raises(WeightsError) as e:
        openphenom.load_openphenom(path)
    assert "config.json says decoder_depth=4, but the weights have decoder_depth=1" in str(e.value)
    path = _checkpoint(tmp_path / "b", sd, _phenom_config(num_heads="sixteen"))
    with pytest.raises(ConfigError, match=r"config.json: decoder.num_heads 'sixteen'; expected a positive integer"):
        openphenom.load_openphenom(path)
    path = _checkpoint(tmp_path / "c", sd, _phenom_config(num_heads=3))  # 16 is not divisible by 3
    with pytest.raises(ConfigError, match="model.decoder_width 16: must be divisible by 4 and by decoder_heads"):
        openphenom.load_openphenom(path)
    with pytest.raises(ConfigError, match="not an OpenPhenom config"):
        openphenom.load_openphenom(path, config={"hello": 1})
    # an unrelated config.json beside the weights is not ours to read: defaults, stated in the log
    path = _checkpoint(tmp_path / "d", sd, {"name": "some other program"})
    assert openphenom.load_openphenom(path, decoder_heads=2).cfg.decoder_eps == 1e-6


def test_export_metadata_round_trip_needs_no_arguments(tmp_path, interop_golden, caplog):
    sd, _ = interop_golden
    mae = openphenom.load_openphenom(sd, decoder_heads=2, decoder_eps=1e-5)
    out = openphenom.export_openphenom(tmp_path / "export.safetensors", mae)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        back = openphenom.load_openphenom(out)
    assert not [r for r in caplog.records if r.name == LOGGER]
    assert (back.cfg.decoder_heads, back.cfg.cross_attn_heads, back.cfg.decoder_eps) == (2, 8, 1e-5)


def _x(arrays):
    from vitally_jax.models.preprocess import self_standardize

    return self_standardize(jnp.asarray(arrays["pixels"]))


# ------------------------------------------------------------------------------------------------------------------
# option validation: the same one-line ConfigError on every path into the MAE
# ------------------------------------------------------------------------------------------------------------------

FOURIER_CHOICES = "expected one of 'reference', 'masked', 'image'"


def test_every_path_validates_options_like_mae_config(interop_golden):
    sd, _ = interop_golden
    paths = {
        "mae_config": lambda **kw: mae_config("CA-mu/8", **kw),
        "replace": lambda **kw: dataclasses.replace(mae_config("CA-mu/8"), **kw),
        "load_openphenom": lambda **kw: openphenom.load_openphenom(sd, decoder_heads=2, **kw),
    }
    cases = [
        (dict(fourier="fft"), f"model.fourier: 'fft'; {FOURIER_CHOICES}"),
        (dict(mask_ratio=1.5), "model.mask_ratio: 1.5; expected 0 < ratio < 1"),
        (dict(decoder="fancy"), "model.decoder: 'fancy'; expected 'standard' or 'channel_agnostic'"),
    ]
    for name, build in paths.items():
        for kw, message in cases:
            with pytest.raises(ConfigError) as e:
                build(**kw)
            assert message in str(e.value) and "\n" not in str(e.value), (name, kw, str(e.value))
    for name in ("mae_config", "load_openphenom"):
        with pytest.raises(ConfigError, match=r"model: unknown MAE option\(s\) \['decoder_headz'\]"):
            paths[name](decoder_headz=4)
    with pytest.raises(ConfigError, match="cross_attn_heads 3: must divide decoder_width 16"):
        openphenom.load_openphenom(sd, decoder_heads=2, cross_attn_heads=3)
    assert mae_config("CA-mu/8", fourier="masked").fourier == "masked"
