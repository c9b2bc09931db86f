"""OpenPhenom / maes_microscopy MAE checkpoints <-> our `MAE` (and its `ViTEncoder`).

Key layout of Recursion's checkpoint (channel-agnostic CA-MAE-S/16):

- `encoder.vit_backbone.*`: timm ViT with ParallelScalingBlock, 1-channel patch conv, `fc_norm` (global_pool
  'avg'; the timm `norm` is the identity, so the masked latent is not normed), `pos_embed` = fixed sin-cos table
  for `max_in_chans` (11) channel grids.
- `encoder_decoder_proj.{weight,bias}`: encoder width -> decoder width.
- `decoder.*`: `mask_token`, `placeholder` (constant zeros added to the decoder CLS token; no effect on any
  output), `modality_tokens.{c}` (1, 1, Dd) per decoder channel, `pos_embeddings` (fixed sin-cos),
  `cross_attention.{q,kv,proj}`, `mlp.{fc1,fc2}`, `query_norm`, `context_norm`, `out_norm` (LayerNorm eps 1e-5 in
  the OpenPhenom build), `decoders.{c}.{i}.*` (timm Blocks, one stack per channel).
- `decoder_pred.{weight,bias}`: decoder width -> p*p pixels of one channel.

A standard (non channel-agnostic) MAE in the same code base has `decoder.blocks.{i}.*` and `decoder.norm`.
The mapping into our parameters is `vitally_jax.models.convert`; this module adds reading files, inferring the
geometry from the shapes, building the model without random init, and the export back to this layout.
"""
from __future__ import annotations

import re
from typing import Mapping

import numpy as np
from flax import nnx

from vitally_jax.errors import ConfigError, WeightsError
from vitally_jax.interop.params import _flatten, flat_params, model_from_params
from vitally_jax.interop.readers import StateDict
from vitally_jax.interop.timm_vit import _source_state, config_from_timm_state, load_timm_vit, timm_vit_state_dict
from vitally_jax.models import convert
from vitally_jax.models.layers import sincos_2d
from vitally_jax.models.mae import MAE, MAEConfig
from vitally_jax.models.vit import ViTConfig, ViTEncoder

ENC = convert.OPENPHENOM_ENCODER
DEC = convert.OPENPHENOM_DECODER
PROJ = convert.OPENPHENOM_PROJ
PRED = convert.OPENPHENOM_PRED
OPENPHENOM_DECODER_HEADS = 16
OPENPHENOM_DECODER_EPS = 1e-5


def openphenom_config(state: Mapping[str, np.ndarray], *, source: str = "state dict",
                      decoder_heads: int = OPENPHENOM_DECODER_HEADS, decoder_eps: float = OPENPHENOM_DECODER_EPS,
                      cross_attn_heads: int = 8, **overrides) -> MAEConfig:
    """Infer an `MAEConfig` from an OpenPhenom-layout state dict. Encoder fields in `overrides` go to the
    encoder; the decoder head counts cannot be read from shapes (OpenPhenom: 16 block heads, 8 cross-attention
    heads)."""
    enc_fields = set(ViTConfig.__dataclass_fields__)
    enc = config_from_timm_state(state, prefix=ENC, source=source,
                                 **{k: v for k, v in overrides.items() if k in enc_fields})
    mae_over = {k: v for k, v in overrides.items() if k not in enc_fields}
    try:
        dd, de = state[PROJ + "weight"].shape
        mlp = state[DEC + "mlp.fc1.weight"].shape[0] if DEC + "mlp.fc1.weight" in state else None
    except KeyError as e:
        raise WeightsError(f"{source}: not an OpenPhenom MAE state dict (missing {e})") from None
    ca = any(k.startswith(DEC + "modality_tokens.") for k in state)
    if ca:
        nc = 1 + max(int(m.group(1)) for k in state if (m := re.match(re.escape(DEC) + r"modality_tokens\.(\d+)$", k)))
        pat = re.escape(DEC) + r"decoders\.0\.(\d+)\."
        depth = 1 + max((int(m.group(1)) for k in state if (m := re.match(pat, k))), default=-1)
        kw = dict(decoder="channel_agnostic", decoder_channels=nc, cross_attn_heads=cross_attn_heads,
                  decoder_eps=decoder_eps)
    else:
        depth = 1 + max((int(m.group(1)) for k in state if (m := re.match(re.escape(DEC) + r"blocks\.(\d+)\.", k))),
                        default=-1)
        mlp = state.get(DEC + "blocks.0.mlp.fc1.weight", np.zeros((4 * dd, 0))).shape[0]
        kw = dict(decoder="standard", decoder_eps=overrides.get("decoder_eps", 1e-6))
    if depth < 1 or mlp is None:
        raise WeightsError(f"{source}: no decoder blocks found under {DEC!r}")
    kw.update(decoder_width=dd, decoder_depth=depth, decoder_heads=decoder_heads,
              decoder_mlp_ratio=(mlp or 4 * dd) / dd)
    kw.update(mae_over)
    try:
        return MAEConfig(encoder=enc, **kw)
    except TypeError as e:
        raise ConfigError(f"OpenPhenom model: {e}") from None


