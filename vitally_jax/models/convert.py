"""PyTorch state dicts (timm ViT, OpenPhenom / maes_microscopy MAE) <-> our NNX parameters.

State dicts are plain `{key: numpy array}` mappings (no torch needed). Linear weights (out, in) are transposed;
Conv (D, C, p, p) -> (p, p, C, D); per-block tensors are stacked on the layer axis. Fixed sin-cos tables
(`pos_embed`, `decoder.pos_embeddings`) are checked against the recomputed table, never loaded.

The parallel-scaling block's `mlp_bias` has two meanings (`mlp_bias=`):
- "legacy" (timm <= 1.0.24, what Recursion trained with): the effective bias over [mlp|q|k|v] is
  concat(zeros(3D), mlp_bias): fc1 = b[0:H], q = b[H:H+D], k = b[H+D:H+2D], v = b[H+2D:].
- "new" (timm >= 1.0.25): fc1 = mlp_bias, q = k = v = 0.

    enc = ViTEncoder(vit_config("S/16"), rngs=nnx.Rngs(0))
    load_encoder_weights(enc, state_dict)                 # bare timm keys
    mae = MAE(mae_config("CA-S/16"), rngs=nnx.Rngs(0))
    load_mae_weights(mae, openphenom_state_dict)          # encoder.vit_backbone., decoder., ...
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
from flax import nnx

from vitally_jax.errors import WeightsError
from vitally_jax.models.layers import sincos_2d

OPENPHENOM_ENCODER = "encoder.vit_backbone."
OPENPHENOM_DECODER = "decoder."
OPENPHENOM_PROJ = "encoder_decoder_proj."
OPENPHENOM_PRED = "decoder_pred."
MLP_BIAS_MODES = ("legacy", "new")


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


def _parallel_block(r: _Reader, key: str, d: int, heads: int, h: int, mlp_bias: str) -> dict:
    hd = d // heads
    mb = r.take(key + ".mlp_bias", (h,))
    if mlp_bias == "legacy":
        b = np.concatenate([np.zeros(3 * d, np.float32), mb])
        fc1, q, k, v = b[:h], b[h:h + d], b[h + d:h + 2 * d], b[h + 2 * d:]
    else:
        fc1, q, k, v = mb, *(np.zeros(d, np.float32) for _ in range(3))
    return {
        "in_norm": _norm(r, key + ".in_norm", d),
        "in_proj": r.take(key + ".in_proj.weight", (h + 3 * d, d)).T,
        "fc1_bias": fc1, "q_bias": q, "k_bias": k, "v_bias": v,
        "q_norm": _norm(r, key + ".q_norm", hd),
        "k_norm": _norm(r, key + ".k_norm", hd),
        "attn_out": _linear(r, key + ".attn_out_proj", d, d),
        "mlp_out": _linear(r, key + ".mlp_out_proj", h, d),
        "gamma": r.take(key + ".ls.gamma", (d,)),
    }


def _prenorm_block(r: _Reader, key: str, d: int, heads: int, h: int, *, qkv_bias=True, qk_norm=False,
                   layer_scale=False) -> dict:
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


def _read_encoder(r: _Reader, cfg, prefix: str, mlp_bias: str) -> dict:
    if mlp_bias not in MLP_BIAS_MODES:
        raise WeightsError(f"mlp_bias={mlp_bias!r}: expected one of {MLP_BIAS_MODES}")
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
        blocks = [_parallel_block(r, f"{prefix}blocks.{i}", d, cfg.num_heads, cfg.mlp_dim, mlp_bias)
                  for i in range(cfg.depth)]
    else:
        blocks = [_prenorm_block(r, f"{prefix}blocks.{i}", d, cfg.num_heads, cfg.mlp_dim, qkv_bias=cfg.qkv_bias,
                                 qk_norm=cfg.qk_norm, layer_scale=cfg.init_values is not None)
                  for i in range(cfg.depth)]
    out["blocks"] = _stack(blocks)
    return out


def _apply(module: nnx.Module, params: dict, source: str) -> None:
    state = nnx.state(module, nnx.Param)
    ours = nnx.to_pure_dict(state)

    def check(a, b, path=""):
        if isinstance(a, dict):
            if set(a) != set(b):
                raise WeightsError(f"{source}: parameter groups {sorted(set(a) ^ set(b))} at '{path}' do not match")
            for k in a:
                check(a[k], b[k], f"{path}/{k}")
        elif tuple(a.shape) != tuple(b.shape):
            raise WeightsError(f"{source}: {path} has shape {tuple(b.shape)}, model expects {tuple(a.shape)}")
    check(ours, params)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(module, state)


# ------------------------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------------------------

def encoder_params_from_timm(sd: Mapping[str, np.ndarray], cfg, *, mlp_bias: str = "legacy", prefix: str = "",
                             source: str = "state dict") -> dict:
    """timm ViT state dict -> nested dict matching `nnx.state(ViTEncoder(cfg), nnx.Param).to_pure_dict()`.

    Only keys starting with `prefix` are considered; any other key under it is reported as unexpected.
    """
    r = _Reader({k: v for k, v in sd.items() if k.startswith(prefix)}, source)
    out = _read_encoder(r, cfg, prefix, mlp_bias)
    r.finish()
    return out


def load_encoder_weights(encoder, sd: Mapping[str, np.ndarray], *, mlp_bias: str = "legacy", prefix: str = "",
                         source: str = "state dict") -> None:
    """Load a timm ViT state dict into a `ViTEncoder` in place (WeightsError on any mismatch)."""
    _apply(encoder, encoder_params_from_timm(sd, encoder.cfg, mlp_bias=mlp_bias, prefix=prefix, source=source),
           source)


def mae_params_from_openphenom(sd: Mapping[str, np.ndarray], cfg, *, mlp_bias: str = "legacy",
                               source: str = "state dict") -> dict:
    """OpenPhenom / maes_microscopy MAE state dict -> nested dict matching `nnx.state(MAE(cfg), nnx.Param)`."""
    r = _Reader(sd, source)
    enc = cfg.encoder
    dd, de = cfg.decoder_width, enc.width
    mlp = int(dd * cfg.decoder_mlp_ratio)
    p, g = enc.patch_size, enc.grid
    out = {"encoder": _read_encoder(r, enc, OPENPHENOM_ENCODER, mlp_bias)}
    out["decoder_embed"] = _linear(r, OPENPHENOM_PROJ[:-1], de, dd)
    out["mask_token"] = r.take(OPENPHENOM_DECODER + "mask_token", (1, 1, dd))
    D = OPENPHENOM_DECODER
    ignore: tuple[str, ...] = ()
    if cfg.decoder == "channel_agnostic":
        nc = cfg.decoder_channels
        out["decoder_pred"] = _linear(r, OPENPHENOM_PRED[:-1], dd, p * p)
        out["modality_tokens"] = np.concatenate(
            [r.take(f"{D}modality_tokens.{c}", (1, 1, dd))[0] for c in range(nc)], axis=0)
        for name in ("query_norm", "context_norm", "out_norm"):
            out[name] = _norm(r, D + name, dd)
        out["cross_attn"] = {"q": _linear(r, D + "cross_attention.q", dd, dd, bias=False),
                             "kv": _linear(r, D + "cross_attention.kv", dd, 2 * dd, bias=False),
                             "proj": _linear(r, D + "cross_attention.proj", dd, dd)}
        out["decoder_mlp"] = {"fc1": _linear(r, D + "mlp.fc1", dd, mlp), "fc2": _linear(r, D + "mlp.fc2", mlp, dd)}
        out["decoder_blocks"] = _stack([_prenorm_block(r, f"{D}decoders.{c}.{i}", dd, cfg.decoder_heads, mlp)
                                        for c in range(nc) for i in range(cfg.decoder_depth)])
        r.check_table(D + "pos_embeddings", sincos_2d(g, g, dd, cls_row=True, repeat=nc))
        ignore = (D + "placeholder",)   # constant zeros added to the decoder CLS token, which predicts nothing
    else:
        out["decoder_pred"] = _linear(r, OPENPHENOM_PRED[:-1], dd, p * p * enc.in_chans)
        out["decoder_blocks"] = _stack([_prenorm_block(r, f"{D}blocks.{i}", dd, cfg.decoder_heads, mlp)
                                        for i in range(cfg.decoder_depth)])
        out["decoder_norm"] = _norm(r, D + "norm", dd)
        r.check_table(D + "pos_embeddings", sincos_2d(g, g, dd, cls_row=True))
    r.finish(ignore)
    return out


def load_mae_weights(mae, sd: Mapping[str, np.ndarray], *, mlp_bias: str = "legacy",
                     source: str = "state dict") -> None:
    """Load an OpenPhenom-layout MAE state dict into an `MAE` in place (WeightsError on any mismatch)."""
    _apply(mae, mae_params_from_openphenom(sd, mae.cfg, mlp_bias=mlp_bias, source=source), source)


def encoder_to_timm(encoder, *, mlp_bias: str = "legacy", prefix: str = "") -> dict[str, np.ndarray]:
    """Our parallel-scaling `ViTEncoder` -> timm state dict (float32 numpy), including the fixed `pos_embed`.

    WeightsError when the biases cannot be expressed in the chosen `mlp_bias` semantics.
    """
    cfg = encoder.cfg
    if cfg.block != "parallel":
        raise WeightsError("encoder_to_timm: only parallel-scaling encoders are exported")
    if mlp_bias not in MLP_BIAS_MODES:
        raise WeightsError(f"mlp_bias={mlp_bias!r}: expected one of {MLP_BIAS_MODES}")
    s = nnx.to_pure_dict(nnx.state(encoder, nnx.Param))
    s = {k: v for k, v in s.items()}
    a = lambda x: np.asarray(x, np.float32)  # noqa: E731
    d, h = cfg.width, cfg.mlp_dim
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
        eff = np.concatenate([a(b[n])[i] for n in ("fc1_bias", "q_bias", "k_bias", "v_bias")])
        if mlp_bias == "legacy":
            if np.any(eff[:3 * d] != 0):
                raise WeightsError(f"encoder_to_timm: block {i} biases are not expressible as legacy mlp_bias "
                                   "(the first 3*width effective biases must be zero)")
            mb = eff[3 * d:]
        else:
            if np.any(eff[h:] != 0):
                raise WeightsError(f"encoder_to_timm: block {i} has q/k/v biases; not expressible with mlp_bias='new'")
            mb = eff[:h]
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
