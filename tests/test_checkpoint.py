"""Acceptance D: restore onto another mesh == identical parameters; export -> load_encoder == identical embeddings."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import vitally_jax
from vitally_jax import checkpoint as ckpt
from vitally_jax import config_lib, sharding, train
from vitally_jax.errors import CheckpointError


def tiny_config():
    c = config_lib.load("tiny")
    c.total_steps = 40
    return c


def create_on(config, mesh):
    mae_cfg = train.model_config(config)
    graphdef, abs_state, state_sh, _, create = train.build_abstract(config, mae_cfg, mesh)
    with jax.set_mesh(mesh):
        state = jax.jit(lambda: nnx.split(create())[1], out_shardings=state_sh)()
    return graphdef, abs_state, state_sh, state, mae_cfg


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A (model, optimizer) state on mesh (8,1,1), moved off its init, saved by the training manager."""
    config = tiny_config()
    mesh = sharding.make_mesh((-1, 1, 1))
    graphdef, abs_state, state_sh, state, mae_cfg = create_on(config, mesh)
    # move every parameter (incl. LayerScale, biases) and the optimiser moments away from their init
    rng = np.random.default_rng(0)
    state = jax.tree.map(
        lambda x: (
            jax.device_put((np.asarray(x) + 0.01 * rng.normal(size=x.shape)).astype(x.dtype), x.sharding)
            if jnp.issubdtype(x.dtype, jnp.floating)
            else x
        ),
        state,
    )
    wd = tmp_path_factory.mktemp("ckpt")
    mngr = ckpt.make_manager(wd, keep=2)
    ckpt.save(mngr, 7, state[0], state[1], None, {"step": 7, "process_count": 1}, force=True)
    mngr.wait_until_finished()
    mngr.close()
    return config, wd, graphdef, state, mae_cfg


@pytest.mark.parametrize("shape", [(2, 4, 1), (1, 4, 2)])
def test_restore_onto_another_mesh_is_identical(saved, shape):
    config, wd, _, state, _ = saved
    mesh = sharding.make_mesh(shape)
    _, abs_state, state_sh, _, _ = train.build_abstract(config, train.model_config(config), mesh)
    mngr = ckpt.make_manager(wd, keep=2)
    m, o, meta = ckpt.restore(
        mngr,
        mngr.latest_step(),
        ckpt.abstract_like(abs_state[0], state_sh[0]),
        ckpt.abstract_like(abs_state[1], state_sh[1]),
    )
    mngr.close()
    assert meta["step"] == 7
    ref_m, ref_o = ckpt.state_to_numpy(state[0]), ckpt.state_to_numpy(state[1])
    got_m, got_o = ckpt.state_to_numpy(m), ckpt.state_to_numpy(o)
    assert ref_m.keys() == got_m.keys() and ref_o.keys() == got_o.keys()
    for k in ref_m:
        assert np.array_equal(ref_m[k], got_m[k]), k
    for k in ref_o:
        assert np.array_equal(ref_o[k], got_o[k]), k
    # the restored arrays really live on the new mesh, sharded by the rules (fsdp/model axes used)
    in_proj = m["encoder"]["blocks"]["in_proj"][...]
    assert in_proj.sharding.mesh.shape == mesh.shape
    assert in_proj.sharding.spec == jax.tree.leaves(state_sh[0]["encoder"]["blocks"]["in_proj"])[0].spec
    assert len(in_proj.addressable_shards) == 8 and in_proj.addressable_shards[0].data.shape != in_proj.shape


def test_restore_into_wrong_model_is_checkpoint_error(saved):
    config, wd, _, _, _ = saved
    config.model.decoder_width = 64  # different decoder shapes than the checkpoint
    config.model.decoder_heads = 2
    mesh = sharding.make_mesh((-1, 1, 1))
    _, abs_state, state_sh, _, _ = train.build_abstract(config, train.model_config(config), mesh)
    mngr = ckpt.make_manager(wd, keep=2)
    with pytest.raises(CheckpointError, match="does not match"):
        ckpt.restore(
            mngr, 7, ckpt.abstract_like(abs_state[0], state_sh[0]), ckpt.abstract_like(abs_state[1], state_sh[1])
        )
    mngr.close()


def encoder_reference(graphdef, state, mae_cfg):
    """The trained encoder rebuilt on one device from plain numpy parameters."""
    model, _ = nnx.merge(graphdef, state)
    enc_state = jax.tree.map(lambda x: jax.device_put(np.asarray(x), jax.devices()[0]), nnx.state(model.encoder))
    graph = nnx.graphdef(model.encoder)
    return nnx.merge(graph, enc_state)


def test_export_load_encoder_gives_identical_embeddings(saved, tmp_path):
    _, _, graphdef, state, mae_cfg = saved
    model, _ = nnx.merge(graphdef, state)
    out = ckpt.export_encoder(tmp_path / "encoder", nnx.state(model.encoder), mae_cfg.encoder)
    assert json.loads((out / "encoder.json").read_text())["vit_config"]["depth"] == mae_cfg.encoder.depth
    enc, cfg, _ = vitally_jax.load_encoder(out)
    assert cfg == mae_cfg.encoder
    leaf = jax.tree.leaves(nnx.state(enc))[0]
    assert len(leaf.devices()) == 1  # loads on one device whatever mesh wrote it
    x = jax.random.normal(jax.random.key(3), (4, 32, 32, 6))
    ref = encoder_reference(graphdef, state, mae_cfg)
    want, got = ref(x), enc(x)
    for k in ("cls", "cls_norm", "mean", "mean_norm"):
        assert np.array_equal(np.asarray(want["blocks"][k]), np.asarray(got["blocks"][k])), k
    # loading replicated over a mesh of all 8 devices gives the same parameters
    enc8, _, _ = ckpt.load_encoder(out, mesh=sharding.make_mesh((-1, 1, 1)))
    ref_params = ckpt.state_to_numpy(nnx.state(ref))
    got8 = ckpt.state_to_numpy(nnx.state(enc8))
    assert all(np.array_equal(ref_params[k], got8[k]) for k in ref_params)
    assert len(jax.tree.leaves(nnx.state(enc8))[0].devices()) == 8

    # a trimmed export (the paper's b*) holds the first b blocks of the full encoder and says depth b
    trimmed = ckpt.export_encoder(tmp_path / "trimmed", nnx.state(model.encoder), mae_cfg.encoder, num_blocks=2)
    enc2, cfg2, _ = ckpt.load_encoder(trimmed)
    assert cfg2.depth == 2 and cfg2 == mae_cfg.encoder.__class__(**{**cfg.__dict__, "depth": 2})
    got2 = ckpt.state_to_numpy(nnx.state(enc2))
    for k, v in ref_params.items():
        np.testing.assert_array_equal(got2[k], v[:2] if k.startswith("blocks/") else v)


def test_load_encoder_bad_path_is_one_line_error(tmp_path):
    with pytest.raises(CheckpointError, match="not an encoder export"):
        ckpt.load_encoder(tmp_path)
    (tmp_path / "params").mkdir()
    (tmp_path / "encoder.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable JSON"):
        ckpt.load_encoder(tmp_path)
