"""Bare timm ViT state dicts (Recursion's settings) <-> our `ViTEncoder`.

Recursion's encoders are timm `VisionTransformer`s with `ParallelScalingBlock`, `qkv_bias=False`, `qk_norm=True`,
`init_values=1e-4` and fixed 2-D sin-cos positions (`pos_embed` recomputed and checked, never trained).
The key mapping and the `mlp_bias` semantics live in `vitally_jax.models.convert`; this module reads files,
infers the geometry from the tensor shapes and builds the encoder without a random initialisation.

`mlp_bias`: 'legacy' (timm <= 1.0.24, what Recursion trained with; the default) or 'new' (timm >= 1.0.25).
The state dict keys are identical under both; only the outputs differ, so the flag must match the timm version
that produced (or will consume) the weights.
"""
from __future__ import annotations

import re
from typing import Mapping

import numpy as np
from flax import nnx

from vitally_jax.errors import ConfigError, WeightsError
from vitally_jax.interop.params import _flatten, model_from_params
from vitally_jax.interop.readers import StateDict, read_state_dict
from vitally_jax.models import convert
from vitally_jax.models.vit import ViTConfig, ViTEncoder, vit_config

OPENPHENOM_MAX_IN_CHANS = 11


def _source_state(source, prefix: str) -> tuple[str, StateDict]:
    name = "state dict" if isinstance(source, Mapping) else str(source)
    state = dict(source) if isinstance(source, Mapping) else read_state_dict(source)
    if prefix and not any(k.startswith(prefix) for k in state):
        raise WeightsError(f"{name}: no key starts with prefix {prefix!r}")
    return name, state


