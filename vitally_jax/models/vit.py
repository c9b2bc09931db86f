"""ViT encoder for cell microscopy: parallel-scaling blocks, scan over layers, every block's pooled outputs.

Usage:

    from flax import nnx
    from vitally_jax.models.vit import ViTEncoder, vit_config
    from vitally_jax.models.preprocess import self_standardize

    cfg = vit_config("CA-S/16")                      # or "S/16", "B/16", "B/8", "L/8", "G/8", "mu/8", "Ti/16"
    enc = ViTEncoder(cfg, rngs=nnx.Rngs(0))
    x = self_standardize(uint8_images)               # (B, H, W, C) -> float32
    out = enc(x)                                     # deterministic (drop_key=None)
    out["tokens"]                                    # (B, 1+L, D) last block, no final norm
    out["blocks"]["mean"]                            # (B, depth, D): OpenPhenom predict() at every block
    out["blocks"]["cls_norm"][:, -1]                 # timm global_pool='token' embedding
    enc(x, num_blocks=5)                             # trimmed encoder: the first 5 blocks only
    latent, mask, ids_restore = enc.encode_masked(x, noise, 0.75)   # noise: U[0,1) (B, L)

Options (`vit_config(variant, **overrides)`): `remat` ('none'|'full'|'dots_saveable'), `dtype`
('float32'|'bfloat16'; params stay float32), `attention_impl` (None|'xla'|'cudnn'|'head_groups'|'splash'|'chunked', see
`models.attention`), `drop_path_rate`, `block` ('parallel' | 'prenorm'), `channel_agnostic`, `max_in_chans`,
`bias` ('legacy' | 'new' | 'free': the parallel blocks' trainable biases; 'legacy', the default, is timm 0.9.7's
one `mlp_bias` per block as Recursion trained, so every trained model exports to timm and OpenPhenom layouts).
Position tables are fixed sin-cos constants recomputed for the input grid, never parameters.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vitally_jax import sharding
from vitally_jax.errors import ConfigError
from vitally_jax.models import layers

# name: (width, depth, heads, mlp_dim, patch)
VARIANTS = {
    "mu": (64, 3, 2, 256),
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "G": (1664, 48, 16, 8192),
}


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Encoder hyper-parameters. `in_chans` is the training channel count; channel-agnostic encoders accept
    any channel count up to `max_in_chans` at inference."""

    width: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_dim: int = 1536
    patch_size: int = 16
    img_size: int = 256
    in_chans: int = 6
    channel_agnostic: bool = False
    max_in_chans: int = 11
    block: str = "parallel"  # 'parallel' (ViT-22B / timm ParallelScalingBlock) | 'prenorm' (timm Block)
    qkv_bias: bool = True  # prenorm blocks only
    qk_norm: bool = True  # prenorm blocks only (parallel blocks always have QK-norm)
    init_values: float | None = 1e-4  # LayerScale init; None: no LayerScale (prenorm only)
    # trainable biases of the parallel blocks' fused [mlp|q|k|v] projection (`layers.effective_in_bias`):
    # 'legacy' = timm <= 1.0.24's one mlp_bias (Recursion's models, OpenPhenom) | 'new' = timm >= 1.0.25's |
    # 'free' = separate fc1/q/k/v biases (cannot be exported to timm once trained)
    bias: str = "legacy"
    norm_eps: float = 1e-6
    global_pool: str = "token"  # timm build: 'token' (final `norm`) | 'avg' (final norm is `fc_norm`; the
    # MAE latent is then NOT normed, as in OpenPhenom)
    drop_path_rate: float = 0.0
    remat: str = "none"  # 'none' | 'full' | 'dots_saveable'
    dtype: str = "float32"  # compute dtype: 'float32' | 'bfloat16'
    attention_impl: str | None = None  # jax.nn.dot_product_attention implementation

    def __post_init__(self):
        # checked on every construction (vit_config, mae_config, the importers, dataclasses.replace)
        if self.bias not in layers.BIAS_MODES:
            raise ConfigError(
                f"model.bias: {self.bias!r}; expected 'legacy' (timm <= 1.0.24 mlp_bias, the reference), 'new' "
                "(timm >= 1.0.25 mlp_bias) or 'free' (separate fc1/q/k/v biases)"
            )

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Tokens per image without CLS (channel-agnostic: for `in_chans` channels)."""
        return self.grid**2 * (self.in_chans if self.channel_agnostic else 1)


def vit_config(variant: str, **overrides) -> ViTConfig:
    """Decode a variant string ('S/16', 'CA-S/16', 'L/8', 'G/8', 'mu/8', ...) into a `ViTConfig`."""
    name = variant
    ca = name.startswith("CA-")
    if ca:
        name = name[3:]
    try:
        size, patch = name.split("/")
        width, depth, heads, mlp = VARIANTS[size]
        patch = int(patch)
    except (ValueError, KeyError):
        raise ConfigError(
            f"model.variant: unknown ViT variant {variant!r}; expected [CA-]<{'|'.join(VARIANTS)}>/<patch>"
        ) from None
    base = dict(
        width=width,
        depth=depth,
        num_heads=heads,
        mlp_dim=mlp,
        patch_size=patch,
        channel_agnostic=ca,
        global_pool="avg" if ca else "token",
    )
    if size == "mu":
        base["img_size"] = 4 * patch
    fields = {f.name for f in dataclasses.fields(ViTConfig)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise ConfigError(f"model: unknown ViT option(s) {bad}; expected some of {sorted(fields)}")
    cfg = ViTConfig(**{**base, **overrides})
    _validate(cfg, variant)
    return cfg


def _validate(cfg: ViTConfig, variant: str) -> None:
    if cfg.width % cfg.num_heads:
        raise ConfigError(f"model {variant}: width {cfg.width} not divisible by num_heads {cfg.num_heads}")
    if cfg.width % 4:
        raise ConfigError(f"model {variant}: width {cfg.width} must be divisible by 4 (sin-cos positions)")
    if cfg.img_size % cfg.patch_size:
        raise ConfigError(f"model {variant}: img_size {cfg.img_size} not divisible by patch_size {cfg.patch_size}")
    if cfg.attention_impl not in layers.ATTENTION_IMPLS:
        raise ConfigError(
            f"model.attention_impl: {cfg.attention_impl!r}; expected one of {list(layers.ATTENTION_IMPLS)}"
        )
    if cfg.block not in ("parallel", "prenorm"):
        raise ConfigError(f"model.block: {cfg.block!r}; expected 'parallel' or 'prenorm'")
    if cfg.global_pool not in ("token", "avg"):
        raise ConfigError(f"model.global_pool: {cfg.global_pool!r}; expected 'token' or 'avg'")
    if cfg.remat not in ("none", "full", "dots_saveable"):
        raise ConfigError(f"model.remat: {cfg.remat!r}; expected 'none', 'full' or 'dots_saveable'")
    if cfg.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"model.dtype: {cfg.dtype!r}; expected 'float32' or 'bfloat16'")
    if cfg.channel_agnostic and cfg.in_chans > cfg.max_in_chans:
        raise ConfigError(f"model.in_chans {cfg.in_chans} exceeds max_in_chans {cfg.max_in_chans}")


def make_stack(ctor, n: int, rngs: nnx.Rngs):
    """n independently initialised copies of `ctor(rngs)` stacked on a leading (layer) axis."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
    def create(r):
        return ctor(r)

    return create(rngs)


