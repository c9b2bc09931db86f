"""Input self-standardisation, as the reference models were trained.

x = uint8 / 255; per image and channel over H x W: y = (x - mean) / sqrt(biased var + 1e-5) (eps after /255,
two-pass variance). The MAE reconstruction target is y itself.

The sums run on d = x - x[first pixel] of each image and channel, each as two reductions (over W, then over
H). Mean and variance are shift-invariant and the mean of equal-length row means is the mean, so this is the same
formula; only float32 rounding differs, and it is smaller: the summed values are small and the rounding of a
two-level sum grows with H + W rather than H * W. `tests/test_models.py` asserts agreement with a float64
two-pass reference to 2e-5 and `tests/test_goldens.py` with the PyTorch goldens to 1e-5. A constant channel
gives d = 0 exactly, every sum of zeros is 0 in any order, so its output is exactly 0. (Summing x itself, the mean of a
constant channel is the constant only up to the rounding of a float32 sum whose order XLA picks per instruction
set, and that error is then divided by sqrt(1e-5).)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vitally_jax.errors import DataError

EPS = 1e-5


def self_standardize(x: jax.Array, eps: float = EPS) -> jax.Array:
    """(B, H, W, C) uint8 (or float already in [0, 1]) -> float32 standardised per image and channel.

    A constant channel comes out exactly 0 (0 / sqrt(eps)) on every backend and instruction set."""
    if x.ndim != 4:
        raise DataError(f"images: expected shape (B, H, W, C), got {tuple(x.shape)}")
    if x.dtype == jnp.uint8:
        x = x.astype(jnp.float32) / 255.0
    else:
        x = x.astype(jnp.float32)
    d = x - x[:, :1, :1, :]  # exactly 0 for a constant channel (see the module docstring)
    d = d - _mean_hw(d)
    return d / jnp.sqrt(_mean_hw(jnp.square(d)) + eps)


def _mean_hw(v: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, 1, 1, C): the mean over W, then over H (equal to the mean over H x W)."""
    return jnp.mean(jnp.mean(v, axis=2, keepdims=True), axis=1, keepdims=True)
