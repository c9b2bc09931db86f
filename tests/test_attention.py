"""Attention implementations: splash (Pallas, interpret mode on CPU) and cuDNN's fallback against XLA attention."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitally_jax.models import attention as att
from vitally_jax.models import layers
from vitally_jax.models.vit import vit_config

# float32 attention over T <= 257 keys: softmax-weighted sums of O(1) values; the two implementations differ only
# in summation order (blocked online softmax vs one pass), a few ulps per output, far below 1e-5.
TOL = 1e-5


def _qkv(b, t, n, h, seed=0, tk=None):
    ks = jax.random.split(jax.random.key(seed), 3)
    tk = tk or t
    return (
        jax.random.normal(ks[0], (b, t, n, h), jnp.float32),
        jax.random.normal(ks[1], (b, tk, n, h), jnp.float32),
        jax.random.normal(ks[2], (b, tk, n, h), jnp.float32),
    )


def _grads(fn, q, k, v, cot):
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * cot), argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize("tokens", [257, 65])  # S/16 at 256 px (padded to 384); a length far from a block multiple
def test_splash_interpret_matches_xla_forward_and_gradients(tokens):
    q, k, v = _qkv(2, tokens, 2, 32)
    splash = jax.jit(lambda q, k, v: att.splash_attention(q, k, v, interpret=True))
    out = splash(q, k, v)
    ref = att.xla_attention(q, k, v)
    assert out.shape == ref.shape == (2, tokens, 2, 32)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=TOL, rtol=0)
    cot = jax.random.normal(jax.random.key(7), ref.shape, jnp.float32)
    g_splash = _grads(lambda q, k, v: att.splash_attention(q, k, v, interpret=True), q, k, v, cot)
    g_xla = _grads(att.xla_attention, q, k, v, cot)
    for name, a, b in zip("qkv", g_splash, g_xla):
        assert np.all(np.isfinite(np.asarray(a))), name
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=TOL, rtol=0, err_msg=f"d{name}")


def test_splash_cross_attention_unequal_lengths():
    q, k, v = _qkv(1, 70, 2, 16, seed=3, tk=200)
    out = jax.jit(lambda q, k, v: att.splash_attention(q, k, v, interpret=True))(q, k, v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(att.xla_attention(q, k, v)), atol=TOL, rtol=0)


def test_splash_block_sizes_for_the_model_sequence_lengths():
    # L/8 and G/8 at 256 px: 1 + 32 x 32 = 1,025 tokens; S/16: 1 + 16 x 16 = 257
    padded, bs = att.splash_block_sizes(1025)
    assert padded == 1152 and padded % bs.block_q == 0 and padded % bs.block_kv == 0
    assert (bs.block_q, bs.block_kv) == (384, 1152)
    padded, bs = att.splash_block_sizes(257)
    assert (padded, bs.block_q, bs.block_kv) == (384, 384, 384)
    for t in (1, 65, 128, 129, 2049):
        padded, bs = att.splash_block_sizes(t)
        assert padded >= t and padded % 128 == 0 and padded - t < 128
        assert bs.block_q % 128 == 0 and padded % bs.block_q == 0 and bs.block_q <= 512
        assert bs.block_kv % 128 == 0 and padded % bs.block_kv == 0 and bs.block_kv <= 1152
        assert bs.has_backward_blocks


def test_splash_at_1025_tokens_matches_xla():
    q, k, v = _qkv(1, 1025, 1, 16, seed=5)
    out = jax.jit(lambda q, k, v: att.splash_attention(q, k, v, interpret=True))(q, k, v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(att.xla_attention(q, k, v)), atol=TOL, rtol=0)


def test_cudnn_falls_back_to_xla_where_cudnn_is_missing(caplog):
    # on this CPU backend cuDNN really is absent: the probe's compile fails and the call must run XLA attention
    q, k, v = _qkv(2, 33, 4, 16, seed=1)
    why = att.cudnn_refusal(q.shape, k.shape, q.dtype)
    assert why is not None and "cuDNN" in why
    att._logged.clear()
    with caplog.at_level(logging.INFO, logger="vitally_jax.attention"):
        out = jax.jit(lambda q, k, v: att.attention(q, k, v, "cudnn"))(q, k, v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(att.xla_attention(q, k, v)), atol=TOL, rtol=0)
    lines = [r.getMessage() for r in caplog.records if r.name == "vitally_jax.attention"]
    assert len(lines) == 1 and lines[0].startswith("attention: xla (cuDNN fallback:"), lines
    # and gradients flow through the fallback
    cot = jnp.ones_like(out)
    g = _grads(lambda q, k, v: att.attention(q, k, v, "cudnn"), q, k, v, cot)
    g_ref = _grads(att.xla_attention, q, k, v, cot)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=TOL, rtol=0)


def test_auto_choice_per_backend_and_one_log_line(caplog):
    assert att.resolve(None, "tpu") == "splash"
    assert att.resolve(None, "gpu") == "cudnn"
    assert att.resolve(None, "cpu") == "head_groups"
    assert att.resolve("xla", "tpu") == "xla"
    with pytest.raises(ValueError, match="model.attention_impl: 'flash'"):
        att.resolve("flash")
    q, k, v = _qkv(1, 17, 4, 8, seed=2)
    att._logged.clear()
    with caplog.at_level(logging.INFO, logger="vitally_jax.attention"):
        for _ in range(3):
            out = layers.attention(q, k, v, None)
    lines = [r.getMessage() for r in caplog.records if r.name == "vitally_jax.attention"]
    assert lines == ["attention: head_groups (cpu: independent groups of two heads)"]
    np.testing.assert_allclose(np.asarray(out), np.asarray(att.xla_attention(q, k, v)), atol=TOL, rtol=0)


def test_splash_is_a_valid_model_option():
    assert vit_config("S/16", attention_impl="splash").attention_impl == "splash"
    assert "splash" in layers.ATTENTION_IMPLS


@pytest.mark.parametrize("tokens,chunk", [(257, 128), (65, 16), (40, 128)])
def test_chunked_flash_attention_matches_xla_forward_and_gradients(tokens, chunk):
    q, k, v = _qkv(2, tokens, 2, 16, seed=4)
    fn = jax.jit(lambda q, k, v: att.chunked_attention(q, k, v, chunk))
    np.testing.assert_allclose(np.asarray(fn(q, k, v)), np.asarray(att.xla_attention(q, k, v)), atol=TOL, rtol=0)
    cot = jax.random.normal(jax.random.key(9), q.shape, jnp.float32)
    g = _grads(lambda q, k, v: att.chunked_attention(q, k, v, chunk), q, k, v, cot)
    g_ref = _grads(att.xla_attention, q, k, v, cot)
    for name, a, b in zip("qkv", g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=TOL, rtol=0, err_msg=f"d{name}")


def test_chunked_attention_keeps_no_score_matrix_for_the_backward_pass():
    # what the gradient saves from the forward: q, k, v, the output and the (B, N, Tq) log-sum-exp, never (Tq, Tk)
    b, t, n, h = 2, 300, 2, 16
    q, k, v = _qkv(b, t, n, h, seed=6)
    _, res = jax.vjp(lambda q, k, v: att.chunked_attention(q, k, v), q, k, v)
    shapes = sorted(tuple(x.shape) for x in jax.tree.leaves(res))
    assert not any(s[-1] == t and s[-2] == t for s in shapes), shapes
    assert max(int(np.prod(s)) for s in shapes) == b * t * n * h
