"""Checks of a training config's values, run before anything is compiled or written.

Every failed check is a `ConfigError` (exit code 3) whose message names the key, shows the value and says what
was expected, e.g. `config.optax.peak_lr: nan; expected a finite number > 0`.

    check_values(config)                  # numbers and their ranges, warm-up, crop vs patch, mask ratio vs tokens
    check_mesh(config, mesh)              # global batch vs the mesh's data x fsdp devices
    check_crop(config, (h, w), where)     # crop vs the store's image size

`python -m vitally_jax.main` runs `check_values` first, then (after multi-host start-up) `check_mesh` and
`check_store`, which reads the store's description (or the synthetic preset's image size); only then is the
workdir created. `train_and_evaluate` runs the same checks for library callers.
"""

from __future__ import annotations

import math
import numbers
import pathlib

from vitally_jax.errors import ConfigError

# (key, kind, optional). kind: "pos_int", "finite", or (low, low_inclusive, high, high_inclusive) for a finite
# number in that range (None = unbounded). optional: None is allowed (the key's "not set" value).
VALUE_CHECKS: tuple[tuple[str, object, bool], ...] = (
    ("total_steps", "pos_int", False),
    ("stop_after_steps", "pos_int", True),
    ("model.in_chans", "pos_int", False),
    ("model.mask_ratio", (0.0, False, 1.0, False), False),
    # the loss is (1 - a) * masked MSE + a * Fourier L1: a convex weight
    ("model.fourier_weight", (0.0, True, 1.0, True), False),
    ("model.drop_path_rate", (0.0, True, 1.0, False), False),
    ("model.init_values", "finite", True),
    ("model.width", "pos_int", True),
    ("model.depth", "pos_int", True),
    ("model.num_heads", "pos_int", True),
    ("model.mlp_dim", "pos_int", True),
    ("model.decoder_depth", "pos_int", True),
    ("model.decoder_width", "pos_int", True),
    ("model.decoder_heads", "pos_int", True),
    ("input.crop", "pos_int", False),
    ("input.global_batch", "pos_int", False),
    ("optax.peak_lr", (0.0, False, None, False), False),
    ("optax.div_factor", (0.0, False, None, False), False),  # initial lr = peak_lr / div_factor
    ("optax.final_div_factor", (0.0, False, None, False), False),  # final lr = initial lr / final_div_factor
    ("optax.pct_start", (0.0, False, 1.0, False), False),  # warm-up fraction of total_steps
    ("optax.weight_decay", (0.0, True, None, False), False),
    ("optax.b1", (0.0, True, 1.0, False), False),
    ("optax.b2", (0.0, True, 1.0, False), False),
    ("optax.base_momentum", (0.0, True, 1.0, False), False),
    ("optax.max_momentum", (0.0, True, 1.0, False), False),
    ("optax.grad_clip_norm", (0.0, False, None, False), True),
    ("checkpoint.every_steps", "pos_int", False),
    ("checkpoint.keep", "pos_int", False),
    ("log.every_steps", "pos_int", False),
    ("log.recon_every_steps", "pos_int", True),
    ("log.recon_images", "pos_int", False),
    ("log.peak_flops_per_device", (0.0, False, None, False), True),
)


