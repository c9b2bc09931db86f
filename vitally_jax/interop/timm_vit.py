"""Bare timm ViT state dicts (Recursion's settings) <-> our `ViTEncoder`.

Recursion's encoders are timm `VisionTransformer`s with `ParallelScalingBlock`, `qkv_bias=False`, `qk_norm=True`,
`init_values=1e-4` and fixed 2-D sin-cos positions (`pos_embed` recomputed and checked, never trained).
This module holds both directions: the key mapping (Linear weights (out, in) are transposed, Conv
(D, C, p, p) -> (p, p, C, D), per-block tensors are stacked on the layer axis; the fixed sin-cos `pos_embed` is
checked against the recomputed table, never loaded), reading files and inferring the geometry from the tensor
shapes (building the encoder without a random initialisation), and the export back to timm safetensors
(`export_timm_vit`, whose metadata holds `timm_kwargs`, the keyword arguments that build the matching timm model:
`timm.models.vision_transformer.VisionTransformer(**kwargs, block_fn=...)`). Channel-agnostic encoders use
OpenPhenom's 1-channel patch conv and an `max_in_chans`-channel pos table, which plain timm cannot build; their
metadata says so.

    enc = ViTEncoder(vit_config("S/16"), rngs=nnx.Rngs(0))
    load_encoder_weights(enc, state_dict)                 # bare timm keys, in place
    enc = load_timm_vit("vit.safetensors")                # or build it from the file
    export_timm_vit("ours.safetensors", enc)

`mlp_bias`: the parallel-scaling block's `mlp_bias` has two meanings:
- 'legacy' (timm <= 1.0.24, what Recursion trained with; the default): the effective bias over [mlp|q|k|v] is
  concat(zeros(3D), mlp_bias): fc1 = b[0:H], q = b[H:H+D], k = b[H+D:H+2D], v = b[H+2D:].
- 'new' (timm >= 1.0.25): fc1 = mlp_bias, q = k = v = 0.
The state dict keys are identical under both; only the outputs differ, so the flag must match the timm version
that produced (or will consume) the weights. Our blocks carry the same single trainable vector
(`ViTConfig.bias`: 'legacy' by default, or 'new'): a loaded file builds the matching encoder, and any encoder
trained with either exports exactly. `bias='free'` (separate fc1/q/k/v biases) loads files too, but once
trained it has no timm equivalent and its export is refused with a message naming the option to train with.
"""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx

from vitally_jax.errors import ConfigError, WeightsError
from vitally_jax.interop.params import _flatten, apply_params, model_from_params
from vitally_jax.interop.readers import StateDict, export_metadata, read_state_dict, write_safetensors
from vitally_jax.models.layers import effective_in_bias, sincos_2d
from vitally_jax.models.vit import ViTConfig, ViTEncoder, vit_config

OPENPHENOM_MAX_IN_CHANS = 11
MLP_BIAS_MODES = ("legacy", "new")


# ------------------------------------------------------------------------------------------------------------------
# Key mapping: timm state dict <-> our nested parameters
# ------------------------------------------------------------------------------------------------------------------


