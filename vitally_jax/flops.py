"""Analytic FLOPs of the MAE (matmuls only, 2 FLOPs per multiply-add) for MFU estimates.

Conventions (as in PaLM / MFU accounting): backward = 2 x forward, so one training step costs 3 x forward;
recomputation by remat is NOT counted (MFU measures useful work). Softmax, norms, GELU and the Fourier loss are
left out (a few % at most).

Check against the paper: a G/8 encoder forward over 257 visible tokens is ~1 TFLOP per crop, over all 1,025
tokens ~4.1 TFLOP (`encoder_forward_flops(257, 1664, 48, 8192, ...)`).
"""

from __future__ import annotations


def parallel_block_flops(n: int, d: int, mlp: int) -> float:
    """One parallel-scaling encoder block on n tokens of width d: fused in-proj [mlp|q|k|v], attention
    (q k^T and a v), attention out-proj, MLP out-proj."""
    return 2.0 * n * d * (mlp + 3 * d) + 4.0 * n * n * d + 2.0 * n * d * d + 2.0 * n * mlp * d


def standard_block_flops(n: int, d: int, mlp: int) -> float:
    """One pre-norm transformer block (MAE decoder): qkv, attention, out-proj, 2-layer MLP."""
    return 2.0 * n * d * 3 * d + 4.0 * n * n * d + 2.0 * n * d * d + 4.0 * n * d * mlp


def encoder_forward_flops(
    tokens: int, width: int, depth: int, mlp: int, patch: int, in_chans: int, *, channel_agnostic: bool = False
) -> float:
    """Encoder forward on `tokens` tokens (incl. CLS) per image; the patch embedding runs on the visible
    patches only (tokens - 1). For channel-agnostic patching each token sees one channel (p*p inputs)."""
    per_token_in = patch * patch * (1 if channel_agnostic else in_chans)
    return 2.0 * (tokens - 1) * per_token_in * width + depth * parallel_block_flops(tokens, width, mlp)


def decoder_forward_flops(
    tokens: int,
    enc_width: int,
    dec_width: int,
    dec_depth: int,
    dec_mlp: int,
    patch: int,
    out_chans: int,
    *,
    channel_agnostic: bool = False,
    visible: int | None = None,
    num_channels: int = 1,
) -> float:
    """MAE decoder forward on all `tokens` (incl. CLS): projection of the visible latents, blocks, prediction.

    Channel-agnostic (OpenPhenom) decoder: a shared cross-attention + MLP over all tokens, then one block stack
    per channel over that channel's tokens (`tokens - 1` patches split into `num_channels` groups).
    """
    visible = tokens if visible is None else visible
    f = 2.0 * visible * enc_width * dec_width
    if not channel_agnostic:
        f += dec_depth * standard_block_flops(tokens, dec_width, dec_mlp)
        f += 2.0 * (tokens - 1) * dec_width * patch * patch * out_chans
        return f
    n = tokens - 1
    per_ch = n // max(num_channels, 1)
    f += 2.0 * n * dec_width * dec_width * 4 + 4.0 * n * n * dec_width  # cross-attention q, k, v, out
    f += 4.0 * n * dec_width * dec_mlp  # shared MLP
    f += num_channels * dec_depth * standard_block_flops(per_ch, dec_width, dec_mlp)
    f += 2.0 * n * dec_width * patch * patch
    return f


def mae_train_flops_per_image(
    *,
    num_patches: int,
    mask_ratio: float,
    width: int,
    depth: int,
    mlp: int,
    patch: int,
    in_chans: int,
    dec_width: int,
    dec_depth: int,
    dec_mlp: int,
    channel_agnostic: bool = False,
) -> float:
    """FLOPs of one MAE training step per image: 3 x (encoder on the visible tokens + decoder on all)."""
    visible = int(num_patches * (1 - mask_ratio)) + 1
    enc = encoder_forward_flops(visible, width, depth, mlp, patch, in_chans, channel_agnostic=channel_agnostic)
    dec = decoder_forward_flops(
        num_patches + 1,
        width,
        dec_width,
        dec_depth,
        dec_mlp,
        patch,
        in_chans if not channel_agnostic else 1,
        channel_agnostic=channel_agnostic,
        visible=visible,
        num_channels=in_chans,
    )
    return 3.0 * (enc + dec)


def measure_matmul_flops(n: int = 1024, repeats: int = 3) -> float:
    """Dense float32 matmul rate (FLOP/s) of one local device, measured now: the denominator of a CPU "MFU"."""
    import time

    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best