def config_from_timm_state(state: Mapping[str, np.ndarray], *, prefix: str = "", source: str = "state dict",
                           **overrides) -> ViTConfig:
    """Infer a `ViTConfig` from a timm ViT state dict's shapes (keys under `prefix`); `overrides` win.

    Width, depth, heads (from the QK-norm size), MLP width, patch size, channel-agnostic patch embedding
    (a 1-channel conv, unless `channel_agnostic=False` is given), block kind and pooling norm (`norm` -> 'token',
    `fc_norm` -> 'avg') come from the file.
    The grid is taken from `pos_embed`; for channel-agnostic models the table holds `max_in_chans` grids
    (11 for OpenPhenom, unless `max_in_chans` or `img_size` is given).
    """
    P = prefix
    try:
        d = state[P + "cls_token"].shape[-1]
        pw = state[P + "patch_embed.proj.weight"].shape  # (D, C, p, p)
        pos_len = state[P + "pos_embed"].shape[1]
        depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(re.escape(P) + r"blocks\.(\d+)\.", k)))
    except (KeyError, ValueError, IndexError, AttributeError) as e:
        raise WeightsError(f"{source}: not a timm ViT state dict under prefix {prefix!r} (missing {e})") from None
    p, cin = pw[-1], pw[1]
    cfg: dict = dict(width=d, depth=depth, patch_size=p)
    b0 = P + "blocks.0."
    if b0 + "in_proj.weight" in state:
        cfg["block"] = "parallel"
        votes = []  # every tensor that shows the MLP width votes: one bad tensor is reported, not taken as geometry
        for k, v in state.items():
            tail = k[len(P):] if k.startswith(P) else ""
            if re.fullmatch(r"blocks\.\d+\.in_proj\.weight", tail):
                votes.append(v.shape[0] - 3 * d)
            elif re.fullmatch(r"blocks\.\d+\.mlp_bias", tail):
                votes.append(v.shape[0])
            elif re.fullmatch(r"blocks\.\d+\.mlp_out_proj\.weight", tail):
                votes.append(v.shape[-1])
        cfg["mlp_dim"] = max(sorted(set(votes)), key=votes.count)
        hd = state[b0 + "q_norm.weight"].shape[0] if b0 + "q_norm.weight" in state else 64
        cfg["init_values"] = 1e-4
    elif b0 + "attn.qkv.weight" in state:
        cfg["block"] = "prenorm"
        cfg["mlp_dim"] = state[b0 + "mlp.fc1.weight"].shape[0]
        cfg["qkv_bias"] = b0 + "attn.qkv.bias" in state
        cfg["qk_norm"] = b0 + "attn.q_norm.weight" in state
        hd = state[b0 + "attn.q_norm.weight"].shape[0] if cfg["qk_norm"] else 64
        cfg["init_values"] = 1e-4 if b0 + "ls1.gamma" in state else None
    else:
        raise WeightsError(f"{source}: blocks are neither timm ParallelScalingBlock (in_proj) nor Block (attn.qkv)")
    cfg["num_heads"] = max(d // hd, 1)
    cfg["global_pool"] = "avg" if P + "fc_norm.weight" in state else "token"
    n = pos_len - 1
    if overrides.get("channel_agnostic", cin == 1):
        cfg["channel_agnostic"] = True
        if "img_size" in overrides:
            g = overrides["img_size"] // p
            cfg["max_in_chans"] = n // max(g * g, 1)
        else:
            cfg["max_in_chans"] = overrides.get("max_in_chans", OPENPHENOM_MAX_IN_CHANS)
            g = int(round((n / cfg["max_in_chans"]) ** 0.5))
        if g * g * cfg["max_in_chans"] != n:
            raise WeightsError(f"{source}: pos_embed has {pos_len} rows; not 1 + max_in_chans x grid^2 "
                               "(pass max_in_chans or img_size)")
        cfg["in_chans"] = min(6, cfg["max_in_chans"])
    else:
        g = int(round(n ** 0.5))
        if g * g != n:
            raise WeightsError(f"{source}: pos_embed has {pos_len} rows; expected 1 + a square grid")
        cfg["in_chans"] = cin
    cfg["img_size"] = g * p
    cfg.update(overrides)
    try:
        return vit_config("S/16", **cfg)  # every geometry field is overridden above
    except ConfigError as e:
        raise WeightsError(f"{source}: inferred encoder settings are invalid ({e})") from None


def load_timm_vit(source, *, mlp_bias: str = "legacy", prefix: str = "", variant: str | None = None,
                  **overrides) -> ViTEncoder:
    """Load a timm ViT checkpoint (path or state dict) into a `ViTEncoder`.

    mlp_bias: 'legacy' | 'new' (see module docstring). prefix: keys under it are the encoder (others ignored,
    e.g. 'encoder.vit_backbone.' of an OpenPhenom file). variant: optional check ('S/16', 'CA-S/16', ...);
    a file of another geometry raises `WeightsError`. overrides: ViTConfig fields (dtype, attention_impl,
    drop_path_rate, in_chans, ...).
    """
    name, state = _source_state(source, prefix)
    state = {k: v for k, v in state.items() if k.startswith(prefix)}
    cfg = config_from_timm_state(state, prefix=prefix, source=name, **overrides)
    if variant is not None:
        want = vit_config(variant)
        keys = ("width", "depth", "num_heads", "mlp_dim", "patch_size", "channel_agnostic")
        got = {k: getattr(cfg, k) for k in keys}
        exp = {k: getattr(want, k) for k in keys}
        if got != exp:
            diff = ", ".join(f"{k} {got[k]} (expected {exp[k]})" for k in keys if got[k] != exp[k])
            raise WeightsError(f"{name}: not a {variant} encoder: {diff}")
    nested = convert.encoder_params_from_timm(state, cfg, mlp_bias=mlp_bias, prefix=prefix, source=name)
    return model_from_params(lambda: ViTEncoder(cfg, rngs=nnx.Rngs(0)), _flatten(nested), source=name)


def timm_vit_state_dict(encoder: ViTEncoder, *, mlp_bias: str = "legacy", prefix: str = "") -> StateDict:
    """Our parallel-scaling `ViTEncoder` -> timm state dict (float32 numpy, PyTorch layout), keys under `prefix`.

    `pos_embed` is the fixed sin-cos table. `WeightsError` if the block biases cannot be expressed with the
    chosen `mlp_bias` semantics (legacy: the first 3*width effective biases must be zero; new: q/k/v biases).
    """
    state = convert.encoder_to_timm(encoder, mlp_bias=mlp_bias, prefix=prefix)
    return {k: np.ascontiguousarray(v) for k, v in state.items()}
