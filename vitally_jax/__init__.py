"""vitally_jax: training, probing and benchmarking of foundation models of cell microscopy in JAX/Flax.

Public API (imported lazily so that `import vitally_jax` stays cheap):

- `load_encoder(path)`      -> (encoder module, model config) from an exported Orbax checkpoint
- `embed(...)`              -> per-block embeddings of images
- `align(...)`, `benchmark(...)` -> map alignment and whole-genome benchmarks
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "load_encoder": "vitally_jax.checkpoint",
    "embed": "vitally_jax.probe",
    "align": "vitally_jax.benchmarks",
    "benchmark": "vitally_jax.benchmarks",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vitally_jax' has no attribute {name!r}")
