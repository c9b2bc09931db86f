"""Input self-standardisation, as the reference models were trained.

x = uint8 / 255; per image and channel over H x W: y = (x - mean) / sqrt(biased var + 1e-5) (eps after /255,
two-pass variance). The MAE reconstruction target is y itself.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from vitally_jax.errors import DataError

EPS = 1e-5


def self_standardize(x: jax.Array, eps: float = EPS) -> jax.Array:
    """(B, H, W, C) uint8 (or float already in [0, 1]) -> float32 standardised per image and channel."""
    if x.ndim != 4:
        raise DataError(f"images: expected shape (B, H, W, C), got {tuple(x.shape)}")
    if x.dtype == jnp.uint8:
        x = x.astype(jnp.float32) / 255.0
    else:
        x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=(1, 2), keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=(1, 2), keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps)
