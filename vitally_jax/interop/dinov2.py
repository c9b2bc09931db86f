"""DINOv2 state dicts (timm `vit_*_patch14_dinov2` or Meta's release layout) <-> our `models.dinov2.Dinov2`.

Layouts (keys without prefix):

- `timm`: `cls_token`, `reg_token` (register models), `pos_embed`, `patch_embed.proj.{weight,bias}`,
  `blocks.{i}.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,ls2.gamma}`, `norm`. Register models
  use `no_embed_class` (pos_embed covers patches only; CLS position folded into `cls_token`).
- `meta`: Meta's `dinov2_vit*14` hub checkpoints: as timm but SwiGLU weights named `mlp.w12` / `mlp.w3`, a
  `mask_token` (1, D) (training only; kept so files round-trip), registers as `register_tokens`, and pos_embed
  always with a CLS slot.

The geometry (width, depth, MLP kind, patch, training grid, registers) is read from the shapes; the head count is
width // 64 (every DINOv2 model) unless given.
"""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Mapping

import numpy as np
from flax import nnx

from vitally_jax.errors import WeightsError
from vitally_jax.interop.params import flat_params, model_from_params
from vitally_jax.interop.readers import (
    StateDict,
    check_state_dict,
    export_metadata,
    read_state_dict,
    select_prefix,
    write_safetensors,
)
from vitally_jax.models.dinov2 import Dinov2, Dinov2Config

LAYOUTS = ("timm", "meta")
_BLOCK_LINEARS = {"attn.qkv": "qkv", "attn.proj": "proj", "mlp.fc1": "fc1", "mlp.fc2": "fc2"}
_BLOCK_NORMS = {"norm1": "norm1", "norm2": "norm2"}


def detect_layout(state: Mapping[str, np.ndarray]) -> str:
    """'meta' if the keys show Meta's naming (mask_token, register_tokens, mlp.w12), else 'timm'."""
    if "mask_token" in state or "register_tokens" in state or any(".mlp.w12." in k for k in state):
        return "meta"
    return "timm"


def _to_timm_names(state: Mapping[str, np.ndarray]) -> StateDict:
    """Meta key names -> timm key names (values untouched; registers renamed)."""
    out = {}
    for k, v in state.items():
        k = re.sub(r"^(blocks\.\d+\.mlp\.)w12\.", r"\1fc1.", k)
        k = re.sub(r"^(blocks\.\d+\.mlp\.)w3\.", r"\1fc2.", k)
        out["reg_token" if k == "register_tokens" else k] = v
    return out


def config_from_state(
    state: Mapping[str, np.ndarray], *, layout: str = "timm", source: str = "state dict", **overrides
) -> Dinov2Config:
    """Infer a `Dinov2Config` from a (timm-named) state dict's shapes; `overrides` win (e.g. num_heads)."""
    try:
        d = state["cls_token"].shape[-1]
        pw = state["patch_embed.proj.weight"].shape  # (D, C, p, p)
        depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
        fc1 = state["blocks.0.mlp.fc1.weight"].shape[0]
        fc2_in = state["blocks.0.mlp.fc2.weight"].shape[1]
        pos_len = state["pos_embed"].shape[1]
    except (KeyError, ValueError, IndexError, AttributeError) as e:
        raise WeightsError(f"{source}: not a DINOv2 state dict (missing {e})") from None
    regs = state["reg_token"].shape[1] if "reg_token" in state else 0
    no_embed_class = layout == "timm" and regs > 0
    grid2 = pos_len - (0 if no_embed_class else 1)
    grid = int(round(grid2**0.5))
    if grid * grid != grid2:
        raise WeightsError(f"{source}: pos_embed has {pos_len} rows; expected a square grid (+1 CLS row)")
    cfg = dict(
        width=d,
        depth=depth,
        num_heads=max(d // 64, 1),
        mlp_dim=fc2_in,
        mlp="swiglu" if fc1 == 2 * fc2_in else "mlp",
        patch_size=pw[-1],
        img_size=grid * pw[-1],
        in_chans=pw[1],
        reg_tokens=regs,
        no_embed_class=no_embed_class,
        init_values=1.0 if "blocks.0.ls1.gamma" in state else None,
        mask_token="mask_token" in state,
    )
    cfg.update(overrides)
    return Dinov2Config(**cfg)


def expected_state(cfg: Dinov2Config) -> dict[str, tuple[int, ...]]:
    """timm key -> shape for a DINOv2 of this config (plus `mask_token` when the config keeps one)."""
    d, p, h = cfg.width, cfg.patch_size, cfg.mlp_dim
    fc1 = 2 * h if cfg.mlp == "swiglu" else h
    out = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, cfg.pos_len, d),
        "patch_embed.proj.weight": (d, cfg.in_chans, p, p),
        "patch_embed.proj.bias": (d,),
        "norm.weight": (d,),
        "norm.bias": (d,),
    }
    if cfg.reg_tokens:
        out["reg_token"] = (1, cfg.reg_tokens, d)
    if cfg.mask_token:
        out["mask_token"] = (1, d)
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        linears = {"attn.qkv": (3 * d, d), "attn.proj": (d, d), "mlp.fc1": (fc1, d), "mlp.fc2": (d, h)}
        for name, (o, n) in linears.items():
            out[b + name + ".weight"] = (o, n)
            out[b + name + ".bias"] = (o,)
        for name in _BLOCK_NORMS:
            out[b + name + ".weight"] = (d,)
            out[b + name + ".bias"] = (d,)
        if cfg.init_values is not None:
            out[b + "ls1.gamma"] = (d,)
            out[b + "ls2.gamma"] = (d,)
    return out