def _show(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _lookup(config, key: str):
    """(found, value) of a dotted key; a key the config does not declare is (False, None)."""
    node = config
    for part in key.split("."):
        try:
            node = node[part]
        except (KeyError, AttributeError, TypeError):
            return False, None
    return True, node


def _describe(kind) -> str:
    if kind == "pos_int":
        return "a positive integer"
    if kind == "finite":
        return "a finite number"
    lo, lo_in, hi, hi_in = kind
    if hi is None:
        return f"a finite number {'>=' if lo_in else '>'} {lo:g}"
    return f"a finite number in {'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"


def _ok(value, kind) -> bool:
    if isinstance(value, bool):  # True is an int to Python, never a meaningful count or rate here
        return False
    if kind == "pos_int":
        return isinstance(value, numbers.Integral) and value >= 1
    if not isinstance(value, numbers.Real) or not math.isfinite(value):
        return False
    if kind == "finite":
        return True
    lo, lo_in, hi, hi_in = kind
    if lo is not None and not (value >= lo if lo_in else value > lo):
        return False
    if hi is not None and not (value <= hi if hi_in else value < hi):
        return False
    return True


def check_value(config, key: str, kind, optional: bool = False, prefix: str = "config.") -> None:
    """One key: `ConfigError` naming it unless its value is of `kind` (or None where `optional`)."""
    found, value = _lookup(config, key)
    if not found or (optional and value is None) or _ok(value, kind):
        return
    expected = ("None or " if optional else "") + _describe(kind)
    raise ConfigError(f"{prefix}{key}: {_show(value)}; expected {expected}")


def check_values(config, prefix: str = "config.") -> None:
    """Every numeric key of a training config (`VALUE_CHECKS`), then the values that depend on each other:
    the one-cycle warm-up, crop vs patch size, mask ratio vs the number of patch tokens. Touches no device."""
    for key, kind, optional in VALUE_CHECKS:
        check_value(config, key, kind, optional, prefix)
    total, pct = config.total_steps, config.optax.pct_start
    if total < 2:
        raise ConfigError(
            f"{prefix}total_steps: {total}; expected at least 2 (the one-cycle schedule warms up, then decays)"
        )
    if pct * total <= 1.0:  # vitally_jax.optim: the warm-up ends at step pct_start * total_steps - 1 > 0
        raise ConfigError(
            f"{prefix}optax.pct_start: {_show(pct)}; with {prefix}total_steps {total} the warm-up "
            f"is {pct * total:g} steps, expected more than 1 (pct_start * total_steps > 1)"
        )

    micro = config.input.get("micro_batch", None)
    if micro is not None and not (micro >= 0 and (micro == 0 or config.input.global_batch % micro == 0)):
        raise ConfigError(
            f"{prefix}input.micro_batch: {_show(micro)}; expected None (auto), 0 (the whole batch) or a divisor "
            f"of input.global_batch ({config.input.global_batch})"
        )

    from vitally_jax.models.vit import vit_config  # the variant's patch size (no arrays, nothing compiled)

    enc = vit_config(config.model.variant)
    patch, crop = enc.patch_size, config.input.crop
    if crop % patch:
        raise ConfigError(
            f"{prefix}input.crop: {crop}; expected a multiple of the patch size {patch} "
            f"(model.variant {config.model.variant!r})"
        )
    tokens = (crop // patch) ** 2 * (config.model.in_chans if enc.channel_agnostic else 1)
    ratio = config.model.mask_ratio
    visible = int(tokens * (1 - ratio))  # vitally_jax.models.layers.random_masking
    if not 1 <= visible < tokens:
        raise ConfigError(
            f"{prefix}model.mask_ratio: {_show(ratio)}; expected a ratio that leaves at least one of "
            f"the {tokens} patch tokens visible and masks at least one (this one leaves {visible} "
            "visible)"
        )


def check_mesh(config, mesh) -> None:
    """The global batch splits evenly over the mesh's data x fsdp devices."""
    from vitally_jax.sharding import data_parallel_size

    n = data_parallel_size(mesh)
    if config.input.global_batch % n:
        raise ConfigError(
            f"input.global_batch {config.input.global_batch}: must be divisible by the mesh's data x fsdp = {n} devices"
        )


def check_crop(config, image_hw: tuple[int, int], where: str, prefix: str = "config.") -> None:
    """The crop fits in the store's images."""
    h, w = image_hw
    crop = config.input.crop
    if crop > min(h, w):
        raise ConfigError(f"{prefix}input.crop: {crop}; expected at most the image size of {where} ({h}x{w})")


def check_store(config, workdir: str | pathlib.Path) -> None:
    """Crop vs the image size of the configured store (its description is read, nothing is written), or of the
    synthetic preset that training would generate into WORKDIR/synthetic."""
    if config.input.store is not None:
        from vitally_jax.data.store import ImageStore

        store = ImageStore.open(config.input.store)
        check_crop(config, store.shape[1:3], f"the store {store.path}")
        return
    if config.input.synthetic is None:
        raise ConfigError("input.store: no image store configured (set input.store, or input.synthetic='tiny')")
    existing = pathlib.Path(workdir) / "synthetic"
    if (existing / "store.json").exists():  # generated by an earlier run of this workdir
        from vitally_jax.data.store import ImageStore

        store = ImageStore.open(existing)
        check_crop(config, store.shape[1:3], f"the store {store.path}")
        return
    from vitally_jax.data import synthetic

    size = synthetic.preset(config.input.synthetic).image_size
    check_crop(config, (size, size), f"the synthetic screen {config.input.synthetic!r}")


# the demo's declared world keys (configs/demo.py `world`): key -> (SyntheticConfig field, kind)
WORLD_KEYS: dict[str, tuple[str, object]] = {
    "seed": ("seed", "nonneg_int"),
    "image_size": ("image_size", "pos_int"),
    "n_genes": ("n_genes", "pos_int"),
    "n_experiments": ("n_experiments", "pos_int"),
}
WORLD_IMAGE_SIZES = (32, 1024)  # the renderer is exercised at 64-256 px


def check_world(config, prefix: str = "config."):
    """The demo's synthetic world: config.screen.preset + config.screen.overrides + the declared keys of
    config.world (`WORLD_KEYS`, a key set to None keeps the preset's value), checked; returns the
    `SyntheticConfig`. `world.image_size` changes the field, not the cells: the expected cell count scales with
    the field's area (unless screen.overrides sets cells_per_image). Each failure is one `ConfigError` line
    naming the key."""
    from vitally_jax.data import synthetic

    over: dict = {}
    ov = config.screen.get("overrides") if hasattr(config.screen, "get") else None
    ov = ov.to_dict() if hasattr(ov, "to_dict") else dict(ov or {})
    for k, v in ov.items():
        if k not in synthetic.SyntheticConfig.__dataclass_fields__:
            raise ConfigError(f"{prefix}screen.overrides.{k}: not a field of the synthetic world (SyntheticConfig)")
        over[k] = tuple(v) if isinstance(v, list) else v
    world = config.get("world") if hasattr(config, "get") else None
    for key, value in world.items() if world is not None else ():
        if key not in WORLD_KEYS:
            raise ConfigError(f"{prefix}world.{key}: unknown key; expected one of {', '.join(WORLD_KEYS)}")
        if value is None:
            continue
        field, kind = WORLD_KEYS[key]
        if kind == "nonneg_int":
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise ConfigError(f"{prefix}world.{key}: {_show(value)}; expected an integer >= 0")
        else:
            check_value(world, key, kind, prefix=f"{prefix}world.")
        over[field] = int(value)
    size = over.get("image_size")
    lo, hi = WORLD_IMAGE_SIZES
    if size is not None and not lo <= size <= hi:
        raise ConfigError(f"{prefix}world.image_size: {size}; expected an integer in [{lo}, {hi}]")
    try:
        base = synthetic.preset(config.screen.preset)
        if size is not None and "cells_per_image" not in ov:  # a larger field at the same cell density
            over["cells_per_image"] = base.cells_per_image * (size / base.image_size) ** 2
        cfg = synthetic.preset(config.screen.preset, **over)
        synthetic.build_world_check(cfg)
    except ConfigError as e:
        raise ConfigError(f"{prefix}world: {e}") from None
    crops = [("train.input.crop", _lookup(config, "train.input.crop")), ("embed.crop", _lookup(config, "embed.crop"))]
    for key, (found, crop) in crops:
        if found and isinstance(crop, numbers.Integral) and crop > cfg.image_size:
            raise ConfigError(f"{prefix}world.image_size: {cfg.image_size}; expected at least {prefix}{key} ({crop})")
    return cfg
