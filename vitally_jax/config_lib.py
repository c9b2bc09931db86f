"""Config builder and loader: every trainer config is `build(recipe, arg)`; `load(name_or_path, arg)` reads one.

A config file in `configs/` is a recipe: it calls `build(recipe, arg)` where `recipe` holds the paper's numbers for
that model and `arg` is the string after the colon in `--config=configs/vitg8.py:ARG`: comma-separated words and
key=value pairs, e.g. `runlocal`, `runlocal,steps=200`, `variant=L/8`. `runlocal` shrinks the model, crops, batch
and schedule so that a CPU finishes in minutes on a synthetic screen generated into the workdir.

The tree declares every key (None where a value is optional; keys a user sets from the command line while they
default to None are typed placeholders, so `--config.input.store=DIR` works). The `model` section holds
`vitally_jax.models.mae.mae_config` overrides only: `vitally_jax.train.model_config` passes all of them through.

    from vitally_jax import config_lib
    config = config_lib.load("vits16", "runlocal")       # configs/vits16.py of this repository
    config = config_lib.load("path/to/mine.py")          # any file defining get_config(arg)
"""

from __future__ import annotations

import importlib.util
import pathlib

import ml_collections
from ml_collections import config_dict

from vitally_jax.errors import ConfigError

# the repository's configs/ folder (the package is installed from the checkout: pip install -e .)
CONFIGS_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"


def parse_arg(arg: str | None) -> dict[str, str | bool]:
    """`"runlocal,steps=20"` -> `{"runlocal": True, "steps": "20"}`."""
    out: dict[str, str | bool] = {}
    for part in (arg or "").split(","):
        part = part.strip()
        if not part:
            continue
        if "=" in part:
            k, v = part.split("=", 1)
            out[k.strip()] = v.strip()
        else:
            out[part] = True
    unknown = set(out) - {"runlocal", "variant", "steps", "batch"}
    if unknown:
        raise ConfigError(
            f"config argument: unknown word(s) {sorted(unknown)}; expected runlocal, variant=, steps=, batch="
        )
    return out


