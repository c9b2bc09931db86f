"""Gradient accumulation inside the train step: sliced == whole batch (loss, gradients, update); the slice rules;
the automatic remat policy of a CPU backend gives the step without remat."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vitally_jax import config_checks, config_lib, sharding, train
from vitally_jax.errors import ConfigError


def _config(batch=8):
    c = config_lib.load("tiny")
    c.input.global_batch = batch
    c.model.drop_path_rate = 0.0
    return c


def _one_step(config, micro: int):
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    mae_cfg = train.model_config(config)
    graphdef, _, state_sh, schedules, create = train.build_abstract(config, mae_cfg, mesh)
    step = train.jit_train_step(
        train.make_train_step(graphdef, mae_cfg, schedules, use_drop_path=False, micro_batch=micro), state_sh, mesh
    )
    b, crop, c = config.input.global_batch, config.input.crop, mae_cfg.encoder.in_chans
    images = np.random.default_rng(3).integers(0, 256, (b, crop, crop, c), dtype=np.uint8)
    with jax.set_mesh(mesh):
        state = jax.jit(lambda: nnx.split(create())[1], out_shardings=state_sh)()
        before = jax.tree.map(np.asarray, state)
        key = jax.device_put(jax.random.key(0), NamedSharding(mesh, P()))
        batch = {"image": jax.device_put(images, sharding.batch_sharding(mesh))}
        state, metrics = step(state, batch, key)
    return before, jax.tree.map(np.asarray, state), {k: float(v) for k, v in metrics.items()}


@pytest.fixture(scope="module")
def whole():
    return _one_step(_config(), 0)


def _same_update(got, ref, before) -> float:
    """Fraction of the updated values that agree (where the reference moved a parameter)."""
    same = total = 0
    for a, b, a0 in zip(jax.tree.leaves(got), jax.tree.leaves(ref), jax.tree.leaves(before), strict=True):
        if np.abs(b - a0).max() > 0:
            same += int(np.isclose(a, b, rtol=1e-5, atol=1e-7).sum())
            total += a.size
    assert total > 1000
    return same / total


def test_auto_remat_is_dots_saveable_on_cpu_and_gives_the_same_step(whole):
    """model.remat 'auto' (the default) resolves per backend; on CPU its step (matmul outputs kept, the rest
    recomputed in the backward pass) equals the step that stores every intermediate."""
    assert config_lib.load("tiny").model.remat == "auto"
    assert train.auto_remat("cpu") == "dots_saveable" and train.auto_remat("gpu") == train.auto_remat("tpu") == "none"
    assert train.model_config(_config()).encoder.remat == "dots_saveable"
    c = _config()
    c.model.remat = "none"
    assert train.model_config(c).encoder.remat == "none"
    before, ref, m_ref = whole
    _, got, m = _one_step(c, 0)
    for k in ("loss", "loss_rec", "loss_fourier", "grad_norm"):
        assert m[k] == pytest.approx(m_ref[k], rel=2e-5), k
    assert _same_update(got, ref, before) > 0.999


@pytest.mark.parametrize("micro", [2, 4])
def test_sliced_step_equals_the_whole_batch(whole, micro):
    """The jitted step: the same losses and gradient norm; the same update wherever the gradient is not ~0 (Lion
    takes the sign of the gradient, which float rounding may flip where it is ~0)."""
    before, ref, m_ref = whole
    _, got, m = _one_step(_config(), micro)
    for k in ("loss", "loss_rec", "loss_fourier", "grad_norm"):
        assert m[k] == pytest.approx(m_ref[k], rel=2e-5), k
    assert _same_update(got, ref, before) > 0.999


def test_accumulated_gradients_equal_whole_batch_gradients():
    """The gradients themselves, element by element (no sign step in between)."""
    import jax.numpy as jnp

    from vitally_jax.models.mae import MAE

    cfg = train.model_config(_config())
    model = MAE(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for _, var in nnx.iter_graph(model):  # move LayerScale and biases off their init so every block contributes
        if isinstance(var, nnx.Param):
            x = np.asarray(var[...])
            var[...] = (x + 0.05 * rng.standard_normal(x.shape)).astype(x.dtype)
    crop = cfg.encoder.img_size
    x = jnp.asarray(rng.standard_normal((8, crop, crop, cfg.encoder.in_chans)), jnp.float32)
    noise = jnp.asarray(rng.random((8, train.num_tokens(cfg))), jnp.float32)

    def loss_fn(m):
        out = m(x, noise=noise)
        return out["loss"], out

    (loss, aux), g_ref = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    for micro in (1, 2, 4):
        l_acc, a_acc, g_acc = jax.jit(lambda m, x, n, k=micro: train._accumulated_grads(m, x, n, None, k))(
            model, x, noise
        )
        assert float(l_acc) == pytest.approx(float(loss), rel=1e-5)
        assert float(a_acc["loss_rec"]) == pytest.approx(float(aux["loss_rec"]), rel=1e-5)
        leaves_ref, leaves = jax.tree.leaves(g_ref), jax.tree.leaves(g_acc)
        assert len(leaves) == len(leaves_ref) > 10
        scale = max(float(np.abs(b).max()) for b in leaves_ref)  # leaves whose true gradient is 0 hold only rounding
        for a, b in zip(leaves, leaves_ref, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6 * scale)


def test_slice_rules():
    c = _config(batch=256)
    cfg = train.model_config(c)
    one = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    tokens = train.num_tokens(cfg) + 1
    assert 256 * tokens > 2176  # the automatic rule has to slice this batch
    from vitally_jax.embedding.blocks import cpu_micro_batch

    auto = train.train_micro_batch(c, cfg, one)
    assert auto == cpu_micro_batch(256, tokens) and 2 <= auto < 256 and 256 % auto == 0 and auto * tokens <= 2176
    assert train.train_micro_batch(c, cfg, sharding.make_mesh((8, 1, 1))) == 0  # data parallel: whole batch
    c.input.micro_batch = 16
    assert train.train_micro_batch(c, cfg, one) == 16
    with pytest.raises(ConfigError, match="no data parallelism|without data parallelism"):
        train.train_micro_batch(c, cfg, sharding.make_mesh((8, 1, 1)))
    c.input.micro_batch = 0
    assert train.train_micro_batch(c, cfg, one) == 0
    for bad in (5, -1):
        c.input.micro_batch = bad
        with pytest.raises(ConfigError, match=r"config\.input\.micro_batch: .*expected None \(auto\), 0"):
            config_checks.check_values(c)
