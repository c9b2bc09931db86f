"""Softmax attention implementations behind `model.attention_impl`, chosen per backend.

    out = attention(q, k, v, impl)      # q (B, Tq, N, h), k/v (B, Tk, N, h) -> (B, Tq, N, h); scale 1 / sqrt(h)

impl:
- None (auto): TPU -> "splash"; GPU -> "cudnn" where cuDNN accepts the shapes and dtype, else "xla";
  CPU -> "head_groups".
- "xla": `jax.nn.dot_product_attention(implementation="xla")` (materialises the score matrices).
- "cudnn": cuDNN fused (flash) attention through `jax.nn.dot_product_attention(implementation="cudnn")`. Where
  cuDNN is unavailable or refuses the call (not a GPU, float32 inputs, an unsupported head size), the call falls
  back to "xla" and says so in the log.
- "splash": Pallas splash (flash) attention from `jax.experimental.pallas.ops.tpu`. Sequences are padded to the
  kernel's block multiple (128) and the padded keys are masked out (`splash_block_sizes`). Off TPU it runs in Pallas
  interpret mode (for tests; slow).
- "head_groups": independent groups of two heads (`head_group_attention`), the fastest form on XLA:CPU.
- "chunked": flash attention written in JAX (`chunked_attention`): an online softmax over blocks of 128 keys, a
  custom gradient that recomputes the blocks; it keeps only q, k, v, the output and the row log-sum-exp for the
  backward pass, never a (Tq, Tk) score matrix. Any backend; the pod plan compiles it to model the memory of a
  fused kernel on XLA:CPU.

Each distinct choice is logged once (logger `vitally_jax.attention`): which implementation runs, and why.
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger("vitally_jax.attention")

IMPLS = (None, "xla", "cudnn", "head_groups", "splash", "chunked")

_LANES = 128  # splash kernels tile the sequence in multiples of the TPU's 128 lanes
_MAX_BLOCK_Q = 512
_MAX_BLOCK_KV = 1152
_logged: set = set()


def _log_once(choice: str, why: str) -> None:
    if (choice, why) not in _logged:
        _logged.add((choice, why))
        log.info("attention: %s (%s)", choice, why)


def resolve(impl: str | None, backend: str | None = None) -> str:
    """The implementation `impl` asks for on `backend` (default: JAX's default backend), before any fallback."""
    if impl not in IMPLS:
        raise ValueError(f"model.attention_impl: {impl!r}; expected one of {list(IMPLS)}")
    if impl is not None:
        return impl
    backend = backend or jax.default_backend()
    return {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn", "rocm": "xla"}.get(backend, "head_groups")


def attention(q, k, v, impl: str | None = None):
    """Multi-head softmax attention with the implementation `impl` resolves to (see the module docstring)."""
    choice = resolve(impl)
    if choice == "head_groups":
        _log_once("head_groups", f"{jax.default_backend()}: independent groups of two heads")
        return head_group_attention(q, k, v)
    if choice == "splash":
        interpret = jax.default_backend() != "tpu"
        _log_once("splash", "Pallas interpret mode (not a TPU)" if interpret else "Pallas TPU kernel")
        return splash_attention(q, k, v, interpret=interpret)
    if choice == "cudnn":
        why = cudnn_refusal(q.shape, k.shape, q.dtype)
        if why is None:
            _log_once("cudnn", "cuDNN fused attention")
            return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
        _log_once("xla", f"cuDNN fallback: {why}")
        return xla_attention(q, k, v)
    if choice == "chunked":
        _log_once("chunked", f"flash attention in JAX, blocks of {CHUNK} keys")
        return chunked_attention(q, k, v)
    _log_once("xla", "jax.nn.dot_product_attention, XLA")
    return xla_attention(q, k, v)


def xla_attention(q, k, v):
    """`jax.nn.dot_product_attention` with XLA's implementation (score matrices materialised)."""
    return jax.nn.dot_product_attention(q, k, v, implementation="xla")


# ------------------------------------------------------------------------------------------------------------------
# cuDNN (GPU)
# ------------------------------------------------------------------------------------------------------------------


@functools.cache
def cudnn_refusal(q_shape: tuple, kv_shape: tuple, dtype) -> str | None:
    """None if cuDNN fused attention compiles for these shapes and dtype on the default backend, else why not
    (one line). The probe traces, lowers and compiles the call on abstract inputs once per shape; nothing runs."""
    q = jax.ShapeDtypeStruct(tuple(q_shape), dtype)
    kv = jax.ShapeDtypeStruct(tuple(kv_shape), dtype)
    fn = jax.jit(functools.partial(jax.nn.dot_product_attention, implementation="cudnn"))
    try:
        fn.lower(q, kv, kv).compile()
    except Exception as e:  # cuDNN reports unsupported cases as RuntimeError / NotImplementedError / ValueError
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return f"{type(e).__name__}: {first[:160]}"
    return None


# ------------------------------------------------------------------------------------------------------------------
# Splash attention (TPU, Pallas)
# ------------------------------------------------------------------------------------------------------------------


def splash_block_sizes(tokens: int):
    """-> (padded length, `BlockSizes`) for a sequence of `tokens`.

    The length is padded to the next multiple of 128 (1,025 tokens of L/8 and G/8 -> 1,152 = 9 x 128; 257 of
    S/16 -> 384); the query block is the largest multiple of 128 that divides it and is <= 512 (384 for both), the
    key block the largest <= 1,152 (the whole padded sequence for both: one pass over the keys per query block).
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    padded = -(-tokens // _LANES) * _LANES
    units = padded // _LANES

    def largest(limit):
        return _LANES * max(d for d in range(1, units + 1) if units % d == 0 and d * _LANES <= limit)

    bq, bkv = largest(_MAX_BLOCK_Q), largest(_MAX_BLOCK_KV)
    sizes = sa.BlockSizes(
        block_q=bq,
        block_kv=bkv,
        block_kv_compute=bkv,
        block_q_dkv=bq,
        block_kv_dkv=bkv,
        block_kv_dkv_compute=bkv,
        block_q_dq=bq,
        block_kv_dq=bkv,
    )
    return padded, sizes


@functools.cache
def _splash_kernel(q_tokens: int, kv_tokens: int, heads: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    pq, sizes = splash_block_sizes(q_tokens)
    pk, _ = splash_block_sizes(kv_tokens)
    if pq != pk:  # cross-attention of unequal lengths: one tiling for both
        p = max(pq, pk)
        pq = pk = p
        sizes = splash_block_sizes(p)[1]
    mask = np.zeros((pq, pk), dtype=bool)
    mask[:, :kv_tokens] = True  # padded keys never receive weight; padded queries see the real keys (no NaN)
    multi = sa.MultiHeadMask([sa.NumpyMask(mask) for _ in range(heads)])
    with jax.ensure_compile_time_eval():  # the mask tables are constants, built once (also inside a trace)
        kernel = sa.make_splash_mha(multi, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    return kernel, pq, pk


def splash_attention(q, k, v, *, interpret: bool = False):
    """Splash (flash) attention: (B, Tq, N, h) x (B, Tk, N, h) -> (B, Tq, N, h), scale 1 / sqrt(h).

    Pads Tq, Tk to the block multiple, masks the padded keys, runs the kernel per batch element (vmap) over the
    (N, T, h) layout it expects, and drops the padded query rows."""
    b, tq, n, h = q.shape
    tk = k.shape[1]
    kernel, pq, pk = _splash_kernel(tq, tk, n, interpret)

    def prep(x, t, p, scale=None):
        if scale is not None:
            x = x * jnp.asarray(scale, x.dtype)
        return jnp.pad(x, ((0, 0), (0, p - t), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    out = jax.vmap(kernel)(prep(q, tq, pq, 1.0 / math.sqrt(h)), prep(k, tk, pk), prep(v, tk, pk))
    return out.transpose(0, 2, 1, 3)[:, :tq].astype(q.dtype)


# ------------------------------------------------------------------------------------------------------------------
# Chunked flash attention in JAX (any backend; the fused-attention memory model of the pod plan)
# ------------------------------------------------------------------------------------------------------------------

CHUNK = 128


def _key_blocks(x, chunk):
    """(B, Tk, N, h) -> (nblocks, B, chunk, N, h), zero-padded; and the (nblocks, chunk) validity mask."""
    b, t, n, h = x.shape
    nb = -(-t // chunk)
    x = jnp.pad(x, ((0, 0), (0, nb * chunk - t), (0, 0), (0, 0)))
    valid = (jnp.arange(nb * chunk) < t).reshape(nb, chunk)
    return x.reshape(b, nb, chunk, n, h).transpose(1, 0, 2, 3, 4), valid


def _chunked_forward(q, k, v, chunk):
    scale = 1.0 / math.sqrt(q.shape[-1])
    qs = q.astype(jnp.float32) * scale
    kb, valid = _key_blocks(k, chunk)
    vb, _ = _key_blocks(v, chunk)
    b, tq, n, h = q.shape

    def body(carry, blk):
        m, denom, acc = carry
        kc, vc, ok = blk
        s = jnp.einsum("bqnh,bknh->bnqk", qs, kc.astype(jnp.float32))
        s = jnp.where(ok[None, None, None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.exp(s - m_new[..., None])
        corr = jnp.exp(m - m_new)
        denom = denom * corr + jnp.sum(p, axis=-1)
        acc = acc * corr.transpose(0, 2, 1)[..., None] + jnp.einsum("bnqk,bknh->bqnh", p, vc.astype(jnp.float32))
        return (m_new, denom, acc), None

    init = (
        jnp.full((b, n, tq), -jnp.inf, jnp.float32),
        jnp.zeros((b, n, tq), jnp.float32),
        jnp.zeros((b, tq, n, v.shape[-1]), jnp.float32),
    )
    (m, denom, acc), _ = jax.lax.scan(body, init, (kb, vb, valid))
    out = acc / denom.transpose(0, 2, 1)[..., None]
    return out.astype(q.dtype), m + jnp.log(denom)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked(q, k, v, chunk):
    return _chunked_forward(q, k, v, chunk)[0]


def _chunked_fwd(q, k, v, chunk):
    out, lse = _chunked_forward(q, k, v, chunk)
    return out, (q, k, v, out, lse)


def _chunked_bwd(chunk, res, d_out):
    q, k, v, out, lse = res
    scale = 1.0 / math.sqrt(q.shape[-1])
    qs = q.astype(jnp.float32) * scale
    do = d_out.astype(jnp.float32)
    delta = jnp.sum(do * out.astype(jnp.float32), axis=-1).transpose(0, 2, 1)  # (B, N, Tq)
    kb, valid = _key_blocks(k, chunk)
    vb, _ = _key_blocks(v, chunk)

    def body(dq, blk):
        kc, vc, ok = blk
        kc, vc = kc.astype(jnp.float32), vc.astype(jnp.float32)
        s = jnp.einsum("bqnh,bknh->bnqk", qs, kc)
        p = jnp.where(ok[None, None, None, :], jnp.exp(s - lse[..., None]), 0.0)
        dv = jnp.einsum("bnqk,bqnh->bknh", p, do)
        ds = p * (jnp.einsum("bqnh,bknh->bnqk", do, vc) - delta[..., None])
        dq = dq + jnp.einsum("bnqk,bknh->bqnh", ds, kc) * scale
        dk = jnp.einsum("bnqk,bqnh->bknh", ds, qs)
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(body, jnp.zeros(q.shape, jnp.float32), (kb, vb, valid))

    def unblock(x, like):
        nb, b, c, n, h = x.shape
        return x.transpose(1, 0, 2, 3, 4).reshape(b, nb * c, n, h)[:, : like.shape[1]].astype(like.dtype)

    return dq.astype(q.dtype), unblock(dk, k), unblock(dv, v)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def chunked_attention(q, k, v, chunk: int = CHUNK):
    """Flash attention in JAX: (B, Tq, N, h) x (B, Tk, N, h) -> (B, Tq, N, h), scale 1 / sqrt(h), float32
    accumulation. Live score tiles are (B, N, Tq, chunk); the backward pass recomputes them from the saved row
    log-sum-exp (the flash-attention recurrences), so no (Tq, Tk) matrix is kept between forward and backward."""
    return _chunked(q, k, v, chunk)


# ------------------------------------------------------------------------------------------------------------------
# Head groups (CPU)
# ------------------------------------------------------------------------------------------------------------------


def head_group_attention(q, k, v, heads_per_group: int = 2):
    """Softmax attention as independent groups of heads, concatenated; same shapes and result as
    `jax.nn.dot_product_attention` (to float32 rounding).

    Why: XLA:CPU's batched (T x h) @ (h x T) matmuls over all B x N heads run well below the rate of PyTorch's
    bmm. Split into groups, the smaller batched matmuls run faster, and the independent groups' matmuls and
    softmaxes can run concurrently in XLA's executor. `python tools/perf/profile_train_step.py` times attention
    forward + backward both ways at the decoder's shapes, and the train step with `attention_impl='xla'` beside
    this default."""
    n = q.shape[2]
    g = heads_per_group if n % heads_per_group == 0 else 1
    scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)

    def one(sl):
        s = jnp.einsum("bqnh,bknh->bnqk", q[:, :, sl] * scale, k[:, :, sl], preferred_element_type=jnp.float32)
        p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
        return jnp.einsum("bnqk,bknh->bqnh", p, v[:, :, sl])

    return jnp.concatenate([one(slice(i, i + g)) for i in range(0, n, g)], axis=2)