class _Reader:
    """Takes keys from a state dict, checking shapes; reports missing / unexpected / wrongly shaped keys."""

    def __init__(self, sd: Mapping[str, np.ndarray], source: str):
        self.sd = {k: np.asarray(v) for k, v in sd.items()}
        self.source = source
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.wrong: list[str] = []

    def take(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in self.sd:
            self.missing.append(key)
            return np.zeros(shape, np.float32)
        self.used.add(key)
        a = self.sd[key]
        if tuple(a.shape) != tuple(shape):
            self.wrong.append(f"{key} {tuple(a.shape)} (expected {tuple(shape)})")
            return np.zeros(shape, np.float32)
        return a.astype(np.float32)

    def check_table(self, key: str, table: np.ndarray) -> None:
        a = self.take(key, (1,) + table.shape)
        if key in self.used and not any(w.startswith(key + " ") for w in self.wrong):
            if not np.allclose(a[0], table, atol=1e-5):
                self.wrong.append(f"{key} (not the fixed 2-D sin-cos table)")

    def finish(self, ignore: tuple[str, ...] = ()) -> None:
        extra = sorted(k for k in self.sd if k not in self.used and k not in ignore)
        parts = []
        for name, items in (("missing", self.missing), ("unexpected", extra), ("wrong shape", self.wrong)):
            if items:
                shown = ", ".join(items[:6]) + (f", ... ({len(items)} in all)" if len(items) > 6 else "")
                parts.append(f"{name}: {shown}")
        if parts:
            raise WeightsError(f"{self.source}: state dict does not match the model; " + "; ".join(parts))


def _linear(r: _Reader, key: str, din: int, dout: int, bias: bool = True) -> dict:
    out = {"kernel": r.take(key + ".weight", (dout, din)).T}
    if bias:
        out["bias"] = r.take(key + ".bias", (dout,))
    return out


def _norm(r: _Reader, key: str, dim: int) -> dict:
    return {"scale": r.take(key + ".weight", (dim,)), "bias": r.take(key + ".bias", (dim,))}


def _stack(items: list[dict]) -> dict:
    if isinstance(items[0], dict):
        return {k: _stack([it[k] for it in items]) for k in items[0]}
    return np.stack(items)


def _parallel_block(r: _Reader, key: str, d: int, heads: int, h: int, mlp_bias: str, bias: str) -> dict:
    """One ParallelScalingBlock; `mlp_bias` is the file's semantics, `bias` our block's parameterisation (the
    same, or 'free', which takes the effective biases)."""
    hd = d // heads
    mb = r.take(key + ".mlp_bias", (h,))
    if bias == "free":
        b = effective_in_bias(mlp_bias, {"mlp_bias": mb}, d, h)
        biases = {"fc1_bias": b[:h], "q_bias": b[h : h + d], "k_bias": b[h + d : h + 2 * d], "v_bias": b[h + 2 * d :]}
    else:
        biases = {"mlp_bias": mb}
    return {
        "in_norm": _norm(r, key + ".in_norm", d),
        "in_proj": r.take(key + ".in_proj.weight", (h + 3 * d, d)).T,
        **biases,
        "q_norm": _norm(r, key + ".q_norm", hd),
        "k_norm": _norm(r, key + ".k_norm", hd),
        "attn_out": _linear(r, key + ".attn_out_proj", d, d),
        "mlp_out": _linear(r, key + ".mlp_out_proj", h, d),
        "gamma": r.take(key + ".ls.gamma", (d,)),
    }


def _prenorm_block(
    r: _Reader, key: str, d: int, heads: int, h: int, *, qkv_bias=True, qk_norm=False, layer_scale=False
) -> dict:
    out = {
        "norm1": _norm(r, key + ".norm1", d),
        "qkv": _linear(r, key + ".attn.qkv", d, 3 * d, bias=qkv_bias),
        "proj": _linear(r, key + ".attn.proj", d, d),
        "norm2": _norm(r, key + ".norm2", d),
        "fc1": _linear(r, key + ".mlp.fc1", d, h),
        "fc2": _linear(r, key + ".mlp.fc2", h, d),
    }
    if qk_norm:
        out["q_norm"] = _norm(r, key + ".attn.q_norm", d // heads)
        out["k_norm"] = _norm(r, key + ".attn.k_norm", d // heads)
    if layer_scale:
        out["gamma1"] = r.take(key + ".ls1.gamma", (d,))
        out["gamma2"] = r.take(key + ".ls2.gamma", (d,))
    return out


def _check_mlp_bias(mlp_bias: str) -> None:
    if mlp_bias not in MLP_BIAS_MODES:
        raise WeightsError(f"mlp_bias={mlp_bias!r}: expected one of {MLP_BIAS_MODES}")


def _read_encoder(r: _Reader, cfg, prefix: str, mlp_bias: str) -> dict:
    _check_mlp_bias(mlp_bias)
    if cfg.block == "parallel" and cfg.bias not in ("free", mlp_bias):
        raise WeightsError(
            f"{r.source}: mlp_bias={mlp_bias!r} weights need an encoder built with model.bias={mlp_bias!r} (or "
            f"'free'); this one has model.bias={cfg.bias!r}"
        )
    d, p, g = cfg.width, cfg.patch_size, cfg.grid
    cin = 1 if cfg.channel_agnostic else cfg.in_chans
    w = r.take(prefix + "patch_embed.proj.weight", (d, cin, p, p))
    out = {
        "patch_embed": {"kernel": w.transpose(2, 3, 1, 0), "bias": r.take(prefix + "patch_embed.proj.bias", (d,))},
        "cls_token": r.take(prefix + "cls_token", (1, 1, d)),
        "norm": _norm(r, prefix + ("norm" if cfg.global_pool == "token" else "fc_norm"), d),
    }
    reps = cfg.max_in_chans if cfg.channel_agnostic else 1
    r.check_table(prefix + "pos_embed", sincos_2d(g, g, d, cls_row=True, repeat=reps))
    if cfg.block == "parallel":
        blocks = [
            _parallel_block(r, f"{prefix}blocks.{i}", d, cfg.num_heads, cfg.mlp_dim, mlp_bias, cfg.bias)
            for i in range(cfg.depth)
        ]
    else:
        blocks = [
            _prenorm_block(
                r,
                f"{prefix}blocks.{i}",
                d,
                cfg.num_heads,
                cfg.mlp_dim,
                qkv_bias=cfg.qkv_bias,
                qk_norm=cfg.qk_norm,
                layer_scale=cfg.init_values is not None,
            )
            for i in range(cfg.depth)
        ]
    out["blocks"] = _stack(blocks)
    return out


def encoder_params_from_timm(
    sd: Mapping[str, np.ndarray], cfg, *, mlp_bias: str = "legacy", prefix: str = "", source: str = "state dict"
) -> dict:
    """timm ViT state dict -> nested dict matching `nnx.state(ViTEncoder(cfg), nnx.Param).to_pure_dict()`.

    Only keys starting with `prefix` are considered; any other key under it is reported as unexpected.
    """
    r = _Reader({k: v for k, v in sd.items() if k.startswith(prefix)}, source)
    out = _read_encoder(r, cfg, prefix, mlp_bias)
    r.finish()
    return out


def load_encoder_weights(
    encoder, sd: Mapping[str, np.ndarray], *, mlp_bias: str = "legacy", prefix: str = "", source: str = "state dict"
) -> None:
    """Load a timm ViT state dict into a `ViTEncoder` in place (WeightsError on any mismatch)."""
    apply_params(
        encoder, encoder_params_from_timm(sd, encoder.cfg, mlp_bias=mlp_bias, prefix=prefix, source=source), source
    )


def export_mlp_bias(cfg: ViTConfig, mlp_bias: str | None = None) -> str:
    """The `mlp_bias` semantics an export of an encoder with config `cfg` is written in: `mlp_bias` if given,
    else the encoder's own (`cfg.bias`; 'legacy' for a 'free' encoder)."""
    if mlp_bias is None:
        return "legacy" if cfg.bias == "free" else cfg.bias
    _check_mlp_bias(mlp_bias)
    return mlp_bias


def _timm_mlp_bias(block_params: dict, i: int, cfg: ViTConfig, target: str) -> np.ndarray:
    """Block i's timm `mlp_bias` in `target` semantics from our parameters; WeightsError if it cannot hold them."""
    d, h = cfg.width, cfg.mlp_dim
    names = ("fc1_bias", "q_bias", "k_bias", "v_bias") if cfg.bias == "free" else ("mlp_bias",)
    own = {n: np.asarray(block_params[n], np.float32)[i] for n in names}
    if cfg.bias == target:
        return own["mlp_bias"]
    eff = effective_in_bias(cfg.bias, own, d, h)
    zero, mb = (eff[: 3 * d], eff[3 * d :]) if target == "legacy" else (eff[h:], eff[:h])
    if not np.any(zero != 0):
        return mb
    if cfg.bias == "free":
        raise WeightsError(
            f"encoder_to_timm: block {i} has separate fc1/q/k/v biases (model.bias='free') that timm's {target} "
            "mlp_bias cannot hold; train with model.bias='legacy' (timm <= 1.0.24 and OpenPhenom, the default) or "
            "'new' (timm >= 1.0.25) to export"
        )
    part = "the first 3*width effective biases must be zero" if target == "legacy" else "it has no q/k/v biases"
    raise WeightsError(
        f"encoder_to_timm: block {i} biases (model.bias={cfg.bias!r}) are not expressible as {target} mlp_bias "
        f"({part}); export with mlp_bias={cfg.bias!r}"
    )


def encoder_to_timm(encoder, *, mlp_bias: str | None = None, prefix: str = "") -> dict[str, np.ndarray]:
    """Our parallel-scaling `ViTEncoder` -> timm state dict (float32 numpy), including the fixed `pos_embed`.

    mlp_bias: the semantics to write ('legacy' | 'new'; None = the encoder's own `cfg.bias`, see
    `export_mlp_bias`). An encoder built with that parameterisation exports exactly; otherwise its effective
    biases are converted where the target can hold them, and WeightsError says which option to use where not
    (a trained `model.bias='free'` encoder never fits).
    """
    cfg = encoder.cfg
    if cfg.block != "parallel":
        raise WeightsError("encoder_to_timm: only parallel-scaling encoders are exported")
    target = export_mlp_bias(cfg, mlp_bias)
    a = lambda x: np.asarray(x, np.float32)  # noqa: E731
    s = jax.tree.map(a, nnx.to_pure_dict(nnx.state(encoder, nnx.Param)))  # one device -> host copy per leaf
    d = cfg.width
    out = {
        "cls_token": a(s["cls_token"]),
        "patch_embed.proj.weight": a(s["patch_embed"]["kernel"]).transpose(3, 2, 0, 1),
        "patch_embed.proj.bias": a(s["patch_embed"]["bias"]),
    }
    reps = cfg.max_in_chans if cfg.channel_agnostic else 1
    out["pos_embed"] = sincos_2d(cfg.grid, cfg.grid, d, cls_row=True, repeat=reps)[None]
    norm = "norm" if cfg.global_pool == "token" else "fc_norm"
    out[f"{norm}.weight"], out[f"{norm}.bias"] = a(s["norm"]["scale"]), a(s["norm"]["bias"])
    b = s["blocks"]
    for i in range(cfg.depth):
        k = f"blocks.{i}."
        mb = _timm_mlp_bias(b, i, cfg, target)
        out[k + "in_norm.weight"], out[k + "in_norm.bias"] = a(b["in_norm"]["scale"])[i], a(b["in_norm"]["bias"])[i]
        out[k + "in_proj.weight"] = a(b["in_proj"])[i].T
        out[k + "mlp_bias"] = mb
        for n in ("q_norm", "k_norm"):
            out[k + n + ".weight"], out[k + n + ".bias"] = a(b[n]["scale"])[i], a(b[n]["bias"])[i]
        for ours, theirs in (("attn_out", "attn_out_proj"), ("mlp_out", "mlp_out_proj")):
            out[k + theirs + ".weight"] = a(b[ours]["kernel"])[i].T
            out[k + theirs + ".bias"] = a(b[ours]["bias"])[i]
        out[k + "ls.gamma"] = a(b["gamma"])[i]
    return {prefix + k: v for k, v in out.items()}


# ------------------------------------------------------------------------------------------------------------------
# Files: read, infer the geometry, build; export
# ------------------------------------------------------------------------------------------------------------------


def _source_state(source, prefix: str) -> tuple[str, StateDict]:
    name = "state dict" if isinstance(source, Mapping) else str(source)
    state = dict(source) if isinstance(source, Mapping) else read_state_dict(source)
    if prefix and not any(k.startswith(prefix) for k in state):
        raise WeightsError(f"{name}: no key starts with prefix {prefix!r}")
    return name, state


def config_from_timm_state(
    state: Mapping[str, np.ndarray],
    *,
    prefix: str = "",
    source: str = "state dict",
    mlp_bias: str = "legacy",
    **overrides,
) -> ViTConfig:
    """Infer a `ViTConfig` from a timm ViT state dict's shapes (keys under `prefix`); `overrides` win.

    The block biases are parameterised as the file's `mlp_bias` semantics (`bias='legacy'` or `'new'`), so the
    model trains and exports in timm's own layout (override with `bias='free'` for separate fc1/q/k/v biases).

    Width, depth, heads (from the QK-norm size), MLP width, patch size, channel-agnostic patch embedding
    (a 1-channel conv, unless `channel_agnostic=False` is given), block kind and pooling norm (`norm` -> 'token',
    `fc_norm` -> 'avg') come from the file.
    The grid is taken from `pos_embed`; for channel-agnostic models the table holds `max_in_chans` grids
    (11 for OpenPhenom, unless `max_in_chans` or `img_size` is given).
    """
    _check_mlp_bias(mlp_bias)
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
            tail = k[len(P) :] if k.startswith(P) else ""
            if re.fullmatch(r"blocks\.\d+\.in_proj\.weight", tail):
                votes.append(v.shape[0] - 3 * d)
            elif re.fullmatch(r"blocks\.\d+\.mlp_bias", tail):
                votes.append(v.shape[0])
            elif re.fullmatch(r"blocks\.\d+\.mlp_out_proj\.weight", tail):
                votes.append(v.shape[-1])
        cfg["mlp_dim"] = max(sorted(set(votes)), key=votes.count)
        hd = state[b0 + "q_norm.weight"].shape[0] if b0 + "q_norm.weight" in state else 64
        cfg["init_values"] = 1e-4
        cfg["bias"] = mlp_bias
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
            raise WeightsError(
                f"{source}: pos_embed has {pos_len} rows; not 1 + max_in_chans x grid^2 (pass max_in_chans or img_size)"
            )
        cfg["in_chans"] = min(6, cfg["max_in_chans"])
    else:
        g = int(round(n**0.5))
        if g * g != n:
            raise WeightsError(f"{source}: pos_embed has {pos_len} rows; expected 1 + a square grid")
        cfg["in_chans"] = cin
    cfg["img_size"] = g * p
    cfg.update(overrides)
    try:
        return vit_config("S/16", **cfg)  # every geometry field is overridden above
    except ConfigError as e:
        raise WeightsError(f"{source}: inferred encoder settings are invalid ({e})") from None


def load_timm_vit(
    source, *, mlp_bias: str = "legacy", prefix: str = "", variant: str | None = None, **overrides
) -> ViTEncoder:
    """Load a timm ViT checkpoint (path or state dict) into a `ViTEncoder`.

    mlp_bias: 'legacy' | 'new' (see module docstring). prefix: keys under it are the encoder (others ignored,
    e.g. 'encoder.vit_backbone.' of an OpenPhenom file). variant: optional check ('S/16', 'CA-S/16', ...);
    a file of another geometry raises `WeightsError`. overrides: ViTConfig fields (dtype, attention_impl,
    drop_path_rate, in_chans, ...).
    """
    name, state = _source_state(source, prefix)
    state = {k: v for k, v in state.items() if k.startswith(prefix)}
    cfg = config_from_timm_state(state, prefix=prefix, source=name, mlp_bias=mlp_bias, **overrides)
    if variant is not None:
        want = vit_config(variant)
        keys = ("width", "depth", "num_heads", "mlp_dim", "patch_size", "channel_agnostic")
        got = {k: getattr(cfg, k) for k in keys}
        exp = {k: getattr(want, k) for k in keys}
        if got != exp:
            diff = ", ".join(f"{k} {got[k]} (expected {exp[k]})" for k in keys if got[k] != exp[k])
            raise WeightsError(f"{name}: not a {variant} encoder: {diff}")
    nested = encoder_params_from_timm(state, cfg, mlp_bias=mlp_bias, prefix=prefix, source=name)
    return model_from_params(lambda: ViTEncoder(cfg, rngs=nnx.Rngs(0)), _flatten(nested), source=name)


def timm_vit_state_dict(encoder: ViTEncoder, *, mlp_bias: str | None = None, prefix: str = "") -> StateDict:
    """Our parallel-scaling `ViTEncoder` -> timm state dict (float32 numpy, PyTorch layout), keys under `prefix`.

    `pos_embed` is the fixed sin-cos table. mlp_bias: None = the encoder's own semantics (`export_mlp_bias`).
    `WeightsError` if the block biases cannot be expressed with the chosen `mlp_bias` semantics (legacy: the first
    3*width effective biases must be zero; new: no q/k/v biases), e.g. after training with `model.bias='free'`.
    """
    state = encoder_to_timm(encoder, mlp_bias=mlp_bias, prefix=prefix)
    return {k: np.ascontiguousarray(v) for k, v in state.items()}


def timm_kwargs(cfg: ViTConfig) -> dict:
    """Keyword arguments of timm's `VisionTransformer` that build the model matching `cfg` (block_fn by name)."""
    kw = dict(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        in_chans=1 if cfg.channel_agnostic else cfg.in_chans,
        embed_dim=cfg.width,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_dim / cfg.width,
        num_classes=0,
        class_token=True,
        global_pool=cfg.global_pool,
        fc_norm=None,
        init_values=cfg.init_values,
    )
    if cfg.block == "parallel":
        kw.update(block_fn="ParallelScalingBlock", qkv_bias=False, qk_norm=True)
    else:
        kw.update(block_fn="Block", qkv_bias=cfg.qkv_bias, qk_norm=cfg.qk_norm)
    return kw


def export_timm_vit(
    path: str | os.PathLike,
    encoder: ViTEncoder,
    *,
    mlp_bias: str | None = None,
    prefix: str = "",
    overwrite: bool = False,
) -> pathlib.Path:
    """Write `encoder` as a timm ViT state dict (safetensors) in `mlp_bias` semantics (None = the encoder's own,
    `export_mlp_bias`; 'legacy' loads into timm <= 1.0.24, 'new' into timm >= 1.0.25). WeightsError if the
    biases do not fit (a trained `model.bias='free'` encoder: the message names the option to train with)."""
    cfg = encoder.cfg
    mlp_bias = export_mlp_bias(cfg, mlp_bias)
    state = timm_vit_state_dict(encoder, mlp_bias=mlp_bias, prefix=prefix)
    meta = export_metadata(
        "timm_vit",
        mlp_bias=mlp_bias,
        prefix=prefix,
        timm_kwargs=timm_kwargs(cfg),
        channel_agnostic=cfg.channel_agnostic,
        max_in_chans=cfg.max_in_chans,
    )
    return write_safetensors(path, state, meta, overwrite=overwrite)
