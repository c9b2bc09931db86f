"""Images -> per-block features: the jitted every-block pass, whole-screen embedding stores, image statistics.

- `blocks`: `embed(encoder, images, ...)` and `BlockExtractor`, every block's pooled outputs in one pass.
- `screen`: `embed_screen` (resumable per-block embedding store on disk), `EmbeddingStore`, `well_features`,
  Parquet / AnnData exports.
- `image_stats`: the image-statistics baseline (per-channel statistics of every image of a store).
"""

from vitally_jax.embedding.blocks import BlockExtractor, embed, make_extractor
from vitally_jax.embedding.image_stats import image_statistics, store_image_statistics
from vitally_jax.embedding.screen import EmbeddingStore, embed_screen, export_anndata, export_parquet, well_features

__all__ = [
    "BlockExtractor",
    "EmbeddingStore",
    "embed",
    "embed_screen",
    "export_anndata",
    "export_parquet",
    "image_statistics",
    "make_extractor",
    "store_image_statistics",
    "well_features",
]
