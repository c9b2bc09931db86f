"""Acceptance B: optax Lion + our one-cycle schedule == direct numpy Lion and PyTorch OneCycleLR formulas."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from vitally_jax.errors import ConfigError
from vitally_jax.optim import make_optimizer, one_cycle_b1, one_cycle_lr


def torch_one_cycle(step, total, max_lr, pct_start=0.1, div=25.0, final_div=1e4, base_m=0.85, max_m=0.95):
    """PyTorch OneCycleLR.get_lr (anneal_strategy='cos', three_phase=False), restated in plain Python."""
    initial = max_lr / div
    min_lr = initial / final_div
    phases = [
        dict(end_step=float(pct_start * total) - 1, start_lr=initial, end_lr=max_lr, start_m=max_m, end_m=base_m),
        dict(end_step=total - 1, start_lr=max_lr, end_lr=min_lr, start_m=base_m, end_m=max_m),
    ]

    def cos(start, end, pct):
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)

    start_step = 0
    for i, ph in enumerate(phases):
        if step <= ph["end_step"] or i == len(phases) - 1:
            pct = (step - start_step) / (ph["end_step"] - start_step)
            return cos(ph["start_lr"], ph["end_lr"], pct), cos(ph["start_m"], ph["end_m"], pct)
        start_step = ph["end_step"]


def optax_cfg(**kw):
    c = ml_collections.ConfigDict(
        dict(
            name="lion",
            peak_lr=3e-2,
            b1=0.9,
            b2=0.95,
            weight_decay=0.05,
            decay_1d=False,
            pct_start=0.1,
            div_factor=25.0,
            final_div_factor=1e4,
            cycle_momentum=True,
            base_momentum=0.85,
            max_momentum=0.95,
            grad_clip_norm=None,
            mu_dtype=None,
        )
    )
    c.update(kw)
    return c


@pytest.mark.parametrize("total", [100, 977])
def test_schedule_matches_pytorch_formulas(total):
    lr = one_cycle_lr(3e-5, total)
    b1 = one_cycle_b1(total)
    steps = [0, 1, 5, int(0.1 * total) - 2, int(0.1 * total) - 1, int(0.1 * total), total // 2, total - 2, total - 1]
    for s in steps:
        want_lr, want_b1 = torch_one_cycle(s, total, 3e-5)
        assert float(lr(s)) == pytest.approx(want_lr, rel=2e-6, abs=1e-16), s
        assert float(b1(s)) == pytest.approx(want_b1, rel=2e-6), s
    # landmarks of the recipe: start peak/25, peak at the end of warm-up, end peak/25/1e4
    assert float(lr(0)) == pytest.approx(3e-5 / 25, rel=1e-6)
    all_lr = np.asarray(jax.vmap(lr)(jnp.arange(total)))
    assert all_lr.max() == pytest.approx(3e-5, rel=1e-3) and all_lr.argmax() in (int(0.1 * total) - 1, int(0.1 * total))
    assert float(lr(total - 1)) == pytest.approx(3e-5 / 25 / 1e4, rel=1e-5)
    assert float(b1(0)) == pytest.approx(0.95) and np.asarray(jax.vmap(b1)(jnp.arange(total))).min() == pytest.approx(
        0.85, rel=1e-3
    )


def numpy_lion(params, grads_seq, lrs, b1s, b2, wd, decay, clip=None):
    """Direct Lion: p *= 1 - lr*wd; p -= lr*sign(b1 m + (1-b1) g); m = b2 m + (1-b2) g."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    for g, lr, b1 in zip(grads_seq, lrs, b1s):
        g = {k: v.astype(np.float64) for k, v in g.items()}
        if clip is not None:
            norm = math.sqrt(sum(float((v**2).sum()) for v in g.values()))
            g = {k: v * min(1.0, clip / norm) for k, v in g.items()}
        for k in p:
            if decay[k]:
                p[k] = p[k] * (1 - lr * wd)
            p[k] = p[k] - lr * np.sign(b1 * m[k] + (1 - b1) * g[k])
            m[k] = b2 * m[k] + (1 - b2) * g[k]
    return p


