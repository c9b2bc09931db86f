"""Weight import/export: round trips (bit-exact), parity with PyTorch goldens, OpenPhenom layout, error messages.

Goldens: tests/goldens/interop_*.npz, written by tools/goldens/make_goldens_interop.py (timm 1.0.31 DINOv2
architectures; the OpenPhenom restatement of tools/goldens/make_goldens.py on timm 0.9.7). Weights in them are float16
values (exact in float32); fixed sin-cos tables are float32.
"""

from __future__ import annotations

import json
import pathlib
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tool_main
from flax import nnx
from safetensors.numpy import save_file

from vitally_jax.errors import WeightsError
from vitally_jax.interop import dinov2 as dino
from vitally_jax.interop import openphenom, readers, timm_vit
from vitally_jax.models.dinov2 import embed_channels_as_rgb, resample_grid
from vitally_jax.models.layers import sincos_2d
from vitally_jax.models.preprocess import self_standardize

GOLDENS = pathlib.Path(__file__).resolve().parent / "goldens"
ATOL = 1e-5


def _golden(name: str) -> dict:
    with np.load(GOLDENS / f"interop_{name}.npz") as z:
        return {k: z[k] for k in z.files}


def _state(g: dict) -> dict:
    return {k[3:]: g[k].astype(np.float32) for k in g if k.startswith("sd/")}


@pytest.fixture(scope="module")
def dinov2_inputs():
    g = _golden("dinov2_inputs")
    return {k: v.astype(np.float32) for k, v in g.items()}


@pytest.fixture(scope="module")
def op_golden():
    return _golden("openphenom")


@pytest.fixture(scope="module")
def op_mae(op_golden):
    # this golden's decoder: 2-head blocks and LayerNorm eps 1e-5 (not OpenPhenom's defaults), the unmasked loss
    return openphenom.load_openphenom(_state(op_golden), decoder_heads=2, decoder_eps=1e-5, fourier="reference")


def _save(path: pathlib.Path, state: dict) -> pathlib.Path:
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path))
    return path


def _assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert np.array_equal(a[k], b[k]), f"{k} differs"


def _perturbed_timm_vit(variant: str, seed: int) -> dict:
    """A timm-layout state dict of our tiny encoder with every trainable tensor random (incl. mlp_bias)."""
    from vitally_jax.interop.params import model_from_params, param_shapes
    from vitally_jax.models.vit import ViTEncoder, vit_config

    cfg = vit_config(variant, depth=2)
    ctor = lambda: ViTEncoder(cfg, rngs=nnx.Rngs(0))  # noqa: E731
    shapes = param_shapes(ctor)
    zeros = {k: np.zeros(v, np.float32) for k, v in shapes.items()}
    sd = timm_vit.timm_vit_state_dict(model_from_params(ctor, zeros, source="test"))
    rng = np.random.default_rng(seed)
    return {k: v if k == "pos_embed" else rng.normal(0, 0.5, v.shape).astype(np.float32) for k, v in sd.items()}


@nnx.jit(static_argnames=("method",))
def _run(model, x, noise=None, method="call"):
    """Jitted forward (eager calls would re-trace the block scan every time)."""
    if method == "mae":
        return model(x, noise=noise)
    return model(x)


