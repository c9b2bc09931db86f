"""Device meshes, parameter sharding rules and activation constraints (big_vision style).

Model code knows nothing about sharding except `constrain_batch(x)`, called after the patch embedding and after
every block. Parameter shardings come from regex rules over NNX state paths such as `blocks/in_proj` or
`decoder/blocks/fc1/kernel`:

    mesh = make_mesh((-1, 2, 1))                       # ('data', 'fsdp', 'model')
    model = create_sharded(lambda: ViTEncoder(cfg, rngs=nnx.Rngs(0)), mesh)
    with jax.set_mesh(mesh):
        graphdef, state = nnx.split(model)
        state_sh = param_shardings(state, mesh)
        fwd = jax.jit(f, in_shardings=(state_sh, batch_sharding(mesh)))

A rule's PartitionSpec names the TRAILING dimensions of a parameter; leading dimensions (the stacked layer
axis of scanned blocks, per-channel decoder stacks) are never sharded. A dimension that the mesh axis size does
not divide falls back to replication.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from vitally_jax.errors import ConfigError

AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")

# (regex over 'a/b/c' state paths, spec of the trailing dims). First match wins; no match: replicated.
DEFAULT_RULES: tuple[tuple[str, tuple], ...] = (
    (r"(^|/)in_proj$", ("fsdp", "model")),  # (D, H+3D): heads/mlp over 'model'
    (r"(^|/)(mlp_bias|fc1_bias|q_bias|k_bias|v_bias)$", ("model",)),
    (r"(^|/)(attn_out|mlp_out|proj|fc2)/kernel$", ("model", "fsdp")),
    (r"(^|/)(qkv|fc1|kv|q)/kernel$", ("fsdp", "model")),
    (r"(^|/)(qkv|fc1)/bias$", ("model",)),
    (r"(^|/)patch_embed/kernel$", (None, None, None, "fsdp")),
    (r"(^|/)(decoder_embed|decoder_pred)/kernel$", ("fsdp", None)),
)


def make_mesh(
    shape: Sequence[int] = (-1, 1, 1), axis_names: Sequence[str] = AXES, devices: Sequence[jax.Device] | None = None
) -> jax.sharding.Mesh:
    """Mesh over all (or the given) devices with Auto axis types; one entry of `shape` may be -1."""
    devices = list(jax.devices() if devices is None else devices)
    shape = list(shape)
    if len(shape) != len(axis_names):
        raise ConfigError(f"mesh shape {tuple(shape)}: expected {len(axis_names)} entries for axes {tuple(axis_names)}")
    if shape.count(-1) > 1:
        raise ConfigError(f"mesh shape {tuple(shape)}: at most one -1 allowed")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if known <= 0 or len(devices) % known:
            raise ConfigError(f"mesh shape {tuple(shape)}: {len(devices)} devices not divisible by {known}")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ConfigError(f"mesh shape {tuple(shape)}: needs {math.prod(shape)} devices, have {len(devices)}")
    dev = np.asarray(devices).reshape(shape)
    return jax.sharding.Mesh(dev, tuple(axis_names), axis_types=(AxisType.Auto,) * len(axis_names))


def _path_str(path) -> str:
    parts = []
    for k in path:
        name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", None)))
        if name == "value" and isinstance(k, jax.tree_util.GetAttrKey):
            continue
        parts.append(str(name))
    return "/".join(parts)


def spec_for(path: str, shape: tuple[int, ...], mesh, rules=None) -> P:
    """PartitionSpec for one parameter: first matching rule on its trailing dims, replicated if none."""
    rules = DEFAULT_RULES if rules is None else rules
    for pattern, trailing in rules:
        if re.search(pattern, path):
            trailing = tuple(trailing)
            if len(trailing) > len(shape):
                return P()
            full = (None,) * (len(shape) - len(trailing)) + trailing
            out = []
            for dim, ax in zip(shape, full):
                size = 1 if ax is None else math.prod(mesh.shape[a] for a in ((ax,) if isinstance(ax, str) else ax))
                out.append(ax if ax is not None and size > 1 and dim % size == 0 else None)
            return P(*out)
    return P()


def param_shardings(abstract_state, mesh, rules=None):
    """NamedShardings for every leaf of an NNX state (arrays or ShapeDtypeStructs), same tree structure."""

    def one(path, leaf):
        return NamedSharding(mesh, spec_for(_path_str(path), tuple(leaf.shape), mesh, rules))

    return jax.tree_util.tree_map_with_path(one, abstract_state)


def batch_axes(mesh) -> tuple[str, ...]:
    """The batch axes ('data', 'fsdp') that `mesh` has, in that order."""
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def data_parallel_size(mesh) -> int:
    """Number of batch shards of `mesh`: the product of its 'data' and 'fsdp' sizes (absent axes count 1)."""
    shape = dict(mesh.shape)
    return int(math.prod(shape[a] for a in batch_axes(mesh)))


def batch_sharding(mesh) -> NamedSharding:
    """Leading (batch) axis over the mesh's ('data', 'fsdp') axes (those present), everything else replicated."""
    axes = batch_axes(mesh)
    return NamedSharding(mesh, P(axes if axes else None))


def constrain_batch(x: jax.Array) -> jax.Array:
    """Constrain activations to batch-only sharding when a mesh with ('data','fsdp') is active; else no-op.

    Guards against the silent wrong-numerics trap of mixed batch/feature/weight shardings.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or not all(a in mesh.axis_names for a in BATCH_AXES):
        return x
    n = data_parallel_size(mesh)
    if n == 1 or x.shape[0] % n:
        return x
    return jax.lax.with_sharding_constraint(x, P(BATCH_AXES))


def map_batch_shards(f: Callable, *xs: jax.Array) -> jax.Array:
    """f(*xs) computed shard by shard over the batch axes (`jax.shard_map`), for ops that XLA's SPMD partitioner
    would otherwise replicate over the global batch (FFTs). f must act on each batch row independently and keep
    the leading axis. Without an active ('data', 'fsdp') mesh, or when the batch does not split evenly: f(*xs)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or not all(a in mesh.axis_names for a in BATCH_AXES):
        return f(*xs)
    n = data_parallel_size(mesh)
    if n == 1 or any(x.shape[0] % n for x in xs):
        return f(*xs)
    spec = P(BATCH_AXES)
    return jax.shard_map(f, in_specs=(spec,) * len(xs), out_specs=spec, check_vma=False)(*xs)


def create_sharded(ctor: Callable[[], nnx.Module], mesh=None, rules=None) -> nnx.Module:
    """Build `ctor()` with one jitted init, directly sharded over `mesh` (replicated rules -> no host copy).

    Without a mesh the model is simply initialised by one compiled program, which is much faster than the
    op-by-op eager initialisation of a scanned stack.
    """
    abstract = nnx.eval_shape(ctor)
    graphdef, abs_state = nnx.split(abstract)

    def init():
        return nnx.split(ctor())[1]

    if mesh is None:
        return nnx.merge(graphdef, jax.jit(init)())
    shardings = param_shardings(abs_state, mesh, rules)
    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)
