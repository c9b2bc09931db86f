"""Orbax checkpoints: the training manager (model, optimiser, data iterator, metadata) and encoder exports.

Training checkpoints live in `WORKDIR/checkpoints/<step>/{model,opt,data,meta}`:

- `model`, `opt`: the NNX states of the MAE and of its `nnx.Optimizer` (Orbax StandardSave; every process writes
  its shards, so a checkpoint written by N processes restores on any mesh and process count);
- `data`: the Grain iterator state of every process (`process_<i>-of-<n>.json`);
- `meta`: JSON with the step, the config, the mesh, the process count and the library versions.

Changing the number of processes. The training pipeline (`vitally_jax.data.pipeline.train_dataset`) deals one
global stream of shuffled, repeated records out by position (process p of P takes global positions p, p+P, ...),
and a record's crop and augmentation depend only on its global position. A process's saved iterator state is
`{"next_index": n}`, the number of its own records consumed; every process has consumed the same number of
batches, so the checkpoint has consumed exactly the first N * n global records. Restored by M processes, each
starts at local position N * n / M: the global batches after the resume hold the same records (same images,
crops and augmentations) as an uninterrupted run's, step for step; the order of the rows inside a global batch
follows the process layout (process-major), exactly as in an uninterrupted run with M processes. When the saved
states do not have that form (other positions per process, another iterator structure, N * n not divisible by
M), `restore` refuses with a one-line `DataLayoutError` (a `CheckpointError`, exit code 5) that names the
checkpoint, N and M and says how to continue; it is not taken for damage, so no older checkpoint is tried.
(Each process reads all N saved states: the checkpoint folder is shared, as Orbax requires anyway.)

An encoder export is a folder `PATH/` with `params/` (Orbax StandardSave of the `ViTEncoder` state) and
`encoder.json` (the `ViTConfig`, the readout and versions). The readout, `{"blocks": [b, ...], "pooling":
[name, ...]}`, is what the export is meant to be read out at: the block search's b* and the pooling it was
validated with for an export trimmed by tools/probe_sweep.py, by default the final block and
`vitally_jax.embedding.blocks.DEFAULT_POOLING`. Downstream users load it with one call, on any device count,
without training code::

    enc, cfg, readout = vitally_jax.load_encoder("runs/g8/encoder")
    out = enc(images_standardized)            # dict: tokens, blocks (per-block pooled embeddings)
    emb = vitally_jax.embed(enc, images)      # {pooling: (N, blocks, D)} at the readout's blocks and pooling
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from vitally_jax.errors import CheckpointError, ConfigError, OutputError

log = logging.getLogger("vitally_jax.checkpoint")

ITEMS = ("model", "opt", "data", "meta")
EXPORT_KIND = "encoder export"  # the artefact kind in encoder.json (see vitally_jax.fileio)
EXPORT_FORMAT = 1


def versions() -> dict[str, str]:
    """Library versions recorded in every checkpoint and export."""
    import flax
    import optax

    import vitally_jax

    return {
        "vitally_jax": vitally_jax.__version__,
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "orbax": getattr(ocp, "__version__", "?"),
    }


# ------------------------------------------------------------------------------------------------------------
# Training checkpoints
# ------------------------------------------------------------------------------------------------------------


def make_manager(directory: str | pathlib.Path, *, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    """An Orbax CheckpointManager over `directory` with items model/opt/data/meta, keeping the last `keep`."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options, item_names=ITEMS)


def save(
    manager: ocp.CheckpointManager, step: int, model_state, opt_state, data_iterator, meta: dict, *, force: bool = False
) -> bool:
    """Save asynchronously (returns once device buffers are copied; the write continues in the background)."""
    import grain

    items = dict(
        model=ocp.args.StandardSave(model_state), opt=ocp.args.StandardSave(opt_state), meta=ocp.args.JsonSave(meta)
    )
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return manager.save(step, args=ocp.args.Composite(**items), force=force)


