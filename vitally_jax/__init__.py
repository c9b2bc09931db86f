"""vitally_jax: training, probing and benchmarking of foundation models of cell microscopy in JAX/Flax.

Public API (imported lazily so that `import vitally_jax` stays cheap):

- `load_encoder(path)`               -> (encoder, ViTConfig, readout) from an encoder export
- `embed(encoder, images, ...)`      -> every block's pooled embeddings of images, in one pass
- `embed_screen(encoder, store, out)` -> a resumable per-block embedding store of a whole screen
- `sweep_screen(encoder, store, out)` -> the linear-probe block search (b*) on a screen
- `curate(metadata, embeddings)`     -> a curated training index (Phenoprints-style)
- `align(...)`, `benchmark(...)`     -> map alignment and whole-genome benchmarks

Subpackages: `models` (architectures), `data` (stores, pipelines, synthetic screens, importers), `embedding`,
`probes`, `curation`, `benchmarks`, `interop` (PyTorch weight formats), `demo` (the embedded default).
"""

from __future__ import annotations

from vitally_jax.lazy import lazy_names

__version__ = "0.1.0"

_LAZY = {
    "load_encoder": "vitally_jax.checkpoint",
    "export_encoder": "vitally_jax.checkpoint",
    "embed": "vitally_jax.embedding.blocks",
    "embed_screen": "vitally_jax.embedding.screen",
    "sweep_screen": "vitally_jax.probes.sweep",
    "curate": "vitally_jax.curation.core",
    "curate_store": "vitally_jax.curation.core",
    "align": "vitally_jax.benchmarks",
    "benchmark": "vitally_jax.benchmarks",
}

__all__ = sorted(_LAZY) + ["__version__"]


__getattr__, __dir__ = lazy_names(__name__, _LAZY)
