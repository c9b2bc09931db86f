"""Architectures: the ViT encoder, the MAE built on it, and DINOv2 (no weight formats here: see `interop`).

    from vitally_jax.models import ViTEncoder, vit_config, self_standardize
    enc = ViTEncoder(vit_config("CA-S/16"), rngs=nnx.Rngs(0))
    out = enc(self_standardize(uint8_images))        # out["blocks"][p] for p in POOLINGS: (B, depth, D)

Modules: `vit` (encoder, configs, the scanned block stack), `mae` (decoder, loss), `dinov2`, `layers` (shared
building blocks and MAE masking), `preprocess` (self-standardisation). Names are imported on first use.
"""

from __future__ import annotations

from vitally_jax.lazy import lazy_names

_LAZY = {
    "ViTConfig": "vitally_jax.models.vit",
    "vit_config": "vitally_jax.models.vit",
    "ViTEncoder": "vitally_jax.models.vit",
    "POOLINGS": "vitally_jax.models.vit",
    "count_params": "vitally_jax.models.vit",
    "MAEConfig": "vitally_jax.models.mae",
    "mae_config": "vitally_jax.models.mae",
    "MAE": "vitally_jax.models.mae",
    "Dinov2Config": "vitally_jax.models.dinov2",
    "dinov2_config": "vitally_jax.models.dinov2",
    "Dinov2": "vitally_jax.models.dinov2",
    "random_masking": "vitally_jax.models.layers",
    "self_standardize": "vitally_jax.models.preprocess",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_names(__name__, _LAZY)