@pytest.mark.parametrize("cycle,clip", [(True, None), (False, 0.5)])
def test_lion_matches_numpy(cycle, clip):
    rng = np.random.default_rng(0)
    params = {"kernel": rng.normal(size=(4, 3)).astype(np.float32), "bias": rng.normal(size=(3,)).astype(np.float32)}
    total = 30
    grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()} for _ in range(12)]
    cfg = optax_cfg(cycle_momentum=cycle, grad_clip_norm=clip)
    tx, sched = make_optimizer(cfg, total_steps=total)
    state = tx.init(jax.tree.map(jnp.asarray, params))
    p = jax.tree.map(jnp.asarray, params)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p))
    for g in grads:
        u, state = update(jax.tree.map(jnp.asarray, g), state, p)
        p = optax.apply_updates(p, u)
    lrs = [torch_one_cycle(s, total, 3e-2)[0] for s in range(len(grads))]
    b1s = [torch_one_cycle(s, total, 3e-2)[1] if cycle else 0.9 for s in range(len(grads))]
    want = numpy_lion(params, grads, lrs, b1s, 0.95, 0.05, {"kernel": True, "bias": False}, clip=clip)
    for k in params:
        np.testing.assert_allclose(np.asarray(p[k]), want[k], rtol=1e-5, atol=1e-6)
    # the bias is not decayed, the weight matrix (named `kernel`) is: decaying the bias too changes it
    want_all = numpy_lion(params, grads, lrs, b1s, 0.95, 0.05, {"kernel": True, "bias": True}, clip=clip)
    assert np.abs(want_all["bias"] - np.asarray(p["bias"])).max() > 1e-5
    assert float(sched["b1"](3)) == pytest.approx(b1s[3], rel=1e-6)


def numpy_adamw(params, grads_seq, lrs, b1, b2, wd, decay, eps=1e-8):
    """AdamW (decoupled decay lr * wd * p, bias-corrected moments), written out."""
    p = {k: v.astype(np.float64).copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, (g, lr) in enumerate(zip(grads_seq, lrs), start=1):
        for k in p:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            step = (m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - b2**t)) + eps)
            p[k] = p[k] - lr * (step + (wd * p[k] if decay[k] else 0.0))
    return p


def test_adamw_option_matches_numpy():
    rng = np.random.default_rng(1)
    params = {"kernel": rng.normal(size=(4, 3)).astype(np.float32), "bias": rng.normal(size=(3,)).astype(np.float32)}
    grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()} for _ in range(10)]
    tx, _ = make_optimizer(optax_cfg(name="adamw", grad_clip_norm=None, cycle_momentum=False), total_steps=30)
    state, p = tx.init(jax.tree.map(jnp.asarray, params)), jax.tree.map(jnp.asarray, params)
    for g in grads:
        u, state = tx.update(jax.tree.map(jnp.asarray, g), state, p)
        p = optax.apply_updates(p, u)
    lrs = [torch_one_cycle(s, 30, 3e-2)[0] for s in range(len(grads))]
    want = numpy_adamw(params, grads, lrs, 0.9, 0.95, 0.05, {"kernel": True, "bias": False})
    for k in params:
        np.testing.assert_allclose(np.asarray(p[k]), want[k], rtol=1e-5, atol=1e-6)


def test_bad_optimizer_config_is_one_line_config_error():
    with pytest.raises(ConfigError, match="optax.name"):
        make_optimizer(optax_cfg(name="adam"), total_steps=10)
    with pytest.raises(ConfigError, match="pct_start"):
        make_optimizer(optax_cfg(pct_start=1.5), total_steps=10)
    with pytest.raises(ConfigError, match="warm-up"):
        make_optimizer(optax_cfg(pct_start=0.1), total_steps=5)