# ------------------------------------------------------------------------------------------------------------------
# A. state dict -> ours -> state dict, bit-exact
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["mu/8", "CA-mu/8"])
def test_timm_vit_round_trip_both_bias_semantics(tmp_path, variant):
    sd = _perturbed_timm_vit(variant, seed=3)
    path = _save(tmp_path / "vit.safetensors", sd)
    legacy = timm_vit.load_timm_vit(path)  # default: legacy (timm <= 1.0.24)
    new = timm_vit.load_timm_vit(path, mlp_bias="new")
    _assert_same(timm_vit.timm_vit_state_dict(legacy), sd)
    _assert_same(timm_vit.timm_vit_state_dict(new, mlp_bias="new"), sd)
    assert legacy.cfg.channel_agnostic == variant.startswith("CA-")
    assert legacy.cfg.global_pool == ("avg" if variant.startswith("CA-") else "token")
    # each builds the matching parameterisation: one trainable mlp_bias per block, as timm's
    assert (legacy.cfg.bias, new.cfg.bias) == ("legacy", "new")
    np.testing.assert_array_equal(np.asarray(legacy.blocks.mlp_bias[...])[0], sd["blocks.0.mlp_bias"])
    # the flag is real: same keys, different effective biases (read into separate fc1/q/k/v biases)
    d = legacy.cfg.width
    free_legacy = timm_vit.load_timm_vit(path, bias="free")
    free_new = timm_vit.load_timm_vit(path, mlp_bias="new", bias="free")
    fc1_legacy = np.asarray(free_legacy.blocks.fc1_bias[...])[0]
    q_legacy = np.asarray(free_legacy.blocks.q_bias[...])[0]
    np.testing.assert_array_equal(fc1_legacy[: 3 * d], 0.0)
    np.testing.assert_array_equal(q_legacy, sd["blocks.0.mlp_bias"][d : 2 * d])
    np.testing.assert_array_equal(np.asarray(free_new.blocks.fc1_bias[...])[0], sd["blocks.0.mlp_bias"])
    np.testing.assert_array_equal(np.asarray(free_new.blocks.q_bias[...])[0], 0.0)
    # the free parameterisation of the same file exports back to it, in either semantics
    _assert_same(timm_vit.timm_vit_state_dict(free_legacy), sd)
    _assert_same(timm_vit.timm_vit_state_dict(free_new, mlp_bias="new"), sd)
    # a new-semantics model has an fc1 bias that legacy timm cannot hold
    with pytest.raises(WeightsError, match="legacy mlp_bias.*export with mlp_bias='new'"):
        timm_vit.timm_vit_state_dict(new, mlp_bias="legacy")
    # an encoder built for one semantics does not take a file of the other
    with pytest.raises(WeightsError, match=r"model.bias='new'.*this one has model.bias='legacy'"):
        timm_vit.load_encoder_weights(legacy, sd, mlp_bias="new")


def test_openphenom_round_trip_exact_layout(tmp_path, op_golden):
    sd = _state(op_golden)
    # cls, pos, patch conv, 13 per block, fc_norm (the real CA-S/16: 2 + 2 + 12 * 13 + 2 = 162 keys)
    assert sum(k.startswith("encoder.vit_backbone.") for k in sd) == 2 + 2 + 2 * 13 + 2
    assert {
        "decoder.placeholder",
        "decoder.pos_embeddings",
        "encoder_decoder_proj.weight",
        "decoder_pred.bias",
        "decoder.modality_tokens.5",
        "decoder.decoders.5.0.mlp.fc2.weight",
        "encoder.vit_backbone.fc_norm.weight",
        "decoder.cross_attention.kv.weight",
        "decoder.context_norm.bias",
    } <= set(sd)
    mae = openphenom.load_openphenom(_save(tmp_path / "op.safetensors", sd), decoder_heads=2, decoder_eps=1e-5)
    assert (mae.cfg.decoder_channels, mae.cfg.cross_attn_heads, mae.cfg.decoder_eps) == (6, 8, 1e-5)
    assert mae.cfg.encoder.max_in_chans == 11
    _assert_same(openphenom.openphenom_state_dict(mae, fixed=openphenom.fixed_tables(sd)), sd)
    _assert_same(openphenom.openphenom_state_dict(mae), sd)  # recomputed tables equal torch's here
    out = openphenom.export_openphenom(tmp_path / "again.safetensors", mae)
    _assert_same(readers.read_state_dict(out), sd)


@pytest.mark.parametrize("name", ["mlp", "swiglu", "reg4"])
def test_dinov2_round_trip_timm_and_meta(tmp_path, name):
    sd = _state(_golden(f"dinov2_{name}"))
    model = dino.load_dinov2(_save(tmp_path / "d.safetensors", sd), num_heads=2)
    assert model.cfg.mlp == ("swiglu" if name == "swiglu" else "mlp")
    _assert_same(dino.dinov2_state_dict(model), sd)
    if name == "reg4":  # timm's register layout has no CLS slot in pos_embed: Meta's layout cannot hold it
        with pytest.raises(WeightsError, match="layout='timm'"):
            dino.dinov2_state_dict(model, layout="meta")
        return
    meta = {
        k.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.") if name == "swiglu" else k: v
        for k, v in sd.items()
    }
    meta["mask_token"] = np.random.default_rng(1).normal(size=(1, sd["cls_token"].shape[-1])).astype(np.float32)
    m2 = dino.load_dinov2(meta, num_heads=2)  # layout detected from mask_token / w12
    _assert_same(dino.dinov2_state_dict(m2, layout="meta"), meta)
    _assert_same(dino.dinov2_state_dict(m2), sd)  # timm layout drops the mask token


