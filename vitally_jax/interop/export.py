"""Our models -> safetensors files that PyTorch / timm users load directly.

- `export_timm_vit(path, encoder)`: a `ViTEncoder` as a timm `VisionTransformer` state dict (ParallelScalingBlock
  for our parallel blocks). The file's metadata holds `timm_kwargs`, the keyword arguments that build the
  matching timm model (`timm.models.vision_transformer.VisionTransformer(**kwargs, block_fn=...)`), and the
  `mlp_bias` semantics the weights are written for ('legacy': timm <= 1.0.24; 'new': timm >= 1.0.25).
  Channel-agnostic encoders use OpenPhenom's 1-channel patch conv and an `max_in_chans`-channel pos table,
  which plain timm cannot build; their metadata says so.
- `export_openphenom(path, mae)`: a whole channel-agnostic `MAE` in the OpenPhenom / maes_microscopy layout.
- `export_dinov2(path, model, layout)`: a `Dinov2` in timm's or Meta's layout.

Every file is written atomically (temporary name, then rename).
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Mapping

import numpy as np

from vitally_jax.interop.readers import write_safetensors
from vitally_jax.models.dinov2 import Dinov2
from vitally_jax.models.mae import MAE
from vitally_jax.models.vit import ViTConfig, ViTEncoder

FORMAT = "vitally_jax.interop/1"


def timm_kwargs(cfg: ViTConfig) -> dict:
    """Keyword arguments of timm's `VisionTransformer` that build the model matching `cfg` (block_fn by name)."""
    kw = dict(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=1 if cfg.channel_agnostic else cfg.in_chans,
              embed_dim=cfg.width, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_dim / cfg.width,
              num_classes=0, class_token=True, global_pool=cfg.global_pool, fc_norm=None,
              init_values=cfg.init_values)
    if cfg.block == "parallel":
        kw.update(block_fn="ParallelScalingBlock", qkv_bias=False, qk_norm=True)
    else:
        kw.update(block_fn="Block", qkv_bias=cfg.qkv_bias, qk_norm=cfg.qk_norm)
    return kw


def _meta(kind: str, **fields) -> dict[str, str]:
    from vitally_jax.checkpoint import versions

    doc = {"format": FORMAT, "kind": kind, "versions": versions()}
    doc.update(fields)
    return {"vitally_jax": json.dumps(doc, sort_keys=True)}


def export_timm_vit(path: str | os.PathLike, encoder: ViTEncoder, *, mlp_bias: str = "legacy",
                    prefix: str = "", overwrite: bool = False) -> pathlib.Path:
    """Write `encoder` as a timm ViT state dict (safetensors). WeightsError if the biases do not fit `mlp_bias`."""
    from vitally_jax.interop.timm_vit import timm_vit_state_dict

    cfg = encoder.cfg
    state = timm_vit_state_dict(encoder, mlp_bias=mlp_bias, prefix=prefix)
    meta = _meta("timm_vit", mlp_bias=mlp_bias, prefix=prefix, timm_kwargs=timm_kwargs(cfg),
                 channel_agnostic=cfg.channel_agnostic, max_in_chans=cfg.max_in_chans)
    return write_safetensors(path, state, meta, overwrite=overwrite)


def export_openphenom(path: str | os.PathLike, mae: MAE, *, mlp_bias: str = "legacy",
                      fixed: Mapping[str, np.ndarray] | None = None, overwrite: bool = False) -> pathlib.Path:
    """Write a whole `MAE` in the OpenPhenom layout (safetensors); see `openphenom_state_dict`."""
    from vitally_jax.interop.openphenom import openphenom_state_dict

    cfg = mae.cfg
    state = openphenom_state_dict(mae, mlp_bias=mlp_bias, fixed=fixed)
    meta = _meta("openphenom", mlp_bias=mlp_bias, timm_kwargs=timm_kwargs(cfg.encoder),
                 decoder=dict(width=cfg.decoder_width, depth=cfg.decoder_depth, heads=cfg.decoder_heads,
                              channels=cfg.decoder_channels, cross_attn_heads=cfg.cross_attn_heads,
                              eps=cfg.decoder_eps, kind=cfg.decoder))
    return write_safetensors(path, state, meta, overwrite=overwrite)


def export_dinov2(path: str | os.PathLike, model: Dinov2, *, layout: str = "timm",
                  overwrite: bool = False) -> pathlib.Path:
    """Write a `Dinov2` in timm's ('timm') or Meta's ('meta') layout (safetensors)."""
    from vitally_jax.interop.dinov2 import dinov2_state_dict

    cfg = model.cfg
    state = dinov2_state_dict(model, layout=layout)
    meta = _meta("dinov2", layout=layout, width=cfg.width, depth=cfg.depth, num_heads=cfg.num_heads,
                 mlp=cfg.mlp, patch_size=cfg.patch_size, img_size=cfg.img_size, reg_tokens=cfg.reg_tokens)
    return write_safetensors(path, state, meta, overwrite=overwrite)
