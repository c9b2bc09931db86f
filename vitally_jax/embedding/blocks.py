"""Every block's pooled embedding in one jitted forward pass.

The encoder's layer scan pools every block's output as it goes (CLS token and mean of patch tokens, each with and
without the final LayerNorm), so one pass yields all blocks while memory stays O(blocks x batch x width): full token
activations are never kept. This module wraps that pass in a separately jitted function over split NNX state:

    (state, images uint8 (B, H, W, C)) -> {pooling: (B, nb, D) float32}

with self-standardisation on the device, the batch sharded over the mesh's ('data', 'fsdp') axes, and a block
subset (the pass runs up to the deepest requested block only).

Blocks are numbered from 1: block b is the output after b transformer blocks, the same as the encoder truncated to
b blocks (`num_blocks=b`), and b = depth is the final block.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vitally_jax.errors import ConfigError, DataError
from vitally_jax.models import POOLINGS
from vitally_jax.models.readout import (
    DEFAULT_POOLING,
    DEFAULT_PROBE_POOLING,
    Readout,
    make_readout,
    select_blocks,
    select_poolings,
)

__all__ = [  # the readout names are defined with the models and re-exported here, where users embed
    "DEFAULT_POOLING",
    "DEFAULT_PROBE_POOLING",
    "POOLINGS",
    "BlockExtractor",
    "Readout",
    "embed",
    "encoder_depth",
    "make_extractor",
    "make_readout",
    "select_blocks",
    "select_poolings",
    "trim_encoder",
]


def encoder_depth(encoder) -> int:
    """Number of transformer blocks of an encoder."""
    return int(encoder.cfg.depth)


def _forward(graphdef, state, images, *, blocks: tuple[int, ...], poolings: tuple[str, ...], micro: int = 0):
    """images uint8 (B, H, W, C) -> {pooling: (B, len(blocks), D)} float32.

    micro > 0 (a divisor of B): the batch runs as B // micro sequential slices of `micro` crops inside the one
    compiled program (`lax.map`), each the same computation on fewer rows (see `cpu_micro_batch`)."""
    from vitally_jax.models.preprocess import self_standardize

    encoder = nnx.merge(graphdef, state)
    idx = np.asarray(blocks, dtype=np.int32) - 1
    contiguous = tuple(idx) == tuple(range(max(blocks)))

    def one(imgs):
        out = encoder(self_standardize(imgs), num_blocks=max(blocks))
        return {p: (out["blocks"][p] if contiguous else out["blocks"][p][:, idx]).astype(jnp.float32) for p in poolings}

    b = images.shape[0]
    if not micro or micro >= b:
        return one(images)
    out = jax.lax.map(one, images.reshape((b // micro, micro) + images.shape[1:]))
    return {p: v.reshape((b,) + v.shape[2:]) for p, v in out.items()}


_forward_jit = jax.jit(_forward, static_argnames=("graphdef", "blocks", "poolings", "micro"))

# XLA:CPU runs the every-block pass fastest when one slice holds about this many token rows (crops x tokens per
# crop), so that a block's activations stay in the cache: 32 crops of S/16 at 128 px (65 tokens), 8 at 256 px.
# `python tools/perf/bench_embed.py` times the sliced pass beside the whole-batch one (`--whole_batch_too=1`).
CPU_SLICE_ROWS = 2176


def cpu_micro_batch(batch: int, tokens: int, rows: int = CPU_SLICE_ROWS) -> int:
    """The slice size `_forward` uses on CPU: the largest divisor of `batch` with divisor x `tokens` <= `rows`
    (0 = the whole batch at once, when it already fits or no divisor >= 2 does)."""
    if batch * tokens <= rows:
        return 0
    best = max(d for d in range(1, batch + 1) if batch % d == 0 and d * tokens <= rows) if tokens <= rows else 1
    return best if best >= 2 else 0


@dataclasses.dataclass
class BlockExtractor:
    """A jitted every-block embedding function bound to one encoder's state.

    `extractor(images)` maps a uint8 batch (B, H, W, C) to {pooling: (B, nb, D)} jax arrays.
    B must be a multiple of `batch_multiple` (the mesh's data x fsdp size) when a mesh is given.
    `micro_batch`: "auto" (on a CPU backend without a mesh, slices of `cpu_micro_batch` crops; elsewhere the whole
    batch), 0 (the whole batch) or a number of crops per slice (a divisor of the batch).
    """

    graphdef: object
    state: object
    blocks: tuple[int, ...]
    poolings: tuple[str, ...]
    mesh: jax.sharding.Mesh | None = None
    patch: int = 16
    channel_agnostic: bool = False
    micro_batch: int | str = "auto"

    @property
    def batch_multiple(self) -> int:
        from vitally_jax.sharding import data_parallel_size

        return 1 if self.mesh is None else data_parallel_size(self.mesh)

    def tokens(self, shape) -> int:
        """Tokens per crop (with the CLS token) for a batch of this shape (B, H, W, C)."""
        _, h, w, c = shape
        return (h // self.patch) * (w // self.patch) * (c if self.channel_agnostic else 1) + 1

    def slice_size(self, shape) -> int:
        """Crops per slice of one forward pass for a batch of this shape (0 = the whole batch)."""
        m = self.micro_batch
        if m == "auto":
            if self.mesh is not None or jax.default_backend() != "cpu":
                return 0
            return cpu_micro_batch(int(shape[0]), self.tokens(shape))
        m = int(m)
        if m and (shape[0] % m or self.mesh is not None):
            raise ConfigError(
                f"micro_batch {m}: expected a divisor of the batch ({shape[0]}) and no mesh; use 'auto' or 0"
            )
        return m

    def __call__(self, images) -> dict[str, jax.Array]:
        kw = dict(blocks=self.blocks, poolings=self.poolings, micro=self.slice_size(images.shape))
        if self.mesh is None:
            return _forward_jit(self.graphdef, self.state, images, **kw)
        from vitally_jax.sharding import batch_sharding

        images = jax.device_put(images, batch_sharding(self.mesh))
        with jax.set_mesh(self.mesh):
            return _forward_jit(self.graphdef, self.state, images, **kw)


def make_extractor(
    encoder,
    *,
    blocks: Iterable[int] | None = None,
    pooling: str | Sequence[str] = DEFAULT_POOLING,
    mesh: jax.sharding.Mesh | None = None,
    micro_batch: int | str = "auto",
) -> BlockExtractor:
    """Split `encoder` and bind the jitted per-block function (`micro_batch`: see `BlockExtractor`).

    With a mesh, parameters not yet placed on it are sharded by `vitally_jax.sharding.param_shardings`.
    """
    blocks_t = select_blocks(blocks, encoder_depth(encoder))
    poolings = select_poolings(pooling)
    graphdef, state = nnx.split(encoder)
    if mesh is not None:
        from vitally_jax.sharding import param_shardings

        def place(a, sh):
            cur = getattr(a, "sharding", None)
            on_mesh = isinstance(cur, jax.sharding.NamedSharding) and cur.mesh == mesh
            return a if on_mesh else jax.device_put(a, sh)

        state = jax.tree.map(place, state, param_shardings(state, mesh))
    cfg = getattr(encoder, "cfg", None)
    patch, agnostic = int(getattr(cfg, "patch_size", 16)), bool(getattr(cfg, "channel_agnostic", False))
    return BlockExtractor(graphdef, state, blocks_t, poolings, mesh, patch, agnostic, micro_batch)


def _check_images(images) -> np.ndarray:
    if images.ndim != 4:
        raise DataError(f"images: expected a (N, H, W, C) array, got shape {tuple(images.shape)}")
    if images.dtype != np.uint8:
        raise DataError(f"images: expected dtype uint8 (raw pixels), got {images.dtype}")
    return images


def padded_step(extractor: BlockExtractor, batch_size: int) -> int:
    """`batch_size` rounded up to a multiple of the extractor's mesh batch size."""
    m = extractor.batch_multiple
    return int(math.ceil(max(1, int(batch_size)) / m) * m)


def run_padded(extractor: BlockExtractor, batch: np.ndarray, step: int) -> dict[str, np.ndarray]:
    """One batch (b <= step, H, W, C) uint8, padded with zero images to `step` rows -> {pooling: (b, nb, D)}."""
    real = batch.shape[0]
    if real < step:
        batch = np.concatenate([batch, np.zeros((step - real,) + batch.shape[1:], np.uint8)])
    out = extractor(batch)
    return {p: np.asarray(out[p])[:real] for p in extractor.poolings}


def embed_batches(extractor: BlockExtractor, images: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    """Run `extractor` over images (N, H, W, C) uint8 in fixed-size batches -> {pooling: (N, nb, D) float32}.

    The last batch is padded to the batch size (one compiled shape); padded rows are dropped.
    """
    images = _check_images(images)
    if images.shape[0] == 0:
        raise DataError("images: got an empty array (N = 0)")
    step = padded_step(extractor, batch_size)
    parts: dict[str, list[np.ndarray]] = {p: [] for p in extractor.poolings}
    for start in range(0, images.shape[0], step):
        out = run_padded(extractor, np.asarray(images[start : start + step]), step)
        for p in extractor.poolings:
            parts[p].append(out[p])
    return {p: np.concatenate(v, axis=0) for p, v in parts.items()}


def embed(
    encoder,
    images,
    *,
    blocks: Iterable[int] | None = None,
    pooling: str | Sequence[str] | None = None,
    batch_size: int = 64,
    mesh: jax.sharding.Mesh | None = None,
) -> dict[str, np.ndarray]:
    """Pooled embeddings of every requested block for a stack of crops, in one forward pass per batch.

    Args:
      encoder: a `ViTEncoder` (NNX module).
      images: (N, H, W, C) uint8 crops at the encoder's input size.
      blocks: 1-based block numbers (default: the encoder's readout blocks when it carries a `readout`, as
        one from `vitally_jax.load_encoder` does; else all blocks 1..depth).
      pooling: names from `POOLINGS`: 'cls', 'cls_norm', 'mean', 'mean_norm' (default: the encoder's readout
        pooling when it carries one; else `DEFAULT_POOLING`).
      batch_size: crops per forward pass (rounded up to a multiple of the mesh's data x fsdp size).
      mesh: optional mesh; the batch is sharded over ('data', 'fsdp').

    Returns:
      {pooling: (N, len(blocks), D) float32 numpy array}; entry [:, i] is block `sorted(blocks)[i]`.
    """
    readout = getattr(encoder, "readout", None)
    if readout is not None:
        blocks = readout.blocks if blocks is None else blocks
        pooling = readout.pooling if pooling is None else pooling
    pooling = DEFAULT_POOLING if pooling is None else pooling
    extractor = make_extractor(encoder, blocks=blocks, pooling=pooling, mesh=mesh)
    return embed_batches(extractor, np.asarray(images), batch_size)


def trim_encoder(encoder, num_blocks: int):
    """The encoder cut to its first `num_blocks` blocks (final LayerNorm kept): a new module with depth b.

    Its every-block outputs equal the first b blocks of the full encoder; its final block equals block b.
    """
    from vitally_jax.checkpoint import trim_encoder_state

    depth = encoder_depth(encoder)
    if not 1 <= int(num_blocks) <= depth:
        raise ConfigError(f"trim: expected a block number in 1..{depth}, got {num_blocks}")
    cfg = dataclasses.replace(encoder.cfg, depth=int(num_blocks))
    abstract = nnx.eval_shape(lambda: type(encoder)(cfg, rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(abstract)
    return nnx.merge(graphdef, trim_encoder_state(nnx.state(encoder), depth, int(num_blocks)))
