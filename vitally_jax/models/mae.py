"""Masked autoencoder: random masking with injected noise, standard or channel-agnostic decoder, MAE loss.

    cfg = mae_config("L/8")                          # decoder 8 blocks x 512 x 16 heads
    mae = MAE(cfg, rngs=nnx.Rngs(0))
    out = mae(x, noise=jax.random.uniform(key, (B, L)))   # L = C*g*g for channel-agnostic models
    out["loss"], out["loss_rec"], out["loss_fourier"], out["pred"], out["target"], out["mask"], out["latent"]

`pred`/`target` are (B, L, p*p*C) for the standard decoder and (B, C*g*g, p*p) (one channel per token,
channel-major) for the channel-agnostic one. Loss = (1 - a) * masked MSE + a * Fourier L1, a = 0.01; the Fourier
term (`MAEConfig.fourier`): 'reference' = mean over all tokens of the reference's raw-reshape FFT L1, 'masked' = the
same averaged over the masked tokens only (OpenPhenom's `mask_fourier_loss=True`), 'image' = FFT of whole images.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from vitally_jax import sharding
from vitally_jax.errors import ConfigError
from vitally_jax.models import layers
from vitally_jax.models.vit import ViTConfig, ViTEncoder, make_stack, run_stack, vit_config


@dataclasses.dataclass(frozen=True)
class MAEConfig:
    """MAE = encoder config + decoder and loss settings."""

    encoder: ViTConfig
    decoder: str = "standard"  # 'standard' | 'channel_agnostic' (OpenPhenom)
    decoder_width: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    decoder_mlp_ratio: float = 4.0
    decoder_eps: float = 1e-6
    decoder_channels: int = 6  # channel-agnostic: number of per-channel decoder stacks
    cross_attn_heads: int = 8  # channel-agnostic cross-attention heads
    mask_ratio: float = 0.75
    fourier_weight: float = 0.01
    # 'reference' (raw reshape, mean over all tokens: bit-compatible) | 'masked' (the same FFT L1 averaged over the
    # masked tokens only: OpenPhenom's default mask_fourier_loss=True) | 'image' (FFT of the unpatchified image)
    fourier: str = "reference"
    # per-patch normalised reconstruction targets (the MAE paper's norm_pix_loss): each target patch (per channel
    # for the channel-agnostic decoder) is standardised by its own mean and variance before the masked MSE
    norm_pix_loss: bool = False

    def __post_init__(self):
        check_mae_config(self)  # every construction, incl. dataclasses.replace, is validated


FOURIER_MODES = ("reference", "masked", "image")


def check_mae_config(cfg: MAEConfig) -> MAEConfig:
    """Raise one `ConfigError` line naming the field if `cfg`'s MAE options are invalid; returns `cfg`.

    Every path that builds an `MAEConfig` (`mae_config`, the training config, the OpenPhenom loader) runs it."""
    if cfg.decoder not in ("standard", "channel_agnostic"):
        raise ConfigError(f"model.decoder: {cfg.decoder!r}; expected 'standard' or 'channel_agnostic'")
    if (cfg.decoder == "channel_agnostic") != cfg.encoder.channel_agnostic:
        raise ConfigError("model.decoder: the channel-agnostic decoder needs a channel-agnostic encoder and vice versa")
    if cfg.fourier not in FOURIER_MODES:
        raise ConfigError(f"model.fourier: {cfg.fourier!r}; expected one of {', '.join(map(repr, FOURIER_MODES))}")
    if not 0.0 < cfg.mask_ratio < 1.0:
        raise ConfigError(f"model.mask_ratio: {cfg.mask_ratio}; expected 0 < ratio < 1")
    if cfg.decoder_width % cfg.decoder_heads or cfg.decoder_width % 4:
        raise ConfigError(f"model.decoder_width {cfg.decoder_width}: must be divisible by 4 and by decoder_heads")
    if cfg.decoder == "channel_agnostic" and cfg.decoder_width % cfg.cross_attn_heads:
        raise ConfigError(
            f"model.cross_attn_heads {cfg.cross_attn_heads}: must divide decoder_width {cfg.decoder_width}"
        )
    return cfg


def mae_config(variant: str, **overrides) -> MAEConfig:
    """MAE config for a variant; keys of `ViTConfig` in `overrides` go to the encoder, the rest to the MAE."""
    enc_fields = {f.name for f in dataclasses.fields(ViTConfig)}
    mae_fields = {f.name for f in dataclasses.fields(MAEConfig)} - {"encoder"}
    bad = sorted(set(overrides) - enc_fields - mae_fields)
    if bad:
        raise ConfigError(f"model: unknown MAE option(s) {bad}")
    enc = vit_config(variant, **{k: v for k, v in overrides.items() if k in enc_fields})
    base: dict = {}
    if enc.channel_agnostic:
        base.update(decoder="channel_agnostic", decoder_eps=1e-5)
    if variant.split("/")[0].endswith("mu"):
        base.update(decoder_width=32, decoder_depth=2, decoder_heads=2, cross_attn_heads=2, decoder_channels=3)
    base.update({k: v for k, v in overrides.items() if k in mae_fields})
    return MAEConfig(encoder=enc, **base)  # checked by check_mae_config in __post_init__


# ------------------------------------------------------------------------------------------------------------------
# Loss (pure functions)
# ------------------------------------------------------------------------------------------------------------------


def masked_mse(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """sum_t mask_t * mean_k (pred - target)^2 / sum_t mask_t. pred/target (B, L, K), mask (B, L)."""
    per_token = jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), axis=-1)
    return jnp.sum(per_token * mask) / jnp.sum(mask)


def normalize_patches(target: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Standardise every target patch (B, L, K) by its own mean and variance over K (norm_pix_loss)."""
    t = target.astype(jnp.float32)
    mean = jnp.mean(t, axis=-1, keepdims=True)
    var = jnp.var(t, axis=-1, keepdims=True)
    return (t - mean) / jnp.sqrt(var + eps)


