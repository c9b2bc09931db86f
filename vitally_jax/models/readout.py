"""How an encoder is read out: pooling names and defaults, block selection, and the `Readout` an export records.

Defined with the models (below `embedding` and `checkpoint`, which both use it), so that an encoder export can
record the block search's choice and `vitally_jax.embed` can default to it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np

from vitally_jax.errors import ConfigError
from vitally_jax.models.vit import POOLINGS

# The poolings computed and stored by default (`embed`, `embed_screen`, tools/embed.py), and an encoder export's
# readout when none is given.
DEFAULT_POOLING = ("cls_norm", "mean")
# The single pooling the block search probes by default (`sweep_screen`, tools/probe_sweep.py) and the one a
# single-block table exports by default (tools/embed.py --export-pooling).
DEFAULT_PROBE_POOLING = "mean"


def select_blocks(blocks: Iterable[int] | None, depth: int) -> tuple[int, ...]:
    """Validated, sorted, unique 1-based block numbers; None means every block 1..depth."""
    if blocks is None:
        return tuple(range(1, depth + 1))
    out = sorted({int(b) for b in blocks})
    if not out or out[0] < 1 or out[-1] > depth:
        raise ConfigError(f"blocks: expected block numbers in 1..{depth}, got {list(blocks)}")
    return tuple(out)


def select_poolings(pooling: str | Sequence[str]) -> tuple[str, ...]:
    """Validated pooling names (a single name or a sequence)."""
    names = (pooling,) if isinstance(pooling, str) else tuple(pooling)
    bad = [p for p in names if p not in POOLINGS]
    if bad or not names:
        raise ConfigError(f"pooling: expected names from {POOLINGS}, got {list(names)}")
    return tuple(dict.fromkeys(names))


@dataclasses.dataclass(frozen=True)
class Readout:
    """The blocks and poolings an encoder is read out at (`embed`'s defaults for an encoder that carries one).

    Set by `vitally_jax.load_encoder` as `encoder.readout` from the export's recorded readout."""

    blocks: tuple[int, ...]
    pooling: tuple[str, ...]

    def as_dict(self) -> dict[str, tuple]:
        return {"blocks": self.blocks, "pooling": self.pooling}


def make_readout(
    depth: int, blocks: int | Iterable[int] | None = None, pooling: str | Sequence[str] | None = None
) -> Readout:
    """Validated readout of an encoder of `depth` blocks. Defaults: every block, `DEFAULT_POOLING`."""
    blocks = None if blocks is None else (blocks,) if isinstance(blocks, (int, np.integer)) else blocks
    return Readout(select_blocks(blocks, depth), select_poolings(DEFAULT_POOLING if pooling is None else pooling))
