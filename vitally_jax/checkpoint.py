"""Orbax checkpoints: the training manager (model, optimiser, data iterator, metadata) and encoder exports.

Training checkpoints live in `WORKDIR/checkpoints/<step>/{model,opt,data,meta}`:

- `model`, `opt`: the NNX states of the MAE and of its `nnx.Optimizer` (Orbax StandardSave; every process writes
  its shards, so a checkpoint written by N processes restores on any mesh and process count);
- `data`: the Grain iterator state of every process (`process_<i>-of-<n>.json`);
- `meta`: JSON with the step, the config, the mesh, the process count and the library versions.

An encoder export is a folder `PATH/` with `params/` (Orbax StandardSave of the `ViTEncoder` state) and
`encoder.json` (the `ViTConfig` and versions). Downstream users load it with one call, on any device count,
without training code::

    enc, cfg = vitally_jax.load_encoder("runs/g8/encoder")
    out = enc(images_standardized)            # dict: tokens, blocks (per-block pooled embeddings)
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from vitally_jax.errors import CheckpointError

log = logging.getLogger("vitally_jax.checkpoint")

ITEMS = ("model", "opt", "data", "meta")
EXPORT_FORMAT = 1


def versions() -> dict[str, str]:
    """Library versions recorded in every checkpoint and export."""
    import flax
    import optax

    import vitally_jax

    return {"vitally_jax": vitally_jax.__version__, "jax": jax.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "orbax": getattr(ocp, "__version__", "?")}


# ------------------------------------------------------------------------------------------------------------
# Training checkpoints
# ------------------------------------------------------------------------------------------------------------

def make_manager(directory: str | pathlib.Path, *, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    """An Orbax CheckpointManager over `directory` with items model/opt/data/meta, keeping the last `keep`."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options, item_names=ITEMS)


def save(manager: ocp.CheckpointManager, step: int, model_state, opt_state, data_iterator, meta: dict, *,
         force: bool = False) -> bool:
    """Save asynchronously (returns once device buffers are copied; the write continues in the background)."""
    import grain

    items = dict(model=ocp.args.StandardSave(model_state), opt=ocp.args.StandardSave(opt_state),
                 meta=ocp.args.JsonSave(meta))
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return manager.save(step, args=ocp.args.Composite(**items), force=force)