def load_openphenom(source, *, mlp_bias: str = "legacy", **overrides) -> MAE:
    """Load a full OpenPhenom-layout MAE (path or state dict) into our `MAE` (encoder + decoder).

    mlp_bias: 'legacy' (Recursion's timm 0.9.7, default) | 'new'. overrides: encoder or MAE config fields
    (decoder_heads, cross_attn_heads, fourier, mask_ratio, dtype, ...).
    """
    name, state = _source_state(source, "")
    cfg = openphenom_config(state, source=name, **overrides)
    nested = convert.mae_params_from_openphenom(state, cfg, mlp_bias=mlp_bias, source=name)
    return model_from_params(lambda: MAE(cfg, rngs=nnx.Rngs(0)), _flatten(nested), source=name)


def load_openphenom_encoder(source, *, mlp_bias: str = "legacy", **overrides) -> ViTEncoder:
    """Only the encoder of an OpenPhenom checkpoint (`encoder.vit_backbone.*`; decoder keys are ignored)."""
    return load_timm_vit(source, mlp_bias=mlp_bias, prefix=ENC, **overrides)


def openphenom_state_dict(mae: MAE, *, mlp_bias: str = "legacy",
                          fixed: Mapping[str, np.ndarray] | None = None) -> StateDict:
    """Our `MAE` -> a state dict in the OpenPhenom layout (float32 numpy, PyTorch shapes).

    The fixed tables (`encoder.vit_backbone.pos_embed`, `decoder.pos_embeddings`) are recomputed and
    `decoder.placeholder` is zeros, unless `fixed` supplies them (e.g. the arrays of the file a model was loaded
    from, so that a load/export round trip reproduces the file bit for bit); supplied tables must equal the
    recomputed ones within 1e-5.
    """
    cfg = mae.cfg
    enc = cfg.encoder
    p = {k: np.asarray(v, np.float32) for k, v in flat_params(mae).items()}
    out = timm_vit_state_dict(mae.encoder, mlp_bias=mlp_bias, prefix=ENC)
    t = lambda a: np.ascontiguousarray(a.T)  # noqa: E731

    def lin(ours: str, theirs: str, i: int | None = None, bias: bool = True):
        k = p[ours + ".kernel"] if i is None else p[ours + ".kernel"][i]
        out[theirs + ".weight"] = t(k)
        if bias:
            out[theirs + ".bias"] = p[ours + ".bias"] if i is None else p[ours + ".bias"][i]

    def norm(ours: str, theirs: str, i: int | None = None):
        out[theirs + ".weight"] = p[ours + ".scale"] if i is None else p[ours + ".scale"][i]
        out[theirs + ".bias"] = p[ours + ".bias"] if i is None else p[ours + ".bias"][i]

    def block(j: int, theirs: str):
        b = "decoder_blocks."
        norm(b + "norm1", theirs + ".norm1", j)
        lin(b + "qkv", theirs + ".attn.qkv", j)
        lin(b + "proj", theirs + ".attn.proj", j)
        norm(b + "norm2", theirs + ".norm2", j)
        lin(b + "fc1", theirs + ".mlp.fc1", j)
        lin(b + "fc2", theirs + ".mlp.fc2", j)

    lin("decoder_embed", PROJ[:-1])
    lin("decoder_pred", PRED[:-1])
    out[DEC + "mask_token"] = p["mask_token"]
    dd, g = cfg.decoder_width, enc.grid
    if cfg.decoder == "channel_agnostic":
        nc = cfg.decoder_channels
        for c in range(nc):
            out[f"{DEC}modality_tokens.{c}"] = p["modality_tokens"][c][None, None]
        for n in ("query_norm", "context_norm", "out_norm"):
            norm(n, DEC + n)
        lin("cross_attn.q", DEC + "cross_attention.q", bias=False)
        lin("cross_attn.kv", DEC + "cross_attention.kv", bias=False)
        lin("cross_attn.proj", DEC + "cross_attention.proj")
        lin("decoder_mlp.fc1", DEC + "mlp.fc1")
        lin("decoder_mlp.fc2", DEC + "mlp.fc2")
        for c in range(nc):
            for i in range(cfg.decoder_depth):
                block(c * cfg.decoder_depth + i, f"{DEC}decoders.{c}.{i}")
        out[DEC + "pos_embeddings"] = sincos_2d(g, g, dd, cls_row=True, repeat=nc)[None]
        out[DEC + "placeholder"] = np.zeros((1, 1, dd), np.float32)
    else:
        for i in range(cfg.decoder_depth):
            block(i, f"{DEC}blocks.{i}")
        norm("decoder_norm", DEC + "norm")
        out[DEC + "pos_embeddings"] = sincos_2d(g, g, dd, cls_row=True)[None]
    for key, arr in (fixed or {}).items():
        if key not in (ENC + "pos_embed", DEC + "pos_embeddings", DEC + "placeholder"):
            raise WeightsError(f"openphenom_state_dict: {key!r} is not a fixed table; only pos tables and the "
                               "placeholder can be supplied")
        if key in out and (np.shape(arr) != out[key].shape or not np.allclose(arr, out[key], atol=1e-5)):
            raise WeightsError(f"openphenom_state_dict: supplied {key} {np.shape(arr)} differs from the fixed table")
        out[key] = np.asarray(arr, np.float32)
    return out


FIXED_KEYS = (ENC + "pos_embed", DEC + "pos_embeddings", DEC + "placeholder")


def fixed_tables(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The non-trainable tables of an OpenPhenom state dict (to pass to `openphenom_state_dict(fixed=...)`)."""
    return {k: np.asarray(state[k]) for k in FIXED_KEYS if k in state}
