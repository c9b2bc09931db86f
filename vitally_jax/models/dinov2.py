"""DINOv2 vision transformers (the paper's natural-image baselines S/14, L/14, g/14) in Flax NNX.

Architecture as in timm's `vit_*_patch14_dinov2` (and Meta's release): patch embedding Conv(3 -> D, 14, 14),
learned CLS token and learned position table `pos_embed` (1, 1 + g*g, D) for the training grid g (37 at 518 px),
optional register tokens, pre-norm blocks with LayerScale (x + ls1 * attn(LN1 x); x + ls2 * mlp(LN2 x)), qkv
bias, LayerNorm eps 1e-6, exact-GELU MLP (S/B/L) or packed SwiGLU (g: fc1 D -> 2H, silu(first half) * second
half, fc2 H -> D), final LayerNorm.

Other input sizes: the position table is resampled to the input grid with PyTorch's bicubic interpolation
(`antialias=True`, as timm's `resample_abs_pos_embed` does for `dynamic_img_size=True`; `antialias=False` gives
plain `F.interpolate(mode='bicubic')`), reproduced here as two small resampling matrices. Meta's own DINOv2
code resamples with a scale factor offset by 0.1 (`interpolate_offset`); that variant is not reproduced: at the
training grid (518 px for the released models) every variant is the identity.

Outputs follow the encoder contract of `vitally_jax.models.vit`: {'tokens': (B, T, D) last block, no norm;
'blocks': {'cls', 'cls_norm', 'mean', 'mean_norm'} each (B, nb, D)} where `mean` averages the patch tokens
(not CLS or registers) and `*_norm` apply the final LayerNorm.

Microscopy images with C = 5 or 6 channels: `embed_channels_as_rgb` embeds each channel separately as a grey
RGB image (the channel replicated three times) and concatenates the per-channel embeddings, giving C * D
features per block (the channel order is kept, so features are comparable across images of one assay).

Usage:

    cfg = dinov2_config("S/14")                         # "S/14" "B/14" "L/14" "g/14", tiny "mu/14"
    model = Dinov2(cfg, rngs=nnx.Rngs(0))               # or interop.dinov2.load_dinov2(path, "S/14")
    out = model(x)                                      # x (B, H, W, 3), H, W multiples of 14
    feats = embed_channels_as_rgb(model, cell_images)   # (B, nb, C*D) per readout
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vitally_jax import sharding
from vitally_jax.errors import ConfigError
from vitally_jax.models import layers
from vitally_jax.models.vit import make_stack, run_stack

# name: (width, depth, heads, mlp hidden, mlp kind)
VARIANTS = {
    "mu": (32, 2, 2, 128, "mlp"),
    "S": (384, 12, 6, 1536, "mlp"),
    "B": (768, 12, 12, 3072, "mlp"),
    "L": (1024, 24, 16, 4096, "mlp"),
    "g": (1536, 40, 24, 4096, "swiglu"),
}


@dataclasses.dataclass(frozen=True)
class Dinov2Config:
    """DINOv2 hyper-parameters. `mlp_dim` is the hidden width (for SwiGLU: of each half; fc1 has 2*mlp_dim
    outputs). `img_size` sets the grid of the learned position table (img_size // patch_size)."""

    width: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_dim: int = 1536
    mlp: str = "mlp"  # 'mlp' (exact GELU) | 'swiglu' (timm SwiGLUPacked)
    patch_size: int = 14
    img_size: int = 518
    in_chans: int = 3
    reg_tokens: int = 0  # register tokens (the *_reg4_* models)
    no_embed_class: bool = False  # True: pos_embed covers patches only (timm layout of register models)
    mask_token: bool = False  # keep the (unused at inference) iBOT mask token of Meta's checkpoints
    init_values: float | None = 1e-5  # LayerScale init; None: no LayerScale
    norm_eps: float = 1e-6
    antialias: bool = True  # bicubic resampling of pos_embed with PyTorch's antialias filter
    drop_path_rate: float = 0.0
    dtype: str = "float32"
    attention_impl: str | None = None

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_prefix(self) -> int:
        """CLS + registers."""
        return 1 + self.reg_tokens

    @property
    def pos_len(self) -> int:
        return self.grid**2 + (0 if self.no_embed_class else 1)


def dinov2_config(variant: str, **overrides) -> Dinov2Config:
    """Decode 'S/14', 'B/14', 'L/14', 'g/14' (or tiny 'mu/14'); '-reg4' suffix adds 4 register tokens."""
    name, regs = variant, 0
    if name.endswith("-reg4"):
        name, regs = name[: -len("-reg4")], 4
    try:
        size, patch = name.split("/")
        width, depth, heads, mlp_dim, mlp = VARIANTS[size]
        patch = int(patch)
    except (ValueError, KeyError):
        raise ConfigError(
            f"model.variant: unknown DINOv2 variant {variant!r}; expected <{'|'.join(VARIANTS)}>/14[-reg4]"
        ) from None
    base = dict(
        width=width,
        depth=depth,
        num_heads=heads,
        mlp_dim=mlp_dim,
        mlp=mlp,
        patch_size=patch,
        reg_tokens=regs,
        no_embed_class=regs > 0,
    )
    if size == "mu":
        base["img_size"] = 4 * patch
    fields = {f.name for f in dataclasses.fields(Dinov2Config)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise ConfigError(f"model: unknown DINOv2 option(s) {bad}; expected some of {sorted(fields)}")
    cfg = Dinov2Config(**{**base, **overrides})
    if cfg.width % cfg.num_heads:
        raise ConfigError(f"model {variant}: width {cfg.width} not divisible by num_heads {cfg.num_heads}")
    if cfg.mlp not in ("mlp", "swiglu"):
        raise ConfigError(f"model.mlp: {cfg.mlp!r}; expected 'mlp' or 'swiglu'")
    if cfg.img_size % cfg.patch_size:
        raise ConfigError(f"model {variant}: img_size {cfg.img_size} not divisible by patch_size {cfg.patch_size}")
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# Bicubic resampling of the position table (PyTorch F.interpolate numerics, align_corners=False)
# ----------------------------------------------------------------------------------------------------------------


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys cubic convolution kernel with parameter a, evaluated at |x|."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int, antialias: bool = True) -> np.ndarray:
    """Resampling matrix R (out_size, in_size) with y = R @ x along one axis, as PyTorch computes it.

    antialias=True: PyTorch's separable antialiased filter (Keys a=-0.5, support widened by the scale when
    shrinking, weights normalised over the in-range window). antialias=False: classic bicubic (a=-0.75,
    source index scale*(i+0.5)-0.5, border pixels replicated). float64 weights.
    """
    scale = in_size / out_size
    m = np.zeros((out_size, in_size), np.float64)
    if antialias:
        support = 2.0 * scale if scale >= 1.0 else 2.0
        invscale = 1.0 / scale if scale >= 1.0 else 1.0
        for i in range(out_size):
            center = scale * (i + 0.5)
            lo = max(int(center - support + 0.5), 0)
            hi = min(int(center + support + 0.5), in_size)
            j = np.arange(lo, hi)
            w = _cubic((j - center + 0.5) * invscale, -0.5)
            total = w.sum()
            m[i, lo:hi] = w / total if total != 0 else w
    else:
        for i in range(out_size):
            src = scale * (i + 0.5) - 0.5
            base = int(np.floor(src))
            t = src - base
            for off, w in zip((-1, 0, 1, 2), _cubic(np.array([t + 1, t, 1 - t, 2 - t]), -0.75)):
                m[i, min(max(base + off, 0), in_size - 1)] += w
    return m


def resample_grid(table: jax.Array, old: tuple[int, int], new: tuple[int, int], antialias: bool = True) -> jax.Array:
    """Resample a position grid (old_h*old_w, D) -> (new_h*new_w, D) bicubically (rows, then columns)."""
    if tuple(old) == tuple(new):
        return table
    d = table.shape[-1]
    rh = jnp.asarray(bicubic_matrix(old[0], new[0], antialias), jnp.float32)
    rw = jnp.asarray(bicubic_matrix(old[1], new[1], antialias), jnp.float32)
    g = table.astype(jnp.float32).reshape(old[0], old[1], d)
    g = jnp.einsum("wj,ijd->iwd", rw, g, precision=jax.lax.Precision.HIGHEST)
    g = jnp.einsum("hi,iwd->hwd", rh, g, precision=jax.lax.Precision.HIGHEST)
    return g.reshape(new[0] * new[1], d).astype(table.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------------------


class Dinov2Block(layers.PreNormBlock):
    """Pre-norm block with LayerScale; MLP or packed SwiGLU. Params: norm1, qkv, proj, ls1, norm2, fc1, fc2, ls2.

    The forward is `layers.PreNormBlock`'s; only the parameter names of the LayerScales and the MLP differ.
    x: (B, N, D) -> (B, N, D).
    """

    def __init__(self, cfg: Dinov2Config, *, rngs: nnx.Rngs):
        # not super().__init__: that would name the LayerScales gamma1/gamma2 instead of DINOv2's ls1/ls2
        d, dt = cfg.width, jnp.dtype(cfg.dtype)
        self.dim, self.heads, self.mlp, self.dtype, self.impl = d, cfg.num_heads, cfg.mlp, dt, cfg.attention_impl
        self.norm1 = layers.LayerNorm(d, cfg.norm_eps)
        self.qkv = layers.Linear(d, 3 * d, dtype=dt, rngs=rngs)
        self.q_norm = self.k_norm = None
        self.proj = layers.Linear(d, d, dtype=dt, rngs=rngs)
        self.norm2 = layers.LayerNorm(d, cfg.norm_eps)
        fc1_out = 2 * cfg.mlp_dim if cfg.mlp == "swiglu" else cfg.mlp_dim
        self.fc1 = layers.Linear(d, fc1_out, dtype=dt, rngs=rngs)
        self.fc2 = layers.Linear(cfg.mlp_dim, d, dtype=dt, rngs=rngs)
        if cfg.init_values is None:
            self.ls1 = self.ls2 = None
        else:
            self.ls1 = nnx.Param(jnp.full((d,), cfg.init_values, jnp.float32))
            self.ls2 = nnx.Param(jnp.full((d,), cfg.init_values, jnp.float32))

    def _mlp(self, y):
        h = self.fc1(y)
        if self.mlp == "swiglu":
            gate, val = jnp.split(h, 2, axis=-1)
            h = jax.nn.silu(gate) * val
        else:
            h = jax.nn.gelu(h, approximate=False)
        return self.fc2(h)

    def _scales(self):
        return self.ls1, self.ls2


class Dinov2(nnx.Module):
    """DINOv2 ViT. Params: patch_embed (kernel (p,p,C,D), bias), cls_token (1,1,D), reg_token (1,R,D) when
    R > 0, pos_embed (1, pos_len, D) learned, blocks (stacked `Dinov2Block`s), norm; mask_token (1, D) only
    when `cfg.mask_token` (kept for round trips of Meta's checkpoints, unused by the forward pass)."""

    def __init__(self, cfg: Dinov2Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.width
        self.patch_embed = layers.PatchEmbed(cfg.patch_size, cfg.in_chans, d, dtype=jnp.dtype(cfg.dtype), rngs=rngs)
        self.cls_token = nnx.Param(1e-6 * jax.random.normal(rngs.params(), (1, 1, d), jnp.float32))
        self.reg_token = (
            nnx.Param(1e-6 * jax.random.normal(rngs.params(), (1, cfg.reg_tokens, d), jnp.float32))
            if cfg.reg_tokens
            else None
        )
        self.pos_embed = nnx.Param(
            0.02 * jax.random.truncated_normal(rngs.params(), -2, 2, (1, cfg.pos_len, d), jnp.float32)
        )
        self.mask_token = nnx.Param(jnp.zeros((1, d), jnp.float32)) if cfg.mask_token else None
        self.blocks = make_stack(lambda r: Dinov2Block(cfg, rngs=r), cfg.depth, rngs)
        self.norm = layers.LayerNorm(d, cfg.norm_eps)

    def embed(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C) -> tokens [CLS, registers, patches] with positions, (B, 1 + R + gh*gw, D)."""
        cfg = self.cfg
        b, h, w, c = x.shape
        p = cfg.patch_size
        if h % p or w % p:
            raise ConfigError(f"input images {h}x{w}: not divisible by patch size {p}")
        if c != cfg.in_chans:
            raise ConfigError(
                f"input images have {c} channels; this DINOv2 model expects {cfg.in_chans} "
                "(use embed_channels_as_rgb for microscopy channels)"
            )
        t = self.patch_embed(x)
        pos = self.pos_embed[...][0]
        lead = 0 if cfg.no_embed_class else 1
        grid = resample_grid(pos[lead:], (cfg.grid, cfg.grid), (h // p, w // p), cfg.antialias)
        t = t + grid.astype(t.dtype)[None]
        cls = jnp.broadcast_to(self.cls_token[...].astype(t.dtype), (b, 1, cfg.width))
        if lead:
            cls = cls + pos[:1].astype(t.dtype)[None]
        prefix = [cls]
        if self.reg_token is not None:
            prefix.append(jnp.broadcast_to(self.reg_token[...].astype(t.dtype), (b, cfg.reg_tokens, cfg.width)))
        return jnp.concatenate(prefix + [t], axis=1)

    def pool(self, t):
        """Readouts of tokens (B, T, D): cls, cls_norm, mean (patch tokens), mean_norm; each (B, D) float32."""
        t = t.astype(jnp.float32)
        cls = t[:, 0]
        mean = jnp.mean(t[:, self.cfg.num_prefix :], axis=1)
        sc, bi, eps = self.norm.scale[...], self.norm.bias[...], self.norm.eps
        return {
            "cls": cls,
            "cls_norm": layers.layer_norm(cls, sc, bi, eps),
            "mean": mean,
            "mean_norm": layers.layer_norm(mean, sc, bi, eps),
        }

    def __call__(self, x: jax.Array, *, num_blocks: int | None = None, drop_key: jax.Array | None = None) -> dict:
        """x (B, H, W, C) -> {'tokens': (B, T, D), 'blocks': {readout: (B, nb, D)}}; first `num_blocks` blocks."""
        t = sharding.constrain_batch(self.embed(x))
        rates = np.linspace(0.0, self.cfg.drop_path_rate, self.cfg.depth, dtype=np.float32)
        t, ys = run_stack(self.blocks, t, num=num_blocks, rates=rates, drop_key=drop_key, pool=self.pool)
        return {"tokens": t, "blocks": jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), ys)}

    def features(self, x: jax.Array) -> jax.Array:
        """timm `forward_features`: all tokens after the final norm, (B, T, D)."""
        return self.norm(self(x)["tokens"])


def embed_channels_as_rgb(model: Dinov2, x: jax.Array, *, num_blocks: int | None = None) -> dict:
    """Embed C-channel microscopy images with an RGB model: each channel as its own grey RGB image.

    x: (B, H, W, C) self-standardised (per image and channel: mean 0, std 1, the scale ImageNet-normalised RGB
    inputs have). Each channel is replicated to 3 channels and embedded separately; the C embeddings of an
    image are concatenated in channel order. Returns {readout: (B, nb, C*D)} for cls, cls_norm, mean, mean_norm.
    """
    if model.cfg.in_chans != 3:
        raise ConfigError(
            f"embed_channels_as_rgb: the model takes {model.cfg.in_chans} channels; expected an RGB (3-channel) model"
        )
    b, h, w, c = x.shape
    grey = jnp.moveaxis(x, -1, 1).reshape(b * c, h, w, 1)
    out = model(jnp.repeat(grey, 3, axis=-1), num_blocks=num_blocks)["blocks"]

    def concat(a):  # (B*C, nb, D) -> (B, nb, C*D), channel-major features
        nb, d = a.shape[1:]
        return jnp.moveaxis(a.reshape(b, c, nb, d), 1, 2).reshape(b, nb, c * d)

    return {k: concat(v) for k, v in out.items()}