def params_from_timm(state: Mapping[str, np.ndarray], cfg: Dinov2Config) -> dict[str, np.ndarray]:
    """timm-named state dict -> our flat params (Linear weights transposed, conv to (p, p, C, D), blocks stacked)."""
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    w = state["patch_embed.proj.weight"]
    out = {
        "patch_embed.kernel": f32(np.transpose(w, (2, 3, 1, 0))),
        "patch_embed.bias": f32(state["patch_embed.proj.bias"]),
        "cls_token": f32(state["cls_token"]),
        "pos_embed": f32(state["pos_embed"]),
        "norm.scale": f32(state["norm.weight"]),
        "norm.bias": f32(state["norm.bias"]),
    }
    if cfg.reg_tokens:
        out["reg_token"] = f32(state["reg_token"])
    if cfg.mask_token:
        out["mask_token"] = f32(state["mask_token"])

    def stack(key, fn=lambda a: a):
        return f32(np.stack([fn(state[f"blocks.{i}.{key}"]) for i in range(cfg.depth)]))

    for tk, ok in _BLOCK_LINEARS.items():
        out[f"blocks.{ok}.kernel"] = stack(tk + ".weight", np.transpose)
        out[f"blocks.{ok}.bias"] = stack(tk + ".bias")
    for tk, ok in _BLOCK_NORMS.items():
        out[f"blocks.{ok}.scale"] = stack(tk + ".weight")
        out[f"blocks.{ok}.bias"] = stack(tk + ".bias")
    if cfg.init_values is not None:
        out["blocks.ls1"] = stack("ls1.gamma")
        out["blocks.ls2"] = stack("ls2.gamma")
    return out


def timm_from_params(params: Mapping[str, np.ndarray], cfg: Dinov2Config) -> StateDict:
    """Inverse of `params_from_timm`: our flat params -> timm-named state dict (float32 numpy)."""
    p = {k: np.asarray(v, np.float32) for k, v in params.items()}
    out = {
        "cls_token": p["cls_token"],
        "pos_embed": p["pos_embed"],
        "patch_embed.proj.weight": np.ascontiguousarray(np.transpose(p["patch_embed.kernel"], (3, 2, 0, 1))),
        "patch_embed.proj.bias": p["patch_embed.bias"],
        "norm.weight": p["norm.scale"],
        "norm.bias": p["norm.bias"],
    }
    if cfg.reg_tokens:
        out["reg_token"] = p["reg_token"]
    if cfg.mask_token:
        out["mask_token"] = p["mask_token"]
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        for tk, ok in _BLOCK_LINEARS.items():
            out[b + tk + ".weight"] = np.ascontiguousarray(p[f"blocks.{ok}.kernel"][i].T)
            out[b + tk + ".bias"] = p[f"blocks.{ok}.bias"][i]
        for tk, ok in _BLOCK_NORMS.items():
            out[b + tk + ".weight"] = p[f"blocks.{ok}.scale"][i]
            out[b + tk + ".bias"] = p[f"blocks.{ok}.bias"][i]
        if cfg.init_values is not None:
            out[b + "ls1.gamma"] = p["blocks.ls1"][i]
            out[b + "ls2.gamma"] = p["blocks.ls2"][i]
    return out


