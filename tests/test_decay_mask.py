"""The optimiser's weight-decay mask: by parameter path, equal to the reference's PyTorch parameter groups.

Every leaf of the S/16 MAE and of the OpenPhenom-shaped CA-S/16 MAE is listed below with its decay flag. The
reference groups are `tests/goldens/decay_groups.json`, written by `tools/goldens/make_goldens_decay.py` with real
torch + timm 0.9.7 (`create_optimizer_v2` param groups: timm's `no_weight_decay()` names plus the 1-D rule) at tiny
size; our leaves are mapped to the torch names through the OpenPhenom export key mapping. This test never imports
torch.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vitally_jax import config_lib, optim
from vitally_jax.interop.openphenom import FIXED_KEYS, openphenom_state_dict
from vitally_jax.interop.params import model_from_params, param_shapes
from vitally_jax.models.mae import MAE, mae_config

GOLDEN = pathlib.Path(__file__).resolve().parent / "goldens" / "decay_groups.json"

# every leaf of the S/16 MAE (standard decoder), dotted NNX paths; True = weight decay
ENCODER = {
    "encoder.patch_embed.kernel": True,
    "encoder.patch_embed.bias": False,
    "encoder.cls_token": False,
    "encoder.blocks.in_norm.scale": False,
    "encoder.blocks.in_norm.bias": False,
    "encoder.blocks.in_proj": True,
    "encoder.blocks.mlp_bias": False,
    "encoder.blocks.q_norm.scale": False,
    "encoder.blocks.q_norm.bias": False,
    "encoder.blocks.k_norm.scale": False,
    "encoder.blocks.k_norm.bias": False,
    "encoder.blocks.attn_out.kernel": True,
    "encoder.blocks.attn_out.bias": False,
    "encoder.blocks.mlp_out.kernel": True,
    "encoder.blocks.mlp_out.bias": False,
    "encoder.blocks.gamma": False,
    "encoder.norm.scale": False,
    "encoder.norm.bias": False,
}
DECODER_BLOCKS = {
    "decoder_blocks.norm1.scale": False,
    "decoder_blocks.norm1.bias": False,
    "decoder_blocks.qkv.kernel": True,
    "decoder_blocks.qkv.bias": False,
    "decoder_blocks.proj.kernel": True,
    "decoder_blocks.proj.bias": False,
    "decoder_blocks.norm2.scale": False,
    "decoder_blocks.norm2.bias": False,
    "decoder_blocks.fc1.kernel": True,
    "decoder_blocks.fc1.bias": False,
    "decoder_blocks.fc2.kernel": True,
    "decoder_blocks.fc2.bias": False,
}
COMMON = {
    "decoder_embed.kernel": True,
    "decoder_embed.bias": False,
    "mask_token": False,
    "decoder_pred.kernel": True,
    "decoder_pred.bias": False,
}
S16_MAE = {**ENCODER, **DECODER_BLOCKS, **COMMON, "decoder_norm.scale": False, "decoder_norm.bias": False}
# the channel-agnostic (OpenPhenom) decoder: channel embeddings, shared cross-attention + MLP, no final norm
CA_S16_MAE = {
    **ENCODER,
    **DECODER_BLOCKS,
    **COMMON,
    "modality_tokens": False,
    "query_norm.scale": False,
    "query_norm.bias": False,
    "context_norm.scale": False,
    "context_norm.bias": False,
    "out_norm.scale": False,
    "out_norm.bias": False,
    "cross_attn.q.kernel": True,
    "cross_attn.kv.kernel": True,
    "cross_attn.proj.kernel": True,
    "cross_attn.proj.bias": False,
    "decoder_mlp.fc1.kernel": True,
    "decoder_mlp.fc1.bias": False,
    "decoder_mlp.fc2.kernel": True,
    "decoder_mlp.fc2.bias": False,
}


def mask_flags(cfg) -> dict[str, bool]:
    """`optim.decay_mask` on the model's Param state (the tree nnx.Optimizer hands to optax), by dotted path."""
    state = nnx.state(nnx.eval_shape(lambda: MAE(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    out = {}
    for path, flag in jax.tree_util.tree_leaves_with_path(optim.decay_mask(state)):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        out[".".join(n for n in names if n != "value")] = bool(flag)
    return out


def tiny_config(golden: dict):
    """Our MAE at the golden's torch geometry (tools/goldens/make_goldens.py GEOM keys)."""
    g, ca = golden["geom"], golden["channel_agnostic"]
    return mae_config(
        "CA-mu/8" if ca else "mu/8",
        width=g["width"],
        depth=g["depth"],
        num_heads=g["heads"],
        mlp_dim=g["width"] * g["mlp_ratio"],
        patch_size=g["patch"],
        img_size=g["img"],
        in_chans=g["chans"],
        max_in_chans=g["ca_max_chans"] if ca else 11,
        decoder_width=g["dec_width"],
        decoder_depth=g["ca_dec_depth"] if ca else g["dec_depth"],
        decoder_heads=g["dec_heads"],
        cross_attn_heads=g["ca_cross_heads"],
        decoder_channels=g["chans"],
    )


def torch_name_owners(cfg) -> dict[str, str]:
    """torch state-dict key -> our dotted leaf, through the export key mapping: every scalar of the model gets a
    distinct integer value (exact in float32), the model is exported to the OpenPhenom layout, and the values in
    each exported tensor name the leaf they came from."""
    ctor = lambda: MAE(cfg, rngs=nnx.Rngs(0))  # noqa: E731
    shapes = param_shapes(ctor)
    flat, owner, start = {}, [""], 1
    for name, shape in shapes.items():
        n = int(np.prod(shape))
        flat[name] = np.arange(start, start + n, dtype=np.float32).reshape(shape)
        owner += [name] * n
        start += n
    assert start < 2**24  # every id exact in float32
    state = openphenom_state_dict(model_from_params(ctor, flat, source="ids"))
    out = {}
    for key, arr in state.items():
        if key in FIXED_KEYS:
            continue
        ids = np.unique(arr.astype(np.int64))
        assert ids.min() >= 1, key  # nothing exported is a constant the model does not hold
        leaves = {owner[i] for i in ids}
        assert len(leaves) == 1, (key, leaves)
        out[key] = leaves.pop()
    return out


@pytest.mark.parametrize("variant, table", [("S/16", S16_MAE), ("CA-S/16", CA_S16_MAE)])
def test_every_leaf_of_the_paper_models_has_the_listed_flag(variant, table):
    flags = mask_flags(mae_config(variant))
    assert flags == table
    # per-block vectors are stacked along the layer axis: rank would decay them; the path does not
    state = nnx.state(nnx.eval_shape(lambda: MAE(mae_config(variant), rngs=nnx.Rngs(0))), nnx.Param)
    assert state["encoder"]["blocks"]["gamma"].shape == (12, 384)
    assert state["mask_token"].ndim == 3 and state["encoder"]["cls_token"].ndim == 3


@pytest.mark.parametrize("bias, names", [("new", ["mlp_bias"]), ("free", ["fc1_bias", "q_bias", "k_bias", "v_bias"])])
def test_other_bias_parameterisations_are_not_decayed(bias, names):
    flags = mask_flags(mae_config("S/16", bias=bias))
    want = {k: v for k, v in S16_MAE.items() if k != "encoder.blocks.mlp_bias"}
    want.update({f"encoder.blocks.{n}": False for n in names})
    assert flags == want


@pytest.mark.parametrize("model, variant", [("mae", "S/16"), ("ca_mae", "CA-S/16")])
def test_flags_equal_the_pytorch_param_groups(model, variant):
    doc = json.loads(GOLDEN.read_text())
    golden = doc[model]
    assert doc["timm"].startswith("0.9.")
    cfg = tiny_config(golden)
    ours = mask_flags(cfg)
    # the tiny model has exactly the leaves of the paper-size one (block counts live on the stacked axis)
    assert ours == mask_flags(mae_config(variant))
    owners = torch_name_owners(cfg)
    want = golden["decay"]
    assert sorted(owners) == sorted(want)  # every trainable torch parameter comes from one of our leaves
    assert set(owners.values()) == set(ours)  # and every leaf of ours is exported
    wrong = {k: (owners[k], ours[owners[k]], want[k]) for k in want if ours[owners[k]] != want[k]}
    assert not wrong
    assert 0 < sum(want.values()) < len(want)  # both groups are populated


def test_the_optimiser_decays_exactly_the_masked_leaves():
    """A Lion step with zero gradients through nnx.Optimizer: decayed leaves shrink by (1 - lr * wd), every other
    leaf (biases, norms, LayerScale, tokens) is left bit for bit."""
    c = config_lib.load("tiny")
    cfg = mae_config("CA-mu/8", img_size=32)
    # every parameter random (no initialiser compiles), so that a decay of zeros or ones cannot hide
    ctor = lambda: MAE(cfg, rngs=nnx.Rngs(0))  # noqa: E731
    rng = np.random.default_rng(0)
    flat = {k: rng.normal(0, 0.5, shape).astype(np.float32) for k, shape in param_shapes(ctor).items()}
    model = model_from_params(ctor, flat, source="random")
    tx, sched = optim.make_optimizer(c.optax, total_steps=c.total_steps)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    before = {k: np.asarray(v) for k, v in _flat(nnx.state(model, nnx.Param)).items()}

    @nnx.jit
    def step(opt, model):
        opt.update(model, jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param)))

    step(opt, model)
    after = {k: np.asarray(v) for k, v in _flat(nnx.state(model, nnx.Param)).items()}
    factor = 1.0 - float(sched["lr"](0)) * c.optax.weight_decay
    flags = mask_flags(cfg)
    assert c.optax.weight_decay > 0 and set(flags) == set(before)
    for k, decayed in flags.items():
        if decayed:
            # p - lr * wd * p in float32: within 2 ulps of p * factor
            np.testing.assert_allclose(after[k], before[k] * factor, rtol=3e-7, err_msg=k)
            assert np.abs(after[k] - before[k]).max() > 0, k
        else:
            np.testing.assert_array_equal(after[k], before[k], err_msg=k)


def _flat(state) -> dict:
    return {k: v for k, v in _flatten(nnx.to_pure_dict(state)).items()}


def _flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_decay_1d_option_decays_everything():
    c = config_lib.load("tiny")
    c.optax.decay_1d = True
    tx, _ = optim.make_optimizer(c.optax, total_steps=c.total_steps)
    p = {"layer": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}}
    u, _ = tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)
    assert float(u["layer"]["bias"][0]) < 0 and float(u["layer"]["kernel"][0, 0]) < 0
    c.optax.decay_1d = False
    tx, _ = optim.make_optimizer(c.optax, total_steps=c.total_steps)
    u, _ = tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)
    assert float(u["layer"]["bias"][0]) == 0.0 and float(u["layer"]["kernel"][0, 0]) < 0


def test_mask_is_by_path_not_rank():
    tree = {"blocks": {"gamma": jnp.ones((12, 8)), "in_proj": jnp.ones((8, 40))}, "head": {"kernel": jnp.ones((3,))}}
    m = optim.decay_mask(tree)
    assert m == {"blocks": {"gamma": False, "in_proj": True}, "head": {"kernel": True}}