def build(recipe: dict, arg: str | None) -> ml_collections.ConfigDict:
    """The full config tree for one model recipe and a config argument (`parse_arg`).

    `recipe` keys: `variant`, `total_steps`, `global_batch`, `peak_lr`, `drop_path_rate`, `mesh` (data, fsdp,
    model), `peak_flops` (per device; None = measured) and optionally `local_variant` (the `runlocal` model,
    default "mu/8"). See the files in `configs/` for the paper's numbers.
    """
    args = parse_arg(arg)
    c = ml_collections.ConfigDict()
    c.job = "train"  # "train" | "demo"
    c.seed = 0
    c.total_steps = recipe["total_steps"]
    # stop cleanly (checkpoint, exit 0) after this many steps in one run; None = never
    c.stop_after_steps = config_dict.placeholder(int)

    # Model: `vitally_jax.models.mae.mae_config(variant, **overrides)` with every other key of this section as an
    # override (None = the variant's value; the image size is input.crop); a key mae_config does not know is refused.
    c.model = ml_collections.ConfigDict()
    c.model.variant = recipe["variant"]
    c.model.in_chans = 6
    c.model.mask_ratio = 0.75
    c.model.fourier_weight = 0.01
    # "reference" (bit-compatible with the PyTorch code) | "masked" (OpenPhenom's mask_fourier_loss) | "image"
    c.model.fourier = "reference"
    c.model.drop_path_rate = recipe["drop_path_rate"]
    c.model.dtype = "float32"  # compute dtype: "float32" | "bfloat16" (parameters stay float32)
    # rematerialisation of the encoder and decoder block stacks in the backward pass: "auto" (on a CPU backend
    # "dots_saveable", which keeps matmul outputs and recomputes the rest; "none" elsewhere) | "none" | "full" |
    # "dots_saveable"
    c.model.remat = "auto"
    # attention: None (per backend) | "xla" | "cudnn" | "head_groups" | "splash" | "chunked" (models/attention.py)
    c.model.attention_impl = config_dict.placeholder(str)
    # trainable block biases: "legacy" (timm 0.9.7's mlp_bias, as the reference trained; exports to timm and
    # OpenPhenom) | "new" (timm >= 1.0.25's mlp_bias) | "free" (separate fc1/q/k/v biases; cannot be exported)
    c.model.bias = "legacy"
    c.model.decoder_depth = config_dict.placeholder(int)  # None = the variant's (8 blocks x 512 for L/8 and G/8)
    c.model.decoder_width = config_dict.placeholder(int)
    c.model.decoder_heads = config_dict.placeholder(int)
    # encoder size overrides of the variant (None = the variant's): width, depth, heads, MLP width, LayerScale init
    c.model.width = config_dict.placeholder(int)
    c.model.depth = config_dict.placeholder(int)
    c.model.num_heads = config_dict.placeholder(int)
    c.model.mlp_dim = config_dict.placeholder(int)
    c.model.init_values = config_dict.placeholder(float)

    # Input: a store written by vitally_jax.data (or a synthetic one generated on first use).
    c.input = ml_collections.ConfigDict()
    c.input.store = config_dict.placeholder(str)  # path of the image store; None requires input.synthetic
    c.input.synthetic = None  # None | a SyntheticConfig preset ("tiny", "demo"): generated into WORKDIR/synthetic
    c.input.index = config_dict.placeholder(str)  # curated index (Parquet, column image_id); None = whole store
    c.input.crop = 256
    c.input.global_batch = recipe["global_batch"]
    c.input.flips = True
    c.input.rot90 = True
    c.input.in_memory = False  # small screens: read the images once into memory and crop with numpy
    # gradient accumulation inside a step: None (auto: cache-sized slices on a single-device CPU mesh, the whole
    # batch elsewhere) | 0 (the whole batch) | samples per slice (a divisor of global_batch; no data parallelism)
    c.input.micro_batch = config_dict.placeholder(int)

    # Optimiser: Lion + one-cycle cosine (PyTorch OneCycleLR semantics).
    c.optax = ml_collections.ConfigDict()
    c.optax.name = "lion"  # "lion" (the paper's) | "adamw"
    c.optax.peak_lr = recipe["peak_lr"]
    c.optax.b1 = 0.9
    c.optax.b2 = 0.95
    c.optax.weight_decay = 0.05
    c.optax.decay_1d = False  # also decay biases/norms/LayerScale (the reference excludes them)
    c.optax.pct_start = 0.1
    c.optax.div_factor = 25.0
    c.optax.final_div_factor = 1e4
    c.optax.cycle_momentum = False  # cycle b1 0.95 -> 0.85 -> 0.95 inversely to the lr
    c.optax.base_momentum = 0.85
    c.optax.max_momentum = 0.95
    c.optax.grad_clip_norm = config_dict.placeholder(float)  # None = no clipping
    c.optax.grad_clip_norm = 1.0
    c.optax.mu_dtype = config_dict.placeholder(str)  # None = parameter dtype; "bfloat16" halves optimiser memory

    # Mesh over ('data', 'fsdp', 'model'); one axis may be -1 (all remaining devices).
    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = recipe["mesh"]
    c.mesh.rules = None  # None = vitally_jax.sharding default rules; else ((regex, partition spec tuple), ...)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 1000
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True
    c.checkpoint.export_encoder = True  # write WORKDIR/encoder (load with vitally_jax.load_encoder) at the end

    c.log = ml_collections.ConfigDict()
    c.log.every_steps = 50
    c.log.tensorboard = True
    c.log.recon_every_steps = 5000  # reconstruction PNG; None = never
    c.log.recon_images = 2
    # None = measure a matmul here (CPU "MFU")
    c.log.peak_flops_per_device = config_dict.placeholder(float)
    if recipe.get("peak_flops") is not None:
        c.log.peak_flops_per_device = float(recipe["peak_flops"])

    if args.get("variant"):
        c.model.variant = str(args["variant"])
    if args.get("runlocal"):
        c.model.variant = recipe.get("local_variant", "mu/8")
        c.model.in_chans = 6
        c.model.decoder_depth = 1
        c.model.decoder_width = 32
        c.model.decoder_heads = 2
        c.input.synthetic = "tiny"
        c.input.crop = 32
        c.input.global_batch = 16
        c.total_steps = 200
        c.optax.peak_lr = 1e-3  # a toy model on a toy screen learns visibly only with a larger step
        c.mesh.shape = (-1, 1, 1)
        c.checkpoint.every_steps = 50
        c.checkpoint.keep = 2
        c.log.every_steps = 10
        c.log.recon_every_steps = 100
    if args.get("steps"):
        c.total_steps = int(args["steps"])
    if args.get("batch"):
        c.input.global_batch = int(args["batch"])
    return c


def resolve(name_or_path: str | pathlib.Path) -> pathlib.Path:
    """`"tiny"` -> the repository's `configs/tiny.py`; anything with a folder or a `.py` suffix is a path."""
    s = str(name_or_path)
    if "/" in s or "\\" in s or s.endswith(".py"):
        return pathlib.Path(s).expanduser()
    return CONFIGS_DIR / f"{s}.py"


def load(name_or_path: str | pathlib.Path, arg: str | None = "") -> ml_collections.ConfigDict:
    """The ConfigDict of `get_config(arg)` in a config file given by name (`"tiny"`, `"vits16"`, `"vitl8"`,
    `"vitg8"`, `"demo"`: `configs/<name>.py`) or by path."""
    path = resolve(name_or_path)
    if not path.is_file():
        known = sorted(p.stem for p in CONFIGS_DIR.glob("*.py")) if CONFIGS_DIR.is_dir() else []
        raise ConfigError(
            f"config {str(name_or_path)!r}: {path} not found (expected a config name among {known} "
            "or the path of a Python file defining get_config)"
        )
    spec = importlib.util.spec_from_file_location(f"vitally_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"config {str(path)!r}: defines no get_config(arg)")
    return module.get_config(arg)