def _to_meta_names(state: Mapping[str, np.ndarray], cfg: Dinov2Config) -> StateDict:
    out = {}
    for k, v in state.items():
        if cfg.mlp == "swiglu":
            k = re.sub(r"^(blocks\.\d+\.mlp\.)fc1\.", r"\1w12.", k)
            k = re.sub(r"^(blocks\.\d+\.mlp\.)fc2\.", r"\1w3.", k)
        out["register_tokens" if k == "reg_token" else k] = v
    out.setdefault("mask_token", np.zeros((1, cfg.width), np.float32))  # Meta's loader expects one
    return out


def load_dinov2(
    source, *, layout: str | None = None, prefix: str = "", variant: str | None = None, **overrides
) -> Dinov2:
    """Load a DINOv2 checkpoint (path or state dict) into a `Dinov2` module.

    layout: 'timm' | 'meta' | None (detected). prefix: removed from every key (e.g. 'backbone.').
    variant: optional check, e.g. 'L/14': a file of another size raises `WeightsError`. overrides: config
    fields (num_heads, antialias, dtype, attention_impl, drop_path_rate).
    """
    name = str(source) if not isinstance(source, Mapping) else "state dict"
    state = dict(source) if isinstance(source, Mapping) else read_state_dict(source)
    if prefix:
        state = select_prefix(state, prefix)
        if not state:
            raise WeightsError(f"{name}: no key starts with prefix {prefix!r}")
    layout = layout or detect_layout(state)
    if layout not in LAYOUTS:
        raise WeightsError(f"{name}: unknown DINOv2 layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    timm_state = _to_timm_names(state) if layout == "meta" else dict(state)
    cfg = config_from_state(timm_state, layout=layout, source=name, **overrides)
    if variant is not None:
        from vitally_jax.models.dinov2 import dinov2_config

        want = dinov2_config(variant)
        got = (cfg.width, cfg.depth, cfg.mlp)
        if (want.width, want.depth, want.mlp) != got:
            raise WeightsError(
                f"{name}: holds a DINOv2 of width {got[0]}, depth {got[1]}, {got[2]} MLP; "
                f"expected {variant} (width {want.width}, depth {want.depth}, {want.mlp} MLP)"
            )
    check_state_dict(timm_state, expected_state(cfg), source=f"{name} (DINOv2, {layout} layout)")
    return model_from_params(lambda: Dinov2(cfg, rngs=nnx.Rngs(0)), params_from_timm(timm_state, cfg), source=name)


def dinov2_state_dict(model: Dinov2, *, layout: str = "timm") -> StateDict:
    """Our `Dinov2` -> a state dict in the timm or Meta layout (float32 numpy, PyTorch shapes).

    Meta layout of a register model needs a CLS slot in pos_embed: only models loaded from Meta's layout
    (no_embed_class=False) have one.
    """
    if layout not in LAYOUTS:
        raise WeightsError(f"DINOv2 export: unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    cfg = model.cfg
    state = timm_from_params(flat_params(model), cfg)
    if layout == "meta":
        if cfg.no_embed_class:
            raise WeightsError(
                "DINOv2 export: this register model has no CLS position slot (timm layout); "
                "export it with layout='timm'"
            )
        state = _to_meta_names(state, cfg)
    else:
        state.pop("mask_token", None)  # timm's VisionTransformer has none
    return state


def export_dinov2(
    path: str | os.PathLike, model: Dinov2, *, layout: str = "timm", overwrite: bool = False
) -> pathlib.Path:
    """Write a `Dinov2` in timm's ('timm') or Meta's ('meta') layout (safetensors)."""
    cfg = model.cfg
    state = dinov2_state_dict(model, layout=layout)
    meta = export_metadata(
        "dinov2",
        layout=layout,
        width=cfg.width,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp=cfg.mlp,
        patch_size=cfg.patch_size,
        img_size=cfg.img_size,
        reg_tokens=cfg.reg_tokens,
    )
    return write_safetensors(path, state, meta, overwrite=overwrite)