def abstract_like(state, shardings):
    """ShapeDtypeStructs with the given shardings: the restore target for any mesh."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def restore(manager: ocp.CheckpointManager, step: int, abstract_model, abstract_opt, data_iterator=None):
    """Restore `step` onto the shardings in the abstract targets. Returns (model_state, opt_state, meta).

    The data iterator state is restored in place when `data_iterator` is given and the checkpoint was written by
    the same number of processes; otherwise it is skipped (the caller restarts the data stream).
    """
    import grain

    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    items = dict(model=ocp.args.StandardRestore(abstract_model), opt=ocp.args.StandardRestore(abstract_opt))
    has_data = (pathlib.Path(manager.directory) / str(step) / "data").exists()
    same_layout = meta.get("process_count") == jax.process_count() and has_data
    if data_iterator is not None and same_layout:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
        out = manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manager.directory}/{step}: does not match this model/optimizer "
                              f"({' '.join(str(e).split())[:300]})") from None
    meta["data_restored"] = bool(data_iterator is not None and same_layout)
    return out["model"], out["opt"], meta


def restore_latest(manager: ocp.CheckpointManager, abstract_model, abstract_opt, data_iterator=None):
    """Restore the newest usable checkpoint -> (step, model_state, opt_state, meta), or None if there is none.

    A checkpoint that cannot be restored (truncated or damaged files, e.g. a disk that filled up or a copy cut
    short) is logged as a warning and the previous one is tried; once one restores, the unusable newer ones are
    moved aside to `<step>.unusable` (kept for inspection, no longer seen as checkpoints). If none restores, a
    `CheckpointError` names the folder and the newest failure, and nothing is moved.
    """
    from jax.experimental import multihost_utils

    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        return None
    failed: list[tuple[int, str]] = []
    for step in steps:
        try:
            model_state, opt_state, meta = restore(manager, step, abstract_model, abstract_opt, data_iterator)
        except Exception as e:  # noqa: BLE001  (Orbax, TensorStore and JSON raise many types for damaged files)
            reason = " ".join(str(e).split())[:300] or type(e).__name__
            failed.append((step, reason))
            log.warning("checkpoint %s/%d is unusable (%s); trying the previous one", manager.directory, step, reason)
            continue
        if failed:
            if jax.process_index() == 0:
                for bad, _ in failed:
                    src = pathlib.Path(manager.directory) / str(bad)
                    dst = src.with_name(f"{bad}.unusable")
                    shutil.rmtree(dst, ignore_errors=True)
                    src.rename(dst)
                    log.warning("moved the unusable checkpoint %s aside to %s", src, dst)
            if jax.process_count() > 1:
                multihost_utils.sync_global_devices("restore_latest: unusable checkpoints moved")
            manager.reload()
        return step, model_state, opt_state, meta
    raise CheckpointError(f"{manager.directory}: no usable checkpoint ({len(steps)} tried; step {failed[0][0]}: "
                          f"{failed[0][1][:200]}); move the folder away to start over")


# ------------------------------------------------------------------------------------------------------------
# Encoder export / load
# ------------------------------------------------------------------------------------------------------------

def _config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _config_from_dict(cls, d: dict, source: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(fields)
    if unknown:
        raise CheckpointError(f"{source}: unknown encoder config fields {sorted(unknown)}")
    kw = {}
    for k, v in d.items():
        default = fields[k].default
        kw[k] = tuple(v) if isinstance(v, list) and (isinstance(default, tuple) or default is dataclasses.MISSING) \
            else v
    return cls(**kw)


def trim_encoder_state(state, depth: int, num_blocks: int):
    """Keep the first `num_blocks` of the stacked block parameters (leading layer axis of size `depth`)."""
    if not 1 <= num_blocks <= depth:
        raise CheckpointError(f"num_blocks: expected 1..{depth}, got {num_blocks}")

    def one(path, x):
        names = [str(getattr(k, "key", getattr(k, "name", ""))) for k in path]
        if "blocks" in names and x.ndim >= 1 and x.shape[0] == depth:
            return x[:num_blocks]
        return x
    return jax.tree_util.tree_map_with_path(one, state)


def export_encoder(path: str | pathlib.Path, encoder_state, vit_cfg, *, num_blocks: int | None = None) -> pathlib.Path:
    """Write an encoder-only export (parameters + `ViTConfig`) to `path`, atomically.

    `encoder_state`: `nnx.state(encoder)` (sharded or not; every process calls this with the same path).
    `num_blocks`: trim to the first b blocks (the paper's b*); the exported config then has depth b.
    Written into `.NAME.partial` next to `path` by all processes, then renamed by process 0 (an existing
    export at `path` is replaced only once the new one is complete).
    """
    from jax.experimental import multihost_utils

    path = pathlib.Path(path).absolute()
    if num_blocks is not None:
        encoder_state = trim_encoder_state(encoder_state, vit_cfg.depth, num_blocks)
        vit_cfg = dataclasses.replace(vit_cfg, depth=num_blocks)
    tmp = path.with_name(f".{path.name}.partial")
    if jax.process_index() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    multihost_utils.sync_global_devices("export_encoder:start")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp / "params", encoder_state)
        ckptr.wait_until_finished()
    if jax.process_index() == 0:
        doc = {"format": EXPORT_FORMAT, "kind": "vitally_jax encoder", "vit_config": _config_to_dict(vit_cfg),
               "versions": versions()}
        (tmp / "encoder.json").write_text(json.dumps(doc, indent=1))
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    multihost_utils.sync_global_devices("export_encoder:done")
    return path


def read_export_config(path: str | pathlib.Path):
    """The `ViTConfig` of an export (no arrays read)."""
    from vitally_jax.models.vit import ViTConfig

    path = pathlib.Path(path)
    meta = path / "encoder.json"
    if not (path / "params").is_dir() or not meta.is_file():
        raise CheckpointError(f"{path}: not an encoder export (expected params/ and encoder.json)")
    try:
        doc = json.loads(meta.read_text())
    except ValueError as e:
        raise CheckpointError(f"{meta}: unreadable JSON ({e})") from None
    if doc.get("format") != EXPORT_FORMAT or "vit_config" not in doc:
        raise CheckpointError(f"{meta}: expected format {EXPORT_FORMAT} with a vit_config, got {doc.get('format')}")
    return _config_from_dict(ViTConfig, doc["vit_config"], str(meta))


def load_encoder(path: str | pathlib.Path, *, mesh: jax.sharding.Mesh | None = None) -> tuple[Any, Any]:
    """Load an encoder export -> (`ViTEncoder`, `ViTConfig`), on one device (default) or replicated over `mesh`.

    Works on any device and process count, whatever mesh the export was written from.
    """
    from vitally_jax.models.vit import ViTEncoder

    path = pathlib.Path(path).absolute()
    cfg = read_export_config(path)
    abstract = nnx.eval_shape(lambda: ViTEncoder(cfg, rngs=nnx.Rngs(0)))
    graphdef, abs_state = nnx.split(abstract)
    if mesh is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    else:
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abs_state)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            state = ckptr.restore(path / "params", target)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}/params: does not match its encoder.json config "
                              f"({' '.join(str(e).split())[:300]})") from None
    return nnx.merge(graphdef, state), cfg


def state_to_numpy(state) -> dict:
    """Flat {path: numpy array} of a (possibly multi-process sharded) state, gathered on every process."""
    from jax.experimental import multihost_utils

    out = {}
    for path, x in jax.tree_util.tree_leaves_with_path(state):
        key = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", "")))) for k in path)
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            x = multihost_utils.process_allgather(x, tiled=True)
        out[key] = np.asarray(x)
    return out