def test_prenorm_vit_without_layerscale_loads_as_dinov2_kind(tmp_path):
    """timm pre-norm ViTs with learned positions and no LayerScale (e.g. ImageNet-MAE ViT-L/16) use the same loader."""
    sd = {k: v for k, v in _state(_golden("dinov2_mlp")).items() if ".ls" not in k}
    model = dino.load_dinov2(sd, num_heads=2)
    assert model.cfg.init_values is None
    _assert_same(dino.dinov2_state_dict(model), sd)


# ------------------------------------------------------------------------------------------------------------------
# B. parity with PyTorch (timm DINOv2 architectures), atol 1e-5
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,inputs", [("mlp", ("native", "up", "down")), ("swiglu", ("native",)), ("reg4", ("native", "up"))]
)
def test_dinov2_matches_timm(name, inputs, dinov2_inputs):
    g = _golden(f"dinov2_{name}")
    model = dino.load_dinov2(_state(g), num_heads=int(g["meta/num_heads"]))
    regs = model.cfg.reg_tokens
    for key in inputs:  # 3x3 training grid; 'up' / 'down': position table resampled to 4x5 / 2x3
        ref_tokens = g[f"out/{key}/tokens"]  # (nb, B, T, D) timm block outputs
        out = _run(model, jnp.asarray(dinov2_inputs[key]))
        np.testing.assert_allclose(np.asarray(out["tokens"]), ref_tokens[-1], atol=ATOL)
        blocks = {k: np.asarray(v) for k, v in out["blocks"].items()}
        np.testing.assert_allclose(blocks["cls"], ref_tokens[:, :, 0].transpose(1, 0, 2), atol=ATOL)
        np.testing.assert_allclose(blocks["mean"], ref_tokens[:, :, 1 + regs :].mean(2).transpose(1, 0, 2), atol=ATOL)
        feats = np.asarray(model.norm(out["tokens"]))  # = timm forward_features
        np.testing.assert_allclose(feats, g[f"out/{key}/features"], atol=ATOL)
        np.testing.assert_allclose(blocks["cls_norm"][:, -1], g[f"out/{key}/features"][:, 0], atol=ATOL)


def test_pos_embed_resampling_matches_timm():
    g = _golden("dinov2_mlp")
    pos = jnp.asarray(g["sd/pos_embed"].astype(np.float32))[0]
    keys = [k for k in g if k.startswith("resample/")]
    assert len(keys) == 6
    for k in keys:
        _, size, mode = k.split("/")
        h, w = map(int, size.split("x"))
        ours = np.asarray(resample_grid(pos[1:], (3, 3), (h, w), antialias=mode == "aa"))
        np.testing.assert_allclose(ours, g[k][0, 1:], atol=1e-5)  # two float32 resamplers: ~1e-6 each (|x| < 2)
    # the two PyTorch modes really differ, so each golden pins its own filter
    assert np.abs(g["resample/5x4/aa"] - g["resample/5x4/plain"]).max() > 1e-3


def test_channels_as_rgb_strategy(dinov2_inputs):
    model = dino.load_dinov2(_state(_golden("dinov2_mlp")), num_heads=2)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 42, 42, 5)).astype(np.float32))
    rgb = nnx.jit(embed_channels_as_rgb)
    feats = rgb(model, x)
    d = model.cfg.width
    assert feats["cls_norm"].shape == (2, 2, 5 * d)
    one = _run(model, jnp.repeat(x[..., 3:4], 3, axis=-1))["blocks"]["cls_norm"]
    np.testing.assert_allclose(np.asarray(feats["cls_norm"][..., 3 * d : 4 * d]), np.asarray(one), atol=1e-5)
    perm = [4, 2, 0, 1, 3]
    swapped = rgb(model, x[..., perm])["mean"].reshape(2, 2, 5, d)
    np.testing.assert_allclose(
        np.asarray(swapped), np.asarray(feats["mean"]).reshape(2, 2, 5, d)[:, :, perm], atol=1e-5
    )  # the channels sit in other rows of the batch: a few ulps of |x| ~ 2


# ------------------------------------------------------------------------------------------------------------------
# C. OpenPhenom-shaped checkpoint: embeddings (6 and 3 channels), CLS, masked latent, reconstruction, losses
# ------------------------------------------------------------------------------------------------------------------


