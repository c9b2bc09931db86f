"""The paper's optimiser: Lion with a one-cycle cosine schedule (PyTorch `OneCycleLR` semantics).

Lion (optax.lion): p <- p * (1 - lr * wd) - lr * sign(b1 * m + (1 - b1) * g); m <- b2 * m + (1 - b2) * g.
The reference recipe drives it with PyTorch's `OneCycleLR(anneal_strategy='cos', three_phase=False)`:

- phase 1, steps 0 .. pct_start * T - 1: lr goes from peak / div_factor up to peak (cosine);
- phase 2, up to step T - 1: lr goes from peak down to peak / div_factor / final_div_factor (cosine);
- with `cycle_momentum`, b1 moves inversely: max_momentum -> base_momentum in phase 1, back in phase 2.

Optimiser step k (0-based) uses `lr(k)`, as PyTorch does when `scheduler.step()` follows `optimizer.step()`.
Weight decay applies to weight matrices only, chosen by parameter path (`decay_mask`), as the reference's
parameter groups do: never to biases, norms, LayerScale, tokens or position and channel embeddings.

Usage::

    tx, schedules = make_optimizer(config.optax, total_steps=config.total_steps)
    lr_at_step_10 = schedules["lr"](10)
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from vitally_jax.errors import ConfigError

Schedule = Callable[[jax.Array | int], jax.Array]


def _cos_anneal(start: float, end: float, remaining: jax.Array) -> jax.Array:
    """PyTorch `_annealing_cos` at pct = 1 - remaining: end + (start - end) / 2 * (1 + cos(pi * pct)).

    Computed as end + (start - end) * sin(pi * remaining / 2)**2 (the same value) with `remaining` measured
    from the phase end, which keeps float32 accurate near the end of the schedule where the lr is 1e4 times
    smaller than its peak.
    """
    return end + (start - end) * jnp.square(jnp.sin(0.5 * jnp.pi * remaining))


def _one_cycle(start: float, mid: float, end: float, total_steps: int, pct_start: float) -> Schedule:
    """Two cosine phases start -> mid -> end, phase boundaries as in PyTorch OneCycleLR."""
    if total_steps < 2:
        raise ConfigError(f"total_steps: expected >= 2 for a one-cycle schedule, got {total_steps}")
    if not 0.0 < pct_start < 1.0:
        raise ConfigError(f"optax.pct_start: expected a fraction in (0, 1), got {pct_start}")
    end1 = float(pct_start * total_steps) - 1.0
    end2 = float(total_steps - 1)
    if end1 <= 0.0 or end2 <= end1:
        raise ConfigError(
            f"optax.pct_start={pct_start} with total_steps={total_steps}: the warm-up must span at least 2 steps "
            "and leave at least one step of decay"
        )

    def schedule(step):
        s = jnp.asarray(step, jnp.float32)
        rem1 = jnp.clip((end1 - s) / end1, 0.0, 1.0)
        rem2 = jnp.clip((end2 - s) / (end2 - end1), 0.0, 1.0)
        return jnp.where(s <= end1, _cos_anneal(start, mid, rem1), _cos_anneal(mid, end, rem2))

    return schedule


def one_cycle_lr(
    peak: float, total_steps: int, *, pct_start: float = 0.1, div_factor: float = 25.0, final_div_factor: float = 1e4
) -> Schedule:
    """Learning rate of PyTorch OneCycleLR (cosine, two phases) as a function of the optimiser step."""
    initial = peak / div_factor
    return _one_cycle(initial, peak, initial / final_div_factor, total_steps, pct_start)


def one_cycle_b1(
    total_steps: int, *, pct_start: float = 0.1, base_momentum: float = 0.85, max_momentum: float = 0.95
) -> Schedule:
    """b1 of PyTorch OneCycleLR with `cycle_momentum=True`: max -> base during warm-up, base -> max after."""
    return _one_cycle(max_momentum, base_momentum, max_momentum, total_steps, pct_start)


# The last path component of every weight matrix: linear and patch-conv kernels, the parallel blocks' fused
# input projection. Everything else is a vector or a table the reference keeps out of weight decay: biases (incl.
# `mlp_bias`), LayerNorm scales and biases, LayerScale gammas, CLS / mask / register tokens, position and channel
# (modality) embeddings.
DECAYED_LEAVES = ("kernel", "in_proj")


def _key_name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def decays(path: tuple[str, ...]) -> bool:
    """Whether the parameter at `path` (names from the model root, e.g. ('encoder', 'blocks', 'in_proj')) gets
    weight decay: only weight matrices do."""
    return bool(path) and path[-1] in DECAYED_LEAVES


def decay_mask(params):
    """Weight decay by parameter path, not by rank: True on weight matrices (`DECAYED_LEAVES`), False on the rest.

    Rank cannot decide it: the blocks' biases, norms and LayerScale are stacked along the scan's layer axis
    (2-D), tokens are 3-D. This reproduces the reference's PyTorch parameter groups (timm's
    `param_groups_weight_decay` with the model's `no_weight_decay()` names: 1-D tensors, tokens and position
    tables get weight decay 0); `tests/test_decay_mask.py` compares every leaf with them.
    """

    def one(path, _):
        names = [_key_name(k) for k in path]
        if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and names[-1] == "value":
            names.pop()  # an nnx.Variable's array (nnx.Optimizer passes the model's Param variables)
        return decays(tuple(names))

    return jax.tree_util.tree_map_with_path(one, params)


def make_optimizer(cfg, total_steps: int) -> tuple[optax.GradientTransformation, dict[str, Schedule]]:
    """Build the optax transform from the `optax` config section.

    Keys used: name ("lion" | "adamw"), peak_lr, b1, b2, weight_decay (on weight matrices only, see `decay_mask`),
    decay_1d (bool: decay every parameter instead),
    pct_start, div_factor, final_div_factor, cycle_momentum, base_momentum, max_momentum, grad_clip_norm
    (None = no clipping), mu_dtype (None or a dtype name).

    Returns the transform and `{"lr": schedule, "b1": schedule}` for logging (b1 constant unless cycled).
    """
    if cfg.name not in ("lion", "adamw"):
        raise ConfigError(f"optax.name: expected 'lion' (the paper's optimiser) or 'adamw', got {cfg.name!r}")
    lr = one_cycle_lr(
        cfg.peak_lr,
        total_steps,
        pct_start=cfg.pct_start,
        div_factor=cfg.div_factor,
        final_div_factor=cfg.final_div_factor,
    )
    if cfg.cycle_momentum:
        b1 = one_cycle_b1(
            total_steps, pct_start=cfg.pct_start, base_momentum=cfg.base_momentum, max_momentum=cfg.max_momentum
        )
    else:
        b1_const = float(cfg.b1)
        b1 = lambda step: jnp.full((), b1_const, jnp.float32)  # noqa: E731
    # AdamW (the MAE paper's optimiser) takes ~3-10x Lion's learning rate; both decay weights decoupled (lr * wd)
    base = optax.lion if cfg.name == "lion" else optax.adamw
    lion = optax.inject_hyperparams(base, static_args=("mask", "mu_dtype"))(
        learning_rate=lr,
        b1=b1,
        b2=cfg.b2,
        weight_decay=cfg.weight_decay,
        mask=None if cfg.decay_1d else decay_mask,
        mu_dtype=None if cfg.mu_dtype is None else jnp.dtype(cfg.mu_dtype),
    )
    parts = []
    if cfg.grad_clip_norm is not None:
        if cfg.grad_clip_norm <= 0:
            raise ConfigError(f"optax.grad_clip_norm: expected a positive number or None, got {cfg.grad_clip_norm}")
        parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    parts.append(lion)
    return optax.chain(*parts), {"lr": lr, "b1": b1}
