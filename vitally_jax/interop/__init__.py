"""Import and export of public PyTorch weights: OpenPhenom / maes_microscopy, timm ViTs, DINOv2.

One module per external format holds both directions (key mapping, reading, export): `timm_vit`, `openphenom`,
`dinov2`. `readers` is the shared state-dict file I/O (and export metadata), `params` the flat-parameter helpers.

    from vitally_jax import interop
    enc = interop.load_timm_vit("vit.safetensors")                 # Recursion-style timm ViT, legacy mlp_bias
    mae = interop.load_openphenom("openphenom.safetensors")        # whole CA-MAE (encoder + decoder)
    enc = interop.load_openphenom_encoder("openphenom.safetensors")
    dino = interop.load_dinov2("dinov2_vitl14.pth")                 # timm or Meta layout (.pth needs torch)
    from vitally_jax.interop import export_timm_vit
    export_timm_vit("ours.safetensors", enc)                       # back to timm / PyTorch

Readers take `.safetensors` (no torch needed), `.pth`/`.pt`/`.bin`/`.ckpt` (torch, if installed) and `.npz`.
Mismatched files raise `vitally_jax.errors.WeightsError` with one line naming the missing, unexpected and wrongly
shaped keys. `tools/convert_weights.py` is the command-line front end.
"""

from __future__ import annotations

from vitally_jax.lazy import lazy_names

_LAZY = {
    "read_state_dict": "vitally_jax.interop.readers",
    "write_safetensors": "vitally_jax.interop.readers",
    "check_state_dict": "vitally_jax.interop.readers",
    "read_safetensors_metadata": "vitally_jax.interop.readers",
    "load_timm_vit": "vitally_jax.interop.timm_vit",
    "timm_vit_state_dict": "vitally_jax.interop.timm_vit",
    "export_timm_vit": "vitally_jax.interop.timm_vit",
    "timm_kwargs": "vitally_jax.interop.timm_vit",
    "config_from_timm_state": "vitally_jax.interop.timm_vit",
    "encoder_params_from_timm": "vitally_jax.interop.timm_vit",
    "load_encoder_weights": "vitally_jax.interop.timm_vit",
    "encoder_to_timm": "vitally_jax.interop.timm_vit",
    "load_openphenom": "vitally_jax.interop.openphenom",
    "load_openphenom_encoder": "vitally_jax.interop.openphenom",
    "openphenom_state_dict": "vitally_jax.interop.openphenom",
    "export_openphenom": "vitally_jax.interop.openphenom",
    "mae_params_from_openphenom": "vitally_jax.interop.openphenom",
    "load_mae_weights": "vitally_jax.interop.openphenom",
    "load_dinov2": "vitally_jax.interop.dinov2",
    "dinov2_state_dict": "vitally_jax.interop.dinov2",
    "export_dinov2": "vitally_jax.interop.dinov2",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_names(__name__, _LAZY)
