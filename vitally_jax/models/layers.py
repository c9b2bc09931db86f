"""Building blocks of the ViT and MAE models: patch embeddings, sin-cos tables, blocks, drop path, masking.

All matmul weights are stored as (in, out) float32 `nnx.Param`s; the compute dtype is a per-module setting
(params are cast on use). LayerNorm statistics are always computed in float32 with a two-pass variance, as
PyTorch does. Randomness (stochastic depth) is always an explicit `key` argument.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vitally_jax.models import attention as attention_lib

_xavier = nnx.initializers.xavier_uniform()


# ----------------------------------------------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------------------------------------------


def sincos_2d(grid_h: int, grid_w: int, dim: int, *, cls_row: bool = True, repeat: int = 1) -> np.ndarray:
    """Fixed 2-D sin-cos position table, ROW-first layout: [sin(i w), cos(i w), sin(j w), cos(j w)].

    w_k = 1 / 10000**(k / (dim // 4)), k = 0..dim//4-1; token (i, j) at index i * grid_w + j.
    `repeat` stacks the grid table that many times (channel-agnostic tokens, channel-major).
    Returns float32 (cls_row + repeat * grid_h * grid_w, dim); the CLS row is zeros.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position table: width {dim} must be divisible by 4")
    d4 = dim // 4
    omega = 1.0 / 10000.0 ** (np.arange(d4, dtype=np.float64) / d4)
    i, j = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64), indexing="ij")
    oi = i.reshape(-1)[:, None] * omega[None]
    oj = j.reshape(-1)[:, None] * omega[None]
    table = np.concatenate([np.sin(oi), np.cos(oi), np.sin(oj), np.cos(oj)], axis=1).astype(np.float32)
    table = np.tile(table, (repeat, 1))
    if cls_row:
        table = np.concatenate([np.zeros((1, dim), np.float32), table], axis=0)
    return table


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis, float32 statistics (two-pass biased variance), output in x.dtype."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def patchify(x: jax.Array, p: int) -> jax.Array:
    """(B, H, W, C) -> (B, L, p*p*C), token order row-major, per-token layout (row-in-patch, col-in-patch, c)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(t: jax.Array, p: int, grid: tuple[int, int], c: int) -> jax.Array:
    """Inverse of `patchify`: (B, L, p*p*C) -> (B, gh*p, gw*p, C)."""
    b = t.shape[0]
    gh, gw = grid
    x = t.reshape(b, gh, gw, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, gh * p, gw * p, c)


def patchify_channels(x: jax.Array, p: int) -> jax.Array:
    """Channel-agnostic patchify: (B, H, W, C) -> (B, C*L, p*p), tokens channel-major (c, row, col)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 5, 1, 3, 2, 4)
    return x.reshape(b, c * (h // p) * (w // p), p * p)


def unpatchify_channels(t: jax.Array, p: int, grid: tuple[int, int], c: int) -> jax.Array:
    """Inverse of `patchify_channels`: (B, C*L, p*p) -> (B, gh*p, gw*p, C)."""
    b = t.shape[0]
    gh, gw = grid
    x = t.reshape(b, c, gh, gw, p, p).transpose(0, 2, 4, 3, 5, 1)
    return x.reshape(b, gh * p, gw * p, c)


def random_masking(noise: jax.Array, mask_ratio: float):
    """MAE masking from injected noise (B, L): keep the int(L*(1-ratio)) lowest-noise tokens.

    Returns ids_keep (B, K), mask (B, L) float32 with 1 = removed, ids_restore (B, L).
    """
    b, n = noise.shape
    keep = int(n * (1 - mask_ratio))
    ids_shuffle = jnp.argsort(noise, axis=1)
    ids_restore = jnp.argsort(ids_shuffle, axis=1)
    ids_keep = ids_shuffle[:, :keep]
    mask = jnp.take_along_axis((jnp.arange(n) >= keep).astype(jnp.float32)[None].repeat(b, 0), ids_restore, axis=1)
    return ids_keep, mask, ids_restore


def drop_path(x: jax.Array, rate, key: jax.Array | None) -> jax.Array:
    """Per-sample stochastic depth on a residual branch (B, ...); scales kept samples by 1/(1-rate)."""
    if key is None:
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, jnp.zeros_like(x)).astype(x.dtype)


ATTENTION_IMPLS = attention_lib.IMPLS
head_group_attention = attention_lib.head_group_attention


def attention(q, k, v, impl: str | None):
    """Multi-head softmax attention; q (B, Tq, N, h), k/v (B, Tk, N, h) -> (B, Tq, N, h); scale 1/sqrt(h).

    impl: None (per backend: TPU splash, GPU cuDNN with an XLA fallback, CPU head groups) | "xla" | "cudnn" |
    "splash" | "head_groups"; see `vitally_jax.models.attention`, which logs the choice once.
    """
    return attention_lib.attention(q, k, v, impl)


# ----------------------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------------------


class LayerNorm(nnx.Module):
    """Affine LayerNorm with params `scale`, `bias` (D,)."""

    def __init__(self, dim: int, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x):
        return layer_norm(x, self.scale[...], self.bias[...], self.eps)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel (in, out) float32, computed in `dtype`."""

    def __init__(self, din: int, dout: int, *, bias: bool = True, dtype=jnp.float32, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_xavier(rngs.params(), (din, dout), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dout,), jnp.float32)) if bias else None
        self.dtype = dtype

    def __call__(self, x):
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class PatchEmbed(nnx.Module):
    """Conv(C -> D, kernel p, stride p) as a matmul over patches. kernel (p, p, C, D), bias (D,).

    (B, H, W, C) -> (B, L, D), tokens row-major.
    """

    def __init__(self, patch: int, in_chans: int, dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        fan = patch * patch * in_chans
        w = _xavier(rngs.params(), (fan, dim), jnp.float32).reshape(patch, patch, in_chans, dim)
        self.kernel = nnx.Param(w)
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
        self.patch = patch
        self.dtype = dtype

    def __call__(self, x):
        p = self.patch
        k = self.kernel[...]
        t = patchify(x.astype(self.dtype), p)
        return jnp.dot(t, k.reshape(-1, k.shape[-1]).astype(self.dtype)) + self.bias[...].astype(self.dtype)


class ChannelAgnosticPatchEmbed(nnx.Module):
    """One shared Conv(1 -> D, kernel p, stride p) applied to every channel. kernel (p, p, 1, D), bias (D,).

    (B, H, W, C) -> (B, C*L, D), tokens channel-major (c, row, col); any C works.
    """

    def __init__(self, patch: int, dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        w = _xavier(rngs.params(), (patch * patch, dim), jnp.float32).reshape(patch, patch, 1, dim)
        self.kernel = nnx.Param(w)
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
        self.patch = patch
        self.dtype = dtype

    def __call__(self, x):
        k = self.kernel[...]
        t = patchify_channels(x.astype(self.dtype), self.patch)
        return jnp.dot(t, k.reshape(-1, k.shape[-1]).astype(self.dtype)) + self.bias[...].astype(self.dtype)


BIAS_MODES = ("legacy", "new", "free")


def effective_in_bias(mode: str, params: dict, dim: int, mlp_dim: int):
    """The bias a parallel block adds to its fused [mlp | q | k | v] projection (length mlp_dim + 3 * dim).

    mode 'legacy' (timm <= 1.0.24, what Recursion trained): concat(zeros(3 * dim), mlp_bias), so the one
    trainable (mlp_dim,) vector lands on fc1[3 * dim:], q, k and v (for mlp_dim = 4 * dim) and fc1[:3 * dim] is 0;
    'new' (timm >= 1.0.25): concat(mlp_bias, zeros(3 * dim)), fc1 only; 'free': concat(fc1_bias, q_bias, k_bias,
    v_bias), four independent vectors. `params` maps those names to arrays (jax or numpy; a leading layer axis is
    kept).
    """
    xp = np if all(isinstance(v, np.ndarray) for v in params.values()) else jnp
    if mode == "free":
        return xp.concatenate([params[n] for n in ("fc1_bias", "q_bias", "k_bias", "v_bias")], axis=-1)
    mb = params["mlp_bias"]
    zeros = xp.zeros(mb.shape[:-1] + (3 * dim,), mb.dtype)
    return xp.concatenate([zeros, mb] if mode == "legacy" else [mb, zeros], axis=-1)


class ParallelBlock(nnx.Module):
    """ViT-22B style parallel-scaling block (timm ParallelScalingBlock, qkv_bias=False, qk_norm=True).

    y = LN_in(x); [m | q | k | v] = y @ in_proj + b; q, k = LN_q, LN_k per head (with bias);
    a = attn(q, k, v) @ attn_out; m = gelu_exact(m) @ mlp_out; x + drop_path(gamma * (a + m)).
    x: (B, N, D) -> (B, N, D).

    `bias` chooses the trainable parameters behind b (`effective_in_bias`): 'legacy' (default) and 'new' have
    one `mlp_bias` (mlp_dim,) vector, as timm's block has, so a trained model exports to timm unchanged;
    'free' has separate `fc1_bias`, `q_bias`, `k_bias`, `v_bias`, which timm cannot hold once trained.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_dim: int,
        *,
        eps: float = 1e-6,
        init_values: float = 1e-4,
        bias: str = "legacy",
        dtype=jnp.float32,
        attention_impl: str | None = None,
        rngs: nnx.Rngs,
    ):
        if dim % heads:
            raise ValueError(f"width {dim} not divisible by heads {heads}")
        if bias not in BIAS_MODES:
            raise ValueError(f"bias {bias!r}: expected one of {BIAS_MODES}")
        hd = dim // heads
        self.dim, self.heads, self.mlp_dim, self.dtype, self.impl = dim, heads, mlp_dim, dtype, attention_impl
        self.bias_mode = bias
        self.in_norm = LayerNorm(dim, eps)
        self.in_proj = nnx.Param(_xavier(rngs.params(), (dim, mlp_dim + 3 * dim), jnp.float32))
        if bias == "free":
            self.fc1_bias = nnx.Param(jnp.zeros((mlp_dim,), jnp.float32))
            self.q_bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
            self.k_bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
            self.v_bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
        else:
            self.mlp_bias = nnx.Param(jnp.zeros((mlp_dim,), jnp.float32))
        self.q_norm = LayerNorm(hd, eps)
        self.k_norm = LayerNorm(hd, eps)
        self.attn_out = Linear(dim, dim, dtype=dtype, rngs=rngs)
        self.mlp_out = Linear(mlp_dim, dim, dtype=dtype, rngs=rngs)
        self.gamma = nnx.Param(jnp.full((dim,), init_values, jnp.float32))

    def __call__(self, x, *, drop_rate=0.0, drop_key=None):
        b, n, d = x.shape
        dt = self.dtype
        y = self.in_norm(x).astype(dt)
        names = ("fc1_bias", "q_bias", "k_bias", "v_bias") if self.bias_mode == "free" else ("mlp_bias",)
        bias = effective_in_bias(self.bias_mode, {n: getattr(self, n)[...] for n in names}, d, self.mlp_dim)
        y = jnp.dot(y, self.in_proj[...].astype(dt)) + bias.astype(dt)
        h = self.mlp_dim
        m, q, k, v = y[..., :h], y[..., h : h + d], y[..., h + d : h + 2 * d], y[..., h + 2 * d :]
        shape = (b, n, self.heads, d // self.heads)
        q = self.q_norm(q.reshape(shape))
        k = self.k_norm(k.reshape(shape))
        a = attention(q, k, v.reshape(shape), self.impl).reshape(b, n, d)
        a = self.attn_out(a)
        m = self.mlp_out(jax.nn.gelu(m, approximate=False))
        r = (a + m) * self.gamma[...].astype(dt)
        return x + drop_path(r, drop_rate, drop_key).astype(x.dtype)


class PreNormBlock(nnx.Module):
    """Standard pre-norm transformer block (timm Block): x + ls1*attn(LN1 x); x + ls2*mlp(LN2 x).

    Used by the MAE decoders and the DINOv2 / ImageNet-MAE baselines. `init_values=None`: no LayerScale.
    x: (B, N, D) -> (B, N, D).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_dim: int,
        *,
        eps: float = 1e-6,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        init_values: float | None = None,
        dtype=jnp.float32,
        attention_impl: str | None = None,
        rngs: nnx.Rngs,
    ):
        if dim % heads:
            raise ValueError(f"width {dim} not divisible by heads {heads}")
        self.dim, self.heads, self.dtype, self.impl = dim, heads, dtype, attention_impl
        self.norm1 = LayerNorm(dim, eps)
        self.qkv = Linear(dim, 3 * dim, bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.q_norm = LayerNorm(dim // heads, eps) if qk_norm else None
        self.k_norm = LayerNorm(dim // heads, eps) if qk_norm else None
        self.proj = Linear(dim, dim, dtype=dtype, rngs=rngs)
        self.norm2 = LayerNorm(dim, eps)
        self.fc1 = Linear(dim, mlp_dim, dtype=dtype, rngs=rngs)
        self.fc2 = Linear(mlp_dim, dim, dtype=dtype, rngs=rngs)
        if init_values is None:
            self.gamma1 = self.gamma2 = None
        else:
            self.gamma1 = nnx.Param(jnp.full((dim,), init_values, jnp.float32))
            self.gamma2 = nnx.Param(jnp.full((dim,), init_values, jnp.float32))

    def _attn(self, x):
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return self.proj(attention(q, k, v, self.impl).reshape(b, n, d))

    def _mlp(self, y):
        return self.fc2(jax.nn.gelu(self.fc1(y), approximate=False))

    def _scales(self):
        """The (attention, MLP) LayerScale parameters or None (subclasses name them differently)."""
        return self.gamma1, self.gamma2

    def __call__(self, x, *, drop_rate=0.0, drop_key=None):
        dt = self.dtype
        g1, g2 = self._scales()
        k1 = k2 = None
        if drop_key is not None:
            k1, k2 = jax.random.split(drop_key)
        a = self._attn(self.norm1(x).astype(dt))
        if g1 is not None:
            a = a * g1[...].astype(dt)
        x = x + drop_path(a, drop_rate, k1).astype(x.dtype)
        m = self._mlp(self.norm2(x).astype(dt))
        if g2 is not None:
            m = m * g2[...].astype(dt)
        return x + drop_path(m, drop_rate, k2).astype(x.dtype)


class CrossAttention(nnx.Module):
    """Multi-head cross-attention (OpenPhenom decoder): q from `x` (B, T, D), k/v from `ctx` (B, S, D).

    q and kv projections have no bias; the output projection has one. No residual. -> (B, T, D).
    """

    def __init__(self, dim: int, heads: int, *, dtype=jnp.float32, attention_impl=None, rngs: nnx.Rngs):
        self.heads, self.impl = heads, attention_impl
        self.q = Linear(dim, dim, bias=False, dtype=dtype, rngs=rngs)
        self.kv = Linear(dim, 2 * dim, bias=False, dtype=dtype, rngs=rngs)
        self.proj = Linear(dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x, ctx):
        b, t, d = x.shape
        s = ctx.shape[1]
        hd = d // self.heads
        q = self.q(x).reshape(b, t, self.heads, hd)
        kv = self.kv(ctx).reshape(b, s, 2, self.heads, hd)
        o = attention(q, kv[:, :, 0], kv[:, :, 1], self.impl)
        return self.proj(o.reshape(b, t, d))


class Mlp(nnx.Module):
    """fc2(gelu_exact(fc1(x))), (B, T, D) -> (B, T, D)."""

    def __init__(self, dim: int, hidden: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.fc1 = Linear(dim, hidden, dtype=dtype, rngs=rngs)
        self.fc2 = Linear(hidden, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))