def abstract_like(state, shardings):
    """ShapeDtypeStructs with the given shardings: the restore target for any mesh."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


class DataLayoutError(CheckpointError):
    """The data iterator state of a checkpoint cannot be carried over to this number of processes."""


def _processes(n: int) -> str:
    return f"{n} process" if n == 1 else f"{n} processes"


def _plain_position(state) -> bool:
    return (
        isinstance(state, dict)
        and set(state) == {"next_index"}
        and isinstance(state["next_index"], int)
        and not isinstance(state["next_index"], bool)
        and state["next_index"] >= 0
    )


def remap_data_state(states: list, process_count: int, current_state, *, source: str) -> dict:
    """The iterator state for each of `process_count` processes equivalent to the saved per-process `states`.

    `states[i]` is the saved state of process i of `len(states)`; `current_state` is `get_state()` of this
    process's (fresh) iterator, to check that it has the same structure. Both must be plain positions
    `{"next_index": n}` with the same n on every saved process; the result is `{"next_index": N * n / M}`.
    Anything else raises `DataLayoutError` (see the module docstring).
    """
    n_old = len(states)

    def refuse(reason: str):
        raise DataLayoutError(
            f"{source}: the data iterator state of {_processes(n_old)} cannot be carried over to "
            f"{_processes(process_count)} ({reason}); resume with {_processes(n_old)}, or move {source}/data "
            "aside to restart the data stream from its seed"
        )

    if not all(_plain_position(s) for s in states):
        refuse("a saved state is not a plain position {'next_index': n}")
    if not _plain_position(current_state):
        refuse("this input pipeline's iterator state is not a plain position {'next_index': n}")
    positions = sorted({s["next_index"] for s in states})
    if len(positions) != 1:
        refuse(f"the processes stopped at different positions {positions}")
    consumed = n_old * positions[0]
    if consumed % process_count:
        refuse(f"{consumed} records consumed in all, not divisible by {process_count}")
    return {"next_index": consumed // process_count}


def _saved_data_states(data_dir: pathlib.Path, count: int | None, source: str) -> list:
    """The per-process iterator states `process_<i>-of-<count>.json` in `data_dir` (count from the file names
    when the metadata lacks it). Missing or unreadable files are damage (a plain `CheckpointError`)."""
    if count is None:
        counts = {p.name.rsplit("-of-", 1)[-1][:-5] for p in data_dir.glob("process_*-of-*.json")}
        if len(counts) != 1 or not next(iter(counts)).isdigit():
            raise CheckpointError(f"{data_dir}: expected process_<i>-of-<n>.json files of one n, got {sorted(counts)}")
        count = int(counts.pop())
    states = []
    for i in range(count):
        f = data_dir / f"process_{i}-of-{count}.json"
        try:
            states.append(json.loads(f.read_text()))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{f}: unreadable data iterator state ({' '.join(str(e).split())[:200]})") from None
    return states


def restore(manager: ocp.CheckpointManager, step: int, abstract_model, abstract_opt, data_iterator=None):
    """Restore `step` onto the shardings in the abstract targets. Returns (model_state, opt_state, meta).

    The data iterator state is restored in place when `data_iterator` is given and the checkpoint has one:
    as saved when it was written by as many processes as there are now, else mapped onto this process count
    (`remap_data_state`; `DataLayoutError` when that is not exact). `meta["data_restored"]` says whether it
    was restored, `meta["data_remapped_from"]` the process count it was mapped from (None if not mapped).
    A checkpoint without a data item leaves the iterator as it is (the caller restarts the data stream).
    """
    import grain

    source = f"{manager.directory}/{step}"
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    items = dict(model=ocp.args.StandardRestore(abstract_model), opt=ocp.args.StandardRestore(abstract_opt))
    data_dir = pathlib.Path(manager.directory) / str(step) / "data"
    has_data = data_dir.exists()
    saved_count = meta.get("process_count")
    remapped = None
    if data_iterator is not None and has_data:
        if saved_count == jax.process_count():
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        else:  # decided before the arrays are read: a refusal costs nothing
            states = _saved_data_states(data_dir, saved_count, source)
            remapped = remap_data_state(states, jax.process_count(), data_iterator.get_state(), source=source)
            saved_count = len(states)
    try:
        out = manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{source}: does not match this model/optimizer ({' '.join(str(e).split())[:300]})"
        ) from None
    if remapped is not None:
        data_iterator.set_state(remapped)
        data_iterator.start_prefetch()
        log.info(
            "%s: data iterator state of %d processes mapped onto %d (next_index %d)",
            source,
            saved_count,
            jax.process_count(),
            remapped["next_index"],
        )
    meta["data_restored"] = bool(data_iterator is not None and has_data)
    meta["data_remapped_from"] = saved_count if remapped is not None else None
    return out["model"], out["opt"], meta


def restore_latest(manager: ocp.CheckpointManager, abstract_model, abstract_opt, data_iterator=None):
    """Restore the newest usable checkpoint -> (step, model_state, opt_state, meta), or None if there is none.

    A checkpoint that cannot be restored (truncated or damaged files, e.g. a disk that filled up or a copy cut
    short) is logged as a warning and the previous one is tried; once one restores, the unusable newer ones are
    moved aside to `<step>.unusable` (kept for inspection, no longer seen as checkpoints). If none restores, a
    `CheckpointError` names the folder and the newest failure, and nothing is moved. A `DataLayoutError` (the
    newest checkpoint's data position cannot be carried over to this process count) is raised at once.
    """
    from jax.experimental import multihost_utils

    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        return None
    failed: list[tuple[int, str]] = []
    for step in steps:
        try:
            model_state, opt_state, meta = restore(manager, step, abstract_model, abstract_opt, data_iterator)
        except DataLayoutError:
            raise  # a readable checkpoint that this process count cannot continue: not damage, no fallback
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
    raise CheckpointError(
        f"{manager.directory}: no usable checkpoint ({len(steps)} tried; step {failed[0][0]}: "
        f"{failed[0][1][:200]}); move the folder away to start over"
    )


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
        kw[k] = (
            tuple(v) if isinstance(v, list) and (isinstance(default, tuple) or default is dataclasses.MISSING) else v
        )
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


def export_encoder(
    path: str | pathlib.Path,
    encoder_state,
    vit_cfg,
    *,
    num_blocks: int | None = None,
    readout: Mapping | None = None,
    overwrite: bool = False,
    inputs=(),
) -> pathlib.Path:
    """Write an encoder-only export (parameters + `ViTConfig` + readout) to `path`, atomically.

    `encoder_state`: `nnx.state(encoder)` (sharded or not; every process calls this with the same path).
    `num_blocks`: trim to the first b blocks (the paper's b*); the exported config then has depth b.
    `readout`: `{"blocks": b or [b, ...], "pooling": name or [names]}`, blocks of the exported depth; a missing
    missing blocks default to every block of the exported depth (no choice made: embed() keeps returning all
    blocks), a missing pooling to `DEFAULT_POOLING`. Recorded in encoder.json.
    Written into `.NAME.partial` next to `path` by all processes, then swapped in by process 0. An existing
    encoder export at `path` is replaced only with `overwrite=True` (and only once the new one is complete);
    anything else at `path`, or a `path` inside one of `inputs`, is refused (`OutputError`).
    """
    from jax.experimental import multihost_utils

    from vitally_jax.fileio import ARTEFACT_KEY, check_output, swap_in

    path = pathlib.Path(path).absolute()
    check_output(path, EXPORT_KIND, overwrite=overwrite, inputs=inputs)
    if num_blocks is not None:
        encoder_state = trim_encoder_state(encoder_state, vit_cfg.depth, num_blocks)
        vit_cfg = dataclasses.replace(vit_cfg, depth=num_blocks)
    readout = {"blocks": range(1, vit_cfg.depth + 1), **dict(readout or {})}
    readout = _readout(vit_cfg.depth, readout, "readout")
    tmp = path.with_name(f".{path.name}.partial")  # one name every process agrees on
    if tmp.exists() and not set(os.listdir(tmp)) <= {"params", "encoder.json"}:
        raise OutputError(f"{tmp}: holds files that are not a partial encoder export; refusing to touch it")
    if jax.process_index() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # an interrupted export of ours (params/, encoder.json at most)
        tmp.mkdir(parents=True)
    multihost_utils.sync_global_devices("export_encoder:start")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp / "params", encoder_state)
        ckptr.wait_until_finished()
    if jax.process_index() == 0:
        doc = {
            ARTEFACT_KEY: EXPORT_KIND,
            "format": EXPORT_FORMAT,
            "kind": "vitally_jax encoder",
            "vit_config": _config_to_dict(vit_cfg),
            "readout": {"blocks": list(readout.blocks), "pooling": list(readout.pooling)},
            "versions": versions(),
        }
        (tmp / "encoder.json").write_text(json.dumps(doc, indent=1))
        swap_in(tmp, path)
    multihost_utils.sync_global_devices("export_encoder:done")
    return path


def _readout(depth: int, d: Mapping, source: str):
    """A validated `Readout` from {"blocks": ..., "pooling": ...} (missing entries: the defaults)."""
    from vitally_jax.models.readout import make_readout

    if not isinstance(d, Mapping) or set(d) - {"blocks", "pooling"}:
        raise ConfigError(f"{source}: expected a mapping with 'blocks' and 'pooling', got {d!r}")
    return make_readout(depth, d.get("blocks"), d.get("pooling"))


def _read_export_doc(path: pathlib.Path) -> dict:
    meta = path / "encoder.json"
    if not (path / "params").is_dir() or not meta.is_file():
        raise CheckpointError(f"{path}: not an encoder export (expected params/ and encoder.json)")
    try:
        doc = json.loads(meta.read_text())
    except ValueError as e:
        raise CheckpointError(f"{meta}: unreadable JSON ({e})") from None
    if doc.get("format") != EXPORT_FORMAT or "vit_config" not in doc:
        raise CheckpointError(f"{meta}: expected format {EXPORT_FORMAT} with a vit_config, got {doc.get('format')}")
    return doc


def read_export_config(path: str | pathlib.Path):
    """The `ViTConfig` of an export (no arrays read)."""
    from vitally_jax.models.vit import ViTConfig

    path = pathlib.Path(path)
    d = dict(_read_export_doc(path)["vit_config"])
    # exports written before `ViTConfig.bias` existed hold separate fc1/q/k/v block biases
    d.setdefault("bias", "free")
    return _config_from_dict(ViTConfig, d, str(path / "encoder.json"))


def read_export_readout(path: str | pathlib.Path) -> dict[str, tuple]:
    """The readout of an export, `{"blocks": (b, ...), "pooling": (name, ...)}` (no arrays read).

    Exports written before readouts were recorded: every block of their depth and `DEFAULT_POOLING`."""
    path = pathlib.Path(path)
    doc = _read_export_doc(path)
    depth = read_export_config(path).depth
    if "readout" not in doc:
        return _readout(depth, {"blocks": range(1, depth + 1)}, "").as_dict()
    try:
        return _readout(depth, doc["readout"], "readout").as_dict()
    except ConfigError as e:
        raise CheckpointError(f"{path / 'encoder.json'}: readout: {e}") from None


def load_encoder(
    path: str | pathlib.Path, *, mesh: jax.sharding.Mesh | None = None
) -> tuple[Any, Any, dict[str, tuple]]:
    """Load an encoder export -> (`ViTEncoder`, `ViTConfig`, readout), on one device (default) or replicated
    over `mesh`.

    The readout is `{"blocks": (b, ...), "pooling": (name, ...)}` (see `read_export_readout`); the encoder
    carries it as `encoder.readout`, so `vitally_jax.embed(encoder, images)` reads it out there by default.
    Works on any device and process count, whatever mesh the export was written from.
    """
    from vitally_jax.models.readout import Readout
    from vitally_jax.models.vit import ViTEncoder

    path = pathlib.Path(path).absolute()
    cfg = read_export_config(path)
    readout = read_export_readout(path)
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
        raise CheckpointError(
            f"{path}/params: does not match its encoder.json config ({' '.join(str(e).split())[:300]})"
        ) from None
    encoder = nnx.merge(graphdef, state)
    encoder.readout = Readout(**readout)
    return encoder, cfg, readout


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