def run_stack(stack, x, *, num=None, start=0, rates=None, drop_key=None, remat="none", pool=None, constrain=True):
    """Apply blocks start..start+num-1 (default: all) of a stacked module with one `lax.scan`.

    x: (B, N, D). `rates`: per-block drop-path rates (n,); `drop_key`: stochastic depth on (split per block),
    None: deterministic. `pool(x) -> pytree` is evaluated after every block and stacked as the scan output.
    Returns (x after the last block, stacked pool outputs with a leading block axis or None).
    """
    graphdef, state = nnx.split(stack)
    n = jax.tree.leaves(state)[0].shape[0]
    num = n - start if num is None else num
    if not 1 <= num <= n - start:
        raise ConfigError(f"num_blocks {num}: expected 1..{n - start}")
    if num < n:
        state = jax.tree.map(lambda a: a[start : start + num], state)
    rates = jnp.zeros((num,), jnp.float32) if rates is None else jnp.asarray(rates, jnp.float32)[:num]
    keys = None if drop_key is None else jax.random.split(drop_key, num)

    def body(h, xs):
        st, rate, key = xs
        h = nnx.merge(graphdef, st)(h, drop_rate=rate, drop_key=key)
        if constrain:
            h = sharding.constrain_batch(h)
        return h, (None if pool is None else pool(h))

    if remat == "full":
        body = jax.checkpoint(body, prevent_cse=False)
    elif remat == "dots_saveable":
        body = jax.checkpoint(body, prevent_cse=False, policy=jax.checkpoint_policies.dots_saveable)
    return jax.lax.scan(body, x, (state, rates, keys))


# names of the pooled readouts `ViTEncoder.pool` returns for every block (the keys of `out["blocks"]`)
POOLINGS = ("cls", "cls_norm", "mean", "mean_norm")