def test_openphenom_outputs_match_reference(op_golden, op_mae):
    g = op_golden
    x = self_standardize(jnp.asarray(g["pixels"]))
    for name, xc in (("six", x), ("three", x[..., :3])):
        out = _run(op_mae.encoder, xc)
        for k in ("cls", "cls_norm", "mean", "mean_norm"):
            np.testing.assert_allclose(np.asarray(out["blocks"][k]), g[f"embed/{name}/{k}"], atol=ATOL)
        np.testing.assert_allclose(np.asarray(out["tokens"]), g[f"embed/{name}/tokens"], atol=ATOL)
    res = _run(op_mae, x, jnp.asarray(g["noise"]), method="mae")
    np.testing.assert_array_equal(np.asarray(res["mask"]), g["masked/mask"])
    np.testing.assert_allclose(np.asarray(res["latent"]), g["masked/latent"], atol=ATOL)
    np.testing.assert_allclose(np.asarray(res["pred"]), g["masked/pred"], atol=ATOL)
    np.testing.assert_allclose(float(res["loss_rec"]), g["masked/loss_rec"], atol=5e-6)
    np.testing.assert_allclose(float(res["loss_fourier"]), g["masked/loss_fourier_reference"], atol=5e-6)
    np.testing.assert_allclose(float(res["loss"]), g["masked/loss_reference"], atol=5e-6)
    from vitally_jax.models.layers import random_masking

    np.testing.assert_array_equal(np.asarray(random_masking(jnp.asarray(g["noise"]), 0.75)[2]), g["masked/ids_restore"])


def test_openphenom_encoder_only_and_cli_to_orbax(tmp_path, op_golden, capsys):
    convert_weights = types.SimpleNamespace(main=tool_main("convert_weights"))

    from vitally_jax.checkpoint import load_encoder

    src = _save(tmp_path / "openphenom.safetensors", _state(op_golden))
    rc = convert_weights.main(
        [str(src), "--layout", "openphenom", "--to", "orbax", str(tmp_path / "enc"), "--num-blocks", "1"]
    )
    assert rc == 0, capsys.readouterr().err
    encoder, cfg, _ = load_encoder(tmp_path / "enc")
    assert (cfg.depth, cfg.channel_agnostic, cfg.global_pool) == (1, True, "avg")
    x = self_standardize(jnp.asarray(op_golden["pixels"]))
    mean = np.asarray(_run(encoder, x)["blocks"]["mean"])
    np.testing.assert_allclose(mean[:, 0], op_golden["embed/six/mean"][:, 0], atol=ATOL)
    # back to timm safetensors for PyTorch users: the metadata says how to build the timm model
    rc = convert_weights.main(
        [str(tmp_path / "enc"), "--layout", "export", "--to", "safetensors", str(tmp_path / "enc.safetensors")]
    )
    assert rc == 0
    meta = json.loads(readers.read_safetensors_metadata(tmp_path / "enc.safetensors")["vitally_jax"])
    assert meta["timm_kwargs"]["block_fn"] == "ParallelScalingBlock" and meta["timm_kwargs"]["depth"] == 1
    back = readers.read_state_dict(tmp_path / "enc.safetensors")
    full = _state(op_golden)
    for k, v in back.items():
        np.testing.assert_array_equal(v, full["encoder.vit_backbone." + k])


# ------------------------------------------------------------------------------------------------------------------
# D. error messages: one line, naming the keys
# ------------------------------------------------------------------------------------------------------------------


