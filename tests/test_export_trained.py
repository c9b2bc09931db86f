"""A model trained with the default config exports to timm and OpenPhenom layouts and loads back with our
embeddings; a model trained with `model.bias='free'` is refused; the option is validated like every other.

Training is real: a few steps of `vitally_jax.train`'s jitted update with the default optimiser (the helpers live in
`tools/goldens/export_trained.py`, which also writes the files the PyTorch check loads). The PyTorch side of the check
(real timm 0.9.7 and the OpenPhenom torch restatement loading those files) is `tools/goldens/check_export_torch.py`;
its saved outputs are `tests/goldens/export_trained.npz`. This test never imports torch.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import runpy

import numpy as np
import pytest
from flax import nnx

from vitally_jax.errors import ConfigError, WeightsError
from vitally_jax.interop import export_openphenom, export_timm_vit, load_openphenom, load_timm_vit
from vitally_jax.interop.params import flat_params, model_from_params, param_shapes
from vitally_jax.models.mae import MAE, mae_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "goldens" / "export_trained.npz"
# float32 forward passes of the same weights with different summation orders (XLA vs PyTorch, or two separately
# compiled XLA programs): the outputs here are O(1..10), a few ulps each over <= 2 blocks; the spec's 1e-5
ATOL = 1e-5


@pytest.fixture(scope="module")
def tool():
    return runpy.run_path(str(ROOT / "tools" / "goldens" / "export_trained.py"))


@pytest.fixture(scope="module")
def trained(tool):
    return tool["train_few_steps"](tool["tiny_config"]("mu/8"))


def _assert_close(a: dict, b: dict, keys, what: str) -> None:
    for k in keys:
        np.testing.assert_allclose(a[k], b[k], atol=ATOL, rtol=0, err_msg=f"{what}: {k}")


def test_trained_default_model_exports_to_timm_and_openphenom_and_loads_back(tmp_path, tool, trained):
    mae = trained
    assert mae.cfg.encoder.bias == "legacy"  # the default: timm 0.9.7's one mlp_bias per block
    mb = np.asarray(mae.encoder.blocks.mlp_bias[...])
    assert np.abs(mb).max() > 1e-4 and np.mean(mb != 0) > 0.99  # the optimiser moved the biases off zero
    x, noise = tool["inputs"](mae.cfg, seed=5)
    ours = tool["our_outputs"](mae, x, noise)
    assert np.abs(ours["tokens"]).max() > 0.5

    enc = load_timm_vit(export_timm_vit(tmp_path / "vit.safetensors", mae.encoder))
    assert enc.cfg.bias == "legacy"
    want = {k: v for k, v in flat_params(mae.encoder).items()}
    got = flat_params(enc)
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)
    back = tool["our_outputs"](enc, x)
    _assert_close(back, ours, ("tokens", "cls", "cls_norm", "mean", "mean_norm"), "timm export")

    again = load_openphenom(
        export_openphenom(tmp_path / "op.safetensors", mae), decoder_heads=mae.cfg.decoder_heads, decoder_eps=1e-6
    )
    got = flat_params(again)
    want = flat_params(mae)
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)
    back = tool["our_outputs"](again, x, noise)
    _assert_close(back, ours, ("tokens", "mean", "cls_norm", "latent", "pred"), "OpenPhenom export")
    np.testing.assert_array_equal(back["mask"], ours["mask"])


def test_free_biases_once_trained_are_refused_with_the_option_to_train_with(tmp_path, tool):
    mae = tool["train_few_steps"](tool["tiny_config"]("mu/8", bias="free"), steps=2)
    assert np.abs(np.asarray(mae.encoder.blocks.q_bias[...])).max() > 0
    attempts = [
        lambda: export_timm_vit(tmp_path / "v.safetensors", mae.encoder),
        lambda: export_timm_vit(tmp_path / "v.safetensors", mae.encoder, mlp_bias="new"),
        lambda: export_openphenom(tmp_path / "o.safetensors", mae),
    ]
    for attempt in attempts:
        with pytest.raises(WeightsError) as e:
            attempt()
        msg = str(e.value)
        assert "\n" not in msg and "model.bias='free'" in msg
        assert "train with model.bias='legacy'" in msg and "'new'" in msg
    assert not list(tmp_path.iterdir())  # nothing written


def test_untrained_free_model_still_exports():
    """Zero biases fit either semantics: only trained q/k/v (or first 3*width fc1) biases cannot be held."""
    cfg = mae_config("mu/8", depth=2, bias="free")
    ctor = lambda: MAE(cfg, rngs=nnx.Rngs(0)).encoder  # noqa: E731
    rng = np.random.default_rng(0)
    flat = {
        k: (np.zeros(s, np.float32) if k.endswith("_bias") else rng.normal(0, 0.1, s).astype(np.float32))
        for k, s in param_shapes(ctor).items()
    }
    enc = model_from_params(ctor, flat, source="zeros")
    from vitally_jax.interop.timm_vit import timm_vit_state_dict

    sd = timm_vit_state_dict(enc)
    assert all(np.all(sd[f"blocks.{i}.mlp_bias"] == 0) for i in range(2))


@pytest.mark.parametrize("bad", ["both", "mlp_bias", None])
def test_bias_option_is_validated_like_other_model_options(bad):
    with pytest.raises(ConfigError) as e:
        mae_config("S/16", bias=bad)
    msg = str(e.value)
    assert "\n" not in msg and "model.bias" in msg and all(c in msg for c in ("'legacy'", "'new'", "'free'"))
    with pytest.raises(ConfigError, match="model.bias"):
        dataclasses.replace(mae_config("mu/8").encoder, bias=bad)


def test_bias_option_reaches_the_model_from_the_training_config():
    from vitally_jax import config_lib, train

    c = config_lib.load("tiny")
    assert c.model.bias == "legacy" and train.model_config(c).encoder.bias == "legacy"
    c.model.bias = "new"
    assert train.model_config(c).encoder.bias == "new"
    c.model.bias = "timm"
    with pytest.raises(ConfigError, match="model.bias: 'timm'"):
        train.model_config(c)


def test_torch_outputs_of_the_exported_files_equal_ours():
    """tests/goldens/export_trained.npz: the files exported from models trained 3 steps, loaded by real timm 0.9.7
    (bare ViT) and the OpenPhenom restatement (whole CA-MAE), and their torch outputs. Our importers read the same
    state dicts and give the same numbers."""
    with np.load(GOLDEN) as z:
        g = {k: z[k] for k in z.files}
    meta = json.loads(str(g["meta"]))
    tool = runpy.run_path(str(ROOT / "tools" / "goldens" / "export_trained.py"))
    assert meta["timm"].startswith("0.9.") and meta["trained"]["steps"] >= 2
    for k, v in meta["timm_file"]["diffs"].items() | meta["openphenom_file"]["diffs"].items():
        assert v <= ATOL, k  # what the torch check measured when it wrote the golden

    sd = {k[len("timm/sd/") :]: v for k, v in g.items() if k.startswith("timm/sd/")}
    assert min(np.abs(sd[f"blocks.{i}.mlp_bias"]).max() for i in range(2)) > 1e-4  # trained biases
    enc = load_timm_vit(sd, mlp_bias=meta["timm_file"]["mlp_bias"])
    out = tool["our_outputs"](enc, g["timm/x"])
    np.testing.assert_allclose(out["tokens"], g["timm/torch_tokens"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(out["cls_norm"][:, -1], g["timm/torch_embedding"], atol=ATOL, rtol=0)

    dec = meta["openphenom_file"]["decoder"]
    sd = {k[len("op/sd/") :]: v for k, v in g.items() if k.startswith("op/sd/")}
    mae = load_openphenom(
        sd,
        mlp_bias=meta["openphenom_file"]["mlp_bias"],
        decoder_heads=dec["heads"],
        cross_attn_heads=dec["cross_attn_heads"],
        decoder_eps=dec["eps"],
    )
    assert mae.cfg.decoder == "channel_agnostic" and mae.cfg.encoder.max_in_chans == 11
    out = tool["our_outputs"](mae, g["op/x"], g["op/noise"])
    for k in ("tokens", "mean", "mean_norm", "latent", "pred"):
        np.testing.assert_allclose(out[k], g[f"op/torch_{k}"], atol=ATOL, rtol=0, err_msg=k)
    np.testing.assert_array_equal(out["mask"], g["op/torch_mask"])