class ViTEncoder(nnx.Module):
    """Vision transformer encoder. Params: `patch_embed`, `cls_token` (1,1,D), `blocks` (stacked), `norm`."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt = jnp.dtype(cfg.dtype)
        d = cfg.width
        if cfg.channel_agnostic:
            self.patch_embed = layers.ChannelAgnosticPatchEmbed(cfg.patch_size, d, dtype=dt, rngs=rngs)
        else:
            self.patch_embed = layers.PatchEmbed(cfg.patch_size, cfg.in_chans, d, dtype=dt, rngs=rngs)
        self.cls_token = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, 1, d), jnp.float32))
        if cfg.block == "parallel":

            def ctor(r):
                return layers.ParallelBlock(
                    d,
                    cfg.num_heads,
                    cfg.mlp_dim,
                    eps=cfg.norm_eps,
                    init_values=1e-4 if cfg.init_values is None else cfg.init_values,
                    bias=cfg.bias,
                    dtype=dt,
                    attention_impl=cfg.attention_impl,
                    rngs=r,
                )
        else:

            def ctor(r):
                return layers.PreNormBlock(
                    d,
                    cfg.num_heads,
                    cfg.mlp_dim,
                    eps=cfg.norm_eps,
                    qkv_bias=cfg.qkv_bias,
                    qk_norm=cfg.qk_norm,
                    init_values=cfg.init_values,
                    dtype=dt,
                    attention_impl=cfg.attention_impl,
                    rngs=r,
                )

        self.blocks = make_stack(ctor, cfg.depth, rngs)
        self.norm = layers.LayerNorm(d, cfg.norm_eps)

    # -- pieces ------------------------------------------------------------------------------------------------
    def embed_patches(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C) -> patch tokens + fixed positions (B, L, D); channel-agnostic L = C * g * g."""
        cfg = self.cfg
        b, h, w, c = x.shape
        p = cfg.patch_size
        if h % p or w % p:
            raise ConfigError(f"input images {h}x{w}: not divisible by patch size {p}")
        if cfg.channel_agnostic:
            if c > cfg.max_in_chans:
                raise ConfigError(f"input images have {c} channels; this encoder takes at most {cfg.max_in_chans}")
            reps = c
        else:
            if c != cfg.in_chans:
                raise ConfigError(f"input images have {c} channels; this encoder expects {cfg.in_chans}")
            reps = 1
        t = self.patch_embed(x)
        pos = layers.sincos_2d(h // p, w // p, cfg.width, cls_row=False, repeat=reps)
        return t + jnp.asarray(pos, t.dtype)

    def _with_cls(self, t):
        cls = jnp.broadcast_to(self.cls_token[...].astype(t.dtype), (t.shape[0], 1, t.shape[2]))
        return jnp.concatenate([cls, t], axis=1)

    def _rates(self):
        return np.linspace(0.0, self.cfg.drop_path_rate, self.cfg.depth, dtype=np.float32)

    def pool(self, t):
        """Pooled readouts of tokens (B, 1+L, D): the `POOLINGS` cls, cls_norm, mean, mean_norm, each (B, D)
        float32."""
        t = t.astype(jnp.float32)
        cls = t[:, 0]
        mean = jnp.mean(t[:, 1:], axis=1)
        sc, bi, eps = self.norm.scale[...], self.norm.bias[...], self.norm.eps
        return {
            "cls": cls,
            "cls_norm": layers.layer_norm(cls, sc, bi, eps),
            "mean": mean,
            "mean_norm": layers.layer_norm(mean, sc, bi, eps),
        }

    # -- public ------------------------------------------------------------------------------------------------
    def __call__(self, x: jax.Array, *, num_blocks: int | None = None, drop_key: jax.Array | None = None) -> dict:
        """Forward of the first `num_blocks` blocks (all by default).

        x: (B, H, W, C) float32 self-standardised. Returns {'tokens': (B, 1+L, D), 'blocks': {'cls', 'cls_norm',
        'mean', 'mean_norm'} each (B, nb, D)}.
        """
        t = sharding.constrain_batch(self._with_cls(self.embed_patches(x)))
        t, ys = run_stack(
            self.blocks, t, num=num_blocks, rates=self._rates(), drop_key=drop_key, remat=self.cfg.remat, pool=self.pool
        )
        return {"tokens": t, "blocks": jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), ys)}

    def encode_masked(self, x: jax.Array, noise: jax.Array, mask_ratio: float, drop_key: jax.Array | None = None):
        """MAE encoder pass on the visible tokens.

        x: (B, H, W, C); noise: (B, L) U[0,1). Returns latent (B, 1+K, D) after the final norm (no norm when
        global_pool='avg', where timm's `norm` is the identity), mask (B, L) (1 = removed), ids_restore (B, L).
        """
        t = self.embed_patches(x)
        if noise.shape != t.shape[:2]:
            raise ConfigError(f"masking noise shape {tuple(noise.shape)}: expected {tuple(t.shape[:2])}")
        ids_keep, mask, ids_restore = layers.random_masking(noise, mask_ratio)
        t = jnp.take_along_axis(t, ids_keep[..., None], axis=1)
        t = sharding.constrain_batch(self._with_cls(t))
        t, _ = run_stack(self.blocks, t, rates=self._rates(), drop_key=drop_key, remat=self.cfg.remat)
        latent = self.norm(t) if self.cfg.global_pool == "token" else t
        return latent, mask, ids_restore


def count_params(module_or_state) -> int:
    """Number of values in the `nnx.Param`s of a module (or abstract module from `nnx.eval_shape`)."""
    state = nnx.state(module_or_state, nnx.Param) if isinstance(module_or_state, nnx.Module) else module_or_state
    return int(sum(np.prod(a.shape) for a in jax.tree.leaves(state)))
