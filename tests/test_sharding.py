"""Sharded forward, MAE loss and gradients equal the single-device values (guards the sharding trap)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vitally_jax import sharding
from vitally_jax.errors import ConfigError
from vitally_jax.models.mae import MAE, mae_config
from vitally_jax.models.vit import ViTEncoder, vit_config

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]


def random_state(ctor, seed=0):
    graphdef, state = nnx.split(nnx.eval_shape(ctor))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = sharding._path_str(path)
        z = rng.standard_normal(leaf.shape).astype(np.float32)
        if name.endswith("scale"):
            return 1.0 + 0.1 * z
        if "gamma" in name:
            return 0.5 + 0.1 * z
        if name.endswith(("kernel", "in_proj")):
            return z / np.sqrt(leaf.shape[-2])
        return 0.2 * z

    return graphdef, jax.tree_util.tree_map_with_path(fill, state)


@pytest.fixture(scope="module")
def setup():
    assert jax.device_count() == 8
    cfg = mae_config("mu/8", num_heads=4)  # heads and widths divisible by 'model'
    graphdef, state = random_state(lambda: MAE(cfg, rngs=nnx.Rngs(0)))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(8, 32, 32, 6)), jnp.float32)
    noise = jax.random.uniform(jax.random.key(2), (8, 16))

    def step(state, x, noise):
        def loss_fn(s):
            m = nnx.merge(graphdef, s)
            out = m(x, noise=noise)
            return out["loss"], (out["pred"], out["latent"])  # latent: the encoder forward

        (loss, (pred, emb)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state)
        return loss, pred, emb, grads

    single = jax.jit(step)(jax.tree.map(jnp.asarray, state), x, noise)
    return graphdef, state, x, noise, step, jax.tree.map(np.asarray, single)


@pytest.mark.parametrize("shape", MESHES)
def test_sharded_step_equals_single_device(setup, shape):
    graphdef, state, x, noise, step, single = setup
    mesh = sharding.make_mesh(shape)
    state_sh = sharding.param_shardings(state, mesh)
    batch_sh = sharding.batch_sharding(mesh)
    rep = NamedSharding(mesh, P())
    with jax.set_mesh(mesh):
        st = jax.device_put(state, state_sh)
        xs, ns = jax.device_put(x, batch_sh), jax.device_put(noise, batch_sh)
        fn = jax.jit(
            step, in_shardings=(state_sh, batch_sh, batch_sh), out_shardings=(rep, batch_sh, batch_sh, state_sh)
        )
        loss, pred, emb, grads = fn(st, xs, ns)
    placed = {sharding._path_str(p): a.sharding.spec for p, a in jax.tree_util.tree_flatten_with_path(st)[0]}
    expect = P(None, "fsdp" if shape[1] > 1 else None, "model" if shape[2] > 1 else None)
    assert placed["encoder/blocks/in_proj"] == expect  # parameters really are sharded
    # sharded matmuls add their partial sums in another order: differences of a few ulps of the largest value
    # (|pred| and |emb| reach ~5, where one float32 ulp is 4.8e-7), hence tolerances relative to that scale
    np.testing.assert_allclose(loss, single[0], atol=1e-5)
    np.testing.assert_allclose(pred, single[1], atol=1e-5 * np.abs(single[1]).max())
    np.testing.assert_allclose(emb, single[2], atol=1e-5 * np.abs(single[2]).max())  # encoder output (visible tokens)
    flat_s, _ = jax.tree_util.tree_flatten_with_path(single[3])
    flat_m = jax.tree.leaves(grads)
    for (path, a), b in zip(flat_s, flat_m):
        np.testing.assert_allclose(np.asarray(b), a, atol=1e-5, err_msg=sharding._path_str(path))


def test_rules_never_shard_the_layer_axis_and_fall_back_when_indivisible():
    mesh = sharding.make_mesh((2, 2, 2))
    assert sharding.spec_for("encoder/blocks/in_proj", (12, 64, 448), mesh) == P(None, "fsdp", "model")
    assert sharding.spec_for("blocks/mlp_out/kernel", (12, 256, 64), mesh) == P(None, "model", "fsdp")
    assert sharding.spec_for("blocks/attn_out/kernel", (12, 65, 63), mesh) == P(None, None, None)
    assert sharding.spec_for("cls_token", (1, 1, 64), mesh) == P()
    assert sharding.spec_for("x/in_proj", (64, 448), mesh, rules=[(r"in_proj", (("fsdp", "model"), None))]) == P(
        ("fsdp", "model"), None
    )
    for shape in MESHES:
        m = sharding.make_mesh(shape)
        assert m.axis_names == ("data", "fsdp", "model") and tuple(m.shape.values()) == shape
    assert tuple(sharding.make_mesh((-1, 2, 1)).shape.values()) == (4, 2, 1)
    with pytest.raises(ConfigError, match="at most one -1"):
        sharding.make_mesh((-1, -1, 2))
    with pytest.raises(ConfigError, match="needs 12 devices"):
        sharding.make_mesh((3, 4, 1))


def test_constrain_batch_is_a_noop_without_mesh_and_create_sharded():
    x = jnp.ones((8, 4))
    assert sharding.constrain_batch(x) is x
    mesh = sharding.make_mesh((2, 2, 2))
    cfg = vit_config("mu/8", num_heads=4, depth=2)
    model = sharding.create_sharded(lambda: ViTEncoder(cfg, rngs=nnx.Rngs(0)), mesh)
    w = model.blocks.in_proj[...]
    assert w.sharding.spec == P(None, "fsdp", "model")
    assert w.addressable_shards[0].data.shape == (2, 32, 224)
    assert np.asarray(model.blocks.gamma[...]).max() == np.float32(1e-4)


@pytest.mark.parametrize("fourier", ["reference", "masked", "image"])
def test_fourier_loss_is_computed_per_batch_shard(fourier):
    """XLA's SPMD partitioner replicates an FFT over the global batch on every device (memory growing with the
    device count); the loss runs it shard by shard. Every FFT in the compiled step sees 1 crop of the 8."""
    import re

    cfg = mae_config("mu/8", num_heads=4, fourier=fourier, img_size=32)
    graphdef, state = random_state(lambda: MAE(cfg, rngs=nnx.Rngs(0)))
    mesh = sharding.make_mesh((8, 1, 1))
    x = jax.device_put(jnp.zeros((8, 32, 32, 6), jnp.float32), sharding.batch_sharding(mesh))
    noise = jax.device_put(jnp.zeros((8, 16), jnp.float32), sharding.batch_sharding(mesh))
    state = jax.device_put(state, sharding.param_shardings(state, mesh))

    def grads(state, x, noise):
        return jax.grad(lambda s: nnx.merge(graphdef, s)(x, noise=noise)["loss"])(state)

    with jax.set_mesh(mesh):
        hlo = jax.jit(grads).lower(state, x, noise).compile().as_text()
    shapes = re.findall(r"= c64\[(\d+),[\d,]*\][^=]*? fft\(", hlo)
    assert shapes, "no FFT found in the compiled step"
    assert set(shapes) == {"1"}, f"FFT leading (batch) dims {sorted(set(shapes))}; expected 1 crop per device"