def _reference_shape(shape: tuple[int, int, int], modalities: int, mode: str) -> tuple[int, int, int, int]:
    b, n, k = shape
    s = math.isqrt(n // modalities)
    if s * s * modalities != n:
        raise ConfigError(f"fourier={mode!r} needs L/M square: L={n}, M={modalities}; use fourier='image'")
    return (b, k * modalities, s, s)


def fourier_reference(pred: jax.Array, target: jax.Array, modalities: int) -> jax.Array:
    """Reference Fourier L1: raw row-major reshape (B, L, K) -> (B, K*M, s, s), s = sqrt(L/M), |FFT2| L1 mean."""
    shape = _reference_shape(pred.shape, modalities, "reference")
    return _fourier_l1(pred.reshape(shape), target.reshape(shape), axes=(2, 3))


def fourier_masked(pred: jax.Array, target: jax.Array, mask: jax.Array, modalities: int) -> jax.Array:
    """OpenPhenom's masked Fourier L1 (`mask_fourier_loss=True`): the element-wise | |FFT2| - |FFT2| | of
    `fourier_reference` (on the raw reshape (B, K*M, s, s)), reshaped back to tokens (B, L, K) the same raw way,
    averaged over K, then over the masked tokens: sum_t mask_t * mean_k F_tk / sum_t mask_t. mask (B, L)."""
    shape = _reference_shape(pred.shape, modalities, "masked")
    per_elem = _fourier_diff(pred.reshape(shape), target.reshape(shape), axes=(2, 3))
    per_token = jnp.mean(per_elem.reshape(pred.shape), axis=-1)
    return jnp.sum(per_token * mask) / jnp.sum(mask)


def _fourier_diff(pred: jax.Array, target: jax.Array, axes: tuple[int, int]) -> jax.Array:
    """| |FFT2(pred)| - |FFT2(target)| | element-wise over `axes`, in float32. The FFTs run shard by shard over
    the batch: left to XLA's SPMD partitioner they are replicated over the whole global batch on every device
    (per-device memory then grows with the device count: +2 GiB per crop at 256 devices for L/8)."""

    def diff(p, t):
        return jnp.abs(jnp.abs(jnp.fft.fft2(p, axes=axes)) - jnp.abs(jnp.fft.fft2(t, axes=axes)))

    return sharding.map_batch_shards(diff, pred.astype(jnp.float32), target.astype(jnp.float32))


def _fourier_l1(pred: jax.Array, target: jax.Array, axes: tuple[int, int]) -> jax.Array:
    """mean | |FFT2(pred)| - |FFT2(target)| | over every element (see `_fourier_diff`)."""
    return jnp.mean(_fourier_diff(pred, target, axes))


def fourier_image(pred_img: jax.Array, target_img: jax.Array) -> jax.Array:
    """Fourier L1 of whole images (B, H, W, C): mean | |FFT2(pred)| - |FFT2(target)| | over H, W per channel."""
    return _fourier_l1(pred_img, target_img, axes=(1, 2))


# ------------------------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------------------------


class MAE(nnx.Module):
    """Encoder + decoder. Standard decoder params: `decoder_embed`, `mask_token`, `decoder_blocks` (stacked),
    `decoder_norm`, `decoder_pred`.

    Channel-agnostic decoder (OpenPhenom CAMAEDecoder): per-channel `modality_tokens` (decoder_channels, Dd) are
    added to the patch tokens; for each channel c, z = cross_attn(query_norm(tokens_c), context_norm(all patch
    tokens)) (no residual), z = z + decoder_mlp(out_norm(z)), then channel c's own block stack (`decoder_blocks`
    holds decoder_channels x decoder_depth blocks, channel-major); no final norm; `decoder_pred` -> p*p.
    The decoder CLS token takes no part in the prediction."""

    def __init__(self, cfg: MAEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        enc = cfg.encoder
        dt = jnp.dtype(enc.dtype)
        dd = cfg.decoder_width
        self.ca = cfg.decoder == "channel_agnostic"
        self.encoder = ViTEncoder(enc, rngs=rngs)
        self.decoder_embed = layers.Linear(enc.width, dd, dtype=dt, rngs=rngs)
        self.mask_token = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, 1, dd), jnp.float32))
        mlp = int(dd * cfg.decoder_mlp_ratio)

        def ctor(r):
            return layers.PreNormBlock(
                dd,
                cfg.decoder_heads,
                mlp,
                eps=cfg.decoder_eps,
                qkv_bias=True,
                init_values=None,
                dtype=dt,
                attention_impl=enc.attention_impl,
                rngs=r,
            )

        p = enc.patch_size
        if self.ca:
            eps = cfg.decoder_eps
            self.modality_tokens = nnx.Param(
                0.02 * jax.random.normal(rngs.params(), (cfg.decoder_channels, dd), jnp.float32)
            )
            self.query_norm = layers.LayerNorm(dd, eps)
            self.context_norm = layers.LayerNorm(dd, eps)
            self.cross_attn = layers.CrossAttention(
                dd, cfg.cross_attn_heads, dtype=dt, attention_impl=enc.attention_impl, rngs=rngs
            )
            self.out_norm = layers.LayerNorm(dd, eps)
            self.decoder_mlp = layers.Mlp(dd, mlp, dtype=dt, rngs=rngs)
            self.decoder_blocks = make_stack(ctor, cfg.decoder_channels * cfg.decoder_depth, rngs)
            self.decoder_norm = None
            self.decoder_pred = layers.Linear(dd, p * p, dtype=dt, rngs=rngs)
        else:
            self.decoder_blocks = make_stack(ctor, cfg.decoder_depth, rngs)
            self.decoder_norm = layers.LayerNorm(dd, cfg.decoder_eps)
            self.decoder_pred = layers.Linear(dd, p * p * enc.in_chans, dtype=dt, rngs=rngs)

    def decode(self, latent: jax.Array, ids_restore: jax.Array, grid: tuple[int, int], chans: int) -> jax.Array:
        """latent (B, 1+K, De), ids_restore (B, L) -> prediction without CLS: (B, L, p*p*C) or CA (B, L, p*p)."""
        cfg = self.cfg
        y = self.decoder_embed(latent)
        b, n = ids_restore.shape
        dd = y.shape[-1]
        mt = jnp.broadcast_to(self.mask_token[...].astype(y.dtype), (b, n + 1 - y.shape[1], dd))
        body = jnp.concatenate([y[:, 1:], mt], axis=1)
        body = jnp.take_along_axis(body, ids_restore[..., None], axis=1)
        reps = chans if self.ca else 1
        pos = layers.sincos_2d(grid[0], grid[1], dd, cls_row=True, repeat=reps)
        y = jnp.concatenate([y[:, :1], body], axis=1) + jnp.asarray(pos, y.dtype)
        if not self.ca:
            y, _ = run_stack(self.decoder_blocks, y, remat=cfg.encoder.remat)  # the encoder's remat policy
            return self.decoder_pred(self.decoder_norm(y))[:, 1:]
        if chans > cfg.decoder_channels:
            raise ConfigError(
                f"images have {chans} channels; this channel-agnostic decoder has {cfg.decoder_channels} channel stacks"
            )
        t = grid[0] * grid[1]
        mod = jnp.repeat(self.modality_tokens[...][:chans].astype(y.dtype), t, axis=0)
        patches = y[:, 1:] + mod[None]
        ctx = self.context_norm(patches)
        # channels in parallel: shared cross-attention + MLP, then each channel's own block stack
        graphdef, state = nnx.split(self.decoder_blocks)
        depth = cfg.decoder_depth
        state = jax.tree.map(lambda a: a.reshape((cfg.decoder_channels, depth) + a.shape[1:])[:chans], state)
        queries = jnp.moveaxis(patches.reshape(b, chans, t, dd), 1, 0)  # (C, B, T, Dd)

        def one_channel(q, st):
            z = self.cross_attn(self.query_norm(q), ctx)
            z = z + self.decoder_mlp(self.out_norm(z))
            z, _ = run_stack(nnx.merge(graphdef, st), z, remat=cfg.encoder.remat)
            return z

        z = jax.vmap(one_channel)(queries, state)  # (C, B, T, Dd)
        return self.decoder_pred(jnp.moveaxis(z, 0, 1).reshape(b, chans * t, dd))

    def __call__(self, x: jax.Array, *, noise: jax.Array, drop_key: jax.Array | None = None) -> dict:
        """x: (B, H, W, C) self-standardised; noise: (B, L) U[0,1). Returns loss terms, pred, target, mask, latent."""
        cfg = self.cfg
        p = cfg.encoder.patch_size
        b, h, w, c = x.shape
        grid = (h // p, w // p)
        latent, mask, ids_restore = self.encoder.encode_masked(x, noise, cfg.mask_ratio, drop_key)
        pred = self.decode(latent, ids_restore, grid, c).astype(jnp.float32)
        target = layers.patchify_channels(x, p) if self.ca else layers.patchify(x, p)
        if cfg.norm_pix_loss:
            target = normalize_patches(target)
        loss_rec = masked_mse(pred, target, mask)
        if cfg.fourier == "reference":
            loss_ft = fourier_reference(pred, target, c if self.ca else 1)
        elif cfg.fourier == "masked":
            loss_ft = fourier_masked(pred, target, mask, c if self.ca else 1)
        else:
            unpatch = layers.unpatchify_channels if self.ca else layers.unpatchify
            loss_ft = fourier_image(unpatch(pred, p, grid, c), x)
        a = cfg.fourier_weight
        loss = (1.0 - a) * loss_rec + a * loss_ft
        return {
            "loss": loss,
            "loss_rec": loss_rec,
            "loss_fourier": loss_ft,
            "pred": pred,
            "target": target,
            "mask": mask,
            "latent": latent,
        }
