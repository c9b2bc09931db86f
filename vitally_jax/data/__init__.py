"""Data: image stores, input pipelines, the synthetic screen, importers of real screens, channel names.

    from vitally_jax.data import ImageStore, generate_screen, import_rxrx, train_dataset
    generate_screen("screens/tiny", "tiny")          # a synthetic screen with known biology
    store = ImageStore.open("screens/tiny")          # images (N, H, W, C) uint8 + a metadata table
    ds = train_dataset(store, crop=256, global_batch=64, seed=0)

Modules: `store` (the zarr + Parquet image store), `pipeline` (Grain training crops and inference tiles),
`synthetic` (the embedded default world), `render` (Cell Painting rendering), `importers` (RxRx, JUMP),
`channels` (the canonical channel order). Names are imported on first use (the pipeline pulls in Grain).
"""

from __future__ import annotations

from vitally_jax.lazy import lazy_names

_LAZY = {
    "ImageStore": "vitally_jax.data.store",
    "write_store": "vitally_jax.data.store",
    "metadata_frame": "vitally_jax.data.store",
    "normalize_metadata": "vitally_jax.data.store",
    "METADATA_COLUMNS": "vitally_jax.data.store",
    "train_dataset": "vitally_jax.data.pipeline",
    "global_batches": "vitally_jax.data.pipeline",
    "inference_tiles": "vitally_jax.data.pipeline",
    "tiles_per_image": "vitally_jax.data.pipeline",
    "SyntheticConfig": "vitally_jax.data.synthetic",
    "PRESETS": "vitally_jax.data.synthetic",
    "preset": "vitally_jax.data.synthetic",
    "generate_screen": "vitally_jax.data.synthetic",
    "Renderer": "vitally_jax.data.render",
    "composite_rgb": "vitally_jax.data.render",
    "save_montage": "vitally_jax.data.render",
    "import_rxrx": "vitally_jax.data.importers",
    "import_jump": "vitally_jax.data.importers",
    "CANONICAL": "vitally_jax.data.channels",
    "canonical_name": "vitally_jax.data.channels",
    "conform": "vitally_jax.data.channels",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_names(__name__, _LAZY)