def _one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(WeightsError) as e:
        fn(*args, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_dinov2_missing_extra_wrong_shape_keys(tmp_path):
    sd = _state(_golden("dinov2_mlp"))
    bad = dict(sd)
    del bad["blocks.1.attn.proj.bias"]
    bad["blocks.0.attn.extra_thing"] = np.zeros(3, np.float32)
    bad["norm.weight"] = np.zeros(7, np.float32)
    msg = _one_line_error(dino.load_dinov2, _save(tmp_path / "bad.safetensors", bad), num_heads=2)
    assert "bad.safetensors" in msg
    assert "1 missing key(s): blocks.1.attn.proj.bias" in msg
    assert "1 unexpected key(s): blocks.0.attn.extra_thing" in msg
    assert "norm.weight (7,) != (16,)" in msg
    many = {k: v for k, v in sd.items() if not k.startswith("blocks.1.")}
    many["blocks.1.norm1.weight"] = sd["blocks.1.norm1.weight"]  # keep depth 2
    msg = _one_line_error(dino.load_dinov2, many, num_heads=2)
    assert "13 missing key(s)" in msg and "... (+7 more)" in msg


def test_timm_and_openphenom_key_errors(tmp_path, op_golden):
    sd = _perturbed_timm_vit("mu/8", seed=1)
    bad = dict(sd)
    del bad["blocks.1.ls.gamma"]
    bad["blocks.0.unexpected.weight"] = np.zeros(2, np.float32)
    bad["blocks.0.in_proj.weight"] = sd["blocks.0.in_proj.weight"][:-1]
    msg = _one_line_error(timm_vit.load_timm_vit, _save(tmp_path / "vit.safetensors", bad))
    assert "vit.safetensors" in msg and "blocks.1.ls.gamma" in msg and "blocks.0.unexpected.weight" in msg
    assert "blocks.0.in_proj.weight (447, 64)" in msg
    op = _state(op_golden)
    for c in range(6):
        del op[f"decoder.decoders.{c}.0.norm2.bias"]
    del op["decoder.mlp.fc1.bias"]
    op["encoder.vit_backbone.pos_embed"] = op["encoder.vit_backbone.pos_embed"] + 0.1
    msg = _one_line_error(openphenom.load_openphenom, op, decoder_heads=2)
    assert "decoder.decoders.0.0.norm2.bias" in msg and "(7 in all)" in msg
    assert "pos_embed (not the fixed 2-D sin-cos table)" in msg
    with pytest.raises(WeightsError, match="not a CA-S/16 encoder: width 32"):
        timm_vit.load_timm_vit(_state(op_golden), prefix="encoder.vit_backbone.", variant="CA-S/16")


def test_readers(tmp_path, monkeypatch):
    assert "not found" in _one_line_error(readers.read_state_dict, tmp_path / "none.safetensors")
    (tmp_path / "w.onnx").write_bytes(b"x")
    assert "unknown weight file type '.onnx'" in _one_line_error(readers.read_state_dict, tmp_path / "w.onnx")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    assert "not a readable safetensors file" in _one_line_error(readers.read_state_dict, tmp_path / "junk.safetensors")
    (tmp_path / "model.pth").write_bytes(b"not a pickle")
    monkeypatch.setitem(sys.modules, "torch", None)  # as on a machine without torch
    msg = _one_line_error(readers.read_state_dict, tmp_path / "model.pth")
    assert "model.pth: not a readable PyTorch checkpoint" in msg  # torch files: tests/test_weight_reader.py
    # bfloat16 tensors (common in released checkpoints) are widened to float32; DDP 'module.' prefixes removed
    import jax
    from safetensors.flax import save_file as save_flax

    w = jnp.asarray([[1.5, -2.25], [0.0078125, 3.0]], jnp.bfloat16)
    save_flax({"module.a": w, "module.b": jnp.arange(3, dtype=jnp.float32)}, str(tmp_path / "bf.safetensors"))
    sd = readers.read_state_dict(tmp_path / "bf.safetensors")
    assert sorted(sd) == ["a", "b"] and sd["a"].dtype == np.float32
    np.testing.assert_array_equal(sd["a"], np.asarray(jax.device_get(w), np.float32))
    # CLI: one line on stderr and the weights exit code
    convert_weights = types.SimpleNamespace(main=tool_main("convert_weights"))

    bad = _perturbed_timm_vit("mu/8", seed=2)
    del bad["norm.weight"]
    rc = convert_weights.main(
        [
            str(_save(tmp_path / "v.safetensors", bad)),
            "--layout",
            "timm-vit",
            "--to",
            "safetensors",
            str(tmp_path / "o.safetensors"),
        ]
    )
    assert rc == 6 and not (tmp_path / "o.safetensors").exists()


def test_sincos_tables_in_exports_are_the_fixed_ones():
    sd = _perturbed_timm_vit("CA-mu/8", seed=0)
    np.testing.assert_array_equal(sd["pos_embed"][0], sincos_2d(4, 4, 64, cls_row=True, repeat=11))


def test_dinov2_paper_sizes_without_allocation():
    """S/14, L/14, g/14 (SwiGLU) parameter counts from the architecture, via eval_shape (nothing allocated)."""
    from vitally_jax.interop.params import param_shapes
    from vitally_jax.models.dinov2 import Dinov2, dinov2_config

    def expected(d, depth, fc1, hidden, grid=37, p=14):
        block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * fc1 + fc1) + (hidden * d + d) + 2 * d
        return p * p * 3 * d + d + d + (1 + grid * grid) * d + depth * block + 2 * d

    for variant, args in {
        "S/14": (384, 12, 1536, 1536),
        "L/14": (1024, 24, 4096, 4096),
        "g/14": (1536, 40, 8192, 4096),
    }.items():
        cfg = dinov2_config(variant)
        shapes = param_shapes(lambda: Dinov2(cfg, rngs=nnx.Rngs(0)))
        assert sum(int(np.prod(s)) for s in shapes.values()) == expected(*args), variant
    assert expected(1536, 40, 8192, 4096) == 1_136_479_232  # the published ViT-g/14 size (1.1B)
