"""Our NNX parameters as flat `{'blocks.qkv.kernel': array}` dicts, and models built from such dicts.

Flat names join the NNX state path with dots; stacked block parameters keep their leading layer axis.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vitally_jax.errors import WeightsError


def _flatten(tree, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, name + "."))
        else:
            out[name] = v
    return out


def _unflatten(flat: Mapping[str, object]) -> dict:
    tree: dict = {}
    for name, v in flat.items():
        node = tree
        *parents, leaf = name.split(".")
        for p in parents:
            node = node.setdefault(int(p) if p.isdigit() else p, {})
        node[int(leaf) if leaf.isdigit() else leaf] = v
    return tree


def flat_params(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's `nnx.Param`s as {dotted name: numpy array} (a copy)."""
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {k: np.asarray(jax.device_get(v)) for k, v in _flatten(pure).items()}


def param_shapes(ctor: Callable[[], nnx.Module]) -> dict[str, tuple[int, ...]]:
    """{dotted name: shape} of the model `ctor()` would build, without allocating it."""
    abstract = nnx.eval_shape(ctor)
    pure = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    return {k: tuple(v.shape) for k, v in _flatten(pure).items()}


def model_from_params(ctor: Callable[[], nnx.Module], flat: Mapping[str, np.ndarray], *, source: str) -> nnx.Module:
    """Build `ctor()` abstractly and fill every parameter from `flat` (float32); no random init is run.

    Raises `WeightsError` if `flat` misses or adds parameters or has a wrong shape (a converter bug or a
    config that does not match the file).
    """
    abstract = nnx.eval_shape(ctor)
    graphdef, state = nnx.split(abstract)
    want = {k: tuple(v.shape) for k, v in _flatten(nnx.to_pure_dict(state)).items()}
    bad = sorted(set(want) ^ set(flat)) + sorted(
        f"{k} {np.shape(flat[k])} != {want[k]}" for k in want if k in flat and tuple(np.shape(flat[k])) != want[k]
    )
    if bad:
        from vitally_jax.interop.readers import format_keys

        raise WeightsError(f"{source}: converted parameters do not fit the model: {format_keys(bad)}")
    nnx.replace_by_pure_dict(state, _unflatten({k: jnp.asarray(v, jnp.float32) for k, v in flat.items()}))
    return nnx.merge(graphdef, state)


def apply_params(module: nnx.Module, params: dict, source: str) -> None:
    """Write a nested parameter dict (as `nnx.to_pure_dict` gives) into `module` in place; `WeightsError` if
    its groups or shapes differ from the module's."""
    state = nnx.state(module, nnx.Param)
    ours = nnx.to_pure_dict(state)

    def check(a, b, path=""):
        if isinstance(a, dict):
            if set(a) != set(b):
                raise WeightsError(f"{source}: parameter groups {sorted(set(a) ^ set(b))} at '{path}' do not match")
            for k in a:
                check(a[k], b[k], f"{path}/{k}")
        elif tuple(a.shape) != tuple(b.shape):
            raise WeightsError(f"{source}: {path} has shape {tuple(b.shape)}, model expects {tuple(a.shape)}")

    check(ours, params)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(module, state)
